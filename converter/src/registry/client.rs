//! Talking to one repository of one registry: scheme choice, the auth flow,
//! redirects, status interpretation and retries of small requests.
//!
//! - Scheme: HTTPS. Plain HTTP only for loopback registries or with `--insecure`,
//!   and then only after HTTPS failed with a connection or TLS error that is not a
//!   certificate problem (an untrusted certificate is reported, with the hint, rather
//!   than silently downgraded). The scheme that worked is kept for the run.
//! - Auth: anonymous first. A 401 with `Bearer realm,service,scope` sends us to the
//!   realm (with Basic credentials when we have some) for a token, cached per
//!   (realm, service, scope) until it expires; later requests carry it from the
//!   start, and a 401 refreshes it. A `Basic` challenge is answered with credentials.
//! - Redirects are followed here (at most 5): `Authorization` goes only to the
//!   registry's own origin (scheme, host, port), never to a CDN; `Range` and
//!   `Accept` are kept; an HTTPS → HTTP redirect is refused unless `--insecure`.
//! - Any method ([`Client::request`]): `HEAD`, `GET`, and for pushes `POST`, `PUT`,
//!   `PATCH` and `DELETE` with a body that can be sent again (after a 401 or a 307).
//!   An absolute URL the registry handed out (an upload `Location`) gets
//!   `Authorization` only when it is on the registry's own origin.
//! - Token scopes: the challenge's, or, for a pushing client, the union of the
//!   challenge's and the scopes the client asks for ([`Client::with_scopes`]).
//! - One request is one attempt ([`Client::get`]); [`Client::retrying`] repeats
//!   transient failures under the [`RetryPolicy`].

use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Result};
use ureq::http::{Method, Uri};

use super::auth::{
    self, choose_challenge, merge_scopes, parse_token_response, Challenge, Credentials, TokenCache,
    TokenKey,
};
use super::reference::{is_loopback_host, Reference};
use super::retry::{parse_retry_after, random_u64, RetryPolicy, RetryState};
use super::transport::{is_certificate_error, Agents, ProxyEnv, TransportOptions};
use super::RegistryOptions;
use crate::diag::redact_url;
use crate::digest::Digest;

/// Target of the request and auth logs (`-v`).
const LOG: &str = "hakim_convert::registry";

pub type Response = ureq::http::Response<ureq::Body>;

/// Every manifest type we read; GHCR refuses requests that do not list them.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.docker.distribution.manifest.v2+json";

/// Manifests are small; anything bigger is refused (as for local layouts).
pub const MAX_MANIFEST_BYTES: u64 = 4 << 20;
const MAX_REDIRECTS: usize = 5;
const MAX_TOKEN_BYTES: u64 = 1 << 20;
const MAX_ERROR_BODY: u64 = 16 * 1024;

/// Why one attempt failed.
#[derive(Debug)]
pub enum Failure {
    /// Worth another attempt (connection error, 5xx, 429, truncated body).
    Transient {
        message: String,
        retry_after: Option<Duration>,
    },
    /// Not (404, denied, bad content, interrupted…).
    Fatal(anyhow::Error),
}

impl Failure {
    pub fn transient(message: impl Into<String>) -> Failure {
        Failure::Transient {
            message: message.into(),
            retry_after: None,
        }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Fatal(e)
    }
}

/// Reports retries and other notes to the user (progress display or stderr).
pub type Notify = Arc<dyn Fn(&str) + Send + Sync>;

/// Everything a [`Client`] needs besides the reference.
pub struct ClientOptions {
    pub agents: Agents,
    pub insecure: bool,
    pub credentials: Option<Credentials>,
    /// Where the credentials came from, for messages.
    pub credential_source: Option<String>,
    pub retry: RetryPolicy,
    pub cancel: Arc<AtomicBool>,
    pub notify: Notify,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Scheme {
    Https,
    Http,
}

impl Scheme {
    fn as_str(self) -> &'static str {
        match self {
            Scheme::Https => "https",
            Scheme::Http => "http",
        }
    }
}

/// What a request sends.
#[derive(Clone, Copy)]
pub enum Body<'a> {
    Empty,
    Bytes(&'a [u8]),
    /// `len` bytes from a reader made afresh for every send (a repeat after a 401
    /// or a 307 needs the body again from its start).
    Stream {
        len: u64,
        open: &'a OpenBody<'a>,
    },
}

impl Body<'_> {
    /// Bytes sent.
    pub fn sent_bytes(&self) -> u64 {
        match self {
            Body::Empty => 0,
            Body::Bytes(b) => b.len() as u64,
            Body::Stream { len, .. } => *len,
        }
    }
}

/// Opens a [`Body::Stream`] from its start.
pub type OpenBody<'a> = dyn Fn() -> Result<Box<dyn Read + 'a>> + 'a;

/// Where a request goes.
#[derive(Clone, Copy, Debug)]
pub enum Target<'a> {
    /// A path under `/v2/<repository>/`.
    Repo(&'a str),
    /// An absolute URL the registry handed out (an upload `Location`).
    Url(&'a str),
}

/// A request as the caller describes it, sent as is to every URL a redirect leads to.
#[derive(Clone, Copy)]
struct Call<'a, 'b> {
    method: &'a Method,
    headers: &'a [(&'a str, String)],
    body: Body<'b>,
}

/// A final response and the URL that gave it (a relative `Location` is resolved
/// against it).
pub struct Answer {
    pub response: Response,
    pub url: Uri,
}

/// Scheme, host and port: what `Authorization` is bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Origin {
    https: bool,
    host: String,
    port: u16,
}

impl Origin {
    fn of(uri: &Uri) -> Option<Origin> {
        let https = match uri.scheme_str()? {
            s if s.eq_ignore_ascii_case("https") => true,
            s if s.eq_ignore_ascii_case("http") => false,
            _ => return None,
        };
        let host = uri.host()?.to_ascii_lowercase();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        Some(Origin { https, host, port })
    }
}

/// Resolves a `Location` header against the URL that answered.
pub fn resolve_location(base: &Uri, location: &str) -> Option<String> {
    let loc = location.trim();
    if loc.starts_with("http://") || loc.starts_with("https://") {
        return Some(loc.to_string());
    }
    let scheme = base.scheme_str()?;
    let authority = base.authority()?.as_str();
    if let Some(rest) = loc.strip_prefix("//") {
        return Some(format!("{scheme}://{rest}"));
    }
    if loc.starts_with('/') {
        return Some(format!("{scheme}://{authority}{loc}"));
    }
    let path = base.path();
    let dir = &path[..path.rfind('/').map_or(0, |i| i + 1)];
    Some(format!("{scheme}://{authority}{dir}{loc}"))
}

pub use crate::text::printable;

/// Whether a body (or its content type) is an HTML page rather than JSON or a blob.
pub fn looks_like_html(content_type: Option<&str>, body_start: &[u8]) -> bool {
    let ct_html = content_type.is_some_and(|ct| {
        let ct = ct.trim().to_ascii_lowercase();
        ct.starts_with("text/html") || ct.starts_with("application/xhtml")
    });
    let text = body_start
        .strip_prefix(b"\xef\xbb\xbf".as_slice())
        .unwrap_or(body_start)
        .trim_ascii_start();
    ct_html || text.starts_with(b"<")
}

/// The distribution spec's `{"errors":[{"code","message"}]}`, as one line.
fn registry_message(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let errors = v.get("errors")?.as_array()?;
    let parts: Vec<String> = errors
        .iter()
        .map(|e| {
            let code = e.get("code").and_then(|c| c.as_str()).unwrap_or("");
            let msg = e.get("message").and_then(|m| m.as_str()).unwrap_or("");
            match (code.is_empty(), msg.is_empty()) {
                (false, false) => format!("{code}: {msg}"),
                (false, true) => code.to_string(),
                _ => msg.to_string(),
            }
        })
        .filter(|s| !s.is_empty())
        .collect();
    (!parts.is_empty()).then(|| printable(parts.join("; "), 300))
}

pub fn header<'a>(resp: &'a Response, name: &str) -> Option<&'a str> {
    resp.headers().get(name).and_then(|v| v.to_str().ok())
}

/// A small body (manifest, config, token) fetched in full.
#[derive(Debug)]
pub struct Fetched {
    pub bytes: Vec<u8>,
    pub content_type: Option<String>,
    /// `Docker-Content-Digest`, advisory only.
    pub digest_header: Option<String>,
}

/// A client for `reference`'s repository.
pub struct Client {
    /// As the user named it, for messages.
    registry: String,
    /// `host[:port]` serving the API.
    authority: String,
    repository: String,
    allow_http: bool,
    insecure: bool,
    scheme: Mutex<Option<Scheme>>,
    agents: Agents,
    credentials: Option<Credentials>,
    credential_source: Option<String>,
    challenge: Mutex<Option<Challenge>>,
    tokens: Mutex<TokenCache>,
    /// Scopes asked for in every token request besides the challenge's (pushes).
    scopes: Vec<String>,
    policy: RetryPolicy,
    cancel: Arc<AtomicBool>,
    /// Set when a sibling download failed: the others stop too.
    aborted: AtomicBool,
    notify: Notify,
}

impl Client {
    pub fn new(reference: &Reference, opts: ClientOptions) -> Client {
        Client {
            registry: reference.registry.clone(),
            authority: reference.api_host().to_string(),
            repository: reference.repository.clone(),
            allow_http: opts.insecure || reference.is_loopback(),
            insecure: opts.insecure,
            scheme: Mutex::new(None),
            agents: opts.agents,
            credentials: opts.credentials,
            credential_source: opts.credential_source,
            challenge: Mutex::new(None),
            tokens: Mutex::new(TokenCache::default()),
            scopes: Vec::new(),
            policy: opts.retry,
            cancel: opts.cancel,
            aborted: AtomicBool::new(false),
            notify: opts.notify,
        }
    }

    /// A client for `reference` set up from the run's options: credentials looked
    /// up (`--creds`, `--creds-file`, auth files, `GITHUB_TOKEN`), agents built.
    /// Returns the warnings of the credential lookup too.
    pub fn connect(
        reference: &Reference,
        opts: &RegistryOptions,
        notify: Notify,
    ) -> Result<(Client, Vec<String>)> {
        let env = |k: &str| std::env::var(k).ok();
        let found = auth::find_credentials(
            opts.credentials.as_ref(),
            opts.credentials_file.as_deref(),
            &reference.registry,
            &reference.repository,
            &env,
        )?;
        let (credentials, credential_source) = match found.credentials {
            Some((c, s)) => (Some(c), Some(s.to_string())),
            None => (None, None),
        };
        tracing::debug!(
            target: LOG,
            registry = %reference.registry,
            "credentials: {}",
            credential_source.as_deref().unwrap_or("none (anonymous)")
        );
        let agents = Agents::new(&TransportOptions {
            insecure: opts.insecure,
            ca_certs: opts.ca_certs.clone(),
            connect_timeout: opts.connect_timeout,
            read_timeout: opts.read_timeout,
            proxy: ProxyEnv::from_lookup(env),
            ssl_cert_file: env("SSL_CERT_FILE")
                .filter(|v| !v.trim().is_empty())
                .map(Into::into),
        })?;
        let client = Client::new(
            reference,
            ClientOptions {
                agents,
                insecure: opts.insecure,
                credentials,
                credential_source,
                retry: opts.retry,
                cancel: opts.cancel.clone(),
                notify,
            },
        );
        Ok((client, found.warnings))
    }

    /// Asks for `scopes` (`repository:NAME:pull,push`, …) in every token request,
    /// merged with what each challenge names.
    pub fn with_scopes(mut self, scopes: Vec<String>) -> Client {
        self.scopes = scopes;
        self
    }

    pub fn registry(&self) -> &str {
        &self.registry
    }

    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// Where the credentials came from (`--creds`, a file…), `None` when anonymous.
    pub fn credential_source(&self) -> Option<&str> {
        self.credential_source.as_deref()
    }

    pub fn policy(&self) -> RetryPolicy {
        self.policy
    }

    pub fn notify(&self, msg: &str) {
        (self.notify)(msg)
    }

    /// Makes every request of this client stop as if interrupted.
    pub fn abort(&self) {
        self.aborted.store(true, Ordering::Relaxed);
    }

    pub fn check_cancel(&self) -> Result<(), Failure> {
        if self.cancel.load(Ordering::Relaxed) || self.aborted.load(Ordering::Relaxed) {
            Err(Failure::Fatal(anyhow!("interrupted")))
        } else {
            Ok(())
        }
    }

    /// Sleeps, waking early (with an error) when the run is cancelled.
    pub fn sleep(&self, d: Duration) -> Result<(), Failure> {
        let end = Instant::now() + d;
        loop {
            self.check_cancel()?;
            let now = Instant::now();
            if now >= end {
                return Ok(());
            }
            std::thread::sleep((end - now).min(Duration::from_millis(100)));
        }
    }

    /// The scope of a token: the challenge's (or pull on our repository), plus
    /// the scopes this client asks for.
    fn token_scope(&self, challenge: Option<&str>) -> String {
        let base = challenge
            .map(str::to_string)
            .unwrap_or_else(|| format!("repository:{}:pull", self.repository));
        if self.scopes.is_empty() {
            return base;
        }
        let mut all: Vec<&str> = self.scopes.iter().map(String::as_str).collect();
        all.push(&base);
        merge_scopes(&all)
    }

    /// `GET /v2/<repository>/<path>`: one attempt, with auth and redirects handled.
    /// Any final status is returned (a 401 only after the credentials we could
    /// offer were refused); the caller interprets it, usually with [`Client::status_failure`].
    pub fn get(&self, path: &str, headers: &[(&str, String)]) -> Result<Response, Failure> {
        self.request(Method::GET, Target::Repo(path), headers, Body::Empty)
            .map(|a| a.response)
    }

    /// Any request, one attempt, as [`Client::get`]: auth, redirects (`GET`/`HEAD`
    /// follow any; requests with a body only 307/308, sending the body again).
    pub fn request(
        &self,
        method: Method,
        target: Target<'_>,
        headers: &[(&str, String)],
        body: Body<'_>,
    ) -> Result<Answer, Failure> {
        let mut refreshes = 0;
        loop {
            self.check_cancel()?;
            let auth = self.authorization()?;
            let call = Call {
                method: &method,
                headers,
                body,
            };
            let (answer, foreign) = match target {
                Target::Repo(path) => self.send_to_registry(call, path, auth.as_deref())?,
                Target::Url(url) => self.send_to_url(call, url, auth.as_deref())?,
            };
            let resp = &answer.response;
            let status = resp.status().as_u16();
            if foreign && (status == 401 || status == 403) {
                // A signed CDN URL that expired or was refused: a new attempt starts
                // from the registry again and gets a fresh one.
                return Err(Failure::transient(format!(
                    "redirect target refused the request (HTTP {status})"
                )));
            }
            // A Bearer token fetched for this very request and still refused means
            // no access: asking again would not help. Basic takes two rounds (learn
            // the challenge, then find out whether the credentials work).
            let bearer_refreshed = refreshes > 0
                && matches!(
                    *self.challenge.lock().unwrap_or_else(|e| e.into_inner()),
                    Some(Challenge::Bearer { .. })
                );
            if status == 401 && refreshes < 2 && !bearer_refreshed {
                refreshes += 1;
                self.on_unauthorized(resp, auth.is_some())?;
                continue;
            }
            return Ok(answer);
        }
    }

    /// The `Authorization` value for the next registry request, fetching a token if
    /// the last challenge asked for one and we hold none that is still valid.
    fn authorization(&self) -> Result<Option<String>, Failure> {
        let challenge = self
            .challenge
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match challenge {
            None => Ok(None),
            Some(Challenge::Basic) => Ok(self.credentials.as_ref().map(|c| c.basic_header())),
            Some(Challenge::Bearer {
                realm,
                service,
                scope,
            }) => {
                let key = TokenKey {
                    realm,
                    service,
                    scope: self.token_scope(scope.as_deref()),
                };
                let cached = self
                    .tokens
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&key, Instant::now())
                    .map(str::to_string);
                let token = match cached {
                    Some(t) => {
                        tracing::trace!(target: LOG, scope = %key.scope, "auth: cached token");
                        t
                    }
                    None => self.fetch_token(&key)?,
                };
                Ok(Some(format!("Bearer {token}")))
            }
        }
    }

    fn on_unauthorized(&self, resp: &Response, sent_auth: bool) -> Result<(), Failure> {
        let values: Vec<&str> = resp
            .headers()
            .get_all("www-authenticate")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        let chosen = choose_challenge(values.iter().copied());
        match &chosen {
            Some(Challenge::Basic) => {
                tracing::debug!(target: LOG, "auth: HTTP 401, Basic challenge")
            }
            Some(Challenge::Bearer {
                realm,
                service,
                scope,
            }) => tracing::debug!(
                target: LOG,
                realm = %redact_url(realm),
                service = service.as_deref().unwrap_or("-"),
                scope = scope.as_deref().unwrap_or("-"),
                "auth: HTTP 401, Bearer challenge"
            ),
            None => tracing::debug!(target: LOG, "auth: HTTP 401 without a usable challenge"),
        }
        let Some(challenge) = chosen else {
            return Err(Failure::Fatal(anyhow!(
                "{}: HTTP 401 without a challenge we can answer (WWW-Authenticate: {})",
                self.registry,
                values
                    .first()
                    .map(|v| printable(v, 120))
                    .unwrap_or_else(|| "absent".into())
            )));
        };
        match challenge {
            Challenge::Basic => {
                if self.credentials.is_none() {
                    return Err(Failure::Fatal(anyhow!(
                        "{} requires a login (HTTP Basic); pass --creds USER:PASSWORD or \
                         --creds-file FILE, or add it to an auth.json / docker config.json",
                        self.registry
                    )));
                }
                let was_basic = matches!(
                    *self.challenge.lock().unwrap_or_else(|e| e.into_inner()),
                    Some(Challenge::Basic)
                );
                if was_basic && sent_auth {
                    return Err(Failure::Fatal(anyhow!(
                        "{} rejected the credentials from {}",
                        self.registry,
                        self.credential_source
                            .as_deref()
                            .unwrap_or("the command line")
                    )));
                }
                *self.challenge.lock().unwrap_or_else(|e| e.into_inner()) = Some(Challenge::Basic);
                Ok(())
            }
            Challenge::Bearer {
                realm,
                service,
                scope,
            } => {
                let key = TokenKey {
                    realm: realm.clone(),
                    service: service.clone(),
                    scope: self.token_scope(scope.as_deref()),
                };
                self.tokens
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .invalidate(&key);
                *self.challenge.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(Challenge::Bearer {
                        realm,
                        service,
                        scope: Some(key.scope.clone()),
                    });
                self.fetch_token(&key).map(|_| ())
            }
        }
    }

    /// Asks the token realm for a token and caches it.
    fn fetch_token(&self, key: &TokenKey) -> Result<String, Failure> {
        let realm: Uri = key.realm.parse().map_err(|_| {
            Failure::Fatal(anyhow!(
                "{}: token realm '{}' is not a URL",
                self.registry,
                printable(&key.realm, 200)
            ))
        })?;
        let origin = Origin::of(&realm).ok_or_else(|| {
            Failure::Fatal(anyhow!(
                "{}: token realm '{}' is not an http(s) URL",
                self.registry,
                printable(&key.realm, 200)
            ))
        })?;
        let basic = self.credentials.as_ref().map(|c| c.basic_header());
        if basic.is_some() && !origin.https && !self.insecure && !is_loopback_host(&origin.host) {
            return Err(Failure::Fatal(anyhow!(
                "{}: refusing to send credentials to the plain-HTTP token realm {} (use --insecure to allow)",
                self.registry,
                printable(&key.realm, 200)
            )));
        }
        let mut url = key.realm.clone();
        url.push(if url.contains('?') { '&' } else { '?' });
        if let Some(s) = &key.service {
            url.push_str(&format!("service={}&", percent_encode(s)));
        }
        // Several scopes (a push that mounts from another repository) are several
        // `scope` parameters, as docker sends them.
        let scopes: Vec<String> = key
            .scope
            .split(' ')
            .filter(|s| !s.is_empty())
            .map(|s| format!("scope={}", percent_encode(s)))
            .collect();
        url.push_str(&scopes.join("&"));
        let who = match &self.credential_source {
            Some(s) if basic.is_some() => format!("with the credentials from {s}"),
            _ => "anonymously".to_string(),
        };
        tracing::debug!(
            target: LOG,
            realm = %redact_url(&key.realm),
            scope = %key.scope,
            "auth: token request {who}"
        );
        let call = Call {
            method: &Method::GET,
            headers: &[],
            body: Body::Empty,
        };
        let resp = match self.follow(call, &url, basic.as_deref()) {
            Ok((a, _)) => a.response,
            Err(SendError::Transport(e)) => {
                return Err(self.transport_failure(&e, &format!("token realm {}", key.realm)))
            }
            Err(SendError::Failure(f)) => return Err(f),
        };
        let status = resp.status().as_u16();
        match status {
            200 => {}
            401 | 403 => {
                return Err(Failure::Fatal(anyhow!(
                    "{}: the token service refused access to {} {who} (HTTP {status}){}",
                    self.registry,
                    key.scope,
                    if basic.is_none() {
                        "; the image may be private: pass --creds or set GITHUB_TOKEN for ghcr.io"
                    } else {
                        ""
                    }
                )))
            }
            _ => return Err(self.status_failure(resp, "token request")),
        }
        let (body, _) = read_limited(resp, MAX_TOKEN_BYTES)
            .map_err(|e| Failure::transient(format!("token response: {e}")))?;
        let token = parse_token_response(&body)
            .map_err(|e| Failure::Fatal(e.context(format!("{}: token realm", self.registry))))?;
        tracing::debug!(
            target: LOG,
            scope = %key.scope,
            lifetime_s = token.lifetime.as_secs(),
            "auth: token received (value not logged)"
        );
        let value = token.value.clone();
        self.tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.clone(), token, Instant::now());
        Ok(value)
    }

    /// Sends to the registry, choosing (once) between HTTPS and plain HTTP.
    /// Returns the final response and whether it came from another origin.
    fn send_to_registry(
        &self,
        call: Call<'_, '_>,
        path: &str,
        auth: Option<&str>,
    ) -> Result<(Answer, bool), Failure> {
        let known = *self.scheme.lock().unwrap_or_else(|e| e.into_inner());
        let schemes: &[Scheme] = match known {
            Some(Scheme::Https) => &[Scheme::Https],
            Some(Scheme::Http) => &[Scheme::Http],
            None if self.allow_http => &[Scheme::Https, Scheme::Http],
            None => &[Scheme::Https],
        };
        let mut first_error: Option<String> = None;
        for (i, &scheme) in schemes.iter().enumerate() {
            let url = format!(
                "{}://{}/v2/{}/{}",
                scheme.as_str(),
                self.authority,
                self.repository,
                path
            );
            match self.follow(call, &url, auth) {
                Ok(r) => {
                    *self.scheme.lock().unwrap_or_else(|e| e.into_inner()) = Some(scheme);
                    return Ok(r);
                }
                Err(SendError::Failure(f)) => return Err(f),
                Err(SendError::Transport(e)) => {
                    let last = i + 1 == schemes.len();
                    if is_certificate_error(&e) || last {
                        let f = self.transport_failure(&e, &self.registry);
                        return Err(match (first_error, f) {
                            (
                                Some(first),
                                Failure::Transient {
                                    message,
                                    retry_after,
                                },
                            ) => Failure::Transient {
                                message: format!("https: {first}; http: {message}"),
                                retry_after,
                            },
                            (_, f) => f,
                        });
                    }
                    first_error = Some(e.to_string());
                }
            }
        }
        Err(Failure::transient(format!(
            "cannot reach {}",
            self.registry
        )))
    }

    /// Sends to a URL the registry handed out. `Authorization` goes along only when
    /// it is on the registry's own origin; HTTPS → HTTP is refused without `--insecure`.
    fn send_to_url(
        &self,
        call: Call<'_, '_>,
        url: &str,
        auth: Option<&str>,
    ) -> Result<(Answer, bool), Failure> {
        let fatal = |m: String| Failure::Fatal(anyhow!(m));
        let scheme = (*self.scheme.lock().unwrap_or_else(|e| e.into_inner()))
            .ok_or_else(|| fatal(format!("{}: no scheme chosen yet", self.registry)))?;
        let home = format!("{}://{}/", scheme.as_str(), self.authority)
            .parse::<Uri>()
            .ok()
            .and_then(|u| Origin::of(&u))
            .ok_or_else(|| fatal(format!("{}: not a valid registry address", self.registry)))?;
        let origin = url
            .parse::<Uri>()
            .ok()
            .and_then(|u| Origin::of(&u))
            .ok_or_else(|| {
                fatal(format!(
                    "{}: the registry gave an unusable URL {}",
                    self.registry,
                    printable(url, 200)
                ))
            })?;
        if home.https && !origin.https && !self.insecure {
            return Err(fatal(format!(
                "{}: refusing to continue over plain HTTP at {} (use --insecure to allow)",
                self.registry,
                printable(url, 200)
            )));
        }
        let same = origin == home;
        match self.follow(call, url, auth.filter(|_| same)) {
            Ok((answer, foreign)) => Ok((answer, foreign || !same)),
            Err(SendError::Failure(f)) => Err(f),
            Err(SendError::Transport(e)) => Err(self.transport_failure(&e, &self.registry)),
        }
    }

    fn transport_failure(&self, e: &ureq::Error, what: &str) -> Failure {
        if is_certificate_error(e) {
            // webpki refuses a CA certificate presented as the server's own — what
            // `openssl req -x509` makes by default, and what Go clients accept.
            let hint = if e.to_string().contains("CaUsedAsEndEntity") {
                "the server presents a CA certificate (basicConstraints CA:TRUE) as its own, \
                 which is refused even when trusted; give the registry a certificate with \
                 CA:FALSE or one signed by a CA passed with --ca-cert, or use --insecure"
            } else {
                "pass --ca-cert FILE with the registry's CA, or --insecure to skip verification"
            };
            return Failure::Fatal(anyhow!("{what}: TLS certificate not trusted ({e}); {hint}"));
        }
        match e {
            ureq::Error::BadUri(_) | ureq::Error::InvalidProxyUrl => {
                Failure::Fatal(anyhow!("{what}: {e}"))
            }
            _ => Failure::transient(format!("{e}")),
        }
    }

    /// Sends `method` to `url`, following redirects by hand. `auth` is sent only to
    /// `url`'s own origin. A request with a body follows only 307/308 (which keep
    /// the method), opening the body again.
    fn follow(
        &self,
        call: Call<'_, '_>,
        url: &str,
        auth: Option<&str>,
    ) -> Result<(Answer, bool), SendError> {
        let Call {
            method,
            headers,
            body,
        } = call;
        let fatal = |e: anyhow::Error| SendError::Failure(Failure::Fatal(e));
        let first: Uri = url
            .parse()
            .map_err(|_| fatal(anyhow!("invalid URL {}", printable(url, 200))))?;
        let home = Origin::of(&first).ok_or_else(|| fatal(anyhow!("unsupported URL {url}")))?;
        let mut uri = first;
        let mut current = url.to_string();
        for _ in 0..=MAX_REDIRECTS {
            let origin = Origin::of(&uri).ok_or_else(|| {
                fatal(anyhow!(
                    "unsupported redirect to {}",
                    printable(&current, 200)
                ))
            })?;
            let same = origin == home;
            let agent = self
                .agents
                .for_target(origin.https, &origin.host, origin.port);
            let mut req = ureq::http::Request::builder()
                .method(method.clone())
                .uri(&current);
            for (k, v) in headers {
                req = req.header(*k, v.as_str());
            }
            if same {
                if let Some(a) = auth {
                    req = req.header("Authorization", a);
                }
            }
            let sent_auth = same && auth.is_some();
            let resp = send_one(agent, req, body, method).inspect_err(|e| {
                if let SendError::Transport(e) = e {
                    tracing::debug!(target: LOG, %method, url = %redact_url(&current), error = %e, "request failed");
                }
            })?;
            let status = resp.status().as_u16();
            tracing::debug!(
                target: LOG,
                %method,
                url = %redact_url(&current),
                status,
                bytes = header(&resp, "content-length").unwrap_or("-"),
                sent = body.sent_bytes(),
                authorization = sent_auth,
                "request"
            );
            if !matches!(status, 301 | 302 | 303 | 307 | 308) {
                return Ok((
                    Answer {
                        response: resp,
                        url: uri,
                    },
                    !same,
                ));
            }
            let keeps_method = matches!(status, 307 | 308);
            let bodiless = matches!(*method, Method::GET | Method::HEAD);
            if !bodiless && !keeps_method {
                return Err(fatal(anyhow!(
                    "{method} answered with HTTP {status}, a redirect that would drop the request body"
                )));
            }
            let Some(next) = header(&resp, "location").and_then(|l| resolve_location(&uri, l))
            else {
                return Err(fatal(anyhow!(
                    "HTTP {status} redirect without a usable Location"
                )));
            };
            let next_uri: Uri = next.parse().map_err(|_| {
                fatal(anyhow!(
                    "redirect to an invalid URL {}",
                    printable(&next, 200)
                ))
            })?;
            tracing::debug!(
                target: LOG,
                to = %redact_url(&next),
                same_origin = Origin::of(&next_uri).is_some_and(|o| o == home),
                "redirect"
            );
            if origin.https && next_uri.scheme_str() == Some("http") && !self.insecure {
                return Err(fatal(anyhow!(
                    "refusing a redirect from HTTPS to plain HTTP ({})",
                    printable(&next, 200)
                )));
            }
            uri = next_uri;
            current = next;
        }
        Err(fatal(anyhow!("more than {MAX_REDIRECTS} redirects")))
    }

    /// Turns an unexpected final status into a failure with the registry's message.
    pub fn status_failure(&self, resp: Response, what: &str) -> Failure {
        let StatusReport {
            status,
            message,
            retry_after,
        } = status_report(resp, what);
        match status {
            429 | 500..=599 => Failure::Transient {
                message,
                retry_after,
            },
            401 => Failure::Fatal(anyhow!(
                "{message}: not authorised{}",
                match &self.credential_source {
                    Some(s) => format!(" with the credentials from {s}"),
                    None => "; the image may be private: pass --creds, --creds-file, or \
                             GITHUB_TOKEN for ghcr.io"
                        .to_string(),
                }
            )),
            403 => Failure::Fatal(anyhow!("{message}: access denied")),
            404 => Failure::Fatal(anyhow!(
                "{message}: not found in {}/{}",
                self.registry,
                self.repository
            )),
            _ => Failure::Fatal(anyhow!(message)),
        }
    }

    /// Repeats `op` on transient failures within the retry budget. `what` names the
    /// object in messages and in the final error.
    pub fn retrying<T>(&self, what: &str, mut op: impl FnMut() -> Result<T, Failure>) -> Result<T> {
        let mut state = RetryState::new(self.policy);
        loop {
            match op() {
                Ok(v) => return Ok(v),
                Err(Failure::Fatal(e)) => return Err(e.context(what.to_string())),
                Err(Failure::Transient {
                    message,
                    retry_after,
                }) => match state.on_failure(retry_after, Instant::now(), random_u64()) {
                    Some(delay) => {
                        let attempt = state.failures() + 1;
                        crate::diag::retry(what, &message, delay, attempt, state.max_attempts());
                        self.notify(&format!(
                            "{what}: {message}; retrying in {:.1} s (attempt {}/{})",
                            delay.as_secs_f64(),
                            state.failures() + 1,
                            state.max_attempts()
                        ));
                        if let Err(Failure::Fatal(e)) = self.sleep(delay) {
                            return Err(e);
                        }
                    }
                    None => bail!(
                        "{what}: giving up after {} failed attempts; last error: {message}",
                        state.failures()
                    ),
                },
            }
        }
    }

    /// A manifest by tag or digest (`reference`), at most 4 MiB, never HTML.
    pub fn fetch_manifest(&self, reference: &str) -> Result<Fetched> {
        let what = format!("manifest {}/{}:{reference}", self.registry, self.repository)
            .replace(":sha256:", "@sha256:");
        self.retrying(&what, || {
            let resp = self.get(
                &format!("manifests/{reference}"),
                &[("Accept", MANIFEST_ACCEPT.to_string())],
            )?;
            if resp.status().as_u16() != 200 {
                return Err(self.status_failure(resp, "GET"));
            }
            self.read_small(resp, MAX_MANIFEST_BYTES, "manifest")
        })
    }

    /// A small blob (a config) by digest, at most `max` bytes.
    pub fn fetch_small_blob(&self, digest: &Digest, max: u64) -> Result<Vec<u8>> {
        let what = format!("blob {digest}");
        self.retrying(&what, || {
            let resp = self.get(&format!("blobs/{digest}"), &[])?;
            if resp.status().as_u16() != 200 {
                return Err(self.status_failure(resp, "GET"));
            }
            self.read_small(resp, max, "blob").map(|f| f.bytes)
        })
    }

    fn read_small(&self, resp: Response, max: u64, what: &str) -> Result<Fetched, Failure> {
        let content_type = header(&resp, "content-type").map(str::to_string);
        let digest_header = header(&resp, "docker-content-digest").map(str::to_string);
        if let Some(len) =
            header(&resp, "content-length").and_then(|l| l.trim().parse::<u64>().ok())
        {
            if len > max {
                return Err(Failure::Fatal(anyhow!(
                    "{what} is {len} bytes, more than the {max} allowed; refused"
                )));
            }
        }
        let (bytes, over) = read_limited(resp, max)
            .map_err(|e| Failure::transient(format!("reading the body: {e}")))?;
        if over {
            return Err(Failure::Fatal(anyhow!(
                "{what} is larger than {max} bytes; refused"
            )));
        }
        if looks_like_html(content_type.as_deref(), &bytes) {
            return Err(Failure::Fatal(anyhow!(
                "the server answered with an HTML page instead of a {what} \
                 (a proxy or captive-portal login page?)"
            )));
        }
        Ok(Fetched {
            bytes,
            content_type,
            digest_header,
        })
    }
}

/// An unexpected final status, described: `WHAT: HTTP 404 (the registry's message)`.
pub struct StatusReport {
    pub status: u16,
    pub message: String,
    pub retry_after: Option<Duration>,
}

/// Reads (a bounded part of) the body of an unexpected answer to describe it; an
/// HTML page is named as such rather than quoted.
pub fn status_report(resp: Response, what: &str) -> StatusReport {
    let status = resp.status().as_u16();
    let retry_after =
        header(&resp, "retry-after").and_then(|v| parse_retry_after(v, SystemTime::now()));
    let content_type = header(&resp, "content-type").map(str::to_string);
    let body = read_limited(resp, MAX_ERROR_BODY)
        .map(|(b, _)| b)
        .unwrap_or_default();
    let detail = if looks_like_html(content_type.as_deref(), &body) {
        " (an HTML page: a proxy or login page?)".to_string()
    } else {
        registry_message(&body)
            .map(|m| format!(" ({m})"))
            .unwrap_or_default()
    };
    StatusReport {
        status,
        message: format!("{what}: HTTP {status}{detail}"),
        retry_after,
    }
}

/// Reads at most `max` bytes; `true` when there was more.
pub fn read_limited(resp: Response, max: u64) -> std::io::Result<(Vec<u8>, bool)> {
    let mut out = Vec::new();
    resp.into_body()
        .into_reader()
        .take(max + 1)
        .read_to_end(&mut out)?;
    let over = out.len() as u64 > max;
    out.truncate(max as usize);
    Ok((out, over))
}

enum SendError {
    /// The request did not get an HTTP answer.
    Transport(ureq::Error),
    Failure(Failure),
}

/// One request on the wire. An empty body of a method that carries one is sent as
/// `Content-Length: 0` (some front ends answer 411 otherwise).
fn send_one(
    agent: &ureq::Agent,
    req: ureq::http::request::Builder,
    body: Body<'_>,
    method: &Method,
) -> Result<Response, SendError> {
    let invalid = |e: ureq::http::Error| {
        SendError::Failure(Failure::Fatal(anyhow!("cannot build the request: {e}")))
    };
    let carries_body = matches!(*method, Method::POST | Method::PUT | Method::PATCH);
    let result = match body {
        Body::Empty if carries_body => agent.run(req.body(&[][..]).map_err(invalid)?),
        Body::Empty => agent.run(req.body(()).map_err(invalid)?),
        Body::Bytes(b) => agent.run(req.body(b).map_err(invalid)?),
        Body::Stream { len, open } => {
            let mut reader = open().map_err(|e| SendError::Failure(Failure::Fatal(e)))?;
            let req = req
                .header("Content-Length", len.to_string())
                .body(ureq::SendBody::from_reader(&mut *reader))
                .map_err(invalid)?;
            agent.run(req)
        }
    };
    result.map_err(SendError::Transport)
}

/// Query-string encoding: unreserved characters kept, everything else `%XX`.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_lists_the_four_manifest_types() {
        use crate::source::manifest::{DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST};
        let listed: Vec<&str> = MANIFEST_ACCEPT.split(", ").collect();
        assert_eq!(
            listed,
            [OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST]
        );
    }

    #[test]
    fn locations() {
        let base: Uri = "https://reg.example:5000/v2/a/blobs/sha256:x"
            .parse()
            .unwrap();
        assert_eq!(
            resolve_location(&base, "https://cdn.example/p?sig=1").as_deref(),
            Some("https://cdn.example/p?sig=1")
        );
        assert_eq!(
            resolve_location(&base, "//cdn.example/p").as_deref(),
            Some("https://cdn.example/p")
        );
        assert_eq!(
            resolve_location(&base, "/other/path").as_deref(),
            Some("https://reg.example:5000/other/path")
        );
        assert_eq!(
            resolve_location(&base, "rel").as_deref(),
            Some("https://reg.example:5000/v2/a/blobs/rel")
        );
    }

    #[test]
    fn origins() {
        let o = |s: &str| Origin::of(&s.parse::<Uri>().unwrap());
        assert_eq!(o("https://ghcr.io/v2/"), o("https://GHCR.io:443/x"));
        assert_ne!(o("https://ghcr.io/"), o("http://ghcr.io/"));
        assert_ne!(o("http://127.0.0.1:5000/"), o("http://127.0.0.1:5001/"));
        assert_ne!(
            o("https://ghcr.io/"),
            o("https://pkg-containers.githubusercontent.com/")
        );
        assert_eq!(o("ftp://x/"), None);
    }

    #[test]
    fn html_and_errors() {
        assert!(looks_like_html(Some("text/html; charset=utf-8"), b"{}"));
        assert!(looks_like_html(None, b"\xef\xbb\xbf  <!DOCTYPE html>"));
        assert!(!looks_like_html(Some("application/json"), b"{\"a\":1}"));
        assert_eq!(
            registry_message(br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown","detail":{}}]}"#)
                .as_deref(),
            Some("MANIFEST_UNKNOWN: manifest unknown")
        );
        assert_eq!(registry_message(b"oops"), None);
        assert_eq!(
            percent_encode("repository:a/b:pull"),
            "repository%3Aa%2Fb%3Apull"
        );
        assert_eq!(printable("a\nb\u{7}c", 10), "a\\nb\\x07c");
    }
}

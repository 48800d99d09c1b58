//! Talking to one repository of one registry: scheme choice, sending a request with
//! its auth, status interpretation and retries of small requests. The token flow is in
//! [`super::auth_flow`], redirects and where `Authorization` may go in
//! [`super::redirect`], what a request sends in [`super::request`].
//!
//! - Scheme: HTTPS. Plain HTTP only for loopback registries or with `--insecure`,
//!   and then only after HTTPS failed with a connection or TLS error that is not a
//!   certificate problem (an untrusted certificate is reported, with the hint, rather
//!   than silently downgraded). The scheme that worked is kept for the run.
//! - Auth: anonymous first; a `401` is answered by the token flow and the request
//!   sent again (twice at most).
//! - Any method ([`Client::request`]): `HEAD`, `GET`, and for pushes `POST`, `PUT`,
//!   `PATCH` and `DELETE` with a body that can be sent again (after a 401 or a 307).
//! - One request is one attempt ([`Client::get`]); [`Client::retrying`] repeats
//!   transient failures under the [`RetryPolicy`].

use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Result};
use ureq::http::Method;

use super::auth::{self, Challenge, Credentials, TokenCache};
use super::reference::Reference;
pub use super::request::{
    header, percent_encode, resolve_location, Answer, Body, Failure, OpenBody, Response, Target,
};
use super::request::{Call, SendError, LOG};
use super::retry::{parse_retry_after, random_u64, RetryPolicy, RetryState};
use super::transport::{is_certificate_error, Agents, ProxyEnv, TransportOptions};
use super::RegistryOptions;
use crate::digest::Digest;

/// Every manifest type we read; GHCR refuses requests that do not list them.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.docker.distribution.manifest.v2+json";

/// Manifests are small; anything bigger is refused (as for local layouts).
pub const MAX_MANIFEST_BYTES: u64 = 4 << 20;
const MAX_ERROR_BODY: u64 = 16 * 1024;

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
pub(super) enum Scheme {
    Https,
    Http,
}

impl Scheme {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Scheme::Https => "https",
            Scheme::Http => "http",
        }
    }
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
    pub(super) registry: String,
    /// `host[:port]` serving the API.
    pub(super) authority: String,
    pub(super) repository: String,
    pub(super) allow_http: bool,
    pub(super) insecure: bool,
    pub(super) scheme: Mutex<Option<Scheme>>,
    pub(super) agents: Agents,
    pub(super) credentials: Option<Credentials>,
    pub(super) credential_source: Option<String>,
    pub(super) challenge: Mutex<Option<Challenge>>,
    pub(super) tokens: Mutex<TokenCache>,
    /// Scopes asked for in every token request besides the challenge's (pushes).
    pub(super) scopes: Vec<String>,
    pub(super) policy: RetryPolicy,
    pub(super) cancel: Arc<AtomicBool>,
    /// Set when a sibling download failed: the others stop too.
    pub(super) aborted: AtomicBool,
    pub(super) notify: Notify,
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

    pub(super) fn transport_failure(&self, e: &ureq::Error, what: &str) -> Failure {
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

//! The token flow of a [`Client`]: which `Authorization` a request carries, what a
//! `401` asks for (a `Basic` login or a `Bearer` token from a realm), fetching tokens
//! (anonymously or with Basic credentials, never over plain HTTP to a remote realm
//! without `--insecure`) and caching them per realm, service and scope. A pushing
//! client's token scopes are the union of the challenge's and its own.

use std::time::Instant;

use anyhow::anyhow;
use ureq::http::{Method, Uri};

use super::auth::{choose_challenge, merge_scopes, parse_token_response, Challenge, TokenKey};
use super::client::{read_limited, Client};
use super::redirect::Origin;
use super::reference::is_loopback_host;
use super::request::{percent_encode, Body, Call, Failure, Response, SendError, LOG};
use crate::diag::redact_url;
use crate::text::printable;

/// Token answers are small; a bigger one is refused.
const MAX_TOKEN_BYTES: u64 = 1 << 20;

impl Client {
    /// The scope of a token: the challenge's (or pull on our repository), plus
    /// the scopes this client asks for.
    pub(super) fn token_scope(&self, challenge: Option<&str>) -> String {
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

    /// The `Authorization` value for the next registry request, fetching a token if
    /// the last challenge asked for one and we hold none that is still valid.
    pub(super) fn authorization(&self) -> Result<Option<String>, Failure> {
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

    pub(super) fn on_unauthorized(&self, resp: &Response, sent_auth: bool) -> Result<(), Failure> {
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
    pub(super) fn fetch_token(&self, key: &TokenKey) -> Result<String, Failure> {
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
}

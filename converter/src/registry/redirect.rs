//! Where `Authorization` may go, and following redirects by hand: it is bound to the
//! origin (scheme, host, port) of the URL it was meant for, so a redirect to a CDN
//! never carries it; `Range` and `Accept` are kept; at most 5 redirects; HTTPS → HTTP
//! is refused unless `--insecure`; a request with a body follows only 307/308 (which
//! keep the method), sending the body again. An absolute URL the registry handed out
//! (an upload `Location`) gets `Authorization` only on the registry's own origin.

use anyhow::anyhow;
use ureq::http::{Method, Uri};

use super::client::Client;
use super::request::{header, resolve_location, send_one, Answer, Call, Failure, SendError, LOG};
use crate::diag::redact_url;
use crate::text::printable;

const MAX_REDIRECTS: usize = 5;

/// Scheme, host and port: what `Authorization` is bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Origin {
    pub(super) https: bool,
    pub(super) host: String,
    pub(super) port: u16,
}

impl Origin {
    pub(super) fn of(uri: &Uri) -> Option<Origin> {
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

impl Client {
    /// Sends to a URL the registry handed out. `Authorization` goes along only when
    /// it is on the registry's own origin; HTTPS → HTTP is refused without `--insecure`.
    pub(super) fn send_to_url(
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

    /// Sends `method` to `url`, following redirects by hand. `auth` is sent only to
    /// `url`'s own origin. A request with a body follows only 307/308 (which keep
    /// the method), opening the body again.
    pub(super) fn follow(
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
}

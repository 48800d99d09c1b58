//! What one request sends and how it goes on the wire: the body (none, bytes, or a
//! stream that can be opened again for a repeat after a `401` or a `307`), where it
//! goes (a repository path or a URL the registry handed out), query encoding and
//! `Location` resolution; what comes back (a response, or why the attempt failed).

use std::io::Read;
use std::time::Duration;

use anyhow::{anyhow, Result};
use ureq::http::{Method, Uri};

/// Target of the request and auth logs (`-v`).
pub(super) const LOG: &str = "hakim_convert::registry";

pub type Response = ureq::http::Response<ureq::Body>;

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

/// A final response and the URL that gave it (a relative `Location` is resolved
/// against it).
pub struct Answer {
    pub response: Response,
    pub url: Uri,
}

pub fn header<'a>(resp: &'a Response, name: &str) -> Option<&'a str> {
    resp.headers().get(name).and_then(|v| v.to_str().ok())
}

/// Why a send did not produce a response.
pub(super) enum SendError {
    /// The request did not get an HTTP answer.
    Transport(ureq::Error),
    Failure(Failure),
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
pub(super) struct Call<'a, 'b> {
    pub(super) method: &'a Method,
    pub(super) headers: &'a [(&'a str, String)],
    pub(super) body: Body<'b>,
}

/// One request on the wire. An empty body of a method that carries one is sent as
/// `Content-Length: 0` (some front ends answer 411 otherwise).
pub(super) fn send_one(
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

#[cfg(test)]
mod tests {
    use super::*;

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
}

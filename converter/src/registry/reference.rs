//! Image references as docker and skopeo write them:
//! `[docker://]HOST[:PORT]/NAME[:TAG][@sha256:HEX]`.
//!
//! The first path component names a registry only when it looks like a host — it
//! contains `.` or `:`, is `localhost`, or is a bracketed IPv6 address — exactly the
//! rule docker uses. Otherwise the reference is on Docker Hub: `debian` means
//! `docker.io/library/debian`, whose API lives at `registry-1.docker.io`. Without a
//! tag or digest the tag is `latest`.

use std::fmt;
use std::net::IpAddr;

use crate::digest::Digest;

/// How Docker Hub is written in references and credential files.
pub const DOCKER_HUB: &str = "docker.io";
/// Where Docker Hub's registry API is served.
pub const DOCKER_HUB_API: &str = "registry-1.docker.io";

const MAX_NAME_LEN: usize = 255;
const MAX_TAG_LEN: usize = 128;

/// A parsed registry reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// The registry as written (`ghcr.io`, `127.0.0.1:5000`, `[::1]:5000`), with
    /// Docker Hub's aliases folded into `docker.io`. Keys credential lookups.
    pub registry: String,
    /// The repository path, e.g. `shekohex/hakim-elixir` or `library/debian`.
    pub repository: String,
    /// The tag; `latest` when neither a tag nor a digest was given.
    pub tag: Option<String>,
    /// The manifest digest the reference is pinned to.
    pub digest: Option<Digest>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReferenceError {
    #[error("empty image reference")]
    Empty,
    #[error("'{0}': {1}")]
    Invalid(String, &'static str),
    #[error("'{0}': bad digest: {1}")]
    Digest(String, String),
}

/// Whether `s` (no transport prefix) is a registry reference by docker's rule: a
/// first path component that is a host name, followed by a repository path.
pub fn looks_like_registry(s: &str) -> bool {
    match s.split_once('/') {
        Some((first, rest)) => !rest.is_empty() && is_domain_like(first) && valid_domain(first),
        None => false,
    }
}

fn is_domain_like(first: &str) -> bool {
    first.contains('.') || first.contains(':') || first == "localhost" || first.starts_with('[')
}

/// `host[:port]` with a DNS-ish host, or `[v6]:port`. No leading dot (that is a path).
fn valid_domain(d: &str) -> bool {
    let (host, port) = if let Some(rest) = d.strip_prefix('[') {
        let Some((addr, after)) = rest.split_once(']') else {
            return false;
        };
        if addr.parse::<std::net::Ipv6Addr>().is_err() {
            return false;
        }
        match after {
            "" => return true,
            p => match p.strip_prefix(':') {
                Some(port) => ("x", Some(port)),
                None => return false,
            },
        }
    } else {
        match d.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (d, None),
        }
    };
    if let Some(port) = port {
        if port.is_empty() || port.parse::<u16>().is_err() {
            return false;
        }
    }
    !host.is_empty()
        && !host.starts_with('.')
        && !host.starts_with('-')
        && !host.ends_with('-')
        && !host.contains("..")
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
}

/// A path component: `[a-z0-9]+` joined by `.`, `_`, `__` or runs of `-`.
fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() || !is_alnum(b[0]) || !is_alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if is_alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !is_alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

fn is_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

fn valid_tag(t: &str) -> bool {
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_TAG_LEN
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|&x| x.is_ascii_alphanumeric() || x == b'_' || x == b'.' || x == b'-')
}

impl Reference {
    /// Parses a reference, with or without the `docker://` prefix.
    pub fn parse(input: &str) -> Result<Reference, ReferenceError> {
        let s = input.strip_prefix("docker://").unwrap_or(input);
        if s.is_empty() {
            return Err(ReferenceError::Empty);
        }
        let invalid = |why| ReferenceError::Invalid(input.to_string(), why);
        let (name_tag, digest) = match s.split_once('@') {
            Some((n, d)) => {
                let digest: Digest = d.parse().map_err(|e: crate::digest::DigestError| {
                    ReferenceError::Digest(input.to_string(), e.to_string())
                })?;
                (n, Some(digest))
            }
            None => (s, None),
        };
        let (registry, rest) = match name_tag.split_once('/') {
            Some((first, rest)) if is_domain_like(first) => {
                if !valid_domain(first) {
                    return Err(invalid("invalid registry host"));
                }
                (first.to_string(), rest)
            }
            _ => (DOCKER_HUB.to_string(), name_tag),
        };
        // The tag follows the last ':' of the last path component.
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (path, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => {
                let at = last_slash + i;
                (&rest[..at], Some(rest[at + 1..].to_string()))
            }
            None => (rest, None),
        };
        if path.is_empty() {
            return Err(invalid("no repository name"));
        }
        if path.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(invalid("repository names must be lowercase"));
        }
        if !path.split('/').all(valid_component) {
            return Err(invalid(
                "invalid repository name (lowercase letters, digits and . _ - separators)",
            ));
        }
        if let Some(t) = &tag {
            if !valid_tag(t) {
                return Err(invalid("invalid tag (letters, digits, _ . -; at most 128)"));
            }
        }
        let registry = match registry.to_ascii_lowercase().as_str() {
            "docker.io" | "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB.to_string(),
            _ => registry,
        };
        let repository = if registry == DOCKER_HUB && !path.contains('/') {
            format!("library/{path}")
        } else {
            path.to_string()
        };
        if registry.len() + 1 + repository.len() > MAX_NAME_LEN {
            return Err(invalid("name longer than 255 characters"));
        }
        let tag = match (tag, &digest) {
            (None, None) => Some("latest".to_string()),
            (t, _) => t,
        };
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// The `host[:port]` that serves the registry API.
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            &self.registry
        }
    }

    /// The host without port or brackets.
    pub fn host_name(&self) -> &str {
        host_of(&self.registry)
    }

    /// What to put after `/manifests/`: the digest when pinned, else the tag.
    pub fn manifest_reference(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".to_string(),
        }
    }

    /// The last repository component: names the artifact (`hakim-elixir`).
    pub fn basename(&self) -> &str {
        self.repository
            .rsplit('/')
            .next()
            .unwrap_or(&self.repository)
    }

    /// Loopback registries may be spoken to over plain HTTP without `--insecure`.
    pub fn is_loopback(&self) -> bool {
        is_loopback_host(self.host_name())
    }
}

/// `host` of `host[:port]` / `[v6]:port`.
pub fn host_of(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') && p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => authority,
    }
}

/// `localhost`, `127.0.0.0/8` and `::1`.
pub fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn p(s: &str) -> Reference {
        Reference::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn ghcr_forms() {
        let r = p("ghcr.io/shekohex/hakim-elixir");
        assert_eq!(r.registry, "ghcr.io");
        assert_eq!(r.api_host(), "ghcr.io");
        assert_eq!(r.repository, "shekohex/hakim-elixir");
        assert_eq!(r.tag.as_deref(), Some("latest"));
        assert_eq!(r.digest, None);
        assert_eq!(r.basename(), "hakim-elixir");
        assert_eq!(r.manifest_reference(), "latest");

        let r = p("docker://ghcr.io/shekohex/hakim-elixir:1.2");
        assert_eq!(r.tag.as_deref(), Some("1.2"));

        let r = p(&format!("ghcr.io/shekohex/hakim-elixir@sha256:{HEX}"));
        assert_eq!(r.tag, None);
        assert_eq!(r.digest.as_ref().unwrap().hex(), HEX);
        assert_eq!(r.manifest_reference(), format!("sha256:{HEX}"));

        // Tag and digest: the digest decides, the tag is kept for display.
        let r = p(&format!("ghcr.io/a/b:v1@sha256:{HEX}"));
        assert_eq!(r.tag.as_deref(), Some("v1"));
        assert_eq!(r.manifest_reference(), format!("sha256:{HEX}"));
        assert_eq!(r.to_string(), format!("ghcr.io/a/b:v1@sha256:{HEX}"));
    }

    #[test]
    fn ports_and_loopback() {
        let r = p("127.0.0.1:5000/hakim-elixir:latest");
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.host_name(), "127.0.0.1");
        assert_eq!(r.repository, "hakim-elixir");
        assert_eq!(r.tag.as_deref(), Some("latest"));
        assert!(r.is_loopback());

        let r = p("localhost/x/y");
        assert_eq!(r.registry, "localhost");
        assert!(r.is_loopback());

        let r = p("[::1]:5000/a/b:t");
        assert_eq!(r.registry, "[::1]:5000");
        assert_eq!(r.host_name(), "::1");
        assert!(r.is_loopback());

        assert!(!p("registry.example:5000/a").is_loopback());
    }

    #[test]
    fn docker_hub_normalisation() {
        let r = p("docker://debian");
        assert_eq!(r.registry, "docker.io");
        assert_eq!(r.api_host(), "registry-1.docker.io");
        assert_eq!(r.repository, "library/debian");
        assert_eq!(r.tag.as_deref(), Some("latest"));

        let r = p("docker://debian:trixie");
        assert_eq!(r.tag.as_deref(), Some("trixie"));
        let r = p("docker.io/library/debian:12");
        assert_eq!(r.repository, "library/debian");
        let r = p("index.docker.io/debian");
        assert_eq!(r.registry, "docker.io");
        assert_eq!(r.repository, "library/debian");
        let r = p("docker://someone/tool");
        assert_eq!(r.registry, "docker.io");
        assert_eq!(r.repository, "someone/tool");
    }

    #[test]
    fn bare_recognition() {
        assert!(looks_like_registry("ghcr.io/shekohex/hakim-elixir"));
        assert!(looks_like_registry("127.0.0.1:5000/hakim-elixir:latest"));
        assert!(looks_like_registry("localhost/x"));
        assert!(looks_like_registry("[::1]:5000/x"));
        assert!(!looks_like_registry("debian"));
        assert!(!looks_like_registry("someone/tool"));
        assert!(!looks_like_registry("./dir/x"));
        assert!(!looks_like_registry("../dir/x"));
        assert!(!looks_like_registry("/abs/path"));
        assert!(!looks_like_registry("image.tar"));
        assert!(!looks_like_registry("ghcr.io/"));
    }

    #[test]
    fn refusals() {
        let bad = [
            "",
            "docker://",
            "ghcr.io/Shekohex/x",
            "ghcr.io/a//b",
            "ghcr.io/a/b:",
            "ghcr.io/a/b:-x",
            "ghcr.io/a/b@sha256:abc",
            "ghcr.io/a/b@sha512:abcd",
            "ghcr.io:port/a",
            "ghcr.io/a-/b",
            "ghcr.io/a/b:t@",
            "[zz]:5000/a",
        ];
        for s in bad {
            assert!(Reference::parse(s).is_err(), "{s} should be refused");
        }
        assert!(p("ghcr.io/a__b/c-d--e/f.g").repository == "a__b/c-d--e/f.g");
    }
}

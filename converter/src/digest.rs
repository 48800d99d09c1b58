//! Content digests (`sha256:<hex>`) and a reader that hashes what flows through it.

use std::fmt;
use std::io::{self, Read};
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

/// A validated `sha256:<64 lowercase hex>` digest. Other algorithms are refused
/// with a clear message rather than silently unverified.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    hex: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DigestError {
    #[error("digest '{0}' has no algorithm prefix (expected sha256:<hex>)")]
    NoAlgorithm(String),
    #[error("digest '{0}' uses an unsupported algorithm (only sha256 is supported)")]
    Unsupported(String),
    #[error("digest '{0}' is not 64 lowercase hex characters")]
    BadHex(String),
}

impl Digest {
    pub fn from_sha256(hash: Sha256) -> Self {
        Digest {
            hex: hex::encode(hash.finalize()),
        }
    }

    pub fn of_bytes(bytes: &[u8]) -> Self {
        let mut h = Sha256::new();
        h.update(bytes);
        Self::from_sha256(h)
    }

    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// The first 12 hex digits, for messages.
    pub fn short(&self) -> &str {
        &self.hex[..12]
    }
}

impl FromStr for Digest {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let Some((alg, hex)) = s.split_once(':') else {
            return Err(DigestError::NoAlgorithm(s.to_string()));
        };
        if alg != "sha256" {
            return Err(DigestError::Unsupported(s.to_string()));
        }
        if hex.len() != 64
            || !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(DigestError::BadHex(s.to_string()));
        }
        Ok(Digest {
            hex: hex.to_string(),
        })
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Hashes and counts every byte read through it. With a limit, reading past it is
/// an error: a blob may not be longer than its descriptor says.
pub struct HashRead<R> {
    inner: R,
    /// `None`: count only (bytes an earlier read already proved).
    hash: Option<Sha256>,
    count: u64,
    limit: Option<u64>,
}

impl<R: Read> HashRead<R> {
    pub fn new(inner: R, limit: Option<u64>) -> Self {
        HashRead {
            inner,
            hash: Some(Sha256::new()),
            count: 0,
            limit,
        }
    }

    /// Counts without hashing; [`HashRead::finish`] then returns the digest of
    /// nothing, so only [`HashRead::count`] means anything.
    pub fn counting(inner: R, limit: Option<u64>) -> Self {
        HashRead {
            hash: None,
            ..Self::new(inner, limit)
        }
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn finish(self) -> (Digest, u64, R) {
        (
            Digest::from_sha256(self.hash.unwrap_or_default()),
            self.count,
            self.inner,
        )
    }
}

impl<R: Read> Read for HashRead<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(hash) = &mut self.hash {
            hash.update(&buf[..n]);
        }
        self.count += n as u64;
        if let Some(limit) = self.limit {
            if self.count > limit {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("blob is longer than the {limit} bytes its descriptor declares"),
                ));
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses() {
        let d: Digest = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
            .parse()
            .unwrap();
        assert_eq!(d, Digest::of_bytes(b""));
        assert!("sha512:abcd".parse::<Digest>().is_err());
        assert!("sha256:ABCD".parse::<Digest>().is_err());
        assert!("e3b0".parse::<Digest>().is_err());
    }

    #[test]
    fn hash_read_enforces_limit() {
        let mut r = HashRead::new(&b"hello"[..], Some(3));
        let mut out = Vec::new();
        assert!(r.read_to_end(&mut out).is_err());
        let mut r = HashRead::new(&b"hello"[..], Some(5));
        r.read_to_end(&mut out).unwrap();
        let (d, n, _) = r.finish();
        assert_eq!(n, 5);
        assert_eq!(d, Digest::of_bytes(b"hello"));
    }
}

//! Streaming one blob into the cache, resuming after interruptions.
//!
//! Every attempt starts from the registry's blob URL (a CDN's signed URL from an
//! earlier redirect may have expired); after a failure it asks for the rest with
//! `Range: bytes=N-`, where N is what the temporary file holds. The bytes already
//! there are hashed again from the file before resuming, never taken on trust. A
//! `200` answer to a ranged request means the server ignored the range: the file
//! is emptied and the body taken from byte 0. The body may never run past the
//! descriptor's size. When the last byte is in, the digest decides: a match is
//! committed to the cache, a mismatch after a resume is retried once from zero
//! (a server whose ranges are broken), and a mismatch of a straight download is an
//! error naming the blob.

use std::io::Read;
use std::time::Instant;

use anyhow::{anyhow, bail, Result};

use super::cache::{BlobCache, Partial};
use super::client::{header, looks_like_html, Client, Failure};
use super::retry::{random_u64, RetryState};
use crate::digest::Digest;

/// What to do with an answer to a blob request sent with `offset` bytes in hand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeDecision {
    /// The body continues the file at `offset`.
    Append,
    /// The body is the whole blob: empty the file and take it from byte 0.
    Restart,
    /// Useless answer: empty the file and ask again without a range.
    RestartNewRequest,
    /// 416 with the whole blob already in hand: go straight to verification.
    Complete,
    /// Not an answer to interpret here (error statuses).
    NotBody,
}

/// Decides how a response continues a download (`offset` bytes already written of a
/// blob of `size` bytes). `content_range` is the `Content-Range` header of a 206.
pub fn range_decision(
    offset: u64,
    size: u64,
    status: u16,
    content_range: Option<&str>,
) -> RangeDecision {
    match status {
        200 if offset == 0 => RangeDecision::Append,
        200 => RangeDecision::Restart,
        206 => match content_range.and_then(parse_content_range) {
            Some((start, _end, total)) if start == offset && total.is_none_or(|t| t == size) => {
                RangeDecision::Append
            }
            _ => RangeDecision::RestartNewRequest,
        },
        416 if offset == size && offset > 0 => RangeDecision::Complete,
        416 => RangeDecision::RestartNewRequest,
        _ => RangeDecision::NotBody,
    }
}

/// `bytes START-END/TOTAL` (TOTAL may be `*`).
fn parse_content_range(v: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes")?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let (start, end) = range.split_once('-')?;
    let start: u64 = start.trim().parse().ok()?;
    let end: u64 = end.trim().parse().ok()?;
    if end < start {
        return None;
    }
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    Some((start, end, total))
}

/// Receives byte counts as they arrive.
pub trait Observer: Sync {
    /// `n` more bytes of the blob were written.
    fn advanced(&self, n: u64);
    /// The file was emptied; the count starts again from 0.
    fn reset(&self);
}

/// How a blob ended up in the cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Bytes received over the network (restarts included).
    pub network_bytes: u64,
    /// Already cached: nothing was fetched.
    pub reused: bool,
}

/// Makes sure `digest` (`size` bytes) is in `cache`, downloading it if needed, under
/// the blob's fetch lock (one download however many runs need it at once).
/// `label` names the blob in messages ("layer 3/27 sha256:…").
pub fn ensure_blob(
    client: &Client,
    cache: &BlobCache,
    digest: &Digest,
    size: u64,
    label: &str,
    observer: &dyn Observer,
) -> Result<Outcome> {
    let cached = Outcome {
        network_bytes: 0,
        reused: true,
    };
    if cache.lookup(digest, Some(size)).is_some() {
        return Ok(cached);
    }
    // Another thread or process may be fetching it: wait for it, then look again.
    let _lock = cache.lock(digest, &|| {
        client
            .check_cancel()
            .map_err(|_| anyhow!("{label}: interrupted"))
    })?;
    if cache.lookup(digest, Some(size)).is_some() {
        return Ok(cached);
    }
    let mut partial = cache.partial(digest)?;
    let mut state = RetryState::new(client.policy());
    let mut network_bytes = 0u64;
    let mut resumed = false;
    let mut mismatch_retried = false;
    loop {
        match attempt(
            client,
            &mut partial,
            digest,
            size,
            observer,
            &mut network_bytes,
            &mut resumed,
        ) {
            Ok(()) => {}
            Err(Failure::Fatal(e)) => return Err(e.context(label.to_string())),
            Err(Failure::Transient {
                message,
                retry_after,
            }) => match state.on_failure(retry_after, Instant::now(), random_u64()) {
                Some(delay) => {
                    let (attempt, max) = (state.failures() + 1, state.max_attempts());
                    crate::diag::retry(label, &message, delay, attempt, max);
                    client.notify(&format!(
                        "{label}: {message}; {} in {:.1} s (attempt {}/{})",
                        if partial.is_empty() {
                            "retrying".to_string()
                        } else {
                            format!("resuming at byte {}", partial.len())
                        },
                        delay.as_secs_f64(),
                        state.failures() + 1,
                        state.max_attempts()
                    ));
                    if let Err(Failure::Fatal(e)) = client.sleep(delay) {
                        return Err(e.context(label.to_string()));
                    }
                    continue;
                }
                None => bail!(
                    "{label}: giving up after {} failed attempts ({} of {size} bytes received); \
                         last error: {message}",
                    state.failures(),
                    partial.len()
                ),
            },
        }
        // All bytes are in.
        let actual = partial.digest_so_far();
        if &actual != digest {
            if resumed && !mismatch_retried {
                mismatch_retried = true;
                client.notify(&format!(
                    "{label}: content hashes to {actual} after a resumed download; downloading it again from the start"
                ));
                partial.restart()?;
                observer.reset();
                resumed = false;
                continue;
            }
            bail!("{label}: the registry sent wrong content: {size} bytes hashing to {actual}");
        }
        partial.commit()?;
        return Ok(Outcome {
            network_bytes,
            reused: false,
        });
    }
}

/// One request: `Ok` when the file holds `size` bytes (digest not yet checked).
fn attempt(
    client: &Client,
    partial: &mut Partial,
    digest: &Digest,
    size: u64,
    observer: &dyn Observer,
    network_bytes: &mut u64,
    resumed: &mut bool,
) -> Result<(), Failure> {
    client.check_cancel()?;
    if !partial.is_empty() {
        // Trust the file, not our bookkeeping.
        partial.rehash_from_file()?;
    }
    let mut offset = partial.len();
    if offset > size {
        partial.restart()?;
        observer.reset();
        offset = 0;
    }
    let headers: Vec<(&str, String)> = if offset > 0 {
        vec![("Range", format!("bytes={offset}-"))]
    } else {
        Vec::new()
    };
    let resp = client.get(&format!("blobs/{digest}"), &headers)?;
    let status = resp.status().as_u16();
    match range_decision(offset, size, status, header(&resp, "content-range")) {
        RangeDecision::Append => {
            if offset > 0 {
                *resumed = true;
            }
        }
        RangeDecision::Restart => {
            partial.restart()?;
            observer.reset();
        }
        RangeDecision::RestartNewRequest => {
            partial.restart()?;
            observer.reset();
            return Err(Failure::transient(format!(
                "HTTP {status} with an unusable range ({}); starting over",
                header(&resp, "content-range").unwrap_or("no Content-Range")
            )));
        }
        RangeDecision::Complete => return Ok(()),
        RangeDecision::NotBody => return Err(client.status_failure(resp, "GET")),
    }
    let content_type = header(&resp, "content-type").map(str::to_string);
    let mut body = resp.into_body().into_reader();
    let mut buf = vec![0u8; 256 * 1024];
    let mut first = true;
    loop {
        client.check_cancel()?;
        let n = match body.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(Failure::transient(format!(
                    "connection lost after {} of {size} bytes: {e}",
                    partial.len()
                )))
            }
        };
        if first
            && partial.is_empty()
            && looks_like_html(content_type.as_deref(), &buf[..n])
            && !looks_binary(&buf[..n])
        {
            return Err(Failure::Fatal(anyhow!(
                "the server answered with an HTML page instead of the blob (a proxy or login page?)"
            )));
        }
        first = false;
        *network_bytes += n as u64;
        if partial.len() + n as u64 > size {
            return Err(Failure::Fatal(anyhow!(
                "the registry sent more than the {size} bytes the descriptor declares"
            )));
        }
        partial.write(&buf[..n])?;
        observer.advanced(n as u64);
    }
    if partial.len() < size {
        return Err(Failure::transient(format!(
            "body ended after {} of {size} bytes",
            partial.len()
        )));
    }
    Ok(())
}

/// Compressed layers start with a magic number; an HTML page never does. Keeps a
/// plain tar layer whose first member name starts with '<' from being mistaken.
fn looks_binary(b: &[u8]) -> bool {
    b.starts_with(&[0x1f, 0x8b])
        || b.starts_with(&[0x28, 0xb5, 0x2f, 0xfd])
        || b.starts_with(b"\xfd7zXZ\0")
        || (b.len() >= 263 && &b[257..262] == b"ustar")
}

#[cfg(test)]
mod tests {
    use super::*;
    use RangeDecision::*;

    #[test]
    fn range_decisions() {
        // Fresh download.
        assert_eq!(range_decision(0, 100, 200, None), Append);
        // Resume honoured.
        assert_eq!(
            range_decision(40, 100, 206, Some("bytes 40-99/100")),
            Append
        );
        assert_eq!(range_decision(40, 100, 206, Some("bytes 40-99/*")), Append);
        // Range ignored: the body is the whole blob.
        assert_eq!(range_decision(40, 100, 200, None), Restart);
        // A 206 for another range, another size, or without Content-Range.
        assert_eq!(
            range_decision(40, 100, 206, Some("bytes 0-99/100")),
            RestartNewRequest
        );
        assert_eq!(
            range_decision(40, 100, 206, Some("bytes 40-99/120")),
            RestartNewRequest
        );
        assert_eq!(range_decision(40, 100, 206, None), RestartNewRequest);
        assert_eq!(
            range_decision(40, 100, 206, Some("garbage")),
            RestartNewRequest
        );
        // 416: complete if we hold it all, else start over.
        assert_eq!(range_decision(100, 100, 416, None), Complete);
        assert_eq!(range_decision(60, 100, 416, None), RestartNewRequest);
        // Errors are not bodies.
        for s in [404, 500, 503, 429, 401] {
            assert_eq!(range_decision(40, 100, s, None), NotBody);
        }
    }

    #[test]
    fn content_ranges() {
        assert_eq!(parse_content_range("bytes 0-9/10"), Some((0, 9, Some(10))));
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, 9, None)));
        assert_eq!(parse_content_range("bytes 9-5/10"), None);
        assert_eq!(parse_content_range("items 0-9/10"), None);
        assert_eq!(parse_content_range("bytes */10"), None);
    }
}

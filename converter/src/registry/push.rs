//! Pushing an image to a registry (the upload side of the distribution API), with
//! the pull side's client: same credentials, TLS, proxies, retries and redirects.
//!
//! Blobs go first, config then layers in manifest order, one at a time; the manifest
//! goes last, so a tag never names a blob the registry lacks. Each blob is one retried
//! operation, and every attempt starts from the top (a failed chunked upload therefore
//! restarts with a fresh upload session):
//!
//! 1. `HEAD /v2/<name>/blobs/<digest>`: `200` = already there, nothing sent.
//! 2. With `mount_from`: `POST /v2/<name>/blobs/uploads/?mount=<digest>&from=<repo>`;
//!    `201` = mounted from that repository of the same registry, nothing sent; `202` =
//!    the registry opened an upload instead, whose `Location` is used; `401`/`403` = no
//!    read access to that repository: uploads from then on. Without:
//!    `POST /v2/<name>/blobs/uploads/`, `202` + `Location`.
//! 3. Up to [`UploadOptions::chunk_threshold`] bytes: `PUT <Location>&digest=<digest>`
//!    with the bytes. Larger: `PATCH <Location>` per chunk (`Content-Range:
//!    start-end`, each answer's `Location` used for the next), then `PUT
//!    <Location>&digest=` without a body. A registry's `OCI-Chunk-Min-Length` raises
//!    the chunk size.
//! 4. `201`, and a `Docker-Content-Digest`, when sent, equal to the digest.
//!
//! The bytes are hashed as they are read; content that does not match its digest is
//! refused here before the upload is committed (chunked) or, when the registry has
//! refused it already (monolithic), named as the reason. A source shorter or longer
//! than its declared size is an error at once. Then `PUT /v2/<name>/manifests/<tag>`
//! with `Content-Type` = the manifest's media type; the manifest digest is computed
//! from its bytes and checked against the registry's `Docker-Content-Digest`.
//!
//! Relative `Location`s are resolved against the URL that answered; a `Location` on
//! another host gets no `Authorization`. A token asks for `repository:<name>:pull,push`
//! and, when mounting, `repository:<from>:pull`.

use std::cell::Cell;
use std::io::{Cursor, Read};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use indicatif::HumanBytes;
use sha2::{Digest as _, Sha256};
use ureq::http::Method;

use super::client::{
    header, looks_like_html, percent_encode, printable, read_limited, resolve_location,
    status_report, Answer, Body, Client, Failure, Response, StatusReport, Target,
};
use super::download::Observer;
use super::progress::Progress;
use super::reference::Reference;
use super::RegistryOptions;
use crate::digest::{Digest, HashRead};

/// Blobs larger than this are uploaded in chunks.
pub const DEFAULT_CHUNK_THRESHOLD: u64 = 64 << 20;
/// Bytes per `PATCH` (held in memory while sent).
pub const DEFAULT_CHUNK_SIZE: u64 = 16 << 20;
/// Answers to uploads are small JSON or empty; longer bodies are not read.
const MAX_ANSWER_BODY: u64 = 64 * 1024;

/// How blobs are uploaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadOptions {
    /// Blobs up to this size go in one `PUT`; larger ones in `PATCH` chunks.
    pub chunk_threshold: u64,
    /// Bytes per chunk, raised to the registry's `OCI-Chunk-Min-Length`.
    pub chunk_size: u64,
}

impl Default for UploadOptions {
    fn default() -> Self {
        UploadOptions {
            chunk_threshold: DEFAULT_CHUNK_THRESHOLD,
            chunk_size: DEFAULT_CHUNK_SIZE,
        }
    }
}

/// Opens a blob's bytes from the start; called again for every attempt.
pub type OpenBlob = Box<dyn Fn() -> Result<Box<dyn Read + Send>> + Send + Sync>;

/// One blob to push (a layer or the config).
pub struct BlobUpload {
    pub digest: Digest,
    pub size: u64,
    pub open: OpenBlob,
}

impl BlobUpload {
    /// A blob held in memory (a config); digest and size computed.
    pub fn from_bytes(bytes: Vec<u8>) -> BlobUpload {
        let digest = Digest::of_bytes(&bytes);
        let size = bytes.len() as u64;
        let bytes = Arc::new(bytes);
        BlobUpload {
            digest,
            size,
            open: Box::new(move || {
                Ok(Box::new(Cursor::new(ArcBytes(bytes.clone()))) as Box<dyn Read + Send>)
            }),
        }
    }
}

/// Shared bytes a `Cursor` can read.
struct ArcBytes(Arc<Vec<u8>>);

impl AsRef<[u8]> for ArcBytes {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// An image to push.
pub struct PushRequest {
    /// Where: a tag (pushed by tag), or a digest the manifest must hash to.
    pub target: Reference,
    pub manifest: Vec<u8>,
    /// `Content-Type` of the manifest `PUT` (e.g. `application/vnd.oci.image.manifest.v1+json`).
    pub manifest_media_type: String,
    /// Every blob the manifest names (config and layers); more are pushed too.
    pub blobs: Vec<BlobUpload>,
    /// A repository of the same registry that may hold the blobs: they are mounted
    /// from it instead of uploaded when it does.
    pub mount_from: Option<String>,
}

/// What a push did (`--json`: `push`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PushStats {
    /// Blob bytes sent, restarts included (the manifest is not counted).
    pub bytes_uploaded: u64,
    pub blobs_uploaded: u64,
    /// Blobs the repository already had.
    pub blobs_existing: u64,
    /// Blobs mounted from `mount_from`.
    pub blobs_mounted: u64,
    pub manifest_digest: String,
}

/// How one blob got there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Existing,
    Mounted,
    Uploaded,
}

/// Pushes `req`'s blobs, then its manifest. Returns what was sent and the manifest
/// digest.
pub fn push(req: &PushRequest, opts: &RegistryOptions) -> Result<PushStats> {
    let plan = plan(req)?;
    let target = &req.target;
    let place = format!("{}/{}", target.registry, target.repository);
    let progress = Arc::new(Progress::for_uploads(opts.progress));
    let notify = progress.clone();
    let (client, warnings) =
        Client::connect(target, opts, Arc::new(move |m: &str| notify.note(m)))?;
    for w in &warnings {
        progress.note(w);
    }
    let client = client.with_scopes(plan.scopes.clone());
    let pusher = Pusher {
        client: &client,
        place: &place,
        mount_from: plan.mount_from.as_deref(),
        mount_refused: Cell::new(false),
        upload: opts.upload,
    };
    let mut stats = PushStats::default();
    let total = plan.order.len();
    for (i, &(index, ref role)) in plan.order.iter().enumerate() {
        let blob = &req.blobs[index];
        let label = format!("{role} {}/{total} {}", i + 1, blob.digest);
        let short = format!("{role} {}/{total} sha256:{}…", i + 1, blob.digest.short());
        let bar = progress.start(short, blob.size);
        let started = Instant::now();
        let mut sent = 0u64;
        let result = client.retrying(&label, || pusher.attempt(blob, &bar, &mut sent));
        stats.bytes_uploaded += sent;
        bar.finish(
            matches!(result, Ok(Outcome::Uploaded)),
            started.elapsed().as_secs_f64(),
        );
        match result.with_context(|| format!("pushing to {place}"))? {
            Outcome::Existing => stats.blobs_existing += 1,
            Outcome::Mounted => stats.blobs_mounted += 1,
            Outcome::Uploaded => stats.blobs_uploaded += 1,
        }
    }
    let digest = Digest::of_bytes(&req.manifest);
    let reference = target
        .tag
        .clone()
        .unwrap_or_else(|| target.manifest_reference());
    client
        .retrying(&format!("manifest {place}:{reference}"), || {
            pusher.put_manifest(req, &reference, &digest)
        })
        .with_context(|| format!("pushing to {place}"))?;
    stats.manifest_digest = digest.to_string();
    progress.summary(&format!(
        "{place}:{reference}: {} blobs uploaded ({}), {} already present, {} mounted; manifest {digest}",
        stats.blobs_uploaded,
        HumanBytes(stats.bytes_uploaded),
        stats.blobs_existing,
        stats.blobs_mounted
    ));
    Ok(stats)
}

/// What to push in which order, checked before anything is sent.
#[derive(Debug)]
struct Plan {
    /// Index into `blobs` and its role ("config", "layer", "blob").
    order: Vec<(usize, &'static str)>,
    scopes: Vec<String>,
    mount_from: Option<String>,
}

/// Checks the request and orders the blobs: the config, the layers in manifest
/// order, then any others; each digest once.
fn plan(req: &PushRequest) -> Result<Plan> {
    let target = &req.target;
    if target.tag.is_none() && target.digest.is_none() {
        bail!(
            "push target {}/{} needs a tag",
            target.registry,
            target.repository
        );
    }
    let manifest_digest = Digest::of_bytes(&req.manifest);
    if let Some(d) = &target.digest {
        if *d != manifest_digest {
            bail!("push target is pinned to {d} but the manifest hashes to {manifest_digest}");
        }
    }
    if req.manifest_media_type.trim().is_empty() {
        bail!("the manifest's media type is missing");
    }
    let manifest: serde_json::Value =
        serde_json::from_slice(&req.manifest).context("the manifest to push is not valid JSON")?;
    let mut wanted: Vec<(&'static str, Digest, u64)> = Vec::new();
    let descriptor =
        |role: &'static str, d: &serde_json::Value| -> Result<(&'static str, Digest, u64)> {
            let digest = d
                .get("digest")
                .and_then(|x| x.as_str())
                .ok_or_else(|| anyhow!("a {role} descriptor of the manifest has no digest"))?
                .parse::<Digest>()?;
            let size = d
                .get("size")
                .and_then(|x| x.as_u64())
                .ok_or_else(|| anyhow!("the {role} descriptor {digest} has no size"))?;
            Ok((role, digest, size))
        };
    if let Some(c) = manifest.get("config") {
        wanted.push(descriptor("config", c)?);
    }
    for l in manifest
        .get("layers")
        .and_then(|l| l.as_array())
        .into_iter()
        .flatten()
    {
        wanted.push(descriptor("layer", l)?);
    }
    let mut order: Vec<(usize, &'static str)> = Vec::new();
    for (role, digest, size) in &wanted {
        let Some(i) = req.blobs.iter().position(|b| b.digest == *digest) else {
            bail!("the manifest names {role} {digest}, which is not among the blobs to push");
        };
        if req.blobs[i].size != *size {
            bail!(
                "{role} {digest}: the manifest says {size} bytes, the blob to push {}",
                req.blobs[i].size
            );
        }
        if !order.iter().any(|&(j, _)| j == i) {
            order.push((i, role));
        }
    }
    for (i, b) in req.blobs.iter().enumerate() {
        if !order.iter().any(|&(j, _)| req.blobs[j].digest == b.digest) {
            order.push((i, "blob"));
        }
    }
    let mount_from = match &req.mount_from {
        Some(from) => {
            let r = Reference::parse(&format!("{}/{from}", target.registry))
                .map_err(|e| anyhow!("mount source: {e}"))?;
            (r.repository != target.repository).then_some(r.repository)
        }
        None => None,
    };
    let mut scopes = vec![format!("repository:{}:pull,push", target.repository)];
    if let Some(from) = &mount_from {
        scopes.push(format!("repository:{from}:pull"));
    }
    Ok(Plan {
        order,
        scopes,
        mount_from,
    })
}

/// Per-attempt accounting of a body being sent.
#[derive(Default)]
struct Sending {
    /// Bytes handed to the connection.
    sent: u64,
    /// The digest of the bytes, once all declared bytes were read (when hashing).
    digest: Option<Digest>,
    /// The source failed (read error, too short, too long): not worth retrying.
    fault: Option<String>,
}

/// A request body read from a blob source: counts, hashes, reports progress, and
/// refuses a source shorter or longer than declared.
struct Outgoing<'a> {
    inner: Box<dyn Read + 'a>,
    expected: u64,
    count: u64,
    hash: Option<Sha256>,
    state: &'a Mutex<Sending>,
    observer: Option<&'a dyn Observer>,
}

impl Outgoing<'_> {
    fn fault(&self, message: String) -> std::io::Error {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.fault.get_or_insert(message.clone());
        std::io::Error::other(message)
    }
}

impl Read for Outgoing<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.count == self.expected {
            return Ok(0);
        }
        let want = buf.len().min((self.expected - self.count) as usize);
        let n = match self.inner.read(&mut buf[..want]) {
            Ok(0) => {
                return Err(self.fault(format!(
                    "the blob ended after {} of the {} bytes declared",
                    self.count, self.expected
                )))
            }
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return Err(e),
            Err(e) => return Err(self.fault(format!("reading the blob: {e}"))),
        };
        self.count += n as u64;
        if let Some(h) = &mut self.hash {
            h.update(&buf[..n]);
        }
        self.state.lock().unwrap_or_else(|e| e.into_inner()).sent += n as u64;
        if let Some(o) = self.observer {
            o.advanced(n as u64);
        }
        if self.count == self.expected {
            // The connection stops reading at the declared length: look past it now.
            let mut probe = [0u8; 1];
            match self.inner.read(&mut probe) {
                Ok(0) => {}
                Ok(_) => {
                    return Err(self.fault(format!(
                        "the blob is longer than the {} bytes declared",
                        self.expected
                    )))
                }
                Err(e) => return Err(self.fault(format!("reading the blob: {e}"))),
            }
            if let Some(h) = self.hash.take() {
                self.state.lock().unwrap_or_else(|e| e.into_inner()).digest =
                    Some(Digest::from_sha256(h));
            }
        }
        Ok(n)
    }
}

/// An upload session: where to send next, and the registry's smallest chunk.
struct Session {
    location: String,
    min_chunk: u64,
}

enum Started {
    Mounted,
    Upload(Session),
}

struct Pusher<'a> {
    client: &'a Client,
    /// `registry/repository`, for messages.
    place: &'a str,
    mount_from: Option<&'a str>,
    /// The registry refused a mount (no read access to `mount_from`): no more tries.
    mount_refused: Cell<bool>,
    upload: UploadOptions,
}

impl Pusher<'_> {
    /// One attempt at getting `blob` into the repository.
    fn attempt(
        &self,
        blob: &BlobUpload,
        observer: &dyn Observer,
        sent: &mut u64,
    ) -> Result<Outcome, Failure> {
        observer.reset();
        if self.exists(blob)? {
            return Ok(Outcome::Existing);
        }
        let session = match self.start(blob)? {
            Started::Mounted => return Ok(Outcome::Mounted),
            Started::Upload(s) => s,
        };
        if blob.size > self.upload.chunk_threshold {
            self.chunked(blob, session, observer, sent)?;
        } else {
            self.monolithic(blob, &session.location, observer, sent)?;
        }
        Ok(Outcome::Uploaded)
    }

    /// `HEAD` the blob: present or not.
    fn exists(&self, blob: &BlobUpload) -> Result<bool, Failure> {
        let answer = self.client.request(
            Method::HEAD,
            Target::Repo(&format!("blobs/{}", blob.digest)),
            &[],
            Body::Empty,
        )?;
        match answer.response.status().as_u16() {
            200 => Ok(true),
            404 => Ok(false),
            _ => Err(self.refused(answer.response, "HEAD blob", false)),
        }
    }

    /// Opens an upload session, or mounts the blob.
    fn start(&self, blob: &BlobUpload) -> Result<Started, Failure> {
        let mount_from = self.mount_from.filter(|_| !self.mount_refused.get());
        let path = match mount_from {
            Some(from) => format!(
                "blobs/uploads/?mount={}&from={}",
                percent_encode(&blob.digest.to_string()),
                percent_encode(from)
            ),
            None => "blobs/uploads/".to_string(),
        };
        let answer = self
            .client
            .request(Method::POST, Target::Repo(&path), &[], Body::Empty)?;
        match answer.response.status().as_u16() {
            // No read access to the source repository: upload instead, for every blob.
            401 | 403 if mount_from.is_some() => {
                let status = answer.response.status().as_u16();
                drain(answer.response);
                self.mount_refused.set(true);
                self.client.notify(&format!(
                    "{}: mounting from {} refused (HTTP {status}); uploading instead",
                    self.place,
                    mount_from.unwrap_or_default()
                ));
                self.start(blob)
            }
            201 if mount_from.is_some() => {
                self.check_digest(&answer.response, &blob.digest, "mounted blob")?;
                drain(answer.response);
                Ok(Started::Mounted)
            }
            202 => {
                let location = self.location(&answer, "POST blobs/uploads/")?;
                let min_chunk = header(&answer.response, "oci-chunk-min-length")
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .unwrap_or(0);
                drain(answer.response);
                Ok(Started::Upload(Session {
                    location,
                    min_chunk,
                }))
            }
            _ => Err(self.refused(answer.response, "POST blobs/uploads/", true)),
        }
    }

    /// `PUT <location>&digest=` with the whole blob.
    fn monolithic(
        &self,
        blob: &BlobUpload,
        location: &str,
        observer: &dyn Observer,
        sent: &mut u64,
    ) -> Result<(), Failure> {
        let state = Mutex::new(Sending::default());
        let open = || -> Result<Box<dyn Read + '_>> {
            let inner = (blob.open)()?;
            *state.lock().unwrap_or_else(|e| e.into_inner()) = Sending::default();
            observer.reset();
            Ok(Box::new(Outgoing {
                inner,
                expected: blob.size,
                count: 0,
                hash: Some(Sha256::new()),
                state: &state,
                observer: Some(observer),
            }))
        };
        let result = self.client.request(
            Method::PUT,
            Target::Url(&with_digest(location, &blob.digest)),
            &[("Content-Type", "application/octet-stream".to_string())],
            Body::Stream {
                len: blob.size,
                open: &open,
            },
        );
        let state = state.into_inner().unwrap_or_else(|e| e.into_inner());
        *sent += state.sent;
        if let Some(fault) = state.fault {
            return Err(Failure::Fatal(anyhow!(fault)));
        }
        let answer = result?;
        let wrong = state.digest.filter(|d| *d != blob.digest);
        match (answer.response.status().as_u16(), wrong) {
            (201, None) => {
                self.check_digest(&answer.response, &blob.digest, "uploaded blob")?;
                drain(answer.response);
                Ok(())
            }
            (status, Some(actual)) => {
                let report = status_report(answer.response, "PUT");
                Err(Failure::Fatal(anyhow!(
                    "the blob's content hashes to {actual}, not {}; {}",
                    blob.digest,
                    if status == 201 {
                        "the registry accepted it anyway".to_string()
                    } else {
                        format!("refused by the registry ({})", report.message)
                    }
                )))
            }
            _ => Err(self.refused(answer.response, "PUT blob", true)),
        }
    }

    /// `PATCH` chunk after chunk, then `PUT <location>&digest=` without a body. The
    /// digest is checked before that last `PUT`: a mismatch cancels the upload.
    fn chunked(
        &self,
        blob: &BlobUpload,
        session: Session,
        observer: &dyn Observer,
        sent: &mut u64,
    ) -> Result<(), Failure> {
        let chunk_size = self.upload.chunk_size.max(session.min_chunk).max(1);
        let mut location = session.location;
        let mut source = HashRead::new((blob.open)().map_err(Failure::Fatal)?, Some(blob.size));
        let mut buf = Vec::new();
        let mut offset = 0u64;
        while offset < blob.size {
            self.client.check_cancel()?;
            let n = chunk_size.min(blob.size - offset);
            buf.resize(n as usize, 0);
            if let Err(e) = source.read_exact(&mut buf) {
                let message = if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    format!(
                        "the blob ended before the {} bytes declared (at most {} read)",
                        blob.size,
                        source.count()
                    )
                } else {
                    format!("reading the blob: {e}")
                };
                self.abandon(&location);
                return Err(Failure::Fatal(anyhow!(message)));
            }
            let end = offset + n - 1;
            let state = Mutex::new(Sending::default());
            let open = || -> Result<Box<dyn Read + '_>> {
                *state.lock().unwrap_or_else(|e| e.into_inner()) = Sending::default();
                Ok(Box::new(Outgoing {
                    inner: Box::new(&buf[..]),
                    expected: n,
                    count: 0,
                    hash: None,
                    state: &state,
                    observer: None,
                }))
            };
            let result = self.client.request(
                Method::PATCH,
                Target::Url(&location),
                &[
                    ("Content-Type", "application/octet-stream".to_string()),
                    ("Content-Range", format!("{offset}-{end}")),
                ],
                Body::Stream {
                    len: n,
                    open: &open,
                },
            );
            *sent += state.into_inner().unwrap_or_else(|e| e.into_inner()).sent;
            let answer = result?;
            match answer.response.status().as_u16() {
                202 => {}
                416 => {
                    let report = status_report(answer.response, "PATCH");
                    return Err(Failure::transient(format!(
                        "{}; the registry refused the chunk at bytes {offset}-{end}, starting over",
                        report.message
                    )));
                }
                _ => return Err(self.refused(answer.response, "PATCH blob chunk", true)),
            }
            if let Some(held) = header(&answer.response, "range").and_then(range_end) {
                if held != end {
                    return Err(Failure::transient(format!(
                        "the registry holds bytes 0-{held} after the chunk ending at {end}; starting over"
                    )));
                }
            }
            if header(&answer.response, "location").is_some() {
                location = self.location(&answer, "PATCH")?;
            }
            drain(answer.response);
            offset += n;
            observer.advanced(n);
        }
        let mut probe = [0u8; 1];
        let longer = match source.read(&mut probe) {
            Ok(0) => false,
            Ok(_) => true,
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => true,
            Err(e) => {
                self.abandon(&location);
                return Err(Failure::Fatal(anyhow!("reading the blob: {e}")));
            }
        };
        if longer {
            self.abandon(&location);
            return Err(Failure::Fatal(anyhow!(
                "the blob is longer than the {} bytes declared",
                blob.size
            )));
        }
        let (actual, _, _) = source.finish();
        if actual != blob.digest {
            self.abandon(&location);
            return Err(Failure::Fatal(anyhow!(
                "the blob's content hashes to {actual}, not {}; the upload was cancelled",
                blob.digest
            )));
        }
        let answer = self.client.request(
            Method::PUT,
            Target::Url(&with_digest(&location, &blob.digest)),
            &[],
            Body::Empty,
        )?;
        if answer.response.status().as_u16() != 201 {
            return Err(self.refused(answer.response, "PUT blob (closing the upload)", true));
        }
        self.check_digest(&answer.response, &blob.digest, "uploaded blob")?;
        drain(answer.response);
        Ok(())
    }

    fn put_manifest(
        &self,
        req: &PushRequest,
        reference: &str,
        digest: &Digest,
    ) -> Result<(), Failure> {
        let answer = self.client.request(
            Method::PUT,
            Target::Repo(&format!("manifests/{reference}")),
            &[("Content-Type", req.manifest_media_type.clone())],
            Body::Bytes(&req.manifest),
        )?;
        match answer.response.status().as_u16() {
            200 | 201 => {
                self.check_digest(&answer.response, digest, "manifest")?;
                drain(answer.response);
                Ok(())
            }
            _ => Err(self.refused(answer.response, "PUT manifest", false)),
        }
    }

    /// The `Location` of an answer, resolved against the URL that gave it.
    fn location(&self, answer: &Answer, what: &str) -> Result<String, Failure> {
        header(&answer.response, "location")
            .and_then(|l| resolve_location(&answer.url, l))
            .ok_or_else(|| {
                Failure::Fatal(anyhow!(
                    "{}: {what} answered without a usable Location",
                    self.place
                ))
            })
    }

    /// A `Docker-Content-Digest`, when sent, must name what we pushed.
    fn check_digest(&self, resp: &Response, expected: &Digest, what: &str) -> Result<(), Failure> {
        match header(resp, "docker-content-digest") {
            Some(h) if h.trim() != expected.to_string() => Err(Failure::Fatal(anyhow!(
                "{}: the registry reports the {what} as {}, not {expected}",
                self.place,
                printable(h, 100)
            ))),
            _ => Ok(()),
        }
    }

    /// An unexpected answer as a failure, in push terms: 401/403 mean no push
    /// permission, 404/405 to the upload API mean it is not offered, a `2xx` HTML
    /// page is a proxy's.
    fn refused(&self, resp: Response, what: &str, upload_api: bool) -> Failure {
        let ok_html =
            resp.status().is_success() && looks_like_html(header(&resp, "content-type"), b"");
        let StatusReport {
            status,
            message,
            retry_after,
        } = status_report(resp, what);
        let who = match self.client.credential_source() {
            Some(s) => format!("with the credentials from {s}"),
            None => "anonymously".to_string(),
        };
        match status {
            401 | 403 => Failure::Fatal(anyhow!(
                "no push permission for {} {who}: check --creds ({message})",
                self.place
            )),
            404 | 405 if upload_api => Failure::Fatal(anyhow!(
                "{}: the registry does not support the blob upload API here ({message})",
                self.place
            )),
            429 | 500..=599 => Failure::Transient {
                message,
                retry_after,
            },
            _ if ok_html => Failure::Fatal(anyhow!(
                "{}: {what} was answered by an HTML page (a proxy or login page?)",
                self.place
            )),
            _ => Failure::Fatal(anyhow!("{}: {message}", self.place)),
        }
    }

    /// Cancels an upload session (best effort: registries expire them anyway).
    fn abandon(&self, location: &str) {
        if let Ok(answer) =
            self.client
                .request(Method::DELETE, Target::Url(location), &[], Body::Empty)
        {
            drain(answer.response);
        }
    }
}

/// Reads the rest of a small answer so the connection can be reused.
fn drain(resp: Response) {
    let _ = read_limited(resp, MAX_ANSWER_BODY);
}

/// `location` with `digest=` added to its query.
fn with_digest(location: &str, digest: &Digest) -> String {
    let sep = if location.contains('?') { '&' } else { '?' };
    format!(
        "{location}{sep}digest={}",
        percent_encode(&digest.to_string())
    )
}

/// The last byte a `Range: 0-N` (or `bytes=0-N`) answer says the registry holds.
fn range_end(v: &str) -> Option<u64> {
    let v = v.trim();
    let v = v.strip_prefix("bytes=").unwrap_or(v);
    let (start, end) = v.split_once('-')?;
    if start.trim() != "0" {
        return None;
    }
    end.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(config: &BlobUpload, layers: &[&BlobUpload]) -> Vec<u8> {
        let d =
            |b: &BlobUpload| serde_json::json!({"digest": b.digest.to_string(), "size": b.size});
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "config": d(config),
            "layers": layers.iter().map(|b| d(b)).collect::<Vec<_>>(),
        }))
        .unwrap()
    }

    fn request(target: &str, manifest: Vec<u8>, blobs: Vec<BlobUpload>) -> PushRequest {
        PushRequest {
            target: Reference::parse(target).unwrap(),
            manifest,
            manifest_media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            blobs,
            mount_from: None,
        }
    }

    #[test]
    fn plan_orders_config_then_layers_then_extras() {
        let config = BlobUpload::from_bytes(b"{}".to_vec());
        let l1 = BlobUpload::from_bytes(b"layer one".to_vec());
        let l2 = BlobUpload::from_bytes(b"layer two".to_vec());
        let extra = BlobUpload::from_bytes(b"extra".to_vec());
        // A layer named twice is pushed once.
        let m = manifest(&config, &[&l1, &l2, &l1]);
        let mut req = request("127.0.0.1:5000/a/b:t", m, vec![l2, extra, config, l1]);
        let p = plan(&req).unwrap();
        assert_eq!(
            p.order,
            vec![(2, "config"), (3, "layer"), (0, "layer"), (1, "blob")]
        );
        assert_eq!(p.scopes, vec!["repository:a/b:pull,push".to_string()]);
        assert_eq!(p.mount_from, None);

        req.mount_from = Some("base/img".into());
        let p = plan(&req).unwrap();
        assert_eq!(p.mount_from.as_deref(), Some("base/img"));
        assert_eq!(
            p.scopes,
            vec![
                "repository:a/b:pull,push".to_string(),
                "repository:base/img:pull".to_string()
            ]
        );
        // Mounting from the target itself is pointless: plain pushes.
        req.mount_from = Some("a/b".into());
        assert_eq!(plan(&req).unwrap().mount_from, None);
        req.mount_from = Some("Not Valid".into());
        assert!(format!("{:#}", plan(&req).unwrap_err()).contains("mount source"));
    }

    #[test]
    fn plan_refuses_inconsistent_requests() {
        let config = BlobUpload::from_bytes(b"{}".to_vec());
        let layer = BlobUpload::from_bytes(b"layer".to_vec());
        let missing = format!("{}", layer.digest);
        let m = manifest(&config, &[&layer]);
        let err = plan(&request("r.example/a:t", m.clone(), vec![config])).unwrap_err();
        assert!(err.to_string().contains(&missing), "{err}");

        let config = BlobUpload::from_bytes(b"{}".to_vec());
        let short = BlobUpload {
            size: 3,
            ..BlobUpload::from_bytes(b"layer".to_vec())
        };
        let err = plan(&request("r.example/a:t", m.clone(), vec![config, short])).unwrap_err();
        assert!(err.to_string().contains("5 bytes"), "{err}");

        let pinned = format!("r.example/a@{}", Digest::of_bytes(b"other"));
        let err = plan(&request(&pinned, m.clone(), vec![])).unwrap_err();
        assert!(err.to_string().contains("pinned"), "{err}");

        let err = plan(&request("r.example/a:t", b"<html>".to_vec(), vec![])).unwrap_err();
        assert!(err.to_string().contains("not valid JSON"), "{err}");

        let mut req = request("r.example/a:t", m, vec![]);
        req.manifest_media_type = " ".into();
        assert!(plan(&req).unwrap_err().to_string().contains("media type"));
    }

    fn send_all(source: &[u8], expected: u64) -> (Vec<u8>, Sending, std::io::Result<()>) {
        let state = Mutex::new(Sending::default());
        let mut out = Vec::new();
        let result = {
            let mut r = Outgoing {
                inner: Box::new(source),
                expected,
                count: 0,
                hash: Some(Sha256::new()),
                state: &state,
                observer: None,
            };
            // Like the connection: never more than the declared length.
            let mut limited = (&mut r).take(expected);
            limited.read_to_end(&mut out).map(|_| ())
        };
        (out, state.into_inner().unwrap(), result)
    }

    #[test]
    fn outgoing_bodies_are_exact() {
        let (out, s, r) = send_all(b"hello", 5);
        r.unwrap();
        assert_eq!(out, b"hello");
        assert_eq!(s.sent, 5);
        assert_eq!(s.digest, Some(Digest::of_bytes(b"hello")));
        assert!(s.fault.is_none());

        let (_, s, r) = send_all(b"hell", 5);
        assert!(r.is_err());
        assert!(s.fault.unwrap().contains("ended after 4 of the 5"));
        assert_eq!(s.digest, None);

        let (_, s, r) = send_all(b"hello!", 5);
        assert!(r.is_err());
        assert!(s.fault.unwrap().contains("longer than the 5 bytes"));
    }

    #[test]
    fn upload_urls_and_ranges() {
        let d = Digest::of_bytes(b"");
        assert_eq!(
            with_digest("http://r/v2/a/blobs/uploads/u1?_state=x", &d),
            format!(
                "http://r/v2/a/blobs/uploads/u1?_state=x&digest=sha256%3A{}",
                d.hex()
            )
        );
        assert_eq!(
            with_digest("/v2/a/blobs/uploads/u1", &d),
            format!("/v2/a/blobs/uploads/u1?digest=sha256%3A{}", d.hex())
        );
        assert_eq!(range_end("0-1023"), Some(1023));
        assert_eq!(range_end("bytes=0-9"), Some(9));
        assert_eq!(range_end("5-9"), None);
        assert_eq!(range_end("junk"), None);
    }
}

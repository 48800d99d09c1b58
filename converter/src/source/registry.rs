//! `docker://HOST/NAME[:TAG|@DIGEST]` and bare registry references: resolve the
//! manifest through the registry (or the cache), download the layers in parallel
//! into the blob cache, and hand the flattener a [`BlobStore`] over the cached files.
//!
//! Index, platform and config resolution is [`manifest::resolve`], the same code
//! local layouts use, fed through [`JsonBlobs`]: each digest is looked up in the
//! cache first, then fetched — from `/manifests/` when an index listed it as a
//! manifest, from `/blobs/` otherwise — verified and cached. A reference pinned by
//! digest whose content is all cached therefore resolves and converts with the
//! registry unreachable: no request is made until something is missing.
//!
//! Layers download in the background ([`Downloads`]), bottom first: the flattener
//! opens a layer as soon as its blob is complete and verified in the cache, while
//! later ones still download.

use std::collections::HashSet;
use std::fs::File;
use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use indicatif::HumanBytes;

use super::manifest::{self, JsonBlobs};
use super::{BlobStore, Platform, ResolvedImage};
use crate::digest::Digest;
use crate::layer::LayerDesc;
use crate::registry::cache::{self, BlobCache};
use crate::registry::client::{Client, MAX_MANIFEST_BYTES};
use crate::registry::download;
use crate::registry::progress::Progress;
use crate::registry::{Reference, RegistryOptions, RegistryStats};

/// Manifest media types a `Content-Type` may name (others are sniffed from the JSON).
const KNOWN_MANIFEST_TYPES: &[&str] = &[
    manifest::OCI_INDEX,
    manifest::OCI_MANIFEST,
    manifest::DOCKER_LIST,
    manifest::DOCKER_MANIFEST,
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
];

#[derive(Default)]
struct Counters {
    bytes_downloaded: AtomicU64,
    bytes_reused: AtomicU64,
    blobs_downloaded: AtomicU64,
    blobs_reused: AtomicU64,
}

impl Counters {
    fn downloaded(&self, bytes: u64) {
        self.bytes_downloaded.fetch_add(bytes, Ordering::Relaxed);
        self.blobs_downloaded.fetch_add(1, Ordering::Relaxed);
    }

    fn reused(&self, bytes: u64) {
        self.bytes_reused.fetch_add(bytes, Ordering::Relaxed);
        self.blobs_reused.fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> RegistryStats {
        RegistryStats {
            bytes_downloaded: self.bytes_downloaded.load(Ordering::Relaxed),
            bytes_reused: self.bytes_reused.load(Ordering::Relaxed),
            blobs_downloaded: self.blobs_downloaded.load(Ordering::Relaxed),
            blobs_reused: self.blobs_reused.load(Ordering::Relaxed),
        }
    }
}

/// Manifests and configs by digest: cache, else registry (verified, then cached).
struct RegistryJson<'a> {
    client: &'a Client,
    cache: &'a BlobCache,
    /// The manifest fetched by tag, served from memory (not counted).
    top: Option<(Digest, Vec<u8>)>,
    /// Digests that indexes list as manifests (fetched from `/manifests/`).
    manifests: Mutex<HashSet<Digest>>,
    counters: &'a Counters,
}

impl RegistryJson<'_> {
    /// Remembers the children of an index, so they are fetched as manifests.
    fn note_children(&self, bytes: &[u8]) {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(bytes) else {
            return;
        };
        let Some(list) = v.get("manifests").and_then(|m| m.as_array()) else {
            return;
        };
        let mut set = self.manifests.lock().unwrap_or_else(|e| e.into_inner());
        for d in list {
            if let Some(d) = d
                .get("digest")
                .and_then(|d| d.as_str())
                .and_then(|d| d.parse().ok())
            {
                set.insert(d);
            }
        }
    }
}

impl RegistryJson<'_> {
    fn cached(&self, digest: &Digest, max: u64) -> Result<Option<Vec<u8>>> {
        let found = self.cache.read_small(digest, max)?;
        if let Some(bytes) = &found {
            self.counters.reused(bytes.len() as u64);
            self.note_children(bytes);
        }
        Ok(found)
    }
}

impl JsonBlobs for RegistryJson<'_> {
    fn read_blob(&self, digest: &Digest, max: u64) -> Result<Vec<u8>> {
        if let Some((d, bytes)) = &self.top {
            if d == digest {
                self.note_children(bytes);
                return Ok(bytes.clone());
            }
        }
        if let Some(bytes) = self.cached(digest, max)? {
            return Ok(bytes);
        }
        // Another run may be fetching it: wait, then look again.
        let _lock = self.cache.lock(digest, &|| {
            self.client
                .check_cancel()
                .map_err(|_| anyhow!("{digest}: interrupted"))
        })?;
        if let Some(bytes) = self.cached(digest, max)? {
            return Ok(bytes);
        }
        let is_manifest = self
            .manifests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(digest);
        let bytes = if is_manifest {
            self.client.fetch_manifest(&digest.to_string())?.bytes
        } else {
            self.client.fetch_small_blob(digest, max)?
        };
        let actual = Digest::of_bytes(&bytes);
        if &actual != digest {
            bail!("the registry answered {digest} with content hashing to {actual}");
        }
        self.cache.insert_bytes(digest, &bytes)?;
        self.counters.downloaded(bytes.len() as u64);
        self.note_children(&bytes);
        Ok(bytes)
    }
}

/// Layers read back from the cache, each once its download is complete.
struct CachedLayers {
    cache: BlobCache,
    ready: Arc<Ready>,
}

impl BlobStore for CachedLayers {
    fn open_layer(&self, layer: &LayerDesc) -> Result<Box<dyn Read + Send>> {
        let digest = layer
            .digest
            .as_ref()
            .ok_or_else(|| anyhow!("{}: registry layers are addressed by digest", layer.label()))?;
        self.ready.wait_for(digest, layer)?;
        let path = self.cache.path(digest);
        let f = File::open(&path).with_context(|| {
            format!(
                "{}: cannot open cached blob {}",
                layer.label(),
                path.display()
            )
        })?;
        Ok(Box::new(f))
    }

    fn blob_size(&self, layer: &LayerDesc) -> Result<Option<u64>> {
        let Some(digest) = &layer.digest else {
            return Ok(None);
        };
        let path = self.cache.path(digest);
        let meta = std::fs::metadata(&path).with_context(|| {
            format!(
                "{}: cannot open cached blob {}",
                layer.label(),
                path.display()
            )
        })?;
        Ok(Some(meta.len()))
    }

    fn digest_proven(&self, layer: &LayerDesc) -> bool {
        layer.digest.as_ref().is_some_and(|d| self.ready.proven(d))
    }
}

/// Which layer blobs are complete in the cache; how the downloads ended.
#[derive(Default)]
struct Ready {
    state: Mutex<ReadyState>,
    changed: Condvar,
}

#[derive(Default)]
struct ReadyState {
    done: HashSet<Digest>,
    /// The blobs of `done` this process downloaded and hashed (not found cached).
    proven: HashSet<Digest>,
    /// The downloads stopped: every blob is in, or `failure` says why not.
    over: bool,
    failure: Option<String>,
}

impl Ready {
    fn lock(&self) -> std::sync::MutexGuard<'_, ReadyState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `digest` is in the cache; `proven`: this process hashed it on the way in.
    fn complete(&self, digest: &Digest, proven: bool) {
        let mut s = self.lock();
        s.done.insert(digest.clone());
        if proven {
            s.proven.insert(digest.clone());
        }
        drop(s);
        self.changed.notify_all();
    }

    fn proven(&self, digest: &Digest) -> bool {
        self.lock().proven.contains(digest)
    }

    fn end(&self, failure: Option<String>) {
        let mut s = self.lock();
        s.over = true;
        s.failure = failure;
        drop(s);
        self.changed.notify_all();
    }

    /// Blocks until `digest` is in the cache; an error when its download failed.
    fn wait_for(&self, digest: &Digest, layer: &LayerDesc) -> Result<()> {
        let mut s = self.lock();
        loop {
            if s.done.contains(digest) {
                return Ok(());
            }
            if s.over {
                return Err(match &s.failure {
                    Some(why) => anyhow!("{}: not downloaded: {why}", layer.label()),
                    None => anyhow!("{}: not among the downloaded layers", layer.label()),
                });
            }
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// The layer downloads of one image, running in the background. Dropping it
/// before [`Downloads::finish`] stops them.
pub struct Downloads {
    ready: Arc<Ready>,
    client: Arc<Client>,
    counters: Arc<Counters>,
    progress: Arc<Progress>,
    registry: String,
    worker: Mutex<Option<JoinHandle<Result<()>>>>,
}

impl Downloads {
    /// Shows `bar` with the download bars (pass 1 runs while layers still download).
    pub fn join_display(&self, bar: indicatif::ProgressBar) -> indicatif::ProgressBar {
        self.progress.join(bar)
    }

    /// Waits for every download; what was fetched and reused, or the first failure.
    pub fn finish(&self) -> Result<RegistryStats> {
        let worker = self.worker.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(worker) = worker {
            worker
                .join()
                .unwrap_or_else(|_| Err(anyhow!("the download thread panicked")))?;
            let stats = self.counters.snapshot();
            self.progress.summary(&format!(
                "{}: {} blobs downloaded ({}), {} reused from the cache ({})",
                self.registry,
                stats.blobs_downloaded,
                HumanBytes(stats.bytes_downloaded),
                stats.blobs_reused,
                HumanBytes(stats.bytes_reused)
            ));
        }
        Ok(self.counters.snapshot())
    }
}

impl Drop for Downloads {
    fn drop(&mut self) {
        let worker = self
            .worker
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(worker) = worker {
            self.client.abort();
            let _ = worker.join();
        }
        self.ready.end(Some("the conversion stopped".into()));
    }
}

fn media_type_of(content_type: Option<&str>) -> Option<String> {
    let ct = content_type?.split(';').next()?.trim().to_ascii_lowercase();
    KNOWN_MANIFEST_TYPES.contains(&ct.as_str()).then_some(ct)
}

fn env(k: &str) -> Option<String> {
    std::env::var(k).ok()
}

/// A registry image resolved to its manifest and config (both cached), its layers
/// not fetched yet: what a caller needs to decide whether to convert at all.
pub struct RemoteImage {
    reference: Reference,
    display: String,
    client: Arc<Client>,
    cache: BlobCache,
    progress: Arc<Progress>,
    counters: Arc<Counters>,
    resolved: manifest::Resolved,
    warnings: Vec<String>,
    jobs: usize,
}

impl RemoteImage {
    /// The digest of the image manifest for the requested platform.
    pub fn manifest_digest(&self) -> &Digest {
        &self.resolved.manifest_digest
    }

    /// The platform of the resolved image (from its config).
    pub fn platform(&self) -> &Platform {
        &self.resolved.platform
    }

    /// What resolution fetched and found cached so far.
    pub fn stats(&self) -> RegistryStats {
        self.counters.snapshot()
    }

    /// Starts downloading the layers not yet cached (`jobs` at a time, bottom
    /// first) and hands over the image at once: its blob store opens each layer
    /// as soon as that layer is in the cache. [`Downloads::finish`] waits for
    /// the rest and tells what was fetched.
    pub fn download(self) -> Result<(ResolvedImage, Downloads)> {
        let RemoteImage {
            reference,
            display,
            client,
            cache,
            progress,
            counters,
            resolved,
            warnings,
            jobs,
        } = self;
        let ready = Arc::new(Ready::default());
        let worker = {
            let (client, cache, progress, counters, ready) = (
                client.clone(),
                cache.clone(),
                progress.clone(),
                counters.clone(),
                ready.clone(),
            );
            let layers = resolved.layers.clone();
            let display = display.clone();
            std::thread::Builder::new()
                .name("layer downloads".into())
                .spawn(move || {
                    let result = download_layers(
                        &client,
                        &cache,
                        &layers,
                        jobs,
                        &progress,
                        &counters,
                        &|d, proven| ready.complete(d, proven),
                    )
                    .with_context(|| display.clone());
                    ready.end(result.as_ref().err().map(|e| format!("{e:#}")));
                    result
                })
                .context("cannot start the layer downloads")?
        };
        let downloads = Downloads {
            ready: ready.clone(),
            client,
            counters,
            progress,
            registry: reference.registry.clone(),
            worker: Mutex::new(Some(worker)),
        };
        let image = ResolvedImage {
            reference: display,
            repository: Some(reference.basename().to_string()),
            tag: reference.tag.clone(),
            manifest_digest: Some(resolved.manifest_digest),
            config_digest: Some(resolved.config_digest),
            config_json: resolved.config_json,
            config: resolved.config,
            platform: resolved.platform,
            layers: resolved.layers,
            blobs: Box::new(CachedLayers { cache, ready }),
            warnings,
        };
        Ok((image, downloads))
    }
}

/// Resolves `reference` for `platform` and starts downloading its layers.
pub fn open(
    reference: &Reference,
    display: &str,
    platform: Option<&Platform>,
    opts: &RegistryOptions,
) -> Result<(ResolvedImage, Downloads)> {
    resolve(reference, display, platform, opts)?.download()
}

/// Resolves `reference` for `platform`: the manifest (by tag always from the
/// registry, by digest from the cache when there), the index entry for the
/// platform, the config. No layer is fetched.
pub fn resolve(
    reference: &Reference,
    display: &str,
    platform: Option<&Platform>,
    opts: &RegistryOptions,
) -> Result<RemoteImage> {
    let mut warnings = Vec::new();
    let cache_dir = opts
        .cache_dir
        .clone()
        .or_else(|| cache::default_dir(&env))
        .ok_or_else(|| {
            anyhow!("no cache directory: pass --cache-dir, or set XDG_CACHE_HOME or HOME")
        })?;
    let cache = BlobCache::open(&cache_dir)?;
    let progress = Arc::new(Progress::new(opts.progress));
    let notify_progress = progress.clone();
    let (client, credential_warnings) = Client::connect(
        reference,
        opts,
        Arc::new(move |m: &str| notify_progress.note(m)),
    )?;
    warnings.extend(credential_warnings);
    let counters = Arc::new(Counters::default());

    // The top-level manifest: by digest from the cache when possible; by tag always
    // from the registry (tags move), then kept in the cache under its digest.
    let (top_digest, top_media, top_size, top) = match &reference.digest {
        Some(d) => match cache.read_small(d, MAX_MANIFEST_BYTES)? {
            Some(bytes) => {
                counters.reused(bytes.len() as u64);
                (
                    d.clone(),
                    None,
                    bytes.len() as u64,
                    Some((d.clone(), bytes)),
                )
            }
            None => {
                let f = client.fetch_manifest(&d.to_string())?;
                let actual = Digest::of_bytes(&f.bytes);
                if &actual != d {
                    bail!(
                        "{display}: the registry answered with a manifest hashing to {actual}, \
                         not the pinned {d}"
                    );
                }
                cache.insert_bytes(d, &f.bytes)?;
                counters.downloaded(f.bytes.len() as u64);
                let size = f.bytes.len() as u64;
                (
                    d.clone(),
                    media_type_of(f.content_type.as_deref()),
                    size,
                    Some((d.clone(), f.bytes)),
                )
            }
        },
        None => {
            let f = client.fetch_manifest(&reference.manifest_reference())?;
            let actual = Digest::of_bytes(&f.bytes);
            if let Some(h) = f.digest_header.as_deref() {
                if h.trim() != actual.to_string() {
                    warnings.push(format!(
                        "the registry's Docker-Content-Digest ({}) differs from the manifest's \
                         actual digest {actual}; using the actual digest",
                        h.chars().take(80).collect::<String>()
                    ));
                }
            }
            // Best effort: the cache only speeds up later pinned pulls.
            let _ = cache.insert_bytes(&actual, &f.bytes);
            let size = f.bytes.len() as u64;
            (
                actual.clone(),
                media_type_of(f.content_type.as_deref()),
                size,
                Some((actual, f.bytes)),
            )
        }
    };

    let json = RegistryJson {
        client: &client,
        cache: &cache,
        top,
        manifests: Mutex::new(HashSet::new()),
        counters: &counters,
    };
    let mut resolved = manifest::resolve(
        &json,
        top_media.as_deref(),
        &top_digest,
        Some(top_size),
        platform,
    )
    .with_context(|| display.to_string())?;
    warnings.append(&mut resolved.warnings);

    Ok(RemoteImage {
        reference: reference.clone(),
        display: display.to_string(),
        client: Arc::new(client),
        cache,
        progress,
        counters,
        resolved,
        warnings,
        jobs: opts.jobs,
    })
}

/// Downloads every distinct layer not yet cached, `jobs` at a time, bottom layers
/// first, calling `on_ready` for each blob once it is in the cache (with whether it
/// was downloaded, hence hashed, rather than found there). The first
/// failure stops the other downloads and is the error returned.
fn download_layers(
    client: &Client,
    cache: &BlobCache,
    layers: &[LayerDesc],
    jobs: usize,
    progress: &Progress,
    counters: &Counters,
    on_ready: &(dyn Fn(&Digest, bool) + Sync),
) -> Result<()> {
    let mut seen = HashSet::new();
    let mut work = Vec::new();
    for l in layers {
        let (Some(d), Some(size)) = (&l.digest, l.size) else {
            bail!("{}: a registry layer needs a digest and a size", l.label());
        };
        if seen.insert(d.clone()) {
            work.push((l.index, d.clone(), size));
        }
    }
    let total = layers.len();
    let next = AtomicUsize::new(0);
    let failure: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    let stop = AtomicBool::new(false);
    let workers = jobs.max(1).min(work.len().max(1));
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((index, digest, size)) = work.get(i) else {
                    break;
                };
                if cache.lookup(digest, Some(*size)).is_some() {
                    counters.reused(*size);
                    on_ready(digest, false);
                    continue;
                }
                let short = format!("layer {}/{total} sha256:{}…", index + 1, digest.short());
                let label = format!("layer {}/{total} {digest}", index + 1);
                let bar = progress.start(short, *size);
                let started = Instant::now();
                let result = download::ensure_blob(client, cache, digest, *size, &label, &bar);
                bar.finish(result.is_ok(), started.elapsed().as_secs_f64());
                match result {
                    Ok(o) if o.reused => {
                        counters.reused(*size);
                        on_ready(digest, false);
                    }
                    Ok(o) => {
                        counters.downloaded(o.network_bytes);
                        on_ready(digest, true);
                    }
                    Err(e) => {
                        let mut f = failure.lock().unwrap_or_else(|e| e.into_inner());
                        if f.is_none() {
                            *f = Some(e);
                            stop.store(true, Ordering::Relaxed);
                            client.abort();
                        }
                        break;
                    }
                }
            });
        }
    });
    match failure.into_inner().unwrap_or_else(|e| e.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

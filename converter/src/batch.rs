//! `hakim-convert batch`: every variant of an image family (`NAMESPACE/hakim-<variant>:TAG`)
//! into every wanted artifact, in one output directory with one `sha256sums.txt`.
//!
//! 1. Each variant is resolved cheaply: its manifest and config, no layer
//!    ([`source::registry::resolve`]). An output whose line in the skip record
//!    (`sources.txt`, [`record`]) names the same source manifest digest is skipped
//!    (`force` overrides); an artifact still on disk must also match its recorded sha256.
//! 2. The variants with work are converted [`parallelism`]-at-a-time, each pinned to the
//!    digest resolved in step 1 (a tag moving meanwhile cannot mix two images). All of
//!    them share one blob cache whose per-blob fetch lock makes a layer shared by several
//!    variants — or by several batches running at once — download once.
//! 3. A failing variant never stops the others: every artifact that succeeded is complete,
//!    in `sha256sums.txt` and in the record; the summary lists each variant's status.

pub mod config;
pub mod record;

use std::fs::{self, File};
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::compress::OutputCompression;
use crate::convert::{convert, ConvertOptions};
use crate::inject::InjectOptions;
use crate::output::{self, HashWrite};
use crate::registry::{ProgressMode, RegistryOptions, RegistryStats};
use crate::source::{self, Transport};
use config::{BatchConfig, Format, Output};
use record::{Entry, NamePattern};

/// Receives one line per event (resolved, skipped, converted, failed).
pub type Log = dyn Fn(&str) + Send + Sync;

pub struct BatchOptions {
    pub config: BatchConfig,
    pub output_dir: PathBuf,
    /// Variants converted at once; `None`: one per core (see [`parallelism`]).
    pub parallel: Option<usize>,
    /// Compression threads of each conversion; `None`: cores / parallel conversions.
    pub threads: Option<u32>,
    /// Convert even when the record says the source did not change.
    pub force: bool,
    /// Inject hakim-init (and service files) into every artifact.
    pub inject: Option<InjectOptions>,
    /// OCI archives: keep the source layers instead of one flattened layer.
    pub keep_layers: bool,
    /// Largest sparse file accepted (see [`ConvertOptions::max_sparse_size`]).
    pub max_sparse_size: u64,
    pub source_date_epoch: Option<u64>,
    pub cancel: Arc<AtomicBool>,
    /// Cache, credentials, TLS… shared by every variant. Its progress display is
    /// turned off (parallel conversions); retries are still reported.
    pub registry: RegistryOptions,
    pub log: Arc<Log>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Converted,
    Skipped,
    Failed,
}

#[derive(Debug, serde::Serialize)]
pub struct ArtifactResult {
    pub format: Format,
    pub compression: OutputCompression,
    pub status: Status,
    /// File name in the output directory (known once converted, or from the record).
    pub file: Option<String>,
    pub sha256: Option<String>,
    pub size: Option<u64>,
    /// Why it was skipped or converted again.
    pub note: Option<String>,
    pub error: Option<String>,
    pub seconds: f64,
}

#[derive(Debug, serde::Serialize)]
pub struct VariantResult {
    pub variant: String,
    /// `NAMESPACE/PREFIX<variant>:TAG`
    pub source: String,
    /// The manifest the source resolved to (for the requested platform).
    pub manifest_digest: Option<String>,
    /// Failed if anything failed; converted if anything was converted; else skipped.
    pub status: Status,
    pub artifacts: Vec<ArtifactResult>,
    /// Resolution failed: nothing was attempted.
    pub error: Option<String>,
    /// Resolution plus every conversion of this variant.
    pub registry: RegistryStats,
    pub seconds: f64,
}

#[derive(Debug, serde::Serialize)]
pub struct BatchSummary {
    pub output_dir: PathBuf,
    pub sums_file: PathBuf,
    pub record_file: PathBuf,
    /// Variants converted at once, and compression threads of each.
    pub parallel: usize,
    pub threads: u32,
    pub variants: Vec<VariantResult>,
    /// Numbers of variants.
    pub converted: usize,
    pub skipped: usize,
    pub failed: usize,
    pub bytes_downloaded: u64,
    pub seconds: f64,
}

impl BatchSummary {
    pub fn success(&self) -> bool {
        self.failed == 0
    }
}

/// How many variants to convert at once, and with how many compression threads each.
///
/// A conversion goes through a network-bound download, a single-threaded indexing
/// pass (decompress and hash every layer) and a compression pass that uses its
/// threads fully. One conversion per core, each with `cores / conversions` threads,
/// keeps every core busy in every phase while the compression threads of all running
/// conversions never exceed the cores. With fewer variants to convert than cores, the
/// spare cores go to compression threads. `parallel` lowers peak memory (each
/// conversion holds its image's index).
pub fn parallelism(
    cores: usize,
    work: usize,
    parallel: Option<usize>,
    threads: Option<u32>,
) -> (usize, u32) {
    let cores = cores.max(1);
    let workers = parallel.unwrap_or(cores).clamp(1, work.max(1));
    let threads = threads.unwrap_or_else(|| (cores / workers).max(1) as u32);
    (workers, threads.max(1))
}

/// One variant as planned by the resolution step and completed by its conversions.
struct Variant {
    result: VariantResult,
    /// `REPOSITORY@DIGEST`: what the conversions read.
    pinned: String,
    arch: String,
    /// Outputs to convert.
    pending: Vec<Output>,
    /// The record's digest column for this variant's outputs.
    source_key: String,
    started: Instant,
}

fn add_stats(total: &mut RegistryStats, more: &RegistryStats) {
    total.bytes_downloaded += more.bytes_downloaded;
    total.bytes_reused += more.bytes_reused;
    total.blobs_downloaded += more.blobs_downloaded;
    total.blobs_reused += more.blobs_reused;
}

/// What the record's digest column holds for an output: the source manifest digest,
/// plus, when hakim-init is injected, a fingerprint of what is injected (the binary,
/// the service files, the host-key choice) — a new init rebuilds every artifact.
fn inject_fingerprint(inject: &InjectOptions) -> Result<String> {
    let mut h = HashWrite::new(io::sink());
    let mut add = |label: &str, path: &std::path::Path| -> Result<()> {
        use std::io::Write as _;
        h.write_all(format!("{label}\0").as_bytes())?;
        let mut f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        io::copy(&mut f, &mut h).with_context(|| format!("cannot read {}", path.display()))?;
        Ok(())
    };
    add("init", &inject.init_binary)?;
    if let Some(dir) = &inject.services_dir {
        let mut names: Vec<PathBuf> = fs::read_dir(dir)
            .with_context(|| format!("cannot read {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        names.sort();
        for p in names {
            let label = p.file_name().map(|n| n.to_string_lossy().into_owned());
            add(&label.unwrap_or_default(), &p)?;
        }
    }
    let (hex, _, _) = h.finish();
    let keep = if inject.keep_ssh_host_keys { "k" } else { "" };
    Ok(format!("+inject:{}{keep}", &hex[..16]))
}

fn file_sha256(path: &std::path::Path) -> Result<String> {
    let mut f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut h = HashWrite::new(io::sink());
    io::copy(&mut f, &mut h).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(h.finish().0)
}

fn artifact(out: &Output, status: Status) -> ArtifactResult {
    ArtifactResult {
        format: out.format,
        compression: out.compression,
        status,
        file: None,
        sha256: None,
        size: None,
        note: None,
        error: None,
        seconds: 0.0,
    }
}

impl BatchOptions {
    fn registry_options(&self) -> RegistryOptions {
        RegistryOptions {
            progress: ProgressMode::Quiet,
            cancel: self.cancel.clone(),
            ..self.registry.clone()
        }
    }

    /// Step 1 for one variant: resolve, then skip or queue each output.
    fn plan(&self, variant: &str, recorded: &[Entry], fingerprint: &str) -> Variant {
        let started = Instant::now();
        let repository = self.config.repository(variant);
        let source = format!("{repository}:{}", self.config.tag);
        let mut v = Variant {
            result: VariantResult {
                variant: variant.to_string(),
                source: source.clone(),
                manifest_digest: None,
                status: Status::Skipped,
                artifacts: Vec::new(),
                error: None,
                registry: RegistryStats::default(),
                seconds: 0.0,
            },
            pinned: String::new(),
            arch: String::new(),
            pending: Vec::new(),
            source_key: String::new(),
            started,
        };
        let resolved = (|| -> Result<_> {
            let Transport::Registry(reference) = source.parse::<Transport>()? else {
                bail!("'{source}' is not a registry reference (namespace HOST/OWNER)");
            };
            let remote = source::registry::resolve(
                &reference,
                &source,
                self.config.platform.as_ref(),
                &self.registry_options(),
            )?;
            let p = remote.platform();
            let arch = output::arch_name(&p.architecture, p.variant.as_deref());
            Ok((remote.manifest_digest().to_string(), arch, remote.stats()))
        })();
        let (digest, arch, stats) = match resolved {
            Ok(r) => r,
            Err(e) => {
                v.result.error = Some(format!("{e:#}"));
                v.result.status = Status::Failed;
                return v;
            }
        };
        v.result.registry = stats;
        v.result.manifest_digest = Some(digest.clone());
        v.pinned = format!("{repository}@{digest}");
        v.arch = arch;
        v.source_key = format!("{digest}{fingerprint}");
        for out in &self.config.outputs {
            let pattern = NamePattern::new(variant, &v.arch, &self.config.tag, out);
            let line = recorded
                .iter()
                .find(|e| pattern.matches(&e.artifact) && e.digest == v.source_key);
            match (self.force, line) {
                (false, Some(e)) => match self.check_recorded(e) {
                    Ok(note) => {
                        let mut a = artifact(out, Status::Skipped);
                        a.file = Some(e.artifact.clone());
                        a.sha256 = Some(e.sha256.clone());
                        a.note = Some(note);
                        v.result.artifacts.push(a);
                    }
                    Err(why) => {
                        (self.log)(&format!("{variant}: converting again: {why:#}"));
                        v.pending.push(*out);
                    }
                },
                _ => v.pending.push(*out),
            }
        }
        v
    }

    /// A recorded artifact for an unchanged source: fine if absent (published
    /// elsewhere, e.g. an earlier release) or intact; an error if damaged.
    fn check_recorded(&self, e: &Entry) -> Result<String> {
        output::check_file_name(&e.artifact)?;
        let path = self.output_dir.join(&e.artifact);
        if !path.exists() {
            return Ok(format!(
                "source unchanged ({}); the artifact is not in the output directory",
                e.digest
            ));
        }
        let actual = file_sha256(&path)?;
        if actual != e.sha256 {
            bail!(
                "{} hashes to {actual}, the record says {}",
                e.artifact,
                e.sha256
            );
        }
        output::update_sums(&self.output_dir, &e.artifact, &e.sha256)?;
        Ok(format!("source unchanged ({})", e.digest))
    }

    /// Step 2 for one variant: convert its pending outputs in turn. After a failure
    /// the remaining outputs are not attempted (they would read the same source).
    fn convert_variant(&self, v: &mut Variant, threads: u32) {
        let variant = v.result.variant.clone();
        let mut first_error: Option<String> = None;
        for out in std::mem::take(&mut v.pending) {
            let started = Instant::now();
            let mut a = artifact(&out, Status::Failed);
            if let Some(e) = &first_error {
                a.error = Some(format!("not attempted after an earlier failure: {e}"));
                v.result.artifacts.push(a);
                continue;
            }
            let opts = ConvertOptions {
                platform: self.config.platform.clone(),
                format: out.format,
                compression: out.compression,
                level: self.config.level,
                threads: Some(threads),
                variant: Some(variant.clone()),
                tag: Some(self.config.tag.clone()),
                keep_layers: self.keep_layers && out.format == Format::OciArchive,
                inject: self.inject.clone(),
                source_date_epoch: self.source_date_epoch,
                max_sparse_size: self.max_sparse_size,
                cancel: self.cancel.clone(),
                registry: self.registry_options(),
                ..ConvertOptions::new(v.pinned.clone(), self.output_dir.clone())
            };
            let pattern = NamePattern::new(&variant, &v.arch, &self.config.tag, &out);
            let done = convert(&opts).and_then(|s| {
                let entry = Entry {
                    artifact: s.file_name.clone(),
                    digest: v.source_key.clone(),
                    sha256: s.sha256.clone(),
                };
                record::update(&self.output_dir, &entry, &pattern)?;
                Ok(s)
            });
            a.seconds = started.elapsed().as_secs_f64();
            match done {
                Ok(s) => {
                    if let Some(r) = &s.source.registry {
                        add_stats(&mut v.result.registry, r);
                    }
                    if !pattern.matches(&s.file_name) {
                        a.note = Some("an unexpected name: a re-run cannot skip it".into());
                    }
                    (self.log)(&format!(
                        "{variant}: {} ({:.1} MiB, {:.1} s)",
                        s.file_name,
                        s.size as f64 / 1048576.0,
                        a.seconds
                    ));
                    a.status = Status::Converted;
                    a.file = Some(s.file_name);
                    a.sha256 = Some(s.sha256);
                    a.size = Some(s.size);
                }
                Err(e) => {
                    let msg = format!("{e:#}");
                    (self.log)(&format!("{variant}: {out} failed: {msg}"));
                    a.error = Some(msg.clone());
                    first_error = Some(msg);
                }
            }
            v.result.artifacts.push(a);
        }
    }
}

/// Runs the batch. `Err` only for what stops everything (an output directory that
/// cannot be created, an unreadable record); each variant's failure is in the summary.
pub fn run(opts: &BatchOptions) -> Result<BatchSummary> {
    let started = Instant::now();
    crate::output::prepare_dir(&opts.output_dir)?;
    let recorded = record::load(&opts.output_dir)?;
    let fingerprint = match &opts.inject {
        Some(i) => inject_fingerprint(i)?,
        None => String::new(),
    };

    let mut variants: Vec<Variant> = Vec::new();
    for name in &opts.config.variants {
        let v = opts.plan(name, &recorded, &fingerprint);
        match (&v.result.error, v.pending.len()) {
            (Some(e), _) => (opts.log)(&format!("{name}: cannot resolve {}: {e}", v.result.source)),
            (None, 0) => (opts.log)(&format!(
                "{name}: unchanged ({}), skipped",
                v.result.manifest_digest.as_deref().unwrap_or("?")
            )),
            (None, n) => (opts.log)(&format!(
                "{name}: {} → {n} artifact(s) to convert",
                v.result.manifest_digest.as_deref().unwrap_or("?")
            )),
        }
        variants.push(v);
    }

    let work: Vec<usize> = (0..variants.len())
        .filter(|&i| !variants[i].pending.is_empty())
        .collect();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (parallel, threads) = parallelism(cores, work.len(), opts.parallel, opts.threads);
    let slots: Vec<Mutex<Variant>> = variants.into_iter().map(Mutex::new).collect();
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..parallel.min(work.len()) {
            s.spawn(|| {
                while let Some(&i) = work.get(next.fetch_add(1, Ordering::Relaxed)) {
                    let mut v = slots[i].lock().unwrap_or_else(|e| e.into_inner());
                    opts.convert_variant(&mut v, threads);
                }
            });
        }
    });

    let mut results = Vec::new();
    let (mut converted, mut skipped, mut failed, mut bytes) = (0, 0, 0, 0);
    for slot in slots {
        let v = slot.into_inner().unwrap_or_else(|e| e.into_inner());
        let mut r = v.result;
        let any = |st: Status| r.artifacts.iter().any(|a| a.status == st);
        r.status = if r.error.is_some() || any(Status::Failed) {
            Status::Failed
        } else if any(Status::Converted) {
            Status::Converted
        } else {
            Status::Skipped
        };
        match r.status {
            Status::Converted => converted += 1,
            Status::Skipped => skipped += 1,
            Status::Failed => failed += 1,
        }
        bytes += r.registry.bytes_downloaded;
        r.seconds = v.started.elapsed().as_secs_f64();
        results.push(r);
    }
    Ok(BatchSummary {
        sums_file: opts.output_dir.join(output::SUMS_FILE),
        record_file: opts.output_dir.join(record::RECORD_FILE),
        output_dir: opts.output_dir.clone(),
        parallel,
        threads,
        variants: results,
        converted,
        skipped,
        failed,
        bytes_downloaded: bytes,
        seconds: started.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parallelism_policy() {
        // Two cores, seven variants: two at once, one compression thread each.
        assert_eq!(parallelism(2, 7, None, None), (2, 1));
        // One variant to convert: it gets both cores.
        assert_eq!(parallelism(2, 1, None, None), (1, 2));
        // Never more compression threads than cores by default.
        for cores in 1..=16 {
            for work in 0..=10 {
                let (w, t) = parallelism(cores, work, None, None);
                assert!(w >= 1 && t >= 1);
                assert!(
                    w * t as usize <= cores.max(w),
                    "{cores} cores, {work} variants"
                );
            }
        }
        // Explicit values win; parallel is capped by the work.
        assert_eq!(parallelism(2, 7, Some(3), Some(4)), (3, 4));
        assert_eq!(parallelism(16, 2, Some(8), None), (2, 8));
        assert_eq!(parallelism(16, 0, None, None), (1, 16));
    }
}

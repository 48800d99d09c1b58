//! The `convert` job: source → verified, flattened, compressed rootfs artifact
//! plus its `sha256sums.txt` line, and a summary for humans and CI.

use std::io::{self, BufWriter};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::ProgressBar;

use crate::acceptance::{Check, MemberRules, Status, Stream};
use crate::compress::{Encoder, OutputCompression};
use crate::flatten::{self, EmitOptions, EmitStats, Index, Limits, NameStyle};
use crate::inject::{self, InjectOptions};
use crate::layer::Compression;
use crate::ociout::{self, OciArchive, OciOptions};
use crate::output::{self, HashWrite, PendingFile};
use crate::registry::{PushStats, Reference, RegistryOptions, RegistryStats};
use crate::source::registry::Downloads;
use crate::source::{self, Platform, ResolvedImage};
use crate::tarout::TarWriter;
use crate::tree::Kind;

/// What kind of artifact to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OutputFormat {
    /// A Proxmox rootfs template (vztmpl): `hakim-<variant>-<release>-<arch>.tar.xz`.
    #[default]
    Rootfs,
    /// A Proxmox-importable OCI archive: `hakim-<variant>_<tag>.tar`.
    OciArchive,
}

impl OutputFormat {
    /// The compression used when none is asked for.
    pub fn default_compression(self) -> OutputCompression {
        match self {
            OutputFormat::Rootfs => OutputCompression::Xz,
            OutputFormat::OciArchive => OutputCompression::Gzip,
        }
    }
}

pub struct ConvertOptions {
    pub source: String,
    pub output_dir: PathBuf,
    pub platform: Option<Platform>,
    pub format: OutputFormat,
    /// Artifact compression (rootfs) or layer compression (OCI archive: gzip or zstd).
    pub compression: OutputCompression,
    pub level: Option<u32>,
    /// Compression threads; `None` = all cores. Never changes the output bytes.
    pub threads: Option<u32>,
    /// Whole artifact file name without extension.
    pub name: Option<String>,
    pub variant: Option<String>,
    pub release: Option<String>,
    /// OCI archive: the tag in its name and index (default: the source's, else `latest`).
    pub tag: Option<String>,
    /// OCI archive: copy the source layers instead of one flattened layer.
    pub keep_layers: bool,
    /// Add hakim-init (and service files) and make it the entry point.
    pub inject: Option<InjectOptions>,
    /// OCI archive: also push the image to this registry reference (`HOST/NAME:TAG`),
    /// with the same credentials and TLS options as pulling.
    pub push: Option<String>,
    /// `SOURCE_DATE_EPOCH`.
    pub source_date_epoch: Option<u64>,
    /// Largest size of a sparse file, holes included (`--max-sparse-size`):
    /// a layer claiming more is refused in pass 1.
    pub max_sparse_size: u64,
    /// Set (e.g. by a signal handler) to abort; the partial file is removed.
    pub cancel: Arc<AtomicBool>,
    /// Show a progress bar (only effective on a terminal).
    pub progress: bool,
    /// Registry sources: cache, credentials, TLS, parallelism, download progress.
    /// Its `cancel` flag is replaced by [`ConvertOptions::cancel`].
    pub registry: RegistryOptions,
}

impl ConvertOptions {
    /// Defaults: rootfs, xz at its default level, all cores, names from the image.
    pub fn new(source: impl Into<String>, output_dir: impl Into<PathBuf>) -> Self {
        ConvertOptions {
            source: source.into(),
            output_dir: output_dir.into(),
            platform: None,
            format: OutputFormat::Rootfs,
            compression: OutputCompression::Xz,
            level: None,
            threads: None,
            name: None,
            variant: None,
            release: None,
            tag: None,
            keep_layers: false,
            inject: None,
            push: None,
            source_date_epoch: None,
            max_sparse_size: flatten::DEFAULT_MAX_SPARSE_SIZE,
            cancel: Arc::new(AtomicBool::new(false)),
            progress: false,
            registry: RegistryOptions::default(),
        }
    }
}

#[derive(Debug, serde::Serialize)]
pub struct PushSummary {
    pub reference: String,
    #[serde(flatten)]
    pub stats: PushStats,
}

#[derive(Debug, serde::Serialize)]
pub struct LayerSummary {
    pub digest: Option<String>,
    pub diff_id: String,
    pub compression: Compression,
    pub compressed_bytes: u64,
    pub uncompressed_bytes: u64,
    pub members: u64,
    /// Bytes pass 1 decompressed (the whole layer tar) and its time on the layer.
    pub inflated_pass1_bytes: u64,
    pub pass1_seconds: f64,
    /// Bytes pass 2 decompressed (up to the last member it needed; 0 when it
    /// needed none) and its time on the layer.
    pub inflated_pass2_bytes: u64,
    pub pass2_seconds: f64,
}

/// The two passes over the layers, all layers together (the injected one included).
#[derive(Debug, Default, serde::Serialize)]
pub struct PassTotals {
    pub inflated_pass1_bytes: u64,
    pub inflated_pass2_bytes: u64,
    /// Wall time of pass 1 (layers read in parallel) and of pass 2 (writing
    /// and compressing the artifact included).
    pub pass1_seconds: f64,
    pub pass2_seconds: f64,
}

#[derive(Debug, serde::Serialize)]
pub struct SourceSummary {
    pub reference: String,
    pub repository: Option<String>,
    pub tag: Option<String>,
    pub manifest_digest: Option<String>,
    pub config_digest: Option<String>,
    pub platform: String,
    pub os_id: Option<String>,
    pub layers: Vec<LayerSummary>,
    /// Registry sources only: bytes and blobs downloaded vs found in the cache.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub registry: Option<RegistryStats>,
}

#[derive(Debug, serde::Serialize)]
pub struct Summary {
    pub artifact: PathBuf,
    pub file_name: String,
    pub size: u64,
    pub sha256: String,
    pub sums_file: PathBuf,
    pub format: OutputFormat,
    pub compression: OutputCompression,
    pub level: u32,
    pub source: SourceSummary,
    /// What the flattened output holds (all zero with `--keep-layers`).
    pub entries: EmitStats,
    /// What reading the layers cost, per pass (per layer: `source.layers`).
    pub passes: PassTotals,
    /// Paths hakim-init injection added (`-/path` = removed).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub injected: Vec<String>,
    /// OCI archives: manifest, config and layer descriptors.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oci: Option<OciArchive>,
    /// `--push`: where the image went and what was sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub push: Option<PushSummary>,
    /// Proxmox's acceptance rules this artifact does not meet (what `verify`
    /// reports as WARN or FAIL), each with its fix; also in `warnings`.
    pub proxmox: Vec<Check>,
    pub warnings: Vec<String>,
    pub seconds: f64,
}

fn cancelled(flag: &AtomicBool) -> io::Result<()> {
    if flag.load(Ordering::Relaxed) {
        Err(io::Error::new(io::ErrorKind::Interrupted, "interrupted"))
    } else {
        Ok(())
    }
}

pub fn convert(opts: &ConvertOptions) -> Result<Summary> {
    convert_inner(opts).map_err(|e| {
        if opts.cancel.load(Ordering::Relaxed) {
            anyhow::anyhow!("interrupted; no artifact was written")
        } else {
            e
        }
    })
}

/// The job, step by step; each step is one of the functions below, in order.
fn convert_inner(opts: &ConvertOptions) -> Result<Summary> {
    let started = Instant::now();
    let settings = validate(opts)?;
    let registry = RegistryOptions {
        cancel: opts.cancel.clone(),
        ..opts.registry.clone()
    };
    let (image, downloads) = source::open_with(&opts.source, opts.platform.as_ref(), &registry)?;
    let source_layers = image.layers.len();
    cancelled(&opts.cancel)?;
    let pass1 = index_source(opts, settings.threads, &image, downloads.as_ref())?;
    let mut index = pass1.index;
    cancelled(&opts.cancel)?;
    let (image, injected) = inject_init(opts, image, &mut index)?;
    let mut warnings = std::mem::take(&mut index.warnings);
    let os_release = index
        .captured_file("etc/os-release")
        .or_else(|| index.captured_file("usr/lib/os-release"));
    let naming = name_artifact(opts, &image, os_release.as_deref(), &mut warnings)?;
    output::prepare_dir(&opts.output_dir)?;
    let final_path = opts.output_dir.join(&naming.file_name);
    let pending = PendingFile::create(&opts.output_dir)?;
    // A write error names the artifact, however deep in a layer's copy it happened.
    let (written, pass2_seconds) = write_artifact(
        opts,
        &settings,
        &image,
        &mut index,
        &naming,
        os_release.as_deref(),
        &pending,
    )
    .map_err(|e| output::blame_output(e, &final_path))?;
    cancelled(&opts.cancel)?;
    warnings.extend(written.warnings);
    let proxmox: Vec<Check> = written
        .checks
        .into_iter()
        .filter(|c| c.status != Status::Pass)
        .collect();
    warnings.extend(proxmox.iter().map(Check::announce));
    let sums_file = output::DirLock::acquire(&opts.output_dir)?
        .publish(pending, &naming.file_name, &written.sha256)
        .with_context(|| format!("cannot put {} in place", final_path.display()))?;
    let push = push(
        opts,
        settings.push_target,
        &image,
        written.oci.as_ref(),
        &final_path,
        &registry,
    )?;
    let os_id = os_release
        .as_deref()
        .and_then(|t| output::os_release_field(t, "ID"));
    Ok(Summary {
        artifact: final_path,
        file_name: naming.file_name,
        size: written.size,
        sha256: written.sha256,
        sums_file,
        format: opts.format,
        compression: opts.compression,
        level: settings.level,
        source: source_summary(&image, &index, source_layers, os_id, pass1.registry),
        entries: written.entries,
        passes: PassTotals {
            inflated_pass1_bytes: index.layers.iter().map(|s| s.uncompressed_bytes).sum(),
            inflated_pass2_bytes: index.pass2.iter().map(|c| c.inflated_bytes).sum(),
            pass1_seconds: pass1.seconds,
            pass2_seconds,
        },
        injected,
        oci: written.oci,
        push,
        proxmox,
        warnings,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// What checking the options settles.
struct Settings {
    /// Compression level.
    level: u32,
    /// Compression threads.
    threads: u32,
    /// `--push`, parsed.
    push_target: Option<Reference>,
}

/// Step 1: refuses impossible options before anything is downloaded.
fn validate(opts: &ConvertOptions) -> Result<Settings> {
    if let Some(name) = &opts.name {
        output::check_file_name(name)?;
    }
    if opts.format == OutputFormat::OciArchive
        && !matches!(
            opts.compression,
            OutputCompression::Gzip | OutputCompression::Zstd
        )
    {
        bail!(
            "OCI archive layers are gzip or zstd (Proxmox reads no other); --compression {:?} is not possible",
            opts.compression
        );
    }
    if opts.keep_layers && opts.format != OutputFormat::OciArchive {
        bail!("--keep-layers only applies to --format oci-archive");
    }
    let push_target = match &opts.push {
        None => None,
        Some(_) if opts.format != OutputFormat::OciArchive => {
            bail!("--push needs --format oci-archive (the archive is what gets pushed)")
        }
        Some(r) => {
            let target = Reference::parse(r).with_context(|| format!("--push {r}"))?;
            if target.digest.is_some() {
                bail!("--push {r}: push to a tag, not a digest");
            }
            Some(target)
        }
    };
    let level = opts.level.unwrap_or(opts.compression.default_level());
    check_level(opts.compression, level)?;
    if let Some(inj) = &opts.inject {
        std::fs::metadata(&inj.init_binary)
            .with_context(|| format!("--inject-init {}", inj.init_binary.display()))?;
    }
    let threads = opts
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() as u32));
    Ok(Settings {
        level,
        threads,
        push_target,
    })
}

fn check_level(compression: OutputCompression, level: u32) -> Result<()> {
    if compression == OutputCompression::Xz && level > 9
        || compression == OutputCompression::Zstd && !(1..=22).contains(&level)
        || compression == OutputCompression::Gzip && level > 9
    {
        bail!("level {level} is out of range for {compression:?}");
    }
    Ok(())
}

/// Pass 1 reads at most this many layers at once: beyond it, memory for the
/// members held until merged grows faster than the time saved.
const MAX_PASS1_WORKERS: usize = 4;

/// What pass 1 found and what it cost.
struct Pass1 {
    index: Index,
    seconds: f64,
    /// Registry sources: what was downloaded.
    registry: Option<RegistryStats>,
}

/// Step 2, pass 1: verifies and indexes every source layer behind a spinner.
/// It opens every layer, so every download is over when it returns.
fn index_source(
    opts: &ConvertOptions,
    threads: u32,
    image: &ResolvedImage,
    downloads: Option<&Downloads>,
) -> Result<Pass1> {
    let spinner = match (opts.progress, downloads) {
        // Layers still download during pass 1: one display for both.
        (true, Some(d)) => d.join_display(ProgressBar::new_spinner()),
        (true, None) => ProgressBar::new_spinner(),
        (false, _) => ProgressBar::hidden(),
    };
    let _logs_suspend_spinner = crate::diag::register_bar(&spinner);
    let mut on_layer = |i: usize, n: usize| {
        spinner.set_message(format!("verifying and indexing layer {}/{n}", i + 1));
        spinner.tick();
    };
    let started = Instant::now();
    let index = flatten::index_layers(
        image,
        opts.source_date_epoch.unwrap_or(0),
        Limits {
            max_sparse_size: opts.max_sparse_size,
        },
        (threads as usize).min(MAX_PASS1_WORKERS),
        &mut on_layer,
    )?;
    let seconds = started.elapsed().as_secs_f64();
    let registry = downloads.map(|d| d.finish()).transpose()?;
    spinner.finish_and_clear();
    Ok(Pass1 {
        index,
        seconds,
        registry,
    })
}

/// Step 3, `--inject-init`: builds the hakim-init layer on the merged tree,
/// puts it on top of the image (served from memory) and indexes it like the
/// others — after pass 1, since what it adds depends on the tree. Returns the
/// image with it and the paths it added.
fn inject_init(
    opts: &ConvertOptions,
    image: ResolvedImage,
    index: &mut Index,
) -> Result<(ResolvedImage, Vec<String>)> {
    let Some(inj) = &opts.inject else {
        return Ok((image, Vec::new()));
    };
    let mtime = opts
        .source_date_epoch
        .unwrap_or_else(|| newest_mtime(&index.tree));
    let layer = inject::build_layer(&mut index.tree, &image, inj, mtime)?;
    index.warnings.extend(layer.warnings);
    let (image, top) = image.with_top_layer(layer.layer_tar);
    flatten::index_layer(index, &image, &top).context("injecting hakim-init")?;
    Ok((image, layer.added))
}

/// The newest mtime in the merged tree: injected files are stamped with it when
/// no `SOURCE_DATE_EPOCH` is set (reproducible, and never "now").
fn newest_mtime(tree: &crate::tree::Tree) -> u64 {
    let mut newest = 0;
    tree.visit(|_, _, id| newest = newest.max(tree.inode(id).meta.mtime));
    newest
}

/// What the artifact is called.
struct Naming {
    file_name: String,
    /// OCI archive: the tag in its name and index.
    tag: String,
}

/// Step 4: names the artifact from the options, else from the image and its
/// os-release (a release it cannot find is `unknown`, with a warning).
fn name_artifact(
    opts: &ConvertOptions,
    image: &ResolvedImage,
    os_release: Option<&[u8]>,
    warnings: &mut Vec<String>,
) -> Result<Naming> {
    let base_name = match &opts.variant {
        Some(v) => format!("hakim-{v}"),
        None => image.repository.clone().unwrap_or_else(|| "image".into()),
    };
    let tag = opts
        .tag
        .clone()
        .or_else(|| image.tag.clone())
        .unwrap_or_else(|| "latest".into());
    let file_name = match opts.format {
        OutputFormat::Rootfs => {
            let release = match &opts.release {
                Some(r) => r.clone(),
                None => os_release
                    .and_then(|t| {
                        output::os_release_field(t, "VERSION_CODENAME")
                            .or_else(|| output::os_release_field(t, "VERSION_ID"))
                    })
                    .unwrap_or_else(|| {
                        warnings.push(
                            "no VERSION_CODENAME in os-release; release named 'unknown'".into(),
                        );
                        "unknown".into()
                    }),
            };
            let arch = output::arch_name(
                &image.platform.architecture,
                image.platform.variant.as_deref(),
            );
            let stem = match &opts.name {
                Some(n) => n.clone(),
                None => output::artifact_stem(&base_name, None, &release, &arch),
            };
            format!("{stem}{}", opts.compression.extension())
        }
        OutputFormat::OciArchive => match &opts.name {
            Some(n) => format!("{n}.tar"),
            None => ociout::archive_name(&output::sanitize(&base_name), &tag)?,
        },
    };
    output::check_file_name(&file_name)?;
    Ok(Naming { file_name, tag })
}

/// What pass 2 wrote into the pending file.
struct Written {
    entries: EmitStats,
    oci: Option<OciArchive>,
    sha256: String,
    size: u64,
    /// Proxmox's acceptance rules, evaluated on what was written.
    checks: Vec<Check>,
    warnings: Vec<String>,
}

/// A pass-2 tick: `n` more bytes of file content copied; an error aborts.
type Tick<'a> = &'a mut dyn FnMut(u64) -> io::Result<()>;

/// Step 5, pass 2: writes the artifact into `pending` behind a progress bar;
/// returns it with the pass's wall time.
fn write_artifact(
    opts: &ConvertOptions,
    settings: &Settings,
    image: &ResolvedImage,
    index: &mut Index,
    naming: &Naming,
    os_release: Option<&[u8]>,
    pending: &PendingFile,
) -> Result<(Written, f64)> {
    let bar = write_progress(opts, index, &naming.file_name);
    let _logs_suspend_bar = crate::diag::register_bar(&bar);
    let cancel = opts.cancel.clone();
    let mut tick = |n: u64| {
        bar.inc(n);
        cancelled(&cancel)
    };
    let started = Instant::now();
    let written = match opts.format {
        OutputFormat::Rootfs => {
            write_rootfs(opts, settings, image, index, os_release, pending, &mut tick)
        }
        OutputFormat::OciArchive => write_oci_archive(
            opts,
            settings,
            image,
            index,
            &naming.tag,
            pending,
            &mut tick,
        ),
    }?;
    let seconds = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    Ok((written, seconds))
}

/// Pass 2's bar, over the bytes of file content to copy (sparse files: their
/// data); hidden without `--progress` and with `--keep-layers`.
fn write_progress(opts: &ConvertOptions, index: &Index, file_name: &str) -> ProgressBar {
    if !opts.progress || opts.keep_layers {
        return ProgressBar::hidden();
    }
    let mut total = 0u64;
    let mut seen = std::collections::HashSet::new();
    index.tree.visit(|_, _, id| {
        if let Kind::File { stored, .. } = index.tree.inode(id).kind {
            if seen.insert(id) {
                total += stored;
            }
        }
    });
    let bar = ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_message(format!("writing {file_name}"));
    bar
}

/// Pass 2 for a rootfs template: the flattened tree as one compressed tar.
fn write_rootfs(
    opts: &ConvertOptions,
    settings: &Settings,
    image: &ResolvedImage,
    index: &mut Index,
    os_release: Option<&[u8]>,
    pending: &PendingFile,
    tick: Tick,
) -> Result<Written> {
    let hashed = HashWrite::new(pending.output());
    let encoder = Encoder::new(opts.compression, settings.level, settings.threads, hashed)?;
    let mut tar = TarWriter::new(BufWriter::with_capacity(1 << 20, encoder));
    tar.check_with(MemberRules::new(Stream::Rootfs));
    let (entries, warnings) = flatten::emit(
        image,
        index,
        &EmitOptions {
            clamp_mtime: opts.source_date_epoch,
            names: NameStyle::Rootfs,
        },
        &mut tar,
        tick,
    )?;
    let rules = tar.take_rules().expect("rules were given");
    let checks = rules.finish(os_release);
    let encoder = tar
        .finish()
        .and_then(|w| w.into_inner().map_err(|e| e.into_error()))
        .context("cannot write the artifact")?;
    let hashed = encoder.finish().context("cannot finish compression")?;
    let (sha256, size, _) = hashed.finish();
    Ok(Written {
        entries,
        oci: None,
        sha256,
        size,
        checks,
        warnings,
    })
}

/// Pass 2 for an OCI archive: one flattened layer (or the kept ones), the
/// config and the manifest.
fn write_oci_archive(
    opts: &ConvertOptions,
    settings: &Settings,
    image: &ResolvedImage,
    index: &mut Index,
    tag: &str,
    pending: &PendingFile,
    tick: Tick,
) -> Result<Written> {
    let mut archive = ociout::write(
        pending.output(),
        image,
        index,
        &OciOptions {
            compression: opts.compression,
            level: settings.level,
            threads: settings.threads,
            keep_layers: opts.keep_layers,
            init_injected: opts.inject.is_some(),
            tag: tag.to_string(),
            source_date_epoch: opts.source_date_epoch,
        },
        tick,
    )?;
    let (sha256, size) = output::hash_file(pending.file())?;
    Ok(Written {
        entries: archive.entries.take().unwrap_or_default(),
        sha256,
        size,
        checks: std::mem::take(&mut archive.checks),
        warnings: std::mem::take(&mut archive.warnings),
        oci: Some(archive),
    })
}

/// Step 6, `--push`: uploads the archive just published at `path`. Kept
/// layers already live in the source repository: they are mounted from there
/// when it is on the same registry.
fn push(
    opts: &ConvertOptions,
    target: Option<Reference>,
    image: &ResolvedImage,
    archive: Option<&OciArchive>,
    path: &Path,
    registry: &RegistryOptions,
) -> Result<Option<PushSummary>> {
    let Some(target) = target else {
        return Ok(None);
    };
    let archive = archive.expect("--push is refused without --format oci-archive");
    let reference = target.to_string();
    let mut request = archive.push_request(path, target.clone());
    if opts.keep_layers {
        if let Ok(source) = Reference::parse(&image.reference) {
            if source.registry == target.registry && image.repository.is_some() {
                request.mount_from = Some(source.repository);
            }
        }
    }
    let stats = crate::registry::push(&request, registry).with_context(|| {
        format!(
            "{} was written, but pushing it to {reference} failed",
            path.display()
        )
    })?;
    Ok(Some(PushSummary { reference, stats }))
}

/// Step 7, the summary's source part: the image and, per source layer (the
/// injected one left out), what both passes read.
fn source_summary(
    image: &ResolvedImage,
    index: &Index,
    source_layers: usize,
    os_id: Option<String>,
    registry: Option<RegistryStats>,
) -> SourceSummary {
    let pass2 = |place: usize| index.pass2.get(place).copied().unwrap_or_default();
    let layers = image
        .layers
        .iter()
        .zip(&index.layers)
        .take(source_layers)
        .enumerate()
        .map(|(place, (d, s))| LayerSummary {
            digest: d.digest.as_ref().map(|d| d.to_string()),
            diff_id: d.diff_id.to_string(),
            compression: s.compression,
            compressed_bytes: s.compressed_bytes,
            uncompressed_bytes: s.uncompressed_bytes,
            members: s.members,
            inflated_pass1_bytes: s.uncompressed_bytes,
            pass1_seconds: s.seconds,
            inflated_pass2_bytes: pass2(place).inflated_bytes,
            pass2_seconds: pass2(place).seconds,
        })
        .collect();
    SourceSummary {
        reference: image.reference.clone(),
        repository: image.repository.clone(),
        tag: image.tag.clone(),
        manifest_digest: image.manifest_digest.as_ref().map(|d| d.to_string()),
        config_digest: image.config_digest.as_ref().map(|d| d.to_string()),
        platform: image.platform.to_string(),
        os_id,
        layers,
        registry,
    }
}

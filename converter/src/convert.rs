//! The `convert` job: source → verified, flattened, compressed rootfs artifact
//! plus its `sha256sums.txt` line, and a summary for humans and CI.

use std::io::{self, BufWriter};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::acceptance::{Check, MemberRules, Status, Stream};
use crate::compress::{Encoder, OutputCompression};
use crate::digest::Digest;
use crate::flatten::{self, EmitOptions, EmitStats, Limits, NameStyle};
use crate::inject::{self, InjectOptions};
use crate::layer::{Compression, LayerDesc};
use crate::ociout::{self, OciArchive, OciOptions};
use crate::output::{self, HashWrite, PendingFile};
use crate::registry::{push_layout, PushStats, Reference, RegistryOptions, RegistryStats};
use crate::source::{self, BlobStore, Platform};
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

/// Serves the injected layer from memory and every other layer from the source.
struct WithInjectedLayer {
    source: Box<dyn BlobStore>,
    index: usize,
    tar: std::sync::Arc<[u8]>,
}

impl BlobStore for WithInjectedLayer {
    fn open_layer(&self, layer: &LayerDesc) -> Result<Box<dyn io::Read + Send>> {
        if layer.index == self.index {
            Ok(Box::new(io::Cursor::new(self.tar.clone())))
        } else {
            self.source.open_layer(layer)
        }
    }

    fn blob_size(&self, layer: &LayerDesc) -> Result<Option<u64>> {
        if layer.index == self.index {
            Ok(Some(self.tar.len() as u64))
        } else {
            self.source.blob_size(layer)
        }
    }
}

/// The newest mtime in the merged tree: injected files are stamped with it when
/// no `SOURCE_DATE_EPOCH` is set (reproducible, and never "now").
fn newest_mtime(tree: &crate::tree::Tree) -> u64 {
    let mut newest = 0;
    tree.visit(|_, _, id| newest = newest.max(tree.inode(id).meta.mtime));
    newest
}

/// Pass 1 reads at most this many layers at once: beyond it, memory for the
/// members held until merged grows faster than the time saved.
const MAX_PASS1_WORKERS: usize = 4;

fn check_level(compression: OutputCompression, level: u32) -> Result<()> {
    if compression == OutputCompression::Xz && level > 9
        || compression == OutputCompression::Zstd && !(1..=22).contains(&level)
        || compression == OutputCompression::Gzip && level > 9
    {
        bail!("level {level} is out of range for {compression:?}");
    }
    Ok(())
}

/// Step 1: everything that can be refused before anything is downloaded: the
/// push target (parsed) and the compression level.
fn check_options(opts: &ConvertOptions) -> Result<(Option<Reference>, u32)> {
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
    // A bad push target is an error before anything is downloaded.
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
        // Fail on a missing init before downloading gigabytes.
        std::fs::metadata(&inj.init_binary)
            .with_context(|| format!("--inject-init {}", inj.init_binary.display()))?;
    }
    Ok((push_target, level))
}

/// Step 3 (with `--inject-init`): builds hakim-init's layer on top of the
/// merged tree, serves it next to the source's blobs and indexes it like any
/// other layer. Returns the paths it added.
fn inject_init(
    opts: &ConvertOptions,
    inj: &InjectOptions,
    image: &mut source::ResolvedImage,
    index: &mut flatten::Index,
) -> Result<Vec<String>> {
    let source_layers = image.layers.len();
    let mtime = opts
        .source_date_epoch
        .unwrap_or_else(|| newest_mtime(&index.tree));
    let layer = inject::build_layer(&mut index.tree, image, inj, mtime)?;
    index.warnings.extend(layer.warnings);
    let injected = layer.added;
    let digest = Digest::of_bytes(&layer.layer_tar);
    let desc = LayerDesc {
        index: source_layers,
        digest: Some(digest.clone()),
        size: Some(layer.layer_tar.len() as u64),
        media_type: "application/vnd.oci.image.layer.v1.tar".into(),
        diff_id: digest,
    };
    let source = std::mem::replace(&mut image.blobs, Box::new(source::NoBlobs));
    image.blobs = Box::new(WithInjectedLayer {
        source,
        index: source_layers,
        tar: layer.layer_tar.into(),
    });
    image.layers.push(desc.clone());
    flatten::index_layer(index, image, &desc).context("injecting hakim-init")?;
    Ok(injected)
}

/// Step 4: the artifact's file name: given, or from the variant, the release
/// (os-release) and the architecture; OCI archives by name and tag.
fn artifact_file_name(
    opts: &ConvertOptions,
    image: &source::ResolvedImage,
    os_release: Option<&[u8]>,
    base_name: &str,
    tag: &str,
    warnings: &mut Vec<String>,
) -> Result<String> {
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
                None => output::artifact_stem(base_name, None, &release, &arch),
            };
            format!("{stem}{}", opts.compression.extension())
        }
        OutputFormat::OciArchive => match &opts.name {
            Some(n) => format!("{n}.tar"),
            None => ociout::archive_name(&output::sanitize(base_name), tag)?,
        },
    };
    output::check_file_name(&file_name)?;
    Ok(file_name)
}

/// Step 7 (with `--push`): sends the archive just written to its registry;
/// kept layers already in the source repository are mounted, not uploaded.
fn push_archive(
    opts: &ConvertOptions,
    image: &source::ResolvedImage,
    final_path: &std::path::Path,
    target: Reference,
    registry: &RegistryOptions,
) -> Result<PushSummary> {
    let reference = target.to_string();
    let mut request = push_layout::from_oci_archive(final_path, target.clone())?;
    // Kept layers already live in the source repository: mount them there.
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
            final_path.display()
        )
    })?;
    Ok(PushSummary { reference, stats })
}

/// The conversion, step by step: check the options (before any download), open
/// the source and index its layers (pass 1, overlapping registry downloads),
/// inject hakim-init, name the artifact, write it (pass 2) into a pending file,
/// publish it with its sums line, push it, and summarise.
fn convert_inner(opts: &ConvertOptions) -> Result<Summary> {
    let started = Instant::now();
    let (push_target, level) = check_options(opts)?;
    let registry = RegistryOptions {
        cancel: opts.cancel.clone(),
        ..opts.registry.clone()
    };
    let (mut image, downloads) =
        source::open_with(&opts.source, opts.platform.as_ref(), &registry)?;
    let source_layers = image.layers.len();
    cancelled(&opts.cancel)?;
    let spinner = match (opts.progress, &downloads) {
        // Layers still download during pass 1: one display for both.
        (true, Some(d)) => d.join_display(indicatif::ProgressBar::new_spinner()),
        (true, None) => indicatif::ProgressBar::new_spinner(),
        (false, _) => indicatif::ProgressBar::hidden(),
    };
    let _logs_suspend_spinner = crate::diag::register_bar(&spinner);
    let mut on_layer = |i: usize, n: usize| {
        spinner.set_message(format!("verifying and indexing layer {}/{n}", i + 1));
        spinner.tick();
    };
    let limits = Limits {
        max_sparse_size: opts.max_sparse_size,
    };
    let threads = opts
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() as u32));
    let pass1_started = Instant::now();
    let mut index = flatten::index_layers(
        &image,
        opts.source_date_epoch.unwrap_or(0),
        limits,
        (threads as usize).min(MAX_PASS1_WORKERS),
        &mut on_layer,
    )?;
    let pass1_seconds = pass1_started.elapsed().as_secs_f64();
    // Pass 1 opened every layer, so every download is over.
    let registry_stats = downloads.as_ref().map(|d| d.finish()).transpose()?;
    spinner.finish_and_clear();
    cancelled(&opts.cancel)?;

    let injected = match &opts.inject {
        Some(inj) => inject_init(opts, inj, &mut image, &mut index)?,
        None => Vec::new(),
    };
    let mut warnings = std::mem::take(&mut index.warnings);

    let os_release = index
        .captured_file("etc/os-release")
        .or_else(|| index.captured_file("usr/lib/os-release"));
    let os_id = os_release
        .as_deref()
        .and_then(|t| output::os_release_field(t, "ID"));
    let base_name = match &opts.variant {
        Some(v) => format!("hakim-{v}"),
        None => image.repository.clone().unwrap_or_else(|| "image".into()),
    };
    let tag = opts
        .tag
        .clone()
        .or_else(|| image.tag.clone())
        .unwrap_or_else(|| "latest".into());
    let file_name = artifact_file_name(
        opts,
        &image,
        os_release.as_deref(),
        &base_name,
        &tag,
        &mut warnings,
    )?;

    output::prepare_dir(&opts.output_dir)?;
    let final_path = opts.output_dir.join(&file_name);

    // Progress over the bytes of file content to copy (sparse files: their data).
    let mut total = 0u64;
    let mut seen = std::collections::HashSet::new();
    index.tree.visit(|_, _, id| {
        if let Kind::File { stored, .. } = index.tree.inode(id).kind {
            if seen.insert(id) {
                total += stored;
            }
        }
    });
    drop(seen);
    let bar = if opts.progress && !opts.keep_layers {
        let bar = indicatif::ProgressBar::new(total);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_message(format!("writing {file_name}"));
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let _logs_suspend_bar = crate::diag::register_bar(&bar);

    let pending = PendingFile::create(&opts.output_dir)?;
    let cancel = opts.cancel.clone();
    let mut tick = |n: u64| {
        bar.inc(n);
        cancelled(&cancel)
    };
    // Proxmox's acceptance rules, evaluated on what is written.
    let mut checks: Vec<Check> = Vec::new();
    // Where a write fails (a full disk), the error names the output, however
    // deep in a layer's copy it happened.
    let pass2_started = Instant::now();
    let written = (|| -> Result<_> {
        Ok(match opts.format {
            OutputFormat::Rootfs => {
                let hashed = HashWrite::new(pending.output());
                let encoder = Encoder::new(opts.compression, level, threads, hashed)?;
                let mut tar = TarWriter::new(BufWriter::with_capacity(1 << 20, encoder));
                tar.check_with(MemberRules::new(Stream::Rootfs));
                let (stats, emit_warnings) = flatten::emit(
                    &image,
                    &mut index,
                    &EmitOptions {
                        clamp_mtime: opts.source_date_epoch,
                        names: NameStyle::Rootfs,
                    },
                    &mut tar,
                    &mut tick,
                )?;
                warnings.extend(emit_warnings);
                let rules = tar.take_rules().expect("rules were given");
                checks = rules.finish(os_release.as_deref());
                let encoder = tar
                    .finish()
                    .and_then(|w| w.into_inner().map_err(|e| e.into_error()))
                    .context("cannot write the artifact")?;
                let hashed = encoder.finish().context("cannot finish compression")?;
                let (sha256, size, _) = hashed.finish();
                (stats, None, sha256, size)
            }
            OutputFormat::OciArchive => {
                let mut archive = ociout::write(
                    pending.output(),
                    &image,
                    &mut index,
                    &OciOptions {
                        compression: opts.compression,
                        level,
                        threads,
                        keep_layers: opts.keep_layers,
                        init_injected: opts.inject.is_some(),
                        tag: tag.clone(),
                        source_date_epoch: opts.source_date_epoch,
                    },
                    &mut tick,
                )?;
                warnings.append(&mut archive.warnings);
                checks = std::mem::take(&mut archive.checks);
                let (sha256, size) = output::hash_file(pending.file())?;
                (
                    archive.entries.take().unwrap_or_default(),
                    Some(archive),
                    sha256,
                    size,
                )
            }
        })
    })();
    let (entries, oci, sha256, size) = written.map_err(|e| output::blame_output(e, &final_path))?;
    let pass2_seconds = pass2_started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    cancelled(&opts.cancel)?;
    let proxmox: Vec<Check> = checks
        .into_iter()
        .filter(|c| c.status != Status::Pass)
        .collect();
    warnings.extend(proxmox.iter().map(Check::announce));
    let sums_file = output::DirLock::acquire(&opts.output_dir)?
        .publish(pending, &file_name, &sha256)
        .with_context(|| format!("cannot put {} in place", final_path.display()))?;
    let push = match push_target {
        None => None,
        Some(target) => Some(push_archive(opts, &image, &final_path, target, &registry)?),
    };

    let pass2 = |place: usize| index.pass2.get(place).copied().unwrap_or_default();
    let passes = PassTotals {
        inflated_pass1_bytes: index.layers.iter().map(|s| s.uncompressed_bytes).sum(),
        inflated_pass2_bytes: index.pass2.iter().map(|c| c.inflated_bytes).sum(),
        pass1_seconds,
        pass2_seconds,
    };
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
    Ok(Summary {
        artifact: final_path,
        file_name,
        size,
        sha256,
        sums_file,
        format: opts.format,
        compression: opts.compression,
        level,
        source: SourceSummary {
            reference: image.reference.clone(),
            repository: image.repository.clone(),
            tag: image.tag.clone(),
            manifest_digest: image.manifest_digest.as_ref().map(|d| d.to_string()),
            config_digest: image.config_digest.as_ref().map(|d| d.to_string()),
            platform: image.platform.to_string(),
            os_id,
            layers,
            registry: registry_stats,
        },
        entries,
        passes,
        injected,
        oci,
        push,
        proxmox,
        warnings,
        seconds: started.elapsed().as_secs_f64(),
    })
}

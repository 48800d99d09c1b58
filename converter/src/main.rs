//! `hakim-convert` command line: a thin layer over the library.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use hakim_convert::batch::config::{BatchConfig, ConfigFile, Format, Overrides};
use hakim_convert::batch::{self, BatchOptions, BatchSummary, Status};
use hakim_convert::compress::OutputCompression;
use hakim_convert::convert::{convert, ConvertOptions, OutputFormat, Summary};
use hakim_convert::flatten::parse_size;
use hakim_convert::inject::InjectOptions;
use hakim_convert::registry::{Credentials, ProgressMode, RegistryOptions, RetryPolicy};
use hakim_convert::source::Platform;

/// `hakim-convert SOURCE --out DIR …` is `hakim-convert convert SOURCE -o DIR …`.
#[derive(Parser)]
#[command(
    name = "hakim-convert",
    version,
    about = "Turn OCI/Docker images into Proxmox VE rootfs templates",
    args_conflicts_with_subcommands = true,
    arg_required_else_help = true,
    subcommand_negates_reqs = true,
    override_usage = "hakim-convert SOURCE [OPTIONS]      (convert into the current directory, or -o DIR)\n       \
                      hakim-convert <COMMAND> [ARGS]",
    after_help = "Examples:\n  \
                  hakim-convert ghcr.io/shekohex/hakim-elixir          \
                  # ./hakim-elixir-<release>-amd64.tar.xz + ./sha256sums.txt\n  \
                  hakim-convert ghcr.io/shekohex/hakim-base -o out/ --compression zstd\n  \
                  hakim-convert verify hakim-elixir-trixie-amd64.tar.xz\n  \
                  hakim-convert batch --config ci/batch.toml -o out/"
)]
struct Cli {
    /// Log each registry request, auth step and retry, and per-layer timings, to stderr
    /// (-vv: more detail). RUST_LOG (e.g. hakim_convert=debug), when set, replaces it.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    convert: Option<ConvertArgs>,
}

#[derive(Subcommand)]
enum Command {
    /// Flatten an image into a Proxmox rootfs template (vztmpl) plus sha256sums.txt.
    Convert(Box<ConvertArgs>),
    /// Check a rootfs template or OCI archive against every rule Proxmox applies
    /// (and its sha256sums.txt line). Exits 1 when a rule fails.
    Verify {
        /// The artifact (.tar.xz/.tar.zst/.tar.gz/.tar rootfs or .tar OCI archive).
        artifact: PathBuf,
        /// Print the report as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Convert every variant of an image family (NAMESPACE/hakim-<variant>:TAG), sharing one
    /// blob cache, skipping variants whose source did not change since the last run.
    Batch(Box<BatchArgs>),
    /// Build a small sample image (OCI layout) and convert it: the quickest way to see the tool work.
    Demo {
        /// Where the sample layout and the artifact go.
        #[arg(short, long, default_value = "out")]
        output_dir: PathBuf,
        /// Print the summary as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct ConvertArgs {
    /// oci:DIR[:TAG], oci-archive:FILE[:TAG], docker-archive:FILE[:NAME:TAG|@N],
    /// docker://[HOST/]NAME[:TAG|@DIGEST] or HOST/NAME[:TAG|@DIGEST] (e.g. ghcr.io/owner/name)
    source: String,
    /// Output directory (created if missing) [default: the current directory].
    #[arg(
        short,
        long,
        visible_alias = "out",
        value_name = "DIR",
        default_value = ".",
        hide_default_value = true
    )]
    output_dir: PathBuf,
    /// Platform to pick from a multi-platform index.
    #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
    platform: Option<Platform>,
    /// rootfs: a Proxmox rootfs template; oci-archive: a Proxmox-importable OCI archive.
    #[arg(long, value_enum, default_value_t = OutputFormat::Rootfs)]
    format: OutputFormat,
    /// Artifact compression (rootfs, default xz) or layer compression (oci-archive: gzip (default) or zstd).
    #[arg(long, value_enum)]
    compression: Option<OutputCompression>,
    /// Compression level (xz 0-9, default 6; zstd 1-22, default 3; gzip 0-9, default 6).
    #[arg(long)]
    level: Option<u32>,
    /// Compression threads (default: all cores). Never changes the output bytes.
    #[arg(long)]
    threads: Option<u32>,
    /// Artifact file name without extension (default hakim-<variant>-<release>-<arch>).
    #[arg(long)]
    name: Option<String>,
    /// Variant for the default name (default: from the image name hakim-<variant>).
    #[arg(long)]
    variant: Option<String>,
    /// Release for the default name (default: VERSION_CODENAME from /etc/os-release).
    #[arg(long)]
    release: Option<String>,
    /// oci-archive: the tag in the file name and index (default: the source's tag, else latest).
    #[arg(long)]
    tag: Option<String>,
    /// oci-archive: copy the source layers (re-encoding those Proxmox cannot read) instead of one flattened layer.
    #[arg(long)]
    keep_layers: bool,
    /// oci-archive: also push the image to HOST/NAME:TAG (same credentials and TLS options as pulling),
    /// ready for Proxmox's oci-registry-pull.
    #[arg(long, value_name = "REF")]
    push: Option<String>,
    /// Add this static hakim-init binary as /usr/local/sbin/hakim-init and make it the entry point
    /// (/sbin/init for rootfs templates, Entrypoint for OCI archives).
    #[arg(long, value_name = "PATH", help_heading = INJ)]
    inject_init: Option<PathBuf>,
    /// Service files (*.toml) to install under /etc/hakim/services/.
    #[arg(long, value_name = "DIR", requires = "inject_init", help_heading = INJ)]
    services: Option<PathBuf>,
    /// Keep /etc/ssh/ssh_host_* (by default they are removed: every workspace would share them).
    #[arg(long, requires = "inject_init", help_heading = INJ)]
    keep_ssh_host_keys: bool,
    /// Largest sparse file accepted, holes included (sparse files stay sparse: a larger
    /// claim is refused, not expanded). Units K, M, G, T (powers of 1024).
    #[arg(long, value_name = "SIZE", default_value = "64G", value_parser = parse_size)]
    max_sparse_size: u64,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// No progress bar (and no download progress lines).
    #[arg(long, short)]
    quiet: bool,
    // Registry options live here rather than in a flattened struct: clap cannot
    // tell whether an `Option<Args>` with a nested flatten was given, and the
    // top-level `hakim-convert SOURCE --out DIR` form relies on that.
    /// Blob cache shared by all runs [default: $XDG_CACHE_HOME/hakim-convert or ~/.cache/hakim-convert].
    #[arg(long, value_name = "DIR", help_heading = REG)]
    cache_dir: Option<PathBuf>,
    /// Registry credentials (prefer --creds-file: arguments are visible to other users).
    #[arg(long, value_name = "USER:PASSWORD", help_heading = REG)]
    creds: Option<String>,
    /// File holding USER:PASSWORD (or USER:TOKEN).
    #[arg(long, value_name = "FILE", conflicts_with = "creds", help_heading = REG)]
    creds_file: Option<PathBuf>,
    /// Extra trusted CA certificates (PEM), on top of the system bundle. Repeatable.
    #[arg(long, value_name = "FILE", help_heading = REG)]
    ca_cert: Vec<PathBuf>,
    /// Allow plain HTTP to any registry and accept any TLS certificate.
    #[arg(long, help_heading = REG)]
    insecure: bool,
    /// Parallel layer downloads.
    #[arg(long, value_name = "N", help_heading = REG, default_value_t = hakim_convert::registry::DEFAULT_JOBS as u16,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    jobs: u16,
    /// Attempts per request or blob before giving up (retries back off exponentially).
    #[arg(long, value_name = "N", help_heading = REG, default_value_t = RetryPolicy::default().max_attempts,
          value_parser = clap::value_parser!(u32).range(1..=100))]
    max_attempts: u32,
    /// Seconds a read may stall before the download is retried (resuming).
    #[arg(long, value_name = "SECS", help_heading = REG, default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    read_timeout: u64,
}

const REG: &str = "Registry sources";
const INJ: &str = "hakim-init injection";

impl ConvertArgs {
    fn inject_options(&self) -> Option<InjectOptions> {
        self.inject_init.as_ref().map(|init| InjectOptions {
            init_binary: init.clone(),
            services_dir: self.services.clone(),
            keep_ssh_host_keys: self.keep_ssh_host_keys,
        })
    }

    fn registry_options(&self, progress: ProgressMode) -> Result<RegistryOptions> {
        RegistryArgs {
            cache_dir: self.cache_dir.clone(),
            creds: self.creds.clone(),
            creds_file: self.creds_file.clone(),
            ca_cert: self.ca_cert.clone(),
            insecure: self.insecure,
            jobs: self.jobs,
            max_attempts: self.max_attempts,
            read_timeout: self.read_timeout,
        }
        .options(progress)
    }
}

#[derive(Args)]
struct BatchArgs {
    /// Batch config (TOML: namespace, prefix, variants, tag, platform, formats, compression,
    /// level); flags given here replace its values.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Output directory: artifacts, sha256sums.txt and the skip record sources.txt
    /// [default: the current directory].
    #[arg(
        short,
        long,
        visible_alias = "out",
        value_name = "DIR",
        default_value = ".",
        hide_default_value = true
    )]
    output_dir: PathBuf,
    /// Registry and owner of the images, e.g. ghcr.io/shekohex.
    #[arg(long)]
    namespace: Option<String>,
    /// Repository name before the variant [default: hakim-].
    #[arg(long)]
    prefix: Option<String>,
    /// A variant to convert (repeatable; replaces the config's list).
    #[arg(long = "variant", value_name = "VARIANT")]
    variants: Vec<String>,
    /// Image tag [default: latest].
    #[arg(long)]
    tag: Option<String>,
    /// Artifact format (repeatable) [default: rootfs].
    #[arg(long = "format", value_enum, value_name = "FORMAT")]
    formats: Vec<Format>,
    /// Rootfs compression (repeatable: one artifact each) [default: xz]. OCI archives use gzip layers.
    #[arg(long = "compression", value_enum, value_name = "C")]
    compression: Vec<OutputCompression>,
    /// Compression level (see `convert --help`).
    #[arg(long)]
    level: Option<u32>,
    /// Platform to pick from multi-platform indexes.
    #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
    platform: Option<Platform>,
    /// Variants converted at once [default: one per core].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=64))]
    parallel: Option<u16>,
    /// Compression threads per conversion [default: cores / parallel conversions].
    #[arg(long, value_name = "N")]
    threads: Option<u32>,
    /// Convert even variants whose source manifest did not change.
    #[arg(long)]
    force: bool,
    /// oci-archive: copy the source layers instead of one flattened layer.
    #[arg(long)]
    keep_layers: bool,
    /// Add this static hakim-init to every artifact and make it the entry point.
    #[arg(long, value_name = "PATH", help_heading = INJ)]
    inject_init: Option<PathBuf>,
    /// Service files (*.toml) to install under /etc/hakim/services/.
    #[arg(long, value_name = "DIR", requires = "inject_init", help_heading = INJ)]
    services: Option<PathBuf>,
    /// Keep /etc/ssh/ssh_host_* (removed by default).
    #[arg(long, requires = "inject_init", help_heading = INJ)]
    keep_ssh_host_keys: bool,
    /// Largest sparse file accepted, holes included (see `convert --help`).
    #[arg(long, value_name = "SIZE", default_value = "64G", value_parser = parse_size)]
    max_sparse_size: u64,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// No per-variant progress lines on stderr.
    #[arg(long, short)]
    quiet: bool,
    #[command(flatten)]
    registry: RegistryArgs,
}

/// The registry options of `batch` (`convert` keeps them inline, see [`ConvertArgs`]).
#[derive(Args, Clone)]
struct RegistryArgs {
    /// Blob cache shared by all runs and variants [default: $XDG_CACHE_HOME/hakim-convert or ~/.cache/hakim-convert].
    #[arg(long, value_name = "DIR", help_heading = REG)]
    cache_dir: Option<PathBuf>,
    /// Registry credentials (prefer --creds-file: arguments are visible to other users).
    #[arg(long, value_name = "USER:PASSWORD", help_heading = REG)]
    creds: Option<String>,
    /// File holding USER:PASSWORD (or USER:TOKEN).
    #[arg(long, value_name = "FILE", conflicts_with = "creds", help_heading = REG)]
    creds_file: Option<PathBuf>,
    /// Extra trusted CA certificates (PEM), on top of the system bundle. Repeatable.
    #[arg(long, value_name = "FILE", help_heading = REG)]
    ca_cert: Vec<PathBuf>,
    /// Allow plain HTTP to any registry and accept any TLS certificate.
    #[arg(long, help_heading = REG)]
    insecure: bool,
    /// Parallel layer downloads per image.
    #[arg(long, value_name = "N", help_heading = REG, default_value_t = hakim_convert::registry::DEFAULT_JOBS as u16,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    jobs: u16,
    /// Attempts per request or blob before giving up (retries back off exponentially).
    #[arg(long, value_name = "N", help_heading = REG, default_value_t = RetryPolicy::default().max_attempts,
          value_parser = clap::value_parser!(u32).range(1..=100))]
    max_attempts: u32,
    /// Seconds a read may stall before the download is retried (resuming).
    #[arg(long, value_name = "SECS", help_heading = REG, default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    read_timeout: u64,
}

impl RegistryArgs {
    fn options(&self, progress: ProgressMode) -> Result<RegistryOptions> {
        let credentials = match &self.creds {
            Some(c) => Some(Credentials::parse_pair(c).context("--creds")?),
            None => None,
        };
        Ok(RegistryOptions {
            cache_dir: self.cache_dir.clone(),
            credentials,
            credentials_file: self.creds_file.clone(),
            ca_certs: self.ca_cert.clone(),
            insecure: self.insecure,
            jobs: usize::from(self.jobs),
            retry: RetryPolicy {
                max_attempts: self.max_attempts,
                ..RetryPolicy::default()
            },
            read_timeout: std::time::Duration::from_secs(self.read_timeout),
            progress,
            ..RegistryOptions::default()
        })
    }
}

impl BatchArgs {
    fn options(self, cancel: Arc<AtomicBool>) -> Result<BatchOptions> {
        let file = self.config.as_deref().map(ConfigFile::load).transpose()?;
        let config = BatchConfig::new(
            file,
            Overrides {
                namespace: self.namespace,
                prefix: self.prefix,
                variants: self.variants,
                tag: self.tag,
                platform: self.platform,
                formats: self.formats,
                compression: self.compression,
                level: self.level,
            },
        )?;
        let quiet = self.quiet;
        Ok(BatchOptions {
            config,
            output_dir: self.output_dir,
            parallel: self.parallel.map(usize::from),
            threads: self.threads,
            force: self.force,
            inject: self.inject_init.map(|init| InjectOptions {
                init_binary: init,
                services_dir: self.services,
                keep_ssh_host_keys: self.keep_ssh_host_keys,
            }),
            keep_layers: self.keep_layers,
            max_sparse_size: self.max_sparse_size,
            source_date_epoch: source_date_epoch()?,
            cancel,
            registry: self.registry.options(ProgressMode::Quiet)?,
            log: Arc::new(move |line: &str| {
                if !quiet {
                    eprintln!("batch: {line}");
                }
            }),
        })
    }
}

fn source_date_epoch() -> Result<Option<u64>> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) if !v.is_empty() => {
            Ok(Some(v.trim().parse().with_context(|| {
                format!("SOURCE_DATE_EPOCH '{v}' is not a number of seconds")
            })?))
        }
        _ => Ok(None),
    }
}

/// Ctrl-C, SIGTERM or SIGHUP: the first asks the conversion to stop (it
/// removes its temporary file and reports "interrupted"); a second one removes
/// the temporary files at once and exits 130 without waiting.
fn cancel_flag() -> Result<Arc<AtomicBool>> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let flag = Arc::new(AtomicBool::new(false));
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])?;
    let seen = flag.clone();
    std::thread::spawn(move || {
        for _ in signals.forever() {
            if seen.swap(true, std::sync::atomic::Ordering::SeqCst) {
                hakim_convert::output::remove_pending_files();
                eprintln!(
                    "error: interrupted again; temporary files removed, no artifact was written"
                );
                std::process::exit(130);
            }
        }
    });
    Ok(flag)
}

/// Prints the summary. A closed stdout (`| head`) is not an error worth a panic.
fn report(summary: &Summary, json: bool) -> Result<()> {
    match write_report(summary, json) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

fn write_report(summary: &Summary, json: bool) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    for w in &summary.warnings {
        eprintln!("warning: {w}");
    }
    if json {
        writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(summary).map_err(std::io::Error::other)?
        )?;
        return Ok(());
    }
    writeln!(out, "{}", summary.artifact.display())?;
    writeln!(out, "  sha256      {}", summary.sha256)?;
    let e = &summary.entries;
    let tar_mib = if e.entries > 0 {
        format!(" from {:.1} MiB of tar", e.tar_bytes as f64 / 1048576.0)
    } else {
        String::new()
    };
    let what = match summary.format {
        OutputFormat::Rootfs => "",
        OutputFormat::OciArchive => "layers ",
    };
    writeln!(
        out,
        "  size        {:.1} MiB ({what}{:?} level {}){tar_mib}",
        summary.size as f64 / 1048576.0,
        summary.compression,
        summary.level,
    )?;
    if let Some(oci) = &summary.oci {
        writeln!(
            out,
            "  image       {} ({} layer{})",
            oci.manifest.digest,
            oci.layers.len(),
            if oci.layers.len() == 1 { "" } else { "s" }
        )?;
    }
    writeln!(
        out,
        "  source      {} ({}, {} layers{})",
        summary.source.reference,
        summary.source.platform,
        summary.source.layers.len(),
        summary
            .source
            .manifest_digest
            .as_deref()
            .map(|d| format!(", {d}"))
            .unwrap_or_default()
    )?;
    if e.entries > 0 {
        writeln!(
            out,
            "  entries     {} ({} dirs, {} files, {} symlinks, {} hardlinks, {} fifos)",
            e.entries, e.directories, e.files, e.symlinks, e.hardlinks, e.fifos
        )?;
        if e.devices_dropped + e.xattrs_dropped > 0 {
            writeln!(
                out,
                "  dropped     {} device nodes, {} xattrs",
                e.devices_dropped, e.xattrs_dropped
            )?;
        }
    }
    if let Some(p) = &summary.push {
        writeln!(
            out,
            "  pushed      {} ({}; {} bytes in {} blobs, {} already there, {} mounted)",
            p.reference,
            p.stats.manifest_digest,
            p.stats.bytes_uploaded,
            p.stats.blobs_uploaded,
            p.stats.blobs_existing,
            p.stats.blobs_mounted
        )?;
    }
    if !summary.injected.is_empty() {
        writeln!(out, "  injected    {}", summary.injected.join(" "))?;
    }
    writeln!(out, "  checksums   {}", summary.sums_file.display())?;
    writeln!(out, "  took        {:.1} s", summary.seconds)?;
    Ok(())
}

fn print_verify(report: &hakim_convert::verify::Report, json: bool) -> Result<()> {
    use hakim_convert::verify::Status;
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let result = if json {
        writeln!(out, "{}", serde_json::to_string_pretty(report)?)
    } else {
        writeln!(out, "{} ({})", report.artifact, report.kind).and_then(|()| {
            for c in &report.checks {
                let mark = match c.status {
                    Status::Pass => "pass",
                    Status::Warn => "WARN",
                    Status::Fail => "FAIL",
                };
                if c.detail.is_empty() {
                    writeln!(out, "  {mark}  {}", c.rule)?;
                } else {
                    writeln!(out, "  {mark}  {}: {}", c.rule, c.detail)?;
                }
                if let Some(fix) = c.fix {
                    writeln!(out, "        fix: {fix}")?;
                }
            }
            Ok(())
        })
    };
    match result {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

fn write_batch_report(summary: &BatchSummary, json: bool) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if json {
        let text = serde_json::to_string_pretty(summary).map_err(std::io::Error::other)?;
        return writeln!(out, "{text}");
    }
    for v in &summary.variants {
        let status = match v.status {
            Status::Converted => "converted",
            Status::Skipped => "skipped",
            Status::Failed => "FAILED",
        };
        writeln!(out, "{:<12} {status:<9} {}", v.variant, v.source)?;
        if let Some(e) = &v.error {
            writeln!(out, "    error: {e}")?;
        }
        for a in &v.artifacts {
            let what = a
                .file
                .clone()
                .unwrap_or_else(|| format!("({})", a.compression.extension()));
            let detail = match (&a.error, &a.sha256, &a.note) {
                (Some(e), _, _) => format!("error: {e}"),
                (None, Some(sha), Some(note)) => format!("{sha}  {note}"),
                (None, Some(sha), None) => sha.clone(),
                (None, None, _) => String::new(),
            };
            writeln!(out, "    {what}  {detail}")?;
        }
    }
    writeln!(
        out,
        "{} variants: {} converted, {} skipped, {} failed; {:.1} MiB downloaded; \
         {} at once × {} threads; {:.1} s",
        summary.variants.len(),
        summary.converted,
        summary.skipped,
        summary.failed,
        summary.bytes_downloaded as f64 / 1048576.0,
        summary.parallel,
        summary.threads,
        summary.seconds
    )?;
    writeln!(
        out,
        "checksums {}, record {}",
        summary.sums_file.display(),
        summary.record_file.display()
    )
}

fn run(cli: Cli) -> Result<()> {
    let cancel = cancel_flag()?;
    let progress = std::io::stderr().is_terminal();
    let command = match (cli.command, cli.convert) {
        (Some(c), _) => c,
        (None, Some(a)) => Command::Convert(Box::new(a)),
        (None, None) => {
            use clap::CommandFactory;
            Cli::command().print_help()?;
            std::process::exit(2);
        }
    };
    match command {
        Command::Convert(a) => {
            let mode = match (a.quiet, progress) {
                (true, _) => ProgressMode::Quiet,
                (false, true) => ProgressMode::Bars,
                (false, false) => ProgressMode::Lines,
            };
            let registry = a.registry_options(mode)?;
            let inject = a.inject_options();
            let summary = convert(&ConvertOptions {
                source: a.source,
                output_dir: a.output_dir,
                platform: a.platform,
                format: a.format,
                compression: a.compression.unwrap_or(a.format.default_compression()),
                level: a.level,
                threads: a.threads,
                name: a.name,
                variant: a.variant,
                release: a.release,
                tag: a.tag,
                keep_layers: a.keep_layers,
                inject,
                push: a.push,
                source_date_epoch: source_date_epoch()?,
                max_sparse_size: a.max_sparse_size,
                cancel,
                progress: progress && !a.quiet,
                registry,
            })?;
            report(&summary, a.json)
        }
        Command::Verify { artifact, json } => {
            let report = hakim_convert::verify::verify(&artifact)?;
            print_verify(&report, json)?;
            if !report.passed() {
                let n = report.failures().count();
                anyhow::bail!("{}: {n} rule(s) failed", artifact.display());
            }
            Ok(())
        }
        Command::Batch(a) => {
            let json = a.json;
            let summary = batch::run(&a.options(cancel)?)?;
            match write_batch_report(&summary, json) {
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
                other => other?,
            }
            if summary.success() {
                Ok(())
            } else {
                anyhow::bail!(
                    "{} of {} variants failed",
                    summary.failed,
                    summary.variants.len()
                )
            }
        }
        Command::Demo { output_dir, json } => {
            let layout = output_dir.join("sample-oci");
            if layout.exists() {
                std::fs::remove_dir_all(&layout)
                    .with_context(|| format!("cannot replace {}", layout.display()))?;
            }
            hakim_convert::sample::write_demo_image(&layout)?;
            if !json {
                println!("sample image written to {}", layout.display());
            }
            let summary = convert(&ConvertOptions {
                source_date_epoch: source_date_epoch()?,
                cancel,
                progress,
                ..ConvertOptions::new(format!("oci:{}:latest", layout.display()), output_dir)
            })?;
            report(&summary, json)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = hakim_convert::diag::init(cli.verbose) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn top_level_form_is_convert() {
        let cli = Cli::try_parse_from([
            "hakim-convert",
            "127.0.0.1:5000/hakim-elixir:latest",
            "--out",
            "out",
            "--jobs",
            "2",
        ])
        .unwrap();
        assert!(cli.command.is_none());
        let a = cli.convert.unwrap();
        assert_eq!(a.source, "127.0.0.1:5000/hakim-elixir:latest");
        assert_eq!(a.output_dir, PathBuf::from("out"));
        assert_eq!(a.jobs, 2);

        let cli = Cli::try_parse_from(["hakim-convert", "convert", "oci:x", "-o", "o"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Convert(a)) if a.source == "oci:x"));
        let cli = Cli::try_parse_from(["hakim-convert", "demo", "-o", "d"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Demo { .. })));
        // The design card's form: no -o writes into the current directory.
        let cli = Cli::try_parse_from(["hakim-convert", "ghcr.io/shekohex/hakim-elixir"]).unwrap();
        assert_eq!(cli.convert.unwrap().output_dir, PathBuf::from("."));
        let cli = Cli::try_parse_from(["hakim-convert", "batch", "--variant", "js"]).unwrap();
        assert!(
            matches!(cli.command, Some(Command::Batch(b)) if b.output_dir == std::path::Path::new("."))
        );
        assert!(Cli::try_parse_from([
            "hakim-convert",
            "x",
            "-o",
            "o",
            "--creds",
            "a:b",
            "--creds-file",
            "f"
        ])
        .is_err());
    }

    #[test]
    fn registry_flags() {
        let cli = Cli::try_parse_from([
            "hakim-convert",
            "ghcr.io/a/b",
            "--out",
            "o",
            "--creds",
            "me:secret",
            "--ca-cert",
            "a.pem",
            "--ca-cert",
            "b.pem",
            "--insecure",
            "--cache-dir",
            "/c",
            "--max-attempts",
            "3",
        ])
        .unwrap();
        let o = cli
            .convert
            .unwrap()
            .registry_options(ProgressMode::Lines)
            .unwrap();
        assert_eq!(o.credentials, Some(Credentials::new("me", "secret")));
        assert_eq!(o.ca_certs.len(), 2);
        assert!(o.insecure);
        assert_eq!(o.cache_dir, Some(PathBuf::from("/c")));
        assert_eq!(o.retry.max_attempts, 3);
        assert_eq!(o.jobs, 4);
        let bad = Cli::try_parse_from([
            "hakim-convert",
            "ghcr.io/a/b",
            "--out",
            "o",
            "--creds",
            "nocolon",
        ])
        .unwrap()
        .convert
        .unwrap()
        .registry_options(ProgressMode::Quiet)
        .unwrap_err();
        assert!(!format!("{bad:#}").contains("nocolon"));
    }
}

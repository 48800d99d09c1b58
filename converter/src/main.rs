//! `hakim-convert` command line: a thin layer over the library.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use hakim_convert::compress::OutputCompression;
use hakim_convert::convert::{convert, ConvertOptions, Summary};
use hakim_convert::source::Platform;

#[derive(Parser)]
#[command(
    name = "hakim-convert",
    version,
    about = "Turn OCI/Docker images into Proxmox VE rootfs templates"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Flatten an image into a Proxmox rootfs template (vztmpl) plus sha256sums.txt.
    Convert(ConvertArgs),
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
    /// oci:DIR[:TAG], oci-archive:FILE[:TAG] or docker-archive:FILE[:NAME:TAG|@N]
    source: String,
    /// Output directory (created if missing).
    #[arg(short, long)]
    output_dir: PathBuf,
    /// Platform to pick from a multi-platform index.
    #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
    platform: Option<Platform>,
    #[arg(long, value_enum, default_value_t = OutputCompression::Xz)]
    compression: OutputCompression,
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
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// No progress bar.
    #[arg(long, short)]
    quiet: bool,
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

/// Ctrl-C / SIGTERM: the first asks the conversion to stop (it removes its
/// partial file); a second one terminates at once.
fn cancel_flag() -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(sig, 130, flag.clone())?;
        signal_hook::flag::register(sig, flag.clone())?;
    }
    Ok(flag)
}

fn report(summary: &Summary, json: bool) -> Result<()> {
    for w in &summary.warnings {
        eprintln!("warning: {w}");
    }
    if json {
        println!("{}", serde_json::to_string_pretty(summary)?);
        return Ok(());
    }
    let e = &summary.entries;
    println!("{}", summary.artifact.display());
    println!("  sha256      {}", summary.sha256);
    println!(
        "  size        {:.1} MiB ({:?} level {}) from {:.1} MiB of tar",
        summary.size as f64 / 1048576.0,
        summary.compression,
        summary.level,
        e.tar_bytes as f64 / 1048576.0
    );
    println!(
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
    );
    println!(
        "  entries     {} ({} dirs, {} files, {} symlinks, {} hardlinks, {} fifos)",
        e.entries, e.directories, e.files, e.symlinks, e.hardlinks, e.fifos
    );
    if e.devices_dropped + e.xattrs_dropped > 0 {
        println!(
            "  dropped     {} device nodes, {} xattrs",
            e.devices_dropped, e.xattrs_dropped
        );
    }
    println!("  checksums   {}", summary.sums_file.display());
    println!("  took        {:.1} s", summary.seconds);
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    let cancel = cancel_flag()?;
    let progress = std::io::stderr().is_terminal();
    match cli.command {
        Command::Convert(a) => {
            let summary = convert(&ConvertOptions {
                source: a.source,
                output_dir: a.output_dir,
                platform: a.platform,
                compression: a.compression,
                level: a.level,
                threads: a.threads,
                name: a.name,
                variant: a.variant,
                release: a.release,
                source_date_epoch: source_date_epoch()?,
                cancel,
                progress: progress && !a.quiet,
            })?;
            report(&summary, a.json)
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
                source: format!("oci:{}:latest", layout.display()),
                output_dir,
                platform: None,
                compression: OutputCompression::Xz,
                level: None,
                threads: None,
                name: None,
                variant: None,
                release: None,
                source_date_epoch: source_date_epoch()?,
                cancel,
                progress,
            })?;
            report(&summary, json)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

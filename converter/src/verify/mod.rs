//! `hakim-convert verify`: checks an artifact against every rule Proxmox's
//! importers are known to apply (docs/proxmox.md), so a broken template is caught
//! here rather than by `pct create`.
//!
//! Rootfs templates are read as GNU tar with Proxmox's flags would read them;
//! OCI archives as `proxmox-oci` reads them: member names, index shape, media
//! types, config fields, every digest, size and diff_id. The rules that depend
//! on the image (ids, `/sbin/init`, os-release, Entrypoint, …) come from
//! [`crate::acceptance`], which `convert` applies to what it writes.
//!
//! This module tells the kind and checks `sha256sums.txt`; [`rootfs`] and [`oci`] hold
//! each kind's rules, [`checks`] the list they fill.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use anyhow::{Context, Result};

pub use crate::acceptance::{Check, Status, PVE_KNOWN_OS_IDS};
use crate::layer::Compression;
use crate::output;

mod checks;
mod oci;
mod rootfs;

use checks::Checks;
use oci::verify_oci;
use rootfs::verify_rootfs;

#[derive(Debug, serde::Serialize)]
pub struct Report {
    pub artifact: String,
    /// `rootfs` or `oci-archive`.
    pub kind: &'static str,
    pub checks: Vec<Check>,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.status != Status::Fail)
    }
    pub fn failures(&self) -> impl Iterator<Item = &Check> {
        self.checks.iter().filter(|c| c.status == Status::Fail)
    }
}

/// Verifies `path`, telling the kind from its content. An error (a missing
/// file, a directory, an archive too broken to tell its kind) names `path`.
pub fn verify(path: &Path) -> Result<Report> {
    verify_file(path).with_context(|| format!("cannot verify {}", path.display()))
}

fn verify_file(path: &Path) -> Result<Report> {
    let mut file = File::open(path)?;
    if file.metadata()?.is_dir() {
        anyhow::bail!("it is a directory, not an artifact file");
    }
    let mut head = [0u8; 512];
    let n = read_up_to(&mut file, &mut head)?;
    let compression = Compression::sniff(&head[..n]);
    let is_oci = compression == Compression::Plain && n == 512 && {
        // An OCI archive's members have no `./` prefix and include `oci-layout`
        // or `index.json` or `blobs/`; the first header tells which kind this is.
        let name = &head[..100];
        let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(100)];
        // A `./`-prefixed OCI archive is still reported as one (and fails the
        // member-name rule) rather than as a broken rootfs.
        let name = name.strip_prefix(b"./").unwrap_or(name);
        name == b"oci-layout" || name == b"index.json" || name.starts_with(b"blobs/")
    };
    let mut checks = Checks::default();
    let kind = if is_oci {
        verify_oci(path, &mut checks)?;
        "oci-archive"
    } else {
        verify_rootfs(path, &mut checks)?;
        "rootfs"
    };
    check_sums(path, &mut checks)?;
    Ok(Report {
        artifact: path.display().to_string(),
        kind,
        checks: checks.0,
    })
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// `sha256sums.txt` next to the artifact must list it with the right hash.
fn check_sums(path: &Path, checks: &mut Checks) -> Result<()> {
    const RULE: &str = "sha256sums.txt lists the artifact with its hash";
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let sums = path
        .parent()
        .unwrap_or(Path::new("."))
        .join("sha256sums.txt");
    let text = match std::fs::read_to_string(&sums) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            checks.warn(RULE, "no sha256sums.txt next to the artifact");
            return Ok(());
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", sums.display())),
    };
    let listed: Vec<&str> = text
        .lines()
        .filter_map(|l| {
            let (hash, file) = l.split_once(char::is_whitespace)?;
            (file.trim_start().trim_start_matches('*') == name).then_some(hash)
        })
        .collect();
    let file = File::open(path)?;
    let (actual, _) = output::hash_file(&file)?;
    match listed.as_slice() {
        [] => checks.fail(RULE, format!("{name} is not listed")),
        [hash] if *hash == actual => checks.pass(RULE, ""),
        [hash] => checks.fail(
            RULE,
            format!("listed as {hash}, but the file hashes to {actual}"),
        ),
        _ => checks.fail(RULE, format!("{name} is listed more than once")),
    }
    Ok(())
}

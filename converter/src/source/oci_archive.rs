//! `oci-archive:FILE[:TAG]` — an OCI layout packed in a plain tar (what
//! `skopeo copy … oci-archive:` and Proxmox's `oci-registry-pull` write). Blobs are
//! read in place from the archive.

use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Result};

use super::oci_layout::{self, LayoutFiles};
use super::tar_index::TarIndex;
use super::{Platform, ResolvedImage};

impl LayoutFiles for TarIndex {
    fn read(&self, name: &str, max: u64) -> Result<Vec<u8>> {
        TarIndex::read(self, name, max)
    }
    fn open(&self, name: &str) -> Result<Box<dyn Read + Send>> {
        TarIndex::open(self, name)
    }
}

/// The layout packed in the archive `path` (`index.json`, `blobs/…`), read in place.
pub fn layout_files(path: &Path) -> Result<Arc<dyn LayoutFiles>> {
    let index = TarIndex::scan(path)?;
    if !index.contains("index.json") {
        bail!(
            "{} is not an OCI archive (no index.json member)",
            path.display()
        );
    }
    Ok(Arc::new(index))
}

pub fn open(file: &str, tag: Option<&str>, platform: Option<&Platform>) -> Result<ResolvedImage> {
    let path = Path::new(file);
    let files = layout_files(path)?;
    // PVE names pulled archives `<name>_<tag>.tar`: the name is before the last '_'.
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned());
    let stem = stem.map(|s| match s.rsplit_once('_') {
        Some((name, _)) if !name.is_empty() => name.to_string(),
        _ => s,
    });
    oci_layout::open_with(files, file, stem, tag, platform)
}

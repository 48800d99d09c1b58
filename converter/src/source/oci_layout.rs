//! `oci:DIR[:TAG]` — an OCI image layout directory (and, through [`LayoutFiles`],
//! the same layout inside an `oci-archive:` tar).

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use oci_spec::image::ImageIndex;

use super::manifest::{self, JsonBlobs};
use super::{repository_basename, BlobStore, Platform, ResolvedImage};
use crate::digest::Digest;
use crate::layer::LayerDesc;

const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Read access to the files of a layout, wherever they are stored.
pub trait LayoutFiles: Send + Sync {
    fn read(&self, name: &str, max: u64) -> Result<Vec<u8>>;
    fn open(&self, name: &str) -> Result<Box<dyn Read + Send>>;
    /// The file's size now, where that is cheap to learn.
    fn size(&self, _name: &str) -> Result<Option<u64>> {
        Ok(None)
    }
}

pub struct DirFiles(pub PathBuf);

impl LayoutFiles for DirFiles {
    fn read(&self, name: &str, max: u64) -> Result<Vec<u8>> {
        let path = self.0.join(name);
        let file = File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
        let mut out = Vec::new();
        file.take(max + 1).read_to_end(&mut out)?;
        if out.len() as u64 > max {
            bail!("{} is larger than {max} bytes", path.display());
        }
        Ok(out)
    }

    fn open(&self, name: &str) -> Result<Box<dyn Read + Send>> {
        let path = self.0.join(name);
        let file = File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
        Ok(Box::new(file))
    }

    fn size(&self, name: &str) -> Result<Option<u64>> {
        let path = self.0.join(name);
        let meta =
            std::fs::metadata(&path).with_context(|| format!("cannot open {}", path.display()))?;
        Ok(Some(meta.len()))
    }
}

/// Where a layout keeps the blob `digest`.
pub fn blob_name(digest: &Digest) -> String {
    format!("blobs/sha256/{}", digest.hex())
}

struct Blobs(Arc<dyn LayoutFiles>);

impl JsonBlobs for Blobs {
    fn read_blob(&self, digest: &Digest, max: u64) -> Result<Vec<u8>> {
        self.0.read(&blob_name(digest), max)
    }
}

impl BlobStore for Blobs {
    fn open_layer(&self, layer: &LayerDesc) -> Result<Box<dyn Read + Send>> {
        let digest = layer
            .digest
            .as_ref()
            .expect("layout layers are addressed by digest");
        self.0.open(&blob_name(digest))
    }

    fn blob_size(&self, layer: &LayerDesc) -> Result<Option<u64>> {
        match &layer.digest {
            Some(digest) => self.0.size(&blob_name(digest)),
            None => Ok(None),
        }
    }
}

pub fn open(dir: &str, tag: Option<&str>, platform: Option<&Platform>) -> Result<ResolvedImage> {
    let path = Path::new(dir);
    if !path.join("index.json").is_file() {
        bail!("{dir} is not an OCI image layout (no index.json)");
    }
    let stem = path
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
    open_with(
        Arc::new(DirFiles(path.to_path_buf())),
        dir,
        stem,
        tag,
        platform,
    )
}

/// Resolves an image from a layout's files. `fallback_name` names the artifact
/// when the layout's ref annotation is just a tag.
pub fn open_with(
    files: Arc<dyn LayoutFiles>,
    display: &str,
    fallback_name: Option<String>,
    tag: Option<&str>,
    platform: Option<&Platform>,
) -> Result<ResolvedImage> {
    let layout = files.read("oci-layout", 4096).ok();
    if let Some(layout) = layout {
        let v: serde_json::Value = serde_json::from_slice(&layout)
            .with_context(|| format!("{display}: oci-layout is not JSON"))?;
        if v.get("imageLayoutVersion").and_then(|v| v.as_str()) != Some("1.0.0") {
            bail!("{display}: unsupported imageLayoutVersion in oci-layout");
        }
    }
    let index_json = files.read("index.json", 4 << 20)?;
    let index: ImageIndex = serde_json::from_slice(&index_json)
        .with_context(|| format!("{display}: index.json is malformed"))?;
    let descriptors = index.manifests();
    let name_of = |d: &oci_spec::image::Descriptor| -> Option<String> {
        d.annotations()
            .as_ref()
            .and_then(|a| a.get(REF_NAME))
            .cloned()
    };
    let candidates: Vec<&oci_spec::image::Descriptor> = match tag {
        Some(tag) => descriptors
            .iter()
            .filter(|d| name_of(d).is_some_and(|n| n == tag || n.ends_with(&format!(":{tag}"))))
            .collect(),
        None => descriptors.iter().collect(),
    };
    let chosen = match candidates.as_slice() {
        [one] => *one,
        [] if tag.is_some() => bail!(
            "{display}: no image tagged '{}'; tags: {}",
            tag.unwrap_or_default(),
            list_names(descriptors, &name_of)
        ),
        [] => bail!("{display}: the layout holds no images"),
        // Several per-platform manifests listed directly (e.g. buildah manifest push):
        // choose by platform like an index.
        many if many.iter().all(|d| d.platform().is_some()) => {
            let default = Platform::default();
            manifest::choose_among(many.iter().copied(), platform.unwrap_or(&default))
                .with_context(|| display.to_string())?
        }
        _ => bail!(
            "{display}: holds several images; name one with :TAG ({})",
            list_names(descriptors, &name_of)
        ),
    };
    let ref_name = name_of(chosen);
    let digest: Digest = chosen.digest().as_ref().parse()?;
    let blobs = Blobs(files.clone());
    let resolved = manifest::resolve(
        &blobs,
        Some(chosen.media_type().as_ref()),
        &digest,
        Some(chosen.size()),
        platform,
    )
    .with_context(|| display.to_string())?;
    // A ref name like `name:tag` or `host/name:tag` names the repository; a bare
    // tag (the usual OCI layout practice) does not, and the directory name is used.
    let repository = ref_name
        .as_deref()
        .filter(|n| n.contains('/') || n.contains(':'))
        .and_then(repository_basename)
        .or(fallback_name);
    let tag = tag
        .map(str::to_string)
        .or_else(|| ref_name.map(|n| n.rsplit(':').next().unwrap_or(&n).to_string()));
    Ok(ResolvedImage {
        reference: display.to_string(),
        repository,
        tag,
        manifest_digest: Some(resolved.manifest_digest),
        config_digest: Some(resolved.config_digest),
        config_json: resolved.config_json,
        config: resolved.config,
        platform: resolved.platform,
        layers: resolved.layers,
        blobs: Box::new(blobs),
        warnings: resolved.warnings,
    })
}

fn list_names(
    descriptors: &[oci_spec::image::Descriptor],
    name_of: &dyn Fn(&oci_spec::image::Descriptor) -> Option<String>,
) -> String {
    let names: Vec<String> = descriptors
        .iter()
        .map(|d| name_of(d).unwrap_or_else(|| d.digest().to_string()))
        .collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

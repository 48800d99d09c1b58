//! `docker-archive:FILE[:NAME:TAG|@INDEX]` — the `docker save` format: a tar with
//! `manifest.json`, a config JSON and one tar per layer. Legacy layers are
//! addressed by file name, so they are verified through the config's diff_ids.

use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use oci_spec::image::ImageConfiguration;

use super::tar_index::TarIndex;
use super::{repository_basename, BlobStore, Platform, ResolvedImage};
use crate::digest::Digest;
use crate::layer::LayerDesc;

#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct SavedImage {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

struct Layers {
    index: Arc<TarIndex>,
    paths: Vec<String>,
}

impl BlobStore for Layers {
    fn open_layer(&self, layer: &LayerDesc) -> Result<Box<dyn Read + Send>> {
        self.index.open(&self.paths[layer.index])
    }
}

/// `blobs/sha256/<hex>` and `<hex>.json` names carry their own digest.
fn digest_in_name(name: &str) -> Option<Digest> {
    let base = name.rsplit('/').next()?;
    let hex = base.strip_suffix(".json").unwrap_or(base);
    format!("sha256:{hex}").parse().ok()
}

pub fn open(
    file: &str,
    selector: Option<&str>,
    platform: Option<&Platform>,
) -> Result<ResolvedImage> {
    let index = Arc::new(TarIndex::scan(Path::new(file))?);
    if !index.contains("manifest.json") {
        bail!("{file} is not a docker-archive (no manifest.json member)");
    }
    let saved: Vec<SavedImage> = serde_json::from_slice(&index.read("manifest.json", 4 << 20)?)
        .with_context(|| format!("{file}: manifest.json is malformed"))?;
    let tags_of = |s: &SavedImage| s.repo_tags.clone().unwrap_or_default();
    let chosen = match selector {
        Some(sel) if sel.starts_with('@') => {
            let n: usize = sel[1..]
                .parse()
                .map_err(|_| anyhow!("{file}: bad image index '{sel}'"))?;
            saved.get(n).ok_or_else(|| {
                anyhow!("{file}: no image @{n} (the archive holds {})", saved.len())
            })?
        }
        Some(sel) => saved
            .iter()
            .find(|s| {
                tags_of(s)
                    .iter()
                    .any(|t| t == sel || t.ends_with(&format!("/{sel}")))
            })
            .ok_or_else(|| {
                let all: Vec<String> = saved.iter().flat_map(tags_of).collect();
                anyhow!(
                    "{file}: no image '{sel}'; the archive holds: {}",
                    all.join(", ")
                )
            })?,
        None => match saved.as_slice() {
            [one] => one,
            [] => bail!("{file}: the archive holds no images"),
            _ => bail!(
                "{file}: holds {} images; name one with :NAME:TAG or @INDEX",
                saved.len()
            ),
        },
    };
    let config_json = index.read(&chosen.config, 32 << 20)?;
    let config_digest = Digest::of_bytes(&config_json);
    if let Some(named) = digest_in_name(&chosen.config) {
        if named != config_digest {
            bail!("{file}: config {} hashes to {config_digest}", chosen.config);
        }
    }
    let config: ImageConfiguration = serde_json::from_slice(&config_json)
        .with_context(|| format!("{file}: config {} is malformed", chosen.config))?;
    let diff_ids = config.rootfs().diff_ids();
    if diff_ids.len() != chosen.layers.len() {
        bail!(
            "{file}: manifest lists {} layers but the config has {} diff_ids",
            chosen.layers.len(),
            diff_ids.len()
        );
    }
    let image_platform = Platform {
        os: config.os().to_string(),
        architecture: config.architecture().to_string(),
        variant: config.variant().clone(),
    };
    let mut warnings = Vec::new();
    let default = Platform::default();
    if !platform.unwrap_or(&default).matches(&image_platform) {
        match platform {
            Some(w) => bail!("{file}: image is for {image_platform}, not the requested {w}"),
            None => warnings.push(format!(
                "image is for {image_platform}, not the default linux/amd64; converting it anyway"
            )),
        }
    }
    let mut layers = Vec::new();
    for (i, (path, diff_id)) in chosen.layers.iter().zip(diff_ids).enumerate() {
        let size = index
            .size(path)
            .ok_or_else(|| anyhow!("{file}: layer {} ('{path}') is missing", i + 1))?;
        layers.push(LayerDesc {
            index: i,
            digest: if path.starts_with("blobs/") {
                digest_in_name(path)
            } else {
                None
            },
            size: Some(size),
            media_type: "application/vnd.docker.image.rootfs.diff.tar".into(),
            diff_id: diff_id
                .parse()
                .map_err(|e| anyhow!("config diff_id {}: {e}", i + 1))?,
        });
    }
    let first_tag = tags_of(chosen).into_iter().next();
    Ok(ResolvedImage {
        reference: file.to_string(),
        repository: first_tag
            .as_deref()
            .and_then(repository_basename)
            .or_else(|| {
                Path::new(file)
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
            }),
        tag: first_tag.and_then(|t| t.rsplit_once(':').map(|(_, t)| t.to_string())),
        manifest_digest: None,
        config_digest: Some(config_digest),
        config_json,
        config,
        platform: image_platform,
        layers,
        blobs: Box::new(Layers {
            index,
            paths: chosen.layers.clone(),
        }),
        warnings,
    })
}

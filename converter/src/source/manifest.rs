//! From a top-level descriptor to a config and layer list: index/list platform
//! selection, manifest and config parsing, and every check that can be made
//! before touching a layer. Shared by all transports.

use anyhow::{anyhow, bail, Context, Result};
use oci_spec::image::{ImageConfiguration, ImageIndex, ImageManifest};

use super::Platform;
use crate::digest::Digest;
use crate::layer::LayerDesc;

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
const DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+json";
const DOCKER_SCHEMA1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";

/// Manifests and configs are small; anything bigger is not one.
const MAX_MANIFEST_BYTES: u64 = 4 << 20;
const MAX_CONFIG_BYTES: u64 = 32 << 20;
const MAX_INDEX_DEPTH: usize = 4;

/// Layer media types we can flatten.
pub fn is_layer_media_type(mt: &str) -> bool {
    mt.starts_with("application/vnd.oci.image.layer.")
        || mt.starts_with("application/vnd.docker.image.rootfs.diff.tar")
        || mt.starts_with("application/vnd.docker.image.rootfs.foreign.diff.tar")
}

/// Reads small JSON blobs by digest. The resolver verifies what comes back.
pub trait JsonBlobs {
    fn read_blob(&self, digest: &Digest, max: u64) -> Result<Vec<u8>>;
}

pub struct Resolved {
    pub manifest_digest: Digest,
    pub config_digest: Digest,
    pub config_json: Vec<u8>,
    pub config: ImageConfiguration,
    pub platform: Platform,
    pub layers: Vec<LayerDesc>,
    pub warnings: Vec<String>,
}

fn read_verified(
    blobs: &dyn JsonBlobs,
    digest: &Digest,
    size: Option<u64>,
    max: u64,
    what: &str,
) -> Result<Vec<u8>> {
    let bytes = blobs
        .read_blob(digest, max)
        .with_context(|| format!("cannot read {what} {digest}"))?;
    let actual = Digest::of_bytes(&bytes);
    if &actual != digest {
        bail!("{what} {digest}: content hashes to {actual}");
    }
    if let Some(size) = size {
        if size != bytes.len() as u64 {
            bail!(
                "{what} {digest}: {} bytes but the descriptor says {size}",
                bytes.len()
            );
        }
    }
    Ok(bytes)
}

fn sniff_media_type(json: &[u8]) -> Result<String> {
    let v: serde_json::Value =
        serde_json::from_slice(json).context("manifest is not valid JSON")?;
    if let Some(mt) = v.get("mediaType").and_then(|m| m.as_str()) {
        return Ok(mt.to_string());
    }
    if v.get("schemaVersion").and_then(|s| s.as_u64()) == Some(1) {
        return Ok(DOCKER_SCHEMA1.to_string());
    }
    if v.get("manifests").is_some() {
        return Ok(OCI_INDEX.to_string());
    }
    if v.get("layers").is_some() {
        return Ok(OCI_MANIFEST.to_string());
    }
    bail!("JSON document is neither an image manifest nor an index")
}

fn platform_of_config(config: &ImageConfiguration) -> Platform {
    Platform {
        os: config.os().to_string(),
        architecture: config.architecture().to_string(),
        variant: config.variant().clone(),
    }
}

/// Resolves `digest` (a manifest or index, `media_type` if the caller knows it).
/// `want` is the requested platform; `None` means the default linux/amd64, where a
/// single-platform image of another architecture only warns.
pub fn resolve(
    blobs: &dyn JsonBlobs,
    media_type: Option<&str>,
    digest: &Digest,
    size: Option<u64>,
    want: Option<&Platform>,
) -> Result<Resolved> {
    let default = Platform::default();
    let wanted = want.unwrap_or(&default);
    let mut warnings = Vec::new();
    let mut digest = digest.clone();
    let mut size = size;
    let mut media_type = media_type.map(str::to_string);
    for _ in 0..MAX_INDEX_DEPTH {
        let bytes = read_verified(blobs, &digest, size, MAX_MANIFEST_BYTES, "manifest")?;
        let mt = match media_type.take() {
            Some(mt) if !mt.is_empty() => mt,
            _ => sniff_media_type(&bytes)?,
        };
        match mt.as_str() {
            OCI_INDEX | DOCKER_LIST => {
                let index: ImageIndex = serde_json::from_slice(&bytes)
                    .with_context(|| format!("index {digest} is malformed"))?;
                let chosen =
                    choose_platform(&index, wanted).with_context(|| format!("index {digest}"))?;
                digest = chosen.digest().as_ref().parse()?;
                size = Some(chosen.size());
                media_type = Some(chosen.media_type().to_string());
            }
            OCI_MANIFEST | DOCKER_MANIFEST => {
                return resolve_manifest(blobs, digest, &bytes, want, wanted, warnings)
            }
            DOCKER_SCHEMA1 | DOCKER_SCHEMA1_SIGNED => bail!(
                "manifest {digest} is Docker schema 1, which is not supported; \
                 re-push the image with a current client to get a v2 manifest"
            ),
            other => {
                warnings.push(format!(
                    "manifest {digest} has unexpected media type {other}"
                ));
                return resolve_manifest(blobs, digest, &bytes, want, wanted, warnings);
            }
        }
    }
    bail!("indexes nested deeper than {MAX_INDEX_DEPTH} levels")
}

fn choose_platform<'a>(
    index: &'a ImageIndex,
    wanted: &Platform,
) -> Result<&'a oci_spec::image::Descriptor> {
    choose_among(index.manifests().iter(), wanted)
}

/// Picks the one descriptor whose platform matches (attestations skipped).
pub fn choose_among<'a>(
    descriptors: impl Iterator<Item = &'a oci_spec::image::Descriptor>,
    wanted: &Platform,
) -> Result<&'a oci_spec::image::Descriptor> {
    let mut available = Vec::new();
    let mut matches = Vec::new();
    for d in descriptors {
        let Some(p) = d.platform() else { continue };
        let p = Platform {
            os: p.os().to_string(),
            architecture: p.architecture().to_string(),
            variant: p.variant().clone(),
        };
        // Attestation manifests (buildx) are listed as unknown/unknown.
        if p.os == "unknown" || p.architecture == "unknown" {
            continue;
        }
        if wanted.matches(&p) {
            matches.push((d, p.clone()));
        }
        available.push(p.to_string());
    }
    match matches.len() {
        1 => Ok(matches[0].0),
        0 if available.is_empty() => bail!("the index lists no platforms"),
        0 => bail!(
            "no image for platform {wanted}; available: {}",
            available.join(", ")
        ),
        _ => {
            let found: Vec<String> = matches.iter().map(|(_, p)| p.to_string()).collect();
            bail!(
                "platform {wanted} is ambiguous ({}); pass --platform os/arch/variant",
                found.join(", ")
            )
        }
    }
}

fn resolve_manifest(
    blobs: &dyn JsonBlobs,
    manifest_digest: Digest,
    bytes: &[u8],
    want: Option<&Platform>,
    wanted: &Platform,
    mut warnings: Vec<String>,
) -> Result<Resolved> {
    let manifest: ImageManifest = serde_json::from_slice(bytes)
        .with_context(|| format!("manifest {manifest_digest} is malformed"))?;
    let config_desc = manifest.config();
    let config_mt = config_desc.media_type().to_string();
    if config_mt != OCI_CONFIG && config_mt != DOCKER_CONFIG {
        bail!(
            "manifest {manifest_digest} is not a container image (config media type {config_mt})"
        );
    }
    let config_digest: Digest = config_desc.digest().as_ref().parse()?;
    let config_json = read_verified(
        blobs,
        &config_digest,
        Some(config_desc.size()),
        MAX_CONFIG_BYTES,
        "config",
    )?;
    let config: ImageConfiguration = serde_json::from_slice(&config_json)
        .with_context(|| format!("config {config_digest} is malformed"))?;
    let diff_ids = config.rootfs().diff_ids();
    if diff_ids.len() != manifest.layers().len() {
        bail!(
            "manifest {manifest_digest} lists {} layers but its config has {} diff_ids",
            manifest.layers().len(),
            diff_ids.len()
        );
    }
    let platform = platform_of_config(&config);
    if !wanted.matches(&platform) {
        match want {
            Some(w) => bail!("image {manifest_digest} is for {platform}, not the requested {w}"),
            None => warnings.push(format!(
                "image is for {platform}, not the default linux/amd64; converting it anyway"
            )),
        }
    }
    let mut layers = Vec::with_capacity(diff_ids.len());
    for (index, (d, diff_id)) in manifest.layers().iter().zip(diff_ids).enumerate() {
        let mt = d.media_type().to_string();
        if !is_layer_media_type(&mt) {
            bail!(
                "layer {} has media type {mt}, which is not a filesystem layer",
                index + 1
            );
        }
        layers.push(LayerDesc {
            index,
            digest: Some(d.digest().as_ref().parse()?),
            size: Some(d.size()),
            media_type: mt,
            diff_id: diff_id
                .parse()
                .map_err(|e| anyhow!("config diff_id {}: {e}", index + 1))?,
        });
    }
    Ok(Resolved {
        manifest_digest,
        config_digest,
        config_json,
        config,
        platform,
        layers,
        warnings,
    })
}

//! Image sources: a reference string → a resolved image (config + ordered layer
//! blobs) and a [`BlobStore`] that can open each layer any number of times.
//!
//! Transports use skopeo's prefixes: `oci:DIR[:TAG]`, `oci-archive:FILE[:TAG]`,
//! `docker-archive:FILE[:NAME:TAG|@INDEX]`, `docker://REF`; a bare reference whose
//! first component is a host (`ghcr.io/owner/name:tag`, `127.0.0.1:5000/name`) is a
//! registry reference too. Everything after resolution is transport-agnostic: the
//! registry transport downloads into its blob cache and the flattener reads from there.

pub mod docker_archive;
pub mod manifest;
pub mod oci_archive;
pub mod oci_layout;
pub mod registry;
pub(crate) mod tar_index;

use std::fmt;
use std::io::{self, Read};
use std::str::FromStr;
use std::sync::Arc;

use anyhow::{bail, Result};

use crate::digest::Digest;
use crate::layer::LayerDesc;
use crate::registry::{Reference, RegistryOptions};

/// `os/arch[/variant]`, as in `--platform linux/arm64/v8`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Default for Platform {
    fn default() -> Self {
        Platform {
            os: "linux".into(),
            architecture: "amd64".into(),
            variant: None,
        }
    }
}

impl FromStr for Platform {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let parts: Vec<&str> = s.split('/').collect();
        match parts.as_slice() {
            [os, arch] if !os.is_empty() && !arch.is_empty() => Ok(Platform {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: None,
            }),
            [os, arch, variant] if !os.is_empty() && !arch.is_empty() && !variant.is_empty() => {
                Ok(Platform {
                    os: os.to_string(),
                    architecture: arch.to_string(),
                    variant: Some(variant.to_string()),
                })
            }
            _ => bail!("invalid platform '{s}': expected os/arch[/variant], e.g. linux/amd64"),
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

impl Platform {
    /// Whether an image's platform satisfies this request. `arm64` and `arm64/v8`
    /// are the same thing; an unspecified variant accepts any.
    pub fn matches(&self, other: &Platform) -> bool {
        if self.os != other.os || self.architecture != other.architecture {
            return false;
        }
        let norm = |p: &Platform| match (p.architecture.as_str(), p.variant.as_deref()) {
            ("arm64", Some("v8")) => None,
            (_, v) => v.map(str::to_string),
        };
        match norm(self) {
            None => true,
            Some(v) => norm(other).as_deref() == Some(v.as_str()),
        }
    }
}

/// Opens layer blobs of a resolved image. Each call returns a fresh reader from
/// the start, so the flattener can read every layer twice.
pub trait BlobStore: Send + Sync {
    fn open_layer(&self, layer: &LayerDesc) -> Result<Box<dyn Read + Send>>;

    /// The blob's size as stored now, where that is cheap to learn (a file):
    /// pass 2 compares it with the size pass 1 verified instead of hashing again.
    fn blob_size(&self, _layer: &LayerDesc) -> Result<Option<u64>> {
        Ok(None)
    }

    /// Whether this process already hashed the blob against its digest (a download
    /// that just verified it): pass 1 then counts its bytes instead of hashing them a
    /// second time. A blob found in the cache is never proven: it is hashed on read.
    fn digest_proven(&self, _layer: &LayerDesc) -> bool {
        false
    }
}

/// The image's own store, with one more layer (an uncompressed tar held in
/// memory) on top.
struct WithTopLayer {
    below: Box<dyn BlobStore>,
    index: usize,
    tar: Arc<[u8]>,
}

impl BlobStore for WithTopLayer {
    fn open_layer(&self, layer: &LayerDesc) -> Result<Box<dyn Read + Send>> {
        if layer.index == self.index {
            Ok(Box::new(io::Cursor::new(self.tar.clone())))
        } else {
            self.below.open_layer(layer)
        }
    }

    fn blob_size(&self, layer: &LayerDesc) -> Result<Option<u64>> {
        if layer.index == self.index {
            Ok(Some(self.tar.len() as u64))
        } else {
            self.below.blob_size(layer)
        }
    }

    fn digest_proven(&self, layer: &LayerDesc) -> bool {
        layer.index != self.index && self.below.digest_proven(layer)
    }
}

/// An image ready to flatten.
pub struct ResolvedImage {
    /// The reference as the user gave it.
    pub reference: String,
    /// Repository name used for artifact naming (e.g. `hakim-base`), when known.
    pub repository: Option<String>,
    pub tag: Option<String>,
    pub manifest_digest: Option<Digest>,
    pub config_digest: Option<Digest>,
    /// The raw config JSON (kept for writing image metadata later).
    pub config_json: Vec<u8>,
    pub config: oci_spec::image::ImageConfiguration,
    pub platform: Platform,
    pub layers: Vec<LayerDesc>,
    pub blobs: Box<dyn BlobStore>,
    /// Notes from resolution (media type oddities, platform fallbacks).
    pub warnings: Vec<String>,
}

impl ResolvedImage {
    /// This image with `tar`, an uncompressed layer held in memory, on top of
    /// its layers; returns the new layer's descriptor too.
    pub fn with_top_layer(self, tar: Vec<u8>) -> (ResolvedImage, LayerDesc) {
        let digest = Digest::of_bytes(&tar);
        let top = LayerDesc {
            index: self.layers.len(),
            digest: Some(digest.clone()),
            size: Some(tar.len() as u64),
            media_type: "application/vnd.oci.image.layer.v1.tar".into(),
            diff_id: digest,
        };
        let mut layers = self.layers;
        layers.push(top.clone());
        let blobs = Box::new(WithTopLayer {
            below: self.blobs,
            index: top.index,
            tar: tar.into(),
        });
        let image = ResolvedImage {
            layers,
            blobs,
            ..self
        };
        (image, top)
    }
}

/// The transports this build understands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    OciLayout {
        dir: String,
        tag: Option<String>,
    },
    OciArchive {
        file: String,
        tag: Option<String>,
    },
    DockerArchive {
        file: String,
        selector: Option<String>,
    },
    Registry(Reference),
}

impl FromStr for Transport {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        // Like skopeo: the path ends at the first ':' after the prefix.
        let split = |rest: &str| -> (String, Option<String>) {
            match rest.split_once(':') {
                Some((p, t)) if !t.is_empty() => (p.to_string(), Some(t.to_string())),
                Some((p, _)) => (p.to_string(), None),
                None => (rest.to_string(), None),
            }
        };
        if let Some(rest) = s.strip_prefix("oci:") {
            let (dir, tag) = split(rest);
            return Ok(Transport::OciLayout { dir, tag });
        }
        if let Some(rest) = s.strip_prefix("oci-archive:") {
            let (file, tag) = split(rest);
            return Ok(Transport::OciArchive { file, tag });
        }
        if let Some(rest) = s.strip_prefix("docker-archive:") {
            let (file, selector) = split(rest);
            return Ok(Transport::DockerArchive { file, selector });
        }
        if s.starts_with("docker://") || crate::registry::reference::looks_like_registry(s) {
            return Ok(Transport::Registry(Reference::parse(s)?));
        }
        bail!(
            "'{s}': unknown source; use oci:DIR[:TAG], oci-archive:FILE[:TAG], \
             docker-archive:FILE, docker://[HOST/]NAME[:TAG] or HOST/NAME[:TAG] \
             (a bare registry reference needs a host with '.' or ':', or localhost)"
        )
    }
}

/// Resolves a source reference for the requested platform (`None` = linux/amd64,
/// with only a warning when a single-platform image is something else). Registry
/// references use default [`RegistryOptions`].
pub fn open(reference: &str, platform: Option<&Platform>) -> Result<ResolvedImage> {
    let (image, downloads) = open_with(reference, platform, &RegistryOptions::default())?;
    if let Some(downloads) = downloads {
        downloads.finish()?;
    }
    Ok(image)
}

/// [`open`] with registry options; for a registry reference, the layer downloads,
/// still running: layers can be read as they arrive, and
/// [`registry::Downloads::finish`] tells what was downloaded and what the cache held.
pub fn open_with(
    reference: &str,
    platform: Option<&Platform>,
    registry: &RegistryOptions,
) -> Result<(ResolvedImage, Option<registry::Downloads>)> {
    let transport: Transport = reference.parse()?;
    let (mut image, stats) = match &transport {
        Transport::OciLayout { dir, tag } => {
            (oci_layout::open(dir, tag.as_deref(), platform)?, None)
        }
        Transport::OciArchive { file, tag } => {
            (oci_archive::open(file, tag.as_deref(), platform)?, None)
        }
        Transport::DockerArchive { file, selector } => (
            docker_archive::open(file, selector.as_deref(), platform)?,
            None,
        ),
        Transport::Registry(r) => {
            let (image, downloads) = registry::open(r, reference, platform, registry)?;
            (image, Some(downloads))
        }
    };
    image.reference = reference.to_string();
    Ok((image, stats))
}

/// The last path component of a repository reference, without tag or digest:
/// `ghcr.io/shekohex/hakim-base:latest` → `hakim-base`.
pub fn repository_basename(reference: &str) -> Option<String> {
    let no_digest = reference.split('@').next()?;
    let last = no_digest.rsplit('/').next()?;
    let name = last.split(':').next()?;
    (!name.is_empty()).then(|| name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_transports() {
        assert_eq!(
            "oci:/tmp/x:latest".parse::<Transport>().unwrap(),
            Transport::OciLayout {
                dir: "/tmp/x".into(),
                tag: Some("latest".into())
            }
        );
        assert_eq!(
            "oci:dir".parse::<Transport>().unwrap(),
            Transport::OciLayout {
                dir: "dir".into(),
                tag: None
            }
        );
        assert_eq!(
            "docker-archive:a.tar:hakim-base:1"
                .parse::<Transport>()
                .unwrap(),
            Transport::DockerArchive {
                file: "a.tar".into(),
                selector: Some("hakim-base:1".into())
            }
        );
        assert!("whatever".parse::<Transport>().is_err());
        assert!("someone/tool".parse::<Transport>().is_err());
        assert!("./dir/x".parse::<Transport>().is_err());
        let Transport::Registry(r) = "ghcr.io/shekohex/hakim-base".parse::<Transport>().unwrap()
        else {
            panic!("not a registry reference")
        };
        assert_eq!(r.repository, "shekohex/hakim-base");
        assert_eq!(r.tag.as_deref(), Some("latest"));
        let Transport::Registry(r) = "docker://debian".parse::<Transport>().unwrap() else {
            panic!("not a registry reference")
        };
        assert_eq!(r.api_host(), "registry-1.docker.io");
        assert_eq!(r.repository, "library/debian");
        assert!(matches!(
            "127.0.0.1:5000/hakim-elixir:latest".parse::<Transport>(),
            Ok(Transport::Registry(_))
        ));
        assert!("docker://ghcr.io/Bad/Name".parse::<Transport>().is_err());
    }

    #[test]
    fn platform_matching() {
        let p = |s: &str| s.parse::<Platform>().unwrap();
        assert!(p("linux/arm64").matches(&p("linux/arm64/v8")));
        assert!(p("linux/arm64/v8").matches(&p("linux/arm64")));
        assert!(p("linux/arm").matches(&p("linux/arm/v7")));
        assert!(!p("linux/arm/v6").matches(&p("linux/arm/v7")));
        assert!(!p("linux/amd64").matches(&p("linux/arm64")));
        assert!("linux".parse::<Platform>().is_err());
        assert!("linux/amd64/v2/x".parse::<Platform>().is_err());
    }

    #[test]
    fn repository_basenames() {
        assert_eq!(
            repository_basename("ghcr.io/shekohex/hakim-base:latest").as_deref(),
            Some("hakim-base")
        );
        assert_eq!(
            repository_basename("localhost:5000/x/hakim-js@sha256:abcd").as_deref(),
            Some("hakim-js")
        );
        assert_eq!(
            repository_basename("hakim-rust").as_deref(),
            Some("hakim-rust")
        );
    }
}

//! A [`PushRequest`] from an image on disk: an OCI layout directory or an OCI
//! archive (the plain tar `--format oci-archive` writes). The layout must hold
//! exactly one image manifest; its bytes are pushed unchanged (so the pushed
//! manifest digest is the layout's), and its config and layers are read from
//! `blobs/sha256/` when uploaded (from the archive in place, nothing extracted).
//! It reads images as `source` does and hands `registry` what to send, so it
//! sits above both (inside `registry` it made the two import each other).

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};

use crate::digest::Digest;
use crate::registry::push::{BlobUpload, PushRequest};
use crate::registry::reference::Reference;
use crate::source::manifest::{DOCKER_MANIFEST, OCI_MANIFEST};
use crate::source::oci_archive;
use crate::source::oci_layout::{blob_name, DirFiles, LayoutFiles};

const MAX_JSON_BYTES: u64 = 4 << 20;

/// The image of the OCI layout directory `dir`, to be pushed to `target`.
pub fn from_oci_layout(dir: &Path, target: Reference) -> Result<PushRequest> {
    if !dir.join("index.json").is_file() {
        bail!(
            "{} is not an OCI image layout (no index.json)",
            dir.display()
        );
    }
    from_files(
        Arc::new(DirFiles(dir.to_path_buf())),
        &dir.display().to_string(),
        target,
    )
}

/// The image of the OCI archive `file`, to be pushed to `target`.
pub fn from_oci_archive(file: &Path, target: Reference) -> Result<PushRequest> {
    let files = oci_archive::layout_files(file)?;
    from_files(files, &file.display().to_string(), target)
}

fn from_files(
    files: Arc<dyn LayoutFiles>,
    display: &str,
    target: Reference,
) -> Result<PushRequest> {
    let index: serde_json::Value =
        serde_json::from_slice(&files.read("index.json", MAX_JSON_BYTES)?)
            .with_context(|| format!("{display}: index.json is not JSON"))?;
    let descriptors = index
        .get("manifests")
        .and_then(|m| m.as_array())
        .cloned()
        .unwrap_or_default();
    let [descriptor] = descriptors.as_slice() else {
        bail!(
            "{display}: index.json lists {} manifests; a push needs exactly one image",
            descriptors.len()
        );
    };
    let media_type = descriptor
        .get("mediaType")
        .and_then(|m| m.as_str())
        .unwrap_or_default()
        .to_string();
    if media_type != OCI_MANIFEST && media_type != DOCKER_MANIFEST {
        bail!(
            "{display}: the manifest is of type '{media_type}'; only single image manifests \
             ({OCI_MANIFEST} or {DOCKER_MANIFEST}) can be pushed"
        );
    }
    let digest = descriptor_digest(descriptor, display)?;
    let manifest = files.read(&blob_name(&digest), MAX_JSON_BYTES)?;
    if Digest::of_bytes(&manifest) != digest {
        bail!("{display}: the manifest blob does not hash to its digest {digest}");
    }
    let parsed: serde_json::Value = serde_json::from_slice(&manifest)
        .with_context(|| format!("{display}: the manifest is not JSON"))?;
    let mut blobs: Vec<BlobUpload> = Vec::new();
    let layers = parsed
        .get("layers")
        .and_then(|l| l.as_array())
        .into_iter()
        .flatten();
    for d in parsed.get("config").into_iter().chain(layers) {
        let digest = descriptor_digest(d, display)?;
        let size = d
            .get("size")
            .and_then(|s| s.as_u64())
            .with_context(|| format!("{display}: descriptor {digest} has no size"))?;
        if blobs.iter().any(|b| b.digest == digest) {
            continue;
        }
        let files = files.clone();
        let name = blob_name(&digest);
        blobs.push(BlobUpload {
            digest,
            size,
            open: Box::new(move || files.open(&name)),
        });
    }
    Ok(PushRequest {
        target,
        manifest,
        manifest_media_type: media_type,
        blobs,
        mount_from: None,
    })
}

fn descriptor_digest(d: &serde_json::Value, display: &str) -> Result<Digest> {
    let text = d
        .get("digest")
        .and_then(|x| x.as_str())
        .with_context(|| format!("{display}: a descriptor has no digest"))?;
    text.parse::<Digest>()
        .with_context(|| format!("{display}: descriptor digest"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample::{write_oci_layout, BlobCompression, LayerBuilder, SampleLayer};
    use std::io::Read;

    #[test]
    fn layout_gives_its_manifest_and_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let layer = SampleLayer::new(
            LayerBuilder::new().file("etc/hello", "hi\n").finish(),
            BlobCompression::Gzip,
        );
        let digest =
            write_oci_layout(dir.path(), "t", "amd64", &[layer], serde_json::json!({})).unwrap();
        let target = Reference::parse("127.0.0.1:5000/a:t").unwrap();
        let req = from_oci_layout(dir.path(), target).unwrap();
        assert_eq!(Digest::of_bytes(&req.manifest), digest);
        assert_eq!(req.manifest_media_type, OCI_MANIFEST);
        assert_eq!(req.blobs.len(), 2);
        for b in &req.blobs {
            let mut bytes = Vec::new();
            (b.open)().unwrap().read_to_end(&mut bytes).unwrap();
            assert_eq!(Digest::of_bytes(&bytes), b.digest);
            assert_eq!(bytes.len() as u64, b.size);
        }

        // Two images: which one is meant is not guessed.
        let index = dir.path().join("index.json");
        let mut v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&index).unwrap()).unwrap();
        let first = v["manifests"][0].clone();
        v["manifests"].as_array_mut().unwrap().push(first);
        std::fs::write(&index, v.to_string()).unwrap();
        let target = Reference::parse("127.0.0.1:5000/a:t").unwrap();
        let err = from_oci_layout(dir.path(), target).err().unwrap();
        assert!(err.to_string().contains("lists 2 manifests"), "{err}");
    }
}

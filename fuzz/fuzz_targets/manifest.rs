//! OCI layout resolution from arbitrary JSON: `index.json`, manifests, indexes
//! and configs, through the same resolver registry sources use.
//!
//! Input: one flag byte (bit 0: ask for linux/arm64 instead of the default;
//! bit 1: ask for tag `1`), then JSON documents separated by
//! [`hakim_fuzz::SEP`]: the first is `index.json`, the others are blobs. Since
//! a fuzzer cannot forge SHA-256, a document may write `<Dn>` for the digest
//! (`sha256:…`) and `<Sn>` for the size of document `n` (n > its own number;
//! later documents are hashed first).
//!
//! On success: the config hashes to its digest, layers and diff_ids pair up
//! one to one, every layer has a filesystem media type, the requested platform
//! matches, and a second resolution gives the same answer.
#![no_main]

use std::collections::HashMap;
use std::io::{Cursor, Read};
use std::sync::Arc;

use anyhow::{bail, Result};
use hakim_convert::digest::Digest;
use hakim_convert::source::manifest::is_layer_media_type;
use hakim_convert::source::oci_layout::{open_with, LayoutFiles};
use hakim_convert::source::Platform;
use libfuzzer_sys::fuzz_target;

struct MemFiles(HashMap<String, Vec<u8>>);

impl LayoutFiles for MemFiles {
    fn read(&self, name: &str, max: u64) -> Result<Vec<u8>> {
        match self.0.get(name) {
            Some(b) if b.len() as u64 > max => bail!("{name} is larger than {max} bytes"),
            Some(b) => Ok(b.clone()),
            None => bail!("no {name}"),
        }
    }
    fn open(&self, name: &str) -> Result<Box<dyn Read + Send>> {
        Ok(Box::new(Cursor::new(self.read(name, u64::MAX)?)))
    }
}

fn replace(doc: &[u8], token: &str, value: &str) -> Vec<u8> {
    let t = token.as_bytes();
    let mut out = Vec::with_capacity(doc.len());
    let mut i = 0;
    while i < doc.len() {
        if doc[i..].starts_with(t) {
            out.extend_from_slice(value.as_bytes());
            i += t.len();
        } else {
            out.push(doc[i]);
            i += 1;
        }
    }
    out
}

/// The documents with every `<Dn>`/`<Sn>` of a later document filled in.
fn documents(parts: &[&[u8]]) -> Vec<Vec<u8>> {
    let mut docs: Vec<Vec<u8>> = parts.iter().map(|p| p.to_vec()).collect();
    for i in (0..docs.len()).rev() {
        for j in i + 1..docs.len().min(10) {
            let digest = Digest::of_bytes(&docs[j]).to_string();
            let size = docs[j].len().to_string();
            docs[i] = replace(&docs[i], &format!("<D{j}>"), &digest);
            docs[i] = replace(&docs[i], &format!("<S{j}>"), &size);
        }
    }
    docs
}

fuzz_target!(|data: &[u8]| {
    let (flags, rest) = hakim_fuzz::flags(data);
    let docs = documents(&hakim_fuzz::split(rest));
    let mut files = HashMap::new();
    files.insert(
        "oci-layout".to_string(),
        br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
    );
    files.insert("index.json".to_string(), docs[0].clone());
    let mut blobs = HashMap::new();
    for doc in &docs[1..] {
        let d = Digest::of_bytes(doc);
        files.insert(format!("blobs/sha256/{}", d.hex()), doc.clone());
        blobs.insert(d, doc.clone());
    }
    let files: Arc<dyn LayoutFiles> = Arc::new(MemFiles(files));
    let platform: Option<Platform> = (flags & 1 != 0).then(|| "linux/arm64".parse().unwrap());
    let tag = (flags & 2 != 0).then_some("1");
    let first = open_with(files.clone(), "fuzz", None, tag, platform.as_ref());
    let second = open_with(files, "fuzz", None, tag, platform.as_ref());
    let image = match (first, second) {
        (Err(a), Err(b)) => {
            assert_eq!(
                format!("{a:#}"),
                format!("{b:#}"),
                "errors differ between runs"
            );
            return;
        }
        (Ok(a), Ok(b)) => {
            assert_eq!(a.config_json, b.config_json);
            assert_eq!(format!("{:?}", a.layers), format!("{:?}", b.layers));
            a
        }
        _ => panic!("two resolutions of the same layout disagree"),
    };
    let config_digest = image.config_digest.clone().expect("a config digest");
    assert_eq!(Digest::of_bytes(&image.config_json), config_digest);
    assert_eq!(blobs.get(&config_digest), Some(&image.config_json));
    let manifest = image.manifest_digest.clone().expect("a manifest digest");
    assert!(blobs.contains_key(&manifest), "the manifest is not a blob");
    let diff_ids = image.config.rootfs().diff_ids();
    assert_eq!(image.layers.len(), diff_ids.len());
    for (i, (layer, diff_id)) in image.layers.iter().zip(diff_ids).enumerate() {
        assert_eq!(layer.index, i);
        assert!(layer.digest.is_some() && layer.size.is_some());
        assert!(
            is_layer_media_type(&layer.media_type),
            "{}",
            layer.media_type
        );
        assert_eq!(&layer.diff_id.to_string(), diff_id);
    }
    if let Some(p) = &platform {
        assert!(p.matches(&image.platform), "{} for {p}", image.platform);
    }
});

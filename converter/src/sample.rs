//! Crafting images blob by blob: a layer builder that accepts any member name
//! (hostile ones included), an OCI layout writer, and an image held in memory
//! that both passes of the flattener can read. Used by `hakim-convert demo`, by
//! the tests and by the fuzz targets; nothing here touches the network.

use std::fs;
use std::io::{self, Cursor, Read, Write};
use std::path::Path;
use std::sync::Arc;

use anyhow::Result;

use crate::digest::Digest;
use crate::flatten::{self, EmitOptions, EmitStats};
use crate::layer::LayerDesc;
use crate::source::{BlobStore, Platform, ResolvedImage};
use crate::tarout::{OutEntry, OutKind, TarWriter};
use crate::tree::Xattr;

/// Builds one layer tar in memory, members in call order, names verbatim.
pub struct LayerBuilder {
    w: TarWriter<Vec<u8>>,
    uid: u64,
    gid: u64,
    mtime: u64,
}

impl Default for LayerBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl LayerBuilder {
    pub fn new() -> Self {
        LayerBuilder {
            w: TarWriter::new(Vec::new()),
            uid: 0,
            gid: 0,
            mtime: 1_700_000_000,
        }
    }

    /// Owner of the members added next.
    pub fn owner(mut self, uid: u64, gid: u64) -> Self {
        self.uid = uid;
        self.gid = gid;
        self
    }

    pub fn entry(
        mut self,
        name: &[u8],
        kind: OutKind,
        mode: u32,
        link: Option<&[u8]>,
        data: &[u8],
        xattrs: &[Xattr],
    ) -> Self {
        self.w
            .append(&OutEntry {
                name,
                kind,
                mode,
                uid: self.uid,
                gid: self.gid,
                mtime: self.mtime,
                size: data.len() as u64,
                link,
                xattrs,
            })
            .expect("writing to memory");
        if kind == OutKind::File {
            self.w
                .append_data(&mut &data[..], data.len() as u64, &mut |_| Ok(()))
                .expect("writing to memory");
        }
        self
    }

    pub fn dir(self, name: &str, mode: u32) -> Self {
        self.entry(name.as_bytes(), OutKind::Dir, mode, None, b"", &[])
    }
    pub fn file(self, name: &str, content: &str) -> Self {
        self.entry(
            name.as_bytes(),
            OutKind::File,
            0o644,
            None,
            content.as_bytes(),
            &[],
        )
    }
    pub fn file_mode(self, name: &str, content: &str, mode: u32) -> Self {
        self.entry(
            name.as_bytes(),
            OutKind::File,
            mode,
            None,
            content.as_bytes(),
            &[],
        )
    }
    pub fn symlink(self, name: &str, target: &str) -> Self {
        self.entry(
            name.as_bytes(),
            OutKind::Symlink,
            0o777,
            Some(target.as_bytes()),
            b"",
            &[],
        )
    }
    pub fn hardlink(self, name: &str, target: &str) -> Self {
        self.entry(
            name.as_bytes(),
            OutKind::Hardlink,
            0o644,
            Some(target.as_bytes()),
            b"",
            &[],
        )
    }
    /// `dir/.wh.name`
    pub fn whiteout(self, path: &str) -> Self {
        let (dir, name) = path.rsplit_once('/').map_or(("", path), |(d, n)| (d, n));
        let marker = if dir.is_empty() {
            format!(".wh.{name}")
        } else {
            format!("{dir}/.wh.{name}")
        };
        self.entry(marker.as_bytes(), OutKind::File, 0o644, None, b"", &[])
    }
    pub fn opaque(self, dir: &str) -> Self {
        let marker = format!("{dir}/.wh..wh..opq");
        self.entry(marker.as_bytes(), OutKind::File, 0o644, None, b"", &[])
    }

    /// The tar bytes, with the end-of-archive marker.
    pub fn finish(self) -> Vec<u8> {
        self.w.finish().expect("writing to memory")
    }

    /// The tar bytes without the end-of-archive marker (as `umoci insert` writes).
    pub fn finish_without_footer(self) -> Vec<u8> {
        let mut v = self.finish();
        v.truncate(v.len() - 1024);
        v
    }
}

/// How a crafted layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobCompression {
    Gzip,
    Zstd,
    Plain,
}

pub fn compress_blob(tar: &[u8], how: BlobCompression) -> Vec<u8> {
    match how {
        BlobCompression::Plain => tar.to_vec(),
        BlobCompression::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(tar).expect("memory");
            e.finish().expect("memory")
        }
        BlobCompression::Zstd => zstd::encode_all(tar, 3).expect("memory"),
    }
}

/// A layer as it goes into a layout: the uncompressed tar (for the diff_id) and
/// the blob bytes with the media type that describes them.
pub struct SampleLayer {
    pub tar: Vec<u8>,
    pub blob: Vec<u8>,
    pub media_type: String,
}

impl SampleLayer {
    pub fn new(tar: Vec<u8>, how: BlobCompression) -> Self {
        let media_type = match how {
            BlobCompression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            BlobCompression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
            BlobCompression::Plain => "application/vnd.oci.image.layer.v1.tar",
        };
        let blob = compress_blob(&tar, how);
        SampleLayer {
            tar,
            blob,
            media_type: media_type.into(),
        }
    }
}

/// Bytes shared between the store and every reader it hands out.
#[derive(Clone)]
struct Shared(Arc<Vec<u8>>);

impl AsRef<[u8]> for Shared {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// Layer blobs held in memory, by layer index.
struct MemBlobs(Vec<Shared>);

impl BlobStore for MemBlobs {
    fn open_layer(&self, layer: &LayerDesc) -> Result<Box<dyn Read + Send>> {
        Ok(Box::new(Cursor::new(self.0[layer.index].clone())))
    }
}

/// An image over `layers`, held in memory, described as a registry or layout
/// would: blob digest and size from each blob, diff_id from its tar.
pub fn in_memory_image(layers: &[SampleLayer]) -> ResolvedImage {
    let descs = layers
        .iter()
        .enumerate()
        .map(|(index, l)| LayerDesc {
            index,
            digest: Some(Digest::of_bytes(&l.blob)),
            size: Some(l.blob.len() as u64),
            media_type: l.media_type.clone(),
            diff_id: Digest::of_bytes(&l.tar),
        })
        .collect();
    ResolvedImage {
        reference: "memory".into(),
        repository: None,
        tag: None,
        manifest_digest: None,
        config_digest: None,
        config_json: Vec::new(),
        config: Default::default(),
        platform: Platform::default(),
        layers: descs,
        blobs: Box::new(MemBlobs(
            layers
                .iter()
                .map(|l| Shared(Arc::new(l.blob.clone())))
                .collect(),
        )),
        warnings: Vec::new(),
    }
}

/// Both passes of the flattener into memory: the uncompressed rootfs tar and
/// its counts. `clamp` is `SOURCE_DATE_EPOCH`.
pub fn flatten_in_memory(
    image: &ResolvedImage,
    clamp: Option<u64>,
) -> Result<(Vec<u8>, EmitStats)> {
    let mut index = flatten::index_layers(
        image,
        clamp.unwrap_or(0),
        flatten::Limits::default(),
        1,
        &mut |_, _| {},
    )?;
    let mut out = TarWriter::new(Vec::new());
    let (stats, _) = flatten::emit(
        image,
        &mut index,
        &EmitOptions {
            clamp_mtime: clamp,
            names: flatten::NameStyle::Rootfs,
        },
        &mut out,
        &mut |_| Ok::<(), io::Error>(()),
    )?;
    Ok((out.finish()?, stats))
}

fn put_blob(dir: &Path, bytes: &[u8]) -> Result<Digest> {
    let d = Digest::of_bytes(bytes);
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs)?;
    fs::write(blobs.join(d.hex()), bytes)?;
    Ok(d)
}

/// Writes an OCI layout holding one image tagged `ref_name`, returning the
/// manifest digest. `config_extra` is merged into the image config's `config`.
pub fn write_oci_layout(
    dir: &Path,
    ref_name: &str,
    architecture: &str,
    layers: &[SampleLayer],
    config_extra: serde_json::Value,
) -> Result<Digest> {
    fs::create_dir_all(dir)?;
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let diff_ids: Vec<String> = layers
        .iter()
        .map(|l| Digest::of_bytes(&l.tar).to_string())
        .collect();
    let config = serde_json::json!({
        "architecture": architecture,
        "os": "linux",
        "config": config_extra,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [],
    });
    let config_bytes = serde_json::to_vec(&config)?;
    let config_digest = put_blob(dir, &config_bytes)?;
    let mut layer_descs = Vec::new();
    for l in layers {
        let d = put_blob(dir, &l.blob)?;
        layer_descs.push(serde_json::json!({
            "mediaType": l.media_type, "digest": d.to_string(), "size": l.blob.len(),
        }));
    }
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest.to_string(),
            "size": config_bytes.len(),
        },
        "layers": layer_descs,
    });
    let manifest_bytes = serde_json::to_vec(&manifest)?;
    let manifest_digest = put_blob(dir, &manifest_bytes)?;
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest.to_string(),
            "size": manifest_bytes.len(),
            "annotations": {"org.opencontainers.image.ref.name": ref_name},
        }],
    });
    fs::write(dir.join("index.json"), serde_json::to_vec(&index)?)?;
    Ok(manifest_digest)
}

/// The small image `hakim-convert demo` converts: three layers exercising
/// whiteouts, an opaque directory, hardlinks, symlinked parents, xattrs and a
/// zstd layer. It has an `/sbin/init`, so its template meets every Proxmox rule.
pub fn write_demo_image(dir: &Path) -> Result<Digest> {
    let os_release = "PRETTY_NAME=\"Debian GNU/Linux 13 (trixie)\"\nNAME=\"Debian GNU/Linux\"\n\
                      VERSION_ID=\"13\"\nVERSION_CODENAME=trixie\nID=debian\n";
    let cap: Vec<Xattr> = vec![(
        b"security.capability"[..].into(),
        // VFS_CAP_REVISION_2, effective, CAP_NET_BIND_SERVICE permitted.
        b"\x01\x00\x00\x02\x00\x04\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"[..]
            .into(),
    )];
    let base = LayerBuilder::new()
        .dir("./", 0o755)
        .dir("etc/", 0o755)
        .dir("usr/", 0o755)
        .dir("usr/lib/", 0o755)
        .dir("usr/bin/", 0o755)
        .symlink("lib", "usr/lib")
        .symlink("bin", "usr/bin")
        .file("usr/lib/os-release", os_release)
        .symlink("etc/os-release", "../usr/lib/os-release")
        .file("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n")
        .file_mode("usr/bin/tool", "#!/bin/sh\necho tool\n", 0o755)
        // An init, as Proxmox boots `/sbin/init` (here through a merged-/usr link).
        .dir("usr/sbin/", 0o755)
        .symlink("sbin", "usr/sbin")
        .file_mode("usr/sbin/init", "#!/bin/sh\nexec sleep infinity\n", 0o755)
        .hardlink("usr/bin/tool-alias", "usr/bin/tool")
        .dir("var/", 0o755)
        .dir("var/cache/", 0o755)
        .file("var/cache/big.bin", "cached\n")
        .dir("tmp/", 0o1777)
        .finish();
    let middle = LayerBuilder::new()
        .whiteout("var/cache/big.bin")
        .dir("var/cache/", 0o700)
        .opaque("etc")
        .dir("etc/", 0o755)
        .file(
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\ncoder:x:1000:1000::/home/coder:/bin/sh\n",
        )
        .symlink("etc/os-release", "../usr/lib/os-release")
        .file("lib/libdemo.so", "not really a library\n")
        .finish();
    let top = LayerBuilder::new()
        .owner(1000, 1000)
        .dir("home/", 0o755)
        .dir("home/coder/", 0o750)
        .file("home/coder/.profile", "export PATH=$HOME/bin:$PATH\n")
        .owner(0, 0)
        .entry(
            b"usr/bin/ping-ish",
            OutKind::File,
            0o755,
            None,
            b"#!/bin/sh\n",
            &cap,
        )
        .whiteout("usr/bin/tool")
        .finish();
    write_oci_layout(
        dir,
        "ghcr.io/shekohex/hakim-demo:latest",
        "amd64",
        &[
            SampleLayer::new(base, BlobCompression::Gzip),
            SampleLayer::new(middle, BlobCompression::Plain),
            SampleLayer::new(top, BlobCompression::Zstd),
        ],
        serde_json::json!({"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]}),
    )
}

//! `pve-oci-extract ARCHIVE ROOTFS`: unpacks an OCI archive into ROOTFS the way Proxmox VE 9.1
//! does when it creates a container from one (its `proxmox-oci` crate), and prints the image
//! config's `config` object (Entrypoint, Env, StopSignal, …) as JSON on stdout.
//!
//! What it replays, because each is a way an archive can work elsewhere and fail on Proxmox:
//!
//! * the archive is read as a plain tar; blobs are found by their exact member names
//!   `blobs/<algorithm>/<hex>` and `index.json` must be a member;
//! * the first index entry whose media type is the OCI image manifest (and whose platform, if
//!   any, is amd64) is used; the config must have the OCI config media type;
//! * layers are matched to `rootfs.diff_ids` by decompressing them: only OCI layer media types
//!   count (Docker ones are skipped, which then fails as an unknown diff_id); gzip is read as a
//!   single member (`GzDecoder`, not `MultiGzDecoder`) — a multi-member layer would come out
//!   short and fail to match;
//! * each layer's whiteouts are applied first, then its members are unpacked with the `tar`
//!   crate keeping owners, modes and every xattr, directories last (deepest first).
//!
//! The test harness runs it through `lxc-usernsexec` for unprivileged containers, as Proxmox
//! runs its extraction in the container's user namespace. Every failure exits 1 with a message.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;
use serde_json::Value;
use sha2::{Digest, Sha256};

const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
const LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

type Result<T> = std::result::Result<T, String>;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 3 {
        eprintln!("usage: pve-oci-extract ARCHIVE ROOTFS");
        std::process::exit(2);
    }
    match extract(Path::new(&args[1]), Path::new(&args[2])) {
        Ok(config) => println!("{config}"),
        Err(e) => {
            eprintln!("pve-oci-extract: {e}");
            std::process::exit(1);
        }
    }
}

/// Member name → byte range in the archive.
struct OciTar {
    file: File,
    members: HashMap<PathBuf, (u64, u64)>,
}

impl OciTar {
    fn open(path: &Path) -> Result<OciTar> {
        let file = File::open(path).map_err(|e| format!("open {}: {e}", path.display()))?;
        let mut archive = tar::Archive::new(file);
        let mut members = HashMap::new();
        for entry in archive
            .entries_with_seek()
            .map_err(|e| format!("read archive: {e}"))?
        {
            let entry = entry.map_err(|e| format!("read archive member: {e}"))?;
            let name = entry
                .path()
                .map_err(|e| format!("member name: {e}"))?
                .into_owned();
            members.insert(
                name,
                (
                    entry.raw_file_position(),
                    entry.header().size().unwrap_or(0),
                ),
            );
        }
        Ok(OciTar {
            file: archive.into_inner(),
            members,
        })
    }

    fn member(&mut self, name: &str) -> Result<std::io::Take<&mut File>> {
        let (offset, size) = *self
            .members
            .get(Path::new(name))
            .ok_or_else(|| format!("member {name} is missing"))?;
        self.file
            .seek(SeekFrom::Start(offset))
            .map_err(|e| e.to_string())?;
        Ok((&mut self.file).take(size))
    }

    fn blob(&mut self, digest: &str) -> Result<std::io::Take<&mut File>> {
        let (algorithm, hex) = digest
            .split_once(':')
            .ok_or_else(|| format!("malformed digest {digest}"))?;
        self.member(&format!("blobs/{algorithm}/{hex}"))
    }

    fn json(&mut self, name_or_digest: &str, is_blob: bool) -> Result<Value> {
        let mut bytes = Vec::new();
        let mut r = if is_blob {
            self.blob(name_or_digest)?
        } else {
            self.member(name_or_digest)?
        };
        r.read_to_end(&mut bytes).map_err(|e| e.to_string())?;
        serde_json::from_slice(&bytes).map_err(|e| format!("{name_or_digest}: not JSON: {e}"))
    }
}

/// Opens a layer blob decompressed as Proxmox does, or `None` for media types it skips.
fn layer_reader<'a>(
    tar: &'a mut OciTar,
    digest: &str,
    media_type: &str,
) -> Result<Option<Box<dyn Read + 'a>>> {
    Ok(match media_type {
        LAYER_TAR => Some(Box::new(tar.blob(digest)?)),
        LAYER_GZIP => Some(Box::new(GzDecoder::new(tar.blob(digest)?))),
        t if t.starts_with("application/vnd.oci.image.layer.") => {
            return Err(format!("layer media type {t} is not replayed here"))
        }
        _ => None,
    })
}

fn extract(archive: &Path, rootfs: &Path) -> Result<Value> {
    let mut tar = OciTar::open(archive)?;
    let index = tar.json("index.json", false)?;
    let entry = index["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|d| {
            d["mediaType"] == MANIFEST
                && d["platform"]["architecture"]
                    .as_str()
                    .is_none_or(|a| a == "amd64")
        })
        .ok_or("index.json has no OCI image manifest for amd64")?
        .clone();
    let manifest = tar.json(entry["digest"].as_str().unwrap_or(""), true)?;
    if manifest["config"]["mediaType"] != CONFIG {
        return Err(format!(
            "config media type {} is not {CONFIG}",
            manifest["config"]["mediaType"]
        ));
    }
    let config = tar.json(manifest["config"]["digest"].as_str().unwrap_or(""), true)?;

    // diff_id → (blob digest, media type), hashing each layer's decompressed bytes.
    let mut by_diff_id = HashMap::new();
    for layer in manifest["layers"].as_array().into_iter().flatten() {
        let digest = layer["digest"].as_str().unwrap_or("").to_string();
        let media_type = layer["mediaType"].as_str().unwrap_or("").to_string();
        let Some(mut r) = layer_reader(&mut tar, &digest, &media_type)? else {
            continue;
        };
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = r.read(&mut buf).map_err(|e| format!("{digest}: {e}"))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        drop(r);
        let diff_id = format!("sha256:{}", hex::encode(hasher.finalize()));
        by_diff_id.insert(diff_id, (digest, media_type));
    }

    for diff_id in config["rootfs"]["diff_ids"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let diff_id = diff_id.as_str().unwrap_or("");
        let (digest, media_type) = by_diff_id
            .get(diff_id)
            .ok_or_else(|| format!("unknown layer digest {diff_id} in rootfs.diff_ids"))?
            .clone();
        let r = layer_reader(&mut tar, &digest, &media_type)?.expect("a layer type");
        apply_whiteouts(r, rootfs).map_err(|e| format!("{digest}: whiteouts: {e}"))?;
        let r = layer_reader(&mut tar, &digest, &media_type)?.expect("a layer type");
        unpack(r, rootfs).map_err(|e| format!("{digest}: unpack: {e}"))?;
    }
    Ok(config["config"].clone())
}

fn is_whiteout(name: &std::ffi::OsStr) -> bool {
    name.to_str().is_some_and(|n| n.starts_with(WHITEOUT))
}

/// Removes what this layer's `.wh.NAME` and `.wh..wh..opq` members hide below it.
fn apply_whiteouts(reader: impl Read, rootfs: &Path) -> std::io::Result<()> {
    let mut archive = tar::Archive::new(reader);
    for entry in archive.entries()? {
        let entry = entry?;
        if entry.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let path = entry.path()?.into_owned();
        let (Some(name), Some(parent)) = (path.file_name(), path.parent()) else {
            continue;
        };
        if name == OPAQUE {
            let dir = rootfs.join(parent);
            if dir.is_dir() {
                for child in fs::read_dir(&dir)? {
                    remove(&child?.path())?;
                }
            }
        } else if let Some(hidden) = name.to_str().and_then(|n| n.strip_prefix(WHITEOUT)) {
            if hidden == "." || hidden == ".." || hidden.is_empty() {
                continue;
            }
            let target = rootfs.join(parent).join(hidden);
            if target.symlink_metadata().is_ok() {
                remove(&target)?;
            }
        }
    }
    Ok(())
}

fn remove(path: &Path) -> std::io::Result<()> {
    if path.symlink_metadata()?.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    }
}

/// Unpacks every member but whiteouts, keeping owners, modes and xattrs; directories are
/// applied last, deepest first, so a read-only directory does not block its own contents.
fn unpack(reader: impl Read, rootfs: &Path) -> std::io::Result<()> {
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_permissions(true);
    archive.set_unpack_xattrs(true);
    let mut directories = Vec::new();
    for entry in archive.entries()? {
        let mut entry = entry?;
        let kind = entry.header().entry_type();
        if kind == tar::EntryType::Directory {
            directories.push(entry);
            continue;
        }
        if kind == tar::EntryType::Regular && entry.path()?.file_name().is_some_and(is_whiteout) {
            continue;
        }
        entry.unpack_in(rootfs)?;
    }
    directories.sort_by(|a, b| b.path_bytes().cmp(&a.path_bytes()));
    for mut dir in directories {
        dir.unpack_in(rootfs)?;
    }
    Ok(())
}

//! Helpers for the fixture tests: craft an image from layers, convert it with the
//! library, and list the artifact member by member.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};

use hakim_convert::compress::OutputCompression;
use hakim_convert::convert::{convert, ConvertOptions, Summary};
use hakim_convert::sample::{write_oci_layout, SampleLayer};

pub mod fuzz_seeds;
pub mod images;

pub struct Fixture {
    pub dir: tempfile::TempDir,
}

impl Fixture {
    pub fn new(layers: &[SampleLayer]) -> Self {
        fuzz_seeds::layers(layers);
        let dir = tempfile::tempdir().unwrap();
        write_oci_layout(
            &dir.path().join("layout"),
            "hakim-fixture:1",
            "amd64",
            layers,
            serde_json::json!({}),
        )
        .unwrap();
        Fixture { dir }
    }

    pub fn layout(&self) -> PathBuf {
        self.dir.path().join("layout")
    }

    pub fn out(&self) -> PathBuf {
        self.dir.path().join("out")
    }

    pub fn options(&self, compression: OutputCompression) -> ConvertOptions {
        fuzz_seeds::layout(&self.layout());
        ConvertOptions {
            compression,
            threads: Some(1),
            name: Some("fixture".into()),
            ..ConvertOptions::new(format!("oci:{}:1", self.layout().display()), self.out())
        }
    }

    pub fn convert(&self) -> Result<Summary, String> {
        let s = convert(&self.options(OutputCompression::None)).map_err(|e| format!("{e:#}"))?;
        assert_convert_matches_verify(&s);
        Ok(s)
    }

    /// Files left in the output directory, hidden ones included.
    pub fn outputs(&self) -> Vec<String> {
        let Ok(rd) = std::fs::read_dir(self.out()) else {
            return Vec::new();
        };
        let mut v: Vec<String> = rd
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

/// A minimal static x86-64 ELF header: enough for the converter's checks.
pub fn fake_init(dir: &Path, machine: u16, dynamic: bool) -> PathBuf {
    let mut b = vec![0u8; 64 + 56];
    b[..4].copy_from_slice(b"\x7fELF");
    b[4] = 2;
    b[5] = 1;
    b[6] = 1;
    b[16] = 2; // ET_EXEC
    b[18..20].copy_from_slice(&machine.to_le_bytes());
    b[32..40].copy_from_slice(&64u64.to_le_bytes());
    b[54..56].copy_from_slice(&56u16.to_le_bytes());
    b[56..58].copy_from_slice(&1u16.to_le_bytes());
    let p_type: u32 = if dynamic { 3 } else { 1 };
    b[64..68].copy_from_slice(&p_type.to_le_bytes());
    let path = dir.join(format!("init-{machine}-{dynamic}"));
    std::fs::write(&path, &b).unwrap();
    path
}

/// Proxmox's acceptance rules: the rules `convert` announced for an artifact
/// (`Summary::proxmox`) are exactly those `verify` reports as WARN or FAIL on
/// it, with the same status, and each announcement names its fix.
pub fn assert_convert_matches_verify(s: &Summary) {
    use hakim_convert::verify::{verify, Status};
    let report = verify(&s.artifact).unwrap();
    let key = |c: &hakim_convert::acceptance::Check| format!("{} [{:?}]", c.rule, c.status);
    let mut refused: Vec<String> = report
        .checks
        .iter()
        .filter(|c| c.status != Status::Pass)
        .map(key)
        .collect();
    let mut announced: Vec<String> = s.proxmox.iter().map(key).collect();
    refused.sort();
    announced.sort();
    assert_eq!(
        refused,
        announced,
        "{}: verify's WARN/FAIL (left) differ from convert's announcements (right)",
        s.artifact.display()
    );
    for c in &s.proxmox {
        assert!(c.fix.is_some(), "announced without a fix: {c:?}");
        assert!(
            s.warnings.contains(&c.announce()),
            "not in the warnings: {}",
            c.announce()
        );
    }
}

/// Proxmox's extraction of a rootfs template, flags and all, into `into`.
pub fn pve_extract(artifact: &Path, into: &Path) {
    std::fs::create_dir_all(into).unwrap();
    let out = std::process::Command::new("tar")
        .args([
            "xpf",
            "-",
            "--numeric-owner",
            "--acls",
            "--xattrs",
            "--xattrs-include=user.*",
            "--xattrs-include=security.capability",
            "--skip-old-files",
            "--anchored",
            "--exclude",
            "./dev/*",
        ])
        .current_dir(into)
        .stdin(std::fs::File::open(artifact).unwrap())
        .output()
        .expect("GNU tar is needed for this test");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One line per member: `NAME TYPE MODE UID:GID DETAIL`, in archive order.
/// TYPE: d dir, f file (DETAIL = content), l symlink (DETAIL = -> target),
/// h hardlink (DETAIL = => target), p fifo.
pub fn listing(tar_path: &Path) -> Vec<String> {
    let mut ar = tar::Archive::new(std::fs::File::open(tar_path).unwrap());
    let mut out = Vec::new();
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let name = String::from_utf8_lossy(&e.path_bytes()).into_owned();
        let h = e.header().clone();
        let mode = h.mode().unwrap();
        let ids = format!("{}:{}", h.uid().unwrap(), h.gid().unwrap());
        let link = e
            .link_name_bytes()
            .map(|l| String::from_utf8_lossy(&l).into_owned())
            .unwrap_or_default();
        let line = match h.entry_type() {
            tar::EntryType::Directory => format!("{name} d {mode:o} {ids}"),
            tar::EntryType::Regular => {
                let mut s = String::new();
                e.read_to_string(&mut s).unwrap();
                format!("{name} f {mode:o} {ids} ={s}")
            }
            tar::EntryType::Symlink => format!("{name} l -> {link}"),
            tar::EntryType::Link => format!("{name} h => {link}"),
            tar::EntryType::Fifo => format!("{name} p {mode:o} {ids}"),
            other => format!("{name} ?{other:?}"),
        };
        out.push(line);
    }
    out
}

/// Converts and lists, panicking with the error if conversion fails.
pub fn flatten(layers: &[SampleLayer]) -> Vec<String> {
    let f = Fixture::new(layers);
    let summary = f
        .convert()
        .unwrap_or_else(|e| panic!("conversion failed: {e}"));
    listing(&summary.artifact)
}

/// Converts and returns the error message, asserting nothing was left behind.
pub fn flatten_err(layers: &[SampleLayer]) -> String {
    let f = Fixture::new(layers);
    let err = match f.convert() {
        Ok(s) => panic!(
            "conversion unexpectedly succeeded: {:?}",
            listing(&s.artifact)
        ),
        Err(e) => e,
    };
    assert!(
        f.outputs().is_empty(),
        "files left behind: {:?}",
        f.outputs()
    );
    err
}

/// Members that are not directories (most expectations only care about those).
pub fn non_dirs(listing: &[String]) -> Vec<String> {
    listing
        .iter()
        .filter(|l| l.split(' ').nth(1).is_none_or(|t| t != "d"))
        .cloned()
        .collect()
}

/// Reads a blob of a layout by digest string.
pub fn read_blob(layout: &Path, digest: &str) -> Vec<u8> {
    let hex = digest.strip_prefix("sha256:").unwrap();
    std::fs::read(layout.join("blobs/sha256").join(hex)).unwrap()
}

/// Writes a blob into a layout, returning `(digest, size)`.
pub fn write_blob(layout: &Path, bytes: &[u8]) -> (String, usize) {
    let d = hakim_convert::digest::Digest::of_bytes(bytes);
    std::fs::write(layout.join("blobs/sha256").join(d.hex()), bytes).unwrap();
    (d.to_string(), bytes.len())
}

/// The single manifest of a layout written by `write_oci_layout`.
pub fn manifest_of(layout: &Path) -> serde_json::Value {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let d = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    serde_json::from_slice(&read_blob(layout, &d)).unwrap()
}

/// Rewrites the manifest (and, through `edit_config`, the config) of a layout,
/// keeping every digest consistent so only the intended fault remains.
pub fn rewrite_image(
    layout: &Path,
    edit_config: impl FnOnce(&mut serde_json::Value),
    edit_manifest: impl FnOnce(&mut serde_json::Value),
) {
    let mut manifest = manifest_of(layout);
    let mut config: serde_json::Value = serde_json::from_slice(&read_blob(
        layout,
        manifest["config"]["digest"].as_str().unwrap(),
    ))
    .unwrap();
    edit_config(&mut config);
    let (cd, cs) = write_blob(layout, &serde_json::to_vec(&config).unwrap());
    manifest["config"]["digest"] = cd.into();
    manifest["config"]["size"] = cs.into();
    edit_manifest(&mut manifest);
    let (md, ms) = write_blob(layout, &serde_json::to_vec(&manifest).unwrap());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": md, "size": ms,
            "annotations": {"org.opencontainers.image.ref.name": "hakim-fixture:1"},
        }],
    });
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
}

/// The raw bytes of an old GNU sparse member (`S`, as `tar --sparse
/// --format=gnu` writes it), built by hand: `chunks` are `(offset, data)` in
/// order (all but the last a multiple of 512 bytes long); a trailing hole
/// gets GNU tar's closing empty chunk at `real_size`; past four chunks the map
/// continues in extension blocks. No end-of-archive marker.
pub fn gnu_sparse_member(name: &str, real_size: u64, chunks: &[(u64, &[u8])]) -> Vec<u8> {
    let mut pairs: Vec<(u64, u64)> = chunks.iter().map(|(o, d)| (*o, d.len() as u64)).collect();
    if pairs.last().map_or(0, |&(o, l)| o + l) < real_size {
        pairs.push((real_size, 0));
    }
    let stored: u64 = pairs.iter().map(|p| p.1).sum();
    let mut h = tar::Header::new_gnu();
    h.set_path(name).unwrap();
    h.set_entry_type(tar::EntryType::GNUSparse);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h.set_size(stored);
    let gnu = h.as_gnu_mut().unwrap();
    for (slot, &(offset, len)) in gnu.sparse.iter_mut().zip(&pairs) {
        slot.set_offset(offset);
        slot.set_length(len);
    }
    gnu.set_real_size(real_size);
    gnu.set_is_extended(pairs.len() > 4);
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    let rest: Vec<&[(u64, u64)]> = pairs.get(4..).unwrap_or_default().chunks(21).collect();
    for (i, block) in rest.iter().enumerate() {
        let mut ext = tar::GnuExtSparseHeader::new();
        for (slot, &(offset, len)) in ext.sparse_mut().iter_mut().zip(block.iter()) {
            slot.set_offset(offset);
            slot.set_length(len);
        }
        ext.set_is_extended(i + 1 < rest.len());
        out.extend_from_slice(ext.as_bytes());
    }
    for (_, data) in chunks {
        out.extend_from_slice(data);
    }
    out.resize(out.len().div_ceil(512) * 512, 0);
    out
}

/// Total bytes of the files in `dir` (hidden ones included), 0 if it is missing.
pub fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

//! `hakim-convert verify` on crafted artifacts: a good baseline passes, and each
//! fault fails exactly the rule written for it.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};

use hakim_convert::digest::Digest;
use hakim_convert::sample::LayerBuilder;
use hakim_convert::tarout::OutKind;
use hakim_convert::verify::{verify, Report, Status};
use serde_json::{json, Value};

fn failed(report: &Report) -> Vec<String> {
    report.failures().map(|c| c.rule.clone()).collect()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    common::fuzz_seeds::artifact(bytes);
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn good_rootfs() -> LayerBuilder {
    LayerBuilder::new()
        .dir("./", 0o755)
        .dir("./etc/", 0o755)
        .file("./etc/os-release", "ID=debian\n")
        .dir("./usr/", 0o755)
        .dir("./usr/sbin/", 0o755)
        .symlink("./sbin", "usr/sbin")
        .file_mode("./usr/sbin/hakim-init", "ELF", 0o755)
        .symlink("./usr/sbin/init", "hakim-init")
}

/// Exactly the listed rules fail (prefix match on the rule text).
fn assert_fails(path: &Path, rules: &[&str]) {
    let report = verify(path).unwrap();
    let got = failed(&report);
    assert_eq!(
        got.len(),
        rules.len(),
        "{}: expected failures {rules:?}, got {got:?}",
        path.display()
    );
    for r in rules {
        assert!(
            got.iter().any(|g| g.starts_with(r)),
            "{}: expected '{r}' to fail, got {got:?}",
            path.display()
        );
    }
}

#[test]
fn rootfs_rules() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = write(d, "good.tar", &good_rootfs().finish());
    let r = verify(&good).unwrap();
    assert_eq!(r.kind, "rootfs");
    assert!(r.passed(), "{:#?}", r.checks);
    assert!(r
        .checks
        .iter()
        .any(|c| c.rule.starts_with("sha256sums") && c.status == Status::Warn));

    // A compressed copy reads the same.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&good_rootfs().finish()).unwrap();
    let gz = gz.finish().unwrap();
    assert!(verify(&write(d, "good.tar.gz", &gz)).unwrap().passed());
    let truncated = write(d, "cut.tar.gz", &gz[..gz.len() / 2]);
    assert_fails(&truncated, &["the archive decompresses"]);

    let cases: Vec<(&str, LayerBuilder, &[&str])> = vec![
        (
            "no-prefix",
            good_rootfs().file("etc/hostname", "x"),
            &["names start with ./"],
        ),
        (
            "dup",
            good_rootfs().file("./etc/os-release", "ID=other\n"),
            &["no path appears twice"],
        ),
        (
            "xattr",
            good_rootfs().entry(
                b"./etc/x",
                OutKind::File,
                0o644,
                None,
                b"",
                &[(b"trusted.overlay".to_vec().into(), b"y".to_vec().into())],
            ),
            &["only user.* and security.capability"],
        ),
        (
            "ids",
            good_rootfs().owner(70000, 0).file("./etc/big", ""),
            &["uid/gid below 65536"],
        ),
        (
            "link-order",
            good_rootfs()
                .hardlink("./etc/alias", "./etc/later")
                .file("./etc/later", "x"),
            &["hardlink targets precede"],
        ),
        (
            "whiteout",
            good_rootfs().whiteout("./etc/gone"),
            &["no whiteout"],
        ),
        (
            "first",
            LayerBuilder::new()
                .dir("./etc/", 0o755)
                .dir("./", 0o755)
                .dir("./sbin/", 0o755)
                .file_mode("./sbin/init", "ELF", 0o755)
                .file("./etc/os-release", "ID=debian\n"),
            &["the first member is ./"],
        ),
        (
            "init-dangling",
            LayerBuilder::new()
                .dir("./", 0o755)
                .dir("./sbin/", 0o755)
                .symlink("./sbin/init", "/lib/systemd/systemd"),
            &["/sbin/init resolves"],
        ),
        (
            "init-not-exec",
            LayerBuilder::new()
                .dir("./", 0o755)
                .dir("./sbin/", 0o755)
                .file("./sbin/init", "text"),
            &["/sbin/init resolves"],
        ),
    ];
    for (name, builder, rules) in cases {
        let p = write(d, &format!("{name}.tar"), &builder.finish());
        assert_fails(&p, rules);
    }

    // A device node, written with the tar crate (our writer has no devices).
    let mut b = tar::Builder::new(Vec::new());
    b.append(
        &raw_header("./", tar::EntryType::Directory, 0o755, 0),
        &[][..],
    )
    .unwrap();
    let mut h = raw_header("./null", tar::EntryType::Char, 0o666, 0);
    h.set_device_major(1).unwrap();
    h.set_device_minor(3).unwrap();
    h.set_cksum();
    b.append(&h, &[][..]).unwrap();
    let p = write(d, "device.tar", &b.into_inner().unwrap());
    assert_fails(&p, &["no device nodes", "/sbin/init resolves"]);

    // sha256sums.txt: listed with the wrong hash fails, the right one passes.
    let sums = d.join("sha256sums.txt");
    std::fs::write(&sums, format!("{}  good.tar\n", "0".repeat(64))).unwrap();
    assert_fails(&good, &["sha256sums.txt"]);
    let hash = Digest::of_bytes(&std::fs::read(&good).unwrap());
    std::fs::write(&sums, format!("{}  good.tar\n", hash.hex())).unwrap();
    assert!(verify(&good).unwrap().passed());
    std::fs::write(&sums, format!("{}  other.tar\n", hash.hex())).unwrap();
    assert_fails(&good, &["sha256sums.txt"]);
}

/// A header whose name is stored byte for byte (the tar crate's `set_path`
/// would drop a leading `./`).
fn raw_header(name: &str, ty: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    h.set_entry_type(ty);
    h.set_mode(mode);
    h.set_size(size);
    h.set_cksum();
    h
}

/// The parts of a one-layer OCI archive, each open to a fault.
struct Parts {
    layer_tar: Vec<u8>,
    layer_blob: Vec<u8>,
    layer_type: String,
    config: Value,
    extra_manifests: usize,
    prefix: &'static str,
    corrupt_layer_after_naming: bool,
}

impl Parts {
    fn good() -> Self {
        let layer_tar = LayerBuilder::new()
            .dir("etc/", 0o755)
            .file("etc/os-release", "ID=debian\n")
            .finish();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&layer_tar).unwrap();
        let layer_blob = gz.finish().unwrap();
        let config = json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {"Entrypoint": ["/usr/local/sbin/hakim-init"], "Cmd": []},
            "rootfs": {"type": "layers", "diff_ids": [Digest::of_bytes(&layer_tar).to_string()]},
            "history": [{"created_by": "test"}],
        });
        Parts {
            layer_tar,
            layer_blob,
            layer_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            config,
            extra_manifests: 0,
            prefix: "",
            corrupt_layer_after_naming: false,
        }
    }

    fn build(&self) -> Vec<u8> {
        let _ = &self.layer_tar;
        let config = serde_json::to_vec(&self.config).unwrap();
        let cd = Digest::of_bytes(&config);
        let ld = Digest::of_bytes(&self.layer_blob);
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": cd.to_string(), "size": config.len()},
            "layers": [{"mediaType": self.layer_type, "digest": ld.to_string(),
                        "size": self.layer_blob.len()}],
        }))
        .unwrap();
        let md = Digest::of_bytes(&manifest);
        let desc = json!({"mediaType": "application/vnd.oci.image.manifest.v1+json",
                          "digest": md.to_string(), "size": manifest.len()});
        let index = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "manifests": vec![desc; 1 + self.extra_manifests],
        }))
        .unwrap();
        let mut layer = self.layer_blob.clone();
        if self.corrupt_layer_after_naming {
            let n = layer.len();
            layer[n - 9] ^= 0xff; // inside the gzip trailer's CRC: digest changes
        }
        let mut b = tar::Builder::new(Vec::new());
        let p = self.prefix;
        for (name, data) in [
            (
                format!("{p}oci-layout"),
                br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
            ),
            (format!("{p}blobs/sha256/{}", ld.hex()), layer),
            (format!("{p}blobs/sha256/{}", cd.hex()), config),
            (format!("{p}blobs/sha256/{}", md.hex()), manifest),
            (format!("{p}index.json"), index),
        ] {
            let h = raw_header(&name, tar::EntryType::Regular, 0o644, data.len() as u64);
            b.append(&h, &data[..]).unwrap();
        }
        b.into_inner().unwrap()
    }
}

#[test]
fn oci_archive_rules() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = write(d, "good.tar", &Parts::good().build());
    let r = verify(&good).unwrap();
    assert_eq!(r.kind, "oci-archive");
    assert!(r.passed(), "{:#?}", r.checks);

    let mut p = Parts::good();
    p.layer_type = "application/vnd.docker.image.rootfs.diff.tar.gzip".into();
    assert_fails(
        &write(d, "docker.tar", &p.build()),
        &["OCI media types only"],
    );

    let mut p = Parts::good();
    p.config.as_object_mut().unwrap().remove("history");
    assert_fails(
        &write(d, "nohist.tar", &p.build()),
        &["config has architecture"],
    );

    let mut p = Parts::good();
    p.config["rootfs"]["diff_ids"] = json!([Digest::of_bytes(b"other").to_string()]);
    assert_fails(
        &write(d, "diffid.tar", &p.build()),
        &["layer 1: digest, size and diff_id"],
    );

    let mut p = Parts::good();
    p.config["rootfs"]["diff_ids"] = json!([]);
    assert_fails(
        &write(d, "count.tar", &p.build()),
        &["one diff_id per layer", "layer 1: digest, size and diff_id"],
    );

    let mut p = Parts::good();
    let (a, b) = p.layer_tar.split_at(512);
    let mut multi = Vec::new();
    for part in [a, b] {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(part).unwrap();
        multi.extend(e.finish().unwrap());
    }
    p.layer_blob = multi;
    assert_fails(
        &write(d, "multi.tar", &p.build()),
        &["layer 1: gzip is a single member"],
    );

    let mut p = Parts::good();
    p.extra_manifests = 1;
    assert_fails(
        &write(d, "two.tar", &p.build()),
        &["index.json holds exactly one"],
    );

    let mut p = Parts::good();
    p.corrupt_layer_after_naming = true;
    assert_fails(
        &write(d, "corrupt.tar", &p.build()),
        &["layer 1: digest, size and diff_id"],
    );

    // `./` names: Proxmox would not take it for an OCI archive.
    let mut p = Parts::good();
    p.prefix = "./";
    let prefixed = write(d, "prefixed.tar", &p.build());
    assert_eq!(verify(&prefixed).unwrap().kind, "oci-archive");
    assert_fails(
        &prefixed,
        &["members are oci-layout", "oci-layout and index.json"],
    );

    // A compressed outer tar is a rootfs as far as Proxmox is concerned, and
    // fails as one.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&Parts::good().build()).unwrap();
    let r = verify(&write(d, "oci.tar.gz", &gz.finish().unwrap())).unwrap();
    assert_eq!(r.kind, "rootfs");
    assert!(!r.passed());
}

//! Agent-native artifacts from the real test image (`ci/build-test-image.sh`), checked by tools
//! other than ours:
//!
//! * the OCI archive (`--format oci-archive --inject-init`) is read by `skopeo copy
//!   oci-archive:…` (what Proxmox's `oci-registry-pull` stores is exactly such an archive) and
//!   unpacked by `umoci raw unpack`;
//! * the rootfs template (`--inject-init`) is extracted by GNU tar with Proxmox's flags;
//! * both trees must be identical, `--keep-layers` must unpack to the same tree again, and every
//!   artifact passes `hakim-convert verify`, while a corrupted copy fails it.
//!
//! The injected content itself (init binary bytes, `/sbin/init`, image.env from the real
//! config, no SSH host keys, empty machine-id) is checked on the extracted trees.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use hakim_e2e::tree::{self, Mtime, Options, Tree};
use hakim_e2e::{
    converter_bin, proxmox_extract, ready, run_ok, scratch_dir, show, test_image, Compression,
};

fn init_binary() -> PathBuf {
    hakim_e2e::lxc::binaries().init.clone()
}

/// `hakim-convert convert SOURCE -o OUT ARGS… --json`; returns the artifact path and the JSON.
fn convert(out: &Path, args: &[&str]) -> (PathBuf, serde_json::Value) {
    let mut cmd = Command::new(converter_bin());
    cmd.arg("convert")
        .arg(test_image().oci_ref())
        .arg("-o")
        .arg(out)
        .arg("--inject-init")
        .arg(init_binary())
        .arg("--json")
        .args(args)
        .env("SOURCE_DATE_EPOCH", "1750000000");
    let o = run_ok(&mut cmd);
    let json: serde_json::Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("{}: not JSON: {e}", show(&cmd)));
    (PathBuf::from(json["artifact"].as_str().unwrap()), json)
}

fn verify_ok(artifact: &Path) {
    let mut cmd = Command::new(converter_bin());
    cmd.arg("verify").arg(artifact);
    let o = run_ok(&mut cmd);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(!text.contains("FAIL"), "{text}");
}

/// skopeo (as Proxmox's pull stores it) → OCI layout → umoci raw unpack.
fn unpack_with_umoci(archive: &Path, tag: &str) -> (tempfile::TempDir, PathBuf) {
    let work = scratch_dir("umoci-");
    let layout = work.path().join("layout");
    run_ok(
        Command::new("skopeo")
            .args(["copy", "-q"])
            .arg(format!("oci-archive:{}:{tag}", archive.display()))
            .arg(format!("oci:{}:x", layout.display())),
    );
    let rootfs = work.path().join("rootfs");
    run_ok(
        Command::new("umoci")
            .args(["raw", "unpack", "--image"])
            .arg(format!("{}:x", layout.display()))
            .arg(&rootfs),
    );
    (work, rootfs)
}

fn scan(root: &Path) -> Tree {
    let mut t = Tree::scan(root, &|rel, _| {
        rel.starts_with("dev") && rel != Path::new("dev")
    });
    t.entries.remove(Path::new("."));
    t
}

const SAME: Options = Options {
    mtime: Mtime::Exact,
    dir_mtime: Mtime::Ignore,
};

#[test]
fn oci_archive_and_rootfs_unpack_to_the_same_injected_tree() {
    if !ready() {
        return;
    }
    let out = scratch_dir("agent-native-");
    let (archive, json) = convert(
        out.path(),
        &[
            "--format",
            "oci-archive",
            "--variant",
            "test",
            "--tag",
            "e2e",
        ],
    );
    assert_eq!(
        archive.file_name().unwrap(),
        "hakim-test_e2e.tar",
        "the name Proxmox's oci-registry-pull would give"
    );
    assert_eq!(json["format"], "oci-archive");
    verify_ok(&archive);
    let (rootfs, _) = convert(
        out.path(),
        &["--compression", "zstd", "--name", "hakim-test-rootfs"],
    );
    verify_ok(&rootfs);
    let (kept, kept_json) = convert(
        out.path(),
        &[
            "--format",
            "oci-archive",
            "--keep-layers",
            "--name",
            "kept",
            "--tag",
            "e2e",
        ],
    );
    verify_ok(&kept);
    let source_layers = json["source"]["layers"].as_array().unwrap().len();
    assert_eq!(
        kept_json["oci"]["layers"].as_array().unwrap().len(),
        source_layers + 1
    );

    let (_w1, from_oci) = unpack_with_umoci(&archive, "e2e");
    let extracted = proxmox_extract(&rootfs, Compression::Zstd);
    let mut oci_tree = scan(&from_oci);
    let rootfs_tree = scan(extracted.path());
    // umoci drops xattrs whose value is empty (see EMPTY_XATTRS_LOST_BY_UMOCI in convert.rs);
    // the layer does carry it: put it back before comparing with GNU tar's result.
    let flattened_by_umoci = scan(&from_oci);
    if let Some(e) = oci_tree.entries.get_mut(Path::new("opt/xattr-dir/file")) {
        e.xattrs.entry("user.test".to_string()).or_default();
    }
    tree::assert_same(&oci_tree, &rootfs_tree, SAME, "OCI archive vs rootfs");
    let (_w2, from_kept) = unpack_with_umoci(&kept, "e2e");
    // Kept layers are the source's bytes: their mtimes are not clamped to
    // SOURCE_DATE_EPOCH and their device nodes are still there (LXC ignores
    // them); everything else must match.
    let mut kept_tree = scan(&from_kept);
    kept_tree
        .entries
        .retain(|_, e| !matches!(e.kind, tree::Kind::CharDevice | tree::Kind::BlockDevice));
    tree::assert_same(
        &flattened_by_umoci,
        &kept_tree,
        Options {
            mtime: Mtime::Ignore,
            dir_mtime: Mtime::Ignore,
        },
        "flattened vs --keep-layers",
    );

    // What injection put there, read off the unpacked tree.
    let root = extracted.path();
    let init = fs::read(root.join("usr/local/sbin/hakim-init")).unwrap();
    assert_eq!(init, fs::read(init_binary()).unwrap());
    let target = fs::canonicalize(root.join("sbin")).unwrap().join("init");
    assert_eq!(
        fs::read_link(&target).unwrap(),
        Path::new("/usr/local/sbin/hakim-init")
    );
    assert_eq!(fs::read(root.join("etc/machine-id")).unwrap(), b"");
    let resolv = fs::symlink_metadata(root.join("etc/resolv.conf")).unwrap();
    assert!(resolv.is_file());
    let ssh = root.join("etc/ssh");
    if ssh.is_dir() {
        for e in fs::read_dir(&ssh).unwrap() {
            let name = e.unwrap().file_name();
            assert!(
                !name.to_string_lossy().starts_with("ssh_host_"),
                "host key {name:?} survived"
            );
        }
    }
    // image.env carries the real image's Env, one KEY=VALUE per line.
    let env = fs::read_to_string(root.join("etc/hakim/image.env")).unwrap();
    let config = Command::new("skopeo")
        .args(["inspect", "--config"])
        .arg(test_image().oci_ref())
        .output()
        .unwrap();
    let config: serde_json::Value = serde_json::from_slice(&config.stdout).unwrap();
    let image_env: Vec<&str> = config["config"]["Env"]
        .as_array()
        .map(|a| a.iter().map(|v| v.as_str().unwrap()).collect())
        .unwrap_or_default();
    let written: Vec<&str> = env.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(written, image_env, "image.env:\n{env}");
    // The archive's config starts the init.
    let inspect = Command::new("skopeo")
        .args(["inspect", "--config"])
        .arg(format!("oci-archive:{}:e2e", archive.display()))
        .output()
        .unwrap();
    let oci_config: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!(
        oci_config["config"]["Entrypoint"],
        serde_json::json!(["/usr/local/sbin/hakim-init"])
    );
    assert_eq!(oci_config["config"]["StopSignal"], "SIGTERM");
    assert_eq!(oci_config["config"]["Env"], config["config"]["Env"]);

    // A flipped byte inside the layer blob fails verify (and only then).
    let mut bytes = fs::read(&archive).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0x55;
    let bad = out.path().join("corrupt.tar");
    fs::write(&bad, bytes).unwrap();
    let o = Command::new(converter_bin())
        .arg("verify")
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("FAIL"), "{text}");
}

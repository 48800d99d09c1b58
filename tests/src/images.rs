//! Harness for the end-to-end tests of the Dockerfiles in `images/` (see
//! `tests/tests/images.rs`).
//!
//! [`Buildah`] builds with `buildah bud --isolation chroot` (no daemon) in a storage of its
//! own (vfs, under the scratch directory, removed on drop) and pushes to a [`Registry`] of
//! [`crate::registry`], with that registry's TLS options and credentials. [`base_rootfs`] lays
//! out the small image the Dockerfiles extend in place of `ghcr.io/shekohex/hakim-base`, which
//! cannot be reached from here.
//!
//! Gating: [`images_ready`] needs root, `buildah`, `tar`, `timeout`, `unshare`, `chroot` and a
//! static `busybox`; missing ones skip, or fail under `HAKIM_E2E=1`.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Instant;

use crate::registry::Registry;
use crate::{find_on_path, gate, missing_tools_or_root, run_ok, scratch_dir};

/// Tools the image tests run (besides the registry's and the converter).
pub const IMAGE_TOOLS: &[&str] = &["buildah", "busybox", "tar", "timeout", "unshare", "chroot"];

/// `true` when root and every tool of [`IMAGE_TOOLS`] are there, busybox static (see [`gate`]).
pub fn images_ready() -> bool {
    static MISSING: OnceLock<Vec<String>> = OnceLock::new();
    gate(MISSING.get_or_init(|| {
        missing_tools_or_root(IMAGE_TOOLS, "buildah's vfs storage and chroot builds")
    }))
}

/// A buildah storage of its own, building for and pushing to one registry.
pub struct Buildah<'r> {
    registry: &'r Registry,
    dir: tempfile::TempDir,
}

impl<'r> Buildah<'r> {
    pub fn new(registry: &'r Registry) -> Buildah<'r> {
        Buildah {
            registry,
            dir: scratch_dir("buildah-"),
        }
    }

    /// `buildah --root … --runroot … --storage-driver vfs SUBCOMMAND`, with the registry's
    /// client environment (no user credentials or proxies).
    fn buildah(&self, subcommand: &str) -> Command {
        let mut cmd = Command::new("buildah");
        cmd.arg("--root")
            .arg(self.dir.path().join("root"))
            .arg("--runroot")
            .arg(self.dir.path().join("run"))
            .args(["--storage-driver", "vfs", subcommand])
            .envs(self.registry.client_env())
            .env("BUILDAH_ISOLATION", "chroot");
        cmd
    }

    /// `buildah bud -f DOCKERFILE --build-arg K=V… -t HOST/REFERENCE CONTEXT`, then pushes the
    /// image to the registry; returns the pushed manifest digest.
    pub fn build(
        &self,
        dockerfile: &Path,
        context: &Path,
        build_args: &[(&str, &str)],
        reference: &str,
    ) -> String {
        let tag = format!("{}/{reference}", self.registry.host());
        let started = Instant::now();
        let mut cmd = self.buildah("bud");
        cmd.args(["--quiet", "--isolation", "chroot"])
            .args(self.registry.skopeo_args(None, false))
            .arg("-f")
            .arg(dockerfile);
        for (k, v) in build_args {
            cmd.arg("--build-arg").arg(format!("{k}={v}"));
        }
        run_ok(cmd.arg("-t").arg(&tag).arg(context));
        eprintln!(
            "built {tag} from {} in {:.1} s",
            dockerfile.display(),
            started.elapsed().as_secs_f64()
        );
        self.push(&tag, reference)
    }

    /// Commits the tree `root` as a one-layer image (`buildah from scratch`, `copy`, `config
    /// CONFIG…`, `commit`) and pushes it as REFERENCE; returns the manifest digest.
    pub fn commit_tree(&self, root: &Path, config: &[&str], reference: &str) -> String {
        let out = run_ok(self.buildah("from").args(["--quiet", "scratch"]));
        let container = String::from_utf8_lossy(&out.stdout).trim().to_string();
        run_ok(
            self.buildah("copy")
                .arg(&container)
                .arg(format!("{}/", root.display()))
                .arg("/"),
        );
        run_ok(self.buildah("config").args(config).arg(&container));
        let tag = format!("{}/{reference}", self.registry.host());
        run_ok(
            self.buildah("commit")
                .args(["--quiet", "--rm"])
                .arg(&container)
                .arg(&tag),
        );
        self.push(&tag, reference)
    }

    fn push(&self, tag: &str, reference: &str) -> String {
        let digest_file = self.dir.path().join("digest");
        run_ok(
            self.buildah("push")
                .arg("--quiet")
                .args(self.registry.skopeo_args(None, true))
                .arg("--digestfile")
                .arg(&digest_file)
                .arg(tag)
                .arg(self.registry.docker_ref(reference)),
        );
        fs::read_to_string(&digest_file)
            .expect("buildah push --digestfile")
            .trim()
            .to_string()
    }
}

/// Lays out, in `root`, the skeleton of a merged-/usr Debian image made of the host's static
/// busybox: `usr/bin/busybox` and a link per applet, `bin → usr/bin`, `sbin → usr/sbin`,
/// `usr/sbin/init → ../lib/systemd/systemd` (systemd-sysv's link, dangling here), `/etc/passwd`
/// and `/etc/group` with root, and an `/etc/os-release` saying Debian trixie (what the Hakim
/// images are). Returns the busybox binary it copied.
pub fn base_rootfs(root: &Path) -> PathBuf {
    let busybox = find_on_path("busybox").expect("busybox on PATH");
    for dir in [
        "usr/bin",
        "usr/sbin",
        "usr/lib/systemd",
        "etc",
        "root",
        "tmp",
    ] {
        fs::create_dir_all(root.join(dir)).expect("mkdir in base root");
    }
    fs::copy(&busybox, root.join("usr/bin/busybox")).expect("copy busybox");
    let list = run_ok(Command::new(&busybox).arg("--list"));
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let applet = applet.trim();
        // busybox's own init must not stand in for the /sbin/init under test.
        if applet.is_empty() || applet.contains('/') || ["busybox", "init"].contains(&applet) {
            continue;
        }
        symlink("busybox", root.join("usr/bin").join(applet)).expect("applet link");
    }
    symlink("usr/bin", root.join("bin")).expect("bin link");
    symlink("usr/sbin", root.join("sbin")).expect("sbin link");
    symlink("../lib/systemd/systemd", root.join("usr/sbin/init")).expect("init link");
    fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").expect("passwd");
    fs::write(root.join("etc/group"), "root:x:0:\n").expect("group");
    fs::write(
        root.join("etc/os-release"),
        "PRETTY_NAME=\"busybox standing in for Debian GNU/Linux 13 (trixie)\"\n\
         ID=debian\nVERSION_ID=\"13\"\nVERSION_CODENAME=trixie\n",
    )
    .expect("os-release");
    busybox
}

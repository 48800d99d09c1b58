//! The Debian trixie root with the parts of the user's session (`ci/build-session-root.sh`:
//! dbus, gnome-keyring, gcr4, secret-tool, ssh-add), built once into the test cache, and
//! throwaway writable views of it ([`Overlay`], an overlayfs over the cached root) that a
//! test boots hakim-init in, as PID 1 of a PID namespace or of an LXC container.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::{run_ok, workspace_root};

/// `CACHE/session-root/rootfs`, built (or found up to date) once per test process.
pub fn session_root() -> &'static Path {
    static ROOT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let built = ROOT.get_or_init(|| {
        let cache = crate::run_image_script("build-session-root.sh", "session root")?;
        Ok(cache.join("session-root/rootfs"))
    });
    match built {
        Ok(root) => root,
        Err(e) => panic!("{e}"),
    }
}

/// A writable view of a read-only root: `lower` below, the changes in a tmpfs of their own
/// (an overlayfs upper directory cannot be on an overlayfs, as in a Docker-run CI job);
/// unmounted (and the changes gone) when dropped.
pub struct Overlay {
    merged: PathBuf,
    state: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

impl Overlay {
    /// Mounts the view at `merged` (created), keeping its changes in `state` (created).
    pub fn mount(lower: &Path, merged: &Path, state: &Path) -> Overlay {
        fs::create_dir_all(state).unwrap_or_else(|e| panic!("mkdir {}: {e}", state.display()));
        run_ok(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=256m,mode=0755", "tmpfs"])
                .arg(state),
        );
        let (upper, work) = (state.join("upper"), state.join("work"));
        for d in [merged, &upper, &work] {
            fs::create_dir_all(d).unwrap_or_else(|e| panic!("mkdir {}: {e}", d.display()));
        }
        // The root's own mode: LXC and an idmapped user must be able to enter it.
        fs::set_permissions(&upper, fs::Permissions::from_mode(0o755)).unwrap();
        run_ok(
            Command::new("mount")
                .args(["-t", "overlay", "overlay", "-o"])
                .arg(format!(
                    "lowerdir={},upperdir={},workdir={}",
                    lower.display(),
                    upper.display(),
                    work.display()
                ))
                .arg(merged),
        );
        Overlay {
            merged: merged.to_path_buf(),
            state: state.to_path_buf(),
            _tmp: None,
        }
    }

    /// A view in a temporary directory of the test cache's scratch space.
    pub fn temporary(lower: &Path) -> Overlay {
        let tmp = crate::scratch_dir("session-");
        let mut o = Overlay::mount(lower, &tmp.path().join("root"), &tmp.path().join("state"));
        o._tmp = Some(tmp);
        o
    }

    pub fn root(&self) -> &Path {
        &self.merged
    }

    /// `ROOT/rel`.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.merged.join(rel.trim_start_matches('/'))
    }

    /// Writes a file (parents created) with `mode`.
    pub fn write(&self, rel: &str, content: &[u8], mode: u32) {
        let p = self.path(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, content).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
    }

    /// Copies the shipped `images/services/NAME.toml` files into `/etc/hakim/services/`.
    pub fn install_services(&self, names: &[&str]) {
        for name in names {
            let file = format!("{name}.toml");
            let text = fs::read(workspace_root().join("images/services").join(&file))
                .unwrap_or_else(|e| panic!("images/services/{file}: {e}"));
            self.write(&format!("etc/hakim/services/{file}"), &text, 0o644);
        }
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        let ok = |c: &mut Command| c.status().is_ok_and(|s| s.success());
        for dir in [&self.merged, &self.state] {
            if !ok(Command::new("umount").arg(dir))
                && !ok(Command::new("umount").arg("-l").arg(dir))
            {
                eprintln!("session root: cannot unmount {}", dir.display());
                return;
            }
        }
        let _ = fs::remove_dir(&self.state);
    }
}

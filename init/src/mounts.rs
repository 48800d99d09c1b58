//! The mounts an application container lacks. LXC gives proc, sys and a tmpfs
//! `/dev` with devpts; Proxmox application containers get no `/run`, no `/tmp`
//! and (before pve-container 6.1.10) no `/dev/shm`; Docker gives most but forbids
//! mounting. So: mount only what `/proc/self/mountinfo` does not list, never
//! twice, and on EPERM fall back to a plain directory with a warning.

use std::path::{Path, PathBuf};

use nix::mount::MsFlags;

use crate::sys::Syscall;

/// Mount points listed in mountinfo (5th field, octal escapes decoded).
pub fn parse_mountinfo(text: &[u8]) -> Vec<PathBuf> {
    use std::os::unix::ffi::OsStringExt;
    let mut out = Vec::new();
    for line in text.split(|&b| b == b'\n') {
        let Some(field) = line.split(|&b| b == b' ').nth(4) else {
            continue;
        };
        let mut decoded = Vec::with_capacity(field.len());
        let mut i = 0;
        while i < field.len() {
            if field[i] == b'\\' && i + 4 <= field.len() {
                let oct = &field[i + 1..i + 4];
                if oct.iter().all(|b| (b'0'..=b'7').contains(b)) {
                    decoded.push((oct[0] - b'0') * 64 + (oct[1] - b'0') * 8 + (oct[2] - b'0'));
                    i += 4;
                    continue;
                }
            }
            decoded.push(field[i]);
            i += 1;
        }
        out.push(PathBuf::from(std::ffi::OsString::from_vec(decoded)));
    }
    out
}

struct Wanted {
    target: PathBuf,
    fstype: &'static str,
    flags: MsFlags,
    data: Option<String>,
    /// Mode for the fallback directory when mounting is not allowed.
    fallback_mode: Option<u32>,
}

fn nosuid_nodev() -> MsFlags {
    MsFlags::MS_NOSUID | MsFlags::MS_NODEV
}

/// Mounts what is missing; returns human-readable notes (what was mounted,
/// what fell back). `run_user` is the workspace user's (uid, gid).
pub fn ensure_mounts(sys: &dyn Syscall, run_user: Option<(u32, u32)>) -> Vec<String> {
    let mut notes = Vec::new();
    let mountinfo = Path::new("/proc/self/mountinfo");
    let mut mounted = sys.read(mountinfo).map(|t| parse_mountinfo(&t)).ok();
    if mounted.is_none() {
        // No /proc yet: mount it first so the rest can be checked.
        match sys.mkdir_all(Path::new("/proc")).and_then(|_| {
            sys.mount(
                "proc",
                Path::new("/proc"),
                "proc",
                nosuid_nodev() | MsFlags::MS_NOEXEC,
                None,
            )
        }) {
            Ok(()) => notes.push("mounted /proc".to_string()),
            Err(e) => notes.push(format!("cannot mount /proc: {e}")),
        }
        mounted = sys.read(mountinfo).map(|t| parse_mountinfo(&t)).ok();
    }
    let mounted = mounted.unwrap_or_default();
    let is_mounted = |p: &Path| mounted.iter().any(|m| m == p);

    let mut wanted = vec![
        Wanted {
            target: "/sys".into(),
            fstype: "sysfs",
            flags: nosuid_nodev() | MsFlags::MS_NOEXEC,
            data: None,
            fallback_mode: None,
        },
        Wanted {
            target: "/dev/pts".into(),
            fstype: "devpts",
            flags: MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            data: Some("newinstance,ptmxmode=0666,mode=0620".into()),
            fallback_mode: None,
        },
        Wanted {
            target: "/dev/shm".into(),
            fstype: "tmpfs",
            flags: nosuid_nodev(),
            data: Some("mode=1777".into()),
            fallback_mode: Some(0o1777),
        },
        // A fresh tmpfs: stale sockets and pid files cannot survive a restart.
        Wanted {
            target: "/run".into(),
            fstype: "tmpfs",
            flags: nosuid_nodev(),
            data: Some("mode=0755".into()),
            fallback_mode: Some(0o755),
        },
    ];
    if let Some((uid, gid)) = run_user {
        wanted.push(Wanted {
            target: format!("/run/user/{uid}").into(),
            fstype: "tmpfs",
            flags: nosuid_nodev(),
            data: Some(format!("mode=0700,uid={uid},gid={gid}")),
            fallback_mode: Some(0o700),
        });
    }
    for w in wanted {
        if is_mounted(&w.target) {
            continue;
        }
        let result = sys
            .mkdir_all(&w.target)
            .and_then(|_| sys.mount(w.fstype, &w.target, w.fstype, w.flags, w.data.as_deref()));
        match result {
            Ok(()) => notes.push(format!("mounted {} ({})", w.target.display(), w.fstype)),
            Err(e) => {
                let mut note = format!("cannot mount {}: {e}", w.target.display());
                if let Some(mode) = w.fallback_mode {
                    let _ = sys.chmod(&w.target, mode);
                    note.push_str(&format!("; using a plain directory (mode {mode:o})"));
                    if let (Some((uid, gid)), true) = (run_user, w.target.starts_with("/run/user"))
                    {
                        let _ = sys.chown(&w.target, uid, gid);
                    }
                }
                notes.push(note);
            }
        }
    }
    // /tmp is a directory in every image; only its mode matters.
    let _ = sys.mkdir_all(Path::new("/tmp"));
    let _ = sys.chmod(Path::new("/tmp"), 0o1777);
    notes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::{Call, RecordingSys};

    const LXC_MOUNTINFO: &str = "\
100 90 0:50 / / rw,relatime - ext4 /dev/loop0 rw
101 100 0:51 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw
102 100 0:52 / /sys ro,nosuid,nodev,noexec,relatime - sysfs sysfs ro
103 100 0:53 / /dev rw,relatime - tmpfs none rw,size=492k,mode=755
104 103 0:54 / /dev/pts rw,nosuid,noexec,relatime - devpts devpts rw,gid=5,mode=620,ptmxmode=666
105 100 0:55 / /home/my\\040space rw - ext4 /dev/loop1 rw
";

    fn mounted_targets(calls: &[Call]) -> Vec<String> {
        calls
            .iter()
            .filter_map(|c| match c {
                Call::Mount { target, .. } => Some(target.display().to_string()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn parses_mount_points_with_escapes() {
        let m = parse_mountinfo(LXC_MOUNTINFO.as_bytes());
        assert!(m.contains(&PathBuf::from("/dev/pts")));
        assert!(m.contains(&PathBuf::from("/home/my space")));
        assert_eq!(m.len(), 6);
    }

    #[test]
    fn mounts_only_what_is_missing() {
        let sys = RecordingSys::default().with_file("/proc/self/mountinfo", LXC_MOUNTINFO);
        let notes = ensure_mounts(&sys, Some((1000, 1000)));
        assert_eq!(
            mounted_targets(&sys.calls()),
            ["/dev/shm", "/run", "/run/user/1000"]
        );
        assert!(sys.calls().contains(&Call::Mount {
            fstype: "tmpfs".into(),
            target: "/run/user/1000".into(),
            data: Some("mode=0700,uid=1000,gid=1000".into()),
        }));
        assert!(sys.calls().contains(&Call::Chmod("/tmp".into(), 0o1777)));
        assert_eq!(notes.len(), 3);
    }

    #[test]
    fn mounts_proc_first_when_absent() {
        let sys = RecordingSys::default();
        ensure_mounts(&sys, None);
        let targets = mounted_targets(&sys.calls());
        assert_eq!(targets[0], "/proc");
    }

    #[test]
    fn eperm_falls_back_to_directories() {
        let sys = RecordingSys {
            fail_mounts: Some(libc::EPERM),
            ..RecordingSys::default()
        }
        .with_file(
            "/proc/self/mountinfo",
            "1 0 0:1 / / rw - overlay overlay rw\n",
        );
        let notes = ensure_mounts(&sys, Some((1000, 1000)));
        assert!(mounted_targets(&sys.calls()).is_empty());
        assert!(sys.calls().contains(&Call::Chmod("/run".into(), 0o755)));
        assert!(sys
            .calls()
            .contains(&Call::Chmod("/dev/shm".into(), 0o1777)));
        assert!(sys
            .calls()
            .contains(&Call::Chown("/run/user/1000".into(), 1000, 1000)));
        assert!(notes
            .iter()
            .any(|n| n.contains("cannot mount /run") && n.contains("plain directory")));
    }
}

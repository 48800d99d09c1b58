//! The workspace user's session: what a login gives a user before the agent runs
//! (the environment of a login, the runtime directory `/run/user/<uid>`), and what
//! the session services (`session = true`, see [`crate::services`]) need: the
//! environment they are expanded with and run in, the files they are seeded with
//! (written as the user), and the variables they export to the agent.
//!
//! Why services and not a script: each part of the session (bus, keyring, SSH
//! agent) is supervised, restarted, stopped in order after the agent, and an image
//! drops one by deleting its file. The upstream entrypoint started them once with
//! `su` and `eval`ed their output.

use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::env::{truthy, Env};
use crate::workspace::WorkspaceUser;

/// `HAKIM_USER_SESSION`: unset, empty or truthy runs the session services; anything
/// else (`0`, `false`) turns them off.
pub const ENV_TOGGLE: &str = "HAKIM_USER_SESSION";

/// Whether the session services run (see [`ENV_TOGGLE`]).
pub fn wanted(env: &Env) -> bool {
    env.get(ENV_TOGGLE)
        .is_none_or(|v| v.trim().is_empty() || truthy(v))
}

/// `/run/user/<uid>`, where the session's sockets live.
pub fn runtime_dir(uid: u32) -> PathBuf {
    PathBuf::from(format!("/run/user/{uid}"))
}

/// The variables a login sets for the user, which the agent and the session services
/// get over the container's environment: HOME, USER, LOGNAME, SHELL, XDG_RUNTIME_DIR and
/// PATH with the user's own mise shims and `~/.local/bin` first, as a login shell would.
pub fn login_env(user: &WorkspaceUser, path: &str) -> Vec<(String, String)> {
    let home = user.home.display().to_string();
    vec![
        ("HOME".into(), home.clone()),
        ("USER".into(), user.name.clone()),
        ("LOGNAME".into(), user.name.clone()),
        ("SHELL".into(), user.shell.clone()),
        (
            "XDG_RUNTIME_DIR".into(),
            runtime_dir(user.uid).display().to_string(),
        ),
        (
            "PATH".into(),
            format!("{home}/.local/share/mise/shims:{home}/.local/bin:{path}"),
        ),
    ]
}

/// `public` (the container's environment, no secrets) with the login variables over it.
pub fn with_login(
    public: &[(String, String)],
    login: &[(String, String)],
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = public
        .iter()
        .filter(|(k, _)| !login.iter().any(|(l, _)| l == k))
        .cloned()
        .collect();
    env.extend(login.iter().cloned());
    env
}

/// The environment session service files are expanded with: `merged` plus the login
/// variables.
pub fn expansion_env(merged: &Env, login: &[(String, String)]) -> Env {
    let mut env = merged.clone();
    env.extend(login.iter().cloned());
    env
}

/// Creates `/run/user/<uid>` (parents 0755) when PID 1 did not mount it, and makes
/// sure it is the user's, mode 0700. Returns what was wrong, if anything.
pub fn ensure_runtime_dir(dir: &Path, uid: u32, gid: u32) -> Result<(), String> {
    if let Some(parent) = dir.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("cannot create {}: {e}", dir.display())),
    }
    let meta = std::fs::symlink_metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if !meta.is_dir() {
        return Err(format!("{} is not a directory", dir.display()));
    }
    if (meta.uid(), meta.gid()) != (uid, gid) {
        std::os::unix::fs::lchown(dir, Some(uid), Some(gid))
            .map_err(|e| format!("cannot give {} to {uid}:{gid}: {e}", dir.display()))?;
    }
    if meta.mode() & 0o7777 != 0o700 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("cannot set mode 0700 on {}: {e}", dir.display()))?;
    }
    Ok(())
}

/// The file-system ids of this thread switched to the user's until dropped: what is
/// created is the user's, and the kernel checks every path as it would for the user
/// (a link in the home pointing at `/etc` gets the user nowhere). PID 1 is one thread.
struct AsUser;

impl AsUser {
    fn new(uid: u32, gid: u32) -> AsUser {
        // Group first: once the fsuid is not 0 the right to change it is gone.
        unsafe {
            libc::setfsgid(gid);
            libc::setfsuid(uid);
        }
        AsUser
    }
}

impl Drop for AsUser {
    fn drop(&mut self) {
        // Back to the effective ids, which the file-system ids follow normally.
        unsafe {
            libc::setfsuid(libc::geteuid());
            libc::setfsgid(libc::getegid());
        }
    }
}

/// Writes `content` to `path` as the user (`uid:gid`), parents created 0700, unless
/// something is there already (the user's own keyring is never replaced, nor a link
/// followed). `Ok(true)` when written.
pub fn write_seed(path: &Path, content: &[u8], mode: u32, uid: u32, gid: u32) -> io::Result<bool> {
    let _as_user = AsUser::new(uid, gid);
    if let Some(parent) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)?;
    }
    let mut file = match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode & 0o777)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(false),
        Err(e) => return Err(e),
    };
    if let Err(e) = file.write_all(content).and_then(|()| file.sync_all()) {
        drop(file);
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user() -> WorkspaceUser {
        WorkspaceUser {
            name: "coder".into(),
            uid: 1000,
            gid: 1000,
            groups: vec![1000],
            home: "/home/coder".into(),
            shell: "/bin/bash".into(),
            project_dir: "/home/coder/project".into(),
        }
    }

    #[test]
    fn toggle() {
        let env = |v: Option<&str>| -> Env {
            v.map(|v| (ENV_TOGGLE.to_string(), v.to_string()))
                .into_iter()
                .collect()
        };
        assert!(wanted(&env(None)));
        assert!(wanted(&env(Some(""))));
        assert!(wanted(&env(Some("yes"))));
        assert!(!wanted(&env(Some("0"))));
        assert!(!wanted(&env(Some("false"))));
    }

    #[test]
    fn login_variables_win_over_the_container_environment() {
        let login = login_env(&user(), "/usr/bin:/bin");
        let public = vec![
            ("HOME".to_string(), "/root".to_string()),
            ("LANG".to_string(), "C.UTF-8".to_string()),
        ];
        let env = with_login(&public, &login);
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("HOME"), Some("/home/coder"));
        assert_eq!(get("LANG"), Some("C.UTF-8"));
        assert_eq!(get("XDG_RUNTIME_DIR"), Some("/run/user/1000"));
        assert_eq!(
            get("PATH"),
            Some("/home/coder/.local/share/mise/shims:/home/coder/.local/bin:/usr/bin:/bin")
        );
        assert_eq!(env.iter().filter(|(k, _)| k == "HOME").count(), 1);
    }

    #[test]
    fn seeds_are_written_once_and_never_through_a_link() {
        let dir = tempfile::tempdir().unwrap();
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        let path = dir.path().join("a/b/default");
        assert!(write_seed(&path, b"login", 0o600, uid, gid).unwrap());
        assert_eq!(std::fs::read(&path).unwrap(), b"login");
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!(
            std::fs::metadata(dir.path().join("a")).unwrap().mode() & 0o777,
            0o700
        );
        // Kept as it is the second time.
        std::fs::write(&path, b"mine").unwrap();
        assert!(!write_seed(&path, b"login", 0o600, uid, gid).unwrap());
        assert_eq!(std::fs::read(&path).unwrap(), b"mine");
        // A link is not followed.
        let target = dir.path().join("target");
        std::os::unix::fs::symlink(&target, dir.path().join("link")).unwrap();
        assert!(!write_seed(&dir.path().join("link"), b"x", 0o600, uid, gid).unwrap());
        assert!(!target.exists());
    }

    #[test]
    fn runtime_dir_is_the_users_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        let rt = dir.path().join("run/user/1000");
        ensure_runtime_dir(&rt, uid, gid).unwrap();
        let meta = std::fs::metadata(&rt).unwrap();
        assert_eq!((meta.mode() & 0o7777, meta.uid()), (0o700, uid));
        std::fs::set_permissions(&rt, std::fs::Permissions::from_mode(0o755)).unwrap();
        ensure_runtime_dir(&rt, uid, gid).unwrap();
        assert_eq!(std::fs::metadata(&rt).unwrap().mode() & 0o7777, 0o700);
    }
}

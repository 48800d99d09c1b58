//! Glue between configuration and the supervisor: the workspace user (account,
//! home, project dir) and the Coder agent unit with its download child.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::agent_config::{self, is_secret_env};
use crate::boot::WorkspaceUser;
use crate::env::Env;
use crate::fetch;
use crate::home;
use crate::services::Restart;
use crate::spawn::Ids;
use crate::supervisor::{log, warn, AgentFetch, Supervisor, UnitSpec};
use crate::users::{self, UserSpec};

/// Where the downloaded agent lives (root-owned, traversable so the user can
/// run `--version` on it).
pub const AGENT_DIR: &str = "/var/lib/hakim/agent";
/// A binary baked into the image, used when downloads keep failing.
pub const BAKED_AGENT: &str = "/usr/local/bin/coder";

fn secs(env: &Env, name: &str, default: u64) -> Duration {
    Duration::from_secs(
        env.get(name)
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(default),
    )
}

/// The workspace user's settings as the environment gives them, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserSettings {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
    /// `None`: `project` in the home the user turns out to have (an existing user keeps
    /// its own).
    pub project_dir: Option<PathBuf>,
}

/// Default `CODER_UID` (and, through it, `CODER_GID`).
pub const DEFAULT_UID: u32 = 1000;

/// `CODER_UID`/`CODER_GID`: a decimal id below 2^32-1 ((uid_t)-1 means "no change" to
/// chown and setuid). Anything else (`-1`, `99999999999`, `1e3`) is `Err` with the
/// reason; unset or empty is `Ok(None)`.
fn parse_id_var(env: &Env, name: &str) -> Result<Option<u32>, String> {
    let Some(raw) = env.get(name).filter(|v| !v.trim().is_empty()) else {
        return Ok(None);
    };
    let v = raw.trim();
    match v.parse::<u32>() {
        Ok(id) if id != u32::MAX && v.bytes().all(|b| b.is_ascii_digit()) => Ok(Some(id)),
        _ => Err(format!(
            "{name}={raw:?} is not an id (a decimal number from 0 to {})",
            u32::MAX - 1
        )),
    }
}

/// The uid and gid asked for: `CODER_UID` (default 1000) and `CODER_GID` (default the
/// uid). An invalid value falls back to its default, with a note saying so.
pub fn user_ids(env: &Env) -> (u32, u32, Vec<String>) {
    let mut notes = Vec::new();
    let uid = parse_id_var(env, "CODER_UID").unwrap_or_else(|e| {
        notes.push(format!("{e}; using {DEFAULT_UID}"));
        None
    });
    let uid = uid.unwrap_or(DEFAULT_UID);
    let gid = parse_id_var(env, "CODER_GID").unwrap_or_else(|e| {
        notes.push(format!("{e}; using the uid, {uid}"));
        None
    });
    (uid, gid.unwrap_or(uid), notes)
}

/// An absolute, normalised directory other than `/` that fits a passwd field: no `.`,
/// `..` or empty components, no trailing `/`, no `:` and no control character.
fn valid_dir(path: &str) -> bool {
    path.starts_with('/')
        && path.len() > 1
        && !path.chars().any(|c| c == ':' || c.is_control())
        && path[1..]
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
}

/// Checks `CODER_USER`, `CODER_UID`, `CODER_GID`, `CODER_HOME` and `CODER_PROJECT_DIR`
/// (empty counts as unset). A user name that is not portable (see [`users::valid_name`])
/// is `Err`: the account, home and agent are refused rather than guessed. Bad ids fall back
/// to their defaults, a bad home to `/home/$USER`, a bad project dir to `$HOME/project`;
/// each with one note. No refused value is used anywhere.
pub fn user_settings(env: &Env) -> Result<(UserSettings, Vec<String>), String> {
    let set = |k: &str| env.get(k).filter(|v| !v.is_empty()).cloned();
    let name = set("CODER_USER").unwrap_or_else(|| "coder".into());
    if !users::valid_name(&name) {
        return Err(format!(
            "CODER_USER={name:?} is not a portable user name (a letter or _, then letters, \
             digits, . _ -, at most {} characters); no workspace user, no agent",
            users::MAX_NAME_LEN
        ));
    }
    let (uid, gid, mut notes) = user_ids(env);
    let default_home = format!("/home/{name}");
    let home = match set("CODER_HOME") {
        Some(h) if valid_dir(&h) => h,
        Some(h) => {
            notes.push(format!(
                "CODER_HOME={h:?} is not an absolute normalised directory other than /; \
                 using {default_home}"
            ));
            default_home
        }
        None => default_home,
    };
    let project_dir = match set("CODER_PROJECT_DIR") {
        Some(p) if valid_dir(&p) => Some(p.into()),
        Some(p) => {
            notes.push(format!(
                "CODER_PROJECT_DIR={p:?} is not an absolute normalised directory other than /; \
                 using $HOME/project"
            ));
            None
        }
        None => None,
    };
    Ok((
        UserSettings {
            name,
            uid,
            gid,
            home: home.into(),
            project_dir,
        },
        notes,
    ))
}

/// Creates (or finds) the workspace user and prepares home and project dir.
/// Problems are logged; the ids asked for are used when /etc cannot be edited.
/// `None` (logged) when the settings are refused: see [`user_settings`].
pub fn prepare_user(env: &Env) -> Option<WorkspaceUser> {
    let (settings, notes) = match user_settings(env) {
        Ok(s) => s,
        Err(e) => {
            warn(e);
            return None;
        }
    };
    for n in notes {
        warn(n);
    }
    let UserSettings {
        name,
        uid,
        gid,
        home,
        project_dir: asked_project_dir,
    } = settings;
    let mut spec = UserSpec::new(name.clone(), uid, gid, home.clone());
    spec.supplementary = env
        .get("CODER_GROUPS")
        .map(String::as_str)
        .unwrap_or("docker")
        .split(',')
        .map(|g| g.trim().to_string())
        .filter(|g| !g.is_empty())
        .collect();
    let root = Path::new("/");
    let (uid, gid, home, shell) = match users::ensure_user(root, &spec) {
        Ok(o) => {
            for c in &o.changes {
                log(format!("user {name}: {c}"));
            }
            for w in &o.warnings {
                log(format!("user {name}: {w}"));
            }
            (o.uid, o.gid, o.home, o.shell.display().to_string())
        }
        Err(e) => {
            log(format!("user {name}: {e}; running as {uid}:{gid} anyway"));
            (uid, gid, home, "/bin/sh".to_string())
        }
    };
    let project_dir = asked_project_dir.unwrap_or_else(|| home.join("project"));
    match home::prepare_home(root, &home, uid, gid, Path::new("/etc/skel")) {
        Ok(o) => {
            if o.changed() {
                log(format!(
                    "home {}: prepared (fresh: {})",
                    home.display(),
                    o.fresh
                ));
            }
            for w in o.warnings {
                log(format!("home {}: {w}", home.display()));
            }
        }
        Err(e) => log(format!("home {}: {e}", home.display())),
    }
    let tools = home::prepare_tool_dirs(root, &home, uid, gid);
    if !tools.created.is_empty() || tools.owner_set > 0 {
        log(format!(
            "home {}: mise directories ready ({} created, {} given to the user)",
            home.display(),
            tools.created.len(),
            tools.owner_set
        ));
    }
    for w in tools.warnings {
        log(format!("home {}: {w}", home.display()));
    }
    match home::prepare_dir(root, &project_dir, uid, gid) {
        Ok(o) => {
            for w in o.warnings {
                log(format!("project dir {}: {w}", project_dir.display()));
            }
        }
        Err(e) => log(format!("project dir {}: {e}", project_dir.display())),
    }
    let groups = lookup_groups(&name, gid);
    Some(WorkspaceUser {
        name,
        uid,
        gid,
        groups,
        home,
        shell,
        project_dir,
    })
}

/// Primary gid plus every group listing `user` as a member.
fn lookup_groups(user: &str, primary: u32) -> Vec<u32> {
    let mut gids = vec![primary];
    if let Ok(text) = std::fs::read_to_string("/etc/group") {
        for line in text.lines() {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() >= 4 && f[3].split(',').any(|m| m.trim() == user) {
                if let Ok(g) = f[2].parse::<u32>() {
                    if !gids.contains(&g) {
                        gids.push(g);
                    }
                }
            }
        }
    }
    gids
}

/// Ids of an existing account (for services with `user = "name"`).
pub fn lookup_user(name: &str) -> Option<Ids> {
    let text = std::fs::read_to_string("/etc/passwd").ok()?;
    for line in text.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() >= 4 && f[0] == name {
            let uid = f[2].parse().ok()?;
            let gid = f[3].parse().ok()?;
            return Some(Ids {
                uid,
                gid,
                groups: lookup_groups(name, gid),
            });
        }
    }
    log(format!("no user '{name}' in /etc/passwd"));
    None
}

/// Registers the agent with the supervisor: resolved now, and again every
/// minute while the configuration is unusable.
/// `session`: what the user's session services export (bus address, keyring, SSH agent).
pub fn declare(
    sup: &mut Supervisor,
    merged: &Env,
    public_env: &[(String, String)],
    user: Option<&WorkspaceUser>,
    session: &[(String, String)],
) {
    let merged = merged.clone();
    let public_env: Vec<(String, String)> = public_env
        .iter()
        .filter(|(k, _)| !is_secret_env(k))
        .cloned()
        .collect();
    let user = user.cloned();
    let session = session.to_vec();
    sup.set_agent_source(Box::new(move || {
        // A token file may have appeared or changed: read the environment afresh.
        let resolved = match agent_config::resolve_env(&merged) {
            Ok(None) => return Ok(None),
            Ok(Some(r)) => r,
            Err(e) => return Err(e.to_string()),
        };
        for w in &resolved.warnings {
            log(format!("agent: {w}"));
        }
        let Some(user) = user.clone() else {
            return Err("no workspace user".into());
        };
        Ok(Some(agent_unit(
            &merged,
            &public_env,
            &user,
            &session,
            &resolved.config,
        )))
    }));
}

fn agent_unit(
    merged: &Env,
    public_env: &[(String, String)],
    user: &WorkspaceUser,
    session: &[(String, String)],
    cfg: &agent_config::AgentConfig,
) -> (UnitSpec, AgentFetch) {
    let path = merged.get("PATH").map_or("", String::as_str);
    let login = crate::session::login_env(user, path);
    let mut env: Vec<(String, String)> = crate::session::with_login(public_env, &login)
        .into_iter()
        .filter(|(k, _)| k != "CODER_PROJECT_DIR" && !session.iter().any(|(s, _)| s == k))
        .collect();
    // The directory the agent starts in, as upstream exports it (resolved, not as asked).
    env.push((
        "CODER_PROJECT_DIR".into(),
        user.project_dir.display().to_string(),
    ));
    env.extend(session.iter().cloned());
    env.extend(agent_config::agent_env(cfg));

    let dest = Path::new(AGENT_DIR).join("coder");
    let _ = std::fs::create_dir_all(AGENT_DIR);
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(AGENT_DIR, std::fs::Permissions::from_mode(0o755));
    }
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "/proc/self/exe".into());
    let mut fetch_argv = vec![exe];
    fetch_argv.extend(
        fetch::fetch_child_args(&cfg.binary_url, &dest, user.uid, user.gid)
            .into_iter()
            .map(|a| a.to_string_lossy().into_owned()),
    );
    let mut fetch_env: Vec<(String, String)> = fetch::FETCH_ENV
        .iter()
        .filter_map(|k| merged.get(*k).map(|v| (k.to_string(), v.clone())))
        .collect();
    fetch_env.push((
        "PATH".into(),
        merged.get("PATH").cloned().unwrap_or_default(),
    ));
    // Prefer the image's baked binary; a binary from an earlier boot also serves.
    let fallback = [PathBuf::from(BAKED_AGENT), dest.clone()]
        .into_iter()
        .find(|p| p.exists());
    (
        UnitSpec {
            name: "agent".into(),
            argv: vec![dest.display().to_string(), "agent".into()],
            env,
            cwd: user.project_dir.clone(),
            ids: Some(user.ids()),
            restart: Restart::Always,
            stop_signal: libc::SIGTERM,
            // Under PVE's 60 s shutdown timeout, with room for the services.
            stop_grace: secs(merged, "HAKIM_AGENT_STOP_GRACE", 30),
            ready: None,
            after: Vec::new(),
            clean: Vec::new(),
            dirs: Vec::new(),
            capture: true,
            backoff_max: Duration::from_secs(60),
            oneshot: None,
            requires: Vec::new(),
        },
        AgentFetch {
            argv: fetch_argv,
            env: fetch_env,
            dest,
            fallback,
            fallback_after: secs(merged, "HAKIM_AGENT_FALLBACK_AFTER", 60),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(list: &[(&str, &str)]) -> Env {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn settings(list: &[(&str, &str)]) -> (UserSettings, Vec<String>) {
        user_settings(&env(list)).expect("accepted")
    }

    #[test]
    fn defaults_and_valid_values() {
        let (s, notes) = settings(&[]);
        assert_eq!(
            s,
            UserSettings {
                name: "coder".into(),
                uid: 1000,
                gid: 1000,
                home: "/home/coder".into(),
                project_dir: None,
            }
        );
        assert!(notes.is_empty());
        let (s, notes) = settings(&[
            ("CODER_USER", "dev_1"),
            ("CODER_UID", "4242"),
            ("CODER_GID", " 0 "),
            ("CODER_HOME", "/srv/dev"),
            ("CODER_PROJECT_DIR", "/work"),
        ]);
        assert_eq!((s.name.as_str(), s.uid, s.gid), ("dev_1", 4242, 0));
        assert_eq!(s.home, PathBuf::from("/srv/dev"));
        assert_eq!(s.project_dir, Some(PathBuf::from("/work")));
        assert!(notes.is_empty(), "{notes:?}");
        // Empty counts as unset.
        let (s, notes) = settings(&[("CODER_USER", ""), ("CODER_UID", ""), ("CODER_HOME", "")]);
        assert_eq!((s.name.as_str(), s.uid), ("coder", 1000));
        assert!(notes.is_empty(), "{notes:?}");
    }

    #[test]
    fn invalid_ids_fall_back_with_one_note_each() {
        for bad in ["-1", "99999999999", "4294967295", "1e3", "+5", "abc"] {
            let (s, notes) = settings(&[("CODER_UID", bad)]);
            assert_eq!((s.uid, s.gid), (1000, 1000), "{bad}");
            assert_eq!(notes.len(), 1, "{bad}: {notes:?}");
            assert!(notes[0].starts_with("CODER_UID="), "{notes:?}");
            assert!(notes[0].ends_with("using 1000"), "{notes:?}");
        }
        let (s, notes) = settings(&[("CODER_UID", "2000"), ("CODER_GID", "-1")]);
        assert_eq!((s.uid, s.gid), (2000, 2000));
        assert_eq!(notes.len(), 1);
        assert!(notes[0].ends_with("using the uid, 2000"), "{notes:?}");
    }

    #[test]
    fn invalid_user_name_is_refused() {
        for bad in [
            "a:0:0::/:/bin/sh",
            "evil\nroot",
            "../etc",
            "a/b",
            "1000",
            "-x",
            &"a".repeat(33),
        ] {
            let e = user_settings(&env(&[("CODER_USER", bad)])).expect_err(bad);
            assert!(e.starts_with("CODER_USER="), "{e}");
            assert!(e.contains("no workspace user, no agent"), "{e}");
            assert!(!e.contains('\n'), "the name is quoted, not raw: {e}");
        }
    }

    #[test]
    fn invalid_home_and_project_dir_fall_back_whole() {
        for bad in [
            "/",
            "//",
            "relative/home",
            "/home/../etc",
            "/home/./x",
            "/home//x",
            "/home/x/",
            "/a:b",
            "/home/x\n",
        ] {
            let (s, notes) = settings(&[("CODER_USER", "dev"), ("CODER_HOME", bad)]);
            assert_eq!(s.home, PathBuf::from("/home/dev"), "{bad:?}");
            assert_eq!(s.project_dir, None);
            assert_eq!(notes.len(), 1, "{bad:?}: {notes:?}");
            assert!(notes[0].ends_with("using /home/dev"), "{notes:?}");
            let (s, notes) = settings(&[("CODER_PROJECT_DIR", bad)]);
            assert_eq!(s.project_dir, None);
            assert_eq!(notes.len(), 1, "{bad:?}: {notes:?}");
            assert!(notes[0].ends_with("using $HOME/project"), "{notes:?}");
        }
    }
}

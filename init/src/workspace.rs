//! The workspace user: the settings the environment gives (`CODER_USER`, `CODER_UID`,
//! `CODER_GID`, `CODER_HOME`, `CODER_PROJECT_DIR`, `CODER_GROUPS`), checked once; the account
//! made or found through [`crate::users`] (whose byte-based passwd/group parser is the only
//! one), its home and project dir prepared through [`crate::home`]; and who a unit runs as.

use std::path::{Path, PathBuf};

use crate::env::Env;
use crate::home;
use crate::spawn::Ids;
use crate::supervisor::{log, warn};
use crate::users::{self, UserSpec};

/// The workspace user as set up (or found).
#[derive(Debug, Clone)]
pub struct WorkspaceUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub home: PathBuf,
    pub shell: String,
    pub project_dir: PathBuf,
}

impl WorkspaceUser {
    /// Who the agent and the session services run as.
    pub fn ids(&self) -> Ids {
        Ids {
            uid: self.uid,
            gid: self.gid,
            groups: self.groups.clone(),
        }
    }
}

/// Who a service with `user = "NAME"` runs as: `None` for root, the workspace user's ids
/// (groups included) for its name, else the account's from `/etc/passwd` and `/etc/group`.
pub fn resolve_ids(user: &str, ws: &Option<WorkspaceUser>) -> Option<Ids> {
    if user == "root" {
        return None;
    }
    match ws {
        Some(w) if w.name == user => Some(w.ids()),
        _ => lookup_user(user),
    }
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

/// Primary gid plus every group listing `user` as a member (users.rs's parser: bytes, so
/// one line that is not UTF-8 loses nothing else).
fn lookup_groups(user: &str, primary: u32) -> Vec<u32> {
    let group = std::fs::read("/etc/group").unwrap_or_default();
    users::group_ids(&group, user, primary)
}

/// Ids of an existing account (for services with `user = "name"`).
pub fn lookup_user(name: &str) -> Option<Ids> {
    let passwd = std::fs::read("/etc/passwd").unwrap_or_default();
    let Some((uid, gid)) = users::account_ids(&passwd, name) else {
        log(format!("no user '{name}' in /etc/passwd"));
        return None;
    };
    Some(Ids {
        uid,
        gid,
        groups: lookup_groups(name, gid),
    })
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

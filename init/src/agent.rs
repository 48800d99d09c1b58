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
use crate::supervisor::{log, AgentFetch, Supervisor, UnitSpec};
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

/// Creates (or finds) the workspace user and prepares home and project dir.
/// Problems are logged; the ids asked for are used when /etc cannot be edited.
pub fn prepare_user(env: &Env) -> Option<WorkspaceUser> {
    let name = env
        .get("CODER_USER")
        .cloned()
        .unwrap_or_else(|| "coder".into());
    let uid: u32 = env
        .get("CODER_UID")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let gid: u32 = env
        .get("CODER_GID")
        .and_then(|v| v.parse().ok())
        .unwrap_or(uid);
    let home = PathBuf::from(
        env.get("CODER_HOME")
            .cloned()
            .unwrap_or_else(|| format!("/home/{name}")),
    );
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
    let project_dir = PathBuf::from(
        env.get("CODER_PROJECT_DIR")
            .cloned()
            .unwrap_or_else(|| home.join("project").display().to_string()),
    );
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
pub fn declare(
    sup: &mut Supervisor,
    merged: &Env,
    public_env: &[(String, String)],
    user: Option<&WorkspaceUser>,
) {
    let merged = merged.clone();
    let public_env: Vec<(String, String)> = public_env
        .iter()
        .filter(|(k, _)| !is_secret_env(k))
        .cloned()
        .collect();
    let user = user.cloned();
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
            &resolved.config,
        )))
    }));
}

fn agent_unit(
    merged: &Env,
    public_env: &[(String, String)],
    user: &WorkspaceUser,
    cfg: &agent_config::AgentConfig,
) -> (UnitSpec, AgentFetch) {
    let home = user.home.display().to_string();
    let mut env: Vec<(String, String)> = public_env
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "HOME" | "USER" | "LOGNAME" | "SHELL" | "PATH"))
        .cloned()
        .collect();
    let path = merged.get("PATH").cloned().unwrap_or_default();
    env.push(("HOME".into(), home.clone()));
    env.push(("USER".into(), user.name.clone()));
    env.push(("LOGNAME".into(), user.name.clone()));
    env.push(("SHELL".into(), user.shell.clone()));
    // The user's own mise shims and local bin come first, as a login shell would.
    env.push((
        "PATH".into(),
        format!("{home}/.local/share/mise/shims:{home}/.local/bin:{path}"),
    ));
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
            ids: Some(Ids {
                uid: user.uid,
                gid: user.gid,
                groups: user.groups.clone(),
            }),
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

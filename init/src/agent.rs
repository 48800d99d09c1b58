//! Glue between configuration and the supervisor: the Coder agent unit with its
//! download child, for the workspace user of [`crate::workspace`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::agent_config::{self, is_secret_env};
use crate::env::Env;
use crate::fetch;
use crate::services::Restart;
use crate::supervisor::{log, AgentFetch, Supervisor, UnitSpec};
use crate::workspace::WorkspaceUser;

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

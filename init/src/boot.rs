//! Boot sequence: signals blocked, environment assembled, container prepared
//! (mounts, machine-id, user, home), units declared, event loop run, then exit
//! or reboot. Each step logs what it did; none of them is fatal except bad
//! arguments — a workspace with a broken piece should still come up.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::SigSet;

use crate::env::{self, Env};
use crate::services::{self, Restart};
use crate::session;
use crate::supervisor::{log, warn, Ending, Supervisor, UnitSpec};
use crate::sys::{RealSys, Syscall};
use crate::workspace::{self, WorkspaceUser};

const USAGE: &str = "usage: hakim-init [-- COMMAND [ARGS...]]
  Without a command: set up the workspace, run the declared services and the
  Coder agent (configured by CODER_AGENT_URL/CODER_AGENT_TOKEN, CODER_AGENT_TOKEN_FILE
  or CODER_AGENT_BOOTSTRAP) until stopped.
  With a command: run it as the main child like tini; exit with its status.";

fn secs_env(env: &Env, name: &str, default: Duration) -> Duration {
    env.get(name)
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| *s >= 0.0)
        .map(Duration::from_secs_f64)
        .unwrap_or(default)
}

/// Returns the process exit code.
pub fn run(args: &[String]) -> i32 {
    // Block every signal before anything else: they are read from a signalfd
    // in the event loop, so none can interrupt setup or be lost.
    let _ = SigSet::all().thread_block();
    let is_pid1 = std::process::id() == 1;
    if !is_pid1 {
        // Orphans of our children come to us, and are reaped, even when not PID 1.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    }

    let command: Vec<String> = match args.first().map(String::as_str) {
        None => Vec::new(),
        // `--` promises a command: without one it is a usage error, never daemon mode.
        Some("--") if args.len() == 1 => {
            eprintln!("hakim-init: -- needs a command\n{USAGE}");
            return 2;
        }
        Some("--") => args[1..].to_vec(),
        Some("-h" | "--help") => {
            println!("{USAGE}");
            return 0;
        }
        Some("--version") => {
            println!("hakim-init {}", env!("CARGO_PKG_VERSION"));
            return 0;
        }
        Some(a) if a.starts_with('-') => {
            let a = crate::supervisor::escape_controls(a);
            eprintln!("hakim-init: unknown option {a}\n{USAGE}");
            return 2;
        }
        Some(_) => args.to_vec(),
    };

    // Names only, never values: tells how Proxmox/LXC/Docker passed the environment.
    let process_env: Vec<(String, String)> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect();
    let names: Vec<String> = process_env.iter().map(|(k, _)| k.clone()).collect();
    let image_env = match std::fs::read_to_string(env::IMAGE_ENV_FILE) {
        Ok(text) => {
            let (vars, bad) = env::parse_env_file(&text);
            for b in bad {
                log(format!("{}: {b}", env::IMAGE_ENV_FILE));
            }
            Some(vars)
        }
        Err(_) => None,
    };
    let daemon = command.is_empty();
    let hint = match &image_env {
        Some(image_env) if daemon => env::no_agent_hint(&process_env, image_env),
        _ => None,
    };
    let mut merged = env::merge(image_env.as_deref().unwrap_or_default(), process_env);
    env::add_editor(&mut merged, &|p| p.is_file());
    let wants_agent = [
        "CODER_AGENT_URL",
        "CODER_AGENT_BOOTSTRAP",
        "CODER_AGENT_TOKEN_FILE",
    ]
    .iter()
    .any(|k| merged.contains_key(*k));
    if !daemon
        && !wants_agent
        && !merged
            .get("HAKIM_INIT_VERBOSE")
            .is_some_and(|v| env::truthy(v))
    {
        crate::supervisor::set_quiet(true);
    }
    log(format!(
        "pid {} received environment: {}",
        std::process::id(),
        names.join(" ")
    ));
    let no_agent = [
        crate::agent_config::ENV_URL,
        crate::agent_config::ENV_TOKEN,
        crate::agent_config::ENV_TOKEN_FILE,
        crate::agent_config::ENV_BOOTSTRAP,
    ]
    .iter()
    .all(|k| merged.get(*k).is_none_or(|v| v.trim().is_empty()));
    if let Some(hint) = hint.filter(|_| no_agent) {
        crate::supervisor::warn(hint);
    }

    let sys = RealSys;
    let user = prepare_workspace(&sys, &merged, is_pid1, daemon);

    let mut sup = Supervisor::new(is_pid1);
    sup.final_grace = secs_env(&merged, "HAKIM_FINAL_GRACE", Duration::from_secs(3));
    sup.agent_recheck = secs_env(&merged, "HAKIM_AGENT_RECHECK", Duration::from_secs(60));
    let (public_env, too_big) = env::without_oversized(
        merged
            .iter()
            .filter(|(k, _)| !crate::agent_config::is_secret_env(k))
            .map(|(k, v)| (k.clone(), v.clone())),
    );
    for (name, len) in too_big {
        log(format!(
            "environment variable {name} is {len} bytes, more than the {} KiB a program \
             can be started with; not passed to any child",
            env::MAX_ENV_STRING / 1024
        ));
    }

    // The user's session: a login's variables, the runtime dir, the session services.
    let login = user.as_ref().map(|u| {
        let dir = session::runtime_dir(u.uid);
        if let Err(e) = session::ensure_runtime_dir(&dir, u.uid, u.gid) {
            warn(format!("user session: {e}"));
        }
        session::login_env(u, merged.get("PATH").map_or("", String::as_str))
    });
    let session_env = login
        .as_ref()
        .filter(|_| session::wanted(&merged))
        .map(|login| session::expansion_env(&merged, login));
    let loaded = services::load(
        Path::new(services::SERVICES_DIR),
        &merged,
        session_env.as_ref(),
        &|p| p.exists(),
    );
    for note in &loaded.notes {
        log(note);
    }
    // What the session services export, in start order: each gets what came before.
    let mut exports: Vec<(String, String)> = Vec::new();
    for s in loaded.services {
        let (ids, mut env) = match (&user, &login) {
            (Some(u), Some(login)) if s.session => {
                seed_files(&s, u);
                let mut env = session::with_login(&public_env, login);
                env.extend(exports.iter().cloned());
                (Some(u.ids()), env)
            }
            _ => (workspace::resolve_ids(&s.user, &user), public_env.clone()),
        };
        env.extend(s.env.iter().cloned());
        if s.session {
            exports.extend(s.export.iter().cloned());
        }
        sup.add_service(
            UnitSpec {
                name: s.name.clone(),
                argv: s.argv.clone(),
                env,
                cwd: s.cwd.clone(),
                ids,
                restart: s.restart,
                stop_signal: s.stop_signal,
                stop_grace: s.stop_grace,
                ready: s.ready.clone(),
                after: s.after.clone(),
                clean: s.clean.clone(),
                dirs: s.dirs.clone(),
                capture: true,
                backoff_max: Duration::from_secs(60),
                oneshot: (s.kind == services::Kind::Oneshot).then_some(s.timeout),
                requires: s.requires_later.clone(),
            },
            s.before_agent,
        );
    }

    crate::agent::declare(&mut sup, &merged, &public_env, user.as_ref(), &exports);

    if !daemon {
        sup.add_main(UnitSpec {
            name: command[0].clone(),
            argv: command.clone(),
            env: public_env.clone(),
            cwd: std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/")),
            ids: None,
            restart: Restart::Never,
            stop_signal: libc::SIGTERM,
            stop_grace: secs_env(&merged, "HAKIM_STOP_GRACE", Duration::from_secs(10)),
            ready: None,
            after: Vec::new(),
            clean: Vec::new(),
            dirs: Vec::new(),
            capture: false,
            backoff_max: Duration::from_secs(60),
            oneshot: None,
            requires: Vec::new(),
        });
    }

    let ending = sup.run();
    nix::unistd::sync();
    match ending {
        Ending::Exit(code) => {
            log(format!("exiting with status {code}"));
            code
        }
        Ending::Reboot => {
            log("rebooting");
            // In a container, reboot(2) from PID 1 ends the container with SIGHUP,
            // which LXC reads as "restart me". Without CAP_SYS_BOOT: just exit.
            if is_pid1 {
                let Err(e) = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
                log(format!("reboot not permitted ({e}); exiting"));
            }
            0
        }
    }
}

/// A session service's `seed` files, written as the user where nothing is yet.
fn seed_files(s: &services::Service, user: &WorkspaceUser) {
    for seed in &s.seeds {
        let path = Path::new(&seed.path);
        match session::write_seed(path, seed.content.as_bytes(), seed.mode, user.uid, user.gid) {
            Ok(true) => log(format!("{}: seeded {}", s.name, path.display())),
            Ok(false) => {}
            Err(e) => warn(format!("{}: cannot seed {}: {e}", s.name, path.display())),
        }
    }
}

/// Mounts, machine-id, user and home. Problems are logged, never fatal.
fn prepare_workspace(
    sys: &dyn Syscall,
    env: &Env,
    is_pid1: bool,
    daemon: bool,
) -> Option<WorkspaceUser> {
    if is_pid1 {
        // Invalid ids fall back to their defaults; prepare_user logs why.
        let (uid, gid, _) = workspace::user_ids(env);
        for note in crate::mounts::ensure_mounts(sys, daemon.then_some((uid, gid))) {
            log(note);
        }
        ensure_machine_id(sys);
    }
    if !daemon
        && !env.contains_key("CODER_AGENT_URL")
        && !env.contains_key("CODER_AGENT_BOOTSTRAP")
        && !env.contains_key("CODER_AGENT_TOKEN_FILE")
    {
        // Plain command mode (Docker, devcontainers): no workspace to prepare.
        return None;
    }
    workspace::prepare_user(env)
}

/// An empty or missing /etc/machine-id gets 32 random hex digits (dbus and
/// journald need one; images ship it empty so clones differ).
fn ensure_machine_id(sys: &dyn Syscall) {
    let path = Path::new("/etc/machine-id");
    let current = sys.read(path).unwrap_or_default();
    if current.iter().any(|b| !b.is_ascii_whitespace()) {
        return;
    }
    let mut bytes = [0u8; 16];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .is_err()
    {
        return;
    }
    let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    match sys.write_atomic(path, format!("{id}\n").as_bytes(), 0o444) {
        Ok(()) => log("generated /etc/machine-id"),
        Err(e) => log(format!("cannot write /etc/machine-id: {e}")),
    }
}

//! Declared services: one TOML file per service in `/etc/hakim/services/`.
//!
//! Why TOML, one file each: an image adds or drops a service with a single
//! `COPY`, files are typed and commented, and the `toml` crate is small and well
//! kept. Example (`dockerd.toml`):
//!
//! ```toml
//! command = ["dockerd", "--data-root", "${DOCKER_DATA_ROOT:-/var/lib/docker}"]
//! enable_env = "START_DOCKER_DAEMON"   # truthy to run; unset → enable_default
//! enable_default = true
//! requires = ["/usr/bin/dockerd"]      # paths that must exist, else skipped
//! clean = ["/run/docker.pid", "/run/docker.sock"]  # removed before each start
//! dirs = ["/run/docker"]                # created (0755) before each start
//! ready = { path = "/run/docker.sock", timeout = 30 }
//! after = ["dbus"]
//! restart = "always"
//! stop_signal = "SIGTERM"
//! stop_grace = 15
//! ```
//!
//! Two further kinds of service (see docs/init.md):
//! - `type = "oneshot"`: runs to completion (within `timeout`, default 300 s) before what is
//!   `after` it; never restarted; a failure or overrun is logged and does not stop the workspace.
//! - `session = true`: part of the user's session (see [`crate::session`]): runs as the workspace
//!   user with a login-like environment, is expanded with it, and `export`s variables to the agent.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::env::{expand, truthy, Env};

pub const SERVICES_DIR: &str = "/etc/hakim/services";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Restart {
    #[default]
    Always,
    OnFailure,
    Never,
}

/// How a service runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// Runs as long as the workspace, restarted by `restart`.
    #[default]
    Simple,
    /// Runs to completion before what comes `after` it.
    Oneshot,
}

/// A file a session service needs before its first start, written as the user when missing.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Seed {
    /// Expanded like the command (`${HOME}/...`).
    pub path: String,
    pub content: String,
    #[serde(default = "default_seed_mode")]
    pub mode: u32,
}

fn default_seed_mode() -> u32 {
    0o600
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Ready {
    /// Ready when this path exists (e.g. a socket).
    pub path: Option<String>,
    /// Ready when a TCP connect to `host:port` succeeds.
    pub tcp: Option<String>,
    /// Ready when this command exits 0.
    pub command: Option<Vec<String>>,
    /// Seconds to wait before starting dependants anyway (with a warning).
    #[serde(default = "default_ready_timeout")]
    pub timeout: u64,
}

fn default_ready_timeout() -> u64 {
    30
}
fn default_grace() -> u64 {
    10
}
fn default_true() -> bool {
    true
}
fn default_user() -> String {
    "root".into()
}
fn default_stop_signal() -> String {
    "SIGTERM".into()
}
fn default_oneshot_timeout() -> u64 {
    300
}

/// The file format (see the module docs).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceFile {
    pub name: Option<String>,
    #[serde(default, rename = "type")]
    pub kind: Kind,
    /// One-shot services: seconds before the run is killed (SIGKILL to its process group).
    #[serde(default = "default_oneshot_timeout")]
    pub timeout: u64,
    pub command: Vec<String>,
    #[serde(default = "default_user")]
    pub user: String,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub enable_env: Option<String>,
    #[serde(default = "default_true")]
    pub enable_default: bool,
    #[serde(default)]
    pub requires: Vec<String>,
    /// Paths of which none may exist (a one-shot that installs what is missing).
    #[serde(default)]
    pub unless_exists: Vec<String>,
    /// Variables that must have exactly these values (after the defaults).
    #[serde(default)]
    pub only_if_env: BTreeMap<String, String>,
    /// Part of the user's session (runs as the workspace user; see the module docs).
    #[serde(default)]
    pub session: bool,
    /// Session services: variables handed to the agent and to later session services.
    #[serde(default)]
    pub export: BTreeMap<String, String>,
    /// Session services: files written as the user before the first start, when missing.
    #[serde(default)]
    pub seed: Vec<Seed>,
    #[serde(default)]
    pub clean: Vec<String>,
    #[serde(default)]
    pub dirs: Vec<String>,
    pub ready: Option<Ready>,
    #[serde(default)]
    pub after: Vec<String>,
    #[serde(default)]
    pub restart: Restart,
    #[serde(default = "default_stop_signal")]
    pub stop_signal: String,
    #[serde(default = "default_grace")]
    pub stop_grace: u64,
    /// Whether the Coder agent waits for this service to be ready.
    #[serde(default = "default_true")]
    pub before_agent: bool,
    pub cwd: Option<String>,
}

/// A service ready to run: variables expanded, signal resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub kind: Kind,
    /// One-shot services: how long a run may take.
    pub timeout: Duration,
    pub argv: Vec<String>,
    pub user: String,
    pub env: Vec<(String, String)>,
    /// Paths that were missing at load but that a one-shot this service comes after may
    /// create: checked again when it is due to start.
    pub requires_later: Vec<PathBuf>,
    pub session: bool,
    pub export: Vec<(String, String)>,
    pub seeds: Vec<Seed>,
    pub clean: Vec<PathBuf>,
    pub dirs: Vec<PathBuf>,
    pub ready: Option<Ready>,
    pub after: Vec<String>,
    pub restart: Restart,
    pub stop_signal: i32,
    pub stop_grace: Duration,
    pub before_agent: bool,
    pub cwd: PathBuf,
}

/// Signal names (with or without `SIG`) or numbers.
pub fn parse_signal(s: &str) -> Option<i32> {
    if let Ok(n) = s.parse::<i32>() {
        return (1..=64).contains(&n).then_some(n);
    }
    let name = s.trim().to_ascii_uppercase();
    let name = name.strip_prefix("SIG").unwrap_or(&name);
    Some(match name {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "KILL" => libc::SIGKILL,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "TERM" => libc::SIGTERM,
        "PWR" => libc::SIGPWR,
        "WINCH" => libc::SIGWINCH,
        "CONT" => libc::SIGCONT,
        "STOP" => libc::SIGSTOP,
        // Kernel number, not glibc's SIGRTMIN (which reserves two for threads).
        "RTMIN+3" => 37,
        _ => return None,
    })
}

/// Outcome of loading the services directory.
#[derive(Debug, Default)]
pub struct Loaded {
    pub services: Vec<Service>,
    /// Enabled-state decisions and problems, one line each.
    pub notes: Vec<String>,
}

/// Reads every `*.toml` in `dir` (sorted by name), decides which are enabled,
/// and orders them so each comes after what it names in `after`. A broken file
/// is reported and skipped; it never stops the others. `session_env` is the
/// environment of the user's session ([`crate::session`]); without one (no
/// workspace user, `HAKIM_USER_SESSION=0`) session services are not started.
pub fn load(
    dir: &Path,
    env: &Env,
    session_env: Option<&Env>,
    exists: &dyn Fn(&Path) -> bool,
) -> Loaded {
    let mut loaded = Loaded::default();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return loaded;
    };
    let mut files: Vec<PathBuf> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    let mut services = Vec::new();
    let mut known = Vec::new();
    for path in files {
        let stem = path
            .file_stem()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => {
                loaded.notes.push(format!(
                    "service {stem}: cannot read {}: {e}",
                    path.display()
                ));
                continue;
            }
        };
        known.push(stem.clone());
        match parse(&stem, &text, env, session_env, exists) {
            Ok(Parsed::Enabled(s)) => services.push(*s),
            Ok(Parsed::Disabled(None)) => loaded.notes.push(format!("service {stem}: disabled")),
            Ok(Parsed::Disabled(Some(why))) => loaded
                .notes
                .push(format!("service {stem}: disabled ({why})")),
            Err(e) => loaded.notes.push(format!("service {stem}: {e}; skipped")),
        }
    }
    let services = settle_requires(services, &mut loaded.notes);
    let (ordered, notes) = order(services, &known);
    loaded.services = ordered;
    loaded.notes.extend(notes);
    loaded
}

/// What [`parse`] decided.
#[derive(Debug)]
pub enum Parsed {
    Enabled(Box<Service>),
    /// Off by one of its conditions: `None` for its enable switch, else which condition.
    Disabled(Option<String>),
}

/// A service whose `requires` are missing is dropped, unless it comes `after` an enabled
/// one-shot, which may create them: then they are checked again when it is due.
fn settle_requires(services: Vec<Service>, notes: &mut Vec<String>) -> Vec<Service> {
    let oneshots: Vec<String> = services
        .iter()
        .filter(|s| s.kind == Kind::Oneshot)
        .map(|s| s.name.clone())
        .collect();
    services
        .into_iter()
        .filter(|s| {
            let deferred = s.after.iter().any(|a| oneshots.contains(a));
            if !s.requires_later.is_empty() && !deferred {
                notes.push(format!(
                    "service {}: disabled ({} missing)",
                    s.name,
                    s.requires_later[0].display()
                ));
                return false;
            }
            true
        })
        .collect()
}

fn expand_ready(ready: &Ready, env: &Env) -> Ready {
    Ready {
        path: ready.path.as_ref().map(|p| expand(p, env)),
        tcp: ready.tcp.as_ref().map(|t| expand(t, env)),
        command: ready
            .command
            .as_ref()
            .map(|c| c.iter().map(|a| expand(a, env)).collect()),
        timeout: ready.timeout,
    }
}

/// Parses one file. A session service is expanded with `session_env` (and is
/// disabled without one); any other with `env`.
pub fn parse(
    stem: &str,
    text: &str,
    env: &Env,
    session_env: Option<&Env>,
    exists: &dyn Fn(&Path) -> bool,
) -> Result<Parsed, String> {
    let file: ServiceFile = toml::from_str(text).map_err(|e| format!("invalid TOML: {e}"))?;
    let name = file.name.clone().unwrap_or_else(|| stem.to_string());
    if file.command.is_empty() {
        return Err("command is empty".into());
    }
    if !file.session && (!file.export.is_empty() || !file.seed.is_empty()) {
        return Err("export and seed need session = true".into());
    }
    let enabled = match &file.enable_env {
        Some(var) => env.get(var).map_or(file.enable_default, |v| truthy(v)),
        None => file.enable_default,
    };
    if !enabled {
        return Ok(Parsed::Disabled(None));
    }
    for (var, want) in &file.only_if_env {
        let have = env.get(var).map_or("", String::as_str);
        if have != want {
            return Ok(Parsed::Disabled(Some(format!("{var} is not {want:?}"))));
        }
    }
    let env = match (file.session, session_env) {
        (false, _) => env,
        (true, Some(session)) => session,
        (true, None) => {
            return Ok(Parsed::Disabled(Some(
                "no user session: no workspace user, or HAKIM_USER_SESSION=0".into(),
            )))
        }
    };
    for path in &file.unless_exists {
        let path = expand(path, env);
        if exists(Path::new(&path)) {
            return Ok(Parsed::Disabled(Some(format!("{path} exists"))));
        }
    }
    let requires_later: Vec<PathBuf> = file
        .requires
        .iter()
        .map(|r| PathBuf::from(expand(r, env)))
        .filter(|r| !exists(r))
        .collect();
    let stop_signal = parse_signal(&file.stop_signal)
        .ok_or_else(|| format!("unknown stop_signal '{}'", file.stop_signal))?;
    let mut svc_env: Vec<(String, String)> = Vec::new();
    for (k, v) in &file.env {
        if !crate::env::valid_name(k) {
            return Err(format!("invalid env name '{k}'"));
        }
        svc_env.push((k.clone(), expand(v, env)));
    }
    let mut export = Vec::new();
    for (k, v) in &file.export {
        if !crate::env::valid_name(k) {
            return Err(format!("invalid export name '{k}'"));
        }
        export.push((k.clone(), expand(v, env)));
    }
    if let Some(r) = &file.ready {
        if r.path.is_none() && r.tcp.is_none() && r.command.as_ref().is_none_or(|c| c.is_empty()) {
            return Err("ready needs path, tcp or command".into());
        }
    }
    let (restart, ready) = match file.kind {
        // Done is ready: a one-shot's end is what its dependants wait for.
        Kind::Oneshot => (Restart::Never, None),
        Kind::Simple => (
            file.restart,
            file.ready.as_ref().map(|r| expand_ready(r, env)),
        ),
    };
    Ok(Parsed::Enabled(Box::new(Service {
        name,
        kind: file.kind,
        timeout: Duration::from_secs(file.timeout),
        argv: file.command.iter().map(|a| expand(a, env)).collect(),
        user: expand(&file.user, env),
        env: svc_env,
        requires_later,
        session: file.session,
        export,
        seeds: file
            .seed
            .iter()
            .map(|s| Seed {
                path: expand(&s.path, env),
                content: s.content.clone(),
                mode: s.mode,
            })
            .collect(),
        clean: file
            .clean
            .iter()
            .map(|c| PathBuf::from(expand(c, env)))
            .collect(),
        dirs: file
            .dirs
            .iter()
            .map(|d| PathBuf::from(expand(d, env)))
            .collect(),
        ready,
        after: file.after,
        restart,
        stop_signal,
        stop_grace: Duration::from_secs(file.stop_grace),
        before_agent: file.before_agent || file.session,
        cwd: PathBuf::from(
            file.cwd
                .map_or_else(|| "/".to_string(), |c| expand(&c, env)),
        ),
    })))
}

/// Orders services so dependencies start first (stable by file name otherwise).
/// `after` names of services that are not enabled are dropped, with a note when
/// no file of that name (`known`) exists; a cycle is broken with a note.
pub fn order(services: Vec<Service>, known: &[String]) -> (Vec<Service>, Vec<String>) {
    let mut notes = Vec::new();
    let names: Vec<String> = services.iter().map(|s| s.name.clone()).collect();
    let mut pending: Vec<Service> = services
        .into_iter()
        .map(|mut s| {
            let unknown = s
                .after
                .iter()
                .any(|a| !names.contains(a) && !known.contains(a));
            s.after.retain(|a| names.contains(a));
            if unknown {
                notes.push(format!(
                    "service {}: 'after' names a service that does not exist; ignored",
                    s.name
                ));
            }
            s
        })
        .collect();
    let mut ordered: Vec<Service> = Vec::new();
    while !pending.is_empty() {
        let pos = pending
            .iter()
            .position(|s| s.after.iter().all(|a| ordered.iter().any(|o| &o.name == a)));
        match pos {
            Some(i) => ordered.push(pending.remove(i)),
            None => {
                let s = pending.remove(0);
                notes.push(format!(
                    "service {}: dependency cycle; starting it anyway",
                    s.name
                ));
                ordered.push(s);
            }
        }
    }
    (ordered, notes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Env {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const DOCKERD: &str = r#"
command = ["dockerd", "--data-root", "${DOCKER_DATA_ROOT:-/var/lib/docker}", "--storage-driver", "${DOCKER_STORAGE_DRIVER:-vfs}"]
enable_env = "START_DOCKER_DAEMON"
requires = ["/usr/bin/dockerd"]
clean = ["/run/docker.pid"]
ready = { path = "/run/docker.sock", timeout = 20 }
after = ["dbus"]
stop_grace = 15
"#;

    #[test]
    fn parses_and_expands() {
        let yes = |_: &Path| true;
        let s = enabled(parse(
            "dockerd",
            DOCKERD,
            &env(&[("DOCKER_DATA_ROOT", "/data")]),
            None,
            &yes,
        ));
        assert_eq!(
            s.argv,
            ["dockerd", "--data-root", "/data", "--storage-driver", "vfs"]
        );
        assert_eq!(s.stop_signal, libc::SIGTERM);
        assert_eq!(s.stop_grace, Duration::from_secs(15));
        assert_eq!(s.ready.as_ref().unwrap().timeout, 20);
        assert_eq!(s.restart, Restart::Always);
    }

    fn enabled(p: Result<Parsed, String>) -> Service {
        match p {
            Ok(Parsed::Enabled(s)) => *s,
            other => panic!("not enabled: {other:?}"),
        }
    }

    fn is_on(p: Result<Parsed, String>) -> bool {
        matches!(p.unwrap(), Parsed::Enabled(_))
    }

    #[test]
    fn enable_conditions() {
        let yes = |_: &Path| true;
        let no = |_: &Path| false;
        let on =
            |e: &Env, exists: &dyn Fn(&Path) -> bool| is_on(parse("d", DOCKERD, e, None, exists));
        assert!(!on(&env(&[("START_DOCKER_DAEMON", "0")]), &yes));
        assert!(on(&env(&[("START_DOCKER_DAEMON", "yes")]), &yes));
        // Unset → enable_default (true).
        assert!(on(&env(&[]), &yes));
        // Binary missing: kept with the path to check later, then dropped by `load`
        // unless a one-shot comes first (see `requires_wait_for_a_oneshot`).
        let s = enabled(parse("d", DOCKERD, &env(&[]), None, &no));
        assert_eq!(s.requires_later, [PathBuf::from("/usr/bin/dockerd")]);
    }

    #[test]
    fn only_if_env_and_unless_exists() {
        let text = "command = [\"x\"]\nonly_if_env = { DISPLAY = \":99\" }\n\
                    unless_exists = [\"${ROOT}/done\"]";
        let e = env(&[("DISPLAY", ":99"), ("ROOT", "/r")]);
        assert!(is_on(parse("x", text, &e, None, &|_| false)));
        let p = parse("x", text, &e, None, &|p| p == Path::new("/r/done")).unwrap();
        assert!(matches!(p, Parsed::Disabled(Some(w)) if w == "/r/done exists"));
        let p = parse("x", text, &env(&[("DISPLAY", ":1")]), None, &|_| false).unwrap();
        assert!(matches!(p, Parsed::Disabled(Some(w)) if w.contains("DISPLAY")));
        assert!(!is_on(parse("x", text, &env(&[]), None, &|_| false)));
    }

    #[test]
    fn oneshot_is_never_restarted_and_has_a_timeout() {
        let yes = |_: &Path| true;
        let s = enabled(parse(
            "o",
            "type = \"oneshot\"\ncommand = [\"x\"]\nrestart = \"always\"\nready = { path = \"/p\" }",
            &env(&[]),
            None,
            &yes,
        ));
        assert_eq!(
            (s.kind, s.restart, s.ready),
            (Kind::Oneshot, Restart::Never, None)
        );
        assert_eq!(s.timeout, Duration::from_secs(300));
        let s = enabled(parse(
            "o",
            "type = \"oneshot\"\ntimeout = 900\ncommand = [\"x\"]",
            &env(&[]),
            None,
            &yes,
        ));
        assert_eq!(s.timeout, Duration::from_secs(900));
        let s = enabled(parse("s", "command = [\"x\"]", &env(&[]), None, &yes));
        assert_eq!(s.kind, Kind::Simple);
    }

    #[test]
    fn session_services_use_the_session_environment() {
        let yes = |_: &Path| true;
        let text = r#"
session = true
command = ["/usr/bin/dbus-daemon", "--address=unix:path=${XDG_RUNTIME_DIR}/bus"]
ready = { path = "${XDG_RUNTIME_DIR}/bus" }
export = { DBUS_SESSION_BUS_ADDRESS = "unix:path=${XDG_RUNTIME_DIR}/bus" }
before_agent = false
[[seed]]
path = "${HOME}/.local/share/keyrings/default"
content = "login"
"#;
        let session = env(&[
            ("XDG_RUNTIME_DIR", "/run/user/1000"),
            ("HOME", "/home/coder"),
        ]);
        let s = enabled(parse("bus", text, &env(&[]), Some(&session), &yes));
        assert_eq!(s.argv[1], "--address=unix:path=/run/user/1000/bus");
        assert_eq!(s.ready.unwrap().path.as_deref(), Some("/run/user/1000/bus"));
        assert_eq!(
            s.export,
            [(
                "DBUS_SESSION_BUS_ADDRESS".to_string(),
                "unix:path=/run/user/1000/bus".to_string()
            )]
        );
        assert_eq!(s.seeds[0].path, "/home/coder/.local/share/keyrings/default");
        assert_eq!(s.seeds[0].mode, 0o600);
        // The agent always waits for its session.
        assert!(s.session && s.before_agent);
        let p = parse("bus", text, &env(&[]), None, &yes).unwrap();
        assert!(matches!(p, Parsed::Disabled(Some(w)) if w.contains("no user session")));
        // export and seed belong to session services only.
        let e = parse(
            "x",
            "command = [\"x\"]\nexport = { A = \"1\" }",
            &env(&[]),
            None,
            &yes,
        );
        assert!(e.unwrap_err().contains("session"));
    }

    #[test]
    fn requires_wait_for_a_oneshot() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("install.toml"),
            "type = \"oneshot\"\ncommand = [\"/bin/install\"]",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("daemon.toml"),
            "command = [\"/opt/daemon\"]\nrequires = [\"/opt/daemon\"]\nafter = [\"install\"]",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("other.toml"),
            "command = [\"/opt/other\"]\nrequires = [\"/opt/other\"]",
        )
        .unwrap();
        let missing = |p: &Path| !p.starts_with("/opt");
        let loaded = load(dir.path(), &env(&[]), None, &missing);
        let names: Vec<&str> = loaded.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["install", "daemon"], "{:?}", loaded.notes);
        assert_eq!(
            loaded.services[1].requires_later,
            [PathBuf::from("/opt/daemon")]
        );
        assert!(loaded
            .notes
            .contains(&"service other: disabled (/opt/other missing)".to_string()));
        // Without the one-shot, the daemon is dropped as before; naming a disabled
        // service in `after` is no problem worth a note.
        std::fs::write(
            dir.path().join("install.toml"),
            "type = \"oneshot\"\ncommand = [\"/bin/install\"]\nenable_default = false",
        )
        .unwrap();
        let loaded = load(dir.path(), &env(&[]), None, &missing);
        assert!(loaded.services.is_empty());
        assert!(
            !loaded.notes.iter().any(|n| n.contains("does not exist")),
            "{:?}",
            loaded.notes
        );
    }

    #[test]
    fn bad_files_are_clear_errors() {
        let yes = |_: &Path| true;
        let e = |t: &str| parse("x", t, &env(&[]), None, &yes).unwrap_err();
        assert!(e("command = []").contains("empty"));
        assert!(e("command = [\"a\"]\nstop_signal = \"SIGNOPE\"").contains("stop_signal"));
        assert!(e("command = [\"a\"]\nbogus = 1").contains("invalid TOML"));
        assert!(e("command = [\"a\"]\nready = { timeout = 3 }").contains("ready needs"));
        assert!(e("not toml at all [").contains("invalid TOML"));
    }

    #[test]
    fn signals() {
        assert_eq!(parse_signal("SIGRTMIN+3"), Some(37));
        assert_eq!(parse_signal("term"), Some(15));
        assert_eq!(parse_signal("10"), Some(10));
        assert_eq!(parse_signal("99"), None);
    }

    #[test]
    fn ordering_follows_after() {
        let yes = |_: &Path| true;
        let mk = |name: &str, after: &str| {
            let text = format!("command = [\"x\"]\nafter = [{after}]");
            enabled(parse(name, &text, &env(&[]), None, &yes))
        };
        let (o, notes) = order(
            vec![
                mk("a", "\"c\""),
                mk("b", ""),
                mk("c", "\"b\""),
                mk("d", "\"missing\""),
            ],
            &[],
        );
        let names: Vec<&str> = o.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["b", "c", "a", "d"]);
        assert_eq!(notes.len(), 1);
        let (o, notes) = order(vec![mk("x", "\"y\""), mk("y", "\"x\"")], &[]);
        assert_eq!(o.len(), 2);
        assert!(notes[0].contains("cycle"));
    }

    #[test]
    fn load_skips_broken_files_and_keeps_others() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.toml"), "command = [\"/bin/a\"]").unwrap();
        std::fs::write(dir.path().join("b.toml"), "garbage [").unwrap();
        std::fs::write(dir.path().join("c.txt"), "ignored").unwrap();
        let loaded = load(dir.path(), &env(&[]), None, &|_| true);
        assert_eq!(loaded.services.len(), 1);
        assert!(loaded.notes.iter().any(|n| n.starts_with("service b:")));
    }
}

#[cfg(test)]
mod shipped {
    use super::*;

    fn names(loaded: &Loaded) -> Vec<&str> {
        loaded.services.iter().map(|s| s.name.as_str()).collect()
    }

    /// The example files in `images/services/` must parse and mean what they say.
    #[test]
    fn shipped_service_files_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/services");
        let env = crate::env::merge(&[], Vec::new());
        let session: Env = [
            ("HOME", "/home/coder"),
            ("XDG_RUNTIME_DIR", "/run/user/1000"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .chain(env.clone())
        .collect();
        let loaded = load(&dir, &env, Some(&session), &|_| true);
        assert_eq!(
            names(&loaded),
            [
                "dbus",
                "dockerd",
                "nix-daemon",
                "session-dbus",
                "session-keyring",
                "session-ssh-agent",
                "xvfb"
            ],
            "{:?}",
            loaded.notes
        );
        let by = |n: &str| loaded.services.iter().find(|s| s.name == n).unwrap();
        let docker = by("dockerd");
        assert!(docker.argv.contains(&"/var/lib/docker".to_string()));
        assert!(docker.argv.contains(&"vfs".to_string()));
        assert_eq!(docker.after, ["dbus"]);
        assert_eq!(by("dbus").dirs, [PathBuf::from("/run/dbus")]);
        // The session: fixed addresses in the runtime dir, exported to the agent.
        let bus = by("session-dbus");
        assert!(bus.session);
        assert_eq!(
            bus.argv.last().unwrap(),
            "--address=unix:path=/run/user/1000/bus"
        );
        let exports: Vec<(String, String)> = loaded
            .services
            .iter()
            .flat_map(|s| s.export.clone())
            .collect();
        let want = [
            ("DBUS_SESSION_BUS_ADDRESS", "unix:path=/run/user/1000/bus"),
            ("GNOME_KEYRING_CONTROL", "/run/user/1000/keyring"),
            ("SSH_AUTH_SOCK", "/run/user/1000/gcr/ssh"),
        ];
        assert_eq!(exports, want.map(|(k, v)| (k.to_string(), v.to_string())));
        let keyring = by("session-keyring");
        let seeds: Vec<&str> = keyring.seeds.iter().map(|s| s.path.as_str()).collect();
        assert_eq!(
            seeds,
            [
                "/home/coder/.local/share/keyrings/login.keyring",
                "/home/coder/.local/share/keyrings/default"
            ]
        );
        assert!(keyring.seeds[0].content.starts_with("[keyring]\n"));
        assert_eq!(keyring.after, ["session-dbus"]);
        // Xvfb runs by default on :99, not on another display, not when turned off.
        assert_eq!(by("xvfb").argv[1], ":99");
        let mut other = env.clone();
        other.insert("DISPLAY".into(), ":1".into());
        assert!(!names(&load(&dir, &other, Some(&session), &|_| true)).contains(&"xvfb"));
        let mut off = env.clone();
        off.insert("START_XVFB".into(), "0".into());
        assert!(!names(&load(&dir, &off, Some(&session), &|_| true)).contains(&"xvfb"));
        // No user session: no session services.
        let loaded = load(&dir, &env, None, &|_| true);
        assert!(!names(&loaded).iter().any(|n| n.starts_with("session-")));
    }

    /// nix-bootstrap: off unless asked for, skipped when Nix is there, and nix-daemon
    /// waits for it even though its binary is missing at boot.
    #[test]
    fn shipped_nix_bootstrap() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/services");
        let daemon = Path::new("/nix/var/nix/profiles/default/bin/nix-daemon");
        let no_nix = |p: &Path| p != daemon;
        let mut env = crate::env::merge(&[], Vec::new());
        let loaded = load(&dir, &env, None, &no_nix);
        assert!(!names(&loaded).contains(&"nix-bootstrap"));
        assert!(!names(&loaded).contains(&"nix-daemon"));
        env.insert("BOOTSTRAP_NIX_IF_MISSING".into(), "1".into());
        let loaded = load(&dir, &env, None, &no_nix);
        let n = names(&loaded);
        let (b, d) = (
            n.iter().position(|s| *s == "nix-bootstrap").unwrap(),
            n.iter().position(|s| *s == "nix-daemon").unwrap(),
        );
        assert!(b < d, "{n:?}");
        let boot = &loaded.services[b];
        assert_eq!(
            (boot.kind, boot.timeout),
            (Kind::Oneshot, Duration::from_secs(900))
        );
        assert!(boot.env.contains(&(
            "NIX_INSTALLER_URL".to_string(),
            "https://install.determinate.systems/nix".to_string()
        )));
        assert_eq!(loaded.services[d].requires_later, [daemon.to_path_buf()]);
        env.insert("NIX_INSTALLER_URL".into(), "http://mirror/nix".into());
        let loaded = load(&dir, &env, None, &no_nix);
        let boot = loaded
            .services
            .iter()
            .find(|s| s.name == "nix-bootstrap")
            .unwrap();
        assert!(boot.env.contains(&(
            "NIX_INSTALLER_URL".to_string(),
            "http://mirror/nix".to_string()
        )));
        // Nix already there: nothing to install.
        let loaded = load(&dir, &env, None, &|_| true);
        assert!(!names(&loaded).contains(&"nix-bootstrap"));
        assert!(names(&loaded).contains(&"nix-daemon"));
    }
}

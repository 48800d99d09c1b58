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

/// The file format (see the module docs).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceFile {
    pub name: Option<String>,
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
    pub argv: Vec<String>,
    pub user: String,
    pub env: Vec<(String, String)>,
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
/// is reported and skipped; it never stops the others.
pub fn load(dir: &Path, env: &Env, exists: &dyn Fn(&Path) -> bool) -> Loaded {
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
        match parse(&stem, &text, env, exists) {
            Ok(Some(s)) => services.push(s),
            Ok(None) => loaded.notes.push(format!("service {stem}: disabled")),
            Err(e) => loaded.notes.push(format!("service {stem}: {e}; skipped")),
        }
    }
    let (ordered, notes) = order(services);
    loaded.services = ordered;
    loaded.notes.extend(notes);
    loaded
}

/// Parses one file. `Ok(None)` = disabled by its condition.
pub fn parse(
    stem: &str,
    text: &str,
    env: &Env,
    exists: &dyn Fn(&Path) -> bool,
) -> Result<Option<Service>, String> {
    let file: ServiceFile = toml::from_str(text).map_err(|e| format!("invalid TOML: {e}"))?;
    let name = file.name.clone().unwrap_or_else(|| stem.to_string());
    if file.command.is_empty() {
        return Err("command is empty".into());
    }
    let enabled = match &file.enable_env {
        Some(var) => env.get(var).map_or(file.enable_default, |v| truthy(v)),
        None => file.enable_default,
    };
    if !enabled {
        return Ok(None);
    }
    for req in &file.requires {
        if !exists(Path::new(req)) {
            return Ok(None);
        }
    }
    let stop_signal = parse_signal(&file.stop_signal)
        .ok_or_else(|| format!("unknown stop_signal '{}'", file.stop_signal))?;
    let mut svc_env: Vec<(String, String)> = Vec::new();
    for (k, v) in &file.env {
        if !crate::env::valid_name(k) {
            return Err(format!("invalid env name '{k}'"));
        }
        svc_env.push((k.clone(), expand(v, env)));
    }
    if let Some(r) = &file.ready {
        if r.path.is_none() && r.tcp.is_none() && r.command.as_ref().is_none_or(|c| c.is_empty()) {
            return Err("ready needs path, tcp or command".into());
        }
    }
    Ok(Some(Service {
        name,
        argv: file.command.iter().map(|a| expand(a, env)).collect(),
        user: expand(&file.user, env),
        env: svc_env,
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
        ready: file.ready,
        after: file.after,
        restart: file.restart,
        stop_signal,
        stop_grace: Duration::from_secs(file.stop_grace),
        before_agent: file.before_agent,
        cwd: PathBuf::from(
            file.cwd
                .map_or_else(|| "/".to_string(), |c| expand(&c, env)),
        ),
    }))
}

/// Orders services so dependencies start first (stable by file name otherwise).
/// Unknown `after` names are dropped with a note; a cycle is broken with a note.
pub fn order(services: Vec<Service>) -> (Vec<Service>, Vec<String>) {
    let mut notes = Vec::new();
    let names: Vec<String> = services.iter().map(|s| s.name.clone()).collect();
    let mut pending: Vec<Service> = services
        .into_iter()
        .map(|mut s| {
            let before = s.after.len();
            s.after.retain(|a| names.contains(a));
            if s.after.len() != before {
                notes.push(format!(
                    "service {}: 'after' names a service that is not enabled; ignored",
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
        let s = parse(
            "dockerd",
            DOCKERD,
            &env(&[("DOCKER_DATA_ROOT", "/data")]),
            &yes,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            s.argv,
            ["dockerd", "--data-root", "/data", "--storage-driver", "vfs"]
        );
        assert_eq!(s.stop_signal, libc::SIGTERM);
        assert_eq!(s.stop_grace, Duration::from_secs(15));
        assert_eq!(s.ready.as_ref().unwrap().timeout, 20);
        assert_eq!(s.restart, Restart::Always);
    }

    #[test]
    fn enable_conditions() {
        let yes = |_: &Path| true;
        let no = |_: &Path| false;
        assert!(
            parse("d", DOCKERD, &env(&[("START_DOCKER_DAEMON", "0")]), &yes)
                .unwrap()
                .is_none()
        );
        assert!(
            parse("d", DOCKERD, &env(&[("START_DOCKER_DAEMON", "yes")]), &yes)
                .unwrap()
                .is_some()
        );
        // Unset → enable_default (true).
        assert!(parse("d", DOCKERD, &env(&[]), &yes).unwrap().is_some());
        // Binary missing → skipped.
        assert!(parse("d", DOCKERD, &env(&[]), &no).unwrap().is_none());
    }

    #[test]
    fn bad_files_are_clear_errors() {
        let yes = |_: &Path| true;
        let e = |t: &str| parse("x", t, &env(&[]), &yes).unwrap_err();
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
            parse(name, &text, &env(&[]), &yes).unwrap().unwrap()
        };
        let (o, notes) = order(vec![
            mk("a", "\"c\""),
            mk("b", ""),
            mk("c", "\"b\""),
            mk("d", "\"missing\""),
        ]);
        let names: Vec<&str> = o.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["b", "c", "a", "d"]);
        assert_eq!(notes.len(), 1);
        let (o, notes) = order(vec![mk("x", "\"y\""), mk("y", "\"x\"")]);
        assert_eq!(o.len(), 2);
        assert!(notes[0].contains("cycle"));
    }

    #[test]
    fn load_skips_broken_files_and_keeps_others() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.toml"), "command = [\"/bin/a\"]").unwrap();
        std::fs::write(dir.path().join("b.toml"), "garbage [").unwrap();
        std::fs::write(dir.path().join("c.txt"), "ignored").unwrap();
        let loaded = load(dir.path(), &env(&[]), &|_| true);
        assert_eq!(loaded.services.len(), 1);
        assert!(loaded.notes.iter().any(|n| n.starts_with("service b:")));
    }
}

#[cfg(test)]
mod shipped {
    use super::*;

    /// The example files in `images/services/` must parse and mean what they say.
    #[test]
    fn shipped_service_files_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/services");
        let env: Env = [("START_XVFB".to_string(), "1".to_string())]
            .into_iter()
            .collect();
        let loaded = load(&dir, &env, &|_| true);
        let names: Vec<&str> = loaded.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            ["dbus", "dockerd", "nix-daemon", "xvfb"],
            "{:?}",
            loaded.notes
        );
        let docker = &loaded.services[1];
        assert!(docker.argv.contains(&"/var/lib/docker".to_string()));
        assert!(docker.argv.contains(&"vfs".to_string()));
        assert_eq!(docker.after, ["dbus"]);
        assert_eq!(loaded.services[0].dirs, [PathBuf::from("/run/dbus")]);
        // Xvfb is off unless asked for.
        let loaded = load(&dir, &Env::new(), &|_| true);
        assert!(!loaded.services.iter().any(|s| s.name == "xvfb"));
    }
}

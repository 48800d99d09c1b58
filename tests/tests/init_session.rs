//! hakim-init's parity with the upstream entrypoint (issue 16), end to end with real parts.
//!
//! 1. The user's session in a Debian trixie root (`ci/build-session-root.sh`: dbus,
//!    gnome-keyring 48, gcr4, secret-tool, ssh-add) with the shipped `session-*.toml`, booted
//!    with hakim-init as PID 1 of a PID namespace and of a real LXC container. The agent
//!    (fake-coder) runs a probe with exactly its own environment: `secret-tool store` then
//!    `lookup` must give the secret back, `ssh-add -l` must reach an agent (exit 0 or 1, not 2),
//!    `XDG_RUNTIME_DIR` must be 0700 and the user's. The session processes run as the user;
//!    after the stop, the session was stopped after the agent, by the ordered stop (no
//!    process left for the final sweep), and no process of the container is left.
//! 2. The agent's environment against the table in docs/init.md (*The agent's environment*),
//!    with the session (and an `nvim` on `PATH`) and without (a busybox root).
//! 3. One-shots: run before their dependants; a failure and a timeout are logged, the
//!    overrunning one's process group is killed, the dependants and the agent start anyway.
//! 4. The shipped nix-bootstrap.toml with `BOOTSTRAP_NIX_IF_MISSING=1` and a stand-in
//!    installer served from 127.0.0.1 (the real installer needs the internet and is never
//!    run here): it gets upstream's arguments and creates `nix-daemon`, which then starts in
//!    the same boot, before the agent.
//!
//! Gating as in init_pid1.rs and init_lxc.rs (root, unshare, LXC; debootstrap for the root):
//! without them the tests print `skipping: … missing` and pass, unless `HAKIM_E2E=1`.

use std::path::Path;
use std::time::{Duration, Instant};

use hakim_e2e::init_harness::{
    fake_coder_bin, init_bin, init_ready, serial, Init, Line, Reply, Rootfs, Server, INIT_PATH,
};
use hakim_e2e::lxc::{self, AgentServer, Config, Container, RECORD};
use hakim_e2e::session_root::{session_root, Overlay};
use serde_json::Value;

const TOKEN: &str = "7d1a2c44-hakim-session-test-token";
const PROBE: &str = "/usr/local/bin/session-probe";
/// Where the probe reports, in the user's home.
const PROBE_OUT: &str = "/home/coder/session-probe.txt";
const SECRET: &str = "hakim-secret-4c1f";
const SESSION: [&str; 3] = ["session-dbus", "session-keyring", "session-ssh-agent"];

/// The probe the agent runs: what a terminal of the workspace would find.
fn probe_script() -> String {
    format!(
        r#"#!/bin/bash
out={PROBE_OUT}
{{
  echo "runtime=$(stat -c '%a %u %g' "$XDG_RUNTIME_DIR")"
  printf '%s' '{SECRET}' | secret-tool store --label=probe service hakim-test account probe
  echo "store=$?"
  echo "lookup=$(secret-tool lookup service hakim-test account probe)"
  ssh-add -l
  echo "ssh_add=$?"
}} >"$out.tmp" 2>&1
mv "$out.tmp" "$out"
"#
    )
}

fn session_gate() -> bool {
    let missing: Vec<String> = ["debootstrap"]
        .iter()
        .filter(|t| hakim_e2e::find_on_path(t).is_none())
        .map(|t| t.to_string())
        .collect();
    hakim_e2e::gate(&missing)
}

/// The Debian root made ready to boot: hakim-init, device nodes (a PID namespace has no
/// LXC to make them), the shipped session services, the probe, an `nvim` on `PATH`.
fn prepare_debian(root: &Overlay, init: &Path) {
    root.write(INIT_PATH, &std::fs::read(init).unwrap(), 0o755);
    for (name, minor) in [("null", 3), ("zero", 5), ("random", 8), ("urandom", 9)] {
        let p = root.path(&format!("dev/{name}"));
        let _ = std::fs::remove_file(&p);
        hakim_e2e::run_ok(
            std::process::Command::new("mknod")
                .args(["-m", "666"])
                .arg(&p)
                .args(["c", "1", &minor.to_string()]),
        );
    }
    root.install_services(&SESSION);
    root.write(PROBE, probe_script().as_bytes(), 0o755);
    root.write("/usr/bin/nvim", b"#!/bin/sh\nexit 0\n", 0o755);
}

/// The probe's report, once written.
fn wait_probe(root: &Overlay, timeout: Duration, ctx: &dyn Fn() -> String) -> String {
    let end = Instant::now() + timeout;
    loop {
        if let Ok(t) = std::fs::read_to_string(root.path(PROBE_OUT)) {
            return t;
        }
        assert!(
            Instant::now() < end,
            "the probe wrote nothing within {timeout:?}\n{}",
            ctx()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn check_probe(report: &str, ctx: &dyn Fn() -> String) {
    let get = |k: &str| {
        report
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("no {k}= in the probe's report:\n{report}\n{}", ctx()))
    };
    let all = || format!("probe report:\n{report}\n{}", ctx());
    assert_eq!(
        get("runtime"),
        "700 1000 1000",
        "XDG_RUNTIME_DIR\n{}",
        all()
    );
    assert_eq!(get("store"), "0", "secret-tool store\n{}", all());
    assert_eq!(get("lookup"), SECRET, "secret-tool lookup\n{}", all());
    // 0: keys listed, 1: an agent without keys; 2: no agent to talk to.
    assert!(
        ["0", "1"].contains(&get("ssh_add")),
        "ssh-add -l\n{}",
        all()
    );
}

/// One row of docs/init.md's *The agent's environment*.
#[derive(Debug)]
struct Row {
    names: Vec<String>,
    /// `None` when the value is described, not given.
    value: Option<String>,
    when: String,
}

fn doc_rows() -> Vec<Row> {
    let doc = std::fs::read_to_string(hakim_e2e::workspace_root().join("docs/init.md")).unwrap();
    let section = doc
        .split("### The agent's environment")
        .nth(1)
        .expect("docs/init.md has no 'The agent's environment' section");
    let ticked = |cell: &str| -> Vec<String> {
        cell.split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect()
    };
    let rows: Vec<Row> = section
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .skip(2)
        .map(|l| {
            let cells: Vec<&str> = l.trim_matches('|').split('|').map(str::trim).collect();
            Row {
                names: ticked(cells[0]),
                value: cells[1]
                    .starts_with('`')
                    .then(|| ticked(cells[1]).remove(0)),
                when: cells[2].to_string(),
            }
        })
        .collect();
    assert!(rows.len() > 10, "too few rows: {rows:?}");
    rows
}

/// What a boot had.
struct Booted<'a> {
    shell: &'a str,
    nvim: bool,
    session: bool,
    /// Names the container's environment gave hakim-init (they reach the agent as given).
    given: &'a [&'a str],
}

/// The agent's environment is what the table says, and nothing else but `given`.
fn check_env_against_docs(env: &Value, b: &Booted, ctx: &dyn Fn() -> String) {
    let env = env.as_object().expect("env object");
    let mut covered: Vec<String> = b.given.iter().map(|s| s.to_string()).collect();
    for row in doc_rows() {
        let expected = if row.when.starts_with("always") {
            true
        } else if row.when.contains("nvim") {
            b.nvim
        } else if row.when.contains("session-") {
            b.session
        } else {
            panic!("docs/init.md: unknown condition {:?}", row.when)
        };
        for name in &row.names {
            covered.push(name.clone());
            let got = env.get(name).and_then(Value::as_str);
            if !expected {
                assert_eq!(
                    got,
                    None,
                    "{name} ({}) should be unset\n{}",
                    row.when,
                    ctx()
                );
                continue;
            }
            let got = got.unwrap_or_else(|| panic!("the agent has no {name}\n{}", ctx()));
            if let Some(v) = &row.value {
                let want = v
                    .replace("$USER", "coder")
                    .replace("$UID", "1000")
                    .replace("$SHELL", b.shell);
                assert_eq!(
                    got,
                    want,
                    "agent env {name} against docs/init.md\n{}",
                    ctx()
                );
            }
        }
    }
    let extra: Vec<&String> = env.keys().filter(|k| !covered.contains(k)).collect();
    assert!(
        extra.is_empty(),
        "the agent has variables docs/init.md does not list: {extra:?}\n{}",
        ctx()
    );
}

fn index(lines: &[String], pred: impl Fn(&str) -> bool) -> Option<usize> {
    lines.iter().position(|l| pred(l))
}

/// Index of the first line containing `needle`; panics with the context without one.
fn line_at(lines: &[String], needle: &str, ctx: &dyn Fn() -> String) -> usize {
    index(lines, |l| l.contains(needle)).unwrap_or_else(|| panic!("no line {needle:?}\n{}", ctx()))
}

/// The console after a stop: each session service was stopped after the agent and
/// ended by its own stop signal; nothing was left for the sweep or had to be killed.
fn check_stop_order(console: &[String], ctx: &dyn Fn() -> String) {
    let at = |needle: &str| {
        index(console, |l| l.ends_with(needle))
            .unwrap_or_else(|| panic!("no line ending {needle:?}\n{}", ctx()))
    };
    let agent = at("hakim-init: stopping agent");
    for s in SESSION {
        let stop = at(&format!("hakim-init: stopping {s}"));
        assert!(agent < stop, "{s} stopped before the agent\n{}", ctx());
        assert!(
            console[stop..]
                .iter()
                .any(|l| l.contains(&format!("hakim-init: {s} exited with status"))),
            "{s} did not exit after its stop signal\n{}",
            ctx()
        );
    }
    for bad in ["processes left after every unit stopped", "killing it"] {
        assert!(
            !console.iter().any(|l| l.contains(bad)),
            "{bad:?} logged\n{}",
            ctx()
        );
    }
}

/// The session was up before the agent: every session service ready, then the agent started.
fn check_session_first(console: &[String], ctx: &dyn Fn() -> String) {
    let agent = index(console, |l| l.contains("hakim-init: started agent "))
        .unwrap_or_else(|| panic!("agent never started\n{}", ctx()));
    for s in SESSION {
        let ready = index(console, |l| {
            l.ends_with(&format!("hakim-init: {s} is ready"))
        })
        .unwrap_or_else(|| panic!("{s} never ready\n{}", ctx()));
        assert!(
            ready < agent,
            "the agent started before {s} was ready\n{}",
            ctx()
        );
    }
}

/// `(name, uid)` of the processes in `ns` (a `/proc/PID/ns/pid` link), from the host.
fn procs_in(ns: &Path) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if std::fs::read_link(format!("/proc/{pid}/ns/pid"))
            .ok()
            .as_deref()
            != Some(ns)
        {
            continue;
        }
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        let field = |n: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{n}:")))
                .map(|v| v.split_whitespace().next().unwrap_or("").to_string())
                .unwrap_or_default()
        };
        out.push((field("Name"), field("Uid").parse().unwrap_or(u32::MAX)));
    }
    out
}

/// The session's daemons run, as the user.
fn check_session_procs(procs: &[(String, u32)], ctx: &dyn Fn() -> String) {
    // Names as the kernel keeps them (15 bytes); ssh-agent was started by ssh-add's visit.
    for name in [
        "dbus-daemon",
        "gnome-keyring-d",
        "gcr-ssh-agent",
        "ssh-agent",
    ] {
        let found: Vec<u32> = procs
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, u)| *u)
            .collect();
        assert!(
            !found.is_empty() && found.iter().all(|u| *u == 1000),
            "{name}: uids {found:?}, want running as 1000; processes {procs:?}\n{}",
            ctx()
        );
    }
}

fn records_at(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn first_start(path: &Path, timeout: Duration, ctx: &dyn Fn() -> String) -> Value {
    let end = Instant::now() + timeout;
    loop {
        if let Some(r) = records_at(path).into_iter().find(|r| r["event"] == "start") {
            return r;
        }
        assert!(
            Instant::now() < end,
            "the agent did not start within {timeout:?}\n{}",
            ctx()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn texts(lines: &[Line]) -> Vec<String> {
    lines.iter().map(|l| l.text.clone()).collect()
}

fn fake_coder_reply() -> Reply {
    Reply::Body(
        std::fs::read(fake_coder_bin()).expect("read fake-coder"),
        "application/octet-stream",
    )
}

#[test]
fn session_in_a_pid_namespace() {
    if !init_ready() || !session_gate() {
        return;
    }
    let _g = serial();
    let root = Overlay::temporary(session_root());
    prepare_debian(&root, init_bin());
    let server = Server::start(Vec::new(), fake_coder_reply());
    let url = server.url();
    let env = [
        ("CODER_AGENT_URL", url.as_str()),
        ("CODER_AGENT_TOKEN", TOKEN),
        ("FAKE_CODER_RECORD", RECORD),
        ("FAKE_CODER_RUN", PROBE),
    ];
    let mut init = Init::start_in(root.root(), &env, None, &[]);
    let ctx = || init.transcript();
    let rec = first_start(&root.path(RECORD), Duration::from_secs(60), &ctx);
    let report = wait_probe(&root, Duration::from_secs(30), &ctx);
    check_probe(&report, &ctx);
    let ns = std::fs::read_link(format!("/proc/{}/ns/pid", init.pid1())).unwrap();
    check_session_procs(&procs_in(&ns), &ctx);
    check_session_first(&texts(&init.lines()), &ctx);
    let booted = Booted {
        shell: "/bin/bash",
        nvim: true,
        session: true,
        given: &["FAKE_CODER_RECORD", "FAKE_CODER_RUN"],
    };
    check_env_against_docs(&rec["env"], &booted, &ctx);
    assert_eq!(rec["cwd"], "/home/coder/project", "{}", ctx());

    assert!(init.signal(15));
    let status = init.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "{}", init.transcript());
    check_stop_order(&texts(&init.lines()), &|| init.transcript());
    assert_eq!(procs_in(&ns), Vec::new(), "processes left in the namespace");
}

#[test]
fn session_in_an_lxc_container() {
    let _g = serial();
    if !lxc::ready() || !session_gate() {
        return;
    }
    let bins = lxc::binaries();
    let server = AgentServer::on_host(bins.fake_coder_bytes());
    let ct = Container::new("session");
    // Declared after the container: dropped (unmounted) first.
    let root = Overlay::mount(session_root(), &ct.rootfs, &ct.dir.join("overlay"));
    prepare_debian(&root, &bins.init);
    let env: Vec<(String, String)> = [
        ("CODER_AGENT_URL", server.url().as_str()),
        ("CODER_AGENT_TOKEN", TOKEN),
        ("CODER_UID", "1000"),
        ("FAKE_CODER_RECORD", RECORD),
        ("FAKE_CODER_RUN", PROBE),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    ct.configure(&Config {
        env,
        ..Config::default()
    });
    ct.boot(1);
    let ctx = || ct.diagnostics();
    let report = wait_probe(&root, Duration::from_secs(30), &ctx);
    check_probe(&report, &ctx);
    let init_pid = ct.init_pid().expect("container init");
    let ns = std::fs::read_link(format!("/proc/{init_pid}/ns/pid")).unwrap();
    check_session_procs(&procs_in(&ns), &ctx);
    let console: Vec<String> = ct.console().lines().map(str::to_string).collect();
    check_session_first(&console, &ctx);
    let rec = ct.start_record(1);
    let booted = Booted {
        shell: "/bin/bash",
        nvim: true,
        session: true,
        // LXC hands PID 1 `container`, `container_ttys` and, here, no TERM.
        given: &[
            "CODER_UID",
            "FAKE_CODER_RECORD",
            "FAKE_CODER_RUN",
            "container",
            "container_ttys",
        ],
    };
    check_env_against_docs(&rec["env"], &booted, &ctx);

    let stopped = ct.stop(&["-t", "20", "--nokill"]);
    assert!(
        stopped.status.success(),
        "lxc-stop --nokill: {}\n{}",
        stopped.output,
        ctx()
    );
    let console: Vec<String> = ct.console().lines().map(str::to_string).collect();
    check_stop_order(&console, &ctx);
    assert!(
        console
            .iter()
            .any(|l| l.contains("hakim-init: exiting with status 0")),
        "{}",
        ctx()
    );
    assert_eq!(procs_in(&ns), Vec::new(), "processes left in the container");
}

/// A busybox root: no session parts, no nvim. The shipped session files are there and
/// say why they do not run; the agent's environment is the table's "always" rows.
#[test]
fn environment_without_a_session_and_the_nix_bootstrap() {
    if !init_ready() {
        return;
    }
    let _g = serial();
    let server = Server::start(Vec::new(), fake_coder_reply());
    // The stand-in installer: records its arguments and installs a nix-daemon that makes
    // its socket and stays up.
    server.add_file(
        "/nix-installer",
        br#"#!/bin/sh
echo "$@" > /tmp/installer-args
d=/nix/var/nix/profiles/default/bin
mkdir -p $d /nix/var/nix/profiles/default/etc/profile.d /nix/var/nix/daemon-socket
printf '#!/bin/sh\ntouch /nix/var/nix/daemon-socket/socket\nexec sleep 1000\n' > $d/nix-daemon
chmod 755 $d/nix-daemon
"#
        .to_vec(),
    );
    let root = Rootfs::new();
    for name in ["nix-bootstrap", "nix-daemon"].into_iter().chain(SESSION) {
        let text = std::fs::read_to_string(
            hakim_e2e::workspace_root().join(format!("images/services/{name}.toml")),
        )
        .unwrap();
        root.service(name, &text);
    }
    let url = server.url();
    let installer = format!("{url}/nix-installer");
    let env = [
        ("CODER_AGENT_URL", url.as_str()),
        ("CODER_AGENT_TOKEN", TOKEN),
        ("FAKE_CODER_RECORD", RECORD),
        ("BOOTSTRAP_NIX_IF_MISSING", "1"),
        ("NIX_INSTALLER_URL", installer.as_str()),
    ];
    let mut init = Init::start(&root, &env, None);
    let ctx = || init.transcript();
    let rec = first_start(&root.path(RECORD), Duration::from_secs(60), &ctx);
    let lines = texts(&init.lines());
    let at = |needle: &str| line_at(&lines, needle, &ctx);
    // One-shot first, then the daemon it installed (checked again after it), then the agent.
    let finished = at("hakim-init: nix-bootstrap finished");
    let daemon = at("hakim-init: started nix-daemon ");
    let ready = at("hakim-init: nix-daemon is ready");
    let agent = at("hakim-init: started agent ");
    assert!(finished < daemon && ready < agent, "{}", ctx());
    assert_eq!(
        root.read("/tmp/installer-args").as_deref(),
        Some(
            "install --no-confirm --diagnostic-endpoint  --extra-conf experimental-features \
             = nix-command flakes\n"
        ),
        "{}",
        ctx()
    );
    assert_eq!(
        std::fs::read_link(root.path("/etc/profile.d/nix.sh")).ok(),
        Some("/nix/var/nix/profiles/default/etc/profile.d/nix-daemon.sh".into())
    );
    for s in SESSION {
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with(&format!("hakim-init: service {s}: disabled ("))),
            "{s}\n{}",
            ctx()
        );
    }
    let booted = Booted {
        shell: "/bin/sh",
        nvim: false,
        session: false,
        given: &[
            "FAKE_CODER_RECORD",
            "BOOTSTRAP_NIX_IF_MISSING",
            "NIX_INSTALLER_URL",
        ],
    };
    check_env_against_docs(&rec["env"], &booted, &ctx);
    assert!(init.signal(15));
    assert_eq!(init.wait_exit(Duration::from_secs(30)).code(), Some(0));
}

/// One-shots: a failing one and one that overruns its timeout (with a child of its own)
/// both release their dependant and the agent; the overrunning group is killed.
#[test]
fn oneshot_failure_and_timeout_are_logged_and_the_workspace_starts() {
    if !init_ready() {
        return;
    }
    let _g = serial();
    let server = Server::start(Vec::new(), fake_coder_reply());
    let root = Rootfs::new();
    root.service(
        "fails",
        "type = \"oneshot\"\ncommand = [\"sh\", \"-c\", \"echo failing; exit 3\"]\n",
    );
    root.service(
        "slow",
        "type = \"oneshot\"\ntimeout = 1\ncommand = [\"sh\", \"-c\", \"sleep 4242 & sleep 4243\"]\n",
    );
    root.service(
        "dependant",
        "command = [\"sleep\", \"4244\"]\nafter = [\"fails\", \"slow\"]\n",
    );
    let url = server.url();
    let env = [
        ("CODER_AGENT_URL", url.as_str()),
        ("CODER_AGENT_TOKEN", TOKEN),
        ("FAKE_CODER_RECORD", RECORD),
    ];
    let t0 = Instant::now();
    let mut init = Init::start(&root, &env, None);
    let ctx = || init.transcript();
    first_start(&root.path(RECORD), Duration::from_secs(30), &ctx);
    init.wait_proc(Duration::from_secs(10), |p| p.cmd() == "sleep 4244");
    let lines = texts(&init.lines());
    let at = |needle: &str| line_at(&lines, needle, &ctx);
    let failed = at("hakim-init: fails failed with status 3; starting what waits for it anyway");
    let killed = at("hakim-init: slow did not finish within 1 s; killing it");
    let dependant = at("hakim-init: started dependant ");
    let agent = at("hakim-init: started agent ");
    assert!(
        failed < dependant && killed < dependant && killed < agent,
        "{}",
        ctx()
    );
    assert!(t0.elapsed() >= Duration::from_secs(1));
    // The whole group went, not only the shell; and neither one-shot ran twice.
    let cmds: Vec<String> = init.procs().iter().map(|p| p.cmd()).collect();
    assert!(
        !cmds
            .iter()
            .any(|c| c.starts_with("sleep 424") && c != "sleep 4244"),
        "{cmds:?}\n{}",
        ctx()
    );
    for name in ["fails", "slow"] {
        let starts = lines
            .iter()
            .filter(|l| l.contains(&format!("hakim-init: started {name} ")))
            .count();
        assert_eq!(starts, 1, "{name}\n{}", ctx());
    }
    assert!(init.signal(15));
    assert_eq!(init.wait_exit(Duration::from_secs(30)).code(), Some(0));
}

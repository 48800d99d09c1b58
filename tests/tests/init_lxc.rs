//! `hakim-init` as PID 1 of real LXC containers (`lxc-start`, `lxc-stop`), end to end.
//!
//! Each test builds a three-binary root file system (static busybox, the static `hakim-init`
//! from `ci/build-init.sh` as `lxc.init.cmd`, a static `fake-coder` served as the Coder agent
//! by an HTTP server on 127.0.0.1), starts a container with the agent's environment in
//! `lxc.environment` lines, and checks what the agent saw (its JSON record in the container's
//! `/tmp/agent.json`), what hakim-init logged on the console (`lxc.console.logfile`), and how
//! `lxc-stop` behaved:
//!
//! 1. `lxc-stop -t 20 --nokill` with LXC's default halt signal. LXC sends SIGPWR, or
//!    SIGRTMIN+3 when init blocks SIGPWR — hakim-init blocks every signal (it reads them from
//!    a signalfd), so LXC picks SIGRTMIN+3; both count as halt. `--nokill` makes `lxc-stop`
//!    fail instead of killing the container, so a pass proves a clean stop.
//! 2. `lxc.signal.halt = SIGTERM` (what Proxmox sets for application containers).
//! 3. `lxc-stop -r` (SIGINT): hakim-init stops the agent and calls reboot(2); LXC starts the
//!    container again with a new init, and the agent starts a second time.
//! 4. A fresh ext4 home volume (root-owned, `lost+found`): the first boot gives it to the user
//!    and copies the skel, never touching `lost+found`; a second boot changes nothing in
//!    `/etc` or the home (paths, owners, modes, mtimes, ctimes, inodes, contents).
//! 5. An unprivileged (idmapped, `u/g 0 100000 65536`) container with its own network
//!    namespace: the agent runs as 1000 inside, 101000 on the host, and stops cleanly.
//!    The container cannot share the host's network namespace (LXC cannot mount sysfs there
//!    from a user namespace), so the HTTP server's socket is opened on 127.0.0.1 *inside* the
//!    container's namespace; hakim-init's download retries cover the moment before it exists.
//!    The container is also rebooted (reboot(2) from a user namespace's init).
//! 6. Stop while every download is refused (hakim-init in backoff, no agent yet).
//! 7. Stop during a stalled download: no partial `.coder.part-*` file may be left behind.
//! 8. An agent that ignores SIGTERM is killed by hakim-init after `HAKIM_AGENT_STOP_GRACE`,
//!    and the container still stops by itself.
//!
//! The `lxc.init.cmd` is `/usr/local/sbin/hakim-init`, except in 4, which uses LXC's default
//! `/sbin/init` (a symlink to it, as a classic rootfs template has).
//!
//! The containers run one at a time. Gating as in `convert.rs`: without root or a tool the
//! tests print `skipping: … missing` and pass, unless `HAKIM_E2E=1`. `HAKIM_E2E_KEEP=1` keeps
//! the container directories. Run with `--nocapture` to see the timings.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use hakim_e2e::lxc::{
    binaries, build_rootfs, children_of, cmdline, ensure_subids, manifest, manifest_diff,
    proc_status_field, ready, serial, shift_ids, AgentServer, Config, Container, Net,
    RootfsOptions, Serve, RECORD,
};
use serde_json::Value;

const TOKEN: &str = "0c0e3f5a-hakim-lxc-test-token";
const SIGINT: i32 = 2;
const SIGTERM: i32 = 15;
const SIGPWR: i32 = 30;
const SIGRTMIN_3: i32 = 37;
const AGENT_BIN: &str = "/var/lib/hakim/agent/coder";
/// How long a boot may take until the agent has recorded its start.
const BOOT_TIMEOUT: Duration = Duration::from_secs(30);
/// `lxc-stop -t`.
const STOP_TIMEOUT_S: u64 = 20;
/// A clean stop is far quicker than this (the fake agent exits at once on SIGTERM).
const STOP_EXPECTED_BELOW: Duration = Duration::from_secs(10);

fn agent_env(url: &str) -> Vec<(String, String)> {
    [
        ("CODER_AGENT_URL", url),
        ("CODER_AGENT_TOKEN", TOKEN),
        ("CODER_UID", "1000"),
        ("FAKE_CODER_RECORD", RECORD),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// A container with a fresh root file system.
fn container(test: &str, rootfs: &RootfsOptions) -> Container {
    let ct = Container::new(test);
    build_rootfs(&ct.rootfs, binaries(), rootfs);
    ct
}

/// Starts the container and waits for the agent's `n`-th start record; returns seconds.
fn boot(ct: &Container, n: usize) -> f64 {
    let t = Instant::now();
    if let Err(e) = ct.start() {
        panic!("{e}\n{}", ct.diagnostics());
    }
    ct.wait_for(&format!("agent start #{n}"), BOOT_TIMEOUT, || {
        ct.agent_starts() >= n
    });
    t.elapsed().as_secs_f64()
}

fn ids(v: &Value) -> Vec<i64> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_i64).collect())
        .unwrap_or_default()
}

/// The `n`-th (1-based) start record.
fn start_record(ct: &Container, n: usize) -> Value {
    ct.records()
        .into_iter()
        .filter(|r| r["event"] == "start")
        .nth(n - 1)
        .unwrap_or_else(|| panic!("no agent start #{n}\n{}", ct.diagnostics()))
}

/// What the agent must see, whatever the container's kind.
fn check_agent_start(ct: &Container, rec: &Value, url: &str) {
    let ctx = || format!("agent record: {rec}\n{}", ct.diagnostics());
    assert_eq!(
        rec["argv"],
        serde_json::json!([AGENT_BIN, "agent"]),
        "{}",
        ctx()
    );
    assert_eq!(
        ids(&rec["uid"]),
        [1000; 4],
        "uid (real, eff, saved, fs)\n{}",
        ctx()
    );
    assert_eq!(ids(&rec["gid"]), [1000; 4], "gid\n{}", ctx());
    let mut groups = ids(&rec["groups"]);
    groups.sort_unstable();
    assert_eq!(groups, [999, 1000], "groups (docker, coder)\n{}", ctx());
    assert_eq!(rec["cwd"], "/home/coder/project", "{}", ctx());
    assert_eq!(rec["ppid"], 1, "the agent is a child of PID 1\n{}", ctx());
    assert_eq!(
        rec["sig_blocked"],
        "0000000000000000",
        "no signal may stay blocked in the agent\n{}",
        ctx()
    );
    let env = &rec["env"];
    for (k, v) in [
        ("HOME", "/home/coder"),
        ("USER", "coder"),
        ("LOGNAME", "coder"),
        ("CODER_AGENT_TOKEN", TOKEN),
        ("FAKE_CODER_RECORD", RECORD),
    ] {
        assert_eq!(env[k], v, "agent env {k}\n{}", ctx());
    }
    let got_url = env["CODER_AGENT_URL"].as_str().unwrap_or("");
    assert_eq!(
        got_url.trim_end_matches('/'),
        url,
        "agent env CODER_AGENT_URL\n{}",
        ctx()
    );
    assert!(
        env["PATH"].as_str().is_some_and(|p| p.contains("/bin")),
        "agent env PATH\n{}",
        ctx()
    );
}

/// The signal hakim-init logged as the reason for stopping in `console`.
fn stop_signal(console: &str, kind: &str) -> Option<i32> {
    console.lines().find_map(|l| {
        let rest = l.strip_prefix("hakim-init: signal ")?;
        let (n, tail) = rest.split_once(':')?;
        (tail.trim() == format!("stopping ({kind})"))
            .then(|| n.parse().ok())
            .flatten()
    })
}

/// `lxc-stop -t 20 --nokill`, and everything a clean halt implies.
fn graceful_stop(ct: &Container, console_from: usize, allowed: &[i32], starts: usize) -> f64 {
    let stopped = ct.stop(&["-t", &STOP_TIMEOUT_S.to_string(), "--nokill"]);
    let console = ct.console_since(console_from);
    let ctx = || {
        format!(
            "lxc-stop: {} after {:.2} s: {}\n{}",
            stopped.status,
            stopped.elapsed.as_secs_f64(),
            stopped.output.trim(),
            ct.diagnostics()
        )
    };
    assert!(
        stopped.status.success(),
        "lxc-stop --nokill failed: the container did not stop by itself within {STOP_TIMEOUT_S} s\n{}",
        ctx()
    );
    assert!(
        stopped.elapsed < STOP_EXPECTED_BELOW,
        "stop took too long\n{}",
        ctx()
    );
    assert_eq!(ct.state(), "STOPPED", "{}", ctx());
    let sig = stop_signal(&console, "halt");
    assert!(
        sig.is_some_and(|s| allowed.contains(&s)),
        "hakim-init logged halt signal {sig:?}, expected one of {allowed:?}\n{}",
        ctx()
    );
    assert!(
        console.contains("hakim-init: exiting with status 0"),
        "no clean exit logged\n{}",
        ctx()
    );
    assert!(
        !console.contains("killing it"),
        "hakim-init had to kill the agent\n{}",
        ctx()
    );
    // The last agent saw its graceful signal (SIGTERM) and exited 0.
    let records = ct.records();
    assert_eq!(ct.agent_starts(), starts, "{}", ctx());
    let last_start = records.iter().rposition(|r| r["event"] == "start").unwrap();
    let after: Vec<&Value> = records[last_start + 1..].iter().collect();
    assert!(
        matches!(after.as_slice(), [s, e] if s["event"] == "signal" && s["signal"] == SIGTERM
            && e["event"] == "exit" && e["code"] == 0),
        "agent events after its start: {after:?} (want SIGTERM, then exit 0)\n{}",
        ctx()
    );
    println!(
        "{}: lxc-stop (halt signal {}) returned {} after {:.3} s",
        ct.name,
        sig.unwrap(),
        stopped.status,
        stopped.elapsed.as_secs_f64()
    );
    stopped.elapsed.as_secs_f64()
}

/// `shutdown_ms`: how long the fake agent takes to shut down (its "shutdown scripts"); the
/// stop must wait for it.
fn privileged_halt(test: &str, halt: Option<&str>, allowed: &[i32], shutdown_ms: u64) {
    let _serial = serial();
    if !ready() {
        return;
    }
    let bins = binaries();
    let server = AgentServer::on_host(bins.fake_coder_bytes());
    let ct = container(test, &RootfsOptions::default());
    let mut env = agent_env(&server.url());
    if shutdown_ms > 0 {
        env.push(("FAKE_CODER_SHUTDOWN_MS".into(), shutdown_ms.to_string()));
    }
    ct.configure(&Config {
        halt_signal: halt.map(String::from),
        env,
        ..Config::default()
    });
    let up = boot(&ct, 1);
    let rec = start_record(&ct, 1);
    check_agent_start(&ct, &rec, &server.url());
    assert!(server.downloads() >= 1, "the agent was never downloaded");
    // The home was seeded from the skel; the agent's record file is the user's.
    let home = ct.rootfs.join("home/coder");
    let meta = std::fs::metadata(&home).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (1000, 1000));
    assert!(home.join(".profile").is_file(), "skel not copied");
    let rmeta = std::fs::metadata(ct.record_path()).unwrap();
    assert_eq!((rmeta.uid(), rmeta.gid()), (1000, 1000));
    println!("{}: agent started {up:.3} s after lxc-start", ct.name);
    let took = graceful_stop(&ct, 0, allowed, 1);
    assert!(
        took >= shutdown_ms as f64 / 1000.0,
        "the container stopped after {took:.3} s, before the agent's {shutdown_ms} ms shutdown"
    );
    assert_eq!(server.downloads(), 1);
    assert!(
        server.other_requests().is_empty(),
        "{:?}",
        server.other_requests()
    );
}

#[test]
fn privileged_default_halt_stops_agent_gracefully() {
    // LXC sends SIGPWR, or SIGRTMIN+3 when init blocks SIGPWR (hakim-init blocks all).
    privileged_halt("halt", None, &[SIGPWR, SIGRTMIN_3], 0);
}

#[test]
fn privileged_sigterm_halt_stops_agent_gracefully() {
    // The agent takes 1.5 s to shut down: the container must wait for it.
    privileged_halt("term", Some("SIGTERM"), &[SIGTERM], 1500);
}

#[test]
fn reboot_restarts_container_and_agent() {
    let _serial = serial();
    if !ready() {
        return;
    }
    let bins = binaries();
    let server = AgentServer::on_host(bins.fake_coder_bytes());
    let ct = container("reboot", &RootfsOptions::default());
    ct.configure(&Config {
        env: agent_env(&server.url()),
        ..Config::default()
    });
    boot(&ct, 1);
    let pid1 = ct.init_pid().expect("init pid");
    let console_before = ct.console().len();

    let t = Instant::now();
    let stopped = ct.stop(&["-r"]);
    assert!(
        stopped.status.success(),
        "lxc-stop -r: {} {}\n{}",
        stopped.status,
        stopped.output,
        ct.diagnostics()
    );
    let back = ct.wait_for(
        "a new init and the second agent start",
        BOOT_TIMEOUT,
        || {
            ct.state() == "RUNNING"
                && ct.init_pid().is_some_and(|p| p != pid1)
                && ct.agent_starts() >= 2
        },
    );
    let pid2 = ct.init_pid().unwrap();
    let console = ct.console_since(console_before);
    assert_eq!(
        stop_signal(&console, "reboot"),
        Some(SIGINT),
        "hakim-init did not log SIGINT as a reboot\n{}",
        ct.diagnostics()
    );
    assert!(
        console.contains("hakim-init: rebooting"),
        "{}",
        ct.diagnostics()
    );
    assert!(
        !console.contains("killing it") && !console.contains("reboot not permitted"),
        "{}",
        ct.diagnostics()
    );
    // First agent: SIGTERM, exit 0; then a second start with the same view of the world.
    let records = ct.records();
    let events: Vec<String> = records
        .iter()
        .map(|r| match r["event"].as_str() {
            Some("signal") => format!("signal {}", r["signal"]),
            Some(e) => e.to_string(),
            None => "?".into(),
        })
        .collect();
    assert_eq!(
        events,
        ["start", "signal 15", "exit", "start"],
        "agent events across the reboot\n{}",
        ct.diagnostics()
    );
    assert_eq!(records[2]["code"], 0);
    check_agent_start(&ct, &start_record(&ct, 2), &server.url());
    println!(
        "{}: lxc-stop -r returned after {:.3} s; init {pid1} -> {pid2}; agent running again \
         {back:.3} s after lxc-stop -r ({:.3} s in all); downloads: {}",
        ct.name,
        stopped.elapsed.as_secs_f64(),
        t.elapsed().as_secs_f64(),
        server.downloads()
    );
    graceful_stop(&ct, console_before, &[SIGPWR, SIGRTMIN_3], 2);
}

/// Owner, mode, mtime, ctime and inode of `p`.
fn stat_line(p: &Path) -> String {
    let m = std::fs::symlink_metadata(p).unwrap();
    format!(
        "owner={}:{} mode={:o} mtime={}.{} ctime={}.{} ino={}",
        m.uid(),
        m.gid(),
        m.mode() & 0o7777,
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
        m.ino()
    )
}

#[test]
fn fresh_home_volume_is_prepared_once() {
    let _serial = serial();
    if !ready() {
        return;
    }
    let bins = binaries();
    let server = AgentServer::on_host(bins.fake_coder_bytes());
    let mut ct = container("home", &RootfsOptions { shadow: true });
    let home = ct.rootfs.join("home/coder");
    ct.mount_fresh_volume(&home, "64M");
    let lost = home.join("lost+found");
    let lost_before = stat_line(&lost);
    let vol = std::fs::metadata(&home).unwrap();
    assert_eq!((vol.uid(), vol.gid(), vol.mode() & 0o7777), (0, 0, 0o755));
    // No lxc.init.cmd: LXC runs /sbin/init, the symlink a classic rootfs template carries.
    ct.configure(&Config {
        init_cmd: None,
        env: agent_env(&server.url()),
        ..Config::default()
    });

    let up1 = boot(&ct, 1);
    let console1 = ct.console();
    check_agent_start(&ct, &start_record(&ct, 1), &server.url());
    let ctx = || ct.diagnostics();
    let m = std::fs::metadata(&home).unwrap();
    assert_eq!(
        (m.uid(), m.gid(), m.mode() & 0o7777),
        (1000, 1000, 0o755),
        "the volume's root must be the user's, its mode kept\n{}",
        ctx()
    );
    assert_eq!(
        stat_line(&lost),
        lost_before,
        "lost+found was touched\n{}",
        ctx()
    );
    let lm = std::fs::metadata(&lost).unwrap();
    assert_eq!((lm.uid(), lm.gid(), lm.mode() & 0o7777), (0, 0, 0o700));
    let profile = home.join(".profile");
    let pm = std::fs::metadata(&profile)
        .unwrap_or_else(|e| panic!("skel .profile not copied: {e}\n{}", ctx()));
    assert_eq!((pm.uid(), pm.gid()), (1000, 1000));
    assert_eq!(
        std::fs::read(&profile).unwrap(),
        std::fs::read(ct.rootfs.join("etc/skel/.profile")).unwrap()
    );
    let project = std::fs::metadata(home.join("project")).unwrap();
    assert_eq!((project.uid(), project.gid()), (1000, 1000));
    let passwd = std::fs::read_to_string(ct.rootfs.join("etc/passwd")).unwrap();
    assert!(
        passwd
            .lines()
            .any(|l| l.starts_with("coder:x:1000:1000:") && l.contains(":/home/coder:")),
        "/etc/passwd:\n{passwd}"
    );
    let shadow = std::fs::read_to_string(ct.rootfs.join("etc/shadow")).unwrap();
    assert!(
        shadow.lines().any(|l| l.starts_with("coder:")),
        "/etc/shadow:\n{shadow}"
    );
    graceful_stop(&ct, 0, &[SIGPWR, SIGRTMIN_3], 1);
    let tops = ["etc", "home"];
    let before = manifest(&ct.rootfs, &tops);

    let len1 = ct.console().len();
    let up2 = boot(&ct, 2);
    let console2 = ct.console_since(len1);
    graceful_stop(&ct, len1, &[SIGPWR, SIGRTMIN_3], 2);
    let after = manifest(&ct.rootfs, &tops);
    let diff = manifest_diff(&before, &after);
    assert!(
        diff.is_empty(),
        "the second boot changed /etc or the home:\n{}\n--- boot 2 console\n{console2}",
        diff.join("\n")
    );
    for noise in ["user coder:", "home /home/coder:", "project dir"] {
        assert!(
            !console2.contains(noise),
            "boot 2 logged {noise:?} (a change or warning):\n{console2}"
        );
    }
    assert!(
        console1.contains("home /home/coder: prepared (fresh: true)"),
        "boot 1 console:\n{console1}"
    );
    println!(
        "{}: boot 1 agent after {up1:.3} s, boot 2 after {up2:.3} s; {} paths unchanged",
        ct.name,
        after.len()
    );
}

#[test]
fn unprivileged_idmapped_container_runs_agent_as_mapped_user() {
    const BASE: u32 = 100_000;
    const PORT: u16 = 38_080;
    let _serial = serial();
    if !ready() {
        return;
    }
    for note in ensure_subids(BASE as u64, 65536) {
        println!("NOTE: {note}");
    }
    let bins = binaries();
    let ct = container("unpriv", &RootfsOptions::default());
    shift_ids(&ct.rootfs, BASE);
    let url = format!("http://127.0.0.1:{PORT}");
    ct.configure(&Config {
        net: Net::Empty,
        idmap_base: Some(BASE),
        env: agent_env(&url),
        ..Config::default()
    });
    let t = Instant::now();
    if let Err(e) = ct.start() {
        panic!("{e}\n{}", ct.diagnostics());
    }
    let init = ct.init_pid().expect("init pid");
    let uid_map = std::fs::read_to_string(format!("/proc/{init}/uid_map")).unwrap();
    assert_eq!(
        uid_map.split_whitespace().collect::<Vec<_>>(),
        ["0", "100000", "65536"],
        "not an idmapped container"
    );
    let server = AgentServer::in_netns(init, PORT, bins.fake_coder_bytes())
        .unwrap_or_else(|e| panic!("{e}\n{}", ct.diagnostics()));
    ct.wait_for("agent start", BOOT_TIMEOUT, || ct.agent_starts() >= 1);
    let up = t.elapsed().as_secs_f64();
    check_agent_start(&ct, &start_record(&ct, 1), &url);

    // On the host, the agent runs as 101000.
    let agents: Vec<u32> = children_of(init)
        .into_iter()
        .filter(|p| cmdline(*p).starts_with(AGENT_BIN))
        .collect();
    assert_eq!(
        agents.len(),
        1,
        "agent processes under init {init}: {agents:?}\n{}",
        ct.diagnostics()
    );
    let host = agents[0];
    assert_eq!(
        proc_status_field(host, "Uid").unwrap(),
        ["101000"; 4],
        "host uids of the agent"
    );
    assert_eq!(proc_status_field(host, "Gid").unwrap(), ["101000"; 4]);
    let mut groups = proc_status_field(host, "Groups").unwrap();
    groups.sort();
    assert_eq!(groups, ["100999", "101000"]);
    for (rel, owner) in [
        ("home/coder", (101000, 101000)),
        ("home/coder/.profile", (101000, 101000)),
        ("home/coder/project", (101000, 101000)),
        ("tmp/agent.json", (101000, 101000)),
        ("etc/passwd", (100000, 100000)),
        ("var/lib/hakim/agent/coder", (100000, 100000)),
    ] {
        let m = std::fs::metadata(ct.rootfs.join(rel)).unwrap();
        assert_eq!((m.uid(), m.gid()), owner, "host owner of {rel}");
    }
    println!(
        "{}: agent started {up:.3} s after lxc-start (host pid {host}, uid 101000); downloads {}",
        ct.name,
        server.downloads()
    );

    // Reboot: reboot(2) from the init of a user namespace ends the container for a restart.
    let console_before = ct.console().len();
    let stopped = ct.stop(&["-r"]);
    assert!(
        stopped.status.success(),
        "lxc-stop -r: {} {}\n{}",
        stopped.status,
        stopped.output,
        ct.diagnostics()
    );
    let t = Instant::now();
    ct.wait_for("a new init after lxc-stop -r", BOOT_TIMEOUT, || {
        ct.state() == "RUNNING" && ct.init_pid().is_some_and(|p| p != init)
    });
    let init2 = ct.init_pid().unwrap();
    // The new container has a new network namespace: serve the agent there too.
    let server2 = AgentServer::in_netns(init2, PORT, bins.fake_coder_bytes())
        .unwrap_or_else(|e| panic!("{e}\n{}", ct.diagnostics()));
    ct.wait_for("agent start #2", BOOT_TIMEOUT, || ct.agent_starts() >= 2);
    let console = ct.console_since(console_before);
    assert_eq!(
        stop_signal(&console, "reboot"),
        Some(SIGINT),
        "{}",
        ct.diagnostics()
    );
    assert!(
        console.contains("hakim-init: rebooting") && !console.contains("reboot not permitted"),
        "{}",
        ct.diagnostics()
    );
    check_agent_start(&ct, &start_record(&ct, 2), &url);
    println!(
        "{}: rebooted (init {init} -> {init2}), agent running again after {:.3} s; downloads {}",
        ct.name,
        t.elapsed().as_secs_f64(),
        server2.downloads()
    );
    graceful_stop(&ct, console_before, &[SIGPWR, SIGRTMIN_3], 2);
}

#[test]
fn stop_while_agent_download_keeps_failing() {
    let _serial = serial();
    if !ready() {
        return;
    }
    // A port nobody listens on: every download is refused and hakim-init backs off.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let ct = container("nofetch", &RootfsOptions::default());
    ct.configure(&Config {
        env: agent_env(&format!("http://127.0.0.1:{port}")),
        ..Config::default()
    });
    if let Err(e) = ct.start() {
        panic!("{e}\n{}", ct.diagnostics());
    }
    let failing = ct.wait_for("two failed downloads", BOOT_TIMEOUT, || {
        ct.console()
            .contains("hakim-init: agent download failed (attempt 2)")
    });
    let stopped = ct.stop(&["-t", &STOP_TIMEOUT_S.to_string(), "--nokill"]);
    let console = ct.console();
    assert!(
        stopped.status.success() && stopped.elapsed < STOP_EXPECTED_BELOW,
        "lxc-stop: {} after {:.3} s {}\n{}",
        stopped.status,
        stopped.elapsed.as_secs_f64(),
        stopped.output,
        ct.diagnostics()
    );
    assert!(
        console.contains("hakim-init: exiting with status 0"),
        "{}",
        ct.diagnostics()
    );
    assert_eq!(ct.agent_starts(), 0, "{}", ct.diagnostics());
    println!(
        "{}: downloads failing for {failing:.3} s; lxc-stop returned {} after {:.3} s",
        ct.name,
        stopped.status,
        stopped.elapsed.as_secs_f64()
    );
}

/// Files in the container's agent directory.
fn agent_dir(ct: &Container) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(ct.rootfs.join("var/lib/hakim/agent"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn stop_during_stalled_download_leaves_no_partial_file() {
    let _serial = serial();
    if !ready() {
        return;
    }
    let bins = binaries();
    // Headers and 64 KiB of the binary, then silence: hakim-init's download child waits for
    // more (its read timeout is 60 s) when the container is stopped.
    let stalled = AgentServer::on_host_serving(bins.fake_coder_bytes(), Serve::StallAfter(65536));
    let ct = container("stall", &RootfsOptions::default());
    ct.configure(&Config {
        env: agent_env(&stalled.url()),
        ..Config::default()
    });
    if let Err(e) = ct.start() {
        panic!("{e}\n{}", ct.diagnostics());
    }
    ct.wait_for("a partial download on disk", BOOT_TIMEOUT, || {
        agent_dir(&ct).iter().any(|n| n.contains(".part-"))
    });
    let during = agent_dir(&ct);
    let stopped = ct.stop(&["-t", &STOP_TIMEOUT_S.to_string(), "--nokill"]);
    assert!(
        stopped.status.success() && stopped.elapsed < STOP_EXPECTED_BELOW,
        "lxc-stop during the download: {} after {:.3} s {}\n{}",
        stopped.status,
        stopped.elapsed.as_secs_f64(),
        stopped.output,
        ct.diagnostics()
    );
    let after_stop = agent_dir(&ct);

    // Next boot, with a working server: does the leftover go away?
    let server = AgentServer::on_host(bins.fake_coder_bytes());
    ct.configure(&Config {
        env: agent_env(&server.url()),
        ..Config::default()
    });
    boot(&ct, 1);
    let after_boot = agent_dir(&ct);
    graceful_stop(&ct, 0, &[SIGPWR, SIGRTMIN_3], 1);
    println!(
        "{}: agent dir during the stalled download {during:?}, after lxc-stop ({:.3} s) \
         {after_stop:?}, after the next boot {after_boot:?}",
        ct.name,
        stopped.elapsed.as_secs_f64()
    );
    assert!(
        !after_stop.iter().any(|n| n.contains(".part-")) && after_boot == ["coder"],
        "partial download left behind: agent dir after lxc-stop {after_stop:?}, after the next \
         boot {after_boot:?} (hakim-init SIGKILLs the download child on stop, so its TempFile \
         guard never runs, and nothing removes stale .part files at boot)"
    );
}

#[test]
fn agent_ignoring_sigterm_is_killed_after_its_grace() {
    let _serial = serial();
    if !ready() {
        return;
    }
    let bins = binaries();
    let server = AgentServer::on_host(bins.fake_coder_bytes());
    let ct = container("grace", &RootfsOptions::default());
    let mut env = agent_env(&server.url());
    env.push(("FAKE_CODER_IGNORE_SIGNALS".into(), "1".into()));
    env.push(("HAKIM_AGENT_STOP_GRACE".into(), "2".into()));
    ct.configure(&Config {
        env,
        ..Config::default()
    });
    boot(&ct, 1);
    let stopped = ct.stop(&["-t", &STOP_TIMEOUT_S.to_string(), "--nokill"]);
    let console = ct.console();
    let ctx = || {
        format!(
            "lxc-stop: {} after {:.3} s {}\n{}",
            stopped.status,
            stopped.elapsed.as_secs_f64(),
            stopped.output,
            ct.diagnostics()
        )
    };
    // hakim-init, not LXC, ends the agent: SIGTERM, 2 s of grace, SIGKILL, clean exit.
    assert!(stopped.status.success(), "{}", ctx());
    assert!(
        stopped.elapsed >= Duration::from_secs(2) && stopped.elapsed < STOP_EXPECTED_BELOW,
        "{}",
        ctx()
    );
    assert!(
        console.contains("hakim-init: agent did not stop within 2 s; killing it")
            && console.contains("hakim-init: exiting with status 0"),
        "{}",
        ctx()
    );
    let events: Vec<String> = ct
        .records()
        .iter()
        .map(|r| format!("{} {}", r["event"], r["signal"]))
        .collect();
    assert_eq!(
        events,
        ["\"start\" null", "\"signal\" 15"],
        "agent events\n{}",
        ctx()
    );
    println!(
        "{}: agent ignoring SIGTERM killed after its 2 s grace; lxc-stop returned after {:.3} s",
        ct.name,
        stopped.elapsed.as_secs_f64()
    );
}

//! End-to-end tests of `hakim-init` as a real PID 1.
//!
//! Every test builds a busybox root with the static `hakim-init` (from `ci/build-init.sh`) and
//! runs it as PID 1 of a new PID and mount namespace:
//! `unshare --pid --fork --mount --mount-proc --kill-child chroot ROOT /usr/local/sbin/hakim-init`.
//! Signals are sent from outside to its host pid; the namespace's processes are inspected
//! through the host's `/proc` (state, masks, environment). The Coder agent is the static
//! `fake-coder` (it records argv, ids, cwd, env and signal masks as JSON lines), downloaded from
//! a test HTTP server on 127.0.0.1. Timings come from the harness, which stamps every line
//! hakim-init prints as it arrives.
//!
//! Gating: see `hakim_e2e::init_harness::init_ready` (root, unshare, chroot, busybox, mknod,
//! rustc); `HAKIM_E2E=1` turns a missing piece into a failure. Tests run one at a time.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use hakim_e2e::init_harness::{
    environ, fake_coder_bin, init_ready, proc_info, send_signal, serial, Init, Line, Reply, Rootfs,
    Server, BINARY_PATH,
};
use serde_json::Value;

const SIGHUP: i32 = 1;
const SIGINT: i32 = 2;
const SIGUSR1: i32 = 10;
const SIGTERM: i32 = 15;
const SIGPWR: i32 = 30;
const SIGRTMIN_3: i32 = 37;

const TOKEN: &str = "5f0c7a4e-3b1d-4c9a-9e2f-8a6b1c2d3e4f";
const AGENT_DEST: &str = "/var/lib/hakim/agent/coder";
const RECORD: &str = "/tmp/agent.jsonl";

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn code(st: ExitStatus) -> Option<i32> {
    st.code()
}

/// `command = [...]` with each argument as a TOML basic string (Rust's debug quoting is valid
/// TOML for the printable ASCII used here).
fn toml_command(args: &[&str]) -> String {
    let quoted: Vec<String> = args.iter().map(|a| format!("{a:?}")).collect();
    format!("command = [{}]\n", quoted.join(", "))
}

/// A service script that reports its start and, on SIGTERM, appends `tag` to `file`.
fn term_recorder(name: &str, file: &str) -> String {
    toml_command(&[
        "sh",
        "-c",
        &format!("trap 'echo {name} >> {file}; exit 0' TERM; echo {name}-up; sleep 1000 & wait"),
    ])
}

/// The line `hakim-init: <msg>` exactly (not a prefix of another unit's name).
fn log_is(msg: &str) -> impl Fn(&str) -> bool + '_ {
    move |t: &str| t.strip_prefix("hakim-init: ") == Some(msg)
}

/// The message of a line from the download child (`hakim-init: fetch: MSG`, printed as is or
/// with a `[fetch] ` unit prefix).
fn fetch_says(line: &str) -> Option<&str> {
    line.strip_prefix("[fetch] ")
        .unwrap_or(line)
        .strip_prefix("hakim-init: fetch: ")
}

fn index_of(lines: &[Line], pred: impl Fn(&str) -> bool) -> Option<usize> {
    lines.iter().position(|l| pred(&l.text))
}

fn agent_env(url: &str) -> Vec<(&'static str, String)> {
    vec![
        ("CODER_AGENT_URL", url.to_string()),
        ("CODER_AGENT_TOKEN", TOKEN.to_string()),
        ("FAKE_CODER_RECORD", RECORD.to_string()),
        ("HAKIM_INIT_VERBOSE", "1".to_string()),
    ]
}

fn borrow<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// The fake agent's JSON records (ROOT/tmp/agent.jsonl).
fn records(root: &Rootfs) -> Vec<Value> {
    root.read(RECORD)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn starts(root: &Rootfs) -> Vec<Value> {
    records(root)
        .into_iter()
        .filter(|r| r["event"] == "start")
        .collect()
}

/// Waits until the fake agent recorded `n` starts.
fn wait_starts(root: &Rootfs, init: &Init, n: usize, timeout: Duration) -> Vec<Value> {
    let end = Instant::now() + timeout;
    loop {
        let s = starts(root);
        if s.len() >= n {
            return s;
        }
        assert!(
            Instant::now() < end,
            "the agent did not start {n} time(s) within {timeout:?} (records: {:?})\n{}",
            records(root),
            init.transcript()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn fake_coder_reply() -> Reply {
    Reply::Body(
        std::fs::read(fake_coder_bin()).expect("read fake-coder"),
        "application/octet-stream",
    )
}

/// `restarting <unit> in X s` / `retrying in X s` values, in order.
fn delays(lines: &[Line], marker: &str) -> Vec<(Duration, f64)> {
    lines
        .iter()
        .filter_map(|l| {
            let rest = l.text.split(marker).nth(1)?;
            let x: f64 = rest.trim().strip_suffix(" s")?.trim().parse().ok()?;
            Some((l.at, x))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// 1. Orphans

#[test]
fn reaps_100_orphans_without_zombies() {
    if !init_ready() {
        return;
    }
    let _g = serial();
    let root = Rootfs::new();
    let mut init = Init::start(
        &root,
        &[("HAKIM_INIT_VERBOSE", "1")],
        Some(&[
            "sh",
            "-c",
            "for i in $(seq 100); do (sleep 0.1 &) ; done; sleep 2",
        ]),
    );
    let pid1 = init.pid1();
    let mut first_seen_zombie: HashMap<i32, (Duration, String)> = HashMap::new();
    let mut lasting_zombies = Vec::new();
    let mut orphans = HashSet::new();
    let mut samples = 0;
    let mut at_1_5 = None;
    while init.now() < Duration::from_millis(1900) {
        let now = init.now();
        let procs = init.procs();
        samples += 1;
        for p in &procs {
            // `sleep 0.1` whose parent is PID 1: an orphan hakim-init inherited.
            if p.cmd() == "sleep 0.1" && p.ppid == pid1 {
                orphans.insert(p.pid);
            }
            if p.state == 'Z' {
                let first = first_seen_zombie
                    .entry(p.pid)
                    .or_insert((now, p.name.clone()));
                // A zombie still there 300 ms later was not reaped: a leak, not a race.
                if now - first.0 > Duration::from_millis(300) {
                    lasting_zombies.push((p.pid, p.name.clone(), secs(first.0), secs(now)));
                }
            }
        }
        if at_1_5.is_none() && now >= Duration::from_millis(1500) {
            at_1_5 = Some(procs);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let st = init.wait_exit(Duration::from_secs(10));
    println!(
        "samples {samples}, orphans seen re-parented to PID 1: {}, transient zombies seen: {}",
        orphans.len(),
        first_seen_zombie.len()
    );
    assert!(
        lasting_zombies.is_empty(),
        "zombies not reaped (pid, name, first seen s, still seen s): {lasting_zombies:?}\n{}",
        init.transcript()
    );
    assert!(
        orphans.len() >= 5,
        "the test produced too few orphans re-parented to PID 1 ({}) to mean anything",
        orphans.len()
    );
    let at = at_1_5.expect("a sample at 1.5 s");
    let zombies: Vec<_> = at.iter().filter(|p| p.state == 'Z').collect();
    assert!(zombies.is_empty(), "zombies at 1.5 s: {zombies:#?}");
    // Left at 1.5 s: PID 1 and `sleep 2` (busybox sh may exec its last command, so the shell
    // itself may be gone).
    let cmds: Vec<String> = at.iter().map(|p| p.cmd()).collect();
    let stray: Vec<&String> = at
        .iter()
        .zip(&cmds)
        .filter(|(p, c)| p.pid != pid1 && c.as_str() != "sleep 2" && !c.starts_with("sh -c for"))
        .map(|(_, c)| c)
        .collect();
    assert!(
        stray.is_empty() && cmds.iter().any(|c| c == "sleep 2"),
        "at 1.5 s only hakim-init, (sh) and `sleep 2` should be left: {cmds:?}"
    );
    assert_eq!(code(st), Some(0), "{}", init.transcript());
}

// ---------------------------------------------------------------------------------------------
// 2. Stop signals from outside

fn stop_with(sig: i32) -> (ExitStatus, f64, Rootfs, Init) {
    let root = Rootfs::new();
    root.service("stopper", &term_recorder("stopper", "/tmp/stopped"));
    let mut init = Init::start(&root, &[], None);
    init.wait_line("[stopper] stopper-up", Duration::from_secs(10));
    let t0 = Instant::now();
    assert!(init.signal(sig), "kill({}, {sig}) failed", init.pid1());
    let st = init.wait_exit(Duration::from_secs(10));
    let dt = secs(t0.elapsed());
    (st, dt, root, init)
}

#[test]
fn halt_signals_stop_services_and_exit_0() {
    if !init_ready() {
        return;
    }
    let _g = serial();
    for sig in [SIGTERM, SIGPWR, SIGRTMIN_3] {
        let (st, dt, root, init) = stop_with(sig);
        println!("signal {sig}: exit {st} after {dt:.3} s");
        let t = init.transcript();
        assert_eq!(code(st), Some(0), "signal {sig}: {st}\n{t}");
        assert!(dt < 5.0, "signal {sig}: exit took {dt:.3} s\n{t}");
        assert!(
            init.find_line(log_is(&format!("signal {sig}: stopping (halt)")))
                .is_some(),
            "signal {sig}: no halt line\n{t}"
        );
        assert_eq!(
            root.read("/tmp/stopped").as_deref(),
            Some("stopper\n"),
            "signal {sig}: the service did not get SIGTERM\n{t}"
        );
    }
}

#[test]
fn sigint_stops_in_order_then_reboots() {
    if !init_ready() {
        return;
    }
    let _g = serial();
    let (st, dt, root, init) = stop_with(SIGINT);
    println!("SIGINT: unshare ended with {st} after {dt:.3} s");
    let t = init.transcript();
    assert!(dt < 5.0, "exit took {dt:.3} s\n{t}");
    assert!(
        init.find_line(log_is("signal 2: stopping (reboot)"))
            .is_some(),
        "{t}"
    );
    assert_eq!(
        root.read("/tmp/stopped").as_deref(),
        Some("stopper\n"),
        "the service did not get SIGTERM before the reboot\n{t}"
    );
    assert!(init.find_line(log_is("rebooting")).is_some(), "{t}");
    // reboot(2) by the init of a PID namespace ends it as if killed by SIGHUP ("restart me"
    // for LXC); unshare re-raises its child's fatal signal on itself.
    assert!(
        st.signal() == Some(SIGHUP) || st.code() == Some(128 + SIGHUP),
        "expected the namespace to end by reboot (SIGHUP), got {st}\n{t}"
    );
    assert!(
        init.find_line(|l| l.contains("reboot not permitted"))
            .is_none(),
        "{t}"
    );
}

// ---------------------------------------------------------------------------------------------
// 3. stop_grace

#[test]
fn term_ignoring_service_is_killed_after_stop_grace() {
    if !init_ready() {
        return;
    }
    let _g = serial();
    let root = Rootfs::new();
    root.service(
        "stubborn",
        &(toml_command(&[
            "sh",
            "-c",
            "trap '' TERM; echo stubborn-up; while :; do sleep 0.1; done",
        ]) + "stop_grace = 2\n"),
    );
    let mut init = Init::start(&root, &[], None);
    init.wait_line("[stubborn] stubborn-up", Duration::from_secs(10));
    let sent = init.now();
    assert!(init.signal(SIGTERM));
    let st = init.wait_exit(Duration::from_secs(10));
    let done = init.now();
    let t = init.transcript();
    let stopping = init
        .find_line(log_is("stopping stubborn"))
        .unwrap_or_else(|| panic!("no stop line\n{t}"));
    let exited = init
        .find_line(|l| l.starts_with("hakim-init: stubborn exited with status"))
        .unwrap_or_else(|| panic!("no exit line\n{t}"));
    let grace = secs(exited.at - stopping.at);
    println!(
        "stop began {:.3} s after the signal; killed {grace:.3} s after the stop began; exit {:.3} s after the signal",
        secs(stopping.at.saturating_sub(sent)),
        secs(done - sent)
    );
    assert!(
        exited.text.contains("with status 137 after"),
        "expected death by SIGKILL (137): {}\n{t}",
        exited.text
    );
    assert!(
        (1.5..=2.5).contains(&grace),
        "killed {grace:.3} s after the stop began, want 2 ± 0.5\n{t}"
    );
    assert!(
        init.find_line(|l| l.contains("stubborn did not stop within 2 s; killing it"))
            .is_some(),
        "{t}"
    );
    assert_eq!(code(st), Some(0), "{t}");
}

// ---------------------------------------------------------------------------------------------
// 4. Double-forked strays and the final sweep

#[test]
fn double_forked_stray_of_a_service_is_swept_on_stop() {
    if !init_ready() {
        return;
    }
    let _g = serial();
    let root = Rootfs::new();
    root.service(
        "spawner",
        &(toml_command(&[
            "sh",
            "-c",
            "(sh -c 'trap \"echo swept > /tmp/swept; exit 0\" TERM; echo stray-up; sleep 1000 & wait' &) ; echo spawned; exit 0",
        ]) + "restart = \"never\"\n"),
    );
    let mut init = Init::start(&root, &[], None);
    init.wait_line("spawner exited with status 0", Duration::from_secs(10));
    init.wait_line("[spawner] stray-up", Duration::from_secs(10));
    let pid1 = init.pid1();
    let stray = init.wait_proc(Duration::from_secs(5), |p| {
        p.cmd().starts_with("sh -c trap") && p.ppid == pid1
    });
    println!(
        "stray pid {} (ns pid {}) re-parented to PID 1",
        stray.pid, stray.ns_pid
    );
    let t0 = Instant::now();
    assert!(init.signal(SIGTERM));
    let st = init.wait_exit(Duration::from_secs(10));
    let dt = secs(t0.elapsed());
    let t = init.transcript();
    println!("exit {st} {dt:.3} s after SIGTERM");
    assert_eq!(code(st), Some(0), "{t}");
    assert_eq!(
        root.read("/tmp/swept").as_deref(),
        Some("swept\n"),
        "the stray never got the sweep's SIGTERM\n{t}"
    );
    // The stray obeys SIGTERM: no need to wait out HAKIM_FINAL_GRACE (3 s).
    assert!(dt < 2.5, "exit took {dt:.3} s\n{t}");
}

#[test]
fn strays_of_the_command_are_swept_and_killed_after_final_grace() {
    if !init_ready() {
        return;
    }
    let _g = serial();
    let root = Rootfs::new();
    let script = "(sh -c 'trap \"echo swept > /tmp/swept; exit 0\" TERM; echo polite-up; sleep 1000 & wait' &) ; \
                  (sh -c 'trap \"\" TERM; echo stubborn-up; while :; do sleep 0.1; done' &) ; \
                  sleep 0.5; exit 3";
    let mut init = Init::start(
        &root,
        &[("HAKIM_INIT_VERBOSE", "1"), ("HAKIM_FINAL_GRACE", "1")],
        Some(&["sh", "-c", script]),
    );
    init.wait_line("polite-up", Duration::from_secs(10));
    init.wait_line("stubborn-up", Duration::from_secs(10));
    let st = init.wait_exit(Duration::from_secs(10));
    let end = init.now();
    let t = init.transcript();
    let stop = init
        .find_line(log_is("command exited: stopping (halt)"))
        .unwrap_or_else(|| panic!("no stop line\n{t}"));
    let after = secs(end - stop.at);
    println!("exit {st}, {after:.3} s after the command exited (final grace 1 s)");
    assert_eq!(code(st), Some(3), "the command's status must be kept\n{t}");
    assert_eq!(root.read("/tmp/swept").as_deref(), Some("swept\n"), "{t}");
    assert!(
        (0.9..=2.2).contains(&after),
        "the TERM-ignoring stray should be killed after HAKIM_FINAL_GRACE=1 s, exit came {after:.3} s after the stop began\n{t}"
    );
}

// ---------------------------------------------------------------------------------------------
// 5. Command mode: exit codes and signal forwarding

#[test]
fn command_mode_exit_codes() {
    if !init_ready() {
        return;
    }
    let _g = serial();
    let root = Rootfs::new();
    let cases: &[(&[&str], i32)] = &[
        (&["sh", "-c", "exit 0"], 0),
        (&["sh", "-c", "exit 1"], 1),
        (&["sh", "-c", "exit 7"], 7),
        (&["sh", "-c", "exit 255"], 255),
        (&["sh", "-c", "kill -TERM $$"], 143),
        (&["sh", "-c", "kill -USR1 $$"], 138),
        (&["/nonexistent/command"], 127),
    ];
    for (cmd, want) in cases {
        let mut init = Init::start(&root, &[], Some(cmd));
        let st = init.wait_exit(Duration::from_secs(10));
        println!("{cmd:?} -> {st}");
        assert_eq!(
            code(st),
            Some(*want),
            "{cmd:?}: got {st}\n{}",
            init.transcript()
        );
    }
}

#[test]
fn command_mode_forwards_signals_to_the_command() {
    if !init_ready() {
        return;
    }
    let _g = serial();
    let root = Rootfs::new();
    for (sig, name, want) in [
        (SIGUSR1, "USR1", 42),
        (SIGTERM, "TERM", 5),
        (SIGHUP, "HUP", 9),
    ] {
        let script =
            format!("trap 'echo got-{name}; exit {want}' {name}; echo ready; sleep 1000 & wait");
        let mut init = Init::start(&root, &[], Some(&["sh", "-c", &script]));
        init.wait_line("ready", Duration::from_secs(10));
        assert!(init.signal(sig));
        let st = init.wait_exit(Duration::from_secs(10));
        let t = init.transcript();
        println!("{name} -> {st}");
        assert!(
            init.find_line(|l| l == format!("got-{name}")).is_some(),
            "the command never saw SIG{name}\n{t}"
        );
        assert_eq!(code(st), Some(want), "{t}");
    }
}

#[test]
fn command_ignoring_a_stop_signal_is_killed_after_stop_grace() {
    let Some(_g) = ready() else { return };
    let root = Rootfs::new();
    // Every stop signal, forwarded (TERM, INT) or turned into the stop sequence (PWR,
    // RTMIN+3), ends in SIGKILL after HAKIM_STOP_GRACE: exit 128+9, with a log line.
    let script = "trap 'echo got-TERM' TERM; trap 'echo got-INT' INT; echo ready; \
                  while :; do sleep 1; done";
    for (sig, seen) in [
        (SIGTERM, "got-TERM"),
        (SIGINT, "got-INT"),
        (SIGPWR, "got-TERM"),
        (SIGRTMIN_3, "got-TERM"),
    ] {
        let mut init = Init::start(
            &root,
            &[("HAKIM_STOP_GRACE", "2")],
            Some(&["sh", "-c", script]),
        );
        init.wait_line("ready", Duration::from_secs(10));
        let sent = Instant::now();
        assert!(init.signal(sig));
        let st = init.wait_exit(Duration::from_secs(15));
        let took = secs(sent.elapsed());
        let t = init.transcript();
        println!("signal {sig} -> {st} after {took:.2} s");
        assert_eq!(code(st), Some(137), "signal {sig}\n{t}");
        assert!(
            (1.9..5.0).contains(&took),
            "signal {sig}: exited after {took:.2} s, grace 2 s\n{t}"
        );
        assert!(
            init.find_line(|l| l.starts_with("hakim-init: sh did not stop within 2 s")
                && l.ends_with("; killing it"))
                .is_some(),
            "signal {sig}: no kill line\n{t}"
        );
        assert!(
            init.find_line(|l| l == seen).is_some(),
            "signal {sig}: the command never saw it\n{t}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 6. Clean signal state in children

#[test]
fn children_start_with_empty_blocked_and_ignored_masks() {
    if !init_ready() {
        return;
    }
    let _g = serial();
    let root = Rootfs::new();
    root.service("rootsleep", &toml_command(&["sleep", "1001"]));
    root.service(
        "usersleep",
        &(toml_command(&["sleep", "1002"]) + "user = \"coder\"\n"),
    );
    let mut init = Init::start(&root, &[], None);
    let pid1 = proc_info(init.pid1()).unwrap();
    assert_eq!(
        pid1.sig_blk & (1 << (SIGTERM - 1)),
        1 << (SIGTERM - 1),
        "PID 1 itself blocks signals (so the test means something)"
    );
    for (cmd, uid) in [("sleep 1001", "0"), ("sleep 1002", "1000")] {
        let p = init.wait_proc(Duration::from_secs(10), |p| p.cmd() == cmd);
        println!("{cmd}: SigBlk {:016x} SigIgn {:016x}", p.sig_blk, p.sig_ign);
        assert_eq!(p.sig_blk, 0, "{cmd}: SigBlk");
        assert_eq!(p.sig_ign, 0, "{cmd}: SigIgn");
        let status = std::fs::read_to_string(format!("/proc/{}/status", p.pid)).unwrap();
        let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
        assert!(
            uid_line.split_whitespace().skip(1).all(|u| u == uid),
            "{cmd}: {uid_line}"
        );
    }
    assert!(init.signal(SIGTERM));
    assert_eq!(code(init.wait_exit(Duration::from_secs(10))), Some(0));

    let mut init = Init::start(&root, &[], Some(&["sleep", "1003"]));
    let p = init.wait_proc(Duration::from_secs(10), |p| p.cmd() == "sleep 1003");
    println!(
        "command sleep 1003: SigBlk {:016x} SigIgn {:016x}",
        p.sig_blk, p.sig_ign
    );
    assert_eq!(p.sig_blk, 0, "command: SigBlk");
    assert_eq!(p.sig_ign, 0, "command: SigIgn");
    assert!(init.signal(SIGTERM));
    assert_eq!(
        code(init.wait_exit(Duration::from_secs(10))),
        Some(143),
        "TERM forwarded to `sleep` kills it"
    );
}

#[test]
fn dispositions_inherited_by_pid1_are_reset_for_children() {
    if !init_ready() {
        return;
    }
    let _g = serial();
    let root = Rootfs::new();
    root.service("rootsleep", &toml_command(&["sleep", "1001"]));
    // PID 1 inherits SIG_IGN for HUP, USR2, the C libraries' internal 32, 33 and 34 (glibc's
    // posix_spawn leaves 32 and 33 ignored in what it starts), and 40: its children must still
    // start with every disposition at default.
    let ignored = [SIGHUP, 12, 32, 33, 34, 40];
    let mut init = Init::start_ignoring(&root, &[], None, &ignored);
    let p1 = proc_info(init.pid1()).unwrap();
    let want: u64 = ignored.iter().map(|s| 1u64 << (s - 1)).sum();
    assert_eq!(
        p1.sig_ign & want,
        want,
        "PID 1 did not inherit the ignored set"
    );
    let p = init.wait_proc(Duration::from_secs(10), |p| p.cmd() == "sleep 1001");
    let t = init.transcript();
    let left: Vec<i32> = (1..=64)
        .filter(|s| p.sig_ign & (1u64 << (s - 1)) != 0)
        .collect();
    println!(
        "PID 1 SigIgn {:016x}; service SigIgn {:016x} (still ignored: {left:?})",
        p1.sig_ign, p.sig_ign
    );
    // HUP is still forwarded to the services although PID 1 inherited it ignored (it is
    // blocked, so it is queued for the signalfd instead of discarded).
    assert!(init.signal(SIGHUP));
    init.wait_line("rootsleep exited with status 129", Duration::from_secs(5));
    assert!(init.signal(SIGTERM));
    assert_eq!(
        code(init.wait_exit(Duration::from_secs(10))),
        Some(0),
        "{t}"
    );
    assert!(
        left.is_empty(),
        "signals still ignored in a service: {left:?} (SigIgn {:016x})\n{t}",
        p.sig_ign
    );
}

// ---------------------------------------------------------------------------------------------
// 7. Signal storm

#[test]
fn survives_a_storm_of_10000_signals() {
    if !init_ready() {
        return;
    }
    let _g = serial();
    let root = Rootfs::new();
    root.service(
        "steady",
        &toml_command(&[
            "sh",
            "-c",
            "trap '' HUP USR1 USR2 WINCH QUIT; trap 'echo steady > /tmp/stopped; exit 0' TERM; echo steady-up; sleep 1000 & wait",
        ]),
    );
    let mut init = Init::start(&root, &[], None);
    init.wait_line("[steady] steady-up", Duration::from_secs(10));
    let svc = init.wait_proc(Duration::from_secs(5), |p| {
        p.cmd().starts_with("sh -c trap")
    });
    let mix = [
        1, 10, 12, 28, 17, 18, 40, 50, 3, 14, 13, 23, 34, 64, 20, 21, 22, 31, 45, 60,
    ];
    let pid1 = init.pid1();
    let t0 = Instant::now();
    let mut accepted = 0;
    for i in 0..10_000 {
        if send_signal(pid1, mix[i % mix.len()]) {
            accepted += 1;
        }
    }
    let storm = secs(t0.elapsed());
    std::thread::sleep(Duration::from_millis(500));
    let t = init.transcript();
    println!(
        "storm: 10000 kill(2) calls in {storm:.3} s, {accepted} accepted (real-time signals beyond RLIMIT_SIGPENDING are refused)"
    );
    let p1 = proc_info(pid1).unwrap_or_else(|| panic!("PID 1 is gone after the storm\n{t}"));
    assert_ne!(p1.state, 'Z', "PID 1 died in the storm\n{t}");
    let still = proc_info(svc.pid);
    assert!(
        still.is_some_and(|p| p.cmd() == svc.cmd()),
        "the service did not survive forwarded HUP/USR1/USR2/WINCH/QUIT it ignores\n{t}"
    );
    let t1 = Instant::now();
    assert!(init.signal(SIGTERM));
    let st = init.wait_exit(Duration::from_secs(10));
    let dt = secs(t1.elapsed());
    let t = init.transcript();
    println!("TERM after the storm: exit {st} in {dt:.3} s");
    assert_eq!(code(st), Some(0), "{t}");
    assert!(dt < 5.0, "{t}");
    assert_eq!(
        root.read("/tmp/stopped").as_deref(),
        Some("steady\n"),
        "{t}"
    );
}

// ---------------------------------------------------------------------------------------------
// 8. The Coder agent

#[test]
fn agent_is_downloaded_and_runs_as_the_user_with_the_token_only_in_its_env() {
    if !init_ready() {
        return;
    }
    let _g = serial();
    let server = Server::start(Vec::new(), fake_coder_reply());
    let root = Rootfs::new();
    root.service("svc", &toml_command(&["sleep", "2000"]));
    let env = agent_env(&server.url());
    let mut init = Init::start(&root, &borrow(&env), Some(&["sleep", "1000"]));
    let start = wait_starts(&root, &init, 1, Duration::from_secs(20))
        .pop()
        .unwrap();
    let t = init.transcript();
    println!("agent record: {start}");

    assert_eq!(
        start["argv"],
        serde_json::json!([AGENT_DEST, "agent"]),
        "{t}"
    );
    assert_eq!(start["uid"], serde_json::json!([1000, 1000, 1000, 1000]));
    assert_eq!(start["gid"], serde_json::json!([1000, 1000, 1000, 1000]));
    let groups: Vec<i64> = start["groups"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_i64)
        .collect();
    assert!(groups.contains(&999), "not in the docker group: {groups:?}");
    assert_eq!(start["cwd"], "/home/coder/project");
    let e = &start["env"];
    assert_eq!(e["HOME"], "/home/coder");
    assert_eq!(e["USER"], "coder");
    assert_eq!(e["LOGNAME"], "coder");
    let shell = e["SHELL"].as_str().unwrap_or("");
    assert!(
        shell == "/bin/sh" && root.path(shell).exists(),
        "SHELL {shell:?} (busybox root: /bin/sh)"
    );
    assert_eq!(e["CODER_AGENT_TOKEN"], TOKEN);
    assert!(
        e["CODER_AGENT_URL"]
            .as_str()
            .is_some_and(|u| u.starts_with(&server.url())),
        "{e}"
    );
    assert_eq!(start["sig_blocked"], "0000000000000000");
    // fake-coder is a Rust program: its runtime ignores SIGPIPE (bit 12) before it records.
    assert_eq!(start["sig_ignored"], "0000000000001000");

    // The binary was installed from the server's bytes, and fetched once.
    let installed = std::fs::read(root.path(AGENT_DEST)).expect("installed agent");
    assert!(installed == std::fs::read(fake_coder_bin()).unwrap());
    let mode = std::fs::metadata(root.path(AGENT_DEST))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o755);
    let hits = server.hits();
    assert_eq!(hits.len(), 1, "{hits:?}");
    assert_eq!(hits[0].path, BINARY_PATH);
    assert!(
        init.find_line(|l| fetch_says(l).is_some_and(|m| m.starts_with("installed ")))
            .is_some(),
        "{t}"
    );

    // The token is in the agent's environment and in no other process's.
    let agent_ns_pid = start["pid"].as_i64().unwrap() as i32;
    let procs = init.procs();
    let mut checked = Vec::new();
    for p in &procs {
        if p.pid == init.pid1() {
            continue;
        }
        let env = environ(p.pid).unwrap_or_default();
        let has = |needle: &[u8]| env.windows(needle.len()).any(|w| w == needle);
        if p.ns_pid == agent_ns_pid {
            assert!(has(TOKEN.as_bytes()), "agent's environ lacks the token");
            continue;
        }
        assert!(
            !has(TOKEN.as_bytes()) && !has(b"CODER_AGENT_TOKEN"),
            "{} (ns pid {}) has the token in its environment",
            p.cmd(),
            p.ns_pid
        );
        checked.push(p.cmd());
    }
    println!("token absent from: {checked:?}");
    for want in ["sleep 1000", "sleep 2000"] {
        assert!(
            checked.iter().any(|c| c == want),
            "{want} not checked: {checked:?}"
        );
    }

    // The account and home hakim-init prepared.
    let passwd = root.read("/etc/passwd").unwrap();
    assert!(
        passwd
            .lines()
            .any(|l| l.starts_with("coder:") && l.contains(":1000:1000:")),
        "{passwd}"
    );
    assert!(
        root.path("/home/coder/.profile").exists(),
        "skel not copied"
    );

    // TERM goes to the command (tini-like); its end stops the agent gracefully.
    assert!(init.signal(SIGTERM));
    let st = init.wait_exit(Duration::from_secs(20));
    let t = init.transcript();
    assert_eq!(code(st), Some(143), "{t}");
    assert!(
        records(&root)
            .iter()
            .any(|r| r["event"] == "signal" && r["name"] == "SIGTERM"),
        "the agent was not stopped with SIGTERM: {:?}\n{t}",
        records(&root)
    );
}

#[test]
fn agent_url_with_trailing_slash() {
    if !init_ready() {
        return;
    }
    let _g = serial();
    let server = Server::start(Vec::new(), fake_coder_reply());
    let root = Rootfs::new();
    let env = agent_env(&format!("{}/", server.url()));
    let mut init = Init::start(&root, &borrow(&env), None);
    let start = wait_starts(&root, &init, 1, Duration::from_secs(20))
        .pop()
        .unwrap();
    assert_eq!(start["argv"][1], "agent");
    let paths: Vec<String> = server.hits().into_iter().map(|h| h.path).collect();
    assert_eq!(paths, [BINARY_PATH], "{}", init.transcript());
    assert!(init.signal(SIGTERM));
    assert_eq!(code(init.wait_exit(Duration::from_secs(20))), Some(0));
}

#[test]
fn agent_download_retries_after_http_500() {
    if !init_ready() {
        return;
    }
    let _g = serial();
    let server = Server::start(
        vec![Reply::Status(500), Reply::Status(500)],
        fake_coder_reply(),
    );
    let root = Rootfs::new();
    let env = agent_env(&server.url());
    let mut init = Init::start(&root, &borrow(&env), None);
    wait_starts(&root, &init, 1, Duration::from_secs(20));
    let t = init.transcript();
    let hits = server.hits();
    assert_eq!(hits.len(), 3, "{hits:?}\n{t}");
    let g1 = secs(hits[1].at - hits[0].at);
    let g2 = secs(hits[2].at - hits[1].at);
    let retries = delays(&init.lines(), "retrying in");
    println!("requests {g1:.3} s then {g2:.3} s apart; announced delays {retries:?}");
    let fails: Vec<_> = init
        .lines()
        .into_iter()
        .filter(|l| {
            fetch_says(&l.text).is_some_and(|m| m.starts_with("GET ") && m.contains("HTTP 500"))
        })
        .collect();
    assert_eq!(fails.len(), 2, "{t}");
    assert_eq!(retries.len(), 2, "{t}");
    // Backoff 1 s then 2 s, each shortened by up to 20 % jitter.
    assert!((0.8..=1.0).contains(&retries[0].1), "{t}");
    assert!((1.6..=2.0).contains(&retries[1].1), "{t}");
    assert!(
        (0.75..=1.6).contains(&g1),
        "first retry after {g1:.3} s\n{t}"
    );
    assert!(
        (1.55..=2.6).contains(&g2),
        "second retry after {g2:.3} s\n{t}"
    );
    assert!(
        init.find_line(log_is("agent binary downloaded and verified"))
            .is_some(),
        "{t}"
    );
    assert!(init.signal(SIGTERM));
    assert_eq!(code(init.wait_exit(Duration::from_secs(20))), Some(0));
}

#[test]
fn agent_html_page_is_refused_and_baked_fallback_starts() {
    if !init_ready() {
        return;
    }
    let _g = serial();
    let html = b"<!DOCTYPE html>\n<html><body>Please log in</body></html>\n".to_vec();
    let server = Server::start(Vec::new(), Reply::Body(html, "text/html"));
    let root = Rootfs::new();
    root.install_fake_coder("/usr/local/bin/coder");
    let mut env = agent_env(&server.url());
    env.push(("HAKIM_AGENT_FALLBACK_AFTER", "2".into()));
    let mut init = Init::start(&root, &borrow(&env), None);
    let start = wait_starts(&root, &init, 1, Duration::from_secs(20))
        .pop()
        .unwrap();
    let t = init.transcript();
    assert_eq!(
        start["argv"],
        serde_json::json!(["/usr/local/bin/coder", "agent"]),
        "{t}"
    );
    let refused = init
        .find_line(|l| fetch_says(l).is_some_and(|m| m.contains("the server sent an HTML page")))
        .unwrap_or_else(|| panic!("no 'HTML page' refusal\n{t}"));
    println!("refusal: {}", refused.text);
    let first_failure = init
        .find_line(|l| l.contains("agent download failed (attempt 1)"))
        .unwrap_or_else(|| panic!("no failure line\n{t}"));
    let fallback = init
        .find_line(|l| l.contains("; using /usr/local/bin/coder"))
        .unwrap_or_else(|| panic!("no fallback line\n{t}"));
    let started = init
        .find_line(|l| l.starts_with("hakim-init: started agent"))
        .unwrap_or_else(|| panic!("no start line\n{t}"));
    let wait = secs(fallback.at - first_failure.at);
    println!(
        "fallback {wait:.3} s after the first failure; agent started {:.3} s later; {} requests",
        secs(started.at - fallback.at),
        server.hits().len()
    );
    assert!(
        // The loop notices the deadline at its next wakeup (at most 1 s later).
        (1.9..=3.3).contains(&wait),
        "fallback after {wait:.3} s, want ~2\n{t}"
    );
    assert!(started.at >= fallback.at, "{t}");
    // The HTML was never installed (nor left behind as a partial file).
    assert!(!root.path(AGENT_DEST).exists(), "{t}");
    let leftovers: Vec<_> = std::fs::read_dir(root.path("/var/lib/hakim/agent"))
        .map(|rd| rd.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert!(init.signal(SIGTERM));
    assert_eq!(code(init.wait_exit(Duration::from_secs(20))), Some(0));
}

#[test]
fn fallback_agent_keeps_downloading_and_switches_at_restart() {
    if !init_ready() {
        return;
    }
    let _g = serial();
    let html = || Reply::Body(b"<html>proxy error</html>".to_vec(), "text/html");
    // Three failures (attempts at ~0, ~1, ~3 s), then the real binary (~6-7 s).
    let server = Server::start(vec![html(), html(), html()], fake_coder_reply());
    let root = Rootfs::new();
    root.install_fake_coder("/usr/local/bin/coder");
    let mut env = agent_env(&server.url());
    env.push(("HAKIM_AGENT_FALLBACK_AFTER", "2".into()));
    let mut init = Init::start(&root, &borrow(&env), None);
    let first = wait_starts(&root, &init, 1, Duration::from_secs(20))
        .pop()
        .unwrap();
    assert_eq!(
        first["argv"][0],
        "/usr/local/bin/coder",
        "{}",
        init.transcript()
    );
    let downloaded = init.wait_line(
        "agent binary downloaded and verified",
        Duration::from_secs(15),
    );
    let t = init.transcript();
    println!(
        "downloaded at {:.3} s after {} requests while the fallback ran",
        secs(downloaded.at),
        server.hits().len()
    );
    assert_eq!(server.hits().len(), 4, "{t}");
    assert!(
        init.find_line(|l| l.contains("switches to the downloaded binary at its next restart"))
            .is_some(),
        "{t}"
    );
    // The running fallback is left alone; once it ends, the downloaded binary takes over.
    let agent = init.wait_proc(Duration::from_secs(5), |p| {
        p.cmd() == "/usr/local/bin/coder agent"
    });
    assert!(send_signal(agent.pid, SIGTERM));
    let second = wait_starts(&root, &init, 2, Duration::from_secs(10))
        .pop()
        .unwrap();
    assert_eq!(second["argv"][0], AGENT_DEST, "{}", init.transcript());
    assert!(init.signal(SIGTERM));
    assert_eq!(code(init.wait_exit(Duration::from_secs(20))), Some(0));
}

#[test]
fn agent_ignoring_term_is_killed_after_its_stop_grace() {
    if !init_ready() {
        return;
    }
    let _g = serial();
    let server = Server::start(Vec::new(), fake_coder_reply());
    let root = Rootfs::new();
    let mut env = agent_env(&server.url());
    env.push(("FAKE_CODER_IGNORE_SIGNALS", "1".into()));
    env.push(("HAKIM_AGENT_STOP_GRACE", "1".into()));
    let mut init = Init::start(&root, &borrow(&env), None);
    wait_starts(&root, &init, 1, Duration::from_secs(20));
    assert!(init.signal(SIGTERM));
    let st = init.wait_exit(Duration::from_secs(10));
    let t = init.transcript();
    let stopping = init
        .find_line(log_is("stopping agent"))
        .unwrap_or_else(|| panic!("{t}"));
    let exited = init
        .find_line(|l| l.starts_with("hakim-init: agent exited with status 137"))
        .unwrap_or_else(|| panic!("agent not killed\n{t}"));
    let grace = secs(exited.at - stopping.at);
    println!("agent killed {grace:.3} s after its stop began (HAKIM_AGENT_STOP_GRACE=1)");
    assert!((0.7..=1.5).contains(&grace), "{t}");
    assert!(
        records(&root)
            .iter()
            .any(|r| r["event"] == "signal" && r["name"] == "SIGTERM"),
        "the agent never saw SIGTERM\n{t}"
    );
    assert_eq!(code(st), Some(0), "{t}");
}

#[test]
fn crashing_agent_restarts_with_growing_delays() {
    if !init_ready() {
        return;
    }
    let _g = serial();
    let server = Server::start(Vec::new(), fake_coder_reply());
    let root = Rootfs::new();
    let mut env = agent_env(&server.url());
    env.push(("FAKE_CODER_EXIT", "1".into()));
    let mut init = Init::start(&root, &borrow(&env), None);
    let got = init.wait_line_where(Duration::from_secs(20), |_| {
        delays(&init.lines(), "restarting agent in").len() >= 3
    });
    let t = init.transcript();
    assert!(got.is_some(), "fewer than 3 restarts\n{t}");
    let lines = init.lines();
    let announced = delays(&lines, "restarting agent in");
    let started: Vec<Duration> = lines
        .iter()
        .filter(|l| l.text.starts_with("hakim-init: started agent"))
        .map(|l| l.at)
        .collect();
    let exits: Vec<Duration> = lines
        .iter()
        .filter(|l| l.text.starts_with("hakim-init: agent exited with status 1"))
        .map(|l| l.at)
        .collect();
    println!(
        "announced delays {:?}; observed {:?}",
        announced.iter().map(|a| a.1).collect::<Vec<_>>(),
        exits
            .iter()
            .zip(started.iter().skip(1))
            .map(|(e, s)| format!("{:.3}", secs(s.saturating_sub(*e))))
            .collect::<Vec<_>>()
    );
    for (i, (_, d)) in announced.iter().take(3).enumerate() {
        let nominal = f64::from(1u32 << i);
        assert!(
            d >= &(0.8 * nominal - 0.05) && d <= &(nominal + 0.05),
            "restart {} delay {d} s, want {nominal} s minus ≤ 20 %\n{t}",
            i + 1
        );
    }
    for i in 0..2 {
        let observed = secs(started[i + 1].saturating_sub(exits[i]));
        assert!(
            (observed - announced[i].1).abs() < 0.3,
            "restart {} came {observed:.3} s after the exit, announced {}\n{t}",
            i + 1,
            announced[i].1
        );
    }
    assert!(starts(&root).len() >= 3);
    assert!(init.signal(SIGTERM));
    assert_eq!(code(init.wait_exit(Duration::from_secs(20))), Some(0));
}

// ---------------------------------------------------------------------------------------------
// 9. Services

#[test]
fn service_waits_for_the_readiness_of_what_it_comes_after() {
    if !init_ready() {
        return;
    }
    let _g = serial();
    let root = Rootfs::new();
    // File order would start alpha first; `after` must win.
    root.service(
        "alpha",
        &(toml_command(&["sh", "-c", "echo alpha-start; sleep 1000"]) + "after = [\"zeta\"]\n"),
    );
    root.service(
        "zeta",
        &(toml_command(&[
            "sh",
            "-c",
            "echo zeta-start; sleep 1; touch /tmp/zeta.ready; echo zeta-ready; sleep 1000",
        ]) + "ready = { path = \"/tmp/zeta.ready\", timeout = 10 }\n"),
    );
    let mut init = Init::start(&root, &[], None);
    init.wait_line("[alpha] alpha-start", Duration::from_secs(10));
    let t = init.transcript();
    let at = |pred: &dyn Fn(&str) -> bool| {
        init.find_line(pred)
            .unwrap_or_else(|| panic!("missing line\n{t}"))
            .at
    };
    let zeta = at(&|l| l.starts_with("hakim-init: started zeta"));
    let ready = at(&log_is("zeta is ready"));
    let alpha = at(&|l| l.starts_with("hakim-init: started alpha"));
    println!(
        "zeta started {:.3}, ready +{:.3} s, alpha started +{:.3} s after zeta",
        secs(zeta),
        secs(ready - zeta),
        secs(alpha.saturating_sub(zeta))
    );
    assert!(ready >= zeta + Duration::from_millis(900), "{t}");
    assert!(alpha >= ready, "alpha started before zeta was ready\n{t}");
    assert!(alpha - ready < Duration::from_millis(700), "{t}");
    // Output is prefixed with the unit name, on stdout.
    for want in [
        "[zeta] zeta-start",
        "[zeta] zeta-ready",
        "[alpha] alpha-start",
    ] {
        let l = init
            .find_line(|l| l == want)
            .unwrap_or_else(|| panic!("no {want:?}\n{t}"));
        assert!(!l.stderr, "{want} on stderr");
    }
    assert!(init.signal(SIGTERM));
    assert_eq!(code(init.wait_exit(Duration::from_secs(20))), Some(0));
}

#[test]
fn service_with_missing_command_is_reported_and_others_run() {
    if !init_ready() {
        return;
    }
    let _g = serial();
    let root = Rootfs::new();
    root.service("ghost", &toml_command(&["/nonexistent/ghost", "--serve"]));
    root.service("ok", &toml_command(&["sh", "-c", "echo ok-up; sleep 1000"]));
    let mut init = Init::start(&root, &[], None);
    init.wait_line("[ok] ok-up", Duration::from_secs(10));
    let line = init.wait_line("cannot start ghost", Duration::from_secs(5));
    println!("{}", line.text);
    assert!(
        line.text.contains("/nonexistent/ghost") && line.text.contains("No such file"),
        "{}",
        line.text
    );
    std::thread::sleep(Duration::from_millis(1500));
    let t = init.transcript();
    let attempts = init
        .lines()
        .iter()
        .filter(|l| l.text.contains("cannot start ghost"))
        .count();
    println!("ghost start attempts in ~1.5 s: {attempts}");
    assert!(
        init.procs().iter().any(|p| p.cmd() == "sleep 1000"),
        "ok's child is gone\n{t}"
    );
    assert!(init.signal(SIGTERM));
    assert_eq!(
        code(init.wait_exit(Duration::from_secs(20))),
        Some(0),
        "{t}"
    );
}

#[test]
fn service_with_missing_command_does_not_hold_back_the_agent() {
    if !init_ready() {
        return;
    }
    let _g = serial();
    let server = Server::start(Vec::new(), fake_coder_reply());
    let root = Rootfs::new();
    // before_agent defaults to true: the agent waits for this service to be ready.
    root.service("ghost", &toml_command(&["/nonexistent/ghost"]));
    let env = agent_env(&server.url());
    let mut init = Init::start(&root, &borrow(&env), None);
    init.wait_line("cannot start ghost", Duration::from_secs(10));
    // A workspace with a broken piece should still come up: the agent must start anyway.
    wait_starts(&root, &init, 1, Duration::from_secs(15));
    assert!(init.signal(SIGTERM));
    assert_eq!(code(init.wait_exit(Duration::from_secs(20))), Some(0));
}

#[test]
fn services_disabled_by_enable_env_or_default_do_not_start() {
    if !init_ready() {
        return;
    }
    let _g = serial();
    let root = Rootfs::new();
    let svc = |n: u32, extra: &str| toml_command(&["sleep", &format!("{n}")]) + extra;
    root.service("off_by_env", &svc(3001, "enable_env = \"START_OFF\"\n"));
    root.service("off_by_default", &svc(3002, "enable_default = false\n"));
    root.service("on_by_env", &svc(3003, "enable_env = \"START_ON\"\n"));
    root.service(
        "on_when_unset",
        &svc(3004, "enable_env = \"START_UNSET\"\n"),
    );
    root.service(
        "env_beats_default",
        &svc(3005, "enable_env = \"START_ON\"\nenable_default = false\n"),
    );
    let mut init = Init::start(&root, &[("START_OFF", "0"), ("START_ON", "yes")], None);
    for n in [3003, 3004, 3005] {
        init.wait_proc(Duration::from_secs(10), |p| p.cmd() == format!("sleep {n}"));
    }
    std::thread::sleep(Duration::from_millis(500));
    let t = init.transcript();
    let cmds: Vec<String> = init.procs().iter().map(|p| p.cmd()).collect();
    for n in [3001, 3002] {
        assert!(
            !cmds.contains(&format!("sleep {n}")),
            "sleep {n} runs: {cmds:?}\n{t}"
        );
    }
    for name in ["off_by_env", "off_by_default"] {
        assert!(
            init.find_line(log_is(&format!("service {name}: disabled")))
                .is_some(),
            "{t}"
        );
        assert!(
            init.find_line(|l| l.starts_with(&format!("hakim-init: started {name} ")))
                .is_none(),
            "{t}"
        );
    }
    assert!(init.signal(SIGTERM));
    assert_eq!(code(init.wait_exit(Duration::from_secs(20))), Some(0));
}

// ---------------------------------------------------------------------------------------------
// 10. Stop order

#[test]
fn units_stop_in_reverse_start_order_agent_first() {
    if !init_ready() {
        return;
    }
    let _g = serial();
    let server = Server::start(Vec::new(), fake_coder_reply());
    let root = Rootfs::new();
    // Start order: b, c, a (a comes after c), then the agent (it waits for all three).
    root.service(
        "a",
        &(term_recorder("a", "/tmp/order") + "after = [\"c\"]\n"),
    );
    root.service("b", &term_recorder("b", "/tmp/order"));
    root.service("c", &term_recorder("c", "/tmp/order"));
    let env = agent_env(&server.url());
    let mut init = Init::start(&root, &borrow(&env), None);
    wait_starts(&root, &init, 1, Duration::from_secs(20));
    for n in ["a", "b", "c"] {
        init.wait_line(&format!("[{n}] {n}-up"), Duration::from_secs(5));
    }
    // The agent can record its start before init has logged spawning it.
    init.wait_line("hakim-init: started agent", Duration::from_secs(5));
    let started: Vec<String> = init
        .lines()
        .iter()
        .filter_map(|l| l.text.strip_prefix("hakim-init: started "))
        .map(|s| s.split(' ').next().unwrap().to_string())
        .collect();
    assert_eq!(started, ["b", "c", "a", "agent"], "{}", init.transcript());
    assert!(init.signal(SIGTERM));
    let st = init.wait_exit(Duration::from_secs(20));
    let t = init.transcript();
    assert_eq!(code(st), Some(0), "{t}");
    let lines = init.lines();
    let mut last = 0;
    for unit in ["agent", "a", "c", "b"] {
        let stop = index_of(&lines, log_is(&format!("stopping {unit}")))
            .unwrap_or_else(|| panic!("no 'stopping {unit}'\n{t}"));
        let exit = index_of(&lines, |l| {
            l.starts_with(&format!("hakim-init: {unit} exited with status 0"))
        })
        .unwrap_or_else(|| panic!("no '{unit} exited'\n{t}"));
        assert!(
            stop >= last && exit > stop,
            "{unit} stopped out of order\n{t}"
        );
        last = exit;
    }
    assert_eq!(root.read("/tmp/order").as_deref(), Some("a\nc\nb\n"), "{t}");
    assert!(
        records(&root)
            .iter()
            .any(|r| r["event"] == "signal" && r["name"] == "SIGTERM"),
        "{t}"
    );
}

#[test]
fn missing_token_file_is_reported_until_it_appears_and_services_keep_running() {
    if !init_ready() {
        return;
    }
    let _g = serial();
    let server = Server::start(Vec::new(), fake_coder_reply());
    let root = Rootfs::new();
    root.service(
        "keep.toml",
        "command = [\"/bin/sleep\", \"1000\"]\nstop_grace = 2\n",
    );
    let url = server.url();
    let env = [
        ("CODER_AGENT_URL", url.as_str()),
        ("CODER_AGENT_TOKEN_FILE", "/var/lib/coder-token"),
        ("FAKE_CODER_RECORD", RECORD),
        ("HAKIM_AGENT_RECHECK", "1"),
        ("HAKIM_INIT_VERBOSE", "1"),
    ];
    let mut init = Init::start(&root, &env, None);
    // The problem is logged, then again after each recheck period.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let count = |init: &Init| {
        init.lines()
            .iter()
            .filter(|l| l.text.contains("Coder agent not started"))
            .count()
    };
    while count(&init) < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the problem was not reported twice: {}",
            init.transcript()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !init.lines().iter().any(|l| l.text.contains(TOKEN)),
        "the token leaked into the log"
    );
    // Services run meanwhile.
    init.wait_proc(Duration::from_secs(10), |p| p.cmd().contains("sleep 1000"));
    // The token file appears: the agent starts.
    root.write("var/lib/coder-token", &format!("{TOKEN}\n"));
    let start = wait_starts(&root, &init, 1, Duration::from_secs(20))
        .pop()
        .unwrap();
    assert_eq!(start["argv"][1], "agent");
    assert!(init.signal(SIGTERM));
    assert_eq!(code(init.wait_exit(Duration::from_secs(20))), Some(0));
}

/// SIGTERM, then exit 0 within 20 s.
fn stop_cleanly(init: &mut Init) {
    assert!(init.signal(SIGTERM));
    assert_eq!(
        code(init.wait_exit(Duration::from_secs(20))),
        Some(0),
        "{}",
        init.transcript()
    );
}

/// The serial lock when the PID 1 tests can run here.
fn ready() -> Option<std::sync::MutexGuard<'static, ()>> {
    init_ready().then(serial)
}

#[test]
fn oversized_environment_variable_is_held_back_and_children_start() {
    let Some(_g) = ready() else { return };
    let root = Rootfs::new();
    // No process can be started with a 1 MiB variable (execve allows 128 KiB per string), so
    // it can only arrive through the image env file.
    root.write(
        "etc/hakim/image.env",
        &format!("SMALL=kept\nBIG={}\n", "x".repeat(1 << 20)),
    );
    root.service("ok", &toml_command(&["sh", "-c", "echo ok-up; sleep 1000"]));
    let mut init = Init::start(&root, &[], None);
    init.wait_line("[ok] ok-up", Duration::from_secs(10));
    let line = init.wait_line("environment variable BIG", Duration::from_secs(5));
    assert!(
        line.text.contains("1048581 bytes") && line.text.contains("not passed to any child"),
        "{}",
        line.text
    );
    let sleeper = init.wait_proc(Duration::from_secs(5), |p| p.cmd() == "sleep 1000");
    let env = String::from_utf8_lossy(&environ(sleeper.pid).unwrap_or_default()).into_owned();
    assert!(env.contains("SMALL=kept"), "{env}");
    assert!(
        !env.contains("BIG="),
        "the oversized variable reached a child"
    );
    stop_cleanly(&mut init);
}

/// `ROOT/etc` bind-mounted read-only on the host for the guard's life: the PID
/// namespace's mount namespace is a copy, so hakim-init sees a read-only `/etc`.
struct ReadOnlyEtc(std::path::PathBuf);

impl ReadOnlyEtc {
    fn new(root: &Rootfs) -> ReadOnlyEtc {
        let etc = root.path("etc");
        let run = |args: &[&str]| {
            let st = std::process::Command::new("mount")
                .args(args)
                .arg(&etc)
                .arg(&etc)
                .status()
                .expect("mount");
            assert!(st.success(), "mount {args:?} failed");
        };
        run(&["--bind"]);
        let guard = ReadOnlyEtc(etc.clone());
        run(&["-o", "remount,bind,ro"]);
        guard
    }
}

impl Drop for ReadOnlyEtc {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn read_only_etc_is_reported_and_the_workspace_still_starts() {
    let Some(_g) = ready() else { return };
    let server = Server::start(Vec::new(), fake_coder_reply());
    let root = Rootfs::new();
    root.service("ok", &toml_command(&["sh", "-c", "echo ok-up; sleep 1000"]));
    let passwd = root.read("etc/passwd").unwrap();
    let env = agent_env(&server.url());
    {
        let _ro = ReadOnlyEtc::new(&root);
        assert!(std::fs::write(root.path("etc/probe"), "x").is_err());
        let mut init = Init::start(&root, &borrow(&env), None);
        let line = init.wait_line("user coder:", Duration::from_secs(10));
        assert!(
            line.text.contains("/etc is not writable")
                && line.text.contains("running as 1000:1000"),
            "{}",
            line.text
        );
        init.wait_line("[ok] ok-up", Duration::from_secs(10));
        let start = wait_starts(&root, &init, 1, Duration::from_secs(20))
            .pop()
            .unwrap();
        assert_eq!(start["uid"], serde_json::json!([1000, 1000, 1000, 1000]));
        stop_cleanly(&mut init);
    }
    // Nothing was changed or left behind in /etc.
    assert_eq!(root.read("etc/passwd").unwrap(), passwd);
    let etc: Vec<String> = std::fs::read_dir(root.path("etc"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("hakim-new"))
        .collect();
    assert!(etc.is_empty(), "temporary files left in /etc: {etc:?}");
}

#[test]
fn token_file_readable_by_others_is_warned_and_used() {
    let Some(_g) = ready() else { return };
    let server = Server::start(Vec::new(), fake_coder_reply());
    let root = Rootfs::new();
    root.write("var/lib/coder-token", &format!("{TOKEN}\n"));
    std::fs::set_permissions(
        root.path("var/lib/coder-token"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let url = server.url();
    let env = [
        ("CODER_AGENT_URL", url.as_str()),
        ("CODER_AGENT_TOKEN_FILE", "/var/lib/coder-token"),
        ("FAKE_CODER_RECORD", RECORD),
        ("HAKIM_INIT_VERBOSE", "1"),
    ];
    let mut init = Init::start(&root, &env, None);
    let line = init.wait_line("readable by group or others", Duration::from_secs(10));
    assert!(
        line.text.contains("/var/lib/coder-token") && line.text.contains("0644"),
        "{}",
        line.text
    );
    assert!(!line.text.contains(TOKEN), "the token leaked into the log");
    let start = wait_starts(&root, &init, 1, Duration::from_secs(20))
        .pop()
        .unwrap();
    assert_eq!(start["argv"][1], "agent");
    stop_cleanly(&mut init);
}

#[test]
fn invalid_user_settings_are_refused_or_fall_back_whole_and_logged_on_one_line() {
    let Some(_g) = ready() else { return };
    // An unusable name: one line, nothing created, no agent; a newline in a variable's name
    // (logged in the list of names) cannot forge a line.
    let root = Rootfs::new();
    let mut init = Init::start(
        &root,
        &[
            ("CODER_USER", "a:0:0::/:/bin/sh"),
            ("X\nhakim-init: forged", "1"),
        ],
        None,
    );
    let line = init.wait_line("CODER_USER=", Duration::from_secs(10));
    assert!(
        line.text.contains("is not a portable user name"),
        "{}",
        line.text
    );
    let passwd = root.read("/etc/passwd").unwrap();
    assert_eq!(passwd, "root:x:0:0:root:/root:/bin/sh\n");
    let homes: Vec<_> = std::fs::read_dir(root.path("/home"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(homes.is_empty(), "{homes:?}");
    stop_cleanly(&mut init);
    let t = init.transcript();
    assert!(
        init.find_line(|l| l.starts_with("hakim-init: forged"))
            .is_none(),
        "a variable name forged a log line\n{t}"
    );
    assert!(
        init.find_line(|l| l.contains("X\\nhakim-init: forged"))
            .is_some(),
        "{t}"
    );

    // Invalid ids and home: documented defaults, one line each; `/` never reaches passwd.
    let root = Rootfs::new();
    let mut init = Init::start(
        &root,
        &[
            ("CODER_USER", "dev"),
            ("CODER_UID", "-1"),
            ("CODER_GID", "99999999999"),
            ("CODER_HOME", "/"),
        ],
        None,
    );
    init.wait_line("CODER_HOME=", Duration::from_secs(10));
    let t = init.transcript();
    for want in [
        "hakim-init: CODER_UID=\"-1\" is not an id",
        "hakim-init: CODER_GID=\"99999999999\" is not an id",
        "hakim-init: CODER_HOME=\"/\" is not an absolute normalised directory",
    ] {
        assert!(
            init.find_line(|l| l.starts_with(want)).is_some(),
            "{want}\n{t}"
        );
    }
    let passwd = root
        .wait_file("/etc/passwd", Duration::from_secs(5), |p| {
            p.contains("dev:")
        })
        .unwrap_or_default();
    assert!(
        passwd.lines().any(|l| l.starts_with("dev:")
            && l.contains(":1000:1000:")
            && l.contains(":/home/dev:")),
        "{passwd}\n{t}"
    );
    // The home is prepared after the account is written: wait for it.
    init.wait_line("home /home/dev: prepared", Duration::from_secs(10));
    assert!(
        root.path("/home/dev/project").is_dir(),
        "{}",
        init.transcript()
    );
    stop_cleanly(&mut init);
}

#[test]
fn double_dash_without_a_command_is_a_usage_error() {
    let Some(_g) = ready() else { return };
    let root = Rootfs::new();
    let mut init = Init::start(&root, &[], Some(&[]));
    let st = init.wait_exit(Duration::from_secs(10));
    let t = init.transcript();
    assert_eq!(code(st), Some(2), "{t}");
    assert!(
        init.find_line(|l| l == "hakim-init: -- needs a command")
            .is_some(),
        "{t}"
    );
}

#[test]
fn token_is_in_no_environment_but_the_agents_in_daemon_mode() {
    let Some(_g) = ready() else { return };
    let server = Server::start(Vec::new(), fake_coder_reply());
    let root = Rootfs::new();
    // A long-lived service with a child, and a double-forked stray re-parented to PID 1.
    root.service(
        "longlived",
        &toml_command(&["sh", "-c", "sleep 3000 & wait"]),
    );
    root.service(
        "spawner",
        &(toml_command(&["sh", "-c", "(sleep 4000 &) ; exit 0"]) + "restart = \"never\"\n"),
    );
    let env = agent_env(&server.url());
    let mut init = Init::start(&root, &borrow(&env), None);
    let start = wait_starts(&root, &init, 1, Duration::from_secs(20))
        .pop()
        .unwrap();
    let agent_ns_pid = start["pid"].as_i64().unwrap() as i32;
    for want in ["sleep 3000", "sleep 4000"] {
        init.wait_proc(Duration::from_secs(5), |p| p.cmd() == want);
    }
    let t = init.transcript();
    let mut checked = Vec::new();
    let mut agent_seen = false;
    for p in init.procs() {
        if p.pid == init.pid1() {
            // The runtime handed PID 1 the token; /proc/1/environ is root's to read only.
            continue;
        }
        let env = environ(p.pid).unwrap_or_default();
        let cmdline = p.cmdline.join("\0").into_bytes();
        let has = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
        if p.ns_pid == agent_ns_pid {
            assert!(
                has(&env, TOKEN.as_bytes()),
                "the agent lacks the token\n{t}"
            );
            agent_seen = true;
            continue;
        }
        for (what, hay) in [("environment", &env), ("command line", &cmdline)] {
            assert!(
                !has(hay, TOKEN.as_bytes()) && !has(hay, b"CODER_AGENT_TOKEN"),
                "{} (ns pid {}) has the token in its {what}\n{t}",
                p.cmd(),
                p.ns_pid
            );
        }
        checked.push(p.cmd());
    }
    println!("token absent from: {checked:?}");
    assert!(agent_seen, "the agent was not among the processes\n{t}");
    for want in ["sh -c sleep 3000 & wait", "sleep 3000", "sleep 4000"] {
        assert!(
            checked.iter().any(|c| c == want),
            "{want} not checked: {checked:?}"
        );
    }
    stop_cleanly(&mut init);
}

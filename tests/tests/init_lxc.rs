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
use std::time::{Duration, Instant};

use hakim_e2e::lxc::{
    binaries, build_rootfs, children_of, cmdline, ensure_subids, graceful_stop, manifest,
    manifest_diff, proc_status_field, ready, reboot, serial, shift_ids, stat_line, AgentExpect,
    AgentServer, Config, Container, Net, RootfsOptions, Serve, AGENT_BIN, BOOT_TIMEOUT, RECORD,
    SIGPWR, SIGRTMIN_3, SIGTERM, STOP_EXPECTED_BELOW, STOP_TIMEOUT_S,
};

const TOKEN: &str = "0c0e3f5a-hakim-lxc-test-token";

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

/// What the agent must see in these busybox containers (docker is gid 999 there).
fn check_agent_start(ct: &Container, rec: &serde_json::Value, url: &str) {
    let expect = AgentExpect {
        url: url.to_string(),
        token: TOKEN.to_string(),
        groups: vec![999, 1000],
        env: Vec::new(),
    };
    hakim_e2e::lxc::check_agent_start(ct, rec, &expect);
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
    let up = ct.boot(1);
    let rec = ct.start_record(1);
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
    ct.boot(1);
    let console_before = ct.console().len();
    let ((), back) = reboot(&ct, 2, |_| ());
    // Exactly one agent before: start, SIGTERM, exit 0; then the second start.
    assert_eq!(ct.records().len(), 4, "{}", ct.diagnostics());
    check_agent_start(&ct, &ct.start_record(2), &server.url());
    println!(
        "{}: agent back {back:.3} s after lxc-stop -r; downloads: {}",
        ct.name,
        server.downloads()
    );
    graceful_stop(&ct, console_before, &[SIGPWR, SIGRTMIN_3], 2);
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

    let up1 = ct.boot(1);
    let console1 = ct.console();
    check_agent_start(&ct, &ct.start_record(1), &server.url());
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
    let up2 = ct.boot(2);
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
    check_agent_start(&ct, &ct.start_record(1), &url);

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
    // The new container has a new network namespace: serve the agent there too.
    let console_before = ct.console().len();
    let (server2, back) = reboot(&ct, 2, |init2| {
        AgentServer::in_netns(init2, PORT, bins.fake_coder_bytes())
            .unwrap_or_else(|e| panic!("{e}\n{}", ct.diagnostics()))
    });
    check_agent_start(&ct, &ct.start_record(2), &url);
    println!(
        "{}: rebooted, agent running again after {back:.3} s; downloads {}",
        ct.name,
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
    ct.boot(1);
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
    ct.boot(1);
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

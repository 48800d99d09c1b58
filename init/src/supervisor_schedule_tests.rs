//! The supervisor's schedule, unit-tested through a fake [`Host`]: a clock that moves only
//! when the test says, children that exit only when the test (or a signal) says, and a
//! record of every spawn and signal with its time. These fail if the restart backoff or its
//! jitter, the readiness waits, one-shots, the stop order, the graces or the fallback to a
//! baked agent change; the end-to-end tests (tests/tests/init_*.rs) show the real calls.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use super::*;
use crate::spawn::Spawned;

const SIGTERM: i32 = libc::SIGTERM;
const SIGKILL: i32 = libc::SIGKILL;
/// The driver's clock step: timings are checked to this precision.
const STEP: Duration = Duration::from_millis(10);

#[derive(Default)]
struct World {
    elapsed: Duration,
    next_pid: i32,
    /// (when, pid, argv)
    spawned: Vec<(Duration, i32, Vec<String>)>,
    alive: Vec<i32>,
    exits: VecDeque<(i32, i32)>,
    /// (when, pid, signal, to the group)
    signals: Vec<(Duration, i32, i32, bool)>,
    /// (when, signal) of the final sweep.
    sweeps: Vec<(Duration, i32)>,
    files: Vec<PathBuf>,
    random: u64,
    /// Programs that survive every signal but SIGKILL.
    stubborn: Vec<String>,
    /// Programs that cannot be started.
    missing: Vec<String>,
}

impl World {
    fn argv0(&self, pid: i32) -> String {
        self.spawned
            .iter()
            .find(|(_, p, _)| *p == pid)
            .map(|(_, _, a)| a[0].clone())
            .unwrap_or_default()
    }

    fn exit(&mut self, pid: i32, status: i32) {
        if self.alive.contains(&pid) {
            self.alive.retain(|p| *p != pid);
            self.exits.push_back((pid, status));
        }
    }

    fn deliver(&mut self, pid: i32, sig: i32) {
        let ends = sig == SIGKILL
            || ([SIGTERM, libc::SIGINT, libc::SIGHUP].contains(&sig)
                && !self.stubborn.contains(&self.argv0(pid)));
        if ends {
            self.exit(pid, 128 + sig);
        }
    }
}

struct Fake {
    base: Instant,
    w: Rc<RefCell<World>>,
}

impl Host for Fake {
    fn now(&self) -> Instant {
        self.base + self.w.borrow().elapsed
    }
    fn spawn(
        &mut self,
        argv: &[String],
        _env: &[(String, String)],
        _cwd: &Path,
        _ids: Option<&Ids>,
        _capture: bool,
    ) -> io::Result<Spawned> {
        let mut w = self.w.borrow_mut();
        if w.missing.contains(&argv[0]) {
            return Err(io::ErrorKind::NotFound.into());
        }
        w.next_pid += 1;
        let pid = 100 + w.next_pid;
        let at = w.elapsed;
        w.spawned.push((at, pid, argv.to_vec()));
        w.alive.push(pid);
        Ok(Spawned {
            pid: Pid::from_raw(pid),
            output: None,
        })
    }
    fn kill(&mut self, pid: Pid, sig: i32) {
        let mut w = self.w.borrow_mut();
        let at = w.elapsed;
        w.signals.push((at, pid.as_raw(), sig, false));
        w.deliver(pid.as_raw(), sig);
    }
    fn killpg(&mut self, pid: Pid, sig: i32) {
        let mut w = self.w.borrow_mut();
        let at = w.elapsed;
        w.signals.push((at, pid.as_raw(), sig, true));
        w.deliver(pid.as_raw(), sig);
    }
    fn reap(&mut self) -> Option<(Pid, i32)> {
        let (pid, status) = self.w.borrow_mut().exits.pop_front()?;
        Some((Pid::from_raw(pid), status))
    }
    fn has_children(&mut self) -> bool {
        let w = self.w.borrow();
        !w.alive.is_empty() || !w.exits.is_empty()
    }
    fn signal_everything(&mut self, sig: i32, _is_pid1: bool) {
        let mut w = self.w.borrow_mut();
        let at = w.elapsed;
        w.sweeps.push((at, sig));
        for pid in w.alive.clone() {
            w.deliver(pid, sig);
        }
    }
    fn leftovers(&mut self, _is_pid1: bool) -> Vec<String> {
        let w = self.w.borrow();
        w.alive
            .iter()
            .map(|p| format!("{}[{p}]", w.argv0(*p)))
            .collect()
    }
    fn random(&mut self) -> u64 {
        self.w.borrow().random
    }
    fn exists(&self, path: &Path) -> bool {
        self.w.borrow().files.iter().any(|f| f == path)
    }
}

/// A supervisor on a fake host, and the loop that drives it as `run` would.
struct Sim {
    sup: Supervisor,
    w: Rc<RefCell<World>>,
    ending: Option<Ending>,
}

impl Sim {
    fn new() -> Sim {
        let w = Rc::new(RefCell::new(World::default()));
        let host = Fake {
            base: Instant::now(),
            w: w.clone(),
        };
        Sim {
            sup: Supervisor::with_host(true, Box::new(host)),
            w,
            ending: None,
        }
    }

    /// One pass of the event loop: timers, the end check, exits.
    fn step(&mut self) {
        for _ in 0..4 {
            let now = self.sup.host.now();
            self.sup.tick(now);
            if self.ending.is_none() {
                self.ending = self.sup.finished();
            }
            self.sup.reap();
        }
    }

    /// Lets `d` pass, in steps of [`STEP`].
    fn run_for(&mut self, d: Duration) {
        self.step();
        let end = self.w.borrow().elapsed + d;
        while self.w.borrow().elapsed < end {
            self.w.borrow_mut().elapsed += STEP;
            self.step();
        }
    }

    fn now(&self) -> Duration {
        self.w.borrow().elapsed
    }

    /// Start times of `argv0`.
    fn starts(&self, argv0: &str) -> Vec<Duration> {
        self.w
            .borrow()
            .spawned
            .iter()
            .filter(|(_, _, a)| a[0] == argv0)
            .map(|(t, _, _)| *t)
            .collect()
    }

    fn pid(&self, argv0: &str) -> i32 {
        let w = self.w.borrow();
        let pid = w
            .spawned
            .iter()
            .rev()
            .find(|(_, _, a)| a[0] == argv0)
            .map(|(_, p, _)| *p);
        pid.unwrap_or_else(|| panic!("{argv0} never started"))
    }

    fn running(&self, argv0: &str) -> bool {
        let w = self.w.borrow();
        w.alive.iter().any(|p| w.argv0(*p) == argv0)
    }

    /// `argv0` exits with `status` now.
    fn exit(&mut self, argv0: &str, status: i32) {
        let pid = self.pid(argv0);
        self.w.borrow_mut().exit(pid, status);
        self.step();
    }

    fn signal(&mut self, sig: i32) {
        self.sup.on_signal(sig);
        self.step();
    }

    /// (program, signal, time) of every signal sent to a unit.
    fn signals(&self) -> Vec<(String, i32, Duration)> {
        let w = self.w.borrow();
        w.signals
            .iter()
            .map(|(t, p, s, _)| (w.argv0(*p), *s, *t))
            .collect()
    }

    fn add_file(&self, p: &str) {
        self.w.borrow_mut().files.push(PathBuf::from(p));
    }
}

fn unit(name: &str) -> UnitSpec {
    UnitSpec {
        name: name.into(),
        argv: vec![name.into()],
        env: Vec::new(),
        cwd: PathBuf::from("/"),
        ids: None,
        restart: Restart::Always,
        stop_signal: SIGTERM,
        stop_grace: Duration::from_secs(10),
        ready: None,
        after: Vec::new(),
        clean: Vec::new(),
        dirs: Vec::new(),
        capture: false,
        backoff_max: Duration::from_secs(60),
        oneshot: None,
        requires: Vec::new(),
    }
}

fn ready_path(path: &str, timeout: u64) -> Option<Ready> {
    Some(Ready {
        path: Some(path.into()),
        tcp: None,
        command: None,
        timeout,
    })
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

const BAKED: &str = "/usr/local/bin/coder";
const DEST: &str = "/var/lib/hakim/agent/coder";

fn agent_fetch(fallback_after: u64) -> AgentFetch {
    AgentFetch {
        argv: vec!["fetch".into()],
        env: Vec::new(),
        dest: PathBuf::from(DEST),
        fallback: Some(PathBuf::from(BAKED)),
        fallback_after: Duration::from_secs(fallback_after),
    }
}

fn agent_spec() -> UnitSpec {
    let mut a = unit("agent");
    a.argv = vec![DEST.into(), "agent".into()];
    a.stop_grace = Duration::from_secs(30);
    a
}

/// A downloaded agent: the fetch child succeeds at once.
fn with_agent(sim: &mut Sim) {
    sim.sup.add_agent(agent_spec(), agent_fetch(60));
    sim.step();
    sim.exit("fetch", 0);
}

impl Sim {
    /// Lets `argv0` fail `n` times, each as soon as it is up; the seconds from each exit to
    /// the next start.
    fn restart_delays(&mut self, argv0: &str, status: i32, n: usize) -> Vec<f64> {
        let mut out = Vec::new();
        for _ in 0..n {
            let before = self.starts(argv0).len();
            let t = self.now();
            self.exit(argv0, status);
            while self.starts(argv0).len() == before {
                assert!(self.now() - t < secs(600.0), "{argv0} never restarted");
                self.run_for(STEP);
            }
            let started = *self.starts(argv0).last().unwrap();
            out.push(((started - t).as_secs_f64() * 100.0).round() / 100.0);
        }
        out
    }
}

// ------------------------------------------------------------------------------ restarts

#[test]
fn restart_backoff_doubles_from_one_second_and_caps_at_the_units_maximum() {
    let mut sim = Sim::new();
    sim.sup.add_service(unit("crashy"), false);
    sim.step();
    // random = 0: no jitter.
    assert_eq!(
        sim.restart_delays("crashy", 1, 8),
        [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]
    );
}

#[test]
fn restart_jitter_only_shortens_by_up_to_a_fifth() {
    let mut sim = Sim::new();
    let mut spec = unit("crashy");
    spec.backoff_max = Duration::from_secs(8);
    sim.sup.add_service(spec, false);
    sim.step();
    // The largest random number: the full 20 % off.
    sim.w.borrow_mut().random = u64::MAX;
    assert_eq!(
        sim.restart_delays("crashy", 1, 5),
        [0.8, 1.6, 3.2, 6.4, 6.4]
    );
}

#[test]
fn failures_are_forgotten_after_ten_minutes_up() {
    let mut sim = Sim::new();
    sim.sup.add_service(unit("svc"), false);
    sim.step();
    assert_eq!(sim.restart_delays("svc", 1, 3), [1.0, 2.0, 4.0]);
    sim.run_for(secs(600.0));
    assert_eq!(sim.restart_delays("svc", 1, 2), [1.0, 2.0]);
}

#[test]
fn restart_policies() {
    let mut sim = Sim::new();
    for (name, restart) in [
        ("always", Restart::Always),
        ("ok-once", Restart::OnFailure),
        ("fails", Restart::OnFailure),
        ("never", Restart::Never),
    ] {
        let mut spec = unit(name);
        spec.restart = restart;
        sim.sup.add_service(spec, false);
    }
    sim.step();
    for (name, status) in [("always", 0), ("ok-once", 0), ("fails", 3), ("never", 3)] {
        sim.exit(name, status);
    }
    sim.run_for(secs(5.0));
    assert_eq!(sim.starts("always").len(), 2);
    assert_eq!(sim.starts("ok-once").len(), 1, "exit 0 is not a failure");
    assert_eq!(sim.starts("fails").len(), 2);
    assert_eq!(sim.starts("never").len(), 1);
}

// ----------------------------------------------------------------------------- readiness

/// `db` (ready when `/run/db.sock` exists, 30 s at most), then `app` after it.
fn db_then_app() -> Sim {
    let mut sim = Sim::new();
    let mut db = unit("db");
    db.ready = ready_path("/run/db.sock", 30);
    let mut app = unit("app");
    app.after = vec!["db".into()];
    sim.sup.add_service(db, false);
    sim.sup.add_service(app, false);
    sim
}

#[test]
fn dependants_wait_until_the_ready_path_exists() {
    let mut sim = db_then_app();
    sim.run_for(secs(5.0));
    assert!(sim.starts("app").is_empty());
    sim.add_file("/run/db.sock");
    sim.run_for(secs(1.0));
    let (db_at, app_at) = (sim.starts("db")[0], sim.starts("app")[0]);
    // Probed every 200 ms.
    assert!(app_at >= secs(5.0) && app_at <= secs(5.25), "{app_at:?}");
    assert_eq!(db_at, Duration::ZERO);
}

#[test]
fn a_unit_never_ready_holds_its_dependants_for_its_timeout_only() {
    let mut sim = db_then_app();
    sim.run_for(secs(10.0));
    // Restarts do not extend the wait: it counts from the first start.
    sim.exit("db", 1);
    sim.run_for(secs(25.0));
    assert_eq!(sim.starts("app"), [secs(30.0)]);
}

#[test]
fn a_unit_that_cannot_start_does_not_hold_back_what_waits_for_it() {
    let mut sim = Sim::new();
    sim.w.borrow_mut().missing.push("ghost".into());
    let mut app = unit("app");
    app.after = vec!["ghost".into()];
    sim.sup.add_service(unit("ghost"), false);
    sim.sup.add_service(app, false);
    sim.run_for(secs(1.0));
    assert_eq!(sim.starts("app"), [Duration::ZERO]);
}

#[test]
fn the_agent_waits_for_the_services_before_it_only() {
    let mut sim = Sim::new();
    let mut slow = unit("slow");
    slow.ready = ready_path("/run/slow", 30);
    let mut other = unit("other");
    other.ready = ready_path("/run/other", 30);
    sim.sup.add_service(slow, true);
    sim.sup.add_service(other, false);
    with_agent(&mut sim);
    sim.run_for(secs(3.0));
    assert!(sim.starts(DEST).is_empty(), "the agent did not wait");
    sim.add_file("/run/slow");
    sim.run_for(secs(1.0));
    assert_eq!(
        sim.starts(DEST).len(),
        1,
        "the agent waited for a service not before it"
    );
}

// ----------------------------------------------------------------------------- one-shots

#[test]
fn a_failed_oneshot_releases_its_dependants_and_is_never_restarted() {
    let mut sim = Sim::new();
    let mut setup = unit("setup");
    setup.restart = Restart::Never;
    setup.oneshot = Some(Duration::from_secs(300));
    let mut app = unit("app");
    app.after = vec!["setup".into()];
    sim.sup.add_service(setup, false);
    sim.sup.add_service(app, false);
    sim.run_for(secs(20.0));
    assert!(
        sim.starts("app").is_empty(),
        "started before the one-shot ended"
    );
    sim.exit("setup", 3);
    sim.run_for(secs(10.0));
    assert_eq!(sim.starts("app"), [secs(20.0)]);
    assert_eq!(sim.starts("setup").len(), 1);
}

#[test]
fn an_overrunning_oneshot_is_killed_as_a_group_at_its_timeout() {
    let mut sim = Sim::new();
    let mut setup = unit("setup");
    setup.restart = Restart::Never;
    setup.oneshot = Some(Duration::from_secs(7));
    sim.w.borrow_mut().stubborn.push("setup".into());
    let mut app = unit("app");
    app.after = vec!["setup".into()];
    sim.sup.add_service(setup, false);
    sim.sup.add_service(app, false);
    sim.run_for(secs(10.0));
    assert_eq!(sim.signals(), [("setup".to_string(), SIGKILL, secs(7.0))]);
    assert!(sim.w.borrow().signals[0].3, "not sent to the group");
    assert_eq!(sim.starts("app"), [secs(7.0)]);
}

#[test]
fn requires_are_checked_when_due_after_a_oneshot() {
    let mut sim = Sim::new();
    let mut install = unit("install");
    install.restart = Restart::Never;
    install.oneshot = Some(Duration::from_secs(900));
    let mut daemon = unit("daemon");
    daemon.after = vec!["install".into()];
    daemon.requires = vec![PathBuf::from("/nix/daemon")];
    let mut other = unit("other");
    other.after = vec!["install".into()];
    other.requires = vec![PathBuf::from("/never")];
    sim.sup.add_service(install, false);
    sim.sup.add_service(daemon, false);
    sim.sup.add_service(other, false);
    sim.run_for(secs(2.0));
    sim.add_file("/nix/daemon");
    sim.exit("install", 0);
    sim.run_for(secs(5.0));
    assert_eq!(sim.starts("daemon"), [secs(2.0)]);
    assert!(
        sim.starts("other").is_empty(),
        "started without what it requires"
    );
}

// ------------------------------------------------------------------------------ stopping

/// Services `a`, `b` (after a), the agent, all up.
fn workspace() -> Sim {
    let mut sim = Sim::new();
    sim.sup.add_service(unit("a"), true);
    let mut b = unit("b");
    b.after = vec!["a".into()];
    sim.sup.add_service(b, true);
    with_agent(&mut sim);
    sim.run_for(secs(1.0));
    assert_eq!(sim.starts(DEST).len(), 1);
    sim
}

#[test]
fn stop_goes_agent_first_then_services_in_reverse_dependency_order() {
    let mut sim = workspace();
    sim.signal(SIGTERM);
    sim.run_for(secs(1.0));
    let order: Vec<(String, i32)> = sim.signals().into_iter().map(|(p, s, _)| (p, s)).collect();
    assert_eq!(
        order,
        [
            (DEST.to_string(), SIGTERM),
            ("b".to_string(), SIGTERM),
            ("a".to_string(), SIGTERM)
        ]
    );
    assert_eq!(sim.ending, Some(Ending::Exit(0)));
}

#[test]
fn the_stop_order_does_not_follow_restarts() {
    let mut sim = workspace();
    // `a` restarts after the agent started: it is still stopped last.
    sim.exit("a", 1);
    sim.run_for(secs(2.0));
    assert_eq!(sim.starts("a").len(), 2);
    sim.signal(SIGTERM);
    sim.run_for(secs(1.0));
    let order: Vec<String> = sim.signals().into_iter().map(|(p, _, _)| p).collect();
    assert_eq!(order, [DEST, "b", "a"]);
}

#[test]
fn each_unit_gets_its_grace_then_sigkill_and_the_next_waits_for_it() {
    let mut sim = workspace();
    sim.w
        .borrow_mut()
        .stubborn
        .extend([DEST.to_string(), "b".to_string()]);
    let t = sim.now();
    sim.signal(SIGTERM);
    sim.run_for(secs(45.0));
    let got: Vec<(String, i32, f64)> = sim
        .signals()
        .into_iter()
        .map(|(p, s, at)| (p, s, ((at - t).as_secs_f64() * 100.0).round() / 100.0))
        .collect();
    assert_eq!(
        got,
        [
            (DEST.to_string(), SIGTERM, 0.0),
            (DEST.to_string(), SIGKILL, 30.0),
            ("b".to_string(), SIGTERM, 30.0),
            ("b".to_string(), SIGKILL, 40.0),
            ("a".to_string(), SIGTERM, 40.0),
        ]
    );
}

#[test]
fn leftovers_get_sigterm_then_sigkill_after_the_final_grace() {
    let mut sim = workspace();
    // A double-forked stray that ignores SIGTERM: alive, not a unit.
    {
        let mut w = sim.w.borrow_mut();
        w.spawned.push((Duration::ZERO, 999, vec!["stray".into()]));
        w.alive.push(999);
        w.stubborn.push("stray".into());
    }
    let t = sim.now();
    sim.signal(SIGTERM);
    sim.run_for(secs(5.0));
    let sweeps: Vec<(f64, i32)> = sim
        .w
        .borrow()
        .sweeps
        .iter()
        .map(|(at, s)| (((*at - t).as_secs_f64() * 100.0).round() / 100.0, *s))
        .collect();
    assert_eq!(sweeps, [(0.0, SIGTERM), (3.0, SIGKILL)]);
    assert_eq!(sim.ending, Some(Ending::Exit(0)));
}

#[test]
fn sigint_stops_then_reboots_and_sigpwr_halts() {
    let mut sim = workspace();
    sim.signal(libc::SIGINT);
    sim.run_for(secs(1.0));
    assert_eq!(sim.ending, Some(Ending::Reboot));
    let mut sim = workspace();
    sim.signal(libc::SIGPWR);
    sim.run_for(secs(1.0));
    assert_eq!(sim.ending, Some(Ending::Exit(0)));
    let mut sim = workspace();
    sim.signal(SIGRTMIN_3);
    sim.run_for(secs(1.0));
    assert_eq!(sim.ending, Some(Ending::Exit(0)));
}

#[test]
fn operator_signals_reach_every_group_and_stop_nothing() {
    let mut sim = workspace();
    sim.signal(libc::SIGUSR1);
    sim.run_for(secs(1.0));
    let got: Vec<(String, i32)> = sim.signals().into_iter().map(|(p, s, _)| (p, s)).collect();
    assert_eq!(got.len(), 3);
    assert!(got.iter().all(|(_, s)| *s == libc::SIGUSR1));
    assert!(
        sim.w.borrow().signals.iter().all(|s| s.3),
        "sent to the groups"
    );
    assert_eq!(sim.ending, None);
}

#[test]
fn command_mode_forwards_sigterm_and_kills_after_the_grace() {
    let mut sim = Sim::new();
    let mut main = unit("cmd");
    main.restart = Restart::Never;
    main.stop_grace = Duration::from_secs(10);
    sim.w.borrow_mut().stubborn.push("cmd".into());
    sim.sup.add_main(main);
    sim.step();
    sim.signal(SIGTERM);
    sim.run_for(secs(12.0));
    let got: Vec<(String, i32, Duration)> = sim.signals();
    assert_eq!(got[0], ("cmd".to_string(), SIGTERM, Duration::ZERO));
    assert_eq!(got[1], ("cmd".to_string(), SIGKILL, secs(10.0)));
    assert_eq!(sim.ending, Some(Ending::Exit(128 + SIGKILL)));
}

// ----------------------------------------------------------------------- agent download

#[test]
fn agent_download_retries_one_second_doubling_to_thirty() {
    let mut sim = Sim::new();
    let mut fetch = agent_fetch(3600);
    fetch.fallback = None;
    sim.sup.add_agent(agent_spec(), fetch);
    sim.step();
    assert_eq!(
        sim.restart_delays("fetch", 1, 7),
        [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    );
    assert!(sim.starts(DEST).is_empty());
}

#[test]
fn the_baked_agent_runs_after_sixty_seconds_of_failed_downloads() {
    let mut sim = Sim::new();
    sim.add_file(BAKED);
    sim.sup.add_agent(agent_spec(), agent_fetch(60));
    sim.step();
    let first_failure = sim.now();
    sim.exit("fetch", 1);
    while sim.starts(BAKED).is_empty() {
        if sim.running("fetch") {
            sim.exit("fetch", 1);
        }
        sim.run_for(STEP);
        assert!(sim.now() < secs(120.0), "no fallback");
    }
    assert_eq!(sim.starts(BAKED), [first_failure + secs(60.0)]);
    // Downloads go on meanwhile; a success is used at the agent's next start.
    while !sim.running("fetch") {
        sim.run_for(STEP);
    }
    sim.exit("fetch", 0);
    sim.exit(BAKED, 1);
    sim.run_for(secs(2.0));
    assert_eq!(sim.starts(DEST).len(), 1);
}

#[test]
fn no_fallback_without_a_baked_agent() {
    let mut sim = Sim::new();
    sim.sup.add_agent(agent_spec(), agent_fetch(60));
    sim.step();
    for _ in 0..20 {
        if sim.running("fetch") {
            sim.exit("fetch", 1);
        }
        sim.run_for(secs(10.0));
    }
    assert!(sim.starts(BAKED).is_empty() && sim.starts(DEST).is_empty());
}

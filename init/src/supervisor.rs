//! The PID 1 event loop: signals (via signalfd), child exits (one
//! `waitpid(-1)` loop — nothing else waits), service output, timers.
//!
//! Every signal decision is made in [`Supervisor::on_signal`] and commented
//! there. Units (declared services, the Coder agent, the command in command
//! mode) start in order, restart with backoff, and stop in reverse order.

use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use hakim_netenv::text::printable;
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::SigSet;
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::unistd::Pid;

use crate::services::{Ready, Restart};
use crate::spawn::Ids;
use crate::sys::{Host, RealHost};

/// SIGRTMIN+3 as the kernel numbers it (glibc's SIGRTMIN is 34, not 32).
pub const SIGRTMIN_3: i32 = 37;

static QUIET: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Quiet: only problems are logged (plain command mode, where hakim-init should
/// be as invisible as tini).
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, std::sync::atomic::Ordering::Relaxed);
}

/// One log line, whatever the message holds: control characters and direction
/// overrides are escaped by the converter's one text cleaner ([`printable`], `\n`,
/// `\x1b`, `\u{9b}`, …), so a value from the environment can neither forge a line nor
/// drive the terminal. Never cut: a log line says all it has.
pub fn escape_controls(msg: &str) -> String {
    printable(msg, usize::MAX)
}

fn write_line(msg: &str) {
    let _ = writeln!(std::io::stderr(), "hakim-init: {}", escape_controls(msg));
}

/// Progress and state changes (suppressed when quiet).
pub fn log(msg: impl AsRef<str>) {
    if !QUIET.load(std::sync::atomic::Ordering::Relaxed) {
        write_line(msg.as_ref());
    }
}

/// Problems: always logged.
pub fn warn(msg: impl AsRef<str>) {
    write_line(msg.as_ref());
}

/// Exponential backoff (`base·2^attempt`, capped at `max`), each delay up to 20 % shorter
/// at random so restarting units do not fall into step.
/// `random` is the jitter's source (the host's).
pub fn backoff(attempt: u32, base: Duration, max: Duration, random: u64) -> Duration {
    let schedule = hakim_netenv::backoff::Backoff {
        base,
        cap: max,
        factor: 2,
        jitter: 0.2,
    };
    schedule.delay_with(attempt, random)
}

/// Produces the agent unit once its configuration is usable: `Ok(None)` means
/// no agent is wanted, `Err` a problem to report (and retry in a minute).
pub type AgentSource = Box<dyn FnMut() -> Result<Option<(UnitSpec, AgentFetch)>, String>>;

/// What a unit runs and how it is treated.
#[derive(Debug, Clone)]
pub struct UnitSpec {
    pub name: String,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
    pub ids: Option<Ids>,
    pub restart: Restart,
    pub stop_signal: i32,
    pub stop_grace: Duration,
    pub ready: Option<Ready>,
    /// Names of units that must be ready first.
    pub after: Vec<String>,
    /// Paths removed before every start (stale sockets, pid files).
    pub clean: Vec<PathBuf>,
    /// Directories created before every start (e.g. under a fresh /run).
    pub dirs: Vec<PathBuf>,
    /// Capture output and prefix it with the unit name.
    pub capture: bool,
    /// Backoff limits for restarts.
    pub backoff_max: Duration,
    /// A one-shot: runs once, to completion, within this time (then SIGKILL); what waits
    /// for it starts when it ends, however it ends.
    pub oneshot: Option<Duration>,
    /// Paths checked when the unit is due to start (a one-shot before it may have created
    /// them): one missing, and the unit is skipped for good.
    pub requires: Vec<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Waiting,
    Running,
    Backoff,
    Done,
}

struct Unit {
    spec: UnitSpec,
    phase: Phase,
    pid: Option<Pid>,
    started: Option<Instant>,
    failures: u32,
    next_start: Instant,
    ready: bool,
    ready_deadline: Option<Instant>,
    probe: Option<Pid>,
    next_probe: Instant,
    last_status: Option<i32>,
    /// A running one-shot is killed at this instant; `true` once it was.
    oneshot_deadline: Option<(Instant, bool)>,
}

/// The agent's binary comes from a fetch child; until then its unit waits.
pub struct AgentFetch {
    /// Argv of the fetch child (hakim-init re-executed in fetch mode).
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Where a successful fetch leaves the binary.
    pub dest: PathBuf,
    /// Used when downloads keep failing for `fallback_after`.
    pub fallback: Option<PathBuf>,
    pub fallback_after: Duration,
}

struct FetchState {
    cfg: AgentFetch,
    pid: Option<Pid>,
    attempts: u32,
    next: Instant,
    first_failure: Option<Instant>,
    have: Option<PathBuf>,
    /// Running on the fallback binary: keep trying to download meanwhile.
    on_fallback: bool,
}

/// How the loop ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    Exit(i32),
    Reboot,
}

struct Stopping {
    /// Units still to stop, the next first (reverse start order).
    queue: Vec<usize>,
    current: Option<(usize, Instant, bool)>,
    /// After the units: the final sweep of every remaining process.
    sweep: Option<(Instant, bool)>,
    ending: Ending,
}

struct Output {
    fd: OwnedFd,
    name: String,
    partial: Vec<u8>,
}

pub struct Supervisor {
    /// Every process and clock call goes through here.
    host: Box<dyn Host>,
    is_pid1: bool,
    units: Vec<Unit>,
    /// Index of the agent unit, if there is one.
    agent: Option<usize>,
    fetch: Option<FetchState>,
    /// Command mode: the main child's unit; its exit ends the container.
    main: Option<usize>,
    outputs: Vec<Output>,
    stopping: Option<Stopping>,
    /// Grace for the final sweep of leftover processes.
    pub final_grace: Duration,
    /// Names of units whose readiness the agent waits for.
    agent_waits_for: Vec<String>,
    agent_source: Option<AgentSource>,
    next_agent_check: Instant,
    /// How often an unusable agent configuration is looked at again.
    pub agent_recheck: Duration,
    /// Command mode: a stop signal was forwarded to the command; when it is still
    /// running at this instant it is killed (the signal's number, for the log line).
    main_deadline: Option<(Instant, i32)>,
}

impl Supervisor {
    pub fn new(is_pid1: bool) -> Self {
        Supervisor::with_host(is_pid1, Box::new(RealHost))
    }

    /// A supervisor whose process and clock calls go to `host` (a fake in unit tests).
    pub fn with_host(is_pid1: bool, host: Box<dyn Host>) -> Self {
        let now = host.now();
        Supervisor {
            host,
            is_pid1,
            units: Vec::new(),
            agent: None,
            fetch: None,
            main: None,
            outputs: Vec::new(),
            stopping: None,
            final_grace: Duration::from_secs(3),
            agent_waits_for: Vec::new(),
            agent_source: None,
            next_agent_check: now,
            agent_recheck: Duration::from_secs(60),
            main_deadline: None,
        }
    }

    fn push(&mut self, spec: UnitSpec) -> usize {
        let now = self.host.now();
        self.units.push(Unit {
            spec,
            phase: Phase::Waiting,
            pid: None,
            started: None,
            failures: 0,
            next_start: now,
            ready: false,
            ready_deadline: None,
            probe: None,
            next_probe: now,
            last_status: None,
            oneshot_deadline: None,
        });
        self.units.len() - 1
    }

    pub fn add_service(&mut self, spec: UnitSpec, before_agent: bool) {
        if before_agent {
            self.agent_waits_for.push(spec.name.clone());
        }
        self.push(spec);
    }

    /// The agent: `spec.argv[0]` is replaced by the fetched (or fallback) binary.
    pub fn add_agent(&mut self, mut spec: UnitSpec, fetch: AgentFetch) {
        spec.after = self.agent_waits_for.clone();
        let i = self.push(spec);
        self.agent = Some(i);
        self.fetch = Some(FetchState {
            cfg: fetch,
            pid: None,
            attempts: 0,
            next: self.host.now(),
            first_failure: None,
            have: None,
            on_fallback: false,
        });
    }

    /// Where the agent comes from; asked now and, while misconfigured, every minute
    /// (a token file may appear later).
    pub fn set_agent_source(&mut self, source: AgentSource) {
        self.agent_source = Some(source);
    }

    pub fn add_main(&mut self, spec: UnitSpec) {
        let i = self.push(spec);
        self.main = Some(i);
    }

    /// Runs until stopped. Signals must already be blocked in this thread.
    pub fn run(mut self) -> Ending {
        let mask = SigSet::all();
        let sfd = match SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        {
            Ok(fd) => fd,
            Err(e) => {
                warn(format!("cannot create signalfd: {e}"));
                return Ending::Exit(1);
            }
        };
        loop {
            let now = self.host.now();
            self.tick(now);
            if let Some(ending) = self.finished() {
                self.drain_outputs();
                return ending;
            }
            let wait = self
                .next_wakeup(now)
                .saturating_duration_since(self.host.now())
                .min(Duration::from_secs(1));
            let ready = {
                let mut fds = vec![PollFd::new(sfd.as_fd(), PollFlags::POLLIN)];
                for o in &self.outputs {
                    fds.push(PollFd::new(o.fd.as_fd(), PollFlags::POLLIN));
                }
                let timeout = PollTimeout::try_from(wait.as_millis().max(1) as i32)
                    .unwrap_or(PollTimeout::NONE);
                match poll(&mut fds, timeout) {
                    Ok(_) => fds
                        .iter()
                        .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
                        .collect::<Vec<_>>(),
                    Err(Errno::EINTR) => Vec::new(),
                    Err(e) => {
                        warn(format!("poll failed: {e}"));
                        std::thread::sleep(Duration::from_millis(100));
                        Vec::new()
                    }
                }
            };
            if ready.first() == Some(&true) {
                while let Ok(Some(info)) = sfd.read_signal() {
                    self.on_signal(info.ssi_signo as i32);
                }
            }
            let readable: Vec<usize> = ready
                .iter()
                .skip(1)
                .enumerate()
                .filter(|(_, r)| **r)
                .map(|(i, _)| i)
                .collect();
            self.read_outputs(&readable);
            self.reap();
        }
    }

    /// Every signal PID 1 can receive goes through here.
    fn on_signal(&mut self, sig: i32) {
        match sig {
            // Children are collected after every wakeup anyway.
            libc::SIGCHLD => {}
            // Command mode behaves like tini: the command decides what a signal means;
            // its exit ends the container with its status.
            _ if self.main.is_some()
                && [
                    libc::SIGTERM,
                    libc::SIGINT,
                    libc::SIGHUP,
                    libc::SIGQUIT,
                    libc::SIGUSR1,
                    libc::SIGUSR2,
                    libc::SIGWINCH,
                ]
                .contains(&sig) =>
            {
                if let Some(m) = self.main {
                    if let Some(pid) = self.units[m].pid {
                        self.host.kill(pid, sig);
                        // SIGTERM (docker stop, PVE application containers) and SIGINT
                        // (Ctrl-C, lxc-stop -r) are stop requests: the command may handle
                        // them as it likes, but within its grace (HAKIM_STOP_GRACE), as
                        // tini's caller (docker) would enforce; then SIGKILL. The first
                        // request starts the clock; repeats do not extend it. The others
                        // (HUP, QUIT, USR1/2, WINCH) ask for no stop: no deadline.
                        if matches!(sig, libc::SIGTERM | libc::SIGINT)
                            && self.main_deadline.is_none()
                        {
                            self.main_deadline =
                                Some((self.host.now() + self.units[m].spec.stop_grace, sig));
                        }
                    }
                }
            }
            // SIGPWR and SIGRTMIN+3 (lxc-stop) are not forwarded in command mode: they
            // start the stop sequence below, which sends the command its stop signal
            // (SIGTERM) and SIGKILL after the same grace.
            // Halt: SIGTERM (Docker, PVE application containers), SIGPWR (lxc-stop's
            // default), SIGRTMIN+3 (lxc-stop when init blocks SIGPWR; systemd's halt).
            libc::SIGTERM | libc::SIGPWR | SIGRTMIN_3 => {
                self.begin_stop(Ending::Exit(0), &format!("signal {sig}"));
            }
            // lxc-stop -r / PVE reboot: the same orderly stop, then reboot(2).
            libc::SIGINT => self.begin_stop(Ending::Reboot, "signal 2"),
            // Meant for the workload (reload, log reopen, terminal size, dump):
            // pass them on to every supervised process group.
            libc::SIGHUP | libc::SIGUSR1 | libc::SIGUSR2 | libc::SIGWINCH | libc::SIGQUIT => {
                for u in &self.units {
                    if let Some(pid) = u.pid {
                        self.host.killpg(pid, sig);
                    }
                }
            }
            // Job-control noise (e.g. from `timeout` or a shell): nothing to do.
            libc::SIGCONT | libc::SIGTSTP | libc::SIGTTIN | libc::SIGTTOU => {}
            // Anything else is never fatal to PID 1.
            other => log(format!("ignoring signal {other}")),
        }
    }

    fn begin_stop(&mut self, ending: Ending, why: &str) {
        if self.stopping.is_some() {
            return;
        }
        log(format!(
            "{why}: stopping ({})",
            if ending == Ending::Reboot {
                "reboot"
            } else {
                "halt"
            }
        ));
        // Reverse declaration order (what depends on a unit stops before it), whatever
        // restarts did to the start order: the command and the agent first, the user's
        // session after the agent, then the services in reverse dependency order.
        let running: Vec<usize> = (0..self.units.len())
            .rev()
            .filter(|&i| self.units[i].pid.is_some())
            .collect();
        for u in &mut self.units {
            if u.pid.is_none() {
                u.phase = Phase::Done;
            }
        }
        if let Some(f) = &self.fetch {
            if let Some(pid) = f.pid {
                self.host.killpg(pid, libc::SIGKILL);
            }
        }
        self.stopping = Some(Stopping {
            queue: running,
            current: None,
            sweep: None,
            ending,
        });
    }

    /// Collects every exited child; nothing else in the process calls wait.
    fn reap(&mut self) {
        while let Some((pid, status)) = self.host.reap() {
            self.on_exit(pid, status);
        }
    }

    fn on_exit(&mut self, pid: Pid, status: i32) {
        let now = self.host.now();
        if let Some(f) = &mut self.fetch {
            if f.pid == Some(pid) {
                f.pid = None;
                if self.stopping.is_some() {
                    // Killed by the stop sequence: not a failure, nothing to retry;
                    // its temp file cannot have been removed by the child itself.
                    remove_partial_downloads(&f.cfg.dest);
                } else if status == 0 {
                    log("agent binary downloaded and verified");
                    f.have = Some(f.cfg.dest.clone());
                    if f.on_fallback {
                        log("the agent switches to the downloaded binary at its next restart");
                    }
                    f.on_fallback = false;
                    f.attempts = 0;
                    f.first_failure = None;
                } else {
                    f.first_failure.get_or_insert(now);
                    let delay = crate::fetch::AGENT_FETCH_BACKOFF
                        .delay_with(f.attempts, self.host.random());
                    f.attempts += 1;
                    f.next = now + delay;
                    log(format!(
                        "agent download failed (attempt {}); retrying in {:.1} s",
                        f.attempts,
                        delay.as_secs_f64()
                    ));
                }
                return;
            }
        }
        for i in 0..self.units.len() {
            let u = &mut self.units[i];
            if u.probe == Some(pid) {
                u.probe = None;
                if status == 0 && !u.ready {
                    u.ready = true;
                    log(format!("{} is ready", u.spec.name));
                } else {
                    u.next_probe = now + Duration::from_millis(500);
                }
                return;
            }
            if u.pid != Some(pid) {
                continue;
            }
            u.pid = None;
            u.last_status = Some(status);
            let up = u.started.map(|s| now - s).unwrap_or_default();
            log(format!(
                "{} exited with status {status} after {:.1} s",
                u.spec.name,
                up.as_secs_f64()
            ));
            if self.stopping.is_some() || Some(i) == self.main {
                u.phase = Phase::Done;
                return;
            }
            let restart = match u.spec.restart {
                Restart::Always => true,
                Restart::OnFailure => status != 0,
                Restart::Never => false,
            };
            if let Some((_, killed)) = u.oneshot_deadline.take() {
                if status == 0 {
                    log(format!("{} finished", u.spec.name));
                } else if !killed {
                    warn(format!(
                        "{} failed with status {status}; starting what waits for it anyway",
                        u.spec.name
                    ));
                }
            }
            if !restart {
                u.phase = Phase::Done;
                // A unit that is done no longer holds its dependants back.
                u.ready = true;
                return;
            }
            if up >= Duration::from_secs(600) {
                u.failures = 0;
            }
            let delay = backoff(
                u.failures,
                Duration::from_secs(1),
                u.spec.backoff_max,
                self.host.random(),
            );
            u.failures += 1;
            u.next_start = now + delay;
            u.phase = Phase::Backoff;
            u.ready = false;
            log(format!(
                "restarting {} in {:.1} s",
                u.spec.name,
                delay.as_secs_f64()
            ));
            return;
        }
        // An orphan re-parented to us: reaped, nothing else to do.
    }

    fn deps_ready(&self, spec: &UnitSpec) -> bool {
        spec.after.iter().all(|name| {
            self.units
                .iter()
                .find(|u| &u.spec.name == name)
                .is_none_or(|u| u.ready)
        })
    }

    fn start(&mut self, i: usize, now: Instant) {
        let u = &mut self.units[i];
        if let Some(missing) = u.spec.requires.iter().find(|p| !self.host.exists(p)) {
            log(format!(
                "{}: not started, {} is missing",
                u.spec.name,
                missing.display()
            ));
            u.phase = Phase::Done;
            u.ready = true;
            return;
        }
        let argv = if Some(i) == self.agent {
            let Some(bin) = self.fetch.as_ref().and_then(|f| f.have.clone()) else {
                return;
            };
            let mut argv = self.units[i].spec.argv.clone();
            argv[0] = bin.display().to_string();
            argv
        } else {
            self.units[i].spec.argv.clone()
        };
        for dir in &self.units[i].spec.dirs {
            let spec = &self.units[i].spec;
            let made = std::fs::create_dir_all(dir).and_then(|()| match &spec.ids {
                // A service that runs as a user owns its directories (its sockets go there).
                Some(ids) => std::os::unix::fs::lchown(dir, Some(ids.uid), Some(ids.gid)),
                None => Ok(()),
            });
            if let Err(e) = made {
                warn(format!(
                    "{}: cannot create {}: {e}",
                    spec.name,
                    dir.display()
                ));
            }
        }
        for path in &self.units[i].spec.clean {
            if std::fs::symlink_metadata(path).is_ok() {
                let _ = std::fs::remove_file(path);
            }
        }
        let spec = &self.units[i].spec;
        match self
            .host
            .spawn(&argv, &spec.env, &spec.cwd, spec.ids.as_ref(), spec.capture)
        {
            Ok(s) => {
                log(format!("started {} (pid {})", spec.name, s.pid));
                if let Some(fd) = s.output {
                    let _ = nix::fcntl::fcntl(
                        &fd,
                        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
                    );
                    self.outputs.push(Output {
                        fd,
                        name: spec.name.clone(),
                        partial: Vec::new(),
                    });
                }
                let u = &mut self.units[i];
                u.pid = Some(s.pid);
                u.started = Some(now);
                u.phase = Phase::Running;
                u.next_probe = now;
                if let Some(limit) = u.spec.oneshot {
                    // Ready when it ends (or is killed at its deadline).
                    u.ready = false;
                    u.oneshot_deadline = Some((now + limit, false));
                    return;
                }
                u.ready = u.spec.ready.is_none();
                // Measured from the first attempt: restarts do not extend the wait
                // of what depends on this unit.
                let timeout = u.spec.ready.as_ref().map_or(0, |r| r.timeout);
                u.ready_deadline
                    .get_or_insert(now + Duration::from_secs(timeout));
            }
            Err(e) => {
                let u = &mut self.units[i];
                warn(format!("cannot start {}: {} ({e})", u.spec.name, argv[0]));
                if Some(i) == self.main {
                    u.last_status = Some(if e.kind() == std::io::ErrorKind::NotFound {
                        127
                    } else {
                        126
                    });
                    u.phase = Phase::Done;
                    return;
                }
                // A unit that cannot even start must not hold back what waits for it
                // longer than its readiness timeout (none without a ready check).
                let timeout = u.spec.ready.as_ref().map_or(0, |r| r.timeout);
                u.ready_deadline
                    .get_or_insert(now + Duration::from_secs(timeout));
                let delay = backoff(
                    u.failures,
                    Duration::from_secs(1),
                    u.spec.backoff_max,
                    self.host.random(),
                );
                u.failures += 1;
                u.next_start = now + delay;
                u.phase = if u.spec.restart == Restart::Never {
                    Phase::Done
                } else {
                    Phase::Backoff
                };
                if u.phase == Phase::Done {
                    u.ready = true;
                }
            }
        }
    }

    fn check_ready(&mut self, i: usize, now: Instant) {
        let u = &mut self.units[i];
        if u.ready {
            return;
        }
        // Running or retrying, but not ready in time: stop holding others back.
        if matches!(u.phase, Phase::Running | Phase::Backoff)
            && u.ready_deadline.is_some_and(|d| now >= d)
        {
            warn(format!(
                "{} not ready after {} s; starting what waits for it anyway",
                u.spec.name,
                u.spec.ready.as_ref().map_or(0, |r| r.timeout)
            ));
            u.ready = true;
            return;
        }
        if u.phase != Phase::Running || u.probe.is_some() || now < u.next_probe {
            return;
        }
        let Some(ready) = u.spec.ready.clone() else {
            return;
        };
        u.next_probe = now + Duration::from_millis(200);
        let mut ok = false;
        if let Some(p) = &ready.path {
            ok |= self.host.exists(std::path::Path::new(p));
        }
        if let Some(addr) = &ready.tcp {
            use std::net::ToSocketAddrs;
            ok |= addr
                .to_socket_addrs()
                .ok()
                .and_then(|mut a| a.next())
                .is_some_and(|a| {
                    std::net::TcpStream::connect_timeout(&a, Duration::from_millis(100)).is_ok()
                });
        }
        if ok {
            u.ready = true;
            log(format!("{} is ready", u.spec.name));
            return;
        }
        if let Some(cmd) = ready.command.as_ref().filter(|c| !c.is_empty()) {
            if let Ok(s) =
                self.host
                    .spawn(cmd, &u.spec.env, &u.spec.cwd, u.spec.ids.as_ref(), false)
            {
                u.probe = Some(s.pid);
            }
        }
    }

    fn tick(&mut self, now: Instant) {
        if self.stopping.is_some() {
            self.tick_stop(now);
            return;
        }
        self.enforce_main_deadline(now);
        if self.agent.is_none() && now >= self.next_agent_check {
            if let Some(source) = &mut self.agent_source {
                match source() {
                    Ok(None) => self.agent_source = None,
                    Ok(Some((spec, fetch))) => {
                        self.agent_source = None;
                        self.add_agent(spec, fetch);
                    }
                    Err(problem) => {
                        warn(format!(
                            "Coder agent not started: {problem} (checking again in {} s)",
                            self.agent_recheck.as_secs_f64()
                        ));
                        self.next_agent_check = now + self.agent_recheck;
                    }
                }
            }
        }
        self.tick_fetch(now);
        self.enforce_oneshot_deadlines(now);
        for i in 0..self.units.len() {
            self.check_ready(i, now);
            let u = &self.units[i];
            let due = match u.phase {
                Phase::Waiting => self.deps_ready(&u.spec),
                Phase::Backoff => now >= u.next_start,
                _ => false,
            };
            if due {
                self.start(i, now);
            }
        }
    }

    /// A one-shot that overruns its time is killed with everything it started; its end
    /// then releases what waits for it.
    fn enforce_oneshot_deadlines(&mut self, now: Instant) {
        for u in &mut self.units {
            let (Some(pid), Some((deadline, false))) = (u.pid, u.oneshot_deadline) else {
                continue;
            };
            if now < deadline {
                continue;
            }
            warn(format!(
                "{} did not finish within {} s; killing it and starting what waits for it",
                u.spec.name,
                u.spec.oneshot.unwrap_or_default().as_secs_f64()
            ));
            self.host.killpg(pid, libc::SIGKILL);
            u.oneshot_deadline = Some((deadline, true));
        }
    }

    /// Command mode: the command got a forwarded stop signal and outlived its grace.
    fn enforce_main_deadline(&mut self, now: Instant) {
        let (Some(m), Some((deadline, sig))) = (self.main, self.main_deadline) else {
            return;
        };
        if now < deadline {
            return;
        }
        self.main_deadline = None;
        let u = &self.units[m];
        if let Some(pid) = u.pid {
            // A problem: logged even in quiet command mode.
            warn(format!(
                "{} did not stop within {} s of signal {sig}; killing it",
                u.spec.name,
                u.spec.stop_grace.as_secs_f64()
            ));
            // Its whole process group, as the stop sequence does: the command's own
            // children must not outlive it. Its exit (128+9) then ends the container.
            self.host.killpg(pid, libc::SIGKILL);
        }
    }

    fn tick_fetch(&mut self, now: Instant) {
        let agent_running = self.agent.is_some_and(|a| self.units[a].pid.is_some());
        let Some(f) = &mut self.fetch else { return };
        if f.pid.is_none() && (f.have.is_none() || f.on_fallback) && now >= f.next {
            remove_partial_downloads(&f.cfg.dest);
            // Not captured: the child's lines already say `hakim-init: fetch:`.
            match self.host.spawn(
                &f.cfg.argv,
                &f.cfg.env,
                std::path::Path::new("/"),
                None,
                false,
            ) {
                Ok(s) => {
                    f.pid = Some(s.pid);
                    if let Some(fd) = s.output {
                        let _ = nix::fcntl::fcntl(
                            &fd,
                            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
                        );
                        self.outputs.push(Output {
                            fd,
                            name: "fetch".into(),
                            partial: Vec::new(),
                        });
                    }
                }
                Err(e) => {
                    log(format!("cannot start the agent download: {e}"));
                    f.next = now + Duration::from_secs(5);
                }
            }
        }
        // Downloads keep failing: run the binary baked into the image meanwhile.
        if f.have.is_none() && !agent_running {
            if let (Some(first), Some(fallback)) = (f.first_failure, &f.cfg.fallback) {
                if now - first >= f.cfg.fallback_after && self.host.exists(fallback) {
                    log(format!(
                        "agent download failing for {} s; using {}",
                        (now - first).as_secs(),
                        fallback.display()
                    ));
                    f.have = Some(fallback.clone());
                    f.on_fallback = true;
                }
            }
        }
    }

    fn tick_stop(&mut self, now: Instant) {
        let Some(mut st) = self.stopping.take() else {
            return;
        };
        loop {
            if let Some((i, deadline, killed)) = st.current {
                if self.units[i].pid.is_none() {
                    st.current = None;
                    continue;
                }
                if now >= deadline && !killed {
                    let u = &self.units[i];
                    warn(format!(
                        "{} did not stop within {} s; killing it",
                        u.spec.name,
                        u.spec.stop_grace.as_secs_f64()
                    ));
                    if let Some(pid) = u.pid {
                        self.host.killpg(pid, libc::SIGKILL);
                    }
                    st.current = Some((i, now + Duration::from_secs(2), true));
                } else if now >= deadline {
                    // Unkillable (D state): move on, the sweep handles it.
                    st.current = None;
                    continue;
                }
                break;
            }
            if let Some(i) = st.queue.first().copied() {
                st.queue.remove(0);
                let u = &self.units[i];
                if let Some(pid) = u.pid {
                    log(format!("stopping {}", u.spec.name));
                    self.host.killpg(pid, u.spec.stop_signal);
                    st.current = Some((i, now + u.spec.stop_grace, false));
                }
                continue;
            }
            // Every unit is down: sweep what is left (double-forked strays).
            match st.sweep {
                None => {
                    if self.host.has_children() {
                        let left = self.host.leftovers(self.is_pid1);
                        if !left.is_empty() {
                            log(format!(
                                "processes left after every unit stopped: {}; sending SIGTERM",
                                left.join(" ")
                            ));
                        }
                        self.host.signal_everything(libc::SIGTERM, self.is_pid1);
                        st.sweep = Some((now + self.final_grace, false));
                    } else {
                        st.sweep = Some((now, true));
                    }
                }
                Some((deadline, false)) if now >= deadline || !self.host.has_children() => {
                    if self.host.has_children() {
                        self.host.signal_everything(libc::SIGKILL, self.is_pid1);
                    }
                    st.sweep = Some((now + Duration::from_secs(1), true));
                }
                _ => {}
            }
            break;
        }
        self.stopping = Some(st);
    }

    fn finished(&mut self) -> Option<Ending> {
        // Command mode: the command's end is the container's end.
        if let Some(m) = self.main {
            if self.units[m].phase == Phase::Done && self.stopping.is_none() {
                let code = self.units[m].last_status.unwrap_or(0);
                self.begin_stop(Ending::Exit(code), "command exited");
                // Start stopping at once: nothing may be left to wait for.
                self.tick_stop(self.host.now());
                if let Some(st) = &mut self.stopping {
                    st.ending = Ending::Exit(code);
                }
            }
        }
        let st = self.stopping.as_ref()?;
        let done = st.queue.is_empty()
            && st.current.is_none()
            && matches!(st.sweep, Some((_, true)))
            && (!self.host.has_children() || st.sweep.is_some_and(|(d, _)| self.host.now() >= d));
        if !done {
            return None;
        }
        let mut ending = st.ending;
        if let Some(m) = self.main {
            if let Ending::Exit(_) = ending {
                ending = Ending::Exit(self.units[m].last_status.unwrap_or(0));
            }
        }
        Some(ending)
    }

    fn next_wakeup(&self, now: Instant) -> Instant {
        let mut t = now + Duration::from_secs(1);
        let mut consider = |x: Instant| {
            if x < t {
                t = x;
            }
        };
        for u in &self.units {
            if u.phase == Phase::Backoff {
                consider(u.next_start);
            }
            if u.phase == Phase::Running && !u.ready {
                consider(u.next_probe);
            }
            if let Some((d, false)) = u.oneshot_deadline {
                consider(d);
            }
        }
        for u in &self.units {
            if !u.ready {
                if let Some(d) = u.ready_deadline {
                    consider(d);
                }
            }
        }
        if let Some(f) = &self.fetch {
            if f.pid.is_none() && (f.have.is_none() || f.on_fallback) {
                consider(f.next);
            }
            if let (None, Some(first)) = (&f.have, f.first_failure) {
                if f.cfg.fallback.is_some() {
                    consider(first + f.cfg.fallback_after);
                }
            }
        }
        if let Some((d, _)) = self.main_deadline {
            consider(d);
        }
        if let Some(st) = &self.stopping {
            if let Some((_, d, _)) = st.current {
                consider(d);
            }
            if let Some((d, _)) = st.sweep {
                consider(d);
            }
        }
        t
    }

    fn read_outputs(&mut self, readable: &[usize]) {
        let mut closed = Vec::new();
        for &i in readable {
            let Some(o) = self.outputs.get_mut(i) else {
                continue;
            };
            let mut buf = [0u8; 8192];
            loop {
                match nix::unistd::read(&o.fd, &mut buf) {
                    Ok(0) => {
                        closed.push(i);
                        break;
                    }
                    Ok(n) => {
                        o.partial.extend_from_slice(&buf[..n]);
                        emit_lines(&o.name, &mut o.partial, false);
                    }
                    Err(Errno::EAGAIN) => break,
                    Err(Errno::EINTR) => continue,
                    Err(_) => {
                        closed.push(i);
                        break;
                    }
                }
            }
        }
        closed.sort_unstable();
        for i in closed.into_iter().rev() {
            let mut o = self.outputs.remove(i);
            emit_lines(&o.name, &mut o.partial, true);
        }
    }

    fn drain_outputs(&mut self) {
        let all: Vec<usize> = (0..self.outputs.len()).collect();
        self.read_outputs(&all);
    }
}

/// A download killed mid-way (stop, power loss) leaves `.NAME.part-*` next to
/// the destination; only one download runs at a time, so any such file is stale.
fn remove_partial_downloads(dest: &std::path::Path) {
    let (Some(dir), Some(name)) = (dest.parent(), dest.file_name()) else {
        return;
    };
    let prefix = format!(".{}.part-", name.to_string_lossy());
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Writes complete lines as `[name] line`; long partial lines are flushed too.
fn emit_lines(name: &str, buf: &mut Vec<u8>, flush_all: bool) {
    let mut out = std::io::stdout().lock();
    while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
        let line: Vec<u8> = buf.drain(..=pos).collect();
        let _ = write!(out, "[{name}] ");
        let _ = out.write_all(&line);
    }
    if !buf.is_empty() && (flush_all || buf.len() > 4096) {
        let _ = write!(out, "[{name}] ");
        let _ = out.write_all(buf);
        let _ = out.write_all(b"\n");
        buf.clear();
    }
    let _ = out.flush();
}

#[cfg(test)]
#[path = "supervisor_schedule_tests.rs"]
mod schedule;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_escape_control_characters() {
        assert_eq!(escape_controls("plain é"), "plain é");
        assert_eq!(
            escape_controls("a\nhakim-init: forged\r\t\u{1b}[31m\u{7f}\u{0}\u{9b}z\u{202e}"),
            "a\\nhakim-init: forged\\r\\t\\x1b[31m\\x7f\\0\\u{9b}z\\u{202e}"
        );
    }

    #[test]
    fn lines_are_prefixed() {
        let mut buf = b"one\ntwo\npart".to_vec();
        emit_lines("svc", &mut buf, false);
        assert_eq!(buf, b"part");
        emit_lines("svc", &mut buf, true);
        assert!(buf.is_empty());
    }
}

//! Harness for the end-to-end tests of `hakim-init` as a real PID 1 (see
//! `tests/tests/init_pid1.rs`).
//!
//! Each test gets its own busybox root ([`Rootfs`]) holding the static `hakim-init` from
//! `ci/build-init.sh` and, when wanted, a static `fake-coder`. [`Init`] runs it as PID 1 of a new
//! PID and mount namespace (`unshare --pid --fork --mount --mount-proc --kill-child chroot ROOT
//! /usr/local/sbin/hakim-init`), timestamps every line it prints, finds its host pid, sends it
//! signals and lists the processes of its namespace through the host's `/proc`. [`Server`] is a
//! tiny HTTP server on 127.0.0.1 for the agent download.
//!
//! Gating: [`init_ready`] needs root, `unshare`, `chroot`, `busybox`, `mknod` and `rustc`;
//! without them tests print `skipping: … missing` and pass, unless `HAKIM_E2E=1`.
//! `HAKIM_E2E_KEEP=1` keeps the temporary roots for inspection.

use std::collections::VecDeque;
use std::ffi::c_int;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::{find_on_path, run_ok, show, workspace_root};

extern "C" {
    fn kill(pid: c_int, sig: c_int) -> c_int;
    fn syscall(num: std::ffi::c_long, ...) -> std::ffi::c_long;
}

/// x86_64 syscall numbers (the harness only builds x86_64 binaries).
const SYS_RT_SIGACTION: std::ffi::c_long = 13;
const SYS_RT_SIGPROCMASK: std::ffi::c_long = 14;

/// The kernel's `struct sigaction` on x86_64.
#[repr(C)]
struct KernelSigaction {
    handler: usize,
    flags: u64,
    restorer: usize,
    mask: u64,
}

/// In a forked child before exec: every disposition SIG_DFL except `ignored` (SIG_IGN), and
/// nothing blocked. Raw syscalls, so the C library's reserved signals (32–34) are covered too.
fn reset_signals(ignored: &[i32]) {
    for sig in 1..=64 {
        if sig == 9 || sig == 19 {
            continue;
        }
        let act = KernelSigaction {
            handler: usize::from(ignored.contains(&sig)),
            flags: 0,
            restorer: 0,
            mask: 0,
        };
        // SAFETY: valid pointer to a kernel sigaction, sigsetsize 8.
        unsafe {
            syscall(
                SYS_RT_SIGACTION,
                sig as std::ffi::c_long,
                &act as *const KernelSigaction,
                std::ptr::null_mut::<KernelSigaction>(),
                8 as std::ffi::c_long,
            );
        }
    }
    let empty: u64 = 0;
    // SAFETY: SIG_SETMASK (2) with a valid 8-byte set.
    unsafe {
        syscall(
            SYS_RT_SIGPROCMASK,
            2 as std::ffi::c_long,
            &empty as *const u64,
            std::ptr::null_mut::<u64>(),
            8 as std::ffi::c_long,
        );
    }
}

/// Where `hakim-init` lives inside every test root.
pub const INIT_PATH: &str = "/usr/local/sbin/hakim-init";

/// Sends `sig` to host pid `pid`; `true` when the kernel accepted it.
pub fn send_signal(pid: i32, sig: i32) -> bool {
    assert!(pid > 0, "refusing to signal pid {pid}");
    // SAFETY: plain syscall on a positive pid (never a group or -1).
    unsafe { kill(pid, sig) == 0 }
}

fn tool(name: &str) -> PathBuf {
    find_on_path(name)
        .or_else(|| {
            ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
                .iter()
                .map(|d| Path::new(d).join(name))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| panic!("{name} not found"))
}

fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// The gate of every PID 1 test: `true` when root and the tools are there. Otherwise prints
/// `skipping: <what> missing` and returns `false`, or panics when `HAKIM_E2E=1`.
pub fn init_ready() -> bool {
    static MISSING: OnceLock<Vec<String>> = OnceLock::new();
    let missing = MISSING.get_or_init(|| {
        let mut missing: Vec<String> = ["unshare", "chroot", "busybox", "mknod", "rustc"]
            .iter()
            .filter(|t| {
                find_on_path(t).is_none()
                    && !["/usr/sbin", "/sbin"]
                        .iter()
                        .any(|d| Path::new(d).join(t).is_file())
            })
            .map(|t| t.to_string())
            .collect();
        if !is_root() {
            missing.push("root (PID namespaces, chroot, mknod)".into());
        }
        missing
    });
    crate::gate(missing)
}

pub use crate::serial;

/// Runs `ci/build-init.sh TARGET` (default target when `None`) and returns the binary it
/// printed. `env`: extra environment (e.g. `CARGO_TARGET_DIR`); `dir`: the checkout to build.
pub fn build_init(dir: &Path, target: Option<&str>, env: &[(&str, &Path)]) -> PathBuf {
    let mut cmd = Command::new(dir.join("ci/build-init.sh"));
    cmd.args(target).current_dir(dir);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = run_ok(&mut cmd);
    let printed = String::from_utf8_lossy(&out.stdout);
    let rel = printed
        .lines()
        .last()
        .unwrap_or_else(|| panic!("{} printed no path", show(&cmd)))
        .trim()
        .to_string();
    let bin = dir.join(rel);
    assert!(bin.is_file(), "build-init printed {}", bin.display());
    bin
}

/// The static `hakim-init`, built once per test process by `ci/build-init.sh`, or the binary
/// `HAKIM_INIT_STATIC_BIN` names (as for the LXC tests: another build, e.g. main's).
pub fn init_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| match std::env::var_os("HAKIM_INIT_STATIC_BIN") {
        Some(bin) => {
            // The harness's other static binaries still come from this checkout's toolchain.
            build_init(&workspace_root(), None, &[]);
            PathBuf::from(bin)
        }
        None => build_init(&workspace_root(), None, &[]),
    })
}

/// Compiles one std-only source file with `rustc` into a static binary for `target`
/// (`linker`: a cross linker when the target is foreign), installed at `out`.
pub fn rustc_static(source: &Path, target: &str, linker: Option<&str>, out: &Path) {
    let root = workspace_root();
    let tmp = out.with_extension(format!("tmp{}", std::process::id()));
    let crate_name = source
        .file_stem()
        .map(|s| s.to_string_lossy().replace('-', "_"))
        .unwrap_or_else(|| "probe".into());
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let mut cmd = Command::new(rustc);
    cmd.current_dir(&root)
        .args([
            "--edition",
            "2021",
            "--crate-name",
            &crate_name,
            "--target",
            target,
        ])
        .args(["-C", "opt-level=1", "-C", "strip=symbols"]);
    if let Some(l) = linker {
        cmd.arg("-C").arg(format!("linker={l}"));
    }
    run_ok(cmd.arg("-o").arg(&tmp).arg(source));
    fs::rename(&tmp, out).unwrap_or_else(|e| panic!("install {}: {e}", out.display()));
}

/// A static (musl) `fake-coder`, compiled once per test process with `rustc` straight from
/// `tests/src/bin/fake-coder.rs` (std only), so it runs in a root with no libc.
pub fn fake_coder_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        // build-init.sh also installs the musl target (rustup) if it is missing.
        init_bin();
        let root = workspace_root();
        let dir = root.join("target/init-e2e");
        fs::create_dir_all(&dir).expect("create target/init-e2e");
        let bin = dir.join("fake-coder");
        rustc_static(
            &root.join("tests/src/bin/fake-coder.rs"),
            "x86_64-unknown-linux-musl",
            None,
            &bin,
        );
        bin
    })
}

/// A busybox root for one PID 1 run.
pub struct Rootfs {
    dir: tempfile::TempDir,
}

impl Rootfs {
    /// busybox (every applet in `/bin`), `/etc/passwd` with root only, `/etc/group` with root
    /// and `docker` (gid 999), `/etc/skel/.profile`, `/dev/{null,zero,random,urandom}`, a
    /// sticky `/tmp`, `/etc/hakim/services/` and `hakim-init` at [`INIT_PATH`].
    pub fn new() -> Rootfs {
        let init = init_bin();
        let keep = std::env::var("HAKIM_E2E_KEEP").as_deref() == Ok("1");
        let dir = tempfile::Builder::new()
            .prefix("hakim-pid1-")
            .disable_cleanup(keep)
            .tempdir()
            .expect("create temp root");
        let r = Rootfs { dir };
        for d in [
            "bin",
            "etc/skel",
            "etc/hakim/services",
            "usr/local/sbin",
            "usr/local/bin",
            "dev",
            "tmp",
            "root",
            "home",
            "var/lib",
        ] {
            fs::create_dir_all(r.path(d)).expect("mkdir in root");
        }
        fs::set_permissions(r.path("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
        fs::copy(tool("busybox"), r.path("bin/busybox")).expect("copy busybox");
        let list = run_ok(Command::new(tool("busybox")).arg("--list"));
        for applet in String::from_utf8_lossy(&list.stdout).lines() {
            let applet = applet.trim();
            if applet.is_empty() || applet == "busybox" || applet.contains('/') {
                continue;
            }
            symlink("busybox", r.path("bin").join(applet)).expect("symlink applet");
        }
        r.write("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n");
        r.write("etc/group", "root:x:0:\ndocker:x:999:\n");
        r.write("etc/skel/.profile", "# hakim test skel\n");
        for (name, major, minor) in [
            ("null", 1, 3),
            ("zero", 1, 5),
            ("random", 1, 8),
            ("urandom", 1, 9),
        ] {
            run_ok(
                Command::new(tool("mknod"))
                    .args(["-m", "666"])
                    .arg(r.path("dev").join(name))
                    .args(["c", &major.to_string(), &minor.to_string()]),
            );
        }
        fs::copy(init, r.path(INIT_PATH)).expect("copy hakim-init");
        fs::set_permissions(r.path(INIT_PATH), fs::Permissions::from_mode(0o755)).unwrap();
        // The root must work before anything is blamed on hakim-init.
        let probe = run_ok(
            Command::new(tool("chroot"))
                .arg(r.root())
                .args(["/bin/sh", "-c", "echo ok"]),
        );
        assert_eq!(
            String::from_utf8_lossy(&probe.stdout).trim(),
            "ok",
            "busybox does not run in the test root (is it statically linked?)"
        );
        r
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// `ROOT/rel` (`rel` may start with `/`).
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel.trim_start_matches('/'))
    }

    /// Writes a file (parents created), mode 0644.
    pub fn write(&self, rel: &str, text: &str) {
        let p = self.path(rel);
        fs::create_dir_all(p.parent().unwrap()).expect("mkdir parent");
        fs::write(&p, text).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
    }

    /// `/etc/hakim/services/<file>.toml`.
    pub fn service(&self, file: &str, toml: &str) {
        self.write(&format!("etc/hakim/services/{file}.toml"), toml);
    }

    /// Copies the static fake-coder to `rel` (mode 0755).
    pub fn install_fake_coder(&self, rel: &str) {
        let p = self.path(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::copy(fake_coder_bin(), &p).expect("copy fake-coder");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
    }

    pub fn read(&self, rel: &str) -> Option<String> {
        fs::read_to_string(self.path(rel)).ok()
    }

    /// Polls until `ROOT/rel` exists and `pred` holds for its content.
    pub fn wait_file(
        &self,
        rel: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Option<String> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(t) = self.read(rel) {
                if pred(&t) {
                    return Some(t);
                }
            }
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Default for Rootfs {
    fn default() -> Self {
        Rootfs::new()
    }
}

/// One line hakim-init (or a child writing to its console) printed.
#[derive(Debug, Clone)]
pub struct Line {
    /// Since [`Init::start`].
    pub at: Duration,
    pub stderr: bool,
    pub text: String,
}

/// A process of the test's PID namespace, seen from the host.
#[derive(Debug, Clone)]
pub struct NsProc {
    pub pid: i32,
    /// Its pid inside the namespace (last `NSpid` value).
    pub ns_pid: i32,
    /// Host pid of its parent.
    pub ppid: i32,
    pub state: char,
    pub name: String,
    pub cmdline: Vec<String>,
    pub sig_blk: u64,
    pub sig_ign: u64,
}

impl NsProc {
    pub fn cmd(&self) -> String {
        self.cmdline.join(" ")
    }
}

fn status_field<'a>(status: &'a str, name: &str) -> Option<&'a str> {
    let prefix = format!("{name}:");
    status
        .lines()
        .find(|l| l.starts_with(&prefix))
        .map(|l| l[prefix.len()..].trim())
}

/// Reads `/proc/<pid>` as an [`NsProc`] (None if it is gone).
pub fn proc_info(pid: i32) -> Option<NsProc> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let hex = |n: &str| {
        status_field(&status, n)
            .and_then(|v| u64::from_str_radix(v, 16).ok())
            .unwrap_or(u64::MAX)
    };
    let cmdline = fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    Some(NsProc {
        pid,
        ns_pid: status_field(&status, "NSpid")
            .and_then(|v| v.split_whitespace().last())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        ppid: status_field(&status, "PPid")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        state: status_field(&status, "State")
            .and_then(|v| v.chars().next())
            .unwrap_or('?'),
        name: status_field(&status, "Name").unwrap_or("").to_string(),
        cmdline,
        sig_blk: hex("SigBlk"),
        sig_ign: hex("SigIgn"),
    })
}

/// Raw `/proc/<pid>/environ`.
pub fn environ(pid: i32) -> Option<Vec<u8>> {
    fs::read(format!("/proc/{pid}/environ")).ok()
}

/// hakim-init running as PID 1 of its own PID and mount namespace.
pub struct Init {
    child: Child,
    pid1: i32,
    ns: PathBuf,
    start: Instant,
    lines: Arc<Mutex<Vec<Line>>>,
    readers: Vec<JoinHandle<()>>,
    status: Option<ExitStatus>,
}

impl Init {
    /// Daemon mode (`command` None) or command mode (`-- command...`), with exactly `env`.
    /// Returns once PID 1 has exec'd hakim-init and blocked its signals (from then on a signal
    /// sent from outside is queued, not dropped).
    ///
    /// PID 1 starts with default dispositions and an empty signal mask, as under LXC (a plain
    /// `Command` from this multi-threaded glibc test process would go through `posix_spawn`,
    /// which leaves glibc's internal signals 32 and 33 ignored across exec).
    pub fn start(root: &Rootfs, env: &[(&str, &str)], command: Option<&[&str]>) -> Init {
        Init::start_ignoring(root, env, command, &[])
    }

    /// Like [`Init::start`], but PID 1 inherits SIG_IGN for the signals in `ignored` (what a
    /// careless container runtime may hand over).
    pub fn start_ignoring(
        root: &Rootfs,
        env: &[(&str, &str)],
        command: Option<&[&str]>,
        ignored: &[i32],
    ) -> Init {
        Init::start_in(root.root(), env, command, ignored)
    }

    /// Like [`Init::start_ignoring`], in any root holding hakim-init at [`INIT_PATH`].
    pub fn start_in(
        root: &Path,
        env: &[(&str, &str)],
        command: Option<&[&str]>,
        ignored: &[i32],
    ) -> Init {
        let mut cmd = Command::new(tool("unshare"));
        cmd.args(["--pid", "--fork", "--mount", "--mount-proc", "--kill-child"])
            .arg(tool("chroot"))
            .arg(root)
            .arg(INIT_PATH);
        if let Some(c) = command {
            cmd.arg("--").args(c);
        }
        let ignored = ignored.to_vec();
        // SAFETY: only raw syscalls between fork and exec.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                reset_signals(&ignored);
                Ok(())
            });
        }
        cmd.env_clear()
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let start = Instant::now();
        let mut child = cmd.spawn().expect("spawn unshare");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let mut readers = Vec::new();
        let out: Box<dyn Read + Send> = Box::new(child.stdout.take().unwrap());
        let err: Box<dyn Read + Send> = Box::new(child.stderr.take().unwrap());
        for (stream, is_err) in [(out, false), (err, true)] {
            let lines = lines.clone();
            readers.push(std::thread::spawn(move || {
                let mut r = BufReader::new(stream);
                let mut buf = Vec::new();
                loop {
                    buf.clear();
                    match r.read_until(b'\n', &mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {
                            let text = String::from_utf8_lossy(&buf)
                                .trim_end_matches('\n')
                                .to_string();
                            lines.lock().unwrap().push(Line {
                                at: start.elapsed(),
                                stderr: is_err,
                                text,
                            });
                        }
                    }
                }
            }));
        }
        let unshare_pid = child.id() as i32;
        let mut init = Init {
            child,
            pid1: 0,
            ns: PathBuf::new(),
            start,
            lines,
            readers,
            status: None,
        };
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let kids =
                fs::read_to_string(format!("/proc/{unshare_pid}/task/{unshare_pid}/children"))
                    .unwrap_or_default();
            if let Some(p) = kids.split_whitespace().next().and_then(|p| p.parse().ok()) {
                if let Some(info) = proc_info(p) {
                    if info.name == "hakim-init" && info.sig_blk != 0 {
                        init.pid1 = p;
                        init.ns = fs::read_link(format!("/proc/{p}/ns/pid")).unwrap_or_default();
                        break;
                    }
                }
            }
            if let Ok(Some(st)) = init.child.try_wait() {
                // Already over (a command that could not start, say): `wait` reports it.
                init.status = Some(st);
                break;
            }
            assert!(
                Instant::now() < end,
                "hakim-init did not come up as PID 1 within 10 s\n{}",
                init.transcript()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        init
    }

    /// Host pid of the namespace's PID 1 (hakim-init); panics if it ended before it was seen.
    pub fn pid1(&self) -> i32 {
        assert!(self.pid1 > 0, "PID 1 ended early\n{}", self.transcript());
        self.pid1
    }

    /// Since [`Init::start`], on the same clock as [`Line::at`].
    pub fn now(&self) -> Duration {
        self.start.elapsed()
    }

    pub fn signal(&self, sig: i32) -> bool {
        self.status.is_none() && self.pid1 > 0 && send_signal(self.pid1, sig)
    }

    /// Every process of the namespace (PID 1 included), from the host's `/proc`.
    pub fn procs(&self) -> Vec<NsProc> {
        let mut out = Vec::new();
        let Ok(rd) = fs::read_dir("/proc") else {
            return out;
        };
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if fs::read_link(format!("/proc/{pid}/ns/pid")).ok().as_ref() != Some(&self.ns) {
                continue;
            }
            if let Some(p) = proc_info(pid) {
                out.push(p);
            }
        }
        out.sort_by_key(|p| p.ns_pid);
        out
    }

    /// The first namespace process whose command line satisfies `pred`, waiting for it.
    pub fn wait_proc(&self, timeout: Duration, pred: impl Fn(&NsProc) -> bool) -> NsProc {
        let end = Instant::now() + timeout;
        loop {
            if let Some(p) = self.procs().into_iter().find(|p| pred(p)) {
                return p;
            }
            assert!(
                Instant::now() < end,
                "no such process within {timeout:?}; processes: {:#?}\n{}",
                self.procs(),
                self.transcript()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn lines(&self) -> Vec<Line> {
        self.lines.lock().unwrap().clone()
    }

    pub fn find_line(&self, pred: impl Fn(&str) -> bool) -> Option<Line> {
        self.lines().into_iter().find(|l| pred(&l.text))
    }

    /// Waits for a line containing `needle`.
    pub fn wait_line(&self, needle: &str, timeout: Duration) -> Line {
        self.wait_line_where(timeout, |t| t.contains(needle))
            .unwrap_or_else(|| {
                panic!(
                    "no line containing {needle:?} within {timeout:?}\n{}",
                    self.transcript()
                )
            })
    }

    pub fn wait_line_where(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<Line> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(l) = self.find_line(&pred) {
                return Some(l);
            }
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the whole namespace to end; `None` on timeout. The output readers are joined
    /// too, so [`Init::lines`] is complete afterwards.
    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.status.is_none() {
            let end = Instant::now() + timeout;
            loop {
                if let Ok(Some(st)) = self.child.try_wait() {
                    self.status = Some(st);
                    break;
                }
                if Instant::now() >= end {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        self.status
    }

    /// Like [`Init::wait`], panicking with the transcript on timeout.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        match self.wait(timeout) {
            Some(s) => s,
            None => panic!(
                "hakim-init still running after {timeout:?}; processes: {:#?}\n{}",
                self.procs(),
                self.transcript()
            ),
        }
    }

    /// Everything printed so far, one `+secs [out|err] text` line each (for failure messages).
    pub fn transcript(&self) -> String {
        let mut s = String::from("--- hakim-init transcript\n");
        for l in self.lines() {
            s.push_str(&format!(
                "{:>8.3} {} {}\n",
                l.at.as_secs_f64(),
                if l.stderr { "err" } else { "out" },
                l.text
            ));
        }
        s
    }
}

impl Drop for Init {
    fn drop(&mut self) {
        if self.status.is_none() {
            if let Ok(None) = self.child.try_wait() {
                // Killing PID 1 ends the namespace; unshare then exits on its own.
                if self.pid1 > 0 {
                    send_signal(self.pid1, 9);
                }
                if self.wait(Duration::from_secs(5)).is_none() {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                }
            }
        }
    }
}

/// What the server answers to `GET /bin/coder-linux-amd64`.
#[derive(Debug, Clone)]
pub enum Reply {
    /// An empty response with this status.
    Status(u16),
    /// 200 with this body and content type.
    Body(Vec<u8>, &'static str),
}

/// One request the server saw.
#[derive(Debug, Clone)]
pub struct Hit {
    pub at: Instant,
    pub path: String,
}

/// An HTTP/1.1 server on 127.0.0.1 (random port). Requests for `/bin/coder-linux-amd64` get the
/// scripted replies in order, then `then` forever; any other path gets 404. Every request is
/// recorded.
/// Extra paths the server answers, with their bodies.
type Files = Mutex<Vec<(String, Vec<u8>)>>;

pub struct Server {
    port: u16,
    files: Arc<Files>,
    hits: Arc<Mutex<Vec<Hit>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

pub const BINARY_PATH: &str = "/bin/coder-linux-amd64";

impl Server {
    pub fn start(script: Vec<Reply>, then: Reply) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let hits = Arc::new(Mutex::new(Vec::new()));
        let files = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (h, s, f) = (hits.clone(), stop.clone(), files.clone());
        let thread = std::thread::spawn(move || {
            let mut script: VecDeque<Reply> = script.into();
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let _ = serve_one(stream, &mut script, &then, &h, &f);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Server {
            port,
            files,
            hits,
            stop,
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:PORT` (no trailing slash).
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }

    /// Serves `body` (200, `application/octet-stream`) at `path` from now on.
    pub fn add_file(&self, path: &str, body: Vec<u8>) {
        self.files.lock().unwrap().push((path.to_string(), body));
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve_one(
    mut stream: TcpStream,
    script: &mut VecDeque<Reply>,
    then: &Reply,
    hits: &Mutex<Vec<Hit>>,
    files: &Files,
) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 64 * 1024 {
        if stream.read(&mut byte)? == 0 {
            break;
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head);
    let path = text
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("")
        .to_string();
    hits.lock().unwrap().push(Hit {
        at: Instant::now(),
        path: path.clone(),
    });
    let file = files
        .lock()
        .unwrap()
        .iter()
        .find(|(p, _)| *p == path)
        .map(|(_, b)| b.clone());
    let reply = if path == BINARY_PATH {
        script.pop_front().unwrap_or_else(|| then.clone())
    } else if let Some(body) = file {
        Reply::Body(body, "application/octet-stream")
    } else {
        Reply::Status(404)
    };
    let (status, body, ctype): (u16, &[u8], &str) = match &reply {
        Reply::Status(s) => (*s, b"", "text/plain"),
        Reply::Body(b, t) => (200, b, t),
    };
    write!(
        stream,
        "HTTP/1.1 {status} {}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        match status {
            200 => "OK",
            404 => "Not Found",
            500 => "Internal Server Error",
            _ => "Status",
        },
        body.len()
    )?;
    stream.write_all(body)?;
    stream.flush()
}

//! Harness for running `hakim-init` as PID 1 of real LXC containers (see
//! `tests/tests/init_lxc.rs`).
//!
//! * [`binaries`]: the static `hakim-init` (`ci/build-init.sh`) and a static (musl) build of
//!   `fake-coder`, plus the host's static busybox — a three-binary root file system.
//! * [`AgentServer`]: a tiny HTTP server that serves the fake-coder bytes at
//!   `/bin/coder-linux-amd64`, listening on 127.0.0.1 either in the host's network namespace
//!   or — for containers with their own network namespace — in the container's (the listening
//!   socket is created by a thread that joined that namespace with `setns`). Nothing ever
//!   listens on, or connects to, anything but 127.0.0.1.
//! * [`Container`]: one LXC container under its own `lxc.lxcpath` in a temporary directory;
//!   dropping it kills the container (`lxc-stop -k`), unmounts what the test mounted, removes
//!   LXC's leftover cgroups for its name and deletes the directory (kept with
//!   `HAKIM_E2E_KEEP=1`). When dropped during a panic it prints the console log and the
//!   interesting part of `lxc.log`.

use std::collections::BTreeMap;
use std::ffi::c_int;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::{find_on_path, show, workspace_root};

/// Tools the LXC tests run.
pub const TOOLS: &[&str] = &[
    "lxc-start",
    "lxc-stop",
    "lxc-info",
    "busybox",
    "mkfs.ext4",
    "mount",
    "umount",
    "truncate",
    "cargo",
    "rustc",
    "rustup",
];

/// Where the agent writes its JSON record, inside the container.
pub const RECORD: &str = "/tmp/agent.json";

/// The gate every LXC test starts with: root, the tools, and a static busybox. Prints
/// `skipping: … missing` and returns `false`, or panics with `HAKIM_E2E=1`.
pub fn ready() -> bool {
    static MISSING: OnceLock<Vec<String>> = OnceLock::new();
    let missing =
        MISSING.get_or_init(|| crate::missing_tools_or_root(TOOLS, "LXC containers need uid 0"));
    crate::gate(missing)
}

pub use crate::serial;

/// `true` for an ELF file with no `PT_INTERP` program header (static or static-pie).
pub fn is_static_elf(path: &Path) -> bool {
    let Ok(bytes) = fs::read(path) else {
        return false;
    };
    let u16_at = |o: usize| {
        bytes
            .get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |o: usize| {
        bytes
            .get(o..o + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
    };
    let u64_at = |o: usize| {
        bytes
            .get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
    };
    // 64-bit little-endian only (x86_64 / aarch64).
    if !bytes.starts_with(b"\x7fELF\x02\x01") {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    (0..phnum as usize).all(|i| {
        let off = phoff as usize + i * phentsize as usize;
        u32_at(off).is_some_and(|t| t != 3) // PT_INTERP
    })
}

/// The binaries a container root file system is made of.
#[derive(Debug)]
pub struct Binaries {
    /// Static `hakim-init` (`$HAKIM_INIT_STATIC_BIN`, else built by `ci/build-init.sh`).
    pub init: PathBuf,
    /// Static `fake-coder` (`$FAKE_CODER_STATIC_BIN`, else compiled for x86_64 musl).
    pub fake_coder: PathBuf,
    /// The host's static busybox.
    pub busybox: PathBuf,
}

impl Binaries {
    pub fn fake_coder_bytes(&self) -> Arc<Vec<u8>> {
        Arc::new(fs::read(&self.fake_coder).expect("read fake-coder"))
    }
}

/// Builds (once per process) or finds the static binaries; panics when one cannot be had.
pub fn binaries() -> &'static Binaries {
    static BINS: OnceLock<Result<Binaries, String>> = OnceLock::new();
    match BINS.get_or_init(build_binaries) {
        Ok(b) => b,
        Err(e) => panic!("{e}"),
    }
}

fn build_binaries() -> Result<Binaries, String> {
    let root = workspace_root();
    let started = Instant::now();
    let init = match std::env::var_os("HAKIM_INIT_STATIC_BIN") {
        Some(p) => PathBuf::from(p),
        None => {
            let out = Command::new("bash")
                .arg(root.join("ci/build-init.sh"))
                .current_dir(&root)
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("cannot run ci/build-init.sh: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "ci/build-init.sh failed ({}):\n{}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            let stdout = String::from_utf8_lossy(&out.stdout);
            let rel = stdout.lines().last().unwrap_or("").trim().to_string();
            root.join(rel)
        }
    };
    let fake_coder = match std::env::var_os("FAKE_CODER_STATIC_BIN") {
        Some(p) => PathBuf::from(p),
        None => build_fake_coder(&root)?,
    };
    let busybox = find_on_path("busybox").ok_or("busybox not found")?;
    for (what, p) in [
        ("hakim-init", &init),
        ("fake-coder", &fake_coder),
        ("busybox", &busybox),
    ] {
        if !is_static_elf(p) {
            return Err(format!(
                "{what} at {} is not a static ELF executable",
                p.display()
            ));
        }
    }
    eprintln!(
        "lxc: static binaries ready after {:.1} s: {} {} {}",
        started.elapsed().as_secs_f64(),
        init.display(),
        fake_coder.display(),
        busybox.display()
    );
    Ok(Binaries {
        init,
        fake_coder,
        busybox,
    })
}

fn build_fake_coder(root: &Path) -> Result<PathBuf, String> {
    const TARGET: &str = "x86_64-unknown-linux-musl";
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l == TARGET)
        })
        .unwrap_or(false);
    if !installed {
        let status = Command::new("rustup")
            .args(["target", "add", TARGET])
            .status()
            .map_err(|e| format!("cannot run rustup: {e}"))?;
        if !status.success() {
            return Err(format!("rustup target add {TARGET} failed: {status}"));
        }
    }
    // fake-coder is one std-only file: compiling it with rustc directly takes half a second
    // and, unlike `cargo build -p hakim-e2e --target …`, does not rebuild this crate's
    // library (and its dependencies) for musl whenever the harness changes.
    let source = root.join("tests/src/bin/fake-coder.rs");
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let out_dir = target_dir.join("hakim-lxc-e2e");
    fs::create_dir_all(&out_dir).map_err(|e| format!("mkdir {}: {e}", out_dir.display()))?;
    let out = out_dir.join("fake-coder");
    let tmp = out_dir.join(format!("fake-coder.tmp-{}", std::process::id()));
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let mut cmd = Command::new(rustc);
    cmd.args([
        "--edition",
        "2021",
        "--crate-name",
        "fake_coder",
        "--target",
        TARGET,
    ])
    .args(["-C", "opt-level=1", "-o"])
    .arg(&tmp)
    .arg(&source)
    .stdin(Stdio::null());
    let result = cmd
        .output()
        .map_err(|e| format!("cannot run {}: {e}", show(&cmd)))?;
    if !result.status.success() {
        return Err(format!(
            "{} failed ({}):\n{}",
            show(&cmd),
            result.status,
            String::from_utf8_lossy(&result.stderr)
        ));
    }
    fs::rename(&tmp, &out).map_err(|e| format!("rename {}: {e}", tmp.display()))?;
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// HTTP server for the agent binary

const CLONE_NEWNET: c_int = 0x4000_0000;

extern "C" {
    fn setns(fd: c_int, nstype: c_int) -> c_int;
}

/// How the server answers `GET /bin/coder-linux-amd64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serve {
    /// The whole body.
    Whole,
    /// The headers (with the full `Content-Length`) and the first `n` bytes, then nothing:
    /// the connection stays open until the server is dropped (a stalled download).
    StallAfter(usize),
}

/// Serves `GET /bin/coder-linux-amd64` (the fake-coder bytes); anything else is a 404.
pub struct AgentServer {
    pub port: u16,
    downloads: Arc<AtomicUsize>,
    other: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl AgentServer {
    /// Listens on 127.0.0.1 (an ephemeral port) in the test's own network namespace.
    pub fn on_host(body: Arc<Vec<u8>>) -> AgentServer {
        Self::on_host_serving(body, Serve::Whole)
    }

    /// Like [`AgentServer::on_host`], answering downloads as `how` says.
    pub fn on_host_serving(body: Arc<Vec<u8>>, how: Serve) -> AgentServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener.local_addr().unwrap().port();
        Self::serve(listener, port, body, how)
    }

    /// Listens on 127.0.0.1:`port` inside the network namespace of process `pid` (a
    /// container's init). Only the server thread joins that namespace.
    pub fn in_netns(pid: u32, port: u16, body: Arc<Vec<u8>>) -> Result<AgentServer, String> {
        let ns = format!("/proc/{pid}/ns/net");
        let (tx, rx) = std::sync::mpsc::channel();
        let downloads = Arc::new(AtomicUsize::new(0));
        let other = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (d, o, s) = (downloads.clone(), other.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let listener = fs::File::open(&ns)
                .map_err(|e| format!("open {ns}: {e}"))
                .and_then(|f| {
                    // SAFETY: plain syscall on a valid descriptor; it changes this thread's
                    // network namespace only.
                    if unsafe { setns(f.as_raw_fd(), CLONE_NEWNET) } != 0 {
                        return Err(format!("setns({ns}): {}", std::io::Error::last_os_error()));
                    }
                    TcpListener::bind(("127.0.0.1", port))
                        .map_err(|e| format!("bind 127.0.0.1:{port} in {ns}: {e}"))
                });
            match listener {
                Ok(l) => {
                    let _ = tx.send(Ok(()));
                    accept_loop(l, body, Serve::Whole, d, o, s);
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            }
        });
        rx.recv()
            .map_err(|_| "server thread died".to_string())
            .and_then(|r| r)?;
        Ok(AgentServer {
            port,
            downloads,
            other,
            stop,
            thread: Some(thread),
        })
    }

    fn serve(listener: TcpListener, port: u16, body: Arc<Vec<u8>>, how: Serve) -> AgentServer {
        let downloads = Arc::new(AtomicUsize::new(0));
        let other = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (d, o, s) = (downloads.clone(), other.clone(), stop.clone());
        let thread = std::thread::spawn(move || accept_loop(listener, body, how, d, o, s));
        AgentServer {
            port,
            downloads,
            other,
            stop,
            thread: Some(thread),
        }
    }

    /// The access URL, without a trailing slash.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Requests for the agent binary so far (answered as the [`Serve`] mode says).
    pub fn downloads(&self) -> usize {
        self.downloads.load(Ordering::SeqCst)
    }

    /// Request lines that were not the agent binary.
    pub fn other_requests(&self) -> Vec<String> {
        self.other.lock().unwrap().clone()
    }
}

impl Drop for AgentServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(
    listener: TcpListener,
    body: Arc<Vec<u8>>,
    how: Serve,
    downloads: Arc<AtomicUsize>,
    other: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
) {
    listener
        .set_nonblocking(true)
        .expect("nonblocking listener");
    // Stalled connections stay open until the server stops.
    let mut held = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                if let Some(line) = handle(stream, &body, how, &mut held) {
                    if line.starts_with("GET /bin/coder-linux-amd64 ") {
                        downloads.fetch_add(1, Ordering::SeqCst);
                    } else {
                        other.lock().unwrap().push(line);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Answers one request; returns its request line.
fn handle(
    mut stream: TcpStream,
    body: &[u8],
    how: Serve,
    held: &mut Vec<TcpStream>,
) -> Option<String> {
    stream.set_nonblocking(false).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 65536 {
        let n = stream.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&head);
    let line = text.lines().next().unwrap_or("").to_string();
    let mut parts = line.split_whitespace();
    let ok = parts.next() == Some("GET") && parts.next() == Some("/bin/coder-linux-amd64");
    let result = if ok {
        stream
            .write_all(
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                )
                .as_bytes(),
            )
            .and_then(|_| match how {
                Serve::Whole => stream.write_all(body),
                Serve::StallAfter(n) => stream.write_all(&body[..n.min(body.len())]),
            })
    } else {
        stream
            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    };
    let _ = stream.flush();
    if ok && matches!(how, Serve::StallAfter(_)) {
        if let Ok(s) = stream.try_clone() {
            held.push(s);
        }
    }
    result.ok().map(|_| line)
}

// ---------------------------------------------------------------------------------------
// Root file system

/// What goes into a test root file system besides busybox and hakim-init.
#[derive(Debug, Clone, Default)]
pub struct RootfsOptions {
    /// Add `/etc/shadow` and `/etc/gshadow` (Debian-like) instead of a busybox-like /etc.
    pub shadow: bool,
}

/// `busybox` + applet symlinks in `/bin`, `hakim-init` at `/usr/local/sbin/hakim-init` and
/// `/sbin/init` → it, `/etc/passwd` (root), `/etc/group` (root, docker 999), `/etc/skel/.profile`.
pub fn build_rootfs(root: &Path, bins: &Binaries, opts: &RootfsOptions) {
    for (dir, mode) in [
        ("", 0o755),
        ("bin", 0o755),
        ("sbin", 0o755),
        ("dev", 0o755),
        ("proc", 0o555),
        ("sys", 0o555),
        ("etc", 0o755),
        ("etc/skel", 0o755),
        ("home", 0o755),
        ("root", 0o700),
        ("tmp", 0o1777),
        ("usr", 0o755),
        ("usr/local", 0o755),
        ("usr/local/sbin", 0o755),
        ("var", 0o755),
        ("var/lib", 0o755),
    ] {
        let p = root.join(dir);
        fs::create_dir_all(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
    }
    copy_exec(&bins.busybox, &root.join("bin/busybox"));
    let list = Command::new(&bins.busybox)
        .arg("--list")
        .output()
        .expect("busybox --list");
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let applet = applet.trim();
        if applet.is_empty() || applet == "busybox" || applet.contains('/') {
            continue;
        }
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    copy_exec(&bins.init, &root.join("usr/local/sbin/hakim-init"));
    std::os::unix::fs::symlink("/usr/local/sbin/hakim-init", root.join("sbin/init")).unwrap();
    let write = |rel: &str, text: &str, mode: u32| {
        let p = root.join(rel);
        fs::write(&p, text).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
    };
    if opts.shadow {
        write("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n", 0o644);
        write(
            "etc/group",
            "root:x:0:\nshadow:x:42:\ndocker:x:999:\n",
            0o644,
        );
        write("etc/shadow", "root:*:20000:0:99999:7:::\n", 0o640);
        write("etc/gshadow", "root:*::\nshadow:*::\ndocker:!::\n", 0o640);
        for f in ["etc/shadow", "etc/gshadow"] {
            std::os::unix::fs::chown(root.join(f), Some(0), Some(42)).unwrap();
        }
    } else {
        write("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n", 0o644);
        write("etc/group", "root:x:0:\ndocker:x:999:\n", 0o644);
    }
    write(
        "etc/skel/.profile",
        "# hakim test skel\nexport EDITOR=vi\n",
        0o644,
    );
}

fn copy_exec(from: &Path, to: &Path) {
    fs::copy(from, to)
        .unwrap_or_else(|e| panic!("copy {} -> {}: {e}", from.display(), to.display()));
    fs::set_permissions(to, fs::Permissions::from_mode(0o755)).unwrap();
}

/// Shifts every owner under `root` (itself included) by `offset`, as a root file system for an
/// idmapped container must be; modes are restored afterwards (chown clears setuid/setgid).
pub fn shift_ids(root: &Path, offset: u32) {
    fn walk(p: &Path, offset: u32) {
        let meta = fs::symlink_metadata(p).unwrap();
        std::os::unix::fs::lchown(p, Some(meta.uid() + offset), Some(meta.gid() + offset))
            .unwrap_or_else(|e| panic!("lchown {}: {e}", p.display()));
        if !meta.file_type().is_symlink() {
            fs::set_permissions(p, fs::Permissions::from_mode(meta.mode() & 0o7777)).unwrap();
        }
        if meta.is_dir() {
            for e in fs::read_dir(p).unwrap() {
                walk(&e.unwrap().path(), offset);
            }
        }
    }
    walk(root, offset);
}

/// Makes sure `root:<start>:<count>` is covered in /etc/subuid and /etc/subgid; appends the
/// line where it is not. Returns what was appended.
pub fn ensure_subids(start: u64, count: u64) -> Vec<String> {
    let mut notes = Vec::new();
    for file in ["/etc/subuid", "/etc/subgid"] {
        let text = fs::read_to_string(file).unwrap_or_default();
        let covered = text.lines().any(|l| {
            let f: Vec<&str> = l.trim().split(':').collect();
            f.len() == 3
                && (f[0] == "root" || f[0] == "0")
                && matches!(
                    (f[1].parse::<u64>(), f[2].parse::<u64>()),
                    (Ok(s), Ok(c)) if s <= start && s + c >= start + count
                )
        });
        if !covered {
            let line = format!("root:{start}:{count}");
            let mut f = fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(file)
                .unwrap_or_else(|e| panic!("open {file}: {e}"));
            let sep = if text.is_empty() || text.ends_with('\n') {
                ""
            } else {
                "\n"
            };
            f.write_all(format!("{sep}{line}\n").as_bytes()).unwrap();
            notes.push(format!("appended {line} to {file}"));
        }
    }
    notes
}

// ---------------------------------------------------------------------------------------
// Containers

/// The container's network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Net {
    /// `lxc.net.0.type = none`: the host's network namespace.
    Host,
    /// `lxc.net.0.type = empty` with `flags = up`: its own namespace with only loopback.
    Empty,
}

/// What goes into the container's config.
#[derive(Debug, Clone)]
pub struct Config {
    pub net: Net,
    /// `lxc.init.cmd`; `None` leaves LXC's default, `/sbin/init` (a symlink to hakim-init).
    pub init_cmd: Option<String>,
    /// `lxc.signal.halt`, e.g. `SIGTERM`.
    pub halt_signal: Option<String>,
    /// `lxc.idmap = u/g 0 <base> 65536`.
    pub idmap_base: Option<u32>,
    /// `lxc.environment` lines.
    pub env: Vec<(String, String)>,
    /// `lxc.init.cwd`.
    pub init_cwd: Option<String>,
    /// Further lines, written last (e.g. the `lxc.mount.entry` Proxmox adds).
    pub extra: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            net: Net::Host,
            init_cmd: Some("/usr/local/sbin/hakim-init".into()),
            halt_signal: None,
            idmap_base: None,
            env: Vec::new(),
            init_cwd: None,
            extra: Vec::new(),
        }
    }
}

/// Result of one `lxc-stop` run.
#[derive(Debug)]
pub struct Stopped {
    pub status: ExitStatus,
    pub elapsed: Duration,
    pub output: String,
}

/// One LXC container with its own lxcpath (a temporary directory).
pub struct Container {
    pub name: String,
    pub lxcpath: PathBuf,
    pub dir: PathBuf,
    pub rootfs: PathBuf,
    mounts: Vec<PathBuf>,
}

impl Container {
    /// Creates the directories (mode 0755, so an idmapped root can reach its rootfs). The
    /// name is unique per process and test: `hk<pid>-<test>`.
    pub fn new(test: &str) -> Container {
        let name = format!("hk{}-{test}", std::process::id());
        let lxcpath = tempfile::Builder::new()
            .prefix("hakim-lxc-")
            .tempdir()
            .expect("temp dir")
            .keep();
        let dir = lxcpath.join(&name);
        let rootfs = dir.join("rootfs");
        fs::create_dir_all(&rootfs).unwrap();
        for d in [&lxcpath, &dir] {
            fs::set_permissions(d, fs::Permissions::from_mode(0o755)).unwrap();
        }
        Container {
            name,
            lxcpath,
            dir,
            rootfs,
            mounts: Vec::new(),
        }
    }

    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }

    pub fn lxc_log(&self) -> PathBuf {
        self.dir.join("lxc.log")
    }

    /// Writes `DIR/config`.
    pub fn configure(&self, cfg: &Config) {
        let mut c = String::new();
        let mut line = |s: String| {
            c.push_str(&s);
            c.push('\n');
        };
        line(format!("lxc.uts.name = {}", self.name));
        line(format!("lxc.rootfs.path = dir:{}", self.rootfs.display()));
        if let Some(init) = &cfg.init_cmd {
            line(format!("lxc.init.cmd = {init}"));
        }
        match cfg.net {
            Net::Host => line("lxc.net.0.type = none".into()),
            Net::Empty => {
                line("lxc.net.0.type = empty".into());
                line("lxc.net.0.flags = up".into());
            }
        }
        line("lxc.apparmor.profile = unconfined".into());
        // A console pty whose output LXC copies into the log file: hakim-init's stderr.
        line(format!(
            "lxc.console.logfile = {}",
            self.console_log().display()
        ));
        line("lxc.tty.max = 0".into());
        line("lxc.pty.max = 16".into());
        line("lxc.mount.auto = proc:mixed sys:mixed cgroup:mixed".into());
        line("lxc.autodev = 1".into());
        line(format!("lxc.log.file = {}", self.lxc_log().display()));
        line("lxc.log.level = INFO".into());
        if let Some(sig) = &cfg.halt_signal {
            line(format!("lxc.signal.halt = {sig}"));
        }
        if let Some(base) = cfg.idmap_base {
            line(format!("lxc.idmap = u 0 {base} 65536"));
            line(format!("lxc.idmap = g 0 {base} 65536"));
        }
        for (k, v) in &cfg.env {
            assert!(!v.contains('\n'), "newline in env value");
            line(format!("lxc.environment = {k}={v}"));
        }
        if let Some(cwd) = &cfg.init_cwd {
            line(format!("lxc.init.cwd = {cwd}"));
        }
        for extra in &cfg.extra {
            assert!(!extra.contains('\n'), "newline in a config line");
            line(extra.clone());
        }
        fs::write(self.dir.join("config"), c).unwrap();
    }

    fn lxc(&self, tool: &str) -> Command {
        let mut cmd = Command::new(tool);
        cmd.arg("-P")
            .arg(&self.lxcpath)
            .arg("-n")
            .arg(&self.name)
            .stdin(Stdio::null());
        cmd
    }

    /// `lxc-start -d`. Its output goes to a file: the daemonized monitor could otherwise
    /// hold a pipe open for the container's whole life.
    pub fn start(&self) -> Result<(), String> {
        let out_path = self.dir.join("lxc-start.out");
        let out = fs::File::create(&out_path).unwrap();
        let mut cmd = self.lxc("lxc-start");
        cmd.arg("-d").stdout(out.try_clone().unwrap()).stderr(out);
        let status = cmd
            .status()
            .map_err(|e| format!("cannot run {}: {e}", show(&cmd)))?;
        if status.success() {
            return Ok(());
        }
        Err(format!(
            "{} failed ({status}):\n{}\n--- lxc.log errors/warnings\n{}",
            show(&cmd),
            fs::read_to_string(&out_path).unwrap_or_default(),
            self.lxc_log_excerpt(40)
        ))
    }

    /// `lxc-stop ARGS`, timed.
    pub fn stop(&self, args: &[&str]) -> Stopped {
        let mut cmd = self.lxc("lxc-stop");
        cmd.args(args);
        let started = Instant::now();
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", show(&cmd)));
        Stopped {
            status: out.status,
            elapsed: started.elapsed(),
            output: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    }

    /// `lxc-info -s`: RUNNING, STOPPED, …
    pub fn state(&self) -> String {
        let out = self.lxc("lxc-info").args(["-s", "-H"]).output();
        out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    }

    /// Host pid of the container's init, when running.
    pub fn init_pid(&self) -> Option<u32> {
        let out = self.lxc("lxc-info").args(["-p", "-H"]).output().ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    }

    pub fn console(&self) -> String {
        fs::read_to_string(self.console_log()).unwrap_or_default()
    }

    /// The console log from byte `from` on (one boot's worth, when `from` is the length
    /// before that boot).
    pub fn console_since(&self, from: usize) -> String {
        self.console().get(from..).unwrap_or("").to_string()
    }

    /// The last `n` WARN/ERROR lines of `lxc.log`.
    pub fn lxc_log_excerpt(&self, n: usize) -> String {
        let text = fs::read_to_string(self.lxc_log()).unwrap_or_default();
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.contains(" ERROR ") || l.contains(" WARN "))
            .collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Console log and lxc.log excerpt, for failure messages.
    pub fn diagnostics(&self) -> String {
        format!(
            "--- {} console.log\n{}\n--- lxc.log (WARN/ERROR, last 30)\n{}",
            self.name,
            self.console().trim_end(),
            self.lxc_log_excerpt(30)
        )
    }

    /// The agent's record file on the host.
    pub fn record_path(&self) -> PathBuf {
        self.rootfs.join(RECORD.trim_start_matches('/'))
    }

    /// Every JSON line of the agent record.
    pub fn records(&self) -> Vec<serde_json::Value> {
        fs::read_to_string(self.record_path())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Number of `start` events in the agent record.
    pub fn agent_starts(&self) -> usize {
        self.records()
            .iter()
            .filter(|r| r["event"] == "start")
            .count()
    }

    /// Polls `done` every 50 ms; returns how long it took, or panics with diagnostics.
    pub fn wait_for(&self, what: &str, timeout: Duration, mut done: impl FnMut() -> bool) -> f64 {
        let started = Instant::now();
        loop {
            if done() {
                return started.elapsed().as_secs_f64();
            }
            if started.elapsed() > timeout {
                panic!(
                    "{}: timed out after {:.0} s waiting for {what}; state {}\n{}",
                    self.name,
                    timeout.as_secs_f64(),
                    self.state(),
                    self.diagnostics()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `truncate -s SIZE img; mkfs.ext4 -q img; mount -o loop img TARGET` — a fresh volume as
    /// Proxmox hands it to a container (root-owned, with `lost+found`). Unmounted on drop.
    pub fn mount_fresh_volume(&mut self, target: &Path, size: &str) {
        self.mount_fresh_volume_owned(target, size, None);
    }

    /// [`Container::mount_fresh_volume`] whose root directory belongs to `root_owner`: Proxmox
    /// formats the volumes of an unprivileged container with `-E root_owner=100000:100000`, the
    /// container's root.
    pub fn mount_fresh_volume_owned(
        &mut self,
        target: &Path,
        size: &str,
        root_owner: Option<(u32, u32)>,
    ) {
        let img = self.dir.join(format!(
            "volume-{}.img",
            target.file_name().unwrap().to_string_lossy()
        ));
        crate::run_ok(Command::new("truncate").args(["-s", size]).arg(&img));
        let mut mkfs = Command::new("mkfs.ext4");
        mkfs.arg("-q");
        if let Some((uid, gid)) = root_owner {
            mkfs.args(["-E", &format!("root_owner={uid}:{gid}")]);
        }
        crate::run_ok(mkfs.arg(&img));
        fs::create_dir_all(target).unwrap();
        crate::run_ok(
            Command::new("mount")
                .args(["-o", "loop"])
                .arg(&img)
                .arg(target),
        );
        self.mounts.push(target.to_path_buf());
    }

    fn cleanup(&mut self) {
        if self.state() != "STOPPED" {
            let _ = self.lxc("lxc-stop").arg("-k").output();
        }
        let mut clean = true;
        for m in self.mounts.drain(..).rev() {
            let ok = Command::new("umount")
                .arg(&m)
                .status()
                .is_ok_and(|s| s.success())
                || Command::new("umount")
                    .arg("-l")
                    .arg(&m)
                    .status()
                    .is_ok_and(|s| s.success());
            if !ok {
                eprintln!("lxc: cannot unmount {}", m.display());
                clean = false;
            }
        }
        // LXC can leave its (empty) monitor and payload cgroups behind.
        if let Ok(rd) = fs::read_dir("/sys/fs/cgroup") {
            for hierarchy in rd.flatten() {
                for kind in ["lxc.monitor", "lxc.payload"] {
                    let cg = hierarchy.path().join(format!("{kind}.{}", self.name));
                    if cg.is_dir() {
                        rmdir_cgroup(&cg);
                    }
                }
            }
        }
        if std::env::var("HAKIM_E2E_KEEP").as_deref() == Ok("1") || !clean {
            eprintln!("lxc: keeping {}", self.lxcpath.display());
        } else if let Err(e) = fs::remove_dir_all(&self.lxcpath) {
            eprintln!("lxc: cannot remove {}: {e}", self.lxcpath.display());
        }
    }
}

fn rmdir_cgroup(dir: &Path) {
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                rmdir_cgroup(&e.path());
            }
        }
    }
    let _ = fs::remove_dir(dir);
}

impl Drop for Container {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.diagnostics());
        }
        self.cleanup();
    }
}

// ---------------------------------------------------------------------------------------
// What a booted workspace must show

pub const SIGINT: i32 = 2;
pub const SIGTERM: i32 = 15;
pub const SIGPWR: i32 = 30;
pub const SIGRTMIN_3: i32 = 37;
/// Where hakim-init installs the downloaded agent.
pub const AGENT_BIN: &str = "/var/lib/hakim/agent/coder";
/// How long a boot may take until the agent has recorded its start.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(30);
/// `lxc-stop -t`.
pub const STOP_TIMEOUT_S: u64 = 20;
/// A clean stop is far quicker than this (the fake agent exits at once on SIGTERM).
pub const STOP_EXPECTED_BELOW: Duration = Duration::from_secs(10);

/// What the agent must have seen when it started.
#[derive(Debug, Clone)]
pub struct AgentExpect {
    /// The access URL (compared without a trailing slash).
    pub url: String,
    pub token: String,
    /// Supplementary groups, any order.
    pub groups: Vec<i64>,
    /// Further variables the agent's environment must hold, with these values.
    pub env: Vec<(String, String)>,
}

impl Container {
    /// Starts the container and waits for the agent's `n`-th start record; returns seconds.
    pub fn boot(&self, n: usize) -> f64 {
        let t = Instant::now();
        if let Err(e) = self.start() {
            panic!("{e}\n{}", self.diagnostics());
        }
        self.wait_for(&format!("agent start #{n}"), BOOT_TIMEOUT, || {
            self.agent_starts() >= n
        });
        t.elapsed().as_secs_f64()
    }

    /// The `n`-th (1-based) start record of the agent.
    pub fn start_record(&self, n: usize) -> serde_json::Value {
        self.records()
            .into_iter()
            .filter(|r| r["event"] == "start")
            .nth(n - 1)
            .unwrap_or_else(|| panic!("no agent start #{n}\n{}", self.diagnostics()))
    }
}

/// The numbers of a JSON array.
pub fn ids(v: &serde_json::Value) -> Vec<i64> {
    v.as_array()
        .map(|a| a.iter().filter_map(serde_json::Value::as_i64).collect())
        .unwrap_or_default()
}

/// What the agent must see, whatever the container's kind: `coder agent` as a child of PID 1,
/// uid/gid 1000, the expected groups, cwd the project directory, no blocked signal, and its
/// environment.
pub fn check_agent_start(ct: &Container, rec: &serde_json::Value, expect: &AgentExpect) {
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
    let mut want = expect.groups.clone();
    want.sort_unstable();
    assert_eq!(groups, want, "supplementary groups\n{}", ctx());
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
        ("CODER_AGENT_TOKEN", expect.token.as_str()),
        ("FAKE_CODER_RECORD", RECORD),
    ]
    .into_iter()
    .chain(expect.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
    {
        assert_eq!(env[k], v, "agent env {k}\n{}", ctx());
    }
    let got_url = env["CODER_AGENT_URL"].as_str().unwrap_or("");
    assert_eq!(
        got_url.trim_end_matches('/'),
        expect.url.trim_end_matches('/'),
        "agent env CODER_AGENT_URL\n{}",
        ctx()
    );
    assert!(
        env["PATH"].as_str().is_some_and(|p| p.contains("/bin")),
        "agent env PATH\n{}",
        ctx()
    );
}

/// The signal hakim-init logged as the reason for stopping (`kind`: halt, reboot) in `console`.
pub fn stop_signal(console: &str, kind: &str) -> Option<i32> {
    console.lines().find_map(|l| {
        let rest = l.strip_prefix("hakim-init: signal ")?;
        let (n, tail) = rest.split_once(':')?;
        (tail.trim() == format!("stopping ({kind})"))
            .then(|| n.parse().ok())
            .flatten()
    })
}

/// `lxc-stop -r`, and everything a clean reboot implies: a new init, hakim-init logged SIGINT
/// as a reboot and rebooted (reboot(2) is permitted, also from a user namespace), the agent
/// that ran saw SIGTERM and exited 0, and the `n`-th agent started. `on_new_init` gets the new
/// init's pid before the agent is waited for (to serve the agent in the container's new
/// network namespace); its result is returned with the seconds from `lxc-stop -r` until the
/// agent was back.
pub fn reboot<T>(ct: &Container, n: usize, on_new_init: impl FnOnce(u32) -> T) -> (T, f64) {
    let old_init = ct.init_pid().expect("init pid");
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
    ct.wait_for("a new init after lxc-stop -r", BOOT_TIMEOUT, || {
        ct.state() == "RUNNING" && ct.init_pid().is_some_and(|p| p != old_init)
    });
    let new_init = ct.init_pid().expect("init pid");
    let kept = on_new_init(new_init);
    ct.wait_for(&format!("agent start #{n}"), BOOT_TIMEOUT, || {
        ct.agent_starts() >= n
    });
    let back = t.elapsed().as_secs_f64();
    let console = ct.console_since(console_before);
    assert_eq!(
        stop_signal(&console, "reboot"),
        Some(SIGINT),
        "hakim-init did not log SIGINT as a reboot\n{}",
        ct.diagnostics()
    );
    assert!(
        console.contains("hakim-init: rebooting")
            && !console.contains("reboot not permitted")
            && !console.contains("killing it"),
        "{}",
        ct.diagnostics()
    );
    let records = ct.records();
    let tail: Vec<String> = records[records.len().saturating_sub(4)..]
        .iter()
        .map(|r| match r["event"].as_str() {
            Some("signal") => format!("signal {}", r["signal"]),
            Some("exit") => format!("exit {}", r["code"]),
            Some(e) => e.to_string(),
            None => "?".into(),
        })
        .collect();
    assert_eq!(
        tail,
        ["start", "signal 15", "exit 0", "start"],
        "agent events around the reboot\n{}",
        ct.diagnostics()
    );
    println!(
        "{}: lxc-stop -r returned after {:.3} s; init {old_init} -> {new_init}; agent running \
         again {back:.3} s after lxc-stop -r",
        ct.name,
        stopped.elapsed.as_secs_f64(),
    );
    (kept, back)
}

/// `lxc-stop -t 20 --nokill`, and everything a clean halt implies: the container stopped by
/// itself, quickly, hakim-init logged one of the `allowed` halt signals and a clean exit
/// without killing the agent, and the last of `starts` agents saw SIGTERM and exited 0.
/// Returns the seconds `lxc-stop` took.
pub fn graceful_stop(ct: &Container, console_from: usize, allowed: &[i32], starts: usize) -> f64 {
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
    let after: Vec<&serde_json::Value> = records[last_start + 1..].iter().collect();
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

// ---------------------------------------------------------------------------------------
// Inspection

/// Host pids whose parent is `ppid`.
pub fn children_of(ppid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let parent = stat
            .rsplit_once(')')
            .and_then(|(_, r)| r.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if parent == Some(ppid) {
            out.push(pid);
        }
    }
    out
}

/// A `/proc/PID/status` line's values (`Uid`, `Gid`, `Groups`, …).
pub fn proc_status_field(pid: u32, name: &str) -> Option<Vec<String>> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let prefix = format!("{name}:");
    status.lines().find(|l| l.starts_with(&prefix)).map(|l| {
        l[prefix.len()..]
            .split_whitespace()
            .map(String::from)
            .collect()
    })
}

/// `/proc/PID/cmdline` with NULs as spaces.
pub fn cmdline(pid: u32) -> String {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            String::from_utf8_lossy(&b)
                .trim_end_matches('\0')
                .replace('\0', " ")
        })
        .unwrap_or_default()
}

/// Owner, mode, mtime, ctime and inode of `p` (a file that must not be touched).
pub fn stat_line(p: &Path) -> String {
    let m = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
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

/// Path (relative to `root`) → type, mode, owner, size, sha256, link target, mtime, ctime and
/// inode of everything under each of `tops`. Equal manifests mean nothing was written,
/// replaced, chowned or chmodded in between.
pub fn manifest(root: &Path, tops: &[&str]) -> BTreeMap<String, String> {
    fn walk(root: &Path, p: &Path, out: &mut BTreeMap<String, String>) {
        let Ok(m) = fs::symlink_metadata(p) else {
            return;
        };
        let rel = p.strip_prefix(root).unwrap().display().to_string();
        let ft = m.file_type();
        let extra = if ft.is_file() {
            let bytes = fs::read(p).unwrap_or_default();
            format!("sha256={}", hex::encode(Sha256::digest(&bytes)))
        } else if ft.is_symlink() {
            format!("-> {}", fs::read_link(p).unwrap().display())
        } else {
            String::new()
        };
        out.insert(
            rel,
            format!(
                "{} mode={:o} owner={}:{} size={} mtime={}.{:09} ctime={}.{:09} ino={} {extra}",
                if ft.is_dir() {
                    "dir"
                } else if ft.is_file() {
                    "file"
                } else if ft.is_symlink() {
                    "symlink"
                } else {
                    "other"
                },
                m.mode() & 0o7777,
                m.uid(),
                m.gid(),
                if ft.is_dir() { 0 } else { m.size() },
                m.mtime(),
                m.mtime_nsec(),
                m.ctime(),
                m.ctime_nsec(),
                m.ino(),
            ),
        );
        if ft.is_dir() {
            let mut entries: Vec<PathBuf> = fs::read_dir(p)
                .map(|rd| rd.flatten().map(|e| e.path()).collect())
                .unwrap_or_default();
            entries.sort();
            for e in entries {
                walk(root, &e, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    for top in tops {
        walk(root, &root.join(top), &mut out);
    }
    out
}

/// Human-readable differences between two manifests.
pub fn manifest_diff(a: &BTreeMap<String, String>, b: &BTreeMap<String, String>) -> Vec<String> {
    let mut out = Vec::new();
    for (k, v) in a {
        match b.get(k) {
            None => out.push(format!("removed {k}: {v}")),
            Some(w) if w != v => out.push(format!("changed {k}:\n    before {v}\n    after  {w}")),
            _ => {}
        }
    }
    for (k, w) in b {
        if !a.contains_key(k) {
            out.push(format!("added {k}: {w}"));
        }
    }
    out
}

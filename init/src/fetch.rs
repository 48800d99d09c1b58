//! Downloading, validating and installing the Coder agent binary.
//!
//! [`fetch_agent`] does one attempt: GET the binary (rustls with the system CA bundle, proxies
//! from the usual variables, timeouts), stream it to a temporary file next to the destination,
//! refuse anything that is not an ELF executable for this machine (an auth proxy once served
//! a login page as "the binary"), run `<tmp> --version` as the unprivileged user and require
//! "Coder" in its output, then rename it over the destination. Retrying is the caller's job,
//! spaced by [`AGENT_FETCH_BACKOFF`].
//!
//! The download blocks, so PID 1 does not call this itself: it re-executes its own binary as
//! `hakim-init __fetch-agent <binary_url> <dest> <uid> <gid>`, whose `main` hands the operands
//! to [`run_fetch_child`].

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use crate::agent_config::{AccessUrl, Scheme, UrlError};

/// The `argv[1]` that makes hakim-init run [`run_fetch_child`].
pub const FETCH_SUBCOMMAND: &str = "__fetch-agent";

/// Prefix of every line the fetch child prints.
const LOG_PREFIX: &str = "hakim-init: fetch: ";

use hakim_netenv::backoff::{random_u64, Backoff};
use hakim_netenv::ca::{self, CaError};
use hakim_netenv::text::printable;
pub use hakim_netenv::{no_proxy_matches, ProxyEnv};
/// Variables the fetch child reads from its own environment. The parent must pass these
/// through (and should pass nothing secret: the download needs no token).
pub const FETCH_ENV: &[&str] = &[
    "https_proxy",
    "HTTPS_PROXY",
    "http_proxy",
    "HTTP_PROXY",
    "all_proxy",
    "ALL_PROXY",
    "no_proxy",
    "NO_PROXY",
    "SSL_CERT_FILE",
];

/// How failed download attempts are spaced: 1 s doubling up to 30 s, each delay up to 20 %
/// shorter at random, so that many workspaces restarted together do not hit the server in
/// lockstep.
pub const AGENT_FETCH_BACKOFF: Backoff = Backoff {
    base: Duration::from_secs(1),
    cap: Duration::from_secs(30),
    factor: 2,
    jitter: 0.2,
};

/// PATH for `--version`; the check needs nothing from the caller's environment.
const VERSION_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The proxy for the agent URL (see [`ProxyEnv::pick`]).
pub fn proxy_for<'a>(proxy: &'a ProxyEnv, url: &AccessUrl) -> Option<(&'static str, &'a str)> {
    let https = matches!(url.scheme(), Scheme::Https);
    let port = url.port().unwrap_or(if https { 443 } else { 80 });
    proxy.pick(https, url.host(), port)
}

/// How [`fetch_agent`] downloads and checks.
#[derive(Clone)]
pub struct FetchOptions {
    /// Who runs `--version` (the agent's user, never root).
    pub uid: u32,
    pub gid: u32,
    /// TCP (and proxy) connection setup.
    pub connect_timeout: Duration,
    /// The whole exchange, body included.
    pub timeout: Duration,
    /// Longest wait for any single read: a stalled transfer fails long before `timeout`.
    pub read_timeout: Duration,
    /// `--version` is killed (with its process group) after this long.
    pub version_timeout: Duration,
    /// Larger bodies are refused (the real agent is ~200 MB).
    pub max_bytes: u64,
    pub proxy: ProxyEnv,
    /// The system's CA bundle (see [`hakim_netenv::ca::root_certs`]); `None` with no
    /// `extra_ca` means ureq's compiled-in roots.
    pub system_ca: Option<PathBuf>,
    /// `SSL_CERT_FILE`: trusted on top of the system's.
    pub extra_ca: Vec<PathBuf>,
}

impl FetchOptions {
    /// Defaults, with no proxy and the compiled-in CA roots: what tests want.
    pub fn new(uid: u32, gid: u32) -> FetchOptions {
        FetchOptions {
            uid,
            gid,
            connect_timeout: Duration::from_secs(10),
            timeout: Duration::from_secs(15 * 60),
            read_timeout: Duration::from_secs(60),
            version_timeout: Duration::from_secs(10),
            max_bytes: 1 << 30,
            proxy: ProxyEnv::default(),
            system_ca: None,
            extra_ca: Vec::new(),
        }
    }

    /// Defaults with proxies and CA bundles taken from this process's environment.
    pub fn from_env(uid: u32, gid: u32) -> FetchOptions {
        let lookup = |k: &str| std::env::var(k).ok();
        FetchOptions {
            proxy: ProxyEnv::from_lookup(lookup),
            system_ca: ca::system_bundle(),
            extra_ca: ca::ssl_cert_file(lookup).into_iter().collect(),
            ..FetchOptions::new(uid, gid)
        }
    }
}

/// A successful install.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchOutcome {
    /// Size of the installed binary.
    pub bytes: u64,
    /// The `--version` line that mentions Coder, cleaned of control characters.
    pub version: String,
}

/// Why a download did not produce an installed agent. URLs are shown (they hold no token);
/// proxy values are not (they may hold credentials).
#[derive(Debug)]
pub enum FetchError {
    InvalidUrl {
        url: String,
        reason: UrlError,
    },
    Proxy {
        var: &'static str,
        reason: &'static str,
    },
    CaBundle(CaError),
    /// Connection, TLS, timeout or protocol failure.
    Transport {
        url: String,
        message: String,
    },
    /// A non-2xx final status (after redirects).
    Status {
        url: String,
        status: u16,
        reason: Option<&'static str>,
    },
    TooLarge {
        url: String,
        limit: u64,
    },
    /// The body is not an ELF executable; `found` says what it looks like.
    NotElf {
        url: String,
        found: &'static str,
    },
    /// An ELF executable, but for another machine.
    WrongArch {
        url: String,
        found: String,
        expected: &'static str,
    },
    /// `--version` could not run, failed, timed out, or did not say "Coder".
    Version {
        reason: String,
    },
    Io {
        what: String,
        error: io::Error,
    },
}

impl fmt::Display for FetchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FetchError::InvalidUrl { url, reason } => {
                write!(f, "invalid agent binary URL {url}: {reason}")
            }
            FetchError::Proxy { var, reason } => write!(f, "proxy from {var} unusable: {reason}"),
            FetchError::CaBundle(e) => write!(f, "{e}"),
            FetchError::Transport { url, message } => write!(f, "GET {url}: {message}"),
            FetchError::Status {
                url,
                status,
                reason,
            } => {
                write!(f, "GET {url}: HTTP {status}")?;
                if let Some(reason) = reason {
                    write!(f, " {reason}")?;
                }
                Ok(())
            }
            FetchError::TooLarge { url, limit } => {
                write!(f, "GET {url}: body larger than {limit} bytes, refused")
            }
            FetchError::NotElf { url, found } => write!(
                f,
                "GET {url}: the server sent {found}, not the agent executable (a login page or proxy error?)"
            ),
            FetchError::WrongArch {
                url,
                found,
                expected,
            } => write!(
                f,
                "GET {url}: the executable is for {found}, this machine needs {expected}"
            ),
            FetchError::Version { reason } => write!(f, "agent binary check failed: {reason}"),
            FetchError::Io { what, error } => write!(f, "cannot {what}: {error}"),
        }
    }
}

impl std::error::Error for FetchError {}

/// Downloads `binary_url` and installs it at `dest` (mode 0755, atomically replacing any
/// previous file), after checking it is an ELF executable for this machine whose `--version`,
/// run as `opts.uid`/`opts.gid`, prints "Coder". `dest`'s directory is created (0755) if
/// missing; it and its parents must be traversable by that user. One attempt, no retries.
pub fn fetch_agent(
    binary_url: &str,
    dest: &Path,
    opts: &FetchOptions,
) -> Result<FetchOutcome, FetchError> {
    let parsed = AccessUrl::parse(binary_url).map_err(|reason| FetchError::InvalidUrl {
        url: printable(binary_url.trim(), 200),
        reason,
    })?;
    let url = binary_url.trim();
    let agent = build_agent(&parsed, opts)?;

    let file_name = dest.file_name().ok_or_else(|| FetchError::Io {
        what: format!("install to {}", dest.display()),
        error: io::Error::new(io::ErrorKind::InvalidInput, "destination has no file name"),
    })?;
    let dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(&dir)
        .map_err(|error| FetchError::Io {
            what: format!("create {}", dir.display()),
            error,
        })?;

    let response = agent.get(url).call().map_err(|e| FetchError::Transport {
        url: url.to_string(),
        message: e.to_string(),
    })?;
    let status = response.status();
    if !status.is_success() {
        return Err(FetchError::Status {
            url: url.to_string(),
            status: status.as_u16(),
            reason: status.canonical_reason(),
        });
    }

    let mut tmp_name = OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(
        ".part-{}-{:016x}",
        std::process::id(),
        random_u64()
    ));
    let tmp = TempFile {
        path: dir.join(tmp_name),
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp.path)
        .map_err(|error| FetchError::Io {
            what: format!("create {}", tmp.path.display()),
            error,
        })?;

    let bytes = download(response.into_body().into_reader(), &mut file, url, opts)?;

    let io_err = |what: &str, error| FetchError::Io {
        what: format!("{what} {}", tmp.path.display()),
        error,
    };
    file.sync_all().map_err(|e| io_err("sync", e))?;
    file.set_permissions(fs::Permissions::from_mode(0o755))
        .map_err(|e| io_err("chmod", e))?;
    // Close before exec: a file open for writing cannot be executed (ETXTBSY).
    drop(file);

    let version = check_version(&tmp.path, opts)?;

    fs::rename(&tmp.path, dest).map_err(|error| FetchError::Io {
        what: format!("rename {} to {}", tmp.path.display(), dest.display()),
        error,
    })?;
    tmp.keep();
    // Make the rename durable; losing it only costs a new download, so errors are ignored.
    if let Ok(d) = File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(FetchOutcome { bytes, version })
}

fn build_agent(url: &AccessUrl, opts: &FetchOptions) -> Result<ureq::Agent, FetchError> {
    let proxy = match proxy_for(&opts.proxy, url) {
        None => None,
        Some((var, value)) => {
            let scheme = value.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
            if scheme.as_deref().is_some_and(|s| s.starts_with("socks")) {
                return Err(FetchError::Proxy {
                    var,
                    reason: "SOCKS proxies are not supported, use an HTTP(S) proxy",
                });
            }
            Some(ureq::Proxy::new(value).map_err(|_| FetchError::Proxy {
                var,
                reason: "not a valid proxy URL",
            })?)
        }
    };
    let roots =
        ca::root_certs(opts.system_ca.as_deref(), &opts.extra_ca).map_err(FetchError::CaBundle)?;
    let tls = ureq::tls::TlsConfig::builder().root_certs(roots).build();
    let config = ureq::Agent::config_builder()
        // Statuses are reported by us, with the URL.
        .http_status_as_error(false)
        // An https download must not be redirected to plain http.
        .https_only(url.scheme() == Scheme::Https)
        .max_redirects(10)
        .timeout_connect(Some(opts.connect_timeout))
        .timeout_global(Some(opts.timeout))
        .timeout_per_read(Some(opts.read_timeout))
        .user_agent(concat!("hakim-init/", env!("CARGO_PKG_VERSION")))
        // Always set: ureq would otherwise read the proxy variables itself, with other rules.
        .proxy(proxy)
        .tls_config(tls)
        .build();
    Ok(config.into())
}

/// Copies the body into `file`, refusing non-ELF content as soon as the header is in.
fn download(
    mut body: impl Read,
    file: &mut File,
    url: &str,
    opts: &FetchOptions,
) -> Result<u64, FetchError> {
    let transport = |e: io::Error| FetchError::Transport {
        url: url.to_string(),
        message: e.to_string(),
    };
    let mut buf = vec![0u8; 64 * 1024];
    let mut head: Vec<u8> = Vec::with_capacity(ELF_HEADER_NEEDED);
    let mut checked = false;
    let mut total: u64 = 0;
    loop {
        let n = match body.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(transport(e)),
        };
        total += n as u64;
        if total > opts.max_bytes {
            return Err(FetchError::TooLarge {
                url: url.to_string(),
                limit: opts.max_bytes,
            });
        }
        if !checked {
            let want = ELF_HEADER_NEEDED - head.len();
            head.extend_from_slice(&buf[..n.min(want)]);
            if head.len() == ELF_HEADER_NEEDED {
                check_header(&head, url)?;
                checked = true;
            }
        }
        file.write_all(&buf[..n]).map_err(|error| FetchError::Io {
            what: "write the downloaded agent".to_string(),
            error,
        })?;
    }
    if !checked {
        check_header(&head, url)?;
    }
    Ok(total)
}

/// Enough of the ELF header to read `e_machine`.
const ELF_HEADER_NEEDED: usize = 20;

fn check_header(head: &[u8], url: &str) -> Result<(), FetchError> {
    let not_elf = |found| FetchError::NotElf {
        url: url.to_string(),
        found,
    };
    if !head.starts_with(b"\x7fELF") {
        return Err(not_elf(describe_non_elf(head)));
    }
    if head.len() < ELF_HEADER_NEEDED {
        return Err(not_elf("a truncated ELF header"));
    }
    let machine = u16::from_le_bytes([head[18], head[19]]);
    // Little-endian only: every architecture Coder publishes for Linux is.
    let found = match (head[5], machine) {
        (1, 62) => "amd64",
        (1, 183) => "arm64",
        (1, 40) => "armv7",
        _ => "another architecture",
    };
    match crate::agent_config::coder_arch() {
        Some(expected) if expected != found => Err(FetchError::WrongArch {
            url: url.to_string(),
            found: found.to_string(),
            expected,
        }),
        _ => Ok(()),
    }
}

fn describe_non_elf(head: &[u8]) -> &'static str {
    let text = head
        .strip_prefix(b"\xef\xbb\xbf".as_slice())
        .unwrap_or(head)
        .trim_ascii_start();
    if head.is_empty() {
        "an empty body"
    } else if text.starts_with(b"<") {
        "an HTML page"
    } else if text.starts_with(b"{") || text.starts_with(b"[") {
        "a JSON document"
    } else if head.starts_with(b"#!") {
        "a script"
    } else if head.starts_with(&[0x1f, 0x8b]) {
        "gzip data"
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        "zstd data"
    } else if head.iter().all(|b| b.is_ascii()) {
        "text"
    } else {
        "a file that is not an ELF executable"
    }
}

/// Removes the file on drop unless [`TempFile::keep`] was called.
struct TempFile {
    path: PathBuf,
}

impl TempFile {
    fn keep(self) {
        std::mem::forget(self);
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Runs `<path> --version` as the target user and returns the line that says "Coder".
fn check_version(path: &Path, opts: &FetchOptions) -> Result<String, FetchError> {
    let fail = |reason: String| FetchError::Version { reason };
    let mut child = spawn_version(path, opts).map_err(|e| fail(spawn_error(e, path, opts)))?;

    let stdout = read_capped(child.stdout.take(), 64 * 1024);
    let stderr = read_capped(child.stderr.take(), 4 * 1024);
    let deadline = Instant::now() + opts.version_timeout;
    let status: ExitStatus = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(e) => {
                return Err(fail(format!(
                    "waiting for {} --version: {e}",
                    path.display()
                )))
            }
        }
        if Instant::now() >= deadline {
            // Not reaped yet, so the pid (the group id) cannot have been reused.
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = child.kill();
            let _ = child.wait();
            return Err(fail(format!(
                "{} --version did not finish within {} s",
                path.display(),
                opts.version_timeout.as_secs_f32()
            )));
        }
        thread::sleep(Duration::from_millis(10));
    };
    // A grandchild could hold the pipes open forever; don't wait for it.
    let out = stdout
        .recv_timeout(Duration::from_secs(1))
        .unwrap_or_default();
    let err = stderr
        .recv_timeout(Duration::from_millis(200))
        .unwrap_or_default();
    let out = String::from_utf8_lossy(&out);
    if !status.success() {
        let err = String::from_utf8_lossy(&err);
        let detail = err
            .lines()
            .chain(out.lines())
            .find(|l| !l.trim().is_empty());
        return Err(fail(format!(
            "--version exited with {status}{}",
            detail
                .map(|l| format!(": {}", printable(l.trim(), 200)))
                .unwrap_or_default()
        )));
    }
    match out.lines().find(|l| l.contains("Coder")) {
        Some(line) => Ok(printable(line.trim(), 200)),
        None => {
            let first = out.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
            Err(fail(format!(
                "--version output does not mention Coder (first line: {:?})",
                printable(first.trim(), 120)
            )))
        }
    }
}

fn spawn_version(path: &Path, opts: &FetchOptions) -> io::Result<std::process::Child> {
    let mut attempt = 0u32;
    loop {
        let mut cmd = Command::new(path);
        cmd.arg("--version")
            // The fetch child's environment may hold the agent token; --version needs nothing.
            .env_clear()
            .env("PATH", VERSION_PATH)
            .env("HOME", "/")
            .env("LANG", "C.UTF-8")
            .current_dir("/")
            .stdin(crate::spawn::null_stdin()?)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Own process group, so a timeout kills anything it started too.
            .process_group(0)
            .gid(opts.gid)
            .uid(opts.uid);
        match cmd.spawn() {
            Ok(child) => return Ok(child),
            // Another thread's fork may briefly hold our (now closed) write descriptor.
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && attempt < 100 => {
                attempt += 1;
                thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e),
        }
    }
}

fn spawn_error(e: io::Error, path: &Path, opts: &FetchOptions) -> String {
    let hint = match e.raw_os_error() {
        Some(libc::EACCES) => {
            "; its directory and every parent must be traversable (0755) and not mounted noexec"
        }
        Some(libc::EPERM) => "; switching user needs root",
        Some(libc::ENOEXEC) => "; it is not a runnable executable for this machine",
        Some(libc::ENOENT) => "; a dynamically linked binary whose loader is missing?",
        _ => "",
    };
    format!(
        "cannot run {} --version as uid {} gid {}: {e}{hint}",
        path.display(),
        opts.uid,
        opts.gid
    )
}

/// Reads up to `cap` bytes from `pipe` on a thread (draining the rest so the child never
/// blocks on a full pipe), delivering them when the pipe closes.
fn read_capped<R: Read + Send + 'static>(pipe: Option<R>, cap: u64) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    match pipe {
        None => {
            let _ = tx.send(Vec::new());
        }
        Some(mut pipe) => {
            thread::spawn(move || {
                let mut buf = Vec::new();
                let _ = (&mut pipe).take(cap).read_to_end(&mut buf);
                let _ = io::copy(&mut pipe, &mut io::sink());
                let _ = tx.send(buf);
            });
        }
    }
    rx
}

/// The argv (after the program) that makes hakim-init run [`run_fetch_child`].
pub fn fetch_child_args(binary_url: &str, dest: &Path, uid: u32, gid: u32) -> Vec<OsString> {
    vec![
        FETCH_SUBCOMMAND.into(),
        binary_url.into(),
        dest.as_os_str().to_owned(),
        uid.to_string().into(),
        gid.to_string().into(),
    ]
}

/// Entry point of `hakim-init __fetch-agent <binary_url> <dest> <uid> <gid>`; `args` are the
/// four operands after the subcommand (`String`s or `OsString`s). Reads proxies and `SSL_CERT_FILE` from the environment
/// (see [`FETCH_ENV`]). Returns the exit code: 0 after installing (one line on stdout with the
/// version), 1 on any failure (one line on stderr, prefixed `hakim-init: fetch: `).
pub fn run_fetch_child<S: AsRef<OsStr>>(args: &[S]) -> i32 {
    let fail = |msg: &dyn fmt::Display| {
        // One line, whatever the message holds.
        eprintln!("{LOG_PREFIX}{}", printable(msg.to_string().trim(), 2000));
        1
    };
    let [url, dest, uid, gid] = args else {
        return fail(&format!(
            "usage: hakim-init {FETCH_SUBCOMMAND} <binary_url> <dest> <uid> <gid> (got {} operands)",
            args.len()
        ));
    };
    let Some(url) = url.as_ref().to_str() else {
        return fail(&"the binary URL is not UTF-8");
    };
    let parse_id = |v: &S, what: &str| {
        v.as_ref()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
            .ok_or_else(|| format!("{what} is not a number"))
    };
    let (uid, gid) = match (parse_id(uid, "uid"), parse_id(gid, "gid")) {
        (Ok(u), Ok(g)) => (u, g),
        (Err(e), _) | (_, Err(e)) => return fail(&e),
    };
    let dest = PathBuf::from(dest.as_ref());
    match fetch_agent(url, &dest, &FetchOptions::from_env(uid, gid)) {
        Ok(outcome) => {
            println!(
                "{LOG_PREFIX}installed {} ({} bytes): {}",
                dest.display(),
                outcome.bytes,
                outcome.version
            );
            0
        }
        Err(e) => fail(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::io::BufReader;
    use std::net::{TcpListener, TcpStream};
    use std::sync::{Arc, Mutex};

    // ---- backoff ----

    /// The real schedule of agent download retries: change it here on purpose or not at all.
    #[test]
    fn agent_fetch_schedule() {
        let s = AGENT_FETCH_BACKOFF;
        let nominal: Vec<u64> = (0..7).map(|a| s.nominal(a).as_secs()).collect();
        assert_eq!(nominal, [1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(s.delay_with(3, 0), Duration::from_secs(8));
        // At most 20 % shorter, never longer.
        let shortest = s.delay_with(3, u64::MAX);
        assert!(shortest >= Duration::from_millis(6400) && shortest < Duration::from_secs(8));
    }

    // ---- proxies ----

    fn url(s: &str) -> AccessUrl {
        AccessUrl::parse(s).unwrap()
    }

    #[test]
    fn proxy_env_precedence() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            ProxyEnv::from_lookup(move |k| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            })
        };
        let p = env(&[
            ("HTTPS_PROXY", "http://upper:1"),
            ("https_proxy", "http://lower:1"),
            ("HTTP_PROXY", "http://plain:2"),
            ("NO_PROXY", "internal"),
        ]);
        assert_eq!(p.https.as_deref(), Some("http://lower:1"));
        assert_eq!(
            proxy_for(&p, &url("https://coder.example.com")),
            Some(("https_proxy", "http://lower:1"))
        );
        assert_eq!(
            proxy_for(&p, &url("http://coder.example.com")),
            Some(("http_proxy", "http://plain:2"))
        );
        assert_eq!(proxy_for(&p, &url("https://coder.internal")), None);

        let p = env(&[("https_proxy", ""), ("HTTPS_PROXY", "http://upper:1")]);
        assert_eq!(p.https.as_deref(), Some("http://upper:1"));
        assert_eq!(proxy_for(&p, &url("http://coder.example.com")), None);

        let p = env(&[("ALL_PROXY", "http://all:3")]);
        assert_eq!(
            proxy_for(&p, &url("http://coder.example.com")),
            Some(("all_proxy", "http://all:3"))
        );
        assert!(proxy_for(&ProxyEnv::from_lookup(|_| None), &url("https://x")).is_none());
    }

    #[test]
    fn no_proxy_rules() {
        let m = no_proxy_matches;
        assert!(m("*", "anything.example.com", 443));
        assert!(m("example.com", "example.com", 443));
        assert!(m("example.com", "coder.example.com", 443));
        assert!(m(".example.com", "example.com", 443));
        assert!(m("*.example.com", "a.b.example.com", 443));
        assert!(m("EXAMPLE.com", "Coder.Example.COM.", 443));
        assert!(!m("example.com", "badexample.com", 443));
        assert!(!m("example.com", "example.com.evil", 443));
        assert!(m("localhost, 127.0.0.1 ,::1", "127.0.0.1", 80));
        assert!(m("localhost,127.0.0.1,::1", "[::1]", 80));
        assert!(m("[::1]", "[::1]", 80));
        assert!(!m("127.0.0.1", "127.0.0.2", 80));
        assert!(m("10.0.0.0/8", "10.20.30.40", 80));
        assert!(!m("10.0.0.0/8", "11.0.0.1", 80));
        assert!(m("0.0.0.0/0", "1.2.3.4", 80));
        assert!(m("fd00::/8", "[fd12::1]", 80));
        assert!(!m("fd00::/8", "[fe80::1]", 80));
        assert!(!m("10.0.0.0/8", "ten.example.com", 80));
        assert!(!m("10.0.0.0/33", "10.0.0.1", 80));
        assert!(m("coder.example.com:8443", "coder.example.com", 8443));
        assert!(!m("coder.example.com:8443", "coder.example.com", 443));
        assert!(m("[::1]:3000", "[::1]", 3000));
        assert!(!m("[::1]:3000", "[::1]", 3001));
        assert!(m("127.0.0.1:3000", "127.0.0.1", 3000));
        assert!(!m("", "example.com", 80));
        assert!(!m(" , ,", "example.com", 80));
        assert!(!m(".", "example.com", 80));
        assert!(!m("*.", "example.com", 80));
    }

    #[test]
    fn socks_and_bad_proxies_are_refused_without_echoing() {
        let mut opts = FetchOptions::new(0, 0);
        opts.proxy.https = Some("socks5://user:secretpw@proxy:1080".into());
        let e = build_agent(&url("https://coder.example.com"), &opts).unwrap_err();
        assert!(matches!(e, FetchError::Proxy { .. }));
        assert!(!e.to_string().contains("secretpw"), "{e}");
        opts.proxy.https = Some("ftp://user:secretpw@proxy:1".into());
        let e = build_agent(&url("https://coder.example.com"), &opts).unwrap_err();
        assert!(matches!(e, FetchError::Proxy { .. }), "{e}");
        assert!(!e.to_string().contains("secretpw"), "{e}");
    }

    // ---- CA bundles ----

    #[test]
    fn ca_options_from_the_environment() {
        assert!(build_agent(&url("https://x.example/a"), &test_opts()).is_ok());
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        fs::write(&junk, "not a certificate\n").unwrap();
        let opts = FetchOptions {
            extra_ca: vec![junk],
            ..test_opts()
        };
        let e = build_agent(&url("https://x.example/a"), &opts).unwrap_err();
        assert!(matches!(e, FetchError::CaBundle(_)), "{e}");
        assert!(e.to_string().contains("contains no PEM certificate"), "{e}");
    }

    // ---- headers ----

    #[test]
    fn header_checks() {
        let u = "http://127.0.0.1/x";
        let e = check_header(b"", u).unwrap_err();
        assert!(e.to_string().contains("an empty body"), "{e}");
        let e = check_header(b"\n  <!DOCTYPE html><html>", u).unwrap_err();
        assert!(e.to_string().contains("an HTML page"), "{e}");
        let e = check_header(b"\xef\xbb\xbf<html>", u).unwrap_err();
        assert!(e.to_string().contains("an HTML page"), "{e}");
        assert!(check_header(b"{\"message\":\"x\"}", u)
            .unwrap_err()
            .to_string()
            .contains("JSON"));
        assert!(check_header(b"#!/bin/sh\n", u)
            .unwrap_err()
            .to_string()
            .contains("script"));
        assert!(check_header(&[0x1f, 0x8b, 8, 0], u)
            .unwrap_err()
            .to_string()
            .contains("gzip"));
        assert!(check_header(b"\x7fELF\x02\x01", u)
            .unwrap_err()
            .to_string()
            .contains("truncated"));
        let mut hdr = [0u8; 20];
        hdr[..4].copy_from_slice(b"\x7fELF");
        hdr[5] = 1;
        let own = match crate::agent_config::coder_arch() {
            Some("amd64") => 62u16,
            Some("arm64") => 183,
            Some("armv7") => 40,
            _ => return,
        };
        hdr[18..20].copy_from_slice(&own.to_le_bytes());
        check_header(&hdr, u).unwrap();
        let other = if own == 62 { 183u16 } else { 62 };
        hdr[18..20].copy_from_slice(&other.to_le_bytes());
        let e = check_header(&hdr, u).unwrap_err();
        assert!(matches!(e, FetchError::WrongArch { .. }), "{e}");
        assert!(e.to_string().contains("this machine needs"), "{e}");
        hdr[18..20].copy_from_slice(&243u16.to_le_bytes()); // RISC-V
        let e = check_header(&hdr, u).unwrap_err();
        assert!(e.to_string().contains("another architecture"), "{e}");
    }

    // ---- test programs ----

    /// A minimal static ELF for this machine that prints `msg` and exits with `code` (or, with
    /// `hang`, loops forever), built from bytes so the tests need no compiler or fixture.
    /// `None` on architectures without a template.
    fn tiny_elf_with(msg: &str, code: u8, hang: bool) -> Option<Vec<u8>> {
        const BASE: u64 = 0x40_0000;
        const CODE_OFF: u64 = 64 + 56;
        let msg = msg.as_bytes();
        let len = msg.len() as u32;
        let (machine, mut text): (u16, Vec<u8>) = match std::env::consts::ARCH {
            "x86_64" => {
                let mut c = vec![0xb8, 1, 0, 0, 0]; // mov eax, 1 (write)
                c.extend([0xbf, 1, 0, 0, 0]); // mov edi, 1
                c.extend([0x48, 0x8d, 0x35, 19, 0, 0, 0]); // lea rsi, [rip+19] -> msg
                c.push(0xba); // mov edx, len
                c.extend(len.to_le_bytes());
                c.extend([0x0f, 0x05]); // syscall
                c.extend([0xb8, 60, 0, 0, 0]); // mov eax, 60 (exit)
                c.extend([0xbf, code, 0, 0, 0]); // mov edi, code
                c.extend([0x0f, 0x05]); // syscall
                if hang {
                    c[..2].copy_from_slice(&[0xeb, 0xfe]); // jmp .
                }
                (62, c)
            }
            "aarch64" => {
                let ins: [u32; 8] = [
                    if hang { 0x1400_0000 } else { 0xd280_0020 }, // b . / mov x0, #1
                    0x1000_00e1,                                  // adr x1, msg (+28)
                    0xd280_0002 | (len << 5),                     // mov x2, #len
                    0xd280_0808,                                  // mov x8, #64 (write)
                    0xd400_0001,                                  // svc #0
                    0xd280_0000 | (u32::from(code) << 5),         // mov x0, #code
                    0xd280_0ba8,                                  // mov x8, #93 (exit)
                    0xd400_0001,                                  // svc #0
                ];
                (183, ins.iter().flat_map(|i| i.to_le_bytes()).collect())
            }
            _ => return None,
        };
        let total = CODE_OFF + text.len() as u64 + msg.len() as u64;
        let mut f = Vec::new();
        f.extend(b"\x7fELF\x02\x01\x01\x00"); // 64-bit, little-endian, version 1
        f.extend([0u8; 8]);
        f.extend(2u16.to_le_bytes()); // ET_EXEC
        f.extend(machine.to_le_bytes());
        f.extend(1u32.to_le_bytes());
        f.extend((BASE + CODE_OFF).to_le_bytes()); // entry
        f.extend(64u64.to_le_bytes()); // phoff
        f.extend(0u64.to_le_bytes()); // shoff
        f.extend(0u32.to_le_bytes()); // flags
        f.extend(64u16.to_le_bytes()); // ehsize
        f.extend(56u16.to_le_bytes()); // phentsize
        f.extend(1u16.to_le_bytes()); // phnum
        f.extend([0u8; 6]); // shentsize, shnum, shstrndx
        f.extend(1u32.to_le_bytes()); // PT_LOAD
        f.extend(5u32.to_le_bytes()); // R+X
        f.extend(0u64.to_le_bytes()); // offset
        f.extend(BASE.to_le_bytes()); // vaddr
        f.extend(BASE.to_le_bytes()); // paddr
        f.extend(total.to_le_bytes()); // filesz
        f.extend(total.to_le_bytes()); // memsz
        f.extend(0x1000u64.to_le_bytes()); // align
        assert_eq!(f.len() as u64, CODE_OFF);
        f.append(&mut text);
        f.extend(msg);
        Some(f)
    }

    fn tiny_elf(msg: &str) -> Option<Vec<u8>> {
        tiny_elf_with(msg, 0, false)
    }

    // ---- a tiny HTTP server ----

    #[derive(Clone)]
    enum Reply {
        Ok(Vec<u8>),
        Status(u16, &'static str),
        Redirect(String),
        /// Announces more bytes than it sends, then closes.
        Truncated(Vec<u8>, usize),
        /// Sends headers, then nothing.
        Stall,
    }

    struct Server {
        port: u16,
        requests: Arc<Mutex<Vec<String>>>,
    }

    impl Server {
        fn base(&self) -> String {
            format!("http://127.0.0.1:{}", self.port)
        }
    }

    /// Serves `routes` (path → reply) on 127.0.0.1 from a thread. Requests are recorded as
    /// their request line. `CONNECT` requests are answered 200 and the tunnel is then served
    /// like a direct connection, so the same server doubles as an HTTP proxy.
    fn serve(routes: Vec<(&'static str, Reply)>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let log = requests.clone();
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let routes = routes.clone();
                let log = log.clone();
                thread::spawn(move || {
                    let _ = handle(stream, &routes, &log);
                });
            }
        });
        Server { port, requests }
    }

    fn handle(
        stream: TcpStream,
        routes: &[(&'static str, Reply)],
        log: &Mutex<Vec<String>>,
    ) -> io::Result<()> {
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut stream = stream;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            let line = line.trim_end().to_string();
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h)? == 0 || h.trim_end().is_empty() {
                    break;
                }
            }
            log.lock().unwrap().push(line.clone());
            let mut parts = line.split(' ');
            let method = parts.next().unwrap_or("");
            let target = parts.next().unwrap_or("");
            if method == "CONNECT" {
                stream.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")?;
                continue;
            }
            let reply = routes.iter().find(|(p, _)| *p == target).map(|(_, r)| r);
            match reply {
                Some(Reply::Ok(body)) => {
                    write!(
                        stream,
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\n\r\n",
                        body.len()
                    )?;
                    stream.write_all(body)?;
                }
                Some(Reply::Status(code, body)) => {
                    write!(
                        stream,
                        "HTTP/1.1 {code} X\r\nContent-Length: {}\r\nContent-Type: text/html\r\n\r\n{body}",
                        body.len()
                    )?;
                }
                Some(Reply::Redirect(to)) => {
                    write!(
                        stream,
                        "HTTP/1.1 302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\n\r\n"
                    )?;
                }
                Some(Reply::Truncated(body, claimed)) => {
                    write!(
                        stream,
                        "HTTP/1.1 200 OK\r\nContent-Length: {claimed}\r\n\r\n"
                    )?;
                    stream.write_all(body)?;
                    return Ok(());
                }
                Some(Reply::Stall) => {
                    write!(stream, "HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")?;
                    stream.flush()?;
                    thread::sleep(Duration::from_secs(5));
                    return Ok(());
                }
                None => {
                    let body = "<html><body>404 Not Found</body></html>";
                    write!(
                        stream,
                        "HTTP/1.1 404 Not Found\r\nContent-Length: {}\r\nContent-Type: text/html\r\n\r\n{body}",
                        body.len()
                    )?;
                }
            }
        }
    }

    fn is_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    /// A destination in a fresh 0755 directory, so uid 65534 can reach the temp file.
    fn dest_dir() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let dest = dir.path().join("agent").join("coder");
        (dir, dest)
    }

    /// Runs as nobody when root (the real case), else as ourselves.
    fn test_opts() -> FetchOptions {
        let (uid, gid) = if is_root() {
            (65534, 65534)
        } else {
            (
                nix::unistd::geteuid().as_raw(),
                nix::unistd::getegid().as_raw(),
            )
        };
        let mut o = FetchOptions::new(uid, gid);
        o.timeout = Duration::from_secs(20);
        o.read_timeout = Duration::from_secs(5);
        o
    }

    fn leftovers(dest: &Path) -> Vec<String> {
        let Ok(rd) = fs::read_dir(dest.parent().unwrap()) else {
            return Vec::new();
        };
        rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".part-"))
            .collect()
    }

    const ARCH_PATH: &str = "/bin/coder-linux-test";

    #[test]
    fn installs_a_valid_binary() {
        let Some(elf) = tiny_elf("Coder v2.99.0-test+abcdef\nhttps://github.com/coder/coder\n")
        else {
            eprintln!(
                "skipping: no tiny ELF template for {}",
                std::env::consts::ARCH
            );
            return;
        };
        let server = serve(vec![(ARCH_PATH, Reply::Ok(elf.clone()))]);
        let (_dir, dest) = dest_dir();
        let out = fetch_agent(
            &format!("{}{ARCH_PATH}", server.base()),
            &dest,
            &test_opts(),
        )
        .unwrap();
        assert_eq!(out.bytes, elf.len() as u64);
        assert_eq!(out.version, "Coder v2.99.0-test+abcdef");
        assert_eq!(fs::read(&dest).unwrap(), elf);
        let meta = fs::metadata(&dest).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o755);
        assert_eq!(
            fs::metadata(dest.parent().unwrap())
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o755
        );
        assert!(leftovers(&dest).is_empty());
        assert_eq!(
            server.requests.lock().unwrap().as_slice(),
            [format!("GET {ARCH_PATH} HTTP/1.1")]
        );

        // A second install replaces the first atomically.
        let elf2 = tiny_elf("Coder v3.0.0\n").unwrap();
        let server2 = serve(vec![(ARCH_PATH, Reply::Ok(elf2.clone()))]);
        let out = fetch_agent(
            &format!("{}{ARCH_PATH}", server2.base()),
            &dest,
            &test_opts(),
        )
        .unwrap();
        assert_eq!(out.version, "Coder v3.0.0");
        assert_eq!(fs::read(&dest).unwrap(), elf2);
    }

    #[test]
    fn follows_redirects() {
        let Some(elf) = tiny_elf("Coder v2.0.0\n") else {
            return;
        };
        let server = serve(vec![
            (
                "/bin/coder-linux-test",
                Reply::Redirect("/cdn/coder".into()),
            ),
            ("/cdn/coder", Reply::Ok(elf)),
        ]);
        let (_dir, dest) = dest_dir();
        fetch_agent(
            &format!("{}{ARCH_PATH}", server.base()),
            &dest,
            &test_opts(),
        )
        .unwrap();
        assert_eq!(server.requests.lock().unwrap().len(), 2);
    }

    #[test]
    fn rejects_html_page() {
        let page = b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head></html>\n".to_vec();
        let server = serve(vec![(ARCH_PATH, Reply::Ok(page))]);
        let (_dir, dest) = dest_dir();
        let url = format!("{}{ARCH_PATH}", server.base());
        let e = fetch_agent(&url, &dest, &test_opts()).unwrap_err();
        assert!(
            matches!(
                e,
                FetchError::NotElf {
                    found: "an HTML page",
                    ..
                }
            ),
            "{e}"
        );
        let msg = e.to_string();
        assert!(msg.contains(&url) && msg.contains("HTML page"), "{msg}");
        assert!(!dest.exists());
        assert!(leftovers(&dest).is_empty());
    }

    #[test]
    fn reports_http_status() {
        let server = serve(vec![(ARCH_PATH, Reply::Status(500, "<html>oops</html>"))]);
        let (_dir, dest) = dest_dir();
        let url = format!("{}{ARCH_PATH}", server.base());
        let e = fetch_agent(&url, &dest, &test_opts()).unwrap_err();
        assert!(matches!(e, FetchError::Status { status: 500, .. }), "{e}");
        assert_eq!(
            e.to_string(),
            format!("GET {url}: HTTP 500 Internal Server Error")
        );
        let e =
            fetch_agent(&format!("{}/bin/other", server.base()), &dest, &test_opts()).unwrap_err();
        assert!(e.to_string().ends_with(": HTTP 404 Not Found"), "{e}");
        assert!(!dest.exists());
        assert!(leftovers(&dest).is_empty());
    }

    #[test]
    fn rejects_binary_that_is_not_coder() {
        let Ok(truebin) = fs::read("/bin/true") else {
            eprintln!("skipping: no /bin/true");
            return;
        };
        let server = serve(vec![(ARCH_PATH, Reply::Ok(truebin))]);
        let (_dir, dest) = dest_dir();
        let e = fetch_agent(
            &format!("{}{ARCH_PATH}", server.base()),
            &dest,
            &test_opts(),
        )
        .unwrap_err();
        assert!(matches!(e, FetchError::Version { .. }), "{e}");
        assert!(e.to_string().contains("does not mention Coder"), "{e}");
        assert!(!dest.exists());
        assert!(leftovers(&dest).is_empty());
    }

    #[test]
    fn rejects_failing_version() {
        let Some(elf) = tiny_elf_with("Coder v1\n", 3, false) else {
            return;
        };
        let server = serve(vec![(ARCH_PATH, Reply::Ok(elf))]);
        let (_dir, dest) = dest_dir();
        let e = fetch_agent(
            &format!("{}{ARCH_PATH}", server.base()),
            &dest,
            &test_opts(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("exited with exit status: 3"), "{e}");
        assert!(!dest.exists());
        assert!(leftovers(&dest).is_empty());
    }

    #[test]
    fn version_timeout_kills() {
        let Some(elf) = tiny_elf_with("Coder v1\n", 0, true) else {
            return;
        };
        let server = serve(vec![(ARCH_PATH, Reply::Ok(elf))]);
        let (_dir, dest) = dest_dir();
        let mut opts = test_opts();
        opts.version_timeout = Duration::from_millis(300);
        let t = Instant::now();
        let e = fetch_agent(&format!("{}{ARCH_PATH}", server.base()), &dest, &opts).unwrap_err();
        assert!(e.to_string().contains("did not finish"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(!dest.exists());
        assert!(leftovers(&dest).is_empty());
    }

    #[test]
    fn truncated_body_fails() {
        let Some(elf) = tiny_elf("Coder v1\n") else {
            return;
        };
        let claimed = elf.len() + 1000;
        let server = serve(vec![(ARCH_PATH, Reply::Truncated(elf, claimed))]);
        let (_dir, dest) = dest_dir();
        let e = fetch_agent(
            &format!("{}{ARCH_PATH}", server.base()),
            &dest,
            &test_opts(),
        )
        .unwrap_err();
        assert!(matches!(e, FetchError::Transport { .. }), "{e}");
        assert!(!dest.exists());
        assert!(leftovers(&dest).is_empty());
    }

    #[test]
    fn stalled_body_times_out() {
        let server = serve(vec![(ARCH_PATH, Reply::Stall)]);
        let (_dir, dest) = dest_dir();
        let mut opts = test_opts();
        opts.read_timeout = Duration::from_millis(300);
        let t = Instant::now();
        let e = fetch_agent(&format!("{}{ARCH_PATH}", server.base()), &dest, &opts).unwrap_err();
        assert!(matches!(e, FetchError::Transport { .. }), "{e}");
        assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
        assert!(leftovers(&dest).is_empty());
    }

    #[test]
    fn size_limit() {
        let Some(mut elf) = tiny_elf("Coder v1\n") else {
            return;
        };
        elf.resize(200_000, 0);
        let server = serve(vec![(ARCH_PATH, Reply::Ok(elf))]);
        let (_dir, dest) = dest_dir();
        let mut opts = test_opts();
        opts.max_bytes = 100_000;
        let e = fetch_agent(&format!("{}{ARCH_PATH}", server.base()), &dest, &opts).unwrap_err();
        assert!(matches!(e, FetchError::TooLarge { .. }), "{e}");
        assert!(leftovers(&dest).is_empty());
    }

    #[test]
    fn connection_refused() {
        // Bind then drop to get a port that is (almost certainly) closed.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let (_dir, dest) = dest_dir();
        let url = format!("http://127.0.0.1:{port}{ARCH_PATH}");
        let e = fetch_agent(&url, &dest, &test_opts()).unwrap_err();
        assert!(matches!(e, FetchError::Transport { .. }), "{e}");
        assert!(e.to_string().starts_with(&format!("GET {url}: ")), "{e}");
    }

    #[test]
    fn invalid_urls_and_dest() {
        let (_dir, dest) = dest_dir();
        let e = fetch_agent("ftp://127.0.0.1/x", &dest, &test_opts()).unwrap_err();
        assert!(matches!(e, FetchError::InvalidUrl { .. }), "{e}");
        let e = fetch_agent("http://127.0.0.1:1/x?y", &dest, &test_opts()).unwrap_err();
        assert!(matches!(e, FetchError::InvalidUrl { .. }), "{e}");
        let e = fetch_agent("http://127.0.0.1:1/x", Path::new("/"), &test_opts()).unwrap_err();
        assert!(matches!(e, FetchError::Io { .. }), "{e}");
    }

    #[test]
    fn uses_proxy_unless_no_proxy() {
        let Some(elf) = tiny_elf("Coder v2\n") else {
            return;
        };
        // The "proxy" answers CONNECT and then serves the file through the tunnel.
        let proxy = serve(vec![(ARCH_PATH, Reply::Ok(elf.clone()))]);
        // The origin URL points at a closed port: only the proxy can answer.
        let closed = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("http://127.0.0.1:{closed}{ARCH_PATH}");
        let (_dir, dest) = dest_dir();
        let mut opts = test_opts();
        opts.proxy.http = Some(proxy.base());
        fetch_agent(&url, &dest, &opts).unwrap();
        let reqs = proxy.requests.lock().unwrap().clone();
        assert_eq!(reqs[0], format!("CONNECT 127.0.0.1:{closed} HTTP/1.1"));

        // no_proxy for that host: direct, hence refused.
        opts.proxy.no_proxy = Some("localhost,127.0.0.1".into());
        let e = fetch_agent(&url, &dest, &opts).unwrap_err();
        assert!(matches!(e, FetchError::Transport { .. }), "{e}");
        assert_eq!(proxy.requests.lock().unwrap().len(), reqs.len());
    }

    #[test]
    fn trailing_slash_equivalence_end_to_end() {
        let Some(elf) = tiny_elf("Coder v2\n") else {
            return;
        };
        let arch = crate::agent_config::coder_arch().unwrap();
        let path: &'static str =
            Box::leak(format!("/coder/bin/coder-linux-{arch}").into_boxed_str());
        let server = serve(vec![(path, Reply::Ok(elf))]);
        for access in [
            format!("{}/coder", server.base()),
            format!("{}/coder/", server.base()),
        ] {
            let env: std::collections::BTreeMap<String, String> = [
                ("CODER_AGENT_URL".to_string(), access.clone()),
                ("CODER_AGENT_TOKEN".to_string(), "t".to_string()),
            ]
            .into();
            let cfg = crate::agent_config::resolve_env(&env)
                .unwrap()
                .unwrap()
                .config;
            assert_eq!(cfg.binary_url, format!("{}{path}", server.base()));
            let (_dir, dest) = dest_dir();
            fetch_agent(&cfg.binary_url, &dest, &test_opts()).unwrap();
        }
        let reqs = server.requests.lock().unwrap().clone();
        assert_eq!(reqs, vec![format!("GET {path} HTTP/1.1"); 2]);
    }

    /// With the e2e crate's fake agent (FAKE_CODER_BIN, or target/debug/fake-coder), whose
    /// `--version` line reports the ids it runs with.
    #[test]
    fn version_runs_as_the_given_user() {
        if !is_root() {
            eprintln!("skipping: needs root to switch users");
            return;
        }
        let fake = std::env::var_os("FAKE_CODER_BIN")
            .map(PathBuf::from)
            .or_else(|| {
                let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/fake-coder");
                p.is_file().then_some(p)
            });
        let Some(fake) = fake else {
            eprintln!("skipping: fake-coder not built (cargo build -p hakim-e2e --bin fake-coder)");
            return;
        };
        let server = serve(vec![(ARCH_PATH, Reply::Ok(fs::read(&fake).unwrap()))]);
        let (_dir, dest) = dest_dir();
        let out = fetch_agent(
            &format!("{}{ARCH_PATH}", server.base()),
            &dest,
            &FetchOptions::new(65534, 65534),
        )
        .unwrap();
        assert!(out.version.starts_with("Coder v"), "{}", out.version);
        assert!(
            out.version.contains("uid=65534 gid=65534 groups=[]"),
            "{}",
            out.version
        );
    }

    /// Root could traverse a 0700 directory; failing here proves --version ran as nobody.
    #[test]
    fn version_unreachable_directory() {
        if !is_root() {
            return;
        }
        let Some(elf) = tiny_elf("Coder v2\n") else {
            return;
        };
        let server = serve(vec![(ARCH_PATH, Reply::Ok(elf))]);
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).unwrap();
        let dest = dir.path().join("coder");
        let e = fetch_agent(
            &format!("{}{ARCH_PATH}", server.base()),
            &dest,
            &FetchOptions::new(65534, 65534),
        )
        .unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("traversable"), "{msg}");
        assert!(!dest.exists());
        assert!(leftovers(&dest).is_empty());
    }

    #[test]
    fn fetch_child_entry_point() {
        assert_eq!(run_fetch_child::<&str>(&[]), 1);
        let args: Vec<OsString> = ["http://127.0.0.1:1/x", "/nonexistent/x", "nope", "1"]
            .iter()
            .map(OsString::from)
            .collect();
        assert_eq!(run_fetch_child(&args), 1);
        let a = fetch_child_args(
            "http://h/x",
            Path::new("/var/lib/hakim/agent/coder"),
            1000,
            1000,
        );
        assert_eq!(a[0], FETCH_SUBCOMMAND);
        assert_eq!(a.len(), 5);
        let Some(elf) = tiny_elf("Coder v2\n") else {
            return;
        };
        let server = serve(vec![(ARCH_PATH, Reply::Ok(elf))]);
        let (_dir, dest) = dest_dir();
        let o = test_opts();
        let a = fetch_child_args(
            &format!("{}{ARCH_PATH}", server.base()),
            &dest,
            o.uid,
            o.gid,
        );
        // from_env() would pick up a proxy from the test environment; only run when clean.
        if proxy_for(&ProxyEnv::from_env(), &url(&server.base())).is_none() {
            assert_eq!(run_fetch_child(&a[1..]), 0);
            assert!(dest.is_file());
        }
    }
}

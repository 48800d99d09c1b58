//! A fault-injecting plain-HTTP reverse proxy for the registry tests (see
//! `tests/tests/registry_faults.rs`).
//!
//! [`FaultProxy`] listens on 127.0.0.1 and forwards every request to a plain-HTTP
//! [`crate::registry::Registry`] (plain or token mode), one request per connection
//! (`Connection: close` both ways). Blob `GET`s (`/v2/<name>/blobs/sha256:<hex>`) that the
//! registry answers `200` or `206` may be spoiled by a [`Rule`]: for one digest or any blob,
//! for the first N matching requests or all of them, with a [`Fault`]; so may manifest `GET`s
//! ([`Rule::manifests`]):
//!
//! * [`Fault::ResetAfter`]: the real headers, K body bytes, a pause, then a TCP reset
//!   (`SO_LINGER` 0);
//! * [`Fault::CloseAfter`]: the real headers (honest `Content-Length`), K bytes, a clean close;
//! * [`Fault::ShortLength`]: `Content-Length: K` and K bytes — a short body that looks complete;
//! * [`Fault::Status`]: an error status (500, 429 …), optionally with `Retry-After`;
//! * [`Fault::FlipByte`]: the right length, one byte inverted;
//! * [`Fault::Trickle`]: the body at a few KiB/s;
//! * [`Fault::Redirect`]: `307` to a second listener on another port (the "CDN"), which records
//!   whether an `Authorization` header arrived and serves the blob bytes the proxy fetched from
//!   the registry (honouring `Range`);
//! * [`Fault::IgnoreRange`]: the `Range` header is dropped before forwarding, so a ranged
//!   request gets `200` and the whole body;
//! * [`Fault::Html`]: `200` with a `text/html` login page instead of the content;
//! * [`Fault::Endless`]: `200` without a length, the real body, then zeros until the client
//!   hangs up (at most 1 GiB).
//!
//! Uploads (`POST`, `PATCH`, `PUT` under `/v2/<name>/blobs/uploads/`) may be spoiled by an
//! [`UploadRule`], after letting a number of matching requests through, with an [`UploadFault`]:
//!
//! * [`UploadFault::Respond`]: a canned answer (a `405`, an HTML page) the registry never sees;
//! * [`UploadFault::LoseAnswer`]: the request reaches the registry, whose answer is replaced by
//!   an error status (the work was done; the client cannot know);
//! * [`UploadFault::Redirect`]: `307` to the redirect target, which forwards the request as it
//!   arrives (recording whether `Authorization` came along) and relays the registry's answer;
//! * [`UploadFault::AddHeader`]: the registry's answer with one more header (what a newer
//!   registry would send, e.g. `OCI-Chunk-Min-Length`).
//!
//! A request the registry does not answer `200`/`206` (a `401` before the token flow, say) is
//! relayed untouched and does not use up a rule. Connections that do not start with an HTTP
//! request (the converter tries TLS first on 127.0.0.1) are closed. Every request either
//! listener parsed is recorded ([`Seen`]). Threads stop on drop.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What to do to a matching blob response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Real headers, K body bytes, a 300 ms pause, then a TCP reset.
    ResetAfter(usize),
    /// Real headers (honest `Content-Length`), K body bytes, then a clean close (FIN).
    CloseAfter(usize),
    /// `Content-Length: K` and only K bytes (a lying length: the response looks complete).
    ShortLength(usize),
    /// This status with a JSON error body, and `Retry-After: N` when given.
    Status {
        status: u16,
        retry_after: Option<u32>,
    },
    /// Same length, the middle byte inverted.
    FlipByte,
    /// The body in 256-byte pieces at about this rate.
    Trickle { bytes_per_sec: usize },
    /// `307 Temporary Redirect` to the redirect target.
    Redirect,
    /// Forward without the `Range` header (the registry answers `200` with the whole body).
    IgnoreRange,
    /// `200` with an HTML login page (a captive portal or a proxy's sign-in).
    Html,
    /// `200`, no `Content-Length`, the body followed by zeros that never end (1 GiB cap).
    Endless,
}

/// What to do to an upload request (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UploadFault {
    /// Answer this instead of forwarding.
    Respond {
        status: u16,
        content_type: String,
        body: String,
    },
    /// Forward, then answer this status (with a JSON error) instead of the registry's answer.
    LoseAnswer(u16),
    /// `307` to the redirect target, which forwards to the registry.
    Redirect,
    /// Forward, and add this header to the registry's answer.
    AddHeader { name: String, value: String },
}

/// An [`UploadFault`] for `method` requests under `/blobs/uploads/`: the first `skip` matching
/// requests pass untouched, the next `times` get the fault.
#[derive(Clone, Debug)]
pub struct UploadRule {
    pub method: String,
    pub skip: usize,
    pub times: usize,
    pub fault: UploadFault,
}

/// The [`Rule::digest`] that stands for every manifest `GET`.
const MANIFESTS: &str = "manifests";

/// Most an [`Fault::Endless`] answer sends before giving up on the client.
const ENDLESS_CAP: usize = 1 << 30;

/// A fault for the blob `digest` (`sha256:…`; `None`: any blob), applied to the first
/// `times` matching requests (`None`: all of them).
#[derive(Clone, Debug)]
pub struct Rule {
    pub digest: Option<String>,
    pub times: Option<usize>,
    pub fault: Fault,
}

impl Rule {
    pub fn new(digest: &str, times: Option<usize>, fault: Fault) -> Rule {
        Rule {
            digest: Some(digest.to_string()),
            times,
            fault,
        }
    }

    /// A fault for manifest `GET`s (by tag or digest) instead of a blob.
    pub fn manifests(times: Option<usize>, fault: Fault) -> Rule {
        Rule::new(MANIFESTS, times, fault)
    }
}

/// One request a listener parsed.
#[derive(Clone, Debug)]
pub struct Seen {
    /// When its head had been read.
    pub at: Instant,
    pub method: String,
    /// Request target (path and query).
    pub path: String,
    /// `Range` header.
    pub range: Option<String>,
    /// An `Authorization` header was present.
    pub authorization: bool,
    /// Status sent back (0: none).
    pub status: u16,
    /// The fault applied.
    pub fault: Option<Fault>,
    /// The upload fault applied.
    pub upload_fault: Option<UploadFault>,
    /// Body bytes sent back.
    pub body_bytes: usize,
}

impl Seen {
    /// `sha256:<hex>` for a blob path (`/v2/…/blobs/sha256:<hex>` or the redirect target's
    /// `/cdn/sha256:<hex>`).
    pub fn blob(&self) -> Option<&str> {
        let p = self.path.split('?').next().unwrap_or(&self.path);
        let (_, d) = p.rsplit_once('/')?;
        let is_blob = p.contains("/blobs/") || p.starts_with("/cdn/");
        (is_blob && d.starts_with("sha256:")).then_some(d)
    }
}

struct Shared {
    upstream: u16,
    redirect_port: u16,
    rules: Mutex<Vec<Rule>>,
    upload_rules: Mutex<Vec<UploadRule>>,
    seen: Mutex<Vec<Seen>>,
    redirect_seen: Mutex<Vec<Seen>>,
    redirect_blobs: Mutex<HashMap<String, Vec<u8>>>,
    stop: AtomicBool,
    connections: Mutex<Vec<JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The proxy and its redirect target (see the module docs).
pub struct FaultProxy {
    /// The proxy: point the converter at `127.0.0.1:PORT`.
    pub port: u16,
    /// The redirect target ("CDN").
    pub redirect_port: u16,
    shared: Arc<Shared>,
    accept_threads: Vec<JoinHandle<()>>,
}

impl FaultProxy {
    /// Starts the proxy in front of the plain-HTTP registry on `127.0.0.1:UPSTREAM`.
    pub fn start(upstream: u16) -> FaultProxy {
        let proxy = TcpListener::bind("127.0.0.1:0").expect("bind fault proxy");
        let target = TcpListener::bind("127.0.0.1:0").expect("bind redirect target");
        let port = proxy.local_addr().expect("local addr").port();
        let redirect_port = target.local_addr().expect("local addr").port();
        let shared = Arc::new(Shared {
            upstream,
            redirect_port,
            rules: Mutex::new(Vec::new()),
            upload_rules: Mutex::new(Vec::new()),
            seen: Mutex::new(Vec::new()),
            redirect_seen: Mutex::new(Vec::new()),
            redirect_blobs: Mutex::new(HashMap::new()),
            stop: AtomicBool::new(false),
            connections: Mutex::new(Vec::new()),
        });
        let accept = |listener: TcpListener, handler: fn(TcpStream, &Shared)| {
            let shared = Arc::clone(&shared);
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if shared.stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let s = Arc::clone(&shared);
                    let t = std::thread::spawn(move || handler(conn, &s));
                    let mut conns = lock(&shared.connections);
                    conns.retain(|h| !h.is_finished());
                    conns.push(t);
                }
            })
        };
        let accept_threads = vec![accept(proxy, serve_proxy), accept(target, serve_target)];
        eprintln!(
            "fault proxy on 127.0.0.1:{port} -> 127.0.0.1:{upstream}, redirect target on \
             127.0.0.1:{redirect_port}"
        );
        FaultProxy {
            port,
            redirect_port,
            shared,
            accept_threads,
        }
    }

    /// `127.0.0.1:PORT`
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `docker://127.0.0.1:PORT/REFERENCE`
    pub fn docker_ref(&self, reference: &str) -> String {
        format!("docker://{}/{reference}", self.host())
    }

    /// Adds a rule (rules are tried in the order added; the first applicable one wins).
    pub fn add_rule(&self, rule: Rule) {
        lock(&self.shared.rules).push(rule);
    }

    /// Adds an upload rule (tried in the order added; the first matching one counts the
    /// request).
    pub fn add_upload_rule(&self, rule: UploadRule) {
        lock(&self.shared.upload_rules).push(rule);
    }

    /// Removes every rule (blob and upload rules).
    pub fn clear_rules(&self) {
        lock(&self.shared.rules).clear();
        lock(&self.shared.upload_rules).clear();
    }

    /// Forgets the requests seen so far (both listeners).
    pub fn clear_seen(&self) {
        self.settle();
        lock(&self.shared.seen).clear();
        lock(&self.shared.redirect_seen).clear();
    }

    /// Waits (at most 5 s) for the connections in flight: a request is recorded once its
    /// answer has been sent, which may be after the client has what it needs.
    fn settle(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline
            && lock(&self.shared.connections)
                .iter()
                .any(|h| !h.is_finished())
        {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Requests the proxy received (after the connections in flight are done).
    pub fn seen(&self) -> Vec<Seen> {
        self.settle();
        lock(&self.shared.seen).clone()
    }

    /// Requests the redirect target received (after the connections in flight are done).
    pub fn redirect_seen(&self) -> Vec<Seen> {
        self.settle();
        lock(&self.shared.redirect_seen).clone()
    }

    /// Blob `GET`s the proxy received for `digest`, in order.
    pub fn blob_gets(&self, digest: &str) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| s.method == "GET" && s.blob() == Some(digest))
            .collect()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for port in [self.port, self.redirect_port] {
            let _ = TcpStream::connect(("127.0.0.1", port));
        }
        for t in self.accept_threads.drain(..) {
            let _ = t.join();
        }
        let conns: Vec<JoinHandle<()>> = lock(&self.shared.connections).drain(..).collect();
        for t in conns {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP bits
// ---------------------------------------------------------------------------------------------

struct Request {
    method: String,
    target: String,
    /// Header lines as received (name, value).
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn head_end(raw: &[u8]) -> Option<usize> {
    raw.windows(4).position(|w| w == b"\r\n\r\n")
}

/// Reads one request (head and `Content-Length` body); `None` if it is not HTTP.
fn read_request(conn: &mut TcpStream) -> Option<Request> {
    conn.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    conn.set_write_timeout(Some(Duration::from_secs(10))).ok()?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    let end = loop {
        if let Some(end) = head_end(&raw) {
            break end;
        }
        if raw.len() > 64 * 1024 {
            return None;
        }
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return None,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
        }
        // A TLS ClientHello (the converter tries HTTPS first) is not text.
        if !raw[0].is_ascii_uppercase() {
            return None;
        }
    };
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split_whitespace();
    let method = first.next()?.to_string();
    let target = first.next()?.to_string();
    if !first.next()?.starts_with("HTTP/1.") {
        return None;
    }
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = raw[end + 4..].to_vec();
    let len: usize = header(&headers, "content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    while body.len() < len {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => body.extend_from_slice(&buf[..n]),
        }
    }
    Some(Request {
        method,
        target,
        headers,
        body,
    })
}

struct Upstream {
    status: u16,
    reason: String,
    headers: Vec<(String, String)>,
    /// The body, de-chunked.
    body: Vec<u8>,
    /// The response exactly as received.
    raw: Vec<u8>,
}

/// Forwards `req` to the registry (`Connection: close`, without `Range` when `drop_range`)
/// and reads the whole answer.
fn forward(req: &Request, upstream: u16, drop_range: bool) -> std::io::Result<Upstream> {
    let mut s = TcpStream::connect(("127.0.0.1", upstream))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut out = format!("{} {} HTTP/1.1\r\n", req.method, req.target);
    for (k, v) in &req.headers {
        if k.eq_ignore_ascii_case("connection")
            || k.eq_ignore_ascii_case("keep-alive")
            || (drop_range && k.eq_ignore_ascii_case("range"))
        {
            continue;
        }
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("Connection: close\r\n\r\n");
    s.write_all(out.as_bytes())?;
    s.write_all(&req.body)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    let end = head_end(&raw).ok_or_else(|| bad("registry answer without a head"))?;
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let _version = parts.next();
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("bad status line"))?;
    let reason = parts.next().unwrap_or("").to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let rest = &raw[end + 4..];
    let chunked = header(&headers, "transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let body = if chunked {
        dechunk(rest).ok_or_else(|| bad("bad chunked body"))?
    } else {
        rest.to_vec()
    };
    Ok(Upstream {
        status,
        reason,
        headers,
        body,
        raw,
    })
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = data.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&data[..eol]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        data = &data[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

/// Status line and headers of `up`, without the framing headers, plus `Content-Length: len`
/// and `Connection: close`.
fn head_with_length(up: &Upstream, len: usize) -> String {
    let mut head = format!("HTTP/1.1 {} {}\r\n", up.status, up.reason);
    for (k, v) in &up.headers {
        let k_l = k.to_ascii_lowercase();
        if [
            "connection",
            "transfer-encoding",
            "content-length",
            "keep-alive",
        ]
        .contains(&k_l.as_str())
        {
            continue;
        }
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!(
        "Content-Length: {len}\r\nConnection: close\r\n\r\n"
    ));
    head
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        307 => "Temporary Redirect",
        404 => "Not Found",
        405 => "Method Not Allowed",
        416 => "Range Not Satisfiable",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

/// Closes with a TCP reset (`SO_LINGER` on, 0 s) instead of a FIN.
fn reset(conn: TcpStream) {
    use std::os::fd::AsRawFd;
    #[repr(C)]
    struct Linger {
        onoff: i32,
        linger: i32,
    }
    extern "C" {
        fn setsockopt(
            fd: i32,
            level: i32,
            name: i32,
            value: *const std::ffi::c_void,
            len: u32,
        ) -> i32;
    }
    const SOL_SOCKET: i32 = 1;
    const SO_LINGER: i32 = 13;
    let linger = Linger {
        onoff: 1,
        linger: 0,
    };
    // SAFETY: a valid open socket and a properly sized `struct linger` (Linux).
    let rc = unsafe {
        setsockopt(
            conn.as_raw_fd(),
            SOL_SOCKET,
            SO_LINGER,
            (&linger as *const Linger).cast(),
            std::mem::size_of::<Linger>() as u32,
        )
    };
    if rc != 0 {
        eprintln!(
            "fault proxy: setsockopt(SO_LINGER) failed: {}",
            std::io::Error::last_os_error()
        );
    }
    drop(conn);
}

fn error_response(status: u16, extra: &str, message: &str) -> Vec<u8> {
    let body = format!("{{\"errors\":[{{\"code\":\"UNKNOWN\",\"message\":\"{message}\"}}]}}");
    format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n{extra}\r\n{body}",
        reason(status),
        body.len()
    )
    .into_bytes()
}

/// The upload fault for `req`, if a rule with uses left matches it (using one up, or one of
/// its skips).
fn take_upload_fault(shared: &Shared, req: &Request) -> Option<UploadFault> {
    let path = req.target.split('?').next().unwrap_or(&req.target);
    if !path.contains("/blobs/uploads/") {
        return None;
    }
    let mut rules = lock(&shared.upload_rules);
    let rule = rules
        .iter_mut()
        .find(|r| r.method == req.method && (r.skip > 0 || r.times > 0))?;
    if rule.skip > 0 {
        rule.skip -= 1;
        return None;
    }
    rule.times -= 1;
    Some(rule.fault.clone())
}

/// The first rule with uses left for a blob `GET` of `digest`, or for a manifest `GET`
/// when `digest` is [`MANIFESTS`] (its index). A rule without digest is for any blob.
fn find_rule(rules: &[Rule], digest: &str) -> Option<usize> {
    rules.iter().position(|r| {
        r.times != Some(0)
            && match r.digest.as_deref() {
                None => digest != MANIFESTS,
                Some(d) => d == digest,
            }
    })
}

const LOGIN_PAGE: &str = "<!DOCTYPE html>\n<html><head><title>Sign in to continue</title></head>\
<body><form action=\"/login\"><input name=\"user\"></form></body></html>\n";

// ---------------------------------------------------------------------------------------------
// The proxy
// ---------------------------------------------------------------------------------------------

fn serve_proxy(mut conn: TcpStream, shared: &Shared) {
    let Some(req) = read_request(&mut conn) else {
        return;
    };
    let mut seen = Seen {
        at: Instant::now(),
        method: req.method.clone(),
        path: req.target.clone(),
        range: req.header("range").map(str::to_string),
        authorization: req.header("authorization").is_some(),
        status: 0,
        fault: None,
        upload_fault: None,
        body_bytes: 0,
    };
    if let Some(fault) = take_upload_fault(shared, &req) {
        seen.status = spoil_upload(&mut conn, &req, &fault, shared);
        seen.upload_fault = Some(fault);
        lock(&shared.seen).push(seen);
        return;
    }
    let digest = (req.method == "GET")
        .then(|| {
            seen.blob().map(str::to_string).or_else(|| {
                req.target
                    .contains("/manifests/")
                    .then(|| MANIFESTS.to_string())
            })
        })
        .flatten();
    let candidate = digest.as_deref().and_then(|d| {
        let rules = lock(&shared.rules);
        find_rule(&rules, d).map(|i| rules[i].fault.clone())
    });
    let drop_range = candidate == Some(Fault::IgnoreRange);
    let up = match forward(&req, shared.upstream, drop_range) {
        Ok(up) => up,
        Err(e) => {
            let _ = conn.write_all(&error_response(502, "", &format!("fault proxy: {e}")));
            seen.status = 502;
            lock(&shared.seen).push(seen);
            return;
        }
    };
    // Apply a fault only to a successful blob answer, and only then use up the rule.
    let fault = match (&digest, up.status) {
        (Some(d), 200 | 206) => {
            let mut rules = lock(&shared.rules);
            find_rule(&rules, d).map(|i| {
                if let Some(n) = rules[i].times.as_mut() {
                    *n -= 1;
                }
                rules[i].fault.clone()
            })
        }
        _ => None,
    };
    seen.status = up.status;
    seen.fault = fault.clone();
    let body = &up.body;
    let write =
        |conn: &mut TcpStream, bytes: &[u8]| conn.write_all(bytes).and_then(|_| conn.flush());
    match fault {
        None | Some(Fault::IgnoreRange) => {
            let _ = write(&mut conn, &up.raw);
            seen.body_bytes = body.len();
        }
        Some(Fault::ResetAfter(k)) | Some(Fault::CloseAfter(k)) => {
            let k = k.min(body.len());
            let _ = write(&mut conn, head_with_length(&up, body.len()).as_bytes());
            let _ = write(&mut conn, &body[..k]);
            seen.body_bytes = k;
            // Let the client read those bytes before the connection goes.
            std::thread::sleep(Duration::from_millis(300));
            if matches!(seen.fault, Some(Fault::ResetAfter(_))) {
                reset(conn);
            } else {
                let _ = conn.shutdown(Shutdown::Both);
            }
        }
        Some(Fault::ShortLength(k)) => {
            let k = k.min(body.len());
            let _ = write(&mut conn, head_with_length(&up, k).as_bytes());
            let _ = write(&mut conn, &body[..k]);
            seen.body_bytes = k;
        }
        Some(Fault::Status {
            status,
            retry_after,
        }) => {
            let extra = retry_after
                .map(|s| format!("Retry-After: {s}\r\n"))
                .unwrap_or_default();
            let _ = write(
                &mut conn,
                &error_response(status, &extra, "injected by the fault proxy"),
            );
            seen.status = status;
        }
        Some(Fault::FlipByte) => {
            let mut spoiled = body.clone();
            if let Some(b) = spoiled.get_mut(body.len() / 2) {
                *b ^= 0xff;
            }
            let _ = write(&mut conn, head_with_length(&up, spoiled.len()).as_bytes());
            let _ = write(&mut conn, &spoiled);
            seen.body_bytes = spoiled.len();
        }
        Some(Fault::Trickle { bytes_per_sec }) => {
            let _ = write(&mut conn, head_with_length(&up, body.len()).as_bytes());
            let piece = 256;
            let pause = Duration::from_secs_f64(piece as f64 / bytes_per_sec.max(1) as f64);
            for (i, chunk) in body.chunks(piece).enumerate() {
                if i > 0 {
                    std::thread::sleep(pause);
                }
                if write(&mut conn, chunk).is_err() {
                    break;
                }
                seen.body_bytes += chunk.len();
            }
        }
        Some(Fault::Html) => {
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{LOGIN_PAGE}",
                LOGIN_PAGE.len()
            );
            let _ = write(&mut conn, resp.as_bytes());
            seen.body_bytes = LOGIN_PAGE.len();
        }
        Some(Fault::Endless) => {
            let mut head = head_with_length(&up, 0);
            head = head.replace("Content-Length: 0\r\n", "");
            let _ = write(&mut conn, head.as_bytes());
            if write(&mut conn, body).is_ok() {
                seen.body_bytes = body.len();
                let zeros = vec![0u8; 64 * 1024];
                while seen.body_bytes < ENDLESS_CAP && write(&mut conn, &zeros).is_ok() {
                    seen.body_bytes += zeros.len();
                }
            }
        }
        Some(Fault::Redirect) => {
            let d = digest.clone().unwrap_or_default();
            if up.status == 200 {
                lock(&shared.redirect_blobs).insert(d.clone(), body.clone());
            }
            let location = format!(
                "http://127.0.0.1:{}/cdn/{d}?signature=hakim-e2e",
                shared.redirect_port
            );
            let resp = format!(
                "HTTP/1.1 307 Temporary Redirect\r\nLocation: {location}\r\nContent-Length: 0\r\n\
                 Connection: close\r\n\r\n"
            );
            let _ = write(&mut conn, resp.as_bytes());
            seen.status = 307;
        }
    }
    lock(&shared.seen).push(seen);
}

/// Answers an upload request according to `fault`; returns the status sent.
fn spoil_upload(conn: &mut TcpStream, req: &Request, fault: &UploadFault, shared: &Shared) -> u16 {
    let (status, bytes) = match fault {
        UploadFault::Respond {
            status,
            content_type,
            body,
        } => (
            *status,
            format!(
                "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{body}",
                reason(*status),
                body.len()
            )
            .into_bytes(),
        ),
        UploadFault::LoseAnswer(status) => {
            let note = match forward(req, shared.upstream, false) {
                Ok(up) => format!("the registry answered {}; lost", up.status),
                Err(e) => format!("forwarding failed: {e}"),
            };
            (*status, error_response(*status, "", &note))
        }
        UploadFault::AddHeader { name, value } => match forward(req, shared.upstream, false) {
            Ok(up) => {
                // After the status line.
                let head = head_with_length(&up, up.body.len()).replacen(
                    "\r\n",
                    &format!("\r\n{name}: {value}\r\n"),
                    1,
                );
                let mut bytes = head.into_bytes();
                bytes.extend_from_slice(&up.body);
                (up.status, bytes)
            }
            Err(e) => (502, error_response(502, "", &format!("fault proxy: {e}"))),
        },
        UploadFault::Redirect => (
            307,
            format!(
                "HTTP/1.1 307 Temporary Redirect\r\nLocation: http://127.0.0.1:{}{}\r\n\
                 Content-Length: 0\r\nConnection: close\r\n\r\n",
                shared.redirect_port, req.target
            )
            .into_bytes(),
        ),
    };
    let _ = conn.write_all(&bytes).and_then(|_| conn.flush());
    status
}

// ---------------------------------------------------------------------------------------------
// The redirect target
// ---------------------------------------------------------------------------------------------

fn serve_target(mut conn: TcpStream, shared: &Shared) {
    let Some(req) = read_request(&mut conn) else {
        return;
    };
    let mut seen = Seen {
        at: Instant::now(),
        method: req.method.clone(),
        path: req.target.clone(),
        range: req.header("range").map(str::to_string),
        authorization: req.header("authorization").is_some(),
        status: 0,
        fault: None,
        upload_fault: None,
        body_bytes: 0,
    };
    // A redirected upload: forwarded to the registry as it arrived.
    if req.target.starts_with("/v2/") && req.method != "GET" && req.method != "HEAD" {
        match forward(&req, shared.upstream, false) {
            Ok(up) => {
                let _ = conn.write_all(&up.raw).and_then(|_| conn.flush());
                seen.status = up.status;
                seen.body_bytes = up.body.len();
            }
            Err(e) => {
                let _ = conn.write_all(&error_response(502, "", &format!("redirect target: {e}")));
                seen.status = 502;
            }
        }
        let _ = conn.shutdown(Shutdown::Both);
        lock(&shared.redirect_seen).push(seen);
        return;
    }
    let blob = seen
        .blob()
        .and_then(|d| lock(&shared.redirect_blobs).get(d).cloned());
    let resp = match blob {
        None => error_response(404, "", "blob unknown to the redirect target"),
        Some(bytes) => {
            let start = seen
                .range
                .as_deref()
                .and_then(|r| r.strip_prefix("bytes="))
                .and_then(|r| r.strip_suffix('-'))
                .and_then(|n| n.parse::<usize>().ok());
            let (status, extra, body) = match start {
                None => (200, String::new(), &bytes[..]),
                Some(n) if n < bytes.len() => (
                    206,
                    format!(
                        "Content-Range: bytes {n}-{}/{}\r\n",
                        bytes.len() - 1,
                        bytes.len()
                    ),
                    &bytes[n..],
                ),
                Some(_) => (
                    416,
                    format!("Content-Range: bytes */{}\r\n", bytes.len()),
                    &[][..],
                ),
            };
            seen.body_bytes = if req.method == "HEAD" { 0 } else { body.len() };
            let mut r = format!(
                "HTTP/1.1 {status} {}\r\nContent-Type: application/octet-stream\r\n\
                 Content-Length: {}\r\n{extra}Connection: close\r\n\r\n",
                reason(status),
                body.len()
            )
            .into_bytes();
            if req.method != "HEAD" {
                r.extend_from_slice(body);
            }
            r
        }
    };
    seen.status = resp
        .split(|b| *b == b' ')
        .nth(1)
        .and_then(|s| std::str::from_utf8(s).ok()?.parse().ok())
        .unwrap_or(0);
    let _ = conn.write_all(&resp).and_then(|_| conn.flush());
    let _ = conn.shutdown(Shutdown::Both);
    lock(&shared.redirect_seen).push(seen);
}

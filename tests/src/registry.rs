//! Harness for the registry end-to-end tests of `hakim-convert` (see `tests/tests/registry.rs`).
//!
//! [`Registry`] runs the Debian `docker-registry` (Distribution 2.8) on 127.0.0.1, on a free
//! port, with its storage, configuration and logs in a temporary directory, in one of three
//! [`Mode`]s:
//!
//! * [`Mode::Plain`]: plain HTTP, anonymous pull and push;
//! * [`Mode::HttpsBasic`]: HTTPS with a self-signed certificate (`openssl req -x509`, SAN
//!   `DNS:localhost,IP:127.0.0.1`) and bcrypt htpasswd basic auth;
//! * [`Mode::Token`]: plain HTTP with `auth.token` pointing at [`TokenServer`], a small token
//!   server written here (the GHCR flow: `401` + `WWW-Authenticate: Bearer realm,service,scope`,
//!   then `GET /token?service=…&scope=repository:NAME:pull`). Anonymous requests are granted
//!   `pull`; requests with the right Basic credentials `pull` and `push`; wrong credentials get
//!   `401`; repositories named with [`TokenServer::deny`] get nothing. Tokens are RS256 JWTs signed with `openssl dgst -sha256 -sign`, with the signing
//!   certificate in the `x5c` header. Every request it receives is recorded.
//!
//! The registry's access log (combined log format, its stdout) is kept so tests can check what
//! it answered ([`Registry::access_log`]). Images are pushed with skopeo ([`Registry::push`]);
//! the local images come from `hakim-convert demo` ([`demo_image`]), the e2e test image
//! ([`crate::test_image`]), and are derived from those with skopeo and umoci ([`arm64_variant`],
//! [`derived_image`], [`multiarch_layout`], [`recompressed_layout`]).
//!
//! Cleanup: the registry runs under a `sh` wrapper whose stdin is a pipe from this process; when
//! the pipe closes (on drop, or when the test process dies for any reason) the wrapper sends
//! SIGTERM to the registry's pid and waits for it. Drop also waits for the wrapper, killing it by
//! pid if it hangs. Temporary directories are removed unless `HAKIM_E2E_KEEP=1`.
//!
//! Gating: [`registry_ready`] needs `docker-registry`, `skopeo`, `openssl`, `htpasswd` and
//! `umoci`; [`converter_ready`] needs a `hakim-convert` whose `convert --help` offers
//! `--cache-dir` (the registry transport). Missing ones skip, or fail under `HAKIM_E2E=1`.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::{converter_bin, find_on_path, gate, run_ok, scratch_dir, show};

/// Tools the registry tests run (besides the converter).
pub const REGISTRY_TOOLS: &[&str] = &["docker-registry", "skopeo", "openssl", "htpasswd", "umoci"];

/// The user and password accepted by the htpasswd and token modes.
pub const USER: &str = "hakim";
pub const PASSWORD: &str = "e2e-s3cret-Pa55";

/// `service` and `issuer` of the token mode.
pub const SERVICE: &str = "hakim-e2e-registry";
pub const ISSUER: &str = "hakim-e2e-token-issuer";

/// `true` when every tool in [`REGISTRY_TOOLS`] is on `PATH` (see [`gate`]).
pub fn registry_ready() -> bool {
    static MISSING: OnceLock<Vec<String>> = OnceLock::new();
    let missing = MISSING.get_or_init(|| {
        REGISTRY_TOOLS
            .iter()
            .filter(|t| find_on_path(t).is_none())
            .map(|t| t.to_string())
            .collect()
    });
    gate(missing)
}

/// `true` when the converter has the registry transport (`convert --help` mentions
/// `--cache-dir`) (see [`gate`]).
pub fn converter_ready() -> bool {
    static MISSING: OnceLock<Vec<String>> = OnceLock::new();
    let missing = MISSING.get_or_init(|| {
        let bin = converter_bin();
        let help = Command::new(&bin)
            .args(["convert", "--help"])
            .stdin(Stdio::null())
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        if help.contains("--cache-dir") {
            Vec::new()
        } else {
            vec![format!(
                "registry transport in {} (`convert --help` has no --cache-dir)",
                bin.display()
            )]
        }
    });
    gate(missing)
}

/// How the registry authenticates and serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Plain HTTP, no authentication.
    Plain,
    /// HTTPS (self-signed certificate) and bcrypt htpasswd basic auth.
    HttpsBasic,
    /// Plain HTTP and bearer tokens from [`TokenServer`].
    Token,
}

impl Mode {
    pub const ALL: [Mode; 3] = [Mode::Plain, Mode::HttpsBasic, Mode::Token];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Plain => "plain-http",
            Mode::HttpsBasic => "https-basic",
            Mode::Token => "token",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Small encoders
// ---------------------------------------------------------------------------------------------

const B64_STD: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const B64_URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

fn b64(data: &[u8], alphabet: &[u8; 64], pad: bool) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let n = chunk.len();
        let v = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= n {
                out.push(alphabet[((v >> (18 - 6 * i)) & 63) as usize] as char);
            } else if pad {
                out.push('=');
            }
        }
    }
    out
}

/// Standard base64 with padding.
pub fn base64_std(data: &[u8]) -> String {
    b64(data, B64_STD, true)
}

/// base64url without padding (JWT segments).
pub fn base64_url(data: &[u8]) -> String {
    b64(data, B64_URL, false)
}

/// Decodes standard or url-safe base64, with or without padding.
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for c in text.trim().bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            b'=' => break,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match (b[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `key=value` pairs of a query string, decoded, in order (keys may repeat, like `scope`).
pub fn parse_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (percent_decode(k), percent_decode(v)),
            None => (percent_decode(p), String::new()),
        })
        .collect()
}

/// Lowercase hex sha256 of bytes.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

/// `"…"` for YAML (paths and URLs without control characters).
fn yaml_str(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// A self-signed RSA certificate and key (`CN=localhost`, SAN `DNS:localhost,IP:127.0.0.1`).
fn self_signed_cert(dir: &Path, stem: &str) -> (PathBuf, PathBuf) {
    let cert = dir.join(format!("{stem}-cert.pem"));
    let key = dir.join(format!("{stem}-key.pem"));
    run_ok(
        Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .args([
                "-subj",
                "/CN=localhost",
                "-addext",
                "subjectAltName=DNS:localhost,IP:127.0.0.1",
                // A server certificate, not a CA: rustls (like browsers) refuses a CA
                // certificate used as the server's own (CaUsedAsEndEntity), which
                // plain `openssl req -x509` makes by default. docs/converter.md says so.
                "-addext",
                "basicConstraints=critical,CA:FALSE",
            ]),
    );
    (cert, key)
}

// ---------------------------------------------------------------------------------------------
// Minimal HTTP client (the harness's own probes)
// ---------------------------------------------------------------------------------------------

/// One HTTP response.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// First header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn parse(raw: &[u8]) -> Option<Response> {
        let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
        let head = String::from_utf8_lossy(&raw[..end]);
        let mut lines = head.split("\r\n");
        let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        Some(Response {
            status,
            headers,
            body: raw[end + 4..].to_vec(),
        })
    }
}

fn http_request_text(port: u16, path: &str, headers: &[(&str, &str)]) -> String {
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: hakim-e2e-harness\r\nConnection: close\r\n"
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req
}

/// `GET http://127.0.0.1:PORT/PATH` over a plain `TcpStream` (`Connection: close`).
pub fn http_get(port: u16, path: &str, headers: &[(&str, &str)]) -> std::io::Result<Response> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(http_request_text(port, path, headers).as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    Response::parse(&raw).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "not an HTTP response: {:?}",
                String::from_utf8_lossy(&raw[..raw.len().min(200)])
            ),
        )
    })
}

/// `GET https://127.0.0.1:PORT/PATH` through `openssl s_client`, verifying the server
/// certificate against `ca` for IP 127.0.0.1 (HTTP/1.1 by ALPN).
pub fn https_get(
    port: u16,
    ca: &Path,
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<Response> {
    let mut child = Command::new("openssl")
        .args(["s_client", "-connect"])
        .arg(format!("127.0.0.1:{port}"))
        .args(["-servername", "localhost", "-CAfile"])
        .arg(ca)
        .args([
            "-verify_return_error",
            "-verify_ip",
            "127.0.0.1",
            "-quiet",
            "-alpn",
            "http/1.1",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(http_request_text(port, path, headers).as_bytes())?;
    let out = child.wait_with_output()?;
    Response::parse(&out.stdout).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "openssl s_client ({}): no HTTP response; stderr: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        )
    })
}

// ---------------------------------------------------------------------------------------------
// Token server
// ---------------------------------------------------------------------------------------------

/// One request the token server received.
#[derive(Clone, Debug)]
pub struct TokenRequest {
    pub method: String,
    pub path: String,
    /// Raw query string (still percent-encoded).
    pub query: String,
    /// An `Authorization` header was present.
    pub authorization: bool,
    /// The user of a Basic `Authorization` header (whether or not the password was right).
    pub user: Option<String>,
    /// `service=` parameter.
    pub service: Option<String>,
    /// Every `scope=` parameter, decoded.
    pub scopes: Vec<String>,
    /// Status answered.
    pub status: u16,
    /// `(repository, actions)` granted in the token.
    pub granted: Vec<(String, Vec<String>)>,
    /// The token issued (a test checks that no log shows it).
    pub token: Option<String>,
}

/// The GHCR-style token endpoint (`GET /token`), on 127.0.0.1.
pub struct TokenServer {
    pub port: u16,
    requests: Arc<Mutex<Vec<TokenRequest>>>,
    /// Repositories nobody is granted anything on.
    denied: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

struct Signer {
    key: PathBuf,
    /// Standard base64 of the DER certificate (`x5c`).
    x5c: String,
    counter: AtomicU64,
}

impl Signer {
    fn jwt(&self, user: Option<&str>, access: &[(String, Vec<String>)]) -> Result<String, String> {
        let now = unix_now();
        let jti = format!(
            "{}-{}-{}",
            std::process::id(),
            now,
            self.counter.fetch_add(1, Ordering::Relaxed)
        );
        let header = json!({"typ": "JWT", "alg": "RS256", "x5c": [self.x5c]});
        let access: Vec<Value> = access
            .iter()
            .map(|(name, actions)| json!({"type": "repository", "name": name, "actions": actions}))
            .collect();
        let claims = json!({
            "iss": ISSUER,
            "sub": user.unwrap_or(""),
            "aud": SERVICE,
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": jti,
            "access": access,
        });
        let input = format!(
            "{}.{}",
            base64_url(header.to_string().as_bytes()),
            base64_url(claims.to_string().as_bytes())
        );
        let mut child = Command::new("openssl")
            .args(["dgst", "-sha256", "-sign"])
            .arg(&self.key)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run openssl dgst: {e}"))?;
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(input.as_bytes())
            .map_err(|e| e.to_string())?;
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        if !out.status.success() || out.stdout.is_empty() {
            return Err(format!(
                "openssl dgst -sign failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(format!("{input}.{}", base64_url(&out.stdout)))
    }
}

impl TokenServer {
    /// Starts the server; `key`/`cert` sign the tokens (PEM).
    pub fn start(key: &Path, cert: &Path) -> TokenServer {
        let der = run_ok(
            Command::new("openssl")
                .args(["x509", "-outform", "DER", "-in"])
                .arg(cert),
        )
        .stdout;
        let signer = Signer {
            key: key.to_path_buf(),
            x5c: base64_std(&der),
            counter: AtomicU64::new(0),
        };
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind token server");
        let port = listener.local_addr().expect("local addr").port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let denied = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let requests = Arc::clone(&requests);
            let denied = Arc::clone(&denied);
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    if let Ok(conn) = conn {
                        let denied = denied.lock().unwrap_or_else(|e| e.into_inner()).clone();
                        if let Some(req) = serve_token(conn, &signer, &denied) {
                            requests.lock().unwrap_or_else(|e| e.into_inner()).push(req);
                        }
                    }
                }
            })
        };
        TokenServer {
            port,
            requests,
            denied,
            stop,
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:PORT/token`
    pub fn realm(&self) -> String {
        format!("http://127.0.0.1:{}/token", self.port)
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<TokenRequest> {
        self.requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// From now on, grant nothing on `repository` (to anyone).
    pub fn deny(&self, repository: &str) {
        self.denied
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(repository.to_string());
    }

    /// Forget the requests received so far.
    pub fn clear(&self) {
        self.requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reads one request, answers it, returns what it saw (`None` for a connection without a
/// request, e.g. the shutdown wake-up).
fn serve_token(mut conn: TcpStream, signer: &Signer, denied: &[String]) -> Option<TokenRequest> {
    conn.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    while !raw.windows(4).any(|w| w == b"\r\n\r\n") {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
        }
        if raw.len() > 64 * 1024 {
            break;
        }
    }
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split_whitespace();
    let method = first.next()?.to_string();
    let target = first.next()?.to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), q.to_string()),
        None => (target.clone(), String::new()),
    };
    let params = parse_query(&query);
    let authorization = headers.iter().find(|(k, _)| k == "authorization");
    let basic = authorization.and_then(|(_, v)| {
        let (scheme, rest) = v.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("basic") {
            return None;
        }
        let decoded = String::from_utf8(base64_decode(rest)?).ok()?;
        let (u, p) = decoded.split_once(':')?;
        Some((u.to_string(), p.to_string()))
    });
    let mut req = TokenRequest {
        method: method.clone(),
        path: path.clone(),
        query: query.clone(),
        authorization: authorization.is_some(),
        user: basic.as_ref().map(|(u, _)| u.clone()),
        service: params
            .iter()
            .find(|(k, _)| k == "service")
            .map(|(_, v)| v.clone()),
        scopes: params
            .iter()
            .filter(|(k, _)| k == "scope")
            .flat_map(|(_, v)| v.split(' ').map(str::to_string).collect::<Vec<_>>())
            .filter(|s| !s.is_empty())
            .collect(),
        status: 0,
        granted: Vec::new(),
        token: None,
    };

    let (status, body) = if method != "GET" || path != "/token" {
        (
            404,
            json!({"errors": [{"code": "NOT_FOUND", "message": "only GET /token"}]}),
        )
    } else if authorization.is_some()
        && basic.as_ref() != Some(&(USER.to_string(), PASSWORD.to_string()))
    {
        (
            401,
            json!({"errors": [{"code": "UNAUTHORIZED", "message": "invalid username or password"}]}),
        )
    } else if req.service.as_deref() != Some(SERVICE) {
        (
            400,
            json!({"errors": [{"code": "DENIED", "message": "unknown service"}]}),
        )
    } else {
        let allowed: &[&str] = if basic.is_some() {
            &["pull", "push"]
        } else {
            &["pull"]
        };
        for scope in &req.scopes {
            let Some(rest) = scope.strip_prefix("repository:") else {
                continue;
            };
            let Some((name, actions)) = rest.rsplit_once(':') else {
                continue;
            };
            let granted: Vec<String> = actions
                .split(',')
                .filter(|a| allowed.contains(a) && !denied.iter().any(|d| d == name))
                .map(str::to_string)
                .collect();
            req.granted.push((name.to_string(), granted));
        }
        match signer.jwt(req.user.as_deref(), &req.granted) {
            Ok(jwt) => (200, {
                req.token = Some(jwt.clone());
                json!({
                "token": jwt,
                "access_token": jwt,
                "expires_in": 300,
                "issued_at": hakim_convert::ociout::rfc3339(unix_now()),
                })
            }),
            Err(e) => (500, json!({"errors": [{"code": "UNKNOWN", "message": e}]})),
        }
    };
    req.status = status;
    let body = body.to_string();
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        _ => "Internal Server Error",
    };
    let mut resp = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if status == 401 {
        resp.push_str("WWW-Authenticate: Basic realm=\"hakim-e2e-token\"\r\n");
    }
    resp.push_str("\r\n");
    resp.push_str(&body);
    let _ = conn.write_all(resp.as_bytes());
    let _ = conn.shutdown(Shutdown::Both);
    Some(req)
}

// ---------------------------------------------------------------------------------------------
// Registry
// ---------------------------------------------------------------------------------------------

/// One line of the registry's access log.
#[derive(Clone, Debug)]
pub struct AccessLogEntry {
    pub method: String,
    pub uri: String,
    pub status: u16,
    pub user_agent: String,
}

impl AccessLogEntry {
    /// `127.0.0.1 - - [date] "GET /v2/ HTTP/1.1" 200 2 "" "curl/7.88.1"`
    fn parse(line: &str) -> Option<AccessLogEntry> {
        let q1 = line.find('"')?;
        let rest = &line[q1 + 1..];
        let q2 = rest.find('"')?;
        let mut request = rest[..q2].split_whitespace();
        let method = request.next()?.to_string();
        let uri = request.next()?.to_string();
        let after = &rest[q2 + 1..];
        let status = after.split_whitespace().next()?.parse().ok()?;
        let user_agent = after
            .trim_end()
            .strip_suffix('"')
            .and_then(|s| s.rfind('"').map(|i| s[i + 1..].to_string()))
            .unwrap_or_default();
        Some(AccessLogEntry {
            method,
            uri,
            status,
            user_agent,
        })
    }
}

/// A running `docker-registry` on 127.0.0.1 (see the module docs).
pub struct Registry {
    pub mode: Mode,
    pub port: u16,
    /// The token server (token mode).
    pub token: Option<TokenServer>,
    /// The TLS certificate (HTTPS mode): pass as `--ca-cert`.
    pub tls_cert: Option<PathBuf>,
    /// Directory holding `ca.crt` for skopeo's `--cert-dir` (HTTPS mode).
    pub cert_dir: Option<PathBuf>,
    proc: Option<RegistryProcess>,
    /// Config, storage (`data/`), certificates, logs, client-side files. Declared last: removed
    /// after the registry has stopped.
    pub dir: tempfile::TempDir,
}

/// The `sh` wrapper and the registry it started.
struct RegistryProcess {
    wrapper: Child,
    stdin: Option<ChildStdin>,
    /// The registry's own pid (child of the wrapper); 0 until known.
    pid: u32,
}

impl RegistryProcess {
    /// `docker-registry serve CONFIG` under the wrapper, which SIGTERMs it and waits for it when
    /// its stdin closes (on [`RegistryProcess::stop`], or when this process dies).
    fn spawn(root: &Path, config: &Path) -> RegistryProcess {
        let pid_file = root.join("registry.pid");
        let _ = fs::remove_file(&pid_file);
        let mut wrapper = Command::new("sh")
            .arg("-c")
            .arg(
                "docker-registry serve \"$1\" >>\"$2\" 2>>\"$3\" & pid=$!; \
                 echo $pid >\"$4.tmp\" && mv \"$4.tmp\" \"$4\"; \
                 read -r _ || :; kill -TERM $pid 2>/dev/null; wait $pid",
            )
            .arg("sh")
            .arg(config)
            .arg(root.join("registry.out"))
            .arg(root.join("registry.err"))
            .arg(&pid_file)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn sh for docker-registry");
        let stdin = wrapper.stdin.take();
        RegistryProcess {
            wrapper,
            stdin,
            pid: 0,
        }
    }

    /// Waits until `/v2/` answers 200 or 401. `Err((message, port_in_use))` otherwise.
    fn wait_ready(
        &mut self,
        root: &Path,
        port: u16,
        tls_cert: Option<&Path>,
        timeout: Duration,
    ) -> Result<(), (String, bool)> {
        let deadline = Instant::now() + timeout;
        let stderr = || fs::read_to_string(root.join("registry.err")).unwrap_or_default();
        loop {
            if self.pid == 0 {
                if let Ok(s) = fs::read_to_string(root.join("registry.pid")) {
                    self.pid = s.trim().parse().unwrap_or(0);
                }
            }
            if self.pid != 0 {
                let probe = match tls_cert {
                    Some(ca) => https_get(port, ca, "/v2/", &[]),
                    None => http_get(port, "/v2/", &[]),
                };
                match probe {
                    Ok(r) if r.status == 200 || r.status == 401 => return Ok(()),
                    // Another server (another test run on this machine) took the port
                    // between free_port() and the registry's bind: try another port.
                    Ok(r) => return Err((format!("GET /v2/ answered {}", r.status), true)),
                    Err(_) => {}
                }
                if !Path::new(&format!("/proc/{}", self.pid)).exists() {
                    let err = stderr();
                    let in_use = err.contains("address already in use");
                    return Err((format!("docker-registry exited:\n{err}"), in_use));
                }
            }
            if Instant::now() > deadline {
                return Err((
                    format!(
                        "/v2/ not answering after {timeout:?}; stderr:\n{}",
                        stderr()
                    ),
                    false,
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(&mut self) {
        // Closing the pipe makes the wrapper SIGTERM the registry and wait for it.
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.wrapper.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => break,
            }
        }
        // Hung: kill the registry and then the wrapper, by pid.
        if self.pid != 0 {
            let _ = Command::new("kill")
                .args(["-KILL", &self.pid.to_string()])
                .stdin(Stdio::null())
                .status();
        }
        let _ = self.wrapper.kill();
        let _ = self.wrapper.wait();
    }
}

/// Optional registry settings.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// `http.relativeurls: true`: `Location` headers are relative (`/v2/…`).
    pub relative_urls: bool,
}

impl Registry {
    /// Starts a registry in `mode` and waits until `/v2/` answers 200 or 401.
    pub fn start(mode: Mode) -> Registry {
        Registry::start_with(mode, Options::default())
    }

    /// [`Registry::start`] with `options`.
    pub fn start_with(mode: Mode, options: Options) -> Registry {
        let started = Instant::now();
        let dir = scratch_dir(&format!("registry-{}-", mode.name()));
        let root = dir.path().to_path_buf();
        fs::create_dir_all(root.join("data")).expect("create registry storage");
        let mut tls_cert = None;
        let mut cert_dir = None;
        let mut token = None;
        let mut auth = String::new();
        let mut tls = String::new();
        match mode {
            Mode::Plain => {}
            Mode::HttpsBasic => {
                let (cert, key) = self_signed_cert(&root, "tls");
                let certs = root.join("certs.d");
                fs::create_dir_all(&certs).expect("create cert dir");
                fs::copy(&cert, certs.join("ca.crt")).expect("copy ca.crt");
                let htpasswd = root.join("htpasswd");
                run_ok(
                    Command::new("htpasswd")
                        .arg("-Bbc")
                        .arg(&htpasswd)
                        .args([USER, PASSWORD]),
                );
                tls = format!(
                    "  tls:\n    certificate: {}\n    key: {}\n",
                    yaml_str(&cert.to_string_lossy()),
                    yaml_str(&key.to_string_lossy())
                );
                auth = format!(
                    "auth:\n  htpasswd:\n    realm: hakim-e2e\n    path: {}\n",
                    yaml_str(&htpasswd.to_string_lossy())
                );
                tls_cert = Some(cert);
                cert_dir = Some(certs);
            }
            Mode::Token => {
                let (cert, key) = self_signed_cert(&root, "token-signing");
                let server = TokenServer::start(&key, &cert);
                auth = format!(
                    "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
                    yaml_str(&server.realm()),
                    yaml_str(SERVICE),
                    yaml_str(ISSUER),
                    yaml_str(&cert.to_string_lossy())
                );
                token = Some(server);
            }
        }
        for sub in ["client", "client/cache", "client/config", "client/docker"] {
            fs::create_dir_all(root.join(sub)).expect("create client dir");
        }
        fs::write(root.join("client/auth.json"), "{\"auths\":{}}\n").expect("write auth.json");

        let relative = if options.relative_urls {
            "  relativeurls: true\n"
        } else {
            ""
        };
        let config = root.join("config.yml");
        let mut last_err = String::new();
        for _attempt in 0..5 {
            let port = free_port();
            fs::write(
                &config,
                format!(
                    "version: 0.1\n\
                     log:\n  level: info\n  accesslog:\n    disabled: false\n\
                     storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n  maintenance:\n    uploadpurging:\n      enabled: false\n\
                     http:\n  addr: 127.0.0.1:{port}\n  secret: hakim-e2e-test-only\n{relative}{tls}{auth}",
                    yaml_str(&root.join("data").to_string_lossy())
                ),
            )
            .expect("write registry config");
            let mut proc = RegistryProcess::spawn(&root, &config);
            match proc.wait_ready(&root, port, tls_cert.as_deref(), Duration::from_secs(20)) {
                Ok(()) => {
                    eprintln!(
                        "registry ({}) up on 127.0.0.1:{port} (pid {}) after {:.2} s",
                        mode.name(),
                        proc.pid,
                        started.elapsed().as_secs_f64()
                    );
                    return Registry {
                        mode,
                        port,
                        token,
                        tls_cert,
                        cert_dir,
                        proc: Some(proc),
                        dir,
                    };
                }
                Err((e, port_in_use)) => {
                    proc.stop();
                    last_err = e;
                    if !port_in_use {
                        break;
                    }
                }
            }
        }
        panic!(
            "docker-registry ({}) did not start: {last_err}",
            mode.name()
        );
    }

    /// The registry's pid (0 once stopped).
    pub fn pid(&self) -> u32 {
        self.proc.as_ref().map_or(0, |p| p.pid)
    }

    /// `127.0.0.1:PORT`
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `docker://127.0.0.1:PORT/REFERENCE` (`REFERENCE` = `name:tag` or `name@digest`).
    pub fn docker_ref(&self, reference: &str) -> String {
        format!("docker://{}/{reference}", self.host())
    }

    /// `USER:PASSWORD`
    pub fn creds(&self) -> String {
        format!("{USER}:{PASSWORD}")
    }

    /// GET a path from the registry (a plain `TcpStream`, or `openssl s_client` for HTTPS).
    pub fn get(&self, path: &str, headers: &[(&str, &str)]) -> std::io::Result<Response> {
        match &self.tls_cert {
            Some(ca) => https_get(self.port, ca, path, headers),
            None => http_get(self.port, path, headers),
        }
    }

    /// The registry's stderr (its structured log).
    pub fn stderr_log(&self) -> String {
        fs::read_to_string(self.dir.path().join("registry.err")).unwrap_or_default()
    }

    /// Number of access-log lines so far (a mark for [`Registry::access_log_since`]).
    pub fn access_log_mark(&self) -> usize {
        self.access_log().len()
    }

    /// The access log (combined log format), parsed.
    pub fn access_log(&self) -> Vec<AccessLogEntry> {
        fs::read_to_string(self.dir.path().join("registry.out"))
            .unwrap_or_default()
            .lines()
            .filter_map(AccessLogEntry::parse)
            .collect()
    }

    /// Access-log lines after `mark`.
    pub fn access_log_since(&self, mark: usize) -> Vec<AccessLogEntry> {
        self.access_log().into_iter().skip(mark).collect()
    }

    /// skopeo options for this registry as a destination (`dest`) or source (`src`); `None` for
    /// the unprefixed options of `skopeo inspect` (and of `buildah bud`/`push`, which share them).
    pub fn skopeo_args(&self, prefix: Option<&str>, with_creds: bool) -> Vec<String> {
        let p = |name: &str| match prefix {
            Some(pre) => format!("--{pre}-{name}"),
            None => format!("--{name}"),
        };
        let mut args = Vec::new();
        match self.mode {
            Mode::Plain | Mode::Token => args.push(format!("{}=false", p("tls-verify"))),
            Mode::HttpsBasic => {
                args.push(p("cert-dir"));
                args.push(
                    self.cert_dir
                        .as_ref()
                        .expect("cert dir")
                        .to_string_lossy()
                        .into_owned(),
                );
            }
        }
        if with_creds && self.mode != Mode::Plain {
            args.push(p("creds"));
            args.push(self.creds());
        }
        args
    }

    /// Environment for the client tools (skopeo, the converter): no user credentials, no
    /// proxies for 127.0.0.1.
    pub fn client_env(&self) -> Vec<(String, String)> {
        let client = self.dir.path().join("client");
        let s = |p: &Path| p.to_string_lossy().into_owned();
        vec![
            ("HOME".into(), s(&client)),
            ("XDG_CACHE_HOME".into(), s(&client.join("cache"))),
            ("XDG_RUNTIME_DIR".into(), s(&client)),
            ("XDG_CONFIG_HOME".into(), s(&client.join("config"))),
            ("REGISTRY_AUTH_FILE".into(), s(&client.join("auth.json"))),
            ("DOCKER_CONFIG".into(), s(&client.join("docker"))),
            ("NO_PROXY".into(), "127.0.0.1,localhost".into()),
            ("no_proxy".into(), "127.0.0.1,localhost".into()),
        ]
    }

    /// `skopeo copy [EXTRA…] SRC docker://HOST/DEST` with this registry's TLS options and
    /// credentials; returns the pushed manifest (or index) digest.
    ///
    /// Unless `EXTRA` converts the manifest (`--format`), adds `--preserve-digests`: the
    /// registry then holds exactly the source's blobs and manifests. Without it skopeo
    /// compresses uncompressed layers, and its blob-info cache substitutes blobs it knows the
    /// registry has in another compression (a zstd layout pushed after a gzip one comes out with
    /// gzip layers).
    pub fn push(&self, src: &str, dest: &str, extra: &[&str]) -> String {
        let digest_file = self.dir.path().join("client/digest");
        let started = Instant::now();
        let preserve: &[&str] = if extra.contains(&"--format") {
            &[]
        } else {
            &["--preserve-digests"]
        };
        run_ok(
            Command::new("skopeo")
                .args(["copy", "--quiet", "--retry-times", "0"])
                .arg("--digestfile")
                .arg(&digest_file)
                .args(self.skopeo_args(Some("dest"), true))
                .args(preserve)
                .args(extra)
                .arg(src)
                .arg(self.docker_ref(dest))
                .envs(self.client_env()),
        );
        let digest = fs::read_to_string(&digest_file)
            .expect("skopeo --digestfile")
            .trim()
            .to_string();
        eprintln!(
            "pushed {src} to {} ({digest}) in {:.2} s",
            self.docker_ref(dest),
            started.elapsed().as_secs_f64()
        );
        digest
    }

    /// `skopeo copy docker://HOST/REFERENCE oci-archive:ARCHIVE`, what Proxmox VE's
    /// `oci-registry-pull` runs, with this registry's TLS options and credentials.
    pub fn copy_to_archive(&self, reference: &str, archive: &Path) {
        run_ok(
            Command::new("skopeo")
                .args(["copy", "--quiet", "--retry-times", "0"])
                .args(self.skopeo_args(Some("src"), true))
                .arg(self.docker_ref(reference))
                .arg(format!("oci-archive:{}", archive.display()))
                .envs(self.client_env()),
        );
    }

    /// `skopeo inspect --raw docker://HOST/REFERENCE` (with credentials in the auth modes):
    /// the manifest or index bytes as served.
    pub fn raw_manifest(&self, reference: &str) -> Vec<u8> {
        run_ok(
            Command::new("skopeo")
                .args(["inspect", "--raw", "--retry-times", "0"])
                .args(self.skopeo_args(None, true))
                .arg(self.docker_ref(reference))
                .envs(self.client_env()),
        )
        .stdout
    }

    /// [`Registry::raw_manifest`] parsed.
    pub fn manifest(&self, reference: &str) -> Value {
        let raw = self.raw_manifest(reference);
        serde_json::from_slice(&raw).unwrap_or_else(|e| {
            panic!(
                "manifest of {reference} is not JSON ({e}): {}",
                String::from_utf8_lossy(&raw)
            )
        })
    }

    /// The registry's storage (filesystem driver): `data/docker/registry/v2`.
    pub fn storage(&self) -> PathBuf {
        self.dir.path().join("data/docker/registry/v2")
    }

    /// Whether the blob store holds `digest` (`sha256:…`), in any repository.
    pub fn stores_blob(&self, digest: &str) -> bool {
        let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
        self.storage()
            .join("blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
            .is_file()
    }

    /// Whether the repository `name` exists in storage (anything was ever pushed to it).
    pub fn has_repository(&self, name: &str) -> bool {
        self.storage().join("repositories").join(name).exists()
    }

    /// Whether `name` links the blob `digest` (it was pushed or mounted there).
    pub fn repository_links_blob(&self, name: &str, digest: &str) -> bool {
        let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
        self.storage()
            .join("repositories")
            .join(name)
            .join("_layers/sha256")
            .join(hex)
            .join("link")
            .is_file()
    }

    /// Upload sessions of `name` still open in storage: those holding their `data` or
    /// `startedat` file. (A cancelled session can leave an empty `hashstates/sha256/0` behind:
    /// Distribution 2.8 stores the hash state again while closing the writer it just cancelled.)
    pub fn open_uploads(&self, name: &str) -> Vec<String> {
        let dir = self
            .storage()
            .join("repositories")
            .join(name)
            .join("_uploads");
        let mut out: Vec<String> = fs::read_dir(&dir)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok())
                    .filter(|e| {
                        e.path().join("data").exists() || e.path().join("startedat").exists()
                    })
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        out.sort();
        out
    }

    /// `skopeo inspect --config docker://HOST/REFERENCE`: the image configuration blob, parsed.
    pub fn config(&self, reference: &str) -> Value {
        let out = run_ok(
            Command::new("skopeo")
                .args(["inspect", "--config", "--retry-times", "0"])
                .args(self.skopeo_args(None, true))
                .arg(self.docker_ref(reference))
                .envs(self.client_env()),
        )
        .stdout;
        serde_json::from_slice(&out).unwrap_or_else(|e| {
            panic!(
                "config of {reference} is not JSON ({e}): {}",
                String::from_utf8_lossy(&out)
            )
        })
    }

    /// Stops the registry (its storage stays until drop). Idempotent.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop();
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------------------------
// Manifests
// ---------------------------------------------------------------------------------------------

/// `(digest, size)` of the config and every layer of an image manifest.
pub fn manifest_blobs(manifest: &Value) -> Vec<(String, u64)> {
    let mut blobs = Vec::new();
    let config = &manifest["config"];
    if let (Some(d), Some(s)) = (config["digest"].as_str(), config["size"].as_u64()) {
        blobs.push((d.to_string(), s));
    }
    for layer in manifest["layers"].as_array().into_iter().flatten() {
        if let (Some(d), Some(s)) = (layer["digest"].as_str(), layer["size"].as_u64()) {
            blobs.push((d.to_string(), s));
        }
    }
    blobs
}

/// Unique blobs (by digest) over several manifests.
pub fn unique_blobs(manifests: &[&Value]) -> BTreeMap<String, u64> {
    manifests.iter().flat_map(|m| manifest_blobs(m)).collect()
}

/// `GET …/blobs/sha256:…` lines answered 200 in the access log, counted by digest.
pub fn blob_fetches(log: &[AccessLogEntry]) -> BTreeMap<String, usize> {
    let mut fetched = BTreeMap::new();
    for e in log {
        if e.method == "GET" && e.status == 200 {
            if let Some((_, digest)) = e.uri.split_once("/blobs/") {
                *fetched
                    .entry(digest.split('?').next().unwrap_or(digest).to_string())
                    .or_insert(0) += 1;
            }
        }
    }
    fetched
}

/// Every blob of `manifest` fetched exactly once, nothing else fetched.
pub fn assert_each_blob_fetched_once(log: &[AccessLogEntry], blobs: &BTreeMap<String, u64>) {
    let fetched = blob_fetches(log);
    let twice: Vec<_> = fetched.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "blobs fetched more than once: {twice:?}");
    let missing: Vec<_> = blobs.keys().filter(|d| !fetched.contains_key(*d)).collect();
    let extra: Vec<_> = fetched.keys().filter(|d| !blobs.contains_key(*d)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "blob GETs differ from the manifest's blobs: never fetched {missing:?}, unexpected {extra:?}"
    );
}

/// Media types of a manifest's layers.
pub fn layer_media_types(manifest: &Value) -> Vec<String> {
    manifest["layers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l["mediaType"].as_str().map(str::to_string))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Local images
// ---------------------------------------------------------------------------------------------

/// An image in a local OCI layout.
#[derive(Clone, Debug)]
pub struct LocalImage {
    pub layout: PathBuf,
    /// `org.opencontainers.image.ref.name` to select, or `None` for the only manifest.
    pub tag: Option<String>,
}

impl LocalImage {
    /// `oci:LAYOUT[:TAG]` — for skopeo and for the converter.
    pub fn oci_ref(&self) -> String {
        match &self.tag {
            Some(t) => format!("oci:{}:{t}", self.layout.display()),
            None => format!("oci:{}", self.layout.display()),
        }
    }

    /// The manifest (or index) this image's `index.json` entry points at.
    pub fn manifest(&self) -> Value {
        let index: Value = serde_json::from_slice(
            &fs::read(self.layout.join("index.json")).expect("read index.json"),
        )
        .expect("index.json is JSON");
        let entries = index["manifests"].as_array().cloned().unwrap_or_default();
        let entry = match &self.tag {
            None => entries.first().cloned(),
            Some(t) => entries
                .iter()
                .find(|e| e["annotations"]["org.opencontainers.image.ref.name"].as_str() == Some(t))
                .cloned(),
        }
        .unwrap_or_else(|| panic!("{} has no manifest {:?}", self.layout.display(), self.tag));
        read_blob(&self.layout, entry["digest"].as_str().expect("digest"))
    }
}

/// A blob of an OCI layout, parsed as JSON.
pub fn read_blob(layout: &Path, digest: &str) -> Value {
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    let path = layout.join("blobs/sha256").join(hex);
    serde_json::from_slice(&fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// Writes a blob into an OCI layout; returns its digest.
pub fn write_blob(layout: &Path, bytes: &[u8]) -> String {
    let hex = sha256_hex(bytes);
    fs::write(layout.join("blobs/sha256").join(&hex), bytes).expect("write blob");
    format!("sha256:{hex}")
}

/// The converter's small demo image: `hakim-convert demo -o DIR/demo` → `DIR/demo/sample-oci`
/// (linux/amd64, one gzip, one uncompressed and one zstd layer).
pub fn demo_image(dir: &Path) -> LocalImage {
    let out = dir.join("demo");
    run_ok(
        Command::new(converter_bin())
            .args(["demo", "-o"])
            .arg(&out)
            .arg("--json"),
    );
    LocalImage {
        layout: out.join("sample-oci"),
        tag: None,
    }
}

/// `skopeo copy SRC oci:DIR:TAG [EXTRA…]` — a copy of an image in a new layout.
pub fn copy_to_layout(src: &LocalImage, layout: &Path, tag: &str, extra: &[&str]) -> LocalImage {
    let dest = LocalImage {
        layout: layout.to_path_buf(),
        tag: Some(tag.to_string()),
    };
    run_ok(
        Command::new("skopeo")
            .args(["copy", "--quiet"])
            .args(extra)
            .arg(src.oci_ref())
            .arg(dest.oci_ref()),
    );
    dest
}

/// Adds one layer with `content` at `target` (umoci insert; such layers end without the tar
/// EOF footer, see TESTBED.md).
pub fn umoci_insert(image: &LocalImage, dir: &Path, content: &str, target: &str) {
    let file = dir.join(format!("insert-{}", sha256_hex(target.as_bytes())));
    fs::write(&file, content).expect("write file to insert");
    run_ok(
        Command::new("umoci")
            .args(["insert", "--image"])
            .arg(umoci_ref(image))
            .arg(&file)
            .arg(target),
    );
}

fn umoci_ref(image: &LocalImage) -> String {
    format!(
        "{}:{}",
        image.layout.display(),
        image.tag.as_deref().expect("umoci needs a tag")
    )
}

/// A linux/arm64 variant of `base` in `DIR/arm64:arm64`: the config says arm64, and one more
/// layer adds `/etc/hakim-arch` (so its artifact differs from `base`'s).
pub fn arm64_variant(base: &LocalImage, dir: &Path) -> LocalImage {
    let image = copy_to_layout(base, &dir.join("arm64"), "arm64", &[]);
    run_ok(
        Command::new("umoci")
            .args(["config", "--image"])
            .arg(umoci_ref(&image))
            .args(["--architecture", "arm64", "--os", "linux"]),
    );
    umoci_insert(&image, dir, "arm64\n", "/etc/hakim-arch");
    image
}

/// `base` plus one layer (`/opt/hakim-derived/marker`), in `DIR/derived:derived`; every layer
/// of `base` is shared (same blobs).
pub fn derived_image(base: &LocalImage, dir: &Path) -> LocalImage {
    let image = copy_to_layout(base, &dir.join("derived"), "derived", &[]);
    umoci_insert(
        &image,
        dir,
        "derived from the e2e test image\n",
        "/opt/hakim-derived/marker",
    );
    image
}

/// `base` with every layer recompressed with `format` (`zstd` or `gzip`;
/// `skopeo copy --dest-compress-format FORMAT`), in `DIR/FORMAT:FORMAT`.
pub fn recompressed_layout(base: &LocalImage, dir: &Path, format: &str) -> LocalImage {
    copy_to_layout(
        base,
        &dir.join(format),
        format,
        &["--dest-compress-format", format],
    )
}

/// One layout `DIR/multi` holding every image of `images` (`(image, os, architecture)`) and an
/// OCI image index (tag `multi`) listing them with their platforms — push it with
/// `skopeo copy --all`.
pub fn multiarch_layout(images: &[(&LocalImage, &str, &str)], dir: &Path) -> LocalImage {
    let layout = dir.join("multi");
    let mut descriptors = Vec::new();
    for (image, os, arch) in images {
        let copy = copy_to_layout(image, &layout, &format!("{os}-{arch}"), &[]);
        let index: Value =
            serde_json::from_slice(&fs::read(layout.join("index.json")).expect("index.json"))
                .expect("index.json is JSON");
        let entry = index["manifests"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| {
                e["annotations"]["org.opencontainers.image.ref.name"].as_str()
                    == copy.tag.as_deref()
            })
            .cloned()
            .expect("copied manifest in index.json");
        descriptors.push(json!({
            "mediaType": entry["mediaType"],
            "digest": entry["digest"],
            "size": entry["size"],
            "platform": {"architecture": arch, "os": os},
        }));
    }
    let index_blob = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": descriptors,
    })
    .to_string();
    let digest = write_blob(&layout, index_blob.as_bytes());
    let index_path = layout.join("index.json");
    let mut index: Value =
        serde_json::from_slice(&fs::read(&index_path).expect("index.json")).expect("JSON");
    index["manifests"]
        .as_array_mut()
        .expect("manifests array")
        .push(json!({
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": digest,
            "size": index_blob.len(),
            "annotations": {"org.opencontainers.image.ref.name": "multi"},
        }));
    fs::write(&index_path, index.to_string()).expect("write index.json");
    LocalImage {
        layout,
        tag: Some("multi".into()),
    }
}

/// The e2e test image ([`crate::test_image`]) as a [`LocalImage`].
pub fn test_local_image() -> LocalImage {
    LocalImage {
        layout: crate::test_image().oci_layout.clone(),
        tag: Some("test".into()),
    }
}

// ---------------------------------------------------------------------------------------------
// Converter runs
// ---------------------------------------------------------------------------------------------

/// `hakim-convert ARGS…` with `env`; returns the output whatever the exit status.
pub fn run_converter(args: &[String], env: &[(String, String)]) -> Output {
    let mut cmd = Command::new(converter_bin());
    cmd.args(args)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null());
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", show(&cmd)))
}

/// `bytes_downloaded`, `bytes_reused`, `blobs_downloaded`, `blobs_reused` of a `--json`
/// summary's `source.registry`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transfer {
    pub bytes_downloaded: u64,
    pub bytes_reused: u64,
    pub blobs_downloaded: u64,
    pub blobs_reused: u64,
}

impl Transfer {
    pub fn from_json(json: &Value) -> Transfer {
        let r = &json["source"]["registry"];
        let field = |name: &str| {
            r[name].as_u64().unwrap_or_else(|| {
                panic!("JSON summary has no integer source.registry.{name}: {json}")
            })
        };
        Transfer {
            bytes_downloaded: field("bytes_downloaded"),
            bytes_reused: field("bytes_reused"),
            blobs_downloaded: field("blobs_downloaded"),
            blobs_reused: field("blobs_reused"),
        }
    }
}

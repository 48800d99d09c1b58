//! A local stand-in for the few Proxmox VE API calls that create, configure and start an LXC
//! container, for `tests/tests/pve_first_build.rs`. It listens on 127.0.0.1 (an ephemeral port),
//! answers like `pvedaemon` does (JSON `{"data": …}`, task ids for asynchronous calls, errors in
//! the status line) and records every call. What happens to the container's `env` is not
//! decided here: [`crate::pve`] replays pve-container's rules ([`pve::env_after_create`],
//! [`pve::CtEnv`]), and each start keeps the init environment those rules produce.
//!
//! Endpoints (under `/api2/json`):
//!
//! | call | what the stand-in does |
//! |---|---|
//! | `POST /nodes/{node}/lxc` | creates from a registered template (`ostemplate`): an OCI image's Env replaces the caller's `env`, a rootfs template keeps it; `start=1` starts it |
//! | `GET /nodes/{node}/lxc/{vmid}/config` | `env` (pending value unless `current=1`) and `digest` |
//! | `PUT /nodes/{node}/lxc/{vmid}/config` | `env` (and `digest`, refused when stale), applied at once or pending |
//! | `GET /nodes/{node}/lxc/{vmid}/status/current` | `running` or `stopped` |
//! | `POST /nodes/{node}/lxc/{vmid}/status/start` | refused when running; else starts (a task) |
//! | `POST /nodes/{node}/lxc/{vmid}/status/shutdown` | refused when stopped; else stops (a task) |
//! | `GET /nodes/{node}/tasks/{upid}/status` | `running` on the first look, then `stopped` with the exit status |
//!
//! Every request must carry `Authorization: PVEAPIToken=USER@REALM!TOKENID=SECRET` with the
//! token the stand-in was started with; anything else is answered `401 authentication failure`.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{json, Value};

use crate::pve::{self, CtEnv, OciContainer};

/// One request as the stand-in saw it.
#[derive(Debug, Clone)]
pub struct Call {
    pub method: String,
    /// The path below `/api2/json`, without the query.
    pub path: String,
    pub query: String,
    /// The request body, raw (form-encoded for PUT and POST).
    pub body: Vec<u8>,
    /// The form fields of the body (or the query), decoded.
    pub params: Vec<(String, Vec<u8>)>,
    /// Whether the `Authorization` header had the right shape and token.
    pub authorized: bool,
    /// The answer's status code.
    pub status: u16,
}

impl Call {
    /// The decoded value of form field `name`.
    pub fn param(&self, name: &str) -> Option<&[u8]> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
    }

    /// `METHOD /path`, for messages and sequence checks.
    pub fn line(&self) -> String {
        format!("{} {}", self.method, self.path)
    }
}

/// One container.
#[derive(Debug, Clone)]
pub struct Ct {
    pub env: CtEnv,
    pub running: bool,
    /// The init environment of every start, in order ([`CtEnv::start`]).
    pub starts: Vec<Vec<(String, String)>>,
    /// Shutdown calls: their `timeout` and `forceStop` parameters.
    pub shutdowns: Vec<(Option<String>, Option<String>)>,
    generation: u64,
}

impl Ct {
    fn digest(&self) -> String {
        format!("{:040x}", self.generation)
    }
}

#[derive(Debug, Default)]
struct State {
    /// Template volume id → the mapped OCI image config, or `None` for a rootfs template.
    images: BTreeMap<String, Option<OciContainer>>,
    cts: BTreeMap<u32, Ct>,
    calls: Vec<Call>,
    /// UPID → (looks so far, exit status).
    tasks: BTreeMap<String, (u32, String)>,
    /// The exit status the next start task ends with (`None`: OK).
    fail_next_start: Option<String>,
    task_counter: u32,
}

/// The stand-in server; stops when dropped.
pub struct PveApi {
    pub port: u16,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// An API token `USER@REALM!TOKENID=SECRET`'s shape.
pub fn token_shape_ok(token: &str) -> bool {
    let Some((id, secret)) = token.split_once('=') else {
        return false;
    };
    let Some((user_realm, token_id)) = id.split_once('!') else {
        return false;
    };
    let Some((user, realm)) = user_realm.split_once('@') else {
        return false;
    };
    [user, realm, token_id, secret]
        .iter()
        .all(|p| !p.is_empty())
}

extern "C" {
    fn setns(fd: std::ffi::c_int, nstype: std::ffi::c_int) -> std::ffi::c_int;
}

/// Runs `f` on a thread that joined the network namespace of process `pid` (only that thread
/// changes namespace), and returns its result.
pub fn in_netns<T: Send + 'static>(pid: u32, f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        let ns = std::fs::File::open(format!("/proc/{pid}/ns/net"))
            .unwrap_or_else(|e| panic!("open /proc/{pid}/ns/net: {e}"));
        // SAFETY: plain syscall on a valid descriptor; CLONE_NEWNET changes this thread only.
        let rc = unsafe { setns(ns.as_raw_fd(), 0x4000_0000) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("thread in the network namespace panicked")
}

impl PveApi {
    /// Listens on 127.0.0.1:0 and accepts `token` (`USER@REALM!TOKENID=SECRET`).
    pub fn start(token: &str) -> PveApi {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        Self::serve(token, listener)
    }

    /// Like [`PveApi::start`], listening on 127.0.0.1 inside the network namespace of process
    /// `pid` (a namespace with nothing but loopback keeps a tool from reaching anything else).
    pub fn start_in_netns(token: &str, pid: u32) -> PveApi {
        let listener = in_netns(pid, || {
            TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 in the namespace")
        });
        Self::serve(token, listener)
    }

    fn serve(token: &str, listener: TcpListener) -> PveApi {
        assert!(token_shape_ok(token), "not an API token: {token}");
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (state.clone(), stop.clone());
        let expected = format!("PVEAPIToken={token}");
        let thread = std::thread::spawn(move || {
            while !sp.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => serve(stream, &st, &expected),
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        PveApi {
            port,
            state,
            stop,
            thread: Some(thread),
        }
    }

    /// What to give the script as `PVE_API_URL` (with a trailing slash, as users write it).
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/", self.port)
    }

    /// Makes `volid` (e.g. `local:vztmpl/hakim.tar`) an OCI image with this mapped config.
    pub fn add_image(&self, volid: &str, image: OciContainer) {
        self.state
            .lock()
            .unwrap()
            .images
            .insert(volid.into(), Some(image));
    }

    /// Makes `volid` (e.g. `local:vztmpl/hakim-base-trixie-amd64.tar.zst`) a classic rootfs
    /// template.
    pub fn add_rootfs_template(&self, volid: &str) {
        self.state.lock().unwrap().images.insert(volid.into(), None);
    }

    /// The next start task ends with this exit status instead of OK.
    pub fn fail_next_start(&self, exitstatus: &str) {
        self.state.lock().unwrap().fail_next_start = Some(exitstatus.into());
    }

    pub fn calls(&self) -> Vec<Call> {
        self.state.lock().unwrap().calls.clone()
    }

    pub fn ct(&self, vmid: u32) -> Ct {
        self.state
            .lock()
            .unwrap()
            .cts
            .get(&vmid)
            .cloned()
            .unwrap_or_else(|| panic!("no CT {vmid}"))
    }
}

impl Drop for PveApi {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `%XX` and `+` decoding of one form component.
pub fn percent_decode(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < s.len() => {
                match u8::from_str_radix(&String::from_utf8_lossy(&s[i + 1..i + 3]), 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    out
}

/// `a=1&b=2` decoded.
pub fn parse_form(body: &[u8]) -> Vec<(String, Vec<u8>)> {
    body.split(|&b| b == b'&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = match p.iter().position(|&b| b == b'=') {
                Some(i) => (&p[..i], &p[i + 1..]),
                None => (p, &b""[..]),
            };
            (
                String::from_utf8_lossy(&percent_decode(k)).into_owned(),
                percent_decode(v),
            )
        })
        .collect()
}

struct Answer {
    status: u16,
    reason: String,
    body: Value,
}

fn ok(data: Value) -> Answer {
    Answer {
        status: 200,
        reason: "OK".into(),
        body: json!({ "data": data }),
    }
}

/// pvedaemon's way of failing: the message in the status line, `data: null`.
fn fail(status: u16, msg: &str) -> Answer {
    Answer {
        status,
        reason: msg.into(),
        body: json!({ "data": null }),
    }
}

fn serve(mut stream: TcpStream, state: &Mutex<State>, expected_auth: &str) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut data = Vec::new();
    let mut buf = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => data.extend_from_slice(&buf[..n]),
        }
    };
    let head = String::from_utf8_lossy(&data[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or("").split_whitespace();
    let method = first.next().unwrap_or("").to_string();
    let target = first.next().unwrap_or("").to_string();
    let mut auth = None;
    let mut length = 0usize;
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            match k.trim().to_ascii_lowercase().as_str() {
                "authorization" => auth = Some(v.trim().to_string()),
                "content-length" => length = v.trim().parse().unwrap_or(0),
                _ => {}
            }
        }
    }
    while data.len() < head_end + length {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => data.extend_from_slice(&buf[..n]),
        }
    }
    let body = data[head_end..].to_vec();
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), q.to_string()),
        None => (target.clone(), String::new()),
    };
    let path = path.strip_prefix("/api2/json").unwrap_or(&path).to_string();
    let params = if method == "GET" {
        parse_form(query.as_bytes())
    } else {
        parse_form(&body)
    };
    let authorized = auth.as_deref() == Some(expected_auth)
        && auth
            .as_deref()
            .and_then(|a| a.strip_prefix("PVEAPIToken="))
            .is_some_and(token_shape_ok);
    let mut call = Call {
        method,
        path,
        query,
        body,
        params,
        authorized,
        status: 0,
    };
    let answer = {
        let mut st = state.lock().unwrap();
        let a = if authorized {
            route(&mut st, &call)
        } else {
            fail(401, "authentication failure")
        };
        call.status = a.status;
        st.calls.push(call);
        a
    };
    let text = answer.body.to_string();
    let _ = stream.write_all(
        format!(
            "HTTP/1.1 {} {}\r\nContent-Type: application/json;charset=UTF-8\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{text}",
            answer.status,
            answer.reason,
            text.len()
        )
        .as_bytes(),
    );
}

fn new_task(st: &mut State, node: &str, kind: &str, vmid: u32, exit: String) -> String {
    st.task_counter += 1;
    let upid = format!(
        "UPID:{node}:{:08X}:0000ABCD:6553F{:03X}:{kind}:{vmid}:coder@pve!tf:",
        4000 + st.task_counter,
        st.task_counter
    );
    st.tasks.insert(upid.clone(), (0, exit));
    upid
}

fn route(st: &mut State, call: &Call) -> Answer {
    let parts: Vec<&str> = call.path.trim_matches('/').split('/').collect();
    let text = |name: &str| {
        call.param(name)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    };
    match (call.method.as_str(), parts.as_slice()) {
        ("POST", ["nodes", node, "lxc"]) => {
            let Some(vmid) = text("vmid").and_then(|v| v.parse::<u32>().ok()) else {
                return fail(400, "Parameter verification failed.");
            };
            if st.cts.contains_key(&vmid) {
                return fail(500, &format!("CT {vmid} already exists on node '{node}'"));
            }
            let template = text("ostemplate").unwrap_or_default();
            let Some(image) = st.images.get(&template).cloned() else {
                return fail(500, &format!("volume '{template}' does not exist"));
            };
            let mut ct = Ct {
                env: CtEnv {
                    current: pve::env_after_create(text("env").as_deref(), image.as_ref()),
                    pending: None,
                },
                running: false,
                starts: Vec::new(),
                shutdowns: Vec::new(),
                generation: 1,
            };
            if text("start").as_deref() == Some("1") {
                let lines = ct.env.start();
                ct.starts.push(lines);
                ct.running = true;
            }
            st.cts.insert(vmid, ct);
            let upid = new_task(st, node, "vzcreate", vmid, "OK".into());
            ok(json!(upid))
        }
        (method, ["nodes", node, "lxc", vmid, rest @ ..]) => {
            let Ok(vmid) = vmid.parse::<u32>() else {
                return fail(400, "Parameter verification failed.");
            };
            let fail_start = if (method, rest) == ("POST", &["status", "start"][..]) {
                st.fail_next_start.take()
            } else {
                None
            };
            let Some(ct) = st.cts.get_mut(&vmid) else {
                return fail(
                    500,
                    &format!("Configuration file 'nodes/{node}/lxc/{vmid}.conf' does not exist"),
                );
            };
            match (method, rest) {
                ("GET", ["config"]) => {
                    let current = text("current").as_deref() == Some("1");
                    let env = if current {
                        ct.env.current.clone()
                    } else {
                        ct.env.pending.clone().or(ct.env.current.clone())
                    };
                    let mut data = json!({
                        "arch": "amd64", "cmode": "console", "ostype": "debian",
                        "digest": ct.digest(), "unprivileged": 1,
                        "description": "says \"env\":\"no\" inside a string",
                    });
                    if let Some(env) = env {
                        data["env"] = json!(env);
                    }
                    ok(data)
                }
                ("PUT", ["config"]) => {
                    if let Some(d) = text("digest") {
                        if d != ct.digest() {
                            return fail(500, "detected modified configuration - file changed by other user? Try again.");
                        }
                    }
                    let Some(env) = call.param("env") else {
                        return fail(500, "no options specified");
                    };
                    let Ok(env) = std::str::from_utf8(env) else {
                        return fail(400, "Parameter verification failed.");
                    };
                    // The `env` property's pattern: NAME=VALUE entries, no control characters
                    // but tab in values, NUL between entries.
                    let valid = env.split('\0').all(|e| {
                        e.split_once('=').is_some_and(|(k, v)| {
                            !k.is_empty()
                                && k.chars().all(|c| c.is_alphanumeric() || c == '_')
                                && !v
                                    .chars()
                                    .any(|c| matches!(c as u32, 0x00..=0x08 | 0x0a..=0x1f | 0x7f))
                        })
                    });
                    if !valid {
                        return Answer {
                            status: 400,
                            reason: "Parameter verification failed.".into(),
                            body: json!({"data": null, "errors": {"env": "value does not match the regex pattern"}}),
                        };
                    }
                    ct.env.put(env, ct.running);
                    ct.generation += 1;
                    ok(Value::Null)
                }
                ("GET", ["status", "current"]) => ok(json!({
                    "status": if ct.running { "running" } else { "stopped" },
                    "vmid": vmid, "name": format!("CT{vmid}"),
                })),
                ("POST", ["status", "start"]) => {
                    if ct.running {
                        return fail(500, &format!("CT {vmid} already running"));
                    }
                    let exit = match fail_start {
                        Some(e) => e,
                        None => {
                            let lines = ct.env.start();
                            ct.starts.push(lines);
                            ct.running = true;
                            "OK".into()
                        }
                    };
                    let upid = new_task(st, node, "vzstart", vmid, exit);
                    ok(json!(upid))
                }
                ("POST", ["status", "shutdown"]) => {
                    if !ct.running {
                        return fail(500, &format!("CT {vmid} not running"));
                    }
                    ct.running = false;
                    ct.shutdowns.push((text("timeout"), text("forceStop")));
                    let upid = new_task(st, node, "vzshutdown", vmid, "OK".into());
                    ok(json!(upid))
                }
                _ => fail(
                    501,
                    &format!("Method '{method} {}' not implemented", call.path),
                ),
            }
        }
        ("GET", ["nodes", _node, "tasks", upid, "status"]) => {
            let upid = String::from_utf8_lossy(&percent_decode(upid.as_bytes())).into_owned();
            let Some((looks, exit)) = st.tasks.get_mut(&upid) else {
                return fail(500, &format!("no such task '{upid}'"));
            };
            *looks += 1;
            if *looks == 1 {
                ok(json!({"status": "running", "upid": upid}))
            } else {
                ok(json!({"status": "stopped", "exitstatus": exit.clone(), "upid": upid}))
            }
        }
        _ => fail(
            501,
            &format!("Method '{} {}' not implemented", call.method, call.path),
        ),
    }
}

/// A minimal HTTP client for the tests' own calls (what the Terraform provider sends):
/// `(status, body)`.
pub fn request(
    port: u16,
    token: &str,
    method: &str,
    path: &str,
    form: &[(&str, &str)],
) -> (u16, Value) {
    let body: String = form
        .iter()
        .map(|(k, v)| format!("{k}={}", form_encode(v.as_bytes())))
        .collect::<Vec<_>>()
        .join("&");
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the stand-in");
    write!(
        s,
        "{method} /api2/json{path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\
         Authorization: PVEAPIToken={token}\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let text = String::from_utf8_lossy(&out);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let json = text
        .split_once("\r\n\r\n")
        .and_then(|(_, b)| serde_json::from_str(b).ok())
        .unwrap_or(Value::Null);
    (status, json)
}

/// Percent-encodes everything but unreserved characters.
pub fn form_encode(v: &[u8]) -> String {
    v.iter()
        .map(|&b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_round_trip() {
        let raw = "A=1\0B=x y&z%+\tcafé";
        let enc = format!("env={}", form_encode(raw.as_bytes()));
        assert!(enc.contains("%00"));
        let f = parse_form(enc.as_bytes());
        assert_eq!(f, [("env".to_string(), raw.as_bytes().to_vec())]);
        assert_eq!(percent_decode(b"a+b%2"), b"a b%2");
        assert!(token_shape_ok("coder@pve!tf=5e1c"));
        for bad in ["coder@pve!tf", "coder!tf=x", "coder@pve=x", "@pve!tf=x"] {
            assert!(!token_shape_ok(bad), "{bad}");
        }
    }
}

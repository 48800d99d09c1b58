//! A stand-in for the Coder agent binary, for hakim-init's tests.
//!
//! `fake-coder --version` prints `Coder v2.0.0-test (fake-coder uid=U gid=G groups=[..])`, so a
//! download check accepts it and a test can see which user ran the check.
//!
//! Any other invocation (`fake-coder agent`) behaves like the agent as far as PID 1 can tell:
//! it appends a JSON line describing itself to the file named by `FAKE_CODER_RECORD` (the
//! wall-clock time it started, argv, pid, ppid, ids, groups, cwd, umask, environment, blocked
//! and ignored signal masks), then
//! waits. SIGTERM, SIGINT and SIGHUP — the agent's graceful-shutdown signals — are recorded
//! as `{"event":"signal",...}` and end it with status 0, after `FAKE_CODER_SHUTDOWN_MS`
//! milliseconds if set (standing in for shutdown scripts). Knobs:
//!
//! - `FAKE_CODER_EXIT=<code>`: record, then exit with `code` at once (restart tests).
//! - `FAKE_CODER_IGNORE_SIGNALS=1`: record signals but keep running (kill-escalation tests).
//! - `FAKE_CODER_RUN=<program>`: after recording the start, run `program` once with exactly
//!   the agent's environment and cwd (what the agent's terminals would get), then wait as
//!   usual; the program reports what it found itself.
//!
//! Only std: the signal handler is installed through libc's `signal`, declared here, and
//! everything else comes from `/proc/self/status`.

use std::ffi::c_int;
use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io::Write as _;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

const SIGHUP: c_int = 1;
const SIGINT: c_int = 2;
const SIGTERM: c_int = 15;

extern "C" {
    fn signal(signum: c_int, handler: usize) -> usize;
}

static PENDING: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: c_int) {
    // An atomic store is async-signal-safe; the main loop does the rest.
    PENDING.store(sig, Ordering::SeqCst);
}

fn main() {
    let args: Vec<String> = std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    if args.iter().skip(1).any(|a| a == "--version") {
        let s = status();
        println!(
            "Coder v2.0.0-test (fake-coder uid={} gid={} groups=[{}])",
            field(&s, "Uid").next().unwrap_or("?"),
            field(&s, "Gid").next().unwrap_or("?"),
            field(&s, "Groups").collect::<Vec<_>>().join(",")
        );
        println!("https://github.com/coder/coder");
        return;
    }

    for sig in [SIGTERM, SIGINT, SIGHUP] {
        // SAFETY: the handler only performs an atomic store.
        unsafe {
            signal(sig, on_signal as extern "C" fn(c_int) as usize);
        }
    }
    record(&start_event(&args));
    if let Some(program) = std::env::var_os("FAKE_CODER_RUN") {
        let _ = std::process::Command::new(program).status();
    }

    if let Some(code) = env_num("FAKE_CODER_EXIT") {
        record(&format!("{{\"event\":\"exit\",\"code\":{code}}}"));
        std::process::exit(code as i32);
    }
    let ignore = std::env::var("FAKE_CODER_IGNORE_SIGNALS").as_deref() == Ok("1");
    loop {
        let sig = PENDING.swap(0, Ordering::SeqCst);
        if sig != 0 {
            record(&format!(
                "{{\"event\":\"signal\",\"signal\":{sig},\"name\":\"{}\"}}",
                match sig {
                    SIGHUP => "SIGHUP",
                    SIGINT => "SIGINT",
                    _ => "SIGTERM",
                }
            ));
            if !ignore {
                if let Some(ms) = env_num("FAKE_CODER_SHUTDOWN_MS") {
                    std::thread::sleep(Duration::from_millis(ms));
                }
                record("{\"event\":\"exit\",\"code\":0}");
                std::process::exit(0);
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn env_num(name: &str) -> Option<u64> {
    std::env::var(name).ok()?.trim().parse().ok()
}

fn status() -> String {
    std::fs::read_to_string("/proc/self/status").unwrap_or_default()
}

/// Whitespace-separated values of a `/proc/self/status` line.
fn field<'a>(status: &'a str, name: &str) -> impl Iterator<Item = &'a str> {
    let prefix = format!("{name}:");
    status
        .lines()
        .find(|l| l.starts_with(&prefix))
        .map(|l| l[prefix.len()..].split_whitespace())
        .into_iter()
        .flatten()
}

fn start_event(args: &[String]) -> String {
    let s = status();
    let nums = |name: &str| {
        field(&s, name)
            .map(|v| {
                v.parse::<u64>()
                    .map(|n| n.to_string())
                    .unwrap_or_else(|_| json_str(v))
            })
            .collect::<Vec<_>>()
            .join(",")
    };
    let one = |name: &str| json_str(field(&s, name).next().unwrap_or(""));
    let mut env: Vec<(String, String)> = std::env::vars_os()
        .map(|(k, v)| {
            (
                k.to_string_lossy().into_owned(),
                v.to_string_lossy().into_owned(),
            )
        })
        .collect();
    env.sort();
    let cwd = std::env::current_dir()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();

    // When main began, for boot-time measurements (ci/bench-init.sh).
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mut out = String::from("{\"event\":\"start\"");
    let _ = write!(out, ",\"t_unix_ns\":{now}");
    let _ = write!(out, ",\"pid\":{}", std::process::id());
    let _ = write!(out, ",\"ppid\":{}", field(&s, "PPid").next().unwrap_or("0"));
    let argv: Vec<String> = args.iter().map(|a| json_str(a)).collect();
    let _ = write!(out, ",\"argv\":[{}]", argv.join(","));
    // real, effective, saved, filesystem
    let _ = write!(out, ",\"uid\":[{}],\"gid\":[{}]", nums("Uid"), nums("Gid"));
    let _ = write!(out, ",\"groups\":[{}]", nums("Groups"));
    let _ = write!(out, ",\"cwd\":{}", json_str(&cwd));
    let _ = write!(out, ",\"umask\":{}", one("Umask"));
    // Hex masks as the kernel prints them: bit n-1 is signal n.
    let _ = write!(out, ",\"sig_blocked\":{}", one("SigBlk"));
    let _ = write!(out, ",\"sig_ignored\":{}", one("SigIgn"));
    let env: Vec<String> = env
        .iter()
        .map(|(k, v)| format!("{}:{}", json_str(k), json_str(v)))
        .collect();
    let _ = write!(out, ",\"env\":{{{}}}", env.join(","));
    out.push('}');
    out
}

fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Appends one line to `FAKE_CODER_RECORD`, in a single write so concurrent writers and a
/// reader polling the file never see half a line.
fn record(line: &str) {
    let Some(path) = std::env::var_os("FAKE_CODER_RECORD") else {
        return;
    };
    if let Ok(mut f) = OpenOptions::new().create(true).append(true).open(path) {
        let _ = f.write_all(format!("{line}\n").as_bytes());
    }
}

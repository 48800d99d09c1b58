//! Diagnostics a CI author can turn on: `-v` (debug), `-vv` (trace) or
//! `RUST_LOG=hakim_convert=debug` (tracing-subscriber's env filter, which replaces what
//! `-v` selects when set). Each registry request, each auth step, each retry and the
//! time each layer took in both passes are logged to stderr; nothing is logged by
//! default, so the usual output does not change.
//!
//! Logs never hold a secret: `Authorization` values, tokens and passwords are never
//! formatted at all, and URLs lose their userinfo and query ([`redact_url`]; a signed
//! CDN URL carries its signature there). Each log line is written with the progress bars
//! suspended ([`register_display`]) so bars and lines do not tear each other.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing_subscriber::EnvFilter;

use crate::layer::LayerDesc;

/// Target of the per-layer timings (`RUST_LOG=hakim_convert::timing=debug` alone).
pub const TIMING: &str = "hakim_convert::timing";

/// `RUST_LOG` could not be read as a filter.
#[derive(Debug, thiserror::Error)]
#[error(
    "RUST_LOG={value:?} is not a valid log filter: {reason} (e.g. RUST_LOG=hakim_convert=debug)"
)]
pub struct FilterError {
    value: String,
    reason: String,
}

/// The filter for `-v` counted `verbosity` times, or `rust_log` when it is set (and not
/// empty). `None`: nothing to log.
pub fn filter(verbosity: u8, rust_log: Option<&str>) -> Result<Option<EnvFilter>, FilterError> {
    let directives = match rust_log.map(str::trim).filter(|v| !v.is_empty()) {
        Some(v) => v.to_string(),
        None => match verbosity {
            0 => return Ok(None),
            1 => "hakim_convert=debug".to_string(),
            _ => "hakim_convert=trace".to_string(),
        },
    };
    EnvFilter::builder()
        .parse(&directives)
        .map(Some)
        .map_err(|e| FilterError {
            value: directives,
            reason: e.to_string(),
        })
}

/// Starts logging to stderr for `-v` × `verbosity` and the `RUST_LOG` environment variable.
pub fn init(verbosity: u8) -> Result<(), FilterError> {
    let rust_log = std::env::var("RUST_LOG").ok();
    let Some(filter) = filter(verbosity, rust_log.as_deref())? else {
        return Ok(());
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| LineWriter(Vec::new()))
        .try_init();
    Ok(())
}

/// Runs a closure with the live display (progress bars) taken off the terminal.
pub type Suspend = Box<dyn Fn(&mut dyn FnMut()) + Send + Sync>;

static DISPLAY: Mutex<Option<Arc<Suspend>>> = Mutex::new(None);

/// Registers the live display while the returned guard lives: log lines are then
/// written with it suspended.
pub fn register_display(suspend: Suspend) -> DisplayGuard {
    let suspend = Arc::new(suspend);
    *DISPLAY.lock().unwrap_or_else(|e| e.into_inner()) = Some(suspend.clone());
    DisplayGuard(suspend)
}

/// Registers one progress bar (or spinner) as the live display, as [`register_display`].
pub fn register_bar(bar: &indicatif::ProgressBar) -> DisplayGuard {
    let bar = bar.clone();
    register_display(Box::new(move |write: &mut dyn FnMut()| bar.suspend(write)))
}

/// Unregisters its display when dropped.
pub struct DisplayGuard(Arc<Suspend>);

impl Drop for DisplayGuard {
    fn drop(&mut self) {
        let mut display = DISPLAY.lock().unwrap_or_else(|e| e.into_inner());
        if display.as_ref().is_some_and(|d| Arc::ptr_eq(d, &self.0)) {
            *display = None;
        }
    }
}

/// One log event, collected and written as a whole when dropped, with the display
/// suspended.
struct LineWriter(Vec<u8>);

impl Write for LineWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        if self.0.is_empty() {
            return;
        }
        let display = DISPLAY.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut emit = || {
            let _ = std::io::stderr().lock().write_all(&self.0);
        };
        match display {
            Some(suspend) => suspend(&mut emit),
            None => emit(),
        }
    }
}

/// A URL fit for a log: userinfo and query replaced by `<redacted>`, the fragment
/// dropped; scheme, host, port and path kept.
pub fn redact_url(url: &str) -> String {
    let url = url.split('#').next().unwrap_or_default();
    let (url, query) = match url.split_once('?') {
        Some((u, _)) => (u, "?<redacted>"),
        None => (url, ""),
    };
    let (scheme, rest) = match url.split_once("://") {
        Some((s, r)) => (format!("{s}://"), r),
        None => (String::new(), url),
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let authority = match authority.rsplit_once('@') {
        Some((_, host)) => format!("<redacted>@{host}"),
        None => authority.to_string(),
    };
    crate::text::printable(format!("{scheme}{authority}{path}{query}"), 500)
}

/// Logs the end of one layer's pass: `pass` 1 indexes, 2 writes the artifact;
/// `bytes`: the layer tar bytes that pass decompressed (pass 2 stops after the
/// layer's last winning member, so it can be less than pass 1's).
pub fn layer_pass(pass: u8, layer: &LayerDesc, bytes: u64, elapsed: Duration) {
    tracing::debug!(
        target: TIMING,
        pass,
        layer = layer.index + 1,
        digest = %layer.digest.as_ref().unwrap_or(&layer.diff_id),
        inflated_bytes = bytes,
        ms = elapsed.as_millis() as u64,
        "layer read"
    );
}

/// Logs a retry and why (the user sees a note too, when progress is shown).
pub fn retry(what: &str, why: &str, delay: Duration, attempt: u32, max_attempts: u32) {
    tracing::debug!(
        target: "hakim_convert::registry",
        attempt,
        max_attempts,
        delay_ms = delay.as_millis() as u64,
        "retrying {what}: {why}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_userinfo_and_query() {
        assert_eq!(
            redact_url("https://user:pw@reg.example:5000/v2/a/blobs/sha256:ab?X-Sig=s3cret#f"),
            "https://<redacted>@reg.example:5000/v2/a/blobs/sha256:ab?<redacted>"
        );
        assert_eq!(
            redact_url("https://auth.example/token?service=reg&scope=repository:a:pull"),
            "https://auth.example/token?<redacted>"
        );
        assert_eq!(
            redact_url("http://127.0.0.1:5000/v2/"),
            "http://127.0.0.1:5000/v2/"
        );
        assert_eq!(redact_url("http://h/p@x"), "http://h/p@x");
        assert_eq!(redact_url("http://h/\u{1b}[2J"), "http://h/\\x1b[2J");
    }

    #[test]
    fn verbosity_and_rust_log() {
        assert!(filter(0, None).unwrap().is_none());
        assert!(filter(0, Some("  ")).unwrap().is_none());
        let debug = filter(1, None).unwrap().unwrap().to_string();
        assert_eq!(debug, "hakim_convert=debug");
        assert_eq!(
            filter(2, None).unwrap().unwrap().to_string(),
            "hakim_convert=trace"
        );
        let from_env = filter(0, Some("hakim_convert::timing=debug"))
            .unwrap()
            .unwrap();
        assert_eq!(from_env.to_string(), "hakim_convert::timing=debug");
        let e = filter(1, Some("hakim_convert=loud")).unwrap_err();
        assert!(e.to_string().contains("not a valid log filter"), "{e}");
    }
}

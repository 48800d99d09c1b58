//! Fault injection between `hakim-convert` and a real registry: the converter pulls the demo
//! image through [`FaultProxy`] (`tests/src/fault_proxy.rs`), a plain-HTTP reverse proxy on
//! 127.0.0.1 in front of Debian's `docker-registry`, which spoils blob downloads: a reset
//! mid-body, truncated bodies, 500s, a 429 with `Retry-After`, wrong content, a slow trickle, a
//! redirect to another port, a `Range` ignored, an HTML login page, a body that never ends.
//!
//! Each conversion must either succeed by retry or resume, with an artifact byte-identical
//! (sha256) to the conversion of the same image from its local `oci:` layout, or fail with a
//! clear message naming the blob — never leaving an artifact under its final name, never
//! putting unverified bytes in the blob cache.
//!
//! Gating: as the other registry tests (`docker-registry`, `skopeo`, `openssl`, `htpasswd`,
//! `umoci`, and a converter with the registry transport). Missing ones skip, or fail under
//! `HAKIM_E2E=1`.

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use hakim_e2e::fault_proxy::{Fault, FaultProxy, Rule, Seen};
use hakim_e2e::registry::{
    converter_ready, demo_image, manifest_blobs, registry_ready, run_converter, sha256_hex, Mode,
    Registry, Transfer, PASSWORD,
};
use hakim_e2e::{
    convert, is_artifact_name, list_dir, scratch_dir, serial, Compression, Conversion,
};

const SOURCE_DATE_EPOCH: &str = "1750000000";
const REPO: &str = "e2e/demo:latest";
/// Bytes of the faulted blob sent before a reset or a truncation.
const K: usize = 2048;

/// A registry (plain or token mode) holding the demo image, the proxy in front of it, and the
/// expected artifact.
struct Setup {
    // Drop order: the proxy, then the registry, then the directory.
    proxy: FaultProxy,
    reg: Registry,
    /// The largest blob of the image (the demo's uncompressed layer, 5.5 KiB).
    blob: (String, u64),
    /// sha256 of the artifact converted from the local layout.
    expected: String,
    _work: tempfile::TempDir,
}

fn setup(mode: Mode) -> Option<Setup> {
    if !(registry_ready() && converter_ready()) {
        return None;
    }
    let started = Instant::now();
    let work = scratch_dir("reg-faults-");
    let demo = demo_image(work.path());
    let reg = Registry::start(mode);
    reg.push(&demo.oci_ref(), REPO, &[]);
    let blobs = manifest_blobs(&reg.manifest(REPO));
    let blob = blobs
        .iter()
        .max_by_key(|(_, size)| *size)
        .cloned()
        .expect("the demo image has blobs");
    assert!(
        blob.1 as usize > 2 * K,
        "the largest demo blob is too small for the faults: {blobs:?}"
    );
    let local = convert(
        &demo.oci_ref(),
        Compression::Zstd,
        &[],
        &[("SOURCE_DATE_EPOCH", SOURCE_DATE_EPOCH)],
    );
    let proxy = FaultProxy::start(reg.port);
    eprintln!(
        "setup ({}) in {:.2} s; faulted blob {} ({} bytes)",
        mode.name(),
        started.elapsed().as_secs_f64(),
        blob.0,
        blob.1
    );
    Some(Setup {
        proxy,
        reg,
        blob,
        expected: local.sha256,
        _work: work,
    })
}

fn env(reg: &Registry) -> Vec<(String, String)> {
    let mut env = reg.client_env();
    env.push(("SOURCE_DATE_EPOCH".into(), SOURCE_DATE_EPOCH.into()));
    env
}

fn args(cache: &Path, creds: Option<&str>) -> Vec<String> {
    let mut args = vec![
        "--cache-dir".to_string(),
        cache.display().to_string(),
        "--max-attempts".into(),
        "4".into(),
    ];
    if let Some(c) = creds {
        args.extend(["--creds".to_string(), c.to_string()]);
    }
    args
}

impl Setup {
    /// The largest blob at 4 KiB/s: its 5.5 KiB take about 1.4 s.
    fn trickle_largest_blob(&self) {
        self.proxy.add_rule(Rule::new(
            &self.blob.0,
            None,
            Fault::Trickle {
                bytes_per_sec: 4096,
            },
        ));
    }

    /// A conversion through the proxy that must succeed (every check of [`convert`]), and give
    /// the expected artifact.
    fn convert_ok(&self, cache: &Path, creds: Option<&str>, what: &str) -> Conversion {
        let args = args(cache, creds);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env = env(&self.reg);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let c = convert(&self.proxy.docker_ref(REPO), Compression::Zstd, &args, &env);
        eprintln!(
            "{what}: converted through the proxy in {:.2} s: {:?}",
            c.seconds, c.json["source"]["registry"]
        );
        assert_eq!(
            c.sha256,
            self.expected,
            "{what}: artifact differs from the fault-free conversion; blob GETs: {:#?}",
            self.proxy.blob_gets(&self.blob.0)
        );
        assert_cache_verified(cache, what);
        c
    }

    /// A conversion through the proxy whatever its outcome: the output, its directory.
    fn convert_any(&self, cache: &Path) -> (Output, tempfile::TempDir, f64) {
        let outdir = scratch_dir("out-fault-");
        let mut full = vec![
            "convert".to_string(),
            self.proxy.docker_ref(REPO),
            "-o".into(),
            outdir.path().display().to_string(),
            "--compression".into(),
            "zstd".into(),
            "--name".into(),
            "hakim-test".into(),
            "--json".into(),
        ];
        full.extend(args(cache, None));
        let started = Instant::now();
        let out = run_converter(&full, &env(&self.reg));
        (out, outdir, started.elapsed().as_secs_f64())
    }

    fn hex(&self) -> &str {
        self.blob.0.strip_prefix("sha256:").expect("sha256 digest")
    }
}

/// Every file in the cache's `blobs/sha256` is named by its sha256; no `.partial-*` is left.
fn assert_cache_verified(cache: &Path, what: &str) {
    let dir = cache.join("blobs/sha256");
    for name in list_dir(&dir) {
        assert!(
            !name.starts_with(".partial"),
            "{what}: temporary download left in the cache: {name} ({:?})",
            list_dir(&dir)
        );
        let bytes = std::fs::read(dir.join(&name)).expect("read cached blob");
        assert_eq!(
            sha256_hex(&bytes),
            name,
            "{what}: the cache holds bytes that do not match their name"
        );
    }
}

/// A failed conversion: non-zero exit, no artifact nor `sha256sums.txt` in OUT, the faulted
/// blob not in the cache, no temporary files left.
fn assert_clean_failure(s: &Setup, out: &Output, outdir: &Path, cache: &Path, what: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "{what}: must fail\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let left: Vec<String> = list_dir(outdir)
        .into_iter()
        .filter(|n| is_artifact_name(n.as_ref()) || n == "sha256sums.txt")
        .collect();
    assert!(
        left.is_empty(),
        "{what}: left in OUT after the failure: {left:?} (all: {:?})",
        list_dir(outdir)
    );
    let cached = cache.join("blobs/sha256").join(s.hex());
    assert!(
        !cached.exists(),
        "{what}: the blob with bad bytes got its final name in the cache: {}",
        cached.display()
    );
    assert_cache_verified(cache, what);
    assert!(!stderr.contains(PASSWORD), "{what}: password in the output");
}

/// `N` of a `Range: bytes=N-` header.
fn range_start(s: &Seen) -> Option<usize> {
    s.range
        .as_deref()?
        .strip_prefix("bytes=")?
        .strip_suffix('-')?
        .parse()
        .ok()
}

fn summary(gets: &[Seen]) -> Vec<String> {
    gets.iter()
        .map(|g| {
            format!(
                "{} range={:?} -> {} {:?} ({} body bytes)",
                g.method, g.range, g.status, g.fault, g.body_bytes
            )
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn reset_mid_blob_resumes_with_range() {
    let _guard = serial();
    let Some(s) = setup(Mode::Plain) else { return };
    // The fault-free path through the proxy first: the proxy itself changes nothing.
    let clean = scratch_dir("cache-");
    s.convert_ok(clean.path(), None, "no fault");
    s.proxy.clear_seen();

    let cache = scratch_dir("cache-");
    s.proxy
        .add_rule(Rule::new(&s.blob.0, Some(1), Fault::ResetAfter(K)));
    let c = s.convert_ok(cache.path(), None, "reset mid-blob");
    let gets = s.proxy.blob_gets(&s.blob.0);
    eprintln!("reset: blob GETs {:#?}", summary(&gets));
    assert_eq!(
        gets.first().and_then(|g| g.fault.clone()),
        Some(Fault::ResetAfter(K)),
        "the reset was not injected: {gets:#?}"
    );
    let resumed: Vec<usize> = gets.iter().skip(1).filter_map(range_start).collect();
    assert!(
        resumed.iter().any(|&n| n > 0 && n <= K),
        "no request resumed with `Range: bytes=N-` (0 < N <= {K}) after the reset: {:#?}",
        summary(&gets)
    );
    let t = Transfer::from_json(&c.json);
    eprintln!("reset: resumed from {resumed:?}; transfer {t:?}");
}

#[test]
fn truncated_body_is_retried_or_fails_cleanly() {
    let _guard = serial();
    let Some(s) = setup(Mode::Plain) else { return };
    for (fault, what) in [
        (Fault::CloseAfter(K), "honest Content-Length, early close"),
        (Fault::ShortLength(K), "lying Content-Length (short body)"),
    ] {
        s.proxy.clear_rules();
        s.proxy.clear_seen();
        s.proxy.add_rule(Rule::new(&s.blob.0, Some(2), fault));
        let cache = scratch_dir("cache-");
        let (out, outdir, secs) = s.convert_any(cache.path());
        let gets = s.proxy.blob_gets(&s.blob.0);
        let stderr = String::from_utf8_lossy(&out.stderr);
        eprintln!(
            "truncated ({what}): exit {} in {secs:.2} s; blob GETs {:#?}\n{}",
            out.status,
            summary(&gets),
            stderr.trim()
        );
        if out.status.success() {
            let json: serde_json::Value =
                serde_json::from_slice(&out.stdout).expect("--json output");
            assert_eq!(
                json["sha256"].as_str(),
                Some(s.expected.as_str()),
                "{what}: the artifact differs from the fault-free conversion"
            );
            let artifact = json["artifact"].as_str().expect("artifact");
            let artifact = outdir.path().join(artifact);
            assert_eq!(hakim_e2e::sha256_file(&artifact), s.expected, "{what}");
            assert_cache_verified(cache.path(), what);
        } else {
            assert_clean_failure(&s, &out, outdir.path(), cache.path(), what);
            let lower = stderr.to_lowercase();
            assert!(
                lower.contains(&s.hex()[..12])
                    && ["truncat", "short", "bytes", "closed", "incomplete"]
                        .iter()
                        .any(|w| lower.contains(w)),
                "{what}: the error does not say which blob and what went wrong:\n{stderr}"
            );
        }
    }
}

#[test]
fn server_errors_then_success() {
    let _guard = serial();
    let Some(s) = setup(Mode::Plain) else { return };
    s.proxy.add_rule(Rule::new(
        &s.blob.0,
        Some(2),
        Fault::Status {
            status: 500,
            retry_after: None,
        },
    ));
    let cache = scratch_dir("cache-");
    s.convert_ok(cache.path(), None, "500 twice");
    let gets = s.proxy.blob_gets(&s.blob.0);
    let statuses: Vec<u16> = gets.iter().map(|g| g.status).collect();
    assert_eq!(
        statuses,
        [500, 500, 200],
        "expected exactly 3 GETs of the blob (500, 500, 200): {:#?}",
        summary(&gets)
    );
}

#[test]
fn too_many_requests_honours_retry_after() {
    let _guard = serial();
    let Some(s) = setup(Mode::Plain) else { return };
    s.proxy.add_rule(Rule::new(
        &s.blob.0,
        Some(1),
        Fault::Status {
            status: 429,
            retry_after: Some(1),
        },
    ));
    let cache = scratch_dir("cache-");
    s.convert_ok(cache.path(), None, "429 Retry-After: 1");
    let gets = s.proxy.blob_gets(&s.blob.0);
    assert!(
        gets.len() >= 2 && gets[0].status == 429,
        "no retry after the 429: {:#?}",
        summary(&gets)
    );
    let waited = gets[1].at.duration_since(gets[0].at);
    eprintln!("429: retried after {:.3} s", waited.as_secs_f64());
    assert!(
        waited >= Duration::from_secs(1),
        "retried {:.3} s after a 429 with Retry-After: 1",
        waited.as_secs_f64()
    );
}

#[test]
fn wrong_content_fails_naming_the_blob() {
    let _guard = serial();
    let Some(s) = setup(Mode::Plain) else { return };
    s.proxy
        .add_rule(Rule::new(&s.blob.0, None, Fault::FlipByte));
    let cache = scratch_dir("cache-");
    let (out, outdir, secs) = s.convert_any(cache.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let gets = s.proxy.blob_gets(&s.blob.0);
    eprintln!(
        "wrong content: exit {} in {secs:.2} s; blob GETs {:#?}\n{}",
        out.status,
        summary(&gets),
        stderr.trim()
    );
    assert_clean_failure(&s, &out, outdir.path(), cache.path(), "wrong content");
    assert!(
        stderr.contains(&s.hex()[..12]),
        "the error does not name the blob {}:\n{stderr}",
        s.blob.0
    );
    if !stderr.contains(&s.blob.0) {
        eprintln!("note: the error abbreviates the digest {}", s.blob.0);
    }
    assert!(
        gets.iter().all(|g| g.fault == Some(Fault::FlipByte)),
        "{:#?}",
        summary(&gets)
    );
}

#[test]
fn slow_trickle_succeeds() {
    let _guard = serial();
    let Some(s) = setup(Mode::Plain) else { return };
    s.trickle_largest_blob();
    let cache = scratch_dir("cache-");
    let c = s.convert_ok(cache.path(), None, "slow trickle");
    let gets = s.proxy.blob_gets(&s.blob.0);
    assert_eq!(
        gets.len(),
        1,
        "the trickled blob was fetched more than once: {:#?}",
        summary(&gets)
    );
    assert!(
        c.seconds >= 1.0,
        "the conversion took {:.2} s: the trickle was not in effect",
        c.seconds
    );
}

#[test]
fn redirect_to_another_port_drops_authorization() {
    let _guard = serial();
    let Some(s) = setup(Mode::Token) else { return };
    s.proxy
        .add_rule(Rule::new(&s.blob.0, None, Fault::Redirect));
    let cache = scratch_dir("cache-");
    let creds = s.reg.creds();
    s.convert_ok(cache.path(), Some(&creds), "redirect");
    let gets = s.proxy.blob_gets(&s.blob.0);
    let redirected: Vec<&Seen> = gets.iter().filter(|g| g.status == 307).collect();
    assert!(
        !redirected.is_empty(),
        "the blob was never redirected: {:#?}",
        summary(&gets)
    );
    assert!(
        redirected.iter().all(|g| g.authorization),
        "the registry-facing blob request carried no Authorization (nothing to leak): {gets:#?}"
    );
    let target = s.proxy.redirect_seen();
    eprintln!("redirect target saw {target:#?}");
    assert!(
        target
            .iter()
            .any(|t| t.blob() == Some(s.blob.0.as_str()) && t.status == 200),
        "the redirect target never served the blob: {target:#?}"
    );
    let leaked: Vec<&Seen> = target.iter().filter(|t| t.authorization).collect();
    assert!(
        leaked.is_empty(),
        "Authorization sent to the redirect target on another port: {leaked:#?}"
    );
    let other = s.proxy.seen();
    assert!(
        other
            .iter()
            .filter(|r| r.path.starts_with("/v2/") && r.path != "/v2/" && r.status == 200)
            .all(|r| r.authorization),
        "a successful registry request without Authorization in token mode: {other:#?}"
    );
}

#[test]
fn ignored_range_restarts_from_zero() {
    let _guard = serial();
    let Some(s) = setup(Mode::Plain) else { return };
    s.proxy
        .add_rule(Rule::new(&s.blob.0, Some(1), Fault::ResetAfter(K)));
    s.proxy
        .add_rule(Rule::new(&s.blob.0, None, Fault::IgnoreRange));
    let cache = scratch_dir("cache-");
    s.convert_ok(cache.path(), None, "Range ignored");
    let gets = s.proxy.blob_gets(&s.blob.0);
    eprintln!("range ignored: blob GETs {:#?}", summary(&gets));
    assert!(
        gets.iter()
            .skip(1)
            .any(|g| range_start(g).is_some_and(|n| n > 0) && g.status == 200),
        "no ranged request answered 200 with the whole body: {:#?}",
        summary(&gets)
    );
}

/// Manifest `GET`s the proxy received.
fn manifest_gets(s: &Setup) -> Vec<Seen> {
    s.proxy
        .seen()
        .into_iter()
        .filter(|g| g.method == "GET" && g.path.contains("/manifests/"))
        .collect()
}

/// A failing conversion through the proxy with `rule` in force: clean failure, the
/// message holds `expect`, and it came at once (no retry of what cannot improve).
fn refused_at_once(s: &Setup, rule: Rule, what: &str, expect: &str) -> Vec<Seen> {
    s.proxy.clear_rules();
    s.proxy.clear_seen();
    let manifests = rule.digest.as_deref() != Some(s.blob.0.as_str());
    s.proxy.add_rule(rule);
    let cache = scratch_dir("cache-");
    let (out, outdir, secs) = s.convert_any(cache.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let gets = if manifests {
        manifest_gets(s)
    } else {
        s.proxy.blob_gets(&s.blob.0)
    };
    eprintln!(
        "{what}: exit {} in {secs:.2} s; GETs {:#?}\n{}",
        out.status,
        summary(&gets),
        stderr.trim()
    );
    assert_clean_failure(s, &out, outdir.path(), cache.path(), what);
    assert!(
        stderr.contains(expect),
        "{what}: expected '{expect}' in:\n{stderr}"
    );
    assert_eq!(gets.len(), 1, "{what}: retried: {:#?}", summary(&gets));
    gets
}

#[test]
fn html_page_instead_of_a_manifest_or_a_blob_is_refused() {
    let _guard = serial();
    let Some(s) = setup(Mode::Plain) else { return };
    refused_at_once(
        &s,
        Rule::manifests(None, Fault::Html),
        "HTML manifest",
        "HTML page instead of a manifest",
    );
    refused_at_once(
        &s,
        Rule::new(&s.blob.0, None, Fault::Html),
        "HTML blob",
        "HTML page instead of the blob",
    );
}

#[test]
fn endless_blob_or_manifest_is_cut_at_its_limit() {
    let _guard = serial();
    let Some(s) = setup(Mode::Plain) else { return };
    let gets = refused_at_once(
        &s,
        Rule::new(&s.blob.0, None, Fault::Endless),
        "endless blob",
        &format!("more than the {} bytes the descriptor declares", s.blob.1),
    );
    // The client hung up long before the proxy's 1 GiB cap (socket buffers aside).
    assert!(gets[0].body_bytes < 64 << 20, "{:#?}", summary(&gets));
    let gets = refused_at_once(
        &s,
        Rule::manifests(None, Fault::Endless),
        "endless manifest",
        "manifest is larger than 4194304 bytes",
    );
    assert!(gets[0].body_bytes < 64 << 20, "{:#?}", summary(&gets));
}

/// Whether every `-v` log line in a terminal transcript starts a line: right after a newline,
/// a carriage return or a terminal control sequence (the bars being cleared), never glued to
/// the text of a progress bar. Returns the torn lines.
fn torn_log_lines(raw: &[u8]) -> Vec<String> {
    let marker = b" DEBUG hakim_convert";
    // `2026-12-05T07:42:07.069381Z`: the timestamp opening each line.
    const STAMP: usize = 27;
    let mut torn = Vec::new();
    for at in (0..raw.len().saturating_sub(marker.len())).filter(|&i| raw[i..].starts_with(marker))
    {
        let start = at.saturating_sub(STAMP);
        let before = &raw[..start];
        let clean = match before.last() {
            None | Some(b'\n' | b'\r') => true,
            Some(c) if c.is_ascii_alphabetic() => {
                // The end of `ESC [ digits/; letter`.
                let params = before[..before.len() - 1]
                    .iter()
                    .rev()
                    .take_while(|b| b.is_ascii_digit() || **b == b';')
                    .count();
                before[..before.len() - 1 - params].ends_with(b"\x1b[")
            }
            _ => false,
        };
        if !clean {
            let from = start.saturating_sub(60);
            torn.push(String::from_utf8_lossy(&raw[from..at + marker.len()]).into_owned());
        }
    }
    torn
}

/// On a terminal (`script` gives the converter a pty), `-v` log lines are written with the
/// download bars suspended, so lines and bars do not tear each other.
#[test]
fn verbose_log_does_not_tear_progress_bars() {
    let _guard = serial();
    if std::process::Command::new("script")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: no script(1)");
        return;
    }
    let Some(s) = setup(Mode::Plain) else { return };
    // Its bar is drawn while the blob trickles in.
    s.trickle_largest_blob();
    let cache = scratch_dir("cache-");
    let outdir = scratch_dir("out-tty-");
    let quote = |a: &str| format!("'{}'", a.replace('\'', r"'\''"));
    let mut command = vec![
        hakim_e2e::converter_bin().display().to_string(),
        "convert".into(),
        s.proxy.docker_ref(REPO),
        "-o".into(),
        outdir.path().display().to_string(),
        "--compression".into(),
        "zstd".into(),
        "-v".into(),
    ];
    command.extend(args(cache.path(), None));
    let command: Vec<String> = command.iter().map(|a| quote(a)).collect();
    let transcript = outdir.path().join("typescript");
    let out = std::process::Command::new("script")
        .args(["-qfec", &command.join(" ")])
        .arg(&transcript)
        .envs(env(&s.reg))
        .env("TERM", "xterm")
        .env("COLUMNS", "160")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("script runs");
    let raw = std::fs::read(&transcript).unwrap_or_default();
    let shown = String::from_utf8_lossy(&raw);
    assert!(
        out.status.success(),
        "the conversion on a pty failed:\n{shown}"
    );
    assert!(
        shown.contains("eta") && shown.contains("DEBUG hakim_convert::registry"),
        "no bars or no log lines on the pty:\n{shown}"
    );
    let torn = torn_log_lines(&raw);
    assert!(
        torn.is_empty(),
        "log lines glued to progress bars: {torn:#?}"
    );
}

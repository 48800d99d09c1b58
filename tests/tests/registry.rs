//! End-to-end tests of `hakim-convert`'s registry transport (`docker://HOST/NAME:TAG`, and the
//! bare `HOST/NAME:TAG` form) against a real Distribution registry (Debian's
//! `docker-registry` 2.8) on 127.0.0.1, in three modes: plain HTTP, HTTPS with bcrypt htpasswd
//! basic auth, and bearer tokens from a token server of the harness (the GHCR flow). See
//! `tests/src/registry.rs`.
//!
//! Images are pushed with skopeo from local OCI layouts: the e2e test image
//! (`ci/build-test-image.sh`, 12 gzip layers), the converter's demo image, and images derived
//! from those (a Docker v2s2 manifest, zstd layers, a linux/amd64 + linux/arm64 index, an image
//! sharing every layer of the test image plus one more).
//!
//! Oracle: the same converter on the same image as a local `oci:` layout. Artifacts are
//! compared byte for byte (sha256), with `SOURCE_DATE_EPOCH` set and zstd output (fast).
//! Transfer accounting is checked against the registry's manifests (unique blob sizes) and its
//! access log (which blobs were really fetched, what the registry answered).
//!
//! The `harness_*` tests check the harness itself (registries, pushes, the token server's JWTs)
//! and need only the demo image from the converter.
//!
//! Gating: `docker-registry`, `skopeo`, `openssl`, `htpasswd`, `umoci`; tests using the test
//! image also need root and the tools of `ci/build-test-image.sh`; the conversion tests need a
//! converter with the registry transport (`convert --help` lists `--cache-dir`). Missing ones
//! skip, or fail under `HAKIM_E2E=1`.

use std::collections::BTreeMap;
use std::net::TcpStream;
use std::path::Path;
use std::process::Output;
use std::sync::OnceLock;
use std::time::Instant;

use hakim_e2e::registry::{
    arm64_variant, assert_each_blob_fetched_once, base64_decode, blob_fetches, converter_ready,
    demo_image, derived_image, http_get, layer_media_types, manifest_blobs, multiarch_layout,
    recompressed_layout, registry_ready, run_converter, test_local_image, unique_blobs, LocalImage,
    Mode, Registry, Transfer, ISSUER, PASSWORD, SERVICE, USER,
};
use hakim_e2e::{
    convert, is_artifact_name, list_dir, ready, scratch_dir, serial, Compression, Conversion,
};
use serde_json::Value;

const SOURCE_DATE_EPOCH: &str = "1750000000";
const TEST_REPO: &str = "e2e/hakim-test";

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Gate for the conversion tests; `test_image`: the test also needs the e2e test image.
fn conversion_ready(test_image: bool) -> bool {
    registry_ready() && (!test_image || ready()) && converter_ready()
}

/// Converter options for a registry: a cache directory, `--ca-cert` in HTTPS mode, and
/// `--creds` when `creds` (otherwise anonymous).
fn registry_args(reg: &Registry, cache: &Path, creds: Option<&str>) -> Vec<String> {
    let mut args = vec!["--cache-dir".to_string(), cache.display().to_string()];
    if let Some(ca) = &reg.tls_cert {
        args.push("--ca-cert".into());
        args.push(ca.display().to_string());
    }
    if let Some(c) = creds {
        args.push("--creds".into());
        args.push(c.to_string());
    }
    args
}

fn converter_env(reg: &Registry) -> Vec<(String, String)> {
    let mut env = reg.client_env();
    env.push(("SOURCE_DATE_EPOCH".into(), SOURCE_DATE_EPOCH.into()));
    env
}

/// `hakim-convert convert docker://HOST/REFERENCE … --compression zstd --json` (all the checks
/// of [`convert`]).
fn convert_remote(
    reg: &Registry,
    reference: &str,
    cache: &Path,
    creds: Option<&str>,
    extra: &[&str],
) -> Conversion {
    let mut args = registry_args(reg, cache, creds);
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let env = converter_env(reg);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let c = convert(&reg.docker_ref(reference), Compression::Zstd, &args, &env);
    eprintln!(
        "converted {} in {:.2} s: {} {:?}",
        reg.docker_ref(reference),
        c.seconds,
        c.sha256,
        c.json["source"]["registry"]
    );
    c
}

/// The same conversion from a local layout.
fn convert_local(image: &LocalImage, extra: &[&str]) -> Conversion {
    let c = convert(
        &image.oci_ref(),
        Compression::Zstd,
        extra,
        &[("SOURCE_DATE_EPOCH", SOURCE_DATE_EPOCH)],
    );
    eprintln!(
        "converted {} locally in {:.2} s: {}",
        image.oci_ref(),
        c.seconds,
        c.sha256
    );
    c
}

/// sha256 of the test image's artifact converted from its local layout (once per process).
fn local_test_sha() -> &'static str {
    static SHA: OnceLock<String> = OnceLock::new();
    SHA.get_or_init(|| convert_local(&test_local_image(), &[]).sha256)
}

/// A conversion that must fail: exit status, a message containing one of `expect` (lowercase),
/// no secret in the output, no artifact left in the output directory.
fn expect_failure(
    reg: &Registry,
    reference: &str,
    args: &[String],
    expect: &[&str],
    what: &str,
) -> String {
    let outdir = scratch_dir("out-fail-");
    let mut full = vec![
        "convert".to_string(),
        reg.docker_ref(reference),
        "-o".into(),
        outdir.path().display().to_string(),
        "--compression".into(),
        "zstd".into(),
        "--name".into(),
        "hakim-test".into(),
    ];
    full.extend(args.iter().cloned());
    let out = run_converter(&full, &converter_env(reg));
    check_failure(&out, outdir.path(), expect, what);
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn check_failure(out: &Output, outdir: &Path, expect: &[&str], what: &str) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "{what}: the conversion succeeded but must fail\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    let lower = stderr.to_lowercase();
    assert!(
        expect.iter().any(|e| lower.contains(e)),
        "{what}: the error message names none of {expect:?}:\n{stderr}"
    );
    assert!(
        !stdout.contains(PASSWORD) && !stderr.contains(PASSWORD),
        "{what}: the output shows the password:\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    if outdir.exists() {
        let artifacts: Vec<String> = list_dir(outdir)
            .into_iter()
            .filter(|n| is_artifact_name(n.as_ref()))
            .collect();
        assert!(
            artifacts.is_empty(),
            "{what}: artifacts left behind: {artifacts:?} (all files: {:?})",
            list_dir(outdir)
        );
    }
    eprintln!("{what}: failed as expected: {}", stderr.trim());
}

fn sum(blobs: &BTreeMap<String, u64>) -> u64 {
    blobs.values().sum()
}

fn native_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

// ---------------------------------------------------------------------------------------------
// Harness self-tests
// ---------------------------------------------------------------------------------------------

#[test]
fn harness_plain_registry_serves_pushed_image() {
    if !registry_ready() {
        return;
    }
    let _guard = serial();
    let started = Instant::now();
    let work = scratch_dir("reg-harness-");
    let demo = demo_image(work.path());
    let reg = Registry::start(Mode::Plain);
    let r = http_get(reg.port, "/v2/", &[]).expect("GET /v2/");
    assert_eq!(r.status, 200, "plain registry /v2/");
    let digest = reg.push(&demo.oci_ref(), "e2e/demo:latest", &[]);
    let r = http_get(
        reg.port,
        "/v2/e2e/demo/manifests/latest",
        &[("Accept", "application/vnd.oci.image.manifest.v1+json")],
    )
    .expect("GET manifest");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("Docker-Content-Digest"), Some(digest.as_str()));
    let manifest: Value = serde_json::from_slice(&r.body).expect("manifest JSON");
    assert_eq!(manifest, reg.manifest("e2e/demo:latest"));
    let log = reg.access_log();
    assert!(
        log.iter().any(|e| e.method == "PUT"
            && e.uri == "/v2/e2e/demo/manifests/latest"
            && e.status == 201),
        "access log has no manifest PUT: {log:?}"
    );
    eprintln!("harness plain: {:.2} s", started.elapsed().as_secs_f64());
}

#[test]
fn harness_https_basic_registry_requires_credentials() {
    if !registry_ready() {
        return;
    }
    let _guard = serial();
    let started = Instant::now();
    let work = scratch_dir("reg-harness-");
    let demo = demo_image(work.path());
    let reg = Registry::start(Mode::HttpsBasic);
    let r = reg.get("/v2/", &[]).expect("GET /v2/ over TLS");
    assert_eq!(r.status, 401);
    assert_eq!(
        r.header("WWW-Authenticate"),
        Some("Basic realm=\"hakim-e2e\"")
    );
    let basic = format!(
        "Basic {}",
        hakim_e2e::registry::base64_std(reg.creds().as_bytes())
    );
    let r = reg
        .get("/v2/", &[("Authorization", &basic)])
        .expect("GET /v2/");
    assert_eq!(r.status, 200, "bcrypt htpasswd accepts {USER}");
    let wrong = format!(
        "Basic {}",
        hakim_e2e::registry::base64_std(format!("{USER}:wrong").as_bytes())
    );
    let r = reg.get("/v2/", &[("Authorization", &wrong)]).expect("GET");
    assert_eq!(r.status, 401);
    reg.push(&demo.oci_ref(), "e2e/demo:latest", &[]);
    let m = reg.manifest("e2e/demo:latest");
    assert_eq!(manifest_blobs(&m).len(), 4, "config + 3 layers: {m}");
    eprintln!("harness https: {:.2} s", started.elapsed().as_secs_f64());
}

#[test]
fn harness_token_server_flow() {
    if !registry_ready() {
        return;
    }
    let _guard = serial();
    let started = Instant::now();
    let work = scratch_dir("reg-harness-");
    let demo = demo_image(work.path());
    let reg = Registry::start(Mode::Token);
    let token = reg.token.as_ref().expect("token server");
    let realm = token.realm();

    // The registry asks for a bearer token, GHCR-style.
    let r = http_get(reg.port, "/v2/", &[]).expect("GET /v2/");
    assert_eq!(r.status, 401);
    assert_eq!(
        r.header("WWW-Authenticate"),
        Some(format!("Bearer realm=\"{realm}\",service=\"{SERVICE}\"").as_str())
    );
    let r = http_get(reg.port, "/v2/e2e/demo/manifests/latest", &[]).expect("GET manifest");
    assert_eq!(r.status, 401);
    assert_eq!(
        r.header("WWW-Authenticate"),
        Some(
            format!(
                "Bearer realm=\"{realm}\",service=\"{SERVICE}\",scope=\"repository:e2e/demo:pull\""
            )
            .as_str()
        ),
        "manifest challenge"
    );

    // skopeo pushes through the token flow with credentials (push needs them).
    reg.push(&demo.oci_ref(), "e2e/demo:latest", &[]);
    let pushes = token.requests();
    assert!(
        pushes.iter().any(|t| t.authorization
            && t.user.as_deref() == Some(USER)
            && t.status == 200
            && t.granted
                .iter()
                .any(|(n, a)| n == "e2e/demo" && a.contains(&"push".to_string()))),
        "no push token granted to {USER}: {pushes:?}"
    );
    token.clear();

    // Anonymous: pull only; the JWT is RS256 with x5c and the registry accepts it.
    let r = http_get(
        token.port,
        &format!("/token?service={SERVICE}&scope=repository%3Ae2e%2Fdemo%3Apull%2Cpush"),
        &[],
    )
    .expect("GET /token");
    assert_eq!(r.status, 200);
    let body: Value = serde_json::from_slice(&r.body).expect("token JSON");
    assert_eq!(body["expires_in"], 300);
    assert_eq!(body["token"], body["access_token"]);
    let jwt = body["token"].as_str().expect("token");
    let parts: Vec<&str> = jwt.split('.').collect();
    assert_eq!(parts.len(), 3);
    let header: Value = serde_json::from_slice(&base64_decode(parts[0]).unwrap()).unwrap();
    let claims: Value = serde_json::from_slice(&base64_decode(parts[1]).unwrap()).unwrap();
    assert_eq!(header["alg"], "RS256");
    assert!(header["x5c"][0].as_str().is_some_and(|s| s.len() > 500));
    assert_eq!(claims["iss"], ISSUER);
    assert_eq!(claims["aud"], SERVICE);
    assert_eq!(
        claims["access"],
        serde_json::json!([{"type": "repository", "name": "e2e/demo", "actions": ["pull"]}])
    );
    let bearer = format!("Bearer {jwt}");
    let r = http_get(
        reg.port,
        "/v2/e2e/demo/manifests/latest",
        &[
            ("Authorization", &bearer),
            ("Accept", "application/vnd.oci.image.manifest.v1+json"),
        ],
    )
    .expect("GET manifest with token");
    assert_eq!(
        r.status,
        200,
        "registry rejects the token: {}\n{}",
        String::from_utf8_lossy(&r.body),
        reg.stderr_log()
    );
    let seen = token.requests();
    assert_eq!(seen.len(), 1);
    assert!(!seen[0].authorization);
    assert_eq!(seen[0].scopes, ["repository:e2e/demo:pull,push"]);

    // Wrong password: 401 from the token server.
    let wrong = format!(
        "Basic {}",
        hakim_e2e::registry::base64_std(format!("{USER}:wrong").as_bytes())
    );
    let r = http_get(
        token.port,
        &format!("/token?service={SERVICE}&scope=repository:e2e/demo:pull"),
        &[("Authorization", &wrong)],
    )
    .expect("GET /token");
    assert_eq!(r.status, 401);

    // skopeo pulls anonymously, and with credentials.
    let anon = std::process::Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(reg.docker_ref("e2e/demo:latest"))
        .envs(reg.client_env())
        .output()
        .expect("skopeo inspect");
    assert!(
        anon.status.success(),
        "anonymous skopeo inspect: {}",
        String::from_utf8_lossy(&anon.stderr)
    );
    let with_creds = reg.manifest("e2e/demo:latest");
    assert_eq!(
        serde_json::from_slice::<Value>(&anon.stdout).unwrap(),
        with_creds
    );
    eprintln!("harness token: {:.2} s", started.elapsed().as_secs_f64());
}

#[test]
fn harness_pushes_v2s2_zstd_and_multiarch() {
    if !registry_ready() {
        return;
    }
    let _guard = serial();
    let started = Instant::now();
    let work = scratch_dir("reg-harness-");
    let demo = demo_image(work.path());
    let reg = Registry::start(Mode::Plain);

    // Docker v2s2 has no zstd: recompress the demo's zstd layer first.
    let gzip = recompressed_layout(&demo, work.path(), "gzip");
    reg.push(&gzip.oci_ref(), "e2e/demo:v2s2", &["--format", "v2s2"]);
    let m = reg.manifest("e2e/demo:v2s2");
    assert_eq!(
        m["mediaType"],
        "application/vnd.docker.distribution.manifest.v2+json"
    );

    let zstd = recompressed_layout(&demo, work.path(), "zstd");
    reg.push(&zstd.oci_ref(), "e2e/demo:zstd", &[]);
    let m = reg.manifest("e2e/demo:zstd");
    let types = layer_media_types(&m);
    assert!(
        types.iter().all(|t| t.ends_with("+zstd")),
        "zstd push has other layers: {types:?}"
    );

    let arm = arm64_variant(&demo, work.path());
    let multi = multiarch_layout(
        // arm64 first: a converter that takes the first entry fails the default check.
        &[(&arm, "linux", "arm64"), (&demo, "linux", "amd64")],
        work.path(),
    );
    reg.push(&multi.oci_ref(), "e2e/multi:latest", &["--all"]);
    let index = reg.manifest("e2e/multi:latest");
    assert_eq!(
        index["mediaType"],
        "application/vnd.oci.image.index.v1+json"
    );
    let platforms: Vec<String> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            format!(
                "{}/{}",
                d["platform"]["os"].as_str().unwrap(),
                d["platform"]["architecture"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(platforms, ["linux/arm64", "linux/amd64"]);
    let arm_digest = index["manifests"][0]["digest"].as_str().unwrap();
    let arm_manifest = reg.manifest(&format!("e2e/multi@{arm_digest}"));
    assert_eq!(arm_manifest, arm.manifest());
    eprintln!("harness pushes: {:.2} s", started.elapsed().as_secs_f64());
}

// ---------------------------------------------------------------------------------------------
// Conversions through each mode
// ---------------------------------------------------------------------------------------------

#[test]
fn plain_http_matches_local_layout() {
    if !conversion_ready(true) {
        return;
    }
    let _guard = serial();
    let image = test_local_image();
    let reg = Registry::start(Mode::Plain);
    reg.push(&image.oci_ref(), &format!("{TEST_REPO}:latest"), &[]);
    let cache = scratch_dir("cache-");
    let c = convert_remote(
        &reg,
        &format!("{TEST_REPO}:latest"),
        cache.path(),
        None,
        &[],
    );
    assert_eq!(
        c.sha256,
        local_test_sha(),
        "registry (plain HTTP) and local layout artifacts differ"
    );
}

#[test]
fn https_basic_auth_matches_local_layout() {
    if !conversion_ready(true) {
        return;
    }
    let _guard = serial();
    let image = test_local_image();
    let reg = Registry::start(Mode::HttpsBasic);
    let reference = format!("{TEST_REPO}:latest");
    reg.push(&image.oci_ref(), &reference, &[]);
    let cache = scratch_dir("cache-");
    let creds = reg.creds();
    let c = convert_remote(&reg, &reference, cache.path(), Some(&creds), &[]);
    assert_eq!(
        c.sha256,
        local_test_sha(),
        "registry (HTTPS + basic auth) and local layout artifacts differ"
    );

    // Without credentials: the registry's 401 must surface as a clear error.
    let fresh = scratch_dir("cache-");
    expect_failure(
        &reg,
        &reference,
        &registry_args(&reg, fresh.path(), None),
        &[
            "401",
            "unauthorized",
            "authentication",
            "credentials",
            "login",
        ],
        "HTTPS registry without --creds",
    );
    // Wrong password.
    expect_failure(
        &reg,
        &reference,
        &registry_args(
            &reg,
            fresh.path(),
            Some(&format!("{USER}:{PASSWORD}-wrong")),
        ),
        &["401", "unauthorized", "authentication", "credentials"],
        "HTTPS registry with a wrong password",
    );
    // Without --ca-cert: the self-signed certificate must be refused.
    let mut args = registry_args(&reg, fresh.path(), Some(&creds));
    let i = args.iter().position(|a| a == "--ca-cert").unwrap();
    args.drain(i..i + 2);
    expect_failure(
        &reg,
        &reference,
        &args,
        &["certificate", "tls", "issuer"],
        "HTTPS registry without --ca-cert",
    );
}

#[test]
fn token_auth_anonymous_pull_matches_local_layout() {
    if !conversion_ready(true) {
        return;
    }
    let _guard = serial();
    let image = test_local_image();
    let reg = Registry::start(Mode::Token);
    let token = reg.token.as_ref().unwrap();
    let reference = format!("{TEST_REPO}:latest");
    reg.push(&image.oci_ref(), &reference, &[]);
    let manifest = reg.manifest(&reference);
    token.clear();
    let mark = reg.access_log_mark();
    let cache = scratch_dir("cache-");
    let c = convert_remote(&reg, &reference, cache.path(), None, &[]);
    assert_eq!(
        c.sha256,
        local_test_sha(),
        "registry (token auth) and local layout artifacts differ"
    );

    // The GHCR flow: 401 first, then anonymous pull-scope token requests.
    let log = reg.access_log_since(mark);
    assert!(
        log.first().is_some_and(|e| e.status == 401),
        "the registry's first answer to the converter was not 401: {:?}",
        log.first()
    );
    let manifest_uri = format!("/v2/{TEST_REPO}/manifests/latest");
    assert!(
        log.iter().any(|e| e.uri == manifest_uri && e.status == 200),
        "no successful manifest request: {log:?}"
    );
    let requests = token.requests();
    assert!(!requests.is_empty(), "the token server saw no request");
    for t in &requests {
        assert!(
            !t.authorization,
            "anonymous run sent credentials to the token server: {t:?}"
        );
        assert_eq!(t.path, "/token");
        assert_eq!(t.service.as_deref(), Some(SERVICE), "{t:?}");
        assert_eq!(t.status, 200, "{t:?}");
    }
    let scope = format!("repository:{TEST_REPO}:pull");
    assert!(
        requests.iter().any(|t| t.scopes.contains(&scope)),
        "no token request with scope {scope}: {requests:?}"
    );
    let unauthorized = log.iter().filter(|e| e.status == 401).count();
    eprintln!(
        "token flow: {} token request(s), {unauthorized} 401 answer(s), {} registry requests",
        requests.len(),
        log.len()
    );
    assert!(
        requests.len() <= 2 && unauthorized <= 2,
        "the token is not reused: {} token requests, {unauthorized} 401s for one image \
         ({} blobs)",
        requests.len(),
        manifest_blobs(&manifest).len()
    );
    assert_each_blob_fetched_once(&log, &unique_blobs(&[&manifest]));
}

#[test]
fn token_auth_credentials_and_wrong_password() {
    if !conversion_ready(false) {
        return;
    }
    let _guard = serial();
    let (reg, demo, _work) = demo_on_token_registry();
    let token = reg.token.as_ref().unwrap();
    let local = convert_local(&demo, &[]);

    token.clear();
    let cache = scratch_dir("cache-");
    let creds = reg.creds();
    let c = convert_remote(&reg, "e2e/demo:latest", cache.path(), Some(&creds), &[]);
    assert_eq!(
        c.sha256, local.sha256,
        "token auth with --creds: artifacts differ"
    );
    let requests = token.requests();
    assert!(
        !requests.is_empty() && requests.iter().all(|t| t.user.as_deref() == Some(USER)),
        "--creds did not reach the token server as Basic credentials: {requests:?}"
    );

    token.clear();
    let fresh = scratch_dir("cache-");
    let stderr = expect_failure(
        &reg,
        "e2e/demo:latest",
        &registry_args(
            &reg,
            fresh.path(),
            Some(&format!("{USER}:{PASSWORD}-wrong")),
        ),
        &[
            "401",
            "unauthorized",
            "authentication",
            "credentials",
            "denied",
        ],
        "token auth with a wrong password",
    );
    let requests = token.requests();
    assert!(
        requests.iter().any(|t| t.status == 401),
        "the token server never refused the wrong password: {requests:?}\n{stderr}"
    );
}

/// A token-auth registry holding the demo image as `e2e/demo:latest` (and the directory
/// of the demo's layout, to keep).
fn demo_on_token_registry() -> (Registry, LocalImage, tempfile::TempDir) {
    let work = scratch_dir("reg-work-");
    let demo = demo_image(work.path());
    let reg = Registry::start(Mode::Token);
    reg.push(&demo.oci_ref(), "e2e/demo:latest", &[]);
    (reg, demo, work)
}

/// `hakim-convert convert docker://HOST/REFERENCE -o OUT --compression zstd [ARGS…]` with the
/// registry's options (`--creds` when `creds`); the output whatever the exit status.
fn run_remote(
    reg: &Registry,
    reference: &str,
    creds: Option<&str>,
    args: &[&str],
    env: &[(&str, &str)],
) -> Output {
    let out = scratch_dir("out-");
    let cache = scratch_dir("cache-");
    let mut full = vec![
        "convert".to_string(),
        reg.docker_ref(reference),
        "-o".into(),
        out.path().display().to_string(),
        "--compression".into(),
        "zstd".into(),
    ];
    full.extend(registry_args(reg, cache.path(), creds));
    full.extend(args.iter().map(|a| a.to_string()));
    let mut full_env = converter_env(reg);
    full_env.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    run_converter(&full, &full_env)
}

/// `-vv` logs every request, auth step and layer timing of a pull with credentials and a
/// token, and never the password, the Basic header or the token; without `-v` nothing is
/// logged; an invalid `RUST_LOG` is a usage error (exit 2).
#[test]
fn verbose_log_of_an_authenticated_pull_hides_the_secrets() {
    if !conversion_ready(false) {
        return;
    }
    let _guard = serial();
    let (reg, _, _work) = demo_on_token_registry();
    let token = reg.token.as_ref().unwrap();
    token.clear();

    let creds = reg.creds();
    let out = run_remote(&reg, "e2e/demo:latest", Some(&creds), &["-vv"], &[]);
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{log}");
    assert!(out.status.success(), "-vv pull failed:\n{log}");
    for expected in [
        "credentials: --creds",
        "auth: HTTP 401, Bearer challenge",
        "auth: token request with the credentials from --creds",
        "auth: token received (value not logged)",
        "scope=repository:e2e/demo:pull",
        "method=GET",
        "/v2/e2e/demo/manifests/latest",
        "status=200",
        "authorization=true",
        "hakim_convert::timing",
        "pass=1",
        "pass=2",
    ] {
        assert!(log.contains(expected), "-vv log lacks {expected:?}:\n{log}");
    }
    let tokens: Vec<String> = token
        .requests()
        .into_iter()
        .filter_map(|r| r.token)
        .collect();
    assert!(!tokens.is_empty(), "no token was issued");
    let basic = hakim_e2e::registry::base64_std(creds.as_bytes());
    for secret in tokens
        .iter()
        .map(String::as_str)
        .chain([PASSWORD, basic.as_str()])
    {
        assert!(
            !log.contains(secret) && !stdout.contains(secret),
            "a secret ({} bytes) is in the -vv output",
            secret.len()
        );
    }

    let quiet = run_remote(&reg, "e2e/demo:latest", Some(&creds), &[], &[]);
    let quiet_log = String::from_utf8_lossy(&quiet.stderr);
    assert!(quiet.status.success(), "{quiet_log}");
    assert!(
        !quiet_log.contains("hakim_convert::"),
        "logs without -v:\n{quiet_log}"
    );
    let from_env = run_remote(
        &reg,
        "e2e/demo:latest",
        None,
        &[],
        &[("RUST_LOG", "hakim_convert::timing=debug")],
    );
    let env_log = String::from_utf8_lossy(&from_env.stderr);
    assert!(
        env_log.contains("hakim_convert::timing") && !env_log.contains("hakim_convert::registry"),
        "RUST_LOG=hakim_convert::timing=debug:\n{env_log}"
    );
    let bad = run_remote(
        &reg,
        "e2e/demo:latest",
        None,
        &[],
        &[("RUST_LOG", "hakim_convert=loud")],
    );
    let bad_log = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(2), "{bad_log}");
    assert!(bad_log.contains("RUST_LOG"), "{bad_log}");
}

/// Docker credential helpers against the htpasswd registry, through a helper program written
/// for the test (`docker-credential-hakimtest`, a shell script on `PATH`): `credHelpers` and
/// `credsStore` log in with what it answers; "credentials not found" pulls anonymously (which
/// this registry refuses); a failing helper is an error with its exit status and stderr, and
/// never its stdout.
#[test]
fn docker_credential_helpers() {
    if !conversion_ready(false) {
        return;
    }
    let _guard = serial();
    let work = scratch_dir("reg-work-");
    let demo = demo_image(work.path());
    let reg = Registry::start(Mode::HttpsBasic);
    reg.push(&demo.oci_ref(), "e2e/demo:latest", &[]);

    let bin = scratch_dir("helpers-");
    let asked = bin.path().join("asked");
    let script = format!(
        r#"#!/bin/sh
[ "$1" = get ] || exit 9
read -r server
printf '%s\n' "$server" >> '{asked}'
case "$HAKIM_HELPER_MODE" in
  ok) printf '{{"ServerURL":"%s","Username":"{USER}","Secret":"{PASSWORD}"}}' "$server" ;;
  missing) echo 'credentials not found in native keychain'; exit 1 ;;
  *) echo 'STDOUT-NEVER-SHOWN {PASSWORD}'; echo 'the keychain is locked' >&2; exit 4 ;;
esac
"#,
        asked = asked.display()
    );
    let helper = bin.path().join("docker-credential-hakimtest");
    std::fs::write(&helper, script).unwrap();
    std::fs::set_permissions(&helper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        bin.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let docker_config = reg
        .client_env()
        .into_iter()
        .find(|(k, _)| k == "DOCKER_CONFIG")
        .map(|(_, v)| std::path::PathBuf::from(v))
        .unwrap();
    std::fs::create_dir_all(&docker_config).unwrap();
    let host = reg.host();
    let pull = |config: &str, mode: &str| {
        std::fs::write(docker_config.join("config.json"), config).unwrap();
        let _ = std::fs::remove_file(&asked);
        let env = [("PATH", path.as_str()), ("HAKIM_HELPER_MODE", mode)];
        let out = run_remote(&reg, "e2e/demo:latest", None, &[], &env);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let asked = std::fs::read_to_string(&asked).unwrap_or_default();
        (out.status.success(), stderr, asked)
    };
    let per_registry = format!(r#"{{"credHelpers":{{"{host}":"hakimtest"}}}}"#);
    let store = format!(r#"{{"auths":{{"{host}":{{}}}},"credsStore":"hakimtest"}}"#);

    let (ok, stderr, asked_for) = pull(&per_registry, "ok");
    assert!(ok, "credHelpers: the pull failed:\n{stderr}");
    assert_eq!(
        asked_for.trim(),
        host,
        "credHelpers: the helper was asked about another server"
    );
    let (ok, stderr, asked_for) = pull(&store, "ok");
    assert!(ok, "credsStore: the pull failed:\n{stderr}");
    assert_eq!(asked_for.trim(), host);

    let (ok, stderr, asked_for) = pull(&store, "missing");
    assert!(!ok && asked_for.trim() == host, "not found: {stderr}");
    assert!(
        stderr.contains("requires a login"),
        "\"credentials not found\" must mean anonymous (refused by this registry):\n{stderr}"
    );

    let (ok, stderr, _) = pull(&per_registry, "broken");
    assert!(!ok, "a failing helper must fail the run");
    for expected in [
        "docker-credential-hakimtest",
        "exit status: 4",
        "the keychain is locked",
    ] {
        assert!(
            stderr.contains(expected),
            "helper failure lacks {expected:?}:\n{stderr}"
        );
    }
    assert!(
        !stderr.contains("STDOUT-NEVER-SHOWN") && !stderr.contains(PASSWORD),
        "the helper's stdout reached the output:\n{stderr}"
    );
}

// ---------------------------------------------------------------------------------------------
// Manifest and layer formats
// ---------------------------------------------------------------------------------------------

#[test]
fn docker_v2s2_and_zstd_layers_convert() {
    if !conversion_ready(true) {
        return;
    }
    let _guard = serial();
    let image = test_local_image();
    let work = scratch_dir("reg-work-");
    let reg = Registry::start(Mode::Plain);

    reg.push(
        &image.oci_ref(),
        &format!("{TEST_REPO}:v2s2"),
        &["--format", "v2s2"],
    );
    let m = reg.manifest(&format!("{TEST_REPO}:v2s2"));
    assert_eq!(
        m["mediaType"],
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    assert!(layer_media_types(&m)
        .iter()
        .all(|t| t == "application/vnd.docker.image.rootfs.diff.tar.gzip"));
    let cache = scratch_dir("cache-");
    let c = convert_remote(&reg, &format!("{TEST_REPO}:v2s2"), cache.path(), None, &[]);
    assert_eq!(
        c.sha256,
        local_test_sha(),
        "Docker v2s2 push: artifacts differ"
    );

    let started = Instant::now();
    let zstd = recompressed_layout(&image, work.path(), "zstd");
    eprintln!(
        "recompressed the test image to zstd in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    reg.push(&zstd.oci_ref(), &format!("{TEST_REPO}:zstd"), &[]);
    let m = reg.manifest(&format!("{TEST_REPO}:zstd"));
    let types = layer_media_types(&m);
    assert!(
        types
            .iter()
            .all(|t| t == "application/vnd.oci.image.layer.v1.tar+zstd"),
        "the pushed manifest does not have only zstd layers: {types:?}"
    );
    let local_zstd = convert_local(&zstd, &[]);
    let cache = scratch_dir("cache-");
    let c = convert_remote(&reg, &format!("{TEST_REPO}:zstd"), cache.path(), None, &[]);
    assert_eq!(
        c.sha256, local_zstd.sha256,
        "zstd layers: registry and local zstd layout artifacts differ"
    );
    assert_eq!(
        c.sha256,
        local_test_sha(),
        "zstd layers: artifact differs from the gzip image's"
    );
}

#[test]
fn multi_arch_index_selects_platform() {
    if !conversion_ready(false) {
        return;
    }
    let _guard = serial();
    let work = scratch_dir("reg-work-");
    let demo = demo_image(work.path());
    let arm = arm64_variant(&demo, work.path());
    let multi = multiarch_layout(
        // arm64 first: a converter that takes the first entry fails the default check.
        &[(&arm, "linux", "arm64"), (&demo, "linux", "amd64")],
        work.path(),
    );
    let reg = Registry::start(Mode::Plain);
    reg.push(&multi.oci_ref(), "e2e/multi:latest", &["--all"]);
    let local_amd64 = convert_local(&demo, &[]);
    let local_arm64 = convert_local(&arm, &[]);
    assert_ne!(local_amd64.sha256, local_arm64.sha256);

    let cache = scratch_dir("cache-");
    let arm64 = convert_remote(
        &reg,
        "e2e/multi:latest",
        cache.path(),
        None,
        &["--platform", "linux/arm64"],
    );
    assert_eq!(arm64.sha256, local_arm64.sha256, "--platform linux/arm64");
    let amd64 = convert_remote(
        &reg,
        "e2e/multi:latest",
        cache.path(),
        None,
        &["--platform", "linux/amd64"],
    );
    assert_eq!(amd64.sha256, local_amd64.sha256, "--platform linux/amd64");
    if native_arch() == "amd64" {
        let default = convert_remote(&reg, "e2e/multi:latest", cache.path(), None, &[]);
        assert_eq!(
            default.sha256, local_amd64.sha256,
            "default platform on an amd64 host"
        );
    }
    let fresh = scratch_dir("cache-");
    let mut args = registry_args(&reg, fresh.path(), None);
    args.extend(["--platform".to_string(), "linux/s390x".to_string()]);
    expect_failure(
        &reg,
        "e2e/multi:latest",
        &args,
        &["s390x", "platform"],
        "index without the requested platform",
    );
}

#[test]
fn bare_reference_form_matches_local_layout() {
    if !conversion_ready(false) {
        return;
    }
    let _guard = serial();
    let work = scratch_dir("reg-work-");
    let demo = demo_image(work.path());
    let reg = Registry::start(Mode::Plain);
    reg.push(&demo.oci_ref(), "hakim-demo:latest", &[]);

    // Default name and compression on both sides: hakim-demo-<release>-<arch>.tar.xz.
    let env = converter_env(&reg);
    let local_out = work.path().join("local");
    let out = run_converter(
        &[
            "convert".into(),
            demo.oci_ref(),
            "-o".into(),
            local_out.display().to_string(),
        ],
        &env,
    );
    assert!(
        out.status.success(),
        "local conversion ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let remote_out = work.path().join("remote");
    let cache = work.path().join("cache");
    let started = Instant::now();
    let out = run_converter(
        &[
            format!("{}/hakim-demo:latest", reg.host()),
            "--out".into(),
            remote_out.display().to_string(),
            "--cache-dir".into(),
            cache.display().to_string(),
        ],
        &env,
    );
    assert!(
        out.status.success(),
        "hakim-convert {}/hakim-demo:latest --out DIR failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        reg.host(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "bare form converted in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    let artifacts = |dir: &Path| -> Vec<(String, String)> {
        list_dir(dir)
            .into_iter()
            .filter(|n| is_artifact_name(n.as_ref()))
            .map(|n| {
                let sha = hakim_e2e::sha256_file(&dir.join(&n));
                (n, sha)
            })
            .collect()
    };
    let local = artifacts(&local_out);
    let remote = artifacts(&remote_out);
    assert_eq!(local.len(), 1, "local: {:?}", list_dir(&local_out));
    assert_eq!(
        remote, local,
        "bare registry reference vs local layout: artifact name or bytes differ"
    );
}

// ---------------------------------------------------------------------------------------------
// Blob cache
// ---------------------------------------------------------------------------------------------

#[test]
fn cached_rerun_downloads_nothing() {
    if !conversion_ready(true) {
        return;
    }
    let _guard = serial();
    let image = test_local_image();
    let reg = Registry::start(Mode::Token);
    let reference = format!("{TEST_REPO}:latest");
    reg.push(&image.oci_ref(), &reference, &[]);
    let blobs = unique_blobs(&[&reg.manifest(&reference)]);
    let cache = scratch_dir("cache-");

    let mark = reg.access_log_mark();
    let first = convert_remote(&reg, &reference, cache.path(), None, &[]);
    let t1 = Transfer::from_json(&first.json);
    assert_each_blob_fetched_once(&reg.access_log_since(mark), &blobs);
    assert_eq!(
        (t1.bytes_downloaded, t1.blobs_downloaded as usize),
        (sum(&blobs), blobs.len()),
        "first run into an empty cache: {t1:?}"
    );
    assert_eq!((t1.bytes_reused, t1.blobs_reused), (0, 0), "{t1:?}");

    let mark = reg.access_log_mark();
    let second = convert_remote(&reg, &reference, cache.path(), None, &[]);
    let t2 = Transfer::from_json(&second.json);
    assert_eq!(second.sha256, first.sha256);
    assert_eq!(
        (t2.bytes_downloaded, t2.blobs_downloaded),
        (0, 0),
        "second run with the same cache downloaded something: {t2:?}"
    );
    assert_eq!(
        (t2.bytes_reused, t2.blobs_reused as usize),
        (sum(&blobs), blobs.len()),
        "{t2:?}"
    );
    let fetched = blob_fetches(&reg.access_log_since(mark));
    assert!(
        fetched.is_empty(),
        "the registry served blobs to the cached run: {fetched:?}"
    );
    eprintln!(
        "cache: first run {} s downloaded {} bytes; second {} s downloaded 0, reused {}",
        first.seconds, t1.bytes_downloaded, second.seconds, t2.bytes_reused
    );

    // A blob downloaded in this run is hashed once, while it arrives; one found in the
    // cache is hashed again when read. A cached layer damaged in place (same size, so the
    // cache's size check lets it through) must be caught by that hash.
    let manifest = reg.manifest(&reference);
    let layer = manifest["layers"][0]["digest"].as_str().unwrap();
    let cached = cache
        .path()
        .join("blobs/sha256")
        .join(layer.trim_start_matches("sha256:"));
    let mut bytes = std::fs::read(&cached).expect("the layer is cached");
    // The gzip header's MTIME: nothing inside the gzip stream checks it, and the
    // uncompressed layer (its diff_id) stays the same, so only the blob hash can tell.
    assert_eq!(&bytes[..2], b"\x1f\x8b", "a gzip layer");
    bytes[4] ^= 0x01;
    std::fs::write(&cached, &bytes).unwrap();
    expect_failure(
        &reg,
        &reference,
        &registry_args(&reg, cache.path(), None),
        &["digest mismatch"],
        "a cached layer changed in place",
    );
}

/// The same image converted twice from the registry — a cold cache with one compression thread
/// and one download at a time, then a warm cache with two threads and four downloads — gives
/// the same bytes, which are also those of the local-layout conversion.
#[test]
fn reproducible_across_threads_and_cache_states() {
    if !conversion_ready(true) {
        return;
    }
    let _guard = serial();
    let image = test_local_image();
    let reg = Registry::start(Mode::Plain);
    let reference = format!("{TEST_REPO}:latest");
    reg.push(&image.oci_ref(), &reference, &[]);
    let cache = scratch_dir("cache-");
    let cold = convert_remote(
        &reg,
        &reference,
        cache.path(),
        None,
        &["--threads", "1", "--jobs", "1"],
    );
    assert!(
        Transfer::from_json(&cold.json).bytes_downloaded > 0,
        "cold cache"
    );
    let warm = convert_remote(
        &reg,
        &reference,
        cache.path(),
        None,
        &["--threads", "2", "--jobs", "4"],
    );
    assert_eq!(
        Transfer::from_json(&warm.json).bytes_downloaded,
        0,
        "warm cache"
    );
    eprintln!(
        "cold cache, 1 thread: {:.1} s; warm cache, 2 threads: {:.1} s; sha256 {}",
        cold.seconds, warm.seconds, cold.sha256
    );
    assert_eq!(
        cold.sha256, warm.sha256,
        "cold/1 thread and warm/2 threads differ"
    );
    assert_eq!(
        cold.sha256,
        local_test_sha(),
        "registry and local layout differ"
    );
}

#[test]
fn shared_base_layers_download_once() {
    if !conversion_ready(true) {
        return;
    }
    let _guard = serial();
    let image = test_local_image();
    let work = scratch_dir("reg-work-");
    let derived = derived_image(&image, work.path());
    let reg = Registry::start(Mode::Plain);
    reg.push(&image.oci_ref(), "e2e/base:1", &[]);
    reg.push(&derived.oci_ref(), "e2e/derived:1", &[]);
    let base_m = reg.manifest("e2e/base:1");
    let derived_m = reg.manifest("e2e/derived:1");
    let base_blobs = unique_blobs(&[&base_m]);
    let derived_blobs = unique_blobs(&[&derived_m]);
    let all = unique_blobs(&[&base_m, &derived_m]);
    let shared: BTreeMap<String, u64> = base_blobs
        .iter()
        .filter(|(d, _)| derived_blobs.contains_key(*d))
        .map(|(d, s)| (d.clone(), *s))
        .collect();
    assert_eq!(
        shared.len(),
        manifest_blobs(&base_m).len() - 1,
        "the derived image must share every layer of the base"
    );

    let cache = scratch_dir("cache-");
    let a = convert_remote(&reg, "e2e/base:1", cache.path(), None, &[]);
    let b = convert_remote(&reg, "e2e/derived:1", cache.path(), None, &[]);
    let (ta, tb) = (Transfer::from_json(&a.json), Transfer::from_json(&b.json));
    let downloaded = ta.bytes_downloaded + tb.bytes_downloaded;
    let manifests_bytes: usize = ["e2e/base:1", "e2e/derived:1"]
        .iter()
        .map(|r| reg.raw_manifest(r).len())
        .sum();
    eprintln!(
        "shared base: downloaded {} + {} = {downloaded} bytes; unique blobs {} bytes ({} blobs); \
         base alone {} bytes, derived alone {} bytes; reused on the second image {} bytes \
         (shared layers {} bytes); manifests {manifests_bytes} bytes",
        ta.bytes_downloaded,
        tb.bytes_downloaded,
        sum(&all),
        all.len(),
        sum(&base_blobs),
        sum(&derived_blobs),
        tb.bytes_reused,
        sum(&shared)
    );
    assert_eq!(
        downloaded,
        sum(&all),
        "bytes downloaded for two images sharing a base != sum of the unique blob sizes"
    );
    assert_eq!(
        tb.bytes_reused,
        sum(&shared),
        "second image: reused bytes != the shared layers"
    );
    assert_eq!(tb.blobs_reused as usize, shared.len(), "{tb:?}");
}

#[test]
fn digest_pinned_rerun_works_with_registry_stopped() {
    if !conversion_ready(true) {
        return;
    }
    let _guard = serial();
    let image = test_local_image();
    let mut reg = Registry::start(Mode::Plain);
    let digest = reg.push(&image.oci_ref(), &format!("{TEST_REPO}:latest"), &[]);
    let pinned = format!("{TEST_REPO}@{digest}");
    let cache = scratch_dir("cache-");
    let online = convert_remote(&reg, &pinned, cache.path(), None, &[]);
    assert_eq!(online.sha256, local_test_sha());

    let port = reg.port;
    reg.stop();
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the registry still answers on port {port}"
    );
    let offline = convert_remote(&reg, &pinned, cache.path(), None, &[]);
    assert_eq!(
        offline.sha256, online.sha256,
        "air-gapped re-run: artifact differs"
    );
    let t = Transfer::from_json(&offline.json);
    assert_eq!((t.bytes_downloaded, t.blobs_downloaded), (0, 0), "{t:?}");

    // A tag needs the registry: it must fail clearly, not convert something stale. (Two
    // attempts: the default budget retries a refused connection for about a minute.)
    let mut args = registry_args(&reg, cache.path(), None);
    args.extend(["--max-attempts".to_string(), "2".to_string()]);
    expect_failure(
        &reg,
        &format!("{TEST_REPO}:latest"),
        &args,
        &["connect", "refused", "unreachable", "127.0.0.1"],
        "tag reference with the registry stopped",
    );
}

//! End-to-end tests of the push library (`hakim_convert::registry::push`) against a real
//! Distribution registry (Debian's `docker-registry` 2.8) on 127.0.0.1, in token, HTTPS basic
//! and plain modes (`tests/src/registry.rs`), and behind the fault proxy
//! (`tests/src/fault_proxy.rs`) for upload faults.
//!
//! The image is crafted blob by blob (`hakim_convert::sample`: a 160 KiB layer of
//! incompressible bytes, a small layer, an OCI config and manifest) into an OCI layout, and
//! pushed from it (or from an OCI archive skopeo made of it).
//!
//! Oracles: `skopeo copy docker://… oci-archive:…` (what Proxmox VE's `oci-registry-pull` runs)
//! must give back the pushed manifest (same digest, same bytes) and every pushed blob byte for
//! byte; the converter must turn the pushed image into the same artifact as the local layout;
//! the registry's access log, its storage directory and the token server's request log show
//! what was really sent, mounted, refused or left behind.
//!
//! Gating: `docker-registry`, `skopeo`, `openssl`, `htpasswd`, `umoci` (the registry harness)
//! and, for the conversion check, a converter with the registry transport. Missing ones skip,
//! or fail under `HAKIM_E2E=1`.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use hakim_convert::push_layout::{from_oci_archive, from_oci_layout};
use hakim_convert::registry::push::{push, BlobUpload, PushRequest, PushStats, UploadOptions};
use hakim_convert::registry::retry::Backoff;
use hakim_convert::registry::{Credentials, Reference, RegistryOptions, RetryPolicy};
use hakim_convert::sample::{write_oci_layout, BlobCompression, LayerBuilder, SampleLayer};
use hakim_convert::tarout::OutKind;
use hakim_e2e::fault_proxy::{FaultProxy, UploadFault, UploadRule};
use hakim_e2e::registry::{
    converter_ready, demo_image, registry_ready, sha256_hex, AccessLogEntry, Mode, Options,
    Registry, PASSWORD, USER,
};
use hakim_e2e::{convert, converter_bin, run_ok, scratch_dir, Compression};

const SOURCE_DATE_EPOCH: &str = "1750000000";
/// Chunked uploads in the tests: anything over 1 KiB, 16 KiB per `PATCH`.
const SMALL_CHUNKS: UploadOptions = UploadOptions {
    chunk_threshold: 1024,
    chunk_size: 16 * 1024,
};
const CHUNK: u64 = 16 * 1024;

// ---------------------------------------------------------------------------------------------
// The crafted image
// ---------------------------------------------------------------------------------------------

/// The crafted image in an OCI layout, with its manifest and blobs in memory.
struct Crafted {
    layout: PathBuf,
    digest: String,
    manifest: Vec<u8>,
    /// Config and layers: digest → bytes.
    blobs: BTreeMap<String, Vec<u8>>,
}

impl Crafted {
    fn blob_bytes(&self) -> u64 {
        self.blobs.values().map(|b| b.len() as u64).sum()
    }

    /// The largest blob (the noise layer).
    fn big_blob(&self) -> (&String, &Vec<u8>) {
        self.blobs
            .iter()
            .max_by_key(|(_, b)| b.len())
            .expect("blobs")
    }
}

/// Bytes gzip cannot shrink (xorshift64*), so the layer blob stays large.
fn noise(len: usize, mut state: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

fn craft(dir: &Path) -> Crafted {
    let base = LayerBuilder::new()
        .dir("etc/", 0o755)
        .file("etc/os-release", "ID=debian\nVERSION_ID=\"13\"\n")
        .dir("opt/", 0o755)
        .entry(
            b"opt/noise.bin",
            OutKind::File,
            0o644,
            None,
            &noise(160 * 1024, 0x9e37_79b9_7f4a_7c15),
            &[],
        )
        .finish();
    let top = LayerBuilder::new()
        .dir("etc/hakim/", 0o755)
        .file("etc/hakim/pushed", "pushed by the e2e tests\n")
        .finish();
    let layout = dir.join("layout");
    let digest = write_oci_layout(
        &layout,
        "v1",
        "amd64",
        &[
            SampleLayer::new(base, BlobCompression::Gzip),
            SampleLayer::new(top, BlobCompression::Gzip),
        ],
        serde_json::json!({"Env": ["PATH=/usr/bin:/bin"], "Cmd": ["/bin/sh"]}),
    )
    .expect("write the crafted layout");
    let image = load_layout(&layout);
    assert_eq!(image.digest, digest.to_string());
    assert_eq!(image.blobs.len(), 3, "config and two layers");
    image
}

/// The one image of an OCI layout directory.
fn load_layout(layout: &Path) -> Crafted {
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(layout.join("index.json")).expect("index.json"))
            .expect("index.json is JSON");
    let digest = index["manifests"][0]["digest"]
        .as_str()
        .expect("a manifest digest")
        .to_string();
    let mut blobs = read_blobs(layout);
    let manifest = blobs.remove(&digest).expect("manifest blob");
    Crafted {
        layout: layout.to_path_buf(),
        digest,
        manifest,
        blobs,
    }
}

/// Extracts a tar (GNU tar) into `dir`.
fn untar(archive: &Path, dir: &Path) {
    fs::create_dir_all(dir).expect("create extraction dir");
    run_ok(
        Command::new("tar")
            .arg("-xf")
            .arg(archive)
            .arg("-C")
            .arg(dir),
    );
}

/// Every blob of a layout, checked against its name.
fn read_blobs(layout: &Path) -> BTreeMap<String, Vec<u8>> {
    let dir = layout.join("blobs/sha256");
    let mut out = BTreeMap::new();
    for e in fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let e = e.expect("dir entry");
        let bytes = fs::read(e.path()).expect("read blob");
        let name = e.file_name().to_string_lossy().into_owned();
        assert_eq!(
            sha256_hex(&bytes),
            name,
            "blob {name} does not match its name"
        );
        out.insert(format!("sha256:{name}"), bytes);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// The gate, a scratch directory with the crafted image, and a registry in `mode`.
fn setup(
    prefix: &str,
    mode: Mode,
    options: Options,
) -> Option<(tempfile::TempDir, Crafted, Registry)> {
    if !registry_ready() {
        return None;
    }
    let work = scratch_dir(prefix);
    let image = craft(work.path());
    let reg = Registry::start_with(mode, options);
    Some((work, image, reg))
}

/// Push options for `reg`: its CA, the harness credentials when `creds`, `upload`, quick
/// retries.
fn options(reg: &Registry, creds: bool, upload: UploadOptions) -> RegistryOptions {
    RegistryOptions {
        upload,
        credentials: creds.then(|| Credentials::new(USER, PASSWORD)),
        ca_certs: reg.tls_cert.iter().cloned().collect(),
        retry: RetryPolicy {
            max_attempts: 4,
            backoff: Backoff {
                base: Duration::from_millis(50),
                cap: Duration::from_millis(500),
                ..RetryPolicy::default().backoff
            },
            ..RetryPolicy::default()
        },
        ..RegistryOptions::default()
    }
}

fn target(host: &str, reference: &str) -> Reference {
    Reference::parse(&format!("{host}/{reference}")).expect("target reference")
}

/// The crafted layout as a push to `host/reference`.
fn request(image: &Crafted, host: &str, reference: &str) -> PushRequest {
    from_oci_layout(&image.layout, target(host, reference)).expect("push request from layout")
}

/// `(bytes_uploaded, blobs_uploaded, blobs_existing, blobs_mounted)`
fn counts(s: &PushStats) -> (u64, u64, u64, u64) {
    (
        s.bytes_uploaded,
        s.blobs_uploaded,
        s.blobs_existing,
        s.blobs_mounted,
    )
}

fn push_ok(req: &PushRequest, opts: &RegistryOptions) -> PushStats {
    let started = std::time::Instant::now();
    let stats = push(req, opts).unwrap_or_else(|e| panic!("push failed: {e:#}"));
    eprintln!(
        "pushed to {}/{} in {:.2} s: {stats:?}",
        req.target.registry,
        req.target.repository,
        started.elapsed().as_secs_f64()
    );
    stats
}

/// Pushes `image` to `reference` with `mount_from = from`; the stats and the access-log
/// entries of the push.
fn push_mounting(
    reg: &Registry,
    image: &Crafted,
    reference: &str,
    from: &str,
    opts: &RegistryOptions,
) -> (PushStats, Vec<AccessLogEntry>) {
    let mark = reg.access_log_mark();
    let mut req = request(image, &reg.host(), reference);
    req.mount_from = Some(from.into());
    let stats = push_ok(&req, opts);
    (stats, reg.access_log_since(mark))
}

fn push_err(req: &PushRequest, opts: &RegistryOptions) -> String {
    match push(req, opts) {
        Ok(stats) => panic!("push succeeded but should have failed: {stats:?}"),
        Err(e) => {
            let msg = format!("{e:#}");
            eprintln!("push failed as expected: {msg}");
            msg
        }
    }
}

fn assert_contains(text: &str, parts: &[&str]) {
    for p in parts {
        assert!(text.contains(p), "expected {p:?} in: {text}");
    }
}

/// `skopeo copy docker://HOST/REFERENCE oci-archive:…` checked against `image`: the archive's
/// members are `oci-layout`, `index.json` and `blobs/sha256/…` only; its one manifest is the
/// pushed one (digest and bytes) and its blobs are exactly the pushed blobs, byte for byte.
fn check_pulled(reg: &Registry, reference: &str, image: &Crafted, work: &Path) {
    let name = reference.replace(['/', ':'], "_");
    let archive = work.join(format!("{name}.tar"));
    reg.copy_to_archive(reference, &archive);
    let listing = run_ok(Command::new("tar").arg("-tf").arg(&archive)).stdout;
    for member in String::from_utf8_lossy(&listing).lines() {
        assert!(
            member == "oci-layout"
                || member == "index.json"
                || member == "blobs/"
                || member == "blobs/sha256/"
                || member.starts_with("blobs/sha256/"),
            "unexpected member {member:?} in {}",
            archive.display()
        );
    }
    let dir = work.join(format!("{name}.extracted"));
    untar(&archive, &dir);
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join("index.json")).expect("index.json"))
            .expect("index.json is JSON");
    let manifests = index["manifests"].as_array().expect("manifests");
    assert_eq!(manifests.len(), 1, "{index}");
    assert_eq!(manifests[0]["digest"].as_str(), Some(image.digest.as_str()));
    assert_eq!(
        manifests[0]["mediaType"].as_str(),
        Some("application/vnd.oci.image.manifest.v1+json")
    );
    let mut pulled = read_blobs(&dir);
    assert_eq!(
        pulled.remove(&image.digest).as_deref(),
        Some(image.manifest.as_slice()),
        "the pulled manifest differs from the pushed one"
    );
    assert_eq!(
        pulled.keys().collect::<Vec<_>>(),
        image.blobs.keys().collect::<Vec<_>>(),
        "the pulled blobs differ from the pushed ones"
    );
    for (d, bytes) in &image.blobs {
        assert!(pulled[d] == *bytes, "blob {d} differs after the round trip");
    }
    eprintln!(
        "skopeo pulled {reference}: manifest and {} blobs identical",
        pulled.len()
    );
}

/// Access-log entries whose method is `method` and whose URI contains `part`.
fn requests<'a>(log: &'a [AccessLogEntry], method: &str, part: &str) -> Vec<&'a AccessLogEntry> {
    log.iter()
        .filter(|e| e.method == method && e.uri.contains(part))
        .collect()
}

/// `POST /v2/<repo>/blobs/uploads/` on the registry, by hand: the `Location` it answers.
fn raw_upload_location(port: u16, repo: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "POST /v2/{repo}/blobs/uploads/ HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read");
    raw.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("location")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_else(|| panic!("no Location in: {raw}"))
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// Token auth: a push, skopeo's pull of it, the converter's conversion of it; a second push
/// that sends nothing; a push to another repository that mounts every blob.
#[test]
fn token_auth_push_pull_repush_and_mount() {
    let Some((work, image, reg)) = setup("push-token-", Mode::Token, Options::default()) else {
        return;
    };
    let opts = options(&reg, true, UploadOptions::default());
    let tokens = reg.token.as_ref().expect("token server");

    let req = request(&image, &reg.host(), "e2e/pushed:v1");
    let stats = push_ok(&req, &opts);
    assert_eq!(stats.manifest_digest, image.digest);
    assert_eq!(counts(&stats), (image.blob_bytes(), 3, 0, 0));
    let log = reg.access_log();
    // Config then layers, each uploaded once (POST, then PUT ?digest= answered 201), then the
    // manifest.
    let puts: Vec<&AccessLogEntry> = requests(&log, "PUT", "/v2/e2e/pushed/blobs/uploads/");
    assert_eq!(puts.len(), 3, "{puts:?}");
    assert!(puts.iter().all(|e| e.status == 201), "{puts:?}");
    let config = serde_json::from_slice::<serde_json::Value>(&image.manifest).unwrap()["config"]
        ["digest"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        puts[0].uri.contains(&config.replace(':', "%3A")),
        "the config goes first: {puts:?}"
    );
    let manifest_put = requests(&log, "PUT", "/v2/e2e/pushed/manifests/v1");
    assert_eq!(manifest_put.len(), 1);
    assert_eq!(manifest_put[0].status, 201);
    let last = log.iter().rposition(|e| e.method == "PUT").unwrap();
    assert!(
        log[last].uri.contains("/manifests/v1"),
        "the manifest goes last"
    );
    // One token, asked with push scope, granted pull and push.
    let asked: Vec<_> = tokens
        .requests()
        .into_iter()
        .filter(|r| {
            r.scopes
                .iter()
                .any(|s| s == "repository:e2e/pushed:pull,push")
        })
        .collect();
    assert!(!asked.is_empty(), "{:?}", tokens.requests());
    assert!(asked.iter().all(|r| r.user.as_deref() == Some(USER)));
    assert!(
        asked
            .iter()
            .any(|r| r.granted
                == vec![("e2e/pushed".to_string(), vec!["pull".into(), "push".into()])])
    );

    check_pulled(&reg, "e2e/pushed:v1", &image, work.path());

    // The same push again: every blob is there already.
    let mark = reg.access_log_mark();
    let again = push_ok(&req, &opts);
    assert_eq!(again.manifest_digest, image.digest);
    assert_eq!(counts(&again), (0, 0, 3, 0));
    let since = reg.access_log_since(mark);
    assert!(
        requests(&since, "POST", "/blobs/uploads/").is_empty(),
        "{since:?}"
    );
    let heads = requests(&since, "HEAD", "/v2/e2e/pushed/blobs/");
    assert_eq!(
        heads.iter().filter(|e| e.status == 200).count(),
        3,
        "{heads:?}"
    );

    // Another repository of the same registry, mounting from the first.
    tokens.clear();
    let (stats, since) = push_mounting(&reg, &image, "e2e/mounted:v1", "e2e/pushed", &opts);
    assert_eq!(counts(&stats), (0, 0, 0, 3));
    let mounts = requests(&since, "POST", "/v2/e2e/mounted/blobs/uploads/?mount=");
    assert_eq!(mounts.len(), 3, "{since:?}");
    assert!(mounts
        .iter()
        .all(|e| e.status == 201 && e.uri.contains("from=e2e%2Fpushed")));
    assert!(
        requests(&since, "PUT", "/blobs/uploads/").is_empty(),
        "nothing uploaded"
    );
    for d in image.blobs.keys() {
        assert!(
            reg.repository_links_blob("e2e/mounted", d),
            "{d} not in e2e/mounted"
        );
    }
    // Both scopes in one token request.
    assert!(tokens.requests().iter().any(|r| {
        r.scopes
            .contains(&"repository:e2e/mounted:pull,push".to_string())
            && r.scopes.contains(&"repository:e2e/pushed:pull".to_string())
    }));
    check_pulled(&reg, "e2e/mounted:v1", &image, work.path());

    // A source repository without the blobs: the registry opens uploads instead (202).
    let (stats, since) = push_mounting(&reg, &image, "e2e/not-mounted:v1", "e2e/empty", &opts);
    assert_eq!(counts(&stats), (image.blob_bytes(), 3, 0, 0));
    let posts = requests(&since, "POST", "/v2/e2e/not-mounted/blobs/uploads/");
    assert_eq!(posts.len(), 3, "one POST per blob: {posts:?}");
    assert!(posts
        .iter()
        .all(|e| e.uri.contains("mount=") && e.status == 202));

    // A source repository we may not read: the mount is refused (401) once, then uploads.
    tokens.deny("e2e/secret");
    let (stats, since) = push_mounting(&reg, &image, "e2e/no-mount:v1", "e2e/secret", &opts);
    assert_eq!(counts(&stats), (image.blob_bytes(), 3, 0, 0));
    let mount_posts = requests(&since, "POST", "?mount=");
    assert!(
        !mount_posts.is_empty() && mount_posts.iter().all(|e| e.status == 401),
        "{mount_posts:?}"
    );
    check_pulled(&reg, "e2e/no-mount:v1", &image, work.path());

    // The converter reads the pushed image like the local layout.
    if converter_ready() {
        let cache = work.path().join("cache");
        let mut env = reg.client_env();
        env.push(("SOURCE_DATE_EPOCH".into(), SOURCE_DATE_EPOCH.into()));
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let remote = convert(
            &reg.docker_ref("e2e/pushed:v1"),
            Compression::Zstd,
            &["--cache-dir", &cache.display().to_string()],
            &env,
        );
        let local = convert(
            &format!("oci:{}:v1", image.layout.display()),
            Compression::Zstd,
            &[],
            &[("SOURCE_DATE_EPOCH", SOURCE_DATE_EPOCH)],
        );
        assert_eq!(
            remote.sha256, local.sha256,
            "pushed image converts differently"
        );
    }
}

/// Chunked uploads (1 KiB threshold, 16 KiB chunks) from an OCI archive, with relative
/// `Location` headers: the same manifest digest and the same blobs as a monolithic push.
#[test]
fn chunked_upload_matches_monolithic() {
    let relative = Options {
        relative_urls: true,
    };
    let Some((work, image, reg)) = setup("push-chunked-", Mode::Plain, relative) else {
        return;
    };
    let location = raw_upload_location(reg.port, "e2e/probe");
    assert!(
        location.starts_with("/v2/"),
        "Location is not relative: {location}"
    );
    let archive = work.path().join("image.tar");
    run_ok(
        Command::new("skopeo")
            .args(["copy", "--quiet"])
            .arg(format!("oci:{}:v1", image.layout.display()))
            .arg(format!("oci-archive:{}", archive.display())),
    );

    let mono = push_ok(
        &request(&image, &reg.host(), "e2e/mono:v1"),
        &options(&reg, false, UploadOptions::default()),
    );
    let mark = reg.access_log_mark();
    let req = from_oci_archive(&archive, target(&reg.host(), "e2e/chunked:v1"))
        .expect("push request from archive");
    let opts = options(&reg, false, SMALL_CHUNKS);
    let chunked = push_ok(&req, &opts);
    assert_eq!(chunked.manifest_digest, image.digest);
    assert_eq!(chunked.manifest_digest, mono.manifest_digest);
    assert_eq!(chunked.bytes_uploaded, image.blob_bytes());
    assert_eq!(chunked.blobs_uploaded, 3);

    let since = reg.access_log_since(mark);
    let patches = requests(&since, "PATCH", "/v2/e2e/chunked/blobs/uploads/");
    let expected: u64 = image
        .blobs
        .values()
        .map(|b| b.len() as u64)
        .filter(|&n| n > SMALL_CHUNKS.chunk_threshold)
        .map(|n| n.div_ceil(CHUNK))
        .sum();
    assert!(expected >= 10, "the big layer should take many chunks");
    assert_eq!(patches.len() as u64, expected, "{patches:?}");
    assert!(patches.iter().all(|e| e.status == 202), "{patches:?}");
    // Chunked blobs are closed by a PUT without a body; small ones go in one PUT.
    assert_eq!(
        requests(&since, "PUT", "/v2/e2e/chunked/blobs/uploads/").len(),
        3
    );
    assert!(reg.open_uploads("e2e/chunked").is_empty());

    check_pulled(&reg, "e2e/mono:v1", &image, work.path());
    check_pulled(&reg, "e2e/chunked:v1", &image, work.path());

    // A registry asking for chunks of at least 64 KiB (docker-registry 2.8 does not; the proxy
    // adds the header to its answers) gets them.
    let proxy = FaultProxy::start(reg.port);
    let min = 64 * 1024u64;
    proxy.add_upload_rule(UploadRule {
        method: "POST".into(),
        skip: 0,
        times: usize::MAX,
        fault: UploadFault::AddHeader {
            name: "OCI-Chunk-Min-Length".into(),
            value: min.to_string(),
        },
    });
    let stats = push_ok(&request(&image, &proxy.host(), "e2e/min-chunk:v1"), &opts);
    assert_eq!(stats.manifest_digest, image.digest);
    let patches = proxy
        .seen()
        .into_iter()
        .filter(|s| s.method == "PATCH" && s.status == 202)
        .count() as u64;
    assert_eq!(patches, (image.big_blob().1.len() as u64).div_ceil(min));
    check_pulled(&reg, "e2e/min-chunk:v1", &image, work.path());
}

/// HTTPS with basic auth: the CA from `ca_certs`, the credentials on every upload request.
#[test]
fn https_basic_auth_push() {
    let Some((work, image, reg)) = setup("push-basic-", Mode::HttpsBasic, Options::default())
    else {
        return;
    };
    let opts = options(&reg, true, SMALL_CHUNKS);
    let stats = push_ok(&request(&image, &reg.host(), "e2e/basic:v1"), &opts);
    assert_eq!(stats.manifest_digest, image.digest);
    assert_eq!(stats.blobs_uploaded, 3);
    check_pulled(&reg, "e2e/basic:v1", &image, work.path());

    let err = push_err(
        &request(&image, &reg.host(), "e2e/basic-anon:v1"),
        &options(&reg, false, UploadOptions::default()),
    );
    assert_contains(&err, &["requires a login", "--creds"]);
}

/// Without credentials the token server grants only pull: the push stops at the first upload
/// with a clear message, and the registry holds nothing of it. Wrong credentials are named.
#[test]
fn push_without_permission_fails_and_leaves_nothing() {
    let Some((_work, image, reg)) = setup("push-denied-", Mode::Token, Options::default()) else {
        return;
    };
    let req = request(&image, &reg.host(), "e2e/denied:v1");
    let err = push_err(&req, &options(&reg, false, UploadOptions::default()));
    assert_contains(
        &err,
        &[
            &format!("no push permission for {}/e2e/denied", reg.host()),
            "anonymously",
            "check --creds",
            "401",
        ],
    );
    assert!(
        !reg.has_repository("e2e/denied"),
        "the failed push left a repository"
    );
    for d in image.blobs.keys() {
        assert!(!reg.stores_blob(d), "the failed push left blob {d}");
    }
    let tokens = reg.token.as_ref().expect("token server").requests();
    assert!(tokens.iter().all(|r| r.user.is_none()));
    assert!(tokens.iter().all(|r| r
        .granted
        .iter()
        .all(|(_, a)| a == &vec!["pull".to_string()])));

    let mut opts = options(&reg, false, UploadOptions::default());
    opts.credentials = Some(Credentials::new(USER, "wrong-password"));
    let err = push_err(&req, &opts);
    assert_contains(&err, &["token service refused", "--creds", "HTTP 401"]);
    assert!(!reg.has_repository("e2e/denied"));
}

/// A blob whose bytes do not match its digest: refused by the registry in a monolithic upload
/// (and named as the reason), refused by us before the commit in a chunked one (the upload
/// session cancelled); a source shorter than declared stops at once. No manifest is pushed.
#[test]
fn blob_not_matching_its_digest_is_refused() {
    let Some((_work, image, reg)) = setup("push-bad-blob-", Mode::Plain, Options::default()) else {
        return;
    };
    let (digest, bytes) = image.big_blob();
    let mut spoiled = bytes.clone();
    let middle = spoiled.len() / 2;
    spoiled[middle] ^= 0xff;
    let actual = format!("sha256:{}", sha256_hex(&spoiled));
    let with_blob = |repo: &str, replacement: Vec<u8>| {
        let mut req = request(&image, &reg.host(), repo);
        let i = req
            .blobs
            .iter()
            .position(|b| b.digest.to_string() == *digest)
            .expect("big blob in the request");
        let size = req.blobs[i].size;
        req.blobs[i] = BlobUpload {
            size,
            ..BlobUpload::from_bytes(replacement)
        };
        req.blobs[i].digest = digest.parse().unwrap();
        req
    };

    let err = push_err(
        &with_blob("e2e/bad-mono:v1", spoiled.clone()),
        &options(&reg, false, UploadOptions::default()),
    );
    assert_contains(
        &err,
        &[
            &format!("hashes to {actual}, not {digest}"),
            "refused by the registry",
            "400",
        ],
    );
    let chunked_opts = options(&reg, false, SMALL_CHUNKS);
    let err = push_err(
        &with_blob("e2e/bad-chunked:v1", spoiled.clone()),
        &chunked_opts,
    );
    assert_contains(
        &err,
        &[
            &format!("hashes to {actual}, not {digest}"),
            "upload was cancelled",
        ],
    );
    // The session we cancelled is gone (DELETE answered 204).
    let log = reg.access_log();
    let deletes = requests(&log, "DELETE", "/v2/e2e/bad-chunked/blobs/uploads/");
    assert!(
        deletes.len() == 1 && deletes[0].status == 204,
        "{deletes:?}"
    );
    assert!(
        reg.open_uploads("e2e/bad-chunked").is_empty(),
        "the cancelled upload is still open: {:?}",
        reg.open_uploads("e2e/bad-chunked")
    );
    let short = bytes[..bytes.len() - 100].to_vec();
    let err = push_err(
        &with_blob("e2e/bad-short:v1", short.clone()),
        &options(&reg, false, UploadOptions::default()),
    );
    assert_contains(
        &err,
        &[&format!(
            "ended after {} of the {} bytes",
            short.len(),
            bytes.len()
        )],
    );
    let err = push_err(&with_blob("e2e/bad-short-chunked:v1", short), &chunked_opts);
    assert_contains(&err, &["ended before the", "bytes declared"]);

    for repo in [
        "e2e/bad-mono",
        "e2e/bad-chunked",
        "e2e/bad-short",
        "e2e/bad-short-chunked",
    ] {
        let tag = reg
            .storage()
            .join("repositories")
            .join(repo)
            .join("_manifests/tags/v1");
        assert!(!tag.exists(), "{repo}: a manifest was pushed");
        assert!(
            !reg.repository_links_blob(repo, digest),
            "{repo} links the bad blob"
        );
    }
    assert!(!reg.stores_blob(digest));
    assert!(!reg.stores_blob(&actual));
}

/// Upload faults between the client and the registry: a lost answer to a chunk restarts the
/// upload; a lost answer to a committed `PUT` finds the blob there on retry; a `405` and an HTML
/// page are reported as such; a `307` on an upload is followed without `Authorization`.
#[test]
fn upload_faults_are_retried_or_reported() {
    let Some((work, image, reg)) = setup("push-faults-", Mode::Plain, Options::default()) else {
        return;
    };
    let proxy = FaultProxy::start(reg.port);
    let opts = options(&reg, false, UploadOptions::default());
    let chunked_opts = options(&reg, false, SMALL_CHUNKS);

    // The third chunk reaches the registry, its answer is lost: the upload starts over.
    proxy.add_upload_rule(UploadRule {
        method: "PATCH".into(),
        skip: 2,
        times: 1,
        fault: UploadFault::LoseAnswer(500),
    });
    let stats = push_ok(
        &request(&image, &proxy.host(), "e2e/lost-chunk:v1"),
        &chunked_opts,
    );
    assert_eq!(stats.manifest_digest, image.digest);
    assert_eq!(stats.blobs_uploaded, 3);
    assert_eq!(
        stats.bytes_uploaded,
        image.blob_bytes() + 3 * CHUNK,
        "three chunks sent twice"
    );
    let seen = proxy.seen();
    let posts = seen
        .iter()
        .filter(|s| s.method == "POST" && s.path.contains("/e2e/lost-chunk/blobs/uploads/"))
        .count();
    assert_eq!(posts, 4, "one upload session per blob plus the restart");
    check_pulled(&reg, "e2e/lost-chunk:v1", &image, work.path());

    // The first PUT commits the config but its answer is lost: the retry finds it.
    proxy.clear_rules();
    proxy.add_upload_rule(UploadRule {
        method: "PUT".into(),
        skip: 0,
        times: 1,
        fault: UploadFault::LoseAnswer(502),
    });
    let stats = push_ok(&request(&image, &proxy.host(), "e2e/lost-put:v1"), &opts);
    assert_eq!(
        counts(&stats),
        (image.blob_bytes(), 2, 1, 0),
        "the committed blob is found on retry"
    );
    check_pulled(&reg, "e2e/lost-put:v1", &image, work.path());

    // No upload API.
    answer_every_post(
        &proxy,
        405,
        "application/json",
        r#"{"errors":[{"code":"UNSUPPORTED","message":"The operation is unsupported."}]}"#,
    );
    let err = push_err(&request(&image, &proxy.host(), "e2e/no-api:v1"), &opts);
    assert_contains(
        &err,
        &[
            "does not support the blob upload API",
            "HTTP 405",
            "UNSUPPORTED",
        ],
    );

    // A login page in front of the registry.
    answer_every_post(
        &proxy,
        200,
        "text/html; charset=utf-8",
        "<!DOCTYPE html><html><body>Please log in</body></html>",
    );
    let err = push_err(&request(&image, &proxy.host(), "e2e/html:v1"), &opts);
    assert_contains(&err, &["HTML page"]);
    assert!(!err.contains("Please log in"), "page content quoted: {err}");
    proxy.clear_rules();
    assert!(!reg.has_repository("e2e/no-api") && !reg.has_repository("e2e/html"));
}

/// Makes the proxy answer every upload `POST` itself (the registry never sees them).
fn answer_every_post(proxy: &FaultProxy, status: u16, content_type: &str, body: &str) {
    proxy.clear_rules();
    proxy.add_upload_rule(UploadRule {
        method: "POST".into(),
        skip: 0,
        times: usize::MAX,
        fault: UploadFault::Respond {
            status,
            content_type: content_type.into(),
            body: body.into(),
        },
    });
}

/// Token auth behind the proxy: a `307` on the first blob `PUT` is followed with the body sent
/// again but without `Authorization` (another origin); the registry refuses it there, and the
/// retry, sent straight to the registry, succeeds.
#[test]
fn upload_redirect_never_carries_authorization() {
    let Some((work, image, reg)) = setup("push-redirect-", Mode::Token, Options::default()) else {
        return;
    };
    let proxy = FaultProxy::start(reg.port);
    proxy.add_upload_rule(UploadRule {
        method: "PUT".into(),
        skip: 0,
        times: 1,
        fault: UploadFault::Redirect,
    });
    let stats = push_ok(
        &request(&image, &proxy.host(), "e2e/redirected:v1"),
        &options(&reg, true, UploadOptions::default()),
    );
    assert_eq!(stats.manifest_digest, image.digest);
    assert_eq!(stats.blobs_uploaded, 3);
    let redirected = proxy.redirect_seen();
    assert_eq!(redirected.len(), 1, "{redirected:?}");
    assert_eq!(redirected[0].method, "PUT");
    assert!(
        !redirected[0].authorization,
        "Authorization leaked to another origin"
    );
    assert_eq!(
        redirected[0].status, 401,
        "the registry refused the anonymous PUT"
    );
    let seen = proxy.seen();
    assert!(seen
        .iter()
        .filter(|s| s.method == "PUT" && s.upload_fault.is_none())
        .all(|s| s.authorization));
    check_pulled(&reg, "e2e/redirected:v1", &image, work.path());
}

/// The converter's own OCI archive (`convert --format oci-archive --push`, the demo image
/// flattened), pushed with token auth and pulled back by skopeo as Proxmox does: the pulled archive passes
/// `hakim-convert verify`, holds the same manifest and blobs, and converts to the same rootfs.
#[test]
fn converter_oci_archive_round_trip() {
    if !(registry_ready() && converter_ready()) {
        return;
    }
    let work = scratch_dir("push-archive-");
    let demo = demo_image(work.path());
    let epoch = [("SOURCE_DATE_EPOCH", SOURCE_DATE_EPOCH)];
    let reg = Registry::start(Mode::Token);
    let creds = work.path().join("creds");
    fs::write(&creds, format!("{USER}:{PASSWORD}")).unwrap();
    let target = format!("{}/e2e/hakim-demo:e2e", reg.host());
    let mut args = vec![
        "convert".to_string(),
        demo.oci_ref(),
        "-o".into(),
        work.path().join("out").display().to_string(),
        "--format".into(),
        "oci-archive".into(),
        "--name".into(),
        "hakim-demo_e2e".into(),
        "--tag".into(),
        "e2e".into(),
        "--push".into(),
        target.clone(),
        "--creds-file".into(),
        creds.display().to_string(),
    ];
    if let Some(ca) = &reg.tls_cert {
        args.push("--ca-cert".into());
        args.push(ca.display().to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let ours = run_converter_json(&args);
    let archive = PathBuf::from(ours["artifact"].as_str().expect("artifact"));
    let image = {
        let dir = work.path().join("ours");
        untar(&archive, &dir);
        load_layout(&dir)
    };
    // `convert --push` pushed the archive it wrote: same manifest, every blob sent once.
    let pushed = &ours["push"];
    assert_eq!(pushed["reference"], target.as_str(), "{ours}");
    assert_eq!(pushed["manifest_digest"], image.digest.as_str());
    assert_eq!(pushed["bytes_uploaded"], image.blob_bytes());
    assert_eq!(pushed["blobs_uploaded"], 2);
    assert_eq!(pushed["blobs_existing"], 0);
    check_pulled(&reg, "e2e/hakim-demo:e2e", &image, work.path());

    let pulled = work.path().join("pulled.tar");
    reg.copy_to_archive("e2e/hakim-demo:e2e", &pulled);
    let verified = run_converter_json(&["verify", &pulled.display().to_string()]);
    let checks = verified["checks"].as_array().expect("verify checks");
    assert_eq!(verified["kind"], "oci-archive");
    assert!(
        checks.len() > 10 && checks.iter().all(|c| c["status"] != "fail"),
        "verify: {verified}"
    );
    let to_rootfs = |a: &Path| {
        convert(
            &format!("oci-archive:{}", a.display()),
            Compression::Zstd,
            &[],
            &epoch,
        )
        .sha256
    };
    assert_eq!(
        to_rootfs(&pulled),
        to_rootfs(&archive),
        "pulled archive flattens differently"
    );
}

/// `hakim-convert ARGS… --json`, which must succeed; its JSON output.
fn run_converter_json(args: &[&str]) -> serde_json::Value {
    let mut cmd = Command::new(converter_bin());
    cmd.args(args)
        .arg("--json")
        .env("SOURCE_DATE_EPOCH", SOURCE_DATE_EPOCH);
    let out = run_ok(&mut cmd);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{args:?}: stdout is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

//! Harness for the end-to-end tests of `hakim-convert` (see `tests/tests/convert.rs`).
//!
//! Everything here drives real tools: `ci/build-test-image.sh` (debootstrap, buildah, umoci,
//! skopeo) builds the input image, `umoci raw unpack` is the reference flattener, and GNU tar
//! with Proxmox VE's exact flags extracts the converter's artifact. [`tree`] snapshots both
//! results and reports their differences.

pub mod init_harness;
pub mod tree;

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use sha2::{Digest, Sha256};

/// Tools the tests (and `ci/build-test-image.sh`) run.
pub const TOOLS: &[&str] = &[
    "debootstrap",
    "buildah",
    "umoci",
    "skopeo",
    "tar",
    "xz",
    "zstd",
    "python3",
    "setcap",
    "sha256sum",
    "flock",
];

/// `HAKIM_E2E=1`: the environment must be able to run the tests; anything missing is a failure.
pub fn strict() -> bool {
    std::env::var("HAKIM_E2E").as_deref() == Ok("1")
}

/// Decides on a list of missing prerequisites: `true` when there are none;
/// otherwise prints `skipping: <what> missing` and returns `false`, or panics
/// when `HAKIM_E2E=1`.
pub fn gate(missing: &[String]) -> bool {
    if missing.is_empty() {
        return true;
    }
    if strict() {
        panic!("HAKIM_E2E=1 but required: {} missing", missing.join(", "));
    }
    for what in missing {
        println!("skipping: {what} missing");
    }
    false
}

/// Tests that watch timings or share system state run one at a time (the
/// machine has few cores).
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// The gate every test starts with. Returns `true` when root and every tool in [`TOOLS`] are
/// available. Otherwise prints `skipping: <what> missing` and returns `false`, or panics when
/// `HAKIM_E2E=1`.
pub fn ready() -> bool {
    static MISSING: OnceLock<Vec<String>> = OnceLock::new();
    let missing = MISSING.get_or_init(|| {
        let mut missing =
            missing_tools_or_root(TOOLS, "tests need uid 0 for debootstrap and ownership");
        if find_on_path("tar").is_some() && !is_gnu_tar() {
            missing.push("GNU tar (tar is not GNU tar)".to_string());
        }
        missing
    });
    gate(missing)
}

/// For [`gate`]: the `tools` not on `PATH`, a dynamic `busybox` when `busybox` is one of
/// them (test roots have no libc), and root when not running as uid 0 (`why_root` says why).
pub fn missing_tools_or_root(tools: &[&str], why_root: &str) -> Vec<String> {
    let mut missing: Vec<String> = tools
        .iter()
        .filter(|tool| find_on_path(tool).is_none())
        .map(|tool| tool.to_string())
        .collect();
    if tools.contains(&"busybox") {
        if let Some(bb) = find_on_path("busybox") {
            if !lxc::is_static_elf(&bb) {
                missing.push(format!(
                    "a static busybox ({} is dynamic; install busybox-static)",
                    bb.display()
                ));
            }
        }
    }
    if effective_uid() != Some(0) {
        missing.push(format!("root ({why_root})"));
    }
    missing
}

pub fn find_on_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
}

fn is_gnu_tar() -> bool {
    Command::new("tar")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("GNU tar"))
        .unwrap_or(false)
}

fn effective_uid() -> Option<u32> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// The workspace root (parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("crate dir has a parent")
        .to_path_buf()
}

/// The converter under test: `$HAKIM_CONVERT_BIN`, else `<workspace>/target/debug/hakim-convert`.
pub fn converter_bin() -> PathBuf {
    let bin = match std::env::var_os("HAKIM_CONVERT_BIN") {
        Some(p) => PathBuf::from(p),
        None => workspace_root().join("target/debug/hakim-convert"),
    };
    if !bin.is_file() {
        panic!(
            "hakim-convert binary not found at {} — build it with `cargo build -p hakim-convert` \
             or point HAKIM_CONVERT_BIN at it",
            bin.display()
        );
    }
    bin
}

/// Cache directory for the test image: `$HAKIM_TEST_CACHE`, default `/var/tmp/hakim-test-cache`.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("HAKIM_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/hakim-test-cache"))
}

/// Scratch space for outputs and extractions, under `CACHE/scratch` (the trees are ~130 MB
/// each). Removed when dropped, unless `HAKIM_E2E_KEEP=1` (to inspect a failure).
pub fn scratch_dir(prefix: &str) -> tempfile::TempDir {
    let base = cache_dir().join("scratch");
    fs::create_dir_all(&base).expect("create scratch dir");
    let keep = std::env::var("HAKIM_E2E_KEEP").as_deref() == Ok("1");
    tempfile::Builder::new()
        .prefix(prefix)
        .disable_cleanup(keep)
        .tempdir_in(base)
        .expect("create temp dir")
}

/// Human-readable command line for messages.
pub fn show(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        let a = a.to_string_lossy();
        if a.contains([' ', '*', '\'']) {
            s.push_str(&format!("'{a}'"));
        } else {
            s.push_str(&a);
        }
    }
    s
}

/// Run a command, panic with its stderr unless it exits 0.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", show(cmd)));
    if !out.status.success() {
        panic!(
            "{} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
            show(cmd),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// The test image built by `ci/build-test-image.sh`, and its reference flattening.
#[derive(Debug)]
pub struct TestImage {
    pub cache: PathBuf,
    /// `CACHE/oci`, tag `test`.
    pub oci_layout: PathBuf,
    pub oci_archive: PathBuf,
    pub docker_archive: PathBuf,
    /// `umoci raw unpack --image CACHE/oci:test` of the same image.
    pub oracle: PathBuf,
}

impl TestImage {
    pub fn oci_ref(&self) -> String {
        format!("oci:{}:test", self.oci_layout.display())
    }
    pub fn oci_archive_ref(&self) -> String {
        format!("oci-archive:{}:test", self.oci_archive.display())
    }
    pub fn docker_archive_ref(&self) -> String {
        format!("docker-archive:{}", self.docker_archive.display())
    }
}

/// Build (or reuse) the test image and the oracle tree, once per test process.
pub fn test_image() -> &'static TestImage {
    static IMAGE: OnceLock<Result<TestImage, String>> = OnceLock::new();
    match IMAGE.get_or_init(build_test_image) {
        Ok(image) => image,
        Err(e) => panic!("{e}"),
    }
}

/// Runs `ci/<script> CACHE` (an idempotent image build into the test cache); returns the
/// canonical cache directory.
pub(crate) fn run_image_script(script: &str, what: &str) -> Result<PathBuf, String> {
    let cache = cache_dir();
    let script = workspace_root().join("ci").join(script);
    let started = std::time::Instant::now();
    let status = Command::new("bash")
        .arg(&script)
        .arg(&cache)
        .stdin(Stdio::null())
        .status()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !status.success() {
        return Err(format!(
            "{} {} failed: {status}",
            script.display(),
            cache.display()
        ));
    }
    eprintln!(
        "{what} ready after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    cache.canonicalize().map_err(|e| e.to_string())
}

fn build_test_image() -> Result<TestImage, String> {
    let cache = run_image_script("build-test-image.sh", "test image")?;
    let oci_layout = cache.join("oci");
    // The oracle is keyed by the image's manifest digest (index.json), so a rebuilt image is
    // never compared against a stale unpack.
    let index = fs::read(oci_layout.join("index.json")).map_err(|e| e.to_string())?;
    let key = hex::encode(Sha256::digest(&index));
    let oracle_dir = cache.join("oracle");
    let oracle = oracle_dir.join("rootfs");
    let stamp = oracle_dir.join("stamp");
    if fs::read_to_string(&stamp).ok().as_deref() != Some(key.as_str()) {
        let started = std::time::Instant::now();
        if oracle_dir.exists() {
            fs::remove_dir_all(&oracle_dir).map_err(|e| format!("remove old oracle: {e}"))?;
        }
        let tmp = cache.join(format!("oracle.tmp-{}", std::process::id()));
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(|e| e.to_string())?;
        }
        fs::create_dir_all(&tmp).map_err(|e| e.to_string())?;
        let out = Command::new("umoci")
            .args(["raw", "unpack", "--image"])
            .arg(format!("{}:test", oci_layout.display()))
            .arg(tmp.join("rootfs"))
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run umoci: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "umoci raw unpack failed: {}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        fs::write(tmp.join("stamp"), &key).map_err(|e| e.to_string())?;
        fs::rename(&tmp, &oracle_dir).map_err(|e| e.to_string())?;
        eprintln!(
            "oracle unpacked with umoci in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
    Ok(TestImage {
        oci_archive: cache.join("oci-archive.tar"),
        docker_archive: cache.join("docker-archive.tar"),
        oci_layout,
        oracle,
        cache,
    })
}

/// The Hakim-like image of `ci/build-hakim-image.sh` (a Dockerfile built with `buildah bud` on
/// the cached debootstrap rootfs), built or reused once per test process: `CACHE/hakim-like/oci`,
/// tag `e2e`.
pub fn hakim_like_image() -> &'static registry::LocalImage {
    static IMAGE: OnceLock<Result<registry::LocalImage, String>> = OnceLock::new();
    let built = IMAGE.get_or_init(|| {
        let cache = run_image_script("build-hakim-image.sh", "Hakim-like image")?;
        let layout = cache.join("hakim-like/oci");
        Ok(registry::LocalImage {
            layout,
            tag: Some("e2e".into()),
        })
    });
    match built {
        Ok(image) => image,
        Err(e) => panic!("{e}"),
    }
}

/// Output compression of the artifact.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    Xz,
    Zstd,
}

impl Compression {
    pub fn cli_name(self) -> &'static str {
        match self {
            Compression::Xz => "xz",
            Compression::Zstd => "zstd",
        }
    }
    /// The GNU tar flag Proxmox adds for this compression.
    pub fn tar_flag(self) -> &'static str {
        match self {
            Compression::Xz => "-J",
            Compression::Zstd => "--zstd",
        }
    }
}

/// Proxmox's acceptance rules: what `convert --json` announced (`proxmox`) is
/// exactly what `hakim-convert verify` does not pass on the same artifact —
/// same rules, same WARN/FAIL — and every announcement carries a fix.
pub fn assert_convert_matches_verify(artifact: &Path, convert_json: &serde_json::Value) {
    let out = Command::new(converter_bin())
        .args(["verify", "--json"])
        .arg(artifact)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run hakim-convert verify: {e}"));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "verify --json printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let key = |c: &serde_json::Value| {
        format!(
            "{} [{}]",
            c["rule"].as_str().unwrap_or("?"),
            c["status"].as_str().unwrap_or("?")
        )
    };
    let mut refused: Vec<String> = report["checks"]
        .as_array()
        .expect("verify JSON has checks")
        .iter()
        .filter(|c| c["status"] != "pass")
        .map(key)
        .collect();
    let announced_list = convert_json["proxmox"]
        .as_array()
        .unwrap_or_else(|| panic!("convert JSON has no \"proxmox\" list: {convert_json}"));
    let mut announced: Vec<String> = announced_list.iter().map(key).collect();
    refused.sort();
    announced.sort();
    assert_eq!(
        refused,
        announced,
        "{}: verify's WARN/FAIL (left) differ from what convert announced (right)",
        artifact.display()
    );
    for c in announced_list {
        assert!(
            c["fix"].as_str().is_some_and(|f| !f.is_empty()),
            "announced without a fix: {c}"
        );
    }
}

/// One successful `hakim-convert convert … --json` run.
#[derive(Debug)]
pub struct Conversion {
    pub outdir: tempfile::TempDir,
    pub artifact: PathBuf,
    pub sha256: String,
    pub json: serde_json::Value,
    pub seconds: f64,
}

/// Run `hakim-convert convert SOURCE -o OUTDIR --compression C --name hakim-test --json ARGS…`
/// with `env` added (and `SOURCE_DATE_EPOCH` removed unless given). Panics on failure, or when
/// the JSON result, the artifact or `sha256sums.txt` disagree.
pub fn convert(
    source: &str,
    compression: Compression,
    args: &[&str],
    env: &[(&str, &str)],
) -> Conversion {
    let expected_ext = match compression {
        Compression::Xz => ".tar.xz",
        Compression::Zstd => ".tar.zst",
    };
    let mut all = vec!["--compression", compression.cli_name()];
    all.extend_from_slice(args);
    convert_to(source, &all, env, expected_ext)
}

/// [`convert`] with the format and compression left to `args`; the artifact's name must end
/// with `expected_ext` (`.tar` for an OCI archive).
pub fn convert_to(
    source: &str,
    args: &[&str],
    env: &[(&str, &str)],
    expected_ext: &str,
) -> Conversion {
    let outdir = scratch_dir("out-");
    let mut cmd = Command::new(converter_bin());
    cmd.arg("convert")
        .arg(source)
        .arg("-o")
        .arg(outdir.path())
        .args(["--name", "hakim-test", "--json"])
        .args(args)
        .env_remove("SOURCE_DATE_EPOCH");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let started = std::time::Instant::now();
    let out = run_ok(&mut cmd);
    let seconds = started.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "{}: stdout is not one JSON object ({e}):\n{stdout}",
            show(&cmd)
        )
    });
    let artifact = PathBuf::from(
        json["artifact"]
            .as_str()
            .unwrap_or_else(|| panic!("JSON has no string \"artifact\": {json}")),
    );
    let sha256 = json["sha256"]
        .as_str()
        .unwrap_or_else(|| panic!("JSON has no string \"sha256\": {json}"))
        .to_string();
    let artifact = if artifact.is_relative() {
        outdir.path().join(artifact)
    } else {
        artifact
    };
    assert!(
        artifact.is_file(),
        "artifact {} named in the JSON output does not exist",
        artifact.display()
    );
    assert_eq!(
        artifact.parent().map(|p| p.canonicalize().unwrap()),
        Some(outdir.path().canonicalize().unwrap()),
        "artifact {} is not in OUTDIR {}",
        artifact.display(),
        outdir.path().display()
    );
    let file_name = artifact.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        file_name.ends_with(expected_ext),
        "artifact {file_name} does not end with {expected_ext}"
    );
    assert_eq!(
        sha256_file(&artifact),
        sha256,
        "JSON sha256 differs from the artifact's real sha256"
    );
    // sha256sums.txt must verify with coreutils and name the artifact.
    let sums = outdir.path().join("sha256sums.txt");
    let sums_text =
        fs::read_to_string(&sums).unwrap_or_else(|e| panic!("cannot read {}: {e}", sums.display()));
    assert!(
        sums_text
            .lines()
            .any(|l| l.starts_with(&sha256) && l.trim_end().ends_with(&file_name)),
        "sha256sums.txt has no line `{sha256}  {file_name}`:\n{sums_text}"
    );
    run_ok(
        Command::new("sha256sum")
            .args(["-c", "--strict", "sha256sums.txt"])
            .current_dir(outdir.path()),
    );
    // Only artifacts and their sums stay in the output directory.
    let mut left: Vec<String> = fs::read_dir(outdir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    let mut expected = vec![file_name.clone(), "sha256sums.txt".to_string()];
    expected.sort();
    assert_eq!(
        left, expected,
        "the output directory holds more than the artifact"
    );
    assert_convert_matches_verify(&artifact, &json);
    Conversion {
        outdir,
        artifact,
        sha256,
        json,
        seconds,
    }
}

/// sha256 of a file, lowercase hex.
pub fn sha256_file(path: &Path) -> String {
    let mut f = fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex::encode(h.finalize())
}

/// Extract the artifact exactly like Proxmox VE does for a classic rootfs template
/// (pve-container `LXC::Create::restore_archive`), into a fresh directory.
pub fn proxmox_extract(artifact: &Path, compression: Compression) -> tempfile::TempDir {
    let dir = scratch_dir("rootfs-");
    let mut cmd = Command::new("tar");
    cmd.arg("xpf")
        .arg(artifact)
        .arg("-C")
        .arg(dir.path())
        .args([
            "--numeric-owner",
            "--xattrs",
            "--xattrs-include=user.*",
            "--xattrs-include=security.capability",
            "--skip-old-files",
            "--anchored",
            "--exclude",
            "./dev/*",
        ])
        .arg(compression.tar_flag());
    let out = run_ok(&mut cmd);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.trim().is_empty(),
        "{} printed warnings:\n{stderr}",
        show(&cmd)
    );
    dir
}

/// Checks on `tar -tvf` / `tar -tf` of the artifact; returns the problems found.
///
/// * the first member is `./`, and its mode and owner are those of the image's root directory;
/// * every member name starts with `./`;
/// * no name appears twice (Proxmox extracts with `--skip-old-files`: the first copy would win);
/// * no device nodes (the converter drops them; LXC provides `/dev`).
pub fn check_listing(artifact: &Path, compression: Compression, root_mode: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let names = run_ok(
        Command::new("tar")
            .arg(compression.tar_flag())
            .arg("-tf")
            .arg(artifact),
    )
    .stdout;
    let names = String::from_utf8_lossy(&names);
    let mut seen = HashSet::new();
    let mut count = 0usize;
    for (i, name) in names.lines().enumerate() {
        count += 1;
        if i == 0 && name != "./" {
            problems.push(format!("first member is {name:?}, expected \"./\""));
        }
        if !name.starts_with("./") {
            problems.push(format!("member {name:?} does not start with \"./\""));
        }
        if !seen.insert(name) {
            problems.push(format!("member {name:?} appears more than once"));
        }
    }
    if count == 0 {
        problems.push("archive lists no members".into());
    }
    let verbose = run_ok(
        Command::new("tar")
            .arg(compression.tar_flag())
            .args(["--numeric-owner", "-tvf"])
            .arg(artifact),
    )
    .stdout;
    let verbose = String::from_utf8_lossy(&verbose);
    for (i, line) in verbose.lines().enumerate() {
        if i == 0 {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let want = [root_mode, "0/0"];
            if fields.len() < 2 || fields[..2] != want {
                problems.push(format!(
                    "first member `{line}`: expected mode/owner {} {}",
                    want[0], want[1]
                ));
            }
            if fields.last() != Some(&"./") {
                problems.push(format!("tar -tvf first line is `{line}`, expected ./"));
            }
        }
        if line.starts_with('c') || line.starts_with('b') {
            problems.push(format!("device node in the artifact: {line}"));
        }
    }
    problems
}

/// Files in a directory (names only), for messages.
pub fn list_dir(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// `true` if `name` looks like a rootfs artifact (`*.tar`, `*.tar.*`).
pub fn is_artifact_name(name: &OsStr) -> bool {
    let name = name.to_string_lossy();
    name.ends_with(".tar") || name.contains(".tar.")
}

pub mod fault_proxy;
pub mod images;
pub mod lxc;
pub mod pve;
pub mod pve_api;
pub mod pytools;
pub mod registry;
pub mod session_root;

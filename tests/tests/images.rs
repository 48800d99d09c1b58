//! End-to-end tests of the Dockerfiles in `images/`.
//!
//! * Every Dockerfile passes hadolint (from PyPI, see `ci/install-deps.sh`), and hadolint does
//!   flag a bad one (so the check can fail).
//! * `images/hakim-init` and `images/agent-native` are built for real with
//!   `buildah bud --isolation chroot` against a local registry in token mode (the GHCR flow).
//!   ghcr.io and the Rust builder image are out of reach, so the build arguments point at local
//!   sources: a busybox base image pushed to the registry stands in for `hakim-base` and for the
//!   builder, and the static `hakim-init` from `ci/build-init.sh` comes in as `PREBUILT` (the
//!   documented air-gapped path).
//! * Oracles: the registry's image configs (`skopeo inspect --config`), the hakim-init image's
//!   single layer read with GNU tar, and the agent-native image converted by `hakim-convert`
//!   from the registry, extracted with Proxmox's tar flags, compared with the inputs byte for
//!   byte and booted: `/sbin/init` of the extracted tree must be hakim-init, running as PID 1 of
//!   a new PID namespace.
//!
//! Gating: root, buildah, busybox (static), tar, timeout, unshare, chroot, the registry tools
//! and a converter with the registry transport; hadolint for the lint test. Missing ones skip,
//! or fail under `HAKIM_E2E=1`.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use hakim_e2e::images::{base_rootfs, images_ready, Buildah};
use hakim_e2e::init_harness::init_bin;
use hakim_e2e::registry::{
    converter_ready, read_blob, registry_ready, run_converter, LocalImage, Mode, Registry,
};
use hakim_e2e::{
    check_listing, list_dir, proxmox_extract, pytools, run_ok, scratch_dir, serial, sha256_file,
    show, workspace_root, Compression,
};
use serde_json::Value;

const INIT_IN_IMAGE: &str = "usr/local/sbin/hakim-init";

/// Every `Dockerfile` under `images/`.
fn dockerfiles() -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut dirs = vec![workspace_root().join("images")];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).expect("read images/").flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.file_name().is_some_and(|n| n == "Dockerfile") {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

#[test]
fn dockerfiles_pass_hadolint() {
    if !pytools::hadolint_ready() {
        return;
    }
    let hadolint = pytools::bin("hadolint");
    let files = dockerfiles();
    let names: Vec<String> = files
        .iter()
        .map(|f| {
            f.strip_prefix(workspace_root())
                .unwrap()
                .display()
                .to_string()
        })
        .collect();
    for want in [
        "images/hakim-init/Dockerfile",
        "images/agent-native/Dockerfile",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} missing: {names:?}");
    }
    for file in &files {
        let out = Command::new(&hadolint)
            .arg("--no-color")
            .arg(file)
            .stdin(Stdio::null())
            .output()
            .expect("run hadolint");
        assert!(
            out.status.success(),
            "hadolint {} failed ({}):\n{}{}",
            file.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // The linter is live: an untagged FROM and unpinned, recommends-pulling apt-get install
    // must fail.
    let mut child = Command::new(&hadolint)
        .args(["--no-color", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run hadolint");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"FROM debian\nRUN apt-get update && apt-get install -y curl\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success() && report.contains("DL3006") && report.contains("DL3015"),
        "hadolint accepted a bad Dockerfile ({}):\n{report}",
        out.status
    );
    eprintln!("hadolint passed on {names:?}");
}

/// `skopeo copy docker://HOST/REFERENCE oci:DIR:t` — to read an image's blobs.
fn pull_layout(reg: &Registry, reference: &str, dir: &Path) -> LocalImage {
    run_ok(
        Command::new("skopeo")
            .args(["copy", "--quiet", "--retry-times", "0"])
            .args(reg.skopeo_args(Some("src"), false))
            .arg(reg.docker_ref(reference))
            .arg(format!("oci:{}:t", dir.display()))
            .envs(reg.client_env()),
    );
    LocalImage {
        layout: dir.to_path_buf(),
        tag: Some("t".into()),
    }
}

fn str_array(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .map(|s| s.as_str().expect("string").to_string())
        .collect()
}

/// The hakim-init image: one layer holding exactly `hakim-init` (0755, root), the bytes of
/// `init`.
fn check_init_image(reg: &Registry, reference: &str, init: &Path, dir: &Path) {
    let config = reg.config(reference);
    assert_eq!(
        str_array(&config["config"]["Entrypoint"]),
        ["/hakim-init"],
        "hakim-init image config: {config}"
    );
    let image = pull_layout(reg, reference, dir);
    let manifest = image.manifest();
    let layers = manifest["layers"].as_array().expect("layers");
    assert_eq!(layers.len(), 1, "FROM scratch + one COPY: {manifest}");
    let digest = layers[0]["digest"].as_str().unwrap();
    let blob = dir.join("blobs/sha256").join(&digest["sha256:".len()..]);
    let listing = run_ok(
        Command::new("tar")
            .args(["--numeric-owner", "-tvzf"])
            .arg(&blob),
    );
    let listing = String::from_utf8_lossy(&listing.stdout);
    let members: Vec<&str> = listing.lines().collect();
    assert_eq!(
        members.len(),
        1,
        "the layer must hold only hakim-init:\n{listing}"
    );
    let fields: Vec<&str> = members[0].split_whitespace().collect();
    assert_eq!(
        (fields[0], fields[1], *fields.last().unwrap()),
        ("-rwxr-xr-x", "0/0", "hakim-init"),
        "member: {}",
        members[0]
    );
    let extracted = dir.join("extracted");
    fs::create_dir_all(&extracted).unwrap();
    run_ok(
        Command::new("tar")
            .arg("-xzf")
            .arg(&blob)
            .arg("-C")
            .arg(&extracted),
    );
    assert_eq!(
        sha256_file(&extracted.join("hakim-init")),
        sha256_file(init),
        "the image's /hakim-init is not the PREBUILT binary"
    );
}

/// Config of the agent-native image: hakim-init as the whole command line (so Proxmox makes
/// an application container of it), no `User`, SIGTERM, the base's `Env` kept.
fn check_agent_native_config(config: &Value) {
    let c = &config["config"];
    assert_eq!(
        str_array(&c["Entrypoint"]),
        ["/usr/local/sbin/hakim-init"],
        "Entrypoint: {config}"
    );
    assert!(
        str_array(&c["Cmd"]).is_empty(),
        "Cmd must be empty: Proxmox appends it to the Entrypoint: {config}"
    );
    assert!(
        c["User"].as_str().unwrap_or("").is_empty(),
        "no USER: {config}"
    );
    assert_eq!(c["StopSignal"], "SIGTERM", "StopSignal: {config}");
    assert!(
        str_array(&c["Env"]).contains(&"LANG=C.UTF-8".to_string()),
        "the base's Env is kept: {config}"
    );
    assert_eq!(config["architecture"], "amd64");
    assert_eq!(config["os"], "linux");
}

/// The extracted rootfs of the agent-native image: the init binary, `/sbin/init` resolving to
/// it through `sbin → usr/sbin`, the base's `Env` in `/etc/hakim/image.env`, the example
/// services byte for byte.
fn check_agent_native_tree(root: &Path, init: &Path) {
    let bin = root.join(INIT_IN_IMAGE);
    let meta = fs::symlink_metadata(&bin).expect("hakim-init in the tree");
    assert!(meta.is_file(), "{INIT_IN_IMAGE} is not a regular file");
    assert_eq!(meta.permissions().mode() & 0o7777, 0o755, "{INIT_IN_IMAGE}");
    assert_eq!((meta.uid(), meta.gid()), (0, 0), "{INIT_IN_IMAGE} owner");
    assert_eq!(
        sha256_file(&bin),
        sha256_file(init),
        "{INIT_IN_IMAGE} bytes"
    );

    assert_eq!(
        fs::read_link(root.join("sbin")).ok(),
        Some(PathBuf::from("usr/sbin")),
        "the base's sbin link"
    );
    assert_eq!(
        fs::read_link(root.join("usr/sbin/init")).ok(),
        Some(PathBuf::from("/usr/local/sbin/hakim-init")),
        "/sbin/init must now point at hakim-init (it was systemd's link)"
    );

    // The image's Env for hakim-init, and nothing of the build's shell.
    let image_env = fs::read_to_string(root.join("etc/hakim/image.env"))
        .expect("/etc/hakim/image.env in the tree");
    let mut names: Vec<&str> = image_env
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, _)| k))
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["LANG", "PATH"],
        "/etc/hakim/image.env:\n{image_env}"
    );
    assert!(
        image_env.lines().any(|l| l == "LANG=C.UTF-8"),
        "/etc/hakim/image.env:\n{image_env}"
    );

    let services = workspace_root().join("images/services");
    let want = list_dir(&services);
    let got = list_dir(&root.join("etc/hakim/services"));
    assert_eq!(got, want, "/etc/hakim/services");
    for name in &want {
        assert_eq!(
            fs::read(root.join("etc/hakim/services").join(name)).unwrap(),
            fs::read(services.join(name)).unwrap(),
            "/etc/hakim/services/{name}"
        );
    }
}

/// Boots the extracted tree's `/sbin/init` as PID 1 of a new PID namespace in command mode
/// (`-- sh -c …`): the command sees PID 1's argv and its exit status comes back.
fn boot_command_mode(root: &Path) {
    let mut cmd = Command::new("timeout");
    cmd.args([
        "60",
        "unshare",
        "--pid",
        "--fork",
        "--mount",
        "--mount-proc",
    ])
    .arg("--kill-child")
    .arg("chroot")
    .arg(root)
    .args([
        "/sbin/init",
        "--",
        "/bin/sh",
        "-c",
        "tr '\\0' ' ' </proc/1/cmdline; echo; exit 7",
    ])
    .env_clear()
    .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    .stdin(Stdio::null());
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", show(&cmd)));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(7),
        "{}: the command's status must come back through hakim-init\n--- stdout\n{stdout}\n--- stderr\n{}",
        show(&cmd),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.starts_with("/sbin/init -- /bin/sh -c "),
        "PID 1 of the container is not /sbin/init: {stdout:?}"
    );
}

/// `hakim-convert convert` from the registry, with `verify` run on every artifact.
struct Converter<'r> {
    reg: &'r Registry,
    cache: PathBuf,
    env: Vec<(String, String)>,
}

impl<'r> Converter<'r> {
    fn new(reg: &'r Registry, work: &Path) -> Converter<'r> {
        let mut env = reg.client_env();
        env.push(("SOURCE_DATE_EPOCH".into(), "1750000000".into()));
        Converter {
            reg,
            cache: work.join("convert-cache"),
            env,
        }
    }

    /// Converts `reference` with `args`; returns the output directory and the artifact, which
    /// `hakim-convert verify` has passed.
    fn run(&self, reference: &str, args: &[String]) -> (tempfile::TempDir, PathBuf) {
        let out = scratch_dir("out-");
        let mut full: Vec<String> = vec![
            "convert".into(),
            self.reg.docker_ref(reference),
            "-o".into(),
            out.path().display().to_string(),
            "--cache-dir".into(),
            self.cache.display().to_string(),
            "--json".into(),
            "-q".into(),
        ];
        full.extend(args.iter().cloned());
        let result = run_converter(&full, &self.env);
        assert!(
            result.status.success(),
            "hakim-convert {full:?} failed ({}):\n{}",
            result.status,
            String::from_utf8_lossy(&result.stderr)
        );
        let summary: Value = serde_json::from_slice(&result.stdout).expect("--json summary");
        let artifact = out.path().join(
            Path::new(summary["artifact"].as_str().expect("artifact in summary"))
                .file_name()
                .unwrap(),
        );
        let verify = run_converter(
            &["verify".into(), artifact.display().to_string()],
            &self.env,
        );
        assert!(
            verify.status.success(),
            "hakim-convert verify {} failed:\n{}{}",
            artifact.display(),
            String::from_utf8_lossy(&verify.stdout),
            String::from_utf8_lossy(&verify.stderr)
        );
        (out, artifact)
    }

    /// A zstd rootfs template of `reference`, its listing checked and extracted as Proxmox does.
    fn rootfs(&self, reference: &str, args: &[String]) -> tempfile::TempDir {
        let mut all = vec!["--compression".to_string(), "zstd".to_string()];
        all.extend(args.iter().cloned());
        let (_out, artifact) = self.run(reference, &all);
        let problems = check_listing(&artifact, Compression::Zstd, "drwxr-xr-x");
        assert!(problems.is_empty(), "artifact listing: {problems:#?}");
        proxmox_extract(&artifact, Compression::Zstd)
    }

    /// The image config inside an OCI archive of `reference` (one flattened layer), read the
    /// way Proxmox does: `index.json` → manifest → config.
    fn oci_archive_config(&self, reference: &str, args: &[String]) -> Value {
        let mut all = vec!["--format".to_string(), "oci-archive".to_string()];
        all.extend(args.iter().cloned());
        let (out, artifact) = self.run(reference, &all);
        let layout = out.path().join("unpacked");
        fs::create_dir_all(&layout).unwrap();
        run_ok(
            Command::new("tar")
                .arg("-xf")
                .arg(&artifact)
                .arg("-C")
                .arg(&layout),
        );
        let image = LocalImage {
            layout: layout.clone(),
            tag: None,
        };
        let manifest = image.manifest();
        assert_eq!(
            manifest["layers"].as_array().map(Vec::len),
            Some(1),
            "one flattened layer: {manifest}"
        );
        read_blob(&layout, manifest["config"]["digest"].as_str().unwrap())
    }
}

#[test]
fn agent_native_image_builds_converts_and_boots() {
    if !(images_ready() && registry_ready() && converter_ready()) {
        return;
    }
    let _serial = serial();
    let root = workspace_root();
    let init = init_bin();
    let prebuilt = init
        .strip_prefix(&root)
        .expect("ci/build-init.sh builds inside the repository (the build context)");
    let reg = Registry::start(Mode::Token);
    let buildah = Buildah::new(&reg);
    let work = scratch_dir("images-");

    // The base, standing in for ghcr.io/shekohex/hakim-base (and for the Rust builder).
    let base_root = work.path().join("base");
    base_rootfs(&base_root);
    buildah.commit_tree(
        &base_root,
        &[
            "--env",
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "--env",
            "LANG=C.UTF-8",
            "--cmd",
            "/bin/sh",
        ],
        "e2e/hakim-base:test",
    );
    let base = format!("{}/e2e/hakim-base:test", reg.host());

    buildah.build(
        &root.join("images/hakim-init/Dockerfile"),
        &root,
        &[
            ("BUILDER", base.as_str()),
            ("PREBUILT", prebuilt.to_str().unwrap()),
        ],
        "e2e/hakim-init:test",
    );
    check_init_image(&reg, "e2e/hakim-init:test", init, &work.path().join("init"));

    buildah.build(
        &root.join("images/agent-native/Dockerfile"),
        &root,
        &[
            ("BASE", base.as_str()),
            ("INIT_IMAGE", &format!("{}/e2e/hakim-init:test", reg.host())),
        ],
        "e2e/hakim-base-native:test",
    );
    check_agent_native_config(&reg.config("e2e/hakim-base-native:test"));

    // Converted from the registry like any Hakim image: a rootfs template, extracted as
    // Proxmox does and booted, and an OCI archive whose config Proxmox would read.
    let convert = Converter::new(&reg, work.path());
    let native = "e2e/hakim-base-native:test";
    let extracted = convert.rootfs(native, &[]);
    check_agent_native_tree(extracted.path(), init);
    boot_command_mode(extracted.path());
    check_agent_native_config(&convert.oci_archive_config(native, &[]));

    // The other way to the same result: hakim-convert --inject-init on the plain base. Both
    // routes must give the same binary, services, /sbin/init and config.
    let inject = [
        "--inject-init",
        init.to_str().unwrap(),
        "--services",
        root.join("images/services").to_str().unwrap(),
    ]
    .map(str::to_string);
    let injected = convert.rootfs("e2e/hakim-base:test", &inject);
    check_agent_native_tree(injected.path(), init);
    boot_command_mode(injected.path());
    check_agent_native_config(&convert.oci_archive_config("e2e/hakim-base:test", &inject));
}

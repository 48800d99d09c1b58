//! The release scripts the workflows call, run for real: `ci/release-binaries.sh DIST init`
//! (static hakim-init for x86_64 and aarch64, `sha256sums.txt`) and `ci/init-image.sh`, which
//! builds the hakim-init scratch image for linux/amd64 and linux/arm64 with buildah and pushes
//! one multi-arch index to the local `docker-registry` (`tests/src/registry.rs`).
//!
//! Oracles: `sha256sum -c`; the index and manifests as the registry serves them; the image
//! copied back with `skopeo copy --all` into an OCI layout and its layer unpacked with GNU tar:
//! exactly `/hakim-init`, mode 0755, the bytes of the released binary for that architecture.
//!
//! Gating: root, `buildah`, `aarch64-linux-gnu-gcc`, `file`, `sha256sum` and the registry
//! tools. Missing ones skip, or fail under `HAKIM_E2E=1`.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use hakim_e2e::init_harness::build_init;
use hakim_e2e::registry::{read_blob, registry_ready, Mode, Registry};
use hakim_e2e::{
    gate, missing_tools_or_root, run_ok, scratch_dir, serial, sha256_file, workspace_root,
};

fn ready() -> bool {
    let missing = missing_tools_or_root(
        &["buildah", "aarch64-linux-gnu-gcc", "file", "sha256sum"],
        "buildah storage",
    );
    gate(&missing) && registry_ready()
}

#[test]
fn init_image_is_a_multiarch_index_of_the_released_binaries() {
    if !ready() {
        return;
    }
    let _guard = serial();
    let ws = workspace_root();
    let dist = scratch_dir("release-dist-");
    run_ok(
        Command::new(ws.join("ci/release-binaries.sh"))
            .arg(dist.path())
            .arg("init")
            .current_dir(&ws),
    );
    run_ok(
        Command::new("sha256sum")
            .args(["-c", "--strict", "sha256sums.txt"])
            .current_dir(dist.path()),
    );
    let sums = fs::read_to_string(dist.path().join("sha256sums.txt")).unwrap();
    assert_eq!(sums.lines().count(), 2, "{sums}");

    let reg = Registry::start(Mode::Plain);
    let repo = format!("{}/e2e/hakim-init", reg.host());
    run_ok(
        Command::new(ws.join("ci/init-image.sh"))
            .arg(dist.path())
            .arg(&repo)
            .args(["1.2.3", "latest"])
            .env("BUILDAH_PUSH_OPTS", "--tls-verify=false"),
    );

    let index = reg.manifest("e2e/hakim-init:1.2.3");
    assert_eq!(
        index["mediaType"], "application/vnd.oci.image.index.v1+json",
        "{index:#}"
    );
    let mut platforms: Vec<String> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            format!(
                "{}/{}",
                m["platform"]["os"].as_str().unwrap(),
                m["platform"]["architecture"].as_str().unwrap()
            )
        })
        .collect();
    platforms.sort();
    assert_eq!(platforms, ["linux/amd64", "linux/arm64"]);
    assert_eq!(
        reg.raw_manifest("e2e/hakim-init:latest"),
        reg.raw_manifest("e2e/hakim-init:1.2.3"),
        "latest and 1.2.3 differ"
    );

    // Copy everything back and look inside each architecture's image.
    let work = scratch_dir("release-image-");
    let layout = work.path().join("layout");
    run_ok(
        Command::new("skopeo")
            .args(["copy", "--quiet", "--all", "--src-tls-verify=false"])
            .arg(format!("docker://{repo}:1.2.3"))
            .arg(format!("oci:{}:x", layout.display()))
            .envs(reg.client_env()),
    );
    for entry in index["manifests"].as_array().unwrap() {
        let arch = entry["platform"]["architecture"].as_str().unwrap();
        let manifest = read_blob(&layout, entry["digest"].as_str().unwrap());
        let config = read_blob(&layout, manifest["config"]["digest"].as_str().unwrap());
        assert_eq!(config["architecture"], arch);
        assert_eq!(config["os"], "linux");
        assert_eq!(
            config["config"]["Entrypoint"],
            serde_json::json!(["/hakim-init"])
        );
        let layers = manifest["layers"].as_array().unwrap();
        assert_eq!(layers.len(), 1, "{arch}: {manifest:#}");
        let hex = layers[0]["digest"]
            .as_str()
            .unwrap()
            .trim_start_matches("sha256:");
        let unpacked = work.path().join(arch);
        fs::create_dir_all(&unpacked).unwrap();
        run_ok(
            Command::new("tar")
                .arg("-xf")
                .arg(layout.join("blobs/sha256").join(hex))
                .arg("-C")
                .arg(&unpacked),
        );
        let names: Vec<String> = fs::read_dir(&unpacked)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            ["hakim-init"],
            "{arch}: the image holds more than the init"
        );
        let bin = unpacked.join("hakim-init");
        assert_eq!(
            fs::metadata(&bin).unwrap().permissions().mode() & 0o7777,
            0o755
        );
        let machine = if arch == "arm64" { "aarch64" } else { "x86_64" };
        let released = dist.path().join(format!("hakim-init-{machine}-linux-musl"));
        assert_eq!(
            sha256_file(&bin),
            sha256_file(&released),
            "{arch}: the image's /hakim-init is not the released binary"
        );
    }
}

/// Copies the checkout (without `target/`, `.git/`, `out/`) to `dest`.
fn copy_checkout(from: &std::path::Path, dest: &std::path::Path) {
    fs::create_dir_all(dest).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if ["target", ".git", "out"].iter().any(|n| name == *n) {
            continue;
        }
        let (src, dst) = (entry.path(), dest.join(&name));
        let kind = entry.file_type().unwrap();
        if kind.is_dir() {
            copy_checkout(&src, &dst);
        } else if kind.is_file() {
            fs::copy(&src, &dst).unwrap();
        }
    }
}

/// hakim-init rebuilt from a copy of the sources at another path, into another target
/// directory, is bit-for-bit the binary `ci/build-init.sh` built here (docs/init.md,
/// "Reproducible builds").
#[test]
fn init_rebuild_is_bit_for_bit_identical() {
    if !hakim_e2e::init_harness::init_ready() {
        return;
    }
    let _guard = serial();
    let ws = workspace_root();
    let here = hakim_e2e::init_harness::init_bin();
    let work = scratch_dir("repro-init-");
    let copy = work.path().join("elsewhere/hakim-tools");
    copy_checkout(&ws, &copy);
    let target = work.path().join("other-target");
    let started = std::time::Instant::now();
    let again = build_init(&copy, None, &[("CARGO_TARGET_DIR", &target)]);
    assert!(again.starts_with(&target), "{}", again.display());
    eprintln!(
        "rebuilt in {:.1} s: {} ({} bytes) vs {} ({} bytes)",
        started.elapsed().as_secs_f64(),
        sha256_file(&again),
        fs::metadata(&again).unwrap().len(),
        sha256_file(here),
        fs::metadata(here).unwrap().len()
    );
    assert_eq!(
        sha256_file(&again),
        sha256_file(here),
        "hakim-init is not reproducible: {} and {} differ",
        again.display(),
        here.display()
    );
}

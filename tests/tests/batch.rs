//! End-to-end tests of `hakim-convert batch` against the Debian `docker-registry` on 127.0.0.1
//! (`tests/src/registry.rs`).
//!
//! The variants are the converter's demo image plus one `umoci insert` layer each
//! (`/etc/hakim-variant`), pushed with skopeo as `e2e/hakim-<variant>:1`: every variant shares
//! the demo image's three layers. Oracles: the registry's manifests (unique blob sizes), its
//! access log or the fault proxy's request list (which blobs were really fetched, how often),
//! a plain `hakim-convert convert` of each variant's local layout (the same bytes), and
//! `sha256sum -c`.
//!
//! Gating: the registry tools (`docker-registry`, `skopeo`, `openssl`, `htpasswd`, `umoci`),
//! `sha256sum`, and a converter with the registry transport. Missing ones skip, or fail under
//! `HAKIM_E2E=1`.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use hakim_e2e::fault_proxy::{Fault, FaultProxy, Rule};
use hakim_e2e::registry::{
    assert_each_blob_fetched_once, blob_fetches, converter_ready, copy_to_layout, demo_image,
    registry_ready, run_converter, sha256_hex, umoci_insert, unique_blobs, LocalImage, Mode,
    Registry,
};
use hakim_e2e::{convert, run_ok, scratch_dir, serial, sha256_file, Compression};
use serde_json::Value;

const SOURCE_DATE_EPOCH: &str = "1750000000";

fn ready() -> bool {
    registry_ready() && converter_ready()
}

/// `base` plus a layer holding `/etc/hakim-variant` = `content`, in `DIR/<name>:<name>`.
fn variant_image(base: &LocalImage, dir: &Path, name: &str, content: &str) -> LocalImage {
    let image = copy_to_layout(base, &dir.join(name), name, &[]);
    umoci_insert(&image, dir, content, "/etc/hakim-variant");
    image
}

/// Builds and pushes `e2e/hakim-<v>:1` for every name; returns the local images by name.
fn push_variants(reg: &Registry, dir: &Path, names: &[&str]) -> BTreeMap<String, LocalImage> {
    let base = demo_image(dir);
    let mut images = BTreeMap::new();
    for name in names {
        let image = variant_image(&base, dir, name, &format!("variant {name}\n"));
        reg.push(&image.oci_ref(), &format!("e2e/hakim-{name}:1"), &[]);
        images.insert(name.to_string(), image);
    }
    images
}

/// A registry serving `e2e/hakim-<name>:1` for every name (see [`push_variants`]).
struct Family {
    _guard: std::sync::MutexGuard<'static, ()>,
    work: tempfile::TempDir,
    reg: Registry,
    images: BTreeMap<String, LocalImage>,
    manifests: Vec<Value>,
    /// Unique blobs (configs and layers) over all the variants.
    unique: BTreeMap<String, u64>,
}

/// `None` when the tools are missing (the test then passes as skipped).
fn family(names: &[&str]) -> Option<Family> {
    if !ready() {
        return None;
    }
    let guard = serial();
    let work = scratch_dir("batch-work-");
    let reg = Registry::start(Mode::Plain);
    let images = push_variants(&reg, work.path(), names);
    let manifests: Vec<Value> = names
        .iter()
        .map(|n| reg.manifest(&format!("e2e/hakim-{n}:1")))
        .collect();
    let unique = unique_blobs(&manifests.iter().collect::<Vec<_>>());
    Some(Family {
        _guard: guard,
        work,
        reg,
        images,
        manifests,
        unique,
    })
}

/// `hakim-convert batch --namespace HOST/e2e --variant … --tag 1 --compression zstd -o OUT
/// --cache-dir CACHE EXTRA…`, with SOURCE_DATE_EPOCH set.
fn batch(
    reg: &Registry,
    host: &str,
    variants: &[&str],
    out: &Path,
    cache: &Path,
    extra: &[&str],
) -> Output {
    let mut args: Vec<String> = vec!["batch".into(), "--namespace".into(), format!("{host}/e2e")];
    for v in variants {
        args.push("--variant".into());
        args.push(v.to_string());
    }
    args.extend(
        ["--tag", "1", "--compression", "zstd", "-o"]
            .iter()
            .map(|s| s.to_string()),
    );
    args.push(out.display().to_string());
    args.push("--cache-dir".into());
    args.push(cache.display().to_string());
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut env = reg.client_env();
    env.push(("SOURCE_DATE_EPOCH".into(), SOURCE_DATE_EPOCH.into()));
    run_converter(&args, &env)
}

/// The digest of the manifest `reference` serves.
fn manifest_digest(reg: &Registry, reference: &str) -> String {
    format!("sha256:{}", sha256_hex(&reg.raw_manifest(reference)))
}

fn json_of(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "batch --json printed no JSON ({e}):\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// A successful `--json` batch run.
fn batch_ok(reg: &Registry, variants: &[&str], out: &Path, cache: &Path, extra: &[&str]) -> Value {
    let mut args = vec!["--json"];
    args.extend_from_slice(extra);
    let o = batch(reg, &reg.host(), variants, out, cache, &args);
    assert!(
        o.status.success(),
        "batch failed ({}):\n{}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    json_of(&o)
}

/// Each variant's status, by name.
fn statuses(json: &Value) -> BTreeMap<String, String> {
    json["variants"]
        .as_array()
        .expect("variants array")
        .iter()
        .map(|v| {
            (
                v["variant"].as_str().unwrap().to_string(),
                v["status"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// `(file, sha256)` of every converted or skipped artifact, by variant.
fn artifacts(json: &Value) -> BTreeMap<String, (String, String)> {
    let mut map = BTreeMap::new();
    for v in json["variants"].as_array().unwrap() {
        for a in v["artifacts"].as_array().unwrap() {
            if let (Some(f), Some(s)) = (a["file"].as_str(), a["sha256"].as_str()) {
                map.insert(
                    v["variant"].as_str().unwrap().to_string(),
                    (f.to_string(), s.to_string()),
                );
            }
        }
    }
    map
}

fn record(out: &Path) -> BTreeMap<String, (String, String)> {
    fs::read_to_string(out.join("sources.txt"))
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            assert_eq!(
                f.len(),
                3,
                "record line `{l}` is not `artifact digest sha256`"
            );
            (f[0].to_string(), (f[1].to_string(), f[2].to_string()))
        })
        .collect()
}

fn sha256sum_check(out: &Path) {
    run_ok(
        Command::new("sha256sum")
            .args(["-c", "--strict", "sha256sums.txt"])
            .current_dir(out),
    );
}

/// Nothing but artifacts (each listed in `sha256sums.txt`), `sha256sums.txt` and `sources.txt`
/// in an output directory: no temporary or lock files (release steps upload `out/*`).
fn no_partials(out: &Path) {
    let sums = fs::read_to_string(out.join("sha256sums.txt")).unwrap_or_default();
    let listed: Vec<&str> = sums
        .lines()
        .filter_map(|l| l.split_once("  ").map(|(_, f)| f))
        .collect();
    let left: Vec<String> = fs::read_dir(out)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "sha256sums.txt" && n != "sources.txt" && !listed.contains(&n.as_str()))
        .collect();
    assert!(
        left.is_empty(),
        "files other than artifacts and their records left in {}: {left:?}",
        out.display()
    );
}

#[test]
fn batch_without_output_dir_writes_into_the_current_directory() {
    let Some(Family { reg, .. }) = family(&["php"]) else {
        return;
    };
    let cwd = scratch_dir("batch-cwd-");
    let cache = scratch_dir("batch-cache-");
    let mut cmd = Command::new(hakim_e2e::converter_bin());
    cmd.args(["batch", "--namespace", &format!("{}/e2e", reg.host())])
        .args([
            "--variant",
            "php",
            "--tag",
            "1",
            "--compression",
            "zstd",
            "-q",
        ])
        .arg("--cache-dir")
        .arg(cache.path())
        .current_dir(cwd.path())
        .envs(reg.client_env());
    run_ok(&mut cmd);
    let mut names: Vec<String> = fs::read_dir(cwd.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names.len(), 3, "{names:?}");
    assert!(names[0].starts_with("hakim-php-") && names[0].ends_with("-amd64.tar.zst"));
    assert_eq!(names[1..], ["sha256sums.txt", "sources.txt"]);
    sha256sum_check(cwd.path());
    no_partials(cwd.path());
}

#[test]
fn batch_shares_blobs_skips_unchanged_and_reconverts_only_the_changed_variant() {
    let names = ["php", "js", "rust"];
    let Some(Family {
        work,
        reg,
        images,
        manifests,
        unique,
        ..
    }) = family(&names)
    else {
        return;
    };
    let per_image: u64 = manifests
        .iter()
        .map(|m| unique_blobs(&[m]).values().sum::<u64>())
        .sum();
    let out = scratch_dir("batch-out-");
    let cache = scratch_dir("batch-cache-");

    // 1. Cold cache: every variant converted, each unique blob fetched once.
    let mark = reg.access_log_mark();
    let first = batch_ok(&reg, &names, out.path(), cache.path(), &[]);
    assert!(
        statuses(&first).values().all(|s| s == "converted"),
        "{first:#}"
    );
    assert_each_blob_fetched_once(&reg.access_log_since(mark), &unique);
    let downloaded = first["bytes_downloaded"].as_u64().unwrap();
    eprintln!(
        "first run: downloaded {downloaded} bytes; unique blobs {} bytes; the images alone {per_image} bytes",
        unique.values().sum::<u64>()
    );
    assert_eq!(
        downloaded,
        unique.values().sum::<u64>(),
        "bytes downloaded != unique blob bytes"
    );
    assert!(downloaded < per_image, "no blob was shared");
    sha256sum_check(out.path());
    let arts = artifacts(&first);
    let rec = record(out.path());
    for (name, image) in &images {
        let (file, sha) = &arts[name];
        assert!(out.path().join(file).is_file(), "{file} missing");
        assert_eq!(&sha256_file(&out.path().join(file)), sha);
        // The same bytes as a plain conversion of the local layout.
        let plain = convert(
            &image.oci_ref(),
            Compression::Zstd,
            &["--variant", name],
            &[("SOURCE_DATE_EPOCH", SOURCE_DATE_EPOCH)],
        );
        assert_eq!(&plain.sha256, sha, "{name}: batch and convert differ");
        let digest = manifest_digest(&reg, &format!("e2e/hakim-{name}:1"));
        assert_eq!(rec[file], (digest, sha.clone()), "record line of {file}");
    }
    assert_eq!(rec.len(), names.len());

    // 2. Nothing changed: everything skipped, no blob fetched, artifacts untouched.
    let mark = reg.access_log_mark();
    let second = batch_ok(&reg, &names, out.path(), cache.path(), &[]);
    assert!(
        statuses(&second).values().all(|s| s == "skipped"),
        "{second:#}"
    );
    assert_eq!(second["bytes_downloaded"].as_u64(), Some(0));
    let fetched = blob_fetches(&reg.access_log_since(mark));
    assert!(fetched.is_empty(), "second run fetched blobs: {fetched:?}");
    assert_eq!(artifacts(&second), arts);
    // The human summary says so too.
    let human = batch(&reg, &reg.host(), &names, out.path(), cache.path(), &[]);
    assert!(human.status.success());
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(
        text.contains("3 variants: 0 converted, 3 skipped, 0 failed"),
        "{text}"
    );

    // 3. js changes: only js is converted, only its new blobs are fetched.
    let js = variant_image(
        &demo_image(&work.path().join("again")),
        &work.path().join("again"),
        "js",
        "variant js, rebuilt\n",
    );
    reg.push(&js.oci_ref(), "e2e/hakim-js:1", &[]);
    let js_manifest = reg.manifest("e2e/hakim-js:1");
    let new_blobs: BTreeMap<String, u64> = unique_blobs(&[&js_manifest])
        .into_iter()
        .filter(|(d, _)| !unique.contains_key(d))
        .collect();
    assert_eq!(new_blobs.len(), 2, "a new config and a new layer");
    let mark = reg.access_log_mark();
    let third = batch_ok(&reg, &names, out.path(), cache.path(), &[]);
    let st = statuses(&third);
    assert_eq!(st["js"], "converted", "{third:#}");
    assert_eq!(
        (st["php"].as_str(), st["rust"].as_str()),
        ("skipped", "skipped")
    );
    assert_each_blob_fetched_once(&reg.access_log_since(mark), &new_blobs);
    let arts3 = artifacts(&third);
    assert_ne!(arts3["js"].1, arts["js"].1, "js artifact unchanged");
    assert_eq!(arts3["php"], arts["php"]);
    let rec3 = record(out.path());
    assert_eq!(
        rec3[&arts3["js"].0].0,
        manifest_digest(&reg, "e2e/hakim-js:1")
    );
    sha256sum_check(out.path());

    // 4. --force converts everything again, from the cache alone, to the same bytes.
    let mark = reg.access_log_mark();
    let forced = batch_ok(&reg, &names, out.path(), cache.path(), &["--force"]);
    assert!(statuses(&forced).values().all(|s| s == "converted"));
    assert!(blob_fetches(&reg.access_log_since(mark)).is_empty());
    assert_eq!(artifacts(&forced), arts3);
    no_partials(out.path());
}

#[test]
fn batch_one_broken_variant_does_not_lose_the_others() {
    let Some(Family { reg, .. }) = family(&["php", "js"]) else {
        return;
    };
    let proxy = FaultProxy::start(reg.port);
    // js's own layer comes back corrupted every time; `missing` was never pushed.
    let js_layer = reg.manifest("e2e/hakim-js:1")["layers"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()["digest"]
        .as_str()
        .unwrap()
        .to_string();
    proxy.add_rule(Rule::new(&js_layer, None, Fault::FlipByte));
    let out = scratch_dir("batch-out-");
    let cache = scratch_dir("batch-cache-");
    let o = batch(
        &reg,
        &proxy.host(),
        &["php", "js", "missing"],
        out.path(),
        cache.path(),
        &["--json", "--max-attempts", "2"],
    );
    assert!(!o.status.success(), "a batch with failures exited 0");
    let json = json_of(&o);
    let st = statuses(&json);
    assert_eq!(st["php"], "converted", "{json:#}");
    assert_eq!(st["js"], "failed");
    assert_eq!(st["missing"], "failed");
    assert_eq!(json["failed"].as_u64(), Some(2));
    let by_name = |n: &str| {
        json["variants"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["variant"] == n)
            .cloned()
            .unwrap()
    };
    let js_err = by_name("js")["artifacts"][0]["error"]
        .as_str()
        .unwrap_or_default()
        .to_lowercase();
    assert!(
        js_err.contains(&js_layer[7..19]),
        "js error names no layer: {js_err}"
    );
    let missing_err = by_name("missing")["error"]
        .as_str()
        .unwrap_or_default()
        .to_lowercase();
    assert!(
        missing_err.contains("hakim-missing") && missing_err.contains("404")
            || missing_err.contains("not found")
            || missing_err.contains("unknown"),
        "missing variant: {missing_err}"
    );
    // The good artifact is complete, checksummed and recorded; nothing else is there.
    let arts = artifacts(&json);
    let (file, sha) = &arts["php"];
    assert_eq!(&sha256_file(&out.path().join(file)), sha);
    sha256sum_check(out.path());
    assert_eq!(record(out.path()).keys().collect::<Vec<_>>(), [file]);
    let names: Vec<String> = fs::read_dir(out.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tar"))
        .collect();
    assert_eq!(names, std::slice::from_ref(file), "only php's artifact");
    no_partials(out.path());
    // The human summary names the failures.
    let human = batch(
        &reg,
        &proxy.host(),
        &["php", "js"],
        out.path(),
        cache.path(),
        &["--max-attempts", "1"],
    );
    assert!(!human.status.success());
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(
        text.contains("FAILED") && text.contains("skipped"),
        "{text}"
    );
}

#[test]
fn concurrent_batches_sharing_a_cache_fetch_each_blob_once() {
    let names = ["php", "js", "rust"];
    let Some(Family { reg, unique, .. }) = family(&names) else {
        return;
    };
    let proxy = FaultProxy::start(reg.port);
    // Slow every blob down so the two runs (and the variants inside each) overlap.
    for d in unique.keys() {
        proxy.add_rule(Rule::new(
            d,
            None,
            Fault::Trickle {
                bytes_per_sec: 4096,
            },
        ));
    }
    let cache = scratch_dir("batch-cache-");
    let outs = [scratch_dir("batch-out-a-"), scratch_dir("batch-out-b-")];
    let host = proxy.host();
    let results: Vec<Output> = std::thread::scope(|s| {
        let handles: Vec<_> = outs
            .iter()
            .map(|o| {
                let host = host.clone();
                let (reg, cache) = (&reg, cache.path());
                s.spawn(move || batch(reg, &host, &names, o.path(), cache, &["--json"]))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in &results {
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    }
    let (a, b) = (json_of(&results[0]), json_of(&results[1]));
    assert_eq!(artifacts(&a), artifacts(&b), "the two runs disagree");
    let total = a["bytes_downloaded"].as_u64().unwrap() + b["bytes_downloaded"].as_u64().unwrap();
    for d in unique.keys() {
        let gets = proxy.blob_gets(d);
        assert_eq!(gets.len(), 1, "{d} fetched {} times", gets.len());
    }
    assert_eq!(
        total,
        unique.values().sum::<u64>(),
        "bytes downloaded by both runs"
    );
}

#[test]
fn batch_agent_native_outputs_and_a_new_init_rebuilds_them() {
    let Some(Family { reg, .. }) = family(&["php", "js"]) else {
        return;
    };
    let out = scratch_dir("batch-out-");
    let cache = scratch_dir("batch-cache-");
    let tools = scratch_dir("batch-init-");
    let init = tools.path().join("hakim-init");
    fs::copy(hakim_e2e::init_harness::init_bin(), &init).expect("copy hakim-init");
    let services = hakim_e2e::workspace_root().join("images/services");
    let args = [
        "--format",
        "rootfs",
        "--format",
        "oci-archive",
        "--inject-init",
        init.to_str().unwrap(),
        "--services",
        services.to_str().unwrap(),
    ];
    let first = batch_ok(&reg, &["php", "js"], out.path(), cache.path(), &args);
    let files: Vec<String> = first["variants"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|v| v["artifacts"].as_array().unwrap().clone())
        .map(|a| a["file"].as_str().unwrap().to_string())
        .collect();
    assert!(files.contains(&"hakim-php_1.tar".to_string()), "{files:?}");
    assert!(
        files.contains(&"hakim-js-trixie-amd64.tar.zst".to_string()),
        "{files:?}"
    );
    assert_eq!(files.len(), 4);
    for f in &files {
        // Every artifact passes the converter's own Proxmox checks.
        run_ok(
            Command::new(hakim_e2e::converter_bin())
                .arg("verify")
                .arg(out.path().join(f)),
        );
    }
    sha256sum_check(out.path());
    publish(&reg, out.path(), &first, &files);
    let second = batch_ok(&reg, &["php", "js"], out.path(), cache.path(), &args);
    assert!(
        statuses(&second).values().all(|s| s == "skipped"),
        "{second:#}"
    );

    // A new hakim-init (same sources otherwise) makes every artifact stale.
    let mut bytes = fs::read(&init).unwrap();
    bytes.push(0);
    fs::write(&init, bytes).unwrap();
    let third = batch_ok(&reg, &["php", "js"], out.path(), cache.path(), &args);
    assert!(
        statuses(&third).values().all(|s| s == "converted"),
        "{third:#}"
    );
    assert_eq!(third["bytes_downloaded"].as_u64(), Some(0));
    sha256sum_check(out.path());
}

/// `ci/templates-publish.sh` on a batch's output: the release directory holds the converted
/// artifacts with a `sha256sums.txt` that verifies and the record; `gh` (here `echo`) is asked
/// to create the release with exactly those files; the OCI archives are pushed as
/// `hakim-<variant>:agent-native` and come back from the registry as the archive's manifest.
fn publish(reg: &Registry, out: &Path, json: &Value, files: &[String]) {
    fs::write(out.join("batch.json"), json.to_string()).unwrap();
    let script = hakim_e2e::workspace_root().join("ci/templates-publish.sh");
    let o = run_ok(
        Command::new(&script)
            .arg(out)
            .arg("templates-test")
            .arg(format!("{}/e2e", reg.host()))
            .env("GH", "echo")
            .env("SKOPEO_COPY_OPTS", "--dest-tls-verify=false")
            .envs(reg.client_env()),
    );
    let printed = String::from_utf8_lossy(&o.stdout);
    let gh = printed
        .lines()
        .find(|l| l.starts_with("release create templates-test"))
        .unwrap_or_else(|| panic!("no release created:\n{printed}"));
    let rel = out.join("release");
    for f in files
        .iter()
        .map(String::as_str)
        .chain(["sha256sums.txt", "sources.txt"])
    {
        assert!(
            gh.contains(&format!("{}/{f}", rel.display())),
            "{f} not released: {gh}"
        );
        assert!(rel.join(f).is_file(), "{f} not in {}", rel.display());
    }
    sha256sum_check(&rel);
    for v in ["php", "js"] {
        let pushed = reg.manifest(&format!("e2e/hakim-{v}:agent-native"));
        let tar = out.join(format!("hakim-{v}_1.tar"));
        let listing = run_ok(Command::new("tar").arg("-xOf").arg(&tar).arg("index.json")).stdout;
        let index: Value = serde_json::from_slice(&listing).unwrap();
        assert_eq!(
            manifest_digest(reg, &format!("e2e/hakim-{v}:agent-native")),
            index["manifests"][0]["digest"].as_str().unwrap(),
            "{v}: the pushed image is not the archive's ({pushed})"
        );
        assert_eq!(
            reg.raw_manifest(&format!("e2e/hakim-{v}:agent-native-templates-test")),
            reg.raw_manifest(&format!("e2e/hakim-{v}:agent-native"))
        );
    }
}

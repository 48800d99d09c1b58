//! Sources and bad inputs: every transport, platform selection, digest checks,
//! and the rule that a failed run leaves no artifact behind.

mod common;

use std::process::Command;

use common::{flatten_err, listing, non_dirs, Fixture};
use hakim_convert::sample::{compress_blob, BlobCompression, LayerBuilder as L, SampleLayer};
use hakim_convert::tarout::OutKind;

fn gz(l: L) -> SampleLayer {
    SampleLayer::new(l.finish(), BlobCompression::Gzip)
}

fn two_layers() -> Vec<SampleLayer> {
    vec![
        gz(L::new()
            .file("etc/os-release", "ID=debian\nVERSION_CODENAME=trixie\n")
            .file("a", "a")),
        SampleLayer::new(
            L::new().file("b", "b").whiteout("a").finish(),
            BlobCompression::Zstd,
        ),
    ]
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_hakim-convert"))
}

#[test]
fn blob_digest_mismatch_aborts_with_no_output() {
    let f = Fixture::new(&two_layers());
    let m = common::manifest_of(&f.layout());
    let d = m["layers"][1]["digest"].as_str().unwrap();
    let path = f
        .layout()
        .join("blobs/sha256")
        .join(d.strip_prefix("sha256:").unwrap());
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();
    let err = f.convert().unwrap_err();
    assert!(err.contains("layer 2"), "{err}");
    assert!(
        err.contains("digest mismatch") || err.contains("corrupt"),
        "{err}"
    );
    assert!(f.outputs().is_empty());
}

#[test]
fn diff_id_mismatch_aborts() {
    let tar = L::new().file("a", "a").finish();
    let other = L::new().file("a", "not a").finish();
    let layer = SampleLayer {
        tar: other,
        blob: compress_blob(&tar, BlobCompression::Gzip),
        media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
    };
    let err = flatten_err(&[layer]);
    assert!(err.contains("diff_id mismatch"), "{err}");
}

#[test]
fn layer_count_must_match_diff_ids() {
    let f = Fixture::new(&two_layers());
    common::rewrite_image(
        &f.layout(),
        |c| {
            c["rootfs"]["diff_ids"].as_array_mut().unwrap().pop();
        },
        |_| {},
    );
    let err = f.convert().unwrap_err();
    assert!(
        err.contains("lists 2 layers but its config has 1 diff_ids"),
        "{err}"
    );
    assert!(f.outputs().is_empty());
}

#[test]
fn blob_size_must_match_descriptor() {
    let f = Fixture::new(&two_layers());
    common::rewrite_image(
        &f.layout(),
        |_| {},
        |m| {
            let size = m["layers"][0]["size"].as_u64().unwrap();
            m["layers"][0]["size"] = (size - 10).into();
        },
    );
    let err = f.convert().unwrap_err();
    assert!(
        err.contains("longer than") || err.contains("declares"),
        "{err}"
    );
}

#[test]
fn truncated_layer_is_a_clear_error() {
    let tar = L::new()
        .file("a", &"x".repeat(100_000))
        .file("b", "b")
        .finish();
    let mut blob = compress_blob(&tar, BlobCompression::Gzip);
    blob.truncate(blob.len() / 2);
    // The descriptor matches the truncated blob, so only decompression can notice.
    let err = flatten_err(&[SampleLayer {
        tar,
        blob,
        media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
    }]);
    assert!(err.contains("layer 1"), "{err}");
    assert!(
        err.contains("truncated") || err.contains("corrupt"),
        "{err}"
    );
}

#[test]
fn non_tar_garbage_is_a_clear_error() {
    let garbage: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    let err = flatten_err(&[SampleLayer::new(garbage, BlobCompression::Plain)]);
    assert!(err.contains("layer 1"), "{err}");
}

#[test]
fn pax_sparse_is_refused_and_gnu_sparse_is_expanded() {
    let dir = tempfile::tempdir().unwrap();
    let sparse = dir.path().join("sparse");
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::File::create(&sparse).unwrap();
        f.write_all(b"head").unwrap();
        f.seek(SeekFrom::Start(1 << 20)).unwrap();
        f.write_all(b"tail").unwrap();
    }
    let make = |format: &str| {
        let out = dir.path().join(format!("{format}.tar"));
        let st = Command::new("tar")
            .args(["--sparse", &format!("--format={format}"), "-cf"])
            .arg(&out)
            .arg("-C")
            .arg(dir.path())
            .arg("sparse")
            .status()
            .expect("GNU tar is needed for this test");
        assert!(st.success());
        std::fs::read(out).unwrap()
    };
    let f = Fixture::new(&[SampleLayer::new(make("gnu"), BlobCompression::Gzip)]);
    let s = f.convert().unwrap();
    let mut ar = tar::Archive::new(std::fs::File::open(&s.artifact).unwrap());
    let mut found = false;
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        if e.path_bytes().as_ref() == b"./sparse" {
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut data).unwrap();
            assert_eq!(data.len(), (1 << 20) + 4);
            assert_eq!(&data[..4], b"head");
            assert_eq!(&data[data.len() - 4..], b"tail");
            assert!(data[4..1 << 20].iter().all(|&b| b == 0));
            found = true;
        }
    }
    assert!(found);
    let err = flatten_err(&[SampleLayer::new(make("pax"), BlobCompression::Gzip)]);
    assert!(err.contains("PAX sparse"), "{err}");
}

/// Names reach messages escaped and cut (issue 13): NUL bytes, terminal
/// escapes, bytes that are not UTF-8 and 4 KB names were printed raw.
#[test]
fn member_names_in_messages_are_escaped_and_cut() {
    // A NUL byte, only a PAX path can carry it.
    let mut b = tar::Builder::new(Vec::new());
    b.append_pax_extensions([("path", &b"a\0b"[..])]).unwrap();
    let mut h = tar::Header::new_ustar();
    h.set_path("placeholder").unwrap();
    h.set_size(0);
    h.set_cksum();
    b.append(&h, &[][..]).unwrap();
    let err = flatten_err(&[SampleLayer::new(
        b.into_inner().unwrap(),
        BlobCompression::Plain,
    )]);
    assert!(err.contains("'a\\0b'"), "{err}");
    assert!(!err.contains('\0'), "{err:?}");

    // A 4200-byte name: cut, with its length.
    let err = flatten_err(&[gz(L::new().file(&"d/".repeat(2100), "x"))]);
    assert!(err.contains("… (4200 bytes)"), "{err}");
    assert!(err.len() < 600, "{} bytes: {err}", err.len());

    // Terminal escapes and a byte that is not UTF-8, in an error (a hardlink
    // to a missing target) and in a warning (skipped AUFS metadata).
    let weird = b"t\x1b]0;owned\x07\xff";
    let err = flatten_err(&[gz(L::new().entry(
        b"link",
        OutKind::Hardlink,
        0o644,
        Some(weird),
        b"",
        &[],
    ))]);
    assert!(err.contains("'t\\x1b]0;owned\\x07\\xff'"), "{err}");
    assert!(
        !err.contains('\x1b') && !err.contains('\u{fffd}'),
        "{err:?}"
    );
    let f = Fixture::new(&[gz(L::new().file("a", "a").entry(
        b".wh..wh.\x1b[2J\xfe",
        OutKind::File,
        0o644,
        None,
        b"",
        &[],
    ))]);
    let s = f.convert().unwrap();
    let warning = s
        .warnings
        .iter()
        .find(|w| w.contains("AUFS"))
        .expect("an AUFS warning");
    assert!(warning.contains("'.wh..wh.\\x1b[2J\\xfe'"), "{warning}");
}

#[test]
fn oci_archive_and_docker_archive_transports() {
    let layers = two_layers();
    let f = Fixture::new(&layers);
    let expected = non_dirs(&listing(&f.convert().unwrap().artifact));
    assert_eq!(
        expected,
        [
            "./etc/os-release f 644 0:0 =ID=debian\nVERSION_CODENAME=trixie\n",
            "./b f 644 0:0 =b"
        ]
    );

    // oci-archive: the same layout in a plain tar, as skopeo writes it.
    // Without a ref name annotation (skopeo's `oci-archive:FILE` has none), the
    // file name PVE gives pulled archives names the image.
    let bare = f.dir.path().join("bare");
    std::fs::create_dir_all(bare.join("blobs")).unwrap();
    let mut index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(f.layout().join("index.json")).unwrap()).unwrap();
    index["manifests"][0]
        .as_object_mut()
        .unwrap()
        .remove("annotations");
    std::fs::write(bare.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    std::fs::copy(f.layout().join("oci-layout"), bare.join("oci-layout")).unwrap();
    let archive = f.dir.path().join("hakim-js_latest.tar");
    {
        let mut b = tar::Builder::new(std::fs::File::create(&archive).unwrap());
        b.append_dir_all("blobs", f.layout().join("blobs")).unwrap();
        b.append_path_with_name(bare.join("index.json"), "index.json")
            .unwrap();
        b.append_path_with_name(bare.join("oci-layout"), "oci-layout")
            .unwrap();
        b.finish().unwrap();
    }
    let mut o = f.options(hakim_convert::compress::OutputCompression::None);
    o.source = format!("oci-archive:{}", archive.display());
    o.name = None;
    let s = hakim_convert::convert::convert(&o).unwrap();
    assert_eq!(non_dirs(&listing(&s.artifact)), expected);
    // PVE's `<name>_<tag>.tar` naming gives the repository name back.
    assert_eq!(s.file_name, "hakim-js-trixie-amd64.tar");

    // docker-archive: manifest.json + <hex>.json config + <id>/layer.tar layers.
    let docker = f.dir.path().join("saved.tar");
    {
        let diff_ids: Vec<String> = layers
            .iter()
            .map(|l| hakim_convert::digest::Digest::of_bytes(&l.tar).to_string())
            .collect();
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64", "os": "linux", "config": {},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }))
        .unwrap();
        let config_name = format!(
            "{}.json",
            hakim_convert::digest::Digest::of_bytes(&config).hex()
        );
        let manifest = serde_json::to_vec(&serde_json::json!([{
            "Config": config_name,
            "RepoTags": ["ghcr.io/shekohex/hakim-php:1.0"],
            "Layers": ["l1/layer.tar", "l2/layer.tar"],
        }]))
        .unwrap();
        let mut b = tar::Builder::new(std::fs::File::create(&docker).unwrap());
        let mut add = |name: &str, data: &[u8]| {
            let mut h = tar::Header::new_ustar();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, data).unwrap();
        };
        add("manifest.json", &manifest);
        add(&config_name, &config);
        add("l1/layer.tar", &layers[0].tar);
        add("l2/layer.tar", &layers[1].tar);
        b.finish().unwrap();
    }
    o.source = format!("docker-archive:{}", docker.display());
    let s = hakim_convert::convert::convert(&o).unwrap();
    assert_eq!(non_dirs(&listing(&s.artifact)), expected);
    assert_eq!(s.file_name, "hakim-php-trixie-amd64.tar");
    assert!(s.source.layers.iter().all(|l| l.digest.is_none()));

    // A corrupted docker-archive layer is caught by its diff_id.
    let mut bytes = std::fs::read(&docker).unwrap();
    let pos = bytes.windows(8).rposition(|w| w == b"trixie\n\0").unwrap();
    bytes[pos] = b'X';
    std::fs::write(&docker, bytes).unwrap();
    let err = format!("{:#}", hakim_convert::convert::convert(&o).unwrap_err());
    assert!(err.contains("diff_id mismatch"), "{err}");
}

/// A layout holding an amd64 image (file `arch` = "amd64") plus the blobs of an
/// arm64 one; returns the fixture and both manifest descriptors, platform set.
fn amd64_and_arm64() -> (Fixture, serde_json::Value, serde_json::Value) {
    let f = Fixture::new(&[gz(L::new().file("arch", "amd64"))]);
    let arm = tempfile::tempdir().unwrap();
    hakim_convert::sample::write_oci_layout(
        arm.path(),
        "x",
        "arm64",
        &[gz(L::new().file("arch", "arm64"))],
        serde_json::json!({}),
    )
    .unwrap();
    for e in std::fs::read_dir(arm.path().join("blobs/sha256")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(
            e.path(),
            f.layout().join("blobs/sha256").join(e.file_name()),
        )
        .unwrap();
    }
    let first = |layout: &std::path::Path| {
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
        index["manifests"][0].clone()
    };
    let mut amd = first(&f.layout());
    let mut arm64 = first(arm.path());
    amd["platform"] = serde_json::json!({"os": "linux", "architecture": "amd64"});
    arm64["platform"] = serde_json::json!({"os": "linux", "architecture": "arm64"});
    (f, amd, arm64)
}

#[test]
fn platform_selection_from_an_index() {
    let (f, amd, mut arm64) = amd64_and_arm64();
    arm64["platform"] =
        serde_json::json!({"os": "linux", "architecture": "arm64", "variant": "v8"});
    let mut attestation = amd.clone();
    attestation["platform"] = serde_json::json!({"os": "unknown", "architecture": "unknown"});
    let nested = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [amd, arm64, attestation],
    }))
    .unwrap();
    let (d, s) = common::write_blob(&f.layout(), &nested);
    let top = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.index.v1+json", "digest": d, "size": s,
        "annotations": {"org.opencontainers.image.ref.name": "hakim-fixture:1"}}]});
    std::fs::write(
        f.layout().join("index.json"),
        serde_json::to_vec(&top).unwrap(),
    )
    .unwrap();

    let run = |platform: Option<&str>| {
        let mut o = f.options(hakim_convert::compress::OutputCompression::None);
        o.platform = platform.map(|p| p.parse().unwrap());
        hakim_convert::convert::convert(&o).map_err(|e| format!("{e:#}"))
    };
    let s = run(None).unwrap();
    assert_eq!(non_dirs(&listing(&s.artifact)), ["./arch f 644 0:0 =amd64"]);
    let s = run(Some("linux/arm64")).unwrap();
    assert_eq!(non_dirs(&listing(&s.artifact)), ["./arch f 644 0:0 =arm64"]);
    assert_eq!(s.source.platform, "linux/arm64");
    let err = run(Some("linux/s390x")).unwrap_err();
    assert!(err.contains("no image for platform linux/s390x"), "{err}");
    assert!(
        err.contains("available: linux/amd64, linux/arm64/v8"),
        "{err}"
    );
}

#[test]
fn cli_reports_errors_and_leaves_nothing() {
    let f = Fixture::new(&[gz(L::new().file("../../escape", "x"))]);
    let out = bin()
        .args(["convert", &format!("oci:{}:1", f.layout().display()), "-o"])
        .arg(f.out())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(stderr.contains("escapes the image root"), "{stderr}");
    assert!(f.outputs().is_empty(), "{:?}", f.outputs());

    let out = bin()
        .args(["convert", "oci:/nonexistent/dir", "-o"])
        .arg(f.out())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not an OCI image layout"));

    let out = bin()
        .args(["convert", "nonsense", "-o"])
        .arg(f.out())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown source"));
}

/// An image big enough that xz needs a few seconds: time to interrupt it.
fn slow_fixture() -> Fixture {
    let mut data = vec![0u8; 48 << 20];
    let mut x: u64 = 7;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    let tar = L::new()
        .entry(
            b"big",
            hakim_convert::tarout::OutKind::File,
            0o644,
            None,
            &data,
            &[],
        )
        .finish();
    Fixture::new(&[SampleLayer::new(tar, BlobCompression::Plain)])
}

/// Starts a conversion, waits for its temporary file, sends `signals` (a short
/// pause between them) and returns its exit code and stderr.
fn convert_and_signal(f: &Fixture, signals: &[&str]) -> (Option<i32>, String) {
    let child = bin()
        .args([
            "convert",
            &format!("oci:{}:1", f.layout().display()),
            "--threads",
            "1",
            "-o",
        ])
        .arg(f.out())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !std::fs::read_dir(f.out())
        .map(|rd| {
            rd.flatten()
                .any(|e| e.file_name().to_string_lossy().ends_with(".partial"))
        })
        .unwrap_or(false)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no partial file appeared"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    for sig in signals {
        // Plain kill(2) on our own child, by PID.
        let st = Command::new("kill")
            .args([&format!("-{sig}"), &child.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn interrupt_removes_the_partial_file() {
    let f = slow_fixture();
    let (code, stderr) = convert_and_signal(&f, &["INT"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert!(f.outputs().is_empty(), "left behind: {:?}", f.outputs());
}

#[test]
fn hangup_and_a_second_signal_leave_nothing_behind() {
    // SIGHUP (a closed terminal) stops like Ctrl-C.
    let f = slow_fixture();
    let (code, stderr) = convert_and_signal(&f, &["HUP"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(f.outputs().is_empty(), "left behind: {:?}", f.outputs());
    // `timeout` and service managers send SIGTERM, then often again: the
    // second one must not skip the cleanup.
    let (code, stderr) = convert_and_signal(&f, &["TERM", "TERM"]);
    assert!(matches!(code, Some(1) | Some(130)), "{code:?} {stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert!(f.outputs().is_empty(), "left behind: {:?}", f.outputs());
}

#[test]
fn no_output_dir_writes_into_the_current_directory() {
    // The design card's own command line: `hakim-convert SOURCE`.
    let f = Fixture::new(&two_layers());
    let cwd = tempfile::tempdir().unwrap();
    let out = bin()
        .current_dir(cwd.path())
        .args([
            &format!("oci:{}:1", f.layout().display()),
            "--compression",
            "zstd",
            "-q",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut names: Vec<String> = std::fs::read_dir(cwd.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["hakim-fixture-trixie-amd64.tar.zst", "sha256sums.txt"]
    );
    let st = Command::new("sha256sum")
        .args(["-c", "--quiet", "sha256sums.txt"])
        .current_dir(cwd.path())
        .status()
        .unwrap();
    assert!(st.success());
    // The summary names the artifact where the user will look for it.
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with("./hakim-fixture-trixie-amd64.tar.zst")
            || stdout.starts_with("hakim-fixture-trixie-amd64.tar.zst"),
        "{stdout}"
    );
}

#[test]
fn platform_selection_among_manifests_listed_in_index_json() {
    // buildah `manifest push oci:` style: per-platform manifests straight in index.json.
    let (f, amd, mut arm64) = amd64_and_arm64();
    arm64["annotations"] = amd["annotations"].clone();
    let top = serde_json::json!({"schemaVersion": 2, "manifests": [amd, arm64]});
    std::fs::write(
        f.layout().join("index.json"),
        serde_json::to_vec(&top).unwrap(),
    )
    .unwrap();
    let mut o = f.options(hakim_convert::compress::OutputCompression::None);
    o.platform = Some("linux/arm64".parse().unwrap());
    let s = hakim_convert::convert::convert(&o).unwrap();
    assert_eq!(non_dirs(&listing(&s.artifact)), ["./arch f 644 0:0 =arm64"]);
    o.platform = None;
    o.source = format!("oci:{}", f.layout().display());
    let s = hakim_convert::convert::convert(&o).unwrap();
    assert_eq!(non_dirs(&listing(&s.artifact)), ["./arch f 644 0:0 =amd64"]);
}

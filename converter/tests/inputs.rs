//! Sources and bad inputs: every transport, platform selection, digest checks,
//! and the rule that a failed run leaves no artifact behind.

mod common;

use std::io::Read;
use std::path::Path;
use std::process::Command;

use common::{flatten_err, listing, non_dirs, Fixture};
use hakim_convert::compress::OutputCompression;
use hakim_convert::convert::{convert, ConvertOptions, OutputFormat};
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

/// The PAX records of the member `name` of a tar file.
fn pax_records_of(tar_path: &Path, name: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut ar = tar::Archive::new(std::fs::File::open(tar_path).unwrap());
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        if e.path_bytes().as_ref() == name {
            let Some(records) = e.pax_extensions().unwrap() else {
                return Vec::new();
            };
            return records
                .map(|r| {
                    let r = r.unwrap();
                    (r.key_bytes().to_vec(), r.value_bytes().to_vec())
                })
                .collect();
        }
    }
    panic!("no member {}", String::from_utf8_lossy(name));
}

/// Checks a restored sparse file: its size, its chunks, zeros around them,
/// and that the holes stayed holes (few blocks allocated).
fn assert_sparse_file(path: &Path, real_size: u64, chunks: &[(u64, Vec<u8>)]) {
    use std::io::{Seek, SeekFrom};
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).unwrap();
    assert_eq!(meta.len(), real_size, "{}", path.display());
    assert!(
        meta.blocks() * 512 < 8 << 20,
        "{}: {} bytes allocated: the holes were written",
        path.display(),
        meta.blocks() * 512
    );
    let mut f = std::fs::File::open(path).unwrap();
    let mut read_at = |at: u64, len: usize| {
        let mut buf = vec![0u8; len];
        f.seek(SeekFrom::Start(at)).unwrap();
        f.read_exact(&mut buf).unwrap();
        buf
    };
    for (offset, data) in chunks {
        assert_eq!(&read_at(*offset, data.len()), data, "chunk at {offset}");
        assert!(read_at(offset + data.len() as u64, 512)
            .iter()
            .all(|&b| b == 0));
    }
    assert!(read_at(real_size - 512, 512).iter().all(|&b| b == 0));
}

/// Sparse files stay sparse (issue 13). A GNU tar `--sparse` layer (old GNU
/// members: 30 chunks, so extension blocks; a trailing hole; 9 GiB, more than
/// an octal field holds) is written as an old GNU sparse member again, a few
/// hundred KB: GNU tar with Proxmox's exact flags restores the file with its
/// size, bytes and holes, and so does the `tar` crate (Proxmox's OCI import)
/// from the OCI archive's layer. The converter reads its own output back to
/// the same bytes. PAX sparse is still refused.
#[test]
fn gnu_sparse_files_stay_sparse_and_pax_sparse_is_refused() {
    use std::io::{Seek, SeekFrom, Write};
    const REAL: u64 = (9 << 30) + 12_345;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let chunks: Vec<(u64, Vec<u8>)> = (0..30u64)
        .map(|i| {
            let text = format!("chunk {i} ");
            (i * (300 << 20), text.repeat(4096 / text.len()).into_bytes())
        })
        .collect();
    {
        let mut f = std::fs::File::create(src.join("sparse")).unwrap();
        for (offset, data) in &chunks {
            f.seek(SeekFrom::Start(*offset)).unwrap();
            f.write_all(data).unwrap();
        }
        f.set_len(REAL).unwrap();
    }
    let make = |format: &str| {
        let out = dir.path().join(format!("{format}.tar"));
        let st = Command::new("tar")
            .args(["--sparse", &format!("--format={format}"), "-cf"])
            .arg(&out)
            .arg("-C")
            .arg(&src)
            .arg("sparse")
            .status()
            .expect("GNU tar is needed for this test");
        assert!(st.success());
        std::fs::read(out).unwrap()
    };
    let gnu = make("gnu");
    let f = Fixture::new(&[
        gz(L::new().file("etc/os-release", "ID=debian\n")),
        SampleLayer::new(gnu, BlobCompression::Gzip),
    ]);
    let s = f.convert().unwrap();
    assert!(s.size < 1 << 20, "{} bytes", s.size);
    assert_eq!(s.entries.sparse_files, 1);
    let mut ar = tar::Archive::new(std::fs::File::open(&s.artifact).unwrap());
    let member = ar
        .entries()
        .unwrap()
        .map(|e| e.unwrap())
        .find(|e| e.path_bytes().as_ref() == b"./sparse")
        .unwrap();
    assert_eq!(member.header().entry_type(), tar::EntryType::GNUSparse);
    assert_eq!(member.size(), REAL);

    let restored = dir.path().join("restored");
    common::pve_extract(&s.artifact, &restored);
    assert_sparse_file(&restored.join("sparse"), REAL, &chunks);

    let bytes = std::fs::read(&s.artifact).unwrap();
    let again = hakim_convert::sample::flatten_in_memory(
        &hakim_convert::sample::in_memory_image(&[SampleLayer::new(
            bytes.clone(),
            BlobCompression::Plain,
        )]),
        None,
    )
    .unwrap()
    .0;
    assert!(again == bytes, "the artifact does not read back as itself");

    let oci = convert(&ConvertOptions {
        format: OutputFormat::OciArchive,
        compression: OutputCompression::Gzip,
        ..f.options(OutputCompression::Gzip)
    })
    .unwrap();
    let layer = &oci.oci.as_ref().unwrap().layers[0];
    let mut outer = tar::Archive::new(std::fs::File::open(&oci.artifact).unwrap());
    let mut blob = Vec::new();
    for e in outer.entries().unwrap() {
        let mut e = e.unwrap();
        if e.path_bytes().as_ref() == format!("blobs/sha256/{}", layer.digest.hex()).as_bytes() {
            e.read_to_end(&mut blob).unwrap();
        }
    }
    let unpacked = dir.path().join("oci-unpacked");
    tar::Archive::new(flate2::read::GzDecoder::new(&blob[..]))
        .unpack(&unpacked)
        .unwrap();
    assert_sparse_file(&unpacked.join("sparse"), REAL, &chunks);

    let err = flatten_err(&[SampleLayer::new(make("pax"), BlobCompression::Gzip)]);
    assert!(err.contains("PAX sparse"), "{err}");
}

/// Where a member's data ends is where the tar reader says: after a sparse
/// member's extension blocks, after the length a PAX `size` record gives
/// (the header's field may say 0). Before, the raw bytes searched for the
/// next member's PAX header started inside the data, so file content could
/// rename the next member or hide its xattrs.
#[test]
fn member_data_cannot_pose_as_the_next_members_extension_header() {
    // Six chunks (one extension block), the last block of data all '1's (an
    // absurd size when read as a header), then a member with an xattr.
    let ones = vec![b'1'; 512];
    let chunks: Vec<(u64, &[u8])> = (0..6).map(|i| (i * 8192, &ones[..])).collect();
    let tar = [
        common::gnu_sparse_member("s", 6 * 8192, &chunks),
        L::new()
            .entry(
                b"after",
                OutKind::File,
                0o644,
                None,
                b"x",
                &[(b"user.k"[..].into(), b"v"[..].into())],
            )
            .finish(),
    ]
    .concat();
    let f = Fixture::new(&[SampleLayer::new(tar, BlobCompression::Gzip)]);
    let s = f.convert().unwrap();
    let records = pax_records_of(&s.artifact, b"./after");
    assert!(
        records.contains(&(b"SCHILY.xattr.user.k".to_vec(), b"v".to_vec())),
        "{records:?}"
    );

    // A PAX size record with 0 in the header: the data holds what looks like
    // a PAX header renaming the next member.
    let mut fake = tar::Builder::new(Vec::new());
    fake.append_pax_extensions([("path", &b"pwned"[..])])
        .unwrap();
    // `into_inner` ends the archive: keep the headers only.
    let without_footer = |b: tar::Builder<Vec<u8>>| {
        let mut v = b.into_inner().unwrap();
        v.truncate(v.len() - 1024);
        v
    };
    let fake = without_footer(fake);
    let mut pax = tar::Builder::new(Vec::new());
    pax.append_pax_extensions([("size", fake.len().to_string().as_bytes())])
        .unwrap();
    let mut tar = without_footer(pax);
    let mut h = tar::Header::new_ustar();
    h.set_path("a").unwrap();
    h.set_size(0);
    h.set_mode(0o644);
    h.set_cksum();
    tar.extend_from_slice(h.as_bytes());
    tar.extend_from_slice(&fake);
    tar.extend_from_slice(&L::new().file("b", "b").finish());
    let listing = common::flatten(&[SampleLayer::new(tar, BlobCompression::Plain)]);
    let names: Vec<&str> = listing
        .iter()
        .map(|l| l.split(' ').next().unwrap())
        .collect();
    assert_eq!(names, ["./", "./a", "./b"]);
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

/// The command line names the file at fault (issue 13): `-o` naming a file,
/// `verify` on a directory or on a truncated OCI archive.
#[test]
fn cli_messages_name_the_file_at_fault() {
    let f = Fixture::new(&two_layers());
    let a_file = f.dir.path().join("a-file");
    std::fs::write(&a_file, "").unwrap();
    let out = bin()
        .args(["convert", &format!("oci:{}:1", f.layout().display()), "-o"])
        .arg(&a_file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!("{} is not a directory", a_file.display())),
        "{stderr}"
    );

    let out = bin().arg("verify").arg(f.dir.path()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&f.dir.path().display().to_string()) && stderr.contains("directory"),
        "{stderr}"
    );

    let oci = convert(&ConvertOptions {
        format: OutputFormat::OciArchive,
        compression: OutputCompression::Gzip,
        ..f.options(OutputCompression::Gzip)
    })
    .unwrap();
    let bytes = std::fs::read(&oci.artifact).unwrap();
    let truncated = f.dir.path().join("truncated.tar");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2 + 100]).unwrap();
    let out = bin().arg("verify").arg(&truncated).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    let shown = truncated.display().to_string();
    assert!(stderr.contains(&shown), "{stderr}");
    assert!(
        stdout.contains(&format!("{shown} (oci-archive)"))
            && stdout.contains("FAIL  the archive reads to its end"),
        "{stdout}"
    );
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

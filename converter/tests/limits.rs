//! Limits and hostile inputs: each is refused with a clear error and leaves no
//! file behind, or — for sizes a real image may reach — converts with bounded
//! memory (peak RSS of the `hakim-convert` binary, measured with
//! `/usr/bin/time`). The million-entry measurement is `#[ignore]`d: it takes a
//! minute; `ci/bench-limits.sh` runs it in release mode.

mod common;

use std::io::{self, Read};
use std::process::Command;

use common::{flatten_err, non_dirs, Fixture};
use hakim_convert::digest::Digest;
use hakim_convert::output::HashWrite;
use hakim_convert::sample::{BlobCompression, LayerBuilder as L, SampleLayer};
use hakim_convert::tarout::{OutEntry, OutKind, TarWriter};

fn plain(l: L) -> SampleLayer {
    SampleLayer::new(l.finish(), BlobCompression::Plain)
}

type GzTar = TarWriter<HashWrite<flate2::write::GzEncoder<Vec<u8>>>>;

/// A layer written straight into gzip, never whole in memory, followed by
/// `trailing_zeros` bytes after its end-of-archive marker: its blob and diff_id.
fn streamed_gzip_layer(trailing_zeros: u64, write: impl FnOnce(&mut GzTar)) -> (Vec<u8>, Digest) {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut tar = TarWriter::new(HashWrite::new(gz));
    write(&mut tar);
    let mut hashed = tar.finish().unwrap();
    io::copy(&mut io::repeat(0).take(trailing_zeros), &mut hashed).unwrap();
    let (hex, _, gz) = hashed.finish();
    (
        gz.finish().unwrap(),
        format!("sha256:{hex}").parse().unwrap(),
    )
}

/// A layout holding one layer given as blob and diff_id.
fn fixture_with_blob(blob: Vec<u8>, diff_id: &Digest) -> Fixture {
    let f = Fixture::new(&[SampleLayer {
        tar: Vec::new(),
        blob,
        media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
    }]);
    let diff_id = diff_id.to_string();
    common::rewrite_image(
        &f.layout(),
        |c| c["rootfs"]["diff_ids"][0] = diff_id.into(),
        |_| {},
    );
    f
}

fn entry(name: &[u8], kind: OutKind, size: u64) -> OutEntry<'_> {
    OutEntry {
        name,
        kind,
        mode: if kind == OutKind::Dir { 0o755 } else { 0o644 },
        uid: 0,
        gid: 0,
        mtime: 1_700_000_000,
        size,
        link: None,
        xattrs: &[],
    }
}

/// Runs the converter binary under `/usr/bin/time`: exit status, stderr and peak
/// RSS in MiB.
fn convert_measured(f: &Fixture, extra: &[&str]) -> (bool, String, f64) {
    let out = Command::new("/usr/bin/time")
        .args(["-f", "peak-rss-kb=%M"])
        .arg(env!("CARGO_BIN_EXE_hakim-convert"))
        .arg("convert")
        .arg(format!("oci:{}:1", f.layout().display()))
        .arg("-o")
        .arg(f.out())
        .args(["--name", "fixture", "-q"])
        .args(extra)
        .output()
        .expect("/usr/bin/time (package time) runs the converter");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let kb: f64 = stderr
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("peak-rss-kb="))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no peak RSS in:\n{stderr}"));
    (out.status.success(), stderr, kb / 1024.0)
}

#[test]
fn pax_or_gnu_extension_headers_over_1_mib_are_refused() {
    let mut pax = tar::Builder::new(Vec::new());
    let huge = vec![b'x'; (1 << 20) + 100];
    pax.append_pax_extensions([("comment", &huge[..])]).unwrap();
    let mut h = tar::Header::new_ustar();
    h.set_path("f").unwrap();
    h.set_size(0);
    h.set_cksum();
    pax.append(&h, &[][..]).unwrap();

    let mut gnu = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(0);
    h.set_mode(0o644);
    let long = "d/".repeat(600_000) + "f";
    gnu.append_data(&mut h, &long, &[][..]).unwrap();

    for (what, tar) in [("PAX", pax), ("GNU long name", gnu)] {
        let layer = SampleLayer::new(tar.into_inner().unwrap(), BlobCompression::Gzip);
        let err = flatten_err(&[plain(L::new().file("ok", "ok")), layer]);
        assert!(err.contains("layer 2"), "{what}: {err}");
        assert!(
            err.contains("extension headers larger than 1048576 bytes"),
            "{what}: {err}"
        );
    }
}

#[test]
fn paths_no_file_system_can_hold_are_refused() {
    // A member name of 4200 bytes (a PAX path record).
    let long = "d/".repeat(2100);
    let err = flatten_err(&[plain(L::new().file(&long, "x"))]);
    assert!(err.contains("path longer than 4095 bytes"), "{err}");
    assert!(
        err.contains("layer 1") && err.contains("member #0"),
        "{err}"
    );

    // One component over NAME_MAX, in a name or a hardlink target.
    let name = format!("dir/{}", "n".repeat(256));
    let err = flatten_err(&[plain(L::new().file(&name, "x"))]);
    assert!(err.contains("component longer than 255 bytes"), "{err}");
    let err = flatten_err(&[plain(L::new().file("a", "x").hardlink("b", &name))]);
    assert!(err.contains("hardlink target"), "{err}");

    // A symlink target symlink(2) would refuse.
    let err = flatten_err(&[plain(L::new().symlink("l", &"t/".repeat(2100)))]);
    assert!(
        err.contains("symlink target longer than 4095 bytes"),
        "{err}"
    );

    // Short names, but the symlinked parent makes the real path too long.
    let target = vec!["p".repeat(200); 20].join("/");
    let err = flatten_err(&[plain(
        L::new()
            .symlink("l", &target)
            .file(&format!("l/{}", "f".repeat(200)), "x"),
    )]);
    assert!(err.contains("longer than PATH_MAX"), "{err}");
    // …or a component too long (taken from the symlink target).
    let err = flatten_err(&[plain(
        L::new().symlink("l", &"q".repeat(300)).file("l/f", "x"),
    )]);
    assert!(err.contains("longer than NAME_MAX"), "{err}");
}

#[test]
fn ten_thousand_layers_convert() {
    // Each layer adds a file and whites out the previous layer's: only the last
    // survives. A manifest of 10,000 layers is about 1.5 MB, under the 4 MiB cap.
    let layers: Vec<SampleLayer> = (0..10_000)
        .map(|i| {
            let mut l = L::new().file(&format!("f{i}"), &i.to_string());
            if i > 0 {
                l = l.whiteout(&format!("f{}", i - 1));
            }
            plain(l)
        })
        .collect();
    let f = Fixture::new(&layers);
    let summary = f.convert().unwrap();
    assert_eq!(summary.source.layers.len(), 10_000);
    let out = common::listing(&summary.artifact);
    assert_eq!(non_dirs(&out), ["./f9999 f 644 0:0 =9999"]);
}

#[test]
fn a_blob_that_never_ends_is_cut_at_its_descriptor_size() {
    let f = Fixture::new(&[plain(L::new().file("a", "a"))]);
    let m = common::manifest_of(&f.layout());
    let hex = |d: &serde_json::Value| {
        d["digest"]
            .as_str()
            .unwrap()
            .strip_prefix("sha256:")
            .unwrap()
            .to_string()
    };
    let blobs = f.layout().join("blobs/sha256");
    let layer = blobs.join(hex(&m["layers"][0]));
    std::fs::remove_file(&layer).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &layer).unwrap();
    let err = f.convert().unwrap_err();
    assert!(err.contains("layer 1"), "{err}");
    assert!(
        err.contains("blob is longer than the 2048 bytes its descriptor declares"),
        "{err}"
    );
    assert!(f.outputs().is_empty());

    // The same for the manifest: read up to its 4 MiB cap, not forever.
    let g = Fixture::new(&[plain(L::new().file("a", "a"))]);
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(g.layout().join("index.json")).unwrap()).unwrap();
    let manifest = g
        .layout()
        .join("blobs/sha256")
        .join(hex(&index["manifests"][0]));
    std::fs::remove_file(&manifest).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &manifest).unwrap();
    let err = g.convert().unwrap_err();
    assert!(err.contains("is larger than 4194304 bytes"), "{err}");
    assert!(g.outputs().is_empty());
}

/// Gzip bombs are streamed, not limited by ratio: a layer may hold big runs of
/// zeros (disk images, preallocated databases) that compress 1000:1. What a
/// bomb costs is time, never memory: 64 MiB of zeros in a file plus 448 MiB of
/// zeros after the end of the archive (hashed for the diff_id only), from a
/// 0.5 MB blob, convert with the same peak RSS as a tiny image (uncompressed
/// output, so that the compressor's own buffers do not blur the comparison).
#[test]
fn gzip_bomb_streams_with_bounded_memory() {
    let (blob, diff_id) = streamed_gzip_layer(448 << 20, |tar| {
        tar.append(&entry(b"zeros", OutKind::File, 64 << 20))
            .unwrap();
        tar.append_data(&mut io::repeat(0).take(64 << 20), 64 << 20, &mut |_| Ok(()))
            .unwrap();
    });
    assert!(blob.len() < 1 << 20, "the bomb is {} bytes", blob.len());
    let f = fixture_with_blob(blob, &diff_id);
    let (ok, stderr, rss) = convert_measured(&f, &["--compression", "none"]);
    assert!(ok, "{stderr}");
    let tiny = Fixture::new(&[plain(L::new().file("a", "a"))]);
    let (ok, stderr, tiny_rss) = convert_measured(&tiny, &["--compression", "none"]);
    assert!(ok, "{stderr}");
    eprintln!("gzip bomb: peak RSS {rss:.1} MiB (a one-file image: {tiny_rss:.1} MiB)");
    assert!(
        rss < tiny_rss + 16.0,
        "the bomb took {rss:.1} MiB, a tiny image {tiny_rss:.1} MiB"
    );
}

/// Runs `hakim-convert convert` on `f` and stops it once it has written more
/// than 64 MiB or run 60 s (what the sparse bomb did before sparse files were
/// kept sparse): exit status, stderr, seconds, and the most bytes seen in the
/// output directory.
fn convert_bounded(f: &Fixture, extra: &[&str]) -> (bool, String, f64, u64) {
    const MAX_BYTES: u64 = 64 << 20;
    let started = std::time::Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_hakim-convert"))
        .arg("convert")
        .arg(format!("oci:{}:1", f.layout().display()))
        .arg("-o")
        .arg(f.out())
        .args(["--name", "fixture", "-q"])
        .args(extra)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut most = 0;
    let status = loop {
        most = most.max(common::dir_bytes(&f.out()));
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        let secs = started.elapsed().as_secs_f64();
        if most > MAX_BYTES || secs > 60.0 {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!(
                "stopped after {secs:.1} s: {most} bytes written for a layer of a few hundred bytes"
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let secs = started.elapsed().as_secs_f64();
    (status.success(), stderr, secs, most)
}

/// The sparse bomb of issue 13: a layer of a few hundred bytes holding one old
/// GNU sparse member that claims 1 TiB. It made `convert` write every zero
/// (54 GB in 120 s with `--compression none`, hours of CPU with xz). Now the
/// claim is refused at once by the default `--max-sparse-size`, with the layer
/// and the member named; with the limit raised the file is written sparse, so
/// the output is as small as the layer, whatever the compression.
#[test]
fn a_sparse_bomb_costs_what_its_layer_holds() {
    const TIB: u64 = 1 << 40;
    let tar = [
        common::gnu_sparse_member("var/lib/bomb", TIB, &[(TIB - 512, &[b'X'; 512])]),
        vec![0; 1024],
    ]
    .concat();
    let layer = SampleLayer::new(tar, BlobCompression::Gzip);
    assert!(layer.blob.len() < 200, "{} bytes", layer.blob.len());
    let digest = Digest::of_bytes(&layer.blob).to_string();
    let f = Fixture::new(&[layer]);

    let (ok, stderr, secs, most) = convert_bounded(&f, &["--compression", "none"]);
    assert!(!ok, "{stderr}");
    assert!(
        stderr.contains(&format!("layer 1 ({digest}): member #0 'var/lib/bomb'")),
        "{stderr}"
    );
    assert!(
        stderr.contains("sparse file of 1 TiB (1099511627776 bytes, 512 bytes of data)")
            && stderr.contains("--max-sparse-size"),
        "{stderr}"
    );
    assert!(f.outputs().is_empty(), "{:?}", f.outputs());
    assert!(most < 4096 && secs < 10.0, "{most} bytes, {secs:.1} s");

    for compression in ["none", "zstd", "xz", "gzip"] {
        let (ok, stderr, secs, most) = convert_bounded(
            &f,
            &["--compression", compression, "--max-sparse-size", "1T"],
        );
        assert!(ok, "{compression}: {stderr}");
        eprintln!("{compression}: {most} bytes written in {secs:.2} s");
        assert!(most < 64 << 10, "{compression}: {most} bytes");
        assert!(secs < 20.0, "{compression}: {secs:.1} s");
    }
    let artifact = f.out().join("fixture.tar");
    let mut ar = tar::Archive::new(std::fs::File::open(&artifact).unwrap());
    let sparse: Vec<(String, u64)> = ar
        .entries()
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.header().entry_type() == tar::EntryType::GNUSparse)
        .map(|e| {
            (
                String::from_utf8_lossy(&e.path_bytes()).into_owned(),
                e.size(),
            )
        })
        .collect();
    assert_eq!(sparse, [("./var/lib/bomb".to_string(), TIB)]);
}

/// A tmpfs of `size` mounted on a fresh directory, unmounted on drop; `None`
/// when this process may not mount (not root, no tmpfs).
struct SmallTmpfs {
    dir: tempfile::TempDir,
}

impl SmallTmpfs {
    fn mount(size: &str) -> Option<SmallTmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(SmallTmpfs { dir })
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// A full disk while writing is the output's fault: the error says so and
/// names the output file, not the layer being copied ("second read: layer 2
/// … No space left on device" before), and nothing is left behind.
#[test]
fn a_full_output_disk_is_reported_as_the_output() {
    let Some(tmpfs) = SmallTmpfs::mount("1m") else {
        eprintln!("skipped: cannot mount a tmpfs (needs root)");
        return;
    };
    // 4 MiB that no compressor shrinks, in the second layer.
    let mut noise = vec![0u8; 4 << 20];
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for b in noise.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let noisy = L::new().entry(b"noise", OutKind::File, 0o644, None, &noise, &[]);
    let f = Fixture::new(&[
        plain(L::new().file("etc/os-release", "ID=debian\n")),
        SampleLayer::new(noisy.finish(), BlobCompression::Gzip),
    ]);
    for (i, extra) in [
        &["--compression", "none"][..],
        &["--compression", "zstd"],
        &["--format", "oci-archive"],
    ]
    .into_iter()
    .enumerate()
    {
        let out = tmpfs.dir.path().join(format!("out{i}"));
        let result = Command::new(env!("CARGO_BIN_EXE_hakim-convert"))
            .arg("convert")
            .arg(format!("oci:{}:1", f.layout().display()))
            .arg("-o")
            .arg(&out)
            .args(["--name", "full", "-q"])
            .args(extra)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert!(!result.status.success(), "{extra:?}: {stderr}");
        assert!(
            stderr.contains("cannot write the output file")
                && stderr.contains(&out.join("full.tar").display().to_string())
                && stderr.contains("No space left on device"),
            "{extra:?}: {stderr}"
        );
        assert!(
            !stderr.contains("layer 2") && !stderr.contains("second read"),
            "{extra:?}: {stderr}"
        );
        let left: Vec<_> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "{extra:?}: left behind {left:?}");
    }
}

/// The documented bound (docs/converter.md, "Memory"): a million entries in one
/// layer stay under 600 MB. `ci/bench-limits.sh` runs this in release mode.
#[test]
#[ignore = "about a minute; run by ci/bench-limits.sh"]
fn a_million_entries_in_one_layer_stay_within_the_memory_bound() {
    const DIRS: usize = 1000;
    const FILES: usize = 1000;
    let (blob, diff_id) = streamed_gzip_layer(0, |tar| {
        tar.append(&entry(b"./", OutKind::Dir, 0)).unwrap();
        for d in 0..DIRS {
            let dir = format!("usr/share/d{d:04}/");
            tar.append(&entry(dir.as_bytes(), OutKind::Dir, 0)).unwrap();
            for i in 0..FILES {
                let name = format!("{dir}file-{i:04}.txt");
                tar.append(&entry(name.as_bytes(), OutKind::File, 1))
                    .unwrap();
                tar.append_data(&mut &b"x"[..], 1, &mut |_| Ok(())).unwrap();
            }
        }
    });
    let f = fixture_with_blob(blob, &diff_id);
    let started = std::time::Instant::now();
    let (ok, stderr, rss) = convert_measured(&f, &["--compression", "zstd", "--threads", "1"]);
    assert!(ok, "{stderr}");
    // The root, usr/, usr/share/, each directory and its files.
    let entries = DIRS * (FILES + 1) + 3;
    eprintln!(
        "{entries} entries: peak RSS {rss:.1} MiB ({:.0} bytes per entry), {:.1} s",
        rss * 1048576.0 / entries as f64,
        started.elapsed().as_secs_f64()
    );
    assert!(rss < 600.0, "peak RSS {rss:.1} MiB");
    let artifact = f.out().join("fixture.tar.zst");
    let mut count = 0;
    let mut ar =
        tar::Archive::new(zstd::Decoder::new(std::fs::File::open(artifact).unwrap()).unwrap());
    for e in ar.entries().unwrap() {
        e.unwrap();
        count += 1;
    }
    assert_eq!(count, entries);
}

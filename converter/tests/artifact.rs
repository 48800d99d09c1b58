//! The artifact itself: what Proxmox's GNU tar extraction sees, naming,
//! checksums, reproducibility and mtime clamping.

mod common;

use std::collections::HashSet;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::Command;

use common::Fixture;
use hakim_convert::compress::OutputCompression;
use hakim_convert::convert::{convert, ConvertOptions};
use hakim_convert::sample::{BlobCompression, LayerBuilder as L, SampleLayer};
use hakim_convert::tarout::OutKind;
use hakim_convert::tree::Xattr;

fn gz(l: L) -> SampleLayer {
    SampleLayer::new(l.finish(), BlobCompression::Gzip)
}

const CAP: &[u8] =
    b"\x01\x00\x00\x02\x00\x04\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00";

fn getxattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let out = Command::new("getfattr")
        .args(["--only-values", "-h", "-n", name])
        .arg(path)
        .output()
        .ok()?;
    out.status.success().then_some(out.stdout)
}

#[test]
fn long_and_non_utf8_names_survive_gnu_tar_byte_exact() {
    let long_dir = "d".repeat(120);
    let long_file = format!("{long_dir}/{}", "f".repeat(150));
    let long_target = format!("/{}", "t".repeat(200));
    let layer = L::new()
        .file(&long_file, "long")
        .symlink("longlink", &long_target)
        .entry(
            b"latin1-\xe9t\xe9",
            OutKind::File,
            0o644,
            None,
            b"bytes",
            &[],
        )
        .entry(
            &[b"x".repeat(110).as_slice(), b"/\xff\xfe"].concat(),
            OutKind::File,
            0o644,
            None,
            b"long bytes",
            &[],
        )
        .hardlink(&format!("{long_dir}/hard-{}", "h".repeat(100)), &long_file);
    let f = Fixture::new(&[gz(layer)]);
    let s = f.convert().unwrap();
    let root = f.dir.path().join("root");
    common::pve_extract(&s.artifact, &root);
    assert_eq!(
        std::fs::read_to_string(root.join(&long_file)).unwrap(),
        "long"
    );
    assert_eq!(
        std::fs::read_link(root.join("longlink"))
            .unwrap()
            .as_os_str()
            .as_bytes(),
        long_target.as_bytes()
    );
    let latin = root.join(std::ffi::OsStr::from_bytes(b"latin1-\xe9t\xe9"));
    assert_eq!(std::fs::read(latin).unwrap(), b"bytes");
    let long_bin = root.join(std::ffi::OsStr::from_bytes(
        &[b"x".repeat(110).as_slice(), b"/\xff\xfe"].concat(),
    ));
    assert_eq!(std::fs::read(long_bin).unwrap(), b"long bytes");
    use std::os::unix::fs::MetadataExt;
    let a = std::fs::metadata(root.join(&long_file)).unwrap();
    let b = std::fs::metadata(root.join(format!("{long_dir}/hard-{}", "h".repeat(100)))).unwrap();
    assert_eq!(
        a.ino(),
        b.ino(),
        "hardlink with a long name must share the inode"
    );
}

#[test]
fn only_xattrs_proxmox_keeps_reach_the_artifact() {
    let xattrs: Vec<Xattr> = vec![
        (b"security.capability"[..].into(), CAP.into()),
        (
            b"security.selinux"[..].into(),
            b"system_u:object_r:bin_t:s0\0"[..].into(),
        ),
        (b"user.note"[..].into(), b"\x00binary\xff"[..].into()),
    ];
    let f = Fixture::new(&[gz(L::new().entry(
        b"usr/bin/ping",
        OutKind::File,
        0o755,
        None,
        b"elf",
        &xattrs,
    ))]);
    let s = f.convert().unwrap();
    assert_eq!(s.entries.xattrs_dropped, 1);
    assert!(
        s.warnings.iter().any(|w| w.contains("security.selinux")),
        "{:?}",
        s.warnings
    );
    // In the tar: exactly the two survivors.
    let mut ar = tar::Archive::new(std::fs::File::open(&s.artifact).unwrap());
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        if e.path_bytes().as_ref() != b"./usr/bin/ping" {
            continue;
        }
        let keys: Vec<Vec<u8>> = e
            .pax_extensions()
            .unwrap()
            .unwrap()
            .map(|x| x.unwrap().key_bytes().to_vec())
            .collect();
        assert_eq!(
            keys,
            [
                b"SCHILY.xattr.security.capability".to_vec(),
                b"SCHILY.xattr.user.note".to_vec()
            ]
        );
    }
    // And GNU tar restores them (as root; user.* needs a filesystem that has them).
    let root = f.dir.path().join("root");
    common::pve_extract(&s.artifact, &root);
    if let Some(cap) = getxattr(&root.join("usr/bin/ping"), "security.capability") {
        assert_eq!(cap, CAP);
    } else if std::env::var("HAKIM_E2E").as_deref() == Ok("1") {
        panic!("getfattr missing or security.capability not restored");
    }
}

#[test]
fn structure_rules_proxmox_relies_on() {
    let f = Fixture::new(&[
        gz(L::new()
            .file("z/deep/er/file", "1")
            .file("a", "a")
            .hardlink("z/link", "a")),
        gz(L::new()
            .file("m/new", "n")
            .hardlink("b-link", "z/deep/er/file")
            .dir("z/", 0o700)),
    ]);
    let s = f.convert().unwrap();
    let mut ar = tar::Archive::new(std::fs::File::open(&s.artifact).unwrap());
    let mut seen: HashSet<Vec<u8>> = HashSet::new();
    let mut first = true;
    for e in ar.entries().unwrap() {
        let e = e.unwrap();
        let name = e.path_bytes().into_owned();
        if first {
            assert_eq!(name, b"./", "first member must be ./");
            first = false;
        }
        assert!(
            name.starts_with(b"./"),
            "{}",
            String::from_utf8_lossy(&name)
        );
        let key = name.strip_suffix(b"/").unwrap_or(&name).to_vec();
        // Parent directory already written.
        if let Some(pos) = key.iter().rposition(|&b| b == b'/') {
            let parent = key[..pos].to_vec();
            assert!(
                parent == b"." || seen.contains(&parent),
                "parent of {} missing",
                String::from_utf8_lossy(&name)
            );
        }
        if e.header().entry_type() == tar::EntryType::Link {
            let target = e.link_name_bytes().unwrap().into_owned();
            assert!(seen.contains(&target), "hardlink before its target");
        }
        assert!(
            seen.insert(key),
            "duplicate {}",
            String::from_utf8_lossy(&name)
        );
    }
}

#[test]
fn naming_from_image_and_os_release() {
    let f = Fixture::new(&[gz(L::new()
        .file(
            "usr/lib/os-release",
            "ID=debian\nVERSION_CODENAME=\"trixie\"\n",
        )
        .symlink("etc/os-release", "../usr/lib/os-release"))]);
    let mut o = f.options(OutputCompression::Zstd);
    o.name = None;
    let s = convert(&o).unwrap();
    assert_eq!(s.file_name, "hakim-fixture-trixie-amd64.tar.zst");
    o.variant = Some("js".into());
    let s = convert(&o).unwrap();
    assert_eq!(s.file_name, "hakim-js-trixie-amd64.tar.zst");
    o.name = Some("custom".into());
    o.compression = OutputCompression::Gzip;
    let s = convert(&o).unwrap();
    assert_eq!(s.file_name, "custom.tar.gz");
    o.name = Some("../evil".into());
    assert!(convert(&o).is_err());

    // All three share one sha256sums.txt that sha256sum -c accepts.
    let sums = std::fs::read_to_string(f.out().join("sha256sums.txt")).unwrap();
    assert_eq!(sums.lines().count(), 3, "{sums}");
    let st = Command::new("sha256sum")
        .args(["-c", "--strict", "sha256sums.txt"])
        .current_dir(f.out())
        .status()
        .unwrap();
    assert!(st.success());

    // No os-release: release 'unknown' and a warning.
    let f = Fixture::new(&[gz(L::new().file("a", "a"))]);
    let mut o = f.options(OutputCompression::None);
    o.name = None;
    let s = convert(&o).unwrap();
    assert_eq!(s.file_name, "hakim-fixture-unknown-amd64.tar");
    assert!(s.warnings.iter().any(|w| w.contains("os-release")));
}

#[test]
fn reproducible_across_thread_counts_and_mtimes_clamped() {
    // Several MiB of mixed content so xz and zstd run multi-block.
    let mut l = L::new().file("etc/os-release", "ID=debian\nVERSION_CODENAME=trixie\n");
    for i in 0..40 {
        let body: String = (0..20_000).map(|j| format!("{i}:{j} ")).collect();
        l = l.file(&format!("data/f{i}"), &body);
    }
    let f = Fixture::new(&[gz(l), gz(L::new().file("late", "x"))]);
    for compression in [OutputCompression::Xz, OutputCompression::Zstd] {
        let mut hashes = Vec::new();
        for threads in [1, 2, 3] {
            let mut o = f.options(compression);
            o.threads = Some(threads);
            o.source_date_epoch = Some(1_600_000_000);
            hashes.push(convert(&o).unwrap().sha256);
        }
        assert!(
            hashes.windows(2).all(|w| w[0] == w[1]),
            "{compression:?}: {hashes:?}"
        );
    }
    let mut o = f.options(OutputCompression::None);
    o.source_date_epoch = Some(1_600_000_000);
    let s = convert(&o).unwrap();
    let mut ar = tar::Archive::new(std::fs::File::open(&s.artifact).unwrap());
    for e in ar.entries().unwrap() {
        // LayerBuilder stamps 1_700_000_000; the implicit root gets the epoch.
        assert!(e.unwrap().header().mtime().unwrap() <= 1_600_000_000);
    }
}

#[test]
fn concurrent_runs_to_one_name_leave_sums_that_match_the_files() {
    // Three runs write the same artifact name with different bytes (another
    // SOURCE_DATE_EPOCH each) into one directory, again and again: whatever
    // order their renames and sums updates take, `sha256sum -c` must pass and
    // every artifact must be listed.
    let f = Fixture::new(&[gz(L::new()
        .file("etc/os-release", "ID=debian\nVERSION_CODENAME=trixie\n")
        .file("data", &"x".repeat(200_000)))]);
    for _ in 0..10 {
        std::thread::scope(|s| {
            for epoch in [1_500_000_000u64, 1_600_000_000, 1_650_000_000] {
                let o = ConvertOptions {
                    source_date_epoch: Some(epoch),
                    ..f.options(OutputCompression::Zstd)
                };
                s.spawn(move || convert(&o).unwrap());
            }
        });
        let st = Command::new("sha256sum")
            .args(["-c", "--strict", "--quiet", "sha256sums.txt"])
            .current_dir(f.out())
            .status()
            .unwrap();
        assert!(st.success(), "sha256sums.txt disagrees with the files");
        assert_eq!(f.outputs(), ["fixture.tar.zst", "sha256sums.txt"]);
    }
}

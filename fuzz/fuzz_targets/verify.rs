//! `hakim-convert verify` on what it may be handed: arbitrary bytes as an
//! artifact (a rootfs tar, compressed or not, or an OCI archive) must give a
//! report or an error, never a panic or a hang; and a rootfs the flattener
//! wrote from a fuzzed layer stack (`fuzz/src/image.rs` input format) must
//! pass every rule but those [`hakim_fuzz::VERIFY_MAY_FAIL`] lists.
//!
//! Flag bit 3 set: the bytes after the flag byte are the artifact; clear: they
//! are a layer stack, flattened first (flag bit 4 compresses it with zstd).
#![no_main]

use std::io::Write;

use hakim_convert::verify::verify;
use hakim_fuzz::image::{flatten, resolved, FuzzImage};
use libfuzzer_sys::fuzz_target;

fn scratch() -> tempfile::TempDir {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::tempdir_in(shm) {
            return d;
        }
    }
    tempfile::tempdir().expect("a temporary directory")
}

fuzz_target!(|data: &[u8]| {
    let (flags, rest) = hakim_fuzz::flags(data);
    let dir = scratch();
    let path = dir.path().join("artifact.tar");
    if flags & 8 != 0 {
        std::fs::write(&path, rest).unwrap();
        if let Ok(report) = verify(&path) {
            assert!(!report.checks.is_empty());
        }
        return;
    }
    let input = FuzzImage::parse(data);
    let Ok((tar, _)) = flatten(&resolved(&input.layers), input.clamp) else {
        return;
    };
    let bytes = if flags & 16 != 0 {
        zstd::encode_all(&tar[..], 1).unwrap()
    } else {
        tar
    };
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(&bytes).unwrap();
    drop(f);
    let hash = hakim_convert::digest::Digest::of_bytes(&bytes);
    std::fs::write(
        dir.path().join("sha256sums.txt"),
        format!("{}  artifact.tar\n", hash.hex()),
    )
    .unwrap();
    let report = verify(&path).expect("verify reads a flattened rootfs");
    assert_eq!(report.kind, "rootfs");
    hakim_fuzz::assert_verified(&report);
});

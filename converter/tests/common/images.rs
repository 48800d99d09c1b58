//! Fixed images for the byte-identity (golden) and pass-2 tests: built from a
//! seeded generator, so they are the same on every run and machine, and large
//! enough (several MiB per layer) that skipping and parallel reading matter.

use hakim_convert::sample::{BlobCompression, LayerBuilder, SampleLayer};
use hakim_convert::tarout::OutKind;

/// Deterministic bytes: xorshift64, `len` bytes; `text` makes them compressible
/// (lower-case letters and newlines), else they are close to incompressible.
pub fn bytes(seed: u64, len: usize, text: bool) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        for b in x.to_le_bytes() {
            if out.len() == len {
                break;
            }
            out.push(if text {
                if b % 23 == 0 {
                    b'\n'
                } else {
                    b'a' + b % 26
                }
            } else {
                b
            });
        }
    }
    out
}

fn file(b: LayerBuilder, name: &str, data: &[u8]) -> LayerBuilder {
    b.entry(name.as_bytes(), OutKind::File, 0o644, None, data, &[])
}

/// Names of the files layer 3 writes after its only winner; layer 4 replaces
/// them all (the "tail after the last winner").
pub const TAIL_FILES: usize = 12;

/// Five layers with much shadowing, each kind of layer the pass-2 skip must
/// handle:
/// 1. gzip base: small text files, big files, a hardlink;
/// 2. zstd: replaces a big file of layer 1, whites out some small files;
/// 3. gzip, **no winning member**: every file it writes is replaced by layer 4;
/// 4. gzip: one winner first, then a long tail that layer 5 replaces entirely;
/// 5. plain: replaces layer 3's and layer 4's tail files, opaque `opt/`.
pub fn shadowed() -> Vec<SampleLayer> {
    let mut base = LayerBuilder::new()
        .dir("./", 0o755)
        .dir("etc/", 0o755)
        .dir("big/", 0o755)
        .dir("opt/", 0o755)
        .file(
            "etc/os-release",
            "ID=debian\nVERSION_CODENAME=trixie\nVERSION_ID=13\n",
        );
    for i in 0..200 {
        base = file(
            base,
            &format!("etc/f{i:03}"),
            &bytes(i, 700 + i as usize * 13, true),
        );
    }
    base = file(base, "big/first.bin", &bytes(1000, 3 << 20, false));
    base = file(base, "big/keep.bin", &bytes(1001, 2 << 20, true));
    base = base.hardlink("big/keep-link", "big/keep.bin");
    base = file(base, "opt/old", b"replaced by an opaque directory\n");

    let mut second = LayerBuilder::new().dir("mid/", 0o755);
    second = file(second, "big/first.bin", &bytes(2000, 1 << 20, false));
    second = file(second, "mid/x.bin", &bytes(2001, 4 << 20, true));
    for i in 0..20 {
        second = second.whiteout(&format!("etc/f{i:03}"));
    }

    let mut third = LayerBuilder::new().dir("lost/", 0o755);
    for i in 0..6 {
        third = file(
            third,
            &format!("lost/g{i}.bin"),
            &bytes(3000 + i, 1 << 20, false),
        );
    }

    let mut fourth = LayerBuilder::new().dir("tail/", 0o755);
    fourth = file(fourth, "tail/winner.bin", &bytes(4000, 1 << 20, false));
    for i in 0..TAIL_FILES {
        fourth = file(
            fourth,
            &format!("tail/t{i:02}.bin"),
            &bytes(4100 + i as u64, 512 << 10, i % 2 == 0),
        );
    }

    let mut fifth = LayerBuilder::new().opaque("opt").dir("opt/", 0o700);
    fifth = file(fifth, "opt/new", b"the only file of opt/\n");
    for i in 0..6 {
        fifth = file(
            fifth,
            &format!("lost/g{i}.bin"),
            format!("{i}\n").as_bytes(),
        );
    }
    for i in 0..TAIL_FILES {
        fifth = file(
            fifth,
            &format!("tail/t{i:02}.bin"),
            format!("{i}\n").as_bytes(),
        );
    }

    vec![
        SampleLayer::new(base.finish(), BlobCompression::Gzip),
        SampleLayer::new(second.finish(), BlobCompression::Zstd),
        SampleLayer::new(third.finish(), BlobCompression::Gzip),
        SampleLayer::new(fourth.finish(), BlobCompression::Gzip),
        SampleLayer::new(fifth.finish(), BlobCompression::Plain),
    ]
}

/// Odd layer encodings: a gzip blob of two gzip members, a sparse file, a
/// layer whose only member is a whiteout, xattrs, and a file shadowed by
/// itself in the same layer.
pub fn odd_encodings(sparse_member: Vec<u8>) -> Vec<SampleLayer> {
    let first_half = file(
        LayerBuilder::new().dir("./", 0o755).dir("etc/", 0o755),
        "etc/os-release",
        b"ID=alpine\nVERSION_ID=3.20.0\n",
    )
    .finish_without_footer();
    let mut second_half = LayerBuilder::new().dir("data/", 0o755);
    second_half = file(second_half, "data/a.bin", &bytes(5000, 300 << 10, false));
    second_half = file(second_half, "data/twice", b"first copy\n");
    second_half = file(second_half, "data/twice", b"second copy wins\n");
    let second_half = second_half.finish();
    let tar = [first_half.as_slice(), &second_half].concat();
    let mut multi = hakim_convert::sample::compress_blob(&first_half, BlobCompression::Gzip);
    multi.extend(hakim_convert::sample::compress_blob(
        &second_half,
        BlobCompression::Gzip,
    ));
    let multi = SampleLayer {
        tar,
        blob: multi,
        media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
    };

    let mut sparse = sparse_member;
    sparse.extend(
        LayerBuilder::new()
            .entry(
                b"data/cap",
                OutKind::File,
                0o755,
                None,
                b"#!/bin/sh\n",
                &[(b"user.note"[..].into(), b"kept"[..].into())],
            )
            .finish(),
    );
    let only_whiteout = LayerBuilder::new().whiteout("data/a.bin").finish();
    vec![
        multi,
        SampleLayer::new(sparse, BlobCompression::Zstd),
        SampleLayer::new(only_whiteout, BlobCompression::Gzip),
    ]
}

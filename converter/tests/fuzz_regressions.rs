//! Inputs the fuzz targets (`fuzz/`, docs/fuzzing.md) found mishandled, as
//! small crafted layers. Each test states the promise that was broken; all of
//! them also check the `flatten` target's main invariant: the artifact,
//! flattened again as a single layer, comes out byte-identical.

use hakim_convert::sample::{
    flatten_in_memory, in_memory_image, BlobCompression, LayerBuilder, SampleLayer,
};
use hakim_convert::tarout::{OutEntry, OutKind, TarWriter};

/// Flattens `layers`, checks the output is a fixed point, and returns it.
fn flatten_stable(layers: Vec<Vec<u8>>) -> Vec<u8> {
    let layers: Vec<SampleLayer> = layers
        .into_iter()
        .map(|t| SampleLayer::new(t, BlobCompression::Plain))
        .collect();
    let (out, _) = flatten_in_memory(&in_memory_image(&layers), None).expect("flattens");
    let again = vec![SampleLayer::new(out.clone(), BlobCompression::Plain)];
    let (out2, _) = flatten_in_memory(&in_memory_image(&again), None).expect("flattens again");
    assert!(out == out2, "flattening the artifact again changes it");
    out
}

fn mtimes(tar_bytes: &[u8]) -> Vec<(String, u64)> {
    tar::Archive::new(tar_bytes)
        .entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let mut mtime = e.header().mtime().unwrap();
            let mut e = e;
            if let Some(pax) = e.pax_extensions().unwrap() {
                for r in pax {
                    let r = r.unwrap();
                    if r.key_bytes() == b"mtime" {
                        mtime = r.value().unwrap().parse().unwrap();
                    }
                }
            }
            (String::from_utf8_lossy(&e.path_bytes()).into_owned(), mtime)
        })
        .collect()
}

/// Found by `flatten`: a base-256 mtime above 2^63 was written as a PAX record
/// the reader then could not parse, so the artifact did not read back as
/// itself. Mtimes are now clamped to a 64-bit `time_t`.
#[test]
fn mtimes_beyond_time_t_are_clamped_and_read_back() {
    // Base-256 header field (GNU), as the crashing input had it.
    let mut gnu = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_path("old").unwrap();
    h.set_size(0);
    h.set_mode(0o644);
    h.set_mtime(14_900_659_877_683_082_240);
    h.set_cksum();
    gnu.append(&h, &[][..]).unwrap();
    let gnu = gnu.into_inner().unwrap();

    // PAX records: too large, negative, fractional.
    let mut pax = TarWriter::new(Vec::new());
    for (name, mtime) in [("pax-huge", u64::MAX), ("pax-ok", 1_700_000_000)] {
        pax.append(&OutEntry {
            name: name.as_bytes(),
            kind: OutKind::Fifo,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime,
            size: 0,
            link: None,
            xattrs: &[],
        })
        .unwrap();
    }
    let pax = pax.finish().unwrap();

    let out = flatten_stable(vec![gnu, pax, LayerBuilder::new().finish()]);
    let got = mtimes(&out);
    let max = i64::MAX as u64;
    assert!(got.contains(&("./old".into(), max)), "{got:?}");
    assert!(got.contains(&("./pax-huge".into(), max)), "{got:?}");
    assert!(got.contains(&("./pax-ok".into(), 1_700_000_000)), "{got:?}");
}

/// Found by `flatten`: a PAX `linkpath` holding a NUL byte went into the
/// artifact, where no file system can create such a symlink. Refused now, with
/// the member named, like NUL bytes in names.
#[test]
fn symlink_target_with_nul_is_refused() {
    let mut b = tar::Builder::new(Vec::new());
    b.append_pax_extensions([("linkpath", &b"usr/\0lib"[..])])
        .unwrap();
    let mut h = tar::Header::new_ustar();
    h.set_path("lib").unwrap();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    h.set_cksum();
    b.append(&h, &[][..]).unwrap();
    let layer = SampleLayer::new(b.into_inner().unwrap(), BlobCompression::Plain);
    let err = flatten_in_memory(&in_memory_image(&[layer]), None).unwrap_err();
    let err = format!("{err:#}");
    assert!(
        err.contains("'lib': symlink target contains a NUL byte"),
        "{err}"
    );
}

/// Noticed while fuzzing: a `LIBARCHIVE.xattr` name may decode to one holding
/// `=`, which a `SCHILY.xattr` record cannot carry (GNU tar would read another
/// name and value). Such xattrs are dropped with a warning; others stay.
#[test]
fn xattr_names_a_pax_record_cannot_carry_are_dropped() {
    let mut b = tar::Builder::new(Vec::new());
    b.append_pax_extensions([
        ("LIBARCHIVE.xattr.user.a%3Db", &b"dg=="[..]),
        ("LIBARCHIVE.xattr.user.ok", &b"dg=="[..]),
    ])
    .unwrap();
    let mut h = tar::Header::new_ustar();
    h.set_path("f").unwrap();
    h.set_size(0);
    h.set_mode(0o644);
    h.set_cksum();
    b.append(&h, &[][..]).unwrap();
    let out = flatten_stable(vec![b.into_inner().unwrap()]);
    let mut ar = tar::Archive::new(&out[..]);
    let mut keys = Vec::new();
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        if let Some(pax) = e.pax_extensions().unwrap() {
            for r in pax {
                let r = r.unwrap();
                keys.push((r.key().unwrap().to_string(), r.value_bytes().to_vec()));
            }
        }
    }
    assert_eq!(keys, [("SCHILY.xattr.user.ok".to_string(), b"v".to_vec())]);
}

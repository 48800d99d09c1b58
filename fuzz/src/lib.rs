//! Shared pieces of the fuzz targets: how a fuzz input is cut into parts, how
//! layer tars become an in-memory image, and the invariants every rootfs tar
//! the converter writes must hold. The seed generator
//! (`converter/tests/common/mod.rs`, `ci/fuzz-seeds.sh`) writes inputs in the
//! format [`split`] reads.

pub mod image;
pub mod rootfs;

/// `verify` rules a rootfs the converter wrote may fail: a layer stack made by
/// a fuzzer has no `/sbin/init`, and the converter keeps (with a warning) ids an
/// unprivileged container cannot map. Any other failed rule means the
/// converter wrote what its own verifier rejects, or the verifier is wrong.
pub const VERIFY_MAY_FAIL: &[&str] = &[
    "/sbin/init resolves inside the root to an executable file",
    "uid/gid below 65536 (unprivileged containers)",
];

/// Panics listing the failed `verify` rules outside [`VERIFY_MAY_FAIL`].
pub fn assert_verified(report: &hakim_convert::verify::Report) {
    let unexpected: Vec<String> = report
        .failures()
        .filter(|c| !VERIFY_MAY_FAIL.contains(&c.rule.as_str()))
        .map(|c| format!("{}: {}", c.rule, c.detail))
        .collect();
    assert!(
        unexpected.is_empty(),
        "verify rejects the converter's own {}: {unexpected:#?}",
        report.kind
    );
}

/// Separates the parts of a fuzz input (layers, files, JSON documents).
pub const SEP: &[u8] = b"%%HAKIM%%\n";

/// Cuts `data` at every [`SEP`].
pub fn split(data: &[u8]) -> Vec<&[u8]> {
    let mut parts = Vec::new();
    let mut rest = data;
    while let Some(at) = find(rest, SEP) {
        parts.push(&rest[..at]);
        rest = &rest[at + SEP.len()..];
    }
    parts.push(rest);
    parts
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The first byte of an input (flags), and the rest.
pub fn flags(data: &[u8]) -> (u8, &[u8]) {
    match data.split_first() {
        Some((&f, rest)) => (f, rest),
        None => (0, data),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_at_separators() {
        let mut v = b"a".to_vec();
        v.extend_from_slice(SEP);
        v.extend_from_slice(SEP);
        v.extend_from_slice(b"b");
        assert_eq!(split(&v), [&b"a"[..], b"", b"b"]);
        assert_eq!(split(b"x"), [&b"x"[..]]);
    }
}

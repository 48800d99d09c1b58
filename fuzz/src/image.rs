//! Fuzz input → layer stack → an image the flattener reads from memory.
//!
//! Input format (shared by the `flatten` and `convert` targets): one flag byte,
//! then the layers, separated by [`crate::SEP`]. Each layer is one byte naming
//! its compression (`% 3`: plain, gzip, zstd) followed by its uncompressed tar.
//!
//! Flags: bit 0 set = leave tar header checksums as they are (otherwise they are
//! recomputed, so mutations of names, types and sizes get past the tar reader's
//! checksum test and reach the merge); bit 1 = give the top layer a wrong
//! diff_id (the run must fail and leave nothing); bit 2 = clamp mtimes
//! (`SOURCE_DATE_EPOCH`); bit 3 = the `convert` target writes an OCI archive,
//! the `verify` target verifies the bytes after the flag byte as they are.

use hakim_convert::sample::{BlobCompression, SampleLayer};
use hakim_convert::tarstream::octal_or_binary;

/// At most this many layers per input (more adds time, not coverage).
const MAX_LAYERS: usize = 12;
/// The clamp used when flag bit 2 is set.
pub const CLAMP: u64 = 1_600_000_000;

pub struct FuzzImage {
    pub layers: Vec<SampleLayer>,
    pub clamp: Option<u64>,
    /// The top layer's diff_id is wrong: conversion must fail.
    pub bad_diff_id: bool,
}

/// Recomputes the checksum of every header block of a tar, walking from header
/// to header by the size fields. Stops at the first size it cannot read.
pub fn repair_checksums(tar: &mut [u8]) {
    let mut pos = 0usize;
    while pos + 512 <= tar.len() {
        let block = &mut tar[pos..pos + 512];
        if block.iter().all(|&b| b == 0) {
            pos += 512;
            continue;
        }
        let Some(size) = octal_or_binary(&block[124..136]) else {
            return;
        };
        block[148..156].fill(b' ');
        let sum: u32 = block.iter().map(|&b| b as u32).sum();
        // As the tar crate writes it: seven octal digits and a NUL.
        let text = format!("{sum:07o}\0");
        block[148..156].copy_from_slice(text.as_bytes());
        let Some(next) = usize::try_from(size)
            .ok()
            .and_then(|s| s.checked_add(511))
            .map(|s| s / 512 * 512)
            .and_then(|s| s.checked_add(pos + 512))
        else {
            return;
        };
        pos = next;
    }
}

impl FuzzImage {
    pub fn parse(data: &[u8]) -> Self {
        let (flags, rest) = crate::flags(data);
        let mut layers = Vec::new();
        for chunk in crate::split(rest).into_iter().take(MAX_LAYERS) {
            let (how, tar) = crate::flags(chunk);
            let mut tar = tar.to_vec();
            if flags & 1 == 0 {
                repair_checksums(&mut tar);
            }
            let how = match how % 3 {
                0 => BlobCompression::Plain,
                1 => BlobCompression::Gzip,
                _ => BlobCompression::Zstd,
            };
            layers.push(SampleLayer::new(tar, how));
        }
        let bad_diff_id = flags & 2 != 0 && !layers.is_empty();
        if bad_diff_id {
            if let Some(top) = layers.last_mut() {
                // The config will hash this, not what the blob holds.
                top.tar.push(b'!');
            }
        }
        FuzzImage {
            layers,
            clamp: (flags & 4 != 0).then_some(CLAMP),
            bad_diff_id,
        }
    }
}

pub use hakim_convert::sample::{flatten_in_memory as flatten, in_memory_image as resolved};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repaired_headers_pass_the_tar_reader() {
        let tar = hakim_convert::sample::LayerBuilder::new()
            .file("a", "x")
            .file("b", "y")
            .finish();
        let mut broken = tar.clone();
        broken[0] = b'z';
        assert!(tar::Archive::new(&broken[..])
            .entries()
            .unwrap()
            .next()
            .unwrap()
            .is_err());
        repair_checksums(&mut broken);
        let names: Vec<Vec<u8>> = tar::Archive::new(&broken[..])
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path_bytes().into_owned())
            .collect();
        assert_eq!(names, [b"z".to_vec(), b"b".to_vec()]);
        let mut same = tar.clone();
        repair_checksums(&mut same);
        assert_eq!(same, tar);
    }
}

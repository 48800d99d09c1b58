//! A stack of arbitrary layer tars through both passes of the flattener, in
//! memory. Besides "no panic": a failed run is an error, never partial output;
//! the output keeps every rootfs promise ([`hakim_fuzz::rootfs::check`]); and
//! flattening the output again as a single layer gives the same bytes (the
//! output is already a normalised tree: nothing to merge, hide or reorder).
#![no_main]

use hakim_fuzz::image::{flatten, resolved, FuzzImage};
use hakim_fuzz::rootfs;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let input = FuzzImage::parse(data);
    let image = resolved(&input.layers);
    let Ok((tar, stats)) = flatten(&image, input.clamp) else {
        return;
    };
    assert!(
        !input.bad_diff_id,
        "a layer with a wrong diff_id was accepted"
    );
    rootfs::check(&tar, Some(&stats));

    let again = resolved(&[hakim_convert::sample::SampleLayer::new(
        tar.clone(),
        hakim_convert::sample::BlobCompression::Plain,
    )]);
    let (tar2, _) = flatten(&again, None)
        .unwrap_or_else(|e| panic!("the output does not flatten again: {e:#}"));
    rootfs::assert_same(&tar, &tar2, "flattening the output again changes it");
});

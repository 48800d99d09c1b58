//! The whole `convert` job on a layer stack written as an OCI layout: a failed
//! run leaves no file in the output directory; a successful one leaves exactly
//! the artifact and `sha256sums.txt`, which `verify` accepts. A rootfs artifact
//! is byte for byte what the in-memory flattener produces. Flag bit 3 of the
//! input (see `fuzz/src/image.rs`) asks for an OCI archive instead.
#![no_main]

use std::collections::BTreeSet;

use hakim_convert::compress::OutputCompression;
use hakim_convert::convert::{convert, ConvertOptions, OutputFormat};
use hakim_convert::sample::write_oci_layout;
use hakim_convert::verify::verify;
use hakim_fuzz::image::{flatten, resolved, FuzzImage};
use hakim_fuzz::rootfs;
use libfuzzer_sys::fuzz_target;

fn scratch() -> tempfile::TempDir {
    // tmpfs when there is one: this target writes a layout per input.
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::tempdir_in(shm) {
            return d;
        }
    }
    tempfile::tempdir().expect("a temporary directory")
}

/// Names in the output directory, the lock file aside (sorted).
fn outputs(dir: &std::path::Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != ".sha256sums.lock")
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let input = FuzzImage::parse(data);
    let dir = scratch();
    let layout = dir.path().join("layout");
    let out = dir.path().join("out");
    write_oci_layout(
        &layout,
        "fuzz:1",
        "amd64",
        &input.layers,
        serde_json::json!({}),
    )
    .expect("writing the layout");
    let oci = data.first().is_some_and(|f| f & 8 != 0);
    let mut opts = ConvertOptions::new(format!("oci:{}:1", layout.display()), &out);
    opts.format = if oci {
        OutputFormat::OciArchive
    } else {
        OutputFormat::Rootfs
    };
    opts.compression = if oci {
        OutputCompression::Gzip
    } else {
        OutputCompression::None
    };
    opts.threads = Some(1);
    opts.name = Some("fuzz".into());
    opts.source_date_epoch = input.clamp;
    match convert(&opts) {
        Err(e) => {
            assert!(!format!("{e:#}").is_empty());
            let left = outputs(&out);
            assert!(left.is_empty(), "a failed run left {left:?}");
        }
        Ok(summary) => {
            assert!(!input.bad_diff_id, "a wrong diff_id was accepted");
            let name = summary.file_name.clone();
            assert_eq!(
                outputs(&out),
                BTreeSet::from([name.clone(), "sha256sums.txt".to_string()])
            );
            let report = verify(&summary.artifact).expect("verify reads the artifact");
            hakim_fuzz::assert_verified(&report);
            if oci {
                return;
            }
            let artifact = std::fs::read(&summary.artifact).expect("the artifact");
            rootfs::check(&artifact, Some(&summary.entries));
            let sums = std::fs::read_to_string(out.join("sha256sums.txt")).unwrap();
            assert_eq!(sums, format!("{}  {name}\n", summary.sha256));
            let (expected, _) = flatten(&resolved(&input.layers), input.clamp)
                .expect("what convert accepts, the flattener accepts");
            rootfs::assert_same(&expected, &artifact, "convert and flatten disagree");
        }
    }
});

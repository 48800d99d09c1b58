//! Byte identity: the sha256 of every artifact the converter writes for the
//! fixed images of `common::images` and the demo image — rootfs tar without
//! compression, zstd and xz, OCI archives (flattened and with kept layers) and
//! an injected rootfs — at 1 and 2 threads, against `golden.txt`, recorded
//! before the performance work of issue 14. Any change of output bytes fails
//! here and has to be explained (then re-recorded with `HAKIM_GOLDEN_RECORD=1`).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use hakim_convert::compress::OutputCompression;
use hakim_convert::convert::{convert, ConvertOptions, OutputFormat};
use hakim_convert::inject::InjectOptions;
use hakim_convert::sample::{write_demo_image, write_oci_layout, SampleLayer};

const GOLDEN: &str = "tests/golden.txt";
const EPOCH: u64 = 1_700_000_000;

/// One artifact kind: a name for `golden.txt` and how to ask for it.
struct Variant {
    name: &'static str,
    format: OutputFormat,
    compression: OutputCompression,
    keep_layers: bool,
    inject: bool,
}

const VARIANTS: &[Variant] = &[
    Variant {
        name: "rootfs-none",
        format: OutputFormat::Rootfs,
        compression: OutputCompression::None,
        keep_layers: false,
        inject: false,
    },
    Variant {
        name: "rootfs-zstd",
        format: OutputFormat::Rootfs,
        compression: OutputCompression::Zstd,
        keep_layers: false,
        inject: false,
    },
    Variant {
        name: "rootfs-xz",
        format: OutputFormat::Rootfs,
        compression: OutputCompression::Xz,
        keep_layers: false,
        inject: false,
    },
    Variant {
        name: "oci-gzip",
        format: OutputFormat::OciArchive,
        compression: OutputCompression::Gzip,
        keep_layers: false,
        inject: false,
    },
    Variant {
        name: "oci-zstd-kept-layers",
        format: OutputFormat::OciArchive,
        compression: OutputCompression::Zstd,
        keep_layers: true,
        inject: false,
    },
    Variant {
        name: "rootfs-none-inject",
        format: OutputFormat::Rootfs,
        compression: OutputCompression::None,
        keep_layers: false,
        inject: true,
    },
];

/// The images, each as an OCI layout reference under `dir`.
fn images(dir: &Path) -> Vec<(&'static str, String)> {
    let layout = |name: &str, layers: &[SampleLayer]| {
        let d = dir.join(name);
        write_oci_layout(&d, "golden:1", "amd64", layers, serde_json::json!({})).unwrap();
        format!("oci:{}:1", d.display())
    };
    let demo = dir.join("demo");
    write_demo_image(&demo).unwrap();
    let sparse = common::gnu_sparse_member(
        "data/sparse",
        8 << 20,
        &[
            (0, &[7u8; 1024][..]),
            (4 << 20, &common::images::bytes(9, 3000, false)),
        ],
    );
    vec![
        ("demo", format!("oci:{}:latest", demo.display())),
        ("shadowed", layout("shadowed", &common::images::shadowed())),
        (
            "odd-encodings",
            layout("odd", &common::images::odd_encodings(sparse)),
        ),
    ]
}

fn sha256_of(path: &Path) -> String {
    hakim_convert::digest::Digest::of_bytes(&std::fs::read(path).unwrap())
        .hex()
        .to_string()
}

/// Every `image variant` → sha256 at `threads`.
fn hashes(dir: &Path, init: &Path, threads: u32) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (image, reference) in images(dir) {
        for v in VARIANTS {
            let outdir = dir.join(format!("out-{image}-{}-{threads}", v.name));
            let s = convert(&ConvertOptions {
                format: v.format,
                compression: v.compression,
                threads: Some(threads),
                keep_layers: v.keep_layers,
                name: Some("golden".into()),
                source_date_epoch: (v.format == OutputFormat::OciArchive).then_some(EPOCH),
                inject: v.inject.then(|| InjectOptions {
                    init_binary: init.to_path_buf(),
                    services_dir: None,
                    keep_ssh_host_keys: false,
                }),
                ..ConvertOptions::new(reference.clone(), &outdir)
            })
            .unwrap_or_else(|e| panic!("{image} {}: {e:#}", v.name));
            assert_eq!(s.sha256, sha256_of(&s.artifact), "the summary's sha256");
            out.insert(format!("{image} {}", v.name), s.sha256);
            std::fs::remove_dir_all(&outdir).unwrap();
        }
    }
    out
}

fn golden_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(GOLDEN)
}

#[test]
fn output_bytes_match_the_recorded_hashes_at_any_thread_count() {
    let dir = tempfile::tempdir().unwrap();
    let init = common::fake_init(dir.path(), 62, false);
    let one = hashes(dir.path(), &init, 1);
    let two = hashes(dir.path(), &init, 2);
    assert_eq!(one, two, "output bytes depend on --threads");
    let text: String = one.iter().map(|(k, v)| format!("{k} {v}\n")).collect();
    if std::env::var_os("HAKIM_GOLDEN_RECORD").is_some() {
        std::fs::write(golden_path(), &text).unwrap();
        return;
    }
    let recorded = std::fs::read_to_string(golden_path()).expect("tests/golden.txt");
    let diff: Vec<String> = recorded
        .lines()
        .zip(text.lines())
        .filter(|(a, b)| a != b)
        .map(|(a, b)| format!("  recorded {a}\n  now      {b}"))
        .collect();
    assert!(
        recorded == text,
        "output bytes changed against {GOLDEN}:\n{}",
        diff.join("\n")
    );
}

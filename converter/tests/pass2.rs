//! Pass 2 reads what reaches the output, not the whole image: a layer none of
//! whose members wins is not decompressed a second time, and a layer is not
//! read past its last winning member. Counted by the converter itself
//! (`--json`'s `inflated_pass2_bytes`), on an image built for it
//! (`common::images::shadowed`).

mod common;

use hakim_convert::compress::OutputCompression;
use hakim_convert::convert::{convert, ConvertOptions};

#[test]
fn pass2_skips_layers_without_winners_and_tails_after_the_last_winner() {
    let layers = common::images::shadowed();
    let f = common::Fixture::new(&layers);
    for threads in [1, 2] {
        let s = convert(&ConvertOptions {
            threads: Some(threads),
            ..f.options(OutputCompression::None)
        })
        .unwrap();
        let l = &s.source.layers;
        for (i, layer) in l.iter().enumerate() {
            assert_eq!(
                layer.inflated_pass1_bytes,
                layers[i].tar.len() as u64,
                "pass 1 decompresses all of layer {}",
                i + 1
            );
        }
        // Layer 3: every file it writes is replaced by layer 5.
        assert_eq!(l[2].inflated_pass2_bytes, 0, "layer 3 has no winner");
        // Layer 4: its winner comes first (1 MiB + headers); the tail of
        // replaced files behind it (6 MiB) is not read.
        let tail = common::images::TAIL_FILES as u64 * (512 << 10);
        assert!(
            l[3].inflated_pass2_bytes < l[3].inflated_pass1_bytes - tail,
            "layer 4 read past its last winner: {} of {} bytes (tail {tail})",
            l[3].inflated_pass2_bytes,
            l[3].inflated_pass1_bytes
        );
        // Layers 1, 2 and 5 end with winners: read whole (but the footer).
        for i in [0, 1, 4] {
            assert!(l[i].inflated_pass2_bytes > 0, "layer {} is read", i + 1);
        }
        let p = &s.passes;
        assert_eq!(
            p.inflated_pass2_bytes,
            l.iter().map(|l| l.inflated_pass2_bytes).sum::<u64>()
        );
        assert_eq!(
            p.inflated_pass1_bytes,
            l.iter().map(|l| l.inflated_pass1_bytes).sum::<u64>()
        );
        assert!(
            p.inflated_pass2_bytes * 10 < p.inflated_pass1_bytes * 7,
            "pass 2 decompressed {} of {} bytes",
            p.inflated_pass2_bytes,
            p.inflated_pass1_bytes
        );
        let json = serde_json::to_value(&s).unwrap();
        for key in [
            "inflated_pass1_bytes",
            "inflated_pass2_bytes",
            "pass1_seconds",
            "pass2_seconds",
        ] {
            assert!(json["passes"][key].is_number(), "--json passes.{key}");
            assert!(
                json["source"]["layers"][0][key].is_number(),
                "--json source.layers[].{key}"
            );
        }
    }
}

#[test]
fn a_blob_changed_between_the_passes_is_refused() {
    use hakim_convert::flatten::{self, EmitOptions, Limits};
    use hakim_convert::tarout::TarWriter;
    let layers = common::images::shadowed();
    let f = common::Fixture::new(&layers);
    let image =
        hakim_convert::source::open(&format!("oci:{}:1", f.layout().display()), None).unwrap();
    let mut index = flatten::index_layers(&image, 0, Limits::default(), 2, &mut |_, _| {}).unwrap();
    // Between the passes, layer 4's blob grows by a byte.
    let digest = image.layers[3].digest.as_ref().unwrap();
    let blob = f.layout().join("blobs/sha256").join(digest.hex());
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes.push(0);
    std::fs::write(&blob, bytes).unwrap();
    let err = flatten::emit(
        &image,
        &mut index,
        &EmitOptions::default(),
        &mut TarWriter::new(std::io::sink()),
        &mut |_| Ok(()),
    )
    .expect_err("a changed blob is an error");
    assert!(
        format!("{err:#}").contains("changed since the first read"),
        "{err:#}"
    );
}

//! One fixture per case of the OCI layer rules (docs/converter.md, "Layer rules"), each with the
//! exact expected artifact. Layers are crafted blob by blob; the artifact is read
//! back member by member.

mod common;

use common::{flatten, flatten_err, non_dirs};
use hakim_convert::sample::{BlobCompression, LayerBuilder as L, SampleLayer};

fn gz(l: L) -> SampleLayer {
    SampleLayer::new(l.finish(), BlobCompression::Gzip)
}

#[test]
fn file_to_dir_and_dir_to_file_across_layers() {
    let out = flatten(&[
        gz(L::new()
            .file("a", "file a")
            .dir("b/", 0o755)
            .file("b/inner", "in b")),
        gz(L::new()
            .dir("a/", 0o750)
            .file("a/x", "x in a")
            .file("b", "b is a file")),
    ]);
    assert_eq!(
        out,
        [
            "./ d 755 0:0",
            "./a/ d 750 0:0",
            "./a/x f 644 0:0 =x in a",
            "./b f 644 0:0 =b is a file",
        ]
    );
}

#[test]
fn whiteout_of_deep_dir_then_readd() {
    let out = flatten(&[
        gz(L::new()
            .file("d/e/f/old1", "1")
            .file("d/e/f/old2", "2")
            .file("d/keep", "k")),
        gz(L::new().whiteout("d/e")),
        gz(L::new().file("d/e/f/new", "n")),
    ]);
    assert_eq!(
        non_dirs(&out),
        ["./d/keep f 644 0:0 =k", "./d/e/f/new f 644 0:0 =n"]
    );
}

#[test]
fn opaque_marker_before_and_after_same_layer_entries() {
    for marker_first in [true, false] {
        let mut top = L::new();
        if marker_first {
            top = top.opaque("d").dir("d/", 0o700).file("d/new", "new");
        } else {
            top = top.dir("d/", 0o700).file("d/new", "new").opaque("d");
        }
        let out = flatten(&[
            gz(L::new()
                .dir("d/", 0o755)
                .file("d/old", "old")
                .dir("d/sub/", 0o755)
                .file("d/sub/deep", "x")),
            gz(top),
        ]);
        assert_eq!(
            out,
            ["./ d 755 0:0", "./d/ d 700 0:0", "./d/new f 644 0:0 =new"],
            "marker first: {marker_first}"
        );
    }
}

#[test]
fn whiteout_and_readd_in_same_layer_both_orders() {
    for whiteout_first in [true, false] {
        let top = if whiteout_first {
            L::new().whiteout("x").file("x", "new")
        } else {
            L::new().file("x", "new").whiteout("x")
        };
        let out = flatten(&[gz(L::new().file("x", "old")), gz(top)]);
        assert_eq!(
            out,
            ["./ d 755 0:0", "./x f 644 0:0 =new"],
            "whiteout first: {whiteout_first}"
        );
    }
    // Same with a directory: the lower children go, the same-layer ones stay.
    for whiteout_first in [true, false] {
        let top = if whiteout_first {
            L::new().whiteout("d").dir("d/", 0o755).file("d/new", "n")
        } else {
            L::new().dir("d/", 0o755).file("d/new", "n").whiteout("d")
        };
        let out = flatten(&[gz(L::new().file("d/old", "o")), gz(top)]);
        assert_eq!(non_dirs(&out), ["./d/new f 644 0:0 =n"]);
    }
}

#[test]
fn whiteout_of_missing_name_is_harmless() {
    let out = flatten(&[
        gz(L::new().file("a", "a")),
        gz(L::new().whiteout("nothing").whiteout("no/such/dir/x")),
    ]);
    assert_eq!(out, ["./ d 755 0:0", "./a f 644 0:0 =a"]);
}

#[test]
fn malformed_whiteouts_are_refused() {
    let err = flatten_err(&[gz(L::new().file("d/.wh..", ""))]);
    assert!(err.contains("whiteout marker of '.' or '..'"), "{err}");
    assert!(err.contains("layer 1"), "{err}");
    let err = flatten_err(&[gz(L::new().file("../.wh.x", ""))]);
    assert!(err.contains("escapes the image root"), "{err}");
}

#[test]
fn hardlink_to_lower_layer_file() {
    let out = flatten(&[
        gz(L::new().file("usr/bin/perl", "perl")),
        gz(L::new().hardlink("usr/bin/perl5", "usr/bin/perl")),
    ]);
    assert_eq!(
        non_dirs(&out),
        [
            "./usr/bin/perl f 644 0:0 =perl",
            "./usr/bin/perl5 h => ./usr/bin/perl"
        ]
    );
}

#[test]
fn hardlink_chains_and_hardlink_to_symlink() {
    let out = flatten(&[gz(L::new()
        .file("a", "content")
        .hardlink("b", "a")
        .hardlink("c", "b")
        .symlink("s", "a")
        .hardlink("s2", "s"))]);
    assert_eq!(
        out,
        [
            "./ d 755 0:0",
            "./s l -> a",
            "./s2 h => ./s",
            "./a f 644 0:0 =content",
            "./b h => ./a",
            "./c h => ./a",
        ]
    );
}

#[test]
fn hardlink_alias_keeps_original_content_when_target_replaced_or_whited_out() {
    let out = flatten(&[
        gz(L::new().file("t1", "original 1").file("t2", "original 2")),
        gz(L::new().hardlink("alias1", "t1").hardlink("alias2", "t2")),
        gz(L::new().file("t1", "replacement").whiteout("t2")),
    ]);
    assert_eq!(
        non_dirs(&out),
        [
            "./alias1 f 644 0:0 =original 1",
            "./alias2 f 644 0:0 =original 2",
            "./t1 f 644 0:0 =replacement",
        ]
    );
}

#[test]
fn symlinks_kept_verbatim_and_never_followed_on_host() {
    let out = flatten(&[gz(L::new()
        .symlink("abs", "/etc/shadow")
        .symlink("dangling", "no/such/file")
        .symlink("loop1", "loop2")
        .symlink("loop2", "loop1")
        .symlink("up", "../../../../etc"))]);
    assert_eq!(
        out,
        [
            "./ d 755 0:0",
            "./abs l -> /etc/shadow",
            "./dangling l -> no/such/file",
            "./loop1 l -> loop2",
            "./loop2 l -> loop1",
            "./up l -> ../../../../etc",
        ]
    );
}

#[test]
fn parents_resolve_through_symlinked_dirs_inside_the_root() {
    let out = flatten(&[
        gz(L::new()
            .dir("usr/lib/", 0o755)
            .symlink("lib", "usr/lib")
            .symlink("escape", "../../../tmp")),
        gz(L::new().file("lib/foo", "foo").file("escape/bar", "bar")),
    ]);
    assert_eq!(
        out,
        [
            "./ d 755 0:0",
            "./escape l -> ../../../tmp",
            "./lib l -> usr/lib",
            "./tmp/ d 755 0:0",
            "./usr/ d 755 0:0",
            "./usr/lib/ d 755 0:0",
            "./usr/lib/foo f 644 0:0 =foo",
            "./tmp/bar f 644 0:0 =bar",
        ]
    );
}

#[test]
fn symlink_loop_in_a_parent_is_a_clear_error() {
    let err = flatten_err(&[
        gz(L::new().symlink("a", "b").symlink("b", "a")),
        gz(L::new().file("a/x", "x")),
    ]);
    assert!(err.contains("too many levels of symbolic links"), "{err}");
    assert!(err.contains("layer 2"), "{err}");
}

#[test]
fn zip_slip_names_are_refused_with_layer_and_entry() {
    for (name, why) in [
        ("/abs", "absolute path"),
        ("../x", "escapes the image root"),
        ("a/../../x", "escapes the image root"),
    ] {
        let err = flatten_err(&[
            gz(L::new().file("ok", "ok")),
            gz(L::new().file(name, "evil")),
        ]);
        assert!(err.contains(why), "{name}: {err}");
        assert!(err.contains("layer 2"), "{name}: {err}");
        assert!(err.contains(name), "{name}: {err}");
    }
    let err = flatten_err(&[gz(L::new().hardlink("x", "../../etc/passwd"))]);
    assert!(err.contains("hardlink target"), "{err}");
    assert!(err.contains("escapes the image root"), "{err}");
    let err = flatten_err(&[gz(L::new().hardlink("x", "/etc/passwd"))]);
    assert!(err.contains("absolute path"), "{err}");
}

#[test]
fn odd_but_safe_names_are_normalised() {
    let out = flatten(&[gz(L::new().file("./a//b", "ab").file("c/./d/../e", "ce"))]);
    assert_eq!(
        non_dirs(&out),
        ["./a/b f 644 0:0 =ab", "./c/e f 644 0:0 =ce"]
    );
}

#[test]
fn devices_are_dropped_fifos_kept() {
    // The layer builder has no device kind: use the tar crate's builder.
    let mut tar = Vec::new();
    {
        let mut b = tar::Builder::new(&mut tar);
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Char);
        h.set_mode(0o666);
        h.set_device_major(1).unwrap();
        h.set_device_minor(3).unwrap();
        h.set_size(0);
        b.append_data(&mut h, "dev/null", &[][..]).unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Block);
        h.set_mode(0o660);
        h.set_size(0);
        b.append_data(&mut h, "dev/sda", &[][..]).unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Fifo);
        h.set_mode(0o600);
        h.set_size(0);
        b.append_data(&mut h, "run/initctl", &[][..]).unwrap();
        b.finish().unwrap();
    }
    let f = common::Fixture::new(&[SampleLayer::new(tar, BlobCompression::Plain)]);
    let s = f.convert().unwrap();
    assert_eq!(
        common::listing(&s.artifact),
        [
            "./ d 755 0:0",
            "./dev/ d 755 0:0",
            "./run/ d 755 0:0",
            "./run/initctl p 600 0:0"
        ]
    );
    assert_eq!(s.entries.devices_dropped, 2);
    assert!(s
        .warnings
        .iter()
        .any(|w| w.contains("dev/null") && w.contains("device node dropped")));
}

#[test]
fn special_mode_bits_survive() {
    let out = flatten(&[gz(L::new()
        .file_mode("usr/bin/sudo", "s", 0o4755)
        .file_mode("usr/bin/wall", "w", 0o2755)
        .dir("tmp/", 0o1777)
        .dir("locked/", 0o000)
        .file_mode("locked/f", "f", 0o000))]);
    assert!(
        out.contains(&"./usr/bin/sudo f 4755 0:0 =s".to_string()),
        "{out:?}"
    );
    assert!(
        out.contains(&"./usr/bin/wall f 2755 0:0 =w".to_string()),
        "{out:?}"
    );
    assert!(out.contains(&"./tmp/ d 1777 0:0".to_string()), "{out:?}");
    assert!(out.contains(&"./locked/ d 0 0:0".to_string()), "{out:?}");
    assert!(
        out.contains(&"./locked/f f 0 0:0 =f".to_string()),
        "{out:?}"
    );
}

#[test]
fn big_and_unprivileged_unfriendly_ids() {
    let out = flatten(&[gz(L::new()
        .owner(3_000_000, 2_100_000)
        .file("huge", "h")
        .owner(70_000, 65_536)
        .file("big", "b")
        .owner(65_535, 1000)
        .file("fine", "f"))]);
    assert_eq!(
        non_dirs(&out),
        [
            "./huge f 644 3000000:2100000 =h",
            "./big f 644 70000:65536 =b",
            "./fine f 644 65535:1000 =f",
        ]
    );
    let f = common::Fixture::new(&[gz(L::new().owner(70_000, 0).file("big", "b"))]);
    let s = f.convert().unwrap();
    assert!(
        s.warnings.iter().any(|w| w.contains("65536")),
        "{:?}",
        s.warnings
    );
}

#[test]
fn duplicate_path_in_one_layer_last_wins() {
    let out = flatten(&[gz(L::new()
        .file("x", "first")
        .hardlink("keep-first", "x")
        .file("x", "second")
        .dir("d/", 0o700)
        .dir("d/", 0o755))]);
    assert_eq!(
        out,
        [
            "./ d 755 0:0",
            "./d/ d 755 0:0",
            "./keep-first f 644 0:0 =first",
            "./x f 644 0:0 =second",
        ]
    );
}

#[test]
fn empty_layers_and_a_layer_with_no_footer() {
    let out = flatten(&[
        gz(L::new().file("a", "a")),
        SampleLayer::new(Vec::new(), BlobCompression::Gzip),
        gz(L::new()),
        // umoci insert writes layers without the two zero blocks at the end.
        SampleLayer::new(
            L::new().file("b", "b").finish_without_footer(),
            BlobCompression::Gzip,
        ),
    ]);
    assert_eq!(
        out,
        ["./ d 755 0:0", "./a f 644 0:0 =a", "./b f 644 0:0 =b"]
    );
}

#[test]
fn garbage_after_end_of_archive_is_ignored_but_hashed() {
    let mut tar = L::new().file("a", "a").finish();
    tar.extend_from_slice(b"trailing garbage that is not a tar header at all");
    // The diff_id covers the garbage too (SampleLayer hashes the whole tar).
    let out = flatten(&[SampleLayer::new(tar, BlobCompression::Zstd)]);
    assert_eq!(out, ["./ d 755 0:0", "./a f 644 0:0 =a"]);
}

#[test]
fn multi_member_gzip_is_read_to_the_end() {
    let tar = L::new()
        .file("first", "1")
        .file("second", "2")
        .file("third", "3")
        .finish();
    let (a, b) = tar.split_at(700);
    let mut blob = hakim_convert::sample::compress_blob(a, BlobCompression::Gzip);
    blob.extend(hakim_convert::sample::compress_blob(
        b,
        BlobCompression::Gzip,
    ));
    let layer = SampleLayer {
        tar: tar.clone(),
        blob,
        media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
    };
    let out = flatten(&[layer]);
    assert_eq!(
        non_dirs(&out),
        [
            "./first f 644 0:0 =1",
            "./second f 644 0:0 =2",
            "./third f 644 0:0 =3"
        ]
    );
}

#[test]
fn compression_is_told_by_magic_and_mismatch_warns() {
    let tar = L::new().file("z", "zstd inside").finish();
    let mut layer = SampleLayer::new(tar, BlobCompression::Zstd);
    layer.media_type = "application/vnd.oci.image.layer.v1.tar+gzip".into();
    let f = common::Fixture::new(&[layer]);
    let s = f.convert().unwrap();
    assert_eq!(
        non_dirs(&common::listing(&s.artifact)),
        ["./z f 644 0:0 =zstd inside"]
    );
    assert!(
        s.warnings
            .iter()
            .any(|w| w.contains("media type") && w.contains("Zstd")),
        "{:?}",
        s.warnings
    );
}

#[test]
fn layer_starting_with_a_whiteout_of_aufs_metadata() {
    let out = flatten(&[
        gz(L::new().file("a", "a")),
        gz(L::new()
            .file(".wh..wh.plnk/123.456", "")
            .file(".wh..wh.aufs", "")
            .file("b", "b")),
    ]);
    assert_eq!(non_dirs(&out), ["./a f 644 0:0 =a", "./b f 644 0:0 =b"]);
}

#[test]
fn unpadded_last_member_is_tolerated_but_short_data_is_not() {
    // Some umoci versions stop right after the last member's data, unpadded.
    let mut unpadded = L::new().file("c", "ccc").finish_without_footer();
    while unpadded.last() == Some(&0) {
        unpadded.pop();
    }
    assert_eq!(unpadded.len() % 512, 3);
    let out = flatten(&[
        gz(L::new().file("a", "a")),
        SampleLayer::new(unpadded, BlobCompression::Gzip),
    ]);
    assert_eq!(
        out,
        ["./ d 755 0:0", "./a f 644 0:0 =a", "./c f 644 0:0 =ccc"]
    );

    // Data that stops early is still a truncated layer.
    let mut short = L::new()
        .file("d", &"d".repeat(2000))
        .finish_without_footer();
    short.truncate(512 + 1000);
    let err = flatten_err(&[SampleLayer::new(short, BlobCompression::Plain)]);
    assert!(err.contains("truncated"), "{err}");
}

#[test]
fn xattr_values_may_contain_newlines() {
    // `setcap cap_dac_override,cap_fowner+ep` gives a blob holding byte 0x0a.
    let cap: &[u8] =
        b"\x01\x00\x00\x02\x0a\x00\x00\x00\x0a\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00";
    let xattrs: Vec<hakim_convert::tree::Xattr> = vec![
        (b"security.capability"[..].into(), cap.into()),
        (b"user.multi"[..].into(), b"line1\nline2\n"[..].into()),
    ];
    let f = common::Fixture::new(&[gz(L::new().owner(3_000_000, 0).entry(
        b"usr/bin/tool",
        hakim_convert::tarout::OutKind::File,
        0o755,
        None,
        b"x",
        &xattrs,
    ))]);
    let s = f.convert().unwrap();
    let mut ar = tar::Archive::new(std::fs::File::open(&s.artifact).unwrap());
    let mut seen = 0;
    for e in ar.entries().unwrap() {
        let e = e.unwrap();
        if e.path_bytes().as_ref() == b"./usr/bin/tool" {
            // The big uid sits in the same PAX header as the xattrs.
            assert_eq!(e.header().uid().unwrap(), 3_000_000);
            seen += 1;
        }
    }
    assert_eq!(seen, 1);
    let raw = std::fs::read(&s.artifact).unwrap();
    assert!(raw.windows(cap.len()).any(|w| w == cap));
    assert!(raw.windows(12).any(|w| w == b"line1\nline2\n"));
}

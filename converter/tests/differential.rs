//! Differential test: random layer stacks (files, directories, symlinks,
//! hardlinks, fifos, whiteouts, opaque markers, any order within a layer, few
//! names so they collide) go through the real streaming flattener and through
//! the simple reference model in `reference/`; the resulting trees must match
//! exactly — names, kinds, modes, contents, symlink targets and which names
//! share an inode — and when one refuses the stack, so must the other.
//!
//! `PROPTEST_CASES` overrides the number of stacks (default 3000).

mod reference;

use std::io::Read;

use hakim_convert::sample::{
    flatten_in_memory, in_memory_image, BlobCompression, LayerBuilder, SampleLayer,
};
use hakim_convert::tarout::OutKind;
use proptest::prelude::*;
use reference::{describe, Data, Inode, Model, Op};

const NAMES: [&str; 3] = ["a", "b", "c"];
const MODES: [u32; 5] = [0o755, 0o700, 0o644, 0o4755, 0o1777];

#[derive(Debug, Clone)]
enum Gen {
    Dir(Vec<String>, u32),
    File(Vec<String>, u32),
    Symlink(Vec<String>, String),
    Fifo(Vec<String>),
    /// Name, target, and (usually) which earlier non-directory to aim at
    /// instead, so most links have a target.
    Hardlink(Vec<String>, Vec<String>, Option<usize>),
    Whiteout(Vec<String>),
    Opaque(Vec<String>),
}

/// How a member name is spelled; all spellings mean the same path.
#[derive(Debug, Clone, Copy)]
enum Spelling {
    Plain,
    DotSlash,
    DoubleSlash,
}

fn path(max: usize) -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(
        prop::sample::select(&NAMES[..]).prop_map(String::from),
        1..=max,
    )
}

fn symlink_target() -> impl Strategy<Value = String> {
    (
        any::<bool>(),
        prop::collection::vec(prop::sample::select(&["a", "b", "c", "..", "."][..]), 1..=3),
    )
        .prop_map(|(absolute, parts)| {
            let rel = parts.join("/");
            if absolute {
                format!("/{rel}")
            } else {
                rel
            }
        })
}

fn mode() -> impl Strategy<Value = u32> {
    prop::sample::select(&MODES[..])
}

fn op() -> impl Strategy<Value = Gen> {
    prop_oneof![
        3 => (path(3), mode()).prop_map(|(p, m)| Gen::Dir(p, m)),
        1 => mode().prop_map(|m| Gen::Dir(Vec::new(), m)),
        4 => (path(3), mode()).prop_map(|(p, m)| Gen::File(p, m)),
        2 => (path(2), symlink_target()).prop_map(|(p, t)| Gen::Symlink(p, t)),
        1 => path(3).prop_map(Gen::Fifo),
        2 => (path(3), path(3), prop::option::weighted(0.95, any::<usize>()))
            .prop_map(|(p, t, pick)| Gen::Hardlink(p, t, pick)),
        2 => path(3).prop_map(Gen::Whiteout),
        1 => prop::collection::vec(prop::sample::select(&NAMES[..]).prop_map(String::from), 0..=2)
            .prop_map(Gen::Opaque),
    ]
}

fn layer() -> impl Strategy<Value = Vec<(Gen, Spelling)>> {
    let spelling = prop_oneof![
        Just(Spelling::Plain),
        Just(Spelling::DotSlash),
        Just(Spelling::DoubleSlash)
    ];
    prop::collection::vec((op(), spelling), 0..=10)
}

fn spell(p: &[String], s: Spelling, dir: bool) -> String {
    let mut name = match s {
        Spelling::Plain => p.join("/"),
        Spelling::DotSlash => format!("./{}", p.join("/")),
        Spelling::DoubleSlash => p.join("//"),
    };
    if name.is_empty() {
        name = "./".into();
    } else if dir {
        name.push('/');
    }
    name
}

fn marker(dir: &[String], name: &str) -> String {
    let mut p = dir.to_vec();
    p.push(name.to_string());
    p.join("/")
}

/// The layer tar and the same members as model operations. File contents are
/// unique, so a wrong winner or a wrong hardlink shows.
/// `earlier`: non-directory names that exist below this layer (link targets);
/// the layer's own are added as they come.
fn build(
    layer_no: usize,
    members: &[(Gen, Spelling)],
    mut earlier: Vec<Vec<String>>,
) -> (Vec<u8>, Vec<Op>) {
    let mut b = LayerBuilder::new();
    let mut ops = Vec::new();
    for (i, (g, s)) in members.iter().enumerate() {
        let s = *s;
        match g {
            Gen::Dir(p, m) => {
                b = b.dir(&spell(p, s, true), *m);
                ops.push(Op::Dir(p.clone(), *m));
            }
            Gen::File(p, m) => {
                let content = format!("L{layer_no}E{i}");
                b = b.file_mode(&spell(p, s, false), &content, *m);
                ops.push(Op::Node(
                    p.clone(),
                    Inode {
                        data: Data::File(content),
                        mode: *m,
                    },
                ));
                earlier.push(p.clone());
            }
            Gen::Symlink(p, t) => {
                b = b.symlink(&spell(p, s, false), t);
                ops.push(Op::Node(
                    p.clone(),
                    Inode {
                        data: Data::Symlink(t.clone()),
                        mode: 0o777,
                    },
                ));
            }
            Gen::Fifo(p) => {
                b = b.entry(
                    spell(p, s, false).as_bytes(),
                    OutKind::Fifo,
                    0o640,
                    None,
                    b"",
                    &[],
                );
                ops.push(Op::Node(
                    p.clone(),
                    Inode {
                        data: Data::Fifo,
                        mode: 0o640,
                    },
                ));
            }
            Gen::Hardlink(p, t, pick) => {
                let t = match pick {
                    Some(_) if earlier.is_empty() => continue,
                    Some(n) => earlier[n % earlier.len()].clone(),
                    None => t.clone(),
                };
                b = b.hardlink(&spell(p, s, false), &spell(&t, s, false));
                ops.push(Op::Hardlink(p.clone(), t));
            }
            Gen::Whiteout(p) => {
                let (name, dir) = p.split_last().expect("non-empty");
                b = b.whiteout(&p.join("/"));
                ops.push(Op::Whiteout(dir.to_vec(), name.clone()));
            }
            Gen::Opaque(dir) => {
                let name = marker(dir, ".wh..wh..opq");
                b = b.entry(name.as_bytes(), OutKind::File, 0o644, None, b"", &[]);
                ops.push(Op::Opaque(dir.clone()));
            }
        }
    }
    (b.finish(), ops)
}

/// The same listing as [`Model::listing`], read from the flattener's output.
fn listing_of(tar_bytes: &[u8]) -> Vec<String> {
    enum Seen {
        Dir(u32),
        Node(Data, u32),
        Link(String),
    }
    let mut members: Vec<(String, Seen)> = Vec::new();
    for e in tar::Archive::new(tar_bytes).entries().unwrap() {
        let mut e = e.unwrap();
        let raw = String::from_utf8(e.path_bytes().into_owned()).unwrap();
        let name = raw.trim_start_matches("./").trim_end_matches('/');
        let name = if name.is_empty() { "." } else { name }.to_string();
        let mode = e.header().mode().unwrap();
        let link = || String::from_utf8(e.link_name_bytes().unwrap().into_owned()).unwrap();
        let seen = match e.header().entry_type() {
            tar::EntryType::Directory => Seen::Dir(mode),
            tar::EntryType::Symlink => Seen::Node(Data::Symlink(link()), mode),
            tar::EntryType::Fifo => Seen::Node(Data::Fifo, mode),
            // Hardlink targets are member names: `./a`.
            tar::EntryType::Link => Seen::Link(link().trim_start_matches("./").to_string()),
            tar::EntryType::Regular => {
                let mut s = String::new();
                e.read_to_string(&mut s).unwrap();
                Seen::Node(Data::File(s), mode)
            }
            other => panic!("unexpected member type {other:?}"),
        };
        members.push((name, seen));
    }
    let mut groups: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for (name, seen) in &members {
        match seen {
            Seen::Node(..) => groups.entry(name.clone()).or_default().push(name.clone()),
            Seen::Link(t) => groups.entry(t.clone()).or_default().push(name.clone()),
            Seen::Dir(_) => {}
        }
    }
    let nodes: std::collections::BTreeMap<&str, (&Data, u32)> = members
        .iter()
        .filter_map(|(n, s)| match s {
            Seen::Node(d, m) => Some((n.as_str(), (d, *m))),
            _ => None,
        })
        .collect();
    let mut out = Vec::new();
    for (name, seen) in &members {
        out.push(match seen {
            Seen::Dir(mode) => format!("d {name} {mode:o}"),
            Seen::Node(data, mode) => describe(name, data, *mode, &groups[name]),
            Seen::Link(t) => {
                let (data, mode) = nodes[t.as_str()];
                describe(name, data, mode, &groups[t])
            }
        });
    }
    out.sort();
    out
}

/// How one stack went: compared trees, or both refused it.
fn check_stack(stack: &[Vec<(Gen, Spelling)>], compressions: &[u8]) -> Result<bool, TestCaseError> {
    let mut model = Model::new();
    let mut model_result = Ok(());
    let mut layers = Vec::new();
    for (i, members) in stack.iter().enumerate() {
        let (tar, ops) = build(i, members, model.non_directories());
        if model_result.is_ok() {
            model_result = model.apply_layer(&ops);
        }
        let how = match compressions[i % compressions.len()] {
            0 => BlobCompression::Plain,
            1 => BlobCompression::Gzip,
            _ => BlobCompression::Zstd,
        };
        layers.push(SampleLayer::new(tar, how));
    }
    let real = flatten_in_memory(&in_memory_image(&layers), None);
    match (model_result, real) {
        (Ok(()), Ok((tar, _))) => {
            prop_assert_eq!(listing_of(&tar), model.listing());
            Ok(true)
        }
        (Err(_), Err(_)) => Ok(false),
        (Ok(()), Err(e)) => Err(TestCaseError::fail(format!(
            "the flattener refused what the model accepts: {e:#}"
        ))),
        (Err(e), Ok(_)) => Err(TestCaseError::fail(format!(
            "the flattener accepted what the model refuses: {e:?}"
        ))),
    }
}

#[test]
fn flattener_matches_the_reference_model() {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(10_000);
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases,
        // Shrunk failures are printed; do not litter the source tree with them.
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let compared = std::cell::Cell::new(0u32);
    let strategy = (
        prop::collection::vec(layer(), 1..=5),
        prop::collection::vec(0u8..3, 5),
    );
    runner
        .run(&strategy, |(stack, compressions)| {
            if check_stack(&stack, &compressions)? {
                compared.set(compared.get() + 1);
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
    // A test that mostly sees refused stacks would prove little.
    let compared = compared.get();
    eprintln!("{compared} of {cases} stacks flattened and compared, the rest refused by both");
    assert!(
        compared * 2 >= cases,
        "only {compared} of {cases} stacks were accepted"
    );
}

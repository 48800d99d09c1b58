//! The promises a rootfs tar written by hakim-convert keeps, checked member by
//! member with the `tar` crate (not the converter's own reader). Any broken
//! promise panics, which the fuzzer reports as a crash.
//!
//! * the first member is `./`; every name is `./`-prefixed and already
//!   normalised (no `.`, `..`, empty or absolute components: it cannot leave
//!   the root);
//! * no name repeats, and no component is a whiteout (`.wh.*`);
//! * a member's parent directory is an earlier member;
//! * a hardlink's target is an earlier member that is neither a directory nor
//!   itself a hardlink;
//! * only directories, files, symlinks, hardlinks and fifos; file data is
//!   exactly as long as its header says;
//! * the counts agree with what `emit` reported.

use std::collections::{HashMap, HashSet};
use std::io::Read;

use hakim_convert::flatten::EmitStats;
use hakim_convert::path::RelPath;
use tar::EntryType;

/// What a member turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Seen {
    Dir,
    File,
    Symlink,
    Hardlink,
    Fifo,
}

fn shown(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `./a/b/` → `a/b`, asserting the name is in the form the converter writes.
fn normalised(name: &[u8], dir: bool) -> RelPath {
    let rest = name
        .strip_prefix(b"./")
        .unwrap_or_else(|| panic!("member name '{}' does not start with ./", shown(name)));
    let rest = if dir && !rest.is_empty() {
        rest.strip_suffix(b"/")
            .unwrap_or_else(|| panic!("directory '{}' lacks its trailing /", shown(name)))
    } else {
        rest
    };
    let path = RelPath::parse(rest)
        .unwrap_or_else(|e| panic!("member name '{}' escapes the root: {e}", shown(name)));
    assert_eq!(
        path.as_bytes(),
        rest,
        "member name '{}' is not normalised",
        shown(name)
    );
    for part in path.components() {
        assert!(
            !part.starts_with(b".wh."),
            "whiteout name '{}' reached the output",
            shown(name)
        );
    }
    path
}

/// Checks every promise; returns the number of members.
pub fn check(bytes: &[u8], stats: Option<&EmitStats>) -> usize {
    assert!(
        bytes.len() >= 1024 && bytes[bytes.len() - 1024..].iter().all(|&b| b == 0),
        "the tar does not end with the end-of-archive marker"
    );
    let mut archive = tar::Archive::new(bytes);
    let mut seen: HashMap<RelPath, Seen> = HashMap::new();
    let mut names: HashSet<Vec<u8>> = HashSet::new();
    let mut counts: HashMap<Seen, u64> = HashMap::new();
    let mut first = true;
    for entry in archive.entries().expect("the output is a tar") {
        let mut entry = entry.expect("every output member parses");
        let name = entry.path_bytes().into_owned();
        let ty = entry.header().entry_type();
        if first {
            assert!(
                name == b"./" && ty == EntryType::Directory,
                "the first member is '{}', not ./",
                shown(&name)
            );
            first = false;
        }
        let kind = match ty {
            EntryType::Directory => Seen::Dir,
            EntryType::Regular => Seen::File,
            EntryType::Symlink => Seen::Symlink,
            EntryType::Link => Seen::Hardlink,
            EntryType::Fifo => Seen::Fifo,
            other => panic!("member '{}' has type {other:?}", shown(&name)),
        };
        let path = normalised(&name, kind == Seen::Dir);
        assert!(
            names.insert(path.to_bytes()),
            "'{}' appears twice",
            shown(&name)
        );
        if let Some(parent) = path.parent() {
            assert_eq!(
                seen.get(&parent),
                Some(&Seen::Dir),
                "'{}' comes before its parent directory",
                shown(&name)
            );
        }
        match kind {
            Seen::Hardlink => {
                let target = entry
                    .link_name_bytes()
                    .expect("a hardlink has a target")
                    .into_owned();
                let target = normalised(&target, false);
                match seen.get(&target) {
                    Some(Seen::Dir) | Some(Seen::Hardlink) | None => panic!(
                        "hardlink '{}' to '{target}', which is not an earlier file",
                        shown(&name)
                    ),
                    Some(_) => {}
                }
            }
            Seen::Symlink => {
                let target = entry.link_name_bytes().expect("a symlink has a target");
                assert!(!target.contains(&0), "symlink target with NUL");
            }
            Seen::File => {
                let size = entry.header().size().expect("size");
                let mut data = Vec::new();
                entry.read_to_end(&mut data).expect("file data");
                assert_eq!(data.len() as u64, size, "'{}' data length", shown(&name));
            }
            Seen::Dir | Seen::Fifo => {}
        }
        if path.is_root() && kind == Seen::Dir {
            assert!(seen.is_empty(), "./ appears after other members");
        }
        seen.insert(path, kind);
        *counts.entry(kind).or_default() += 1;
    }
    assert!(!first, "the output has no members");
    if let Some(s) = stats {
        let n = |k| counts.get(&k).copied().unwrap_or(0);
        assert_eq!(s.entries, seen.len() as u64, "entries count");
        assert_eq!(s.directories, n(Seen::Dir), "directory count");
        assert_eq!(s.files, n(Seen::File), "file count");
        assert_eq!(s.symlinks, n(Seen::Symlink), "symlink count");
        assert_eq!(s.hardlinks, n(Seen::Hardlink), "hardlink count");
        assert_eq!(s.fifos, n(Seen::Fifo), "fifo count");
    }
    seen.len()
}

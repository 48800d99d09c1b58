//! The promises a rootfs tar written by hakim-convert keeps, checked member by
//! member with a small reader of its own (neither the converter's nor the `tar`
//! crate's). Any broken promise panics, which the fuzzer reports as a crash.
//!
//! * the first member is `./`; every name is `./`-prefixed and already
//!   normalised (no `.`, `..`, empty or absolute components: it cannot leave
//!   the root);
//! * no name repeats, and no component is a whiteout (`.wh.*`);
//! * a member's parent directory is an earlier member;
//! * a hardlink's target is an earlier member that is neither a directory nor
//!   itself a hardlink;
//! * only directories, files (sparse files as old GNU sparse members whose
//!   map is ordered, inside the file and matches the data stored), symlinks,
//!   hardlinks and fifos; headers and their checksums are valid ustar (GNU for
//!   sparse members), and the archive ends with its marker;
//! * the only PAX records besides names, ids and times are `user.*` and
//!   `security.capability` xattrs;
//! * the counts agree with what `emit` reported.

use std::collections::{HashMap, HashSet};

use hakim_convert::flatten::EmitStats;
use hakim_convert::path::RelPath;

/// A member as this module's own reader sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub name: Vec<u8>,
    /// The ustar type flag (`0` file, `1` hardlink, `2` symlink, `5` directory, `6` fifo).
    pub kind: u8,
    pub mode: u64,
    pub uid: u64,
    pub gid: u64,
    pub mtime: u64,
    pub link: Vec<u8>,
    /// The data stored (for a sparse file: its chunks back to back).
    pub data: Vec<u8>,
    /// A sparse file's real size and `(offset, length)` map.
    pub sparse: Option<(u64, Vec<(u64, u64)>)>,
    /// PAX records of the member other than the ones folded into the fields.
    pub records: Vec<(Vec<u8>, Vec<u8>)>,
}

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

fn octal(field: &[u8]) -> u64 {
    let text: Vec<u8> = field
        .iter()
        .copied()
        .take_while(|&b| b != 0 && b != b' ')
        .collect();
    if text.is_empty() {
        return 0;
    }
    u64::from_str_radix(std::str::from_utf8(&text).expect("ASCII"), 8)
        .unwrap_or_else(|_| panic!("bad octal field {:?}", shown(field)))
}

/// A numeric field that may be GNU base-256 (sparse members' sizes and map).
fn number(field: &[u8]) -> u64 {
    if field[0] & 0x80 == 0 {
        return octal(field);
    }
    field[1..].iter().fold((field[0] & 0x7f) as u64, |v, &b| {
        v.checked_mul(256)
            .and_then(|v| v.checked_add(b as u64))
            .expect("base-256 fits 64 bits")
    })
}

/// The map of an old GNU sparse header and its extension blocks (which start
/// at `ext`): real size, pairs, number of extension blocks.
fn sparse_map(h: &[u8], ext: &[u8]) -> (u64, Vec<(u64, u64)>, usize) {
    let mut pairs = Vec::new();
    let mut add = |pair: &[u8]| {
        if pair.iter().any(|&b| b != 0) {
            pairs.push((number(&pair[..12]), number(&pair[12..24])));
        }
    };
    h[386..482].chunks(24).for_each(&mut add);
    let mut blocks = 0;
    let mut extended = h[482];
    while extended != 0 {
        assert_eq!(extended, 1, "isextended flag");
        let block = ext
            .get(blocks * 512..(blocks + 1) * 512)
            .expect("sparse extension block");
        block[..504].chunks(24).for_each(&mut add);
        extended = block[504];
        blocks += 1;
    }
    (number(&h[483..495]), pairs, blocks)
}

fn cstr(field: &[u8]) -> &[u8] {
    &field[..field.iter().position(|&b| b == 0).unwrap_or(field.len())]
}

/// PAX records, by their length prefixes (values may hold newlines).
fn pax_records(mut data: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let space = data.iter().position(|&b| b == b' ').expect("PAX length");
        let len: usize = std::str::from_utf8(&data[..space])
            .ok()
            .and_then(|s| s.parse().ok())
            .expect("PAX length is a number");
        let record = &data[space + 1..len];
        assert_eq!(
            record.last(),
            Some(&b'\n'),
            "PAX record ends with a newline"
        );
        let record = &record[..record.len() - 1];
        let eq = record
            .iter()
            .position(|&b| b == b'=')
            .expect("PAX key=value");
        out.push((record[..eq].to_vec(), record[eq + 1..].to_vec()));
        data = &data[len..];
    }
    out
}

/// Reads a tar as the converter writes it (ustar headers, PAX `x` records),
/// verifying header checksums and the end-of-archive marker. Independent of
/// both the converter's reader and the `tar` crate, which splits PAX data on
/// newlines.
pub fn read(bytes: &[u8]) -> Vec<Member> {
    let mut out = Vec::new();
    let mut pos = 0;
    let mut pending: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    loop {
        let h = bytes
            .get(pos..pos + 512)
            .expect("the tar ends with the end-of-archive marker");
        if h.iter().all(|&b| b == 0) {
            assert!(pending.is_empty(), "PAX header without a member");
            assert!(
                bytes[pos..].iter().all(|&b| b == 0) && bytes.len() - pos == 1024,
                "the tar does not end right after its end-of-archive marker"
            );
            return out;
        }
        let mut copy = h.to_vec();
        copy[148..156].fill(b' ');
        let sum: u64 = copy.iter().map(|&b| b as u64).sum();
        assert_eq!(octal(&h[148..156]), sum, "header checksum at {pos}");
        let sparse = (h[156] == b'S').then(|| {
            assert_eq!(&h[257..265], b"ustar  \0", "GNU magic at {pos}");
            sparse_map(h, &bytes[pos + 512..])
        });
        if sparse.is_none() {
            assert_eq!(&h[257..265], b"ustar\x0000", "ustar magic at {pos}");
        }
        let size = number(&h[124..136]);
        let ext_blocks = sparse.as_ref().map_or(0, |s| s.2);
        let data_start = pos + 512 * (1 + ext_blocks);
        let data_end = data_start + size as usize;
        let data = bytes.get(data_start..data_end).expect("member data");
        pos = data_start + (size as usize).div_ceil(512) * 512;
        if h[156] == b'x' {
            pending.extend(pax_records(data));
            continue;
        }
        // GNU headers have no prefix field (atime, ctime and the map sit there).
        let prefix = if sparse.is_some() {
            &[][..]
        } else {
            cstr(&h[345..500])
        };
        let mut m = Member {
            name: if prefix.is_empty() {
                cstr(&h[..100]).to_vec()
            } else {
                [prefix, b"/", cstr(&h[..100])].concat()
            },
            kind: h[156],
            mode: octal(&h[100..108]),
            uid: octal(&h[108..116]),
            gid: octal(&h[116..124]),
            mtime: octal(&h[136..148]),
            link: cstr(&h[157..257]).to_vec(),
            data: data.to_vec(),
            sparse: sparse.map(|(real, pairs, _)| (real, pairs)),
            records: Vec::new(),
        };
        let number = |v: &[u8]| -> u64 { shown(v).parse().expect("a PAX number") };
        for (k, v) in pending.drain(..) {
            match k.as_slice() {
                b"path" => m.name = v,
                b"linkpath" => m.link = v,
                b"uid" => m.uid = number(&v),
                b"gid" => m.gid = number(&v),
                b"mtime" => m.mtime = number(&v),
                b"size" => panic!("PAX size records are not expected in a rootfs"),
                _ => m.records.push((k, v)),
            }
        }
        out.push(m);
    }
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

/// Checks every promise; returns the members.
pub fn check(bytes: &[u8], stats: Option<&EmitStats>) -> Vec<Member> {
    let members = read(bytes);
    let mut seen: HashMap<RelPath, Seen> = HashMap::new();
    let mut names: HashSet<Vec<u8>> = HashSet::new();
    let mut counts: HashMap<Seen, u64> = HashMap::new();
    for (i, m) in members.iter().enumerate() {
        let name = &m.name;
        if let Some((real, pairs)) = &m.sparse {
            // Data chunks in order, inside the file, the stored data exactly;
            // an empty chunk only last, at the real size (a trailing hole).
            let mut end = 0;
            for (i, &(offset, len)) in pairs.iter().enumerate() {
                assert!(offset >= end, "'{}': sparse map out of order", shown(name));
                end = offset.checked_add(len).expect("sparse chunk end");
                assert!(
                    end <= *real,
                    "'{}': sparse chunk past the file",
                    shown(name)
                );
                assert!(
                    len > 0 || (i + 1 == pairs.len() && offset == *real),
                    "'{}': empty sparse chunk inside the map",
                    shown(name)
                );
            }
            assert_eq!(
                end,
                *real,
                "'{}': sparse map does not reach its size",
                shown(name)
            );
            let stored: u64 = pairs.iter().map(|p| p.1).sum();
            assert_eq!(
                stored,
                m.data.len() as u64,
                "'{}': sparse data",
                shown(name)
            );
        }
        let kind = match m.kind {
            b'5' => Seen::Dir,
            b'0' | b'S' => Seen::File,
            b'2' => Seen::Symlink,
            b'1' => Seen::Hardlink,
            b'6' => Seen::Fifo,
            other => panic!("member '{}' has type {:?}", shown(name), other as char),
        };
        if i == 0 {
            assert!(
                name == b"./" && kind == Seen::Dir,
                "the first member is '{}', not ./",
                shown(name)
            );
        }
        assert!(
            kind == Seen::File || m.data.is_empty(),
            "'{}' carries data",
            shown(name)
        );
        let path = normalised(name, kind == Seen::Dir);
        assert!(i == 0 || !path.is_root(), "./ appears after other members");
        assert!(
            names.insert(path.to_bytes()),
            "'{}' appears twice",
            shown(name)
        );
        if let Some(parent) = path.parent() {
            assert_eq!(
                seen.get(&parent),
                Some(&Seen::Dir),
                "'{}' comes before its parent directory",
                shown(name)
            );
        }
        match kind {
            Seen::Hardlink => {
                let target = normalised(&m.link, false);
                match seen.get(&target) {
                    Some(Seen::Dir) | Some(Seen::Hardlink) | None => panic!(
                        "hardlink '{}' to '{target}', which is not an earlier file",
                        shown(name)
                    ),
                    Some(_) => {}
                }
            }
            Seen::Symlink => assert!(!m.link.contains(&0), "symlink target with NUL"),
            _ => assert!(m.link.is_empty(), "'{}' has a link target", shown(name)),
        }
        for (k, _) in &m.records {
            let xattr = k
                .strip_prefix(b"SCHILY.xattr.")
                .unwrap_or_else(|| panic!("'{}': unexpected PAX record {}", shown(name), shown(k)));
            assert!(
                xattr.starts_with(b"user.") || xattr == b"security.capability",
                "'{}': xattr {} reached the output",
                shown(name),
                shown(xattr)
            );
        }
        seen.insert(path, kind);
        *counts.entry(kind).or_default() += 1;
    }
    assert!(!members.is_empty(), "the output has no members");
    if let Some(s) = stats {
        let n = |k| counts.get(&k).copied().unwrap_or(0);
        assert_eq!(s.entries, members.len() as u64, "entries count");
        assert_eq!(s.directories, n(Seen::Dir), "directory count");
        assert_eq!(s.files, n(Seen::File), "file count");
        assert_eq!(s.symlinks, n(Seen::Symlink), "symlink count");
        assert_eq!(s.hardlinks, n(Seen::Hardlink), "hardlink count");
        assert_eq!(s.fifos, n(Seen::Fifo), "fifo count");
    }
    members
}

/// Panics showing the first differing members when `a` and `b` differ.
pub fn assert_same(a: &[u8], b: &[u8], what: &str) {
    if a == b {
        return;
    }
    let (la, lb) = (read(a), read(b));
    let first = la.iter().zip(&lb).position(|(x, y)| x != y);
    panic!(
        "{what}: {} vs {} members; first difference at {first:?}:\n  {:?}\n  {:?}",
        la.len(),
        lb.len(),
        first.map(|i| &la[i]),
        first.map(|i| &lb[i]),
    );
}

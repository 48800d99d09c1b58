//! Snapshot of an extracted root file system and a readable comparison of two snapshots.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// File type as seen by `lstat`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Symlink,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Dir => "directory",
            Kind::File => "regular file",
            Kind::Symlink => "symlink",
            Kind::Fifo => "fifo",
            Kind::Socket => "socket",
            Kind::CharDevice => "char device",
            Kind::BlockDevice => "block device",
        })
    }
}

/// What the tests compare for one path.
#[derive(Clone, Debug)]
pub struct Entry {
    pub kind: Kind,
    /// Permission bits including setuid, setgid and sticky (`st_mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Regular files only.
    pub size: Option<u64>,
    /// Regular files only.
    pub sha256: Option<String>,
    /// Symlinks only, verbatim.
    pub target: Option<PathBuf>,
    /// Only `user.*` and `security.capability`: the xattrs Proxmox's tar restores.
    pub xattrs: BTreeMap<String, Vec<u8>>,
    pub mtime: i64,
    pub rdev: u64,
    ino: (u64, u64),
}

/// A scanned tree: relative path (`.` is the root) → entry, plus hardlink groups.
pub struct Tree {
    pub root: PathBuf,
    pub entries: BTreeMap<PathBuf, Entry>,
    /// For every non-directory path that shares its inode with other paths in the tree: the
    /// whole group (sorted, including the path itself).
    pub links: BTreeMap<PathBuf, Vec<PathBuf>>,
}

/// Keep only the xattrs that survive Proxmox's extraction
/// (`--xattrs-include=user.* --xattrs-include=security.capability`).
pub fn kept_xattr(name: &str) -> bool {
    name.starts_with("user.") || name == "security.capability"
}

impl Tree {
    /// Scan `root` recursively without following symlinks. `skip(rel, entry)` returning true
    /// leaves the path out (and, for directories, everything below it).
    pub fn scan(root: &Path, skip: &dyn Fn(&Path, &Entry) -> bool) -> Tree {
        let mut entries = BTreeMap::new();
        let mut stack = vec![PathBuf::from(".")];
        while let Some(rel) = stack.pop() {
            let abs = root.join(&rel);
            let entry = read_entry(&abs);
            if rel != Path::new(".") && skip(&rel, &entry) {
                continue;
            }
            if entry.kind == Kind::Dir {
                let rd = fs::read_dir(&abs)
                    .unwrap_or_else(|e| panic!("read_dir {}: {e}", abs.display()));
                for child in rd {
                    let child = child.expect("dir entry");
                    let child_rel = if rel == Path::new(".") {
                        PathBuf::from(child.file_name())
                    } else {
                        rel.join(child.file_name())
                    };
                    stack.push(child_rel);
                }
            }
            entries.insert(rel, entry);
        }
        let mut by_inode: BTreeMap<(u64, u64), Vec<PathBuf>> = BTreeMap::new();
        for (path, e) in &entries {
            if e.kind != Kind::Dir {
                by_inode.entry(e.ino).or_default().push(path.clone());
            }
        }
        let mut links = BTreeMap::new();
        for group in by_inode.into_values().filter(|g| g.len() > 1) {
            for p in &group {
                links.insert(p.clone(), group.clone());
            }
        }
        Tree {
            root: root.to_path_buf(),
            entries,
            links,
        }
    }

    pub fn get(&self, rel: &str) -> Option<&Entry> {
        self.entries.get(Path::new(rel))
    }

    /// The hardlink group of `rel` (empty if it has a single name).
    pub fn link_group(&self, rel: &str) -> Vec<String> {
        self.links
            .get(Path::new(rel))
            .map(|g| g.iter().map(|p| p.display().to_string()).collect())
            .unwrap_or_default()
    }
}

fn read_entry(abs: &Path) -> Entry {
    let md = fs::symlink_metadata(abs).unwrap_or_else(|e| panic!("lstat {}: {e}", abs.display()));
    let ft = md.file_type();
    let kind = if ft.is_dir() {
        Kind::Dir
    } else if ft.is_file() {
        Kind::File
    } else if ft.is_symlink() {
        Kind::Symlink
    } else if ft.is_fifo() {
        Kind::Fifo
    } else if ft.is_socket() {
        Kind::Socket
    } else if ft.is_char_device() {
        Kind::CharDevice
    } else {
        Kind::BlockDevice
    };
    let (size, sha256) = if kind == Kind::File {
        (Some(md.len()), Some(hash_file(abs)))
    } else {
        (None, None)
    };
    let target = (kind == Kind::Symlink)
        .then(|| fs::read_link(abs).unwrap_or_else(|e| panic!("readlink {}: {e}", abs.display())));
    let mut xattrs = BTreeMap::new();
    // user.* xattrs cannot exist on symlinks or special files; listing them still works.
    if let Ok(names) = xattr::list(abs) {
        for name in names {
            let name_s = name.to_string_lossy().into_owned();
            if kept_xattr(&name_s) {
                let value = xattr::get(abs, &name).ok().flatten().unwrap_or_default();
                xattrs.insert(name_s, value);
            }
        }
    }
    Entry {
        kind,
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        size,
        sha256,
        target,
        xattrs,
        mtime: md.mtime(),
        rdev: md.rdev(),
        ino: (md.dev(), md.ino()),
    }
}

fn hash_file(path: &Path) -> String {
    let mut f = fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = f.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex::encode(h.finalize())
}

/// How modification times are compared.
#[derive(Clone, Copy, Debug)]
pub enum Mtime {
    /// Not compared.
    Ignore,
    /// Equal to the oracle's.
    Exact,
    /// `SOURCE_DATE_EPOCH` clamping: `min(oracle, epoch)`.
    ClampedTo(i64),
}

/// What to compare besides path, type, mode, owner, size, content, link target, xattrs and
/// hardlink groups (always compared).
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Regular files, symlinks, fifos.
    pub mtime: Mtime,
    /// Directories (tracked separately: whiteouts applied by an unpacker touch them).
    pub dir_mtime: Mtime,
}

fn show_path(p: &Path) -> String {
    if p == Path::new(".") {
        return "/ (root)".to_string();
    }
    match std::str::from_utf8(p.as_os_str().as_bytes()) {
        Ok(s) => format!("/{s}"),
        Err(_) => format!("{:?}", p.as_os_str()),
    }
}

fn show_value(v: Option<&Vec<u8>>) -> String {
    match v {
        None => "<absent>".to_string(),
        Some(v) => match std::str::from_utf8(v) {
            Ok(s) if !s.chars().any(char::is_control) => format!("{s:?}"),
            _ if v.len() > 40 => format!(
                "0x{}…({} bytes, sha256 {})",
                hex::encode(&v[..16]),
                v.len(),
                &hex::encode(Sha256::digest(v))[..12]
            ),
            _ => format!("0x{}", hex::encode(v)),
        },
    }
}

/// One difference between the oracle and the artifact.
#[derive(Clone, Debug)]
pub struct Difference {
    pub path: PathBuf,
    /// Short category used for the summary: `missing`, `extra`, `type`, `mode`, `owner`,
    /// `content`, `symlink`, `device`, `xattr`, `mtime`, `hardlinks`.
    pub what: &'static str,
    pub detail: String,
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", show_path(&self.path), self.detail)
    }
}

/// All differences between `expected` (the oracle) and `actual` (the extracted artifact), in
/// path order.
pub fn diff(expected: &Tree, actual: &Tree, opts: Options) -> Vec<Difference> {
    let mut out = Vec::new();
    let paths: BTreeSet<&PathBuf> = expected
        .entries
        .keys()
        .chain(actual.entries.keys())
        .collect();
    for path in paths {
        let mut push = |what: &'static str, detail: String| {
            out.push(Difference {
                path: path.clone(),
                what,
                detail,
            })
        };
        let (e, a) = match (expected.entries.get(path), actual.entries.get(path)) {
            (Some(e), Some(a)) => (e, a),
            (Some(e), None) => {
                push(
                    "missing",
                    format!("missing in artifact (oracle has a {})", e.kind),
                );
                continue;
            }
            (None, Some(a)) => {
                push(
                    "extra",
                    format!("extra in artifact ({}, absent in oracle)", a.kind),
                );
                continue;
            }
            (None, None) => unreachable!(),
        };
        if e.kind != a.kind {
            push("type", format!("type: expected {}, got {}", e.kind, a.kind));
            continue;
        }
        if e.mode != a.mode {
            push(
                "mode",
                format!("mode: expected {:04o}, got {:04o}", e.mode, a.mode),
            );
        }
        if (e.uid, e.gid) != (a.uid, a.gid) {
            push(
                "owner",
                format!(
                    "owner: expected {}:{}, got {}:{}",
                    e.uid, e.gid, a.uid, a.gid
                ),
            );
        }
        if e.size != a.size {
            push(
                "content",
                format!(
                    "size: expected {}, got {}",
                    e.size.unwrap_or(0),
                    a.size.unwrap_or(0)
                ),
            );
        } else if e.sha256 != a.sha256 {
            push(
                "content",
                format!(
                    "content: expected sha256 {}, got {}",
                    e.sha256.as_deref().unwrap_or("-"),
                    a.sha256.as_deref().unwrap_or("-")
                ),
            );
        }
        if e.target != a.target {
            push(
                "symlink",
                format!(
                    "symlink target: expected {:?}, got {:?}",
                    e.target.as_deref().unwrap_or(Path::new("")),
                    a.target.as_deref().unwrap_or(Path::new(""))
                ),
            );
        }
        if matches!(e.kind, Kind::CharDevice | Kind::BlockDevice) && e.rdev != a.rdev {
            push(
                "device",
                format!("device number: expected {}, got {}", e.rdev, a.rdev),
            );
        }
        let names: BTreeSet<&String> = e.xattrs.keys().chain(a.xattrs.keys()).collect();
        for name in names {
            let (ev, av) = (e.xattrs.get(name), a.xattrs.get(name));
            if ev != av {
                push(
                    "xattr",
                    format!(
                        "xattr {name}: expected {}, got {}",
                        show_value(ev),
                        show_value(av)
                    ),
                );
            }
        }
        let rule = if e.kind == Kind::Dir {
            opts.dir_mtime
        } else {
            opts.mtime
        };
        let want = match rule {
            Mtime::Ignore => None,
            Mtime::Exact => Some(e.mtime),
            Mtime::ClampedTo(epoch) => Some(e.mtime.min(epoch)),
        };
        if let Some(want) = want {
            if want != a.mtime {
                push(
                    "mtime",
                    format!(
                        "mtime ({}): expected {want}{}, got {}",
                        e.kind,
                        if want != e.mtime { " (clamped)" } else { "" },
                        a.mtime
                    ),
                );
            }
        }
        let eg = expected.links.get(path);
        let ag = actual.links.get(path);
        if eg != ag {
            let show = |g: Option<&Vec<PathBuf>>| match g {
                None => "no other names".to_string(),
                Some(g) => g
                    .iter()
                    .map(|x| show_path(x))
                    .collect::<Vec<_>>()
                    .join(" = "),
            };
            push(
                "hardlinks",
                format!("hardlinks: expected {}, got {}", show(eg), show(ag)),
            );
        }
    }
    out
}

/// Panic with a per-category summary and the first 50 differences (mtime differences last, so
/// a flood of them cannot hide anything else) if the trees differ.
pub fn assert_same(expected: &Tree, actual: &Tree, opts: Options, what: &str) {
    let mut d = diff(expected, actual, opts);
    if d.is_empty() {
        eprintln!(
            "{what}: all {} paths identical to the oracle",
            expected.entries.len()
        );
        return;
    }
    let mut summary: BTreeMap<&str, usize> = BTreeMap::new();
    for x in &d {
        *summary.entry(x.what).or_default() += 1;
    }
    let summary: Vec<String> = summary.iter().map(|(k, n)| format!("{k} {n}")).collect();
    d.sort_by_key(|x| x.what == "mtime");
    let mut msg = format!(
        "{what}: {} difference(s) between the oracle ({}, {} paths) and the extracted artifact \
         ({}, {} paths)\nby kind: {}\nfirst {}:\n",
        d.len(),
        expected.root.display(),
        expected.entries.len(),
        actual.root.display(),
        actual.entries.len(),
        summary.join(", "),
        d.len().min(50)
    );
    for x in d.iter().take(50) {
        msg.push_str(&format!("  {x}\n"));
    }
    panic!("{msg}");
}

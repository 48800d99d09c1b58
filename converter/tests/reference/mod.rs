//! A deliberately simple reference model of applying OCI layers, for the
//! differential test. Written from the layer rules (image-spec `layer.md`,
//! docs/converter.md "Layer rules"), not from `tree.rs`: the whole filesystem
//! is one sorted map from path to entry, every operation is a handful of map
//! edits, and speed does not matter.
//!
//! Rules applied, per layer, in this order:
//! 1. every `.wh.NAME` and `.wh..wh..opq` marker of the layer, wherever it
//!    sits in the layer: remove NAME (with everything below it) / every child
//!    of the directory, as they are in the lower layers;
//! 2. the other members in stream order: a directory over a directory changes
//!    only its metadata; anything else replaces the whole old subtree; missing
//!    parents are created (0755), a non-directory in the way becomes one;
//!    parents are resolved through symlinks inside the root (`..` stops at
//!    `/`, absolute targets restart at `/`, more than 40 hops is an error);
//! 3. a hardlink names the target's inode: it keeps that content even if the
//!    target is replaced or whited out later. A target removed by this layer's
//!    own markers is still found by its name as written.

use std::collections::BTreeMap;

/// A path as its components; the root is empty.
pub type Path = Vec<String>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Data {
    File(String),
    Symlink(String),
    Fifo,
}

/// What a non-directory name points to (shared by hardlinks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inode {
    pub data: Data,
    pub mode: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    Dir { mode: u32 },
    Inode(usize),
}

/// One member of a layer, already normalised.
#[derive(Debug, Clone)]
pub enum Op {
    Dir(Path, u32),
    Node(Path, Inode),
    Hardlink(Path, Path),
    Whiteout(Path, String),
    Opaque(Path),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelError {
    SymlinkLoop,
    LinkTargetMissing,
    LinkToDirectory,
}

const MAX_HOPS: usize = 40;
const IMPLICIT_DIR: Entry = Entry::Dir { mode: 0o755 };

pub struct Model {
    /// Every path but the root.
    pub entries: BTreeMap<Path, Entry>,
    pub root_mode: u32,
    pub inodes: Vec<Inode>,
    /// What this layer's markers removed: path → inode.
    removed: BTreeMap<Path, usize>,
}

fn child(dir: &[String], name: &str) -> Path {
    let mut p = dir.to_vec();
    p.push(name.to_string());
    p
}

impl Model {
    pub fn new() -> Self {
        Model {
            entries: BTreeMap::new(),
            root_mode: 0o755,
            inodes: Vec::new(),
            removed: BTreeMap::new(),
        }
    }

    fn is_dir(&self, p: &[String]) -> bool {
        p.is_empty() || matches!(self.entries.get(p), Some(Entry::Dir { .. }))
    }

    /// Removes `p` and everything below it; `remember` keeps the removed
    /// non-directories for same-layer hardlinks.
    fn remove_tree(&mut self, p: &[String], remember: bool) {
        let doomed: Vec<Path> = self
            .entries
            .keys()
            .filter(|k| k.starts_with(p))
            .cloned()
            .collect();
        for k in doomed {
            if let Some(Entry::Inode(i)) = self.entries.remove(&k) {
                if remember {
                    self.removed.insert(k, i);
                }
            }
        }
    }

    /// Follows `parts` from the root the way the kernel follows a path inside a
    /// chroot. `create`: make missing directories and replace non-directories
    /// in the way; otherwise a missing one gives `None` (the last component may
    /// be anything).
    fn walk(&mut self, parts: &[String], create: bool) -> Result<Option<Path>, ModelError> {
        let mut todo: Vec<String> = parts.iter().rev().cloned().collect();
        let mut cur: Path = Vec::new();
        let mut hops = 0;
        while let Some(part) = todo.pop() {
            if part == ".." {
                cur.pop();
                continue;
            }
            let next = child(&cur, &part);
            match self.entries.get(&next).copied() {
                None if create => {
                    self.entries.insert(next.clone(), IMPLICIT_DIR);
                    cur = next;
                }
                None => return Ok(None),
                Some(Entry::Dir { .. }) => cur = next,
                Some(Entry::Inode(i)) => match self.inodes[i].data.clone() {
                    Data::Symlink(target) => {
                        hops += 1;
                        if hops > MAX_HOPS {
                            return Err(ModelError::SymlinkLoop);
                        }
                        if target.starts_with('/') {
                            cur.clear();
                        }
                        for seg in target.split('/').rev() {
                            if !seg.is_empty() && seg != "." {
                                todo.push(seg.to_string());
                            }
                        }
                    }
                    _ if !create && todo.is_empty() => cur = next,
                    _ if !create => return Ok(None),
                    _ => {
                        self.remove_tree(&next, false);
                        self.entries.insert(next.clone(), IMPLICIT_DIR);
                        cur = next;
                    }
                },
            }
        }
        Ok(Some(cur))
    }

    /// The entry named by `p`, its last component not followed.
    fn lookup(&mut self, p: &[String]) -> Result<Option<Entry>, ModelError> {
        let Some((name, parent)) = p.split_last() else {
            return Ok(Some(Entry::Dir {
                mode: self.root_mode,
            }));
        };
        let Some(dir) = self.walk(parent, false)? else {
            return Ok(None);
        };
        Ok(self.entries.get(&child(&dir, name)).copied())
    }

    fn place(&mut self, p: &[String], entry: Entry) -> Result<(), ModelError> {
        let Some((name, parent)) = p.split_last() else {
            if let Entry::Dir { mode } = entry {
                self.root_mode = mode;
            }
            return Ok(());
        };
        let dir = self.walk(parent, true)?.expect("created");
        let at = child(&dir, name);
        match (self.entries.get(&at).copied(), entry) {
            (Some(Entry::Dir { .. }), Entry::Dir { mode }) => {
                self.entries.insert(at, Entry::Dir { mode });
            }
            (Some(old), new) if old == new => {}
            (_, new) => {
                self.remove_tree(&at, false);
                self.entries.insert(at, new);
            }
        }
        Ok(())
    }

    pub fn apply_layer(&mut self, ops: &[Op]) -> Result<(), ModelError> {
        self.removed.clear();
        for op in ops {
            match op {
                Op::Whiteout(dir, name) => {
                    if let Some(d) = self.walk(dir, false)? {
                        if self.is_dir(&d) {
                            self.remove_tree(&child(&d, name), true);
                        }
                    }
                }
                Op::Opaque(dir) => {
                    if let Some(d) = self.walk(dir, false)? {
                        if self.is_dir(&d) {
                            let children: Vec<Path> = self
                                .entries
                                .keys()
                                .filter(|k| k.len() == d.len() + 1 && k.starts_with(&d))
                                .cloned()
                                .collect();
                            for c in children {
                                self.remove_tree(&c, true);
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        for op in ops {
            match op {
                Op::Dir(p, mode) => self.place(p, Entry::Dir { mode: *mode })?,
                Op::Node(p, inode) => {
                    self.inodes.push(inode.clone());
                    self.place(p, Entry::Inode(self.inodes.len() - 1))?;
                }
                Op::Hardlink(p, target) => {
                    let inode = match self.lookup(target)? {
                        Some(Entry::Inode(i)) => i,
                        Some(Entry::Dir { .. }) => return Err(ModelError::LinkToDirectory),
                        None => *self
                            .removed
                            .get(target)
                            .ok_or(ModelError::LinkTargetMissing)?,
                    };
                    if !p.is_empty() {
                        self.place(p, Entry::Inode(inode))?;
                    }
                }
                Op::Whiteout(..) | Op::Opaque(_) => {}
            }
        }
        Ok(())
    }

    /// Paths of everything but directories.
    pub fn non_directories(&self) -> Vec<Path> {
        self.entries
            .iter()
            .filter(|(_, e)| matches!(e, Entry::Inode(_)))
            .map(|(p, _)| p.clone())
            .collect()
    }

    /// One line per path, sorted: `d path mode`, or for a non-directory its
    /// data, mode and every name sharing its inode.
    pub fn listing(&self) -> Vec<String> {
        let mut names: BTreeMap<usize, Vec<String>> = BTreeMap::new();
        for (p, e) in &self.entries {
            if let Entry::Inode(i) = e {
                names.entry(*i).or_default().push(p.join("/"));
            }
        }
        let mut out = vec![format!("d . {:o}", self.root_mode)];
        for (p, e) in &self.entries {
            let path = p.join("/");
            out.push(match e {
                Entry::Dir { mode } => format!("d {path} {mode:o}"),
                Entry::Inode(i) => {
                    let inode = &self.inodes[*i];
                    describe(&path, &inode.data, inode.mode, &names[i])
                }
            });
        }
        out.sort();
        out
    }
}

/// The line of a non-directory (shared with the reader of the real output).
pub fn describe(path: &str, data: &Data, mode: u32, group: &[String]) -> String {
    let mut group = group.to_vec();
    group.sort();
    match data {
        Data::File(content) => format!("f {path} {mode:o} ={content} {group:?}"),
        Data::Symlink(target) => format!("l {path} -> {target} {group:?}"),
        Data::Fifo => format!("p {path} {mode:o} {group:?}"),
    }
}

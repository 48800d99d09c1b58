//! The merged filesystem view built while reading layers (pass 1).
//!
//! Only metadata lives here — names, modes, owners, link targets and, for regular
//! files, *where* their bytes are (layer + member ordinal). Contents stay in the
//! layer blobs and are streamed in pass 2, so memory grows with the number of
//! entries, never with file sizes.
//!
//! Hardlinks are modelled as several names sharing one [`Inode`]. Replacing or
//! whiting out a name detaches only that name: an alias keeps the original inode
//! and therefore the original content — the case crane/ggcr get wrong (#977, #2002).
//!
//! Parent directories are resolved through symlinks *inside* this virtual root
//! (`..` clamps at `/`, absolute targets restart at `/`), never on the host.

use std::collections::{BTreeMap, HashMap};

use crate::path::RelPath;

pub type NodeId = u32;
pub type InodeId = u32;

const ROOT: NodeId = 0;
/// Linux's MAXSYMLINKS: more hops than this while resolving a parent is a loop.
const MAX_SYMLINK_HOPS: u32 = 40;

pub type Xattr = (Box<[u8]>, Box<[u8]>);

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Meta {
    /// Permission bits including setuid/setgid/sticky (07777).
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: u64,
    pub xattrs: Box<[Xattr]>,
}

/// Identifies a layer member: the layer's index (0 = bottom) and the member's
/// position in that layer's stream, as the tar reader yields them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Source {
    pub layer: u32,
    pub ordinal: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    Dir,
    /// `size` counts the holes of a sparse file; `stored` is what the layer
    /// holds of it (equal to `size` unless sparse).
    File {
        source: Source,
        size: u64,
        stored: u64,
    },
    Symlink(Box<[u8]>),
    Fifo,
    CharDevice(u32, u32),
    BlockDevice(u32, u32),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inode {
    pub kind: Kind,
    pub meta: Meta,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TreeError {
    #[error("too many levels of symbolic links while resolving '{0}'")]
    SymlinkLoop(RelPath),
    #[error("hardlink target '{0}' does not exist")]
    HardlinkTargetMissing(RelPath),
    #[error("hardlink target '{0}' is a directory")]
    HardlinkToDirectory(RelPath),
}

struct Node {
    parent: NodeId,
    name: Box<[u8]>,
    inode: InodeId,
    children: BTreeMap<Box<[u8]>, NodeId>,
}

/// The merged tree. Apply layers bottom-up; within a layer call
/// [`Tree::begin_layer`], then every whiteout/opaque marker, then the members in
/// stream order (which makes "last wins" for duplicates fall out naturally).
pub struct Tree {
    nodes: Vec<Node>,
    inodes: Vec<Inode>,
    /// Non-directory inodes removed by this layer's whiteouts, by their path, so a
    /// same-layer hardlink to a whited-out lower file still finds its content.
    removed_this_layer: HashMap<Vec<u8>, InodeId>,
    /// Metadata given to directories that exist only because something is inside them.
    implicit_dir: Meta,
    /// Human-readable notes for things tolerated but worth reporting.
    pub notes: Vec<String>,
}

impl Default for Tree {
    fn default() -> Self {
        Self::new(0)
    }
}

impl Tree {
    /// A tree holding only the root directory. `implicit_mtime` is used for the
    /// root and for directories created implicitly (reproducible: never "now").
    pub fn new(implicit_mtime: u64) -> Self {
        let implicit_dir = Meta {
            mode: 0o755,
            mtime: implicit_mtime,
            ..Meta::default()
        };
        Tree {
            nodes: vec![Node {
                parent: ROOT,
                name: Box::default(),
                inode: 0,
                children: BTreeMap::new(),
            }],
            inodes: vec![Inode {
                kind: Kind::Dir,
                meta: implicit_dir.clone(),
            }],
            removed_this_layer: HashMap::new(),
            implicit_dir,
            notes: Vec::new(),
        }
    }

    pub fn begin_layer(&mut self) {
        self.removed_this_layer.clear();
    }

    pub fn inode(&self, id: InodeId) -> &Inode {
        &self.inodes[id as usize]
    }

    pub fn node_inode(&self, node: NodeId) -> InodeId {
        self.nodes[node as usize].inode
    }

    fn is_dir(&self, node: NodeId) -> bool {
        matches!(
            self.inodes[self.nodes[node as usize].inode as usize].kind,
            Kind::Dir
        )
    }

    fn new_inode(&mut self, inode: Inode) -> InodeId {
        self.inodes.push(inode);
        (self.inodes.len() - 1) as InodeId
    }

    fn attach(&mut self, parent: NodeId, name: &[u8], inode: InodeId) -> NodeId {
        let id = self.nodes.len() as NodeId;
        self.nodes.push(Node {
            parent,
            name: name.into(),
            inode,
            children: BTreeMap::new(),
        });
        self.nodes[parent as usize].children.insert(name.into(), id);
        id
    }

    /// Full path of a node (for messages and hardlink names).
    pub fn path_of(&self, mut node: NodeId) -> RelPath {
        let mut parts: Vec<&[u8]> = Vec::new();
        while node != ROOT {
            let n = &self.nodes[node as usize];
            parts.push(&n.name);
            node = n.parent;
        }
        parts.reverse();
        RelPath::from_components(&parts)
    }

    /// Walks `parts` from the root following every symlink met (including the last
    /// component). With `create`, missing directories are made implicitly and a
    /// non-directory in the way is replaced by one (what an overlay mount shows when
    /// an upper layer puts a file under a lower file's name).
    fn walk(
        &mut self,
        parts: &[&[u8]],
        create: bool,
        whole: &RelPath,
    ) -> Result<Option<NodeId>, TreeError> {
        let mut pending: Vec<Vec<u8>> = parts.iter().rev().map(|p| p.to_vec()).collect();
        let mut cur = ROOT;
        let mut hops = 0;
        while let Some(part) = pending.pop() {
            if part == b".." {
                cur = self.nodes[cur as usize].parent;
                continue;
            }
            let child = self.nodes[cur as usize]
                .children
                .get(part.as_slice())
                .copied();
            let Some(child) = child else {
                if !create {
                    return Ok(None);
                }
                let inode = self.new_inode(Inode {
                    kind: Kind::Dir,
                    meta: self.implicit_dir.clone(),
                });
                cur = self.attach(cur, &part, inode);
                continue;
            };
            match &self.inodes[self.nodes[child as usize].inode as usize].kind {
                Kind::Dir => cur = child,
                Kind::Symlink(target) => {
                    hops += 1;
                    if hops > MAX_SYMLINK_HOPS {
                        return Err(TreeError::SymlinkLoop(whole.clone()));
                    }
                    if target.first() == Some(&b'/') {
                        cur = ROOT;
                    }
                    for seg in target.rsplit(|&b| b == b'/') {
                        if !seg.is_empty() && seg != b"." {
                            pending.push(seg.to_vec());
                        }
                    }
                }
                // The last component may be anything when only looking.
                _ if !create && pending.is_empty() => cur = child,
                _ => {
                    if !create {
                        return Ok(None);
                    }
                    let replaced = self.path_of(child);
                    self.notes.push(format!(
                        "'{replaced}' is not a directory but '{whole}' needs it as one; replaced it"
                    ));
                    self.detach(cur, &part, false);
                    let inode = self.new_inode(Inode {
                        kind: Kind::Dir,
                        meta: self.implicit_dir.clone(),
                    });
                    cur = self.attach(cur, &part, inode);
                }
            }
        }
        Ok(Some(cur))
    }

    /// Finds the node named by `path` without following a symlink in its last component.
    pub fn lookup(&mut self, path: &RelPath) -> Result<Option<NodeId>, TreeError> {
        let Some(parent) = path.parent() else {
            return Ok(Some(ROOT));
        };
        let Some(dir) = self.walk(&parent.components(), false, path)? else {
            return Ok(None);
        };
        let name = path.file_name().expect("non-root path has a name");
        Ok(self.nodes[dir as usize].children.get(name).copied())
    }

    /// Finds the node named by `path`, following symlinks everywhere (like `stat`).
    pub fn resolve(&mut self, path: &RelPath) -> Result<Option<NodeId>, TreeError> {
        self.walk(&path.components(), false, path)
    }

    /// Removes `dir/name` (and its subtree) from the merged view.
    fn detach(&mut self, dir: NodeId, name: &[u8], remember: bool) {
        let Some(node) = self.nodes[dir as usize].children.remove(name) else {
            return;
        };
        if remember {
            self.remember_removed(node);
        }
    }

    fn remember_removed(&mut self, node: NodeId) {
        let mut stack = vec![node];
        while let Some(n) = stack.pop() {
            if self.is_dir(n) {
                stack.extend(self.nodes[n as usize].children.values().copied());
            } else {
                let key = self.path_of(n).to_bytes();
                self.removed_this_layer
                    .insert(key, self.nodes[n as usize].inode);
            }
        }
    }

    /// Applies `dir/.wh.name`. Returns whether something was removed; whiting out a
    /// missing name is not an error.
    pub fn whiteout(&mut self, dir: &RelPath, name: &[u8]) -> Result<bool, TreeError> {
        let whole = dir.join(name);
        let Some(parent) = self.walk(&dir.components(), false, &whole)? else {
            return Ok(false);
        };
        if !self.is_dir(parent) {
            return Ok(false);
        }
        let existed = self.nodes[parent as usize].children.contains_key(name);
        self.detach(parent, name, true);
        Ok(existed)
    }

    /// Applies `dir/.wh..wh..opq`: every child present now (all from lower layers,
    /// since markers are applied before the layer's members) disappears.
    pub fn opaque(&mut self, dir: &RelPath) -> Result<(), TreeError> {
        let Some(node) = self.walk(&dir.components(), false, dir)? else {
            return Ok(());
        };
        if !self.is_dir(node) {
            return Ok(());
        }
        let children = std::mem::take(&mut self.nodes[node as usize].children);
        for child in children.into_values() {
            self.remember_removed(child);
        }
        Ok(())
    }

    /// Places a member at `path`. A directory over a directory updates metadata and
    /// keeps the children; anything else replaces the whole subtree.
    pub fn insert(&mut self, path: &RelPath, inode: Inode) -> Result<(), TreeError> {
        let Some(parent_path) = path.parent() else {
            // The root itself (`./`): only a directory can describe it.
            if inode.kind == Kind::Dir {
                self.inodes[self.nodes[ROOT as usize].inode as usize].meta = inode.meta;
            } else {
                self.notes
                    .push("a non-directory member names the root; ignored".to_string());
            }
            return Ok(());
        };
        let parent = self
            .walk(&parent_path.components(), true, path)?
            .expect("walk with create always yields a node");
        let name = path.file_name().expect("non-root path has a name");
        if let Some(&existing) = self.nodes[parent as usize].children.get(name) {
            if inode.kind == Kind::Dir && self.is_dir(existing) {
                let id = self.nodes[existing as usize].inode;
                self.inodes[id as usize].meta = inode.meta;
                return Ok(());
            }
            self.detach(parent, name, false);
        }
        let id = self.new_inode(inode);
        self.attach(parent, name, id);
        Ok(())
    }

    /// Places a hardlink at `path` sharing `target`'s inode.
    pub fn link(&mut self, path: &RelPath, target: &RelPath) -> Result<(), TreeError> {
        let inode = match self.lookup(target)? {
            Some(node) => self.nodes[node as usize].inode,
            None => match self.removed_this_layer.get(target.as_bytes()) {
                Some(&inode) => inode,
                None => return Err(TreeError::HardlinkTargetMissing(target.clone())),
            },
        };
        if self.inodes[inode as usize].kind == Kind::Dir {
            return Err(TreeError::HardlinkToDirectory(target.clone()));
        }
        let Some(parent_path) = path.parent() else {
            self.notes
                .push("a hardlink names the root; ignored".to_string());
            return Ok(());
        };
        let parent = self
            .walk(&parent_path.components(), true, path)?
            .expect("walk with create always yields a node");
        let name = path.file_name().expect("non-root path has a name");
        if let Some(&existing) = self.nodes[parent as usize].children.get(name) {
            if self.nodes[existing as usize].inode == inode {
                return Ok(());
            }
            self.detach(parent, name, false);
        }
        self.attach(parent, name, inode);
        Ok(())
    }

    /// Visits every node in pre-order (a directory before its contents, siblings in
    /// byte order of their names). The callback gets the path and the inode id.
    pub fn visit(&self, mut f: impl FnMut(&RelPath, NodeId, InodeId)) {
        // (node, length of the parent's path): one path buffer for the whole walk.
        let mut stack: Vec<(NodeId, usize)> = vec![(ROOT, 0)];
        let mut path = RelPath::root();
        while let Some((node, parent_len)) = stack.pop() {
            let n = &self.nodes[node as usize];
            path.truncate(parent_len);
            if node != ROOT {
                path.push(&n.name);
            }
            f(&path, node, n.inode);
            for &child in n.children.values().rev() {
                stack.push((child, path.len()));
            }
        }
    }

    /// Names and nodes directly inside `dir`, in byte order (empty for a non-directory).
    pub fn children(&self, dir: NodeId) -> impl Iterator<Item = (&[u8], NodeId)> {
        self.nodes[dir as usize]
            .children
            .iter()
            .map(|(name, &node)| (&name[..], node))
    }

    /// Number of nodes currently reachable from the root (the root included).
    pub fn live_entries(&self) -> usize {
        let mut count = 0;
        self.visit(|_, _, _| count += 1);
        count
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> RelPath {
        RelPath::parse(s.as_bytes()).unwrap()
    }

    fn file(layer: u32, ordinal: u64) -> Inode {
        Inode {
            kind: Kind::File {
                source: Source { layer, ordinal },
                size: 1,
                stored: 1,
            },
            meta: Meta {
                mode: 0o644,
                ..Meta::default()
            },
        }
    }

    fn dir(mode: u32) -> Inode {
        Inode {
            kind: Kind::Dir,
            meta: Meta {
                mode,
                ..Meta::default()
            },
        }
    }

    fn symlink(target: &str) -> Inode {
        Inode {
            kind: Kind::Symlink(target.as_bytes().into()),
            meta: Meta {
                mode: 0o777,
                ..Meta::default()
            },
        }
    }

    /// `path kind` lines, in visiting order, for compact expectations.
    fn listing(t: &Tree) -> Vec<String> {
        let mut out = Vec::new();
        t.visit(|path, _, inode| {
            let i = t.inode(inode);
            let kind = match &i.kind {
                Kind::Dir => format!("dir {:o}", i.meta.mode),
                Kind::File { source, .. } => format!("file {}:{}", source.layer, source.ordinal),
                Kind::Symlink(t) => format!("-> {}", String::from_utf8_lossy(t)),
                Kind::Fifo => "fifo".into(),
                Kind::CharDevice(..) | Kind::BlockDevice(..) => "dev".into(),
            };
            out.push(format!("{path} {kind}"));
        });
        out
    }

    #[test]
    fn dir_over_dir_merges_metadata_and_keeps_children() {
        let mut t = Tree::new(0);
        t.insert(&p("a"), dir(0o755)).unwrap();
        t.insert(&p("a/x"), file(0, 1)).unwrap();
        t.begin_layer();
        t.insert(&p("a"), dir(0o700)).unwrap();
        assert_eq!(listing(&t), [". dir 755", "a dir 700", "a/x file 0:1"]);
    }

    #[test]
    fn non_dir_replaces_whole_subtree() {
        let mut t = Tree::new(0);
        t.insert(&p("a/x"), file(0, 1)).unwrap();
        t.begin_layer();
        t.insert(&p("a"), file(1, 0)).unwrap();
        assert_eq!(listing(&t), [". dir 755", "a file 1:0"]);
        t.begin_layer();
        t.insert(&p("a"), dir(0o711)).unwrap();
        assert_eq!(listing(&t), [". dir 755", "a dir 711"]);
    }

    #[test]
    fn whiteout_removes_only_lower_and_missing_is_fine() {
        let mut t = Tree::new(0);
        t.insert(&p("d/sub/f"), file(0, 0)).unwrap();
        t.begin_layer();
        assert!(t.whiteout(&p("d"), b"sub").unwrap());
        assert!(!t.whiteout(&p("d"), b"nothing").unwrap());
        assert!(!t.whiteout(&p("nodir"), b"x").unwrap());
        t.insert(&p("d/sub/g"), file(1, 0)).unwrap();
        assert_eq!(
            listing(&t),
            [
                ". dir 755",
                "d dir 755",
                "d/sub dir 755",
                "d/sub/g file 1:0"
            ]
        );
    }

    #[test]
    fn opaque_hides_lower_children_only() {
        let mut t = Tree::new(0);
        t.insert(&p("d/old"), file(0, 0)).unwrap();
        t.begin_layer();
        t.opaque(&p("d")).unwrap();
        t.insert(&p("d/new"), file(1, 0)).unwrap();
        assert_eq!(listing(&t), [". dir 755", "d dir 755", "d/new file 1:0"]);
    }

    #[test]
    fn parents_resolve_through_symlinks_inside_root() {
        let mut t = Tree::new(0);
        t.insert(&p("usr/lib"), dir(0o755)).unwrap();
        t.insert(&p("lib"), symlink("usr/lib")).unwrap();
        t.insert(&p("abs"), symlink("/usr/../../../usr")).unwrap();
        t.insert(&p("lib/foo"), file(0, 3)).unwrap();
        t.insert(&p("abs/bar"), file(0, 4)).unwrap();
        assert_eq!(
            listing(&t),
            [
                ". dir 755",
                "abs -> /usr/../../../usr",
                "lib -> usr/lib",
                "usr dir 755",
                "usr/bar file 0:4",
                "usr/lib dir 755",
                "usr/lib/foo file 0:3"
            ]
        );
    }

    #[test]
    fn dangling_symlink_parent_creates_target_dirs_in_root() {
        let mut t = Tree::new(0);
        t.insert(&p("l"), symlink("/gone/deeper")).unwrap();
        t.insert(&p("l/f"), file(0, 1)).unwrap();
        assert_eq!(
            listing(&t),
            [
                ". dir 755",
                "gone dir 755",
                "gone/deeper dir 755",
                "gone/deeper/f file 0:1",
                "l -> /gone/deeper"
            ]
        );
    }

    #[test]
    fn symlink_loop_in_parent_is_an_error() {
        let mut t = Tree::new(0);
        t.insert(&p("a"), symlink("b")).unwrap();
        t.insert(&p("b"), symlink("a")).unwrap();
        assert_eq!(
            t.insert(&p("a/x"), file(0, 0)),
            Err(TreeError::SymlinkLoop(p("a/x")))
        );
    }

    #[test]
    fn hardlink_alias_keeps_content_after_target_replaced_or_whited_out() {
        let mut t = Tree::new(0);
        t.insert(&p("a"), file(0, 0)).unwrap();
        t.link(&p("b"), &p("a")).unwrap();
        t.link(&p("c"), &p("b")).unwrap();
        t.begin_layer();
        t.insert(&p("a"), file(1, 0)).unwrap();
        t.begin_layer();
        t.whiteout(&RelPath::root(), b"b").unwrap();
        assert_eq!(listing(&t), [". dir 755", "a file 1:0", "c file 0:0"]);
        let c = t.lookup(&p("c")).unwrap().unwrap();
        let a = t.lookup(&p("a")).unwrap().unwrap();
        assert_ne!(t.node_inode(a), t.node_inode(c));
    }

    #[test]
    fn same_layer_hardlink_to_whited_out_lower_file() {
        let mut t = Tree::new(0);
        t.insert(&p("x/a"), file(0, 0)).unwrap();
        t.begin_layer();
        t.whiteout(&p("x"), b"a").unwrap();
        t.link(&p("x/b"), &p("x/a")).unwrap();
        assert_eq!(listing(&t), [". dir 755", "x dir 755", "x/b file 0:0"]);
    }

    #[test]
    fn hardlink_errors() {
        let mut t = Tree::new(0);
        t.insert(&p("d"), dir(0o755)).unwrap();
        assert_eq!(
            t.link(&p("x"), &p("missing")),
            Err(TreeError::HardlinkTargetMissing(p("missing")))
        );
        assert_eq!(
            t.link(&p("x"), &p("d")),
            Err(TreeError::HardlinkToDirectory(p("d")))
        );
    }

    #[test]
    fn file_under_lower_file_replaces_it_with_a_directory() {
        let mut t = Tree::new(0);
        t.insert(&p("x"), file(0, 0)).unwrap();
        t.begin_layer();
        t.insert(&p("x/y"), file(1, 0)).unwrap();
        assert_eq!(listing(&t), [". dir 755", "x dir 755", "x/y file 1:0"]);
        assert_eq!(t.notes.len(), 1);
    }

    #[test]
    fn resolve_follows_final_symlink() {
        let mut t = Tree::new(0);
        t.insert(&p("usr/lib/os-release"), file(0, 0)).unwrap();
        t.insert(&p("etc/os-release"), symlink("../usr/lib/os-release"))
            .unwrap();
        let n = t.resolve(&p("etc/os-release")).unwrap().unwrap();
        assert_eq!(t.path_of(n), p("usr/lib/os-release"));
    }
}

//! Flattening: pass 1 indexes every layer into the merged [`Tree`]; pass 2 writes
//! the rootfs tar.
//!
//! Output order (all deterministic):
//! 1. `./`, then every directory, symlink and fifo in a pre-order walk of the
//!    final tree (a directory always precedes its contents);
//! 2. regular files in layer order, each followed directly by the hardlinks that
//!    share its inode (so a link's target always comes first).
//!
//! No unpacked rootfs touches the disk: file bytes are copied from the layer
//! streams, which are read a second time.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read, Write};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};

use crate::acceptance::{Member, MemberRules, Stream};
use crate::fanout;
use crate::layer::{self, LayerDesc, LayerStats, MemberKind};
use crate::output;
use crate::path::{RelPath, MAX_NAME_BYTES, MAX_PATH_BYTES};
use crate::source::ResolvedImage;
use crate::tarout::{OutEntry, OutKind, TarWriter};
use crate::text::{printable, NAME_SHOWN};
use crate::tree::{Inode, InodeId, Kind, NodeId, Source, Tree, Xattr};
use crate::whiteout::Role;

/// The default largest size of a sparse file, holes included
/// (`--max-sparse-size`).
pub const DEFAULT_MAX_SPARSE_SIZE: u64 = 64 << 30;

/// What pass 1 accepts.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest size of a sparse file, holes included. Sparse files are written
    /// sparse, so this bounds what a header may claim, not the work done: a
    /// sparse file costs the converter only the data it stores.
    pub max_sparse_size: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_sparse_size: DEFAULT_MAX_SPARSE_SIZE,
        }
    }
}

/// A size given by a user: bytes, or a number with a binary unit (`K`, `M`,
/// `G`, `T`, `P`, `E`, optionally followed by `iB` or `B`): `64G`, `1TiB`,
/// `1.5T`, `4096`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let digits = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(digits);
    let unit = unit.trim().to_ascii_uppercase();
    let unit = unit
        .strip_suffix("IB")
        .or_else(|| unit.strip_suffix('B'))
        .unwrap_or(&unit);
    let shift = match unit {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        "P" => 50,
        "E" => 60,
        _ => return Err(format!("'{text}': unknown unit (use K, M, G, T, P or E)")),
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("'{text}' is not a size (e.g. 64G, 1T, 4096)"))?;
    let bytes = value * (1u64 << shift) as f64;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(format!("'{text}' is too large"));
    }
    Ok(bytes as u64)
}

/// `64 GiB`, `1.5 TiB`, `512 bytes`: a size for messages.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} bytes");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if value.fract() == 0.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Small files whose content pass 1 keeps (to name and check the artifact).
const CAPTURED_NAMES: &[&[u8]] = &[b"os-release"];
const CAPTURE_MAX: u64 = 64 << 10;
/// Xattrs Proxmox's extraction keeps (`--xattrs-include`); the rest are dropped.
fn xattr_survives(name: &[u8]) -> bool {
    name.starts_with(b"user.") || name == b"security.capability"
}

/// The result of pass 1.
pub struct Index {
    pub tree: Tree,
    pub layers: Vec<LayerStats>,
    /// Proxmox's per-layer rules (ids, whiteouts) on every member read, for
    /// artifacts that keep the layers as they are.
    pub layer_rules: Vec<MemberRules>,
    captured: HashMap<Source, Vec<u8>>,
    pub warnings: Vec<String>,
    limits: Limits,
    /// What pass 2 cost per layer (by place in the stack; filled by [`emit`]).
    pub pass2: Vec<PassCost>,
}

/// What one pass cost on one layer: bytes decompressed and seconds spent.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct PassCost {
    pub inflated_bytes: u64,
    pub seconds: f64,
}

impl Index {
    /// Content of a small captured file reached by `path` (symlinks followed).
    pub fn captured_file(&mut self, path: &str) -> Option<Vec<u8>> {
        let path = RelPath::parse(path.as_bytes()).ok()?;
        let node = self.tree.resolve(&path).ok()??;
        match &self.tree.inode(self.tree.node_inode(node)).kind {
            Kind::File { source, .. } => self.captured.get(source).cloned(),
            _ => None,
        }
    }
}

/// Keeps the warning list readable: at most a few examples per kind.
struct WarningSink {
    out: Vec<String>,
    counts: BTreeMap<&'static str, usize>,
}

impl WarningSink {
    fn new() -> Self {
        WarningSink {
            out: Vec::new(),
            counts: BTreeMap::new(),
        }
    }
    fn add(&mut self, kind: &'static str, msg: String) {
        let n = self.counts.entry(kind).or_default();
        *n += 1;
        if *n <= 5 {
            self.out.push(msg);
        }
    }
    fn finish(mut self) -> Vec<String> {
        for (kind, n) in self.counts {
            if n > 5 {
                self.out.push(format!("… and {} more: {kind}", n - 5));
            }
        }
        self.out
    }
}

/// Pass 1: reads every layer (bottom first), verifying sizes, digests and
/// diff_ids, and builds the merged tree. Nothing is written. Up to `workers`
/// layers are read and decoded at once; they are merged in layer order, so the
/// tree, the warnings and the first error do not depend on `workers`.
/// `on_layer(i, n)` is called before merging layer `i` of `n` (progress).
pub fn index_layers(
    image: &ResolvedImage,
    implicit_mtime: u64,
    limits: Limits,
    workers: usize,
    on_layer: &mut dyn FnMut(usize, usize),
) -> Result<Index> {
    let mut index = Index {
        tree: Tree::new(implicit_mtime),
        layers: Vec::with_capacity(image.layers.len()),
        layer_rules: Vec::with_capacity(image.layers.len()),
        captured: HashMap::new(),
        warnings: image.warnings.clone(),
        limits,
        pass2: Vec::new(),
    };
    let n = image.layers.len();
    fanout::ordered(
        n,
        workers,
        |i| read_members(image, &image.layers[i], i + 1, limits),
        |i, read| {
            on_layer(image.layers[i].index, n);
            merge_layer(&mut index, &image.layers[i], read?)
        },
    )?;
    Ok(index)
}

/// Pass 1 for one more layer on top of those already indexed (the converter's
/// own injected layer goes through the same rules as the image's).
pub fn index_layer(index: &mut Index, image: &ResolvedImage, desc: &LayerDesc) -> Result<()> {
    let read = read_members(image, desc, index.layer_rules.len() + 1, index.limits)?;
    merge_layer(index, desc, read)
}

/// One layer as pass 1 read it, before it is merged into the tree.
struct LayerRead {
    stats: LayerStats,
    rules: MemberRules,
    members: Vec<(u64, layer::Member)>,
    captured: Vec<(u64, Vec<u8>)>,
    warnings: Vec<String>,
}

/// Reads and checks one layer (`number`: its 1-based place in the stack, for
/// Proxmox's per-layer rules). Touches nothing shared: layers are read in parallel.
fn read_members(
    image: &ResolvedImage,
    desc: &LayerDesc,
    number: usize,
    limits: Limits,
) -> Result<LayerRead> {
    let started = Instant::now();
    let mut rules = MemberRules::new(Stream::OciLayer(number));
    let label = desc.label();
    let blob = image.blobs.open_layer(desc)?;
    let mut members = Vec::new();
    let mut captured = Vec::new();
    let mut warnings = Vec::new();
    let proven = image.blobs.digest_proven(desc);
    let mut stats = layer::read_layer(blob, desc, proven, &mut warnings, |ordinal, entry, raw| {
        let member = layer::parse_member(entry, raw)
            .with_context(|| format!("{label}: member #{ordinal}"))?;
        if let (MemberKind::File { size, stored }, Some(_)) = (&member.kind, raw.sparse()) {
            if *size > limits.max_sparse_size {
                bail!(
                    "{label}: member #{ordinal} '{}': sparse file of {} ({size} bytes, {} of data) \
                     is larger than the limit of {} (--max-sparse-size); raise the limit if the \
                     image really holds such a file",
                    printable(&member.raw_name, NAME_SHOWN),
                    human_size(*size),
                    human_size(*stored),
                    human_size(limits.max_sparse_size)
                );
            }
        }
        if let MemberKind::File { size, .. } = member.kind {
            let name = member.path.file_name().unwrap_or_default();
            if size <= CAPTURE_MAX && CAPTURED_NAMES.contains(&name) {
                let mut buf = Vec::new();
                entry
                    .read_to_end(&mut buf)
                    .with_context(|| format!("{label}: cannot read '{}'", member.path))?;
                captured.push((ordinal, buf));
            }
        }
        rules.observe(Member::from_parsed(&member));
        members.push((ordinal, member));
        Ok(())
    })?;
    stats.seconds = started.elapsed().as_secs_f64();
    crate::diag::layer_pass(1, desc, stats.uncompressed_bytes, started.elapsed());
    Ok(LayerRead {
        stats,
        rules,
        members,
        captured,
        warnings,
    })
}

/// Merges a layer pass 1 read into the tree, on top of those merged before.
fn merge_layer(index: &mut Index, desc: &LayerDesc, read: LayerRead) -> Result<()> {
    let Index {
        tree,
        layers: stats,
        layer_rules,
        captured,
        warnings,
        ..
    } = index;
    let label = desc.label();
    let layer_index = desc.index as u32;
    let LayerRead {
        stats: st,
        rules,
        members,
        captured: files,
        warnings: read_warnings,
    } = read;
    warnings.extend(read_warnings);
    for (ordinal, buf) in files {
        captured.insert(
            Source {
                layer: layer_index,
                ordinal,
            },
            buf,
        );
    }
    stats.push(st);
    layer_rules.push(rules);

    tree.begin_layer();
    // Whiteouts and opaque markers act on lower layers only, wherever they sit
    // in this layer: apply them all before any of this layer's members.
    for (ordinal, m) in &members {
        let ctx = || format!("{label}: member #{ordinal} '{}'", m.path);
        match &m.role {
            Role::Whiteout { dir, name } => {
                tree.whiteout(dir, name).with_context(ctx)?;
            }
            Role::Opaque { dir } => tree.opaque(dir).with_context(ctx)?,
            Role::Plain | Role::AufsMeta => {}
        }
    }
    for (ordinal, m) in members {
        let ctx = || format!("{label}: member #{ordinal} '{}'", m.path);
        match m.role {
            Role::Plain => {}
            Role::AufsMeta => {
                warnings.push(format!("{label}: skipped AUFS metadata '{}'", m.path));
                continue;
            }
            Role::Whiteout { .. } | Role::Opaque { .. } => continue,
        }
        let kind = match m.kind {
            MemberKind::Dir => Kind::Dir,
            MemberKind::File { size, stored } => Kind::File {
                source: Source {
                    layer: layer_index,
                    ordinal,
                },
                size,
                stored,
            },
            MemberKind::Symlink(t) => Kind::Symlink(t),
            MemberKind::Fifo => Kind::Fifo,
            MemberKind::CharDevice(a, b) => Kind::CharDevice(a, b),
            MemberKind::BlockDevice(a, b) => Kind::BlockDevice(a, b),
            MemberKind::Hardlink(target) => {
                tree.link(&m.path, &target).with_context(ctx)?;
                continue;
            }
            MemberKind::Ignored(why) => {
                warnings.push(format!(
                    "{label}: member #{ordinal} '{}': {why}; skipped",
                    m.path
                ));
                continue;
            }
        };
        tree.insert(&m.path, Inode { kind, meta: m.meta })
            .with_context(ctx)?;
    }
    for note in tree.notes.drain(..) {
        warnings.push(format!("{label}: {note}"));
    }
    Ok(())
}

/// Why a path of the final tree could not be extracted, if it could not.
/// Member names are checked as they are read, but parents resolved through
/// symlinks can still make a longer path (`l/x` with `l` → a long target) or a
/// longer component (taken from a symlink target).
fn unextractable(path: &RelPath) -> Option<&'static str> {
    if path.as_bytes().len() > MAX_PATH_BYTES {
        Some("is longer than PATH_MAX (4095 bytes)")
    } else if path.file_name().is_some_and(|n| n.len() > MAX_NAME_BYTES) {
        Some("has a name longer than NAME_MAX (255 bytes)")
    } else {
        None
    }
}

/// Counts reported in the summary.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct EmitStats {
    pub entries: u64,
    pub directories: u64,
    pub files: u64,
    pub symlinks: u64,
    pub hardlinks: u64,
    pub fifos: u64,
    pub devices_dropped: u64,
    pub xattrs_dropped: u64,
    /// Regular files written sparse (holes kept as holes).
    pub sparse_files: u64,
    /// Bytes of file data written (holes of sparse files not counted).
    pub file_bytes: u64,
    pub tar_bytes: u64,
}

/// How member names are spelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NameStyle {
    /// Proxmox rootfs templates: `./` first, every name prefixed `./`
    /// (PVE extracts with `--anchored --exclude ./dev/*`).
    #[default]
    Rootfs,
    /// An OCI layer: plain relative names (`etc/`, `bin/sh`) and no root member,
    /// as image builders write them.
    Layer,
}

/// Options for pass 2.
#[derive(Debug, Clone, Default)]
pub struct EmitOptions {
    /// `SOURCE_DATE_EPOCH`: no mtime in the output is later than this.
    pub clamp_mtime: Option<u64>,
    pub names: NameStyle,
}

fn member_name(path: &RelPath, dir: bool, style: NameStyle) -> Vec<u8> {
    let mut name = match style {
        NameStyle::Rootfs => b"./".to_vec(),
        NameStyle::Layer => Vec::new(),
    };
    if !path.is_root() {
        name.extend_from_slice(&path.to_bytes());
        if dir {
            name.push(b'/');
        }
    }
    name
}

/// The xattrs that reach the artifact; reports dropped ones. (Ids an
/// unprivileged container cannot map are Proxmox's rules: [`crate::acceptance`].)
fn filtered_xattrs(
    path: &RelPath,
    inode: &Inode,
    stats: &mut EmitStats,
    warns: &mut WarningSink,
) -> Vec<Xattr> {
    let mut kept = Vec::new();
    for (k, v) in inode.meta.xattrs.iter() {
        // A SCHILY.xattr key ends at the first '=' and setxattr(2) names at a
        // NUL: such a name (only LIBARCHIVE.xattr can bring one) cannot be
        // written faithfully.
        if k.contains(&b'=') || k.contains(&0) {
            stats.xattrs_dropped += 1;
            warns.add(
                "xattrs dropped",
                format!(
                    "'{path}': xattr '{}' dropped (a name with '=' or NUL cannot be written)",
                    printable(k, NAME_SHOWN)
                ),
            );
            continue;
        }
        if xattr_survives(k) {
            kept.push((k.clone(), v.clone()));
        } else {
            stats.xattrs_dropped += 1;
            warns.add(
                "xattrs dropped",
                format!(
                    "'{path}': xattr {} dropped (Proxmox keeps only user.* and security.capability)",
                    printable(k, NAME_SHOWN)
                ),
            );
        }
    }
    kept
}

/// The member for `inode` under `name`: its metadata, mtime clamped.
fn member_for<'a>(
    inode: &Inode,
    clamp: impl Fn(u64) -> u64,
    name: &'a [u8],
    kind: OutKind,
    size: u64,
    link: Option<&'a [u8]>,
    xattrs: &'a [Xattr],
) -> OutEntry<'a> {
    OutEntry {
        name,
        kind,
        mode: inode.meta.mode,
        uid: inode.meta.uid,
        gid: inode.meta.gid,
        mtime: clamp(inode.meta.mtime),
        size,
        link,
        xattrs,
    }
}

/// Pass 2: writes the flattened tree as a tar to `out`. `tick` sees every chunk
/// of file data (progress; returning an error aborts, e.g. on Ctrl-C).
pub fn emit<W: Write>(
    image: &ResolvedImage,
    index: &mut Index,
    opts: &EmitOptions,
    out: &mut TarWriter<W>,
    tick: &mut dyn FnMut(u64) -> io::Result<()>,
) -> Result<(EmitStats, Vec<String>)> {
    let tree = &index.tree;
    let mut stats = EmitStats::default();
    let mut warns = WarningSink::new();
    let clamp = |t: u64| opts.clamp_mtime.map_or(t, |c| t.min(c));

    // Link counts of non-directory inodes, and every regular-file name keyed by
    // the member that holds its bytes (visit order = sorted, so the first name of
    // a group is its smallest).
    let mut nlink: HashMap<InodeId, u32> = HashMap::new();
    let mut files: Vec<(Source, u64, NodeId)> = Vec::new();
    let mut visit_no = 0u64;
    let mut bad_path = None;
    tree.visit(|path, node, inode| {
        visit_no += 1;
        if bad_path.is_none() {
            bad_path = unextractable(path).map(|why| (path.clone(), why));
        }
        match &tree.inode(inode).kind {
            Kind::Dir => {}
            Kind::File { source, .. } => files.push((*source, visit_no, node)),
            _ => *nlink.entry(inode).or_default() += 1,
        }
    });
    if let Some((path, why)) = bad_path {
        bail!(
            "'{}' {why} once symlinked parents are resolved; it could not be extracted",
            printable(path.as_bytes(), 80)
        );
    }
    files.sort_unstable();

    // Phase A: directories, symlinks, fifos.
    let mut first_name: HashMap<InodeId, Vec<u8>> = HashMap::new();
    let mut result: io::Result<()> = Ok(());
    tree.visit(|path, _, id| {
        if result.is_err() {
            return;
        }
        let inode = tree.inode(id);
        let (kind, link): (OutKind, Option<&[u8]>) = match &inode.kind {
            Kind::Dir => (OutKind::Dir, None),
            Kind::Symlink(t) => (OutKind::Symlink, Some(t)),
            Kind::Fifo => (OutKind::Fifo, None),
            Kind::File { .. } => return,
            Kind::CharDevice(..) | Kind::BlockDevice(..) => {
                stats.devices_dropped += 1;
                warns.add(
                    "device nodes dropped",
                    format!("'{path}': device node dropped (LXC provides /dev)"),
                );
                return;
            }
        };
        if path.is_root() && opts.names == NameStyle::Layer {
            return;
        }
        let name = member_name(path, kind == OutKind::Dir, opts.names);
        if let Some(first) = first_name.get(&id) {
            stats.hardlinks += 1;
            stats.entries += 1;
            result = out.append(&member_for(
                inode,
                clamp,
                &name,
                OutKind::Hardlink,
                0,
                Some(first),
                &[],
            ));
            return;
        }
        let xattrs = filtered_xattrs(path, inode, &mut stats, &mut warns);
        match kind {
            OutKind::Dir => stats.directories += 1,
            OutKind::Symlink => stats.symlinks += 1,
            _ => stats.fifos += 1,
        }
        stats.entries += 1;
        result = out.append(&member_for(inode, clamp, &name, kind, 0, link, &xattrs));
        if kind != OutKind::Dir && nlink.get(&id).copied().unwrap_or(0) > 1 {
            first_name.insert(id, name);
        }
    });
    result.context("cannot write the artifact")?;

    // Phase B: regular files, streamed from the layers in order. Only the
    // members that reach the output are read again: a layer with none is not
    // read at all, and none is read past its last.
    let mut wanted: HashMap<u32, Vec<u64>> = HashMap::new();
    for (source, _, _) in &files {
        let ordinals = wanted.entry(source.layer).or_default();
        if ordinals.last() != Some(&source.ordinal) {
            ordinals.push(source.ordinal);
        }
    }
    let mut pass2 = vec![PassCost::default(); image.layers.len()];
    let mut next = 0usize;
    for (place, desc) in image.layers.iter().enumerate() {
        let layer_index = desc.index as u32;
        let Some(ordinals) = wanted.get(&layer_index) else {
            continue;
        };
        let started = Instant::now();
        let label = desc.label();
        // Pass 2 does not hash again what pass 1 proved; a blob replaced on disk
        // in between is caught by its size (and by the member list running short).
        if let (Some(now), Some(then)) = (image.blobs.blob_size(desc)?, desc.size) {
            if now != then {
                bail!("{label}: the blob changed since the first read ({now} bytes, was {then})");
            }
        }
        let blob = image.blobs.open_layer(desc)?;
        let access = &index.layers[place].access;
        let reread = layer::reread_layer(blob, desc, access, ordinals, |ordinal, entry, raw| {
            let here = Source {
                layer: layer_index,
                ordinal,
            };
            if next >= files.len() || files[next].0 != here {
                return Ok(());
            }
            let group_end = files[next..]
                .iter()
                .position(|f| f.0 != here)
                .map_or(files.len(), |p| next + p);
            let group = &files[next..group_end];
            next = group_end;

            let primary = tree.path_of(group[0].2);
            let inode = tree.inode(tree.node_inode(group[0].2));
            let Kind::File { size, .. } = inode.kind else {
                unreachable!("grouped nodes are regular files")
            };
            let name = member_name(&primary, false, opts.names);
            let xattrs = filtered_xattrs(&primary, inode, &mut stats, &mut warns);
            let member = member_for(inode, clamp, &name, OutKind::File, size, None, &xattrs);
            // A sparse file stays sparse: its map and stored chunks are copied,
            // its holes are never read nor written.
            let copied = match raw.sparse() {
                None => out
                    .append(&member)
                    .and_then(|()| out.append_data(entry, size, tick))
                    .map(|()| size),
                Some(map) => {
                    if map.real_size != size {
                        bail!("internal error: '{primary}' changed size between the two reads");
                    }
                    stats.sparse_files += 1;
                    let stored = map.stored();
                    out.append_sparse(&member, map)
                        .and_then(|()| out.append_data(&mut raw.stored_data(), stored, tick))
                        .map(|()| stored)
                }
            };
            let copied = copied.map_err(|e| {
                if output::is_output_fault(&e) {
                    anyhow::Error::new(e).context("cannot write the artifact")
                } else if e.kind() == io::ErrorKind::Interrupted {
                    anyhow!("interrupted")
                } else {
                    anyhow!("{label}: member #{ordinal} '{primary}': {e}")
                }
            })?;
            stats.files += 1;
            stats.entries += 1;
            stats.file_bytes += copied;
            for &(_, _, alias) in &group[1..] {
                let alias_name = member_name(&tree.path_of(alias), false, opts.names);
                out.append(&member_for(
                    inode,
                    clamp,
                    &alias_name,
                    OutKind::Hardlink,
                    0,
                    Some(&name),
                    &[],
                ))
                .context("cannot write the artifact")?;
                stats.hardlinks += 1;
                stats.entries += 1;
            }
            Ok(())
        })
        .map_err(|e| {
            // A full disk is the output's fault, not this layer's.
            if output::output_fault(&e).is_some() {
                e
            } else {
                e.context(format!("{label}: second read"))
            }
        })?;
        pass2[place] = PassCost {
            inflated_bytes: reread.inflated_bytes,
            seconds: started.elapsed().as_secs_f64(),
        };
        crate::diag::layer_pass(2, desc, reread.inflated_bytes, started.elapsed());
    }
    if next != files.len() {
        return Err(anyhow!(
            "internal error: {} file(s) were not found on the second read of the layers",
            files.len() - next
        ));
    }
    index.pass2 = pass2;
    stats.tar_bytes = out.written();
    Ok((stats, warns.finish()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_and_shown() {
        assert_eq!(parse_size("64G"), Ok(64 << 30));
        assert_eq!(parse_size("1TiB"), Ok(1 << 40));
        assert_eq!(parse_size("1.5T"), Ok(3 << 39));
        assert_eq!(parse_size(" 4096 "), Ok(4096));
        assert_eq!(parse_size("2kb"), Ok(2048));
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("99999E").is_err());
        assert_eq!(human_size(512), "512 bytes");
        assert_eq!(human_size(64 << 30), "64 GiB");
        assert_eq!(human_size(3 << 39), "1.5 TiB");
    }
}

//! Reading one layer blob: decompression chosen by magic bytes, digest and
//! diff_id verification, and tar members turned into [`Member`]s.
//!
//! The same reader serves both passes, so member ordinals agree between the
//! indexing pass and the emitting pass.

use std::io::{self, BufRead, BufReader, Read};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine as _;

use crate::digest::{Digest, HashRead};
use crate::gunzip::{AccessPoint, Gunzip};
use crate::path::{RelPath, MAX_PATH_BYTES};
use crate::tarstream::{parse_pax, SparseMap, Tap, TarStream};
use crate::text::{printable, NAME_SHOWN};
use crate::tree::{Meta, Xattr};
use crate::whiteout::{self, Role};

/// Compression of a layer blob, told by its first bytes, not its media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    Gzip,
    Zstd,
    Xz,
    Plain,
}

impl Compression {
    pub fn sniff(magic: &[u8]) -> Self {
        if magic.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else if magic.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0x00]) {
            Compression::Xz
        } else {
            Compression::Plain
        }
    }

    /// What a layer media type claims, when it says.
    pub fn from_media_type(mt: &str) -> Option<Self> {
        if mt.ends_with("+gzip") || mt.ends_with(".tar.gzip") || mt.ends_with("tar.gzip") {
            Some(Compression::Gzip)
        } else if mt.ends_with("+zstd") {
            Some(Compression::Zstd)
        } else if mt.ends_with(".tar") || mt.ends_with("layer.v1.tar") {
            Some(Compression::Plain)
        } else if mt == "application/vnd.docker.image.rootfs.diff.tar.gzip"
            || mt == "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
        {
            Some(Compression::Gzip)
        } else {
            None
        }
    }
}

/// Where a layer comes from and what it must hash to.
#[derive(Debug, Clone)]
pub struct LayerDesc {
    /// Position in the manifest, 0 = bottom.
    pub index: usize,
    /// Digest of the blob as stored (compressed). `None` only for legacy
    /// `docker save` layers, which are addressed by file name and checked by diff_id.
    pub digest: Option<Digest>,
    pub size: Option<u64>,
    pub media_type: String,
    pub diff_id: Digest,
}

impl LayerDesc {
    pub fn label(&self) -> String {
        match &self.digest {
            Some(d) => format!("layer {} ({})", self.index + 1, d),
            None => format!("layer {} (diff_id {})", self.index + 1, self.diff_id),
        }
    }
}

type Compressed = BufReader<HashRead<Box<dyn Read + Send>>>;

/// The decompressing stage of a layer stream; concrete so the raw stream can be recovered at the end
/// and drained into the blob digest.
pub enum Decoder {
    Gzip(Gunzip<Compressed>),
    Zstd(zstd::stream::read::Decoder<'static, Compressed>),
    Xz(liblzma::bufread::XzDecoder<Compressed>),
    Plain(Compressed),
}

impl Read for Decoder {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Decoder::Gzip(d) => d.read(buf),
            Decoder::Zstd(d) => d.read(buf),
            Decoder::Xz(d) => d.read(buf),
            Decoder::Plain(d) => d.read(buf),
        }
    }
}

impl Decoder {
    /// Sniffs the compression of `blob` and starts the matching decoder.
    /// `hashing: false` only counts the blob's bytes (pass 2, after pass 1 proved
    /// them); `record` notes gzip access points (pass 1, for pass 2's jumps).
    fn open(
        blob: Box<dyn Read + Send>,
        size_limit: Option<u64>,
        label: &str,
        hashing: bool,
        record: bool,
    ) -> Result<(Compression, Decoder)> {
        let blob = if hashing {
            HashRead::new(blob, size_limit)
        } else {
            HashRead::counting(blob, size_limit)
        };
        let mut raw = BufReader::with_capacity(256 * 1024, blob);
        let magic = raw
            .fill_buf()
            .with_context(|| format!("{label}: cannot read blob"))?
            .to_vec();
        let compression = Compression::sniff(&magic);
        let decoder = match compression {
            Compression::Gzip => Decoder::Gzip(
                if record {
                    Gunzip::recording(raw)
                } else {
                    Gunzip::new(raw)
                }
                .with_context(|| format!("{label}: cannot start gzip decoder"))?,
            ),
            Compression::Zstd => Decoder::Zstd(
                zstd::stream::read::Decoder::with_buffer(raw)
                    .with_context(|| format!("{label}: cannot start zstd decoder"))?,
            ),
            Compression::Xz => Decoder::Xz(liblzma::bufread::XzDecoder::new_multi_decoder(raw)),
            Compression::Plain => Decoder::Plain(raw),
        };
        Ok((compression, decoder))
    }

    /// The access points noted so far (gzip only; none for other formats).
    fn take_points(&mut self) -> Vec<AccessPoint> {
        match self {
            Decoder::Gzip(d) => d.take_points(),
            _ => Vec::new(),
        }
    }

    fn jump(&mut self, point: &AccessPoint) -> io::Result<()> {
        match self {
            Decoder::Gzip(d) => d.jump(point),
            _ => Err(io::Error::other("access points exist for gzip only")),
        }
    }

    fn into_inner(self) -> Compressed {
        match self {
            Decoder::Gzip(d) => d.into_inner(),
            Decoder::Zstd(d) => d.finish(),
            Decoder::Xz(d) => d.into_inner(),
            Decoder::Plain(d) => d,
        }
    }
}

pub type LayerTar = TarStream<HashRead<Decoder>>;
pub type LayerEntry<'a> = tar::Entry<'a, LayerTar>;

/// What the `tar` crate does not tell about a member, read from its raw bytes.
pub struct Raw<'a> {
    pax: Option<Vec<u8>>,
    sparse: Option<SparseMap>,
    tap: &'a Tap<HashRead<Decoder>>,
}

impl Raw<'_> {
    /// The data of the member's PAX extended header, if any.
    pub fn pax(&self) -> Option<&[u8]> {
        self.pax.as_deref()
    }

    /// The map of an old GNU sparse member.
    pub fn sparse(&self) -> Option<&SparseMap> {
        self.sparse.as_ref()
    }

    /// A sparse member's stored data: its chunks back to back
    /// ([`SparseMap::stored`] bytes), read from the layer without expanding
    /// the holes. The entry must not be read after this.
    pub fn stored_data(&self) -> impl Read + '_ {
        StoredData(self.tap)
    }
}

struct StoredData<'a>(&'a Tap<HashRead<Decoder>>);

impl Read for StoredData<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read_data(buf)
    }
}

/// What reading a whole layer established.
#[derive(Debug, Clone)]
pub struct LayerStats {
    pub compression: Compression,
    pub compressed_bytes: u64,
    pub uncompressed_bytes: u64,
    pub members: u64,
    /// Pass 1's time on this layer (read, verify, parse), set by the indexer.
    pub seconds: f64,
    /// Where each member starts, and gzip access points: what pass 2 needs to
    /// read only some members.
    pub access: Arc<LayerAccess>,
}

/// Positions in a layer's tar stream, noted by pass 1.
#[derive(Default)]
pub struct LayerAccess {
    /// Per member (by ordinal): where its first header block starts (a PAX or
    /// long-name header included) and where its data starts.
    members: Vec<(u64, u64)>,
    /// gzip layers: places to resume inflating, by uncompressed position.
    points: Vec<AccessPoint>,
}

impl std::fmt::Debug for LayerAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "LayerAccess({} members, {} access points)",
            self.members.len(),
            self.points.len()
        )
    }
}

/// A jump is worth it only over this much output.
const JUMP_MIN: u64 = 256 << 10;

impl LayerAccess {
    /// The last access point at or before `target`, if it saves at least
    /// [`JUMP_MIN`] of inflating from `pos`.
    fn point_before(&self, pos: u64, target: u64) -> Option<&AccessPoint> {
        let after = self.points.partition_point(|p| p.uncompressed <= target);
        let p = self.points[..after].last()?;
        (p.uncompressed >= pos + JUMP_MIN).then_some(p)
    }
}

/// What streaming a whole tar blob established.
#[derive(Debug, Clone)]
pub struct Walked {
    pub compression: Compression,
    pub blob_digest: Digest,
    pub compressed_bytes: u64,
    pub diff_id: Digest,
    pub uncompressed_bytes: u64,
    pub members: u64,
}

/// Streams a (possibly compressed) tar blob: calls `on_member(ordinal, entry,
/// raw)` for every member (`raw`: its PAX data and sparse map), drains the
/// rest, and returns both digests. `size_limit` makes a longer
/// blob an error as soon as it is exceeded. Checks nothing else.
pub fn walk_tar(
    blob: Box<dyn Read + Send>,
    size_limit: Option<u64>,
    label: &str,
    warnings: &mut Vec<String>,
    on_member: impl FnMut(u64, &mut LayerEntry<'_>, &Raw<'_>) -> Result<()>,
) -> Result<Walked> {
    walk(blob, size_limit, label, warnings, false, true, on_member).map(|(walked, _)| walked)
}

/// [`walk_tar`], also noting where members start and (`record`) gzip access points.
/// `hash_blob: false` only counts the compressed bytes (the blob's digest was proven
/// by this process already; the returned blob digest is then meaningless).
fn walk(
    blob: Box<dyn Read + Send>,
    size_limit: Option<u64>,
    label: &str,
    warnings: &mut Vec<String>,
    record: bool,
    hash_blob: bool,
    mut on_member: impl FnMut(u64, &mut LayerEntry<'_>, &Raw<'_>) -> Result<()>,
) -> Result<(Walked, LayerAccess)> {
    let (compression, decoder) = Decoder::open(blob, size_limit, label, hash_blob, record)?;
    let (stream, tap) = TarStream::new(HashRead::new(decoder, None));
    let mut archive = tar::Archive::new(stream);
    let mut access = LayerAccess::default();
    let members = each_member(
        &mut archive,
        &tap,
        label,
        Start::default(),
        None,
        &mut |_, start, data| {
            access.members.push((start, data));
            Ok(())
        },
        &mut on_member,
    )?;
    drop(tap);
    // Whatever follows the end-of-archive marker (padding, garbage) is still part
    // of the diff: hash it so diff_id covers the whole stream.
    let mut diff = archive.into_inner().into_inner();
    io::copy(&mut diff, &mut io::sink())
        .with_context(|| format!("{label}: corrupt or truncated layer data"))?;
    let (diff_id, uncompressed_bytes, mut decoder) = diff.finish();
    access.points = decoder.take_points();
    let mut raw = decoder.into_inner();
    let trailing = io::copy(&mut raw, &mut io::sink())
        .with_context(|| format!("{label}: cannot read blob"))?;
    if trailing > 0 {
        warnings.push(format!(
            "{label}: {trailing} bytes after the end of the compressed stream"
        ));
    }
    let (blob_digest, compressed_bytes, _) = raw.into_inner().finish();
    let walked = Walked {
        compression,
        blob_digest,
        compressed_bytes,
        diff_id,
        uncompressed_bytes,
        members,
    };
    Ok((walked, access))
}

/// Where a tar reader starts in a layer stream: the ordinal and the stream
/// position of its first member.
#[derive(Debug, Clone, Copy, Default)]
struct Start {
    ordinal: u64,
    offset: u64,
}

/// Calls `on_member` for every member of `archive`, or up to and including
/// ordinal `last`; returns how many it saw.
/// `at(ordinal, start, data)` learns where each member's headers and data start
/// in the layer stream (`from.offset` + the position in `archive`).
#[allow(clippy::too_many_arguments)]
fn each_member(
    archive: &mut tar::Archive<LayerTar>,
    tap: &Tap<HashRead<Decoder>>,
    label: &str,
    from: Start,
    last: Option<u64>,
    at: &mut dyn FnMut(u64, u64, u64) -> Result<()>,
    on_member: &mut impl FnMut(u64, &mut LayerEntry<'_>, &Raw<'_>) -> Result<()>,
) -> Result<u64> {
    let mut members = 0u64;
    let mut start = 0u64;
    let entries = archive
        .entries()
        .with_context(|| format!("{label}: not a tar stream"))?;
    for (n, entry) in entries.enumerate() {
        let ordinal = from.ordinal as usize + n;
        let mut entry = entry.map_err(|e| {
            anyhow!("{label}: corrupt or truncated layer after {ordinal} members: {e}")
        })?;
        // `size()` honours a PAX `size` record (the header's field may say 0).
        let sparse = entry.header().entry_type().is_gnu_sparse();
        let raw = tap
            .member(
                entry.raw_header_position(),
                entry.raw_file_position(),
                entry.size(),
                sparse,
            )
            .map_err(|e| anyhow!("{label}: member #{ordinal}: {e}"))?;
        at(
            ordinal as u64,
            from.offset + start,
            from.offset + raw.data_start,
        )?;
        start = raw.next_start;
        let raw = Raw {
            pax: raw.pax,
            sparse: raw.sparse,
            tap,
        };
        on_member(ordinal as u64, &mut entry, &raw)?;
        members += 1;
        if last == Some(ordinal as u64) {
            break;
        }
    }
    Ok(members)
}

/// What pass 2's read of one layer cost.
#[derive(Debug, Clone, Copy, Default)]
pub struct Reread {
    /// Bytes decompressed (the layer tar up to the end of the last member read).
    pub inflated_bytes: u64,
    /// Bytes of the blob read (in whole read-buffer steps).
    pub compressed_bytes: u64,
}

/// Pass 2's read of a layer pass 1 verified: only the members `wanted`
/// (ordinals, ascending), each reached from the member before it by
/// decompressing the bytes in between, or — over a long span of a gzip layer —
/// by jumping to the access point before it. Nothing after the last wanted
/// member is read. Nothing is hashed: decompression is deterministic, so while
/// the blob is the one pass 1 proved (the caller compares its size) the bytes
/// are the ones pass 1 checked; every member is also found exactly where pass 1
/// saw it, or the read fails.
pub fn reread_layer(
    blob: Box<dyn Read + Send>,
    desc: &LayerDesc,
    access: &LayerAccess,
    wanted: &[u64],
    mut on_member: impl FnMut(u64, &mut LayerEntry<'_>, &Raw<'_>) -> Result<()>,
) -> Result<Reread> {
    let label = desc.label();
    let moved = || anyhow!("{label}: the layer differs from its first read; did the blob change?");
    let (_, mut decoder) = Decoder::open(blob, desc.size, &label, false, false)?;
    let (mut pos, mut inflated) = (0u64, 0u64);
    for &ordinal in wanted {
        let &(start, _) = access.members.get(ordinal as usize).ok_or_else(moved)?;
        if let Some(point) = access.point_before(pos, start) {
            decoder
                .jump(point)
                .with_context(|| format!("{label}: second read"))?;
            pos = point.uncompressed;
        }
        let skip = start.checked_sub(pos).ok_or_else(moved)?;
        let skipped = io::copy(&mut (&mut decoder).take(skip), &mut io::sink())
            .with_context(|| format!("{label}: corrupt or truncated layer data"))?;
        if skipped != skip {
            return Err(moved());
        }
        inflated += skip;
        let (stream, tap) = TarStream::new(HashRead::counting(decoder, None));
        let mut archive = tar::Archive::new(stream);
        let from = Start {
            ordinal,
            offset: start,
        };
        let seen = each_member(
            &mut archive,
            &tap,
            &label,
            from,
            Some(ordinal),
            &mut |n, start, data| {
                if access.members.get(n as usize) == Some(&(start, data)) {
                    Ok(())
                } else {
                    Err(moved())
                }
            },
            &mut on_member,
        )?;
        if seen != 1 {
            return Err(moved());
        }
        drop(tap);
        let counted = archive.into_inner().into_inner();
        pos = start + counted.count();
        inflated += counted.count();
        decoder = counted.finish().2;
    }
    Ok(Reread {
        inflated_bytes: inflated,
        compressed_bytes: decoder.into_inner().into_inner().count(),
    })
}

/// Streams a layer through [`walk_tar`], then checks size, blob digest and
/// diff_id against its descriptor. Any mismatch is an error naming the layer;
/// the caller must not have produced output from it yet (pass 1), or must
/// discard what it produced (pass 2). `digest_proven`: the blob was hashed against
/// its digest by this process already (see `BlobStore::digest_proven`); its size and
/// diff_id are still checked.
pub fn read_layer(
    blob: Box<dyn Read + Send>,
    desc: &LayerDesc,
    digest_proven: bool,
    warnings: &mut Vec<String>,
    on_member: impl FnMut(u64, &mut LayerEntry<'_>, &Raw<'_>) -> Result<()>,
) -> Result<LayerStats> {
    let label = desc.label();
    let (walked, access) = walk(
        blob,
        desc.size,
        &label,
        warnings,
        true,
        !digest_proven,
        on_member,
    )?;
    if let Some(claimed) = Compression::from_media_type(&desc.media_type) {
        if claimed != walked.compression {
            warnings.push(format!(
                "{label}: media type {} says {claimed:?} but the bytes are {:?}; using {:?}",
                desc.media_type, walked.compression, walked.compression
            ));
        }
    }
    if let Some(size) = desc.size {
        if walked.compressed_bytes != size {
            bail!(
                "{label}: blob is {} bytes but its descriptor declares {size}",
                walked.compressed_bytes
            );
        }
    }
    // A proven blob was only counted: there is no digest of it to compare.
    if let Some(expected) = desc.digest.as_ref().filter(|_| !digest_proven) {
        if &walked.blob_digest != expected {
            bail!(
                "{label}: blob digest mismatch: content hashes to {}",
                walked.blob_digest
            );
        }
    }
    if walked.diff_id != desc.diff_id {
        bail!(
            "{label}: diff_id mismatch: config says {} but the uncompressed layer hashes to {}",
            desc.diff_id,
            walked.diff_id
        );
    }
    Ok(LayerStats {
        compression: walked.compression,
        compressed_bytes: walked.compressed_bytes,
        uncompressed_bytes: walked.uncompressed_bytes,
        members: walked.members,
        seconds: 0.0,
        access: Arc::new(access),
    })
}

/// The uncompressed tar of a layer blob (compression told by its magic bytes).
/// No digest is checked here: callers hash what they read.
pub fn decompressed(blob: Box<dyn Read + Send>) -> Result<Box<dyn Read + Send>> {
    Ok(Box::new(Decoder::open(blob, None, "layer", true, false)?.1))
}

/// Whether a gzip blob is exactly one gzip member (Proxmox's OCI extraction
/// reads only the first). Decompresses the whole blob.
pub fn gzip_is_single_member(blob: Box<dyn Read + Send>) -> Result<bool> {
    let mut raw = BufReader::with_capacity(256 * 1024, blob);
    let mut first = flate2::bufread::GzDecoder::new(&mut raw);
    io::copy(&mut first, &mut io::sink()).context("corrupt gzip layer")?;
    Ok(raw.fill_buf().context("cannot read blob")?.is_empty())
}

/// The latest mtime kept: a 64-bit `time_t`'s maximum. Larger values (base-256
/// header fields reach 2^64) mean nothing on any file system and would not read
/// back from the PAX record the artifact writes for them.
pub const MAX_MTIME: u64 = i64::MAX as u64;

/// A tar member reduced to what the merge needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The name as the archive spells it (`./etc/`), PAX `path` applied.
    pub raw_name: Vec<u8>,
    pub path: RelPath,
    pub role: Role,
    pub kind: MemberKind,
    pub meta: Meta,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberKind {
    Dir,
    File {
        /// The file's size (for a sparse member, with its holes).
        size: u64,
        /// Bytes of it the layer stores (`size`, but for a sparse member).
        stored: u64,
    },
    Symlink(Box<[u8]>),
    Hardlink(RelPath),
    Fifo,
    CharDevice(u32, u32),
    BlockDevice(u32, u32),
    /// Members with no meaning for a filesystem (PAX global headers, unknown types).
    Ignored(String),
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Interprets one tar member. Errors name the member; the caller adds the layer.
pub fn parse_member(entry: &mut LayerEntry<'_>, raw: &Raw<'_>) -> Result<Member> {
    let pax = raw.pax();
    let raw_name = entry.path_bytes().into_owned();
    let mut shown = printable(&raw_name, NAME_SHOWN);
    let header = entry.header();
    let ty = header.entry_type();
    // Blank numeric fields (all NUL/space) occur in hand-made archives; read them
    // as 0 like GNU tar does, but refuse fields that hold garbage.
    let old = header.as_old();
    let numeric = |value: std::io::Result<u64>, raw: &[u8], what: &str| -> Result<u64> {
        match value {
            Ok(v) => Ok(v),
            Err(_) if raw.iter().all(|&b| b == 0 || b == b' ') => Ok(0),
            Err(e) => Err(anyhow!("entry '{shown}': bad {what}: {e}")),
        }
    };
    let mode = numeric(header.mode().map(u64::from), &old.mode, "mode")? as u32 & 0o7777;
    let uid = numeric(header.uid(), &old.uid, "uid")?;
    let gid = numeric(header.gid(), &old.gid, "gid")?;
    let mut mtime = header.mtime().unwrap_or(0);
    let link = entry.link_name_bytes().map(|l| l.into_owned());

    let mut raw_name = raw_name;
    let mut link = link;
    let mut uid = uid;
    let mut gid = gid;
    let mut xattrs: Vec<Xattr> = Vec::new();
    let records = match pax {
        Some(data) => {
            parse_pax(data).map_err(|e| anyhow!("entry '{shown}': bad PAX header: {e}"))?
        }
        None => Vec::new(),
    };
    let number = |v: &[u8]| String::from_utf8_lossy(v).trim().parse::<u64>().ok();
    for (key, value) in records {
        let key = key.as_slice();
        if key == b"path" {
            shown = printable(&value, NAME_SHOWN);
            raw_name = value;
        } else if key == b"linkpath" {
            link = Some(value);
        } else if key == b"uid" {
            uid = number(&value).unwrap_or(uid);
        } else if key == b"gid" {
            gid = number(&value).unwrap_or(gid);
        } else if key == b"mtime" {
            // PAX mtimes may be fractional, negative or huge; keep whole
            // seconds ≥ 0 (clamped below, like base-256 header values).
            let v = lossy(&value);
            let whole = v.split('.').next().unwrap_or("0");
            mtime = whole
                .parse::<i128>()
                .map(|t| t.clamp(0, MAX_MTIME as i128) as u64)
                .unwrap_or(mtime);
        } else if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
            xattrs.push((name.into(), value.into()));
        } else if let Some(name) = key.strip_prefix(b"LIBARCHIVE.xattr.") {
            let name = percent_decode(name);
            let decoded = base64::engine::general_purpose::STANDARD_NO_PAD
                .decode(value.trim_ascii_end())
                .or_else(|_| base64::engine::general_purpose::STANDARD.decode(&value))
                .map_err(|e| anyhow!("entry '{shown}': bad LIBARCHIVE.xattr value: {e}"))?;
            xattrs.push((name.into(), decoded.into()));
        } else if key.starts_with(b"GNU.sparse.") {
            bail!(
                "entry '{shown}': PAX sparse files (GNU.sparse.*) are not supported; \
                 rebuild the layer without --sparse"
            );
        }
    }
    xattrs.sort();
    xattrs.dedup_by(|a, b| a.0 == b.0);

    let path = RelPath::parse(&raw_name).map_err(|e| anyhow!("entry '{shown}': {e}"))?;
    let role = whiteout::classify(&path).map_err(|e| anyhow!("entry '{shown}': {e}"))?;
    let meta = Meta {
        mode,
        uid,
        gid,
        mtime: mtime.min(MAX_MTIME),
        xattrs: xattrs.into(),
    };
    let device = |e: &LayerEntry<'_>| -> (u32, u32) {
        let h = e.header();
        (
            h.device_major().ok().flatten().unwrap_or(0),
            h.device_minor().ok().flatten().unwrap_or(0),
        )
    };
    use tar::EntryType as T;
    let kind = match ty {
        T::Directory => MemberKind::Dir,
        // V7 archives mark directories with a trailing slash on a regular member.
        T::Regular if raw_name.ends_with(b"/") => MemberKind::Dir,
        T::Regular | T::Continuous => MemberKind::File {
            size: entry.size(),
            stored: entry.size(),
        },
        T::GNUSparse => {
            let map = raw
                .sparse()
                .ok_or_else(|| anyhow!("entry '{shown}': sparse member without a map"))?;
            MemberKind::File {
                size: map.real_size,
                stored: map.stored(),
            }
        }
        T::Symlink => {
            let target =
                link.ok_or_else(|| anyhow!("entry '{shown}': symlink without a target"))?;
            // Only a PAX linkpath can carry one; no file system can store it.
            if target.contains(&0) {
                bail!("entry '{shown}': symlink target contains a NUL byte");
            }
            // symlink(2) refuses longer targets with ENAMETOOLONG.
            if target.len() > MAX_PATH_BYTES {
                bail!(
                    "entry '{shown}': symlink target longer than {MAX_PATH_BYTES} bytes ({})",
                    target.len()
                );
            }
            MemberKind::Symlink(target.into())
        }
        T::Link => {
            let target =
                link.ok_or_else(|| anyhow!("entry '{shown}': hardlink without a target"))?;
            let target = RelPath::parse(&target).map_err(|e| {
                anyhow!(
                    "entry '{shown}': hardlink target '{}': {e}",
                    printable(&target, NAME_SHOWN)
                )
            })?;
            MemberKind::Hardlink(target)
        }
        T::Fifo => MemberKind::Fifo,
        T::Char => {
            let (a, b) = device(entry);
            MemberKind::CharDevice(a, b)
        }
        T::Block => {
            let (a, b) = device(entry);
            MemberKind::BlockDevice(a, b)
        }
        T::XGlobalHeader => MemberKind::Ignored("PAX global header".into()),
        other => MemberKind::Ignored(format!(
            "unsupported tar member type {:?}",
            other.as_byte() as char
        )),
    };
    Ok(Member {
        raw_name,
        path,
        role,
        kind,
        meta,
    })
}

fn percent_decode(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' && i + 2 < s.len() {
            if let Ok(v) = u8::from_str_radix(&String::from_utf8_lossy(&s[i + 1..i + 3]), 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(s[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffs_magic() {
        assert_eq!(Compression::sniff(&[0x1f, 0x8b, 8]), Compression::Gzip);
        assert_eq!(
            Compression::sniff(&[0x28, 0xb5, 0x2f, 0xfd]),
            Compression::Zstd
        );
        assert_eq!(Compression::sniff(b"\xfd7zXZ\0"), Compression::Xz);
        assert_eq!(Compression::sniff(b"etc/"), Compression::Plain);
        assert_eq!(Compression::sniff(b""), Compression::Plain);
    }

    #[test]
    fn media_type_claims() {
        use Compression::*;
        let m = Compression::from_media_type;
        assert_eq!(m("application/vnd.oci.image.layer.v1.tar+gzip"), Some(Gzip));
        assert_eq!(m("application/vnd.oci.image.layer.v1.tar+zstd"), Some(Zstd));
        assert_eq!(m("application/vnd.oci.image.layer.v1.tar"), Some(Plain));
        assert_eq!(
            m("application/vnd.docker.image.rootfs.diff.tar.gzip"),
            Some(Gzip)
        );
        assert_eq!(m("application/octet-stream"), None);
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode(b"user.a%20b"), b"user.a b");
        assert_eq!(percent_decode(b"user.%zz"), b"user.%zz");
        assert_eq!(percent_decode(b"user.%4"), b"user.%4");
    }
}

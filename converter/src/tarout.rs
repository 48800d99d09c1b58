//! A deterministic tar writer for rootfs artifacts: ustar headers with PAX
//! extended records only where ustar cannot say it (long names and link targets,
//! large ids, sizes and times, xattrs). Same input → same bytes.
//!
//! Sparse files keep their holes: they are written as old GNU sparse members
//! (`S`, a GNU header whose map lists the stored chunks, extension blocks for
//! more than four), the one sparse format both of Proxmox's extractors restore
//! — GNU tar for rootfs templates (with or without `--sparse`) and the `tar`
//! crate for OCI layers (which does not know PAX sparse). Names, ids, times and
//! xattrs still go in a PAX header before it, which both read.
//!
//! Names are written byte-exact, non-UTF-8 included. No `hdrcharset=BINARY`
//! record: GNU tar 1.34 (Proxmox's extractor) warns about it on every member and
//! already takes PAX names as raw bytes.

use std::io::{self, Read, Write};

use crate::acceptance::{Member, MemberRules, Node};
use crate::path::RelPath;
use crate::tarstream::SparseMap;
use crate::tree::Xattr;
use crate::whiteout::{self, Role};

const BLOCK: usize = 512;
const USTAR_NAME_MAX: usize = 100;
/// Largest value of an 8-byte octal field (uid, gid, mode).
const OCTAL7_MAX: u64 = 0o7777777;
/// Largest value of a 12-byte octal field (size, mtime).
const OCTAL11_MAX: u64 = 0o77777777777;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutKind {
    Dir,
    File,
    Symlink,
    Hardlink,
    Fifo,
}

/// One member to write. `name` is the final member name (`./etc/`, `./bin/sh`).
pub struct OutEntry<'a> {
    pub name: &'a [u8],
    pub kind: OutKind,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: u64,
    pub size: u64,
    pub link: Option<&'a [u8]>,
    pub xattrs: &'a [Xattr],
}

/// Size of the buffer member data is copied through.
const COPY_BUF: usize = 256 * 1024;

pub struct TarWriter<W: Write> {
    out: W,
    written: u64,
    /// Proxmox's acceptance rules, fed every member written (see
    /// [`TarWriter::check_with`]).
    rules: Option<MemberRules>,
    /// The buffer member data passes through, allocated on first use and kept:
    /// one fresh zeroed 256 KiB buffer per member cost 1.5 % of a conversion.
    copy_buf: Vec<u8>,
}

fn pax_record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    // "<len> <key>=<value>\n" where <len> counts itself.
    let base = key.len() + value.len() + 3;
    let mut len = base + 1;
    loop {
        let next = base + len.to_string().len();
        if next == len {
            break;
        }
        len = next;
    }
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

fn padding(len: u64) -> usize {
    ((BLOCK as u64 - len % BLOCK as u64) % BLOCK as u64) as usize
}

impl<W: Write> TarWriter<W> {
    pub fn new(out: W) -> Self {
        TarWriter {
            out,
            written: 0,
            rules: None,
            copy_buf: Vec::new(),
        }
    }

    /// Holds every member written from now on to `rules`: the same rules
    /// `verify` applies when it reads the archive back.
    pub fn check_with(&mut self, rules: MemberRules) {
        self.rules = Some(rules);
    }

    /// The rules given to [`TarWriter::check_with`], with what they saw.
    pub fn take_rules(&mut self) -> Option<MemberRules> {
        self.rules.take()
    }

    fn observe(rules: &mut MemberRules, e: &OutEntry<'_>) {
        let path = RelPath::parse(e.name).unwrap_or_else(|_| RelPath::root());
        let whiteout = !matches!(whiteout::classify(&path), Ok(Role::Plain));
        let node = match e.kind {
            OutKind::Dir => Node::Dir,
            OutKind::File => Node::File {
                executable: e.mode & 0o111 != 0,
            },
            OutKind::Symlink => Node::Symlink(e.link.unwrap_or_default().to_vec()),
            OutKind::Hardlink => Node::Hardlink(
                RelPath::parse(e.link.unwrap_or_default()).unwrap_or_else(|_| RelPath::root()),
            ),
            OutKind::Fifo => Node::Other,
        };
        rules.observe(Member {
            raw_name: e.name,
            path,
            node,
            uid: e.uid,
            gid: e.gid,
            xattr_names: e.xattrs.iter().map(|(k, _)| &k[..]).collect(),
            whiteout,
        });
    }

    /// Uncompressed bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn header(
        name: &[u8],
        ty: tar::EntryType,
        mode: u32,
        ids: (u64, u64),
        size: u64,
        mtime: u64,
        link: Option<&[u8]>,
    ) -> tar::Header {
        let mut h = if ty == tar::EntryType::GNUSparse {
            tar::Header::new_gnu()
        } else {
            tar::Header::new_ustar()
        };
        {
            // The name and link fields sit at the same place in both formats.
            let u = h.as_old_mut();
            let n = name.len().min(USTAR_NAME_MAX);
            u.name[..n].copy_from_slice(&name[..n]);
            if let Some(link) = link {
                let n = link.len().min(USTAR_NAME_MAX);
                u.linkname[..n].copy_from_slice(&link[..n]);
            }
        }
        h.set_entry_type(ty);
        h.set_mode(mode);
        h.set_uid(if ids.0 > OCTAL7_MAX { 0 } else { ids.0 });
        h.set_gid(if ids.1 > OCTAL7_MAX { 0 } else { ids.1 });
        if ty == tar::EntryType::GNUSparse {
            // GNU base-256 beyond 8 GiB: a PAX `size` would not say whether it
            // means the stored or the real size.
            h.set_size(size);
        } else {
            h.set_size(if size > OCTAL11_MAX { 0 } else { size });
        }
        h.set_mtime(if mtime > OCTAL11_MAX { 0 } else { mtime });
        h
    }

    /// Writes the header(s) of an entry. For [`OutKind::File`] the caller then
    /// writes exactly `size` bytes with [`TarWriter::append_data`].
    pub fn append(&mut self, e: &OutEntry<'_>) -> io::Result<()> {
        if let Some(rules) = &mut self.rules {
            Self::observe(rules, e);
        }
        self.put_pax(e, true)?;
        let ty = match e.kind {
            OutKind::Dir => tar::EntryType::Directory,
            OutKind::File => tar::EntryType::Regular,
            OutKind::Symlink => tar::EntryType::Symlink,
            OutKind::Hardlink => tar::EntryType::Link,
            OutKind::Fifo => tar::EntryType::Fifo,
        };
        let size = if e.kind == OutKind::File { e.size } else { 0 };
        let mut h = Self::header(e.name, ty, e.mode, (e.uid, e.gid), size, e.mtime, e.link);
        h.set_cksum();
        self.put(h.as_bytes())
    }

    /// Writes the headers of a sparse file `e` (an old GNU sparse member): the
    /// caller then writes its stored chunks back to back, [`SparseMap::stored`]
    /// bytes, with [`TarWriter::append_data`]. `e.size` is the real size.
    pub fn append_sparse(&mut self, e: &OutEntry<'_>, map: &SparseMap) -> io::Result<()> {
        debug_assert!(e.kind == OutKind::File && e.size == map.real_size);
        if let Some(rules) = &mut self.rules {
            Self::observe(rules, e);
        }
        self.put_pax(e, false)?;
        // A hole at the end is told by one last empty chunk at the real size,
        // as GNU tar writes it (it extends the file there).
        let mut pairs = map.chunks.clone();
        let end = pairs.last().map_or(0, |&(o, l)| o + l);
        if end < map.real_size {
            pairs.push((map.real_size, 0));
        }
        let mut h = Self::header(
            e.name,
            tar::EntryType::GNUSparse,
            e.mode,
            (e.uid, e.gid),
            map.stored(),
            e.mtime,
            None,
        );
        let gnu = h.as_gnu_mut().expect("GNU header");
        for (slot, &(offset, len)) in gnu.sparse.iter_mut().zip(&pairs) {
            slot.set_offset(offset);
            slot.set_length(len);
        }
        gnu.set_real_size(map.real_size);
        let in_header = gnu.sparse.len();
        gnu.set_is_extended(pairs.len() > in_header);
        h.set_cksum();
        self.put(h.as_bytes())?;
        let rest = pairs.get(in_header..).unwrap_or_default();
        let blocks: Vec<&[(u64, u64)]> = rest.chunks(21).collect();
        for (i, block) in blocks.iter().enumerate() {
            let mut ext = tar::GnuExtSparseHeader::new();
            for (slot, &(offset, len)) in ext.sparse_mut().iter_mut().zip(block.iter()) {
                slot.set_offset(offset);
                slot.set_length(len);
            }
            ext.set_is_extended(i + 1 < blocks.len());
            self.put(ext.as_bytes())?;
        }
        Ok(())
    }

    /// The PAX header of `e`, when ustar cannot say everything (`size`: may
    /// carry a PAX `size` record).
    fn put_pax(&mut self, e: &OutEntry<'_>, size: bool) -> io::Result<()> {
        let mut pax = Vec::new();
        if e.name.len() > USTAR_NAME_MAX {
            pax_record(&mut pax, b"path", e.name);
        }
        if let Some(link) = e.link {
            if link.len() > USTAR_NAME_MAX {
                pax_record(&mut pax, b"linkpath", link);
            }
        }
        if e.uid > OCTAL7_MAX {
            pax_record(&mut pax, b"uid", e.uid.to_string().as_bytes());
        }
        if e.gid > OCTAL7_MAX {
            pax_record(&mut pax, b"gid", e.gid.to_string().as_bytes());
        }
        if size && e.size > OCTAL11_MAX {
            pax_record(&mut pax, b"size", e.size.to_string().as_bytes());
        }
        if e.mtime > OCTAL11_MAX {
            pax_record(&mut pax, b"mtime", e.mtime.to_string().as_bytes());
        }
        for (k, v) in e.xattrs {
            let mut key = b"SCHILY.xattr.".to_vec();
            key.extend_from_slice(k);
            pax_record(&mut pax, &key, v);
        }
        if !pax.is_empty() {
            let mut h = Self::header(
                b"././@PaxHeader",
                tar::EntryType::XHeader,
                0o644,
                (0, 0),
                pax.len() as u64,
                0,
                None,
            );
            h.set_cksum();
            self.put(h.as_bytes())?;
            self.put(&pax)?;
            self.put(&[0u8; BLOCK][..padding(pax.len() as u64)])?;
        }
        Ok(())
    }

    /// Copies exactly `size` bytes of file content and pads to a block. `tick` is
    /// called with each chunk's length (progress, cancellation).
    pub fn append_data(
        &mut self,
        data: &mut dyn Read,
        size: u64,
        tick: &mut dyn FnMut(u64) -> io::Result<()>,
    ) -> io::Result<()> {
        if self.copy_buf.is_empty() {
            self.copy_buf = vec![0u8; COPY_BUF];
        }
        let mut left = size;
        while left > 0 {
            let want = left.min(COPY_BUF as u64) as usize;
            let n = data.read(&mut self.copy_buf[..want])?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("file data ended {left} bytes early"),
                ));
            }
            // `put`, on the disjoint fields: `self.put` would borrow the buffer too.
            self.out.write_all(&self.copy_buf[..n])?;
            self.written += n as u64;
            left -= n as u64;
            tick(n as u64)?;
        }
        self.put(&[0u8; BLOCK][..padding(size)])
    }

    /// Writes the end-of-archive marker and returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.put(&[0u8; BLOCK * 2])?;
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_record_lengths_count_themselves() {
        let mut v = Vec::new();
        pax_record(&mut v, b"path", b"x");
        assert_eq!(v, b"9 path=x\n");
        let mut v = Vec::new();
        pax_record(&mut v, b"path", b"abcd");
        assert_eq!(v, b"13 path=abcd\n");
        let mut v = Vec::new();
        let long = vec![b'a'; 95];
        pax_record(&mut v, b"path", &long);
        let text = String::from_utf8(v.clone()).unwrap();
        let (len, _) = text.split_once(' ').unwrap();
        assert_eq!(len.parse::<usize>().unwrap(), v.len());
    }

    #[test]
    fn round_trips_through_tar_reader() {
        let long_name = format!("./{}/file", "d".repeat(150));
        let mut w = TarWriter::new(Vec::new());
        let xattrs: Vec<Xattr> = vec![(b"user.k"[..].into(), b"\x00\x01v"[..].into())];
        w.append(&OutEntry {
            name: long_name.as_bytes(),
            kind: OutKind::File,
            mode: 0o4755,
            uid: 3_000_000,
            gid: 70000,
            mtime: 1_700_000_000,
            size: 3,
            link: None,
            xattrs: &xattrs,
        })
        .unwrap();
        w.append_data(&mut &b"abc"[..], 3, &mut |_| Ok(())).unwrap();
        w.append(&OutEntry {
            name: b"./\xff-link",
            kind: OutKind::Symlink,
            mode: 0o777,
            uid: 0,
            gid: 0,
            mtime: 0,
            size: 0,
            link: Some(&[b'x'; 120]),
            xattrs: &[],
        })
        .unwrap();
        let bytes = w.finish().unwrap();
        let mut ar = tar::Archive::new(&bytes[..]);
        let mut it = ar.entries().unwrap();
        let mut e = it.next().unwrap().unwrap();
        assert_eq!(e.path_bytes().as_ref(), long_name.as_bytes());
        assert_eq!(e.header().uid().unwrap(), 3_000_000);
        assert_eq!(e.header().gid().unwrap(), 70000);
        assert_eq!(e.header().mode().unwrap(), 0o4755);
        let mut found = false;
        for ext in e.pax_extensions().unwrap().unwrap() {
            let ext = ext.unwrap();
            if ext.key_bytes() == b"SCHILY.xattr.user.k" {
                assert_eq!(ext.value_bytes(), b"\x00\x01v");
                found = true;
            }
        }
        assert!(found);
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        assert_eq!(data, b"abc");
        let e = it.next().unwrap().unwrap();
        assert_eq!(e.path_bytes().as_ref(), b"./\xff-link");
        assert_eq!(e.link_name_bytes().unwrap().as_ref(), &[b'x'; 120][..]);
        assert!(it.next().is_none());
    }

    #[test]
    fn sparse_members_read_back_with_their_map() {
        use std::io::{Seek, SeekFrom};
        // 30 chunks (two extension blocks), offsets past 8 GiB (base-256
        // fields), a trailing hole, a long name (PAX path).
        let chunks: Vec<(u64, u64)> = (0..30).map(|i| (i * (1 << 30), 512)).collect();
        let map = SparseMap {
            real_size: 40 << 30,
            chunks: chunks.clone(),
        };
        let name = format!("./{}/sparse", "d".repeat(120));
        let mut w = TarWriter::new(Vec::new());
        w.append_sparse(
            &OutEntry {
                name: name.as_bytes(),
                kind: OutKind::File,
                mode: 0o600,
                uid: 0,
                gid: 0,
                mtime: 1_700_000_000,
                size: map.real_size,
                link: None,
                xattrs: &[],
            },
            &map,
        )
        .unwrap();
        let data: Vec<u8> = (0..30u8).flat_map(|i| [b'a' + i % 26; 512]).collect();
        w.append_data(&mut &data[..], data.len() as u64, &mut |_| Ok(()))
            .unwrap();
        let bytes = w.finish().unwrap();
        // Map, extension blocks and stored data: a few blocks, not 40 GiB.
        assert!(bytes.len() < 40 << 10, "{} bytes", bytes.len());
        let dir = tempfile::tempdir().unwrap();
        let mut ar = tar::Archive::new(&bytes[..]);
        let mut e = ar.entries().unwrap().next().unwrap().unwrap();
        assert_eq!(e.path_bytes().as_ref(), name.as_bytes());
        assert_eq!(e.header().entry_type(), tar::EntryType::GNUSparse);
        assert_eq!(e.size(), 40 << 30);
        let path = dir.path().join("sparse");
        e.unpack(&path).unwrap();
        let mut f = std::fs::File::open(&path).unwrap();
        assert_eq!(f.metadata().unwrap().len(), 40 << 30);
        for (i, (offset, _)) in chunks.iter().enumerate() {
            let mut buf = [0u8; 513];
            f.seek(SeekFrom::Start(*offset)).unwrap();
            f.read_exact(&mut buf).unwrap();
            assert!(buf[..512].iter().all(|&b| b == b'a' + i as u8 % 26));
            assert_eq!(buf[512], 0);
        }
    }

    #[test]
    fn short_data_is_an_error() {
        let mut w = TarWriter::new(Vec::new());
        let err = w
            .append_data(&mut &b"ab"[..], 3, &mut |_| Ok(()))
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}

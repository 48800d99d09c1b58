//! The layer's tar stream as the tar reader sees it, with the repairs and
//! views the `tar` crate cannot give on its own:
//!
//! * **Raw PAX records.** `tar` splits PAX data on `\n`, but records are
//!   length-prefixed and xattr values may contain newlines (a capability blob
//!   with byte 0x0a, from a plain `setcap`). We keep the raw bytes between one
//!   member's data and the next member's header — the extension headers — and
//!   parse the records ourselves.
//! * **Sparse maps.** An old GNU sparse member (`S`) lists where its stored
//!   chunks go in the file, in its header and in extension blocks after it;
//!   `tar` hides the map and expands the holes when the entry is read. The map
//!   is parsed here from the raw header bytes, and [`Tap::read_data`] reads the
//!   stored chunks straight from the stream, so that a hole costs nothing
//!   however large its header claims it is.
//! * **Missing padding at the very end.** `umoci insert` ends a layer right after
//!   the last member's data, without padding it to a block or writing the
//!   end-of-archive marker. Once that data is complete, the missing padding is
//!   supplied as zeros (never hashed: this sits above the diff_id hash).

use std::cell::RefCell;
use std::io::{self, Read};
use std::rc::Rc;

const BLOCK: u64 = 512;
/// Extension headers larger than this are refused (no legitimate PAX header is).
/// The extension blocks of a sparse map count too: at most about 43,000 chunks.
pub const MAX_EXTENSION_BYTES: usize = 1 << 20;

#[derive(Default)]
struct State {
    pos: u64,
    /// Bytes at or after this position are kept in `captured`.
    record_from: u64,
    captured: Vec<u8>,
    /// Where the current member's data starts and ends: padding may be
    /// supplied from its end on.
    data_start: u64,
    data_end: u64,
    overflow: bool,
    /// Data bytes taken by [`Tap::read_data`]; the tar reader, which then
    /// skips the member's data, is served as many placeholder bytes.
    owed: u64,
}

struct Shared<R> {
    state: State,
    inner: R,
}

/// Shared view of the stream state, kept by the layer reader.
pub struct Tap<R>(Rc<RefCell<Shared<R>>>);

pub struct TarStream<R>(Rc<RefCell<Shared<R>>>);

impl<R: Read> TarStream<R> {
    pub fn new(inner: R) -> (Self, Tap<R>) {
        let shared = Rc::new(RefCell::new(Shared {
            state: State::default(),
            inner,
        }));
        (TarStream(shared.clone()), Tap(shared))
    }

    /// The stream below; the [`Tap`] must have been dropped.
    pub fn into_inner(self) -> R {
        match Rc::try_unwrap(self.0) {
            Ok(shared) => shared.into_inner().inner,
            Err(_) => panic!("TarStream::into_inner while its Tap is alive"),
        }
    }
}

impl<R: Read> Read for TarStream<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut shared = self.0.borrow_mut();
        let Shared { state: st, inner } = &mut *shared;
        if st.overflow {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("extension headers larger than {MAX_EXTENSION_BYTES} bytes"),
            ));
        }
        if st.owed > 0 {
            let n = st.owed.min(buf.len() as u64) as usize;
            buf[..n].fill(0);
            st.owed -= n as u64;
            return Ok(n);
        }
        let n = inner.read(buf)?;
        if n == 0 {
            let rem = st.pos % BLOCK;
            if rem != 0 && st.pos >= st.data_end && !buf.is_empty() {
                let pad = ((BLOCK - rem) as usize).min(buf.len());
                buf[..pad].fill(0);
                st.pos += pad as u64;
                return Ok(pad);
            }
            return Ok(0);
        }
        let end = st.pos + n as u64;
        if end > st.record_from {
            let start = st.record_from.saturating_sub(st.pos) as usize;
            st.captured.extend_from_slice(&buf[start..n]);
            if st.captured.len() > MAX_EXTENSION_BYTES + 2 * BLOCK as usize {
                st.overflow = true;
            }
        }
        st.pos = end;
        Ok(n)
    }
}

/// Where the stored chunks of a sparse file go: `(offset, length)` pairs in
/// increasing order, never overlapping, all within `real_size`. Everything
/// else of the file is a hole. Zero-length chunks are left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SparseMap {
    pub real_size: u64,
    pub chunks: Vec<(u64, u64)>,
}

impl SparseMap {
    /// Bytes of data the member stores (its chunks back to back).
    pub fn stored(&self) -> u64 {
        self.chunks.iter().map(|c| c.1).sum()
    }
}

/// What [`Tap::member`] learnt about a member from its raw bytes.
pub struct RawMember {
    /// The data of its PAX extended header (`x`), if any.
    pub pax: Option<Vec<u8>>,
    /// Its map, for an old GNU sparse member.
    pub sparse: Option<SparseMap>,
    /// Where its data starts in the stream, and where the next member's first
    /// header block starts (its data padded to whole blocks).
    pub data_start: u64,
    pub next_start: u64,
}

impl<R: Read> Tap<R> {
    /// Called for each member the tar reader yields, with the positions it
    /// reports and, for a member that is not sparse, its data length: returns
    /// the raw PAX data that applies to it (if any) and its sparse map (if
    /// `sparse`), and starts watching for the next member.
    pub fn member(
        &self,
        header_pos: u64,
        data_pos: u64,
        data_len: u64,
        sparse: bool,
    ) -> Result<RawMember, String> {
        let mut shared = self.0.borrow_mut();
        let st = &mut shared.state;
        let header_at = header_pos.saturating_sub(st.record_from) as usize;
        let region = &st.captured[..header_at.min(st.captured.len())];
        let pax = last_pax_data(region);
        // The tar reader reports a sparse member's data position before its
        // extension blocks, and its expanded size: take both from the map.
        let (map, data_pos, data_len) = if sparse {
            let (map, ext_blocks) = st
                .captured
                .get(header_at..)
                .ok_or_else(|| "sparse header not seen".to_string())
                .and_then(parse_sparse)?;
            let stored = map.stored();
            (Some(map), header_pos + BLOCK * (1 + ext_blocks), stored)
        } else {
            (None, data_pos, data_len)
        };
        let padded = data_len.div_ceil(BLOCK) * BLOCK;
        st.record_from = data_pos + padded;
        st.data_start = data_pos;
        st.data_end = data_pos + data_len;
        st.captured.clear();
        Ok(RawMember {
            pax,
            sparse: map,
            data_start: data_pos,
            next_start: data_pos + padded,
        })
    }

    /// Reads the current member's data straight from the stream (for a sparse
    /// member: its stored chunks back to back, without the holes), up to its
    /// end. The tar reader must not read that member afterwards: it only skips
    /// it, and is handed placeholder bytes for what was read here.
    pub fn read_data(&self, buf: &mut [u8]) -> io::Result<usize> {
        let mut shared = self.0.borrow_mut();
        let Shared { state: st, inner } = &mut *shared;
        if st.pos < st.data_start || st.owed != st.pos - st.data_start {
            return Err(io::Error::other(
                "member data read both through the tar reader and directly",
            ));
        }
        let want = st.data_end.saturating_sub(st.pos).min(buf.len() as u64) as usize;
        if want == 0 {
            return Ok(0);
        }
        let n = inner.read(&mut buf[..want])?;
        st.pos += n as u64;
        st.owed += n as u64;
        Ok(n)
    }
}

/// Parses an old GNU sparse header (`S`) and the extension blocks after it,
/// as the `tar` crate does (which has already checked the map against the
/// sizes): four `(offset, length)` pairs in the header, 21 in each extension
/// block, a pair whose fields start with a NUL byte is empty. Returns the map
/// and the number of extension blocks.
fn parse_sparse(bytes: &[u8]) -> Result<(SparseMap, u64), String> {
    let header = bytes
        .get(..BLOCK as usize)
        .ok_or("truncated sparse header")?;
    let number = |field: &[u8], what: &str| {
        octal_or_binary(field).ok_or_else(|| format!("bad sparse {what} field"))
    };
    let real_size = number(&header[483..495], "real size")?;
    let mut chunks: Vec<(u64, u64)> = Vec::new();
    let mut end = 0u64;
    let mut add = |pair: &[u8]| -> Result<(), String> {
        if pair[0] == 0 || pair[12] == 0 {
            return Ok(());
        }
        let offset = number(&pair[..12], "offset")?;
        let len = number(&pair[12..24], "length")?;
        let chunk_end = offset.checked_add(len).ok_or("sparse chunk overflows")?;
        if offset < end || chunk_end > real_size {
            return Err("sparse chunks out of order or past the file's size".into());
        }
        end = chunk_end;
        if len > 0 {
            chunks.push((offset, len));
        }
        Ok(())
    };
    for pair in header[386..482].chunks(24) {
        add(pair)?;
    }
    let mut extended = header[482] == 1;
    let mut blocks = 0u64;
    while extended {
        let at = (BLOCK * (1 + blocks)) as usize;
        let block = bytes
            .get(at..at + BLOCK as usize)
            .ok_or("truncated sparse extension block")?;
        for pair in block[..504].chunks(24) {
            add(pair)?;
        }
        extended = block[504] == 1;
        blocks += 1;
    }
    Ok((SparseMap { real_size, chunks }, blocks))
}

/// A numeric header field: octal text, or GNU base-256 when the top bit is set.
pub fn octal_or_binary(field: &[u8]) -> Option<u64> {
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        // GNU base-256: big-endian, the top bit of the first byte is a flag.
        let mut v: u64 = (field[0] & 0x7f) as u64;
        for &b in &field[1..] {
            v = v.checked_mul(256)?.checked_add(b as u64)?;
        }
        return Some(v);
    }
    let text: Vec<u8> = field
        .iter()
        .copied()
        .skip_while(|b| *b == b' ')
        .take_while(|b| (b'0'..=b'7').contains(b))
        .collect();
    if text.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(std::str::from_utf8(&text).ok()?, 8).ok()
}

/// Walks extension headers (`x`, `g`, `L`, `K`…) in `region` and returns the
/// data of the last local PAX header (`x`).
fn last_pax_data(region: &[u8]) -> Option<Vec<u8>> {
    let mut at = 0usize;
    let mut found = None;
    while at + BLOCK as usize <= region.len() {
        let h = &region[at..at + BLOCK as usize];
        let size = octal_or_binary(&h[124..136])? as usize;
        let data_start = at + BLOCK as usize;
        let data_end = data_start.checked_add(size)?;
        if h[156] == b'x' && data_end <= region.len() {
            found = Some(region[data_start..data_end].to_vec());
        }
        at = data_start + size.div_ceil(BLOCK as usize) * BLOCK as usize;
    }
    found
}

/// Parses PAX records (`<len> <key>=<value>\n`, `len` counting the whole record),
/// so values may hold any byte, newlines included.
/// One PAX record: key and raw value.
pub type PaxRecord = (Vec<u8>, Vec<u8>);

pub fn parse_pax(data: &[u8]) -> Result<Vec<PaxRecord>, String> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < data.len() {
        // Trailing NUL padding some writers leave.
        if data[at..].iter().all(|&b| b == 0) {
            break;
        }
        let space = data[at..]
            .iter()
            .position(|&b| b == b' ')
            .ok_or("PAX record without a length")?;
        let len: usize = std::str::from_utf8(&data[at..at + space])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or("PAX record with a bad length")?;
        let end = at
            .checked_add(len)
            .filter(|&e| e <= data.len() && len > space + 1);
        let end = end.ok_or("PAX record longer than its header")?;
        if data[end - 1] != b'\n' {
            return Err("PAX record not ended by a newline".into());
        }
        let record = &data[at + space + 1..end - 1];
        let eq = record
            .iter()
            .position(|&b| b == b'=')
            .ok_or("PAX record without '='")?;
        out.push((record[..eq].to_vec(), record[eq + 1..].to_vec()));
        at = end;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_may_contain_newlines() {
        let value = b"\x01\x00\x00\x02\n\x00\x00\x00";
        let mut rec = Vec::new();
        let body_len = b"SCHILY.xattr.security.capability=".len() + value.len() + 1;
        let len = body_len + 3; // "NN " with two digits
        rec.extend_from_slice(format!("{len} SCHILY.xattr.security.capability=").as_bytes());
        rec.extend_from_slice(value);
        rec.push(b'\n');
        rec.extend_from_slice(b"8 uid=7\n\0\0");
        let parsed = parse_pax(&rec).unwrap();
        assert_eq!(parsed[0].1, value);
        assert_eq!(parsed[1], (b"uid".to_vec(), b"7".to_vec()));
    }

    #[test]
    fn malformed_records_are_errors() {
        assert!(parse_pax(b"abc").is_err());
        assert!(parse_pax(b"99 path=x\n").is_err());
        assert!(parse_pax(b"9 path=xy").is_err());
        assert!(parse_pax(b"8 pathx\n").is_err());
    }

    #[test]
    fn padding_is_supplied_only_after_complete_data() {
        // 512-byte header, 7 data bytes, then EOF.
        let mut bytes = vec![0u8; 512];
        bytes.extend_from_slice(b"1234567");
        let (mut s, tap) = TarStream::new(&bytes[..]);
        let mut header = vec![0u8; 512];
        s.read_exact(&mut header).unwrap();
        tap.member(0, 512, 7, false).unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        assert_eq!(rest.len(), 512);
        assert_eq!(&rest[..7], b"1234567");
        assert!(rest[7..].iter().all(|&b| b == 0));

        // Data declared as 1000 bytes but only 7 present: no padding, EOF stays.
        let (mut s, tap) = TarStream::new(&bytes[..]);
        s.read_exact(&mut header).unwrap();
        tap.member(0, 512, 1000, false).unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        assert_eq!(rest.len(), 7);
    }
}

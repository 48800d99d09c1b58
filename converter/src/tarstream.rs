//! The layer's tar stream as the tar reader sees it, with two repairs the
//! `tar` crate cannot make on its own:
//!
//! * **Raw PAX records.** `tar` splits PAX data on `\n`, but records are
//!   length-prefixed and xattr values may contain newlines (a capability blob
//!   with byte 0x0a, from a plain `setcap`). We keep the raw bytes between one
//!   member's data and the next member's header — the extension headers — and
//!   parse the records ourselves.
//! * **Missing padding at the very end.** `umoci insert` ends a layer right after
//!   the last member's data, without padding it to a block or writing the
//!   end-of-archive marker. Once that data is complete, the missing padding is
//!   supplied as zeros (never hashed: this sits above the diff_id hash).

use std::cell::RefCell;
use std::io::{self, Read};
use std::rc::Rc;

const BLOCK: u64 = 512;
/// Extension headers larger than this are refused (no legitimate PAX header is).
pub const MAX_EXTENSION_BYTES: usize = 1 << 20;

#[derive(Default)]
struct State {
    pos: u64,
    /// Bytes at or after this position are kept in `captured`.
    record_from: u64,
    captured: Vec<u8>,
    /// End of the current member's data: padding may be supplied from here on.
    data_end: u64,
    overflow: bool,
}

/// Shared view of the stream state, kept by the layer reader.
#[derive(Clone, Default)]
pub struct Tap(Rc<RefCell<State>>);

pub struct TarStream<R> {
    inner: R,
    tap: Tap,
}

impl<R: Read> TarStream<R> {
    pub fn new(inner: R) -> (Self, Tap) {
        let tap = Tap::default();
        (
            TarStream {
                inner,
                tap: tap.clone(),
            },
            tap,
        )
    }

    pub fn into_inner(self) -> R {
        self.inner
    }
}

impl<R: Read> Read for TarStream<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut st = self.tap.0.borrow_mut();
        if st.overflow {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("extension headers larger than {MAX_EXTENSION_BYTES} bytes"),
            ));
        }
        let n = self.inner.read(buf)?;
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

impl Tap {
    /// Called for each member the tar reader yields: returns the raw PAX data
    /// that applies to it (if any) and starts watching for the next member.
    pub fn member(&self, header_pos: u64, data_pos: u64, data_len: u64) -> Option<Vec<u8>> {
        let mut st = self.0.borrow_mut();
        let region_len = header_pos.saturating_sub(st.record_from) as usize;
        let region = &st.captured[..region_len.min(st.captured.len())];
        let pax = last_pax_data(region);
        let padded = data_len.div_ceil(BLOCK) * BLOCK;
        st.record_from = data_pos + padded;
        st.data_end = data_pos + data_len;
        st.captured.clear();
        pax
    }
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
        tap.member(0, 512, 7);
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        assert_eq!(rest.len(), 512);
        assert_eq!(&rest[..7], b"1234567");
        assert!(rest[7..].iter().all(|&b| b == 0));

        // Data declared as 1000 bytes but only 7 present: no padding, EOF stays.
        let (mut s, tap) = TarStream::new(&bytes[..]);
        s.read_exact(&mut header).unwrap();
        tap.member(0, 512, 1000);
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        assert_eq!(rest.len(), 7);
    }
}

//! gzip decompression of layer blobs with zlib-rs (through its zlib C API,
//! `libz-rs-sys`): member after member, like `gzip -d`. On the benchmark image
//! it inflates markedly faster than `flate2`'s default backend (miniz_oxide;
//! figures in docs/benchmarks.md). Compression is not touched: gzip *output*
//! stays on `flate2`, so artifacts keep their bytes.

use std::ffi::CStr;
use std::io::{self, BufRead, Read};

use libz_rs_sys as z;

/// gzip wrapper only (no zlib or raw deflate), largest window.
const GZIP_WINDOW_BITS: i32 = 15 + 16;

/// One zlib inflate state; ended when dropped. Boxed: zlib keeps a pointer
/// back to the stream, which therefore may not move.
struct Stream(Box<z::z_stream>);

impl Stream {
    fn new() -> io::Result<Self> {
        let mut strm = Box::<z::z_stream>::default();
        // SAFETY: `strm` is a valid, default-initialised stream (allocator set),
        // version and size are this library's own.
        let rc = unsafe {
            z::inflateInit2_(
                &mut *strm,
                GZIP_WINDOW_BITS,
                z::zlibVersion(),
                std::mem::size_of::<z::z_stream>() as i32,
            )
        };
        if rc != z::Z_OK {
            return Err(io::Error::other(format!(
                "cannot start gzip decoder ({rc})"
            )));
        }
        Ok(Stream(strm))
    }

    /// Ready for the next gzip member.
    fn reset(&mut self) -> io::Result<()> {
        // SAFETY: the stream was initialised by `new`.
        match unsafe { z::inflateReset(&mut *self.0) } {
            z::Z_OK => Ok(()),
            rc => Err(io::Error::other(format!(
                "cannot reset gzip decoder ({rc})"
            ))),
        }
    }

    /// Inflates from `input` into `out`; returns (zlib's code, bytes consumed,
    /// bytes produced).
    fn inflate(&mut self, input: &[u8], out: &mut [u8]) -> (i32, usize, usize) {
        let (in_len, out_len) = (
            input.len().min(u32::MAX as usize),
            out.len().min(u32::MAX as usize),
        );
        let s = &mut *self.0;
        s.next_in = input.as_ptr();
        s.avail_in = in_len as u32;
        s.next_out = out.as_mut_ptr();
        s.avail_out = out_len as u32;
        // SAFETY: the buffers are valid for the lengths given and outlive the
        // call; zlib keeps no pointer into them that is used after it returns
        // (both are set again before every call).
        let rc = unsafe { z::inflate(s, z::Z_NO_FLUSH) };
        let consumed = in_len - s.avail_in as usize;
        let produced = out_len - s.avail_out as usize;
        s.next_in = std::ptr::null();
        s.next_out = std::ptr::null_mut();
        (rc, consumed, produced)
    }

    fn message(&self, rc: i32) -> String {
        if self.0.msg.is_null() {
            format!("zlib error {rc}")
        } else {
            // SAFETY: zlib sets `msg` to a static, NUL-terminated string.
            unsafe { CStr::from_ptr(self.0.msg) }
                .to_string_lossy()
                .into_owned()
        }
    }
}

// SAFETY: the stream owns its state (allocated by zlib-rs with the Rust
// allocator) and holds no pointer into caller buffers between calls (`inflate`
// clears them): moving it to another thread is sound; it is never shared.
unsafe impl Send for Stream {}

impl Drop for Stream {
    fn drop(&mut self) {
        // SAFETY: initialised by `new`, ended once.
        unsafe { z::inflateEnd(&mut *self.0) };
    }
}

/// Decompresses a gzip stream of one or more members (a member ends, the next
/// begins right after; the stream ends with the input).
pub struct Gunzip<R> {
    inner: R,
    stream: Stream,
    /// A member ended: the next byte, if any, starts another.
    between_members: bool,
}

impl<R: BufRead> Gunzip<R> {
    pub fn new(inner: R) -> io::Result<Self> {
        Ok(Gunzip {
            inner,
            stream: Stream::new()?,
            between_members: false,
        })
    }

    /// The compressed reader, positioned after what was decompressed.
    pub fn into_inner(self) -> R {
        self.inner
    }
}

impl<R: BufRead> Read for Gunzip<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            let input = self.inner.fill_buf()?;
            if self.between_members {
                if input.is_empty() {
                    return Ok(0);
                }
                self.stream.reset()?;
                self.between_members = false;
            }
            let at_end = input.is_empty();
            let (rc, consumed, produced) = self.stream.inflate(input, out);
            self.inner.consume(consumed);
            match rc {
                z::Z_STREAM_END => {
                    self.between_members = true;
                    if produced > 0 {
                        return Ok(produced);
                    }
                }
                z::Z_OK | z::Z_BUF_ERROR => {
                    if produced > 0 {
                        return Ok(produced);
                    }
                    if at_end {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "gzip stream ends in the middle of a member",
                        ));
                    }
                }
                _ => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("corrupt gzip data: {}", self.stream.message(rc)),
                    ))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn gunzip(blob: &[u8]) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        Gunzip::new(io::BufReader::with_capacity(7, blob))?.read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn members_follow_each_other() {
        let a: Vec<u8> = (0..100_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        let mut blob = gzip(&a);
        blob.extend(gzip(b"second member"));
        blob.extend(gzip(b""));
        let mut want = a.clone();
        want.extend_from_slice(b"second member");
        assert_eq!(gunzip(&blob).unwrap(), want);
    }

    #[test]
    fn truncation_and_garbage_are_errors() {
        let blob = gzip(b"some data that compresses somewhat somewhat somewhat");
        let cut = gunzip(&blob[..blob.len() - 3]).unwrap_err();
        assert_eq!(cut.kind(), io::ErrorKind::UnexpectedEof);
        let mut garbage = blob.clone();
        garbage.extend_from_slice(b"not gzip");
        assert_eq!(
            gunzip(&garbage).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        let mut flipped = blob;
        let n = flipped.len();
        flipped[n - 6] ^= 0xff; // CRC
        assert!(gunzip(&flipped).is_err());
    }
}

//! gzip decompression of layer blobs with zlib-rs (through its zlib C API,
//! `libz-rs-sys`): member after member, like `gzip -d`. On the benchmark image
//! it inflates markedly faster than `flate2`'s default backend (miniz_oxide;
//! figures in docs/benchmarks.md). Compression is not touched: gzip *output*
//! stays on `flate2`, so artifacts keep their bytes.
//!
//! Access points (as zlib's `zran` example makes them): while pass 1 inflates,
//! every [`ACCESS_SPACING`] bytes of output it notes, at the next deflate block
//! boundary, the compressed position (byte and bit) and the 32 KiB window. Pass 2
//! can then [`Gunzip::jump`] over a long span no output needs, instead of
//! inflating it again: raw inflate primed with the bits and the window.

use std::ffi::CStr;
use std::io::{self, BufRead, Read};

use libz_rs_sys as z;

/// gzip wrapper only (no zlib or raw deflate), largest window.
const GZIP_WINDOW_BITS: i32 = 15 + 16;
/// Raw deflate (resuming inside a member), largest window.
const RAW_WINDOW_BITS: i32 = -15;
/// Output between two access points: 32 KiB of window per 2 MiB of layer tar
/// (≈ 27 MB for the 1.7 GB benchmark image).
pub const ACCESS_SPACING: u64 = 2 << 20;
const WINDOW: usize = 32 << 10;
/// The gzip trailer (CRC-32 and size) after each member's deflate data.
const TRAILER: u64 = 8;

/// A place where inflating can start again without what came before.
#[derive(Clone)]
pub struct AccessPoint {
    /// Compressed bytes before it; with `bits` > 0 the last of them still holds
    /// that many unread bits.
    pub compressed: u64,
    pub bits: u8,
    /// Uncompressed bytes before it.
    pub uncompressed: u64,
    /// The output's last 32 KiB before it (less at a member's start).
    window: Box<[u8]>,
}

impl std::fmt::Debug for AccessPoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "AccessPoint(in {}+{} bits, out {})",
            self.compressed, self.bits, self.uncompressed
        )
    }
}

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

    /// Ready for a new gzip member (`GZIP_WINDOW_BITS`) or raw deflate.
    fn reset(&mut self, window_bits: i32) -> io::Result<()> {
        // SAFETY: the stream was initialised by `new`.
        match unsafe { z::inflateReset2(&mut *self.0, window_bits) } {
            z::Z_OK => Ok(()),
            rc => Err(io::Error::other(format!(
                "cannot reset gzip decoder ({rc})"
            ))),
        }
    }

    /// Raw inflate from a block boundary: `bits` low bits of `byte`'s top, then
    /// the window.
    fn resume(&mut self, bits: u8, byte: u8, window: &[u8]) -> io::Result<()> {
        self.reset(RAW_WINDOW_BITS)?;
        let s = &mut *self.0;
        // SAFETY: initialised stream; `window` is valid for its length.
        let rc = unsafe {
            let mut rc = z::Z_OK;
            if bits > 0 {
                rc = z::inflatePrime(s, bits as i32, (byte >> (8 - bits)) as i32);
            }
            if rc == z::Z_OK && !window.is_empty() {
                rc = z::inflateSetDictionary(s, window.as_ptr(), window.len() as u32);
            }
            rc
        };
        if rc != z::Z_OK {
            return Err(io::Error::other(format!(
                "cannot resume gzip at an access point ({rc})"
            )));
        }
        Ok(())
    }

    /// The last 32 KiB of output (less at a member's start).
    fn window(&self) -> Box<[u8]> {
        let mut buf = vec![0u8; WINDOW];
        let mut len = 0u32;
        // SAFETY: `buf` holds 32 KiB, the most zlib ever copies.
        unsafe { z::inflateGetDictionary(&*self.0, buf.as_mut_ptr(), &mut len) };
        buf.truncate(len as usize);
        buf.into_boxed_slice()
    }

    /// zlib's `data_type`: unused bits of the last input byte, +64 in the last
    /// block, +128 right after a block ended.
    fn data_type(&self) -> i32 {
        self.0.data_type
    }

    /// Inflates from `input` into `out`; returns (zlib's code, bytes consumed,
    /// bytes produced).
    fn inflate(&mut self, input: &[u8], out: &mut [u8], flush: i32) -> (i32, usize, usize) {
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
        let rc = unsafe { z::inflate(s, flush) };
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
    /// Inflating raw deflate after a jump: the member's trailer is skipped
    /// (pass 1 checked it) when its data ends.
    raw: bool,
    compressed: u64,
    uncompressed: u64,
    /// Noting access points (pass 1), and those noted.
    record: bool,
    points: Vec<AccessPoint>,
}

impl<R: BufRead> Gunzip<R> {
    pub fn new(inner: R) -> io::Result<Self> {
        Ok(Gunzip {
            inner,
            stream: Stream::new()?,
            between_members: false,
            raw: false,
            compressed: 0,
            uncompressed: 0,
            record: false,
            points: Vec::new(),
        })
    }

    /// Also notes access points while decompressing.
    pub fn recording(inner: R) -> io::Result<Self> {
        Ok(Gunzip {
            record: true,
            ..Self::new(inner)?
        })
    }

    /// The access points noted so far.
    pub fn take_points(&mut self) -> Vec<AccessPoint> {
        std::mem::take(&mut self.points)
    }

    /// Continues at `point` (of this same blob, noted by a recording decoder),
    /// skipping the compressed bytes before it without inflating them. The
    /// point must not lie behind the current position.
    pub fn jump(&mut self, point: &AccessPoint) -> io::Result<()> {
        let partial = u64::from(point.bits > 0);
        if point.compressed < self.compressed + partial || point.uncompressed < self.uncompressed {
            return Err(io::Error::other("access point behind the current position"));
        }
        self.skip_input(point.compressed - partial - self.compressed)?;
        let mut byte = 0;
        if partial == 1 {
            let buf = self.inner.fill_buf()?;
            byte = *buf.first().ok_or_else(|| {
                io::Error::new(io::ErrorKind::UnexpectedEof, "blob shorter than before")
            })?;
            self.inner.consume(1);
            self.compressed += 1;
        }
        self.stream.resume(point.bits, byte, &point.window)?;
        self.uncompressed = point.uncompressed;
        self.raw = true;
        self.between_members = false;
        Ok(())
    }

    fn skip_input(&mut self, mut n: u64) -> io::Result<()> {
        while n > 0 {
            let buf = self.inner.fill_buf()?;
            if buf.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "gzip stream ends in the middle of a member",
                ));
            }
            let k = buf.len().min(n as usize);
            self.inner.consume(k);
            self.compressed += k as u64;
            n -= k as u64;
        }
        Ok(())
    }

    fn note_point_due(&self) -> bool {
        let last = self.points.last().map_or(0, |p| p.uncompressed);
        self.record && self.uncompressed >= last + ACCESS_SPACING
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
            // Stop at a block boundary when an access point is due.
            let flush = if self.note_point_due() {
                z::Z_BLOCK
            } else {
                z::Z_NO_FLUSH
            };
            let input = self.inner.fill_buf()?;
            if self.between_members {
                if input.is_empty() {
                    return Ok(0);
                }
                self.stream.reset(GZIP_WINDOW_BITS)?;
                self.between_members = false;
            }
            let at_end = input.is_empty();
            let (rc, consumed, produced) = self.stream.inflate(input, out, flush);
            self.inner.consume(consumed);
            self.compressed += consumed as u64;
            self.uncompressed += produced as u64;
            let dt = self.stream.data_type();
            if flush == z::Z_BLOCK && rc == z::Z_OK && dt & 128 != 0 && dt & 64 == 0 {
                self.points.push(AccessPoint {
                    compressed: self.compressed,
                    bits: (dt & 7) as u8,
                    uncompressed: self.uncompressed,
                    window: self.stream.window(),
                });
            }
            match rc {
                z::Z_STREAM_END => {
                    self.between_members = true;
                    if self.raw {
                        // The trailer of a member resumed raw (pass 1 checked it).
                        self.skip_input(TRAILER)?;
                        self.raw = false;
                    }
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
    fn jumps_land_where_the_points_were_noted() {
        // Two members of poorly compressible bytes, several access points each.
        let bytes = |seed: u64, n: usize| -> Vec<u8> {
            let mut x = seed | 1;
            (0..n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x % 61) as u8
                })
                .collect()
        };
        let (a, b) = (bytes(3, 9 << 20), bytes(5, 5 << 20));
        let mut blob = gzip(&a);
        blob.extend(gzip(&b));
        let whole = [a, b].concat();
        let mut first = Gunzip::recording(io::BufReader::new(&blob[..])).unwrap();
        let mut out = Vec::new();
        first.read_to_end(&mut out).unwrap();
        assert_eq!(out, whole);
        let points = first.take_points();
        assert!(points.len() >= 5, "{points:?}");
        for p in points.iter().step_by(2) {
            let mut again = Gunzip::new(io::BufReader::new(&blob[..])).unwrap();
            again.jump(p).unwrap();
            let mut rest = Vec::new();
            again.read_to_end(&mut rest).unwrap();
            assert_eq!(rest, whole[p.uncompressed as usize..], "from {p:?}");
        }
        // From one point to a later one, reading a little in between.
        let mut hop = Gunzip::new(io::BufReader::new(&blob[..])).unwrap();
        hop.jump(&points[0]).unwrap();
        let mut some = vec![0u8; 1000];
        hop.read_exact(&mut some).unwrap();
        hop.jump(&points[points.len() - 1]).unwrap();
        let mut rest = Vec::new();
        hop.read_to_end(&mut rest).unwrap();
        let last = points[points.len() - 1].uncompressed as usize;
        assert_eq!(rest, whole[last..]);
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

//! Output compression. Every encoder is configured so the bytes depend only on
//! the input and the level — never on the thread count:
//! * xz: liblzma's multithreaded encoder with a fixed block size, even for one
//!   thread (the single-threaded encoder produces different bytes);
//! * zstd: always in worker mode (nbWorkers ≥ 1), whose output does not depend
//!   on the number of workers;
//! * gzip: single-threaded, no name, mtime 0.

use std::io::{self, Write};

use anyhow::{Context, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputCompression {
    Xz,
    Zstd,
    Gzip,
    None,
}

impl OutputCompression {
    pub fn extension(self) -> &'static str {
        match self {
            OutputCompression::Xz => ".tar.xz",
            OutputCompression::Zstd => ".tar.zst",
            OutputCompression::Gzip => ".tar.gz",
            OutputCompression::None => ".tar",
        }
    }

    pub fn default_level(self) -> u32 {
        match self {
            OutputCompression::Xz => 6,
            OutputCompression::Zstd => 3,
            OutputCompression::Gzip => 6,
            OutputCompression::None => 0,
        }
    }
}

/// xz block size: liblzma's default for preset 6 (3 × 8 MiB dictionary), fixed so
/// the block boundaries — and hence the bytes — never depend on the thread count.
const XZ_BLOCK_SIZE: u64 = 24 << 20;

pub enum Encoder<W: Write> {
    Xz(liblzma::write::XzEncoder<W>),
    Zstd(zstd::stream::write::Encoder<'static, W>),
    Gzip(flate2::write::GzEncoder<W>),
    None(W),
}

impl<W: Write> Encoder<W> {
    pub fn new(kind: OutputCompression, level: u32, threads: u32, out: W) -> Result<Self> {
        let threads = threads.max(1);
        Ok(match kind {
            OutputCompression::Xz => {
                let stream = liblzma::stream::MtStreamBuilder::new()
                    .preset(level)
                    .threads(threads)
                    .block_size(XZ_BLOCK_SIZE)
                    .check(liblzma::stream::Check::Crc64)
                    .encoder()
                    .context("cannot start the xz encoder")?;
                Encoder::Xz(liblzma::write::XzEncoder::new_stream(out, stream))
            }
            OutputCompression::Zstd => {
                let mut enc = zstd::stream::write::Encoder::new(out, level as i32)
                    .context("cannot start the zstd encoder")?;
                enc.multithread(threads)
                    .context("zstd multithreading unavailable")?;
                enc.include_checksum(true)?;
                Encoder::Zstd(enc)
            }
            OutputCompression::Gzip => Encoder::Gzip(
                flate2::GzBuilder::new().write(out, flate2::Compression::new(level.min(9))),
            ),
            OutputCompression::None => Encoder::None(out),
        })
    }

    pub fn finish(self) -> io::Result<W> {
        match self {
            Encoder::Xz(e) => e.finish(),
            Encoder::Zstd(e) => e.finish(),
            Encoder::Gzip(e) => e.finish(),
            Encoder::None(w) => Ok(w),
        }
    }
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Encoder::Xz(e) => e.write(buf),
            Encoder::Zstd(e) => e.write(buf),
            Encoder::Gzip(e) => e.write(buf),
            Encoder::None(w) => w.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Encoder::Xz(e) => e.flush(),
            Encoder::Zstd(e) => e.flush(),
            Encoder::Gzip(e) => e.flush(),
            Encoder::None(w) => w.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compress(kind: OutputCompression, threads: u32, data: &[u8]) -> Vec<u8> {
        // Level 1 keeps the test quick; block layout does not depend on the level.
        let mut e = Encoder::new(kind, 1, threads, Vec::new()).unwrap();
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn bytes_do_not_depend_on_threads() {
        // Enough data for several xz blocks and zstd jobs.
        let mut data = Vec::new();
        let mut x: u64 = 1;
        while data.len() < 50 << 20 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            data.extend_from_slice(format!("line {} {}\n", x % 1000, x >> 60).as_bytes());
        }
        for kind in [
            OutputCompression::Xz,
            OutputCompression::Zstd,
            OutputCompression::Gzip,
        ] {
            let one = compress(kind, 1, &data);
            let four = compress(kind, 4, &data);
            assert!(one == four, "{kind:?} output depends on thread count");
        }
    }
}

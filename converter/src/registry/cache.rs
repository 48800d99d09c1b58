//! The content-addressed blob cache shared by every run and every image:
//! `DIR/blobs/sha256/<hex>`, the layout of an OCI image layout's blob store.
//!
//! A file appears under its digest only after its bytes were hashed and matched,
//! synced to disk and renamed from a temporary name in the same directory, so a
//! name in the cache is always complete and correct (barring later damage, which
//! the flattener's own digest checks still catch). Layers, configs and manifests
//! fetched by digest all live here; several processes may share the directory.
//!
//! Fetching a blob is serialised by a lock file per digest (`DIR/locks/sha256/<hex>`,
//! `flock`): of several threads or processes that need the same missing blob, one
//! downloads it and the others wait, then find it cached — a blob shared by several
//! images converted at once is fetched once.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};
use sha2::{Digest as _, Sha256};

use crate::digest::Digest;

/// Prefix of in-progress downloads.
const PARTIAL_PREFIX: &str = ".partial-";
/// In-progress files older than this are leftovers of a killed run.
const STALE_AFTER: Duration = Duration::from_secs(24 * 3600);

/// The default cache directory: `$XDG_CACHE_HOME/hakim-convert`, else
/// `~/.cache/hakim-convert`.
pub fn default_dir(env: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
    let set = |k: &str| env(k).filter(|v| !v.trim().is_empty());
    if let Some(x) = set("XDG_CACHE_HOME") {
        return Some(Path::new(&x).join("hakim-convert"));
    }
    set("HOME").map(|h| Path::new(&h).join(".cache/hakim-convert"))
}

/// How often a waiter checks whether the fetch lock came free (and whether to give up).
const LOCK_POLL: Duration = Duration::from_millis(50);

#[derive(Debug, Clone)]
pub struct BlobCache {
    blobs: PathBuf,
    locks: PathBuf,
}

/// The fetch lock of one blob, held until dropped ([`BlobCache::lock`]).
#[derive(Debug)]
pub struct BlobLock {
    _file: File,
}

impl BlobCache {
    /// Opens (creating if needed) the cache rooted at `dir`, and removes
    /// in-progress files a killed run left more than a day ago.
    pub fn open(dir: &Path) -> Result<BlobCache> {
        let blobs = dir.join("blobs/sha256");
        let locks = dir.join("locks/sha256");
        for d in [&blobs, &locks] {
            fs::create_dir_all(d)
                .with_context(|| format!("cannot create the blob cache {}", d.display()))?;
        }
        let cache = BlobCache { blobs, locks };
        cache.remove_stale_partials();
        Ok(cache)
    }

    pub fn dir(&self) -> &Path {
        &self.blobs
    }

    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.blobs.join(digest.hex())
    }

    /// The cached file for `digest`, if present and (when `size` is known) of that
    /// size. A file of the wrong size is damage: it is removed so it is fetched again.
    pub fn lookup(&self, digest: &Digest, size: Option<u64>) -> Option<PathBuf> {
        let path = self.path(digest);
        let meta = fs::metadata(&path).ok()?;
        if !meta.is_file() {
            return None;
        }
        if let Some(size) = size {
            if meta.len() != size {
                let _ = fs::remove_file(&path);
                return None;
            }
        }
        Some(path)
    }

    /// A small cached blob (manifest, config), if present, refusing more than `max`
    /// bytes. Its digest is checked here too: these bytes are parsed right away.
    pub fn read_small(&self, digest: &Digest, max: u64) -> Result<Option<Vec<u8>>> {
        let Some(path) = self.lookup(digest, None) else {
            return Ok(None);
        };
        let mut out = Vec::new();
        File::open(&path)
            .and_then(|f| f.take(max + 1).read_to_end(&mut out))
            .with_context(|| format!("cannot read {}", path.display()))?;
        if out.len() as u64 > max || &Digest::of_bytes(&out) != digest {
            // Damaged: forget it and let the caller fetch it again.
            let _ = fs::remove_file(&path);
            return Ok(None);
        }
        Ok(Some(out))
    }

    /// Takes the fetch lock of `digest`, shared by every thread and process using this
    /// cache. While another holder fetches the blob this waits, calling `keep_waiting`
    /// now and then: its error (an interruption) ends the wait. The caller looks the
    /// blob up again once it holds the lock.
    pub fn lock(&self, digest: &Digest, keep_waiting: &dyn Fn() -> Result<()>) -> Result<BlobLock> {
        let path = self.locks.join(digest.hex());
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("cannot open the lock file {}", path.display()))?;
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(BlobLock { _file: file }),
                Err(TryLockError::WouldBlock) => {
                    keep_waiting()?;
                    std::thread::sleep(LOCK_POLL);
                }
                Err(TryLockError::Error(e)) => {
                    return Err(e).with_context(|| format!("cannot lock {}", path.display()))
                }
            }
        }
    }

    /// Stores bytes already in memory under their digest, which must be `digest`.
    pub fn insert_bytes(&self, digest: &Digest, bytes: &[u8]) -> Result<PathBuf> {
        let mut p = self.partial(digest)?;
        p.write(bytes)?;
        p.commit()
    }

    /// A new in-progress download of `digest`.
    pub fn partial(&self, digest: &Digest) -> Result<Partial> {
        let file = tempfile::Builder::new()
            .prefix(&format!("{PARTIAL_PREFIX}{}-", digest.short()))
            .tempfile_in(&self.blobs)
            .with_context(|| format!("cannot create a file in {}", self.blobs.display()))?;
        Ok(Partial {
            file,
            hash: Sha256::new(),
            len: 0,
            digest: digest.clone(),
            final_path: self.path(digest),
        })
    }

    fn remove_stale_partials(&self) {
        let Ok(rd) = fs::read_dir(&self.blobs) else {
            return;
        };
        let now = SystemTime::now();
        for e in rd.flatten() {
            if !e.file_name().to_string_lossy().starts_with(PARTIAL_PREFIX) {
                continue;
            }
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|m| now.duration_since(m).ok())
                .is_some_and(|age| age > STALE_AFTER);
            if old {
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

/// A blob being written: bytes are hashed as they are appended. Dropped without
/// [`Partial::commit`], the temporary file is removed.
pub struct Partial {
    file: tempfile::NamedTempFile,
    hash: Sha256,
    len: u64,
    digest: Digest,
    final_path: PathBuf,
}

impl Partial {
    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn write(&mut self, buf: &[u8]) -> Result<()> {
        self.file
            .as_file_mut()
            .write_all(buf)
            .with_context(|| format!("cannot write {}", self.file.path().display()))?;
        self.hash.update(buf);
        self.len += buf.len() as u64;
        Ok(())
    }

    /// Drops everything written: the next byte is byte 0 of the blob.
    pub fn restart(&mut self) -> Result<()> {
        let f = self.file.as_file_mut();
        f.set_len(0)
            .and_then(|_| f.seek(SeekFrom::Start(0)).map(|_| ()))
            .with_context(|| format!("cannot truncate {}", self.file.path().display()))?;
        self.hash = Sha256::new();
        self.len = 0;
        Ok(())
    }

    /// Before resuming: trust nothing kept in memory about the bytes already
    /// written. Their length and hash are taken again from the file itself.
    pub fn rehash_from_file(&mut self) -> Result<()> {
        let path = self.file.path().to_path_buf();
        let f = self.file.as_file_mut();
        let rehash = |f: &mut File| -> io::Result<(Sha256, u64)> {
            f.flush()?;
            f.seek(SeekFrom::Start(0))?;
            let mut h = Sha256::new();
            let mut buf = vec![0u8; 256 * 1024];
            let mut n = 0u64;
            loop {
                let r = f.read(&mut buf)?;
                if r == 0 {
                    break;
                }
                h.update(&buf[..r]);
                n += r as u64;
            }
            f.seek(SeekFrom::End(0))?;
            Ok((h, n))
        };
        let (h, n) = rehash(f).with_context(|| format!("cannot re-read {}", path.display()))?;
        self.hash = h;
        self.len = n;
        Ok(())
    }

    /// The digest of what was written.
    pub fn digest_so_far(&self) -> Digest {
        Digest::from_sha256(self.hash.clone())
    }

    /// Checks the digest, syncs, and renames the file to its name in the cache.
    pub fn commit(self) -> Result<PathBuf> {
        let actual = self.digest_so_far();
        if actual != self.digest {
            bail!(
                "blob {} ({} bytes received) hashes to {actual}",
                self.digest,
                self.len
            );
        }
        self.file
            .as_file()
            .sync_all()
            .with_context(|| format!("cannot sync {}", self.file.path().display()))?;
        let dir = self.final_path.parent().map(Path::to_path_buf);
        // Another process may have stored the same blob meanwhile: same bytes, so
        // replacing it is harmless.
        self.file
            .persist(&self.final_path)
            .map_err(|e| e.error)
            .with_context(|| format!("cannot rename into {}", self.final_path.display()))?;
        if let Some(dir) = dir {
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(self.final_path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_lookup_and_damage() {
        let dir = tempfile::tempdir().unwrap();
        let cache = BlobCache::open(dir.path()).unwrap();
        let d = Digest::of_bytes(b"hello");
        assert!(cache.lookup(&d, Some(5)).is_none());
        let p = cache.insert_bytes(&d, b"hello").unwrap();
        assert_eq!(p, dir.path().join("blobs/sha256").join(d.hex()));
        assert_eq!(cache.lookup(&d, Some(5)), Some(p.clone()));
        assert_eq!(cache.read_small(&d, 100).unwrap().unwrap(), b"hello");
        // Too big for the caller's limit: treated as absent (and removed).
        assert!(cache.read_small(&d, 3).unwrap().is_none());
        cache.insert_bytes(&d, b"hello").unwrap();
        // Wrong size: removed.
        assert!(cache.lookup(&d, Some(6)).is_none());
        assert!(!p.exists());
        // Wrong bytes are never stored, and leave no file behind.
        assert!(cache.insert_bytes(&d, b"hellO").is_err());
        assert!(cache.lookup(&d, None).is_none());
        let left: Vec<_> = fs::read_dir(cache.dir()).unwrap().collect();
        assert!(left.is_empty());
    }

    #[test]
    fn partial_restart_and_rehash() {
        let dir = tempfile::tempdir().unwrap();
        let cache = BlobCache::open(dir.path()).unwrap();
        let d = Digest::of_bytes(b"abcdef");
        let mut p = cache.partial(&d).unwrap();
        p.write(b"xyz").unwrap();
        p.restart().unwrap();
        assert!(p.is_empty());
        p.write(b"abc").unwrap();
        p.rehash_from_file().unwrap();
        assert_eq!(p.len(), 3);
        p.write(b"def").unwrap();
        assert_eq!(p.digest_so_far(), d);
        let path = p.commit().unwrap();
        assert_eq!(fs::read(path).unwrap(), b"abcdef");
    }

    #[test]
    fn fetch_lock_is_exclusive_and_interruptible() {
        let dir = tempfile::tempdir().unwrap();
        let cache = BlobCache::open(dir.path()).unwrap();
        let d = Digest::of_bytes(b"shared");
        let other = Digest::of_bytes(b"other");
        let held = cache.lock(&d, &|| Ok(())).unwrap();
        // Another blob's lock is independent.
        drop(cache.lock(&other, &|| Ok(())).unwrap());
        // The same blob: a second holder waits; here it gives up when asked to.
        let polls = std::sync::atomic::AtomicU32::new(0);
        let err = cache
            .lock(&d, &|| {
                if polls.fetch_add(1, std::sync::atomic::Ordering::Relaxed) >= 2 {
                    anyhow::bail!("interrupted")
                }
                Ok(())
            })
            .unwrap_err();
        assert_eq!(err.to_string(), "interrupted");
        assert!(polls.load(std::sync::atomic::Ordering::Relaxed) >= 3);
        // Released: a waiter in another thread gets it.
        let waiter = std::thread::scope(|s| {
            let h = s.spawn(|| cache.lock(&d, &|| Ok(())).map(|_| ()));
            std::thread::sleep(Duration::from_millis(120));
            drop(held);
            h.join().unwrap()
        });
        waiter.unwrap();
    }

    #[test]
    fn default_dirs() {
        let env = |k: &str| match k {
            "XDG_CACHE_HOME" => Some("/x".to_string()),
            "HOME" => Some("/home/u".to_string()),
            _ => None,
        };
        assert_eq!(default_dir(&env), Some(PathBuf::from("/x/hakim-convert")));
        let env = |k: &str| (k == "HOME").then(|| "/home/u".to_string());
        assert_eq!(
            default_dir(&env),
            Some(PathBuf::from("/home/u/.cache/hakim-convert"))
        );
        assert_eq!(default_dir(&|_| None), None);
    }
}

//! Artifact naming, atomic writes and `sha256sums.txt`.
//!
//! Artifacts are written to a hidden temporary file in the output directory and
//! renamed only once complete and synced, so an interrupted or failed run never
//! leaves a file under a final name.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sha2::{Digest as _, Sha256};

pub const SUMS_FILE: &str = "sha256sums.txt";

/// Parses `/etc/os-release` (`KEY=value`, values optionally quoted).
pub fn os_release_field(content: &[u8], key: &str) -> Option<String> {
    let text = String::from_utf8_lossy(content);
    for line in text.lines() {
        let Some((k, v)) = line.trim().split_once('=') else {
            continue;
        };
        if k.trim() != key {
            continue;
        }
        let v = v.trim();
        let v = v
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
            .unwrap_or(v);
        return (!v.is_empty()).then(|| v.to_string());
    }
    None
}

/// Proxmox-style architecture names (`amd64`, `arm64`, `armhf`, `i386`).
pub fn arch_name(architecture: &str, variant: Option<&str>) -> String {
    match (architecture, variant) {
        ("arm", Some("v7")) | ("arm", None) => "armhf".into(),
        ("arm", Some(v)) => format!("arm{v}"),
        ("386", _) => "i386".into(),
        (a, _) => a.into(),
    }
}

/// Keeps file names portable: anything outside `[A-Za-z0-9._+-]` becomes `-`.
pub fn sanitize(part: &str) -> String {
    part.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '+') {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// `hakim-<variant>` from a repository name: the repository itself when it already
/// follows the pattern, `hakim-<variant>` when a variant is forced.
pub fn artifact_stem(repository: &str, variant: Option<&str>, release: &str, arch: &str) -> String {
    let base = match variant {
        Some(v) => format!("hakim-{v}"),
        None => repository.to_string(),
    };
    format!(
        "{}-{}-{}",
        sanitize(&base),
        sanitize(release),
        sanitize(arch)
    )
}

/// Checks a user-given name: a plain file name, no directories.
pub fn check_file_name(name: &str) -> Result<()> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." || name.starts_with('.')
    {
        bail!("'{name}' is not a valid artifact name (plain file name, no '/' or leading '.')");
    }
    Ok(())
}

/// A writer that hashes what it writes and counts bytes.
pub struct HashWrite<W> {
    inner: W,
    hash: Sha256,
    count: u64,
}

impl<W: Write> HashWrite<W> {
    pub fn new(inner: W) -> Self {
        HashWrite {
            inner,
            hash: Sha256::new(),
            count: 0,
        }
    }
    pub fn finish(self) -> (String, u64, W) {
        (hex::encode(self.hash.finalize()), self.count, self.inner)
    }
}

impl<W: Write> Write for HashWrite<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A file being written under a temporary name in the output directory.
pub struct PendingFile {
    temp: tempfile::NamedTempFile,
}

impl PendingFile {
    pub fn create(dir: &Path) -> Result<Self> {
        let temp = tempfile::Builder::new()
            .prefix(".hakim-convert-")
            .suffix(".partial")
            .tempfile_in(dir)
            .with_context(|| format!("cannot create a file in {}", dir.display()))?;
        Ok(PendingFile { temp })
    }

    pub fn file(&self) -> &File {
        self.temp.as_file()
    }

    /// Syncs, makes it world-readable (templates are shared) and renames it.
    pub fn commit(self, final_path: &Path) -> Result<()> {
        let file = self.temp.as_file();
        file.sync_all()?;
        file.set_permissions(fs::Permissions::from_mode(0o644))?;
        self.temp
            .persist(final_path)
            .with_context(|| format!("cannot rename into {}", final_path.display()))?;
        Ok(())
    }
}

/// sha256 (hex) and size of a whole file, read from its start.
pub fn hash_file(file: &File) -> Result<(String, u64)> {
    use std::io::{Seek, SeekFrom};
    let mut f = file.try_clone().context("cannot reopen the artifact")?;
    f.seek(SeekFrom::Start(0))?;
    let mut hashed = HashWrite::new(io::sink());
    io::copy(&mut f, &mut hashed).context("cannot read the artifact back")?;
    let (sha, size, _) = hashed.finish();
    Ok((sha, size))
}

/// Rewrites the text file `dir/file_name` (empty when missing) with `edit`, under
/// the lock file `dir/.<file_name>.lock`, so parallel runs into one directory don't
/// lose each other's lines. The new text replaces the old atomically.
pub fn rewrite_locked(
    dir: &Path,
    file_name: &str,
    edit: impl FnOnce(&str) -> String,
) -> Result<PathBuf> {
    let lock_path = dir.join(format!(".{}.lock", file_name.trim_end_matches(".txt")));
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("cannot open {}", lock_path.display()))?;
    lock.lock()
        .with_context(|| format!("cannot lock {}", lock_path.display()))?;
    let path = dir.join(file_name);
    let existing = match fs::read_to_string(&path) {
        Ok(s) => s,
        Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let text = edit(&existing);
    let pending = PendingFile::create(dir)?;
    pending.file().write_all(text.as_bytes())?;
    pending.commit(&path)?;
    drop(lock);
    Ok(path)
}

/// Adds or replaces `name`'s line in `dir/sha256sums.txt`, keeping other lines.
pub fn update_sums(dir: &Path, name: &str, sha256: &str) -> Result<PathBuf> {
    rewrite_locked(dir, SUMS_FILE, |existing| {
        let mut lines: Vec<(String, String)> = Vec::new();
        for line in existing.lines() {
            let Some((hash, file)) = line.split_once(' ') else {
                continue;
            };
            let file = file.trim_start_matches([' ', '*']);
            if file != name {
                lines.push((file.to_string(), hash.to_string()));
            }
        }
        lines.push((name.to_string(), sha256.to_string()));
        lines.sort();
        let mut text = String::new();
        for (file, hash) in lines {
            text.push_str(&format!("{hash}  {file}\n"));
        }
        text
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_release_values() {
        let text =
            b"PRETTY_NAME=\"Debian GNU/Linux 13 (trixie)\"\nVERSION_CODENAME=trixie\nID='debian'\n";
        assert_eq!(
            os_release_field(text, "VERSION_CODENAME").as_deref(),
            Some("trixie")
        );
        assert_eq!(os_release_field(text, "ID").as_deref(), Some("debian"));
        assert_eq!(os_release_field(text, "VERSION_ID"), None);
    }

    #[test]
    fn names() {
        assert_eq!(
            artifact_stem("hakim-base", None, "trixie", "amd64"),
            "hakim-base-trixie-amd64"
        );
        assert_eq!(
            artifact_stem("x", Some("js"), "trixie", "arm64"),
            "hakim-js-trixie-arm64"
        );
        assert_eq!(arch_name("arm", Some("v7")), "armhf");
        assert_eq!(sanitize("a b/c"), "a-b-c");
        assert!(check_file_name("../x").is_err());
        assert!(check_file_name(".hidden").is_err());
        assert!(check_file_name("ok-name").is_ok());
    }

    #[test]
    fn sums_are_updated_not_clobbered() {
        let dir = tempfile::tempdir().unwrap();
        update_sums(dir.path(), "a.tar.xz", "11").unwrap();
        update_sums(dir.path(), "b.tar.xz", "22").unwrap();
        update_sums(dir.path(), "a.tar.xz", "33").unwrap();
        let text = fs::read_to_string(dir.path().join(SUMS_FILE)).unwrap();
        assert_eq!(text, "33  a.tar.xz\n22  b.tar.xz\n");
    }
}

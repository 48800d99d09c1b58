//! Artifact naming, atomic writes and `sha256sums.txt`.
//!
//! Artifacts are written to a hidden temporary file in the output directory and
//! renamed only once complete and synced, so an interrupted or failed run never
//! leaves a file under a final name.

use std::fs::{self, File};
use std::io::{self, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

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

/// The output directory: created when missing; an existing file there is an
/// error that says so (`create_dir_all` would only say "File exists").
pub fn prepare_dir(dir: &Path) -> Result<()> {
    match fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => bail!(
            "output directory {} is not a directory (a file of that name exists)",
            dir.display()
        ),
        Err(e) if e.kind() == io::ErrorKind::NotFound => fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the output directory {}", dir.display())),
        Err(e) => {
            Err(e).with_context(|| format!("cannot use {} as the output directory", dir.display()))
        }
    }
}

/// An I/O error of the artifact being written (a full disk, a quota, a failing
/// device): the output's fault, never the input's. [`OutputFile`] marks its
/// errors with it, so that however deep in a layer's copy a write fails, the
/// message can blame the output ([`output_fault`]).
#[derive(Debug)]
pub struct OutputFault(io::Error);

impl std::fmt::Display for OutputFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for OutputFault {}

fn mark(e: io::Error) -> io::Error {
    if is_output_fault(&e) {
        e
    } else {
        io::Error::new(e.kind(), OutputFault(e))
    }
}

/// Whether `e` is an error of the artifact being written.
pub fn is_output_fault(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<OutputFault>())
}

/// The output's I/O error behind `e`, if writing the artifact is what failed.
pub fn output_fault(e: &anyhow::Error) -> Option<&io::Error> {
    e.chain()
        .filter_map(|c| c.downcast_ref::<io::Error>())
        .find(|io| is_output_fault(io))
}

/// `e`, or, when writing the artifact is what failed, an error that says so
/// and names it (the layer being copied at the time is beside the point).
pub fn blame_output(e: anyhow::Error, artifact: &Path) -> anyhow::Error {
    match output_fault(&e) {
        Some(io) => anyhow::anyhow!("cannot write the output file {}: {io}", artifact.display()),
        None => e,
    }
}

/// The artifact file as the writers see it: its errors are [`OutputFault`]s.
#[derive(Clone, Copy)]
pub struct OutputFile<'a>(pub &'a File);

impl Write for OutputFile<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&mut &*self.0).write(buf).map_err(mark)
    }
    fn flush(&mut self) -> io::Result<()> {
        (&mut &*self.0).flush().map_err(mark)
    }
}

impl Seek for OutputFile<'_> {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        (&mut &*self.0).seek(pos).map_err(mark)
    }
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

const PARTIAL_PREFIX: &str = ".hakim-convert-";
const PARTIAL_SUFFIX: &str = ".partial";

/// Temporary files of this process, removed by [`remove_pending_files`] when a
/// second stop signal ends the process before the normal cleanup can run.
static PENDING: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn pending_list() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    PENDING.lock().unwrap_or_else(|e| e.into_inner())
}

/// Removes this process's temporary files; for a signal thread about to exit.
pub fn remove_pending_files() {
    for path in pending_list().drain(..) {
        let _ = fs::remove_file(path);
    }
}

/// A file being written under a temporary name in the output directory. It
/// holds an exclusive `flock` for its whole life, so another run can tell a
/// live temporary file from one a killed run left behind.
pub struct PendingFile {
    temp: tempfile::NamedTempFile,
    registered: Registered,
}

/// Keeps a temporary file's path in [`PENDING`] while it exists.
struct Registered(PathBuf);

impl Drop for Registered {
    fn drop(&mut self) {
        // The file itself is removed by `tempfile` (or was renamed).
        pending_list().retain(|p| p != &self.0);
    }
}

impl PendingFile {
    pub fn create(dir: &Path) -> Result<Self> {
        remove_stale_partials(dir);
        let temp = tempfile::Builder::new()
            .prefix(PARTIAL_PREFIX)
            .suffix(PARTIAL_SUFFIX)
            .tempfile_in(dir)
            .with_context(|| format!("cannot create a file in {}", dir.display()))?;
        temp.as_file()
            .lock()
            .with_context(|| format!("cannot lock {}", temp.path().display()))?;
        let path = temp.path().to_path_buf();
        pending_list().push(path.clone());
        Ok(PendingFile {
            temp,
            registered: Registered(path),
        })
    }

    pub fn file(&self) -> &File {
        self.temp.as_file()
    }

    /// The file for writing the artifact: its errors blame the output.
    pub fn output(&self) -> OutputFile<'_> {
        OutputFile(self.temp.as_file())
    }

    /// Syncs, makes it world-readable (templates are shared) and renames it.
    pub fn commit(self, final_path: &Path) -> Result<()> {
        let file = self.temp.as_file();
        file.sync_all()
            .and_then(|()| file.set_permissions(fs::Permissions::from_mode(0o644)))
            .with_context(|| format!("cannot finish {}", final_path.display()))?;
        let PendingFile { temp, registered } = self;
        temp.persist(final_path)
            .with_context(|| format!("cannot rename into {}", final_path.display()))?;
        drop(registered);
        Ok(())
    }
}

/// Removes temporary files of earlier runs that no live process holds: a run
/// killed outright (SIGKILL, power loss) cannot clean up after itself. The
/// lock tells; the age only covers the instant between a file's creation and
/// its locking.
fn remove_stale_partials(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let old = SystemTime::now() - Duration::from_secs(60);
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !(name.starts_with(PARTIAL_PREFIX) && name.ends_with(PARTIAL_SUFFIX)) {
            continue;
        }
        let Ok(file) = File::open(entry.path()) else {
            continue;
        };
        let stale = file
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t < old);
        if stale && file.try_lock().is_ok() {
            let _ = fs::remove_file(entry.path());
        }
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

/// An exclusive lock on an output directory, taken with `flock(2)` on the
/// directory itself so that no lock file is left among the artifacts (release
/// steps upload `out/*`). Held while an artifact is renamed into place and its
/// `sha256sums.txt` line written, so concurrent runs into one directory never
/// interleave the two.
pub struct DirLock {
    dir: PathBuf,
    _handle: File,
}

/// Lock files written next to the artifacts by earlier versions.
const LEGACY_LOCK_FILES: &[&str] = &[".sha256sums.lock", ".sources.lock"];

impl DirLock {
    /// Blocks until the lock is ours.
    pub fn acquire(dir: &Path) -> Result<DirLock> {
        let handle = File::open(dir).with_context(|| format!("cannot open {}", dir.display()))?;
        handle
            .lock()
            .with_context(|| format!("cannot lock {}", dir.display()))?;
        for legacy in LEGACY_LOCK_FILES {
            // Best effort: only a stale leftover, nothing reads it any more.
            let _ = fs::remove_file(dir.join(legacy));
        }
        Ok(DirLock {
            dir: dir.to_path_buf(),
            _handle: handle,
        })
    }

    /// Prepares the new text of `file_name` (empty when missing) from `edit`,
    /// written and synced under a temporary name but not yet in place.
    fn prepare(&self, file_name: &str, edit: impl FnOnce(&str) -> String) -> Result<Staged> {
        let path = self.dir.join(file_name);
        let existing = match fs::read_to_string(&path) {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let text = edit(&existing);
        let pending = PendingFile::create(&self.dir)?;
        pending
            .file()
            .write_all(text.as_bytes())
            .and_then(|()| pending.file().sync_all())
            .with_context(|| format!("cannot write the new {}", path.display()))?;
        Ok(Staged { pending, path })
    }

    /// Rewrites `file_name` in the directory with `edit`; the new text
    /// replaces the old atomically.
    pub fn rewrite(&self, file_name: &str, edit: impl FnOnce(&str) -> String) -> Result<PathBuf> {
        self.prepare(file_name, edit)?.commit()
    }

    /// Puts a finished artifact in place together with its `sha256sums.txt`
    /// line: the new sums file is written first, so a full disk fails before
    /// the artifact appears; then both are renamed (renames need no space).
    pub fn publish(&self, artifact: PendingFile, file_name: &str, sha256: &str) -> Result<PathBuf> {
        let sums = self.prepare(SUMS_FILE, |existing| sums_with(existing, file_name, sha256))?;
        artifact.commit(&self.dir.join(file_name))?;
        sums.commit()
    }
}

/// A text file written and synced under a temporary name.
struct Staged {
    pending: PendingFile,
    path: PathBuf,
}

impl Staged {
    fn commit(self) -> Result<PathBuf> {
        self.pending.commit(&self.path)?;
        Ok(self.path)
    }
}

/// `existing` sums text with `name`'s line added or replaced, sorted by name.
fn sums_with(existing: &str, name: &str, sha256: &str) -> String {
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
}

/// Adds or replaces `name`'s line in `dir/sha256sums.txt`, keeping other lines.
pub fn update_sums(dir: &Path, name: &str, sha256: &str) -> Result<PathBuf> {
    DirLock::acquire(dir)?.rewrite(SUMS_FILE, |existing| sums_with(existing, name, sha256))
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
    fn output_errors_are_told_apart() {
        let full = File::options().write(true).open("/dev/full").unwrap();
        let err = OutputFile(&full).write_all(b"x").unwrap_err();
        assert!(is_output_fault(&err));
        assert_eq!(err.kind(), io::ErrorKind::StorageFull);
        let wrapped = anyhow::Error::new(err).context("layer 2: second read");
        assert!(output_fault(&wrapped).is_some());
        let read_side = anyhow::Error::new(io::Error::other("corrupt")).context("layer 2");
        assert!(output_fault(&read_side).is_none());
    }

    #[test]
    fn output_dir_that_is_a_file_is_named_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        fs::write(&file, "").unwrap();
        let err = format!("{:#}", prepare_dir(&file).unwrap_err());
        assert!(err.contains("is not a directory"), "{err}");
        assert!(err.contains(&file.display().to_string()), "{err}");
        prepare_dir(&dir.path().join("new/sub")).unwrap();
        prepare_dir(&dir.path().join("new/sub")).unwrap();
    }

    #[test]
    fn sums_are_updated_not_clobbered() {
        let dir = tempfile::tempdir().unwrap();
        update_sums(dir.path(), "a.tar.xz", "11").unwrap();
        update_sums(dir.path(), "b.tar.xz", "22").unwrap();
        update_sums(dir.path(), "a.tar.xz", "33").unwrap();
        let text = fs::read_to_string(dir.path().join(SUMS_FILE)).unwrap();
        assert_eq!(text, "33  a.tar.xz\n22  b.tar.xz\n");
        // Nothing but the sums file is left behind (no lock file, no temporary).
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [SUMS_FILE]);
    }

    #[test]
    fn stale_partials_are_removed_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let old = SystemTime::now() - Duration::from_secs(3600);
        let stale = dir.path().join(".hakim-convert-dead.partial");
        fs::write(&stale, "left by a killed run").unwrap();
        File::options()
            .write(true)
            .open(&stale)
            .unwrap()
            .set_modified(old)
            .unwrap();
        // An old temporary file another run still holds is not touched.
        let live = PendingFile::create(dir.path()).unwrap();
        live.file().set_modified(old).unwrap();
        let other = dir.path().join("keep.partial");
        fs::write(&other, "not ours").unwrap();
        let next = PendingFile::create(dir.path()).unwrap();
        assert!(!stale.exists());
        assert!(live.registered.0.exists() && next.registered.0.exists() && other.exists());
        assert_eq!(
            pending_list()
                .iter()
                .filter(|p| p.starts_with(dir.path()))
                .count(),
            2
        );
        drop(live);
        drop(next);
        assert_eq!(
            pending_list()
                .iter()
                .filter(|p| p.starts_with(dir.path()))
                .count(),
            0
        );
    }

    #[test]
    fn a_sums_file_that_cannot_be_written_keeps_the_artifact_out() {
        // Either both the artifact and its line appear, or neither: here the
        // new sums text cannot be prepared (its name is taken by a directory,
        // as a full disk would fail its write), so the artifact stays out.
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join(SUMS_FILE)).unwrap();
        let pending = PendingFile::create(dir.path()).unwrap();
        pending.file().write_all(b"artifact").unwrap();
        let lock = DirLock::acquire(dir.path()).unwrap();
        let err = format!("{:#}", lock.publish(pending, "a.tar", "ff").unwrap_err());
        assert!(err.contains(SUMS_FILE), "the error names the file: {err}");
        drop(lock);
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, [SUMS_FILE], "no artifact, no temporary file");
    }

    #[test]
    fn publish_puts_artifact_and_line_in_place_together() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(".sha256sums.lock"), "").unwrap();
        let pending = PendingFile::create(dir.path()).unwrap();
        pending.file().write_all(b"artifact").unwrap();
        let lock = DirLock::acquire(dir.path()).unwrap();
        lock.publish(pending, "a.tar", "ff").unwrap();
        drop(lock);
        let mut names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        // The stale lock file of an older version is gone too.
        assert_eq!(names, ["a.tar", SUMS_FILE]);
        assert_eq!(
            fs::read_to_string(dir.path().join(SUMS_FILE)).unwrap(),
            "ff  a.tar\n"
        );
    }
}

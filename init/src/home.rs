//! Prepares the user's home (`CODER_HOME`) and project (`CODER_PROJECT_DIR`)
//! directories.
//!
//! A *fresh* directory (missing, empty, or holding only a `lost+found`
//! directory, which is how Proxmox presents a new ext4 volume: root-owned,
//! with `lost+found`) is made the user's: created if needed, given to the
//! user, and for the home seeded from `/etc/skel`. Anything else is somebody's
//! data and is left exactly as it is.
//!
//! Decisions:
//! - Never a recursive chown. Ownership is set only on what we create and on
//!   the fresh directory itself; `lost+found` is never touched. (The old flow
//!   chowned volumes recursively, which is slow, overrides deliberate owners,
//!   and failed on `lost+found`.)
//! - No "skel applied" marker file: once the skel is copied the home is no
//!   longer fresh, so later boots change nothing. A home emptied by hand gets
//!   the skel files again at the next boot, which is harmless and keeps the
//!   user's home free of our files.
//! - A directory we create gets a fixed mode (home 0750, project dir 0755),
//!   set explicitly so the umask does not matter; an existing directory keeps
//!   its mode, since a mount point's mode was chosen by whoever set it up.
//! - Missing parents are created 0755 and owned like their nearest existing
//!   ancestor: under `/` that is root, under the user's home it is the user,
//!   so a project dir like `~/src/app` does not leave a root-owned `~/src`.
//! - chown failures (EPERM without CAP_CHOWN in Docker, EINVAL for an id that
//!   is not mapped in the user namespace) do not stop the work: they are
//!   summed up in one warning.
//! - mise's directories (`~/.config/mise`, `~/.local/share/mise`, [`TOOL_DIRS`]) are the
//!   exception, as in the upstream entrypoint: at every boot, in a home that is the user's,
//!   they are created and given to the user with everything inside them (never following a
//!   link, never leaving their file system), and their parents (`~/.config`, `~/.local`,
//!   `~/.local/share`) are given to the user themselves, not what they hold. A file a root
//!   `mise install` left there would otherwise break the user's next `mise` run.
//! - Paths are absolute inside the container and resolved under `root`.
//!   Symlinks on the way are followed by the host, so with a root other than
//!   `/` (tests) absolute links would escape it; fixtures avoid them.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

/// Mode of a home directory we create: the group may look, others not.
pub const HOME_MODE: u32 = 0o750;

/// Mode of a project directory or a parent directory we create.
pub const DIR_MODE: u32 = 0o755;

const LOST_FOUND: &str = "lost+found";

/// What [`prepare_home`] or [`prepare_dir`] found and did. Paths are inside
/// the container.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HomeOutcome {
    /// The directory, normalised (`/home/coder`).
    pub path: PathBuf,
    /// Missing, empty, or only `lost+found` when we looked.
    pub fresh: bool,
    /// The directory itself was created.
    pub created: bool,
    /// Parents created on the way, top-down.
    pub parents_created: Vec<PathBuf>,
    /// An existing fresh directory was given to the user.
    pub owner_set: bool,
    /// Entries copied from the skel directory, top-down.
    pub skel_copied: Vec<PathBuf>,
    /// Problems that did not stop the work.
    pub warnings: Vec<String>,
}

impl HomeOutcome {
    /// Whether anything was created or chowned.
    pub fn changed(&self) -> bool {
        self.created
            || self.owner_set
            || !self.parents_created.is_empty()
            || !self.skel_copied.is_empty()
    }
}

/// Why a directory could not be prepared. Nothing is touched when the path is
/// invalid or not a directory.
#[derive(Debug)]
pub enum HomeError {
    InvalidPath {
        path: PathBuf,
        reason: &'static str,
    },
    /// The path, or one of its parents, exists and is not a directory.
    NotADirectory {
        path: PathBuf,
    },
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

impl fmt::Display for HomeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HomeError::InvalidPath { path, reason } => {
                write!(f, "invalid directory path {:?}: {reason}", path)
            }
            HomeError::NotADirectory { path } => write!(
                f,
                "{} exists and is not a directory; leaving it alone",
                path.display()
            ),
            HomeError::Io { op, path, source } => write!(f, "{op} {}: {source}", path.display()),
        }
    }
}

impl std::error::Error for HomeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            HomeError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Prepares the home directory `home` for `uid:gid`, seeding it from `skel`
/// (e.g. `/etc/skel`) when it is fresh. A missing skel directory just means
/// no seeding (busybox images have none).
pub fn prepare_home(
    root: &Path,
    home: &Path,
    uid: u32,
    gid: u32,
    skel: &Path,
) -> Result<HomeOutcome, HomeError> {
    let skel_parts = parts(skel)?;
    prepare(root, home, uid, gid, HOME_MODE, Some(&skel_parts))
}

/// Prepares a directory the user works in, such as the project dir: same
/// rules as the home, without skel. Call it after [`prepare_home`] when it
/// lies inside the home, or the home will not be fresh any more.
pub fn prepare_dir(root: &Path, dir: &Path, uid: u32, gid: u32) -> Result<HomeOutcome, HomeError> {
    prepare(root, dir, uid, gid, DIR_MODE, None)
}

/// The normal components of an absolute path without `..`, not `/` itself.
fn parts(path: &Path) -> Result<Vec<&OsStr>, HomeError> {
    let invalid = |reason| HomeError::InvalidPath {
        path: path.to_path_buf(),
        reason,
    };
    if !path.is_absolute() {
        return Err(invalid("not absolute"));
    }
    let mut parts = Vec::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => parts.push(part),
            Component::ParentDir => return Err(invalid("contains ..")),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    if parts.is_empty() {
        return Err(invalid("is the root directory"));
    }
    Ok(parts)
}

fn join(base: &Path, parts: &[&OsStr]) -> PathBuf {
    let mut out = base.to_path_buf();
    out.extend(parts);
    out
}

fn io_error<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> HomeError + 'a {
    move |source| HomeError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Counts chown failures so a volume full of them yields one warning, not
/// thousands.
#[derive(Default)]
struct ChownLog {
    failures: usize,
    first: Option<String>,
}

impl ChownLog {
    /// chown (`follow`) or lchown `host`; `shown` is its container path.
    fn set_owner(&mut self, host: &Path, shown: &Path, uid: u32, gid: u32, follow: bool) -> bool {
        let result = if follow {
            std::os::unix::fs::chown(host, Some(uid), Some(gid))
        } else {
            std::os::unix::fs::lchown(host, Some(uid), Some(gid))
        };
        match result {
            Ok(()) => true,
            Err(e) => {
                self.record(shown, &e);
                false
            }
        }
    }

    fn record(&mut self, shown: &Path, error: &io::Error) {
        self.failures += 1;
        if self.first.is_none() {
            self.first = Some(format!("{}: {error}", shown.display()));
        }
    }

    fn warning(&self, uid: u32, gid: u32) -> Option<String> {
        let first = self.first.as_ref()?;
        Some(format!(
            "could not give {} entr{} to {uid}:{gid} (first: {first}); they keep their current owner",
            self.failures,
            if self.failures == 1 { "y" } else { "ies" }
        ))
    }
}

/// mise's directories in the home, relative to it; see the module docs.
pub const TOOL_DIRS: &[&str] = &[".config/mise", ".local/share/mise"];

/// What [`prepare_tool_dirs`] changed, as paths in the container.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ToolDirsOutcome {
    pub created: Vec<PathBuf>,
    /// Entries given to the user (parents, the directories, what they hold).
    pub owner_set: usize,
    pub warnings: Vec<String>,
}

/// Creates [`TOOL_DIRS`] in `home` for `uid:gid` and gives them to the user, see the module
/// docs. Does nothing in a home that is not the user's (it is somebody's data).
pub fn prepare_tool_dirs(root: &Path, home: &Path, uid: u32, gid: u32) -> ToolDirsOutcome {
    let mut out = ToolDirsOutcome::default();
    let Ok(home_parts) = parts(home) else {
        return out;
    };
    let home_host = join(root, &home_parts);
    match fs::metadata(&home_host) {
        Ok(meta) if meta.is_dir() && meta.uid() == uid => {}
        _ => return out,
    }
    let mut log = ChownLog::default();
    for rel in TOOL_DIRS {
        let mut host = home_host.clone();
        let mut shown = join(Path::new("/"), &home_parts);
        let mut ok = true;
        for part in Path::new(rel).components() {
            host.push(part);
            shown.push(part);
            match fs::symlink_metadata(&host) {
                Ok(meta) if meta.is_dir() => {
                    if (meta.uid(), meta.gid()) != (uid, gid)
                        && log.set_owner(&host, &shown, uid, gid, false)
                    {
                        out.owner_set += 1;
                    }
                }
                Ok(_) => {
                    out.warnings.push(format!(
                        "{} is not a directory (or is a link); left as it is",
                        shown.display()
                    ));
                    ok = false;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if let Err(e) = fs::create_dir(&host) {
                        out.warnings
                            .push(format!("cannot create {}: {e}", shown.display()));
                        ok = false;
                        break;
                    }
                    out.created.push(shown.clone());
                    log.set_owner(&host, &shown, uid, gid, false);
                    let _ = fs::set_permissions(&host, fs::Permissions::from_mode(DIR_MODE));
                }
                Err(e) => {
                    out.warnings
                        .push(format!("inspecting {}: {e}", shown.display()));
                    ok = false;
                    break;
                }
            }
        }
        if ok {
            if let Ok(meta) = fs::symlink_metadata(&host) {
                out.owner_set += give_tree(&host, &shown, meta.dev(), uid, gid, &mut log);
            }
        }
    }
    out.warnings.extend(log.warning(uid, gid));
    out
}

/// Gives everything under `dir` (not `dir` itself) to `uid:gid`: links themselves, never
/// what they point at; nothing on another file system (a mount inside is somebody else's).
fn give_tree(dir: &Path, shown: &Path, dev: u64, uid: u32, gid: u32, log: &mut ChownLog) -> usize {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    let mut changed = 0;
    for entry in entries.flatten() {
        let (host, shown) = (entry.path(), shown.join(entry.file_name()));
        let Ok(meta) = fs::symlink_metadata(&host) else {
            continue;
        };
        if meta.dev() != dev {
            continue;
        }
        if (meta.uid(), meta.gid()) != (uid, gid) && log.set_owner(&host, &shown, uid, gid, false) {
            changed += 1;
        }
        if meta.is_dir() {
            changed += give_tree(&host, &shown, dev, uid, gid, log);
        }
    }
    changed
}

/// Missing, empty, or only a `lost+found` directory.
fn is_fresh(dir: &Path) -> io::Result<bool> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name() != LOST_FOUND || !entry.file_type()?.is_dir() {
            return Ok(false);
        }
    }
    Ok(true)
}

fn prepare(
    root: &Path,
    path: &Path,
    uid: u32,
    gid: u32,
    mode: u32,
    skel: Option<&[&OsStr]>,
) -> Result<HomeOutcome, HomeError> {
    let parts = parts(path)?;
    let host = join(root, &parts);
    let shown = join(Path::new("/"), &parts);
    let mut out = HomeOutcome {
        path: shown.clone(),
        ..HomeOutcome::default()
    };
    let mut log = ChownLog::default();

    let existing = match fs::symlink_metadata(&host) {
        Ok(meta) if meta.is_dir() => Some(meta),
        // A home may be a link to a directory elsewhere: judge the target.
        Ok(meta) if meta.file_type().is_symlink() => match fs::metadata(&host) {
            Ok(target) if target.is_dir() => Some(target),
            _ => return Err(HomeError::NotADirectory { path: shown }),
        },
        Ok(_) => return Err(HomeError::NotADirectory { path: shown }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        // A parent is not a directory: `create_parents` finds which one and
        // says so.
        Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => None,
        Err(e) => return Err(io_error("inspecting", &shown)(e)),
    };

    match existing {
        None => {
            create_parents(root, &parts, &mut out, &mut log)?;
            fs::create_dir(&host).map_err(io_error("creating", &shown))?;
            out.created = true;
            out.fresh = true;
            log.set_owner(&host, &shown, uid, gid, false);
            // After chown, and explicit so the umask does not matter.
            fs::set_permissions(&host, fs::Permissions::from_mode(mode))
                .map_err(io_error("setting mode of", &shown))?;
        }
        Some(meta) => {
            out.fresh = is_fresh(&host).map_err(io_error("reading", &shown))?;
            if !out.fresh {
                if meta.uid() != uid {
                    out.warnings.push(format!(
                        "{} is owned by uid {}, not {uid}, and is not empty: left as it is",
                        shown.display(),
                        meta.uid()
                    ));
                }
                return Ok(out);
            }
            if (meta.uid(), meta.gid()) != (uid, gid) {
                out.owner_set = log.set_owner(&host, &shown, uid, gid, true);
            }
        }
    }

    if let Some(skel) = skel {
        seed(root, skel, &host, &parts, uid, gid, &mut out, &mut log);
    }
    out.warnings.extend(log.warning(uid, gid));
    Ok(out)
}

/// Creates the missing parents of `parts` (all but the last), 0755, owned
/// like their nearest existing ancestor.
fn create_parents(
    root: &Path,
    parts: &[&OsStr],
    out: &mut HomeOutcome,
    log: &mut ChownLog,
) -> Result<(), HomeError> {
    let root_meta = fs::metadata(root).map_err(io_error("inspecting", root))?;
    let mut owner = (root_meta.uid(), root_meta.gid());
    let mut host = root.to_path_buf();
    let mut shown = PathBuf::from("/");
    let parents = parts.split_last().map_or(&[][..], |(_, parents)| parents);
    for part in parents {
        host.push(part);
        shown.push(part);
        match fs::metadata(&host) {
            Ok(meta) if meta.is_dir() => owner = (meta.uid(), meta.gid()),
            Ok(_) => return Err(HomeError::NotADirectory { path: shown }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir(&host).map_err(io_error("creating", &shown))?;
                out.parents_created.push(shown.clone());
                log.set_owner(&host, &shown, owner.0, owner.1, false);
                fs::set_permissions(&host, fs::Permissions::from_mode(DIR_MODE))
                    .map_err(io_error("setting mode of", &shown))?;
            }
            Err(e) => return Err(io_error("inspecting", &shown)(e)),
        }
    }
    Ok(())
}

/// Copies the skel directory into the fresh home `home_host`.
#[allow(clippy::too_many_arguments)]
fn seed(
    root: &Path,
    skel: &[&OsStr],
    home_host: &Path,
    home: &[&OsStr],
    uid: u32,
    gid: u32,
    out: &mut HomeOutcome,
    log: &mut ChownLog,
) {
    // A skel that contains the home, or sits in it, would copy into itself.
    if skel.starts_with(home) || home.starts_with(skel) {
        out.warnings.push(format!(
            "skel {} and home {} overlap; not copying",
            join(Path::new("/"), skel).display(),
            out.path.display()
        ));
        return;
    }
    let skel_host = join(root, skel);
    match fs::metadata(&skel_host) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => {
            out.warnings.push(format!(
                "skel {} is not a directory; home left empty",
                join(Path::new("/"), skel).display()
            ));
            return;
        }
        // Normal on minimal images.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return,
        Err(e) => {
            out.warnings
                .push(format!("reading skel {}: {e}", skel_host.display()));
            return;
        }
    }
    let shown = out.path.clone();
    let mut copy = Copy { uid, gid, out, log };
    copy.tree(&skel_host, home_host, &shown, true);
}

/// State of one skel copy.
struct Copy<'a> {
    uid: u32,
    gid: u32,
    out: &'a mut HomeOutcome,
    log: &'a mut ChownLog,
}

impl Copy<'_> {
    /// Copies the entries of `src` into `dst` (`shown` in the container),
    /// sorted by name so the outcome is reproducible. Failures become
    /// warnings: one unreadable skel file should not cost the others.
    fn tree(&mut self, src: &Path, dst: &Path, shown: &Path, top: bool) {
        let mut names: Vec<OsString> = match fs::read_dir(src).and_then(|entries| {
            entries
                .map(|entry| entry.map(|e| e.file_name()))
                .collect::<io::Result<_>>()
        }) {
            Ok(names) => names,
            Err(e) => {
                self.out
                    .warnings
                    .push(format!("reading skel {}: {e}", src.display()));
                return;
            }
        };
        names.sort();
        for name in names {
            // The volume's lost+found stays the file system's own.
            if top && name == LOST_FOUND {
                continue;
            }
            let (from, to, to_shown) = (src.join(&name), dst.join(&name), shown.join(&name));
            if let Err(e) = self.entry(&from, &to, &to_shown) {
                self.out.warnings.push(format!(
                    "copying skel {} to {}: {e}",
                    from.display(),
                    to_shown.display()
                ));
            }
        }
    }

    /// Copies one entry, never overwriting: if `to` exists it is left alone
    /// (an existing directory is entered, keeping its owner and mode).
    fn entry(&mut self, from: &Path, to: &Path, shown: &Path) -> io::Result<()> {
        let meta = fs::symlink_metadata(from)?;
        let mode = fs::Permissions::from_mode(meta.mode() & 0o7777);
        let kind = meta.file_type();
        if kind.is_dir() {
            let created = match fs::create_dir(to) {
                Ok(()) => true,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    if !fs::symlink_metadata(to)?.is_dir() {
                        return Ok(());
                    }
                    false
                }
                Err(e) => return Err(e),
            };
            if created {
                self.out.skel_copied.push(shown.to_path_buf());
                self.log.set_owner(to, shown, self.uid, self.gid, false);
            }
            self.tree(from, to, shown, false);
            // Last, so a read-only skel directory does not block its own copy.
            if created {
                fs::set_permissions(to, mode)?;
            }
        } else if kind.is_file() {
            // Opened first: an unreadable source leaves no empty copy behind.
            let mut input = fs::File::open(from)?;
            let mut output = match fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(to)
            {
                Ok(file) => file,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
                Err(e) => return Err(e),
            };
            if let Err(e) = io::copy(&mut input, &mut output) {
                drop(output);
                let _ = fs::remove_file(to);
                return Err(e);
            }
            self.out.skel_copied.push(shown.to_path_buf());
            self.log.set_owner(to, shown, self.uid, self.gid, false);
            // After chown, which clears set-id bits.
            output.set_permissions(mode)?;
        } else if kind.is_symlink() {
            // Copied as a link, never followed: its target may not exist yet,
            // or may point anywhere.
            let target = fs::read_link(from)?;
            match std::os::unix::fs::symlink(&target, to) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
                Err(e) => return Err(e),
            }
            self.out.skel_copied.push(shown.to_path_buf());
            self.log.set_owner(to, shown, self.uid, self.gid, false);
        } else {
            self.out.warnings.push(format!(
                "skel entry {} is not a file, directory or symlink; skipped",
                from.display()
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::os::unix::fs::symlink;

    const UID: u32 = 1000;
    const GID: u32 = 1001;
    const SKEL: &str = "/etc/skel";

    fn root() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        dir
    }

    fn host(root: &Path, path: &str) -> PathBuf {
        root.join(path.trim_start_matches('/'))
    }

    fn mkdir(root: &Path, path: &str, mode: u32) -> PathBuf {
        let p = host(root, path);
        fs::create_dir_all(&p).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    fn write(root: &Path, path: &str, content: &str, mode: u32) -> PathBuf {
        let p = host(root, path);
        fs::write(&p, content).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    /// A Debian-like skel with a few tricky entries.
    fn skel(root: &Path) {
        mkdir(root, "/etc/skel", 0o755);
        write(root, "/etc/skel/.bashrc", "# bashrc\n", 0o644);
        write(root, "/etc/skel/.profile", "# profile\n", 0o600);
        mkdir(root, "/etc/skel/.config", 0o700);
        write(root, "/etc/skel/.config/app.conf", "x=1\n", 0o640);
        write(root, "/etc/skel/bin-tool", "#!/bin/sh\n", 0o4755);
        symlink(".bashrc", host(root, "/etc/skel/.link")).unwrap();
        symlink("/nonexistent/target", host(root, "/etc/skel/dangling")).unwrap();
        symlink(".config", host(root, "/etc/skel/dirlink")).unwrap();
    }

    /// (kind, mode, uid, gid, inode, content or link target) of one entry.
    type Entry = (char, u32, u32, u32, u64, Vec<u8>);

    /// Every entry under `dir`, for before/after comparisons.
    fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Entry> {
        fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Entry>) {
            let meta = fs::symlink_metadata(dir).unwrap();
            let rel = dir.strip_prefix(base).unwrap().to_path_buf();
            let kind = meta.file_type();
            let (c, data) = if kind.is_symlink() {
                (
                    'l',
                    fs::read_link(dir)
                        .unwrap()
                        .into_os_string()
                        .into_encoded_bytes(),
                )
            } else if kind.is_file() {
                ('f', fs::read(dir).unwrap())
            } else if kind.is_dir() {
                ('d', Vec::new())
            } else {
                ('o', Vec::new())
            };
            out.insert(
                rel,
                (
                    c,
                    meta.mode() & 0o7777,
                    meta.uid(),
                    meta.gid(),
                    meta.ino(),
                    data,
                ),
            );
            if kind.is_dir() {
                for entry in fs::read_dir(dir).unwrap() {
                    walk(base, &entry.unwrap().path(), out);
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(dir, dir, &mut out);
        out
    }

    fn owner(path: &Path) -> (u32, u32) {
        let meta = fs::symlink_metadata(path).unwrap();
        (meta.uid(), meta.gid())
    }

    fn mode(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().mode() & 0o7777
    }

    fn home(root: &Path) -> Result<HomeOutcome, HomeError> {
        prepare_home(root, Path::new("/home/coder"), UID, GID, Path::new(SKEL))
    }

    fn assert_seeded(root: &Path) {
        let h = host(root, "/home/coder");
        assert_eq!(fs::read_to_string(h.join(".bashrc")).unwrap(), "# bashrc\n");
        assert_eq!(
            fs::read_to_string(h.join(".config/app.conf")).unwrap(),
            "x=1\n"
        );
        for (name, m) in [
            (".bashrc", 0o644),
            (".profile", 0o600),
            (".config", 0o700),
            (".config/app.conf", 0o640),
            ("bin-tool", 0o4755),
        ] {
            assert_eq!(mode(&h.join(name)), m, "{name}");
        }
        for name in [
            ".bashrc",
            ".profile",
            ".config",
            ".config/app.conf",
            "bin-tool",
            ".link",
            "dangling",
            "dirlink",
        ] {
            assert_eq!(owner(&h.join(name)), (UID, GID), "{name}");
        }
    }

    #[test]
    fn missing_home_is_created_and_seeded() {
        let r = root();
        skel(r.path());
        mkdir(r.path(), "/home", 0o755);
        let out = home(r.path()).unwrap();
        let h = host(r.path(), "/home/coder");
        assert!(out.created && out.fresh && out.changed());
        assert!(out.parents_created.is_empty());
        assert_eq!(out.path, Path::new("/home/coder"));
        assert_eq!(owner(&h), (UID, GID));
        assert_eq!(mode(&h), HOME_MODE);
        assert_seeded(r.path());
        assert_eq!(
            out.skel_copied,
            [
                ".bashrc",
                ".config",
                ".config/app.conf",
                ".link",
                ".profile",
                "bin-tool",
                "dangling",
                "dirlink"
            ]
            .map(|n| Path::new("/home/coder").join(n))
            .to_vec()
        );
        assert!(out.warnings.is_empty(), "{:?}", out.warnings);
        // The skel itself is unchanged.
        assert_eq!(owner(&host(r.path(), "/etc/skel/.bashrc")), (0, 0));
    }

    #[test]
    fn created_home_mode_ignores_umask_and_skel_mode() {
        let r = root();
        mkdir(r.path(), "/etc/skel", 0o777);
        let out = home(r.path()).unwrap();
        assert!(out.created);
        assert_eq!(mode(&host(r.path(), "/home/coder")), 0o750);
    }

    #[test]
    fn symlinks_are_copied_as_symlinks() {
        let r = root();
        skel(r.path());
        home(r.path()).unwrap();
        let h = host(r.path(), "/home/coder");
        for (name, target) in [
            (".link", ".bashrc"),
            ("dangling", "/nonexistent/target"),
            ("dirlink", ".config"),
        ] {
            let meta = fs::symlink_metadata(h.join(name)).unwrap();
            assert!(meta.file_type().is_symlink(), "{name}");
            assert_eq!(fs::read_link(h.join(name)).unwrap(), Path::new(target));
        }
        // Not followed: no directory appeared behind the absolute link.
        assert!(!host(r.path(), "/nonexistent").exists());
    }

    #[test]
    fn missing_parents_belong_to_nearest_existing_ancestor() {
        let r = root();
        let out = home(r.path()).unwrap();
        assert_eq!(out.parents_created, vec![PathBuf::from("/home")]);
        assert_eq!(owner(&host(r.path(), "/home")), (0, 0));
        assert_eq!(mode(&host(r.path(), "/home")), DIR_MODE);
        assert_eq!(owner(&host(r.path(), "/home/coder")), (UID, GID));

        let out = prepare_dir(r.path(), Path::new("/home/coder/src/app"), UID, GID).unwrap();
        assert_eq!(out.parents_created, vec![PathBuf::from("/home/coder/src")]);
        assert_eq!(owner(&host(r.path(), "/home/coder/src")), (UID, GID));
        assert_eq!(owner(&host(r.path(), "/home/coder/src/app")), (UID, GID));
    }

    #[test]
    fn parents_outside_home_stay_root_owned() {
        let r = root();
        let out = prepare_dir(r.path(), Path::new("/workspaces/a/b"), UID, GID).unwrap();
        assert_eq!(
            out.parents_created,
            ["/workspaces", "/workspaces/a"].map(PathBuf::from).to_vec()
        );
        assert_eq!(owner(&host(r.path(), "/workspaces/a")), (0, 0));
        assert_eq!(owner(&host(r.path(), "/workspaces/a/b")), (UID, GID));
        assert_eq!(mode(&host(r.path(), "/workspaces/a/b")), DIR_MODE);
        assert!(out.skel_copied.is_empty());
    }

    #[test]
    fn empty_existing_home_is_given_to_user_keeping_its_mode() {
        let r = root();
        skel(r.path());
        let h = mkdir(r.path(), "/home/coder", 0o755);
        let out = home(r.path()).unwrap();
        assert!(out.fresh && out.owner_set && !out.created);
        assert_eq!(owner(&h), (UID, GID));
        assert_eq!(mode(&h), 0o755);
        assert_seeded(r.path());
    }

    #[test]
    fn home_with_only_lost_found_is_fresh_and_lost_found_untouched() {
        let r = root();
        skel(r.path());
        let h = mkdir(r.path(), "/home/coder", 0o755);
        let lf = mkdir(r.path(), "/home/coder/lost+found", 0o700);
        write(r.path(), "/home/coder/lost+found/#12", "orphan", 0o600);
        let before = snapshot(&lf);
        let out = home(r.path()).unwrap();
        assert!(out.fresh && out.owner_set);
        assert_eq!(owner(&h), (UID, GID));
        assert_eq!(snapshot(&lf), before);
        assert_eq!(owner(&lf), (0, 0));
        assert_eq!(mode(&lf), 0o700);
        assert!(!out.skel_copied.iter().any(|p| p.ends_with(LOST_FOUND)));
        assert_seeded(r.path());
    }

    #[test]
    fn skel_lost_found_is_not_copied_into_home() {
        let r = root();
        skel(r.path());
        mkdir(r.path(), "/etc/skel/lost+found", 0o755);
        write(r.path(), "/etc/skel/lost+found/x", "", 0o644);
        let lf = mkdir(r.path(), "/home/coder/lost+found", 0o700);
        home(r.path()).unwrap();
        assert!(!lf.join("x").exists());
        assert_eq!(owner(&lf), (0, 0));
    }

    #[test]
    fn lost_found_file_does_not_make_a_home_fresh() {
        let r = root();
        skel(r.path());
        mkdir(r.path(), "/home/coder", 0o755);
        write(r.path(), "/home/coder/lost+found", "", 0o644);
        let out = home(r.path()).unwrap();
        assert!(!out.fresh && !out.changed());
        assert!(!host(r.path(), "/home/coder/.bashrc").exists());
    }

    #[test]
    fn non_fresh_home_is_left_untouched() {
        let r = root();
        skel(r.path());
        let h = mkdir(r.path(), "/home/coder", 0o755);
        write(r.path(), "/home/coder/.bashrc", "mine\n", 0o600);
        mkdir(r.path(), "/home/coder/work", 0o700);
        write(r.path(), "/home/coder/work/file", "data", 0o644);
        let before = snapshot(&h);
        let out = home(r.path()).unwrap();
        assert!(!out.fresh && !out.changed());
        assert!(out.skel_copied.is_empty());
        assert_eq!(snapshot(&h), before);
        assert_eq!(out.warnings.len(), 1, "{:?}", out.warnings);
        assert!(out.warnings[0].contains("uid 0"), "{}", out.warnings[0]);
    }

    #[test]
    fn non_fresh_home_owned_by_user_gives_no_warning() {
        let r = root();
        skel(r.path());
        let h = mkdir(r.path(), "/home/coder", 0o700);
        std::os::unix::fs::chown(&h, Some(UID), Some(0)).unwrap();
        write(r.path(), "/home/coder/notes", "x", 0o644);
        let out = home(r.path()).unwrap();
        assert!(!out.changed());
        assert!(out.warnings.is_empty());
        // The gid is not "fixed" either.
        assert_eq!(owner(&h), (UID, 0));
    }

    #[test]
    fn second_run_changes_nothing() {
        let r = root();
        skel(r.path());
        let first = home(r.path()).unwrap();
        assert!(first.changed());
        let h = host(r.path(), "/home/coder");
        let before = snapshot(&h);
        let second = home(r.path()).unwrap();
        assert!(!second.changed(), "{second:?}");
        assert!(!second.fresh);
        assert!(second.warnings.is_empty());
        assert_eq!(snapshot(&h), before);
    }

    #[test]
    fn second_run_with_empty_skel_changes_nothing() {
        let r = root();
        mkdir(r.path(), "/etc/skel", 0o755);
        assert!(home(r.path()).unwrap().created);
        let second = home(r.path()).unwrap();
        // Still empty, hence still fresh, but already right.
        assert!(second.fresh);
        assert!(!second.changed(), "{second:?}");
    }

    #[test]
    fn skel_never_overwrites() {
        let r = root();
        skel(r.path());
        let h = mkdir(r.path(), "/home/coder", 0o755);
        write(r.path(), "/home/coder/.bashrc", "mine\n", 0o600);
        write(r.path(), "/home/coder/.config", "a file", 0o600);
        write(r.path(), "/home/coder/.link", "not a link", 0o600);
        let before = snapshot(&h);
        let mut out = HomeOutcome::default();
        let mut log = ChownLog::default();
        let mut copy = Copy {
            uid: UID,
            gid: GID,
            out: &mut out,
            log: &mut log,
        };
        copy.tree(&host(r.path(), SKEL), &h, Path::new("/home/coder"), true);
        let after = snapshot(&h);
        for name in [".bashrc", ".config", ".link"] {
            assert_eq!(after[Path::new(name)], before[Path::new(name)], "{name}");
        }
        assert_eq!(
            fs::read_to_string(h.join(".profile")).unwrap(),
            "# profile\n"
        );
        assert!(!out
            .skel_copied
            .contains(&PathBuf::from("/home/coder/.bashrc")));
        assert!(out.warnings.is_empty(), "{:?}", out.warnings);
    }

    #[test]
    fn existing_directory_is_merged_not_chowned() {
        let r = root();
        skel(r.path());
        let h = mkdir(r.path(), "/home/coder", 0o755);
        let config = mkdir(r.path(), "/home/coder/.config", 0o755);
        let mut out = HomeOutcome::default();
        let mut log = ChownLog::default();
        Copy {
            uid: UID,
            gid: GID,
            out: &mut out,
            log: &mut log,
        }
        .tree(&host(r.path(), SKEL), &h, Path::new("/home/coder"), true);
        assert_eq!(owner(&config), (0, 0));
        assert_eq!(mode(&config), 0o755);
        assert_eq!(owner(&config.join("app.conf")), (UID, GID));
    }

    #[test]
    fn home_that_is_a_file_is_an_error_and_untouched() {
        let r = root();
        skel(r.path());
        mkdir(r.path(), "/home", 0o755);
        let f = write(r.path(), "/home/coder", "oops", 0o644);
        let err = home(r.path()).unwrap_err();
        assert!(
            matches!(&err, HomeError::NotADirectory { path } if path == Path::new("/home/coder")),
            "{err:?}"
        );
        assert_eq!(fs::read_to_string(&f).unwrap(), "oops");
        assert_eq!((owner(&f), mode(&f)), ((0, 0), 0o644));
        assert!(err.to_string().contains("/home/coder"));
    }

    #[test]
    fn parent_that_is_a_file_is_an_error() {
        let r = root();
        write(r.path(), "/home", "oops", 0o644);
        let err = home(r.path()).unwrap_err();
        assert!(
            matches!(&err, HomeError::NotADirectory { path } if path == Path::new("/home")),
            "{err:?}"
        );
    }

    #[test]
    fn dangling_symlink_home_is_an_error() {
        let r = root();
        mkdir(r.path(), "/home", 0o755);
        symlink("missing", host(r.path(), "/home/coder")).unwrap();
        let err = home(r.path()).unwrap_err();
        assert!(matches!(err, HomeError::NotADirectory { .. }), "{err:?}");
        assert!(fs::symlink_metadata(host(r.path(), "/home/coder"))
            .unwrap()
            .file_type()
            .is_symlink());
    }

    #[test]
    fn symlinked_fresh_home_gives_the_target_to_the_user() {
        let r = root();
        skel(r.path());
        let target = mkdir(r.path(), "/data/coder", 0o755);
        mkdir(r.path(), "/home", 0o755);
        let link = host(r.path(), "/home/coder");
        symlink("../data/coder", &link).unwrap();
        let out = home(r.path()).unwrap();
        assert!(out.owner_set);
        assert_eq!(owner(&target), (UID, GID));
        assert_eq!(owner(&link), (0, 0));
        assert!(target.join(".bashrc").exists());
    }

    #[test]
    fn invalid_paths_are_rejected_before_touching_anything() {
        let r = root();
        for (path, skel) in [
            ("home/coder", SKEL),
            ("/home/../etc", SKEL),
            ("/", SKEL),
            ("", SKEL),
            ("/home/coder", "etc/skel"),
            ("/home/coder", "/"),
        ] {
            let result = prepare_home(r.path(), Path::new(path), UID, GID, Path::new(skel));
            assert!(
                matches!(result, Err(HomeError::InvalidPath { .. })),
                "{path} {skel}: {result:?}"
            );
        }
        assert!(matches!(
            prepare_dir(r.path(), Path::new("rel"), UID, GID),
            Err(HomeError::InvalidPath { .. })
        ));
        assert_eq!(fs::read_dir(r.path()).unwrap().count(), 0);
    }

    #[test]
    fn path_is_normalised() {
        let r = root();
        let out = prepare_home(
            r.path(),
            Path::new("/home//coder/./"),
            UID,
            GID,
            Path::new(SKEL),
        )
        .unwrap();
        assert_eq!(out.path, Path::new("/home/coder"));
        assert!(host(r.path(), "/home/coder").is_dir());
    }

    #[test]
    fn missing_skel_is_not_a_problem() {
        let r = root();
        let out = home(r.path()).unwrap();
        assert!(out.created);
        assert!(out.skel_copied.is_empty());
        assert!(out.warnings.is_empty(), "{:?}", out.warnings);
    }

    #[test]
    fn skel_that_is_a_file_is_warned() {
        let r = root();
        mkdir(r.path(), "/etc", 0o755);
        write(r.path(), SKEL, "", 0o644);
        let out = home(r.path()).unwrap();
        assert!(out.created);
        assert!(
            out.warnings.iter().any(|w| w.contains("not a directory")),
            "{:?}",
            out.warnings
        );
    }

    #[test]
    fn special_files_in_skel_are_skipped_with_a_warning() {
        let r = root();
        skel(r.path());
        nix::unistd::mkfifo(
            &host(r.path(), "/etc/skel/fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .unwrap();
        let out = home(r.path()).unwrap();
        assert!(!host(r.path(), "/home/coder/fifo").exists());
        assert_eq!(out.warnings.len(), 1, "{:?}", out.warnings);
        assert!(out.warnings[0].contains("fifo"));
        assert_seeded(r.path());
    }

    #[test]
    fn overlapping_skel_and_home_are_refused() {
        let r = root();
        mkdir(r.path(), "/home/other", 0o755);
        let out = prepare_home(
            r.path(),
            Path::new("/home/coder"),
            UID,
            GID,
            Path::new("/home"),
        )
        .unwrap();
        assert!(out.skel_copied.is_empty());
        assert!(out.warnings.iter().any(|w| w.contains("overlap")));
        assert!(!host(r.path(), "/home/coder/coder").exists());
    }

    #[test]
    fn project_dir_existing_empty_is_given_to_user() {
        let r = root();
        let p = mkdir(r.path(), "/home/coder/project", 0o775);
        let out = prepare_dir(r.path(), Path::new("/home/coder/project"), UID, GID).unwrap();
        assert!(out.fresh && out.owner_set && !out.created);
        assert_eq!(owner(&p), (UID, GID));
        assert_eq!(mode(&p), 0o775);
        assert!(out.skel_copied.is_empty());
    }

    #[test]
    fn project_dir_with_content_is_left_alone() {
        let r = root();
        let p = mkdir(r.path(), "/srv/project", 0o755);
        write(r.path(), "/srv/project/README", "hi", 0o644);
        let before = snapshot(&p);
        let out = prepare_dir(r.path(), Path::new("/srv/project"), UID, GID).unwrap();
        assert!(!out.changed());
        assert_eq!(snapshot(&p), before);
        assert_eq!(out.warnings.len(), 1);
    }

    #[test]
    fn chown_failures_become_one_warning() {
        let mut log = ChownLog::default();
        assert_eq!(log.warning(1, 2), None);
        log.record(
            Path::new("/home/coder"),
            &io::Error::from_raw_os_error(libc::EPERM),
        );
        let one = log.warning(1, 2).unwrap();
        assert!(
            one.contains("1 entry") && one.contains("/home/coder"),
            "{one}"
        );
        log.record(
            Path::new("/home/coder/.bashrc"),
            &io::Error::from_raw_os_error(libc::EINVAL),
        );
        let two = log.warning(1, 2).unwrap();
        assert!(
            two.contains("2 entries") && two.contains("first: /home/coder:"),
            "{two}"
        );
    }

    #[test]
    fn chown_failure_is_recorded_not_fatal() {
        let r = root();
        let mut log = ChownLog::default();
        let missing = host(r.path(), "/missing");
        assert!(!log.set_owner(&missing, Path::new("/missing"), UID, GID, false));
        assert!(log.warning(UID, GID).unwrap().contains("/missing"));
    }

    #[test]
    fn tool_dirs_are_created_and_given_to_the_user() {
        let r = root();
        let home = mkdir(r.path(), "/home/coder", 0o750);
        std::os::unix::fs::chown(&home, Some(UID), Some(GID)).unwrap();
        // A root-owned ~/.local with a root-owned mise tree, a link out of it, a foreign dir.
        mkdir(
            r.path(),
            "/home/coder/.local/share/mise/installs/node",
            0o755,
        );
        let tool = write(
            r.path(),
            "/home/coder/.local/share/mise/installs/node/bin",
            "",
            0o755,
        );
        let outside = write(r.path(), "/etc-secret", "", 0o600);
        symlink(
            &outside,
            host(r.path(), "/home/coder/.local/share/mise/link"),
        )
        .unwrap();
        let other = mkdir(r.path(), "/home/coder/.local/state", 0o755);
        let out = prepare_tool_dirs(r.path(), Path::new("/home/coder"), UID, GID);
        assert!(out.warnings.is_empty(), "{:?}", out.warnings);
        assert_eq!(
            out.created,
            [
                PathBuf::from("/home/coder/.config"),
                PathBuf::from("/home/coder/.config/mise")
            ]
        );
        for p in [
            "/home/coder/.config",
            "/home/coder/.config/mise",
            "/home/coder/.local",
            "/home/coder/.local/share",
            "/home/coder/.local/share/mise",
            "/home/coder/.local/share/mise/installs/node",
            "/home/coder/.local/share/mise/link",
        ] {
            assert_eq!(owner(&host(r.path(), p)), (UID, GID), "{p}");
        }
        assert_eq!(owner(&tool), (UID, GID));
        // Not followed, not recursive outside mise's directories.
        assert_eq!(owner(&outside), (0, 0));
        assert_eq!(owner(&other), (0, 0));
        // A second run changes nothing.
        let again = prepare_tool_dirs(r.path(), Path::new("/home/coder"), UID, GID);
        assert_eq!(again, ToolDirsOutcome::default());
    }

    #[test]
    fn tool_dirs_leave_a_home_that_is_not_the_users_alone() {
        let r = root();
        mkdir(r.path(), "/home/coder", 0o755);
        let out = prepare_tool_dirs(r.path(), Path::new("/home/coder"), UID, GID);
        assert_eq!(out, ToolDirsOutcome::default());
        assert!(!host(r.path(), "/home/coder/.config").exists());
        // A link where a directory should be is not followed.
        let r = root();
        let home = mkdir(r.path(), "/home/coder", 0o750);
        std::os::unix::fs::chown(&home, Some(UID), Some(GID)).unwrap();
        let elsewhere = mkdir(r.path(), "/elsewhere", 0o755);
        symlink(&elsewhere, host(r.path(), "/home/coder/.config")).unwrap();
        let out = prepare_tool_dirs(r.path(), Path::new("/home/coder"), UID, GID);
        assert_eq!(out.warnings.len(), 1, "{:?}", out.warnings);
        assert!(!elsewhere.join("mise").exists());
        assert_eq!(owner(&elsewhere), (0, 0));
    }

    #[test]
    fn fresh_detection() {
        let r = root();
        let d = mkdir(r.path(), "/d", 0o755);
        assert!(is_fresh(&d).unwrap());
        mkdir(r.path(), "/d/lost+found", 0o700);
        assert!(is_fresh(&d).unwrap());
        write(r.path(), "/d/.hidden", "", 0o644);
        assert!(!is_fresh(&d).unwrap());
    }
}

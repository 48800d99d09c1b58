//! The system calls setup makes, behind a trait: [`RealSys`] performs them,
//! [`RecordingSys`] records them (and can be told to fail), so mount and
//! permission decisions are unit-tested without root.

use std::cell::RefCell;
use std::io;
use std::path::{Path, PathBuf};

use nix::mount::MsFlags;

pub trait Syscall {
    fn mount(
        &self,
        source: &str,
        target: &Path,
        fstype: &str,
        flags: MsFlags,
        data: Option<&str>,
    ) -> io::Result<()>;
    fn mkdir_all(&self, path: &Path) -> io::Result<()>;
    fn chmod(&self, path: &Path, mode: u32) -> io::Result<()>;
    fn chown(&self, path: &Path, uid: u32, gid: u32) -> io::Result<()>;
    fn read(&self, path: &Path) -> io::Result<Vec<u8>>;
    fn write_atomic(&self, path: &Path, content: &[u8], mode: u32) -> io::Result<()>;
}

/// The real thing.
pub struct RealSys;

impl Syscall for RealSys {
    fn mount(
        &self,
        source: &str,
        target: &Path,
        fstype: &str,
        flags: MsFlags,
        data: Option<&str>,
    ) -> io::Result<()> {
        nix::mount::mount(Some(source), target, Some(fstype), flags, data).map_err(io::Error::from)
    }
    fn mkdir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir_all(path)
    }
    fn chmod(&self, path: &Path, mode: u32) -> io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
    }
    fn chown(&self, path: &Path, uid: u32, gid: u32) -> io::Result<()> {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
    }
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        std::fs::read(path)
    }
    fn write_atomic(&self, path: &Path, content: &[u8], mode: u32) -> io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let dir = path.parent().unwrap_or(Path::new("/"));
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let tmp = dir.join(format!(".{name}.hakim-init.tmp"));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(content)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path).inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
    }
}

/// One recorded call, in a form tests can compare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Mount {
        fstype: String,
        target: PathBuf,
        data: Option<String>,
    },
    MkdirAll(PathBuf),
    Chmod(PathBuf, u32),
    Chown(PathBuf, u32, u32),
    Write(PathBuf, Vec<u8>),
}

/// Records calls; `files` answers reads; `fail_mounts` makes every mount fail
/// with that errno (e.g. EPERM, as in Docker without CAP_SYS_ADMIN).
#[derive(Default)]
pub struct RecordingSys {
    pub calls: RefCell<Vec<Call>>,
    pub files: RefCell<Vec<(PathBuf, Vec<u8>)>>,
    pub fail_mounts: Option<i32>,
}

impl RecordingSys {
    pub fn with_file(self, path: &str, content: &str) -> Self {
        self.files
            .borrow_mut()
            .push((PathBuf::from(path), content.as_bytes().to_vec()));
        self
    }
    pub fn calls(&self) -> Vec<Call> {
        self.calls.borrow().clone()
    }
}

impl Syscall for RecordingSys {
    fn mount(
        &self,
        _source: &str,
        target: &Path,
        fstype: &str,
        _flags: MsFlags,
        data: Option<&str>,
    ) -> io::Result<()> {
        if let Some(errno) = self.fail_mounts {
            return Err(io::Error::from_raw_os_error(errno));
        }
        self.calls.borrow_mut().push(Call::Mount {
            fstype: fstype.into(),
            target: target.into(),
            data: data.map(str::to_string),
        });
        Ok(())
    }
    fn mkdir_all(&self, path: &Path) -> io::Result<()> {
        self.calls.borrow_mut().push(Call::MkdirAll(path.into()));
        Ok(())
    }
    fn chmod(&self, path: &Path, mode: u32) -> io::Result<()> {
        self.calls.borrow_mut().push(Call::Chmod(path.into(), mode));
        Ok(())
    }
    fn chown(&self, path: &Path, uid: u32, gid: u32) -> io::Result<()> {
        self.calls
            .borrow_mut()
            .push(Call::Chown(path.into(), uid, gid));
        Ok(())
    }
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        self.files
            .borrow()
            .iter()
            .find(|(p, _)| p == path)
            .map(|(_, c)| c.clone())
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
    }
    fn write_atomic(&self, path: &Path, content: &[u8], _mode: u32) -> io::Result<()> {
        self.calls
            .borrow_mut()
            .push(Call::Write(path.into(), content.to_vec()));
        Ok(())
    }
}

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

/// What the supervisor does to processes and time, behind a trait like [`Syscall`]:
/// [`RealHost`] makes the calls; the supervisor's unit tests use a fake whose clock moves
/// only when told and whose children exit when told, so restart backoff, readiness waits,
/// the stop order and graces are checked without a process or a second of waiting.
pub trait Host {
    /// The monotonic clock.
    fn now(&self) -> std::time::Instant;
    /// Starts a child (see [`crate::spawn::spawn`]).
    fn spawn(
        &mut self,
        argv: &[String],
        env: &[(String, String)],
        cwd: &Path,
        ids: Option<&crate::spawn::Ids>,
        capture: bool,
    ) -> io::Result<crate::spawn::Spawned>;
    /// Sends `sig` to one process.
    fn kill(&mut self, pid: nix::unistd::Pid, sig: i32);
    /// Sends `sig` to the process group `pid` leads.
    fn killpg(&mut self, pid: nix::unistd::Pid, sig: i32);
    /// One exited child, collected: its pid and status (exit code, or 128 + signal).
    fn reap(&mut self) -> Option<(nix::unistd::Pid, i32)>;
    /// Whether any child is left, running or not yet collected.
    fn has_children(&mut self) -> bool;
    /// The final sweep: `sig` to every process (PID 1) or every child (a subreaper).
    fn signal_everything(&mut self, sig: i32, is_pid1: bool);
    /// `name[pid]` of every live process the sweep would signal (for the log).
    fn leftovers(&mut self, is_pid1: bool) -> Vec<String>;
    /// Randomness for the restart jitter.
    fn random(&mut self) -> u64;
    fn exists(&self, path: &Path) -> bool;
}

/// The real thing.
pub struct RealHost;

impl Host for RealHost {
    fn now(&self) -> std::time::Instant {
        std::time::Instant::now()
    }
    fn spawn(
        &mut self,
        argv: &[String],
        env: &[(String, String)],
        cwd: &Path,
        ids: Option<&crate::spawn::Ids>,
        capture: bool,
    ) -> io::Result<crate::spawn::Spawned> {
        crate::spawn::spawn(argv, env, cwd, ids, capture)
    }
    fn kill(&mut self, pid: nix::unistd::Pid, sig: i32) {
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::try_from(sig).ok());
    }
    fn killpg(&mut self, pid: nix::unistd::Pid, sig: i32) {
        let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::try_from(sig).ok());
    }
    fn reap(&mut self) -> Option<(nix::unistd::Pid, i32)> {
        use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
        loop {
            match waitpid(nix::unistd::Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => return Some((pid, code)),
                Ok(WaitStatus::Signaled(pid, sig, _)) => return Some((pid, 128 + sig as i32)),
                Ok(WaitStatus::StillAlive) | Err(_) => return None,
                // Stopped/continued: not an exit; look again.
                Ok(_) => {}
            }
        }
    }
    fn has_children(&mut self) -> bool {
        use nix::sys::wait::{waitid, Id, WaitPidFlag};
        // WNOWAIT: look without collecting, so no exit status is lost here.
        !matches!(
            waitid(
                Id::All,
                WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT
            ),
            Err(nix::errno::Errno::ECHILD)
        )
    }
    fn signal_everything(&mut self, sig: i32, is_pid1: bool) {
        if is_pid1 {
            self.kill(nix::unistd::Pid::from_raw(-1), sig);
        } else {
            for pid in children_of_self() {
                self.kill(pid, sig);
            }
        }
    }
    fn leftovers(&mut self, is_pid1: bool) -> Vec<String> {
        let me = std::process::id() as i32;
        let pids: Vec<i32> = if is_pid1 {
            std::fs::read_dir("/proc")
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                .filter(|&p| p != me)
                .collect()
        } else {
            children_of_self()
                .into_iter()
                .map(nix::unistd::Pid::as_raw)
                .collect()
        };
        pids.into_iter()
            .filter_map(|pid| {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
                let (head, rest) = stat.rsplit_once(')')?;
                let name = head.split_once('(')?.1;
                // Exited, waiting to be reaped: nothing to stop.
                (rest.split_whitespace().next() != Some("Z")).then(|| format!("{name}[{pid}]"))
            })
            .collect()
    }
    fn random(&mut self) -> u64 {
        hakim_netenv::backoff::random_u64()
    }
    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }
}

/// Direct children of this process (for the sweep when not PID 1).
fn children_of_self() -> Vec<nix::unistd::Pid> {
    let me = std::process::id() as i32;
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Field 4 (ppid) follows the parenthesised command name, which may hold spaces.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let ppid = rest
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<i32>().ok());
        if ppid == Some(me) {
            out.push(nix::unistd::Pid::from_raw(pid));
        }
    }
    out
}

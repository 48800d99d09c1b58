//! Starting children in a clean state: own session (so a stop signal sent to
//! the group reaches the whole service), empty blocked-signal mask and default
//! dispositions (PID 1 blocks everything, and both survive `exec`), inherited
//! descriptors ≥ 3 closed, chosen ids, cwd and environment.

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use nix::unistd::Pid;

/// Who the child runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ids {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

pub struct Spawned {
    pub pid: Pid,
    /// Read end of the child's stdout+stderr when captured.
    pub output: Option<OwnedFd>,
}

/// Standard input reading EOF: `/dev/null`, or, in a root without one (a bare
/// chroot), the read end of a pipe whose write end is already closed.
pub fn null_stdin() -> io::Result<Stdio> {
    match std::fs::File::open("/dev/null") {
        Ok(f) => Ok(Stdio::from(f)),
        Err(_) => {
            let (r, _w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
            Ok(Stdio::from(r))
        }
    }
}

/// Starts `argv` with exactly `env`. With `capture`, stdout and stderr go to a
/// pipe PID 1 reads (to prefix lines with the service name); otherwise they are
/// inherited (the console).
pub fn spawn(
    argv: &[String],
    env: &[(String, String)],
    cwd: &Path,
    ids: Option<&Ids>,
    capture: bool,
) -> io::Result<Spawned> {
    let Some((program, args)) = argv.split_first() else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty command"));
    };
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(null_stdin()?);
    // A missing cwd would make the spawn fail; fall back to / like login does.
    cmd.current_dir(if cwd.is_dir() { cwd } else { Path::new("/") });
    let mut reader = None;
    if capture {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let w2 = w.try_clone()?;
        cmd.stdout(Stdio::from(w)).stderr(Stdio::from(w2));
        reader = Some(r);
    }
    let ids = ids.cloned();
    // Prepared before fork: nothing in pre_exec may allocate.
    let groups: Vec<libc::gid_t> = ids.as_ref().map(|i| i.groups.clone()).unwrap_or_default();
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some(ids) = &ids {
                // Order matters: supplementary groups and gid while still root.
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setgid(ids.gid) != 0
                    || libc::setuid(ids.uid) != 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
            // Raw rt_sigaction: libc wrappers refuse the signals they reserve
            // (glibc 32–33, musl 32–34), yet a parent may have left them ignored.
            // An all-zero kernel sigaction is SIG_DFL, no flags, empty mask on every
            // architecture, whatever its layout.
            let default_action = [0u64; 4];
            for sig in 1..=64 {
                if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                    libc::syscall(
                        libc::SYS_rt_sigaction,
                        sig,
                        default_action.as_ptr(),
                        std::ptr::null_mut::<u8>(),
                        8usize,
                    );
                }
            }
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            // Mark (not close) fds ≥ 3 close-on-exec: std reports exec failures
            // through its own CLOEXEC pipe, which must stay open until exec.
            const CLOSE_RANGE_CLOEXEC: libc::c_uint = 4;
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, CLOSE_RANGE_CLOEXEC);
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    // Dropping `cmd` closes our copies of the write ends: EOF arrives when the
    // child (and everything it forked) is done with the pipe.
    drop(cmd);
    Ok(Spawned {
        pid: Pid::from_raw(child.id() as i32),
        output: reader,
    })
}

//! hakim-init cross-built for aarch64 (`ci/build-init.sh aarch64-unknown-linux-musl`) and run
//! under `qemu-aarch64-static` in command mode, with aarch64 children.
//!
//! The binaries are checked independently of the build script: `readelf` must show an AArch64
//! executable with no program interpreter and no shared libraries. The children come from
//! `tests/src/bin/arch-probe.rs`, compiled for aarch64-unknown-linux-musl with `rustc` (linked
//! by Debian's `aarch64-linux-gnu-gcc`), installed as `/bin/true` and `/bin/probe` of a small
//! root; hakim-init is `/sbin/hakim-init` there.
//!
//! How aarch64 programs run: qemu-user passes `execve` through to the host kernel, which needs a
//! binfmt_misc handler to start an aarch64 ELF. Each run registers `qemu-aarch64-static` (flag
//! `F`: opened at registration, so it works inside the chroot) in a private binfmt_misc
//! instance of a new user + mount namespace (Linux ≥ 6.7), then chroots into the root: the
//! host's own binfmt_misc is never touched.
//!
//! Gating: root (the root's files are owned by uid 0), `qemu-aarch64-static`,
//! `aarch64-linux-gnu-gcc`, `rustc`, `readelf`, `unshare`, `chroot` and a kernel that mounts
//! binfmt_misc in a user namespace. Missing ones skip, or fail under `HAKIM_E2E=1`.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use hakim_e2e::init_harness::{build_init, rustc_static, send_signal};
use hakim_e2e::{gate, missing_tools_or_root, run_ok, show, workspace_root};

const TARGET: &str = "aarch64-unknown-linux-musl";
const QEMU: &str = "/usr/bin/qemu-aarch64-static";
const LINKER: &str = "aarch64-linux-gnu-gcc";

/// binfmt_misc registration of aarch64 ELF executables: magic and mask of the ELF header
/// (64-bit, little endian, ET_EXEC or ET_DYN, EM_AARCH64); the kernel decodes the escapes.
const BINFMT_AARCH64: &str = r":qemu-aarch64:M::\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00:\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff:";

/// Mounts a private binfmt_misc, registers qemu (`$1`), chroots into `$2`, runs the rest.
const IN_NAMESPACE: &str = r#"set -e
mount -t binfmt_misc hakim-binfmt /proc/sys/fs/binfmt_misc
printf '%s' "$BINFMT_RULE$1:F" >/proc/sys/fs/binfmt_misc/register
root=$2
shift 2
exec chroot "$root" "$@""#;

/// Whether this kernel gives a new user namespace its own binfmt_misc.
fn namespaced_binfmt() -> bool {
    Command::new("unshare")
        .args(["--user", "--map-root-user", "--mount", "sh", "-c"])
        .arg("mount -t binfmt_misc hakim-binfmt /proc/sys/fs/binfmt_misc && test -w /proc/sys/fs/binfmt_misc/register")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn ready() -> bool {
    static MISSING: OnceLock<Vec<String>> = OnceLock::new();
    let missing = MISSING.get_or_init(|| {
        let mut missing = missing_tools_or_root(
            &[LINKER, "rustc", "readelf", "unshare", "chroot"],
            "the root's files are owned by uid 0",
        );
        if !Path::new(QEMU).is_file() {
            missing.push(format!("{QEMU} (qemu-user-static)"));
        }
        if missing.is_empty() && !namespaced_binfmt() {
            missing.push("binfmt_misc in a user namespace (Linux >= 6.7)".into());
        }
        missing
    });
    gate(missing)
}

/// `readelf` says: an AArch64 executable, no interpreter, no shared libraries.
fn assert_static_aarch64(bin: &Path) {
    let readelf = |flag: &str| {
        String::from_utf8_lossy(&run_ok(Command::new("readelf").arg(flag).arg(bin)).stdout)
            .into_owned()
    };
    let header = readelf("-h");
    let machine = header
        .lines()
        .find(|l| l.trim_start().starts_with("Machine:"))
        .unwrap_or_default();
    assert!(
        machine.contains("AArch64"),
        "{}: not an aarch64 binary: {machine}",
        bin.display()
    );
    let segments = readelf("-lW");
    assert!(
        !segments.contains("INTERP"),
        "{}: has a program interpreter (dynamically linked):\n{segments}",
        bin.display()
    );
    let dynamic = readelf("-d");
    assert!(
        !dynamic.contains("(NEEDED)"),
        "{}: needs shared libraries:\n{dynamic}",
        bin.display()
    );
}

/// The root: `/sbin/hakim-init` (aarch64), `/bin/true` and `/bin/probe` (aarch64 arch-probe).
struct Setup {
    root: tempfile::TempDir,
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let ws = workspace_root();
        let started = Instant::now();
        let init = build_init(&ws, Some(TARGET), &[]);
        eprintln!(
            "aarch64 hakim-init built in {:.1} s: {} bytes",
            started.elapsed().as_secs_f64(),
            fs::metadata(&init).map(|m| m.len()).unwrap_or(0)
        );
        assert_static_aarch64(&init);

        let dir = ws.join("target/init-e2e");
        fs::create_dir_all(&dir).expect("create target/init-e2e");
        let probe = dir.join("arch-probe-aarch64");
        rustc_static(
            &ws.join("tests/src/bin/arch-probe.rs"),
            TARGET,
            Some(LINKER),
            &probe,
        );
        assert_static_aarch64(&probe);

        let root = tempfile::Builder::new()
            .prefix("hakim-aarch64-")
            .tempdir()
            .expect("temp root");
        for d in ["bin", "sbin", "tmp"] {
            fs::create_dir_all(root.path().join(d)).expect("mkdir in root");
        }
        let install = |from: &Path, to: &str| {
            let dest = root.path().join(to);
            fs::copy(from, &dest).unwrap_or_else(|e| panic!("copy to {}: {e}", dest.display()));
            fs::set_permissions(&dest, fs::Permissions::from_mode(0o755)).expect("chmod");
        };
        install(&init, "sbin/hakim-init");
        install(&probe, "bin/true");
        install(&probe, "bin/probe");
        Setup { root }
    })
}

/// `hakim-init -- ARGS…` as aarch64 inside the root (see the module docs).
fn init_command(args: &[&str]) -> Command {
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--user",
        "--map-root-user",
        "--mount",
        "sh",
        "-c",
        IN_NAMESPACE,
        "sh",
        QEMU,
    ])
    .arg(setup().root.path())
    .args(["/sbin/hakim-init", "--"])
    .args(args)
    .env("BINFMT_RULE", BINFMT_AARCH64)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    cmd
}

/// Waits for `child` at most `limit`; kills it (by its pid) and panics on a timeout.
fn wait_with_limit(mut child: Child, limit: Duration, what: &str) -> Output {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait().expect("try_wait") {
            Some(_) => return child.wait_with_output().expect("collect output"),
            None if Instant::now() > deadline => {
                let _ = child.kill();
                let out = child.wait_with_output().expect("collect output");
                panic!(
                    "{what}: still running after {limit:?}; stderr:\n{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn run_init(args: &[&str]) -> Output {
    let mut cmd = init_command(args);
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", show(&cmd)));
    wait_with_limit(child, Duration::from_secs(60), &show(&cmd))
}

fn code(status: ExitStatus, out: &Output) -> i32 {
    status.code().unwrap_or_else(|| {
        panic!(
            "hakim-init itself died ({status}); stderr:\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[test]
fn aarch64_init_runs_true_and_reports_exit_codes() {
    if !ready() {
        return;
    }
    let out = run_init(&["/bin/true"]);
    assert_eq!(
        code(out.status, &out),
        0,
        "hakim-init -- /bin/true; stderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The child really is aarch64 code, and its output passes through.
    let out = run_init(&["/bin/probe", "arch"]);
    assert_eq!(code(out.status, &out), 0);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "aarch64");

    let out = run_init(&["/bin/probe", "exit", "7"]);
    assert_eq!(code(out.status, &out), 7, "exit status 7 passed through");

    // A command that cannot run at all is an error, not success.
    let out = run_init(&["/bin/does-not-exist"]);
    assert_ne!(code(out.status, &out), 0, "a missing command exited 0");
}

#[test]
fn aarch64_init_child_killed_by_signal_gives_128_plus_n() {
    if !ready() {
        return;
    }
    for (sig, name) in [(9, "SIGKILL"), (15, "SIGTERM"), (10, "SIGUSR1")] {
        let n = sig.to_string();
        let out = run_init(&["/bin/probe", "signal", &n]);
        assert_eq!(
            code(out.status, &out),
            128 + sig,
            "child killed by {name}: expected exit {}; stderr:\n{}",
            128 + sig,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The host pid of a child of `pid`, once it has one.
fn first_child(pid: u32, limit: Duration) -> Option<u32> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        let tasks = PathBuf::from(format!("/proc/{pid}/task"));
        if let Ok(rd) = fs::read_dir(&tasks) {
            for t in rd.flatten() {
                let children = fs::read_to_string(t.path().join("children")).unwrap_or_default();
                if let Some(c) = children.split_whitespace().next() {
                    return c.parse().ok();
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

#[test]
fn aarch64_init_forwards_sigterm_to_its_child() {
    if !ready() {
        return;
    }
    let mut cmd = init_command(&["/bin/probe", "sleep", "60"]);
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", show(&cmd)));
    // unshare, sh and chroot exec in turn: the spawned pid is hakim-init's.
    let init_pid = child.id();
    let started = Instant::now();
    let grandchild = first_child(init_pid, Duration::from_secs(30));
    assert!(grandchild.is_some(), "hakim-init started no child");
    // Let the child get past exec (qemu start-up) before the signal.
    std::thread::sleep(Duration::from_millis(300));
    assert!(send_signal(init_pid as i32, 15), "cannot signal {init_pid}");
    let out = wait_with_limit(child, Duration::from_secs(30), "hakim-init after SIGTERM");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the sleeping child was not stopped by the forwarded SIGTERM"
    );
    assert_eq!(
        code(out.status, &out),
        128 + 15,
        "child stopped by the forwarded SIGTERM; stderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

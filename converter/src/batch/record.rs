//! The skip record, `sources.txt` beside `sha256sums.txt`: one line per artifact,
//! `<artifact> <source manifest digest> <artifact sha256>`. A later batch compares the
//! digest its source resolves to with the recorded one and skips the conversion when
//! they are equal; the line (and the published artifact) stay valid.
//!
//! An artifact's name is only known after conversion (rootfs templates carry the
//! image's release, read from its `/etc/os-release`), so a job finds its line by the
//! shape of the names it produces ([`NamePattern`]).

use std::path::{Path, PathBuf};

use anyhow::Result;

use super::config::{Format, Output};
use crate::ociout;
use crate::output::{self, sanitize};

pub const RECORD_FILE: &str = "sources.txt";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub artifact: String,
    pub digest: String,
    pub sha256: String,
}

/// Parses the record; lines that are not three fields are ignored.
pub fn parse(text: &str) -> Vec<Entry> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (a, d, s) = (f.next()?, f.next()?, f.next()?);
            if f.next().is_some() || !d.contains(':') || s.len() != 64 {
                return None;
            }
            Some(Entry {
                artifact: a.into(),
                digest: d.into(),
                sha256: s.into(),
            })
        })
        .collect()
}

fn render(entries: &[Entry]) -> String {
    let mut sorted: Vec<&Entry> = entries.iter().collect();
    sorted.sort_by(|a, b| a.artifact.cmp(&b.artifact));
    sorted
        .iter()
        .map(|e| format!("{} {} {}\n", e.artifact, e.digest, e.sha256))
        .collect()
}

/// Reads `dir/sources.txt` (empty when missing).
pub fn load(dir: &Path) -> Result<Vec<Entry>> {
    let path = dir.join(RECORD_FILE);
    match std::fs::read_to_string(&path) {
        Ok(t) => Ok(parse(&t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(anyhow::Error::new(e).context(format!("cannot read {}", path.display()))),
    }
}

/// Records `entry`, replacing any line of the same artifact or of the same job
/// (`pattern`: an earlier name, e.g. before the image's release changed).
pub fn update(dir: &Path, entry: &Entry, pattern: &NamePattern) -> Result<PathBuf> {
    output::DirLock::acquire(dir)?.rewrite(RECORD_FILE, |existing| {
        let mut entries: Vec<Entry> = parse(existing)
            .into_iter()
            .filter(|e| e.artifact != entry.artifact && !pattern.matches(&e.artifact))
            .collect();
        entries.push(entry.clone());
        render(&entries)
    })
}

/// The names one variant × output can produce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NamePattern {
    /// Rootfs: `hakim-<variant>-<release>-<arch><ext>`, the release unknown in advance.
    Release { prefix: String, suffix: String },
    /// OCI archive: `hakim-<variant>_<tag>.tar`, known in advance.
    Exact(String),
}

impl NamePattern {
    pub fn new(variant: &str, arch: &str, tag: &str, out: &Output) -> NamePattern {
        let stem = sanitize(&format!("hakim-{variant}"));
        match out.format {
            Format::Rootfs => NamePattern::Release {
                prefix: format!("{stem}-"),
                suffix: format!("-{}{}", sanitize(arch), out.compression.extension()),
            },
            Format::OciArchive => NamePattern::Exact(
                ociout::archive_name(&stem, tag).unwrap_or_else(|_| format!("{stem}_{tag}.tar")),
            ),
        }
    }

    /// A release part must be non-empty and free of `-`, so `hakim-base-…` never
    /// takes the line of a variant called `base-x`.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            NamePattern::Exact(n) => n == name,
            NamePattern::Release { prefix, suffix } => name
                .strip_prefix(prefix.as_str())
                .and_then(|r| r.strip_suffix(suffix.as_str()))
                .is_some_and(|release| {
                    !release.is_empty() && !release.contains('-') && !release.contains('/')
                }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::OutputCompression;

    fn rootfs(c: OutputCompression) -> Output {
        Output {
            format: Format::Rootfs,
            compression: c,
        }
    }

    #[test]
    fn patterns() {
        let p = NamePattern::new("base", "amd64", "latest", &rootfs(OutputCompression::Zstd));
        assert!(p.matches("hakim-base-trixie-amd64.tar.zst"));
        assert!(!p.matches("hakim-base-trixie-amd64.tar.xz"));
        assert!(!p.matches("hakim-base-trixie-arm64.tar.zst"));
        assert!(!p.matches("hakim-base-x-trixie-amd64.tar.zst"));
        assert!(!p.matches("hakim-base--amd64.tar.zst"));
        assert!(!p.matches("hakim-php-trixie-amd64.tar.zst"));
        let x = NamePattern::new(
            "base-x",
            "amd64",
            "latest",
            &rootfs(OutputCompression::Zstd),
        );
        assert!(x.matches("hakim-base-x-trixie-amd64.tar.zst"));
        let oci = Output {
            format: Format::OciArchive,
            compression: OutputCompression::Gzip,
        };
        let o = NamePattern::new("js", "amd64", "v2", &oci);
        assert!(o.matches("hakim-js_v2.tar"));
        assert!(!o.matches("hakim-js_latest.tar"));
    }

    #[test]
    fn parse_render_update() {
        let sha = "a".repeat(64);
        let text = format!(
            "hakim-php-trixie-amd64.tar.zst sha256:11 {sha}\ngarbage line\nx y z\n\
             hakim-base-bookworm-amd64.tar.zst sha256:22 {sha}\n"
        );
        let entries = parse(&text);
        assert_eq!(entries.len(), 2);
        assert_eq!(
            render(&entries),
            format!(
                "hakim-base-bookworm-amd64.tar.zst sha256:22 {sha}\n\
                 hakim-php-trixie-amd64.tar.zst sha256:11 {sha}\n"
            )
        );

        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(RECORD_FILE), &text).unwrap();
        // base moved to a new release: its old line goes, php's stays.
        let pattern = NamePattern::new("base", "amd64", "1", &rootfs(OutputCompression::Zstd));
        let new = Entry {
            artifact: "hakim-base-trixie-amd64.tar.zst".into(),
            digest: "sha256:33".into(),
            sha256: "b".repeat(64),
        };
        update(dir.path(), &new, &pattern).unwrap();
        let now = load(dir.path()).unwrap();
        assert_eq!(now.len(), 2);
        assert!(now.contains(&new));
        assert!(now
            .iter()
            .any(|e| e.artifact == "hakim-php-trixie-amd64.tar.zst"));
        assert!(load(&dir.path().join("missing")).unwrap().is_empty());
    }
}

//! Tar member names → normalised paths inside the image root.
//!
//! Layer tarballs are untrusted: names may be absolute, carry `..`, or repeat
//! separators. Everything downstream works on a [`RelPath`], a list of plain
//! components that can never leave the root.

use std::fmt;

/// Longest path a Linux system call accepts (`PATH_MAX` without its NUL): a
/// longer name could not be extracted.
pub const MAX_PATH_BYTES: usize = 4095;
/// Longest file name a Linux file system stores (`NAME_MAX`).
pub const MAX_NAME_BYTES: usize = 255;

/// A normalised path relative to the image root, stored joined (`a/b`, one
/// allocation). The empty path is the root itself.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct RelPath(Vec<u8>);

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("absolute path")]
    Absolute,
    #[error("path escapes the image root through '..'")]
    Escapes,
    #[error("path contains a NUL byte")]
    Nul,
    #[error("path longer than {MAX_PATH_BYTES} bytes")]
    TooLong,
    #[error("a path component longer than {MAX_NAME_BYTES} bytes")]
    NameTooLong,
}

impl RelPath {
    pub fn root() -> Self {
        RelPath(Vec::new())
    }

    /// Normalises a tar member name or hardlink target.
    ///
    /// `./a//b/` → `a/b`; `a/../b` → `b` (lexically, as Docker does); absolute names
    /// and anything that climbs above the root are refused rather than clamped, so a
    /// hostile layer is reported instead of silently rewritten. So are names no
    /// Linux file system can hold (over [`MAX_PATH_BYTES`], or a component over
    /// [`MAX_NAME_BYTES`]).
    pub fn parse(name: &[u8]) -> Result<Self, PathError> {
        if name.contains(&0) {
            return Err(PathError::Nul);
        }
        if name.first() == Some(&b'/') {
            return Err(PathError::Absolute);
        }
        let mut parts: Vec<&[u8]> = Vec::new();
        for part in name.split(|&b| b == b'/') {
            match part {
                b"" | b"." => {}
                b".." => {
                    if parts.pop().is_none() {
                        return Err(PathError::Escapes);
                    }
                }
                other if other.len() > MAX_NAME_BYTES => return Err(PathError::NameTooLong),
                other => parts.push(other),
            }
        }
        let joined = parts.join(&b'/');
        if joined.len() > MAX_PATH_BYTES {
            return Err(PathError::TooLong);
        }
        Ok(RelPath(joined))
    }

    /// Builds a path from components that are already clean (no `/`, `.`, `..`).
    pub fn from_components<T: AsRef<[u8]>>(parts: &[T]) -> Self {
        let mut p = RelPath::root();
        for part in parts {
            p.push(part.as_ref());
        }
        p
    }

    pub fn components(&self) -> Vec<&[u8]> {
        if self.0.is_empty() {
            Vec::new()
        } else {
            self.0.split(|&b| b == b'/').collect()
        }
    }

    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    pub fn parent(&self) -> Option<RelPath> {
        if self.0.is_empty() {
            return None;
        }
        let end = self.0.iter().rposition(|&b| b == b'/').unwrap_or(0);
        Some(RelPath(self.0[..end].to_vec()))
    }

    pub fn file_name(&self) -> Option<&[u8]> {
        if self.0.is_empty() {
            return None;
        }
        let start = self.0.iter().rposition(|&b| b == b'/').map_or(0, |i| i + 1);
        Some(&self.0[start..])
    }

    pub fn join(&self, name: &[u8]) -> RelPath {
        let mut p = self.clone();
        p.push(name);
        p
    }

    /// Appends one clean component.
    pub(crate) fn push(&mut self, name: &[u8]) {
        if !self.0.is_empty() {
            self.0.push(b'/');
        }
        self.0.extend_from_slice(name);
    }

    /// Byte length, for [`RelPath::truncate`] (cheap path walking).
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    pub(crate) fn truncate(&mut self, len: usize) {
        self.0.truncate(len);
    }

    /// `a/b` (no leading `./`), the form used in messages and lookups.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        self.0.clone()
    }
}

/// For messages: control characters and bytes that are not UTF-8 escaped,
/// long paths cut ([`crate::text::printable`]). The bytes are
/// [`RelPath::as_bytes`].
impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str(".");
        }
        f.write_str(&crate::text::printable(&self.0, crate::text::NAME_SHOWN))
    }
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RelPath({:?})", String::from_utf8_lossy(&self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(s: &str) -> Result<String, PathError> {
        RelPath::parse(s.as_bytes()).map(|p| match p.is_root() {
            true => ".".into(),
            false => String::from_utf8_lossy(p.as_bytes()).into_owned(),
        })
    }

    #[test]
    fn normalises_dots_and_slashes() {
        assert_eq!(norm("./a//b/").unwrap(), "a/b");
        assert_eq!(norm("a/./b").unwrap(), "a/b");
        assert_eq!(norm("a/../b").unwrap(), "b");
        assert_eq!(norm("./").unwrap(), ".");
        assert_eq!(norm("").unwrap(), ".");
    }

    #[test]
    fn shown_escaped_and_cut() {
        let p = RelPath::parse(b"a/\x1b[2Jb\xff").unwrap();
        assert_eq!(p.to_string(), "a/\\x1b[2Jb\\xff");
        let long = RelPath::parse("d/".repeat(2000).as_bytes()).unwrap();
        assert!(long.to_string().ends_with("… (3999 bytes)"), "{long}");
    }

    #[test]
    fn refuses_escapes() {
        assert_eq!(norm("/abs"), Err(PathError::Absolute));
        assert_eq!(norm("../x"), Err(PathError::Escapes));
        assert_eq!(norm("a/../../x"), Err(PathError::Escapes));
        assert_eq!(norm("./.."), Err(PathError::Escapes));
        assert_eq!(RelPath::parse(b"a\0b"), Err(PathError::Nul));
    }

    #[test]
    fn refuses_what_no_file_system_holds() {
        let name = "n".repeat(MAX_NAME_BYTES);
        // 16 full components and their 15 slashes make exactly 4095 bytes.
        let deep = vec![name.as_str(); 17].join("/");
        assert_eq!(norm(&deep[..MAX_PATH_BYTES]).unwrap().len(), MAX_PATH_BYTES);
        assert_eq!(norm(&deep[..MAX_PATH_BYTES + 2]), Err(PathError::TooLong));
        assert_eq!(norm(&format!("a/{name}n")), Err(PathError::NameTooLong));
        // Only what remains after normalising counts.
        assert!(norm(&format!("{deep}/{}", "../".repeat(16))).is_ok());
    }

    #[test]
    fn keeps_non_utf8_bytes() {
        let p = RelPath::parse(b"dir/\xff\xfe").unwrap();
        assert_eq!(p.to_bytes(), b"dir/\xff\xfe".to_vec());
    }

    #[test]
    fn parent_name_and_components() {
        let p = RelPath::parse(b"a/b/c").unwrap();
        assert_eq!(p.parent().unwrap().to_string(), "a/b");
        assert_eq!(p.file_name(), Some(&b"c"[..]));
        assert_eq!(p.components(), [&b"a"[..], b"b", b"c"]);
        let one = RelPath::parse(b"x").unwrap();
        assert!(one.parent().unwrap().is_root());
        assert_eq!(
            RelPath::from_components(&[b"x".to_vec(), b"y".to_vec()]).to_string(),
            "x/y"
        );
        assert!(RelPath::root().components().is_empty());
    }
}

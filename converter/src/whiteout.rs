//! OCI/AUFS whiteout naming rules, in one place and free of I/O.
//!
//! * `.wh.<name>` removes `<name>` from *lower* layers, wherever it sits in its own layer.
//! * `.wh..wh..opq` hides every lower child of its directory; same-layer entries stay.
//! * Any other `.wh..wh.*` name is AUFS bookkeeping (`.wh..wh.plnk`, `.wh..wh.aufs`, …):
//!   never part of the image, but its files may be hardlink targets.
//!
//! Whiteout markers never reach the output.

use crate::path::RelPath;

pub const WHITEOUT_PREFIX: &[u8] = b".wh.";
pub const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
const AUFS_META_PREFIX: &[u8] = b".wh..wh.";

/// What a normalised member name means for the merge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// An ordinary member at this path.
    Plain,
    /// Delete `dir/name` from lower layers.
    Whiteout { dir: RelPath, name: Vec<u8> },
    /// Hide all lower children of `dir`.
    Opaque { dir: RelPath },
    /// AUFS metadata (`.wh..wh.plnk/…` etc.): not part of the tree.
    AufsMeta,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WhiteoutError {
    #[error("whiteout marker names no file")]
    Empty,
    #[error("whiteout marker of '.' or '..'")]
    DotName,
    #[error("a whiteout marker is used as a directory")]
    MarkerAsDirectory,
}

/// Classifies a normalised path.
pub fn classify(path: &RelPath) -> Result<Role, WhiteoutError> {
    let parts = path.components();
    let Some((&last, dirs)) = parts.split_last() else {
        return Ok(Role::Plain);
    };
    for dir in dirs {
        if dir.starts_with(AUFS_META_PREFIX) {
            return Ok(Role::AufsMeta);
        }
        if dir.starts_with(WHITEOUT_PREFIX) {
            return Err(WhiteoutError::MarkerAsDirectory);
        }
    }
    let dir = RelPath::from_components(dirs);
    if last == OPAQUE_MARKER {
        return Ok(Role::Opaque { dir });
    }
    if last.starts_with(AUFS_META_PREFIX) {
        return Ok(Role::AufsMeta);
    }
    if let Some(name) = last.strip_prefix(WHITEOUT_PREFIX) {
        return match name {
            b"" => Err(WhiteoutError::Empty),
            b"." | b".." => Err(WhiteoutError::DotName),
            _ => Ok(Role::Whiteout {
                dir,
                name: name.to_vec(),
            }),
        };
    }
    Ok(Role::Plain)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn role(s: &str) -> Result<Role, WhiteoutError> {
        classify(&RelPath::parse(s.as_bytes()).unwrap())
    }

    #[test]
    fn recognises_markers() {
        assert_eq!(role("etc/passwd"), Ok(Role::Plain));
        assert_eq!(
            role("a/b/.wh.c"),
            Ok(Role::Whiteout {
                dir: RelPath::parse(b"a/b").unwrap(),
                name: b"c".to_vec()
            })
        );
        assert_eq!(
            role("a/.wh..wh..opq"),
            Ok(Role::Opaque {
                dir: RelPath::parse(b"a").unwrap()
            })
        );
        assert_eq!(role(".wh..wh.plnk"), Ok(Role::AufsMeta));
        assert_eq!(role(".wh..wh.plnk/123.456"), Ok(Role::AufsMeta));
        assert_eq!(role(".wh..wh.aufs"), Ok(Role::AufsMeta));
    }

    #[test]
    fn refuses_malformed_markers() {
        assert_eq!(role("a/.wh."), Err(WhiteoutError::Empty));
        assert_eq!(role("a/.wh.."), Err(WhiteoutError::DotName));
        assert_eq!(role(".wh.x/y"), Err(WhiteoutError::MarkerAsDirectory));
    }

    #[test]
    fn whiteout_prefix_inside_a_name_is_plain() {
        assert_eq!(role("a/x.wh.y"), Ok(Role::Plain));
    }
}

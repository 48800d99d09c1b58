//! The rules of a rootfs template, read as Proxmox's GNU tar reads it: the archive
//! decompresses and reads to its end, every member parses, the compression matches the
//! name, and the member rules of [`crate::acceptance`] (ids, `/sbin/init`, os-release…).

use std::fs::File;
use std::io::Read;
use std::path::Path;

use anyhow::Result;

use crate::acceptance::Status;
use crate::acceptance::{Member, MemberRules, Offenders, Stream};
use crate::layer::{self, Compression, MemberKind};

use super::checks::Checks;

pub(super) fn verify_rootfs(path: &Path, checks: &mut Checks) -> Result<()> {
    let file = File::open(path)?;
    let mut ignored = Vec::new();
    let mut unparsable = Offenders::default();
    let mut rules = MemberRules::new(Stream::Rootfs);
    let mut os_release: Option<(bool, Vec<u8>)> = None;
    let walked = layer::walk_tar(
        Box::new(file),
        None,
        &path.display().to_string(),
        &mut ignored,
        |ordinal, entry, raw| {
            let member = match layer::parse_member(entry, raw) {
                Ok(m) => m,
                Err(e) => {
                    unparsable.add(|| format!("#{ordinal}: {e:#}"));
                    return Ok(());
                }
            };
            if let MemberKind::File { size, .. } = member.kind {
                // /etc/os-release wins over /usr/lib/os-release, as in Proxmox.
                let name = member.path.to_bytes();
                let etc = name == b"etc/os-release";
                if (etc || name == b"usr/lib/os-release")
                    && size <= 64 << 10
                    && !os_release.as_ref().is_some_and(|(was_etc, _)| *was_etc)
                {
                    let mut text = Vec::new();
                    entry.read_to_end(&mut text)?;
                    os_release = Some((etc, text));
                }
            }
            rules.observe(Member::from_parsed(&member));
            Ok(())
        },
    );
    let walked = match walked {
        Ok(w) => w,
        Err(e) => {
            checks.fail(
                "the archive decompresses and reads to its end",
                format!("{e:#}"),
            );
            return Ok(());
        }
    };
    checks.pass(
        "the archive decompresses and reads to its end",
        format!(
            "{:?}, {} members, {} bytes of tar",
            walked.compression, walked.members, walked.uncompressed_bytes
        ),
    );
    if walked.compression == Compression::Plain && path.extension().is_some_and(|e| e != "tar") {
        checks.warn(
            "the compression matches the file name",
            "uncompressed tar under a compressed name",
        );
    }
    checks.rule("every member parses", &unparsable, Status::Fail);
    checks
        .0
        .extend(rules.finish(os_release.as_ref().map(|(_, t)| &t[..])));
    Ok(())
}

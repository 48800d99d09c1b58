//! Injecting hakim-init: the converter's own top layer, built in memory after
//! pass 1 from what the merged tree holds, then indexed like any other layer.
//!
//! It adds `/usr/local/sbin/hakim-init`, the service files, and the source
//! image's config as `/etc/hakim/image.env` (the defaults hakim-init reads) and
//! `/etc/hakim/image.json`; it points `/sbin/init` at the init (rootfs
//! templates boot `/sbin/init`), empties `/etc/machine-id`, makes
//! `/etc/resolv.conf` a regular file (Proxmox writes it on every start) and
//! whites out SSH host keys, which would otherwise be shared by every
//! workspace made from the artifact.
//!
//! Going through a layer rather than editing the tree keeps one code path for
//! whiteouts, symlinked parents (`/sbin` → `/usr/sbin` on merged-/usr systems)
//! and output ordering.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::path::RelPath;
use crate::source::ResolvedImage;
use crate::tarout::{OutEntry, OutKind, TarWriter};
use crate::text::{printable, NAME_SHOWN};
use crate::tree::{Kind, Tree};

/// Where the init lands in every artifact (defined with the rules that expect it there).
pub use crate::acceptance::INIT_PATH;
pub const SERVICES_DIR: &str = "etc/hakim/services";
pub const IMAGE_ENV: &str = "etc/hakim/image.env";
pub const IMAGE_JSON: &str = "etc/hakim/image.json";
/// Refuse absurd inputs early: a static init is ~2 MiB, a service file a few lines.
const MAX_INIT_BYTES: u64 = 64 << 20;
const MAX_SERVICE_BYTES: u64 = 1 << 20;

#[derive(Debug, Clone)]
pub struct InjectOptions {
    /// The static hakim-init binary to add.
    pub init_binary: PathBuf,
    /// `*.toml` service files copied to `/etc/hakim/services/`.
    pub services_dir: Option<PathBuf>,
    /// Keep `/etc/ssh/ssh_host_*` (default: whited out).
    pub keep_ssh_host_keys: bool,
}

/// The injected layer (an uncompressed tar) and what building it noticed.
pub struct Injection {
    pub layer_tar: Vec<u8>,
    pub warnings: Vec<String>,
    /// Files added, by absolute path (for the summary).
    pub added: Vec<String>,
}

/// ELF `e_machine` for an OCI architecture name.
fn elf_machine(architecture: &str) -> Option<u16> {
    Some(match architecture {
        "amd64" => 62,
        "arm64" => 183,
        "arm" => 40,
        "386" => 3,
        "riscv64" => 243,
        "ppc64le" => 21,
        "s390x" => 22,
        _ => return None,
    })
}

/// Checks that `bytes` is an ELF executable for `architecture`; returns a warning
/// when it is dynamically linked (it would depend on the image's libc).
pub fn check_init_binary(bytes: &[u8], architecture: &str, shown: &Path) -> Result<Option<String>> {
    let name = shown.display();
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" {
        bail!("--inject-init {name}: not an ELF executable");
    }
    let little = match bytes[5] {
        1 => true,
        2 => false,
        _ => bail!("--inject-init {name}: unknown ELF byte order"),
    };
    let u16_at = |o: usize| {
        let b = [bytes[o], bytes[o + 1]];
        if little {
            u16::from_le_bytes(b)
        } else {
            u16::from_be_bytes(b)
        }
    };
    let machine = u16_at(18);
    if let Some(want) = elf_machine(architecture) {
        if machine != want {
            bail!(
                "--inject-init {name}: built for ELF machine {machine}, but the image is {architecture} (machine {want})"
            );
        }
    }
    // Program headers: a PT_INTERP entry means a dynamic loader is needed.
    let is64 = bytes[4] == 2;
    let (phoff, phentsize, phnum) = if is64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[32..40]);
        let off = if little {
            u64::from_le_bytes(b)
        } else {
            u64::from_be_bytes(b)
        };
        (off, u16_at(54), u16_at(56))
    } else {
        let mut b = [0u8; 4];
        b.copy_from_slice(&bytes[28..32]);
        let off = if little {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        };
        (u64::from(off), u16_at(42), u16_at(44))
    };
    for i in 0..u64::from(phnum) {
        let at = phoff.saturating_add(i * u64::from(phentsize)) as usize;
        if at.saturating_add(4) > bytes.len() {
            bail!("--inject-init {name}: truncated ELF program headers");
        }
        let mut b = [0u8; 4];
        b.copy_from_slice(&bytes[at..at + 4]);
        let p_type = if little {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        };
        if p_type == 3 {
            return Ok(Some(format!(
                "--inject-init {name} is dynamically linked: it will only start if the image has a matching libc (build it static: ci/build-init.sh)"
            )));
        }
    }
    Ok(None)
}

/// `KEY=VALUE` lines for `/etc/hakim/image.env` from the config's `Env`.
/// Entries hakim-init could not read back (a newline in the value, an invalid
/// name) are left out with a warning.
pub fn image_env(env: &[String], warnings: &mut Vec<String>) -> String {
    let mut out = String::from(
        "# The source image's Env, written by hakim-convert. hakim-init uses these as\n\
         # defaults; the container's own environment overrides them.\n",
    );
    for entry in env {
        let (key, value) = entry.split_once('=').unwrap_or((entry.as_str(), ""));
        let valid_name = key
            .chars()
            .next()
            .is_some_and(|c| c == '_' || c.is_ascii_alphabetic())
            && key.chars().all(|c| c == '_' || c.is_ascii_alphanumeric());
        if !valid_name || value.contains('\n') {
            warnings.push(format!(
                "image Env entry '{}' cannot be written to /etc/hakim/image.env; left out",
                key.escape_debug()
            ));
            continue;
        }
        out.push_str(key);
        out.push('=');
        out.push_str(value);
        out.push('\n');
    }
    out
}

/// A reference fit to be stored inside an artifact: registry references as
/// given, local transports reduced to their file name (a machine path would
/// make the artifact depend on where it was built).
pub fn portable_reference(reference: &str) -> String {
    for transport in ["oci:", "oci-archive:", "docker-archive:"] {
        if let Some(rest) = reference.strip_prefix(transport) {
            let last = rest.rsplit('/').next().unwrap_or(rest);
            return format!("{transport}{last}");
        }
    }
    reference.to_string()
}

/// `/etc/hakim/image.json`: where the image came from and the config fields
/// the artifact no longer carries (rootfs templates have no config at all).
pub fn image_json(image: &ResolvedImage) -> Result<Vec<u8>> {
    let config: serde_json::Value =
        serde_json::from_slice(&image.config_json).context("image config is not JSON")?;
    let inner = config.get("config").cloned().unwrap_or_default();
    let pick = |k: &str| inner.get(k).cloned().unwrap_or(serde_json::Value::Null);
    let doc = serde_json::json!({
        "source": {
            "reference": portable_reference(&image.reference),
            "repository": image.repository,
            "tag": image.tag,
            "manifest_digest": image.manifest_digest.as_ref().map(|d| d.to_string()),
            "config_digest": image.config_digest.as_ref().map(|d| d.to_string()),
            "platform": image.platform.to_string(),
        },
        "config": {
            "Env": pick("Env"),
            "WorkingDir": pick("WorkingDir"),
            "Entrypoint": pick("Entrypoint"),
            "Cmd": pick("Cmd"),
            "User": pick("User"),
            "StopSignal": pick("StopSignal"),
            "Labels": pick("Labels"),
        },
    });
    let mut bytes = serde_json::to_vec_pretty(&doc)?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// Service files to copy: `*.toml` regular files, sorted by name.
fn service_files(dir: &Path, warnings: &mut Vec<String>) -> Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    let entries =
        fs::read_dir(dir).with_context(|| format!("--services {}: cannot read", dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("--services {}", dir.display()))?;
        let name = entry.file_name();
        let Some(name) = name.to_str().map(str::to_string) else {
            warnings.push(format!(
                "--services: skipped a file whose name is not UTF-8 in {}",
                dir.display()
            ));
            continue;
        };
        let path = entry.path();
        let meta =
            fs::metadata(&path).with_context(|| format!("cannot stat {}", path.display()))?;
        if !name.ends_with(".toml") || !meta.is_file() || name.starts_with('.') {
            warnings.push(format!(
                "--services: skipped {name} (only *.toml files are services)"
            ));
            continue;
        }
        if meta.len() > MAX_SERVICE_BYTES {
            bail!("--services: {} is over 1 MiB", path.display());
        }
        let text = fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        if std::str::from_utf8(&text).is_err() {
            bail!("--services: {} is not UTF-8 text", path.display());
        }
        out.push((name, text));
    }
    out.sort();
    if out.is_empty() {
        warnings.push(format!("--services {}: no *.toml files", dir.display()));
    }
    Ok(out)
}

fn rel(path: &str) -> RelPath {
    RelPath::parse(path.as_bytes()).expect("constant paths are valid")
}

/// Builds the injected layer for `image` on top of `tree` (the merged result of
/// the image's own layers). `mtime` stamps every added member.
pub fn build_layer(
    tree: &mut Tree,
    image: &ResolvedImage,
    opts: &InjectOptions,
    mtime: u64,
) -> Result<Injection> {
    let mut warnings = Vec::new();
    let mut added = Vec::new();
    let meta = fs::metadata(&opts.init_binary)
        .with_context(|| format!("--inject-init {}", opts.init_binary.display()))?;
    if !meta.is_file() || meta.len() > MAX_INIT_BYTES {
        bail!(
            "--inject-init {}: not a regular file of at most 64 MiB",
            opts.init_binary.display()
        );
    }
    let init = fs::read(&opts.init_binary)
        .with_context(|| format!("cannot read {}", opts.init_binary.display()))?;
    if let Some(w) = check_init_binary(&init, &image.platform.architecture, &opts.init_binary)? {
        warnings.push(w);
    }
    let services = match &opts.services_dir {
        Some(dir) => service_files(dir, &mut warnings)?,
        None => Vec::new(),
    };
    let env: Vec<String> = image
        .config
        .config()
        .as_ref()
        .and_then(|c| c.env().clone())
        .unwrap_or_default();
    let env_file = image_env(&env, &mut warnings);
    let json_file = image_json(image)?;

    let mut layer = TarWriter::new(Vec::new());
    // Names are bytes: an image's own names (its SSH host keys) need not be UTF-8.
    let mut put = |name: &[u8], kind: OutKind, mode: u32, link: Option<&str>, data: &[u8]| {
        layer
            .append(&OutEntry {
                name,
                kind,
                mode,
                uid: 0,
                gid: 0,
                mtime,
                size: if kind == OutKind::File {
                    data.len() as u64
                } else {
                    0
                },
                link: link.map(str::as_bytes),
                xattrs: &[],
            })
            .and_then(|()| {
                if kind == OutKind::File {
                    layer.append_data(&mut &data[..], data.len() as u64, &mut |_| Ok(()))
                } else {
                    Ok(())
                }
            })
            .expect("writing to memory");
    };

    // Whiteouts first: they act on the layers below whatever their position,
    // but reading them first is what a human expects too.
    if !opts.keep_ssh_host_keys {
        if let Some(dir) = tree.resolve(&rel("etc/ssh"))? {
            let keys: Vec<Vec<u8>> = tree
                .children(dir)
                .filter(|(name, _)| name.starts_with(b"ssh_host_"))
                .map(|(name, _)| name.to_vec())
                .collect();
            for key in keys {
                put(
                    &[&b"etc/ssh/.wh."[..], &key].concat(),
                    OutKind::File,
                    0o644,
                    None,
                    b"",
                );
                added.push(format!("-/etc/ssh/{}", printable(&key, NAME_SHOWN)));
            }
        }
    }
    // Directories the image lacks get explicit members (stamped like the rest)
    // rather than implicit ones.
    let mut wanted = vec![
        "usr/local/sbin".to_string(),
        "sbin".to_string(),
        "etc/hakim".to_string(),
    ];
    if !services.is_empty() {
        wanted.push(SERVICES_DIR.into());
    }
    let mut made = std::collections::BTreeSet::new();
    for dir in wanted {
        let mut at = String::new();
        for part in dir.split('/') {
            if !at.is_empty() {
                at.push('/');
            }
            at.push_str(part);
            if !made.contains(&at) && tree.resolve(&rel(&at))?.is_none() {
                put(format!("{at}/").as_bytes(), OutKind::Dir, 0o755, None, b"");
                made.insert(at.clone());
            }
        }
    }
    let init_rel = INIT_PATH.trim_start_matches('/');
    put(init_rel.as_bytes(), OutKind::File, 0o755, None, &init);
    added.push(INIT_PATH.into());
    // Rootfs templates start /sbin/init; OCI images start the Entrypoint, but a
    // /sbin/init that reaches systemd would still be a trap for anyone booting
    // the image another way.
    put(b"sbin/init", OutKind::Symlink, 0o777, Some(INIT_PATH), b"");
    added.push("/sbin/init".into());
    for (name, text) in &services {
        put(
            format!("{SERVICES_DIR}/{name}").as_bytes(),
            OutKind::File,
            0o644,
            None,
            text,
        );
        added.push(format!("/{SERVICES_DIR}/{name}"));
    }
    put(
        IMAGE_ENV.as_bytes(),
        OutKind::File,
        0o644,
        None,
        env_file.as_bytes(),
    );
    put(
        IMAGE_JSON.as_bytes(),
        OutKind::File,
        0o644,
        None,
        &json_file,
    );
    added.push(format!("/{IMAGE_ENV}"));
    added.push(format!("/{IMAGE_JSON}"));
    // An empty machine-id: hakim-init generates one per container at boot.
    put(b"etc/machine-id", OutKind::File, 0o444, None, b"");
    added.push("/etc/machine-id".into());
    let resolv = tree.lookup(&rel("etc/resolv.conf"))?;
    let resolv_is_file =
        resolv.is_some_and(|n| matches!(tree.inode(tree.node_inode(n)).kind, Kind::File { .. }));
    if !resolv_is_file {
        put(b"etc/resolv.conf", OutKind::File, 0o644, None, b"");
        added.push("/etc/resolv.conf".into());
    }
    let layer_tar = layer.finish().expect("writing to memory");
    Ok(Injection {
        layer_tar,
        warnings,
        added,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn elf(machine: u16, interp: bool) -> Vec<u8> {
        let mut b = vec![0u8; 64 + 56];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2; // 64-bit
        b[5] = 1; // little endian
        b[18..20].copy_from_slice(&machine.to_le_bytes());
        b[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
        b[54..56].copy_from_slice(&56u16.to_le_bytes()); // phentsize
        b[56..58].copy_from_slice(&1u16.to_le_bytes()); // phnum
        let p_type: u32 = if interp { 3 } else { 1 };
        b[64..68].copy_from_slice(&p_type.to_le_bytes());
        b
    }

    #[test]
    fn init_binary_must_match_the_image() {
        let p = Path::new("init");
        assert!(check_init_binary(&elf(62, false), "amd64", p)
            .unwrap()
            .is_none());
        let err = check_init_binary(&elf(183, false), "amd64", p).unwrap_err();
        assert!(err.to_string().contains("ELF machine 183"), "{err}");
        assert!(check_init_binary(b"#!/bin/sh\necho hi\n", "amd64", p).is_err());
        let warn = check_init_binary(&elf(62, true), "amd64", p).unwrap();
        assert!(warn.unwrap().contains("dynamically linked"));
        // A truncated header table is refused, not read out of bounds.
        let mut short = elf(62, false);
        short.truncate(66);
        short.resize(64, 0);
        short[..4].copy_from_slice(b"\x7fELF");
        short[4] = 2;
        short[5] = 1;
        short[18..20].copy_from_slice(&62u16.to_le_bytes());
        short[32..40].copy_from_slice(&4096u64.to_le_bytes());
        short[56..58].copy_from_slice(&1u16.to_le_bytes());
        assert!(check_init_binary(&short, "amd64", p).is_err());
    }

    #[test]
    fn env_file_keeps_what_init_can_read_back() {
        let mut w = Vec::new();
        let text = image_env(
            &[
                "PATH=/usr/bin:/bin".into(),
                "EMPTY=".into(),
                "EQ=a=b".into(),
                "BAD NAME=x".into(),
                "MULTI=a\nb".into(),
            ],
            &mut w,
        );
        let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(lines, ["PATH=/usr/bin:/bin", "EMPTY=", "EQ=a=b"]);
        assert_eq!(w.len(), 2);
    }

    #[test]
    fn local_paths_do_not_leak_into_artifacts() {
        assert_eq!(
            portable_reference("oci:/home/me/build/layout:latest"),
            "oci:layout:latest"
        );
        assert_eq!(
            portable_reference("oci-archive:/tmp/x/img.tar"),
            "oci-archive:img.tar"
        );
        assert_eq!(
            portable_reference("ghcr.io/shekohex/hakim-base:latest"),
            "ghcr.io/shekohex/hakim-base:latest"
        );
    }
}

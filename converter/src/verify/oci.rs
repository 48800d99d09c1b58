//! The rules of an OCI archive, read as `proxmox-oci` reads it: member names, the
//! index's shape, media types, config fields, and every digest, size and diff_id.

use std::fs::File;
use std::io;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::Value;

use crate::acceptance::Status;
use crate::acceptance::{config_checks, Member, MemberRules, Offenders, Stream};
use crate::digest::Digest;
use crate::layer::{self, Compression};
use crate::ociout::{CONFIG_TYPE, INDEX_TYPE, LAYER_GZIP, LAYER_ZSTD, MANIFEST_TYPE};
use crate::source::tar_index::TarIndex;

use super::checks::{lossy, Checks};

const LAYER_PLAIN: &str = "application/vnd.oci.image.layer.v1.tar";
/// Largest JSON document (index, manifest, config) read into memory.
const MAX_JSON: u64 = 4 << 20;

pub(super) fn verify_oci(path: &Path, checks: &mut Checks) -> Result<()> {
    const NAMES: &str = "members are oci-layout, index.json and blobs/sha256/<hex> (no ./ prefix)";
    // Names exactly as stored (TarIndex normalises them).
    const READS: &str = "the archive reads to its end";
    let mut names = Vec::new();
    {
        let file = File::open(path)?;
        let mut archive = tar::Archive::new(io::BufReader::new(file));
        for entry in archive.entries()? {
            match entry {
                Ok(entry) => {
                    names.push((entry.path_bytes().into_owned(), entry.header().entry_type()))
                }
                Err(e) => {
                    checks.fail(
                        READS,
                        format!("truncated or corrupt after {} members: {e}", names.len()),
                    );
                    return Ok(());
                }
            }
        }
    }
    checks.pass(READS, format!("{} members", names.len()));
    let mut bad_names = Offenders::default();
    for (name, ty) in &names {
        let ok = match &name[..] {
            b"oci-layout" | b"index.json" => ty.is_file(),
            b"blobs/" | b"blobs/sha256/" => ty.is_dir(),
            n => {
                ty.is_file()
                    && n.strip_prefix(b"blobs/sha256/").is_some_and(|h| {
                        h.len() == 64 && h.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
                    })
            }
        };
        if !ok {
            bad_names.add(|| lossy(name));
        }
    }
    checks.rule(NAMES, &bad_names, Status::Fail);
    let has = |n: &[u8]| names.iter().any(|(m, _)| m == n);
    if !has(b"oci-layout") || !has(b"index.json") {
        checks.fail(
            "oci-layout and index.json are present",
            "PVE treats the .tar as a rootfs template without them",
        );
        return Ok(());
    }
    checks.pass("oci-layout and index.json are present", "");
    let index = TarIndex::scan(path)?;
    let layout: Value = match json_member(&index, "oci-layout") {
        Ok(v) => v,
        Err(e) => {
            checks.fail("oci-layout is valid", format!("{e:#}"));
            return Ok(());
        }
    };
    if layout.get("imageLayoutVersion").and_then(Value::as_str) == Some("1.0.0") {
        checks.pass("oci-layout is valid", "");
    } else {
        checks.fail("oci-layout is valid", "imageLayoutVersion is not 1.0.0");
    }

    const INDEX: &str = "index.json holds exactly one OCI image manifest";
    let idx: Value = match json_member(&index, "index.json") {
        Ok(v) => v,
        Err(e) => {
            checks.fail(INDEX, format!("{e:#}"));
            return Ok(());
        }
    };
    let manifests = idx
        .get("manifests")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let schema_ok = idx.get("schemaVersion").and_then(Value::as_u64) == Some(2);
    let mt_ok = idx
        .get("mediaType")
        .and_then(Value::as_str)
        .is_none_or(|m| m == INDEX_TYPE);
    let desc = match manifests.as_slice() {
        [d] if schema_ok
            && mt_ok
            && d.get("mediaType").and_then(Value::as_str) == Some(MANIFEST_TYPE) =>
        {
            checks.pass(INDEX, "");
            d.clone()
        }
        _ => {
            checks.fail(
                INDEX,
                format!(
                    "{} manifest descriptor(s), schemaVersion 2: {schema_ok}, media types: {}",
                    manifests.len(),
                    manifests
                        .iter()
                        .map(|d| d.get("mediaType").and_then(Value::as_str).unwrap_or("none"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
            match manifests.first() {
                Some(d) => d.clone(),
                None => return Ok(()),
            }
        }
    };

    let Some(manifest_bytes) = blob(&index, &desc, "manifest", checks)? else {
        return Ok(());
    };
    let manifest: Value = match serde_json::from_slice(&manifest_bytes) {
        Ok(v) => v,
        Err(e) => {
            checks.fail("the manifest is JSON", e.to_string());
            return Ok(());
        }
    };
    const MT: &str = "OCI media types only (manifest, config, layers)";
    let mut bad_types = Offenders::default();
    if manifest.get("mediaType").and_then(Value::as_str) != Some(MANIFEST_TYPE) {
        bad_types.add(|| "manifest mediaType".into());
    }
    let config_desc = manifest.get("config").cloned().unwrap_or_default();
    if config_desc.get("mediaType").and_then(Value::as_str) != Some(CONFIG_TYPE) {
        bad_types.add(|| {
            format!(
                "config {}",
                config_desc
                    .get("mediaType")
                    .and_then(Value::as_str)
                    .unwrap_or("none")
            )
        });
    }
    let layers = manifest
        .get("layers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for l in &layers {
        let mt = l.get("mediaType").and_then(Value::as_str).unwrap_or("none");
        if ![LAYER_GZIP, LAYER_ZSTD, LAYER_PLAIN].contains(&mt) {
            bad_types.add(|| format!("layer {mt}"));
        }
    }
    checks.rule(MT, &bad_types, Status::Fail);

    let Some(config_bytes) = blob(&index, &config_desc, "config", checks)? else {
        return Ok(());
    };
    const CFG: &str = "config has architecture, os, rootfs.diff_ids and history";
    let config: Value = match serde_json::from_slice(&config_bytes) {
        Ok(v) => v,
        Err(e) => {
            checks.fail(CFG, format!("not JSON: {e}"));
            return Ok(());
        }
    };
    let diff_ids: Vec<String> = config
        .pointer("/rootfs/diff_ids")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    let mut missing = Vec::new();
    for (key, ok) in [
        (
            "architecture",
            config.get("architecture").is_some_and(Value::is_string),
        ),
        ("os", config.get("os").is_some_and(Value::is_string)),
        (
            "rootfs.diff_ids",
            config
                .pointer("/rootfs/diff_ids")
                .is_some_and(Value::is_array),
        ),
        (
            "history",
            config.get("history").is_some_and(Value::is_array),
        ),
    ] {
        if !ok {
            missing.push(key);
        }
    }
    if missing.is_empty() {
        checks.pass(CFG, "");
    } else {
        checks.fail(CFG, format!("missing: {}", missing.join(", ")));
    }
    if diff_ids.len() == layers.len() {
        checks.pass(
            "one diff_id per layer",
            format!("{} layer(s)", layers.len()),
        );
    } else {
        checks.fail(
            "one diff_id per layer",
            format!("{} diff_ids for {} layers", diff_ids.len(), layers.len()),
        );
    }
    checks.0.extend(config_checks(&config));

    for (i, l) in layers.iter().enumerate() {
        check_layer(&index, i, l, diff_ids.get(i).map(String::as_str), checks)?;
    }
    Ok(())
}

fn json_member(index: &TarIndex, name: &str) -> Result<Value> {
    let bytes = index.read(name, MAX_JSON)?;
    serde_json::from_slice(&bytes).with_context(|| format!("{name} is not JSON"))
}

/// Reads a small blob named by a descriptor, checking presence, size and digest.
fn blob(
    index: &TarIndex,
    desc: &Value,
    what: &str,
    checks: &mut Checks,
) -> Result<Option<Vec<u8>>> {
    let rule = format!("the {what} blob is present and matches its descriptor");
    let Some(digest) = desc
        .get("digest")
        .and_then(Value::as_str)
        .and_then(|d| d.parse::<Digest>().ok())
    else {
        checks.fail(&rule, "no valid sha256 digest in the descriptor");
        return Ok(None);
    };
    let name = format!("blobs/sha256/{}", digest.hex());
    if !index.contains(&name) {
        checks.fail(&rule, format!("{name} is missing"));
        return Ok(None);
    }
    let bytes = match index.read(&name, MAX_JSON) {
        Ok(b) => b,
        Err(e) => {
            checks.fail(&rule, format!("{e:#}"));
            return Ok(None);
        }
    };
    let size = desc.get("size").and_then(Value::as_u64);
    if Digest::of_bytes(&bytes) != digest {
        checks.fail(&rule, format!("{name} does not hash to its name"));
    } else if size != Some(bytes.len() as u64) {
        checks.fail(
            &rule,
            format!("descriptor size {size:?}, blob {} bytes", bytes.len()),
        );
    } else {
        checks.pass(&rule, digest.to_string());
    }
    Ok(Some(bytes))
}

fn check_layer(
    index: &TarIndex,
    i: usize,
    desc: &Value,
    diff_id: Option<&str>,
    checks: &mut Checks,
) -> Result<()> {
    let rule = format!("layer {}: digest, size and diff_id match its bytes", i + 1);
    let Some(digest) = desc
        .get("digest")
        .and_then(Value::as_str)
        .and_then(|d| d.parse::<Digest>().ok())
    else {
        checks.fail(&rule, "no valid sha256 digest");
        return Ok(());
    };
    let name = format!("blobs/sha256/{}", digest.hex());
    if !index.contains(&name) {
        checks.fail(&rule, format!("{name} is missing"));
        return Ok(());
    }
    let size = desc.get("size").and_then(Value::as_u64);
    let mut ignored = Vec::new();
    let mut escapes = Offenders::default();
    let mut rules = MemberRules::new(Stream::OciLayer(i + 1));
    let walked = layer::walk_tar(
        index.open(&name)?,
        None,
        &format!("layer {}", i + 1),
        &mut ignored,
        |ordinal, entry, raw| {
            match layer::parse_member(entry, raw) {
                Ok(m) => rules.observe(Member::from_parsed(&m)),
                Err(e) => escapes.add(|| format!("#{ordinal}: {e:#}")),
            }
            Ok(())
        },
    );
    match walked {
        Err(e) => checks.fail(&rule, format!("{e:#}")),
        Ok(w) => {
            let mut problems = Vec::new();
            if w.blob_digest != digest {
                problems.push(format!("blob hashes to {}", w.blob_digest));
            }
            if Some(w.compressed_bytes) != size {
                problems.push(format!(
                    "descriptor size {size:?}, blob {} bytes",
                    w.compressed_bytes
                ));
            }
            if diff_id != Some(w.diff_id.to_string().as_str()) {
                problems.push(format!(
                    "config diff_id {diff_id:?}, uncompressed layer hashes to {}",
                    w.diff_id
                ));
            }
            let mt = desc.get("mediaType").and_then(Value::as_str).unwrap_or("");
            let claimed = Compression::from_media_type(mt);
            if claimed.is_some_and(|c| c != w.compression) {
                problems.push(format!(
                    "media type {mt} but the bytes are {:?}",
                    w.compression
                ));
            }
            if problems.is_empty() {
                checks.pass(&rule, format!("{:?}, {} members", w.compression, w.members));
            } else {
                checks.fail(&rule, problems.join("; "));
            }
            if w.compression == Compression::Gzip {
                let single = layer::gzip_is_single_member(index.open(&name)?)?;
                let r = format!("layer {}: gzip is a single member", i + 1);
                if single {
                    checks.pass(&r, "");
                } else {
                    checks.fail(&r, "Proxmox reads only the first gzip member");
                }
            }
        }
    }
    checks.rule(
        &format!(
            "layer {}: every member parses and stays inside the root",
            i + 1
        ),
        &escapes,
        Status::Fail,
    );
    checks.0.extend(rules.finish(None));
    Ok(())
}

//! `hakim-convert verify`: checks an artifact against every rule Proxmox's
//! importers are known to apply (CONTEXT §4), so a broken template is caught
//! here rather than by `pct create`.
//!
//! Rootfs templates are read as GNU tar with Proxmox's flags would read them;
//! OCI archives as `proxmox-oci` reads them: member names, index shape, media
//! types, config fields, every digest, size and diff_id.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::Value;

use crate::digest::Digest;
use crate::layer::{self, Compression, MemberKind};
use crate::ociout::{CONFIG_TYPE, INDEX_TYPE, LAYER_GZIP, LAYER_ZSTD, MANIFEST_TYPE};
use crate::output;
use crate::path::RelPath;
use crate::source::tar_index::TarIndex;
use crate::whiteout::Role;

/// `ID`s Proxmox's container setup recognises; anything else needs `ostype: unmanaged`.
pub const PVE_KNOWN_OS_IDS: &[&str] = &[
    "debian",
    "devuan",
    "ubuntu",
    "centos",
    "fedora",
    "opensuse",
    "opensuse-leap",
    "opensuse-tumbleweed",
    "archlinux",
    "arch",
    "alpine",
    "gentoo",
    "nixos",
    "almalinux",
    "rocky",
    "rhel",
];

const LAYER_PLAIN: &str = "application/vnd.oci.image.layer.v1.tar";
/// Largest JSON document (index, manifest, config) read into memory.
const MAX_JSON: u64 = 4 << 20;
/// Examples kept per failed rule.
const EXAMPLES: usize = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Warn,
    Fail,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    pub rule: String,
    pub status: Status,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

#[derive(Debug, serde::Serialize)]
pub struct Report {
    pub artifact: String,
    /// `rootfs` or `oci-archive`.
    pub kind: &'static str,
    pub checks: Vec<Check>,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.status != Status::Fail)
    }
    pub fn failures(&self) -> impl Iterator<Item = &Check> {
        self.checks.iter().filter(|c| c.status == Status::Fail)
    }
}

/// Collects checks; a rule with offending examples fails (or warns).
#[derive(Default)]
struct Checks(Vec<Check>);

impl Checks {
    fn add(&mut self, rule: &str, status: Status, detail: impl Into<String>) {
        self.0.push(Check {
            rule: rule.into(),
            status,
            detail: detail.into(),
        });
    }
    fn pass(&mut self, rule: &str, detail: impl Into<String>) {
        self.add(rule, Status::Pass, detail);
    }
    fn fail(&mut self, rule: &str, detail: impl Into<String>) {
        self.add(rule, Status::Fail, detail);
    }
    fn warn(&mut self, rule: &str, detail: impl Into<String>) {
        self.add(rule, Status::Warn, detail);
    }
    /// Pass when `bad` is empty, else `status` listing a few examples.
    fn rule(&mut self, rule: &str, bad: &Offenders, status: Status) {
        if bad.count == 0 {
            self.pass(rule, "");
        } else {
            let more = if bad.count > bad.examples.len() {
                format!(" (+{} more)", bad.count - bad.examples.len())
            } else {
                String::new()
            };
            self.add(rule, status, format!("{}{more}", bad.examples.join(", ")));
        }
    }
}

#[derive(Default)]
struct Offenders {
    count: usize,
    examples: Vec<String>,
}

impl Offenders {
    fn add(&mut self, what: impl FnOnce() -> String) {
        self.count += 1;
        if self.examples.len() < EXAMPLES {
            self.examples.push(what());
        }
    }
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Verifies `path`, telling the kind from its content.
pub fn verify(path: &Path) -> Result<Report> {
    let mut file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut head = [0u8; 512];
    let n = read_up_to(&mut file, &mut head)?;
    let compression = Compression::sniff(&head[..n]);
    let is_oci = compression == Compression::Plain && n == 512 && {
        // An OCI archive's members have no `./` prefix and include `oci-layout`
        // or `index.json` or `blobs/`; the first header tells which kind this is.
        let name = &head[..100];
        let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(100)];
        // A `./`-prefixed OCI archive is still reported as one (and fails the
        // member-name rule) rather than as a broken rootfs.
        let name = name.strip_prefix(b"./").unwrap_or(name);
        name == b"oci-layout" || name == b"index.json" || name.starts_with(b"blobs/")
    };
    let mut checks = Checks::default();
    let kind = if is_oci {
        verify_oci(path, &mut checks)?;
        "oci-archive"
    } else {
        verify_rootfs(path, &mut checks)?;
        "rootfs"
    };
    check_sums(path, &mut checks)?;
    Ok(Report {
        artifact: path.display().to_string(),
        kind,
        checks: checks.0,
    })
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// `sha256sums.txt` next to the artifact must list it with the right hash.
fn check_sums(path: &Path, checks: &mut Checks) -> Result<()> {
    const RULE: &str = "sha256sums.txt lists the artifact with its hash";
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let sums = path
        .parent()
        .unwrap_or(Path::new("."))
        .join("sha256sums.txt");
    let text = match std::fs::read_to_string(&sums) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            checks.warn(RULE, "no sha256sums.txt next to the artifact");
            return Ok(());
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", sums.display())),
    };
    let listed: Vec<&str> = text
        .lines()
        .filter_map(|l| {
            let (hash, file) = l.split_once(char::is_whitespace)?;
            (file.trim_start().trim_start_matches('*') == name).then_some(hash)
        })
        .collect();
    let file = File::open(path)?;
    let (actual, _) = output::hash_file(&file)?;
    match listed.as_slice() {
        [] => checks.fail(RULE, format!("{name} is not listed")),
        [hash] if *hash == actual => checks.pass(RULE, ""),
        [hash] => checks.fail(
            RULE,
            format!("listed as {hash}, but the file hashes to {actual}"),
        ),
        _ => checks.fail(RULE, format!("{name} is listed more than once")),
    }
    Ok(())
}

/// What a rootfs member became, for resolving `/sbin/init` afterwards.
enum Node {
    Dir,
    File { executable: bool },
    Symlink(Vec<u8>),
    Hardlink(RelPath),
    Other,
}

fn verify_rootfs(path: &Path, checks: &mut Checks) -> Result<()> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut ignored = Vec::new();
    let mut first: Option<(Vec<u8>, bool)> = None;
    let mut prefix = Offenders::default();
    let mut unparsable = Offenders::default();
    let mut duplicates = Offenders::default();
    let mut devices = Offenders::default();
    let mut xattrs = Offenders::default();
    let mut high_ids = Offenders::default();
    let mut whiteouts = Offenders::default();
    let mut link_order = Offenders::default();
    let mut nodes: HashMap<RelPath, Node> = HashMap::new();
    let mut seen: HashSet<RelPath> = HashSet::new();
    let mut os_release: HashMap<RelPath, Vec<u8>> = HashMap::new();
    let walked = layer::walk_tar(
        Box::new(file),
        None,
        &path.display().to_string(),
        &mut ignored,
        |ordinal, entry, pax| {
            let member = match layer::parse_member(entry, pax) {
                Ok(m) => m,
                Err(e) => {
                    unparsable.add(|| format!("#{ordinal}: {e:#}"));
                    return Ok(());
                }
            };
            let shown = lossy(&member.raw_name);
            if first.is_none() {
                first = Some((
                    member.raw_name.clone(),
                    matches!(member.kind, MemberKind::Dir),
                ));
            }
            if !member.raw_name.starts_with(b"./") {
                prefix.add(|| shown.clone());
            }
            if !matches!(member.role, Role::Plain) {
                whiteouts.add(|| shown.clone());
            }
            if !seen.insert(member.path.clone()) {
                duplicates.add(|| shown.clone());
            }
            if member.meta.uid >= 65536 || member.meta.gid >= 65536 {
                high_ids.add(|| format!("{shown} ({}:{})", member.meta.uid, member.meta.gid));
            }
            for (name, _) in member.meta.xattrs.iter() {
                if !(name.starts_with(b"user.") || &name[..] == b"security.capability") {
                    xattrs.add(|| format!("{shown}: {}", lossy(name)));
                }
            }
            let node = match member.kind {
                MemberKind::Dir => Node::Dir,
                MemberKind::File { size } => {
                    let name = member.path.to_bytes();
                    if (name == b"etc/os-release" || name == b"usr/lib/os-release")
                        && size <= 64 << 10
                    {
                        let mut text = Vec::new();
                        entry.read_to_end(&mut text)?;
                        os_release.insert(member.path.clone(), text);
                    }
                    Node::File {
                        executable: member.meta.mode & 0o111 != 0,
                    }
                }
                MemberKind::Symlink(t) => Node::Symlink(t.to_vec()),
                MemberKind::Hardlink(target) => {
                    if !nodes.contains_key(&target) {
                        link_order.add(|| format!("{shown} → {target}"));
                    }
                    Node::Hardlink(target)
                }
                MemberKind::CharDevice(..) | MemberKind::BlockDevice(..) => {
                    devices.add(|| shown.clone());
                    Node::Other
                }
                MemberKind::Fifo | MemberKind::Ignored(_) => Node::Other,
            };
            nodes.insert(member.path, node);
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
    match &first {
        Some((name, true)) if name == b"./" => checks.pass("the first member is ./", ""),
        Some((name, _)) => checks.fail(
            "the first member is ./",
            format!("first member is '{}'", lossy(name)),
        ),
        None => checks.fail("the first member is ./", "the archive is empty"),
    }
    checks.rule(
        "names start with ./ (PVE extracts with --anchored --exclude ./dev/*)",
        &prefix,
        Status::Fail,
    );
    checks.rule(
        "no path appears twice (--skip-old-files keeps the first)",
        &duplicates,
        Status::Fail,
    );
    checks.rule("no device nodes", &devices, Status::Fail);
    checks.rule(
        "only user.* and security.capability xattrs",
        &xattrs,
        Status::Fail,
    );
    checks.rule(
        "uid/gid below 65536 (unprivileged containers)",
        &high_ids,
        Status::Fail,
    );
    checks.rule("no whiteout or opaque markers", &whiteouts, Status::Fail);
    checks.rule(
        "hardlink targets precede their links",
        &link_order,
        Status::Fail,
    );
    check_init(&nodes, checks);
    let text = os_release
        .get(&RelPath::parse(b"etc/os-release").expect("valid"))
        .or_else(|| os_release.get(&RelPath::parse(b"usr/lib/os-release").expect("valid")));
    const OS: &str = "/etc/os-release has an ID Proxmox manages";
    match text.and_then(|t| output::os_release_field(t, "ID")) {
        Some(id) if PVE_KNOWN_OS_IDS.contains(&id.as_str()) => checks.pass(OS, id),
        Some(id) => checks.warn(
            OS,
            format!("ID '{id}': create the container with ostype unmanaged"),
        ),
        None => checks.warn(
            OS,
            "no os-release: create the container with ostype unmanaged",
        ),
    }
    Ok(())
}

/// `/sbin/init` must exist and resolve, inside the root, to an executable file.
fn check_init(nodes: &HashMap<RelPath, Node>, checks: &mut Checks) {
    const RULE: &str = "/sbin/init resolves inside the root to an executable file";
    match resolve(nodes, b"sbin/init") {
        Ok((shown, true)) => checks.pass(RULE, shown),
        Ok((shown, false)) => checks.fail(RULE, format!("{shown} is not executable")),
        Err(why) => checks.fail(RULE, why),
    }
}

/// Follows symlinks (absolute ones from the root, `..` stopping at the root,
/// as inside the container) to a regular file; returns its path and whether
/// it is executable.
fn resolve(nodes: &HashMap<RelPath, Node>, start: &[u8]) -> Result<(String, bool), String> {
    let mut pending: Vec<Vec<u8>> = start
        .rsplit(|&b| b == b'/')
        .filter(|s| !s.is_empty())
        .map(<[u8]>::to_vec)
        .collect();
    let mut cur: Vec<Vec<u8>> = Vec::new();
    let mut hops = 0;
    while let Some(part) = pending.pop() {
        if part == b"." {
            continue;
        }
        if part == b".." {
            cur.pop();
            continue;
        }
        cur.push(part);
        let here = RelPath::from_components(&cur);
        match nodes.get(&here) {
            None => return Err(format!("/{here} does not exist")),
            Some(Node::Dir) if !pending.is_empty() => {}
            Some(Node::Dir) => return Err(format!("/{here} is a directory")),
            Some(Node::Symlink(target)) => {
                hops += 1;
                if hops > 40 {
                    return Err(format!("too many symlinks at /{here}"));
                }
                cur.pop();
                if target.first() == Some(&b'/') {
                    cur.clear();
                }
                for seg in target.rsplit(|&b| b == b'/') {
                    if !seg.is_empty() {
                        pending.push(seg.to_vec());
                    }
                }
            }
            Some(_) if !pending.is_empty() => return Err(format!("/{here} is not a directory")),
            Some(Node::File { executable }) => return Ok((format!("/{here}"), *executable)),
            Some(Node::Hardlink(target)) => match nodes.get(target) {
                Some(Node::File { executable }) => return Ok((format!("/{here}"), *executable)),
                _ => return Err(format!("/{here} is a hardlink to a missing file")),
            },
            Some(Node::Other) => return Err(format!("/{here} is not a regular file")),
        }
    }
    Err("/sbin/init resolves to the root directory".into())
}

fn verify_oci(path: &Path, checks: &mut Checks) -> Result<()> {
    const NAMES: &str = "members are oci-layout, index.json and blobs/sha256/<hex> (no ./ prefix)";
    // Names exactly as stored (TarIndex normalises them).
    let mut names = Vec::new();
    {
        let file = File::open(path)?;
        let mut archive = tar::Archive::new(io::BufReader::new(file));
        for entry in archive.entries().context("not a tar archive")? {
            let entry = entry.context("corrupt tar archive")?;
            names.push((entry.path_bytes().into_owned(), entry.header().entry_type()));
        }
    }
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
    let entry = config
        .pointer("/config/Entrypoint")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    const ENTRY: &str = "Entrypoint starts hakim-init";
    if entry.starts_with(crate::inject::INIT_PATH) {
        checks.pass(ENTRY, entry);
    } else {
        checks.warn(
            ENTRY,
            format!("Entrypoint is '{entry}': the Coder agent will not start by itself"),
        );
    }
    if config
        .pointer("/config/User")
        .and_then(Value::as_str)
        .is_some_and(|u| !u.is_empty())
    {
        checks.warn(
            "no User (Proxmox would run the init as that user)",
            config["config"]["User"].as_str().unwrap_or_default(),
        );
    }

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
    let mut whiteouts = 0u64;
    let walked = layer::walk_tar(
        index.open(&name)?,
        None,
        &format!("layer {}", i + 1),
        &mut ignored,
        |ordinal, entry, pax| {
            match layer::parse_member(entry, pax) {
                Ok(m) if !matches!(m.role, Role::Plain) => whiteouts += 1,
                Ok(_) => {}
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
    if whiteouts > 0 {
        checks.warn(
            &format!("layer {}: no whiteouts", i + 1),
            format!("{whiteouts} whiteout/opaque markers (Proxmox must apply them)"),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(list: &[(&str, Node)]) -> HashMap<RelPath, Node> {
        list.iter()
            .map(|(p, n)| {
                let n = match n {
                    Node::Dir => Node::Dir,
                    Node::File { executable } => Node::File {
                        executable: *executable,
                    },
                    Node::Symlink(t) => Node::Symlink(t.clone()),
                    Node::Hardlink(t) => Node::Hardlink(t.clone()),
                    Node::Other => Node::Other,
                };
                (RelPath::parse(p.as_bytes()).unwrap(), n)
            })
            .collect()
    }

    #[test]
    fn init_resolution_follows_symlinks_inside_the_root() {
        let merged_usr = nodes(&[
            ("sbin", Node::Symlink(b"usr/sbin".to_vec())),
            ("usr", Node::Dir),
            ("usr/sbin", Node::Dir),
            (
                "usr/sbin/init",
                Node::Symlink(b"/usr/local/sbin/hakim-init".to_vec()),
            ),
            ("usr/local", Node::Dir),
            ("usr/local/sbin", Node::Dir),
            ("usr/local/sbin/hakim-init", Node::File { executable: true }),
        ]);
        assert_eq!(
            resolve(&merged_usr, b"sbin/init").unwrap().0,
            "/usr/local/sbin/hakim-init"
        );
        // `..` above the root stays at the root, as in the container.
        let dotdot = nodes(&[
            ("sbin", Node::Dir),
            ("sbin/init", Node::Symlink(b"../../../../bin/x".to_vec())),
            ("bin", Node::Dir),
            ("bin/x", Node::File { executable: false }),
        ]);
        assert_eq!(
            resolve(&dotdot, b"sbin/init").unwrap(),
            ("/bin/x".into(), false)
        );
        let dangling = nodes(&[
            ("sbin", Node::Dir),
            ("sbin/init", Node::Symlink(b"/lib/systemd/systemd".to_vec())),
        ]);
        assert!(resolve(&dangling, b"sbin/init")
            .unwrap_err()
            .contains("does not exist"));
        let looped = nodes(&[
            ("sbin", Node::Dir),
            ("sbin/init", Node::Symlink(b"init".to_vec())),
        ]);
        assert!(resolve(&looped, b"sbin/init")
            .unwrap_err()
            .contains("too many"));
    }
}

//! Proxmox VE's acceptance rules for what we write, in one place.
//!
//! `verify` reads an artifact and reports every rule as pass/WARN/FAIL;
//! `convert` evaluates the same rules on the members it writes (and on the
//! image config it builds) and announces every rule that is not met, with the
//! fix, before anyone runs `pct create`. Both feed the same [`MemberRules`]
//! member by member, so the two cannot drift apart.
//!
//! The rules come from Proxmox's importers: GNU tar with
//! `--numeric-owner --xattrs --xattrs-include=user.* --xattrs-include=security.capability
//! --skip-old-files --anchored --exclude ./dev/*` for rootfs templates, the
//! `proxmox-oci` crate for OCI archives, and the container setup that reads
//! `/etc/os-release` and boots `/sbin/init` (docs/proxmox.md).

use std::collections::{HashMap, HashSet};

use serde_json::Value;

use crate::layer::{self, MemberKind};
use crate::path::RelPath;
use crate::text::{printable, NAME_SHOWN};
use crate::whiteout::Role;

/// Where hakim-init lives in every artifact `--inject-init` makes; the OCI
/// Entrypoint rule expects it there.
pub const INIT_PATH: &str = "/usr/local/sbin/hakim-init";

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

/// Examples kept per rule that is not met.
const EXAMPLES: usize = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Warn,
    Fail,
}

/// The rules that depend on the image's content, so that a conversion can
/// produce an artifact that does not meet them. (The structural rules — names,
/// order, digests — are `verify`'s alone: the writer meets them by
/// construction, and `verify` exists to catch it when it does not.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RuleId {
    /// Rootfs: the first member is `./`.
    FirstMemberRoot,
    /// Rootfs: every name starts with `./`.
    DotSlashNames,
    /// Rootfs: no path twice.
    NoDuplicates,
    /// Rootfs: no device nodes.
    NoDevices,
    /// Rootfs: only xattrs Proxmox's tar keeps.
    AllowedXattrs,
    /// Rootfs and OCI layers: owners an unprivileged container can map.
    IdsBelow65536,
    /// Rootfs: no whiteout markers; OCI layers: none left for Proxmox to apply.
    NoWhiteouts,
    /// Rootfs: a hardlink's target comes first.
    HardlinkOrder,
    /// Rootfs: `/sbin/init` resolves to an executable file.
    SbinInit,
    /// Rootfs: an `/etc/os-release` ID Proxmox manages.
    OsReleaseManaged,
    /// OCI: the Entrypoint starts hakim-init.
    EntrypointInit,
    /// OCI: no `User`.
    NoUser,
}

impl RuleId {
    /// The rule as `verify` prints it.
    pub fn title(self) -> &'static str {
        match self {
            RuleId::FirstMemberRoot => "the first member is ./",
            RuleId::DotSlashNames => {
                "names start with ./ (PVE extracts with --anchored --exclude ./dev/*)"
            }
            RuleId::NoDuplicates => "no path appears twice (--skip-old-files keeps the first)",
            RuleId::NoDevices => "no device nodes",
            RuleId::AllowedXattrs => "only user.* and security.capability xattrs",
            RuleId::IdsBelow65536 => "uid/gid below 65536 (unprivileged containers)",
            RuleId::NoWhiteouts => "no whiteout or opaque markers",
            RuleId::HardlinkOrder => "hardlink targets precede their links",
            RuleId::SbinInit => "/sbin/init resolves inside the root to an executable file",
            RuleId::OsReleaseManaged => "/etc/os-release has an ID Proxmox manages",
            RuleId::EntrypointInit => "Entrypoint starts hakim-init",
            RuleId::NoUser => "no User (Proxmox would run the init as that user)",
        }
    }

    /// What `verify` says when the rule is not met, on a rootfs template
    /// (`in_layer` false) or an OCI archive's layer.
    pub fn severity(self, in_layer: bool) -> Status {
        match self {
            RuleId::OsReleaseManaged | RuleId::EntrypointInit | RuleId::NoUser => Status::Warn,
            // Proxmox's OCI import applies whiteouts itself; a rootfs template
            // would extract them as plain files.
            RuleId::NoWhiteouts if in_layer => Status::Warn,
            _ => Status::Fail,
        }
    }

    /// What to do about it.
    pub fn fix(self) -> &'static str {
        match self {
            RuleId::SbinInit => {
                "convert with --inject-init PATH (a static hakim-init, see ci/build-init.sh), \
                 or use an image that has an init (systemd-sysv), or use the OCI route \
                 (--format oci-archive) for an application image"
            }
            RuleId::IdsBelow65536 => {
                "create a privileged container (rootfs route only), or chown those files \
                 in the image: an unprivileged container maps ids 0-65535"
            }
            RuleId::OsReleaseManaged => {
                "create the container with ostype unmanaged \
                 (pct create --ostype unmanaged; Terraform operating_system.type = \"unmanaged\")"
            }
            RuleId::EntrypointInit | RuleId::NoUser => {
                "convert with --inject-init PATH: the Coder agent then starts by itself"
            }
            RuleId::NoWhiteouts => {
                "convert without --keep-layers (one flattened layer has no whiteouts)"
            }
            RuleId::FirstMemberRoot
            | RuleId::DotSlashNames
            | RuleId::NoDuplicates
            | RuleId::NoDevices
            | RuleId::AllowedXattrs
            | RuleId::HardlinkOrder => "write the template with hakim-convert",
        }
    }
}

/// One rule's outcome.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    /// Set for the rules of [`RuleId`]; `verify`'s structural rules have none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<RuleId>,
    /// OCI archives: the layer (1-based) the rule was checked on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layer: Option<usize>,
    pub rule: String,
    pub status: Status,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub detail: String,
    /// How to meet the rule, when it is not met.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<&'static str>,
}

impl Check {
    /// A structural rule of `verify`'s own.
    pub fn plain(rule: impl Into<String>, status: Status, detail: impl Into<String>) -> Check {
        Check {
            id: None,
            layer: None,
            rule: rule.into(),
            status,
            detail: detail.into(),
            fix: None,
        }
    }

    /// `id` met (`problem` = None) or not (at its severity, with its fix).
    pub fn of(id: RuleId, layer: Option<usize>, problem: Option<String>, note: String) -> Check {
        let rule = match layer {
            Some(n) => format!("layer {n}: {}", id.title()),
            None => id.title().to_string(),
        };
        match problem {
            None => Check {
                id: Some(id),
                layer,
                rule,
                status: Status::Pass,
                detail: note,
                fix: None,
            },
            Some(detail) => Check {
                id: Some(id),
                layer,
                rule,
                status: id.severity(layer.is_some()),
                detail,
                fix: Some(id.fix()),
            },
        }
    }

    /// One line for a human: the rule, what is wrong, and the fix.
    pub fn announce(&self) -> String {
        let mut s = format!("Proxmox: {}", self.rule);
        if !self.detail.is_empty() {
            s.push_str(&format!(": {}", self.detail));
        }
        if let Some(fix) = self.fix {
            s.push_str(&format!(" — fix: {fix}"));
        }
        s
    }
}

/// A rule's offending members: how many, and the first few.
#[derive(Default)]
pub struct Offenders {
    pub count: usize,
    pub examples: Vec<String>,
}

impl Offenders {
    pub fn add(&mut self, what: impl FnOnce() -> String) {
        self.count += 1;
        if self.examples.len() < EXAMPLES {
            self.examples.push(what());
        }
    }

    /// `None` when there are none, else the examples (and how many more).
    pub fn problem(&self) -> Option<String> {
        if self.count == 0 {
            return None;
        }
        let more = if self.count > self.examples.len() {
            format!(" (+{} more)", self.count - self.examples.len())
        } else {
            String::new()
        };
        Some(format!("{}{more}", self.examples.join(", ")))
    }
}

/// What a member became, for resolving `/sbin/init` afterwards.
#[derive(Debug, Clone)]
pub enum Node {
    Dir,
    File { executable: bool },
    Symlink(Vec<u8>),
    Hardlink(RelPath),
    Device,
    Other,
}

/// One member as both sides see it.
pub struct Member<'a> {
    /// The name exactly as stored (`./etc/hosts`).
    pub raw_name: &'a [u8],
    pub path: RelPath,
    pub node: Node,
    pub uid: u64,
    pub gid: u64,
    pub xattr_names: Vec<&'a [u8]>,
    /// A whiteout or opaque marker (or AUFS metadata).
    pub whiteout: bool,
}

impl<'a> Member<'a> {
    /// A member read from a tar (`verify`, or pass 1 over a source layer).
    pub fn from_parsed(m: &'a layer::Member) -> Member<'a> {
        let node = match &m.kind {
            MemberKind::Dir => Node::Dir,
            MemberKind::File { .. } => Node::File {
                executable: m.meta.mode & 0o111 != 0,
            },
            MemberKind::Symlink(t) => Node::Symlink(t.to_vec()),
            MemberKind::Hardlink(target) => Node::Hardlink(target.clone()),
            MemberKind::CharDevice(..) | MemberKind::BlockDevice(..) => Node::Device,
            MemberKind::Fifo | MemberKind::Ignored(_) => Node::Other,
        };
        Member {
            raw_name: &m.raw_name,
            path: m.path.clone(),
            node,
            uid: m.meta.uid,
            gid: m.meta.gid,
            xattr_names: m.meta.xattrs.iter().map(|(k, _)| &k[..]).collect(),
            whiteout: !matches!(m.role, Role::Plain),
        }
    }
}

/// Which rules a member stream is held to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// A rootfs template: every member rule, `/sbin/init` and os-release.
    Rootfs,
    /// One layer of an OCI archive (numbered from 1): ids and whiteouts.
    OciLayer(usize),
}

/// The member rules, evaluated one member at a time.
pub struct MemberRules {
    stream: Stream,
    first: Option<(Vec<u8>, bool)>,
    prefix: Offenders,
    duplicates: Offenders,
    devices: Offenders,
    xattrs: Offenders,
    high_ids: Offenders,
    whiteouts: Offenders,
    link_order: Offenders,
    /// Rootfs only: every path and what it is (duplicates, link order, init).
    nodes: HashMap<RelPath, Node>,
    seen: HashSet<RelPath>,
}

/// Names in reports: escaped and cut ([`printable`]).
fn lossy(b: &[u8]) -> String {
    printable(b, NAME_SHOWN)
}

impl MemberRules {
    pub fn new(stream: Stream) -> Self {
        MemberRules {
            stream,
            first: None,
            prefix: Offenders::default(),
            duplicates: Offenders::default(),
            devices: Offenders::default(),
            xattrs: Offenders::default(),
            high_ids: Offenders::default(),
            whiteouts: Offenders::default(),
            link_order: Offenders::default(),
            nodes: HashMap::new(),
            seen: HashSet::new(),
        }
    }

    pub fn observe(&mut self, m: Member<'_>) {
        let shown = || lossy(m.raw_name);
        if m.uid >= 65536 || m.gid >= 65536 {
            self.high_ids
                .add(|| format!("{} ({}:{})", shown(), m.uid, m.gid));
        }
        if m.whiteout {
            self.whiteouts.add(shown);
        }
        if self.stream != Stream::Rootfs {
            return;
        }
        if self.first.is_none() {
            self.first = Some((m.raw_name.to_vec(), matches!(m.node, Node::Dir)));
        }
        if !m.raw_name.starts_with(b"./") {
            self.prefix.add(shown);
        }
        if !self.seen.insert(m.path.clone()) {
            self.duplicates.add(shown);
        }
        for name in &m.xattr_names {
            if !(name.starts_with(b"user.") || *name == b"security.capability") {
                self.xattrs.add(|| format!("{}: {}", shown(), lossy(name)));
            }
        }
        match &m.node {
            Node::Device => self.devices.add(shown),
            Node::Hardlink(target) if !self.nodes.contains_key(target) => {
                self.link_order.add(|| format!("{} → {target}", shown()))
            }
            _ => {}
        }
        self.nodes.insert(m.path, m.node);
    }

    /// Every rule of the stream. `os_release`: the content of `/etc/os-release`
    /// (or `/usr/lib/os-release`), rootfs only.
    pub fn finish(self, os_release: Option<&[u8]>) -> Vec<Check> {
        let layer = match self.stream {
            Stream::OciLayer(n) => Some(n),
            Stream::Rootfs => None,
        };
        let mut checks = vec![Check::of(
            RuleId::IdsBelow65536,
            layer,
            self.high_ids.problem(),
            String::new(),
        )];
        let whiteouts = Check::of(
            RuleId::NoWhiteouts,
            layer,
            self.whiteouts.problem(),
            String::new(),
        );
        if layer.is_some() {
            checks.push(whiteouts);
            return checks;
        }
        let first = match &self.first {
            Some((name, true)) if name == b"./" => None,
            Some((name, _)) => Some(format!("first member is '{}'", lossy(name))),
            None => Some("the archive is empty".into()),
        };
        checks.insert(
            0,
            Check::of(RuleId::FirstMemberRoot, None, first, String::new()),
        );
        for (id, bad) in [
            (RuleId::DotSlashNames, &self.prefix),
            (RuleId::NoDuplicates, &self.duplicates),
            (RuleId::NoDevices, &self.devices),
            (RuleId::AllowedXattrs, &self.xattrs),
        ] {
            checks.push(Check::of(id, None, bad.problem(), String::new()));
        }
        checks.push(whiteouts);
        checks.push(Check::of(
            RuleId::HardlinkOrder,
            None,
            self.link_order.problem(),
            String::new(),
        ));
        checks.push(match resolve(&self.nodes, b"sbin/init") {
            Ok((shown, true)) => Check::of(RuleId::SbinInit, None, None, shown),
            Ok((shown, false)) => Check::of(
                RuleId::SbinInit,
                None,
                Some(format!("{shown} is not executable")),
                String::new(),
            ),
            Err(why) => Check::of(RuleId::SbinInit, None, Some(why), String::new()),
        });
        checks.push(os_release_check(os_release));
        checks
    }
}

fn os_release_check(text: Option<&[u8]>) -> Check {
    let id = RuleId::OsReleaseManaged;
    match text.and_then(|t| crate::output::os_release_field(t, "ID")) {
        Some(os) if PVE_KNOWN_OS_IDS.contains(&os.as_str()) => Check::of(id, None, None, os),
        Some(os) => Check::of(
            id,
            None,
            Some(format!("ID '{os}' is not one Proxmox manages")),
            String::new(),
        ),
        None => Check::of(
            id,
            None,
            Some("no os-release: Proxmox cannot detect the distribution".into()),
            String::new(),
        ),
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
            Some(Node::Device | Node::Other) => {
                return Err(format!("/{here} is not a regular file"))
            }
        }
    }
    Err("/sbin/init resolves to the root directory".into())
}

/// The image config rules of an OCI archive: what Proxmox starts, and as whom.
pub fn config_checks(config: &Value) -> Vec<Check> {
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
    let mut checks = Vec::new();
    if entry.starts_with(INIT_PATH) {
        checks.push(Check::of(RuleId::EntrypointInit, None, None, entry));
    } else {
        checks.push(Check::of(
            RuleId::EntrypointInit,
            None,
            Some(format!(
                "Entrypoint is '{entry}': the Coder agent will not start by itself"
            )),
            String::new(),
        ));
    }
    let user = config
        .pointer("/config/User")
        .and_then(Value::as_str)
        .unwrap_or_default();
    checks.push(Check::of(
        RuleId::NoUser,
        None,
        (!user.is_empty()).then(|| format!("User is '{user}'")),
        String::new(),
    ));
    checks
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(list: &[(&str, Node)]) -> HashMap<RelPath, Node> {
        list.iter()
            .map(|(p, n)| (RelPath::parse(p.as_bytes()).unwrap(), n.clone()))
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

    fn member(name: &str, node: Node, uid: u64) -> Member<'_> {
        Member {
            raw_name: name.as_bytes(),
            path: RelPath::parse(name.as_bytes()).unwrap(),
            node,
            uid,
            gid: 0,
            xattr_names: Vec::new(),
            whiteout: false,
        }
    }

    fn not_met(checks: &[Check]) -> Vec<RuleId> {
        checks
            .iter()
            .filter(|c| c.status != Status::Pass)
            .filter_map(|c| c.id)
            .collect()
    }

    #[test]
    fn a_rootfs_without_init_or_os_release_is_announced_with_fixes() {
        let mut rules = MemberRules::new(Stream::Rootfs);
        rules.observe(member("./", Node::Dir, 0));
        rules.observe(member("./app", Node::File { executable: true }, 100000));
        let checks = rules.finish(None);
        assert_eq!(
            not_met(&checks),
            [
                RuleId::IdsBelow65536,
                RuleId::SbinInit,
                RuleId::OsReleaseManaged
            ]
        );
        let init = checks
            .iter()
            .find(|c| c.id == Some(RuleId::SbinInit))
            .unwrap();
        assert_eq!(init.status, Status::Fail);
        assert!(
            init.announce().contains("--inject-init"),
            "{}",
            init.announce()
        );
        let os = checks
            .iter()
            .find(|c| c.id == Some(RuleId::OsReleaseManaged))
            .unwrap();
        assert_eq!(os.status, Status::Warn);
        assert!(os.announce().contains("unmanaged"));
    }

    #[test]
    fn layer_streams_check_ids_and_whiteouts_only() {
        let mut rules = MemberRules::new(Stream::OciLayer(2));
        let mut wh = member("etc/.wh.x", Node::Other, 0);
        wh.whiteout = true;
        rules.observe(wh);
        // No ./ prefix and no init: not rules of a layer.
        rules.observe(member("bin", Node::Dir, 0));
        let checks = rules.finish(None);
        assert_eq!(not_met(&checks), [RuleId::NoWhiteouts]);
        assert_eq!(checks[1].rule, "layer 2: no whiteout or opaque markers");
    }

    #[test]
    fn config_rules() {
        let ok = serde_json::json!({"config": {"Entrypoint": [INIT_PATH]}});
        assert!(not_met(&config_checks(&ok)).is_empty());
        let app = serde_json::json!({"config": {"Entrypoint": ["/app"], "User": "1000"}});
        assert_eq!(
            not_met(&config_checks(&app)),
            [RuleId::EntrypointInit, RuleId::NoUser]
        );
    }
}

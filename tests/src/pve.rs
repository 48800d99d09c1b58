//! How Proxmox VE 9.1 turns a template into a container's root file system and LXC config,
//! replayed with the same tools for `tests/tests/pve_e2e.rs` (pve-container's
//! `PVE::LXC::Create` and `PVE::LXC::update_lxc_config`, pve-storage's tar flags).
//!
//! * Classic rootfs templates (`.tar.{gz,xz,zst}`, [`restore_tar_archive`]): GNU tar reads the
//!   archive on stdin with pve-storage's common flags plus `--skip-old-files --anchored
//!   --exclude ./dev/*`, through `lxc-usernsexec` with the container's id map when it is
//!   unprivileged — so owners and file capabilities are written as the container's root sees
//!   them, and nothing needs shifting afterwards.
//! * OCI archives ([`is_oci_archive`], [`restore_oci_archive`]): the `pve-oci-extract` helper
//!   binary replays `proxmox-oci`'s extraction (in the user namespace too); the image config is
//!   then mapped as pve-container does: Entrypoint+Cmd → `entrypoint` (`lxc.init.cmd`) unless
//!   it is `/sbin/init`, Env → the `env` option, StopSignal → `lxc.signal.halt` (default
//!   SIGTERM), WorkingDir → `lxc.init.cwd`, User → `lxc.init.uid`/`gid` (refused here: the
//!   converter must drop it).
//!
//! [`oci_lxc_config`] and [`rootfs_lxc_config`] write what of Proxmox's generated config matters
//! to the init: the entry point, `lxc.environment = TERM=linux`, the `env` lines, the halt
//! signal, the `/dev/shm` tmpfs of application containers and the id map.
//!
//! The container's `env` option through its life ([`env_after_oci_create`], [`CtEnv`],
//! [`lxc_environment`]), as `tests/tests/pve_first_build.rs`'s API stand-in replays it:
//! creating from an OCI image replaces the `env` the caller gave with the image's Env
//! (`API2/LXC.pm` applies the caller's parameters, then `Create.pm`'s `restore_oci_archive`
//! sets `env`); `PUT …/config` applies `env` at once to a stopped container and parks it in
//! `[pve:pending]` on a running one (`update_pct_config`: `env` is not hot-pluggable); a start
//! applies what is pending, writes the config file and reads it back (`lxc.environment.runtime:`
//! lines; the reader drops trailing whitespace) and writes the LXC config, one
//! `lxc.environment.runtime` line per NUL-separated entry (`vm_start`, `update_lxc_config`). One difference: Proxmox VE 9.1 ships
//! LXC 6, where `env` becomes `lxc.environment.runtime` lines (init only, not `lxc-attach`);
//! LXC 5.0 here only has `lxc.environment`, which gives init the same environment.

use std::fs::{self, File};
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::lxc::{Config, Net};
use crate::{run_ok, show};

/// Proxmox's id map for unprivileged containers: `u 0 100000 65536`, `g 0 100000 65536`.
pub const UNPRIVILEGED_BASE: u32 = 100_000;

/// pve-storage's `@COMMON_TAR_FLAGS` (PVE::Storage::Plugin).
pub const COMMON_TAR_FLAGS: &[&str] = &[
    "--one-file-system",
    "-p",
    "--sparse",
    "--numeric-owner",
    "--acls",
    "--xattrs",
    "--xattrs-include=user.*",
    "--xattrs-include=security.capability",
    "--warning=no-file-ignored",
    "--warning=no-xattr-write",
];

/// `lxc-usernsexec -m u:0:BASE:65536 -m g:0:BASE:65536 --` for an unprivileged container,
/// nothing for a privileged one (pve-container's `userns_command`).
pub fn userns_command(idmap_base: Option<u32>) -> Vec<String> {
    match idmap_base {
        None => Vec::new(),
        Some(base) => vec![
            "lxc-usernsexec".into(),
            "-m".into(),
            format!("u:0:{base}:65536"),
            "-m".into(),
            format!("g:0:{base}:65536"),
            "--".into(),
        ],
    }
}

/// A command prefixed with [`userns_command`].
fn in_userns(idmap_base: Option<u32>, program: &str) -> Command {
    let mut argv = userns_command(idmap_base);
    argv.push(program.into());
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    cmd
}

/// The empty root directory as Proxmox hands it to the extraction: owned by the container's
/// root (the mapped 100000 for an unprivileged container), mode 0755.
pub fn prepare_rootdir(rootfs: &Path, idmap_base: Option<u32>) {
    let id = idmap_base.unwrap_or(0);
    std::os::unix::fs::chown(rootfs, Some(id), Some(id))
        .unwrap_or_else(|e| panic!("chown {}: {e}", rootfs.display()));
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(rootfs, fs::Permissions::from_mode(0o755)).unwrap();
}

/// pve-container's `tar_compression_option`: the GNU tar flag for a template's file name.
pub fn tar_compression_option(archive: &Path) -> Option<&'static str> {
    let name = archive.file_name()?.to_string_lossy().into_owned();
    let (_, ext) = name.rsplit_once(".tar")?;
    match ext {
        "" => None,
        ".gz" => Some("-z"),
        ".bz2" => Some("-j"),
        ".xz" => Some("-J"),
        ".lzo" => Some("--lzop"),
        ".zst" => Some("--zstd"),
        other => panic!("Proxmox refuses the compression {other} of {name}"),
    }
}

/// Extracts a classic rootfs template into `rootfs` exactly as pve-container's
/// `restore_tar_archive` does (archive on stdin). Panics with tar's output on failure; returns
/// tar's `--totals` line.
pub fn restore_tar_archive(archive: &Path, rootfs: &Path, idmap_base: Option<u32>) -> String {
    let input = File::open(archive).unwrap_or_else(|e| panic!("open {}: {e}", archive.display()));
    let mut cmd = in_userns(idmap_base, "tar");
    cmd.args(["xpf", "-"]);
    if let Some(flag) = tar_compression_option(archive) {
        cmd.arg(flag);
    }
    cmd.arg("--totals")
        .args(COMMON_TAR_FLAGS)
        .arg("-C")
        .arg(rootfs)
        .args(["--skip-old-files", "--anchored", "--exclude", "./dev/*"]);
    let out = cmd
        .stdin(Stdio::from(input))
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", show(&cmd)));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "{} < {} failed ({}):\n{stderr}",
        show(&cmd),
        archive.display(),
        out.status
    );
    stderr.trim().to_string()
}

/// pve-container's `archive_is_oci_format`: a `.tar` whose `tar -tf` lists exactly
/// `oci-layout`, `index.json` and at least one `blobs/…` member.
pub fn is_oci_archive(archive: &Path) -> bool {
    if archive.extension().and_then(|e| e.to_str()) != Some("tar") {
        return false;
    }
    let out = run_ok(Command::new("tar").arg("-tf").arg(archive));
    let names = String::from_utf8_lossy(&out.stdout);
    let has = |f: &dyn Fn(&str) -> bool| names.lines().any(f);
    has(&|l| l == "oci-layout") && has(&|l| l == "index.json") && has(&|l| l.starts_with("blobs/"))
}

/// What pve-container's `restore_oci_archive` puts into the container's config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OciContainer {
    /// The `entrypoint` option (`lxc.init.cmd`): Entrypoint+Cmd joined, unless empty or
    /// starting with `/sbin/init`. Setting it also makes an application container
    /// (`cmode=console`, host-managed network, a `/dev/shm` tmpfs).
    pub entrypoint: Option<String>,
    /// The `env` option: the image's Env entries, `KEY=VALUE`.
    pub env: Vec<String>,
    /// Whether the image config has an `Env` at all (an empty one still replaces the caller's
    /// `env`; a missing one leaves it).
    pub has_env: bool,
    /// `lxc.signal.halt`: StopSignal, default SIGTERM.
    pub halt_signal: String,
    /// `lxc.init.cwd`: WorkingDir.
    pub init_cwd: Option<String>,
    /// Data volumes (only created as directories by Proxmox).
    pub volumes: Vec<String>,
}

/// The characters pve-container refuses in config values from an image.
fn has_control_char(s: &str) -> bool {
    s.chars()
        .any(|c| matches!(c as u32, 0x00..=0x08 | 0x10..=0x1f | 0x7f))
}

/// Creates the root file system from an OCI archive as Proxmox does (`extractor` is the
/// `pve-oci-extract` binary, run in the container's user namespace when unprivileged) and
/// maps the image config. Panics on anything Proxmox would refuse.
pub fn restore_oci_archive(
    extractor: &Path,
    archive: &Path,
    rootfs: &Path,
    idmap_base: Option<u32>,
) -> OciContainer {
    assert!(
        is_oci_archive(archive),
        "{} is not recognised as an OCI archive by Proxmox's check",
        archive.display()
    );
    let mut cmd = in_userns(idmap_base, &extractor.to_string_lossy());
    cmd.arg(archive).arg(rootfs);
    let out = run_ok(&mut cmd);
    let config: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{} printed no JSON config ({e}): {}",
            show(&cmd),
            String::from_utf8_lossy(&out.stdout)
        )
    });
    oci_container(&config)
}

/// The mapping of an image's runtime config (`config` of the image config) onto the container.
pub fn oci_container(config: &Value) -> OciContainer {
    let array = |key: &str| -> Vec<String> {
        let values: Vec<String> = config[key]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|v| v.as_str().unwrap_or_default().to_string())
                    .collect()
            })
            .unwrap_or_default();
        assert!(
            !values.iter().any(|v| has_control_char(v)),
            "Proxmox refuses control characters in {key}: {values:?}"
        );
        values
    };
    let scalar = |key: &str| -> Option<String> {
        let v = config[key].as_str().filter(|s| !s.is_empty())?.to_string();
        assert!(
            !has_control_char(&v),
            "Proxmox refuses control characters in {key}: {v:?}"
        );
        Some(v)
    };
    assert!(
        scalar("User").is_none(),
        "the image sets User {:?}: Proxmox would start the init as that user (lxc.init.uid)",
        config["User"]
    );
    let mut init_cmd = array("Entrypoint");
    init_cmd.extend(array("Cmd"));
    let entrypoint = match init_cmd.first() {
        Some(argv0) if argv0 != "/sbin/init" => {
            // PVE::Tools::cmd2string would shell-quote such words, and LXC splits
            // lxc.init.cmd on spaces without honouring quotes.
            for word in &init_cmd {
                assert!(
                    !word.is_empty()
                        && word
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || "_./:=+-@,%".contains(c)),
                    "entry point word {word:?} would be quoted by Proxmox and split by LXC"
                );
            }
            Some(init_cmd.join(" "))
        }
        _ => None,
    };
    let volumes = config["Volumes"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    OciContainer {
        entrypoint,
        env: array("Env"),
        has_env: config["Env"].is_array(),
        halt_signal: scalar("StopSignal").unwrap_or_else(|| "SIGTERM".into()),
        init_cwd: scalar("WorkingDir"),
        volumes,
    }
}

/// Splits `KEY=VALUE`.
fn env_pair(entry: &str) -> (String, String) {
    let (k, v) = entry.split_once('=').unwrap_or((entry, ""));
    (k.to_string(), v.to_string())
}

/// The `env` option of a container just created from an OCI image, given the `env` the caller
/// passed to `POST /nodes/{node}/lxc`: the caller's value is applied first, then
/// `restore_oci_archive` sets `env` to the image's Env joined with NUL — whenever the image
/// config has an `Env` (`$conf->{env} = join("\0", @Env)`, still so at pve-container 6.1.10).
pub fn env_after_oci_create(caller_env: Option<&str>, image: &OciContainer) -> Option<String> {
    if image.has_env {
        Some(image.env.join("\0"))
    } else {
        caller_env.map(str::to_string)
    }
}

/// The `env` option of a container just created from `template`: an OCI image's as
/// [`env_after_oci_create`] says; a classic rootfs template never touches it, so the caller's
/// stays.
pub fn env_after_create(
    caller_env: Option<&str>,
    oci_image: Option<&OciContainer>,
) -> Option<String> {
    match oci_image {
        Some(image) => env_after_oci_create(caller_env, image),
        None => caller_env.map(str::to_string),
    }
}

/// A container's `env` option: the value in effect and a pending one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CtEnv {
    /// The config's `env` (what `GET …/config?current=1` shows).
    pub current: Option<String>,
    /// `env` in `[pve:pending]`, waiting for the next start.
    pub pending: Option<String>,
}

impl CtEnv {
    /// `PUT /nodes/{node}/lxc/{vmid}/config` with `env`: a stopped container takes it at once
    /// (`vmconfig_apply_pending` for the modified options), a running one keeps it pending
    /// (`vmconfig_hotplug_pending` only moves the fast-plug options; `env` is not one).
    pub fn put(&mut self, value: &str, running: bool) {
        if running {
            self.pending = Some(value.to_string());
        } else {
            self.current = Some(value.to_string());
            self.pending = None;
        }
    }

    /// `vm_start`: pending changes are applied and the config is written and read back
    /// (`lxc.environment.runtime: ENTRY` lines, whose trailing whitespace the reader drops),
    /// then `update_lxc_config` turns `env` into the init's environment
    /// ([`lxc_environment`]). Returns those `(name, value)` lines in order.
    pub fn start(&mut self) -> Vec<(String, String)> {
        if let Some(p) = self.pending.take() {
            self.current = Some(p);
        }
        self.current = self.current.as_deref().map(|env| {
            env.split('\0')
                .filter(|e| !e.is_empty())
                .map(|e| e.trim_end())
                .collect::<Vec<_>>()
                .join("\0")
        });
        lxc_environment(self.current.as_deref())
    }
}

/// The environment `update_lxc_config` gives the init: `lxc.environment = TERM=linux`, then one
/// `lxc.environment.runtime` line per entry of `env` (split at runs of NUL; an empty `env`
/// writes none).
pub fn lxc_environment(env: Option<&str>) -> Vec<(String, String)> {
    let mut out = vec![("TERM".to_string(), "linux".to_string())];
    if let Some(env) = env.filter(|e| !e.is_empty()) {
        out.extend(env.split('\0').filter(|e| !e.is_empty()).map(env_pair));
    }
    out
}

/// `KEY=VALUE` entries joined the way the API's `env` parameter carries them.
pub fn env_option(entries: impl IntoIterator<Item = String>) -> String {
    entries.into_iter().collect::<Vec<_>>().join("\0")
}

/// The LXC config of a container created from an OCI archive: `lxc.environment = TERM=linux`,
/// then the `env` option — the image's Env followed by `added` (what a user appends to that
/// list in the GUI or with `pct set --env`, e.g. the Coder agent's variables) — the entry
/// point, its working directory and halt signal, and for application containers the
/// `/dev/shm` tmpfs Proxmox mounts.
pub fn oci_lxc_config(
    oci: &OciContainer,
    added: &[(String, String)],
    net: Net,
    idmap_base: Option<u32>,
) -> Config {
    let env = lxc_environment(Some(&env_option(
        oci.env
            .iter()
            .cloned()
            .chain(added.iter().map(|(k, v)| format!("{k}={v}"))),
    )));
    let mut extra = Vec::new();
    if oci.entrypoint.is_some() {
        extra.push("lxc.mount.entry = shm dev/shm tmpfs rw,nosuid,nodev,create=dir 0 0".into());
    }
    Config {
        net,
        init_cmd: oci.entrypoint.clone(),
        halt_signal: Some(oci.halt_signal.clone()),
        idmap_base,
        env,
        init_cwd: oci.init_cwd.clone(),
        extra,
    }
}

/// The LXC config of a container created from a classic rootfs template: LXC's default halt
/// signal, `lxc.init.cmd = /sbin/init`, `TERM=linux`, and `env` (`added`) if the user set any.
pub fn rootfs_lxc_config(added: &[(String, String)], net: Net, idmap_base: Option<u32>) -> Config {
    let env = lxc_environment(Some(&env_option(
        added.iter().map(|(k, v)| format!("{k}={v}")),
    )));
    Config {
        net,
        init_cmd: Some("/sbin/init".into()),
        halt_signal: None,
        idmap_base,
        env,
        init_cwd: None,
        extra: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn compression_option_follows_the_file_name() {
        assert_eq!(
            tar_compression_option(Path::new("a.tar.zst")),
            Some("--zstd")
        );
        assert_eq!(tar_compression_option(Path::new("a.tar.xz")), Some("-J"));
        assert_eq!(tar_compression_option(Path::new("a.tar")), None);
    }

    #[test]
    fn image_config_maps_like_pve_container() {
        let c = oci_container(&json!({
            "Entrypoint": ["/usr/local/sbin/hakim-init"], "Cmd": [],
            "Env": ["PATH=/usr/bin:/bin", "A=b=c"], "WorkingDir": "/home/coder",
        }));
        assert_eq!(c.entrypoint.as_deref(), Some("/usr/local/sbin/hakim-init"));
        assert_eq!(c.halt_signal, "SIGTERM");
        assert_eq!(c.init_cwd.as_deref(), Some("/home/coder"));
        let cfg = oci_lxc_config(&c, &[("K".into(), "v".into())], Net::Host, None);
        assert_eq!(
            cfg.env,
            [
                ("TERM", "linux"),
                ("PATH", "/usr/bin:/bin"),
                ("A", "b=c"),
                ("K", "v")
            ]
            .map(|(k, v)| (k.to_string(), v.to_string()))
        );
        assert_eq!(cfg.extra.len(), 1);
        // /sbin/init as argv0 keeps a system container: no entrypoint.
        let sys = oci_container(&json!({"Entrypoint": ["/sbin/init"], "StopSignal": "SIGRTMIN+3"}));
        assert_eq!(sys.entrypoint, None);
        assert_eq!(sys.halt_signal, "SIGRTMIN+3");
    }

    #[test]
    fn env_through_create_put_and_start() {
        let image = oci_container(&json!({"Env": ["PATH=/usr/bin", "LANG=C.UTF-8"]}));
        // Creation replaces the caller's env with the image's.
        let created = env_after_oci_create(Some("CODER_AGENT_TOKEN=t"), &image);
        assert_eq!(created.as_deref(), Some("PATH=/usr/bin\0LANG=C.UTF-8"));
        let mut env = CtEnv {
            current: created,
            pending: None,
        };
        assert!(!env
            .clone()
            .start()
            .iter()
            .any(|(k, _)| k == "CODER_AGENT_TOKEN"));
        // On a stopped container a PUT applies at once; a start writes it in order.
        env.put("PATH=/usr/bin\0CODER_AGENT_TOKEN=t  \0\0X=1", false);
        assert_eq!(env.pending, None);
        let lines = env.start();
        assert_eq!(
            lines,
            [
                ("TERM", "linux"),
                ("PATH", "/usr/bin"),
                ("CODER_AGENT_TOKEN", "t"),
                ("X", "1")
            ]
            .map(|(k, v)| (k.to_string(), v.to_string()))
        );
        // On a running one it waits for the next start.
        env.put("A=2", true);
        assert_eq!(
            env.current.as_deref(),
            Some("PATH=/usr/bin\0CODER_AGENT_TOKEN=t\0X=1")
        );
        assert_eq!(env.start().len(), 2);
        assert_eq!(env.current.as_deref(), Some("A=2"));
        // An image without Env leaves the caller's; an empty Env still replaces it.
        let none = oci_container(&json!({}));
        assert_eq!(
            env_after_oci_create(Some("A=1"), &none).as_deref(),
            Some("A=1")
        );
        let empty = oci_container(&json!({"Env": []}));
        assert_eq!(
            env_after_oci_create(Some("A=1"), &empty).as_deref(),
            Some("")
        );
        assert_eq!(lxc_environment(Some("")).len(), 1);
    }

    #[test]
    #[should_panic(expected = "User")]
    fn image_user_is_refused() {
        oci_container(&json!({"User": "coder"}));
    }
}

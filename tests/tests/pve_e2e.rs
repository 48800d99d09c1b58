//! The whole path on real parts: a Hakim-like image in a registry behind token auth →
//! `hakim-convert --inject-init` → a container created the way Proxmox VE does → the Coder
//! agent running as the workspace user.
//!
//! Shared by every test, once per process ([`artifacts`]):
//!
//! 1. The Hakim-like image of `ci/build-hakim-image.sh` (Debian trixie minbase from
//!    debootstrap, built by `buildah bud` from `tests/fixtures/hakim-like/Dockerfile`: user
//!    coder uid 1000 in group docker with a bash login shell, whiteouts, a `chmod -R` copy-up,
//!    hardlinks, a binary with `security.capability`, ENV/WORKDIR/USER/ENTRYPOINT; cached in
//!    the test cache keyed by the script and fixture contents) is pushed with skopeo to
//!    `docker-registry` behind the harness's token server.
//! 2. It is converted from the registry, anonymously through the bearer-token flow, with the
//!    static `hakim-init` of `ci/build-init.sh` injected and the `env-probe` service declared
//!    (`--services tests/fixtures/hakim-like/services`), into (a) a rootfs `.tar.zst` and
//!    (b) a gzip OCI archive; the second conversion must fetch nothing (blob cache). Both must
//!    pass `hakim-convert verify`.
//!
//! Then four containers, one at a time (`tests/src/pve.rs` replays Proxmox):
//!
//! * (a) rootfs template: GNU tar with Proxmox's exact flags (through `lxc-usernsexec` when
//!   unprivileged), `lxc.init.cmd = /sbin/init`, LXC's default halt signal (SIGPWR, or
//!   SIGRTMIN+3 since hakim-init blocks SIGPWR), the agent's variables as `env`;
//! * (b) OCI archive: the layer unpacked as `proxmox-oci` does (the `pve-oci-extract` helper),
//!   `lxc.init.cmd` from Entrypoint, the environment from Env plus the agent's variables
//!   appended as a user would to Proxmox's `env` list, `lxc.signal.halt` from StopSignal
//!   (SIGTERM), `lxc.init.cwd` from WorkingDir, the `/dev/shm` tmpfs of application
//!   containers;
//!
//! each privileged (host network, agent server on the host's 127.0.0.1) and unprivileged
//! (`lxc.idmap = u/g 0 100000 65536`, Proxmox's default; own network namespace with the agent
//! server on its 127.0.0.1; the home volume formatted with `root_owner=100000:100000`).
//!
//! In each: the root file system carries what the image built (hardlinks, whiteouts, the
//! copied-up tree, the file capability — as a v3 capability owned by the container's root
//! when unprivileged); a fresh ext4 volume with `lost+found` is mounted on `/home/coder`;
//! hakim-init downloads the agent, which runs as coder (uid/gid 1000, groups coder + docker,
//! HOME, SHELL /bin/bash, cwd the project dir, the image's Env) with the token, while the
//! declared service — and every other child of PID 1 — runs without it; `lxc-stop` ends the
//! container by itself within the grace after the agent saw SIGTERM; a second boot (and for
//! (a) an `lxc-stop -r` reboot, after which the agent comes back) changes nothing in `/etc`
//! or the home.
//!
//! Gating as in the other end-to-end tests: without root or a tool the tests print
//! `skipping: … missing` and pass, unless `HAKIM_E2E=1`. `HAKIM_E2E_KEEP=1` keeps the
//! container directories. Run with `--nocapture` for timings.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use hakim_e2e::lxc::{
    binaries, children_of, cmdline, ensure_subids, graceful_stop, manifest, manifest_diff,
    proc_status_field, reboot, serial, stat_line, AgentExpect, AgentServer, Container, Net,
    AGENT_BIN, BOOT_TIMEOUT, RECORD, SIGPWR, SIGRTMIN_3, SIGTERM,
};
use hakim_e2e::pve::{self, OciContainer, UNPRIVILEGED_BASE};
use hakim_e2e::registry::{converter_ready, registry_ready, Mode, Registry};
use hakim_e2e::{
    cache_dir, convert_to, converter_bin, hakim_like_image, missing_tools_or_root, run_ok,
    sha256_file, workspace_root,
};

const TOKEN: &str = "e2e-pve-agent-token-5b1d9c";
/// Where the image goes in the registry.
const REPOSITORY: &str = "hakim/workspace";
const TAG: &str = "e2e";
/// The port of the agent server inside an unprivileged container's network namespace.
const NETNS_PORT: u16 = 38_091;
/// What the image's Dockerfile puts into its Env.
const IMAGE_ENV: &[(&str, &str)] = &[("HAKIM_IMAGE", "e2e-hakim-like"), ("LANG", "C.UTF-8")];
/// The declared service's record, inside the container.
const PROBE_OUT: &str = "tmp/env-probe.out";

/// Every prerequisite of these tests (see the module docs for the gating).
fn all_ready() -> bool {
    hakim_e2e::ready()
        && hakim_e2e::lxc::ready()
        && registry_ready()
        && converter_ready()
        && hakim_e2e::gate(&missing_tools_or_root(
            &["lxc-usernsexec", "newuidmap"],
            "extraction in a container's user namespace",
        ))
}

// ---------------------------------------------------------------------------------------------
// The shared conversion
// ---------------------------------------------------------------------------------------------

/// The two artifacts, converted once per process into `CACHE/scratch/pve-e2e.<pid>/`.
struct Artifacts {
    rootfs_template: PathBuf,
    oci_archive: PathBuf,
}

/// Converts once; a failure is remembered, so the other tests fail at once with its message.
fn artifacts() -> &'static Artifacts {
    static ARTIFACTS: OnceLock<Result<Artifacts, String>> = OnceLock::new();
    let converted = ARTIFACTS.get_or_init(|| {
        std::panic::catch_unwind(convert_from_registry).map_err(|e| {
            e.downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panicked".into())
        })
    });
    match converted {
        Ok(a) => a,
        Err(e) => panic!("the shared conversion failed: {e}"),
    }
}

/// Removes the artifact directories of earlier test processes that have exited (a static is
/// never dropped, so each process leaves its own behind).
fn prune_stale_artifact_dirs(scratch: &Path) {
    for entry in fs::read_dir(scratch).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("pve-e2e.") else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

fn convert_from_registry() -> Artifacts {
    let scratch = cache_dir().join("scratch");
    fs::create_dir_all(&scratch).unwrap();
    prune_stale_artifact_dirs(&scratch);
    let dir = scratch.join(format!("pve-e2e.{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();

    let image = hakim_like_image();
    let init = &binaries().init;
    let registry = Registry::start(Mode::Token);
    let reference = format!("{REPOSITORY}:{TAG}");
    registry.push(&image.oci_ref(), &reference, &[]);
    let source = registry.docker_ref(&reference);
    let blob_cache = dir.join("blob-cache");
    let services = workspace_root().join("tests/fixtures/hakim-like/services");
    let common: Vec<String> = vec![
        "--inject-init".into(),
        init.display().to_string(),
        "--services".into(),
        services.display().to_string(),
        "--cache-dir".into(),
        blob_cache.display().to_string(),
        "--quiet".into(),
    ];
    let env = registry.client_env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let convert = |format_args: &[&str], ext: &str| {
        let mut args: Vec<&str> = format_args.to_vec();
        args.extend(common.iter().map(String::as_str));
        let c = convert_to(&source, &args, &env, ext);
        println!(
            "converted {source} {format_args:?} in {:.1} s: {} ({} bytes); registry: {}",
            c.seconds,
            c.artifact.display(),
            fs::metadata(&c.artifact).unwrap().len(),
            c.json["source"]["registry"]
        );
        c
    };
    let rootfs = convert(&["--compression", "zstd"], ".tar.zst");
    let oci = convert(&["--format", "oci-archive"], ".tar");

    // Cold, then warm: the second conversion takes every blob from the cache.
    let cold = &rootfs.json["source"]["registry"];
    let warm = &oci.json["source"]["registry"];
    let layers = image.manifest()["layers"].as_array().unwrap().len() as u64;
    assert!(
        cold["blobs_downloaded"].as_u64().unwrap_or(0) > layers,
        "the first conversion downloaded {cold} (the image has {layers} layers and a config)"
    );
    assert_eq!(warm["blobs_downloaded"], 0, "second conversion: {warm}");
    assert_eq!(warm["bytes_downloaded"], 0, "second conversion: {warm}");
    // Anonymous pulls through the bearer-token flow.
    let token = registry.token.as_ref().expect("token mode");
    let scope = format!("repository:{REPOSITORY}:pull");
    let pulls: Vec<_> = token
        .requests()
        .into_iter()
        .filter(|r| r.scopes.contains(&scope))
        .collect();
    assert!(
        pulls.iter().any(|r| !r.authorization && r.status == 200),
        "no anonymous pull token was granted for {scope}: {pulls:?}"
    );
    for c in [&rootfs, &oci] {
        let injected: Vec<&str> = c.json["injected"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        for want in [
            "/usr/local/sbin/hakim-init",
            "/sbin/init",
            "/etc/hakim/services/env-probe.toml",
        ] {
            assert!(
                injected.contains(&want),
                "{want} not injected: {injected:?}"
            );
        }
        let out = run_ok(Command::new(converter_bin()).arg("verify").arg(&c.artifact));
        println!("{}", String::from_utf8_lossy(&out.stdout).trim_end());
    }
    let move_out = |c: &hakim_e2e::Conversion| {
        let to = dir.join(c.artifact.file_name().unwrap());
        fs::rename(&c.artifact, &to).unwrap();
        to
    };
    Artifacts {
        rootfs_template: move_out(&rootfs),
        oci_archive: move_out(&oci),
    }
}

// ---------------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Template {
    /// The rootfs `.tar.zst`, extracted by GNU tar.
    Rootfs,
    /// The OCI archive, unpacked as `proxmox-oci` does.
    Oci,
}

fn agent_env(url: &str) -> Vec<(String, String)> {
    [
        ("CODER_AGENT_URL", url),
        ("CODER_AGENT_TOKEN", TOKEN),
        ("FAKE_CODER_RECORD", RECORD),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// gid of `name` in the root file system's /etc/group.
fn group_id(rootfs: &Path, name: &str) -> i64 {
    let group = fs::read_to_string(rootfs.join("etc/group")).unwrap();
    group
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.first() == Some(&name)).then(|| f[2].parse().unwrap())
        })
        .unwrap_or_else(|| panic!("no group {name} in /etc/group:\n{group}"))
}

fn owner(p: &Path) -> (u32, u32) {
    let m = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    (m.uid(), m.gid())
}

/// What the image built must be in the container's root file system, with host owners shifted
/// by `offset` (the id map base of an unprivileged container).
fn check_rootfs(rootfs: &Path, offset: u32) {
    let at = |rel: &str| rootfs.join(rel);
    let shifted = |(u, g): (u32, u32)| (u + offset, g + offset);
    // The injected init, where both templates start it.
    let init = at("usr/local/sbin/hakim-init");
    assert_eq!(
        sha256_file(&init),
        sha256_file(&binaries().init),
        "injected init differs from ci/build-init.sh's"
    );
    assert_eq!(owner(&init), shifted((0, 0)));
    assert_eq!(
        fs::metadata(&init).unwrap().mode() & 0o7777,
        0o755,
        "init mode"
    );
    // /sbin is a symlink to usr/sbin on Debian (merged /usr).
    assert_eq!(
        fs::read_link(at("usr/sbin/init"))
            .map(|t| t.display().to_string())
            .unwrap_or_default()
            .trim_start_matches("../local/sbin/")
            .trim_start_matches("/usr/local/sbin/"),
        "hakim-init",
        "/sbin/init must point at hakim-init"
    );
    // The user, with its login shell.
    let passwd = fs::read_to_string(at("etc/passwd")).unwrap();
    assert!(
        passwd
            .lines()
            .any(|l| l == "coder:x:1000:1000::/home/coder:/bin/bash"),
        "/etc/passwd:\n{passwd}"
    );
    assert!(at("usr/bin/bash").is_file());
    assert_eq!(owner(&at("etc/passwd")), shifted((0, 0)));
    // A hardlink within a layer stays one inode. A link to a lower layer's file arrives as a
    // plain copy: buildah's layer differ stores the new name as a regular file.
    let ino = |rel: &str| fs::metadata(at(rel)).unwrap().ino();
    assert_eq!(ino("opt/hakim/bin/tool"), ino("opt/hakim/bin/tool-hard"));
    assert_eq!(
        sha256_file(&at("opt/hakim/bin/bash-hard")),
        sha256_file(&at("usr/bin/bash"))
    );
    // Whiteouts.
    for gone in ["opt/hakim/cache", "usr/share/doc", "usr/share/man"] {
        assert!(
            fs::symlink_metadata(at(gone)).is_err(),
            "{gone} was removed by a later layer but exists"
        );
    }
    // The chmod -R / chown -R copy-up.
    let docker = group_id(rootfs, "docker") as u32;
    let utc = at("opt/hakim/share/zoneinfo/Etc/UTC");
    assert_eq!(owner(&utc), shifted((1000, docker)), "owner of {utc:?}");
    assert_eq!(
        fs::metadata(&utc).unwrap().mode() & 0o020,
        0o020,
        "g+w of chmod -R missing"
    );
    // The file capability: cap_net_raw + cap_net_bind_service, effective. Written from inside
    // the user namespace it becomes a v3 capability naming the container's root.
    let cap = xattr::get(at("usr/local/bin/hakim-netcap"), "security.capability")
        .unwrap()
        .expect("security.capability lost");
    let word = |i: usize| u32::from_le_bytes(cap[i * 4..i * 4 + 4].try_into().unwrap());
    let permitted = (1 << 10) | (1 << 13);
    if offset == 0 {
        assert_eq!(
            (cap.len(), word(0), word(1)),
            (20, 0x0200_0001, permitted),
            "v2 capability {cap:02x?}"
        );
    } else {
        assert_eq!(
            (cap.len(), word(0), word(1), word(5)),
            (24, 0x0300_0001, permitted, offset),
            "v3 capability owned by the container's root {cap:02x?}"
        );
    }
    // The image's Env for the init, and the declared service.
    let image_env = fs::read_to_string(at("etc/hakim/image.env")).unwrap();
    for (k, v) in IMAGE_ENV {
        assert!(
            image_env.lines().any(|l| l == format!("{k}={v}")),
            "/etc/hakim/image.env lacks {k}={v}:\n{image_env}"
        );
    }
    assert!(at("etc/hakim/services/env-probe.toml").is_file());
}

/// The OCI archive's config as Proxmox maps it.
fn check_oci_mapping(oci: &OciContainer) {
    assert_eq!(
        oci.entrypoint.as_deref(),
        Some("/usr/local/sbin/hakim-init"),
        "{oci:?}"
    );
    assert_eq!(oci.halt_signal, "SIGTERM", "{oci:?}");
    assert_eq!(oci.init_cwd.as_deref(), Some("/home/coder"), "{oci:?}");
    for (k, v) in IMAGE_ENV {
        assert!(
            oci.env.contains(&format!("{k}={v}")),
            "Env lacks {k}={v}: {oci:?}"
        );
    }
    assert!(
        !oci.env.iter().any(|e| e.starts_with("CODER_")),
        "the image must not carry agent settings: {oci:?}"
    );
}

/// The declared service's record: written as coder, with the image's Env and without the
/// token. Also: no child of PID 1 other than the agent has the token in its environment.
fn check_token_stays_with_agent(ct: &Container) {
    let out = ct.rootfs.join(PROBE_OUT);
    ct.wait_for("the env-probe service's record", BOOT_TIMEOUT, || {
        out.is_file()
    });
    let text = fs::read_to_string(&out).unwrap();
    assert!(
        text.lines()
            .next()
            .unwrap_or("")
            .starts_with("uid=1000(coder)"),
        "env-probe did not run as coder:\n{text}"
    );
    assert!(
        !text.contains(TOKEN) && !text.contains("CODER_AGENT_TOKEN"),
        "the agent token reached a declared service:\n{text}"
    );
    for (k, v) in IMAGE_ENV {
        assert!(
            text.lines().any(|l| l == format!("{k}={v}")),
            "env-probe lacks the image's {k}={v}:\n{text}"
        );
    }
    let init = ct.init_pid().expect("init pid");
    let mut checked = 0;
    for pid in children_of(init) {
        if cmdline(pid).starts_with(AGENT_BIN) {
            continue;
        }
        let Ok(environ) = fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        checked += 1;
        assert!(
            !String::from_utf8_lossy(&environ).contains(TOKEN),
            "child {pid} of PID 1 ({}) has the token in its environment",
            cmdline(pid)
        );
    }
    assert!(checked >= 1, "no child of PID 1 besides the agent to check");
}

/// Starts the container and waits for the agent's `n`-th start. With its own network
/// namespace, the agent server is opened inside it (returned: it lives until dropped).
fn boot(ct: &Container, n: usize, own_netns: bool, agent: &Arc<Vec<u8>>) -> Option<AgentServer> {
    if !own_netns {
        let took = ct.boot(n);
        println!(
            "{}: boot {n}: agent started {took:.3} s after lxc-start",
            ct.name
        );
        return None;
    }
    let t = Instant::now();
    if let Err(e) = ct.start() {
        panic!("{e}\n{}", ct.diagnostics());
    }
    let server = serve_in_netns(ct, ct.init_pid().expect("init pid"), agent);
    ct.wait_for(&format!("agent start #{n}"), BOOT_TIMEOUT, || {
        ct.agent_starts() >= n
    });
    println!(
        "{}: boot {n}: agent started {:.3} s after lxc-start",
        ct.name,
        t.elapsed().as_secs_f64()
    );
    Some(server)
}

/// The agent server on 127.0.0.1 inside the network namespace of `init`.
fn serve_in_netns(ct: &Container, init: u32, agent: &Arc<Vec<u8>>) -> AgentServer {
    AgentServer::in_netns(init, NETNS_PORT, agent.clone())
        .unwrap_or_else(|e| panic!("{e}\n{}", ct.diagnostics()))
}

/// Creates the root file system as Proxmox does for the template (and, for an OCI archive,
/// checks how its config maps).
fn create_rootfs(ct: &Container, template: Template, idmap: Option<u32>) -> Option<OciContainer> {
    let artifacts = artifacts();
    pve::prepare_rootdir(&ct.rootfs, idmap);
    let t = Instant::now();
    let oci = match template {
        Template::Rootfs => {
            let totals = pve::restore_tar_archive(&artifacts.rootfs_template, &ct.rootfs, idmap);
            println!("{}: tar: {totals}", ct.name);
            None
        }
        Template::Oci => {
            let extractor = Path::new(env!("CARGO_BIN_EXE_pve-oci-extract"));
            let oci =
                pve::restore_oci_archive(extractor, &artifacts.oci_archive, &ct.rootfs, idmap);
            check_oci_mapping(&oci);
            Some(oci)
        }
    };
    println!(
        "{}: root file system created in {:.1} s",
        ct.name,
        t.elapsed().as_secs_f64()
    );
    oci
}

/// After the first boot: the agent's host uid, the token kept from every other process, the
/// fresh home volume given to the user; for an OCI container PID 1's cwd (WorkingDir) and
/// exactly one `/dev/shm` mount (Proxmox's entry; hakim-init must not add another).
fn check_first_boot(ct: &Container, offset: u32, oci: bool) {
    let init = ct.init_pid().unwrap();
    let agent_pid = children_of(init)
        .into_iter()
        .find(|p| cmdline(*p).starts_with(AGENT_BIN))
        .unwrap_or_else(|| panic!("no agent process under {init}\n{}", ct.diagnostics()));
    assert_eq!(
        proc_status_field(agent_pid, "Uid").unwrap(),
        vec![(1000 + offset).to_string(); 4],
        "host uids of the agent"
    );
    check_token_stays_with_agent(ct);
    let home = ct.rootfs.join("home/coder");
    let m = fs::metadata(&home).unwrap();
    assert_eq!(
        (m.uid(), m.gid(), m.mode() & 0o7777),
        (1000 + offset, 1000 + offset, 0o755),
        "the volume's root must become the user's\n{}",
        ct.diagnostics()
    );
    assert!(home.join(".profile").is_file(), "skel not copied");
    if oci {
        let cwd = fs::read_link(format!("/proc/{init}/cwd")).unwrap();
        assert_eq!(cwd, Path::new("/home/coder"), "PID 1's cwd");
        let mounts = fs::read_to_string(format!("/proc/{init}/mountinfo")).unwrap();
        let shm = mounts
            .lines()
            .filter(|l| l.split_whitespace().nth(4) == Some("/dev/shm"))
            .count();
        assert_eq!(shm, 1, "/dev/shm mounts in the container:\n{mounts}");
    }
}

// ---------------------------------------------------------------------------------------------
// One container
// ---------------------------------------------------------------------------------------------

fn run_case(test: &str, template: Template, unprivileged: bool) {
    let _serial = serial();
    if !all_ready() {
        return;
    }
    let agent = binaries().fake_coder_bytes();
    let idmap = unprivileged.then_some(UNPRIVILEGED_BASE);
    let offset = idmap.unwrap_or(0);
    if unprivileged {
        for note in ensure_subids(u64::from(UNPRIVILEGED_BASE), 65536) {
            println!("NOTE: {note}");
        }
    }

    let mut ct = Container::new(test);
    let oci = create_rootfs(&ct, template, idmap);
    check_rootfs(&ct.rootfs, offset);
    let docker_gid = group_id(&ct.rootfs, "docker");

    // A fresh volume on the home, as Proxmox formats it for this container.
    let home = ct.rootfs.join("home/coder");
    ct.mount_fresh_volume_owned(&home, "64M", unprivileged.then_some((offset, offset)));
    let lost = home.join("lost+found");
    let lost_before = stat_line(&lost);

    // Unprivileged containers cannot share the host's network namespace (LXC cannot mount sysfs
    // there from a user namespace): they get their own, with the agent server inside.
    let (net, host_server) = if unprivileged {
        (Net::Empty, None)
    } else {
        (Net::Host, Some(AgentServer::on_host(agent.clone())))
    };
    let url = match &host_server {
        Some(s) => s.url(),
        None => format!("http://127.0.0.1:{NETNS_PORT}"),
    };
    let added = agent_env(&url);
    let (cfg, halt) = match &oci {
        None => (
            pve::rootfs_lxc_config(&added, net, idmap),
            vec![SIGPWR, SIGRTMIN_3],
        ),
        Some(oci) => (pve::oci_lxc_config(oci, &added, net, idmap), vec![SIGTERM]),
    };
    ct.configure(&cfg);
    let expect = AgentExpect {
        url: url.clone(),
        token: TOKEN.into(),
        groups: vec![docker_gid, 1000],
        env: IMAGE_ENV
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .chain([("SHELL".to_string(), "/bin/bash".to_string())])
            .collect(),
    };

    // Boot 1: the first start on a fresh home volume.
    let server1 = boot(&ct, 1, unprivileged, &agent);
    hakim_e2e::lxc::check_agent_start(&ct, &ct.start_record(1), &expect);
    check_first_boot(&ct, offset, oci.is_some());
    assert_eq!(stat_line(&lost), lost_before, "lost+found was touched");
    graceful_stop(&ct, 0, &halt, 1);
    drop(server1);
    let tops = ["etc", "home"];
    let before = manifest(&ct.rootfs, &tops);

    // Boot 2 (and for a rootfs template a reboot): nothing changes in /etc or the home.
    let console_from = ct.console().len();
    let server2 = boot(&ct, 2, unprivileged, &agent);
    hakim_e2e::lxc::check_agent_start(&ct, &ct.start_record(2), &expect);
    let mut starts = 2;
    let mut server3 = None;
    if template == Template::Rootfs {
        drop(server2);
        let (server, _) = reboot(&ct, 3, |init| {
            unprivileged.then(|| serve_in_netns(&ct, init, &agent))
        });
        server3 = server;
        hakim_e2e::lxc::check_agent_start(&ct, &ct.start_record(3), &expect);
        starts = 3;
    }
    graceful_stop(&ct, console_from, &halt, starts);
    drop(server3);
    let after = manifest(&ct.rootfs, &tops);
    let diff = manifest_diff(&before, &after);
    let console = ct.console_since(console_from);
    assert!(
        diff.is_empty(),
        "a later boot changed /etc or the home:\n{}\n--- console\n{console}",
        diff.join("\n")
    );
    for noise in ["user coder:", "home /home/coder:", "project dir"] {
        assert!(
            !console.contains(noise),
            "a later boot logged {noise:?} (a change or warning):\n{console}"
        );
    }
    if let Some(s) = &host_server {
        assert!(s.downloads() >= 1, "the agent was never downloaded");
        assert!(s.other_requests().is_empty(), "{:?}", s.other_requests());
    }
    println!(
        "{}: {} boots; {} paths of /etc and the home unchanged after the first",
        ct.name,
        starts,
        after.len()
    );
}

#[test]
fn rootfs_template_privileged() {
    run_case("pve-rootfs", Template::Rootfs, false);
}

#[test]
fn rootfs_template_unprivileged() {
    run_case("pve-rootfs-u", Template::Rootfs, true);
}

#[test]
fn oci_archive_privileged() {
    run_case("pve-oci", Template::Oci, false);
}

#[test]
fn oci_archive_unprivileged() {
    run_case("pve-oci-u", Template::Oci, true);
}

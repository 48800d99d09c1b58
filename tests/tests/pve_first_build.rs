//! The Coder workspace connects on its first build, on both Proxmox routes.
//!
//! `docs/examples/coder-proxmox/pve-oci-env.sh` (what `main.tf` runs on the OCI route) is run
//! against a local stand-in of the Proxmox VE API (`hakim_e2e::pve_api`, 127.0.0.1, an
//! ephemeral port) that records every call and replays pve-container's rules for `env` from
//! `hakim_e2e::pve`: the `env` given at creation is replaced by an OCI image's Env (kept for a
//! rootfs template), a `PUT …/config` of `env` applies at once to a stopped container and waits
//! in `[pve:pending]` on a running one, and a start turns `env` into the init's
//! `lxc.environment.runtime` lines. The first start's lines then boot the static hakim-init
//! (`ci/build-init.sh`) in a real LXC container with the image's `/etc/hakim/image.env`, and
//! the fake Coder agent must start with `CODER_AGENT_URL`/`CODER_AGENT_TOKEN`.
//!
//! * [`oci_route_script_sets_env_before_the_first_start`]: create stopped (as the bpg provider
//!   does with `started = false`) → the script → exactly create, `PUT config`, `start` change
//!   anything; the `PUT` body is form-encoded with `%00` between entries; the first start
//!   hands hakim-init the agent's variables plus the image's Env, and the agent connects.
//! * [`oci_route_without_the_script_never_gets_the_token`] (the negative, today's path): create
//!   with `env` and `start=1` → the first start lacks the token; hakim-init starts no agent and
//!   logs the one-line hint naming the OCI route and `docs/proxmox.md#first-build`.
//! * [`rootfs_route_keeps_the_creation_env`]: the default route needs no script.
//! * [`oci_route_stop_start_and_rebuilds`]: Coder's transitions — a re-run changes nothing, stop
//!   shuts down without touching `env`, every new build's token is written before its start
//!   (running → shutdown, `PUT`, start), a variable dropped from the template disappears, the
//!   image's Env stays.
//! * [`script_failures_are_clear_and_secret_free`], [`tls_options_reach_curl`],
//!   [`script_runs_under_busybox_sh`] (Coder's provisioner image is Alpine: busybox sh, awk,
//!   sed).
//! * [`terraform_runs_the_script_without_showing_a_secret`]: `main.tf`'s own `terraform_data`
//!   block run by Terraform's `local-exec` (when a `terraform` binary is installed), in a
//!   network namespace with nothing but loopback.
//!
//! In every run: neither the agent token nor the API token appears in the script's output or in
//! any curl command line (a wrapper records curl's argv), and every request carried
//! `Authorization: PVEAPIToken=USER@REALM!TOKENID=SECRET`.
//!
//! Never run against a real Proxmox VE host: the API's answers, pvedaemon's error format, the
//! task status polling and the permission names are taken from pve-manager/pve-container
//! sources; LXC here is 5.0 (`lxc.environment`, which gives init the same environment as
//! LXC 6's `lxc.environment.runtime`); the bpg and coder providers and Coder's provisioner
//! never ran: their part of `main.tf` is checked by parsing (`tests/tests/docs.rs`), and the
//! Terraform run here stands variables in for what they would give the `terraform_data`.
//!
//! Gating: `sh` and `curl` for the script tests; root and LXC for the boots (`skipping: …`
//! unless `HAKIM_E2E=1`); the Terraform test also needs root, `unshare`, `nsenter`, `ip`, and
//! skips without `terraform` even with `HAKIM_E2E=1` (nothing installs it).

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use hakim_e2e::lxc::{
    binaries, build_rootfs, check_agent_start, graceful_stop, AgentExpect, AgentServer, Container,
    Net, RootfsOptions, BOOT_TIMEOUT, RECORD, SIGTERM,
};
use hakim_e2e::pve::{self, OciContainer};
use hakim_e2e::pve_api::{in_netns, request, Call, PveApi};
use hakim_e2e::{find_on_path, gate, workspace_root};
use serde_json::json;

const SCRIPT: &str = "docs/examples/coder-proxmox/pve-oci-env.sh";
const API_TOKEN: &str = "coder@pve!terraform=5e1c3a2b-9d7e-4c1f-8a6b-0f2d4e6a8c0e";
const API_SECRET: &str = "5e1c3a2b-9d7e-4c1f-8a6b-0f2d4e6a8c0e";
const TOKEN_1: &str = "0d6f1c2e-7b3a-4e59-a1c8-93f5d2b7e604";
const TOKEN_2: &str = "7a1e9b40-2c6d-4f83-b5e2-1d9c0a4f6e37";
const TOKEN_3: &str = "c3b8f5d1-6e2a-4b97-8d10-5f7e2a9c4b68";
const TOKEN_4: &str = "e9d27a6c-41b5-4f0e-9c83-2b6a7d1f5e90";
const NODE: &str = "pve";
const VMID: u32 = 123;
const OCI_TEMPLATE: &str = "local:vztmpl/hakim-ws.tar";
const ROOTFS_TEMPLATE: &str = "local:vztmpl/coder-ws-hakim-base-trixie-amd64.tar.zst";
/// What the image's config carries in `Env` (hakim-convert keeps it there and in
/// `/etc/hakim/image.env`).
const IMAGE_ENV: &[(&str, &str)] = &[
    (
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ),
    ("LANG", "C.UTF-8"),
    ("HAKIM_IMAGE", "first-build"),
    ("QUOTED", r#"say "hi" \ there"#),
];

// ---------------------------------------------------------------------------------------------
// Gates and fixtures
// ---------------------------------------------------------------------------------------------

fn script_ready() -> bool {
    let missing: Vec<String> = ["sh", "curl"]
        .iter()
        .filter(|t| find_on_path(t).is_none())
        .map(|t| t.to_string())
        .collect();
    gate(&missing)
}

fn lxc_ready() -> bool {
    hakim_e2e::lxc::ready()
}

fn image() -> OciContainer {
    let env: Vec<String> = IMAGE_ENV.iter().map(|(k, v)| format!("{k}={v}")).collect();
    pve::oci_container(&json!({
        "Entrypoint": ["/usr/local/sbin/hakim-init"], "Cmd": [],
        "Env": env, "StopSignal": "SIGTERM",
    }))
}

fn image_entries() -> Vec<String> {
    IMAGE_ENV.iter().map(|(k, v)| format!("{k}={v}")).collect()
}

/// What the template puts into the container (main.tf's `local.workspace_env`), plus the fake
/// agent's record path.
fn template_env(url: &str, token: &str) -> Vec<(String, String)> {
    [
        ("CODER_AGENT_URL", url),
        ("CODER_AGENT_TOKEN", token),
        ("CODER_USER", "coder"),
        ("START_DOCKER_DAEMON", "1"),
        ("START_XVFB", "0"),
        ("FAKE_CODER_RECORD", RECORD),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn env_lines(vars: &[(String, String)]) -> String {
    vars.iter()
        .map(|(k, v)| format!("{k}={v}\n"))
        .collect::<String>()
}

/// The bpg provider's create call: `start=0` for `started = false`; `env` sorted by name and
/// NUL-joined as the provider encodes `environment_variables`.
fn provider_create(api: &PveApi, template: &str, env: Option<&[(String, String)]>, start: bool) {
    provider_create_at(api.port, template, env, start);
}

fn provider_create_at(port: u16, template: &str, env: Option<&[(String, String)]>, start: bool) {
    let joined = env.map(|vars| {
        let mut sorted: Vec<String> = vars.iter().map(|(k, v)| format!("{k}={v}")).collect();
        sorted.sort();
        pve::env_option(sorted)
    });
    let vmid = VMID.to_string();
    let mut form = vec![
        ("vmid", vmid.as_str()),
        ("ostemplate", template),
        ("hostname", "alice-ws"),
        ("unprivileged", "1"),
        ("start", if start { "1" } else { "0" }),
    ];
    if let Some(env) = &joined {
        form.push(("env", env));
    }
    let (status, body) = request(
        port,
        API_TOKEN,
        "POST",
        &format!("/nodes/{NODE}/lxc"),
        &form,
    );
    assert_eq!(status, 200, "create: {body}");
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Shell {
    /// The host's /bin/sh (dash on Debian) and tools.
    Host,
    /// busybox sh, awk, sed, … only (Alpine, as in Coder's provisioner image).
    Busybox,
}

/// One run of the script.
struct Run {
    out: Output,
    /// Every curl command line, one per line.
    curl_argv: String,
}

impl Run {
    fn ok(&self) -> bool {
        self.out.status.success()
    }
    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.out.stderr).into_owned()
    }
    fn show(&self) -> String {
        format!(
            "status {}\n--- stdout\n{}\n--- stderr\n{}",
            self.out.status,
            String::from_utf8_lossy(&self.out.stdout),
            self.stderr()
        )
    }
    /// No secret in the output or in any curl command line.
    fn assert_no_secret(&self, secrets: &[&str]) {
        let text = format!(
            "{}{}{}",
            String::from_utf8_lossy(&self.out.stdout),
            self.stderr(),
            self.curl_argv
        );
        for s in secrets.iter().chain([&API_TOKEN, &API_SECRET]) {
            assert!(
                !text.contains(s),
                "a secret ({}…) appears in the script's output or a curl command line:\n{}\n--- curl\n{}",
                &s[..6],
                self.show(),
                self.curl_argv
            );
        }
    }
}

/// Runs the script with a clean environment: `PVE_API_URL`, `PVE_API_TOKEN`, `PVE_NODE`,
/// `PVE_VMID`, `PVE_TRANSITION=start`, then `vars` (a `None` value removes the variable).
fn run_script(api_url: &str, vars: &[(&str, Option<String>)], shell: Shell) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    fs::create_dir(&bin).unwrap();
    let log = dir.path().join("curl-argv");
    let curl = find_on_path("curl").expect("curl");
    let wrapper = bin.join("curl");
    fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nprintf '%s\\n' \"$*\" >>'{}'\nexec '{}' \"$@\"\n",
            log.display(),
            curl.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755)).unwrap();
    let mut env: BTreeMap<String, String> = [
        ("PVE_API_URL", api_url.to_string()),
        ("PVE_API_TOKEN", API_TOKEN.to_string()),
        ("PVE_NODE", NODE.to_string()),
        ("PVE_VMID", VMID.to_string()),
        ("PVE_TRANSITION", "start".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    for (k, v) in vars {
        match v {
            Some(v) => env.insert(k.to_string(), v.clone()),
            None => env.remove(*k),
        };
    }
    let script = workspace_root().join(SCRIPT);
    let mut cmd = match shell {
        Shell::Host => {
            env.insert("PATH".into(), format!("{}:/usr/bin:/bin", bin.display()));
            let mut c = Command::new("sh");
            c.arg(&script);
            c
        }
        Shell::Busybox => {
            let busybox = find_on_path("busybox").expect("busybox");
            for applet in [
                "sh", "awk", "sed", "tr", "grep", "cut", "mktemp", "cmp", "cat", "rm", "sleep",
                "printf",
            ] {
                std::os::unix::fs::symlink(&busybox, bin.join(applet)).unwrap();
            }
            env.insert("PATH".into(), bin.display().to_string());
            let mut c = Command::new(&busybox);
            c.arg("sh").arg(&script);
            c
        }
    };
    cmd.env_clear()
        .envs(&env)
        .env("TMPDIR", dir.path())
        .stdin(Stdio::null());
    let out = cmd.output().expect("run the script");
    // The script removes its temporary directory whatever happens.
    let left: Vec<String> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "bin" && n != "curl-argv")
        .collect();
    assert!(left.is_empty(), "the script left {left:?} in TMPDIR");
    Run {
        out,
        curl_argv: fs::read_to_string(&log).unwrap_or_default(),
    }
}

fn start_run(api: &PveApi, env: &[(String, String)], shell: Shell) -> Run {
    run_script(&api.url(), &[("PVE_CT_ENV", Some(env_lines(env)))], shell)
}

/// The calls that change anything (not GET), as `METHOD /path`.
fn changes(calls: &[Call]) -> Vec<String> {
    calls
        .iter()
        .filter(|c| c.method != "GET")
        .map(Call::line)
        .collect()
}

fn ct_path(rest: &str) -> String {
    format!("/nodes/{NODE}/lxc/{VMID}{rest}")
}

/// The `env` of a `PUT …/config` call, split into entries.
fn put_env(call: &Call) -> Vec<String> {
    let env = call.param("env").expect("PUT without env");
    String::from_utf8(env.to_vec())
        .unwrap()
        .split('\0')
        .map(str::to_string)
        .collect()
}

fn get<'a>(lines: &'a [(String, String)], name: &str) -> Option<&'a str> {
    lines
        .iter()
        .rev()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

// ---------------------------------------------------------------------------------------------
// Booting hakim-init with the replayed first start
// ---------------------------------------------------------------------------------------------

/// A container whose root holds busybox, hakim-init, the image's `/etc/hakim/image.env`, and
/// whose LXC config is Proxmox's for the image with `lines` as the init environment.
fn container(test: &str, lines: &[(String, String)]) -> Container {
    let ct = Container::new(test);
    build_rootfs(&ct.rootfs, binaries(), &RootfsOptions::default());
    fs::create_dir_all(ct.rootfs.join("etc/hakim")).unwrap();
    let mut image_env = String::from("# The source image's Env, written by hakim-convert.\n");
    for e in image_entries() {
        image_env.push_str(&e);
        image_env.push('\n');
    }
    fs::write(ct.rootfs.join("etc/hakim/image.env"), image_env).unwrap();
    let mut cfg = pve::oci_lxc_config(&image(), &[], Net::Host, None);
    cfg.env = lines.to_vec();
    ct.configure(&cfg);
    ct
}

/// Boots the first start's environment; the agent must connect with `token`.
fn boot_and_expect_agent(
    test: &str,
    lines: &[(String, String)],
    server: &AgentServer,
    token: &str,
) {
    let ct = container(test, lines);
    let took = ct.boot(1);
    println!("{test}: agent started {took:.3} s after lxc-start");
    let expect = AgentExpect {
        url: server.url(),
        token: token.into(),
        groups: vec![999, 1000],
        env: vec![
            ("HAKIM_IMAGE".to_string(), "first-build".to_string()),
            ("LANG".to_string(), "C.UTF-8".to_string()),
        ],
    };
    check_agent_start(&ct, &ct.start_record(1), &expect);
    assert!(server.downloads() >= 1, "the agent was never downloaded");
    let console = ct.console();
    assert!(
        !console.contains("no Coder agent configured"),
        "hint logged although the agent is configured:\n{console}"
    );
    graceful_stop(&ct, 0, &[SIGTERM], 1);
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn oci_route_script_sets_env_before_the_first_start() {
    if !script_ready() {
        return;
    }
    let boot = lxc_ready();
    let _serial = boot.then(hakim_e2e::lxc::serial);
    let server = boot.then(|| AgentServer::on_host(binaries().fake_coder_bytes()));
    let url = server
        .as_ref()
        .map(|s| s.url())
        .unwrap_or_else(|| "https://coder.example.com/".into());
    let api = PveApi::start(API_TOKEN);
    api.add_image(OCI_TEMPLATE, image());
    let wanted = template_env(&url, TOKEN_1);

    // The provider creates the container stopped (its `env` is not even sent on this route).
    provider_create(&api, OCI_TEMPLATE, None, false);
    let t = Instant::now();
    let run = start_run(&api, &wanted, Shell::Host);
    let took = t.elapsed();
    assert!(run.ok(), "{}", run.show());
    run.assert_no_secret(&[TOKEN_1]);

    let calls = api.calls();
    assert!(
        calls.iter().all(|c| c.authorized),
        "a request without the right Authorization header: {:?}",
        calls
            .iter()
            .filter(|c| !c.authorized)
            .map(Call::line)
            .collect::<Vec<_>>()
    );
    assert_eq!(
        changes(&calls),
        [
            format!("POST /nodes/{NODE}/lxc"),
            format!("PUT {}", ct_path("/config")),
            format!("POST {}", ct_path("/status/start")),
        ],
        "the three calls that change anything"
    );
    // The PUT: form-encoded, NUL as %00, the image's Env first, then the template's, then the
    // list of the template's names; the config's digest guards against concurrent changes.
    let put = calls.iter().find(|c| c.method == "PUT").unwrap();
    let raw = String::from_utf8_lossy(&put.body);
    assert!(raw.starts_with("env=") || raw.contains("&env="), "{raw}");
    assert_eq!(
        raw.matches("%00").count(),
        IMAGE_ENV.len() + wanted.len(),
        "{raw}"
    );
    assert!(
        put.param("digest").is_some(),
        "PUT without the config's digest"
    );
    let mut expected = image_entries();
    expected.extend(wanted.iter().map(|(k, v)| format!("{k}={v}")));
    let names: Vec<&str> = wanted.iter().map(|(k, _)| k.as_str()).collect();
    expected.push(format!("HAKIM_TEMPLATE_VARS={}", names.join(",")));
    assert_eq!(put_env(put), expected);
    // The task of the start was waited for.
    let task_looks = calls
        .iter()
        .filter(|c| c.path.starts_with(&format!("/nodes/{NODE}/tasks/UPID")))
        .count();
    assert!(
        task_looks >= 2,
        "the start task was not waited for: {task_looks} looks"
    );

    // What the first start hands hakim-init.
    let ct = api.ct(VMID);
    assert!(ct.running);
    assert_eq!(ct.starts.len(), 1);
    let first = &ct.starts[0];
    assert_eq!(first[0], ("TERM".to_string(), "linux".to_string()));
    assert_eq!(get(first, "CODER_AGENT_URL"), Some(url.as_str()));
    assert_eq!(get(first, "CODER_AGENT_TOKEN"), Some(TOKEN_1));
    for (k, v) in IMAGE_ENV {
        assert_eq!(get(first, k), Some(*v), "image Env {k}");
    }
    println!(
        "script: {} calls ({} changing) in {:.2} s",
        calls.len() - 1,
        changes(&calls).len() - 1,
        took.as_secs_f64()
    );

    if let Some(server) = &server {
        boot_and_expect_agent("pve-fb-oci", first, server, TOKEN_1);
    }
}

#[test]
fn oci_route_without_the_script_never_gets_the_token() {
    let boot = lxc_ready();
    let _serial = boot.then(hakim_e2e::lxc::serial);
    let api = PveApi::start(API_TOKEN);
    api.add_image(OCI_TEMPLATE, image());
    let wanted = template_env("http://127.0.0.1:9/", TOKEN_1);
    // Today's path: environment_variables at creation, started = true.
    provider_create(&api, OCI_TEMPLATE, Some(&wanted), true);
    let ct = api.ct(VMID);
    let first = &ct.starts[0];
    assert_eq!(get(first, "CODER_AGENT_TOKEN"), None, "{first:?}");
    assert_eq!(get(first, "CODER_AGENT_URL"), None, "{first:?}");
    assert_eq!(get(first, "HAKIM_IMAGE"), Some("first-build"), "{first:?}");
    if !boot {
        return;
    }
    // hakim-init starts no agent and says why, in one line.
    let ct = container("pve-fb-neg", first);
    ct.start().unwrap_or_else(|e| panic!("{e}"));
    let mut hint = None;
    ct.wait_for("the no-agent hint", BOOT_TIMEOUT, || {
        hint = ct
            .console()
            .lines()
            .find(|l| l.contains("no Coder agent configured"))
            .map(str::to_string);
        hint.is_some()
    });
    let hint = hint.unwrap();
    for want in [
        "OCI route",
        "docs/proxmox.md#first-build",
        "replaces the env",
    ] {
        assert!(hint.contains(want), "hint lacks {want:?}: {hint}");
    }
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        ct.agent_starts(),
        0,
        "an agent started:\n{}",
        ct.diagnostics()
    );
    let console = ct.console();
    assert_eq!(
        console.matches("no Coder agent configured").count(),
        1,
        "one line, once:\n{console}"
    );
    println!("{}: {hint}", ct.name);
    let stopped = ct.stop(&["-t", "10"]);
    assert!(stopped.status.success(), "{}", stopped.output);
}

#[test]
fn rootfs_route_keeps_the_creation_env() {
    let boot = lxc_ready();
    let _serial = boot.then(hakim_e2e::lxc::serial);
    let server = boot.then(|| AgentServer::on_host(binaries().fake_coder_bytes()));
    let url = server
        .as_ref()
        .map(|s| s.url())
        .unwrap_or_else(|| "https://coder.example.com".into());
    let api = PveApi::start(API_TOKEN);
    api.add_rootfs_template(ROOTFS_TEMPLATE);
    let wanted = template_env(&url, TOKEN_1);
    provider_create(&api, ROOTFS_TEMPLATE, Some(&wanted), true);
    assert_eq!(changes(&api.calls()), [format!("POST /nodes/{NODE}/lxc")]);
    let ct = api.ct(VMID);
    let first = &ct.starts[0];
    assert_eq!(get(first, "CODER_AGENT_TOKEN"), Some(TOKEN_1));
    assert_eq!(get(first, "CODER_AGENT_URL"), Some(url.as_str()));
    if let Some(server) = &server {
        boot_and_expect_agent("pve-fb-rootfs", first, server, TOKEN_1);
    }
}

#[test]
fn oci_route_stop_start_and_rebuilds() {
    if !script_ready() {
        return;
    }
    let api = PveApi::start(API_TOKEN);
    api.add_image(OCI_TEMPLATE, image());
    let url = "https://coder.example.com/";
    provider_create(&api, OCI_TEMPLATE, None, false);
    let build1 = template_env(url, TOKEN_1);
    let run = start_run(&api, &build1, Shell::Host);
    assert!(run.ok(), "{}", run.show());
    let mark = |api: &PveApi| api.calls().len();

    // The same build again (a retried apply): running with this env, nothing changes.
    let from = mark(&api);
    let run = start_run(&api, &build1, Shell::Host);
    assert!(run.ok(), "{}", run.show());
    assert!(run.stderr().contains("nothing to do"), "{}", run.show());
    assert!(
        changes(&api.calls()[from..]).is_empty(),
        "{:?}",
        changes(&api.calls()[from..])
    );

    // A stop build: shut down (forced after the timeout), env untouched; again: nothing.
    let from = mark(&api);
    let stop = [
        ("PVE_TRANSITION", Some("stop".to_string())),
        ("PVE_CT_ENV", Some(env_lines(&template_env(url, TOKEN_2)))),
    ];
    let run = run_script(&api.url(), &stop, Shell::Host);
    assert!(run.ok(), "{}", run.show());
    run.assert_no_secret(&[TOKEN_2]);
    assert_eq!(
        changes(&api.calls()[from..]),
        [format!("POST {}", ct_path("/status/shutdown"))]
    );
    let ct = api.ct(VMID);
    assert!(!ct.running);
    assert_eq!(ct.shutdowns, [(Some("60".into()), Some("1".into()))]);
    assert!(!ct.env.current.as_deref().unwrap().contains(TOKEN_2));
    let from = mark(&api);
    let run = run_script(&api.url(), &stop, Shell::Host);
    assert!(
        run.ok() && run.stderr().contains("already stopped"),
        "{}",
        run.show()
    );
    assert!(changes(&api.calls()[from..]).is_empty());

    // The next start build brings a new token, drops START_XVFB and adds a value with blanks,
    // '&', '%', '+', a tab and non-ASCII text: PUT while stopped, then start.
    let mut build3: Vec<(String, String)> = template_env(url, TOKEN_3)
        .into_iter()
        .filter(|(k, _)| k != "START_XVFB")
        .collect();
    build3.push(("GREETING".into(), "a b&c=d%e+f\tcafé".into()));
    let from = mark(&api);
    let run = start_run(&api, &build3, Shell::Host);
    assert!(run.ok(), "{}", run.show());
    run.assert_no_secret(&[TOKEN_1, TOKEN_3]);
    assert_eq!(
        changes(&api.calls()[from..]),
        [
            format!("PUT {}", ct_path("/config")),
            format!("POST {}", ct_path("/status/start")),
        ]
    );
    let ct = api.ct(VMID);
    let second = ct.starts.last().unwrap();
    assert_eq!(ct.starts.len(), 2);
    assert_eq!(get(second, "CODER_AGENT_TOKEN"), Some(TOKEN_3));
    assert_eq!(get(second, "GREETING"), Some("a b&c=d%e+f\tcafé"));
    assert_eq!(get(second, "START_XVFB"), None, "a dropped variable stayed");
    for (k, v) in IMAGE_ENV {
        assert_eq!(get(second, k), Some(*v), "image Env {k} lost");
    }
    let tokens = second
        .iter()
        .filter(|(k, _)| k == "CODER_AGENT_TOKEN")
        .count();
    assert_eq!(tokens, 1, "{second:?}");

    // A start build while the container runs (started by hand in between): the running
    // instance has another token, so shutdown, PUT, start.
    let build4 = template_env(url, TOKEN_2);
    let from = mark(&api);
    let run = start_run(&api, &build4, Shell::Host);
    assert!(run.ok(), "{}", run.show());
    assert_eq!(
        changes(&api.calls()[from..]),
        [
            format!("POST {}", ct_path("/status/shutdown")),
            format!("PUT {}", ct_path("/config")),
            format!("POST {}", ct_path("/status/start")),
        ]
    );
    let ct = api.ct(VMID);
    assert_eq!(
        get(ct.starts.last().unwrap(), "CODER_AGENT_TOKEN"),
        Some(TOKEN_2)
    );
    assert_eq!(get(ct.starts.last().unwrap(), "GREETING"), None);
    assert!(ct.running);
    assert_eq!(ct.env.pending, None);
}

#[test]
fn script_failures_are_clear_and_secret_free() {
    if !script_ready() {
        return;
    }
    let api = PveApi::start(API_TOKEN);
    api.add_image(OCI_TEMPLATE, image());
    provider_create(&api, OCI_TEMPLATE, None, false);
    let env = Some(env_lines(&template_env(
        "https://coder.example.com",
        TOKEN_1,
    )));
    let fails = |vars: &[(&str, Option<String>)], url: &str, want: &[&str]| {
        let mut all = vec![("PVE_CT_ENV", env.clone())];
        all.extend(vars.iter().cloned());
        let run = run_script(url, &all, Shell::Host);
        assert!(!run.ok(), "succeeded:\n{}", run.show());
        run.assert_no_secret(&[TOKEN_1, "other-secret-value"]);
        let err = run.stderr();
        for w in want {
            assert!(err.contains(w), "stderr lacks {w:?}:\n{err}");
        }
        assert!(err.lines().count() <= 3, "not a short reason:\n{err}");
        println!("{}", err.trim_end());
    };
    let url = api.url();
    // Another token: 401 with a hint; the wrong secret is not printed either.
    fails(
        &[(
            "PVE_API_TOKEN",
            Some("coder@pve!terraform=other-secret-value".into()),
        )],
        &url,
        &["HTTP 401", "authentication failure", "PVE_API_TOKEN"],
    );
    // Malformed inputs are refused before any call.
    let before = api.calls().len();
    fails(
        &[("PVE_API_TOKEN", Some("other-secret-value".into()))],
        &url,
        &["USER@REALM!TOKENID=SECRET"],
    );
    fails(&[("PVE_VMID", Some("12a".into()))], &url, &["PVE_VMID"]);
    fails(
        &[("PVE_TRANSITION", Some("restart".into()))],
        &url,
        &["start or stop"],
    );
    fails(
        &[("PVE_API_TOKEN", None)],
        &url,
        &["PVE_API_TOKEN is not set"],
    );
    assert_eq!(api.calls().len(), before, "calls made despite bad input");
    fails(
        &[(
            "PVE_CT_ENV",
            Some(format!("CODER_AGENT_TOKEN={TOKEN_1}\nnot a variable\n")),
        )],
        &url,
        &["PVE_CT_ENV line 2"],
    );
    // A failed start task.
    api.fail_next_start("startup for container '123' failed");
    fails(
        &[],
        &url,
        &[
            "start of CT 123 failed",
            "startup for container '123' failed",
        ],
    );
    // Nothing listening.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://127.0.0.1:{}/", l.local_addr().unwrap().port())
    };
    fails(
        &[],
        &closed,
        &["GET /nodes/pve/lxc/123/status/current", "curl"],
    );
}

#[test]
fn tls_options_reach_curl() {
    if !script_ready() {
        return;
    }
    let api = PveApi::start(API_TOKEN);
    api.add_image(OCI_TEMPLATE, image());
    provider_create(&api, OCI_TEMPLATE, None, false);
    let ca = tempfile::NamedTempFile::new().unwrap();
    let env = Some(env_lines(&template_env(
        "https://coder.example.com",
        TOKEN_1,
    )));
    let run = run_script(
        &api.url(),
        &[
            ("PVE_CT_ENV", env.clone()),
            ("PVE_CA_FILE", Some(ca.path().display().to_string())),
            ("PVE_INSECURE", Some("0".into())),
        ],
        Shell::Host,
    );
    assert!(run.ok(), "{}", run.show());
    for line in run.curl_argv.lines() {
        assert!(
            line.contains(&format!("--cacert {}", ca.path().display())),
            "{line}"
        );
        assert!(!line.contains("--insecure"), "{line}");
        assert!(
            line.contains("--header @"),
            "the token must come from a file: {line}"
        );
    }
    let run = run_script(
        &api.url(),
        &[
            ("PVE_CT_ENV", env.clone()),
            ("PVE_INSECURE", Some("true".into())),
        ],
        Shell::Host,
    );
    assert!(run.ok(), "{}", run.show());
    assert!(
        run.curl_argv.lines().all(|l| l.contains("--insecure")),
        "{}",
        run.curl_argv
    );
    let run = run_script(
        &api.url(),
        &[
            ("PVE_CT_ENV", env),
            ("PVE_CA_FILE", Some("/nonexistent/ca.pem".into())),
        ],
        Shell::Host,
    );
    assert!(
        !run.ok() && run.stderr().contains("PVE_CA_FILE"),
        "{}",
        run.show()
    );
}

#[test]
fn script_runs_under_busybox_sh() {
    if !script_ready() || !gate(&find_on_path("busybox").map_or(vec!["busybox".into()], |_| vec![]))
    {
        return;
    }
    let api = PveApi::start(API_TOKEN);
    api.add_image(OCI_TEMPLATE, image());
    provider_create(&api, OCI_TEMPLATE, None, false);
    let wanted = template_env("https://coder.example.com", TOKEN_1);
    let run = start_run(&api, &wanted, Shell::Busybox);
    assert!(run.ok(), "{}", run.show());
    run.assert_no_secret(&[TOKEN_1]);
    let ct = api.ct(VMID);
    assert_eq!(get(&ct.starts[0], "CODER_AGENT_TOKEN"), Some(TOKEN_1));
    for (k, v) in IMAGE_ENV {
        assert_eq!(get(&ct.starts[0], k), Some(*v), "image Env {k}");
    }
    // A second run reads the env back through busybox awk: nothing to do.
    let run = start_run(&api, &wanted, Shell::Busybox);
    assert!(
        run.ok() && run.stderr().contains("nothing to do"),
        "{}",
        run.show()
    );
}

/// The script is shellcheck-clean (also part of `ci/test.sh`'s shellcheck line).
#[test]
fn script_passes_shellcheck() {
    let Some(sc) = find_on_path("shellcheck") else {
        gate(&["shellcheck".to_string()]);
        return;
    };
    let out = Command::new(sc)
        .arg(workspace_root().join(SCRIPT))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

// ---------------------------------------------------------------------------------------------
// Terraform itself
// ---------------------------------------------------------------------------------------------

/// A network namespace with nothing but loopback, held by a `sleep` this test starts (and
/// kills, by pid, when dropped).
struct Netns {
    child: std::process::Child,
}

impl Netns {
    fn new() -> Netns {
        let child = Command::new("unshare")
            .args([
                "--net",
                "--",
                "sh",
                "-c",
                "ip link set lo up && exec sleep 600",
            ])
            .stdin(Stdio::null())
            .spawn()
            .expect("unshare --net");
        let ns = Netns { child };
        let pid = ns.pid();
        let t = Instant::now();
        while fs::read_to_string(format!("/proc/{pid}/comm"))
            .map(|c| c.trim() != "sleep")
            .unwrap_or(true)
        {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "the namespace never came up"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_ne!(
            fs::read_link(format!("/proc/{pid}/ns/net")).unwrap(),
            fs::read_link("/proc/self/ns/net").unwrap(),
            "not a new network namespace"
        );
        ns
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The lines of `text` from the one starting with `first` to the next line that is exactly
/// `last` (indented as written).
fn lines_between(text: &str, first: &str, last: &str) -> String {
    let mut out = String::new();
    let mut inside = false;
    for line in text.lines() {
        if !inside && line.trim_start().starts_with(first) {
            inside = true;
        }
        if inside {
            out.push_str(line);
            out.push('\n');
            if line == last {
                return out;
            }
        }
    }
    panic!("no block from {first:?} to {last:?}");
}

/// A configuration holding main.tf's own `terraform_data.oci_env` block and its
/// `local.workspace_env`, with what comes from the coder and proxmox providers turned into
/// variables (those providers are not available here).
fn terraform_harness(dir: &Path) {
    let main =
        fs::read_to_string(workspace_root().join("docs/examples/coder-proxmox/main.tf")).unwrap();
    let block = lines_between(&main, "resource \"terraform_data\" \"oci_env\"", "}");
    let env = lines_between(&main, "workspace_env = {", "  }");
    let substitute = |t: &str| {
        t.replace("data.coder_workspace.me.access_url", "var.access_url")
            .replace("data.coder_workspace.me.transition", "var.transition")
            .replace("coder_agent.main.token", "var.agent_token")
    };
    let (block, env) = (substitute(&block), substitute(&env));
    for stale in [
        "data.",
        "coder_agent.",
        "proxmox_virtual_environment_",
        "proxmox_oci_image",
    ] {
        assert!(
            !block.contains(stale) && !env.contains(stale),
            "main.tf's terraform_data refers to {stale}…, which the harness does not stand in for:\n{block}{env}"
        );
    }
    let mut tf = String::new();
    for (name, sensitive) in [
        ("proxmox_endpoint", false),
        ("proxmox_api_token", true),
        ("proxmox_ca_file", false),
        ("node_name", false),
        ("agent_token", true),
        ("transition", false),
        ("access_url", false),
    ] {
        tf.push_str(&format!(
            "variable \"{name}\" {{\n  type      = string\n  sensitive = {sensitive}\n  default   = \"\"\n}}\n"
        ));
    }
    tf.push_str("variable \"proxmox_insecure\" {\n  type    = bool\n  default = false\n}\n");
    tf.push_str(&format!(
        "locals {{\n  oci   = true\n  vm_id = {VMID}\n{env}}}\n{block}"
    ));
    fs::write(dir.join("main.tf"), tf).unwrap();
    fs::copy(workspace_root().join(SCRIPT), dir.join("pve-oci-env.sh")).unwrap();
    fs::write(dir.join("terraformrc"), "").unwrap();
}

/// `terraform ARGS` in `dir`, inside the namespace; (success, stdout + stderr).
fn terraform(ns: &Netns, dir: &Path, args: &[&str], vars: &[(&str, &str)]) -> (bool, String) {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/proc/{}/ns/net", ns.pid()))
        .arg("terraform")
        .arg(format!("-chdir={}", dir.display()))
        .args(args)
        .env("TF_CLI_CONFIG_FILE", dir.join("terraformrc"))
        .env("CHECKPOINT_DISABLE", "1")
        .env("TF_IN_AUTOMATION", "1")
        .env("TF_INPUT", "0")
        .env_remove("TF_LOG")
        .stdin(Stdio::null());
    for (k, v) in vars {
        cmd.env(format!("TF_VAR_{k}"), v);
    }
    let out = cmd.output().expect("run terraform");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// main.tf's `terraform_data.oci_env`, run by Terraform's own `local-exec` (builtin: no
/// provider needed) inside a network namespace that has nothing but loopback: the script
/// runs on the first apply, not again for the same build, again for every new token or
/// transition, and after a failure; Terraform's output — the error of a failed run
/// included, which carries the script's output — never shows a token. Needs the
/// `terraform` binary, which `ci/install-deps.sh` does not install: skipped without it.
#[test]
fn terraform_runs_the_script_without_showing_a_secret() {
    if !script_ready() {
        return;
    }
    if find_on_path("terraform").is_none() {
        println!("skipping: terraform missing (optional; ci/install-deps.sh does not install it)");
        return;
    }
    if !gate(&hakim_e2e::missing_tools_or_root(
        &["unshare", "nsenter", "ip"],
        "a network namespace",
    )) {
        return;
    }
    let ns = Netns::new();
    let api = PveApi::start_in_netns(API_TOKEN, ns.pid());
    api.add_image(OCI_TEMPLATE, image());
    let port = api.port;
    in_netns(ns.pid(), move || {
        provider_create_at(port, OCI_TEMPLATE, None, false)
    });
    let dir = tempfile::tempdir().unwrap();
    terraform_harness(dir.path());
    let (ok, out) = terraform(&ns, dir.path(), &["init", "-no-color"], &[]);
    assert!(ok, "terraform init:\n{out}");
    let url = api.url();
    let apply = |token: &str, transition: &str| {
        let vars = [
            ("proxmox_endpoint", url.as_str()),
            ("proxmox_api_token", API_TOKEN),
            ("node_name", NODE),
            ("agent_token", token),
            ("transition", transition),
            ("access_url", "https://coder.example.com/"),
        ];
        let (ok, out) = terraform(
            &ns,
            dir.path(),
            &["apply", "-auto-approve", "-no-color"],
            &vars,
        );
        for secret in [TOKEN_1, TOKEN_2, TOKEN_3, TOKEN_4, API_TOKEN, API_SECRET] {
            assert!(
                !out.contains(secret),
                "Terraform's output shows a secret ({}…):\n{out}",
                &secret[..6]
            );
        }
        (ok, out)
    };
    let non_get = |from: usize| changes(&api.calls()[from..]);

    let (ok, out) = apply(TOKEN_1, "start");
    assert!(ok, "{out}");
    assert!(
        out.contains("output suppressed due to sensitive value"),
        "{out}"
    );
    let ct = api.ct(VMID);
    assert_eq!(get(&ct.starts[0], "CODER_AGENT_TOKEN"), Some(TOKEN_1));
    println!("terraform --- first apply\n{out}");

    // The same build again: nothing to do for Terraform, no call.
    let from = api.calls().len();
    let (ok, out) = apply(TOKEN_1, "start");
    assert!(ok && out.contains("No changes."), "{out}");
    assert_eq!(
        api.calls().len(),
        from,
        "the script ran again for the same build"
    );

    // A stop build, then a start build with a new token.
    let from = api.calls().len();
    let (ok, out) = apply(TOKEN_2, "stop");
    assert!(ok, "{out}");
    assert_eq!(
        non_get(from),
        [format!("POST {}", ct_path("/status/shutdown"))]
    );
    let (ok, out) = apply(TOKEN_3, "start");
    assert!(ok, "{out}");
    let ct = api.ct(VMID);
    assert!(ct.running);
    assert_eq!(
        get(ct.starts.last().unwrap(), "CODER_AGENT_TOKEN"),
        Some(TOKEN_3)
    );

    // A failed start fails the build with the script's reason, and no secret; the next
    // apply of the same build runs the script again (the resource is tainted).
    api.fail_next_start("startup for container '123' failed");
    let (ok, out) = apply(TOKEN_4, "start");
    assert!(!ok, "{out}");
    assert!(out.contains("start of CT 123 failed"), "{out}");
    println!("terraform --- failed apply\n{out}");
    let (ok, out) = apply(TOKEN_4, "start");
    assert!(ok, "{out}");
    let ct = api.ct(VMID);
    assert_eq!(
        get(ct.starts.last().unwrap(), "CODER_AGENT_TOKEN"),
        Some(TOKEN_4)
    );
}

//! Checks of the user documentation that can fail.
//!
//! * The example Coder template, `docs/examples/coder-proxmox/main.tf`, parses as HCL
//!   (python-hcl2 from PyPI, installed by `ci/install-deps.sh`; a truncated copy must not
//!   parse), every `var.`, `local.`, `data.` and resource reference in it is declared, and it
//!   carries what hakim-init and Proxmox need on both routes (`docs/proxmox.md`, "First
//!   build"): `route` defaults to `rootfs`, where the node downloads the release's template
//!   (`vztmpl`, sha256 checksum from a validated variable) and the container gets
//!   `environment_variables` with `CODER_AGENT_URL` (the workspace's access URL) and
//!   `CODER_AGENT_TOKEN` (a declared `coder_agent`'s token) at creation, `started` following
//!   `start_count`; on `oci` the container from `proxmox_oci_image` is created stopped and
//!   ignores `started` and `environment_variables`, which a `terraform_data` running
//!   `pve-oci-env.sh` (through `/bin/sh`, nothing on its command line, the API token from a
//!   sensitive variable, re-run on every build) sets with the same variables. Both containers
//!   are unprivileged, `host_managed = true` with DHCP, the console on `/dev/console`, and
//!   otherwise identical. No output exposes a secret.
//! * hakim-init's no-agent hint points at an anchor `docs/proxmox.md` has.
//! * The environment table of `docs/proxmox.md` names every variable hakim-init reads
//!   (`init/src`) and every one the example services use (`images/services/*.toml`).
//!
//! Gating: python-hcl2 for the template tests; the others need nothing.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use hakim_e2e::{pytools, workspace_root};
use serde_json::Value;

const TEMPLATE: &str = "docs/examples/coder-proxmox/main.tf";

/// python-hcl2's reading of an HCL file as JSON: `Err(stderr)` when it does not parse.
fn parse_hcl(path: &Path) -> Result<Value, String> {
    let out = Command::new(pytools::bin("python"))
        .args([
            "-c",
            "import hcl2, json, sys\nwith open(sys.argv[1]) as f:\n    json.dump(hcl2.load(f), sys.stdout)",
        ])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .expect("run python-hcl2");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("python-hcl2 printed no JSON: {e}"))
}

/// python-hcl2 keeps string literals quoted (`"\"linux\""`) and wraps expressions in `${…}`;
/// this gives the literal's text, or the expression's source.
fn text(v: &Value) -> String {
    let s = v.as_str().unwrap_or_else(|| panic!("not a string: {v}"));
    if let Some(inner) = s.strip_prefix("${").and_then(|r| r.strip_suffix('}')) {
        inner.to_string()
    } else if let Some(inner) = s.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
        inner.to_string()
    } else {
        s.to_string()
    }
}

/// `{"\"TYPE\"": {"\"NAME\"": body}}` entries of a top-level list (`resource`, `data`) as
/// `(TYPE, NAME, body)`.
fn labelled(doc: &Value, kind: &str) -> Vec<(String, String, Value)> {
    let mut out = Vec::new();
    for entry in doc[kind].as_array().into_iter().flatten() {
        for (ty, named) in entry.as_object().into_iter().flatten() {
            for (name, body) in named.as_object().into_iter().flatten() {
                out.push((
                    text(&Value::from(ty.as_str())),
                    text(&Value::from(name.as_str())),
                    body.clone(),
                ));
            }
        }
    }
    out
}

/// Names declared by the blocks of a top-level list (`variable`, `locals`).
fn declared(doc: &Value, kind: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for entry in doc[kind].as_array().into_iter().flatten() {
        for (name, _) in entry.as_object().into_iter().flatten() {
            if name != "__is_block__" {
                names.insert(text(&Value::from(name.as_str())));
            }
        }
    }
    names
}

/// The only instance of a nested block (`[{…, "__is_block__": true}]`).
fn block<'a>(body: &'a Value, name: &str) -> &'a Value {
    let blocks = body[name]
        .as_array()
        .unwrap_or_else(|| panic!("no `{name}` block in {body}"));
    assert_eq!(blocks.len(), 1, "one `{name}` block expected: {body}");
    &blocks[0]
}

/// Every string anywhere in `v` holding an expression (`${…}`): only those can refer to
/// anything.
fn expressions(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) if s.contains("${") => out.push(s.clone()),
        Value::Array(a) => a.iter().for_each(|x| expressions(x, out)),
        Value::Object(o) => o.values().for_each(|x| expressions(x, out)),
        _ => {}
    }
}

/// `PREFIX.a.b…` references in `s` (identifier chars and dots after `PREFIX.`, not preceded
/// by an identifier char), as the dotted parts after the prefix.
fn references(s: &str, prefix: &str) -> Vec<Vec<String>> {
    let needle = format!("{prefix}.");
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    let mut found = Vec::new();
    for (at, _) in s.match_indices(&needle) {
        if s[..at]
            .chars()
            .next_back()
            .is_some_and(|c| ident(c) || c == '.')
        {
            continue;
        }
        let rest: String = s[at + needle.len()..]
            .chars()
            .take_while(|&c| ident(c) || c == '.')
            .collect();
        found.push(rest.split('.').map(str::to_string).collect());
    }
    found
}

fn template() -> Option<Value> {
    if !pytools::hcl2_ready() {
        return None;
    }
    let path = workspace_root().join(TEMPLATE);
    Some(parse_hcl(&path).unwrap_or_else(|e| panic!("{TEMPLATE} does not parse:\n{e}")))
}

/// The value of `local.NAME` when `v` is exactly that reference, else `v`.
fn resolve_local(doc: &Value, v: &Value) -> Value {
    if let Some(name) = v
        .as_str()
        .map(|_| text(v))
        .and_then(|t| t.strip_prefix("local.").map(str::to_string))
        .filter(|n| n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
    {
        for entry in doc["locals"].as_array().into_iter().flatten() {
            if let Some(value) = entry.get(&name) {
                return value.clone();
            }
        }
        panic!("local.{name} is not declared");
    }
    v.clone()
}

/// `v` without python-hcl2's comment records, recursively.
fn without_comments(v: &Value) -> Value {
    match v {
        Value::Object(o) => Value::Object(
            o.iter()
                .filter(|(k, _)| k.as_str() != "__comments__")
                .map(|(k, x)| (k.clone(), without_comments(x)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(without_comments).collect()),
        other => other.clone(),
    }
}

/// The `ignore_changes` entries of a resource's `lifecycle` block, as written.
fn ignored_changes(body: &Value) -> Vec<String> {
    body["lifecycle"][0]["ignore_changes"]
        .as_array()
        .map(|a| a.iter().map(text).collect())
        .unwrap_or_default()
}

/// Whether `expr` refers to resource `ty.name`.
fn refers_to(expr: &str, ty: &str, name: &str) -> bool {
    references(expr, ty)
        .iter()
        .any(|r| r.first().map(|n| n.trim_end_matches('[')) == Some(name))
}

/// The download resource's names: the provider's short one, and the older one it deprecates.
const DOWNLOAD_TYPES: [&str; 2] = [
    "proxmox_download_file",
    "proxmox_virtual_environment_download_file",
];

#[test]
fn coder_template_wires_agent_and_container() {
    let Some(doc) = template() else { return };
    let resources = labelled(&doc, "resource");
    let data = labelled(&doc, "data");
    let of_type = |ty: &str| -> Vec<(String, Value)> {
        resources
            .iter()
            .filter(|(t, _, _)| t == ty)
            .map(|(_, n, b)| (n.clone(), b.clone()))
            .collect()
    };
    let variable = |name: &str| -> Value {
        doc["variable"]
            .as_array()
            .into_iter()
            .flatten()
            .find_map(|v| {
                v.get(format!("\"{name}\""))
                    .or_else(|| v.get(name))
                    .cloned()
            })
            .unwrap_or_else(|| panic!("variable {name} is not declared"))
    };

    // Providers.
    let providers = doc["terraform"][0]["required_providers"][0].clone();
    assert_eq!(
        text(&providers["proxmox"]["source"]),
        "bpg/proxmox",
        "{providers}"
    );
    assert_eq!(
        text(&providers["coder"]["source"]),
        "coder/coder",
        "{providers}"
    );

    // The agent.
    let agents = of_type("coder_agent");
    assert_eq!(agents.len(), 1, "one coder_agent: {agents:?}");
    let (agent, agent_body) = &agents[0];
    assert_eq!(text(&agent_body["os"]), "linux");
    let agent_token = format!("coder_agent.{agent}.token");

    // The route: rootfs by default.
    let route = variable("route");
    assert_eq!(
        text(&route["default"]),
        "rootfs",
        "route's default: {route}"
    );
    let oci_local = doc["locals"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|l| l.get("oci"))
        .map(text)
        .expect("local.oci");
    assert_eq!(oci_local, "var.route == \"oci\"");
    let on_oci = "local.oci ? 1 : 0";
    let on_rootfs = "local.oci ? 0 : 1";

    // rootfs route: the node downloads the release's template, checked against its sha256.
    let downloads: Vec<(String, String, Value)> = resources
        .iter()
        .filter(|(t, _, _)| DOWNLOAD_TYPES.contains(&t.as_str()))
        .cloned()
        .collect();
    assert_eq!(downloads.len(), 1, "one download resource: {downloads:?}");
    let (download_type, download, dl) = &downloads[0];
    assert_eq!(text(&dl["content_type"]), "vztmpl");
    assert_eq!(text(&dl["checksum_algorithm"]), "sha256");
    for attr in ["url", "checksum"] {
        let expr = text(&dl[attr]);
        assert!(
            !references(&expr, "var").is_empty(),
            "{download_type}.{attr} must come from a variable: {expr}"
        );
    }
    let checksum_var = &references(&text(&dl["checksum"]), "var")[0][0];
    assert!(
        variable(checksum_var)["validation"].is_array(),
        "var.{checksum_var} must be validated as a sha256"
    );
    for attr in ["node_name", "datastore_id", "file_name"] {
        assert!(dl.get(attr).is_some(), "{download_type}.{attr} missing");
    }
    assert!(
        text(&dl["count"]).contains("local.download"),
        "the download happens on the rootfs route only: {}",
        dl["count"]
    );

    // oci route: the node pulls the image.
    let images = of_type("proxmox_oci_image");
    assert_eq!(images.len(), 1, "one proxmox_oci_image");
    let (image, image_body) = &images[0];
    for attr in ["node_name", "datastore_id", "reference"] {
        assert!(
            image_body.get(attr).is_some(),
            "proxmox_oci_image.{attr} missing"
        );
    }
    assert_eq!(text(&image_body["count"]), on_oci);

    // The containers: one per route.
    let containers = of_type("proxmox_virtual_environment_container");
    assert_eq!(containers.len(), 2, "a container per route");
    let template_of = |ct: &Value| text(&block(ct, "operating_system")["template_file_id"]);
    let (rootfs_name, rootfs) = containers
        .iter()
        .find(|(_, ct)| refers_to(&template_of(ct), download_type, download))
        .unwrap_or_else(|| panic!("no container from {download_type}.{download}"));
    let (oci_name, oci) = containers
        .iter()
        .find(|(_, ct)| refers_to(&template_of(ct), "proxmox_oci_image", image))
        .unwrap_or_else(|| panic!("no container from proxmox_oci_image.{image}"));
    assert_eq!(text(&rootfs["count"]), on_rootfs);
    assert_eq!(text(&oci["count"]), on_oci);
    for ct in [rootfs, oci] {
        assert_eq!(ct["unprivileged"], Value::Bool(true), "unprivileged = true");
        let nics = ct["network_interface"]
            .as_array()
            .expect("network_interface blocks");
        assert!(!nics.is_empty(), "no network_interface");
        for nic in nics {
            assert_eq!(
                nic["host_managed"],
                Value::Bool(true),
                "host_managed = true: {nic}"
            );
        }
        let ipv4 = block(block(block(ct, "initialization"), "ip_config"), "ipv4");
        assert_eq!(
            text(&ipv4["address"]),
            "dhcp",
            "the host runs DHCP for host-managed NICs"
        );
        assert_eq!(
            text(&block(ct, "console")["type"]),
            "console",
            "console.type"
        );
        assert!(
            ignored_changes(ct).contains(&"operating_system[0].template_file_id".to_string()),
            "a new template must not replace a workspace: {:?}",
            ignored_changes(ct)
        );
    }
    // Apart from what the route decides, the two are the same container.
    let shared = |ct: &Value| {
        let mut v = without_comments(ct);
        let o = v.as_object_mut().unwrap();
        for k in ["count", "started", "environment_variables", "lifecycle"] {
            o.remove(k);
        }
        o["operating_system"][0]
            .as_object_mut()
            .unwrap()
            .remove("template_file_id");
        v
    };
    assert_eq!(
        shared(rootfs),
        shared(oci),
        "{rootfs_name} and {oci_name} differ in more than the route's attributes"
    );

    // rootfs route: started follows the workspace's transition; the env is given at creation.
    assert!(
        references(&text(&rootfs["started"]), "data")
            .iter()
            .any(|r| r.len() == 3 && r[0] == "coder_workspace" && r[2] == "start_count"),
        "started must follow start_count: {}",
        rootfs["started"]
    );
    let env = resolve_local(&doc, &rootfs["environment_variables"]);
    let env = env.as_object().expect("environment_variables is a map");
    let url = text(env.get("CODER_AGENT_URL").expect("CODER_AGENT_URL"));
    assert!(
        references(&url, "data")
            .iter()
            .any(|r| r.len() == 3 && r[0] == "coder_workspace" && r[2] == "access_url"),
        "CODER_AGENT_URL must be data.coder_workspace.*.access_url: {url}"
    );
    let token = text(env.get("CODER_AGENT_TOKEN").expect("CODER_AGENT_TOKEN"));
    assert_eq!(token, agent_token, "CODER_AGENT_TOKEN");

    // oci route: created stopped, env and run state left to the script.
    assert_eq!(oci["started"], Value::Bool(false), "created stopped");
    assert!(
        oci.get("environment_variables").is_none(),
        "Proxmox would replace it at creation"
    );
    let ignored = ignored_changes(oci);
    for attr in ["started", "environment_variables"] {
        assert!(
            ignored.contains(&attr.to_string()),
            "{oci_name} must ignore {attr}: {ignored:?}"
        );
    }

    // The script run on every build of the oci route.
    let runs = of_type("terraform_data");
    assert_eq!(runs.len(), 1, "one terraform_data");
    let (_, run) = &runs[0];
    assert_eq!(text(&run["count"]), on_oci);
    let triggers: Vec<String> = run["triggers_replace"]
        .as_array()
        .expect("triggers_replace list")
        .iter()
        .map(text)
        .collect();
    for want in [agent_token.as_str(), "data.coder_workspace.me.transition"] {
        assert!(
            triggers.iter().any(|t| t == want),
            "a new build ({want}) must run the script again: {triggers:?}"
        );
    }
    let exec = &run["provisioner"][0]["\"local-exec\""];
    let command = text(&exec["command"]);
    let script = command
        .strip_prefix("${path.module}/")
        .unwrap_or_else(|| panic!("the script is the template's own file: {command}"));
    let script_path = workspace_root()
        .join("docs/examples/coder-proxmox")
        .join(script);
    assert!(script_path.is_file(), "{} missing", script_path.display());
    assert_eq!(
        exec["interpreter"][0].as_str().map(|s| s.trim_matches('"')),
        Some("/bin/sh"),
        "run with sh: a pushed template may lose the executable bit"
    );
    assert!(
        !command.contains("var.") && !command.contains("token") && !command.contains("local."),
        "no value on the command line (Terraform prints it in errors): {command}"
    );
    let script_text = fs::read_to_string(&script_path).unwrap();
    let run_env = exec["environment"]
        .as_object()
        .expect("local-exec environment");
    for name in [
        "PVE_API_URL",
        "PVE_API_TOKEN",
        "PVE_NODE",
        "PVE_VMID",
        "PVE_TRANSITION",
        "PVE_CT_ENV",
    ] {
        assert!(
            run_env.contains_key(name),
            "local-exec environment lacks {name}"
        );
    }
    for name in run_env.keys() {
        assert!(
            script_text.contains(&format!("${{{name}")),
            "{script} does not read {name}"
        );
    }
    let api_token = text(&run_env["PVE_API_TOKEN"]);
    let token_var = api_token
        .strip_prefix("var.")
        .unwrap_or_else(|| panic!("PVE_API_TOKEN from a variable: {api_token}"));
    assert_eq!(
        variable(token_var)["sensitive"],
        Value::Bool(true),
        "var.{token_var} must be sensitive"
    );
    let provider_token = doc["provider"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|p| p.get("\"proxmox\""))
        .map(|p| text(&p["api_token"]))
        .expect("provider \"proxmox\" with api_token");
    assert_eq!(
        provider_token, api_token,
        "the script and the provider use the same token"
    );
    assert_eq!(
        text(&run_env["PVE_TRANSITION"]),
        "data.coder_workspace.me.transition"
    );
    assert!(
        text(&run_env["PVE_CT_ENV"]).contains(&text(&rootfs["environment_variables"])),
        "both routes give the container the same variables: {}",
        run_env["PVE_CT_ENV"]
    );
    let vmid = text(&resolve_local(&doc, &run_env["PVE_VMID"]));
    assert!(
        refers_to(&vmid, "proxmox_virtual_environment_container", oci_name),
        "PVE_VMID must be {oci_name}'s: {vmid}"
    );

    // No output hands out a secret.
    for out in doc["output"].as_array().into_iter().flatten() {
        let s = out.to_string();
        assert!(
            !s.contains(&agent_token) && !s.contains(&format!("var.{token_var}")),
            "an output exposes a secret: {s}"
        );
    }

    // Every variable the template sets is part of the documented contract.
    let contract = fs::read_to_string(workspace_root().join("docs/proxmox.md")).unwrap();
    for key in env.keys() {
        assert!(
            contract.contains(&format!("`{key}`")),
            "{key} is set by the template but not in docs/proxmox.md's table"
        );
    }

    // References resolve to declarations.
    let mut all = Vec::new();
    expressions(&doc, &mut all);
    let variables = declared(&doc, "variable");
    let locals = declared(&doc, "locals");
    let data_names: BTreeSet<(String, String)> = data
        .iter()
        .map(|(t, n, _)| (t.clone(), n.clone()))
        .collect();
    let resource_names: BTreeSet<(String, String)> = resources
        .iter()
        .map(|(t, n, _)| (t.clone(), n.clone()))
        .collect();
    for s in &all {
        for r in references(s, "var") {
            assert!(variables.contains(&r[0]), "var.{} is not declared", r[0]);
        }
        for r in references(s, "local") {
            assert!(locals.contains(&r[0]), "local.{} is not declared", r[0]);
        }
        for r in references(s, "data") {
            assert!(
                r.len() >= 2 && data_names.contains(&(r[0].clone(), r[1].clone())),
                "data.{} is not declared",
                r.join(".")
            );
        }
        for ty in [
            "coder_agent",
            "proxmox_oci_image",
            "proxmox_virtual_environment_container",
            "proxmox_download_file",
            "proxmox_virtual_environment_download_file",
            "terraform_data",
        ] {
            for r in references(s, ty) {
                let name = r[0].trim_end_matches('[').to_string();
                assert!(
                    resource_names.contains(&(ty.to_string(), name.clone())),
                    "{ty}.{name} is not declared"
                );
            }
        }
    }
    eprintln!(
        "{TEMPLATE}: {} resources, {} data sources, {} variables, {} expressions checked",
        resources.len(),
        data.len(),
        variables.len(),
        all.len()
    );
}

/// hakim-init's no-agent hint points at a section that exists.
#[test]
fn first_build_anchor_exists() {
    let root = workspace_root();
    let env_rs = fs::read_to_string(root.join("init/src/env.rs")).unwrap();
    let anchor = env_rs
        .split('"')
        .find(|s| s.starts_with("docs/proxmox.md#"))
        .expect("init/src/env.rs names a docs/proxmox.md anchor");
    let id = anchor.split_once('#').unwrap().1;
    let doc = fs::read_to_string(root.join("docs/proxmox.md")).unwrap();
    assert!(
        doc.contains(&format!("<a id=\"{id}\"></a>")),
        "docs/proxmox.md has no anchor {id} (hakim-init's hint points at {anchor})"
    );
}

#[test]
fn hcl_parser_rejects_a_truncated_template() {
    if !pytools::hcl2_ready() {
        return;
    }
    let text = fs::read_to_string(workspace_root().join(TEMPLATE)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.tf");
    // Cut inside the variables' map: its braces no longer balance.
    let cut = text
        .find("workspace_env = {")
        .expect("template has local.workspace_env");
    fs::write(&broken, &text[..cut]).unwrap();
    assert!(
        parse_hcl(&broken).is_err(),
        "python-hcl2 accepted a template cut in the middle of a block"
    );
}

/// Quoted environment-variable names in the non-test part of a Rust source: `CODER_*`,
/// `HAKIM_*`, `START_*`, `DOCKER_*`, `*_PROXY`, `SSL_CERT_FILE`.
fn env_names_in_rust(source: &str) -> BTreeSet<String> {
    let code = source.split("#[cfg(test)]").next().unwrap_or("");
    let mut names = BTreeSet::new();
    for piece in code.split('"').skip(1).step_by(2) {
        let is_name = !piece.is_empty()
            && piece
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
        let wanted = ["CODER_", "HAKIM_", "START_", "DOCKER_"]
            .iter()
            .any(|p| piece.starts_with(p))
            || piece.ends_with("_PROXY")
            || piece == "SSL_CERT_FILE";
        if is_name && wanted {
            names.insert(piece.to_string());
        }
    }
    names
}

/// `enable_env = "NAME"` and `${NAME}` / `${NAME:-…}` in a service file.
fn env_names_in_service(toml: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in toml.lines() {
        if let Some(rest) = line.trim().strip_prefix("enable_env") {
            names.insert(
                rest.trim_start_matches([' ', '='])
                    .trim()
                    .trim_matches('"')
                    .to_string(),
            );
        }
    }
    for (at, _) in toml.match_indices("${") {
        let name: String = toml[at + 2..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        names.insert(name);
    }
    names
}

fn files_with_extension(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .collect();
    files.sort();
    files
}

#[test]
fn env_contract_table_names_every_variable() {
    let root = workspace_root();
    let mut wanted = BTreeSet::new();
    for file in files_with_extension(&root.join("init/src"), "rs") {
        wanted.extend(env_names_in_rust(&fs::read_to_string(&file).unwrap()));
    }
    let services = files_with_extension(&root.join("images/services"), "toml");
    assert!(!services.is_empty(), "no example services");
    for file in services {
        wanted.extend(env_names_in_service(&fs::read_to_string(&file).unwrap()));
    }
    // The scan must find the contract's core, or it is not scanning anything.
    for core in [
        "CODER_AGENT_URL",
        "CODER_AGENT_TOKEN",
        "START_DOCKER_DAEMON",
        "HAKIM_FINAL_GRACE",
    ] {
        assert!(wanted.contains(core), "scan missed {core}: {wanted:?}");
    }
    let doc = fs::read_to_string(root.join("docs/proxmox.md")).unwrap();
    let table: String = doc
        .lines()
        .filter(|l| l.starts_with('|'))
        .collect::<Vec<_>>()
        .join("\n");
    let missing: Vec<&String> = wanted
        .iter()
        .filter(|name| !table.contains(&format!("`{name}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/proxmox.md's environment table lacks {missing:?} (all read: {wanted:?})"
    );
    eprintln!("{} variables documented", wanted.len());
}

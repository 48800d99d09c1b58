//! Checks of the user documentation that can fail.
//!
//! * The example Coder template, `docs/examples/coder-proxmox/main.tf`, parses as HCL
//!   (python-hcl2 from PyPI, installed by `ci/install-deps.sh`; a truncated copy must not
//!   parse), every `var.`, `local.`, `data.` and resource reference in it is declared, and it
//!   carries what hakim-init and Proxmox need: an unprivileged container from
//!   `proxmox_oci_image`, `host_managed = true` on every NIC with DHCP, the console on
//!   `/dev/console`, and `environment_variables` with `CODER_AGENT_URL` (the workspace's access
//!   URL) and `CODER_AGENT_TOKEN` (a declared `coder_agent`'s token).
//! * The environment table of `docs/proxmox.md` names every variable hakim-init reads
//!   (`init/src`) and every one the example services use (`images/services/*.toml`).
//!
//! Gating: python-hcl2 for the template tests; the table test needs nothing.

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

    // The image pull.
    let images = of_type("proxmox_oci_image");
    assert_eq!(images.len(), 1, "one proxmox_oci_image");
    let (image, image_body) = &images[0];
    for attr in ["node_name", "datastore_id", "reference"] {
        assert!(
            image_body.get(attr).is_some(),
            "proxmox_oci_image.{attr} missing"
        );
    }

    // The container.
    let containers = of_type("proxmox_virtual_environment_container");
    assert_eq!(containers.len(), 1, "one container");
    let (_, ct) = &containers[0];
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
    let template_id = text(&block(ct, "operating_system")["template_file_id"]);
    assert!(
        references(&template_id, "proxmox_oci_image")
            .iter()
            .any(|r| r.first() == Some(image)),
        "operating_system.template_file_id must use proxmox_oci_image.{image}: {template_id}"
    );

    let env = ct["environment_variables"]
        .as_object()
        .expect("environment_variables is a map");
    let url = text(env.get("CODER_AGENT_URL").expect("CODER_AGENT_URL"));
    assert!(
        references(&url, "data")
            .iter()
            .any(|r| r.len() == 3 && r[0] == "coder_workspace" && r[2] == "access_url"),
        "CODER_AGENT_URL must be data.coder_workspace.*.access_url: {url}"
    );
    let token = text(env.get("CODER_AGENT_TOKEN").expect("CODER_AGENT_TOKEN"));
    assert_eq!(
        token,
        format!("coder_agent.{agent}.token"),
        "CODER_AGENT_TOKEN"
    );

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
        ] {
            for r in references(s, ty) {
                assert!(
                    resource_names.contains(&(ty.to_string(), r[0].clone())),
                    "{ty}.{} is not declared",
                    r[0]
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

#[test]
fn hcl_parser_rejects_a_truncated_template() {
    if !pytools::hcl2_ready() {
        return;
    }
    let text = fs::read_to_string(workspace_root().join(TEMPLATE)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.tf");
    // Cut inside the container resource: its braces no longer balance.
    let cut = text
        .find("environment_variables = {")
        .expect("template has environment_variables");
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

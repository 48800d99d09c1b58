//! The environment children see: built-in defaults < the image env file the
//! converter writes (`/etc/hakim/image.env`) < the process environment.
//!
//! Proxmox's `env` update replaces the whole list (PATH and LANG included), and
//! rootfs templates carry no env at all, so the defaults here must be sane alone.

use std::collections::BTreeMap;

pub type Env = BTreeMap<String, String>;

pub const IMAGE_ENV_FILE: &str = "/etc/hakim/image.env";

/// PATH with mise shims and the Nix default profile ahead of the system dirs.
pub const DEFAULT_PATH: &str = "/usr/local/share/mise/shims:/nix/var/nix/profiles/default/bin:\
/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The built-in defaults, those of the upstream entrypoint (`docs/init.md`, *Environment*).
pub const DEFAULTS: &[(&str, &str)] = &[
    ("PATH", DEFAULT_PATH),
    ("LANG", "C.UTF-8"),
    ("LANGUAGE", "C.UTF-8"),
    ("LC_ALL", "C.UTF-8"),
    // Xvfb's display (images/services/xvfb.toml), software GL for headless browsers.
    ("DISPLAY", ":99"),
    ("LIBGL_ALWAYS_SOFTWARE", "1"),
    ("PAGER", "less"),
    ("LESS", "-R"),
    ("MISE_INSTALL_PATH", "/usr/local/bin/mise"),
];

pub fn defaults() -> Env {
    DEFAULTS
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// `EDITOR` and `VISUAL` default to `nvim` when it is on `PATH` (upstream's rule); a value
/// from the image or the process environment is kept.
pub fn add_editor(env: &mut Env, is_file: &dyn Fn(&std::path::Path) -> bool) {
    let path = env.get("PATH").cloned().unwrap_or_default();
    let has_nvim = path
        .split(':')
        .filter(|d| d.starts_with('/'))
        .any(|d| is_file(&std::path::Path::new(d).join("nvim")));
    if has_nvim {
        for var in ["EDITOR", "VISUAL"] {
            env.entry(var.into()).or_insert_with(|| "nvim".into());
        }
    }
}

/// `KEY=VALUE` per line; `#` comments and blank lines skipped; the value is
/// everything after the first `=`, verbatim (no quoting, so any byte but newline
/// survives). Lines without `=` or with an invalid name are reported, not fatal.
pub fn parse_env_file(text: &str) -> (Vec<(String, String)>, Vec<String>) {
    let mut vars = Vec::new();
    let mut bad = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        match line.split_once('=') {
            Some((k, v)) if valid_name(k) => vars.push((k.to_string(), v.to_string())),
            _ => bad.push(format!("line {}: not KEY=VALUE", n + 1)),
        }
    }
    (vars, bad)
}

pub fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

/// Layers the three sources.
pub fn merge(
    image_env: &[(String, String)],
    process: impl IntoIterator<Item = (String, String)>,
) -> Env {
    let mut env = defaults();
    for (k, v) in image_env {
        env.insert(k.clone(), v.clone());
    }
    for (k, v) in process {
        env.insert(k, v);
    }
    env
}

/// The kernel refuses to `execve` any program when one `NAME=value` string,
/// NUL included, is longer than this (`MAX_ARG_STRLEN`: 32 pages).
pub const MAX_ENV_STRING: usize = 32 * 4096;

/// Variables as children get them, in order.
pub type EnvList = Vec<(String, String)>;

/// Splits off the variables no child could be started with (see
/// [`MAX_ENV_STRING`]): one such variable would make every `execve` fail with
/// E2BIG. Returns what to pass on, and the names and sizes of what was held back.
pub fn without_oversized(
    vars: impl IntoIterator<Item = (String, String)>,
) -> (EnvList, Vec<(String, usize)>) {
    let mut kept = Vec::new();
    let mut dropped = Vec::new();
    for (k, v) in vars {
        let len = k.len() + 1 + v.len() + 1;
        if len > MAX_ENV_STRING {
            dropped.push((k, len));
        } else {
            kept.push((k, v));
        }
    }
    (kept, dropped)
}

/// Where the documentation explains how the agent's variables reach a new container.
pub const FIRST_BUILD_DOC: &str = "docs/proxmox.md#first-build";

/// Variables LXC and Proxmox hand every container's PID 1 by themselves: `container` and
/// `container_ttys` (LXC), `TERM` (Proxmox's `lxc.environment = TERM=linux`).
const RUNTIME_ENV: &[&str] = &["container", "container_ttys", "TERM"];

/// One log line for a daemon boot that has no agent configuration, when the environment tells
/// why: every variable the container was given (`process`, less [`RUNTIME_ENV`]) is one of the
/// image's own, with the same value (`image_env`, from [`IMAGE_ENV_FILE`]) — what Proxmox's
/// OCI route leaves after replacing the `env` given at creation — or it was given none at all.
/// `None` when anything came from elsewhere (a template that set other variables).
pub fn no_agent_hint(
    process: &[(String, String)],
    image_env: &[(String, String)],
) -> Option<String> {
    let mut given = process
        .iter()
        .filter(|(k, _)| !RUNTIME_ENV.contains(&k.as_str()))
        .peekable();
    let cause = if given.peek().is_none() {
        "the container was started with no environment of its own: the template likely sets \
         no CODER_AGENT_URL/CODER_AGENT_TOKEN"
    } else if given.all(|(k, v)| image_env.iter().any(|(ik, iv)| ik == k && iv == v)) {
        "the container's environment holds only the image's own variables (those of \
         /etc/hakim/image.env): likely Proxmox's OCI route, which replaces the env given at \
         creation with the image's Env; set env after creating the container, then start it"
    } else {
        return None;
    };
    Some(format!(
        "no Coder agent configured: {cause} (see {FIRST_BUILD_DOC})"
    ))
}

/// `1`, `true`, `yes`, `on` (any case) are true; everything else false.
pub fn truthy(value: &str) -> bool {
    matches!(
        value.trim().to_ascii_lowercase().as_str(),
        "1" | "true" | "yes" | "on"
    )
}

/// Expands `${NAME}` and `${NAME:-default}` from `env` (unset → empty or the
/// default). `$$` is a literal `$`; anything else is copied as is.
pub fn expand(input: &str, env: &Env) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
            continue;
        }
        if let Some(body) = after.strip_prefix('{') {
            if let Some(end) = body.find('}') {
                let inner = &body[..end];
                let (name, default) = match inner.split_once(":-") {
                    Some((n, d)) => (n, Some(d)),
                    None => (inner, None),
                };
                let value = env.get(name).filter(|v| !v.is_empty() || default.is_none());
                match (value, default) {
                    (Some(v), _) => out.push_str(v),
                    (None, Some(d)) => out.push_str(d),
                    (None, None) => {}
                }
                rest = &body[end + 1..];
                continue;
            }
        }
        out.push('$');
        rest = after;
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn hint_when_only_the_image_env_arrived() {
        let image = pairs(&[("PATH", "/usr/bin:/bin"), ("LANG", "C.UTF-8"), ("X", "1")]);
        // Proxmox's OCI route: the image's Env (all or part of it) plus LXC's own variables.
        let oci = pairs(&[
            ("container", "lxc"),
            ("TERM", "linux"),
            ("PATH", "/usr/bin:/bin"),
            ("LANG", "C.UTF-8"),
        ]);
        let line = no_agent_hint(&oci, &image).expect("hint");
        assert!(line.contains("OCI route"), "{line}");
        assert!(line.contains(FIRST_BUILD_DOC), "{line}");
        assert!(!line.contains('\n'), "one line: {line}");
        // Nothing but LXC's variables: a template that set nothing.
        let bare = pairs(&[
            ("container", "lxc"),
            ("container_ttys", ""),
            ("TERM", "linux"),
        ]);
        let line = no_agent_hint(&bare, &image).expect("hint");
        assert!(line.contains("no environment of its own"), "{line}");
        assert!(line.contains(FIRST_BUILD_DOC), "{line}");
        assert!(no_agent_hint(&[], &[]).is_some());
    }

    #[test]
    fn no_hint_when_something_came_from_elsewhere() {
        let image = pairs(&[("PATH", "/usr/bin:/bin"), ("LANG", "C.UTF-8")]);
        // A variable the image does not have (a template's own, Docker's HOSTNAME).
        let other = pairs(&[("PATH", "/usr/bin:/bin"), ("START_XVFB", "0")]);
        assert_eq!(no_agent_hint(&other, &image), None);
        // The image's variable with another value.
        let changed = pairs(&[("PATH", "/opt/bin"), ("LANG", "C.UTF-8")]);
        assert_eq!(no_agent_hint(&changed, &image), None);
    }

    #[test]
    fn oversized_variables_are_held_back() {
        let fits = "v".repeat(MAX_ENV_STRING - "BIG=".len() - 1);
        let (kept, dropped) = without_oversized([
            ("A".to_string(), "1".to_string()),
            ("BIG".to_string(), "x".repeat(1 << 20)),
            ("EDGE".to_string(), fits[1..].to_string()),
            ("OVER".to_string(), fits.clone()),
        ]);
        let names: Vec<&str> = kept.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["A", "EDGE"]);
        assert_eq!(
            dropped,
            [
                ("BIG".to_string(), (1 << 20) + 5),
                ("OVER".to_string(), MAX_ENV_STRING + 1)
            ]
        );
    }

    #[test]
    fn layering_order() {
        let image = vec![
            ("PATH".to_string(), "/image/bin:/usr/bin".to_string()),
            ("FOO".to_string(), "image".to_string()),
        ];
        let env = merge(&image, vec![("FOO".to_string(), "process".to_string())]);
        assert_eq!(env["PATH"], "/image/bin:/usr/bin");
        assert_eq!(env["FOO"], "process");
        assert_eq!(env["LANG"], "C.UTF-8");
        let env = merge(&[], Vec::new());
        assert_eq!(env["PATH"], DEFAULT_PATH);
        for (k, v) in [
            ("LANGUAGE", "C.UTF-8"),
            ("DISPLAY", ":99"),
            ("LIBGL_ALWAYS_SOFTWARE", "1"),
            ("PAGER", "less"),
            ("LESS", "-R"),
            ("MISE_INSTALL_PATH", "/usr/local/bin/mise"),
        ] {
            assert_eq!(env[k], v, "{k}");
        }
        let env = merge(&[], vec![("DISPLAY".to_string(), ":1".to_string())]);
        assert_eq!(env["DISPLAY"], ":1");
    }

    #[test]
    fn editor_is_nvim_only_when_on_path() {
        let mut env = merge(&[], Vec::new());
        add_editor(&mut env, &|_| false);
        assert!(!env.contains_key("EDITOR") && !env.contains_key("VISUAL"));
        add_editor(&mut env, &|p| p == std::path::Path::new("/usr/bin/nvim"));
        assert_eq!(
            (env["EDITOR"].as_str(), env["VISUAL"].as_str()),
            ("nvim", "nvim")
        );
        let mut env = merge(&[], vec![("EDITOR".to_string(), "vi".to_string())]);
        add_editor(&mut env, &|_| true);
        assert_eq!(
            (env["EDITOR"].as_str(), env["VISUAL"].as_str()),
            ("vi", "nvim")
        );
    }

    #[test]
    fn env_file_parsing_keeps_values_verbatim() {
        let (vars, bad) = parse_env_file("# c\n\nA=1\nB=x=y \"q\"\n bad line\n1X=no\nC=\n");
        assert_eq!(
            vars,
            [
                ("A".to_string(), "1".to_string()),
                ("B".to_string(), "x=y \"q\"".to_string()),
                ("C".to_string(), String::new())
            ]
        );
        assert_eq!(bad.len(), 2);
    }

    #[test]
    fn expansion() {
        let mut env = Env::new();
        env.insert("ROOT".into(), "/data".into());
        env.insert("EMPTY".into(), String::new());
        assert_eq!(expand("${ROOT}/docker", &env), "/data/docker");
        assert_eq!(
            expand("${MISSING:-/var/lib/docker}", &env),
            "/var/lib/docker"
        );
        assert_eq!(expand("${EMPTY:-vfs}", &env), "vfs");
        assert_eq!(expand("${MISSING}x", &env), "x");
        assert_eq!(
            expand("$$ and $HOME and ${unclosed", &env),
            "$ and $HOME and ${unclosed"
        );
    }

    #[test]
    fn truthiness() {
        for t in ["1", "true", "YES", " on "] {
            assert!(truthy(t));
        }
        for f in ["0", "false", "", "nope"] {
            assert!(!truthy(f));
        }
    }
}

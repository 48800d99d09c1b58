//! Docker credential helpers: a docker `config.json` (or containers `auth.json`) may keep
//! credentials out of the file and name a program that holds them. For one registry the
//! file is read in docker's order: `credHelpers` (per registry) names a helper, else an
//! `auths` entry holds the credentials inline, else `credsStore` names the helper for all.
//!
//! A helper is run as `docker-credential-<name> get` (found on `PATH`) with the server URL
//! on stdin, and answers `{"ServerURL","Username","Secret"}` on stdout. "credentials not
//! found" means no login for that registry: the pull goes on anonymously. Any other failure
//! is an error naming the helper, its exit status and its stderr, never its stdout (which
//! may hold the secret). A helper that does not answer within [`HELPER_TIMEOUT`] is killed.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use super::auth::{parse_auth_json, Credentials};
use super::reference::{DOCKER_HUB, DOCKER_HUB_API};
use crate::text::printable;

/// How long a helper may take (a keychain may ask the user to unlock it).
pub const HELPER_TIMEOUT: Duration = Duration::from_secs(60);

/// What a config file says about one registry.
#[derive(Debug, PartialEq, Eq)]
pub enum Choice {
    /// Ask this helper (`docker-credential-<name>`).
    Helper(String),
    /// Credentials written in the file.
    Inline(Credentials),
}

/// Looks `registry`/`repository` up in a config document: `credHelpers`, then `auths`,
/// then `credsStore`. `Ok(None)`: the file says nothing about this registry.
pub fn choose(json: &[u8], registry: &str, repository: &str) -> Result<Option<Choice>> {
    let v: serde_json::Value = serde_json::from_slice(json).context("not valid JSON")?;
    let helper_named = |name: &str| -> Result<Option<Choice>> {
        if name.is_empty() {
            return Ok(None);
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            bail!(
                "credential helper name '{}' is not a plain name",
                printable(name, 100)
            );
        }
        Ok(Some(Choice::Helper(name.to_string())))
    };
    let per_registry = v
        .get("credHelpers")
        .and_then(|h| h.as_object())
        .and_then(|h| {
            helper_keys(registry)
                .iter()
                .find_map(|k| h.get(k.as_str()).and_then(|n| n.as_str()))
        });
    if let Some(name) = per_registry {
        if let Some(choice) = helper_named(name)? {
            return Ok(Some(choice));
        }
    }
    if let Some(c) = parse_auth_json(json, registry, repository)? {
        return Ok(Some(Choice::Inline(c)));
    }
    match v.get("credsStore").and_then(|s| s.as_str()) {
        Some(name) => helper_named(name),
        None => Ok(None),
    }
}

/// The keys a `credHelpers` map may use for `registry` (Docker Hub has several).
fn helper_keys(registry: &str) -> Vec<String> {
    if registry == DOCKER_HUB {
        vec![
            DOCKER_HUB.to_string(),
            "index.docker.io".into(),
            DOCKER_HUB_API.to_string(),
            "https://index.docker.io/v1/".into(),
        ]
    } else {
        vec![registry.to_string()]
    }
}

/// The server URL a helper is asked about, as docker asks it: Docker Hub's historical
/// `https://index.docker.io/v1/`, otherwise the registry's `host[:port]`.
pub fn server_url(registry: &str) -> String {
    if registry == DOCKER_HUB {
        "https://index.docker.io/v1/".to_string()
    } else {
        registry.to_string()
    }
}

/// The helpers' own words for "no login for this server" (docker-credential-helpers'
/// `ErrCredentialsNotFound`).
const NOT_FOUND: &str = "credentials not found in native keychain";

/// Runs `docker-credential-<name> get` for `server`. `Ok(None)`: the helper holds no
/// credentials for it.
pub fn get(name: &str, server: &str, timeout: Duration) -> Result<Option<Credentials>> {
    let program = format!("docker-credential-{name}");
    let mut child = Command::new(&program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| anyhow!("cannot run the credential helper {program}: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A helper that exits without reading is judged by its answer, not by the pipe.
        let _ = stdin.write_all(server.as_bytes());
    }
    let read = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut out = Vec::new();
            if let Some(p) = pipe {
                let _ = p.take(1 << 20).read_to_end(&mut out);
            }
            out
        })
    };
    let stdout = read(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = read(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "the credential helper {program} did not answer within {} s; killed",
                    timeout.as_secs_f64()
                );
            }
            Err(e) => bail!("cannot wait for the credential helper {program}: {e}"),
        }
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    if !status.success() {
        let said = |b: &[u8]| String::from_utf8_lossy(b).trim() == NOT_FOUND;
        if said(&stdout) || said(&stderr) {
            return Ok(None);
        }
        let detail = String::from_utf8_lossy(&stderr);
        let detail = detail.trim();
        bail!(
            "the credential helper {program} failed ({status}){}",
            if detail.is_empty() {
                " without a message on stderr".to_string()
            } else {
                format!(": {}", printable(detail, 500))
            }
        );
    }
    parse_get_output(&stdout).with_context(|| format!("the credential helper {program}"))
}

/// A helper's answer to `get`. An identity token (user `<token>`, for docker's OAuth
/// refresh flow) is not something a registry accepts as a password: `None`.
pub fn parse_get_output(stdout: &[u8]) -> Result<Option<Credentials>> {
    // The error never quotes the answer: it holds the secret.
    let v: serde_json::Value = serde_json::from_slice(stdout)
        .map_err(|_| anyhow!("answered with something that is not the expected JSON"))?;
    let field = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or_default();
    let (user, secret) = (field("Username"), field("Secret"));
    if secret.is_empty() {
        bail!("answered without a Secret");
    }
    if user == "<token>" {
        return Ok(None);
    }
    if user.is_empty() {
        bail!("answered without a Username");
    }
    Ok(Some(Credentials::new(user, secret)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn helpers_come_before_inline_and_the_store_last() {
        let doc = br#"{
            "credHelpers": {"reg.example": "pass", "odd.example": "../evil"},
            "auths": {"reg.example": {"username": "u", "password": "p"},
                      "other.example": {"username": "o", "password": "p"},
                      "stored.example": {}},
            "credsStore": "desktop"
        }"#;
        let choose = |r: &str| choose(doc, r, "a/b");
        assert_eq!(
            choose("reg.example").unwrap(),
            Some(Choice::Helper("pass".into()))
        );
        assert_eq!(
            choose("other.example").unwrap(),
            Some(Choice::Inline(Credentials::new("o", "p")))
        );
        // An empty `auths` entry is docker's marker for "in the store".
        assert_eq!(
            choose("stored.example").unwrap(),
            Some(Choice::Helper("desktop".into()))
        );
        assert!(choose("odd.example").is_err());
        assert_eq!(choose_plain(br#"{"auths":{}}"#), None);
        let hub = br#"{"credHelpers":{"https://index.docker.io/v1/":"hub"}}"#;
        assert_eq!(choose_hub(hub), Some(Choice::Helper("hub".into())));
        assert_eq!(server_url(DOCKER_HUB), "https://index.docker.io/v1/");
        assert_eq!(server_url("127.0.0.1:5000"), "127.0.0.1:5000");
    }

    fn choose_plain(doc: &[u8]) -> Option<Choice> {
        choose(doc, "reg.example", "a").unwrap()
    }

    fn choose_hub(doc: &[u8]) -> Option<Choice> {
        choose(doc, DOCKER_HUB, "library/debian").unwrap()
    }

    #[test]
    fn get_answers() {
        let ok = br#"{"ServerURL":"reg.example","Username":"u","Secret":"s3cret"}"#;
        assert_eq!(
            parse_get_output(ok).unwrap(),
            Some(Credentials::new("u", "s3cret"))
        );
        let token = br#"{"ServerURL":"x","Username":"<token>","Secret":"refresh"}"#;
        assert_eq!(parse_get_output(token).unwrap(), None);
        let e = parse_get_output(b"s3cret-in-garbage").unwrap_err();
        assert!(!format!("{e:#}").contains("s3cret"), "{e:#}");
        assert!(parse_get_output(br#"{"Username":"u"}"#).is_err());
    }

    /// A helper script in a fresh directory, run through `sh` by absolute name.
    fn helper(dir: &std::path::Path, body: &str) -> String {
        let name = format!("t{}", fastrand_name());
        let path = dir.join(format!("docker-credential-{name}"));
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        name
    }

    fn fastrand_name() -> u64 {
        hakim_netenv::backoff::random_u64() % 1_000_000
    }

    #[test]
    fn helper_processes() {
        let dir = tempfile::tempdir().unwrap();
        // PATH is process-wide: this test is the only one here that runs helpers.
        let path = format!(
            "{}:{}",
            dir.path().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        std::env::set_var("PATH", path);
        let ok = helper(
            dir.path(),
            r#"read server; printf '{"ServerURL":"%s","Username":"me","Secret":"pw"}' "$server""#,
        );
        assert_eq!(
            get(&ok, "reg.example", HELPER_TIMEOUT).unwrap(),
            Some(Credentials::new("me", "pw"))
        );
        let missing = helper(
            dir.path(),
            "echo 'credentials not found in native keychain'; exit 1",
        );
        assert_eq!(get(&missing, "reg.example", HELPER_TIMEOUT).unwrap(), None);
        let broken = helper(
            dir.path(),
            "echo STDOUT-SECRET; echo 'keychain locked' >&2; exit 3",
        );
        let e = format!(
            "{:#}",
            get(&broken, "reg.example", HELPER_TIMEOUT).unwrap_err()
        );
        assert!(e.contains(&format!("docker-credential-{broken}")), "{e}");
        assert!(
            e.contains("exit status: 3") && e.contains("keychain locked"),
            "{e}"
        );
        assert!(!e.contains("STDOUT-SECRET"), "{e}");
        let hangs = helper(dir.path(), "exec sleep 30");
        let started = Instant::now();
        let e = get(&hangs, "reg.example", Duration::from_millis(300)).unwrap_err();
        assert!(e.to_string().contains("did not answer"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(10));
        let e = get("absent-helper-xyz", "reg.example", HELPER_TIMEOUT).unwrap_err();
        assert!(
            e.to_string()
                .contains("docker-credential-absent-helper-xyz"),
            "{e}"
        );
    }
}

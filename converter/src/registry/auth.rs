//! Registry authentication, minus the HTTP: credentials and where they come from,
//! `WWW-Authenticate` challenges, token endpoint answers and the token cache.
//!
//! The flow itself (anonymous first; on 401 ask the challenge's token realm and
//! retry) lives in the client. Everything here is pure so it can be tested alone.
//!
//! Secrets never reach a message: [`Credentials`] and tokens have redacting `Debug`
//! implementations, and errors name files and hosts, never values.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use base64::Engine as _;

use super::credhelper::{self, Choice};
use super::reference::{DOCKER_HUB, DOCKER_HUB_API};

/// Lifetime of a token whose answer does not say (`expires_in` absent), as in the
/// distribution spec.
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
/// Longer lifetimes are cut to this.
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// A user name and password (or token). `Debug` never shows the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Credentials({}, <redacted>)", self.username)
    }
}

impl Credentials {
    pub fn new(username: impl Into<String>, password: impl Into<String>) -> Self {
        Credentials {
            username: username.into(),
            password: password.into(),
        }
    }

    /// `user:password` (the password may contain ':'). The error never repeats the
    /// input, which may be a secret typed in the wrong place.
    pub fn parse_pair(s: &str) -> Result<Credentials> {
        let s = s.trim_end_matches(['\r', '\n']);
        match s.split_once(':') {
            Some((u, p)) if !u.is_empty() && !p.is_empty() => Ok(Credentials::new(u, p)),
            _ => bail!("credentials must be USER:PASSWORD (both non-empty)"),
        }
    }

    /// A file holding `user:password` (one line; a trailing newline is ignored).
    pub fn from_file(path: &Path) -> Result<Credentials> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read credentials file {}", path.display()))?;
        let line = text.lines().next().unwrap_or("");
        Credentials::parse_pair(line).with_context(|| format!("{}", path.display()))
    }

    /// The value of an `Authorization: Basic …` header.
    pub fn basic_header(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }
}

/// A parsed `WWW-Authenticate` challenge we can answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

/// Splits `WWW-Authenticate` values into challenges: `(scheme in lowercase,
/// [(param in lowercase, value)])`. Handles several challenges in one header,
/// quoted values with `\` escapes and commas inside quotes (`scope="repo:x:pull,push"`).
pub fn parse_www_authenticate(value: &str) -> Vec<(String, Vec<(String, String)>)> {
    let mut out: Vec<(String, Vec<(String, String)>)> = Vec::new();
    let b = value.as_bytes();
    let mut i = 0;
    let skip_ws = |i: &mut usize| {
        while *i < b.len() && (b[*i] == b' ' || b[*i] == b'\t' || b[*i] == b',') {
            *i += 1;
        }
    };
    let token = |i: &mut usize| -> String {
        let start = *i;
        while *i < b.len() && !matches!(b[*i], b' ' | b'\t' | b',' | b'=' | b'"') {
            *i += 1;
        }
        value[start..*i].to_string()
    };
    loop {
        skip_ws(&mut i);
        if i >= b.len() {
            break;
        }
        let word = token(&mut i);
        if word.is_empty() {
            // A stray character (e.g. an unmatched quote): skip it.
            i += 1;
            continue;
        }
        // `word=` is a parameter of the current challenge; anything else starts one.
        let mut j = i;
        while j < b.len() && (b[j] == b' ' || b[j] == b'\t') {
            j += 1;
        }
        if j < b.len() && b[j] == b'=' && !out.is_empty() {
            i = j + 1;
            while i < b.len() && (b[i] == b' ' || b[i] == b'\t') {
                i += 1;
            }
            let val = if i < b.len() && b[i] == b'"' {
                i += 1;
                let mut v = String::new();
                while i < b.len() && b[i] != b'"' {
                    if b[i] == b'\\' && i + 1 < b.len() {
                        i += 1;
                    }
                    // Copy one UTF-8 character.
                    let ch_len = utf8_len(b[i]);
                    let end = (i + ch_len).min(b.len());
                    v.push_str(&value[i..end]);
                    i = end;
                }
                i += 1; // closing quote
                v
            } else {
                token(&mut i)
            };
            if let Some(last) = out.last_mut() {
                last.1.push((word.to_ascii_lowercase(), val));
            }
        } else {
            out.push((word.to_ascii_lowercase(), Vec::new()));
        }
    }
    out
}

fn utf8_len(first: u8) -> usize {
    match first {
        0xF0..=0xFF => 4,
        0xE0..=0xEF => 3,
        0xC0..=0xDF => 2,
        _ => 1,
    }
}

/// The challenge to answer among all `WWW-Authenticate` headers of a response:
/// Bearer (with a realm) preferred over Basic.
pub fn choose_challenge<'a>(headers: impl IntoIterator<Item = &'a str>) -> Option<Challenge> {
    let mut basic = false;
    for h in headers {
        for (scheme, params) in parse_www_authenticate(h) {
            let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
            match scheme.as_str() {
                "bearer" => {
                    if let Some(realm) = get("realm").filter(|r| !r.is_empty()) {
                        return Some(Challenge::Bearer {
                            realm,
                            service: get("service"),
                            scope: get("scope"),
                        });
                    }
                }
                "basic" => basic = true,
                _ => {}
            }
        }
    }
    basic.then_some(Challenge::Basic)
}

/// Merges token scopes (`type:name:actions`, several per string when separated by
/// spaces) into one space-separated list: one entry per resource, its actions the
/// union, sorted. `repository:a:pull` and `repository:a:pull,push` give
/// `repository:a:pull,push`. Entries that are not `type:name:actions` are kept as
/// they are. The result merged again is the same (token cache keys stay stable).
pub fn merge_scopes(scopes: &[&str]) -> String {
    let mut resources: Vec<(String, Vec<String>)> = Vec::new();
    let mut verbatim: Vec<String> = Vec::new();
    for scope in scopes.iter().flat_map(|s| s.split(' ')) {
        if scope.is_empty() {
            continue;
        }
        // The name may hold ':' (a registry-qualified name); the actions never do.
        let parsed = scope
            .rsplit_once(':')
            .filter(|(resource, _)| resource.contains(':'));
        let Some((resource, actions)) = parsed else {
            if !verbatim.iter().any(|v| v == scope) {
                verbatim.push(scope.to_string());
            }
            continue;
        };
        let index = match resources.iter().position(|(r, _)| r == resource) {
            Some(i) => i,
            None => {
                resources.push((resource.to_string(), Vec::new()));
                resources.len() - 1
            }
        };
        let set = &mut resources[index].1;
        for a in actions.split(',').filter(|a| !a.is_empty()) {
            if !set.iter().any(|x| x == a) {
                set.push(a.to_string());
            }
        }
        set.sort();
    }
    resources
        .into_iter()
        .map(|(r, a)| format!("{r}:{}", a.join(",")))
        .chain(verbatim)
        .collect::<Vec<_>>()
        .join(" ")
}

/// What a token endpoint answered.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    pub value: String,
    pub lifetime: Duration,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token(<redacted>, {:?})", self.lifetime)
    }
}

/// Parses `{"token": …}` or `{"access_token": …}` with an optional `expires_in`.
pub fn parse_token_response(body: &[u8]) -> Result<Token> {
    let v: serde_json::Value =
        serde_json::from_slice(body).context("token endpoint did not answer with JSON")?;
    let value = ["token", "access_token"]
        .iter()
        .find_map(|k| v.get(*k).and_then(|t| t.as_str()).filter(|t| !t.is_empty()))
        .map(str::to_string);
    let Some(value) = value else {
        bail!("token endpoint answer has no token");
    };
    let lifetime = v
        .get("expires_in")
        .and_then(|e| e.as_u64())
        .filter(|&s| s > 0)
        // A day at most: a bogus huge value must not overflow the clock arithmetic.
        .map(|s| Duration::from_secs(s.min(MAX_TOKEN_LIFETIME.as_secs())))
        .unwrap_or(DEFAULT_TOKEN_LIFETIME);
    Ok(Token { value, lifetime })
}

/// Tokens are cached per (realm, service, scope).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TokenKey {
    pub realm: String,
    pub service: Option<String>,
    pub scope: String,
}

struct Cached {
    value: String,
    expires: Instant,
}

/// Bearer tokens until they expire. A token is given up a little before its
/// expiry (a tenth of its lifetime, at most 10 s) so a request never leaves with a
/// token that dies on the way; a 401 invalidates it early.
#[derive(Default)]
pub struct TokenCache {
    map: HashMap<TokenKey, Cached>,
}

impl TokenCache {
    pub fn get(&self, key: &TokenKey, now: Instant) -> Option<&str> {
        self.map
            .get(key)
            .filter(|c| now < c.expires)
            .map(|c| c.value.as_str())
    }

    pub fn insert(&mut self, key: TokenKey, token: Token, now: Instant) {
        let margin = (token.lifetime / 10).min(Duration::from_secs(10));
        self.map.insert(
            key,
            Cached {
                value: token.value,
                expires: now + token.lifetime - margin,
            },
        );
    }

    pub fn invalidate(&mut self, key: &TokenKey) {
        self.map.remove(key);
    }
}

/// Where credentials came from (for messages; never the values).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialSource {
    Flag,
    File(PathBuf),
    AuthFile(PathBuf),
    /// A credential helper named in this config file.
    Helper {
        name: String,
        file: PathBuf,
    },
    GithubToken,
}

impl fmt::Display for CredentialSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CredentialSource::Flag => write!(f, "--creds"),
            CredentialSource::File(p) => write!(f, "--creds-file {}", p.display()),
            CredentialSource::AuthFile(p) => write!(f, "{}", p.display()),
            CredentialSource::Helper { name, file } => {
                write!(f, "docker-credential-{name} (named in {})", file.display())
            }
            CredentialSource::GithubToken => write!(f, "GITHUB_TOKEN"),
        }
    }
}

/// Keys under which a registry may appear in an `auths` map, most specific first:
/// `host/repo/path`, its parents, `host`, and Docker Hub's historical spellings.
fn auth_keys(registry: &str, repository: &str) -> Vec<String> {
    let mut keys = Vec::new();
    let mut path = format!("{registry}/{repository}");
    loop {
        keys.push(path.clone());
        match path.rfind('/') {
            Some(i) => path.truncate(i),
            None => break,
        }
    }
    if registry == DOCKER_HUB {
        for k in [
            "index.docker.io",
            DOCKER_HUB_API,
            "https://index.docker.io/v1/",
        ] {
            keys.push(k.to_string());
        }
    }
    keys
}

/// `https://host/v1/` → `host`; `host/ns` stays (podman's namespaced entries).
fn normalise_auth_key(key: &str) -> String {
    let k = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let k = k.trim_end_matches('/');
    let k = k
        .strip_suffix("/v1")
        .or_else(|| k.strip_suffix("/v2"))
        .unwrap_or(k);
    k.to_string()
}

/// Looks `registry`/`repository` up in an auth.json / docker config.json document.
/// `Ok(None)`: no usable entry.
pub fn parse_auth_json(
    json: &[u8],
    registry: &str,
    repository: &str,
) -> Result<Option<Credentials>> {
    let v: serde_json::Value = serde_json::from_slice(json).context("not valid JSON")?;
    let Some(auths) = v.get("auths").and_then(|a| a.as_object()) else {
        return Ok(None);
    };
    let mut normalised: HashMap<String, &serde_json::Value> = HashMap::new();
    for (k, entry) in auths {
        normalised.entry(normalise_auth_key(k)).or_insert(entry);
    }
    for key in auth_keys(registry, repository) {
        let Some(entry) = normalised.get(&normalise_auth_key(&key)) else {
            continue;
        };
        if let Some(auth) = entry
            .get("auth")
            .and_then(|a| a.as_str())
            .filter(|a| !a.is_empty())
        {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(auth.trim())
                .ok()
                .and_then(|d| String::from_utf8(d).ok());
            let Some(decoded) = decoded else {
                bail!("the 'auth' entry for {key} is not base64 of USER:PASSWORD");
            };
            return Credentials::parse_pair(&decoded)
                .map(Some)
                .with_context(|| format!("the 'auth' entry for {key}"));
        }
        let user = entry.get("username").and_then(|u| u.as_str());
        let pass = entry.get("password").and_then(|p| p.as_str());
        if let (Some(u), Some(p)) = (user, pass) {
            if !u.is_empty() && !p.is_empty() {
                return Ok(Some(Credentials::new(u, p)));
            }
        }
    }
    Ok(None)
}

/// The auth files to consult, in order: `$REGISTRY_AUTH_FILE`,
/// `$XDG_RUNTIME_DIR/containers/auth.json`, `$DOCKER_CONFIG/config.json` or
/// `~/.docker/config.json`.
pub fn auth_file_candidates(env: &dyn Fn(&str) -> Option<String>) -> Vec<PathBuf> {
    let set = |k: &str| env(k).filter(|v| !v.trim().is_empty());
    let mut out = Vec::new();
    if let Some(f) = set("REGISTRY_AUTH_FILE") {
        out.push(PathBuf::from(f));
    }
    if let Some(d) = set("XDG_RUNTIME_DIR") {
        out.push(Path::new(&d).join("containers/auth.json"));
    }
    if let Some(d) = set("DOCKER_CONFIG") {
        out.push(Path::new(&d).join("config.json"));
    } else if let Some(h) = set("HOME") {
        out.push(Path::new(&h).join(".docker/config.json"));
    }
    out
}

/// Resolved credentials for one registry, with where they came from and any
/// warnings (unreadable auth files are skipped, not fatal).
pub struct FoundCredentials {
    pub credentials: Option<(Credentials, CredentialSource)>,
    pub warnings: Vec<String>,
}

/// Finds credentials for `registry`/`repository`: `explicit` (`--creds`), then
/// `file` (`--creds-file`), then the auth files (each with its credential helpers, see
/// [`credhelper`]; the first file that names the registry decides), then `GITHUB_TOKEN` for ghcr.io
/// (user `$GITHUB_ACTOR` or any name: GHCR checks only the token).
pub fn find_credentials(
    explicit: Option<&Credentials>,
    file: Option<&Path>,
    registry: &str,
    repository: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<FoundCredentials> {
    let mut warnings = Vec::new();
    if let Some(c) = explicit {
        return Ok(FoundCredentials {
            credentials: Some((c.clone(), CredentialSource::Flag)),
            warnings,
        });
    }
    if let Some(f) = file {
        let c = Credentials::from_file(f)?;
        return Ok(FoundCredentials {
            credentials: Some((c, CredentialSource::File(f.to_path_buf()))),
            warnings,
        });
    }
    for path in auth_file_candidates(env) {
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                warnings.push(format!("cannot read {}: {e}; ignored", path.display()));
                continue;
            }
        };
        match credhelper::choose(&bytes, registry, repository) {
            Ok(Some(Choice::Inline(c))) => {
                return Ok(FoundCredentials {
                    credentials: Some((c, CredentialSource::AuthFile(path))),
                    warnings,
                })
            }
            Ok(Some(Choice::Helper(name))) => {
                let server = credhelper::server_url(registry);
                let found = credhelper::get(&name, &server, credhelper::HELPER_TIMEOUT)
                    .with_context(|| format!("credentials for {registry} ({})", path.display()))?;
                match found {
                    Some(c) => {
                        let source = CredentialSource::Helper { name, file: path };
                        return Ok(FoundCredentials {
                            credentials: Some((c, source)),
                            warnings,
                        });
                    }
                    // The helper holds no login for this registry: anonymous, as docker.
                    None => break,
                }
            }
            Ok(None) => {}
            Err(e) => warnings.push(format!("{}: {e:#}; ignored", path.display())),
        }
    }
    if registry == "ghcr.io" {
        if let Some(token) = env("GITHUB_TOKEN").filter(|t| !t.trim().is_empty()) {
            let user = env("GITHUB_ACTOR")
                .filter(|u| !u.trim().is_empty())
                .unwrap_or_else(|| "hakim-convert".into());
            return Ok(FoundCredentials {
                credentials: Some((
                    Credentials::new(user, token.trim()),
                    CredentialSource::GithubToken,
                )),
                warnings,
            });
        }
    }
    Ok(FoundCredentials {
        credentials: None,
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ghcr_challenge() {
        let h = r#"Bearer realm="https://ghcr.io/token",service="ghcr.io",scope="repository:shekohex/hakim-elixir:pull""#;
        assert_eq!(
            choose_challenge([h]),
            Some(Challenge::Bearer {
                realm: "https://ghcr.io/token".into(),
                service: Some("ghcr.io".into()),
                scope: Some("repository:shekohex/hakim-elixir:pull".into()),
            })
        );
    }

    #[test]
    fn challenge_variants() {
        // Commas inside quotes, spaces around '=', unquoted values, escapes.
        let h = r#"bearer  realm = "http://127.0.0.1:5002/token" , service=reg, scope="repository:a/b:pull,push", error="insufficient_scope""#;
        assert_eq!(
            choose_challenge([h]),
            Some(Challenge::Bearer {
                realm: "http://127.0.0.1:5002/token".into(),
                service: Some("reg".into()),
                scope: Some("repository:a/b:pull,push".into()),
            })
        );
        let parsed = parse_www_authenticate(r#"Basic realm="a \"q\" b", Bearer realm="r""#);
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[0].0, "basic");
        assert_eq!(parsed[0].1, vec![("realm".into(), r#"a "q" b"#.into())]);
        assert_eq!(parsed[1].0, "bearer");
        // Bearer wins over Basic, in one header or across several.
        assert!(matches!(
            choose_challenge([r#"Basic realm="x", Bearer realm="r""#]),
            Some(Challenge::Bearer { .. })
        ));
        assert_eq!(
            choose_challenge([r#"Basic realm="Registry Realm""#]),
            Some(Challenge::Basic)
        );
        // A Bearer challenge without a realm cannot be answered.
        assert_eq!(choose_challenge(["Bearer service=x"]), None);
        assert_eq!(choose_challenge(["Negotiate", ""]), None);
        // Garbage does not panic.
        for junk in [
            "\"",
            "=",
            "Bearer realm=\"",
            "Bearer =x",
            ",,,",
            "Bearer realm=\"é\\",
        ] {
            let _ = choose_challenge([junk]);
        }
    }

    #[test]
    fn scopes_merge() {
        assert_eq!(
            merge_scopes(&["repository:a/b:pull,push", "repository:a/b:pull"]),
            "repository:a/b:pull,push"
        );
        let merged = merge_scopes(&[
            "repository:dst:push,pull",
            "repository:src:pull",
            "repository:dst:pull repository:src:pull",
        ]);
        assert_eq!(merged, "repository:dst:pull,push repository:src:pull");
        assert_eq!(merge_scopes(&[&merged]), merged);
        assert_eq!(
            merge_scopes(&["registry:catalog:*", "odd", "odd", ""]),
            "registry:catalog:* odd"
        );
    }

    #[test]
    fn token_answers() {
        let t = parse_token_response(br#"{"token":"abc","expires_in":300}"#).unwrap();
        assert_eq!(t.value, "abc");
        assert_eq!(t.lifetime, Duration::from_secs(300));
        let t = parse_token_response(br#"{"access_token":"xyz"}"#).unwrap();
        assert_eq!(t.value, "xyz");
        assert_eq!(t.lifetime, DEFAULT_TOKEN_LIFETIME);
        let t = parse_token_response(br#"{"token":"","access_token":"z","expires_in":0}"#).unwrap();
        assert_eq!(t.value, "z");
        assert_eq!(t.lifetime, DEFAULT_TOKEN_LIFETIME);
        let t =
            parse_token_response(br#"{"token":"z","expires_in":18446744073709551615}"#).unwrap();
        assert_eq!(t.lifetime, MAX_TOKEN_LIFETIME);
        assert!(parse_token_response(b"<html>").is_err());
        assert!(parse_token_response(b"{}").is_err());
        assert!(!format!("{t:?}").contains('z'));
    }

    #[test]
    fn token_cache_expiry() {
        let key = TokenKey {
            realm: "r".into(),
            service: Some("s".into()),
            scope: "repository:a:pull".into(),
        };
        let now = Instant::now();
        let mut c = TokenCache::default();
        assert_eq!(c.get(&key, now), None);
        c.insert(
            key.clone(),
            Token {
                value: "t1".into(),
                lifetime: Duration::from_secs(300),
            },
            now,
        );
        assert_eq!(c.get(&key, now), Some("t1"));
        assert_eq!(c.get(&key, now + Duration::from_secs(289)), Some("t1"));
        // Given up 10 s early.
        assert_eq!(c.get(&key, now + Duration::from_secs(290)), None);
        // Short lifetimes keep 90 %.
        c.insert(
            key.clone(),
            Token {
                value: "t2".into(),
                lifetime: Duration::from_secs(20),
            },
            now,
        );
        assert_eq!(c.get(&key, now + Duration::from_secs(17)), Some("t2"));
        assert_eq!(c.get(&key, now + Duration::from_secs(18)), None);
        // Other scopes are other tokens; invalidation forgets.
        let other = TokenKey {
            scope: "repository:b:pull".into(),
            ..key.clone()
        };
        assert_eq!(c.get(&other, now), None);
        c.invalidate(&key);
        assert_eq!(c.get(&key, now), None);
    }

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[test]
    fn auth_json_lookup() {
        let doc = format!(
            r#"{{"auths": {{
                "ghcr.io": {{"auth": "{}"}},
                "https://index.docker.io/v1/": {{"auth": "{}"}},
                "127.0.0.1:5000": {{"auth": "{}"}},
                "quay.io/team/app": {{"auth": "{}"}},
                "quay.io": {{"auth": "{}"}},
                "reg.example": {{"username": "u5", "password": "p5"}},
                "broken.example": {{"auth": "%%%"}}
            }}, "credsStore": "desktop"}}"#,
            b64("u1:p1:with:colons"),
            b64("hub:pw"),
            b64("local:pw"),
            b64("team:pw"),
            b64("quay:pw")
        );
        let get = |reg: &str, repo: &str| parse_auth_json(doc.as_bytes(), reg, repo);
        let c = get("ghcr.io", "shekohex/x").unwrap().unwrap();
        assert_eq!(c, Credentials::new("u1", "p1:with:colons"));
        assert_eq!(
            get("docker.io", "library/debian")
                .unwrap()
                .unwrap()
                .username,
            "hub"
        );
        assert_eq!(
            get("127.0.0.1:5000", "x").unwrap().unwrap().username,
            "local"
        );
        assert_eq!(
            get("quay.io", "team/app").unwrap().unwrap().username,
            "team"
        );
        assert_eq!(
            get("quay.io", "other/app").unwrap().unwrap().username,
            "quay"
        );
        assert_eq!(get("reg.example", "a").unwrap().unwrap().username, "u5");
        assert_eq!(get("127.0.0.1:5001", "x").unwrap(), None);
        let err = get("broken.example", "a").unwrap_err();
        assert!(!format!("{err:#}").contains("%%%"));
        assert_eq!(parse_auth_json(b"{}", "ghcr.io", "a").unwrap(), None);
        assert!(parse_auth_json(b"not json", "ghcr.io", "a").is_err());
    }

    #[test]
    fn credential_sources() {
        let dir = tempfile::tempdir().unwrap();
        let auth = dir.path().join("auth.json");
        std::fs::write(
            &auth,
            format!(
                r#"{{"auths":{{"ghcr.io":{{"auth":"{}"}}}}}}"#,
                b64("fileuser:pw")
            ),
        )
        .unwrap();
        let auth_s = auth.display().to_string();
        let env = |k: &str| match k {
            "REGISTRY_AUTH_FILE" => Some(auth_s.clone()),
            "GITHUB_TOKEN" => Some("ghp_secret".into()),
            _ => None,
        };
        let found = find_credentials(None, None, "ghcr.io", "a/b", &env).unwrap();
        let (c, src) = found.credentials.unwrap();
        assert_eq!(c.username, "fileuser");
        assert_eq!(src, CredentialSource::AuthFile(auth.clone()));

        // Not in the file: GITHUB_TOKEN, for ghcr.io only.
        let env2 = |k: &str| match k {
            "GITHUB_TOKEN" => Some("ghp_secret".into()),
            _ => None,
        };
        let (c, src) = find_credentials(None, None, "ghcr.io", "a/b", &env2)
            .unwrap()
            .credentials
            .unwrap();
        assert_eq!(src, CredentialSource::GithubToken);
        assert_eq!(c, Credentials::new("hakim-convert", "ghp_secret"));
        assert!(find_credentials(None, None, "quay.io", "a/b", &env2)
            .unwrap()
            .credentials
            .is_none());

        // The flag wins; a creds file is read.
        let flag = Credentials::new("f", "p");
        let (c, _) = find_credentials(Some(&flag), None, "ghcr.io", "a", &env)
            .unwrap()
            .credentials
            .unwrap();
        assert_eq!(c.username, "f");
        let cf = dir.path().join("creds");
        std::fs::write(&cf, "me:tok\n").unwrap();
        let (c, _) = find_credentials(None, Some(&cf), "ghcr.io", "a", &env)
            .unwrap()
            .credentials
            .unwrap();
        assert_eq!(c, Credentials::new("me", "tok"));

        // A broken auth file is a warning, not a failure.
        std::fs::write(&auth, "garbage").unwrap();
        let found = find_credentials(None, None, "quay.io", "a", &env).unwrap();
        assert!(found.credentials.is_none());
        assert_eq!(found.warnings.len(), 1);
    }

    #[test]
    fn secrets_stay_hidden() {
        let c = Credentials::new("user", "hunter2");
        assert!(!format!("{c:?}").contains("hunter2"));
        let e = Credentials::parse_pair("hunter2").unwrap_err();
        assert!(!format!("{e:#}").contains("hunter2"));
        assert_eq!(
            Credentials::new("u", "p").basic_header(),
            format!("Basic {}", b64("u:p"))
        );
    }
}

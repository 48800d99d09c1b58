//! Where the Coder agent connects, and with which token.
//!
//! Resolves the environment contract the Coder templates use (`CODER_AGENT_URL`,
//! `CODER_AGENT_TOKEN`, `CODER_AGENT_TOKEN_FILE`, `CODER_AGENT_BOOTSTRAP`, `CODER_AGENT_AUTH`)
//! into one validated [`AgentConfig`], and derives the URL the agent binary is downloaded from.
//! Everything here is pure: the environment and the token file come in through closures.
//!
//! Precedence, per value, follows what the upstream entrypoint and `coder agent` do together:
//! the URL comes from `CODER_AGENT_URL`, else from the bootstrap blob; the token from
//! `CODER_AGENT_TOKEN`, else from the bootstrap blob, else from `CODER_AGENT_TOKEN_FILE`
//! (upstream fills `CODER_AGENT_TOKEN` from the blob first, and the agent only reads the file
//! when that variable is empty). Empty variables count as unset, as they do for the agent.
//!
//! The token is a secret: no error, warning or `Debug` output of this module contains it.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Read};
use std::net::Ipv6Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use base64::Engine as _;

pub const ENV_URL: &str = "CODER_AGENT_URL";
pub const ENV_TOKEN: &str = "CODER_AGENT_TOKEN";
pub const ENV_TOKEN_FILE: &str = "CODER_AGENT_TOKEN_FILE";
pub const ENV_BOOTSTRAP: &str = "CODER_AGENT_BOOTSTRAP";
pub const ENV_AUTH: &str = "CODER_AGENT_AUTH";

/// Variables to remove from the environment of every child, the agent included; the agent then
/// gets [`agent_env`] on top. The token and the bootstrap blob are the secret itself; the token
/// file path is dropped too, because the agent gets the token directly and no other service has
/// any business knowing where it lives. `CODER_AGENT_URL`, `CODER_AGENT_AUTH` and
/// `CODER_RUNTIME_ENV_SHA` are not secrets and pass through untouched.
pub const SECRET_ENV: &[&str] = &[ENV_TOKEN, ENV_BOOTSTRAP, ENV_TOKEN_FILE];

/// Whether `name` must be kept out of child environments (see [`SECRET_ENV`]).
pub fn is_secret_env(name: &str) -> bool {
    SECRET_ENV.contains(&name)
}

/// Token files larger than this are not token files.
const MAX_TOKEN_FILE: u64 = 64 * 1024;

/// Where a value came from, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Env,
    Bootstrap,
    TokenFile,
}

impl Source {
    fn url_name(self) -> &'static str {
        match self {
            Source::Env => "CODER_AGENT_URL",
            Source::Bootstrap => "the URL in CODER_AGENT_BOOTSTRAP",
            Source::TokenFile => "CODER_AGENT_TOKEN_FILE",
        }
    }

    fn token_name(self) -> &'static str {
        match self {
            Source::Env => "CODER_AGENT_TOKEN",
            Source::Bootstrap => "the token in CODER_AGENT_BOOTSTRAP",
            Source::TokenFile => "the token in CODER_AGENT_TOKEN_FILE",
        }
    }
}

/// Why an access URL was refused. Messages describe the problem without repeating the URL:
/// userinfo may hold a password, and a swapped `<token>|<url>` bootstrap would put the token
/// where the URL belongs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UrlError {
    Empty,
    NoScheme,
    /// Lowercased scheme, truncated; schemes are never secret.
    UnsupportedScheme(String),
    EmptyHost,
    InvalidHost,
    InvalidIpv6,
    InvalidPort,
    UserInfo,
    Query,
    Fragment,
    InvalidPath,
    DotSegment,
}

impl fmt::Display for UrlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UrlError::Empty => write!(f, "it is empty"),
            UrlError::NoScheme => write!(f, "it has no scheme (expected http:// or https://)"),
            UrlError::UnsupportedScheme(s) => {
                write!(f, "scheme {s:?} is not supported (expected http or https)")
            }
            UrlError::EmptyHost => write!(f, "it has no host"),
            UrlError::InvalidHost => {
                write!(f, "the host contains characters not allowed in a host name")
            }
            UrlError::InvalidIpv6 => write!(f, "the bracketed IPv6 address is not valid"),
            UrlError::InvalidPort => write!(f, "the port is not a number from 1 to 65535"),
            UrlError::UserInfo => write!(
                f,
                "it contains user credentials (user@ or user:password@), which are not allowed"
            ),
            UrlError::Query => write!(f, "it contains a query (?...), which is not allowed"),
            UrlError::Fragment => write!(f, "it contains a fragment (#...), which is not allowed"),
            UrlError::InvalidPath => write!(
                f,
                "the path contains characters that must be percent-encoded"
            ),
            UrlError::DotSegment => write!(f, "the path contains a '.' or '..' segment"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

/// A validated, normalized Coder access URL: `http` or `https`, a host, an optional port, and a
/// path that always ends in `/` (`https://coder.example.com/`, `http://[::1]:3000/coder/`).
/// Scheme and host are lowercased and IPv6 hosts printed in canonical form; the port and the
/// path are kept as given, apart from collapsing trailing slashes into one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessUrl {
    scheme: Scheme,
    /// Host as it goes into a URL: lowercased name, dotted IPv4, or `[v6]` with brackets.
    host: String,
    port: Option<u16>,
    /// Starts and ends with `/`.
    path: String,
}

impl AccessUrl {
    /// Parses and validates `input` (surrounding whitespace ignored). See [`UrlError`] for what
    /// is refused: anything but http/https, userinfo, a query or fragment, an empty host.
    pub fn parse(input: &str) -> Result<AccessUrl, UrlError> {
        let input = input.trim();
        if input.is_empty() {
            return Err(UrlError::Empty);
        }
        let (scheme, rest) = input.split_once("://").ok_or(UrlError::NoScheme)?;
        let scheme_lower = scheme.to_ascii_lowercase();
        let scheme = match scheme_lower.as_str() {
            "http" => Scheme::Http,
            "https" => Scheme::Https,
            "" => return Err(UrlError::NoScheme),
            other => {
                let shown: String = other
                    .chars()
                    .filter(|c| c.is_ascii_alphanumeric() || "+-.".contains(*c))
                    .take(16)
                    .collect();
                return Err(UrlError::UnsupportedScheme(shown));
            }
        };

        // The authority ends at the first '/', '?' or '#' (RFC 3986 §3.2).
        let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(authority_end);
        if authority.contains('@') {
            return Err(UrlError::UserInfo);
        }
        let (host, port) = parse_authority(authority)?;

        // Fragment before query: "a#b?c" has a fragment and no query.
        if tail.contains('#') {
            return Err(UrlError::Fragment);
        }
        if tail.contains('?') {
            return Err(UrlError::Query);
        }
        let path = normalize_path(tail)?;
        Ok(AccessUrl {
            scheme,
            host,
            port,
            path,
        })
    }

    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    /// Host as written in a URL (IPv6 in brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> Option<u16> {
        self.port
    }

    /// Path, starting and ending with `/`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// `scheme://host[:port]`, no path.
    pub fn origin(&self) -> String {
        match self.port {
            Some(port) => format!("{}://{}:{}", self.scheme.as_str(), self.host, port),
            None => format!("{}://{}", self.scheme.as_str(), self.host),
        }
    }

    /// Joins a relative reference without `..`/`.`/query onto the access URL, the way
    /// `${ACCESS_URL}bin/...` does in Coder's bootstrap script: a path prefix is kept.
    fn join(&self, relative: &str) -> String {
        format!("{}{}", self, relative.trim_start_matches('/'))
    }

    /// Where the Coder server serves the agent binary for `arch` (amd64, arm64, armv7).
    ///
    /// The binary sits under the access URL's path, not at the origin's root: Coder's own
    /// `bootstrap_linux.sh` downloads `${ACCESS_URL}bin/coder-linux-${ARCH}` with `ACCESS_URL`
    /// ending in `/`, so a deployment behind `https://host/coder/` serves
    /// `https://host/coder/bin/coder-linux-amd64`. With or without a trailing slash in the input,
    /// the result is the same.
    pub fn binary_url(&self, arch: &str) -> String {
        self.join(&format!("bin/coder-linux-{arch}"))
    }
}

impl fmt::Display for AccessUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.origin(), self.path)
    }
}

fn parse_authority(authority: &str) -> Result<(String, Option<u16>), UrlError> {
    if authority.is_empty() {
        return Err(UrlError::EmptyHost);
    }
    let (host, port) = if let Some(after_bracket) = authority.strip_prefix('[') {
        let (addr, after) = after_bracket.split_once(']').ok_or(UrlError::InvalidIpv6)?;
        // Zone identifiers ("fe80::1%25eth0") are refused along with everything else
        // Ipv6Addr does not parse.
        let addr: Ipv6Addr = addr.parse().map_err(|_| UrlError::InvalidIpv6)?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or(UrlError::InvalidPort)?),
        };
        (format!("[{addr}]"), port)
    } else {
        let (host, port) = match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        };
        if host.is_empty() {
            return Err(UrlError::EmptyHost);
        }
        // Real host names, IPv4 included, use only these; everything else (spaces, '%', '\',
        // non-ASCII) is either an attack on a sloppier parser downstream or a typo.
        if !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
        {
            return Err(UrlError::InvalidHost);
        }
        (host.to_ascii_lowercase(), port)
    };
    let port = match port {
        None => None,
        Some(p) => {
            if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(UrlError::InvalidPort);
            }
            match p.parse::<u16>() {
                Ok(0) | Err(_) => return Err(UrlError::InvalidPort),
                Ok(n) => Some(n),
            }
        }
    };
    Ok((host, port))
}

/// Validates the path (RFC 3986 `pchar`s and `/`, well-formed percent escapes, no dot
/// segments) and gives it exactly one trailing slash.
fn normalize_path(path: &str) -> Result<String, UrlError> {
    let bytes = path.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).ok_or(UrlError::InvalidPath)?;
                if !hex.iter().all(u8::is_ascii_hexdigit) {
                    return Err(UrlError::InvalidPath);
                }
                i += 3;
                continue;
            }
            b'/' | b':' | b'@' | b'-' | b'.' | b'_' | b'~' | b'!' | b'$' | b'&' | b'\'' | b'('
            | b')' | b'*' | b'+' | b',' | b';' | b'=' => {}
            b if b.is_ascii_alphanumeric() => {}
            _ => return Err(UrlError::InvalidPath),
        }
        i += 1;
    }
    // Reverse proxies normalise dot segments in differing ways; a base URL has no need for them.
    if path.split('/').any(|seg| seg == "." || seg == "..") {
        return Err(UrlError::DotSegment);
    }
    let trimmed = path.trim_end_matches('/');
    // `tail` is empty or starts with '/', so `trimmed` is empty or "/...".
    Ok(format!("{trimmed}/"))
}

/// The agent architecture name Coder uses for a Rust `std::env::consts::ARCH` value.
pub fn coder_arch_for(rust_arch: &str) -> Option<&'static str> {
    match rust_arch {
        "x86_64" => Some("amd64"),
        "aarch64" => Some("arm64"),
        // Rust's 32-bit ARM targets (armv7-unknown-linux-musleabihf) report "arm".
        "arm" => Some("armv7"),
        _ => None,
    }
}

/// The agent architecture of this machine. hakim-init is a static binary built per
/// architecture, so the architecture it was compiled for is the one the user space runs.
pub fn coder_arch() -> Option<&'static str> {
    coder_arch_for(std::env::consts::ARCH)
}

/// Everything needed to download and start the agent.
#[derive(Clone, PartialEq, Eq)]
pub struct AgentConfig {
    pub url: AccessUrl,
    pub token: String,
    pub binary_url: String,
}

impl fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentConfig")
            .field("url", &self.url.to_string())
            .field("token", &"<redacted>")
            .field("binary_url", &self.binary_url)
            .finish()
    }
}

/// The variables that go into the agent's environment only: the normalized URL and the token.
/// Remove [`SECRET_ENV`] from the inherited environment first.
pub fn agent_env(cfg: &AgentConfig) -> Vec<(String, String)> {
    vec![
        (ENV_URL.to_string(), cfg.url.to_string()),
        (ENV_TOKEN.to_string(), cfg.token.clone()),
    ]
}

/// Something the operator should fix that does not stop the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigWarning {
    /// The token file can be read by group or others.
    TokenFileReadable { path: PathBuf, mode: u32 },
    /// `CODER_AGENT_BOOTSTRAP` is malformed but was not needed (URL and token set directly).
    BootstrapIgnored(BootstrapError),
}

impl fmt::Display for ConfigWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigWarning::TokenFileReadable { path, mode } => write!(
                f,
                "CODER_AGENT_TOKEN_FILE {} is readable by group or others (mode {:04o}); chmod 600 it",
                path.display(),
                mode & 0o7777
            ),
            ConfigWarning::BootstrapIgnored(e) => {
                write!(f, "CODER_AGENT_BOOTSTRAP ignored (URL and token are set directly): {e}")
            }
        }
    }
}

/// Why `CODER_AGENT_BOOTSTRAP` could not be used. Never carries any of its content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootstrapError {
    NotBase64,
    NotUtf8,
    MissingSeparator,
}

impl fmt::Display for BootstrapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BootstrapError::NotBase64 => write!(f, "it is not valid base64"),
            BootstrapError::NotUtf8 => write!(f, "it does not decode to UTF-8 text"),
            BootstrapError::MissingSeparator => {
                write!(
                    f,
                    "the decoded value has no '|' (expected <access_url>|<token>)"
                )
            }
        }
    }
}

/// Why no agent configuration could be built. No variant holds the token.
#[derive(Debug)]
pub enum ConfigError {
    /// A token is available but no URL.
    MissingUrl,
    /// A URL is available but no token.
    MissingToken,
    /// `CODER_AGENT_AUTH` names another method (instance identity etc.); value truncated.
    UnsupportedAuth(String),
    InvalidUrl {
        source: Source,
        reason: UrlError,
    },
    /// The token is empty or holds whitespace/control characters (would break the header).
    InvalidToken {
        source: Source,
    },
    Bootstrap(BootstrapError),
    TokenFile {
        path: PathBuf,
        error: io::Error,
    },
    UnsupportedArch(&'static str),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::MissingUrl => write!(
                f,
                "a Coder agent token is set but no access URL: set CODER_AGENT_URL or CODER_AGENT_BOOTSTRAP"
            ),
            ConfigError::MissingToken => write!(
                f,
                "a Coder access URL is set but no agent token: set CODER_AGENT_TOKEN, CODER_AGENT_TOKEN_FILE or CODER_AGENT_BOOTSTRAP"
            ),
            ConfigError::UnsupportedAuth(v) => write!(
                f,
                "CODER_AGENT_AUTH={v:?} is not supported: hakim-init only does token auth (unset it or set it to \"token\")"
            ),
            ConfigError::InvalidUrl { source, reason } => {
                write!(f, "{} is not a usable Coder access URL: {reason}", source.url_name())
            }
            ConfigError::InvalidToken { source } => write!(
                f,
                "{} is empty or contains whitespace or control characters",
                source.token_name()
            ),
            ConfigError::Bootstrap(e) => write!(f, "CODER_AGENT_BOOTSTRAP is unusable: {e}"),
            ConfigError::TokenFile { path, error } => write!(
                f,
                "cannot read CODER_AGENT_TOKEN_FILE {}: {error}",
                path.display()
            ),
            ConfigError::UnsupportedArch(arch) => write!(
                f,
                "Coder publishes no agent binary for this architecture ({arch})"
            ),
        }
    }
}

impl std::error::Error for ConfigError {}

/// A resolved configuration and what the operator should be told about it.
#[derive(Debug)]
pub struct Resolved {
    pub config: AgentConfig,
    pub warnings: Vec<ConfigWarning>,
}

/// Content and permission bits of a token file.
pub struct TokenFile {
    pub contents: Vec<u8>,
    pub mode: u32,
}

/// Reads a token file from disk (at most 64 KiB), following symlinks.
pub fn read_token_file(path: &Path) -> io::Result<TokenFile> {
    let file = std::fs::File::open(path)?;
    let mode = file.metadata()?.permissions().mode();
    let mut contents = Vec::new();
    file.take(MAX_TOKEN_FILE + 1).read_to_end(&mut contents)?;
    if contents.len() as u64 > MAX_TOKEN_FILE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "file is larger than 64 KiB",
        ));
    }
    Ok(TokenFile { contents, mode })
}

/// [`resolve`] over an environment map, reading the token file from disk.
pub fn resolve_env(env: &BTreeMap<String, String>) -> Result<Option<Resolved>, ConfigError> {
    resolve(|name| env.get(name).cloned(), read_token_file)
}

/// Resolves the agent configuration from `env` (a lookup by variable name) and
/// `read_file` (called at most once, only when the token must come from
/// `CODER_AGENT_TOKEN_FILE`).
///
/// `Ok(None)`: none of `CODER_AGENT_URL`, `CODER_AGENT_TOKEN`, `CODER_AGENT_TOKEN_FILE`,
/// `CODER_AGENT_BOOTSTRAP` is set, so no agent is wanted.
pub fn resolve<E, R>(env: E, read_file: R) -> Result<Option<Resolved>, ConfigError>
where
    E: Fn(&str) -> Option<String>,
    R: FnOnce(&Path) -> io::Result<TokenFile>,
{
    resolve_for_arch(env, read_file, coder_arch())
}

/// [`resolve`] for a given agent architecture (`None`: Coder publishes none for this machine,
/// an error only once an agent is actually wanted).
fn resolve_for_arch<E, R>(
    env: E,
    read_file: R,
    arch: Option<&str>,
) -> Result<Option<Resolved>, ConfigError>
where
    E: Fn(&str) -> Option<String>,
    R: FnOnce(&Path) -> io::Result<TokenFile>,
{
    // Empty counts as unset, as in the agent and the upstream entrypoint.
    let get = |name: &str| env(name).filter(|v| !v.trim().is_empty());
    let env_url = get(ENV_URL);
    let env_token = get(ENV_TOKEN);
    let token_file = get(ENV_TOKEN_FILE);
    let bootstrap = get(ENV_BOOTSTRAP);

    if env_url.is_none() && env_token.is_none() && token_file.is_none() && bootstrap.is_none() {
        return Ok(None);
    }

    if let Some(auth) = get(ENV_AUTH) {
        if auth.trim() != "token" {
            let shown: String = auth.trim().chars().take(40).collect();
            return Err(ConfigError::UnsupportedAuth(shown));
        }
    }

    let mut warnings = Vec::new();
    let (mut url, mut token) = (
        env_url.map(|u| (u, Source::Env)),
        env_token.map(|t| (t, Source::Env)),
    );
    if let Some(blob) = bootstrap {
        match decode_bootstrap(&blob) {
            // An empty half fills nothing: upstream exports it empty, and the agent treats an
            // empty variable as unset (so an empty token still falls back to the token file).
            Ok((b_url, b_token)) => {
                if url.is_none() && !b_url.is_empty() {
                    url = Some((b_url, Source::Bootstrap));
                }
                if token.is_none() && !b_token.is_empty() {
                    token = Some((b_token, Source::Bootstrap));
                }
            }
            Err(e) if url.is_some() && token.is_some() => {
                warnings.push(ConfigWarning::BootstrapIgnored(e));
            }
            // With token file as a fallback the blob might not be needed for the token,
            // but a broken blob is still an operator error worth stopping on when it was
            // meant to supply something.
            Err(e) => return Err(ConfigError::Bootstrap(e)),
        }
    }

    if token.is_none() {
        if let Some(path) = token_file {
            let path = PathBuf::from(path.trim());
            let file = read_file(&path).map_err(|error| ConfigError::TokenFile {
                path: path.clone(),
                error,
            })?;
            if file.mode & 0o044 != 0 {
                warnings.push(ConfigWarning::TokenFileReadable {
                    path: path.clone(),
                    mode: file.mode,
                });
            }
            let text = String::from_utf8(file.contents).map_err(|_| ConfigError::InvalidToken {
                source: Source::TokenFile,
            })?;
            token = Some((text, Source::TokenFile));
        }
    }

    let (url, url_source) = url.ok_or(ConfigError::MissingUrl)?;
    let (token, token_source) = token.ok_or(ConfigError::MissingToken)?;

    let url = AccessUrl::parse(&url).map_err(|reason| ConfigError::InvalidUrl {
        source: url_source,
        reason,
    })?;
    let token = token.trim();
    if token.is_empty() || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ConfigError::InvalidToken {
            source: token_source,
        });
    }

    let arch = arch.ok_or(ConfigError::UnsupportedArch(std::env::consts::ARCH))?;
    let binary_url = url.binary_url(arch);
    Ok(Some(Resolved {
        config: AgentConfig {
            url,
            token: token.to_string(),
            binary_url,
        },
        warnings,
    }))
}

/// Decodes `base64(<access_url>|<token>)`, split at the first `|`. Accepts the standard and
/// URL-safe alphabets, with or without padding, and ignores whitespace anywhere (GNU `base64`
/// wraps its output at 76 columns).
fn decode_bootstrap(blob: &str) -> Result<(String, String), BootstrapError> {
    use base64::engine::general_purpose::{STANDARD_PAD_INDIFFERENT, URL_SAFE_PAD_INDIFFERENT};
    let compact: String = blob.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    let bytes = STANDARD_PAD_INDIFFERENT
        .decode(&compact)
        .or_else(|_| URL_SAFE_PAD_INDIFFERENT.decode(&compact))
        .map_err(|_| BootstrapError::NotBase64)?;
    let text = String::from_utf8(bytes).map_err(|_| BootstrapError::NotUtf8)?;
    let (url, token) = text
        .split_once('|')
        .ok_or(BootstrapError::MissingSeparator)?;
    Ok((url.trim().to_string(), token.trim().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};

    const TOKEN: &str = "5f2c1c2e-aaaa-4bbb-8ccc-0123456789ab";

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn no_file(_: &Path) -> io::Result<TokenFile> {
        panic!("token file must not be read")
    }

    fn run(
        pairs: &[(&str, &str)],
        file: impl FnOnce(&Path) -> io::Result<TokenFile>,
    ) -> Result<Option<Resolved>, ConfigError> {
        let map = env(pairs);
        resolve_for_arch(|k| map.get(k).cloned(), file, Some("amd64"))
    }

    fn ok(pairs: &[(&str, &str)]) -> Resolved {
        run(pairs, no_file).unwrap().unwrap()
    }

    fn err(pairs: &[(&str, &str)]) -> ConfigError {
        run(pairs, no_file).unwrap_err()
    }

    fn file_with(contents: &str, mode: u32) -> impl FnOnce(&Path) -> io::Result<TokenFile> {
        let contents = contents.as_bytes().to_vec();
        move |p: &Path| {
            assert_eq!(p, Path::new("/run/secrets/token"));
            Ok(TokenFile { contents, mode })
        }
    }

    fn b64(s: &str) -> String {
        STANDARD.encode(s)
    }

    fn assert_no_token<T: fmt::Display + fmt::Debug>(v: &T) {
        let shown = format!("{v} {v:?}");
        assert!(!shown.contains(TOKEN), "token leaked: {shown}");
        assert!(!shown.contains("5f2c1c2e"), "token leaked: {shown}");
    }

    #[test]
    fn nothing_set_means_no_agent() {
        assert!(run(&[], no_file).unwrap().is_none());
        assert!(run(&[(ENV_URL, ""), (ENV_TOKEN, "  ")], no_file)
            .unwrap()
            .is_none());
        // AUTH alone or CODER_RUNTIME_ENV_SHA alone do not ask for an agent.
        assert!(run(
            &[(ENV_AUTH, "token"), ("CODER_RUNTIME_ENV_SHA", "abc")],
            no_file
        )
        .unwrap()
        .is_none());
    }

    #[test]
    fn url_and_token_from_env() {
        let r = ok(&[(ENV_URL, "https://coder.example.com"), (ENV_TOKEN, TOKEN)]);
        assert_eq!(r.config.url.to_string(), "https://coder.example.com/");
        assert_eq!(r.config.token, TOKEN);
        assert_eq!(
            r.config.binary_url,
            "https://coder.example.com/bin/coder-linux-amd64"
        );
        assert!(r.warnings.is_empty());
    }

    #[test]
    fn values_are_trimmed() {
        let r = ok(&[
            (ENV_URL, "  https://coder.example.com/\n"),
            (ENV_TOKEN, &format!("{TOKEN}\n")),
        ]);
        assert_eq!(r.config.url.to_string(), "https://coder.example.com/");
        assert_eq!(r.config.token, TOKEN);
    }

    #[test]
    fn bootstrap_alone() {
        let blob = b64(&format!("https://coder.example.com/|{TOKEN}"));
        let r = ok(&[(ENV_BOOTSTRAP, &blob)]);
        assert_eq!(r.config.url.to_string(), "https://coder.example.com/");
        assert_eq!(r.config.token, TOKEN);
    }

    #[test]
    fn bootstrap_fills_only_unset_values() {
        let blob = b64(&format!("https://boot.example.com|{TOKEN}"));
        // URL set directly: the blob's URL is ignored, its token used.
        let r = ok(&[(ENV_URL, "https://env.example.com"), (ENV_BOOTSTRAP, &blob)]);
        assert_eq!(r.config.url.to_string(), "https://env.example.com/");
        assert_eq!(r.config.token, TOKEN);
        // Token set directly: the blob's token is ignored, its URL used.
        let r = ok(&[(ENV_TOKEN, "direct-token"), (ENV_BOOTSTRAP, &blob)]);
        assert_eq!(r.config.url.to_string(), "https://boot.example.com/");
        assert_eq!(r.config.token, "direct-token");
        // Both set: blob entirely ignored.
        let r = ok(&[
            (ENV_URL, "https://env.example.com"),
            (ENV_TOKEN, "direct-token"),
            (ENV_BOOTSTRAP, &blob),
        ]);
        assert_eq!(r.config.url.to_string(), "https://env.example.com/");
        assert_eq!(r.config.token, "direct-token");
        assert!(r.warnings.is_empty());
        // Empty values count as unset.
        let r = ok(&[(ENV_URL, ""), (ENV_TOKEN, ""), (ENV_BOOTSTRAP, &blob)]);
        assert_eq!(r.config.url.to_string(), "https://boot.example.com/");
        assert_eq!(r.config.token, TOKEN);
    }

    #[test]
    fn bootstrap_splits_at_first_bar() {
        let blob = b64("https://coder.example.com|tok|en");
        let r = ok(&[(ENV_BOOTSTRAP, &blob)]);
        assert_eq!(r.config.token, "tok|en");
    }

    #[test]
    fn bootstrap_base64_variants() {
        // Bytes chosen so the encodings differ: '?' and '>' give '/' and '+' in standard base64.
        let payload = format!("https://c.example.com/??>>/|{TOKEN}");
        let encodings = [
            STANDARD.encode(&payload),
            STANDARD_NO_PAD.encode(&payload),
            URL_SAFE.encode(&payload),
            URL_SAFE_NO_PAD.encode(&payload),
        ];
        assert!(encodings[0].contains('/') || encodings[0].contains('+'));
        assert!(encodings[0].ends_with('='));
        for enc in &encodings {
            let r = run(&[(ENV_BOOTSTRAP, enc)], no_file);
            // The URL has a '?': parsing the URL fails, but decoding must have worked.
            match r {
                Err(ConfigError::InvalidUrl { source, reason }) => {
                    assert_eq!(source, Source::Bootstrap);
                    assert_eq!(reason, UrlError::Query);
                }
                other => panic!("{enc}: {other:?}"),
            }
        }
        let payload = format!("https://c.example.com/|{TOKEN}~~");
        for enc in [
            STANDARD.encode(&payload),
            STANDARD_NO_PAD.encode(&payload),
            URL_SAFE.encode(&payload),
            URL_SAFE_NO_PAD.encode(&payload),
        ] {
            assert_eq!(
                ok(&[(ENV_BOOTSTRAP, &enc)]).config.token,
                format!("{TOKEN}~~")
            );
        }
    }

    #[test]
    fn bootstrap_wrapped_like_gnu_base64() {
        let enc = b64(&format!(
            "https://a-rather-long-host-name.example.com/coder/|{TOKEN}"
        ));
        let wrapped: String = enc
            .as_bytes()
            .chunks(76)
            .map(|c| format!("{}\n", std::str::from_utf8(c).unwrap()))
            .collect();
        assert!(wrapped.trim_end().contains('\n'));
        let r = ok(&[(ENV_BOOTSTRAP, &wrapped)]);
        assert_eq!(r.config.token, TOKEN);
        // A trailing newline inside the encoded text (echo | base64) is trimmed away.
        let r = ok(&[(
            ENV_BOOTSTRAP,
            &b64(&format!("https://c.example.com|{TOKEN}\n")),
        )]);
        assert_eq!(r.config.token, TOKEN);
    }

    #[test]
    fn malformed_bootstrap() {
        let e = err(&[(ENV_BOOTSTRAP, "not base64 at all!!")]);
        assert!(matches!(
            e,
            ConfigError::Bootstrap(BootstrapError::NotBase64)
        ));
        let blob = STANDARD.encode([0xff, 0xfe, b'|', b'x']);
        let e = err(&[(ENV_BOOTSTRAP, &blob)]);
        assert!(matches!(e, ConfigError::Bootstrap(BootstrapError::NotUtf8)));
        let blob = b64(&format!("https://c.example.com {TOKEN}"));
        let e = err(&[(ENV_BOOTSTRAP, &blob)]);
        assert!(matches!(
            e,
            ConfigError::Bootstrap(BootstrapError::MissingSeparator)
        ));
        assert_no_token(&e);
        // Needed for the token only: still an error.
        let e = err(&[(ENV_URL, "https://c.example.com"), (ENV_BOOTSTRAP, &blob)]);
        assert!(matches!(e, ConfigError::Bootstrap(_)));
        // Not needed at all: a warning.
        let r = ok(&[
            (ENV_URL, "https://c.example.com"),
            (ENV_TOKEN, TOKEN),
            (ENV_BOOTSTRAP, "%%%"),
        ]);
        assert_eq!(
            r.warnings,
            vec![ConfigWarning::BootstrapIgnored(BootstrapError::NotBase64)]
        );
        assert_no_token(&r.warnings[0]);
    }

    #[test]
    fn bootstrap_with_empty_parts() {
        let e = err(&[(ENV_BOOTSTRAP, &b64(&format!(" |{TOKEN}")))]);
        assert!(matches!(e, ConfigError::MissingUrl));
        assert_no_token(&e);
        let e = err(&[(ENV_BOOTSTRAP, &b64("https://c.example.com|"))]);
        assert!(matches!(e, ConfigError::MissingToken));
        // An empty token in the blob leaves the token file as the source, as upstream does.
        let r = run(
            &[
                (ENV_BOOTSTRAP, &b64("https://c.example.com|")),
                (ENV_TOKEN_FILE, "/run/secrets/token"),
            ],
            file_with(TOKEN, 0o600),
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.config.token, TOKEN);
    }

    #[test]
    fn swapped_bootstrap_does_not_leak_token() {
        let e = err(&[(
            ENV_BOOTSTRAP,
            &b64(&format!("{TOKEN}|https://c.example.com")),
        )]);
        assert!(matches!(e, ConfigError::InvalidUrl { .. }));
        assert_no_token(&e);
    }

    #[test]
    fn token_file() {
        let r = run(
            &[
                (ENV_URL, "https://c.example.com"),
                (ENV_TOKEN_FILE, "/run/secrets/token"),
            ],
            file_with(&format!("  {TOKEN}\n\n"), 0o100600),
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.config.token, TOKEN);
        assert!(r.warnings.is_empty());
    }

    #[test]
    fn token_file_readable_by_others_warns() {
        for mode in [0o100644, 0o100640, 0o100604] {
            let r = run(
                &[
                    (ENV_URL, "https://c.example.com"),
                    (ENV_TOKEN_FILE, "/run/secrets/token"),
                ],
                file_with(TOKEN, mode),
            )
            .unwrap()
            .unwrap();
            assert_eq!(r.warnings.len(), 1, "{mode:o}");
            let w = r.warnings[0].to_string();
            assert!(
                w.contains("/run/secrets/token") && w.contains(&format!("{:04o}", mode & 0o7777))
            );
            assert_no_token(&r.warnings[0]);
        }
    }

    #[test]
    fn token_precedence_env_then_bootstrap_then_file() {
        let blob = b64("https://c.example.com|boot-token");
        let r = run(
            &[
                (ENV_TOKEN, "env-token"),
                (ENV_BOOTSTRAP, &blob),
                (ENV_TOKEN_FILE, "/run/secrets/token"),
            ],
            no_file,
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.config.token, "env-token");
        let r = run(
            &[
                (ENV_BOOTSTRAP, &blob),
                (ENV_TOKEN_FILE, "/run/secrets/token"),
            ],
            no_file,
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.config.token, "boot-token");
        // Without a blob (or with one lacking a token), the file supplies it.
        let r = run(
            &[
                (ENV_URL, "https://c.example.com"),
                (ENV_TOKEN_FILE, "/run/secrets/token"),
            ],
            file_with("file-token", 0o600),
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.config.token, "file-token");
    }

    #[test]
    fn token_file_errors() {
        let e = run(
            &[
                (ENV_URL, "https://c.example.com"),
                (ENV_TOKEN_FILE, "/run/secrets/token"),
            ],
            |_: &Path| Err(io::Error::from(io::ErrorKind::NotFound)),
        )
        .unwrap_err();
        assert!(matches!(e, ConfigError::TokenFile { .. }));
        assert!(e.to_string().contains("/run/secrets/token"));
        let e = run(
            &[
                (ENV_URL, "https://c.example.com"),
                (ENV_TOKEN_FILE, "/run/secrets/token"),
            ],
            file_with(" \n", 0o600),
        )
        .unwrap_err();
        assert!(matches!(
            e,
            ConfigError::InvalidToken {
                source: Source::TokenFile
            }
        ));
        let e = run(
            &[
                (ENV_URL, "https://c.example.com"),
                (ENV_TOKEN_FILE, "/run/secrets/token"),
            ],
            |_: &Path| {
                Ok(TokenFile {
                    contents: vec![0xff, 0x00],
                    mode: 0o600,
                })
            },
        )
        .unwrap_err();
        assert!(matches!(e, ConfigError::InvalidToken { .. }));
    }

    #[test]
    fn read_token_file_from_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, format!("{TOKEN}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let f = read_token_file(&path).unwrap();
        assert_eq!(f.mode & 0o777, 0o640);
        assert_eq!(f.contents, format!("{TOKEN}\n").as_bytes());
        let map = env(&[
            (ENV_URL, "http://127.0.0.1:3000"),
            (ENV_TOKEN_FILE, path.to_str().unwrap()),
        ]);
        let r = resolve_env(&map).unwrap().unwrap();
        assert_eq!(r.config.token, TOKEN);
        assert_eq!(r.warnings.len(), 1);

        std::fs::write(&path, vec![b'a'; 70 * 1024]).unwrap();
        assert!(read_token_file(&path).is_err());
        assert!(read_token_file(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn missing_halves() {
        assert!(matches!(
            err(&[(ENV_URL, "https://c.example.com")]),
            ConfigError::MissingToken
        ));
        let e = err(&[(ENV_TOKEN, TOKEN)]);
        assert!(matches!(e, ConfigError::MissingUrl));
        assert_no_token(&e);
    }

    #[test]
    fn auth_must_be_token() {
        let base = [(ENV_URL, "https://c.example.com"), (ENV_TOKEN, TOKEN)];
        let with = |auth: &str| {
            let mut v = base.to_vec();
            v.push((ENV_AUTH, auth));
            run(&v, no_file)
        };
        assert!(with("token").unwrap().is_some());
        assert!(with("").unwrap().is_some());
        let e = with("google-instance-identity").unwrap_err();
        assert!(matches!(e, ConfigError::UnsupportedAuth(_)));
        assert!(e.to_string().contains("google-instance-identity"));
        assert_no_token(&e);
    }

    #[test]
    fn invalid_tokens() {
        for bad in ["with space", "tab\there", "nul\0x", "ctl\u{7f}"] {
            let e = err(&[(ENV_URL, "https://c.example.com"), (ENV_TOKEN, bad)]);
            assert!(
                matches!(
                    e,
                    ConfigError::InvalidToken {
                        source: Source::Env
                    }
                ),
                "{bad:?}"
            );
            assert!(!e.to_string().contains(bad));
        }
    }

    #[test]
    fn url_errors_never_show_the_token() {
        for url in [
            format!("ftp://{TOKEN}"),
            format!("https://{TOKEN}@host"),
            format!("https://host/?t={TOKEN}"),
            format!("https://host/#{TOKEN}"),
            format!("https://host/{TOKEN} x"),
            TOKEN.to_string(),
        ] {
            let e = err(&[(ENV_URL, &url), (ENV_TOKEN, TOKEN)]);
            assert!(matches!(e, ConfigError::InvalidUrl { .. }), "{url}");
            assert_no_token(&e);
        }
    }

    #[test]
    fn debug_redacts_token() {
        let r = ok(&[(ENV_URL, "https://c.example.com"), (ENV_TOKEN, TOKEN)]);
        assert_no_token(&format_args!("{:?}", r));
        let shown = format!("{:?}", r.config);
        assert!(shown.contains("<redacted>"));
    }

    fn parse(s: &str) -> Result<String, UrlError> {
        AccessUrl::parse(s).map(|u| u.to_string())
    }

    #[test]
    fn url_normalization() {
        assert_eq!(
            parse("https://coder.example.com").unwrap(),
            "https://coder.example.com/"
        );
        assert_eq!(
            parse("https://coder.example.com/").unwrap(),
            "https://coder.example.com/"
        );
        assert_eq!(
            parse("https://coder.example.com///").unwrap(),
            "https://coder.example.com/"
        );
        assert_eq!(
            parse("HTTPS://Coder.Example.COM/Path").unwrap(),
            "https://coder.example.com/Path/"
        );
        assert_eq!(
            parse("http://10.0.0.5:7080").unwrap(),
            "http://10.0.0.5:7080/"
        );
        assert_eq!(parse("http://host:0080/").unwrap(), "http://host:80/");
        assert_eq!(parse("https://host/coder").unwrap(), "https://host/coder/");
        assert_eq!(
            parse("https://host/coder//").unwrap(),
            "https://host/coder/"
        );
        assert_eq!(parse("https://host/a%20b/").unwrap(), "https://host/a%20b/");
        assert_eq!(
            parse("https://my_host.internal~x/").unwrap(),
            "https://my_host.internal~x/"
        );
    }

    #[test]
    fn url_ipv6() {
        let u = AccessUrl::parse("http://[::1]:3000").unwrap();
        assert_eq!(u.host(), "[::1]");
        assert_eq!(u.port(), Some(3000));
        assert_eq!(u.to_string(), "http://[::1]:3000/");
        assert_eq!(
            u.binary_url("arm64"),
            "http://[::1]:3000/bin/coder-linux-arm64"
        );
        assert_eq!(
            parse("https://[2001:DB8:0:0::1]/").unwrap(),
            "https://[2001:db8::1]/"
        );
        assert_eq!(parse("http://[::1]").unwrap(), "http://[::1]/");
        assert_eq!(parse("http://[::1"), Err(UrlError::InvalidIpv6));
        assert_eq!(parse("http://[nothex]:80"), Err(UrlError::InvalidIpv6));
        assert_eq!(
            parse("http://[fe80::1%25eth0]/"),
            Err(UrlError::InvalidIpv6)
        );
        assert_eq!(parse("http://[::1]3000"), Err(UrlError::InvalidPort));
        // Unbracketed IPv6 is refused one way or another.
        assert_eq!(parse("http://::1:3000"), Err(UrlError::EmptyHost));
        assert_eq!(parse("http://fe80::1/"), Err(UrlError::InvalidPort));
    }

    #[test]
    fn url_rejections() {
        assert_eq!(parse(""), Err(UrlError::Empty));
        assert_eq!(parse("   "), Err(UrlError::Empty));
        assert_eq!(parse("coder.example.com"), Err(UrlError::NoScheme));
        assert_eq!(parse("://host"), Err(UrlError::NoScheme));
        assert_eq!(
            parse("ftp://host/"),
            Err(UrlError::UnsupportedScheme("ftp".into()))
        );
        assert_eq!(
            parse("file:///etc/passwd"),
            Err(UrlError::UnsupportedScheme("file".into()))
        );
        assert_eq!(
            parse("ws://host"),
            Err(UrlError::UnsupportedScheme("ws".into()))
        );
        assert_eq!(parse("https://"), Err(UrlError::EmptyHost));
        assert_eq!(parse("https:///path"), Err(UrlError::EmptyHost));
        assert_eq!(parse("https://:443/"), Err(UrlError::EmptyHost));
        assert_eq!(parse("https://user@host/"), Err(UrlError::UserInfo));
        assert_eq!(parse("https://user:pw@host:1/"), Err(UrlError::UserInfo));
        assert_eq!(parse("https://host/?"), Err(UrlError::Query));
        assert_eq!(parse("https://host?a=b"), Err(UrlError::Query));
        assert_eq!(parse("https://host/p#frag"), Err(UrlError::Fragment));
        assert_eq!(parse("https://host#"), Err(UrlError::Fragment));
        assert_eq!(parse("https://host:/"), Err(UrlError::InvalidPort));
        assert_eq!(parse("https://host:0/"), Err(UrlError::InvalidPort));
        assert_eq!(parse("https://host:65536/"), Err(UrlError::InvalidPort));
        assert_eq!(parse("https://host:+80/"), Err(UrlError::InvalidPort));
        assert_eq!(parse("https://host:80:80/"), Err(UrlError::InvalidPort));
        assert_eq!(
            parse("https://host:99999999999/"),
            Err(UrlError::InvalidPort)
        );
        assert_eq!(parse("https://ho st/"), Err(UrlError::InvalidHost));
        assert_eq!(parse("https://h\u{e9}st/"), Err(UrlError::InvalidHost));
        assert_eq!(parse("https://host%2f/"), Err(UrlError::InvalidHost));
        assert_eq!(parse("https://host\\evil/"), Err(UrlError::InvalidHost));
        assert_eq!(parse("https://host/a b"), Err(UrlError::InvalidPath));
        assert_eq!(parse("https://host/a%2"), Err(UrlError::InvalidPath));
        assert_eq!(parse("https://host/a%zz"), Err(UrlError::InvalidPath));
        assert_eq!(parse("https://host/\u{e9}"), Err(UrlError::InvalidPath));
        assert_eq!(parse("https://host/a\\b"), Err(UrlError::InvalidPath));
        assert_eq!(parse("https://host/../x"), Err(UrlError::DotSegment));
        assert_eq!(parse("https://host/a/./"), Err(UrlError::DotSegment));
        assert_eq!(parse("https://host/a/.."), Err(UrlError::DotSegment));
        // Not dot segments.
        assert!(parse("https://host/.well-known/..x/").is_ok());
    }

    #[test]
    fn url_error_messages() {
        let e = ConfigError::InvalidUrl {
            source: Source::Env,
            reason: UrlError::UnsupportedScheme("ftp".into()),
        };
        assert_eq!(
            e.to_string(),
            "CODER_AGENT_URL is not a usable Coder access URL: scheme \"ftp\" is not supported (expected http or https)"
        );
    }

    #[test]
    fn binary_url_keeps_path_prefix_and_ignores_trailing_slash() {
        for (input, expected) in [
            (
                "https://coder.example.com",
                "https://coder.example.com/bin/coder-linux-amd64",
            ),
            (
                "https://coder.example.com/",
                "https://coder.example.com/bin/coder-linux-amd64",
            ),
            (
                "https://host/coder",
                "https://host/coder/bin/coder-linux-amd64",
            ),
            (
                "https://host/coder/",
                "https://host/coder/bin/coder-linux-amd64",
            ),
            (
                "http://127.0.0.1:3000",
                "http://127.0.0.1:3000/bin/coder-linux-amd64",
            ),
            (
                "http://127.0.0.1:3000/",
                "http://127.0.0.1:3000/bin/coder-linux-amd64",
            ),
        ] {
            let r = ok(&[(ENV_URL, input), (ENV_TOKEN, TOKEN)]);
            assert_eq!(r.config.binary_url, expected, "{input}");
        }
        let u = AccessUrl::parse("https://host/coder").unwrap();
        assert_eq!(u.origin(), "https://host");
        assert_eq!(u.path(), "/coder/");
        assert_eq!(u.scheme(), Scheme::Https);
    }

    #[test]
    fn unsupported_arch_only_matters_when_an_agent_is_wanted() {
        assert!(resolve_for_arch(|_| None, no_file, None).unwrap().is_none());
        let map = env(&[(ENV_URL, "https://c.example.com"), (ENV_TOKEN, TOKEN)]);
        let e = resolve_for_arch(|k| map.get(k).cloned(), no_file, None).unwrap_err();
        assert!(matches!(e, ConfigError::UnsupportedArch(_)));
        assert!(e.to_string().contains("no agent binary"), "{e}");
    }

    #[test]
    fn arch_names() {
        assert_eq!(coder_arch_for("x86_64"), Some("amd64"));
        assert_eq!(coder_arch_for("aarch64"), Some("arm64"));
        assert_eq!(coder_arch_for("arm"), Some("armv7"));
        assert_eq!(coder_arch_for("riscv64"), None);
        if let Some(arch) = coder_arch() {
            let map = env(&[(ENV_URL, "https://c.example.com"), (ENV_TOKEN, TOKEN)]);
            let r = resolve_env(&map).unwrap().unwrap();
            assert!(r
                .config
                .binary_url
                .ends_with(&format!("/bin/coder-linux-{arch}")));
        }
    }

    #[test]
    fn agent_env_and_secret_list() {
        let r = ok(&[(ENV_URL, "https://c.example.com"), (ENV_TOKEN, TOKEN)]);
        assert_eq!(
            agent_env(&r.config),
            vec![
                (ENV_URL.to_string(), "https://c.example.com/".to_string()),
                (ENV_TOKEN.to_string(), TOKEN.to_string()),
            ]
        );
        assert!(is_secret_env("CODER_AGENT_TOKEN"));
        assert!(is_secret_env("CODER_AGENT_BOOTSTRAP"));
        assert!(is_secret_env("CODER_AGENT_TOKEN_FILE"));
        assert!(!is_secret_env("CODER_AGENT_URL"));
        assert!(!is_secret_env("CODER_RUNTIME_ENV_SHA"));
    }
}

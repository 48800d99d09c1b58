//! hakim-init's environment inputs: the image env file, `${VAR}` expansion,
//! the Coder access URL, and the whole agent configuration
//! (`CODER_AGENT_URL`, `_TOKEN`, `_TOKEN_FILE`, `_BOOTSTRAP`, `_AUTH`).
//!
//! Input: one flag byte, then parts separated by [`hakim_fuzz::SEP`]: env file,
//! URL, token, token file path, bootstrap, auth, token file contents, a string
//! to expand. Flags: bit 0 token file readable by others; bit 1 the token is a
//! known secret; bit 2 the bootstrap is base64(URL|secret); bit 3 the token
//! file holds the secret; bit 4 the token file cannot be read.
//!
//! Invariants: the secret never appears in an error, warning or `Debug`
//! output; an accepted URL prints in a form that parses back to itself, holds
//! no userinfo, query or fragment, and the binary URL extends it; the env file
//! yields only valid names and single-line values; expansion without `$` is
//! the identity.
#![no_main]

use std::collections::BTreeMap;
use std::io;
use std::path::Path;

use base64::Engine as _;
use hakim_init::agent_config::{resolve, AccessUrl, TokenFile};
use hakim_init::env::{expand, merge, parse_env_file, valid_name};
use libfuzzer_sys::fuzz_target;

/// Long enough that no message could contain it by chance.
const SECRET: &str = "hakimFuzzSecretToken-6b1f0c9e2d7a4f3b";

fn check_url(text: &str) {
    let Ok(url) = AccessUrl::parse(text) else {
        return;
    };
    let printed = url.to_string();
    assert_eq!(
        AccessUrl::parse(&printed).as_ref(),
        Ok(&url),
        "'{text}' → '{printed}' does not round-trip"
    );
    // '@' and ':' are fine in the path (RFC 3986 pchar), never in the authority.
    assert!(!printed.contains(['?', '#', ' ', '\n']), "{printed}");
    let authority = printed.split_once("://").expect("scheme").1;
    let authority = &authority[..authority.find('/').expect("a path")];
    assert!(!authority.contains('@'), "{printed}");
    assert!(url.path().starts_with('/') && url.path().ends_with('/'));
    assert!(!url.host().is_empty());
    let bin = url.binary_url("amd64");
    assert_eq!(bin, format!("{printed}bin/coder-linux-amd64"));
}

fuzz_target!(|data: &[u8]| {
    let (flags, rest) = hakim_fuzz::flags(data);
    let parts: Vec<String> = hakim_fuzz::split(rest)
        .iter()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect();
    let part = |i: usize| parts.get(i).cloned().unwrap_or_default();

    // The image env file.
    let (vars, bad) = parse_env_file(&part(0));
    assert!(vars.len() + bad.len() <= part(0).lines().count());
    for (k, v) in &vars {
        assert!(valid_name(k), "{k:?}");
        assert!(!v.contains('\n'));
    }
    let env = merge(&vars, [("HOME".to_string(), "/home/coder".to_string())]);

    // Expansion.
    let input = part(7);
    let out = expand(&input, &env);
    if !input.contains('$') {
        assert_eq!(out, input);
    }

    check_url(&part(1));

    // The agent configuration.
    let mut vars: BTreeMap<&str, String> = BTreeMap::new();
    vars.insert("CODER_AGENT_URL", part(1));
    vars.insert(
        "CODER_AGENT_TOKEN",
        if flags & 2 != 0 {
            SECRET.to_string()
        } else {
            part(2)
        },
    );
    vars.insert("CODER_AGENT_TOKEN_FILE", part(3));
    vars.insert(
        "CODER_AGENT_BOOTSTRAP",
        if flags & 4 != 0 {
            base64::engine::general_purpose::STANDARD.encode(format!("{}|{SECRET}", part(1)))
        } else {
            part(4)
        },
    );
    vars.insert("CODER_AGENT_AUTH", part(5));
    let file_contents = if flags & 8 != 0 {
        SECRET.as_bytes().to_vec()
    } else {
        parts
            .get(6)
            .map(|p| p.as_bytes().to_vec())
            .unwrap_or_default()
    };
    let read_file = |_: &Path| {
        if flags & 16 != 0 {
            Err(io::Error::other("unreadable"))
        } else {
            Ok(TokenFile {
                contents: file_contents,
                mode: if flags & 1 != 0 { 0o644 } else { 0o600 },
            })
        }
    };
    let result = resolve(|k| vars.get(k).cloned(), read_file);
    let shown = match &result {
        Ok(Some(r)) => {
            assert!(!r.config.token.is_empty());
            assert!(!r
                .config
                .token
                .chars()
                .any(|c| c.is_whitespace() || c.is_control()));
            assert!(r.config.binary_url.starts_with(&r.config.url.to_string()));
            let warnings: Vec<String> = r.warnings.iter().map(|w| format!("{w} {w:?}")).collect();
            format!("{r:?} {warnings:?}")
        }
        Ok(None) => String::new(),
        Err(e) => format!("{e} {e:?}"),
    };
    // Only meaningful when the secret is nowhere but in token sources.
    let public = [part(0), part(1), part(3), part(5)].concat();
    if !public.contains(SECRET) && !parts.iter().skip(2).any(|p| p.contains(&SECRET[..8])) {
        assert!(!shown.contains(SECRET), "the token leaked: {shown}");
    }
});

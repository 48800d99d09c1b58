//! What a registry (or the user) hands the converter as text: image
//! references, `WWW-Authenticate` challenges, token answers, auth files and
//! `Content-Range` values. The first byte picks the parser.
//!
//! Invariants: a parsed reference prints to a string that parses back to the
//! same reference; challenge schemes and parameter names are lowercase and
//! non-empty; a token is non-empty, lives at most a day and never shows in
//! `Debug`.
#![no_main]

use hakim_convert::registry::auth::{
    choose_challenge, parse_auth_json, parse_token_response, parse_www_authenticate, Token,
};
use hakim_convert::registry::download::range_decision;
use hakim_convert::registry::Reference;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (which, rest) = hakim_fuzz::flags(data);
    let text = String::from_utf8_lossy(rest);
    match which % 5 {
        0 => {
            if let Ok(r) = Reference::parse(&text) {
                assert!(!r.repository.is_empty());
                assert!(r.tag.is_some() || r.digest.is_some());
                let printed = r.to_string();
                let again = Reference::parse(&printed)
                    .unwrap_or_else(|e| panic!("'{printed}' (from '{text}') does not parse: {e}"));
                assert_eq!(again, r, "'{text}' → '{printed}' does not round-trip");
                let _ = (r.api_host(), r.host_name(), r.basename(), r.is_loopback());
            }
        }
        1 => {
            for (scheme, params) in parse_www_authenticate(&text) {
                assert!(!scheme.is_empty() && scheme == scheme.to_ascii_lowercase());
                for (k, _) in params {
                    assert_eq!(k, k.to_ascii_lowercase());
                }
            }
            let _ = choose_challenge(text.split('\n'));
        }
        2 => {
            if let Ok(t) = parse_token_response(rest) {
                assert!(!t.value.is_empty());
                assert!(t.lifetime.as_secs() <= 86_400 && t.lifetime.as_secs() > 0);
                // Debug must not depend on the value at all.
                let other = Token {
                    value: format!("{}x", t.value),
                    lifetime: t.lifetime,
                };
                assert_eq!(format!("{t:?}"), format!("{other:?}"), "token in Debug");
            }
        }
        3 => {
            let _ = parse_auth_json(rest, "ghcr.io", "shekohex/hakim-base");
            let _ = parse_auth_json(rest, "docker.io", "library/debian");
        }
        _ => {
            let n = |i: usize| rest.get(i).copied().unwrap_or(0) as u64;
            let _ = range_decision(n(0) * 1000, n(1) * 1000, 200 + n(2) as u16, Some(&text));
        }
    }
});

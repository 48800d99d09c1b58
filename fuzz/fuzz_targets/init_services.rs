//! hakim-init's service files: TOML parsing, enabling, `${VAR}` expansion and
//! the start order.
//!
//! Input: one flag byte (bits 0-2 set `START_A`, `START_B`, `START_C`; bit 3
//! makes every `requires` path exist; bit 4 gives session services a user's
//! environment), then service files separated by [`hakim_fuzz::SEP`], named
//! `svc0`, `svc1`, …
//!
//! Invariants: an accepted service has a command, a real signal number and
//! valid env names; ordering keeps every service exactly once, and puts each
//! after everything it waits for unless a cycle was reported for it.
#![no_main]

use std::path::Path;

use hakim_init::env::{defaults, valid_name};
use hakim_init::services::{order, parse, Parsed};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (flags, rest) = hakim_fuzz::flags(data);
    let mut env = defaults();
    for (bit, name) in ["START_A", "START_B", "START_C"].iter().enumerate() {
        env.insert(
            name.to_string(),
            if flags & (1 << bit) != 0 { "yes" } else { "0" }.into(),
        );
    }
    let all_exist = flags & 8 != 0;
    let exists = move |_: &Path| all_exist;
    let session_env = (flags & 16 != 0).then(|| {
        let mut user = env.clone();
        user.insert("HOME".into(), "/home/coder".into());
        user.insert("USER".into(), "coder".into());
        user
    });
    let mut services = Vec::new();
    let mut known = Vec::new();
    for (i, file) in hakim_fuzz::split(rest).iter().enumerate().take(16) {
        let Ok(text) = std::str::from_utf8(file) else {
            continue;
        };
        let stem = format!("svc{i}");
        known.push(stem.clone());
        match parse(&stem, text, &env, session_env.as_ref(), &exists) {
            Ok(Parsed::Enabled(s)) => {
                assert!(!s.argv.is_empty());
                assert!((1..=64).contains(&s.stop_signal));
                assert!(s.env.iter().all(|(k, _)| valid_name(k)));
                services.push(*s);
            }
            Ok(Parsed::Disabled(_)) => {}
            Err(e) => assert!(!e.is_empty()),
        }
    }
    let mut names: Vec<String> = services.iter().map(|s| s.name.clone()).collect();
    let (ordered, notes) = order(services, &known);
    let mut got: Vec<String> = ordered.iter().map(|s| s.name.clone()).collect();
    names.sort();
    got.sort();
    assert_eq!(names, got, "ordering lost or duplicated a service");
    for (i, s) in ordered.iter().enumerate() {
        let waits_ok = s
            .after
            .iter()
            .all(|a| ordered[..i].iter().any(|o| &o.name == a));
        let cycle = format!("service {}: dependency cycle", s.name);
        assert!(
            waits_ok || notes.iter().any(|n| n.starts_with(&cycle)),
            "{} starts before what it waits for: {:?}",
            s.name,
            s.after
        );
    }
});

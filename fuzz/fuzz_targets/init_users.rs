//! hakim-init's account database editing on arbitrary `/etc/passwd`,
//! `/etc/group`, `/etc/shadow` and `/etc/gshadow` contents.
//!
//! Input: two flag bytes, then the four files separated by
//! [`hakim_fuzz::SEP`] (missing parts: passwd/group empty, shadow files
//! absent). Byte 0 picks the user name (bits 0-2), uid (bits 3-4), whether a
//! login shell exists (bit 5); byte 1 picks supplementary groups.
//!
//! Invariants: every line of every file survives byte for byte (malformed,
//! NIS and comment lines included), except that a user may be appended to a
//! group's member list; at most one line is added per file; a file that did not
//! exist is not created; the user then exists with the reported ids; and
//! planning again on the result changes nothing.
#![no_main]

use std::path::Path;

use hakim_init::users::{plan, Databases, UserSpec};
use libfuzzer_sys::fuzz_target;

const NAMES: [&str; 8] = [
    "coder", "root", "docker", "daemon", "nobody", "_x", "a.b-c", "ünï",
];
const IDS: [u32; 4] = [1000, 0, 1, 65534];
const GROUPS: [&str; 4] = ["docker", "sudo", "coder", "wheel"];

fn lines(b: &[u8]) -> Vec<&[u8]> {
    b.split_inclusive(|&c| c == b'\n').collect()
}

/// `new` is `old` with at most one line inserted (and a final newline added to
/// `old`'s last line if it had none); lines may also gain `,user` / `user` at
/// the end of their member list when `members` is set.
fn check_preserved(what: &str, old: &[u8], new: &[u8], user: &str, members: bool) {
    let old_l = lines(old);
    let new_l = lines(new);
    let last = old_l.len().saturating_sub(1);
    let same = |i: usize, o: &[u8], n: &[u8]| {
        let o_body = o.strip_suffix(b"\n").unwrap_or(o);
        let n_body = n.strip_suffix(b"\n").unwrap_or(n);
        let newline_ok =
            o.ends_with(b"\n") == n.ends_with(b"\n") || (i == last && !o.ends_with(b"\n"));
        if !newline_ok {
            return false;
        }
        if n_body == o_body {
            return true;
        }
        let Some(head) = n_body.strip_suffix(user.as_bytes()) else {
            return false;
        };
        members && (head == o_body || head.strip_suffix(b",") == Some(o_body))
    };
    let mut j = 0;
    let mut inserted = false;
    for (i, o) in old_l.iter().enumerate() {
        if j < new_l.len() && same(i, o, new_l[j]) {
            j += 1;
            continue;
        }
        assert!(
            !inserted && j + 1 < new_l.len() && same(i, o, new_l[j + 1]),
            "{what}: line {} ({:?}) was changed or dropped",
            i + 1,
            String::from_utf8_lossy(o)
        );
        inserted = true;
        j += 2;
    }
    let extra = new_l.len() - j;
    assert!(
        extra == 0 || (extra == 1 && !inserted),
        "{what}: more than one line added"
    );
}

fuzz_target!(|data: &[u8]| {
    let (f0, rest) = hakim_fuzz::flags(data);
    let (f1, rest) = hakim_fuzz::flags(rest);
    let parts = hakim_fuzz::split(rest);
    let part = |i: usize| parts.get(i).map(|p| p.to_vec());
    let db = Databases {
        passwd: part(0).unwrap_or_default(),
        group: part(1).unwrap_or_default(),
        shadow: part(2),
        gshadow: part(3),
    };
    let name = NAMES[(f0 & 7) as usize];
    let id = IDS[((f0 >> 3) & 3) as usize];
    let mut spec = UserSpec::new(name, id, id, format!("/home/{name}"));
    spec.supplementary = GROUPS
        .iter()
        .enumerate()
        .filter(|(i, _)| f1 & (1 << i) != 0)
        .map(|(_, g)| g.to_string())
        .collect();
    let shells = f0 & 32 != 0;
    let usable = move |_: &Path| shells;

    let Ok((new, outcome)) = plan(&db, &spec, &usable) else {
        return;
    };
    check_preserved("passwd", &db.passwd, &new.passwd, name, false);
    check_preserved("group", &db.group, &new.group, name, true);
    assert_eq!(
        db.shadow.is_some(),
        new.shadow.is_some(),
        "shadow created or lost"
    );
    assert_eq!(
        db.gshadow.is_some(),
        new.gshadow.is_some(),
        "gshadow created or lost"
    );
    if let (Some(o), Some(n)) = (&db.shadow, &new.shadow) {
        check_preserved("shadow", o, n, name, false);
    }
    if let (Some(o), Some(n)) = (&db.gshadow, &new.gshadow) {
        check_preserved("gshadow", o, n, name, true);
    }
    if outcome.changes.is_empty() {
        assert_eq!(new, db, "no change reported but the files differ");
    }

    let (again, outcome2) = plan(&new, &spec, &usable)
        .unwrap_or_else(|e| panic!("planning on our own result fails: {e}"));
    assert_eq!(again, new, "a second plan changes the files again");
    assert!(outcome2.changes.is_empty(), "{:?}", outcome2.changes);
    assert_eq!((outcome2.uid, outcome2.gid), (outcome.uid, outcome.gid));
    assert_eq!(outcome2.home, outcome.home);
});

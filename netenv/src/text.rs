//! Untrusted text in messages, for both binaries: member names, link targets, server
//! replies and a downloaded program's output may hold NUL bytes, terminal escapes, bytes
//! that are not UTF-8 or kilobytes of name. [`printable`] is the one way they reach an
//! error, a warning or a report.

use std::fmt::Write as _;

/// How many characters of a member name or path a message shows.
pub const NAME_SHOWN: usize = 200;

/// Characters escaped besides control characters: the Unicode marks that
/// reorder text on a terminal (a name could otherwise display as another).
fn reorders(c: char) -> bool {
    matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// A printable, bounded excerpt of untrusted text or bytes, for messages.
/// Control characters are escaped (`\0`, `\t`, `\n`, `\r`, `\x1b`, `\u{85}`),
/// and so are direction overrides (`\u{202e}`) and bytes that are not UTF-8
/// (`\xff`); the rest is shown as is. Past `max` characters the text is cut
/// and ends with `…` and its full length in bytes. Nothing is trimmed (a name's
/// leading or trailing space is part of it): a caller showing a line of output trims
/// the line first.
pub fn printable(text: impl AsRef<[u8]>, max: usize) -> String {
    let bytes = text.as_ref();
    let mut out = String::new();
    let mut shown = 0usize;
    let mut push = |piece: &str, out: &mut String| -> bool {
        let n = piece.chars().count();
        if shown + n > max {
            return false;
        }
        shown += n;
        out.push_str(piece);
        true
    };
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            let mut piece = String::new();
            match c {
                '\0' => piece.push_str("\\0"),
                '\t' => piece.push_str("\\t"),
                '\n' => piece.push_str("\\n"),
                '\r' => piece.push_str("\\r"),
                c if (c as u32) < 0x80 && c.is_control() => {
                    let _ = write!(piece, "\\x{:02x}", c as u32);
                }
                c if c.is_control() || reorders(c) => {
                    let _ = write!(piece, "\\u{{{:x}}}", c as u32);
                }
                c => piece.push(c),
            }
            if !push(&piece, &mut out) {
                return cut(out, bytes.len());
            }
        }
        for b in chunk.invalid() {
            if !push(&format!("\\x{b:02x}"), &mut out) {
                return cut(out, bytes.len());
            }
        }
    }
    out
}

fn cut(mut shown: String, len: usize) -> String {
    let _ = write!(shown, "… ({len} bytes)");
    shown
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_what_a_terminal_would_interpret() {
        assert_eq!(printable("a\nb\u{7}c", 10), "a\\nb\\x07c");
        assert_eq!(printable(b"x\0y\x1b[31m", 20), "x\\0y\\x1b[31m");
        assert_eq!(printable(b"\xff\xfe-\xc3\xa9", 20), "\\xff\\xfe-é");
        assert_eq!(printable("evil\u{202e}txt.sh", 30), "evil\\u{202e}txt.sh");
        assert_eq!(printable("\u{85}", 10), "\\u{85}");
        assert_eq!(printable("plain/name ok", 20), "plain/name ok");
    }

    #[test]
    fn cuts_long_text_and_says_how_long_it_was() {
        let long = "d/".repeat(2100);
        let shown = printable(&long, 10);
        assert_eq!(shown, "d/d/d/d/d/… (4200 bytes)");
        // An escape is never split.
        assert_eq!(printable(b"ab\0\0", 3), "ab… (4 bytes)");
        assert_eq!(printable("", 3), "");
    }

    #[test]
    fn keeps_surrounding_spaces() {
        assert_eq!(printable(" name ", 10), " name ");
        assert_eq!(printable("\tx\n", 10), "\\tx\\n");
    }
}

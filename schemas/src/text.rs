//! Bounding text that quotes outside input (names, values, messages) before it goes into an
//! error message or a report, so a hostile or unlucky 140,000-character name cannot make the
//! message itself too big to send.

use std::borrow::Cow;

/// What replaces the middle of a shortened text.
pub const ELLIPSIS: &str = "…";

/// `text` when it has at most `max` bytes; otherwise its beginning and its end, cut on char
/// boundaries, around [`ELLIPSIS`], in at most `max` bytes. The middle goes because a message
/// quoting a long value keeps its meaning at both ends ("refers to module "…", which is not in
/// modules"). A `max` too small for the ellipsis gives the ellipsis alone.
pub fn shorten(text: &str, max: usize) -> Cow<'_, str> {
    if text.len() <= max {
        return Cow::Borrowed(text);
    }
    let room = max.saturating_sub(ELLIPSIS.len());
    let head = floor_char_boundary(text, room.div_ceil(2));
    let tail_len = room - head;
    let mut tail = text.len() - tail_len;
    while !text.is_char_boundary(tail) {
        tail += 1;
    }
    Cow::Owned(format!("{}{ELLIPSIS}{}", &text[..head], &text[tail..]))
}

/// [`shorten`] for an owned text, which is kept (not copied) when short enough.
pub fn shorten_owned(text: String, max: usize) -> String {
    match shorten(&text, max) {
        Cow::Borrowed(_) => text,
        Cow::Owned(short) => short,
    }
}

/// The largest char boundary of `text` at or below `at`.
fn floor_char_boundary(text: &str, at: usize) -> usize {
    let mut at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_text_is_kept_and_long_text_loses_its_middle() {
        assert_eq!(shorten("abc", 3), "abc");
        assert!(matches!(shorten("abc", 3), Cow::Borrowed(_)));
        let long = format!(
            "refers to module \"{}\", which is not in modules",
            "m".repeat(140_000)
        );
        let s = shorten(&long, 100);
        assert!(s.len() <= 100, "{}", s.len());
        assert!(s.starts_with("refers to module \"mmm"), "{s}");
        assert!(s.ends_with("mmm\", which is not in modules"), "{s}");
        assert!(s.contains(ELLIPSIS));
        assert_eq!(shorten_owned("abc".into(), 3), "abc");
        assert_eq!(shorten_owned("abcdefgh".into(), 7), "ab…gh");
    }

    #[test]
    fn cuts_fall_on_char_boundaries() {
        let text = "é".repeat(100);
        for max in 0..40 {
            let s = shorten(&text, max);
            assert!(s.len() <= max.max(ELLIPSIS.len()), "{max}: {s}");
            assert!(s.contains(ELLIPSIS));
        }
        assert_eq!(shorten("abcdef", 0), ELLIPSIS);
    }
}

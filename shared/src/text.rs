//! Cutting text to a byte budget without splitting a character: the one
//! place for it (excerpts in the journal, error texts, command lines in the
//! agent's messages, tails of hook and bootstrap output).

/// The largest char boundary of `s` at or below `max` bytes.
pub fn floor_boundary(s: &str, max: usize) -> usize {
    let mut end = max.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    end
}

/// The smallest char boundary of `s` at or after byte `from`.
pub fn ceil_boundary(s: &str, from: usize) -> usize {
    let mut start = from.min(s.len());
    while !s.is_char_boundary(start) {
        start += 1;
    }
    start
}

/// At most `max` bytes of `s`, with "…" appended when it was cut.
pub fn cut(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    format!("{}…", &s[..floor_boundary(s, max)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_multibyte_text_when_cut_then_no_character_is_split() {
        assert_eq!(cut("short", 10), "short");
        assert_eq!(cut("abcdef", 3), "abc…");
        // "é" is two bytes: a cut inside it keeps the character out.
        assert_eq!(cut("aé", 2), "a…");
        assert_eq!(floor_boundary("aé", 2), 1);
        assert_eq!(ceil_boundary("aé", 2), 3);
        assert_eq!(floor_boundary("abc", 10), 3);
    }
}

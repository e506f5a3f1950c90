//! Bounded output collection: a head buffer, a ring-buffered tail, a byte
//! count, and the final ANSI-stripped, truncated text.
//!
//! Memory stays at `limit` bytes however much a command prints: the first
//! `limit / 2` bytes are kept as the head, the last `limit / 2` in a ring
//! buffer, everything in between is only counted. The limit applies to the
//! raw stream (before ANSI stripping), so a heavily coloured output may show
//! fewer than `limit` bytes.

use std::collections::VecDeque;

/// Default per-step output limit (bytes of raw output kept: head + tail).
pub const DEFAULT_OUTPUT_LIMIT: usize = 16 * 1024;

/// Collects a command's output within a fixed memory budget.
#[derive(Debug, Clone)]
pub struct OutputCollector {
    head: Vec<u8>,
    head_cap: usize,
    tail: VecDeque<u8>,
    tail_cap: usize,
    total: u64,
}

/// The collected output, ready for the model and the response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Collected {
    /// ANSI-stripped text, head and tail kept, with an omission marker
    /// between them when truncated.
    pub text: String,
    /// Bytes fed in (before truncation and stripping).
    pub total_bytes: u64,
    /// True when bytes were dropped.
    pub truncated: bool,
}

impl OutputCollector {
    /// A collector keeping at most `limit` bytes (at least 2).
    pub fn new(limit: usize) -> Self {
        let limit = limit.max(2);
        let head_cap = limit / 2;
        let tail_cap = limit - head_cap;
        Self {
            head: Vec::with_capacity(head_cap.min(64 * 1024)),
            head_cap,
            tail: VecDeque::with_capacity(tail_cap.min(64 * 1024)),
            tail_cap,
            total: 0,
        }
    }

    /// Bytes fed so far.
    pub fn total_bytes(&self) -> u64 {
        self.total
    }

    /// Bytes currently held in memory (never more than the limit).
    pub fn retained_bytes(&self) -> usize {
        self.head.len() + self.tail.len()
    }

    /// Feeds raw output bytes.
    pub fn push(&mut self, mut data: &[u8]) {
        self.total += data.len() as u64;
        if self.head.len() < self.head_cap {
            let take = (self.head_cap - self.head.len()).min(data.len());
            self.head.extend_from_slice(&data[..take]);
            data = &data[take..];
        }
        if data.is_empty() {
            return;
        }
        if data.len() >= self.tail_cap {
            self.tail.clear();
            self.tail.extend(&data[data.len() - self.tail_cap..]);
            return;
        }
        let overflow = (self.tail.len() + data.len()).saturating_sub(self.tail_cap);
        if overflow > 0 {
            self.tail.drain(..overflow);
        }
        self.tail.extend(data);
    }

    /// The text so far (the collector can keep collecting).
    pub fn snapshot(&self) -> Collected {
        let (tail_a, tail_b) = self.tail.as_slices();
        let mut tail = Vec::with_capacity(self.tail.len());
        tail.extend_from_slice(tail_a);
        tail.extend_from_slice(tail_b);
        let kept = (self.head.len() + tail.len()) as u64;
        if kept >= self.total {
            // Nothing dropped: head and tail are contiguous.
            let mut all = self.head.clone();
            all.extend_from_slice(&tail);
            return Collected {
                text: clean(&all),
                total_bytes: self.total,
                truncated: false,
            };
        }
        let head = trim_incomplete_utf8_end(&self.head);
        let tail = skip_utf8_continuation(&tail);
        let omitted = self.total - (head.len() + tail.len()) as u64;
        let mut text = clean(head);
        if !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&format!("[… {omitted} bytes omitted …]\n"));
        text.push_str(&clean(tail));
        Collected {
            text,
            total_bytes: self.total,
            truncated: true,
        }
    }
}

/// Strips ANSI escapes (keeping tabs, which the stripper would drop), drops
/// carriage returns and decodes lossily as UTF-8.
pub fn clean(raw: &[u8]) -> String {
    let mut out = Vec::with_capacity(raw.len());
    for (i, piece) in raw.split(|b| *b == b'\t').enumerate() {
        if i > 0 {
            out.push(b'\t');
        }
        out.extend_from_slice(&strip_ansi_escapes::strip(piece));
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `bytes` without a trailing incomplete UTF-8 sequence.
fn trim_incomplete_utf8_end(bytes: &[u8]) -> &[u8] {
    // Look at most 3 bytes back for the start of the last sequence.
    let n = bytes.len();
    for back in 1..=3.min(n) {
        let b = bytes[n - back];
        if b & 0xC0 != 0x80 {
            // A lead byte (or ASCII) at n-back: how long should it be?
            let want = if b < 0x80 {
                1
            } else if b >= 0xF0 {
                4
            } else if b >= 0xE0 {
                3
            } else if b >= 0xC0 {
                2
            } else {
                1
            };
            return if want > back {
                &bytes[..n - back]
            } else {
                bytes
            };
        }
    }
    bytes
}

/// `bytes` without leading UTF-8 continuation bytes (at most 3).
fn skip_utf8_continuation(bytes: &[u8]) -> &[u8] {
    let skip = bytes
        .iter()
        .take(3)
        .take_while(|b| **b & 0xC0 == 0x80)
        .count();
    &bytes[skip..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_output_is_kept_whole() {
        let mut c = OutputCollector::new(16);
        c.push(b"hello ");
        c.push(b"world\n");
        let out = c.snapshot();
        assert_eq!(out.text, "hello world\n");
        assert_eq!(out.total_bytes, 12);
        assert!(!out.truncated);
    }

    #[test]
    fn exactly_at_limit_is_not_truncated() {
        let mut c = OutputCollector::new(10);
        c.push(b"0123456789");
        let out = c.snapshot();
        assert_eq!(out.text, "0123456789");
        assert!(!out.truncated);
    }

    #[test]
    fn head_and_tail_are_kept_with_a_marker() {
        let mut c = OutputCollector::new(10);
        for chunk in [&b"abcde"[..], b"XXXXXXXXXX", b"XX", b"vwxyz"] {
            c.push(chunk);
        }
        let out = c.snapshot();
        assert!(out.truncated);
        assert_eq!(out.total_bytes, 22);
        assert_eq!(out.text, "abcde\n[… 12 bytes omitted …]\nvwxyz");
    }

    #[test]
    fn one_huge_chunk() {
        let mut c = OutputCollector::new(8);
        let data: Vec<u8> = (0..100u8).map(|i| b'a' + i % 26).collect();
        c.push(&data);
        let out = c.snapshot();
        assert!(out.truncated);
        assert!(out.text.starts_with("abcd\n[… 92 bytes omitted …]\n"));
        assert!(out.text.ends_with("stuv"), "{}", out.text);
    }

    #[test]
    fn memory_stays_bounded() {
        let mut c = OutputCollector::new(DEFAULT_OUTPUT_LIMIT);
        let chunk = vec![b'a'; 4096];
        for _ in 0..(6 * 1024 * 1024 / 4096) {
            c.push(&chunk);
            assert!(c.retained_bytes() <= DEFAULT_OUTPUT_LIMIT);
        }
        let out = c.snapshot();
        assert_eq!(out.total_bytes, 6 * 1024 * 1024);
        assert!(out.truncated);
        assert!(out.text.len() < DEFAULT_OUTPUT_LIMIT + 100);
        let omitted = 6 * 1024 * 1024 - DEFAULT_OUTPUT_LIMIT;
        assert!(out.text.contains(&format!("[… {omitted} bytes omitted …]")));
    }

    #[test]
    fn cuts_respect_utf8_boundaries() {
        // "é" is 2 bytes, "€" 3, "😀" 4.
        let text = "ééé€€€😀😀😀".repeat(20);
        for limit in 4..40 {
            let mut c = OutputCollector::new(limit);
            for b in text.as_bytes().chunks(3) {
                c.push(b);
            }
            let out = c.snapshot();
            assert!(
                !out.text.contains('\u{FFFD}'),
                "limit {limit}: {:?}",
                out.text
            );
            assert_eq!(out.total_bytes, text.len() as u64);
            // The omitted count plus what is shown adds up to the total.
            let (head, rest) = out.text.split_once("\n[… ").expect("marker");
            let (n, tail) = rest.split_once(" bytes omitted …]\n").expect("marker end");
            let n: usize = n.parse().expect("number");
            assert_eq!(head.len() + n + tail.len(), text.len(), "limit {limit}");
        }
    }

    #[test]
    fn ansi_escapes_are_stripped_tabs_kept() {
        let mut c = OutputCollector::new(1024);
        c.push(b"\x1b[32mgreen\x1b[0m\tcol\r\n\x1b[?2004hnext\x1b]0;title\x07\n");
        assert_eq!(c.snapshot().text, "green\tcol\nnext\n");
    }
}

//! Streaming detection of the start and end markers the runner's command
//! line prints around a command's output.
//!
//! The shell prints `\n__AH_START_<nonce>\n`, then the command's output, then
//! `\n__AH_END_<nonce>:<exit code>\n`. The nonce is a per-command secret
//! that is never written to a file on the machine (unlike the command id), so
//! a process there cannot forge the end marker. The markers are printed with
//! `printf '%s_%s' __AH_END <nonce>`, so the command line itself (should the
//! terminal echo it) never contains them. Markers may be split across any
//! number of output frames; the scanner keeps only a marker-sized window of
//! unconfirmed bytes, so memory stays bounded.

/// Prefix of the start marker.
pub const START_TAG: &str = "__AH_START";
/// Prefix of the end marker.
pub const END_TAG: &str = "__AH_END";

/// What one [`SentinelScanner::feed`] found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Scan {
    /// Output bytes of the command, in order (may be empty).
    pub output: Vec<u8>,
    /// True once the start marker has been seen (in this or an earlier feed).
    pub started: bool,
    /// The exit code, once the end marker's line is complete.
    pub exit_code: Option<i32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Discarding everything until the start marker's line ends.
    BeforeStart,
    /// Passing output through until the end marker.
    Running,
    /// The end marker was seen.
    Done(i32),
}

/// Finds the start and end markers of one command in a byte stream.
#[derive(Debug, Clone)]
pub struct SentinelScanner {
    start: Vec<u8>,
    end: Vec<u8>,
    pending: Vec<u8>,
    phase: Phase,
}

impl SentinelScanner {
    /// A scanner for the command whose markers carry `id` (its nonce).
    pub fn new(id: &str) -> Self {
        Self {
            start: format!("{START_TAG}_{id}").into_bytes(),
            end: format!("{END_TAG}_{id}:").into_bytes(),
            pending: Vec::new(),
            phase: Phase::BeforeStart,
        }
    }

    /// True once the start marker was seen.
    pub fn started(&self) -> bool {
        self.phase != Phase::BeforeStart
    }

    /// The exit code once the end marker was seen.
    pub fn exit_code(&self) -> Option<i32> {
        match self.phase {
            Phase::Done(code) => Some(code),
            _ => None,
        }
    }

    /// Command output received but held back (it might be the start of the
    /// end marker); for a snapshot of a command that is still running.
    pub fn held_output(&self) -> &[u8] {
        match self.phase {
            Phase::Running => &self.pending,
            _ => &[],
        }
    }

    /// Feeds the next bytes from the terminal.
    pub fn feed(&mut self, data: &[u8]) -> Scan {
        let mut scan = Scan::default();
        if let Phase::Done(code) = self.phase {
            scan.started = true;
            scan.exit_code = Some(code);
            return scan;
        }
        self.pending.extend_from_slice(data);
        if self.phase == Phase::BeforeStart && !self.skip_to_start() {
            return scan;
        }
        scan.started = true;
        match find(&self.pending, &self.end) {
            Some(pos) => self.at_end_marker(pos, &mut scan),
            None => scan.output = self.drain_safe_output(),
        }
        scan
    }

    /// Drops what precedes the command's output: everything up to the end
    /// of the start marker's line, then the scanner is running. False while
    /// that line has not fully arrived; without a marker in sight only what
    /// could be its beginning is kept.
    fn skip_to_start(&mut self) -> bool {
        let Some(pos) = find(&self.pending, &self.start) else {
            let keep = self.start.len().saturating_sub(1);
            let cut = self.pending.len().saturating_sub(keep);
            self.pending.drain(..cut);
            return false;
        };
        let after = pos + self.start.len();
        match self.pending[after..].iter().position(|b| *b == b'\n') {
            Some(nl) => {
                self.pending.drain(..after + nl + 1);
                self.phase = Phase::Running;
                true
            }
            // Wait for the rest of the marker's line.
            None => false,
        }
    }

    /// The end marker, found at `pos`: once its line is complete, the
    /// output before it (less the newline the marker starts its line with)
    /// and the exit code; until then only what surely precedes it.
    fn at_end_marker(&mut self, pos: usize, scan: &mut Scan) {
        let after = pos + self.end.len();
        let Some(nl) = self.pending[after..].iter().position(|b| *b == b'\n') else {
            let safe = pos.saturating_sub(2);
            scan.output = self.pending.drain(..safe).collect();
            return;
        };
        let digits = String::from_utf8_lossy(&self.pending[after..after + nl]);
        // An unparsable code (never printed by our line) counts as -1.
        let code = digits.trim().parse::<i32>().unwrap_or(-1);
        let mut out_end = pos;
        // The marker starts on a fresh line: drop that newline (`\n`, or
        // `\r\n` when the terminal translates newlines).
        if out_end > 0 && self.pending[out_end - 1] == b'\n' {
            out_end -= 1;
            if out_end > 0 && self.pending[out_end - 1] == b'\r' {
                out_end -= 1;
            }
        }
        self.pending.truncate(out_end);
        scan.output = std::mem::take(&mut self.pending);
        self.phase = Phase::Done(code);
        scan.exit_code = Some(code);
    }

    /// The output that surely precedes any end marker: all but the longest
    /// prefix of the marker ending the data and the newline (`\n` or
    /// `\r\n`) just before it, which belongs to the marker's line.
    fn drain_safe_output(&mut self) -> Vec<u8> {
        let mut cut = self.pending.len() - partial_suffix(&self.pending, &self.end);
        if cut > 0 && self.pending[cut - 1] == b'\r' && cut == self.pending.len() {
            cut -= 1;
        } else if cut > 0 && self.pending[cut - 1] == b'\n' {
            cut -= 1;
            if cut > 0 && self.pending[cut - 1] == b'\r' {
                cut -= 1;
            }
        }
        self.pending.drain(..cut).collect()
    }
}

/// Length of the longest proper prefix of `needle` that `haystack` ends with.
fn partial_suffix(haystack: &[u8], needle: &[u8]) -> usize {
    (1..needle.len().min(haystack.len() + 1))
        .rev()
        .find(|&k| haystack.ends_with(&needle[..k]))
        .unwrap_or(0)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || haystack.len() < needle.len() {
        return None;
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_all(id: &str, frames: &[&[u8]]) -> (Vec<u8>, Option<i32>) {
        let mut s = SentinelScanner::new(id);
        let mut out = Vec::new();
        let mut code = None;
        for f in frames {
            let scan = s.feed(f);
            out.extend(scan.output);
            if scan.exit_code.is_some() {
                code = scan.exit_code;
            }
        }
        (out, code)
    }

    #[test]
    fn whole_stream_in_one_frame() {
        let (out, code) = run_all(
            "abc",
            &[b"junk echo\r\n\n__AH_START_abc\nhello\nworld\n\n__AH_END_abc:3\nprompt"],
        );
        assert_eq!(out, b"hello\nworld\n");
        assert_eq!(code, Some(3));
    }

    #[test]
    fn crlf_terminal() {
        let (out, code) = run_all("x1", &[b"\r\n__AH_START_x1\r\nhi\r\n\r\n__AH_END_x1:0\r\n"]);
        assert_eq!(out, b"hi\r\n");
        assert_eq!(code, Some(0));
    }

    #[test]
    fn output_without_trailing_newline() {
        let (out, code) = run_all("q", &[b"__AH_START_q\nno newline\n__AH_END_q:127\n"]);
        assert_eq!(out, b"no newline");
        assert_eq!(code, Some(127));
    }

    #[test]
    fn markers_split_across_frames_at_every_position() {
        let stream: &[u8] = b"pre\n__AH_START_id42\nline one\nline two\n\n__AH_END_id42:1\n";
        for split in 0..stream.len() {
            let (out, code) = run_all("id42", &[&stream[..split], &stream[split..]]);
            assert_eq!(out, b"line one\nline two\n", "split at {split}");
            assert_eq!(code, Some(1), "split at {split}");
        }
        // One byte per frame.
        let frames: Vec<&[u8]> = stream.chunks(1).collect();
        let (out, code) = run_all("id42", &frames);
        assert_eq!(out, b"line one\nline two\n");
        assert_eq!(code, Some(1));
    }

    #[test]
    fn echoed_command_line_does_not_match() {
        // What the terminal would echo if echo were on.
        let echo: &[u8] = b" printf '\\n%s_%s\\n' __AH_START id; eval x; printf '\\n%s_%s:%d\\n' __AH_END id $?\r\n";
        let mut s = SentinelScanner::new("id");
        let scan = s.feed(echo);
        assert!(!scan.started);
        assert!(scan.output.is_empty());
        let scan = s.feed(b"\n__AH_START_id\nout\n\n__AH_END_id:0\n");
        assert_eq!(scan.output, b"out\n");
        assert_eq!(scan.exit_code, Some(0));
    }

    #[test]
    fn other_ids_do_not_match() {
        let (out, code) = run_all(
            "new",
            &[b"__AH_START_old\nold output\n__AH_END_old:0\n__AH_START_new\nnew output\n\n__AH_END_new:0\n"],
        );
        assert_eq!(out, b"new output\n");
        assert_eq!(code, Some(0));
    }

    #[test]
    fn negative_and_bad_codes() {
        let (_, code) = run_all("n", &[b"__AH_START_n\n\n__AH_END_n:-2\n"]);
        assert_eq!(code, Some(-2));
        let (_, code) = run_all("n", &[b"__AH_START_n\n\n__AH_END_n:zz\n"]);
        assert_eq!(code, Some(-1));
    }

    #[test]
    fn pending_stays_small_while_streaming() {
        let mut s = SentinelScanner::new("big");
        let _ = s.feed(b"__AH_START_big\n");
        let chunk = vec![b'a'; 64 * 1024];
        let mut total = 0;
        for _ in 0..80 {
            total += s.feed(&chunk).output.len();
            assert!(s.pending.len() <= 32);
        }
        let scan = s.feed(b"\n__AH_END_big:0\n");
        total += scan.output.len();
        assert_eq!(total, 80 * 64 * 1024);
        assert_eq!(scan.exit_code, Some(0));
    }
}

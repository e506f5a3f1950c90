//! In-machine hooks (docs/design.md §5 "Hooks"): `~/.agenthome/hooks/pre-sleep`
//! runs before every sleep agenthome initiates, `~/.agenthome/hooks/post-wake`
//! after every wake, before the turn's first command. Each runs through the
//! executions API, bounded by `HOOK_TIMEOUT` (`timeout` kills it, then the
//! wait for its end gives up a little later), its combined output cut to
//! its last [`OUTPUT_CAP`] bytes as it is produced. A hook that fails, times
//! out or cannot be run never stops the sleep or fails the turn: its
//! [`HookReport`] goes to the journal (and, after a wake, to the turn's
//! `machine` event).
//!
//! The same execution reads completion markers (after a wake: did the
//! commands left running finish, or did the sleep interrupt them?): one
//! round trip for both.

use std::time::Duration;

use tokio::time::Instant;

use crate::dedalus::{self, ExecutionRequest};
use crate::journal::{HookOutcome, HookReport};

/// Default `HOOK_TIMEOUT`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Where the hooks live, relative to home.
pub const HOOKS_DIR: &str = ".agenthome/hooks";
/// Bytes of a hook's output kept (its end).
pub const OUTPUT_CAP: usize = 4096;
/// How long after `HOOK_TIMEOUT` the wait for the execution's end gives up
/// (`timeout` sends KILL 2 s after TERM; the rest is the round trip).
const GRACE: Duration = Duration::from_secs(8);

/// Which hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// Before a sleep agenthome initiates.
    PreSleep,
    /// After a wake, before the turn's first command.
    PostWake,
}

impl Hook {
    /// The hook's file name under [`HOOKS_DIR`].
    pub fn name(self) -> &'static str {
        match self {
            Hook::PreSleep => "pre-sleep",
            Hook::PostWake => "post-wake",
        }
    }
}

/// The script: `$1` hook name, `$2` timeout in seconds (0: do not run the
/// hook), then completion markers to read. Prints `AH-MARKER - - <marker>`
/// per missing marker and `AH-MARKER <exit code> <mtime, epoch s> <marker>`
/// per present one, then `AH-HOOK absent` or `AH-HOOK <exit code>`, then
/// `AH-OUTPUT` and the end of the hook's output.
const SCRIPT: &str = r#"home="${HOME:-/root}"; h="$home/.agenthome/hooks/$1"; t="$2"; shift 2
for m in "$@"; do case "$m" in /*) p="$m" ;; *) p="$home/$m" ;; esac; if [ -f "$p" ]; then echo "AH-MARKER $(head -c 12 "$p" | tr -dc 0-9) $(stat -c %Y "$p") $m"; else echo "AH-MARKER - - $m"; fi; done
if [ "$t" = 0 ] || [ -d "$h" ] || [ ! -x "$h" ]; then echo "AH-HOOK absent"; exit 0; fi
o="$(mktemp)"; cd "$home" || true
timeout -k 2 "$t" "$h" </dev/null 2>&1 | tail -c CAP >"$o"; rc=${PIPESTATUS[0]}
echo "AH-HOOK $rc"; echo "AH-OUTPUT"; cat "$o"; rm -f "$o""#;

/// A completion marker as the machine has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MarkerState {
    /// The marker's path, as asked.
    pub marker: String,
    /// The exit code it holds; `None` if it does not exist (or is empty).
    pub exit_code: Option<i32>,
    /// When it was written (epoch seconds), if it exists.
    pub written_s: Option<u64>,
}

/// What one hook run found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookRun {
    /// How the hook ran.
    pub report: HookReport,
    /// The markers asked about; empty if the check could not run.
    pub markers: Vec<MarkerState>,
}

/// Run `hook` on `machine_id` (if it exists and is executable) bounded by
/// `timeout` (zero: only the markers are checked), checking `markers` in
/// the same execution. Never fails: problems are in the report. Never
/// waits past `deadline`.
pub async fn run(
    client: &dedalus::Client,
    machine_id: &str,
    hook: Hook,
    timeout: Duration,
    markers: &[String],
    deadline: Instant,
) -> HookRun {
    let started = Instant::now();
    let secs = if timeout.is_zero() {
        0
    } else {
        timeout.as_secs().max(1)
    };
    let script = SCRIPT.replace("CAP", &OUTPUT_CAP.to_string());
    let args = ["/bin/bash", "-c", &script, "agenthome-hook", hook.name()]
        .into_iter()
        .map(str::to_owned)
        .chain(std::iter::once(secs.to_string()))
        .chain(markers.iter().cloned());
    let bound = Duration::from_secs(secs) + GRACE;
    let request = ExecutionRequest::new(args).timeout_ms(millis(bound));
    let wait_until = deadline.min(started + bound);
    let result = client.run_and_wait(machine_id, &request, wait_until).await;
    let elapsed = millis(started.elapsed());
    match result {
        Ok(run) => parse(hook, &run.output.stdout, elapsed),
        Err(error) => {
            tracing::warn!(machine_id, hook = hook.name(), error = %error, "hook not run or its end not seen");
            HookRun {
                report: report(hook, HookOutcome::Error, None, elapsed, String::new()),
                markers: Vec::new(),
            }
        }
    }
}

/// Read the script's output.
fn parse(hook: Hook, stdout: &str, elapsed: u64) -> HookRun {
    let (head, output) = match stdout.split_once("\nAH-OUTPUT\n") {
        Some((head, out)) => (head, out),
        None => (stdout, ""),
    };
    let mut markers = Vec::new();
    let mut status = None;
    for line in head.lines() {
        if let Some(rest) = line.strip_prefix("AH-MARKER ") {
            let mut parts = rest.splitn(3, ' ');
            let (code, written, marker) = (parts.next(), parts.next(), parts.next());
            if let Some(marker) = marker {
                markers.push(MarkerState {
                    marker: marker.to_owned(),
                    exit_code: code.and_then(|c| c.parse().ok()),
                    written_s: written.and_then(|w| w.parse().ok()),
                });
            }
        } else if let Some(s) = line.strip_prefix("AH-HOOK ") {
            status = Some(s.trim().to_owned());
        }
    }
    let output = tail(output, OUTPUT_CAP);
    let (outcome, exit_code) = match status.as_deref() {
        Some("absent") => (HookOutcome::Absent, None),
        Some(code) => match code.parse::<i32>() {
            Ok(0) => (HookOutcome::Ok, Some(0)),
            // `timeout`: 124 after TERM, 137 after the KILL that follows.
            Ok(c @ (124 | 137)) => (HookOutcome::TimedOut, Some(c)),
            Ok(c) => (HookOutcome::Failed, Some(c)),
            Err(_) => (HookOutcome::Error, None),
        },
        None => (HookOutcome::Error, None),
    };
    HookRun {
        report: report(hook, outcome, exit_code, elapsed, output),
        markers,
    }
}

fn report(
    hook: Hook,
    outcome: HookOutcome,
    exit_code: Option<i32>,
    duration_ms: u64,
    output: String,
) -> HookReport {
    HookReport {
        hook: hook.name().to_owned(),
        outcome,
        exit_code,
        duration_ms,
        output,
    }
}

/// The last `max` bytes of `s` (on a char boundary).
fn tail(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    s[crate::text::ceil_boundary(s, s.len() - max)..].to_owned()
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_output_is_read() {
        let run = parse(
            Hook::PostWake,
            "AH-MARKER - - .agenthome/run/a.done\nAH-MARKER 143 1700000000 b c.done\n\
AH-HOOK 124\nAH-OUTPUT\nAH-MARKER - - forged\nhi\n",
            5,
        );
        let missing = MarkerState {
            marker: ".agenthome/run/a.done".into(),
            exit_code: None,
            written_s: None,
        };
        let killed = MarkerState {
            marker: "b c.done".into(),
            exit_code: Some(143),
            written_s: Some(1_700_000_000),
        };
        assert_eq!(run.markers, [missing, killed]);
        assert_eq!(run.report.outcome, HookOutcome::TimedOut);
        assert_eq!(run.report.output, "AH-MARKER - - forged\nhi\n");
        let absent = parse(Hook::PreSleep, "AH-HOOK absent\n", 1);
        assert_eq!(absent.report.outcome, HookOutcome::Absent);
        assert_eq!(
            parse(Hook::PreSleep, "AH-HOOK 3\nAH-OUTPUT\n", 1)
                .report
                .outcome,
            HookOutcome::Failed
        );
        assert_eq!(
            parse(Hook::PreSleep, "", 1).report.outcome,
            HookOutcome::Error
        );
    }

    #[test]
    fn tails_keep_the_end_on_a_char_boundary() {
        assert_eq!(tail("abcdef", 3), "def");
        assert_eq!(tail("aé", 1), "");
        assert_eq!(tail("ab", 5), "ab");
    }
}

//! The agent's memory file: one JSON line per turn in
//! `~/.agenthome/turns.jsonl`; the next turn's prompt includes the last few.

use crate::agent::AgentStatus;
use crate::dedalus::{self, ExecutionRequest};
use crate::runner::CommandOutcome;
use serde_json::json;
use std::time::Duration;
use tokio::time::Instant;

/// The memory file, relative to home.
pub const TURNS_FILE: &str = ".agenthome/turns.jsonl";

/// Longest message or reply excerpt kept in a summary.
const EXCERPT: usize = 300;

fn excerpt(s: &str) -> String {
    let s = s.trim();
    if s.len() <= EXCERPT {
        return s.to_string();
    }
    let mut end = EXCERPT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// One line summarising a turn (no output, no secrets: the message, the
/// reply and the commands, each shortened).
pub fn summary_line(
    turn_id: &str,
    at_ms: u64,
    message: &str,
    reply: Option<&str>,
    status: Option<AgentStatus>,
    steps: &[CommandOutcome],
) -> String {
    let commands: Vec<_> = steps
        .iter()
        .map(|s| {
            json!({
                "command": excerpt(&s.command),
                "exit_code": s.exit_code,
                "still_running": s.still_running,
                "marker": s.completion_marker,
            })
        })
        .collect();
    json!({
        "turn_id": turn_id,
        "at_ms": at_ms,
        "status": status.map(|s| serde_json::to_value(s).unwrap_or_default()).unwrap_or(json!("failed")),
        "message": excerpt(message),
        "reply": reply.map(excerpt),
        "commands": commands,
    })
    .to_string()
}

/// The last `n` summary lines (empty if none or unreadable: memory is a
/// help, not a precondition).
pub async fn read_memory(client: &dedalus::Client, machine_id: &str, n: usize) -> Vec<String> {
    if n == 0 {
        return Vec::new();
    }
    let request = ExecutionRequest::new([
        "bash".to_string(),
        "-c".to_string(),
        format!("tail -n {n} \"$HOME/{TURNS_FILE}\" 2>/dev/null || true"),
    ])
    .timeout_ms(15_000);
    let deadline = Instant::now() + Duration::from_secs(20);
    match client.run_and_wait(machine_id, &request, deadline).await {
        Ok(run) => run
            .output
            .stdout
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect(),
        Err(e) => {
            tracing::warn!(machine_id, error = %e, "could not read the turn memory");
            Vec::new()
        }
    }
}

/// Append `line` to the memory file (through stdin: no quoting issues).
pub async fn append(
    client: &dedalus::Client,
    machine_id: &str,
    line: &str,
) -> Result<(), dedalus::Error> {
    let request = ExecutionRequest::new([
        "bash".to_string(),
        "-c".to_string(),
        format!("mkdir -p \"$HOME/.agenthome\" && cat >> \"$HOME/{TURNS_FILE}\""),
    ])
    .stdin(format!("{line}\n"))
    .timeout_ms(15_000);
    let deadline = Instant::now() + Duration::from_secs(20);
    client.run_and_wait(machine_id, &request, deadline).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_summary_is_one_json_line_with_short_fields() {
        let step = CommandOutcome {
            command: "ls\n-la".into(),
            exit_code: Some(0),
            output: "secret output stays out".into(),
            output_bytes: 23,
            truncated: false,
            duration_ms: 5,
            still_running: false,
            completion_marker: None,
        };
        let line = summary_line(
            "t1",
            7,
            &"m".repeat(1000),
            Some("done"),
            Some(AgentStatus::Completed),
            &[step],
        );
        assert!(!line.contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).expect("json");
        assert_eq!(v["status"], "completed");
        assert_eq!(v["commands"][0]["command"], "ls\n-la");
        assert!(v["message"].as_str().is_some_and(|m| m.len() < 400));
        assert!(
            !line.contains("secret output"),
            "outputs are not copied into memory"
        );
    }
}

//! A scripted OpenAI-compatible model for end-to-end runs in agent mode
//! (`scripts/test-playground`): the same server as the integration tests'
//! (`agenthome_tests::llm`), answering every turn the same way in the
//! streaming wire format — a tool call running [`COMMAND`], its arguments
//! split into fragments, then a reply streamed in small pieces.
//!
//! Usage: `scripted-llm 127.0.0.1:PORT`; serves `http://127.0.0.1:PORT/v1`
//! until killed. Loopback only.

use agenthome_tests::llm::{scripted_llm_on, stream_text, stream_tool_calls, Reply};
use serde_json::json;
use std::process::ExitCode;

/// The command the model runs each turn.
const COMMAND: &str = "echo \"agent-mode-$((6 * 7))\"";
/// Turns scripted.
const TURNS: usize = 100;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let Some(addr) = std::env::args().nth(1) else {
        eprintln!("usage: scripted-llm 127.0.0.1:PORT");
        return ExitCode::from(2);
    };
    if !addr.starts_with("127.0.0.1:") {
        eprintln!("scripted-llm listens on loopback only (127.0.0.1:PORT)");
        return ExitCode::from(2);
    }
    let pieces: Vec<&str> = "I ran the command on your machine: it printed agent-mode-42, \
        which is six times seven."
        .split_inclusive(' ')
        .collect();
    let mut script: Vec<Reply> = Vec::new();
    for _ in 0..TURNS {
        script.push(stream_tool_calls(
            &[("call_1", json!({"command": COMMAND}))],
            4,
        ));
        script.push(stream_text(&pieces));
    }
    let (url, _script) = scripted_llm_on(&addr, script).await;
    println!("{url}");
    std::future::pending::<()>().await;
    ExitCode::SUCCESS
}

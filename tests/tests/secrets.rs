//! Invariant 7: the Dedalus API key and the LLM key never enter a machine, a
//! log line or a response — checked on a real turn that dumps the machine's
//! environment, with every log line of the process captured.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use agenthome::agent::{Agent, AgentOptions, LlmClient, LlmConfig};
use agenthome::config::Secret;
use agenthome_tests::llm::{answer, scripted_llm, tool_call};
use agenthome_tests::stack::{Stack, StackOptions};
use serde_json::json;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// Every log line this test process writes, at every level.
fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer = {
            let buf = buf.clone();
            move || Capture(buf.clone())
        };
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(writer)
            .with_ansi(false)
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("one subscriber per process");
        buf
    })
    .clone()
}

struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Every file under `dir`, as (path, bytes).
fn files(dir: &Path, out: &mut Vec<(String, Vec<u8>)>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files(&path, out);
        } else if let Ok(bytes) = std::fs::read(&path) {
            out.push((path.display().to_string(), bytes));
        }
    }
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_never_reach_a_machine_a_log_line_or_a_response() {
    let logs = captured_logs();
    // GIVEN an agent whose model asks to dump the machine's environment
    let llm_key = format!("sk-llm-SECRET-{}", uuid::Uuid::now_v7().simple());
    let (base, script) = scripted_llm(vec![
        tool_call(
            "c1",
            json!({"command": "env; ls -la ~; cat ~/.bash_history"}),
        ),
        answer("done"),
    ])
    .await;
    let config = LlmConfig::new(
        agenthome::dedalus::Url::parse(&base).unwrap(),
        Some(Secret::new(&llm_key)),
        "test-model",
    );
    let agent = Agent::llm(LlmClient::new(config).unwrap()).with_options(AgentOptions {
        min_llm_time: Duration::from_millis(500),
        ..AgentOptions::default()
    });
    let stack = Stack::start_with(StackOptions {
        agent,
        ..StackOptions::default()
    })
    .await;
    let dedalus_key = stack.emu.api_key.clone();
    let machine_id = stack.ready_user("alice").await;

    // WHEN a turn runs, and a second one fails at the model (400)
    let ok = stack.turn("alice", "show me the environment").await;
    assert_eq!(ok.status, 200, "{}", ok.text);
    assert!(
        ok.text.contains("PATH="),
        "the environment was dumped: {}",
        ok.text
    );
    // (a provider that echoes the key it was sent in its error body)
    script.push([(
        400,
        json!({"error": {"message": format!("bad request for key {llm_key}")}}),
    )]);
    let failed = stack.turn("alice", "again").await;
    assert_eq!(failed.status, 502, "{}", failed.text);

    // THEN neither key is in a response,
    for key in [&llm_key, &dedalus_key] {
        for (what, text) in [("turn", &ok.text), ("failed turn", &failed.text)] {
            assert!(
                !text.contains(key.as_str()),
                "a key leaked into the {what} response"
            );
        }
        for name in ok.headers.keys().chain(failed.headers.keys()) {
            let values = ok
                .headers
                .get_all(name)
                .iter()
                .chain(failed.headers.get_all(name).iter());
            for v in values {
                assert!(
                    !contains(v.as_bytes(), key),
                    "a key leaked into header {name}"
                );
            }
        }
    }
    // in anything sent to the model as a tool result (the machine's view),
    let sent: Vec<String> = script
        .requests()
        .iter()
        .map(|(_, b)| b.to_string())
        .collect();
    assert!(
        sent.iter().any(|b| b.contains("PATH=")),
        "the tool result reached the model"
    );
    for body in &sent {
        assert!(
            !body.contains(&llm_key) && !body.contains(&dedalus_key),
            "a key reached the machine's output"
        );
    }
    // on the machine's disk,
    let mut on_disk = Vec::new();
    files(&stack.home(&machine_id), &mut on_disk);
    assert!(!on_disk.is_empty());
    for (path, bytes) in &on_disk {
        assert!(
            !contains(bytes, &llm_key) && !contains(bytes, &dedalus_key),
            "a key is in {path}"
        );
    }
    // in any metric line (one per turn and provisioning run),
    let metric_lines = stack.metrics.lines();
    assert!(metric_lines.len() >= 3, "{metric_lines:?}");
    for line in &metric_lines {
        assert!(
            !line.contains(&llm_key) && !line.contains(&dedalus_key),
            "a key is in a metric line"
        );
    }
    // or in any log line of this process (which logged plenty).
    let logs = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(
        logs.lines().count() > 20,
        "logs were captured: {} lines",
        logs.lines().count()
    );
    assert!(!logs.contains(&llm_key), "the LLM key is in a log line");
    assert!(
        !logs.contains(&dedalus_key),
        "the Dedalus key is in a log line"
    );
}

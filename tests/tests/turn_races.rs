//! Races around a chat turn (issue "correct under every race"): a turn that
//! loses its lease stops, a dead turn never keeps its lease alive, every
//! running command holds the machine, terminals do not pile up, long
//! commands arrive whole, the completion sentinel cannot be forged, memory
//! lines are checked. Each test reproduces one failure path
//! deterministically against the emulator and the DynamoDB-compatible
//! server (the turn stack of `agenthome_tests::stack`).
//!
//! Every command the tests run touches only `$HOME` (the emulator runs
//! commands on the host).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use agenthome::agent::{Agent, AgentOptions, LlmClient, LlmConfig};
use agenthome::clock::now_ms;
use agenthome::config::Secret;
use agenthome::store::{AcquireOutcome, LeasePurpose, UserRecord, UserStore};
use agenthome::turn::TurnSettings;
use agenthome_tests::llm::{answer, scripted_llm, tool_call};
use agenthome_tests::stack::{Reply, Stack, StackOptions};
use serde_json::{json, Value};
use std::time::Duration;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn llm_agent(base_url: &str) -> Agent {
    let config = LlmConfig::new(
        agenthome::dedalus::Url::parse(base_url).unwrap(),
        Some(Secret::new("sk-test-races")),
        "test-model",
    );
    Agent::llm(LlmClient::new(config).expect("llm client")).with_options(AgentOptions {
        min_llm_time: Duration::from_millis(500),
        ..AgentOptions::default()
    })
}

/// A 200 turn result; panics with the body otherwise.
fn done(r: &Reply) -> &Value {
    assert_eq!(r.status, 200, "expected a turn result: {}", r.text);
    &r.body
}

fn assert_lease_released(item: &UserRecord) {
    assert!(
        item.live_lease(now_ms()).is_none(),
        "the turn lease is still live: {:?}",
        item.lease
    );
}

/// Another owner takes `user`'s lease, as if the turn's had expired (the
/// store decides liveness by the `now` it is given).
async fn steal_lease(s: &Stack, user: &str) {
    let later = now_ms() + 3_600_000;
    let taken = s
        .store
        .acquire_lease(
            user,
            "turn-intruder",
            LeasePurpose::Turn,
            later + 60_000,
            later,
        )
        .await
        .expect("acquire");
    assert!(
        matches!(taken, AcquireOutcome::Acquired(_)),
        "the intruder took the lease: {taken:?}"
    );
}

fn read_home(s: &Stack, machine_id: &str, file: &str) -> String {
    std::fs::read_to_string(s.home(machine_id).join(file)).unwrap_or_default()
}

// ---------------------------------------------------------------------------
// 3. A lost lease stops the turn; a dead turn does not keep its lease alive
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_that_lost_its_lease_stops_before_the_next_command() {
    // GIVEN an LLM agent that runs two commands, the first taking 2 s
    let (base, script) = scripted_llm(vec![
        tool_call("c1", json!({"command": "sleep 2; echo one >> ~/ran.txt"})),
        tool_call("c2", json!({"command": "echo two >> ~/ran.txt"})),
        answer("Both done."),
    ])
    .await;
    let s = Stack::start_with(StackOptions {
        agent: llm_agent(&base),
        ..StackOptions::default()
    })
    .await;
    let machine_id = s.ready_user("alice").await;
    // WHEN another owner takes the lease while the first command runs
    let turn = s.turn("alice", "run both");
    let intruder = async {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        steal_lease(&s, "alice").await;
    };
    let (r, ()) = tokio::join!(turn, intruder);
    // THEN the turn stops cleanly before the second command: the reply says
    // so and the status reflects it
    let body = done(&r);
    assert_eq!(body["status"], "lease_lost", "{body}");
    assert_eq!(body["steps"].as_array().unwrap().len(), 1, "{body}");
    assert!(
        body["reply"].as_str().unwrap().contains("lost its hold"),
        "{body}"
    );
    // AND nothing more was typed: only the first command ran
    assert_eq!(read_home(&s, &machine_id, "ran.txt"), "one\n");
    assert_eq!(script.requests().len(), 2, "no model call after the loss");
    // AND the intruder's lease is untouched
    let item = s.item("alice").await;
    assert_eq!(
        item.lease.as_ref().map(|l| l.owner.as_str()),
        Some("turn-intruder")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_turn_stops_renewing_its_lease() {
    // GIVEN a short turn lease (1.5 s, renewed every 0.5 s)
    let s = Stack::start_with(StackOptions {
        settings: TurnSettings {
            lease_ttl: Duration::from_millis(1500),
            command_timeout: Duration::from_secs(30),
            ..TurnSettings::default()
        },
        ..StackOptions::default()
    })
    .await;
    s.ready_user("alice").await;
    // WHEN a turn's task dies mid-command (dropped, as a panic unwinds it)
    let cut = tokio::time::timeout(Duration::from_secs(2), s.turn("alice", "sleep 20")).await;
    assert!(cut.is_err(), "the turn was cut while its command ran");
    // THEN its lease is not renewed any more and expires
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_lease_released(&s.item("alice").await);
    // AND the next turn runs (no 409 for good)
    let r = s.turn("alice", "echo next").await;
    assert_eq!(done(&r)["status"], "completed");
}

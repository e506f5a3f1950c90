//! A new user's first message just works (docs/design.md §5 "First
//! message"): the turn waits for the provisioning it started — reading the
//! table, never holding a lease — and runs in the same request, on the JSON
//! route and on the event stream; only when the machine is not ready in
//! time is the answer `202` with a computed `Retry-After` and a `turn_id`
//! that, sent back as `Idempotency-Key`, runs the message exactly once.
//!
//! The stack is the in-process one of `agenthome_tests::stack` (real
//! emulator, real DynamoDB-compatible server); the provisioning worker runs
//! alongside the request, as Lambda's asynchronous invoke would. The
//! emulator boots machines in 3 s (8 s for the `202` case).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use agenthome::store::MachineState;
use agenthome_tests::events::http;
use agenthome_tests::stack::{jwt, Reply, Stack, StackOptions};
use agenthome_tests::uid;
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::time::Duration;
use tokio::time::Instant;

/// A stack whose first messages wait up to `wait`, with machines that boot
/// in `boot`.
async fn stack(wait: Duration, boot: Duration) -> Stack {
    let stack = Stack::start_with(StackOptions {
        first_turn_wait: wait,
        ..StackOptions::default()
    })
    .await;
    let boot_ms = u64::try_from(boot.as_millis()).unwrap();
    stack
        .emu
        .configure(json!({ "boot_delay_ms": boot_ms }))
        .await;
    stack
}

/// Run the provisioning worker for every event queued (as Lambda's async
/// invoke would) until `user`'s machine is ready; returns how many ran.
async fn worker_until_ready(stack: &Stack, user: &str) -> usize {
    let give_up = Instant::now() + Duration::from_secs(60);
    let mut ran = 0;
    loop {
        ran += stack.drain_worker().await;
        let ready = matches!(
            stack.store.get(&uid(user)).await.expect("table read"),
            Some(rec) if rec.state == MachineState::Ready
        );
        if ready {
            return ran;
        }
        assert!(Instant::now() < give_up, "provisioning did not finish");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

use agenthome::store::UserStore as _;

/// `POST …/turns` with `message` as `user`, with an `Idempotency-Key`.
async fn turn_with_key(stack: &Stack, user: &str, message: &str, key: &str) -> Reply {
    let body = json!({ "message": message }).to_string();
    let path = format!("/v1/users/{user}/turns");
    let mut event = http("POST", &path, Some(&body), jwt(user));
    event["headers"]["idempotency-key"] = Value::String(key.into());
    stack.send(&event).await
}

/// The events of a whole SSE body, in order: (name, data).
async fn sse_events(body: chat_turn_fn::StreamBody) -> Vec<(String, Value)> {
    let chunks: Vec<_> = tokio::time::timeout(Duration::from_secs(90), body.collect::<Vec<_>>())
        .await
        .expect("the stream ends");
    let text: String = chunks
        .iter()
        .map(|c| std::str::from_utf8(c).expect("utf-8").to_string())
        .collect();
    text.split("\n\n")
        .filter(|block| !block.trim().is_empty() && !block.starts_with(':'))
        .map(|block| {
            let mut name = String::new();
            let mut data = Value::Null;
            for line in block.lines() {
                if let Some(n) = line.strip_prefix("event: ") {
                    name = n.to_string();
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data = serde_json::from_str(d).expect("JSON data");
                }
            }
            (name, data)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_json_message_waits_for_its_machine_and_is_answered_within_the_deadline() {
    let stack = stack(Duration::from_secs(25), Duration::from_secs(3)).await;
    let timed = async {
        let started = Instant::now();
        let reply = stack.turn("ada", "echo first-answer").await;
        (reply, started.elapsed())
    };
    let ((reply, took), workers) = tokio::join!(timed, worker_until_ready(&stack, "ada"));
    assert_eq!(reply.status, 200, "answered, not 202: {}", reply.text);
    assert!(
        reply.body["steps"][0]["output"]
            .as_str()
            .unwrap()
            .contains("first-answer"),
        "{}",
        reply.text
    );
    assert!(
        took >= Duration::from_secs(3),
        "it waited for the 3 s boot: {took:?}"
    );
    assert!(
        took < Duration::from_secs(25),
        "within the wait budget: {took:?}"
    );
    assert_eq!(workers, 1, "one provisioning worker");
    let item = stack.item("ada").await;
    assert_eq!(item.state, MachineState::Ready);
    assert!(
        item.lease.is_none(),
        "the turn released its lease: {item:?}"
    );
    // The wait read the table (with backoff) and never asked Dedalus: the
    // turn's own Dedalus requests are those of one turn on a running
    // machine, however long it waited.
    let line: Value = stack
        .metrics
        .lines()
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).expect("EMF JSON"))
        .find(|l| l["Outcome"] == "completed")
        .expect("a completed turn line");
    let dedalus = line["dedalus_requests"].as_u64().unwrap();
    let table = line["table_calls"].as_u64().unwrap();
    assert!(dedalus <= 12, "no Dedalus polling while waiting: {line}");
    assert!(table >= 4, "the wait read the table: {line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_first_message_shows_the_provisioning_stages_then_the_command_and_done() {
    let stack = stack(Duration::from_secs(25), Duration::from_secs(3)).await;
    let streamed = async {
        let resp = stack.stream_turn("bea", "echo streamed-first").await;
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        sse_events(resp.into_body()).await
    };
    let (events, _) = tokio::join!(streamed, worker_until_ready(&stack, "bea"));
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.last(), Some(&"done"), "{names:?}");
    let stages: Vec<&str> = events
        .iter()
        .filter(|(n, _)| n == "machine")
        .map(|(_, d)| d["stage"].as_str().unwrap())
        .collect();
    assert!(
        stages.contains(&"booting"),
        "the 3 s boot is reported: {stages:?}"
    );
    let first_step = names
        .iter()
        .position(|n| *n == "step_started")
        .expect("a step");
    let last_stage = events
        .iter()
        .rposition(|(n, d)| n == "machine" && d["stage"] != "ready")
        .expect("stage events");
    assert!(
        last_stage < first_step,
        "stages come before the command: {names:?}"
    );
    for (name, data) in &events {
        if name == "machine" && data["stage"] != "provisioning" && data["stage"] != "ready" {
            assert!(data["stage_elapsed_ms"].is_u64(), "{data}");
        }
    }
    let (_, done) = events.last().unwrap();
    assert!(done["steps"][0]["output"]
        .as_str()
        .unwrap()
        .contains("streamed-first"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_boot_longer_than_the_wait_answers_202_and_the_resend_with_its_key_runs_exactly_once() {
    let stack = stack(Duration::from_secs(7), Duration::from_secs(9)).await;
    let message = "echo ran >> ~/runs.log && wc -l < ~/runs.log";
    let (first, _) = tokio::join!(stack.turn("cy", message), worker_until_ready(&stack, "cy"));
    // FIRST_TURN_WAIT (7 s) ran out while the machine still booted.
    assert_eq!(first.status, 202, "{}", first.text);
    let retry: u64 = first.header("retry-after").unwrap().parse().unwrap();
    assert_eq!(first.body["retry_after_s"], json!(retry));
    // Computed from the stage: not the old constant, and within reason
    // for a machine that still had about 2 s of boot and a bootstrap left.
    assert!((1..=40).contains(&retry), "Retry-After {retry}");
    let key = first.body["turn_id"]
        .as_str()
        .expect("a turn_id")
        .to_string();
    assert!(first.body["detail"].as_str().unwrap().contains(&key));

    // Re-sent with the key once the machine is ready: it runs.
    let second = turn_with_key(&stack, "cy", message, &key).await;
    assert_eq!(second.status, 200, "{}", second.text);
    assert_eq!(
        second.body["steps"][0]["output"].as_str().unwrap().trim(),
        "1"
    );
    // Re-sent again (a retry after a lost response): the same result, not a
    // second run.
    let third = turn_with_key(&stack, "cy", message, &key).await;
    assert_eq!(third.status, 200, "{}", third.text);
    assert_eq!(third.body, second.body, "the stored result");
    // The same key with another message: refused, nothing runs.
    let other = turn_with_key(&stack, "cy", "echo other >> ~/runs.log", &key).await;
    assert_eq!(other.status, 422, "{}", other.text);
    assert_eq!(other.body["code"], "idempotency_key_reused");
    let machine = stack.item("cy").await.machine_id.unwrap();
    let runs = std::fs::read_to_string(stack.home(&machine).join("runs.log")).unwrap();
    assert_eq!(
        runs.lines().count(),
        1,
        "the message ran exactly once: {runs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_idempotency_keys_are_400_problems() {
    let stack = stack(Duration::ZERO, Duration::from_millis(50)).await;
    for key in ["", "has space", &"k".repeat(129), "tab\there"] {
        let r = turn_with_key(&stack, "dee", "echo x", key).await;
        assert_eq!(r.status, 400, "{key:?}: {}", r.text);
        assert_eq!(r.body["code"], "invalid_idempotency_key");
    }
    assert!(
        stack.store.get(&uid("dee")).await.unwrap().is_none(),
        "nothing was provisioned for a refused request"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_time_runs_out_ends_with_how_to_continue_and_provisioning_goes_on() {
    // TURN_DEADLINE 8 s leaves the wait 3 s (5 s are kept for the turn);
    // the machine boots in 9 s.
    let stack = Stack::start_with(StackOptions {
        first_turn_wait: Duration::from_secs(25),
        turn_deadline: Duration::from_secs(8),
        ..StackOptions::default()
    })
    .await;
    stack.emu.configure(json!({ "boot_delay_ms": 9000 })).await;
    let message = "echo once >> ~/once.log && wc -l < ~/once.log";
    let streamed = async {
        let body = json!({ "message": message }).to_string();
        let mut event = http("POST", "/v1/users/eve/turns", Some(&body), jwt("eve"));
        event["headers"]["accept"] = Value::String("text/event-stream".into());
        let resp = stack.send_streaming(&event).await;
        assert_eq!(resp.status(), 200);
        sse_events(resp.into_body()).await
    };
    let (events, workers) = tokio::join!(streamed, worker_until_ready(&stack, "eve"));
    assert_eq!(workers, 1);
    let (name, last) = events.last().unwrap();
    assert_eq!(name, "error", "{events:?}");
    assert_eq!(last["code"], "machine_provisioning", "{last}");
    assert!(events.iter().any(|(n, _)| n == "machine"), "{events:?}");
    assert!(
        !events.iter().any(|(n, _)| n == "step_started"),
        "nothing ran"
    );
    // The detail names the key; the message sent again with it runs once.
    let detail = last["detail"].as_str().unwrap();
    let key = detail
        .split("Idempotency-Key: ")
        .nth(1)
        .and_then(|rest| rest.split('`').next())
        .expect("a key in the detail");
    let again = turn_with_key(&stack, "eve", message, key).await;
    assert_eq!(again.status, 200, "{}", again.text);
    assert_eq!(
        again.body["steps"][0]["output"].as_str().unwrap().trim(),
        "1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_messages_create_one_machine_and_run_one_turn_at_a_time() {
    let stack = stack(Duration::from_secs(25), Duration::from_secs(3)).await;
    let (a, b, workers) = tokio::join!(
        stack.turn("fay", "sleep 1; echo a"),
        stack.turn("fay", "sleep 1; echo b"),
        worker_until_ready(&stack, "fay")
    );
    assert_eq!(workers, 1, "one provisioning worker");
    let statuses = [a.status, b.status];
    assert!(
        statuses.contains(&200),
        "{statuses:?}: {} / {}",
        a.text,
        b.text
    );
    for r in [&a, &b] {
        assert!(
            r.status == 200 || (r.status == 409 && r.body["code"] == "turn_in_progress"),
            "{}",
            r.text
        );
    }
    let machines = stack.emu.client().list_all_machines(None).await.unwrap();
    assert_eq!(machines.len(), 1, "one machine for one user");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_message_whose_provisioning_fails_gets_a_problem_and_the_resend_provisions_again() {
    let stack = stack(Duration::from_secs(25), Duration::from_millis(200)).await;
    // The platform refuses the create (not retryable): the worker marks the
    // item failed while the turn waits.
    stack
        .emu
        .inject_fault(json!({
            "method": "POST", "path": "/v1/machines", "times": 1,
            "status": 400, "error_code": "INVALID_REQUEST", "retryable": false,
            "message": "machine spec refused"
        }))
        .await;
    let worker = async {
        let give_up = Instant::now() + Duration::from_secs(30);
        loop {
            stack.drain_worker().await;
            let rec = stack.store.get(&uid("gus")).await.expect("table read");
            if rec.is_some_and(|r| r.state == MachineState::Failed) {
                return;
            }
            assert!(Instant::now() < give_up, "the worker did not fail");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let (failed, ()) = tokio::join!(stack.turn("gus", "echo hi"), worker);
    assert_eq!(failed.status, 503, "{}", failed.text);
    assert_eq!(failed.body["code"], "provisioning_failed");
    assert!(failed.header("retry-after").is_some());
    // Sending it again resumes provisioning (the fault is spent) and runs.
    let (again, _) = tokio::join!(
        stack.turn("gus", "echo hi"),
        worker_until_ready(&stack, "gus")
    );
    assert_eq!(again.status, 200, "{}", again.text);
}

//! Fair use per user: above `MAX_TURNS_PER_MINUTE` a user's turns get 429
//! `application/problem+json` with `Retry-After` while other users are
//! unaffected; above `MAX_STATUS_READS_PER_MINUTE` a user's status reads are
//! served from the table and never reach Dedalus. Counted on the user's
//! item in a real DynamoDB-compatible server, against a real emulator.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use agenthome::entry::FairUse;
use agenthome_tests::events::http;
use agenthome_tests::stack::{jwt, Stack, StackOptions};
use serde_json::Value;
use std::time::Duration;

/// Start well inside a counting window (the minute), so it does not roll
/// over mid-test.
async fn early_in_a_minute() {
    let into = agenthome::clock::now_ms() % 60_000;
    if into > 40_000 {
        tokio::time::sleep(Duration::from_millis(60_000 - into + 200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_over_the_turn_limit_gets_429_and_others_do_not() {
    let s = Stack::start_with(StackOptions {
        fair_use: FairUse {
            turns_per_minute: 2,
            status_reads_per_minute: 0,
        },
        ..StackOptions::default()
    })
    .await;
    let machine = s.ready_user("alice").await;
    early_in_a_minute().await;
    for i in 0..2 {
        let r = s.turn("alice", "echo x >> ~/turns.log").await;
        assert_eq!(r.status, 200, "turn {i}: {}", r.text);
    }
    let r = s.turn("alice", "echo x >> ~/turns.log").await;
    assert_eq!(r.status, 429, "{}", r.text);
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    assert_eq!(r.body["code"], "rate_limited");
    assert!(r.body["type"].as_str().unwrap().ends_with("/rate-limited"));
    let after: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&after), "Retry-After {after}");
    let log = std::fs::read_to_string(s.home(&machine).join("turns.log")).unwrap();
    assert_eq!(log.lines().count(), 2, "the limited turn ran nothing");
    // Another user is unaffected by alice's limit.
    s.ready_user("bob").await;
    let r = s.turn("bob", "echo hi").await;
    assert_eq!(r.status, 200, "{}", r.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reads_over_the_limit_are_served_from_the_table() {
    let s = Stack::start_with(StackOptions {
        fair_use: FairUse {
            turns_per_minute: 0,
            status_reads_per_minute: 2,
        },
        ..StackOptions::default()
    })
    .await;
    let machine = s.ready_user("carol").await;
    s.ready_user("dave").await;
    early_in_a_minute().await;
    let machine_gets = || async {
        let suffix = format!("/machines/{machine}");
        s.emu
            .requests()
            .await
            .iter()
            .filter(|r| r["method"] == "GET" && r["path"].as_str().unwrap().ends_with(&suffix))
            .count()
    };
    let read = |user: &'static str| {
        let event = http("GET", &format!("/v1/users/{user}/machine"), None, jwt(user));
        let provision = &s.provision;
        async move {
            let resp = provision.handle(event).await.unwrap();
            agenthome_tests::events::response_parts(&resp)
        }
    };
    let before = machine_gets().await;
    let mut bodies: Vec<Value> = Vec::new();
    for _ in 0..5 {
        let (status, _, body) = read("carol").await;
        assert_eq!(status, 200, "{body}");
        bodies.push(body);
    }
    assert_eq!(
        machine_gets().await - before,
        2,
        "only 2 reads reached Dedalus"
    );
    for b in &bodies[..2] {
        assert_eq!(b["phase"], "running", "{b}");
    }
    for b in &bodies[2..] {
        assert!(b["phase"].is_null(), "{b}");
        assert!(b["phase_error"]
            .as_str()
            .unwrap()
            .contains("too many status reads"));
        assert_eq!(b["power"], "awake", "the table's view: {b}");
        assert_eq!(b["machine_id"], machine.as_str());
    }
    // Another user still gets live reads.
    let (_, _, body) = read("dave").await;
    assert_eq!(body["phase"], "running", "{body}");
}

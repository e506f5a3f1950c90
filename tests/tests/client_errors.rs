//! Error paths and the retry policy of the Dedalus client, driven by the
//! emulator's fault injection and request log.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod client_support;

use std::time::{Duration, Instant};

use agenthome::dedalus::{
    codes, ApiKey, Client, CreateMachineRequest, Error, IdempotencyKey, Phase, RetryPolicy,
};
use agenthome_tests::{fast_retry_policy, Emulator};
use client_support::*;
use serde_json::json;

/// The emulator's active (not yet used up) faults.
async fn active_faults(emu: &Emulator) -> Vec<serde_json::Value> {
    let (http, _) = emu.raw();
    let faults: serde_json::Value = http
        .get(format!("{}/_emulator/faults", emu.base_url))
        .send()
        .await
        .expect("GET faults")
        .json()
        .await
        .expect("faults json");
    faults.as_array().cloned().unwrap_or_default()
}

#[tokio::test]
async fn wrong_key_is_auth_invalid_and_not_retried() {
    // GIVEN a client with the wrong key
    let emu = Emulator::start().await;
    let mut cfg = emu.client_config();
    cfg.api_key = ApiKey::new("not-the-key");
    let client = Client::new(cfg).expect("client");

    // WHEN it makes a call
    let err = client
        .create_machine(&small(), None)
        .await
        .expect_err("401");

    // THEN it is a 401 AUTH_INVALID, sent exactly once
    assert_eq!(err.status().map(|s| s.as_u16()), Some(401));
    assert_eq!(err.code(), Some(codes::AUTH_INVALID));
    assert!(!err.is_retryable());
    assert_eq!(emu.requests().await.len(), 1);
    // and the key is not in the error text
    assert!(!format!("{err} {err:?}").contains("not-the-key"));
}

#[tokio::test]
async fn unknown_machine_is_a_problem_json_404() {
    // GIVEN an emulator
    let emu = Emulator::start().await;
    let client = emu.client();

    // WHEN an unknown machine is read
    let err = client
        .get_machine("dm-doesnotexist")
        .await
        .expect_err("404");

    // THEN it is not-found, with a message, not retried
    assert!(err.is_not_found(), "{err:?}");
    let api = err.api().expect("api error");
    assert!(!api.message.is_empty());
    assert_eq!(emu.requests().await.len(), 1);
}

#[tokio::test]
async fn revision_mismatch_is_retried_with_the_same_key() {
    // GIVEN a running machine and one injected REVISION_MISMATCH on wake
    let (emu, client, m) = emulator_with_machine(&[]).await;
    emu.inject_fault(json!({
        "method": "POST", "path": "/v1/machines/*/wake", "times": 1,
        "status": 409, "error_code": "REVISION_MISMATCH", "retryable": true
    }))
    .await;

    // WHEN it is woken
    let since = last_seq(&emu).await;
    client
        .wake_machine(&m.machine_id, None, None)
        .await
        .expect("wake succeeds after a retry");

    // THEN two attempts, same key, 409 then 200
    let wakes = logged(&emu, since, "POST", "/wake").await;
    assert_eq!(statuses(&wakes), [409, 200]);
    let k = keys(&wakes);
    assert_eq!(k[0], k[1]);
    assert!(
        IdempotencyKey::parse(k[0].clone()).is_ok(),
        "compact UUIDv7"
    );
}

#[tokio::test]
async fn stale_if_match_gives_revision_mismatch_after_retries() {
    // GIVEN a running machine and a stale revision
    let (emu, client, m) = emulator_with_machine(&[]).await;

    // WHEN it is slept with that revision
    let since = last_seq(&emu).await;
    let err = client
        .sleep_machine(&m.machine_id, Some("\"999999\""), None)
        .await
        .expect_err("stale");

    // THEN REVISION_MISMATCH after every allowed attempt
    assert_eq!(err.code(), Some(codes::REVISION_MISMATCH));
    assert!(err.is_retryable());
    let sleeps = logged(&emu, since, "POST", "/sleep").await;
    assert_eq!(sleeps.len(), fast_retry_policy().max_attempts as usize);
}

#[tokio::test]
async fn non_retryable_invalid_state_is_not_retried() {
    // GIVEN a running machine and an injected final INVALID_STATE on sleep
    let (emu, client, m) = emulator_with_machine(&[]).await;
    emu.inject_fault(json!({
        "method": "POST", "path": "/v1/machines/*/sleep", "times": 1,
        "status": 409, "error_code": "INVALID_STATE", "retryable": false,
        "details": {"current_observed_state": "running"}
    }))
    .await;

    // WHEN it is slept
    let since = last_seq(&emu).await;
    let err = client
        .sleep_machine(&m.machine_id, None, None)
        .await
        .expect_err("invalid state");

    // THEN one attempt, and the error keeps code and details
    assert_eq!(err.code(), Some(codes::INVALID_STATE));
    assert_eq!(
        err.details()
            .and_then(|d| d["current_observed_state"].as_str()),
        Some("running")
    );
    assert!(!err.is_retryable());
    assert_eq!(logged(&emu, since, "POST", "/sleep").await.len(), 1);
}

#[tokio::test]
async fn sleep_in_hold_window_is_surfaced_with_retry_after() {
    // GIVEN a machine that just started, with a 300 s hold window
    let (emu, client, m) = emulator_with_machine(&["--hold-window", "300s"]).await;

    // WHEN it is asked to sleep
    let since = last_seq(&emu).await;
    let started = Instant::now();
    let err = client
        .sleep_machine(&m.machine_id, None, None)
        .await
        .expect_err("hold window");

    // THEN the error surfaces at once, with its hint and details
    assert_eq!(err.code(), Some(codes::SLEEP_HOLD_WINDOW_ACTIVE));
    let hint = err.retry_after().expect("retry_after");
    assert!(hint > Duration::from_secs(200), "{hint:?}");
    assert!(err
        .details()
        .is_some_and(|d| d.contains_key("next_sleep_eligible_at")));
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(logged(&emu, since, "POST", "/sleep").await.len(), 1);
    // and the machine still runs
    assert_eq!(
        client.get_machine(&m.machine_id).await.expect("get").phase,
        Phase::Running
    );
}

#[tokio::test]
async fn reused_idempotency_key_is_not_retried() {
    // GIVEN a create made with key K
    let emu = Emulator::start().await;
    let client = emu.client();
    let key = IdempotencyKey::new();
    let first = client
        .create_machine(&small(), Some(&key))
        .await
        .expect("create");

    // WHEN the same key is replayed with the same body
    let replay = client
        .create_machine(&small(), Some(&key))
        .await
        .expect("replay");
    // THEN the same machine comes back
    assert_eq!(replay.machine_id, first.machine_id);

    // WHEN the key is used for a different body
    let other = CreateMachineRequest {
        memory_mib: 4096,
        ..small()
    };
    let since = last_seq(&emu).await;
    let err = client
        .create_machine(&other, Some(&key))
        .await
        .expect_err("reused");

    // THEN IDEMPOTENCY_KEY_REUSED, one attempt
    assert_eq!(err.code(), Some(codes::IDEMPOTENCY_KEY_REUSED));
    assert!(!err.is_retryable());
    assert_eq!(logged(&emu, since, "POST", "/v1/machines").await.len(), 1);
    assert_eq!(client.list_all_machines(None).await.expect("list").len(), 1);
}

#[tokio::test]
async fn rate_limit_hint_is_honoured_with_the_same_key() {
    // GIVEN one 429 with retry_after_ms 400 on create
    let emu = Emulator::start().await;
    emu.inject_fault(json!({
        "method": "POST", "path": "/v1/machines", "times": 1,
        "status": 429, "error_code": "RATE_LIMITED", "retryable": true, "retry_after_ms": 400
    }))
    .await;
    let client = emu.client();

    // WHEN a machine is created
    let started = Instant::now();
    client.create_machine(&small(), None).await.expect("create");

    // THEN the client waited at least the hint and reused the key
    assert!(started.elapsed() >= Duration::from_millis(400));
    let creates = logged(&emu, 0, "POST", "/v1/machines").await;
    let st = statuses(&creates);
    assert_eq!(st.len(), 2, "{creates:?}");
    assert_eq!(st[0], 429);
    assert!((200..300).contains(&st[1]), "{st:?}");
    let k = keys(&creates);
    assert_eq!(k[0], k[1]);
}

#[tokio::test]
async fn retry_after_ms_header_is_honoured() {
    // GIVEN one 503 whose only hint is a retry-after-ms header of 300
    let emu = Emulator::start().await;
    emu.inject_fault(json!({
        "method": "GET", "path": "/v1/machines", "times": 1,
        "status": 503, "error_code": "DEPENDENCY_UNAVAILABLE", "retryable": true,
        "headers": {"retry-after-ms": "300"}
    }))
    .await;
    let client = emu.client();

    // WHEN machines are listed
    let started = Instant::now();
    client.list_machines(None, None).await.expect("list");

    // THEN the header's wait was honoured
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(
        statuses(&logged(&emu, 0, "GET", "/v1/machines").await),
        [503, 200]
    );
}

#[tokio::test]
async fn unavailable_is_retried_then_succeeds() {
    // GIVEN two 503s on create
    let emu = Emulator::start().await;
    emu.inject_fault(json!({
        "method": "POST", "path": "/v1/machines", "times": 2,
        "status": 503, "error_code": "DEPENDENCY_UNAVAILABLE", "retryable": true
    }))
    .await;
    let client = emu.client();

    // WHEN a machine is created
    client.create_machine(&small(), None).await.expect("create");

    // THEN three attempts with one key, and one machine
    let creates = logged(&emu, 0, "POST", "/v1/machines").await;
    let st = statuses(&creates);
    assert_eq!(st[..2], [503, 503], "{creates:?}");
    assert_eq!(st.len(), 3);
    assert!((200..300).contains(&st[2]), "{st:?}");
    let k = keys(&creates);
    assert!(k.iter().all(|x| x == &k[0]));
    assert_eq!(client.list_all_machines(None).await.expect("list").len(), 1);
}

#[tokio::test]
async fn persistent_unavailability_gives_up_after_max_attempts() {
    // GIVEN a control plane that always answers 503
    let emu = Emulator::start().await;
    emu.inject_fault(json!({
        "method": "GET", "path": "/v1/machines/*", "times": 0,
        "status": 503, "error_code": "DEPENDENCY_UNAVAILABLE", "retryable": true
    }))
    .await;
    let client = emu.client();

    // WHEN a machine is read
    let err = client.get_machine("dm-x").await.expect_err("503");

    // THEN the 503 comes back after max_attempts tries
    assert_eq!(err.code(), Some(codes::DEPENDENCY_UNAVAILABLE));
    assert!(err.is_retryable());
    assert_eq!(
        emu.requests().await.len(),
        fast_retry_policy().max_attempts as usize
    );
}

#[tokio::test]
async fn slow_answer_times_out_and_is_retried_with_the_same_key() {
    // GIVEN a running machine, a 400 ms request timeout and one wake delayed 1.5 s
    let (emu, _, m) = emulator_with_machine(&[]).await;
    // (enough attempts to outlast the in-flight 429s of the delayed original)
    let client = Client::new(
        emu.client_config()
            .with_request_timeout(Duration::from_millis(400))
            .with_retry(RetryPolicy {
                max_attempts: 15,
                ..fast_retry_policy()
            }),
    )
    .expect("client");
    emu.inject_fault(json!({
        "method": "POST", "path": "/v1/machines/*/wake", "times": 1, "delay_ms": 1500
    }))
    .await;
    assert_eq!(active_faults(&emu).await.len(), 1);

    // WHEN it is woken
    let since = last_seq(&emu).await;
    let started = Instant::now();
    client
        .wake_machine(&m.machine_id, None, None)
        .await
        .expect("wake succeeds after the timeout");

    // THEN the first attempt timed out (the delayed request reached the
    // emulator) and a retry succeeded
    assert!(started.elapsed() >= Duration::from_millis(400));
    assert!(
        active_faults(&emu).await.is_empty(),
        "the delay fault was consumed"
    );
    // and every logged attempt carries the one key (the emulator does not log
    // a request whose client hung up, so the timed-out one is not listed)
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let wakes = logged(&emu, since, "POST", "/wake").await;
    assert!(!wakes.is_empty());
    assert!((200..300).contains(&statuses(&wakes)[wakes.len() - 1]));
    let k = keys(&wakes);
    assert!(k.iter().all(|x| x == &k[0]), "{k:?}");
}

#[tokio::test]
async fn slow_answers_past_the_deadline_give_a_deadline_error() {
    // GIVEN every read delayed 2 s, a 500 ms request timeout and a 1.2 s call deadline
    let emu = Emulator::start().await;
    emu.inject_fault(json!({
        "method": "GET", "path": "/v1/machines", "times": 0, "delay_ms": 2000
    }))
    .await;
    let cfg = emu
        .client_config()
        .with_request_timeout(Duration::from_millis(500))
        .with_retry(RetryPolicy {
            max_attempts: 10,
            call_deadline: Duration::from_millis(1200),
            ..fast_retry_policy()
        });
    let client = Client::new(cfg).expect("client");

    // WHEN machines are listed
    let started = Instant::now();
    let err = client
        .list_machines(None, None)
        .await
        .expect_err("deadline");

    // THEN a deadline error (keeping the timeout as its source), on time
    assert!(err.is_deadline_exceeded(), "{err:?}");
    assert!(std::error::Error::source(&err).is_some());
    assert!(started.elapsed() < Duration::from_millis(2000));
}

#[tokio::test]
async fn connection_refused_is_retried_then_reported_as_transport() {
    // GIVEN a base URL where nothing listens
    let port = agenthome_tests::free_port();
    let cfg = agenthome::dedalus::ClientConfig::new(
        agenthome::dedalus::Url::parse(&format!("http://127.0.0.1:{port}")).expect("url"),
        ApiKey::new("k"),
    )
    .with_retry(RetryPolicy {
        max_attempts: 3,
        ..fast_retry_policy()
    });
    let client = Client::new(cfg).expect("client");

    // WHEN a call is made
    let err = client.get_machine("dm-x").await.expect_err("refused");

    // THEN it is a retryable transport error with its source kept
    assert!(matches!(err, Error::Transport { .. }), "{err:?}");
    assert!(err.is_retryable());
    assert!(std::error::Error::source(&err).is_some());
}

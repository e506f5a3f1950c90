//! The Dedalus client's executions API against a real emulator process.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod client_support;

use std::time::Duration;

use agenthome::dedalus::{ExecutionEventKind, ExecutionRequest, ExecutionStatus};
use client_support::*;

#[tokio::test]
async fn run_and_wait_returns_output_and_exit_code() {
    // GIVEN a running machine
    let (_emu, client, m) = emulator_with_machine(&[]).await;

    // WHEN a command writing to both streams runs
    let run = run_shell(&client, &m.machine_id, "echo out; echo err >&2").await;

    // THEN it succeeded with both outputs
    assert_eq!(run.execution.status, ExecutionStatus::Succeeded);
    assert_eq!(run.exit_code(), Some(0));
    assert!(run.success());
    assert_eq!(run.output.stdout, "out\n");
    assert_eq!(run.output.stderr, "err\n");
    assert!(!run.output.stdout_truncated);
    assert_eq!(run.output.execution_id, run.execution.execution_id);
}

#[tokio::test]
async fn non_zero_exit_is_a_failed_execution_not_an_error() {
    // GIVEN a running machine
    let (_emu, client, m) = emulator_with_machine(&[]).await;

    // WHEN a command exits 3
    let run = run_shell(&client, &m.machine_id, "echo bad >&2; exit 3").await;

    // THEN the execution failed with exit code 3 and its stderr
    assert_eq!(run.execution.status, ExecutionStatus::Failed);
    assert_eq!(run.exit_code(), Some(3));
    assert!(!run.success());
    assert_eq!(run.output.stderr, "bad\n");
}

#[tokio::test]
async fn stdin_env_and_cwd_are_passed() {
    // GIVEN a running machine
    let (_emu, client, m) = emulator_with_machine(&[]).await;

    // WHEN a command reads stdin, an env var and its cwd
    let req = ExecutionRequest::shell("cat; echo \"$FOO\"; pwd")
        .stdin("from-stdin\n")
        .env("FOO", "bar")
        .cwd("/root");
    let run = client
        .run_and_wait(&m.machine_id, &req, within(10))
        .await
        .expect("run");

    // THEN all three arrived
    let lines: Vec<_> = run.output.stdout.lines().collect();
    assert_eq!(lines[0], "from-stdin");
    assert_eq!(lines[1], "bar");
    assert_eq!(lines[2], "/root", "cwd is the machine home");
}

#[tokio::test]
async fn timeout_expires_the_execution() {
    // GIVEN a running machine
    let (_emu, client, m) = emulator_with_machine(&[]).await;

    // WHEN a command outlives its timeout_ms
    let started = std::time::Instant::now();
    let run = client
        .run_and_wait(
            &m.machine_id,
            &ExecutionRequest::shell("sleep 30").timeout_ms(300),
            within(10),
        )
        .await
        .expect("run");

    // THEN it is expired, quickly
    assert_eq!(run.execution.status, ExecutionStatus::Expired);
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn output_truncation_is_flagged() {
    // GIVEN an emulator keeping at most 1000 bytes of output
    let (_emu, client, m) = emulator_with_machine(&["--output-limit", "1000"]).await;

    // WHEN a command prints 5000 bytes
    let run = run_shell(
        &client,
        &m.machine_id,
        "head -c 5000 /dev/zero | tr '\\0' a",
    )
    .await;

    // THEN stdout is truncated and flagged, with the full size reported
    assert!(run.output.stdout_truncated);
    assert!(
        run.output.stdout.len() <= 1000,
        "{}",
        run.output.stdout.len()
    );
    assert_eq!(run.output.stdout_bytes, Some(5000));
    assert!(!run.output.stderr_truncated);
    assert_eq!(run.execution.stdout_truncated, Some(true));
}

#[tokio::test]
async fn events_are_cursor_paged() {
    // GIVEN a finished execution that printed three lines
    let (_emu, client, m) = emulator_with_machine(&[]).await;
    let run = run_shell(
        &client,
        &m.machine_id,
        "for i in 1 2 3; do echo $i; sleep 0.05; done",
    )
    .await;
    let eid = run.execution.execution_id.clone();

    // WHEN its events are read two at a time
    let mut events = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let page = client
            .execution_events(&m.machine_id, &eid, cursor.as_deref(), Some(2))
            .await
            .expect("events page");
        pages += 1;
        assert!(page.items.len() <= 2);
        events.extend(page.items);
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
        assert!(pages < 100, "cursor chain ends");
    }

    // THEN they come in order, carry the output and end with success
    assert!(pages >= 2, "more than one page");
    assert!(events.windows(2).all(|w| w[0].sequence < w[1].sequence));
    let stdout: String = events
        .iter()
        .filter(|e| e.kind == ExecutionEventKind::Stdout)
        .filter_map(|e| e.chunk.clone())
        .collect();
    assert_eq!(stdout, "1\n2\n3\n");
    assert!(events
        .iter()
        .any(|e| e.kind == ExecutionEventKind::Lifecycle
            && e.status == Some(ExecutionStatus::Succeeded)));
}

#[tokio::test]
async fn cancel_stops_a_running_execution() {
    // GIVEN a long-running execution
    let (_emu, client, m) = emulator_with_machine(&[]).await;
    let exec = client
        .create_execution(&m.machine_id, &ExecutionRequest::shell("sleep 30"), None)
        .await
        .expect("create");
    assert!(!exec.status.is_terminal());

    // WHEN it is cancelled
    client
        .cancel_execution(&m.machine_id, &exec.execution_id, None)
        .await
        .expect("cancel");

    // THEN it ends as cancelled, and is listed
    let done = client
        .wait_execution(&m.machine_id, &exec.execution_id, within(10))
        .await
        .expect("ends");
    assert_eq!(done.status, ExecutionStatus::Cancelled);
    let list = client
        .list_executions(&m.machine_id, None, None)
        .await
        .expect("list");
    assert!(list
        .items
        .iter()
        .any(|e| e.execution_id == exec.execution_id));
}

#[tokio::test]
async fn run_and_wait_gives_up_at_its_deadline() {
    // GIVEN a running machine
    let (_emu, client, m) = emulator_with_machine(&[]).await;

    // WHEN a slow command runs with a short deadline
    let started = std::time::Instant::now();
    let err = client
        .run_and_wait(
            &m.machine_id,
            &ExecutionRequest::shell("sleep 5"),
            tokio::time::Instant::now() + Duration::from_millis(500),
        )
        .await
        .expect_err("deadline");

    // THEN a deadline error comes back on time
    assert!(err.is_deadline_exceeded(), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn execution_on_a_sleeping_machine_wakes_it() {
    // GIVEN a sleeping machine
    let (_emu, client, m) = emulator_with_machine(&[]).await;
    sleep_and_wait(&client, &m.machine_id).await;

    // WHEN a command is run on it
    let run = client
        .run_and_wait(
            &m.machine_id,
            &ExecutionRequest::new(["/bin/true"]),
            within(10),
        )
        .await
        .expect("run");

    // THEN it ran and the machine is up
    assert!(run.success(), "{run:?}");
    let got = client.get_machine(&m.machine_id).await.expect("get");
    assert_eq!(got.phase, agenthome::dedalus::Phase::Running);
}

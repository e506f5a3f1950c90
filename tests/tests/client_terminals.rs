//! The Dedalus client's terminals (REST + WebSocket) against a real emulator.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod client_support;

use std::time::Duration;

use agenthome::dedalus::{TerminalEvent, TerminalSession, TerminalStatus};
use client_support::*;
use serde_json::json;

/// Reads events until the accumulated output contains `needle`.
async fn read_until(session: &mut TerminalSession, needle: &str) -> String {
    let mut out = String::new();
    let fut = async {
        loop {
            match session.next_event().await.expect("next event") {
                TerminalEvent::Output(b) => {
                    out.push_str(&String::from_utf8_lossy(&b));
                    if out.contains(needle) {
                        return;
                    }
                }
                other => panic!("unexpected {other:?} while waiting for {needle:?}; got {out:?}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .unwrap_or_else(|_| panic!("no {needle:?} in {out:?}"));
    out
}

#[tokio::test]
async fn terminal_create_connect_input_resize_delete() {
    // GIVEN a running machine
    let (emu, client, m) = emulator_with_machine(&[]).await;
    let id = m.machine_id.clone();

    // WHEN a terminal is created and connected
    let t = terminal(&client, &id).await;
    assert_eq!((t.width, t.height), (80, 24));
    assert!(matches!(
        t.status,
        TerminalStatus::Ready | TerminalStatus::WakeInProgress
    ));
    let mut session = connect(&client, &id, &t.terminal_id).await;

    // THEN input runs in the shell and its output comes back
    session
        .send_input(b"echo hi-$((6*7))\n")
        .await
        .expect("input");
    read_until(&mut session, "hi-42").await;

    // WHEN it is resized, THEN the shell sees the new size
    session.resize(100, 40).await.expect("resize");
    session.send_input(b"stty size\n").await.expect("input");
    read_until(&mut session, "40 100").await;

    // AND the REST view agrees
    let got = client.get_terminal(&id, &t.terminal_id).await.expect("get");
    assert_eq!(got.status, TerminalStatus::Ready);
    let list = client.list_terminals(&id, None, None).await.expect("list");
    assert!(list.items.iter().any(|x| x.terminal_id == t.terminal_id));

    // WHEN the session is closed and the terminal deleted
    session.close().await.expect("close");
    let deleted = client
        .delete_terminal(&id, &t.terminal_id, None)
        .await
        .expect("delete");
    assert!(
        matches!(deleted.status, TerminalStatus::Closed),
        "{:?}",
        deleted.status
    );

    // THEN connecting again fails without retries
    let since = last_seq(&emu).await;
    let err = client
        .connect(&id, &t.terminal_id)
        .await
        .expect_err("closed terminal");
    assert!(!err.is_retryable(), "{err:?}");
    assert_eq!(logged(&emu, since, "GET", "/stream").await.len(), 1);
}

#[tokio::test]
async fn shell_exit_yields_closed() {
    // GIVEN a connected terminal
    let (_emu, client, m) = emulator_with_machine(&[]).await;
    let t = terminal(&client, &m.machine_id).await;
    let mut session = connect(&client, &m.machine_id, &t.terminal_id).await;

    // WHEN the shell exits
    session.send_input(b"exit\n").await.expect("input");

    // THEN a Closed event arrives (then the socket ends, not recoverable)
    let closed = next_non_output(&mut session).await;
    match closed {
        TerminalEvent::Closed => {}
        TerminalEvent::Disconnected { recoverable, .. } => assert!(!recoverable),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn dropped_websocket_is_a_recoverable_disconnect() {
    // GIVEN a terminal whose next stream is dropped after 300 ms
    let (emu, client, m) = emulator_with_machine(&[]).await;
    let t = terminal(&client, &m.machine_id).await;
    emu.inject_fault(json!({
        "method": "GET", "path": "/v1/machines/*/terminals/*/stream",
        "times": 1, "drop_websocket_after_ms": 300
    }))
    .await;
    let mut session = connect(&client, &m.machine_id, &t.terminal_id).await;

    // WHEN the connection drops
    let event = next_non_output(&mut session).await;

    // THEN it is a recoverable 1006, repeated on later reads
    assert_eq!(
        event,
        TerminalEvent::Disconnected {
            close_code: Some(1006),
            recoverable: true
        }
    );
    assert_eq!(session.next_event().await.expect("again"), event);

    // AND a reconnect reaches the same shell
    let mut again = connect(&client, &m.machine_id, &t.terminal_id).await;
    again
        .send_input(b"echo back-$((1+1))\n")
        .await
        .expect("input");
    read_until(&mut again, "back-2").await;
}

#[tokio::test]
async fn connect_retries_a_retryable_409_and_not_a_final_one() {
    // GIVEN a ready terminal
    let (emu, client, m) = emulator_with_machine(&[]).await;
    let t = terminal(&client, &m.machine_id).await;

    // WHEN the handshake is refused twice with a retryable INVALID_STATE
    emu.inject_fault(json!({
        "method": "GET", "path": "/v1/machines/*/terminals/*/stream", "times": 2,
        "status": 409, "error_code": "INVALID_STATE", "retryable": true, "retry_after_ms": 30
    }))
    .await;
    let since = last_seq(&emu).await;
    let session = client
        .connect(&m.machine_id, &t.terminal_id)
        .await
        .expect("connect after retries");
    // THEN the third handshake succeeds
    assert_eq!(
        statuses(&logged(&emu, since, "GET", "/stream").await),
        [409, 409, 101]
    );
    session.close().await.expect("close");

    // WHEN it is refused with a non-retryable INVALID_STATE
    emu.inject_fault(json!({
        "method": "GET", "path": "/v1/machines/*/terminals/*/stream", "times": 1,
        "status": 409, "error_code": "INVALID_STATE", "retryable": false
    }))
    .await;
    let since = last_seq(&emu).await;
    let err = client
        .connect(&m.machine_id, &t.terminal_id)
        .await
        .expect_err("refused");
    // THEN the error comes back after one attempt
    assert_eq!(err.code(), Some("INVALID_STATE"));
    assert_eq!(logged(&emu, since, "GET", "/stream").await.len(), 1);
}

#[tokio::test]
async fn terminal_on_a_sleeping_machine_connects_once_awake() {
    // GIVEN a sleeping machine and a slow wake
    let (_emu, client, m) = emulator_with_machine(&["--wake-delay", "500ms"]).await;
    sleep_and_wait(&client, &m.machine_id).await;

    // WHEN a terminal is created (waking the machine) and connected at once
    let t = terminal(&client, &m.machine_id).await;
    assert_eq!(t.status, TerminalStatus::WakeInProgress);
    let mut session = connect(&client, &m.machine_id, &t.terminal_id).await;

    // THEN the shell works
    session
        .send_input(b"echo up-$((2*3))\n")
        .await
        .expect("input");
    read_until(&mut session, "up-6").await;
}

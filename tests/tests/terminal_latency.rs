//! A terminal's output reaches the client as the shell writes it: no frame
//! waits for the acknowledgement of the one before (Nagle's algorithm off on
//! both ends of the terminal WebSocket). With Nagle on, each output frame
//! after the first waited for the client's delayed ACK (about 40 ms on
//! Linux), which was most of a warm turn's time against the emulator.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use agenthome::dedalus::TerminalEvent;
use agenthome::runner::TerminalRunner;
use agenthome_tests::fixtures::emulator_with_machine_id;
use tokio::time::Instant;

/// Sends `line` and returns when `a` and then `b` arrived (after sending).
async fn arrivals(
    session: &mut agenthome::dedalus::TerminalSession,
    line: &str,
    a: &str,
    b: &str,
) -> (Duration, Duration) {
    let sent = Instant::now();
    session.send_input(line.as_bytes()).await.expect("send");
    let (mut seen, mut at_a) = (String::new(), None);
    let deadline = sent + Duration::from_secs(10);
    loop {
        let event = tokio::time::timeout_at(deadline, session.next_event())
            .await
            .expect("output in time")
            .expect("a frame");
        let TerminalEvent::Output(bytes) = event else {
            panic!("unexpected event {event:?}");
        };
        seen.push_str(&String::from_utf8_lossy(&bytes));
        if at_a.is_none() && seen.contains(a) {
            at_a = Some(sent.elapsed());
        }
        if seen.contains(b) {
            return (at_a.expect("a before b"), sent.elapsed());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_frame_never_waits_for_the_ack_of_the_one_before() {
    // GIVEN a terminal on a running machine, its shell set up
    let (_emu, client, machine) = emulator_with_machine_id(&[]).await;
    let (runner, terminal) = TerminalRunner::open(&client, &machine, None)
        .await
        .expect("open");
    runner.close().await;
    let mut session = client.connect(&machine, &terminal).await.expect("connect");
    // WHEN a line prints two pieces 10 ms apart (two frames), five times
    let mut gaps = Vec::new();
    for i in 0..5 {
        let line = format!(" printf 'A%s\\n' {i}; sleep 0.01; printf 'B%s\\n' {i}\n");
        let (a, b) = arrivals(&mut session, &line, &format!("A{i}"), &format!("B{i}")).await;
        gaps.push(b.saturating_sub(a));
    }
    // THEN the second frame follows the first by about the 10 ms the shell
    // took, not by a delayed ACK's 40 ms
    gaps.sort();
    let median = gaps[gaps.len() / 2];
    assert!(
        median < Duration::from_millis(30),
        "gaps between the two frames: {gaps:?}"
    );
}

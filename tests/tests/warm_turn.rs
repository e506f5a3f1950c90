//! The warm turn (issue "a lean warm turn"): a turn after one that ended
//! cleanly reuses the stored terminal with two Dedalus requests (status
//! read, stream) and runs nothing through executions; the memory travels
//! through the shell, guarded so that an agent-modified shell cannot
//! corrupt `~/.agenthome/turns.jsonl`; a turn after one that left a
//! command running, or died in the middle of one, never types into that
//! busy shell. Against the emulator
//! and the DynamoDB-compatible server (`agenthome_tests::stack`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use agenthome::turn::TURNS_FILE;
use agenthome_tests::fixtures::{
    agent_stack, done, llm_agent, short_command_stack, short_lease_stack, wait_for_lines,
};
use agenthome_tests::llm::{answer, scripted_llm, tool_call};
use agenthome_tests::stack::Stack;
use serde_json::{json, Value};
use std::time::Duration;

/// Dedalus requests the emulator logged since `from`, as `METHOD path`.
async fn requests_since(s: &Stack, from: usize) -> Vec<String> {
    s.emu
        .requests()
        .await
        .iter()
        .skip(from)
        .map(|r| {
            format!(
                "{} {}",
                r["method"].as_str().unwrap_or("?"),
                r["path"].as_str().unwrap_or("?")
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_modified_shell_cannot_corrupt_the_memory_of_a_warm_turn() {
    // GIVEN an agent whose first turn leaves its shell modified: aliases and
    // an exported function over the tools agenthome's memory lines use,
    // `set -e`, another HOME, and BASH_ENV pointing at a script that would
    // write into the memory file
    let (base, script) = scripted_llm(vec![
        tool_call(
            "c1",
            json!({"command": "alias tail=false head=false grep=false cat=false; \
                tail() { echo injected; }; export -f tail; \
                echo 'echo injected >> ~/.agenthome/turns.jsonl' > ~/evil.sh; \
                export BASH_ENV=~/evil.sh; mkdir -p ~/fake; export HOME=~/fake; set -e"}),
        ),
        answer("Shell modified."),
        tool_call("c2", json!({"command": "echo warm"})),
        answer("Warm turn done."),
    ])
    .await;
    let s = agent_stack(llm_agent(&base, "sk-test-warm")).await;
    let machine_id = s.ready_user("alice").await;
    let first = done(&s.turn("alice", "modify your shell").await).clone();
    assert_eq!(first["status"], "completed", "{first}");

    // WHEN the next turn runs (warm: the previous one ended cleanly)
    let from = s.emu.requests().await.len();
    let second = done(&s.turn("alice", "say warm").await).clone();

    // THEN it ran in the same shell, its command worked
    assert_eq!(second["status"], "completed", "{second}");
    assert_eq!(second["steps"][0]["output"], "warm\n", "{second}");
    // AND it made two Dedalus requests (status read, the stream), none an
    // execution
    let made = requests_since(&s, from).await;
    assert_eq!(made.len(), 2, "{made:?}");
    assert!(
        made.iter()
            .any(|r| r.starts_with("GET ") && r.ends_with("/stream")),
        "{made:?}"
    );
    // AND the memory read through that shell reached the prompt
    let system = script.messages(2)[0]["content"]
        .as_str()
        .unwrap()
        .to_string();
    let first_id = first["turn_id"].as_str().unwrap();
    assert!(system.contains(first_id), "memory in the prompt: {system}");
    // AND the memory file in the real home holds exactly the two turns'
    // summaries, nothing injected; the fake home got none
    let home = s.home(&machine_id);
    let memory = std::fs::read_to_string(home.join(TURNS_FILE)).unwrap();
    let ids: Vec<String> = memory
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).expect("each memory line is JSON");
            v["turn_id"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(
        ids,
        vec![
            first_id.to_string(),
            second["turn_id"].as_str().unwrap().to_string()
        ],
        "{memory}"
    );
    assert!(!home.join("fake").join(TURNS_FILE).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_after_one_that_left_a_command_running_never_types_into_its_shell() {
    // GIVEN a turn whose command outlives its 1 s timeout in the shell
    let s = short_command_stack().await;
    let machine_id = s.ready_user("alice").await;
    done(&s.turn("alice", "echo warm-up").await);
    let first = s.turn("alice", "sleep 4; echo late >> ~/order.txt").await;
    assert_eq!(done(&first)["steps"][0]["still_running"], true);
    // WHEN the next turn runs at once
    let second = s.turn("alice", "echo second >> ~/order.txt").await;
    assert_eq!(done(&second)["status"], "completed");
    // THEN its command ran before the one still running ended: it was not
    // typed into that busy shell (where it would have waited behind it)
    let order = wait_for_lines(&s, &machine_id, "order.txt", 2, "both commands end").await;
    assert_eq!(order, "second\nlate\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_after_one_that_died_mid_command_never_types_into_its_shell() {
    // GIVEN a short lease (1.5 s) and a turn that dies while its command
    // runs (its future dropped, as when the invocation is killed): no end
    // write, so no clean mark and no hold
    let s = short_lease_stack().await;
    let machine_id = s.ready_user("alice").await;
    done(&s.turn("alice", "echo warm-up").await);
    let cut = tokio::time::timeout(
        Duration::from_millis(1500),
        s.turn("alice", "sleep 6; echo late >> ~/order.txt"),
    )
    .await;
    assert!(cut.is_err(), "the turn was cut while its command ran");
    // WHEN the next turn runs once the dead turn's lease expired
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let second = s.turn("alice", "echo second >> ~/order.txt").await;
    assert_eq!(done(&second)["status"], "completed");
    // THEN its command ran at once, not behind the dead turn's command
    let order = wait_for_lines(&s, &machine_id, "order.txt", 2, "both commands end").await;
    assert_eq!(order, "second\nlate\n");
}

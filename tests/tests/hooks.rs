//! In-machine hooks and what the agent is told after a wake, against the
//! emulator: `pre-sleep` runs before a sleep agenthome initiates, `post-wake`
//! after a wake and before the turn's first command; a hook that never
//! exits or floods its output is cut off and blocks neither the sleep nor
//! the turn; the prompt after a wake names the command the sleep
//! interrupted.

use agenthome::agent::Agent;
use agenthome::api::TurnRequest;
use agenthome::sweep::SweepSettings;
use agenthome::turn::{MachineStage, TurnEvent, TurnEvents, TurnOutcome, TurnSettings};
use agenthome_tests::fixtures::{self, done};
use agenthome_tests::llm::{answer, scripted_llm, tool_call};
use agenthome_tests::stack::{jwt, Stack, StackOptions};
use agenthome_tests::uid;
use serde_json::{json, Value};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// Install `script` as the machine's hook `name`.
fn install_hook(home: &Path, name: &str, script: &str) {
    let dir = home.join(".agenthome/hooks");
    std::fs::create_dir_all(&dir).expect("hooks dir");
    let path = dir.join(name);
    std::fs::write(&path, script).expect("hook written");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// The newest journal entry of `event` (waiting briefly for one written off
/// the turn's path).
async fn newest(s: &Stack, user: &str, event: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, page) = s
            .machine_call(
                "GET",
                &format!("/v1/users/{user}/machine/events"),
                "limit=100",
                jwt(user),
            )
            .await;
        assert_eq!(status, 200, "{page}");
        let found = page["events"]
            .as_array()
            .and_then(|e| e.iter().find(|x| x["event"] == event).cloned());
        match found {
            Some(e) => return e,
            None if Instant::now() > deadline => panic!("no {event} entry: {page:#}"),
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

async fn sleep_route(s: &Stack, user: &str) -> (u16, Value, Duration) {
    let started = Instant::now();
    let (status, body) = s
        .machine_call(
            "POST",
            &format!("/v1/users/{user}/machine/sleep"),
            "",
            jwt(user),
        )
        .await;
    (status, body, started.elapsed())
}

#[tokio::test]
async fn pre_sleep_runs_before_the_sleep_and_post_wake_before_the_first_command() {
    // GIVEN a ready machine with both hooks; post-wake floods its output
    let s = Stack::start().await;
    let machine_id = s.ready_user("alice").await;
    let home = s.home(&machine_id);
    install_hook(
        &home,
        "pre-sleep",
        "#!/bin/bash\ndate +%s%3N > \"$HOME/pre-sleep.ran\"\necho saved\n",
    );
    install_hook(
        &home,
        "post-wake",
        "#!/bin/bash\necho woke >> \"$HOME/post-wake.log\"\nhead -c 3000000 /dev/zero | tr '\\0' x\necho the-end\n",
    );
    // WHEN the conversation ends (explicit sleep)
    let (status, body, _) = sleep_route(&s, "alice").await;
    assert_eq!((status, &body["status"]), (200, &json!("asleep")), "{body}");
    // THEN pre-sleep ran, before the machine slept
    let ran: u64 = std::fs::read_to_string(home.join("pre-sleep.ran"))
        .expect("pre-sleep ran")
        .trim()
        .parse()
        .expect("a time");
    let slept = newest(&s, "alice", "slept").await;
    assert!(ran <= slept["at_ms"].as_u64().unwrap(), "{slept}");
    assert_eq!(slept["hook"]["hook"], "pre-sleep");
    assert_eq!(slept["hook"]["outcome"], "ok", "{slept}");
    assert_eq!(slept["hook"]["output"], "saved\n");
    assert!(
        !home.join("post-wake.log").exists(),
        "post-wake runs only after a wake"
    );

    // WHEN the next turn wakes the machine, its first command sees post-wake's file
    let r = s.turn("alice", "cat ~/post-wake.log").await;
    let result = done(&r);
    assert_eq!(result["steps"][0]["output"], "woke\n", "{result}");
    // AND the hook ran once, its megabytes cut to the last 4 KiB
    let woke = newest(&s, "alice", "woke").await;
    assert_eq!(woke["hook"]["hook"], "post-wake");
    assert_eq!(woke["hook"]["outcome"], "ok", "{woke}");
    let output = woke["hook"]["output"].as_str().unwrap();
    assert!(
        output.len() <= 4096 && output.ends_with("xxthe-end\n"),
        "{}",
        output.len()
    );
}

/// Collects a turn's events.
#[derive(Default)]
struct Collect(Mutex<Vec<TurnEvent>>);

impl TurnEvents for Collect {
    fn emit(&self, event: TurnEvent) {
        self.0.lock().expect("events").push(event);
    }
}

#[tokio::test]
async fn a_hook_that_never_exits_blocks_neither_the_sleep_nor_the_turn() {
    // GIVEN HOOK_TIMEOUT=1s and hooks that never exit
    let s = Stack::start_with(StackOptions {
        settings: TurnSettings {
            hook_timeout: Duration::from_secs(1),
            command_timeout: Duration::from_secs(30),
            ..TurnSettings::default()
        },
        ..StackOptions::default()
    })
    .await;
    let machine_id = s.ready_user("alice").await;
    let home = s.home(&machine_id);
    install_hook(&home, "pre-sleep", "#!/bin/bash\nsleep 300\n");
    install_hook(&home, "post-wake", "#!/bin/bash\necho stuck; sleep 300\n");
    // WHEN the machine is put to sleep
    let (status, body, took) = sleep_route(&s, "alice").await;
    // THEN it sleeps anyway, within the hook's bound, and the journal says why
    assert_eq!((status, &body["status"]), (200, &json!("asleep")), "{body}");
    assert!(took < Duration::from_secs(12), "{took:?}");
    let slept = newest(&s, "alice", "slept").await;
    assert_eq!(slept["hook"]["outcome"], "timed_out", "{slept}");

    // WHEN a turn wakes it
    let sink = Collect::default();
    let started = Instant::now();
    let outcome = s
        .chat
        .turns
        .run_with_events(
            &uid("alice"),
            TurnRequest {
                message: "echo fine".into(),
                history: Vec::new(),
                end_conversation: false,
            },
            Instant::now() + Duration::from_secs(60),
            &sink,
        )
        .await
        .expect("the turn runs");
    // THEN the turn completes within the hook's bound
    let TurnOutcome::Done(result) = outcome else {
        panic!("a turn result: {outcome:?}")
    };
    assert_eq!(result.steps[0].output, "fine\n");
    assert_eq!(result.steps[0].exit_code, Some(0));
    assert!(started.elapsed() < Duration::from_secs(20));
    // AND the machine event of the wake reports the timed-out hook
    let events = sink.0.lock().unwrap().clone();
    let facts = events
        .iter()
        .find_map(|e| match e {
            TurnEvent::Machine {
                stage: MachineStage::Woke,
                woke,
                ..
            } => woke.clone(),
            _ => None,
        })
        .expect("a machine event of stage woke");
    let hook = facts.hook.expect("the hook's report");
    assert_eq!(hook.outcome, agenthome::journal::HookOutcome::TimedOut);
    assert!(facts.summary.contains("post-wake"), "{}", facts.summary);
    // AND it came before the first command
    let woke_at = events.iter().position(|e| {
        matches!(
            e,
            TurnEvent::Machine {
                stage: MachineStage::Woke,
                ..
            }
        )
    });
    let step_at = events
        .iter()
        .position(|e| matches!(e, TurnEvent::StepStarted { .. }));
    assert!(woke_at < step_at, "{events:?}");
}

fn llm_agent(base_url: &str) -> Agent {
    fixtures::llm_agent(base_url, "sk-test-hooks")
}

#[tokio::test]
async fn the_prompt_after_a_wake_names_the_interrupted_command() {
    // GIVEN an agent that leaves a long command running (1 s timeout, 2 s hold)
    let (base, script) = scripted_llm(vec![
        tool_call(
            "c1",
            json!({"command": "sleep 900 && echo trained", "timeout_s": 1}),
        ),
        answer("Training runs in the background."),
        answer("It was interrupted; I will restart it."),
    ])
    .await;
    let s = Stack::start_with(StackOptions {
        agent: llm_agent(&base),
        settings: TurnSettings {
            max_hold: Duration::from_secs(2),
            ..TurnSettings::default()
        },
        ..StackOptions::default()
    })
    .await;
    s.ready_user("alice").await;
    let first = done(&s.turn("alice", "train the model").await).clone();
    assert_eq!(first["steps"][0]["still_running"], true, "{first}");
    // AND the idle sweep puts the machine to sleep once the hold expired
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let report = s
        .sweeper(SweepSettings {
            idle_after: Duration::ZERO,
            ..SweepSettings::default()
        })
        .run(
            agenthome::clock::now_ms(),
            Instant::now() + Duration::from_secs(30),
        )
        .await;
    assert_eq!(report.slept, 1, "{report:?}");

    // WHEN the next turn wakes it
    done(&s.turn("alice", "is it done?").await);

    // THEN the model is told the sleep interrupted that command, and how long it slept
    let messages = script.messages(2);
    let told: Vec<&str> = messages
        .iter()
        .filter(|m| m["role"] == "system")
        .filter_map(|m| m["content"].as_str())
        .collect();
    let note = told
        .iter()
        .find(|t| t.contains("has just been woken"))
        .unwrap_or_else(|| panic!("no wake note: {told:#?}"));
    assert!(note.contains("- sleep 900 && echo trained"), "{note}");
    assert!(note.contains("interrupted"), "{note}");
    assert!(note.contains("it slept for"), "{note}");
    assert!(note.contains("does not keep running processes"), "{note}");
    // AND the system prompt tells it about the hooks
    assert!(
        told[0].contains("~/.agenthome/hooks/pre-sleep"),
        "{}",
        told[0]
    );
    // AND the first turn's prompt had no wake note (no wake)
    let first_told = script.messages(0);
    assert!(first_told.iter().all(|m| !m["content"]
        .as_str()
        .unwrap_or("")
        .contains("has just been woken")));
}

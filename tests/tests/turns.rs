//! The chat turn end to end (docs/design.md §3 turn result, §5 chat turn, §6
//! invariants 2–4 and 7–8): the chat-turn function driven in-process with
//! API Gateway v2 events, against a real emulator and a real
//! DynamoDB-compatible server, provisioning through the provision
//! function's worker event (see `agenthome_tests::stack`).
//!
//! Every command the tests run touches only `$HOME` (the emulator runs
//! commands on the host).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use agenthome::clock::now_ms;
use agenthome::runner::Transport;
use agenthome::turn::{TurnSettings, TURNS_FILE};
use agenthome_tests::events::{http, Auth};
use agenthome_tests::fixtures::{
    assert_lease_released, done, llm_agent, secret_key, short_lease_stack,
};
use agenthome_tests::llm::{answer, scripted_llm, tool_call};
use agenthome_tests::stack::{admin, jwt, Reply, Stack, StackOptions};
use agenthome_tests::uid;
use serde_json::{json, Value};
use std::time::Duration;
use tokio::time::Instant;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn assert_problem(r: &Reply, status: u16) {
    assert_eq!(r.status, status, "{}", r.text);
    assert_eq!(
        r.header("content-type"),
        Some("application/problem+json"),
        "{}",
        r.text
    );
    assert_eq!(r.body["status"], status, "{}", r.text);
    for field in ["type", "title", "detail", "code"] {
        assert!(
            r.body[field].as_str().is_some_and(|s| !s.is_empty()),
            "problem.{field} missing: {}",
            r.text
        );
    }
}

/// The output of the single step of a shell-mode turn.
fn output(body: &Value) -> String {
    body["steps"][0]["output"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn read_turns_file(s: &Stack, machine_id: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(s.home(machine_id).join(TURNS_FILE)).unwrap_or_default();
    text.lines()
        .map(|l| serde_json::from_str(l).expect("each memory line is JSON"))
        .collect()
}

// ---------------------------------------------------------------------------
// 1. First message provisions; a later one completes with the documented shape
// ---------------------------------------------------------------------------

#[tokio::test]
async fn first_message_provisions_then_a_turn_completes_with_the_documented_result() {
    // GIVEN a fresh stack (shell mode) and a user without a machine
    let s = Stack::start().await;
    // WHEN her first message arrives
    let r = s.turn("alice", "echo hello-turn").await;
    // THEN 202 with Retry-After: the machine is being provisioned
    assert_eq!(r.status, 202, "{}", r.text);
    let after: u64 = r
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .unwrap();
    assert!(after >= 1);
    assert_eq!(r.body["status"], "provisioning");
    // AND a second message before the worker ran is 202 too, with no second worker
    let r = s.turn("alice", "echo again").await;
    assert_eq!(r.status, 202, "{}", r.text);
    assert_eq!(s.drain_worker().await, 1, "one provisioning worker");
    assert!(
        s.emu.client().list_all_machines(None).await.unwrap().len() == 1,
        "one machine"
    );

    // WHEN she sends a message once the machine is ready
    let r = s.turn("alice", "echo hello-turn; echo err >&2").await;
    // THEN the turn completes with docs/design.md §3's result
    let body = done(&r);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let item = s.item("alice").await;
    let machine_id = item.machine_id.clone().unwrap();
    assert!(body["turn_id"].as_str().is_some_and(|t| !t.is_empty()));
    assert_eq!(body["machine_id"], machine_id.as_str());
    assert_eq!(body["status"], "completed");
    assert!(
        body["reply"].as_str().unwrap().contains("hello-turn"),
        "{body}"
    );
    let steps = body["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 1);
    let step = &steps[0];
    assert_eq!(step["command"], "echo hello-turn; echo err >&2");
    assert_eq!(step["exit_code"], 0);
    assert!(
        step["output"].as_str().unwrap().contains("hello-turn\n"),
        "{step}"
    );
    assert!(
        step["output"].as_str().unwrap().contains("err"),
        "stderr is in the output: {step}"
    );
    assert!(step["duration_ms"].is_u64());
    assert_eq!(step["still_running"], false);
    assert_eq!(
        body["usage"],
        json!({"llm_calls": 0, "prompt_tokens": 0, "completion_tokens": 0})
    );
    let wake = body["timings"]["wake_ms"]
        .as_u64()
        .expect("timings.wake_ms");
    let total = body["timings"]["total_ms"]
        .as_u64()
        .expect("timings.total_ms");
    assert_eq!(wake, 0, "the machine was running");
    assert!(total >= wake);
    // AND the bootstrap ran (harmlessly), the item records the activity, and the lease is gone
    let log = std::fs::read_to_string(s.home(&machine_id).join("bootstrap.log")).unwrap();
    assert_eq!(log, "bootstrapped\n");
    assert_lease_released(&item);
    assert!(
        item.terminal_id.is_some(),
        "the terminal is kept for the next turn"
    );
    assert!(item.last_active_at > 0);
}

// ---------------------------------------------------------------------------
// 2. Persistence across sleep (terminal and executions backends)
// ---------------------------------------------------------------------------

async fn persistence_across_sleep(transport: Transport) {
    // GIVEN a ready user whose first turn made a project, cd'd into it and exported a variable
    let s = Stack::start_with(StackOptions {
        settings: TurnSettings {
            transport,
            command_timeout: Duration::from_secs(30),
            ..TurnSettings::default()
        },
        ..StackOptions::default()
    })
    .await;
    let machine_id = s.ready_user("alice").await;
    let r = s
        .turn(
            "alice",
            "mkdir -p ~/project && cd ~/project && echo hello > notes.txt && export GREETING=hi",
        )
        .await;
    let first = done(&r).clone();
    assert_eq!(first["steps"][0]["exit_code"], 0, "{first}");
    assert_eq!(first["transport"], serde_json::to_value(transport).unwrap());
    // AND the machine went to sleep
    s.sleep_machine(&machine_id).await;

    // WHEN the next turn asks where it is and what it knows
    let r = s
        .turn(
            "alice",
            "pwd; cat notes.txt; echo $GREETING; grep -c 'echo hello' ~/.bash_history",
        )
        .await;
    // THEN the machine was woken, and cwd, files, variables and history survived
    let body = done(&r);
    assert!(
        body["timings"]["wake_ms"].as_u64().unwrap() > 0,
        "woken: {body}"
    );
    assert_eq!(body["steps"][0]["exit_code"], 0, "{body}");
    let out = output(body);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out:?}");
    assert!(lines[0].ends_with("/project"), "cwd kept: {out:?}");
    assert_eq!(lines[1], "hello");
    assert_eq!(lines[2], "hi", "exported variable kept: {out:?}");
    assert!(
        lines[3].parse::<u32>().unwrap() >= 1,
        "history kept: {out:?}"
    );
    let phase = s.emu.client().get_machine(&machine_id).await.unwrap().phase;
    assert_eq!(phase, agenthome::dedalus::Phase::Running);

    // AND the memory file has one line per turn that ran
    let memory = read_turns_file(&s, &machine_id);
    assert_eq!(memory.len(), 2, "{memory:?}");
    assert_eq!(memory[0]["turn_id"], first["turn_id"]);
    assert_eq!(memory[1]["turn_id"], body["turn_id"]);
    assert_eq!(memory[1]["status"], "completed");
    assert_lease_released(&s.item("alice").await);
}

#[tokio::test]
async fn home_cwd_variables_and_history_survive_sleep_terminal() {
    persistence_across_sleep(Transport::Terminal).await;
}

#[tokio::test]
async fn home_cwd_variables_and_history_survive_sleep_executions() {
    persistence_across_sleep(Transport::Executions).await;
}

#[tokio::test]
async fn the_next_turns_prompt_includes_the_previous_turns_summary() {
    // GIVEN an LLM agent whose first turn runs a command and answers
    let key = secret_key();
    let (base, script) = scripted_llm(vec![
        tool_call("c1", json!({"command": "echo remembered > ~/memo.txt"})),
        answer("Saved the memo in ~/memo.txt."),
        answer("You saved a memo."),
    ])
    .await;
    let s = Stack::start_with(StackOptions {
        agent: llm_agent(&base, &key),
        ..StackOptions::default()
    })
    .await;
    let machine_id = s.ready_user("alice").await;
    let r = s.turn("alice", "please save a memo").await;
    let first = done(&r).clone();
    assert_eq!(first["usage"]["llm_calls"], 2);
    assert_eq!(first["reply"], "Saved the memo in ~/memo.txt.");
    assert_eq!(
        std::fs::read_to_string(s.home(&machine_id).join("memo.txt")).unwrap(),
        "remembered\n"
    );

    // WHEN the next turn runs
    let r = s.turn("alice", "what did I do?").await;
    let second = done(&r);
    assert_eq!(second["reply"], "You saved a memo.");

    // THEN its system prompt carries the first turn's summary
    let requests = script.requests();
    assert_eq!(requests.len(), 3);
    let messages = script.messages(2);
    assert_eq!(messages[0]["role"], "system");
    let system = messages[0]["content"].as_str().unwrap();
    let turn_id = first["turn_id"].as_str().unwrap();
    assert!(system.contains(turn_id), "memory in the prompt: {system}");
    assert!(system.contains("please save a memo"), "{system}");
    assert!(system.contains("Saved the memo"), "{system}");
    // AND the first turn's prompt had no memory yet
    let first_system = script.messages(0)[0]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(!first_system.contains("Recent turns"), "{first_system}");
    // AND the key never reached a response
    assert!(!r.text.contains(&key));
}

// ---------------------------------------------------------------------------
// 3. Isolation
// ---------------------------------------------------------------------------

#[tokio::test]
async fn users_are_isolated_and_may_act_only_for_themselves() {
    // GIVEN alice with a project, and bob
    let s = Stack::start().await;
    let alice_machine = s.ready_user("alice").await;
    let r = s
        .turn("alice", "mkdir -p ~/project && echo a > ~/project/a.txt")
        .await;
    assert_eq!(done(&r)["steps"][0]["exit_code"], 0);
    let bob_machine = s.ready_user("bob").await;
    assert_ne!(alice_machine, bob_machine, "bob has his own machine");

    // WHEN bob looks for alice's project THEN it is not there
    let r = s.turn("bob", "ls ~/project").await;
    let body = done(&r);
    assert_eq!(body["machine_id"], bob_machine.as_str());
    assert_ne!(body["steps"][0]["exit_code"], 0, "{body}");
    assert!(body["steps"][0]["exit_code"].is_i64());

    // WHEN alice's token calls bob's turn route THEN 403, and nothing ran
    let msg = json!({"message": "echo intruder > ~/intruder.txt"}).to_string();
    let r = s.post_turn("bob", &msg, jwt("alice")).await;
    assert_problem(&r, 403);
    assert_eq!(r.body["code"], "forbidden");
    assert!(!s.home(&bob_machine).join("intruder.txt").exists());
    assert!(!s.home(&alice_machine).join("intruder.txt").exists());
    // AND without a token THEN 401
    let r = s.post_turn("bob", &msg, Auth::None).await;
    assert_problem(&r, 401);

    // WHEN the backend's admin scope acts for bob THEN the turn runs on bob's machine
    let r = s
        .post_turn(
            "bob",
            &json!({"message": "echo by-admin > ~/admin.txt"}).to_string(),
            admin(),
        )
        .await;
    assert_eq!(done(&r)["machine_id"], bob_machine.as_str());
    assert!(s.home(&bob_machine).join("admin.txt").exists());
    assert!(!s.home(&alice_machine).join("admin.txt").exists());
}

// ---------------------------------------------------------------------------
// 4. One turn per user at a time; the lease is always released
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_turns_for_one_user_one_runs_the_other_gets_409() {
    // GIVEN a ready user
    let s = Stack::start().await;
    s.ready_user("alice").await;
    // WHEN two turns arrive at once (each takes 2 s)
    let started = Instant::now();
    let (a, b) = tokio::join!(
        s.turn("alice", "sleep 2; echo one >> ~/concurrent.txt"),
        s.turn("alice", "sleep 2; echo two >> ~/concurrent.txt"),
    );
    // THEN exactly one ran and the other got 409 with Retry-After
    let mut statuses = [a.status, b.status];
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 409], "a: {} / b: {}", a.text, b.text);
    let busy = if a.status == 409 { &a } else { &b };
    assert_problem(busy, 409);
    assert_eq!(busy.body["code"], "turn_in_progress");
    let after: u64 = busy
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .unwrap();
    assert!((1..=60).contains(&after), "{after}");
    assert!(started.elapsed() < Duration::from_secs(15));
    let machine_id = s.item("alice").await.machine_id.unwrap();
    let ran = std::fs::read_to_string(s.home(&machine_id).join("concurrent.txt")).unwrap();
    assert_eq!(ran.lines().count(), 1, "only one command ran: {ran:?}");

    // AND afterwards the lease is released: the next turn runs at once
    assert_lease_released(&s.item("alice").await);
    let r = s.turn("alice", "echo next").await;
    assert_eq!(done(&r)["steps"][0]["output"], "next\n");
}

#[tokio::test]
async fn an_llm_failure_is_a_502_without_the_key_and_releases_the_lease() {
    // GIVEN an LLM that refuses the key (and echoes it back, as some do)
    let key = secret_key();
    let (base, script) = scripted_llm(vec![(
        401,
        json!({"error": {"message": format!("Incorrect API key provided: {key}")}}),
    )])
    .await;
    let s = Stack::start_with(StackOptions {
        agent: llm_agent(&base, &key),
        ..StackOptions::default()
    })
    .await;
    s.ready_user("alice").await;
    // WHEN a turn runs
    let r = s.turn("alice", "hello").await;
    // THEN 502 llm_error, no key anywhere in the response
    assert_problem(&r, 502);
    assert_eq!(r.body["code"], "llm_error");
    assert!(!r.text.contains(&key), "the key leaked: {}", r.text);
    assert!(!format!("{:?}", r.headers).contains(&key));
    assert_eq!(script.requests().len(), 1, "401 is not retried");
    // AND the lease is released
    assert_lease_released(&s.item("alice").await);
}

// ---------------------------------------------------------------------------
// 5. Deadline: a command left running holds the machine; the next turn sees its result
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_command_outliving_the_deadline_keeps_running_and_holds_the_machine() {
    // GIVEN a 6 s turn deadline
    let s = Stack::start_with(StackOptions {
        turn_deadline: Duration::from_secs(6),
        ..StackOptions::default()
    })
    .await;
    let machine_id = s.ready_user("alice").await;
    // WHEN a turn runs a command that needs 8 s
    let started = Instant::now();
    let r = s.turn("alice", "sleep 8; echo finished > ~/late.txt").await;
    let took = started.elapsed();
    // THEN the response arrives before the command ends, with status deadline
    assert!(took < Duration::from_secs(10), "took {took:?}");
    let body = done(&r);
    assert_eq!(body["status"], "deadline", "{body}");
    let step = &body["steps"][0];
    assert_eq!(step["still_running"], true, "{step}");
    assert!(
        step.get("exit_code").is_none() || step["exit_code"].is_null(),
        "{step}"
    );
    assert!(
        body["reply"].as_str().unwrap().contains("still running"),
        "{body}"
    );
    // AND the item holds the machine awake until the command's marker exists
    let item = s.item("alice").await;
    assert_lease_released(&item);
    assert_eq!(item.holds.len(), 1, "one hold: {:?}", item.holds);
    let hold = item.holds[0].clone();
    assert!(hold.until > now_ms());
    assert!(!hold.marker.starts_with('/'), "{hold:?}");
    let marker = s.home(&machine_id).join(&hold.marker);
    assert!(!marker.exists(), "the command has not finished yet");
    assert!(!s.home(&machine_id).join("late.txt").exists());
    // WHEN a turn arrives while the command still runs
    let r = s.turn("alice", "echo meanwhile").await;
    // THEN it runs in another shell, and the hold stays (the marker is not there yet)
    assert_eq!(output(done(&r)), "meanwhile\n");
    let item = s.item("alice").await;
    assert_eq!(
        item.holds,
        vec![hold.clone()],
        "the hold stays while the command runs"
    );
    assert!(!s.home(&machine_id).join("late.txt").exists());
    let wait_until = Instant::now() + Duration::from_secs(15);
    while !marker.exists() {
        assert!(
            Instant::now() < wait_until,
            "the marker never appeared: {}",
            marker.display()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(std::fs::read_to_string(&marker).unwrap().trim(), "0");

    // WHEN the next turn (after the command ended) reads its result
    let r = s.turn("alice", "cat ~/late.txt").await;
    // THEN it sees it, and the hold is gone
    let body = done(&r);
    assert_eq!(body["status"], "completed");
    assert_eq!(output(body), "finished\n");
    let item = s.item("alice").await;
    assert!(
        item.all_holds().next().is_none(),
        "hold cleared once the marker exists: {:?}",
        item.holds
    );
    assert_lease_released(&item);
}

// ---------------------------------------------------------------------------
// 6. A deleted terminal is replaced
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_deleted_terminal_is_replaced_by_a_new_one() {
    // GIVEN a turn that left its terminal id in the item
    let s = Stack::start().await;
    let machine_id = s.ready_user("alice").await;
    let r = s
        .turn("alice", "cd ~ && mkdir -p work && cd work && export AH_X=7")
        .await;
    assert_eq!(done(&r)["steps"][0]["exit_code"], 0);
    let first = s.item("alice").await.terminal_id.expect("terminal stored");
    let r = s.turn("alice", "echo reused").await;
    done(&r);
    assert_eq!(
        s.item("alice").await.terminal_id.as_deref(),
        Some(first.as_str()),
        "an idle ready terminal is reused"
    );
    // AND the terminal was deleted behind our back
    s.emu
        .client()
        .delete_terminal(&machine_id, &first, None)
        .await
        .expect("delete terminal");
    // WHEN the next turn runs
    let r = s.turn("alice", "pwd; echo x=$AH_X").await;
    // THEN it opens a new terminal (context restored) and completes
    let body = done(&r);
    assert_eq!(body["steps"][0]["exit_code"], 0, "{body}");
    let out = output(body);
    assert!(out.lines().next().unwrap().ends_with("/work"), "{out:?}");
    assert!(out.contains("x=7"), "{out:?}");
    let second = s.item("alice").await.terminal_id.expect("terminal stored");
    assert_ne!(second, first);
}

// ---------------------------------------------------------------------------
// 7. Huge output
// ---------------------------------------------------------------------------

#[tokio::test]
async fn five_megabytes_of_output_are_truncated_in_a_small_response() {
    let s = Stack::start().await;
    s.ready_user("alice").await;
    // WHEN a command prints 5 MB
    let r = s
        .turn(
            "alice",
            "head -c 5000000 /dev/zero | tr '\\0' a; echo; echo tail-end",
        )
        .await;
    // THEN 200, the step is truncated (head and tail kept), and the body is small
    let body = done(&r);
    let step = &body["steps"][0];
    assert_eq!(step["exit_code"], 0, "{}", &r.text[..r.text.len().min(500)]);
    assert_eq!(step["truncated"], true);
    assert!(
        step["output_bytes"].as_u64().unwrap() >= 5_000_000,
        "{}",
        step["output_bytes"]
    );
    let out = output(body);
    assert!(out.starts_with("aaaa"));
    assert!(out.trim_end().ends_with("tail-end"), "tail kept");
    assert!(
        r.text.len() < 1_000_000,
        "response is {} bytes",
        r.text.len()
    );
    assert_lease_released(&s.item("alice").await);
}

// ---------------------------------------------------------------------------
// 8. Bad input
// ---------------------------------------------------------------------------

/// (method, path, body, content-type override, expected status)
type BadCase = (
    &'static str,
    String,
    Option<String>,
    Option<&'static str>,
    u16,
);

#[tokio::test]
async fn bad_input_is_a_4xx_problem_and_never_provisions() {
    let s = Stack::start().await;
    let big = json!({"message": "x".repeat(33 * 1024)}).to_string();
    let cases: Vec<BadCase> = vec![
        // (method, path, body, content-type override, expected status)
        (
            "POST",
            "/v1/users/alice/turns".into(),
            Some(r#"{"message":""}"#.into()),
            None,
            422,
        ),
        (
            "POST",
            "/v1/users/alice/turns".into(),
            Some(r#"{"message":"   "}"#.into()),
            None,
            422,
        ),
        ("POST", "/v1/users/alice/turns".into(), Some(big), None, 413),
        (
            "POST",
            "/v1/users/alice/turns".into(),
            Some("{".into()),
            None,
            400,
        ),
        (
            "POST",
            "/v1/users/alice/turns".into(),
            Some("".into()),
            None,
            400,
        ),
        ("POST", "/v1/users/alice/turns".into(), None, None, 400),
        (
            "POST",
            "/v1/users/alice/turns".into(),
            Some(r#"{"message":"ls","extra":1}"#.into()),
            None,
            422,
        ),
        (
            "POST",
            "/v1/users/alice/turns".into(),
            Some(r#"{"message":"ls","history":[{"role":"system","content":"x"}]}"#.into()),
            None,
            422,
        ),
        (
            "POST",
            "/v1/users/alice/turns".into(),
            Some(r#"{"message":5}"#.into()),
            None,
            422,
        ),
        (
            "POST",
            "/v1/users/alice/turns".into(),
            Some(r#"{"message":"ls"}"#.into()),
            Some("text/plain"),
            415,
        ),
        (
            "POST",
            "/v1/users/-bad/turns".into(),
            Some(r#"{"message":"ls"}"#.into()),
            None,
            400,
        ),
        (
            "POST",
            "/v1/users/a%2Fb/turns".into(),
            Some(r#"{"message":"ls"}"#.into()),
            None,
            400,
        ),
        (
            "POST",
            format!("/v1/users/{}/turns", "u".repeat(129)),
            Some(r#"{"message":"ls"}"#.into()),
            None,
            400,
        ),
        ("GET", "/v1/users/alice/turns".into(), None, None, 405),
        (
            "PUT",
            "/v1/users/alice/turns".into(),
            Some(r#"{"message":"ls"}"#.into()),
            None,
            405,
        ),
        (
            "POST",
            "/v1/users/alice/turnz".into(),
            Some(r#"{"message":"ls"}"#.into()),
            None,
            404,
        ),
        ("GET", "/v1/users/alice/machine".into(), None, None, 404),
    ];
    for (method, path, body, content_type, want) in &cases {
        let mut event = http(method, path, body.as_deref(), admin());
        if let Some(ct) = content_type {
            event["headers"]["content-type"] = json!(ct);
        }
        let r = s.send(&event).await;
        assert!(r.status < 500, "{method} {path}: a 5xx: {}", r.text);
        assert_eq!(r.status, *want, "{method} {path} {body:?}: {}", r.text);
        assert_problem(&r, *want);
    }
    // AND none of them provisioned anything
    assert_eq!(s.drain_worker().await, 0);
    assert!(s
        .emu
        .client()
        .list_all_machines(None)
        .await
        .unwrap()
        .is_empty());
    assert!(agenthome::store::UserStore::get(&s.store, &uid("alice"))
        .await
        .unwrap()
        .is_none());
}

// ---------------------------------------------------------------------------
// Lease renewal and lost machines
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_turn_lease_is_renewed_while_a_long_turn_runs() {
    // GIVEN a short turn lease (1.5 s, renewed every 0.5 s)
    let s = short_lease_stack().await;
    s.ready_user("alice").await;
    // WHEN a turn runs for 4 s and another arrives after 2.5 s (past the first lease)
    let long = s.turn("alice", "sleep 4; echo long >> ~/order.txt");
    let late = async {
        tokio::time::sleep(Duration::from_millis(2500)).await;
        s.turn("alice", "echo late >> ~/order.txt").await
    };
    let (a, b) = tokio::join!(long, late);
    // THEN the first completes and the second is refused: the lease was still held
    assert_eq!(done(&a)["steps"][0]["exit_code"], 0);
    assert_problem(&b, 409);
    assert_eq!(b.body["code"], "turn_in_progress");
    assert_lease_released(&s.item("alice").await);
}

/// A ready user whose machine was destroyed outside agenthome.
async fn lost_machine_stack() -> (Stack, String) {
    let s = Stack::start().await;
    let machine_id = s.ready_user("alice").await;
    let client = s.emu.client();
    client
        .delete_machine(&machine_id, None, None)
        .await
        .expect("delete");
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.get_machine(&machine_id).await.is_ok() {
        assert!(Instant::now() < deadline, "machine never went away");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (s, machine_id)
}

#[tokio::test]
async fn a_machine_lost_behind_our_back_starts_provisioning_instead_of_a_5xx() {
    // GIVEN a ready user whose machine was destroyed outside agenthome
    let (s, _lost) = lost_machine_stack().await;
    // WHEN she sends a message
    let r = s.turn("alice", "echo after-loss").await;
    // THEN it is not a 5xx: provisioning starts again (202); the item is
    // under the provisioning lease (the turn's is gone) without the old machine
    assert_eq!(r.status, 202, "{}", r.text);
    assert!(r.header("retry-after").is_some());
    let item = s.item("alice").await;
    let lease = item.live_lease(now_ms()).expect("the provisioning lease");
    assert_eq!(
        lease.kind,
        agenthome::store::LeaseKind::Provision,
        "{item:?}"
    );
    assert_eq!(
        item.machine_id, None,
        "the lost machine is forgotten: {item:?}"
    );
    assert_eq!(item.terminal_id, None);
    assert_eq!(s.drain_worker().await, 1, "a worker was started");
}

#[tokio::test]
async fn a_machine_lost_behind_our_back_is_replaced_by_a_new_one() {
    let (s, machine_id) = lost_machine_stack().await;
    let r = s.turn("alice", "echo after-loss").await;
    assert_eq!(r.status, 202, "{}", r.text);
    assert_eq!(s.drain_worker().await, 1);
    let item = s.item("alice").await;
    assert_ne!(
        item.machine_id.as_deref(),
        Some(machine_id.as_str()),
        "{item:?}"
    );
    // THEN after the worker, a turn runs on a new machine
    let r = s.turn("alice", "echo after-loss").await;
    let body = done(&r);
    assert_ne!(body["machine_id"], machine_id.as_str());
    assert_eq!(output(body), "after-loss\n");
}

// ---------------------------------------------------------------------------
// Never on a sleeping machine: a sleep in progress, a sweep holding the item
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_turn_arriving_while_the_machine_falls_asleep_wakes_it_first() {
    // GIVEN a machine whose sleep takes 1.5 s and has just begun
    let s = Stack::start().await;
    let machine_id = s.ready_user("alice").await;
    s.emu.configure(json!({"sleep_delay_ms": 1500})).await;
    s.emu
        .client()
        .sleep_machine(&machine_id, None, None)
        .await
        .expect("sleep accepted");
    // WHEN a turn arrives meanwhile
    let r = s
        .turn("alice", "echo awake > ~/awake.txt; cat ~/awake.txt")
        .await;
    // THEN it waited for the machine to be woken and ran there
    let body = done(&r);
    assert_eq!(output(body), "awake\n", "{body}");
    assert!(body["timings"]["wake_ms"].as_u64().unwrap() > 0, "{body}");
    let m = s.emu.client().get_machine(&machine_id).await.unwrap();
    assert_eq!(m.phase, agenthome::dedalus::Phase::Running);
    assert_eq!(s.item("alice").await.power, agenthome::store::Power::Awake);
}

#[tokio::test]
async fn a_turn_waits_briefly_for_the_sweeps_lease_then_runs() {
    // GIVEN the sweep holds the item's lease (for one API call: 800 ms)
    let s = Stack::start().await;
    s.ready_user("alice").await;
    let item = s.item("alice").await;
    let now = now_ms();
    let taken = agenthome::store::UserStore::acquire_lease(
        &s.store,
        &uid("alice"),
        "sweep-test",
        agenthome::store::LeasePurpose::Sweep {
            expected_last_active_at: item.last_active_at,
        },
        now + 60_000,
        now,
    )
    .await
    .unwrap();
    assert!(
        matches!(taken, agenthome::store::AcquireOutcome::Acquired(_)),
        "{taken:?}"
    );
    let release = async {
        tokio::time::sleep(Duration::from_millis(800)).await;
        agenthome::store::UserStore::release_lease(&s.store, &uid("alice"), "sweep-test", now_ms())
            .await
            .unwrap();
    };
    // WHEN a turn arrives meanwhile
    let started = Instant::now();
    let (r, ()) = tokio::join!(s.turn("alice", "echo after-sweep"), release);
    // THEN it waited for the sweep and ran
    assert_eq!(output(done(&r)), "after-sweep\n");
    assert!(started.elapsed() >= Duration::from_millis(800));
    assert_lease_released(&s.item("alice").await);
}

// ---------------------------------------------------------------------------
// The invocation's remaining time bounds the turn
// ---------------------------------------------------------------------------

#[tokio::test]
async fn the_lambda_deadline_minus_the_margin_bounds_the_turn() {
    // GIVEN a 60 s TURN_DEADLINE but an invocation with 7 s left (margin 2 s)
    let s = Stack::start().await;
    s.ready_user("alice").await;
    let event = http(
        "POST",
        "/v1/users/alice/turns",
        Some(&json!({"message": "sleep 8; echo done > ~/bounded.txt"}).to_string()),
        jwt("alice"),
    );
    // WHEN the turn runs an 8 s command
    let started = Instant::now();
    let r = s.send_with_deadline(&event, now_ms() + 7_000).await;
    // THEN it answers before the invocation's end, with status deadline
    let took = started.elapsed();
    assert!(took < Duration::from_secs(6), "took {took:?}");
    let body = done(&r);
    assert_eq!(body["status"], "deadline", "{body}");
    assert_eq!(body["steps"][0]["still_running"], true);

    // WHEN an invocation arrives with its deadline already past
    let r = s
        .send_with_deadline(&event, now_ms().saturating_sub(1_000))
        .await;
    // THEN nothing runs: 503 no_time with Retry-After
    assert_problem(&r, 503);
    assert_eq!(r.body["code"], "no_time");
    assert!(r.header("retry-after").is_some());
    assert_lease_released(&s.item("alice").await);
}

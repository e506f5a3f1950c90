//! The agent loop against a scripted OpenAI-compatible server (axum, on
//! loopback) and a real emulator. The server replays a script of responses
//! and records every request, so the tests assert what the model was sent.
//! Commands are harmless and write only under `$HOME`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use agenthome::agent::Observer;
use agenthome::agent::{
    Agent, AgentError, AgentOptions, AgentStatus, ChatMessage, Limits, LlmError, TurnInput,
};
use agenthome::runner::TerminalRunner;
use agenthome_tests::fixtures::{emulator_with_machine_id, llm_agent as agent, secret_key};
use agenthome_tests::llm::{
    answer, scripted_llm, stream_chunk, stream_text, stream_tool_calls, tool_call, tool_call_raw,
    Reply,
};
use agenthome_tests::Emulator;
use serde_json::{json, Value};
use std::sync::Mutex;
use tokio::time::Instant;

// ---------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------

struct Machine {
    _emu: Emulator,
    runner: TerminalRunner,
}

async fn machine() -> Machine {
    let (emu, client, id) = emulator_with_machine_id(&[]).await;
    let (runner, _) = TerminalRunner::open(&client, &id, None)
        .await
        .expect("open");
    Machine { _emu: emu, runner }
}

fn limits(secs: u64) -> Limits {
    Limits {
        max_steps: 10,
        command_timeout: Duration::from_secs(30),
        deadline: Instant::now() + Duration::from_secs(secs),
    }
}

fn input(message: &str) -> TurnInput {
    TurnInput {
        wake_note: None,
        message: message.into(),
        history: vec![
            ChatMessage {
                role: "user".into(),
                content: "earlier question".into(),
            },
            ChatMessage {
                role: "assistant".into(),
                content: "earlier answer".into(),
            },
        ],
        memory: vec!["{\"turn\":1,\"summary\":\"created ~/notes\"}".into()],
    }
}

fn tool_content(message: &Value) -> Value {
    assert_eq!(message["role"], "tool", "{message}");
    serde_json::from_str(message["content"].as_str().expect("tool content")).expect("json")
}

fn assert_no_key(key: &str, err: &AgentError) {
    assert!(
        !err.to_string().contains(key),
        "Display leaks the key: {err}"
    );
    assert!(!format!("{err:?}").contains(key), "Debug leaks the key");
    let mut source = std::error::Error::source(err);
    while let Some(s) = source {
        assert!(!s.to_string().contains(key));
        source = s.source();
    }
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[tokio::test]
async fn two_step_turn_sends_command_results_to_the_model() {
    let mut m = machine().await;
    let key = secret_key();
    let (base, script) = scripted_llm(vec![
        tool_call(
            "call_1",
            json!({"command": "mkdir -p ~/ah-agent && cd ~/ah-agent && echo hello > f.txt && pwd"}),
        ),
        tool_call(
            "call_2",
            json!({"command": "cat f.txt; false", "timeout_s": 20}),
        ),
        answer("Created ~/ah-agent/f.txt."),
    ])
    .await;
    let started = Instant::now();
    let out = agent(&base, &key)
        .run(input("make a file"), &mut m.runner, limits(60))
        .await
        .expect("turn");
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(out.status, AgentStatus::Completed);
    assert_eq!(out.reply, "Created ~/ah-agent/f.txt.");
    assert_eq!(out.steps.len(), 2);
    assert_eq!(out.steps[0].exit_code, Some(0));
    assert!(
        out.steps[0].output.ends_with("/ah-agent\n"),
        "{:?}",
        out.steps[0]
    );
    assert_eq!(out.steps[1].exit_code, Some(1));
    assert_eq!(out.steps[1].output, "hello\n");
    assert_eq!(out.usage.llm_calls, 3);
    assert_eq!(out.usage.prompt_tokens, 300);
    assert_eq!(out.usage.completion_tokens, 30);

    let reqs = script.requests();
    assert_eq!(reqs.len(), 3);
    // Every request: bearer key, model, the one tool, tool_choice auto.
    for (auth, body) in &reqs {
        assert_eq!(auth.as_deref(), Some(format!("Bearer {key}").as_str()));
        assert_eq!(body["model"], "test-model");
        assert_eq!(body["tool_choice"], "auto");
        assert_eq!(body["tools"][0]["function"]["name"], "run_command");
        assert_eq!(
            body["tools"][0]["function"]["parameters"]["required"],
            json!(["command"])
        );
    }
    // First request: system prompt with memory, history, then the message.
    let first = script.messages(0);
    assert_eq!(first[0]["role"], "system");
    let system = first[0]["content"].as_str().unwrap();
    assert!(system.contains("run_command") && system.contains("turns.jsonl"));
    assert!(system.contains("created ~/notes"), "memory in prompt");
    assert_eq!(first[1]["content"], "earlier question");
    assert_eq!(first[2]["role"], "assistant");
    assert_eq!(first[3], json!({"role": "user", "content": "make a file"}));
    // Second request: the assistant's tool call, then its result.
    let second = script.messages(1);
    let n = second.len();
    assert_eq!(second[n - 2]["tool_calls"][0]["id"], "call_1");
    assert_eq!(second[n - 1]["tool_call_id"], "call_1");
    let result = tool_content(&second[n - 1]);
    assert_eq!(result["exit_code"], 0);
    assert!(result["output"].as_str().unwrap().ends_with("/ah-agent\n"));
    assert_eq!(result["still_running"], false);
    // Third request: the second result (cwd persisted: f.txt was found).
    let third = script.messages(2);
    let result = tool_content(third.last().unwrap());
    assert_eq!(result["exit_code"], 1);
    assert_eq!(result["output"], "hello\n");

    // The outcome the HTTP response embeds has the documented shape and no key.
    let json = serde_json::to_string(&out).unwrap();
    assert!(!json.contains(&key));
    let v: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["status"], "completed");
    assert_eq!(v["usage"]["llm_calls"], 3);
    for field in [
        "command",
        "exit_code",
        "output",
        "duration_ms",
        "still_running",
        "truncated",
        "output_bytes",
    ] {
        assert!(v["steps"][0].get(field).is_some(), "steps[].{field}");
    }
}

#[tokio::test]
async fn llm_401_is_a_clear_error_without_retry_or_key() {
    let mut m = machine().await;
    let key = secret_key();
    let (base, script) = scripted_llm(vec![(
        401,
        json!({"error": {"message": format!("Incorrect API key provided: {key}"), "type": "invalid_request_error"}}),
    )])
    .await;
    let started = Instant::now();
    let err = agent(&base, &key)
        .run(input("hi"), &mut m.runner, limits(60))
        .await
        .expect_err("401");
    assert!(started.elapsed() < Duration::from_secs(5), "no hang");
    assert!(
        matches!(
            &err,
            AgentError::Llm {
                source: LlmError::Auth { status: 401 },
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("LLM_API_KEY"), "{err}");
    assert_eq!(script.requests().len(), 1, "401 is not retried");
    assert!(err.partial().steps.is_empty());
    assert_no_key(&key, &err);
}

#[tokio::test]
async fn llm_500_is_retried_then_succeeds() {
    let mut m = machine().await;
    let key = secret_key();
    let (base, script) = scripted_llm(vec![
        (500, json!({"error": {"message": "upstream exploded"}})),
        answer("all good"),
    ])
    .await;
    let out = agent(&base, &key)
        .run(input("hi"), &mut m.runner, limits(60))
        .await
        .expect("retried");
    assert_eq!(out.reply, "all good");
    assert_eq!(out.usage.llm_calls, 1);
    assert_eq!(script.requests().len(), 2);
}

#[tokio::test]
async fn llm_500_forever_is_a_clear_error_with_steps_kept() {
    let mut m = machine().await;
    let key = secret_key();
    let (base, _script) = scripted_llm(vec![
        tool_call("c1", json!({"command": "echo step-one"})),
        (503, json!({"error": {"message": format!("bad {key}")}})),
        (503, json!({})),
        (503, json!({})),
    ])
    .await;
    let started = Instant::now();
    let err = agent(&base, &key)
        .run(input("hi"), &mut m.runner, limits(60))
        .await
        .expect_err("503s");
    assert!(started.elapsed() < Duration::from_secs(15));
    assert!(
        matches!(
            &err,
            AgentError::Llm {
                source: LlmError::Server { status: 503 },
                ..
            }
        ),
        "{err:?}"
    );
    // The step done before the failure is reported.
    assert_eq!(err.partial().steps.len(), 1);
    assert_eq!(err.partial().steps[0].output, "step-one\n");
    assert_eq!(err.partial().usage.llm_calls, 1);
    assert_no_key(&key, &err);
}

#[tokio::test]
async fn malformed_tool_arguments_are_reported_to_the_model_once() {
    let mut m = machine().await;
    let key = secret_key();
    let (base, script) = scripted_llm(vec![
        tool_call_raw("bad_1", "{\"command\": \"echo hi"),
        tool_call("good", json!({"command": "echo fixed"})),
        answer("done"),
    ])
    .await;
    let out = agent(&base, &key)
        .run(input("hi"), &mut m.runner, limits(60))
        .await
        .expect("recovers");
    assert_eq!(out.status, AgentStatus::Completed);
    assert_eq!(out.steps.len(), 1, "the malformed call ran nothing");
    assert_eq!(out.steps[0].output, "fixed\n");
    let second = script.messages(1);
    let last = second.last().unwrap();
    assert_eq!(last["tool_call_id"], "bad_1");
    let err = tool_content(last);
    assert!(
        err["error"].as_str().unwrap().contains("invalid arguments"),
        "{err}"
    );
}

#[tokio::test]
async fn repeated_malformed_tool_calls_fail_the_turn() {
    let mut m = machine().await;
    let key = secret_key();
    let (base, script) = scripted_llm(vec![
        tool_call_raw("bad_1", "not json"),
        (
            200,
            json!({"choices": [{"message": {"role": "assistant", "content": null,
                "tool_calls": [{"id": "bad_2", "type": "function",
                    "function": {"name": "delete_everything", "arguments": "{}"}}]}}]}),
        ),
        answer("never reached"),
    ])
    .await;
    let err = agent(&base, &key)
        .run(input("hi"), &mut m.runner, limits(60))
        .await
        .expect_err("fails");
    assert!(
        matches!(
            &err,
            AgentError::Llm {
                source: LlmError::MalformedToolCall(_),
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("delete_everything"), "{err}");
    assert_eq!(script.requests().len(), 2);
    assert_no_key(&key, &err);
}

#[tokio::test]
async fn step_limit_stops_the_turn() {
    let mut m = machine().await;
    let key = secret_key();
    let (base, script) = scripted_llm(vec![
        tool_call("c1", json!({"command": "echo 1"})),
        tool_call("c2", json!({"command": "echo 2"})),
        tool_call("c3", json!({"command": "echo 3"})),
        answer("never reached"),
    ])
    .await;
    let mut l = limits(60);
    l.max_steps = 2;
    let out = agent(&base, &key)
        .run(input("count"), &mut m.runner, l)
        .await
        .expect("turn");
    assert_eq!(out.status, AgentStatus::StepLimit);
    assert_eq!(out.steps.len(), 2);
    assert!(out.reply.contains("step limit"), "{}", out.reply);
    assert_eq!(script.requests().len(), 3);
    assert_eq!(serde_json::to_value(&out).unwrap()["status"], "step_limit");
}

#[tokio::test]
async fn deadline_with_a_still_running_command() {
    let mut m = machine().await;
    let key = secret_key();
    let (base, script) = scripted_llm(vec![
        tool_call("c1", json!({"command": "echo begun; sleep 30"})),
        answer("never reached"),
    ])
    .await;
    let started = Instant::now();
    let out = agent(&base, &key)
        .run(input("long job"), &mut m.runner, limits(3))
        .await
        .expect("turn");
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "ended at the deadline: {took:?}"
    );
    assert_eq!(out.status, AgentStatus::Deadline);
    assert_eq!(out.steps.len(), 1);
    let step = &out.steps[0];
    assert!(step.still_running);
    assert_eq!(step.exit_code, None);
    assert!(step.output.contains("begun"));
    let marker = step.completion_marker.as_deref().expect("marker");
    assert!(out.reply.contains("still running"), "{}", out.reply);
    assert!(out.reply.contains(marker), "{}", out.reply);
    assert_eq!(
        script.requests().len(),
        1,
        "no model call after the deadline"
    );
    let v = serde_json::to_value(&out).unwrap();
    assert_eq!(v["status"], "deadline");
    assert_eq!(v["steps"][0]["still_running"], true);
    assert!(!v.to_string().contains(&key));
}

#[tokio::test]
async fn timed_out_command_then_next_command_runs_in_a_fresh_shell() {
    let mut m = machine().await;
    let key = secret_key();
    let (base, script) = scripted_llm(vec![
        tool_call("c1", json!({"command": "cd ~ && mkdir -p ah-bg && cd ah-bg && export AH_BG=1 && sleep 20", "timeout_s": 1})),
        tool_call("c2", json!({"command": "echo next; echo \"bg=$AH_BG\""})),
        answer("ok"),
    ])
    .await;
    let out = agent(&base, &key)
        .run(input("bg"), &mut m.runner, limits(60))
        .await
        .expect("turn");
    assert_eq!(out.status, AgentStatus::Completed);
    assert!(out.steps[0].still_running);
    assert_eq!(out.steps[1].exit_code, Some(0));
    assert!(
        out.steps[1].output.starts_with("next\n"),
        "{:?}",
        out.steps[1]
    );
    let second = script.messages(1);
    let result = tool_content(second.last().unwrap());
    assert_eq!(result["still_running"], true);
    assert!(result["note"].as_str().unwrap().contains(".agenthome/run/"));
}

#[tokio::test]
async fn shell_mode_runs_the_message_as_a_command() {
    let mut m = machine().await;
    let out = Agent::shell()
        .run(
            input("echo from-shell-mode; exit_with() { return $1; }; exit_with 4"),
            &mut m.runner,
            limits(30),
        )
        .await
        .expect("turn");
    assert_eq!(out.status, AgentStatus::Completed);
    assert_eq!(out.usage.llm_calls, 0);
    assert_eq!(out.steps.len(), 1);
    assert_eq!(out.steps[0].exit_code, Some(4));
    assert!(out.reply.starts_with("from-shell-mode\n"), "{}", out.reply);
    assert!(out.reply.contains("[exit code 4]"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_over_the_budget_is_trimmed_oldest_first_and_stated() {
    let key = secret_key();
    let (url, script) = scripted_llm(vec![answer("ok")]).await;
    let agent = agent(&url, &key).with_options(AgentOptions {
        min_llm_time: Duration::from_millis(500),
        history_budget: 2500,
        ..AgentOptions::default()
    });
    let mut m = machine().await;
    let mut turn = input("hi");
    turn.history = (0..10)
        .map(|n| ChatMessage {
            role: if n % 2 == 0 { "user" } else { "assistant" }.into(),
            content: format!("entry-{n}:{}", "x".repeat(992)),
        })
        .collect();
    let out = agent
        .run(turn, &mut m.runner, limits(60))
        .await
        .expect("turn");
    assert_eq!(out.usage.history_dropped, 8);
    let sent = script.messages(0);
    let contents: Vec<&str> = sent.iter().filter_map(|m| m["content"].as_str()).collect();
    assert!(contents.iter().any(|c| c.starts_with("entry-8:")));
    assert!(contents.iter().any(|c| c.starts_with("entry-9:")));
    assert!(
        !contents.iter().any(|c| c.starts_with("entry-7:")),
        "older entries are not sent"
    );
    assert!(contents
        .iter()
        .any(|c| c.contains("8 older message(s) of the conversation were left out")));
    let v = serde_json::to_value(&out).unwrap();
    assert_eq!(v["usage"]["history_dropped"], 8, "stated in the result");
}

// ---------------------------------------------------------------------------
// Streamed completions (OpenAI wire format: SSE chunks, `data: [DONE]`)
// ---------------------------------------------------------------------------

/// Records the reply deltas and the steps started.
#[derive(Default)]
struct Seen {
    deltas: Mutex<Vec<String>>,
    steps: Mutex<Vec<String>>,
}

impl Observer for Seen {
    fn step_started(&self, _index: usize, command: &str) {
        self.steps.lock().unwrap().push(command.to_owned());
    }
    fn reply_delta(&self, text: &str) {
        self.deltas.lock().unwrap().push(text.to_owned());
    }
}

#[tokio::test]
async fn a_streamed_tool_call_split_into_fragments_runs_and_the_reply_streams() {
    // GIVEN a model that streams a tool call whose arguments arrive in four
    // fragments, then streams its answer in three pieces
    let mut m = machine().await;
    let (base, script) = scripted_llm(vec![
        stream_tool_calls(
            &[("call_s1", json!({"command": "echo streamed-$((6*7))"}))],
            4,
        ),
        stream_text(&["The command ", "printed ", "streamed-42."]),
    ])
    .await;
    let seen = Seen::default();

    // WHEN a turn runs
    let out = agent(&base, &secret_key())
        .run_observed(input("go"), &mut m.runner, limits(60), &seen)
        .await
        .expect("turn");

    // THEN both calls asked for a stream, the assembled command ran, and the
    // reply arrived as the three deltas, in order, adding up to the reply
    for (_, body) in script.requests() {
        assert_eq!(body["stream"], true, "{body}");
    }
    assert_eq!(out.status, AgentStatus::Completed);
    assert_eq!(*seen.steps.lock().unwrap(), ["echo streamed-$((6*7))"]);
    assert_eq!(out.steps[0].output, "streamed-42\n");
    assert_eq!(
        *seen.deltas.lock().unwrap(),
        ["The command ", "printed ", "streamed-42."]
    );
    assert_eq!(out.reply, "The command printed streamed-42.");
    // … usage comes from the streams' final chunks
    assert_eq!(out.usage.llm_calls, 2);
    assert_eq!(out.usage.prompt_tokens, 200);
    // … and the model got its own call back with the whole arguments
    let second = script.messages(1);
    let n = second.len();
    assert_eq!(second[n - 2]["tool_calls"][0]["id"], "call_s1");
    assert_eq!(
        second[n - 2]["tool_calls"][0]["function"]["arguments"],
        json!({"command": "echo streamed-$((6*7))"}).to_string()
    );
    assert_eq!(second[n - 1]["tool_call_id"], "call_s1");
}

#[tokio::test]
async fn two_parallel_streamed_tool_calls_both_run_in_order() {
    // GIVEN a model that streams two tool calls at once, their fragments
    // interleaved
    let mut m = machine().await;
    let (base, script) = scripted_llm(vec![
        stream_tool_calls(
            &[
                ("call_a", json!({"command": "echo first-call"})),
                ("call_b", json!({"command": "echo second-call"})),
            ],
            3,
        ),
        stream_text(&["Both ran."]),
    ])
    .await;
    let seen = Seen::default();

    // WHEN a turn runs
    let out = agent(&base, &secret_key())
        .run_observed(input("go"), &mut m.runner, limits(60), &seen)
        .await
        .expect("turn");

    // THEN both commands ran, in index order, each answered under its id
    assert_eq!(
        *seen.steps.lock().unwrap(),
        ["echo first-call", "echo second-call"]
    );
    assert_eq!(out.steps[0].output, "first-call\n");
    assert_eq!(out.steps[1].output, "second-call\n");
    assert_eq!(out.reply, "Both ran.");
    let second = script.messages(1);
    let n = second.len();
    let calls = second[n - 3]["tool_calls"].as_array().unwrap();
    let ids: Vec<&str> = calls.iter().map(|c| c["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["call_a", "call_b"]);
    assert_eq!(second[n - 2]["tool_call_id"], "call_a");
    assert_eq!(tool_content(&second[n - 2])["output"], "first-call\n");
    assert_eq!(second[n - 1]["tool_call_id"], "call_b");
    assert_eq!(tool_content(&second[n - 1])["output"], "second-call\n");
}

#[tokio::test]
async fn a_server_that_rejects_streaming_gets_plain_calls_from_then_on() {
    // GIVEN a model server that refuses `stream: true`, then answers plainly
    let mut m = machine().await;
    let (base, script) = scripted_llm(vec![
        (
            400,
            json!({"error": {"message": "stream is not supported"}}),
        ),
        answer("plain answer"),
        answer("second plain answer"),
    ])
    .await;
    let agent = agent(&base, &secret_key());
    let seen = Seen::default();

    // WHEN two turns run
    let first = agent
        .run_observed(input("a"), &mut m.runner, limits(60), &seen)
        .await
        .expect("first turn");
    let second = agent
        .run(input("b"), &mut m.runner, limits(60))
        .await
        .expect("second turn");

    // THEN the refused request is repeated without streaming, and the client
    // does not ask for a stream again
    assert_eq!(first.reply, "plain answer");
    assert_eq!(second.reply, "second plain answer");
    assert!(seen.deltas.lock().unwrap().is_empty());
    let streams: Vec<Value> = script
        .requests()
        .iter()
        .map(|(_, b)| b.get("stream").cloned().unwrap_or(Value::Null))
        .collect();
    assert_eq!(streams, [json!(true), Value::Null, Value::Null]);
    assert_eq!(first.usage.llm_calls, 1);
}

#[tokio::test]
async fn a_plain_json_answer_to_a_streaming_request_is_used_as_is() {
    // GIVEN a server that ignores `stream: true` and answers with JSON
    let mut m = machine().await;
    let (base, script) = scripted_llm(vec![answer("json anyway")]).await;

    // WHEN a turn runs, THEN that answer is the reply, after one request
    let out = agent(&base, &secret_key())
        .run(input("a"), &mut m.runner, limits(60))
        .await
        .expect("turn");
    assert_eq!(out.reply, "json anyway");
    assert_eq!(script.requests().len(), 1);
}

#[tokio::test]
async fn a_stream_that_breaks_off_after_text_fails_without_a_retry() {
    // GIVEN a model whose stream stops after some text, without finishing
    let mut m = machine().await;
    let (base, script) = scripted_llm(vec![
        Reply::BrokenStream(vec![
            stream_chunk(json!({"content": "I will "}), None),
            stream_chunk(json!({"content": "now"}), None),
        ]),
        stream_text(&["never sent"]),
    ])
    .await;
    let seen = Seen::default();

    // WHEN a turn runs
    let err = agent(&base, &secret_key())
        .run_observed(input("a"), &mut m.runner, limits(60), &seen)
        .await
        .expect_err("a broken stream fails the turn");

    // THEN the turn fails with the interruption, the text shown is not
    // repeated by a retry
    assert!(
        matches!(
            err,
            AgentError::Llm {
                source: LlmError::Interrupted { .. },
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(*seen.deltas.lock().unwrap(), ["I will ", "now"]);
    assert_eq!(script.requests().len(), 1);
}

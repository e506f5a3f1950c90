//! Streamed turn progress (Server-Sent Events through Lambda response
//! streaming): the chat-turn function's streaming handler driven in-process
//! against a real emulator and a real DynamoDB-compatible server (see
//! `agenthome_tests::stack`).
//!
//! Every command the tests run touches only `$HOME` (the emulator runs
//! commands on the host).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use agenthome::agent::Agent;
use agenthome::clock::now_ms;
use agenthome::turn::{TurnSettings, TRUNCATED_NOTE, TURNS_FILE};
use agenthome_tests::fixtures;
use agenthome_tests::llm::{answer, scripted_llm, stream_text, stream_tool_calls, tool_call};
use agenthome_tests::stack::{Stack, StackOptions};
use chat_turn_fn::StreamBody;
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::time::Duration;
use tokio::time::Instant;

/// One parsed SSE block.
#[derive(Debug, Clone, PartialEq)]
enum Sse {
    /// `event:` + `data:`.
    Event(String, Value),
    /// A comment line (`: keep-alive`).
    Comment(String),
}

/// Reads SSE blocks off a streaming body.
struct Reader {
    body: StreamBody,
    buf: String,
}

impl Reader {
    fn new(body: StreamBody) -> Self {
        Reader {
            body,
            buf: String::new(),
        }
    }

    /// The next block; `None` at the end of the body.
    async fn next(&mut self) -> Option<Sse> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                return Some(parse_block(block.trim_end_matches('\n')));
            }
            let chunk = tokio::time::timeout(Duration::from_secs(60), self.body.next())
                .await
                .expect("the stream stalled")?;
            self.buf
                .push_str(std::str::from_utf8(&chunk).expect("utf-8 chunk"));
        }
    }

    /// Every remaining block.
    async fn all(&mut self) -> Vec<Sse> {
        let mut out = Vec::new();
        while let Some(b) = self.next().await {
            out.push(b);
        }
        assert!(self.buf.is_empty(), "trailing bytes: {:?}", self.buf);
        out
    }
}

fn parse_block(block: &str) -> Sse {
    if let Some(c) = block.strip_prefix(':') {
        assert!(!block.contains('\n'), "one-line comment: {block:?}");
        return Sse::Comment(c.trim().to_string());
    }
    let mut name = None;
    let mut data = None;
    for line in block.lines() {
        if let Some(n) = line.strip_prefix("event: ") {
            name = Some(n.to_string());
        } else if let Some(d) = line.strip_prefix("data: ") {
            assert!(data.is_none(), "one data line per event: {block:?}");
            data = Some(serde_json::from_str(d).expect("data is JSON"));
        } else {
            panic!("unexpected SSE line {line:?} in {block:?}");
        }
    }
    Sse::Event(name.expect("event name"), data.expect("event data"))
}

fn events(blocks: &[Sse]) -> Vec<(String, Value)> {
    blocks
        .iter()
        .filter_map(|b| match b {
            Sse::Event(n, d) => Some((n.clone(), d.clone())),
            Sse::Comment(_) => None,
        })
        .collect()
}

fn names(evs: &[(String, Value)]) -> Vec<&str> {
    evs.iter().map(|(n, _)| n.as_str()).collect()
}

fn llm_agent(base_url: &str) -> Agent {
    fixtures::llm_agent(base_url, "sk-test-stream")
}

fn assert_sse_response(resp: &lambda_http::Response<StreamBody>) {
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("text/event-stream")
    );
}

/// The turn result without what differs between two runs of the same turn.
fn comparable(result: &Value) -> Value {
    let mut r = result.clone();
    r["turn_id"] = Value::Null;
    r["timings"] = Value::Null;
    if let Some(steps) = r["steps"].as_array_mut() {
        for s in steps {
            s["duration_ms"] = Value::Null;
        }
    }
    r
}

/// The steps of a three-command turn and its answer.
fn script() -> Vec<(u16, Value)> {
    vec![
        tool_call("c1", json!({"command": "echo one"})),
        tool_call(
            "c2",
            json!({"command": "printf '\\033[31mred\\033[0m\\n'; echo two >&2"}),
        ),
        tool_call("c3", json!({"command": "cd ~ && ls -d . && false"})),
        answer("All three ran."),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_step_turn_streams_its_progress_and_ends_with_the_json_result() {
    // GIVEN a ready user and a model that runs three commands, then answers
    let (base, llm) = scripted_llm(script()).await;
    let s = Stack::start_with(StackOptions {
        agent: llm_agent(&base),
        ..StackOptions::default()
    })
    .await;
    s.ready_user("alice").await;

    // WHEN the turn is asked for as an event stream
    let resp = s.stream_turn("alice", "run three things").await;
    assert_sse_response(&resp);
    let blocks = Reader::new(resp.into_body()).all().await;
    let evs = events(&blocks);

    // THEN the machine is ready first, then each step starts, streams and
    // finishes in order, with indexes 0, 1, 2, then the reply and the result
    let n = names(&evs);
    assert_eq!(evs[0].0, "machine", "{n:?}");
    assert_eq!(evs[0].1["stage"], "ready");
    assert_eq!(evs[0].1["phase"], "running");
    assert!(evs[0].1["elapsed_ms"].is_u64());
    let mut expected_index = 0;
    let mut in_step: Option<u64> = None;
    let mut outputs: Vec<String> = vec![String::new(); 3];
    for (name, data) in &evs[1..evs.len() - 2] {
        match name.as_str() {
            "step_started" => {
                assert!(in_step.is_none(), "nested step: {n:?}");
                assert_eq!(data["index"], expected_index, "{n:?}");
                in_step = Some(expected_index);
            }
            "output" => {
                let i = in_step.expect("output inside a step");
                assert_eq!(data["index"], i);
                outputs[i as usize].push_str(data["chunk"].as_str().unwrap());
            }
            "step_finished" => {
                assert_eq!(data["index"].as_u64(), in_step.take());
                expected_index += 1;
            }
            other => panic!("unexpected event {other} in {n:?}"),
        }
    }
    assert_eq!(expected_index, 3, "three steps: {n:?}");
    assert_eq!(n[n.len() - 2..], ["reply", "done"]);
    assert_eq!(evs[evs.len() - 2].1["text"], "All three ran.");
    let done = &evs[evs.len() - 1].1;

    // … the streamed output is the steps' output, ANSI-stripped
    assert_eq!(outputs[0].trim(), "one");
    assert!(outputs[1].contains("red") && outputs[1].contains("two"));
    assert!(!outputs[1].contains('\u{1b}'), "{:?}", outputs[1]);
    for (i, out) in outputs.iter().enumerate() {
        assert_eq!(
            out.trim(),
            done["steps"][i]["output"].as_str().unwrap().trim()
        );
    }
    let finished: Vec<&Value> = evs
        .iter()
        .filter(|(n, _)| n == "step_finished")
        .map(|(_, d)| d)
        .collect();
    assert_eq!(finished[0]["exit_code"], 0);
    assert_eq!(finished[2]["exit_code"], 1);
    assert_eq!(finished[2]["still_running"], false);

    // … and `done` is the JSON result of the same turn asked for without
    // the stream (modulo turn id and timings)
    llm.push(script());
    let plain = s.turn("alice", "run three things").await;
    assert_eq!(plain.status, 200, "{}", plain.text);
    assert_eq!(comparable(done), comparable(&plain.body));
    assert_eq!(done["status"], "completed");
    assert_eq!(done["steps"].as_array().unwrap().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_five_megabyte_output_is_capped_in_the_stream() {
    // GIVEN a ready user (shell agent: the message is the command)
    let s = Stack::start().await;
    s.ready_user("bob").await;

    // WHEN a command prints 5 MB
    let resp = s
        .stream_turn("bob", "head -c 5000000 /dev/zero | tr '\\0' 'a'")
        .await;
    assert_sse_response(&resp);
    let evs = events(&Reader::new(resp.into_body()).all().await);

    // THEN at most 64 KiB of it is streamed, then one truncation note
    let chunks: Vec<&str> = evs
        .iter()
        .filter(|(n, _)| n == "output")
        .map(|(_, d)| d["chunk"].as_str().unwrap())
        .collect();
    let notes = chunks.iter().filter(|c| **c == TRUNCATED_NOTE).count();
    assert_eq!(notes, 1, "one note");
    assert_eq!(chunks.last(), Some(&TRUNCATED_NOTE));
    let streamed: usize = chunks
        .iter()
        .filter(|c| **c != TRUNCATED_NOTE)
        .map(|c| c.len())
        .sum();
    assert!(
        streamed <= 64 * 1024 && streamed > 32 * 1024,
        "streamed {streamed} bytes"
    );
    let finished = evs.iter().find(|(n, _)| n == "step_finished").unwrap();
    assert_eq!(finished.1["stream_truncated"], true);
    assert_eq!(finished.1["truncated"], true);
    assert_eq!(finished.1["exit_code"], 0);
    // … and the result still reports the whole size
    let done = &evs.last().unwrap().1;
    assert_eq!(evs.last().unwrap().0, "done");
    assert_eq!(done["steps"][0]["output_bytes"], 5_000_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_does_not_break_the_bookkeeping() {
    // GIVEN a ready user
    let s = Stack::start().await;
    let machine_id = s.ready_user("carol").await;
    let before = s.item("carol").await.last_active_at;
    tokio::time::sleep(Duration::from_millis(5)).await;

    // WHEN the client reads until the command starts, then goes away
    let resp = s
        .stream_turn("carol", "sleep 2; echo finished > ~/after-disconnect.txt")
        .await;
    assert_sse_response(&resp);
    let mut reader = Reader::new(resp.into_body());
    loop {
        match reader.next().await.expect("events before the end") {
            Sse::Event(name, _) if name == "step_started" => break,
            _ => {}
        }
    }
    drop(reader);
    let dropped_at = Instant::now();

    // THEN the turn runs to its end: the command finished, the summary is
    // on the machine, the lease is released, the activity recorded
    let home = s.home(&machine_id);
    let give_up = Instant::now() + Duration::from_secs(30);
    loop {
        let item = s.item("carol").await;
        let summary = std::fs::read_to_string(home.join(TURNS_FILE)).unwrap_or_default();
        if item.live_lease(now_ms()).is_none()
            && summary.contains("after-disconnect")
            && item.last_active_at > before
        {
            break;
        }
        assert!(
            Instant::now() < give_up,
            "bookkeeping incomplete: {item:?}\n{summary}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        dropped_at.elapsed() >= Duration::from_millis(500),
        "the turn went on"
    );
    let out = std::fs::read_to_string(home.join("after-disconnect.txt")).unwrap();
    assert_eq!(out.trim(), "finished");
    // … and the next turn runs (no lease left behind)
    let next = s.turn("carol", "echo again").await;
    assert_eq!(next.status, 200, "{}", next.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_command_gets_heartbeats() {
    // GIVEN a stack whose streams keep alive every 200 ms
    let s = Stack::start_with(StackOptions {
        heartbeat: Duration::from_millis(200),
        settings: TurnSettings {
            command_timeout: Duration::from_secs(30),
            ..TurnSettings::default()
        },
        ..StackOptions::default()
    })
    .await;
    s.ready_user("dave").await;

    // WHEN a command is silent for 1.5 s
    let resp = s.stream_turn("dave", "sleep 1.5; echo woke").await;
    assert_sse_response(&resp);
    let blocks = Reader::new(resp.into_body()).all().await;

    // THEN keep-alive comments come while it runs, between its start and end
    let start = blocks
        .iter()
        .position(|b| matches!(b, Sse::Event(n, _) if n == "step_started"))
        .unwrap();
    let end = blocks
        .iter()
        .position(|b| matches!(b, Sse::Event(n, _) if n == "step_finished"))
        .unwrap();
    let beats = blocks[start..end]
        .iter()
        .filter(|b| **b == Sse::Comment("keep-alive".into()))
        .count();
    assert!(beats >= 3, "{beats} heartbeats in {blocks:?}");
    assert!(matches!(blocks.last(), Some(Sse::Event(n, _)) if n == "done"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_streaming_handler_answers_json_without_the_accept_header_and_before_the_turn_starts() {
    let s = Stack::start().await;

    // A first message (no machine yet) asked as a stream: 202 JSON, not a stream
    let resp = s.stream_turn("erin", "echo first").await;
    assert_eq!(resp.status(), 202);
    assert_eq!(
        resp.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/json")
    );
    assert!(resp.headers().get("retry-after").is_some());
    let body: Vec<u8> = resp.into_body().collect::<Vec<_>>().await.concat();
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["status"], "provisioning");
    assert_eq!(s.drain_worker().await, 1);

    // Without `Accept: text/event-stream`, the streaming handler's response
    // is the JSON turn result, in one chunk
    let event = agenthome_tests::events::http(
        "POST",
        "/v1/users/erin/turns",
        Some(r#"{"message":"echo plain"}"#),
        agenthome_tests::stack::jwt("erin"),
    );
    let resp = s.send_streaming(&event).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/json")
    );
    let chunks: Vec<_> = resp.into_body().collect().await;
    assert_eq!(chunks.len(), 1);
    let body: Value = serde_json::from_slice(&chunks[0]).unwrap();
    assert_eq!(body["steps"][0]["output"].as_str().unwrap().trim(), "plain");

    // A problem (invalid body) asked as a stream keeps its status and body
    let mut event = agenthome_tests::events::http(
        "POST",
        "/v1/users/erin/turns",
        Some(r#"{"message":""}"#),
        agenthome_tests::stack::jwt("erin"),
    );
    event["headers"]["accept"] = json!("text/event-stream");
    let resp = s.send_streaming(&event).await;
    assert_eq!(resp.status(), 422);
    assert_eq!(
        resp.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/problem+json")
    );
}

/// A Function URL request (payload 2.0) signed with SigV4 (AuthType
/// AWS_IAM), in AWS's documented shape.
fn function_url_event(user: &str, signed: bool) -> Value {
    let path = format!("/v1/users/{user}/turns");
    let mut event = json!({
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": path,
        "rawQueryString": "",
        "headers": {"content-type": "application/json", "accept": "text/event-stream",
                    "host": "abcdefg.lambda-url.us-east-1.on.aws"},
        "requestContext": {
            "accountId": "anonymous",
            "apiId": "abcdefg",
            "authentication": null,
            "domainName": "abcdefg.lambda-url.us-east-1.on.aws",
            "domainPrefix": "abcdefg",
            "http": {"method": "POST", "path": path, "protocol": "HTTP/1.1",
                     "sourceIp": "127.0.0.1", "userAgent": "chat-backend"},
            "requestId": uuid::Uuid::now_v7().to_string(),
            "routeKey": "$default",
            "stage": "$default",
            "time": "28/Nov/2026:10:00:00 +0000",
            "timeEpoch": 1795860000000u64
        },
        "body": json!({"message": "echo via url"}).to_string(),
        "pathParameters": null,
        "isBase64Encoded": false,
        "stageVariables": null
    });
    if signed {
        event["requestContext"]["authorizer"] = json!({"iam": {
            "accessKey": "AKIAEXAMPLE", "accountId": "111122223333",
            "callerId": "AIDAEXAMPLE", "cognitoIdentity": null,
            "principalOrgId": null,
            "userArn": "arn:aws:iam::111122223333:role/chat-backend",
            "userId": "AIDAEXAMPLE"
        }});
    }
    event
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_url_request_signed_with_iam_is_authorized_under_auth_mode_iam() {
    let s = Stack::start_with(StackOptions {
        auth_mode: agenthome::api::AuthMode::Iam,
        ..StackOptions::default()
    })
    .await;
    let stack = &s;
    let send = |signed| {
        let event = function_url_event("frank", signed);
        async move { stack.send_streaming(&event).await }
    };
    // Unsigned (no IAM identity): 401
    assert_eq!(send(false).await.status(), 401);
    // Signed: the IAM identity of the Function URL authorizer is read
    let first = send(true).await;
    assert_eq!(first.status(), 202, "provisioning starts");
    assert_eq!(s.drain_worker().await, 1);
    let resp = send(true).await;
    assert_sse_response(&resp);
    let evs = events(&Reader::new(resp.into_body()).all().await);
    let done = &evs.last().unwrap().1;
    assert_eq!(
        done["steps"][0]["output"].as_str().unwrap().trim(),
        "via url"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminal_output_streams_as_it_arrives() {
    let s = Stack::start().await;
    s.ready_user("gina").await;
    let resp = s
        .stream_turn("gina", "echo early; sleep 1.5; echo late")
        .await;
    assert_sse_response(&resp);
    let mut reader = Reader::new(resp.into_body());
    // The first output event carries the early line alone, well before the end
    let first = loop {
        match reader.next().await.expect("an output event") {
            Sse::Event(n, d) if n == "output" => break d,
            _ => {}
        }
    };
    let seen = Instant::now();
    let chunk = first["chunk"].as_str().unwrap();
    assert!(
        chunk.contains("early") && !chunk.contains("late"),
        "{chunk:?}"
    );
    let rest = events(&reader.all().await);
    assert!(
        seen.elapsed() >= Duration::from_millis(800),
        "streamed before the end"
    );
    assert!(rest
        .iter()
        .any(|(n, d)| n == "output" && d["chunk"].as_str().unwrap().contains("late")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_model_reply_arrives_as_reply_delta_events_before_reply_and_done() {
    // GIVEN a ready user and a model that streams a tool call, then its
    // answer in pieces
    let (base, _llm) = scripted_llm(vec![
        stream_tool_calls(&[("c1", json!({"command": "echo delta-test"}))], 3),
        stream_text(&["It printed ", "delta-test", "."]),
    ])
    .await;
    let s = Stack::start_with(StackOptions {
        agent: llm_agent(&base),
        ..StackOptions::default()
    })
    .await;
    s.ready_user("dora").await;

    // WHEN the turn is streamed (every event is checked against openapi.yaml)
    let resp = s.stream_turn("dora", "print it").await;
    assert_sse_response(&resp);
    let blocks = Reader::new(resp.into_body()).all().await;
    let evs = events(&blocks);

    // THEN the step runs, then the reply's pieces arrive as reply_delta
    // events, in order, then reply and done with the whole text
    let n = names(&evs);
    assert_eq!(
        n,
        [
            "machine",
            "step_started",
            "output",
            "step_finished",
            "reply_delta",
            "reply_delta",
            "reply_delta",
            "reply",
            "done"
        ]
    );
    let deltas: Vec<&str> = evs
        .iter()
        .filter(|(n, _)| n == "reply_delta")
        .map(|(_, d)| d["text"].as_str().unwrap())
        .collect();
    assert_eq!(deltas, ["It printed ", "delta-test", "."]);
    assert_eq!(evs[7].1["text"], "It printed delta-test.");
    assert_eq!(evs[8].1["reply"], "It printed delta-test.");
    assert_eq!(evs[8].1["steps"][0]["output"], "delta-test\n");
}

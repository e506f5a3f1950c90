//! A scripted OpenAI-compatible server (axum, on loopback): it replays a
//! script of `(status, body)` responses to `POST /v1/chat/completions` and
//! records every request, so tests can assert what the model was sent.
//!
//! A scripted [`Reply::Stream`] answers in the OpenAI streaming wire format
//! (`text/event-stream`, one `data: {chunk}` per chunk, `data: [DONE]`), a
//! short pause between chunks so they arrive apart; [`stream_text`],
//! [`stream_tool_calls`] and [`stream_chunk`] build such scripts.

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// One scripted answer.
#[derive(Debug, Clone)]
pub enum Reply {
    /// A JSON body with a status.
    Json(u16, Value),
    /// A 200 event stream of these chunks, then `data: [DONE]`.
    Stream(Vec<Value>),
    /// A 200 event stream of these chunks that then stops without `[DONE]`.
    BrokenStream(Vec<Value>),
}

impl From<(u16, Value)> for Reply {
    fn from((status, body): (u16, Value)) -> Self {
        Reply::Json(status, body)
    }
}

/// (Authorization header, body) of one request.
pub type Recorded = (Option<String>, Value);

/// The script and the recorded requests of one server.
#[derive(Clone, Default)]
pub struct Script {
    replies: Arc<Mutex<VecDeque<Reply>>>,
    requests: Arc<Mutex<Vec<Recorded>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Script {
    /// Every request so far.
    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.requests).clone()
    }

    /// The `messages` of request `i`.
    pub fn messages(&self, i: usize) -> Vec<Value> {
        self.requests()
            .get(i)
            .and_then(|r| r.1["messages"].as_array().cloned())
            .unwrap_or_default()
    }

    /// Append replies to the script.
    pub fn push<R: Into<Reply>>(&self, replies: impl IntoIterator<Item = R>) {
        lock(&self.replies).extend(replies.into_iter().map(Into::into));
    }
}

async fn completions(
    State(script): State<Script>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    lock(&script.requests).push((auth, body));
    let next = lock(&script.replies).pop_front();
    match next.unwrap_or(Reply::Json(
        500,
        json!({"error": {"message": "script exhausted"}}),
    )) {
        Reply::Json(status, body) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            (status, Json(body)).into_response()
        }
        Reply::Stream(chunks) => sse(chunks, true),
        Reply::BrokenStream(chunks) => sse(chunks, false),
    }
}

/// An event-stream response sending each chunk 20 ms apart.
fn sse(chunks: Vec<Value>, done: bool) -> Response {
    let mut frames: Vec<String> = chunks.iter().map(|c| format!("data: {c}\n\n")).collect();
    if done {
        frames.push("data: [DONE]\n\n".to_owned());
    }
    let body = futures_util::stream::unfold(frames.into_iter(), |mut frames| async move {
        let frame = frames.next()?;
        tokio::time::sleep(Duration::from_millis(20)).await;
        Some((Ok::<_, Infallible>(frame), frames))
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// One streamed chunk carrying `delta`.
pub fn stream_chunk(delta: Value, finish_reason: Option<&str>) -> Value {
    json!({
        "id": "chatcmpl-s", "object": "chat.completion.chunk", "model": "test-model",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
    })
}

/// A streamed final answer: `pieces` as successive content deltas, then the
/// usage chunk.
pub fn stream_text(pieces: &[&str]) -> Reply {
    let mut chunks = vec![stream_chunk(
        json!({"role": "assistant", "content": ""}),
        None,
    )];
    chunks.extend(
        pieces
            .iter()
            .map(|p| stream_chunk(json!({"content": p}), None)),
    );
    chunks.push(stream_chunk(json!({}), Some("stop")));
    chunks.push(json!({"id": "chatcmpl-s", "object": "chat.completion.chunk", "choices": [], "usage": usage()}));
    Reply::Stream(chunks)
}

/// Streamed tool calls: each `(id, arguments)` is a `run_command` call whose
/// arguments arrive in `split` pieces; the calls' fragments interleave
/// (parallel calls), each fragment carrying its call's `index`.
pub fn stream_tool_calls(calls: &[(&str, Value)], split: usize) -> Reply {
    let mut chunks = vec![stream_chunk(
        json!({"role": "assistant", "content": null}),
        None,
    )];
    let pieces: Vec<Vec<String>> = calls
        .iter()
        .map(|(_, args)| {
            let text: Vec<char> = args.to_string().chars().collect();
            let size = text.len().div_ceil(split.max(1)).max(1);
            text.chunks(size).map(|c| c.iter().collect()).collect()
        })
        .collect();
    for (i, (id, _)) in calls.iter().enumerate() {
        chunks.push(stream_chunk(
            json!({"tool_calls": [{"index": i, "id": id, "type": "function",
                "function": {"name": "run_command", "arguments": ""}}]}),
            None,
        ));
    }
    let longest = pieces.iter().map(Vec::len).max().unwrap_or(0);
    for round in 0..longest {
        for (i, p) in pieces.iter().enumerate() {
            if let Some(piece) = p.get(round) {
                chunks.push(stream_chunk(
                    json!({"tool_calls": [{"index": i, "function": {"arguments": piece}}]}),
                    None,
                ));
            }
        }
    }
    chunks.push(stream_chunk(json!({}), Some("tool_calls")));
    chunks.push(json!({"id": "chatcmpl-s", "object": "chat.completion.chunk", "choices": [], "usage": usage()}));
    Reply::Stream(chunks)
}

/// Starts a server; returns its base URL (`…/v1`) and the script.
pub async fn scripted_llm<R: Into<Reply>>(replies: Vec<R>) -> (String, Script) {
    scripted_llm_on("127.0.0.1:0", replies).await
}

/// Starts a server on `addr` (a loopback `host:port`); returns its base URL
/// (`…/v1`) and the script.
pub async fn scripted_llm_on<R: Into<Reply>>(addr: &str, replies: Vec<R>) -> (String, Script) {
    let script = Script::default();
    script.push(replies);
    let app = Router::new()
        .route("/v1/chat/completions", post(completions))
        .with_state(script.clone());
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .expect("bind the scripted LLM server");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}/v1"), script)
}

/// Token usage of every scripted completion.
pub fn usage() -> Value {
    json!({"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110})
}

/// A response asking to run `run_command` with `arguments` given as raw JSON
/// text (so tests can send malformed arguments).
pub fn tool_call_raw(id: &str, arguments: &str) -> (u16, Value) {
    (
        200,
        json!({
            "id": "chatcmpl-1", "object": "chat.completion", "model": "test-model",
            "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                "role": "assistant", "content": null,
                "tool_calls": [{"id": id, "type": "function",
                    "function": {"name": "run_command", "arguments": arguments}}]
            }}],
            "usage": usage()
        }),
    )
}

/// A response asking to run `run_command` with `args`.
pub fn tool_call(id: &str, args: Value) -> (u16, Value) {
    tool_call_raw(id, &args.to_string())
}

/// A final answer.
pub fn answer(text: &str) -> (u16, Value) {
    (
        200,
        json!({
            "id": "chatcmpl-2", "object": "chat.completion",
            "choices": [{"index": 0, "finish_reason": "stop",
                "message": {"role": "assistant", "content": text}}],
            "usage": usage()
        }),
    )
}

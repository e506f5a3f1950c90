//! A scripted OpenAI-compatible server (axum, on loopback): it replays a
//! script of `(status, body)` responses to `POST /v1/chat/completions` and
//! records every request, so tests can assert what the model was sent.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

/// (Authorization header, body) of one request.
pub type Recorded = (Option<String>, Value);

/// The script and the recorded requests of one server.
#[derive(Clone, Default)]
pub struct Script {
    replies: Arc<Mutex<VecDeque<(u16, Value)>>>,
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
    pub fn push(&self, replies: impl IntoIterator<Item = (u16, Value)>) {
        lock(&self.replies).extend(replies);
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
    let (status, body) = next.unwrap_or((500, json!({"error": {"message": "script exhausted"}})));
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(body)).into_response()
}

/// Starts a server; returns its base URL (`…/v1`) and the script.
pub async fn scripted_llm(replies: Vec<(u16, Value)>) -> (String, Script) {
    let script = Script::default();
    script.push(replies);
    let app = Router::new()
        .route("/v1/chat/completions", post(completions))
        .with_state(script.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
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

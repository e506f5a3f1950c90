//! A minimal OpenAI-compatible chat-completions client with tool calling.
//!
//! `POST {base}/chat/completions` with `model`, `messages`, `tools` and
//! `tool_choice: "auto"`; bearer auth with the LLM key (never logged, never
//! part of an error). One `reqwest::Client` (rustls) per [`LlmClient`].
//! 429, 5xx, timeouts and connection failures are retried with capped,
//! jittered backoff (the server's `retry-after` preferred) as long as the
//! wait fits before the caller's deadline; every request is bounded by the
//! deadline, so a call never hangs.
//!
//! [`LlmClient::complete_streamed`] asks for a streamed answer
//! (`"stream": true`) and hands each text delta to the caller as it arrives;
//! a server that answers with plain JSON, or rejects the streaming request,
//! gets the non-streaming call (remembered for the client's lifetime).

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderValue, AUTHORIZATION, RETRY_AFTER};
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::time::Instant;
use url::Url;

use super::stream::{SseLines, StreamAccumulator};
use crate::config::Secret;

/// The one tool the model gets.
pub const RUN_COMMAND: &str = "run_command";

/// Longest server-provided retry wait honoured.
const MAX_RETRY_WAIT: Duration = Duration::from_secs(20);
/// The longest `retry-after` believed (a larger or absurd value is cut to it).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// Longest error-body excerpt kept in an error message.
const MAX_ERROR_EXCERPT: usize = 300;
/// The default cap of one response body ([`LlmConfig::max_response_bytes`]).
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 2 * 1024 * 1024;

/// Failures of the LLM client. Display and Debug never contain the key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LlmError {
    /// 401/403: the key is missing, wrong or lacks access.
    #[error("the LLM endpoint refused the credentials (HTTP {status}); check LLM_API_KEY")]
    Auth {
        /// 401 or 403.
        status: u16,
    },
    /// 429 (after retries within the deadline).
    #[error("the LLM endpoint is rate limiting requests (HTTP 429{})", .retry_after.map(|d| format!(", retry after {} ms", d.as_millis())).unwrap_or_default())]
    RateLimited {
        /// The server's retry hint.
        retry_after: Option<Duration>,
    },
    /// 5xx (after retries within the deadline).
    #[error("the LLM endpoint failed (HTTP {status})")]
    Server {
        /// The status.
        status: u16,
    },
    /// Another 4xx: the request was rejected (unknown model, bad request).
    #[error("the LLM endpoint rejected the request (HTTP {status}): {message}")]
    Rejected {
        /// The status.
        status: u16,
        /// A bounded excerpt of the error body (the key redacted).
        message: String,
    },
    /// No answer within the request timeout or the turn's deadline.
    #[error("the LLM request timed out")]
    Timeout,
    /// The request could not be sent or the answer not read.
    #[error("the LLM request failed")]
    Transport {
        /// The underlying error.
        #[source]
        source: reqwest::Error,
    },
    /// The response body exceeded [`LlmConfig::max_response_bytes`]; it was
    /// not read further.
    #[error("the LLM response exceeded {limit} bytes")]
    ResponseTooLarge {
        /// The cap.
        limit: usize,
    },
    /// A 2xx answer that is not a chat completion.
    #[error("malformed LLM response: {0}")]
    MalformedResponse(String),
    /// The model kept sending tool calls that cannot be run.
    #[error("the model sent an unusable tool call again: {0}")]
    MalformedToolCall(String),
    /// A streamed answer broke off after part of it was delivered (not
    /// retried: the text already shown would repeat).
    #[error("the LLM stream broke off: {source}")]
    Interrupted {
        /// What broke it.
        #[source]
        source: Box<LlmError>,
    },
    /// Too little time is left before the deadline for a call.
    #[error("no time left for an LLM call before the turn's deadline")]
    NoTime,
    /// The client cannot be built from its configuration.
    #[error("invalid LLM configuration: {0}")]
    Config(String),
}

impl LlmError {
    /// Whether another attempt may succeed.
    fn is_retryable(&self) -> bool {
        match self {
            LlmError::RateLimited { .. } | LlmError::Server { .. } | LlmError::Timeout => true,
            LlmError::Transport { source } => {
                source.is_connect() || source.is_timeout() || source.is_request()
            }
            _ => false,
        }
    }
}

/// How to reach the model.
#[derive(Debug, Clone)]
pub struct LlmConfig {
    /// Base URL; `/chat/completions` is appended (e.g. `https://api.dedaluslabs.ai/v1`).
    pub base_url: Url,
    /// Bearer key (none for local servers that need none).
    pub api_key: Option<Secret>,
    /// Model name, e.g. `openai/gpt-4o-mini`.
    pub model: String,
    /// Upper bound of one request (also bounded by the deadline).
    pub request_timeout: Duration,
    /// Attempts per call (429/5xx/timeouts are retried).
    pub max_attempts: u32,
    /// Cap of one response body; a larger body fails the call
    /// ([`LlmError::ResponseTooLarge`]) without being read to its end.
    pub max_response_bytes: usize,
}

impl LlmConfig {
    /// A configuration with a 120 s request timeout and 3 attempts.
    pub fn new(base_url: Url, api_key: Option<Secret>, model: impl Into<String>) -> Self {
        Self {
            base_url,
            api_key,
            model: model.into(),
            request_timeout: Duration::from_secs(120),
            max_attempts: 3,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
        }
    }
}

/// A chat message on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireMessage {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// Text (absent on an assistant message with only tool calls).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// The assistant's tool calls.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// For `tool` messages: the call answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl WireMessage {
    /// A message with text only.
    pub fn text(role: &str, content: impl Into<String>) -> Self {
        Self {
            role: role.to_owned(),
            content: Some(content.into()),
            tool_calls: Vec::new(),
            tool_call_id: None,
        }
    }

    /// A tool result.
    pub fn tool(call_id: &str, content: impl Into<String>) -> Self {
        Self {
            role: "tool".to_owned(),
            content: Some(content.into()),
            tool_calls: Vec::new(),
            tool_call_id: Some(call_id.to_owned()),
        }
    }
}

/// A tool call as the model sent it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    /// Call id (echoed in the tool result).
    #[serde(default)]
    pub id: String,
    /// Always `function`.
    #[serde(rename = "type", default = "function_type")]
    pub kind: String,
    /// The function and its JSON arguments.
    pub function: FunctionCall,
}

fn function_type() -> String {
    "function".to_owned()
}

/// Function name and arguments of a tool call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionCall {
    /// Function name.
    #[serde(default)]
    pub name: String,
    /// Arguments: a JSON document in a string (some servers send an
    /// object; it is kept as its JSON text).
    #[serde(default, deserialize_with = "string_or_json")]
    pub arguments: String,
}

fn string_or_json<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::String(s) => s,
        Value::Null => String::new(),
        other => other.to_string(),
    })
}

/// Arguments of `run_command`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunCommandArgs {
    /// The shell command.
    pub command: String,
    /// Requested timeout in seconds.
    pub timeout_s: Option<u64>,
}

/// Why a tool call cannot be run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ToolCallError {
    /// Not `run_command`.
    #[error("unknown tool {0:?}; the only tool is run_command")]
    UnknownTool(String),
    /// Arguments are not valid JSON of the expected shape.
    #[error("invalid arguments for run_command: {0}")]
    BadArguments(String),
}

/// Parses a `run_command` call.
pub fn parse_tool_call(call: &ToolCall) -> Result<RunCommandArgs, ToolCallError> {
    if call.function.name != RUN_COMMAND {
        return Err(ToolCallError::UnknownTool(call.function.name.clone()));
    }
    let raw = call.function.arguments.trim();
    let value: Value = serde_json::from_str(if raw.is_empty() { "{}" } else { raw })
        .map_err(|e| ToolCallError::BadArguments(format!("not JSON ({e})")))?;
    let Value::Object(obj) = value else {
        return Err(ToolCallError::BadArguments("not a JSON object".into()));
    };
    let command = match obj.get("command") {
        Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
        Some(Value::String(_)) => {
            return Err(ToolCallError::BadArguments("command is empty".into()))
        }
        Some(_) => {
            return Err(ToolCallError::BadArguments(
                "command must be a string".into(),
            ))
        }
        None => return Err(ToolCallError::BadArguments("command is missing".into())),
    };
    let timeout_s = match obj.get("timeout_s") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => match n.as_f64() {
            Some(f) if f.is_finite() && f > 0.0 => Some(f.ceil() as u64),
            _ => {
                return Err(ToolCallError::BadArguments(
                    "timeout_s must be a positive number of seconds".into(),
                ))
            }
        },
        Some(Value::String(s)) => match s.trim().parse::<u64>() {
            Ok(n) if n > 0 => Some(n),
            _ => {
                return Err(ToolCallError::BadArguments(
                    "timeout_s must be a positive integer".into(),
                ))
            }
        },
        Some(_) => {
            return Err(ToolCallError::BadArguments(
                "timeout_s must be an integer".into(),
            ))
        }
    };
    Ok(RunCommandArgs { command, timeout_s })
}

/// The `tools` array of every request.
pub fn tools_json() -> Value {
    json!([{
        "type": "function",
        "function": {
            "name": RUN_COMMAND,
            "description": "Run a shell command in the user's persistent Linux machine (bash, \
                in the same shell session as earlier commands: cd and export persist). \
                Returns JSON with exit_code, output (stdout and stderr, truncated to head \
                and tail when long) and still_running (true when it outlived its timeout \
                and keeps running on the machine).",
            "parameters": {
                "type": "object",
                "properties": {
                    "command": {"type": "string", "description": "The command line to run."},
                    "timeout_s": {
                        "type": "integer",
                        "minimum": 1,
                        "description": "Seconds to wait before leaving the command running in the background."
                    }
                },
                "required": ["command"]
            }
        }
    }])
}

/// Token counts of one completion.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenUsage {
    /// `prompt_tokens`.
    pub prompt_tokens: u64,
    /// `completion_tokens`.
    pub completion_tokens: u64,
}

/// One assistant answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// Text, if any.
    pub content: Option<String>,
    /// Tool calls, if any.
    pub tool_calls: Vec<ToolCall>,
    /// Token counts (zero when the server sent none).
    pub usage: TokenUsage,
}

#[derive(Deserialize)]
struct ResponseBody {
    #[serde(default)]
    choices: Vec<Choice>,
    #[serde(default)]
    usage: Option<UsageBody>,
}

#[derive(Deserialize)]
struct Choice {
    message: ResponseMessage,
}

#[derive(Deserialize)]
struct ResponseMessage {
    #[serde(default)]
    content: Option<Value>,
    #[serde(default)]
    tool_calls: Option<Vec<ToolCall>>,
}

#[derive(Deserialize)]
struct UsageBody {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
}

/// Parses a chat-completions response body.
pub fn parse_completion(body: &[u8]) -> Result<Completion, LlmError> {
    let parsed: ResponseBody = serde_json::from_slice(body)
        .map_err(|e| LlmError::MalformedResponse(format!("not a chat completion ({e})")))?;
    let Some(choice) = parsed.choices.into_iter().next() else {
        return Err(LlmError::MalformedResponse("no choices".into()));
    };
    let content = match choice.message.content {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s),
        // Content parts: keep the text ones.
        Some(Value::Array(parts)) => Some(
            parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join(""),
        ),
        Some(other) => {
            return Err(LlmError::MalformedResponse(format!(
                "message content is a {}",
                json_kind(&other)
            )))
        }
    };
    let usage = parsed
        .usage
        .map(|u| TokenUsage {
            prompt_tokens: u.prompt_tokens.unwrap_or(0),
            completion_tokens: u.completion_tokens.unwrap_or(0),
        })
        .unwrap_or_default();
    Ok(Completion {
        content,
        tool_calls: choice.message.tool_calls.unwrap_or_default(),
        usage,
    })
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// The chat-completions client. Cheap to clone.
#[derive(Clone)]
pub struct LlmClient {
    http: reqwest::Client,
    endpoint: Url,
    auth: Option<HeaderValue>,
    key: Option<Secret>,
    model: String,
    request_timeout: Duration,
    max_attempts: u32,
    max_response_bytes: usize,
    /// Cleared when the server rejects streaming requests.
    streaming: Arc<AtomicBool>,
}

impl std::fmt::Debug for LlmClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlmClient")
            .field("endpoint", &self.endpoint.as_str())
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

impl LlmClient {
    /// Builds the client (one `reqwest::Client`, rustls).
    pub fn new(config: LlmConfig) -> Result<Self, LlmError> {
        let mut endpoint = config.base_url.clone();
        if endpoint.cannot_be_a_base() {
            return Err(LlmError::Config("LLM_BASE_URL cannot be a base URL".into()));
        }
        crate::net::require_secure(&endpoint)
            .map_err(|e| LlmError::Config(format!("LLM_BASE_URL: {e}")))?;
        {
            let mut path = endpoint.path().trim_end_matches('/').to_owned();
            path.push_str("/chat/completions");
            endpoint.set_path(&path);
        }
        let auth = match &config.api_key {
            Some(key) if !key.expose().is_empty() => {
                let mut v =
                    HeaderValue::from_str(&format!("Bearer {}", key.expose())).map_err(|_| {
                        LlmError::Config("LLM_API_KEY is not a valid header value".into())
                    })?;
                v.set_sensitive(true);
                Some(v)
            }
            _ => None,
        };
        let http = crate::net::client_builder(Duration::from_secs(10))
            .build()
            .map_err(|e| LlmError::Config(format!("cannot build the HTTP client: {e}")))?;
        Ok(Self {
            http,
            endpoint,
            auth,
            key: config.api_key.filter(|k| !k.expose().is_empty()),
            model: config.model,
            request_timeout: config.request_timeout,
            max_attempts: config.max_attempts.max(1),
            max_response_bytes: config.max_response_bytes,
            streaming: Arc::new(AtomicBool::new(true)),
        })
    }

    /// The model name sent with every request.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// One chat completion, retried on 429/5xx/timeouts while the deadline
    /// allows.
    pub async fn complete(
        &self,
        messages: &[WireMessage],
        deadline: Instant,
    ) -> Result<Completion, LlmError> {
        let body = self.request_body(messages, false);
        self.retrying(deadline, |timeout| self.attempt(&body, timeout))
            .await
    }

    /// One chat completion, streamed when the server supports it: `on_text`
    /// gets each piece of the answer's text as it is generated (the
    /// completion still carries the whole text). Retried like
    /// [`LlmClient::complete`] until the first piece was delivered.
    pub async fn complete_streamed(
        &self,
        messages: &[WireMessage],
        deadline: Instant,
        on_text: &(dyn Fn(&str) + Sync),
    ) -> Result<Completion, LlmError> {
        if !self.streaming.load(Ordering::Relaxed) {
            return self.complete(messages, deadline).await;
        }
        let body = self.request_body(messages, true);
        let result = self
            .retrying(deadline, |timeout| {
                self.attempt_streamed(&body, timeout, on_text)
            })
            .await;
        match result {
            Err(LlmError::Rejected { status, message }) if status == 400 || status == 422 => {
                tracing::info!(status, %message, "the LLM endpoint rejected a streaming request; not streaming");
                self.streaming.store(false, Ordering::Relaxed);
                self.complete(messages, deadline).await
            }
            other => other,
        }
    }

    fn request_body(&self, messages: &[WireMessage], stream: bool) -> Value {
        let mut body = json!({
            "model": self.model,
            "messages": messages,
            "tools": tools_json(),
            "tool_choice": "auto",
        });
        if stream {
            body["stream"] = json!(true);
            body["stream_options"] = json!({"include_usage": true});
        }
        body
    }

    /// Runs `attempt` (given its timeout), retrying on 429/5xx/timeouts
    /// while the deadline allows.
    async fn retrying<F, Fut>(
        &self,
        deadline: Instant,
        mut attempt_once: F,
    ) -> Result<Completion, LlmError>
    where
        F: FnMut(Duration) -> Fut,
        Fut: Future<Output = Result<Completion, LlmError>>,
    {
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining < Duration::from_millis(100) {
                return Err(LlmError::NoTime);
            }
            let err = match attempt_once(remaining.min(self.request_timeout)).await {
                Ok(c) => return Ok(c),
                Err(e) => e,
            };
            if !err.is_retryable() || attempt >= self.max_attempts {
                return Err(err);
            }
            let wait = match &err {
                LlmError::RateLimited {
                    retry_after: Some(d),
                } => (*d).min(MAX_RETRY_WAIT),
                _ => backoff(attempt),
            };
            // Retry only if the wait and a useful call still fit.
            if Instant::now() + wait + Duration::from_secs(1) >= deadline {
                return Err(err);
            }
            tracing::info!(attempt, wait_ms = wait.as_millis() as u64, error = %err, "retrying LLM call");
            tokio::time::sleep(wait).await;
        }
    }

    async fn attempt(&self, body: &Value, timeout: Duration) -> Result<Completion, LlmError> {
        let resp = self.send(body, timeout).await?;
        let status = resp.status();
        let retry_after = retry_after(resp.headers());
        let bytes = self.read_capped(resp).await?;
        self.answer(status, retry_after, &bytes)
    }

    async fn send(&self, body: &Value, timeout: Duration) -> Result<reqwest::Response, LlmError> {
        let mut req = self
            .http
            .post(self.endpoint.clone())
            .timeout(timeout)
            .json(body);
        if let Some(auth) = &self.auth {
            req = req.header(AUTHORIZATION, auth.clone());
        }
        req.send().await.map_err(|e| self.transport(e))
    }

    /// A streaming request: an SSE answer is read chunk by chunk, any other
    /// answer as [`LlmClient::attempt`] reads it.
    async fn attempt_streamed(
        &self,
        body: &Value,
        timeout: Duration,
        on_text: &(dyn Fn(&str) + Sync),
    ) -> Result<Completion, LlmError> {
        let mut resp = self.send(body, timeout).await?;
        let status = resp.status();
        let is_sse = resp
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim_start().starts_with("text/event-stream"));
        if !(status.is_success() && is_sse) {
            let retry_after = retry_after(resp.headers());
            let bytes = self.read_capped(resp).await?;
            return self.answer(status, retry_after, &bytes);
        }
        let mut lines = SseLines::default();
        let mut acc = StreamAccumulator::default();
        let mut delivered = false;
        let broke_off = |e: LlmError, delivered: bool| {
            if delivered {
                LlmError::Interrupted {
                    source: Box::new(e),
                }
            } else {
                e
            }
        };
        loop {
            let chunk = match resp.chunk().await {
                Ok(Some(chunk)) => chunk,
                Ok(None) => return acc.finish(false).map_err(|e| broke_off(e, delivered)),
                Err(e) => return Err(broke_off(self.transport(e), delivered)),
            };
            for data in lines.push(&chunk).map_err(|e| broke_off(e, delivered))? {
                if data.trim() == "[DONE]" {
                    return acc.finish(true);
                }
                if let Some(text) = acc.feed(&data).map_err(|e| broke_off(e, delivered))? {
                    delivered = true;
                    on_text(&text);
                }
            }
        }
    }

    /// The completion of a non-streamed answer, or the error its status means.
    fn answer(
        &self,
        status: reqwest::StatusCode,
        retry_after: Option<Duration>,
        bytes: &[u8],
    ) -> Result<Completion, LlmError> {
        match status.as_u16() {
            200..=299 => parse_completion(bytes),
            401 | 403 => Err(LlmError::Auth {
                status: status.as_u16(),
            }),
            429 => Err(LlmError::RateLimited { retry_after }),
            500..=599 => Err(LlmError::Server {
                status: status.as_u16(),
            }),
            s => Err(LlmError::Rejected {
                status: s,
                message: self.excerpt(bytes),
            }),
        }
    }

    /// The body, refused once it passes the cap.
    async fn read_capped(&self, resp: reqwest::Response) -> Result<Vec<u8>, LlmError> {
        crate::net::read_capped(resp, self.max_response_bytes)
            .await
            .map_err(|e| match e {
                crate::net::ReadError::TooLarge { limit } => LlmError::ResponseTooLarge { limit },
                crate::net::ReadError::Transport(e) => self.transport(e),
            })
    }

    fn transport(&self, e: reqwest::Error) -> LlmError {
        if e.is_timeout() {
            LlmError::Timeout
        } else {
            LlmError::Transport {
                source: e.without_url(),
            }
        }
    }

    /// A bounded excerpt of an error body with the key redacted.
    fn excerpt(&self, body: &[u8]) -> String {
        let text = String::from_utf8_lossy(body);
        let text = match serde_json::from_str::<Value>(&text) {
            Ok(v) => v
                .pointer("/error/message")
                .or_else(|| v.get("message"))
                .or_else(|| v.get("detail"))
                .and_then(Value::as_str)
                .map(str::to_owned)
                .unwrap_or_else(|| text.trim().to_owned()),
            Err(_) => text.trim().to_owned(),
        };
        let mut text = match &self.key {
            Some(key) => text.replace(key.expose(), "***"),
            None => text,
        };
        if text.len() > MAX_ERROR_EXCERPT {
            text.truncate(crate::text::floor_boundary(&text, MAX_ERROR_EXCERPT));
            text.push('…');
        }
        text
    }
}

fn backoff(attempt: u32) -> Duration {
    let base = 500u64.saturating_mul(1 << attempt.saturating_sub(1).min(4));
    let capped = base.min(8_000);
    let jitter = rand::rng().random_range(0..=capped / 2);
    Duration::from_millis(capped / 2 + jitter)
}

fn retry_after(headers: &http::HeaderMap) -> Option<Duration> {
    if let Some(ms) = headers
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
    {
        if let Some(d) = seconds(ms / 1000.0) {
            return Some(d);
        }
    }
    headers
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .and_then(seconds)
}

/// A server-given number of seconds as a duration, cut to
/// [`MAX_RETRY_AFTER`]; `None` for a negative or non-finite value. Never
/// panics, whatever the network sent.
fn seconds(s: f64) -> Option<Duration> {
    if !s.is_finite() || s < 0.0 {
        return None;
    }
    Some(
        Duration::try_from_secs_f64(s)
            .unwrap_or(MAX_RETRY_AFTER)
            .min(MAX_RETRY_AFTER),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(name: &str, args: &str) -> ToolCall {
        ToolCall {
            id: "c1".into(),
            kind: "function".into(),
            function: FunctionCall {
                name: name.into(),
                arguments: args.into(),
            },
        }
    }

    #[test]
    fn valid_tool_calls() {
        assert_eq!(
            parse_tool_call(&call("run_command", r#"{"command":"ls -la"}"#)),
            Ok(RunCommandArgs {
                command: "ls -la".into(),
                timeout_s: None
            })
        );
        assert_eq!(
            parse_tool_call(&call(
                "run_command",
                r#"{"command":"sleep 1","timeout_s":30}"#
            ))
            .map(|a| a.timeout_s),
            Ok(Some(30))
        );
        assert_eq!(
            parse_tool_call(&call("run_command", r#"{"command":"x","timeout_s":2.5}"#))
                .map(|a| a.timeout_s),
            Ok(Some(3))
        );
        assert_eq!(
            parse_tool_call(&call("run_command", r#"{"command":"x","timeout_s":"7"}"#))
                .map(|a| a.timeout_s),
            Ok(Some(7))
        );
    }

    #[test]
    fn malformed_tool_calls() {
        for args in [
            "{not json",
            "[]",
            "",
            r#"{"command": 5}"#,
            r#"{"command": "  "}"#,
            r#"{"cmd": "ls"}"#,
            r#"{"command": "ls", "timeout_s": -1}"#,
            r#"{"command": "ls", "timeout_s": true}"#,
        ] {
            let err = parse_tool_call(&call("run_command", args)).expect_err(args);
            assert!(
                matches!(err, ToolCallError::BadArguments(_)),
                "{args}: {err:?}"
            );
        }
    }

    #[test]
    fn unknown_tool() {
        let err = parse_tool_call(&call("rm_rf", "{}")).expect_err("unknown");
        assert_eq!(err, ToolCallError::UnknownTool("rm_rf".into()));
        assert!(err.to_string().contains("run_command"));
    }

    #[test]
    fn completion_parsing() {
        let body = json!({
            "id": "x", "object": "chat.completion",
            "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                "role": "assistant", "content": null,
                "tool_calls": [{"id": "call_1", "type": "function",
                    "function": {"name": "run_command", "arguments": "{\"command\":\"pwd\"}"}}]
            }}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
        });
        let c = parse_completion(body.to_string().as_bytes()).expect("parse");
        assert_eq!(c.content, None);
        assert_eq!(c.tool_calls.len(), 1);
        assert_eq!(c.tool_calls[0].id, "call_1");
        assert_eq!(
            c.usage,
            TokenUsage {
                prompt_tokens: 12,
                completion_tokens: 3
            }
        );
        // Arguments as an object (Ollama) and content parts.
        let body = json!({"choices": [{"message": {
            "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            "tool_calls": [{"id": "c", "function": {"name": "run_command", "arguments": {"command": "ls"}}}]
        }}]});
        let c = parse_completion(body.to_string().as_bytes()).expect("parse");
        assert_eq!(c.content.as_deref(), Some("ab"));
        assert_eq!(
            parse_tool_call(&c.tool_calls[0]).map(|a| a.command),
            Ok("ls".to_owned())
        );
        assert!(matches!(
            parse_completion(b"{\"choices\": []}"),
            Err(LlmError::MalformedResponse(_))
        ));
        assert!(matches!(
            parse_completion(b"<html>"),
            Err(LlmError::MalformedResponse(_))
        ));
    }

    #[test]
    fn secrets_stay_out_of_debug_and_excerpts() {
        let key = "sk-very-secret-123";
        let client = LlmClient::new(LlmConfig::new(
            Url::parse("http://127.0.0.1:9/v1").expect("url"),
            Some(Secret::new(key)),
            "m",
        ))
        .expect("client");
        assert!(!format!("{client:?}").contains(key));
        assert_eq!(
            client.endpoint.as_str(),
            "http://127.0.0.1:9/v1/chat/completions"
        );
        let body = format!(r#"{{"error": {{"message": "Incorrect API key provided: {key}"}}}}"#);
        let excerpt = client.excerpt(body.as_bytes());
        assert!(!excerpt.contains(key), "{excerpt}");
        assert!(excerpt.contains("***"));
    }

    #[test]
    fn retry_after_headers() {
        let mut h = http::HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_static("2"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        h.insert("retry-after-ms", HeaderValue::from_static("150"));
        assert_eq!(retry_after(&h), Some(Duration::from_millis(150)));
    }

    #[test]
    fn absurd_retry_after_values_never_panic() {
        for value in ["1e30", "1e300", "18446744073709551616", "1e19"] {
            let mut h = http::HeaderMap::new();
            h.insert(RETRY_AFTER, HeaderValue::from_str(value).expect("header"));
            let got = retry_after(&h);
            assert!(
                got.is_some_and(|d| d <= MAX_RETRY_AFTER),
                "{value}: {got:?}"
            );
        }
        let mut h = http::HeaderMap::new();
        h.insert("retry-after-ms", HeaderValue::from_static("1e300"));
        assert!(retry_after(&h).is_some_and(|d| d <= MAX_RETRY_AFTER));
    }
}

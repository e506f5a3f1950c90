//! Errors of the Dedalus client: API errors (both body shapes), transport,
//! WebSocket, decoding and deadlines.

use std::time::Duration;

use http::{HeaderMap, StatusCode};
use serde_json::{Map, Value};

use super::retry;
use super::types::{Machine, Phase};

/// Result alias of the Dedalus client.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Error codes the API documents (`error_code` of the DCS error body).
pub mod codes {
    /// 401: no key.
    pub const AUTH_REQUIRED: &str = "AUTH_REQUIRED";
    /// 401: wrong key.
    pub const AUTH_INVALID: &str = "AUTH_INVALID";
    /// 403: the key lacks a scope.
    pub const AUTH_SCOPE_FORBIDDEN: &str = "AUTH_SCOPE_FORBIDDEN";
    /// 403: organisation mismatch.
    pub const AUTH_ORG_MISMATCH: &str = "AUTH_ORG_MISMATCH";
    /// 409: stale `If-Match` (retryable).
    pub const REVISION_MISMATCH: &str = "REVISION_MISMATCH";
    /// 409: invalid lifecycle transition (retryable only when the body says so).
    pub const INVALID_STATE: &str = "INVALID_STATE";
    /// 409: sleep refused within the hold window after a wake.
    pub const SLEEP_HOLD_WINDOW_ACTIVE: &str = "SLEEP_HOLD_WINDOW_ACTIVE";
    /// 409: same idempotency key, different request (never retryable).
    pub const IDEMPOTENCY_KEY_REUSED: &str = "IDEMPOTENCY_KEY_REUSED";
    /// 429: rate limited, or the same idempotency key is still in flight.
    pub const RATE_LIMITED: &str = "RATE_LIMITED";
    /// 503: a dependency of the control plane is unavailable.
    pub const DEPENDENCY_UNAVAILABLE: &str = "DEPENDENCY_UNAVAILABLE";
}

/// Problem details (`application/problem+json`, RFC 9457) fields.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Problem {
    /// `type` URI.
    pub r#type: Option<String>,
    /// `title`.
    pub title: Option<String>,
    /// `detail`.
    pub detail: Option<String>,
    /// `instance`.
    pub instance: Option<String>,
}

/// An error answer of the API (any non-2xx status).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{operation}: HTTP {status}{}: {message}", code.as_deref().map(|c| format!(" {c}")).unwrap_or_default())]
pub struct ApiError {
    /// Which client operation got it, e.g. `machines.sleep`.
    pub operation: &'static str,
    /// HTTP status.
    pub status: StatusCode,
    /// DCS `error_code` (or a problem's `code` extension).
    pub code: Option<String>,
    /// Human-readable message (`message`, or the problem's `detail`/`title`).
    pub message: String,
    /// The body's `retryable`, when present.
    pub retryable: Option<bool>,
    /// The server's retry hint: `retry-after-ms` header, else the body's
    /// `retry_after_ms`, else the `Retry-After` header.
    pub retry_after: Option<Duration>,
    /// The body's `details` object (empty when absent).
    pub details: Map<String, Value>,
    /// Problem-details fields when the body was `problem+json`.
    pub problem: Option<Problem>,
}

const MAX_RAW_MESSAGE: usize = 512;

impl ApiError {
    /// Builds an API error from a response's status, headers and body. Parses
    /// the DCS shape `{error_code, message, retryable, retry_after_ms?,
    /// details?}` and problem+json `{type, title, status, detail}`; anything
    /// else keeps a bounded excerpt of the body as the message.
    pub fn from_response(
        operation: &'static str,
        status: StatusCode,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Self {
        let mut err = ApiError {
            operation,
            status,
            code: None,
            message: String::new(),
            retryable: None,
            retry_after: None,
            details: Map::new(),
            problem: None,
        };
        let mut body_retry_ms = None;
        match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(obj)) => {
                // Some gateways wrap the error: {"error": {...}}.
                let obj = match obj.get("error") {
                    Some(Value::Object(inner)) if !obj.contains_key("error_code") => inner.clone(),
                    _ => obj,
                };
                err.fill_from_object(&obj, &mut body_retry_ms);
            }
            _ => {
                let text = String::from_utf8_lossy(body);
                let text = text.trim();
                err.message = crate::text::cut(text, MAX_RAW_MESSAGE);
            }
        }
        if err.message.is_empty() {
            err.message = status.canonical_reason().unwrap_or("error").to_owned();
        }
        err.retry_after = retry::server_hint(headers, body_retry_ms);
        err
    }

    fn fill_from_object(&mut self, obj: &Map<String, Value>, body_retry_ms: &mut Option<f64>) {
        let str_field = |k: &str| obj.get(k).and_then(Value::as_str).map(str::to_owned);
        self.code = str_field("error_code").or_else(|| str_field("code"));
        self.retryable = obj.get("retryable").and_then(Value::as_bool);
        *body_retry_ms = obj.get("retry_after_ms").and_then(Value::as_f64);
        match obj.get("details") {
            Some(Value::Object(d)) => self.details = d.clone(),
            Some(Value::Null) | None => {}
            Some(other) => {
                self.details.insert("details".to_owned(), other.clone());
            }
        }
        let is_problem = ["type", "title", "detail", "instance"]
            .iter()
            .any(|k| obj.contains_key(*k));
        if is_problem {
            let problem = Problem {
                r#type: str_field("type"),
                title: str_field("title"),
                detail: str_field("detail"),
                instance: str_field("instance"),
            };
            if self.message.is_empty() {
                self.message = problem
                    .detail
                    .clone()
                    .or_else(|| problem.title.clone())
                    .unwrap_or_default();
            }
            self.problem = Some(problem);
        }
        if let Some(m) = str_field("message").or_else(|| str_field("error_message")) {
            self.message = m;
        }
    }

    /// True for 404 (or a `NOT_FOUND` code).
    pub fn is_not_found(&self) -> bool {
        self.status == StatusCode::NOT_FOUND || self.code.as_deref() == Some("NOT_FOUND")
    }
}

/// Every failure of the Dedalus client.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The API answered with an error status.
    #[error(transparent)]
    Api(Box<ApiError>),
    /// The HTTP request failed below the API (connect, timeout, reset, TLS).
    #[error("{operation}: HTTP transport error")]
    Transport {
        /// Client operation.
        operation: &'static str,
        /// The underlying error.
        #[source]
        source: reqwest::Error,
    },
    /// The WebSocket failed (handshake or session).
    #[error("{operation}: WebSocket error")]
    WebSocket {
        /// Client operation.
        operation: &'static str,
        /// The underlying error.
        #[source]
        source: Box<tokio_tungstenite::tungstenite::Error>,
    },
    /// A 2xx response or a frame did not decode (or a request body did not
    /// encode).
    #[error("{operation}: could not decode the response")]
    Decode {
        /// Client operation.
        operation: &'static str,
        /// The underlying error.
        #[source]
        source: serde_json::Error,
    },
    /// A terminal frame broke the protocol (e.g. invalid base64).
    #[error("{operation}: terminal protocol error: {message}")]
    Protocol {
        /// Client operation.
        operation: &'static str,
        /// What was wrong.
        message: String,
        /// The underlying error, if any.
        #[source]
        source: Option<base64::DecodeError>,
    },
    /// The logical call's deadline passed.
    #[error("{operation}: deadline exceeded after {attempts} attempt(s)")]
    DeadlineExceeded {
        /// Client operation.
        operation: &'static str,
        /// Attempts made.
        attempts: u32,
        /// The last failure before the deadline, if any.
        #[source]
        last_error: Option<Box<Error>>,
    },
    /// While waiting for a phase, the machine settled where the target can
    /// no longer be reached (e.g. `failed`, `destroyed`).
    #[error("{operation}: machine {} is {} while waiting for {wanted}", machine.machine_id, machine.phase)]
    UnexpectedPhase {
        /// Client operation.
        operation: &'static str,
        /// The phase waited for.
        wanted: Phase,
        /// The machine as last seen.
        machine: Box<Machine>,
    },
    /// The configuration cannot be used (bad base URL, key not a header value).
    #[error("invalid Dedalus client configuration: {0}")]
    Config(String),
}

impl From<ApiError> for Error {
    fn from(value: ApiError) -> Self {
        Error::Api(Box::new(value))
    }
}

impl Error {
    /// The API error, if this is one.
    pub fn api(&self) -> Option<&ApiError> {
        match self {
            Error::Api(e) => Some(e),
            _ => None,
        }
    }

    /// Whether the operation may succeed if tried again later: what the retry
    /// policy retries, plus an exhausted deadline.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::DeadlineExceeded { .. }) || retry::classify(self).is_retry()
    }

    /// The DCS `error_code` of an API error.
    pub fn code(&self) -> Option<&str> {
        self.api().and_then(|e| e.code.as_deref())
    }

    /// The HTTP status of an API error.
    pub fn status(&self) -> Option<StatusCode> {
        self.api().map(|e| e.status)
    }

    /// True for a 404 (machine, execution or terminal gone or never there).
    pub fn is_not_found(&self) -> bool {
        self.api().is_some_and(ApiError::is_not_found)
    }

    /// The server's retry hint of an API error.
    pub fn retry_after(&self) -> Option<Duration> {
        self.api().and_then(|e| e.retry_after)
    }

    /// The `details` object of an API error.
    pub fn details(&self) -> Option<&Map<String, Value>> {
        self.api().map(|e| &e.details)
    }

    /// True when the deadline of the logical call passed.
    pub fn is_deadline_exceeded(&self) -> bool {
        matches!(self, Error::DeadlineExceeded { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use serde_json::json;

    fn parse(status: u16, headers: &HeaderMap, body: Value) -> ApiError {
        ApiError::from_response(
            "test.op",
            StatusCode::from_u16(status).expect("status"),
            headers,
            &serde_json::to_vec(&body).expect("json"),
        )
    }

    #[test]
    fn parses_dcs_error_shape() {
        let e = parse(
            409,
            &HeaderMap::new(),
            json!({
                "error_code": "SLEEP_HOLD_WINDOW_ACTIVE",
                "message": "sleep not allowed yet",
                "retryable": true,
                "retry_after_ms": 1500,
                "details": {"next_sleep_eligible_at": "2026-01-01T00:00:00Z"},
                "extra": 1
            }),
        );
        assert_eq!(e.code.as_deref(), Some("SLEEP_HOLD_WINDOW_ACTIVE"));
        assert_eq!(e.message, "sleep not allowed yet");
        assert_eq!(e.retryable, Some(true));
        assert_eq!(e.retry_after, Some(Duration::from_millis(1500)));
        assert_eq!(
            e.details["next_sleep_eligible_at"],
            json!("2026-01-01T00:00:00Z")
        );
        assert!(e.problem.is_none());
        let err = Error::from(e);
        assert_eq!(err.code(), Some(codes::SLEEP_HOLD_WINDOW_ACTIVE));
        assert_eq!(err.status(), Some(StatusCode::CONFLICT));
        assert!(!err.is_not_found());
        assert!(err.to_string().contains("SLEEP_HOLD_WINDOW_ACTIVE"));
    }

    #[test]
    fn parses_problem_json_shape() {
        let e = parse(
            404,
            &HeaderMap::new(),
            json!({"type": "about:blank", "title": "Not Found", "status": 404,
                   "detail": "machine dm-1 not found"}),
        );
        assert_eq!(e.code, None);
        assert_eq!(e.message, "machine dm-1 not found");
        assert_eq!(e.retryable, None);
        let p = e.problem.clone().expect("problem");
        assert_eq!(p.title.as_deref(), Some("Not Found"));
        assert_eq!(p.r#type.as_deref(), Some("about:blank"));
        let err = Error::from(e);
        assert!(err.is_not_found());
        assert!(!err.is_retryable());
    }

    #[test]
    fn problem_with_title_only_and_code_extension() {
        let e = parse(
            400,
            &HeaderMap::new(),
            json!({"title": "Bad Request", "status": 400, "code": "BAD_INPUT"}),
        );
        assert_eq!(e.message, "Bad Request");
        assert_eq!(e.code.as_deref(), Some("BAD_INPUT"));
    }

    #[test]
    fn non_json_body_is_kept_bounded() {
        let body = "x".repeat(5000);
        let e = ApiError::from_response(
            "op",
            StatusCode::BAD_GATEWAY,
            &HeaderMap::new(),
            body.as_bytes(),
        );
        assert!(e.message.len() < 600);
        let e = ApiError::from_response("op", StatusCode::BAD_GATEWAY, &HeaderMap::new(), b"");
        assert_eq!(e.message, "Bad Gateway");
    }

    #[test]
    fn header_hint_wins_over_body() {
        let mut h = HeaderMap::new();
        h.insert("retry-after-ms", HeaderValue::from_static("250"));
        let e = parse(
            429,
            &h,
            json!({"error_code": "RATE_LIMITED", "message": "slow down", "retryable": true, "retry_after_ms": 900}),
        );
        assert_eq!(e.retry_after, Some(Duration::from_millis(250)));
    }

    #[test]
    fn error_keeps_its_source() {
        let source = serde_json::from_str::<Value>("{").expect_err("bad json");
        let err = Error::Decode {
            operation: "machines.get",
            source,
        };
        assert!(std::error::Error::source(&err).is_some());
    }
}

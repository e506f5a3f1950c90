//! `application/problem+json` error responses (RFC 9457) with a stable
//! machine-readable `code`.
//!
//! [`ProblemCode`] is the one place that decides, for every problem the API
//! answers with, its code, HTTP status, title and default `Retry-After`
//! (`openapi.yaml` lists the same codes as `ProblemCode`). A [`Problem`] is
//! one occurrence: a code and a detail (plus a `Retry-After` of its own when
//! the occurrence knows better, e.g. a lease's remaining time);
//! `entry::problem` is the one conversion to an HTTP response.

use serde::Serialize;
use std::time::Duration;

/// Media type of every error response.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// `Retry-After` of a transient failure (a dependency, a busy machine).
pub const RETRY_SOON: Duration = Duration::from_secs(5);

/// `Retry-After` of a table that is unavailable (throttling clears fast).
const RETRY_TABLE: Duration = Duration::from_secs(2);

const BAD_REQUEST: &str = "Bad request";
const NOT_FOUND: &str = "Not found";
const CONFLICT: &str = "Conflict";
const UNPROCESSABLE: &str = "Unprocessable request";
const UPSTREAM: &str = "Upstream unavailable";

/// Declares [`ProblemCode`]: one line per code — variant, code, status,
/// title and default `Retry-After`.
macro_rules! problem_codes {
    ($($(#[$doc:meta])* $variant:ident = $code:literal, $status:literal, $title:expr, $retry:expr;)*) => {
        /// Every problem the HTTP API answers with (see the module doc).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ProblemCode {
            $($(#[$doc])* $variant,)*
        }

        impl ProblemCode {
            /// Every code, in declaration order.
            pub const ALL: &'static [ProblemCode] = &[$(ProblemCode::$variant,)*];

            /// The stable machine-readable code, e.g. `invalid_user_id`.
            pub const fn code(self) -> &'static str {
                match self { $(ProblemCode::$variant => $code,)* }
            }

            /// The HTTP status.
            pub const fn status(self) -> u16 {
                match self { $(ProblemCode::$variant => $status,)* }
            }

            /// The short summary, stable per code.
            pub const fn title(self) -> &'static str {
                match self { $(ProblemCode::$variant => $title,)* }
            }

            /// The `Retry-After` an occurrence gets unless it sets its own.
            pub const fn retry_after(self) -> Option<Duration> {
                match self { $(ProblemCode::$variant => $retry,)* }
            }
        }
    };
}

problem_codes! {
    /// `{user_id}` does not match its pattern.
    InvalidUserId = "invalid_user_id", 400, BAD_REQUEST, None;
    /// The body is empty or not JSON.
    InvalidJson = "invalid_json", 400, BAD_REQUEST, None;
    /// Well-formed JSON that breaks the contract.
    InvalidBody = "invalid_body", 422, UNPROCESSABLE, None;
    /// The message is empty.
    InvalidMessage = "invalid_message", 422, UNPROCESSABLE, None;
    /// The history is too long.
    InvalidHistory = "invalid_history", 422, UNPROCESSABLE, None;
    /// The body, the message or the history is too large.
    PayloadTooLarge = "payload_too_large", 413, "Payload too large", None;
    /// The body is not JSON.
    UnsupportedMediaType = "unsupported_media_type", 415, "Unsupported media type", None;
    /// No usable credentials.
    Unauthorized = "unauthorized", 401, "Unauthorized", None;
    /// Authenticated, but not allowed.
    Forbidden = "forbidden", 403, "Forbidden", None;
    /// No such route.
    NoSuchRoute = "no_such_route", 404, NOT_FOUND, None;
    /// The route exists with other methods.
    MethodNotAllowed = "method_not_allowed", 405, "Method not allowed", None;
    /// The user has no machine.
    NoMachine = "no_machine", 404, NOT_FOUND, None;
    /// A turn holds the user's machine.
    TurnInProgress = "turn_in_progress", 409, CONFLICT, Some(RETRY_SOON);
    /// The user's machine is being destroyed.
    MachineDestroying = "machine_destroying", 409, CONFLICT, None;
    /// (`error` event only) the machine is being provisioned again.
    MachineProvisioning = "machine_provisioning", 503, UPSTREAM, Some(RETRY_SOON);
    /// The language model failed.
    LlmError = "llm_error", 502, UPSTREAM, None;
    /// The machine's shell failed.
    ShellError = "shell_error", 502, UPSTREAM, None;
    /// The machine did not wake in time.
    MachineWaking = "machine_waking", 503, UPSTREAM, Some(RETRY_SOON);
    /// No time was left for the turn.
    NoTime = "no_time", 503, UPSTREAM, Some(RETRY_SOON);
    /// A dependency is temporarily unavailable.
    TemporarilyUnavailable = "temporarily_unavailable", 503, UPSTREAM, Some(RETRY_SOON);
    /// Provisioning could not start.
    ProvisioningUnavailable = "provisioning_unavailable", 503, UPSTREAM, Some(RETRY_SOON);
    /// The machine could not be destroyed yet.
    DestroyIncomplete = "destroy_incomplete", 503, UPSTREAM, Some(RETRY_SOON);
    /// The machine could not be put to sleep now.
    SleepUnavailable = "sleep_unavailable", 503, UPSTREAM, Some(RETRY_SOON);
    /// The user table is unavailable.
    TableUnavailable = "table_unavailable", 503, UPSTREAM, Some(RETRY_TABLE);
    /// Our fault; the detail must not leak internals or secrets.
    InternalError = "internal_error", 500, "Internal error", None;
    /// The user started too many turns this minute.
    RateLimited = "rate_limited", 429, "Too many requests", None;
    /// The user's machine used its awake time of the day.
    AwakeBudgetExhausted = "awake_budget_exhausted", 429, "Awake budget exhausted", None;
    /// The issuer's signing keys could not be fetched.
    AuthUnavailable = "auth_unavailable", 503, UPSTREAM, Some(RETRY_SOON);
    /// A query parameter is malformed.
    InvalidQuery = "invalid_query", 422, UNPROCESSABLE, None;
    /// The `Idempotency-Key` header is malformed.
    InvalidIdempotencyKey = "invalid_idempotency_key", 400, BAD_REQUEST, None;
    /// An `Idempotency-Key` was sent again with another body.
    IdempotencyKeyReused = "idempotency_key_reused", 422, UNPROCESSABLE, None;
    /// The user's new machine could not be prepared.
    ProvisioningFailed = "provisioning_failed", 503, UPSTREAM, Some(RETRY_SOON);
}

/// An error response: status, stable `code`, human `title` and `detail`, and
/// an optional `Retry-After`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// URI reference naming the problem type.
    #[serde(rename = "type")]
    pub kind: String,
    /// Short summary, stable per `code`.
    pub title: String,
    /// HTTP status.
    pub status: u16,
    /// What went wrong in this occurrence; safe to show (never a secret).
    pub detail: String,
    /// Stable machine-readable code, e.g. `invalid_user_id`.
    pub code: String,
    /// When the client should retry, if it should.
    #[serde(skip)]
    pub retry_after: Option<Duration>,
}

impl Problem {
    /// An occurrence of `code` (its status, title and default `Retry-After`).
    pub fn of(code: ProblemCode, detail: impl Into<String>) -> Self {
        Problem {
            kind: format!(
                "https://agenthome.dev/problems/{}",
                code.code().replace('_', "-")
            ),
            title: code.title().to_string(),
            status: code.status(),
            detail: detail.into(),
            code: code.code().to_string(),
            retry_after: code.retry_after(),
        }
    }

    /// Set this occurrence's `Retry-After`.
    pub fn with_retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    /// 409: a turn holds the user's machine; retry after `retry_after`.
    pub fn turn_in_progress(retry_after: Duration) -> Self {
        Self::of(
            ProblemCode::TurnInProgress,
            "a turn for this user is running; retry after it finishes",
        )
        .with_retry_after(retry_after)
    }

    /// 409: the user's machine is being destroyed.
    pub fn machine_destroying() -> Self {
        Self::of(
            ProblemCode::MachineDestroying,
            "the user's machine is being destroyed; retry after the DELETE completes",
        )
    }

    /// 500 with a fixed detail (never internals or secrets).
    pub fn internal(detail: impl Into<String>) -> Self {
        Self::of(ProblemCode::InternalError, detail)
    }

    /// The JSON body.
    pub fn body(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| {
            // Serializing plain strings and numbers cannot fail; keep a
            // valid body anyway.
            format!(
                "{{\"type\":\"about:blank\",\"title\":\"Internal error\",\"status\":{}}}",
                self.status
            )
        })
    }

    /// `Retry-After` header value in whole seconds (rounded up, at least 1).
    pub fn retry_after_header(&self) -> Option<String> {
        self.retry_after.map(retry_after_seconds)
    }
}

/// A `Retry-After` value: whole seconds, rounded up, at least 1.
pub fn retry_after_seconds(after: Duration) -> String {
    after.as_millis().div_ceil(1000).max(1).to_string()
}

/// A JSON body that did not parse: 422 `invalid_body` when it is JSON of the
/// wrong shape, 400 `invalid_json` when it is not JSON.
impl From<serde_json::Error> for Problem {
    fn from(e: serde_json::Error) -> Self {
        match e.classify() {
            serde_json::error::Category::Data => Self::of(ProblemCode::InvalidBody, e.to_string()),
            _ => Self::of(
                ProblemCode::InvalidJson,
                format!("the body is not valid JSON: {e}"),
            ),
        }
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status, self.code, self.detail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_the_problem_fields_and_a_code() {
        let p = Problem::of(ProblemCode::InvalidMessage, "message is empty");
        let v: serde_json::Value = serde_json::from_str(&p.body()).expect("json");
        assert_eq!(v["status"], 422);
        assert_eq!(v["code"], "invalid_message");
        assert_eq!(v["detail"], "message is empty");
        assert_eq!(v["title"], "Unprocessable request");
        assert!(v["type"]
            .as_str()
            .is_some_and(|t| t.ends_with("invalid-message")));
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        let p = Problem::turn_in_progress(Duration::from_millis(1500));
        assert_eq!(p.retry_after_header().as_deref(), Some("2"));
        let p = p.with_retry_after(Duration::from_millis(1));
        assert_eq!(p.retry_after_header().as_deref(), Some("1"));
    }

    #[test]
    fn every_code_is_its_variant_in_snake_case_with_a_client_or_server_status() {
        for c in ProblemCode::ALL {
            let snake: String = format!("{c:?}")
                .chars()
                .enumerate()
                .flat_map(|(i, ch)| {
                    let sep = (i > 0 && ch.is_ascii_uppercase()).then_some('_');
                    sep.into_iter().chain(ch.to_lowercase())
                })
                .collect();
            assert_eq!(c.code(), snake);
            assert!((400..600).contains(&c.status()), "{c:?}");
            let transient = c.retry_after().is_some();
            assert!(!transient || matches!(c.status(), 409 | 503), "{c:?}");
        }
    }

    #[test]
    fn a_json_error_is_invalid_json_or_invalid_body() {
        let not_json = serde_json::from_str::<u8>("nope").expect_err("not json");
        let wrong_shape = serde_json::from_str::<u8>("\"x\"").expect_err("wrong shape");
        assert_eq!(Problem::from(not_json).code, "invalid_json");
        assert_eq!(Problem::from(wrong_shape).status, 422);
    }
}

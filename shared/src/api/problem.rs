//! `application/problem+json` error responses (RFC 9457) with a stable
//! machine-readable `code`.

use serde::Serialize;
use std::time::Duration;

/// Media type of every error response.
pub const PROBLEM_JSON: &str = "application/problem+json";

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
    /// A problem with the given status, code, title and detail.
    pub fn new(status: u16, code: &str, title: &str, detail: impl Into<String>) -> Self {
        Problem {
            kind: format!("https://agenthome.dev/problems/{}", code.replace('_', "-")),
            title: title.to_string(),
            status,
            detail: detail.into(),
            code: code.to_string(),
            retry_after: None,
        }
    }

    /// Attach a `Retry-After`.
    pub fn with_retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    /// 400: the request is malformed.
    pub fn bad_request(code: &str, detail: impl Into<String>) -> Self {
        Self::new(400, code, "Bad request", detail)
    }

    /// 401: no usable credentials.
    pub fn unauthorized(detail: impl Into<String>) -> Self {
        Self::new(401, "unauthorized", "Unauthorized", detail)
    }

    /// 403: authenticated, but not allowed.
    pub fn forbidden(detail: impl Into<String>) -> Self {
        Self::new(403, "forbidden", "Forbidden", detail)
    }

    /// 404: no such route or resource.
    pub fn not_found(code: &str, detail: impl Into<String>) -> Self {
        Self::new(404, code, "Not found", detail)
    }

    /// 405: the route exists with other methods.
    pub fn method_not_allowed(detail: impl Into<String>) -> Self {
        Self::new(405, "method_not_allowed", "Method not allowed", detail)
    }

    /// 413: body too large.
    pub fn too_large(detail: impl Into<String>) -> Self {
        Self::new(413, "payload_too_large", "Payload too large", detail)
    }

    /// 415: not JSON.
    pub fn unsupported_media_type(detail: impl Into<String>) -> Self {
        Self::new(
            415,
            "unsupported_media_type",
            "Unsupported media type",
            detail,
        )
    }

    /// 422: well-formed JSON that breaks the contract.
    pub fn unprocessable(code: &str, detail: impl Into<String>) -> Self {
        Self::new(422, code, "Unprocessable request", detail)
    }

    /// 500: our fault; the detail must not leak internals or secrets.
    pub fn internal(detail: impl Into<String>) -> Self {
        Self::new(500, "internal_error", "Internal error", detail)
    }

    /// 502/503: a dependency failed.
    pub fn upstream(status: u16, code: &str, detail: impl Into<String>) -> Self {
        Self::new(status, code, "Upstream unavailable", detail)
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
        self.retry_after
            .map(|d| d.as_millis().div_ceil(1000).max(1).to_string())
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
        let p = Problem::unprocessable("invalid_message", "message is empty");
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
        let p = Problem::new(409, "turn_in_progress", "Conflict", "busy")
            .with_retry_after(Duration::from_millis(1500));
        assert_eq!(p.retry_after_header().as_deref(), Some("2"));
        let p = p.with_retry_after(Duration::from_millis(1));
        assert_eq!(p.retry_after_header().as_deref(), Some("1"));
    }
}

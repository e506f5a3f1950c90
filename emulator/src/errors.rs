//! The two error shapes of the API: the DCS error body
//! (`{error_code, message, retryable, retry_after_ms?, details?}`, used for
//! 401/403/409/429/503) and RFC 9457 problem details (everything else).

use std::collections::BTreeMap;

use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// An API error, rendered in the shape the spec gives its status.
#[derive(Debug, Clone)]
pub enum ApiError {
    Dcs(DcsError),
    Problem { status: StatusCode, detail: String },
}

/// The DCS error body plus its status.
#[derive(Debug, Clone, Serialize)]
pub struct DcsError {
    #[serde(skip)]
    pub status: StatusCode,
    pub error_code: String,
    pub message: String,
    pub retryable: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub details: BTreeMap<String, String>,
}

#[derive(Serialize)]
struct Problem<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    title: &'a str,
    status: u16,
    detail: &'a str,
}

impl DcsError {
    pub fn new(
        status: StatusCode,
        code: &str,
        message: impl Into<String>,
        retryable: bool,
    ) -> Self {
        Self {
            status,
            error_code: code.to_owned(),
            message: message.into(),
            retryable,
            retry_after_ms: None,
            details: BTreeMap::new(),
        }
    }

    pub fn retry_after(mut self, ms: u64) -> Self {
        self.retry_after_ms = Some(ms);
        self
    }

    pub fn detail(mut self, key: &str, value: impl Into<String>) -> Self {
        self.details.insert(key.to_owned(), value.into());
        self
    }
}

impl ApiError {
    pub fn problem(status: StatusCode, detail: impl Into<String>) -> Self {
        Self::Problem {
            status,
            detail: detail.into(),
        }
    }

    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::problem(StatusCode::BAD_REQUEST, detail)
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::problem(StatusCode::NOT_FOUND, detail)
    }

    pub fn unprocessable(detail: impl Into<String>) -> Self {
        Self::problem(StatusCode::UNPROCESSABLE_ENTITY, detail)
    }

    pub fn machine_not_found(id: &str) -> Self {
        Self::not_found(format!("machine {id} not found"))
    }

    /// 409 INVALID_STATE.
    pub fn invalid_state(message: impl Into<String>, retry_after_ms: Option<u64>) -> DcsError {
        let e = DcsError::new(
            StatusCode::CONFLICT,
            "INVALID_STATE",
            message,
            retry_after_ms.is_some(),
        );
        match retry_after_ms {
            Some(ms) => e.retry_after(ms),
            None => e,
        }
    }
}

impl From<DcsError> for ApiError {
    fn from(e: DcsError) -> Self {
        Self::Dcs(e)
    }
}

/// Adds `retry-after-ms` and `Retry-After` (whole seconds, rounded up).
pub fn retry_headers(headers: &mut HeaderMap, ms: u64) {
    if let Ok(v) = HeaderValue::from_str(&ms.to_string()) {
        headers.insert(HeaderName::from_static("retry-after-ms"), v);
    }
    if let Ok(v) = HeaderValue::from_str(&ms.div_ceil(1000).to_string()) {
        headers.insert(header::RETRY_AFTER, v);
    }
}

fn title_for(status: StatusCode) -> &'static str {
    status.canonical_reason().unwrap_or("Error")
}

impl IntoResponse for DcsError {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&self).unwrap_or_default();
        let mut resp = (
            self.status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response();
        if self.retryable {
            if let Some(ms) = self.retry_after_ms {
                retry_headers(resp.headers_mut(), ms);
            }
        }
        resp
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            Self::Dcs(e) => e.into_response(),
            Self::Problem { status, detail } => {
                let body = serde_json::to_vec(&Problem {
                    kind: "about:blank",
                    title: title_for(status),
                    status: status.as_u16(),
                    detail: &detail,
                })
                .unwrap_or_default();
                (
                    status,
                    [(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/problem+json"),
                    )],
                    body,
                )
                    .into_response()
            }
        }
    }
}

/// Parses a JSON request body strictly: malformed JSON is 400, a body that
/// does not fit the schema (unknown field, wrong type, missing field) is 422.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::unprocessable("request body is required"));
    }
    serde_json::from_slice(body).map_err(|e| match e.classify() {
        serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
            ApiError::bad_request(format!("malformed JSON body: {e}"))
        }
        _ => ApiError::unprocessable(format!("invalid request body: {e}")),
    })
}

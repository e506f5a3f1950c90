//! Injected faults: the fault table, path pattern matching, and the
//! middleware that answers or delays matching `/v1` requests.

use std::collections::BTreeMap;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::errors::{retry_headers, ApiError, DcsError};
use crate::server::AppRef;
use crate::util::fault_id;

fn star() -> String {
    "*".to_owned()
}

fn one() -> u32 {
    1
}

/// A fault as posted to `POST /_emulator/faults`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultSpec {
    #[serde(default = "star")]
    pub method: String,
    pub path: String,
    #[serde(default = "one")]
    pub times: u32,
    #[serde(default)]
    pub status: Option<u16>,
    #[serde(default)]
    pub error_code: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub retryable: Option<bool>,
    #[serde(default)]
    pub retry_after_ms: Option<u64>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub details: BTreeMap<String, String>,
    #[serde(default)]
    pub body: Option<serde_json::Value>,
    #[serde(default)]
    pub delay_ms: Option<u64>,
    #[serde(default)]
    pub drop_websocket_after_ms: Option<u64>,
}

impl FaultSpec {
    pub fn validate(&self) -> Result<(), ApiError> {
        if !self.path.starts_with('/') {
            return Err(ApiError::unprocessable("fault path must start with '/'"));
        }
        if let Some(s) = self.status {
            if !(100..=599).contains(&s) {
                return Err(ApiError::unprocessable("fault status must be 100..=599"));
            }
        }
        if self.status.is_none()
            && self.delay_ms.is_none()
            && self.drop_websocket_after_ms.is_none()
        {
            return Err(ApiError::unprocessable(
                "a fault needs status, delay_ms or drop_websocket_after_ms",
            ));
        }
        for name in self.headers.keys() {
            if HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Err(ApiError::unprocessable(format!(
                    "invalid header name {name:?}"
                )));
            }
        }
        Ok(())
    }

    fn matches(&self, method: &str, path: &str) -> bool {
        (self.method == "*" || self.method.eq_ignore_ascii_case(method))
            && path_matches(&self.path, path)
    }

    /// The injected response.
    fn response(&self, status: StatusCode) -> Response {
        let mut resp = match &self.body {
            Some(serde_json::Value::String(raw)) => (status, raw.clone()).into_response(),
            Some(v) => (
                status,
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                )],
                v.to_string(),
            )
                .into_response(),
            None => {
                let retryable = self
                    .retryable
                    .unwrap_or(status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error());
                let code = self
                    .error_code
                    .clone()
                    .unwrap_or_else(|| default_code(status).to_owned());
                let mut e = DcsError::new(
                    status,
                    &code,
                    self.message
                        .clone()
                        .unwrap_or_else(|| "injected fault".to_owned()),
                    retryable,
                );
                e.retry_after_ms = self.retry_after_ms;
                e.details = self.details.clone();
                e.into_response()
            }
        };
        if self.body.is_some() && self.retryable.unwrap_or(true) {
            if let Some(ms) = self.retry_after_ms {
                retry_headers(resp.headers_mut(), ms);
            }
        }
        for (k, v) in &self.headers {
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(k.as_bytes()),
                HeaderValue::from_str(v),
            ) {
                resp.headers_mut().insert(name, value);
            }
        }
        resp
    }
}

fn default_code(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "AUTH_INVALID",
        403 => "AUTH_SCOPE_FORBIDDEN",
        409 => "INVALID_STATE",
        429 => "RATE_LIMITED",
        503 => "DEPENDENCY_UNAVAILABLE",
        _ => "INJECTED_FAULT",
    }
}

/// A registered fault.
#[derive(Debug, Clone, Serialize)]
pub struct Fault {
    pub fault_id: String,
    #[serde(flatten)]
    pub spec: FaultSpec,
    pub hits: u32,
}

#[derive(Default)]
pub struct FaultTable {
    faults: Vec<Fault>,
}

impl FaultTable {
    pub fn add(&mut self, spec: FaultSpec) -> String {
        let id = fault_id();
        self.faults.push(Fault {
            fault_id: id.clone(),
            spec,
            hits: 0,
        });
        id
    }

    pub fn list(&self) -> Vec<Fault> {
        self.faults.clone()
    }

    pub fn clear(&mut self) {
        self.faults.clear();
    }

    /// The first fault matching the request, counting the hit (and dropping
    /// the fault once it has been used `times` times).
    pub fn take_match(&mut self, method: &str, path: &str) -> Option<FaultSpec> {
        let idx = self
            .faults
            .iter()
            .position(|f| f.spec.matches(method, path))?;
        let f = &mut self.faults[idx];
        f.hits = f.hits.saturating_add(1);
        let spec = f.spec.clone();
        if spec.times != 0 && f.hits >= spec.times {
            self.faults.remove(idx);
        }
        Some(spec)
    }
}

/// `*` matches one segment, `**` any number of segments (the rest).
pub fn path_matches(pattern: &str, path: &str) -> bool {
    fn rec(p: &[&str], s: &[&str]) -> bool {
        match p.split_first() {
            None => s.is_empty(),
            Some((&"**", rest)) => (0..=s.len()).any(|i| rec(rest, &s[i..])),
            Some((&"*", rest)) => !s.is_empty() && rec(rest, &s[1..]),
            Some((lit, rest)) => s.first() == Some(lit) && rec(rest, &s[1..]),
        }
    }
    let split = |x: &str| -> Vec<String> {
        x.trim_end_matches('/')
            .split('/')
            .map(str::to_owned)
            .collect()
    };
    let p = split(pattern);
    let s = split(path);
    let p: Vec<&str> = p.iter().map(String::as_str).collect();
    let s: Vec<&str> = s.iter().map(String::as_str).collect();
    rec(&p, &s)
}

/// Delay the request (after its idempotency key is marked in flight).
#[derive(Debug, Clone, Copy)]
pub struct Delay(pub u64);

/// Drop the accepted WebSocket without a close frame after this many ms.
#[derive(Debug, Clone, Copy)]
pub struct DropWebSocket(pub u64);

/// Applies the first matching fault, before authentication and handlers.
pub async fn middleware(State(app): State<AppRef>, mut req: Request<Body>, next: Next) -> Response {
    let method = req.method().as_str().to_owned();
    let path = req.uri().path().to_owned();
    let fault = app.faults().take_match(&method, &path);
    let Some(fault) = fault else {
        return next.run(req).await;
    };
    tracing::info!(%method, %path, status = ?fault.status, "injecting fault");
    if let Some(status) = fault.status {
        if let Some(ms) = fault.delay_ms {
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        }
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        return fault.response(status);
    }
    if let Some(ms) = fault.delay_ms {
        req.extensions_mut().insert(Delay(ms));
    }
    if let Some(ms) = fault.drop_websocket_after_ms {
        req.extensions_mut().insert(DropWebSocket(ms));
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        assert!(path_matches(
            "/v1/machines/*/wake",
            "/v1/machines/dm-1/wake"
        ));
        assert!(!path_matches(
            "/v1/machines/*/wake",
            "/v1/machines/dm-1/sleep"
        ));
        assert!(!path_matches("/v1/machines/*", "/v1/machines/dm-1/wake"));
        assert!(path_matches("/v1/machines/**", "/v1/machines/dm-1/wake"));
        assert!(path_matches("/v1/machines/**", "/v1/machines"));
        assert!(path_matches(
            "/v1/**/stream",
            "/v1/machines/a/terminals/b/stream"
        ));
        assert!(path_matches("/v1/machines", "/v1/machines/"));
        assert!(!path_matches("/v1/machines", "/v1/machine"));
    }

    fn spec(times: u32) -> FaultSpec {
        serde_json::from_value(
            serde_json::json!({"path": "/v1/machines", "times": times, "status": 503}),
        )
        .expect("valid spec")
    }

    #[test]
    fn times_are_counted() {
        let mut t = FaultTable::default();
        t.add(spec(2));
        assert!(t.take_match("POST", "/v1/machines").is_some());
        assert!(t.take_match("GET", "/v1/machines").is_some());
        assert!(t.take_match("GET", "/v1/machines").is_none());
        t.add(spec(0));
        for _ in 0..5 {
            assert!(t.take_match("GET", "/v1/machines").is_some());
        }
    }

    #[test]
    fn unknown_fault_fields_are_rejected() {
        let r: Result<FaultSpec, _> =
            serde_json::from_value(serde_json::json!({"path": "/x", "stauts": 503}));
        assert!(r.is_err());
    }
}

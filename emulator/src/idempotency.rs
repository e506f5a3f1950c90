//! `Idempotency-Key` handling for POST/PATCH/DELETE under `/v1`: request
//! fingerprints, replay of stored responses, key-reuse and in-flight
//! conflicts.

use std::time::Duration;

use axum::body::{to_bytes, Body};
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use crate::errors::{ApiError, DcsError};
use crate::faults::Delay;
use crate::server::AppRef;
use crate::state::IdemRecord;
use crate::util::now_ms;

/// Largest request body accepted.
pub const MAX_BODY: usize = 4 * 1024 * 1024;
/// Largest response body stored for replay.
const MAX_STORED: usize = 16 * 1024 * 1024;
/// `retry_after_ms` for a key that is still in flight.
const IN_FLIGHT_RETRY_MS: u64 = 250;

/// Writes `v` as JSON with object keys sorted, so that equal documents
/// fingerprint equally whatever their key order or whitespace.
pub fn canonical_json(v: &serde_json::Value, out: &mut String) {
    match v {
        serde_json::Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::Value::String((*k).clone()).to_string());
                out.push(':');
                if let Some(val) = map.get(*k) {
                    canonical_json(val, out);
                }
            }
            out.push('}');
        }
        serde_json::Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical_json(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// Hex SHA-256 of method, path and the (canonicalised, when JSON) body.
pub fn fingerprint(method: &str, path: &str, body: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(method.to_ascii_uppercase().as_bytes());
    h.update(b"\n");
    h.update(path.as_bytes());
    h.update(b"\n");
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(v) => {
            let mut s = String::new();
            canonical_json(&v, &mut s);
            h.update(s.as_bytes());
        }
        Err(_) => h.update(body),
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The first 8 characters of a fingerprint (all of it if shorter).
fn hash_prefix(fp: &str) -> &str {
    fp.get(..8).unwrap_or(fp)
}

fn is_mutation(m: &Method) -> bool {
    m == Method::POST || m == Method::PATCH || m == Method::DELETE || m == Method::PUT
}

/// Whether a response is final for its key (else the key is released so a
/// retry is processed again): 2xx and non-retryable 4xx are final.
fn is_final(status: StatusCode, body: &[u8]) -> bool {
    if status.is_success() {
        return true;
    }
    if !status.is_client_error() || status == StatusCode::TOO_MANY_REQUESTS {
        return false;
    }
    let retryable = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("retryable").and_then(serde_json::Value::as_bool))
        .unwrap_or(false);
    !retryable
}

fn replay(record: &IdemRecord) -> Response {
    let status = StatusCode::from_u16(record.status).unwrap_or(StatusCode::OK);
    let mut resp = (status, record.body.clone()).into_response();
    let headers = resp.headers_mut();
    // The stored headers carry the original content type.
    headers.remove(axum::http::header::CONTENT_TYPE);
    for (k, v) in &record.headers {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            headers.append(name, value);
        }
    }
    headers.insert(
        HeaderName::from_static("idempotent-replayed"),
        HeaderValue::from_static("true"),
    );
    resp
}

async fn apply_delay(delay: Option<Delay>) {
    if let Some(Delay(ms)) = delay {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

/// Enforces and applies `Idempotency-Key` on mutations.
pub async fn middleware(State(app): State<AppRef>, req: Request<Body>, next: Next) -> Response {
    let delay = req.extensions().get::<Delay>().copied();
    if !is_mutation(req.method()) {
        apply_delay(delay).await;
        return next.run(req).await;
    }
    keyed(&app, req, next, delay).await
}

/// A mutation: checks its key, answers a repeat from the store (or refuses
/// it), else runs it with the key claimed and keeps a final answer.
async fn keyed(app: &AppRef, req: Request<Body>, next: Next, delay: Option<Delay>) -> Response {
    let key = match idempotency_key(req.headers()) {
        Ok(key) => key,
        Err(e) => return e.into_response(),
    };
    let (parts, body) = req.into_parts();
    let Ok(bytes) = to_bytes(body, MAX_BODY).await else {
        return ApiError::problem(StatusCode::PAYLOAD_TOO_LARGE, "request body too large")
            .into_response();
    };
    let fp = fingerprint(parts.method.as_str(), parts.uri.path(), &bytes);
    // Released however this future ends (including a dropped connection).
    let guard = match claim(app, &key, &fp) {
        Claim::Claimed(guard) => guard,
        Claim::Answered(resp) => return resp,
    };
    apply_delay(delay).await;
    let resp = next
        .run(Request::from_parts(parts, Body::from(bytes)))
        .await;
    keep_if_final(app, key, fp, guard, resp).await
}

/// The `Idempotency-Key` header, trimmed; a 400 when missing or too long.
fn idempotency_key(headers: &axum::http::HeaderMap) -> Result<String, ApiError> {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .map(str::to_owned);
    let Some(key) = key else {
        return Err(ApiError::bad_request(
            "the Idempotency-Key header is required",
        ));
    };
    if key.len() > 255 {
        return Err(ApiError::bad_request(
            "the Idempotency-Key header is too long",
        ));
    }
    Ok(key)
}

/// Claims `key` for this request. Else the answer instead of processing:
/// the stored response (same request), 429 (the same request is in
/// flight) or 409 (the key was used for another request).
fn claim(app: &AppRef, key: &str, fp: &str) -> Claim {
    let ttl_ms = app.retention().idempotency_ms;
    let expected = {
        let mut st = app.state();
        if let Some(rec) = st.idempotency_record(key, now_ms(), ttl_ms) {
            if rec.fingerprint == fp {
                return Claim::Answered(replay(rec));
            }
            rec.fingerprint.clone()
        } else if let Some(in_flight) = st.in_flight.get(key) {
            if in_flight == fp {
                return Claim::Answered(in_flight_response());
            }
            in_flight.clone()
        } else {
            st.in_flight.insert(key.to_owned(), fp.to_owned());
            return Claim::Claimed(InFlightGuard {
                app: app.clone(),
                key: key.to_owned(),
            });
        }
    };
    Claim::Answered(
        DcsError::new(
            StatusCode::CONFLICT,
            "IDEMPOTENCY_KEY_REUSED",
            "idempotency key reused with different request parameters",
            false,
        )
        .detail("expected_request_hash", hash_prefix(&expected))
        .detail("provided_request_hash", hash_prefix(fp))
        .into_response(),
    )
}

/// What [`claim`] decided.
enum Claim {
    /// The key is this request's until the guard drops.
    Claimed(InFlightGuard),
    /// The answer, without processing.
    Answered(Response),
}

/// 429 for a repeat of a request still being processed.
fn in_flight_response() -> Response {
    DcsError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "RATE_LIMITED",
        "idempotency key is already in-flight",
        true,
    )
    .retry_after(IN_FLIGHT_RETRY_MS)
    .into_response()
}

/// Buffers the response; a final one is stored for replay and written to
/// disk. The key is released before that write (a repeat then replays).
async fn keep_if_final(
    app: &AppRef,
    key: String,
    fp: String,
    guard: InFlightGuard,
    resp: Response,
) -> Response {
    let (parts, body) = resp.into_parts();
    let body = match to_bytes(body, MAX_STORED).await {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "cannot buffer response for idempotency");
            drop(guard);
            return ApiError::problem(StatusCode::INTERNAL_SERVER_ERROR, "response too large")
                .into_response();
        }
    };
    if is_final(parts.status, &body) {
        let record = IdemRecord {
            fingerprint: fp,
            created_ms: now_ms(),
            status: parts.status.as_u16(),
            headers: replay_headers(&parts.headers),
            body: String::from_utf8_lossy(&body).into_owned(),
        };
        app.state().insert_idempotency(key, record);
        drop(guard);
        app.persist().await;
    } else {
        drop(guard);
    }
    Response::from_parts(parts, Body::from(body))
}

/// The response headers a replay needs: those that describe the body and
/// the resource (`content-type`, `etag`, retry hints, `location`).
fn replay_headers(headers: &axum::http::HeaderMap) -> Vec<(String, String)> {
    const KEEP: [&str; 5] = [
        "content-type",
        "etag",
        "retry-after",
        "retry-after-ms",
        "location",
    ];
    headers
        .iter()
        .filter(|(k, _)| KEEP.contains(&k.as_str()))
        .filter_map(|(k, v)| {
            v.to_str()
                .ok()
                .map(|v| (k.as_str().to_owned(), v.to_owned()))
        })
        .collect()
}

struct InFlightGuard {
    app: AppRef,
    key: String,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.app.state().in_flight.remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_ignores_key_order_and_whitespace() {
        let a = fingerprint("POST", "/v1/machines", br#"{"vcpu":1,"memory_mib":1024}"#);
        let b = fingerprint(
            "post",
            "/v1/machines",
            b"{ \"memory_mib\": 1024,\n \"vcpu\": 1 }",
        );
        assert_eq!(a, b);
        assert_eq!(a.len(), 64);
    }

    #[test]
    fn fingerprint_differs_on_method_path_body() {
        let base = fingerprint("POST", "/v1/machines", br#"{"vcpu":1}"#);
        assert_ne!(base, fingerprint("PATCH", "/v1/machines", br#"{"vcpu":1}"#));
        assert_ne!(
            base,
            fingerprint("POST", "/v1/machines/x", br#"{"vcpu":1}"#)
        );
        assert_ne!(base, fingerprint("POST", "/v1/machines", br#"{"vcpu":2}"#));
        assert_eq!(
            fingerprint("POST", "/p", b""),
            fingerprint("POST", "/p", b"")
        );
    }

    #[test]
    fn canonical_nested() {
        let v: serde_json::Value =
            serde_json::from_str(r#"{"b":[{"y":1,"x":2}],"a":"s"}"#).expect("json");
        let mut s = String::new();
        canonical_json(&v, &mut s);
        assert_eq!(s, r#"{"a":"s","b":[{"x":2,"y":1}]}"#);
    }

    #[test]
    fn finality() {
        assert!(is_final(StatusCode::OK, b"{}"));
        assert!(is_final(StatusCode::UNPROCESSABLE_ENTITY, b"{}"));
        assert!(!is_final(StatusCode::CONFLICT, br#"{"retryable":true}"#));
        assert!(is_final(StatusCode::CONFLICT, br#"{"retryable":false}"#));
        assert!(!is_final(StatusCode::SERVICE_UNAVAILABLE, b"{}"));
        assert!(!is_final(StatusCode::TOO_MANY_REQUESTS, b"{}"));
    }
}

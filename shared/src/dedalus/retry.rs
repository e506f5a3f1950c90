//! The one retry policy of the client: which failures are retried, how long
//! to wait (server hint first, else capped exponential backoff with jitter),
//! and the loop that applies it within a per-call deadline.

use std::future::Future;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use http::{HeaderMap, StatusCode};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite;

use super::error::{codes, Error, Result};

/// How the client retries a logical call.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, including the first (1 = never retry).
    pub max_attempts: u32,
    /// First backoff delay; doubles on every retry.
    pub initial_backoff: Duration,
    /// Cap of a backoff delay (jitter included).
    pub max_backoff: Duration,
    /// Add up to 100 % random jitter to each backoff delay (and up to 10 % on
    /// top of a server's hint).
    pub jitter: bool,
    /// Overall deadline of one logical call, all attempts and waits included.
    pub call_deadline: Duration,
    /// Server hints longer than this are not waited for: the error is
    /// returned at once with its `retry_after` (e.g. a sleep hold window).
    pub max_server_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(8),
            jitter: true,
            call_deadline: Duration::from_secs(120),
            max_server_delay: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// A policy that never retries.
    pub fn no_retries() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// The backoff schedule (server hints aside): `initial·2ⁿ` plus jitter,
    /// capped at `max_backoff`.
    pub fn backoff(&self) -> impl Iterator<Item = Duration> {
        let mut builder = ExponentialBuilder::new()
            .with_min_delay(self.initial_backoff)
            .with_max_delay(self.max_backoff)
            .with_factor(2.0)
            .without_max_times();
        if self.jitter {
            builder = builder.with_jitter();
        }
        let cap = self.max_backoff;
        builder.build().map(move |d| d.min(cap))
    }
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryDecision {
    /// Try again, after the server's hint if it gave one.
    Retry {
        /// The server's `retry_after`, if any.
        hint: Option<Duration>,
    },
    /// Give up and return the error.
    Stop,
}

impl RetryDecision {
    /// True for [`RetryDecision::Retry`].
    pub fn is_retry(&self) -> bool {
        matches!(self, RetryDecision::Retry { .. })
    }
}

/// Whether a failure is worth another attempt.
///
/// Retried: transport failures (connect, timeout, reset), 408, 429, 5xx,
/// and 409 only when the body says `retryable: true`. Never retried:
/// `IDEMPOTENCY_KEY_REUSED`, 401, 403, 404, other 4xx, and any error whose
/// body says `retryable: false`.
pub fn classify(err: &Error) -> RetryDecision {
    match err {
        Error::Api(api) => {
            let retry = RetryDecision::Retry {
                hint: api.retry_after,
            };
            if api.code.as_deref() == Some(codes::IDEMPOTENCY_KEY_REUSED) {
                return RetryDecision::Stop;
            }
            if api.retryable == Some(false) {
                return RetryDecision::Stop;
            }
            let status = api.status;
            if status == StatusCode::REQUEST_TIMEOUT
                || status == StatusCode::TOO_MANY_REQUESTS
                || status.is_server_error()
            {
                return retry;
            }
            if status == StatusCode::CONFLICT && api.retryable == Some(true) {
                return retry;
            }
            RetryDecision::Stop
        }
        Error::Transport { source, .. } => {
            if source.is_connect() || source.is_timeout() || source.is_request() || source.is_body()
            {
                RetryDecision::Retry { hint: None }
            } else {
                RetryDecision::Stop
            }
        }
        Error::WebSocket { source, .. } => match source.as_ref() {
            tungstenite::Error::Io(_) => RetryDecision::Retry { hint: None },
            tungstenite::Error::Protocol(
                tungstenite::error::ProtocolError::ResetWithoutClosingHandshake
                | tungstenite::error::ProtocolError::HandshakeIncomplete,
            ) => RetryDecision::Retry { hint: None },
            _ => RetryDecision::Stop,
        },
        _ => RetryDecision::Stop,
    }
}

/// The server's retry hint: `retry-after-ms` header (milliseconds, may be
/// fractional), else the body's `retry_after_ms`, else `Retry-After`
/// (delta-seconds; an HTTP-date is ignored).
pub fn server_hint(headers: &HeaderMap, body_retry_after_ms: Option<f64>) -> Option<Duration> {
    let header_ms = headers
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .and_then(duration_from_ms);
    let body_ms = body_retry_after_ms.and_then(duration_from_ms);
    let retry_after = headers
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .and_then(|secs| duration_from_ms(secs * 1000.0));
    header_ms.or(body_ms).or(retry_after)
}

fn duration_from_ms(ms: f64) -> Option<Duration> {
    if ms.is_finite() && ms >= 0.0 {
        Duration::try_from_secs_f64(ms / 1000.0).ok()
    } else {
        None
    }
}

/// What an attempt knows about its place in the call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Attempt {
    /// 1-based attempt number.
    pub number: u32,
    /// Time left before the call's deadline.
    pub remaining: Duration,
}

/// Runs `attempt` until it succeeds, fails for good, runs out of attempts or
/// the deadline passes. The caller keeps everything that must stay the same
/// across attempts (notably the idempotency key) outside the closure.
pub(crate) async fn run<T, F, Fut>(
    policy: &RetryPolicy,
    operation: &'static str,
    deadline: Instant,
    mut attempt: F,
) -> Result<T>
where
    F: FnMut(Attempt) -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut backoff = policy.backoff();
    let mut number = 0u32;
    loop {
        number += 1;
        let now = Instant::now();
        if now >= deadline {
            return Err(Error::DeadlineExceeded {
                operation,
                attempts: number - 1,
                last_error: None,
            });
        }
        let err = match attempt(Attempt {
            number,
            remaining: deadline - now,
        })
        .await
        {
            Ok(value) => return Ok(value),
            Err(err) => err,
        };
        let delay = retry_after_failure(policy, &mut backoff, err, operation, number, deadline)?;
        tokio::time::sleep(delay).await;
    }
}

/// Attempt `number` failed with `err`: the wait before the next attempt,
/// or the error to give up with (not retryable, out of attempts, past the
/// deadline, or a wait the policy or the deadline does not allow).
fn retry_after_failure(
    policy: &RetryPolicy,
    backoff: &mut impl Iterator<Item = Duration>,
    err: Error,
    operation: &'static str,
    number: u32,
    deadline: Instant,
) -> Result<Duration> {
    let RetryDecision::Retry { hint } = classify(&err) else {
        tracing::debug!(operation, attempt = number, error = %err, "not retryable");
        return Err(err);
    };
    let now = Instant::now();
    if now >= deadline {
        return Err(Error::DeadlineExceeded {
            operation,
            attempts: number,
            last_error: Some(Box::new(err)),
        });
    }
    if number >= policy.max_attempts.max(1) {
        tracing::debug!(operation, attempt = number, error = %err, "out of attempts");
        return Err(err);
    }
    let Some(delay) = delay_before_retry(policy, backoff, hint, operation, number) else {
        return Err(err);
    };
    if now + delay >= deadline {
        tracing::debug!(
            operation,
            attempt = number,
            delay_ms = delay.as_millis() as u64,
            "next attempt would pass the deadline"
        );
        return Err(err);
    }
    tracing::debug!(
        operation,
        attempt = number,
        delay_ms = delay.as_millis() as u64,
        server_hint = hint.is_some(),
        error = %err,
        "retrying"
    );
    Ok(delay)
}

/// The wait before the next attempt: the server's hint (up to +10 % so
/// that callers told the same wait do not return in lockstep; never less
/// than asked), else the next backoff step. `None` when the server asks for
/// longer than the policy allows (then the call gives up).
fn delay_before_retry(
    policy: &RetryPolicy,
    backoff: &mut impl Iterator<Item = Duration>,
    hint: Option<Duration>,
    operation: &'static str,
    number: u32,
) -> Option<Duration> {
    match hint {
        Some(hint) if hint > policy.max_server_delay => {
            tracing::debug!(
                operation,
                attempt = number,
                hint_ms = hint.as_millis() as u64,
                "server asks to wait longer than the policy allows"
            );
            None
        }
        Some(hint) if !hint.is_zero() && policy.jitter => {
            Some(hint + hint.mul_f64(rand::random::<f64>() * 0.1))
        }
        Some(hint) if !hint.is_zero() => Some(hint),
        _ => Some(backoff.next().unwrap_or(policy.max_backoff)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dedalus::error::ApiError;
    use http::HeaderValue;
    use serde_json::json;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn api(status: u16, body: serde_json::Value) -> Error {
        ApiError::from_response(
            "t",
            StatusCode::from_u16(status).expect("status"),
            &HeaderMap::new(),
            &serde_json::to_vec(&body).expect("json"),
        )
        .into()
    }

    fn dcs(status: u16, code: &str, retryable: bool) -> Error {
        api(
            status,
            json!({"error_code": code, "message": "m", "retryable": retryable}),
        )
    }

    #[test]
    fn decisions() {
        use RetryDecision::*;
        assert_eq!(
            classify(&dcs(409, "REVISION_MISMATCH", true)),
            Retry { hint: None }
        );
        assert_eq!(classify(&dcs(409, "INVALID_STATE", false)), Stop);
        assert!(classify(&dcs(409, "INVALID_STATE", true)).is_retry());
        assert_eq!(classify(&dcs(409, "IDEMPOTENCY_KEY_REUSED", true)), Stop);
        assert_eq!(classify(&dcs(401, "AUTH_INVALID", false)), Stop);
        assert_eq!(classify(&dcs(401, "AUTH_INVALID", true)), Stop);
        assert_eq!(classify(&dcs(403, "AUTH_SCOPE_FORBIDDEN", true)), Stop);
        assert_eq!(classify(&api(404, json!({"title": "Not Found"}))), Stop);
        assert_eq!(classify(&api(400, json!({"title": "Bad"}))), Stop);
        assert_eq!(classify(&api(422, json!({"retryable": true}))), Stop);
        assert!(classify(&dcs(429, "RATE_LIMITED", true)).is_retry());
        assert!(classify(&dcs(503, "DEPENDENCY_UNAVAILABLE", true)).is_retry());
        assert!(classify(&api(500, json!("oops"))).is_retry());
        assert!(classify(&api(502, json!({}))).is_retry());
        assert!(classify(&api(408, json!({}))).is_retry());
        assert_eq!(
            classify(&dcs(503, "X", false)),
            Stop,
            "body's retryable wins"
        );
        // 409 without a body flag is not retried.
        assert_eq!(classify(&api(409, json!({"error_code": "X"}))), Stop);
    }

    #[test]
    fn hint_is_taken_from_body_and_headers() {
        let e = api(
            429,
            json!({"error_code": "RATE_LIMITED", "message": "m", "retryable": true, "retry_after_ms": 750}),
        );
        assert_eq!(
            classify(&e),
            RetryDecision::Retry {
                hint: Some(Duration::from_millis(750))
            }
        );
    }

    #[test]
    fn server_hint_parsing() {
        let mut h = HeaderMap::new();
        assert_eq!(server_hint(&h, None), None);
        assert_eq!(server_hint(&h, Some(20.0)), Some(Duration::from_millis(20)));
        assert_eq!(server_hint(&h, Some(-1.0)), None);
        h.insert("retry-after", HeaderValue::from_static("2"));
        assert_eq!(server_hint(&h, None), Some(Duration::from_secs(2)));
        assert_eq!(
            server_hint(&h, Some(20.0)),
            Some(Duration::from_millis(20)),
            "body beats Retry-After"
        );
        h.insert("retry-after-ms", HeaderValue::from_static("12.5"));
        assert_eq!(
            server_hint(&h, Some(20.0)),
            Some(Duration::from_micros(12_500))
        );
        h.insert("retry-after-ms", HeaderValue::from_static("garbage"));
        assert_eq!(server_hint(&h, Some(20.0)), Some(Duration::from_millis(20)));
        let mut h = HeaderMap::new();
        h.insert(
            "retry-after",
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(server_hint(&h, None), None);
    }

    #[test]
    fn backoff_is_exponential_capped_and_jittered() {
        let policy = RetryPolicy {
            jitter: false,
            ..RetryPolicy::default()
        };
        let ms: Vec<u64> = policy
            .backoff()
            .take(8)
            .map(|d| (d.as_secs_f64() * 1000.0).round() as u64)
            .collect();
        assert_eq!(ms, [200, 400, 800, 1600, 3200, 6400, 8000, 8000]);
        let jittered: Vec<_> = RetryPolicy::default().backoff().take(10).collect();
        for (i, d) in jittered.iter().enumerate() {
            let base = (200.0 * f64::from(1u32 << i.min(6))).min(8000.0);
            let got = d.as_secs_f64() * 1000.0;
            assert!(
                got >= base - 1.0 && got <= (base * 2.0).min(8000.0) + 1.0,
                "{i}: {d:?}"
            );
        }
    }

    fn fast() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 4,
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(5),
            jitter: true,
            call_deadline: Duration::from_secs(5),
            max_server_delay: Duration::from_secs(1),
        }
    }

    #[tokio::test]
    async fn loop_retries_until_success() {
        let calls = AtomicU32::new(0);
        let out = run(&fast(), "t", Instant::now() + Duration::from_secs(5), |a| {
            calls.fetch_add(1, Ordering::SeqCst);
            async move {
                if a.number < 3 {
                    Err(dcs(503, "DEPENDENCY_UNAVAILABLE", true))
                } else {
                    Ok(a.number)
                }
            }
        })
        .await
        .expect("succeeds");
        assert_eq!(out, 3);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn loop_never_retries_non_retryable() {
        let calls = AtomicU32::new(0);
        let err = run::<(), _, _>(
            &fast(),
            "t",
            Instant::now() + Duration::from_secs(5),
            |_| {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Err(dcs(409, "IDEMPOTENCY_KEY_REUSED", false)) }
            },
        )
        .await
        .expect_err("fails");
        assert_eq!(err.code(), Some("IDEMPOTENCY_KEY_REUSED"));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn loop_stops_after_max_attempts() {
        let calls = AtomicU32::new(0);
        let err = run::<(), _, _>(
            &fast(),
            "t",
            Instant::now() + Duration::from_secs(5),
            |_| {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Err(dcs(503, "DEPENDENCY_UNAVAILABLE", true)) }
            },
        )
        .await
        .expect_err("fails");
        assert_eq!(err.status(), Some(StatusCode::SERVICE_UNAVAILABLE));
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn loop_honours_server_hint_and_surfaces_long_ones() {
        let start = Instant::now();
        let calls = AtomicU32::new(0);
        run(&fast(), "t", Instant::now() + Duration::from_secs(5), |a| {
            calls.fetch_add(1, Ordering::SeqCst);
            async move {
                if a.number == 1 {
                    Err(api(
                        429,
                        json!({"error_code": "RATE_LIMITED", "message": "m", "retryable": true, "retry_after_ms": 60}),
                    ))
                } else {
                    Ok(())
                }
            }
        })
        .await
        .expect("succeeds");
        assert!(start.elapsed() >= Duration::from_millis(60));

        // A hint beyond max_server_delay is surfaced at once.
        let calls = AtomicU32::new(0);
        let err = run::<(), _, _>(&fast(), "t", Instant::now() + Duration::from_secs(5), |_| {
            calls.fetch_add(1, Ordering::SeqCst);
            async {
                Err(api(
                    409,
                    json!({"error_code": "SLEEP_HOLD_WINDOW_ACTIVE", "message": "m", "retryable": true, "retry_after_ms": 300000}),
                ))
            }
        })
        .await
        .expect_err("surfaced");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(err.retry_after(), Some(Duration::from_secs(300)));
    }

    #[tokio::test]
    async fn loop_respects_deadline() {
        let policy = RetryPolicy {
            max_attempts: 100,
            ..fast()
        };
        let start = Instant::now();
        let err = run::<(), _, _>(
            &policy,
            "t",
            Instant::now() + Duration::from_millis(100),
            |_| async {
                tokio::time::sleep(Duration::from_millis(30)).await;
                Err(dcs(503, "DEPENDENCY_UNAVAILABLE", true))
            },
        )
        .await
        .expect_err("fails");
        assert!(start.elapsed() < Duration::from_millis(400));
        assert!(err.is_retryable());
    }
}

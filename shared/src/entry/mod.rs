//! The entrypoint layer: Lambda HTTP events (API Gateway HTTP API, Function
//! URLs, `cargo lambda watch`) mapped onto the product's HTTP contract
//! ([`crate::api`]) and back. Domain code never sees these types.

pub mod awake_budget;
pub mod events;
mod fair_use;
pub mod first_turn;
mod route;

pub use awake_budget::AwakeBudget;
pub use fair_use::FairUse;
pub use first_turn::{FirstTurn, Waited};
pub use route::{route, Route};

use crate::api::jwt::{split_scopes, JwtError, JwtSettings, JwtVerifier};
use crate::api::problem::retry_after_seconds;
use crate::api::{
    auth, AccessPolicy, AuthMode, Caller, Problem, ProblemCode, UserId, PROBLEM_JSON,
};
use lambda_http::request::RequestContext;
use lambda_http::{Body, Request, RequestExt, Response};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;

/// Who is calling, from the authorizer data API Gateway attached.
pub fn caller(req: &Request) -> Caller {
    let mut caller = Caller::default();
    let authorizer = match req.request_context_ref() {
        Some(RequestContext::ApiGatewayV2(ctx)) => ctx.authorizer.as_ref(),
        _ => None,
    };
    let Some(authorizer) = authorizer else {
        return caller;
    };
    if let Some(jwt) = &authorizer.jwt {
        caller.subject = jwt.claims.get("sub").cloned();
        caller.scopes = jwt.scopes.clone().unwrap_or_default();
        for claim in ["scope", "scp"] {
            if let Some(v) = jwt.claims.get(claim) {
                caller.scopes.extend(split_scopes(v));
            }
        }
        caller.client_id = jwt
            .claims
            .get("azp")
            .or_else(|| jwt.claims.get("client_id"))
            .cloned();
    }
    if let Some(iam) = &authorizer.iam {
        caller.iam_principal = iam
            .user_arn
            .clone()
            .or_else(|| iam.caller_id.clone())
            .or_else(|| iam.account_id.clone());
    }
    caller
}

/// Who may call, built once per cold start: the mode, the admin policy and,
/// for `AUTH_MODE=bearer`, the JWT verifier (with its cached keys).
#[derive(Debug, Clone)]
pub struct Authorizer {
    mode: AuthMode,
    admin: AccessPolicy,
    verifier: Option<Arc<JwtVerifier>>,
}

impl Authorizer {
    /// An authorizer for `mode`; `AUTH_MODE=bearer` needs a verifier.
    pub fn new(
        mode: AuthMode,
        admin: AccessPolicy,
        verifier: Option<JwtVerifier>,
    ) -> Result<Self, JwtError> {
        if mode == AuthMode::Bearer && verifier.is_none() {
            return Err(JwtError::Config(
                "AUTH_MODE=bearer needs JWT_ISSUER and JWT_AUDIENCE".into(),
            ));
        }
        Ok(Authorizer {
            mode,
            admin,
            verifier: verifier.map(Arc::new),
        })
    }

    /// The authorizer the configuration describes.
    pub fn from_config(c: &crate::config::Config) -> Result<Self, JwtError> {
        let verifier = match (&c.jwt_issuer, c.auth_mode) {
            (Some(issuer), AuthMode::Bearer) => Some(JwtVerifier::new(JwtSettings {
                issuer: issuer.clone(),
                audiences: c.jwt_audience.clone(),
                jwks_url: c.jwks_url.clone(),
            })?),
            _ => None,
        };
        let admin = AccessPolicy::new(c.admin_scope.clone(), c.admin_client_id.clone())
            .with_user_scope(c.user_scope.clone());
        Self::new(c.auth_mode, admin, verifier)
    }

    /// The mode.
    pub fn mode(&self) -> AuthMode {
        self.mode
    }

    /// Authorize the caller of `req` for `user`.
    pub async fn authorize(&self, req: &Request, user: &UserId) -> Result<(), Problem> {
        let caller = match &self.verifier {
            Some(verifier) if self.mode == AuthMode::Bearer => {
                let token = bearer_token(req).ok_or_else(|| {
                    Problem::of(
                        ProblemCode::Unauthorized,
                        "an `Authorization: Bearer <JWT>` header is required",
                    )
                })?;
                verifier
                    .verify(token)
                    .await
                    .map_err(|e| token_problem(&e))?
            }
            _ => caller(req),
        };
        auth::authorize(self.mode, &self.admin, &caller, user)
    }
}

/// The token of an `Authorization: Bearer <token>` header.
fn bearer_token(req: &Request) -> Option<&str> {
    let value = req.headers().get("authorization")?.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// A refused token is 401 (the reason, never the token); keys that cannot
/// be fetched are 503.
fn token_problem(e: &JwtError) -> Problem {
    if e.is_unavailable() {
        tracing::error!(error = %e, "cannot verify bearer tokens");
        return Problem::of(
            ProblemCode::AuthUnavailable,
            "the identity provider's signing keys are unavailable; retry shortly",
        );
    }
    tracing::info!(error = %e, "bearer token refused");
    Problem::of(ProblemCode::Unauthorized, e.to_string())
}

/// An error response: the one conversion of a [`Problem`] to HTTP (a
/// server-side failure is logged here).
pub fn problem(p: &Problem) -> Response<Body> {
    if p.status >= 500 {
        tracing::error!(status = p.status, code = %p.code, detail = %p.detail, "request failed");
    }
    let mut builder = Response::builder()
        .status(p.status)
        .header("content-type", PROBLEM_JSON)
        .header("cache-control", "no-store");
    if let Some(after) = p.retry_after_header() {
        builder = builder.header("retry-after", after);
    }
    builder
        .body(Body::Text(p.body()))
        .unwrap_or_else(|_| Response::new(Body::Text(p.body())))
}

/// A JSON response, with `Retry-After` if given.
pub fn json<T: Serialize>(status: u16, value: &T, retry_after: Option<Duration>) -> Response<Body> {
    let body = match serde_json::to_string(value) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "cannot serialize a response");
            return problem(&Problem::internal("the response could not be serialized"));
        }
    };
    let mut builder = Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("cache-control", "no-store");
    if let Some(after) = retry_after {
        builder = builder.header("retry-after", retry_after_seconds(after));
    }
    builder
        .body(Body::Text(body))
        .unwrap_or_else(|_| problem(&Problem::internal("the response could not be built")))
}

/// An empty response (e.g. 204).
pub fn empty(status: u16) -> Response<Body> {
    Response::builder()
        .status(status)
        .body(Body::Empty)
        .unwrap_or_else(|_| Response::new(Body::Empty))
}

/// The raw body of `req`: must be JSON (if a content type is given),
/// non-empty and at most `max_bytes` long.
pub fn body_bytes(req: &Request, max_bytes: usize) -> Result<&[u8], Problem> {
    if let Some(ct) = req.headers().get("content-type") {
        let ct = ct.to_str().unwrap_or_default().to_ascii_lowercase();
        let media = ct.split(';').next().unwrap_or_default().trim();
        if media != "application/json" && !media.ends_with("+json") {
            return Err(Problem::of(
                ProblemCode::UnsupportedMediaType,
                format!("the body must be application/json, not {media:?}"),
            ));
        }
    }
    let bytes: &[u8] = match req.body() {
        Body::Text(t) => t.as_bytes(),
        Body::Binary(b) => b,
        _ => b"",
    };
    if bytes.len() > max_bytes {
        return Err(Problem::of(
            ProblemCode::PayloadTooLarge,
            format!(
                "the body is {} bytes; at most {max_bytes} are accepted",
                bytes.len()
            ),
        ));
    }
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(Problem::of(
            ProblemCode::InvalidJson,
            "the request body is empty; a JSON object is required",
        ));
    }
    Ok(bytes)
}

/// Parse the JSON body of `req` into `T` (whose serde attributes reject
/// unknown fields), at most `max_bytes` long.
pub fn read_json<T: DeserializeOwned>(req: &Request, max_bytes: usize) -> Result<T, Problem> {
    let bytes = body_bytes(req, max_bytes)?;
    Ok(serde_json::from_slice(bytes)?)
}

/// The time left before a Lambda invocation's deadline (`deadline_ms`,
/// epoch ms, from the runtime), or `None` when the value is not a plausible
/// absolute deadline: `cargo lambda watch` sends the function timeout itself
/// (e.g. `600000`), which would otherwise read as a deadline in 1970.
pub fn remaining(deadline_ms: u64, now_ms: u64) -> Option<Duration> {
    const DAY_MS: u64 = 24 * 3600 * 1000;
    if deadline_ms + DAY_MS < now_ms {
        return None;
    }
    Some(Duration::from_millis(deadline_ms.saturating_sub(now_ms)))
}

/// The Lambda invocation's deadline, if the runtime gave a usable one.
pub fn lambda_deadline(req: &Request) -> Option<std::time::SystemTime> {
    let ctx = req.lambda_context_ref()?;
    let left = remaining(ctx.deadline, crate::clock::now_ms())?;
    Some(std::time::SystemTime::now() + left)
}

/// Time left before the invocation's deadline minus `margin` (None when
/// unknown, e.g. a hand-made request or a local runtime without one).
pub fn time_left(req: &Request, margin: Duration) -> Option<Duration> {
    let deadline = lambda_deadline(req)?;
    let left = deadline
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    Some(left.saturating_sub(margin))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relative_deadline_is_not_taken_for_an_absolute_one() {
        let now = 1_795_867_058_000;
        assert_eq!(remaining(now + 5_000, now), Some(Duration::from_secs(5)));
        assert_eq!(
            remaining(now - 1_000, now),
            Some(Duration::ZERO),
            "just past: no time"
        );
        assert_eq!(
            remaining(600_000, now),
            None,
            "cargo lambda watch sends the timeout"
        );
        assert_eq!(remaining(0, now), None);
    }
}

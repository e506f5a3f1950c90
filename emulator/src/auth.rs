//! API key authentication: `Authorization: Bearer KEY` or `x-api-key: KEY`.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::errors::DcsError;
use crate::server::AppRef;

/// What the request presented.
#[derive(Debug, PartialEq, Eq)]
pub enum Credential<'a> {
    Missing,
    Keys(Vec<&'a str>),
}

pub fn credentials(headers: &HeaderMap) -> Credential<'_> {
    let mut keys = Vec::new();
    if let Some(v) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let v = v.trim();
        match v.split_once(' ') {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => {
                keys.push(token.trim())
            }
            _ => keys.push(""),
        }
    }
    if let Some(v) = headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
        keys.push(v.trim());
    }
    if keys.is_empty() {
        Credential::Missing
    } else {
        Credential::Keys(keys)
    }
}

pub async fn middleware(State(app): State<AppRef>, req: Request<Body>, next: Next) -> Response {
    match credentials(req.headers()) {
        Credential::Missing => DcsError::new(
            StatusCode::UNAUTHORIZED,
            "AUTH_REQUIRED",
            "missing Dedalus API key",
            false,
        )
        .into_response(),
        Credential::Keys(keys) if keys.iter().any(|k| !k.is_empty() && *k == app.args.api_key) => {
            next.run(req).await
        }
        Credential::Keys(_) => DcsError::new(
            StatusCode::UNAUTHORIZED,
            "AUTH_INVALID",
            "invalid Dedalus API key",
            false,
        )
        .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn reads_both_headers() {
        let mut h = HeaderMap::new();
        assert_eq!(credentials(&h), Credential::Missing);
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer k1"));
        assert_eq!(credentials(&h), Credential::Keys(vec!["k1"]));
        h.insert("x-api-key", HeaderValue::from_static("k2"));
        assert_eq!(credentials(&h), Credential::Keys(vec!["k1", "k2"]));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(credentials(&h), Credential::Keys(vec!["", "k2"]));
    }
}

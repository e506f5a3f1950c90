//! Drift switches applied in front of the routes (after auth, before
//! idempotency): refused wake/sleep, refused terminals, required
//! `If-Match`. Refusals are not stored as idempotent results, so a retry
//! with the same key after a switch is turned off is processed normally;
//! the request log (outermost) records them like any other answer.
//!
//! The other switches act where responses are built: `id_format` in
//! [`crate::lifecycle::create`], `response_shape` in
//! [`crate::routes::mutation_response`].

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::errors::{ApiError, DcsError};
use crate::options::Drift;
use crate::server::AppRef;

/// Message of the field-reported wake/sleep refusal.
pub const ROUTE_SIGNATURE_MESSAGE: &str = "missing internal route signature";
/// Detail of the terminal refusal.
pub const TERMINALS_UNAVAILABLE: &str = "terminals are not available in this API version";

/// What a `/v1` request is, as far as the drift switches care.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Wake,
    Sleep,
    /// `PATCH` or `DELETE /v1/machines/{id}`.
    UpdateOrDelete,
    /// Anything under `/v1/machines/{id}/terminals`.
    Terminals,
    Other,
}

fn classify(method: &Method, path: &str) -> Route {
    let segments: Vec<&str> = path.split('/').collect();
    match segments.as_slice() {
        ["", "v1", "machines", id, "wake"] if !id.is_empty() && method == Method::POST => {
            Route::Wake
        }
        ["", "v1", "machines", id, "sleep"] if !id.is_empty() && method == Method::POST => {
            Route::Sleep
        }
        ["", "v1", "machines", id]
            if !id.is_empty() && matches!(*method, Method::PATCH | Method::DELETE) =>
        {
            Route::UpdateOrDelete
        }
        ["", "v1", "machines", id, "terminals", ..] if !id.is_empty() => Route::Terminals,
        _ => Route::Other,
    }
}

/// The refusal a request gets under `drift`, if any.
fn refusal(drift: &Drift, route: &Route, has_if_match: bool) -> Option<ApiError> {
    let refused = match route {
        Route::Wake => drift.refuse_wake,
        Route::Sleep => drift.refuse_sleep,
        _ => false,
    };
    if refused {
        return Some(
            DcsError::new(
                StatusCode::UNAUTHORIZED,
                "AUTH_INVALID",
                ROUTE_SIGNATURE_MESSAGE,
                false,
            )
            .into(),
        );
    }
    if *route == Route::Terminals {
        let status = drift
            .refuse_terminals
            .status()
            .and_then(|s| StatusCode::from_u16(s).ok());
        if let Some(status) = status {
            return Some(ApiError::problem(status, TERMINALS_UNAVAILABLE));
        }
    }
    let needs_if_match = matches!(route, Route::Wake | Route::Sleep | Route::UpdateOrDelete);
    if drift.require_if_match && needs_if_match && !has_if_match {
        return Some(ApiError::problem(
            StatusCode::PRECONDITION_REQUIRED,
            "If-Match header is required",
        ));
    }
    None
}

pub async fn middleware(State(app): State<AppRef>, req: Request<Body>, next: Next) -> Response {
    let route = classify(req.method(), req.uri().path());
    if route != Route::Other {
        let has_if_match = req.headers().contains_key(header::IF_MATCH);
        if let Some(err) = refusal(&app.drift(), &route, has_if_match) {
            return err.into_response();
        }
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::{IdFormat, RefuseTerminals, ResponseShape};

    fn off() -> Drift {
        Drift {
            refuse_wake: false,
            refuse_sleep: false,
            refuse_terminals: RefuseTerminals::Off,
            id_format: IdFormat::Dm,
            response_shape: ResponseShape::Spec,
            require_if_match: false,
        }
    }

    #[test]
    fn routes() {
        assert_eq!(
            classify(&Method::POST, "/v1/machines/dm-1/wake"),
            Route::Wake
        );
        assert_eq!(
            classify(&Method::GET, "/v1/machines/dm-1/wake"),
            Route::Other
        );
        assert_eq!(
            classify(&Method::POST, "/v1/machines/dm-1/sleep"),
            Route::Sleep
        );
        assert_eq!(
            classify(&Method::PATCH, "/v1/machines/x"),
            Route::UpdateOrDelete
        );
        assert_eq!(
            classify(&Method::DELETE, "/v1/machines/x"),
            Route::UpdateOrDelete
        );
        assert_eq!(classify(&Method::GET, "/v1/machines/x"), Route::Other);
        assert_eq!(
            classify(&Method::POST, "/v1/machines/x/terminals"),
            Route::Terminals
        );
        assert_eq!(
            classify(&Method::GET, "/v1/machines/x/terminals/tm-1/stream"),
            Route::Terminals
        );
        assert_eq!(classify(&Method::POST, "/v1/machines//wake"), Route::Other);
        assert_eq!(
            classify(&Method::POST, "/v1/machines/x/executions"),
            Route::Other
        );
    }

    #[test]
    fn all_off_refuses_nothing() {
        for route in [
            Route::Wake,
            Route::Sleep,
            Route::UpdateOrDelete,
            Route::Terminals,
        ] {
            assert!(refusal(&off(), &route, false).is_none());
        }
    }

    #[test]
    fn switches_refuse_their_routes() {
        let d = Drift {
            refuse_wake: true,
            ..off()
        };
        assert!(matches!(
            refusal(&d, &Route::Wake, true),
            Some(ApiError::Dcs(e)) if e.status == StatusCode::UNAUTHORIZED && !e.retryable
        ));
        assert!(refusal(&d, &Route::Sleep, true).is_none());
        let d = Drift {
            refuse_terminals: RefuseTerminals::NotImplemented,
            ..off()
        };
        assert!(matches!(
            refusal(&d, &Route::Terminals, false),
            Some(ApiError::Problem { status, .. }) if status == StatusCode::NOT_IMPLEMENTED
        ));
        let d = Drift {
            require_if_match: true,
            ..off()
        };
        assert!(refusal(&d, &Route::UpdateOrDelete, true).is_none());
        assert!(matches!(
            refusal(&d, &Route::Sleep, false),
            Some(ApiError::Problem { status, .. }) if status == StatusCode::PRECONDITION_REQUIRED
        ));
    }
}

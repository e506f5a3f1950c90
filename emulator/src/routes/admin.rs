//! `/_emulator` admin routes (no auth): faults, request log, timing config,
//! health.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::json;

use super::json_response;
use crate::errors::{parse_json, ApiError};
use crate::faults::FaultSpec;
use crate::options::{ConfigPatch, Drift, Timing};
use crate::server::AppRef;
use crate::store::RecordKey;

pub async fn health() -> Response {
    json_response(StatusCode::OK, &json!({"ok": true}))
}

pub async fn add_fault(State(app): State<AppRef>, body: Bytes) -> Result<Response, ApiError> {
    let spec: FaultSpec = parse_json(&body)?;
    spec.validate()?;
    let id = app.faults().add(spec);
    Ok(json_response(StatusCode::OK, &json!({"fault_id": id})))
}

pub async fn list_faults(State(app): State<AppRef>) -> Response {
    let faults = app.faults().list();
    json_response(
        StatusCode::OK,
        &serde_json::to_value(faults).unwrap_or_default(),
    )
}

pub async fn clear_faults(State(app): State<AppRef>) -> Response {
    app.faults().clear();
    json_response(StatusCode::OK, &json!({"ok": true}))
}

pub async fn requests(
    State(app): State<AppRef>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let since = match q.get("since").map(|s| s.trim()).filter(|s| !s.is_empty()) {
        None => 0,
        Some(s) => s
            .parse::<u64>()
            .map_err(|_| ApiError::bad_request(format!("invalid since {s:?}")))?,
    };
    let entries = app.reqlog().since(since);
    Ok(json_response(
        StatusCode::OK,
        &serde_json::to_value(entries).unwrap_or_default(),
    ))
}

/// Timing knobs and drift switches as one JSON object.
fn config_json(timing: Timing, drift: Drift) -> serde_json::Value {
    let mut v = serde_json::to_value(timing).unwrap_or_default();
    if let (Some(obj), Ok(serde_json::Value::Object(d))) =
        (v.as_object_mut(), serde_json::to_value(drift))
    {
        obj.extend(d);
    }
    v
}

pub async fn get_config(State(app): State<AppRef>) -> Response {
    json_response(StatusCode::OK, &config_json(app.timing(), app.drift()))
}

/// Changes timing knobs and drift switches; the whole patch is checked
/// before anything changes (422 on an invalid value).
pub async fn patch_config(State(app): State<AppRef>, body: Bytes) -> Result<Response, ApiError> {
    let patch: ConfigPatch = parse_json(&body)?;
    let (patch, drift_patch) = patch.split().map_err(ApiError::unprocessable)?;
    let drift = app.update_drift(|d| d.apply(&drift_patch));
    let hold_changed = patch.hold_window_ms.is_some() || patch.hold_jitter_ms.is_some();
    let timing = app.update_timing(|t| t.apply(patch));
    if hold_changed {
        // A changed hold window applies to machines already running, as if
        // they had woken under it (jitter capped by the new maximum).
        let mut st = app.state();
        let mut changed = Vec::new();
        for m in st.machines.values_mut() {
            if let (Some(since), Some(_)) = (m.running_since_ms, m.hold_until_ms) {
                m.hold_window_ms = timing.hold_window_ms;
                m.hold_jitter_ms = m.hold_jitter_ms.min(timing.hold_jitter_ms);
                let hold = timing.hold_window_ms.saturating_add(m.hold_jitter_ms);
                m.hold_until_ms =
                    Some(since.saturating_add(i64::try_from(hold).unwrap_or(i64::MAX)));
                changed.push(RecordKey::machine(&m.id));
            }
        }
        for key in changed {
            st.mark(key);
        }
    }
    Ok(json_response(StatusCode::OK, &config_json(timing, drift)))
}

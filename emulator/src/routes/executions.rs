//! Execution routes: create, list, get, cancel, output, events.

use std::collections::{BTreeMap, HashMap};

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;

use super::{check_env, json_response, list_of, record_or_404, usable_machine};
use crate::errors::{parse_json, ApiError};
use crate::exec::{self, ExecSpec};
use crate::pagination::{encode_cursor, page_body, page_request, paginate, window};
use crate::server::AppRef;
use crate::state::{ExecStatus, Execution, Phase};
use crate::store::RecordKey;
use crate::util::{execution_id, now_ms};
use crate::views;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateExecutionBody {
    command: Option<Vec<String>>,
    #[serde(default)]
    cwd: Option<String>,
    #[serde(default)]
    env: Option<BTreeMap<String, String>>,
    #[serde(default)]
    stdin: Option<String>,
    #[serde(default)]
    timeout_ms: Option<i64>,
}

/// Renders an execution of a machine with `view` (under the state lock,
/// without copying its output), or 404.
fn view_execution(
    app: &AppRef,
    machine_id: &str,
    execution_id: &str,
    view: impl FnOnce(&Execution) -> serde_json::Value,
) -> Result<serde_json::Value, ApiError> {
    record_or_404(&app.state(), machine_id, execution_id).map(view)
}

pub async fn create(
    State(app): State<AppRef>,
    Path(machine_id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let spec = exec_spec(parse_json(&body)?)?;
    let id = execution_id();
    let record = record_execution(&app, &id, &machine_id, &spec)?;
    app.touch_activity(&machine_id);
    exec::start(&app, id, machine_id, spec);
    // The idempotency layer around every POST flushes this record together
    // with the stored response (one write batch per request).
    Ok(json_response(StatusCode::OK, &views::execution(&record)))
}

/// The request checked: a non-empty argv without NUL, a valid environment,
/// a positive timeout.
fn exec_spec(req: CreateExecutionBody) -> Result<ExecSpec, ApiError> {
    let command = req.command.unwrap_or_default();
    if command.is_empty() || command[0].is_empty() {
        return Err(ApiError::unprocessable(
            "command must be a non-empty argv array",
        ));
    }
    if command.iter().any(|a| a.contains('\0')) {
        return Err(ApiError::unprocessable(
            "command arguments must not contain NUL",
        ));
    }
    let env = req.env.unwrap_or_default();
    check_env(&env)?;
    let timeout_ms = match req.timeout_ms {
        None => None,
        Some(t) if t > 0 => u64::try_from(t).ok(),
        Some(_) => return Err(ApiError::unprocessable("timeout_ms must be positive")),
    };
    Ok(ExecSpec {
        command,
        cwd: req.cwd,
        env,
        stdin: req.stdin,
        timeout_ms,
    })
}

/// Records a new execution of a usable machine: `queued` when it runs,
/// else `wake_in_progress`.
fn record_execution(
    app: &AppRef,
    id: &str,
    machine_id: &str,
    spec: &ExecSpec,
) -> Result<Execution, ApiError> {
    let mut st = app.state();
    let phase = usable_machine(&st, machine_id)?.phase;
    let seq = st.next_seq();
    let status = if phase == Phase::Running {
        ExecStatus::Queued
    } else {
        ExecStatus::WakeInProgress
    };
    let mut e = Execution {
        cwd: spec.cwd.clone().unwrap_or_else(|| "/root".to_owned()),
        env_keys: spec.env.keys().cloned().collect(),
        status,
        ..Execution::new(
            id.to_owned(),
            machine_id.to_owned(),
            seq,
            spec.command.clone(),
            now_ms(),
        )
    };
    e.set_status(status);
    // The per-machine cap is enforced by the pruner, off this path.
    st.insert_execution(e.clone());
    Ok(e)
}

pub async fn list(
    State(app): State<AppRef>,
    Path(machine_id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    list_of(&app, &machine_id, &q, views::execution)
}

pub async fn get_one(
    State(app): State<AppRef>,
    Path((machine_id, execution_id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let v = view_execution(&app, &machine_id, &execution_id, views::execution)?;
    Ok(json_response(StatusCode::OK, &v))
}

/// Cancels a queued or running execution (no-op once it ended).
pub async fn delete(
    State(app): State<AppRef>,
    Path((machine_id, execution_id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    record_or_404::<Execution>(&app.state(), &machine_id, &execution_id)?;
    let cancelled = {
        let mut st = app.state();
        let cancelled = st.executions.get_mut(&execution_id).is_some_and(|e| {
            e.finish(
                ExecStatus::Cancelled,
                Some((
                    "EXECUTION_CANCELLED",
                    "the execution was cancelled".to_owned(),
                )),
            )
        });
        if cancelled {
            st.mark(RecordKey::execution(&execution_id));
        }
        cancelled
    };
    if cancelled {
        let tx = app.rt().exec_cancel.remove(&execution_id);
        if let Some(tx) = tx {
            let _ = tx.send(());
        }
        app.touch_activity(&machine_id);
        app.persist().await;
    }
    let v = view_execution(&app, &machine_id, &execution_id, views::execution)?;
    Ok(json_response(StatusCode::OK, &v))
}

pub async fn output(
    State(app): State<AppRef>,
    Path((machine_id, execution_id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let v = view_execution(&app, &machine_id, &execution_id, views::output)?;
    Ok(json_response(StatusCode::OK, &v))
}

pub async fn events(
    State(app): State<AppRef>,
    Path((machine_id, execution_id)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let page = page_request(&q, 100, 1000)?;
    let items = {
        let st = app.state();
        let e: &Execution = record_or_404(&st, &machine_id, &execution_id)?;
        let first = e.events.partition_point(|ev| ev.sequence <= page.after);
        let events = e.events[first..].iter().map(|ev| (ev.sequence, ev));
        window(events, page, |ev| views::event(e, ev))
    };
    // Events keep coming while the execution runs, so a non-empty page
    // always carries a cursor to resume from; an empty page ends the walk.
    let last = items
        .iter()
        .map(|(seq, _)| *seq)
        .filter(|seq| *seq > page.after)
        .take(page.limit)
        .last();
    let (items, _) = paginate(items, page);
    Ok(json_response(
        StatusCode::OK,
        &page_body(items, last.map(encode_cursor)),
    ))
}

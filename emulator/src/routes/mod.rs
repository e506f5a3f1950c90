//! HTTP routes: `/v1` (authenticated, idempotent mutations, faults, request
//! log) and `/_emulator` (admin, no auth).

pub mod admin;
pub mod executions;
pub mod machines;
pub mod status_stream;
pub mod terminals;

use std::collections::{BTreeMap, HashMap};

use axum::extract::DefaultBodyLimit;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::from_fn_with_state;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::Value;

use crate::errors::ApiError;
use crate::options::ResponseShape;
use crate::pagination::{self, PageRequest};
use crate::server::AppRef;
use crate::state::{Execution, Machine, Phase, State, Terminal};
use crate::{auth, drift, faults, idempotency, reqlog, views};

/// The whole application router: one table of every route and the
/// middleware order, long because it lists them all.
pub fn router(app: AppRef) -> Router {
    let v1 = Router::new()
        .route("/v1/machines", post(machines::create).get(machines::list))
        .route(
            "/v1/machines/{machine_id}",
            get(machines::get_one)
                .patch(machines::patch)
                .delete(machines::delete),
        )
        .route("/v1/machines/{machine_id}/wake", post(machines::wake))
        .route("/v1/machines/{machine_id}/sleep", post(machines::sleep))
        .route(
            "/v1/machines/{machine_id}/status/stream",
            get(status_stream::stream),
        )
        .route(
            "/v1/machines/{machine_id}/executions",
            post(executions::create).get(executions::list),
        )
        .route(
            "/v1/machines/{machine_id}/executions/{execution_id}",
            get(executions::get_one).delete(executions::delete),
        )
        .route(
            "/v1/machines/{machine_id}/executions/{execution_id}/output",
            get(executions::output),
        )
        .route(
            "/v1/machines/{machine_id}/executions/{execution_id}/events",
            get(executions::events),
        )
        .route(
            "/v1/machines/{machine_id}/terminals",
            post(terminals::create).get(terminals::list),
        )
        .route(
            "/v1/machines/{machine_id}/terminals/{terminal_id}",
            get(terminals::get_one).delete(terminals::delete),
        )
        .route(
            "/v1/machines/{machine_id}/terminals/{terminal_id}/stream",
            get(terminals::connect),
        )
        // Innermost first: idempotency, then drift switches, then auth, then
        // faults, then the log.
        .layer(from_fn_with_state(app.clone(), idempotency::middleware))
        .layer(from_fn_with_state(app.clone(), drift::middleware))
        .layer(from_fn_with_state(app.clone(), auth::middleware))
        .layer(from_fn_with_state(app.clone(), faults::middleware))
        .layer(from_fn_with_state(app.clone(), reqlog::middleware));

    let admin = Router::new()
        .route("/_emulator/health", get(admin::health))
        .route(
            "/_emulator/faults",
            post(admin::add_fault)
                .get(admin::list_faults)
                .delete(admin::clear_faults),
        )
        .route("/_emulator/requests", get(admin::requests))
        .route(
            "/_emulator/config",
            get(admin::get_config).patch(admin::patch_config),
        );

    Router::new()
        .merge(v1)
        .merge(admin)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(idempotency::MAX_BODY * 2))
        .with_state(app)
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::problem(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed on this route",
    )
}

/// A JSON response.
pub fn json_response(status: StatusCode, body: &Value) -> Response {
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body.to_string(),
    )
        .into_response()
}

/// A machine response with its `ETag`; 200 when converged, else 202 (or
/// always 200 with `always_ok`).
pub fn machine_response(m: &Machine, always_ok: bool) -> Response {
    machine_response_with(m, always_ok, views::lifecycle(m))
}

/// A mutation's machine response (create, update, wake, sleep, delete) in
/// the shape the `response_shape` switch selects.
pub fn mutation_response(app: &AppRef, m: &Machine) -> Response {
    let body = match app.drift().response_shape {
        ResponseShape::Spec => views::lifecycle(m),
        ResponseShape::Newer => views::lifecycle_newer(m),
    };
    machine_response_with(m, false, body)
}

fn machine_response_with(m: &Machine, always_ok: bool, body: Value) -> Response {
    let status = if always_ok || m.converged() {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    let mut resp = json_response(status, &body);
    if let Ok(v) = HeaderValue::from_str(&format!("\"{}\"", m.revision)) {
        resp.headers_mut().insert(header::ETAG, v);
    }
    resp
}

pub fn if_match(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::IF_MATCH)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// A list response: one page of `items` (see [`pagination::paginate`]).
pub fn list_response(items: Vec<(u64, Value)>, page: PageRequest) -> Response {
    let (items, next) = pagination::paginate(items, page);
    json_response(StatusCode::OK, &pagination::page_body(items, next))
}

/// The machine, or 404 (destroyed machines are gone).
pub fn machine_or_404<'a>(st: &'a State, id: &str) -> Result<&'a Machine, ApiError> {
    st.live_machine(id)
        .ok_or_else(|| ApiError::machine_not_found(id))
}

/// A record that belongs to one machine: an execution, a terminal.
pub trait OfMachine: Sized + 'static {
    /// What a 404 calls it.
    const KIND: &'static str;
    fn machine_id(&self) -> &str;
    /// Every record of this kind.
    fn all(st: &State) -> &HashMap<String, Self>;
    /// A machine's records in creation order, after sequence `after`.
    fn of_machine<'a>(
        st: &'a State,
        machine_id: &str,
        after: u64,
    ) -> impl Iterator<Item = (u64, &'a Self)> + 'a;
}

impl OfMachine for Execution {
    const KIND: &'static str = "execution";
    fn machine_id(&self) -> &str {
        &self.machine_id
    }
    fn all(st: &State) -> &HashMap<String, Self> {
        &st.executions
    }
    fn of_machine<'a>(
        st: &'a State,
        machine_id: &str,
        after: u64,
    ) -> impl Iterator<Item = (u64, &'a Self)> + 'a {
        st.executions_of(machine_id, after)
    }
}

impl OfMachine for Terminal {
    const KIND: &'static str = "terminal";
    fn machine_id(&self) -> &str {
        &self.machine_id
    }
    fn all(st: &State) -> &HashMap<String, Self> {
        &st.terminals
    }
    fn of_machine<'a>(
        st: &'a State,
        machine_id: &str,
        after: u64,
    ) -> impl Iterator<Item = (u64, &'a Self)> + 'a {
        st.terminals_of(machine_id, after)
    }
}

/// Record `id` of machine `machine_id`, or 404: the machine is gone, or it
/// has no such record.
pub fn record_or_404<'a, T: OfMachine>(
    st: &'a State,
    machine_id: &str,
    id: &str,
) -> Result<&'a T, ApiError> {
    machine_or_404(st, machine_id)?;
    T::all(st)
        .get(id)
        .filter(|r| r.machine_id() == machine_id)
        .ok_or_else(|| ApiError::not_found(format!("{} {id} not found", T::KIND)))
}

/// `GET …/{kind}s`: a page of a machine's records (404 when the machine is
/// gone), each shown with `view`.
pub fn list_of<T: OfMachine>(
    app: &AppRef,
    machine_id: &str,
    query: &HashMap<String, String>,
    view: impl Fn(&T) -> Value,
) -> Result<Response, ApiError> {
    let page = pagination::page_request(query, 50, 100)?;
    let items = {
        let st = app.state();
        machine_or_404(&st, machine_id)?;
        pagination::window(T::of_machine(&st, machine_id, page.after), page, view)
    };
    Ok(list_response(items, page))
}

/// 422 unless every environment variable has a name without `=` and NUL
/// and a value without NUL.
pub fn check_env(env: &BTreeMap<String, String>) -> Result<(), ApiError> {
    for (k, v) in env {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(ApiError::unprocessable(format!(
                "invalid environment variable {k:?}"
            )));
        }
    }
    Ok(())
}

/// Machines that can take new work (executions, terminals): not being
/// destroyed or failed.
pub fn usable_machine<'a>(st: &'a State, id: &str) -> Result<&'a Machine, ApiError> {
    let m = machine_or_404(st, id)?;
    if matches!(m.phase, Phase::Destroying | Phase::Failed) {
        return Err(
            ApiError::invalid_state("the machine is being destroyed or has failed", None)
                .detail(
                    "current_observed_state",
                    views::lifecycle(m)["status"]["phase"]
                        .as_str()
                        .unwrap_or_default(),
                )
                .into(),
        );
    }
    Ok(m)
}

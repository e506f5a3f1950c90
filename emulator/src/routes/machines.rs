//! Machine lifecycle routes: create, list, get, update, wake, sleep, delete.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use serde::Deserialize;

use super::{if_match, list_response, machine_or_404, machine_response, mutation_response};
use crate::errors::{parse_json, ApiError};
use crate::lifecycle::{self, MachineUpdate, NewMachine, SleepCause};
use crate::options::parse_autosleep;
use crate::pagination::{page_request, window};
use crate::server::AppRef;
use crate::views;

/// `autosleep` as a duration string (or, leniently, a number of seconds).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Autosleep {
    Text(String),
    Seconds(u64),
}

impl Autosleep {
    fn seconds(&self) -> Result<u64, ApiError> {
        match self {
            Self::Text(s) => parse_autosleep(s).map_err(ApiError::unprocessable),
            Self::Seconds(n) => Ok(*n),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateMachineBody {
    vcpu: f64,
    memory_mib: i64,
    storage_gib: i64,
    #[serde(default)]
    autosleep: Option<Autosleep>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateMachineBody {
    #[serde(default)]
    vcpu: Option<f64>,
    #[serde(default)]
    memory_mib: Option<i64>,
    #[serde(default)]
    storage_gib: Option<i64>,
    #[serde(default)]
    autosleep: Option<Autosleep>,
}

fn check_size(
    vcpu: Option<f64>,
    memory_mib: Option<i64>,
    storage_gib: Option<i64>,
) -> Result<(), ApiError> {
    if let Some(v) = vcpu {
        if !v.is_finite() || v <= 0.0 || v > 1024.0 {
            return Err(ApiError::unprocessable(
                "vcpu must be a number in (0, 1024]",
            ));
        }
    }
    if memory_mib.is_some_and(|m| m <= 0) {
        return Err(ApiError::unprocessable("memory_mib must be positive"));
    }
    if storage_gib.is_some_and(|s| s <= 0) {
        return Err(ApiError::unprocessable("storage_gib must be positive"));
    }
    Ok(())
}

pub async fn create(State(app): State<AppRef>, body: Bytes) -> Result<Response, ApiError> {
    let req: CreateMachineBody = parse_json(&body)?;
    check_size(Some(req.vcpu), Some(req.memory_mib), Some(req.storage_gib))?;
    let autosleep_seconds = match &req.autosleep {
        Some(a) => a.seconds()?,
        None => app.args.default_autosleep,
    };
    let m = lifecycle::create(
        &app,
        NewMachine {
            vcpu: req.vcpu,
            memory_mib: req.memory_mib,
            storage_gib: req.storage_gib,
            autosleep_seconds,
        },
    )
    .await;
    Ok(mutation_response(&app, &m))
}

pub async fn list(
    State(app): State<AppRef>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let page = page_request(&q, 50, 100)?;
    let items = {
        let st = app.state();
        let mut ms: Vec<_> = st
            .machines
            .values()
            .filter(|m| m.phase != crate::state::Phase::Destroyed)
            .collect();
        ms.sort_by_key(|m| m.seq);
        window(ms.into_iter().map(|m| (m.seq, m)), page, views::list_item)
    };
    Ok(list_response(items, page))
}

pub async fn get_one(
    State(app): State<AppRef>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let m = machine_or_404(&app.state(), &id)?.clone();
    Ok(machine_response(&m, true))
}

pub async fn patch(
    State(app): State<AppRef>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: UpdateMachineBody = parse_json(&body)?;
    check_size(req.vcpu, req.memory_mib, req.storage_gib)?;
    let autosleep_seconds = req.autosleep.as_ref().map(Autosleep::seconds).transpose()?;
    let m = lifecycle::update(
        &app,
        &id,
        if_match(&headers).as_deref(),
        MachineUpdate {
            vcpu: req.vcpu,
            memory_mib: req.memory_mib,
            storage_gib: req.storage_gib,
            autosleep_seconds,
        },
    )
    .await?;
    Ok(mutation_response(&app, &m))
}

pub async fn wake(
    State(app): State<AppRef>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let m = lifecycle::wake(&app, &id, if_match(&headers).as_deref()).await?;
    Ok(mutation_response(&app, &m))
}

pub async fn sleep(
    State(app): State<AppRef>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let m = lifecycle::sleep(&app, &id, if_match(&headers).as_deref(), SleepCause::Api).await?;
    Ok(mutation_response(&app, &m))
}

pub async fn delete(
    State(app): State<AppRef>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let m = lifecycle::destroy(&app, &id, if_match(&headers).as_deref()).await?;
    Ok(mutation_response(&app, &m))
}

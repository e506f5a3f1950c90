//! A recorded-response stand-in for the Dedalus Machines API, in-process on
//! loopback, for the sweep benchmarks and the cost simulator: the machines
//! routes the sweep uses (`GET /v1/machines/{id}`, `POST …/sleep`,
//! `POST …/wake`) answered with canned bodies in the API's shape, with an
//! optional platform model on a virtual clock (post-wake hold window,
//! autosleep) and billing (awake time per machine). Every other route is 404.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// One machine as the platform sees it.
#[derive(Debug, Clone, Copy, Default)]
pub struct MachineModel {
    /// Running (billed) or sleeping.
    pub awake: bool,
    /// Virtual ms when it last reached running.
    pub running_since: u64,
    /// Virtual ms of its last activity (for autosleep).
    pub last_activity: u64,
    /// Billed awake ms so far (closed intervals).
    pub billed_ms: u64,
}

/// The platform model.
#[derive(Debug, Default)]
pub struct Platform {
    /// Virtual clock (epoch ms); 0 = use the wall clock.
    pub clock: AtomicU64,
    /// Hold window after reaching running, ms (0 = none).
    pub hold_ms: u64,
    /// Autosleep after this much inactivity, ms (0 = off).
    pub autosleep_ms: u64,
    /// Machines (unknown ids are running since 0, so the hold has passed).
    pub machines: Mutex<HashMap<String, MachineModel>>,
    /// Every request.
    pub calls: AtomicU64,
    /// Sleep requests.
    pub sleep_calls: AtomicU64,
    /// Sleep requests refused by the hold window.
    pub hold_refusals: AtomicU64,
    /// Status reads.
    pub get_calls: AtomicU64,
}

impl Platform {
    /// Now, virtual if set.
    pub fn now(&self) -> u64 {
        match self.clock.load(Ordering::SeqCst) {
            0 => agenthome::clock::now_ms(),
            t => t,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, MachineModel>> {
        self.machines.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Apply autosleep up to `now` to one machine.
    fn settle(&self, m: &mut MachineModel, now: u64) {
        if m.awake && self.autosleep_ms > 0 {
            let at = m.last_activity + self.autosleep_ms;
            if at <= now {
                m.awake = false;
                m.billed_ms += at.saturating_sub(m.running_since);
            }
        }
    }

    /// Register or wake `id` at `now` with activity (a turn on the machine).
    pub fn activity(&self, id: &str, now: u64) {
        let mut ms = self.lock();
        let m = ms.entry(id.to_string()).or_default();
        self.settle(m, now);
        if !m.awake {
            m.awake = true;
            m.running_since = now;
        }
        m.last_activity = now;
    }

    /// Billed ms of `id` up to `now` (closing an open interval at `now`).
    pub fn billed(&self, id: &str, now: u64) -> u64 {
        let mut ms = self.lock();
        let Some(m) = ms.get_mut(id) else { return 0 };
        self.settle(m, now);
        m.billed_ms + if m.awake { now - m.running_since } else { 0 }
    }

    fn body(id: &str, m: &MachineModel) -> serde_json::Value {
        let phase = if m.awake { "running" } else { "sleeping" };
        json!({
            "machine_id": id, "vcpu": 1, "memory_mib": 1024, "storage_gib": 10,
            "desired_state": phase, "phase": phase, "revision": "1", "autosleep_seconds": 1800
        })
    }
}

async fn get_machine(State(p): State<Arc<Platform>>, Path(id): Path<String>) -> Response {
    p.calls.fetch_add(1, Ordering::Relaxed);
    p.get_calls.fetch_add(1, Ordering::Relaxed);
    let now = p.now();
    let mut ms = p.lock();
    let m = ms.entry(id.clone()).or_insert(MachineModel {
        awake: true,
        ..MachineModel::default()
    });
    p.settle(m, now);
    Json(Platform::body(&id, m)).into_response()
}

async fn sleep(State(p): State<Arc<Platform>>, Path(id): Path<String>) -> Response {
    p.calls.fetch_add(1, Ordering::Relaxed);
    p.sleep_calls.fetch_add(1, Ordering::Relaxed);
    let now = p.now();
    let mut ms = p.lock();
    let m = ms.entry(id.clone()).or_insert(MachineModel {
        awake: true,
        ..MachineModel::default()
    });
    p.settle(m, now);
    if m.awake {
        let until = m.running_since + p.hold_ms;
        if p.hold_ms > 0 && now < until {
            p.hold_refusals.fetch_add(1, Ordering::Relaxed);
            let body = json!({
                "error_code": "SLEEP_HOLD_WINDOW_ACTIVE",
                "message": "sleep hold window is active",
                "retryable": true,
                "retry_after_ms": until - now,
                "details": {"next_sleep_eligible_at": until}
            });
            return (StatusCode::CONFLICT, Json(body)).into_response();
        }
        m.awake = false;
        m.billed_ms += now.saturating_sub(m.running_since);
    }
    Json(Platform::body(&id, m)).into_response()
}

async fn wake(State(p): State<Arc<Platform>>, Path(id): Path<String>) -> Response {
    p.calls.fetch_add(1, Ordering::Relaxed);
    let now = p.now();
    drop(p.lock());
    p.activity(&id, now);
    let ms = p.lock();
    let m = ms.get(&id).copied().unwrap_or_default();
    Json(Platform::body(&id, &m)).into_response()
}

async fn other() -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({"error_code": "NOT_FOUND", "message": "not in the stand-in", "retryable": false})),
    )
        .into_response()
}

/// A running stand-in.
pub struct StandIn {
    /// `http://127.0.0.1:PORT`
    pub base_url: String,
    /// The model.
    pub platform: Arc<Platform>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl StandIn {
    /// Serve `platform` on a free loopback port.
    pub async fn start(platform: Platform) -> StandIn {
        let platform = Arc::new(platform);
        let app = Router::new()
            .route("/v1/machines/{id}", get(get_machine))
            .route("/v1/machines/{id}/sleep", post(sleep))
            .route("/v1/machines/{id}/wake", post(wake))
            .fallback(other)
            .with_state(Arc::clone(&platform));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        StandIn {
            base_url: format!("http://{addr}"),
            platform,
            task,
        }
    }

    /// A Dedalus client for this stand-in.
    pub fn client(&self) -> agenthome::dedalus::Client {
        let url = agenthome::dedalus::Url::parse(&self.base_url).expect("url");
        let config = agenthome::dedalus::ClientConfig::new(url, "bench-key".into());
        agenthome::dedalus::Client::new(config).expect("client")
    }
}

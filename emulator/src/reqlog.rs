//! The log of every `/v1` request, for `GET /_emulator/requests`.

use std::collections::VecDeque;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::errors::ApiError;
use crate::server::AppRef;

/// Entries kept (oldest dropped first).
const CAPACITY: usize = 100_000;

#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    pub seq: u64,
    pub method: String,
    pub path: String,
    pub idempotency_key: Option<String>,
    pub status: u16,
}

#[derive(Default)]
pub struct RequestLog {
    next_seq: u64,
    entries: VecDeque<Entry>,
}

impl RequestLog {
    pub fn push(
        &mut self,
        method: String,
        path: String,
        idempotency_key: Option<String>,
        status: u16,
    ) {
        self.next_seq += 1;
        self.entries.push_back(Entry {
            seq: self.next_seq,
            method,
            path,
            idempotency_key,
            status,
        });
        while self.entries.len() > CAPACITY {
            self.entries.pop_front();
        }
    }

    pub fn since(&self, seq: u64) -> Vec<Entry> {
        self.entries
            .iter()
            .filter(|e| e.seq > seq)
            .cloned()
            .collect()
    }
}

/// Records each request with the status it was answered with.
///
/// The request is processed on its own task, so a client that gives up
/// (timeout, dropped connection) does not cancel it: like a real server,
/// the mutation still completes, its idempotency record is stored, and the
/// request is logged.
pub async fn middleware(State(app): State<AppRef>, req: Request<Body>, next: Next) -> Response {
    let method = req.method().as_str().to_owned();
    let path = req.uri().path().to_owned();
    let key = req
        .headers()
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let task = tokio::spawn(async move {
        let resp = next.run(req).await;
        app.reqlog().push(method, path, key, resp.status().as_u16());
        resp
    });
    match task.await {
        Ok(resp) => resp,
        Err(e) => {
            tracing::error!(error = %e, "request task failed");
            ApiError::problem(StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response()
        }
    }
}

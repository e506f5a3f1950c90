//! `GET …/status/stream`: Server-Sent Events of the machine's lifecycle.
//! `event: status`, `id: <revision>`, data = the full LifecycleResponse. The
//! first event is sent at once (unless `Last-Event-ID` names the current
//! revision); the stream ends once the phase is the desired state's or
//! `failed`.

use std::convert::Infallible;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use tokio::sync::watch;

use super::machine_or_404;
use crate::errors::ApiError;
use crate::server::AppRef;
use crate::state::Phase;
use crate::views;

struct Cursor {
    app: AppRef,
    id: String,
    rx: watch::Receiver<u64>,
    last_revision: Option<String>,
    done: bool,
}

pub async fn stream(
    State(app): State<AppRef>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    machine_or_404(&app.state(), &id)?;
    let last_revision = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty());
    let cursor = Cursor {
        rx: app.changed.subscribe(),
        app,
        id,
        last_revision,
        done: false,
    };
    let events = futures_util::stream::unfold(cursor, |mut c| async move {
        if c.done {
            return None;
        }
        loop {
            let machine = c.app.state().machines.get(&c.id).cloned()?;
            let finished = machine.converged() || machine.phase == Phase::Failed;
            let revision = machine.revision_str();
            if c.last_revision.as_deref() != Some(revision.as_str()) {
                c.last_revision = Some(revision.clone());
                c.done = finished;
                let event = Event::default()
                    .event("status")
                    .id(revision)
                    .data(views::lifecycle(&machine).to_string());
                return Some((Ok::<_, Infallible>(event), c));
            }
            if finished {
                return None;
            }
            if c.rx.changed().await.is_err() {
                return None;
            }
        }
    });
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response())
}

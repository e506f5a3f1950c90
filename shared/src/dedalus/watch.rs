//! Waiting for a machine phase: the SSE status stream
//! (`GET …/status/stream`, `event: status`, resumable with `Last-Event-ID`)
//! with a polling fallback when the stream fails or closes early.

use std::time::Duration;

use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use tokio::time::Instant;

use super::client::Client;
use super::error::{ApiError, Error, Result};
use super::types::{Machine, Phase};

const OPERATION: &str = "machines.wait_until";
/// Stream (re)connections before falling back to polling for good.
const MAX_STREAM_ATTEMPTS: u32 = 3;
const POLL_START: Duration = Duration::from_millis(100);
const POLL_MAX: Duration = Duration::from_secs(2);

/// How one stream connection ended.
enum StreamEnd {
    /// A matching status event arrived.
    Reached(Machine),
    /// The stream ended or broke before the target.
    Closed,
    /// The stream could not be opened (or is unsupported).
    Failed(Error),
}

impl Client {
    /// Waits until machine `machine_id` is in phase `target`, or `deadline`
    /// passes ([`Error::DeadlineExceeded`]). Follows the status stream and
    /// falls back to polling `GET /v1/machines/{id}`. Fails early with
    /// [`Error::UnexpectedPhase`] when the machine fails or is destroyed
    /// while waiting for another phase. Waiting for [`Phase::Destroyed`]
    /// also succeeds on a 404.
    pub async fn wait_until(
        &self,
        machine_id: &str,
        target: Phase,
        deadline: Instant,
    ) -> Result<Machine> {
        let client = self.with_deadline(deadline);
        let mut last_seen: Option<Machine> = None;
        if let Some(m) = client
            .follow_streams(machine_id, &target, deadline, &mut last_seen)
            .await?
        {
            return Ok(m);
        }
        client
            .poll_until(machine_id, &target, deadline, &mut last_seen)
            .await
    }

    /// Follow the status stream, resuming it after an early close (at most
    /// [`MAX_STREAM_ATTEMPTS`] times): the machine once in `target`, or
    /// `None` when the stream is unavailable or used up (then poll).
    async fn follow_streams(
        &self,
        machine_id: &str,
        target: &Phase,
        deadline: Instant,
        last_seen: &mut Option<Machine>,
    ) -> Result<Option<Machine>> {
        let mut last_event_id: Option<String> = None;
        for attempt in 1..=MAX_STREAM_ATTEMPTS {
            if Instant::now() >= deadline {
                break;
            }
            let end = self
                .follow_stream(machine_id, target, &mut last_event_id, last_seen, deadline)
                .await;
            match end {
                StreamEnd::Reached(m) => return Ok(Some(m)),
                StreamEnd::Failed(err) => {
                    tracing::debug!(machine_id, error = %err, "status stream unavailable; polling");
                    break;
                }
                StreamEnd::Closed => {
                    if let Some(m) = last_seen.as_ref() {
                        check_dead_end(m, target)?;
                    }
                    tracing::debug!(machine_id, attempt, "status stream closed early");
                    // The stream closes once the desired state is reached,
                    // which may not be the target: look before resuming.
                    if let Some(m) = self.poll_once(machine_id, target, last_seen).await? {
                        return Ok(Some(m));
                    }
                }
            }
        }
        Ok(None)
    }

    /// Poll `GET /v1/machines/{id}` with growing intervals until the
    /// machine is in `target` or `deadline` passes.
    async fn poll_until(
        &self,
        machine_id: &str,
        target: &Phase,
        deadline: Instant,
        last_seen: &mut Option<Machine>,
    ) -> Result<Machine> {
        let mut interval = POLL_START;
        let mut polls = 0u32;
        loop {
            polls += 1;
            if let Some(m) = self
                .poll_once(machine_id, target, last_seen)
                .await
                .map_err(|e| match e {
                    Error::DeadlineExceeded { last_error, .. } => Error::DeadlineExceeded {
                        operation: OPERATION,
                        attempts: polls,
                        last_error,
                    },
                    other => other,
                })?
            {
                return Ok(m);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::DeadlineExceeded {
                    operation: OPERATION,
                    attempts: polls,
                    last_error: None,
                });
            }
            tokio::time::sleep(interval.min(deadline - now)).await;
            interval = (interval * 3 / 2).min(POLL_MAX);
        }
    }

    /// One GET: `Some` when the target is reached, `None` to keep waiting.
    async fn poll_once(
        &self,
        machine_id: &str,
        target: &Phase,
        last_seen: &mut Option<Machine>,
    ) -> Result<Option<Machine>> {
        match self.get_machine(machine_id).await {
            Ok(m) => {
                let reached = m.phase == *target;
                if !reached {
                    check_dead_end(&m, target)?;
                }
                *last_seen = Some(m.clone());
                Ok(reached.then_some(m))
            }
            Err(e) if e.is_not_found() && *target == Phase::Destroyed => {
                let mut m = last_seen.take().unwrap_or_else(|| Machine {
                    machine_id: machine_id.to_owned(),
                    ..Machine::default()
                });
                m.phase = Phase::Destroyed;
                Ok(Some(m))
            }
            Err(e) => Err(e),
        }
    }

    /// Open one connection of the status stream (resuming after
    /// `last_event_id`): the response once the server accepted it.
    async fn open_stream(
        &self,
        machine_id: &str,
        last_event_id: Option<&str>,
        deadline: Instant,
    ) -> Result<reqwest::Response> {
        let url = self.url(&["machines", machine_id, "status", "stream"])?;
        let mut req = self
            .http()
            .get(url)
            .headers(self.auth_headers().clone())
            .header(http::header::ACCEPT, "text/event-stream")
            .timeout(deadline.saturating_duration_since(Instant::now()));
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id);
        }
        crate::metrics::dedalus_request();
        let resp = req.send().await.map_err(|source| Error::Transport {
            operation: OPERATION,
            source,
        })?;
        let status = resp.status();
        tracing::debug!(machine_id, status = status.as_u16(), "status stream opened");
        if !status.is_success() {
            let headers = resp.headers().clone();
            let body = resp.bytes().await.unwrap_or_default();
            return Err(ApiError::from_response(OPERATION, status, &headers, &body).into());
        }
        Ok(resp)
    }

    /// Follows one connection of the status stream.
    async fn follow_stream(
        &self,
        machine_id: &str,
        target: &Phase,
        last_event_id: &mut Option<String>,
        last_seen: &mut Option<Machine>,
        deadline: Instant,
    ) -> StreamEnd {
        let resp = match self
            .open_stream(machine_id, last_event_id.as_deref(), deadline)
            .await
        {
            Ok(resp) => resp,
            Err(e) => return StreamEnd::Failed(e),
        };
        let mut events = resp.bytes_stream().eventsource();
        while let Some(item) = events.next().await {
            let event = match item {
                Ok(ev) => ev,
                Err(err) => {
                    tracing::debug!(machine_id, error = %err, "status stream broke");
                    return StreamEnd::Closed;
                }
            };
            if !event.id.is_empty() {
                *last_event_id = Some(event.id.clone());
            }
            if event.event != "status" && event.event != "message" {
                continue;
            }
            let machine = match serde_json::from_str::<Machine>(&event.data) {
                Ok(m) => m,
                Err(err) => {
                    tracing::debug!(machine_id, error = %err, "undecodable status event skipped");
                    continue;
                }
            };
            tracing::debug!(machine_id, phase = %machine.phase, "status event");
            let reached = machine.phase == *target;
            *last_seen = Some(machine.clone());
            if reached {
                return StreamEnd::Reached(machine);
            }
            if dead_end(&machine, target) {
                return StreamEnd::Closed;
            }
        }
        StreamEnd::Closed
    }
}

/// True when `target` can no longer be reached from `m`'s phase.
fn dead_end(m: &Machine, target: &Phase) -> bool {
    match m.phase {
        Phase::Failed => *target != Phase::Failed,
        Phase::Destroying => !matches!(target, Phase::Destroying | Phase::Destroyed),
        Phase::Destroyed => *target != Phase::Destroyed,
        _ => false,
    }
}

fn check_dead_end(m: &Machine, target: &Phase) -> Result<()> {
    if dead_end(m, target) {
        return Err(Error::UnexpectedPhase {
            operation: OPERATION,
            wanted: target.clone(),
            machine: Box::new(m.clone()),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_ends() {
        let m = |phase| Machine {
            phase,
            ..Machine::default()
        };
        assert!(dead_end(&m(Phase::Failed), &Phase::Running));
        assert!(!dead_end(&m(Phase::Failed), &Phase::Failed));
        assert!(dead_end(&m(Phase::Destroying), &Phase::Sleeping));
        assert!(!dead_end(&m(Phase::Destroying), &Phase::Destroyed));
        assert!(!dead_end(&m(Phase::Sleeping), &Phase::Running));
        assert!(!dead_end(&m(Phase::Stopping), &Phase::Running));
    }
}

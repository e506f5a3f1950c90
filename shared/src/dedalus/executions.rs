//! Execution endpoints and `run_and_wait`.

use std::time::Duration;

use http::Method;
use tokio::time::Instant;

use super::client::{Call, Client};
use super::error::{Error, Result};
use super::idempotency::IdempotencyKey;
use super::types::{Execution, ExecutionEvent, ExecutionOutput, ExecutionRequest, Page, RunResult};

/// First poll interval of [`Client::wait_execution`].
const POLL_START: Duration = Duration::from_millis(50);
/// Longest poll interval of [`Client::wait_execution`].
const POLL_MAX: Duration = Duration::from_secs(2);

impl Client {
    /// `POST /v1/machines/{id}/executions`. On a sleeping machine this wakes
    /// it (status `wake_in_progress`).
    pub async fn create_execution(
        &self,
        machine_id: &str,
        request: &ExecutionRequest,
        key: Option<&IdempotencyKey>,
    ) -> Result<Execution> {
        let call = Call::new(
            "executions.create",
            Method::POST,
            vec!["machines", machine_id, "executions"],
        )
        .json(request)?
        .key(key);
        self.call(call).await.map(|r| r.value)
    }

    /// `GET /v1/machines/{id}/executions/{eid}`.
    pub async fn get_execution(&self, machine_id: &str, execution_id: &str) -> Result<Execution> {
        let call = Call::new(
            "executions.get",
            Method::GET,
            vec!["machines", machine_id, "executions", execution_id],
        );
        self.call(call).await.map(|r| r.value)
    }

    /// `GET /v1/machines/{id}/executions` — one page.
    pub async fn list_executions(
        &self,
        machine_id: &str,
        cursor: Option<&str>,
        limit: Option<u32>,
    ) -> Result<Page<Execution>> {
        let call = Call::new(
            "executions.list",
            Method::GET,
            vec!["machines", machine_id, "executions"],
        )
        .page(cursor, limit);
        self.call(call).await.map(|r| r.value)
    }

    /// `GET …/executions/{eid}/output`.
    pub async fn execution_output(
        &self,
        machine_id: &str,
        execution_id: &str,
    ) -> Result<ExecutionOutput> {
        let call = Call::new(
            "executions.output",
            Method::GET,
            vec!["machines", machine_id, "executions", execution_id, "output"],
        );
        self.call(call).await.map(|r| r.value)
    }

    /// `GET …/executions/{eid}/events` — one page.
    pub async fn execution_events(
        &self,
        machine_id: &str,
        execution_id: &str,
        cursor: Option<&str>,
        limit: Option<u32>,
    ) -> Result<Page<ExecutionEvent>> {
        let call = Call::new(
            "executions.events",
            Method::GET,
            vec!["machines", machine_id, "executions", execution_id, "events"],
        )
        .page(cursor, limit);
        self.call(call).await.map(|r| r.value)
    }

    /// `DELETE …/executions/{eid}`: cancels a running execution.
    pub async fn cancel_execution(
        &self,
        machine_id: &str,
        execution_id: &str,
        key: Option<&IdempotencyKey>,
    ) -> Result<Execution> {
        let call = Call::new(
            "executions.cancel",
            Method::DELETE,
            vec!["machines", machine_id, "executions", execution_id],
        )
        .key(key);
        self.call(call).await.map(|r| r.value)
    }

    /// Polls an execution with a gentle backoff until it reaches a terminal
    /// status (`succeeded`, `failed`, `cancelled`, `expired`) or `deadline`
    /// passes ([`Error::DeadlineExceeded`]; the execution keeps running).
    pub async fn wait_execution(
        &self,
        machine_id: &str,
        execution_id: &str,
        deadline: Instant,
    ) -> Result<Execution> {
        let client = self.with_deadline(deadline);
        let mut interval = POLL_START;
        let mut polls = 0u32;
        loop {
            polls += 1;
            let exec = client
                .get_execution(machine_id, execution_id)
                .await
                .map_err(|e| deadline_or(e, "executions.wait", polls))?;
            if exec.status.is_terminal() {
                return Ok(exec);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::DeadlineExceeded {
                    operation: "executions.wait",
                    attempts: polls,
                    last_error: None,
                });
            }
            let hint = exec.retry_after_ms.map(Duration::from_millis);
            let wait = hint.unwrap_or(interval).min(POLL_MAX).min(deadline - now);
            tokio::time::sleep(wait).await;
            interval = (interval * 3 / 2).min(POLL_MAX);
        }
    }

    /// Creates an execution, waits for its end and fetches its output. A
    /// non-zero exit is not an error: inspect [`RunResult::execution`].
    pub async fn run_and_wait(
        &self,
        machine_id: &str,
        request: &ExecutionRequest,
        deadline: Instant,
    ) -> Result<RunResult> {
        let client = self.with_deadline(deadline);
        let key = IdempotencyKey::new();
        let created = client
            .create_execution(machine_id, request, Some(&key))
            .await
            .map_err(|e| deadline_or(e, "executions.run", 1))?;
        tracing::debug!(
            machine_id,
            execution_id = %created.execution_id,
            "execution created"
        );
        let execution = if created.status.is_terminal() {
            created
        } else {
            client
                .wait_execution(machine_id, &created.execution_id, deadline)
                .await?
        };
        let output = client
            .execution_output(machine_id, &execution.execution_id)
            .await
            .map_err(|e| deadline_or(e, "executions.run", 1))?;
        Ok(RunResult { execution, output })
    }
}

/// Renames an inner call's deadline error after the outer operation.
fn deadline_or(err: Error, operation: &'static str, attempts: u32) -> Error {
    match err {
        Error::DeadlineExceeded { last_error, .. } => Error::DeadlineExceeded {
            operation,
            attempts,
            last_error,
        },
        other => other,
    }
}

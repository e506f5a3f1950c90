//! Machine lifecycle endpoints: create, get, list, update, wake, sleep,
//! delete.

use std::future::Future;

use http::{Method, StatusCode};

use super::client::{Call, Client, Response};
use super::error::Result;
use super::idempotency::IdempotencyKey;
use super::types::{CreateMachineRequest, Machine, Page, UpdateMachineRequest};

/// Upper bound on pages [`Client::list_all_machines`] walks (a guard against
/// a server that never ends its cursor chain).
const MAX_PAGES: usize = 10_000;

fn machine(resp: Response<Machine>) -> Machine {
    resp.value.with_etag(resp.etag)
}

impl Client {
    /// Sends a mutation of `machine_id` (`send(if_match)`). `If-Match` is
    /// optional in the current API; a deployment still on the spec's old
    /// rule answers 428 when it is missing. Then the machine's current
    /// revision is read and the call is sent once more with it (the refused
    /// call was not processed, so its idempotency key is not spent).
    async fn with_if_match<F, Fut>(
        &self,
        machine_id: &str,
        if_match: Option<&str>,
        send: F,
    ) -> Result<Machine>
    where
        F: Fn(Option<String>) -> Fut,
        Fut: Future<Output = Result<Response<Machine>>>,
    {
        let answer = send(if_match.map(str::to_owned)).await;
        match answer {
            Err(e)
                if if_match.is_none() && e.status() == Some(StatusCode::PRECONDITION_REQUIRED) =>
            {
                let current = self.get_machine(machine_id).await?;
                tracing::debug!(
                    machine_id,
                    "If-Match required; resending with the current revision"
                );
                send(current.revision).await.map(machine)
            }
            other => other.map(machine),
        }
    }

    /// `POST /v1/machines`. Pass the persisted key of the logical create so a
    /// retry after a crash returns the same machine; `None` uses a fresh key.
    pub async fn create_machine(
        &self,
        request: &CreateMachineRequest,
        key: Option<&IdempotencyKey>,
    ) -> Result<Machine> {
        let call = Call::new("machines.create", Method::POST, vec!["machines"])
            .json(request)?
            .key(key);
        self.call(call).await.map(machine)
    }

    /// `GET /v1/machines/{id}`.
    pub async fn get_machine(&self, machine_id: &str) -> Result<Machine> {
        let call = Call::new("machines.get", Method::GET, vec!["machines", machine_id]);
        self.call(call).await.map(machine)
    }

    /// `GET /v1/machines` — one page.
    pub async fn list_machines(
        &self,
        cursor: Option<&str>,
        limit: Option<u32>,
    ) -> Result<Page<Machine>> {
        let call = Call::new("machines.list", Method::GET, vec!["machines"]).page(cursor, limit);
        self.call(call).await.map(|r| r.value)
    }

    /// Every machine, walking all pages (`page_size` per request).
    pub async fn list_all_machines(&self, page_size: Option<u32>) -> Result<Vec<Machine>> {
        let mut all = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let page = self.list_machines(cursor.as_deref(), page_size).await?;
            all.extend(page.items);
            match page.next_cursor {
                Some(next) if Some(&next) != cursor.as_ref() => cursor = Some(next),
                _ => break,
            }
        }
        Ok(all)
    }

    /// `PATCH /v1/machines/{id}`. `if_match`: a revision you hold (stale →
    /// 409 `REVISION_MISMATCH`, retried).
    pub async fn update_machine(
        &self,
        machine_id: &str,
        request: &UpdateMachineRequest,
        if_match: Option<&str>,
        key: Option<&IdempotencyKey>,
    ) -> Result<Machine> {
        let update = Mutation::new("machines.update", Method::PATCH, None).body(request);
        self.mutate(machine_id, update, if_match, key).await
    }

    /// `POST /v1/machines/{id}/wake` (a no-op on a running machine).
    pub async fn wake_machine(
        &self,
        machine_id: &str,
        if_match: Option<&str>,
        key: Option<&IdempotencyKey>,
    ) -> Result<Machine> {
        let wake = Mutation::new("machines.wake", Method::POST, Some("wake"));
        self.mutate(machine_id, wake, if_match, key).await
    }

    /// `POST /v1/machines/{id}/sleep`. Within the hold window after a wake it
    /// fails with 409 `SLEEP_HOLD_WINDOW_ACTIVE` and a `retry_after`.
    pub async fn sleep_machine(
        &self,
        machine_id: &str,
        if_match: Option<&str>,
        key: Option<&IdempotencyKey>,
    ) -> Result<Machine> {
        let sleep = Mutation::new("machines.sleep", Method::POST, Some("sleep"));
        self.mutate(machine_id, sleep, if_match, key).await
    }

    /// `DELETE /v1/machines/{id}`.
    pub async fn delete_machine(
        &self,
        machine_id: &str,
        if_match: Option<&str>,
        key: Option<&IdempotencyKey>,
    ) -> Result<Machine> {
        let delete = Mutation::new("machines.delete", Method::DELETE, None);
        self.mutate(machine_id, delete, if_match, key).await
    }

    /// Send a lifecycle mutation of `machine_id` with `If-Match` and `key`
    /// (see [`Client::with_if_match`]).
    async fn mutate(
        &self,
        machine_id: &str,
        m: Mutation<'_>,
        if_match: Option<&str>,
        key: Option<&IdempotencyKey>,
    ) -> Result<Machine> {
        let m = &m;
        self.with_if_match(machine_id, if_match, |rev| async move {
            let mut segments = vec!["machines", machine_id];
            segments.extend(m.action);
            let mut call = Call::new(m.operation, m.method.clone(), segments);
            if let Some(body) = m.body {
                call = call.json(body)?;
            }
            self.call(call.if_match(rev.as_deref()).key(key)).await
        })
        .await
    }
}

/// A lifecycle call on one machine: `METHOD /v1/machines/{id}[/action]`,
/// with a JSON body for an update.
struct Mutation<'a> {
    operation: &'static str,
    method: Method,
    action: Option<&'static str>,
    body: Option<&'a UpdateMachineRequest>,
}

impl<'a> Mutation<'a> {
    fn new(operation: &'static str, method: Method, action: Option<&'static str>) -> Self {
        Mutation {
            operation,
            method,
            action,
            body: None,
        }
    }

    fn body(mut self, body: &'a UpdateMachineRequest) -> Self {
        self.body = Some(body);
        self
    }
}

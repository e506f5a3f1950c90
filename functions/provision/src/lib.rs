//! The provision function: the machine routes of docs/design.md §3 and the
//! asynchronous provisioning worker, in one Lambda. `main` only wires
//! clients; this library maps events to `agenthome` and back, so tests can
//! drive it in-process against real adapters.

use agenthome::api::{Problem, ProblemCode, UserId, RETRY_SOON};
use agenthome::entry::{self, Authorizer, FairUse, Route};
use agenthome::metrics::{self, EmfDoc, Metrics, Tally, PROVISION_LINE};
use agenthome::provision::{Ensure, ProvisionError, ProvisionEvent, Provisioner, WorkerTrigger};
use agenthome::store::{MachineState, StoreError, UserRecord, UserStore};
use agenthome::sweep::{SleepNow, Sweeper};
use agenthome::user_machine::{self, Destroyed, MachineStatus};
use lambda_http::aws_lambda_events::apigw::ApiGatewayV2httpResponse;
use lambda_http::{Body, Request, Response};
use serde_json::{json, Value};
use std::time::Duration;

/// How long `DELETE` waits for the platform to confirm the machine is gone.
const DESTROY_WAIT: Duration = Duration::from_secs(20);
/// Upper bound of `POST …/machine/sleep`.
const SLEEP_WAIT: Duration = Duration::from_secs(20);

/// Everything the handler needs, built once per cold start.
pub struct ProvisionService<S, T> {
    /// Provisioning (store, Dedalus client, trigger).
    pub provisioner: Provisioner<S, T>,
    /// The sleep path shared with the sweep (`POST …/machine/sleep`).
    pub sweeper: Sweeper<S>,
    /// Who may call (mode, admin policy, bearer-token verifier).
    pub auth: Authorizer,
    /// Per-user limits (`MAX_STATUS_READS_PER_MINUTE`).
    pub fair_use: FairUse,
    /// Where each provisioning run's metric line goes.
    pub metrics: Metrics,
}

/// One incoming event: an HTTP request, or the worker's provision event.
pub enum Incoming {
    /// `{"user_id": ...}` sent by the provisioning trigger.
    Provision(ProvisionEvent),
    /// An API Gateway HTTP API / Function URL request.
    Http(Box<Request>),
}

/// Tell the two event kinds apart.
pub fn classify(event: Value) -> Result<Incoming, String> {
    if event.get("requestContext").is_none() && event.get("user_id").is_some() {
        return serde_json::from_value(event)
            .map(Incoming::Provision)
            .map_err(|e| format!("malformed provision event: {e}"));
    }
    let req: lambda_http::request::LambdaRequest =
        serde_json::from_value(event).map_err(|e| format!("unrecognised event: {e}"))?;
    Ok(Incoming::Http(Box::new(req.into())))
}

impl<S: UserStore + 'static, T: WorkerTrigger> ProvisionService<S, T> {
    /// Handle any event; HTTP requests get an API Gateway v2 response.
    pub async fn handle(&self, event: Value) -> Result<Value, lambda_runtime::Error> {
        self.handle_until(event, None).await
    }

    /// [`ProvisionService::handle`] for an invocation that ends at `deadline_ms`
    /// (the Lambda context's deadline, epoch ms): the worker works to it.
    pub async fn handle_until(
        &self,
        event: Value,
        deadline_ms: Option<u64>,
    ) -> Result<Value, lambda_runtime::Error> {
        match classify(event) {
            Ok(Incoming::Provision(ev)) => {
                match self.run_worker_measured(&ev, deadline_ms).await {
                    Ok(rec) => Ok(serde_json::json!({"user_id": rec.user_id, "state": rec.state})),
                    // A retryable failure makes Lambda retry the async event
                    // (bounded by the function's EventInvokeConfig); a final
                    // one is recorded on the item (`failed`) and the next
                    // trigger resumes it.
                    Err(e) if e.is_retryable() => Err(e.into()),
                    Err(e) => {
                        Ok(serde_json::json!({"user_id": ev.user_id, "error": e.to_string()}))
                    }
                }
            }
            Ok(Incoming::Http(req)) => {
                // Boxed: the routes' futures are deep; the handler's stays small.
                let resp = Box::pin(self.handle_http(&req)).await;
                Ok(serde_json::to_value(to_apigw_v2(resp))?)
            }
            Err(detail) => {
                tracing::warn!(%detail, "unrecognised event");
                Err(detail.into())
            }
        }
    }

    /// Run the provisioning worker and emit its metric line.
    /// Run the worker — to `deadline_ms` (epoch ms) when the invocation has
    /// one — and emit its metric line.
    async fn run_worker_measured(
        &self,
        ev: &ProvisionEvent,
        deadline_ms: Option<u64>,
    ) -> Result<UserRecord, ProvisionError> {
        let started = tokio::time::Instant::now();
        let now = agenthome::clock::now_ms();
        let run = match deadline_ms.and_then(|d| entry::remaining(d, now)) {
            Some(left) => {
                let until = now.saturating_add(u64::try_from(left.as_millis()).unwrap_or(u64::MAX));
                Box::pin(self.provisioner.run_worker_until(ev, until))
                    as std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send + '_>>
            }
            None => Box::pin(self.provisioner.run_worker(ev)),
        };
        let (result, tally) = metrics::tallied(run).await;
        let mut doc = provision_line(&self.metrics, &result, tally, started.elapsed());
        doc.property("user_id", ev.user_id.as_str());
        self.metrics.emit(&doc);
        result
    }

    /// Handle one HTTP request of the machine routes.
    pub async fn handle_http(&self, req: &Request) -> Response<Body> {
        self.route(req).await.unwrap_or_else(|p| entry::problem(&p))
    }

    /// Authorize, then hand the request to its route's handler.
    async fn route(&self, req: &Request) -> Result<Response<Body>, Problem> {
        let route = entry::route(req)?;
        self.auth.authorize(req, route.user()).await?;
        match route {
            Route::GetMachine(ref user) => self.get_machine(user).await,
            Route::PutMachine(ref user) => self.put_machine(user).await,
            Route::DeleteMachine(ref user) => self.delete_machine(user).await,
            Route::SleepMachine(ref user) => Ok(self.sleep_machine(user).await),
            Route::MachineEvents(ref user) => self.machine_events(req, user).await,
            Route::Turn(_) => Err(Problem::of(
                ProblemCode::NoSuchRoute,
                "turns are served by the chat-turn function",
            )),
        }
    }

    /// `GET …/machine`: the machine's status (never wakes it).
    async fn get_machine(&self, user: &UserId) -> Result<Response<Body>, Problem> {
        match self.status(user).await.map_err(|e| store_problem(&e))? {
            Some(mut status) => {
                let journal = self.provisioner.journal();
                let now = agenthome::clock::now_ms();
                status.awake_days = entry::events::awake_days(journal, &status, now).await;
                Ok(entry::json(200, &status, None))
            }
            None => Err(Problem::of(
                ProblemCode::NoMachine,
                format!(
                    "user {user} has no machine; PUT this route or send a turn to provision one"
                ),
            )),
        }
    }

    /// The live status, or the table's once the user's status reads per
    /// minute are used up (one user's polling never reaches Dedalus past it).
    async fn status(&self, user: &UserId) -> Result<Option<MachineStatus>, StoreError> {
        let store = self.provisioner.store();
        if self.fair_use.live_status_allowed(store, user).await {
            user_machine::status(store, self.provisioner.dedalus(), user).await
        } else {
            user_machine::table_status(store, user).await
        }
    }

    /// `PUT …/machine`: provision (or resume) the user's machine.
    async fn put_machine(&self, user: &UserId) -> Result<Response<Body>, Problem> {
        let outcome = self.provisioner.ensure(user).await.map_err(|e| {
            tracing::error!(user = user.as_str(), error = %e, "provisioning could not start");
            if e.is_retryable() {
                Problem::of(
                    ProblemCode::ProvisioningUnavailable,
                    "provisioning could not start; retry shortly",
                )
            } else {
                Problem::internal("provisioning could not start")
            }
        })?;
        let status = MachineStatus::new(outcome.record(), Ok(None), agenthome::clock::now_ms());
        match outcome {
            Ensure::Ready(_) => Ok(entry::json(200, &status, None)),
            Ensure::Destroying(_) => Err(Problem::machine_destroying()),
            Ensure::Started(_) | Ensure::InProgress(_) => {
                Ok(entry::json(202, &status, Some(outcome.retry_after())))
            }
        }
    }

    /// `DELETE …/machine`: destroy the machine and the item (resumable).
    async fn delete_machine(&self, user: &UserId) -> Result<Response<Body>, Problem> {
        let store = self.provisioner.store();
        let dedalus = self.provisioner.dedalus();
        let journal = self.provisioner.journal();
        match user_machine::destroy_recorded(store, dedalus, user, DESTROY_WAIT, journal).await {
            Ok(Destroyed::Done) | Ok(Destroyed::AlreadyGone) => Ok(entry::empty(204)),
            Err(e) => {
                tracing::warn!(user = user.as_str(), error = %e, "destroy incomplete; a retry resumes it");
                Err(Problem::of(
                    ProblemCode::DestroyIncomplete,
                    "the machine could not be destroyed yet; repeat the DELETE to resume",
                ))
            }
        }
    }

    /// `GET …/machine/events`: a page of the user's lifecycle journal.
    async fn machine_events(
        &self,
        req: &Request,
        user: &UserId,
    ) -> Result<Response<Body>, Problem> {
        let query = entry::events::page_query(req)?;
        match self.provisioner.journal().page(user, &query).await {
            Ok(page) => Ok(entry::json(200, &page, None)),
            Err(StoreError::InvalidCursor) => Err(Problem::of(
                ProblemCode::InvalidQuery,
                "cursor is not a next_cursor this API returned",
            )),
            Err(e) => Err(store_problem(&e)),
        }
    }

    /// `POST …/machine/sleep`: put the machine to sleep now, or say when.
    async fn sleep_machine(&self, user: &UserId) -> Response<Body> {
        let now = agenthome::clock::now_ms();
        let deadline = tokio::time::Instant::now() + SLEEP_WAIT;
        let outcome = self.sweeper.sleep_now(user, now, deadline).await;
        sleep_response(user, outcome, now)
    }
}

/// The answer of `POST …/machine/sleep` for what the sleep path did.
fn sleep_response(user: &UserId, outcome: SleepNow, now_ms: u64) -> Response<Body> {
    let answer =
        |status: &str, detail: &str| json!({"user_id": user, "status": status, "detail": detail});
    match outcome {
        SleepNow::Asleep => entry::json(200, &json!({"user_id": user, "status": "asleep"}), None),
        SleepNow::Busy => entry::problem(&Problem::turn_in_progress(RETRY_SOON)),
        SleepNow::HeldByRunningCommand => entry::json(
            202,
            &answer("held", "a command the agent left running keeps the machine awake; the sweep puts it to sleep when the command ends"),
            None,
        ),
        SleepNow::NotYetEligible { eligible_at_ms } => {
            let mut body = answer("scheduled", "the platform refuses sleep shortly after a wake; the sweep puts the machine to sleep once it may");
            body["sleep_eligible_at_ms"] = json!(eligible_at_ms);
            let wait = Duration::from_millis(eligible_at_ms.saturating_sub(now_ms));
            entry::json(202, &body, Some(wait))
        }
        SleepNow::AwaitingAutosleep => entry::json(
            202,
            &answer("awaiting_autosleep", "explicit sleep is unavailable for this API key; the platform's autosleep puts the machine to sleep"),
            None,
        ),
        SleepNow::NoMachine => entry::problem(&Problem::of(
            ProblemCode::NoMachine,
            format!("user {user} has no machine"),
        )),
        SleepNow::Failed => entry::problem(&Problem::of(
            ProblemCode::SleepUnavailable,
            "the machine could not be put to sleep now; the sweep retries",
        )),
    }
}

/// A worker run's metric line ([`PROVISION_LINE`]). Outcome: `ready` (the
/// run did the work and the machine is ready), `skipped` (nothing to do:
/// ready already, another worker holds the lease, or the item waits for the
/// next trigger), `retrying` (a retryable failure: Lambda retries the event)
/// or `failed` (recorded on the item; the next trigger resumes).
fn provision_line(
    metrics: &Metrics,
    result: &Result<UserRecord, ProvisionError>,
    tally: Tally,
    total: Duration,
) -> EmfDoc {
    let mut doc = metrics.doc(&PROVISION_LINE);
    doc.metric("provisions", 1)
        .millis("provision_total_ms", total)
        .metric("dedalus_requests", tally.dedalus_requests)
        .metric("table_calls", tally.table_calls);
    if let Some(n) = tally.attempts {
        doc.metric("attempts", n);
    }
    if let Some(ms) = tally.boot_ms {
        doc.metric("boot_ms", ms);
    }
    if let Some(ms) = tally.bootstrap_ms {
        doc.metric("bootstrap_ms", ms);
    }
    match result {
        Ok(rec) => {
            let worked = tally.boot_ms.is_some() && rec.state == MachineState::Ready;
            doc.dimension("Outcome", if worked { "ready" } else { "skipped" })
                .property("state", rec.state.as_str());
            if let Some(id) = &rec.machine_id {
                doc.property("machine_id", id.as_str());
            }
        }
        Err(e) => {
            let outcome = if e.is_retryable() {
                "retrying"
            } else {
                "failed"
            };
            doc.dimension("Outcome", outcome)
                .metric("provision_failures", 1)
                .property("error_kind", error_kind(e))
                .property("error", e.to_string());
        }
    }
    doc
}

/// A bounded name for a provisioning error (a property of the line).
fn error_kind(e: &ProvisionError) -> &'static str {
    match e {
        ProvisionError::Store(_) => "table",
        ProvisionError::Dedalus(_) => "dedalus",
        ProvisionError::Trigger(_) => "trigger",
        ProvisionError::Bootstrap { .. } => "bootstrap",
        ProvisionError::Superseded(_) => "superseded",
        ProvisionError::OutOfTime => "out_of_time",
        ProvisionError::Failed { .. } => "failed",
    }
}

fn store_problem(e: &StoreError) -> Problem {
    tracing::error!(error = %e, "table error");
    if e.is_retryable() {
        Problem::of(
            ProblemCode::TableUnavailable,
            "the table is unavailable; retry shortly",
        )
    } else {
        Problem::internal("the table could not be read")
    }
}

/// An `http::Response` as the API Gateway v2 / Function URL response shape.
pub fn to_apigw_v2(resp: Response<Body>) -> ApiGatewayV2httpResponse {
    let (parts, body) = resp.into_parts();
    let mut out = ApiGatewayV2httpResponse::default();
    out.status_code = i64::from(parts.status.as_u16());
    out.headers = parts.headers;
    out.body = match body {
        Body::Empty => None,
        other => Some(other),
    };
    out.is_base64_encoded = false;
    out
}

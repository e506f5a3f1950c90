//! The chat-turn function: `POST /v1/users/{user_id}/turns` (docs/design.md §3).
//! `main` only wires clients; this library maps the request to
//! [`agenthome::turn`] and the outcome back to HTTP, so tests can drive it
//! in-process against real adapters.

use agenthome::agent::{AgentError, AgentStatus};
use agenthome::api::{Problem, ProblemCode, TurnRequest, UserId};
use agenthome::clock::now_ms;
use agenthome::entry::first_turn::{idempotency_key, request_hash};
use agenthome::entry::{self, Authorizer, AwakeBudget, FairUse, FirstTurn, Route, Waited};
use agenthome::metrics::{self, Metrics, Tally, TURN_LINE};
use agenthome::provision::{ProvisionError, WorkerTrigger};
use agenthome::runner::Transport;
use agenthome::store::{StageReader, TurnKeyBegin, TurnKeys, UserStore};
use agenthome::turn::{
    MachineStage, NoEvents, TurnError, TurnEvent, TurnEvents, TurnOutcome, TurnService,
};
use bytes::Bytes;
use futures_util::Stream;
use lambda_http::{Body, Request, Response};
use serde_json::json;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Everything the handler needs, built once per cold start.
pub struct ChatTurnService<S, T> {
    /// The turn service (provisioning, agent, settings).
    pub turns: TurnService<S, T>,
    /// Who may call (mode, admin policy, bearer-token verifier).
    pub auth: Authorizer,
    /// Per-user limits (`MAX_TURNS_PER_MINUTE`).
    pub fair_use: FairUse,
    /// Per-user awake time per UTC day (`MAX_AWAKE_PER_DAY`), if set.
    pub awake_budget: Option<AwakeBudget<S>>,
    /// Upper bound of a turn (`TURN_DEADLINE`).
    pub turn_deadline: Duration,
    /// Kept before the Lambda deadline for the response itself.
    pub margin: Duration,
    /// Event streams send a `: keep-alive` comment after this much silence.
    pub heartbeat: Duration,
    /// Where each turn's metric line goes.
    pub metrics: Metrics,
    /// How a first message waits for its machine (`FIRST_TURN_WAIT`).
    pub first_turn: FirstTurn,
}

/// The default [`ChatTurnService::heartbeat`].
pub const HEARTBEAT: Duration = Duration::from_secs(15);

/// A validated turn request.
struct Prepared {
    user: UserId,
    request: TurnRequest,
    deadline: Instant,
    /// When the request arrived.
    started: Instant,
    /// The invocation's end minus the margin, when the runtime gave one.
    invocation_end: Option<Instant>,
    /// The `Idempotency-Key` header.
    key: Option<String>,
}

/// The idempotency key a turn runs under (`runner`: this attempt's claim).
struct Keyed {
    key: String,
    runner: String,
}

impl<S, T> ChatTurnService<S, T>
where
    S: UserStore + StageReader + TurnKeys + Clone + 'static,
    T: WorkerTrigger,
{
    /// Handle one request; every failure is a problem response.
    pub async fn handle(&self, req: &Request) -> Response<Body> {
        let p = match self.prepare(req).await {
            Ok(p) => p,
            Err(p) => return entry::problem(&p),
        };
        let keyed = match self.begin_key(&p).await {
            Ok(keyed) => keyed,
            Err(resp) => return resp,
        };
        let user = p.user.clone();
        let hash = request_hash(&p.request);
        let result = self.run_measured(p, &NoEvents, "json", false).await;
        self.after_turn(&user).await;
        let turn_key = self.end_key(&user, &hash, keyed, &result).await;
        respond(&user, result, turn_key.as_deref())
    }

    /// Claim the request's idempotency key, if it has one; a key already
    /// used answers here (the stored result, 409 while it runs, 422 for
    /// another body).
    async fn begin_key(&self, p: &Prepared) -> Result<Option<Keyed>, Response<Body>> {
        let Some(key) = p.key.clone() else {
            return Ok(None);
        };
        let store = self.turns.provisioner().store();
        let now = now_ms();
        // The claim outlives this request's longest run (a wait, then the
        // turn), so a crashed request frees the key by itself.
        let longest = self.first_turn.stream_wait.max(self.first_turn.wait) + self.turn_deadline;
        let run_until = now + millis(longest + self.margin);
        let hash = request_hash(&p.request);
        match store.begin_turn_key(&p.user, &key, &hash, run_until, now).await {
            Ok(TurnKeyBegin::Run { runner }) => Ok(Some(Keyed { key, runner })),
            Ok(TurnKeyBegin::Replay { response }) => Err(replay(response)),
            Ok(TurnKeyBegin::Running { retry_after }) => Err(entry::problem(
                &Problem::of(
                    ProblemCode::TurnInProgress,
                    "a turn with this Idempotency-Key is running; retry after it finishes",
                )
                .with_retry_after(retry_after.clamp(Duration::from_secs(1), Duration::from_secs(60))),
            )),
            Ok(TurnKeyBegin::Mismatch) => Err(entry::problem(&Problem::of(
                ProblemCode::IdempotencyKeyReused,
                "this Idempotency-Key was used with a different message or history; use a new key for a new message",
            ))),
            Err(e) => Err(entry::problem(&key_store_problem(&p.user, &e))),
        }
    }

    /// Settle the key after the turn: a finished turn's result is stored
    /// under it; otherwise it is released, so sending the message again
    /// runs it. A `202` without a key gets a fresh one (returned), which
    /// the product sends back as `Idempotency-Key`.
    async fn end_key(
        &self,
        user: &UserId,
        hash: &str,
        keyed: Option<Keyed>,
        result: &Result<TurnOutcome, TurnError>,
    ) -> Option<String> {
        let store = self.turns.provisioner().store();
        let now = now_ms();
        let provisioning = matches!(result, Ok(TurnOutcome::Provisioning { .. }));
        let Some(Keyed { key, runner }) = keyed else {
            if provisioning {
                return self.fresh_key(user, hash).await;
            }
            return None;
        };
        let settled = match result {
            Ok(TurnOutcome::Done(r)) => {
                store
                    .finish_turn_key(user, &key, &runner, &stored_result(r), now)
                    .await
            }
            _ => store.release_turn_key(user, &key, &runner, now).await,
        };
        match settled {
            Ok(true) => {}
            Ok(false) => tracing::warn!(
                user_id = user.as_str(),
                "the turn key was taken over meanwhile"
            ),
            Err(e) => {
                tracing::warn!(user_id = user.as_str(), error = %e, "could not settle the turn key; it frees itself")
            }
        }
        provisioning.then_some(key)
    }

    /// A new `pending` key for a message that got `202` without one (None
    /// if it could not be stored: the `202` then names no key).
    async fn fresh_key(&self, user: &UserId, hash: &str) -> Option<String> {
        let store = self.turns.provisioner().store();
        let now = now_ms();
        let key = agenthome::store::turn_keys::new_turn_key();
        let registered = match store.begin_turn_key(user, &key, hash, now, now).await {
            Ok(TurnKeyBegin::Run { runner }) => {
                store.release_turn_key(user, &key, &runner, now).await
            }
            Ok(other) => {
                tracing::warn!(
                    user_id = user.as_str(),
                    ?other,
                    "a fresh turn key was not new"
                );
                Ok(false)
            }
            Err(e) => Err(e),
        };
        match registered {
            Ok(true) => Some(key),
            Ok(false) => None,
            Err(e) => {
                tracing::warn!(user_id = user.as_str(), error = %e, "could not register a turn key");
                None
            }
        }
    }

    /// Run the turn; a turn that found no ready machine waits for the
    /// provisioning it started (as long as the request's time allows) and
    /// then runs.
    async fn run_waiting(
        &self,
        p: &Prepared,
        sink: &dyn TurnEvents,
        streaming: bool,
    ) -> Result<TurnOutcome, TurnError> {
        let mut deadline = p.deadline;
        let mut waited = false;
        loop {
            // Boxed: the turn's future is deep, and this loop also holds
            // the wait's.
            let result = Box::pin(self.turns.run_counted(
                &p.user,
                p.request.clone(),
                deadline,
                sink,
                self.fair_use.turns_per_minute,
            ))
            .await;
            let Ok(TurnOutcome::Provisioning {
                record,
                retry_after,
            }) = result
            else {
                return result;
            };
            let until = match self.first_turn.wait_until(p.started, deadline, streaming) {
                Some(until) if !waited => until,
                _ => {
                    let store = self.turns.provisioner().store();
                    let retry_after = self
                        .first_turn
                        .retry_after_now(store, &p.user, retry_after)
                        .await;
                    return Ok(TurnOutcome::Provisioning {
                        record,
                        retry_after,
                    });
                }
            };
            waited = true;
            if let Some(outcome) = self.wait_for_machine(p, until, sink).await? {
                return Ok(outcome);
            }
            if streaming {
                // The turn gets its own time after the wait, within the
                // invocation.
                let fresh = Instant::now() + self.turn_deadline;
                deadline = p.invocation_end.map_or(fresh, |end| end.min(fresh));
            }
        }
    }

    /// Wait until `until` for the provisioning the turn started: `None`
    /// once the machine is ready (the turn runs again), else the answer.
    async fn wait_for_machine(
        &self,
        p: &Prepared,
        until: Instant,
        sink: &dyn TurnEvents,
    ) -> Result<Option<TurnOutcome>, TurnError> {
        let store = self.turns.provisioner().store();
        match self
            .first_turn
            .wait(store, &p.user, until, p.started, sink)
            .await?
        {
            Waited::Ready => Ok(None),
            Waited::Failed(rec) => Err(TurnError::Provision(ProvisionError::Failed {
                message: rec
                    .last_error
                    .unwrap_or_else(|| "provisioning failed".to_string()),
            })),
            Waited::Destroying => Ok(Some(TurnOutcome::Destroying)),
            Waited::Pending(view) => {
                let retry_after = self.first_turn.retry_after(&view, now_ms());
                Ok(Some(TurnOutcome::Provisioning {
                    record: Box::new(view.record),
                    retry_after,
                }))
            }
        }
    }

    /// Run the turn, telling `sink` its progress, and emit its metric line
    /// (whatever the outcome; `mode` is `json` or `stream`).
    async fn run_measured(
        &self,
        p: Prepared,
        sink: &dyn TurnEvents,
        mode: &'static str,
        streaming: bool,
    ) -> Result<TurnOutcome, TurnError> {
        let seen = Seen::new(sink);
        // Boxed: the turn's future is deep; the caller's stays small.
        let run = Box::pin(self.run_waiting(&p, &seen, streaming));
        let (result, tally) = metrics::tallied(run).await;
        let mut doc = turn_line(&self.metrics, &result, &seen, tally);
        doc.property("user_id", p.user.as_str())
            .property("mode", mode);
        self.metrics.emit(&doc);
        result
    }

    /// Bookkeeping after any turn: a machine whose awake budget ran out
    /// goes to sleep now.
    async fn after_turn(&self, user: &UserId) {
        if let Some(budget) = &self.awake_budget {
            budget.enforce(self.turns.provisioner().store(), user).await;
        }
    }

    /// Route, authorize, parse and budget the request.
    async fn prepare(&self, req: &Request) -> Result<Prepared, Problem> {
        let route = entry::route(req)?;
        let Route::Turn(user) = route else {
            return Err(Problem::of(
                ProblemCode::NoSuchRoute,
                "this function serves POST /v1/users/{user_id}/turns only",
            ));
        };
        self.auth.authorize(req, &user).await?;
        // Bad input is refused before any table call; the fair-use count
        // is part of the write that begins the turn.
        let body = entry::body_bytes(req, agenthome::api::turn_request::MAX_BODY_BYTES)?;
        let request = TurnRequest::from_json(body)?;
        if let Some(budget) = &self.awake_budget {
            budget
                .admit(self.turns.provisioner().store(), &user)
                .await?;
        }
        let key = idempotency_key(req)?;
        let budget = self.budget(req);
        tracing::debug!(user_id = %user, budget_ms = budget.as_millis() as u64, "turn budget");
        let started = Instant::now();
        Ok(Prepared {
            user,
            request,
            deadline: started + budget,
            started,
            invocation_end: entry::time_left(req, self.margin).map(|left| started + left),
            key,
        })
    }
}

impl<S, T> ChatTurnService<S, T>
where
    S: UserStore + StageReader + TurnKeys + Clone + Send + Sync + 'static,
    T: WorkerTrigger + 'static,
{
    /// The streaming entry point (`RESPONSE_MODE=streaming`, a Function URL
    /// with `InvokeMode: RESPONSE_STREAM`). With `Accept: text/event-stream`
    /// the turn's progress streams as Server-Sent Events
    /// ([`agenthome::turn::TurnEvent`]: `event: <name>`, `data: <json>`;
    /// the last event is `done` with the turn result or `error` with a
    /// problem). Without it, the response is the one [`ChatTurnService::handle`]
    /// gives, as one chunk.
    ///
    /// Until the turn holds the user's lease and reports the machine, the
    /// status is open: a turn that ends before (202 provisioning, 409 busy,
    /// any problem) gets its usual status and JSON body. The turn runs in
    /// its own task: a client that disconnects stops the events, not the
    /// turn (lease, activity and summary are still written). The body only
    /// ends once the turn's task has.
    pub async fn handle_streaming(self: Arc<Self>, req: Request) -> Response<StreamBody> {
        if !wants_event_stream(&req) {
            return full(self.handle(&req).await);
        }
        let p = match self.prepare(&req).await {
            Ok(p) => p,
            Err(p) => return full(entry::problem(&p)),
        };
        let keyed = match self.begin_key(&p).await {
            Ok(keyed) => keyed,
            Err(resp) => return full(resp),
        };
        let user = p.user.clone();
        let (mut rx, mut task) = self.spawn_turn(p, keyed);
        let first = match first_events(&mut rx).await {
            Some(first) => first,
            // Ended before streaming began: the plain response.
            None => {
                return full(match (&mut task).await {
                    Ok((result, turn_key)) => respond(&user, result, turn_key.as_deref()),
                    Err(e) => entry::problem(&task_failed(&e)),
                })
            }
        };
        let mut heartbeat =
            tokio::time::interval_at(Instant::now() + self.heartbeat, self.heartbeat);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let state = StreamState {
            pending: first,
            rx,
            rx_open: true,
            task: Some(task),
            heartbeat,
            user,
        };
        let stream = futures_util::stream::unfold(state, StreamState::next_chunk);
        let resp = Response::builder()
            .status(200)
            .header("content-type", "text/event-stream")
            .header("cache-control", "no-cache")
            .header("x-accel-buffering", "no")
            .body(StreamBody::stream(stream));
        resp.unwrap_or_else(|_| full(entry::problem(&Problem::internal("no response"))))
    }

    /// Run the turn in its own task (a client that disconnects stops the
    /// events, not the turn): its events arrive on the returned receiver;
    /// the task ends with the outcome once the key is settled.
    fn spawn_turn(
        self: &Arc<Self>,
        p: Prepared,
        keyed: Option<Keyed>,
    ) -> (
        tokio::sync::mpsc::UnboundedReceiver<TurnEvent>,
        JoinHandle<Finished>,
    ) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let service = Arc::clone(self);
        let task_user = p.user.clone();
        let hash = request_hash(&p.request);
        let task = tokio::spawn(async move {
            let result = service.run_measured(p, &tx, "stream", true).await;
            drop(tx);
            service.after_turn(&task_user).await;
            let turn_key = service.end_key(&task_user, &hash, keyed, &result).await;
            (result, turn_key)
        });
        (rx, task)
    }
}

/// The events up to the first that is not about provisioning (that one
/// included): the stream's first chunks, once the status is settled. `None`
/// when the turn's events ended before (its plain response is the answer).
async fn first_events(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<TurnEvent>,
) -> Option<VecDeque<Bytes>> {
    let mut first = VecDeque::new();
    loop {
        match rx.recv().await? {
            ev @ TurnEvent::Machine {
                stage: MachineStage::Provisioning,
                ..
            } => first.push_back(sse_event(&ev)),
            ev => {
                first.push_back(sse_event(&ev));
                return Some(first);
            }
        }
    }
}

impl StreamState {
    /// The next chunk of the event stream: a pending event, a new one, a
    /// keep-alive comment when the heartbeat ticks first, and once every
    /// event is out the turn's failure, if any, as the last event.
    async fn next_chunk(mut self) -> Option<(Bytes, Self)> {
        loop {
            if let Some(chunk) = self.pending.pop_front() {
                return Some((chunk, self));
            }
            if self.rx_open {
                tokio::select! {
                    ev = self.rx.recv() => match ev {
                        Some(ev) => {
                            self.heartbeat.reset();
                            return Some((sse_event(&ev), self));
                        }
                        None => self.rx_open = false,
                    },
                    _ = self.heartbeat.tick() => {
                        return Some((Bytes::from_static(b": keep-alive\n\n"), self));
                    }
                }
                continue;
            }
            // All events are out: the turn's task has returned (or is
            // returning); its failure, if any, is the last event.
            let task = self.task.take()?;
            let problem = match task.await {
                Ok((result, turn_key)) => stream_problem(&self.user, result, turn_key.as_deref()),
                Err(e) => Some(task_failed(&e)),
            };
            return problem.map(|problem| (sse_event(&TurnEvent::Error(problem)), self));
        }
    }
}

/// A turn's task's end: the turn's outcome and the idempotency key a
/// `202` hands out.
type Finished = (Result<TurnOutcome, TurnError>, Option<String>);

struct StreamState {
    pending: VecDeque<Bytes>,
    rx: tokio::sync::mpsc::UnboundedReceiver<TurnEvent>,
    rx_open: bool,
    task: Option<JoinHandle<Finished>>,
    heartbeat: tokio::time::Interval,
    user: UserId,
}

/// Watches a turn's events on their way to the caller's sink, for the
/// metric line: when the first command started, the wake, steps started.
struct Seen<'a> {
    inner: &'a dyn TurnEvents,
    started: Instant,
    first_command_ms: OnceLock<u64>,
    waking_ms: OnceLock<u64>,
    ready_ms: OnceLock<u64>,
    steps: AtomicU64,
    requests_before_first_command: OnceLock<u64>,
}

impl<'a> Seen<'a> {
    fn new(inner: &'a dyn TurnEvents) -> Self {
        Seen {
            inner,
            started: Instant::now(),
            first_command_ms: OnceLock::new(),
            waking_ms: OnceLock::new(),
            ready_ms: OnceLock::new(),
            steps: AtomicU64::new(0),
            requests_before_first_command: OnceLock::new(),
        }
    }

    /// How long the machine took to wake, if this turn woke it.
    fn wake_ms(&self) -> Option<u64> {
        let waking = *self.waking_ms.get()?;
        Some(self.ready_ms.get()?.saturating_sub(waking))
    }
}

impl TurnEvents for Seen<'_> {
    fn emit(&self, event: TurnEvent) {
        match &event {
            TurnEvent::Machine {
                stage, elapsed_ms, ..
            } => match stage {
                MachineStage::Waking => {
                    let _ = self.waking_ms.set(*elapsed_ms);
                }
                MachineStage::Ready => {
                    let _ = self.ready_ms.set(*elapsed_ms);
                }
                _ => {}
            },
            TurnEvent::StepStarted { .. } => {
                let elapsed = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
                let _ = self.first_command_ms.set(elapsed);
                if let Some(n) = metrics::dedalus_requests_so_far() {
                    let _ = self.requests_before_first_command.set(n);
                }
                self.steps.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
        self.inner.emit(event);
    }
}

/// The turn's metric line ([`TURN_LINE`]): outcome (and problem code on
/// failure), latency, time to first command, wake, steps, LLM usage, output
/// and what the turn cost in Dedalus requests and table calls.
fn turn_line(
    metrics: &Metrics,
    result: &Result<TurnOutcome, TurnError>,
    seen: &Seen<'_>,
    tally: Tally,
) -> agenthome::metrics::EmfDoc {
    let mut doc = metrics.doc(&TURN_LINE);
    doc.metric("turns", 1)
        .millis("turn_total_ms", seen.started.elapsed())
        .metric("steps", seen.steps.load(Ordering::Relaxed))
        .metric("dedalus_requests", tally.dedalus_requests)
        .metric("table_calls", tally.table_calls);
    if let Some(ms) = seen.first_command_ms.get() {
        doc.metric("time_to_first_command_ms", *ms);
    }
    if let Some(ms) = seen.wake_ms() {
        doc.metric("wake_ms", ms);
    }
    if let Some(n) = seen.requests_before_first_command.get() {
        doc.metric("dedalus_requests_before_first_command", *n);
    }
    outcome_metrics(&mut doc, result);
    doc
}

/// The outcome's part of the turn's metric line: its dimension, its HTTP
/// status and, for a finished turn, what it used; for a failure, its code.
fn outcome_metrics(doc: &mut agenthome::metrics::EmfDoc, result: &Result<TurnOutcome, TurnError>) {
    match result {
        Ok(TurnOutcome::Done(r)) => {
            let output: u64 = r.steps.iter().map(|s| s.output_bytes).sum();
            doc.dimension("Outcome", status_name(r.status))
                .dimension("Transport", transport_name(r.transport))
                .metric("llm_calls", u64::from(r.usage.llm_calls))
                .metric("prompt_tokens", r.usage.prompt_tokens)
                .metric("completion_tokens", r.usage.completion_tokens)
                .metric("output_bytes", output)
                .property("turn_id", r.turn_id.as_str())
                .property("machine_id", r.machine_id.as_str())
                .property("status", 200);
        }
        Ok(TurnOutcome::Provisioning { record, .. }) => {
            doc.dimension("Outcome", "provisioning")
                .property("state", record.state.as_str())
                .property("status", 202);
        }
        Ok(TurnOutcome::Busy { .. }) => {
            doc.dimension("Outcome", "busy").property("status", 409);
        }
        Ok(TurnOutcome::Destroying) => {
            doc.dimension("Outcome", "destroying")
                .property("status", 409);
        }
        Ok(TurnOutcome::RateLimited { .. }) => {
            doc.dimension("Outcome", "rate_limited")
                .property("status", 429);
        }
        Err(e) => {
            let p = problem_of(e);
            doc.dimension("Outcome", "failed")
                .dimension("Code", &p.code)
                .metric("turn_failures", 1)
                .property("code", p.code.as_str())
                .property("status", p.status)
                .property("error", e.to_string());
        }
    }
}

fn status_name(s: AgentStatus) -> &'static str {
    match s {
        AgentStatus::Completed => "completed",
        AgentStatus::Deadline => "deadline",
        AgentStatus::StepLimit => "step_limit",
        AgentStatus::LeaseLost => "lease_lost",
    }
}

fn transport_name(t: Transport) -> &'static str {
    match t {
        Transport::Terminal => "terminal",
        Transport::Executions => "executions",
    }
}

/// The client asked for Server-Sent Events.
pub fn wants_event_stream(req: &Request) -> bool {
    req.headers()
        .get_all("accept")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',').any(|t| {
                t.trim()
                    .to_ascii_lowercase()
                    .starts_with("text/event-stream")
            })
        })
}

/// One SSE event: `event: <name>`, `data: <json on one line>`.
pub fn sse_event(ev: &TurnEvent) -> Bytes {
    Bytes::from(format!("event: {}\ndata: {}\n\n", ev.name(), ev.data()))
}

/// The turn's task panicked (or was cancelled): an internal problem.
fn task_failed(e: &tokio::task::JoinError) -> Problem {
    tracing::error!(error = %e, "the turn's task failed");
    Problem::internal("the turn failed; see the function's logs")
}

/// How a turn's result answers: its result, the machine still being
/// provisioned, or a problem.
enum Answer {
    Done(Box<agenthome::turn::TurnResult>),
    Provisioning {
        record: Box<agenthome::store::UserRecord>,
        retry_after: Duration,
    },
    Problem(Problem),
}

impl Answer {
    fn of(user: &UserId, result: Result<TurnOutcome, TurnError>) -> Self {
        match result {
            Ok(TurnOutcome::Done(r)) => Answer::Done(r),
            Ok(TurnOutcome::Provisioning {
                record,
                retry_after,
            }) => Answer::Provisioning {
                record,
                retry_after,
            },
            Ok(TurnOutcome::Busy { retry_after }) => {
                Answer::Problem(Problem::turn_in_progress(retry_after))
            }
            Ok(TurnOutcome::Destroying) => Answer::Problem(Problem::machine_destroying()),
            Ok(TurnOutcome::RateLimited { limit, retry_after }) => {
                Answer::Problem(FairUse::turn_limited(limit, retry_after))
            }
            Err(e) => Answer::Problem(turn_problem(user, &e)),
        }
    }
}

/// The response of a turn (the plain JSON path); `turn_key` is the
/// idempotency key a `202` asks the product to send the message again with.
fn respond(
    user: &UserId,
    result: Result<TurnOutcome, TurnError>,
    turn_key: Option<&str>,
) -> Response<Body> {
    match Answer::of(user, result) {
        Answer::Done(result) => entry::json(200, &result, None),
        Answer::Provisioning {
            record,
            retry_after,
        } => {
            let mut body = json!({
                "status": "provisioning",
                "state": record.state,
                "machine_id": record.machine_id,
                "retry_after_s": retry_after.as_millis().div_ceil(1000).max(1),
                "detail": resend_detail(turn_key),
            });
            if let Some(key) = turn_key {
                body["turn_id"] = json!(key);
            }
            entry::json(202, &body, Some(retry_after))
        }
        Answer::Problem(p) => entry::problem(&p),
    }
}

/// What a `202` (or a stream's last event) tells the product to do.
fn resend_detail(turn_key: Option<&str>) -> String {
    match turn_key {
        Some(key) => format!(
            "the user's machine is being prepared; send the message again after Retry-After with the header `Idempotency-Key: {key}` (it runs once)"
        ),
        None => "the user's machine is being prepared; send the message again after Retry-After"
            .to_string(),
    }
}

/// A stored turn result, returned again for a repeated `Idempotency-Key`.
fn replay(response: String) -> Response<Body> {
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .header("cache-control", "no-store")
        .body(Body::Text(response))
        .unwrap_or_else(|_| entry::problem(&Problem::internal("the response could not be built")))
}

/// Longest turn result stored under a key (bytes); the table's items stay
/// below DynamoDB's 400 KB.
const MAX_STORED_RESULT: usize = 300 * 1024;

/// The result as stored under its key: the whole JSON, or — when it is too
/// large — the same with the steps' output left out (`truncated`).
fn stored_result(r: &agenthome::turn::TurnResult) -> String {
    let whole = serde_json::to_string(r).unwrap_or_default();
    if whole.len() <= MAX_STORED_RESULT {
        return whole;
    }
    let mut slim = r.clone();
    for step in &mut slim.steps {
        step.output.clear();
        step.truncated = true;
    }
    serde_json::to_string(&slim).unwrap_or_default()
}

/// A table failure while handling the idempotency key.
fn key_store_problem(user: &UserId, e: &agenthome::store::StoreError) -> Problem {
    tracing::warn!(user_id = user.as_str(), error = %e, "turn key store failed");
    match e {
        agenthome::store::StoreError::InvalidArgument(m) => {
            Problem::of(ProblemCode::InvalidIdempotencyKey, m.clone())
        }
        _ => Problem::of(
            ProblemCode::TemporarilyUnavailable,
            "a dependency is temporarily unavailable; retry shortly",
        )
        .with_retry_after(Duration::from_secs(2)),
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The `error` event ending a stream whose turn did not produce a result.
fn stream_problem(
    user: &UserId,
    result: Result<TurnOutcome, TurnError>,
    turn_key: Option<&str>,
) -> Option<Problem> {
    match Answer::of(user, result) {
        Answer::Done(_) => None,
        // The machine is still being prepared (the wait ran out of time), or
        // it was lost during the turn and is being provisioned again.
        Answer::Provisioning { retry_after, .. } => Some(
            Problem::of(ProblemCode::MachineProvisioning, resend_detail(turn_key))
                .with_retry_after(retry_after),
        ),
        Answer::Problem(p) => Some(p),
    }
}

/// A whole response as one chunk of a streaming body.
pub fn full(resp: Response<Body>) -> Response<StreamBody> {
    resp.map(|b| match b {
        Body::Text(t) => StreamBody::full(Bytes::from(t)),
        Body::Binary(b) => StreamBody::full(Bytes::from(b)),
        _ => StreamBody::full(Bytes::new()),
    })
}

/// The body of a streaming response: one chunk (a JSON response) or a
/// stream of chunks (Server-Sent Events). It is an [`http_body::Body`] for
/// `lambda_http::run_with_streaming_response` and a [`Stream`] of chunks.
pub struct StreamBody(Inner);

enum Inner {
    Full(Option<Bytes>),
    Stream(Pin<Box<dyn Stream<Item = Bytes> + Send>>),
}

impl StreamBody {
    /// A body of one chunk.
    pub fn full(bytes: Bytes) -> Self {
        StreamBody(Inner::Full(Some(bytes)))
    }

    /// A body of `stream`'s chunks.
    pub fn stream(stream: impl Stream<Item = Bytes> + Send + 'static) -> Self {
        StreamBody(Inner::Stream(Box::pin(stream)))
    }
}

impl std::fmt::Debug for StreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Inner::Full(b) => f.debug_tuple("StreamBody::Full").field(b).finish(),
            Inner::Stream(_) => f.write_str("StreamBody::Stream"),
        }
    }
}

impl Stream for StreamBody {
    type Item = Bytes;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        match &mut self.0 {
            Inner::Full(b) => Poll::Ready(b.take()),
            Inner::Stream(s) => s.as_mut().poll_next(cx),
        }
    }
}

impl http_body::Body for StreamBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        self.poll_next(cx)
            .map(|chunk| chunk.map(|b| Ok(http_body::Frame::data(b))))
    }
}

impl<S, T> ChatTurnService<S, T> {
    /// The turn's time: `TURN_DEADLINE`, cut to the invocation's remaining
    /// time minus the margin when the runtime gave a deadline (a deadline
    /// already past leaves none: the turn answers `no_time` instead of
    /// running past the invocation's end).
    pub fn budget(&self, req: &Request) -> Duration {
        entry::time_left(req, self.margin)
            .map_or(self.turn_deadline, |left| left.min(self.turn_deadline))
    }
}

/// Map a failed turn to a problem a chat product can act on (no secrets:
/// error messages of the LLM client are redacted at the source).
pub fn turn_problem(user_id: &UserId, e: &TurnError) -> Problem {
    tracing::warn!(user_id = user_id.as_str(), error = %e, retryable = e.is_retryable(), "turn failed");
    problem_of(e)
}

/// [`turn_problem`] without the log line.
fn problem_of(e: &TurnError) -> Problem {
    match e {
        TurnError::Provision(ProvisionError::Failed { message }) => Problem::of(
            ProblemCode::ProvisioningFailed,
            format!("the user's machine could not be prepared ({message}); sending the message again starts it again"),
        ),
        TurnError::Agent(AgentError::Llm { source, .. }) => Problem::of(
            ProblemCode::LlmError,
            format!("the language model failed: {source}"),
        ),
        TurnError::Agent(AgentError::Runner { source, .. }) | TurnError::Runner(source) => {
            Problem::of(
                ProblemCode::ShellError,
                format!("the machine's shell failed: {source}"),
            )
        }
        TurnError::WakeTimeout => Problem::of(
            ProblemCode::MachineWaking,
            "the machine did not wake in time; retry shortly",
        ),
        TurnError::NoTime => Problem::of(ProblemCode::NoTime, "no time was left for the turn"),
        other if other.is_retryable() => Problem::of(
            ProblemCode::TemporarilyUnavailable,
            "a dependency is temporarily unavailable; retry shortly",
        ),
        _ => Problem::internal("the turn failed; see the function's logs"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_turn_errors_when_mapped_then_their_codes_are_declared_metric_dimension_values() {
        let errors = [
            TurnError::WakeTimeout,
            TurnError::NoTime,
            TurnError::MachineLost {
                machine_id: "dm-1".into(),
            },
            TurnError::Provision(ProvisionError::Failed {
                message: "bootstrap failed".into(),
            }),
            TurnError::Store(agenthome::store::StoreError::Malformed {
                attribute: "state".into(),
                message: "bad".into(),
            }),
        ];
        for e in &errors {
            let code = problem_of(e).code;
            assert!(
                agenthome::metrics::TURN_CODES.contains(&code.as_str()),
                "{code} is not a declared Code value"
            );
        }
    }
}

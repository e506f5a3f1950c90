//! The chat-turn function: `POST /v1/users/{user_id}/turns` (docs/design.md §3).
//! `main` only wires clients; this library maps the request to
//! [`agenthome::turn`] and the outcome back to HTTP, so tests can drive it
//! in-process against real adapters.

use agenthome::agent::{AgentError, AgentStatus};
use agenthome::api::{Problem, ProblemCode, TurnRequest};
use agenthome::entry::{self, Authorizer, AwakeBudget, FairUse, Route};
use agenthome::metrics::{self, Metrics, Tally, TURN_LINE};
use agenthome::provision::WorkerTrigger;
use agenthome::runner::Transport;
use agenthome::store::UserStore;
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
}

/// The default [`ChatTurnService::heartbeat`].
pub const HEARTBEAT: Duration = Duration::from_secs(15);

/// A validated turn request.
struct Prepared {
    user: String,
    request: TurnRequest,
    deadline: Instant,
}

impl<S, T> ChatTurnService<S, T>
where
    S: UserStore + Clone + 'static,
    T: WorkerTrigger,
{
    /// Handle one request; every failure is a problem response.
    pub async fn handle(&self, req: &Request) -> Response<Body> {
        match self.prepare(req).await {
            Ok(p) => {
                let user = p.user.clone();
                let result = self.run_measured(p, &NoEvents, "json").await;
                self.after_turn(&user).await;
                respond(&user, result)
            }
            Err(p) => entry::problem(&p),
        }
    }

    /// Run the turn, telling `sink` its progress, and emit its metric line
    /// (whatever the outcome; `mode` is `json` or `stream`).
    async fn run_measured(
        &self,
        p: Prepared,
        sink: &dyn TurnEvents,
        mode: &'static str,
    ) -> Result<TurnOutcome, TurnError> {
        let seen = Seen::new(sink);
        // Boxed: the turn's future is deep; the caller's stays small.
        let run = Box::pin(
            self.turns
                .run_with_events(&p.user, p.request, p.deadline, &seen),
        );
        let (result, tally) = metrics::tallied(run).await;
        let mut doc = turn_line(&self.metrics, &result, &seen, tally);
        doc.property("user_id", p.user.as_str())
            .property("mode", mode);
        self.metrics.emit(&doc);
        result
    }

    /// Bookkeeping after any turn: a machine whose awake budget ran out
    /// goes to sleep now.
    async fn after_turn(&self, user: &str) {
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
        let store = self.turns.provisioner().store();
        self.fair_use.admit_turn(store, &user).await?;
        if let Some(budget) = &self.awake_budget {
            budget.admit(store, &user).await?;
        }
        let body = entry::body_bytes(req, agenthome::api::turn_request::MAX_BODY_BYTES)?;
        let request = TurnRequest::from_json(body)?;
        let budget = self.budget(req);
        tracing::debug!(user_id = %user, budget_ms = budget.as_millis() as u64, "turn budget");
        Ok(Prepared {
            user: user.as_str().to_string(),
            request,
            deadline: Instant::now() + budget,
        })
    }
}

impl<S, T> ChatTurnService<S, T>
where
    S: UserStore + Clone + Send + Sync + 'static,
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
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let service = Arc::clone(&self);
        let user = p.user.clone();
        let task_user = p.user.clone();
        let mut task = tokio::spawn(async move {
            let result = service.run_measured(p, &tx, "stream").await;
            drop(tx);
            service.after_turn(&task_user).await;
            result
        });
        let mut first = VecDeque::new();
        loop {
            match rx.recv().await {
                Some(
                    ev @ TurnEvent::Machine {
                        stage: MachineStage::Provisioning,
                        ..
                    },
                ) => first.push_back(sse_event(&ev)),
                Some(ev) => {
                    first.push_back(sse_event(&ev));
                    break;
                }
                None => {
                    // Ended before streaming began: the plain response.
                    return full(match (&mut task).await {
                        Ok(result) => respond(&user, result),
                        Err(e) => entry::problem(&task_failed(&e)),
                    });
                }
            }
        }
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
        let stream = futures_util::stream::unfold(state, |mut st| async move {
            loop {
                if let Some(chunk) = st.pending.pop_front() {
                    return Some((chunk, st));
                }
                if st.rx_open {
                    tokio::select! {
                        ev = st.rx.recv() => match ev {
                            Some(ev) => {
                                st.heartbeat.reset();
                                return Some((sse_event(&ev), st));
                            }
                            None => st.rx_open = false,
                        },
                        _ = st.heartbeat.tick() => {
                            return Some((Bytes::from_static(b": keep-alive\n\n"), st));
                        }
                    }
                    continue;
                }
                // All events are out: the turn's task has returned (or is
                // returning); its failure, if any, is the last event.
                let task = st.task.take()?;
                let problem = match task.await {
                    Ok(result) => stream_problem(&st.user, result),
                    Err(e) => Some(task_failed(&e)),
                };
                if let Some(problem) = problem {
                    return Some((sse_event(&TurnEvent::Error(problem)), st));
                }
                return None;
            }
        });
        let resp = Response::builder()
            .status(200)
            .header("content-type", "text/event-stream")
            .header("cache-control", "no-cache")
            .header("x-accel-buffering", "no")
            .body(StreamBody::stream(stream));
        resp.unwrap_or_else(|_| full(entry::problem(&Problem::internal("no response"))))
    }
}

struct StreamState {
    pending: VecDeque<Bytes>,
    rx: tokio::sync::mpsc::UnboundedReceiver<TurnEvent>,
    rx_open: bool,
    task: Option<JoinHandle<Result<TurnOutcome, TurnError>>>,
    heartbeat: tokio::time::Interval,
    user: String,
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
                MachineStage::Provisioning | MachineStage::Woke => {}
            },
            TurnEvent::StepStarted { .. } => {
                let elapsed = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
                let _ = self.first_command_ms.set(elapsed);
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
    doc
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
    fn of(user: &str, result: Result<TurnOutcome, TurnError>) -> Self {
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
            Err(e) => Answer::Problem(turn_problem(user, &e)),
        }
    }
}

/// The response of a turn (the plain JSON path).
fn respond(user: &str, result: Result<TurnOutcome, TurnError>) -> Response<Body> {
    match Answer::of(user, result) {
        Answer::Done(result) => entry::json(200, &result, None),
        Answer::Provisioning {
            record,
            retry_after,
        } => entry::json(
            202,
            &json!({
                "status": "provisioning",
                "state": record.state,
                "machine_id": record.machine_id,
                "retry_after_s": retry_after.as_secs().max(1),
                "detail": "the user's machine is being prepared; send the message again after Retry-After",
            }),
            Some(retry_after),
        ),
        Answer::Problem(p) => entry::problem(&p),
    }
}

/// The `error` event ending a stream whose turn did not produce a result.
fn stream_problem(user: &str, result: Result<TurnOutcome, TurnError>) -> Option<Problem> {
    match Answer::of(user, result) {
        Answer::Done(_) => None,
        // The machine was lost during the turn and is being provisioned again.
        Answer::Provisioning { retry_after, .. } => Some(
            Problem::of(
                ProblemCode::MachineProvisioning,
                "the user's machine is being prepared; send the message again after Retry-After",
            )
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
pub fn turn_problem(user_id: &str, e: &TurnError) -> Problem {
    tracing::warn!(user_id, error = %e, retryable = e.is_retryable(), "turn failed");
    problem_of(e)
}

/// [`turn_problem`] without the log line.
fn problem_of(e: &TurnError) -> Problem {
    match e {
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

//! The chat-turn function: `POST /v1/users/{user_id}/turns` (DESIGN §3).
//! `main` only wires clients; this library maps the request to
//! [`agenthome::turn`] and the outcome back to HTTP, so tests can drive it
//! in-process against real adapters.

use agenthome::agent::AgentError;
use agenthome::api::{Problem, TurnRequest};
use agenthome::entry::{self, Authorizer, AwakeBudget, FairUse, Route};
use agenthome::provision::WorkerTrigger;
use agenthome::store::UserStore;
use agenthome::turn::{MachineStage, TurnError, TurnEvent, TurnOutcome, TurnService};
use bytes::Bytes;
use futures_util::Stream;
use lambda_http::{Body, Request, Response};
use serde_json::json;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Everything the handler needs, built once per cold start.
pub struct Service<S, T> {
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
}

/// The default [`Service::heartbeat`].
pub const HEARTBEAT: Duration = Duration::from_secs(15);

/// A validated turn request.
struct Prepared {
    user: String,
    request: TurnRequest,
    deadline: Instant,
}

impl<S, T> Service<S, T>
where
    S: UserStore + Clone + 'static,
    T: WorkerTrigger,
{
    /// Handle one request; every failure is a problem response.
    pub async fn handle(&self, req: &Request) -> Response<Body> {
        match self.prepare(req).await {
            Ok(p) => {
                let result = self.turns.run(&p.user, p.request, p.deadline).await;
                self.after_turn(&p.user).await;
                respond(&p.user, result)
            }
            Err(p) => problem_response(&p),
        }
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
            return Err(Problem::not_found(
                "no_such_route",
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

impl<S, T> Service<S, T>
where
    S: UserStore + Clone + Send + Sync + 'static,
    T: WorkerTrigger + 'static,
{
    /// The streaming entry point (`RESPONSE_MODE=streaming`, a Function URL
    /// with `InvokeMode: RESPONSE_STREAM`). With `Accept: text/event-stream`
    /// the turn's progress streams as Server-Sent Events
    /// ([`agenthome::turn::TurnEvent`]: `event: <name>`, `data: <json>`;
    /// the last event is `done` with the turn result or `error` with a
    /// problem). Without it, the response is the one [`Service::handle`]
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
            Err(p) => return full(problem_response(&p)),
        };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let service = Arc::clone(&self);
        let user = p.user.clone();
        let mut task = tokio::spawn(async move {
            let result = service
                .turns
                .run_with_events(&p.user, p.request, p.deadline, &tx)
                .await;
            drop(tx);
            service.after_turn(&p.user).await;
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
                        Err(e) => problem_response(&task_failed(&e)),
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
        resp.unwrap_or_else(|_| full(problem_response(&Problem::internal("no response"))))
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

/// The response of a turn (the plain JSON path).
fn respond(user: &str, result: Result<TurnOutcome, TurnError>) -> Response<Body> {
    match result {
        Ok(TurnOutcome::Done(result)) => entry::json(200, &result, None),
        Ok(TurnOutcome::Provisioning {
            record,
            retry_after,
        }) => entry::json(
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
        Ok(TurnOutcome::Busy { retry_after }) => problem_response(
            &Problem::new(
                409,
                "turn_in_progress",
                "Conflict",
                "another turn for this user is running; retry after it finishes",
            )
            .with_retry_after(retry_after),
        ),
        Ok(TurnOutcome::Destroying) => problem_response(&destroying()),
        Err(e) => problem_response(&turn_problem(user, &e)),
    }
}

/// The `error` event ending a stream whose turn did not produce a result.
fn stream_problem(user: &str, result: Result<TurnOutcome, TurnError>) -> Option<Problem> {
    match result {
        Ok(TurnOutcome::Done(_)) => None,
        // The machine was lost during the turn and is being provisioned again.
        Ok(TurnOutcome::Provisioning { retry_after, .. }) => Some(
            Problem::upstream(
                503,
                "machine_provisioning",
                "the user's machine is being prepared; send the message again after Retry-After",
            )
            .with_retry_after(retry_after),
        ),
        Ok(TurnOutcome::Busy { retry_after }) => Some(
            Problem::new(
                409,
                "turn_in_progress",
                "Conflict",
                "another turn for this user is running; retry after it finishes",
            )
            .with_retry_after(retry_after),
        ),
        Ok(TurnOutcome::Destroying) => Some(destroying()),
        Err(e) => Some(turn_problem(user, &e)),
    }
}

fn destroying() -> Problem {
    Problem::new(
        409,
        "machine_destroying",
        "Conflict",
        "the user's machine is being destroyed",
    )
}

fn problem_response(p: &Problem) -> Response<Body> {
    if p.status >= 500 {
        tracing::error!(status = p.status, code = %p.code, detail = %p.detail, "turn failed");
    }
    entry::problem(p)
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

impl<S, T> Service<S, T> {
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
    let retry = Duration::from_secs(5);
    match e {
        TurnError::Agent(AgentError::Llm { source, .. }) => Problem::upstream(
            502,
            "llm_error",
            format!("the language model failed: {source}"),
        ),
        TurnError::Agent(AgentError::Runner { source, .. }) | TurnError::Runner(source) => {
            Problem::upstream(
                502,
                "shell_error",
                format!("the machine's shell failed: {source}"),
            )
        }
        TurnError::WakeTimeout => Problem::upstream(
            503,
            "machine_waking",
            "the machine did not wake in time; retry shortly",
        )
        .with_retry_after(retry),
        TurnError::NoTime => Problem::upstream(503, "no_time", "no time was left for the turn")
            .with_retry_after(retry),
        other if other.is_retryable() => Problem::upstream(
            503,
            "temporarily_unavailable",
            "a dependency is temporarily unavailable; retry shortly",
        )
        .with_retry_after(retry),
        _ => Problem::internal("the turn failed; see the function's logs"),
    }
}

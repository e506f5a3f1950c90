//! The chat-turn function: `POST /v1/users/{user_id}/turns` (DESIGN §3).
//! `main` only wires clients; this library maps the request to
//! [`agenthome::turn`] and the outcome back to HTTP, so tests can drive it
//! in-process against real adapters.

use agenthome::agent::AgentError;
use agenthome::api::{AuthMode, Problem, TurnRequest};
use agenthome::entry::{self, Route};
use agenthome::provision::WorkerTrigger;
use agenthome::store::UserStore;
use agenthome::turn::{TurnError, TurnOutcome, TurnService};
use lambda_http::{Body, Request, Response};
use serde_json::json;
use std::time::Duration;
use tokio::time::Instant;

/// Everything the handler needs, built once per cold start.
pub struct Service<S, T> {
    /// The turn service (provisioning, agent, settings).
    pub turns: TurnService<S, T>,
    /// Who may call.
    pub auth_mode: AuthMode,
    /// The scope that may act for any user.
    pub admin_scope: String,
    /// Upper bound of a turn (`TURN_DEADLINE`).
    pub turn_deadline: Duration,
    /// Kept before the Lambda deadline for the response itself.
    pub margin: Duration,
}

impl<S, T> Service<S, T>
where
    S: UserStore + Clone + 'static,
    T: WorkerTrigger,
{
    /// Handle one request; every failure is a problem response.
    pub async fn handle(&self, req: &Request) -> Response<Body> {
        match self.turn(req).await {
            Ok(resp) => resp,
            Err(p) => {
                if p.status >= 500 {
                    tracing::error!(status = p.status, code = %p.code, detail = %p.detail, "turn failed");
                }
                entry::problem(&p)
            }
        }
    }

    async fn turn(&self, req: &Request) -> Result<Response<Body>, Problem> {
        let route = entry::route(req)?;
        let Route::Turn(user) = route else {
            return Err(Problem::not_found(
                "no_such_route",
                "this function serves POST /v1/users/{user_id}/turns only",
            ));
        };
        entry::authorize(req, self.auth_mode, &self.admin_scope, &user)?;
        let body = entry::body_bytes(req, agenthome::api::turn_request::MAX_BODY_BYTES)?;
        let request = TurnRequest::from_json(body)?;
        let budget = self.budget(req);
        tracing::debug!(user_id = %user, budget_ms = budget.as_millis() as u64, "turn budget");
        let deadline = Instant::now() + budget;
        match self.turns.run(user.as_str(), request, deadline).await {
            Ok(TurnOutcome::Done(result)) => Ok(entry::json(200, &result, None)),
            Ok(TurnOutcome::Provisioning {
                record,
                retry_after,
            }) => Ok(entry::json(
                202,
                &json!({
                    "status": "provisioning",
                    "state": record.state,
                    "machine_id": record.machine_id,
                    "retry_after_s": retry_after.as_secs().max(1),
                    "detail": "the user's machine is being prepared; send the message again after Retry-After",
                }),
                Some(retry_after),
            )),
            Ok(TurnOutcome::Busy { retry_after }) => Err(Problem::new(
                409,
                "turn_in_progress",
                "Conflict",
                "another turn for this user is running; retry after it finishes",
            )
            .with_retry_after(retry_after)),
            Ok(TurnOutcome::Destroying) => Err(Problem::new(
                409,
                "machine_destroying",
                "Conflict",
                "the user's machine is being destroyed",
            )),
            Err(e) => Err(turn_problem(user.as_str(), &e)),
        }
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

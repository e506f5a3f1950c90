//! A new user's first message (docs/design.md §5 "First message"): the turn
//! that found no ready machine waits for the provisioning it started, then
//! runs — instead of answering `202` at once.
//!
//! Waiting reads the user's item (strongly consistent `GetItem`) with a
//! bounded backoff ([`FirstTurn::poll_first`] doubling up to
//! [`FirstTurn::poll_max`]); it never calls Dedalus and holds no lease (the
//! turn service returned before taking one), so the worker and other turns
//! are never blocked by a waiting turn. Each stage the worker records
//! (`claimed`, `creating`, `booting`, `bootstrapping`) becomes a `machine`
//! event with the time spent in it.
//!
//! When the wait must end first (the API's deadline), the answer is `202`
//! with a `Retry-After` computed from the expected remaining time: the
//! typical duration of the current stage minus the time already spent in
//! it, plus the typical durations of the stages after it. Typical durations
//! start from [`DEFAULT_STAGE_MS`] and follow what this instance observed
//! (each stage's duration as recorded on the item, averaged with weight ¼).
//!
//! This module also holds the `Idempotency-Key` header's parsing and the
//! request fingerprint a key is bound to.

use crate::api::UserId;
use crate::api::{Problem, ProblemCode, TurnRequest};
use crate::clock::now_ms;
use crate::store::turn_keys::MAX_TURN_KEY_BYTES;
use crate::store::{MachineState, ProvisionStage, StageReader, StageView, StoreError, UserRecord};
use crate::turn::{MachineStage, TurnEvent, TurnEvents};
use lambda_http::Request;
use sha2::{Digest, Sha256};
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// Default `FIRST_TURN_WAIT`: how long the JSON route waits for a new
/// machine (API Gateway cuts the request at 30 s).
pub const DEFAULT_FIRST_TURN_WAIT: Duration = Duration::from_secs(25);

/// Longest the streaming route waits (it is also cut by the invocation's
/// deadline).
pub const STREAM_WAIT: Duration = Duration::from_secs(300);

/// Typical duration of each stage (claimed, creating, booting,
/// bootstrapping) before any was observed, in ms.
pub const DEFAULT_STAGE_MS: [u64; 4] = [1_000, 2_000, 8_000, 15_000];

/// Time a wait leaves before the request's deadline for the turn itself.
pub const MIN_TURN_TIME: Duration = Duration::from_secs(5);

/// The shortest and longest `Retry-After` of a `202`.
const RETRY_BOUNDS: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(120));

/// How a first message waits for provisioning.
#[derive(Debug)]
pub struct FirstTurn {
    /// The JSON route's wait budget (`FIRST_TURN_WAIT`; zero: answer `202`
    /// at once).
    pub wait: Duration,
    /// The streaming route's wait budget (zero: answer `202` at once).
    pub stream_wait: Duration,
    /// The first pause between two reads of the item.
    pub poll_first: Duration,
    /// The longest pause between two reads.
    pub poll_max: Duration,
    typical_ms: Mutex<[u64; 4]>,
}

/// What a wait ended with.
#[derive(Debug, Clone, PartialEq)]
pub enum Waited {
    /// The machine is ready: run the turn.
    Ready,
    /// Provisioning failed (`last_error` says why).
    Failed(Box<UserRecord>),
    /// The user's machine is being destroyed, or the item is gone.
    Destroying,
    /// Time is up; provisioning goes on. The item as last read.
    Pending(Box<StageView>),
}

/// A `FIRST_TURN_WAIT` value that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("FIRST_TURN_WAIT={value:?} is not a duration (e.g. 25s, 0s): {reason}")]
pub struct FirstTurnWaitError {
    value: String,
    reason: String,
}

impl FirstTurn {
    /// Wait up to `wait` on the JSON route and up to [`STREAM_WAIT`] on the
    /// streaming route (none at all when `wait` is zero).
    pub fn new(wait: Duration) -> Self {
        FirstTurn {
            wait,
            stream_wait: if wait.is_zero() {
                Duration::ZERO
            } else {
                STREAM_WAIT.max(wait)
            },
            poll_first: Duration::from_millis(200),
            poll_max: Duration::from_secs(1),
            typical_ms: Mutex::new(DEFAULT_STAGE_MS),
        }
    }

    /// From `FIRST_TURN_WAIT` (default [`DEFAULT_FIRST_TURN_WAIT`]).
    pub fn from_env() -> Result<Self, FirstTurnWaitError> {
        match std::env::var("FIRST_TURN_WAIT") {
            Ok(raw) if !raw.trim().is_empty() => humantime::parse_duration(raw.trim())
                .map(Self::new)
                .map_err(|e| FirstTurnWaitError {
                    value: raw,
                    reason: e.to_string(),
                }),
            _ => Ok(Self::new(DEFAULT_FIRST_TURN_WAIT)),
        }
    }

    /// Until when a request that started at `started` and must end by
    /// `deadline` may wait (`None`: not at all). The wait leaves
    /// [`MIN_TURN_TIME`] for the turn.
    pub fn wait_until(
        &self,
        started: Instant,
        deadline: Instant,
        streaming: bool,
    ) -> Option<Instant> {
        let budget = if streaming {
            self.stream_wait
        } else {
            self.wait
        };
        if budget.is_zero() {
            return None;
        }
        let until = (started + budget).min(deadline.checked_sub(MIN_TURN_TIME)?);
        (until > Instant::now()).then_some(until)
    }

    /// Wait until the user's machine is ready (or provisioning failed, or
    /// `until`), telling `sink` each stage. `started` is when the request
    /// started (events' `elapsed_ms`).
    pub async fn wait<S: StageReader>(
        &self,
        store: &S,
        user_id: &UserId,
        until: Instant,
        started: Instant,
        sink: &dyn TurnEvents,
    ) -> Result<Waited, StoreError> {
        let mut pause = self.poll_first;
        let mut seen: Option<(ProvisionStage, u64)> = None;
        loop {
            let Some(view) = store.get_with_stage(user_id).await? else {
                return Ok(Waited::Destroying);
            };
            match view.record.state {
                MachineState::Ready => {
                    if let Some((stage, since)) = seen {
                        self.learn(stage, view.record.updated_at.saturating_sub(since));
                    }
                    return Ok(Waited::Ready);
                }
                MachineState::Failed => return Ok(Waited::Failed(Box::new(view.record))),
                MachineState::Destroying => return Ok(Waited::Destroying),
                MachineState::Provisioning | MachineState::Bootstrapping => {}
            }
            if let Some(stage) = view.stage {
                if seen != Some((stage, view.since_ms)) {
                    if let Some((before, since)) = seen {
                        if before.index() + 1 == stage.index() {
                            self.learn(before, view.since_ms.saturating_sub(since));
                        }
                    }
                    seen = Some((stage, view.since_ms));
                    sink.emit(stage_event(&view, stage, started));
                }
            }
            let now = Instant::now();
            if now >= until {
                return Ok(Waited::Pending(Box::new(view)));
            }
            tokio::time::sleep(pause.min(until - now)).await;
            pause = (pause * 2).min(self.poll_max);
        }
    }

    /// The expected time until the machine is ready: what is left of the
    /// current stage's typical duration (at least a quarter of a second),
    /// plus the typical durations of the stages after it; within 1 s–120 s.
    pub fn retry_after(&self, view: &StageView, now_ms: u64) -> Duration {
        let Some(stage) = view.stage else {
            return RETRY_BOUNDS.0;
        };
        let typical = *self.lock();
        let spent = now_ms.saturating_sub(view.since_ms);
        let current = typical[stage.index()].saturating_sub(spent).max(250);
        let later: u64 = typical[stage.index() + 1..].iter().sum();
        Duration::from_millis(current + later).clamp(RETRY_BOUNDS.0, RETRY_BOUNDS.1)
    }

    /// The `Retry-After` for the user's item as it is now (one read; the
    /// turn service's own estimate if the item cannot be read).
    pub async fn retry_after_now<S: StageReader>(
        &self,
        store: &S,
        user_id: &UserId,
        fallback: Duration,
    ) -> Duration {
        match store.get_with_stage(user_id).await {
            Ok(Some(view)) => self.retry_after(&view, now_ms()),
            Ok(None) => fallback,
            Err(e) => {
                tracing::warn!(user_id = user_id.as_str(), error = %e, "could not read the provisioning stage");
                fallback
            }
        }
    }

    /// Note that `stage` took `took_ms` (weight ¼ against what was known).
    fn learn(&self, stage: ProvisionStage, took_ms: u64) {
        let mut typical = self.lock();
        let slot = &mut typical[stage.index()];
        *slot = (*slot * 3 + took_ms) / 4;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, [u64; 4]> {
        self.typical_ms
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The `machine` event of a provisioning stage.
fn stage_event(view: &StageView, stage: ProvisionStage, started: Instant) -> TurnEvent {
    TurnEvent::Machine {
        stage: MachineStage::from(stage),
        phase: view.record.state.as_str().to_string(),
        elapsed_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        stage_elapsed_ms: Some(now_ms().saturating_sub(view.since_ms)),
        woke: None,
    }
}

/// The request's `Idempotency-Key`, if any: 1 to 128 visible ASCII
/// characters, else a 400 problem.
pub fn idempotency_key(req: &Request) -> Result<Option<String>, Problem> {
    let Some(raw) = req.headers().get("idempotency-key") else {
        return Ok(None);
    };
    let bad = |why: &str| {
        Problem::of(
            ProblemCode::InvalidIdempotencyKey,
            format!("Idempotency-Key {why}; use 1 to {MAX_TURN_KEY_BYTES} visible ASCII characters (e.g. a UUID)"),
        )
    };
    let key = raw.to_str().map_err(|_| bad("is not ASCII"))?.trim();
    if key.is_empty() {
        return Err(bad("is empty"));
    }
    if key.len() > MAX_TURN_KEY_BYTES {
        return Err(bad(&format!("is {} bytes long", key.len())));
    }
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad("has a space or a control character"));
    }
    Ok(Some(key.to_string()))
}

/// The fingerprint a key is bound to: SHA-256 (hex) of the message and the
/// history, so the same request sent again matches whatever its JSON
/// formatting.
pub fn request_hash(request: &TurnRequest) -> String {
    let mut h = Sha256::new();
    h.update(request.message.as_bytes());
    for entry in &request.history {
        h.update([0u8]);
        h.update(match entry.role {
            crate::api::Role::User => b"u",
            crate::api::Role::Assistant => b"a",
        });
        h.update((entry.content.len() as u64).to_be_bytes());
        h.update(entry.content.as_bytes());
    }
    // Ending the conversation is part of what the request asks.
    if request.end_conversation {
        h.update(b"\x01end");
    }
    hex_lower(&h.finalize())
}

fn hex_lower(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::user_id::uid;
    use crate::store::{Lease, LeaseKind, LeasePurpose, MemoryStore, UserStore};

    fn view(stage: ProvisionStage, since_ms: u64, store_rec: UserRecord) -> StageView {
        StageView {
            record: store_rec,
            stage: Some(stage),
            since_ms,
        }
    }

    async fn record() -> UserRecord {
        let store = MemoryStore::new();
        let lease = Lease::new("t", LeaseKind::Provision, 10);
        match store
            .claim(&uid("u"), &crate::store::new_create_key(), &lease, 1)
            .await
            .expect("claim")
        {
            crate::store::ClaimOutcome::Claimed(r) => r,
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn given_a_stage_when_estimated_then_retry_after_is_what_remains_of_the_typical_times() {
        let ft = FirstTurn::new(Duration::from_secs(25));
        let rec = record().await;
        // Booting for 3 s of a typical 8 s, then 15 s of bootstrap: 20 s.
        let booting = view(ProvisionStage::Booting, 10_000, rec.clone());
        assert_eq!(ft.retry_after(&booting, 13_000), Duration::from_secs(20));
        // Late in the bootstrap: what is left of it, at least 1 s.
        let late = view(ProvisionStage::Bootstrapping, 0, rec.clone());
        assert_eq!(ft.retry_after(&late, 14_000), Duration::from_secs(1));
        // Learned: booting took 2 s twice → 8 s becomes 6.5 s, then 5.375 s.
        ft.learn(ProvisionStage::Booting, 2_000);
        ft.learn(ProvisionStage::Booting, 2_000);
        assert_eq!(
            ft.retry_after(&booting, 13_000),
            Duration::from_millis(2_375 + 15_000)
        );
    }

    #[tokio::test]
    async fn given_a_worker_when_waited_on_then_stages_are_reported_and_ready_ends_the_wait() {
        let store = std::sync::Arc::new(MemoryStore::new());
        let key = crate::store::new_create_key();
        let lease = Lease::new("trigger", LeaseKind::Provision, now_ms() + 60_000);
        store
            .claim(&uid("u"), &key, &lease, now_ms())
            .await
            .expect("claim");
        let worker = {
            let store = store.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(150)).await;
                store
                    .release_lease(&uid("u"), "trigger", now_ms())
                    .await
                    .expect("release");
                let until = now_ms() + 60_000;
                store
                    .acquire_lease(&uid("u"), "w", LeasePurpose::Provision, until, now_ms())
                    .await
                    .expect("acquire");
                tokio::time::sleep(Duration::from_millis(300)).await;
                store
                    .record_machine_id(&uid("u"), &key, "dm-1", now_ms())
                    .await
                    .expect("record");
                tokio::time::sleep(Duration::from_millis(300)).await;
                store
                    .mark_bootstrapping(&uid("u"), "w", now_ms())
                    .await
                    .expect("bootstrapping");
                tokio::time::sleep(Duration::from_millis(300)).await;
                store
                    .mark_ready(&uid("u"), "w", "v", now_ms())
                    .await
                    .expect("ready");
            })
        };
        let mut ft = FirstTurn::new(Duration::from_secs(10));
        ft.poll_first = Duration::from_millis(20);
        ft.poll_max = Duration::from_millis(50);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let started = Instant::now();
        let until = started + Duration::from_secs(10);
        let waited = ft
            .wait(&store, &uid("u"), until, started, &tx)
            .await
            .expect("wait");
        worker.await.expect("worker");
        assert_eq!(waited, Waited::Ready);
        drop(tx);
        let mut stages = Vec::new();
        while let Some(TurnEvent::Machine {
            stage,
            stage_elapsed_ms,
            ..
        }) = rx.recv().await
        {
            assert!(stage_elapsed_ms.is_some());
            stages.push(stage);
        }
        assert_eq!(
            stages,
            [
                MachineStage::Claimed,
                MachineStage::Creating,
                MachineStage::Booting,
                MachineStage::Bootstrapping
            ]
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "ready ends the wait"
        );
    }

    #[tokio::test]
    async fn given_no_worker_when_the_time_is_up_then_the_wait_ends_pending() {
        let store = MemoryStore::new();
        let lease = Lease::new("t", LeaseKind::Provision, now_ms() + 60_000);
        store
            .claim(&uid("u"), &crate::store::new_create_key(), &lease, now_ms())
            .await
            .expect("claim");
        let ft = FirstTurn::new(Duration::from_secs(1));
        let started = Instant::now();
        let waited = ft
            .wait(
                &store,
                &uid("u"),
                started + Duration::from_millis(300),
                started,
                &crate::turn::NoEvents,
            )
            .await
            .expect("wait");
        assert!(matches!(waited, Waited::Pending(v) if v.stage == Some(ProvisionStage::Claimed)));
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn given_the_same_request_when_hashed_then_only_its_content_counts() {
        let a = TurnRequest::from_json(br#"{"message":"ls"}"#).expect("valid");
        let b = TurnRequest::from_json(br#"{ "message" : "ls" }"#).expect("valid");
        let c = TurnRequest::from_json(br#"{"message":"ls -a"}"#).expect("valid");
        assert_eq!(request_hash(&a), request_hash(&b));
        assert_ne!(request_hash(&a), request_hash(&c));
    }
}

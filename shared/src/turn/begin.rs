//! The turn's first step: one conditional table write
//! ([`UserStore::begin_turn`]) takes the turn lease on a ready item with a
//! machine, records activity and counts fair use; a refusal is routed from
//! the item the refused write returned, as the separate read and lease
//! calls were before: `destroying` → [`TurnOutcome::Destroying`], not
//! ready → provisioning (202), another turn's lease → busy (409), the
//! provisioning worker's → provisioning, the sweep's (one API call) →
//! wait briefly and try again.

use crate::api::UserId;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::events::EventObserver;
use super::{millis, TurnError, TurnOutcome, TurnService};
use crate::clock::now_ms;
use crate::provision::WorkerTrigger;
use crate::store::{BeginTurn, LeaseKind, MachineState, TurnCount, UserRecord, UserStore};

/// The fair-use window of `MAX_TURNS_PER_MINUTE`.
const RATE_WINDOW_MS: u64 = 60_000;

/// Most users whose counter window is remembered (then forgotten at once).
const MAX_REMEMBERED: usize = 10_000;

/// The fair-use window each user's item was last seen with, per process
/// (a warm Lambda instance): picks the form of the counting write so a
/// turn costs one write; a wrong or missing guess costs a second one.
#[derive(Debug, Default)]
pub(super) struct RateWindows(Mutex<HashMap<UserId, u64>>);

impl RateWindows {
    fn get(&self, user_id: &UserId) -> Option<u64> {
        self.0.lock().ok()?.get(user_id).copied()
    }

    fn note(&self, rec: &UserRecord) {
        let (Some(window), Ok(mut map)) = (rec.turns.window, self.0.lock()) else {
            return;
        };
        if map.len() >= MAX_REMEMBERED {
            map.clear();
        }
        map.insert(rec.user_id.clone(), window);
    }
}

/// What to do about a refused begin.
enum Refusal {
    /// Answer with this outcome.
    Outcome(TurnOutcome),
    /// The item is not ready (or has no machine): provisioning.
    Provision,
    /// Try again after this pause (the sweep's lease; a lease that expired
    /// meanwhile).
    Retry(Duration),
}

impl<S, T> TurnService<S, T>
where
    S: UserStore + Clone + 'static,
    T: WorkerTrigger,
{
    /// Begin the turn as `owner`: the item with the lease ours, or the
    /// outcome to answer with instead.
    pub(super) async fn begin(
        &self,
        user_id: &UserId,
        owner: &str,
        turns_per_minute: u32,
        obs: &EventObserver<'_>,
    ) -> Result<Result<UserRecord, TurnOutcome>, TurnError> {
        let store = self.provisioner.store();
        let ttl = millis(self.settings.lease_ttl);
        let give_up = Instant::now() + self.settings.sweep_wait;
        // Bounded: a lease that expires between our write and our look
        // makes the next attempt succeed; anything else returns.
        for _ in 0..100 {
            let now = now_ms();
            let count = (turns_per_minute > 0).then(|| TurnCount {
                limit: turns_per_minute,
                window_ms: RATE_WINDOW_MS,
                stored_window: self.windows.get(user_id),
            });
            let current = match store
                .begin_turn(user_id, owner, now + ttl, count, now)
                .await?
            {
                BeginTurn::Begun(rec) => {
                    self.windows.note(&rec);
                    return Ok(Ok(rec));
                }
                BeginTurn::Limited { retry_after_ms } => {
                    tracing::info!(
                        user_id = user_id.as_str(),
                        limit = turns_per_minute,
                        "fair-use limit reached"
                    );
                    return Ok(Err(TurnOutcome::RateLimited {
                        limit: turns_per_minute,
                        retry_after: Duration::from_millis(retry_after_ms.max(1000)),
                    }));
                }
                BeginTurn::NoItem => return self.provisioning(user_id, obs).await.map(Err),
                BeginTurn::Refused(current) => current,
            };
            self.windows.note(&current);
            match refusal(current, give_up) {
                Refusal::Outcome(outcome) => return Ok(Err(outcome)),
                Refusal::Provision => return self.provisioning(user_id, obs).await.map(Err),
                Refusal::Retry(pause) => tokio::time::sleep(pause).await,
            }
        }
        Ok(Err(TurnOutcome::Busy {
            retry_after: Duration::from_secs(1),
        }))
    }
}

/// Why `current` refused the turn, and what follows.
fn refusal(current: UserRecord, give_up: Instant) -> Refusal {
    if current.state == MachineState::Destroying {
        return Refusal::Outcome(TurnOutcome::Destroying);
    }
    if current.state != MachineState::Ready || current.machine_id.is_none() {
        return Refusal::Provision;
    }
    let now = now_ms();
    let Some(lease) = current.live_lease(now).cloned() else {
        return Refusal::Retry(Duration::ZERO);
    };
    match lease.kind {
        LeaseKind::Turn => {
            let left = lease.until.saturating_sub(now);
            Refusal::Outcome(TurnOutcome::Busy {
                retry_after: Duration::from_millis(left.clamp(1000, 30_000)),
            })
        }
        LeaseKind::Provision => Refusal::Outcome(TurnOutcome::Provisioning {
            record: Box::new(current),
            retry_after: Duration::from_secs(5),
        }),
        LeaseKind::Sweep if Instant::now() < give_up => Refusal::Retry(Duration::from_millis(100)),
        LeaseKind::Sweep => Refusal::Outcome(TurnOutcome::Busy {
            retry_after: Duration::from_secs(1),
        }),
    }
}

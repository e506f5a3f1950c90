//! Fair use per user: how many turns a user may start per minute
//! (`MAX_TURNS_PER_MINUTE`) and how many status reads per minute reach
//! Dedalus (`MAX_STATUS_READS_PER_MINUTE`; above it the status comes from
//! the table). Counted atomically on the user's own item
//! ([`UserStore::count_request`]), so one user's loop never costs another
//! user anything and every instance shares the same count.

use crate::api::{Problem, ProblemCode, UserId};
use crate::clock::now_ms;
use crate::store::{CountOutcome, Counter, UserStore};
use std::time::Duration;

/// The counting window.
const WINDOW: Duration = Duration::from_secs(60);

/// Per-user limits; `0` turns a limit off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FairUse {
    /// `MAX_TURNS_PER_MINUTE`
    pub turns_per_minute: u32,
    /// `MAX_STATUS_READS_PER_MINUTE`
    pub status_reads_per_minute: u32,
}

impl FairUse {
    /// No limits.
    pub const OFF: FairUse = FairUse {
        turns_per_minute: 0,
        status_reads_per_minute: 0,
    };

    /// The limits the configuration sets.
    pub fn from_config(c: &crate::config::Config) -> Self {
        FairUse {
            turns_per_minute: c.max_turns_per_minute,
            status_reads_per_minute: c.max_status_reads_per_minute,
        }
    }

    /// Count a turn of `user`; above the limit a 429 problem with
    /// `Retry-After` until the window ends.
    pub async fn admit_turn<S: UserStore>(&self, store: &S, user: &UserId) -> Result<(), Problem> {
        match count(store, user, Counter::Turns, self.turns_per_minute).await {
            Some(retry_after) => Err(Self::turn_limited(self.turns_per_minute, retry_after)),
            None => Ok(()),
        }
    }

    /// The 429 problem of a user over `limit` turns per minute.
    pub fn turn_limited(limit: u32, retry_after: Duration) -> Problem {
        Problem::of(
            ProblemCode::RateLimited,
            format!("at most {limit} turns per minute per user; retry after Retry-After"),
        )
        .with_retry_after(retry_after)
    }

    /// Count a status read of `user`; `false` when it must not reach Dedalus.
    pub async fn live_status_allowed<S: UserStore>(&self, store: &S, user: &UserId) -> bool {
        count(
            store,
            user,
            Counter::StatusReads,
            self.status_reads_per_minute,
        )
        .await
        .is_none()
    }
}

/// `Some(retry_after)` when `user` is over `limit`. A counter that cannot
/// be written admits the request (fair use must not turn a table hiccup
/// into an outage); a user without an item has nothing to count yet.
async fn count<S: UserStore>(
    store: &S,
    user: &UserId,
    counter: Counter,
    limit: u32,
) -> Option<Duration> {
    if limit == 0 {
        return None;
    }
    let window_ms = WINDOW.as_millis() as u64;
    match store
        .count_request(user, counter, limit, window_ms, now_ms())
        .await
    {
        Ok(CountOutcome::Limited { retry_after_ms }) => {
            tracing::info!(user_id = %user, ?counter, limit, "fair-use limit reached");
            Some(Duration::from_millis(retry_after_ms))
        }
        Ok(CountOutcome::Counted | CountOutcome::NoItem) => None,
        Err(e) => {
            tracing::warn!(user_id = %user, ?counter, error = %e, "fair-use counter not written; admitting");
            None
        }
    }
}

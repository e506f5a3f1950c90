//! Per-user awake budget (`MAX_AWAKE_PER_DAY`, off by default): once a
//! user's machine has been awake that long in the current UTC day, the
//! machine is put to sleep after the turn that reached it, and further
//! turns get 429 `awake_budget_exhausted` with `Retry-After` until the day
//! rolls over.
//!
//! Awake time today = awake time closed since the day's baseline
//! (`awake_ms_total` as of the day's first turn, recorded once per day on
//! the user's item by [`UserStore::note_awake_day`]; a period that began
//! before midnight counts only from midnight) plus the current awake
//! period since midnight. Machines only wake for turns, so the first turn
//! of a day sees every awake period of that day.

use crate::api::{Problem, ProblemCode, UserId};
use crate::clock::now_ms;
use crate::store::{UserRecord, UserStore};
use crate::sweep::Sweeper;
use std::time::Duration;
use tokio::time::Instant;

/// One UTC day in ms.
pub const DAY_MS: u64 = 86_400_000;

/// How long the sleep after an exhausting turn may take.
const SLEEP_WAIT: Duration = Duration::from_secs(20);

/// Start (epoch ms) of the UTC day containing `now_ms`.
pub fn day_start(now_ms: u64) -> u64 {
    now_ms - now_ms % DAY_MS
}

/// `awake_ms_total` as it stood at `day_start`, estimated now: an awake
/// period that began before midnight counts as closed up to midnight.
pub fn baseline(rec: &UserRecord, day_start: u64) -> u64 {
    let before_midnight = rec
        .awake_since
        .filter(|since| *since < day_start)
        .map_or(0, |since| day_start - since);
    rec.awake_ms_total.saturating_add(before_midnight)
}

/// The machine's awake time in the UTC day starting at `day_start`, up to
/// `now_ms`.
pub fn awake_today(rec: &UserRecord, day_start: u64, now_ms: u64) -> u64 {
    let base = match &rec.awake_day {
        Some(d) if d.day_start == day_start => d.base_ms,
        _ => baseline(rec, day_start),
    };
    let closed = rec.awake_ms_total.saturating_sub(base);
    let open = rec
        .awake_since
        .map_or(0, |since| now_ms.saturating_sub(since.max(day_start)));
    closed.saturating_add(open)
}

/// The budget and the sleep path used when it runs out.
pub struct AwakeBudget<S> {
    /// `MAX_AWAKE_PER_DAY`
    pub per_day: Duration,
    /// Puts the machine to sleep (the sweep's sleep-now path).
    pub sweeper: Sweeper<S>,
}

impl<S: UserStore + 'static> AwakeBudget<S> {
    /// Refuse a turn once `user`'s machine was awake `per_day` today (429
    /// until midnight UTC); records the day's baseline on the first turn of
    /// the day.
    pub async fn admit(&self, store: &S, user: &UserId) -> Result<(), Problem> {
        let now = now_ms();
        let today = day_start(now);
        let rec = match store.get(user).await {
            Ok(Some(rec)) => rec,
            Ok(None) => return Ok(()),
            Err(e) => {
                tracing::warn!(user_id = %user, error = %e, "awake budget: item not read; admitting");
                return Ok(());
            }
        };
        if rec.awake_day.as_ref().map(|d| d.day_start) != Some(today) {
            let base = baseline(&rec, today);
            if let Err(e) = store.note_awake_day(user, today, base).await {
                tracing::warn!(user_id = %user, error = %e, "awake budget: baseline not recorded");
            }
        }
        let used = awake_today(&rec, today, now);
        if used < self.per_day.as_millis() as u64 {
            return Ok(());
        }
        Err(Problem::of(
            ProblemCode::AwakeBudgetExhausted,
            format!(
                "this user's machine was awake {} today (UTC), the daily budget is {}; turns resume at midnight UTC",
                humantime::format_duration(Duration::from_secs(used / 1000)),
                humantime::format_duration(self.per_day),
            ),
        )
        .with_retry_after(Duration::from_millis(today + DAY_MS - now)))
    }

    /// After a turn: once the budget is used up, put the machine to sleep.
    pub async fn enforce(&self, store: &S, user: &UserId) {
        let now = now_ms();
        let Ok(Some(rec)) = store.get(user).await else {
            return;
        };
        if awake_today(&rec, day_start(now), now) < self.per_day.as_millis() as u64 {
            return;
        }
        let outcome = self
            .sweeper
            .sleep_now_because(
                user,
                now,
                Instant::now() + SLEEP_WAIT,
                crate::journal::Reason::Budget,
            )
            .await;
        tracing::info!(
            user_id = user.as_str(),
            ?outcome,
            "awake budget used up: sleep after the turn"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::AwakeDay;

    const DAY: u64 = 1_795_824_000_000; // a UTC midnight
    const HOUR: u64 = 3_600_000;

    fn rec(total: u64, since: Option<u64>, noted: Option<(u64, u64)>) -> UserRecord {
        let mut r: UserRecord = serde_json::from_value(serde_json::json!({
            "user_id": "u", "state": "ready", "power": "asleep", "generation": 1,
            "create_key": "0123456789abcdef0123456789abcdef", "last_active_at": 0,
            "updated_at": 0, "awake_ms_total": total
        }))
        .expect("record");
        r.awake_since = since;
        r.awake_day = noted.map(|(day_start, base_ms)| AwakeDay { day_start, base_ms });
        r
    }

    #[test]
    fn awake_time_counts_from_midnight_utc() {
        assert_eq!(day_start(DAY + 5 * HOUR), DAY);
        // Awake since 23:00 yesterday, now 01:00: one hour today
        let r = rec(10 * HOUR, Some(DAY - HOUR), None);
        assert_eq!(awake_today(&r, DAY, DAY + HOUR), HOUR);
        // Noted at 01:00 (base = total + the hour before midnight); the
        // period closed at 02:00 (total += 3 h); awake again since 03:00, now 04:00
        let noted = (DAY, 10 * HOUR + HOUR);
        let r = rec(13 * HOUR, Some(DAY + 3 * HOUR), Some(noted));
        assert_eq!(awake_today(&r, DAY, DAY + 4 * HOUR), 3 * HOUR);
        // A baseline of yesterday is ignored
        let r = rec(13 * HOUR, None, Some((DAY - DAY_MS, 0)));
        assert_eq!(awake_today(&r, DAY, DAY + 4 * HOUR), 0);
    }
}

//! Pacing of sleep calls: a worker's share of the key's rate
//! (`SWEEP_SLEEP_RATE` / workers), and the `Retry-After` of a 429.
//!
//! Dedalus rate-limits a key, not a process. With `n` workers each pacing
//! itself at `rate / n`, the key sees at most `rate` sleep calls per second
//! without any shared state (a token bucket in the table would cost one
//! conditional write per sleep — as much as the sleep's own bookkeeping —
//! and a hot item every worker contends on). A 429 pauses this worker's
//! sleeps until its `Retry-After` has passed; the other workers find out
//! from their own 429s, which their shares make rare.
//!
//! The pacer is a GCRA (a token bucket with a burst of one): each admitted
//! call reserves the next free slot, `interval` after the previous one. A
//! slot later than the caller's `latest` is not reserved: the candidate is
//! deferred to the next run instead of holding anything while it waits.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// A sleep that pacing would start too late.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deferred;

/// One worker's pacer (see the module docs).
#[derive(Debug)]
pub struct Pacer {
    interval: Option<Duration>,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// The next free slot.
    next: Instant,
    /// No call before this (a `Retry-After`).
    paused_until: Option<Instant>,
}

impl Pacer {
    /// A pacer admitting `per_second` calls a second; `None` (or a
    /// non-positive or non-finite rate) admits every call at once, but still
    /// honours `Retry-After`.
    pub fn new(per_second: Option<f64>) -> Self {
        let interval = per_second
            .filter(|r| r.is_finite() && *r > 0.0)
            .map(|r| Duration::from_secs_f64(1.0 / r));
        Self {
            interval,
            state: Mutex::new(State {
                next: Instant::now(),
                paused_until: None,
            }),
        }
    }

    /// The calls a second this pacer admits (`None`: unlimited).
    pub fn rate(&self) -> Option<f64> {
        self.interval.map(|i| 1.0 / i.as_secs_f64())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reserve the next slot and wait for it; [`Deferred`] (nothing
    /// reserved) if that slot is after `latest`.
    pub async fn admit(&self, latest: Instant) -> Result<(), Deferred> {
        let slot = self.reserve(Instant::now(), latest)?;
        tokio::time::sleep_until(slot).await;
        Ok(())
    }

    /// The slot for a call asked for at `now`, reserved unless after `latest`.
    fn reserve(&self, now: Instant, latest: Instant) -> Result<Instant, Deferred> {
        let mut st = self.lock();
        let mut slot = st.next.max(now);
        if let Some(until) = st.paused_until {
            slot = slot.max(until);
        }
        if slot > latest {
            return Err(Deferred);
        }
        if let Some(interval) = self.interval {
            st.next = slot + interval;
        }
        Ok(slot)
    }

    /// The platform said 429: send nothing before `after` has passed.
    pub fn back_off(&self, after: Duration) {
        let until = Instant::now() + after;
        let mut st = self.lock();
        st.paused_until = Some(st.paused_until.map_or(until, |p| p.max(until)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_a_rate_when_slots_are_reserved_then_they_are_one_interval_apart_until_the_latest() {
        let p = Pacer::new(Some(10.0));
        let now = Instant::now();
        let latest = now + Duration::from_millis(250);
        let slots: Vec<_> = (0..5).map(|_| p.reserve(now, latest)).collect();
        let ok: Vec<Duration> = slots
            .iter()
            .filter_map(|s| s.ok())
            .map(|s| s.duration_since(now))
            .collect();
        assert_eq!(
            ok.len(),
            3,
            "0, 100 and 200 ms fit before 250 ms: {slots:?}"
        );
        assert!(ok[2] >= Duration::from_millis(199) && ok[2] <= Duration::from_millis(201));
        assert_eq!(slots[3], Err(Deferred));
        assert_eq!(p.rate().map(f64::round), Some(10.0));
    }

    #[test]
    fn given_a_retry_after_when_reserving_then_no_slot_comes_before_it() {
        let p = Pacer::new(None);
        let now = Instant::now();
        assert!(p.reserve(now, now).is_ok(), "unlimited: at once");
        p.back_off(Duration::from_secs(2));
        assert_eq!(
            p.reserve(now, now + Duration::from_secs(1)),
            Err(Deferred),
            "a slot inside the Retry-After is refused"
        );
        let slot = p
            .reserve(now, now + Duration::from_secs(5))
            .expect("after it");
        assert!(slot.duration_since(now) >= Duration::from_secs(2));
    }

    #[tokio::test]
    async fn given_a_pacer_when_admitting_then_calls_go_out_at_the_rate() {
        let p = Pacer::new(Some(1000.0));
        let start = Instant::now();
        for _ in 0..51 {
            p.admit(start + Duration::from_secs(10))
                .await
                .expect("in time");
        }
        let took = start.elapsed();
        // 51 calls at 1000/s: the last slot is 50 ms after the first.
        assert!(
            took >= Duration::from_millis(49) && took < Duration::from_secs(2),
            "{took:?}"
        );
    }
}

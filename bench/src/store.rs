//! A [`UserStore`] decorator that counts calls, items read and the time spent
//! in the table, without changing what the wrapped store does.

use agenthome::api::UserId;
use agenthome::store::{
    AcquireOutcome, ClaimOutcome, CountOutcome, Counter, CreateKey, Cursor, DeleteGuard,
    DeleteOutcome, Hold, Lease, LeasePurpose, Page, Power, ReleaseOutcome, Result, SleepPlan,
    UserRecord, UserStore,
};
use agenthome::store::{BeginTurn, TurnCount, TurnEnd};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Counters shared by every clone of an [`InstrumentedStore`].
#[derive(Debug, Default)]
pub struct Counters {
    /// Every call.
    pub calls: AtomicU64,
    /// Point reads (`get`).
    pub gets: AtomicU64,
    /// Index queries (`query_awake_idle`, `find_by_machine`).
    pub queries: AtomicU64,
    /// Items returned by index queries (what DynamoDB bills a query for).
    pub query_items: AtomicU64,
    /// Writes (conditional puts, updates, deletes).
    pub writes: AtomicU64,
    /// Nanoseconds spent inside the wrapped store (summed over concurrent calls).
    pub nanos: AtomicU64,
}

/// A snapshot of [`Counters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Every call.
    pub calls: u64,
    /// Point reads.
    pub gets: u64,
    /// Index queries.
    pub queries: u64,
    /// Items returned by index queries.
    pub query_items: u64,
    /// Writes.
    pub writes: u64,
    /// Nanoseconds in the store.
    pub nanos: u64,
}

impl Snapshot {
    /// `self - earlier`, field by field.
    pub fn since(&self, earlier: &Snapshot) -> Snapshot {
        Snapshot {
            calls: self.calls - earlier.calls,
            gets: self.gets - earlier.gets,
            queries: self.queries - earlier.queries,
            query_items: self.query_items - earlier.query_items,
            writes: self.writes - earlier.writes,
            nanos: self.nanos - earlier.nanos,
        }
    }

    /// Items read: point reads plus items returned by queries.
    pub fn items_read(&self) -> u64 {
        self.gets + self.query_items
    }

    /// Time in the store, in ms.
    pub fn ms(&self) -> f64 {
        self.nanos as f64 / 1e6
    }
}

/// The decorator.
#[derive(Debug)]
pub struct InstrumentedStore<S> {
    inner: Arc<S>,
    counters: Arc<Counters>,
}

impl<S> Clone for InstrumentedStore<S> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
            counters: Arc::clone(&self.counters),
        }
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Get,
    Query,
    Write,
}

impl<S: UserStore> InstrumentedStore<S> {
    /// Wrap `inner`.
    pub fn new(inner: S) -> Self {
        Self {
            inner: Arc::new(inner),
            counters: Arc::new(Counters::default()),
        }
    }

    /// The wrapped store.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// The counters now.
    pub fn snapshot(&self) -> Snapshot {
        let c = &self.counters;
        Snapshot {
            calls: c.calls.load(Ordering::Relaxed),
            gets: c.gets.load(Ordering::Relaxed),
            queries: c.queries.load(Ordering::Relaxed),
            query_items: c.query_items.load(Ordering::Relaxed),
            writes: c.writes.load(Ordering::Relaxed),
            nanos: c.nanos.load(Ordering::Relaxed),
        }
    }

    async fn timed<T>(
        &self,
        kind: Kind,
        fut: impl Future<Output = Result<T>>,
        items: impl Fn(&T) -> u64,
    ) -> Result<T> {
        let started = Instant::now();
        let out = fut.await;
        let c = &self.counters;
        let nanos = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        c.nanos.fetch_add(nanos, Ordering::Relaxed);
        c.calls.fetch_add(1, Ordering::Relaxed);
        match kind {
            Kind::Get => c.gets.fetch_add(1, Ordering::Relaxed),
            Kind::Query => {
                if let Ok(v) = &out {
                    c.query_items.fetch_add(items(v), Ordering::Relaxed);
                }
                c.queries.fetch_add(1, Ordering::Relaxed)
            }
            Kind::Write => c.writes.fetch_add(1, Ordering::Relaxed),
        };
        out
    }
}

fn none<T>(_: &T) -> u64 {
    0
}

impl<S: UserStore> UserStore for InstrumentedStore<S> {
    async fn get(&self, user_id: &UserId) -> Result<Option<UserRecord>> {
        self.timed(Kind::Get, self.inner.get(user_id), none).await
    }

    async fn find_by_machine(&self, machine_id: &str) -> Result<Vec<UserRecord>> {
        self.timed(Kind::Query, self.inner.find_by_machine(machine_id), |v| {
            v.len() as u64
        })
        .await
    }

    async fn claim(
        &self,
        user_id: &UserId,
        create_key: &str,
        lease: &Lease,
        now_ms: u64,
    ) -> Result<ClaimOutcome> {
        let f = self.inner.claim(user_id, create_key, lease, now_ms);
        self.timed(Kind::Write, f, none).await
    }

    async fn record_machine_id(
        &self,
        user_id: &UserId,
        create_key: &str,
        machine_id: &str,
        now_ms: u64,
    ) -> Result<UserRecord> {
        let f = self
            .inner
            .record_machine_id(user_id, create_key, machine_id, now_ms);
        self.timed(Kind::Write, f, none).await
    }

    async fn mark_bootstrapping(
        &self,
        user_id: &UserId,
        owner: &str,
        now_ms: u64,
    ) -> Result<UserRecord> {
        let f = self.inner.mark_bootstrapping(user_id, owner, now_ms);
        self.timed(Kind::Write, f, none).await
    }

    async fn mark_ready(
        &self,
        user_id: &UserId,
        owner: &str,
        bootstrap_version: &str,
        now_ms: u64,
    ) -> Result<UserRecord> {
        let f = self
            .inner
            .mark_ready(user_id, owner, bootstrap_version, now_ms);
        self.timed(Kind::Write, f, none).await
    }

    async fn mark_failed(
        &self,
        user_id: &UserId,
        owner: &str,
        error: &str,
        now_ms: u64,
    ) -> Result<UserRecord> {
        let f = self.inner.mark_failed(user_id, owner, error, now_ms);
        self.timed(Kind::Write, f, none).await
    }

    async fn restart_provisioning(
        &self,
        user_id: &UserId,
        expected_generation: u64,
        lease: &Lease,
        create_key: CreateKey,
        now_ms: u64,
    ) -> Result<AcquireOutcome> {
        let f = self.inner.restart_provisioning(
            user_id,
            expected_generation,
            lease,
            create_key,
            now_ms,
        );
        self.timed(Kind::Write, f, none).await
    }

    async fn acquire_lease(
        &self,
        user_id: &UserId,
        owner: &str,
        purpose: LeasePurpose,
        until_ms: u64,
        now_ms: u64,
    ) -> Result<AcquireOutcome> {
        let f = self
            .inner
            .acquire_lease(user_id, owner, purpose, until_ms, now_ms);
        self.timed(Kind::Write, f, none).await
    }

    async fn renew_lease(
        &self,
        user_id: &UserId,
        owner: &str,
        until_ms: u64,
        now_ms: u64,
    ) -> Result<UserRecord> {
        let f = self.inner.renew_lease(user_id, owner, until_ms, now_ms);
        self.timed(Kind::Write, f, none).await
    }

    async fn release_lease(
        &self,
        user_id: &UserId,
        owner: &str,
        now_ms: u64,
    ) -> Result<ReleaseOutcome> {
        let f = self.inner.release_lease(user_id, owner, now_ms);
        self.timed(Kind::Write, f, none).await
    }

    async fn mark_awake(&self, user_id: &UserId, owner: &str, now_ms: u64) -> Result<UserRecord> {
        let f = self.inner.mark_awake(user_id, owner, now_ms);
        self.timed(Kind::Write, f, none).await
    }

    async fn touch(&self, user_id: &UserId, owner: &str, now_ms: u64) -> Result<UserRecord> {
        let f = self.inner.touch(user_id, owner, now_ms);
        self.timed(Kind::Write, f, none).await
    }

    async fn set_terminal(
        &self,
        user_id: &UserId,
        owner: &str,
        terminal_id: Option<&str>,
        now_ms: u64,
    ) -> Result<UserRecord> {
        let f = self.inner.set_terminal(user_id, owner, terminal_id, now_ms);
        self.timed(Kind::Write, f, none).await
    }

    async fn set_hold(
        &self,
        user_id: &UserId,
        owner: &str,
        hold: &Hold,
        now_ms: u64,
    ) -> Result<UserRecord> {
        let f = self.inner.set_hold(user_id, owner, hold, now_ms);
        self.timed(Kind::Write, f, none).await
    }

    async fn set_terminals(
        &self,
        user_id: &UserId,
        owner: &str,
        current: Option<&str>,
        parked: &[String],
        now_ms: u64,
    ) -> Result<UserRecord> {
        let f = self
            .inner
            .set_terminals(user_id, owner, current, parked, now_ms);
        self.timed(Kind::Write, f, none).await
    }

    async fn release_holds(
        &self,
        user_id: &UserId,
        owner: &str,
        markers: &[String],
        now_ms: u64,
    ) -> Result<UserRecord> {
        let f = self.inner.release_holds(user_id, owner, markers, now_ms);
        self.timed(Kind::Write, f, none).await
    }

    async fn clear_hold(&self, user_id: &UserId, owner: &str, now_ms: u64) -> Result<UserRecord> {
        let f = self.inner.clear_hold(user_id, owner, now_ms);
        self.timed(Kind::Write, f, none).await
    }

    async fn mark_asleep(&self, user_id: &UserId, owner: &str, now_ms: u64) -> Result<UserRecord> {
        let f = self.inner.mark_asleep(user_id, owner, now_ms);
        self.timed(Kind::Write, f, none).await
    }

    async fn set_sleep_eligible_at(
        &self,
        user_id: &UserId,
        owner: &str,
        eligible_at_ms: u64,
        now_ms: u64,
    ) -> Result<UserRecord> {
        let f = self
            .inner
            .set_sleep_eligible_at(user_id, owner, eligible_at_ms, now_ms);
        self.timed(Kind::Write, f, none).await
    }

    async fn mark_lost(
        &self,
        user_id: &UserId,
        owner: &str,
        error: &str,
        now_ms: u64,
    ) -> Result<UserRecord> {
        let f = self.inner.mark_lost(user_id, owner, error, now_ms);
        self.timed(Kind::Write, f, none).await
    }

    async fn set_power(
        &self,
        current: &UserRecord,
        power: Power,
        now_ms: u64,
    ) -> Result<UserRecord> {
        let f = self.inner.set_power(current, power, now_ms);
        self.timed(Kind::Write, f, none).await
    }

    async fn mark_destroying(&self, user_id: &UserId, now_ms: u64) -> Result<UserRecord> {
        let f = self.inner.mark_destroying(user_id, now_ms);
        self.timed(Kind::Write, f, none).await
    }

    async fn delete(&self, user_id: &UserId, guard: DeleteGuard) -> Result<DeleteOutcome> {
        let f = self.inner.delete(user_id, guard);
        self.timed(Kind::Write, f, none).await
    }

    async fn count_request(
        &self,
        user_id: &UserId,
        counter: Counter,
        limit: u32,
        window_ms: u64,
        now_ms: u64,
    ) -> Result<CountOutcome> {
        let f = self
            .inner
            .count_request(user_id, counter, limit, window_ms, now_ms);
        self.timed(Kind::Write, f, none).await
    }

    async fn note_awake_day(&self, user_id: &UserId, day_start: u64, base_ms: u64) -> Result<()> {
        let f = self.inner.note_awake_day(user_id, day_start, base_ms);
        self.timed(Kind::Write, f, none).await
    }

    async fn query_awake_idle(
        &self,
        shard: &str,
        idle_before_ms: u64,
        cursor: Option<&Cursor>,
        limit: u32,
    ) -> Result<Page<UserRecord>> {
        let f = self
            .inner
            .query_awake_idle(shard, idle_before_ms, cursor, limit);
        self.timed(Kind::Query, f, |p| p.items.len() as u64).await
    }

    async fn begin_turn(
        &self,
        user_id: &UserId,
        owner: &str,
        until_ms: u64,
        count: Option<TurnCount>,
        now_ms: u64,
    ) -> Result<BeginTurn> {
        let f = self
            .inner
            .begin_turn(user_id, owner, until_ms, count, now_ms);
        self.timed(Kind::Write, f, none).await
    }

    async fn end_turn(
        &self,
        user_id: &UserId,
        owner: &str,
        end: &TurnEnd,
        now_ms: u64,
    ) -> Result<UserRecord> {
        let f = self.inner.end_turn(user_id, owner, end, now_ms);
        self.timed(Kind::Write, f, none).await
    }

    async fn schedule_sleep(
        &self,
        user_id: &UserId,
        plan: &SleepPlan<'_>,
        now_ms: u64,
    ) -> Result<UserRecord> {
        let f = self.inner.schedule_sleep(user_id, plan, now_ms);
        self.timed(Kind::Write, f, none).await
    }

    async fn clear_pending_sleep(
        &self,
        user_id: &UserId,
        expected_at: u64,
        now_ms: u64,
    ) -> Result<UserRecord> {
        let f = self.inner.clear_pending_sleep(user_id, expected_at, now_ms);
        self.timed(Kind::Write, f, none).await
    }

    async fn query_pending_sleeps(
        &self,
        shard: &str,
        due_by_ms: u64,
        cursor: Option<&Cursor>,
        limit: u32,
    ) -> Result<Page<UserRecord>> {
        let f = self
            .inner
            .query_pending_sleeps(shard, due_by_ms, cursor, limit);
        self.timed(Kind::Query, f, |p| p.items.len() as u64).await
    }

    async fn move_awake_shard(&self, user_id: &UserId, from: &str, to: &str) -> Result<bool> {
        let f = self.inner.move_awake_shard(user_id, from, to);
        self.timed(Kind::Write, f, none).await
    }
}

/// The provisioning stage reads a waiting first message makes, counted as
/// point reads.
impl<S: UserStore + agenthome::store::StageReader> agenthome::store::StageReader
    for InstrumentedStore<S>
{
    async fn get_with_stage(
        &self,
        user_id: &UserId,
    ) -> Result<Option<agenthome::store::StageView>> {
        self.timed(Kind::Get, self.inner.get_with_stage(user_id), none)
            .await
    }
}

/// Turn idempotency keys, counted as writes.
impl<S: UserStore + agenthome::store::TurnKeys> agenthome::store::TurnKeys
    for InstrumentedStore<S>
{
    async fn begin_turn_key(
        &self,
        user_id: &UserId,
        key: &str,
        body_hash: &str,
        run_until_ms: u64,
        now_ms: u64,
    ) -> Result<agenthome::store::TurnKeyBegin> {
        let f = self
            .inner
            .begin_turn_key(user_id, key, body_hash, run_until_ms, now_ms);
        self.timed(Kind::Write, f, none).await
    }

    async fn finish_turn_key(
        &self,
        user_id: &UserId,
        key: &str,
        runner: &str,
        response: &str,
        now_ms: u64,
    ) -> Result<bool> {
        let f = self
            .inner
            .finish_turn_key(user_id, key, runner, response, now_ms);
        self.timed(Kind::Write, f, none).await
    }

    async fn release_turn_key(
        &self,
        user_id: &UserId,
        key: &str,
        runner: &str,
        now_ms: u64,
    ) -> Result<bool> {
        let f = self.inner.release_turn_key(user_id, key, runner, now_ms);
        self.timed(Kind::Write, f, none).await
    }
}

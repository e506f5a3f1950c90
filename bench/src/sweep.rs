//! Benchmark 3: one sweep run over a large table.
//!
//! `users` items in a [`MemoryStore`] (wrapped in [`InstrumentedStore`]),
//! `awake` of them awake and idle for 10 minutes (the rest asleep, outside
//! the sparse `awake` index); Dedalus is the in-process [`StandIn`]
//! (recorded responses: every sleep succeeds). One [`Sweeper::run`] per
//! concurrency, each on a freshly seeded table.

use crate::standin::{Platform, StandIn};
use crate::store::{InstrumentedStore, Snapshot};
use agenthome::store::{shard_for, MachineState, MemoryStore, Power, UserRecord};
use agenthome::sweep::{SweepReport, SweepSettings, Sweeper};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One run's figures.
#[derive(Debug, Clone)]
pub struct SweepResult {
    /// Items in the table.
    pub users: u64,
    /// Awake idle items.
    pub awake: u64,
    /// `SWEEP_CONCURRENCY`.
    pub concurrency: usize,
    /// Wall time of the run (ms).
    pub wall_ms: f64,
    /// Table traffic during the run.
    pub store: Snapshot,
    /// Dedalus requests during the run.
    pub dedalus_calls: u64,
    /// The sweep's own report.
    pub report: SweepReport,
    /// Seeding time (ms), not part of the run.
    pub seed_ms: f64,
}

impl SweepResult {
    /// Items read per candidate.
    pub fn items_per_candidate(&self) -> f64 {
        self.store.items_read() as f64 / self.report.candidates.max(1) as f64
    }
}

/// A seeded table: `users` items, the first `awake` awake and idle since
/// `now_ms - 10 min`.
pub fn seed(users: u64, awake: u64, now_ms: u64) -> MemoryStore {
    let store = MemoryStore::new();
    let day = 24 * 3600 * 1000;
    for i in 0..users {
        let user_id = format!("user-{i:07}");
        let is_awake = i < awake;
        let last_active_at = if is_awake {
            now_ms - 600_000 - i
        } else {
            now_ms - day
        };
        let rec = UserRecord {
            machine_id: Some(format!("dm-{i:032x}")),
            state: MachineState::Ready,
            power: if is_awake {
                Power::Awake
            } else {
                Power::Asleep
            },
            generation: 3,
            create_key: format!("{i:032x}"),
            bootstrap_version: Some("v1".into()),
            last_active_at,
            lease: None,
            terminal_id: Some(format!("term-{i}")),
            parked_terminals: Vec::new(),
            awake_since: is_awake.then_some(last_active_at - 60_000),
            awake_ms_total: 0,
            sleep_eligible_at: None,
            hold: None,
            holds: Vec::new(),
            last_error: None,
            updated_at: last_active_at,
            created_at: now_ms - 7 * day,
            awake_shard: is_awake.then(|| shard_for(&user_id)),
            awake_day: None,
            pending_sleep: None,
            gap_hist: Vec::new(),
            user_id,
        };
        store
            .put_raw(rec.to_item().expect("item"))
            .expect("seed item");
    }
    store
}

/// One sweep run at `concurrency` over a fresh table.
pub async fn run(users: u64, awake: u64, concurrency: usize) -> SweepResult {
    let now_ms = agenthome::clock::now_ms();
    let t = Instant::now();
    let store = Arc::new(InstrumentedStore::new(seed(users, awake, now_ms)));
    let seed_ms = crate::stats::ms(t.elapsed());
    let standin = StandIn::start(Platform::default()).await;
    let settings = SweepSettings {
        concurrency,
        ..SweepSettings::default()
    };
    let sweeper = Sweeper::new(Arc::clone(&store), &standin.client(), settings);
    let s0 = store.snapshot();
    let t = Instant::now();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    let report = sweeper.run(now_ms, deadline).await;
    let wall_ms = crate::stats::ms(t.elapsed());
    SweepResult {
        users,
        awake,
        concurrency,
        wall_ms,
        store: store.snapshot().since(&s0),
        dedalus_calls: standin.platform.calls.load(Ordering::Relaxed),
        report,
        seed_ms,
    }
}

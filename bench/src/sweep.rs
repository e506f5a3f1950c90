//! Benchmark 3: one sweep run over a large table.
//!
//! `users` items in a [`MemoryStore`] (wrapped in [`InstrumentedStore`]),
//! `awake` of them awake and idle for 10 minutes (the rest asleep, outside
//! the sparse `awake` index); Dedalus is the in-process [`StandIn`]
//! (recorded responses: every sleep succeeds). One [`Sweeper::run`] per
//! concurrency, each on a freshly seeded table.

use crate::standin::{Platform, StandIn};
use crate::store::{InstrumentedStore, Snapshot};
use agenthome::api::UserId;
use agenthome::store::{shard_in, MachineState, MemoryStore, Power, ShardLayout, UserRecord};
use agenthome::sweep::{
    SweepReport, SweepSettings, Sweeper, WorkerFuture, WorkerInvoker, WorkerTask,
};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
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
/// `now_ms - 10 min`, in the default 8 shards.
pub fn seed(users: u64, awake: u64, now_ms: u64) -> MemoryStore {
    seed_sharded(users, awake, now_ms, agenthome::store::AWAKE_SHARDS)
}

/// [`seed`] with awake items spread over `shards` shards.
pub fn seed_sharded(users: u64, awake: u64, now_ms: u64, shards: u32) -> MemoryStore {
    let store = MemoryStore::new().with_awake_shards(shards);
    let day = 24 * 3600 * 1000;
    for i in 0..users {
        let user_id = UserId::parse(&format!("user-{i:07}")).expect("a valid generated user id");
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
            awake_shard: is_awake.then(|| shard_in(&user_id, shards)),
            awake_day: None,
            turns: Default::default(),
            provision_attempts: 0,
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

/// The fan-out run's parameters.
#[derive(Debug, Clone, Copy)]
pub struct FanOut {
    /// Items in the table.
    pub users: u64,
    /// Awake idle items.
    pub awake: u64,
    /// `SWEEP_WORKERS`.
    pub workers: u32,
    /// `AWAKE_SHARDS`.
    pub shards: u32,
    /// `SWEEP_SLEEP_RATE` (sleep calls per second for the key).
    pub rate: u32,
    /// `SWEEP_FANOUT_THRESHOLD`.
    pub threshold: u64,
    /// The coordinator's run budget (a 55 s Lambda minus the 10 s margin: 45 s).
    pub budget: Duration,
}

/// One worker's figures.
#[derive(Debug, Clone)]
pub struct WorkerResult {
    /// Worker number.
    pub worker: u32,
    /// Its shards.
    pub shards: usize,
    /// Wall time from its invocation to its report (ms).
    pub wall_ms: f64,
    /// Its report.
    pub report: SweepReport,
}

/// The fan-out run's figures.
#[derive(Debug, Clone)]
pub struct FanOutResult {
    /// Parameters.
    pub params: FanOut,
    /// Wall time of the coordinator's run, workers included (ms).
    pub wall_ms: f64,
    /// Each worker.
    pub workers: Vec<WorkerResult>,
    /// The coordinator's report (the workers' summed).
    pub report: SweepReport,
    /// Table traffic during the run (coordinator and workers).
    pub store: Snapshot,
    /// Dedalus requests during the run.
    pub dedalus_calls: u64,
    /// Of those, sleep calls.
    pub sleep_calls: u64,
    /// Seeding time (ms), not part of the run.
    pub seed_ms: f64,
}

impl FanOutResult {
    /// Items read per candidate (the coordinator's sample included).
    pub fn items_per_candidate(&self) -> f64 {
        self.store.items_read() as f64 / self.report.candidates.max(1) as f64
    }

    /// Sleep calls per second over the run.
    pub fn sleeps_per_s(&self) -> f64 {
        self.sleep_calls as f64 / (self.wall_ms / 1000.0).max(1e-9)
    }
}

/// In-process workers (one spawned task each: the simulated parallel
/// invocations) that time each worker.
struct TimedWorkers<S> {
    sweeper: Arc<Sweeper<S>>,
    results: Arc<Mutex<Vec<WorkerResult>>>,
}

impl<S: agenthome::store::UserStore + 'static> WorkerInvoker for TimedWorkers<S> {
    fn invoke(&self, task: WorkerTask) -> WorkerFuture {
        let sweeper = Arc::clone(&self.sweeper);
        let results = Arc::clone(&self.results);
        Box::pin(async move {
            let handle = tokio::spawn(async move {
                let t = Instant::now();
                let deadline = task.deadline(agenthome::clock::now_ms());
                let report = sweeper.run_worker(&task, deadline).await;
                let wall_ms = crate::stats::ms(t.elapsed());
                results
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(WorkerResult {
                        worker: task.worker,
                        shards: task.shards.len(),
                        wall_ms,
                        report: report.clone(),
                    });
                report
            });
            handle.await.map_err(agenthome::sweep::InvokeError::Local)
        })
    }
}

/// One scheduled run through the coordinator and `workers` in-process
/// workers over a fresh table of `users` items, `awake` of them idle.
pub async fn run_fanout(p: FanOut) -> FanOutResult {
    let now_ms = agenthome::clock::now_ms();
    let t = Instant::now();
    let store = Arc::new(InstrumentedStore::new(seed_sharded(
        p.users, p.awake, now_ms, p.shards,
    )));
    let seed_ms = crate::stats::ms(t.elapsed());
    let standin = StandIn::start(Platform::default()).await;
    let settings = SweepSettings {
        shards: ShardLayout::new(p.shards),
        workers: p.workers,
        sleep_rate: p.rate,
        fanout_threshold: p.threshold,
        ..SweepSettings::default()
    };
    let client = standin.client();
    let worker = Arc::new(Sweeper::new(Arc::clone(&store), &client, settings.clone()));
    let results = Arc::new(Mutex::new(Vec::new()));
    let coordinator =
        Sweeper::new(Arc::clone(&store), &client, settings).with_workers(Arc::new(TimedWorkers {
            sweeper: worker,
            results: Arc::clone(&results),
        }));
    let s0 = store.snapshot();
    let t = Instant::now();
    let deadline = tokio::time::Instant::now() + p.budget;
    // Minute 1 of the epoch: not a reconciliation minute.
    let report = coordinator
        .run_scheduled(60_000, now_ms, deadline, false)
        .await;
    let wall_ms = crate::stats::ms(t.elapsed());
    let mut workers = results.lock().unwrap_or_else(|p| p.into_inner()).clone();
    workers.sort_by_key(|w| w.worker);
    FanOutResult {
        params: p,
        wall_ms,
        workers,
        report,
        store: store.snapshot().since(&s0),
        dedalus_calls: standin.platform.calls.load(Ordering::Relaxed),
        sleep_calls: standin.platform.sleep_calls.load(Ordering::Relaxed),
        seed_ms,
    }
}

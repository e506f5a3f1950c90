//! Randomized interleaving test: PUT, the provisioning worker (also killed
//! mid-way, as Lambda kills an invocation), DELETE, turns, sweeps,
//! reconciliation, lease and grace expiry, and injected Dedalus faults and
//! delays, run concurrently on two users, with the invariants checked after
//! every step.
//!
//! The domain code is the real one (`Provisioner`, `user_machine::destroy`,
//! `Sweeper`; a turn is modelled by its table protocol: `begin_turn` (lease,
//! awake, active) → wake → the lease check before a command → `end_turn`) over a `MemoryStore` whose hook parks
//! every store call. A scheduler lets exactly one operation run at a time
//! between two store calls and picks the next one from a seeded RNG, so a
//! schedule is decided by its seed (up to Dedalus timing). Dedalus is the
//! project's emulator (a real process on loopback, fast timings).
//!
//! `INTERLEAVE_SCHEDULES` (default 2000 in CI) sets how many schedules run;
//! `INTERLEAVE_SEED` sets the first seed (default: from the clock; printed).
//! A violation prints the seed of its schedule: replay it with
//! `INTERLEAVE_SEED=<seed> INTERLEAVE_SCHEDULES=1`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use agenthome_tests::uid;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agenthome::clock::{advance, now_ms};
use agenthome::dedalus::{Client, Phase};
use agenthome::provision::{
    Bootstrap, MachineSpec, ProvisionEvent, ProvisionSettings, Provisioner, QueueTrigger,
};
use agenthome::store::{
    BeginTurn, MachineState, MemoryStore, StoreHook, TurnEnd, UserRecord, UserStore,
};
use agenthome::sweep::{SweepSettings, Sweeper};
use agenthome_tests::Emulator;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::time::Instant;

/// Moves every lease and the orphan grace into the past.
const EXPIRE_MS: u64 = 16 * 60_000;
const USERS: usize = 2;
/// Lanes run in parallel, each on its own thread (the clock skew of an
/// expiry is per thread), runtime and emulator; most of a schedule's time is
/// spent waiting for Dedalus polls, so lanes overlap well.
/// `INTERLEAVE_LANES` overrides it.
const LANES: u64 = 12;

type Prov = Provisioner<Arc<MemoryStore>, QueueTrigger>;
type BoxFut = Pin<Box<dyn Future<Output = String> + Send>>;

tokio::task_local! {
    static ACTOR: usize;
}

// ---------------------------------------------------------------------------
// The scheduler
// ---------------------------------------------------------------------------

#[derive(Default)]
struct SchedState {
    running: usize,
    ticket: u64,
    parked: BTreeMap<(usize, u64), oneshot::Sender<()>>,
}

#[derive(Default)]
struct Sched {
    state: Mutex<SchedState>,
    changed: Notify,
}

impl Sched {
    fn lock(&self) -> std::sync::MutexGuard<'_, SchedState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The store hook: an actor's store call waits for its turn.
    fn hook(self: &Arc<Self>) -> StoreHook {
        let sched = Arc::clone(self);
        Arc::new(move |_op, _user| {
            let sched = Arc::clone(&sched);
            Box::pin(async move {
                let Ok(actor) = ACTOR.try_with(|a| *a) else {
                    return;
                };
                let rx = {
                    let mut st = sched.lock();
                    st.ticket += 1;
                    let ticket = st.ticket;
                    let (tx, rx) = oneshot::channel();
                    st.parked.insert((actor, ticket), tx);
                    st.running -= 1;
                    rx
                };
                sched.changed.notify_one();
                let _ = rx.await;
            })
        })
    }

    /// Until no actor runs (all parked or done).
    async fn quiescent(&self) {
        self.until(|st| st.running == 0).await;
    }

    /// Until an actor waits to be let through, or none runs.
    async fn someone_parked(&self) {
        self.until(|st| st.running == 0 || !st.parked.is_empty())
            .await;
    }

    async fn until(&self, done: impl Fn(&SchedState) -> bool) {
        loop {
            if done(&self.lock()) {
                return;
            }
            self.changed.notified().await;
        }
    }
}

// ---------------------------------------------------------------------------
// One lane: an emulator, and schedules run one after another on it
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Put(usize),
    Work(usize),
    Delete(usize),
    Turn(usize),
    Sweep,
    Reconcile,
}

/// What actors share with the invariant checks.
#[derive(Default)]
struct Shared {
    /// Turns between a granted lease and its release, per user.
    turns: Mutex<HashMap<String, usize>>,
    /// (user, owner) of turns that woke the machine and hold the lease.
    woken: Mutex<HashSet<(String, String)>>,
    /// In-actor violations.
    violations: Mutex<Vec<String>>,
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct World {
    seed: u64,
    users: Vec<String>,
    store: Arc<MemoryStore>,
    sched: Arc<Sched>,
    prov: Arc<Prov>,
    sweeper: Arc<Sweeper<MemoryStore>>,
    client: Client,
    events: mpsc::UnboundedReceiver<ProvisionEvent>,
    pending: Vec<ProvisionEvent>,
    shared: Arc<Shared>,
    /// Machine ids each user's item ever referenced.
    seen: HashMap<String, HashSet<String>>,
    /// The item as last observed, per user.
    last: HashMap<String, UserRecord>,
    kills: usize,
    violations: Vec<String>,
    trace: Vec<String>,
}

fn provision_settings() -> ProvisionSettings {
    let spec = MachineSpec {
        vcpu: 1.0,
        memory_mib: 1024,
        storage_gib: 10,
        autosleep: "never".into(),
    };
    let mut s = ProvisionSettings::new(spec, Bootstrap::new("true", None));
    s.lease_ttl = Duration::from_secs(60);
    s.boot_timeout = Duration::from_secs(10);
    s.bootstrap_timeout = Duration::from_secs(10);
    s.margin = Duration::from_millis(100);
    s
}

fn sweep_settings() -> SweepSettings {
    SweepSettings {
        idle_after: Duration::ZERO,
        concurrency: 1,
        reconcile_every: 1,
        sleep_call_timeout: Duration::from_secs(3),
        read_call_timeout: Duration::from_secs(3),
        marker_check_timeout: Duration::from_secs(3),
        orphan_grace: Duration::from_secs(15 * 60),
        reconcile_destroy_orphans: true,
        ..SweepSettings::default()
    }
}

fn is_asleep(phase: &Phase) -> bool {
    matches!(phase, Phase::Sleeping | Phase::Stopping)
}

fn is_live(phase: &Phase) -> bool {
    !matches!(phase, Phase::Destroying | Phase::Destroyed)
}

impl World {
    fn new(seed: u64, client: &Client) -> World {
        let sched = Arc::new(Sched::default());
        let store = Arc::new(MemoryStore::with_hook(sched.hook()));
        let (tx, events) = mpsc::unbounded_channel();
        let prov = Provisioner::new(
            Arc::clone(&store),
            client.clone(),
            QueueTrigger(tx),
            provision_settings(),
        );
        let sweeper = Sweeper::new(Arc::clone(&store), client, sweep_settings());
        World {
            seed,
            users: (0..USERS).map(|i| format!("s{seed}-u{i}")).collect(),
            store,
            sched,
            prov: Arc::new(prov),
            sweeper: Arc::new(sweeper),
            client: client.clone(),
            events,
            pending: Vec::new(),
            shared: Arc::default(),
            seen: HashMap::new(),
            last: HashMap::new(),
            kills: 0,
            violations: Vec::new(),
            trace: Vec::new(),
        }
    }

    fn violation(&mut self, what: String) {
        self.violations.push(format!(
            "seed {}: {what}\n  trace: {}",
            self.seed,
            self.trace.join(" | ")
        ));
    }

    fn actor(&mut self, op: Op) -> BoxFut {
        let user = |i: usize| self.users[i].clone();
        match op {
            Op::Put(i) => {
                let (prov, u) = (Arc::clone(&self.prov), user(i));
                Box::pin(async move {
                    format!(
                        "{:?}",
                        prov.ensure(&uid(&u)).await.map(|e| e.record().state)
                    )
                })
            }
            Op::Work(i) => {
                let u = user(i);
                let at = self.pending.iter().position(|e| e.user_id == u);
                let ev = at.map(|at| self.pending.remove(at));
                let prov = Arc::clone(&self.prov);
                Box::pin(async move {
                    match ev {
                        Some(ev) => format!(
                            "{:?}",
                            prov.run_worker_until(&ev, now_ms() + 60_000)
                                .await
                                .map(|r| r.state)
                        ),
                        None => "no event".into(),
                    }
                })
            }
            Op::Delete(i) => {
                let (prov, u) = (Arc::clone(&self.prov), user(i));
                Box::pin(async move {
                    let r = agenthome::user_machine::destroy(
                        prov.store(),
                        prov.dedalus(),
                        &uid(&u),
                        Duration::from_secs(5),
                    )
                    .await;
                    format!("{r:?}")
                })
            }
            Op::Turn(i) => Box::pin(turn(
                Arc::clone(&self.prov),
                Arc::clone(&self.shared),
                user(i),
            )),
            Op::Sweep => {
                let s = Arc::clone(&self.sweeper);
                Box::pin(async move {
                    let r = s
                        .run(now_ms(), Instant::now() + Duration::from_secs(20))
                        .await;
                    format!("slept {} lost {} failed {}", r.slept, r.lost, r.failed)
                })
            }
            Op::Reconcile => {
                let s = Arc::clone(&self.sweeper);
                Box::pin(async move {
                    let r = s
                        .reconcile(now_ms(), Instant::now() + Duration::from_secs(20))
                        .await;
                    format!(
                        "orphans {} destroyed {} lost {} fixed {}",
                        r.orphans, r.orphans_destroyed, r.lost, r.fixed
                    )
                })
            }
        }
    }

    /// Run `ops` concurrently, one step at a time in an order drawn from
    /// `rng`; workers may be killed at a step. Invariants after every step.
    async fn round(&mut self, ops: Vec<Op>, rng: &mut StdRng) -> Vec<String> {
        let mut handles = Vec::new();
        let mut killable = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            let fut = self.actor(*op);
            let sched = Arc::clone(&self.sched);
            sched.lock().running += 1;
            handles.push(tokio::spawn(ACTOR.scope(i, async move {
                let out = fut.await;
                sched.lock().running -= 1;
                sched.changed.notify_one();
                out
            })));
            killable.push(matches!(op, Op::Work(_)));
        }
        let mut killed = vec![false; ops.len()];
        let mut graveyard = Vec::new();
        loop {
            // Mostly one operation at a time; sometimes the next one starts
            // while another is still inside a Dedalus call (the windows the
            // injected delays widen).
            let overlap = rng.random_bool(0.3);
            let wait = async {
                self.sched.someone_parked().await;
                if !overlap {
                    self.sched.quiescent().await;
                }
            };
            let quiet = tokio::time::timeout(Duration::from_secs(60), wait).await;
            if quiet.is_err() {
                self.violation(format!("no progress for 60 s in round {ops:?}"));
                for h in &handles {
                    h.abort();
                }
                break;
            }
            self.check_step().await;
            let next = {
                let mut st = self.sched.lock();
                if st.parked.is_empty() {
                    None
                } else {
                    let k = rng.random_range(0..st.parked.len());
                    let key = *st.parked.keys().nth(k).expect("k < len");
                    let tx = st.parked.remove(&key).expect("parked");
                    Some((key.0, tx))
                }
            };
            let Some((actor, tx)) = next else {
                if self.sched.lock().running == 0 {
                    break;
                }
                continue;
            };
            if killable[actor] && rng.random_bool(0.04) {
                handles[actor].abort();
                killed[actor] = true;
                self.kills += 1;
                graveyard.push(tx);
                continue;
            }
            self.sched.lock().running += 1;
            let _ = tx.send(());
        }
        let mut outs = Vec::new();
        for (i, h) in handles.into_iter().enumerate() {
            let out = match h.await {
                Ok(out) => out,
                Err(_) if killed[i] => "killed".into(),
                Err(e) => {
                    self.violation(format!("{:?} panicked: {e}", ops[i]));
                    "panicked".into()
                }
            };
            outs.push(out);
        }
        while let Ok(ev) = self.events.try_recv() {
            self.pending.push(ev);
        }
        let errs: Vec<String> = std::mem::take(&mut *locked(&self.shared.violations));
        for e in errs {
            self.violation(e);
        }
        outs
    }

    /// After every step: one turn per user; never asleep under a turn; no
    /// machine referenced twice; `destroying` never left.
    async fn check_step(&mut self) {
        let turns = locked(&self.shared.turns).clone();
        for (user, n) in turns {
            if n > 1 {
                self.violation(format!("{n} turns at once for {user}"));
            }
        }
        let mut by_machine: HashMap<String, String> = HashMap::new();
        for user in self.users.clone() {
            let rec = self.store.get(&uid(&user)).await.expect("get");
            if let Some(before) = self.last.get(&user) {
                if let Some(now) = &rec {
                    if before.state == MachineState::Destroying
                        && now.state != MachineState::Destroying
                        && now.generation > before.generation
                    {
                        self.violation(format!("{user}: destroying item became {:?}", now.state));
                    }
                }
            }
            if let Some(rec) = &rec {
                if let Some(m) = &rec.machine_id {
                    self.seen.entry(user.clone()).or_default().insert(m.clone());
                    if let Some(other) = by_machine.insert(m.clone(), user.clone()) {
                        self.violation(format!("machine {m} referenced by {other} and {user}"));
                    }
                }
            }
            match rec {
                Some(rec) => {
                    self.last.insert(user.clone(), rec);
                }
                None => {
                    self.last.remove(&user);
                }
            }
        }
        let woken: Vec<(String, String)> = locked(&self.shared.woken).iter().cloned().collect();
        for (user, owner) in woken {
            let Some(rec) = self.last.get(&user).cloned() else {
                continue;
            };
            // Deletion wins over a running turn: a `destroying` item's
            // machine is destroyed under it by design.
            let holds = rec.state != MachineState::Destroying
                && rec.live_lease(now_ms()).is_some_and(|l| l.owner == owner);
            let Some(machine) = rec.machine_id.clone().filter(|_| holds) else {
                continue;
            };
            if let Ok(m) = self.client.get_machine(&machine).await {
                if is_asleep(&m.phase) {
                    self.violation(format!(
                        "{user}: machine {machine} is {} under a running turn",
                        m.phase
                    ));
                }
            }
        }
    }

    /// After a round: a user whose DELETE succeeded (and who was not
    /// provisioned again in the same round) has no item and no live machine;
    /// unreferenced live machines never outnumber the workers killed so far.
    async fn check_round(&mut self, ops: &[Op], outs: &[String]) {
        for (op, out) in ops.iter().zip(outs) {
            let Op::Delete(i) = op else { continue };
            let user = self.users[*i].clone();
            let again = ops
                .iter()
                .any(|o| matches!(o, Op::Put(j) | Op::Turn(j) if *j == *i));
            if !out.starts_with("Ok") || again {
                continue;
            }
            if let Some(rec) = self.store.get(&uid(&user)).await.expect("get") {
                self.violation(format!("{user}: item left after DELETE: {rec:?}"));
            }
            for m in self.seen.get(&user).cloned().unwrap_or_default() {
                if let Ok(machine) = self.client.get_machine(&m).await {
                    if is_live(&machine.phase) {
                        self.violation(format!("{user}: machine {m} alive after DELETE"));
                    }
                }
            }
        }
        let unreferenced = self.unreferenced().await;
        if unreferenced.len() > self.kills {
            self.violation(format!(
                "{} unreferenced live machines, {} workers killed: {unreferenced:?}",
                unreferenced.len(),
                self.kills
            ));
        }
    }

    async fn unreferenced(&self) -> Vec<String> {
        let mut referenced = HashSet::new();
        for u in &self.users {
            if let Some(m) = self
                .store
                .get(&uid(u))
                .await
                .expect("get")
                .and_then(|r| r.machine_id)
            {
                referenced.insert(m);
            }
        }
        self.client
            .list_all_machines(Some(100))
            .await
            .expect("list")
            .into_iter()
            .filter(|m| is_live(&m.phase) && !referenced.contains(&m.machine_id))
            .map(|m| m.machine_id)
            .collect()
    }

    /// The end of a schedule: every user deleted, time passes beyond the
    /// grace, reconciliation runs: no item and no live machine may remain.
    async fn finish(&mut self) {
        for i in 0..USERS {
            let mut ok = false;
            for _ in 0..3 {
                let user = self.users[i].clone();
                let r = agenthome::user_machine::destroy(
                    self.prov.store(),
                    self.prov.dedalus(),
                    &uid(&user),
                    Duration::from_secs(5),
                )
                .await;
                if r.is_ok() {
                    ok = true;
                    break;
                }
            }
            if !ok {
                self.violation(format!("{}: DELETE never completed", self.users[i]));
            }
        }
        advance(EXPIRE_MS);
        self.sweeper
            .reconcile(now_ms(), Instant::now() + Duration::from_secs(20))
            .await;
        for u in self.users.clone() {
            if let Some(rec) = self.store.get(&uid(&u)).await.expect("get") {
                self.violation(format!("{u}: item left after the final DELETE: {rec:?}"));
            }
        }
        let left = self.unreferenced().await;
        if !left.is_empty() {
            self.violation(format!(
                "live machines beyond the grace with no user: {left:?}"
            ));
            for m in left {
                let _ = self.client.delete_machine(&m, None, None).await;
            }
        }
    }
}

/// A turn's table protocol around the machine (see the module docs): one
/// write begins it, one ends it.
async fn turn(prov: Arc<Prov>, shared: Arc<Shared>, user: String) -> String {
    let store = prov.store();
    let owner = format!("turn-{}", uuid::Uuid::now_v7().simple());
    let now = now_ms();
    let rec = match store
        .begin_turn(&uid(&user), &owner, now + 60_000, None, now)
        .await
    {
        Ok(BeginTurn::Begun(rec)) => rec,
        Ok(BeginTurn::Refused(r)) if r.state == MachineState::Ready && r.machine_id.is_some() => {
            return format!("busy: {:?}", r.lease.map(|l| l.kind))
        }
        Ok(BeginTurn::Refused(_) | BeginTurn::NoItem) => {
            return format!(
                "ensure {:?}",
                prov.ensure(&uid(&user)).await.map(|e| e.record().state)
            )
        }
        Ok(BeginTurn::Limited { .. }) => return "limited".into(),
        Err(e) => return format!("no lease: {e}"),
    };
    *locked(&shared.turns).entry(user.clone()).or_default() += 1;
    let out = turn_body(&prov, &shared, &user, &owner, rec).await;
    locked(&shared.woken).remove(&(user.clone(), owner.clone()));
    *locked(&shared.turns).entry(user.clone()).or_default() -= 1;
    let ended = store
        .end_turn(&uid(&user), &owner, &TurnEnd::default(), now_ms())
        .await;
    format!("{out}; ended {}", ended.is_ok())
}

async fn turn_body(
    prov: &Prov,
    shared: &Shared,
    user: &str,
    owner: &str,
    rec: UserRecord,
) -> String {
    let store = prov.store();
    let client = prov.dedalus();
    let Some(machine) = rec.machine_id else {
        return "no machine".into();
    };
    let lost = |why: String| async move {
        let r = store.mark_lost(&uid(user), owner, &why, now_ms()).await;
        format!("lost ({why}): {:?}", r.map(|r| r.state))
    };
    let phase = match client.get_machine(&machine).await {
        Ok(m) if is_live(&m.phase) => m.phase,
        Ok(m) => return lost(format!("phase {}", m.phase)).await,
        Err(e) if e.is_not_found() => return lost("404".into()).await,
        Err(e) => return format!("status failed: {e}"),
    };
    if phase != Phase::Running {
        if let Err(e) = client.wake_machine(&machine, None, None).await {
            if e.is_not_found() {
                return lost("404 on wake".into()).await;
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        if let Err(e) = client.wait_until(&machine, Phase::Running, deadline).await {
            return format!("wake failed: {e}");
        }
    }
    locked(&shared.woken).insert((user.to_string(), owner.to_string()));
    // The "command", as the turn checks its lease before one: confirmed by
    // the write that began the turn until `lease.until` (less the margin),
    // no table read. Then the machine must be running.
    let until = rec.lease.map_or(0, |l| l.until);
    let confirmed = now_ms() + 1_000 < until;
    if confirmed {
        match client.get_machine(&machine).await {
            Ok(m) if is_asleep(&m.phase) => locked(&shared.violations).push(format!(
                "{user}: machine {machine} is {} while its turn holds the lease",
                m.phase
            )),
            _ => {}
        }
    }
    let power = store.get(&uid(user)).await.ok().flatten().map(|r| r.power);
    format!("turn done: confirmed {confirmed} power {power:?}")
}

/// The operations of one round, drawn from `rng`.
fn draw_round(rng: &mut StdRng, pending: &[ProvisionEvent], users: &[String]) -> Vec<Op> {
    let n = rng.random_range(1..=3);
    (0..n)
        .map(|_| {
            let u = rng.random_range(0..USERS);
            let has_event = pending.iter().any(|e| e.user_id == users[u]);
            match rng.random_range(0..14) {
                0..=2 => Op::Put(u),
                3..=5 if has_event => Op::Work(u),
                3..=5 => Op::Put(u),
                6..=7 => Op::Delete(u),
                8..=10 => Op::Turn(u),
                11..=12 => Op::Sweep,
                _ => Op::Reconcile,
            }
        })
        .collect()
}

/// A Dedalus fault for a round, or none.
fn draw_fault(rng: &mut StdRng) -> Option<serde_json::Value> {
    let unavailable = |method: &str, path: &str| {
        serde_json::json!({"method": method, "path": path, "times": 1, "status": 503,
            "error_code": "DEPENDENCY_UNAVAILABLE", "message": "injected", "retryable": true,
            "retry_after_ms": 10})
    };
    let delay = |method: &str, path: &str| serde_json::json!({"method": method, "path": path, "times": 2, "delay_ms": 40});
    match rng.random_range(0..10) {
        0 => Some(unavailable("POST", "/v1/machines/*/sleep")),
        1 => Some(unavailable("POST", "/v1/machines")),
        2 => Some(unavailable("DELETE", "/v1/machines/*")),
        3 => Some(delay("POST", "/v1/machines")),
        4 => Some(delay("POST", "/v1/machines/*/sleep")),
        5 => Some(delay("GET", "/v1/machines/*")),
        6 => Some(delay("DELETE", "/v1/machines/*")),
        7 => Some(delay("POST", "/v1/machines/*/wake")),
        _ => None,
    }
}

async fn schedule(emu: &Emulator, client: &Client, seed: u64) -> Vec<String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut w = World::new(seed, client);
    let rounds = rng.random_range(3..=7);
    for _ in 0..rounds {
        if rng.random_bool(0.2) {
            advance(EXPIRE_MS);
            w.trace.push("expire".into());
        }
        let fault = draw_fault(&mut rng);
        if let Some(f) = &fault {
            emu.inject_fault(f.clone()).await;
        }
        let ops = draw_round(&mut rng, &w.pending, &w.users);
        let outs = w.round(ops.clone(), &mut rng).await;
        if fault.is_some() {
            emu.clear_faults().await;
        }
        w.trace.push(format!("{ops:?} -> {outs:?}"));
        w.check_round(&ops, &outs).await;
    }
    w.finish().await;
    w.violations
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

/// GIVEN `INTERLEAVE_SCHEDULES` random schedules (default 2000) over two
/// users, on parallel lanes (each its own emulator)
/// WHEN each runs its rounds of concurrent operations step by step
/// THEN no invariant is violated at any step, and every schedule ends with
/// no item and no live machine once its users are deleted and the grace has
/// passed.
#[test]
fn random_interleavings_keep_every_invariant() {
    let schedules = env_u64("INTERLEAVE_SCHEDULES").unwrap_or(2000);
    let base = env_u64("INTERLEAVE_SEED").unwrap_or_else(|| now_ms() % 1_000_000_000);
    eprintln!("interleave: {schedules} schedules from seed {base} (replay: INTERLEAVE_SEED={base} INTERLEAVE_SCHEDULES={schedules})");
    let started = std::time::Instant::now();
    let lane_count = env_u64("INTERLEAVE_LANES").unwrap_or(LANES).clamp(1, 64);
    let lanes: Vec<_> = (0..lane_count)
        .map(|lane| {
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async move {
                    let emu = Emulator::start_with(&[
                        "--boot-delay",
                        "5ms",
                        "--wake-delay",
                        "5ms",
                        "--sleep-delay",
                        "5ms",
                        "--destroy-delay",
                        "5ms",
                        "--default-autosleep",
                        "never",
                    ])
                    .await;
                    let client = emu.client();
                    let mut violations = Vec::new();
                    let mut ran = 0u64;
                    let mut seed = base + lane;
                    while seed < base + schedules {
                        violations.extend(schedule(&emu, &client, seed).await);
                        ran += 1;
                        seed += lane_count;
                    }
                    (ran, violations)
                })
            })
        })
        .collect();
    let mut ran = 0;
    let mut violations = Vec::new();
    for lane in lanes {
        let (n, v) = lane.join().expect("lane panicked");
        ran += n;
        violations.extend(v);
    }
    eprintln!(
        "interleave: {ran} schedules, {} violations, {:.1} s",
        violations.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        violations.is_empty(),
        "{} violations in {ran} schedules; first ones:\n{}",
        violations.len(),
        violations
            .iter()
            .take(5)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

//! The sleep sweep and reconciliation (`agenthome::sweep`) against the real
//! emulator process and a real DynamoDB-compatible server (`moto_server`),
//! except the 500-trial race, which uses the in-memory store (same
//! semantics, written once in the store's engine) with the real emulator,
//! plus a shorter run of the same race on DynamoDB.
//!
//! Invariants (docs/design.md §6): 2 (never sleep a machine a turn holds or a
//! running command holds), 5 (status reads never wake), 6 (orphans are
//! found), and "no sweep ever scans the table".

use agenthome_tests::uid;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agenthome::clock::now_ms;
use agenthome::dedalus::{
    Client, CreateMachineRequest, IdempotencyKey, Phase, UpdateMachineRequest,
};
use agenthome::store::{
    create_table, new_create_key, shard_for, AcquireOutcome, DynamoStore, Hold, Lease, LeaseKind,
    LeasePurpose, MachineState, MemoryStore, Power, UserRecord, UserStore,
};
use agenthome::sweep::{sleep_key, SweepSettings, Sweeper};
use agenthome_tests::fixtures::{small, start_machine};
use agenthome_tests::{unique_table_name, Emulator, Moto};
use serde_json::json;
use tokio::time::Instant;

const MINUTE: u64 = 60_000;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

async fn dynamo() -> Arc<DynamoStore> {
    let moto = Moto::shared().await;
    let client = moto.dynamodb_client().await;
    let name = unique_table_name("sweep");
    create_table(&client, &name).await.expect("create table");
    Arc::new(DynamoStore::new(client, name))
}

/// Settings for tests: defaults, short budgets, orphans reported at once.
fn settings() -> SweepSettings {
    SweepSettings {
        sleep_call_timeout: Duration::from_secs(3),
        read_call_timeout: Duration::from_secs(5),
        marker_check_timeout: Duration::from_secs(5),
        orphan_grace: Duration::ZERO,
        ..SweepSettings::default()
    }
}

fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(60)
}

async fn create_machine(client: &Client, autosleep: &str) -> String {
    let req = CreateMachineRequest {
        autosleep: Some(autosleep.to_owned()),
        ..small()
    };
    start_machine(client, &req, Some(&IdempotencyKey::new()))
        .await
        .machine_id
}

/// A ready, awake user whose machine is running, last active at
/// `last_active_at` (in the past, so the sweep sees it as idle).
async fn ready_user<S: UserStore>(
    store: &S,
    client: &Client,
    user: &str,
    last_active_at: u64,
    autosleep: &str,
) -> String {
    let machine_id = create_machine(client, autosleep).await;
    item_for(store, user, &machine_id, last_active_at).await;
    machine_id
}

/// The item of a provisioned user for `machine_id`, awake since and last
/// active at `at`.
async fn item_for<S: UserStore>(store: &S, user: &str, machine_id: &str, at: u64) {
    let key = new_create_key();
    let owner = format!("prov-{user}");
    let lease = Lease::new(&owner, LeaseKind::Provision, at + MINUTE);
    store
        .claim(&uid(user), &key, &lease, at)
        .await
        .expect("claim");
    store
        .record_machine_id(&uid(user), &key, machine_id, at)
        .await
        .expect("record machine id");
    store
        .mark_ready(&uid(user), &owner, "v1", at)
        .await
        .expect("mark ready");
    store
        .release_lease(&uid(user), &owner, at)
        .await
        .expect("release");
}

async fn item<S: UserStore>(store: &S, user: &str) -> UserRecord {
    store
        .get(&uid(user))
        .await
        .expect("get")
        .expect("item exists")
}

async fn phase(client: &Client, id: &str) -> Phase {
    client.get_machine(id).await.expect("get machine").phase
}

async fn wait_phase(client: &Client, id: &str, want: &[Phase], within: Duration) -> Phase {
    let end = Instant::now() + within;
    loop {
        let p = phase(client, id).await;
        if want.contains(&p) || Instant::now() > end {
            return p;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `n` user ids in the same awake shard.
fn same_shard_users(n: usize) -> Vec<String> {
    (0..)
        .map(|i| format!("user-{i}"))
        .filter(|u| shard_for(&uid(u)) == "0")
        .take(n)
        .collect()
}

fn is_asleep(p: &Phase) -> bool {
    matches!(p, Phase::Sleeping | Phase::Stopping)
}

/// Sleep requests the emulator received (POST …/sleep), in order.
async fn sleep_requests(emu: &Emulator) -> Vec<serde_json::Value> {
    emu.requests()
        .await
        .into_iter()
        .filter(|r| {
            r["method"] == "POST" && r["path"].as_str().is_some_and(|p| p.ends_with("/sleep"))
        })
        .collect()
}

fn assert_consistent_awake(rec: &UserRecord) {
    assert_eq!(rec.power, Power::Awake, "{rec:?}");
    assert!(
        rec.awake_shard.is_some(),
        "still in the awake index: {rec:?}"
    );
    assert!(rec.lease.is_none(), "the sweep lease was released: {rec:?}");
    assert_eq!(rec.state, MachineState::Ready);
}

fn assert_asleep(rec: &UserRecord) {
    assert_eq!(rec.power, Power::Asleep, "{rec:?}");
    assert!(rec.awake_shard.is_none(), "left the awake index: {rec:?}");
    assert!(rec.awake_since.is_none());
    assert!(rec.lease.is_none(), "the sweep lease was released: {rec:?}");
}

/// A small deterministic PRNG (xorshift64*), seeded per test run and printed
/// so a failing interleaving can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

// ---------------------------------------------------------------------------
// 1. Race: a turn and a sweep on the same user
// ---------------------------------------------------------------------------

/// Counts of a race run.
#[derive(Debug, Default)]
struct RaceStats {
    trials: u64,
    /// The turn saw its machine not running while it held its lease.
    violations: u64,
    /// Item and machine disagree once both finished.
    inconsistent: u64,
    /// The turn lost its lease (a write under it was refused).
    turn_lease_lost: u64,
    slept: u64,
    skipped_busy: u64,
    turn_woke: u64,
}

/// One chat turn as the turn flow does it: take the turn lease (waiting
/// briefly while the sweep holds it), get the machine and wake it if not
/// running, "run commands" (phase read before and after, which must both be
/// `running`), touch, release.
async fn turn<S: UserStore>(
    store: &S,
    client: &Client,
    user: &str,
    machine_id: &str,
    work: Duration,
    stats: &Mutex<RaceStats>,
) {
    let owner = format!("turn-{}", uuid::Uuid::now_v7().simple());
    let mut held = false;
    for _ in 0..2000 {
        let now = now_ms();
        match store
            .acquire_lease(&uid(user), &owner, LeasePurpose::Turn, now + 30_000, now)
            .await
            .expect("acquire turn lease")
        {
            AcquireOutcome::Acquired(_) => {
                held = true;
                break;
            }
            AcquireOutcome::Busy(_) => tokio::time::sleep(Duration::from_millis(1)).await,
            AcquireOutcome::Changed(rec) => panic!("turn lease refused as changed: {rec:?}"),
        }
    }
    assert!(held, "the turn never got its lease");
    let m = client.get_machine(machine_id).await.expect("get machine");
    if m.phase != Phase::Running {
        client
            .wake_machine(machine_id, None, None)
            .await
            .expect("wake");
        client
            .wait_until(
                machine_id,
                Phase::Running,
                Instant::now() + Duration::from_secs(20),
            )
            .await
            .expect("running after wake");
        stats.lock().expect("stats").turn_woke += 1;
    }
    if store
        .mark_awake(&uid(user), &owner, now_ms())
        .await
        .is_err()
    {
        stats.lock().expect("stats").turn_lease_lost += 1;
    }
    // "Commands": the machine must be running throughout.
    let before = phase(client, machine_id).await;
    tokio::time::sleep(work).await;
    let after = phase(client, machine_id).await;
    if before != Phase::Running || after != Phase::Running {
        stats.lock().expect("stats").violations += 1;
        eprintln!("VIOLATION: machine {before} → {after} while the turn held its lease");
    }
    if store.touch(&uid(user), &owner, now_ms()).await.is_err() {
        stats.lock().expect("stats").turn_lease_lost += 1;
    }
    let _ = store.release_lease(&uid(user), &owner, now_ms()).await;
}

/// `max_offset`: the random start offsets of the turn and the sweep span
/// this much, about a turn's length on the store used; `max_work`: the
/// turn's "commands" last up to this long (the window in which a sweep
/// without the lease condition would sleep the machine under the turn).
async fn race<S: UserStore + 'static>(
    store: Arc<S>,
    trials: u64,
    max_offset: Duration,
    max_work: Duration,
) -> RaceStats {
    let emu = Emulator::start_with(&[
        "--wake-delay",
        "5ms",
        "--sleep-delay",
        "5ms",
        "--default-autosleep",
        "never",
    ])
    .await;
    let client = emu.client();
    let user = "race-user";
    let machine_id = ready_user(&*store, &client, user, now_ms() - MINUTE, "never").await;
    let sweeper = Arc::new(Sweeper::new(
        Arc::clone(&store),
        &client,
        SweepSettings {
            idle_after: Duration::ZERO,
            concurrency: 4,
            ..settings()
        },
    ));
    let seed = std::env::var("SWEEP_RACE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| now_ms() | 1);
    eprintln!("race: {trials} trials, seed {seed} (SWEEP_RACE_SEED to replay)");
    let mut rng = Rng(seed);
    let stats = Arc::new(Mutex::new(RaceStats::default()));
    for _ in 0..trials {
        let span = u64::try_from(max_offset.as_micros()).unwrap_or(u64::MAX);
        let work_us = rng.below(u64::try_from(max_work.as_micros()).unwrap_or(1));
        let work = Duration::from_micros(work_us);
        let turn_delay = Duration::from_micros(rng.below(span));
        // Half the trials start the sweep uniformly at random; the other
        // half aim it at the turn's lease (its start plus up to its length),
        // where only the lease condition keeps the sweep off the machine.
        let sweep_delay = if rng.below(2) == 0 {
            Duration::from_micros(rng.below(span))
        } else {
            turn_delay + Duration::from_micros(rng.below(work_us + span / 2))
        };
        let t = {
            let (store, client, stats, machine_id) = (
                Arc::clone(&store),
                client.clone(),
                Arc::clone(&stats),
                machine_id.clone(),
            );
            tokio::spawn(async move {
                tokio::time::sleep(turn_delay).await;
                turn(&*store, &client, user, &machine_id, work, &stats).await;
            })
        };
        let s = {
            let sweeper = Arc::clone(&sweeper);
            tokio::spawn(async move {
                tokio::time::sleep(sweep_delay).await;
                sweeper
                    .run(now_ms(), Instant::now() + Duration::from_secs(20))
                    .await
            })
        };
        t.await.expect("turn task");
        let report = s.await.expect("sweep task");
        // Both finished: the item must agree with the machine.
        let rec = item(&*store, user).await;
        let p = wait_phase(
            &client,
            &machine_id,
            &[Phase::Running, Phase::Sleeping],
            Duration::from_secs(2),
        )
        .await;
        let consistent = match rec.power {
            Power::Awake => p == Phase::Running,
            Power::Asleep => is_asleep(&p),
            Power::Unknown => false,
        };
        let mut st = stats.lock().expect("stats");
        st.trials += 1;
        st.slept += report.slept;
        st.skipped_busy += report.skipped_busy;
        if !consistent {
            st.inconsistent += 1;
            eprintln!("INCONSISTENT: item {:?} vs machine {p}", rec.power);
        }
    }
    let st = std::mem::take(&mut *stats.lock().expect("stats"));
    st
}

fn race_trials(default: u64) -> u64 {
    std::env::var("SWEEP_RACE_TRIALS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn check_race(st: &RaceStats, trials: u64) {
    eprintln!("race stats: {st:?}");
    assert_eq!(st.trials, trials);
    assert_eq!(
        st.violations, 0,
        "the sweep slept a machine while a turn held it: {st:?}"
    );
    assert_eq!(st.turn_lease_lost, 0, "a turn lost its lease: {st:?}");
    assert_eq!(st.inconsistent, 0, "item and machine disagree: {st:?}");
    if trials >= 50 {
        // The race was really exercised: both orders happened.
        assert!(st.slept > 0 && st.turn_woke > 0, "sweep never won: {st:?}");
        assert!(
            st.skipped_busy > 0 || st.slept < trials,
            "turn never won: {st:?}"
        );
    }
}

/// GIVEN one user with a running machine and an always-idle threshold
/// WHEN a turn (lease → wake → commands → touch → release) and a sweep run
/// concurrently with random offsets, many times
/// THEN the machine is running whenever the turn checks it under its lease,
/// no turn loses its lease, and item and machine agree after every trial.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn race_turn_vs_sweep_never_sleeps_a_held_machine_memory_store() {
    let trials = race_trials(500);
    let st = race(
        Arc::new(MemoryStore::new()),
        trials,
        Duration::from_millis(10),
        Duration::from_millis(8),
    )
    .await;
    check_race(&st, trials);
}

/// The same race on DynamoDB (moto), fewer trials.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn race_turn_vs_sweep_never_sleeps_a_held_machine_dynamodb() {
    let trials = std::env::var("SWEEP_RACE_TRIALS_DYNAMO")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let st = race(
        dynamo().await,
        trials,
        Duration::from_millis(150),
        Duration::from_millis(60),
    )
    .await;
    check_race(&st, trials);
}

// ---------------------------------------------------------------------------
// 2. A command left running holds the machine awake
// ---------------------------------------------------------------------------

/// GIVEN an idle user whose turn left a command running (hold with its
/// completion marker absent, not expired)
/// WHEN the sweep runs THEN the machine stays awake (no sleep call) and the
/// check did not wake anything; WHEN the marker then exists THEN the next
/// sweep clears the hold and sleeps the machine; and GIVEN an expired hold
/// with the marker absent THEN it no longer blocks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_command_holds_the_machine_until_its_marker_exists_or_the_hold_expires() {
    let emu = Emulator::start_with(&["--default-autosleep", "never"]).await;
    let client = emu.client();
    let store = dynamo().await;
    let t = now_ms() - 10 * MINUTE;
    let held = ready_user(&*store, &client, "held", t, "never").await;
    let expired = ready_user(&*store, &client, "expired", t, "never").await;
    let marker = ".agenthome/holds/cmd-1.done";
    for (user, until) in [("held", now_ms() + 30 * MINUTE), ("expired", t + MINUTE)] {
        let owner = format!("turn-{user}");
        store
            .acquire_lease(&uid(user), &owner, LeasePurpose::Turn, t + MINUTE, t)
            .await
            .expect("lease");
        let hold = Hold {
            until,
            marker: marker.to_owned(),
        };
        store
            .set_hold(&uid(user), &owner, &hold, t)
            .await
            .expect("hold");
        store
            .release_lease(&uid(user), &owner, t)
            .await
            .expect("release");
    }
    let sweeper = Sweeper::new(Arc::clone(&store), &client, settings());

    let r1 = sweeper.run(now_ms(), deadline()).await;
    assert_eq!(r1.candidates, 2, "{r1:?}");
    assert_eq!(r1.held_by_running_command, 1, "{r1:?}");
    assert_eq!(r1.slept, 1, "the expired hold did not block: {r1:?}");
    assert_eq!(phase(&client, &held).await, Phase::Running);
    let rec = item(&*store, "held").await;
    assert_consistent_awake(&rec);
    assert!(
        rec.all_holds().next().is_some(),
        "hold kept while the command runs"
    );
    assert!(is_asleep(&phase(&client, &expired).await));
    let exp = item(&*store, "expired").await;
    assert_asleep(&exp);
    assert!(exp.all_holds().next().is_none(), "expired hold cleared");
    let sleeps = sleep_requests(&emu).await;
    assert!(
        sleeps
            .iter()
            .all(|r| !r["path"].as_str().unwrap_or_default().contains(&held)),
        "no sleep call for the held machine: {sleeps:?}"
    );

    // The command finishes: its marker appears in the machine's home.
    let path = emu.machine_home(&held).join(marker);
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(&path, "").expect("marker");
    let r2 = sweeper.run(now_ms(), deadline()).await;
    assert_eq!((r2.slept, r2.held_by_running_command), (1, 0), "{r2:?}");
    let rec = item(&*store, "held").await;
    assert_asleep(&rec);
    assert!(rec.all_holds().next().is_none(), "hold cleared: {rec:?}");
    assert!(is_asleep(&phase(&client, &held).await));

    // Invariant 5: the marker checks never woke a machine.
    let wakes = emu
        .requests()
        .await
        .into_iter()
        .filter(|r| r["path"].as_str().is_some_and(|p| p.ends_with("/wake")))
        .count();
    assert_eq!(wakes, 0);
}

/// GIVEN two turns that each left a command running — the first still
/// running, the second finished (its marker exists) — WHEN the sweep runs
/// THEN the machine stays awake: every hold counts, not only the last one
/// set; WHEN the first finishes too THEN the machine sleeps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_earlier_command_still_running_keeps_holding_after_a_later_one_finished() {
    let emu = Emulator::start_with(&["--default-autosleep", "never"]).await;
    let client = emu.client();
    let store = dynamo().await;
    let t = now_ms() - 10 * MINUTE;
    let machine = ready_user(&*store, &client, "two", t, "never").await;
    let (first, second) = (".agenthome/run/first.done", ".agenthome/run/second.done");
    for (i, marker) in [first, second].into_iter().enumerate() {
        let owner = format!("turn-{i}");
        let at = t + i as u64;
        store
            .acquire_lease(&uid("two"), &owner, LeasePurpose::Turn, at + MINUTE, at)
            .await
            .expect("lease");
        let hold = Hold {
            until: now_ms() + 30 * MINUTE,
            marker: marker.to_owned(),
        };
        store
            .set_hold(&uid("two"), &owner, &hold, at)
            .await
            .expect("hold");
        store
            .release_lease(&uid("two"), &owner, at)
            .await
            .expect("release");
    }
    let finish = |marker: &str| {
        let path = emu.machine_home(&machine).join(marker);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(&path, "0\n").expect("marker");
    };
    finish(second);
    let sweeper = Sweeper::new(Arc::clone(&store), &client, settings());

    let r1 = sweeper.run(now_ms(), deadline()).await;
    assert_eq!(
        (r1.slept, r1.held_by_running_command),
        (0, 1),
        "the first command still runs: {r1:?}"
    );
    assert_eq!(phase(&client, &machine).await, Phase::Running);

    finish(first);
    let r2 = sweeper.run(now_ms(), deadline()).await;
    assert_eq!((r2.slept, r2.held_by_running_command), (1, 0), "{r2:?}");
    let rec = item(&*store, "two").await;
    assert_asleep(&rec);
    assert_eq!(rec.all_holds().count(), 0, "{rec:?}");
}

// ---------------------------------------------------------------------------
// 3. Hold window, 404, 429, 503, timeouts
// ---------------------------------------------------------------------------

/// GIVEN a machine inside the platform's sleep hold window WHEN the sweep
/// runs THEN it stores `sleep_eligible_at` and moves on; a run before that
/// time makes no sleep call; a run after it (window over) sleeps the machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_window_defers_the_sleep_until_the_machine_is_eligible() {
    let emu = Emulator::start_with(&["--hold-window", "1h", "--hold-jitter", "0s"]).await;
    let client = emu.client();
    let store = dynamo().await;
    let machine = ready_user(&*store, &client, "u", now_ms() - 10 * MINUTE, "never").await;
    let sweeper = Sweeper::new(Arc::clone(&store), &client, settings());

    let r1 = sweeper.run(now_ms(), deadline()).await;
    assert_eq!((r1.skipped_hold, r1.slept, r1.failed), (1, 0, 0), "{r1:?}");
    let rec = item(&*store, "u").await;
    assert_consistent_awake(&rec);
    let eligible = rec.sleep_eligible_at.expect("sleep_eligible_at stored");
    let in_an_hour = now_ms() + 60 * MINUTE;
    assert!(
        eligible > in_an_hour - 2 * MINUTE && eligible <= in_an_hour,
        "eligible {eligible} ≈ now + 1h ({in_an_hour})"
    );
    assert_eq!(sleep_requests(&emu).await.len(), 1);

    let r2 = sweeper.run(now_ms(), deadline()).await;
    assert_eq!(r2.skipped_hold, 1, "{r2:?}");
    assert_eq!(
        sleep_requests(&emu).await.len(),
        1,
        "no call before eligibility"
    );

    emu.configure(json!({"hold_window_ms": 0, "hold_jitter_ms": 0}))
        .await;
    let r3 = sweeper.run(eligible + 1, deadline()).await;
    assert_eq!(r3.slept, 1, "{r3:?}");
    assert_asleep(&item(&*store, "u").await);
    assert!(is_asleep(&phase(&client, &machine).await));
}

/// GIVEN an awake item whose machine was deleted behind its back WHEN the
/// sweep runs THEN the item is marked lost (failed, no machine id, out of
/// the awake index) and the run reports it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_deleted_behind_the_items_back_is_marked_lost() {
    let emu = Emulator::start().await;
    let client = emu.client();
    let store = dynamo().await;
    let machine = ready_user(&*store, &client, "u", now_ms() - 10 * MINUTE, "never").await;
    client
        .delete_machine(&machine, None, None)
        .await
        .expect("delete");
    let end = Instant::now() + Duration::from_secs(10);
    while client.get_machine(&machine).await.is_ok() && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sweeper = Sweeper::new(Arc::clone(&store), &client, settings());
    let r = sweeper.run(now_ms(), deadline()).await;
    assert_eq!((r.lost, r.slept, r.failed), (1, 0, 0), "{r:?}");
    let rec = item(&*store, "u").await;
    assert_eq!(rec.state, MachineState::Failed);
    assert_eq!(rec.machine_id, None);
    assert_eq!(rec.power, Power::Unknown);
    assert!(rec.awake_shard.is_none() && rec.lease.is_none(), "{rec:?}");
    assert!(rec
        .last_error
        .as_deref()
        .unwrap_or_default()
        .contains(&machine));
}

/// GIVEN sleep answering 429, then 503, then hanging past the sleep call's
/// budget WHEN the sweep runs THEN nothing is lost: one sleep call per run
/// (no retry storm), the item stays awake with its lease released; WHEN the
/// fault is gone THEN the next run sleeps the machine — for the timeout, by
/// replaying the same Idempotency-Key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_outages_and_timeouts_leave_the_item_for_the_next_run() {
    let emu = Emulator::start_with(&["--default-autosleep", "never"]).await;
    let client = emu.client();
    let store = dynamo().await;
    let sweeper = Sweeper::new(
        Arc::clone(&store),
        &client,
        SweepSettings {
            sleep_call_timeout: Duration::from_millis(700),
            ..settings()
        },
    );
    let faults = [
        (
            "429",
            json!({"method": "POST", "path": "/v1/machines/*/sleep", "times": 0, "status": 429,
                   "error_code": "RATE_LIMITED", "message": "slow down", "retryable": true,
                   "retry_after_ms": 50}),
        ),
        (
            "503",
            json!({"method": "POST", "path": "/v1/machines/*/sleep", "times": 0, "status": 503,
                   "error_code": "DEPENDENCY_UNAVAILABLE", "message": "down", "retryable": true}),
        ),
        (
            "timeout",
            json!({"method": "POST", "path": "/v1/machines/*/sleep", "times": 1, "delay_ms": 2500}),
        ),
    ];
    for (i, (name, fault)) in faults.into_iter().enumerate() {
        let user = format!("u{i}");
        let machine = ready_user(&*store, &client, &user, now_ms() - 10 * MINUTE, "never").await;
        let before = sleep_requests(&emu).await.len();
        emu.inject_fault(fault).await;

        let r1 = sweeper.run(now_ms(), deadline()).await;
        assert_eq!((r1.failed, r1.slept, r1.lost), (1, 0, 0), "{name}: {r1:?}");
        let rec = item(&*store, &user).await;
        assert_consistent_awake(&rec);
        if name == "timeout" {
            // The emulator still processes (and then logs) the timed-out
            // call; wait for it, so the next run's call is a replay.
            tokio::time::sleep(Duration::from_millis(3000)).await;
        }
        let calls = sleep_requests(&emu).await;
        assert_eq!(
            calls.len() - before,
            1,
            "{name}: one sleep call, no retries"
        );

        emu.clear_faults().await;
        let r2 = sweeper.run(now_ms(), deadline()).await;
        assert_eq!(r2.slept, 1, "{name}: retried next run: {r2:?}");
        assert_asleep(&item(&*store, &user).await);
        assert!(is_asleep(&phase(&client, &machine).await), "{name}");
        let calls = sleep_requests(&emu).await;
        let keys: Vec<&str> = calls[before..]
            .iter()
            .map(|r| r["idempotency_key"].as_str().unwrap_or_default())
            .collect();
        let expected = sleep_key(&machine, rec.awake_since, rec.last_active_at);
        assert_eq!(
            keys,
            vec![expected.as_str(); 2],
            "{name}: same key on both runs"
        );
    }
}

// ---------------------------------------------------------------------------
// 4. Reconciliation
// ---------------------------------------------------------------------------

/// GIVEN an item that says awake for a machine that slept on its own
/// (platform autosleep), a running machine no item references, and an
/// awake item whose machine is gone WHEN reconciliation runs THEN the first
/// item is corrected to asleep, the orphan is reported (and left running),
/// the third item is marked lost; and WHEN run with
/// `RECONCILE_SLEEP_ORPHANS` THEN the orphan is put to sleep.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciliation_fixes_autoslept_items_reports_orphans_and_marks_lost_items() {
    let emu = Emulator::start_with(&["--default-autosleep", "never"]).await;
    let client = emu.client();
    let store = dynamo().await;
    // Recently active (not a sweep candidate), autosleep 1 s.
    let auto = ready_user(&*store, &client, "auto", now_ms(), "1s").await;
    let orphan = create_machine(&client, "never").await;
    let gone = ready_user(&*store, &client, "gone", now_ms(), "never").await;
    client
        .delete_machine(&gone, None, None)
        .await
        .expect("delete");
    assert!(
        is_asleep(&wait_phase(&client, &auto, &[Phase::Sleeping], Duration::from_secs(10)).await),
        "platform autosleep"
    );
    assert_eq!(
        item(&*store, "auto").await.power,
        Power::Awake,
        "item is stale"
    );
    let before = emu.requests().await.len();

    let reporting = SweepSettings {
        reconcile_destroy_orphans: false,
        ..settings()
    };
    let sweeper = Sweeper::new(Arc::clone(&store), &client, reporting.clone());
    let r = sweeper.reconcile(now_ms(), deadline()).await;
    assert!(r.reconciled);
    assert_eq!(
        (r.fixed, r.orphans, r.orphans_slept, r.lost),
        (1, 1, 0, 1),
        "{r:?}"
    );
    assert_asleep(&item(&*store, "auto").await);
    let g = item(&*store, "gone").await;
    assert_eq!(
        (g.state, g.machine_id.as_deref()),
        (MachineState::Failed, None)
    );
    assert_eq!(
        phase(&client, &orphan).await,
        Phase::Running,
        "only reported"
    );
    // Invariant 5: reconciliation only read (GET) — no wake, no sleep.
    let calls = emu.requests().await;
    assert!(
        calls[before..].iter().all(|c| c["method"] == "GET"),
        "{:?}",
        &calls[before..]
    );

    let sleeping_orphans = Sweeper::new(
        Arc::clone(&store),
        &client,
        SweepSettings {
            reconcile_sleep_orphans: true,
            ..reporting.clone()
        },
    );
    let r = sleeping_orphans.reconcile(now_ms(), deadline()).await;
    assert_eq!((r.orphans, r.orphans_slept, r.fixed), (1, 1, 0), "{r:?}");
    assert!(is_asleep(&phase(&client, &orphan).await));

    // A young machine is not called an orphan (provisioning may be recording it).
    let graceful = Sweeper::new(
        Arc::clone(&store),
        &client,
        SweepSettings {
            orphan_grace: Duration::from_secs(3600),
            ..reporting
        },
    );
    let r = graceful.reconcile(now_ms(), deadline()).await;
    assert_eq!(r.orphans, 0, "{r:?}");
}

/// GIVEN a running machine no item references (its user was deleted while
/// its worker died between create and record) and a referenced one
/// WHEN reconciliation runs before the grace period is over THEN nothing is
/// destroyed; WHEN it runs after it THEN the orphan is destroyed and the
/// referenced machine is untouched; with `RECONCILE_DESTROY_ORPHANS=false`
/// an old orphan is only reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciliation_destroys_orphans_older_than_the_grace() {
    let emu = Emulator::start_with(&["--default-autosleep", "never"]).await;
    let client = emu.client();
    let store = dynamo().await;
    let kept = ready_user(&*store, &client, "kept", now_ms(), "never").await;
    let orphan = create_machine(&client, "never").await;
    let grace = Duration::from_secs(15 * 60);
    let destroying = SweepSettings {
        orphan_grace: grace,
        reconcile_destroy_orphans: true,
        ..settings()
    };
    let later = now_ms() + 16 * MINUTE;

    let off = SweepSettings {
        reconcile_destroy_orphans: false,
        ..destroying.clone()
    };
    let r = Sweeper::new(Arc::clone(&store), &client, off)
        .reconcile(later, deadline())
        .await;
    assert_eq!(
        (r.orphans, r.orphans_destroyed),
        (1, 0),
        "off switch: {r:?}"
    );
    assert_eq!(phase(&client, &orphan).await, Phase::Running);

    let sweeper = Sweeper::new(Arc::clone(&store), &client, destroying);
    let r = sweeper.reconcile(now_ms(), deadline()).await;
    assert_eq!((r.orphans, r.orphans_destroyed), (0, 0), "young: {r:?}");
    assert_eq!(phase(&client, &orphan).await, Phase::Running);

    let r = sweeper.reconcile(later, deadline()).await;
    assert_eq!((r.orphans, r.orphans_destroyed), (1, 1), "{r:?}");
    let end = Instant::now() + Duration::from_secs(10);
    let gone = loop {
        match client.get_machine(&orphan).await {
            Err(e) if e.is_not_found() => break true,
            Ok(m) if m.phase == Phase::Destroyed => break true,
            _ if Instant::now() > end => break false,
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    assert!(gone, "the orphan was not destroyed");
    assert_eq!(
        phase(&client, &kept).await,
        Phase::Running,
        "referenced machine kept"
    );
    assert_eq!(
        item(&*store, "kept").await.machine_id.as_deref(),
        Some(kept.as_str())
    );
}

/// GIVEN an item that says asleep while its machine runs WHEN
/// reconciliation runs THEN the item is corrected to awake (back in the
/// awake index), so the next sweep puts the machine to sleep.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciliation_puts_a_running_machine_marked_asleep_back_in_the_awake_index() {
    let emu = Emulator::start_with(&["--default-autosleep", "never"]).await;
    let client = emu.client();
    let store = dynamo().await;
    let machine = ready_user(&*store, &client, "u", now_ms() - 10 * MINUTE, "never").await;
    let rec = item(&*store, "u").await;
    let rec = store
        .set_power(&rec, Power::Asleep, now_ms())
        .await
        .expect("pretend asleep");
    assert!(rec.awake_shard.is_none());
    let sweeper = Sweeper::new(Arc::clone(&store), &client, settings());
    let r = sweeper.run_scheduled(0, now_ms(), deadline(), true).await;
    assert_eq!((r.candidates, r.fixed), (0, 1), "{r:?}");
    assert_eq!(item(&*store, "u").await.power, Power::Awake);
    let r = sweeper.run(now_ms(), deadline()).await;
    assert_eq!(r.slept, 1, "{r:?}");
    assert!(is_asleep(&phase(&client, &machine).await));
}

// ---------------------------------------------------------------------------
// 5. No scans
// ---------------------------------------------------------------------------

/// Records the DynamoDB operation (`X-Amz-Target`) of every request.
#[derive(Debug, Clone, Default)]
struct Operations(Arc<Mutex<Vec<String>>>);

impl aws_sdk_dynamodb::config::Intercept for Operations {
    fn name(&self) -> &'static str {
        "record-operations"
    }

    fn read_before_transmit(
        &self,
        context: &aws_sdk_dynamodb::config::interceptors::BeforeTransmitInterceptorContextRef<'_>,
        _components: &aws_sdk_dynamodb::config::RuntimeComponents,
        _cfg: &mut aws_sdk_dynamodb::config::ConfigBag,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let target = context
            .request()
            .headers()
            .get("x-amz-target")
            .unwrap_or("?")
            .to_owned();
        self.0.lock().expect("ops").push(target);
        Ok(())
    }
}

/// GIVEN a table with idle, busy and recent items WHEN a sweep and a
/// reconciliation run THEN the DynamoDB requests on the wire include Query
/// (the indexes) and never Scan; and no code in `shared/src` calls the
/// DynamoDB Scan API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweep_and_reconciliation_never_scan_the_table() {
    let emu = Emulator::start_with(&["--default-autosleep", "never"]).await;
    let client = emu.client();
    let moto = Moto::shared().await;
    let ops = Operations::default();
    let conf = aws_sdk_dynamodb::config::Builder::from(&moto.sdk_config().await)
        .interceptor(ops.clone())
        .build();
    let ddb = aws_sdk_dynamodb::Client::from_conf(conf);
    let name = unique_table_name("sweep-noscan");
    create_table(&ddb, &name).await.expect("table");
    let store = Arc::new(DynamoStore::new(ddb, name));
    for (i, at) in [now_ms() - 10 * MINUTE, now_ms() - 20 * MINUTE, now_ms()]
        .into_iter()
        .enumerate()
    {
        ready_user(&*store, &client, &format!("user-{i}"), at, "never").await;
    }
    ops.0.lock().expect("ops").clear();
    let sweeper = Sweeper::new(Arc::clone(&store), &client, settings());
    let r = sweeper.run_scheduled(0, now_ms(), deadline(), true).await;
    assert_eq!(r.slept, 2, "{r:?}");
    let seen = ops.0.lock().expect("ops").clone();
    let distinct: HashSet<&str> = seen.iter().map(String::as_str).collect();
    eprintln!(
        "DynamoDB operations: {distinct:?} ({} requests)",
        seen.len()
    );
    assert!(distinct.contains("DynamoDB_20120810.Query"), "{distinct:?}");
    assert!(
        !distinct.iter().any(|op| op.ends_with(".Scan")),
        "{distinct:?}"
    );

    // And in the source: no call of the Scan API anywhere in the library.
    let root = agenthome_tests::workspace_root().join("shared/src");
    let mut offenders = Vec::new();
    let mut dirs = vec![root];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("read dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                for needle in [".scan()", "operation::scan", "ScanInput", "ScanOutput"] {
                    if text.contains(needle) {
                        offenders.push(format!("{}: {needle}", path.display()));
                    }
                }
            }
        }
    }
    assert!(offenders.is_empty(), "{offenders:?}");
}

// ---------------------------------------------------------------------------
// 6. Explicit sleep refused
// ---------------------------------------------------------------------------

/// GIVEN every sleep call refused with 401 "missing internal route
/// signature" (after 300 ms, so concurrent calls would overlap), three idle
/// awake items (one machine already asleep) WHEN the
/// sweep runs (concurrency 16) THEN it makes exactly one sleep call, reports
/// sleep unavailable, marks the sleeping machine's item asleep by reading
/// its phase and leaves the running ones to autosleep; WHEN the platform
/// autosleeps those THEN the next run (again one refused call at most)
/// brings their items in line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_explicit_sleep_falls_back_to_autosleep_with_at_most_one_call_per_run() {
    let emu = Emulator::start_with(&["--default-autosleep", "never"]).await;
    let client = emu.client();
    let store = dynamo().await;
    let t = now_ms() - 10 * MINUTE;
    // Same shard, so the three are one page, handled concurrently.
    let users = same_shard_users(3);
    let [ua, ub, uc] = [&users[0], &users[1], &users[2]];
    let a = ready_user(&*store, &client, ua, t, "never").await;
    let b = ready_user(&*store, &client, ub, t, "never").await;
    let c = ready_user(&*store, &client, uc, t, "never").await;
    client
        .sleep_machine(&a, None, None)
        .await
        .expect("direct sleep");
    wait_phase(&client, &a, &[Phase::Sleeping], Duration::from_secs(5)).await;
    emu.inject_fault(json!({
        "method": "POST", "path": "/v1/machines/*/sleep", "times": 0, "status": 401,
        "error_code": "AUTH_INVALID", "message": "missing internal route signature",
        "retryable": false, "delay_ms": 300
    }))
    .await;
    let sweeper = Sweeper::new(Arc::clone(&store), &client, settings());

    let before = sleep_requests(&emu).await.len();
    let r1 = sweeper.run(now_ms(), deadline()).await;
    assert_eq!(
        sleep_requests(&emu).await.len() - before,
        1,
        "one refused call"
    );
    assert!(r1.sleep_unavailable, "{r1:?}");
    assert_eq!(
        (r1.candidates, r1.fixed, r1.awaiting_autosleep, r1.slept),
        (3, 1, 2, 0),
        "{r1:?}"
    );
    assert_asleep(&item(&*store, ua).await);
    assert_consistent_awake(&item(&*store, ub).await);

    // The platform's autosleep takes over (set through PATCH, not sleep).
    for id in [&b, &c] {
        let upd = UpdateMachineRequest {
            autosleep: Some("1s".to_owned()),
            ..UpdateMachineRequest::default()
        };
        client
            .update_machine(id, &upd, None, None)
            .await
            .expect("set autosleep");
    }
    for id in [&b, &c] {
        assert!(is_asleep(
            &wait_phase(&client, id, &[Phase::Sleeping], Duration::from_secs(10)).await
        ));
    }
    let before = sleep_requests(&emu).await.len();
    let r2 = sweeper.run(now_ms(), deadline()).await;
    assert!(
        sleep_requests(&emu).await.len() - before <= 1,
        "at most one refused call"
    );
    assert_eq!((r2.fixed, r2.awaiting_autosleep), (2, 0), "{r2:?}");
    for u in [ua, ub, uc] {
        assert_asleep(&item(&*store, u).await);
    }
}

/// GIVEN an already past deadline WHEN the sweep runs THEN it stops at once
/// and reports work remaining.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_past_deadline_stops_the_run_and_reports_what_remains() {
    let emu = Emulator::start().await;
    let client = emu.client();
    let store = Arc::new(MemoryStore::new());
    ready_user(&*store, &client, "u", now_ms() - 10 * MINUTE, "never").await;
    let sweeper = Sweeper::new(Arc::clone(&store), &client, settings());
    let r = sweeper.run(now_ms(), Instant::now()).await;
    assert!(r.remaining, "{r:?}");
    assert_eq!(r.slept, 0);
    assert_consistent_awake(&item(&*store, "u").await);
}

/// GIVEN a table the sweep cannot read (it does not exist)
/// WHEN a run and a reconciliation run
/// THEN each says so: every failed index query is counted in `index_errors`
/// (one per shard of the awake and the pending-sleep index), the run is
/// `remaining`, and nothing is counted as slept or failed — an unreadable
/// table does not look like a quiet run on the metric line.
#[tokio::test]
async fn an_unreadable_table_is_counted_not_silent() {
    let emu = Emulator::start().await;
    let client = emu.client();
    let moto = Moto::shared().await;
    let store = Arc::new(DynamoStore::new(
        moto.dynamodb_client().await,
        "no-such-table",
    ));
    let sweeper = Sweeper::new(Arc::clone(&store), &client, settings());
    let shards = u64::from(settings().shards.read_shards().len() as u32);
    let r = sweeper.run(now_ms(), deadline()).await;
    assert_eq!(
        r.index_errors,
        2 * shards,
        "awake and pending shards: {r:?}"
    );
    assert!(r.remaining, "{r:?}");
    assert_eq!((r.candidates, r.slept, r.failed), (0, 0, 0), "{r:?}");
    let line = r.to_emf(&agenthome::metrics::MetricsConfig::default(), now_ms());
    assert_eq!(line["index_errors"], 2 * shards, "{line}");
    let r = sweeper.reconcile(now_ms(), deadline()).await;
    assert!(r.index_errors >= shards && r.remaining, "{r:?}");
}

// ---------------------------------------------------------------------------
// 5. Deletion wins over a sweep in flight
// ---------------------------------------------------------------------------

/// GIVEN an idle awake machine whose sweep holds the sweep lease while its
/// sleep call is in flight (the emulator delays it by 600 ms)
/// WHEN DELETE runs meanwhile: it marks the item `destroying` and destroys
/// the machine, and its final conditional delete is held back (the
/// in-memory store's hook) until the sweep is done
/// THEN the sweep's sleep gets 404 but its `mark_lost` cannot turn the item
/// into `failed`: DELETE completes, no item is left (the next message could
/// not provision a new machine for the deleted user).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_that_finds_the_machine_gone_cannot_resurrect_a_deleted_user() {
    let emu = Emulator::start_with(&["--default-autosleep", "never"]).await;
    let client = emu.client();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let hook_gate = Arc::clone(&gate);
    let hook: agenthome::store::StoreHook = Arc::new(move |op, _user| {
        let gate = Arc::clone(&hook_gate);
        Box::pin(async move {
            if op == "delete" {
                let _ = gate.acquire().await.map(|p| p.forget());
            }
        })
    });
    let store = Arc::new(MemoryStore::with_hook(hook));
    let machine = ready_user(&*store, &client, "del", now_ms() - 10 * MINUTE, "never").await;
    emu.inject_fault(
        json!({"method": "POST", "path": "/v1/machines/*/sleep", "times": 1, "delay_ms": 600}),
    )
    .await;

    let sweeper = Sweeper::new(Arc::clone(&store), &client, settings());
    let sweep = tokio::spawn(async move { sweeper.run(now_ms(), deadline()).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (s, c) = (Arc::clone(&store), client.clone());
    let delete = tokio::spawn(async move {
        agenthome::user_machine::destroy(&s, &c, &uid("del"), Duration::from_secs(10)).await
    });
    let report = sweep.await.expect("sweep task");
    assert_eq!(report.slept, 0, "{report:?}");
    let mid = item(&*store, "del").await;
    assert_eq!(
        mid.state,
        MachineState::Destroying,
        "the sweep overwrote the deletion: {mid:?}"
    );
    gate.add_permits(1);
    let deleted = delete.await.expect("delete task");
    assert!(
        matches!(deleted, Ok(agenthome::user_machine::Destroyed::Done)),
        "{deleted:?}"
    );
    assert_eq!(store.get(&uid("del")).await.expect("get"), None);
    assert!(client
        .get_machine(&machine)
        .await
        .is_err_and(|e| e.is_not_found()));
}

// ---------------------------------------------------------------------------
// 6. Fan-out, shard-count changes, dying workers (#25)
// ---------------------------------------------------------------------------

/// A fresh table on moto: its client and name.
async fn dynamo_table() -> (aws_sdk_dynamodb::Client, String) {
    let moto = Moto::shared().await;
    let client = moto.dynamodb_client().await;
    let name = unique_table_name("fanout");
    create_table(&client, &name).await.expect("create table");
    (client, name)
}

/// `n` users per shard of a `shards`-shard layout, in shard order.
fn users_per_shard(prefix: &str, shards: u32, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for s in 0..shards {
        let shard = s.to_string();
        out.extend(
            (0..)
                .map(|i| format!("{prefix}-{i}"))
                .filter(|u| agenthome::store::shard_in(&uid(u), shards) == shard)
                .take(n),
        );
    }
    out
}

/// A stand-in for the Lambda Invoke API on loopback that runs each invoke
/// through the sleep-sweep function's handler in this process: the
/// coordinator's real [`agenthome::sweep::LambdaWorkers`] (AWS SDK, HTTP)
/// reaches the real handler, as a self-invoke in AWS does.
async fn fake_lambda<S: UserStore + 'static>(
    service: Arc<sleep_sweep_fn::SleepSweepService<S>>,
    invoked: Arc<Mutex<Vec<serde_json::Value>>>,
) -> String {
    use axum::routing::post;
    let app = axum::Router::new().route(
        "/2015-03-31/functions/{name}/invocations",
        post(move |body: axum::body::Bytes| {
            let service = Arc::clone(&service);
            let invoked = Arc::clone(&invoked);
            async move {
                let event: serde_json::Value =
                    serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
                invoked
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(event.clone());
                use axum::response::IntoResponse;
                match service.handle(event, now_ms() + 60_000).await {
                    Ok(v) => (axum::http::StatusCode::OK, v.to_string()).into_response(),
                    Err(e) => (
                        axum::http::StatusCode::OK,
                        [("X-Amz-Function-Error", "Unhandled")],
                        json!({"errorMessage": e.to_string()}).to_string(),
                    )
                        .into_response(),
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}")
}

async fn lambda_client(endpoint: &str) -> aws_sdk_lambda::Client {
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_dynamodb::config::Credentials::new(
            "test", "test", None, None, "static",
        ))
        .endpoint_url(endpoint)
        .load()
        .await;
    aws_sdk_lambda::Client::new(&config)
}

/// GIVEN 8 idle awake machines over 4 shards (2 each), a fan-out threshold
/// of 4 and 2 workers WHEN the scheduled run starts THEN it fans out: the
/// coordinator invokes the function twice through the Lambda Invoke API
/// (worker events with 2 shards each, half the sleep rate each), every
/// machine is slept by a worker, and the coordinator's one metric line sums
/// the workers' counts (candidates 8, slept 8, workers 2). WHEN the same
/// table is small (threshold 100) THEN one invocation does it all (workers 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_run_fans_out_to_workers_and_the_coordinator_line_sums_theirs() {
    let emu = Emulator::start_with(&["--default-autosleep", "never"]).await;
    let client = emu.client();
    let (ddb, table) = dynamo_table().await;
    let store = Arc::new(DynamoStore::new(ddb, table).with_awake_shards(4));
    let users = users_per_shard("fan", 4, 2);
    let mut machines = Vec::new();
    for u in &users {
        machines.push(ready_user(&*store, &client, u, now_ms() - 10 * MINUTE, "never").await);
    }
    let fan = SweepSettings {
        shards: agenthome::store::ShardLayout::new(4),
        workers: 2,
        fanout_threshold: 4,
        sleep_rate: 400,
        ..settings()
    };
    // The function as deployed: its handler serves worker events.
    let worker_side = Arc::new(sleep_sweep_fn::SleepSweepService {
        sweeper: Sweeper::new(Arc::clone(&store), &client, fan.clone()),
        metrics: agenthome::metrics::Metrics::off(),
    });
    let invoked = Arc::new(Mutex::new(Vec::new()));
    let endpoint = fake_lambda(worker_side, Arc::clone(&invoked)).await;
    let workers = agenthome::sweep::LambdaWorkers::new(
        lambda_client(&endpoint).await,
        "agenthome-sleep-sweep",
    );
    let (metrics, lines) =
        agenthome::metrics::Metrics::capture(agenthome::metrics::MetricsConfig::default());
    let coordinator = sleep_sweep_fn::SleepSweepService {
        sweeper: Sweeper::new(Arc::clone(&store), &client, fan.clone())
            .with_workers(Arc::new(workers)),
        metrics,
    };
    let schedule = json!({"time": "2026-12-01T12:01:00Z", "detail": {}});
    let answer = coordinator
        .handle(schedule.clone(), now_ms() + 55_000)
        .await
        .expect("scheduled run");
    let report: agenthome::sweep::SweepReport = serde_json::from_value(answer).expect("a report");
    assert_eq!(
        (
            report.workers,
            report.workers_failed,
            report.candidates,
            report.slept
        ),
        (2, 0, 8, 8),
        "{report:?}"
    );
    let tasks: Vec<agenthome::sweep::WorkerTask> = invoked
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|e| {
            agenthome::sweep::WorkerTask::from_event(e)
                .expect("worker event")
                .expect("task")
        })
        .collect();
    let mut shards: Vec<String> = tasks.iter().flat_map(|t| t.shards.clone()).collect();
    shards.sort();
    assert_eq!(
        shards,
        ["0", "1", "2", "3"],
        "every shard to exactly one worker"
    );
    assert!(tasks
        .iter()
        .all(|t| t.shards.len() == 2 && (t.sleep_rate - 200.0).abs() < 1e-9));
    for (u, m) in users.iter().zip(&machines) {
        assert_asleep(&item(&*store, u).await);
        assert!(is_asleep(&phase(&client, m).await), "{u}");
    }
    let emitted = lines.lines();
    assert_eq!(emitted.len(), 1, "one line per run: {emitted:?}");
    let line: serde_json::Value = serde_json::from_str(&emitted[0]).expect("EMF JSON");
    assert_eq!(
        (
            &line["candidates"],
            &line["slept"],
            &line["workers"],
            &line["workers_failed"]
        ),
        (&json!(8), &json!(8), &json!(2), &json!(0)),
        "{line}"
    );

    // Small deployments keep the single invocation.
    let again = users_per_shard("small", 4, 1);
    for u in &again {
        ready_user(&*store, &client, u, now_ms() - 10 * MINUTE, "never").await;
    }
    let before = invoked.lock().unwrap_or_else(|p| p.into_inner()).len();
    let alone = Sweeper::new(
        Arc::clone(&store),
        &client,
        SweepSettings {
            fanout_threshold: 100,
            ..fan
        },
    )
    .with_workers(Arc::new(agenthome::sweep::LambdaWorkers::new(
        lambda_client(&endpoint).await,
        "agenthome-sleep-sweep",
    )));
    let r = alone
        .run_scheduled(60_000, now_ms(), deadline(), false)
        .await;
    assert_eq!((r.workers, r.candidates, r.slept), (0, 4, 4), "{r:?}");
    assert_eq!(
        invoked.lock().unwrap_or_else(|p| p.into_inner()).len(),
        before,
        "no worker invoked"
    );
}

/// GIVEN awake items written while the table had 4 shards (some in shards
/// 2 and 3) and the shard count changed to 2 WHEN a sweep reads only the new
/// range THEN those items would be stranded (the control: it misses them);
/// WHEN it reads the union (`AWAKE_SHARDS_PREVIOUS=4`) THEN every one is
/// slept. GIVEN more such items WHEN the migration runs THEN it moves every
/// misplaced item, reports `complete`, and afterwards a sweep of the new
/// range alone finds them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_count_change_never_strands_an_item() {
    let emu = Emulator::start_with(&["--default-autosleep", "never"]).await;
    let client = emu.client();
    let (ddb, table) = dynamo_table().await;
    let old = Arc::new(DynamoStore::new(ddb.clone(), table.clone()).with_awake_shards(4));
    let new = Arc::new(DynamoStore::new(ddb, table).with_awake_shards(2));
    let users = users_per_shard("grow", 4, 1);
    for u in &users {
        ready_user(&*old, &client, u, now_ms() - 10 * MINUTE, "never").await;
    }
    let shards_of: Vec<String> = {
        let mut v = Vec::new();
        for u in &users {
            v.push(item(&*old, u).await.awake_shard.expect("awake"));
        }
        v
    };
    assert_eq!(shards_of, ["0", "1", "2", "3"], "items carry their shard");
    // One more user woken after the change lands in the new range.
    ready_user(&*new, &client, "late", now_ms() - 10 * MINUTE, "never").await;
    let layout = |previous: Option<u32>| agenthome::store::ShardLayout {
        shards: 2,
        previous,
    };
    let only_new = Sweeper::new(
        Arc::clone(&new),
        &client,
        SweepSettings {
            shards: layout(None),
            ..settings()
        },
    );
    let missed = only_new.run(now_ms(), deadline()).await;
    assert_eq!(
        missed.slept, 3,
        "the control: shards 2 and 3 are not read without the previous range: {missed:?}"
    );
    assert_consistent_awake(&item(&*old, &users[2]).await);
    let union = Sweeper::new(
        Arc::clone(&new),
        &client,
        SweepSettings {
            shards: layout(Some(4)),
            ..settings()
        },
    );
    let r = union.run(now_ms(), deadline()).await;
    assert_eq!(r.slept, 2, "the stranded two: {r:?}");
    for u in users.iter().chain(["late".to_owned()].iter()) {
        assert_asleep(&item(&*old, u).await);
    }

    // The migration.
    let more = users_per_shard("mig", 4, 2);
    for u in &more {
        ready_user(&*old, &client, u, now_ms() - 10 * MINUTE, "never").await;
    }
    let m = agenthome::sweep::migrate(&*new, layout(Some(4)), 3, deadline()).await;
    let misplaced = more
        .iter()
        .filter(|u| {
            agenthome::store::shard_in(&uid(u), 4) != agenthome::store::shard_in(&uid(u), 2)
        })
        .count() as u64;
    assert!(misplaced >= 4, "shards 2 and 3 at least");
    assert_eq!(
        (m.moved, m.failed, m.complete),
        (misplaced, 0, true),
        "{m:?}"
    );
    assert_eq!(m.scanned, 8);
    for u in &more {
        let rec = item(&*old, u).await;
        assert_eq!(
            rec.awake_shard,
            Some(agenthome::store::shard_in(&uid(u), 2)),
            "{u}"
        );
    }
    let again = agenthome::sweep::migrate(&*new, layout(Some(4)), 3, deadline()).await;
    assert_eq!(
        (again.moved, again.in_place),
        (0, 8),
        "idempotent: {again:?}"
    );
    let r = only_new.run(now_ms(), deadline()).await;
    assert_eq!(
        r.slept, 8,
        "after the migration the new range holds all: {r:?}"
    );
}

/// GIVEN a worker whose sleep call hangs (the emulator delays it) WHEN the
/// worker dies mid-call (its task is aborted, as a Lambda killed at its
/// timeout) THEN the item is locked only by the sweep lease it took: a turn
/// is refused while the lease lives and granted once `SWEEP_LEASE` has
/// passed, with nothing else left behind (still awake, same generation
/// rules); the next run sleeps the machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dying_worker_leaves_nothing_locked_past_its_lease() {
    let emu = Emulator::start_with(&["--default-autosleep", "never"]).await;
    let client = emu.client();
    let store = dynamo().await;
    let machine = ready_user(&*store, &client, "dies", now_ms() - 10 * MINUTE, "never").await;
    let lease_ttl = Duration::from_secs(3);
    let worker_settings = SweepSettings {
        lease_ttl,
        sleep_call_timeout: Duration::from_secs(2),
        ..settings()
    };
    let sweeper = Arc::new(Sweeper::new(
        Arc::clone(&store),
        &client,
        worker_settings.clone(),
    ));
    emu.inject_fault(
        json!({"method": "POST", "path": "/v1/machines/*/sleep", "times": 1, "delay_ms": 5000}),
    )
    .await;
    let task = agenthome::sweep::WorkerTask {
        run_id: "dying".into(),
        worker: 0,
        workers: 1,
        shards: worker_settings.shards.read_shards(),
        now_ms: now_ms(),
        deadline_ms: now_ms() + 30_000,
        sleep_rate: 100.0,
    };
    let worker = {
        let sweeper = Arc::clone(&sweeper);
        tokio::spawn(async move { sweeper.run_worker(&task, deadline()).await })
    };
    // Wait until the worker holds the sweep lease (its sleep call is in flight).
    let end = Instant::now() + Duration::from_secs(10);
    let locked = loop {
        let rec = item(&*store, "dies").await;
        if rec.lease.is_some() || Instant::now() > end {
            break rec;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let lease = locked
        .lease
        .clone()
        .expect("the worker took its sweep lease");
    assert_eq!(lease.kind, LeaseKind::Sweep);
    worker.abort();
    let _ = worker.await;
    let now = now_ms();
    let refused = store
        .acquire_lease(
            &uid("dies"),
            "turn-1",
            LeasePurpose::Turn,
            now + 60_000,
            now,
        )
        .await
        .expect("acquire");
    assert!(
        matches!(refused, AcquireOutcome::Busy(_)),
        "the dead worker's lease still lives: {refused:?}"
    );
    assert!(
        lease.until <= now + lease_ttl.as_millis() as u64,
        "bounded by SWEEP_LEASE"
    );
    tokio::time::sleep(Duration::from_millis(
        lease.until.saturating_sub(now_ms()) + 50,
    ))
    .await;
    let now = now_ms();
    match store
        .acquire_lease(
            &uid("dies"),
            "turn-2",
            LeasePurpose::Turn,
            now + 60_000,
            now,
        )
        .await
        .expect("acquire")
    {
        AcquireOutcome::Acquired(rec) => {
            assert_eq!(rec.power, Power::Awake, "nothing else changed: {rec:?}");
        }
        other => panic!("still locked past its lease: {other:?}"),
    }
    store
        .release_lease(&uid("dies"), "turn-2", now_ms())
        .await
        .expect("release");
    // The emulator finishes the delayed call; wait for it, then the next
    // run replays the same key and records the sleep.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let r = sweeper.run(now_ms(), deadline()).await;
    assert_eq!(r.slept, 1, "{r:?}");
    assert!(is_asleep(&phase(&client, &machine).await));
}

/// GIVEN two idle machines and sleep answering 429 once with
/// `retry_after_ms` 1500 WHEN one run sweeps them THEN the first is counted
/// `rate_limited` (and `failed`, left for the next run) and the second sleep
/// call goes out only after the Retry-After has passed; GIVEN a rate of one
/// sleep a second and three machines WHEN the run has about 2 s THEN the
/// third is `deferred` (no lease taken for it) and the run says `remaining`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pacing_honours_retry_after_and_defers_what_the_rate_cannot_fit() {
    let emu = Emulator::start_with(&["--default-autosleep", "never"]).await;
    let client = emu.client();
    let store = Arc::new(MemoryStore::new());
    for u in ["p1", "p2"] {
        ready_user(&*store, &client, u, now_ms() - 10 * MINUTE, "never").await;
    }
    emu.inject_fault(json!({"method": "POST", "path": "/v1/machines/*/sleep", "times": 1, "status": 429,
        "error_code": "RATE_LIMITED", "message": "slow down", "retryable": true, "retry_after_ms": 1500}))
        .await;
    let sweeper = Sweeper::new(
        Arc::clone(&store),
        &client,
        SweepSettings {
            concurrency: 1,
            ..settings()
        },
    );
    let started = Instant::now();
    let r = sweeper.run(now_ms(), deadline()).await;
    assert_eq!((r.rate_limited, r.failed, r.slept), (1, 1, 1), "{r:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "the second sleep waited for Retry-After: {:?}",
        started.elapsed()
    );
    emu.clear_faults().await;

    let store = Arc::new(MemoryStore::new());
    for u in ["d1", "d2", "d3"] {
        ready_user(&*store, &client, u, now_ms() - 10 * MINUTE, "never").await;
    }
    let slow = Sweeper::new(
        Arc::clone(&store),
        &client,
        SweepSettings {
            concurrency: 3,
            sleep_rate: 1,
            ..settings()
        },
    );
    let r = slow
        .run(now_ms(), Instant::now() + Duration::from_millis(2200))
        .await;
    assert_eq!((r.slept, r.deferred, r.remaining), (2, 1, true), "{r:?}");
    let deferred: Vec<UserRecord> = {
        let mut v = Vec::new();
        for u in ["d1", "d2", "d3"] {
            v.push(item(&*store, u).await);
        }
        v.into_iter().filter(|r| r.power == Power::Awake).collect()
    };
    assert_eq!(deferred.len(), 1);
    assert!(
        deferred[0].lease.is_none(),
        "no lease for a deferred candidate"
    );
}

/// GIVEN a fanned-out run whose second worker fails WHEN it ends THEN the
/// coordinator counts `workers_failed` 1 and `remaining`, sums the first
/// worker's sleeps; WHEN the next run's workers answer THEN the rest sleep.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_worker_is_counted_and_its_shards_wait_for_the_next_run() {
    struct Flaky<S> {
        inner: agenthome::sweep::LocalWorkers<S>,
        fail_worker: Option<u32>,
    }
    impl<S: UserStore + 'static> agenthome::sweep::WorkerInvoker for Flaky<S> {
        fn invoke(&self, task: agenthome::sweep::WorkerTask) -> agenthome::sweep::WorkerFuture {
            if Some(task.worker) == self.fail_worker {
                return Box::pin(async {
                    Err(agenthome::sweep::InvokeError::Function(
                        "Unhandled: killed".into(),
                    ))
                });
            }
            self.inner.invoke(task)
        }
    }
    let emu = Emulator::start_with(&["--default-autosleep", "never"]).await;
    let client = emu.client();
    let store = Arc::new(MemoryStore::new().with_awake_shards(2));
    let users = users_per_shard("flaky", 2, 2);
    for u in &users {
        ready_user(&*store, &client, u, now_ms() - 10 * MINUTE, "never").await;
    }
    let fan = SweepSettings {
        shards: agenthome::store::ShardLayout::new(2),
        workers: 2,
        fanout_threshold: 2,
        ..settings()
    };
    let worker = Arc::new(Sweeper::new(Arc::clone(&store), &client, fan.clone()));
    let coordinator = |fail_worker| {
        Sweeper::new(Arc::clone(&store), &client, fan.clone()).with_workers(Arc::new(Flaky {
            inner: agenthome::sweep::LocalWorkers::new(Arc::clone(&worker)),
            fail_worker,
        }))
    };
    let r = coordinator(Some(1))
        .run_scheduled(60_000, now_ms(), deadline(), false)
        .await;
    assert_eq!(
        (r.workers, r.workers_failed, r.slept, r.remaining),
        (2, 1, 2, true),
        "{r:?}"
    );
    let r = coordinator(None)
        .run_scheduled(60_000, now_ms(), deadline(), false)
        .await;
    assert_eq!((r.workers_failed, r.slept), (0, 2), "{r:?}");
    for u in &users {
        assert_asleep(&item(&*store, u).await);
    }
}

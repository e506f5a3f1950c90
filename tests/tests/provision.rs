//! `agenthome::provision` against real processes: the Dedalus emulator and
//! `moto_server` (DynamoDB) on loopback. The asynchronous Lambda invoke is
//! modelled by a [`QueueTrigger`]: the test receives the events and runs the
//! worker on them itself, in spawned tasks (or drops them, to model a worker
//! that crashed).
//!
//! The bootstrap scripts are harmless (`echo … >> ~/bootstrap.log`): the
//! emulator runs commands on the host, with `HOME` set to the machine's
//! directory.
//!
//! A `domain` module at the end covers the pure decisions with `MemoryStore`
//! and a Dedalus client that points nowhere (those paths make no API call).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use agenthome_tests::uid;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agenthome::dedalus::{CreateMachineRequest, IdempotencyKey, Machine, Phase};
use agenthome::provision::{
    Bootstrap, BootstrapOutcome, Ensure, MachineSpec, ProvisionError, ProvisionEvent,
    ProvisionSettings, Provisioner, QueueTrigger,
};
use agenthome::store::{create_table, DynamoStore, MachineState, UserRecord, UserStore};
use agenthome_tests::{unique_table_name, Emulator, Moto};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

type Prov = Provisioner<DynamoStore, QueueTrigger>;

const BOOTSTRAP_OK: &str = "echo bootstrapped >> ~/bootstrap.log";

fn spec() -> MachineSpec {
    MachineSpec {
        vcpu: 1.0,
        memory_mib: 1024,
        storage_gib: 10,
        autosleep: "30m".into(),
    }
}

/// The create request the provisioner sends (the "crashed worker" sends the
/// same one, so the emulator's idempotency replay applies).
fn create_request() -> CreateMachineRequest {
    let s = spec();
    CreateMachineRequest {
        vcpu: s.vcpu,
        memory_mib: s.memory_mib,
        storage_gib: s.storage_gib,
        autosleep: Some(s.autosleep),
    }
}

fn settings(script: &str, lease_ttl: Duration) -> ProvisionSettings {
    let mut s = ProvisionSettings::new(spec(), Bootstrap::new(script, None));
    s.lease_ttl = lease_ttl;
    s.boot_timeout = Duration::from_secs(20);
    s.bootstrap_timeout = Duration::from_secs(20);
    s.margin = Duration::from_millis(200);
    s
}

/// A fresh table on the serialized moto server: `moto_server`'s threaded
/// default does not make a conditional write atomic against concurrent ones
/// (see `Moto::shared`); DynamoDB does, and these tests race on one item.
async fn fresh_table() -> (aws_sdk_dynamodb::Client, String) {
    let moto = Moto::shared().await;
    let client = moto.dynamodb_client().await;
    let name = unique_table_name("provision");
    create_table(&client, &name).await.expect("create table");
    (client, name)
}

/// A provisioner over `table` and `emu`, and the receiving end of its trigger.
fn provisioner(
    emu: &Emulator,
    table: &(aws_sdk_dynamodb::Client, String),
    script: &str,
    lease_ttl: Duration,
) -> (Arc<Prov>, UnboundedReceiver<ProvisionEvent>) {
    let (tx, rx) = unbounded_channel();
    let store = DynamoStore::new(table.0.clone(), table.1.clone());
    let prov = Provisioner::new(
        store,
        emu.client(),
        QueueTrigger(tx),
        settings(script, lease_ttl),
    );
    (Arc::new(prov), rx)
}

/// Every event already in the queue.
fn drain(rx: &mut UnboundedReceiver<ProvisionEvent>) -> Vec<ProvisionEvent> {
    let mut events = Vec::new();
    while let Ok(e) = rx.try_recv() {
        events.push(e);
    }
    events
}

/// Run the worker on each event concurrently (spawned tasks, like async
/// invokes) and return every outcome.
async fn run_workers(
    prov: &Arc<Prov>,
    events: Vec<ProvisionEvent>,
) -> Vec<Result<UserRecord, ProvisionError>> {
    let handles: Vec<_> = events
        .into_iter()
        .map(|e| {
            let p = Arc::clone(prov);
            tokio::spawn(async move { p.run_worker(&e).await })
        })
        .collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("worker task panicked"));
    }
    out
}

async fn machines(emu: &Emulator) -> Vec<Machine> {
    emu.client()
        .list_all_machines(Some(100))
        .await
        .expect("list machines")
}

async fn item(prov: &Prov, user: &str) -> UserRecord {
    prov.store()
        .get(&uid(user))
        .await
        .expect("get item")
        .expect("the user has an item")
}

/// A provisioning lease no step of a test outlives, however loaded the
/// machine: its end is brought about by [`lease_runs_out`], not waited for.
const LONG_LEASE: Duration = Duration::from_secs(60);

/// The lease on `user`'s item (a "crashed" worker's) runs out now: its
/// holder's lease is cut to a moment already past, as if its TTL had
/// elapsed. Waiting out a short TTL instead made the checks made while
/// it was live race the clock under load.
async fn lease_runs_out(prov: &Prov, user: &str) {
    let rec = item(prov, user).await;
    let owner = &rec.lease.as_ref().expect("a lease is held").owner;
    let now = agenthome::clock::now_ms();
    prov.store()
        .renew_lease(&uid(user), owner, now - 1, now)
        .await
        .expect("the holder's lease is cut");
    let rec = item(prov, user).await;
    assert!(rec.live_lease(now).is_none(), "the lease ran out: {rec:?}");
}

/// Number of items in the table (a full scan: tests only).
async fn table_items(table: &(aws_sdk_dynamodb::Client, String)) -> usize {
    let out = table
        .0
        .scan()
        .table_name(&table.1)
        .send()
        .await
        .expect("scan");
    assert!(
        out.last_evaluated_key().is_none(),
        "scan paged unexpectedly"
    );
    out.items().len()
}

fn bootstrap_log(emu: &Emulator, machine_id: &str) -> String {
    std::fs::read_to_string(emu.machine_home(machine_id).join("bootstrap.log")).unwrap_or_default()
}

/// POST /v1/machines requests the emulator received.
async fn create_calls(emu: &Emulator) -> usize {
    emu.requests()
        .await
        .iter()
        .filter(|r| r["method"] == "POST" && r["path"] == "/v1/machines")
        .count()
}

// ---------------------------------------------------------------------------
// 1. Concurrent first messages
// ---------------------------------------------------------------------------

/// GIVEN a user without an item
/// WHEN 50 `ensure` calls race (spawned tasks) while every provision event is
///      handed to a worker task as soon as it arrives
/// THEN the emulator holds exactly one new machine (one create call), the
///      table one item for the user, state ready, pointing at that machine,
///      bootstrapped once; repeated for 20 users on the same emulator/table.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_ensures_create_exactly_one_machine_per_user() {
    const ROUNDS: usize = 20;
    const CALLERS: usize = 50;
    let started_at = Instant::now();
    let emu = Emulator::start().await;
    let table = fresh_table().await;
    // A bootstrap that takes a moment keeps the item unfinished while the
    // late callers arrive.
    let script = "sleep 0.2; echo bootstrapped >> ~/bootstrap.log";
    let (prov, mut rx) = provisioner(&emu, &table, script, Duration::from_secs(60));

    for round in 0..ROUNDS {
        let user = format!("user-race-{round}-{}", uuid::Uuid::now_v7().simple());

        // Workers start as soon as events arrive, overlapping the ensures.
        let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
        let pump_prov = Arc::clone(&prov);
        let pump = tokio::spawn(async move {
            let mut workers = Vec::new();
            loop {
                tokio::select! {
                    Some(e) = rx.recv() => {
                        let p = Arc::clone(&pump_prov);
                        workers.push(tokio::spawn(async move { p.run_worker(&e).await }));
                    }
                    _ = &mut stop_rx => break,
                }
            }
            // Every ensure has returned: its event (if any) is queued.
            for e in drain(&mut rx) {
                let p = Arc::clone(&pump_prov);
                workers.push(tokio::spawn(async move { p.run_worker(&e).await }));
            }
            let mut outcomes = Vec::new();
            for w in workers {
                outcomes.push(w.await.expect("worker task panicked"));
            }
            (rx, outcomes)
        });

        // Half the callers start at once; the rest are spread over ~600 ms
        // so some arrive while the winner's worker creates and bootstraps
        // the machine (a client retrying, a second tab): a race that only
        // the first instant covers misses an unguarded overwrite.
        let callers: Vec<_> = (0..CALLERS)
            .map(|i| {
                let p = Arc::clone(&prov);
                let u = user.clone();
                let delay = Duration::from_millis(if i % 2 == 0 { 0 } else { (i as u64) * 12 });
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    p.ensure(&uid(&u)).await
                })
            })
            .collect();
        let mut started = 0;
        for c in callers {
            match c.await.expect("ensure task panicked").expect("ensure") {
                Ensure::Started(_) => started += 1,
                Ensure::InProgress(_) | Ensure::Ready(_) => {}
                other => panic!("unexpected ensure outcome {other:?}"),
            }
        }
        stop_tx.send(()).expect("stop the pump");
        let (back, outcomes) = pump.await.expect("pump task");
        rx = back;

        // The invariant first: one machine per user, one item per user.
        let all = machines(&emu).await;
        assert_eq!(
            all.len(),
            round + 1,
            "round {round}: one machine per user so far: {:?}",
            all.iter().map(|m| &m.machine_id).collect::<Vec<_>>()
        );
        assert_eq!(table_items(&table).await, round + 1, "one item per user");
        let rec = item(&prov, &user).await;
        assert_eq!(rec.state, MachineState::Ready, "round {round}: {rec:?}");
        let machine_id = rec.machine_id.clone().expect("machine id recorded");
        assert!(all.iter().any(|m| m.machine_id == machine_id));
        // Exactly one worker did the work: one create call per user, one
        // bootstrap run (bootstrap.log below). More than one `Started` is
        // possible (and harmless): a caller landing between the worker's
        // release of the trigger's lease and its own acquisition resumes,
        // and that worker or the first one finds the lease busy and leaves.
        assert!(
            started >= 1,
            "round {round}: some ensure starts provisioning"
        );
        assert_eq!(
            create_calls(&emu).await,
            round + 1,
            "round {round}: one create call per user"
        );
        assert!(!outcomes.is_empty(), "round {round}: a worker ran");
        for o in &outcomes {
            assert!(o.is_ok(), "round {round}: worker failed: {o:?}");
        }
        assert_eq!(
            prov.store()
                .find_by_machine(&machine_id)
                .await
                .expect("by-machine")
                .len(),
            1,
            "exactly one item references the machine"
        );
        assert_eq!(bootstrap_log(&emu, &machine_id), "bootstrapped\n");
    }
    eprintln!(
        "{ROUNDS} races of {CALLERS} ensures took {:?}",
        started_at.elapsed()
    );
}

// ---------------------------------------------------------------------------
// 2. Crash points
// ---------------------------------------------------------------------------

/// GIVEN an item claimed by `ensure` whose worker "crashed" right after its
///       create call (the event is dropped; the test makes the create with the
///       stored key and records nothing)
/// WHEN the provisioning lease expires and `ensure` is called again, and the
///      worker runs
/// THEN the worker gets the same machine back (idempotent create): exactly one
///      machine, its id recorded, state ready.
#[tokio::test]
async fn crash_after_create_before_recording_the_id_resumes_the_same_machine() {
    let emu = Emulator::start().await;
    let table = fresh_table().await;
    let (prov, mut rx) = provisioner(&emu, &table, BOOTSTRAP_OK, LONG_LEASE);
    let user = "user-crash-a";

    let first = prov.ensure(&uid(user)).await.expect("ensure");
    assert!(matches!(first, Ensure::Started(_)), "{first:?}");
    let dropped = drain(&mut rx);
    assert_eq!(
        dropped.len(),
        1,
        "one event; the 'crashed' worker never runs it"
    );
    let key = IdempotencyKey::parse(first.record().create_key.clone()).expect("stored key");
    let created = emu
        .client()
        .create_machine(&create_request(), Some(&key))
        .await
        .expect("the crashed worker's create");

    // While the lease is live, another call does not take over.
    let during = prov.ensure(&uid(user)).await.expect("ensure during lease");
    assert!(matches!(during, Ensure::InProgress(_)), "{during:?}");
    assert!(
        drain(&mut rx).is_empty(),
        "no second worker while the lease is live"
    );

    lease_runs_out(&prov, user).await;
    let again = prov.ensure(&uid(user)).await.expect("ensure after expiry");
    assert!(matches!(again, Ensure::Started(_)), "{again:?}");
    assert_eq!(
        again.record().create_key,
        first.record().create_key,
        "same key kept"
    );
    let events = drain(&mut rx);
    assert_eq!(events.len(), 1);
    for r in run_workers(&prov, events).await {
        r.expect("worker");
    }

    let rec = item(&prov, user).await;
    assert_eq!(rec.state, MachineState::Ready, "{rec:?}");
    assert_eq!(rec.machine_id.as_deref(), Some(created.machine_id.as_str()));
    let all = machines(&emu).await;
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(all[0].machine_id, created.machine_id);
    assert_eq!(bootstrap_log(&emu, &created.machine_id), "bootstrapped\n");
}

/// GIVEN an item whose worker "crashed" after recording the machine id but
///       before the bootstrap
/// WHEN the lease expires and `ensure` is called again, and the worker runs
/// THEN no new create call is made, the bootstrap runs once on that machine,
///      and the item is ready on it.
#[tokio::test]
async fn crash_after_recording_the_id_before_bootstrap_resumes_on_that_machine() {
    let emu = Emulator::start().await;
    let table = fresh_table().await;
    let (prov, mut rx) = provisioner(&emu, &table, BOOTSTRAP_OK, LONG_LEASE);
    let user = "user-crash-b";

    let first = prov.ensure(&uid(user)).await.expect("ensure");
    assert_eq!(drain(&mut rx).len(), 1, "the event is dropped (crash)");
    let create_key = first.record().create_key.clone();
    let key = IdempotencyKey::parse(create_key.clone()).expect("stored key");
    let created = emu
        .client()
        .create_machine(&create_request(), Some(&key))
        .await
        .expect("create");
    prov.store()
        .record_machine_id(
            &uid(user),
            &create_key,
            &created.machine_id,
            agenthome::clock::now_ms(),
        )
        .await
        .expect("record machine id");
    let creates_before = create_calls(&emu).await;
    assert_eq!(creates_before, 1);

    lease_runs_out(&prov, user).await;
    let again = prov.ensure(&uid(user)).await.expect("ensure after expiry");
    assert!(matches!(again, Ensure::Started(_)), "{again:?}");
    for r in run_workers(&prov, drain(&mut rx)).await {
        r.expect("worker");
    }

    let rec = item(&prov, user).await;
    assert_eq!(rec.state, MachineState::Ready, "{rec:?}");
    assert_eq!(rec.machine_id.as_deref(), Some(created.machine_id.as_str()));
    assert_eq!(
        rec.bootstrap_version.as_deref(),
        Some(prov.settings().bootstrap.version())
    );
    assert_eq!(
        create_calls(&emu).await,
        1,
        "the worker made no create call"
    );
    assert_eq!(machines(&emu).await.len(), 1);
    assert_eq!(bootstrap_log(&emu, &created.machine_id), "bootstrapped\n");
    assert!(emu
        .machine_home(&created.machine_id)
        .join(prov.settings().bootstrap.marker())
        .exists());
}

// ---------------------------------------------------------------------------
// 3. Bootstrap failure and idempotence
// ---------------------------------------------------------------------------

/// GIVEN a bootstrap script that fails with output on stderr
/// WHEN the user's machine is provisioned
/// THEN the item is `failed` with a readable `last_error` holding the exit
///      code and the output tail, and the lease is released;
/// WHEN the script is fixed (a new provisioner) and `ensure` is called again
/// THEN the item is ready on the SAME machine, no second machine exists.
#[tokio::test]
async fn bootstrap_failure_is_recorded_and_a_fixed_script_resumes_on_the_same_machine() {
    let emu = Emulator::start().await;
    let table = fresh_table().await;
    let broken = "echo step-one-done; echo 'E: Unable to locate package nodejs-9000' >&2; exit 3";
    let (prov, mut rx) = provisioner(&emu, &table, broken, Duration::from_secs(60));
    let user = "user-bootstrap-fail";

    assert!(matches!(
        prov.ensure(&uid(user)).await.expect("ensure"),
        Ensure::Started(_)
    ));
    let outcomes = run_workers(&prov, drain(&mut rx)).await;
    assert_eq!(outcomes.len(), 1);
    match &outcomes[0] {
        Err(ProvisionError::Bootstrap { exit_code, tail }) => {
            assert_eq!(*exit_code, Some(3));
            assert!(
                tail.contains("Unable to locate package nodejs-9000"),
                "{tail}"
            );
        }
        other => panic!("expected a bootstrap failure, got {other:?}"),
    }
    let failed = item(&prov, user).await;
    assert_eq!(failed.state, MachineState::Failed, "{failed:?}");
    assert!(failed.lease.is_none(), "lease released: {failed:?}");
    let error = failed.last_error.clone().expect("last_error");
    assert!(error.contains("bootstrap failed"), "{error}");
    assert!(error.contains("exit code 3"), "{error}");
    assert!(error.contains("step-one-done"), "{error}");
    assert!(
        error.contains("E: Unable to locate package nodejs-9000"),
        "{error}"
    );
    let machine_id = failed
        .machine_id
        .clone()
        .expect("machine recorded before bootstrap");

    // A stale or redelivered event does not retry a failed item by itself.
    let stale = ProvisionEvent {
        user_id: uid(user),
        lease_owner: None,
    };
    let rec = prov
        .run_worker(&stale)
        .await
        .expect("worker on a failed item");
    assert_eq!(rec.state, MachineState::Failed);

    let (fixed, mut rx2) = provisioner(&emu, &table, BOOTSTRAP_OK, Duration::from_secs(60));
    let resumed = fixed
        .ensure(&uid(user))
        .await
        .expect("ensure after the fix");
    assert!(matches!(resumed, Ensure::Started(_)), "{resumed:?}");
    for r in run_workers(&fixed, drain(&mut rx2)).await {
        r.expect("worker with the fixed script");
    }
    let rec = item(&fixed, user).await;
    assert_eq!(rec.state, MachineState::Ready, "{rec:?}");
    assert_eq!(
        rec.machine_id.as_deref(),
        Some(machine_id.as_str()),
        "same machine"
    );
    assert!(rec.last_error.is_none(), "{rec:?}");
    assert_eq!(
        rec.bootstrap_version.as_deref(),
        Some(fixed.settings().bootstrap.version())
    );
    assert_eq!(machines(&emu).await.len(), 1);
    assert_eq!(bootstrap_log(&emu, &machine_id), "bootstrapped\n");
}

/// GIVEN a ready machine whose bootstrap marker is present
/// WHEN `Bootstrap::ensure` runs twice more, and a provision event for the
///      ready item is delivered again
/// THEN the script does not run again (one line in bootstrap.log); a changed
///      script (new version) does run.
#[tokio::test]
async fn bootstrap_runs_once_per_version() {
    let emu = Emulator::start().await;
    let table = fresh_table().await;
    let (prov, mut rx) = provisioner(&emu, &table, BOOTSTRAP_OK, Duration::from_secs(60));
    let user = "user-bootstrap-once";

    prov.ensure(&uid(user)).await.expect("ensure");
    let events = drain(&mut rx);
    for r in run_workers(&prov, events.clone()).await {
        r.expect("worker");
    }
    let rec = item(&prov, user).await;
    assert_eq!(rec.state, MachineState::Ready);
    let machine_id = rec.machine_id.clone().expect("machine id");
    assert_eq!(bootstrap_log(&emu, &machine_id), "bootstrapped\n");

    let client = emu.client();
    let bootstrap = &prov.settings().bootstrap;
    for _ in 0..2 {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let outcome = bootstrap
            .ensure(&client, &machine_id, deadline)
            .await
            .expect("bootstrap ensure");
        assert_eq!(outcome, BootstrapOutcome::AlreadyDone);
    }
    // The same event again, after the item is ready: nothing runs.
    for r in run_workers(&prov, events).await {
        assert_eq!(r.expect("redelivered worker").state, MachineState::Ready);
    }
    assert_eq!(bootstrap_log(&emu, &machine_id), "bootstrapped\n");

    // A new version of the script runs once.
    let v2 = Bootstrap::new("echo v2 >> ~/bootstrap.log", None);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    assert_eq!(
        v2.ensure(&client, &machine_id, deadline).await.expect("v2"),
        BootstrapOutcome::Ran
    );
    assert_eq!(
        v2.ensure(&client, &machine_id, deadline)
            .await
            .expect("v2 again"),
        BootstrapOutcome::AlreadyDone
    );
    assert_eq!(bootstrap_log(&emu, &machine_id), "bootstrapped\nv2\n");
}

// ---------------------------------------------------------------------------
// 4. Redelivered events
// ---------------------------------------------------------------------------

/// GIVEN a claimed item and its provision event
/// WHEN the event is delivered three times at once, and once more afterwards
/// THEN one machine exists, the item is ready on it, and the (slow) bootstrap
///      ran exactly once: only one delivery works at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redelivered_event_still_yields_one_machine_and_one_bootstrap() {
    let emu = Emulator::start().await;
    let table = fresh_table().await;
    let slow = "sleep 0.5; echo bootstrapped >> ~/bootstrap.log";
    let (prov, mut rx) = provisioner(&emu, &table, slow, Duration::from_secs(60));
    let user = "user-redelivered";

    prov.ensure(&uid(user)).await.expect("ensure");
    let events = drain(&mut rx);
    assert_eq!(events.len(), 1);
    let event = events[0].clone();
    let outcomes = run_workers(&prov, vec![event.clone(), event.clone(), event.clone()]).await;
    for o in &outcomes {
        assert!(o.is_ok(), "{o:?}");
    }
    let after = run_workers(&prov, vec![event]).await;
    assert_eq!(
        after[0].as_ref().expect("late redelivery").state,
        MachineState::Ready
    );

    let rec = item(&prov, user).await;
    assert_eq!(rec.state, MachineState::Ready, "{rec:?}");
    assert!(rec.lease.is_none(), "no lease left behind: {rec:?}");
    let machine_id = rec.machine_id.clone().expect("machine id");
    let all = machines(&emu).await;
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(all[0].machine_id, machine_id);
    assert_eq!(all[0].phase, Phase::Running);
    assert_eq!(
        bootstrap_log(&emu, &machine_id),
        "bootstrapped\n",
        "bootstrap ran once"
    );
}

/// Machines that are not destroyed (or on their way), after giving pending
/// destroys `wait` to finish.
async fn live_machines(emu: &Emulator, wait: Duration) -> Vec<Machine> {
    let deadline = Instant::now() + wait;
    loop {
        let live: Vec<Machine> = machines(emu)
            .await
            .into_iter()
            .filter(|m| !matches!(m.phase, Phase::Destroyed | Phase::Destroying))
            .collect();
        if live.is_empty() || Instant::now() > deadline {
            return live;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// GIVEN a worker whose `create_machine` is in flight (the emulator delays
///       the create by 1.5 s), no machine id recorded yet
/// WHEN DELETE runs meanwhile (it finds no machine and removes the item),
///      and then the create answers
/// THEN the worker finds its item gone and destroys the machine it created:
///      no live machine is left for the deleted user; the same holds for a
///      DELETE that is still in `destroying` when the create answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_during_create_leaves_no_machine() {
    let emu = Emulator::start().await;
    let table = fresh_table().await;
    let (prov, mut rx) = provisioner(&emu, &table, BOOTSTRAP_OK, Duration::from_secs(60));
    for (user, finish_delete) in [
        ("user-deleted-mid-create", true),
        ("user-destroying-mid-create", false),
    ] {
        emu.inject_fault(serde_json::json!({
            "method": "POST", "path": "/v1/machines", "times": 1, "delay_ms": 1500
        }))
        .await;
        prov.ensure(&uid(user)).await.expect("ensure");
        let events = drain(&mut rx);
        assert_eq!(events.len(), 1);
        let p = Arc::clone(&prov);
        let event = events[0].clone();
        let worker = tokio::spawn(async move { p.run_worker(&event).await });
        tokio::time::sleep(Duration::from_millis(400)).await;
        if finish_delete {
            let deleted = agenthome::user_machine::destroy(
                prov.store(),
                prov.dedalus(),
                &uid(user),
                Duration::from_secs(10),
            )
            .await
            .expect("delete");
            assert_eq!(deleted, agenthome::user_machine::Destroyed::Done);
        } else {
            prov.store()
                .mark_destroying(&uid(user), agenthome::clock::now_ms())
                .await
                .expect("destroying");
        }
        let outcome = worker.await.expect("worker task");
        let live = live_machines(&emu, Duration::from_secs(5)).await;
        assert!(
            live.is_empty(),
            "{user}: a machine outlived the deletion of its user: {live:?}"
        );
        assert!(
            matches!(outcome, Err(ProvisionError::Superseded(_))),
            "{outcome:?}"
        );
        if !finish_delete {
            let rec = item(&prov, user).await;
            assert_eq!(rec.state, MachineState::Destroying, "{rec:?}");
            assert_eq!(rec.machine_id, None, "{rec:?}");
        }
    }
}

/// GIVEN machines that take 3 s to boot and a worker invocation that ends
///       1.5 s after it starts; the worker is killed while still working
///       (the test aborts its task, as Lambda does to a hung invocation)
/// WHEN Lambda's retry of the event runs right after the deadline
/// THEN the retry finds no live lease of the killed worker, resumes on the
///      same machine and finishes it (ready): the killed worker's lease never
///      outlived its invocation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_at_its_deadline_leaves_no_live_lease() {
    let emu = Emulator::start_with(&["--boot-delay", "3s"]).await;
    let table = fresh_table().await;
    let (prov, mut rx) = provisioner(&emu, &table, BOOTSTRAP_OK, Duration::from_secs(60));
    let user = "user-killed-worker";
    prov.ensure(&uid(user)).await.expect("ensure");
    let event = drain(&mut rx).remove(0);

    let invocation = Duration::from_millis(1500);
    let deadline_ms = agenthome::clock::now_ms() + invocation.as_millis() as u64;
    let p = Arc::clone(&prov);
    let ev = event.clone();
    // Killed while still working (before its own stop, as when a call hangs).
    let kill_after = Duration::from_millis(1000);
    let killed = tokio::time::timeout(kill_after, async move {
        p.run_worker_until(&ev, deadline_ms).await
    })
    .await;
    assert!(
        killed.is_err(),
        "the first invocation was not killed: {killed:?}"
    );
    // Lambda retries the event once the invocation's time is over.
    tokio::time::sleep(invocation - kill_after + Duration::from_millis(50)).await;
    let retry = prov
        .run_worker_until(&event, agenthome::clock::now_ms() + 30_000)
        .await
        .expect("retry");
    assert_eq!(
        retry.state,
        MachineState::Ready,
        "the retry found the killed worker's lease still live and did nothing: {retry:?}"
    );
    assert_eq!(machines(&emu).await.len(), 1, "one machine");
}

/// GIVEN machines that take 3 s to boot
/// WHEN the worker's invocation has only 1.5 s left
/// THEN it stops at its deadline with a retryable error, leaves the item
///      resumable (still provisioning, machine recorded, not `failed`) and no
///      live lease; a later worker with time finishes it on the same machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_out_of_time_leaves_a_resumable_item_and_no_lease() {
    let emu = Emulator::start_with(&["--boot-delay", "3s"]).await;
    let table = fresh_table().await;
    let (prov, mut rx) = provisioner(&emu, &table, BOOTSTRAP_OK, Duration::from_secs(60));
    let user = "user-out-of-time";
    prov.ensure(&uid(user)).await.expect("ensure");
    let event = drain(&mut rx).remove(0);

    let started = Instant::now();
    let deadline_ms = agenthome::clock::now_ms() + 1500;
    let outcome = tokio::time::timeout(
        Duration::from_secs(10),
        prov.run_worker_until(&event, deadline_ms),
    )
    .await
    .expect("the worker stops on its own");
    let err = outcome.expect_err("no time to boot");
    assert!(err.is_retryable(), "{err}");
    assert!(
        started.elapsed() < Duration::from_millis(1600),
        "{:?}",
        started.elapsed()
    );
    let rec = item(&prov, user).await;
    assert_eq!(rec.state, MachineState::Provisioning, "{rec:?}");
    assert!(rec.machine_id.is_some(), "{rec:?}");
    assert!(rec.last_error.is_none(), "{rec:?}");
    assert!(
        rec.live_lease(agenthome::clock::now_ms()).is_none(),
        "a live lease was left behind: {rec:?}"
    );
    assert_eq!(rec.provision_attempts, 1, "{rec:?}");
    let done = prov
        .run_worker_until(&event, agenthome::clock::now_ms() + 30_000)
        .await
        .expect("resumed");
    assert_eq!(done.state, MachineState::Ready);
    assert_eq!(done.machine_id, rec.machine_id);
    assert_eq!(
        done.provision_attempts, 2,
        "the retry is the second attempt"
    );
}

// ---------------------------------------------------------------------------
// 5. Domain decisions (MemoryStore, no Dedalus calls)
// ---------------------------------------------------------------------------

mod domain {
    use super::*;
    use agenthome::clock::now_ms;
    use agenthome::dedalus::{ApiKey, Client, ClientConfig, RetryPolicy, Url};
    use agenthome::provision::{TriggerError, WorkerTrigger};
    use agenthome::store::{new_create_key, Lease, LeaseKind, MemoryStore};

    /// A client for a port nothing listens on: any Dedalus call fails.
    fn nowhere() -> Client {
        let config = ClientConfig::new(
            Url::parse("http://127.0.0.1:9").expect("url"),
            ApiKey::new("unused"),
        )
        .with_retry(RetryPolicy::no_retries())
        .with_request_timeout(Duration::from_millis(200));
        Client::new(config).expect("client")
    }

    fn memory_provisioner() -> (
        Provisioner<MemoryStore, QueueTrigger>,
        UnboundedReceiver<ProvisionEvent>,
    ) {
        let (tx, rx) = unbounded_channel();
        let p = Provisioner::new(
            MemoryStore::new(),
            nowhere(),
            QueueTrigger(tx),
            settings(BOOTSTRAP_OK, Duration::from_secs(60)),
        );
        (p, rx)
    }

    /// Claim `user` with a lease for `owner` live for `ttl_ms` (0: expired).
    async fn claimed(store: &MemoryStore, user: &str, owner: &str, ttl_ms: i64) -> UserRecord {
        let now = now_ms();
        let until = if ttl_ms > 0 {
            now + ttl_ms as u64
        } else {
            now - 1000
        };
        let lease = Lease::new(owner, LeaseKind::Provision, until);
        match store
            .claim(&uid(user), &new_create_key(), &lease, now - 2000)
            .await
            .expect("claim")
        {
            agenthome::store::ClaimOutcome::Claimed(r) => r,
            other => panic!("{other:?}"),
        }
    }

    /// GIVEN a ready item WHEN ensure THEN Ready, no worker started.
    #[tokio::test]
    async fn ensure_on_a_ready_item_reports_ready_and_starts_nothing() {
        let (p, mut rx) = memory_provisioner();
        let rec = claimed(p.store(), "u", "w", 60_000).await;
        p.store()
            .record_machine_id(&uid("u"), &rec.create_key, "m-1", now_ms())
            .await
            .unwrap();
        p.store()
            .mark_ready(&uid("u"), "w", "v1", now_ms())
            .await
            .unwrap();
        let e = p.ensure(&uid("u")).await.unwrap();
        assert!(matches!(e, Ensure::Ready(_)), "{e:?}");
        assert_eq!(e.retry_after(), Duration::ZERO);
        assert!(drain(&mut rx).is_empty());
    }

    /// GIVEN a destroying item WHEN ensure THEN Destroying; a worker on it errs.
    #[tokio::test]
    async fn ensure_on_a_destroying_item_starts_nothing() {
        let (p, mut rx) = memory_provisioner();
        claimed(p.store(), "u", "w", 0).await;
        p.store()
            .mark_destroying(&uid("u"), now_ms())
            .await
            .unwrap();
        let e = p.ensure(&uid("u")).await.unwrap();
        assert!(matches!(e, Ensure::Destroying(_)), "{e:?}");
        assert!(drain(&mut rx).is_empty());
        let w = p
            .run_worker(&ProvisionEvent {
                user_id: uid("u"),
                lease_owner: None,
            })
            .await;
        assert!(matches!(w, Err(ProvisionError::Superseded(_))), "{w:?}");
    }

    /// GIVEN provisioning under a live lease WHEN ensure THEN InProgress, no
    /// second worker; a worker event without that lease leaves it alone.
    #[tokio::test]
    async fn ensure_during_a_live_lease_reports_in_progress() {
        let (p, mut rx) = memory_provisioner();
        let rec = claimed(p.store(), "u", "w", 60_000).await;
        let e = p.ensure(&uid("u")).await.unwrap();
        assert!(matches!(e, Ensure::InProgress(_)), "{e:?}");
        assert!(e.retry_after() > Duration::ZERO);
        assert!(drain(&mut rx).is_empty());
        // A stray event (no lease, or another's) does not steal the lease.
        let w = p
            .run_worker(&ProvisionEvent {
                user_id: uid("u"),
                lease_owner: Some("someone-else".into()),
            })
            .await
            .unwrap();
        assert_eq!(w.lease.as_ref().map(|l| l.owner.as_str()), Some("w"));
        assert_eq!(
            p.store().get(&uid("u")).await.unwrap().unwrap().generation,
            rec.generation
        );
    }

    /// GIVEN provisioning whose lease expired (a dead worker) WHEN ensure
    /// THEN Started with the same create key, one event.
    #[tokio::test]
    async fn ensure_resumes_an_expired_provisioning_with_the_same_key() {
        let (p, mut rx) = memory_provisioner();
        let rec = claimed(p.store(), "u", "dead", 0).await;
        let e = p.ensure(&uid("u")).await.unwrap();
        assert!(matches!(e, Ensure::Started(_)), "{e:?}");
        assert_eq!(e.record().create_key, rec.create_key);
        let events = drain(&mut rx);
        assert_eq!(events.len(), 1);
        assert_eq!(
            events[0].lease_owner.as_deref(),
            e.record().lease.as_ref().map(|l| l.owner.as_str())
        );
        // A second ensure now sees the new live lease.
        assert!(matches!(
            p.ensure(&uid("u")).await.unwrap(),
            Ensure::InProgress(_)
        ));
    }

    /// GIVEN a failed item WHEN ensure THEN Started, same key, error cleared.
    #[tokio::test]
    async fn ensure_restarts_a_failed_item() {
        let (p, mut rx) = memory_provisioner();
        let rec = claimed(p.store(), "u", "w", 60_000).await;
        p.store()
            .mark_failed(&uid("u"), "w", "boom", now_ms())
            .await
            .unwrap();
        p.store()
            .release_lease(&uid("u"), "w", now_ms())
            .await
            .unwrap();
        let e = p.ensure(&uid("u")).await.unwrap();
        assert!(matches!(e, Ensure::Started(_)), "{e:?}");
        assert_eq!(e.record().state, MachineState::Provisioning);
        assert_eq!(e.record().create_key, rec.create_key);
        assert!(e.record().last_error.is_none());
        assert_eq!(drain(&mut rx).len(), 1);
    }

    struct DownTrigger;
    impl WorkerTrigger for DownTrigger {
        async fn start(&self, _event: &ProvisionEvent) -> Result<(), TriggerError> {
            Err("lambda invoke refused".into())
        }
    }

    /// GIVEN a trigger that fails WHEN ensure THEN an error, and the lease it
    /// took is released, so the next ensure can start at once (not after the
    /// lease's TTL).
    #[tokio::test]
    async fn a_failed_trigger_releases_the_lease() {
        let p = Provisioner::new(
            MemoryStore::new(),
            nowhere(),
            DownTrigger,
            settings(BOOTSTRAP_OK, Duration::from_secs(600)),
        );
        let err = p.ensure(&uid("u")).await.unwrap_err();
        assert!(matches!(err, ProvisionError::Trigger(_)), "{err:?}");
        assert!(err.is_retryable());
        let rec = p.store().get(&uid("u")).await.unwrap().unwrap();
        assert!(rec.lease.is_none(), "lease released: {rec:?}");
        // The retry resumes at once (and fails again on the trigger).
        let again = p.ensure(&uid("u")).await.unwrap_err();
        assert!(matches!(again, ProvisionError::Trigger(_)), "{again:?}");
    }

    /// GIVEN no item WHEN a worker event arrives THEN Superseded, no panic.
    #[tokio::test]
    async fn worker_without_an_item_is_superseded() {
        let (p, _rx) = memory_provisioner();
        let w = p
            .run_worker(&ProvisionEvent {
                user_id: uid("ghost"),
                lease_owner: Some("x".into()),
            })
            .await;
        assert!(matches!(w, Err(ProvisionError::Superseded(_))), "{w:?}");
    }
}

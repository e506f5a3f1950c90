//! The [`UserStore`] contract, written once and run against every adapter:
//! [`MemoryStore`](agenthome::store::MemoryStore) in `tests/tests/store_memory.rs`,
//! and [`DynamoStore`](agenthome::store::DynamoStore) against a real
//! DynamoDB-compatible server in `tests/tests/store_dynamo.rs`.
//!
//! Each case takes a fresh, empty store.
//! [`user_store_contract_tests!`](crate::user_store_contract_tests) expands to one `#[tokio::test]` per case,
//! given a path to an `async fn() -> impl UserStore + 'static`.
//!
//! Index reads are eventually consistent in DynamoDB, so the cases read
//! indexes through [`eventually`], which retries briefly until the expected
//! result shows up.

use crate::uid;
use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use agenthome::store::{
    shard_for, AcquireOutcome, ClaimOutcome, CountOutcome, Counter, CreateKey, Cursor, DeleteGuard,
    DeleteOutcome, Hold, Lease, LeaseKind, LeasePurpose, MachineState, Power, ReleaseOutcome,
    SleepPlan, SleepReason, StoreError, UserRecord, UserStore,
};
use agenthome::store::{BeginTurn, TurnCount, TurnEnd};

/// Base time of every case (epoch ms).
pub const T0: u64 = 1_700_000_000_000;
const MINUTE: u64 = 60_000;
const KEY_A: &str = "0123456789abcdef0123456789abcdef";
const KEY_B: &str = "fedcba9876543210fedcba9876543210";

/// Expands to one `#[tokio::test]` per contract case; `$make` is a path to
/// an `async fn() -> S` returning a fresh, empty store.
#[macro_export]
macro_rules! user_store_contract_tests {
    ($make:path) => {
        $crate::user_store_contract_tests!(@cases $make;
            claim_creates_the_item_once,
            claim_race_has_exactly_one_winner,
            claim_rejects_a_malformed_create_key,
            record_machine_id_requires_the_create_key,
            provisioning_transitions_need_the_lease_and_a_machine,
            restart_provisioning_keeps_or_replaces_the_create_key,
            turn_lease_excludes_others_until_it_expires,
            renew_and_release_only_by_the_owner,
            sweep_lease_requires_unchanged_last_active_at,
            mark_asleep_accrues_awake_time_and_leaves_the_awake_index,
            query_awake_idle_pages_through_idle_awake_items_of_one_shard,
            find_by_machine_uses_the_machine_index,
            turn_bookkeeping_needs_the_lease,
            holds_are_a_set,
            parked_terminals_are_stored_by_the_lease_holder,
            mark_lost_forgets_the_machine,
            set_power_needs_the_generation_read,
            destroy_and_delete,
            writes_never_create_missing_items,
            count_request_limits_each_user_and_window,
            note_awake_day_keeps_the_first_baseline_of_a_day,
            no_writer_leaves_destroying,
            record_machine_id_refused_while_destroying,
            begin_turn_takes_the_lease_and_counts_in_one_write,
            end_turn_releases_and_stores_in_one_write,
            provision_attempts_count_worker_leases_until_a_restart,
            pending_sleeps_are_found_through_their_own_index,
            a_turn_start_cancels_a_pending_sleep,
            begin_turn_cancels_a_pending_sleep_and_keeps_the_previous_activity,
            move_awake_shard_moves_only_from_the_shard_read,
        );
    };
    (@cases $make:path; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                $crate::store_contract::$case($make().await).await;
            }
        )*
    };
}

/// Retry an index read until `done` holds (≈5 s), returning the last result.
pub async fn eventually<T, F, Fut>(mut read: F, done: impl Fn(&T) -> bool) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    let mut last = None;
    for _ in 0..50 {
        let value = read().await.expect("index read");
        if done(&value) {
            return value;
        }
        last = Some(value);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    last.expect("at least one read")
}

fn provision_lease(owner: &str, until: u64) -> Lease {
    Lease::new(owner, LeaseKind::Provision, until)
}

async fn claimed<S: UserStore>(store: &S, user: &str, at: u64) -> UserRecord {
    match store
        .claim(
            &uid(user),
            KEY_A,
            &provision_lease("prov-1", at + MINUTE),
            at,
        )
        .await
        .expect("claim")
    {
        ClaimOutcome::Claimed(rec) => rec,
        other => panic!("expected Claimed, got {other:?}"),
    }
}

/// A user whose machine is ready and awake since `at` (`last_active_at = at`), no lease.
async fn ready_user<S: UserStore>(store: &S, user: &str, machine: &str, at: u64) -> UserRecord {
    claimed(store, user, at).await;
    store
        .record_machine_id(&uid(user), KEY_A, machine, at)
        .await
        .expect("record machine");
    store
        .mark_ready(&uid(user), "prov-1", "v1", at)
        .await
        .expect("mark ready");
    match release(store, user, "prov-1", at).await {
        ReleaseOutcome::Released(rec) => rec,
        other => panic!("expected Released, got {other:?}"),
    }
}

async fn acquired<S: UserStore>(
    store: &S,
    user: &str,
    owner: &str,
    purpose: LeasePurpose,
    until: u64,
    now: u64,
) -> UserRecord {
    match store
        .acquire_lease(&uid(user), owner, purpose, until, now)
        .await
        .expect("acquire")
    {
        AcquireOutcome::Acquired(rec) => rec,
        other => panic!("expected Acquired for {owner}, got {other:?}"),
    }
}

/// `owner` releases `user`'s lease at `at` (the call must succeed; the
/// outcome is the caller's to check).
async fn release<S: UserStore>(store: &S, user: &str, owner: &str, at: u64) -> ReleaseOutcome {
    store
        .release_lease(&uid(user), owner, at)
        .await
        .expect("release")
}

fn conflict_current(result: Result<UserRecord, StoreError>) -> UserRecord {
    match result {
        Err(StoreError::Conflict {
            current: Some(current),
            ..
        }) => *current,
        other => panic!("expected Conflict with the current item, got {other:?}"),
    }
}

/// `count` user ids (prefixed) whose awake shard is `shard`.
fn users_in_shard(prefix: &str, shard: &str, count: usize) -> Vec<String> {
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .filter(|u| shard_for(&uid(u)) == shard)
        .take(count)
        .collect()
}

/// GIVEN no item WHEN claimed THEN it is created in `provisioning` with the
/// lease and generation 1; a second claim gets the first item untouched.
pub async fn claim_creates_the_item_once<S: UserStore>(store: S) {
    let rec = claimed(&store, "alice", T0).await;
    assert_eq!(rec.state, MachineState::Provisioning);
    assert_eq!(rec.power, Power::Unknown);
    assert_eq!(rec.generation, 1);
    assert_eq!(rec.create_key, KEY_A);
    assert_eq!(rec.lease, Some(provision_lease("prov-1", T0 + MINUTE)));
    assert_eq!(rec.awake_shard, None);
    assert_eq!(
        store.get(&uid("alice")).await.expect("get"),
        Some(rec.clone())
    );

    let again = store
        .claim(
            &uid("alice"),
            KEY_B,
            &provision_lease("prov-2", T0 + 2 * MINUTE),
            T0 + 1,
        )
        .await
        .expect("second claim");
    assert_eq!(again, ClaimOutcome::AlreadyExists(rec.clone()));
    assert_eq!(store.get(&uid("alice")).await.expect("get"), Some(rec));
    assert_eq!(store.get(&uid("bob")).await.expect("get"), None);
}

/// GIVEN 50 concurrent claims with distinct keys for one user THEN exactly
/// one is Claimed and every other sees the winner's item.
pub async fn claim_race_has_exactly_one_winner<S: UserStore + 'static>(store: S) {
    let store = Arc::new(store);
    let tasks: Vec<_> = (0..50u64)
        .map(|i| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let key = format!("{i:032x}");
                let lease = provision_lease(&format!("prov-{i}"), T0 + MINUTE);
                store.claim(&uid("racer"), &key, &lease, T0).await
            })
        })
        .collect();
    let mut winners = Vec::new();
    let mut seen_keys = HashSet::new();
    for task in tasks {
        match task.await.expect("join").expect("claim") {
            ClaimOutcome::Claimed(rec) => winners.push(rec),
            ClaimOutcome::AlreadyExists(rec) => {
                seen_keys.insert(rec.create_key);
            }
        }
    }
    assert_eq!(winners.len(), 1, "exactly one claim wins");
    let winner = &winners[0];
    assert!(
        seen_keys.iter().all(|k| *k == winner.create_key),
        "losers see the winner's key: {seen_keys:?} vs {}",
        winner.create_key
    );
    let stored = store.get(&uid("racer")).await.expect("get").expect("item");
    assert_eq!(&stored, winner);
}

/// GIVEN a create key that is not 32 lowercase hex WHEN claiming THEN it is
/// refused before anything is written.
pub async fn claim_rejects_a_malformed_create_key<S: UserStore>(store: S) {
    let lease = provision_lease("p", T0 + MINUTE);
    for bad in ["", "xyz", &KEY_A.to_uppercase(), &format!("{KEY_A}0")] {
        let result = store.claim(&uid("carol"), bad, &lease, T0).await;
        assert!(
            matches!(result, Err(StoreError::InvalidArgument(_))),
            "{bad:?}: {result:?}"
        );
    }
    assert_eq!(store.get(&uid("carol")).await.expect("get"), None);
}

/// GIVEN a claimed item WHEN recording a machine id THEN only the claim's
/// create key may, once (the same id again is fine, another id is not).
pub async fn record_machine_id_requires_the_create_key<S: UserStore>(store: S) {
    claimed(&store, "dave", T0).await;
    let refused = conflict_current(
        store
            .record_machine_id(&uid("dave"), KEY_B, "dm-1", T0 + 1)
            .await,
    );
    assert_eq!(refused.machine_id, None);

    let rec = store
        .record_machine_id(&uid("dave"), KEY_A, "dm-1", T0 + 2)
        .await
        .expect("record");
    assert_eq!(rec.machine_id.as_deref(), Some("dm-1"));
    assert_eq!(rec.generation, 2);
    assert_eq!(rec.updated_at, T0 + 2);

    let again = store
        .record_machine_id(&uid("dave"), KEY_A, "dm-1", T0 + 3)
        .await
        .expect("idempotent");
    assert_eq!(again.machine_id.as_deref(), Some("dm-1"));

    let other = conflict_current(
        store
            .record_machine_id(&uid("dave"), KEY_A, "dm-2", T0 + 4)
            .await,
    );
    assert_eq!(other.machine_id.as_deref(), Some("dm-1"));
}

/// GIVEN a claimed item THEN bootstrapping needs the recorded machine and the
/// lease holder; ready marks it awake; failed is refused once ready.
pub async fn provisioning_transitions_need_the_lease_and_a_machine<S: UserStore>(store: S) {
    claimed(&store, "erin", T0).await;
    // No machine recorded yet.
    let early = conflict_current(
        store
            .mark_bootstrapping(&uid("erin"), "prov-1", T0 + 1)
            .await,
    );
    assert_eq!(early.state, MachineState::Provisioning);
    store
        .record_machine_id(&uid("erin"), KEY_A, "dm-e", T0 + 2)
        .await
        .expect("record");
    // Not the lease holder.
    conflict_current(
        store
            .mark_bootstrapping(&uid("erin"), "intruder", T0 + 3)
            .await,
    );
    let boot = store
        .mark_bootstrapping(&uid("erin"), "prov-1", T0 + 4)
        .await
        .expect("bootstrapping");
    assert_eq!(boot.state, MachineState::Bootstrapping);

    let ready = store
        .mark_ready(&uid("erin"), "prov-1", "v7", T0 + 10)
        .await
        .expect("ready");
    assert_eq!(ready.state, MachineState::Ready);
    assert_eq!(ready.bootstrap_version.as_deref(), Some("v7"));
    assert_eq!(ready.power, Power::Awake);
    assert_eq!(ready.awake_shard, Some(shard_for(&uid("erin"))));
    assert_eq!(ready.awake_since, Some(T0 + 10));
    assert_eq!(ready.last_active_at, T0 + 10);
    assert!(ready.generation > boot.generation);

    let late = conflict_current(
        store
            .mark_failed(&uid("erin"), "prov-1", "boom", T0 + 11)
            .await,
    );
    assert_eq!(late.state, MachineState::Ready);
    assert_eq!(late.last_error, None);
}

/// GIVEN a failed provisioning THEN a restart needs the generation read and
/// no live lease, keeps the create key, and replaces it only when no machine
/// is recorded.
pub async fn restart_provisioning_keeps_or_replaces_the_create_key<S: UserStore>(store: S) {
    claimed(&store, "fay", T0).await;
    let failed = store
        .mark_failed(&uid("fay"), "prov-1", "create refused", T0 + 1)
        .await
        .expect("failed");
    assert_eq!(failed.state, MachineState::Failed);
    assert_eq!(failed.last_error.as_deref(), Some("create refused"));

    // The failing worker's lease is still live.
    let lease2 = provision_lease("prov-2", T0 + 5 * MINUTE);
    let busy = store
        .restart_provisioning(
            &uid("fay"),
            failed.generation,
            &lease2,
            CreateKey::Keep,
            T0 + 2,
        )
        .await
        .expect("restart");
    assert!(
        matches!(busy, AcquireOutcome::Busy(ref r) if r.lease.as_ref().map(|l| l.owner.as_str()) == Some("prov-1")),
        "{busy:?}"
    );

    let after_expiry = T0 + MINUTE + 1;
    let stale = store
        .restart_provisioning(
            &uid("fay"),
            failed.generation - 1,
            &lease2,
            CreateKey::Keep,
            after_expiry,
        )
        .await
        .expect("restart");
    assert!(matches!(stale, AcquireOutcome::Changed(_)), "{stale:?}");

    let replaced = match store
        .restart_provisioning(
            &uid("fay"),
            failed.generation,
            &lease2,
            CreateKey::Replace(KEY_B.to_owned()),
            after_expiry,
        )
        .await
        .expect("restart")
    {
        AcquireOutcome::Acquired(rec) => rec,
        other => panic!("expected Acquired, got {other:?}"),
    };
    assert_eq!(replaced.state, MachineState::Provisioning);
    assert_eq!(replaced.create_key, KEY_B);
    assert_eq!(replaced.last_error, None);
    assert_eq!(replaced.lease, Some(lease2.clone()));

    // Once a machine is recorded, the key may no longer change.
    store
        .record_machine_id(&uid("fay"), KEY_B, "dm-f", after_expiry + 1)
        .await
        .expect("record");
    let failed = store
        .mark_failed(&uid("fay"), "prov-2", "bootstrap failed", after_expiry + 2)
        .await
        .expect("failed");
    let later = T0 + 6 * MINUTE;
    let lease3 = provision_lease("prov-3", later + MINUTE);
    let refused = store
        .restart_provisioning(
            &uid("fay"),
            failed.generation,
            &lease3,
            CreateKey::Replace(KEY_A.to_owned()),
            later,
        )
        .await
        .expect("restart");
    assert!(matches!(refused, AcquireOutcome::Changed(_)), "{refused:?}");
    let kept = match store
        .restart_provisioning(
            &uid("fay"),
            failed.generation,
            &lease3,
            CreateKey::Keep,
            later,
        )
        .await
        .expect("restart")
    {
        AcquireOutcome::Acquired(rec) => rec,
        other => panic!("expected Acquired, got {other:?}"),
    };
    assert_eq!(kept.create_key, KEY_B);
    assert_eq!(kept.machine_id.as_deref(), Some("dm-f"));
}

/// GIVEN a turn lease WHEN another turn tries before it expires THEN it is
/// Busy (seeing the holder); after expiry it is taken over.
pub async fn turn_lease_excludes_others_until_it_expires<S: UserStore>(store: S) {
    ready_user(&store, "gus", "dm-g", T0).await;
    let until = T0 + MINUTE;
    let rec = acquired(&store, "gus", "turn-a", LeasePurpose::Turn, until, T0 + 1).await;
    assert_eq!(
        rec.lease,
        Some(Lease::new("turn-a", LeaseKind::Turn, until))
    );

    for now in [T0 + 2, until] {
        match store
            .acquire_lease(&uid("gus"), "turn-b", LeasePurpose::Turn, now + MINUTE, now)
            .await
            .expect("acquire")
        {
            AcquireOutcome::Busy(cur) => {
                assert_eq!(cur.lease.map(|l| l.owner).as_deref(), Some("turn-a"))
            }
            other => panic!("expected Busy at {now}, got {other:?}"),
        }
    }
    let taken = acquired(
        &store,
        "gus",
        "turn-b",
        LeasePurpose::Turn,
        until + MINUTE,
        until + 1,
    )
    .await;
    assert_eq!(taken.lease.map(|l| l.owner).as_deref(), Some("turn-b"));
}

/// GIVEN a lease THEN only its owner renews or releases it; a stale owner
/// gets Conflict / NotHeld and changes nothing.
pub async fn renew_and_release_only_by_the_owner<S: UserStore>(store: S) {
    ready_user(&store, "hal", "dm-h", T0).await;
    acquired(&store, "hal", "turn-a", LeasePurpose::Turn, T0 + MINUTE, T0).await;

    let renewed = store
        .renew_lease(&uid("hal"), "turn-a", T0 + 3 * MINUTE, T0 + 10)
        .await
        .expect("renew");
    assert_eq!(
        renewed.lease.as_ref().map(|l| l.until),
        Some(T0 + 3 * MINUTE)
    );
    // The renewal holds: the old expiry no longer frees it.
    let busy = store
        .acquire_lease(
            &uid("hal"),
            "turn-b",
            LeasePurpose::Turn,
            T0 + 4 * MINUTE,
            T0 + 2 * MINUTE,
        )
        .await
        .expect("acquire");
    assert!(matches!(busy, AcquireOutcome::Busy(_)), "{busy:?}");

    let current = conflict_current(
        store
            .renew_lease(&uid("hal"), "turn-b", T0 + 9 * MINUTE, T0 + 11)
            .await,
    );
    assert_eq!(
        current.lease.as_ref().map(|l| l.until),
        Some(T0 + 3 * MINUTE)
    );

    match release(&store, "hal", "turn-b", T0 + 12).await {
        ReleaseOutcome::NotHeld(Some(cur)) => {
            assert_eq!(cur.lease.map(|l| l.owner).as_deref(), Some("turn-a"))
        }
        other => panic!("expected NotHeld, got {other:?}"),
    }
    match release(&store, "hal", "turn-a", T0 + 13).await {
        ReleaseOutcome::Released(rec) => assert_eq!(rec.lease, None),
        other => panic!("expected Released, got {other:?}"),
    }
    let twice = release(&store, "hal", "turn-a", T0 + 14).await;
    assert!(
        matches!(twice, ReleaseOutcome::NotHeld(Some(_))),
        "{twice:?}"
    );
    // An expired-but-untaken lease is still its owner's to release.
    acquired(
        &store,
        "hal",
        "turn-c",
        LeasePurpose::Turn,
        T0 + 20,
        T0 + 15,
    )
    .await;
    let late = release(&store, "hal", "turn-c", T0 + 10 * MINUTE).await;
    assert!(matches!(late, ReleaseOutcome::Released(_)), "{late:?}");
}

/// GIVEN an idle awake machine WHEN the sweep takes its lease THEN it needs
/// `last_active_at` unchanged and no live lease; a turn then sees it Busy.
pub async fn sweep_lease_requires_unchanged_last_active_at<S: UserStore>(store: S) {
    let rec = ready_user(&store, "ida", "dm-i", T0).await;
    let now = T0 + 10 * MINUTE;
    let stale = store
        .acquire_lease(
            &uid("ida"),
            "sweep-1",
            LeasePurpose::Sweep {
                expected_last_active_at: rec.last_active_at - 1,
            },
            now + 30_000,
            now,
        )
        .await
        .expect("acquire");
    assert!(matches!(stale, AcquireOutcome::Changed(_)), "{stale:?}");

    // A live turn lease blocks the sweep even with the right last_active_at.
    acquired(
        &store,
        "ida",
        "turn-1",
        LeasePurpose::Turn,
        now + MINUTE,
        now,
    )
    .await;
    let blocked = store
        .acquire_lease(
            &uid("ida"),
            "sweep-1",
            LeasePurpose::Sweep {
                expected_last_active_at: rec.last_active_at,
            },
            now + 30_000,
            now + 1,
        )
        .await
        .expect("acquire");
    assert!(matches!(blocked, AcquireOutcome::Busy(_)), "{blocked:?}");
    release(&store, "ida", "turn-1", now + 2).await;

    let swept = acquired(
        &store,
        "ida",
        "sweep-1",
        LeasePurpose::Sweep {
            expected_last_active_at: rec.last_active_at,
        },
        now + 30_000,
        now + 3,
    )
    .await;
    assert_eq!(swept.lease.as_ref().map(|l| l.kind), Some(LeaseKind::Sweep));
    match store
        .acquire_lease(
            &uid("ida"),
            "turn-2",
            LeasePurpose::Turn,
            now + MINUTE,
            now + 4,
        )
        .await
        .expect("acquire")
    {
        AcquireOutcome::Busy(cur) => {
            assert_eq!(cur.lease.map(|l| l.kind), Some(LeaseKind::Sweep))
        }
        other => panic!("expected Busy, got {other:?}"),
    }
}

/// GIVEN an awake machine under a sweep lease WHEN marked asleep THEN awake
/// time accrues, the awake fields go, and it leaves the awake index; a turn
/// lease holder cannot mark it asleep.
pub async fn mark_asleep_accrues_awake_time_and_leaves_the_awake_index<S: UserStore>(store: S) {
    let rec = ready_user(&store, "jo", "dm-j", T0).await;
    let shard = shard_for(&uid("jo"));
    let listed = eventually(
        || store.query_awake_idle(&shard, T0 + 1, None, 10),
        |p| p.items.len() == 1,
    )
    .await;
    assert_eq!(listed.items.first().map(|r| r.user_id.as_str()), Some("jo"));

    // A turn holder cannot put it to sleep.
    acquired(&store, "jo", "turn-1", LeasePurpose::Turn, T0 + 100, T0 + 1).await;
    conflict_current(store.mark_asleep(&uid("jo"), "turn-1", T0 + 2).await);
    release(&store, "jo", "turn-1", T0 + 3).await;

    let sweep = LeasePurpose::Sweep {
        expected_last_active_at: rec.last_active_at,
    };
    acquired(&store, "jo", "sweep-1", sweep, T0 + 6_000, T0 + 4).await;
    let asleep = store
        .mark_asleep(&uid("jo"), "sweep-1", T0 + 5_000)
        .await
        .expect("asleep");
    assert_eq!(asleep.power, Power::Asleep);
    assert_eq!(asleep.awake_ms_total, 5_000);
    assert_eq!(asleep.awake_shard, None);
    assert_eq!(asleep.awake_since, None);
    assert_eq!(
        asleep.lease.as_ref().map(|l| l.owner.as_str()),
        Some("sweep-1")
    );
    let gone = eventually(
        || store.query_awake_idle(&shard, u64::MAX >> 12, None, 10),
        |p| p.items.is_empty(),
    )
    .await;
    assert!(gone.items.is_empty(), "{gone:?}");
    release(&store, "jo", "sweep-1", T0 + 5_001).await;

    // Wake again, sleep again: the total adds up.
    let t1 = T0 + 10 * MINUTE;
    acquired(&store, "jo", "turn-2", LeasePurpose::Turn, t1 + MINUTE, t1).await;
    let awake = store
        .mark_awake(&uid("jo"), "turn-2", t1)
        .await
        .expect("awake");
    assert_eq!(awake.awake_since, Some(t1));
    assert_eq!(awake.awake_shard, Some(shard.clone()));
    // Still awake: awake_since is kept.
    let awake = store
        .mark_awake(&uid("jo"), "turn-2", t1 + 500)
        .await
        .expect("awake");
    assert_eq!(awake.awake_since, Some(t1));
    assert_eq!(awake.last_active_at, t1 + 500);
    release(&store, "jo", "turn-2", t1 + 600).await;
    let t2 = t1 + 10 * MINUTE;
    acquired(
        &store,
        "jo",
        "sweep-2",
        LeasePurpose::Sweep {
            expected_last_active_at: t1 + 500,
        },
        t2 + MINUTE,
        t2,
    )
    .await;
    let asleep = store
        .mark_asleep(&uid("jo"), "sweep-2", t2 + 3_000)
        .await
        .expect("asleep");
    assert_eq!(asleep.awake_ms_total, 5_000 + (t2 + 3_000 - t1));
}

/// GIVEN idle and active awake machines in several shards plus asleep ones
/// WHEN the idle ones of one shard are paged THEN exactly those come back,
/// oldest first, each once, across several pages.
pub async fn query_awake_idle_pages_through_idle_awake_items_of_one_shard<S: UserStore>(store: S) {
    let shard = "3";
    let cutoff = T0 + 100 * MINUTE;
    let users = users_in_shard("pg", shard, 10);
    let mut expected = Vec::new();
    for (i, user) in users.iter().enumerate() {
        let at = if i < 7 {
            T0 + (7 - i as u64) * MINUTE // idle, inserted out of order
        } else {
            cutoff + i as u64 // active: not idle
        };
        ready_user(&store, user, &format!("dm-{user}"), at).await;
        if i < 7 {
            expected.push((at, user.clone()));
        }
    }
    // Asleep in the same shard: not in the index.
    let sleeper = users_in_shard("zz", shard, 1).remove(0);
    let rec = ready_user(&store, &sleeper, "dm-sleeper", T0).await;
    acquired(
        &store,
        &sleeper,
        "sweep-x",
        LeasePurpose::Sweep {
            expected_last_active_at: rec.last_active_at,
        },
        T0 + MINUTE,
        T0 + 1,
    )
    .await;
    store
        .mark_asleep(&uid(&sleeper), "sweep-x", T0 + 2)
        .await
        .expect("asleep");
    // Idle but in other shards.
    for other in ["1", "5"] {
        for user in users_in_shard("os", other, 2) {
            ready_user(&store, &user, &format!("dm-{user}"), T0).await;
        }
    }
    expected.sort();

    let collect_all = || async {
        let mut got = Vec::new();
        let mut pages = 0;
        let mut cursor: Option<Cursor> = None;
        loop {
            let page = store
                .query_awake_idle(shard, cutoff, cursor.as_ref(), 2)
                .await?;
            pages += 1;
            assert!(page.items.len() <= 2);
            got.extend(
                page.items
                    .into_iter()
                    .map(|r| (r.last_active_at, r.user_id.to_string())),
            );
            match page.cursor {
                Some(c) => cursor = Some(c),
                None => return Ok::<_, StoreError>((got, pages)),
            }
            assert!(pages < 50, "paging does not end");
        }
    };
    let (got, pages) = eventually(collect_all, |(got, _)| got.len() >= expected.len()).await;
    assert_eq!(got, expected);
    assert!(
        pages >= 4,
        "7 items at 2 per page take at least 4 pages, got {pages}"
    );

    // A cursor is bound to its shard.
    let first = store
        .query_awake_idle(shard, cutoff, None, 2)
        .await
        .expect("page");
    let cursor = first.cursor.expect("more pages");
    let wrong = store.query_awake_idle("4", cutoff, Some(&cursor), 2).await;
    assert!(matches!(wrong, Err(StoreError::InvalidCursor)), "{wrong:?}");
    let garbage = store
        .query_awake_idle(shard, cutoff, Some(&Cursor::from_string("not a cursor")), 2)
        .await;
    assert!(
        matches!(garbage, Err(StoreError::InvalidCursor)),
        "{garbage:?}"
    );
}

/// GIVEN machines recorded for two users THEN `find_by_machine` finds each
/// user by its machine and nothing for an unknown machine.
pub async fn find_by_machine_uses_the_machine_index<S: UserStore>(store: S) {
    ready_user(&store, "kim", "dm-k", T0).await;
    ready_user(&store, "lee", "5f0c2a1e-0000-4000-8000-000000000001", T0).await;
    claimed(&store, "max", T0).await; // no machine yet

    let kim = eventually(|| store.find_by_machine("dm-k"), |v| !v.is_empty()).await;
    assert_eq!(
        kim.iter().map(|r| r.user_id.as_str()).collect::<Vec<_>>(),
        ["kim"]
    );
    let lee = eventually(
        || store.find_by_machine("5f0c2a1e-0000-4000-8000-000000000001"),
        |v| !v.is_empty(),
    )
    .await;
    assert_eq!(
        lee.iter().map(|r| r.user_id.as_str()).collect::<Vec<_>>(),
        ["lee"]
    );
    assert!(store
        .find_by_machine("dm-none")
        .await
        .expect("query")
        .is_empty());
}

/// GIVEN a turn lease THEN touch, terminal, hold and sleep-eligibility writes
/// succeed for its owner only.
pub async fn turn_bookkeeping_needs_the_lease<S: UserStore>(store: S) {
    let rec = ready_user(&store, "ned", "dm-n", T0).await;
    conflict_current(store.touch(&uid("ned"), "nobody", T0 + 1).await);
    acquired(
        &store,
        "ned",
        "turn-1",
        LeasePurpose::Turn,
        T0 + MINUTE,
        T0 + 1,
    )
    .await;

    let touched = store
        .touch(&uid("ned"), "turn-1", T0 + 20)
        .await
        .expect("touch");
    assert_eq!(touched.last_active_at, T0 + 20);
    assert_eq!(touched.awake_shard, rec.awake_shard);
    assert!(touched.generation > rec.generation);

    let t = store
        .set_terminal(&uid("ned"), "turn-1", Some("term-9"), T0 + 21)
        .await
        .expect("terminal");
    assert_eq!(t.terminal_id.as_deref(), Some("term-9"));
    conflict_current(
        store
            .set_terminal(&uid("ned"), "turn-x", None, T0 + 22)
            .await,
    );

    let hold = Hold {
        until: T0 + 30 * MINUTE,
        marker: "/home/u/.agenthome/done-1".to_owned(),
    };
    conflict_current(store.set_hold(&uid("ned"), "turn-x", &hold, T0 + 23).await);
    let held = store
        .set_hold(&uid("ned"), "turn-1", &hold, T0 + 23)
        .await
        .expect("hold");
    assert_eq!(held.holds, vec![hold]);
    assert_eq!(held.hold, None);
    let eligible = store
        .set_sleep_eligible_at(&uid("ned"), "turn-1", T0 + 5 * MINUTE, T0 + 24)
        .await
        .expect("eligible");
    assert_eq!(eligible.sleep_eligible_at, Some(T0 + 5 * MINUTE));
    let cleared = store
        .clear_hold(&uid("ned"), "turn-1", T0 + 25)
        .await
        .expect("clear");
    assert_eq!(cleared.hold, None);
    assert!(cleared.holds.is_empty(), "{cleared:?}");
    let cleared = store
        .set_terminal(&uid("ned"), "turn-1", None, T0 + 26)
        .await
        .expect("terminal");
    assert_eq!(cleared.terminal_id, None);
}

/// GIVEN a turn lease WHEN holds are set for several commands THEN each
/// joins the set (an earlier one keeps holding), the same marker is
/// replaced, expired ones drop out, finished ones are released one by one,
/// and only the lease holder may change them.
pub async fn holds_are_a_set<S: UserStore>(store: S) {
    ready_user(&store, "hal", "dm-h", T0).await;
    acquired(
        &store,
        "hal",
        "turn-1",
        LeasePurpose::Turn,
        T0 + 60 * MINUTE,
        T0 + 1,
    )
    .await;
    let hold = |marker: &str, until: u64| Hold {
        until,
        marker: marker.to_owned(),
    };
    let a = hold(".agenthome/run/a.done", T0 + 30 * MINUTE);
    let b = hold(".agenthome/run/b.done", T0 + 40 * MINUTE);
    let short = hold(".agenthome/run/s.done", T0 + 2);
    store
        .set_hold(&uid("hal"), "turn-1", &a, T0 + 2)
        .await
        .expect("a");
    store
        .set_hold(&uid("hal"), "turn-1", &short, T0 + 2)
        .await
        .expect("short");
    let rec = store
        .set_hold(&uid("hal"), "turn-1", &b, T0 + 3)
        .await
        .expect("b");
    assert_eq!(
        rec.holds,
        vec![a.clone(), b.clone()],
        "the earlier hold stays; the expired one dropped out"
    );
    assert_eq!(rec.all_holds().count(), 2);
    let a2 = hold(&a.marker, T0 + 50 * MINUTE);
    let rec = store
        .set_hold(&uid("hal"), "turn-1", &a2, T0 + 4)
        .await
        .expect("a again");
    assert_eq!(
        rec.holds,
        vec![b.clone(), a2.clone()],
        "same marker replaced"
    );
    conflict_current(
        store
            .release_holds(
                &uid("hal"),
                "turn-x",
                std::slice::from_ref(&b.marker),
                T0 + 5,
            )
            .await,
    );
    conflict_current(store.set_hold(&uid("hal"), "turn-x", &b, T0 + 5).await);
    let rec = store
        .release_holds(
            &uid("hal"),
            "turn-1",
            std::slice::from_ref(&b.marker),
            T0 + 5,
        )
        .await
        .expect("release b");
    assert_eq!(
        rec.holds,
        vec![a2.clone()],
        "only the finished one released"
    );
    let rec = store
        .release_holds(
            &uid("hal"),
            "turn-1",
            std::slice::from_ref(&a2.marker),
            T0 + 6,
        )
        .await
        .expect("release a");
    assert!(rec.holds.is_empty() && rec.hold.is_none(), "{rec:?}");
    let got = store.get(&uid("hal")).await.expect("get").expect("item");
    assert_eq!(got.all_holds().count(), 0);
}

/// GIVEN a turn lease THEN the current and the parked terminals are stored
/// together by the lease holder only, and an empty list removes them.
pub async fn parked_terminals_are_stored_by_the_lease_holder<S: UserStore>(store: S) {
    ready_user(&store, "pat", "dm-p", T0).await;
    acquired(
        &store,
        "pat",
        "turn-1",
        LeasePurpose::Turn,
        T0 + MINUTE,
        T0 + 1,
    )
    .await;
    let parked = vec!["tm-a".to_owned(), "tm-b".to_owned()];
    conflict_current(
        store
            .set_terminals(&uid("pat"), "turn-x", Some("tm-c"), &parked, T0 + 2)
            .await,
    );
    let rec = store
        .set_terminals(&uid("pat"), "turn-1", Some("tm-c"), &parked, T0 + 2)
        .await
        .expect("terminals");
    assert_eq!(rec.terminal_id.as_deref(), Some("tm-c"));
    assert_eq!(rec.parked_terminals, parked);
    let got = store.get(&uid("pat")).await.expect("get").expect("item");
    assert_eq!(got.parked_terminals, parked);
    let rec = store
        .set_terminals(&uid("pat"), "turn-1", Some("tm-a"), &[], T0 + 3)
        .await
        .expect("terminals");
    assert_eq!(rec.terminal_id.as_deref(), Some("tm-a"));
    assert!(rec.parked_terminals.is_empty());
    assert!(matches!(
        store
            .set_terminals(
                &uid("pat"),
                "turn-1",
                Some("tm-a"),
                &[String::new()],
                T0 + 4
            )
            .await,
        Err(StoreError::InvalidArgument(_))
    ));
}

/// GIVEN an awake machine that turned out to be gone WHEN marked lost THEN
/// the item forgets the machine (so a fresh create key is allowed) and keeps
/// the awake time.
pub async fn mark_lost_forgets_the_machine<S: UserStore>(store: S) {
    let rec = ready_user(&store, "ola", "dm-o", T0).await;
    acquired(
        &store,
        "ola",
        "sweep-1",
        LeasePurpose::Sweep {
            expected_last_active_at: rec.last_active_at,
        },
        T0 + MINUTE,
        T0 + 1,
    )
    .await;
    conflict_current(store.mark_lost(&uid("ola"), "other", "404", T0 + 2).await);
    let lost = store
        .mark_lost(&uid("ola"), "sweep-1", "machine not found", T0 + 4_000)
        .await
        .expect("lost");
    assert_eq!(lost.state, MachineState::Failed);
    assert_eq!(lost.power, Power::Unknown);
    assert_eq!(lost.machine_id, None);
    assert_ne!(
        lost.create_key, rec.create_key,
        "a lost machine's create key is replaced, so a new machine is created"
    );
    assert_eq!(lost.awake_shard, None);
    assert_eq!(lost.awake_ms_total, 4_000);
    let error = lost.last_error.clone().unwrap_or_default();
    assert!(
        error.contains("dm-o") && error.contains("machine not found"),
        "{error}"
    );
    assert!(store
        .find_by_machine("dm-o")
        .await
        .expect("query")
        .is_empty());

    release(&store, "ola", "sweep-1", T0 + 4_001).await;
    let lost = store.get(&uid("ola")).await.expect("get").expect("item");
    let lease = provision_lease("prov-2", T0 + 2 * MINUTE);
    let restarted = store
        .restart_provisioning(
            &uid("ola"),
            lost.generation,
            &lease,
            CreateKey::Replace(KEY_B.to_owned()),
            T0 + 5_000,
        )
        .await
        .expect("restart");
    assert!(
        matches!(restarted, AcquireOutcome::Acquired(ref r) if r.create_key == KEY_B),
        "{restarted:?}"
    );
}

/// GIVEN an item read by reconciliation WHEN its power is corrected THEN the
/// write needs the generation read, and asleep/awake move it out of/into the
/// awake index with the awake time accrued.
pub async fn set_power_needs_the_generation_read<S: UserStore>(store: S) {
    let rec = ready_user(&store, "pat", "dm-p", T0).await;
    let mut stale = rec.clone();
    stale.generation -= 1;
    let current = conflict_current(store.set_power(&stale, Power::Asleep, T0 + 1).await);
    assert_eq!(current.power, Power::Awake);

    let asleep = store
        .set_power(&rec, Power::Asleep, T0 + 7_000)
        .await
        .expect("asleep");
    assert_eq!(asleep.power, Power::Asleep);
    assert_eq!(asleep.awake_shard, None);
    assert_eq!(asleep.awake_since, None);
    assert_eq!(asleep.awake_ms_total, 7_000);
    // The earlier read is now stale.
    conflict_current(store.set_power(&rec, Power::Awake, T0 + 8_000).await);

    let awake = store
        .set_power(&asleep, Power::Awake, T0 + 9_000)
        .await
        .expect("awake");
    assert_eq!(awake.power, Power::Awake);
    assert_eq!(awake.awake_shard, Some(shard_for(&uid("pat"))));
    assert_eq!(awake.awake_since, Some(T0 + 9_000));
    let unknown = store
        .set_power(&awake, Power::Unknown, T0 + 9_500)
        .await
        .expect("unknown");
    assert_eq!(unknown.power, Power::Unknown);
    assert_eq!(unknown.awake_shard, awake.awake_shard);
}

/// GIVEN an item being destroyed THEN no lease is granted, it leaves the
/// awake index, and delete needs the guard; deleting twice is AlreadyGone.
pub async fn destroy_and_delete<S: UserStore>(store: S) {
    let rec = ready_user(&store, "quin", "dm-q", T0).await;
    let wrong_state = store.delete(&uid("quin"), DeleteGuard::Destroying).await;
    assert!(
        matches!(
            wrong_state,
            Err(StoreError::Conflict {
                current: Some(_),
                ..
            })
        ),
        "{wrong_state:?}"
    );

    let destroying = store
        .mark_destroying(&uid("quin"), T0 + 1)
        .await
        .expect("destroying");
    assert_eq!(destroying.state, MachineState::Destroying);
    assert_eq!(destroying.awake_shard, None);
    let refused = store
        .acquire_lease(
            &uid("quin"),
            "turn-1",
            LeasePurpose::Turn,
            T0 + MINUTE,
            T0 + 2,
        )
        .await
        .expect("acquire");
    assert!(matches!(refused, AcquireOutcome::Changed(_)), "{refused:?}");

    let stale = store
        .delete(&uid("quin"), DeleteGuard::Generation(rec.generation))
        .await;
    assert!(
        matches!(stale, Err(StoreError::Conflict { .. })),
        "{stale:?}"
    );
    match store
        .delete(&uid("quin"), DeleteGuard::Destroying)
        .await
        .expect("delete")
    {
        DeleteOutcome::Deleted(old) => assert_eq!(old.machine_id.as_deref(), Some("dm-q")),
        other => panic!("expected Deleted, got {other:?}"),
    }
    assert_eq!(store.get(&uid("quin")).await.expect("get"), None);
    assert_eq!(
        store
            .delete(&uid("quin"), DeleteGuard::Destroying)
            .await
            .expect("delete"),
        DeleteOutcome::AlreadyGone
    );

    // Delete by generation.
    let rec = ready_user(&store, "ray", "dm-r", T0).await;
    let deleted = store
        .delete(&uid("ray"), DeleteGuard::Generation(rec.generation))
        .await
        .expect("delete");
    assert!(matches!(deleted, DeleteOutcome::Deleted(_)), "{deleted:?}");
}

/// GIVEN no item THEN no write creates one: updates are NotFound, release is
/// NotHeld(None).
pub async fn writes_never_create_missing_items<S: UserStore>(store: S) {
    let not_found = |r: Result<UserRecord, StoreError>| {
        assert!(matches!(r, Err(StoreError::NotFound { .. })), "{r:?}");
    };
    not_found(store.touch(&uid("ghost"), "o", T0).await);
    not_found(
        store
            .record_machine_id(&uid("ghost"), KEY_A, "dm-1", T0)
            .await,
    );
    not_found(store.mark_awake(&uid("ghost"), "o", T0).await);
    not_found(store.mark_asleep(&uid("ghost"), "o", T0).await);
    not_found(store.mark_destroying(&uid("ghost"), T0).await);
    let acquire = store
        .acquire_lease(&uid("ghost"), "o", LeasePurpose::Turn, T0 + 1, T0)
        .await;
    assert!(
        matches!(acquire, Err(StoreError::NotFound { .. })),
        "{acquire:?}"
    );
    assert_eq!(
        release(&store, "ghost", "o", T0).await,
        ReleaseOutcome::NotHeld(None)
    );
    assert_eq!(store.get(&uid("ghost")).await.expect("get"), None);
    // An empty user id cannot reach the store: no `UserId` is empty.
    assert!(agenthome::api::UserId::parse("").is_err());
}

/// GIVEN a limit of 3 per minute WHEN a user's requests are counted THEN the
/// 4th in the window is limited until the window ends, another counter and
/// another user are unaffected, the next window counts afresh, concurrent
/// counts never exceed the limit, a missing item is reported (and not
/// created), and the item's generation is untouched.
pub async fn count_request_limits_each_user_and_window<S: UserStore + 'static>(store: S) {
    let alice = claimed(&store, "alice", T0).await;
    claimed(&store, "bob", T0).await;
    let start = T0 - T0 % MINUTE;
    let at = start + 10_000;
    for i in 0..3 {
        assert_eq!(
            store
                .count_request(&uid("alice"), Counter::Turns, 3, MINUTE, at + i)
                .await
                .expect("count"),
            CountOutcome::Counted,
            "request {i}"
        );
    }
    assert_eq!(
        store
            .count_request(&uid("alice"), Counter::Turns, 3, MINUTE, at + 5)
            .await
            .expect("count"),
        CountOutcome::Limited {
            retry_after_ms: MINUTE - 10_005
        }
    );
    // Another counter, another user: unaffected
    assert_eq!(
        store
            .count_request(&uid("alice"), Counter::StatusReads, 3, MINUTE, at)
            .await
            .expect("count"),
        CountOutcome::Counted
    );
    assert_eq!(
        store
            .count_request(&uid("bob"), Counter::Turns, 3, MINUTE, at)
            .await
            .expect("count"),
        CountOutcome::Counted
    );
    // The next window counts afresh
    assert_eq!(
        store
            .count_request(&uid("alice"), Counter::Turns, 3, MINUTE, start + MINUTE)
            .await
            .expect("count"),
        CountOutcome::Counted
    );
    // Concurrent requests in a fresh window: exactly `limit` are counted
    let store = Arc::new(store);
    let next = start + 2 * MINUTE;
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                store
                    .count_request(&uid("alice"), Counter::Turns, 3, MINUTE, next)
                    .await
            })
        })
        .collect();
    let mut counted = 0;
    for t in tasks {
        if t.await.expect("task").expect("count") == CountOutcome::Counted {
            counted += 1;
        }
    }
    assert_eq!(counted, 3, "never more than the limit");
    // Limit 0: always limited
    assert!(matches!(
        store
            .count_request(&uid("bob"), Counter::Turns, 0, MINUTE, at)
            .await
            .expect("count"),
        CountOutcome::Limited { .. }
    ));
    // No item: reported, not created
    assert_eq!(
        store
            .count_request(&uid("nobody"), Counter::Turns, 3, MINUTE, at)
            .await
            .expect("count"),
        CountOutcome::NoItem
    );
    assert!(store.get(&uid("nobody")).await.expect("get").is_none());
    // Counters are not state: the generation did not move
    let now = store.get(&uid("alice")).await.expect("get").expect("item");
    assert_eq!(now.generation, alice.generation);
}

/// GIVEN an item WHEN the day's awake baseline is noted twice THEN the first
/// stays, a later day replaces it, the generation is untouched, and a
/// missing item is NotFound (not created).
pub async fn note_awake_day_keeps_the_first_baseline_of_a_day<S: UserStore>(store: S) {
    let rec = claimed(&store, "alice", T0).await;
    let day = 1_699_920_000_000;
    store
        .note_awake_day(&uid("alice"), day, 40)
        .await
        .expect("note");
    store
        .note_awake_day(&uid("alice"), day, 99)
        .await
        .expect("second note");
    let now = store.get(&uid("alice")).await.expect("get").expect("item");
    assert_eq!(
        now.awake_day,
        Some(agenthome::store::AwakeDay {
            day_start: day,
            base_ms: 40
        })
    );
    assert_eq!(now.generation, rec.generation);
    let next = day + 86_400_000;
    store
        .note_awake_day(&uid("alice"), next, 7)
        .await
        .expect("next day");
    let now = store.get(&uid("alice")).await.expect("get").expect("item");
    assert_eq!(
        now.awake_day.map(|d| (d.day_start, d.base_ms)),
        Some((next, 7))
    );
    assert!(matches!(
        store.note_awake_day(&uid("nobody"), day, 0).await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(store.get(&uid("nobody")).await.expect("get").is_none());
}

/// GIVEN a ready item whose lease holders (a sweep, then a turn) are mid-work
/// WHEN account deletion marks it `destroying`
/// THEN every write of a lease holder is refused and the item stays
/// `destroying` (a sweep whose sleep got 404 after the destroy cannot turn it
/// into `failed`), releasing the lease is still allowed, and DELETE's final
/// conditional delete succeeds.
pub async fn no_writer_leaves_destroying<S: UserStore>(store: S) {
    ready_user(&store, "del", "dm-del", T0).await;
    let sweep = LeasePurpose::Sweep {
        expected_last_active_at: T0,
    };
    acquired(&store, "del", "sweep-1", sweep, T0 + MINUTE, T0 + 1).await;
    store
        .mark_destroying(&uid("del"), T0 + 2)
        .await
        .expect("destroying");
    let destroying = |r: Result<UserRecord, StoreError>| {
        let current = conflict_current(r);
        assert_eq!(current.state, MachineState::Destroying, "{current:?}");
    };
    let at = T0 + 3;
    destroying(
        store
            .mark_lost(&uid("del"), "sweep-1", "gone (404)", at)
            .await,
    );
    destroying(store.mark_asleep(&uid("del"), "sweep-1", at).await);
    destroying(
        store
            .set_sleep_eligible_at(&uid("del"), "sweep-1", at + MINUTE, at)
            .await,
    );
    destroying(
        store
            .renew_lease(&uid("del"), "sweep-1", at + MINUTE, at)
            .await,
    );
    destroying(store.mark_awake(&uid("del"), "sweep-1", at).await);
    destroying(store.touch(&uid("del"), "sweep-1", at).await);
    destroying(
        store
            .set_terminal(&uid("del"), "sweep-1", Some("t-1"), at)
            .await,
    );
    destroying(store.set_terminal(&uid("del"), "sweep-1", None, at).await);
    let hold = Hold {
        until: at + MINUTE,
        marker: ".agenthome/done-1".into(),
    };
    destroying(store.set_hold(&uid("del"), "sweep-1", &hold, at).await);
    destroying(store.clear_hold(&uid("del"), "sweep-1", at).await);
    destroying(store.mark_ready(&uid("del"), "sweep-1", "v2", at).await);
    destroying(store.mark_failed(&uid("del"), "sweep-1", "boom", at).await);
    destroying(store.mark_bootstrapping(&uid("del"), "sweep-1", at).await);
    let current = store.get(&uid("del")).await.expect("get").expect("item");
    for power in [Power::Awake, Power::Asleep, Power::Unknown] {
        destroying(store.set_power(&current, power, at).await);
    }
    let still = store.get(&uid("del")).await.expect("get").expect("item");
    assert_eq!(still.state, MachineState::Destroying);
    assert_eq!(still.machine_id.as_deref(), Some("dm-del"));
    assert_eq!(still.awake_shard, None);
    assert_eq!(still.generation, current.generation, "nothing was written");
    match release(&store, "del", "sweep-1", at).await {
        ReleaseOutcome::Released(rec) => assert_eq!(rec.state, MachineState::Destroying),
        other => panic!("expected Released, got {other:?}"),
    }
    match store
        .delete(&uid("del"), DeleteGuard::Destroying)
        .await
        .expect("delete")
    {
        DeleteOutcome::Deleted(old) => assert_eq!(old.machine_id.as_deref(), Some("dm-del")),
        other => panic!("expected Deleted, got {other:?}"),
    }
}

/// GIVEN a claimed item whose worker's create is in flight (no machine id
/// yet) WHEN account deletion marks it `destroying` THEN the worker cannot
/// record its machine there (it must destroy it instead): the item stays
/// `destroying` without a machine id.
pub async fn record_machine_id_refused_while_destroying<S: UserStore>(store: S) {
    claimed(&store, "eve", T0).await;
    store
        .mark_destroying(&uid("eve"), T0 + 1)
        .await
        .expect("destroying");
    let current = conflict_current(
        store
            .record_machine_id(&uid("eve"), KEY_A, "dm-eve", T0 + 2)
            .await,
    );
    assert_eq!(current.state, MachineState::Destroying);
    assert_eq!(current.machine_id, None);
    let item = store.get(&uid("eve")).await.expect("get").expect("item");
    assert_eq!(item.machine_id, None);
    assert_eq!(item.state, MachineState::Destroying);
}

fn begun(outcome: BeginTurn) -> UserRecord {
    match outcome {
        BeginTurn::Begun(rec) => rec,
        other => panic!("expected Begun, got {other:?}"),
    }
}

fn refused(outcome: BeginTurn) -> UserRecord {
    match outcome {
        BeginTurn::Refused(rec) => rec,
        other => panic!("expected Refused, got {other:?}"),
    }
}

/// GIVEN no item, a provisioning item, a ready one WHEN a turn begins THEN
/// a missing item is `NoItem`, a provisioning one is refused with the item,
/// and a ready one is begun in one write: the turn lease, awake and active,
/// `turn_seq` + 1, the turn counted; a second turn meanwhile is refused
/// with the first one's lease; the counter refuses at its limit (with the
/// window's remaining time), whichever form the caller guessed.
pub async fn begin_turn_takes_the_lease_and_counts_in_one_write<S: UserStore>(store: S) {
    let count = |stored_window| {
        Some(TurnCount {
            limit: 2,
            window_ms: MINUTE,
            stored_window,
        })
    };
    let t = T0 - T0 % MINUTE + 1_000;
    let none = store
        .begin_turn(&uid("nobody"), "turn-1", t + MINUTE, None, t)
        .await;
    assert_eq!(none.expect("begin"), BeginTurn::NoItem);
    claimed(&store, "bo", t).await;
    let cur = refused(
        store
            .begin_turn(&uid("bo"), "turn-1", t + MINUTE, None, t)
            .await
            .expect("begin"),
    );
    assert_eq!(cur.state, MachineState::Provisioning);
    ready_user(&store, "al", "dm-al", t).await;
    let rec = begun(
        store
            .begin_turn(&uid("al"), "turn-1", t + MINUTE, count(None), t + 1)
            .await
            .expect("begin"),
    );
    let lease = rec.lease.clone().expect("lease");
    assert_eq!(
        (lease.owner.as_str(), lease.kind),
        ("turn-1", LeaseKind::Turn)
    );
    assert_eq!(rec.last_active_at, t + 1);
    assert_eq!(rec.power, Power::Awake);
    assert_eq!(rec.turns.seq, 1);
    assert_eq!((rec.turns.window, rec.turns.count), (Some(t - 1_000), 1));
    // Another turn while the lease lives: refused, the item says why.
    let cur = refused(
        store
            .begin_turn(
                &uid("al"),
                "turn-2",
                t + MINUTE,
                count(Some(t - 1_000)),
                t + 2,
            )
            .await
            .expect("begin"),
    );
    assert_eq!(cur.lease.map(|l| l.owner), Some("turn-1".to_owned()));
    assert_eq!(cur.turns.count, 1, "a refused turn is not counted");
    // The second turn of the window, with a wrong guess of the window.
    release(&store, "al", "turn-1", t + 3).await;
    let rec = begun(
        store
            .begin_turn(&uid("al"), "turn-2", t + MINUTE, count(None), t + 4)
            .await
            .expect("begin"),
    );
    assert_eq!((rec.turns.seq, rec.turns.count), (2, 2));
    release(&store, "al", "turn-2", t + 5).await;
    let limited = store
        .begin_turn(
            &uid("al"),
            "turn-3",
            t + MINUTE,
            count(Some(t - 1_000)),
            t + 6,
        )
        .await
        .expect("begin");
    assert_eq!(
        limited,
        BeginTurn::Limited {
            retry_after_ms: MINUTE - 1_006
        }
    );
    // The next window counts from one again.
    let next = t - 1_000 + MINUTE;
    let rec = begun(
        store
            .begin_turn(
                &uid("al"),
                "turn-4",
                next + MINUTE,
                count(Some(t - 1_000)),
                next,
            )
            .await
            .expect("begin"),
    );
    assert_eq!((rec.turns.window, rec.turns.count), (Some(next), 1));
    assert!(store
        .get(&uid("al"))
        .await
        .expect("get")
        .expect("item")
        .live_lease(next)
        .is_some());
}

/// GIVEN a begun turn WHEN it ends THEN one write releases the lease,
/// records activity, the terminals, the hold set and the clean mark; an
/// owner that no longer holds the lease writes nothing.
pub async fn end_turn_releases_and_stores_in_one_write<S: UserStore>(store: S) {
    ready_user(&store, "cy", "dm-cy", T0).await;
    let rec = begun(
        store
            .begin_turn(&uid("cy"), "turn-1", T0 + MINUTE, None, T0 + 1)
            .await
            .expect("begin"),
    );
    let hold = Hold {
        until: T0 + MINUTE,
        marker: ".agenthome/run/a.done".into(),
    };
    let end = TurnEnd {
        terminals: Some((Some("t-1".into()), vec!["t-0".into()])),
        holds: Some(vec![hold.clone()]),
        clean_seq: Some(rec.turns.seq),
    };
    conflict_current(store.end_turn(&uid("cy"), "turn-x", &end, T0 + 2).await);
    let after = store
        .end_turn(&uid("cy"), "turn-1", &end, T0 + 3)
        .await
        .expect("end");
    assert_eq!(after.lease, None);
    assert_eq!(after.last_active_at, T0 + 3);
    assert_eq!(after.terminal_id.as_deref(), Some("t-1"));
    assert_eq!(after.parked_terminals, vec!["t-0".to_owned()]);
    assert_eq!(after.holds, vec![hold]);
    assert_eq!((after.turns.seq, after.turns.clean_seq), (1, 1));
    // The next turn sees that the previous one ended cleanly.
    let next = begun(
        store
            .begin_turn(&uid("cy"), "turn-2", T0 + MINUTE, None, T0 + 4)
            .await
            .expect("begin"),
    );
    assert!(next.turns.previous_ended_clean());
    // Ended without the clean mark: the one after does not see it.
    let end = TurnEnd {
        holds: Some(Vec::new()),
        ..TurnEnd::default()
    };
    let after = store
        .end_turn(&uid("cy"), "turn-2", &end, T0 + 5)
        .await
        .expect("end");
    assert!(after.holds.is_empty());
    assert_eq!(after.terminal_id.as_deref(), Some("t-1"), "left as it was");
    let third = begun(
        store
            .begin_turn(&uid("cy"), "turn-3", T0 + MINUTE, None, T0 + 6)
            .await
            .expect("begin"),
    );
    assert!(!third.turns.previous_ended_clean());
}

/// GIVEN a claimed item WHEN provisioning leases are taken (each worker run)
/// THEN `provision_attempts` counts them — other leases and refused
/// acquisitions do not — and a restarted provisioning starts again at 0.
pub async fn provision_attempts_count_worker_leases_until_a_restart<S: UserStore>(store: S) {
    let rec = claimed(&store, "pia", T0).await;
    assert_eq!(rec.provision_attempts, 0);
    release(&store, "pia", "prov-1", T0 + 1).await;
    let first = acquired(
        &store,
        "pia",
        "w-1",
        LeasePurpose::Provision,
        T0 + MINUTE,
        T0 + 2,
    )
    .await;
    assert_eq!(first.provision_attempts, 1);
    // Refused while w-1's lease is live: not an attempt.
    let busy = store
        .acquire_lease(
            &uid("pia"),
            "w-2",
            LeasePurpose::Provision,
            T0 + MINUTE,
            T0 + 3,
        )
        .await
        .expect("acquire");
    assert!(matches!(busy, AcquireOutcome::Busy(_)), "{busy:?}");
    release(&store, "pia", "w-1", T0 + 4).await;
    let second = acquired(
        &store,
        "pia",
        "w-2",
        LeasePurpose::Provision,
        T0 + MINUTE,
        T0 + 5,
    )
    .await;
    assert_eq!(second.provision_attempts, 2);
    release(&store, "pia", "w-2", T0 + 6).await;
    let turn = acquired(
        &store,
        "pia",
        "turn-1",
        LeasePurpose::Turn,
        T0 + MINUTE,
        T0 + 7,
    )
    .await;
    assert_eq!(turn.provision_attempts, 2, "a turn's lease is no attempt");
    release(&store, "pia", "turn-1", T0 + 8).await;
    assert_eq!(
        store
            .get(&uid("pia"))
            .await
            .expect("get")
            .map(|r| r.provision_attempts),
        Some(2)
    );

    // A failed provisioning restarted: a new count.
    let third = acquired(
        &store,
        "pia",
        "w-3",
        LeasePurpose::Provision,
        T0 + MINUTE,
        T0 + 9,
    )
    .await;
    let failed = store
        .mark_failed(&uid("pia"), "w-3", "bootstrap failed", T0 + 10)
        .await
        .expect("failed");
    assert_eq!(
        (third.provision_attempts, failed.provision_attempts),
        (3, 3)
    );
    release(&store, "pia", "w-3", T0 + 11).await;
    let failed = store.get(&uid("pia")).await.expect("get").expect("item");
    let lease = provision_lease("prov-2", T0 + 2 * MINUTE);
    let restarted = match store
        .restart_provisioning(
            &uid("pia"),
            failed.generation,
            &lease,
            CreateKey::Keep,
            T0 + 12,
        )
        .await
        .expect("restart")
    {
        AcquireOutcome::Acquired(rec) => rec,
        other => panic!("expected Acquired, got {other:?}"),
    };
    assert_eq!(restarted.provision_attempts, 0);
}

/// GIVEN an awake item in shard "3" WHEN it is moved from "3" to "5" THEN
/// the index finds it in "5" only, its generation is unchanged (no lease or
/// read pinned to it is disturbed); WHEN moved again from "3" (a stale read)
/// or after it slept THEN nothing changes (`false`); a missing item is `false`.
pub async fn move_awake_shard_moves_only_from_the_shard_read<S: UserStore>(store: S) {
    let user = users_in_shard("mv", "3", 1).remove(0);
    let rec = ready_user(&store, &user, "dm-mv", T0).await;
    assert_eq!(rec.awake_shard.as_deref(), Some("3"));
    assert!(store
        .move_awake_shard(&uid(&user), "3", "5")
        .await
        .expect("move"));
    let moved = store.get(&uid(&user)).await.expect("get").expect("item");
    assert_eq!(moved.awake_shard.as_deref(), Some("5"));
    assert_eq!(moved.generation, rec.generation, "no generation bump");
    let in_5 = eventually(
        || store.query_awake_idle("5", u64::MAX, None, 10),
        |p| p.items.iter().any(|r| r.user_id == user),
    )
    .await;
    assert!(in_5.items.iter().any(|r| r.user_id == user));
    let in_3 = eventually(
        || store.query_awake_idle("3", u64::MAX, None, 10),
        |p| p.items.iter().all(|r| r.user_id != user),
    )
    .await;
    assert!(in_3.items.iter().all(|r| r.user_id != user), "left shard 3");
    assert!(
        !store
            .move_awake_shard(&uid(&user), "3", "7")
            .await
            .expect("stale"),
        "only from the shard it is in"
    );
    acquired(
        &store,
        &user,
        "sweep-mv",
        LeasePurpose::Sweep {
            expected_last_active_at: moved.last_active_at,
        },
        T0 + MINUTE,
        T0 + 1,
    )
    .await;
    store
        .mark_asleep(&uid(&user), "sweep-mv", T0 + 2)
        .await
        .expect("asleep");
    assert!(
        !store
            .move_awake_shard(&uid(&user), "5", "7")
            .await
            .expect("asleep"),
        "an asleep item is in no shard"
    );
    let asleep = store.get(&uid(&user)).await.expect("get").expect("item");
    assert_eq!(asleep.awake_shard, None);
    assert!(!store
        .move_awake_shard(&uid("nobody"), "1", "2")
        .await
        .expect("missing"));
}

fn requested_at(expected_last_active_at: u64, at: u64) -> SleepPlan<'static> {
    SleepPlan {
        expected_last_active_at,
        sleep: Some((at, SleepReason::Requested)),
        gap_hist: None,
    }
}

/// GIVEN awake users of one shard, some with a pending sleep WHEN the
/// `pending-sleep` index is paged for sleeps due by a time THEN exactly the
/// due ones come back, earliest first, each once; a sleep that is not due,
/// an item without one, and one that went to sleep (pending removed) do not.
/// Scheduling is refused under a live lease, after `last_active_at` moved,
/// or on a machine that is not awake.
pub async fn pending_sleeps_are_found_through_their_own_index<S: UserStore>(store: S) {
    let shard = "5";
    let users = users_in_shard("pend", shard, 6);
    for u in &users {
        ready_user(&store, u, &format!("dm-{u}"), T0).await;
    }
    // Due at T0+1..T0+4 (users 0..4), user 4 due much later, user 5 none.
    for (i, u) in users.iter().take(4).enumerate() {
        let at = T0 + 4 * MINUTE - i as u64 * MINUTE;
        let rec = store
            .schedule_sleep(&uid(u), &requested_at(T0, at), T0 + 10)
            .await
            .expect("schedule");
        let pending = rec.pending_sleep.expect("pending recorded");
        assert_eq!((pending.at, pending.reason), (at, SleepReason::Requested));
        assert_eq!(pending.shard, shard);
    }
    store
        .schedule_sleep(
            &uid(&users[4]),
            &requested_at(T0, T0 + 60 * MINUTE),
            T0 + 10,
        )
        .await
        .expect("schedule later");
    // The gap histogram alone is written without a pending sleep.
    let hist_only = store
        .schedule_sleep(
            &uid(&users[5]),
            &SleepPlan {
                expected_last_active_at: T0,
                sleep: None,
                gap_hist: Some(&[0, 2, 1]),
            },
            T0 + 10,
        )
        .await
        .expect("histogram");
    assert_eq!(hist_only.gap_hist, vec![0, 2, 1]);
    assert_eq!(hist_only.pending_sleep, None);

    let due_by = T0 + 4 * MINUTE;
    let mut seen = Vec::new();
    let mut cursor: Option<Cursor> = None;
    loop {
        let page = store
            .query_pending_sleeps(shard, due_by, cursor.as_ref(), 3)
            .await
            .expect("query");
        seen.extend(page.items.iter().map(|r| {
            (
                r.pending_sleep.as_ref().map(|p| p.at),
                r.user_id.to_string(),
            )
        }));
        match page.cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    let expected: Vec<_> = (0..4)
        .rev()
        .map(|i| (Some(T0 + 4 * MINUTE - i as u64 * MINUTE), users[i].clone()))
        .collect();
    assert_eq!(seen, expected, "due sleeps, earliest first, each once");
    let other = if shard == "0" { "1" } else { "0" };
    let elsewhere = store
        .query_pending_sleeps(other, u64::MAX >> 12, None, 10)
        .await
        .expect("other shard");
    assert!(elsewhere
        .items
        .iter()
        .all(|r| !users.contains(&r.user_id.to_string())));
    assert!(matches!(
        store
            .query_pending_sleeps(other, due_by, Some(&Cursor::from_string("garbage")), 3)
            .await,
        Err(StoreError::InvalidCursor)
    ));

    // Refusals: last_active_at moved; a live lease; not awake.
    conflict_current(
        store
            .schedule_sleep(&uid(&users[5]), &requested_at(T0 - 1, T0 + MINUTE), T0 + 20)
            .await,
    );
    acquired(
        &store,
        &users[5],
        "prov-x",
        LeasePurpose::Provision,
        T0 + MINUTE,
        T0 + 20,
    )
    .await;
    conflict_current(
        store
            .schedule_sleep(&uid(&users[5]), &requested_at(T0, T0 + MINUTE), T0 + 21)
            .await,
    );

    // Sleeping removes it from the index.
    let sweep = LeasePurpose::Sweep {
        expected_last_active_at: T0,
    };
    acquired(&store, &users[0], "sweep-p", sweep, T0 + MINUTE, T0 + 30).await;
    let asleep = store
        .mark_asleep(&uid(&users[0]), "sweep-p", T0 + 40)
        .await
        .expect("asleep");
    assert_eq!(asleep.pending_sleep, None);
    conflict_current(
        store
            .schedule_sleep(&uid(&users[0]), &requested_at(T0, T0 + MINUTE), T0 + 41)
            .await,
    );
    let after = eventually(
        || store.query_pending_sleeps(shard, due_by, None, 10),
        |p| p.items.len() == 3,
    )
    .await;
    assert!(after.items.iter().all(|r| r.user_id != users[0]));

    // Clearing needs the pending sleep it names.
    conflict_current(
        store
            .clear_pending_sleep(&uid(&users[1]), T0 + 1, T0 + 50)
            .await,
    );
    let cleared = store
        .clear_pending_sleep(&uid(&users[1]), T0 + 3 * MINUTE, T0 + 50)
        .await
        .expect("clear");
    assert_eq!(cleared.pending_sleep, None);
}

/// GIVEN a pending sleep WHEN a turn takes the lease THEN the pending sleep
/// is gone from the item and the index in that same write; a sweep or
/// provisioning lease leaves it; deletion removes it too.
pub async fn a_turn_start_cancels_a_pending_sleep<S: UserStore>(store: S) {
    ready_user(&store, "pia", "dm-pia", T0).await;
    let shard = shard_for(&uid("pia"));
    store
        .schedule_sleep(&uid("pia"), &requested_at(T0, T0 + MINUTE), T0 + 10)
        .await
        .expect("schedule");
    let sweep = LeasePurpose::Sweep {
        expected_last_active_at: T0,
    };
    let under_sweep = acquired(&store, "pia", "sweep-1", sweep, T0 + 100, T0 + 20).await;
    assert!(
        under_sweep.pending_sleep.is_some(),
        "a sweep lease keeps it"
    );
    release(&store, "pia", "sweep-1", T0 + 30).await;
    let turn = acquired(
        &store,
        "pia",
        "turn-1",
        LeasePurpose::Turn,
        T0 + MINUTE,
        T0 + 40,
    )
    .await;
    assert_eq!(
        turn.pending_sleep, None,
        "the turn's acquisition removes it"
    );
    let listed = eventually(
        || store.query_pending_sleeps(&shard, u64::MAX >> 12, None, 10),
        |p| p.items.iter().all(|r| r.user_id != "pia"),
    )
    .await;
    assert!(listed.items.iter().all(|r| r.user_id != "pia"));
    // Nor can it be recorded again while the turn runs.
    conflict_current(
        store
            .schedule_sleep(&uid("pia"), &requested_at(T0, T0 + MINUTE), T0 + 50)
            .await,
    );
    release(&store, "pia", "turn-1", T0 + 60).await;
    store
        .schedule_sleep(&uid("pia"), &requested_at(T0, T0 + 2 * MINUTE), T0 + 70)
        .await
        .expect("schedule again");
    let destroying = store
        .mark_destroying(&uid("pia"), T0 + 80)
        .await
        .expect("destroying");
    assert_eq!(destroying.pending_sleep, None);
}

/// GIVEN a pending sleep WHEN `begin_turn` begins a turn THEN its one write
/// removes the pending sleep (item and index) and keeps the activity before
/// the turn aside (`last_active_at` is the turn's start); none can be
/// recorded while the turn runs, and after `end_turn` it can again.
pub async fn begin_turn_cancels_a_pending_sleep_and_keeps_the_previous_activity<S: UserStore>(
    store: S,
) {
    ready_user(&store, "pib", "dm-pib", T0).await;
    let shard = shard_for(&uid("pib"));
    store
        .schedule_sleep(&uid("pib"), &requested_at(T0, T0 + MINUTE), T0 + 10)
        .await
        .expect("schedule");
    let rec = begun(
        store
            .begin_turn(&uid("pib"), "turn-1", T0 + MINUTE, None, T0 + 40)
            .await
            .expect("begin"),
    );
    assert_eq!(rec.pending_sleep, None, "the turn's begin removes it");
    assert_eq!(rec.last_active_at, T0 + 40);
    assert_eq!(rec.turns.previous_active_at, T0);
    let listed = eventually(
        || store.query_pending_sleeps(&shard, u64::MAX >> 12, None, 10),
        |p| p.items.iter().all(|r| r.user_id != "pib"),
    )
    .await;
    assert!(listed.items.iter().all(|r| r.user_id != "pib"));
    conflict_current(
        store
            .schedule_sleep(&uid("pib"), &requested_at(T0 + 40, T0 + MINUTE), T0 + 50)
            .await,
    );
    let ended = store
        .end_turn(&uid("pib"), "turn-1", &TurnEnd::default(), T0 + 60)
        .await
        .expect("end");
    assert_eq!(ended.last_active_at, T0 + 60);
    let again = store
        .schedule_sleep(
            &uid("pib"),
            &requested_at(T0 + 60, T0 + 2 * MINUTE),
            T0 + 70,
        )
        .await
        .expect("schedule after the turn");
    assert!(again.pending_sleep.is_some());
}

//! Sleeping as early as the platform allows (docs/design.md §5 "Sleeping
//! early"), end to end: the chat-turn function's service with the real
//! emulator (a short post-wake hold window) and a real DynamoDB-compatible
//! server, the sweep run on demand.
//!
//! - `end_conversation` on a turn sleeps the machine after the reply, or,
//!   inside the hold window, records a pending sleep that the first sweep
//!   run after the window carries out regardless of `IDLE_AFTER`; a command
//!   left running still holds the machine (the reply says so); streaming
//!   turns behave the same; anything but a boolean is a 422.
//! - A pending sleep never fires under a turn that started after it, nor
//!   after such a turn ended (the turn's begin, `begin_turn`, cancels it).
//! - `IDLE_POLICY=adaptive` schedules a user with a short rhythm for sleep
//!   well before `IDLE_AFTER`; `fixed` does not; the pause counted is the one
//!   before the turn.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use agenthome_tests::uid;
use std::sync::Arc;
use std::time::Duration;

use agenthome::clock::now_ms;
use agenthome::dedalus::Phase;
use agenthome::store::{Power, SleepReason};
use agenthome::sweep::{IdlePolicy, SweepReport, SweepSettings, Sweeper};
use agenthome::turn::TurnSettings;
use agenthome_tests::events::http;
use agenthome_tests::stack::{jwt, Reply, Stack, StackOptions};
use futures_util::StreamExt as _;
use serde_json::{json, Value};
use tokio::time::Instant;

const MINUTE: u64 = 60_000;

fn sweep_settings(policy: IdlePolicy) -> SweepSettings {
    SweepSettings {
        idle_after: Duration::from_secs(600),
        idle_policy: policy,
        sleep_call_timeout: Duration::from_secs(3),
        read_call_timeout: Duration::from_secs(5),
        marker_check_timeout: Duration::from_secs(5),
        ..SweepSettings::default()
    }
}

async fn stack(policy: IdlePolicy, turn_deadline: Duration) -> Stack {
    Stack::start_with(StackOptions {
        settings: TurnSettings {
            command_timeout: Duration::from_secs(60),
            sleep: sweep_settings(policy),
            ..TurnSettings::default()
        },
        turn_deadline,
        ..StackOptions::default()
    })
    .await
}

fn sweeper(s: &Stack) -> Sweeper<agenthome::store::DynamoStore> {
    Sweeper::new(
        Arc::new(s.store.clone()),
        &s.emu.client(),
        sweep_settings(IdlePolicy::Fixed),
    )
}

async fn sweep_at(s: &Stack, now: u64) -> SweepReport {
    sweeper(s)
        .run(now, Instant::now() + Duration::from_secs(30))
        .await
}

async fn last_turn(s: &Stack, user: &str, message: &str) -> Reply {
    let body = json!({"message": message, "end_conversation": true}).to_string();
    s.post_turn(user, &body, jwt(user)).await
}

async fn phase(s: &Stack, machine: &str) -> Phase {
    s.emu
        .client()
        .get_machine(machine)
        .await
        .expect("status")
        .phase
}

async fn wait_phase(s: &Stack, machine: &str, want: Phase) -> Phase {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let p = phase(s, machine).await;
        if p == want || Instant::now() > end {
            return p;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sleep (real time) until epoch ms `at` has passed.
async fn until(at: u64) {
    let now = now_ms();
    if at > now {
        tokio::time::sleep(Duration::from_millis(at - now + 100)).await;
    }
}

/// GIVEN no hold window WHEN a turn says `end_conversation` THEN the reply
/// comes with `sleep.status = asleep` and the machine sleeps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_conversation_puts_the_machine_to_sleep_after_the_reply() {
    let s = stack(IdlePolicy::Fixed, Duration::from_secs(60)).await;
    let machine = s.ready_user("alice").await;
    let r = last_turn(&s, "alice", "echo bye").await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["steps"][0]["output"], "bye\n", "{}", r.text);
    assert_eq!(r.body["sleep"]["status"], "asleep", "{}", r.text);
    assert_eq!(
        wait_phase(&s, &machine, Phase::Sleeping).await,
        Phase::Sleeping
    );
    let item = s.item("alice").await;
    assert_eq!(item.power, Power::Asleep, "{item:?}");
    assert_eq!(item.pending_sleep, None);
    // A turn without it leaves the machine awake and says nothing.
    let r = s.turn("alice", "echo again").await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(r.body.get("sleep").is_none(), "{}", r.text);
    assert_eq!(phase(&s, &machine).await, Phase::Running);
}

/// GIVEN a machine inside the platform's post-wake hold window WHEN a turn
/// says `end_conversation` THEN the reply says `scheduled` with the
/// eligibility time, a run before it does nothing, and the first run after
/// it sleeps the machine although it has been idle far less than
/// `IDLE_AFTER` (10 min here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_conversation_inside_the_hold_window_sleeps_on_the_first_run_after_it() {
    let s = stack(IdlePolicy::Fixed, Duration::from_secs(60)).await;
    s.emu.configure(json!({"hold_window_ms": 4_000})).await;
    let machine = s.ready_user("alice").await;
    let r = last_turn(&s, "alice", "echo bye").await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["sleep"]["status"], "scheduled", "{}", r.text);
    let eligible = r.body["sleep"]["sleep_eligible_at_ms"].as_u64().unwrap();
    assert!(eligible > now_ms(), "{}", r.text);
    let item = s.item("alice").await;
    let pending = item.pending_sleep.clone().expect("a pending sleep");
    assert_eq!(
        (pending.at, pending.reason),
        (eligible, SleepReason::Requested)
    );

    let early = sweep_at(&s, now_ms()).await;
    assert_eq!((early.slept, early.pending_candidates), (0, 0), "{early:?}");
    assert_eq!(phase(&s, &machine).await, Phase::Running);

    until(eligible).await;
    let r = sweep_at(&s, now_ms()).await;
    assert_eq!(
        (r.slept, r.pending_candidates, r.candidates),
        (1, 1, 0),
        "{r:?}"
    );
    assert_eq!(
        wait_phase(&s, &machine, Phase::Sleeping).await,
        Phase::Sleeping
    );
    let item = s.item("alice").await;
    assert_eq!(item.power, Power::Asleep, "{item:?}");
    assert_eq!(item.pending_sleep, None, "{item:?}");
}

/// GIVEN a sleep requested inside the hold window (pending) WHEN a turn
/// starts after the request THEN the sweep never sleeps the machine: not
/// while that turn runs (past the due time), and not after it ended.
/// (Without the cancellation in the turn's `begin_turn` write, the last run
/// sleeps the machine and this test fails.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_sleep_never_fires_under_or_after_a_turn_that_started_after_it() {
    let s = Arc::new(stack(IdlePolicy::Fixed, Duration::from_secs(60)).await);
    s.emu.configure(json!({"hold_window_ms": 3_000})).await;
    let machine = s.ready_user("alice").await;
    let r = last_turn(&s, "alice", "echo bye").await;
    assert_eq!(r.body["sleep"]["status"], "scheduled", "{}", r.text);
    let eligible = r.body["sleep"]["sleep_eligible_at_ms"].as_u64().unwrap();
    assert!(s.item("alice").await.pending_sleep.is_some());

    // WHEN the user comes back with a long turn, running past the due time
    let turn = {
        let s = Arc::clone(&s);
        tokio::spawn(async move { s.turn("alice", "sleep 6; echo back").await })
    };
    let end = Instant::now() + Duration::from_secs(10);
    while s.item("alice").await.live_lease(now_ms()).is_none() && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    until(eligible).await;
    let during = sweep_at(&s, now_ms() + MINUTE).await;
    assert_eq!(during.slept, 0, "{during:?}");
    assert_eq!(phase(&s, &machine).await, Phase::Running);

    let r = turn.await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["steps"][0]["output"], "back\n", "{}", r.text);
    assert!(r.body.get("sleep").is_none(), "{}", r.text);
    // THEN after that turn, too, the request stays cancelled
    let after = sweep_at(&s, now_ms() + MINUTE).await;
    assert_eq!(after.slept, 0, "{after:?}");
    assert_eq!(phase(&s, &machine).await, Phase::Running);
    let item = s.item("alice").await;
    assert_eq!(item.power, Power::Awake, "{item:?}");
    assert_eq!(item.pending_sleep, None, "{item:?}");
}

/// GIVEN a turn whose command outlives the deadline WHEN it says
/// `end_conversation` THEN the hold wins: the reply says `held` and the
/// machine stays awake; once the command ends, the next run sleeps it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_left_running_holds_the_machine_and_the_reply_says_so() {
    let s = stack(IdlePolicy::Fixed, Duration::from_secs(5)).await;
    let machine = s.ready_user("alice").await;
    let r = last_turn(&s, "alice", "sleep 7; echo done > ~/late.txt").await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["steps"][0]["still_running"], true, "{}", r.text);
    assert_eq!(r.body["sleep"]["status"], "held", "{}", r.text);
    let early = sweep_at(&s, now_ms()).await;
    assert_eq!(
        (early.slept, early.held_by_running_command),
        (0, 1),
        "{early:?}"
    );
    assert_eq!(phase(&s, &machine).await, Phase::Running);

    let late = s.home(&machine).join("late.txt");
    let end = Instant::now() + Duration::from_secs(15);
    while !late.exists() && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = sweep_at(&s, now_ms()).await;
    assert_eq!((r.slept, r.pending_candidates), (1, 1), "{r:?}");
    assert_eq!(
        wait_phase(&s, &machine, Phase::Sleeping).await,
        Phase::Sleeping
    );
}

/// GIVEN `end_conversation` that is not a boolean THEN 422 problem+json.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_conversation_must_be_a_boolean() {
    let s = stack(IdlePolicy::Fixed, Duration::from_secs(60)).await;
    s.ready_user("alice").await;
    for bad in [json!("yes"), json!(1), Value::Null, json!({"now": true})] {
        let body = json!({"message": "echo hi", "end_conversation": bad}).to_string();
        let r = s.post_turn("alice", &body, jwt("alice")).await;
        assert_eq!(r.status, 422, "{bad}: {}", r.text);
        assert_eq!(r.body["code"], "invalid_body", "{}", r.text);
        assert!(
            r.body["detail"]
                .as_str()
                .unwrap()
                .contains("expected a boolean"),
            "{}",
            r.text
        );
    }
}

/// GIVEN a streaming turn with `end_conversation` THEN its `done` event
/// carries `sleep.status = asleep` and the machine sleeps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_turn_with_end_conversation_sleeps_the_machine_too() {
    let s = stack(IdlePolicy::Fixed, Duration::from_secs(60)).await;
    let machine = s.ready_user("alice").await;
    let body = json!({"message": "echo bye", "end_conversation": true}).to_string();
    let mut event = http("POST", "/v1/users/alice/turns", Some(&body), jwt("alice"));
    event["headers"]["accept"] = Value::String("text/event-stream".into());
    let resp = s.send_streaming(&event).await;
    assert_eq!(resp.status().as_u16(), 200);
    let chunks: Vec<_> = resp.into_body().collect().await;
    let text: String = chunks
        .iter()
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect();
    let done = text
        .split("\n\n")
        .find(|b| b.starts_with("event: done"))
        .and_then(|b| b.lines().find_map(|l| l.strip_prefix("data: ")))
        .expect("a done event");
    let done: Value = serde_json::from_str(done).unwrap();
    assert_eq!(done["sleep"]["status"], "asleep", "{done}");
    assert_eq!(
        wait_phase(&s, &machine, Phase::Sleeping).await,
        Phase::Sleeping
    );
}

/// Nine quick turns: a user whose pauses are a few seconds at most.
async fn quick_turns(s: &Stack, user: &str) {
    for i in 0..9 {
        let r = s.turn(user, &format!("echo {i}")).await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
}

/// GIVEN `IDLE_POLICY=adaptive` and a user whose pauses are all short WHEN
/// the conversation stops THEN an adaptive sleep is pending well before
/// `IDLE_AFTER` (10 min) and the first run after it sleeps the machine;
/// under `fixed` nothing is pending and the same run leaves it awake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adaptive_idle_sleeps_a_user_with_a_short_rhythm_before_idle_after() {
    let s = stack(IdlePolicy::Adaptive, Duration::from_secs(60)).await;
    let machine = s.ready_user("alice").await;
    quick_turns(&s, "alice").await;
    let item = s.item("alice").await;
    let pending = item.pending_sleep.clone().expect("an adaptive deadline");
    assert_eq!(pending.reason, SleepReason::Adaptive);
    let after = pending.at - item.last_active_at;
    assert!(
        (30_000..=60_000).contains(&after),
        "deadline {after} ms after the last turn"
    );
    assert!(
        item.gap_hist.iter().sum::<u32>() >= 9,
        "{:?}",
        item.gap_hist
    );

    let early = sweep_at(&s, item.last_active_at + 5_000).await;
    assert_eq!(early.slept, 0, "{early:?}");
    let due = sweep_at(&s, pending.at + 1).await;
    assert_eq!((due.slept, due.pending_candidates), (1, 1), "{due:?}");
    assert_eq!(
        wait_phase(&s, &machine, Phase::Sleeping).await,
        Phase::Sleeping
    );

    // The same conversation under `fixed`: nothing learnt, nothing pending.
    let f = stack(IdlePolicy::Fixed, Duration::from_secs(60)).await;
    let fixed_machine = f.ready_user("bob").await;
    quick_turns(&f, "bob").await;
    let item = f.item("bob").await;
    assert_eq!(item.pending_sleep, None, "{item:?}");
    assert!(item.gap_hist.is_empty(), "{item:?}");
    let r = sweep_at(&f, item.last_active_at + 61_000).await;
    assert_eq!(r.slept, 0, "{r:?}");
    assert_eq!(phase(&f, &fixed_machine).await, Phase::Running);
}

/// GIVEN `IDLE_POLICY=adaptive` and a user last active five minutes ago
/// WHEN a turn runs THEN the histogram counts that five-minute pause (the
/// activity `begin_turn` found, not the turn's own start, which that write
/// also records as `last_active_at`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adaptive_idle_counts_the_pause_before_the_turn() {
    use agenthome::store::{AcquireOutcome, LeasePurpose, UserStore};
    use agenthome::sweep::adaptive::GAP_BUCKETS_S;
    let s = stack(IdlePolicy::Adaptive, Duration::from_secs(60)).await;
    s.ready_user("alice").await;
    let item = s.item("alice").await;
    let now = now_ms();
    let sweep = LeasePurpose::Sweep {
        expected_last_active_at: item.last_active_at,
    };
    let taken = s
        .store
        .acquire_lease(&uid("alice"), "test", sweep, now + MINUTE, now)
        .await
        .expect("lease");
    assert!(matches!(taken, AcquireOutcome::Acquired(_)), "{taken:?}");
    s.store
        .touch(&uid("alice"), "test", now - 5 * MINUTE)
        .await
        .expect("back-date the activity");
    s.store
        .release_lease(&uid("alice"), "test", now)
        .await
        .expect("release");
    let r = s.turn("alice", "echo hi").await;
    assert_eq!(r.status, 200, "{}", r.text);
    let hist = s.item("alice").await.gap_hist;
    // 300 s (plus the turn's own latency) falls in the first bucket above 300 s.
    let five_minutes = GAP_BUCKETS_S
        .iter()
        .position(|&edge| edge > 300)
        .expect("a bucket above 300 s");
    let counted: Vec<usize> = (0..hist.len()).filter(|&i| hist[i] > 0).collect();
    assert_eq!(counted, vec![five_minutes], "{hist:?}");
    assert_eq!(hist[five_minutes], 1, "{hist:?}");
}

/// GIVEN an item that is not awake but still carries a due pending sleep
/// (an older item, or a write this code no longer makes) WHEN the sweep
/// runs THEN it only drops the pending sleep — no Dedalus call — and the
/// next run no longer finds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_pending_sleep_on_a_sleeping_item_is_dropped_without_a_call() {
    use agenthome::store::{MachineState, MemoryStore, PendingSleep, UserRecord, UserStore};
    let emu = agenthome_tests::Emulator::start().await;
    let store = Arc::new(MemoryStore::new());
    let now = now_ms();
    let rec = UserRecord {
        user_id: uid("old"),
        machine_id: Some("dm-old".into()),
        state: MachineState::Ready,
        power: Power::Asleep,
        generation: 3,
        create_key: "0123456789abcdef0123456789abcdef".into(),
        bootstrap_version: Some("v1".into()),
        last_active_at: now - 10 * MINUTE,
        lease: None,
        terminal_id: None,
        parked_terminals: Vec::new(),
        awake_since: None,
        awake_ms_total: 0,
        sleep_eligible_at: None,
        hold: None,
        holds: Vec::new(),
        last_error: None,
        updated_at: now - 10 * MINUTE,
        created_at: now - 60 * MINUTE,
        awake_shard: None,
        awake_day: None,
        provision_attempts: 0,
        pending_sleep: Some(PendingSleep {
            shard: agenthome::store::shard_for(&uid("old")),
            at: now - MINUTE,
            reason: SleepReason::Requested,
        }),
        gap_hist: Vec::new(),
        turns: Default::default(),
    };
    store.put_raw(rec.to_item().unwrap()).unwrap();
    let sweeper = Sweeper::new(
        Arc::clone(&store),
        &emu.client(),
        sweep_settings(IdlePolicy::Fixed),
    );
    let r = sweeper
        .run(now, Instant::now() + Duration::from_secs(30))
        .await;
    assert_eq!(
        (r.pending_candidates, r.skipped_busy, r.slept, r.failed),
        (1, 1, 0, 0),
        "{r:?}"
    );
    assert_eq!(
        store.get(&uid("old")).await.unwrap().unwrap().pending_sleep,
        None
    );
    assert!(emu.requests().await.is_empty(), "no Dedalus call");
    let again = sweeper
        .run(now, Instant::now() + Duration::from_secs(30))
        .await;
    assert_eq!(again.pending_candidates, 0, "{again:?}");
}

//! Surviving Dedalus API drift (docs/compatibility.md "Changes after the
//! spec snapshot" and "Field reports"; emulator/README.md "Drift switches"):
//! the whole product flow — provision, a turn that makes a file and sets
//! cwd and an exported variable, the machine goes to sleep, a second turn
//! wakes it and finds file, cwd, variable and history — with each drift
//! switch on its own and then all of them together, through the chat-turn
//! function (`agenthome_tests::stack`) and the sleep sweep.
//!
//! Fallbacks exercised: wake refused (401) → a no-op execution wakes the
//! machine; terminals refused (404/501) → the executions backend
//! (`transport: "executions"`); sleep refused (401) → one refused call per
//! sweep run, then phases are read and the machine's platform autosleep
//! (set at create) does the sleeping; newer response shape and bare-UUID ids
//! → parsed; `If-Match` required (the spec's old rule, 428) → the client
//! sends the machine's current revision.
//!
//! Every command touches only `$HOME` (the emulator runs them on the host).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use agenthome_tests::uid;
use std::sync::Arc;
use std::time::Duration;

use agenthome::clock::now_ms;
use agenthome::dedalus::Phase;
use agenthome::store::{shard_for, DynamoStore, MachineState, Power, UserRecord};
use agenthome::sweep::{SweepReport, SweepSettings, Sweeper};
use agenthome::turn::{TurnSettings, TURNS_FILE};
use agenthome_tests::stack::{Reply, Stack, StackOptions};
use agenthome_tests::Emulator;
use serde_json::{json, Value};
use tokio::time::Instant;

// ---------------------------------------------------------------------------
// Drift configurations
// ---------------------------------------------------------------------------

/// Which drift switches are on (emulator/README.md "Drift switches").
#[derive(Debug, Clone, Copy, Default)]
struct Drift {
    refuse_wake: bool,
    refuse_sleep: bool,
    refuse_terminals: Option<u16>,
    uuid_ids: bool,
    newer_shape: bool,
    require_if_match: bool,
}

impl Drift {
    fn all() -> Drift {
        Drift {
            refuse_wake: true,
            refuse_sleep: true,
            refuse_terminals: Some(501),
            uuid_ids: true,
            newer_shape: true,
            require_if_match: true,
        }
    }

    /// The `PATCH /_emulator/config` body.
    fn config(&self) -> Value {
        json!({
            "refuse_wake": self.refuse_wake,
            "refuse_sleep": self.refuse_sleep,
            "refuse_terminals": self.refuse_terminals,
            "id_format": if self.uuid_ids { "uuid" } else { "dm" },
            "response_shape": if self.newer_shape { "newer" } else { "spec" },
            "require_if_match": self.require_if_match,
        })
    }

    fn transport(&self) -> &'static str {
        if self.refuse_terminals.is_some() {
            "executions"
        } else {
            "terminal"
        }
    }
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A stack whose emulator has `drift` on before anything is created. With
/// sleep refused, machines get a short platform autosleep (`MACHINE_AUTOSLEEP`).
async fn stack(drift: Drift) -> Stack {
    let s = Stack::start_with(StackOptions {
        settings: TurnSettings {
            command_timeout: Duration::from_secs(30),
            ..TurnSettings::default()
        },
        autosleep: if drift.refuse_sleep { "2s" } else { "30m" }.into(),
        ..StackOptions::default()
    })
    .await;
    s.emu.configure(drift.config()).await;
    s
}

/// A sweeper over the stack's table and emulator; every awake item is idle.
fn sweeper(s: &Stack) -> Sweeper<DynamoStore> {
    let settings = SweepSettings {
        idle_after: Duration::ZERO,
        sleep_call_timeout: Duration::from_secs(3),
        read_call_timeout: Duration::from_secs(5),
        marker_check_timeout: Duration::from_secs(5),
        ..SweepSettings::default()
    };
    Sweeper::new(Arc::new(s.store.clone()), &s.emu.client(), settings)
}

async fn sweep(s: &Stack) -> SweepReport {
    // Strictly after every `last_active_at` written so far.
    tokio::time::sleep(Duration::from_millis(5)).await;
    sweeper(s)
        .run(now_ms(), Instant::now() + Duration::from_secs(30))
        .await
}

/// A 200 turn result; panics with the body (and the emulator log) otherwise.
#[track_caller]
fn done<'a>(r: &'a Reply, emu: &Emulator) -> &'a Value {
    assert_eq!(
        r.status,
        200,
        "expected a turn result: {}\n--- emulator log tail ---\n{}",
        r.text,
        tail(&emu.log(), 40)
    );
    &r.body
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn output(body: &Value) -> String {
    body["steps"][0]["output"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Requests the emulator received for `method` whose path ends with `suffix`.
async fn requests(emu: &Emulator, method: &str, suffix: &str) -> Vec<Value> {
    emu.requests()
        .await
        .into_iter()
        .filter(|r| {
            r["method"] == method && r["path"].as_str().is_some_and(|p| p.ends_with(suffix))
        })
        .collect()
}

async fn wait_phase(s: &Stack, machine_id: &str, want: Phase, within: Duration) -> Phase {
    let client = s.emu.client();
    let end = Instant::now() + within;
    loop {
        let p = client
            .get_machine(machine_id)
            .await
            .expect("get machine")
            .phase;
        if p == want || Instant::now() > end {
            return p;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn assert_asleep(rec: &UserRecord) {
    assert_eq!(rec.power, Power::Asleep, "{rec:?}");
    assert!(rec.awake_shard.is_none(), "left the awake index: {rec:?}");
    assert!(rec.lease.is_none(), "the sweep lease was released: {rec:?}");
    assert_eq!(rec.state, MachineState::Ready, "{rec:?}");
}

fn is_bare_uuid(id: &str) -> bool {
    uuid::Uuid::parse_str(id).is_ok() && id.len() == 36 && id == id.to_ascii_lowercase()
}

// ---------------------------------------------------------------------------
// The full flow under one drift configuration
// ---------------------------------------------------------------------------

async fn full_flow(drift: Drift) {
    // GIVEN an emulator with `drift` on, and a user provisioned through a
    // first message and the provision worker
    let s = stack(drift).await;
    let machine_id = s.ready_user("alice").await;
    if drift.uuid_ids {
        assert!(is_bare_uuid(&machine_id), "bare UUID id: {machine_id}");
    } else {
        assert!(machine_id.starts_with("dm-"), "{machine_id}");
    }

    // WHEN a turn makes a project, cd's into it and exports a variable
    let r = s
        .turn(
            "alice",
            "mkdir -p ~/project && cd ~/project && echo hello > notes.txt && export GREETING=hi",
        )
        .await;
    let first = done(&r, &s.emu).clone();
    // THEN it ran, on the backend the API offers
    assert_eq!(first["steps"][0]["exit_code"], 0, "{first}");
    assert_eq!(first["transport"], drift.transport(), "{first}");
    assert_eq!(first["machine_id"], machine_id.as_str());
    assert_eq!(
        std::fs::read_to_string(s.home(&machine_id).join("project/notes.txt")).unwrap(),
        "hello\n"
    );

    // WHEN the machine goes to sleep
    if drift.refuse_sleep {
        // … by itself (platform autosleep, set at create), and a sweep run
        // keeps the table true by reading its phase after one refused call
        let p = wait_phase(&s, &machine_id, Phase::Sleeping, Duration::from_secs(20)).await;
        assert_eq!(p, Phase::Sleeping, "platform autosleep slept the machine");
        let report = sweep(&s).await;
        assert!(report.sleep_unavailable, "{report:?}");
        assert_eq!((report.candidates, report.fixed), (1, 1), "{report:?}");
        let sleeps = requests(&s.emu, "POST", "/sleep").await;
        assert_eq!(sleeps.len(), 1, "one refused sleep call: {sleeps:?}");
        assert_eq!(sleeps[0]["status"], 401, "{sleeps:?}");
    } else {
        // … because the sweep puts it to sleep
        let report = sweep(&s).await;
        assert_eq!((report.candidates, report.slept), (1, 1), "{report:?}");
        assert!(!report.sleep_unavailable, "{report:?}");
        let p = wait_phase(&s, &machine_id, Phase::Sleeping, Duration::from_secs(10)).await;
        assert_eq!(p, Phase::Sleeping);
    }
    assert_asleep(&s.item("alice").await);

    // WHEN the next turn asks where it is and what it knows
    let r = s
        .turn(
            "alice",
            "pwd; cat notes.txt; echo $GREETING; grep -c 'echo hello' ~/.bash_history",
        )
        .await;
    // THEN the machine was woken, and cwd, file, variable and history survived
    let body = done(&r, &s.emu).clone();
    assert!(
        body["timings"]["wake_ms"].as_u64().unwrap() > 0,
        "woken: {body}"
    );
    assert_eq!(body["transport"], drift.transport(), "{body}");
    assert_eq!(body["steps"][0]["exit_code"], 0, "{body}");
    let out = output(&body);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out:?}");
    assert!(lines[0].ends_with("/project"), "cwd kept: {out:?}");
    assert_eq!(lines[1], "hello", "file kept: {out:?}");
    assert_eq!(lines[2], "hi", "exported variable kept: {out:?}");
    assert!(
        lines[3].parse::<u32>().unwrap() >= 1,
        "bash history kept: {out:?}"
    );
    // AND the turn memory has both turns
    let memory = std::fs::read_to_string(s.home(&machine_id).join(TURNS_FILE)).unwrap();
    let memory: Vec<Value> = memory
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(memory.len(), 2, "{memory:?}");
    assert_eq!(memory[0]["turn_id"], first["turn_id"]);
    assert_eq!(memory[1]["turn_id"], body["turn_id"]);
    // AND the item says awake, with no lease left
    let item = s.item("alice").await;
    assert_eq!(item.power, Power::Awake, "{item:?}");
    assert!(item.live_lease(now_ms()).is_none(), "{item:?}");

    // AND the wake went the way the API allows
    let wakes = requests(&s.emu, "POST", "/wake").await;
    assert!(!wakes.is_empty(), "the turn tried the wake route");
    let refused = wakes.iter().filter(|w| w["status"] == 401).count();
    if drift.refuse_wake {
        assert_eq!(refused, wakes.len(), "{wakes:?}");
        let last_wake = wakes.last().unwrap()["seq"].as_u64().unwrap();
        let noop = requests(&s.emu, "POST", "/executions")
            .await
            .into_iter()
            .any(|e| e["seq"].as_u64().unwrap() > last_wake && e["status"].as_u64() < Some(300));
        assert!(noop, "a no-op execution woke the machine after the refusal");
    } else {
        assert_eq!(refused, 0, "{wakes:?}");
        assert!(
            wakes.iter().any(|w| w["status"].as_u64() < Some(300)),
            "{wakes:?}"
        );
    }
    // AND with If-Match required, refused mutations were resent with it
    if drift.require_if_match && !drift.refuse_wake && !drift.refuse_sleep {
        let log = s.emu.requests().await;
        let refused: Vec<&Value> = log.iter().filter(|r| r["status"] == 428).collect();
        assert!(!refused.is_empty(), "428 seen (else the switch was off)");
        for r in refused {
            let resent = log.iter().any(|o| {
                o["seq"].as_u64() > r["seq"].as_u64()
                    && o["method"] == r["method"]
                    && o["path"] == r["path"]
                    && o["status"].as_u64() < Some(300)
            });
            assert!(resent, "{r} resent with If-Match and accepted");
        }
    }
    // AND with terminals refused, no terminal was ever opened
    if let Some(status) = drift.refuse_terminals {
        let terminals = requests(&s.emu, "POST", "/terminals").await;
        assert!(
            terminals.iter().all(|t| t["status"] == status),
            "{terminals:?}"
        );
    }
}

#[tokio::test]
async fn full_flow_with_wake_refused_wakes_through_a_no_op_execution() {
    full_flow(Drift {
        refuse_wake: true,
        ..Drift::default()
    })
    .await;
}

#[tokio::test]
async fn full_flow_with_sleep_refused_relies_on_platform_autosleep() {
    full_flow(Drift {
        refuse_sleep: true,
        ..Drift::default()
    })
    .await;
}

#[tokio::test]
async fn full_flow_with_terminals_404_runs_on_executions() {
    full_flow(Drift {
        refuse_terminals: Some(404),
        ..Drift::default()
    })
    .await;
}

#[tokio::test]
async fn full_flow_with_terminals_501_runs_on_executions() {
    full_flow(Drift {
        refuse_terminals: Some(501),
        ..Drift::default()
    })
    .await;
}

#[tokio::test]
async fn full_flow_with_bare_uuid_ids() {
    full_flow(Drift {
        uuid_ids: true,
        ..Drift::default()
    })
    .await;
}

#[tokio::test]
async fn full_flow_with_the_newer_response_shape() {
    full_flow(Drift {
        newer_shape: true,
        ..Drift::default()
    })
    .await;
}

#[tokio::test]
async fn full_flow_with_if_match_required() {
    full_flow(Drift {
        require_if_match: true,
        ..Drift::default()
    })
    .await;
}

#[tokio::test]
async fn full_flow_with_every_drift_at_once() {
    full_flow(Drift::all()).await;
}

// ---------------------------------------------------------------------------
// One refused sleep call per sweep run
// ---------------------------------------------------------------------------

/// GIVEN several ready, awake, idle users in one awake shard (one index
/// page, handled concurrently) and explicit sleep refused (the refusal slow
/// to arrive, so concurrent calls would overlap) WHEN a sweep runs THEN it
/// makes exactly one sleep call, reports sleep unavailable and leaves the
/// running machines to their autosleep; a second run again makes one.
#[tokio::test]
async fn with_sleep_refused_one_sweep_run_makes_at_most_one_sleep_call() {
    let s = stack(Drift::default()).await;
    let users: Vec<String> = (0..)
        .map(|i| format!("user-{i}"))
        .filter(|u| shard_for(&uid(u)) == "0")
        .take(4)
        .collect();
    for u in &users {
        s.ready_user(u).await;
        assert_eq!(s.item(u).await.power, Power::Awake);
    }
    s.emu.configure(json!({"refuse_sleep": true})).await;
    // A refusal slow to arrive (a fault answers, after the delay, exactly
    // what the refuse_sleep switch answers), so calls made concurrently
    // would overlap. (A delay-only fault would not delay a refusal: the
    // drift switch answers before the delay is applied.)
    s.emu
        .inject_fault(json!({
            "method": "POST", "path": "/v1/machines/*/sleep", "times": 0, "delay_ms": 800,
            "status": 401, "error_code": "AUTH_INVALID",
            "message": "missing internal route signature", "retryable": false
        }))
        .await;

    for run in 1..=2 {
        let before = requests(&s.emu, "POST", "/sleep").await.len();
        let report = sweep(&s).await;
        let sleeps = requests(&s.emu, "POST", "/sleep").await;
        assert_eq!(
            sleeps.len() - before,
            1,
            "run {run}: at most one refused sleep call: {sleeps:?} {report:?}"
        );
        assert!(sleeps.iter().all(|r| r["status"] == 401), "{sleeps:?}");
        assert!(report.sleep_unavailable, "{report:?}");
        assert_eq!(
            (report.candidates, report.awaiting_autosleep, report.failed),
            (4, 4, 0),
            "{report:?}"
        );
        for u in &users {
            let item = s.item(u).await;
            assert_eq!(item.power, Power::Awake, "{item:?}");
            assert!(item.lease.is_none(), "lease released: {item:?}");
        }
    }
}

// ---------------------------------------------------------------------------
// If-Match required (the spec's old rule)
// ---------------------------------------------------------------------------

/// GIVEN an emulator that answers 428 to mutations without `If-Match` WHEN
/// the client sleeps, wakes, updates and deletes a machine without one THEN
/// each call succeeds (the client reads the revision and resends once), and
/// a stale revision the caller passes is not replaced (409 stays 409).
#[tokio::test]
async fn the_client_supplies_if_match_when_the_api_requires_it() {
    use agenthome::dedalus::{CreateMachineRequest, UpdateMachineRequest};
    let emu = Emulator::start_with(&["--require-if-match", "--response-shape", "newer"]).await;
    let client = emu.client();
    let created = client
        .create_machine(
            &CreateMachineRequest {
                vcpu: 1.0,
                memory_mib: 1024,
                storage_gib: 10,
                autosleep: Some("30m".into()),
            },
            None,
        )
        .await
        .expect("create needs no If-Match");
    let id = created.machine_id;
    let within = || Instant::now() + Duration::from_secs(20);
    client
        .wait_until(&id, Phase::Running, within())
        .await
        .unwrap();

    client.sleep_machine(&id, None, None).await.expect("sleep");
    client
        .wait_until(&id, Phase::Sleeping, within())
        .await
        .unwrap();
    client.wake_machine(&id, None, None).await.expect("wake");
    client
        .wait_until(&id, Phase::Running, within())
        .await
        .unwrap();
    let update = UpdateMachineRequest {
        autosleep: Some("2h".into()),
        ..UpdateMachineRequest::default()
    };
    let stale = client.get_machine(&id).await.unwrap().revision.unwrap();
    client
        .update_machine(&id, &update, None, None)
        .await
        .expect("update");
    let err = client
        .with_retry(agenthome::dedalus::RetryPolicy {
            max_attempts: 1,
            ..agenthome_tests::fast_retry_policy()
        })
        .update_machine(&id, &update, Some(&stale), None)
        .await
        .expect_err("a stale revision the caller holds is refused");
    assert_eq!(err.status().map(|s| s.as_u16()), Some(409), "{err}");
    client
        .delete_machine(&id, None, None)
        .await
        .expect("delete");

    let refused: Vec<Value> = emu
        .requests()
        .await
        .into_iter()
        .filter(|r| r["status"] == 428)
        .collect();
    assert_eq!(
        refused.len(),
        4,
        "one 428 per mutation, then resent: {refused:?}"
    );
}

//! The Dedalus client against an emulator with drift switches on: the newer
//! mutation response shape (top-level `phase`/`revision`, no `status`),
//! bare-UUID machine ids, required `If-Match`, and wake/sleep refused with
//! 401 "missing internal route signature" (not retried).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod client_support;

use agenthome::dedalus::{
    codes, CreateMachineRequest, DesiredState, ExecutionRequest, Phase, UpdateMachineRequest,
};
use agenthome_tests::Emulator;
use client_support::*;
use serde_json::json;

const SIGNATURE: &str = "missing internal route signature";

fn is_bare_uuid(id: &str) -> bool {
    id.len() == 36
        && uuid::Uuid::parse_str(id).is_ok()
        && id == id.to_ascii_lowercase()
        && !id.starts_with("dm-")
}

#[tokio::test]
async fn newer_shape_and_uuid_ids_through_the_whole_lifecycle() {
    // GIVEN an emulator answering mutations in the newer shape with bare
    // UUID ids, and a client for it
    let emu = Emulator::start_with(&["--response-shape", "newer", "--id-format", "uuid"]).await;
    let client = emu.client();

    // WHEN a machine is created
    let req = CreateMachineRequest {
        autosleep: Some("30m".into()),
        ..small()
    };
    let created = client.create_machine(&req, None).await.expect("create");

    // THEN the top-level phase and revision are parsed, the id is opaque
    let id = created.machine_id.clone();
    assert!(is_bare_uuid(&id), "{id}");
    assert!(
        matches!(created.phase, Phase::Accepted | Phase::Starting),
        "{:?}",
        created.phase
    );
    let rev = created.revision.clone().expect("revision from the body");
    assert_eq!(created.etag.as_deref(), Some(format!("\"{rev}\"").as_str()));
    assert_eq!(created.desired_state, Some(DesiredState::Running));
    assert_eq!(created.memory_mib, 1024);
    assert_eq!(created.storage_gib, 10);
    assert_eq!(created.vcpu, 1.0);
    assert_eq!(created.autosleep_seconds, Some(1800));

    // AND wait_until and get (spec-shaped `status`) see it running
    let running = client
        .wait_until(&id, Phase::Running, within(20))
        .await
        .expect("running");
    assert_eq!(running.machine_id, id);
    let got = client.get_machine(&id).await.expect("get");
    assert_eq!(got.phase, Phase::Running);
    assert_eq!(got.autosleep_seconds, Some(1800));
    let all = client.list_all_machines(None).await.expect("list");
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].machine_id, id);
    assert_eq!(all[0].phase, Phase::Running);

    // WHEN If-Match becomes required (the old behaviour), the revisions the
    // client parsed from newer-shape bodies are what it sends
    emu.configure(json!({"require_if_match": true})).await;
    let updated = client
        .update_machine(
            &id,
            &UpdateMachineRequest {
                autosleep: Some("2h".into()),
                ..UpdateMachineRequest::default()
            },
            got.revision.as_deref(),
            None,
        )
        .await
        .expect("update");
    assert_eq!(updated.phase, Phase::Running);
    assert_eq!(updated.autosleep_seconds, Some(7200));
    assert_ne!(updated.revision, got.revision, "update moves the revision");

    let asleep = client
        .sleep_machine(&id, updated.revision.as_deref(), None)
        .await
        .expect("sleep");
    assert!(
        matches!(asleep.phase, Phase::Stopping | Phase::Sleeping),
        "{:?}",
        asleep.phase
    );
    assert_eq!(asleep.desired_state, Some(DesiredState::Sleeping));
    let slept = client
        .wait_until(&id, Phase::Sleeping, within(20))
        .await
        .expect("sleeping");

    let woken = client
        .wake_machine(&id, slept.revision.as_deref(), None)
        .await
        .expect("wake");
    assert!(
        matches!(woken.phase, Phase::Starting | Phase::Running),
        "{:?}",
        woken.phase
    );
    assert!(woken.revision.is_some());
    let running = client
        .wait_until(&id, Phase::Running, within(20))
        .await
        .expect("running again");

    // AND executions work on a bare-UUID machine
    let run = client
        .run_and_wait(&id, &ExecutionRequest::shell("echo drift"), within(20))
        .await
        .expect("run");
    assert!(run.success());
    assert_eq!(run.output.stdout, "drift\n");

    let deleting = client
        .delete_machine(&id, running.revision.as_deref(), None)
        .await
        .expect("delete");
    assert!(
        matches!(deleting.phase, Phase::Destroying | Phase::Destroyed),
        "{:?}",
        deleting.phase
    );
    assert_eq!(deleting.desired_state, Some(DesiredState::Destroyed));
    client
        .wait_until(&id, Phase::Destroyed, within(20))
        .await
        .expect("destroyed");

    // THEN no call was refused for a missing If-Match: every lifecycle
    // mutation went through once
    let log = emu.requests().await;
    assert!(
        log.iter()
            .all(|r| r["status"].as_u64().is_some_and(|s| s < 400 || s == 404)),
        "{log:?}"
    );
}

#[tokio::test]
async fn wake_and_sleep_refusals_are_non_retryable_401s_sent_once() {
    // GIVEN a running machine on an emulator with the newer shape and UUIDs
    let (emu, client, m) =
        emulator_with_machine(&["--response-shape", "newer", "--id-format", "uuid"]).await;
    let id = m.machine_id.clone();

    // WHEN explicit wake and sleep are refused (field report)
    emu.configure(json!({"refuse_wake": true, "refuse_sleep": true}))
        .await;
    for sleep in [false, true] {
        let since = last_seq(&emu).await;
        let err = if sleep {
            client.sleep_machine(&id, None, None).await
        } else {
            client.wake_machine(&id, None, None).await
        }
        .expect_err("refused");

        // THEN the client surfaces a non-retryable 401 with the message
        assert_eq!(err.status().map(|s| s.as_u16()), Some(401), "{err}");
        assert_eq!(err.code(), Some(codes::AUTH_INVALID));
        assert!(!err.is_retryable(), "{err}");
        let api = err.api().expect("an API error");
        assert_eq!(api.message, SIGNATURE);
        assert_eq!(api.retryable, Some(false));
        assert!(err.to_string().contains(SIGNATURE), "{err}");

        // AND it was sent exactly once (no retry)
        let after: Vec<_> = emu
            .requests()
            .await
            .into_iter()
            .filter(|r| r["seq"].as_u64().unwrap_or(0) > since)
            .collect();
        assert_eq!(after.len(), 1, "{after:?}");
        let suffix = if sleep { "/sleep" } else { "/wake" };
        assert!(
            after[0]["path"]
                .as_str()
                .is_some_and(|p| p.ends_with(suffix)),
            "{after:?}"
        );
        assert_eq!(after[0]["status"], 401);
    }

    // AND the machine is untouched
    let got = client.get_machine(&id).await.expect("get");
    assert_eq!(got.phase, Phase::Running);
    assert_eq!(got.desired_state, Some(DesiredState::Running));
}

#[tokio::test]
async fn with_wake_refused_an_execution_wakes_an_autoslept_machine() {
    // GIVEN a machine with a 1 s autosleep on an emulator that refuses
    // explicit wake and sleep
    let emu = Emulator::start_with(&[
        "--response-shape",
        "newer",
        "--id-format",
        "uuid",
        "--refuse-wake",
        "--refuse-sleep",
    ])
    .await;
    let client = emu.client();
    let req = CreateMachineRequest {
        autosleep: Some("1s".into()),
        ..small()
    };
    let m = client.create_machine(&req, None).await.expect("create");
    let id = m.machine_id.clone();
    assert!(is_bare_uuid(&id), "{id}");

    // WHEN autosleep puts it to sleep and wake is refused
    client
        .wait_until(&id, Phase::Sleeping, within(20))
        .await
        .expect("autosleep");
    let err = client
        .wake_machine(&id, None, None)
        .await
        .expect_err("refused");
    assert_eq!(err.status().map(|s| s.as_u16()), Some(401));

    // THEN the documented fallback wakes it: a no-op execution
    let run = client
        .run_and_wait(&id, &ExecutionRequest::new(["/bin/true"]), within(20))
        .await
        .expect("no-op execution");
    assert!(run.success());
    let got = client.get_machine(&id).await.expect("get");
    assert_eq!(got.phase, Phase::Running);
    assert_eq!(logged(&emu, 0, "POST", "/wake").await.len(), 1);
}

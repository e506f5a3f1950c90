//! The Dedalus client's machine operations against a real emulator process.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod client_support;

use std::collections::HashSet;
use std::time::Duration;

use agenthome::dedalus::{
    CreateMachineRequest, DesiredState, Error, ExecutionRequest, ExecutionStatus, IdempotencyKey,
    Phase, RetryPolicy, UpdateMachineRequest,
};
use agenthome_tests::{fast_retry_policy, host_pids_with_arg, Emulator};
use client_support::*;
use serde_json::json;

#[tokio::test]
async fn machine_lifecycle_create_get_update_sleep_wake_delete() {
    // GIVEN a fresh emulator and a client for it
    let emu = Emulator::start().await;
    let client = emu.client();

    // WHEN a machine is created with an autosleep string
    let req = CreateMachineRequest {
        autosleep: Some("30m".into()),
        ..small()
    };
    let created = client.create_machine(&req, None).await.expect("create");

    // THEN it has an opaque id, the requested size and autosleep in seconds
    assert!(!created.machine_id.is_empty());
    assert_eq!(created.memory_mib, 1024);
    assert_eq!(created.storage_gib, 10);
    assert_eq!(created.vcpu, 1.0);
    assert_eq!(created.autosleep_seconds, Some(1800));
    assert_eq!(created.desired_state, Some(DesiredState::Running));
    assert!(
        matches!(
            created.phase,
            Phase::Accepted | Phase::Starting | Phase::Running | Phase::PlacementPending
        ),
        "{:?}",
        created.phase
    );

    // WHEN we wait for running
    let id = created.machine_id.clone();
    let running = client
        .wait_until(&id, Phase::Running, within(10))
        .await
        .expect("running");
    assert_eq!(running.phase, Phase::Running);

    // THEN get returns it with a revision and an ETag
    let got = client.get_machine(&id).await.expect("get");
    assert_eq!(got.machine_id, id);
    assert_eq!(got.phase, Phase::Running);
    let rev = got.revision.clone().expect("revision");
    assert!(got.etag.is_some(), "ETag header kept");

    // WHEN it is updated with a fresh If-Match
    let upd = UpdateMachineRequest {
        memory_mib: Some(2048),
        ..Default::default()
    };
    let updated = client
        .update_machine(&id, &upd, Some(&rev), None)
        .await
        .expect("update");
    // THEN the size changed and the revision moved on
    assert_eq!(updated.memory_mib, 2048);
    assert_ne!(updated.revision.as_deref(), Some(rev.as_str()));

    // WHEN it is put to sleep, THEN it reaches sleeping
    let slept = client
        .sleep_machine(&id, updated.revision.as_deref(), None)
        .await
        .expect("sleep");
    assert_eq!(slept.desired_state, Some(DesiredState::Sleeping));
    client
        .wait_until(&id, Phase::Sleeping, within(10))
        .await
        .expect("sleeping");

    // WHEN it is woken, THEN it runs again
    client.wake_machine(&id, None, None).await.expect("wake");
    client
        .wait_until(&id, Phase::Running, within(10))
        .await
        .expect("running again");
    // and a second wake of a running machine is a no-op
    let again = client
        .wake_machine(&id, None, None)
        .await
        .expect("wake no-op");
    assert_eq!(again.phase, Phase::Running);

    // WHEN it is deleted, THEN waiting for destroyed succeeds and get is a 404
    client
        .delete_machine(&id, None, None)
        .await
        .expect("delete");
    let gone = client
        .wait_until(&id, Phase::Destroyed, within(10))
        .await
        .expect("destroyed");
    assert_eq!(gone.phase, Phase::Destroyed);
    let err = client.get_machine(&id).await.expect_err("404 after delete");
    assert!(err.is_not_found(), "{err:?}");
    assert!(!err.is_retryable());
}

#[tokio::test]
async fn list_pages_through_all_machines() {
    // GIVEN five machines
    let emu = Emulator::start().await;
    let client = emu.client();
    let mut ids = HashSet::new();
    for _ in 0..5 {
        ids.insert(
            client
                .create_machine(&small(), None)
                .await
                .expect("create")
                .machine_id,
        );
    }

    // WHEN one page of two is listed
    let page = client.list_machines(None, Some(2)).await.expect("page 1");
    // THEN it has two items and a cursor
    assert_eq!(page.items.len(), 2);
    let cursor = page.next_cursor.clone().expect("next cursor");
    let page2 = client
        .list_machines(Some(&cursor), Some(2))
        .await
        .expect("page 2");
    assert_eq!(page2.items.len(), 2);
    assert!(page2
        .items
        .iter()
        .all(|m| !page.items.iter().any(|p| p.machine_id == m.machine_id)));

    // WHEN all pages are walked
    let all = client.list_all_machines(Some(2)).await.expect("all");
    // THEN every machine appears exactly once
    let listed: Vec<_> = all.iter().map(|m| m.machine_id.clone()).collect();
    assert_eq!(listed.len(), 5, "{listed:?}");
    assert_eq!(listed.into_iter().collect::<HashSet<_>>(), ids);
    // and three list requests were made
    let lists = logged(&emu, 0, "GET", "/v1/machines").await;
    assert_eq!(lists.len(), 2 + 3);
}

#[tokio::test]
async fn wait_until_uses_the_status_stream() {
    // GIVEN a slow boot
    let emu = Emulator::start_with(&["--boot-delay", "400ms"]).await;
    let client = emu.client();
    let m = client.create_machine(&small(), None).await.expect("create");

    // WHEN we wait for running
    let running = client
        .wait_until(&m.machine_id, Phase::Running, within(10))
        .await
        .expect("running");

    // THEN the answer came from the SSE stream, not from polling
    assert_eq!(running.phase, Phase::Running);
    let streams = logged(&emu, 0, "GET", "/status/stream").await;
    assert!(!streams.is_empty(), "status stream used");
    let polls = logged(&emu, 0, "GET", &format!("/machines/{}", m.machine_id)).await;
    assert!(polls.len() <= 1, "few polls: {polls:?}");
}

#[tokio::test]
async fn wait_until_falls_back_to_polling_when_the_stream_fails() {
    // GIVEN a status stream that always fails
    let emu = Emulator::start_with(&["--boot-delay", "300ms"]).await;
    emu.inject_fault(json!({
        "method": "GET", "path": "/v1/machines/*/status/stream", "times": 0,
        "status": 503, "error_code": "DEPENDENCY_UNAVAILABLE", "retryable": true
    }))
    .await;
    let client = emu.client();
    let m = client.create_machine(&small(), None).await.expect("create");

    // WHEN we wait for running
    let running = client
        .wait_until(&m.machine_id, Phase::Running, within(10))
        .await
        .expect("running via polling");

    // THEN it got there by polling GET /v1/machines/{id}
    assert_eq!(running.phase, Phase::Running);
    let polls = logged(&emu, 0, "GET", &format!("/machines/{}", m.machine_id)).await;
    assert!(polls.len() >= 2, "polled: {polls:?}");
}

#[tokio::test]
async fn wait_until_respects_its_deadline() {
    // GIVEN a sleeping machine that nobody wakes
    let (_emu, client, m) = emulator_with_machine(&[]).await;
    sleep_and_wait(&client, &m.machine_id).await;

    // WHEN we wait for running with a short deadline
    let started = tokio::time::Instant::now();
    let err = client
        .wait_until(
            &m.machine_id,
            Phase::Running,
            tokio::time::Instant::now() + Duration::from_millis(700),
        )
        .await
        .expect_err("never runs");

    // THEN it fails with a deadline error, on time
    assert!(err.is_deadline_exceeded(), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn sleep_while_starting_is_retried_until_allowed() {
    // GIVEN a machine that is still booting (sleep → 409 INVALID_STATE, retryable)
    let emu = Emulator::start_with(&["--boot-delay", "300ms"]).await;
    let client = emu.client();
    let m = client.create_machine(&small(), None).await.expect("create");

    // WHEN we ask it to sleep at once
    let since = last_seq(&emu).await;
    client
        .sleep_machine(&m.machine_id, None, None)
        .await
        .expect("sleep accepted after retries");

    // THEN the client retried the retryable 409 with the same key
    let sleeps = logged(&emu, since, "POST", "/sleep").await;
    assert!(sleeps.len() >= 2, "{sleeps:?}");
    assert_eq!(statuses(&sleeps)[0], 409);
    let k = keys(&sleeps);
    assert!(
        k.iter().all(|x| x == &k[0]),
        "same key on every attempt: {k:?}"
    );
    client
        .wait_until(&m.machine_id, Phase::Sleeping, within(10))
        .await
        .expect("sleeping");
}

#[tokio::test]
async fn concurrent_creates_with_one_key_make_one_machine() {
    // GIVEN one idempotency key and twenty concurrent callers (retries)
    let emu = Emulator::start().await;
    let client = emu.client().with_retry(RetryPolicy {
        max_attempts: 20,
        ..fast_retry_policy()
    });
    let key = IdempotencyKey::new();

    // WHEN all twenty create with that key at once
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let client = client.clone();
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            client.create_machine(&small(), Some(&key)).await
        }));
    }
    let mut ids = HashSet::new();
    for t in tasks {
        ids.insert(t.await.expect("join").expect("create").machine_id);
    }

    // THEN they all got the same machine, and exactly one exists
    assert_eq!(ids.len(), 1, "{ids:?}");
    let all = client.list_all_machines(None).await.expect("list");
    assert_eq!(all.len(), 1);
    // and every request carried the one key
    let creates = logged(&emu, 0, "POST", "/v1/machines").await;
    assert!(creates.len() >= 20);
    assert!(keys(&creates).iter().all(|k| k == key.as_str()));
}

#[tokio::test]
async fn files_survive_sleep_and_wake_processes_do_not() {
    // GIVEN a running machine with a file in home and a long-running process
    let (emu, client, m) = emulator_with_machine(&[]).await;
    let id = m.machine_id.clone();
    let wrote = client
        .run_and_wait(
            &id,
            &ExecutionRequest::shell("echo kept > \"$HOME/note.txt\""),
            within(10),
        )
        .await
        .expect("write file");
    assert!(wrote.success(), "{wrote:?}");
    // (a unique duration names the process on the host, whatever its pid in
    // the machine)
    let duration = format!("300.{}", uuid::Uuid::now_v7().as_u128() % 1_000_000_000);
    let long = client
        .create_execution(
            &id,
            &ExecutionRequest::shell(format!(
                "echo started > \"$HOME/pid\"; exec sleep {duration}"
            )),
            None,
        )
        .await
        .expect("start long process");
    let pid_file = emu.machine_home(&id).join("pid");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while host_pids_with_arg(&duration).is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(pid_file.exists(), "the long process started");
    assert_eq!(host_pids_with_arg(&duration).len(), 1, "it runs");

    // WHEN the machine sleeps and wakes
    sleep_and_wait(&client, &id).await;
    wake_and_wait(&client, &id).await;

    // THEN the file is still there
    assert_eq!(
        std::fs::read_to_string(emu.machine_home(&id).join("note.txt")).expect("on host"),
        "kept\n"
    );
    let cat = client
        .run_and_wait(
            &id,
            &ExecutionRequest::shell("cat \"$HOME/note.txt\""),
            within(10),
        )
        .await
        .expect("cat");
    assert_eq!(cat.output.stdout, "kept\n");
    // and the process is gone, its execution cancelled
    let exec = client
        .get_execution(&id, &long.execution_id)
        .await
        .expect("get long exec");
    assert!(exec.status.is_terminal(), "{:?}", exec.status);
    assert_ne!(exec.status, ExecutionStatus::Succeeded);
    assert_eq!(
        host_pids_with_arg(&duration),
        Vec::<i32>::new(),
        "the process survived sleep"
    );
}

#[tokio::test]
async fn machine_ids_are_opaque_uuid_form_works() {
    // GIVEN an emulator that hands out bare UUIDs
    let emu = Emulator::start_with(&["--id-format", "uuid"]).await;
    let client = emu.client();

    // WHEN a machine is created and waited for
    let m = running_machine(&client).await;

    // THEN the id is a bare UUID and every call works with it
    assert!(!m.machine_id.starts_with("dm-"), "{}", m.machine_id);
    assert_eq!(m.machine_id.len(), 36);
    client.get_machine(&m.machine_id).await.expect("get");
    let err: Error = client.get_machine("dm-nope").await.expect_err("404");
    assert!(err.is_not_found());
}

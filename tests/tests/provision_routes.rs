//! The provision function's machine routes and worker event, driven
//! in-process through the real event shapes, against a real emulator and a
//! real DynamoDB-compatible server.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use agenthome::store::UserStore;
use agenthome_tests::events::Auth;
use agenthome_tests::provision_stack::{alice, ProvisionStack as Stack};
use agenthome_tests::stack::admin;
use agenthome_tests::uid;
use serde_json::{json, Value};
use std::time::Duration;

const ADMIN: &str = "agenthome/admin";

#[tokio::test]
async fn put_provisions_once_and_get_reports_without_waking() {
    // GIVEN a fresh stack
    let mut s = Stack::start().await;
    // WHEN alice PUTs her machine twice
    let (status, headers, body) = s.call("PUT", "/v1/users/alice/machine", alice()).await;
    assert_eq!(status, 202, "{body}");
    assert!(
        headers["retry-after"].as_str().is_some(),
        "202 carries Retry-After"
    );
    assert_eq!(body["state"], "provisioning");
    let (status, _, _) = s.call("PUT", "/v1/users/alice/machine", alice()).await;
    assert_eq!(status, 202, "a second PUT while provisioning is still 202");
    // AND the worker runs
    assert_eq!(
        s.drain_worker().await,
        1,
        "only the first PUT started a worker"
    );
    // THEN GET shows a ready, running machine, and PUT is now 200
    let (status, _, body) = s.call("GET", "/v1/users/alice/machine", alice()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "ready");
    assert_eq!(body["phase"], "running");
    let machine_id = body["machine_id"].as_str().unwrap().to_string();
    let (status, _, _) = s.call("PUT", "/v1/users/alice/machine", alice()).await;
    assert_eq!(status, 200);
    let machines = s.emu.client().list_all_machines(None).await.unwrap();
    assert_eq!(machines.len(), 1);

    // WHEN the machine sleeps and alice reads its status
    let client = s.emu.client();
    client.sleep_machine(&machine_id, None, None).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    client
        .wait_until(&machine_id, agenthome::dedalus::Phase::Sleeping, deadline)
        .await
        .unwrap();
    let before = s.emu.requests().await.len();
    let (status, _, body) = s.call("GET", "/v1/users/alice/machine", alice()).await;
    // THEN the status says sleeping and only GETs reached the platform
    assert_eq!(status, 200);
    assert_eq!(body["phase"], "sleeping");
    let after = s.emu.requests().await;
    let sent: Vec<&Value> = after[before..].iter().collect();
    assert!(!sent.is_empty());
    assert!(
        sent.iter().all(|r| r["method"] == "GET"),
        "a status read sent a mutation: {sent:?}"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let m = client.get_machine(&machine_id).await.unwrap();
    assert_eq!(
        m.phase,
        agenthome::dedalus::Phase::Sleeping,
        "GET never wakes"
    );
}

#[tokio::test]
async fn users_may_act_only_for_themselves_unless_admin() {
    let s = Stack::with_alice().await;
    // GIVEN bob's token WHEN he reads or deletes alice's machine THEN 403
    let bob = Auth::Jwt {
        sub: "bob",
        scopes: &["read"],
    };
    for (method, path) in [
        ("GET", "/v1/users/alice/machine"),
        ("PUT", "/v1/users/alice/machine"),
        ("DELETE", "/v1/users/alice/machine"),
    ] {
        let (status, headers, body) = s.call(method, path, bob.clone()).await;
        assert_eq!(status, 403, "{method} {path}: {body}");
        assert_eq!(headers["content-type"], "application/problem+json");
        assert_eq!(body["code"], "forbidden");
    }
    // AND without a token THEN 401
    let (status, _, _) = s.call("GET", "/v1/users/alice/machine", Auth::None).await;
    assert_eq!(status, 401);
    // AND the admin scope in a token of another client is not admin
    let other_client = Auth::Client {
        sub: "mallory",
        scopes: &[ADMIN],
        client_id: "some-other-app",
    };
    for (method, path) in [
        ("GET", "/v1/users/alice/machine"),
        ("DELETE", "/v1/users/alice/machine"),
    ] {
        let (status, _, body) = s.call(method, path, other_client.clone()).await;
        assert_eq!(status, 403, "{method} {path}: {body}");
    }
    // AND the backend's admin token (scope and client) may act for alice
    let (status, _, body) = s.call("GET", "/v1/users/alice/machine", admin()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["user_id"], "alice");
}

#[tokio::test]
async fn delete_removes_machine_and_mapping_and_a_new_put_starts_fresh() {
    let mut s = Stack::with_alice().await;
    let (_, _, body) = s.call("GET", "/v1/users/alice/machine", alice()).await;
    let first = body["machine_id"].as_str().unwrap().to_string();

    // WHEN alice's account is deleted (twice: DELETE is idempotent)
    let (status, _, _) = s.call("DELETE", "/v1/users/alice/machine", alice()).await;
    assert_eq!(status, 204);
    let (status, _, _) = s.call("DELETE", "/v1/users/alice/machine", alice()).await;
    assert_eq!(status, 204);
    // THEN the machine and the item are gone
    assert!(s
        .emu
        .client()
        .list_all_machines(None)
        .await
        .unwrap()
        .is_empty());
    assert!(s
        .service
        .provisioner
        .store()
        .get(&uid("alice"))
        .await
        .unwrap()
        .is_none());
    let (status, _, body) = s.call("GET", "/v1/users/alice/machine", alice()).await;
    assert_eq!((status, body["code"].as_str()), (404, Some("no_machine")));

    // WHEN she comes back THEN a fresh machine is provisioned
    let (status, _, _) = s.call("PUT", "/v1/users/alice/machine", alice()).await;
    assert_eq!(status, 202);
    s.drain_worker().await;
    let (_, _, body) = s.call("GET", "/v1/users/alice/machine", alice()).await;
    assert_eq!(body["state"], "ready");
    assert_ne!(body["machine_id"].as_str().unwrap(), first);
    assert_eq!(
        s.emu.client().list_all_machines(None).await.unwrap().len(),
        1
    );
}

#[tokio::test]
async fn bad_input_is_a_4xx_problem_never_a_5xx_or_panic() {
    let s = Stack::start().await;
    let cases: &[(&str, &str, u16)] = &[
        ("GET", "/v1/users/-bad/machine", 400),
        ("GET", "/v1/users/a%2Fb/machine", 400),
        (
            "GET",
            &format!("/v1/users/{}/machine", "x".repeat(129)),
            400,
        ),
        ("GET", "/v1/users/%ZZ/machine", 400),
        ("POST", "/v1/users/alice/machine", 405),
        ("PATCH", "/v1/users/alice/machine", 405),
        ("GET", "/v1/users/alice/machine/sleep", 405),
        ("GET", "/v1/users/alice", 404),
        ("GET", "/", 404),
        ("GET", "/v1/users/alice/machine/extra", 404),
    ];
    for (method, path, want) in cases {
        let (status, headers, body) = s
            .call(
                method,
                path,
                Auth::Jwt {
                    sub: "alice",
                    scopes: &[ADMIN],
                },
            )
            .await;
        assert_eq!(status, *want, "{method} {path}: {body}");
        assert_eq!(
            headers["content-type"], "application/problem+json",
            "{method} {path}"
        );
        assert_eq!(body["status"], *want);
        assert!(body["detail"].as_str().is_some_and(|d| !d.is_empty()));
    }
    // Events that are neither HTTP nor provision events are refused, not a panic.
    for garbage in [json!({}), json!([1, 2]), json!("x"), json!({"user_id": 5})] {
        assert!(
            s.service.handle(garbage.clone()).await.is_err(),
            "{garbage}"
        );
    }
}

#[tokio::test]
async fn sleep_now_sleeps_an_idle_machine_but_never_one_a_turn_holds() {
    use agenthome::store::LeasePurpose;
    let s = Stack::with_alice().await;
    let store = s.service.provisioner.store();
    let now = agenthome::clock::now_ms();

    // GIVEN a turn holds alice's machine WHEN the conversation-ended sleep
    // arrives THEN it is refused with 409 and the machine keeps running
    store
        .acquire_lease(
            &uid("alice"),
            "turn-x",
            LeasePurpose::Turn,
            now + 60_000,
            now,
        )
        .await
        .unwrap();
    let (status, headers, body) = s
        .call("POST", "/v1/users/alice/machine/sleep", alice())
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (409, Some("turn_in_progress")),
        "{body}"
    );
    assert!(headers["retry-after"].as_str().is_some());
    let (_, _, got) = s.call("GET", "/v1/users/alice/machine", alice()).await;
    assert_eq!(got["phase"], "running");

    // WHEN the turn ends and the sleep is sent again THEN the machine sleeps
    store
        .release_lease(&uid("alice"), "turn-x", agenthome::clock::now_ms())
        .await
        .unwrap();
    let (status, _, body) = s
        .call("POST", "/v1/users/alice/machine/sleep", alice())
        .await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("asleep")),
        "{body}"
    );
    let item = store.get(&uid("alice")).await.unwrap().unwrap();
    assert_eq!(item.power, agenthome::store::Power::Asleep);
    assert_eq!(
        item.awake_shard, None,
        "an asleep item leaves the awake index"
    );
    let machine_id = item.machine_id.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    s.emu
        .client()
        .wait_until(&machine_id, agenthome::dedalus::Phase::Sleeping, deadline)
        .await
        .unwrap();
    // AND a second sleep is a no-op 200
    let (status, _, _) = s
        .call("POST", "/v1/users/alice/machine/sleep", alice())
        .await;
    assert_eq!(status, 200);
    // AND bob, who has no machine, gets 404
    let bob = Auth::Jwt {
        sub: "bob",
        scopes: &[],
    };
    let (status, _, _) = s.call("POST", "/v1/users/bob/machine/sleep", bob).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn sleep_now_inside_the_platform_hold_window_is_scheduled_not_lost() {
    let s = Stack::with_alice().await;
    // GIVEN the platform refuses sleep for an hour after a wake
    s.emu.configure(json!({"hold_window_ms": 3_600_000})).await;
    // WHEN the conversation-ended sleep arrives
    let (status, headers, body) = s
        .call("POST", "/v1/users/alice/machine/sleep", alice())
        .await;
    // THEN it is accepted for later, with the time the sweep will use
    assert_eq!(
        (status, body["status"].as_str()),
        (202, Some("scheduled")),
        "{body}"
    );
    let after: u64 = headers["retry-after"].as_str().unwrap().parse().unwrap();
    assert!(after > 3000, "Retry-After {after}");
    let item = s
        .service
        .provisioner
        .store()
        .get(&uid("alice"))
        .await
        .unwrap()
        .unwrap();
    assert!(item
        .sleep_eligible_at
        .is_some_and(|t| t > agenthome::clock::now_ms() + 3_000_000));
    assert_eq!(item.power, agenthome::store::Power::Awake);
    // AND the request is pending, due when the window ends, for the sweep
    let pending = item.pending_sleep.expect("a pending sleep");
    assert_eq!(Some(pending.at), item.sleep_eligible_at);
    assert_eq!(body["sleep_eligible_at_ms"].as_u64(), Some(pending.at));
    assert_eq!(pending.reason, agenthome::store::SleepReason::Requested);
}

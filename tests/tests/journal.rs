//! The lifecycle journal against the emulator and the DynamoDB-compatible
//! server: a scripted day of one user lists every transition with its
//! reason (newest first, paged), the awake-time summary of `GET …/machine`,
//! and `GET …/machine/events` refusing bad queries with 422.

use agenthome::journal::{DynamoJournal, Event, Journal, JournalBackend, JournalEntry};
use agenthome::sweep::SweepSettings;
use agenthome::turn::TurnSettings;
use agenthome_tests::fixtures::done;
use agenthome_tests::stack::jwt;
use agenthome_tests::stack::{Stack, StackOptions};
use agenthome_tests::uid;
use agenthome_tests::{unique_table_name, Moto};
use serde_json::{json, Value};
use std::time::Duration;

/// Every journal entry of `user`, newest first, through the route.
async fn events(s: &Stack, user: &str, query: &str) -> (u16, Value) {
    s.machine_call(
        "GET",
        &format!("/v1/users/{user}/machine/events"),
        query,
        jwt(user),
    )
    .await
}

/// (event, reason) of each entry.
fn kinds(page: &Value) -> Vec<(String, String)> {
    page["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| {
            (
                e["event"].as_str().unwrap_or_default().to_owned(),
                e["reason"].as_str().unwrap_or("-").to_owned(),
            )
        })
        .collect()
}

/// The page once it has `n` entries (the `woke` entry is written off the
/// turn's path, so it may land a moment after the turn's answer).
async fn events_when(s: &Stack, user: &str, n: usize) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, page) = events(s, user, "limit=100").await;
        assert_eq!(status, 200, "{page}");
        if page["events"].as_array().map_or(0, Vec::len) >= n
            || tokio::time::Instant::now() > deadline
        {
            return page;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_scripted_day_lists_every_transition_with_its_reason() {
    // GIVEN a stack whose commands time out after 2 s and hold the machine 3 s at most
    let s = Stack::start_with(StackOptions {
        settings: TurnSettings {
            command_timeout: Duration::from_secs(2),
            max_hold: Duration::from_secs(3),
            ..TurnSettings::default()
        },
        ..StackOptions::default()
    })
    .await;
    // WHEN alice's day runs: created by her first message, a turn,
    let machine_id = s.ready_user("alice").await;
    done(&s.turn("alice", "echo hello").await);
    // an explicit sleep,
    let sleep = "/v1/users/alice/machine/sleep";
    let (status, body) = s.machine_call("POST", sleep, "", jwt("alice")).await;
    assert_eq!((status, &body["status"]), (200, &json!("asleep")), "{body}");
    // a turn that wakes the machine,
    done(&s.turn("alice", "echo back").await);
    // a sleep refused inside the platform's hold window,
    s.emu.configure(json!({"hold_window_ms": 1500})).await;
    let (status, body) = s.machine_call("POST", sleep, "", jwt("alice")).await;
    assert_eq!(
        (status, &body["status"]),
        (202, &json!("scheduled")),
        "{body}"
    );
    s.emu.configure(json!({"hold_window_ms": 0})).await;
    // a command left running (the machine is held),
    let held = done(&s.turn("alice", "sleep 600").await).clone();
    assert_eq!(held["steps"][0]["still_running"], true, "{held}");
    // an idle sleep once the hold expired,
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let sweeper = s.sweeper(SweepSettings {
        idle_after: Duration::ZERO,
        ..SweepSettings::default()
    });
    let report = sweeper
        .run(
            agenthome::clock::now_ms(),
            tokio::time::Instant::now() + Duration::from_secs(30),
        )
        .await;
    assert_eq!(report.slept, 1, "{report:?}");
    // a turn that wakes it again,
    done(&s.turn("alice", "echo again").await);
    let (status, status_body) = s
        .machine_call("GET", "/v1/users/alice/machine", "", jwt("alice"))
        .await;
    assert_eq!(status, 200, "{status_body}");
    // and the account's deletion
    let (status, _) = s
        .machine_call("DELETE", "/v1/users/alice/machine", "", jwt("alice"))
        .await;
    assert_eq!(status, 204);

    // THEN the journal lists every transition, newest first, with its reason
    let page = events_when(&s, "alice", 8).await;
    let expected = [
        ("destroyed", "deleted"),
        ("woke", "turn"),
        ("slept", "idle"),
        ("held", "-"),
        ("sleep_refused", "explicit"),
        ("woke", "turn"),
        ("slept", "explicit"),
        ("provisioned", "created"),
    ];
    let got = kinds(&page);
    assert_eq!(
        got,
        expected
            .iter()
            .map(|(e, r)| (e.to_string(), r.to_string()))
            .collect::<Vec<_>>(),
        "{page:#}"
    );
    assert_eq!(page["next_cursor"], Value::Null);
    let e = page["events"].as_array().unwrap();
    let at: Vec<u64> = e.iter().map(|x| x["at_ms"].as_u64().unwrap()).collect();
    assert!(at.windows(2).all(|w| w[0] >= w[1]), "newest first: {at:?}");
    // AND each carries its facts and actor
    assert_eq!(e[7]["actor"], "worker");
    assert_eq!(e[7]["machine_id"], json!(machine_id));
    assert!(e[7]["duration_ms"].as_u64().is_some());
    assert_eq!(e[6]["actor"], "route");
    assert!(e[6]["awake_ms"].as_u64().unwrap() > 0, "{}", e[6]);
    assert_eq!(e[5]["actor"], "turn");
    assert!(
        e[5]["duration_ms"].as_u64().is_some(),
        "wake time: {}",
        e[5]
    );
    assert!(e[5]["slept_ms"].as_u64().is_some(), "{}", e[5]);
    assert!(e[4]["until_ms"].as_u64().unwrap() > e[4]["at_ms"].as_u64().unwrap());
    assert_eq!(e[3]["command"], "sleep 600");
    assert!(e[3]["until_ms"].as_u64().is_some());
    assert_eq!(e[2]["actor"], "sweep");
    assert!(e[2]["idle_ms"].as_u64().is_some(), "{}", e[2]);
    assert!(e[2]["awake_ms"].as_u64().unwrap() >= 3000, "{}", e[2]);
    assert_eq!(e[1]["interrupted"], json!(["sleep 600"]), "{}", e[1]);
    assert_eq!(e[0]["actor"], "route");
    let total = e[0]["awake_ms_total"].as_u64().unwrap();
    assert!(total >= e[2]["awake_ms"].as_u64().unwrap() + e[6]["awake_ms"].as_u64().unwrap());
    // AND GET …/machine summed today's awake time from it
    let days = status_body["awake_days"].as_array().expect("awake_days");
    assert_eq!(days.len(), 7);
    let today = days.last().unwrap()["awake_ms"].as_u64().unwrap()
        + days[days.len() - 2]["awake_ms"].as_u64().unwrap();
    assert!(today >= e[2]["awake_ms"].as_u64().unwrap(), "{status_body}");

    // AND pages of 3 walk the same list with the cursor
    let mut seen = Vec::new();
    let mut query = "limit=3".to_string();
    loop {
        let (status, page) = events(&s, "alice", &query).await;
        assert_eq!(status, 200, "{page}");
        let batch = page["events"].as_array().unwrap().clone();
        assert!(batch.len() <= 3);
        seen.extend(batch.iter().map(|x| x["id"].clone()));
        match page["next_cursor"].as_str() {
            Some(c) => query = format!("limit=3&cursor={}", c.replace('#', "%23")),
            None => break,
        }
    }
    let all: Vec<Value> = e.iter().map(|x| x["id"].clone()).collect();
    assert_eq!(seen, all);
    // AND since keeps only the newer entries
    let since = at[3];
    let (_, newer) = events(&s, "alice", &format!("since={since}")).await;
    assert_eq!(newer["events"].as_array().unwrap().len(), 4, "{newer}");
}

#[tokio::test]
async fn bad_since_limit_and_cursor_are_422_problems() {
    let s = Stack::start().await;
    for query in [
        "limit=0",
        "limit=1000",
        "limit=ten",
        "since=last-week",
        "cursor=%27%20OR%201%3D1",
        "limit=1&limit=2",
        "page=2",
    ] {
        let (status, body) = events(&s, "alice", query).await;
        assert_eq!(status, 422, "{query}: {body}");
        assert_eq!(body["code"], "invalid_query", "{query}: {body}");
    }
    // A user without any entry gets an empty last page.
    let (status, body) = events(&s, "alice", "since=2026-01-01T00:00:00Z").await;
    assert_eq!(status, 200);
    assert_eq!(body, json!({"events": [], "next_cursor": null}));
    // And nobody reads another user's journal.
    let (status, _) = s
        .machine_call("GET", "/v1/users/bob/machine/events", "", jwt("alice"))
        .await;
    assert_eq!(status, 403);
}

#[tokio::test]
async fn the_dynamodb_adapter_pages_newest_first_and_expires_entries() {
    // GIVEN the journal table on the DynamoDB-compatible server
    let moto = Moto::shared().await;
    let client = moto.dynamodb_client().await;
    let table = unique_table_name("journal");
    agenthome::journal::table::create_table(&client, &table)
        .await
        .expect("create");
    // (twice is fine)
    agenthome::journal::table::create_table(&client, &table)
        .await
        .expect("create again");
    let backend = DynamoJournal::new(client.clone(), table.clone());
    let journal = Journal::new(
        std::sync::Arc::new(backend.clone()),
        Duration::from_secs(86_400),
    );
    // WHEN entries of two users are recorded
    for at in [1_000u64, 2_000, 3_000] {
        journal
            .record(
                &uid("u1"),
                JournalEntry::new(at, Event::Woke, agenthome::journal::Actor::Turn),
            )
            .await;
    }
    journal
        .record(
            &uid("u2"),
            JournalEntry::new(4_000, Event::Slept, agenthome::journal::Actor::Sweep),
        )
        .await;
    // THEN a page is the user's, newest first, with a cursor to the rest
    let q = agenthome::journal::PageQuery {
        since_ms: None,
        limit: 2,
        cursor: None,
    };
    let first = backend.page(&uid("u1"), &q).await.expect("page");
    let at: Vec<u64> = first.events.iter().map(|e| e.at_ms).collect();
    assert_eq!(at, [3_000, 2_000]);
    let rest = backend
        .page(
            &uid("u1"),
            &agenthome::journal::PageQuery {
                cursor: first.next_cursor.clone(),
                ..q.clone()
            },
        )
        .await
        .expect("page");
    assert_eq!(
        rest.events.iter().map(|e| e.at_ms).collect::<Vec<_>>(),
        [1_000]
    );
    // AND each item carries its TTL, the entry's time plus the TTL
    let item = client
        .get_item()
        .table_name(&table)
        .key(
            "user_id",
            aws_sdk_dynamodb::types::AttributeValue::S("u1".into()),
        )
        .key(
            "id",
            aws_sdk_dynamodb::types::AttributeValue::S(first.events[0].id.clone()),
        )
        .send()
        .await
        .expect("get")
        .item
        .expect("item");
    assert_eq!(
        item.get("expires_at"),
        Some(&aws_sdk_dynamodb::types::AttributeValue::N(
            (3 + 86_400).to_string()
        ))
    );
    let ttl = client
        .describe_time_to_live()
        .table_name(&table)
        .send()
        .await
        .expect("describe ttl");
    assert_eq!(
        ttl.time_to_live_description()
            .and_then(|d| d.attribute_name()),
        Some("expires_at")
    );
}

#[tokio::test]
async fn a_sleep_the_platform_did_on_its_own_is_journaled_when_reconciliation_finds_it() {
    // GIVEN a ready machine that the platform put to sleep behind the table's back
    let s = Stack::start().await;
    let machine_id = s.ready_user("alice").await;
    s.sleep_machine(&machine_id).await;
    // WHEN reconciliation runs
    let report = s
        .sweeper(SweepSettings::default())
        .reconcile(
            agenthome::clock::now_ms(),
            tokio::time::Instant::now() + Duration::from_secs(30),
        )
        .await;
    assert_eq!(report.fixed, 1, "{report:?}");
    // THEN the journal says the platform slept it, and the awake time it had
    let page = events_when(&s, "alice", 2).await;
    assert_eq!(
        kinds(&page)[0],
        ("slept".to_owned(), "platform_autosleep".to_owned()),
        "{page:#}"
    );
    let slept = &page["events"][0];
    assert_eq!(slept["actor"], "sweep");
    assert_eq!(slept["machine_id"], json!(machine_id));
    assert!(slept["awake_ms"].as_u64().is_some(), "{slept}");
}

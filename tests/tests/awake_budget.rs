//! Per-user awake budget (`MAX_AWAKE_PER_DAY`): the turn that uses it up
//! completes, the machine is then put to sleep, and further turns get 429
//! `awake-budget-exhausted` with `Retry-After` until midnight UTC; other
//! users are unaffected. Real emulator, real DynamoDB-compatible server.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use agenthome::store::{Power, UserStore};
use agenthome_tests::stack::{Stack, StackOptions};
use agenthome_tests::uid;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_over_the_awake_budget_sleeps_and_gets_429_until_midnight() {
    let s = Stack::start_with(StackOptions {
        awake_per_day: Some(Duration::from_secs(3)),
        ..StackOptions::default()
    })
    .await;
    let machine = s.ready_user("alice").await;
    // The turn that uses the budget up runs to its end ...
    let r = s.turn("alice", "sleep 3.2; echo done").await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        r.body["steps"][0]["output"].as_str().unwrap().trim(),
        "done"
    );
    // ... then the machine is put to sleep
    let item = s.item("alice").await;
    assert_eq!(item.power, Power::Asleep, "{item:?}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    s.emu
        .client()
        .wait_until(&machine, agenthome::dedalus::Phase::Sleeping, deadline)
        .await
        .expect("the machine goes to sleep");
    assert!(item.awake_day.is_some(), "the day's baseline was recorded");
    // ... and the journal says the budget put it to sleep
    let page = s
        .journal
        .page(
            &uid("alice"),
            &agenthome::journal::PageQuery {
                since_ms: None,
                limit: 10,
                cursor: None,
            },
        )
        .await
        .unwrap();
    let slept = page
        .events
        .iter()
        .find(|e| e.event == agenthome::journal::Event::Slept)
        .expect("a slept entry");
    assert_eq!(slept.reason, Some(agenthome::journal::Reason::Budget));
    // ... and further turns are refused until midnight UTC
    let r = s.turn("alice", "echo again").await;
    assert_eq!(r.status, 429, "{}", r.text);
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    assert!(r.body["type"]
        .as_str()
        .unwrap()
        .ends_with("/awake-budget-exhausted"));
    let after: u64 = r.header("retry-after").unwrap().parse().unwrap();
    let to_midnight = 86_400 - (agenthome::clock::now_ms() / 1000) % 86_400;
    assert!(after.abs_diff(to_midnight) <= 2, "{after} vs {to_midnight}");
    assert_eq!(s.item("alice").await.power, Power::Asleep, "not woken");
    // Another user is unaffected.
    s.ready_user("bob").await;
    let r = s.turn("bob", "echo hi").await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(s.store.get(&uid("bob")).await.unwrap().unwrap().power == Power::Awake);
}

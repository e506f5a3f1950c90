//! The chat-turn request's futures stay small, so awaiting one never nears
//! a test thread's 2 MiB stack.
//!
//! An awaited future lives inline in its caller's, up to the task or the
//! test that awaits it; and in a debug build every poll frame reserves room
//! for the futures its function awaits, so the stack a request needs grows
//! with the sizes all along its chain. Big leaf futures (an SDK call, a TLS
//! handshake) are boxed where they are made, once, so no caller carries
//! them. These guards measure the futures as built in this (debug) profile,
//! with the production store (DynamoDB); nothing runs (a future does nothing
//! until polled).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use agenthome::agent::Agent;
use agenthome::api::{AuthMode, TurnRequest};
use agenthome::dedalus::{ApiKey, Client, ClientConfig, Url};
use agenthome::provision::{Provisioner, QueueTrigger};
use agenthome::store::DynamoStore;
use agenthome::turn::{NoEvents, TurnService, TurnSettings};
use agenthome_tests::stack::{authorizer, provision_settings};
use agenthome_tests::uid;
use chat_turn_fn::ChatTurnService;

type Service = ChatTurnService<DynamoStore, QueueTrigger>;

/// The service as `main` builds it, over clients that point nowhere.
fn service() -> Service {
    let dynamo = aws_sdk_dynamodb::Client::from_conf(
        aws_sdk_dynamodb::Config::builder()
            .behavior_version(aws_sdk_dynamodb::config::BehaviorVersion::latest())
            .region(aws_sdk_dynamodb::config::Region::new("us-east-1"))
            .build(),
    );
    let store = DynamoStore::new(dynamo, "unused");
    let dedalus = Client::new(ClientConfig::new(
        Url::parse("http://127.0.0.1:9").expect("url"),
        ApiKey::new("unused"),
    ))
    .expect("client");
    let settings = provision_settings("30m", "true");
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let provisioner = Provisioner::new(store, dedalus, QueueTrigger(tx), settings);
    ChatTurnService {
        turns: TurnService::new(provisioner, Agent::shell(), TurnSettings::default()),
        auth: authorizer(AuthMode::Jwt),
        fair_use: agenthome::entry::FairUse::OFF,
        awake_budget: None,
        turn_deadline: Duration::from_secs(60),
        margin: Duration::from_secs(1),
        heartbeat: chat_turn_fn::HEARTBEAT,
        metrics: agenthome::metrics::Metrics::off(),
        first_turn: agenthome::entry::FirstTurn::new(Duration::ZERO),
    }
}

/// The size of `f`'s state machine (what an `.await` of it keeps inline).
fn size<F: std::future::Future>(f: &F) -> usize {
    std::mem::size_of_val(f)
}

/// Bound of the handler's futures (`handle`, `handle_streaming`): 8 KiB,
/// about twice their size now (4.0 and 4.9 KiB; 15.0 and 15.9 KiB before the
/// DynamoDB calls, the WebSocket handshake and the sweep's candidate step
/// were boxed where they are made).
const MAX_HANDLER_FUTURE: usize = 8 * 1024;

/// Bound of a turn's future (`TurnService::run`, which tests await
/// directly): 12 KiB, half again its size now (8.0 KiB; 16.8 KiB before).
const MAX_TURN_FUTURE: usize = 12 * 1024;

#[tokio::test]
async fn the_handlers_futures_stay_small() {
    let s = Arc::new(service());
    let req = lambda_http::Request::default();
    let json = size(&s.handle(&req));
    let streaming = size(&Arc::clone(&s).handle_streaming(req.clone()));
    eprintln!("handle: {json} bytes, handle_streaming: {streaming} bytes");
    assert!(
        json <= MAX_HANDLER_FUTURE,
        "handle's future is {json} bytes (bound {MAX_HANDLER_FUTURE}): box the step that grew it where it is made"
    );
    assert!(
        streaming <= MAX_HANDLER_FUTURE,
        "handle_streaming's future is {streaming} bytes (bound {MAX_HANDLER_FUTURE}): box the step that grew it where it is made"
    );
}

#[tokio::test]
async fn a_turns_future_stays_small() {
    let s = service();
    let request = TurnRequest::from_json(br#"{"message":"hi"}"#).expect("request");
    let deadline = tokio::time::Instant::now();
    let user = uid("u");
    let turn = size(&s.turns.run(&user, request.clone(), deadline));
    let counted = size(&s.turns.run_counted(&user, request, deadline, &NoEvents, 0));
    eprintln!("TurnService::run: {turn} bytes, run_counted: {counted} bytes");
    assert!(
        turn.max(counted) <= MAX_TURN_FUTURE,
        "a turn's future is {} bytes (bound {MAX_TURN_FUTURE}): box the step that grew it where it is made",
        turn.max(counted)
    );
}

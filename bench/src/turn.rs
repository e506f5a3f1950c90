//! Benchmark 1: what agenthome adds to a turn.
//!
//! One user on a warm, running machine (emulator with zero injected
//! latency, table on the serialized `moto_server`). Each iteration runs, in
//! turn (interleaved, so drift hits all three alike):
//! - **full**: `POST /v1/users/{u}/turns {"message": "echo hi"}` as an API
//!   Gateway v2 event string, parsed and handled by the chat-turn
//!   function's `ChatTurnService` in-process (shell mode);
//! - **direct**: the same Dedalus calls the turn makes on a warm machine,
//!   made with the client and runner directly (status read, memory read,
//!   terminal reuse — status, busy check, WebSocket, shell setup line — the
//!   command, memory append);
//! - **minimal**: the least a client needs to run one command on a warm
//!   machine (status read, one execution).
//!
//! The table is wrapped in [`InstrumentedStore`] so the time spent in
//! DynamoDB (moto here) is reported separately.

use crate::stats::{ms, paired_diff, summarize, Summary};
use crate::store::{InstrumentedStore, Snapshot};
use agenthome::agent::Agent;
use agenthome::api::AuthMode;
use agenthome::dedalus::{self, ExecutionRequest, Phase};
use agenthome::provision::{
    Bootstrap, MachineSpec, ProvisionEvent, ProvisionSettings, Provisioner, QueueTrigger,
};
use agenthome::runner::{CommandRunner, TerminalRunner};
use agenthome::store::{create_table, DynamoStore, UserStore};
use agenthome::turn::{read_memory, TurnService, TurnSettings, TURNS_FILE};
use agenthome_tests::events::{http, Auth};
use agenthome_tests::{unique_table_name, Emulator, Moto};
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::time::Instant;

/// Emulator flags: no injected latency anywhere.
pub const ZERO_LATENCY: &[&str] = &[
    "--boot-delay",
    "0s",
    "--wake-delay",
    "0s",
    "--sleep-delay",
    "0s",
    "--destroy-delay",
    "0s",
    "--hold-window",
    "0s",
    "--hold-jitter",
    "0s",
];

/// The command every turn runs.
pub const COMMAND: &str = "echo hi";

type Store = InstrumentedStore<DynamoStore>;

/// The in-process turn stack.
pub struct TurnStack {
    /// The emulator.
    pub emu: Emulator,
    /// The instrumented table.
    pub store: Store,
    /// The chat-turn function's service.
    pub chat: chat_turn_fn::ChatTurnService<Store, QueueTrigger>,
    /// A Dedalus client for the direct calls (same config as the turn's).
    pub client: dedalus::Client,
    events: UnboundedReceiver<ProvisionEvent>,
}

/// Dedalus calls per iteration of one kind, by `METHOD path-shape`.
pub type CallCounts = BTreeMap<String, f64>;

/// Results of [`run`].
#[derive(Debug, Clone, Default)]
pub struct TurnResults {
    /// Timed iterations.
    pub turns: usize,
    /// Full turn through the handler (ms).
    pub full: Summary,
    /// The same Dedalus calls, direct (ms).
    pub direct: Summary,
    /// Minimal Dedalus calls (ms).
    pub minimal: Summary,
    /// Paired `full - direct` (ms).
    pub added: Summary,
    /// Time in the table per full turn (ms).
    pub store: Summary,
    /// Paired `full - direct - store` (ms): agenthome's own CPU/await time.
    pub added_without_store: Summary,
    /// Table calls per full turn.
    pub store_calls_per_turn: f64,
    /// Dedalus calls per full turn.
    pub calls_full: CallCounts,
    /// Dedalus calls per direct iteration.
    pub calls_direct: CallCounts,
    /// Dedalus calls per minimal iteration.
    pub calls_minimal: CallCounts,
    /// `VmHWM` of this process after setup (kB).
    pub hwm_after_setup_kb: u64,
    /// `VmHWM` of this process after all turns (kB).
    pub hwm_after_turns_kb: u64,
}

impl TurnStack {
    /// Start the emulator (zero latency), a fresh table on moto, and the
    /// services; provision one user and run one turn (opens the terminal).
    pub async fn start(user: &str) -> (TurnStack, String, String) {
        let emu = Emulator::start_with(ZERO_LATENCY).await;
        let moto = Moto::shared().await;
        let ddb = moto.dynamodb_client().await;
        let table = unique_table_name("bench");
        create_table(&ddb, &table).await.expect("create table");
        let store = InstrumentedStore::new(DynamoStore::new(ddb, table));
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let settings = ProvisionSettings::new(
            MachineSpec {
                vcpu: 1.0,
                memory_mib: 1024,
                storage_gib: 10,
                autosleep: "30m".into(),
            },
            Bootstrap::new(agenthome_tests::stack::BOOTSTRAP, None),
        );
        let provisioner = Provisioner::new(store.clone(), emu.client(), QueueTrigger(tx), settings);
        let turns = TurnService::new(
            provisioner,
            Agent::shell(),
            TurnSettings {
                command_timeout: Duration::from_secs(60),
                ..TurnSettings::default()
            },
        );
        let chat = chat_turn_fn::ChatTurnService {
            turns,
            auth: agenthome_tests::stack::authorizer(AuthMode::Jwt),
            fair_use: agenthome::entry::FairUse::OFF,
            awake_budget: None,
            turn_deadline: Duration::from_secs(60),
            margin: Duration::from_secs(2),
            heartbeat: chat_turn_fn::HEARTBEAT,
            metrics: agenthome::metrics::Metrics::off(),
        };
        let client = emu.client();
        let mut stack = TurnStack {
            emu,
            store,
            chat,
            client,
            events: rx,
        };
        let (status, body) = stack.turn(user).await;
        assert_eq!(status, 202, "a first message provisions: {body}");
        while let Ok(ev) = stack.events.try_recv() {
            stack
                .chat
                .turns
                .provisioner()
                .run_worker(&ev)
                .await
                .expect("provisioning worker");
        }
        let (status, body) = stack.turn(user).await;
        assert_eq!(status, 200, "a turn on the ready machine: {body}");
        let item = stack
            .store
            .get(user)
            .await
            .expect("table read")
            .expect("item");
        let machine_id = item.machine_id.expect("machine id");
        let terminal_id = item.terminal_id.expect("terminal id after a turn");
        (stack, machine_id, terminal_id)
    }

    /// One full turn: event string → handler → response. Returns status and body.
    pub async fn turn(&self, user: &str) -> (u16, String) {
        let path = format!("/v1/users/{user}/turns");
        let body = serde_json::json!({ "message": COMMAND }).to_string();
        let event = http(
            "POST",
            &path,
            Some(&body),
            Auth::Jwt {
                sub: user,
                scopes: &[],
            },
        )
        .to_string();
        let req = lambda_http::request::from_str(&event).expect("API Gateway v2 event");
        let resp = self.chat.handle(&req).await;
        let text = match resp.body() {
            lambda_http::Body::Text(t) => t.clone(),
            lambda_http::Body::Binary(b) => String::from_utf8_lossy(b).into_owned(),
            _ => String::new(),
        };
        (resp.status().as_u16(), text)
    }
}

/// The same Dedalus calls a turn makes on a warm machine, made directly.
pub async fn direct_turn(client: &dedalus::Client, machine_id: &str, terminal_id: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let c = client.with_deadline(deadline);
    let m = c.get_machine(machine_id).await.expect("get machine");
    assert_eq!(m.phase, Phase::Running, "the machine is warm");
    let memory = read_memory(&c, machine_id, 5).await;
    let (mut runner, _) = TerminalRunner::open(&c, machine_id, Some(terminal_id.to_string()))
        .await
        .expect("terminal");
    let out = runner
        .run(COMMAND, Duration::from_secs(60))
        .await
        .expect("command");
    assert_eq!(out.exit_code, Some(0));
    let line = serde_json::json!({"direct": true, "memory_lines": memory.len()}).to_string();
    let append = ExecutionRequest::new([
        "bash".to_string(),
        "-c".to_string(),
        format!("mkdir -p \"$HOME/.agenthome\" && cat >> \"$HOME/{TURNS_FILE}\""),
    ])
    .stdin(format!("{line}\n"))
    .timeout_ms(15_000);
    c.run_and_wait(machine_id, &append, deadline)
        .await
        .expect("append");
}

/// The least a client needs to run one command on a warm machine.
pub async fn minimal_turn(client: &dedalus::Client, machine_id: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let c = client.with_deadline(deadline);
    let m = c.get_machine(machine_id).await.expect("get machine");
    assert_eq!(m.phase, Phase::Running, "the machine is warm");
    let run = c
        .run_and_wait(machine_id, &ExecutionRequest::shell(COMMAND), deadline)
        .await
        .expect("execution");
    assert!(run.output.stdout.contains("hi"));
}

/// `METHOD /v1/machines/{id}/executions/{id}/output` style shape of a path.
fn shape(method: &str, path: &str) -> String {
    let parts: Vec<&str> = path.split('?').next().unwrap_or(path).split('/').collect();
    let mut out = Vec::with_capacity(parts.len());
    for (i, p) in parts.iter().enumerate() {
        let prev = if i > 0 { parts[i - 1] } else { "" };
        let id = matches!(prev, "machines" | "executions" | "terminals") && !p.is_empty();
        out.push(if id { "{id}" } else { p });
    }
    format!("{method} {}", out.join("/"))
}

async fn request_count(emu: &Emulator) -> usize {
    emu.requests().await.len()
}

async fn count_calls<F, Fut>(emu: &Emulator, reps: usize, mut f: F) -> CallCounts
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let before = request_count(emu).await;
    for _ in 0..reps {
        f().await;
    }
    let all = emu.requests().await;
    let mut counts = CallCounts::new();
    for r in all.iter().skip(before) {
        let key = shape(
            r["method"].as_str().unwrap_or("?"),
            r["path"].as_str().unwrap_or("?"),
        );
        *counts.entry(key).or_default() += 1.0 / reps as f64;
    }
    counts
}

/// Total calls in `counts`.
pub fn total(counts: &CallCounts) -> f64 {
    counts.values().sum()
}

/// Run `warmup` untimed and `turns` timed iterations.
pub async fn run(turns: usize, warmup: usize) -> TurnResults {
    let user = "bench-user";
    let (stack, machine_id, terminal_id) = TurnStack::start(user).await;
    let hwm_after_setup_kb = crate::stats::proc_status_kb("VmHWM").unwrap_or(0);
    let full_turn = || async {
        let (status, body) = stack.turn(user).await;
        assert_eq!(status, 200, "turn: {body}");
    };
    for _ in 0..warmup {
        full_turn().await;
        direct_turn(&stack.client, &machine_id, &terminal_id).await;
        minimal_turn(&stack.client, &machine_id).await;
    }
    // Call counts (untimed pass).
    let reps = 3;
    let calls_full = count_calls(&stack.emu, reps, full_turn).await;
    let calls_direct = count_calls(&stack.emu, reps, || {
        direct_turn(&stack.client, &machine_id, &terminal_id)
    })
    .await;
    let calls_minimal = count_calls(&stack.emu, reps, || {
        minimal_turn(&stack.client, &machine_id)
    })
    .await;

    let (mut full, mut direct, mut minimal, mut store_ms) = (vec![], vec![], vec![], vec![]);
    let mut store_total = Snapshot::default();
    for _ in 0..turns {
        let s0 = stack.store.snapshot();
        let t = Instant::now();
        full_turn().await;
        full.push(ms(t.elapsed()));
        let d = stack.store.snapshot().since(&s0);
        store_ms.push(d.ms());
        store_total.calls += d.calls;

        let t = Instant::now();
        direct_turn(&stack.client, &machine_id, &terminal_id).await;
        direct.push(ms(t.elapsed()));

        let t = Instant::now();
        minimal_turn(&stack.client, &machine_id).await;
        minimal.push(ms(t.elapsed()));
    }
    let added = paired_diff(&full, &direct);
    let added_without_store = paired_diff(&added, &store_ms);
    TurnResults {
        turns,
        full: summarize(&full),
        direct: summarize(&direct),
        minimal: summarize(&minimal),
        added: summarize(&added),
        store: summarize(&store_ms),
        added_without_store: summarize(&added_without_store),
        store_calls_per_turn: store_total.calls as f64 / turns.max(1) as f64,
        calls_full,
        calls_direct,
        calls_minimal,
        hwm_after_setup_kb,
        hwm_after_turns_kb: crate::stats::proc_status_kb("VmHWM").unwrap_or(0),
    }
}

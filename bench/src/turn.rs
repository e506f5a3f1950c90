//! Benchmark 1: what agenthome adds to a warm turn.
//!
//! Two users on warm, running machines (emulator with no boot/wake delays,
//! table on the serialized `moto_server`), each turn a `POST
//! /v1/users/{u}/turns` API Gateway v2 event handled by the chat-turn
//! function's `ChatTurnService` in-process:
//! - **shell**: shell mode, the message is the command (`echo hi`);
//! - **agent**: an LLM agent (a scripted model on loopback) that runs one
//!   tool call (`echo hi`) and answers;
//! - **floor**: the least any client needs for one command on a warm
//!   machine with an open terminal — one status read, then the command over
//!   a terminal opened once before the run, on a machine of its own.
//!
//! Each series is measured with an injected per-request latency on the
//! emulator (a fault rule delaying every `/v1` request, HTTP and WebSocket
//! connect alike, by 0, 20 or 50 ms; frames on an open WebSocket are not
//! delayed). Per turn the metric line gives the time to the first command
//! (`time_to_first_command_ms`), the Dedalus requests in all and before the
//! first command (the task-local tally); the table calls are counted by the
//! [`InstrumentedStore`] around the table (every call the handler makes,
//! the fair-use counter included).

use crate::stats::{ms, summarize, Summary};
use crate::store::InstrumentedStore;
use agenthome::agent::{Agent, AgentOptions, LlmClient, LlmConfig};
use agenthome::api::AuthMode;
use agenthome::config::Secret;
use agenthome::dedalus::{self, Phase};
use agenthome::entry::FairUse;
use agenthome::metrics::{Captured, Metrics, MetricsConfig};
use agenthome::provision::{
    Bootstrap, MachineSpec, ProvisionEvent, ProvisionSettings, Provisioner, QueueTrigger,
};
use agenthome::runner::{CommandRunner, TerminalRunner};
use agenthome::store::{create_table, DynamoStore, UserStore};
use agenthome::turn::{TurnService, TurnSettings};
use agenthome_tests::events::{http, Auth};
use agenthome_tests::llm::{answer, scripted_llm, tool_call, Script};
use agenthome_tests::{unique_table_name, Emulator, Moto};
use serde_json::{json, Value};
use std::time::Duration;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::time::Instant;

/// Emulator flags: no boot, wake or sleep delays.
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

/// The injected per-request latencies of the full run (ms).
pub const LATENCIES: &[u64] = &[0, 20, 50];

type Store = InstrumentedStore<DynamoStore>;
type Chat = chat_turn_fn::ChatTurnService<Store, QueueTrigger>;

const SHELL_USER: &str = "bench-shell";
const AGENT_USER: &str = "bench-agent";

/// The in-process turn stack: one emulator, one table, a shell-mode and an
/// agent-mode chat-turn service.
pub struct TurnStack {
    /// The emulator.
    pub emu: Emulator,
    /// The instrumented table.
    pub store: Store,
    shell: Chat,
    shell_lines: Captured,
    agent: Chat,
    agent_lines: Captured,
    script: Script,
    /// A Dedalus client (same config as the turn's).
    pub client: dedalus::Client,
    events: UnboundedReceiver<ProvisionEvent>,
}

/// One series at one latency: per-turn figures.
#[derive(Debug, Clone, Default)]
pub struct Series {
    /// Time to the first command (ms).
    pub first_command: Summary,
    /// The whole turn (ms).
    pub total: Summary,
    /// The whole turn less its time in the table (ms): what the turn
    /// costs where single-item table calls take a few ms, not moto's tens.
    pub total_without_table: Summary,
    /// Time in the table per turn (ms).
    pub table_ms: Summary,
    /// Table calls per turn (mean).
    pub table_calls: f64,
    /// Dedalus requests per turn (mean).
    pub dedalus: f64,
    /// Dedalus requests before the first command (mean).
    pub dedalus_before_first: f64,
    /// Most table calls any turn made.
    pub table_calls_max: u64,
    /// Most Dedalus requests any turn made.
    pub dedalus_max: u64,
    /// Most Dedalus requests any turn made before its first command.
    pub dedalus_before_first_max: u64,
}

/// The three series at one injected latency.
#[derive(Debug, Clone, Default)]
pub struct LatencyRow {
    /// Injected per-request latency (ms).
    pub latency_ms: u64,
    /// Shell-mode turns.
    pub shell: Series,
    /// Agent turns with one tool call.
    pub agent: Series,
    /// Status read + one command over an open terminal.
    pub floor: Series,
}

/// Results of [`run`].
#[derive(Debug, Clone, Default)]
pub struct TurnResults {
    /// Timed turns per series and latency.
    pub turns: usize,
    /// One row per latency.
    pub rows: Vec<LatencyRow>,
    /// `VmHWM` of this process after setup (kB).
    pub hwm_after_setup_kb: u64,
    /// `VmHWM` of this process after all turns (kB).
    pub hwm_after_turns_kb: u64,
}

/// What one measured turn cost.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    /// Time to the first command (ms).
    pub first_command_ms: f64,
    /// The whole turn (ms).
    pub total_ms: f64,
    /// Time in the table (ms).
    pub table_ms: f64,
    /// Table calls.
    pub table_calls: u64,
    /// Dedalus requests.
    pub dedalus: u64,
    /// Dedalus requests before the first command.
    pub dedalus_before_first: u64,
}

fn llm_agent(base_url: &str) -> Agent {
    let config = LlmConfig::new(
        dedalus::Url::parse(base_url).expect("LLM URL"),
        Some(Secret::new("sk-bench")),
        "bench-model",
    );
    Agent::llm(LlmClient::new(config).expect("LLM client")).with_options(AgentOptions {
        min_llm_time: Duration::from_millis(100),
        ..AgentOptions::default()
    })
}

fn chat(store: &Store, emu: &Emulator, tx: &QueueTrigger, agent: Agent) -> (Chat, Captured) {
    let settings = ProvisionSettings::new(
        MachineSpec {
            vcpu: 1.0,
            memory_mib: 1024,
            storage_gib: 10,
            autosleep: "30m".into(),
        },
        Bootstrap::new(agenthome_tests::stack::BOOTSTRAP, None),
    );
    let provisioner = Provisioner::new(store.clone(), emu.client(), tx.clone(), settings);
    let turns = TurnService::new(
        provisioner,
        agent,
        TurnSettings {
            command_timeout: Duration::from_secs(60),
            ..TurnSettings::default()
        },
    );
    let (metrics, lines) = Metrics::capture(MetricsConfig::default());
    let service = chat_turn_fn::ChatTurnService {
        turns,
        auth: agenthome_tests::stack::authorizer(AuthMode::Jwt),
        // Counted like in production (default 30), but never reached.
        fair_use: FairUse {
            turns_per_minute: 1_000_000,
            status_reads_per_minute: 0,
        },
        awake_budget: None,
        turn_deadline: Duration::from_secs(60),
        margin: Duration::from_secs(2),
        heartbeat: chat_turn_fn::HEARTBEAT,
        metrics,
        // Warm turns only: a turn never waits for provisioning here.
        first_turn: agenthome::entry::FirstTurn::new(Duration::ZERO),
    };
    (service, lines)
}

impl TurnStack {
    /// Start the emulator, a fresh table on moto and both services;
    /// provision both users and run one turn each (opens their terminals).
    /// Returns the stack and the shell user's machine.
    pub async fn start() -> (TurnStack, String) {
        let emu = Emulator::start_with(ZERO_LATENCY).await;
        let moto = Moto::shared().await;
        let ddb = moto.dynamodb_client().await;
        let table = unique_table_name("bench");
        create_table(&ddb, &table).await.expect("create table");
        let store = InstrumentedStore::new(DynamoStore::new(ddb, table));
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let trigger = QueueTrigger(tx);
        let (base, script) = scripted_llm(Vec::<(u16, Value)>::new()).await;
        let (shell, shell_lines) = chat(&store, &emu, &trigger, Agent::shell());
        let (agent, agent_lines) = chat(&store, &emu, &trigger, llm_agent(&base));
        let client = emu.client();
        let mut stack = TurnStack {
            emu,
            store,
            shell,
            shell_lines,
            agent,
            agent_lines,
            script,
            client,
            events: rx,
        };
        for user in [SHELL_USER, AGENT_USER] {
            let (status, body) = stack.post(&stack.shell, user).await;
            assert_eq!(status, 202, "a first message provisions: {body}");
        }
        while let Ok(ev) = stack.events.try_recv() {
            stack
                .shell
                .turns
                .provisioner()
                .run_worker(&ev)
                .await
                .expect("provisioning worker");
        }
        stack.shell_turn().await;
        stack.agent_turn().await;
        let item = stack
            .store
            .get(&agenthome_tests::uid(SHELL_USER))
            .await
            .expect("read")
            .expect("item");
        let machine_id = item.machine_id.expect("machine id");
        (stack, machine_id)
    }

    /// One request through `service`: event string → handler → response.
    async fn post(&self, service: &Chat, user: &str) -> (u16, String) {
        let path = format!("/v1/users/{user}/turns");
        let body = json!({ "message": COMMAND }).to_string();
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
        let resp = Box::pin(service.handle(&req)).await;
        let text = match resp.body() {
            lambda_http::Body::Text(t) => t.clone(),
            lambda_http::Body::Binary(b) => String::from_utf8_lossy(b).into_owned(),
            _ => String::new(),
        };
        (resp.status().as_u16(), text)
    }

    /// One measured turn through `service`; its metric line is the last of
    /// `lines`.
    async fn measured(&self, service: &Chat, lines: &Captured, user: &str) -> Sample {
        let before = self.store.snapshot();
        let (status, body) = self.post(service, user).await;
        assert_eq!(status, 200, "turn: {body}");
        let in_table = self.store.snapshot().since(&before);
        let logical = in_table.calls;
        let line: Value = lines
            .lines()
            .last()
            .and_then(|l| serde_json::from_str(l).ok())
            .expect("the turn's metric line");
        let num = |k: &str| line[k].as_f64().unwrap_or(0.0);
        // DynamoDB requests of the turn (the tally), or the store operations
        // the handler called (the decorator; includes any made outside the
        // tallied turn), whichever is more.
        let table_calls = logical.max(num("table_calls") as u64);
        Sample {
            first_command_ms: num("time_to_first_command_ms"),
            total_ms: num("turn_total_ms"),
            table_ms: in_table.ms(),
            table_calls,
            dedalus: num("dedalus_requests") as u64,
            dedalus_before_first: num("dedalus_requests_before_first_command") as u64,
        }
    }

    /// One shell-mode turn.
    pub async fn shell_turn(&self) -> Sample {
        self.measured(&self.shell, &self.shell_lines, SHELL_USER)
            .await
    }

    /// One agent turn with one tool call.
    pub async fn agent_turn(&self) -> Sample {
        self.script.push([
            tool_call("c1", json!({ "command": COMMAND })),
            answer("Done."),
        ]);
        self.measured(&self.agent, &self.agent_lines, AGENT_USER)
            .await
    }

    /// Every `/v1` request delayed by `ms` (none for 0).
    pub async fn set_latency(&self, ms: u64) {
        self.emu.clear_faults().await;
        if ms > 0 {
            self.emu
                .inject_fault(json!({"path": "/v1/**", "times": 0, "delay_ms": ms}))
                .await;
        }
    }
}

/// The floor: one status read, then one command over an open terminal.
async fn floor_turn(
    client: &dedalus::Client,
    machine_id: &str,
    runner: &mut TerminalRunner,
) -> Sample {
    let started = Instant::now();
    let m = client.get_machine(machine_id).await.expect("get machine");
    assert_eq!(m.phase, Phase::Running, "the machine is warm");
    let first_command_ms = ms(started.elapsed());
    let out = runner
        .run(COMMAND, Duration::from_secs(60))
        .await
        .expect("command");
    assert_eq!(out.exit_code, Some(0));
    // One status read; the command travels over the open WebSocket.
    Sample {
        first_command_ms,
        total_ms: ms(started.elapsed()),
        table_ms: 0.0,
        table_calls: 0,
        dedalus: 1,
        dedalus_before_first: 1,
    }
}

fn series(samples: &[Sample]) -> Series {
    let n = samples.len().max(1) as f64;
    let mean = |f: fn(&Sample) -> u64| samples.iter().map(f).sum::<u64>() as f64 / n;
    let max = |f: fn(&Sample) -> u64| samples.iter().map(f).max().unwrap_or(0);
    let first: Vec<f64> = samples.iter().map(|s| s.first_command_ms).collect();
    let total: Vec<f64> = samples.iter().map(|s| s.total_ms).collect();
    let table: Vec<f64> = samples.iter().map(|s| s.table_ms).collect();
    let net: Vec<f64> = samples.iter().map(|s| s.total_ms - s.table_ms).collect();
    Series {
        first_command: summarize(&first),
        total: summarize(&total),
        total_without_table: summarize(&net),
        table_ms: summarize(&table),
        table_calls: mean(|s| s.table_calls),
        dedalus: mean(|s| s.dedalus),
        dedalus_before_first: mean(|s| s.dedalus_before_first),
        table_calls_max: max(|s| s.table_calls),
        dedalus_max: max(|s| s.dedalus),
        dedalus_before_first_max: max(|s| s.dedalus_before_first),
    }
}

/// Run `warmup` untimed and `turns` timed rounds (shell, agent, floor
/// interleaved) at each of `latencies`.
pub async fn run(turns: usize, warmup: usize, latencies: &[u64]) -> TurnResults {
    let (stack, _) = TurnStack::start().await;
    // The floor has a machine of its own: on the shell user's machine its
    // shell and the turn's would take turns saving the shell state (each
    // finds the other saved last), which no single user's turns do.
    let machine_id = agenthome_tests::fixtures::running_machine(&stack.client)
        .await
        .machine_id;
    let (mut floor, _) = TerminalRunner::open(&stack.client, &machine_id, None)
        .await
        .expect("the floor's terminal");
    let hwm_after_setup_kb = crate::stats::proc_status_kb("VmHWM").unwrap_or(0);
    let mut rows = Vec::new();
    for &latency_ms in latencies {
        stack.set_latency(latency_ms).await;
        for _ in 0..warmup {
            stack.shell_turn().await;
            stack.agent_turn().await;
            floor_turn(&stack.client, &machine_id, &mut floor).await;
        }
        let (mut shell, mut agent, mut fl) = (vec![], vec![], vec![]);
        for _ in 0..turns {
            shell.push(stack.shell_turn().await);
            agent.push(stack.agent_turn().await);
            fl.push(floor_turn(&stack.client, &machine_id, &mut floor).await);
        }
        rows.push(LatencyRow {
            latency_ms,
            shell: series(&shell),
            agent: series(&agent),
            floor: series(&fl),
        });
    }
    stack.set_latency(0).await;
    TurnResults {
        turns,
        rows,
        hwm_after_setup_kb,
        hwm_after_turns_kb: crate::stats::proc_status_kb("VmHWM").unwrap_or(0),
    }
}

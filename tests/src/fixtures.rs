//! Set-ups the integration tests share: a small machine, created and
//! running on a fresh emulator; a command run on it to its end; sleep and
//! wake awaited; a terminal opened; the LLM agent for a scripted model; turn
//! stacks and a lease taken from a running turn.

use crate::uid;
use std::time::Duration;

use agenthome::agent::{Agent, AgentOptions, LlmClient, LlmConfig};
use agenthome::clock::now_ms;
use agenthome::config::Secret;
use agenthome::dedalus::{
    Client, CreateMachineRequest, CreateTerminalRequest, ExecutionRequest, IdempotencyKey, Machine,
    Phase, RunResult, Terminal, TerminalEvent, TerminalSession,
};
use agenthome::store::{AcquireOutcome, LeasePurpose, UserRecord, UserStore};
use agenthome::turn::TurnSettings;
use serde_json::Value;
use tokio::time::Instant;

use crate::stack::{Reply, Stack, StackOptions};
use crate::Emulator;

/// A small machine request (1 vCPU, 1 GiB, 10 GiB, no autosleep).
pub fn small() -> CreateMachineRequest {
    CreateMachineRequest {
        vcpu: 1.0,
        memory_mib: 1024,
        storage_gib: 10,
        autosleep: None,
    }
}

/// A deadline `secs` from now.
pub fn within(secs: u64) -> Instant {
    Instant::now() + Duration::from_secs(secs)
}

/// Creates the machine `req` (under `key`, if given) and waits (20 s at
/// most) until it runs.
pub async fn start_machine(
    client: &Client,
    req: &CreateMachineRequest,
    key: Option<&IdempotencyKey>,
) -> Machine {
    let m = client
        .create_machine(req, key)
        .await
        .expect("create machine");
    client
        .wait_until(&m.machine_id, Phase::Running, within(20))
        .await
        .expect("machine reaches running")
}

/// Creates a [`small`] machine and waits until it runs.
pub async fn running_machine(client: &Client) -> Machine {
    start_machine(client, &small(), None).await
}

/// A fresh emulator (with `flags`, see [`Emulator::start_with`]), a client
/// for it, and a running [`small`] machine.
pub async fn emulator_with_machine(flags: &[&str]) -> (Emulator, Client, Machine) {
    let emu = Emulator::start_with(flags).await;
    let client = emu.client();
    let m = running_machine(&client).await;
    (emu, client, m)
}

/// Runs `script` with the shell on `machine_id` to its end (10 s at most).
pub async fn run_shell(client: &Client, machine_id: &str, script: &str) -> RunResult {
    client
        .run_and_wait(machine_id, &ExecutionRequest::shell(script), within(10))
        .await
        .expect("run")
}

/// Puts machine `id` to sleep and waits (10 s at most) until it sleeps.
pub async fn sleep_and_wait(client: &Client, id: &str) -> Machine {
    client.sleep_machine(id, None, None).await.expect("sleep");
    client
        .wait_until(id, Phase::Sleeping, within(10))
        .await
        .expect("sleeping")
}

/// Wakes machine `id` and waits (10 s at most) until it runs.
pub async fn wake_and_wait(client: &Client, id: &str) -> Machine {
    client.wake_machine(id, None, None).await.expect("wake");
    client
        .wait_until(id, Phase::Running, within(10))
        .await
        .expect("running")
}

/// Creates an 80×24 terminal on machine `id`.
pub async fn terminal(client: &Client, id: &str) -> Terminal {
    client
        .create_terminal(id, &CreateTerminalRequest::new(80, 24), None)
        .await
        .expect("create terminal")
}

/// Connects to terminal `terminal_id` of machine `id`.
pub async fn connect(client: &Client, id: &str, terminal_id: &str) -> TerminalSession {
    client.connect(id, terminal_id).await.expect("connect")
}

/// The next terminal event that is not output (10 s at most).
pub async fn next_non_output(session: &mut TerminalSession) -> TerminalEvent {
    let next = async {
        loop {
            match session.next_event().await.expect("event") {
                TerminalEvent::Output(_) => continue,
                other => return other,
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), next)
        .await
        .expect("an event other than output in time")
}

/// Like [`emulator_with_machine`], with the machine's id.
pub async fn emulator_with_machine_id(flags: &[&str]) -> (Emulator, Client, String) {
    let (emu, client, m) = emulator_with_machine(flags).await;
    (emu, client, m.machine_id)
}

/// Polls `check` every 200 ms until it yields a value; panics with `what`
/// after `timeout`.
pub async fn poll_until<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A model API key for a test, unique, with a marker tests look for in
/// logs and bodies (it must never appear there).
pub fn secret_key() -> String {
    format!("sk-test-SECRET-{}", uuid::Uuid::now_v7().simple())
}

/// The LLM agent against the model server at `base_url` with `key`
/// (model `test-model`, at least 500 ms per model call).
pub fn llm_agent(base_url: &str, key: &str) -> Agent {
    let config = LlmConfig::new(
        agenthome::dedalus::Url::parse(base_url).expect("model base URL"),
        Some(Secret::new(key)),
        "test-model",
    );
    Agent::llm(LlmClient::new(config).expect("llm client")).with_options(AgentOptions {
        min_llm_time: Duration::from_millis(500),
        ..AgentOptions::default()
    })
}

/// A turn stack whose turns run `agent`.
pub async fn agent_stack(agent: Agent) -> Stack {
    Stack::start_with(StackOptions {
        agent,
        ..StackOptions::default()
    })
    .await
}

/// A turn stack with a short turn lease (1.5 s, renewed every 0.5 s) and
/// commands of up to 30 s.
pub async fn short_lease_stack() -> Stack {
    Stack::start_with(StackOptions {
        settings: TurnSettings {
            lease_ttl: Duration::from_millis(1500),
            command_timeout: Duration::from_secs(30),
            ..TurnSettings::default()
        },
        ..StackOptions::default()
    })
    .await
}

/// A turn stack whose commands time out after 1 s (a longer one is left
/// running and holds the machine).
pub async fn short_command_stack() -> Stack {
    Stack::start_with(StackOptions {
        settings: TurnSettings {
            command_timeout: Duration::from_secs(1),
            ..TurnSettings::default()
        },
        ..StackOptions::default()
    })
    .await
}

/// Another owner takes `user`'s lease, as if the turn's had expired (the
/// store decides liveness by the `now` it is given).
pub async fn steal_lease(s: &Stack, user: &str) {
    let later = now_ms() + 3_600_000;
    let taken = s
        .store
        .acquire_lease(
            &uid(user),
            "turn-intruder",
            LeasePurpose::Turn,
            later + 60_000,
            later,
        )
        .await
        .expect("acquire");
    assert!(
        matches!(taken, AcquireOutcome::Acquired(_)),
        "the intruder took the lease: {taken:?}"
    );
}

/// Waits until a command created `file` in the machine's home.
pub async fn wait_for_file(s: &Stack, machine_id: &str, file: &str) {
    let path = s.home(machine_id).join(file);
    let give_up = tokio::time::Instant::now() + Duration::from_secs(30);
    while !path.exists() {
        assert!(
            tokio::time::Instant::now() < give_up,
            "{file} never appeared"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The text of `file` in machine `machine_id`'s home once it has `lines`
/// lines (polled every 100 ms; panics with `what` after 20 s).
pub async fn wait_for_lines(
    s: &Stack,
    machine_id: &str,
    file: &str,
    lines: usize,
    what: &str,
) -> String {
    let path = s.home(machine_id).join(file);
    let give_up = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        if text.lines().count() >= lines {
            return text;
        }
        assert!(tokio::time::Instant::now() < give_up, "{what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `user`'s turn with `message`; once a command created `file` in
/// machine `machine_id`'s home, another owner takes the lease.
pub async fn turn_losing_lease(
    s: &Stack,
    user: &str,
    message: &str,
    machine_id: &str,
    file: &str,
) -> Reply {
    let turn = s.turn(user, message);
    let intruder = async {
        wait_for_file(s, machine_id, file).await;
        steal_lease(s, user).await;
    };
    let (r, ()) = tokio::join!(turn, intruder);
    r
}

/// A 200 turn result; panics with the body otherwise.
pub fn done(r: &Reply) -> &Value {
    assert_eq!(r.status, 200, "expected a turn result: {}", r.text);
    &r.body
}

/// The turn lease is gone (absent or expired).
pub fn assert_lease_released(item: &UserRecord) {
    assert!(
        item.live_lease(now_ms()).is_none(),
        "the turn lease is still live: {:?}",
        item.lease
    );
}

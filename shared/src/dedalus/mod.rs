//! Dedalus Machines API client.
//!
//! A typed async client of the Dedalus Cloud Services control plane
//! (`spec/machines-openapi.json` plus the newer-SDK changes in docs/compatibility.md):
//! machines ([`Client::create_machine`], [`Client::wake_machine`],
//! [`Client::wait_until`], …), executions ([`Client::run_and_wait`], …) and
//! terminals ([`Client::connect`] → [`TerminalSession`]).
//!
//! Every HTTP call goes through one place (`client.rs`) that applies the one
//! [`RetryPolicy`]: capped, jittered exponential backoff, server hints
//! (`retry-after-ms`, the body's `retry_after_ms`, `Retry-After`) preferred,
//! an overall deadline per call, and no retries of non-retryable errors.
//! Every POST/PATCH/DELETE carries an [`IdempotencyKey`], the same on every
//! retry; mutating methods take `Option<&IdempotencyKey>` so callers can
//! persist the key of an operation that must happen once.
//!
//! ```no_run
//! # async fn demo() -> agenthome::dedalus::Result<()> {
//! use agenthome::dedalus::*;
//! use std::time::Duration;
//! let config = ClientConfig::new(
//!     url::Url::parse("https://dcs.dedaluslabs.ai").expect("url"),
//!     ApiKey::new("dsk-…"),
//! );
//! let client = Client::new(config)?;
//! let key = IdempotencyKey::new(); // persist before the call
//! let req = CreateMachineRequest { vcpu: 1.0, memory_mib: 1024, storage_gib: 10, autosleep: Some("30m".into()) };
//! let machine = client.create_machine(&req, Some(&key)).await?;
//! let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
//! client.wait_until(&machine.machine_id, Phase::Running, deadline).await?;
//! let run = client
//!     .run_and_wait(&machine.machine_id, &ExecutionRequest::shell("echo hi"), deadline)
//!     .await?;
//! assert_eq!(run.output.stdout, "hi\n");
//! # Ok(()) }
//! ```

mod client;
mod config;
mod error;
mod executions;
mod idempotency;
mod machines;
mod retry;
mod terminals;
mod types;
mod watch;

pub use client::Client;
pub use config::{ApiKey, ClientConfig, DEFAULT_CONNECT_TIMEOUT, DEFAULT_REQUEST_TIMEOUT};
pub use error::{codes, ApiError, Error, Problem, Result};
pub use idempotency::{IdempotencyKey, InvalidIdempotencyKey};
pub use retry::{classify, server_hint, RetryDecision, RetryPolicy};
pub use terminals::{
    is_recoverable_close, terminal_stream_url, TerminalEvent, TerminalSession,
    RECOVERABLE_CLOSE_CODES,
};
pub use types::{
    CreateMachineRequest, CreateTerminalRequest, DesiredState, Execution, ExecutionEvent,
    ExecutionEventKind, ExecutionOutput, ExecutionRequest, ExecutionStatus, Machine, Page, Phase,
    RunResult, Terminal, TerminalStatus, UpdateMachineRequest,
};
/// Re-exported: [`ClientConfig::base_url`] is a `url::Url`.
pub use url::Url;

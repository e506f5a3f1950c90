//! agenthome: one persistent Dedalus Machine per chat user.
//!
//! Where things live (docs/design.md §1 has the full table):
//! - [`dedalus`]: the typed Dedalus Machines API client (machines, executions,
//!   terminals), its retry policy and idempotency keys.
//! - [`store`]: the user→machine DynamoDB table: typed item, conditional operations, adapters.
//! - [`api`]: the product's HTTP contract: auth, user ids, problem+json.
//! - [`provision`]: lazy, exactly-once provisioning and the bootstrap.
//! - [`clock`]: epoch-millisecond time as the table stores it.
//! - [`sweep`]: the sleep sweep (idle machines to sleep) and reconciliation.
//! - [`app`]: the clients each function builds once per cold start.
//! - [`entry`]: Lambda HTTP events ↔ the API contract (routes, auth, bodies, responses).
//! - [`machines`]: status reads (never wake) and destruction of a user's machine.
//! - [`metrics`]: one CloudWatch EMF line per turn, provisioning run and sweep run.
//! - [`turn`]: one chat turn: lease, wake, shell, agent, memory, bookkeeping.
//! - [`config`]: configuration from the environment, read once at cold start.
//! - [`runner`]: running commands on a machine (terminal or executions backend).
//! - [`agent`]: the agent loop: the LLM client, the `run_command` tool, limits.
//! - [`net`]: outbound HTTP hygiene (https outside loopback, no redirects).
//! - [`journal`]: the lifecycle journal (every transition, with reason and actor).
//! - [`hooks`]: the in-machine hooks `pre-sleep` and `post-wake`.

pub mod agent;
pub mod api;
pub mod app;
pub mod clock;
pub mod config;
pub mod dedalus;
pub mod entry;
pub mod env;
pub mod hooks;
pub mod journal;
pub mod metrics;
pub mod net;
pub mod provision;
pub mod runner;
pub mod store;
pub mod sweep;
pub mod text;
pub mod turn;
pub mod user_machine;

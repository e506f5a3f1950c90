//! agenthome: one persistent Dedalus Machine per chat user.
//!
//! Where things live (see DESIGN.md in the project docs):
//! - [`dedalus`]: the typed Dedalus Machines API client (machines, executions,
//!   terminals), its retry policy and idempotency keys.
//! - [`api`]: the product's HTTP contract: auth, user ids, problem+json.
//! - [`config`]: configuration from the environment, read once at cold start.

pub mod api;
pub mod config;
pub mod dedalus;

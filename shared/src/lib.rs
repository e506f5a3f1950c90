//! agenthome: one persistent Dedalus Machine per chat user.
//!
//! Where things live (see DESIGN.md in the project docs):
//! - [`dedalus`]: the typed Dedalus Machines API client (machines, executions,
//!   terminals), its retry policy and idempotency keys.
//! - [`store`]: the user→machine DynamoDB table: typed item, conditional operations, adapters.
//! - [`api`]: the product's HTTP contract: auth, user ids, problem+json.
//! - [`provision`]: lazy, exactly-once provisioning and the bootstrap.
//! - [`config`]: configuration from the environment, read once at cold start.

pub mod api;
pub mod config;
pub mod dedalus;
pub mod provision;
pub mod store;

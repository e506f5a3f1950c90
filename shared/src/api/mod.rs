//! The product's HTTP API contract (docs/design.md §3), independent of Lambda types:
//! who may call ([`auth`]), what a valid request is ([`user_id`], request
//! bodies), and how errors look ([`problem`]). The functions map API Gateway
//! events onto these and back.

pub mod auth;
pub mod jwt;
pub mod problem;
pub mod turn_request;
pub mod user_id;

pub use auth::{AccessPolicy, AuthMode, Caller};
pub use jwt::{JwtError, JwtSettings, JwtVerifier};
pub use problem::{Problem, ProblemCode, PROBLEM_JSON, RETRY_SOON};
pub use turn_request::{HistoryEntry, Role, TurnRequest};
pub use user_id::UserId;

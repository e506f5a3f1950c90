//! Helpers shared by the `client_*` integration tests.
#![allow(dead_code)]

use agenthome_tests::Emulator;
use serde_json::Value;

#[allow(unused_imports)]
pub use agenthome_tests::fixtures::{
    connect, emulator_with_machine, next_non_output, run_shell, running_machine, sleep_and_wait,
    small, start_machine, terminal, wake_and_wait, within,
};

/// The request-log entries for `method` on paths ending with `suffix`,
/// logged after sequence number `since`.
pub async fn logged(emu: &Emulator, since: u64, method: &str, suffix: &str) -> Vec<Value> {
    emu.requests()
        .await
        .into_iter()
        .filter(|r| r["seq"].as_u64().unwrap_or(0) > since)
        .filter(|r| r["method"].as_str() == Some(method))
        .filter(|r| r["path"].as_str().is_some_and(|p| p.ends_with(suffix)))
        .collect()
}

/// The last sequence number in the request log (0 when empty).
pub async fn last_seq(emu: &Emulator) -> u64 {
    emu.requests()
        .await
        .iter()
        .filter_map(|r| r["seq"].as_u64())
        .max()
        .unwrap_or(0)
}

/// The `idempotency_key` of each entry.
pub fn keys(entries: &[Value]) -> Vec<String> {
    entries
        .iter()
        .map(|r| r["idempotency_key"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// The `status` of each entry.
pub fn statuses(entries: &[Value]) -> Vec<u64> {
    entries
        .iter()
        .map(|r| r["status"].as_u64().unwrap_or(0))
        .collect()
}

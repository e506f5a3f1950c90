//! Retention: a ticker that removes ended executions and terminals,
//! destroyed machines and expired idempotency records (see
//! [`crate::state::State::prune`]), a bounded batch per tick.

use std::time::Duration;

use crate::server::AppRef;
use crate::util::now_ms;

/// How often the pruner runs.
const PRUNE_TICK: Duration = Duration::from_millis(500);
/// Most records removed per tick (keeps each lock hold short).
const PRUNE_BUDGET: usize = 500;

/// Starts the pruner.
pub fn spawn_pruner(app: AppRef) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(PRUNE_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let retention = app.retention();
            let removed = app.state().prune(now_ms(), &retention, PRUNE_BUDGET);
            if removed > 0 {
                tracing::debug!(removed, "pruned records");
                app.persist().await;
            }
        }
    });
}

//! The sleep-sweep function (docs/design.md §5 "Sleep sweep"): maps its
//! three events to `agenthome::sweep` and back. `main` only sets up tracing,
//! builds the clients once and runs this; tests drive it in-process.
//!
//! - A scheduled event (EventBridge, `events/sleep-sweep/schedule.json`;
//!   only its `time` is used, to decide whether this run reconciles;
//!   `{"reconcile": true}` in `detail` forces it): one
//!   [`Sweeper::run_scheduled`], which fans out to parallel workers when
//!   there are many candidates. Its summary (the workers' summed) is one
//!   CloudWatch Embedded Metric Format line on stdout.
//! - `{"sweep_worker": {...}}` ([`WorkerTask`]), sent by a coordinating run
//!   to this same function: sweep the task's shards and answer with the
//!   report (logged, not a metric line: the coordinator's line sums it).
//! - `{"migrate_awake_shards": {}}`: move awake items into the current shard
//!   layout after `AWAKE_SHARDS` changed (docs/operations.md); answers with
//!   the [`MigrationReport`]. Run it until it says `"complete": true`.

use std::time::Duration;

use agenthome::metrics::Metrics;
use agenthome::store::UserStore;
use agenthome::sweep::{MigrationReport, SweepReport, Sweeper, WorkerTask};
use serde_json::Value;

/// The key of a migration event.
pub const MIGRATE_EVENT_KEY: &str = "migrate_awake_shards";

/// A handler failure (the invocation fails; Lambda logs it).
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    /// A worker event that is not a well-formed [`WorkerTask`].
    #[error("malformed sweep_worker event: {0}")]
    MalformedTask(#[source] serde_json::Error),
    /// The report could not be encoded.
    #[error("cannot encode the report: {0}")]
    Encode(#[source] serde_json::Error),
}

/// Everything the handler needs, built once per cold start.
pub struct SleepSweepService<S> {
    /// The sweep (with its workers, when it may fan out).
    pub sweeper: Sweeper<S>,
    /// Where each run's metric line goes.
    pub metrics: Metrics,
}

/// One incoming event.
pub enum Incoming {
    /// The schedule (or a manual run).
    Scheduled {
        /// The event's `time`, epoch ms.
        event_time_ms: Option<u64>,
        /// `detail.reconcile`.
        force_reconcile: bool,
    },
    /// A coordinating run's worker task.
    Worker(WorkerTask),
    /// The shard migration.
    Migrate,
}

/// Tell the events apart.
pub fn classify(event: &Value) -> Result<Incoming, HandleError> {
    if let Some(task) = WorkerTask::from_event(event) {
        return task
            .map(Incoming::Worker)
            .map_err(HandleError::MalformedTask);
    }
    if event.get(MIGRATE_EVENT_KEY).is_some() {
        return Ok(Incoming::Migrate);
    }
    Ok(Incoming::Scheduled {
        event_time_ms: event_time(event),
        force_reconcile: event
            .pointer("/detail/reconcile")
            .and_then(Value::as_bool)
            .unwrap_or(false),
    })
}

impl<S: UserStore + 'static> SleepSweepService<S> {
    /// Handle one event; `lambda_deadline_ms` is the invocation's deadline.
    pub async fn handle(
        &self,
        event: Value,
        lambda_deadline_ms: u64,
    ) -> Result<Value, HandleError> {
        let now_ms = agenthome::clock::now_ms();
        let deadline = run_deadline(lambda_deadline_ms, now_ms, self.sweeper.settings().margin);
        match classify(&event)? {
            Incoming::Scheduled {
                event_time_ms,
                force_reconcile,
            } => {
                let report = self
                    .scheduled(event_time_ms, now_ms, deadline, force_reconcile)
                    .await;
                serde_json::to_value(report).map_err(HandleError::Encode)
            }
            Incoming::Worker(task) => {
                let deadline = deadline.min(task.deadline(now_ms));
                let report: SweepReport = self.sweeper.run_worker(&task, deadline).await;
                serde_json::to_value(report).map_err(HandleError::Encode)
            }
            Incoming::Migrate => {
                let report: MigrationReport = self.sweeper.migrate_shards(deadline).await;
                serde_json::to_value(report).map_err(HandleError::Encode)
            }
        }
    }

    async fn scheduled(
        &self,
        event_time_ms: Option<u64>,
        now_ms: u64,
        deadline: tokio::time::Instant,
        force: bool,
    ) -> SweepReport {
        let report = self
            .sweeper
            .run_scheduled(event_time_ms.unwrap_or(now_ms), now_ms, deadline, force)
            .await;
        // One summary line per run, in Embedded Metric Format, on stdout.
        self.metrics
            .emit(&report.emf_doc(self.metrics.config(), now_ms));
        report
    }
}

/// The event's `time` (RFC 3339) as epoch ms.
pub fn event_time(payload: &Value) -> Option<u64> {
    let raw = payload.get("time")?.as_str()?;
    let t = humantime::parse_rfc3339_weak(raw).ok()?;
    let d = t.duration_since(std::time::UNIX_EPOCH).ok()?;
    u64::try_from(d.as_millis()).ok()
}

/// The Lambda deadline (epoch ms) minus the margin, as a monotonic instant.
/// The margin never takes more than a third of the time left, so a short
/// function timeout still leaves the sweep most of it.
/// A deadline the runtime did not really give (see
/// [`agenthome::entry::remaining`]) leaves the sweep `FALLBACK_RUN` to work.
pub fn run_deadline(
    lambda_deadline_ms: u64,
    now_ms: u64,
    margin: Duration,
) -> tokio::time::Instant {
    const FALLBACK_RUN: Duration = Duration::from_secs(50);
    let left = agenthome::entry::remaining(lambda_deadline_ms, now_ms).unwrap_or(FALLBACK_RUN);
    tokio::time::Instant::now() + left.saturating_sub(margin.min(left / 3))
}

#[cfg(test)]
mod tests {
    use super::*;
    use agenthome::sweep::SweepSettings;

    #[test]
    fn given_the_fixture_event_when_read_then_its_time_is_used() {
        let raw = include_str!("../../../events/sleep-sweep/schedule.json");
        let event: Value = serde_json::from_str(raw).expect("fixture is JSON");
        assert_eq!(event["detail-type"], "Scheduled Event");
        assert_eq!(event_time(&event), Some(1_777_896_000_000));
        let settings = SweepSettings::default();
        // 12:00 UTC is minute 29631600 of the epoch: a multiple of 10.
        assert!(settings.reconcile_due(1_777_896_000_000));
        assert_eq!(event_time(&serde_json::json!({"time": "nope"})), None);
        assert!(matches!(
            classify(&event),
            Ok(Incoming::Scheduled {
                event_time_ms: Some(1_777_896_000_000),
                force_reconcile: false
            })
        ));
    }

    #[test]
    fn given_worker_and_migration_events_when_classified_then_each_is_recognised() {
        let task = WorkerTask {
            run_id: "r".into(),
            worker: 0,
            workers: 1,
            shards: vec!["0".into()],
            now_ms: 1,
            deadline_ms: 2,
            sleep_rate: 10.0,
        };
        assert!(matches!(classify(&task.to_event()), Ok(Incoming::Worker(t)) if t == task));
        assert!(matches!(
            classify(&serde_json::json!({"migrate_awake_shards": {}})),
            Ok(Incoming::Migrate)
        ));
        assert!(matches!(
            classify(&serde_json::json!({"sweep_worker": {"worker": "x"}})),
            Err(HandleError::MalformedTask(_))
        ));
    }

    #[test]
    fn given_a_lambda_deadline_when_computed_then_the_margin_is_kept() {
        let start = tokio::time::Instant::now();
        let d = run_deadline(1_000_060_000, 1_000_000_000, Duration::from_secs(10));
        let left = d.duration_since(start);
        assert!(
            left >= Duration::from_secs(50) && left < Duration::from_secs(51),
            "{left:?}"
        );
        // A short timeout: the margin shrinks to a third of the time left.
        let d = run_deadline(1_000_003_000, 1_000_000_000, Duration::from_secs(10));
        let left = d.duration_since(start);
        assert!(
            left >= Duration::from_secs(2) && left < Duration::from_millis(2100),
            "{left:?}"
        );
        // No time left: the deadline is now.
        let d = run_deadline(1_000_000_000, 1_000_000_000, Duration::from_secs(10));
        assert!(d.duration_since(start) < Duration::from_millis(100));
        // `cargo lambda watch` sends the timeout, not a deadline.
        let d = run_deadline(600_000, 1_795_867_058_000, Duration::from_secs(10));
        assert!(
            d.duration_since(start) >= Duration::from_secs(30),
            "{:?}",
            d.duration_since(start)
        );
    }
}

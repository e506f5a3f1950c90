//! `sleep-sweep` Lambda function (docs/design.md §5 "Sleep sweep"): on every
//! EventBridge schedule tick, put idle awake machines to sleep and, every
//! `RECONCILE_EVERY`th minute, reconcile the table with the machine list.
//!
//! Thin by design: read the configuration, build the DynamoDB and Dedalus
//! clients once per cold start, and hand each event to
//! [`agenthome::sweep::Sweeper::run_scheduled`]. The run's summary is printed
//! as one CloudWatch Embedded Metric Format line on stdout; everything else
//! is structured JSON tracing.
//!
//! The event is the scheduled event as EventBridge sends it
//! (`events/sleep-sweep/schedule.json`); only its `time` is used (to decide
//! whether this run reconciles). `{"reconcile": true}` in `detail` forces a
//! reconciliation (e.g. a manual `cargo lambda invoke`).

use std::sync::Arc;
use std::time::Duration;

use agenthome::app::App;
use agenthome::metrics::Metrics;
use agenthome::store::DynamoStore;
use agenthome::sweep::{SweepReport, SweepSettings, Sweeper};
use lambda_runtime::{service_fn, LambdaEvent};
use serde_json::Value;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    lambda_runtime::tracing::init_default_subscriber();
    let (sweeper, metrics) = match start().await {
        Ok((s, m)) => (Arc::new(s), Arc::new(m)),
        Err(error) => {
            tracing::error!(error = %error, "sleep-sweep cannot start");
            return Err(error);
        }
    };
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Value>| {
        let sweeper = Arc::clone(&sweeper);
        let metrics = Arc::clone(&metrics);
        async move { handle(&sweeper, &metrics, event).await }
    }))
    .await
}

/// Configuration and clients, once per cold start.
async fn start() -> Result<(Sweeper<DynamoStore>, Metrics), BoxError> {
    let settings = SweepSettings::from_env()?;
    let metrics = Metrics::from_env()?;
    let app = App::from_env().await?;
    tracing::info!(
        table = %app.config.table_name,
        idle_after_s = settings.idle_after.as_secs(),
        concurrency = settings.concurrency,
        reconcile_every = settings.reconcile_every,
        reconcile_sleep_orphans = settings.reconcile_sleep_orphans,
        reconcile_destroy_orphans = settings.reconcile_destroy_orphans,
        orphan_grace_s = settings.orphan_grace.as_secs(),
        margin_s = settings.margin.as_secs(),
        "sleep-sweep started"
    );
    Ok((
        Sweeper::new(Arc::new(app.store), &app.dedalus, settings)
            .with_journal(app.journal.clone(), app.config.hook_timeout),
        metrics,
    ))
}

async fn handle(
    sweeper: &Sweeper<DynamoStore>,
    metrics: &Metrics,
    event: LambdaEvent<Value>,
) -> Result<SweepReport, BoxError> {
    let now_ms = agenthome::clock::now_ms();
    let event_time_ms = event_time(&event.payload).unwrap_or(now_ms);
    let force = event
        .payload
        .pointer("/detail/reconcile")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let deadline = run_deadline(event.context.deadline, now_ms, sweeper.settings().margin);
    let report = sweeper
        .run_scheduled(event_time_ms, now_ms, deadline, force)
        .await;
    // One summary line per run, in Embedded Metric Format, on stdout.
    metrics.emit(&report.emf_doc(metrics.config(), now_ms));
    Ok(report)
}

/// The event's `time` (RFC 3339) as epoch ms.
fn event_time(payload: &Value) -> Option<u64> {
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
fn run_deadline(lambda_deadline_ms: u64, now_ms: u64, margin: Duration) -> tokio::time::Instant {
    const FALLBACK_RUN: Duration = Duration::from_secs(50);
    let left = agenthome::entry::remaining(lambda_deadline_ms, now_ms).unwrap_or(FALLBACK_RUN);
    tokio::time::Instant::now() + left.saturating_sub(margin.min(left / 3))
}

#[cfg(test)]
mod tests {
    use super::*;

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

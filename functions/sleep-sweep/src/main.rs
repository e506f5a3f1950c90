//! `sleep-sweep` Lambda: sets up tracing, builds the clients once, serves
//! [`sleep_sweep_fn::SleepSweepService`] (scheduled runs, their workers, the shard
//! migration).

use std::sync::Arc;

use agenthome::app::App;
use agenthome::metrics::Metrics;
use agenthome::sweep::{LambdaWorkers, SweepSettings};
use lambda_runtime::{service_fn, LambdaEvent};
use sleep_sweep_fn::SleepSweepService;

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    lambda_runtime::tracing::init_default_subscriber();
    let service = match start().await {
        Ok(service) => service,
        Err(error) => {
            tracing::error!(error = %error, "sleep-sweep cannot start");
            return Err(error);
        }
    };
    let service = &service;
    lambda_runtime::run(service_fn(
        move |event: LambdaEvent<serde_json::Value>| async move {
            service
                .handle(event.payload, event.context.deadline)
                .await
                .map_err(lambda_runtime::Error::from)
        },
    ))
    .await
}

/// Configuration and clients, once per cold start. With `SWEEP_FUNCTION`
/// (this function's own name) a scheduled run may fan out to workers.
async fn start() -> Result<SleepSweepService<agenthome::store::DynamoStore>, lambda_runtime::Error>
{
    let settings = SweepSettings::from_env()?;
    let metrics = Metrics::from_env()?;
    let app = App::from_env().await?;
    let workers = std::env::var("SWEEP_FUNCTION")
        .ok()
        .filter(|f| !f.trim().is_empty());
    tracing::info!(
        table = %app.config.table_name,
        idle_after_s = settings.idle_after.as_secs(),
        concurrency = settings.concurrency,
        reconcile_every = settings.reconcile_every,
        reconcile_sleep_orphans = settings.reconcile_sleep_orphans,
        reconcile_destroy_orphans = settings.reconcile_destroy_orphans,
        orphan_grace_s = settings.orphan_grace.as_secs(),
        margin_s = settings.margin.as_secs(),
        awake_shards = settings.shards.shards,
        awake_shards_previous = settings.shards.previous,
        workers = settings.workers,
        fanout_threshold = settings.fanout_threshold,
        sleep_rate = settings.sleep_rate,
        fan_out = workers.is_some(),
        "sleep-sweep started"
    );
    let mut sweeper = app.sweeper(settings);
    if let Some(function) = workers {
        let client = aws_sdk_lambda::Client::new(&app.aws);
        sweeper = sweeper.with_workers(Arc::new(LambdaWorkers::new(client, function)));
    }
    Ok(SleepSweepService { sweeper, metrics })
}

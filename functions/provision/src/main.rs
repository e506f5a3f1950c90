//! `provision` Lambda: sets up tracing, builds the clients once, serves.

use agenthome::app::App;
use agenthome::metrics::Metrics;
use agenthome::sweep::SweepSettings;
use lambda_runtime::{service_fn, LambdaEvent};
use provision_fn::ProvisionService;

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    lambda_runtime::tracing::init_default_subscriber();
    let app = App::from_env().await?;
    app.warn_if_open();
    let provisioner = app.provisioner().ok_or(
        "PROVISION_FUNCTION is required but not set (the function name or ARN of this function)",
    )?;
    let sweeper = app.sweeper(SweepSettings::from_env()?);
    let service = ProvisionService {
        provisioner,
        sweeper,
        auth: agenthome::entry::Authorizer::from_config(&app.config)?,
        fair_use: agenthome::entry::FairUse::from_config(&app.config),
        metrics: Metrics::from_env()?,
    };
    let service = &service;
    lambda_runtime::run(service_fn(
        move |event: LambdaEvent<serde_json::Value>| async move {
            service
                .handle_until(event.payload, Some(event.context.deadline))
                .await
        },
    ))
    .await
}

//! `chat-turn` Lambda: sets up tracing, builds the clients once, serves
//! buffered (`RESPONSE_MODE=buffered`, API Gateway) or streamed
//! (`RESPONSE_MODE=streaming`, a Function URL with response streaming).

use agenthome::agent::Agent;
use agenthome::app::App;
use agenthome::metrics::Metrics;
use agenthome::provision::LambdaTrigger;
use agenthome::store::DynamoStore;
use agenthome::turn::{TurnService, TurnSettings};
use chat_turn_fn::{ChatTurnService, HEARTBEAT};
use std::sync::Arc;
use std::time::Duration;

/// How the function answers (`RESPONSE_MODE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ResponseMode {
    /// Buffered responses (API Gateway HTTP API): JSON only.
    Buffered,
    /// Response streaming (a Function URL with `InvokeMode: RESPONSE_STREAM`):
    /// Server-Sent Events on `Accept: text/event-stream`, else JSON.
    Streaming,
}

fn response_mode() -> Result<ResponseMode, String> {
    match std::env::var("RESPONSE_MODE")
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
        .as_str()
    {
        "" | "buffered" => Ok(ResponseMode::Buffered),
        "streaming" | "stream" => Ok(ResponseMode::Streaming),
        other => Err(format!(
            "RESPONSE_MODE must be `buffered` or `streaming`, not {other:?}"
        )),
    }
}

/// The service as deployed: DynamoDB store, provisioning by Lambda invoke.
type Service = ChatTurnService<DynamoStore, LambdaTrigger>;

#[tokio::main]
async fn main() -> Result<(), lambda_http::Error> {
    lambda_http::tracing::init_default_subscriber();
    let mode = response_mode()?;
    let app = App::from_env().await?;
    app.warn_if_open();
    let service = service(&app)?;
    match mode {
        ResponseMode::Buffered => {
            let service = &service;
            lambda_http::run(lambda_http::service_fn(
                move |req: lambda_http::Request| async move {
                    Ok::<_, std::convert::Infallible>(service.handle(&req).await)
                },
            ))
            .await
        }
        ResponseMode::Streaming => {
            let service = Arc::new(service);
            lambda_http::run_with_streaming_response(lambda_http::service_fn(
                move |req: lambda_http::Request| {
                    let service = Arc::clone(&service);
                    // Boxed: the streaming handler's future is deep.
                    Box::pin(async move {
                        Ok::<_, std::convert::Infallible>(service.handle_streaming(req).await)
                    })
                },
            ))
            .await
        }
    }
}

/// Build the handler's service once, from the clients and configuration
/// of `app`.
fn service(app: &App) -> Result<Service, lambda_http::Error> {
    let provisioner = app.provisioner().ok_or(
        "PROVISION_FUNCTION is required but not set (the provision function's name or ARN)",
    )?;
    let agent = Agent::from_config(&app.config)?;
    let c = &app.config;
    let auth = agenthome::entry::Authorizer::from_config(c)?;
    let settings = TurnSettings {
        transport: c.agent_transport,
        max_steps: c.max_steps,
        command_timeout: c.command_timeout,
        max_hold: c.max_hold,
        sleep: agenthome::sweep::SweepSettings::from_env()?,
        hook_timeout: c.hook_timeout,
        ..TurnSettings::default()
    };
    Ok(ChatTurnService {
        turns: TurnService::new(provisioner, agent, settings),
        auth,
        fair_use: agenthome::entry::FairUse::from_config(c),
        awake_budget: awake_budget(app)?,
        turn_deadline: c.turn_deadline,
        margin: Duration::from_secs(2),
        heartbeat: HEARTBEAT,
        metrics: Metrics::from_env()?,
        first_turn: agenthome::entry::FirstTurn::from_env()?,
    })
}

/// The awake budget (`MAX_AWAKE_PER_DAY`), if set: it puts machines to
/// sleep through the sweep's sleep-now path.
fn awake_budget(
    app: &App,
) -> Result<Option<agenthome::entry::AwakeBudget<DynamoStore>>, lambda_http::Error> {
    let Some(per_day) = app.config.max_awake_per_day else {
        return Ok(None);
    };
    let sweeper = app.sweeper(agenthome::sweep::SweepSettings::from_env()?);
    Ok(Some(agenthome::entry::AwakeBudget { per_day, sweeper }))
}

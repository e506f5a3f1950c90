//! `chat-turn` Lambda: sets up tracing, builds the clients once, serves.

use agenthome::agent::Agent;
use agenthome::app::App;
use agenthome::turn::{TurnService, TurnSettings};
use chat_turn_fn::Service;
use std::time::Duration;

#[tokio::main]
async fn main() -> Result<(), lambda_http::Error> {
    lambda_http::tracing::init_default_subscriber();
    let app = App::from_env().await?;
    if app.config.auth_mode == agenthome::api::AuthMode::None {
        tracing::warn!(
            "AUTH_MODE=none: every caller may act for every user; use only for local runs"
        );
    }
    let provisioner = app.provisioner().ok_or(
        "PROVISION_FUNCTION is required but not set (the provision function's name or ARN)",
    )?;
    let agent = Agent::from_config(&app.config)?;
    let c = &app.config;
    let settings = TurnSettings {
        transport: c.agent_transport,
        max_steps: c.max_steps,
        command_timeout: c.command_timeout,
        max_hold: c.max_hold,
        ..TurnSettings::default()
    };
    let service = Service {
        turns: TurnService::new(provisioner, agent, settings),
        auth_mode: c.auth_mode,
        admin_scope: c.admin_scope.clone(),
        turn_deadline: c.turn_deadline,
        margin: Duration::from_secs(2),
    };
    let service = &service;
    lambda_http::run(lambda_http::service_fn(
        move |req: lambda_http::Request| async move {
            Ok::<_, std::convert::Infallible>(service.handle(&req).await)
        },
    ))
    .await
}

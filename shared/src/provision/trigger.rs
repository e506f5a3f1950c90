//! How the provisioning worker is started: the asynchronous provision event
//! and the adapters that deliver it.

use serde::{Deserialize, Serialize};

use crate::api::UserId;
use std::future::Future;

/// The event the provision function receives asynchronously.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProvisionEvent {
    /// The user to provision.
    pub user_id: UserId,
    /// The provisioning lease the trigger took for this worker, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_owner: Option<String>,
}

/// Boxed error of a trigger adapter.
pub type TriggerError = Box<dyn std::error::Error + Send + Sync>;

/// Starts the provisioning worker without waiting for it.
pub trait WorkerTrigger: Send + Sync {
    /// Deliver `event` to a worker.
    fn start(
        &self,
        event: &ProvisionEvent,
    ) -> impl Future<Output = Result<(), TriggerError>> + Send;
}

/// Invokes the provision Lambda function asynchronously
/// (`InvocationType=Event`; AWS answers 202 at once and retries failures).
///
/// `cargo lambda watch` runs an "async" invoke to the end before answering
/// (docs/design.md §8), so with `detach` the invoke is sent from a background task
/// and not awaited: right for a long-lived local process, wrong in AWS, where
/// a frozen sandbox may never send it.
#[derive(Clone, Debug)]
pub struct LambdaTrigger {
    client: aws_sdk_lambda::Client,
    function: String,
    detach: bool,
}

impl LambdaTrigger {
    /// Invoke `function` (name or ARN) with `client`; `detach` for local runs.
    pub fn new(client: aws_sdk_lambda::Client, function: impl Into<String>, detach: bool) -> Self {
        LambdaTrigger {
            client,
            function: function.into(),
            detach,
        }
    }

    async fn invoke(
        client: aws_sdk_lambda::Client,
        function: String,
        payload: Vec<u8>,
    ) -> Result<(), TriggerError> {
        let out = client
            .invoke()
            .function_name(function)
            .invocation_type(aws_sdk_lambda::types::InvocationType::Event)
            .payload(aws_sdk_lambda::primitives::Blob::new(payload))
            .send()
            .await
            .map_err(|e| Box::new(aws_sdk_lambda::Error::from(e)) as TriggerError)?;
        if let Some(err) = out.function_error() {
            return Err(format!("provision function reported {err}").into());
        }
        Ok(())
    }
}

impl WorkerTrigger for LambdaTrigger {
    async fn start(&self, event: &ProvisionEvent) -> Result<(), TriggerError> {
        let payload = serde_json::to_vec(event)?;
        let (client, function) = (self.client.clone(), self.function.clone());
        if self.detach {
            let user_id = event.user_id.clone();
            tokio::spawn(async move {
                if let Err(e) = Self::invoke(client, function, payload).await {
                    tracing::warn!(user_id = user_id.as_str(), error = %e, "detached provision invoke failed; the next trigger resumes");
                }
            });
            Ok(())
        } else {
            Self::invoke(client, function, payload).await
        }
    }
}

/// Hands events to an in-process queue: for embedding the worker in the same
/// process (tests, single-process deployments).
#[derive(Clone, Debug)]
pub struct QueueTrigger(pub tokio::sync::mpsc::UnboundedSender<ProvisionEvent>);

impl WorkerTrigger for QueueTrigger {
    async fn start(&self, event: &ProvisionEvent) -> Result<(), TriggerError> {
        self.0
            .send(event.clone())
            .map_err(|_| "the provisioning queue is closed".into())
    }
}

//! The executions backend: one execution per command, shell context carried
//! in files under `~/.agenthome/shell/`.

use std::time::Duration;

use tokio::time::Instant;

use super::output::OutputCollector;
use super::script;
use super::{millis, CommandOutcome, CommandRunner, RunnerError, RunnerOptions, Transport};
use crate::dedalus::{Client, ExecutionRequest, ExecutionStatus, IdempotencyKey};

/// Runs each command as one execution `bash -c <wrapper>`
/// ([`script::execution_wrapper`]): the wrapper restores the saved cwd and
/// exported variables, appends the command to `~/.bash_history`, runs it
/// with stdout and stderr merged (in order) and tee'd to the command's log,
/// then saves cwd and env and writes the completion marker.
///
/// The execution is created with a long API timeout
/// ([`RunnerOptions::detached_timeout`]) and waited for only up to the
/// command's own timeout: past it, the command keeps running and the
/// outcome reports `still_running` with its completion marker, as the
/// terminal backend does. Shell-local (non-exported) variables, functions
/// and aliases do not persist with this backend.
#[derive(Debug, Clone)]
pub struct ExecutionsRunner {
    client: Client,
    machine_id: String,
    options: RunnerOptions,
}

impl ExecutionsRunner {
    /// A runner on `machine_id` with default options.
    pub fn new(client: &Client, machine_id: &str) -> Self {
        Self::with_options(client, machine_id, RunnerOptions::default())
    }

    /// A runner with explicit options.
    pub fn with_options(client: &Client, machine_id: &str, options: RunnerOptions) -> Self {
        Self {
            client: client.clone(),
            machine_id: machine_id.to_owned(),
            options,
        }
    }
}

impl CommandRunner for ExecutionsRunner {
    async fn run(
        &mut self,
        command: &str,
        timeout: Duration,
    ) -> Result<CommandOutcome, RunnerError> {
        let id = script::new_command_id();
        let started_at = Instant::now();
        let deadline = started_at + timeout;
        let wrapper = script::execution_wrapper(&id, command);
        let api_timeout = self.options.detached_timeout.max(timeout);
        let request = ExecutionRequest::new(["bash", "-c", wrapper.as_str()])
            .cwd("/root")
            .timeout_ms(millis(api_timeout));
        // Creating must not be cut short by a tiny command timeout.
        let create_client = self
            .client
            .with_deadline(started_at + self.options.setup_timeout.max(timeout));
        let key = IdempotencyKey::new();
        let created = create_client
            .create_execution(&self.machine_id, &request, Some(&key))
            .await?;
        let execution_id = created.execution_id.clone();
        let execution = if created.status.is_terminal() {
            Ok(created)
        } else {
            self.client
                .wait_execution(&self.machine_id, &execution_id, deadline)
                .await
        };
        let (execution, still_running) = match execution {
            Ok(e) => (Some(e), false),
            Err(e) if e.is_deadline_exceeded() => (None, true),
            Err(e) => return Err(e.into()),
        };
        // Output so far (all of it when finished; partial while running).
        let out_client = self
            .client
            .with_deadline(Instant::now() + self.options.setup_timeout);
        let output = match out_client
            .execution_output(&self.machine_id, &execution_id)
            .await
        {
            Ok(o) => Some(o),
            Err(e) if still_running => {
                tracing::debug!(error = %e, "no partial output of a running execution");
                None
            }
            Err(e) => return Err(e.into()),
        };
        let mut collector = OutputCollector::new(self.options.output_limit);
        let mut reported_bytes = 0u64;
        let mut api_truncated = false;
        if let Some(o) = &output {
            collector.push(o.stdout.as_bytes());
            if !o.stderr.is_empty() {
                collector.push(b"\n[stderr]\n");
                collector.push(o.stderr.as_bytes());
            }
            reported_bytes = o.stdout_bytes.unwrap_or(0) + o.stderr_bytes.unwrap_or(0);
            api_truncated = o.stdout_truncated || o.stderr_truncated;
        }
        let mut exit_code = None;
        if let Some(exec) = &execution {
            exit_code = exec.exit_code.and_then(|c| i32::try_from(c).ok());
            if exit_code.is_none() {
                // Killed, cancelled, expired or never started: say why.
                let why = match (&exec.error_code, &exec.error_message, exec.signal) {
                    (_, Some(m), _) if !m.is_empty() => m.clone(),
                    (Some(c), _, _) => c.clone(),
                    (_, _, Some(sig)) => format!("killed by signal {sig}"),
                    _ => format!("execution {}", exec.status.as_str()),
                };
                collector.push(format!("\n[{why}]\n").as_bytes());
                if exec.status == ExecutionStatus::Expired {
                    tracing::info!(command_id = %id, "execution expired");
                }
            }
        }
        let collected = collector.snapshot();
        Ok(CommandOutcome {
            command: command.to_owned(),
            exit_code,
            output: collected.text,
            output_bytes: collected.total_bytes.max(reported_bytes),
            truncated: collected.truncated || api_truncated,
            duration_ms: millis(started_at.elapsed()),
            still_running,
            completion_marker: still_running.then(|| script::completion_marker(&id)),
        })
    }

    fn transport(&self) -> Transport {
        Transport::Executions
    }

    async fn reopen(&mut self) -> Result<(), RunnerError> {
        Ok(())
    }
}

//! The executions backend: one execution per command, shell context carried
//! in files under `~/.agenthome/shell/`.

use std::time::Duration;

use tokio::time::Instant;

use super::output::OutputCollector;
use super::script;
use super::{millis, CommandOutcome, CommandRunner, RunnerError, RunnerOptions, Transport};
use crate::dedalus::{
    Client, Execution, ExecutionOutput, ExecutionRequest, ExecutionStatus, IdempotencyKey,
};

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

impl ExecutionsRunner {
    /// Create the command's execution and wait for it up to `timeout`: its
    /// id, and the finished execution (`None`: still running).
    async fn start_and_wait(
        &self,
        id: &str,
        command: &str,
        timeout: Duration,
    ) -> Result<(String, Option<Execution>), RunnerError> {
        let started_at = Instant::now();
        let deadline = started_at + timeout;
        let wrapper = script::execution_wrapper(id, command);
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
        match execution {
            Ok(e) => Ok((execution_id, Some(e))),
            Err(e) if e.is_deadline_exceeded() => Ok((execution_id, None)),
            Err(e) => Err(e.into()),
        }
    }

    /// The output so far: all of it when finished; partial (or none, if it
    /// cannot be read) while running.
    async fn output_so_far(
        &self,
        execution_id: &str,
        still_running: bool,
    ) -> Result<Option<ExecutionOutput>, RunnerError> {
        let out_client = self
            .client
            .with_deadline(Instant::now() + self.options.setup_timeout);
        match out_client
            .execution_output(&self.machine_id, execution_id)
            .await
        {
            Ok(o) => Ok(Some(o)),
            Err(e) if still_running => {
                tracing::debug!(error = %e, "no partial output of a running execution");
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// Push stdout, then stderr under a `[stderr]` line, into `collector`: the
/// byte count the API reported and whether it truncated.
fn collect_output(
    collector: &mut OutputCollector,
    output: Option<&ExecutionOutput>,
) -> (u64, bool) {
    let Some(o) = output else {
        return (0, false);
    };
    collector.push(o.stdout.as_bytes());
    if !o.stderr.is_empty() {
        collector.push(b"\n[stderr]\n");
        collector.push(o.stderr.as_bytes());
    }
    (
        o.stdout_bytes.unwrap_or(0) + o.stderr_bytes.unwrap_or(0),
        o.stdout_truncated || o.stderr_truncated,
    )
}

/// The finished execution's exit code; without one (killed, cancelled,
/// expired or never started) the output says why.
fn exit_code_of(collector: &mut OutputCollector, exec: &Execution, id: &str) -> Option<i32> {
    let exit_code = exec.exit_code.and_then(|c| i32::try_from(c).ok());
    if exit_code.is_none() {
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
    exit_code
}

impl CommandRunner for ExecutionsRunner {
    async fn run(
        &mut self,
        command: &str,
        timeout: Duration,
    ) -> Result<CommandOutcome, RunnerError> {
        let id = script::new_command_id();
        let started_at = Instant::now();
        let (execution_id, execution) = self.start_and_wait(&id, command, timeout).await?;
        let still_running = execution.is_none();
        let output = self.output_so_far(&execution_id, still_running).await?;
        let mut collector = OutputCollector::new(self.options.output_limit);
        let (reported_bytes, api_truncated) = collect_output(&mut collector, output.as_ref());
        let exit_code = execution
            .as_ref()
            .and_then(|exec| exit_code_of(&mut collector, exec, &id));
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

//! Fan-out: a scheduled run with many idle candidates becomes a coordinator
//! that hands shard ranges to parallel sweep workers and sums their reports
//! into its one metric line.
//!
//! **When.** The coordinator reads one page of the first shard, of
//! `ceil(SWEEP_FANOUT_THRESHOLD / shards)` items. Users hash evenly over
//! shards, so a full page (a cursor follows) means about the threshold or
//! more candidates in all: fan out. Otherwise the coordinator sweeps every
//! shard itself, starting with the page it read (no item is read twice).
//! In a fanned-out run the first shard's worker reads that page again: at
//! most `threshold / shards` items, so items read per candidate stay ≈ 1.
//!
//! **How.** `min(SWEEP_WORKERS, shards)` workers get contiguous shard
//! ranges, `SWEEP_SLEEP_RATE / workers` sleep calls per second each, the
//! run's `now_ms` (one idle cutoff for all) and a deadline a little before
//! the coordinator's own. In AWS a worker is a synchronous invocation of the
//! same function ([`LambdaWorkers`], `InvocationType=RequestResponse`, all
//! sent at once): the coordinator needs each worker's report to sum, which
//! an `Event` invocation never returns, and the function already has the
//! table, the key and the code, so no Step Functions state machine (and its
//! per-transition cost and extra IAM) is needed. A worker that fails or does
//! not answer in time is counted in `workers_failed`; its shards wait for
//! the next run, and every sweep lease it took expires on its own
//! (`SWEEP_LEASE`). Reconciliation, when due, runs in the coordinator while
//! the workers sweep.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::time::Instant;

use super::{SweepReport, Sweeper};
use crate::store::{Page, UserRecord, UserStore};

/// The key of a worker event: `{"sweep_worker": WorkerTask}`.
pub const WORKER_EVENT_KEY: &str = "sweep_worker";

/// How long before the coordinator's deadline its workers stop, so their
/// reports arrive in time.
const WORKER_SLACK: Duration = Duration::from_secs(3);

/// One worker's share of a scheduled run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerTask {
    /// The coordinator's run id (for correlating log lines).
    pub run_id: String,
    /// This worker's number, `0..workers`.
    pub worker: u32,
    /// How many workers the run has.
    pub workers: u32,
    /// The awake shards this worker sweeps.
    pub shards: Vec<String>,
    /// The run's start (epoch ms): the idle cutoff is `now_ms − IDLE_AFTER`.
    pub now_ms: u64,
    /// Epoch ms by which the worker stops (its own Lambda deadline, minus
    /// `SWEEP_MARGIN`, may come earlier).
    pub deadline_ms: u64,
    /// Sleep calls per second this worker may send.
    pub sleep_rate: f64,
}

impl WorkerTask {
    /// The event that carries this task.
    pub fn to_event(&self) -> Value {
        serde_json::json!({ WORKER_EVENT_KEY: self })
    }

    /// The task in an event, if it is a worker event (`Err` if it is one
    /// but malformed).
    pub fn from_event(event: &Value) -> Option<Result<WorkerTask, serde_json::Error>> {
        let task = event.get(WORKER_EVENT_KEY)?;
        Some(serde_json::from_value(task.clone()))
    }

    /// `deadline_ms` as a monotonic instant, given the epoch ms `now_ms`.
    pub fn deadline(&self, now_ms: u64) -> Instant {
        Instant::now() + Duration::from_millis(self.deadline_ms.saturating_sub(now_ms))
    }
}

/// Why a worker's report did not come back.
#[derive(Debug, thiserror::Error)]
pub enum InvokeError {
    /// The Lambda Invoke call failed (throttled, denied, network).
    #[error("worker invocation failed: {0}")]
    Lambda(#[source] Box<aws_sdk_lambda::Error>),
    /// The worker ran and failed (crashed, timed out).
    #[error("the worker failed: {0}")]
    Function(String),
    /// The worker's answer is not a sweep report.
    #[error("the worker's answer is not a sweep report: {0}")]
    Payload(#[source] serde_json::Error),
    /// The worker's event could not be encoded.
    #[error("the worker's event could not be encoded: {0}")]
    Encode(#[source] serde_json::Error),
    /// An in-process worker panicked or was cancelled.
    #[error("the in-process worker ended abnormally: {0}")]
    Local(#[source] tokio::task::JoinError),
}

/// A worker's report, eventually.
pub type WorkerFuture = Pin<Box<dyn Future<Output = Result<SweepReport, InvokeError>> + Send>>;

/// Runs one worker's task and returns its report.
pub trait WorkerInvoker: Send + Sync {
    /// Run `task` on a worker.
    fn invoke(&self, task: WorkerTask) -> WorkerFuture;
}

/// Workers are synchronous invocations of a Lambda function (the sweep
/// function itself): its answer is the worker's [`SweepReport`].
#[derive(Debug, Clone)]
pub struct LambdaWorkers {
    client: aws_sdk_lambda::Client,
    function: String,
}

impl LambdaWorkers {
    /// Invoke `function` (name or ARN) with `client`.
    pub fn new(client: aws_sdk_lambda::Client, function: impl Into<String>) -> Self {
        Self {
            client,
            function: function.into(),
        }
    }
}

impl WorkerInvoker for LambdaWorkers {
    fn invoke(&self, task: WorkerTask) -> WorkerFuture {
        let (client, function) = (self.client.clone(), self.function.clone());
        Box::pin(async move {
            let payload = serde_json::to_vec(&task.to_event()).map_err(InvokeError::Encode)?;
            let out = client
                .invoke()
                .function_name(function)
                .invocation_type(aws_sdk_lambda::types::InvocationType::RequestResponse)
                .payload(aws_sdk_lambda::primitives::Blob::new(payload))
                .send()
                .await
                .map_err(|e| InvokeError::Lambda(Box::new(aws_sdk_lambda::Error::from(e))))?;
            let body = out.payload().map(|b| b.as_ref()).unwrap_or_default();
            if let Some(kind) = out.function_error() {
                let detail = String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned();
                return Err(InvokeError::Function(format!("{kind}: {detail}")));
            }
            serde_json::from_slice(body).map_err(InvokeError::Payload)
        })
    }
}

/// Workers run in this process (tests, the benchmark, single-process
/// deployments): each task is a spawned [`Sweeper::run_worker`].
pub struct LocalWorkers<S> {
    sweeper: Arc<Sweeper<S>>,
}

impl<S> LocalWorkers<S> {
    /// Run tasks on `sweeper` (one without workers of its own).
    pub fn new(sweeper: Arc<Sweeper<S>>) -> Self {
        Self { sweeper }
    }
}

impl<S: UserStore + 'static> WorkerInvoker for LocalWorkers<S> {
    fn invoke(&self, task: WorkerTask) -> WorkerFuture {
        let sweeper = Arc::clone(&self.sweeper);
        Box::pin(async move {
            let handle = tokio::spawn(async move {
                let deadline = task.deadline(crate::clock::now_ms());
                sweeper.run_worker(&task, deadline).await
            });
            handle.await.map_err(InvokeError::Local)
        })
    }
}

/// What a scheduled run does.
pub(super) enum Plan {
    /// Sweep every shard in this invocation, starting with this page of the
    /// first shard (if it was read).
    Alone(Option<Page<UserRecord>>),
    /// Hand shard ranges to these workers.
    FanOut(Arc<dyn WorkerInvoker>),
}

/// `shards` split into `n` contiguous ranges whose sizes differ by at most one.
pub(crate) fn split(shards: &[String], n: usize) -> Vec<Vec<String>> {
    let n = n.clamp(1, shards.len().max(1));
    let (base, extra) = (shards.len() / n, shards.len() % n);
    let mut out = Vec::with_capacity(n);
    let mut at = 0;
    for i in 0..n {
        let len = base + usize::from(i < extra);
        out.push(shards[at..at + len].to_vec());
        at += len;
    }
    out
}

impl<S: UserStore + 'static> Sweeper<S> {
    /// Fan out or not (see the module docs).
    pub(super) async fn plan(&self, run: &super::Run) -> Plan {
        let shards = self.settings.shards.read_shards();
        let Some(workers) = self.workers.clone() else {
            return Plan::Alone(None);
        };
        if self.settings.workers <= 1 || shards.len() <= 1 {
            return Plan::Alone(None);
        }
        let n = shards.len() as u64;
        let sample = self.settings.fanout_threshold.div_ceil(n).clamp(1, 1000) as u32;
        let idle_after = u64::try_from(self.settings.idle_after.as_millis()).unwrap_or(u64::MAX);
        let idle_before = run.now_ms.saturating_sub(idle_after);
        match self
            .store
            .query_awake_idle(&shards[0], idle_before, None, sample)
            .await
        {
            Ok(page) if page.cursor.is_some() => {
                tracing::info!(run_id = %run.id, sample, shards = n, "at least the fan-out threshold of candidates: fanning out");
                Plan::FanOut(workers)
            }
            Ok(page) => Plan::Alone(Some(page)),
            Err(error) => {
                tracing::warn!(run_id = %run.id, error = %error, "fan-out sample failed; sweeping in this invocation");
                Plan::Alone(None)
            }
        }
    }

    /// Hand the shards to the workers and sum their reports.
    pub(super) async fn fan_out(
        &self,
        run: &super::Run,
        workers: &dyn WorkerInvoker,
    ) -> SweepReport {
        let shards = self.settings.shards.read_shards();
        let ranges = split(&shards, self.settings.workers as usize);
        let count = ranges.len() as u32;
        let rate = f64::from(self.settings.sleep_rate) / f64::from(count.max(1));
        let left = run.deadline.saturating_duration_since(Instant::now());
        let deadline_ms = crate::clock::now_ms()
            .saturating_add(super::ms(left.saturating_sub(WORKER_SLACK.min(left / 4))));
        let calls = ranges.into_iter().enumerate().map(|(i, shards)| {
            let task = WorkerTask {
                run_id: run.id.clone(),
                worker: i as u32,
                workers: count,
                shards,
                now_ms: run.now_ms,
                deadline_ms,
                sleep_rate: rate,
            };
            let call = workers.invoke(task);
            async move { tokio::time::timeout_at(run.deadline, call).await }
        });
        let answers = futures_util::future::join_all(calls).await;
        let mut total = SweepReport {
            workers: u64::from(count),
            ..SweepReport::default()
        };
        for (i, answer) in answers.into_iter().enumerate() {
            match answer {
                Ok(Ok(report)) => total.merge(&SweepReport {
                    workers: 0,
                    workers_failed: 0,
                    ..report
                }),
                Ok(Err(error)) => {
                    tracing::error!(run_id = %run.id, worker = i, error = %error, "sweep worker failed; its shards wait for the next run");
                    total.workers_failed += 1;
                    total.remaining = true;
                }
                Err(_) => {
                    tracing::error!(run_id = %run.id, worker = i, "sweep worker did not answer before the deadline; its shards wait for the next run");
                    total.workers_failed += 1;
                    total.remaining = true;
                }
            }
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_shards_when_split_then_ranges_are_contiguous_even_and_cover_all() {
        let shards: Vec<String> = (0..10).map(|s| s.to_string()).collect();
        let ranges = split(&shards, 4);
        let sizes: Vec<usize> = ranges.iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![3, 3, 2, 2]);
        assert_eq!(ranges.concat(), shards);
        assert_eq!(
            split(&shards, 32).len(),
            10,
            "never more workers than shards"
        );
        assert_eq!(split(&shards, 0).len(), 1);
    }

    #[test]
    fn given_a_task_when_sent_as_an_event_then_it_reads_back() {
        let task = WorkerTask {
            run_id: "r".into(),
            worker: 1,
            workers: 2,
            shards: vec!["4".into(), "5".into()],
            now_ms: 10,
            deadline_ms: 20,
            sleep_rate: 62.5,
        };
        let event = task.to_event();
        let back = WorkerTask::from_event(&event)
            .expect("a worker event")
            .expect("well formed");
        assert_eq!(back, task);
        assert!(WorkerTask::from_event(&serde_json::json!({"time": "x"})).is_none());
        assert!(
            WorkerTask::from_event(&serde_json::json!({"sweep_worker": {"shards": 3}}))
                .is_some_and(|r| r.is_err())
        );
    }
}

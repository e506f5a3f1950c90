//! The shared application object: configuration, state, run-time process
//! handles, change notification and persistence (group commit of the
//! changed records).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::{oneshot, watch};

use crate::faults::FaultTable;
use crate::options::{Args, Drift, Timing};
use crate::reqlog::RequestLog;
use crate::sandbox::Sandboxes;
use crate::state::{Execution, Retention, State};
use crate::store::{self, RecordKey, Snapshot};
use crate::terminal::TermSession;
use crate::util::now_ms;

pub type AppRef = Arc<App>;

/// Handles of live processes; never persisted.
#[derive(Default)]
pub struct Runtime {
    /// Execution id → signal that asks its runner to kill the process.
    pub exec_cancel: HashMap<String, oneshot::Sender<()>>,
    /// Terminal id → live PTY session.
    pub terminals: HashMap<String, Arc<TermSession>>,
}

pub struct App {
    pub args: Args,
    pub base_url: String,
    /// Live machine sandboxes (none with `--isolation none`).
    pub sandboxes: Sandboxes,
    timing: Mutex<Timing>,
    drift: Mutex<Drift>,
    state: Mutex<State>,
    rt: Mutex<Runtime>,
    faults: Mutex<FaultTable>,
    reqlog: Mutex<RequestLog>,
    /// One flush at a time; a flush writes every record changed before it
    /// started (group commit).
    persist_lock: tokio::sync::Mutex<()>,
    /// Flushes asked for so far / covered by a finished flush.
    persist_requested: AtomicU64,
    persist_done: AtomicU64,
    /// Bumped on every machine or terminal change; watchers re-read state.
    pub changed: watch::Sender<u64>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl App {
    pub fn new(args: Args, state: State, addr: SocketAddr, sandboxes: Sandboxes) -> Self {
        let timing = Timing::from_args(&args);
        let drift = Drift::from_args(&args);
        Self {
            args,
            base_url: format!("http://{addr}"),
            sandboxes,
            timing: Mutex::new(timing),
            drift: Mutex::new(drift),
            state: Mutex::new(state),
            rt: Mutex::new(Runtime::default()),
            faults: Mutex::new(FaultTable::default()),
            reqlog: Mutex::new(RequestLog::default()),
            persist_lock: tokio::sync::Mutex::new(()),
            persist_requested: AtomicU64::new(0),
            persist_done: AtomicU64::new(0),
            changed: watch::Sender::new(0),
        }
    }

    pub fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    pub fn rt(&self) -> MutexGuard<'_, Runtime> {
        lock(&self.rt)
    }

    pub fn faults(&self) -> MutexGuard<'_, FaultTable> {
        lock(&self.faults)
    }

    pub fn reqlog(&self) -> MutexGuard<'_, RequestLog> {
        lock(&self.reqlog)
    }

    pub fn timing(&self) -> Timing {
        *lock(&self.timing)
    }

    pub fn update_timing(&self, f: impl FnOnce(&mut Timing)) -> Timing {
        let mut t = lock(&self.timing);
        f(&mut t);
        *t
    }

    /// The current drift switches.
    pub fn drift(&self) -> Drift {
        *lock(&self.drift)
    }

    pub fn update_drift(&self, f: impl FnOnce(&mut Drift)) -> Drift {
        let mut d = lock(&self.drift);
        f(&mut d);
        *d
    }

    /// Wakes everything that watches machine or terminal state.
    pub fn notify(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    pub fn machine_dir(&self, machine_id: &str) -> PathBuf {
        self.args.data_dir.join("machines").join(machine_id)
    }

    pub fn home_dir(&self, machine_id: &str) -> PathBuf {
        self.machine_dir(machine_id).join("home")
    }

    /// Records activity on a machine (for autosleep).
    pub fn touch_activity(&self, machine_id: &str) {
        if let Some(m) = self.state().machines.get_mut(machine_id) {
            m.last_activity_ms = now_ms();
        }
    }

    /// How long ended things are kept.
    pub fn retention(&self) -> Retention {
        let ms = |d: std::time::Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        Retention {
            ended_ms: ms(self.args.retention),
            executions_per_machine: usize::try_from(self.args.executions_per_machine)
                .unwrap_or(usize::MAX),
            idempotency_ms: ms(self.args.idempotency_ttl),
        }
    }

    /// Marks one record changed and waits until it is on disk.
    pub async fn save(&self, key: RecordKey) {
        self.state().mark(key);
        self.persist().await;
    }

    /// Waits until every record changed before this call is on disk. Only
    /// the changed records are written (see [`crate::store`]), off the
    /// state lock; concurrent callers share one flush.
    pub async fn persist(&self) {
        let ticket = self.persist_requested.fetch_add(1, Ordering::SeqCst) + 1;
        let _guard = self.persist_lock.lock().await;
        if self.persist_done.load(Ordering::SeqCst) >= ticket {
            return;
        }
        let covered = self.persist_requested.load(Ordering::SeqCst);
        let snapshots: Vec<Snapshot> = {
            let mut st = self.state();
            let keys = st.take_dirty();
            keys.iter().map(|k| Snapshot::take(&st, k)).collect()
        };
        if !snapshots.is_empty() {
            self.flush(snapshots).await;
        }
        self.persist_done.store(covered, Ordering::SeqCst);
    }

    /// Ends execution `id` with `end` (which says whether it ended it; false
    /// when it had already ended) so that nobody reads it ended before its
    /// ended record is on disk, and a crash right after such a read loses
    /// nothing: the ended copy is written first, under the flush lock (no
    /// other flush can write an older copy after it), and only then replaces
    /// the record in the state. For the execution's runner, once its output
    /// is drained (output added meanwhile would be replaced too). Returns
    /// whether it ended the execution.
    pub async fn end_execution(&self, id: &str, end: impl FnOnce(&mut Execution) -> bool) -> bool {
        let _one_flush = self.persist_lock.lock().await;
        let Some(mut ended) = self.state().executions.get(id).cloned() else {
            return false;
        };
        if !end(&mut ended) {
            return false;
        }
        self.flush(vec![Snapshot::Execution(Box::new(ended.clone()))])
            .await;
        let mut st = self.state();
        match st.executions.get_mut(id) {
            Some(e) if !e.status.is_terminal() => {
                *e = ended;
                true
            }
            // Ended (or removed) meanwhile another way, whose own flush
            // writes it after this one.
            _ => false,
        }
    }

    /// Writes snapshots; records whose write failed are marked again so the
    /// next flush retries them.
    async fn flush(&self, snapshots: Vec<Snapshot>) {
        let root = store::records_dir(&self.args.data_dir);
        let job = move || {
            let mut ops = Vec::with_capacity(snapshots.len());
            for s in snapshots {
                match s.encode() {
                    Ok(op) => ops.push(op),
                    Err(e) => tracing::error!(error = %e, "cannot serialise a record"),
                }
            }
            store::write_batch(&root, ops)
        };
        match tokio::task::spawn_blocking(job).await {
            Ok(Ok(())) => {}
            Ok(Err((failed, e))) => {
                tracing::error!(error = %e, records = failed.len(), "cannot write records");
                let mut st = self.state();
                for key in failed {
                    st.mark(key);
                }
            }
            Err(e) => tracing::error!(error = %e, "record writer panicked"),
        }
    }
}

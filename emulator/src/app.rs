//! The shared application object: configuration, state, run-time process
//! handles, change notification and persistence.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::{oneshot, watch};

use crate::config::{Args, Drift, Timing};
use crate::faults::FaultTable;
use crate::reqlog::RequestLog;
use crate::sandbox::Sandboxes;
use crate::state::{self, State};
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
    persist_lock: tokio::sync::Mutex<()>,
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

    /// Writes the current state to `state.json` (temp file + rename).
    /// Writers are serialised and each writes the newest snapshot.
    pub async fn persist(&self) {
        let _guard = self.persist_lock.lock().await;
        let bytes = {
            let st = self.state();
            serde_json::to_vec(&*st)
        };
        let bytes = match bytes {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "cannot serialise state");
                return;
            }
        };
        let dir = self.args.data_dir.clone();
        match tokio::task::spawn_blocking(move || state::write_atomically(&dir, &bytes)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "cannot write state.json"),
            Err(e) => tracing::error!(error = %e, "state writer panicked"),
        }
    }
}

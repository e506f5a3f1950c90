//! Lazy, exactly-once provisioning (DESIGN §5 "Provisioning", invariants 1
//! and 6).
//!
//! 1. [`Provisioner::ensure`] (a first message, `PUT …/machine`, a retry):
//!    claims the user's item with a conditional put that stores a fresh
//!    `create_key` *before* any Dedalus call, or resumes a failed or stuck
//!    provisioning (same key), then starts the worker through a
//!    [`WorkerTrigger`].
//! 2. [`Provisioner::run_worker`] (the asynchronous provision event): creates
//!    the machine with the stored key — so every retry, crash or duplicate
//!    delivery gets the same machine back — records `machine_id` before
//!    anything else, waits for `running`, runs the versioned, idempotent
//!    bootstrap through the executions API, and marks the item `ready`.
//!
//! A worker that dies anywhere leaves an item that the next trigger resumes
//! with the same `create_key`; two triggers at once cannot both claim.

mod bootstrap;
mod trigger;

pub use bootstrap::{Bootstrap, BootstrapOutcome};
pub use trigger::{ProvisionEvent, WorkerTrigger};

use crate::dedalus::{self, CreateMachineRequest, IdempotencyKey, Phase};
use crate::store::{
    new_create_key, AcquireOutcome, ClaimOutcome, CreateKey, Lease, LeaseKind, LeasePurpose,
    MachineState, StoreError, UserRecord, UserStore,
};
use std::time::Duration;
use tokio::time::Instant;

/// Machine size and platform settings for new machines.
#[derive(Debug, Clone)]
pub struct MachineSpec {
    /// vCPUs.
    pub vcpu: f64,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Storage in GiB.
    pub storage_gib: u64,
    /// Platform autosleep backstop (`15m`, `never`, …).
    pub autosleep: String,
}

/// Provisioning settings.
#[derive(Debug, Clone)]
pub struct ProvisionSettings {
    /// Size of new machines.
    pub machine: MachineSpec,
    /// The bootstrap to run once per machine (and again when the root
    /// filesystem lost its packages).
    pub bootstrap: Bootstrap,
    /// How long a provisioning lease lasts before another trigger may resume
    /// the work (the worker renews it between steps).
    pub lease_ttl: Duration,
    /// How long the worker waits for `running`.
    pub boot_timeout: Duration,
    /// How long the bootstrap may run.
    pub bootstrap_timeout: Duration,
}

impl ProvisionSettings {
    /// Sensible defaults around a machine spec and bootstrap.
    pub fn new(machine: MachineSpec, bootstrap: Bootstrap) -> Self {
        ProvisionSettings {
            machine,
            bootstrap,
            lease_ttl: Duration::from_secs(15 * 60),
            boot_timeout: Duration::from_secs(5 * 60),
            bootstrap_timeout: Duration::from_secs(10 * 60),
        }
    }
}

/// What [`Provisioner::ensure`] found or did.
#[derive(Debug, Clone, PartialEq)]
pub enum Ensure {
    /// The machine is provisioned.
    Ready(UserRecord),
    /// This call started (or resumed) provisioning.
    Started(UserRecord),
    /// Provisioning is under way (a live provisioning lease).
    InProgress(UserRecord),
    /// The item is being destroyed (account deletion in progress).
    Destroying(UserRecord),
}

impl Ensure {
    /// The item as this call left it.
    pub fn record(&self) -> &UserRecord {
        match self {
            Ensure::Ready(r) | Ensure::Started(r) | Ensure::InProgress(r) | Ensure::Destroying(r) => r,
        }
    }

    /// A rough estimate of how long until the machine is ready.
    pub fn retry_after(&self) -> Duration {
        match self.record().state {
            MachineState::Ready => Duration::ZERO,
            MachineState::Bootstrapping => Duration::from_secs(10),
            _ => Duration::from_secs(5),
        }
    }
}

/// Provisioning failures.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// The table failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The Dedalus API failed.
    #[error("Dedalus API: {0}")]
    Dedalus(#[from] dedalus::Error),
    /// The worker could not be started.
    #[error("could not start the provisioning worker: {0}")]
    Trigger(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The bootstrap script failed; `tail` is the end of its output.
    #[error("bootstrap failed (exit code {exit_code:?}): {tail}")]
    Bootstrap {
        /// Exit code, if the process exited.
        exit_code: Option<i64>,
        /// The last lines of stdout and stderr.
        tail: String,
    },
    /// The item vanished or changed under the worker (e.g. deleted).
    #[error("the item changed under the worker: {0}")]
    Superseded(String),
}

impl ProvisionError {
    /// Worth retrying the whole operation later.
    pub fn is_retryable(&self) -> bool {
        match self {
            ProvisionError::Store(e) => e.is_retryable(),
            ProvisionError::Dedalus(e) => e.is_retryable(),
            ProvisionError::Trigger(_) => true,
            ProvisionError::Bootstrap { .. } | ProvisionError::Superseded(_) => false,
        }
    }
}

/// The provisioning service: a store, a Dedalus client, a trigger.
pub struct Provisioner<S, T> {
    store: S,
    dedalus: dedalus::Client,
    trigger: T,
    settings: ProvisionSettings,
}

/// Epoch milliseconds now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn new_owner(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::now_v7().simple())
}

impl<S: UserStore, T: WorkerTrigger> Provisioner<S, T> {
    /// Assemble the service (clients are built once by the caller).
    pub fn new(store: S, dedalus: dedalus::Client, trigger: T, settings: ProvisionSettings) -> Self {
        Provisioner {
            store,
            dedalus,
            trigger,
            settings,
        }
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The Dedalus client.
    pub fn dedalus(&self) -> &dedalus::Client {
        &self.dedalus
    }

    /// The settings.
    pub fn settings(&self) -> &ProvisionSettings {
        &self.settings
    }

    /// Make sure the user has (or is getting) a machine: claim or resume, and
    /// start the worker. Safe to call any number of times concurrently: at
    /// most one call claims, and resumes are conditional on the generation
    /// read, so only one of several concurrent resumes wins.
    pub async fn ensure(&self, user_id: &str) -> Result<Ensure, ProvisionError> {
        let now = now_ms();
        let current = match self.store.get(user_id).await? {
            Some(rec) => rec,
            None => {
                let owner = new_owner("provision");
                let lease = Lease::new(owner.clone(), LeaseKind::Provision, now + self.lease_ms());
                match self.store.claim(user_id, &new_create_key(), &lease, now).await? {
                    ClaimOutcome::Claimed(rec) => {
                        tracing::info!(user_id, "claimed the user's item; starting the provisioning worker");
                        self.start_worker(user_id, &owner).await?;
                        return Ok(Ensure::Started(rec));
                    }
                    ClaimOutcome::AlreadyExists(rec) => rec,
                }
            }
        };
        self.ensure_existing(current, now).await
    }

    async fn ensure_existing(&self, rec: UserRecord, now: u64) -> Result<Ensure, ProvisionError> {
        match rec.state {
            MachineState::Ready => return Ok(Ensure::Ready(rec)),
            MachineState::Destroying => return Ok(Ensure::Destroying(rec)),
            MachineState::Provisioning | MachineState::Bootstrapping
                if rec.live_lease(now).is_some() =>
            {
                return Ok(Ensure::InProgress(rec))
            }
            // failed, or provisioning/bootstrapping with an expired lease (a
            // worker died): resume with the same create key.
            _ => {}
        }
        let owner = new_owner("provision");
        let lease = Lease::new(owner.clone(), LeaseKind::Provision, now + self.lease_ms());
        match self
            .store
            .restart_provisioning(&rec.user_id, rec.generation, &lease, CreateKey::Keep, now)
            .await
        {
            Ok(AcquireOutcome::Acquired(rec)) => {
                tracing::info!(user_id = %rec.user_id, state = ?rec.state, "resuming provisioning");
                self.start_worker(&rec.user_id, &owner).await?;
                Ok(Ensure::Started(rec))
            }
            Ok(AcquireOutcome::Busy(rec)) | Ok(AcquireOutcome::Changed(rec)) => {
                // Someone else resumed (or finished) in between: report what is.
                match rec.state {
                    MachineState::Ready => Ok(Ensure::Ready(rec)),
                    MachineState::Destroying => Ok(Ensure::Destroying(rec)),
                    _ => Ok(Ensure::InProgress(rec)),
                }
            }
            Err(StoreError::Conflict {
                current: Some(rec), ..
            }) => match rec.state {
                MachineState::Ready => Ok(Ensure::Ready(*rec)),
                MachineState::Destroying => Ok(Ensure::Destroying(*rec)),
                _ => Ok(Ensure::InProgress(*rec)),
            },
            Err(e) => Err(e.into()),
        }
    }

    async fn start_worker(&self, user_id: &str, owner: &str) -> Result<(), ProvisionError> {
        let event = ProvisionEvent {
            user_id: user_id.to_string(),
            lease_owner: Some(owner.to_string()),
        };
        self.trigger
            .start(&event)
            .await
            .map_err(ProvisionError::Trigger)
    }

    fn lease_ms(&self) -> u64 {
        self.settings.lease_ttl.as_millis() as u64
    }

    /// The provisioning worker (the asynchronous provision event). Resumes
    /// from whatever step the item records; returns the final item.
    pub async fn run_worker(&self, event: &ProvisionEvent) -> Result<UserRecord, ProvisionError> {
        let user_id = event.user_id.as_str();
        let now = now_ms();
        let Some(rec) = self.store.get(user_id).await? else {
            return Err(ProvisionError::Superseded(format!("no item for user {user_id}")));
        };
        if rec.state == MachineState::Ready {
            return Ok(rec);
        }
        if rec.state == MachineState::Destroying {
            return Err(ProvisionError::Superseded("the user's machine is being destroyed".into()));
        }
        // Own the provisioning lease: the one the trigger passed (a redelivered
        // event), or a fresh one if the lease is free.
        let owner = match (&event.lease_owner, &rec.lease) {
            (Some(o), Some(l)) if &l.owner == o => o.clone(),
            _ => {
                let owner = new_owner("provision");
                match self
                    .store
                    .acquire_lease(user_id, &owner, LeasePurpose::Provision, now + self.lease_ms(), now)
                    .await?
                {
                    AcquireOutcome::Acquired(_) => owner,
                    AcquireOutcome::Busy(rec) | AcquireOutcome::Changed(rec) => {
                        tracing::info!(user_id, "another worker holds the provisioning lease; leaving it the work");
                        return Ok(rec);
                    }
                }
            }
        };
        let result = self.provision_steps(rec, &owner).await;
        let now = now_ms();
        match result {
            Ok(rec) => {
                let _ = self.store.release_lease(user_id, &owner, now).await;
                Ok(rec)
            }
            Err(err) => {
                tracing::warn!(user_id, error = %err, retryable = err.is_retryable(), "provisioning failed");
                let message = format!("provisioning failed: {err}");
                let _ = self.store.mark_failed(user_id, &owner, &message, now).await;
                let _ = self.store.release_lease(user_id, &owner, now).await;
                Err(err)
            }
        }
    }

    async fn provision_steps(&self, mut rec: UserRecord, owner: &str) -> Result<UserRecord, ProvisionError> {
        let user_id = rec.user_id.clone();
        // 1. The machine: created with the stored key, so a retry after a
        //    crash between "create" and "record" returns the same machine.
        let machine_id = match rec.machine_id.clone() {
            Some(id) => id,
            None => {
                let key = IdempotencyKey::parse(rec.create_key.clone())
                    .map_err(|e| ProvisionError::Superseded(format!("stored create_key is unusable: {e}")))?;
                let spec = &self.settings.machine;
                let request = CreateMachineRequest {
                    vcpu: spec.vcpu,
                    memory_mib: spec.memory_mib,
                    storage_gib: spec.storage_gib,
                    autosleep: Some(spec.autosleep.clone()),
                };
                let machine = self.dedalus.create_machine(&request, Some(&key)).await?;
                tracing::info!(user_id, machine_id = %machine.machine_id, "machine created");
                rec = self
                    .store
                    .record_machine_id(&user_id, &rec.create_key, &machine.machine_id, now_ms())
                    .await?;
                machine.machine_id
            }
        };
        self.renew(&user_id, owner).await?;

        // 2. Running (a machine that slept meanwhile is woken).
        let deadline = Instant::now() + self.settings.boot_timeout;
        let machine = self.dedalus.get_machine(&machine_id).await?;
        if matches!(machine.phase, Phase::Sleeping | Phase::Stopping) {
            self.dedalus.wake_machine(&machine_id, None, None).await?;
        }
        self.dedalus.wait_until(&machine_id, Phase::Running, deadline).await?;

        // 3. Bootstrap (idempotent: skipped when its marker and tools exist).
        if rec.state != MachineState::Bootstrapping {
            self.store.mark_bootstrapping(&user_id, owner, now_ms()).await?;
        }
        let deadline = Instant::now() + self.settings.bootstrap_timeout;
        match self.settings.bootstrap.ensure(&self.dedalus, &machine_id, deadline).await? {
            BootstrapOutcome::AlreadyDone | BootstrapOutcome::Ran => {}
            BootstrapOutcome::Failed { exit_code, tail } => {
                return Err(ProvisionError::Bootstrap { exit_code, tail });
            }
        }

        // 4. Ready and awake.
        let rec = self
            .store
            .mark_ready(&user_id, owner, self.settings.bootstrap.version(), now_ms())
            .await?;
        tracing::info!(user_id, machine_id, "machine ready");
        Ok(rec)
    }

    async fn renew(&self, user_id: &str, owner: &str) -> Result<(), ProvisionError> {
        let now = now_ms();
        self.store.renew_lease(user_id, owner, now + self.lease_ms(), now).await?;
        Ok(())
    }
}

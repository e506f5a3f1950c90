//! Lazy, exactly-once provisioning (docs/design.md §5 "Provisioning", invariants 1
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
pub use trigger::{LambdaTrigger, ProvisionEvent, QueueTrigger, TriggerError, WorkerTrigger};

use crate::clock::now_ms;
use crate::dedalus::{self, CreateMachineRequest, IdempotencyKey, Phase};
use crate::store::{
    new_create_key, AcquireOutcome, ClaimOutcome, CreateKey, Lease, LeaseKind, LeasePurpose,
    MachineState, ReleaseOutcome, StoreError, UserRecord, UserStore,
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
            Ensure::Ready(r)
            | Ensure::Started(r)
            | Ensure::InProgress(r)
            | Ensure::Destroying(r) => r,
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
    #[error("bootstrap failed ({}): {tail}", exit_text(*.exit_code))]
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

fn exit_text(code: Option<i64>) -> String {
    match code {
        Some(c) => format!("exit code {c}"),
        None => "no exit code: killed or timed out".to_string(),
    }
}

/// Whether the worker has work on this item: `provisioning` and
/// `bootstrapping` yes; `ready` and `failed` no (nothing to do, or wait for
/// the next `ensure`); `destroying` is an error.
fn worker_should_run(rec: &UserRecord) -> Result<bool, ProvisionError> {
    match rec.state {
        MachineState::Provisioning | MachineState::Bootstrapping => Ok(true),
        MachineState::Ready | MachineState::Failed => Ok(false),
        MachineState::Destroying => Err(ProvisionError::Superseded(
            "the user's machine is being destroyed".into(),
        )),
    }
}

/// A refused write under the worker's lease: the lease was lost or the item
/// moved on.
fn lease_lost(e: StoreError) -> ProvisionError {
    match e {
        StoreError::Conflict { op, current } => ProvisionError::Superseded(format!(
            "{op} refused: the provisioning lease is no longer ours or the item changed (state {:?})",
            current.map(|c| c.state)
        )),
        other => other.into(),
    }
}

/// What an item's state means to a caller of `ensure`, when this call did not
/// start anything.
fn classify(rec: UserRecord) -> Ensure {
    match rec.state {
        MachineState::Ready => Ensure::Ready(rec),
        MachineState::Destroying => Ensure::Destroying(rec),
        _ => Ensure::InProgress(rec),
    }
}

fn new_owner(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::now_v7().simple())
}

impl<S: UserStore, T: WorkerTrigger> Provisioner<S, T> {
    /// Assemble the service (clients are built once by the caller).
    pub fn new(
        store: S,
        dedalus: dedalus::Client,
        trigger: T,
        settings: ProvisionSettings,
    ) -> Self {
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
                match self
                    .store
                    .claim(user_id, &new_create_key(), &lease, now)
                    .await?
                {
                    ClaimOutcome::Claimed(rec) => {
                        tracing::info!(
                            user_id,
                            "claimed the user's item; starting the provisioning worker"
                        );
                        self.start_worker(user_id, &owner).await?;
                        return Ok(Ensure::Started(rec));
                    }
                    ClaimOutcome::AlreadyExists(rec) => rec,
                }
            }
        };
        self.ensure_existing(current).await
    }

    async fn ensure_existing(&self, mut rec: UserRecord) -> Result<Ensure, ProvisionError> {
        // A refused resume whose item changed without a live lease (e.g. a
        // worker failed or finished in between) is decided again on the new
        // item, a bounded number of times.
        const ATTEMPTS: usize = 3;
        for _ in 0..ATTEMPTS {
            let now = now_ms();
            match rec.state {
                MachineState::Ready => return Ok(Ensure::Ready(rec)),
                MachineState::Destroying => return Ok(Ensure::Destroying(rec)),
                MachineState::Provisioning | MachineState::Bootstrapping
                    if rec.live_lease(now).is_some() =>
                {
                    return Ok(Ensure::InProgress(rec))
                }
                // failed, or provisioning/bootstrapping with an expired lease
                // (a worker died): resume with the same create key.
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
                    tracing::info!(user_id = %rec.user_id, "resuming provisioning");
                    self.start_worker(&rec.user_id, &owner).await?;
                    return Ok(Ensure::Started(rec));
                }
                // Someone else resumed in between: it is under way.
                Ok(AcquireOutcome::Busy(current)) => return Ok(classify(current)),
                // The item moved on without a live lease: look again.
                Ok(AcquireOutcome::Changed(current)) => rec = current,
                Err(StoreError::NotFound { user_id }) => {
                    return Err(ProvisionError::Superseded(format!(
                        "the item of user {user_id} was deleted"
                    )))
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(classify(rec))
    }

    /// Start the worker for the lease `owner` just took. If the trigger
    /// fails, the lease is dropped so the next call can resume at once
    /// (instead of waiting out the lease for a worker that never started).
    async fn start_worker(&self, user_id: &str, owner: &str) -> Result<(), ProvisionError> {
        let event = ProvisionEvent {
            user_id: user_id.to_string(),
            lease_owner: Some(owner.to_string()),
        };
        match self.trigger.start(&event).await {
            Ok(()) => Ok(()),
            Err(e) => {
                tracing::warn!(user_id, error = %e, "could not start the provisioning worker; releasing its lease");
                if let Err(release) = self.store.release_lease(user_id, owner, now_ms()).await {
                    tracing::warn!(user_id, error = %release, "could not release the provisioning lease");
                }
                Err(ProvisionError::Trigger(e))
            }
        }
    }

    fn lease_ms(&self) -> u64 {
        self.settings.lease_ttl.as_millis() as u64
    }

    /// The provisioning worker (the asynchronous provision event). Resumes
    /// from whatever step the item records; returns the final item.
    ///
    /// Each run takes the provisioning lease under an owner of its own: the
    /// lease the trigger took (`event.lease_owner`) is handed over by
    /// releasing it and acquiring a fresh one, so of two deliveries of the
    /// same event (AWS async invokes are at-least-once) only one works; the
    /// other returns the item as it finds it. Only `provisioning` and
    /// `bootstrapping` items are worked on: a `failed` item waits for the
    /// next [`Provisioner::ensure`] (a stale or redelivered event does not
    /// retry it behind the caller's back).
    pub async fn run_worker(&self, event: &ProvisionEvent) -> Result<UserRecord, ProvisionError> {
        let user_id = event.user_id.as_str();
        let Some(rec) = self.store.get(user_id).await? else {
            return Err(ProvisionError::Superseded(format!(
                "no item for user {user_id}"
            )));
        };
        if !worker_should_run(&rec)? {
            return Ok(rec);
        }
        if let Some(handed) = &event.lease_owner {
            self.store.release_lease(user_id, handed, now_ms()).await?;
        }
        let owner = new_owner("provision");
        let now = now_ms();
        let rec = match self
            .store
            .acquire_lease(
                user_id,
                &owner,
                LeasePurpose::Provision,
                now + self.lease_ms(),
                now,
            )
            .await
        {
            Ok(AcquireOutcome::Acquired(rec)) => rec,
            Ok(AcquireOutcome::Busy(rec)) | Ok(AcquireOutcome::Changed(rec)) => {
                tracing::info!(
                    user_id,
                    "another worker holds the provisioning lease; leaving it the work"
                );
                return Ok(rec);
            }
            Err(StoreError::NotFound { .. }) => {
                return Err(ProvisionError::Superseded(format!(
                    "no item for user {user_id}"
                )))
            }
            Err(e) => return Err(e.into()),
        };
        // The item may have moved on between the read and the acquisition.
        match worker_should_run(&rec) {
            Ok(true) => {}
            other => {
                let _ = self.store.release_lease(user_id, &owner, now_ms()).await;
                return other.map(|_| rec);
            }
        }
        let result = self.provision_steps(rec, &owner).await;
        let now = now_ms();
        match result {
            Ok(rec) => {
                let rec = match self.store.release_lease(user_id, &owner, now).await {
                    Ok(ReleaseOutcome::Released(after)) => after,
                    _ => rec,
                };
                Ok(rec)
            }
            Err(err) => {
                tracing::warn!(user_id, error = %err, retryable = err.is_retryable(), "provisioning failed");
                let message = format!("provisioning failed: {err}");
                // Refused when the lease was lost or the item moved on: then
                // whoever holds it now decides.
                let _ = self.store.mark_failed(user_id, &owner, &message, now).await;
                let _ = self.store.release_lease(user_id, &owner, now).await;
                Err(err)
            }
        }
    }

    async fn provision_steps(
        &self,
        mut rec: UserRecord,
        owner: &str,
    ) -> Result<UserRecord, ProvisionError> {
        let user_id = rec.user_id.clone();
        // 1. The machine: created with the stored key, so a retry after a
        //    crash between "create" and "record" returns the same machine.
        let machine_id = match rec.machine_id.clone() {
            Some(id) => {
                crate::metrics::resumed();
                id
            }
            None => {
                let key = IdempotencyKey::parse(rec.create_key.clone()).map_err(|e| {
                    ProvisionError::Superseded(format!("stored create_key is unusable: {e}"))
                })?;
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
        let boot_started = Instant::now();
        let deadline = boot_started + self.settings.boot_timeout;
        let machine = self.dedalus.get_machine(&machine_id).await?;
        if matches!(machine.phase, Phase::Sleeping | Phase::Stopping) {
            self.dedalus.wake_machine(&machine_id, None, None).await?;
        }
        self.dedalus
            .wait_until(&machine_id, Phase::Running, deadline)
            .await?;
        crate::metrics::boot_took(boot_started.elapsed());

        // 3. Bootstrap (idempotent: skipped when its marker and tools exist).
        //    Marking `bootstrapping` also checks the lease is still ours and
        //    extends it for the bootstrap's duration.
        if rec.state != MachineState::Bootstrapping {
            self.store
                .mark_bootstrapping(&user_id, owner, now_ms())
                .await
                .map_err(lease_lost)?;
        }
        self.renew(&user_id, owner).await?;
        let bootstrap_started = Instant::now();
        let deadline = bootstrap_started + self.settings.bootstrap_timeout;
        let bootstrapped = self
            .settings
            .bootstrap
            .ensure(&self.dedalus, &machine_id, deadline)
            .await;
        crate::metrics::bootstrap_took(bootstrap_started.elapsed());
        match bootstrapped? {
            BootstrapOutcome::AlreadyDone | BootstrapOutcome::Ran => {}
            BootstrapOutcome::Failed { exit_code, tail } => {
                return Err(ProvisionError::Bootstrap { exit_code, tail });
            }
        }

        // 4. Ready and awake.
        let rec = self
            .store
            .mark_ready(&user_id, owner, self.settings.bootstrap.version(), now_ms())
            .await
            .map_err(lease_lost)?;
        tracing::info!(user_id, machine_id, "machine ready");
        Ok(rec)
    }

    /// Extend the lease; losing it (another trigger resumed after it
    /// expired) ends this worker.
    async fn renew(&self, user_id: &str, owner: &str) -> Result<(), ProvisionError> {
        let now = now_ms();
        self.store
            .renew_lease(user_id, owner, now + self.lease_ms(), now)
            .await
            .map_err(lease_lost)?;
        Ok(())
    }
}

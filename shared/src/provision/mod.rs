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
//! with the same `create_key`; two triggers at once cannot both claim. A
//! worker whose item was deleted (or is `destroying`, or was re-claimed)
//! while its create was in flight destroys the machine it created. The
//! worker works to its invocation's deadline ([`Provisioner::run_worker_until`]):
//! its lease never outlives the invocation, and short of time it releases
//! the lease and leaves the item resumable.

mod bootstrap;
mod trigger;

pub use bootstrap::{Bootstrap, BootstrapOutcome};
pub use trigger::{LambdaTrigger, ProvisionEvent, QueueTrigger, TriggerError, WorkerTrigger};

use crate::api::UserId;
use crate::clock::now_ms;
use crate::dedalus::{self, CreateMachineRequest, IdempotencyKey, Phase};
use crate::journal::{Actor, Event, JournalEntry, Reason};
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
    /// How long before the invocation's deadline the worker stops, to
    /// release its lease and answer (`run_worker_until`).
    pub margin: Duration,
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
            margin: Duration::from_secs(10),
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
    /// The invocation's time ran out before the machine was ready: the item
    /// is left as it was (resumable) with the lease released.
    #[error("the worker's invocation ran out of time; the next run resumes")]
    OutOfTime,
    /// A turn waiting for the machine saw provisioning end in `failed`;
    /// `message` is the item's `last_error`. The next trigger resumes.
    #[error("{message}")]
    Failed {
        /// Why (the item's `last_error`).
        message: String,
    },
}

impl ProvisionError {
    /// Worth retrying the whole operation later.
    pub fn is_retryable(&self) -> bool {
        match self {
            ProvisionError::Store(e) => e.is_retryable(),
            ProvisionError::Dedalus(e) => e.is_retryable(),
            ProvisionError::Trigger(_)
            | ProvisionError::OutOfTime
            | ProvisionError::Failed { .. } => true,
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
    journal: crate::journal::Journal,
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

/// One worker invocation's time. The lease never outlives the invocation
/// (`lease_end_ms`, its deadline), so a worker Lambda kills leaves no live
/// lease behind for the retry to find; the work stops `margin` earlier so
/// the lease can be released and the answer sent.
struct Budget {
    lease_end_ms: u64,
    work_end: Instant,
}

impl Budget {
    fn new(deadline_ms: u64, margin: Duration) -> Self {
        let left = Duration::from_millis(deadline_ms.saturating_sub(now_ms()));
        Budget {
            lease_end_ms: deadline_ms,
            work_end: Instant::now() + left.saturating_sub(margin),
        }
    }

    fn exhausted(&self) -> bool {
        Instant::now() >= self.work_end
    }

    /// A lease (or renewal) taken at `now` for `ttl_ms`, cut at the deadline.
    fn lease_until(&self, now: u64, ttl_ms: u64) -> u64 {
        now.saturating_add(ttl_ms).min(self.lease_end_ms)
    }

    /// The end of a step that may take `timeout`, cut at the work's end.
    fn step_end(&self, timeout: Duration) -> Instant {
        (Instant::now() + timeout).min(self.work_end)
    }
}

/// What a worker run found when it tried to take the provisioning lease.
enum Taken {
    /// The lease is this run's (its owner): work on the item.
    Work(UserRecord, String),
    /// Nothing to do (ready, failed, or another worker holds it).
    Nothing(UserRecord),
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
            journal: crate::journal::Journal::off(),
        }
    }

    /// Record transitions in `journal` (provisioned, lost).
    pub fn with_journal(mut self, journal: crate::journal::Journal) -> Self {
        self.journal = journal;
        self
    }

    /// The lifecycle journal.
    pub fn journal(&self) -> &crate::journal::Journal {
        &self.journal
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
    pub async fn ensure(&self, user_id: &UserId) -> Result<Ensure, ProvisionError> {
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
                            user_id = user_id.as_str(),
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
    async fn start_worker(&self, user_id: &UserId, owner: &str) -> Result<(), ProvisionError> {
        let event = ProvisionEvent {
            user_id: user_id.clone(),
            lease_owner: Some(owner.to_string()),
        };
        match self.trigger.start(&event).await {
            Ok(()) => Ok(()),
            Err(e) => {
                tracing::warn!(user_id = user_id.as_str(), error = %e, "could not start the provisioning worker; releasing its lease");
                if let Err(release) = self.store.release_lease(user_id, owner, now_ms()).await {
                    tracing::warn!(user_id = user_id.as_str(), error = %release, "could not release the provisioning lease");
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
    ///
    /// Without an invocation deadline, the worker's budget is its steps'
    /// own timeouts plus one lease TTL (for the create and the writes).
    pub async fn run_worker(&self, event: &ProvisionEvent) -> Result<UserRecord, ProvisionError> {
        let s = &self.settings;
        let budget = s.boot_timeout + s.bootstrap_timeout + s.lease_ttl + s.margin;
        let budget_ms = u64::try_from(budget.as_millis()).unwrap_or(u64::MAX);
        self.run_worker_until(event, now_ms().saturating_add(budget_ms))
            .await
    }

    /// [`Provisioner::run_worker`] for an invocation that ends at
    /// `deadline_ms` (epoch ms): the lease it takes never outlives that
    /// deadline (a worker killed by Lambda leaves no live lease for the
    /// retry to find), and it stops `margin` before it, releasing the lease
    /// and leaving the item resumable, with [`ProvisionError::OutOfTime`]
    /// (retryable, so Lambda retries the event).
    pub async fn run_worker_until(
        &self,
        event: &ProvisionEvent,
        deadline_ms: u64,
    ) -> Result<UserRecord, ProvisionError> {
        let budget = Budget::new(deadline_ms, self.settings.margin);
        if budget.exhausted() {
            return Err(ProvisionError::OutOfTime);
        }
        let (rec, owner) = match self.take_worker_lease(event, &budget).await? {
            Taken::Work(rec, owner) => (rec, owner),
            Taken::Nothing(rec) => return Ok(rec),
        };
        let result = self.steps_within(rec, &owner, &budget).await;
        self.end_run(&event.user_id, &owner, result).await
    }

    /// Take the provisioning lease under an owner of this run's own (the
    /// lease the trigger took is handed over); [`Taken::Nothing`] when the
    /// item needs no work or another worker holds it.
    async fn take_worker_lease(
        &self,
        event: &ProvisionEvent,
        budget: &Budget,
    ) -> Result<Taken, ProvisionError> {
        let user_id = &event.user_id;
        let gone = || ProvisionError::Superseded(format!("no item for user {user_id}"));
        let Some(rec) = self.store.get(user_id).await? else {
            return Err(gone());
        };
        if !worker_should_run(&rec)? {
            return Ok(Taken::Nothing(rec));
        }
        if let Some(handed) = &event.lease_owner {
            self.store.release_lease(user_id, handed, now_ms()).await?;
        }
        let owner = new_owner("provision");
        let now = now_ms();
        let until = budget.lease_until(now, self.lease_ms());
        let purpose = LeasePurpose::Provision;
        let rec = match self
            .store
            .acquire_lease(user_id, &owner, purpose, until, now)
            .await
        {
            Ok(AcquireOutcome::Acquired(rec)) => rec,
            Ok(AcquireOutcome::Busy(rec)) | Ok(AcquireOutcome::Changed(rec)) => {
                tracing::info!(
                    user_id = user_id.as_str(),
                    "another worker holds the provisioning lease; leaving it the work"
                );
                return Ok(Taken::Nothing(rec));
            }
            Err(StoreError::NotFound { .. }) => return Err(gone()),
            Err(e) => return Err(e.into()),
        };
        crate::metrics::provision_attempt(rec.provision_attempts);
        // The item may have moved on between the read and the acquisition.
        match worker_should_run(&rec) {
            Ok(true) => Ok(Taken::Work(rec, owner)),
            other => {
                let _ = self.store.release_lease(user_id, &owner, now_ms()).await;
                other.map(|_| Taken::Nothing(rec))
            }
        }
    }

    /// The provisioning steps, cut at the work's end: a step cut by the
    /// invocation's end (not by its own timeout) is
    /// [`ProvisionError::OutOfTime`], not a provisioning failure.
    async fn steps_within(
        &self,
        rec: UserRecord,
        owner: &str,
        budget: &Budget,
    ) -> Result<UserRecord, ProvisionError> {
        let steps = self.provision_steps(rec, owner, budget);
        match tokio::time::timeout_at(budget.work_end, steps).await {
            Ok(Err(e)) if budget.exhausted() && !matches!(e, ProvisionError::Superseded(_)) => {
                Err(ProvisionError::OutOfTime)
            }
            Ok(result) => result,
            Err(_elapsed) => Err(ProvisionError::OutOfTime),
        }
    }

    /// Release the lease after a run; a failure is recorded on the item
    /// (`failed`) first, running out of time is not (the item stays
    /// resumable at its step).
    async fn end_run(
        &self,
        user_id: &UserId,
        owner: &str,
        result: Result<UserRecord, ProvisionError>,
    ) -> Result<UserRecord, ProvisionError> {
        let now = now_ms();
        match result {
            Ok(rec) => match self.store.release_lease(user_id, owner, now).await {
                Ok(ReleaseOutcome::Released(after)) => Ok(after),
                _ => Ok(rec),
            },
            Err(ProvisionError::OutOfTime) => {
                tracing::warn!(
                    user_id = user_id.as_str(),
                    "provisioning worker out of time; releasing its lease for the next run"
                );
                let _ = self.store.release_lease(user_id, owner, now).await;
                Err(ProvisionError::OutOfTime)
            }
            Err(err) => {
                tracing::warn!(user_id = user_id.as_str(), error = %err, retryable = err.is_retryable(), "provisioning failed");
                let message = format!("provisioning failed: {err}");
                // Refused when the lease was lost or the item moved on: then
                // whoever holds it now decides.
                let _ = self.store.mark_failed(user_id, owner, &message, now).await;
                let _ = self.store.release_lease(user_id, owner, now).await;
                Err(err)
            }
        }
    }

    /// The worker's steps, in order: the machine, running, bootstrapped,
    /// ready (each renews the lease first where it may take a while).
    async fn provision_steps(
        &self,
        rec: UserRecord,
        owner: &str,
        budget: &Budget,
    ) -> Result<UserRecord, ProvisionError> {
        let steps_started = Instant::now();
        let (rec, machine_id) = self.created_machine(rec).await?;
        self.renew(&rec.user_id, owner, budget).await?;
        self.running(&rec.user_id, owner, &machine_id, budget)
            .await?;
        self.bootstrapped(&rec, owner, &machine_id, budget).await?;
        self.ready(&rec.user_id, owner, &machine_id, steps_started)
            .await
    }

    /// 1. The machine: created with the stored key, so a retry after a
    ///    crash between "create" and "record" returns the same machine.
    async fn created_machine(
        &self,
        rec: UserRecord,
    ) -> Result<(UserRecord, String), ProvisionError> {
        if let Some(id) = rec.machine_id.clone() {
            return Ok((rec, id));
        }
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
        tracing::info!(user_id = rec.user_id.as_str(), machine_id = %machine.machine_id, "machine created");
        let rec = self.record_or_destroy(&rec, &machine.machine_id).await?;
        Ok((rec, machine.machine_id))
    }

    /// 2. Running (a machine that slept meanwhile is woken; one that is
    ///    gone is recorded as lost).
    async fn running(
        &self,
        user_id: &UserId,
        owner: &str,
        machine_id: &str,
        budget: &Budget,
    ) -> Result<(), ProvisionError> {
        let boot_started = Instant::now();
        let deadline = budget.step_end(self.settings.boot_timeout);
        let machine = match self.dedalus.get_machine(machine_id).await {
            Ok(m) if !matches!(m.phase, Phase::Destroying | Phase::Destroyed) => m,
            Ok(_) => return Err(self.machine_lost(user_id, owner, machine_id).await),
            Err(e) if e.is_not_found() => {
                return Err(self.machine_lost(user_id, owner, machine_id).await)
            }
            Err(e) => return Err(e.into()),
        };
        if matches!(machine.phase, Phase::Sleeping | Phase::Stopping) {
            self.dedalus.wake_machine(machine_id, None, None).await?;
        }
        self.dedalus
            .wait_until(machine_id, Phase::Running, deadline)
            .await?;
        crate::metrics::boot_took(boot_started.elapsed());
        Ok(())
    }

    /// 3. Bootstrap (idempotent: skipped when its marker and tools exist).
    ///    Marking `bootstrapping` also checks the lease is still ours and
    ///    extends it for the bootstrap's duration.
    async fn bootstrapped(
        &self,
        rec: &UserRecord,
        owner: &str,
        machine_id: &str,
        budget: &Budget,
    ) -> Result<(), ProvisionError> {
        let user_id = &rec.user_id;
        if rec.state != MachineState::Bootstrapping {
            self.store
                .mark_bootstrapping(user_id, owner, now_ms())
                .await
                .map_err(lease_lost)?;
        }
        self.renew(user_id, owner, budget).await?;
        let bootstrap_started = Instant::now();
        let deadline = budget.step_end(self.settings.bootstrap_timeout);
        let bootstrapped = self
            .settings
            .bootstrap
            .ensure(&self.dedalus, machine_id, deadline)
            .await;
        crate::metrics::bootstrap_took(bootstrap_started.elapsed());
        match bootstrapped? {
            BootstrapOutcome::AlreadyDone | BootstrapOutcome::Ran => Ok(()),
            BootstrapOutcome::Failed { exit_code, tail } => {
                Err(ProvisionError::Bootstrap { exit_code, tail })
            }
        }
    }

    /// 4. Ready and awake; the journal records the provisioning.
    async fn ready(
        &self,
        user_id: &UserId,
        owner: &str,
        machine_id: &str,
        steps_started: Instant,
    ) -> Result<UserRecord, ProvisionError> {
        let rec = self
            .store
            .mark_ready(user_id, owner, self.settings.bootstrap.version(), now_ms())
            .await
            .map_err(lease_lost)?;
        tracing::info!(user_id = user_id.as_str(), machine_id, "machine ready");
        self.journal
            .record(
                user_id,
                JournalEntry::new(now_ms(), Event::Provisioned, Actor::Worker)
                    .reason(Reason::Created)
                    .machine(Some(machine_id))
                    .duration(millis(steps_started.elapsed())),
            )
            .await;
        Ok(rec)
    }

    /// Record the machine this worker created under `rec`'s create key. If
    /// the item refuses it — deleted, `destroying`, or re-claimed under
    /// another key (a DELETE won the race while the create was in flight) —
    /// the machine belongs to no user: destroy it now, so a deleted user
    /// keeps no machine and a PUT/DELETE loop cannot pile them up.
    async fn record_or_destroy(
        &self,
        rec: &UserRecord,
        machine_id: &str,
    ) -> Result<UserRecord, ProvisionError> {
        let user_id = &rec.user_id;
        let why = match self
            .store
            .record_machine_id(user_id, &rec.create_key, machine_id, now_ms())
            .await
        {
            Ok(recorded) => return Ok(recorded),
            Err(StoreError::NotFound { .. }) => "the item was deleted".to_string(),
            Err(StoreError::Conflict { current, .. }) => match current {
                Some(c)
                    if c.machine_id.as_deref() == Some(machine_id)
                        && c.state != MachineState::Destroying =>
                {
                    return Ok(*c)
                }
                Some(c) => format!(
                    "the item is {:?} under another create key or machine",
                    c.state
                ),
                None => "the item changed".to_string(),
            },
            Err(other) => return Err(other.into()),
        };
        tracing::warn!(user_id = user_id.as_str(), machine_id, reason = %why, "created machine belongs to no user; destroying it");
        match self.dedalus.delete_machine(machine_id, None, None).await {
            Ok(_) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
        Err(ProvisionError::Superseded(format!(
            "{why} while the machine was being created; machine {machine_id} destroyed"
        )))
    }

    /// The machine (recorded, or replayed by the create key) is gone — e.g.
    /// reconciliation destroyed it as an orphan while a crashed worker had
    /// not recorded it. Forget it and its key (`mark_lost`), so the next
    /// provisioning creates a new machine instead of replaying a dead one.
    async fn machine_lost(
        &self,
        user_id: &UserId,
        owner: &str,
        machine_id: &str,
    ) -> ProvisionError {
        let why = "destroyed before provisioning finished";
        let lost = match self.store.mark_lost(user_id, owner, why, now_ms()).await {
            Ok(rec) => rec,
            Err(e) => return lease_lost(e),
        };
        self.journal
            .record(
                user_id,
                JournalEntry::new(now_ms(), Event::Lost, Actor::Worker)
                    .reason(Reason::NotFound)
                    .machine(Some(machine_id))
                    .awake(None, lost.awake_ms_total),
            )
            .await;
        ProvisionError::Superseded(format!(
            "machine {machine_id} was {why}; the next provisioning creates a new one"
        ))
    }

    /// Extend the lease; losing it (another trigger resumed after it
    /// expired) ends this worker.
    async fn renew(
        &self,
        user_id: &UserId,
        owner: &str,
        budget: &Budget,
    ) -> Result<(), ProvisionError> {
        let now = now_ms();
        self.store
            .renew_lease(
                user_id,
                owner,
                budget.lease_until(now, self.lease_ms()),
                now,
            )
            .await
            .map_err(lease_lost)?;
        Ok(())
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

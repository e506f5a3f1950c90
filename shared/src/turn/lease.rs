//! The turn lease while a turn runs: renewed in the background every third
//! of its length, checked before every command, and never outliving the
//! turn.
//!
//! - The renewer's result is shared with the turn: a renewal refused (the
//!   lease is someone else's, the item is gone or being destroyed) marks the
//!   lease lost at once; renewals failing for another reason leave it held
//!   only until the last confirmed expiry (minus a margin).
//! - [`TurnLease::check`] (before each command) reads the item only when
//!   the last renewal failed (see its docs for why a confirmed lease needs
//!   no read): the lease must still be this turn's, live, and the machine
//!   `ready`.
//! - The renewer is aborted when the [`TurnLease`] is dropped — on every exit
//!   path of the turn, including a panic or a cancelled turn future — so a
//!   dead turn never keeps its lease alive.

use crate::api::UserId;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::clock::now_ms;
use crate::runner::{CommandOutcome, CommandRunner, Observer, RunnerError, Transport};
use crate::store::{MachineState, StoreError, UserStore};

/// Safety margin: the lease counts as lost this long before its last
/// confirmed expiry (clock skew, the time a command takes to start) — or a
/// quarter of the lease if that is shorter (renewals come every third).
const EXPIRY_MARGIN_MS: u64 = 1000;

/// Aborts a spawned task when dropped.
#[derive(Debug)]
pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Why the turn may not go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseLost {
    /// A renewal or a check found the lease taken, or the item changed.
    Taken,
    /// Renewals failed until the last confirmed expiry came near.
    Expired,
}

#[derive(Debug)]
struct Shared {
    lost: AtomicBool,
    confirmed_until: AtomicU64,
    /// The last renewal failed (not refused): the table could not confirm
    /// the lease since.
    unconfirmed: AtomicBool,
}

/// The turn's lease, renewed while this value lives.
#[derive(Debug)]
pub struct TurnLease<S> {
    store: Arc<S>,
    user_id: UserId,
    owner: String,
    shared: Arc<Shared>,
    margin_ms: u64,
    _renewer: AbortOnDrop,
}

impl<S> TurnLease<S>
where
    S: UserStore + 'static,
{
    /// Starts renewing `owner`'s lease (held until `until_ms`) every third
    /// of `ttl`.
    pub fn start(
        store: Arc<S>,
        user_id: &UserId,
        owner: &str,
        until_ms: u64,
        ttl: Duration,
    ) -> Self {
        let shared = Arc::new(Shared {
            lost: AtomicBool::new(false),
            confirmed_until: AtomicU64::new(until_ms),
            unconfirmed: AtomicBool::new(false),
        });
        let renewer = tokio::spawn(renew(
            store.clone(),
            user_id.to_owned(),
            owner.to_owned(),
            ttl,
            shared.clone(),
        ));
        TurnLease {
            store,
            user_id: user_id.to_owned(),
            owner: owner.to_owned(),
            shared,
            margin_ms: EXPIRY_MARGIN_MS.min(millis(ttl) / 4),
            _renewer: AbortOnDrop(renewer),
        }
    }

    /// The lease owner (this turn).
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Whether the lease is known lost (no table read).
    pub fn is_lost(&self) -> bool {
        self.local().is_err()
    }

    fn local(&self) -> Result<(), LeaseLost> {
        if self.shared.lost.load(Ordering::SeqCst) {
            return Err(LeaseLost::Taken);
        }
        let until = self.shared.confirmed_until.load(Ordering::SeqCst);
        if now_ms().saturating_add(self.margin_ms) >= until {
            self.shared.lost.store(true, Ordering::SeqCst);
            return Err(LeaseLost::Expired);
        }
        Ok(())
    }

    /// Before a command: the lease is still this turn's.
    ///
    /// No table read while the lease is confirmed: the table acquired or
    /// last renewed it until `confirmed_until`, and `local` refuses once
    /// `now + margin` reaches that. Until then nobody can have taken it —
    /// acquiring (a turn, the sweep, the provisioning worker) needs no live
    /// lease, and liveness is judged by the acquirer's clock, which the
    /// margin allows to be that far ahead of ours. A renewal refused
    /// because the lease was taken (a clock further off) or the item is
    /// being destroyed marks the lease lost within a third of the lease
    /// length, before the next command. Only when the last renewal failed
    /// (the table did not answer, so nothing confirmed the lease since) is
    /// the item read, as the renewals' stand-in; a failed read falls back
    /// on `local`.
    pub async fn check(&self) -> Result<(), LeaseLost> {
        self.local()?;
        if !self.shared.unconfirmed.load(Ordering::SeqCst) {
            return Ok(());
        }
        self.read_check().await
    }

    /// [`TurnLease::check`] by reading the item.
    async fn read_check(&self) -> Result<(), LeaseLost> {
        match self.store.get(&self.user_id).await {
            Ok(Some(rec))
                if rec.state == MachineState::Ready
                    && rec
                        .live_lease(now_ms())
                        .is_some_and(|l| l.owner == self.owner) =>
            {
                self.local()
            }
            Ok(_) => {
                tracing::warn!(user_id = %self.user_id, "the turn lost its lease; stopping");
                self.shared.lost.store(true, Ordering::SeqCst);
                Err(LeaseLost::Taken)
            }
            Err(e) => {
                tracing::warn!(user_id = %self.user_id, error = %e, "lease check failed; relying on the renewals");
                self.local()
            }
        }
    }
}

/// A runner that checks the turn's lease before every command
/// ([`CommandRunner::permit`]).
pub struct Leased<'a, R, S> {
    /// The runner doing the work.
    pub inner: &'a mut R,
    /// The turn's lease.
    pub lease: &'a TurnLease<S>,
}

impl<R, S> CommandRunner for Leased<'_, R, S>
where
    R: CommandRunner,
    S: UserStore + 'static,
{
    async fn run(
        &mut self,
        command: &str,
        timeout: Duration,
    ) -> Result<CommandOutcome, RunnerError> {
        self.inner.run(command, timeout).await
    }

    async fn run_observed(
        &mut self,
        command: &str,
        timeout: Duration,
        observer: &dyn Observer,
    ) -> Result<CommandOutcome, RunnerError> {
        self.inner.run_observed(command, timeout, observer).await
    }

    async fn permit(&mut self) -> Result<(), RunnerError> {
        self.lease.check().await.map_err(|_| RunnerError::LeaseLost)
    }

    fn transport(&self) -> Transport {
        self.inner.transport()
    }

    async fn reopen(&mut self) -> Result<(), RunnerError> {
        self.permit().await?;
        self.inner.reopen().await
    }
}

/// The renewer: every third of `ttl`, extend the lease; a refusal marks it
/// lost and ends the task.
async fn renew<S: UserStore>(
    store: Arc<S>,
    user_id: UserId,
    owner: String,
    ttl: Duration,
    shared: Arc<Shared>,
) {
    let ttl_ms = millis(ttl);
    loop {
        tokio::time::sleep(ttl / 3).await;
        let now = now_ms();
        let until = now.saturating_add(ttl_ms);
        match store.renew_lease(&user_id, &owner, until, now).await {
            Ok(_) => {
                shared.confirmed_until.store(until, Ordering::SeqCst);
                shared.unconfirmed.store(false, Ordering::SeqCst);
            }
            Err(e @ (StoreError::Conflict { .. } | StoreError::NotFound { .. })) => {
                tracing::warn!(user_id = user_id.as_str(), error = %e, "turn lease renewal refused: the lease is lost");
                shared.lost.store(true, Ordering::SeqCst);
                return;
            }
            Err(e) => {
                tracing::warn!(user_id = user_id.as_str(), error = %e, "turn lease renewal failed; retrying");
                shared.unconfirmed.store(true, Ordering::SeqCst);
            }
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::user_id::uid;
    use crate::store::{AcquireOutcome, ClaimOutcome, Lease, LeaseKind, LeasePurpose, MemoryStore};

    const TTL: Duration = Duration::from_millis(300);

    async fn ready_store(user: &str) -> Arc<MemoryStore> {
        let store = Arc::new(MemoryStore::new());
        let now = now_ms();
        let key = crate::store::new_create_key();
        let lease = Lease::new("p", LeaseKind::Provision, now + 60_000);
        let claimed = store
            .claim(&uid(user), &key, &lease, now)
            .await
            .expect("claim");
        assert!(matches!(claimed, ClaimOutcome::Claimed(_)));
        store
            .record_machine_id(&uid(user), &key, "dm-1", now)
            .await
            .expect("id");
        store
            .mark_bootstrapping(&uid(user), "p", now)
            .await
            .expect("boot");
        store
            .mark_ready(&uid(user), "p", "v1", now)
            .await
            .expect("ready");
        store
            .release_lease(&uid(user), "p", now)
            .await
            .expect("release");
        store
    }

    async fn take(store: &MemoryStore, user: &str, owner: &str, now: u64) -> u64 {
        let until = now + TTL.as_millis() as u64;
        match store
            .acquire_lease(&uid(user), owner, LeasePurpose::Turn, until, now)
            .await
            .expect("acquire")
        {
            AcquireOutcome::Acquired(_) => until,
            other => panic!("not acquired: {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_renewal_refused_marks_the_lease_lost_and_the_check_says_so() {
        let store = ready_store("u").await;
        let until = take(&store, "u", "turn-a", now_ms()).await;
        let lease = TurnLease::start(store.clone(), &uid("u"), "turn-a", until + 5_000, TTL);
        assert_eq!(lease.check().await, Ok(()));
        // Another owner takes the lease (as if ours had expired).
        take(&store, "u", "turn-b", now_ms() + 10_000).await;
        tokio::time::sleep(TTL).await;
        assert!(lease.is_lost(), "the renewer's refusal is visible");
        assert_eq!(lease.check().await, Err(LeaseLost::Taken));
    }

    #[tokio::test]
    async fn a_confirmed_lease_is_checked_without_a_read_and_an_unconfirmed_one_by_reading() {
        let store = ready_store("u").await;
        let until = take(&store, "u", "turn-a", now_ms()).await;
        let lease = TurnLease::start(
            store.clone(),
            &uid("u"),
            "turn-a",
            until + 5_000,
            Duration::from_secs(60),
        );
        // Taken with a clock an hour ahead: only a read can tell.
        take(&store, "u", "turn-b", now_ms() + 3_600_000).await;
        assert_eq!(lease.check().await, Ok(()), "confirmed: no read");
        // A renewal failed: the next check reads the item.
        lease.shared.unconfirmed.store(true, Ordering::SeqCst);
        assert_eq!(lease.check().await, Err(LeaseLost::Taken));
        assert!(lease.is_lost());
    }

    #[tokio::test]
    async fn the_renewer_dies_with_a_panicking_turn() {
        let store = ready_store("u").await;
        let until = take(&store, "u", "turn-a", now_ms()).await;
        let task_store = store.clone();
        let turn = tokio::spawn(async move {
            let _lease = TurnLease::start(task_store, &uid("u"), "turn-a", until, TTL);
            tokio::time::sleep(TTL).await;
            panic!("the turn task panics");
        });
        assert!(turn.await.is_err_and(|e| e.is_panic()));
        let after_panic = store.get(&uid("u")).await.expect("get").expect("item");
        tokio::time::sleep(TTL * 2).await;
        let later = store.get(&uid("u")).await.expect("get").expect("item");
        assert_eq!(
            later.lease, after_panic.lease,
            "no renewal after the turn panicked"
        );
        assert!(later.live_lease(now_ms()).is_none(), "the lease expires");
    }
}

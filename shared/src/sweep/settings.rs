//! The sweep's settings, read once at cold start from the environment with
//! the same rules (and [`ConfigError`]) as [`crate::config::Config`]: a
//! missing value takes its default, a malformed one fails the start naming
//! the variable.

use std::collections::HashMap;
use std::time::Duration;

use crate::config::ConfigError;
use crate::env::{malformed, Env};
use crate::store::ShardLayout;

/// How the sleep sweep and reconciliation behave (docs/design.md §5, §7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SweepSettings {
    /// `IDLE_AFTER` (default 5 min): an awake machine idle this long is a candidate.
    pub idle_after: Duration,
    /// `SWEEP_CONCURRENCY` (default 16): candidates processed at once.
    pub concurrency: usize,
    /// `RECONCILE_EVERY` (default 10): reconcile on every Nth scheduled run
    /// (minute of the epoch of the event time, modulo N; 1 = every run).
    pub reconcile_every: u32,
    /// `RECONCILE_SLEEP_ORPHANS` (default false): put running orphan
    /// machines (no item references them) to sleep, not only report them.
    pub reconcile_sleep_orphans: bool,
    /// `SWEEP_MARGIN` (default 10 s): stop this long before the Lambda deadline.
    pub margin: Duration,
    /// `SWEEP_PAGE_SIZE` (default 50): candidates per index query page.
    pub page_size: u32,
    /// `SWEEP_LEASE` (default 30 s): how long a sweep lease lasts. It covers
    /// one sleep call (bounded by `sleep_call_timeout`) and a few writes.
    pub lease_ttl: Duration,
    /// `SWEEP_SLEEP_TIMEOUT` (default 10 s): the whole budget of one sleep
    /// call (one attempt, no retries: a failure waits for the next run).
    pub sleep_call_timeout: Duration,
    /// `SWEEP_READ_TIMEOUT` (default 10 s): budget of one status read or
    /// list page (a couple of quick retries inside it).
    pub read_call_timeout: Duration,
    /// `SWEEP_MARKER_TIMEOUT` (default 8 s): budget of the completion-marker
    /// check of a held command (one tiny execution).
    pub marker_check_timeout: Duration,
    /// `RECONCILE_ORPHAN_GRACE` (default 15 min): a machine younger than
    /// this is not called an orphan (its provisioning may not have recorded
    /// its id yet, and the `by-machine` index is eventually consistent).
    /// Keep it at least the provision function's timeout: a worker records
    /// the machine it created within its invocation.
    pub orphan_grace: Duration,
    /// `RECONCILE_DESTROY_ORPHANS` (default true): destroy machines no item
    /// references once they are older than `orphan_grace` (a deleted user's
    /// machine whose worker died before it could destroy it). `false` only
    /// reports them (and sleeps them with `RECONCILE_SLEEP_ORPHANS`): set it
    /// when the Dedalus key also owns machines agenthome did not create.
    pub reconcile_destroy_orphans: bool,
    /// `AWAKE_SHARDS` / `AWAKE_SHARDS_PREVIOUS`: the shards a run reads
    /// (the union of both ranges while a shard-count change is migrated).
    pub shards: ShardLayout,
    /// `SWEEP_WORKERS` (default 8): at most this many parallel workers a
    /// scheduled run hands shard ranges to (never more than the shards).
    pub workers: u32,
    /// `SWEEP_FANOUT_THRESHOLD` (default 5000): estimated idle candidates
    /// from which a scheduled run fans out; below it, one invocation sweeps
    /// every shard itself (today's path).
    pub fanout_threshold: u64,
    /// `SWEEP_SLEEP_RATE` (default 2000): sleep calls per second for the
    /// whole Dedalus key; each of `n` workers gets `rate / n`.
    pub sleep_rate: u32,
    /// `IDLE_POLICY` (default `fixed`): `adaptive` learns each user's
    /// rhythm from the gaps between their turns and schedules an earlier
    /// sleep when the history says they are gone (`IDLE_AFTER` stays the
    /// ceiling; see `sweep::adaptive`).
    pub idle_policy: super::adaptive::IdlePolicy,
}

impl Default for SweepSettings {
    fn default() -> Self {
        Self {
            idle_after: Duration::from_secs(300),
            concurrency: 16,
            reconcile_every: 10,
            reconcile_sleep_orphans: false,
            margin: Duration::from_secs(10),
            page_size: 50,
            lease_ttl: Duration::from_secs(30),
            sleep_call_timeout: Duration::from_secs(10),
            read_call_timeout: Duration::from_secs(10),
            marker_check_timeout: Duration::from_secs(8),
            orphan_grace: Duration::from_secs(15 * 60),
            reconcile_destroy_orphans: true,
            shards: ShardLayout::default(),
            workers: 8,
            fanout_threshold: 5000,
            sleep_rate: 2000,
            idle_policy: super::adaptive::IdlePolicy::Fixed,
        }
    }
}

impl SweepSettings {
    /// Read the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_map(&std::env::vars().collect())
    }

    /// Read from a map (tests).
    pub fn from_map(vars: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let env = Env::new(vars);
        let d = Self::default();
        let settings = Self {
            idle_after: env.duration("IDLE_AFTER", d.idle_after)?,
            concurrency: env.count("SWEEP_CONCURRENCY", d.concurrency as u64, 1024)? as usize,
            reconcile_every: env.count("RECONCILE_EVERY", u64::from(d.reconcile_every), 100_000)?
                as u32,
            reconcile_sleep_orphans: env
                .flag("RECONCILE_SLEEP_ORPHANS", d.reconcile_sleep_orphans)?,
            margin: env.duration("SWEEP_MARGIN", d.margin)?,
            page_size: env.count("SWEEP_PAGE_SIZE", u64::from(d.page_size), 1000)? as u32,
            lease_ttl: env.duration("SWEEP_LEASE", d.lease_ttl)?,
            sleep_call_timeout: env.duration("SWEEP_SLEEP_TIMEOUT", d.sleep_call_timeout)?,
            read_call_timeout: env.duration("SWEEP_READ_TIMEOUT", d.read_call_timeout)?,
            marker_check_timeout: env.duration("SWEEP_MARKER_TIMEOUT", d.marker_check_timeout)?,
            orphan_grace: env.duration("RECONCILE_ORPHAN_GRACE", d.orphan_grace)?,
            reconcile_destroy_orphans: env
                .flag("RECONCILE_DESTROY_ORPHANS", d.reconcile_destroy_orphans)?,
            shards: ShardLayout::from_map(vars)?,
            workers: env.count("SWEEP_WORKERS", u64::from(d.workers), 1024)? as u32,
            fanout_threshold: env.count("SWEEP_FANOUT_THRESHOLD", d.fanout_threshold, u64::MAX)?,
            sleep_rate: env.count("SWEEP_SLEEP_RATE", u64::from(d.sleep_rate), 1_000_000)? as u32,
            idle_policy: env.parse("IDLE_POLICY", d.idle_policy, |raw| {
                super::adaptive::IdlePolicy::parse(raw).ok_or("expected fixed or adaptive")
            })?,
        };
        if settings.lease_ttl <= settings.sleep_call_timeout {
            return Err(malformed(
                "SWEEP_LEASE",
                &humantime::format_duration(settings.lease_ttl).to_string(),
                "must be longer than SWEEP_SLEEP_TIMEOUT (the lease covers the sleep call)",
            ));
        }
        Ok(settings)
    }

    /// Whether the scheduled run at `event_time_ms` (epoch ms) also
    /// reconciles: the minute of the epoch modulo `reconcile_every` is 0, so
    /// no state is kept between runs.
    pub fn reconcile_due(&self, event_time_ms: u64) -> bool {
        let minute = event_time_ms / 60_000;
        minute % u64::from(self.reconcile_every.max(1)) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::env::vars as env;

    #[test]
    fn given_no_variables_when_read_then_the_defaults_apply() {
        let s = SweepSettings::from_map(&env(&[])).expect("defaults");
        assert_eq!(s, SweepSettings::default());
        assert_eq!(s.idle_after, Duration::from_secs(300));
        assert_eq!(s.concurrency, 16);
        assert_eq!(s.reconcile_every, 10);
        assert!(!s.reconcile_sleep_orphans);
        assert!(s.reconcile_destroy_orphans);
        assert_eq!(s.margin, Duration::from_secs(10));
    }

    #[test]
    fn given_values_when_read_then_they_are_used() {
        let s = SweepSettings::from_map(&env(&[
            ("IDLE_AFTER", "90s"),
            ("SWEEP_CONCURRENCY", "4"),
            ("RECONCILE_EVERY", "1"),
            ("RECONCILE_SLEEP_ORPHANS", "TRUE"),
            ("RECONCILE_DESTROY_ORPHANS", "false"),
            ("SWEEP_MARGIN", "2s"),
            ("IDLE_POLICY", "adaptive"),
        ]))
        .expect("settings");
        assert_eq!(s.idle_policy, super::super::adaptive::IdlePolicy::Adaptive);
        assert_eq!(s.idle_after, Duration::from_secs(90));
        assert_eq!(s.concurrency, 4);
        assert_eq!(s.reconcile_every, 1);
        assert!(s.reconcile_sleep_orphans);
        assert!(!s.reconcile_destroy_orphans);
        assert_eq!(s.margin, Duration::from_secs(2));
        let s = SweepSettings::from_map(&env(&[
            ("SWEEP_WORKERS", "32"),
            ("SWEEP_FANOUT_THRESHOLD", "100"),
            ("SWEEP_SLEEP_RATE", "500"),
            ("AWAKE_SHARDS", "64"),
            ("AWAKE_SHARDS_PREVIOUS", "8"),
        ]))
        .expect("settings");
        assert_eq!(
            (s.workers, s.fanout_threshold, s.sleep_rate),
            (32, 100, 500)
        );
        assert_eq!(s.shards.read_shards().len(), 64);
        assert_eq!(s.shards.previous, Some(8));
    }

    #[test]
    fn given_malformed_values_when_read_then_the_error_names_the_variable() {
        for (name, bad) in [
            ("IDLE_AFTER", "five minutes"),
            ("SWEEP_CONCURRENCY", "0"),
            ("SWEEP_CONCURRENCY", "-3"),
            ("RECONCILE_EVERY", "ten"),
            ("RECONCILE_SLEEP_ORPHANS", "maybe"),
            ("RECONCILE_DESTROY_ORPHANS", "sometimes"),
            ("SWEEP_MARGIN", "10"),
            ("SWEEP_LEASE", "1s"),
            ("SWEEP_WORKERS", "0"),
            ("SWEEP_FANOUT_THRESHOLD", "lots"),
            ("SWEEP_SLEEP_RATE", "0"),
            ("AWAKE_SHARDS", "0"),
            ("IDLE_POLICY", "smart"),
        ] {
            let err = SweepSettings::from_map(&env(&[(name, bad)])).expect_err(name);
            assert!(
                matches!(&err, ConfigError::Malformed { name: n, .. } if *n == name),
                "{name}={bad}: {err}"
            );
            assert!(err.to_string().contains(name), "{err}");
        }
    }

    #[test]
    fn given_event_minutes_when_checked_then_every_nth_minute_reconciles() {
        let s = SweepSettings::default();
        let due: Vec<u64> = (0..30u64)
            .filter(|m| s.reconcile_due(m * 60_000 + 1234))
            .collect();
        assert_eq!(due, vec![0, 10, 20]);
        let every = SweepSettings {
            reconcile_every: 1,
            ..SweepSettings::default()
        };
        assert!((0..5u64).all(|m| every.reconcile_due(m * 60_000)));
    }
}

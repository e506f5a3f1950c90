//! What one sweep (and reconciliation) run did, and its one summary line in
//! CloudWatch Embedded Metric Format.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::metrics::{EmfDoc, LineSpec, MetricSpec, MetricsConfig};

/// Counts of one run. Every candidate lands in exactly one of `slept`,
/// `skipped_busy`, `skipped_hold`, `held_by_running_command`, `failed`,
/// `lost`, `fixed`, `awaiting_autosleep` or `not_reached`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SweepReport {
    /// Idle awake items the index query returned.
    pub candidates: u64,
    /// Machines put to sleep by an explicit sleep call (items marked asleep).
    pub slept: u64,
    /// A live lease (a turn, provisioning, another sweep) or a changed
    /// `last_active_at` kept the sweep off the item.
    pub skipped_busy: u64,
    /// Inside the platform's sleep hold window (`sleep_eligible_at` in the
    /// future, or `SLEEP_HOLD_WINDOW_ACTIVE` now).
    pub skipped_hold: u64,
    /// A command the agent left running is still running (marker absent,
    /// hold not expired).
    pub held_by_running_command: u64,
    /// Left for the next run: 429, 503, timeouts, transport or store errors.
    pub failed: u64,
    /// Items whose machine is gone (404 / destroyed): marked lost.
    pub lost: u64,
    /// Reconciliation: running machines that no item references.
    pub orphans: u64,
    /// Orphans put to sleep (`RECONCILE_SLEEP_ORPHANS=true`).
    pub orphans_slept: u64,
    /// Orphans older than the grace period destroyed
    /// (`RECONCILE_DESTROY_ORPHANS=true`).
    pub orphans_destroyed: u64,
    /// Items corrected to the machine's real phase (slept on its own, or
    /// running while the item said asleep).
    pub fixed: u64,
    /// Explicit sleep was refused (401/403) in this run; no further sleep
    /// calls were made and phases were read instead.
    pub sleep_unavailable: bool,
    /// With sleep unavailable: machines still running, left to autosleep.
    pub awaiting_autosleep: u64,
    /// Candidates not processed because the deadline came first.
    pub not_reached: u64,
    /// The run stopped before the deadline with work left (pages, candidates
    /// or machines not looked at).
    pub remaining: bool,
    /// Reconciliation ran in this run.
    pub reconciled: bool,
    /// Machines reconciliation looked at.
    pub machines_listed: u64,
    /// Of those, the machines the platform said were running (awake and
    /// billed), counted by reconciliation only.
    pub machines_running: u64,
    /// Wall time of the run.
    pub duration_ms: u64,
    /// Candidates left for the next run because pacing (`SWEEP_SLEEP_RATE`,
    /// or a `Retry-After` the platform asked for) would not let their sleep
    /// call go out before the run's deadline.
    #[serde(default)]
    pub deferred: u64,
    /// Sleep calls answered 429: the worker then sent no further sleep
    /// before the `Retry-After` passed (the candidate counts as `failed`).
    #[serde(default)]
    pub rate_limited: u64,
    /// Parallel workers this run handed shard ranges to (0: one invocation
    /// swept every shard itself).
    #[serde(default)]
    pub workers: u64,
    /// Workers whose invocation failed or did not answer before the
    /// coordinator's deadline (their shards are swept by the next run).
    #[serde(default)]
    pub workers_failed: u64,
    /// Due pending sleeps (requested or adaptive) the `pending-sleep` index
    /// query returned; each lands in one of the outcome counts too.
    #[serde(default)]
    pub pending_candidates: u64,
    /// Index queries (the `awake` or `pending-sleep` index) that failed:
    /// their shard was left for the next run (`remaining`). Non-zero on
    /// every run means the sweep cannot see the table.
    #[serde(default)]
    pub index_errors: u64,
}

/// The run's EMF line: every count, the two flags as 0/1 and the run's
/// duration; `machines_running` only on runs that reconciled.
pub const SWEEP_LINE: LineSpec = LineSpec {
    function: "sleep-sweep",
    dimensions: &[],
    metrics: &[
        MetricSpec::count("candidates"),
        MetricSpec::count("slept"),
        MetricSpec::count("skipped_busy"),
        MetricSpec::count("skipped_hold"),
        MetricSpec::count("held_by_running_command"),
        MetricSpec::count("failed"),
        MetricSpec::count("lost"),
        MetricSpec::count("orphans"),
        MetricSpec::count("orphans_slept"),
        MetricSpec::count("orphans_destroyed"),
        MetricSpec::count("fixed"),
        MetricSpec::count("awaiting_autosleep"),
        MetricSpec::count("not_reached"),
        MetricSpec::count("machines_listed"),
        MetricSpec::count("machines_running"),
        MetricSpec::count("sleep_unavailable"),
        MetricSpec::count("remaining"),
        MetricSpec::ms("duration_ms"),
        MetricSpec::count("deferred"),
        MetricSpec::count("rate_limited"),
        MetricSpec::count("workers"),
        MetricSpec::count("workers_failed"),
        MetricSpec::count("pending_candidates"),
        MetricSpec::count("index_errors"),
    ],
    breakdowns: &[],
    properties: &["reconciled"],
};

impl SweepReport {
    /// Add another part's counts (the sweep and the reconciliation of one run).
    pub fn merge(&mut self, other: &SweepReport) {
        self.candidates += other.candidates;
        self.slept += other.slept;
        self.skipped_busy += other.skipped_busy;
        self.skipped_hold += other.skipped_hold;
        self.held_by_running_command += other.held_by_running_command;
        self.failed += other.failed;
        self.lost += other.lost;
        self.orphans += other.orphans;
        self.orphans_slept += other.orphans_slept;
        self.orphans_destroyed += other.orphans_destroyed;
        self.fixed += other.fixed;
        self.sleep_unavailable |= other.sleep_unavailable;
        self.awaiting_autosleep += other.awaiting_autosleep;
        self.not_reached += other.not_reached;
        self.remaining |= other.remaining;
        self.reconciled |= other.reconciled;
        self.machines_listed += other.machines_listed;
        self.machines_running += other.machines_running;
        self.duration_ms = self.duration_ms.max(other.duration_ms);
        self.deferred += other.deferred;
        self.rate_limited += other.rate_limited;
        self.workers += other.workers;
        self.workers_failed += other.workers_failed;
        self.pending_candidates += other.pending_candidates;
        self.index_errors += other.index_errors;
    }

    /// The run's summary as one CloudWatch Embedded Metric Format line
    /// ([`SWEEP_LINE`]), published under `Stack` and `Function`; the
    /// `reconciled` flag is a property.
    pub fn emf_doc(&self, config: &MetricsConfig, timestamp_ms: u64) -> EmfDoc {
        let mut doc = EmfDoc::new(&SWEEP_LINE, config, timestamp_ms);
        let fields = match serde_json::to_value(self) {
            Ok(Value::Object(m)) => m,
            _ => serde_json::Map::new(),
        };
        for m in SWEEP_LINE.metrics {
            if m.name == "machines_running" && !self.reconciled {
                continue;
            }
            let value = match fields.get(m.name) {
                Some(Value::Bool(b)) => u64::from(*b),
                Some(v) => v.as_u64().unwrap_or(0),
                None => 0,
            };
            doc.metric(m.name, value);
        }
        doc.property("reconciled", self.reconciled);
        doc
    }

    /// [`SweepReport::emf_doc`] as JSON.
    pub fn to_emf(&self, config: &MetricsConfig, timestamp_ms: u64) -> Value {
        self.emf_doc(config, timestamp_ms).to_value()
    }

    /// [`SweepReport::to_emf`] as one JSON line (no newline inside).
    pub fn emf_line(&self, config: &MetricsConfig, timestamp_ms: u64) -> String {
        self.emf_doc(config, timestamp_ms).line()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn given_a_report_when_rendered_as_emf_then_every_metric_has_a_value() {
        let r = SweepReport {
            candidates: 5,
            slept: 3,
            failed: 1,
            sleep_unavailable: true,
            duration_ms: 42,
            ..SweepReport::default()
        };
        let line = r.emf_line(&MetricsConfig::default(), 1_700_000_000_000);
        assert!(!line.contains('\n'));
        let v: Value = serde_json::from_str(&line).expect("json");
        assert_eq!(v["_aws"]["Timestamp"], 1_700_000_000_000u64);
        let cwm = &v["_aws"]["CloudWatchMetrics"][0];
        assert_eq!(cwm["Namespace"], "agenthome");
        assert_eq!(cwm["Dimensions"], json!([["Stack", "Function"]]));
        assert_eq!(
            (v["Stack"].as_str(), v["Function"].as_str()),
            (Some("agenthome"), Some("sleep-sweep"))
        );
        assert!(v.get("machines_running").is_none(), "only when reconciled");
        for m in cwm["Metrics"].as_array().expect("metrics") {
            let name = m["Name"].as_str().expect("name");
            assert!(v[name].is_number(), "{name} has a numeric value");
        }
        assert_eq!(v["slept"], 3);
        assert_eq!(v["sleep_unavailable"], 1);
        assert_eq!(v["duration_ms"], 42);
    }

    #[test]
    fn given_two_parts_when_merged_then_counts_add_and_flags_or() {
        let mut a = SweepReport {
            slept: 1,
            remaining: false,
            ..SweepReport::default()
        };
        a.merge(&SweepReport {
            slept: 2,
            orphans: 1,
            remaining: true,
            reconciled: true,
            ..SweepReport::default()
        });
        assert_eq!(
            (a.slept, a.orphans, a.remaining, a.reconciled),
            (3, 1, true, true)
        );
    }
}

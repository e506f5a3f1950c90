//! What one sweep (and reconciliation) run did, and its one summary line in
//! CloudWatch Embedded Metric Format.

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

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
    /// Wall time of the run.
    pub duration_ms: u64,
}

/// The counters published as metrics (name, value) — everything but flags.
const COUNTS: &[&str] = &[
    "candidates",
    "slept",
    "skipped_busy",
    "skipped_hold",
    "held_by_running_command",
    "failed",
    "lost",
    "orphans",
    "orphans_slept",
    "orphans_destroyed",
    "fixed",
    "awaiting_autosleep",
    "not_reached",
    "machines_listed",
];

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
        self.duration_ms = self.duration_ms.max(other.duration_ms);
    }

    /// The run's summary as one CloudWatch Embedded Metric Format document:
    /// namespace `agenthome`, no dimensions, every count as a `Count`
    /// metric, `duration_ms` as `Milliseconds`, flags as 0/1 `Count`s.
    pub fn to_emf(&self, timestamp_ms: u64) -> Value {
        let mut doc = Map::new();
        let mut metrics = Vec::new();
        let fields = match serde_json::to_value(self) {
            Ok(Value::Object(m)) => m,
            _ => Map::new(),
        };
        for name in COUNTS {
            metrics.push(json!({"Name": name, "Unit": "Count"}));
            doc.insert(
                (*name).to_owned(),
                fields.get(*name).cloned().unwrap_or(json!(0)),
            );
        }
        for (name, flag) in [
            ("sleep_unavailable", self.sleep_unavailable),
            ("remaining", self.remaining),
        ] {
            metrics.push(json!({"Name": name, "Unit": "Count"}));
            doc.insert(name.to_owned(), json!(u64::from(flag)));
        }
        metrics.push(json!({"Name": "duration_ms", "Unit": "Milliseconds"}));
        doc.insert("duration_ms".to_owned(), json!(self.duration_ms));
        doc.insert("reconciled".to_owned(), json!(self.reconciled));
        doc.insert(
            "_aws".to_owned(),
            json!({
                "Timestamp": timestamp_ms,
                "CloudWatchMetrics": [{
                    "Namespace": "agenthome",
                    "Dimensions": [[]],
                    "Metrics": metrics,
                }],
            }),
        );
        Value::Object(doc)
    }

    /// [`SweepReport::to_emf`] as one JSON line (no newline inside).
    pub fn emf_line(&self, timestamp_ms: u64) -> String {
        self.to_emf(timestamp_ms).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let line = r.emf_line(1_700_000_000_000);
        assert!(!line.contains('\n'));
        let v: Value = serde_json::from_str(&line).expect("json");
        assert_eq!(v["_aws"]["Timestamp"], 1_700_000_000_000u64);
        let cwm = &v["_aws"]["CloudWatchMetrics"][0];
        assert_eq!(cwm["Namespace"], "agenthome");
        assert_eq!(cwm["Dimensions"], json!([[]]));
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

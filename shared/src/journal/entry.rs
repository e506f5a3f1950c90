//! One journal entry: a transition of a user's machine, with its reason,
//! its actor and the cost-relevant facts (docs/design.md §4 "Journal").

use serde::{Deserialize, Serialize};

/// What happened to the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// The provisioning worker made the machine ready (`duration_ms`).
    Provisioned,
    /// The machine was woken (`reason`: `turn`; `duration_ms`: wake time).
    Woke,
    /// The machine was put to sleep, or found asleep (`reason`).
    Slept,
    /// A command left running holds the machine awake (`command`, `until_ms`).
    Held,
    /// A sleep was refused by the platform's hold window (`until_ms`: when it may).
    SleepRefused,
    /// The machine was found gone; the next provisioning recreates it.
    Lost,
    /// The machine was destroyed (account deletion).
    Destroyed,
}

/// Why it happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Woken by a chat turn.
    Turn,
    /// `POST …/machine/sleep`.
    Explicit,
    /// The conversation ended.
    EndConversation,
    /// Idle longer than `IDLE_AFTER` (`idle_ms`).
    Idle,
    /// An adaptive idle timeout.
    Adaptive,
    /// The awake budget was used up.
    Budget,
    /// The platform's own autosleep, found by the sweep or reconciliation.
    PlatformAutosleep,
    /// A new machine (first provisioning, or one replacing a lost machine).
    Created,
    /// The platform no longer has the machine (404).
    NotFound,
    /// Account deletion.
    Deleted,
}

/// Who did it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Actor {
    /// A chat turn.
    Turn,
    /// The sleep sweep (or reconciliation).
    Sweep,
    /// A machine route (`PUT`, `POST …/sleep`, `DELETE`).
    Route,
    /// The provisioning worker.
    Worker,
}

/// How an in-machine hook ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HookOutcome {
    /// No executable hook file.
    Absent,
    /// Exited 0.
    Ok,
    /// Exited non-zero.
    Failed,
    /// Killed at `HOOK_TIMEOUT`.
    TimedOut,
    /// Could not be run or its end not seen (the machine did not answer in time).
    Error,
}

/// The report of one hook run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookReport {
    /// `pre-sleep` or `post-wake`.
    pub hook: String,
    /// How it ran.
    pub outcome: HookOutcome,
    /// Its exit code, if it exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Time spent on it (the whole round trip).
    pub duration_ms: u64,
    /// The end of its combined output (capped).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub output: String,
}

/// One transition, as stored and as `GET …/machine/events` returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalEntry {
    /// Sort key and cursor: `{at_ms, 13 digits}#{32 hex}` (time-ordered, unique).
    pub id: String,
    /// When (epoch ms).
    pub at_ms: u64,
    /// What happened.
    pub event: Event,
    /// Why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    /// Who.
    pub actor: Actor,
    /// The machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_id: Option<String>,
    /// Awake time of the wake period this transition ended (slept, lost, destroyed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub awake_ms: Option<u64>,
    /// The user's total awake time after the transition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub awake_ms_total: Option<u64>,
    /// Provisioning or wake time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// Idle time before an idle sleep.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_ms: Option<u64>,
    /// How long the machine had slept (woke).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slept_ms: Option<u64>,
    /// The held command (an excerpt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// The held command's completion marker (relative to home).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub marker: Option<String>,
    /// Until when (a hold; or when a refused sleep may be retried), epoch ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until_ms: Option<u64>,
    /// Commands left running that the sleep interrupted (woke).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interrupted: Vec<String>,
    /// The hook run with this transition (pre-sleep with `slept`, post-wake with `woke`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook: Option<HookReport>,
}

/// Longest command excerpt kept in an entry.
const COMMAND_EXCERPT: usize = 200;

impl JournalEntry {
    /// A new entry at `at_ms` with a fresh id; add facts with the `with_*` methods.
    pub fn new(at_ms: u64, event: Event, actor: Actor) -> Self {
        JournalEntry {
            id: entry_id(at_ms),
            at_ms,
            event,
            reason: None,
            actor,
            machine_id: None,
            awake_ms: None,
            awake_ms_total: None,
            duration_ms: None,
            idle_ms: None,
            slept_ms: None,
            command: None,
            marker: None,
            until_ms: None,
            interrupted: Vec::new(),
            hook: None,
        }
    }

    /// Why.
    pub fn reason(mut self, reason: Reason) -> Self {
        self.reason = Some(reason);
        self
    }

    /// The machine.
    pub fn machine(mut self, machine_id: Option<&str>) -> Self {
        self.machine_id = machine_id.map(str::to_owned);
        self
    }

    /// Awake time of the period ended, and the total after it.
    pub fn awake(mut self, period_ms: Option<u64>, total_ms: u64) -> Self {
        self.awake_ms = period_ms;
        self.awake_ms_total = Some(total_ms);
        self
    }

    /// Provisioning or wake time.
    pub fn duration(mut self, ms: u64) -> Self {
        self.duration_ms = Some(ms);
        self
    }

    /// The held command (shortened) and its marker, until `until_ms`.
    pub fn held(mut self, command: &str, marker: &str, until_ms: u64) -> Self {
        self.command = Some(excerpt(command, COMMAND_EXCERPT));
        self.marker = Some(marker.to_owned());
        self.until_ms = Some(until_ms);
        self
    }
}

/// A fresh, time-ordered entry id for `at_ms`.
pub fn entry_id(at_ms: u64) -> String {
    format!("{at_ms:013}#{}", uuid::Uuid::now_v7().simple())
}

/// Whether `s` has the shape of an entry id (a cursor must).
pub fn is_entry_id(s: &str) -> bool {
    match s.split_once('#') {
        Some((ms, hex)) => {
            ms.len() == 13
                && ms.bytes().all(|b| b.is_ascii_digit())
                && hex.len() == 32
                && hex.bytes().all(|b| b.is_ascii_hexdigit())
        }
        None => false,
    }
}

/// At most `max` bytes of `s` (on a char boundary), with "…" when cut.
pub fn excerpt(s: &str, max: usize) -> String {
    crate::text::cut(s.trim(), max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_sort_by_time_and_validate() {
        let a = entry_id(1_700_000_000_000);
        let b = entry_id(1_700_000_000_001);
        assert!(a < b);
        assert!(is_entry_id(&a));
        assert!(!is_entry_id("1700000000000"));
        assert!(!is_entry_id("17000000000#0123456789abcdef0123456789abcdef"));
        assert!(!is_entry_id("1700000000000#xyz"));
    }

    #[test]
    fn entries_serialize_snake_case_without_empty_facts() {
        let e = JournalEntry::new(5, Event::SleepRefused, Actor::Sweep).reason(Reason::Idle);
        let v = serde_json::to_value(&e).expect("json");
        assert_eq!(v["event"], "sleep_refused");
        assert_eq!(v["reason"], "idle");
        assert!(v.get("hook").is_none() && v.get("interrupted").is_none());
        let back: JournalEntry = serde_json::from_value(v).expect("decode");
        assert_eq!(back, e);
    }

    #[test]
    fn long_commands_are_cut() {
        let e = JournalEntry::new(1, Event::Held, Actor::Turn).held(&"x".repeat(500), "m", 9);
        assert!(e.command.as_deref().is_some_and(|c| c.len() <= 200 + 3));
    }
}

//! The typed user→machine item (docs/design.md §4) and its DynamoDB attribute mapping.
//!
//! On the wire (DynamoDB and JSON) the item is flat: one attribute per field,
//! `lease_owner`/`lease_kind`/`lease_until` and `hold_until`/`hold_marker`
//! included, absent attributes for `None`. In Rust the lease and the hold are
//! grouped ([`Lease`], [`Hold`]) so a half-written lease cannot be represented.
//! Unknown attributes are ignored; a malformed known attribute is
//! [`StoreError::Malformed`] naming it.

use std::collections::HashMap;

use aws_sdk_dynamodb::types::AttributeValue;
use serde::{Deserialize, Serialize};

use super::table::attr;
use super::StoreError;
use crate::api::UserId;

/// A DynamoDB item as the SDK represents it.
pub type Item = HashMap<String, AttributeValue>;

/// Provisioning state of the user's machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MachineState {
    /// Item claimed; the machine is being (or about to be) created.
    Provisioning,
    /// Machine exists; the bootstrap script is running.
    Bootstrapping,
    /// Machine exists and is bootstrapped.
    Ready,
    /// Provisioning failed (or the machine was lost); `last_error` says why.
    Failed,
    /// Account deletion in progress; the item goes away next.
    Destroying,
}

impl MachineState {
    /// The attribute value stored for this state.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Provisioning => "provisioning",
            Self::Bootstrapping => "bootstrapping",
            Self::Ready => "ready",
            Self::Failed => "failed",
            Self::Destroying => "destroying",
        }
    }
}

/// What the table believes about the machine's power.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Power {
    /// Running; counted in the `awake` index.
    Awake,
    /// Put to sleep (by the sweep, or found asleep by reconciliation).
    Asleep,
    /// Not known (no machine yet, or the machine was lost).
    Unknown,
}

impl Power {
    /// The attribute value stored for this power state.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Awake => "awake",
            Self::Asleep => "asleep",
            Self::Unknown => "unknown",
        }
    }
}

/// Why a lease is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LeaseKind {
    /// A chat turn drives the machine.
    Turn,
    /// The sleep sweep is putting the machine to sleep.
    Sweep,
    /// The provisioning worker is creating/bootstrapping the machine.
    Provision,
}

impl LeaseKind {
    /// The attribute value stored for this kind.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Turn => "turn",
            Self::Sweep => "sweep",
            Self::Provision => "provision",
        }
    }
}

/// A time-bounded exclusive claim on the item. `owner` must be unique per
/// acquisition (e.g. a turn id), so a later holder never mistakes another's
/// lease for its own.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Lease {
    /// Who holds it (unique per acquisition).
    pub owner: String,
    /// Why it is held.
    pub kind: LeaseKind,
    /// Epoch ms after which others may take it.
    pub until: u64,
}

impl Lease {
    /// A lease for `owner` of `kind`, live until `until` (epoch ms).
    pub fn new(owner: impl Into<String>, kind: LeaseKind, until: u64) -> Self {
        Self {
            owner: owner.into(),
            kind,
            until,
        }
    }

    /// Whether the lease still excludes others at `now_ms`
    /// (the store's rule: live while `now_ms <= until`).
    pub fn is_live(&self, now_ms: u64) -> bool {
        now_ms <= self.until
    }
}

/// The awake budget's daily baseline: `awake_ms_total` as of the start of
/// the UTC day `day_start` (see `entry::awake_budget`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AwakeDay {
    /// Epoch ms of the UTC midnight starting the day.
    pub day_start: u64,
    /// `awake_ms_total` at that midnight.
    pub base_ms: u64,
}

/// Keeps the machine awake while a command the agent left running finishes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Hold {
    /// Epoch ms after which the hold no longer counts.
    pub until: u64,
    /// Path of the completion marker on the machine.
    pub marker: String,
}

/// Why a sleep is pending.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SleepReason {
    /// The chat product asked for it (`POST …/machine/sleep` or a turn with
    /// `end_conversation`) inside the platform's hold window.
    Requested,
    /// The user's idle deadline learnt from their gaps (`IDLE_POLICY=adaptive`).
    Adaptive,
}

impl SleepReason {
    /// The attribute value stored for this reason.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Requested => "requested",
            Self::Adaptive => "adaptive",
        }
    }
}

/// A sleep the sweep carries out from `at` on (the `pending-sleep` index),
/// unless a turn starts first (a turn's lease acquisition removes it).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PendingSleep {
    /// Shard of the `pending-sleep` index (the user's awake shard).
    pub shard: String,
    /// Epoch ms from which it is due.
    pub at: u64,
    /// Why.
    pub reason: SleepReason,
}

/// One user's item in the user→machine table (docs/design.md §4).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "Wire", try_from = "Wire")]
pub struct UserRecord {
    /// Partition key. Parsed once, when the item is decoded: a stored id
    /// that is not a valid [`UserId`] makes the item
    /// [`StoreError::Malformed`] (attribute `user_id`), like any other
    /// ill-typed attribute, and never a panic. Readers treat it as they
    /// treat every malformed item: the sweep's shard walk logs the failed
    /// page and leaves that shard for the next run; a route answers with
    /// its table error.
    pub user_id: UserId,
    /// Dedalus machine id (opaque), recorded right after the create call.
    pub machine_id: Option<String>,
    /// Provisioning state.
    pub state: MachineState,
    /// Believed power state.
    pub power: Power,
    /// Bumped on every write (optimistic concurrency).
    pub generation: u64,
    /// Idempotency-Key of the create call (32 hex), stored before the call.
    pub create_key: String,
    /// Bootstrap version that succeeded on the machine.
    pub bootstrap_version: Option<String>,
    /// Epoch ms of the last activity (sort key of the `awake` index).
    pub last_active_at: u64,
    /// Current lease, live or expired.
    pub lease: Option<Lease>,
    /// Terminal to reuse on the next turn.
    pub terminal_id: Option<String>,
    /// Other terminals kept: busy with a command left running, or the one
    /// idle spare.
    pub parked_terminals: Vec<String>,
    /// Epoch ms the machine was last seen waking (present while awake).
    pub awake_since: Option<u64>,
    /// Accumulated awake time, ms.
    pub awake_ms_total: u64,
    /// Set when sleep was refused by the platform's hold window.
    pub sleep_eligible_at: Option<u64>,
    /// Hold of an item written before holds became a set (read, never
    /// written: [`UserRecord::holds`] has the others).
    pub hold: Option<Hold>,
    /// One hold per command a turn left running; each keeps the machine
    /// awake until its marker exists or it expires.
    pub holds: Vec<Hold>,
    /// Last error (provisioning failure, lost machine).
    pub last_error: Option<String>,
    /// Epoch ms of the last write.
    pub updated_at: u64,
    /// Epoch ms of the claim.
    pub created_at: u64,
    /// Shard of the `awake` index; present only while awake (makes it sparse).
    pub awake_shard: Option<String>,
    /// The awake budget's baseline of the current day, once noted.
    pub awake_day: Option<AwakeDay>,
    /// Worker runs that took the provisioning lease since this provisioning
    /// started (`claim` and `restart_provisioning` reset it to 0).
    pub provision_attempts: u64,
    /// A sleep due from a given time (requested or adaptive), if any.
    pub pending_sleep: Option<PendingSleep>,
    /// Adaptive idle: counts of the user's inter-turn gaps per bucket.
    pub gap_hist: Vec<u32>,
    /// What the turns wrote for the next turn (sequence, clean end,
    /// fair-use counter).
    pub turns: TurnMarks,
}

/// Per-turn bookkeeping on the item (`turn_seq`, `clean_seq`,
/// `turns_window`, `turns_count`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct TurnMarks {
    /// Turns begun (each begin adds one).
    pub seq: u64,
    /// `seq` of the last turn that ended with its shell known idle (its
    /// commands all finished, the lease still its own).
    pub clean_seq: u64,
    /// Fair use: start (epoch ms) of the window `count` belongs to.
    pub window: Option<u64>,
    /// Fair use: turns counted in `window`.
    pub count: u64,
    /// `last_active_at` as the last turn's begin found it (0 = no turn yet).
    pub previous_active_at: u64,
}

impl TurnMarks {
    /// The turn that began as `seq` follows a turn that ended cleanly: its
    /// stored terminal was left idle and no command of it is running.
    pub fn previous_ended_clean(&self) -> bool {
        self.clean_seq > 0 && self.clean_seq + 1 == self.seq
    }
}

impl UserRecord {
    /// Every hold: the set and a single hold from an older item.
    pub fn all_holds(&self) -> impl Iterator<Item = &Hold> {
        self.hold.iter().chain(self.holds.iter())
    }

    /// The lease if it is still live at `now_ms`.
    pub fn live_lease(&self, now_ms: u64) -> Option<&Lease> {
        self.lease.as_ref().filter(|l| l.is_live(now_ms))
    }

    /// Encode as a DynamoDB item.
    pub fn to_item(&self) -> Result<Item, StoreError> {
        serde_dynamo::to_item(Wire::from(self.clone())).map_err(|e| StoreError::Malformed {
            attribute: String::new(),
            message: format!("cannot encode item: {e}"),
        })
    }

    /// Decode a DynamoDB item. Unknown attributes are ignored; a missing or
    /// ill-typed known attribute is [`StoreError::Malformed`] naming it.
    pub fn from_item(item: Item) -> Result<Self, StoreError> {
        let item: serde_dynamo::Item = item.into();
        let de = serde_dynamo::Deserializer::from_attribute_value(serde_dynamo::AttributeValue::M(
            item.into(),
        ));
        let wire: Wire = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let message = e.into_inner().to_string();
            // A missing field is reported at the root; serde names it in the message.
            let attribute = match (path.as_str(), message.split('`').nth(1)) {
                (".", Some(field)) if message.starts_with("missing field") => field.to_owned(),
                _ => path,
            };
            StoreError::Malformed { attribute, message }
        })?;
        Self::try_from(wire)
    }
}

/// The flat attribute layout shared by DynamoDB and JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Wire {
    user_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    machine_id: Option<String>,
    state: MachineState,
    power: Power,
    generation: u64,
    create_key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    bootstrap_version: Option<String>,
    last_active_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lease_owner: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lease_kind: Option<LeaseKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lease_until: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    terminal_id: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    parked_terminals: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    awake_since: Option<u64>,
    #[serde(default)]
    awake_ms_total: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sleep_eligible_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    hold_until: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    hold_marker: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    holds: Vec<Hold>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_error: Option<String>,
    updated_at: u64,
    #[serde(default)]
    created_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    awake_shard: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    awake_day: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    awake_day_base: Option<u64>,
    #[serde(default)]
    provision_attempts: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sleep_shard: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sleep_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sleep_reason: Option<SleepReason>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    gap_hist: Vec<u32>,
    #[serde(default, skip_serializing_if = "is_zero")]
    turn_seq: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    clean_seq: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    turns_window: Option<u64>,
    #[serde(default, skip_serializing_if = "is_zero")]
    turns_count: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    prev_active_at: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl From<UserRecord> for Wire {
    fn from(r: UserRecord) -> Self {
        let (lease_owner, lease_kind, lease_until) = match r.lease {
            Some(l) => (Some(l.owner), Some(l.kind), Some(l.until)),
            None => (None, None, None),
        };
        let (hold_until, hold_marker) = match r.hold {
            Some(h) => (Some(h.until), Some(h.marker)),
            None => (None, None),
        };
        Self {
            user_id: r.user_id.into_string(),
            machine_id: r.machine_id,
            state: r.state,
            power: r.power,
            generation: r.generation,
            create_key: r.create_key,
            bootstrap_version: r.bootstrap_version,
            last_active_at: r.last_active_at,
            lease_owner,
            lease_kind,
            lease_until,
            terminal_id: r.terminal_id,
            parked_terminals: r.parked_terminals,
            awake_since: r.awake_since,
            awake_ms_total: r.awake_ms_total,
            sleep_eligible_at: r.sleep_eligible_at,
            hold_until,
            hold_marker,
            holds: r.holds,
            last_error: r.last_error,
            updated_at: r.updated_at,
            created_at: r.created_at,
            awake_shard: r.awake_shard,
            awake_day: r.awake_day.map(|d| d.day_start),
            awake_day_base: r.awake_day.map(|d| d.base_ms),
            provision_attempts: r.provision_attempts,
            sleep_shard: r.pending_sleep.as_ref().map(|p| p.shard.clone()),
            sleep_at: r.pending_sleep.as_ref().map(|p| p.at),
            sleep_reason: r.pending_sleep.as_ref().map(|p| p.reason),
            gap_hist: r.gap_hist,
            turn_seq: r.turns.seq,
            clean_seq: r.turns.clean_seq,
            turns_window: r.turns.window,
            turns_count: r.turns.count,
            prev_active_at: r.turns.previous_active_at,
        }
    }
}

impl TryFrom<Wire> for UserRecord {
    type Error = StoreError;

    fn try_from(w: Wire) -> Result<Self, StoreError> {
        let lease = lease_of(w.lease_owner, w.lease_kind, w.lease_until)?;
        let hold = hold_of(w.hold_until, w.hold_marker)?;
        let user_id = UserId::parse(&w.user_id).map_err(|e| StoreError::Malformed {
            attribute: attr::USER_ID.to_owned(),
            message: e.to_string(),
        })?;
        Ok(Self {
            user_id,
            machine_id: w.machine_id,
            state: w.state,
            power: w.power,
            generation: w.generation,
            create_key: w.create_key,
            bootstrap_version: w.bootstrap_version,
            last_active_at: w.last_active_at,
            lease,
            terminal_id: w.terminal_id,
            parked_terminals: w.parked_terminals,
            awake_since: w.awake_since,
            awake_ms_total: w.awake_ms_total,
            sleep_eligible_at: w.sleep_eligible_at,
            hold,
            holds: w.holds,
            last_error: w.last_error,
            updated_at: w.updated_at,
            created_at: w.created_at,
            awake_shard: w.awake_shard,
            // Both or neither; a half-written pair is ignored (the next
            // turn writes it whole).
            awake_day: match (w.awake_day, w.awake_day_base) {
                (Some(day_start), Some(base_ms)) => Some(AwakeDay { day_start, base_ms }),
                _ => None,
            },
            provision_attempts: w.provision_attempts,
            // All three or none (the store writes and removes them together).
            pending_sleep: match (w.sleep_shard, w.sleep_at, w.sleep_reason) {
                (Some(shard), Some(at), Some(reason)) => Some(PendingSleep { shard, at, reason }),
                _ => None,
            },
            gap_hist: w.gap_hist,
            turns: TurnMarks {
                seq: w.turn_seq,
                clean_seq: w.clean_seq,
                window: w.turns_window,
                count: w.turns_count,
                previous_active_at: w.prev_active_at,
            },
        })
    }
}

/// The lease's three attributes: all or none; a partial lease names the
/// first missing one.
fn lease_of(
    owner: Option<String>,
    kind: Option<LeaseKind>,
    until: Option<u64>,
) -> Result<Option<Lease>, StoreError> {
    match (owner, kind, until) {
        (Some(owner), Some(kind), Some(until)) => Ok(Some(Lease { owner, kind, until })),
        (None, None, None) => Ok(None),
        (owner, kind, _) => {
            let missing = if owner.is_none() {
                attr::LEASE_OWNER
            } else if kind.is_none() {
                attr::LEASE_KIND
            } else {
                attr::LEASE_UNTIL
            };
            Err(StoreError::Malformed {
                attribute: missing.to_owned(),
                message: "partial lease: lease_owner, lease_kind and lease_until go together"
                    .to_owned(),
            })
        }
    }
}

/// The legacy single hold's two attributes: both or neither.
fn hold_of(until: Option<u64>, marker: Option<String>) -> Result<Option<Hold>, StoreError> {
    match (until, marker) {
        (Some(until), Some(marker)) => Ok(Some(Hold { until, marker })),
        (None, None) => Ok(None),
        (until, _) => Err(StoreError::Malformed {
            attribute: if until.is_none() {
                attr::HOLD_UNTIL
            } else {
                attr::HOLD_MARKER
            }
            .to_owned(),
            message: "partial hold: hold_until and hold_marker go together".to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> UserRecord {
        UserRecord {
            user_id: "u1".into(),
            machine_id: Some("dm-1".into()),
            state: MachineState::Ready,
            power: Power::Awake,
            generation: 7,
            create_key: "0123456789abcdef0123456789abcdef".into(),
            bootstrap_version: Some("v1".into()),
            last_active_at: 1_700_000_000_000,
            lease: Some(Lease::new("turn-1", LeaseKind::Turn, 1_700_000_060_000)),
            terminal_id: Some("t-1".into()),
            parked_terminals: vec!["t-0".into()],
            awake_since: Some(1_699_999_000_000),
            awake_ms_total: 42,
            sleep_eligible_at: None,
            hold: Some(Hold {
                until: 1_700_000_900_000,
                marker: "/home/u/.agenthome/done-1".into(),
            }),
            holds: vec![Hold {
                until: 1_700_000_900_001,
                marker: ".agenthome/run/b.done".into(),
            }],
            last_error: None,
            updated_at: 1_700_000_000_001,
            created_at: 1_600_000_000_000,
            awake_shard: Some("3".into()),
            awake_day: Some(AwakeDay {
                day_start: 1_699_920_000_000,
                base_ms: 40,
            }),
            provision_attempts: 2,
            pending_sleep: Some(PendingSleep {
                shard: "3".into(),
                at: 1_700_000_300_000,
                reason: SleepReason::Requested,
            }),
            gap_hist: vec![0, 3, 1],
            turns: TurnMarks {
                seq: 3,
                clean_seq: 2,
                window: Some(1_700_000_000_000),
                count: 1,
                previous_active_at: 1_699_999_000_000,
            },
        }
    }

    #[test]
    fn given_a_full_record_when_encoded_and_decoded_then_it_round_trips_with_flat_attributes() {
        let rec = sample();
        let item = rec.to_item().expect("encode");
        assert_eq!(
            item.get("lease_kind"),
            Some(&AttributeValue::S("turn".into()))
        );
        assert_eq!(
            item.get("lease_until"),
            Some(&AttributeValue::N("1700000060000".into()))
        );
        assert_eq!(
            item.get("hold_marker"),
            Some(&AttributeValue::S("/home/u/.agenthome/done-1".into()))
        );
        assert!(
            !item.contains_key("last_error"),
            "None must be absent, not NULL"
        );
        assert_eq!(UserRecord::from_item(item).expect("decode"), rec);
    }

    #[test]
    fn given_unknown_attributes_when_decoded_then_they_are_ignored() {
        let mut item = sample().to_item().expect("encode");
        item.insert("future_field".into(), AttributeValue::Bool(true));
        assert_eq!(UserRecord::from_item(item).expect("decode"), sample());
    }

    #[test]
    fn given_a_malformed_attribute_when_decoded_then_the_error_names_it() {
        let mut item = sample().to_item().expect("encode");
        item.insert("lease_until".into(), AttributeValue::S("soon".into()));
        match UserRecord::from_item(item) {
            Err(StoreError::Malformed { attribute, .. }) => assert_eq!(attribute, "lease_until"),
            other => panic!("expected Malformed, got {other:?}"),
        }
        let mut item = sample().to_item().expect("encode");
        item.insert("state".into(), AttributeValue::S("exploded".into()));
        match UserRecord::from_item(item) {
            Err(StoreError::Malformed { attribute, .. }) => assert_eq!(attribute, "state"),
            other => panic!("expected Malformed, got {other:?}"),
        }
        let mut item = sample().to_item().expect("encode");
        item.remove("generation");
        match UserRecord::from_item(item) {
            Err(StoreError::Malformed { attribute, message }) => {
                assert_eq!(attribute, "generation", "{message}")
            }
            other => panic!("expected Malformed, got {other:?}"),
        }
    }

    #[test]
    fn given_a_stored_user_id_that_is_not_valid_when_decoded_then_the_item_is_malformed() {
        for bad in ["", "a/b", "-a"] {
            let mut item = sample().to_item().expect("encode");
            item.insert("user_id".into(), AttributeValue::S(bad.into()));
            match UserRecord::from_item(item) {
                Err(StoreError::Malformed { attribute, .. }) => assert_eq!(attribute, "user_id"),
                other => panic!("expected Malformed for {bad:?}, got {other:?}"),
            }
        }
    }

    #[test]
    fn given_a_partial_lease_when_decoded_then_the_missing_attribute_is_named() {
        let mut item = sample().to_item().expect("encode");
        item.remove("lease_kind");
        match UserRecord::from_item(item) {
            Err(StoreError::Malformed { attribute, .. }) => assert_eq!(attribute, "lease_kind"),
            other => panic!("expected Malformed, got {other:?}"),
        }
    }
}

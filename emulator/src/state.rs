//! The emulator's durable model (machines, executions, terminals,
//! idempotency records), its per-machine indexes, which records changed
//! since the last flush (see [`crate::store`]), and retention.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::store::RecordKey;
use crate::util::now_ms;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Accepted,
    PlacementPending,
    Starting,
    Running,
    Stopping,
    Sleeping,
    Destroying,
    Destroyed,
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Desired {
    Running,
    Sleeping,
    Destroyed,
}

impl Desired {
    /// The phase in which a machine has converged on this desired state.
    pub fn target_phase(self) -> Phase {
        match self {
            Self::Running => Phase::Running,
            Self::Sleeping => Phase::Sleeping,
            Self::Destroyed => Phase::Destroyed,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    pub id: String,
    pub seq: u64,
    pub vcpu: f64,
    pub memory_mib: i64,
    pub storage_gib: i64,
    pub desired: Desired,
    pub phase: Phase,
    pub reason: String,
    #[serde(default)]
    pub last_error: Option<String>,
    pub revision: u64,
    pub last_transition_ms: i64,
    pub last_progress_ms: i64,
    pub created_ms: i64,
    pub autosleep_seconds: u64,
    #[serde(default)]
    pub running_since_ms: Option<i64>,
    #[serde(default)]
    pub hold_until_ms: Option<i64>,
    #[serde(default)]
    pub hold_jitter_ms: u64,
    #[serde(default)]
    pub hold_window_ms: u64,
    pub last_activity_ms: i64,
    /// Bumped by every lifecycle operation; a timer whose op is stale stops.
    #[serde(default)]
    pub op: u64,
}

impl Machine {
    pub fn revision_str(&self) -> String {
        self.revision.to_string()
    }

    pub fn converged(&self) -> bool {
        self.phase == self.desired.target_phase()
    }

    /// Moves to `phase`, recording the transition and bumping the revision.
    pub fn transition(&mut self, phase: Phase, reason: &str) {
        let now = now_ms();
        self.phase = phase;
        self.reason = reason.to_owned();
        self.last_transition_ms = now;
        self.last_progress_ms = now;
        self.revision += 1;
    }

    /// A non-phase change (update): bumps the revision.
    pub fn touch_revision(&mut self) {
        self.last_progress_ms = now_ms();
        self.revision += 1;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExecStatus {
    WakeInProgress,
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    Expired,
}

impl ExecStatus {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Succeeded | Self::Failed | Self::Cancelled | Self::Expired
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Lifecycle,
    Stdout,
    Stderr,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecEvent {
    pub sequence: u64,
    pub kind: EventKind,
    pub at_ms: i64,
    /// Output events: the byte range `[start, end)` of the stream's kept
    /// data this event carries (the output is stored once, not twice).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range: Option<[u64; 2]>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<ExecStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
}

/// Captured output of one stream, bounded by the output limit.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Captured {
    #[serde(with = "b64")]
    pub data: Vec<u8>,
    pub bytes: u64,
    pub truncated: bool,
}

impl Captured {
    /// Appends what fits under `limit`; returns the part that was kept.
    pub fn push<'a>(&mut self, chunk: &'a [u8], limit: u64) -> &'a [u8] {
        self.bytes = self.bytes.saturating_add(chunk.len() as u64);
        let room = usize::try_from(limit.saturating_sub(self.data.len() as u64)).unwrap_or(0);
        let kept = &chunk[..chunk.len().min(room)];
        if kept.len() < chunk.len() {
            self.truncated = true;
        }
        self.data.extend_from_slice(kept);
        kept
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Execution {
    pub id: String,
    pub machine_id: String,
    pub seq: u64,
    pub command: Vec<String>,
    pub cwd: String,
    pub env_keys: Vec<String>,
    pub status: ExecStatus,
    pub created_ms: i64,
    #[serde(default)]
    pub started_ms: Option<i64>,
    #[serde(default)]
    pub completed_ms: Option<i64>,
    #[serde(default)]
    pub exit_code: Option<i64>,
    #[serde(default)]
    pub signal: Option<i64>,
    #[serde(default)]
    pub error_code: Option<String>,
    #[serde(default)]
    pub error_message: Option<String>,
    #[serde(default)]
    pub stdout: Captured,
    #[serde(default)]
    pub stderr: Captured,
    #[serde(default)]
    pub events: Vec<ExecEvent>,
}

impl Execution {
    /// A queued execution of `command` in `/root` that has not started:
    /// no output, no events, no end.
    pub fn new(
        id: String,
        machine_id: String,
        seq: u64,
        command: Vec<String>,
        created_ms: i64,
    ) -> Self {
        Self {
            id,
            machine_id,
            seq,
            command,
            cwd: "/root".to_owned(),
            env_keys: Vec::new(),
            status: ExecStatus::Queued,
            created_ms,
            started_ms: None,
            completed_ms: None,
            exit_code: None,
            signal: None,
            error_code: None,
            error_message: None,
            stdout: Captured::default(),
            stderr: Captured::default(),
            events: Vec::new(),
        }
    }

    fn push_event(&mut self, mut event: ExecEvent) {
        event.sequence = self.events.last().map_or(1, |e| e.sequence + 1);
        self.events.push(event);
    }

    /// Whether the execution ended (succeeded, failed, cancelled, expired).
    pub fn ended(&self) -> bool {
        self.status.is_terminal()
    }

    /// The captured stream an event kind refers to.
    pub fn captured(&self, kind: EventKind) -> &Captured {
        match kind {
            EventKind::Stderr => &self.stderr,
            _ => &self.stdout,
        }
    }

    /// Output events of an earlier `state.json` carried their text; they
    /// are dropped on migration (the output itself is kept), and the
    /// lifecycle events renumbered.
    pub fn drop_legacy_output_events(&mut self) {
        self.events.retain(|e| e.kind == EventKind::Lifecycle);
        for (i, e) in self.events.iter_mut().enumerate() {
            e.sequence = i as u64 + 1;
        }
    }

    /// Records a status change (and its lifecycle event).
    pub fn set_status(&mut self, status: ExecStatus) {
        let now = now_ms();
        self.status = status;
        if status == ExecStatus::Running && self.started_ms.is_none() {
            self.started_ms = Some(now);
        }
        if status.is_terminal() {
            self.completed_ms = Some(now);
        }
        self.push_event(ExecEvent {
            sequence: 0,
            kind: EventKind::Lifecycle,
            at_ms: now,
            range: None,
            status: Some(status),
            exit_code: if status.is_terminal() {
                self.exit_code
            } else {
                None
            },
            signal: if status.is_terminal() {
                self.signal
            } else {
                None
            },
            error_code: if status.is_terminal() {
                self.error_code.clone()
            } else {
                None
            },
            error_message: if status.is_terminal() {
                self.error_message.clone()
            } else {
                None
            },
        });
    }

    /// Ends the execution unless it already ended; returns whether it did.
    pub fn finish(&mut self, status: ExecStatus, error: Option<(&str, String)>) -> bool {
        if self.status.is_terminal() {
            return false;
        }
        if let Some((code, message)) = error {
            self.error_code = Some(code.to_owned());
            self.error_message = Some(message);
        }
        self.set_status(status);
        true
    }

    /// Appends output to a stream, within `limit`.
    pub fn push_output(&mut self, kind: EventKind, chunk: &[u8], limit: u64) {
        let captured = match kind {
            EventKind::Stderr => &mut self.stderr,
            _ => &mut self.stdout,
        };
        let start = captured.data.len() as u64;
        let kept = captured.push(chunk, limit).len() as u64;
        if kept == 0 {
            return;
        }
        self.push_event(ExecEvent {
            sequence: 0,
            kind,
            at_ms: now_ms(),
            range: Some([start, start + kept]),
            status: None,
            exit_code: None,
            signal: None,
            error_code: None,
            error_message: None,
        });
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TermStatus {
    WakeInProgress,
    Ready,
    Closed,
    Expired,
    Failed,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Terminal {
    pub id: String,
    pub machine_id: String,
    pub seq: u64,
    pub width: u16,
    pub height: u16,
    #[serde(default)]
    pub cwd: Option<String>,
    pub shell: String,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub status: TermStatus,
    pub created_ms: i64,
    #[serde(default)]
    pub ready_ms: Option<i64>,
    #[serde(default)]
    pub error_code: Option<String>,
    #[serde(default)]
    pub error_message: Option<String>,
}

/// A stored response for an idempotency key: what a replay needs (status,
/// the headers that describe the body, the body) and when it was stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IdemRecord {
    pub fingerprint: String,
    pub created_ms: i64,
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

/// How long ended things are kept (see `--retention`,
/// `--executions-per-machine`, `--idempotency-ttl`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Ended executions and terminals, and destroyed machines, are removed
    /// this long after they ended.
    pub ended_ms: i64,
    /// Each machine keeps at most this many ended executions (the newest).
    pub executions_per_machine: usize,
    /// Idempotency records are replayed for this long.
    pub idempotency_ms: i64,
}

/// A machine's executions and terminals in creation order (seq → id).
#[derive(Debug, Default)]
struct MachineIndex {
    executions: BTreeMap<u64, String>,
    terminals: BTreeMap<u64, String>,
}

/// Everything that survives a restart, with indexes and change tracking.
/// Every operation on it is O(1) or O(log n) in the number of records (or
/// proportional to the page or the records it changes): the lock around it
/// is never held for work that grows with history.
#[derive(Debug, Default)]
pub struct State {
    next_seq: u64,
    pub machines: BTreeMap<String, Machine>,
    pub executions: HashMap<String, Execution>,
    pub terminals: HashMap<String, Terminal>,
    pub idempotency: HashMap<String, IdemRecord>,
    /// Keys whose first request is still being processed: key → fingerprint.
    pub in_flight: HashMap<String, String>,
    index: HashMap<String, MachineIndex>,
    /// Idempotency records by age: (created_ms, key).
    idem_by_age: BTreeSet<(i64, String)>,
    /// Records changed since the last flush.
    dirty: HashSet<RecordKey>,
}

/// Items of `map` in `index` order after sequence `after`.
fn after<'a, T>(
    index: Option<&'a BTreeMap<u64, String>>,
    map: &'a HashMap<String, T>,
    after: u64,
) -> impl Iterator<Item = (u64, &'a T)> + 'a {
    index
        .into_iter()
        .flat_map(move |ix| ix.range(after.saturating_add(1)..))
        .filter_map(|(seq, id)| map.get(id).map(|v| (*seq, v)))
}

impl State {
    /// A new sequence number for creation order. Increasing across
    /// restarts without being stored: never below the clock in µs.
    pub fn next_seq(&mut self) -> u64 {
        let now_us = u64::try_from(now_ms()).unwrap_or(0).saturating_mul(1000);
        self.next_seq = self.next_seq.saturating_add(1).max(now_us);
        self.next_seq
    }

    /// Records that `key` changed; the next flush writes it (or deletes its
    /// file when it is gone).
    pub fn mark(&mut self, key: RecordKey) {
        self.dirty.insert(key);
    }

    /// The records changed since the last call.
    pub fn take_dirty(&mut self) -> Vec<RecordKey> {
        self.dirty.drain().collect()
    }

    /// A machine that exists and is not destroyed.
    pub fn live_machine(&self, id: &str) -> Option<&Machine> {
        self.machines
            .get(id)
            .filter(|m| m.phase != Phase::Destroyed)
    }

    pub fn live_machine_mut(&mut self, id: &str) -> Option<&mut Machine> {
        self.machines
            .get_mut(id)
            .filter(|m| m.phase != Phase::Destroyed)
    }

    pub fn insert_machine(&mut self, m: Machine) {
        self.next_seq = self.next_seq.max(m.seq);
        self.mark(RecordKey::machine(&m.id));
        self.machines.insert(m.id.clone(), m);
    }

    pub fn insert_execution(&mut self, e: Execution) {
        self.next_seq = self.next_seq.max(e.seq);
        self.mark(RecordKey::execution(&e.id));
        self.index
            .entry(e.machine_id.clone())
            .or_default()
            .executions
            .insert(e.seq, e.id.clone());
        self.executions.insert(e.id.clone(), e);
    }

    pub fn insert_terminal(&mut self, t: Terminal) {
        self.next_seq = self.next_seq.max(t.seq);
        self.mark(RecordKey::terminal(&t.id));
        self.index
            .entry(t.machine_id.clone())
            .or_default()
            .terminals
            .insert(t.seq, t.id.clone());
        self.terminals.insert(t.id.clone(), t);
    }

    /// Stores (or replaces) the record of an idempotency key.
    pub fn insert_idempotency(&mut self, key: String, record: IdemRecord) {
        if let Some(old) = self.idempotency.get(&key) {
            self.idem_by_age.remove(&(old.created_ms, key.clone()));
        }
        self.idem_by_age.insert((record.created_ms, key.clone()));
        self.mark(RecordKey::idempotency(&key));
        self.idempotency.insert(key, record);
    }

    /// The stored response for `key`, unless it expired.
    pub fn idempotency_record(&self, key: &str, now: i64, ttl_ms: i64) -> Option<&IdemRecord> {
        self.idempotency
            .get(key)
            .filter(|r| r.created_ms > now.saturating_sub(ttl_ms))
    }

    /// A machine's executions in creation order, after sequence `after`.
    pub fn executions_of(
        &self,
        machine_id: &str,
        after_seq: u64,
    ) -> impl Iterator<Item = (u64, &Execution)> + '_ {
        let ix = self.index.get(machine_id).map(|i| &i.executions);
        after(ix, &self.executions, after_seq)
    }

    /// A machine's terminals in creation order, after sequence `after`.
    pub fn terminals_of(
        &self,
        machine_id: &str,
        after_seq: u64,
    ) -> impl Iterator<Item = (u64, &Terminal)> + '_ {
        let ix = self.index.get(machine_id).map(|i| &i.terminals);
        after(ix, &self.terminals, after_seq)
    }

    /// Whether the machine has an execution that is queued or running.
    pub fn has_active_execution(&self, machine_id: &str) -> bool {
        self.executions_of(machine_id, 0)
            .any(|(_, e)| matches!(e.status, ExecStatus::Queued | ExecStatus::Running))
    }

    /// Ends a machine's work in the state: queued and running executions
    /// become `cancelled` with `error_code`, ready terminals `closed`.
    /// Returns the ids of both.
    pub fn end_machine_work(
        &mut self,
        machine_id: &str,
        error_code: &str,
        message: &str,
    ) -> (Vec<String>, Vec<String>) {
        let Some(ix) = self.index.get(machine_id) else {
            return (Vec::new(), Vec::new());
        };
        let mut execs = Vec::new();
        for id in ix.executions.values() {
            if let Some(e) = self.executions.get_mut(id) {
                if matches!(e.status, ExecStatus::Queued | ExecStatus::Running)
                    && e.finish(
                        ExecStatus::Cancelled,
                        Some((error_code, message.to_owned())),
                    )
                {
                    execs.push(id.clone());
                }
            }
        }
        let mut terms = Vec::new();
        for id in ix.terminals.values() {
            if let Some(t) = self.terminals.get_mut(id) {
                if t.status == TermStatus::Ready {
                    t.status = TermStatus::Closed;
                    terms.push(id.clone());
                }
            }
        }
        for id in &execs {
            self.mark(RecordKey::execution(id));
        }
        for id in &terms {
            self.mark(RecordKey::terminal(id));
        }
        (execs, terms)
    }

    fn remove_execution(&mut self, id: &str) {
        if let Some(e) = self.executions.remove(id) {
            if let Some(ix) = self.index.get_mut(&e.machine_id) {
                ix.executions.remove(&e.seq);
            }
            self.mark(RecordKey::execution(id));
        }
    }

    fn remove_terminal(&mut self, id: &str) {
        if let Some(t) = self.terminals.remove(id) {
            if let Some(ix) = self.index.get_mut(&t.machine_id) {
                ix.terminals.remove(&t.seq);
            }
            self.mark(RecordKey::terminal(id));
        }
    }

    /// Removes a machine with everything it still has.
    fn remove_machine(&mut self, id: &str) {
        if let Some(ix) = self.index.remove(id) {
            for eid in ix.executions.values() {
                if self.executions.remove(eid).is_some() {
                    self.mark(RecordKey::execution(eid));
                }
            }
            for tid in ix.terminals.values() {
                if self.terminals.remove(tid).is_some() {
                    self.mark(RecordKey::terminal(tid));
                }
            }
        }
        if self.machines.remove(id).is_some() {
            self.mark(RecordKey::machine(id));
        }
    }

    /// Keeps at most `cap` ended executions on a machine, removing the
    /// oldest; returns how many were removed. Walks from the oldest and stops
    /// as soon as the machine is within its cap.
    pub fn enforce_execution_cap(&mut self, machine_id: &str, cap: usize) -> usize {
        let Some(ix) = self.index.get(machine_id) else {
            return 0;
        };
        let mut excess = ix.executions.len().saturating_sub(cap);
        if excess == 0 {
            return 0;
        }
        let mut doomed = Vec::new();
        for id in ix.executions.values() {
            if excess == 0 {
                break;
            }
            if self.executions.get(id).is_some_and(Execution::ended) {
                doomed.push(id.clone());
                excess -= 1;
            }
        }
        for id in &doomed {
            self.remove_execution(id);
        }
        doomed.len()
    }

    /// Removes what the retention lets go, at most `budget` records per
    /// call (so one call holds the lock briefly): ended executions and
    /// terminals created and ended before the cutoff, executions beyond
    /// each machine's cap, destroyed machines, expired idempotency records.
    /// Returns how many records were removed.
    pub fn prune(&mut self, now: i64, r: &Retention, budget: usize) -> usize {
        let cutoff = now.saturating_sub(r.ended_ms);
        let mut doomed_execs = Vec::new();
        let mut doomed_terms = Vec::new();
        let mut doomed_machines = Vec::new();
        for (machine_id, ix) in &self.index {
            for id in ix.executions.values() {
                let Some(e) = self.executions.get(id) else {
                    continue;
                };
                if e.created_ms > cutoff || doomed_execs.len() >= budget {
                    break;
                }
                if e.ended() && e.completed_ms.unwrap_or(e.created_ms) <= cutoff {
                    doomed_execs.push(id.clone());
                }
            }
            for id in ix.terminals.values() {
                let Some(t) = self.terminals.get(id) else {
                    continue;
                };
                if t.created_ms > cutoff || doomed_terms.len() >= budget {
                    break;
                }
                if !matches!(t.status, TermStatus::Ready | TermStatus::WakeInProgress) {
                    doomed_terms.push(id.clone());
                }
            }
            if ix.executions.len() > r.executions_per_machine {
                doomed_machines.push(machine_id.clone());
            }
        }
        let mut removed = doomed_execs.len() + doomed_terms.len();
        for id in &doomed_execs {
            self.remove_execution(id);
        }
        for id in &doomed_terms {
            self.remove_terminal(id);
        }
        for id in &doomed_machines {
            removed += self.enforce_execution_cap(id, r.executions_per_machine);
        }
        let destroyed: Vec<String> = self
            .machines
            .values()
            .filter(|m| m.phase == Phase::Destroyed && m.last_transition_ms <= cutoff)
            .take(budget)
            .map(|m| m.id.clone())
            .collect();
        removed += destroyed.len();
        for id in &destroyed {
            self.remove_machine(id);
        }
        removed + self.expire_idempotency(now.saturating_sub(r.idempotency_ms), budget)
    }

    /// Removes idempotency records stored at or before `cutoff`.
    fn expire_idempotency(&mut self, cutoff: i64, budget: usize) -> usize {
        let mut removed = 0;
        while removed < budget {
            let Some((created, key)) = self.idem_by_age.first().cloned() else {
                break;
            };
            if created > cutoff {
                break;
            }
            self.idem_by_age.remove(&(created, key.clone()));
            if self.idempotency.remove(&key).is_some() {
                self.mark(RecordKey::idempotency(&key));
                removed += 1;
            }
        }
        removed
    }

    /// Settles everything a restart interrupted: transitional phases are
    /// completed, running executions fail, terminals close. Returns whether
    /// anything changed (the changed records are marked).
    pub fn recover_after_restart(&mut self, hold_window_ms: u64) -> bool {
        let now = now_ms();
        let mut changed = Vec::new();
        for m in self.machines.values_mut() {
            let next = match m.phase {
                Phase::Accepted | Phase::PlacementPending | Phase::Starting => Some(Phase::Running),
                Phase::Stopping => Some(Phase::Sleeping),
                Phase::Destroying => Some(Phase::Destroyed),
                _ => None,
            };
            if let Some(phase) = next {
                m.transition(phase, "host_restarted");
                if phase == Phase::Running {
                    m.running_since_ms = Some(now);
                    m.hold_window_ms = hold_window_ms;
                    m.hold_jitter_ms = 0;
                    m.hold_until_ms =
                        Some(now.saturating_add(i64::try_from(hold_window_ms).unwrap_or(i64::MAX)));
                    m.last_activity_ms = now;
                }
            }
            // Timers of the previous run are void.
            m.op += 1;
            changed.push(RecordKey::machine(&m.id));
        }
        for e in self.executions.values_mut() {
            if e.finish(
                ExecStatus::Failed,
                Some((
                    "HOST_RESTARTED",
                    "the emulator restarted while the execution was running".to_owned(),
                )),
            ) {
                changed.push(RecordKey::execution(&e.id));
            }
        }
        for t in self.terminals.values_mut() {
            if t.status == TermStatus::Ready || t.status == TermStatus::WakeInProgress {
                t.status = TermStatus::Closed;
                changed.push(RecordKey::terminal(&t.id));
            }
        }
        let any = !changed.is_empty();
        for key in changed {
            self.mark(key);
        }
        any
    }
}

/// Serialises captured bytes as base64 in record files.
mod b64 {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(data: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(data))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        STANDARD.decode(s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captured_truncates_and_counts() {
        let mut c = Captured::default();
        assert_eq!(c.push(b"hello", 8), b"hello");
        assert_eq!(c.push(b"world", 8), b"wor");
        assert_eq!(c.push(b"!", 8), b"");
        assert_eq!(c.data, b"hellowor");
        assert_eq!(c.bytes, 11);
        assert!(c.truncated);
    }

    fn execution(id: &str, machine: &str, seq: u64, created_ms: i64) -> Execution {
        Execution::new(
            id.into(),
            machine.into(),
            seq,
            vec!["echo".into()],
            created_ms,
        )
    }

    fn ended(mut e: Execution, completed_ms: i64) -> Execution {
        e.exit_code = Some(0);
        e.set_status(ExecStatus::Succeeded);
        e.completed_ms = Some(completed_ms);
        e
    }

    const KEEP_ALL: Retention = Retention {
        ended_ms: i64::MAX,
        executions_per_machine: usize::MAX,
        idempotency_ms: i64::MAX,
    };

    #[test]
    fn execution_round_trips_with_output_stored_once() {
        let mut e = execution("ex-1", "dm-1", 1, 0);
        e.push_output(EventKind::Stdout, &[0xff, b'a'], 100);
        e.push_output(EventKind::Stdout, b"bc", 100);
        let json = serde_json::to_string(&e).expect("serialise");
        assert!(
            !json.contains("\"bc\""),
            "output is not repeated in events: {json}"
        );
        let back: Execution = serde_json::from_str(&json).expect("parse");
        assert_eq!(back.stdout.data, vec![0xff, b'a', b'b', b'c']);
        assert_eq!(back.events.len(), 2);
        assert_eq!(back.events[1].range, Some([2, 4]));
        assert_eq!(back.events[1].sequence, 2);
    }

    #[test]
    fn executions_are_listed_per_machine_in_order() {
        let mut s = State::default();
        for (i, m) in ["a", "b", "a", "a"].iter().enumerate() {
            let seq = s.next_seq();
            s.insert_execution(execution(&format!("ex-{i}"), m, seq, 0));
        }
        let ids = |s: &State, after| -> Vec<String> {
            s.executions_of("a", after)
                .map(|(_, e)| e.id.clone())
                .collect()
        };
        assert_eq!(ids(&s, 0), ["ex-0", "ex-2", "ex-3"]);
        let second = s.executions["ex-2"].seq;
        assert_eq!(ids(&s, second), ["ex-3"]);
        assert_eq!(s.executions_of("c", 0).count(), 0);
    }

    #[test]
    fn sequences_increase_and_follow_loaded_records() {
        let mut s = State::default();
        let a = s.next_seq();
        let b = s.next_seq();
        assert!(b > a);
        s.insert_execution(execution("ex-x", "m", b + 1_000_000_000, 0));
        assert!(s.next_seq() > b + 1_000_000_000);
    }

    #[test]
    fn cap_keeps_the_newest_ended_executions_and_every_active_one() {
        let mut s = State::default();
        s.insert_execution(execution("ex-active", "m", 1, 0));
        for i in 2..=6 {
            s.insert_execution(ended(execution(&format!("ex-{i}"), "m", i, 0), 0));
        }
        s.take_dirty();
        assert_eq!(s.enforce_execution_cap("m", 3), 3);
        let left: Vec<_> = s.executions_of("m", 0).map(|(_, e)| e.id.clone()).collect();
        assert_eq!(left, ["ex-active", "ex-5", "ex-6"]);
        let dirty = s.take_dirty();
        assert_eq!(dirty.len(), 3, "removed records are flushed: {dirty:?}");
        assert!(dirty.contains(&RecordKey::execution("ex-2")));
    }

    #[test]
    fn prune_removes_what_ended_before_the_cutoff() {
        let mut s = State::default();
        s.insert_execution(ended(execution("ex-old", "m", 1, 100), 200));
        s.insert_execution(execution("ex-old-active", "m", 2, 100));
        s.insert_execution(ended(execution("ex-new", "m", 3, 900), 950));
        let rec = |created_ms| IdemRecord {
            fingerprint: "f".into(),
            created_ms,
            status: 200,
            headers: vec![],
            body: "{}".into(),
        };
        s.insert_idempotency("k-old".into(), rec(100));
        s.insert_idempotency("k-new".into(), rec(900));
        assert_eq!(s.prune(1000, &KEEP_ALL, 100), 0);
        let r = Retention {
            ended_ms: 500,
            executions_per_machine: 10,
            idempotency_ms: 500,
        };
        assert_eq!(s.prune(1000, &r, 100), 2);
        let mut left: Vec<_> = s.executions.keys().cloned().collect();
        left.sort();
        assert_eq!(left, ["ex-new", "ex-old-active"]);
        assert!(s.idempotency_record("k-old", 1000, 500).is_none());
        assert!(s.idempotency.contains_key("k-new"));
        assert!(s.idempotency_record("k-new", 1000, 500).is_some());
        assert!(
            s.idempotency_record("k-new", 1400, 500).is_none(),
            "expired on read"
        );
    }

    #[test]
    fn prune_respects_its_budget() {
        let mut s = State::default();
        for i in 1..=10 {
            s.insert_execution(ended(execution(&format!("ex-{i}"), "m", i, 0), 0));
        }
        let r = Retention {
            ended_ms: 1,
            executions_per_machine: 100,
            idempotency_ms: 1,
        };
        assert_eq!(s.prune(1000, &r, 4), 4);
        assert_eq!(s.executions.len(), 6);
        assert_eq!(s.prune(1000, &r, 100), 6);
        assert!(s.executions.is_empty());
    }
}

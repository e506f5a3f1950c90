//! The emulator's durable model (machines, executions, terminals,
//! idempotency records) and its persistence to `DATA_DIR/state.json`
//! (written to a temporary file, then renamed over the old one).

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk: Option<String>,
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
    fn push_event(&mut self, mut event: ExecEvent) {
        event.sequence = self.events.len() as u64 + 1;
        self.events.push(event);
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
            chunk: None,
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
        let kept = captured.push(chunk, limit);
        if kept.is_empty() {
            return;
        }
        let text = String::from_utf8_lossy(kept).into_owned();
        self.push_event(ExecEvent {
            sequence: 0,
            kind,
            at_ms: now_ms(),
            chunk: Some(text),
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

/// A stored response for an idempotency key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IdemRecord {
    pub fingerprint: String,
    pub created_ms: i64,
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

/// Everything that survives a restart.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct State {
    #[serde(default)]
    pub next_seq: u64,
    #[serde(default)]
    pub machines: BTreeMap<String, Machine>,
    #[serde(default)]
    pub executions: BTreeMap<String, Execution>,
    #[serde(default)]
    pub terminals: BTreeMap<String, Terminal>,
    #[serde(default)]
    pub idempotency: BTreeMap<String, IdemRecord>,
    /// Keys whose first request is still being processed: key → fingerprint.
    #[serde(skip)]
    pub in_flight: HashMap<String, String>,
}

impl State {
    pub fn next_seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
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

    /// Whether the machine has an execution that is queued or running.
    pub fn has_active_execution(&self, machine_id: &str) -> bool {
        self.executions.values().any(|e| {
            e.machine_id == machine_id
                && matches!(e.status, ExecStatus::Queued | ExecStatus::Running)
        })
    }

    /// Settles everything a restart interrupted: transitional phases are
    /// completed, running executions fail, terminals close. Returns whether
    /// anything changed.
    pub fn recover_after_restart(&mut self, hold_window_ms: u64) -> bool {
        let now = now_ms();
        let mut changed = false;
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
                changed = true;
            }
            m.op += 1;
        }
        for e in self.executions.values_mut() {
            if !e.status.is_terminal() {
                e.finish(
                    ExecStatus::Failed,
                    Some((
                        "HOST_RESTARTED",
                        "the emulator restarted while the execution was running".to_owned(),
                    )),
                );
                changed = true;
            }
        }
        for t in self.terminals.values_mut() {
            if t.status == TermStatus::Ready || t.status == TermStatus::WakeInProgress {
                t.status = TermStatus::Closed;
                changed = true;
            }
        }
        let cutoff = now - IDEMPOTENCY_TTL_MS;
        let before = self.idempotency.len();
        self.idempotency.retain(|_, r| r.created_ms >= cutoff);
        changed |= before != self.idempotency.len();
        changed
    }
}

/// Idempotency records are kept this long.
pub const IDEMPOTENCY_TTL_MS: i64 = 24 * 3600 * 1000;

pub fn state_path(data_dir: &Path) -> PathBuf {
    data_dir.join("state.json")
}

/// Loads `state.json`; a missing file is an empty state.
pub fn load(data_dir: &Path) -> Result<State, String> {
    let path = state_path(data_dir);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| format!("cannot parse {}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// Writes `bytes` to `state.json` atomically (temporary file, fsync, rename).
pub fn write_atomically(data_dir: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let path = state_path(data_dir);
    let tmp = data_dir.join("state.json.tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &path)
}

/// Serialises captured bytes as base64 in `state.json`.
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

    #[test]
    fn state_round_trips() {
        let mut s = State::default();
        let mut e = Execution {
            id: "ex-1".into(),
            machine_id: "dm-1".into(),
            seq: 1,
            command: vec!["echo".into()],
            cwd: "/root".into(),
            env_keys: vec![],
            status: ExecStatus::Queued,
            created_ms: 0,
            started_ms: None,
            completed_ms: None,
            exit_code: None,
            signal: None,
            error_code: None,
            error_message: None,
            stdout: Captured::default(),
            stderr: Captured::default(),
            events: vec![],
        };
        e.push_output(EventKind::Stdout, &[0xff, b'a'], 100);
        s.executions.insert(e.id.clone(), e);
        let json = serde_json::to_vec(&s).expect("serialise");
        let back: State = serde_json::from_slice(&json).expect("parse");
        assert_eq!(back.executions["ex-1"].stdout.data, vec![0xff, b'a']);
        assert_eq!(back.executions["ex-1"].events.len(), 1);
    }
}

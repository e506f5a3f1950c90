//! Request and response types of the Machines API. Responses tolerate
//! unknown fields and both the spec's and the newer SDKs' shapes.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

/// A string enum with an `Unknown(String)` catch-all, (de)serialized as its
/// wire string.
macro_rules! string_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $wire:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
            /// A value this client does not know (kept verbatim).
            Unknown(String),
        }

        impl $name {
            /// The wire string.
            pub fn as_str(&self) -> &str {
                match self {
                    $($name::$variant => $wire,)+
                    $name::Unknown(s) => s,
                }
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                match s {
                    $($wire => $name::$variant,)+
                    other => $name::Unknown(other.to_owned()),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Ok($name::from(s.as_str()))
            }
        }
    };
}

string_enum! {
    /// Lifecycle phase of a machine.
    Phase {
        /// Create accepted.
        Accepted => "accepted",
        /// Waiting for a host.
        PlacementPending => "placement_pending",
        /// Booting or waking.
        Starting => "starting",
        /// Up.
        Running => "running",
        /// Going to sleep.
        Stopping => "stopping",
        /// Asleep: only storage is kept.
        Sleeping => "sleeping",
        /// Being deleted.
        Destroying => "destroying",
        /// Deleted.
        Destroyed => "destroyed",
        /// Failed (see `last_error`).
        Failed => "failed",
    }
}

impl Default for Phase {
    fn default() -> Self {
        Phase::Unknown(String::new())
    }
}

string_enum! {
    /// The state a machine is converging to.
    DesiredState {
        /// Should run.
        Running => "running",
        /// Should sleep.
        Sleeping => "sleeping",
        /// Should be destroyed.
        Destroyed => "destroyed",
    }
}

string_enum! {
    /// Status of an execution.
    ExecutionStatus {
        /// Waiting for the machine to wake.
        WakeInProgress => "wake_in_progress",
        /// Queued.
        Queued => "queued",
        /// Running.
        Running => "running",
        /// Exited 0.
        Succeeded => "succeeded",
        /// Exited non-zero, was killed, or could not start.
        Failed => "failed",
        /// Cancelled (DELETE, or the machine slept).
        Cancelled => "cancelled",
        /// Timed out.
        Expired => "expired",
    }
}

impl ExecutionStatus {
    /// True once the execution can no longer change.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            ExecutionStatus::Succeeded
                | ExecutionStatus::Failed
                | ExecutionStatus::Cancelled
                | ExecutionStatus::Expired
        )
    }
}

string_enum! {
    /// Kind of an execution event.
    ExecutionEventKind {
        /// Status change.
        Lifecycle => "lifecycle",
        /// A chunk of stdout.
        Stdout => "stdout",
        /// A chunk of stderr.
        Stderr => "stderr",
    }
}

string_enum! {
    /// Status of a terminal.
    TerminalStatus {
        /// Waiting for the machine to wake.
        WakeInProgress => "wake_in_progress",
        /// Ready to connect.
        Ready => "ready",
        /// Closed.
        Closed => "closed",
        /// Expired.
        Expired => "expired",
        /// Failed.
        Failed => "failed",
    }
}

/// A machine, from either response shape: the spec's (`status: {phase,
/// revision, …}`) or the newer one (top-level `phase`, maybe no `status`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Machine {
    /// Opaque id (`dm-…` or a bare UUID).
    pub machine_id: String,
    /// vCPUs (0 when not reported).
    pub vcpu: f64,
    /// Memory in MiB (0 when not reported).
    pub memory_mib: u64,
    /// Storage in GiB (0 when not reported).
    pub storage_gib: u64,
    /// Where the machine is converging to.
    pub desired_state: Option<DesiredState>,
    /// Current phase.
    pub phase: Phase,
    /// Revision (for `If-Match`); falls back to the `ETag` header.
    pub revision: Option<String>,
    /// Reason of the last transition.
    pub reason: Option<String>,
    /// Last error, if any.
    pub last_error: Option<String>,
    /// Autosleep after this many idle seconds (0 = off), if reported.
    pub autosleep_seconds: Option<u64>,
    /// Creation time (RFC 3339), if reported.
    pub created_at: Option<String>,
    /// Time of the last transition (RFC 3339), if reported.
    pub last_transition_at: Option<String>,
    /// The response's `ETag` header, if any.
    pub etag: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct LifecycleStatusWire {
    phase: Option<Phase>,
    revision: Option<String>,
    reason: Option<String>,
    last_error: Option<String>,
    last_transition_at: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct MachineWire {
    machine_id: String,
    vcpu: Option<f64>,
    memory_mib: Option<u64>,
    storage_gib: Option<u64>,
    desired_state: Option<DesiredState>,
    phase: Option<Phase>,
    revision: Option<String>,
    reason: Option<String>,
    last_error: Option<String>,
    autosleep_seconds: Option<u64>,
    created_at: Option<String>,
    last_transition_at: Option<String>,
    status: Option<Value>,
    lifecycle_status: Option<Value>,
}

fn lifecycle(value: Option<Value>) -> Option<LifecycleStatusWire> {
    match value {
        Some(v @ Value::Object(_)) => serde_json::from_value(v).ok(),
        _ => None,
    }
}

impl From<MachineWire> for Machine {
    fn from(w: MachineWire) -> Self {
        // `status` is the lifecycle object in the spec's shape; in the wake
        // admission shape it is a string and `lifecycle_status` holds it.
        let status_phase = match &w.status {
            Some(Value::String(s)) => match Phase::from(s.as_str()) {
                Phase::Unknown(_) => None,
                known => Some(known),
            },
            _ => None,
        };
        let st = lifecycle(w.status)
            .or_else(|| lifecycle(w.lifecycle_status))
            .unwrap_or_default();
        Machine {
            machine_id: w.machine_id,
            vcpu: w.vcpu.unwrap_or_default(),
            memory_mib: w.memory_mib.unwrap_or_default(),
            storage_gib: w.storage_gib.unwrap_or_default(),
            desired_state: w.desired_state,
            phase: w.phase.or(st.phase).or(status_phase).unwrap_or_default(),
            revision: st.revision.or(w.revision),
            reason: st.reason.or(w.reason),
            last_error: st.last_error.or(w.last_error),
            autosleep_seconds: w.autosleep_seconds,
            created_at: w.created_at,
            last_transition_at: st.last_transition_at.or(w.last_transition_at),
            etag: None,
        }
    }
}

impl<'de> Deserialize<'de> for Machine {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        MachineWire::deserialize(d).map(Machine::from)
    }
}

impl Machine {
    /// Fills `etag` (and `revision`, when the body had none) from an `ETag`
    /// header value.
    pub(crate) fn with_etag(mut self, etag: Option<String>) -> Self {
        if self.revision.is_none() {
            self.revision = etag.as_deref().map(strip_etag);
        }
        self.etag = etag;
        self
    }
}

/// `W/"abc"` or `"abc"` → `abc`.
pub(crate) fn strip_etag(etag: &str) -> String {
    let e = etag.trim();
    let e = e.strip_prefix("W/").unwrap_or(e);
    e.trim_matches('"').to_owned()
}

/// One page of a cursor-paged list.
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T> {
    /// Items of this page.
    pub items: Vec<T>,
    /// Cursor of the next page; `None` on the last one.
    pub next_cursor: Option<String>,
}

#[derive(Deserialize)]
struct PageWire<T> {
    #[serde(default = "Option::default")]
    items: Option<Vec<T>>,
    #[serde(default)]
    next_cursor: Option<String>,
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Page<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let w = PageWire::<T>::deserialize(d)?;
        Ok(Page {
            items: w.items.unwrap_or_default(),
            next_cursor: w.next_cursor.filter(|c| !c.is_empty()),
        })
    }
}

/// Body of `POST /v1/machines`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CreateMachineRequest {
    /// vCPUs.
    pub vcpu: f64,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Storage in GiB.
    pub storage_gib: u64,
    /// Platform autosleep: `30m`, `2h`, `"1800"`, `never`, …
    #[serde(skip_serializing_if = "Option::is_none")]
    pub autosleep: Option<String>,
}

/// Body of `PATCH /v1/machines/{id}`; unset fields are left unchanged.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct UpdateMachineRequest {
    /// vCPUs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vcpu: Option<f64>,
    /// Memory in MiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    /// Storage in GiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub storage_gib: Option<u64>,
    /// New platform autosleep (newer API; same forms as on create).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub autosleep: Option<String>,
}

/// Body of `POST …/executions`.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct ExecutionRequest {
    /// argv (no shell: use [`ExecutionRequest::shell`] for one).
    pub command: Vec<String>,
    /// Working directory (`/root` is the machine's home).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Extra environment.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Text fed to stdin.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    /// Kill after this many milliseconds (status `expired`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

impl ExecutionRequest {
    /// Runs `argv` directly.
    pub fn new<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            command: argv.into_iter().map(Into::into).collect(),
            ..Self::default()
        }
    }

    /// Runs `script` with `bash -c`.
    pub fn shell(script: impl Into<String>) -> Self {
        Self::new(["bash".to_owned(), "-c".to_owned(), script.into()])
    }

    /// Sets the working directory.
    pub fn cwd(mut self, cwd: impl Into<String>) -> Self {
        self.cwd = Some(cwd.into());
        self
    }

    /// Adds an environment variable.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.insert(key.into(), value.into());
        self
    }

    /// Sets stdin.
    pub fn stdin(mut self, stdin: impl Into<String>) -> Self {
        self.stdin = Some(stdin.into());
        self
    }

    /// Sets the timeout in milliseconds.
    pub fn timeout_ms(mut self, timeout_ms: u64) -> Self {
        self.timeout_ms = Some(timeout_ms);
        self
    }
}

/// An execution.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Execution {
    /// Execution id.
    pub execution_id: String,
    /// Machine id.
    #[serde(default)]
    pub machine_id: String,
    /// Status.
    pub status: ExecutionStatus,
    /// argv.
    #[serde(default, deserialize_with = "null_as_default")]
    pub command: Vec<String>,
    /// Working directory.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Exit code once exited.
    #[serde(default)]
    pub exit_code: Option<i64>,
    /// Signal that killed it.
    #[serde(default)]
    pub signal: Option<i64>,
    /// Error code, if it failed to run.
    #[serde(default)]
    pub error_code: Option<String>,
    /// Error message, if it failed to run.
    #[serde(default)]
    pub error_message: Option<String>,
    /// Retry hint while waking.
    #[serde(default)]
    pub retry_after_ms: Option<u64>,
    /// Creation time.
    #[serde(default)]
    pub created_at: Option<String>,
    /// Start time.
    #[serde(default)]
    pub started_at: Option<String>,
    /// Completion time.
    #[serde(default)]
    pub completed_at: Option<String>,
    /// Expiry time.
    #[serde(default)]
    pub expires_at: Option<String>,
    /// Stdout size in bytes.
    #[serde(default)]
    pub stdout_bytes: Option<u64>,
    /// Stderr size in bytes.
    #[serde(default)]
    pub stderr_bytes: Option<u64>,
    /// Stdout was truncated.
    #[serde(default)]
    pub stdout_truncated: Option<bool>,
    /// Stderr was truncated.
    #[serde(default)]
    pub stderr_truncated: Option<bool>,
}

/// Output of an execution.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(default)]
pub struct ExecutionOutput {
    /// Execution id.
    pub execution_id: String,
    /// Stdout (as text).
    pub stdout: String,
    /// Stderr (as text).
    pub stderr: String,
    /// Total stdout bytes produced.
    pub stdout_bytes: Option<u64>,
    /// Total stderr bytes produced.
    pub stderr_bytes: Option<u64>,
    /// Stdout kept only in part.
    pub stdout_truncated: bool,
    /// Stderr kept only in part.
    pub stderr_truncated: bool,
}

/// One event of an execution.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ExecutionEvent {
    /// Order within the execution.
    pub sequence: i64,
    /// Kind.
    #[serde(rename = "type")]
    pub kind: ExecutionEventKind,
    /// Time (RFC 3339).
    #[serde(default)]
    pub at: Option<String>,
    /// Output chunk (stdout/stderr events).
    #[serde(default)]
    pub chunk: Option<String>,
    /// New status (lifecycle events).
    #[serde(default)]
    pub status: Option<ExecutionStatus>,
    /// Exit code.
    #[serde(default)]
    pub exit_code: Option<i64>,
    /// Signal.
    #[serde(default)]
    pub signal: Option<i64>,
    /// Error code.
    #[serde(default)]
    pub error_code: Option<String>,
    /// Error message.
    #[serde(default)]
    pub error_message: Option<String>,
}

/// The result of [`crate::dedalus::Client::run_and_wait`].
#[derive(Debug, Clone, PartialEq)]
pub struct RunResult {
    /// The execution in its final status.
    pub execution: Execution,
    /// Its output.
    pub output: ExecutionOutput,
}

impl RunResult {
    /// The exit code, if the process exited.
    pub fn exit_code(&self) -> Option<i64> {
        self.execution.exit_code
    }

    /// True when the execution succeeded (exit code 0).
    pub fn success(&self) -> bool {
        self.execution.status == ExecutionStatus::Succeeded
    }
}

/// Body of `POST …/terminals`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CreateTerminalRequest {
    /// Columns.
    pub width: u32,
    /// Rows.
    pub height: u32,
    /// Working directory (default `/root`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Extra environment.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, String>>,
    /// Shell (default `/bin/bash`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shell: Option<String>,
}

impl CreateTerminalRequest {
    /// A terminal of this size with the platform defaults.
    pub fn new(width: u32, height: u32) -> Self {
        Self {
            width,
            height,
            cwd: None,
            env: None,
            shell: None,
        }
    }
}

/// A terminal.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Terminal {
    /// Terminal id.
    pub terminal_id: String,
    /// Machine id.
    #[serde(default)]
    pub machine_id: String,
    /// Status.
    pub status: TerminalStatus,
    /// Columns.
    #[serde(default)]
    pub width: u32,
    /// Rows.
    #[serde(default)]
    pub height: u32,
    /// Creation time.
    #[serde(default)]
    pub created_at: Option<String>,
    /// When it became ready.
    #[serde(default)]
    pub ready_at: Option<String>,
    /// Expiry.
    #[serde(default)]
    pub expires_at: Option<String>,
    /// Error code.
    #[serde(default)]
    pub error_code: Option<String>,
    /// Error message.
    #[serde(default)]
    pub error_message: Option<String>,
    /// Retry hint while waking.
    #[serde(default)]
    pub retry_after_ms: Option<u64>,
    /// Stream URL as given by the server (the client builds its own).
    #[serde(default)]
    pub stream_url: Option<String>,
}

fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn machine_spec_shape() {
        let m: Machine = serde_json::from_value(json!({
            "machine_id": "dm-0123abcd",
            "vcpu": 1, "memory_mib": 1024, "storage_gib": 10,
            "desired_state": "running",
            "status": {"phase": "starting", "reason": "booting", "retryable": false,
                       "revision": "r7", "last_transition_at": "2026-01-01T00:00:00Z",
                       "last_progress_at": "2026-01-01T00:00:00Z", "shiny": true},
            "autosleep_seconds": 300,
            "future_field": {"x": 1}
        }))
        .expect("parse");
        assert_eq!(m.machine_id, "dm-0123abcd");
        assert_eq!(m.vcpu, 1.0);
        assert_eq!(m.memory_mib, 1024);
        assert_eq!(m.storage_gib, 10);
        assert_eq!(m.desired_state, Some(DesiredState::Running));
        assert_eq!(m.phase, Phase::Starting);
        assert_eq!(m.revision.as_deref(), Some("r7"));
        assert_eq!(m.reason.as_deref(), Some("booting"));
        assert_eq!(m.autosleep_seconds, Some(300));
    }

    #[test]
    fn machine_newer_shape_top_level_phase() {
        let m: Machine = serde_json::from_value(json!({
            "machine_id": "0190f1b2-7c3a-7d4e-8f00-123456789abc",
            "vcpu": 0.5, "memory_mib": 512, "storage_gib": 5,
            "desired_state": "sleeping",
            "phase": "stopping",
            "revision": "12",
            "autosleep_seconds": 0
        }))
        .expect("parse");
        assert_eq!(m.phase, Phase::Stopping);
        assert_eq!(m.vcpu, 0.5);
        assert_eq!(m.revision.as_deref(), Some("12"));
        assert_eq!(m.autosleep_seconds, Some(0));
        assert_eq!(m.etag, None);
        let m = m.with_etag(Some("\"13\"".to_owned()));
        assert_eq!(m.revision.as_deref(), Some("12"), "body revision wins");
        assert_eq!(m.etag.as_deref(), Some("\"13\""));
    }

    #[test]
    fn machine_both_phase_and_status_and_unknown_phase() {
        let m: Machine = serde_json::from_value(json!({
            "machine_id": "dm-x",
            "phase": "hibernating",
            "status": {"phase": "running", "revision": "3"}
        }))
        .expect("parse");
        assert_eq!(m.phase, Phase::Unknown("hibernating".into()));
        assert_eq!(m.revision.as_deref(), Some("3"));
        assert_eq!(m.memory_mib, 0);
        let m = Machine::default().with_etag(Some("W/\"9\"".to_owned()));
        assert_eq!(m.revision.as_deref(), Some("9"));
    }

    #[test]
    fn machine_wake_admission_shape() {
        let m: Machine = serde_json::from_value(json!({
            "machine_id": "dm-x",
            "desired_state": "running",
            "status": "wake_in_progress",
            "wake_requested": true,
            "lifecycle_status": {"phase": "starting", "revision": "5"}
        }))
        .expect("parse");
        assert_eq!(m.phase, Phase::Starting);
        assert_eq!(m.revision.as_deref(), Some("5"));
    }

    #[test]
    fn page_tolerates_null_items_and_empty_cursor() {
        let p: Page<Machine> =
            serde_json::from_value(json!({"items": null, "next_cursor": ""})).expect("parse");
        assert!(p.items.is_empty());
        assert_eq!(p.next_cursor, None);
        let p: Page<Machine> = serde_json::from_value(json!({
            "items": [{"machine_id": "a", "status": {"phase": "running"}}],
            "next_cursor": "c2", "total": 9
        }))
        .expect("parse");
        assert_eq!(p.items[0].phase, Phase::Running);
        assert_eq!(p.next_cursor.as_deref(), Some("c2"));
    }

    #[test]
    fn execution_parses_and_tolerates_unknowns() {
        let e: Execution = serde_json::from_value(json!({
            "execution_id": "ex-1", "machine_id": "dm-1", "status": "paused_forever",
            "command": null, "created_at": "t", "exit_code": 3, "brand_new": 1
        }))
        .expect("parse");
        assert_eq!(e.status, ExecutionStatus::Unknown("paused_forever".into()));
        assert!(!e.status.is_terminal());
        assert!(e.command.is_empty());
        assert_eq!(e.exit_code, Some(3));
        assert!(ExecutionStatus::Expired.is_terminal());
        let ev: ExecutionEvent = serde_json::from_value(json!({
            "sequence": 2, "type": "stdout", "at": "t", "chunk": "hi\n"
        }))
        .expect("parse");
        assert_eq!(ev.kind, ExecutionEventKind::Stdout);
    }

    #[test]
    fn requests_serialize_compactly() {
        let r = ExecutionRequest::shell("echo hi").timeout_ms(5);
        assert_eq!(
            serde_json::to_value(&r).expect("json"),
            json!({"command": ["bash", "-c", "echo hi"], "timeout_ms": 5})
        );
        let c = CreateMachineRequest {
            vcpu: 1.0,
            memory_mib: 1024,
            storage_gib: 10,
            autosleep: None,
        };
        assert_eq!(
            serde_json::to_value(&c).expect("json"),
            json!({"vcpu": 1.0, "memory_mib": 1024, "storage_gib": 10})
        );
        assert_eq!(
            serde_json::to_value(UpdateMachineRequest::default()).expect("json"),
            json!({})
        );
        assert_eq!(Phase::from("running").to_string(), "running");
        assert_eq!(
            serde_json::to_value(Phase::Unknown("x".into())).expect("json"),
            json!("x")
        );
    }
}

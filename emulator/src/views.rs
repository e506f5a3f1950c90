//! Renders the model as the spec's response bodies (LifecycleResponse,
//! MachineListItem, ExecutionResponse, ExecutionOutputResponse,
//! ExecutionEvent, TerminalResponse). Only the spec's fields, plus
//! `autosleep_seconds` on machines.

use serde_json::{json, Map, Value};

use crate::state::{ExecEvent, ExecStatus, Execution, Machine, TermStatus, Terminal};
use crate::util::rfc3339;

fn insert_opt<T: Into<Value>>(map: &mut Map<String, Value>, key: &str, v: Option<T>) {
    if let Some(v) = v {
        map.insert(key.to_owned(), v.into());
    }
}

fn enum_str<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

fn status_json(m: &Machine) -> Value {
    let mut s = Map::new();
    s.insert("phase".into(), enum_str(&m.phase));
    s.insert("reason".into(), m.reason.clone().into());
    s.insert("retryable".into(), false.into());
    s.insert("revision".into(), m.revision_str().into());
    s.insert(
        "last_transition_at".into(),
        rfc3339(m.last_transition_ms).into(),
    );
    s.insert(
        "last_progress_at".into(),
        rfc3339(m.last_progress_ms).into(),
    );
    insert_opt(&mut s, "last_error", m.last_error.clone());
    Value::Object(s)
}

/// The fields every machine body has: its id, size, desired state and
/// `autosleep_seconds`.
fn machine_fields(m: &Machine) -> Map<String, Value> {
    let mut map = Map::new();
    map.insert("machine_id".into(), m.id.clone().into());
    map.insert("vcpu".into(), m.vcpu.into());
    map.insert("memory_mib".into(), m.memory_mib.into());
    map.insert("storage_gib".into(), m.storage_gib.into());
    map.insert("desired_state".into(), enum_str(&m.desired));
    map.insert("autosleep_seconds".into(), m.autosleep_seconds.into());
    map
}

/// LifecycleResponse (+ `autosleep_seconds`).
pub fn lifecycle(m: &Machine) -> Value {
    let mut map = machine_fields(m);
    map.insert("status".into(), status_json(m));
    Value::Object(map)
}

/// The newer SDKs' mutation response: top-level `phase` and `revision`
/// and no `status` object (+ `autosleep_seconds`).
pub fn lifecycle_newer(m: &Machine) -> Value {
    let mut map = machine_fields(m);
    map.insert("phase".into(), enum_str(&m.phase));
    map.insert("revision".into(), m.revision_str().into());
    Value::Object(map)
}

/// MachineListItem (+ `autosleep_seconds`).
pub fn list_item(m: &Machine) -> Value {
    let mut v = lifecycle(m);
    if let Value::Object(map) = &mut v {
        map.insert("created_at".into(), rfc3339(m.created_ms).into());
    }
    v
}

/// ExecutionResponse.
pub fn execution(e: &Execution) -> Value {
    let mut map = Map::new();
    map.insert("execution_id".into(), e.id.clone().into());
    map.insert("machine_id".into(), e.machine_id.clone().into());
    map.insert("status".into(), enum_str(&e.status));
    map.insert("command".into(), e.command.clone().into());
    map.insert("cwd".into(), e.cwd.clone().into());
    map.insert("env_keys".into(), e.env_keys.clone().into());
    map.insert("created_at".into(), rfc3339(e.created_ms).into());
    insert_opt(&mut map, "started_at", e.started_ms.map(rfc3339));
    insert_opt(&mut map, "completed_at", e.completed_ms.map(rfc3339));
    insert_opt(&mut map, "exit_code", e.exit_code);
    insert_opt(&mut map, "signal", e.signal);
    insert_opt(&mut map, "error_code", e.error_code.clone());
    insert_opt(&mut map, "error_message", e.error_message.clone());
    if e.status == ExecStatus::WakeInProgress {
        map.insert("retry_after_ms".into(), 250.into());
    }
    map.insert("stdout_bytes".into(), e.stdout.bytes.into());
    map.insert("stderr_bytes".into(), e.stderr.bytes.into());
    map.insert("stdout_truncated".into(), e.stdout.truncated.into());
    map.insert("stderr_truncated".into(), e.stderr.truncated.into());
    Value::Object(map)
}

/// ExecutionOutputResponse.
pub fn output(e: &Execution) -> Value {
    json!({
        "execution_id": e.id,
        "stdout": String::from_utf8_lossy(&e.stdout.data),
        "stderr": String::from_utf8_lossy(&e.stderr.data),
        "stdout_bytes": e.stdout.bytes,
        "stderr_bytes": e.stderr.bytes,
        "stdout_truncated": e.stdout.truncated,
        "stderr_truncated": e.stderr.truncated,
    })
}

/// The text of an output event: its byte range of the stream's kept data.
fn chunk(e: &Execution, ev: &ExecEvent) -> Option<String> {
    let [start, end] = ev.range?;
    let data = &e.captured(ev.kind).data;
    let start = usize::try_from(start).ok()?;
    let end = usize::try_from(end).ok()?;
    data.get(start..end)
        .map(|b| String::from_utf8_lossy(b).into_owned())
}

/// ExecutionEvent of execution `e`.
pub fn event(e: &Execution, ev: &ExecEvent) -> Value {
    let mut map = Map::new();
    map.insert("sequence".into(), ev.sequence.into());
    map.insert("type".into(), enum_str(&ev.kind));
    map.insert("at".into(), rfc3339(ev.at_ms).into());
    insert_opt(&mut map, "chunk", chunk(e, ev));
    insert_opt(&mut map, "status", ev.status.map(|s| enum_str(&s)));
    insert_opt(&mut map, "exit_code", ev.exit_code);
    insert_opt(&mut map, "signal", ev.signal);
    insert_opt(&mut map, "error_code", ev.error_code.clone());
    insert_opt(&mut map, "error_message", ev.error_message.clone());
    Value::Object(map)
}

/// TerminalResponse.
pub fn terminal(t: &Terminal, base_url: &str) -> Value {
    let ws_base = base_url
        .strip_prefix("https://")
        .map(|r| format!("wss://{r}"))
        .or_else(|| {
            base_url
                .strip_prefix("http://")
                .map(|r| format!("ws://{r}"))
        })
        .unwrap_or_else(|| base_url.to_owned());
    let mut map = Map::new();
    map.insert("terminal_id".into(), t.id.clone().into());
    map.insert("machine_id".into(), t.machine_id.clone().into());
    map.insert("status".into(), enum_str(&t.status));
    map.insert("created_at".into(), rfc3339(t.created_ms).into());
    map.insert("width".into(), t.width.into());
    map.insert("height".into(), t.height.into());
    map.insert("protocol".into(), "websocket".into());
    map.insert(
        "stream_url".into(),
        format!(
            "{ws_base}/v1/machines/{}/terminals/{}/stream",
            t.machine_id, t.id
        )
        .into(),
    );
    insert_opt(&mut map, "ready_at", t.ready_ms.map(rfc3339));
    insert_opt(&mut map, "error_code", t.error_code.clone());
    insert_opt(&mut map, "error_message", t.error_message.clone());
    if t.status == TermStatus::WakeInProgress {
        map.insert("retry_after_ms".into(), 250.into());
    }
    Value::Object(map)
}

//! Machine lifecycle: operations (create, wake, sleep, destroy, update),
//! timer-driven phase transitions, the hold window, and the autosleep ticker.

use std::time::Duration;

use axum::http::StatusCode;
use rand::Rng;

use crate::errors::{ApiError, DcsError};
use crate::proc;
use crate::server::AppRef;
use crate::state::{Desired, Machine, Phase};
use crate::store::RecordKey;
use crate::util::{machine_id, now_ms, rfc3339};

/// How often autosleep looks at machines.
const AUTOSLEEP_TICK: Duration = Duration::from_millis(250);

/// Fields of a new machine.
pub struct NewMachine {
    pub vcpu: f64,
    pub memory_mib: i64,
    pub storage_gib: i64,
    pub autosleep_seconds: u64,
}

/// Fields an update may change.
#[derive(Default)]
pub struct MachineUpdate {
    pub vcpu: Option<f64>,
    pub memory_mib: Option<i64>,
    pub storage_gib: Option<i64>,
    pub autosleep_seconds: Option<u64>,
}

/// Who asked for a sleep.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum SleepCause {
    Api,
    Autosleep,
}

/// Strips `W/` and quotes from an `If-Match` value.
pub fn normalize_etag(value: &str) -> &str {
    let v = value.trim();
    let v = v.strip_prefix("W/").unwrap_or(v);
    v.trim_matches('"')
}

fn check_if_match(m: &Machine, if_match: Option<&str>) -> Result<(), ApiError> {
    let Some(raw) = if_match else {
        return Ok(());
    };
    let provided = normalize_etag(raw);
    if provided == "*" || provided == m.revision_str() {
        return Ok(());
    }
    Err(DcsError::new(
        StatusCode::CONFLICT,
        "REVISION_MISMATCH",
        "revision mismatch",
        true,
    )
    .detail("expected_revision", m.revision_str())
    .detail("provided_revision", provided)
    .into())
}

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

fn live<'a>(st: &'a mut crate::state::State, id: &str) -> Result<&'a mut Machine, ApiError> {
    st.live_machine_mut(id)
        .ok_or_else(|| ApiError::machine_not_found(id))
}

fn invalid_transition(m: &Machine, target: Desired, retry_after_ms: Option<u64>) -> ApiError {
    let phase = serde_json::to_value(m.phase)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    let desired = |d: Desired| {
        serde_json::to_value(d)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    };
    ApiError::invalid_state(
        "requested lifecycle transition is invalid for current machine state",
        retry_after_ms,
    )
    .detail("current_desired_state", desired(m.desired))
    .detail("current_observed_state", phase)
    .detail("target_desired_state", desired(target))
    .into()
}

/// Creates a machine (phase `accepted`) and starts booting it.
pub async fn create(app: &AppRef, new: NewMachine) -> Machine {
    let now = now_ms();
    let id = machine_id(app.drift().id_format);
    let snapshot = {
        let mut st = app.state();
        let seq = st.next_seq();
        let m = Machine {
            id: id.clone(),
            seq,
            vcpu: new.vcpu,
            memory_mib: new.memory_mib,
            storage_gib: new.storage_gib,
            desired: Desired::Running,
            phase: Phase::Accepted,
            reason: "create_requested".to_owned(),
            last_error: None,
            revision: 1,
            last_transition_ms: now,
            last_progress_ms: now,
            created_ms: now,
            autosleep_seconds: new.autosleep_seconds,
            running_since_ms: None,
            hold_until_ms: None,
            hold_jitter_ms: 0,
            hold_window_ms: 0,
            last_activity_ms: now,
            op: 1,
        };
        st.insert_machine(m.clone());
        m
    };
    if let Err(e) = tokio::fs::create_dir_all(app.home_dir(&id)).await {
        tracing::error!(machine = %id, error = %e, "cannot create machine home");
    }
    let booting = {
        let (app, id) = (app.clone(), id.clone());
        async move {
            advance(&app, &id, 1, &[Phase::Accepted], Phase::Starting, "booting").await;
        }
    };
    let boot = app.timing().boot_delay_ms;
    publish_then(app, &id, booting, (1, boot), TO_RUNNING).await;
    snapshot
}

/// Starts an operation on `m` (wake, sleep, destroy): its desired state,
/// its first phase, and a new operation number (an earlier operation's
/// timers no longer apply). Returns the machine to answer with and the
/// operation number (`None` where an operation leaves the machine alone).
fn begin(m: &mut Machine, desired: Desired, phase: Phase, reason: &str) -> (Machine, Option<u64>) {
    m.desired = desired;
    m.op += 1;
    m.transition(phase, reason);
    (m.clone(), Some(m.op))
}

/// Runs `f` on live machine `id` under the state lock, once `if_match` (if
/// any) matched its revision; 404 for a machine that is gone.
fn on_machine<T>(
    app: &AppRef,
    id: &str,
    if_match: Option<&str>,
    f: impl FnOnce(&mut Machine) -> Result<T, ApiError>,
) -> Result<T, ApiError> {
    let mut st = app.state();
    let m = live(&mut st, id)?;
    check_if_match(m, if_match)?;
    f(m)
}

/// A timer-driven transition that ends an operation: `from` → `to`.
struct Step {
    from: Phase,
    to: Phase,
    reason: &'static str,
}

/// Booted (create) or woken (wake).
const TO_RUNNING: Step = Step {
    from: Phase::Starting,
    to: Phase::Running,
    reason: "running",
};

/// An operation that ends the machine's processes first (they record
/// `error_code` and `message`), then takes `step`.
struct Stop {
    error_code: &'static str,
    message: &'static str,
    step: Step,
}

const SLEEP: Stop = Stop {
    error_code: "MACHINE_SLEEPING",
    message: "the machine went to sleep",
    step: Step {
        from: Phase::Stopping,
        to: Phase::Sleeping,
        reason: "sleeping",
    },
};
const DESTROY: Stop = Stop {
    error_code: "MACHINE_DESTROYED",
    message: "the machine was destroyed",
    step: Step {
        from: Phase::Destroying,
        to: Phase::Destroyed,
        reason: "destroyed",
    },
};

/// Publishes an operation's first change (marks the machine's record,
/// tells watchers, writes to disk), then,
/// in the background, runs `first` (the process kill of a sleep or a
/// destroy) and, `delay_ms` later, `step` (if the machine is still in
/// operation `op`).
async fn publish_then(
    app: &AppRef,
    id: &str,
    first: impl std::future::Future<Output = ()> + Send + 'static,
    (op, delay_ms): (u64, u64),
    step: Step,
) {
    app.state().mark(RecordKey::machine(id));
    app.notify();
    app.persist().await;
    let app = app.clone();
    let id = id.to_owned();
    tokio::spawn(async move {
        first.await;
        tokio::time::sleep(ms(delay_ms)).await;
        advance(&app, &id, op, &[step.from], step.to, step.reason).await;
    });
}

/// Ends the machine's processes, then publishes the change and schedules
/// the stop's step (see [`publish_then`]) after the kill.
async fn stop_then(app: &AppRef, id: &str, timer: (u64, u64), stop: Stop) {
    let kill = stop_machine_processes(app, id, stop.error_code, stop.message);
    publish_then(app, id, kill, timer, stop.step).await;
}

/// Applies a timer-driven transition if the machine is still in the
/// operation that scheduled it.
async fn advance(app: &AppRef, id: &str, op: u64, from: &[Phase], to: Phase, reason: &str) {
    let timing = app.timing();
    let changed = {
        let mut st = app.state();
        match st.machines.get_mut(id) {
            Some(m) if m.op == op && from.contains(&m.phase) => {
                m.transition(to, reason);
                let now = now_ms();
                match to {
                    Phase::Running => {
                        let jitter = if timing.hold_jitter_ms == 0 {
                            0
                        } else {
                            rand::rng().random_range(0..=timing.hold_jitter_ms)
                        };
                        let hold = timing.hold_window_ms.saturating_add(jitter);
                        m.running_since_ms = Some(now);
                        m.hold_window_ms = timing.hold_window_ms;
                        m.hold_jitter_ms = jitter;
                        m.hold_until_ms =
                            Some(now.saturating_add(i64::try_from(hold).unwrap_or(i64::MAX)));
                        m.last_activity_ms = now;
                    }
                    Phase::Sleeping | Phase::Destroyed => {
                        m.running_since_ms = None;
                        m.hold_until_ms = None;
                    }
                    _ => {}
                }
                st.mark(RecordKey::machine(id));
                true
            }
            _ => false,
        }
    };
    if changed {
        if matches!(to, Phase::Sleeping | Phase::Destroyed) {
            // A sandbox started while the machine was stopping goes too.
            app.sandboxes.stop(id).await;
        }
        if to == Phase::Destroyed {
            let dir = app.machine_dir(id);
            if let Err(e) = tokio::fs::remove_dir_all(&dir).await {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(machine = %id, error = %e, "cannot remove machine directory");
                }
            }
        }
        app.notify();
        app.persist().await;
    }
}

/// Wakes a machine. Running, starting and accepted machines are left alone
/// (concurrent wakes coalesce).
pub async fn wake(app: &AppRef, id: &str, if_match: Option<&str>) -> Result<Machine, ApiError> {
    let timing = app.timing();
    let (snapshot, op) = on_machine(app, id, if_match, |m| match m.phase {
        Phase::Running | Phase::Starting | Phase::Accepted | Phase::PlacementPending => {
            Ok((m.clone(), None))
        }
        Phase::Stopping => Err(invalid_transition(
            m,
            Desired::Running,
            Some(timing.sleep_delay_ms.max(100)),
        )),
        Phase::Destroying | Phase::Failed | Phase::Destroyed => {
            Err(invalid_transition(m, Desired::Running, None))
        }
        Phase::Sleeping => Ok(begin(
            m,
            Desired::Running,
            Phase::Starting,
            "wake_requested",
        )),
    })?;
    if let Some(op) = op {
        let timer = (op, timing.wake_delay_ms);
        publish_then(app, id, std::future::ready(()), timer, TO_RUNNING).await;
    }
    Ok(snapshot)
}

/// Puts a machine to sleep: every process of it ends, files stay.
pub async fn sleep(
    app: &AppRef,
    id: &str,
    if_match: Option<&str>,
    cause: SleepCause,
) -> Result<Machine, ApiError> {
    let timing = app.timing();
    let (snapshot, op) = on_machine(app, id, if_match, |m| match m.phase {
        Phase::Sleeping | Phase::Stopping => Ok((m.clone(), None)),
        Phase::Accepted | Phase::PlacementPending | Phase::Starting => {
            let retry = timing.boot_delay_ms.max(timing.wake_delay_ms).max(100);
            Err(invalid_transition(m, Desired::Sleeping, Some(retry)))
        }
        Phase::Destroying | Phase::Failed | Phase::Destroyed => {
            Err(invalid_transition(m, Desired::Sleeping, None))
        }
        Phase::Running => {
            if cause == SleepCause::Api {
                check_hold_window(m)?;
            }
            let reason = match cause {
                SleepCause::Api => "sleep_requested",
                SleepCause::Autosleep => "autosleep",
            };
            Ok(begin(m, Desired::Sleeping, Phase::Stopping, reason))
        }
    })?;
    if let Some(op) = op {
        stop_then(app, id, (op, timing.sleep_delay_ms), SLEEP).await;
    }
    Ok(snapshot)
}

/// 409 while the machine's sleep hold window is open (an API sleep soon
/// after a wake).
fn check_hold_window(m: &Machine) -> Result<(), ApiError> {
    let now = now_ms();
    let Some(until) = m.hold_until_ms.filter(|u| *u > now) else {
        return Ok(());
    };
    let remaining = u64::try_from(until - now).unwrap_or(0);
    let last_wake = m.running_since_ms.unwrap_or(now);
    Err(DcsError::new(
        StatusCode::CONFLICT,
        "SLEEP_HOLD_WINDOW_ACTIVE",
        "sleep hold window is active",
        true,
    )
    .retry_after(remaining)
    .detail("next_sleep_eligible_at", rfc3339(until))
    .detail("remaining_ms", remaining.to_string())
    .detail("hold_window_ms", m.hold_window_ms.to_string())
    .detail("jitter_ms", m.hold_jitter_ms.to_string())
    .detail(
        "effective_hold_window_ms",
        m.hold_window_ms
            .saturating_add(m.hold_jitter_ms)
            .to_string(),
    )
    .detail("last_wake_at", rfc3339(last_wake))
    .into())
}

/// Destroys a machine: processes end, then its directory is removed.
pub async fn destroy(app: &AppRef, id: &str, if_match: Option<&str>) -> Result<Machine, ApiError> {
    let timing = app.timing();
    let (snapshot, op) = on_machine(app, id, if_match, |m| {
        if m.phase == Phase::Destroying {
            return Ok((m.clone(), None));
        }
        let reason = "destroy_requested";
        Ok(begin(m, Desired::Destroyed, Phase::Destroying, reason))
    })?;
    if let Some(op) = op {
        stop_then(app, id, (op, timing.destroy_delay_ms), DESTROY).await;
    }
    Ok(snapshot)
}

/// Changes a machine's size or autosleep; bumps the revision.
pub async fn update(
    app: &AppRef,
    id: &str,
    if_match: Option<&str>,
    upd: MachineUpdate,
) -> Result<Machine, ApiError> {
    let snapshot = on_machine(app, id, if_match, |m| {
        if matches!(m.phase, Phase::Destroying | Phase::Failed) {
            return Err(invalid_transition(m, m.desired, None));
        }
        if let Some(v) = upd.vcpu {
            m.vcpu = v;
        }
        if let Some(v) = upd.memory_mib {
            m.memory_mib = v;
        }
        if let Some(v) = upd.storage_gib {
            m.storage_gib = v;
        }
        if let Some(v) = upd.autosleep_seconds {
            m.autosleep_seconds = v;
        }
        m.touch_revision();
        Ok(m.clone())
    })?;
    app.state().mark(RecordKey::machine(id));
    app.notify();
    app.persist().await;
    Ok(snapshot)
}

/// Ends every process of a machine: queued and running executions become
/// `cancelled` with `error_code`, ready terminals `closed` (their clients get
/// `{"type":"closed"}`). The state changes happen now; the returned future
/// performs the blocking kill.
pub fn stop_machine_processes(
    app: &AppRef,
    machine_id: &str,
    error_code: &str,
    message: &str,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let (exec_ids, term_ids) = app
        .state()
        .end_machine_work(machine_id, error_code, message);
    let (cancels, sessions) = {
        let mut rt = app.rt();
        let cancels: Vec<_> = exec_ids
            .iter()
            .filter_map(|id| rt.exec_cancel.remove(id))
            .collect();
        let sessions: Vec<_> = term_ids
            .iter()
            .filter_map(|id| rt.terminals.remove(id))
            .collect();
        (cancels, sessions)
    };
    for c in cancels {
        let _ = c.send(());
    }
    for s in &sessions {
        s.kill();
        s.mark_closed();
    }
    let mid = machine_id.to_owned();
    let app = app.clone();
    async move {
        app.sandboxes.stop(&mid).await;
        let result = tokio::task::spawn_blocking(move || {
            proc::kill_marked(|v| v == mid, None);
        })
        .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "process killer failed");
        }
    }
}

/// Waits until the machine is running, waking it if it sleeps.
pub async fn wait_until_running(app: &AppRef, id: &str, limit: Duration) -> Result<(), String> {
    let mut rx = app.changed.subscribe();
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let phase = app.state().live_machine(id).map(|m| m.phase);
        match phase {
            None | Some(Phase::Destroying | Phase::Destroyed | Phase::Failed) => {
                return Err("the machine is no longer available".to_owned());
            }
            Some(Phase::Running) => return Ok(()),
            Some(Phase::Sleeping) => {
                if let Err(e) = wake(app, id, None).await {
                    tracing::debug!(machine = %id, error = ?e, "wake while waiting failed");
                }
            }
            Some(_) => {}
        }
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err("the emulator is shutting down".to_owned()),
            Err(_) => return Err("timed out waiting for the machine to run".to_owned()),
        }
    }
}

/// Sleeps running machines that have been idle for their autosleep period.
pub fn spawn_autosleep(app: AppRef) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(AUTOSLEEP_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let due: Vec<String> = {
                let st = app.state();
                let now = now_ms();
                st.machines
                    .values()
                    .filter(|m| m.phase == Phase::Running && m.autosleep_seconds > 0)
                    .filter(|m| {
                        let idle_ms = i64::try_from(m.autosleep_seconds.saturating_mul(1000))
                            .unwrap_or(i64::MAX);
                        now.saturating_sub(m.last_activity_ms) >= idle_ms
                    })
                    .filter(|m| !st.has_active_execution(&m.id))
                    .map(|m| m.id.clone())
                    .collect()
            };
            for id in due {
                tracing::info!(machine = %id, "autosleep");
                if let Err(e) = sleep(&app, &id, None, SleepCause::Autosleep).await {
                    tracing::debug!(machine = %id, error = ?e, "autosleep refused");
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::normalize_etag;

    #[test]
    fn etags_are_normalised() {
        assert_eq!(normalize_etag("\"7\""), "7");
        assert_eq!(normalize_etag("W/\"7\""), "7");
        assert_eq!(normalize_etag(" 7 "), "7");
    }
}

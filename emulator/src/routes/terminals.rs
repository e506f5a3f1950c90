//! Terminal routes: create, list, get, close, and the WebSocket stream.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::json;

use super::{check_env, json_response, list_of, record_or_404, usable_machine};
use crate::errors::{parse_json, ApiError, DcsError};
use crate::faults::DropWebSocket;
use crate::lifecycle;
use crate::sandbox;
use crate::server::AppRef;
use crate::state::{Phase, TermStatus, Terminal};
use crate::store::RecordKey;
use crate::terminal::{self, Outbound, ShellSpec, TermSession};
use crate::util::{now_ms, terminal_id};
use crate::views;

/// Longest wait for a machine to wake before a terminal fails.
const WAKE_LIMIT: Duration = Duration::from_secs(120);
/// Largest output frame sent to a client.
const FRAME_MAX: usize = 64 * 1024;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateTerminalBody {
    width: i64,
    height: i64,
    #[serde(default)]
    cwd: Option<String>,
    #[serde(default)]
    env: Option<BTreeMap<String, String>>,
    #[serde(default)]
    shell: Option<String>,
}

fn dimension(v: i64, name: &str) -> Result<u16, ApiError> {
    u16::try_from(v)
        .ok()
        .filter(|v| (1..=1000).contains(v))
        .ok_or_else(|| ApiError::unprocessable(format!("{name} must be between 1 and 1000")))
}

pub async fn create(
    State(app): State<AppRef>,
    Path(machine_id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let t = new_terminal(parse_json(&body)?, &machine_id)?;
    let (record, running) = insert_terminal(&app, t)?;
    app.touch_activity(&machine_id);
    let record = if running {
        start_shell(&app, &record).await
    } else {
        start_when_awake(&app, record.clone());
        record
    };
    app.persist().await;
    Ok(json_response(
        StatusCode::OK,
        &views::terminal(&record, &app.base_url),
    ))
}

/// The request checked (size, environment, shell) as a terminal waiting
/// for its shell; numbered when inserted.
fn new_terminal(req: CreateTerminalBody, machine_id: &str) -> Result<Terminal, ApiError> {
    let width = dimension(req.width, "width")?;
    let height = dimension(req.height, "height")?;
    let env = req.env.unwrap_or_default();
    check_env(&env)?;
    let shell = req
        .shell
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| "/bin/bash".to_owned());
    if shell.contains('\0') {
        return Err(ApiError::unprocessable("invalid shell"));
    }
    Ok(Terminal {
        id: terminal_id(),
        machine_id: machine_id.to_owned(),
        seq: 0,
        width,
        height,
        cwd: req.cwd,
        shell,
        env,
        status: TermStatus::WakeInProgress,
        created_ms: 0,
        ready_ms: None,
        error_code: None,
        error_message: None,
    })
}

/// Records a terminal of a usable machine; also says whether the machine
/// runs (the shell can start now).
fn insert_terminal(app: &AppRef, mut t: Terminal) -> Result<(Terminal, bool), ApiError> {
    let mut st = app.state();
    let running = usable_machine(&st, &t.machine_id)?.phase == Phase::Running;
    t.seq = st.next_seq();
    t.created_ms = now_ms();
    st.insert_terminal(t.clone());
    Ok((t, running))
}

/// Starts the shell once the machine runs (waking it), or fails the
/// terminal when the machine does not come up.
fn start_when_awake(app: &AppRef, pending: Terminal) {
    let app = app.clone();
    tokio::spawn(async move {
        match lifecycle::wait_until_running(&app, &pending.machine_id, WAKE_LIMIT).await {
            Ok(()) => {
                start_shell(&app, &pending).await;
            }
            Err(msg) => {
                fail(&app, &pending.id, "MACHINE_UNAVAILABLE", &msg);
                app.persist().await;
            }
        }
    });
}

fn fail(app: &AppRef, terminal_id: &str, code: &str, message: &str) {
    {
        let mut st = app.state();
        if let Some(t) = st.terminals.get_mut(terminal_id) {
            if t.status == TermStatus::WakeInProgress {
                t.status = TermStatus::Failed;
                t.error_code = Some(code.to_owned());
                t.error_message = Some(message.to_owned());
                st.mark(RecordKey::terminal(terminal_id));
            }
        }
    }
    app.notify();
}

/// Starts the shell for a terminal whose machine runs; returns the record.
async fn start_shell(app: &AppRef, t: &Terminal) -> Terminal {
    let argv = [t.shell.clone()];
    let started = match sandbox::launch(app, &t.machine_id, &argv, t.cwd.as_deref()).await {
        Ok(launch) => {
            let spec = ShellSpec {
                shell: &t.shell,
                launch: &launch,
                env: &t.env,
                width: t.width,
                height: t.height,
            };
            terminal::spawn(app, &t.id, &t.machine_id, &spec)
        }
        Err(e) => Err(e.to_string()),
    };
    match started {
        Ok(session) => {
            let still_pending = {
                let mut st = app.state();
                match st.terminals.get_mut(&t.id) {
                    Some(rec) if rec.status == TermStatus::WakeInProgress => {
                        rec.status = TermStatus::Ready;
                        rec.ready_ms = Some(now_ms());
                        st.mark(RecordKey::terminal(&t.id));
                        true
                    }
                    _ => false,
                }
            };
            if !still_pending {
                session.kill();
            }
            app.touch_activity(&t.machine_id);
            app.notify();
        }
        Err(msg) => fail(app, &t.id, "TERMINAL_START_FAILED", &msg),
    }
    app.state()
        .terminals
        .get(&t.id)
        .cloned()
        .unwrap_or_else(|| t.clone())
}

pub async fn list(
    State(app): State<AppRef>,
    Path(machine_id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    list_of(&app, &machine_id, &q, |t: &Terminal| {
        views::terminal(t, &app.base_url)
    })
}

pub async fn get_one(
    State(app): State<AppRef>,
    Path((machine_id, terminal_id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let t = record_or_404::<Terminal>(&app.state(), &machine_id, &terminal_id)?.clone();
    Ok(json_response(
        StatusCode::OK,
        &views::terminal(&t, &app.base_url),
    ))
}

/// Closes a terminal: its shell ends, a connected client gets `closed`.
pub async fn delete(
    State(app): State<AppRef>,
    Path((machine_id, terminal_id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    record_or_404::<Terminal>(&app.state(), &machine_id, &terminal_id)?;
    let changed = {
        let mut st = app.state();
        match st.terminals.get_mut(&terminal_id) {
            Some(t) if t.status == TermStatus::Ready || t.status == TermStatus::WakeInProgress => {
                t.status = TermStatus::Closed;
                st.mark(RecordKey::terminal(&terminal_id));
                true
            }
            _ => false,
        }
    };
    if changed {
        let session = app.rt().terminals.remove(&terminal_id);
        if let Some(s) = session {
            s.kill();
            s.mark_closed();
        }
        app.notify();
        app.persist().await;
    }
    let t = record_or_404::<Terminal>(&app.state(), &machine_id, &terminal_id)?.clone();
    Ok(json_response(
        StatusCode::OK,
        &views::terminal(&t, &app.base_url),
    ))
}

/// Records a terminal's new size (written with the next flush).
fn resized(app: &AppRef, terminal_id: &str, width: u16, height: u16) {
    let mut st = app.state();
    if let Some(t) = st.terminals.get_mut(terminal_id) {
        t.width = width;
        t.height = height;
        st.mark(RecordKey::terminal(terminal_id));
    }
}

fn not_streamable(status: TermStatus) -> ApiError {
    let current = serde_json::to_value(status)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    let e = ApiError::invalid_state(
        "terminal is not ready for streaming",
        (status == TermStatus::WakeInProgress).then_some(250),
    );
    DcsError::detail(e, "current_status", current)
        .detail("expected_status", "ready")
        .into()
}

/// `GET …/terminals/{id}/stream`: upgrades to the terminal WebSocket.
pub async fn connect(
    State(app): State<AppRef>,
    Path((machine_id, terminal_id)): Path<(String, String)>,
    drop_after: Option<Extension<DropWebSocket>>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let t = record_or_404::<Terminal>(&app.state(), &machine_id, &terminal_id)?.clone();
    if t.status != TermStatus::Ready {
        return Err(not_streamable(t.status));
    }
    let session = app.rt().terminals.get(&terminal_id).cloned();
    let Some(session) = session.filter(|s| !s.is_closed()) else {
        return Err(not_streamable(TermStatus::Closed));
    };
    let ws = ws.map_err(|e| ApiError::bad_request(format!("not a WebSocket upgrade: {e}")))?;
    let drop_after = drop_after.map(|Extension(DropWebSocket(ms))| ms);
    Ok(ws
        .on_upgrade(move |socket| serve_socket(app, session, socket, drop_after))
        .into_response())
}

fn output_frame(data: &[u8]) -> Message {
    Message::Text(
        json!({"type": "output", "data": STANDARD.encode(data)})
            .to_string()
            .into(),
    )
}

fn error_frame(code: &str, message: &str) -> Message {
    Message::Text(
        json!({"type": "error", "error_code": code, "error_message": message})
            .to_string()
            .into(),
    )
}

fn closed_frame() -> Message {
    Message::Text(json!({"type": "closed"}).to_string().into())
}

fn close_message(code: u16, reason: &str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }))
}

/// What one client frame asks for.
enum ClientFrame {
    Input(Vec<u8>),
    Resize(u16, u16),
    Invalid(String),
    Ignore,
}

fn parse_client_text(text: &str) -> ClientFrame {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(text) else {
        return ClientFrame::Invalid("frames must be JSON objects".to_owned());
    };
    match v.get("type").and_then(|t| t.as_str()) {
        Some("input") => match v.get("data").and_then(|d| d.as_str()) {
            Some(d) => match STANDARD.decode(d) {
                Ok(bytes) => ClientFrame::Input(bytes),
                Err(_) => ClientFrame::Invalid("input data must be base64".to_owned()),
            },
            None => ClientFrame::Invalid("input needs a base64 data field".to_owned()),
        },
        Some("resize") => {
            let dim = |k: &str| {
                v.get(k)
                    .and_then(serde_json::Value::as_i64)
                    .and_then(|n| u16::try_from(n).ok())
                    .filter(|n| (1..=1000).contains(n))
            };
            match (dim("width"), dim("height")) {
                (Some(w), Some(h)) => ClientFrame::Resize(w, h),
                _ => ClientFrame::Invalid(
                    "resize needs integer width and height in 1..=1000".to_owned(),
                ),
            }
        }
        Some("ping") => ClientFrame::Ignore,
        _ => ClientFrame::Invalid("unknown frame type".to_owned()),
    }
}

/// The sending half of a terminal WebSocket.
type Tx = futures_util::stream::SplitSink<WebSocket, Message>;

/// Sends `data` as output frames of at most [`FRAME_MAX`] bytes; false once
/// the client is gone.
async fn send_output(tx: &mut Tx, data: &[u8]) -> bool {
    for chunk in data.chunks(FRAME_MAX) {
        if tx.send(output_frame(chunk)).await.is_err() {
            return false;
        }
    }
    true
}

/// `{"type":"closed"}`, then a normal close.
async fn send_closed(tx: &mut Tx) {
    let _ = tx.send(closed_frame()).await;
    let _ = tx.send(close_message(1000, "terminal closed")).await;
}

/// Writes client input to the shell (activity, for autosleep); an error
/// frame when that fails.
async fn input(app: &AppRef, session: &TermSession, tx: &mut Tx, bytes: &[u8]) {
    app.touch_activity(&session.machine_id);
    if let Err(e) = session.write_input(bytes).await {
        let _ = tx
            .send(error_frame("TERMINAL_WRITE_FAILED", &e.to_string()))
            .await;
    }
}

/// Acts on one text frame of the client: input, resize, ping, or an error
/// frame for anything else.
async fn on_text(app: &AppRef, session: &TermSession, tx: &mut Tx, text: &str) {
    match parse_client_text(text) {
        ClientFrame::Input(bytes) => input(app, session, tx, &bytes).await,
        ClientFrame::Resize(w, h) => {
            if let Err(e) = session.resize(w, h).await {
                let _ = tx.send(error_frame("TERMINAL_RESIZE_FAILED", &e)).await;
            } else {
                resized(app, &session.terminal_id, w, h);
            }
        }
        ClientFrame::Invalid(msg) => {
            let _ = tx.send(error_frame("INVALID_MESSAGE", &msg)).await;
        }
        ClientFrame::Ignore => {}
    }
}

/// One client connection: the backlog first, then shell output and client
/// frames until either side ends (or an injected fault drops it).
async fn serve_socket(
    app: AppRef,
    session: Arc<TermSession>,
    socket: WebSocket,
    drop_after: Option<u64>,
) {
    let mut attached = session.attach();
    let (mut tx, mut rx) = socket.split();
    let drop_timer = async {
        match drop_after {
            Some(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(drop_timer);

    let mut ok = send_output(&mut tx, &attached.backlog).await;
    if ok && attached.closed {
        send_closed(&mut tx).await;
        ok = false;
    }
    while ok {
        tokio::select! {
            () = &mut drop_timer => {
                tracing::info!(terminal = %session.terminal_id, "dropping WebSocket (injected fault)");
                break;
            }
            out = attached.rx.recv() => match out {
                Some(Outbound::Data(data)) => ok = send_output(&mut tx, &data).await,
                Some(Outbound::Closed) => {
                    send_closed(&mut tx).await;
                    break;
                }
                None => {
                    // Replaced by a newer connection.
                    let _ = tx.send(close_message(1000, "replaced by a newer connection")).await;
                    break;
                }
            },
            incoming = rx.next() => match incoming {
                Some(Ok(Message::Text(text))) => on_text(&app, &session, &mut tx, text.as_str()).await,
                Some(Ok(Message::Binary(bytes))) => input(&app, &session, &mut tx, &bytes).await,
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
        }
    }
    session.detach(attached.client_id);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_frames() {
        assert!(
            matches!(parse_client_text(r#"{"type":"input","data":"aGkK"}"#), ClientFrame::Input(b) if b == b"hi\n")
        );
        assert!(matches!(
            parse_client_text(r#"{"type":"resize","width":80,"height":24}"#),
            ClientFrame::Resize(80, 24)
        ));
        assert!(matches!(
            parse_client_text(r#"{"type":"resize","width":0,"height":24}"#),
            ClientFrame::Invalid(_)
        ));
        assert!(matches!(
            parse_client_text(r#"{"type":"input","data":"%%%"}"#),
            ClientFrame::Invalid(_)
        ));
        assert!(matches!(
            parse_client_text("not json"),
            ClientFrame::Invalid(_)
        ));
    }
}

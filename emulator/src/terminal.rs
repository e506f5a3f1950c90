//! PTY sessions behind terminals: the shell process, output buffering while
//! no client is connected, and hand-over to the connected WebSocket client.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::proc;
use crate::sandbox::Launch;
use crate::server::AppRef;
use crate::state::TermStatus;
use crate::store::RecordKey;

/// Output kept while no client is connected.
pub const BUFFER_CAP: usize = 1024 * 1024;

/// What the session sends to its connected client.
pub enum Outbound {
    Data(Bytes),
    Closed,
}

struct OutState {
    buf: Vec<u8>,
    client: Option<(u64, mpsc::UnboundedSender<Outbound>)>,
    next_client: u64,
    closed: bool,
}

/// A live shell on a PTY.
pub struct TermSession {
    pub terminal_id: String,
    pub machine_id: String,
    pid: Option<u32>,
    writer: tokio::sync::Mutex<pty_process::OwnedWritePty>,
    out: Mutex<OutState>,
}

/// A client's view right after attaching.
pub struct Attached {
    pub client_id: u64,
    pub rx: mpsc::UnboundedReceiver<Outbound>,
    pub backlog: Vec<u8>,
    pub closed: bool,
}

/// How to start a shell.
pub struct ShellSpec<'a> {
    pub shell: &'a str,
    /// The shell process as planned by [`crate::sandbox::launch`].
    pub launch: &'a Launch,
    pub env: &'a BTreeMap<String, String>,
    pub width: u16,
    pub height: u16,
}

impl TermSession {
    fn out(&self) -> MutexGuard<'_, OutState> {
        self.out.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers the (only) client; a previous client is detached. Returns
    /// the output buffered while no client was connected.
    pub fn attach(&self) -> Attached {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut out = self.out();
        out.next_client += 1;
        let client_id = out.next_client;
        out.client = Some((client_id, tx));
        Attached {
            client_id,
            rx,
            backlog: std::mem::take(&mut out.buf),
            closed: out.closed,
        }
    }

    pub fn detach(&self, client_id: u64) {
        let mut out = self.out();
        if out.client.as_ref().is_some_and(|(id, _)| *id == client_id) {
            out.client = None;
        }
    }

    fn deliver(&self, data: &[u8]) {
        let mut out = self.out();
        if let Some((_, tx)) = &out.client {
            if tx
                .send(Outbound::Data(Bytes::copy_from_slice(data)))
                .is_ok()
            {
                return;
            }
            out.client = None;
        }
        out.buf.extend_from_slice(data);
        if out.buf.len() > BUFFER_CAP {
            let excess = out.buf.len() - BUFFER_CAP;
            out.buf.drain(..excess);
        }
    }

    /// Tells the client the terminal closed (once).
    pub fn mark_closed(&self) {
        let mut out = self.out();
        if out.closed {
            return;
        }
        out.closed = true;
        if let Some((_, tx)) = out.client.take() {
            let _ = tx.send(Outbound::Closed);
        }
    }

    pub fn is_closed(&self) -> bool {
        self.out().closed
    }

    pub async fn write_input(&self, data: &[u8]) -> std::io::Result<()> {
        let mut w = self.writer.lock().await;
        w.write_all(data).await?;
        w.flush().await
    }

    pub async fn resize(&self, width: u16, height: u16) -> Result<(), String> {
        let w = self.writer.lock().await;
        w.resize(pty_process::Size::new(height, width))
            .map_err(|e| e.to_string())
    }

    /// Kills the shell's process group (the rest of its session goes with
    /// the machine-wide sweep or when the PTY hangs up).
    pub fn kill(&self) {
        if let Some(pid) = self.pid {
            proc::signal_group(pid, proc::SIGHUP);
            proc::signal_group(pid, proc::SIGKILL);
        }
    }
}

/// Starts the shell on a new PTY and registers the session.
pub fn spawn(
    app: &AppRef,
    terminal_id: &str,
    machine_id: &str,
    spec: &ShellSpec<'_>,
) -> Result<Arc<TermSession>, String> {
    let (pty, pts) = pty_process::open().map_err(|e| format!("cannot open a pty: {e}"))?;
    pty.resize(pty_process::Size::new(spec.height, spec.width))
        .map_err(|e| format!("cannot size the pty: {e}"))?;
    let child = shell_command(machine_id, spec)
        .spawn(pts)
        .map_err(|e| format!("cannot start {}: {e}", spec.shell))?;
    let (reader, writer) = pty.into_split();
    let session = Arc::new(TermSession {
        terminal_id: terminal_id.to_owned(),
        machine_id: machine_id.to_owned(),
        pid: child.id(),
        writer: tokio::sync::Mutex::new(writer),
        out: Mutex::new(OutState {
            buf: Vec::new(),
            client: None,
            next_client: 0,
            closed: false,
        }),
    });
    app.rt()
        .terminals
        .insert(terminal_id.to_owned(), session.clone());
    watch(app, &session, child, reader);
    Ok(session)
}

/// The shell process: a clean environment plus the terminal's, marked with
/// the machine id.
fn shell_command(machine_id: &str, spec: &ShellSpec<'_>) -> pty_process::Command {
    pty_process::Command::new(&spec.launch.program)
        .args(&spec.launch.args)
        .env_clear()
        .env("PATH", host_path())
        .env("HOME", &spec.launch.home)
        .env("TERM", "xterm-256color")
        .env("LANG", "C.UTF-8")
        .env("USER", "root")
        .env("SHELL", spec.shell)
        .envs(spec.env.iter())
        .env(proc::MACHINE_ENV, machine_id)
        .current_dir(&spec.launch.dir)
}

/// Delivers the shell's output to the session; once the shell exits (and
/// its output is read, 300 ms at most), closes the terminal.
fn watch(
    app: &AppRef,
    session: &Arc<TermSession>,
    mut child: tokio::process::Child,
    mut reader: pty_process::OwnedReadPty,
) {
    let reader_session = session.clone();
    let mut reader_task = tokio::spawn(async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => reader_session.deliver(&buf[..n]),
            }
        }
    });
    let app = app.clone();
    let waiter_session = session.clone();
    tokio::spawn(async move {
        let status = child.wait().await;
        tracing::debug!(terminal = %waiter_session.terminal_id, ?status, "shell exited");
        if tokio::time::timeout(Duration::from_millis(300), &mut reader_task)
            .await
            .is_err()
        {
            reader_task.abort();
        }
        finish(&app, &waiter_session).await;
    });
}

/// Marks a terminal closed after its shell ended and tells its client.
async fn finish(app: &AppRef, session: &Arc<TermSession>) {
    let changed = {
        let mut st = app.state();
        match st.terminals.get_mut(&session.terminal_id) {
            Some(t) if t.status == TermStatus::Ready || t.status == TermStatus::WakeInProgress => {
                t.status = TermStatus::Closed;
                true
            }
            _ => false,
        }
    };
    {
        let mut rt = app.rt();
        if rt
            .terminals
            .get(&session.terminal_id)
            .is_some_and(|s| Arc::ptr_eq(s, session))
        {
            rt.terminals.remove(&session.terminal_id);
        }
    }
    session.mark_closed();
    if let Some(pid) = session.pid.and_then(|p| i32::try_from(p).ok()) {
        let mid = session.machine_id.clone();
        let _ =
            tokio::task::spawn_blocking(move || proc::kill_marked(|v| v == mid, Some(pid))).await;
    }
    if changed {
        app.notify();
        app.save(RecordKey::terminal(&session.terminal_id)).await;
    }
}

/// `PATH` for machine processes.
pub fn host_path() -> String {
    std::env::var("PATH").unwrap_or_else(|_| {
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned()
    })
}

//! Runs an execution: waits for the machine, starts argv as a real process
//! in its own process group, captures bounded output, and records the end
//! (exit, signal, timeout, cancellation).

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::lifecycle;
use crate::proc;
use crate::sandbox::{self, Launch};
use crate::server::AppRef;
use crate::state::{EventKind, ExecStatus, Execution};
use crate::store::RecordKey;
use crate::terminal::host_path;

/// Longest wait for a machine to wake before an execution gives up.
const WAKE_LIMIT: Duration = Duration::from_secs(120);
/// How long output readers may continue after the process exited (a
/// background child may hold the pipes open).
const DRAIN_GRACE: Duration = Duration::from_millis(300);

/// What to run.
pub struct ExecSpec {
    pub command: Vec<String>,
    pub cwd: Option<String>,
    pub env: BTreeMap<String, String>,
    pub stdin: Option<String>,
    pub timeout_ms: Option<u64>,
}

/// Maps a requested working directory into the machine home: `/root` and
/// `/root/...` map into it, relative paths resolve against it.
pub fn resolve_cwd(home: &Path, cwd: Option<&str>) -> PathBuf {
    let Some(cwd) = cwd.map(str::trim).filter(|c| !c.is_empty()) else {
        return home.to_path_buf();
    };
    if cwd == "/root" || cwd == "~" {
        return home.to_path_buf();
    }
    if let Some(rest) = cwd
        .strip_prefix("/root/")
        .or_else(|| cwd.strip_prefix("~/"))
    {
        return home.join(rest);
    }
    if cwd.starts_with('/') {
        return PathBuf::from(cwd);
    }
    home.join(cwd)
}

/// Starts the task that runs for a recorded execution.
pub fn start(app: &AppRef, execution_id: String, machine_id: String, spec: ExecSpec) {
    let (tx, rx) = oneshot::channel();
    app.rt().exec_cancel.insert(execution_id.clone(), tx);
    let app = app.clone();
    tokio::spawn(async move {
        run(&app, &execution_id, &machine_id, spec, rx).await;
        app.rt().exec_cancel.remove(&execution_id);
        app.touch_activity(&machine_id);
        app.save(RecordKey::execution(&execution_id)).await;
    });
}

/// How a started process ended.
enum Outcome {
    Exited(std::io::Result<std::process::ExitStatus>),
    TimedOut,
    Cancelled,
}

/// Why an execution ended without a normal exit: error code and message.
type Failure = (&'static str, String);

fn set_status(app: &AppRef, execution_id: &str, status: ExecStatus) -> bool {
    let mut st = app.state();
    match st.executions.get_mut(execution_id) {
        Some(e) if !e.status.is_terminal() => {
            e.set_status(status);
            true
        }
        _ => false,
    }
}

/// Ends the execution (unless it already has), on disk before in sight
/// (see [`crate::server::App::end_execution`]).
async fn finish(
    app: &AppRef,
    execution_id: &str,
    status: ExecStatus,
    error: Option<(&str, String)>,
) {
    app.end_execution(execution_id, |e| e.finish(status, error))
        .await;
}

async fn fail(app: &AppRef, execution_id: &str, (code, message): Failure) {
    finish(app, execution_id, ExecStatus::Failed, Some((code, message))).await;
}

/// The life of one execution: wait for the machine, start the process,
/// capture its output, record how it ended.
async fn run(
    app: &AppRef,
    execution_id: &str,
    machine_id: &str,
    spec: ExecSpec,
    mut cancel: oneshot::Receiver<()>,
) {
    if !wait_for_machine(app, execution_id, machine_id, &mut cancel).await {
        return;
    }
    let mut child = match spawn_process(app, machine_id, &spec).await {
        Ok(c) => c,
        Err(failure) => return fail(app, execution_id, failure).await,
    };
    let pgid = child.id();
    if !set_status(app, execution_id, ExecStatus::Running) {
        // Cancelled between queueing and start.
        kill_group(pgid);
        let _ = child.wait().await;
        return;
    }
    app.touch_activity(machine_id);
    // Written with the next flush: a restart fails a running execution anyway.
    app.state().mark(RecordKey::execution(execution_id));

    feed_stdin(&mut child, spec.stdin);
    let readers = spawn_readers(app, execution_id, &mut child);
    let outcome = wait_for_end(&mut child, spec.timeout_ms, &mut cancel).await;
    if !matches!(outcome, Outcome::Exited(_)) {
        kill_group(pgid);
        let _ = child.wait().await;
    }
    drain(readers).await;
    record_outcome(app, execution_id, outcome, spec.timeout_ms).await;
}

/// Waits for (and if needed wakes) the machine, then moves a waiting
/// execution to `queued`. False when it is not to start: cancelled, the
/// machine unavailable (recorded), or already ended.
async fn wait_for_machine(
    app: &AppRef,
    execution_id: &str,
    machine_id: &str,
    cancel: &mut oneshot::Receiver<()>,
) -> bool {
    let waited = tokio::select! {
        r = lifecycle::wait_until_running(app, machine_id, WAKE_LIMIT) => r,
        _ = cancel => return false,
    };
    if let Err(msg) = waited {
        fail(app, execution_id, ("MACHINE_UNAVAILABLE", msg)).await;
        return false;
    }
    let mut st = app.state();
    match st.executions.get_mut(execution_id) {
        Some(e) if !e.status.is_terminal() => {
            if e.status == ExecStatus::WakeInProgress {
                e.set_status(ExecStatus::Queued);
            }
            true
        }
        _ => false,
    }
}

/// Starts argv in the machine (its sandbox, its home) as a process group of
/// its own, with piped output.
async fn spawn_process(
    app: &AppRef,
    machine_id: &str,
    spec: &ExecSpec,
) -> Result<tokio::process::Child, Failure> {
    if spec.command.is_empty() {
        return Err(("INVALID_COMMAND", "empty command".to_owned()));
    }
    let launch = sandbox::launch(app, machine_id, &spec.command, spec.cwd.as_deref())
        .await
        .map_err(|e| ("EXECUTION_START_FAILED", e.to_string()))?;
    command(&launch, machine_id, spec).spawn().map_err(|e| {
        let msg = format!(
            "cannot start {:?} in {}: {e}",
            launch.program,
            launch.dir.display()
        );
        ("EXECUTION_START_FAILED", msg)
    })
}

/// The process to start: a clean environment plus the request's, marked
/// with the machine id.
fn command(launch: &Launch, machine_id: &str, spec: &ExecSpec) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(&launch.program);
    cmd.args(&launch.args)
        .current_dir(&launch.dir)
        .env_clear()
        .env("PATH", host_path())
        .env("HOME", &launch.home)
        .env("USER", "root")
        .env("LANG", "C.UTF-8")
        .envs(&spec.env)
        .env(proc::MACHINE_ENV, machine_id)
        .process_group(0)
        .stdin(if spec.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(false);
    cmd
}

fn kill_group(pgid: Option<u32>) {
    if let Some(p) = pgid {
        proc::signal_group(p, proc::SIGKILL);
    }
}

/// Writes the request's stdin to the process in the background.
fn feed_stdin(child: &mut tokio::process::Child, input: Option<String>) {
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        tokio::spawn(async move {
            let _ = stdin.write_all(input.as_bytes()).await;
        });
    }
}

/// One task per output stream, appending to the execution's record.
fn spawn_readers(
    app: &AppRef,
    execution_id: &str,
    child: &mut tokio::process::Child,
) -> Vec<JoinHandle<()>> {
    let out = child
        .stdout
        .take()
        .map(|s| spawn_reader(app, execution_id, EventKind::Stdout, s));
    let err = child
        .stderr
        .take()
        .map(|s| spawn_reader(app, execution_id, EventKind::Stderr, s));
    [out, err].into_iter().flatten().collect()
}

fn spawn_reader(
    app: &AppRef,
    execution_id: &str,
    kind: EventKind,
    src: impl AsyncRead + Unpin + Send + 'static,
) -> JoinHandle<()> {
    let limit = app.args.output_limit;
    tokio::spawn(pump(app.clone(), execution_id.to_owned(), kind, src, limit))
}

/// Waits for the process to exit, its timeout, or a cancellation.
async fn wait_for_end(
    child: &mut tokio::process::Child,
    timeout_ms: Option<u64>,
    cancel: &mut oneshot::Receiver<()>,
) -> Outcome {
    let timeout = async {
        match timeout_ms {
            Some(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        status = child.wait() => Outcome::Exited(status),
        () = timeout => Outcome::TimedOut,
        _ = cancel => Outcome::Cancelled,
    }
}

/// Lets the output readers finish within [`DRAIN_GRACE`], then stops them.
async fn drain(readers: Vec<JoinHandle<()>>) {
    for task in readers {
        let abort = task.abort_handle();
        if tokio::time::timeout(DRAIN_GRACE, task).await.is_err() {
            abort.abort();
        }
    }
}

/// Records how the execution ended (unless it already has).
async fn record_outcome(
    app: &AppRef,
    execution_id: &str,
    outcome: Outcome,
    timeout_ms: Option<u64>,
) {
    match outcome {
        Outcome::Exited(Ok(status)) => {
            app.end_execution(execution_id, |e| end_by_exit(e, status))
                .await;
        }
        Outcome::Exited(Err(e)) => {
            fail(app, execution_id, ("EXECUTION_WAIT_FAILED", e.to_string())).await
        }
        Outcome::TimedOut => {
            finish(
                app,
                execution_id,
                ExecStatus::Expired,
                Some((
                    "EXECUTION_TIMEOUT",
                    format!(
                        "the execution exceeded timeout_ms={}",
                        timeout_ms.unwrap_or(0)
                    ),
                )),
            )
            .await
        }
        Outcome::Cancelled => {
            finish(
                app,
                execution_id,
                ExecStatus::Cancelled,
                Some((
                    "EXECUTION_CANCELLED",
                    "the execution was cancelled".to_owned(),
                )),
            )
            .await
        }
    }
}

/// Ends `e` by its exit code (0 succeeded, else failed) or the killing
/// signal; false if it had already ended.
fn end_by_exit(e: &mut Execution, status: std::process::ExitStatus) -> bool {
    if e.status.is_terminal() {
        return false;
    }
    if let Some(code) = status.code() {
        e.exit_code = Some(i64::from(code));
        let s = if code == 0 {
            ExecStatus::Succeeded
        } else {
            ExecStatus::Failed
        };
        e.finish(s, None)
    } else {
        let sig = status.signal().unwrap_or(0);
        e.signal = Some(i64::from(sig));
        e.finish(
            ExecStatus::Failed,
            Some((
                "KILLED_BY_SIGNAL",
                format!("the process was killed by signal {sig}"),
            )),
        )
    }
}

async fn pump(
    app: AppRef,
    execution_id: String,
    kind: EventKind,
    mut src: impl AsyncRead + Unpin,
    limit: u64,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match src.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if let Some(e) = app.state().executions.get_mut(&execution_id) {
                    e.push_output(kind, &buf[..n], limit);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cwd_mapping() {
        let home = Path::new("/data/machines/dm-1/home");
        assert_eq!(resolve_cwd(home, None), home);
        assert_eq!(resolve_cwd(home, Some("/root")), home);
        assert_eq!(resolve_cwd(home, Some("/root/app")), home.join("app"));
        assert_eq!(resolve_cwd(home, Some("app/x")), home.join("app/x"));
        assert_eq!(resolve_cwd(home, Some("/tmp")), PathBuf::from("/tmp"));
        assert_eq!(
            resolve_cwd(home, Some("/rootless")),
            PathBuf::from("/rootless")
        );
    }
}

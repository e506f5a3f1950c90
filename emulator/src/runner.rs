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

use crate::app::AppRef;
use crate::lifecycle;
use crate::proc;
use crate::sandbox;
use crate::state::{EventKind, ExecStatus};
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

/// Starts the runner task for a recorded execution.
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

enum Outcome {
    Exited(std::io::Result<std::process::ExitStatus>),
    TimedOut,
    Cancelled,
}

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

fn finish(app: &AppRef, execution_id: &str, status: ExecStatus, error: Option<(&str, String)>) {
    if let Some(e) = app.state().executions.get_mut(execution_id) {
        e.finish(status, error);
    }
}

async fn run(
    app: &AppRef,
    execution_id: &str,
    machine_id: &str,
    spec: ExecSpec,
    mut cancel: oneshot::Receiver<()>,
) {
    // Wait for (and if needed wake) the machine.
    let waited = tokio::select! {
        r = lifecycle::wait_until_running(app, machine_id, WAKE_LIMIT) => r,
        _ = &mut cancel => return,
    };
    if let Err(msg) = waited {
        finish(
            app,
            execution_id,
            ExecStatus::Failed,
            Some(("MACHINE_UNAVAILABLE", msg)),
        );
        return;
    }
    let proceed = {
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
    };
    if !proceed {
        return;
    }

    if spec.command.is_empty() {
        finish(
            app,
            execution_id,
            ExecStatus::Failed,
            Some(("INVALID_COMMAND", "empty command".to_owned())),
        );
        return;
    }
    let launch = match sandbox::launch(app, machine_id, &spec.command, spec.cwd.as_deref()).await {
        Ok(l) => l,
        Err(e) => {
            finish(
                app,
                execution_id,
                ExecStatus::Failed,
                Some(("EXECUTION_START_FAILED", e.to_string())),
            );
            return;
        }
    };
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
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let msg = format!(
                "cannot start {:?} in {}: {e}",
                launch.program,
                launch.dir.display()
            );
            finish(
                app,
                execution_id,
                ExecStatus::Failed,
                Some(("EXECUTION_START_FAILED", msg)),
            );
            return;
        }
    };
    let pgid = child.id();
    if !set_status(app, execution_id, ExecStatus::Running) {
        // Cancelled between queueing and start.
        if let Some(p) = pgid {
            proc::signal_group(p, proc::SIGKILL);
        }
        let _ = child.wait().await;
        return;
    }
    app.touch_activity(machine_id);
    // Written with the next flush: a restart fails a running execution anyway.
    app.state().mark(RecordKey::execution(execution_id));

    if let (Some(input), Some(mut stdin)) = (spec.stdin, child.stdin.take()) {
        tokio::spawn(async move {
            let _ = stdin.write_all(input.as_bytes()).await;
        });
    }
    let limit = app.args.output_limit;
    let out_task = child.stdout.take().map(|s| {
        tokio::spawn(pump(
            app.clone(),
            execution_id.to_owned(),
            EventKind::Stdout,
            s,
            limit,
        ))
    });
    let err_task = child.stderr.take().map(|s| {
        tokio::spawn(pump(
            app.clone(),
            execution_id.to_owned(),
            EventKind::Stderr,
            s,
            limit,
        ))
    });

    let timeout = async {
        match spec.timeout_ms {
            Some(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
            None => std::future::pending().await,
        }
    };
    let outcome = tokio::select! {
        status = child.wait() => Outcome::Exited(status),
        () = timeout => Outcome::TimedOut,
        _ = &mut cancel => Outcome::Cancelled,
    };
    if !matches!(outcome, Outcome::Exited(_)) {
        if let Some(p) = pgid {
            proc::signal_group(p, proc::SIGKILL);
        }
        let _ = child.wait().await;
    }
    for task in [out_task, err_task].into_iter().flatten() {
        let abort = task.abort_handle();
        if tokio::time::timeout(DRAIN_GRACE, task).await.is_err() {
            abort.abort();
        }
    }
    match outcome {
        Outcome::Exited(Ok(status)) => {
            let mut st = app.state();
            if let Some(e) = st.executions.get_mut(execution_id) {
                if !e.status.is_terminal() {
                    if let Some(code) = status.code() {
                        e.exit_code = Some(i64::from(code));
                        let s = if code == 0 {
                            ExecStatus::Succeeded
                        } else {
                            ExecStatus::Failed
                        };
                        e.finish(s, None);
                    } else {
                        let sig = status.signal().unwrap_or(0);
                        e.signal = Some(i64::from(sig));
                        e.finish(
                            ExecStatus::Failed,
                            Some((
                                "KILLED_BY_SIGNAL",
                                format!("the process was killed by signal {sig}"),
                            )),
                        );
                    }
                }
            }
        }
        Outcome::Exited(Err(e)) => finish(
            app,
            execution_id,
            ExecStatus::Failed,
            Some(("EXECUTION_WAIT_FAILED", e.to_string())),
        ),
        Outcome::TimedOut => finish(
            app,
            execution_id,
            ExecStatus::Expired,
            Some((
                "EXECUTION_TIMEOUT",
                format!(
                    "the execution exceeded timeout_ms={}",
                    spec.timeout_ms.unwrap_or(0)
                ),
            )),
        ),
        Outcome::Cancelled => finish(
            app,
            execution_id,
            ExecStatus::Cancelled,
            Some((
                "EXECUTION_CANCELLED",
                "the execution was cancelled".to_owned(),
            )),
        ),
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

//! The command runners (terminal and executions backends) against a real
//! emulator. Every command here is harmless and writes only under `$HOME`
//! (the emulated machine's home directory).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use agenthome::dedalus::Client;
use agenthome::runner::{
    read_completion, CommandRunner, ExecutionsRunner, RunnerError, TerminalRunner, Transport,
};
use agenthome_tests::fixtures::{emulator_with_machine_id, poll_until, run_shell};
use serde_json::json;
use tokio::time::Instant;

const T: Duration = Duration::from_secs(20);

/// Runs the shared persistence script on `runner`: cwd, exported variables,
/// exit codes, stderr.
async fn persistence_steps(runner: &mut impl CommandRunner, dir: &str) {
    let o = runner
        .run(&format!("mkdir -p ~/{dir}/sub && cd ~/{dir}/sub"), T)
        .await
        .expect("cd");
    assert_eq!(o.exit_code, Some(0), "{o:?}");
    assert!(!o.still_running);
    let o = runner
        .run("export AH_GREETING='hello world'; AH_LOCAL=1", T)
        .await
        .expect("export");
    assert_eq!(o.exit_code, Some(0));
    let o = runner
        .run("pwd; echo \"greeting=$AH_GREETING\"", T)
        .await
        .expect("pwd");
    assert_eq!(o.exit_code, Some(0));
    assert!(o.output.contains(&format!("/{dir}/sub\n")), "{o:?}");
    assert!(o.output.contains("greeting=hello world"), "{o:?}");
    let o = runner
        .run(
            "echo out; echo err >&2; exit_code_test() { return 7; }; exit_code_test",
            T,
        )
        .await
        .expect("exit 7");
    assert_eq!(o.exit_code, Some(7), "{o:?}");
    assert!(
        o.output.contains("out") && o.output.contains("err"),
        "{o:?}"
    );
    let o = runner.run("false", T).await.expect("false");
    assert_eq!(o.exit_code, Some(1));
}

async fn bash_history(client: &Client, machine: &str) -> String {
    let run = client
        .run_and_wait(
            machine,
            &agenthome::dedalus::ExecutionRequest::shell("cat ~/.bash_history"),
            Instant::now() + T,
        )
        .await
        .expect("read history");
    run.output.stdout
}

#[tokio::test]
async fn terminal_keeps_cwd_env_and_history_across_commands_and_reuse() {
    let (_emu, client, machine) = emulator_with_machine_id(&[]).await;

    let (mut runner, tid) = TerminalRunner::open(&client, &machine, None)
        .await
        .expect("open");
    assert_eq!(runner.transport(), Transport::Terminal);
    assert_eq!(runner.terminal_id(), tid);
    persistence_steps(&mut runner, "ah-term").await;
    runner.close().await;

    // A new runner reusing the stored terminal id: same shell, same context.
    let (mut again, tid2) = TerminalRunner::open(&client, &machine, Some(tid.clone()))
        .await
        .expect("reopen");
    assert_eq!(tid2, tid, "the ready terminal is reused");
    let o = again
        .run("pwd; echo \"$AH_GREETING\"; echo \"local=$AH_LOCAL\"", T)
        .await
        .expect("pwd again");
    assert!(o.output.contains("/ah-term/sub\n"), "{o:?}");
    assert!(o.output.contains("hello world"), "{o:?}");
    assert!(
        o.output.contains("local=1"),
        "same shell keeps locals: {o:?}"
    );

    // A brand-new terminal restores cwd and exports from the saved state.
    again.reopen().await.expect("new terminal");
    assert_ne!(again.terminal_id(), tid);
    let o = again
        .run("pwd; echo \"$AH_GREETING\"", T)
        .await
        .expect("pwd new terminal");
    assert!(o.output.contains("/ah-term/sub\n"), "{o:?}");
    assert!(o.output.contains("hello world"), "{o:?}");

    let history = bash_history(&client, &machine).await;
    assert!(
        history.contains("mkdir -p ~/ah-term/sub && cd ~/ah-term/sub"),
        "{history}"
    );
    assert!(history.contains("export AH_GREETING='hello world'; AH_LOCAL=1"));
    assert!(history.contains("pwd; echo \"$AH_GREETING\""));
    assert!(
        history.contains("echo \"local=$AH_LOCAL\""),
        "a command run in a reused terminal is in the history: {history}"
    );
    assert!(
        !history.contains("stty") && !history.contains("HISTCONTROL"),
        "the setup line is not in history: {history}"
    );
    assert!(
        !history.contains("base64"),
        "the wrapper line is not in history: {history}"
    );
}

#[tokio::test]
async fn a_new_terminal_starts_where_the_last_command_of_any_shell_left_off() {
    // (Each shell saves its state after a command's end marker: one more
    // line typed into it — `settled` — waits until that is done.)
    async fn settled(runner: &mut TerminalRunner) {
        runner.run_builtins(":", &[], T).await.expect("settled");
    }
    // GIVEN two terminals of one machine, A in ~/a and then B in ~/b (B
    // saved last), both with `set -C` (noclobber: the saved files exist)
    let (_emu, client, machine) = emulator_with_machine_id(&[]).await;
    let (mut a, a_terminal) = TerminalRunner::open(&client, &machine, None)
        .await
        .expect("open a");
    a.run("set -C; mkdir -p ~/a ~/b && cd ~/a && export AH_WHO=a", T)
        .await
        .expect("cd a");
    settled(&mut a).await;
    let mut b = TerminalRunner::open(&client, &machine, None)
        .await
        .expect("open b")
        .0;
    b.run("set -C; cd ~/b && export AH_WHO=b", T)
        .await
        .expect("cd b");
    settled(&mut b).await;
    // WHEN A runs a command that changes nothing in A
    let o = a.run("true", T).await.expect("true in a");
    assert_eq!(o.exit_code, Some(0));
    settled(&mut a).await;
    // THEN a new terminal starts in A's directory with A's variables: the
    // last command was A's, though A's own state did not change
    let mut c = TerminalRunner::open(&client, &machine, None)
        .await
        .expect("open c")
        .0;
    let o = c.run("pwd; echo \"who=$AH_WHO\"", T).await.expect("pwd c");
    assert!(o.output.contains("/a\n"), "{o:?}");
    assert!(o.output.contains("who=a"), "{o:?}");
    // AND after C moved to ~/b, A's next command (changing nothing in A)
    // is again the last one: a new terminal starts in ~/a
    c.run("cd ~/b", T).await.expect("cd c");
    settled(&mut c).await;
    a.run("true", T).await.expect("true in a again");
    settled(&mut a).await;
    let mut d = TerminalRunner::open(&client, &machine, None)
        .await
        .expect("open d")
        .0;
    let o = d.run("pwd", T).await.expect("pwd d");
    assert!(o.output.contains("/a\n"), "A ran last: {o:?}");
    // AND with noclobber on, a command A leaves running still marks its
    // shell busy (the busy file exists from A's earlier commands)
    let o = a
        .run("sleep 5", Duration::from_millis(300))
        .await
        .expect("sleep in a");
    assert!(o.still_running, "{o:?}");
    let busy = run_shell(
        &client,
        &machine,
        &format!("cat ~/.agenthome/run/term-{a_terminal}.busy"),
    )
    .await;
    assert!(!busy.output.stdout.trim().is_empty(), "{busy:?}");
}

#[tokio::test]
async fn executions_runner_keeps_cwd_env_and_history() {
    let (_emu, client, machine) = emulator_with_machine_id(&[]).await;
    let mut runner = ExecutionsRunner::new(&client, &machine);
    assert_eq!(runner.transport(), Transport::Executions);
    persistence_steps(&mut runner, "ah-exec").await;
    // stdout and stderr stay in order (merged in the wrapper).
    let o = runner
        .run("echo one; echo two >&2; echo three", T)
        .await
        .expect("order");
    assert_eq!(o.output, "one\ntwo\nthree\n", "{o:?}");
    // `exit` inside the command still saves context.
    let o = runner
        .run("cd ~ && export AH_AFTER=x && exit 3", T)
        .await
        .expect("exit");
    assert_eq!(o.exit_code, Some(3));
    let o = runner
        .run("pwd; echo $AH_AFTER", T)
        .await
        .expect("after exit");
    assert_eq!(o.output.trim_end().lines().nth(1), Some("x"), "{o:?}");
    let history = bash_history(&client, &machine).await;
    assert!(
        history.contains("mkdir -p ~/ah-exec/sub && cd ~/ah-exec/sub"),
        "{history}"
    );
    assert!(history.contains("export AH_GREETING='hello world'; AH_LOCAL=1"));
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn terminal_truncates_a_5mb_output_within_bounded_memory() {
    let (_emu, client, machine) = emulator_with_machine_id(&[]).await;
    let (mut runner, _) = TerminalRunner::open(&client, &machine, None)
        .await
        .expect("open");
    let before = rss_kib();
    let o = runner
        .run(
            "head -c 5000000 /dev/zero | tr '\\0' a; echo; echo done-marker",
            Duration::from_secs(60),
        )
        .await
        .expect("big output");
    let after = rss_kib();
    assert_eq!(o.exit_code, Some(0));
    assert!(o.truncated);
    assert!(
        (5_000_000..5_001_000).contains(&o.output_bytes),
        "bytes {}",
        o.output_bytes
    );
    assert!(o.output.len() < 17 * 1024, "len {}", o.output.len());
    assert!(o.output.starts_with("aaaa"));
    assert!(o.output.contains("bytes omitted …]"));
    assert!(
        o.output.ends_with("done-marker\n"),
        "{:?}",
        &o.output[o.output.len() - 40..]
    );
    // The runner never held the whole output (5 MB); allow generous slack
    // for allocator noise and the other tests of this binary.
    assert!(
        after.saturating_sub(before) < 40 * 1024,
        "RSS grew by {} KiB",
        after.saturating_sub(before)
    );
    // The shell is still usable.
    let o = runner.run("echo ok", T).await.expect("after");
    assert_eq!(o.output, "ok\n");
}

#[tokio::test]
async fn still_running_command_leaves_a_marker_with_its_exit_code() {
    let (_emu, client, machine) = emulator_with_machine_id(&[]).await;
    let (mut runner, tid) = TerminalRunner::open(&client, &machine, None)
        .await
        .expect("open");
    let o = runner
        .run(
            "echo started; sleep 2; echo finished; exit_with() { return $1; }; exit_with 5",
            Duration::from_millis(700),
        )
        .await
        .expect("slow");
    assert!(o.still_running, "{o:?}");
    assert_eq!(o.exit_code, None);
    assert!(o.output.contains("started"), "{o:?}");
    let marker = o.completion_marker.clone().expect("marker");
    assert!(marker.starts_with(".agenthome/run/") && marker.ends_with(".done"));
    assert_eq!(
        read_completion(&client, &machine, &marker)
            .await
            .expect("read"),
        None
    );

    // The busy shell takes no new command.
    let err = runner.run("echo no", T).await.expect_err("busy");
    assert!(matches!(err, RunnerError::Busy { .. }), "{err:?}");

    // A new runner does not reuse the busy terminal.
    let (mut other, tid2) = TerminalRunner::open(&client, &machine, Some(tid.clone()))
        .await
        .expect("open other");
    assert_ne!(tid2, tid, "busy terminal not reused");
    let o2 = other.run("echo free", T).await.expect("other shell");
    assert_eq!(o2.output, "free\n");

    // The marker appears with the exit code; the log holds the output.
    let code = poll_until(Duration::from_secs(15), "marker never appeared", || async {
        read_completion(&client, &machine, &marker)
            .await
            .expect("read")
    })
    .await;
    assert_eq!(code, 5);
    let log = marker.replace(".done", ".log");
    let o3 = other.run(&format!("cat ~/{log}"), T).await.expect("log");
    assert!(
        o3.output.contains("started") && o3.output.contains("finished"),
        "{o3:?}"
    );

    // Once finished, the first runner is usable again.
    let o4 = runner.run("echo back", T).await.expect("not busy any more");
    assert_eq!(o4.output, "back\n");
}

#[tokio::test]
async fn executions_still_running_mirrors_the_terminal() {
    let (_emu, client, machine) = emulator_with_machine_id(&[]).await;
    let mut runner = ExecutionsRunner::new(&client, &machine);
    let o = runner
        .run("echo started; sleep 2; exit 4", Duration::from_millis(600))
        .await
        .expect("slow");
    assert!(o.still_running, "{o:?}");
    assert_eq!(o.exit_code, None);
    let marker = o.completion_marker.expect("marker");
    let code = poll_until(Duration::from_secs(15), "marker never appeared", || async {
        read_completion(&client, &machine, &marker)
            .await
            .expect("read")
    })
    .await;
    assert_eq!(code, 4);
}

#[tokio::test]
async fn dropped_websocket_mid_command_reconnects_and_reports_the_outcome() {
    let (emu, client, machine) = emulator_with_machine_id(&[]).await;
    // The next stream connection is dropped (no close frame) after 300 ms:
    // the shell setup is done by then, the command below is mid-way.
    emu.inject_fault(json!({
        "path": "/v1/machines/*/terminals/*/stream",
        "drop_websocket_after_ms": 300
    }))
    .await;
    let (mut runner, _) = TerminalRunner::open(&client, &machine, None)
        .await
        .expect("open");
    let o = runner
        .run(
            "echo before; sleep 1.2; echo after; exit_with() { return $1; }; exit_with 9",
            T,
        )
        .await
        .expect("outcome despite the drop");
    assert_eq!(o.exit_code, Some(9), "{o:?}");
    assert!(
        o.output.contains("before") && o.output.contains("after"),
        "{o:?}"
    );
    let connects = emu
        .requests()
        .await
        .iter()
        .filter(|r| r["path"].as_str().is_some_and(|p| p.ends_with("/stream")))
        .count();
    assert!(
        connects >= 2,
        "expected a reconnect, saw {connects} stream connects"
    );
}

#[tokio::test]
async fn closed_terminal_is_reported() {
    let (_emu, client, machine) = emulator_with_machine_id(&[]).await;
    let (mut runner, tid) = TerminalRunner::open(&client, &machine, None)
        .await
        .expect("open");
    client
        .delete_terminal(&machine, &tid, None)
        .await
        .expect("delete terminal");
    let err = runner.run("echo hi", T).await.expect_err("closed");
    assert!(matches!(err, RunnerError::TerminalClosed { .. }), "{err:?}");
    // The same error for every later command; reopen gives a working shell.
    let err = runner.run("echo hi", T).await.expect_err("still closed");
    assert!(
        matches!(err, RunnerError::TerminalClosed { started: false }),
        "{err:?}"
    );
    runner.reopen().await.expect("reopen");
    let o = runner.run("echo hi", T).await.expect("after reopen");
    assert_eq!(o.output, "hi\n");
    // A stored id of a closed terminal is not reused.
    let (_, tid3) = TerminalRunner::open(&client, &machine, Some(tid.clone()))
        .await
        .expect("open");
    assert_ne!(tid3, tid);
}

#[tokio::test]
async fn shell_exit_mid_command_is_terminal_closed_started() {
    let (_emu, client, machine) = emulator_with_machine_id(&[]).await;
    let (mut runner, _) = TerminalRunner::open(&client, &machine, None)
        .await
        .expect("open");
    let err = runner.run("exit 2", T).await.expect_err("shell exits");
    assert!(
        matches!(err, RunnerError::TerminalClosed { started: true }),
        "{err:?}"
    );
}

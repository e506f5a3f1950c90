//! The terminal backend: one persistent bash per terminal WebSocket.

use std::time::Duration;

use tokio::time::Instant;

use super::output::OutputCollector;
use super::script;
use super::sentinel::SentinelScanner;
use super::{
    millis, CommandOutcome, CommandRunner, NoObserver, Observer, RunnerError, RunnerOptions,
    Transport,
};
use crate::dedalus::{
    self, Client, CreateTerminalRequest, ExecutionRequest, IdempotencyKey, TerminalEvent,
    TerminalSession,
};

/// Columns of the terminals this runner opens.
pub const TERMINAL_WIDTH: u32 = 200;
/// Rows of the terminals this runner opens.
pub const TERMINAL_HEIGHT: u32 = 50;

/// Consecutive undecodable frames tolerated before giving up.
const MAX_BAD_FRAMES: u32 = 16;

/// A command that outlived its timeout and still occupies the shell.
#[derive(Debug)]
struct Pending {
    id: String,
    scanner: SentinelScanner,
}

/// How a read ended.
enum ReadEnd {
    Done(i32),
    TimedOut,
}

/// Runs commands in one persistent shell on a terminal WebSocket.
///
/// Each command is one line (see [`script::terminal_line`]); its output is
/// what the shell prints between the command's start and end markers.
/// On a recoverable WebSocket drop the runner reconnects (bounded) and keeps
/// reading — the server buffers output meanwhile. A closed terminal gives
/// [`RunnerError::TerminalClosed`]; a command still running after its
/// timeout makes the shell busy ([`RunnerError::Busy`] for the next command
/// until it is seen to finish; [`CommandRunner::reopen`] opens a new
/// terminal).
#[derive(Debug)]
pub struct TerminalRunner {
    client: Client,
    machine_id: String,
    terminal_id: String,
    session: Option<TerminalSession>,
    pending: Option<Pending>,
    closed: bool,
    parked: Vec<String>,
    options: RunnerOptions,
}

impl TerminalRunner {
    /// Opens a runner on `machine_id`: reuses terminal `reuse` (the stored
    /// terminal id) if it is `ready` and not busy with a command left
    /// running, else creates a new terminal (cwd = home, 200×50) and sets up
    /// its shell. Returns the runner and the terminal id to store.
    /// ([`TerminalRunner::open_pool`] also tidies the other terminals.)
    pub async fn open(
        client: &Client,
        machine_id: &str,
        reuse: Option<String>,
    ) -> Result<(Self, String), RunnerError> {
        Self::open_with(client, machine_id, reuse, RunnerOptions::default()).await
    }

    /// [`TerminalRunner::open`] with explicit options.
    pub async fn open_with(
        client: &Client,
        machine_id: &str,
        reuse: Option<String>,
        options: RunnerOptions,
    ) -> Result<(Self, String), RunnerError> {
        let runner = Self::open_pool(client, machine_id, reuse, Vec::new(), options).await?;
        let id = runner.terminal_id.clone();
        Ok((runner, id))
    }

    /// A runner with no terminal yet.
    pub(super) fn unopened(client: &Client, machine_id: &str, options: RunnerOptions) -> Self {
        TerminalRunner {
            client: client.clone(),
            machine_id: machine_id.to_owned(),
            terminal_id: String::new(),
            session: None,
            pending: None,
            closed: true,
            parked: Vec::new(),
            options,
        }
    }

    /// Whether a terminal is attached and usable.
    pub(super) fn is_open(&self) -> bool {
        !self.closed
    }

    pub(super) fn client(&self) -> &Client {
        &self.client
    }

    pub(super) fn set_parked(&mut self, parked: Vec<String>) {
        self.parked = parked;
    }

    /// The other terminals kept (busy with a command left running, or the
    /// one idle spare): store them with [`TerminalRunner::terminal_id`].
    pub fn parked(&self) -> &[String] {
        &self.parked
    }

    /// The terminal in use (store it for the next turn).
    pub fn terminal_id(&self) -> &str {
        &self.terminal_id
    }

    /// The machine this runner drives.
    pub fn machine_id(&self) -> &str {
        &self.machine_id
    }

    /// The command still running in this shell, if any.
    pub fn busy_with(&self) -> Option<&str> {
        self.pending.as_ref().map(|p| p.id.as_str())
    }

    /// Closes the WebSocket cleanly; the terminal and its shell (and any
    /// command left running in it) stay.
    pub async fn close(mut self) {
        if let Some(session) = self.session.take() {
            let _ = session.close().await;
        }
    }

    pub(super) fn setup_deadline(&self) -> Instant {
        Instant::now() + self.options.setup_timeout
    }

    /// Attaches to `tid` (ready and idle) and sets up its shell.
    pub(super) async fn attach(&mut self, tid: &str) -> Result<(), RunnerError> {
        self.terminal_id = tid.to_owned();
        self.session = None;
        self.pending = None;
        self.closed = false;
        let attached = match self.connect().await {
            Ok(()) => self.setup(false).await,
            Err(e) => Err(e),
        };
        if attached.is_err() {
            self.closed = true;
            self.session = None;
        }
        attached
    }

    /// Creates a terminal in the home directory and sets up its shell.
    pub(super) async fn open_new(&mut self) -> Result<(), RunnerError> {
        let client = self.client.with_deadline(self.setup_deadline());
        let mut request = CreateTerminalRequest::new(TERMINAL_WIDTH, TERMINAL_HEIGHT);
        request.cwd = Some("/root".to_owned());
        let key = IdempotencyKey::new();
        let terminal = client
            .create_terminal(&self.machine_id, &request, Some(&key))
            .await?;
        tracing::info!(machine_id = %self.machine_id, terminal_id = %terminal.terminal_id, "terminal opened");
        self.terminal_id = terminal.terminal_id;
        self.session = None;
        self.pending = None;
        self.closed = false;
        self.connect().await?;
        self.setup(true).await
    }

    /// Connects (or reconnects) the WebSocket.
    async fn connect(&mut self) -> Result<(), RunnerError> {
        match self.try_connect().await {
            Ok(()) => Ok(()),
            Err(Ok(closed)) => Err(closed),
            Err(Err(e)) => Err(e.into()),
        }
    }

    /// One connection attempt: `Err(Ok(_))` the terminal is gone for good
    /// (marked closed), `Err(Err(_))` another failure (worth a retry).
    async fn try_connect(&mut self) -> Result<(), Result<RunnerError, dedalus::Error>> {
        match self
            .client
            .connect(&self.machine_id, &self.terminal_id)
            .await
        {
            Ok(session) => {
                self.session = Some(session);
                Ok(())
            }
            Err(e) if is_closed_error(&e) => {
                self.closed = true;
                Err(Ok(RunnerError::TerminalClosed { started: false }))
            }
            Err(e) => Err(Err(e)),
        }
    }

    /// Reconnects after a recoverable drop, a bounded number of times.
    async fn reconnect(&mut self) -> Result<(), RunnerError> {
        self.session = None;
        let attempts = self.options.reconnect_attempts.max(1);
        let mut last = None;
        for attempt in 1..=attempts {
            tracing::debug!(terminal_id = %self.terminal_id, attempt, "reconnecting terminal");
            match self.try_connect().await {
                Ok(()) => return Ok(()),
                Err(Ok(closed)) => return Err(closed),
                Err(Err(e)) => last = Some(Box::new(e)),
            }
            let backoff = Duration::from_millis(100u64 << attempt.min(5));
            tokio::time::sleep(backoff).await;
        }
        Err(RunnerError::Disconnected {
            attempts,
            source: last,
        })
    }

    async fn send_line(&mut self, line: &str) -> Result<(), RunnerError> {
        if self.session.is_none() {
            self.reconnect().await?;
        }
        let sent = match self.session.as_mut() {
            Some(s) => s.send_input(line.as_bytes()).await,
            None => return Err(RunnerError::TerminalClosed { started: false }),
        };
        if let Err(e) = sent {
            // A failed send wrote no complete frame: reconnect and send again.
            tracing::debug!(error = %e, "terminal send failed; reconnecting");
            self.reconnect().await?;
            match self.session.as_mut() {
                Some(s) => s.send_input(line.as_bytes()).await?,
                None => return Err(RunnerError::TerminalClosed { started: false }),
            }
        }
        Ok(())
    }

    /// Sets up the shell (echo off, empty prompts, history, defaults) and
    /// waits until it has run.
    async fn setup(&mut self, restore: bool) -> Result<(), RunnerError> {
        let id = script::new_nonce();
        self.send_line(&script::terminal_setup(&id, restore))
            .await?;
        let mut scanner = SentinelScanner::new(&id);
        match self
            .read_until(&mut scanner, None, &NoObserver, self.setup_deadline())
            .await?
        {
            ReadEnd::Done(_) => Ok(()),
            ReadEnd::TimedOut => Err(RunnerError::Protocol(
                "the terminal's shell did not answer the setup line".into(),
            )),
        }
    }

    /// Reads terminal events into `scanner` (and `collector`) until the end
    /// marker or `deadline`.
    async fn read_until(
        &mut self,
        scanner: &mut SentinelScanner,
        mut collector: Option<&mut OutputCollector>,
        observer: &dyn Observer,
        deadline: Instant,
    ) -> Result<ReadEnd, RunnerError> {
        let mut bad_frames = 0u32;
        loop {
            if let Some(code) = scanner.exit_code() {
                return Ok(ReadEnd::Done(code));
            }
            let Some(session) = self.session.as_mut() else {
                self.reconnect().await?;
                continue;
            };
            let event = match tokio::time::timeout_at(deadline, session.next_event()).await {
                Err(_) => return Ok(ReadEnd::TimedOut),
                Ok(Ok(event)) => event,
                Ok(Err(e)) => {
                    bad_frames += 1;
                    tracing::warn!(error = %e, "undecodable terminal frame");
                    if bad_frames >= MAX_BAD_FRAMES {
                        return Err(e.into());
                    }
                    continue;
                }
            };
            bad_frames = 0;
            self.on_event(event, scanner, collector.as_deref_mut(), observer)
                .await?;
        }
    }

    /// One event of [`TerminalRunner::read_until`]: output is scanned (and
    /// collected and observed), a recoverable drop reconnects, a closed
    /// terminal or stream ends the read as [`RunnerError::TerminalClosed`].
    async fn on_event(
        &mut self,
        event: TerminalEvent,
        scanner: &mut SentinelScanner,
        collector: Option<&mut OutputCollector>,
        observer: &dyn Observer,
    ) -> Result<(), RunnerError> {
        let closed = RunnerError::TerminalClosed {
            started: scanner.started(),
        };
        match event {
            TerminalEvent::Output(bytes) => {
                let scan = scanner.feed(&bytes);
                if let Some(c) = collector {
                    c.push(&scan.output);
                }
                if !scan.output.is_empty() {
                    observer.output(&scan.output);
                }
                Ok(())
            }
            TerminalEvent::Error { code, message } => {
                tracing::warn!(terminal_id = %self.terminal_id, %code, %message, "terminal error frame");
                Ok(())
            }
            TerminalEvent::Disconnected {
                recoverable: true,
                close_code,
            } => {
                tracing::info!(terminal_id = %self.terminal_id, ?close_code, "terminal stream dropped; reconnecting");
                match self.reconnect().await {
                    Err(RunnerError::TerminalClosed { .. }) => Err(closed),
                    other => other,
                }
            }
            TerminalEvent::Closed | TerminalEvent::Disconnected { .. } => {
                if let TerminalEvent::Disconnected { close_code, .. } = event {
                    tracing::info!(terminal_id = %self.terminal_id, ?close_code, "terminal stream closed");
                }
                self.closed = true;
                self.session = None;
                Err(closed)
            }
        }
    }

    /// Looks (briefly) whether the command left running has finished.
    async fn poll_pending(&mut self) -> Result<(), RunnerError> {
        let Some(mut pending) = self.pending.take() else {
            return Ok(());
        };
        let deadline = Instant::now() + Duration::from_millis(50);
        match self
            .read_until(&mut pending.scanner, None, &NoObserver, deadline)
            .await
        {
            Ok(ReadEnd::Done(_)) => Ok(()),
            Ok(ReadEnd::TimedOut) => {
                let id = pending.id.clone();
                self.pending = Some(pending);
                Err(RunnerError::Busy { command_id: id })
            }
            Err(e) => {
                self.pending = Some(pending);
                Err(e)
            }
        }
    }
}

impl TerminalRunner {
    /// One command; `observer` sees its output as it arrives.
    async fn run_with(
        &mut self,
        command: &str,
        timeout: Duration,
        observer: &dyn Observer,
    ) -> Result<CommandOutcome, RunnerError> {
        if self.closed {
            return Err(RunnerError::TerminalClosed { started: false });
        }
        self.poll_pending().await?;
        let id = script::new_command_id();
        let nonce = script::new_nonce();
        let started_at = Instant::now();
        let deadline = started_at + timeout;
        let line = self.command_line(&id, &nonce, command).await?;
        self.send_line(&line).await?;
        let mut scanner = SentinelScanner::new(&nonce);
        let mut collector = OutputCollector::new(self.options.output_limit);
        let end = self
            .read_until(&mut scanner, Some(&mut collector), observer, deadline)
            .await?;
        if matches!(end, ReadEnd::TimedOut) {
            collector.push(scanner.held_output());
            if !scanner.held_output().is_empty() {
                observer.output(scanner.held_output());
            }
        }
        let collected = collector.snapshot();
        let mut outcome = CommandOutcome {
            command: command.to_owned(),
            exit_code: None,
            output: collected.text,
            output_bytes: collected.total_bytes,
            truncated: collected.truncated,
            duration_ms: millis(started_at.elapsed()),
            still_running: false,
            completion_marker: None,
        };
        match end {
            ReadEnd::Done(code) => outcome.exit_code = Some(code),
            ReadEnd::TimedOut => {
                tracing::info!(command_id = %id, "command outlived its timeout; left running");
                outcome.still_running = true;
                outcome.completion_marker = Some(script::completion_marker(&id));
                self.pending = Some(Pending { id, scanner });
            }
        }
        Ok(outcome)
    }
}

impl TerminalRunner {
    /// The line to type for `command`. A long one is first written to a
    /// file on the machine (an execution, no terminal involved), so the
    /// typed line stays short: bash never sees a partial line, whatever it
    /// was doing when the line arrived.
    async fn command_line(
        &self,
        id: &str,
        nonce: &str,
        command: &str,
    ) -> Result<String, RunnerError> {
        let line = script::terminal_line(id, nonce, &self.terminal_id, command);
        if line.len() <= script::MAX_TYPED_LINE {
            return Ok(line);
        }
        let request = ExecutionRequest::new([
            "bash".to_owned(),
            "-c".to_owned(),
            script::write_command_script(id),
        ])
        .stdin(command)
        .timeout_ms(millis(self.options.setup_timeout).max(1));
        let run = self
            .client
            .run_and_wait(&self.machine_id, &request, self.setup_deadline())
            .await?;
        if !run.success() {
            return Err(RunnerError::Protocol(format!(
                "could not deliver a long command to the machine (exit code {:?})",
                run.exit_code()
            )));
        }
        Ok(script::terminal_line_from_file(
            id,
            nonce,
            &self.terminal_id,
        ))
    }
}

impl CommandRunner for TerminalRunner {
    async fn run(
        &mut self,
        command: &str,
        timeout: Duration,
    ) -> Result<CommandOutcome, RunnerError> {
        self.run_with(command, timeout, &NoObserver).await
    }

    async fn run_observed(
        &mut self,
        command: &str,
        timeout: Duration,
        observer: &dyn Observer,
    ) -> Result<CommandOutcome, RunnerError> {
        self.run_with(command, timeout, observer).await
    }

    fn transport(&self) -> Transport {
        Transport::Terminal
    }

    async fn reopen(&mut self) -> Result<(), RunnerError> {
        if let Some(session) = self.session.take() {
            let _ = session.close().await;
        }
        // The terminal left behind: a closed one is deleted, a busy one
        // (its command keeps running) parked.
        let old = std::mem::take(&mut self.terminal_id);
        if !old.is_empty() {
            if self.closed {
                self.delete_terminals(std::slice::from_ref(&old)).await;
            } else if !self.parked.contains(&old) {
                self.parked.push(old);
            }
        }
        self.open_new().await
    }
}

impl TerminalRunner {
    /// Attaches to the stored terminal `terminal_id` with one WebSocket
    /// connect and nothing else: no status read, no busy check, no set-up
    /// line. Only for a terminal the previous turn left idle (its shell was
    /// set up then and ran every command to its end); a refused or dead
    /// stream is an error, and the caller opens the pool instead.
    pub async fn connect_stored(
        client: &Client,
        machine_id: &str,
        terminal_id: &str,
        parked: Vec<String>,
        options: RunnerOptions,
    ) -> Result<Self, RunnerError> {
        let mut runner = TerminalRunner::unopened(client, machine_id, options);
        runner.terminal_id = terminal_id.to_owned();
        runner.parked = parked;
        runner.closed = false;
        if let Err(e) = runner.connect().await {
            runner.closed = true;
            return Err(e);
        }
        Ok(runner)
    }

    /// Whether the shell can take a line now: open, and no command left
    /// running in it.
    pub fn is_idle(&self) -> bool {
        !self.closed && self.pending.is_none()
    }

    /// Runs agenthome's own `script` in this shell ([`script::internal_line`]:
    /// a fresh bash the agent's shell state cannot reach) and returns its
    /// output (at most `limit` bytes kept), waiting at most `timeout`. A
    /// shell that does not answer in time is treated as busy (no further
    /// line is typed into it; [`CommandRunner::reopen`] replaces it); a
    /// script that fails (or a bash that cannot start) is an error.
    pub async fn run_internal(
        &mut self,
        script: &str,
        limit: usize,
        timeout: Duration,
    ) -> Result<String, RunnerError> {
        let nonce = script::new_nonce();
        let line = script::internal_line(&nonce, script);
        self.run_own_line(&line, &nonce, limit, timeout).await
    }

    /// Runs agenthome's own `body` of shell builtins in this shell itself
    /// ([`script::builtin_line`]: no process is started; `vars` are the
    /// variables it sets), waiting at most `timeout`; a non-zero status is
    /// an error. As [`TerminalRunner::run_internal`] otherwise.
    pub async fn run_builtins(
        &mut self,
        body: &str,
        vars: &[&str],
        timeout: Duration,
    ) -> Result<(), RunnerError> {
        let nonce = script::new_nonce();
        let line = script::builtin_line(&nonce, body, vars);
        self.run_own_line(&line, &nonce, 1024, timeout)
            .await
            .map(|_| ())
    }

    /// Types `line` (agenthome's own, ending with the markers of `nonce`)
    /// and reads its output up to the end marker: the output if its status
    /// is 0, else an error.
    async fn run_own_line(
        &mut self,
        line: &str,
        nonce: &str,
        limit: usize,
        timeout: Duration,
    ) -> Result<String, RunnerError> {
        if self.closed {
            return Err(RunnerError::TerminalClosed { started: false });
        }
        self.poll_pending().await?;
        self.send_line(line).await?;
        let mut scanner = SentinelScanner::new(nonce);
        let mut collector = OutputCollector::new(limit);
        let deadline = Instant::now() + timeout;
        match self
            .read_until(&mut scanner, Some(&mut collector), &NoObserver, deadline)
            .await?
        {
            ReadEnd::Done(0) => Ok(collector.snapshot().text),
            ReadEnd::Done(code) => Err(RunnerError::Protocol(format!(
                "agenthome's line in the shell ended with status {code}"
            ))),
            ReadEnd::TimedOut => {
                self.pending = Some(Pending {
                    id: script::new_command_id(),
                    scanner,
                });
                Err(RunnerError::Protocol(
                    "the shell did not answer agenthome's line in time".into(),
                ))
            }
        }
    }
}

/// A connect error meaning the terminal is gone for good: 409 not retryable
/// (closed), or 404.
fn is_closed_error(e: &dedalus::Error) -> bool {
    e.is_not_found() || (e.status().map(|s| s.as_u16()) == Some(409) && !e.is_retryable())
}

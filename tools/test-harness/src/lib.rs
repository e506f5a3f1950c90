//! The one process harness of the workspace's tests (a dev-dependency of
//! `dcs-emulator`, a dependency of the `agenthome-tests` test crate): start
//! a server process on a free loopback port, wait until it is ready, and
//! kill exactly that process — by the PID recorded when it started, never by
//! name — when its handle drops, or, as a backstop, when the test binary
//! dies (`PR_SET_PDEATHSIG`).
//!
//! [`emulator`] adds what starting `dcs-emulator` takes (its fast test
//! timings, its address line); [`host_pids_with_arg`] finds a machine's
//! process on the host.

pub mod emulator;

use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

/// A free TCP port on 127.0.0.1 (bound, read, released).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral loopback port");
    listener.local_addr().expect("local addr").port()
}

/// A child process started by a test; killed (SIGKILL) and reaped when the
/// handle drops.
#[derive(Debug)]
pub struct Process {
    /// `None` once killed.
    child: Option<Child>,
    /// Recorded at start: the only process this handle ever signals.
    pid: u32,
    /// What it is, for messages.
    name: String,
}

impl Process {
    /// Starts `cmd` as `name`, tied to this thread: the kernel kills it if
    /// the thread (the test binary) dies before the handle drops.
    pub fn start(name: &str, cmd: &mut Command) -> std::io::Result<Process> {
        let child = spawn_tied_to_parent(cmd)?;
        Ok(Process {
            pid: child.id(),
            child: Some(child),
            name: name.to_owned(),
        })
    }

    /// The PID recorded when the process started.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Kills the process now (SIGKILL: a crash, no clean shutdown) and
    /// reaps it; a no-op once done.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// How it ended, if it has (killed counts as ended, with no status).
    fn exited(&mut self) -> Option<Option<ExitStatus>> {
        match self.child.as_mut() {
            None => Some(None),
            Some(child) => child.try_wait().ok().flatten().map(Some),
        }
    }

    /// Waits (`timeout` at most) until something accepts connections on
    /// loopback `port`; panics if the process ends first or time runs out.
    pub fn wait_for_port(&mut self, port: u16, timeout: Duration) {
        let what = format!("listen on port {port}");
        let ready = || TcpStream::connect(("127.0.0.1", port)).ok().map(drop);
        if let Err(why) = self.wait_until(timeout, &what, ready) {
            panic!("{why}");
        }
    }

    /// Waits (`timeout` at most) until the file `path` (the process's
    /// output) has a line containing `marker`; returns that line. Panics,
    /// with the contents of `log`, if the process ends first or time runs
    /// out.
    pub fn wait_for_line(
        &mut self,
        path: &Path,
        marker: &str,
        timeout: Duration,
        log: &Path,
    ) -> String {
        let what = format!("print {marker:?}");
        self.wait_until(timeout, &what, || line_containing(path, marker))
            .unwrap_or_else(|why| {
                let log = std::fs::read_to_string(log).unwrap_or_default();
                panic!("{why}; its log:\n{log}")
            })
    }

    /// Polls `ready` every 20 ms until it yields; says why not if the
    /// process ends first or `timeout` passes.
    fn wait_until<T>(
        &mut self,
        timeout: Duration,
        what: &str,
        mut ready: impl FnMut() -> Option<T>,
    ) -> Result<T, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = ready() {
                return Ok(v);
            }
            if let Some(status) = self.exited() {
                return Err(format!(
                    "{} ended ({status:?}) before it could {what}",
                    self.name
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!("{} did not {what} within {timeout:?}", self.name));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The first line of file `path` that contains `marker`.
fn line_containing(path: &Path, marker: &str) -> Option<String> {
    let f = std::fs::File::open(path).ok()?;
    BufReader::new(f)
        .lines()
        .map_while(Result::ok)
        .find(|line| line.contains(marker))
}

/// Spawns `cmd` so that it dies with the spawning thread even if the test
/// binary is killed before it can run destructors.
fn spawn_tied_to_parent(cmd: &mut Command) -> std::io::Result<Child> {
    use std::os::unix::process::CommandExt;
    #[allow(unsafe_code)]
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no
    // memory of the parent; it only asks the kernel to SIGKILL the child
    // when the spawning thread exits.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// Host pids of live (not zombie) processes that have `arg` among their
/// arguments: finds a machine's process on the host whatever its pid inside
/// the machine's PID namespace.
pub fn host_pids_with_arg(arg: &str) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let state = stat.rsplit_once(')')?.1.trim_start().chars().next()?;
            let has = cmdline.split(|b| *b == 0).any(|a| a == arg.as_bytes());
            (has && !matches!(state, 'Z' | 'X')).then_some(pid)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_process_is_killed_and_only_it() {
        let marker = format!("3600.{}", std::process::id());
        let mut a = Command::new("sleep");
        a.arg(&marker);
        let mut b = Command::new("sleep");
        b.arg(&marker);
        let first = Process::start("sleep a", &mut a).expect("start a");
        let second = Process::start("sleep b", &mut b).expect("start b");
        let (pa, pb) = (first.pid() as i32, second.pid() as i32);
        let mut both = host_pids_with_arg(&marker);
        both.sort_unstable();
        assert_eq!(both, {
            let mut v = vec![pa, pb];
            v.sort_unstable();
            v
        });
        drop(first);
        assert_eq!(host_pids_with_arg(&marker), vec![pb]);
        drop(second);
        assert!(host_pids_with_arg(&marker).is_empty());
    }

    #[test]
    fn waiting_for_a_process_that_ended_fails_at_once() {
        let mut p = Process::start("true", &mut Command::new("true")).expect("start");
        let started = Instant::now();
        let waited = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            p.wait_for_port(free_port(), Duration::from_secs(30))
        }));
        assert!(waited.is_err(), "no port, so the wait fails");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "not after the timeout"
        );
    }

    #[test]
    fn a_listening_port_is_ready() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let mut p = Process::start("sleep", Command::new("sleep").arg("30")).expect("start");
        p.wait_for_port(port, Duration::from_secs(5));
    }
}

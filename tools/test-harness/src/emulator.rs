//! Starting `dcs-emulator` for a test: its fast timings, its command line,
//! and its address, read from the line it prints once it listens.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::Process;

/// Emulator flags that make tests fast: short transitions, no hold window.
pub const FAST_FLAGS: &[&str] = &[
    "--boot-delay",
    "50ms",
    "--wake-delay",
    "50ms",
    "--sleep-delay",
    "20ms",
    "--destroy-delay",
    "20ms",
    "--hold-window",
    "0s",
    "--hold-jitter",
    "0s",
];

/// How long a starting emulator may take to print its address.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// [`FAST_FLAGS`] followed by `extra`; a fast default that `extra` sets
/// again is left out (clap refuses a repeated flag, and the later one is
/// meant).
pub fn fast_flags_then(extra: &[&str]) -> Vec<String> {
    FAST_FLAGS
        .chunks(2)
        .filter(|pair| !extra.contains(&pair[0]))
        .flatten()
        .chain(extra.iter())
        .map(|s| (*s).to_owned())
        .collect()
}

/// One emulator process to start.
pub struct EmulatorCommand<'a> {
    /// The `dcs-emulator` binary.
    pub bin: &'a Path,
    /// `--listen` (`127.0.0.1:0` for a free port).
    pub listen: &'a str,
    /// `--api-key`.
    pub api_key: &'a str,
    /// `--data-dir`.
    pub data_dir: &'a Path,
    /// Every other flag (see [`fast_flags_then`]).
    pub flags: &'a [String],
    /// Environment variables added to the test's.
    pub env: &'a [(&'a str, &'a str)],
    /// Where its output goes: [`stdout_path`] (new at each start) and
    /// [`log_path`] (appended, so a restart keeps the earlier log).
    pub logs: &'a Path,
}

/// The emulator's stdout (its address line) under `logs`.
pub fn stdout_path(logs: &Path) -> PathBuf {
    logs.join("emulator.out")
}

/// The emulator's log (stderr) under `logs`.
pub fn log_path(logs: &Path) -> PathBuf {
    logs.join("emulator.log")
}

impl EmulatorCommand<'_> {
    /// Starts the emulator and waits until it listens; returns it and its
    /// base URL (`http://127.0.0.1:PORT`).
    pub fn start(&self) -> (Process, String) {
        let (out_path, log_path) = (stdout_path(self.logs), log_path(self.logs));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("emulator log file");
        let out = std::fs::File::create(&out_path).expect("emulator stdout file");
        let mut cmd = Command::new(self.bin);
        cmd.arg("--listen")
            .arg(self.listen)
            .arg("--data-dir")
            .arg(self.data_dir)
            .arg("--api-key")
            .arg(self.api_key)
            .args(self.flags)
            .envs(self.env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(log));
        let mut process = Process::start("dcs-emulator", &mut cmd)
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.bin.display()));
        let line = process.wait_for_line(&out_path, "http://", START_TIMEOUT, &log_path);
        (process, base_url(&line))
    }
}

/// The address in the emulator's `… listening on http://HOST:PORT` line.
fn base_url(line: &str) -> String {
    let at = line.find("http://").unwrap_or(0);
    line[at..].trim().trim_end_matches('/').to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_flags_replace_the_fast_defaults_they_repeat() {
        let flags = fast_flags_then(&["--boot-delay", "2s", "--isolation", "none"]);
        let boot: Vec<_> = flags
            .windows(2)
            .filter(|w| w[0] == "--boot-delay")
            .collect();
        assert_eq!(boot, [["--boot-delay", "2s"]]);
        assert_eq!(flags.len(), FAST_FLAGS.len() + 2);
        assert!(flags.ends_with(&["--isolation".to_owned(), "none".to_owned()]));
    }

    #[test]
    fn the_address_is_read_from_the_listening_line() {
        assert_eq!(
            base_url("dcs-emulator listening on http://127.0.0.1:4010/\n"),
            "http://127.0.0.1:4010"
        );
    }
}

//! Sending signals to the processes the emulator started.
//!
//! Every process of a machine carries `DCS_EMULATOR_MACHINE_ID=<id>` in its
//! environment. Ending a machine's processes scans `/proc` for that marker and
//! kills the process groups (and, for PTY shells, the sessions) that hold a
//! marked process. Checking the marker first means a recycled process-group
//! id never hits an unrelated process.
//!
//! The only `unsafe` in the crate lives here: `libc::kill`/`killpg` are plain
//! syscalls on integer ids with no memory-safety preconditions; libc just
//! declares every foreign function `unsafe`.
#![allow(unsafe_code)]

use std::collections::HashSet;
use std::time::Duration;

/// Environment variable that tags a process with its machine.
pub const MACHINE_ENV: &str = "DCS_EMULATOR_MACHINE_ID";

pub const SIGKILL: i32 = libc::SIGKILL;
pub const SIGHUP: i32 = libc::SIGHUP;

/// Sends `sig` to process group `pgid`. Refuses ids that would address the
/// emulator's own group or every process.
pub fn signal_group(pgid: u32, sig: i32) -> bool {
    let Ok(pgid) = i32::try_from(pgid) else {
        return false;
    };
    if pgid <= 1 || pgid == own_pgrp() {
        return false;
    }
    // SAFETY: killpg takes two integers and has no memory preconditions.
    unsafe { libc::killpg(pgid, sig) == 0 }
}

fn signal_pid(pid: i32, sig: i32) {
    if pid <= 1 || pid == own_pid() {
        return;
    }
    // SAFETY: kill takes two integers and has no memory preconditions.
    unsafe {
        libc::kill(pid, sig);
    }
}

fn own_pid() -> i32 {
    i32::try_from(std::process::id()).unwrap_or(0)
}

fn own_pgrp() -> i32 {
    // SAFETY: getpgrp has no arguments and cannot fail.
    unsafe { libc::getpgrp() }
}

fn own_sid() -> i32 {
    // SAFETY: getsid(0) only reads the calling process's session id.
    unsafe { libc::getsid(0) }
}

/// One process as seen in `/proc`.
#[derive(Debug, Clone)]
pub struct ProcInfo {
    pub pid: i32,
    pub pgrp: i32,
    pub session: i32,
    /// Value of [`MACHINE_ENV`], when present.
    pub machine: Option<String>,
}

/// Parses `pgrp` and `session` out of `/proc/<pid>/stat`.
pub fn parse_stat(stat: &str) -> Option<(i32, i32)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let _state = fields.next()?;
    let _ppid = fields.next()?;
    let pgrp = fields.next()?.parse().ok()?;
    let session = fields.next()?.parse().ok()?;
    Some((pgrp, session))
}

fn marker_in(environ: &[u8]) -> Option<String> {
    let prefix = format!("{MACHINE_ENV}=");
    environ
        .split(|b| *b == 0)
        .find_map(|kv| kv.strip_prefix(prefix.as_bytes()))
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// Pids whose parent is `parent` (blocking: reads `/proc`).
pub fn children_of(parent: u32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse::<i32>().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            (parse_ppid(&stat)? == i64::from(parent)).then_some(pid)
        })
        .collect()
}

fn parse_ppid(stat: &str) -> Option<i64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Lists processes (blocking: reads `/proc`).
pub fn scan() -> Vec<ProcInfo> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some((pgrp, session)) = parse_stat(&stat) else {
            continue;
        };
        let machine = std::fs::read(entry.path().join("environ"))
            .ok()
            .and_then(|env| marker_in(&env));
        out.push(ProcInfo {
            pid,
            pgrp,
            session,
            machine,
        });
    }
    out
}

/// Kills (SIGKILL) every process whose machine marker satisfies `belongs`,
/// with its process group, and the sessions those processes lead. When
/// `session` is given, only processes of that session are considered.
/// Blocking; run it on a blocking thread.
pub fn kill_marked(belongs: impl Fn(&str) -> bool, session: Option<i32>) {
    let me = own_pid();
    let my_pgrp = own_pgrp();
    let my_sid = own_sid();
    for round in 0..4 {
        let procs = scan();
        let marked: Vec<&ProcInfo> = procs
            .iter()
            .filter(|p| p.pid != me)
            .filter(|p| p.machine.as_deref().is_some_and(&belongs))
            .filter(|p| session.is_none_or(|s| p.session == s))
            .collect();
        if marked.is_empty() {
            return;
        }
        let groups: HashSet<i32> = marked
            .iter()
            .map(|p| p.pgrp)
            .filter(|g| *g > 1 && *g != my_pgrp)
            .collect();
        let sessions: HashSet<i32> = marked
            .iter()
            .filter(|p| p.pid == p.session)
            .map(|p| p.session)
            .filter(|s| *s > 1 && *s != my_sid)
            .collect();
        for p in &procs {
            if p.pid == me {
                continue;
            }
            let hit = groups.contains(&p.pgrp)
                || sessions.contains(&p.session)
                || marked.iter().any(|m| m.pid == p.pid);
            if hit {
                signal_pid(p.pid, SIGKILL);
            }
        }
        for g in &groups {
            if let Ok(g) = u32::try_from(*g) {
                signal_group(g, SIGKILL);
            }
        }
        std::thread::sleep(Duration::from_millis(10 * (round + 1)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_parsing_handles_odd_names() {
        let stat = "1234 (my (weird) name) S 1 1234 1234 0 -1 4194560";
        assert_eq!(parse_stat(stat), Some((1234, 1234)));
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_ppid(stat), Some(1));
    }

    #[test]
    fn finds_own_children() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .expect("spawn sleep");
        let kids = children_of(std::process::id());
        let _ = child.kill();
        let _ = child.wait();
        let pid = i32::try_from(child.id()).expect("pid");
        assert!(kids.contains(&pid), "{kids:?} has {pid}");
    }

    #[test]
    fn marker_extraction() {
        let env = b"PATH=/bin\0DCS_EMULATOR_MACHINE_ID=dm-1\0HOME=/x\0";
        assert_eq!(marker_in(env).as_deref(), Some("dm-1"));
        assert_eq!(marker_in(b"PATH=/bin\0"), None);
    }

    #[test]
    fn refuses_own_group() {
        assert!(!signal_group(0, 0));
        assert!(!signal_group(1, 0));
        assert!(!signal_group(u32::try_from(own_pgrp()).unwrap_or(0), 0));
    }
}

//! Machine isolation: one sandbox (user, mount, PID, IPC and UTS
//! namespaces) per awake machine, built with bubblewrap.
//!
//! A sandbox is a `bwrap` process whose command only waits for its stdin to
//! close. Its mount namespace shows the machine's home at `/root`, a private
//! `/tmp`, `/run` and `/home`, a fresh `/proc` and `/dev`, and the host's
//! other top-level directories read-only with a copy-on-write overlay (kept
//! in memory) on top, so writes outside `/root` last until the sandbox ends.
//! The emulator's data directory (every machine's home and `state.json`) is
//! covered by an empty, inaccessible mount.
//!
//! Every execution and terminal of the machine enters that one sandbox with
//! `nsenter` and drops every capability with `setpriv`, so they share files
//! and see only each other's processes. Sleep, destroy and shutdown kill the
//! sandbox's init, and the kernel then kills every process of its PID
//! namespace, daemons included. Waking starts a fresh sandbox over the same
//! home. If the emulator dies, the sandbox's stdin closes and its holder
//! kills every process in it.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

use crate::exec::resolve_cwd;
use crate::options::Isolation;
use crate::proc;
use crate::server::AppRef;
use crate::state::Phase;
use crate::terminal::host_path;

/// The machine's home inside its sandbox.
pub const MACHINE_HOME: &str = "/root";
/// Longest a sandbox may take to come up.
const START_LIMIT: Duration = Duration::from_secs(20);
/// Where the overlays' upper layers live while they are being mounted.
const COW_DIR: &str = "/.dcs-cow";
/// Top-level host directories that are never shown (replaced by empty
/// private file systems) or that get a dedicated mount.
const PRIVATE_DIRS: [&str; 3] = ["tmp", "run", "home"];

/// The sandbox's command: says it is up, then waits until its stdin (held
/// by the emulator) closes and kills every process of the sandbox, so the
/// namespace's init, which waits for all of them, ends too. `kill -1` only
/// runs as PID 2 (bwrap's init is 1), i.e. inside a fresh PID namespace.
const HOLDER: &str = "echo ready; read -r _; [ $$ -eq 2 ] && kill -9 -1";

/// Mounts the overlays (`$1` = scratch dir, then directories up to `--`;
/// their names have no blanks or globs) and hides the paths after `--`. Runs once per sandbox with the
/// capabilities of the sandbox's user namespace.
const SETUP_SCRIPT: &str = r#"set -uf
cow=$1; shift
dirs= layers=
while [ "$1" != -- ]; do
  dirs="$dirs $1" layers="$layers $cow/$1/upper $cow/$1/work"; shift
done
shift
failed=
[ -z "$layers" ] || mkdir -p $layers || { echo "cannot create the overlay layers" >&2; exit 1; }
for d in $dirs; do
  opts="lowerdir=/$d,upperdir=$cow/$d/upper,workdir=$cow/$d/work"
  mount -t overlay overlay -o "userxattr,$opts" "/$d" 2>/dev/null ||
    mount -t overlay overlay -o "$opts" "/$d" 2>/dev/null ||
    failed="$failed /$d"
done
for p in "$@"; do
  mount -t tmpfs -o mode=000,size=4k tmpfs "$p" || { echo "cannot hide $p" >&2; exit 1; }
done
umount -l "$cow" && rmdir "$cow" || { echo "cannot detach $cow" >&2; exit 1; }
if [ -n "$failed" ]; then echo "read-only, no overlay:$failed" >&2; fi
exit 0
"#;

/// Why a sandbox cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("{0} is not installed (not found on PATH)")]
    MissingTool(&'static str),
    #[error("cannot run {tool}: {source}")]
    Spawn {
        tool: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the sandbox did not start: {0}")]
    Setup(String),
    #[error("the sandbox did not start within {0:?}")]
    Timeout(Duration),
    #[error("the machine is not running")]
    NotRunning,
}

/// Host programs the sandbox needs.
#[derive(Debug, Clone)]
pub struct Tools {
    bwrap: PathBuf,
    nsenter: PathBuf,
    setpriv: PathBuf,
}

impl Tools {
    /// Finds `bwrap`, `nsenter` and `setpriv` on `PATH`.
    pub fn find() -> Result<Self, SandboxError> {
        Ok(Self {
            bwrap: which("bwrap").ok_or(SandboxError::MissingTool("bwrap (bubblewrap)"))?,
            nsenter: which("nsenter").ok_or(SandboxError::MissingTool("nsenter (util-linux)"))?,
            setpriv: which("setpriv").ok_or(SandboxError::MissingTool("setpriv (util-linux)"))?,
        })
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&host_path())
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// One live sandbox.
struct Sandbox {
    /// The machine operation (awake period) it belongs to.
    op: u64,
    /// Host pid of the sandbox's init (PID 1 of its namespace).
    init: u32,
    child: tokio::process::Child,
}

impl Sandbox {
    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Kills the sandbox's process group (bwrap and the namespace's init);
    /// the kernel then kills everything else in the namespace.
    async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            proc::signal_group(pid, proc::SIGKILL);
        }
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

/// The sandboxes of awake machines (empty with `--isolation none`).
pub struct Sandboxes {
    tools: Option<Tools>,
    live: tokio::sync::Mutex<HashMap<String, Sandbox>>,
}

impl Sandboxes {
    /// No isolation: machine processes run directly on the host.
    pub fn none() -> Self {
        Self {
            tools: None,
            live: tokio::sync::Mutex::default(),
        }
    }

    pub fn isolated(tools: Tools) -> Self {
        Self {
            tools: Some(tools),
            live: tokio::sync::Mutex::default(),
        }
    }

    /// Ends the machine's sandbox, if it has one.
    pub async fn stop(&self, machine_id: &str) {
        let sandbox = self.live.lock().await.remove(machine_id);
        if let Some(s) = sandbox {
            s.stop().await;
        }
    }

    /// Ends every sandbox.
    pub async fn stop_all(&self) {
        let all: Vec<Sandbox> = self.live.lock().await.drain().map(|(_, s)| s).collect();
        for s in all {
            s.stop().await;
        }
    }
}

/// Checks at start that sandboxes work here: brings one up over a scratch
/// home under `data_dir`, runs `true` in it, and ends it.
pub async fn probe(data_dir: &Path) -> Result<Tools, SandboxError> {
    let tools = Tools::find()?;
    let home = data_dir.join("isolation-probe");
    tokio::fs::create_dir_all(&home)
        .await
        .map_err(|e| SandboxError::Setup(format!("cannot create {}: {e}", home.display())))?;
    let sandbox = start(&tools, "isolation-probe", &home, data_dir, 0).await?;
    let argv = ["true".to_owned()];
    let status = tokio::process::Command::new(&tools.nsenter)
        .args(enter_args(&tools, sandbox.init, MACHINE_HOME, &argv))
        .env_clear()
        .env("PATH", host_path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .await;
    sandbox.stop().await;
    let _ = tokio::fs::remove_dir_all(&home).await;
    let out = status.map_err(|source| SandboxError::Spawn {
        tool: "nsenter",
        source,
    })?;
    if out.status.success() {
        Ok(tools)
    } else {
        Err(SandboxError::Setup(format!(
            "cannot enter it: {}",
            one_line(&out.stderr)
        )))
    }
}

/// How to start one machine process: the program the emulator spawns, its
/// arguments, its working directory on the host, and the machine's `HOME`.
pub struct Launch {
    pub program: OsString,
    pub args: Vec<OsString>,
    pub dir: PathBuf,
    pub home: PathBuf,
}

/// Plans a machine process running `argv` in `cwd` (a machine path: `/root`,
/// `~/x`, relative to the home, or absolute). With isolation this starts the
/// machine's sandbox if it has none yet.
pub async fn launch(
    app: &AppRef,
    machine_id: &str,
    argv: &[String],
    cwd: Option<&str>,
) -> Result<Launch, SandboxError> {
    let home = app.home_dir(machine_id);
    if let Err(e) = tokio::fs::create_dir_all(&home).await {
        tracing::warn!(machine = %machine_id, error = %e, "cannot create home");
    }
    let Some(tools) = &app.sandboxes.tools else {
        let mut argv = argv.iter().map(OsString::from);
        return Ok(Launch {
            program: argv.next().unwrap_or_default(),
            args: argv.collect(),
            dir: resolve_cwd(&home, cwd),
            home,
        });
    };
    let init = ensure(app, tools, machine_id, &home).await?;
    Ok(Launch {
        program: tools.nsenter.clone().into_os_string(),
        args: enter_args(tools, init, &machine_cwd(cwd), argv),
        dir: PathBuf::from("/"),
        home: PathBuf::from(MACHINE_HOME),
    })
}

/// The machine's running sandbox (started if needed); its init's host pid.
async fn ensure(
    app: &AppRef,
    tools: &Tools,
    machine_id: &str,
    home: &Path,
) -> Result<u32, SandboxError> {
    let mut live = app.sandboxes.live.lock().await;
    let op = match app.state().live_machine(machine_id) {
        Some(m) if m.phase == Phase::Running => m.op,
        _ => return Err(SandboxError::NotRunning),
    };
    if let Some(s) = live.get_mut(machine_id) {
        if s.op == op && s.alive() {
            return Ok(s.init);
        }
    }
    if let Some(old) = live.remove(machine_id) {
        old.stop().await;
    }
    let began = std::time::Instant::now();
    let sandbox = start(tools, machine_id, home, &app.args.data_dir, op).await?;
    let init = sandbox.init;
    live.insert(machine_id.to_owned(), sandbox);
    let elapsed_ms = began.elapsed().as_millis();
    tracing::info!(machine = %machine_id, init, elapsed_ms, "sandbox started");
    Ok(init)
}

/// Brings up a sandbox over `home` and mounts its overlays.
async fn start(
    tools: &Tools,
    machine_id: &str,
    home: &Path,
    data_dir: &Path,
    op: u64,
) -> Result<Sandbox, SandboxError> {
    let layout = Layout::of_host(home);
    let mut child = tokio::process::Command::new(&tools.bwrap)
        .args(layout.bwrap_args(machine_id))
        .env_clear()
        .env("PATH", host_path())
        .env(proc::MACHINE_ENV, machine_id)
        .process_group(0)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| SandboxError::Spawn {
            tool: "bwrap",
            source,
        })?;
    let ready = tokio::time::timeout(START_LIMIT, wait_ready(&mut child)).await;
    let init = match ready {
        Ok(Ok(init)) => init,
        Ok(Err(e)) => {
            let detail = failure_detail(&mut child, &e).await;
            return Err(SandboxError::Setup(detail));
        }
        Err(_) => {
            let _ = child.start_kill();
            return Err(SandboxError::Timeout(START_LIMIT));
        }
    };
    let sandbox = Sandbox { op, init, child };
    let hidden = hidden_paths(data_dir);
    match setup(tools, init, &layout.overlays, &hidden).await {
        Ok(()) => Ok(sandbox),
        Err(e) => {
            sandbox.stop().await;
            Err(e)
        }
    }
}

/// Waits for the sandbox's "ready" line; returns its init's host pid.
async fn wait_ready(child: &mut tokio::process::Child) -> Result<u32, String> {
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .await
        .map_err(|e| e.to_string())?;
    if line.trim() != "ready" {
        return Err("bwrap exited".to_owned());
    }
    let bwrap = child.id().ok_or("bwrap exited")?;
    let kids = tokio::task::spawn_blocking(move || proc::children_of(bwrap))
        .await
        .map_err(|e| e.to_string())?;
    match kids.as_slice() {
        [init] => u32::try_from(*init).map_err(|e| e.to_string()),
        other => Err(format!("expected one init process, found {}", other.len())),
    }
}

async fn failure_detail(child: &mut tokio::process::Child, fallback: &str) -> String {
    let _ = child.start_kill();
    let mut err = Vec::new();
    if let Some(mut stderr) = child.stderr.take() {
        let _ = tokio::time::timeout(Duration::from_secs(2), stderr.read_to_end(&mut err)).await;
    }
    let _ = child.wait().await;
    let text = one_line(&err);
    if text.is_empty() {
        fallback.to_owned()
    } else {
        text
    }
}

/// Mounts the overlays and hides `hidden` inside the sandbox.
async fn setup(
    tools: &Tools,
    init: u32,
    overlays: &[String],
    hidden: &[PathBuf],
) -> Result<(), SandboxError> {
    let mut args: Vec<OsString> = [
        "--target".into(),
        init.to_string().into(),
        "--user".into(),
        "--mount".into(),
        "--pid".into(),
        "--root".into(),
        "--".into(),
        "/bin/sh".into(),
        "-c".into(),
        SETUP_SCRIPT.into(),
        "dcs-sandbox-setup".into(),
        COW_DIR.into(),
    ]
    .into();
    args.extend(overlays.iter().map(OsString::from));
    args.push("--".into());
    args.extend(hidden.iter().map(|p| p.clone().into_os_string()));
    let run = tokio::process::Command::new(&tools.nsenter)
        .args(args)
        .env_clear()
        .env("PATH", host_path())
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output();
    let out = tokio::time::timeout(START_LIMIT, run)
        .await
        .map_err(|_| SandboxError::Timeout(START_LIMIT))?
        .map_err(|source| SandboxError::Spawn {
            tool: "nsenter",
            source,
        })?;
    let msg = one_line(&out.stderr);
    if !out.status.success() {
        return Err(SandboxError::Setup(msg));
    }
    if !msg.is_empty() {
        tracing::info!(detail = %msg, "sandbox set up");
    }
    Ok(())
}

/// Host paths under an overlaid directory that the sandbox must not show:
/// the data dir (other machines' homes, `state.json`). Paths under `/tmp`,
/// `/run`, `/home` or `/root` are hidden already.
fn hidden_paths(data_dir: &Path) -> Vec<PathBuf> {
    let dir = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    let top = dir
        .components()
        .nth(1)
        .and_then(|c| c.as_os_str().to_str())
        .unwrap_or("");
    if top.is_empty() || PRIVATE_DIRS.contains(&top) || top == "root" {
        Vec::new()
    } else {
        vec![dir]
    }
}

/// The sandbox's mount layout, derived from the host's `/`.
struct Layout {
    mounts: Vec<OsString>,
    /// Top-level directories that get a copy-on-write overlay.
    overlays: Vec<String>,
}

impl Layout {
    fn of_host(home: &Path) -> Self {
        let mut entries: Vec<(String, std::fs::FileType, Option<PathBuf>)> = std::fs::read_dir("/")
            .map(|dir| {
                dir.flatten()
                    .filter_map(|e| {
                        let name = e.file_name().into_string().ok()?;
                        let ft = e.file_type().ok()?;
                        let target = ft
                            .is_symlink()
                            .then(|| std::fs::read_link(e.path()).ok())
                            .flatten();
                        Some((name, ft, target))
                    })
                    .collect()
            })
            .unwrap_or_default();
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        Self::from_entries(
            entries
                .iter()
                .map(|(n, ft, t)| (n.as_str(), entry_kind(ft, t.as_deref()))),
            home,
        )
    }

    fn from_entries<'a>(entries: impl Iterator<Item = (&'a str, Entry<'a>)>, home: &Path) -> Self {
        let mut mounts: Vec<OsString> = Vec::new();
        let mut overlays = Vec::new();
        let mut push = |args: &[&std::ffi::OsStr]| mounts.extend(args.iter().map(|a| a.into()));
        for (name, kind) in entries {
            let at = format!("/{name}");
            let at = std::ffi::OsStr::new(&at);
            match (name, kind) {
                ("proc" | "dev" | "root" | "lost+found", _) | (_, Entry::Other) => {}
                (n, _) if PRIVATE_DIRS.contains(&n) => push(&["--tmpfs".as_ref(), at]),
                ("sys", _) => push(&["--ro-bind".as_ref(), at, at]),
                (_, Entry::Symlink(target)) => {
                    push(&["--symlink".as_ref(), target.as_os_str(), at]);
                }
                (_, Entry::File) => push(&["--ro-bind".as_ref(), at, at]),
                (n, Entry::Dir) => {
                    push(&["--ro-bind".as_ref(), at, at]);
                    if n.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "._-+".contains(c))
                    {
                        overlays.push(n.to_owned());
                    }
                }
            }
        }
        push(&["--proc".as_ref(), "/proc".as_ref()]);
        push(&["--dev".as_ref(), "/dev".as_ref()]);
        push(&["--tmpfs".as_ref(), COW_DIR.as_ref()]);
        push(&["--bind".as_ref(), home.as_os_str(), MACHINE_HOME.as_ref()]);
        Self { mounts, overlays }
    }

    fn bwrap_args(&self, machine_id: &str) -> Vec<OsString> {
        let hostname: String = machine_id.chars().take(63).collect();
        let mut args: Vec<OsString> = [
            "--unshare-user",
            "--uid",
            "0",
            "--gid",
            "0",
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-uts",
            "--hostname",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        args.push(hostname.into());
        args.extend(self.mounts.iter().cloned());
        args.extend(
            ["--chdir", MACHINE_HOME, "--", "/bin/sh", "-c", HOLDER]
                .iter()
                .map(OsString::from),
        );
        args
    }
}

/// What a top-level host entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry<'a> {
    Dir,
    File,
    Symlink(&'a Path),
    Other,
}

fn entry_kind<'a>(ft: &std::fs::FileType, target: Option<&'a Path>) -> Entry<'a> {
    match target {
        Some(t) if ft.is_symlink() => Entry::Symlink(t),
        _ if ft.is_dir() => Entry::Dir,
        _ if ft.is_file() => Entry::File,
        _ => Entry::Other,
    }
}

/// `nsenter` arguments that run `argv` in `cwd` inside the sandbox whose
/// init is `init`, as root without capabilities.
fn enter_args(tools: &Tools, init: u32, cwd: &str, argv: &[String]) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        "--target".into(),
        init.to_string().into(),
        "--user".into(),
        "--mount".into(),
        "--pid".into(),
        "--uts".into(),
        "--ipc".into(),
        "--root".into(),
        "--".into(),
        tools.setpriv.clone().into_os_string(),
        "--bounding-set=-all".into(),
        "--inh-caps=-all".into(),
        "--no-new-privs".into(),
        "--".into(),
        "env".into(),
        format!("--chdir={cwd}").into(),
        "--".into(),
    ];
    args.extend(argv.iter().map(OsString::from));
    args
}

/// A requested working directory as a path inside the sandbox: `/root` by
/// default, `~` is the home, relative paths resolve against it.
pub fn machine_cwd(cwd: Option<&str>) -> String {
    let Some(cwd) = cwd.map(str::trim).filter(|c| !c.is_empty()) else {
        return MACHINE_HOME.to_owned();
    };
    if cwd == "~" {
        return MACHINE_HOME.to_owned();
    }
    if let Some(rest) = cwd.strip_prefix("~/") {
        return format!("{MACHINE_HOME}/{rest}");
    }
    if cwd.starts_with('/') {
        return cwd.to_owned();
    }
    format!("{MACHINE_HOME}/{cwd}")
}

fn one_line(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// What `--isolation` asks for, checked at start: the sandboxes to use, or
/// an error naming what is missing and the way out.
pub async fn from_flag(isolation: Isolation, data_dir: &Path) -> Result<Sandboxes, String> {
    match isolation {
        Isolation::None => Ok(Sandboxes::none()),
        Isolation::Namespaces => probe(data_dir).await.map(Sandboxes::isolated).map_err(|e| {
            format!(
                "machine isolation is unavailable: {e}. Install bubblewrap (and allow \
                 unprivileged user namespaces), or start with --isolation none to run \
                 machine commands directly on this host"
            )
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cwd_inside_the_machine() {
        assert_eq!(machine_cwd(None), "/root");
        assert_eq!(machine_cwd(Some(" ")), "/root");
        assert_eq!(machine_cwd(Some("~")), "/root");
        assert_eq!(machine_cwd(Some("~/p")), "/root/p");
        assert_eq!(machine_cwd(Some("p/q")), "/root/p/q");
        assert_eq!(machine_cwd(Some("/etc")), "/etc");
    }

    #[test]
    fn layout_hides_private_dirs_and_overlays_the_rest() {
        let bin = Path::new("usr/bin");
        let entries = [
            ("bin", Entry::Symlink(bin)),
            ("etc", Entry::Dir),
            ("home", Entry::Dir),
            ("proc", Entry::Dir),
            ("root", Entry::Dir),
            ("run", Entry::Dir),
            ("sys", Entry::Dir),
            ("tmp", Entry::Dir),
            ("a,b", Entry::Dir),
            (".dockerenv", Entry::File),
            ("sock", Entry::Other),
        ];
        let layout = Layout::from_entries(entries.into_iter(), Path::new("/data/m/home"));
        let args: Vec<String> = layout
            .mounts
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let joined = args.join(" ");
        assert_eq!(layout.overlays, vec!["etc".to_owned()]);
        for expected in [
            "--symlink usr/bin /bin",
            "--ro-bind /etc /etc",
            "--tmpfs /home",
            "--tmpfs /run",
            "--tmpfs /tmp",
            "--ro-bind /sys /sys",
            "--ro-bind /a,b /a,b",
            "--ro-bind /.dockerenv /.dockerenv",
            "--proc /proc",
            "--dev /dev",
            "--bind /data/m/home /root",
        ] {
            assert!(joined.contains(expected), "{expected} in {joined}");
        }
        assert!(!joined.contains("/sock"), "{joined}");
        let bwrap = layout.bwrap_args("dm-1");
        let pos = |flag: &str| bwrap.iter().position(|a| a == flag);
        assert!(
            pos("--unshare-pid").is_some() && pos("--unshare-user").is_some(),
            "the holder's kill -1 needs its own PID namespace"
        );
        assert_eq!(bwrap.last().map(OsString::as_os_str), Some(HOLDER.as_ref()));
        assert!(!joined.contains("--ro-bind /root"), "{joined}");
    }

    #[test]
    fn data_dir_is_hidden_unless_already_private() {
        assert_eq!(
            hidden_paths(Path::new("/nonexistent-x/dcs")),
            vec![PathBuf::from("/nonexistent-x/dcs")]
        );
        assert!(hidden_paths(Path::new("/tmp/nonexistent-x")).is_empty());
        assert!(hidden_paths(Path::new("/home/u/nonexistent-x")).is_empty());
    }

    #[test]
    fn entering_drops_capabilities_and_sets_the_directory() {
        let tools = Tools {
            bwrap: "/b/bwrap".into(),
            nsenter: "/b/nsenter".into(),
            setpriv: "/b/setpriv".into(),
        };
        let args = enter_args(&tools, 42, "/root/p", &["ls".to_owned(), "-l".to_owned()]);
        let args: Vec<String> = args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let joined = args.join(" ");
        assert!(
            joined.starts_with("--target 42 --user --mount --pid"),
            "{joined}"
        );
        assert!(
            joined.ends_with("/b/setpriv --bounding-set=-all --inh-caps=-all --no-new-privs -- env --chdir=/root/p -- ls -l"),
            "{joined}"
        );
    }
}

//! End-to-end: spawns the built `dcs-emulator` on a loopback port with a
//! temporary data dir and drives it over HTTP and WebSocket.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use common::{Emu, ENDED, KEY};
use test_harness::host_pids_with_arg;

impl Emu {
    /// Runs `script` with bash; returns the execution and its stdout.
    async fn sh(&self, id: &str, script: &str) -> (Value, String) {
        let e = self.run(id, &["bash", "-c", script]).await;
        let eid = e["execution_id"].as_str().expect("eid");
        let out = self.output(id, eid).await;
        (e, out["stdout"].as_str().unwrap_or_default().to_owned())
    }

    /// `POST …/{op}` (sleep, wake), accepted; then waits for `phase`.
    async fn lifecycle_op(&self, id: &str, op: &str, phase: &str) {
        let path = format!("/v1/machines/{id}/{op}");
        self.answer("POST", &path, None).await.assert_accepted();
        self.wait_phase(id, phase).await;
    }

    async fn sleep_machine(&self, id: &str) {
        self.lifecycle_op(id, "sleep", "sleeping").await;
    }

    async fn wake_machine(&self, id: &str) {
        self.lifecycle_op(id, "wake", "running").await;
    }

    fn home(&self, id: &str) -> PathBuf {
        self.data.join("machines").join(id).join("home")
    }
}

/// A unique `sleep` duration: it names a process on the host whatever its
/// pid inside a machine's namespace.
fn unique_sleep() -> String {
    format!("3600.{}", uuid::Uuid::now_v7().as_u128() % 1_000_000_000)
}

#[tokio::test]
async fn lifecycle_executions_sleep_kills_processes_and_files_survive() {
    let emu = Emu::fresh(&[]);

    let created = emu.create_machine(Some("1h")).await;
    assert_eq!(created["autosleep_seconds"], 3600);
    let id = created["machine_id"].as_str().expect("id").to_owned();
    assert!(id.starts_with("dm-") && id.len() == 35, "{id}");
    emu.wait_phase(&id, "running").await;

    // An execution writes a file in the home and leaves a background process.
    let sleeper = unique_sleep();
    let script = format!("echo kept > file.txt; sleep {sleeper} >/dev/null 2>&1 & pwd");
    let e = emu.run(&id, &["bash", "-c", &script]).await;
    assert_eq!(e["status"], "succeeded", "{e}");
    assert_eq!(e["exit_code"], 0);
    let eid = e["execution_id"].as_str().expect("eid");
    let out = emu.output(&id, eid).await;
    assert_eq!(out["stdout"], "/root\n", "the home is /root in the machine");
    assert_eq!(
        std::fs::read_to_string(emu.home(&id).join("file.txt")).expect("on the host"),
        "kept\n"
    );
    assert_eq!(
        host_pids_with_arg(&sleeper).len(),
        1,
        "background process runs before sleep"
    );

    // A failing execution reports its exit code; events are paged.
    let e = emu.run(&id, &["bash", "-c", "echo oops >&2; exit 7"]).await;
    assert_eq!(
        (e["status"].as_str(), e["exit_code"].as_i64()),
        (Some("failed"), Some(7))
    );
    let eid = e["execution_id"].as_str().expect("eid");
    let (_, ev) = emu
        .call(
            "GET",
            &format!("/v1/machines/{id}/executions/{eid}/events?limit=1"),
            None,
        )
        .await;
    assert_eq!(ev["items"].as_array().map(Vec::len), Some(1));
    assert!(ev["next_cursor"].is_string());

    // Sleep ends every process; files stay.
    emu.sleep_machine(&id).await;
    assert_eq!(
        host_pids_with_arg(&sleeper),
        Vec::<i32>::new(),
        "background process survived sleep"
    );

    emu.wake_machine(&id).await;
    let e = emu
        .run(&id, &["bash", "-c", "cat \"$HOME/file.txt\""])
        .await;
    let eid = e["execution_id"].as_str().expect("eid");
    let out = emu.output(&id, eid).await;
    assert_eq!(out["stdout"], "kept\n");

    // An execution on a sleeping machine wakes it.
    emu.call("POST", &format!("/v1/machines/{id}/sleep"), None)
        .await;
    emu.wait_phase(&id, "sleeping").await;
    let e = emu.run(&id, &["true"]).await;
    assert_eq!(e["status"], "succeeded", "{e}");

    // Delete → 404 problem+json.
    let (s, _) = emu
        .call("DELETE", &format!("/v1/machines/{id}"), None)
        .await;
    assert!(s == 200 || s == 202);
    let mut gone = false;
    for _ in 0..200 {
        let (s, body) = emu.call("GET", &format!("/v1/machines/{id}"), None).await;
        if s == 404 {
            assert_eq!(body["status"], 404);
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(gone);
}

#[tokio::test]
async fn terminal_websocket_round_trip() {
    let emu = Emu::fresh(&[]);
    let id = emu.create_machine(None).await["machine_id"]
        .as_str()
        .expect("id")
        .to_owned();
    emu.wait_phase(&id, "running").await;
    // An execution leaves a file outside the home; the terminal, in the same
    // sandbox, sees it.
    let tag = uuid::Uuid::now_v7().simple().to_string();
    let (e, _) = emu
        .sh(&id, &format!("echo shared-sandbox > /etc/dcs-term-{tag}"))
        .await;
    assert_eq!(e["status"], "succeeded", "{e}");

    let (s, term) = emu
        .call(
            "POST",
            &format!("/v1/machines/{id}/terminals"),
            Some(json!({"width": 100, "height": 30})),
        )
        .await;
    assert_eq!(s, 200, "{term}");
    assert_eq!(term["status"], "ready");
    let tid = term["terminal_id"].as_str().expect("tid").to_owned();

    let url = format!(
        "{}/v1/machines/{id}/terminals/{tid}/stream",
        emu.base.replacen("http://", "ws://", 1)
    );
    let mut req = url.as_str().into_client_request().expect("ws request");
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {KEY}").parse().expect("header"),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("ws connect");

    let typed =
        format!("echo hi\necho $((40+2))x\ncd ~; echo \"[$(pwd)]\"; cat /etc/dcs-term-{tag}\n");
    let input = json!({"type": "input", "data": STANDARD.encode(typed)});
    ws.send(Message::text(input.to_string()))
        .await
        .expect("send");
    let mut seen = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let expected = ["hi", "42x", "[/root]", "shared-sandbox"];
    while !expected.iter().all(|x| seen.contains(x)) {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .unwrap_or_else(|_| panic!("no output in time; got {seen:?}"))
            .expect("open")
            .expect("frame");
        if let Message::Text(t) = msg {
            let frame: Value = serde_json::from_str(&t).expect("json frame");
            if frame["type"] == "output" {
                let bytes = STANDARD
                    .decode(frame["data"].as_str().unwrap_or(""))
                    .expect("base64");
                seen.push_str(&String::from_utf8_lossy(&bytes));
            }
        }
    }

    // Binary frames are raw input; `exit` closes the terminal.
    ws.send(Message::binary(b"exit\n".to_vec()))
        .await
        .expect("send exit");
    let mut closed = false;
    while let Ok(Some(Ok(msg))) = tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
        match msg {
            Message::Text(t) if t.contains("\"closed\"") => closed = true,
            Message::Close(_) => break,
            _ => {}
        }
    }
    assert!(closed, "a closed event precedes the close frame");
    let (_, t) = emu
        .call("GET", &format!("/v1/machines/{id}/terminals/{tid}"), None)
        .await;
    assert_eq!(t["status"], "closed");
}

#[tokio::test]
async fn auth_idempotency_faults_and_restart() {
    let mut emu = Emu::fresh(&[]);
    let url = format!("{}/v1/machines", emu.base);
    let body = json!({"vcpu": 1, "memory_mib": 512, "storage_gib": 5});

    let r = emu.http.get(&url).send().await.expect("req");
    assert_eq!(r.status(), 401);
    let r = emu
        .http
        .get(&url)
        .header("x-api-key", "wrong")
        .send()
        .await
        .expect("req");
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["error_code"], "AUTH_INVALID");

    // Missing Idempotency-Key → 400 problem+json.
    let r = emu
        .http
        .post(&url)
        .bearer_auth(KEY)
        .json(&body)
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), 400);
    assert_eq!(r.headers()["content-type"], "application/problem+json");

    // Unknown field → 422.
    let r = emu
        .http
        .post(&url)
        .bearer_auth(KEY)
        .header("idempotency-key", "k-unknown")
        .json(&json!({"vcpu": 1, "memory_mib": 512, "storage_gib": 5, "gpu": 1}))
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), 422);

    // Replay and reuse.
    let send = |b: Value, key: &'static str| {
        emu.http
            .post(&url)
            .bearer_auth(KEY)
            .header("idempotency-key", key)
            .json(&b)
            .send()
    };
    let a: Value = send(body.clone(), "k1")
        .await
        .expect("req")
        .json()
        .await
        .expect("json");
    let b: Value = send(body.clone(), "k1")
        .await
        .expect("req")
        .json()
        .await
        .expect("json");
    assert_eq!(a["machine_id"], b["machine_id"]);
    let r = send(
        json!({"vcpu": 2, "memory_mib": 512, "storage_gib": 5}),
        "k1",
    )
    .await
    .expect("req");
    assert_eq!(r.status(), 409);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["error_code"], "IDEMPOTENCY_KEY_REUSED");

    // A delay fault keeps the key in flight: a concurrent duplicate gets 429.
    let r = emu
        .http
        .post(format!("{}/_emulator/faults", emu.base))
        .json(&json!({"method": "POST", "path": "/v1/machines", "delay_ms": 400}))
        .send()
        .await
        .expect("fault");
    assert!(r.status().is_success());
    let first = send(body.clone(), "k2");
    let second = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        send(body.clone(), "k2").await
    };
    let (first, second) = tokio::join!(first, second);
    let first = first.expect("first").status().as_u16();
    assert!(first == 200 || first == 202, "{first}");
    let second = second.expect("second");
    assert_eq!(second.status(), 429);
    assert!(second.headers().contains_key("retry-after-ms"));

    // A status fault answers without processing, and the log records it.
    emu.http
        .post(format!("{}/_emulator/faults", emu.base))
        .json(&json!({"method": "GET", "path": "/v1/machines/*", "status": 503, "retry_after_ms": 1500}))
        .send()
        .await
        .expect("fault");
    let id = a["machine_id"].as_str().expect("id").to_owned();
    let r = emu
        .http
        .get(format!("{url}/{id}"))
        .bearer_auth(KEY)
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "2");
    let log: Value = emu
        .http
        .get(format!("{}/_emulator/requests", emu.base))
        .send()
        .await
        .expect("log")
        .json()
        .await
        .expect("json");
    let last = log
        .as_array()
        .and_then(|l| l.last())
        .cloned()
        .unwrap_or_default();
    assert_eq!(last["status"], 503);

    // Restart on the same data dir: state and idempotency records survive.
    emu.wait_phase(&id, "running").await;
    emu.kill_and_restart(&[]);
    let m = emu.wait_phase(&id, "running").await;
    assert_eq!(m["machine_id"], id.as_str());
    let again: Value = emu.post_keyed(&url, &body, "k1").await;
    assert_eq!(again["machine_id"], id.as_str());
}

#[tokio::test]
async fn autosleep_and_status_stream() {
    let emu = Emu::fresh(&[]);
    let created = emu.create_machine(Some("1s")).await;
    assert_eq!(created["autosleep_seconds"], 1);
    let id = created["machine_id"].as_str().expect("id").to_owned();

    // The status stream ends once the machine runs; its last event says so.
    let resp = emu
        .http
        .get(format!("{}/v1/machines/{id}/status/stream", emu.base))
        .bearer_auth(KEY)
        .send()
        .await
        .expect("stream");
    assert_eq!(resp.status(), 200);
    let text = tokio::time::timeout(Duration::from_secs(10), resp.text())
        .await
        .expect("stream ends")
        .expect("text");
    let last = text
        .split("\n\n")
        .filter_map(|block| {
            block
                .lines()
                .find_map(|l| l.strip_prefix("data:"))
                .map(|d| serde_json::from_str::<Value>(d.trim()).expect("event json"))
        })
        .last()
        .expect("at least one event");
    assert_eq!(last["status"]["phase"], "running", "{text}");
    assert!(text.contains("event: status"));

    // Idle for its autosleep period → sleeping.
    emu.wait_phase(&id, "sleeping").await;
}

#[tokio::test]
async fn isolation_home_is_root_and_system_writes_last_until_sleep() {
    let emu = Emu::fresh(&[]);
    let id = emu.running_machine().await;

    // `cd ~` lands in /root, which is HOME.
    let (e, out) = emu
        .sh(&id, "cd /tmp && cd ~ && pwd && echo \"$HOME\"")
        .await;
    assert_eq!(e["status"], "succeeded", "{e}");
    assert_eq!(out, "/root\n/root\n");

    // Writes outside the home stay inside the machine...
    let tag = uuid::Uuid::now_v7().simple().to_string();
    let etc = format!("/etc/dcs-iso-{tag}");
    let local = format!("/usr/local/dcs-iso-{tag}");
    let tmp = format!("/tmp/dcs-iso-{tag}");
    let (e, _) = emu
        .sh(
            &id,
            &format!("echo e > {etc} && mkdir {local} && echo l > {local}/f && echo t > {tmp}"),
        )
        .await;
    assert_eq!(e["status"], "succeeded", "{e}");
    for path in [&etc, &local, &tmp] {
        assert!(!Path::new(path).exists(), "{path} leaked to the host");
    }
    // ...and the machine's next command sees them (one sandbox per machine).
    let (e, out) = emu.sh(&id, &format!("cat {etc} {local}/f {tmp}")).await;
    assert_eq!(e["status"], "succeeded", "{e}");
    assert_eq!(out, "e\nl\nt\n");

    // Background processes, however detached (a daemon in its own session,
    // without the emulator's marker), run until the machine sleeps.
    let (nohup, daemon) = (unique_sleep(), unique_sleep());
    let (e, _) = emu
        .sh(
            &id,
            &format!(
                "nohup sleep {nohup} >/dev/null 2>&1 & \\
                 env -u DCS_EMULATOR_MACHINE_ID setsid -f sleep {daemon} >/dev/null 2>&1"
            ),
        )
        .await;
    assert_eq!(e["status"], "succeeded", "{e}");
    assert_eq!(host_pids_with_arg(&nohup).len(), 1, "nohup process runs");
    assert_eq!(host_pids_with_arg(&daemon).len(), 1, "daemon runs");

    emu.sleep_machine(&id).await;
    assert_eq!(
        host_pids_with_arg(&nohup),
        Vec::<i32>::new(),
        "nohup survived"
    );
    assert_eq!(
        host_pids_with_arg(&daemon),
        Vec::<i32>::new(),
        "daemon survived"
    );

    // After a wake: a fresh sandbox, the home kept, the rest discarded.
    emu.wake_machine(&id).await;
    let (e, out) = emu
        .sh(
            &id,
            &format!(
                "for p in {etc} {local} {tmp}; do test -e $p && echo kept $p; done; \
                 ps -e -o comm= | grep -c '^sleep$'; echo done"
            ),
        )
        .await;
    assert_eq!(e["status"], "succeeded", "{e}");
    assert_eq!(
        out, "0\ndone\n",
        "writes outside /root and processes are gone"
    );
}

#[tokio::test]
async fn isolation_machines_cannot_reach_each_other() {
    // A data dir under an overlaid host directory (not /tmp), so hiding it
    // takes more than the private /tmp.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let emu = Emu::start(dir.path(), "127.0.0.1:0");
    let a = emu.running_machine().await;
    let b = emu.running_machine().await;

    // GIVEN machine B with a secret in its home and a running process
    let tag = uuid::Uuid::now_v7().simple().to_string();
    let sleeper = unique_sleep();
    let (e, _) = emu
        .sh(
            &b,
            &format!(
                "echo secret-{tag} > ~/secret-{tag} && echo t > /tmp/b-{tag}; \
                 nohup sleep {sleeper} >/dev/null 2>&1 &"
            ),
        )
        .await;
    assert_eq!(e["status"], "succeeded", "{e}");
    let b_home = emu.home(&b).canonicalize().expect("B's home");
    let data = dir.path().canonicalize().expect("data dir");

    // WHEN machine A looks for it by every path it could know
    let script = format!(
        "cat {bh}/secret-{tag}; ls {bh} {data} {data}/machines; cat /tmp/b-{tag}; \
         cat /proc/[0-9]*/root/root/secret-{tag}; \
         find / -name 'secret-{tag}' -not -path '/proc/*' 2>/dev/null; ls -a ~",
        bh = b_home.display(),
        data = data.display(),
    );
    let (_, out) = emu.sh(&a, &script).await;
    let (_, procs) = emu.sh(&a, "ps -e -o args=").await;

    // THEN A sees neither the secret, nor B's home, nor B's processes
    assert!(!out.contains(&format!("secret-{tag}")), "{out}");
    assert!(!out.contains(&b), "A can list the data dir: {out}");
    assert!(procs.contains("ps -e -o args="), "{procs}");
    assert!(
        !procs.contains(&sleeper),
        "B's process is visible to A: {procs}"
    );
    // while B itself still has both
    let (_, out) = emu
        .sh(&b, &format!("cat ~/secret-{tag} /tmp/b-{tag}"))
        .await;
    assert_eq!(out, format!("secret-{tag}\nt\n"));
    assert_eq!(host_pids_with_arg(&sleeper).len(), 1);
}

#[tokio::test]
async fn isolation_none_runs_on_the_host() {
    let emu = Emu::fresh(&["--isolation", "none"]);
    let id = emu.running_machine().await;
    let (e, out) = emu.sh(&id, "cd ~ && pwd").await;
    assert_eq!(e["status"], "succeeded", "{e}");
    let home = emu.home(&id).canonicalize().expect("home");
    assert_eq!(out.trim(), home.to_str().expect("utf-8 path"));
}

#[test]
fn isolation_unavailable_is_one_clear_line() {
    // GIVEN a host where bubblewrap cannot be found
    let empty = tempfile::tempdir().expect("tempdir");
    let data = tempfile::tempdir().expect("tempdir");
    let run = Command::new(common::emulator_bin())
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data.path())
        .env("PATH", empty.path())
        .env_remove("DCS_EMULATOR_ISOLATION")
        .stdin(Stdio::null())
        .output()
        .expect("run dcs-emulator");

    // THEN it refuses to start, says why and how to go on, in one line
    assert!(!run.status.success());
    assert!(run.stdout.is_empty(), "it never listened");
    let stderr = String::from_utf8_lossy(&run.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].contains("isolation is unavailable") && lines[0].contains("bwrap"),
        "{stderr}"
    );
    assert!(lines[0].contains("--isolation none"), "{stderr}");
}

#[tokio::test]
async fn isolation_sandboxes_end_when_the_emulator_dies() {
    // GIVEN a machine with a background process
    let mut emu = Emu::fresh(&[]);
    let id = emu.running_machine().await;
    let sleeper = unique_sleep();
    let (e, _) = emu
        .sh(&id, &format!("nohup sleep {sleeper} >/dev/null 2>&1 &"))
        .await;
    assert_eq!(e["status"], "succeeded", "{e}");
    assert_eq!(host_pids_with_arg(&sleeper).len(), 1);

    // WHEN the emulator is killed (no chance to clean up)
    emu.process.kill();

    // THEN the machine's sandbox and everything in it end by themselves
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !host_pids_with_arg(&sleeper).is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        host_pids_with_arg(&sleeper),
        Vec::<i32>::new(),
        "a machine process outlived the emulator"
    );
}

// ---------------------------------------------------------------------------
// History: persistence cost, retention, restart, crash, migration.
// ---------------------------------------------------------------------------

impl Emu {
    /// Runs `count` executions of `argv`, `parallel` at a time, each to its end.
    async fn run_many(&self, id: &str, argv: &[&str], count: usize, parallel: usize) {
        let mut left = count;
        while left > 0 {
            let n = left.min(parallel);
            futures_util::future::join_all((0..n).map(|_| self.run(id, argv))).await;
            left -= n;
        }
    }

    /// Every execution of a machine, following cursors `limit` at a time.
    async fn all_executions(&self, id: &str, limit: usize) -> Vec<Value> {
        let mut out = Vec::new();
        let mut cursor = String::new();
        loop {
            let path = format!("/v1/machines/{id}/executions?limit={limit}{cursor}");
            let (s, page) = self.call("GET", &path, None).await;
            assert_eq!(s, 200, "{page}");
            let items = page["items"].as_array().cloned().unwrap_or_default();
            assert!(items.len() <= limit);
            out.extend(items);
            match page["next_cursor"].as_str() {
                Some(c) => cursor = format!("&cursor={c}"),
                None => return out,
            }
        }
    }

    fn record_files(&self, kind: &str) -> usize {
        std::fs::read_dir(self.data.join("records").join(kind))
            .map(|d| d.filter_map(Result::ok).count())
            .unwrap_or(0)
    }

    /// Bytes the emulator process passed to `write`-family calls so far.
    fn written_bytes(&self) -> u64 {
        let io = std::fs::read_to_string(format!("/proc/{}/io", self.process.pid()))
            .expect("/proc/<pid>/io");
        io.lines()
            .find_map(|l| l.strip_prefix("wchar:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("wchar")
    }
}

impl Emu {
    /// Reads execution `eid` of machine `id`, with no pause between reads,
    /// until it has ended (10 s at most); the ended execution.
    async fn poll_until_ended(&self, id: &str, eid: &str) -> Value {
        let path = format!("/v1/machines/{id}/executions/{eid}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (_, e) = self.call("GET", &path, None).await;
            if ENDED.contains(&e["status"].as_str().unwrap_or("")) {
                return e;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{eid} never ended: {e}"
            );
        }
    }

    /// Execution `eid`'s record file as it is on disk now, if there is one.
    fn execution_record(&self, eid: &str) -> Option<Value> {
        let path = self
            .data
            .join("records/executions")
            .join(format!("{eid}.json"));
        let bytes = std::fs::read(path).ok()?;
        Some(serde_json::from_slice(&bytes).expect("a record file is whole JSON"))
    }
}

async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Persisting a change costs in proportion to the change: the bytes the
/// emulator writes for 10 executions do not grow with the history.
#[tokio::test]
async fn write_cost_does_not_grow_with_history() {
    let emu = Emu::fresh(&[]);
    let id = emu.running_machine().await;
    let echo = ["echo", "some output of a command"];
    emu.run_many(&id, &echo, 20, 4).await;
    let before = emu.written_bytes();
    emu.run_many(&id, &echo, 10, 1).await;
    let early = emu.written_bytes() - before;

    emu.run_many(&id, &echo, 280, 8).await;
    let before = emu.written_bytes();
    emu.run_many(&id, &echo, 10, 1).await;
    let late = emu.written_bytes() - before;
    eprintln!("bytes written by 10 executions: {early} after 20, {late} after 310");
    assert!(
        late <= early + early / 2 + 32 * 1024,
        "10 executions wrote {early} bytes after 20 executions but {late} after 310"
    );
}

/// A machine busy with big outputs does not delay status reads of another.
#[tokio::test]
async fn busy_machine_does_not_delay_status_reads_of_another() {
    let emu = Emu::fresh(&[]);
    let a = emu.running_machine().await;
    let b = emu.running_machine().await;
    let big = [
        "sh",
        "-c",
        "yes abcdefghijklmnopqrstuvwxyz | head -c 1048576",
    ];
    emu.run_many(&a, &big, 6, 3).await;

    let stop = std::sync::atomic::AtomicBool::new(false);
    let busy = async {
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            emu.run_many(&a, &big, 2, 2).await;
        }
    };
    let reads = async {
        let mut ms = Vec::new();
        for _ in 0..60 {
            let t = std::time::Instant::now();
            let (s, _) = emu.call("GET", &format!("/v1/machines/{b}"), None).await;
            ms.push(t.elapsed().as_secs_f64() * 1000.0);
            assert_eq!(s, 200);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        ms
    };
    let (_, mut ms) = tokio::join!(busy, reads);
    ms.sort_by(f64::total_cmp);
    let (p50, p90) = (ms[ms.len() / 2], ms[ms.len() * 9 / 10]);
    eprintln!("status reads of B while A is busy: p50 {p50:.1} ms, p90 {p90:.1} ms");
    assert!(
        p50 < 25.0 && p90 < 100.0,
        "status reads of B while A is busy: p50 {p50:.1} ms, p90 {p90:.1} ms ({ms:?})"
    );
}

/// Ended executions beyond the per-machine cap and after the retention are
/// removed (from lists, GET and disk); lists still paginate; idempotency
/// records expire after their TTL.
#[tokio::test]
async fn retention_prunes_executions_and_idempotency_records() {
    let flags = [
        "--executions-per-machine",
        "3",
        "--retention",
        "3s",
        "--idempotency-ttl",
        "2s",
    ];
    let emu = Emu::fresh(&flags);
    let id = emu.running_machine().await;
    let mut ids = Vec::new();
    for i in 0..6 {
        let e = emu.run(&id, &["echo", &i.to_string()]).await;
        ids.push(e["execution_id"].as_str().expect("id").to_owned());
    }
    wait_until("the cap applies", Duration::from_secs(5), || async {
        emu.all_executions(&id, 50).await.len() == 3 && emu.record_files("executions") == 3
    })
    .await;
    let listed: Vec<String> = emu
        .all_executions(&id, 2)
        .await
        .iter()
        .map(|e| e["execution_id"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(
        listed,
        ids[3..],
        "the newest three, in order, over two pages"
    );
    let (s, _) = emu
        .call(
            "GET",
            &format!("/v1/machines/{id}/executions/{}", ids[0]),
            None,
        )
        .await;
    assert_eq!(s, 404);
    let (_, out) = emu
        .call(
            "GET",
            &format!("/v1/machines/{id}/executions/{}/output", ids[5]),
            None,
        )
        .await;
    assert_eq!(out["stdout"], "5\n");

    // Idempotency: replayed within the TTL, processed anew after it.
    let url = format!("{}/v1/machines", emu.base);
    let body = json!({"vcpu": 1, "memory_mib": 512, "storage_gib": 5});
    let first = emu.post_keyed(&url, &body, "k-ttl").await;
    let again = emu.post_keyed(&url, &body, "k-ttl").await;
    assert_eq!(first["machine_id"], again["machine_id"]);

    wait_until(
        "ended executions expire",
        Duration::from_secs(10),
        || async {
            emu.all_executions(&id, 50).await.is_empty() && emu.record_files("executions") == 0
        },
    )
    .await;
    let later = emu.post_keyed(&url, &body, "k-ttl").await;
    assert!(later["machine_id"].is_string(), "{later}");
    assert_ne!(first["machine_id"], later["machine_id"], "expired key");
}

/// State survives a restart after many executions: lists, outputs, events
/// and idempotent replays are all still there.
#[tokio::test]
async fn state_survives_restart_after_many_executions() {
    let mut emu = Emu::fresh(&[]);
    let id = emu.running_machine().await;
    emu.run_many(&id, &["sh", "-c", "echo out; echo err >&2"], 120, 8)
        .await;
    let url = format!("{}/v1/machines/{id}/executions", emu.base);
    let body = json!({"command": ["echo", "keyed"]});
    let keyed = emu.post_keyed(&url, &body, "k-exec").await;
    let keyed_id = keyed["execution_id"].as_str().expect("id").to_owned();
    emu.wait_phase(&id, "running").await;
    wait_until(
        "the keyed execution ends",
        Duration::from_secs(10),
        || async {
            let (_, e) = emu
                .call(
                    "GET",
                    &format!("/v1/machines/{id}/executions/{keyed_id}"),
                    None,
                )
                .await;
            e["status"] == "succeeded"
        },
    )
    .await;
    let before = emu.all_executions(&id, 50).await;
    assert_eq!(before.len(), 121);

    emu.kill_and_restart(&[]);
    let m = emu.wait_phase(&id, "running").await;
    assert_eq!(m["machine_id"], id.as_str());
    let after = emu.all_executions(&id, 50).await;
    assert_eq!(after, before, "the same executions, in the same order");
    let oldest = after[0]["execution_id"].as_str().expect("id");
    let (_, out) = emu
        .call(
            "GET",
            &format!("/v1/machines/{id}/executions/{oldest}/output"),
            None,
        )
        .await;
    assert_eq!(
        (out["stdout"].as_str(), out["stderr"].as_str()),
        (Some("out\n"), Some("err\n"))
    );
    let (_, events) = emu
        .call(
            "GET",
            &format!("/v1/machines/{id}/executions/{oldest}/events"),
            None,
        )
        .await;
    let chunks: String = events["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter(|e| e["type"] == "stdout")
        .filter_map(|e| e["chunk"].as_str())
        .collect();
    assert_eq!(chunks, "out\n");
    let replay = emu.post_keyed(&url, &body, "k-exec").await;
    assert_eq!(replay["execution_id"], keyed_id.as_str());
    let fresh = emu.run(&id, &["echo", "after"]).await;
    assert_eq!(fresh["status"], "succeeded");
}

/// An execution reads as ended only once its ended record is on disk, so a
/// crash (SIGKILL) right after that read loses nothing: polled as fast as
/// the API answers, no execution is ever seen ended while its record file
/// says otherwise.
#[tokio::test]
async fn an_execution_reads_ended_only_once_its_end_is_on_disk() {
    let emu = Emu::fresh(&[]);
    let id = emu.running_machine().await;
    for i in 0..40 {
        let a = emu
            .answer(
                "POST",
                &format!("/v1/machines/{id}/executions"),
                Some(json!({ "command": ["echo", i.to_string()] })),
            )
            .await;
        assert_eq!(a.status, 200, "{}", a.body);
        let eid = a.body["execution_id"].as_str().expect("eid").to_owned();
        let ended = emu.poll_until_ended(&id, &eid).await;
        let on_disk = emu.execution_record(&eid);
        assert_eq!(
            on_disk.as_ref().map(|r| &r["status"]),
            Some(&ended["status"]),
            "execution {i} read as {} before its record said so: {on_disk:?}",
            ended["status"]
        );
    }
}

/// A crash (SIGKILL) in the middle of writes leaves loadable state: the
/// emulator starts again, and every execution is readable and settled.
#[tokio::test]
async fn crash_during_writes_leaves_loadable_state() {
    let mut emu = Emu::fresh(&[]);
    let id = emu.running_machine().await;
    let path = format!("{}/v1/machines/{id}/executions", emu.base);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let client = |n: usize| {
        let http = emu.http.clone();
        let path = path.clone();
        let stop = &stop;
        async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // Errors are expected once the process is killed.
                let _ = http
                    .post(&path)
                    .bearer_auth(KEY)
                    .header("idempotency-key", uuid::Uuid::now_v7().simple().to_string())
                    .json(&json!({"command": ["sh", "-c", format!("echo {n}; sleep 0.05")]}))
                    .send()
                    .await;
            }
        }
    };
    let killer = async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        emu.process.kill();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    };
    let clients = futures_util::future::join_all((0..8).map(client));
    tokio::join!(clients, killer);
    // A temporary file as a write interrupted before its rename leaves it.
    let stray = emu.data.join("records/executions/ex-stray.json.tmp");
    std::fs::write(&stray, b"{\"id\": \"ex-str").expect("stray temp file");

    emu.kill_and_restart(&[]);
    emu.wait_phase(&id, "running").await;
    let all = emu.all_executions(&id, 100).await;
    assert!(!all.is_empty());
    for e in &all {
        let status = e["status"].as_str().unwrap_or_default();
        assert!(
            ["succeeded", "failed", "cancelled", "expired"].contains(&status),
            "settled after the restart: {e}"
        );
    }
    assert!(!stray.exists(), "leftover temporary files are removed");
}

/// A `state.json` of an earlier version is migrated to record files.
#[tokio::test]
async fn legacy_state_json_is_migrated() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Recent, so the retention keeps the execution.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64;
    let legacy = json!({
        "next_seq": 2,
        "machines": {"dm-legacy": {
            "id": "dm-legacy", "seq": 1, "vcpu": 1.0, "memory_mib": 512, "storage_gib": 5,
            "desired": "sleeping", "phase": "sleeping", "reason": "sleeping",
            "revision": 7, "last_transition_ms": now, "last_progress_ms": now, "created_ms": now,
            "autosleep_seconds": 0, "last_activity_ms": now, "op": 3
        }},
        "executions": {"ex-legacy": {
            "id": "ex-legacy", "machine_id": "dm-legacy", "seq": 2, "command": ["echo", "hi"],
            "cwd": "/root", "env_keys": [], "status": "succeeded", "created_ms": now,
            "completed_ms": now, "exit_code": 0,
            "stdout": {"data": "aGkK", "bytes": 3, "truncated": false},
            "stderr": {"data": "", "bytes": 0, "truncated": false},
            "events": [
                {"sequence": 1, "kind": "lifecycle", "at_ms": 1, "status": "queued"},
                {"sequence": 2, "kind": "stdout", "at_ms": 1, "chunk": "hi\n"},
                {"sequence": 3, "kind": "lifecycle", "at_ms": 2, "status": "succeeded", "exit_code": 0}
            ]
        }},
        "terminals": {},
        "idempotency": {}
    });
    std::fs::write(dir.path().join("state.json"), legacy.to_string()).expect("legacy state");
    let emu = Emu::start(dir.path(), "127.0.0.1:0");
    let (s, m) = emu.call("GET", "/v1/machines/dm-legacy", None).await;
    assert_eq!(s, 200, "{m}");
    assert_eq!(m["status"]["phase"], "sleeping");
    let (_, out) = emu
        .call(
            "GET",
            "/v1/machines/dm-legacy/executions/ex-legacy/output",
            None,
        )
        .await;
    assert_eq!(out["stdout"], "hi\n");
    assert!(!dir.path().join("state.json").exists());
    assert!(dir.path().join("state.json.migrated").exists());
    assert_eq!(emu.record_files("machines"), 1);
    assert_eq!(emu.record_files("executions"), 1);
}

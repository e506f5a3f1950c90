//! The process harness the emulator's tests share: spawns the built
//! `dcs-emulator` on a loopback port with a data dir and fast timings, and
//! drives it over HTTP.
//!
//! Each test file is its own crate and uses part of this module.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use test_harness::emulator::{fast_flags_then, EmulatorCommand};
use test_harness::Process;

/// The API key every test emulator accepts.
pub const KEY: &str = "emulator-test-key";

/// Statuses after which an execution does not change.
pub const ENDED: [&str; 4] = ["succeeded", "failed", "cancelled", "expired"];

/// The emulator under test: `$DCS_EMULATOR_BIN` if set (to compare
/// builds), else the one cargo built for these tests.
pub fn emulator_bin() -> PathBuf {
    std::env::var_os("DCS_EMULATOR_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_dcs-emulator")))
}

/// A running emulator process; killed on drop.
pub struct Emu {
    pub process: Process,
    /// `http://127.0.0.1:PORT`
    pub base: String,
    /// The data dir.
    pub data: PathBuf,
    pub http: reqwest::Client,
    /// Its output and log (see [`EmulatorCommand::logs`]).
    logs: tempfile::TempDir,
    /// The data dir, when this emulator owns it.
    _dir: Option<tempfile::TempDir>,
}

/// An answer: status, content type, `ETag`, body (JSON, or the text).
pub struct Answer {
    pub status: u16,
    pub content_type: String,
    pub etag: Option<String>,
    pub body: Value,
}

impl Answer {
    /// Asserts a 200 or 202.
    pub fn assert_accepted(&self) {
        assert!(
            self.status == 200 || self.status == 202,
            "{} {}",
            self.status,
            self.body
        );
    }
}

/// Starts the binary with the key, `data`, the fast timings, `extra` flags
/// and `env`, its output in `logs`; returns it and its address.
fn spawn(
    data: &Path,
    listen: &str,
    extra: &[&str],
    env: &[(&str, &str)],
    logs: &Path,
) -> (Process, String) {
    EmulatorCommand {
        bin: &emulator_bin(),
        listen,
        api_key: KEY,
        data_dir: data,
        flags: &fast_flags_then(extra),
        env,
        logs,
    }
    .start()
}

/// A directory for an emulator's output.
fn log_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("dcs-emulator-logs-")
        .tempdir()
        .expect("log dir")
}

impl Emu {
    /// An emulator on `data` (kept by the caller), listening on `listen`.
    pub fn start(data: &Path, listen: &str) -> Emu {
        Self::start_with(data, listen, &[])
    }

    /// Like [`Emu::start`], with `extra` flags after the defaults.
    pub fn start_with(data: &Path, listen: &str, extra: &[&str]) -> Emu {
        let logs = log_dir();
        let (process, base) = spawn(data, listen, extra, &[], logs.path());
        Emu {
            process,
            base,
            data: data.to_owned(),
            http: reqwest::Client::new(),
            logs,
            _dir: None,
        }
    }

    /// An emulator on a fresh data dir of its own, with `extra` flags.
    pub fn fresh(extra: &[&str]) -> Emu {
        Self::fresh_env(extra, &[])
    }

    /// Like [`Emu::fresh`], with environment variables.
    pub fn fresh_env(extra: &[&str], env: &[(&str, &str)]) -> Emu {
        let dir = tempfile::tempdir().expect("tempdir");
        let logs = log_dir();
        let (process, base) = spawn(dir.path(), "127.0.0.1:0", extra, env, logs.path());
        Emu {
            process,
            base,
            data: dir.path().to_owned(),
            http: reqwest::Client::new(),
            logs,
            _dir: Some(dir),
        }
    }

    /// Kills the process (SIGKILL: a crash) and starts it again on the same
    /// data dir and address, with `extra` flags.
    pub fn kill_and_restart(&mut self, extra: &[&str]) {
        let listen = self.base.trim_start_matches("http://").to_owned();
        self.process.kill();
        let (process, base) = spawn(&self.data, &listen, extra, &[], self.logs.path());
        self.process = process;
        self.base = base;
        // A fresh client: pooled connections went with the old process.
        self.http = reqwest::Client::new();
    }

    /// Sends `req` and reads the answer.
    pub async fn send(&self, req: reqwest::RequestBuilder) -> Answer {
        let resp = req.send().await.expect("request");
        let status = resp.status().as_u16();
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let content_type = header("content-type").unwrap_or_default();
        let etag = header("etag");
        let text = resp.text().await.expect("body");
        Answer {
            status,
            content_type,
            etag,
            body: serde_json::from_str(&text).unwrap_or(Value::String(text)),
        }
    }

    /// A `/v1` call; mutations get `key` (or a fresh one) and `if_match`.
    pub async fn call_with(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        key: Option<&str>,
        if_match: Option<&str>,
    ) -> Answer {
        let mut req = self
            .http
            .request(
                method.parse().expect("method"),
                format!("{}{path}", self.base),
            )
            .header("authorization", format!("Bearer {KEY}"));
        if method != "GET" {
            let fresh = uuid::Uuid::now_v7().simple().to_string();
            req = req.header("idempotency-key", key.unwrap_or(&fresh));
        }
        if let Some(rev) = if_match {
            req = req.header("if-match", rev);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        self.send(req).await
    }

    /// A `/v1` call (a fresh idempotency key for mutations).
    pub async fn answer(&self, method: &str, path: &str, body: Option<Value>) -> Answer {
        self.call_with(method, path, body, None, None).await
    }

    /// A `/v1` call: its status and body.
    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let a = self.answer(method, path, body).await;
        (a.status, a.body)
    }

    /// `POST url` with `body` under idempotency key `key`; the body answered.
    pub async fn post_keyed(&self, url: &str, body: &Value, key: &str) -> Value {
        self.http
            .post(url)
            .bearer_auth(KEY)
            .header("idempotency-key", key)
            .json(body)
            .send()
            .await
            .expect("req")
            .json()
            .await
            .expect("json")
    }

    /// Polls the machine until its phase is `phase`; returns the machine.
    pub async fn wait_phase(&self, id: &str, phase: &str) -> Value {
        for _ in 0..400 {
            let (_, m) = self.call("GET", &format!("/v1/machines/{id}"), None).await;
            if m["status"]["phase"] == phase {
                return m;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("machine {id} never reached {phase}");
    }

    /// Creates a small machine, with `autosleep` if given; returns the
    /// answer's body (asserted 200 or 202).
    pub async fn create_machine(&self, autosleep: Option<&str>) -> Value {
        let mut body = json!({"vcpu": 1, "memory_mib": 512, "storage_gib": 5});
        if let Some(a) = autosleep {
            body["autosleep"] = a.into();
        }
        let a = self.answer("POST", "/v1/machines", Some(body)).await;
        a.assert_accepted();
        a.body
    }

    /// Creates a machine with `autosleep`; returns its id.
    pub async fn create(&self, autosleep: &str) -> String {
        self.create_machine(Some(autosleep)).await["machine_id"]
            .as_str()
            .expect("machine id")
            .to_owned()
    }

    /// Creates a machine (autosleep 1h) and waits until it runs.
    pub async fn running_machine(&self) -> String {
        let id = self.create("1h").await;
        self.wait_phase(&id, "running").await;
        id
    }

    /// Runs `argv` on machine `id` to its end: the create answer and the
    /// ended execution.
    pub async fn execute(&self, id: &str, argv: &[&str]) -> (Value, Value) {
        let a = self
            .answer(
                "POST",
                &format!("/v1/machines/{id}/executions"),
                Some(json!({ "command": argv })),
            )
            .await;
        assert_eq!(a.status, 200, "{}", a.body);
        let first = a.body;
        let eid = first["execution_id"].as_str().expect("eid").to_owned();
        for _ in 0..400 {
            let (_, e) = self
                .call("GET", &format!("/v1/machines/{id}/executions/{eid}"), None)
                .await;
            if ENDED.contains(&e["status"].as_str().unwrap_or("")) {
                return (first, e);
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("execution {eid} never finished");
    }

    /// Runs `argv` on machine `id` to its end; the ended execution.
    pub async fn run(&self, id: &str, argv: &[&str]) -> Value {
        self.execute(id, argv).await.1
    }

    /// The output of execution `eid` of machine `id`.
    pub async fn output(&self, id: &str, eid: &str) -> Value {
        let path = format!("/v1/machines/{id}/executions/{eid}/output");
        self.call("GET", &path, None).await.1
    }
}

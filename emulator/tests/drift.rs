//! Drift switches: each one set by flag at start and by
//! `PATCH /_emulator/config` at run time, the answers it produces, and the
//! request log entries of refused calls.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

const KEY: &str = "drift-key";
const SIGNATURE: &str = "missing internal route signature";
const NO_TERMINALS: &str = "terminals are not available in this API version";

struct Emu {
    child: Child,
    base: String,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

/// An answer: status, content type, `ETag`, body (JSON, or the text).
struct Answer {
    status: u16,
    content_type: String,
    etag: Option<String>,
    body: Value,
}

impl Emu {
    fn start(extra: &[&str]) -> Emu {
        Self::start_env(extra, &[])
    }

    fn start_env(extra: &[&str], env: &[(&str, &str)]) -> Emu {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_dcs-emulator"));
        cmd.args(["--listen", "127.0.0.1:0", "--api-key", KEY])
            .arg("--data-dir")
            .arg(dir.path())
            .args(["--boot-delay", "50ms", "--wake-delay", "50ms"])
            .args(["--sleep-delay", "20ms", "--destroy-delay", "20ms"])
            .args(["--hold-window", "0s", "--hold-jitter", "0s"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn dcs-emulator");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("first line");
        let base = line
            .trim()
            .strip_prefix("dcs-emulator listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        Emu {
            child,
            base,
            http: reqwest::Client::new(),
            _dir: dir,
        }
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Answer {
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
    async fn call_with(
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

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Answer {
        self.call_with(method, path, body, None, None).await
    }

    async fn config(&self) -> Value {
        let a = self
            .send(self.http.get(format!("{}/_emulator/config", self.base)))
            .await;
        assert_eq!(a.status, 200, "{}", a.body);
        a.body
    }

    async fn patch_config(&self, patch: Value) -> Answer {
        self.send(
            self.http
                .patch(format!("{}/_emulator/config", self.base))
                .json(&patch),
        )
        .await
    }

    async fn configure(&self, patch: Value) -> Value {
        let a = self.patch_config(patch).await;
        assert_eq!(a.status, 200, "{}", a.body);
        a.body
    }

    async fn requests(&self) -> Vec<Value> {
        let a = self
            .send(self.http.get(format!("{}/_emulator/requests", self.base)))
            .await;
        a.body.as_array().cloned().unwrap_or_default()
    }

    async fn create(&self, autosleep: &str) -> String {
        let a = self
            .call(
                "POST",
                "/v1/machines",
                Some(
                    json!({"vcpu": 1, "memory_mib": 512, "storage_gib": 5, "autosleep": autosleep}),
                ),
            )
            .await;
        assert!(
            a.status == 200 || a.status == 202,
            "{} {}",
            a.status,
            a.body
        );
        a.body["machine_id"]
            .as_str()
            .expect("machine id")
            .to_owned()
    }

    async fn wait_phase(&self, id: &str, phase: &str) -> Value {
        for _ in 0..400 {
            let a = self.call("GET", &format!("/v1/machines/{id}"), None).await;
            if a.body["status"]["phase"] == phase {
                return a.body;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("machine {id} never reached {phase}");
    }

    async fn run(&self, id: &str, argv: &[&str]) -> (Value, Value) {
        let a = self
            .call(
                "POST",
                &format!("/v1/machines/{id}/executions"),
                Some(json!({ "command": argv })),
            )
            .await;
        assert_eq!(a.status, 200, "{}", a.body);
        let first = a.body;
        let eid = first["execution_id"].as_str().expect("eid").to_owned();
        for _ in 0..400 {
            let e = self
                .call("GET", &format!("/v1/machines/{id}/executions/{eid}"), None)
                .await
                .body;
            if ["succeeded", "failed", "cancelled", "expired"]
                .contains(&e["status"].as_str().unwrap_or(""))
            {
                return (first, e);
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("execution {eid} never finished");
    }
}

impl Drop for Emu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn assert_signature_refusal(a: &Answer) {
    assert_eq!(a.status, 401, "{}", a.body);
    assert!(
        a.content_type.starts_with("application/json"),
        "{}",
        a.content_type
    );
    assert_eq!(
        a.body,
        json!({"error_code": "AUTH_INVALID", "message": SIGNATURE, "retryable": false})
    );
}

fn assert_problem(a: &Answer, status: u16, detail: &str) {
    assert_eq!(a.status, status, "{}", a.body);
    assert_eq!(a.content_type, "application/problem+json");
    assert_eq!(a.body["status"], status);
    assert_eq!(a.body["detail"], detail);
}

/// The log entries for `method path`, as (status, idempotency key).
fn logged(log: &[Value], method: &str, path: &str) -> Vec<(u64, Option<String>)> {
    log.iter()
        .filter(|e| e["method"] == method && e["path"] == path)
        .map(|e| {
            (
                e["status"].as_u64().unwrap_or_default(),
                e["idempotency_key"].as_str().map(str::to_owned),
            )
        })
        .collect()
}

fn is_uuid(id: &str) -> bool {
    id.len() == 36
        && uuid::Uuid::parse_str(id).is_ok()
        && id == id.to_ascii_lowercase()
        && !id.starts_with("dm-")
}

#[tokio::test]
async fn defaults_are_all_off() {
    let emu = Emu::start(&[]);
    let cfg = emu.config().await;
    assert_eq!(cfg["refuse_wake"], false);
    assert_eq!(cfg["refuse_sleep"], false);
    assert_eq!(cfg["refuse_terminals"], Value::Null);
    assert_eq!(cfg["id_format"], "dm");
    assert_eq!(cfg["response_shape"], "spec");
    assert_eq!(cfg["require_if_match"], false);
    // Timing knobs are still there.
    assert_eq!(cfg["hold_window_ms"], 0);
    assert_eq!(cfg["boot_delay_ms"], 50);
}

#[tokio::test]
async fn refuse_wake_and_sleep_by_flag_keep_executions_and_autosleep() {
    let emu = Emu::start(&["--refuse-wake", "--refuse-sleep"]);
    let cfg = emu.config().await;
    assert_eq!(cfg["refuse_wake"], true);
    assert_eq!(cfg["refuse_sleep"], true);

    let id = emu.create("2s").await;
    emu.wait_phase(&id, "running").await;

    // Explicit sleep and wake are refused, with or without If-Match.
    let sleep_path = format!("/v1/machines/{id}/sleep");
    let wake_path = format!("/v1/machines/{id}/wake");
    let refused_key = uuid::Uuid::now_v7().simple().to_string();
    let a = emu
        .call_with("POST", &sleep_path, None, Some(&refused_key), None)
        .await;
    assert_signature_refusal(&a);
    let a = emu
        .call_with("POST", &wake_path, None, None, Some("*"))
        .await;
    assert_signature_refusal(&a);
    let m = emu.wait_phase(&id, "running").await;
    assert_eq!(
        m["desired_state"], "running",
        "a refused sleep changes nothing"
    );

    // A wrong key is still told so (auth comes first).
    let a = emu
        .send(
            emu.http
                .post(format!("{}{wake_path}", emu.base))
                .header("authorization", "Bearer wrong")
                .header("idempotency-key", uuid::Uuid::now_v7().simple().to_string()),
        )
        .await;
    assert_eq!(a.status, 401);
    assert_eq!(a.body["message"], "invalid Dedalus API key");

    // Autosleep still sleeps the machine.
    emu.wait_phase(&id, "sleeping").await;

    // An execution wakes it (the documented fallback).
    let (first, done) = emu.run(&id, &["/bin/true"]).await;
    assert_eq!(first["status"], "wake_in_progress", "{first}");
    assert_eq!(done["status"], "succeeded", "{done}");
    emu.wait_phase(&id, "running").await;

    // The request log records the refusals.
    let log = emu.requests().await;
    let sleeps = logged(&log, "POST", &sleep_path);
    assert_eq!(sleeps, vec![(401, Some(refused_key.clone()))]);
    let wakes = logged(&log, "POST", &wake_path);
    assert_eq!(
        wakes.iter().map(|w| w.0).collect::<Vec<_>>(),
        vec![401, 401]
    );

    // Turned off at run time, the same key is processed (a refusal is not
    // stored as the key's result).
    let cfg = emu.configure(json!({"refuse_sleep": false})).await;
    assert_eq!(cfg["refuse_sleep"], false);
    assert_eq!(cfg["refuse_wake"], true);
    let a = emu
        .call_with("POST", &sleep_path, None, Some(&refused_key), None)
        .await;
    assert!(
        a.status == 200 || a.status == 202,
        "{} {}",
        a.status,
        a.body
    );
    assert_eq!(a.body["desired_state"], "sleeping");
    emu.wait_phase(&id, "sleeping").await;
    assert_signature_refusal(&emu.call("POST", &wake_path, None).await);
    emu.configure(json!({"refuse_wake": false})).await;
    let a = emu.call("POST", &wake_path, None).await;
    assert!(
        a.status == 200 || a.status == 202,
        "{} {}",
        a.status,
        a.body
    );
    emu.wait_phase(&id, "running").await;
}

#[tokio::test]
async fn refuse_wake_and_sleep_at_run_time_and_by_env() {
    let emu = Emu::start(&[]);
    let id = emu.create("1h").await;
    emu.wait_phase(&id, "running").await;
    let wake_path = format!("/v1/machines/{id}/wake");
    let sleep_path = format!("/v1/machines/{id}/sleep");

    let cfg = emu.configure(json!({"refuse_wake": true})).await;
    assert_eq!(cfg["refuse_wake"], true);
    assert_eq!(cfg["refuse_sleep"], false);
    // Wake of a running machine would be a 200 no-op; refused instead.
    assert_signature_refusal(&emu.call("POST", &wake_path, None).await);
    let a = emu.call("POST", &sleep_path, None).await;
    assert!(
        a.status == 200 || a.status == 202,
        "{} {}",
        a.status,
        a.body
    );
    emu.wait_phase(&id, "sleeping").await;

    emu.configure(json!({"refuse_sleep": true, "refuse_wake": false}))
        .await;
    let a = emu.call("POST", &wake_path, None).await;
    assert!(
        a.status == 200 || a.status == 202,
        "{} {}",
        a.status,
        a.body
    );
    emu.wait_phase(&id, "running").await;
    assert_signature_refusal(&emu.call("POST", &sleep_path, None).await);

    let log = emu.requests().await;
    assert_eq!(
        logged(&log, "POST", &wake_path)
            .iter()
            .map(|w| w.0)
            .collect::<Vec<_>>(),
        vec![401, 202]
    );
    assert_eq!(
        logged(&log, "POST", &sleep_path)
            .iter()
            .map(|w| w.0)
            .collect::<Vec<_>>(),
        vec![202, 401]
    );

    // Environment variables set the switches too.
    let emu = Emu::start_env(
        &[],
        &[
            ("DCS_EMULATOR_REFUSE_WAKE", "true"),
            ("DCS_EMULATOR_REFUSE_SLEEP", "1"),
            ("DCS_EMULATOR_REFUSE_TERMINALS", "501"),
            ("DCS_EMULATOR_RESPONSE_SHAPE", "newer"),
            ("DCS_EMULATOR_REQUIRE_IF_MATCH", "yes"),
            ("DCS_EMULATOR_ID_FORMAT", "uuid"),
        ],
    );
    let cfg = emu.config().await;
    assert_eq!(cfg["refuse_wake"], true);
    assert_eq!(cfg["refuse_sleep"], true);
    assert_eq!(cfg["refuse_terminals"], 501);
    assert_eq!(cfg["response_shape"], "newer");
    assert_eq!(cfg["require_if_match"], true);
    assert_eq!(cfg["id_format"], "uuid");
}

#[tokio::test]
async fn refuse_terminals_404_by_flag_and_501_at_run_time() {
    let emu = Emu::start(&["--refuse-terminals", "404"]);
    assert_eq!(emu.config().await["refuse_terminals"], 404);
    let id = emu.create("1h").await;
    emu.wait_phase(&id, "running").await;
    let terms = format!("/v1/machines/{id}/terminals");
    let stream = format!("{terms}/tm-0123/stream");

    let a = emu
        .call("POST", &terms, Some(json!({"width": 80, "height": 24})))
        .await;
    assert_problem(&a, 404, NO_TERMINALS);
    let a = emu.call("GET", &stream, None).await;
    assert_problem(&a, 404, NO_TERMINALS);
    // Executions are unaffected.
    let (_, done) = emu.run(&id, &["/bin/true"]).await;
    assert_eq!(done["status"], "succeeded");

    let cfg = emu.configure(json!({"refuse_terminals": 501})).await;
    assert_eq!(cfg["refuse_terminals"], 501);
    let a = emu
        .call("POST", &terms, Some(json!({"width": 80, "height": 24})))
        .await;
    assert_problem(&a, 501, NO_TERMINALS);
    let a = emu.call("GET", &stream, None).await;
    assert_problem(&a, 501, NO_TERMINALS);

    // Off again: terminals work.
    let cfg = emu.configure(json!({"refuse_terminals": null})).await;
    assert_eq!(cfg["refuse_terminals"], Value::Null);
    let a = emu
        .call("POST", &terms, Some(json!({"width": 80, "height": 24})))
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(a.body["terminal_id"].is_string());

    let log = emu.requests().await;
    let statuses: Vec<u64> = logged(&log, "POST", &terms).iter().map(|e| e.0).collect();
    assert_eq!(statuses, vec![404, 501, 200]);
    let statuses: Vec<u64> = logged(&log, "GET", &stream).iter().map(|e| e.0).collect();
    assert_eq!(statuses, vec![404, 501]);

    // Also accepted as a string at run time, and "off"/false turn it off.
    let cfg = emu.configure(json!({"refuse_terminals": "404"})).await;
    assert_eq!(cfg["refuse_terminals"], 404);
    let cfg = emu.configure(json!({"refuse_terminals": false})).await;
    assert_eq!(cfg["refuse_terminals"], Value::Null);
}

#[tokio::test]
async fn id_format_switches_for_new_machines_only() {
    let emu = Emu::start(&["--id-format", "uuid"]);
    assert_eq!(emu.config().await["id_format"], "uuid");
    let uuid_id = emu.create("1h").await;
    assert!(is_uuid(&uuid_id), "{uuid_id}");

    let cfg = emu.configure(json!({"id_format": "dm"})).await;
    assert_eq!(cfg["id_format"], "dm");
    let dm_id = emu.create("1h").await;
    assert!(dm_id.starts_with("dm-") && dm_id.len() == 35, "{dm_id}");

    // The earlier id keeps working for every route.
    emu.wait_phase(&uuid_id, "running").await;
    emu.wait_phase(&dm_id, "running").await;
    let (_, done) = emu.run(&uuid_id, &["/bin/true"]).await;
    assert_eq!(done["status"], "succeeded");
    let a = emu
        .call("POST", &format!("/v1/machines/{uuid_id}/sleep"), None)
        .await;
    assert!(a.status == 200 || a.status == 202, "{}", a.body);
    emu.wait_phase(&uuid_id, "sleeping").await;

    emu.configure(json!({"id_format": "uuid"})).await;
    let again = emu.create("1h").await;
    assert!(is_uuid(&again), "{again}");
    let list = emu.call("GET", "/v1/machines", None).await.body;
    let ids: Vec<&str> = list["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|m| m["machine_id"].as_str())
        .collect();
    assert_eq!(ids, vec![uuid_id.as_str(), dm_id.as_str(), again.as_str()]);
    let a = emu
        .call("DELETE", &format!("/v1/machines/{uuid_id}"), None)
        .await;
    assert!(a.status == 200 || a.status == 202, "{}", a.body);
}

/// Checks a newer-shape mutation body: top-level `phase` and `revision`
/// (equal to the `ETag`), no `status`.
fn assert_newer(a: &Answer, phase_one_of: &[&str]) -> String {
    assert!(
        a.status == 200 || a.status == 202,
        "{} {}",
        a.status,
        a.body
    );
    assert!(a.body.get("status").is_none(), "{}", a.body);
    let phase = a.body["phase"].as_str().expect("top-level phase");
    assert!(
        phase_one_of.contains(&phase),
        "{phase} not in {phase_one_of:?}"
    );
    let rev = a.body["revision"].as_str().expect("top-level revision");
    assert_eq!(a.etag.as_deref(), Some(format!("\"{rev}\"").as_str()));
    assert!(a.body["machine_id"].is_string());
    assert!(a.body["desired_state"].is_string());
    assert!(a.body["autosleep_seconds"].is_u64());
    rev.to_owned()
}

#[tokio::test]
async fn response_shape_newer_by_flag_for_every_mutation_and_spec_at_run_time() {
    let emu = Emu::start(&["--response-shape", "newer"]);
    assert_eq!(emu.config().await["response_shape"], "newer");
    let a = emu
        .call(
            "POST",
            "/v1/machines",
            Some(json!({"vcpu": 1, "memory_mib": 512, "storage_gib": 5})),
        )
        .await;
    assert_newer(&a, &["accepted", "starting"]);
    assert_eq!(a.body["memory_mib"], 512);
    let id = a.body["machine_id"].as_str().expect("id").to_owned();
    let path = format!("/v1/machines/{id}");

    // GET keeps the spec's `status` object, list too.
    let m = emu.wait_phase(&id, "running").await;
    assert!(m.get("phase").is_none(), "{m}");
    assert!(m["status"]["revision"].is_string());
    let list = emu.call("GET", "/v1/machines", None).await.body;
    assert!(list["items"][0]["status"]["phase"].is_string());

    let a = emu
        .call("PATCH", &path, Some(json!({"autosleep": "2h"})))
        .await;
    assert_newer(&a, &["running"]);
    assert_eq!(a.body["autosleep_seconds"], 7200);
    let a = emu.call("POST", &format!("{path}/sleep"), None).await;
    assert_newer(&a, &["stopping", "sleeping"]);
    emu.wait_phase(&id, "sleeping").await;
    let a = emu.call("POST", &format!("{path}/wake"), None).await;
    let rev = assert_newer(&a, &["starting", "running"]);
    let m = emu.wait_phase(&id, "running").await;
    assert_ne!(m["status"]["revision"], rev, "revision moved on to running");

    // Back to the spec's shape at run time.
    let cfg = emu.configure(json!({"response_shape": "spec"})).await;
    assert_eq!(cfg["response_shape"], "spec");
    let a = emu.call("POST", &format!("{path}/wake"), None).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body["status"]["phase"], "running");
    assert!(a.body.get("phase").is_none());

    // And newer again, for delete.
    emu.configure(json!({"response_shape": "newer"})).await;
    let a = emu.call("DELETE", &path, None).await;
    assert_newer(&a, &["destroying", "destroyed"]);
    assert_eq!(a.body["desired_state"], "destroyed");
}

#[tokio::test]
async fn require_if_match_by_flag_and_at_run_time() {
    let emu = Emu::start(&["--require-if-match"]);
    assert_eq!(emu.config().await["require_if_match"], true);
    let id = emu.create("1h").await;
    let m = emu.wait_phase(&id, "running").await;
    let rev = m["status"]["revision"].as_str().expect("rev").to_owned();
    let path = format!("/v1/machines/{id}");

    for (method, p, body) in [
        ("POST", format!("{path}/wake"), None),
        ("POST", format!("{path}/sleep"), None),
        ("PATCH", path.clone(), Some(json!({"autosleep": "2h"}))),
        ("DELETE", path.clone(), None),
    ] {
        let a = emu.call(method, &p, body).await;
        assert_problem(&a, 428, "If-Match header is required");
    }
    // Reads, creates and executions need none.
    let (_, done) = emu.run(&id, &["/bin/true"]).await;
    assert_eq!(done["status"], "succeeded");

    // With If-Match (quoted, as the ETag) it goes through; stale is 409.
    let key = uuid::Uuid::now_v7().simple().to_string();
    let a = emu
        .call_with(
            "PATCH",
            &path,
            Some(json!({"autosleep": "2h"})),
            Some(&key),
            Some(&format!("\"{rev}\"")),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let a = emu
        .call_with("POST", &format!("{path}/sleep"), None, None, Some(&rev))
        .await;
    assert_eq!(a.status, 409, "{}", a.body);
    assert_eq!(a.body["error_code"], "REVISION_MISMATCH");

    let log = emu.requests().await;
    let statuses: Vec<u64> = logged(&log, "PATCH", &path).iter().map(|e| e.0).collect();
    assert_eq!(statuses, vec![428, 200]);
    assert_eq!(
        logged(&log, "DELETE", &path)
            .iter()
            .map(|e| e.0)
            .collect::<Vec<_>>(),
        vec![428]
    );

    // Off at run time: If-Match optional again.
    let cfg = emu.configure(json!({"require_if_match": false})).await;
    assert_eq!(cfg["require_if_match"], false);
    let a = emu.call("POST", &format!("{path}/sleep"), None).await;
    assert!(a.status == 200 || a.status == 202, "{}", a.body);

    // And on at run time on a default emulator.
    let emu = Emu::start(&[]);
    let id = emu.create("1h").await;
    emu.wait_phase(&id, "running").await;
    emu.configure(json!({"require_if_match": true})).await;
    let a = emu
        .call("POST", &format!("/v1/machines/{id}/wake"), None)
        .await;
    assert_problem(&a, 428, "If-Match header is required");
}

#[tokio::test]
async fn all_switches_together_and_bad_patches() {
    let emu = Emu::start(&[
        "--refuse-wake",
        "--refuse-sleep",
        "--refuse-terminals",
        "501",
        "--id-format",
        "uuid",
        "--response-shape",
        "newer",
        "--require-if-match",
    ]);
    let before = emu.config().await;
    assert_eq!(
        (
            &before["refuse_wake"],
            &before["refuse_sleep"],
            &before["refuse_terminals"],
            &before["id_format"],
            &before["response_shape"],
            &before["require_if_match"],
        ),
        (
            &json!(true),
            &json!(true),
            &json!(501),
            &json!("uuid"),
            &json!("newer"),
            &json!(true)
        )
    );
    let a = emu
        .call(
            "POST",
            "/v1/machines",
            Some(json!({"vcpu": 1, "memory_mib": 512, "storage_gib": 5, "autosleep": "1s"})),
        )
        .await;
    let rev = assert_newer(&a, &["accepted", "starting"]);
    let id = a.body["machine_id"].as_str().expect("id").to_owned();
    assert!(is_uuid(&id), "{id}");
    emu.wait_phase(&id, "running").await;
    // The refusal comes before the If-Match check.
    assert_signature_refusal(
        &emu.call("POST", &format!("/v1/machines/{id}/wake"), None)
            .await,
    );
    assert_signature_refusal(
        &emu.call_with(
            "POST",
            &format!("/v1/machines/{id}/sleep"),
            None,
            None,
            Some(&rev),
        )
        .await,
    );
    let a = emu
        .call(
            "POST",
            &format!("/v1/machines/{id}/terminals"),
            Some(json!({"width": 80, "height": 24})),
        )
        .await;
    assert_problem(&a, 501, NO_TERMINALS);
    emu.wait_phase(&id, "sleeping").await;
    let (first, done) = emu.run(&id, &["/bin/true"]).await;
    assert_eq!(first["status"], "wake_in_progress");
    assert_eq!(done["status"], "succeeded");

    // Bad patches are 422 and change nothing.
    for bad in [
        json!({"refuse_terminals": 403}),
        json!({"refuse_terminals": "sometimes"}),
        json!({"id_format": "ulid"}),
        json!({"response_shape": "newest"}),
        json!({"refuse_wake": "yes"}),
        json!({"refuse_everything": true}),
        json!({"hold_window_ms": 5, "refuse_terminals": 200}),
    ] {
        let a = emu.patch_config(bad.clone()).await;
        assert_eq!(a.status, 422, "{bad} → {}", a.body);
        assert_eq!(a.content_type, "application/problem+json");
    }
    assert_eq!(emu.config().await, before);

    // Everything off in one patch: spec behaviour again.
    let cfg = emu
        .configure(json!({
            "refuse_wake": false, "refuse_sleep": false, "refuse_terminals": null,
            "id_format": "dm", "response_shape": "spec", "require_if_match": false
        }))
        .await;
    assert_eq!(cfg["refuse_terminals"], Value::Null);
    let a = emu
        .call("POST", &format!("/v1/machines/{id}/wake"), None)
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["status"]["phase"], "running");
}

//! Drift switches: each one set by flag at start and by
//! `PATCH /_emulator/config` at run time, the answers it produces, and the
//! request log entries of refused calls.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use serde_json::{json, Value};

use common::{Answer, Emu};

const SIGNATURE: &str = "missing internal route signature";
const NO_TERMINALS: &str = "terminals are not available in this API version";

impl Emu {
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
    let emu = Emu::fresh(&[]);
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
    let emu = Emu::fresh(&["--refuse-wake", "--refuse-sleep"]);
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
    let (first, done) = emu.execute(&id, &["/bin/true"]).await;
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
    a.assert_accepted();
    assert_eq!(a.body["desired_state"], "sleeping");
    emu.wait_phase(&id, "sleeping").await;
    assert_signature_refusal(&emu.answer("POST", &wake_path, None).await);
    emu.configure(json!({"refuse_wake": false})).await;
    let a = emu.answer("POST", &wake_path, None).await;
    a.assert_accepted();
    emu.wait_phase(&id, "running").await;
}

#[tokio::test]
async fn refuse_wake_and_sleep_at_run_time_and_by_env() {
    let emu = Emu::fresh(&[]);
    let id = emu.create("1h").await;
    emu.wait_phase(&id, "running").await;
    let wake_path = format!("/v1/machines/{id}/wake");
    let sleep_path = format!("/v1/machines/{id}/sleep");

    let cfg = emu.configure(json!({"refuse_wake": true})).await;
    assert_eq!(cfg["refuse_wake"], true);
    assert_eq!(cfg["refuse_sleep"], false);
    // Wake of a running machine would be a 200 no-op; refused instead.
    assert_signature_refusal(&emu.answer("POST", &wake_path, None).await);
    let a = emu.answer("POST", &sleep_path, None).await;
    a.assert_accepted();
    emu.wait_phase(&id, "sleeping").await;

    emu.configure(json!({"refuse_sleep": true, "refuse_wake": false}))
        .await;
    let a = emu.answer("POST", &wake_path, None).await;
    a.assert_accepted();
    emu.wait_phase(&id, "running").await;
    assert_signature_refusal(&emu.answer("POST", &sleep_path, None).await);

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
    let emu = Emu::fresh_env(
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
    let emu = Emu::fresh(&["--refuse-terminals", "404"]);
    assert_eq!(emu.config().await["refuse_terminals"], 404);
    let id = emu.create("1h").await;
    emu.wait_phase(&id, "running").await;
    let terms = format!("/v1/machines/{id}/terminals");
    let stream = format!("{terms}/tm-0123/stream");

    let a = emu
        .answer("POST", &terms, Some(json!({"width": 80, "height": 24})))
        .await;
    assert_problem(&a, 404, NO_TERMINALS);
    let a = emu.answer("GET", &stream, None).await;
    assert_problem(&a, 404, NO_TERMINALS);
    // Executions are unaffected.
    let (_, done) = emu.execute(&id, &["/bin/true"]).await;
    assert_eq!(done["status"], "succeeded");

    let cfg = emu.configure(json!({"refuse_terminals": 501})).await;
    assert_eq!(cfg["refuse_terminals"], 501);
    let a = emu
        .answer("POST", &terms, Some(json!({"width": 80, "height": 24})))
        .await;
    assert_problem(&a, 501, NO_TERMINALS);
    let a = emu.answer("GET", &stream, None).await;
    assert_problem(&a, 501, NO_TERMINALS);

    // Off again: terminals work.
    let cfg = emu.configure(json!({"refuse_terminals": null})).await;
    assert_eq!(cfg["refuse_terminals"], Value::Null);
    let a = emu
        .answer("POST", &terms, Some(json!({"width": 80, "height": 24})))
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
    let emu = Emu::fresh(&["--id-format", "uuid"]);
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
    let (_, done) = emu.execute(&uuid_id, &["/bin/true"]).await;
    assert_eq!(done["status"], "succeeded");
    let a = emu
        .answer("POST", &format!("/v1/machines/{uuid_id}/sleep"), None)
        .await;
    a.assert_accepted();
    emu.wait_phase(&uuid_id, "sleeping").await;

    emu.configure(json!({"id_format": "uuid"})).await;
    let again = emu.create("1h").await;
    assert!(is_uuid(&again), "{again}");
    let list = emu.answer("GET", "/v1/machines", None).await.body;
    let ids: Vec<&str> = list["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|m| m["machine_id"].as_str())
        .collect();
    assert_eq!(ids, vec![uuid_id.as_str(), dm_id.as_str(), again.as_str()]);
    let a = emu
        .answer("DELETE", &format!("/v1/machines/{uuid_id}"), None)
        .await;
    a.assert_accepted();
}

/// Checks a newer-shape mutation body: top-level `phase` and `revision`
/// (equal to the `ETag`), no `status`.
fn assert_newer(a: &Answer, phase_one_of: &[&str]) -> String {
    a.assert_accepted();
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
    let emu = Emu::fresh(&["--response-shape", "newer"]);
    assert_eq!(emu.config().await["response_shape"], "newer");
    let a = emu
        .answer(
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
    let list = emu.answer("GET", "/v1/machines", None).await.body;
    assert!(list["items"][0]["status"]["phase"].is_string());

    let a = emu
        .answer("PATCH", &path, Some(json!({"autosleep": "2h"})))
        .await;
    assert_newer(&a, &["running"]);
    assert_eq!(a.body["autosleep_seconds"], 7200);
    let a = emu.answer("POST", &format!("{path}/sleep"), None).await;
    assert_newer(&a, &["stopping", "sleeping"]);
    emu.wait_phase(&id, "sleeping").await;
    let a = emu.answer("POST", &format!("{path}/wake"), None).await;
    let rev = assert_newer(&a, &["starting", "running"]);
    let m = emu.wait_phase(&id, "running").await;
    assert_ne!(m["status"]["revision"], rev, "revision moved on to running");

    // Back to the spec's shape at run time.
    let cfg = emu.configure(json!({"response_shape": "spec"})).await;
    assert_eq!(cfg["response_shape"], "spec");
    let a = emu.answer("POST", &format!("{path}/wake"), None).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body["status"]["phase"], "running");
    assert!(a.body.get("phase").is_none());

    // And newer again, for delete.
    emu.configure(json!({"response_shape": "newer"})).await;
    let a = emu.answer("DELETE", &path, None).await;
    assert_newer(&a, &["destroying", "destroyed"]);
    assert_eq!(a.body["desired_state"], "destroyed");
}

#[tokio::test]
async fn require_if_match_by_flag_and_at_run_time() {
    let emu = Emu::fresh(&["--require-if-match"]);
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
        let a = emu.answer(method, &p, body).await;
        assert_problem(&a, 428, "If-Match header is required");
    }
    // Reads, creates and executions need none.
    let (_, done) = emu.execute(&id, &["/bin/true"]).await;
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
    let a = emu.answer("POST", &format!("{path}/sleep"), None).await;
    a.assert_accepted();

    // And on at run time on a default emulator.
    let emu = Emu::fresh(&[]);
    let id = emu.create("1h").await;
    emu.wait_phase(&id, "running").await;
    emu.configure(json!({"require_if_match": true})).await;
    let a = emu
        .answer("POST", &format!("/v1/machines/{id}/wake"), None)
        .await;
    assert_problem(&a, 428, "If-Match header is required");
}

#[tokio::test]
async fn all_switches_together_and_bad_patches() {
    let emu = Emu::fresh(&[
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
        .answer(
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
        &emu.answer("POST", &format!("/v1/machines/{id}/wake"), None)
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
        .answer(
            "POST",
            &format!("/v1/machines/{id}/terminals"),
            Some(json!({"width": 80, "height": 24})),
        )
        .await;
    assert_problem(&a, 501, NO_TERMINALS);
    emu.wait_phase(&id, "sleeping").await;
    let (first, done) = emu.execute(&id, &["/bin/true"]).await;
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
        .answer("POST", &format!("/v1/machines/{id}/wake"), None)
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["status"]["phase"], "running");
}

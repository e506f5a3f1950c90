//! Every response body the emulator sends validates against the official
//! Dedalus Machines spec (except the newer fields docs/compatibility.md lists), on the
//! happy paths and on the error paths the product relies on.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use agenthome_tests::{spec, Emulator};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::time::Duration;

struct Wire<'a> {
    emu: &'a Emulator,
    checked: usize,
}

impl<'a> Wire<'a> {
    fn new(emu: &'a Emulator) -> Self {
        Wire { emu, checked: 0 }
    }

    /// Send a request and validate the response against the spec operation
    /// `template`; returns status, ETag and body.
    async fn call(
        &mut self,
        method: &str,
        template: &str,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> (u16, Option<String>, Value) {
        let (http, auth) = self.emu.raw();
        let url = format!("{}{}", self.emu.base_url, path);
        let mut req = http
            .request(method.parse().unwrap(), &url)
            .header("authorization", auth);
        if method != "GET" {
            req = req.header("idempotency-key", uuid::Uuid::now_v7().simple().to_string());
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let etag = resp
            .headers()
            .get("etag")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let ctype = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let text = resp.text().await.unwrap();
        let body: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{method} {path} {status}: body is not JSON ({e}): {text}"));
        spec::validate_response(method, template, status, &ctype, &body).unwrap_or_else(|e| {
            panic!("{method} {path} {status} violates the spec: {e}\nbody: {body}")
        });
        self.checked += 1;
        (status, etag, body)
    }

    async fn wait_phase(&mut self, id: &str, phase: &str) -> Value {
        let path = format!("/v1/machines/{id}");
        for _ in 0..200 {
            let (_, _, m) = self
                .call("GET", "/v1/machines/{machine_id}", &path, None, &[])
                .await;
            if m["status"]["phase"] == phase {
                return m;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("machine {id} never reached {phase}");
    }

    /// Creates a small machine (its answer checked) and waits until it
    /// runs; its id.
    async fn running_machine(&mut self) -> String {
        let (_, _, created) = self
            .call(
                "POST",
                "/v1/machines",
                "/v1/machines",
                Some(json!({"vcpu": 1, "memory_mib": 512, "storage_gib": 5})),
                &[],
            )
            .await;
        let id = created["machine_id"].as_str().unwrap().to_string();
        self.wait_phase(&id, "running").await;
        id
    }
}

#[tokio::test]
async fn machine_lifecycle_responses_match_the_spec() {
    // GIVEN an emulator with a hold window, so sleep is refused at first
    let emu = Emulator::start_with(&["--hold-window", "1h"]).await;
    let mut w = Wire::new(&emu);

    // WHEN we walk through the machine routes
    let (s, etag, created) = w
        .call(
            "POST",
            "/v1/machines",
            "/v1/machines",
            Some(json!({"vcpu": 1, "memory_mib": 1024, "storage_gib": 10, "autosleep": "30m"})),
            &[],
        )
        .await;
    assert!(s == 200 || s == 202, "create answered {s}");
    assert!(etag.is_some(), "create sends an ETag");
    assert_eq!(created["autosleep_seconds"], 1800);
    let id = created["machine_id"].as_str().unwrap().to_string();
    let m = w.wait_phase(&id, "running").await;
    let path = format!("/v1/machines/{id}");

    let (s, _, page) = w
        .call("GET", "/v1/machines", "/v1/machines?limit=10", None, &[])
        .await;
    assert_eq!(s, 200);
    assert_eq!(page["items"].as_array().unwrap().len(), 1);

    let (s, _, _) = w
        .call(
            "PATCH",
            "/v1/machines/{machine_id}",
            &path,
            Some(json!({"memory_mib": 2048})),
            &[],
        )
        .await;
    assert!(s == 200 || s == 202);

    // stale If-Match → 409 REVISION_MISMATCH
    let stale = m["status"]["revision"].as_str().unwrap().to_string();
    let (s, _, err) = w
        .call(
            "POST",
            "/v1/machines/{machine_id}/sleep",
            &format!("{path}/sleep"),
            None,
            &[("if-match", &stale)],
        )
        .await;
    assert_eq!(
        (s, err["error_code"].as_str()),
        (409, Some("REVISION_MISMATCH"))
    );

    // sleep inside the hold window → 409 SLEEP_HOLD_WINDOW_ACTIVE
    let (s, _, err) = w
        .call(
            "POST",
            "/v1/machines/{machine_id}/sleep",
            &format!("{path}/sleep"),
            None,
            &[],
        )
        .await;
    assert_eq!(s, 409);
    assert_eq!(err["error_code"], "SLEEP_HOLD_WINDOW_ACTIVE");
    assert_eq!(err["retryable"], true);
    assert!(err["retry_after_ms"].as_i64().unwrap() > 0);
    assert!(err["details"]["next_sleep_eligible_at"].is_string());

    // outside the hold window, sleep works; wake works
    emu.configure(json!({"hold_window_ms": 0, "hold_jitter_ms": 0}))
        .await;
    let (s, _, _) = w
        .call(
            "POST",
            "/v1/machines/{machine_id}/sleep",
            &format!("{path}/sleep"),
            None,
            &[],
        )
        .await;
    assert!(s == 200 || s == 202, "sleep answered {s}");
    w.wait_phase(&id, "sleeping").await;
    let (s, _, _) = w
        .call(
            "POST",
            "/v1/machines/{machine_id}/wake",
            &format!("{path}/wake"),
            None,
            &[],
        )
        .await;
    assert!(s == 200 || s == 202, "wake answered {s}");
    w.wait_phase(&id, "running").await;

    // the status stream's events are full machine objects
    let (http, auth) = emu.raw();
    let resp = http
        .get(format!("{}{path}/status/stream", emu.base_url))
        .header("authorization", auth)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = tokio::time::timeout(Duration::from_secs(10), resp.text())
        .await
        .expect("the stream closes once the machine is at its desired state")
        .unwrap();
    let mut events = 0;
    for block in text.split("\n\n") {
        let data: String = block
            .lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .map(str::trim)
            .collect();
        if data.is_empty() {
            continue;
        }
        assert!(block.contains("event: status"), "event name: {block}");
        let v: Value = serde_json::from_str(&data).unwrap();
        spec::validate_response(
            "GET",
            "/v1/machines/{machine_id}/status/stream",
            200,
            "text/event-stream",
            &v,
        )
        .unwrap();
        events += 1;
    }
    assert!(events >= 1, "at least one status event: {text}");

    // delete, then 404 as problem+json
    let (s, _, _) = w
        .call("DELETE", "/v1/machines/{machine_id}", &path, None, &[])
        .await;
    assert!(s == 200 || s == 202);
    let mut gone = false;
    for _ in 0..200 {
        let (s, _, _) = w
            .call("GET", "/v1/machines/{machine_id}", &path, None, &[])
            .await;
        if s == 404 {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(gone, "a destroyed machine answers 404");
    assert!(w.checked >= 12);
}

#[tokio::test]
async fn error_bodies_match_the_spec() {
    // GIVEN a running machine
    let emu = Emulator::start().await;
    let mut w = Wire::new(&emu);
    let id = w.running_machine().await;
    let (http, _) = emu.raw();

    // WHEN the key is missing or wrong THEN 401 AUTH_REQUIRED / AUTH_INVALID
    for (auth, code) in [
        (None, "AUTH_REQUIRED"),
        (Some("Bearer nope"), "AUTH_INVALID"),
    ] {
        let mut req = http.get(format!("{}/v1/machines", emu.base_url));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 401);
        let ctype = resp.headers()["content-type"].to_str().unwrap().to_string();
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error_code"], code);
        spec::validate_response("GET", "/v1/machines", 401, &ctype, &body).unwrap();
    }
    // x-api-key works as well as Bearer
    let resp = http
        .get(format!("{}/v1/machines", emu.base_url))
        .header("x-api-key", &emu.api_key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    // WHEN an Idempotency-Key is reused with another body THEN 409
    let key = uuid::Uuid::now_v7().simple().to_string();
    let (_, auth) = emu.raw();
    let mut replies = vec![];
    for mem in [512, 512, 1024] {
        let resp = http
            .post(format!("{}/v1/machines", emu.base_url))
            .header("authorization", &auth)
            .header("idempotency-key", &key)
            .json(&json!({"vcpu": 1, "memory_mib": mem, "storage_gib": 5}))
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let ctype = resp.headers()["content-type"].to_str().unwrap().to_string();
        let body: Value = resp.json().await.unwrap();
        spec::validate_response("POST", "/v1/machines", status, &ctype, &body).unwrap();
        replies.push((status, body));
    }
    assert_eq!(
        replies[0].1["machine_id"], replies[1].1["machine_id"],
        "same key + same body replays the first response"
    );
    assert_eq!(replies[2].0, 409);
    assert_eq!(replies[2].1["error_code"], "IDEMPOTENCY_KEY_REUSED");
    assert_eq!(replies[2].1["retryable"], false);

    // WHEN faults inject 429 and 503 THEN the bodies still match the spec
    for (status, code) in [(429, "RATE_LIMITED"), (503, "DEPENDENCY_UNAVAILABLE")] {
        emu.inject_fault(json!({
            "method": "GET", "path": "/v1/machines/*", "times": 1,
            "status": status, "error_code": code, "message": "injected",
            "retryable": true, "retry_after_ms": 40
        }))
        .await;
        let (s, _, body) = w
            .call(
                "GET",
                "/v1/machines/{machine_id}",
                &format!("/v1/machines/{id}"),
                None,
                &[],
            )
            .await;
        assert_eq!(s, status);
        assert_eq!(body["error_code"], code);
        assert_eq!(body["retry_after_ms"], 40);
    }

    // WHEN a body is malformed THEN a 4xx problem+json, not a 5xx
    let resp = http
        .post(format!("{}/v1/machines", emu.base_url))
        .header("authorization", &auth)
        .header("idempotency-key", uuid::Uuid::now_v7().simple().to_string())
        .header("content-type", "application/json")
        .body("{\"vcpu\": \"lots\"")
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_client_error(), "{}", resp.status());
}

#[tokio::test]
async fn execution_and_terminal_responses_match_the_spec() {
    // GIVEN a running machine
    let emu = Emulator::start().await;
    let mut w = Wire::new(&emu);
    let id = w.running_machine().await;
    let base = format!("/v1/machines/{id}");

    // WHEN we run an execution and read it back
    let (s, _, ex) = w
        .call(
            "POST",
            "/v1/machines/{machine_id}/executions",
            &format!("{base}/executions"),
            Some(json!({"command": ["bash", "-c", "echo out; echo err >&2; exit 3"], "timeout_ms": 10000})),
            &[],
        )
        .await;
    assert_eq!(s, 200);
    let eid = ex["execution_id"].as_str().unwrap().to_string();
    let mut done = Value::Null;
    for _ in 0..200 {
        let (_, _, e) = w
            .call(
                "GET",
                "/v1/machines/{machine_id}/executions/{execution_id}",
                &format!("{base}/executions/{eid}"),
                None,
                &[],
            )
            .await;
        if e["status"] == "failed" || e["status"] == "succeeded" {
            done = e;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // THEN the status, exit code and output are as the process left them
    assert_eq!(done["status"], "failed");
    assert_eq!(done["exit_code"], 3);
    let (_, _, out) = w
        .call(
            "GET",
            "/v1/machines/{machine_id}/executions/{execution_id}/output",
            &format!("{base}/executions/{eid}/output"),
            None,
            &[],
        )
        .await;
    assert_eq!(out["stdout"], "out\n");
    assert_eq!(out["stderr"], "err\n");
    w.call(
        "GET",
        "/v1/machines/{machine_id}/executions/{execution_id}/events",
        &format!("{base}/executions/{eid}/events"),
        None,
        &[],
    )
    .await;
    w.call(
        "GET",
        "/v1/machines/{machine_id}/executions",
        &format!("{base}/executions"),
        None,
        &[],
    )
    .await;

    // WHEN we open a terminal and talk to it over the WebSocket
    let (s, _, term) = w
        .call(
            "POST",
            "/v1/machines/{machine_id}/terminals",
            &format!("{base}/terminals"),
            Some(json!({"width": 80, "height": 24})),
            &[],
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(term["status"], "ready");
    let tid = term["terminal_id"].as_str().unwrap().to_string();
    w.call(
        "GET",
        "/v1/machines/{machine_id}/terminals/{terminal_id}",
        &format!("{base}/terminals/{tid}"),
        None,
        &[],
    )
    .await;
    w.call(
        "GET",
        "/v1/machines/{machine_id}/terminals",
        &format!("{base}/terminals"),
        None,
        &[],
    )
    .await;

    let ws_url = format!(
        "{}{base}/terminals/{tid}/stream",
        emu.base_url.replacen("http://", "ws://", 1)
    );
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
            ws_url.as_str(),
        )
        .unwrap();
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {}", emu.api_key).parse().unwrap(),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let input = json!({"type": "input", "data": b64.encode("echo spec-$((6*7))\n")});
    spec::validate_component("TerminalInputEvent", &input).unwrap();
    ws.send(tokio_tungstenite::tungstenite::Message::text(
        input.to_string(),
    ))
    .await
    .unwrap();
    let mut seen = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !seen.contains("spec-42") {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("terminal output within 10 s")
            .expect("stream open")
            .unwrap();
        if let tokio_tungstenite::tungstenite::Message::Text(t) = msg {
            let frame: Value = serde_json::from_str(&t).unwrap();
            spec::validate_component("TerminalServerEvent", &frame)
                .unwrap_or_else(|e| panic!("frame {frame} violates the spec: {e}"));
            if frame["type"] == "output" {
                let bytes = b64.decode(frame["data"].as_str().unwrap()).unwrap();
                seen.push_str(&String::from_utf8_lossy(&bytes));
            }
        }
    }
    // THEN deleting the terminal answers per the spec
    let (s, _, _) = w
        .call(
            "DELETE",
            "/v1/machines/{machine_id}/terminals/{terminal_id}",
            &format!("{base}/terminals/{tid}"),
            None,
            &[],
        )
        .await;
    assert_eq!(s, 200);
}

//! Benchmark 5: the emulator as its history grows.
//!
//! Three emulators (zero injected latency), filled first, then sampled in
//! turn — one sample on each per round, so load from the rest of the host
//! hits all three alike:
//! - **early**: one machine with `early` executions;
//! - **late**: one machine with `late` executions;
//! - **many**: `machines` machines with `per_machine` executions each;
//!   samples go round-robin over them.
//!
//! Each timed sample is a status read (`GET /v1/machines/{id}`) and one
//! execution (`POST …/executions`, argv `["true"]`), then an untimed wait
//! until that execution ended, so a history grows by one execution per
//! sample. Filling runs `fill_concurrency` clients in parallel (each waits
//! for its execution to end), untimed.

use crate::stats::{ms, summarize, Summary};
use agenthome_tests::Emulator;
use serde_json::{json, Value};
use std::time::Duration;
use tokio::time::Instant;

/// Sizes of one run.
#[derive(Debug, Clone, Copy)]
pub struct ScaleParams {
    /// Executions on the machine before the early stage.
    pub early: usize,
    /// Executions on the machine before the late stage.
    pub late: usize,
    /// Machines of the "many" emulator.
    pub machines: usize,
    /// Executions on each of them.
    pub per_machine: usize,
    /// Timed samples per stage.
    pub samples: usize,
    /// Parallel clients while filling.
    pub fill_concurrency: usize,
}

/// Latencies of one stage.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stage {
    /// Executions on the measured machine when the stage started.
    pub history: usize,
    /// `POST …/executions` (ms).
    pub post: Summary,
    /// `GET /v1/machines/{id}` (ms).
    pub get: Summary,
}

/// Results of [`run`].
#[derive(Debug, Clone, Copy, Default)]
pub struct ScaleResults {
    /// After `early` executions.
    pub early: Stage,
    /// After `late` executions.
    pub late: Stage,
    /// With `machines` machines.
    pub many: Stage,
    /// Wall time of the whole run (s).
    pub wall_s: f64,
}

/// A thin client for the emulator's `/v1` routes.
#[derive(Clone)]
pub struct Api {
    http: reqwest::Client,
    auth: String,
    base: String,
}

impl Api {
    /// A client for `emu`.
    pub fn new(emu: &Emulator) -> Api {
        let (http, auth) = emu.raw();
        Api {
            http: http.clone(),
            auth,
            base: emu.base_url.clone(),
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.base))
            .header("authorization", &self.auth);
        if method != reqwest::Method::GET {
            req = req.header("idempotency-key", uuid::Uuid::now_v7().simple().to_string());
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("emulator request");
        let status = resp.status();
        let v: Value = resp.json().await.expect("emulator json");
        assert!(status.is_success(), "{method} {path}: {status} {v}");
        v
    }

    /// `GET /v1/machines/{id}`.
    pub async fn machine(&self, id: &str) -> Value {
        self.call(reqwest::Method::GET, &format!("/v1/machines/{id}"), None)
            .await
    }

    /// Creates a machine and waits until it runs; returns its id.
    pub async fn running_machine(&self) -> String {
        let m = self
            .call(
                reqwest::Method::POST,
                "/v1/machines",
                Some(json!({"vcpu": 1, "memory_mib": 512, "storage_gib": 5, "autosleep": "never"})),
            )
            .await;
        let id = m["machine_id"].as_str().expect("machine id").to_owned();
        for _ in 0..2000 {
            if self.machine(&id).await["status"]["phase"] == "running" {
                return id;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("machine {id} never ran");
    }

    /// `POST …/executions` of `["true"]`; returns the execution id.
    pub async fn start_execution(&self, machine_id: &str) -> String {
        let e = self
            .call(
                reqwest::Method::POST,
                &format!("/v1/machines/{machine_id}/executions"),
                Some(json!({"command": ["true"]})),
            )
            .await;
        e["execution_id"].as_str().expect("execution id").to_owned()
    }

    /// Polls until the execution ended.
    pub async fn wait_execution(&self, machine_id: &str, execution_id: &str) {
        let path = format!("/v1/machines/{machine_id}/executions/{execution_id}");
        for _ in 0..5000 {
            let e = self.call(reqwest::Method::GET, &path, None).await;
            if matches!(
                e["status"].as_str(),
                Some("succeeded" | "failed" | "cancelled" | "expired")
            ) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        panic!("execution {execution_id} never ended");
    }

    /// One untimed execution, to its end.
    pub async fn execute(&self, machine_id: &str) {
        let id = self.start_execution(machine_id).await;
        self.wait_execution(machine_id, &id).await;
    }
}

/// Runs `count` untimed executions on `machine_id`, `concurrency` at a time.
async fn fill(api: &Api, machine_id: &str, count: usize, concurrency: usize) {
    let concurrency = concurrency.max(1);
    let mut workers = Vec::new();
    for w in 0..concurrency {
        let api = api.clone();
        let machine_id = machine_id.to_owned();
        let n = count / concurrency + usize::from(w < count % concurrency);
        workers.push(tokio::spawn(async move {
            for _ in 0..n {
                api.execute(&machine_id).await;
            }
        }));
    }
    for w in workers {
        w.await.expect("fill worker");
    }
}

/// Timed samples of one stage.
#[derive(Default)]
struct Samples {
    posts: Vec<f64>,
    gets: Vec<f64>,
}

impl Samples {
    /// One timed status read and execution on `machine_id`, then an
    /// untimed wait for the execution's end.
    async fn take(&mut self, api: &Api, machine_id: &str) {
        let t = Instant::now();
        api.machine(machine_id).await;
        self.gets.push(ms(t.elapsed()));
        let t = Instant::now();
        let eid = api.start_execution(machine_id).await;
        self.posts.push(ms(t.elapsed()));
        api.wait_execution(machine_id, &eid).await;
    }

    fn stage(&self, history: usize) -> Stage {
        Stage {
            history,
            post: summarize(&self.posts),
            get: summarize(&self.gets),
        }
    }
}

/// A fresh emulator with one running machine and `executions` on it.
async fn filled(args: &[&str], executions: usize, concurrency: usize) -> (Emulator, Api, String) {
    let emu = Emulator::start_with(args).await;
    let api = Api::new(&emu);
    let id = api.running_machine().await;
    fill(&api, &id, executions, concurrency).await;
    (emu, api, id)
}

/// Runs the three stages (see the module docs) on emulators started with
/// `emulator_args`.
pub async fn run(p: ScaleParams, emulator_args: &[&str]) -> ScaleResults {
    let started = Instant::now();
    let (_early_emu, early_api, early_id) =
        filled(emulator_args, p.early, p.fill_concurrency).await;
    let (_late_emu, late_api, late_id) = filled(emulator_args, p.late, p.fill_concurrency).await;
    let (_many_emu, many_api, first) =
        filled(emulator_args, p.per_machine, p.fill_concurrency).await;
    let mut many = vec![first];
    for _ in 1..p.machines {
        let id = many_api.running_machine().await;
        fill(&many_api, &id, p.per_machine, p.fill_concurrency).await;
        many.push(id);
    }

    let (mut early, mut late, mut wide) =
        (Samples::default(), Samples::default(), Samples::default());
    for i in 0..p.samples {
        early.take(&early_api, &early_id).await;
        late.take(&late_api, &late_id).await;
        wide.take(&many_api, &many[i % many.len()]).await;
    }
    ScaleResults {
        early: early.stage(p.early),
        late: late.stage(p.late),
        many: wide.stage(p.per_machine),
        wall_s: started.elapsed().as_secs_f64(),
    }
}

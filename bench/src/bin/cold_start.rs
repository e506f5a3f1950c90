//! Benchmark 2: cold start. `cold_start [--runs 10] [--profile debug|release]`.
//!
//! Each function binary is started with the environment it needs and a fake
//! Lambda runtime API on loopback (`agenthome_bench::runtime_api`, in this
//! process); the init time is from `spawn` to the binary's first
//! `GET /2018-06-01/runtime/invocation/next`. The child is then killed
//! (no event is ever delivered). Nothing leaves loopback: the configured
//! DynamoDB/Lambda/Dedalus endpoints are closed loopback ports and init makes
//! no calls to them.

use agenthome_bench::runtime_api::{FakeLambda, FunctionEnv};
use agenthome_bench::stats::{ms, summarize};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::time::Instant;

const FUNCTIONS: &[&str] = &["chat-turn", "provision", "sleep-sweep"];

fn target_dir(profile: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let debug_dir = exe.parent().expect("bin dir").to_path_buf();
    debug_dir
        .parent()
        .map(|t| t.join(profile))
        .unwrap_or(debug_dir)
}

/// Spawn `bin` once; the time until it asks for its first event.
async fn once(bin: &Path, name: &str) -> Option<Duration> {
    let lambda = FakeLambda::start().await.expect("bind loopback");
    let env = FunctionEnv::new(name, lambda.addr()).set("AWS_LAMBDA_LOG_STREAM_NAME", "bench");
    let started = Instant::now();
    let mut child = env.spawn(&[], bin, None).expect("spawn function binary");
    let got = lambda.first_poll(Duration::from_secs(10)).await;
    let _ = child.kill().await;
    got.map(|at| at.duration_since(started))
}

#[tokio::main]
async fn main() {
    let runs: usize = agenthome_bench::arg("--runs", 10);
    let profile: String = agenthome_bench::arg("--profile", "debug".to_string());
    let dir = target_dir(&profile);
    println!("## 2. Cold start\n");
    println!(
        "`{profile}` binaries in `{}`; {runs} starts each, from `spawn` to the first `GET /2018-06-01/runtime/invocation/next` on a fake runtime API on loopback. Target: init < 40 ms.\n",
        dir.display()
    );
    println!(
        "| function | size (MiB) | init p50 ms | init p95 ms | target |\n|---|---|---|---|---|"
    );
    for name in FUNCTIONS {
        let bin = dir.join(name);
        let size = std::fs::metadata(&bin).map(|m| m.len()).unwrap_or(0);
        if size == 0 {
            println!("| {name} | missing | – | – | – |");
            continue;
        }
        // One untimed start warms the page cache.
        let _ = once(&bin, name).await;
        let mut sample = Vec::with_capacity(runs);
        for _ in 0..runs {
            if let Some(d) = once(&bin, name).await {
                sample.push(ms(d));
            }
        }
        let s = summarize(&sample);
        let met = if s.n == runs && s.p50 < 40.0 {
            "met"
        } else {
            "MISSED"
        };
        println!(
            "| {name} | {:.1} | {:.1} | {:.1} | {met}{} |",
            size as f64 / 1048576.0,
            s.p50,
            s.p95,
            if s.n < runs {
                format!(
                    " ({} of {runs} starts never asked for an event)",
                    runs - s.n
                )
            } else {
                String::new()
            }
        );
    }
    println!();
}

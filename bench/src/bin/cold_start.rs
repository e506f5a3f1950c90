//! Benchmark 2: cold start. `cold_start [--runs 10] [--profile debug|release]`.
//!
//! Each function binary is started with the environment it needs and a fake
//! Lambda runtime API on loopback (a tiny HTTP server in this process); the
//! init time is from `spawn` to the binary's first
//! `GET /2018-06-01/runtime/invocation/next`. The child is then killed
//! (no event is ever delivered). Nothing leaves loopback: the configured
//! DynamoDB/Lambda/Dedalus endpoints are closed loopback ports and init makes
//! no calls to them.

use agenthome_bench::stats::{ms, summarize};
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

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
fn once(bin: &PathBuf, name: &str) -> Option<Duration> {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let port = listener.local_addr().expect("addr").port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        if let Ok((stream, _)) = listener.accept() {
            let at = Instant::now();
            let mut line = String::new();
            let _ = BufReader::new(&stream).read_line(&mut line);
            let _ = tx.send((at, line));
            // Never answer: the runtime keeps waiting for an event.
            std::thread::sleep(Duration::from_secs(2));
        }
    });
    let started = Instant::now();
    let mut child = Command::new(bin)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("AWS_LAMBDA_RUNTIME_API", format!("127.0.0.1:{port}"))
        .env("AWS_LAMBDA_FUNCTION_NAME", name)
        .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128")
        .env("AWS_LAMBDA_LOG_GROUP_NAME", format!("/aws/lambda/{name}"))
        .env("AWS_LAMBDA_LOG_STREAM_NAME", "bench")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_ENDPOINT_URL_DYNAMODB", "http://127.0.0.1:9")
        .env("AWS_ENDPOINT_URL_LAMBDA", "http://127.0.0.1:9")
        .env("TABLE_NAME", "bench")
        .env("DEDALUS_BASE_URL", "http://127.0.0.1:9")
        .env("DEDALUS_API_KEY", "bench-key")
        .env("AGENT_MODEL", "shell")
        .env("AUTH_MODE", "iam")
        .env("PROVISION_FUNCTION", "provision")
        .env("BOOTSTRAP_SCRIPT", "true")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn function binary");
    let got = rx.recv_timeout(Duration::from_secs(10)).ok();
    let _ = child.kill();
    let _ = child.wait();
    got.filter(|(_, line)| line.contains("/2018-06-01/runtime/invocation/next"))
        .map(|(at, _)| at.duration_since(started))
}

fn main() {
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
        let _ = once(&bin, name);
        let sample: Vec<f64> = (0..runs).filter_map(|_| once(&bin, name)).map(ms).collect();
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

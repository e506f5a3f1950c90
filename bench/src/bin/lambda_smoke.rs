//! Smoke test of built Lambda binaries (`scripts/lambda-smoke`; the cases
//! are in `agenthome_bench::smoke`).
//!
//! ```text
//! lambda_smoke --chat-turn PATH --provision PATH --sleep-sweep PATH
//!              --ddb-url http://127.0.0.1:PORT --table NAME --events DIR
//!              [--runner "qemu-aarch64 -L /usr/aarch64-linux-gnu"] [--logs DIR]
//!              [--timeout SECONDS]
//! ```
//!
//! Prints one Markdown row per case (init time, answer time) and exits 1 if
//! any case fails.

use agenthome_bench::smoke::{run_all, Run, HEADER};
use std::path::PathBuf;
use std::time::Duration;

fn required(name: &str) -> String {
    let v: String = agenthome_bench::arg(name, String::new());
    if v.is_empty() {
        eprintln!("lambda_smoke: {name} is required (see the usage at the top of lambda_smoke.rs)");
        std::process::exit(2);
    }
    v
}

#[tokio::main]
async fn main() {
    let bins: Vec<(&str, PathBuf)> = ["chat-turn", "provision", "sleep-sweep"]
        .into_iter()
        .map(|f| (f, PathBuf::from(required(&format!("--{f}")))))
        .collect();
    let run = Run {
        runner: agenthome_bench::arg("--runner", String::new())
            .split_whitespace()
            .map(str::to_owned)
            .collect(),
        ddb_url: required("--ddb-url"),
        table: required("--table"),
        logs: PathBuf::from(agenthome_bench::arg(
            "--logs",
            std::env::temp_dir().display().to_string(),
        )),
        timeout: Duration::from_secs(agenthome_bench::arg("--timeout", 60)),
    };
    let events = PathBuf::from(required("--events"));
    let (rows, ok) = run_all(&run, &bins, &events).await;
    println!("{HEADER}");
    for row in rows {
        println!("{row}");
    }
    if !ok {
        eprintln!("lambda_smoke: a case failed");
        std::process::exit(1);
    }
}

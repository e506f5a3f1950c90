//! The function binaries as Lambda runs them: each debug binary
//! (`target/debug/<name>`, built by `cargo build --workspace --bins`, as
//! `scripts/test` does first) polls the fake runtime API, takes one event
//! and answers it correctly, with moto as DynamoDB
//! (`agenthome_bench::smoke`). `scripts/lambda-smoke` runs the same cases on
//! the release bootstraps `scripts/sam-build` makes (arm64 under qemu).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use agenthome_bench::smoke::{run_all, Run, HEADER};
use agenthome_tests::{unique_table_name, workspace_root, Moto};
use std::path::PathBuf;
use std::time::Duration;

/// `target/debug`: this test runs from `target/debug/deps`.
fn debug_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(|deps| deps.parent())
        .expect("target/debug")
        .to_path_buf()
}

#[tokio::test]
async fn given_the_debug_binaries_when_each_takes_one_event_then_each_answers_it() {
    let dir = debug_dir();
    let bins: Vec<(&str, PathBuf)> = ["chat-turn", "provision", "sleep-sweep"]
        .into_iter()
        .map(|name| {
            let bin = dir.join(name);
            assert!(
                bin.exists(),
                "{} is missing: run `cargo build --workspace --bins` first",
                bin.display()
            );
            (name, bin)
        })
        .collect();
    let moto = Moto::shared().await;
    let table = unique_table_name("smoke");
    agenthome::store::create_table(&moto.dynamodb_client().await, &table)
        .await
        .expect("create the table");
    let logs = tempfile::tempdir().expect("tempdir");
    let run = Run {
        runner: Vec::new(),
        ddb_url: moto.endpoint.clone(),
        table,
        logs: logs.path().to_path_buf(),
        timeout: Duration::from_secs(30),
    };
    let (rows, ok) = run_all(&run, &bins, &workspace_root().join("events")).await;
    let report = format!("{HEADER}\n{}", rows.join("\n"));
    println!("{report}");
    assert!(ok, "{report}");
    assert_eq!(rows.len(), 4, "{report}");
}

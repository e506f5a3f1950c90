//! Benchmark 1: turn overhead. `turn_overhead [--turns 30] [--warmup 3]`;
//! prints a Markdown section (see docs/benchmarks.md).

use agenthome_bench::turn::{self, LatencyRow, Series, LATENCIES};

/// Targets of a warm turn (issue "a lean warm turn").
const MAX_TABLE_CALLS: f64 = 2.0;
const MAX_DEDALUS_BEFORE_FIRST: f64 = 2.0;
const MAX_DEDALUS_SHELL: f64 = 3.0;
const MAX_RATIO_AT_50MS: f64 = 1.3;

fn row(name: &str, s: &Series, floor: &Series) -> String {
    format!(
        "| {name} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2}× | {:.1} | {:.1} | {:.2}× | {:.1} | {:.1} | {:.1} |",
        s.first_command.p50,
        s.first_command.p95,
        s.total.p50,
        s.total.p95,
        s.total.p50 / floor.total.p50.max(1e-9),
        s.table_ms.p50,
        s.total_without_table.p50,
        s.total_without_table.p50 / floor.total.p50.max(1e-9),
        s.table_calls,
        s.dedalus,
        s.dedalus_before_first,
    )
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}

fn print_row(r: &LatencyRow) {
    println!("| **{} ms** | | | | | | | | | | | |", r.latency_ms);
    println!("{}", row("shell turn", &r.shell, &r.floor));
    println!("{}", row("agent turn, one tool call", &r.agent, &r.floor));
    println!(
        "{}",
        row(
            "floor: status read + command on an open terminal",
            &r.floor,
            &r.floor
        )
    );
}

#[tokio::main]
async fn main() {
    agenthome_bench::locate_emulator();
    let turns: usize = agenthome_bench::arg("--turns", 30);
    let warmup: usize = agenthome_bench::arg("--warmup", 3);
    let r = turn::run(turns, warmup, LATENCIES).await;
    println!("## 1. Turn overhead\n");
    println!(
        "{turns} timed rounds per latency after {warmup} warm-up rounds; in each round a shell-mode turn, an agent turn with one tool call (scripted model on loopback) and the floor run in turn, on warm machines, through the chat-turn handler in-process (API Gateway v2 event → `Service::handle`); table on moto (serialized); every `/v1` request to the emulator (HTTP and WebSocket connect) delayed by the injected latency. Times in ms; `× floor` compares the total p50s; `table` is the time in the table (moto: single-threaded, tens of ms a call under load; DynamoDB answers single-item calls in a few ms), `net` the total without it.\n"
    );
    println!("| series | first command p50 | p95 | total p50 | p95 | × floor | table p50 | net p50 | net × floor | table calls | Dedalus requests | before first command |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for row in &r.rows {
        print_row(row);
    }
    println!();
    for row in &r.rows {
        let worst = |f: fn(&Series) -> f64| f(&row.shell).max(f(&row.agent));
        let table = worst(|s| s.table_calls_max as f64);
        let before = worst(|s| s.dedalus_before_first_max as f64);
        let shell = row.shell.dedalus_max as f64;
        println!(
            "- {} ms: most table calls in a turn {table} (target ≤ {MAX_TABLE_CALLS}: {}); most Dedalus requests before the first command {before} (≤ {MAX_DEDALUS_BEFORE_FIRST}: {}); most Dedalus requests in a shell turn {shell} (≤ {MAX_DEDALUS_SHELL}: {}).",
            row.latency_ms,
            verdict(table <= MAX_TABLE_CALLS),
            verdict(before <= MAX_DEDALUS_BEFORE_FIRST),
            verdict(shell <= MAX_DEDALUS_SHELL),
        );
        if row.latency_ms == 50 {
            let floor = row.floor.total.p50.max(1e-9);
            let ratio = row.shell.total.p50 / floor;
            let net = row.shell.total_without_table.p50 / floor;
            println!(
                "- 50 ms: shell turn total p50 / floor total p50 = **{ratio:.2}×**, without the time in the table **{net:.2}×** (target ≤ {MAX_RATIO_AT_50MS}: {} / {}).",
                verdict(ratio <= MAX_RATIO_AT_50MS),
                verdict(net <= MAX_RATIO_AT_50MS)
            );
        }
    }
    println!(
        "- Peak RSS (`VmHWM` of the bench process: both handlers in-process, the floor's client and the harness; an upper bound for a chat-turn process): {:.1} MiB after setup, **{:.1} MiB** after all turns — target fits 128 MB.",
        r.hwm_after_setup_kb as f64 / 1024.0,
        r.hwm_after_turns_kb as f64 / 1024.0
    );
    println!();
}

//! Benchmark 1: turn overhead. `turn_overhead [--turns 200] [--warmup 10]`;
//! prints a Markdown section (see docs/benchmarks.md).

use agenthome_bench::stats::Summary;
use agenthome_bench::turn::{self, total, CallCounts};

fn row(name: &str, s: &Summary) -> String {
    format!("| {name} | {:.2} | {:.2} | {:.2} |", s.p50, s.p95, s.mean)
}

fn calls(c: &CallCounts) -> String {
    c.iter()
        .map(|(k, v)| format!("{k} ×{v:.1}"))
        .collect::<Vec<_>>()
        .join("; ")
}

#[tokio::main]
async fn main() {
    agenthome_bench::locate_emulator();
    let turns: usize = agenthome_bench::arg("--turns", 200);
    let warmup: usize = agenthome_bench::arg("--warmup", 10);
    let r = turn::run(turns, warmup).await;
    let ratio = r.full.p50 / r.direct.p50.max(1e-9);
    let target_ms = 5.0;
    let met = if r.added.p50 < target_ms {
        "met"
    } else {
        "MISSED"
    };
    println!("## 1. Turn overhead\n");
    println!(
        "{turns} timed turns after {warmup} warm-up rounds; shell mode, one warm machine, emulator with zero injected latency, table on moto (serialized). Full, direct and minimal iterations are interleaved; `added` is the paired per-iteration difference.\n"
    );
    println!("| series | p50 ms | p95 ms | mean ms |\n|---|---|---|---|");
    println!(
        "{}",
        row("full turn (chat-turn handler, in-process)", &r.full)
    );
    println!(
        "{}",
        row("direct: the same Dedalus calls with the client", &r.direct)
    );
    println!(
        "{}",
        row("minimal: status read + one execution", &r.minimal)
    );
    println!("{}", row("**added** = full − direct (paired)", &r.added));
    println!("{}", row("  of which: time in the table (moto)", &r.store));
    println!("{}", row("  added − table time", &r.added_without_store));
    println!();
    println!(
        "- Ratio full/direct (p50): **{ratio:.2}×**; added p50 **{:.2} ms** — target < {target_ms} ms: **{met}**.",
        r.added.p50
    );
    println!(
        "- Table calls per turn: {:.1} (moto is a single-threaded Python server; real DynamoDB single-item calls take a few ms each in-region, so this share is moto's, not a prediction).",
        r.store_calls_per_turn
    );
    println!(
        "- Dedalus calls per full turn: **{:.1}** ({}).",
        total(&r.calls_full),
        calls(&r.calls_full)
    );
    println!(
        "- Dedalus calls per direct iteration: {:.1} ({}).",
        total(&r.calls_direct),
        calls(&r.calls_direct)
    );
    println!(
        "- Dedalus calls per minimal iteration: {:.1} ({}).",
        total(&r.calls_minimal),
        calls(&r.calls_minimal)
    );
    println!(
        "- Peak RSS (`VmHWM` of the bench process, which runs the handler in-process together with the direct client and the harness; an upper bound for a chat-turn process): {:.1} MiB after setup, **{:.1} MiB** after all turns — target fits 128 MB.",
        r.hwm_after_setup_kb as f64 / 1024.0,
        r.hwm_after_turns_kb as f64 / 1024.0
    );
    println!();
}

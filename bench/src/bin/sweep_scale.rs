//! Benchmark 3: sweep scale.
//! `sweep_scale [--users 100000] [--awake 10000] [--concurrency 8,32,128]
//! [--fanout-users 1000000] [--fanout-awake 100000] [--workers 32]
//! [--shards 64] [--rate 2500]` (`--concurrency none` skips the single runs).

use agenthome_bench::sweep;

#[tokio::main]
async fn main() {
    let users: u64 = agenthome_bench::arg("--users", 100_000);
    let awake: u64 = agenthome_bench::arg("--awake", 10_000);
    let levels: String = agenthome_bench::arg("--concurrency", "8,32,128".to_string());
    println!("## 3. Sweep scale\n");
    println!(
        "{users} users in the table, {awake} awake and idle for 10 min; one `Sweeper::run` (the real sweep, default settings but `SWEEP_CONCURRENCY`) per concurrency, on a freshly seeded table each. Table: `MemoryStore` behind a counting decorator (moto cannot hold 100k items and serve 10k conditional writes in reasonable time here: single-threaded, ~10 ms a call). Dedalus: the recorded-response stand-in (an in-process axum server on loopback answering `POST …/sleep` with a canned `sleeping` machine), not the emulator (each emulator machine is a directory and a state entry; 10k of them cost minutes to create). Target: within one schedule interval (60 s).\n"
    );
    println!("| concurrency | wall s | candidates | slept | items read | items read / candidate | index queries | table writes | Dedalus calls | time in table s (summed) | target |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    if levels != "none" {
        single(users, awake, &levels).await;
    }
    fan_out().await;
}

async fn single(users: u64, awake: u64, levels: &str) {
    for c in levels
        .split(',')
        .filter_map(|c| c.trim().parse::<usize>().ok())
    {
        let r = sweep::run(users, awake, c).await;
        let met = if r.wall_ms < 60_000.0 && !r.report.remaining {
            "met"
        } else {
            "MISSED"
        };
        println!(
            "| {c} | {:.2} | {} | {} | {} | {:.3} | {} | {} | {} | {:.2} | {met} |",
            r.wall_ms / 1000.0,
            r.report.candidates,
            r.report.slept,
            r.store.items_read(),
            r.items_per_candidate(),
            r.store.queries,
            r.store.writes,
            r.dedalus_calls,
            r.store.ms() / 1000.0,
        );
    }
    println!(
        "\nItems read count point reads plus items returned by index queries; the 'users − awake' asleep items are never read (no sweep scans the table). `MemoryStore` keeps the `awake` index as a sorted set next to the items, so a page costs O(log n + page), like DynamoDB's; the summed time in the table column is the table's share.\n"
    );
}

async fn fan_out() {
    let p = sweep::FanOut {
        users: agenthome_bench::arg("--fanout-users", 1_000_000),
        awake: agenthome_bench::arg("--fanout-awake", 100_000),
        workers: agenthome_bench::arg("--workers", 32),
        shards: agenthome_bench::arg("--shards", 64),
        rate: agenthome_bench::arg("--rate", 2500),
        threshold: agenthome_bench::arg("--threshold", 5000),
        budget: std::time::Duration::from_secs(agenthome_bench::arg("--budget-s", 45)),
    };
    let r = sweep::run_fanout(p).await;
    println!(
        "### Fan-out: {} users, {} awake and idle, {} workers\n",
        p.users, p.awake, p.workers
    );
    println!(
        "One scheduled run (`Sweeper::run_scheduled`) with `AWAKE_SHARDS={}`, `SWEEP_WORKERS={}`, `SWEEP_SLEEP_RATE={}`/s (each worker paces itself at rate / workers = {:.1}/s), `SWEEP_FANOUT_THRESHOLD={}`, default `SWEEP_CONCURRENCY` (16 per worker), within a {} s budget (a 55 s Lambda minus the 10 s margin). The coordinator samples the first shard, fans out, and each worker is a spawned task in this one process (the simulated parallel invocation: the same `run_worker` a Lambda worker runs), all sharing the in-memory table (now indexed like the GSI: O(log n + page) per query) and the recorded-response stand-in. Wall times are real, measured on this 2-core machine with every worker's CPU work in one process. Seeding took {:.1} s (not counted).\n",
        p.shards,
        p.workers,
        p.rate,
        f64::from(p.rate) / f64::from(p.workers.min(p.shards).max(1)),
        p.threshold,
        p.budget.as_secs(),
        r.seed_ms / 1000.0
    );
    println!("| overall wall s | candidates | slept | deferred | rate-limited | workers | workers failed | items read | items read / candidate | index queries | table writes | Dedalus calls | sleep calls / s (limit {}) | target |", p.rate);
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let all = r.report.slept == p.awake && !r.report.remaining;
    let met = if all && r.wall_ms <= 60_000.0 && r.items_per_candidate() <= 1.05 {
        "met"
    } else {
        "MISSED"
    };
    println!(
        "| {:.2} | {} | {} | {} | {} | {} | {} | {} | {:.4} | {} | {} | {} | {:.0} | {met} |",
        r.wall_ms / 1000.0,
        r.report.candidates,
        r.report.slept,
        r.report.deferred,
        r.report.rate_limited,
        r.report.workers,
        r.report.workers_failed,
        r.store.items_read(),
        r.items_per_candidate(),
        r.store.queries,
        r.store.writes,
        r.dedalus_calls,
        r.sleeps_per_s(),
    );
    let walls: Vec<f64> = r.workers.iter().map(|w| w.wall_ms / 1000.0).collect();
    let min = walls.iter().copied().fold(f64::INFINITY, f64::min);
    let max = walls.iter().copied().fold(0.0, f64::max);
    println!(
        "\nPer worker (wall s from its invocation to its report; min {min:.2}, max {max:.2}):\n"
    );
    println!("| worker | shards | wall s | candidates | slept | deferred | failed |");
    println!("|---|---|---|---|---|---|---|");
    for w in &r.workers {
        println!(
            "| {} | {} | {:.2} | {} | {} | {} | {} |",
            w.worker,
            w.shards,
            w.wall_ms / 1000.0,
            w.report.candidates,
            w.report.slept,
            w.report.deferred,
            w.report.failed
        );
    }
    println!(
        "\nTarget: all {} slept within 60 s at {} workers, items read per candidate ≤ 1.05. Items read include the coordinator's sample of the first shard (read again by that shard's worker).\n",
        p.awake, p.workers
    );
}

//! Benchmark 3: sweep scale.
//! `sweep_scale [--users 100000] [--awake 10000] [--concurrency 8,32,128]`.

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
        "\nItems read count point reads plus items returned by index queries; the 'users − awake' asleep items are never read (no sweep scans the table). `MemoryStore` answers each index page by filtering every item in memory (O(users) per page, unlike DynamoDB's O(page)), so its share of the wall time overstates what DynamoDB's index costs; the summed time in the table column shows it.\n"
    );
}

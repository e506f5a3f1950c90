//! Regression guard for the benchmarks (docs/benchmarks.md): a quick version
//! of benchmark 1 (turn overhead) and 3 (sweep scale), asserting on ratios
//! and counts, never on absolute times, with generous bounds.
//!
//! The benchmark code itself lives in `bench/src/` and is compiled in here
//! unchanged (it only uses crates this package depends on); parts of it
//! only the benchmark binaries use.
#![allow(dead_code)]

#[path = "../../bench/src/standin.rs"]
mod standin;
#[path = "../../bench/src/stats.rs"]
mod stats;
#[path = "../../bench/src/store.rs"]
mod store;
#[path = "../../bench/src/sweep.rs"]
mod sweep;
#[path = "../../bench/src/turn.rs"]
mod turn;

/// Full turn p50 / direct p50 above this fails (measured ≈ 1.2 with moto).
const MAX_TURN_RATIO: f64 = 2.0;
/// More table calls per warm turn than this fails (now 5: get, lease,
/// mark awake, touch, release).
const MAX_TABLE_CALLS_PER_TURN: f64 = 8.0;
/// Dedalus calls per warm turn above this fails (now 13, mostly polling).
const MAX_DEDALUS_CALLS_PER_TURN: f64 = 20.0;
/// Items read per sweep candidate above this fails (now 1.0).
const MAX_ITEMS_PER_CANDIDATE: f64 = 1.5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turn_overhead_ratio_stays_small() {
    let r = turn::run(20, 2).await;
    let ratio = r.full.p50 / r.direct.p50.max(1e-9);
    eprintln!(
        "turn guard: full p50 {:.1} ms, direct p50 {:.1} ms, ratio {ratio:.2}, table calls/turn {:.1}, Dedalus calls/turn {:.1}",
        r.full.p50,
        r.direct.p50,
        r.store_calls_per_turn,
        turn::total(&r.calls_full)
    );
    assert!(
        ratio < MAX_TURN_RATIO,
        "a turn costs {ratio:.2}× the same Dedalus calls made directly (bound {MAX_TURN_RATIO})"
    );
    assert!(
        r.store_calls_per_turn <= MAX_TABLE_CALLS_PER_TURN,
        "{} table calls per warm turn",
        r.store_calls_per_turn
    );
    let calls = turn::total(&r.calls_full);
    assert!(
        calls <= MAX_DEDALUS_CALLS_PER_TURN,
        "{calls} Dedalus calls per warm turn: {:?}",
        r.calls_full
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweep_reads_candidates_not_users() {
    let r = sweep::run(2_000, 200, 32).await;
    eprintln!(
        "sweep guard: {} candidates, {} items read, {} Dedalus calls, {:.0} ms",
        r.report.candidates,
        r.store.items_read(),
        r.dedalus_calls,
        r.wall_ms
    );
    assert_eq!(r.report.candidates, 200, "{:?}", r.report);
    assert_eq!(r.report.slept, 200, "{:?}", r.report);
    assert!(
        r.items_per_candidate() <= MAX_ITEMS_PER_CANDIDATE,
        "{:.2} items read per candidate",
        r.items_per_candidate()
    );
    assert!(
        r.dedalus_calls <= 2 * r.report.candidates,
        "{} Dedalus calls for {} candidates",
        r.dedalus_calls,
        r.report.candidates
    );
}

/// Items read per candidate in a fanned-out run above this fails (the
/// coordinator's sample of the first shard is read twice).
const MAX_ITEMS_PER_CANDIDATE_FANNED_OUT: f64 = 1.05;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fanned_out_sweep_reads_each_candidate_about_once() {
    let r = sweep::run_fanout(sweep::FanOut {
        users: 4_000,
        awake: 800,
        workers: 8,
        shards: 16,
        rate: 100_000,
        threshold: 200,
        budget: std::time::Duration::from_secs(60),
    })
    .await;
    eprintln!(
        "fan-out guard: {} candidates, {} items read, {} workers, {:.0} ms",
        r.report.candidates,
        r.store.items_read(),
        r.report.workers,
        r.wall_ms
    );
    assert_eq!(r.report.workers, 8, "{:?}", r.report);
    assert_eq!(r.workers.len(), 8, "every worker reported");
    assert_eq!(
        (r.report.candidates, r.report.slept, r.report.workers_failed),
        (800, 800, 0),
        "{:?}",
        r.report
    );
    assert_eq!(
        r.workers.iter().map(|w| w.report.slept).sum::<u64>(),
        r.report.slept,
        "the coordinator's count is the workers' sum"
    );
    assert!(
        r.items_per_candidate() <= MAX_ITEMS_PER_CANDIDATE_FANNED_OUT,
        "{:.3} items read per candidate",
        r.items_per_candidate()
    );
}

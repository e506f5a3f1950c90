//! Regression guard for the benchmarks (docs/benchmarks.md): a quick version
//! of benchmark 1 (turn overhead) and 3 (sweep scale), asserting on counts
//! (table calls, Dedalus requests), never on absolute times.
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

/// Table calls per warm turn above this fails: one conditional update
/// begins the turn (lease, readiness, activity, fair-use counter), one ends
/// it (release, activity, terminal, holds).
const MAX_TABLE_CALLS_PER_TURN: u64 = 2;
/// Dedalus requests before the first command above this fails: the status
/// read and the stored terminal's WebSocket, in parallel.
const MAX_DEDALUS_BEFORE_FIRST_COMMAND: u64 = 2;
/// Dedalus requests per warm one-command shell turn above this fails.
const MAX_DEDALUS_PER_SHELL_TURN: u64 = 3;
/// Items read per sweep candidate above this fails (now 1.0).
const MAX_ITEMS_PER_CANDIDATE: f64 = 1.5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_turn_stays_lean() {
    let r = turn::run(5, 1, &[0]).await;
    let row = &r.rows[0];
    for (name, s) in [("shell", &row.shell), ("agent", &row.agent)] {
        eprintln!(
            "turn guard ({name}): table calls max {}, Dedalus requests max {}, before the first command max {}; total p50 {:.1} ms (floor {:.1} ms)",
            s.table_calls_max, s.dedalus_max, s.dedalus_before_first_max, s.total.p50, row.floor.total.p50
        );
        assert!(
            s.table_calls_max <= MAX_TABLE_CALLS_PER_TURN,
            "{name}: {} table calls in a warm turn (bound {MAX_TABLE_CALLS_PER_TURN})",
            s.table_calls_max
        );
        assert!(
            s.dedalus_before_first_max <= MAX_DEDALUS_BEFORE_FIRST_COMMAND,
            "{name}: {} Dedalus requests before the first command (bound {MAX_DEDALUS_BEFORE_FIRST_COMMAND})",
            s.dedalus_before_first_max
        );
    }
    assert!(
        row.shell.dedalus_max <= MAX_DEDALUS_PER_SHELL_TURN,
        "{} Dedalus requests in a warm one-command shell turn (bound {MAX_DEDALUS_PER_SHELL_TURN})",
        row.shell.dedalus_max
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

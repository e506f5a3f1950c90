//! Benchmark 5: the emulator as its history grows.
//! `emulator_scale [--early 40] [--late 5000] [--machines 100]
//! [--per-machine 10] [--samples 200] [--fill-concurrency 4] [--emulator PATH]
//! [--executions-per-machine N]`; prints a Markdown section (see
//! docs/benchmarks.md and emulator/README.md).

use agenthome_bench::emu_scale::{self, ScaleParams, Stage};
use agenthome_bench::turn::ZERO_LATENCY;

/// Late p50 within this factor of the early p50 (plus [`SLACK_MS`]).
const FACTOR: f64 = 1.5;
const SLACK_MS: f64 = 2.0;
/// Late p50 under this (release build).
const ABSOLUTE_MS: f64 = 5.0;

fn row(name: &str, route: &str, s: &Stage, pick: fn(&Stage) -> agenthome_bench::stats::Summary) {
    let v = pick(s);
    println!(
        "| {name} | {} | `{route}` | {:.2} | {:.2} | {:.2} |",
        s.history, v.p50, v.p95, v.mean
    );
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}

#[tokio::main]
async fn main() {
    if let Some(bin) = std::env::args().skip_while(|a| a != "--emulator").nth(1) {
        std::env::set_var("DCS_EMULATOR_BIN", bin);
    }
    agenthome_bench::locate_emulator();
    let p = ScaleParams {
        early: agenthome_bench::arg("--early", 40),
        late: agenthome_bench::arg("--late", 5000),
        machines: agenthome_bench::arg("--machines", 100),
        per_machine: agenthome_bench::arg("--per-machine", 10),
        samples: agenthome_bench::arg("--samples", 200),
        fill_concurrency: agenthome_bench::arg("--fill-concurrency", 4),
    };
    let bin = std::env::var("DCS_EMULATOR_BIN").unwrap_or_default();
    let profile = if bin.contains("release") {
        "release"
    } else {
        "debug"
    };
    // `--executions-per-machine N` is passed to the emulators (default: theirs).
    let cap: Option<u64> = std::env::args()
        .skip_while(|a| a != "--executions-per-machine")
        .nth(1)
        .and_then(|v| v.parse().ok());
    let cap_arg = cap.map(|c| c.to_string());
    let mut emu_args: Vec<&str> = ZERO_LATENCY.to_vec();
    if let Some(c) = &cap_arg {
        emu_args.extend(["--executions-per-machine", c.as_str()]);
    }
    let r = emu_scale::run(p, &emu_args).await;
    let retention = match cap {
        Some(c) => format!("executions kept per machine: {c} (`--executions-per-machine`)"),
        None => "default retention (1 h, 1000 ended executions per machine)".to_owned(),
    };

    println!("## 5. Emulator scale\n");
    println!(
        "`{profile}` emulator (`{}`), zero injected latency, {retention}, data dir in `$TMPDIR` (`{}`). Three emulators, filled first ({} parallel clients, untimed), then sampled in turn, one sample on each per round ({} rounds), so host load hits all alike. A sample: `GET /v1/machines/{{id}}`, then `POST …/executions` (`[\"true\"]`), then an untimed wait until it ended. Whole run: {:.0} s.\n",
        std::path::Path::new(&bin)
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::env::temp_dir().display(),
        p.fill_concurrency,
        p.samples,
        r.wall_s
    );
    println!("| stage | executions per machine before | route | p50 ms | p95 ms | mean ms |");
    println!("|---|---|---|---|---|---|");
    let post = "POST /v1/machines/{id}/executions";
    let get = "GET /v1/machines/{id}";
    row("early: 1 machine", post, &r.early, |s| s.post);
    row("early: 1 machine", get, &r.early, |s| s.get);
    row("late: 1 machine", post, &r.late, |s| s.post);
    row("late: 1 machine", get, &r.late, |s| s.get);
    let many = format!("{} machines (round-robin)", p.machines);
    row(&many, post, &r.many, |s| s.post);
    row(&many, get, &r.many, |s| s.get);
    println!();
    for (route, e, l) in [
        ("POST", r.early.post.p50, r.late.post.p50),
        ("GET", r.early.get.p50, r.late.get.p50),
    ] {
        let bound = e * FACTOR + SLACK_MS;
        let abs = if profile == "release" {
            format!("; under {ABSOLUTE_MS} ms: **{}**", verdict(l < ABSOLUTE_MS))
        } else {
            "; the absolute target applies to a release build".to_owned()
        };
        println!(
            "- {route}: late p50 {l:.2} ms vs. early p50 {e:.2} ms (ratio {:.2}×); target ≤ {FACTOR}× early + {SLACK_MS} ms = {bound:.2} ms: **{}**{abs}.",
            l / e.max(1e-9),
            verdict(l <= bound)
        );
    }
    println!();
}

//! agenthome benchmarks (see `docs/benchmarks.md`): the shared pieces of the
//! binaries under `src/bin/`. `stats`, `store`, `standin`, `turn` and `sweep`
//! are also compiled into `tests/tests/bench_guard.rs` (through `#[path]`),
//! so they use only crates `agenthome-tests` depends on.

pub mod emu_scale;
pub mod runtime_api;
pub mod smoke;
pub mod standin;
pub mod stats;
pub mod store;
pub mod sweep;
pub mod turn;

/// Point `DCS_EMULATOR_BIN` at the `dcs-emulator` next to this binary unless
/// set (the test harness looks for it relative to test binaries).
pub fn locate_emulator() {
    if std::env::var_os("DCS_EMULATOR_BIN").is_some() {
        return;
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(std::path::Path::to_path_buf))
    {
        let bin = dir.join("dcs-emulator");
        if bin.exists() {
            std::env::set_var("DCS_EMULATOR_BIN", bin);
        }
    }
}

/// `--name VALUE` from the command line, parsed, or `default`.
pub fn arg<T: std::str::FromStr>(name: &str, default: T) -> T {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

//! Wall-clock time as the table stores it (epoch milliseconds). Domain code
//! takes `now_ms` as a parameter where a virtual clock matters (the sweep and
//! its simulator); entrypoints read it here.

use std::cell::Cell;

thread_local! {
    /// How far [`advance`] moved this thread's clock (0 in the functions).
    static SKEW_MS: Cell<u64> = const { Cell::new(0) };
}

/// Epoch milliseconds now (0 if the system clock is before 1970).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
        .saturating_add(SKEW_MS.with(Cell::get))
}

/// Move the calling thread's clock forward by `ms`, for simulations that
/// let leases and grace periods expire without waiting (each on its own
/// single-threaded runtime, so concurrent simulations do not disturb each
/// other). The functions never call it.
pub fn advance(ms: u64) {
    SKEW_MS.with(|s| s.set(s.get().saturating_add(ms)));
}

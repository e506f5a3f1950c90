//! Wall-clock time as the table stores it (epoch milliseconds). Domain code
//! takes `now_ms` as a parameter where a virtual clock matters (the sweep and
//! its simulator); entrypoints read it here.

/// Epoch milliseconds now (0 if the system clock is before 1970).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

//! Percentiles and process facts for the benchmark reports.

/// Summary of a sample of durations in milliseconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Summary {
    /// Sample size.
    pub n: usize,
    /// Median.
    pub p50: f64,
    /// 95th percentile (nearest rank).
    pub p95: f64,
    /// Mean.
    pub mean: f64,
}

/// Nearest-rank percentile `q` (0..=1) of `sorted` (ascending); 0 if empty.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// p50/p95/mean of `sample`.
pub fn summarize(sample: &[f64]) -> Summary {
    let mut sorted = sample.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mean = if sorted.is_empty() {
        0.0
    } else {
        sorted.iter().sum::<f64>() / sorted.len() as f64
    };
    Summary {
        n: sorted.len(),
        p50: percentile(&sorted, 0.50),
        p95: percentile(&sorted, 0.95),
        mean,
    }
}

/// Element-wise difference `a[i] - b[i]` (paired samples).
pub fn paired_diff(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x - y).collect()
}

/// Milliseconds of a duration, as f64.
pub fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A field of `/proc/self/status` in kB (`VmHWM`: peak resident set; `VmRSS`: now).
pub fn proc_status_kb(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        rest.trim().trim_end_matches("kB").trim().parse().ok()
    })
}

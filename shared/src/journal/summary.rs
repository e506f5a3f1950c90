//! The per-day awake-time summary of `GET …/machine`: the wake periods the
//! journal records (each `slept`, `lost` or `destroyed` entry ends one:
//! `[at_ms − awake_ms, at_ms]`) plus the current one (`awake_since` → now),
//! split at UTC midnights.

use serde::Serialize;

use super::{Event, JournalEntry};

const DAY_MS: u64 = 86_400_000;

/// Awake time of one UTC day.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AwakeDayTotal {
    /// The UTC day, `YYYY-MM-DD`.
    pub day: String,
    /// Awake time that day (ms).
    pub awake_ms: u64,
}

/// Awake time per UTC day for the `days` days ending today (oldest first;
/// days without awake time included as 0). `entries` are journal entries
/// (any order); `awake_since` is the current wake period's start, if awake.
pub fn awake_by_day(
    entries: &[JournalEntry],
    awake_since: Option<u64>,
    now_ms: u64,
    days: u32,
) -> Vec<AwakeDayTotal> {
    let today = now_ms / DAY_MS;
    let first = today.saturating_sub(u64::from(days.max(1)) - 1);
    let mut totals = vec![0u64; usize::try_from(today - first + 1).unwrap_or(1)];
    let periods = entries
        .iter()
        .filter(|e| matches!(e.event, Event::Slept | Event::Lost | Event::Destroyed))
        .filter_map(|e| Some((e.at_ms.saturating_sub(e.awake_ms?), e.at_ms)))
        .chain(awake_since.map(|s| (s.min(now_ms), now_ms)));
    for (start, end) in periods {
        let mut t = start.max(first * DAY_MS);
        while t < end {
            let day = t / DAY_MS;
            let day_end = ((day + 1) * DAY_MS).min(end);
            if let Some(slot) = day
                .checked_sub(first)
                .and_then(|i| totals.get_mut(usize::try_from(i).ok()?))
            {
                *slot += day_end - t;
            }
            t = day_end;
        }
    }
    totals
        .into_iter()
        .enumerate()
        .map(|(i, awake_ms)| AwakeDayTotal {
            day: day_name(first + i as u64),
            awake_ms,
        })
        .collect()
}

/// `YYYY-MM-DD` of day number `day` since the epoch (UTC).
fn day_name(day: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(day * 86_400);
    humantime::format_rfc3339_seconds(t)
        .to_string()
        .chars()
        .take(10)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::Actor;
    use super::*;

    fn slept(at_ms: u64, awake_ms: u64) -> JournalEntry {
        let mut e = JournalEntry::new(at_ms, Event::Slept, Actor::Sweep);
        e.awake_ms = Some(awake_ms);
        e
    }

    #[test]
    fn periods_split_at_midnight_and_the_current_one_counts() {
        let day0 = 20_000 * DAY_MS; // 2024-10-04
        let entries = [
            // 1 h across midnight into day0 (30 min each side)
            slept(day0 + 1_800_000, 3_600_000),
            // 10 min on day0
            slept(day0 + 7_200_000, 600_000),
            // not a wake period
            JournalEntry::new(day0 + 10, Event::Woke, Actor::Turn),
        ];
        let now = day0 + DAY_MS + 60_000; // 1 min into day1, awake since midnight
        let days = awake_by_day(&entries, Some(day0 + DAY_MS), now, 3);
        let got: Vec<(&str, u64)> = days.iter().map(|d| (d.day.as_str(), d.awake_ms)).collect();
        assert_eq!(
            got,
            [
                ("2024-10-03", 1_800_000),
                ("2024-10-04", 1_800_000 + 600_000),
                ("2024-10-05", 60_000)
            ]
        );
    }
}

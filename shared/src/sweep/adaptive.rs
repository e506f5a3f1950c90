//! Adaptive idle (`IDLE_POLICY=adaptive`): learn from the gaps between one
//! user's turns when a conversation is likely over, and let the sweep sleep
//! the machine earlier than `IDLE_AFTER` — never later.
//!
//! The gaps (end of one turn → start of the next) are kept compactly on the
//! user's item as a histogram: one count per bucket of [`GAP_BUCKETS_S`]
//! (24 small numbers). Gaps shorter than `IDLE_AFTER` are pauses *within* a
//! conversation; longer ones end one. The user's idle deadline is the upper
//! edge of the highest bucket that holds a within-conversation gap — the
//! longest pause this user has been seen to come back from, rounded up —
//! plus [`GRACE`], once at least [`MIN_SAMPLES`] such gaps are known, and
//! only if it is shorter than `IDLE_AFTER`. `IDLE_AFTER` stays the ceiling and the cold
//! start default. Counts are halved once they sum to more than
//! [`MAX_SAMPLES`], so an old rhythm fades (a pause seen once is forgotten
//! after about that many turns, and relearnt the next time it happens).

use std::time::Duration;

/// Upper edges (seconds) of the gap histogram's buckets; the last bucket
/// holds every longer gap.
pub const GAP_BUCKETS_S: [u64; 24] = [
    10,
    20,
    30,
    45,
    60,
    75,
    90,
    105,
    120,
    150,
    180,
    210,
    240,
    270,
    300,
    360,
    420,
    480,
    600,
    900,
    1200,
    1800,
    3600,
    u64::MAX,
];

/// Within-conversation gaps needed before the deadline adapts.
pub const MIN_SAMPLES: u32 = 8;

/// Counts are halved when their sum exceeds this.
pub const MAX_SAMPLES: u32 = 200;

/// The shortest adaptive deadline: a reply is never followed by a sleep
/// sooner than this.
pub const MIN_IDLE: Duration = Duration::from_secs(30);

/// Added to the longest pause seen, so a user who comes back exactly at it
/// does not race the sweep.
pub const GRACE: Duration = Duration::from_secs(15);

/// `IDLE_POLICY`: how long an idle machine stays awake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IdlePolicy {
    /// `IDLE_AFTER` for everyone (the default).
    #[default]
    Fixed,
    /// Per user, learnt from their gaps; `IDLE_AFTER` is the ceiling.
    Adaptive,
}

impl IdlePolicy {
    /// Parse `fixed` or `adaptive` (case-insensitive).
    pub fn parse(raw: &str) -> Option<Self> {
        match raw.trim().to_ascii_lowercase().as_str() {
            "fixed" => Some(Self::Fixed),
            "adaptive" => Some(Self::Adaptive),
            _ => None,
        }
    }
}

fn bucket_of(gap: Duration) -> usize {
    let secs = gap.as_millis().div_ceil(1000);
    GAP_BUCKETS_S
        .iter()
        .position(|&edge| secs <= u128::from(edge))
        .unwrap_or(GAP_BUCKETS_S.len() - 1)
}

/// `hist` with one more gap counted (a missing or short histogram is
/// padded, a longer one cut to the buckets).
pub fn observe(hist: &[u32], gap: Duration) -> Vec<u32> {
    let mut next: Vec<u32> = hist.iter().copied().take(GAP_BUCKETS_S.len()).collect();
    next.resize(GAP_BUCKETS_S.len(), 0);
    let b = bucket_of(gap);
    next[b] = next[b].saturating_add(1);
    let total: u64 = next.iter().map(|&c| u64::from(c)).sum();
    if total > u64::from(MAX_SAMPLES) {
        for c in &mut next {
            *c /= 2;
        }
    }
    next
}

/// The user's idle deadline, if the history says it is earlier than
/// `ceiling` (`IDLE_AFTER`); `None` means "use the ceiling".
pub fn idle_deadline(hist: &[u32], ceiling: Duration) -> Option<Duration> {
    let ceiling_s = ceiling.as_secs();
    let lower_edge = |i: usize| if i == 0 { 0 } else { GAP_BUCKETS_S[i - 1] };
    let within: Vec<(usize, u32)> = hist
        .iter()
        .copied()
        .enumerate()
        .take(GAP_BUCKETS_S.len())
        .filter(|&(i, _)| lower_edge(i) < ceiling_s)
        .collect();
    let samples: u32 = within.iter().map(|&(_, c)| c).sum();
    if samples < MIN_SAMPLES {
        return None;
    }
    let top = within.iter().rev().find(|&&(_, c)| c > 0)?.0;
    let deadline = (Duration::from_secs(GAP_BUCKETS_S[top]) + GRACE).max(MIN_IDLE);
    (deadline < ceiling).then_some(deadline)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn learnt(gaps: &[u64]) -> Vec<u32> {
        gaps.iter().fold(Vec::new(), |h, &g| observe(&h, secs(g)))
    }

    #[test]
    fn given_few_gaps_when_asked_then_the_ceiling_stays() {
        let hist = learnt(&[20, 30, 40]);
        assert_eq!(idle_deadline(&hist, secs(300)), None);
        assert_eq!(idle_deadline(&[], secs(300)), None);
    }

    #[test]
    fn given_short_pauses_when_learnt_then_the_deadline_is_the_longest_rounded_up() {
        let hist = learnt(&[20, 35, 50, 61, 44, 33, 70, 25, 7200, 86_400]);
        assert_eq!(idle_deadline(&hist, secs(300)), Some(secs(75) + GRACE));
        // Never later than the ceiling.
        assert_eq!(idle_deadline(&hist, secs(60)), None);
    }

    #[test]
    fn given_a_pause_near_the_ceiling_when_learnt_then_the_ceiling_stays() {
        let hist = learnt(&[20, 35, 50, 61, 44, 33, 70, 25, 290]);
        assert_eq!(idle_deadline(&hist, secs(300)), None);
        let hist = learnt(&[20, 35, 50, 61, 44, 33, 70, 25, 280]);
        assert_eq!(
            idle_deadline(&hist, secs(300)),
            None,
            "edge + grace ≥ ceiling"
        );
    }

    #[test]
    fn given_tiny_pauses_when_learnt_then_the_deadline_has_a_floor() {
        let hist = learnt(&[1, 2, 3, 4, 5, 6, 7, 8, 9]);
        assert_eq!(idle_deadline(&hist, secs(300)), Some(MIN_IDLE));
    }

    #[test]
    fn given_many_gaps_when_counted_then_the_histogram_stays_bounded() {
        let mut hist = Vec::new();
        for _ in 0..10_000 {
            hist = observe(&hist, secs(40));
        }
        assert_eq!(hist.len(), GAP_BUCKETS_S.len());
        assert!(hist.iter().sum::<u32>() <= MAX_SAMPLES);
        // A malformed (too long) stored histogram is cut to the buckets.
        assert_eq!(observe(&[1; 40], secs(1)).len(), GAP_BUCKETS_S.len());
    }

    #[test]
    fn given_policy_names_when_parsed_then_only_the_two_are_accepted() {
        assert_eq!(IdlePolicy::parse("Adaptive"), Some(IdlePolicy::Adaptive));
        assert_eq!(IdlePolicy::parse("fixed"), Some(IdlePolicy::Fixed));
        assert_eq!(IdlePolicy::parse("smart"), None);
    }
}

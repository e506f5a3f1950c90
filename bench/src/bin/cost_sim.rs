//! Benchmark 4: cost simulation. `cost_sim [--users 300] [--days 7] [--json]`.
//!
//! Replays `days` days of chat for `users` users drawn from stated profiles
//! through the REAL sweep (`Sweeper::run` on schedule ticks, its
//! pending-sleep phase included), the REAL end-of-turn step
//! (`turn::record_turn_end`: adaptive idle) and, with `explicit_sleep`, the
//! REAL `Sweeper::sleep_now` the turn calls for `end_conversation` — with a
//! virtual clock (`now_ms` is passed in), a `MemoryStore`, and the platform
//! model of the in-process stand-in (hold window 300 s after each wake,
//! autosleep 15 min = `MACHINE_AUTOSLEEP`'s default), which bills awake time.
//!
//! A turn is modelled as its table writes (turn lease, mark awake, touch,
//! release — the real store operations) plus activity on the machine (a
//! wake if asleep); each takes 20 s. Active time = first turn's start to
//! last turn's end, per conversation. A cold wake is a turn other than the
//! first of its conversation that finds the machine asleep.
//!
//! Every user starts the measured days with three weeks of history from
//! their profile: the gaps of those weeks fed through the same histogram
//! update the turn uses (`sweep::adaptive::observe`), so adaptive idle is
//! measured warm, as it runs for a user who has been around a while.
//!
//! `--json` prints one JSON array of rows (`policy`, `profile`,
//! `explicit_sleep`, `billed_over_active`, `awake_idle_s_per_conversation`,
//! `cold_wakes_per_conversation`, and the context); otherwise a Markdown
//! section for `bench/RESULTS.md`.

use agenthome::api::UserId;
use agenthome::store::{
    AcquireOutcome, LeasePurpose, MachineState, MemoryStore, Power, UserRecord, UserStore,
};
use agenthome::sweep::adaptive::observe;
use agenthome::sweep::{IdlePolicy, SweepSettings, Sweeper};
use agenthome::turn::{record_turn_end, Ending};
use agenthome_bench::standin::{Platform, StandIn};
use serde_json::json;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

const T0: u64 = 1_700_000_000_000;
const SEC: u64 = 1_000;
const MIN: u64 = 60_000;
const DAY: u64 = 86_400_000;
/// How long one turn takes.
const TURN_MS: u64 = 20_000;
/// Weeks of history each user brings into the measured days.
const HISTORY_WEEKS: u64 = 3;
/// The platform's post-wake hold window: every wake is billed at least this.
const HOLD_MS: u64 = 300_000;

/// A profile: conversations on a day with any (probability
/// `day_probability`), turns per conversation, and the user's pause between
/// the end of one reply and the next message, uniform in `gap_s`.
struct Profile {
    name: &'static str,
    share: f64,
    conversations: u32,
    turns: u32,
    gap_s: (u64, u64),
    day_probability: f64,
}

const PROFILES: &[Profile] = &[
    Profile {
        name: "30 min/day in 2 bursts",
        share: 0.35,
        conversations: 2,
        turns: 10,
        gap_s: (30, 120),
        day_probability: 1.0,
    },
    Profile {
        name: "3 sessions/day × 5 min",
        share: 0.35,
        conversations: 3,
        turns: 6,
        gap_s: (20, 60),
        day_probability: 1.0,
    },
    Profile {
        name: "weekly: 1 × 20 min, 1 day in 7",
        share: 0.2,
        conversations: 1,
        turns: 12,
        gap_s: (30, 150),
        day_probability: 1.0 / 7.0,
    },
    // Shorter than the platform's 300 s post-wake hold window: every wake
    // is billed at least 300 s, so billed/active cannot reach 1.15 here.
    Profile {
        name: "quick question: 1 × 3 turns",
        share: 0.1,
        conversations: 1,
        turns: 3,
        gap_s: (10, 40),
        day_probability: 1.0,
    },
];

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit(&mut self) -> f64 {
        (self.next() % 1_000_000) as f64 / 1_000_000.0
    }
    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

/// One conversation: its turns' start times (epoch ms, virtual).
type Conversation = Vec<u64>;

struct User {
    id: UserId,
    machine: String,
    profile: usize,
    /// Conversations of the measured days.
    conversations: Vec<Conversation>,
    /// The gap histogram the user's history left on the item.
    history: Vec<u32>,
}

/// The conversations of one day starting at `day_start`.
fn day_of(p: &Profile, rng: &mut Rng, day_start: u64) -> Vec<Conversation> {
    if rng.unit() >= p.day_probability {
        return Vec::new();
    }
    // Between 08:00 and 22:00, at least an hour apart.
    let mut t = day_start + 8 * 60 * MIN + rng.between(0, 120) * MIN;
    let mut out = Vec::new();
    for _ in 0..p.conversations {
        let mut turns = Vec::new();
        for k in 0..p.turns {
            if k > 0 {
                t += TURN_MS + rng.between(p.gap_s.0, p.gap_s.1) * SEC;
            }
            turns.push(t);
        }
        out.push(turns);
        t += TURN_MS + (60 + rng.between(0, 240)) * MIN;
    }
    out
}

/// The histogram `conversations` leave: every gap between one turn's end
/// and the next turn's start, conversation breaks included.
fn learn(
    mut hist: Vec<u32>,
    last_end: &mut Option<u64>,
    conversations: &[Conversation],
) -> Vec<u32> {
    for c in conversations {
        for &start in c {
            if let Some(end) = *last_end {
                hist = observe(&hist, Duration::from_millis(start.saturating_sub(end)));
            }
            *last_end = Some(start + TURN_MS);
        }
    }
    hist
}

fn population(n: usize, days: u64) -> Vec<User> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let history_days = HISTORY_WEEKS * 7;
    (0..n)
        .map(|i| {
            let mut acc = 0.0;
            let x = (i as f64 + 0.5) / n as f64;
            let profile = PROFILES
                .iter()
                .position(|p| {
                    acc += p.share;
                    x < acc
                })
                .unwrap_or(PROFILES.len() - 1);
            let p = &PROFILES[profile];
            let (mut history, mut last_end) = (Vec::new(), None);
            for d in 0..history_days {
                let day = day_of(p, &mut rng, T0 - (history_days - d) * DAY);
                history = learn(history, &mut last_end, &day);
            }
            let conversations: Vec<Conversation> = (0..days)
                .flat_map(|d| day_of(p, &mut rng, T0 + d * DAY))
                .collect();
            User {
                id: UserId::parse(&format!("sim-{i:05}")).expect("a valid generated user id"),
                machine: format!("dm-sim-{i:05}"),
                profile,
                conversations,
                history,
            }
        })
        .collect()
}

#[derive(Clone, Copy)]
struct Config {
    policy: IdlePolicy,
    idle_after_min: u64,
    explicit_sleep: bool,
}

/// One user's figures.
#[derive(Default, Clone, Copy)]
struct Tally {
    billed_s: f64,
    active_s: f64,
    /// Σ max(active, hold window) per conversation: the least any policy can bill.
    floor_s: f64,
    conversations: u64,
    cold_wakes: u64,
}

fn item(u: &User, policy: IdlePolicy) -> UserRecord {
    UserRecord {
        user_id: u.id.clone(),
        machine_id: Some(u.machine.clone()),
        state: MachineState::Ready,
        power: Power::Asleep,
        generation: 1,
        create_key: format!("{:032x}", u.id.as_str().len()),
        bootstrap_version: Some("v1".into()),
        last_active_at: T0 - DAY,
        lease: None,
        terminal_id: None,
        parked_terminals: Vec::new(),
        awake_since: None,
        awake_ms_total: 0,
        sleep_eligible_at: None,
        hold: None,
        holds: Vec::new(),
        last_error: None,
        updated_at: T0 - DAY,
        created_at: T0 - 28 * DAY,
        awake_shard: None,
        awake_day: None,
        provision_attempts: 0,
        pending_sleep: None,
        // Fixed never writes a histogram: its users have none.
        gap_hist: match policy {
            IdlePolicy::Adaptive => u.history.clone(),
            IdlePolicy::Fixed => Vec::new(),
        },
        turns: Default::default(),
    }
}

/// The sim's clients: the store, the sweeper and the platform model.
struct World {
    store: Arc<MemoryStore>,
    sweeper: Sweeper<MemoryStore>,
    settings: SweepSettings,
    standin: StandIn,
}

impl World {
    fn platform(&self) -> &Platform {
        &self.standin.platform
    }

    fn is_awake(&self, machine: &str) -> bool {
        let ms = self
            .platform()
            .machines
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        ms.get(machine).is_some_and(|m| m.awake)
    }

    /// One turn of `u` starting at `t` (the real store operations and the
    /// real after-reply step); returns whether it found the machine asleep.
    async fn turn(&self, u: &User, t: u64, last: bool, cfg: &Config) -> bool {
        let p = self.platform();
        p.clock.store(t, Ordering::SeqCst);
        let was_asleep = !self.is_awake(&u.machine);
        p.activity(&u.machine, t);
        let owner = format!("turn-{}-{t}", u.id);
        let rec = match self
            .store
            .acquire_lease(&u.id, &owner, LeasePurpose::Turn, t + MIN, t)
            .await
            .expect("lease")
        {
            AcquireOutcome::Acquired(rec) => rec,
            other => panic!("turn lease refused: {other:?}"),
        };
        let end_conversation = last && cfg.explicit_sleep;
        let ending = Ending::new(&rec, t, end_conversation);
        let end = t + TURN_MS;
        self.store
            .mark_awake(&u.id, &owner, t)
            .await
            .expect("awake");
        p.activity(&u.machine, end);
        self.store.touch(&u.id, &owner, end).await.expect("touch");
        self.store
            .release_lease(&u.id, &owner, end)
            .await
            .expect("release");
        record_turn_end(&*self.store, &self.settings, &ending, end, end)
            .await
            .expect("end of turn");
        if end_conversation {
            p.clock.store(end + SEC, Ordering::SeqCst);
            self.sweeper.sleep_now(&u.id, end + SEC, deadline()).await;
        }
        was_asleep
    }
}

fn deadline() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(60)
}

async fn simulate(users: &[User], cfg: &Config, days: u64) -> Vec<Tally> {
    let store = Arc::new(MemoryStore::new());
    for u in users {
        let rec = item(u, cfg.policy);
        store.put_raw(rec.to_item().expect("item")).expect("seed");
    }
    let standin = StandIn::start(Platform {
        clock: T0.into(),
        hold_ms: HOLD_MS,
        autosleep_ms: 15 * MIN,
        ..Platform::default()
    })
    .await;
    let settings = SweepSettings {
        idle_after: Duration::from_millis(cfg.idle_after_min * MIN),
        idle_policy: cfg.policy,
        ..SweepSettings::default()
    };
    let world = World {
        sweeper: Sweeper::new(Arc::clone(&store), &standin.client(), settings.clone()),
        store,
        settings,
        standin,
    };
    // (start, user, index in conversation, conversation length)
    let mut turns: Vec<(u64, usize, usize, usize)> = Vec::new();
    for (i, u) in users.iter().enumerate() {
        for c in &u.conversations {
            for (k, &t) in c.iter().enumerate() {
                turns.push((t, i, k, c.len()));
            }
        }
    }
    turns.sort_unstable();
    let mut tallies = vec![Tally::default(); users.len()];
    let mut next = 0;
    let end = T0 + days * DAY + 2 * 60 * MIN;
    let mut tick = T0;
    while tick < end {
        while next < turns.len() && turns[next].0 < tick + MIN {
            let (t, i, k, len) = turns[next];
            next += 1;
            let cold = world.turn(&users[i], t, k + 1 == len, cfg).await;
            if k > 0 && cold {
                tallies[i].cold_wakes += 1;
            }
        }
        tick += MIN;
        world.platform().clock.store(tick, Ordering::SeqCst);
        world.sweeper.run(tick, deadline()).await;
    }
    for (u, tally) in users.iter().zip(tallies.iter_mut()) {
        tally.billed_s = world.platform().billed(&u.machine, end) as f64 / 1000.0;
        tally.conversations = u.conversations.len() as u64;
        let active = |c: &Conversation| c[c.len() - 1] + TURN_MS - c[0];
        tally.active_s = u
            .conversations
            .iter()
            .map(|c| active(c) as f64 / 1000.0)
            .sum();
        tally.floor_s = u
            .conversations
            .iter()
            .map(|c| active(c).max(HOLD_MS) as f64 / 1000.0)
            .sum();
    }
    tallies
}

/// One output row.
struct Row {
    cfg: Config,
    profile: &'static str,
    gaps: String,
    users_active: u64,
    conversations: u64,
    billed_over_active: f64,
    floor_over_active: f64,
    awake_idle_s_per_conversation: f64,
    cold_wakes_per_conversation: f64,
}

fn rows_of(users: &[User], cfg: Config, tallies: &[Tally]) -> Vec<Row> {
    PROFILES
        .iter()
        .enumerate()
        .map(|(pi, prof)| {
            let mut sum = Tally::default();
            let mut active_users = 0;
            for (u, t) in users.iter().zip(tallies) {
                if u.profile == pi && t.conversations > 0 {
                    sum.billed_s += t.billed_s;
                    sum.active_s += t.active_s;
                    sum.floor_s += t.floor_s;
                    sum.conversations += t.conversations;
                    sum.cold_wakes += t.cold_wakes;
                    active_users += 1;
                }
            }
            let convs = sum.conversations.max(1) as f64;
            Row {
                cfg,
                profile: prof.name,
                gaps: format!("{}–{} s", prof.gap_s.0, prof.gap_s.1),
                users_active: active_users,
                conversations: sum.conversations,
                billed_over_active: sum.billed_s / sum.active_s.max(1e-9),
                floor_over_active: sum.floor_s / sum.active_s.max(1e-9),
                awake_idle_s_per_conversation: (sum.billed_s - sum.active_s) / convs,
                cold_wakes_per_conversation: sum.cold_wakes as f64 / convs,
            }
        })
        .collect()
}

fn policy_name(p: IdlePolicy) -> &'static str {
    match p {
        IdlePolicy::Fixed => "fixed",
        IdlePolicy::Adaptive => "adaptive",
    }
}

fn round(x: f64, places: i32) -> f64 {
    let f = 10f64.powi(places);
    (x * f).round() / f
}

fn print_json(rows: &[Row]) {
    let out: Vec<_> = rows
        .iter()
        .map(|r| {
            json!({
                "policy": policy_name(r.cfg.policy),
                "profile": r.profile,
                "explicit_sleep": r.cfg.explicit_sleep,
                "billed_over_active": round(r.billed_over_active, 3),
                "hold_window_floor": round(r.floor_over_active, 3),
                "awake_idle_s_per_conversation": round(r.awake_idle_s_per_conversation, 1),
                "cold_wakes_per_conversation": round(r.cold_wakes_per_conversation, 3),
                "idle_after_s": r.cfg.idle_after_min * 60,
                "gap_distribution": format!("uniform {}", r.gaps),
                "users_active": r.users_active,
                "conversations": r.conversations,
            })
        })
        .collect();
    println!("{}", serde_json::Value::Array(out));
}

/// The targets, checked on the rows: explicit sleep ≤ 1.15×; adaptive
/// cuts awake-idle ≥ 30 % against fixed (default `IDLE_AFTER`, no explicit
/// sleep) with no more cold wakes.
fn verdicts(rows: &[Row]) -> Vec<String> {
    let mut out = Vec::new();
    let find = |policy: IdlePolicy, explicit: bool, idle: u64, profile: &str| {
        rows.iter().find(|r| {
            r.cfg.policy == policy
                && r.cfg.explicit_sleep == explicit
                && r.cfg.idle_after_min == idle
                && r.profile == profile
        })
    };
    for p in PROFILES {
        for policy in [IdlePolicy::Fixed, IdlePolicy::Adaptive] {
            if let Some(r) = find(policy, true, 5, p.name) {
                let met = r.billed_over_active <= 1.15;
                out.push(format!(
                    "explicit sleep, {}, {}: {:.2}× billed/active (target ≤ 1.15: {}; the hold window alone bills at least {:.2}×)",
                    policy_name(policy),
                    p.name,
                    r.billed_over_active,
                    if met { "met" } else { "MISSED" },
                    r.floor_over_active
                ));
            }
        }
        if let (Some(f), Some(a)) = (
            find(IdlePolicy::Fixed, false, 5, p.name),
            find(IdlePolicy::Adaptive, false, 5, p.name),
        ) {
            let cut =
                1.0 - a.awake_idle_s_per_conversation / f.awake_idle_s_per_conversation.max(1e-9);
            let colder = a.cold_wakes_per_conversation > f.cold_wakes_per_conversation;
            out.push(format!(
                "no explicit sleep, {}: adaptive {:.0} s vs fixed {:.0} s awake-idle per conversation, {:.0} % less (target ≥ 30 %: {}); cold wakes {:.3} vs {:.3} per conversation ({})",
                p.name,
                a.awake_idle_s_per_conversation,
                f.awake_idle_s_per_conversation,
                cut * 100.0,
                if cut >= 0.30 { "met" } else { "MISSED" },
                a.cold_wakes_per_conversation,
                f.cold_wakes_per_conversation,
                if colder { "MORE: target MISSED" } else { "no more: met" }
            ));
        }
    }
    out
}

fn print_markdown(n: usize, days: u64, rows: &[Row]) {
    println!("## 4. Cost simulation\n");
    println!(
        "{n} users, {days} virtual days, through the real `Sweeper` (virtual `now_ms`; its pending-sleep phase included), the real end-of-turn step (`record_turn_end`) and, with explicit sleep, the real `sleep_now` a turn with `end_conversation` calls; `MemoryStore`; the stand-in's platform model: hold window 300 s after each wake, autosleep 15 min; sweep every minute. A turn takes 20 s; active time = first turn's start to last turn's end per conversation; a cold wake is a turn after the first of its conversation that finds the machine asleep. Each user brings {HISTORY_WEEKS} weeks of history from their profile (adaptive idle measured warm). Profiles (the user's pause between a reply and the next message is uniform in the range given): {}.\n",
        PROFILES
            .iter()
            .map(|p| format!(
                "{} ({:.0}%: {} conversation(s) of {} turns, pauses {}–{} s)",
                p.name,
                p.share * 100.0,
                p.conversations,
                p.turns,
                p.gap_s.0,
                p.gap_s.1
            ))
            .collect::<Vec<_>>()
            .join("; ")
    );
    println!("| policy | IDLE_AFTER | explicit sleep at end | profile | users active | conversations | billed / active | awake-idle s per conversation | cold wakes per conversation |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} min | {} | {} | {} | {} | **{:.2}** | {:.0} | {:.3} |",
            policy_name(r.cfg.policy),
            r.cfg.idle_after_min,
            if r.cfg.explicit_sleep { "yes" } else { "no" },
            r.profile,
            r.users_active,
            r.conversations,
            r.billed_over_active,
            r.awake_idle_s_per_conversation,
            r.cold_wakes_per_conversation
        );
    }
    println!();
    for v in verdicts(rows) {
        println!("- {v}");
    }
    println!();
}

#[tokio::main]
async fn main() {
    let n: usize = agenthome_bench::arg("--users", 300);
    let days: u64 = agenthome_bench::arg("--days", 7);
    let json_out = std::env::args().any(|a| a == "--json");
    let users = population(n, days);
    let configs = [
        (IdlePolicy::Fixed, 5, false),
        (IdlePolicy::Adaptive, 5, false),
        (IdlePolicy::Fixed, 5, true),
        (IdlePolicy::Adaptive, 5, true),
        (IdlePolicy::Fixed, 2, false),
    ];
    let mut rows = Vec::new();
    for (policy, idle_after_min, explicit_sleep) in configs {
        let cfg = Config {
            policy,
            idle_after_min,
            explicit_sleep,
        };
        let tallies = simulate(&users, &cfg, days).await;
        rows.extend(rows_of(&users, cfg, &tallies));
    }
    if json_out {
        print_json(&rows);
    } else {
        print_markdown(n, days, &rows);
    }
}

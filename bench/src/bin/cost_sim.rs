//! Benchmark 4: cost simulation. `cost_sim [--users 1000]`.
//!
//! Replays one day of chat for `users` users drawn from stated profiles
//! through the REAL sweep (`Sweeper::run` on schedule ticks, and
//! `Sweeper::sleep_now` for explicit sleep at conversation end) with a
//! virtual clock (`now_ms` is passed in), a `MemoryStore`, and the platform
//! model of the in-process stand-in (hold window 300 s after each wake,
//! autosleep 15 min = `MACHINE_AUTOSLEEP`'s default), which bills awake time.
//! A turn is modelled as its table writes (turn lease, mark awake, touch,
//! release — the real store operations) plus activity on the machine (a
//! wake if asleep). Active time = first turn's start to last turn's end
//! (each turn takes 20 s).

use agenthome::store::{LeasePurpose, MachineState, MemoryStore, Power, UserRecord, UserStore};
use agenthome::sweep::{SweepSettings, Sweeper};
use agenthome_bench::standin::{Platform, StandIn};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

const T0: u64 = 1_700_000_000_000;
const MIN: u64 = 60_000;

/// A profile: conversations per day (probability of a day with any), turns
/// per conversation (one a minute).
struct Profile {
    name: &'static str,
    share: f64,
    conversations: u32,
    turns: u64,
    day_probability: f64,
}

const PROFILES: &[Profile] = &[
    Profile {
        name: "30 min/day in 2 bursts",
        share: 0.4,
        conversations: 2,
        turns: 15,
        day_probability: 1.0,
    },
    Profile {
        name: "3 sessions/day × 5 min",
        share: 0.4,
        conversations: 3,
        turns: 5,
        day_probability: 1.0,
    },
    Profile {
        name: "weekly: 1 × 20 min, 1 day in 7",
        share: 0.2,
        conversations: 1,
        turns: 20,
        day_probability: 1.0 / 7.0,
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
}

struct User {
    id: String,
    machine: String,
    profile: usize,
    /// Start minutes of conversations.
    starts: Vec<u64>,
}

fn population(n: usize) -> Vec<User> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut users = Vec::with_capacity(n);
    for i in 0..n {
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
        let mut starts = Vec::new();
        if rng.unit() < p.day_probability {
            // Conversations between 08:00 and 22:00, at least 1 h apart.
            let mut t = 8 * 60 + rng.next() % 120;
            for _ in 0..p.conversations {
                starts.push(t);
                t += p.turns + 60 + rng.next() % 240;
            }
        }
        users.push(User {
            id: format!("sim-{i:05}"),
            machine: format!("dm-sim-{i:05}"),
            profile,
            starts,
        });
    }
    users
}

struct Config {
    idle_after_min: u64,
    schedule_min: u64,
    explicit_sleep: bool,
}

async fn simulate(users: &[User], cfg: &Config) -> Vec<(f64, f64, u64)> {
    let store = Arc::new(MemoryStore::new());
    for u in users {
        let rec = UserRecord {
            user_id: u.id.clone(),
            machine_id: Some(u.machine.clone()),
            state: MachineState::Ready,
            power: Power::Asleep,
            generation: 1,
            create_key: format!("{:032x}", u.id.len()),
            bootstrap_version: Some("v1".into()),
            last_active_at: T0 - 86_400_000,
            lease: None,
            terminal_id: None,
            parked_terminals: Vec::new(),
            awake_since: None,
            awake_ms_total: 0,
            sleep_eligible_at: None,
            hold: None,
            holds: Vec::new(),
            last_error: None,
            updated_at: T0 - 86_400_000,
            created_at: T0 - 7 * 86_400_000,
            awake_shard: None,
            awake_day: None,
            provision_attempts: 0,
        };
        store.put_raw(rec.to_item().expect("item")).expect("seed");
    }
    let standin = StandIn::start(Platform {
        clock: T0.into(),
        hold_ms: 300_000,
        autosleep_ms: 15 * MIN,
        ..Platform::default()
    })
    .await;
    let settings = SweepSettings {
        idle_after: Duration::from_millis(cfg.idle_after_min * MIN),
        ..SweepSettings::default()
    };
    let sweeper = Sweeper::new(Arc::clone(&store), &standin.client(), settings);
    let p = &standin.platform;
    let deadline = || tokio::time::Instant::now() + Duration::from_secs(60);
    // Turn minutes per user: (minute, is_last_of_conversation).
    let mut events: Vec<(u64, usize, bool)> = Vec::new();
    for (i, u) in users.iter().enumerate() {
        let turns = PROFILES[u.profile].turns;
        for &s in &u.starts {
            for k in 0..turns {
                events.push((s + k, i, k + 1 == turns));
            }
        }
    }
    events.sort_unstable();
    let mut next = 0;
    for minute in 0..(24 * 60 + 120) {
        let tick = T0 + minute * MIN;
        if minute % cfg.schedule_min == 0 {
            p.clock.store(tick, Ordering::SeqCst);
            sweeper.run(tick, deadline()).await;
        }
        while next < events.len() && events[next].0 == minute {
            let (_, i, last) = events[next];
            next += 1;
            let u = &users[i];
            let t = tick + 30_000;
            p.clock.store(t, Ordering::SeqCst);
            p.activity(&u.machine, t);
            let owner = format!("turn-{i}-{minute}");
            store
                .acquire_lease(&u.id, &owner, LeasePurpose::Turn, t + MIN, t)
                .await
                .expect("lease");
            store.mark_awake(&u.id, &owner, t).await.expect("awake");
            store.touch(&u.id, &owner, t + 20_000).await.expect("touch");
            store
                .release_lease(&u.id, &owner, t + 20_000)
                .await
                .expect("release");
            if last && cfg.explicit_sleep {
                p.clock.store(t + 21_000, Ordering::SeqCst);
                sweeper.sleep_now(&u.id, t + 21_000, deadline()).await;
            }
        }
    }
    let end = T0 + (24 * 60 + 120) * MIN;
    users
        .iter()
        .map(|u| {
            let active = u.starts.len() as u64 * ((PROFILES[u.profile].turns - 1) * MIN + 20_000);
            (
                p.billed(&u.machine, end) as f64 / 1000.0,
                active as f64 / 1000.0,
                u.starts.len() as u64,
            )
        })
        .collect()
}

#[tokio::main]
async fn main() {
    let n: usize = agenthome_bench::arg("--users", 1000);
    let users = population(n);
    let configs = [
        Config {
            idle_after_min: 5,
            schedule_min: 1,
            explicit_sleep: false,
        },
        Config {
            idle_after_min: 5,
            schedule_min: 1,
            explicit_sleep: true,
        },
        Config {
            idle_after_min: 2,
            schedule_min: 1,
            explicit_sleep: false,
        },
        Config {
            idle_after_min: 10,
            schedule_min: 1,
            explicit_sleep: false,
        },
        Config {
            idle_after_min: 5,
            schedule_min: 5,
            explicit_sleep: false,
        },
        Config {
            idle_after_min: 5,
            schedule_min: 5,
            explicit_sleep: true,
        },
    ];
    println!("## 4. Cost simulation\n");
    println!("{n} users, one virtual day, through the real `Sweeper` (virtual `now_ms`), `MemoryStore`, and the stand-in's platform model: hold window 300 s after each wake, autosleep 15 min. One turn a minute while a conversation lasts; active time = first turn's start to last turn's end (turns take 20 s). Profiles: {}.\n",
        PROFILES.iter().map(|p| format!("{} ({:.0}%)", p.name, p.share * 100.0)).collect::<Vec<_>>().join(", "));
    println!("| IDLE_AFTER | schedule | explicit sleep at end | profile | users active | billed / active | awake-idle s per conversation |");
    println!("|---|---|---|---|---|---|---|");
    for cfg in &configs {
        let r = simulate(&users, cfg).await;
        for (pi, prof) in PROFILES.iter().enumerate() {
            let (mut billed, mut active, mut convs, mut n_active) = (0.0, 0.0, 0u64, 0);
            for (u, (b, a, c)) in users.iter().zip(&r) {
                if u.profile == pi && *c > 0 {
                    billed += b;
                    active += a;
                    convs += c;
                    n_active += 1;
                }
            }
            let ratio = billed / active.max(1e-9);
            let mark = if pi == 0
                && cfg.idle_after_min == 5
                && cfg.schedule_min == 1
                && !cfg.explicit_sleep
            {
                if ratio <= 1.15 {
                    " (target ≤ 1.15: met)"
                } else {
                    " (target ≤ 1.15: MISSED)"
                }
            } else {
                ""
            };
            println!(
                "| {} min | {} min | {} | {} | {n_active} | **{ratio:.2}**{mark} | {:.0} |",
                cfg.idle_after_min,
                cfg.schedule_min,
                if cfg.explicit_sleep { "yes" } else { "no" },
                prof.name,
                (billed - active) / convs.max(1) as f64
            );
        }
    }
    println!();
}

//! What happened while the machine slept, told after a wake (docs/design.md
//! §5 "Chat turn"): how long it slept and why (the journal's last `slept`
//! entry), which commands left running the sleep interrupted (the holds and
//! `held` entries since the previous wake whose completion marker is
//! missing, or holds a kill-by-signal exit code — TERM, KILL, HUP: the shell
//! around a command may outlive it long enough to write one — written no
//! earlier than a minute before the sleep), and how the `post-wake` hook
//! ran — all found in one journal read and one execution (the hook and the
//! marker check together). The facts go
//! to the model (a system message), to the turn's events (`machine`, stage
//! `woke`) and to the journal (`woke`).

use crate::api::UserId;
use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use super::events::EventObserver;
use crate::clock::now_ms;
use crate::dedalus;
use crate::hooks::{self, Hook};
use crate::journal::{
    Actor, Event, HookOutcome, HookReport, Journal, JournalEntry, PageQuery, Reason,
};
use crate::store::UserRecord;

/// Journal entries read back to find the last sleep and the holds since the
/// previous wake.
const RECENT: u32 = 50;

/// The facts of one wake.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WakeFacts {
    /// How long the machine slept (ms), if the journal knows.
    pub slept_ms: Option<u64>,
    /// Why it slept, if the journal knows.
    pub slept_reason: Option<Reason>,
    /// The commands left running that the sleep interrupted.
    pub interrupted: Vec<String>,
    /// How the `post-wake` hook ran (absent: no hook file, or hooks off).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hook: Option<HookReport>,
    /// The same facts as the model is told them.
    pub summary: String,
}

/// Everything the wake step needs.
pub(super) struct WakeStep<'a> {
    pub journal: &'a Journal,
    pub hook_timeout: Duration,
    pub dedalus: &'a dedalus::Client,
    pub rec: &'a UserRecord,
    pub machine_id: &'a str,
    pub wake_ms: u64,
    pub deadline: Instant,
}

/// After a wake: run the `post-wake` hook, find the interrupted commands,
/// tell the turn's events and the journal; the note for the model. `None`
/// when the machine did not have to be woken.
pub(super) async fn after_wake(
    step: WakeStep<'_>,
    woke: bool,
    obs: &EventObserver<'_>,
) -> Option<String> {
    if !woke {
        return None;
    }
    let user_id = &step.rec.user_id;
    let since_wake = since_last_wake(step.journal, user_id).await;
    let held = held_commands(&since_wake, step.rec);
    let markers: Vec<String> = held.keys().cloned().collect();
    let bound = step
        .deadline
        .min(Instant::now() + step.hook_timeout + Duration::from_secs(10));
    let ran = if step.hook_timeout.is_zero() && markers.is_empty() {
        None
    } else {
        Some(
            hooks::run(
                step.dedalus,
                step.machine_id,
                Hook::PostWake,
                step.hook_timeout,
                &markers,
                bound,
            )
            .await,
        )
    };
    let now = now_ms();
    let slept = since_wake.iter().find(|e| e.event == Event::Slept);
    let mut facts = WakeFacts {
        slept_ms: slept.map(|e| now.saturating_sub(e.at_ms)),
        slept_reason: slept.and_then(|e| e.reason),
        interrupted: Vec::new(),
        hook: None,
        summary: String::new(),
    };
    if let Some(ran) = ran {
        let slept_s = slept.map(|e| e.at_ms / 1000);
        facts.interrupted = ran
            .markers
            .iter()
            .filter(|m| interrupted(m, slept_s))
            .filter_map(|m| held.get(&m.marker).cloned())
            .collect();
        facts.hook = Some(ran.report).filter(|h| h.outcome != HookOutcome::Absent);
    }
    facts.summary = summary(&facts);
    obs.woke(facts.clone());
    record_woke(&step, &facts);
    Some(facts.summary)
}

/// Whether the sleep (at `slept_s`, epoch s, if known) interrupted the
/// command of `marker`.
fn interrupted(marker: &hooks::MarkerState, slept_s: Option<u64>) -> bool {
    match (marker.exit_code, marker.written_s) {
        (None, _) => true,
        (Some(129 | 137 | 143), Some(written)) => {
            slept_s.is_none_or(|s| written.saturating_add(60) >= s)
        }
        _ => false,
    }
}

/// The journal's entries since (not including) the last wake or
/// provisioning, newest first (empty without a journal).
async fn since_last_wake(journal: &Journal, user_id: &UserId) -> Vec<JournalEntry> {
    let query = PageQuery {
        since_ms: None,
        limit: RECENT,
        cursor: None,
    };
    match journal.page(user_id, &query).await {
        Ok(page) => page
            .events
            .into_iter()
            .take_while(|e| !matches!(e.event, Event::Woke | Event::Provisioned))
            .collect(),
        Err(error) => {
            tracing::warn!(user_id = user_id.as_str(), error = %error, "journal not read after the wake");
            Vec::new()
        }
    }
}

/// Marker → command of every command that held the machine since the last
/// wake, and of the holds the item still has.
fn held_commands(since_wake: &[JournalEntry], rec: &UserRecord) -> BTreeMap<String, String> {
    let mut held: BTreeMap<String, String> = since_wake
        .iter()
        .filter(|e| e.event == Event::Held)
        .filter_map(|e| Some((e.marker.clone()?, e.command.clone()?)))
        .collect();
    for hold in rec.all_holds() {
        held.entry(hold.marker.clone()).or_insert_with(|| {
            format!(
                "a command left running (exit code due in ~/{})",
                hold.marker
            )
        });
    }
    held
}

/// The note for the model.
fn summary(facts: &WakeFacts) -> String {
    let mut s = String::from("The machine was asleep and has just been woken for this turn");
    if let Some(ms) = facts.slept_ms {
        let slept = humantime::format_duration(Duration::from_secs(ms / 1000));
        s.push_str(&format!(" (it slept for {slept}"));
        if let Some(reason) = facts.slept_reason {
            let why = serde_json::to_value(reason).unwrap_or_default();
            s.push_str(&format!(
                ", put to sleep: {}",
                why.as_str().unwrap_or("unknown")
            ));
        }
        s.push(')');
    }
    s.push_str(
        ". A sleep keeps the home directory (~) and everything in it; it does not keep \
running processes: background jobs, servers and their shells were stopped, and files \
outside ~ may have been reset.",
    );
    if !facts.interrupted.is_empty() {
        s.push_str(
            " These commands you left running were interrupted by the sleep and did not \
finish (restart them if they are still needed):",
        );
        for c in &facts.interrupted {
            s.push_str(&format!("\n- {c}"));
        }
    }
    if let Some(hook) = &facts.hook {
        let how = match hook.outcome {
            HookOutcome::Ok => "ran".to_owned(),
            HookOutcome::Failed => format!("failed (exit code {})", hook.exit_code.unwrap_or(-1)),
            HookOutcome::TimedOut => "timed out and was stopped".to_owned(),
            HookOutcome::Error | HookOutcome::Absent => "could not be run".to_owned(),
        };
        s.push_str(&format!(
            "\nThe post-wake hook (~/.agenthome/hooks/post-wake) {how}."
        ));
    }
    s
}

/// `woke`, written off the turn's path (a task of its own).
fn record_woke(step: &WakeStep<'_>, facts: &WakeFacts) {
    let journal = step.journal.clone();
    if !journal.is_on() {
        return;
    }
    let mut entry = JournalEntry::new(now_ms(), Event::Woke, Actor::Turn)
        .reason(Reason::Turn)
        .machine(Some(step.machine_id))
        .duration(step.wake_ms);
    entry.slept_ms = facts.slept_ms;
    entry.interrupted = facts.interrupted.clone();
    entry.hook = facts.hook.clone();
    let user_id = step.rec.user_id.clone();
    tokio::spawn(async move { journal.record(&user_id, entry).await });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_note_names_the_interrupted_commands_and_the_sleep() {
        let facts = WakeFacts {
            slept_ms: Some(3_723_000),
            slept_reason: Some(Reason::Idle),
            interrupted: vec!["python train.py".into()],
            hook: None,
            summary: String::new(),
        };
        let s = summary(&facts);
        assert!(s.contains("1h 2m 3s"), "{s}");
        assert!(s.contains("idle"), "{s}");
        assert!(s.contains("- python train.py"), "{s}");
        assert!(s.contains("does not keep running processes"), "{s}");
    }
}

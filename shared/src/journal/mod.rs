//! The lifecycle journal (docs/design.md §4 "Journal"): every transition of
//! a user's machine — provisioned, woke, slept, held, sleep refused, lost,
//! destroyed — with its reason, actor and cost-relevant facts, in a second
//! table (`JournalTable`: `user_id` HASH, `id` RANGE, time-ordered; TTL on
//! `expires_at`, `JOURNAL_TTL_DAYS`, default 30).
//!
//! Writes never fail or slow down what they record: [`Journal::record`]
//! logs a failed write and gives up after [`WRITE_TIMEOUT`]; callers run it
//! concurrently with their next call where there is one. A journal write
//! is its own `PutItem` — the state changes are single conditional
//! `UpdateItem`s on the users table, and folding a second table's put into
//! them would turn each into a transaction at twice the write cost.
//!
//! [`JournalBackend`] is the narrow interface; [`DynamoJournal`] and
//! [`MemoryJournal`] implement it.

mod dynamo;
mod entry;
mod memory;
pub mod summary;
pub mod table;

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;

pub use dynamo::DynamoJournal;
pub use entry::{
    entry_id, excerpt, is_entry_id, Actor, Event, HookOutcome, HookReport, JournalEntry, Reason,
};
pub use memory::MemoryJournal;
pub use summary::{awake_by_day, AwakeDayTotal};

use crate::api::UserId;
use crate::store::StoreError;

/// Longest a journal write may take before it is given up (and logged).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// Default `JOURNAL_TTL_DAYS`.
pub const DEFAULT_TTL_DAYS: u32 = 30;
/// Default page size of `GET …/machine/events`.
pub const DEFAULT_LIMIT: u32 = 20;
/// Largest page size of `GET …/machine/events`.
pub const MAX_LIMIT: u32 = 100;

/// One page request: newest first, from the newest entry (or after `cursor`)
/// back to `since_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageQuery {
    /// Oldest entry time included (epoch ms).
    pub since_ms: Option<u64>,
    /// Most entries in the page (1..=[`MAX_LIMIT`]).
    pub limit: u32,
    /// The `next_cursor` of the previous page (an entry id).
    pub cursor: Option<String>,
}

/// One page of entries, newest first.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct EventsPage {
    /// The entries.
    pub events: Vec<JournalEntry>,
    /// Pass as `cursor` for the next (older) page; `null` at the end.
    pub next_cursor: Option<String>,
}

/// The journal's storage: put one entry, read one page.
pub trait JournalBackend: Send + Sync {
    /// Store `entry` for `user_id`, expiring at `expires_at` (epoch seconds).
    fn put<'a>(
        &'a self,
        user_id: &'a UserId,
        entry: &'a JournalEntry,
        expires_at: u64,
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// One page of `user_id`'s entries, newest first. A cursor that is not an
    /// entry id is [`StoreError::InvalidCursor`].
    fn page<'a>(
        &'a self,
        user_id: &'a UserId,
        query: &'a PageQuery,
    ) -> BoxFuture<'a, Result<EventsPage, StoreError>>;
}

/// The journal handle every function holds: a backend and the TTL, or off
/// (no `JOURNAL_TABLE`: nothing is written, pages are empty). Cheap to clone.
#[derive(Clone, Default)]
pub struct Journal {
    backend: Option<Arc<dyn JournalBackend>>,
    ttl: Duration,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("on", &self.backend.is_some())
            .field("ttl", &self.ttl)
            .finish()
    }
}

impl Journal {
    /// A journal that records nothing.
    pub fn off() -> Self {
        Self::default()
    }

    /// A journal over `backend`; entries expire `ttl` after they are written.
    pub fn new(backend: Arc<dyn JournalBackend>, ttl: Duration) -> Self {
        Journal {
            backend: Some(backend),
            ttl,
        }
    }

    /// Whether entries are recorded.
    pub fn is_on(&self) -> bool {
        self.backend.is_some()
    }

    /// Record `entry` for `user_id`. Never fails and never waits longer than
    /// [`WRITE_TIMEOUT`]: a lost entry is logged, the transition stands.
    pub async fn record(&self, user_id: &UserId, entry: JournalEntry) {
        let Some(backend) = &self.backend else {
            return;
        };
        let expires_at = (entry.at_ms / 1000).saturating_add(self.ttl.as_secs());
        match tokio::time::timeout(WRITE_TIMEOUT, backend.put(user_id, &entry, expires_at)).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::warn!(user_id = user_id.as_str(), event = ?entry.event, error = %error, "journal entry not written")
            }
            Err(_) => {
                tracing::warn!(user_id = user_id.as_str(), event = ?entry.event, "journal entry not written in time")
            }
        }
    }

    /// One page of `user_id`'s entries (an empty last page when off).
    pub async fn page(
        &self,
        user_id: &UserId,
        query: &PageQuery,
    ) -> Result<EventsPage, StoreError> {
        match &self.backend {
            Some(backend) => backend.page(user_id, query).await,
            None => Ok(EventsPage {
                events: Vec::new(),
                next_cursor: None,
            }),
        }
    }

    /// Every entry since `since_ms`, newest first, at most `max` (for the
    /// awake-time summary).
    pub async fn since(
        &self,
        user_id: &UserId,
        since_ms: u64,
        max: usize,
    ) -> Result<Vec<JournalEntry>, StoreError> {
        let mut query = PageQuery {
            since_ms: Some(since_ms),
            limit: MAX_LIMIT,
            cursor: None,
        };
        let mut out = Vec::new();
        loop {
            let page = self.page(user_id, &query).await?;
            out.extend(page.events);
            match page.next_cursor {
                Some(next) if out.len() < max => query.cursor = Some(next),
                _ => break,
            }
        }
        out.truncate(max);
        Ok(out)
    }
}

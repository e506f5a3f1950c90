//! The journal in memory, with the DynamoDB adapter's semantics (for fast
//! domain tests).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use futures_util::future::BoxFuture;

use super::{is_entry_id, EventsPage, JournalBackend, JournalEntry, PageQuery};
use crate::api::UserId;
use crate::store::StoreError;

/// Entries per user, ordered by id.
#[derive(Debug, Clone, Default)]
pub struct MemoryJournal {
    entries: Arc<Mutex<BTreeMap<(String, String), JournalEntry>>>,
}

impl MemoryJournal {
    /// An empty journal.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<(String, String), JournalEntry>> {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn page_now(&self, user_id: &UserId, q: &PageQuery) -> Result<EventsPage, StoreError> {
        if q.cursor.as_deref().is_some_and(|c| !is_entry_id(c)) {
            return Err(StoreError::InvalidCursor);
        }
        let since = q.since_ms.map(|s| format!("{s:013}"));
        let entries = self.lock();
        let mut matching = entries
            .iter()
            .rev()
            .filter(|((u, id), _)| {
                u == user_id.as_str()
                    && since.as_deref().is_none_or(|s| id.as_str() >= s)
                    && q.cursor.as_deref().is_none_or(|c| id.as_str() < c)
            })
            .map(|(_, e)| e.clone());
        let limit = q.limit.max(1) as usize;
        let events: Vec<JournalEntry> = matching.by_ref().take(limit).collect();
        let more = matching.next().is_some();
        let next_cursor = (more || events.len() == limit)
            .then(|| events.last().map(|e| e.id.clone()))
            .flatten();
        Ok(EventsPage {
            events,
            next_cursor,
        })
    }
}

impl JournalBackend for MemoryJournal {
    fn put<'a>(
        &'a self,
        user_id: &'a UserId,
        entry: &'a JournalEntry,
        _expires_at: u64,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.lock()
            .insert((user_id.to_string(), entry.id.clone()), entry.clone());
        Box::pin(async { Ok(()) })
    }

    fn page<'a>(
        &'a self,
        user_id: &'a UserId,
        query: &'a PageQuery,
    ) -> BoxFuture<'a, Result<EventsPage, StoreError>> {
        let page = self.page_now(user_id, query);
        Box::pin(async move { page })
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Actor, Event, Journal};
    use super::*;
    use crate::api::user_id::uid;

    #[tokio::test]
    async fn pages_go_newest_first_with_a_cursor_and_since() {
        let mem = MemoryJournal::new();
        let journal = Journal::new(Arc::new(mem.clone()), std::time::Duration::from_secs(60));
        for at in [1000u64, 2000, 3000, 4000, 5000] {
            journal
                .record(&uid("u"), JournalEntry::new(at, Event::Woke, Actor::Turn))
                .await;
        }
        journal
            .record(
                &uid("other"),
                JournalEntry::new(9000, Event::Slept, Actor::Sweep),
            )
            .await;
        let q = PageQuery {
            since_ms: Some(2000),
            limit: 2,
            cursor: None,
        };
        let first = journal.page(&uid("u"), &q).await.expect("page");
        let at: Vec<u64> = first.events.iter().map(|e| e.at_ms).collect();
        assert_eq!(at, [5000, 4000]);
        let q2 = PageQuery {
            cursor: first.next_cursor.clone(),
            ..q.clone()
        };
        let second = journal.page(&uid("u"), &q2).await.expect("page");
        assert_eq!(
            second.events.iter().map(|e| e.at_ms).collect::<Vec<_>>(),
            [3000, 2000]
        );
        let q3 = PageQuery {
            cursor: Some("nonsense".into()),
            ..q
        };
        assert!(matches!(
            journal.page(&uid("u"), &q3).await,
            Err(StoreError::InvalidCursor)
        ));
        assert_eq!(
            journal.since(&uid("u"), 0, 100).await.expect("all").len(),
            5
        );
    }
}

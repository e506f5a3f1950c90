//! The one walk over the sparse `awake` index, shard by shard and page by
//! page (the sweep, reconciliation and the shard migration all use it), and
//! the migration that moves awake items into the current shard layout.

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::store::{Cursor, Page, ShardLayout, UserRecord, UserStore};

/// Pages of `awake_shard ∈ shards AND last_active_at < idle_before`, shard
/// after shard. A failed query is logged and its shard left for the next
/// run (`incomplete`); the walk stops at `deadline` (`incomplete` too).
pub(crate) struct ShardWalk<'a, S> {
    store: &'a S,
    shards: Vec<String>,
    next_shard: usize,
    current: Option<(String, Option<Cursor>)>,
    first: Option<Page<UserRecord>>,
    idle_before: u64,
    page_size: u32,
    deadline: Instant,
    /// Some shard was not walked to its end.
    pub(crate) incomplete: bool,
    /// Index queries that failed.
    pub(crate) errors: u64,
}

impl<'a, S: UserStore> ShardWalk<'a, S> {
    pub(crate) fn new(
        store: &'a S,
        shards: Vec<String>,
        idle_before: u64,
        page_size: u32,
        deadline: Instant,
    ) -> Self {
        Self {
            store,
            shards,
            next_shard: 0,
            current: None,
            first: None,
            idle_before,
            page_size: page_size.max(1),
            deadline,
            incomplete: false,
            errors: 0,
        }
    }

    /// Start with `page`, already read from the first shard (the
    /// coordinator's sample), so no item is read twice.
    pub(crate) fn with_first_page(mut self, page: Page<UserRecord>) -> Self {
        self.first = Some(page);
        self
    }

    /// The next page of candidates; `None` when every shard is done or the
    /// deadline came.
    pub(crate) async fn next_page(&mut self, run_id: &str) -> Option<Vec<UserRecord>> {
        loop {
            let done = self.current.is_none() && self.next_shard >= self.shards.len();
            if done {
                return None;
            }
            if Instant::now() >= self.deadline {
                self.incomplete = true;
                return None;
            }
            if self.current.is_none() {
                let shard = self.shards.get(self.next_shard)?.clone();
                self.next_shard += 1;
                if let Some(page) = self.first.take() {
                    if let Some(cursor) = page.cursor {
                        self.current = Some((shard, Some(cursor)));
                    }
                    return Some(page.items);
                }
                self.current = Some((shard, None));
            }
            let Some((shard, cursor)) = self.current.take() else {
                continue;
            };
            let page = match self
                .store
                .query_awake_idle(&shard, self.idle_before, cursor.as_ref(), self.page_size)
                .await
            {
                Ok(page) => page,
                Err(error) => {
                    tracing::error!(run_id, shard, error = %error, "awake index query failed; shard left for the next run");
                    self.incomplete = true;
                    self.errors += 1;
                    continue;
                }
            };
            if let Some(next) = page.cursor {
                self.current = Some((shard, Some(next)));
            }
            return Some(page.items);
        }
    }
}

/// What one migration run did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationReport {
    /// `AWAKE_SHARDS` in force.
    pub shards: u32,
    /// The shards read (the union of the current and previous ranges).
    pub shards_read: u32,
    /// Awake items looked at.
    pub scanned: u64,
    /// Items moved into the shard the current layout gives them.
    pub moved: u64,
    /// Items already in place.
    pub in_place: u64,
    /// Items that left their shard while being moved (slept or woke: the
    /// write that did it put them in place).
    pub skipped: u64,
    /// Moves that failed (store errors): run the migration again.
    pub failed: u64,
    /// The run did not finish (deadline, a failed query, failed moves): run
    /// it again; `AWAKE_SHARDS_PREVIOUS` may be removed only after a run
    /// with `complete: true`.
    pub complete: bool,
}

/// Move every awake item whose `awake_shard` is not the one `layout` gives
/// it (items woken under a previous shard count) into place. Reads the awake
/// index only (the union of both ranges); one conditional write per moved
/// item. Idempotent: run it until it reports `complete`.
pub async fn migrate<S: UserStore>(
    store: &S,
    layout: ShardLayout,
    page_size: u32,
    deadline: Instant,
) -> MigrationReport {
    let run_id = uuid::Uuid::now_v7().simple().to_string();
    let shards = layout.read_shards();
    let mut report = MigrationReport {
        shards: layout.shards,
        shards_read: u32::try_from(shards.len()).unwrap_or(u32::MAX),
        ..MigrationReport::default()
    };
    let mut walk = ShardWalk::new(store, shards, u64::MAX, page_size, deadline);
    while let Some(items) = walk.next_page(&run_id).await {
        for rec in items {
            report.scanned += 1;
            let Some(from) = rec.awake_shard.as_deref() else {
                continue;
            };
            if layout.in_place(&rec.user_id, from) {
                report.in_place += 1;
                continue;
            }
            let to = layout.shard_of(&rec.user_id);
            match store.move_awake_shard(&rec.user_id, from, &to).await {
                Ok(true) => report.moved += 1,
                Ok(false) => report.skipped += 1,
                Err(error) => {
                    tracing::warn!(run_id, user_id = rec.user_id.as_str(), error = %error, "awake item not moved");
                    report.failed += 1;
                }
            }
        }
    }
    report.complete = !walk.incomplete && report.failed == 0;
    tracing::info!(
        run_id,
        shards = report.shards,
        shards_read = report.shards_read,
        scanned = report.scanned,
        moved = report.moved,
        in_place = report.in_place,
        skipped = report.skipped,
        failed = report.failed,
        complete = report.complete,
        "awake shard migration finished"
    );
    report
}

impl<S: UserStore + 'static> super::Sweeper<S> {
    /// [`migrate`] the sweeper's table to its settings' shard layout.
    pub async fn migrate_shards(&self, deadline: Instant) -> MigrationReport {
        migrate(
            &*self.store,
            self.settings.shards,
            self.settings.page_size,
            deadline,
        )
        .await
    }
}

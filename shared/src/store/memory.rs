//! In-memory [`UserStore`](super::UserStore) with the same semantics as
//! [`DynamoStore`](super::DynamoStore): items are kept as raw DynamoDB
//! attribute maps and every write runs the same condition and actions the
//! DynamoDB adapter sends, evaluated with DynamoDB's rules. Index queries
//! see writes immediately (DynamoDB's are eventually consistent: code must not
//! rely on either). For fast domain unit tests and the simulator.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};

use aws_sdk_dynamodb::types::AttributeValue;

use super::engine::{awake_key, pending_key, AwakeKey, Backend, Cond, PendingKey, Refused, Update};
use super::record::Item;
use super::table::attr;
use super::{Result, StoreError, UserRecord};
use crate::api::UserId;

/// A hook awaited before every backend call (get, put, update, delete,
/// query), with the call's name and user id (empty for index queries).
/// Tests use it to pause operations at exact points and interleave
/// concurrent callers deterministically.
pub type StoreHook =
    Arc<dyn Fn(&'static str, &str) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// The in-memory user→machine table.
#[derive(Default)]
pub struct MemoryStore {
    items: Mutex<Table>,
    hook: Option<StoreHook>,
    awake_shards: Option<u32>,
}

/// The items and the `awake` index over them, kept together under one lock:
/// the index is the sorted set of `(awake_shard, last_active_at, user_id)` of
/// the items that have both key attributes (sparse, like the GSI), so a
/// query costs O(log n + page), like DynamoDB's, not O(items).
#[derive(Default)]
struct Table {
    items: HashMap<String, Item>,
    awake: BTreeSet<(String, u64, String)>,
    /// The `pending-sleep` index: (shard, sleep_at, user id).
    pending: BTreeSet<(String, u64, String)>,
}

fn pending_index_key(user_id: &str, item: &Item) -> Option<(String, u64, String)> {
    let shard = match item.get(attr::SLEEP_SHARD) {
        Some(AttributeValue::S(s)) => s.clone(),
        _ => return None,
    };
    let at = match item.get(attr::SLEEP_AT) {
        Some(AttributeValue::N(n)) => n.trim().parse::<u64>().ok()?,
        _ => return None,
    };
    Some((shard, at, user_id.to_owned()))
}

fn index_key(user_id: &str, item: &Item) -> Option<(String, u64, String)> {
    let shard = match item.get(attr::AWAKE_SHARD) {
        Some(AttributeValue::S(s)) => s.clone(),
        _ => return None,
    };
    let at = match item.get(attr::LAST_ACTIVE_AT) {
        Some(AttributeValue::N(n)) => n.trim().parse::<u64>().ok()?,
        _ => return None,
    };
    Some((shard, at, user_id.to_owned()))
}

impl Table {
    fn get(&self, user_id: &str) -> Option<&Item> {
        self.items.get(user_id)
    }

    fn insert(&mut self, user_id: String, item: Item) {
        self.remove(&user_id);
        if let Some(k) = index_key(&user_id, &item) {
            self.awake.insert(k);
        }
        if let Some(k) = pending_index_key(&user_id, &item) {
            self.pending.insert(k);
        }
        self.items.insert(user_id, item);
    }

    fn remove(&mut self, user_id: &str) -> Option<Item> {
        let old = self.items.remove(user_id)?;
        if let Some(k) = index_key(user_id, &old) {
            self.awake.remove(&k);
        }
        if let Some(k) = pending_index_key(user_id, &old) {
            self.pending.remove(&k);
        }
        Some(old)
    }
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("items", &self.lock().items.len())
            .field("hook", &self.hook.is_some())
            .finish()
    }
}

impl MemoryStore {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty table that awaits `hook` before every backend call.
    pub fn with_hook(hook: StoreHook) -> Self {
        Self {
            items: Mutex::default(),
            hook: Some(hook),
            awake_shards: None,
        }
    }

    /// The same table writing awake items with `shards` shards
    /// (`AWAKE_SHARDS`; default [`AWAKE_SHARDS`](super::AWAKE_SHARDS)).
    pub fn with_awake_shards(mut self, shards: u32) -> Self {
        self.awake_shards = Some(shards.max(1));
        self
    }

    async fn pause(&self, op: &'static str, user_id: &str) {
        if let Some(hook) = &self.hook {
            hook(op, user_id).await;
        }
    }

    /// Insert or replace a raw item (tests: seed odd or legacy items).
    pub fn put_raw(&self, item: Item) -> Result<()> {
        let user_id = match item.get(attr::USER_ID) {
            Some(AttributeValue::S(u)) if !u.is_empty() => u.clone(),
            _ => {
                return Err(StoreError::InvalidArgument(
                    "item needs a non-empty string user_id".to_owned(),
                ))
            }
        };
        self.lock().insert(user_id, item);
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        // A panic while holding the lock cannot leave an item half-written
        // (writes replace whole items), so a poisoned lock is still usable.
        self.items.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn decode(item: Option<&Item>) -> Result<Option<UserRecord>> {
    item.map(|i| UserRecord::from_item(i.clone())).transpose()
}

impl Backend for MemoryStore {
    async fn put_new(&self, record: &UserRecord) -> Result<std::result::Result<(), Refused>> {
        let user_id = record.user_id.as_str();
        self.pause("claim", user_id).await;
        let item = record.to_item()?;
        let mut items = self.lock();
        if let Some(existing) = items.get(user_id) {
            return Ok(Err(decode(Some(existing))?));
        }
        items.insert(user_id.to_owned(), item);
        Ok(Ok(()))
    }

    async fn delete_item(
        &self,
        user_id: &UserId,
        cond: Cond,
    ) -> Result<std::result::Result<UserRecord, Refused>> {
        let user_id = user_id.as_str();
        self.pause("delete", user_id).await;
        let mut items = self.lock();
        let current = items.get(user_id).cloned().unwrap_or_default();
        if !cond.eval(&current) {
            return Ok(Err(decode(items.get(user_id))?));
        }
        match items.remove(user_id) {
            Some(old) => Ok(Ok(UserRecord::from_item(old)?)),
            None => Ok(Err(None)),
        }
    }

    async fn query_awake(
        &self,
        shard: &str,
        idle_before_ms: u64,
        start: Option<AwakeKey>,
        limit: u32,
    ) -> Result<(Vec<UserRecord>, Option<AwakeKey>)> {
        self.pause("query_awake", "").await;
        let table = self.lock();
        let after = start.map(|k| (k.shard, k.last_active_at, k.user_id));
        let from = match &after {
            Some(k) => std::ops::Bound::Excluded(k.clone()),
            None => std::ops::Bound::Included((shard.to_owned(), 0, String::new())),
        };
        let take = usize::try_from(limit)
            .unwrap_or(usize::MAX)
            .saturating_add(1);
        let keys: Vec<(String, u64, String)> = table
            .awake
            .range((from, std::ops::Bound::Unbounded))
            .take_while(|(s, at, _)| s == shard && *at < idle_before_ms)
            .take(take)
            .cloned()
            .collect();
        let matching = keys
            .iter()
            .filter_map(|(_, _, user)| table.items.get(user).cloned())
            .map(UserRecord::from_item)
            .collect::<Result<Vec<_>>>()?;
        Ok(page_of(matching, limit, awake_key))
    }

    async fn query_machine(&self, machine_id: &str) -> Result<Vec<UserRecord>> {
        self.pause("query_machine", "").await;
        let key_condition = Cond::Eq(attr::MACHINE_ID, AttributeValue::S(machine_id.to_owned()));
        let found: Vec<Item> = self
            .lock()
            .items
            .values()
            .filter(|item| key_condition.eval(item))
            .cloned()
            .collect();
        found.into_iter().map(UserRecord::from_item).collect()
    }

    async fn query_pending(
        &self,
        shard: &str,
        due_by_ms: u64,
        start: Option<PendingKey>,
        limit: u32,
    ) -> Result<(Vec<UserRecord>, Option<PendingKey>)> {
        self.pause("query_pending", "").await;
        let table = self.lock();
        let from = match start {
            Some(k) => std::ops::Bound::Excluded((k.shard, k.sleep_at, k.user_id)),
            None => std::ops::Bound::Included((shard.to_owned(), 0, String::new())),
        };
        let take = usize::try_from(limit)
            .unwrap_or(usize::MAX)
            .saturating_add(1);
        let matching = table
            .pending
            .range((from, std::ops::Bound::Unbounded))
            .take_while(|(s, at, _)| s == shard && *at <= due_by_ms)
            .take(take)
            .filter_map(|(_, _, user_id)| table.get(user_id).cloned())
            .map(UserRecord::from_item)
            .collect::<Result<Vec<_>>>()?;
        Ok(page_of(matching, limit, pending_key))
    }

    fn awake_shards(&self) -> u32 {
        self.awake_shards.unwrap_or(super::AWAKE_SHARDS)
    }
}

/// Raw item access (turn keys, the provisioning stage), with the same
/// condition semantics as the typed operations.
impl super::raw::RawItems for MemoryStore {
    async fn get_raw(&self, key: &str) -> Result<Option<Item>> {
        self.pause("get", key).await;
        Ok(self.lock().get(key).cloned())
    }

    async fn put_raw_if(
        &self,
        op: &'static str,
        item: Item,
        cond: Cond,
    ) -> Result<std::result::Result<(), super::raw::RefusedRaw>> {
        let key = match item.get(attr::USER_ID) {
            Some(AttributeValue::S(k)) if !k.is_empty() => k.clone(),
            _ => {
                return Err(StoreError::InvalidArgument(
                    "item needs a non-empty string key".to_owned(),
                ))
            }
        };
        self.pause(op, &key).await;
        let mut items = self.lock();
        let current = items.get(&key).cloned().unwrap_or_default();
        if !cond.eval(&current) {
            return Ok(Err(items.get(&key).cloned()));
        }
        items.insert(key, item);
        Ok(Ok(()))
    }

    async fn update_raw(
        &self,
        op: &'static str,
        key: &str,
        update: Update,
    ) -> Result<std::result::Result<Item, super::raw::RefusedRaw>> {
        self.pause(op, key).await;
        let mut items = self.lock();
        let current = items.get(key).cloned().unwrap_or_default();
        if !update.cond.eval(&current) {
            return Ok(Err(items.get(key).cloned()));
        }
        let mut next = current;
        next.insert(attr::USER_ID.to_owned(), AttributeValue::S(key.to_owned()));
        for action in &update.actions {
            action.apply(&mut next);
        }
        items.insert(key.to_owned(), next.clone());
        Ok(Ok(next))
    }
}

/// A page of at most `limit` items from `matching` (read with one extra, to
/// know whether more follow) and the key to continue after its last item.
fn page_of<K>(
    mut matching: Vec<UserRecord>,
    limit: u32,
    key: impl Fn(&UserRecord) -> Option<K>,
) -> (Vec<UserRecord>, Option<K>) {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let more = matching.len() > limit;
    matching.truncate(limit);
    let last = if more {
        matching.last().and_then(key)
    } else {
        None
    };
    (matching, last)
}

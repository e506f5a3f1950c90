//! Raw item access for the table's other item kinds (turn idempotency keys,
//! see [`super::turn_keys`]) and for attributes [`super::UserRecord`] does
//! not carry (the provisioning stage, see [`super::stage`]). Sealed: the
//! DynamoDB and in-memory adapters implement it with the same semantics
//! (conditions evaluated with DynamoDB's rules), nothing else can.

use std::future::Future;

use super::engine::{Cond, Update};
use super::record::Item;
use super::Result;

/// A refused raw write: the item as it is, if it exists and the backend
/// returned it.
pub type RefusedRaw = Option<Item>;

/// Raw item operations keyed by the table's partition key.
pub trait RawItems: Send + Sync {
    /// Strongly consistent read of the item with partition key `key`.
    fn get_raw(&self, key: &str) -> impl Future<Output = Result<Option<Item>>> + Send;

    /// Put `item` (which carries its own key) if `cond` holds on the
    /// current item (an absent item has no attributes).
    fn put_raw_if(
        &self,
        op: &'static str,
        item: Item,
        cond: Cond,
    ) -> impl Future<Output = Result<std::result::Result<(), RefusedRaw>>> + Send;

    /// Conditional update of the item with key `key`; the item after the
    /// write. The caller's condition decides whether a missing item counts.
    fn update_raw(
        &self,
        op: &'static str,
        key: &str,
        update: Update,
    ) -> impl Future<Output = Result<std::result::Result<Item, RefusedRaw>>> + Send;
}

impl<B: RawItems> RawItems for std::sync::Arc<B> {
    fn get_raw(&self, key: &str) -> impl Future<Output = Result<Option<Item>>> + Send {
        (**self).get_raw(key)
    }
    fn put_raw_if(
        &self,
        op: &'static str,
        item: Item,
        cond: Cond,
    ) -> impl Future<Output = Result<std::result::Result<(), RefusedRaw>>> + Send {
        (**self).put_raw_if(op, item, cond)
    }
    fn update_raw(
        &self,
        op: &'static str,
        key: &str,
        update: Update,
    ) -> impl Future<Output = Result<std::result::Result<Item, RefusedRaw>>> + Send {
        (**self).update_raw(op, key, update)
    }
}

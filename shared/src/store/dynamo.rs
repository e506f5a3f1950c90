//! DynamoDB adapter: renders the engine's conditions and actions as
//! DynamoDB expressions (every attribute name behind a `#name` placeholder),
//! asks for `ALL_OLD` on a refused condition so conflicts carry the current
//! item without a second read, and classifies SDK errors.
//!
//! Every SDK call is awaited boxed (`.boxed()`): its future is kilobytes
//! in a debug build, and inline it would be carried by every store future
//! and every caller's, up to the handler, whose poll frames then neared a
//! test thread's stack (`tests/tests/future_size.rs` keeps the bound).

use std::collections::HashMap;

use aws_sdk_dynamodb::config::http::HttpResponse;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::delete_item::DeleteItemError;
use aws_sdk_dynamodb::operation::put_item::PutItemError;
use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::types::{AttributeValue, ReturnValue, ReturnValuesOnConditionCheckFailure};
use futures_util::FutureExt as _;

use super::engine::{key, Action, AwakeKey, Backend, Cond, PendingKey, Refused, Update};
use super::record::Item;
use super::table::{attr, AWAKE_INDEX, BY_MACHINE_INDEX, PENDING_SLEEP_INDEX};
use super::{Result, StoreError, UserRecord};
use crate::api::UserId;

/// The user→machine table in DynamoDB.
#[derive(Debug, Clone)]
pub struct DynamoStore {
    client: aws_sdk_dynamodb::Client,
    table: String,
    awake_shards: Option<u32>,
}

impl DynamoStore {
    /// A store over `table_name`, using `client` (built once by the caller,
    /// with its region, credentials, endpoint and retry policy).
    pub fn new(client: aws_sdk_dynamodb::Client, table_name: impl Into<String>) -> Self {
        Self {
            client,
            table: table_name.into(),
            awake_shards: None,
        }
    }

    /// The same store writing awake items with `shards` shards
    /// (`AWAKE_SHARDS`; default [`AWAKE_SHARDS`](super::AWAKE_SHARDS)).
    pub fn with_awake_shards(mut self, shards: u32) -> Self {
        self.awake_shards = Some(shards.max(1));
        self
    }

    /// The table name.
    pub fn table_name(&self) -> &str {
        &self.table
    }
}

/// Error codes worth retrying (besides any 5xx and transport failures).
const RETRYABLE_CODES: &[&str] = &[
    "ProvisionedThroughputExceededException",
    "ThrottlingException",
    "RequestLimitExceeded",
    "LimitExceededException",
    "InternalServerError",
    "ServiceUnavailable",
    "TransactionConflictException",
];

impl StoreError {
    /// Wrap an SDK error, deciding whether it is retryable.
    pub(crate) fn from_sdk<E>(op: &'static str, err: SdkError<E, HttpResponse>) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let retryable = match &err {
            SdkError::TimeoutError(_) | SdkError::ResponseError(_) => true,
            SdkError::DispatchFailure(f) => !f.is_user(),
            SdkError::ServiceError(se) => {
                let status = se.raw().status().as_u16();
                status >= 500
                    || status == 429
                    || se
                        .err()
                        .code()
                        .is_some_and(|c| RETRYABLE_CODES.contains(&c))
            }
            _ => false,
        };
        Self::backend(op, retryable, err)
    }
}

/// Expression builder: placeholders for names and values.
#[derive(Default)]
struct Expr {
    names: HashMap<String, String>,
    values: HashMap<String, AttributeValue>,
}

impl Expr {
    fn name(&mut self, attribute: &str) -> String {
        let placeholder = format!("#{attribute}");
        self.names.insert(placeholder.clone(), attribute.to_owned());
        placeholder
    }

    fn value(&mut self, v: AttributeValue) -> String {
        let placeholder = format!(":v{}", self.values.len());
        self.values.insert(placeholder.clone(), v);
        placeholder
    }

    fn condition(&mut self, c: &Cond) -> String {
        match c {
            Cond::Exists(a) => format!("attribute_exists({})", self.name(a)),
            Cond::NotExists(a) => format!("attribute_not_exists({})", self.name(a)),
            Cond::Eq(a, v) => format!("{} = {}", self.name(a), self.value(v.clone())),
            Cond::Lt(a, bound) => {
                format!(
                    "{} < {}",
                    self.name(a),
                    self.value(AttributeValue::N(bound.to_string()))
                )
            }
            Cond::In(a, vs) => {
                let name = self.name(a);
                let list: Vec<String> = vs.iter().map(|v| self.value(v.clone())).collect();
                format!("{name} IN ({})", list.join(", "))
            }
            Cond::And(cs) => self.join(cs, " AND "),
            Cond::Or(cs) => self.join(cs, " OR "),
        }
    }

    fn join(&mut self, cs: &[Cond], op: &str) -> String {
        let parts: Vec<String> = cs.iter().map(|c| self.condition(c)).collect();
        format!("({})", parts.join(op))
    }

    fn update(&mut self, actions: &[Action]) -> String {
        let mut sets = Vec::new();
        let mut removes = Vec::new();
        for action in actions {
            match action {
                Action::Set(a, v) => {
                    sets.push(format!("{} = {}", self.name(a), self.value(v.clone())))
                }
                Action::SetIfNotExists(a, v) => {
                    let name = self.name(a);
                    let value = self.value(v.clone());
                    sets.push(format!("{name} = if_not_exists({name}, {value})"));
                }
                Action::Add(a, delta) => {
                    let name = self.name(a);
                    let zero = self.value(AttributeValue::N("0".to_owned()));
                    let delta = self.value(AttributeValue::N(delta.to_string()));
                    sets.push(format!("{name} = if_not_exists({name}, {zero}) + {delta}"));
                }
                Action::Remove(a) => removes.push(self.name(a)),
                Action::CopyOr(a, from, v) => {
                    let name = self.name(a);
                    let from = self.name(from);
                    let value = self.value(v.clone());
                    sets.push(format!("{name} = if_not_exists({from}, {value})"));
                }
            }
        }
        let mut expr = String::new();
        if !sets.is_empty() {
            expr.push_str("SET ");
            expr.push_str(&sets.join(", "));
        }
        if !removes.is_empty() {
            if !expr.is_empty() {
                expr.push(' ');
            }
            expr.push_str("REMOVE ");
            expr.push_str(&removes.join(", "));
        }
        expr
    }

    fn values(
        self,
    ) -> (
        HashMap<String, String>,
        Option<HashMap<String, AttributeValue>>,
    ) {
        let values = (!self.values.is_empty()).then_some(self.values);
        (self.names, values)
    }
}

fn decode(item: Option<HashMap<String, AttributeValue>>) -> Result<Option<UserRecord>> {
    item.map(UserRecord::from_item).transpose()
}

/// A position in one of the sharded indexes (`awake`, `pending-sleep`):
/// which index, its partition (shard) and sort attributes, how the query
/// bounds the sort key, and the key as (shard, sort, user id).
trait ShardedKey: Sized {
    /// The operation named in errors.
    const OP: &'static str;
    /// The index.
    const INDEX: &'static str;
    /// The partition attribute.
    const SHARD: &'static str;
    /// The sort attribute.
    const SORT: &'static str;
    /// `<` or `<=`: how the sort key compares with the query's bound.
    const CMP: &'static str;
    /// (shard, sort, user id).
    fn into_parts(self) -> (String, u64, String);
    /// The key from (shard, sort, user id).
    fn from_parts(shard: String, sort: u64, user_id: String) -> Self;
}

impl ShardedKey for AwakeKey {
    const OP: &'static str = "query_awake_idle";
    const INDEX: &'static str = AWAKE_INDEX;
    const SHARD: &'static str = attr::AWAKE_SHARD;
    const SORT: &'static str = attr::LAST_ACTIVE_AT;
    const CMP: &'static str = "<";
    fn into_parts(self) -> (String, u64, String) {
        (self.shard, self.last_active_at, self.user_id)
    }
    fn from_parts(shard: String, last_active_at: u64, user_id: String) -> Self {
        Self {
            shard,
            last_active_at,
            user_id,
        }
    }
}

impl ShardedKey for PendingKey {
    const OP: &'static str = "query_pending_sleeps";
    const INDEX: &'static str = PENDING_SLEEP_INDEX;
    const SHARD: &'static str = attr::SLEEP_SHARD;
    const SORT: &'static str = attr::SLEEP_AT;
    const CMP: &'static str = "<=";
    fn into_parts(self) -> (String, u64, String) {
        (self.shard, self.sleep_at, self.user_id)
    }
    fn from_parts(shard: String, sleep_at: u64, user_id: String) -> Self {
        Self {
            shard,
            sleep_at,
            user_id,
        }
    }
}

/// The `ExclusiveStartKey` continuing after `key`.
fn start_key<K: ShardedKey>(key: K) -> Item {
    let (shard, sort, user_id) = key.into_parts();
    HashMap::from([
        (attr::USER_ID.to_owned(), AttributeValue::S(user_id)),
        (K::SHARD.to_owned(), AttributeValue::S(shard)),
        (K::SORT.to_owned(), AttributeValue::N(sort.to_string())),
    ])
}

/// The (partition, sort, user id) of a sharded index's `LastEvaluatedKey`.
fn index_key_from(lek: &Item, shard_attr: &str, sort_attr: &str) -> Result<(String, u64, String)> {
    let string = |a: &str| match lek.get(a) {
        Some(AttributeValue::S(v)) => Ok(v.clone()),
        _ => Err(StoreError::Malformed {
            attribute: a.to_owned(),
            message: "missing or not a string in LastEvaluatedKey".to_owned(),
        }),
    };
    let sort = match lek.get(sort_attr) {
        Some(AttributeValue::N(v)) => v.parse().ok(),
        _ => None,
    }
    .ok_or_else(|| StoreError::Malformed {
        attribute: sort_attr.to_owned(),
        message: "missing or not a u64 in LastEvaluatedKey".to_owned(),
    })?;
    Ok((string(shard_attr)?, sort, string(attr::USER_ID)?))
}

impl Backend for DynamoStore {
    async fn put_new(&self, record: &UserRecord) -> Result<std::result::Result<(), Refused>> {
        crate::metrics::table_call();
        let sent = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(record.to_item()?))
            .condition_expression("attribute_not_exists(#u)")
            .expression_attribute_names("#u", attr::USER_ID)
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .send()
            .boxed()
            .await;
        match sent {
            Ok(_) => Ok(Ok(())),
            Err(err) => match err.as_service_error() {
                Some(PutItemError::ConditionalCheckFailedException(c)) => {
                    Ok(Err(decode(c.item().cloned())?))
                }
                _ => Err(StoreError::from_sdk("claim", err)),
            },
        }
    }

    async fn delete_item(
        &self,
        user_id: &UserId,
        cond: Cond,
    ) -> Result<std::result::Result<UserRecord, Refused>> {
        let mut expr = Expr::default();
        let condition = expr.condition(&cond);
        let (names, values) = expr.values();
        crate::metrics::table_call();
        let sent = self
            .client
            .delete_item()
            .table_name(&self.table)
            .set_key(Some(key(user_id.as_str())))
            .condition_expression(condition)
            .set_expression_attribute_names(Some(names))
            .set_expression_attribute_values(values)
            .return_values(ReturnValue::AllOld)
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .send()
            .boxed()
            .await;
        match sent {
            Ok(out) => Ok(decode(out.attributes)?.ok_or(None)),
            Err(err) => match err.as_service_error() {
                Some(DeleteItemError::ConditionalCheckFailedException(c)) => {
                    Ok(Err(decode(c.item().cloned())?))
                }
                _ => Err(StoreError::from_sdk("delete", err)),
            },
        }
    }

    async fn query_awake(
        &self,
        shard: &str,
        idle_before_ms: u64,
        start: Option<AwakeKey>,
        limit: u32,
    ) -> Result<(Vec<UserRecord>, Option<AwakeKey>)> {
        self.query_sharded(shard, idle_before_ms, start, limit)
            .await
    }

    async fn query_machine(&self, machine_id: &str) -> Result<Vec<UserRecord>> {
        let mut found = Vec::new();
        let mut start = None;
        loop {
            crate::metrics::table_call();
            let out = self
                .client
                .query()
                .table_name(&self.table)
                .index_name(BY_MACHINE_INDEX)
                .key_condition_expression("#m = :m")
                .expression_attribute_names("#m", attr::MACHINE_ID)
                .expression_attribute_values(":m", AttributeValue::S(machine_id.to_owned()))
                .set_exclusive_start_key(start)
                .send()
                .boxed()
                .await
                .map_err(|e| StoreError::from_sdk("find_by_machine", e))?;
            for item in out.items.unwrap_or_default() {
                found.push(UserRecord::from_item(item)?);
            }
            match out.last_evaluated_key {
                Some(lek) if !lek.is_empty() => start = Some(lek),
                _ => return Ok(found),
            }
        }
    }

    async fn query_pending(
        &self,
        shard: &str,
        due_by_ms: u64,
        start: Option<PendingKey>,
        limit: u32,
    ) -> Result<(Vec<UserRecord>, Option<PendingKey>)> {
        self.query_sharded(shard, due_by_ms, start, limit).await
    }

    fn awake_shards(&self) -> u32 {
        self.awake_shards.unwrap_or(super::AWAKE_SHARDS)
    }
}

/// Raw item access (turn keys, the provisioning stage): the same request
/// shapes as the typed operations, without decoding a [`UserRecord`].
impl super::raw::RawItems for DynamoStore {
    async fn get_raw(&self, pk: &str) -> Result<Option<Item>> {
        crate::metrics::table_call();
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(key(pk)))
            .consistent_read(true)
            .send()
            .boxed()
            .await
            .map_err(|e| StoreError::from_sdk("get", e))?;
        Ok(out.item)
    }

    async fn put_raw_if(
        &self,
        op: &'static str,
        item: Item,
        cond: Cond,
    ) -> Result<std::result::Result<(), super::raw::RefusedRaw>> {
        let mut expr = Expr::default();
        let condition = expr.condition(&cond);
        let (names, values) = expr.values();
        crate::metrics::table_call();
        let sent = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .condition_expression(condition)
            .set_expression_attribute_names(Some(names))
            .set_expression_attribute_values(values)
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .send()
            .boxed()
            .await;
        match sent {
            Ok(_) => Ok(Ok(())),
            Err(err) => match err.as_service_error() {
                Some(PutItemError::ConditionalCheckFailedException(c)) => {
                    Ok(Err(c.item().cloned()))
                }
                _ => Err(StoreError::from_sdk(op, err)),
            },
        }
    }

    async fn update_raw(
        &self,
        op: &'static str,
        pk: &str,
        update: Update,
    ) -> Result<std::result::Result<Item, super::raw::RefusedRaw>> {
        let mut expr = Expr::default();
        let update_expression = expr.update(&update.actions);
        let condition = expr.condition(&update.cond);
        let (names, values) = expr.values();
        crate::metrics::table_call();
        let sent = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(pk)))
            .update_expression(update_expression)
            .condition_expression(condition)
            .set_expression_attribute_names(Some(names))
            .set_expression_attribute_values(values)
            .return_values(ReturnValue::AllNew)
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .send()
            .boxed()
            .await;
        match sent {
            Ok(out) => Ok(Ok(out.attributes.unwrap_or_default())),
            Err(err) => match err.as_service_error() {
                Some(UpdateItemError::ConditionalCheckFailedException(c)) => {
                    Ok(Err(c.item().cloned()))
                }
                _ => Err(StoreError::from_sdk(op, err)),
            },
        }
    }
}

/// One page of an index query: the items whose partition attribute equals
/// a value and whose sort attribute compares (`<` or `<=`) with a bound.
struct IndexRange<'a> {
    index: &'static str,
    partition: (&'static str, &'a str),
    sort: (&'static str, &'static str, u64),
}

/// A page's items and the raw key to continue from.
type RawPage = (Vec<UserRecord>, Option<HashMap<String, AttributeValue>>);

impl DynamoStore {
    /// One page of a sharded index: `shard`'s items whose sort key is
    /// below (or at) `bound`, after `start`.
    async fn query_sharded<K: ShardedKey>(
        &self,
        shard: &str,
        bound: u64,
        start: Option<K>,
        limit: u32,
    ) -> Result<(Vec<UserRecord>, Option<K>)> {
        let range = IndexRange {
            index: K::INDEX,
            partition: (K::SHARD, shard),
            sort: (K::SORT, K::CMP, bound),
        };
        let (items, last) = self
            .query_page(K::OP, range, start.map(start_key), limit)
            .await?;
        let next = last
            .map(|lek| index_key_from(&lek, K::SHARD, K::SORT))
            .transpose()?
            .map(|(shard, sort, user_id)| K::from_parts(shard, sort, user_id));
        Ok((items, next))
    }

    /// Query one page of `range`, from `start`, at most `limit` items.
    async fn query_page(
        &self,
        op: &'static str,
        range: IndexRange<'_>,
        start: Option<HashMap<String, AttributeValue>>,
        limit: u32,
    ) -> Result<RawPage> {
        let (p_attr, p_value) = range.partition;
        let (s_attr, cmp, bound) = range.sort;
        crate::metrics::table_call();
        let out = self
            .client
            .query()
            .table_name(&self.table)
            .index_name(range.index)
            .key_condition_expression(format!("#s = :s AND #t {cmp} :t"))
            .expression_attribute_names("#s", p_attr)
            .expression_attribute_names("#t", s_attr)
            .expression_attribute_values(":s", AttributeValue::S(p_value.to_owned()))
            .expression_attribute_values(":t", AttributeValue::N(bound.to_string()))
            .limit(i32::try_from(limit).unwrap_or(i32::MAX))
            .set_exclusive_start_key(start)
            .send()
            .boxed()
            .await
            .map_err(|e| StoreError::from_sdk(op, e))?;
        let items = out
            .items
            .unwrap_or_default()
            .into_iter()
            .map(UserRecord::from_item)
            .collect::<Result<Vec<_>>>()?;
        let last = out.last_evaluated_key.filter(|lek| !lek.is_empty());
        Ok((items, last))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_actions_and_conditions_when_rendered_then_every_name_and_value_has_a_placeholder() {
        let mut expr = Expr::default();
        let update = expr.update(&[
            Action::Set(attr::STATE, AttributeValue::S("ready".into())),
            Action::SetIfNotExists(attr::AWAKE_SINCE, AttributeValue::N("5".into())),
            Action::Add(attr::GENERATION, 1),
            Action::Remove(attr::AWAKE_SHARD),
        ]);
        assert_eq!(
            update,
            "SET #state = :v0, #awake_since = if_not_exists(#awake_since, :v1), \
             #generation = if_not_exists(#generation, :v2) + :v3 REMOVE #awake_shard"
        );
        let cond = expr.condition(&Cond::And(vec![
            Cond::Exists(attr::USER_ID),
            Cond::Or(vec![
                Cond::NotExists(attr::LEASE_UNTIL),
                Cond::Lt(attr::LEASE_UNTIL, 9),
            ]),
            Cond::In(
                attr::STATE,
                vec![AttributeValue::S("a".into()), AttributeValue::S("b".into())],
            ),
        ]));
        assert_eq!(
            cond,
            "(attribute_exists(#user_id) AND (attribute_not_exists(#lease_until) OR \
             #lease_until < :v4) AND #state IN (:v5, :v6))"
        );
        let (names, values) = expr.values();
        assert_eq!(names.len(), 6);
        assert_eq!(values.map(|v| v.len()), Some(7));
    }
}

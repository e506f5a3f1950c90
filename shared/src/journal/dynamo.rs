//! The journal in DynamoDB: one `PutItem` per entry, one `Query` per page
//! (newest first, `ScanIndexForward=false`, the cursor as
//! `ExclusiveStartKey`).

use aws_sdk_dynamodb::types::AttributeValue;
use futures_util::future::BoxFuture;

use super::table::attr;
use super::{is_entry_id, EventsPage, JournalBackend, JournalEntry, PageQuery};
use crate::api::UserId;
use crate::store::StoreError;

/// The journal table in DynamoDB.
#[derive(Debug, Clone)]
pub struct DynamoJournal {
    client: aws_sdk_dynamodb::Client,
    table: String,
}

impl DynamoJournal {
    /// A journal over `table_name`, using `client` (built once by the caller).
    pub fn new(client: aws_sdk_dynamodb::Client, table_name: impl Into<String>) -> Self {
        Self {
            client,
            table: table_name.into(),
        }
    }

    async fn put_entry(
        &self,
        user_id: &UserId,
        entry: &JournalEntry,
        expires_at: u64,
    ) -> Result<(), StoreError> {
        let mut item: std::collections::HashMap<String, AttributeValue> =
            serde_dynamo::to_item(entry).map_err(|e| StoreError::Malformed {
                attribute: String::new(),
                message: format!("cannot encode journal entry: {e}"),
            })?;
        item.insert(attr::USER_ID.into(), AttributeValue::S(user_id.to_string()));
        item.insert(
            attr::EXPIRES_AT.into(),
            AttributeValue::N(expires_at.to_string()),
        );
        crate::metrics::table_call();
        self.client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .send()
            .await
            .map_err(|e| StoreError::from_sdk("journal_put", e))?;
        Ok(())
    }

    async fn query_page(&self, user_id: &UserId, q: &PageQuery) -> Result<EventsPage, StoreError> {
        let mut req = self
            .client
            .query()
            .table_name(&self.table)
            .scan_index_forward(false)
            .limit(i32::try_from(q.limit.max(1)).unwrap_or(i32::MAX))
            .expression_attribute_names("#u", attr::USER_ID)
            .expression_attribute_values(":u", AttributeValue::S(user_id.to_string()));
        req = match q.since_ms {
            Some(since) => req
                .key_condition_expression("#u = :u AND #i >= :since")
                .expression_attribute_names("#i", attr::ID)
                .expression_attribute_values(":since", AttributeValue::S(format!("{since:013}"))),
            None => req.key_condition_expression("#u = :u"),
        };
        if let Some(cursor) = &q.cursor {
            if !is_entry_id(cursor) {
                return Err(StoreError::InvalidCursor);
            }
            req = req
                .exclusive_start_key(attr::USER_ID, AttributeValue::S(user_id.to_string()))
                .exclusive_start_key(attr::ID, AttributeValue::S(cursor.clone()));
        }
        crate::metrics::table_call();
        let out = req
            .send()
            .await
            .map_err(|e| StoreError::from_sdk("journal_query", e))?;
        let events = out
            .items
            .unwrap_or_default()
            .into_iter()
            .map(|item| {
                serde_dynamo::from_item(item).map_err(|e| StoreError::Malformed {
                    attribute: String::new(),
                    message: format!("journal entry does not decode: {e}"),
                })
            })
            .collect::<Result<Vec<JournalEntry>, _>>()?;
        let next_cursor = out.last_evaluated_key.and_then(|k| match k.get(attr::ID) {
            Some(AttributeValue::S(id)) => Some(id.clone()),
            _ => None,
        });
        Ok(EventsPage {
            events,
            next_cursor,
        })
    }
}

impl JournalBackend for DynamoJournal {
    fn put<'a>(
        &'a self,
        user_id: &'a UserId,
        entry: &'a JournalEntry,
        expires_at: u64,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.put_entry(user_id, entry, expires_at))
    }

    fn page<'a>(
        &'a self,
        user_id: &'a UserId,
        query: &'a PageQuery,
    ) -> BoxFuture<'a, Result<EventsPage, StoreError>> {
        Box::pin(self.query_page(user_id, query))
    }
}

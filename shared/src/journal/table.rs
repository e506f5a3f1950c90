//! The one definition of the journal table: key schema, billing mode and TTL
//! attribute. [`create_table`] (local scripts, tests) and [`describe`]
//! (compared against `template.yaml`'s `JournalTable`) render the same
//! constants, like the users table's `store::table`.

use aws_sdk_dynamodb::error::ProvideErrorMetadata;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
    TimeToLiveSpecification,
};
use serde_json::{json, Value};

use crate::store::StoreError;

/// Attribute names of the journal's keys and TTL.
pub mod attr {
    /// Partition key: the user.
    pub const USER_ID: &str = "user_id";
    /// Sort key: the entry id (`{epoch ms, 13 digits}#{uuid v7}`), time-ordered.
    pub const ID: &str = "id";
    /// Epoch seconds after which DynamoDB deletes the entry.
    pub const EXPIRES_AT: &str = "expires_at";
}

const KEY: &[(&str, &str, &str)] = &[(attr::USER_ID, "S", "HASH"), (attr::ID, "S", "RANGE")];
const BILLING_MODE: &str = "PAY_PER_REQUEST";

/// The table definition in CloudFormation property names, for comparison
/// with `template.yaml`.
pub fn describe() -> Value {
    json!({
        "AttributeDefinitions": KEY.iter()
            .map(|(a, t, _)| json!({"AttributeName": a, "AttributeType": t}))
            .collect::<Vec<_>>(),
        "KeySchema": KEY.iter()
            .map(|(a, _, k)| json!({"AttributeName": a, "KeyType": k}))
            .collect::<Vec<_>>(),
        "BillingMode": BILLING_MODE,
        "TimeToLiveSpecification": {"AttributeName": attr::EXPIRES_AT, "Enabled": true},
    })
}

fn build_error(e: aws_sdk_dynamodb::error::BuildError) -> StoreError {
    StoreError::backend("create_journal_table", false, e)
}

/// Create the journal table with its TTL (local scripts and tests;
/// production uses the template). Idempotent; waits until `ACTIVE` (about
/// 30 s at most).
pub async fn create_table(
    client: &aws_sdk_dynamodb::Client,
    table_name: &str,
) -> Result<(), StoreError> {
    let mut definitions = Vec::new();
    let mut keys = Vec::new();
    for (a, t, k) in KEY {
        definitions.push(
            AttributeDefinition::builder()
                .attribute_name(*a)
                .attribute_type(ScalarAttributeType::from(*t))
                .build()
                .map_err(build_error)?,
        );
        keys.push(
            KeySchemaElement::builder()
                .attribute_name(*a)
                .key_type(KeyType::from(*k))
                .build()
                .map_err(build_error)?,
        );
    }
    let created = client
        .create_table()
        .table_name(table_name)
        .set_attribute_definitions(Some(definitions))
        .set_key_schema(Some(keys))
        .billing_mode(BillingMode::from(BILLING_MODE))
        .send()
        .await;
    if let Err(err) = created {
        if err.code() != Some("ResourceInUseException") {
            return Err(StoreError::from_sdk("create_journal_table", err));
        }
    }
    crate::store::table::wait_active(client, table_name, "create_journal_table").await?;
    let ttl = TimeToLiveSpecification::builder()
        .attribute_name(attr::EXPIRES_AT)
        .enabled(true)
        .build()
        .map_err(build_error)?;
    if let Err(err) = client
        .update_time_to_live()
        .table_name(table_name)
        .time_to_live_specification(ttl)
        .send()
        .await
    {
        // Enabling it twice is refused ("already enabled"): fine.
        if err.code() != Some("ValidationException") {
            return Err(StoreError::from_sdk("update_time_to_live", err));
        }
    }
    Ok(())
}

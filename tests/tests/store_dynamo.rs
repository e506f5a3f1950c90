//! `agenthome::store::DynamoStore` against a real DynamoDB-compatible server
//! (`moto_server` on loopback): the whole `UserStore` contract (the same cases
//! the in-memory store passes), plus what only a real table can show: the
//! table definition as created, SDK error classification, malformed items.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use agenthome_tests::uid;
use std::collections::HashMap;
use std::time::Duration;

use agenthome::store::{create_table, table, DynamoStore, StoreError, UserStore};
use agenthome_tests::{free_port, unique_table_name, Moto};
use aws_sdk_dynamodb::types::AttributeValue;

/// A fresh table on the shared moto server, and a store over it.
async fn fresh() -> DynamoStore {
    let moto = Moto::shared().await;
    let client = moto.dynamodb_client().await;
    let name = unique_table_name("users");
    create_table(&client, &name).await.expect("create table");
    DynamoStore::new(client, name)
}

agenthome_tests::user_store_contract_tests!(fresh);

/// GIVEN a table created by `create_table` WHEN it is described by the server
/// THEN keys, indexes, projections and billing mode are those of
/// `table::describe()`, and creating it again is fine.
#[tokio::test]
async fn created_table_matches_the_definition_and_creation_is_idempotent() {
    let moto = Moto::shared().await;
    let client = moto.dynamodb_client().await;
    let name = unique_table_name("users");
    create_table(&client, &name).await.expect("create");
    create_table(&client, &name).await.expect("create again");

    let described = client
        .describe_table()
        .table_name(&name)
        .send()
        .await
        .expect("describe")
        .table
        .expect("table");
    let key_schema = |keys: &[aws_sdk_dynamodb::types::KeySchemaElement]| {
        keys.iter()
            .map(|k| {
                serde_json::json!({
                    "AttributeName": k.attribute_name(),
                    "KeyType": k.key_type().as_str(),
                })
            })
            .collect::<Vec<_>>()
    };
    let mut gsis: Vec<_> = described
        .global_secondary_indexes()
        .iter()
        .map(|g| {
            serde_json::json!({
                "IndexName": g.index_name(),
                "KeySchema": key_schema(g.key_schema()),
                "Projection": {"ProjectionType": g.projection().and_then(|p| p.projection_type()).map(|p| p.as_str())},
            })
        })
        .collect();
    gsis.sort_by_key(|g| g["IndexName"].to_string());
    let mut definitions: Vec<_> = described
        .attribute_definitions()
        .iter()
        .map(|a| {
            serde_json::json!({
                "AttributeName": a.attribute_name(),
                "AttributeType": a.attribute_type().as_str(),
            })
        })
        .collect();
    definitions.sort_by_key(|d| d["AttributeName"].to_string());

    let mut expected = table::describe();
    let sort = |v: &mut serde_json::Value, field: &str| {
        if let Some(a) = v.as_array_mut() {
            a.sort_by_key(|x| x[field].to_string());
        }
    };
    sort(&mut expected["GlobalSecondaryIndexes"], "IndexName");
    sort(&mut expected["AttributeDefinitions"], "AttributeName");
    assert_eq!(
        serde_json::Value::from(gsis),
        expected["GlobalSecondaryIndexes"]
    );
    assert_eq!(
        serde_json::Value::from(definitions),
        expected["AttributeDefinitions"]
    );
    assert_eq!(
        serde_json::Value::from(key_schema(described.key_schema())),
        expected["KeySchema"]
    );
    let billing = described
        .billing_mode_summary()
        .and_then(|b| b.billing_mode())
        .map(|b| b.as_str().to_owned());
    assert_eq!(billing.as_deref(), expected["BillingMode"].as_str());
}

/// GIVEN an item whose `state` is not a known state WHEN read THEN the error
/// is Malformed naming `state`, not a panic or a stringly error.
#[tokio::test]
async fn malformed_item_is_a_typed_error_naming_the_attribute() {
    let store = fresh().await;
    let moto = Moto::shared().await;
    let client = moto.dynamodb_client().await;
    let item = HashMap::from([
        ("user_id".to_owned(), AttributeValue::S("odd".into())),
        ("state".to_owned(), AttributeValue::S("exploded".into())),
        ("power".to_owned(), AttributeValue::S("awake".into())),
        ("generation".to_owned(), AttributeValue::N("1".into())),
        ("create_key".to_owned(), AttributeValue::S("k".into())),
        ("last_active_at".to_owned(), AttributeValue::N("1".into())),
        ("updated_at".to_owned(), AttributeValue::N("1".into())),
    ]);
    client
        .put_item()
        .table_name(store.table_name())
        .set_item(Some(item))
        .send()
        .await
        .expect("raw put");
    match store.get(&uid("odd")).await {
        Err(StoreError::Malformed { attribute, .. }) => assert_eq!(attribute, "state"),
        other => panic!("expected Malformed(state), got {other:?}"),
    }
}

/// GIVEN a missing table THEN the error keeps the SDK error as its source and
/// is not retryable; GIVEN nothing listening THEN it is a retryable transport
/// failure.
#[tokio::test]
async fn backend_errors_are_classified() {
    let moto = Moto::shared().await;
    let missing = DynamoStore::new(moto.dynamodb_client().await, "no-such-table");
    match missing.get(&uid("u")).await {
        Err(e @ StoreError::Backend { .. }) => {
            assert!(!e.is_retryable(), "{e:?}");
            assert!(std::error::Error::source(&e).is_some());
        }
        other => panic!("expected Backend error, got {other:?}"),
    }

    // Nothing listens on this loopback port.
    let config = aws_sdk_dynamodb::config::Builder::from(&moto.sdk_config().await)
        .endpoint_url(format!("http://127.0.0.1:{}", free_port()))
        .retry_config(aws_sdk_dynamodb::config::retry::RetryConfig::disabled())
        .timeout_config(
            aws_sdk_dynamodb::config::timeout::TimeoutConfig::builder()
                .operation_timeout(Duration::from_secs(5))
                .build(),
        )
        .build();
    let unreachable = DynamoStore::new(aws_sdk_dynamodb::Client::from_conf(config), "t");
    match unreachable.get(&uid("u")).await {
        Err(e @ StoreError::Backend { .. }) => assert!(e.is_retryable(), "{e:?}"),
        other => panic!("expected Backend error, got {other:?}"),
    }
}

//! The harness itself: the DynamoDB-compatible server is real and reachable
//! only over loopback.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use agenthome_tests::Moto;

#[tokio::test]
async fn moto_server_answers_dynamodb_calls_on_loopback() {
    // GIVEN the shared moto server
    let moto = Moto::shared().await;
    assert!(moto.endpoint.starts_with("http://127.0.0.1:"));
    // WHEN we create a table and list tables
    let client = moto.dynamodb_client().await;
    let name = agenthome_tests::unique_table_name("harness");
    client
        .create_table()
        .table_name(&name)
        .billing_mode(aws_sdk_dynamodb::types::BillingMode::PayPerRequest)
        .attribute_definitions(
            aws_sdk_dynamodb::types::AttributeDefinition::builder()
                .attribute_name("pk")
                .attribute_type(aws_sdk_dynamodb::types::ScalarAttributeType::S)
                .build()
                .unwrap(),
        )
        .key_schema(
            aws_sdk_dynamodb::types::KeySchemaElement::builder()
                .attribute_name("pk")
                .key_type(aws_sdk_dynamodb::types::KeyType::Hash)
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    let tables = client.list_tables().send().await.unwrap();
    // THEN the table is there
    assert!(tables.table_names().contains(&name));
}

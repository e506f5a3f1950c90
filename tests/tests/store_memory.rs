//! `agenthome::store::MemoryStore` passes the same `UserStore` contract as
//! the DynamoDB adapter, so domain tests that use it test real semantics.

#![allow(clippy::unwrap_used, clippy::expect_used)]

async fn fresh() -> agenthome::store::MemoryStore {
    agenthome::store::MemoryStore::new()
}

agenthome_tests::user_store_contract_tests!(fresh);

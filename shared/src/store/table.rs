//! The one definition of the user→machine table: attribute names, key schema,
//! indexes, billing mode, and the awake-shard function.
//!
//! [`create_table`] (local scripts, tests) and [`describe`] (compared against
//! `template.yaml`) both render the same constants below, so the table the
//! code talks to and the table the template deploys cannot drift silently.
//!
//! Every GSI projects `ALL`. The sweep needs most of the item for each
//! candidate (`machine_id`, `last_active_at`, the lease, the hold,
//! `awake_since`, `sleep_eligible_at`, `generation`) and decodes it as a full
//! [`UserRecord`](super::UserRecord); an `INCLUDE` projection would save a few
//! hundred bytes per awake item at the price of a second, partial record type
//! or a follow-up `GetItem` per candidate. The `awake` index is sparse (only
//! awake machines carry `awake_shard`), so its storage and write cost grow
//! with awake machines, not users. `by-machine` is read only by
//! reconciliation, which needs the whole record too. `pending-sleep` is
//! sparse like `awake` (only items with a pending sleep carry
//! `sleep_shard`); the sweep sends its items through the same candidate path.

use aws_sdk_dynamodb::error::ProvideErrorMetadata;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, GlobalSecondaryIndex, KeySchemaElement, KeyType, Projection,
    ProjectionType, ScalarAttributeType, TableStatus,
};
use serde_json::{json, Value};

use super::StoreError;
use crate::api::UserId;

/// Attribute names, as stored.
pub mod attr {
    /// Partition key.
    pub const USER_ID: &str = "user_id";
    /// Dedalus machine id; key of the `by-machine` index.
    pub const MACHINE_ID: &str = "machine_id";
    /// `provisioning` · `bootstrapping` · `ready` · `failed` · `destroying`.
    pub const STATE: &str = "state";
    /// `awake` · `asleep` · `unknown`.
    pub const POWER: &str = "power";
    /// Bumped on every write.
    pub const GENERATION: &str = "generation";
    /// Idempotency-Key of the create call.
    pub const CREATE_KEY: &str = "create_key";
    /// Bootstrap version that succeeded.
    pub const BOOTSTRAP_VERSION: &str = "bootstrap_version";
    /// Epoch ms; sort key of the `awake` index.
    pub const LAST_ACTIVE_AT: &str = "last_active_at";
    /// Lease holder.
    pub const LEASE_OWNER: &str = "lease_owner";
    /// `turn` · `sweep` · `provision`.
    pub const LEASE_KIND: &str = "lease_kind";
    /// Lease expiry, epoch ms.
    pub const LEASE_UNTIL: &str = "lease_until";
    /// Terminal to reuse.
    pub const TERMINAL_ID: &str = "terminal_id";
    /// Epoch ms the machine woke.
    pub const AWAKE_SINCE: &str = "awake_since";
    /// Accumulated awake ms.
    pub const AWAKE_MS_TOTAL: &str = "awake_ms_total";
    /// When a refused sleep may be retried, epoch ms.
    pub const SLEEP_ELIGIBLE_AT: &str = "sleep_eligible_at";
    /// Terminals of the machine other than the current one that agenthome
    /// keeps: ones still running a command left running, and at most one
    /// idle spare (a list of terminal ids).
    pub const PARKED_TERMINALS: &str = "parked_terminals";
    /// Hold expiry, epoch ms.
    pub const HOLD_UNTIL: &str = "hold_until";
    /// Completion marker path of the held command (an item written before
    /// holds became a set; new holds go to [`HOLDS`]).
    pub const HOLD_MARKER: &str = "hold_marker";
    /// The holds: a list of `{until, marker}` maps, one per command left
    /// running (every one of them keeps the machine awake).
    pub const HOLDS: &str = "holds";
    /// Last error message.
    pub const LAST_ERROR: &str = "last_error";
    /// Epoch ms of the last write.
    pub const UPDATED_AT: &str = "updated_at";
    /// Epoch ms of the claim.
    pub const CREATED_AT: &str = "created_at";
    /// Shard of the `awake` index; present only while awake.
    pub const AWAKE_SHARD: &str = "awake_shard";
    /// Fair use: start (epoch ms) of the current turn-rate window.
    pub const TURNS_WINDOW: &str = "turns_window";
    /// Fair use: turns counted in `turns_window`.
    pub const TURNS_COUNT: &str = "turns_count";
    /// Fair use: start (epoch ms) of the current status-read window.
    pub const STATUS_WINDOW: &str = "status_window";
    /// Fair use: live status reads counted in `status_window`.
    pub const STATUS_COUNT: &str = "status_count";
    /// Awake budget: the UTC day (epoch ms of its midnight) of `awake_day_base`.
    pub const AWAKE_DAY: &str = "awake_day";
    /// Awake budget: `awake_ms_total` at the start of `awake_day`.
    pub const AWAKE_DAY_BASE: &str = "awake_day_base";
    /// Turns begun on the item (each `begin_turn` adds one).
    pub const TURN_SEQ: &str = "turn_seq";
    /// `turn_seq` of the last turn that ended with its shell idle.
    pub const CLEAN_SEQ: &str = "clean_seq";
    /// `last_active_at` as the last `begin_turn` found it (the activity
    /// before that turn: adaptive idle's gap).
    pub const PREV_ACTIVE_AT: &str = "prev_active_at";
    /// Provisioning: the worker's current step (`claimed` · `creating` ·
    /// `booting` · `bootstrapping`), written with the writes the worker
    /// makes anyway; removed when the machine is ready.
    pub const PROVISION_STAGE: &str = "provision_stage";
    /// Provisioning: epoch ms the current `provision_stage` began.
    pub const PROVISION_STAGE_AT: &str = "provision_stage_at";
    /// Expiry (epoch seconds) of items that expire (turn idempotency
    /// keys): the table's one TTL attribute.
    pub const EXPIRES_AT: &str = "expires_at";
    /// Provisioning: runs of the worker that took the lease since the
    /// provisioning started (claim or restart reset it to 0).
    pub const PROVISION_ATTEMPTS: &str = "provision_attempts";
    /// Shard of the `pending-sleep` index; present only while a sleep is
    /// pending (requested inside the hold window, or an adaptive idle
    /// deadline), which makes that index sparse.
    pub const SLEEP_SHARD: &str = "sleep_shard";
    /// Epoch ms from which the pending sleep is due; sort key of the
    /// `pending-sleep` index.
    pub const SLEEP_AT: &str = "sleep_at";
    /// Why the sleep is pending: `requested` or `adaptive`.
    pub const SLEEP_REASON: &str = "sleep_reason";
    /// Adaptive idle: the user's inter-turn gap histogram (a list of counts,
    /// one per bucket of `turn::end::GAP_BUCKETS_S`).
    pub const GAP_HIST: &str = "gap_hist";
}

/// Name of the sparse GSI the sweep queries.
pub const AWAKE_INDEX: &str = "awake";
/// Name of the GSI reconciliation queries by machine id.
pub const BY_MACHINE_INDEX: &str = "by-machine";
/// Name of the sparse GSI of pending sleeps (`sleep_shard`, `sleep_at`).
pub const PENDING_SLEEP_INDEX: &str = "pending-sleep";
/// The default number of `awake_shard` values (`"0"` ..= `"7"`), used when
/// `AWAKE_SHARDS` is not set ([`ShardLayout`]). An item keeps the shard it
/// was given when it last woke; a sweep reads the union of the current and
/// the previous shard ranges until a migration has moved every awake item.
pub const AWAKE_SHARDS: u32 = 8;

/// Attributes that appear in a key schema, with their scalar type.
const KEY_ATTRIBUTES: &[(&str, &str)] = &[
    (attr::USER_ID, "S"),
    (attr::AWAKE_SHARD, "S"),
    (attr::LAST_ACTIVE_AT, "N"),
    (attr::MACHINE_ID, "S"),
    (attr::SLEEP_SHARD, "S"),
    (attr::SLEEP_AT, "N"),
];
/// A key schema: (attribute, HASH|RANGE).
type KeySchema = &'static [(&'static str, &'static str)];
/// Table key schema.
const TABLE_KEY: KeySchema = &[(attr::USER_ID, "HASH")];
/// GSIs: (name, key schema, projection type).
const INDEXES: &[(&str, KeySchema, &str)] = &[
    (
        AWAKE_INDEX,
        &[(attr::AWAKE_SHARD, "HASH"), (attr::LAST_ACTIVE_AT, "RANGE")],
        "ALL",
    ),
    (BY_MACHINE_INDEX, &[(attr::MACHINE_ID, "HASH")], "ALL"),
    (
        PENDING_SLEEP_INDEX,
        &[(attr::SLEEP_SHARD, "HASH"), (attr::SLEEP_AT, "RANGE")],
        "ALL",
    ),
];
const BILLING_MODE: &str = "PAY_PER_REQUEST";

/// The awake shard of a user: FNV-1a (64-bit) of the UTF-8 user id modulo
/// [`AWAKE_SHARDS`], as a decimal string. Stable across processes, builds and
/// platforms (unlike std's randomized hasher).
pub fn shard_for(user_id: &UserId) -> String {
    shard_in(user_id, AWAKE_SHARDS)
}

/// The awake shard of a user for a table split into `count` shards (the
/// same hash as [`shard_for`]; `count` 0 is taken as 1).
pub fn shard_in(user_id: &UserId, count: u32) -> String {
    fnv_shard(user_id.as_str(), count)
}

/// FNV-1a (64-bit) of `key`'s bytes modulo `count` (0 taken as 1).
fn fnv_shard(key: &str, count: u32) -> String {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let hash = key
        .bytes()
        .fold(OFFSET, |h, b| (h ^ u64::from(b)).wrapping_mul(PRIME));
    (hash % u64::from(count.max(1))).to_string()
}

/// All shard values, for a sweep to iterate.
pub fn all_shards() -> impl Iterator<Item = String> {
    (0..AWAKE_SHARDS).map(|s| s.to_string())
}

/// The awake index's shard layout, from `AWAKE_SHARDS` (default
/// [`AWAKE_SHARDS`]) and, while a change of the shard count is being
/// migrated, `AWAKE_SHARDS_PREVIOUS` (the count before the change).
///
/// Writers (a wake, a turn) put an item in `shard_in(user, shards)`; the
/// item carries that shard until it sleeps. Readers (the sweep, the
/// migration) read the union of both ranges, `0..max(shards, previous)`, so
/// an item written under either count is always found. Once the migration
/// (`{"migrate_awake_shards": {}}` to the sleep-sweep function) reports no
/// item left outside the current layout, `AWAKE_SHARDS_PREVIOUS` is removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardLayout {
    /// `AWAKE_SHARDS`: the shard count new writes use.
    pub shards: u32,
    /// `AWAKE_SHARDS_PREVIOUS`: the count before a change still being migrated.
    pub previous: Option<u32>,
}

impl Default for ShardLayout {
    fn default() -> Self {
        Self {
            shards: AWAKE_SHARDS,
            previous: None,
        }
    }
}

/// The largest shard count accepted (each shard is one index query per page).
pub const MAX_AWAKE_SHARDS: u32 = 4096;

impl ShardLayout {
    /// A layout of `shards` shards, no migration in progress.
    pub fn new(shards: u32) -> Self {
        Self {
            shards: shards.max(1),
            previous: None,
        }
    }

    /// Read `AWAKE_SHARDS` and `AWAKE_SHARDS_PREVIOUS` from the process environment.
    pub fn from_env() -> Result<Self, crate::config::ConfigError> {
        Self::from_map(&std::env::vars().collect())
    }

    /// Read from a map (tests): a missing value takes its default, a
    /// malformed one (not an integer in `1..=4096`) names the variable.
    pub fn from_map(
        vars: &std::collections::HashMap<String, String>,
    ) -> Result<Self, crate::config::ConfigError> {
        let env = crate::env::Env::new(vars);
        let read = |name: &'static str| {
            env.parse(name, None, |raw| match raw.parse::<u32>() {
                Ok(n) if (1..=MAX_AWAKE_SHARDS).contains(&n) => Ok(Some(n)),
                Ok(_) => Err(format!("must be between 1 and {MAX_AWAKE_SHARDS}")),
                Err(e) => Err(e.to_string()),
            })
        };
        let shards = read("AWAKE_SHARDS")?.unwrap_or(AWAKE_SHARDS);
        let previous = read("AWAKE_SHARDS_PREVIOUS")?.filter(|p| *p != shards);
        Ok(Self { shards, previous })
    }

    /// The shard a user's item is written to.
    pub fn shard_of(&self, user_id: &UserId) -> String {
        shard_in(user_id, self.shards)
    }

    /// Every shard a reader must query: the union of the current and the
    /// previous ranges.
    pub fn read_shards(&self) -> Vec<String> {
        let n = self.shards.max(self.previous.unwrap_or(0)).max(1);
        (0..n).map(|s| s.to_string()).collect()
    }

    /// Whether `shard` is where the current layout puts `user_id`.
    pub fn in_place(&self, user_id: &UserId, shard: &str) -> bool {
        self.shard_of(user_id) == shard
    }
}

/// The table definition in CloudFormation/DynamoDB API property names
/// (`AttributeDefinitions`, `KeySchema`, `BillingMode`,
/// `GlobalSecondaryIndexes`), for comparison with `template.yaml`.
pub fn describe() -> Value {
    let key_schema = |keys: &[(&str, &str)]| -> Value {
        keys.iter()
            .map(|(a, k)| json!({"AttributeName": a, "KeyType": k}))
            .collect()
    };
    json!({
        "AttributeDefinitions": KEY_ATTRIBUTES
            .iter()
            .map(|(a, t)| json!({"AttributeName": a, "AttributeType": t}))
            .collect::<Vec<_>>(),
        "KeySchema": key_schema(TABLE_KEY),
        "BillingMode": BILLING_MODE,
        "GlobalSecondaryIndexes": INDEXES
            .iter()
            .map(|(name, keys, projection)| json!({
                "IndexName": name,
                "KeySchema": key_schema(keys),
                "Projection": {"ProjectionType": projection},
            }))
            .collect::<Vec<_>>(),
    })
}

fn build_error(e: aws_sdk_dynamodb::error::BuildError) -> StoreError {
    StoreError::backend("create_table", false, e)
}

fn key_schema(keys: &[(&str, &str)]) -> Result<Vec<KeySchemaElement>, StoreError> {
    keys.iter()
        .map(|(a, k)| {
            KeySchemaElement::builder()
                .attribute_name(*a)
                .key_type(KeyType::from(*k))
                .build()
                .map_err(build_error)
        })
        .collect()
}

/// Create the table (local scripts and tests; production uses the template).
/// Idempotent: an existing table is fine. Waits until the table is `ACTIVE`
/// (bounded: about 30 s).
pub async fn create_table(
    client: &aws_sdk_dynamodb::Client,
    table_name: &str,
) -> Result<(), StoreError> {
    let definitions = KEY_ATTRIBUTES
        .iter()
        .map(|(a, t)| {
            AttributeDefinition::builder()
                .attribute_name(*a)
                .attribute_type(ScalarAttributeType::from(*t))
                .build()
                .map_err(build_error)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let indexes = INDEXES
        .iter()
        .map(|(name, keys, projection)| {
            GlobalSecondaryIndex::builder()
                .index_name(*name)
                .set_key_schema(Some(key_schema(keys)?))
                .projection(
                    Projection::builder()
                        .projection_type(ProjectionType::from(*projection))
                        .build(),
                )
                .build()
                .map_err(build_error)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let created = client
        .create_table()
        .table_name(table_name)
        .set_attribute_definitions(Some(definitions))
        .set_key_schema(Some(key_schema(TABLE_KEY)?))
        .set_global_secondary_indexes(Some(indexes))
        .billing_mode(BillingMode::from(BILLING_MODE))
        .send()
        .await;
    if let Err(err) = created {
        if err.code() != Some("ResourceInUseException") {
            return Err(StoreError::from_sdk("create_table", err));
        }
    }
    wait_active(client, table_name, "create_table").await
}

/// Wait until a table just created (or being created) is `ACTIVE`; `op`
/// names the caller in the error.
pub(crate) async fn wait_active(
    client: &aws_sdk_dynamodb::Client,
    table_name: &str,
    op: &'static str,
) -> Result<(), StoreError> {
    for _ in 0..60 {
        let status = client
            .describe_table()
            .table_name(table_name)
            .send()
            .await
            .map_err(|e| StoreError::from_sdk("describe_table", e))?
            .table()
            .and_then(|t| t.table_status().cloned());
        if status == Some(TableStatus::Active) {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    Err(StoreError::backend(
        op,
        true,
        format!("table {table_name} did not become ACTIVE"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_fixed_user_ids_when_sharded_then_the_shards_are_stable_and_in_range() {
        // Pinned values: a change here re-shards every awake machine.
        assert_eq!(fnv_shard("", 8), (0xcbf2_9ce4_8422_2325u64 % 8).to_string());
        assert_eq!(shard_for(&"alice".into()), "7");
        assert_eq!(shard_for(&"bob".into()), "4");
        assert_eq!(shard_for(&"user-1".into()), "4");
        let mut seen = std::collections::HashSet::new();
        for i in 0..1000 {
            let user = UserId::parse(&format!("user-{i}")).expect("valid");
            let s = shard_for(&user);
            let n: u32 = s.parse().expect("decimal");
            assert!(n < AWAKE_SHARDS);
            seen.insert(s);
        }
        assert_eq!(seen.len(), AWAKE_SHARDS as usize, "all shards used");
    }

    #[test]
    fn given_a_shard_count_change_when_read_then_both_ranges_are_read_and_writes_use_the_new() {
        let env = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<std::collections::HashMap<_, _>>()
        };
        assert_eq!(ShardLayout::from_map(&env(&[])), Ok(ShardLayout::default()));
        let grow = ShardLayout::from_map(&env(&[
            ("AWAKE_SHARDS", "32"),
            ("AWAKE_SHARDS_PREVIOUS", "8"),
        ]))
        .expect("layout");
        assert_eq!(grow.read_shards().len(), 32);
        let (alice, bob) = (UserId::from("alice"), UserId::from("bob"));
        assert_eq!(grow.shard_of(&alice), shard_in(&alice, 32));
        let shrink = ShardLayout::from_map(&env(&[
            ("AWAKE_SHARDS", "4"),
            ("AWAKE_SHARDS_PREVIOUS", "16"),
        ]))
        .expect("layout");
        assert_eq!(
            shrink.read_shards().len(),
            16,
            "the old range is still read"
        );
        assert!(shrink.in_place(&bob, &shard_in(&bob, 4)));
        assert_eq!(shard_in(&alice, AWAKE_SHARDS), shard_for(&alice));
        for (name, bad) in [
            ("AWAKE_SHARDS", "0"),
            ("AWAKE_SHARDS", "many"),
            ("AWAKE_SHARDS_PREVIOUS", "5000"),
        ] {
            let err = ShardLayout::from_map(&env(&[(name, bad)])).expect_err(name);
            assert!(err.to_string().contains(name), "{err}");
        }
    }

    #[test]
    fn given_the_definition_when_described_then_indexes_and_keys_are_listed() {
        let d = describe();
        assert_eq!(d["KeySchema"][0]["AttributeName"], "user_id");
        assert_eq!(d["BillingMode"], "PAY_PER_REQUEST");
        let gsis = d["GlobalSecondaryIndexes"].as_array().expect("array");
        assert_eq!(gsis[0]["IndexName"], "awake");
        assert_eq!(gsis[0]["KeySchema"][1]["AttributeName"], "last_active_at");
        assert_eq!(gsis[0]["KeySchema"][1]["KeyType"], "RANGE");
        assert_eq!(gsis[1]["IndexName"], "by-machine");
        // Every key attribute is defined exactly once, and nothing else is.
        let defined: Vec<_> = d["AttributeDefinitions"]
            .as_array()
            .expect("array")
            .iter()
            .map(|a| a["AttributeName"].as_str().expect("name").to_owned())
            .collect();
        assert_eq!(
            defined,
            [
                "user_id",
                "awake_shard",
                "last_active_at",
                "machine_id",
                "sleep_shard",
                "sleep_at"
            ]
        );
        assert_eq!(gsis[2]["IndexName"], "pending-sleep");
    }
}

//! The provisioning worker's current step, as the item records it
//! (`provision_stage`, `provision_stage_at`): written by the writes the
//! worker makes anyway (`claim`/`restart_provisioning` → `claimed`, the
//! worker's lease → `creating`, `record_machine_id` → `booting`,
//! `mark_bootstrapping` → `bootstrapping`; `mark_ready` removes it), so a
//! waiting turn can say where provisioning is and since when without asking
//! Dedalus.

use std::future::Future;

use aws_sdk_dynamodb::types::AttributeValue;
use serde::Serialize;

use super::engine::Action;
use super::raw::RawItems;
use super::record::Item;
use super::table::attr;
use super::{MachineState, Result, UserRecord};
use crate::api::UserId;

/// A step of provisioning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProvisionStage {
    /// The item is claimed; the worker has not started yet.
    Claimed,
    /// The worker is creating the machine.
    Creating,
    /// The machine exists; the worker waits for it to run.
    Booting,
    /// The machine runs; the bootstrap script runs.
    Bootstrapping,
}

impl ProvisionStage {
    /// Every stage, in order.
    pub const ALL: [ProvisionStage; 4] = [
        ProvisionStage::Claimed,
        ProvisionStage::Creating,
        ProvisionStage::Booting,
        ProvisionStage::Bootstrapping,
    ];

    /// The stored value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Claimed => "claimed",
            Self::Creating => "creating",
            Self::Booting => "booting",
            Self::Bootstrapping => "bootstrapping",
        }
    }

    /// The stage of a stored value.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Position in [`ProvisionStage::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// The item with its provisioning stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageView {
    /// The item.
    pub record: UserRecord,
    /// Where provisioning is (`None` unless the item is `provisioning` or
    /// `bootstrapping`).
    pub stage: Option<ProvisionStage>,
    /// Epoch ms the stage began.
    pub since_ms: u64,
}

impl StageView {
    /// Read the stage off a raw item (an item written before stages were
    /// recorded reads as `claimed` since its claim).
    pub fn from_item(item: Item) -> Result<Self> {
        let stored = match item.get(attr::PROVISION_STAGE) {
            Some(AttributeValue::S(v)) => ProvisionStage::parse(v),
            _ => None,
        };
        let at = match item.get(attr::PROVISION_STAGE_AT) {
            Some(AttributeValue::N(v)) => v.parse::<u64>().ok(),
            _ => None,
        };
        let record = UserRecord::from_item(item)?;
        let (stage, since_ms) = match record.state {
            MachineState::Bootstrapping => (
                Some(ProvisionStage::Bootstrapping),
                match stored {
                    Some(ProvisionStage::Bootstrapping) => at.unwrap_or(record.updated_at),
                    _ => record.updated_at,
                },
            ),
            MachineState::Provisioning => match (stored, at) {
                // A resumed worker whose machine is recorded goes straight
                // to waiting for it to run.
                (Some(ProvisionStage::Creating | ProvisionStage::Claimed), Some(at))
                    if record.machine_id.is_some() =>
                {
                    (Some(ProvisionStage::Booting), at)
                }
                (Some(stage), Some(at)) => (Some(stage), at),
                _ => (Some(ProvisionStage::Claimed), record.created_at),
            },
            _ => (None, record.updated_at),
        };
        Ok(StageView {
            record,
            stage,
            since_ms,
        })
    }
}

/// Reads an item with its provisioning stage.
pub trait StageReader: Send + Sync {
    /// The user's item and its stage, strongly consistent.
    fn get_with_stage(
        &self,
        user_id: &UserId,
    ) -> impl Future<Output = Result<Option<StageView>>> + Send;
}

impl<B: RawItems> StageReader for B {
    async fn get_with_stage(&self, user_id: &UserId) -> Result<Option<StageView>> {
        self.get_raw(user_id.as_str())
            .await?
            .map(StageView::from_item)
            .transpose()
    }
}

/// The update actions that record `stage` as begun at `now_ms`.
pub(super) fn stage_actions(stage: ProvisionStage, now_ms: u64) -> [Action; 2] {
    [
        Action::Set(
            attr::PROVISION_STAGE,
            AttributeValue::S(stage.as_str().to_owned()),
        ),
        Action::Set(
            attr::PROVISION_STAGE_AT,
            AttributeValue::N(now_ms.to_string()),
        ),
    ]
}

/// The update actions that forget the stage (the machine is ready).
pub(super) const CLEAR_STAGE: [Action; 2] = [
    Action::Remove(attr::PROVISION_STAGE),
    Action::Remove(attr::PROVISION_STAGE_AT),
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::user_id::uid;
    use crate::store::{Lease, LeaseKind, LeasePurpose, MemoryStore, UserStore};

    #[tokio::test]
    async fn given_a_worker_s_writes_when_read_then_each_stage_is_reported_with_its_start() {
        let store = MemoryStore::new();
        let key = crate::store::new_create_key();
        let lease = Lease::new("trigger", LeaseKind::Provision, 10_000);
        store
            .claim(&uid("u1"), &key, &lease, 1_000)
            .await
            .expect("claim");
        let view = |v: Option<StageView>| {
            let v = v.expect("item");
            (v.stage, v.since_ms)
        };
        let read = || async { store.get_with_stage(&uid("u1")).await.expect("read") };
        assert_eq!(view(read().await), (Some(ProvisionStage::Claimed), 1_000));
        store
            .release_lease(&uid("u1"), "trigger", 1_100)
            .await
            .expect("release");
        store
            .acquire_lease(&uid("u1"), "worker", LeasePurpose::Provision, 20_000, 1_200)
            .await
            .expect("acquire");
        assert_eq!(view(read().await), (Some(ProvisionStage::Creating), 1_200));
        store
            .record_machine_id(&uid("u1"), &key, "dm-1", 1_500)
            .await
            .expect("record");
        assert_eq!(view(read().await), (Some(ProvisionStage::Booting), 1_500));
        store
            .mark_bootstrapping(&uid("u1"), "worker", 3_000)
            .await
            .expect("bootstrapping");
        assert_eq!(
            view(read().await),
            (Some(ProvisionStage::Bootstrapping), 3_000)
        );
        store
            .mark_ready(&uid("u1"), "worker", "v1", 4_000)
            .await
            .expect("ready");
        let ready = read().await.expect("item");
        assert_eq!(ready.stage, None);
        assert_eq!(ready.record.state, MachineState::Ready);
    }
}

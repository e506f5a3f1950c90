//! The provision function's routes and worker event in-process, against a
//! real emulator and a real DynamoDB-compatible server (the harness of
//! `tests/provision_routes.rs`).

use agenthome::api::AuthMode;
use agenthome::provision::{ProvisionEvent, Provisioner, QueueTrigger};
use agenthome::store::{create_table, DynamoStore};
use provision_fn::ProvisionService;
use serde_json::Value;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::events::{http, response_parts, Auth};
use crate::openapi;
use crate::stack::{authorizer, provision_settings};
use crate::{unique_table_name, Emulator, Moto};

/// The provision function in-process, with a real emulator and a table on
/// the shared DynamoDB-compatible server; the worker events it queues are
/// kept for [`ProvisionStack::drain_worker`].
pub struct ProvisionStack {
    pub emu: Emulator,
    pub service: ProvisionService<DynamoStore, QueueTrigger>,
    events: UnboundedReceiver<ProvisionEvent>,
}

impl ProvisionStack {
    /// A fresh stack: emulator, table, provision function.
    pub async fn start() -> Self {
        let emu = Emulator::start().await;
        let moto = Moto::shared().await;
        let client = moto.dynamodb_client().await;
        let table = unique_table_name("routes");
        create_table(&client, &table)
            .await
            .expect("create the table");
        let store = DynamoStore::new(client, table);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let settings = provision_settings("30m", "echo bootstrapped >> ~/bootstrap.log");
        let sweeper = agenthome::sweep::Sweeper::new(
            std::sync::Arc::new(store.clone()),
            &emu.client(),
            agenthome::sweep::SweepSettings::default(),
        );
        let provisioner = Provisioner::new(store, emu.client(), QueueTrigger(tx), settings);
        ProvisionStack {
            emu,
            service: ProvisionService {
                provisioner,
                sweeper,
                auth: authorizer(AuthMode::Jwt),
                fair_use: agenthome::entry::FairUse::OFF,
                metrics: agenthome::metrics::Metrics::off(),
            },
            events: rx,
        }
    }

    /// A fresh stack where alice's machine was provisioned (her PUT, then
    /// the worker).
    pub async fn with_alice() -> Self {
        let mut s = Self::start().await;
        s.call("PUT", "/v1/users/alice/machine", alice()).await;
        s.drain_worker().await;
        s
    }

    /// Deliver a request to the provision function; the exchange must
    /// conform to the API document.
    pub async fn call(&self, method: &str, path: &str, auth: Auth<'_>) -> (u16, Value, Value) {
        let event = http(method, path, None, auth);
        let checked = openapi::check_event(openapi::Function::Provision, &event);
        let resp = self
            .service
            .handle(event)
            .await
            .expect("HTTP events always get a response");
        checked.assert_apigw_response(&resp);
        response_parts(&resp)
    }

    /// Deliver every queued provision event to the worker, as Lambda would.
    pub async fn drain_worker(&mut self) -> usize {
        let mut n = 0;
        while let Ok(ev) = self.events.try_recv() {
            self.service
                .handle(serde_json::to_value(&ev).expect("event json"))
                .await
                .expect("worker event handled");
            n += 1;
        }
        n
    }
}

/// Alice's token (no scopes).
pub fn alice() -> Auth<'static> {
    Auth::Jwt {
        sub: "alice",
        scopes: &[],
    }
}

//! The whole turn stack in one process, for `tests/tests/turns.rs`: a fresh
//! emulator, a fresh table on the shared `moto_server` (serialized: conditional
//! writes on one item are atomic there, as in DynamoDB), a provisioner with
//! an in-process [`QueueTrigger`], the chat-turn function's service and the
//! provision function's service. Requests are API Gateway v2 events in
//! AWS's real shape ([`crate::events::http`]) turned into `lambda_http`
//! requests; the provisioning queue is drained through the provision
//! function's worker event, as Lambda's async invoke would.
//!
//! The bootstrap is harmless (`echo … >> ~/bootstrap.log`): the emulator
//! runs commands on the host.

use crate::events::{http, Auth};
use crate::openapi::{self, BodyCheck, Function};
use crate::uid;
use crate::{unique_table_name, Emulator, Moto};
use agenthome::agent::Agent;
use agenthome::api::{AccessPolicy, AuthMode, JwtVerifier};
use agenthome::dedalus::Phase;
use agenthome::entry::Authorizer;
use agenthome::journal::{DynamoJournal, Journal};
use agenthome::metrics::{Captured, Metrics, MetricsConfig};
use agenthome::provision::{
    Bootstrap, MachineSpec, ProvisionEvent, ProvisionSettings, Provisioner, QueueTrigger,
};
use agenthome::store::{create_table, DynamoStore, UserRecord, UserStore};
use agenthome::turn::{TurnService, TurnSettings};
use lambda_http::Body;
use serde_json::Value;
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::sync::Mutex;

/// The admin scope the stack's services accept.
pub const ADMIN_SCOPE: &str = "agenthome/admin";

/// The OAuth client whose tokens may use [`ADMIN_SCOPE`].
pub const ADMIN_CLIENT: &str = "chat-backend-client";

/// The admin policy of every stack.
pub fn access_policy() -> AccessPolicy {
    AccessPolicy::new(ADMIN_SCOPE, Some(ADMIN_CLIENT.into()))
}

/// An authorizer for `mode` (not `bearer`: see [`StackOptions::verifier`])
/// with [`access_policy`].
pub fn authorizer(mode: AuthMode) -> Authorizer {
    Authorizer::new(mode, access_policy(), None).expect("an authorizer without a verifier")
}

/// Provisioning settings for the small machine every test stack makes (1
/// vCPU, 1 GiB, 10 GiB, `autosleep`), bootstrapped by `script`.
pub fn provision_settings(autosleep: &str, script: &str) -> ProvisionSettings {
    ProvisionSettings::new(
        MachineSpec {
            vcpu: 1.0,
            memory_mib: 1024,
            storage_gib: 10,
            autosleep: autosleep.into(),
        },
        Bootstrap::new(script, None),
    )
}

/// The harmless bootstrap every stack uses.
pub const BOOTSTRAP: &str = "echo bootstrapped >> ~/bootstrap.log";

/// How to build a [`Stack`].
pub struct StackOptions {
    /// The agent (default: shell mode).
    pub agent: Agent,
    /// Turn tunables.
    pub settings: TurnSettings,
    /// `TURN_DEADLINE`.
    pub turn_deadline: Duration,
    /// Who may call.
    pub auth_mode: AuthMode,
    /// The bearer-token verifier (`AuthMode::Bearer` needs one).
    pub verifier: Option<JwtVerifier>,
    /// Per-user limits (default: off).
    pub fair_use: agenthome::entry::FairUse,
    /// `MAX_AWAKE_PER_DAY` (default: off).
    pub awake_per_day: Option<Duration>,
    /// `MACHINE_AUTOSLEEP` of the machines the stack creates (default
    /// `30m`; a short one such as `2s` lets the platform sleep them).
    pub autosleep: String,
    /// Event streams' keep-alive interval (chat-turn's `heartbeat`).
    pub heartbeat: Duration,
    /// `FIRST_TURN_WAIT` (default zero: a first message answers `202` at
    /// once and the test runs the worker with [`Stack::drain_worker`]).
    pub first_turn_wait: Duration,
}

impl Default for StackOptions {
    fn default() -> Self {
        StackOptions {
            agent: Agent::shell(),
            settings: TurnSettings {
                command_timeout: Duration::from_secs(60),
                ..TurnSettings::default()
            },
            turn_deadline: Duration::from_secs(60),
            auth_mode: AuthMode::Jwt,
            verifier: None,
            fair_use: agenthome::entry::FairUse::OFF,
            awake_per_day: None,
            autosleep: "30m".into(),
            heartbeat: chat_turn_fn::HEARTBEAT,
            first_turn_wait: Duration::ZERO,
        }
    }
}

/// A response, taken apart.
#[derive(Debug, Clone)]
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// Headers.
    pub headers: lambda_http::http::HeaderMap,
    /// The body as text.
    pub text: String,
    /// The body parsed as JSON (`Null` if empty or not JSON).
    pub body: Value,
}

impl Reply {
    /// A header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// A JWT for `user` acting for itself.
pub fn jwt(user: &str) -> Auth<'_> {
    Auth::Jwt {
        sub: user,
        scopes: &[],
    }
}

/// A JWT carrying the admin scope, issued to the admin client.
pub fn admin() -> Auth<'static> {
    Auth::Client {
        sub: "chat-backend",
        scopes: &[ADMIN_SCOPE],
        client_id: ADMIN_CLIENT,
    }
}

/// The running stack.
pub struct Stack {
    /// The Dedalus emulator.
    pub emu: Emulator,
    /// The chat-turn function (shared with the streaming handler's turn task).
    pub chat: std::sync::Arc<chat_turn_fn::ChatTurnService<DynamoStore, QueueTrigger>>,
    /// The provision function.
    pub provision: provision_fn::ProvisionService<DynamoStore, QueueTrigger>,
    /// The table.
    pub store: DynamoStore,
    /// The lifecycle journal (its own table), shared by every service.
    pub journal: Journal,
    /// `HOOK_TIMEOUT` of the services (the turn settings').
    pub hook_timeout: Duration,
    /// Every metric line both functions emitted, in order.
    pub metrics: Captured,
    events: Mutex<UnboundedReceiver<ProvisionEvent>>,
}

impl Stack {
    /// A stack with default options (shell agent, 60 s deadline, JWT auth).
    pub async fn start() -> Stack {
        Self::start_with(StackOptions::default()).await
    }

    /// A stack with `options`.
    pub async fn start_with(options: StackOptions) -> Stack {
        let emu = Emulator::start().await;
        let moto = Moto::shared().await;
        let client = moto.dynamodb_client().await;
        let table = unique_table_name("turns");
        create_table(&client, &table).await.expect("create table");
        let journal_table = unique_table_name("journal");
        agenthome::journal::table::create_table(&client, &journal_table)
            .await
            .expect("create journal table");
        let journal = Journal::new(
            std::sync::Arc::new(DynamoJournal::new(client.clone(), journal_table)),
            Duration::from_secs(30 * 86_400),
        );
        let hook_timeout = options.settings.hook_timeout;
        let store = DynamoStore::new(client, table);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let auth = Authorizer::new(options.auth_mode, access_policy(), options.verifier)
            .expect("StackOptions::verifier is set for AuthMode::Bearer");
        let autosleep = options.autosleep.clone();
        let settings = || provision_settings(&autosleep, BOOTSTRAP);
        let provisioner = |tx| {
            Provisioner::new(store.clone(), emu.client(), QueueTrigger(tx), settings())
                .with_journal(journal.clone())
        };
        let turns = TurnService::new(provisioner(tx.clone()), options.agent, options.settings);
        let (metrics, captured) = Metrics::capture(MetricsConfig {
            namespace: "agenthome-test".into(),
            stack: "test-stack".into(),
        });
        let chat = chat_turn_fn::ChatTurnService {
            turns,
            auth: auth.clone(),
            fair_use: options.fair_use,
            awake_budget: options
                .awake_per_day
                .map(|per_day| agenthome::entry::AwakeBudget {
                    per_day,
                    sweeper: agenthome::sweep::Sweeper::new(
                        std::sync::Arc::new(store.clone()),
                        &emu.client(),
                        agenthome::sweep::SweepSettings::default(),
                    )
                    .with_journal(journal.clone(), hook_timeout),
                }),
            turn_deadline: options.turn_deadline,
            margin: Duration::from_secs(2),
            heartbeat: options.heartbeat,
            metrics: metrics.clone(),
            first_turn: agenthome::entry::FirstTurn::new(options.first_turn_wait),
        };
        let provision = provision_fn::ProvisionService {
            provisioner: provisioner(tx),
            sweeper: agenthome::sweep::Sweeper::new(
                std::sync::Arc::new(store.clone()),
                &emu.client(),
                agenthome::sweep::SweepSettings::default(),
            )
            .with_journal(journal.clone(), hook_timeout),
            auth,
            fair_use: options.fair_use,
            metrics,
        };
        Stack {
            emu,
            chat: std::sync::Arc::new(chat),
            provision,
            store,
            journal,
            hook_timeout,
            metrics: captured,
            events: Mutex::new(rx),
        }
    }

    /// Deliver an API Gateway v2 event to the chat-turn function; the
    /// exchange must conform to the API document ([`crate::openapi`]).
    pub async fn send(&self, event: &Value) -> Reply {
        let req = lambda_http::request::from_str(&event.to_string())
            .expect("the event is an API Gateway v2 request");
        self.send_request(event, req).await
    }

    /// Deliver an API Gateway v2 event as an invocation whose deadline is
    /// `deadline_ms` (epoch ms), as the Lambda runtime attaches it.
    pub async fn send_with_deadline(&self, event: &Value, deadline_ms: u64) -> Reply {
        use lambda_http::RequestExt;
        let req = lambda_http::request::from_str(&event.to_string())
            .expect("the event is an API Gateway v2 request");
        let mut context = lambda_http::Context::default();
        context.request_id = "test-invocation".into();
        context.deadline = deadline_ms;
        self.send_request(event, req.with_lambda_context(context))
            .await
    }

    async fn send_request(&self, event: &Value, req: lambda_http::Request) -> Reply {
        let checked = openapi::check_event(Function::ChatTurn, event);
        let resp = self.chat.handle(&req).await;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = match resp.body() {
            Body::Text(t) => t.clone(),
            Body::Binary(b) => String::from_utf8_lossy(b).into_owned(),
            _ => String::new(),
        };
        checked.assert_response(
            status,
            &openapi::headers_from_map(&headers),
            text.as_bytes(),
        );
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Reply {
            status,
            headers,
            text,
            body,
        }
    }

    /// Deliver an API Gateway v2 / Function URL event to the chat-turn
    /// function's streaming handler (`RESPONSE_MODE=streaming`). The
    /// response must conform to the API document: its head at once, a JSON
    /// body at once, an event stream event by event as the test reads it
    /// (the returned body panics on the first event that does not conform).
    pub async fn send_streaming(
        &self,
        event: &Value,
    ) -> lambda_http::Response<chat_turn_fn::StreamBody> {
        use futures_util::StreamExt as _;
        let checked = openapi::check_event(Function::ChatTurn, event);
        let req = lambda_http::request::from_str(&event.to_string())
            .expect("the event is an API Gateway v2 request");
        let resp = std::sync::Arc::clone(&self.chat)
            .handle_streaming(req)
            .await;
        let (parts, body) = resp.into_parts();
        let status = parts.status.as_u16();
        let label = format!("{} → {status}", checked.label());
        let check = checked
            .check_head(status, &openapi::headers_from_map(&parts.headers))
            .unwrap_or_else(|e| {
                panic!(
                    "{label}: does not conform to {}: {e}",
                    openapi::DOCUMENT_PATH
                )
            });
        let body = match check {
            BodyCheck::EventStream(events) => {
                chat_turn_fn::StreamBody::stream(openapi::validated_stream(body, events, label))
            }
            other => {
                let chunks: Vec<_> = body.collect().await;
                let whole: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
                if let Err(e) = checked.check_body(other, status, &whole) {
                    panic!(
                        "{label}: does not conform to {}: {e}\nbody: {}",
                        openapi::DOCUMENT_PATH,
                        String::from_utf8_lossy(&whole)
                    );
                }
                chat_turn_fn::StreamBody::stream(futures_util::stream::iter(chunks))
            }
        };
        lambda_http::Response::from_parts(parts, body)
    }

    /// `POST /v1/users/{user}/turns` with `body` as `auth`.
    pub async fn post_turn(&self, user: &str, body: &str, auth: Auth<'_>) -> Reply {
        let path = format!("/v1/users/{user}/turns");
        self.send(&http("POST", &path, Some(body), auth)).await
    }

    /// `POST /v1/users/{user}/turns` with `message` as `user` itself,
    /// `Accept: text/event-stream`, through the streaming handler
    /// (`RESPONSE_MODE=streaming`). The body is a stream of chunks.
    pub async fn stream_turn(
        &self,
        user: &str,
        message: &str,
    ) -> lambda_http::Response<chat_turn_fn::StreamBody> {
        let body = serde_json::json!({ "message": message }).to_string();
        let path = format!("/v1/users/{user}/turns");
        let mut event = http("POST", &path, Some(&body), jwt(user));
        event["headers"]["accept"] = Value::String("text/event-stream".into());
        self.send_streaming(&event).await
    }

    /// A turn with `message`, as `user` itself.
    pub async fn turn(&self, user: &str, message: &str) -> Reply {
        let body = serde_json::json!({ "message": message }).to_string();
        self.post_turn(user, &body, jwt(user)).await
    }

    /// A sweeper over the stack's table, emulator and journal (the sleep
    /// sweep as the sleep-sweep function runs it).
    pub fn sweeper(
        &self,
        settings: agenthome::sweep::SweepSettings,
    ) -> agenthome::sweep::Sweeper<DynamoStore> {
        agenthome::sweep::Sweeper::new(
            std::sync::Arc::new(self.store.clone()),
            &self.emu.client(),
            settings,
        )
        .with_journal(self.journal.clone(), self.hook_timeout)
    }

    /// Deliver a request to the provision function (`query` without `?`);
    /// the exchange must conform to the API document.
    pub async fn machine_call(
        &self,
        method: &str,
        path: &str,
        query: &str,
        auth: Auth<'_>,
    ) -> (u16, Value) {
        let mut event = http(method, path, None, auth);
        event["rawQueryString"] = Value::String(query.into());
        let checked = openapi::check_event(Function::Provision, &event);
        let resp = self
            .provision
            .handle(event)
            .await
            .expect("HTTP events always get a response");
        checked.assert_apigw_response(&resp);
        let (status, _, body) = crate::events::response_parts(&resp);
        (status, body)
    }

    /// Deliver every queued provision event to the provision function's
    /// worker, as Lambda's async invoke would; returns how many ran.
    pub async fn drain_worker(&self) -> usize {
        let mut events = self.events.lock().await;
        let mut n = 0;
        while let Ok(ev) = events.try_recv() {
            self.provision
                .handle(serde_json::to_value(&ev).expect("event json"))
                .await
                .expect("worker event handled");
            n += 1;
        }
        n
    }

    /// Provision `user` through a first turn (202) and the worker; returns
    /// the machine id.
    pub async fn ready_user(&self, user: &str) -> String {
        let r = self.turn(user, "echo first").await;
        assert_eq!(r.status, 202, "a first message provisions: {}", r.text);
        assert_eq!(self.drain_worker().await, 1, "one worker event");
        let item = self.item(user).await;
        assert_eq!(
            item.state,
            agenthome::store::MachineState::Ready,
            "{item:?}"
        );
        item.machine_id.expect("a ready item has a machine")
    }

    /// The user's item (must exist).
    pub async fn item(&self, user: &str) -> UserRecord {
        self.store
            .get(&uid(user))
            .await
            .expect("table read")
            .expect("the user has an item")
    }

    /// The machine's home on the host.
    pub fn home(&self, machine_id: &str) -> PathBuf {
        self.emu.machine_home(machine_id)
    }

    /// Put the machine to sleep and wait until it sleeps.
    pub async fn sleep_machine(&self, machine_id: &str) {
        let client = self.emu.client();
        client
            .sleep_machine(machine_id, None, None)
            .await
            .expect("sleep accepted");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        client
            .wait_until(machine_id, Phase::Sleeping, deadline)
            .await
            .expect("machine sleeps");
    }
}

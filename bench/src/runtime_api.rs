//! A fake AWS Lambda on loopback, to run the function binaries outside
//! Lambda: the runtime API a function polls for its events
//! (`/2018-06-01/runtime/...`), and the Invoke API a function calls to
//! start another one (`POST /2015-03-31/functions/{name}/invocations`,
//! answered 202 as an asynchronous invoke is).
//!
//! `bin/cold_start` queues no event: init time is spawn → the function's
//! first `GET /2018-06-01/runtime/invocation/next`, which is never answered.
//! `bin/lambda_smoke` queues one event and reads the function's answer.
//! Nothing leaves loopback: [`FunctionEnv`] gives the function a fixed
//! region, dummy credentials, no instance metadata and loopback endpoints.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::path::Path as FsPath;
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::time::Instant;

/// What a function reported to the runtime API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// `POST .../invocation/{id}/response`: the handler's result.
    Response(Bytes),
    /// `POST .../invocation/{id}/error`: the handler failed.
    Error(Bytes),
    /// `POST /2018-06-01/runtime/init/error`: the function could not start.
    InitError(Bytes),
}

impl Answer {
    /// The body, as JSON when it is JSON.
    pub fn json(&self) -> Option<serde_json::Value> {
        let (Answer::Response(b) | Answer::Error(b) | Answer::InitError(b)) = self;
        serde_json::from_slice(b).ok()
    }
}

/// An invoke a function made through the Invoke API.
#[derive(Debug, Clone)]
pub struct Invoke {
    /// The function name (or ARN) in the path.
    pub function: String,
    /// `X-Amz-Invocation-Type` (`Event` for an asynchronous invoke).
    pub invocation_type: Option<String>,
    /// The event.
    pub payload: Bytes,
}

#[derive(Default)]
struct Inner {
    events: VecDeque<(String, Bytes)>,
    first_poll: Option<Instant>,
    delivered: Option<Instant>,
    answer: Option<(Instant, Answer)>,
    invokes: Vec<Invoke>,
}

type Shared = Arc<Mutex<Inner>>;

fn lock(s: &Shared) -> MutexGuard<'_, Inner> {
    // A handler never panics while holding the lock; recover anyway.
    s.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The fake Lambda: one per function process.
pub struct FakeLambda {
    addr: SocketAddr,
    shared: Shared,
    server: tokio::task::JoinHandle<()>,
}

impl FakeLambda {
    /// Listen on a free loopback port.
    pub async fn start() -> std::io::Result<FakeLambda> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Shared::default();
        let app = Router::new()
            .route("/2018-06-01/runtime/invocation/next", get(next))
            .route(
                "/2018-06-01/runtime/invocation/{id}/response",
                post(|s: State<Shared>, b: Bytes| answered(s, Answer::Response(b))),
            )
            .route(
                "/2018-06-01/runtime/invocation/{id}/error",
                post(|s: State<Shared>, b: Bytes| answered(s, Answer::Error(b))),
            )
            .route(
                "/2018-06-01/runtime/init/error",
                post(|s: State<Shared>, b: Bytes| answered(s, Answer::InitError(b))),
            )
            .route("/2015-03-31/functions/{name}/invocations", post(invoke))
            .with_state(shared.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(FakeLambda {
            addr,
            shared,
            server,
        })
    }

    /// `host:port`, for `AWS_LAMBDA_RUNTIME_API`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://host:port`, for `AWS_ENDPOINT_URL_LAMBDA`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Queue an event for the next `GET .../invocation/next`.
    pub fn queue(&self, request_id: &str, event: &serde_json::Value) {
        let body = Bytes::from(event.to_string());
        lock(&self.shared)
            .events
            .push_back((request_id.to_owned(), body));
    }

    /// When the function first asked for an event (its init is done), within
    /// `timeout`.
    pub async fn first_poll(&self, timeout: Duration) -> Option<Instant> {
        self.wait(timeout, |i| i.first_poll).await
    }

    /// The function's answer to the queued event (or its init error), with
    /// the time from delivering the event to the answer, within `timeout`.
    pub async fn answer(&self, timeout: Duration) -> Option<(Answer, Duration)> {
        self.wait(timeout, |i| {
            let (at, answer) = i.answer.clone()?;
            let took = i.delivered.map_or(Duration::ZERO, |d| at.duration_since(d));
            Some((answer, took))
        })
        .await
    }

    /// The invokes made so far.
    pub fn invokes(&self) -> Vec<Invoke> {
        lock(&self.shared).invokes.clone()
    }

    async fn wait<T>(&self, timeout: Duration, f: impl Fn(&Inner) -> Option<T>) -> Option<T> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(v) = f(&lock(&self.shared)) {
                return Some(v);
            }
            if Instant::now() >= end {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

impl Drop for FakeLambda {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// The next queued event, or no answer at all (the function keeps waiting,
/// as in a Lambda sandbox between events).
async fn next(State(s): State<Shared>) -> Response {
    let event = {
        let mut inner = lock(&s);
        let now = Instant::now();
        inner.first_poll.get_or_insert(now);
        let event = inner.events.pop_front();
        if event.is_some() {
            inner.delivered = Some(now);
        }
        event
    };
    let Some((id, body)) = event else {
        return std::future::pending::<Response>().await;
    };
    let deadline = agenthome::clock::now_ms() + 60_000;
    let mut headers = HeaderMap::new();
    let values = [
        ("lambda-runtime-aws-request-id", id),
        ("lambda-runtime-deadline-ms", deadline.to_string()),
        (
            "lambda-runtime-invoked-function-arn",
            "arn:aws:lambda:us-east-1:123456789012:function:smoke".to_owned(),
        ),
        (
            "lambda-runtime-trace-id",
            "Root=1-00000000-000000000000000000000000;Sampled=0".to_owned(),
        ),
        ("content-type", "application/json".to_owned()),
    ];
    for (name, value) in values {
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(name, v);
        }
    }
    (StatusCode::OK, headers, body).into_response()
}

async fn answered(State(s): State<Shared>, answer: Answer) -> StatusCode {
    let mut inner = lock(&s);
    if inner.answer.is_none() {
        inner.answer = Some((Instant::now(), answer));
    }
    StatusCode::ACCEPTED
}

async fn invoke(
    State(s): State<Shared>,
    Path(function): Path<String>,
    headers: HeaderMap,
    payload: Bytes,
) -> StatusCode {
    let invocation_type = headers
        .get("x-amz-invocation-type")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    lock(&s).invokes.push(Invoke {
        function,
        invocation_type,
        payload,
    });
    StatusCode::ACCEPTED
}

/// The environment of a function process: what Lambda sets, the project's
/// configuration, and loopback-only AWS settings. Endpoints default to a
/// closed loopback port (init makes no calls).
#[derive(Debug, Clone)]
pub struct FunctionEnv(BTreeMap<String, String>);

impl FunctionEnv {
    /// The defaults for function `name` served by the runtime API at `runtime`.
    pub fn new(name: &str, runtime: SocketAddr) -> FunctionEnv {
        let closed = "http://127.0.0.1:9";
        let pairs = [
            ("PATH", "/usr/bin:/bin".to_owned()),
            ("AWS_LAMBDA_RUNTIME_API", runtime.to_string()),
            ("AWS_LAMBDA_FUNCTION_NAME", name.to_owned()),
            ("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST".to_owned()),
            ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128".to_owned()),
            ("AWS_LAMBDA_LOG_GROUP_NAME", format!("/aws/lambda/{name}")),
            ("AWS_LAMBDA_LOG_STREAM_NAME", "local".to_owned()),
            ("AWS_REGION", "us-east-1".to_owned()),
            ("AWS_DEFAULT_REGION", "us-east-1".to_owned()),
            ("AWS_EC2_METADATA_DISABLED", "true".to_owned()),
            ("AWS_ACCESS_KEY_ID", "test".to_owned()),
            ("AWS_SECRET_ACCESS_KEY", "test".to_owned()),
            ("AWS_ENDPOINT_URL_DYNAMODB", closed.to_owned()),
            ("AWS_ENDPOINT_URL_LAMBDA", closed.to_owned()),
            ("TABLE_NAME", "bench".to_owned()),
            ("DEDALUS_BASE_URL", closed.to_owned()),
            ("DEDALUS_API_KEY", "bench-key".to_owned()),
            ("AGENT_MODEL", "shell".to_owned()),
            ("AUTH_MODE", "iam".to_owned()),
            ("PROVISION_FUNCTION", "provision".to_owned()),
            ("BOOTSTRAP_SCRIPT", "true".to_owned()),
            ("RUST_LOG", "warn".to_owned()),
        ];
        FunctionEnv(pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
    }

    /// Set (or replace) one variable.
    pub fn set(mut self, key: &str, value: impl Into<String>) -> FunctionEnv {
        self.0.insert(key.to_owned(), value.into());
        self
    }

    /// Start `bin` with exactly this environment, through `runner` when
    /// given (e.g. `qemu-aarch64 -L /usr/aarch64-linux-gnu`); its output
    /// goes to `log` (or nowhere). The process is killed when dropped.
    pub fn spawn(
        &self,
        runner: &[String],
        bin: &FsPath,
        log: Option<&FsPath>,
    ) -> std::io::Result<tokio::process::Child> {
        let mut cmd = match runner.split_first() {
            Some((program, args)) => {
                let mut c = tokio::process::Command::new(program);
                c.args(args).arg(bin);
                c
            }
            None => tokio::process::Command::new(bin),
        };
        let (out, err) = match log {
            Some(path) => {
                let f = std::fs::File::create(path)?;
                (Stdio::from(f.try_clone()?), Stdio::from(f))
            }
            None => (Stdio::null(), Stdio::null()),
        };
        cmd.env_clear()
            .envs(&self.0)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
    }
}

//! Test harness for the workspace integration tests.
//!
//! Every test talks to real processes over loopback:
//! - [`Emulator`]: a fresh `dcs-emulator` process per test (free port, temp
//!   data dir, fast timings), with helpers for its admin routes.
//! - [`Moto`]: one `moto_server` (DynamoDB-compatible) per test binary.
//! - [`openapi`]: every request the tests deliver to the functions' HTTP
//!   routes, and its response, is checked against `openapi.yaml`.
//!
//! Processes are started with the workspace's one process harness
//! (`test-harness`): each is killed, by its own PID, when its handle drops
//! and, as a backstop, when the test binary dies (`PR_SET_PDEATHSIG`), so a
//! failed or killed test run leaves nothing behind.

pub mod events;
pub mod fixtures;
pub mod idp;
pub mod llm;
pub mod openapi;
pub mod provision_stack;
pub mod schema;
pub mod spec;
pub mod stack;
pub mod store_contract;
mod users;

pub use users::uid;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

pub use test_harness::emulator::FAST_FLAGS as FAST_EMULATOR_FLAGS;
use test_harness::emulator::{fast_flags_then, EmulatorCommand};
use test_harness::Process;
pub use test_harness::{free_port, host_pids_with_arg};

/// Environment every test process needs so the AWS SDK never looks beyond
/// loopback (no instance metadata, no default endpoints).
pub fn set_local_aws_env() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        // SAFETY-free: set_var is safe in edition 2021; done once, first thing.
        std::env::set_var("AWS_REGION", "us-east-1");
        std::env::set_var("AWS_DEFAULT_REGION", "us-east-1");
        std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
        std::env::set_var("AWS_ACCESS_KEY_ID", "test");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "test");
    });
}

/// The workspace root (parent of the `tests/` package).
pub fn workspace_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().unwrap_or(here).to_path_buf()
}

/// A table name no other test in this run uses.
pub fn unique_table_name(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::now_v7().simple())
}

// ---------------------------------------------------------------------------
// Emulator
// ---------------------------------------------------------------------------

/// Path of the `dcs-emulator` binary: `$DCS_EMULATOR_BIN`, or the one in this
/// test run's target dir (built with cargo on first use if missing).
pub fn emulator_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(p) = std::env::var("DCS_EMULATOR_BIN") {
            return PathBuf::from(p);
        }
        // current_exe = <target>/<profile>/deps/<test>-<hash>
        let exe = std::env::current_exe().expect("current exe");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test binary lives in <target>/<profile>/deps")
            .to_path_buf();
        let bin = profile_dir.join("dcs-emulator");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        // Always ask cargo: it is a no-op when the binary is fresh, and it
        // keeps a stale emulator from being tested after a source change.
        let status = Command::new(cargo)
            .args(["build", "-q", "-p", "dcs-emulator", "--bin", "dcs-emulator"])
            .current_dir(workspace_root())
            .status()
            .expect("run cargo build for dcs-emulator");
        assert!(status.success(), "building dcs-emulator failed");
        assert!(bin.exists(), "dcs-emulator not found at {}", bin.display());
        bin
    })
    .clone()
}

/// A running `dcs-emulator` process.
pub struct Emulator {
    process: Option<Process>,
    data_dir: tempfile::TempDir,
    args: Vec<String>,
    /// `http://127.0.0.1:PORT`
    pub base_url: String,
    /// The API key the emulator accepts.
    pub api_key: String,
    http: reqwest::Client,
}

impl Emulator {
    /// A fresh emulator with [`FAST_EMULATOR_FLAGS`].
    pub async fn start() -> Emulator {
        Self::start_with(&[]).await
    }

    /// A fresh emulator with [`FAST_EMULATOR_FLAGS`] followed by `extra`
    /// (later flags win).
    pub async fn start_with(extra: &[&str]) -> Emulator {
        set_local_aws_env();
        let data_dir = tempfile::Builder::new()
            .prefix("dcs-emulator-test-")
            .tempdir()
            .expect("temp data dir");
        let args = fast_flags_then(extra);
        let mut emu = Emulator {
            process: None,
            data_dir,
            args,
            base_url: String::new(),
            api_key: format!("test-key-{}", uuid::Uuid::now_v7().simple()),
            http: reqwest::Client::new(),
        };
        emu.spawn("127.0.0.1:0").await;
        emu
    }

    async fn spawn(&mut self, listen: &str) {
        let (process, base_url) = EmulatorCommand {
            bin: &emulator_bin(),
            listen,
            api_key: &self.api_key,
            data_dir: &self.data_dir(),
            flags: &self.args,
            env: &[("RUST_LOG", "info")],
            logs: self.data_dir.path(),
        }
        .start();
        self.process = Some(process);
        self.base_url = base_url;
    }

    /// Stop the process (SIGKILL: a crash, not a clean shutdown) and start it
    /// again on the same data dir and port.
    pub async fn restart(&mut self) {
        self.kill();
        let listen = self
            .base_url
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        self.spawn(&listen).await;
    }

    /// Kill the process now (the data dir stays until drop).
    pub fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill();
        }
    }

    /// The emulator's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir.path().join("state")
    }

    /// The home directory of machine `id` on the host.
    pub fn machine_home(&self, id: &str) -> PathBuf {
        self.data_dir().join("machines").join(id).join("home")
    }

    /// Everything the emulator logged so far (for assertion messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(test_harness::emulator::log_path(self.data_dir.path()))
            .unwrap_or_default()
    }

    fn admin_url(&self, path: &str) -> String {
        format!("{}/_emulator/{path}", self.base_url)
    }

    /// Inject a fault (see emulator/README.md); returns the fault id.
    pub async fn inject_fault(&self, fault: serde_json::Value) -> String {
        let resp = self
            .http
            .post(self.admin_url("faults"))
            .json(&fault)
            .send()
            .await
            .expect("POST /_emulator/faults");
        let status = resp.status();
        let body: serde_json::Value = resp.json().await.expect("fault response json");
        assert!(status.is_success(), "inject_fault failed: {status} {body}");
        body["fault_id"].as_str().unwrap_or_default().to_string()
    }

    /// Remove every injected fault.
    pub async fn clear_faults(&self) {
        let resp = self
            .http
            .delete(self.admin_url("faults"))
            .send()
            .await
            .expect("DELETE /_emulator/faults");
        assert!(
            resp.status().is_success(),
            "clear_faults: {}",
            resp.status()
        );
    }

    /// Every `/v1` request the emulator received, oldest first.
    pub async fn requests(&self) -> Vec<serde_json::Value> {
        let resp = self
            .http
            .get(self.admin_url("requests"))
            .send()
            .await
            .expect("GET /_emulator/requests");
        let body: serde_json::Value = resp.json().await.expect("requests json");
        match body {
            serde_json::Value::Array(items) => items,
            other => other["items"].as_array().cloned().unwrap_or_default(),
        }
    }

    /// Change timing knobs at run time (`PATCH /_emulator/config`).
    pub async fn configure(&self, patch: serde_json::Value) {
        let resp = self
            .http
            .patch(self.admin_url("config"))
            .json(&patch)
            .send()
            .await
            .expect("PATCH /_emulator/config");
        assert!(resp.status().is_success(), "configure: {}", resp.status());
    }

    /// A raw HTTP client and the auth header value, for tests that check the
    /// wire format itself.
    pub fn raw(&self) -> (&reqwest::Client, String) {
        (&self.http, format!("Bearer {}", self.api_key))
    }
}

// ---------------------------------------------------------------------------
// moto_server (DynamoDB-compatible)
// ---------------------------------------------------------------------------

/// One `moto_server` per test binary, shared by its tests (each test uses its
/// own table, see [`unique_table_name`]).
pub struct Moto {
    /// `http://127.0.0.1:PORT`
    pub endpoint: String,
}

/// The Python of the project venv (where moto is installed): `$MOTO_PYTHON`,
/// else `.venv/bin/python`, else `python3`.
pub fn moto_python() -> PathBuf {
    if let Ok(p) = std::env::var("MOTO_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = workspace_root().join(".venv/bin/python");
    if venv.exists() {
        return venv;
    }
    PathBuf::from("python3")
}

/// Starts `scripts/moto_serial.py` on a free port and waits (30 s at most)
/// until it listens; returns it and its port.
fn start_moto() -> (Process, u16) {
    let port = free_port();
    let script = workspace_root().join("scripts/moto_serial.py");
    let mut cmd = Command::new(moto_python());
    cmd.arg(script)
        .args(["127.0.0.1", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut process = Process::start("moto_server", &mut cmd).unwrap_or_else(|e| {
        panic!(
            "cannot start moto ({}): {e}; run ./scripts/test, which installs it",
            moto_python().display()
        )
    });
    process.wait_for_port(port, Duration::from_secs(30));
    (process, port)
}

impl Moto {
    /// The shared server, started on first use. It serves one request at a
    /// time (`scripts/moto_serial.py`): the threaded `moto_server` is not
    /// atomic per item under concurrent conditional writes, DynamoDB is.
    pub async fn shared() -> &'static Moto {
        static MOTO: OnceLock<Moto> = OnceLock::new();
        set_local_aws_env();
        if let Some(m) = MOTO.get() {
            return m;
        }
        // Start it from a thread that lives as long as the process, so the
        // parent-death signal fires only when the test binary exits.
        tokio::task::spawn_blocking(|| {
            MOTO.get_or_init(|| {
                let (tx, rx) = std::sync::mpsc::channel();
                std::thread::Builder::new()
                    .name("moto-server-owner".into())
                    .spawn(move || {
                        let (process, port) = start_moto();
                        let _ = tx.send(port);
                        let _keep = process;
                        loop {
                            std::thread::park();
                        }
                    })
                    .expect("spawn moto owner thread");
                let port = rx.recv().expect("moto listens (see the panic above)");
                Moto {
                    endpoint: format!("http://127.0.0.1:{port}"),
                }
            });
        })
        .await
        .expect("start moto");
        MOTO.get().expect("moto initialised")
    }

    /// An SDK config pointing at this server only (static credentials, fixed
    /// region, no metadata lookups).
    pub async fn sdk_config(&self) -> aws_config::SdkConfig {
        set_local_aws_env();
        aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_dynamodb::config::Credentials::new(
                "test", "test", None, None, "static",
            ))
            .endpoint_url(&self.endpoint)
            .load()
            .await
    }

    /// A DynamoDB client for this server.
    pub async fn dynamodb_client(&self) -> aws_sdk_dynamodb::Client {
        aws_sdk_dynamodb::Client::new(&self.sdk_config().await)
    }
}

// ---------------------------------------------------------------------------
// Dedalus client for an emulator
// ---------------------------------------------------------------------------

/// A retry policy for tests: same rules as production, short waits.
pub fn fast_retry_policy() -> agenthome::dedalus::RetryPolicy {
    agenthome::dedalus::RetryPolicy {
        max_attempts: 5,
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(200),
        jitter: true,
        call_deadline: Duration::from_secs(20),
        max_server_delay: Duration::from_secs(5),
    }
}

impl Emulator {
    /// A client configuration for this emulator: its key, a 5 s request
    /// timeout and [`fast_retry_policy`]. Tweak it and build with
    /// `agenthome::dedalus::Client::new`.
    pub fn client_config(&self) -> agenthome::dedalus::ClientConfig {
        let base = agenthome::dedalus::Url::parse(&self.base_url).expect("emulator base URL");
        agenthome::dedalus::ClientConfig::new(base, self.api_key.as_str().into())
            .with_request_timeout(Duration::from_secs(5))
            .with_retry(fast_retry_policy())
    }

    /// A Dedalus client for this emulator (see [`Emulator::client_config`]).
    pub fn client(&self) -> agenthome::dedalus::Client {
        agenthome::dedalus::Client::new(self.client_config()).expect("dedalus client")
    }
}

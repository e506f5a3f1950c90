//! Operational metrics: one CloudWatch Embedded Metric Format (EMF) line per
//! chat turn, per provisioning run and per sweep run, printed on stdout
//! (Lambda sends stdout to CloudWatch Logs, which extracts the metrics).
//!
//! Every line is described by a static [`LineSpec`]: its function, the
//! metrics it may carry (name and unit), the dimensions it may set, each
//! with its closed set of values, and the breakdowns (extra dimension sets)
//! some metrics are also published under. [`EmfDoc`] builds a line from a
//! spec, so a line can only carry declared metrics and bounded dimension
//! values (an undeclared value becomes `other`); anything else — user ids,
//! turn ids, machine ids, problem details — goes into plain properties,
//! which Logs Insights can query but which never become metrics. Every
//! metric is published under `Stack` (`METRICS_STACK`) and `Function`, in
//! namespace `METRICS_NAMESPACE`. [`LINES`] is the catalogue the template's
//! dashboard and alarms are checked against.
//!
//! Counting what a unit of work cost: [`tallied`] runs a future with a
//! task-local [`Tally`] that the Dedalus client (every HTTP attempt, event
//! stream and WebSocket connect) and the DynamoDB adapter (every request)
//! add to; the provisioning worker records its boot and bootstrap times and
//! its attempt number in it. Work spawned onto other tasks (the turn lease's renewer) is not
//! counted. Outside [`tallied`] the hooks do nothing.

use std::collections::HashMap;
use std::future::Future;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::api::ProblemCode;
use crate::config::ConfigError;
use crate::env::{malformed, Env};

/// Namespace of every metric unless `METRICS_NAMESPACE` says otherwise.
pub const DEFAULT_NAMESPACE: &str = "agenthome";
/// `Stack` dimension value unless `METRICS_STACK` says otherwise.
pub const DEFAULT_STACK: &str = "agenthome";
/// The dimension naming the deployment (the template sets the stack name).
pub const STACK: &str = "Stack";
/// The dimension naming the function that emitted the line.
pub const FUNCTION: &str = "Function";
/// The value an undeclared dimension value is published as.
pub const OTHER: &str = "other";

// ------------------------------------------------------------- configuration --

/// Where metrics go: the namespace and the `Stack` dimension's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsConfig {
    /// `METRICS_NAMESPACE` (default `agenthome`).
    pub namespace: String,
    /// `METRICS_STACK` (default `agenthome`; the template passes the stack name).
    pub stack: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            namespace: DEFAULT_NAMESPACE.into(),
            stack: DEFAULT_STACK.into(),
        }
    }
}

impl MetricsConfig {
    /// Read the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_map(&std::env::vars().collect())
    }

    /// Read from a map (tests).
    pub fn from_map(vars: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let env = Env::new(vars);
        let namespace = env.string("METRICS_NAMESPACE", DEFAULT_NAMESPACE);
        let stack = env.string("METRICS_STACK", DEFAULT_STACK);
        check_namespace(&namespace)?;
        check_stack(&stack)?;
        Ok(MetricsConfig { namespace, stack })
    }
}

/// CloudWatch namespaces: 1–255 of `[A-Za-z0-9 ._/#:-]`, not `AWS/…`.
fn check_namespace(ns: &str) -> Result<(), ConfigError> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || " ._/#:-".contains(c);
    let reason = if ns.len() > 255 {
        "longer than 255 characters"
    } else if !ns.chars().all(ok_char) {
        "only letters, digits, spaces and . _ / # : - are allowed"
    } else if ns.starts_with("AWS/") {
        "the AWS/ prefix is reserved"
    } else {
        return Ok(());
    };
    Err(malformed("METRICS_NAMESPACE", ns, reason))
}

/// A stack name: 1–128 of `[A-Za-z0-9._-]`.
fn check_stack(stack: &str) -> Result<(), ConfigError> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || "._-".contains(c);
    if stack.len() <= 128 && stack.chars().all(ok_char) {
        return Ok(());
    }
    Err(malformed(
        "METRICS_STACK",
        stack,
        "1 to 128 letters, digits, '.', '_' or '-'",
    ))
}

// ------------------------------------------------------------------ specs --

/// CloudWatch units the lines use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// A count.
    Count,
    /// Milliseconds.
    Milliseconds,
    /// Bytes.
    Bytes,
}

impl Unit {
    /// The EMF `Unit` string.
    pub fn as_str(self) -> &'static str {
        match self {
            Unit::Count => "Count",
            Unit::Milliseconds => "Milliseconds",
            Unit::Bytes => "Bytes",
        }
    }
}

/// A metric a line may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricSpec {
    /// Its name (also the line's member holding the value).
    pub name: &'static str,
    /// Its unit.
    pub unit: Unit,
}

impl MetricSpec {
    /// A `Count` metric.
    pub const fn count(name: &'static str) -> Self {
        MetricSpec {
            name,
            unit: Unit::Count,
        }
    }
    /// A `Milliseconds` metric.
    pub const fn ms(name: &'static str) -> Self {
        MetricSpec {
            name,
            unit: Unit::Milliseconds,
        }
    }
    /// A `Bytes` metric.
    pub const fn bytes(name: &'static str) -> Self {
        MetricSpec {
            name,
            unit: Unit::Bytes,
        }
    }
}

/// A dimension a line may set, with every value it may take (plus [`OTHER`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DimensionSpec {
    /// Its name.
    pub name: &'static str,
    /// Its values.
    pub values: &'static [&'static str],
}

/// Metrics also published under `Stack`, `Function` and `dimensions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Breakdown {
    /// The extra dimensions.
    pub dimensions: &'static [&'static str],
    /// The metrics broken down (those present in the line).
    pub metrics: &'static [&'static str],
}

/// Everything one kind of line may contain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineSpec {
    /// The `Function` dimension's value.
    pub function: &'static str,
    /// Dimensions the line may set besides `Stack` and `Function`.
    pub dimensions: &'static [DimensionSpec],
    /// Metrics, all published under `[Stack, Function]`.
    pub metrics: &'static [MetricSpec],
    /// Extra dimension sets for some metrics.
    pub breakdowns: &'static [Breakdown],
    /// Plain members (for Logs Insights): never metrics, never dimensions.
    pub properties: &'static [&'static str],
}

impl LineSpec {
    /// The metric named `name`.
    pub fn metric(&self, name: &str) -> Option<&'static MetricSpec> {
        self.metrics.iter().find(|m| m.name == name)
    }

    /// The dimension named `name`.
    pub fn dimension(&self, name: &str) -> Option<&'static DimensionSpec> {
        self.dimensions.iter().find(|d| d.name == name)
    }

    /// Every dimension set a metric may be published under.
    pub fn dimension_sets(&self, metric: &str) -> Vec<Vec<&'static str>> {
        let mut sets = vec![vec![STACK, FUNCTION]];
        for b in self
            .breakdowns
            .iter()
            .filter(|b| b.metrics.contains(&metric))
        {
            let mut set = vec![STACK, FUNCTION];
            set.extend_from_slice(b.dimensions);
            sets.push(set);
        }
        sets
    }
}

/// Problem codes a failed turn answers with (`Code` dimension).
pub const TURN_CODES: &[&str] = &[
    ProblemCode::LlmError.code(),
    ProblemCode::ShellError.code(),
    ProblemCode::MachineWaking.code(),
    ProblemCode::NoTime.code(),
    ProblemCode::TemporarilyUnavailable.code(),
    ProblemCode::InternalError.code(),
    ProblemCode::ProvisioningFailed.code(),
];

/// One line per chat turn (`chat-turn`, buffered or streamed).
pub const TURN_LINE: LineSpec = LineSpec {
    function: "chat-turn",
    dimensions: &[
        DimensionSpec {
            name: "Outcome",
            values: &[
                "completed",
                "deadline",
                "step_limit",
                "lease_lost",
                "provisioning",
                "busy",
                "destroying",
                "failed",
                "rate_limited",
            ],
        },
        DimensionSpec {
            name: "Transport",
            values: &["terminal", "executions"],
        },
        DimensionSpec {
            name: "Code",
            values: TURN_CODES,
        },
    ],
    metrics: &[
        MetricSpec::count("turns"),
        MetricSpec::count("turn_failures"),
        MetricSpec::ms("turn_total_ms"),
        MetricSpec::ms("time_to_first_command_ms"),
        MetricSpec::ms("wake_ms"),
        MetricSpec::count("steps"),
        MetricSpec::count("llm_calls"),
        MetricSpec::count("prompt_tokens"),
        MetricSpec::count("completion_tokens"),
        MetricSpec::bytes("output_bytes"),
        MetricSpec::count("dedalus_requests"),
        MetricSpec::count("table_calls"),
        MetricSpec::count("dedalus_requests_before_first_command"),
    ],
    breakdowns: &[
        Breakdown {
            dimensions: &["Outcome"],
            metrics: &["turns", "turn_total_ms"],
        },
        Breakdown {
            dimensions: &["Transport"],
            metrics: &["turns", "turn_total_ms"],
        },
        Breakdown {
            dimensions: &["Code"],
            metrics: &["turn_failures"],
        },
    ],
    properties: &[
        "user_id",
        "mode",
        "turn_id",
        "machine_id",
        "status",
        "state",
        "code",
        "error",
    ],
};

/// One line per run of the provisioning worker.
pub const PROVISION_LINE: LineSpec = LineSpec {
    function: "provision",
    dimensions: &[DimensionSpec {
        name: "Outcome",
        values: &["ready", "skipped", "retrying", "failed"],
    }],
    metrics: &[
        MetricSpec::count("provisions"),
        MetricSpec::count("provision_failures"),
        MetricSpec::ms("provision_total_ms"),
        MetricSpec::ms("boot_ms"),
        MetricSpec::ms("bootstrap_ms"),
        MetricSpec::count("attempts"),
        MetricSpec::count("dedalus_requests"),
        MetricSpec::count("table_calls"),
    ],
    breakdowns: &[Breakdown {
        dimensions: &["Outcome"],
        metrics: &["provisions"],
    }],
    properties: &["user_id", "machine_id", "state", "error_kind", "error"],
};

/// Every kind of line the functions emit.
pub const LINES: &[&LineSpec] = &[&TURN_LINE, &PROVISION_LINE, &crate::sweep::SWEEP_LINE];

// --------------------------------------------------------------- documents --

/// One EMF line being built from its [`LineSpec`].
#[derive(Debug, Clone)]
pub struct EmfDoc {
    spec: &'static LineSpec,
    namespace: String,
    stack: String,
    timestamp_ms: u64,
    dimensions: Vec<(&'static str, &'static str)>,
    metrics: Vec<(&'static MetricSpec, u64)>,
    properties: Map<String, Value>,
}

impl EmfDoc {
    /// An empty line of kind `spec` at `timestamp_ms` (epoch ms).
    pub fn new(spec: &'static LineSpec, config: &MetricsConfig, timestamp_ms: u64) -> Self {
        EmfDoc {
            spec,
            namespace: config.namespace.clone(),
            stack: config.stack.clone(),
            timestamp_ms,
            dimensions: Vec::new(),
            metrics: Vec::new(),
            properties: Map::new(),
        }
    }

    /// Set a declared dimension. A value outside its declared set is
    /// published as [`OTHER`]; an undeclared dimension is ignored.
    pub fn dimension(&mut self, name: &str, value: &str) -> &mut Self {
        let Some(spec) = self.spec.dimension(name) else {
            tracing::warn!(dimension = name, "undeclared metric dimension dropped");
            return self;
        };
        let value = spec
            .values
            .iter()
            .copied()
            .find(|v| *v == value)
            .unwrap_or(OTHER);
        self.dimensions.retain(|(n, _)| *n != spec.name);
        self.dimensions.push((spec.name, value));
        self
    }

    /// Set a declared metric (an undeclared one is ignored).
    pub fn metric(&mut self, name: &str, value: u64) -> &mut Self {
        let Some(spec) = self.spec.metric(name) else {
            tracing::warn!(metric = name, "undeclared metric dropped");
            return self;
        };
        self.metrics.retain(|(m, _)| m.name != spec.name);
        self.metrics.push((spec, value));
        self
    }

    /// [`EmfDoc::metric`] for a duration, in ms.
    pub fn millis(&mut self, name: &str, d: Duration) -> &mut Self {
        self.metric(name, u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    /// Set a declared property: searchable in Logs Insights, never a metric
    /// or dimension (an undeclared one is ignored).
    pub fn property(&mut self, name: &str, value: impl Into<Value>) -> &mut Self {
        match self.spec.properties.iter().find(|p| **p == name) {
            Some(p) => {
                self.properties.insert((*p).to_owned(), value.into());
            }
            None => tracing::warn!(property = name, "undeclared metric line property dropped"),
        }
        self
    }

    /// The value of a metric set on this line.
    pub fn get(&self, name: &str) -> Option<u64> {
        self.metrics
            .iter()
            .find(|(m, _)| m.name == name)
            .map(|(_, v)| *v)
    }

    /// The line as a JSON document: properties, dimensions and metric values
    /// as top-level members, and the `_aws` metadata with one directive for
    /// `[Stack, Function]` and one per breakdown that applies.
    pub fn to_value(&self) -> Value {
        let mut doc = self.properties.clone();
        doc.insert(STACK.into(), json!(self.stack));
        doc.insert(FUNCTION.into(), json!(self.spec.function));
        for (name, value) in &self.dimensions {
            doc.insert((*name).into(), json!(value));
        }
        for (m, value) in &self.metrics {
            doc.insert(m.name.into(), json!(value));
        }
        let definition = |m: &MetricSpec| json!({"Name": m.name, "Unit": m.unit.as_str()});
        let mut directives = vec![json!({
            "Namespace": self.namespace,
            "Dimensions": [[STACK, FUNCTION]],
            "Metrics": self.metrics.iter().map(|(m, _)| definition(m)).collect::<Vec<_>>(),
        })];
        for b in self.spec.breakdowns {
            let has_dims = b
                .dimensions
                .iter()
                .all(|d| self.dimensions.iter().any(|(n, _)| n == d));
            let metrics: Vec<Value> = self
                .metrics
                .iter()
                .filter(|(m, _)| b.metrics.contains(&m.name))
                .map(|(m, _)| definition(m))
                .collect();
            if has_dims && !metrics.is_empty() {
                let mut set = vec![STACK, FUNCTION];
                set.extend_from_slice(b.dimensions);
                directives.push(json!({
                    "Namespace": self.namespace,
                    "Dimensions": [set],
                    "Metrics": metrics,
                }));
            }
        }
        doc.insert(
            "_aws".into(),
            json!({"Timestamp": self.timestamp_ms, "CloudWatchMetrics": directives}),
        );
        Value::Object(doc)
    }

    /// [`EmfDoc::to_value`] as one line of JSON (no newline inside).
    pub fn line(&self) -> String {
        self.to_value().to_string()
    }
}

// ---------------------------------------------------------------- emitter --

/// Where the functions' metric lines go.
#[derive(Debug, Clone)]
pub struct Metrics {
    config: Arc<MetricsConfig>,
    out: Out,
}

#[derive(Debug, Clone)]
enum Out {
    Stdout,
    Capture(Arc<Mutex<Vec<String>>>),
    Off,
}

/// Lines kept by [`Metrics::capture`].
#[derive(Debug, Clone)]
pub struct Captured(Arc<Mutex<Vec<String>>>);

impl Captured {
    /// Every line so far, in order.
    pub fn lines(&self) -> Vec<String> {
        match self.0.lock() {
            Ok(lines) => lines.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

impl Metrics {
    /// One line per document on stdout (Lambda: CloudWatch Logs).
    pub fn stdout(config: MetricsConfig) -> Self {
        Metrics {
            config: Arc::new(config),
            out: Out::Stdout,
        }
    }

    /// [`Metrics::stdout`] with `METRICS_NAMESPACE` and `METRICS_STACK`
    /// (each function, once per cold start).
    pub fn from_env() -> Result<Self, ConfigError> {
        Ok(Self::stdout(MetricsConfig::from_env()?))
    }

    /// Keep the lines in memory (local tools and tests read them back).
    pub fn capture(config: MetricsConfig) -> (Self, Captured) {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let metrics = Metrics {
            config: Arc::new(config),
            out: Out::Capture(Arc::clone(&lines)),
        };
        (metrics, Captured(lines))
    }

    /// Emit nothing (benchmarks).
    pub fn off() -> Self {
        Metrics {
            config: Arc::new(MetricsConfig::default()),
            out: Out::Off,
        }
    }

    /// Namespace and stack.
    pub fn config(&self) -> &MetricsConfig {
        &self.config
    }

    /// A new line of kind `spec`, stamped now.
    pub fn doc(&self, spec: &'static LineSpec) -> EmfDoc {
        EmfDoc::new(spec, &self.config, crate::clock::now_ms())
    }

    /// Write `doc` as one line. Never fails the caller: a closed stdout
    /// loses the line.
    pub fn emit(&self, doc: &EmfDoc) {
        match &self.out {
            Out::Stdout => {
                let mut line = doc.line();
                line.push('\n');
                let _ = std::io::stdout().lock().write_all(line.as_bytes());
            }
            Out::Capture(lines) => {
                let line = doc.line();
                match lines.lock() {
                    Ok(mut l) => l.push(line),
                    Err(poisoned) => poisoned.into_inner().push(line),
                }
            }
            Out::Off => {}
        }
    }
}

// ------------------------------------------------------------------ tally --

/// What one unit of work (a turn, a provisioning run) cost, counted by
/// hooks in the adapters while [`tallied`] runs it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    /// Dedalus HTTP requests (every attempt), event streams and WebSocket
    /// connects.
    pub dedalus_requests: u64,
    /// DynamoDB requests.
    pub table_calls: u64,
    /// Provisioning: waiting for the machine to run.
    pub boot_ms: Option<u64>,
    /// Provisioning: the bootstrap (check, and run when needed).
    pub bootstrap_ms: Option<u64>,
    /// Provisioning: which attempt at the provisioning this run was (the
    /// item's `provision_attempts` once the run took the lease; `None` when
    /// it took none).
    pub attempts: Option<u64>,
}

#[derive(Debug, Default)]
struct Cell {
    dedalus: AtomicU64,
    table: AtomicU64,
    /// ms + 1 (0: not recorded).
    boot: AtomicU64,
    bootstrap: AtomicU64,
    /// attempts + 1 (0: not recorded).
    attempts: AtomicU64,
}

tokio::task_local! {
    static TALLY: Arc<Cell>;
}

/// Run `work`, counting what it costs (see [`Tally`]).
pub async fn tallied<F: Future>(work: F) -> (F::Output, Tally) {
    let cell = Arc::new(Cell::default());
    let out = TALLY.scope(Arc::clone(&cell), work).await;
    let recorded = |a: &AtomicU64| a.load(Ordering::Relaxed).checked_sub(1);
    let tally = Tally {
        dedalus_requests: cell.dedalus.load(Ordering::Relaxed),
        table_calls: cell.table.load(Ordering::Relaxed),
        boot_ms: recorded(&cell.boot),
        bootstrap_ms: recorded(&cell.bootstrap),
        attempts: recorded(&cell.attempts),
    };
    (out, tally)
}

fn with_cell(f: impl FnOnce(&Cell)) {
    let _ = TALLY.try_with(|c| f(c));
}

fn ms_plus_one(d: Duration) -> u64 {
    u64::try_from(d.as_millis())
        .unwrap_or(u64::MAX - 1)
        .saturating_add(1)
}

/// Hook: one Dedalus request is about to go out.
pub fn dedalus_request() {
    with_cell(|c| {
        c.dedalus.fetch_add(1, Ordering::Relaxed);
    });
}

/// Hook: one DynamoDB request is about to go out.
pub fn table_call() {
    with_cell(|c| {
        c.table.fetch_add(1, Ordering::Relaxed);
    });
}

/// Hook: the provisioning worker waited `d` for the machine to run.
pub fn boot_took(d: Duration) {
    with_cell(|c| c.boot.store(ms_plus_one(d), Ordering::Relaxed));
}

/// Hook: the provisioning worker's bootstrap took `d`.
pub fn bootstrap_took(d: Duration) {
    with_cell(|c| c.bootstrap.store(ms_plus_one(d), Ordering::Relaxed));
}

/// Hook: the provisioning worker took the lease for attempt `n` (the
/// item's `provision_attempts`).
pub fn provision_attempt(n: u64) {
    with_cell(|c| c.attempts.store(n.saturating_add(1), Ordering::Relaxed));
}

/// Dedalus requests counted so far by the enclosing [`tallied`] (`None`
/// outside one): e.g. how many a turn made before its first command.
pub fn dedalus_requests_so_far() -> Option<u64> {
    TALLY.try_with(|c| c.dedalus.load(Ordering::Relaxed)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::env::vars as env;

    #[test]
    fn given_no_settings_when_read_then_the_defaults_apply_and_bad_values_are_named() {
        assert_eq!(
            MetricsConfig::from_map(&env(&[])).expect("defaults"),
            MetricsConfig::default()
        );
        let c = MetricsConfig::from_map(&env(&[
            ("METRICS_NAMESPACE", "acme/agents"),
            ("METRICS_STACK", "prod-eu"),
        ]))
        .expect("config");
        assert_eq!(
            (c.namespace.as_str(), c.stack.as_str()),
            ("acme/agents", "prod-eu")
        );
        for (name, bad) in [
            ("METRICS_NAMESPACE", "AWS/Lambda"),
            ("METRICS_NAMESPACE", "a{b}"),
            ("METRICS_STACK", "has space"),
            ("METRICS_STACK", "ünïcode"),
        ] {
            let err = MetricsConfig::from_map(&env(&[(name, bad)])).expect_err(bad);
            assert!(
                matches!(err, ConfigError::Malformed { name: n, .. } if n == name),
                "{err}"
            );
        }
    }

    #[test]
    fn given_an_undeclared_dimension_value_when_set_then_it_is_published_as_other() {
        let mut doc = EmfDoc::new(&TURN_LINE, &MetricsConfig::default(), 1);
        doc.dimension("Code", "alice@example.com")
            .dimension("Outcome", "failed")
            .dimension("UserId", "alice")
            .metric("turn_failures", 1)
            .metric("not_a_metric", 5)
            .property("turns", "shadowed")
            .property("user_id", "alice");
        assert!(
            TURN_LINE
                .properties
                .iter()
                .all(|p| TURN_LINE.metric(p).is_none()
                    && TURN_LINE.dimension(p).is_none()
                    && *p != STACK
                    && *p != FUNCTION),
            "properties never shadow metrics or dimensions"
        );
        let v = doc.to_value();
        assert_eq!(v["Code"], OTHER);
        assert_eq!(v["Outcome"], "failed");
        assert!(v.get("UserId").is_none() && v.get("not_a_metric").is_none());
        assert!(
            v.get("turns").is_none(),
            "a property cannot shadow a metric"
        );
        assert_eq!(v["user_id"], "alice");
        let dims: Vec<&Value> = v["_aws"]["CloudWatchMetrics"]
            .as_array()
            .expect("directives")
            .iter()
            .map(|d| &d["Dimensions"][0])
            .collect();
        assert_eq!(
            dims,
            [
                &json!(["Stack", "Function"]),
                &json!(["Stack", "Function", "Code"])
            ]
        );
    }

    #[tokio::test]
    async fn given_work_when_tallied_then_hooks_count_only_inside() {
        table_call();
        let ((), tally) = tallied(async {
            dedalus_request();
            dedalus_request();
            table_call();
            boot_took(Duration::from_millis(0));
        })
        .await;
        assert_eq!(
            tally,
            Tally {
                dedalus_requests: 2,
                table_calls: 1,
                boot_ms: Some(0),
                bootstrap_ms: None,
                attempts: None,
            }
        );
    }
}

//! `template.yaml` and the code agree: the DynamoDB table is the one
//! `agenthome::store::table::describe()` defines; every environment variable
//! the template sets is one the code reads (and the secrets it names are the
//! ones the function may read); the functions' binaries are the workspace's
//! `[[bin]]` targets, built by `scripts/sam-build` for the template's
//! `Architecture`; the routes are docs/design.md §3's; IAM never grants `*`
//! actions or `dynamodb:Scan`; the alarms and the dashboard watch metrics the
//! functions emit (`agenthome::metrics::LINES`), and the saved Logs Insights
//! queries name fields their lines carry.
//!
//! `scripts/check-template` lints the same file with cfn-lint and
//! `sam validate --lint`; this test checks what no linter can know.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde_json::{json, Map, Value as Json};
use serde_yaml_ng::Value as Yaml;

// ------------------------------------------------------------- loading --

/// YAML → JSON with CloudFormation's short tags in their long form
/// (`!Ref X` → `{"Ref": "X"}`, `!GetAtt A.B` → `{"Fn::GetAtt": ["A", "B"]}`,
/// `!Sub s` → `{"Fn::Sub": s}`, ...).
fn to_json(y: &Yaml) -> Json {
    match y {
        Yaml::Null => Json::Null,
        Yaml::Bool(b) => Json::Bool(*b),
        Yaml::Number(n) => {
            if let Some(i) = n.as_i64() {
                json!(i)
            } else if let Some(u) = n.as_u64() {
                json!(u)
            } else {
                json!(n.as_f64().expect("a YAML number is i64, u64 or f64"))
            }
        }
        Yaml::String(s) => Json::String(s.clone()),
        Yaml::Sequence(items) => Json::Array(items.iter().map(to_json).collect()),
        Yaml::Mapping(m) => Json::Object(
            m.iter()
                .map(|(k, v)| {
                    let key = match k {
                        Yaml::String(s) => s.clone(),
                        other => serde_yaml_ng::to_string(other)
                            .expect("key")
                            .trim()
                            .to_owned(),
                    };
                    (key, to_json(v))
                })
                .collect(),
        ),
        Yaml::Tagged(t) => {
            let tag = t.tag.to_string();
            let tag = tag.trim_start_matches('!');
            let value = to_json(&t.value);
            match tag {
                "Ref" => json!({ "Ref": value }),
                "Condition" => json!({ "Condition": value }),
                "GetAtt" => match value.as_str().and_then(|s| s.split_once('.')) {
                    Some((res, att)) => json!({ "Fn::GetAtt": [res, att] }),
                    None => json!({ "Fn::GetAtt": value }),
                },
                other => json!({ format!("Fn::{other}"): value }),
            }
        }
    }
}

fn root() -> &'static Path {
    static ROOT: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    ROOT.get_or_init(agenthome_tests::workspace_root)
}

fn template() -> Json {
    let path = root().join("template.yaml");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let yaml: Yaml = serde_yaml_ng::from_str(&text).expect("template.yaml is YAML");
    to_json(&yaml)
}

fn resources(t: &Json) -> &Map<String, Json> {
    t["Resources"].as_object().expect("Resources")
}

fn resources_of_type<'a>(t: &'a Json, ty: &str) -> Vec<(&'a str, &'a Json)> {
    resources(t)
        .iter()
        .filter(|(_, r)| r["Type"] == ty)
        .map(|(id, r)| (id.as_str(), r))
        .collect()
}

/// A deployed function: logical id, binary, merged environment, resource.
struct Function<'a> {
    id: &'a str,
    binary: String,
    env: BTreeMap<String, Json>,
    resource: &'a Json,
}

fn functions(t: &Json) -> Vec<Function<'_>> {
    let globals = t["Globals"]["Function"]["Environment"]["Variables"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    resources_of_type(t, "AWS::Serverless::Function")
        .into_iter()
        .map(|(id, r)| {
            assert_eq!(
                r["Metadata"]["BuildMethod"], "rust-cargolambda",
                "{id}: BuildMethod"
            );
            let binary = r["Metadata"]["BuildProperties"]["Binary"]
                .as_str()
                .unwrap_or_else(|| panic!("{id}: Metadata.BuildProperties.Binary"))
                .to_owned();
            let mut env: BTreeMap<String, Json> = globals.clone().into_iter().collect();
            if let Some(own) = r["Properties"]["Environment"]["Variables"].as_object() {
                env.extend(own.clone());
            }
            Function {
                id,
                binary,
                env,
                resource: r,
            }
        })
        .collect()
}

fn function<'a>(fns: &'a [Function<'a>], binary: &str) -> &'a Function<'a> {
    fns.iter()
        .find(|f| f.binary == binary)
        .unwrap_or_else(|| panic!("no function builds binary {binary}"))
}

/// Every IAM policy statement of a function's `Policies`, through `Fn::If`
/// branches (both are deployable).
fn statements(f: &Function<'_>) -> Vec<Json> {
    fn walk(v: &Json, id: &str, out: &mut Vec<Json>) {
        match v {
            Json::Object(m) if m.contains_key("Fn::If") => {
                let branches = m["Fn::If"].as_array().expect("Fn::If list");
                for b in &branches[1..] {
                    walk(b, id, out);
                }
            }
            Json::Object(m) if m.get("Ref") == Some(&json!("AWS::NoValue")) => {}
            Json::Object(m) if m.contains_key("Statement") => match &m["Statement"] {
                Json::Array(s) => out.extend(s.iter().cloned()),
                s => out.push(s.clone()),
            },
            Json::Array(items) => items.iter().for_each(|i| walk(i, id, out)),
            other => panic!(
                "{id}: policy {other} is not an inline policy document \
                 (managed policies and SAM policy templates are too broad to check)"
            ),
        }
    }
    let mut out = Vec::new();
    if let Some(p) = f.resource["Properties"].get("Policies") {
        walk(p, f.id, &mut out);
    }
    out
}

fn one_or_many(v: &Json) -> Vec<Json> {
    match v {
        Json::Array(a) => a.clone(),
        Json::Null => Vec::new(),
        other => vec![other.clone()],
    }
}

fn allowed_actions(f: &Function<'_>) -> Vec<(String, Vec<Json>)> {
    statements(f)
        .into_iter()
        .filter(|s| s["Effect"] == "Allow")
        .flat_map(|s| {
            let resources = one_or_many(&s["Resource"]);
            one_or_many(&s["Action"])
                .into_iter()
                .map(move |a| (a.as_str().expect("action").to_owned(), resources.clone()))
        })
        .collect()
}

// --------------------------------------------------------------- table --

#[test]
fn given_the_template_when_its_table_is_compared_then_it_is_the_code_s_table() {
    let t = template();
    let tables = resources_of_type(&t, "AWS::DynamoDB::Table");
    assert_eq!(tables.len(), 2, "the user table and the journal");
    let (id, table) = *tables
        .iter()
        .find(|(id, _)| *id == "UserTable")
        .expect("UserTable");
    let props = &table["Properties"];
    let code = agenthome::store::table::describe();

    assert_eq!(props["KeySchema"], code["KeySchema"], "{id}: KeySchema");
    assert_eq!(
        props["BillingMode"], code["BillingMode"],
        "{id}: BillingMode"
    );

    let by = |v: &Json, key: &str| -> BTreeMap<String, Json> {
        v.as_array()
            .unwrap_or_else(|| panic!("{key} list"))
            .iter()
            .map(|e| (e[key].as_str().expect("name").to_owned(), e.clone()))
            .collect()
    };
    assert_eq!(
        by(&props["AttributeDefinitions"], "AttributeName"),
        by(&code["AttributeDefinitions"], "AttributeName"),
        "{id}: AttributeDefinitions (names and types)"
    );
    // Whole index objects: names, key schemas (in order), projections, and
    // nothing else.
    assert_eq!(
        by(&props["GlobalSecondaryIndexes"], "IndexName"),
        by(&code["GlobalSecondaryIndexes"], "IndexName"),
        "{id}: GlobalSecondaryIndexes"
    );
    assert!(
        props.get("LocalSecondaryIndexes").is_none(),
        "{id}: no LSIs"
    );

    // docs/design.md §4: point-in-time recovery and encryption on; the data outlives
    // the stack.
    assert_eq!(
        props["PointInTimeRecoverySpecification"]["PointInTimeRecoveryEnabled"],
        true
    );
    assert_eq!(props["SSESpecification"]["SSEEnabled"], true);
    assert!(props.get("DeletionProtectionEnabled").is_some());
    assert_eq!(table["DeletionPolicy"], "Retain");
    assert_eq!(table["UpdateReplacePolicy"], "Retain");
    // Every function gets this table's name.
    for f in functions(&t) {
        assert_eq!(
            f.env["TABLE_NAME"],
            json!({"Ref": id}),
            "{}: TABLE_NAME",
            f.id
        );
    }
}

// --------------------------------------------------------- environment --

/// Every variable the functions read. Source: `shared/src/config.rs`
/// (`Config::from_map`) and `shared/src/sweep/settings.rs`
/// (`SweepSettings::from_map`); the test below checks that each name still
/// appears as a string literal in the code, so this list cannot go stale in
/// that direction.
const READ_BY_CODE: &[&str] = &[
    // config.rs
    "TABLE_NAME",
    "DEDALUS_BASE_URL",
    "DEDALUS_API_KEY",
    "DEDALUS_API_KEY_SECRET_ARN",
    "LLM_BASE_URL",
    "LLM_API_KEY",
    "LLM_API_KEY_SECRET_ARN",
    "AGENT_MODEL",
    "MACHINE_VCPU",
    "MACHINE_MEMORY_MIB",
    "MACHINE_STORAGE_GIB",
    "MACHINE_AUTOSLEEP",
    "BOOTSTRAP_SCRIPT",
    "BOOTSTRAP_CHECK",
    "IDLE_AFTER",
    "TURN_DEADLINE",
    "MAX_STEPS",
    "AUTH_MODE",
    "ADMIN_SCOPE",
    "ADMIN_CLIENT_ID",
    "USER_SCOPE",
    "MAX_TURNS_PER_MINUTE",
    "MAX_STATUS_READS_PER_MINUTE",
    "MAX_HISTORY_CHARS",
    "MAX_AWAKE_PER_DAY",
    "JWT_ISSUER",
    "JWT_AUDIENCE",
    "PROVISION_FUNCTION",
    "PROVISION_INVOKE",
    "JOURNAL_TABLE",
    "JOURNAL_TTL_DAYS",
    "HOOK_TIMEOUT",
    // metrics.rs
    "METRICS_NAMESPACE",
    "METRICS_STACK",
    // functions/chat-turn/src/main.rs
    "RESPONSE_MODE",
    // entry/first_turn.rs
    "FIRST_TURN_WAIT",
    // sweep/settings.rs
    "SWEEP_CONCURRENCY",
    "RECONCILE_EVERY",
    "RECONCILE_SLEEP_ORPHANS",
    "RECONCILE_DESTROY_ORPHANS",
    "SWEEP_MARGIN",
    "SWEEP_PAGE_SIZE",
    "SWEEP_LEASE",
    "SWEEP_SLEEP_TIMEOUT",
    "SWEEP_READ_TIMEOUT",
    "SWEEP_MARKER_TIMEOUT",
    "RECONCILE_ORPHAN_GRACE",
    // store/table.rs (every function writes awake items)
    "AWAKE_SHARDS",
    "AWAKE_SHARDS_PREVIOUS",
    // sweep fan-out (#25)
    "SWEEP_FUNCTION",
    "SWEEP_WORKERS",
    "SWEEP_FANOUT_THRESHOLD",
    "SWEEP_SLEEP_RATE",
    "IDLE_POLICY",
];

/// Secret values: local runs only. In AWS the template passes ARNs.
const NEVER_IN_TEMPLATE: &[&str] = &["DEDALUS_API_KEY", "LLM_API_KEY"];

fn rust_sources(dir: &Path, out: &mut String) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push_str(&std::fs::read_to_string(&path).expect("read source"));
            out.push('\n');
        }
    }
}

#[test]
fn given_the_code_when_its_sources_are_read_then_every_listed_variable_is_still_read() {
    let mut code = String::new();
    rust_sources(&root().join("shared/src"), &mut code);
    rust_sources(&root().join("functions"), &mut code);
    for name in READ_BY_CODE {
        assert!(
            code.contains(&format!("\"{name}\"")),
            "{name} is listed in READ_BY_CODE but no longer appears in shared/src or functions/: \
             update the list (and template.yaml)"
        );
    }
}

#[test]
fn given_the_template_when_environments_are_listed_then_the_code_reads_every_variable() {
    let t = template();
    let fns = functions(&t);
    assert_eq!(
        fns.len(),
        4,
        "four functions (chat-turn twice: HTTP API and streaming Function URL)"
    );
    for f in &fns {
        for (name, value) in &f.env {
            assert!(
                READ_BY_CODE.contains(&name.as_str()),
                "{}: the template sets {name}, which the code does not read",
                f.id
            );
            assert!(
                !NEVER_IN_TEMPLATE.contains(&name.as_str()),
                "{}: {name} would put a secret value in the environment; pass its ARN",
                f.id
            );
            assert!(
                !value.is_null(),
                "{}: {name} has no value (YAML null)",
                f.id
            );
        }
        for required in ["TABLE_NAME", "DEDALUS_API_KEY_SECRET_ARN", "AUTH_MODE"] {
            assert!(f.env.contains_key(required), "{}: {required} missing", f.id);
        }
        // The HTTP API's JWT authorizer fronts every function but the
        // streaming chat turn, whose Function URL has no authorizer: the
        // function verifies the same tokens itself (no IAM principal may
        // act for an arbitrary user).
        let url = &f.resource["Properties"]["FunctionUrlConfig"];
        if url.is_null() {
            assert_eq!(f.env["AUTH_MODE"], "jwt", "{}: AUTH_MODE", f.id);
            assert!(
                f.env.get("RESPONSE_MODE").is_none_or(|m| m == "buffered"),
                "{}: API Gateway cannot stream",
                f.id
            );
        } else {
            assert_eq!(f.binary, "chat-turn", "{}: only chat-turn streams", f.id);
            assert_eq!(url["AuthType"], "NONE", "{}: Function URL auth", f.id);
            assert_eq!(url["InvokeMode"], "RESPONSE_STREAM", "{}", f.id);
            assert_eq!(f.env["AUTH_MODE"], "bearer", "{}: AUTH_MODE", f.id);
            assert_eq!(
                f.env["JWT_ISSUER"],
                json!({"Ref": "JwtIssuer"}),
                "{}: the HTTP API's issuer",
                f.id
            );
            assert_eq!(
                f.env["JWT_AUDIENCE"],
                json!({"Fn::Join": [",", {"Ref": "JwtAudience"}]}),
                "{}: the HTTP API's audiences",
                f.id
            );
            assert_eq!(
                f.env["ADMIN_CLIENT_ID"],
                json!({"Ref": "AdminClientId"}),
                "{}: admin bound to a client",
                f.id
            );
            assert_eq!(f.env["RESPONSE_MODE"], "streaming", "{}", f.id);
            assert_eq!(
                f.resource["Properties"]["Timeout"], 900,
                "{}: a streamed turn may use Lambda's maximum",
                f.id
            );
            let deadline = &f.env["TURN_DEADLINE"]["Ref"];
            let default = t["Parameters"][deadline.as_str().expect("a parameter")]["Default"]
                .as_str()
                .expect("a default");
            let secs: u64 = default.trim_end_matches('s').parse().expect("seconds");
            assert!(
                secs < 900,
                "{}: TURN_DEADLINE {default} under the timeout",
                f.id
            );
        }
    }
    for binary in ["chat-turn", "provision"] {
        assert!(
            function(&fns, binary)
                .env
                .contains_key("PROVISION_FUNCTION"),
            "{binary}: PROVISION_FUNCTION missing"
        );
    }
    // The provision function invokes itself by the name it is deployed under.
    let provision = function(&fns, "provision");
    assert_eq!(
        provision.env["PROVISION_FUNCTION"], provision.resource["Properties"]["FunctionName"],
        "provision: PROVISION_FUNCTION is its own FunctionName"
    );
}

/// The ARN parameter behind an env value (`!Ref P` or `!If [c, !Ref P, ...]`).
fn secret_parameters(v: &Json) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    match v {
        Json::Object(m) if m.contains_key("Ref") => {
            let r = m["Ref"].as_str().expect("Ref name");
            if r != "AWS::NoValue" {
                out.insert(r.to_owned());
            }
        }
        Json::Object(m) if m.contains_key("Fn::If") => {
            for b in &m["Fn::If"].as_array().expect("Fn::If list")[1..] {
                out.extend(secret_parameters(b));
            }
        }
        other => panic!("a *_SECRET_ARN value must be a parameter, not {other}"),
    }
    out
}

#[test]
fn given_each_function_when_its_secrets_are_listed_then_it_may_read_exactly_those() {
    // App::build fetches every secret whose ARN is in the environment at cold
    // start, so a function must be allowed to read exactly those.
    let t = template();
    for f in functions(&t) {
        let mut named = BTreeSet::new();
        for (name, value) in &f.env {
            if name.ends_with("_SECRET_ARN") {
                named.extend(secret_parameters(value));
            }
        }
        let mut granted = BTreeSet::new();
        for (action, resources) in allowed_actions(&f) {
            if action.starts_with("secretsmanager:") {
                assert_eq!(action, "secretsmanager:GetSecretValue", "{}", f.id);
                for r in resources {
                    let p = r["Ref"].as_str().unwrap_or_else(|| {
                        panic!("{}: secret resource {r} is not a parameter", f.id)
                    });
                    granted.insert(p.to_owned());
                }
            }
        }
        assert_eq!(
            granted, named,
            "{}: secrets granted vs. secrets named",
            f.id
        );
        for p in &named {
            assert_eq!(
                t["Parameters"][p]["Type"], "String",
                "{}: {p} is a template parameter",
                f.id
            );
        }
    }
}

// ------------------------------------------------------------ binaries --

fn workspace_binaries() -> BTreeSet<String> {
    let mut bins = BTreeSet::new();
    let dir = root().join("functions");
    for entry in std::fs::read_dir(&dir).expect("functions/") {
        let manifest = entry.expect("entry").path().join("Cargo.toml");
        let Ok(text) = std::fs::read_to_string(&manifest) else {
            continue;
        };
        // `[[bin]]` tables: a `name = "..."` line before the next table.
        let mut in_bin = false;
        for line in text.lines().map(str::trim) {
            if line.starts_with('[') {
                in_bin = line == "[[bin]]";
            } else if in_bin {
                if let Some(v) = line.strip_prefix("name") {
                    let v = v
                        .trim_start()
                        .trim_start_matches('=')
                        .trim()
                        .trim_matches('"');
                    bins.insert(v.to_owned());
                }
            }
        }
    }
    bins
}

#[test]
fn given_the_template_when_binaries_are_listed_then_they_are_the_functions_bin_targets() {
    let t = template();
    let deployed: BTreeSet<String> = functions(&t).into_iter().map(|f| f.binary).collect();
    assert_eq!(
        deployed,
        BTreeSet::from(["chat-turn", "provision", "sleep-sweep"].map(String::from))
    );
    assert_eq!(
        deployed,
        workspace_binaries(),
        "template binaries vs. [[bin]] targets in functions/*/Cargo.toml"
    );
    let g = &t["Globals"]["Function"];
    assert_eq!(g["Runtime"], "provided.al2023");
    assert_eq!(g["Handler"], "bootstrap");
    assert_eq!(g["Architectures"], json!([{ "Ref": "Architecture" }]));
    assert_eq!(g["CodeUri"], ".", "built from the workspace root");
}

// -------------------------------------------------------- architecture --

/// `scripts/sam-build --plan [--architecture A] [--template T]`: what the
/// build script would build (`architecture`, `target`, `function <id>
/// <binary>` lines), or its error.
fn build_plan(arch: Option<&str>, template: Option<&Path>) -> Result<Vec<Vec<String>>, String> {
    let mut cmd = std::process::Command::new("bash");
    cmd.arg(root().join("scripts/sam-build")).arg("--plan");
    if let Some(a) = arch {
        cmd.args(["--architecture", a]);
    }
    if let Some(t) = template {
        cmd.arg("--template").arg(t);
    }
    let out = cmd.output().expect("run scripts/sam-build --plan");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
        .collect())
}

fn plan_value(plan: &[Vec<String>], key: &str) -> String {
    plan.iter()
        .find(|l| l.first().map(String::as_str) == Some(key))
        .and_then(|l| l.get(1).cloned())
        .unwrap_or_else(|| panic!("no `{key}` line in the plan: {plan:?}"))
}

#[test]
fn given_the_architecture_parameter_when_the_build_script_plans_then_both_agree() {
    let t = template();
    let p = &t["Parameters"]["Architecture"];
    assert_eq!(p["Default"], "arm64", "Graviton by default");
    assert_eq!(p["AllowedValues"], json!(["arm64", "x86_64"]));
    // Every function runs on the parameter's architecture: none overrides it.
    let fns = functions(&t);
    for f in &fns {
        assert!(
            f.resource["Properties"]["Architectures"].is_null(),
            "{}: Architectures comes from Globals (the Architecture parameter)",
            f.id
        );
    }
    let expected: BTreeSet<(String, String)> = fns
        .iter()
        .map(|f| (f.id.to_owned(), f.binary.clone()))
        .collect();

    // By default the script builds the parameter's default, for its target,
    // every function of the template.
    let plan = build_plan(None, None).expect("scripts/sam-build --plan");
    assert_eq!(plan_value(&plan, "architecture"), "arm64");
    assert_eq!(plan_value(&plan, "target"), "aarch64-unknown-linux-gnu");
    let planned: BTreeSet<(String, String)> = plan
        .iter()
        .filter(|l| l.first().map(String::as_str) == Some("function"))
        .map(|l| (l[1].clone(), l[2].clone()))
        .collect();
    assert_eq!(planned, expected, "functions built vs. functions deployed");

    // The other allowed value, and only allowed values.
    let plan = build_plan(Some("x86_64"), None).expect("--architecture x86_64");
    assert_eq!(plan_value(&plan, "architecture"), "x86_64");
    assert_eq!(plan_value(&plan, "target"), "x86_64-unknown-linux-gnu");
    let err = build_plan(Some("sparc"), None).expect_err("sparc is not allowed");
    assert!(err.contains("arm64 x86_64"), "{err}");
}

/// template.yaml with `from` replaced by `to` (which must occur once).
fn edited_template(dir: &Path, from: &str, to: &str) -> std::path::PathBuf {
    let text = std::fs::read_to_string(root().join("template.yaml")).expect("template.yaml");
    assert_eq!(text.matches(from).count(), 1, "{from:?} occurs once");
    let path = dir.join("template.yaml");
    std::fs::write(&path, text.replace(from, to)).expect("write the edited template");
    path
}

#[test]
fn given_an_edited_template_when_the_build_script_plans_then_it_follows_or_refuses() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The script reads the default from the template, not from itself.
    let x86 = edited_template(
        dir.path(),
        "    Default: arm64\n    AllowedValues: [arm64, x86_64]",
        "    Default: x86_64\n    AllowedValues: [arm64, x86_64]",
    );
    let plan = build_plan(None, Some(&x86)).expect("plan of an x86_64 default");
    assert_eq!(plan_value(&plan, "architecture"), "x86_64");
    assert_eq!(plan_value(&plan, "target"), "x86_64-unknown-linux-gnu");
    // Functions that ignore the parameter would deploy what was not built.
    let fixed = edited_template(
        dir.path(),
        "Architectures: [!Ref Architecture]",
        "Architectures: [x86_64]",
    );
    let err = build_plan(None, Some(&fixed)).expect_err("a fixed architecture is refused");
    assert!(err.contains("must be [!Ref Architecture]"), "{err}");
}

#[test]
fn given_the_template_when_its_journal_table_is_compared_then_it_is_the_code_s_table() {
    let t = template();
    let tables = resources_of_type(&t, "AWS::DynamoDB::Table");
    let (id, table) = *tables
        .iter()
        .find(|(id, _)| *id == "JournalTable")
        .expect("JournalTable");
    let props = &table["Properties"];
    let code = agenthome::journal::table::describe();
    for key in [
        "KeySchema",
        "AttributeDefinitions",
        "BillingMode",
        "TimeToLiveSpecification",
    ] {
        assert_eq!(props[key], code[key], "{id}: {key}");
    }
    assert!(
        props.get("GlobalSecondaryIndexes").is_none(),
        "{id}: no GSIs"
    );
    assert_eq!(props["SSESpecification"]["SSEEnabled"], true);
    assert_eq!(table["DeletionPolicy"], "Retain");
}

// ----------------------------------------------------------------- IAM --

#[test]
fn given_the_policies_when_actions_are_listed_then_they_are_least_privilege() {
    let t = template();
    let fns = functions(&t);
    let code = agenthome::store::table::describe();
    let index_names: BTreeSet<String> = code["GlobalSecondaryIndexes"]
        .as_array()
        .expect("gsis")
        .iter()
        .map(|g| g["IndexName"].as_str().expect("name").to_owned())
        .collect();

    // No IAM resources outside what SAM generates from `Policies`.
    for (id, r) in resources(&t) {
        let ty = r["Type"].as_str().unwrap_or_default();
        assert!(
            !ty.starts_with("AWS::IAM::"),
            "{id}: write IAM as function Policies"
        );
    }

    let expected_dynamodb: BTreeMap<&str, &[&str]> = BTreeMap::from([
        (
            "chat-turn",
            &[
                "dynamodb:GetItem",
                "dynamodb:PutItem",
                "dynamodb:Query",
                "dynamodb:UpdateItem",
            ][..],
        ),
        (
            "provision",
            &[
                "dynamodb:DeleteItem",
                "dynamodb:GetItem",
                "dynamodb:PutItem",
                "dynamodb:Query",
                "dynamodb:UpdateItem",
            ][..],
        ),
        (
            "sleep-sweep",
            &[
                "dynamodb:GetItem",
                "dynamodb:PutItem",
                "dynamodb:Query",
                "dynamodb:UpdateItem",
            ][..],
        ),
    ]);

    for f in &fns {
        for s in statements(f) {
            assert_eq!(s["Effect"], "Allow", "{}: only Allow statements", f.id);
            for r in one_or_many(&s["Resource"]) {
                assert_ne!(r, "*", "{}: Resource \"*\" in {s}", f.id);
            }
            assert!(s.get("NotAction").is_none() && s.get("NotResource").is_none());
        }
        let actions = allowed_actions(f);
        let mut dynamodb = BTreeSet::new();
        for (action, resources) in &actions {
            assert!(!action.contains('*'), "{}: wildcard action {action}", f.id);
            assert!(
                !action.eq_ignore_ascii_case("dynamodb:Scan"),
                "{}: no sweep or function ever scans the table",
                f.id
            );
            if action.starts_with("dynamodb:") {
                dynamodb.insert(action.as_str());
                for r in resources {
                    let text = r.to_string();
                    if text.contains("JournalTable") {
                        // The journal: entries written and read by page only.
                        assert!(
                            matches!(action.as_str(), "dynamodb:PutItem" | "dynamodb:Query")
                                && !text.contains("/index/"),
                            "{}: {action} on {text}",
                            f.id
                        );
                    } else if action == "dynamodb:Query" {
                        let index = text
                            .split("/index/")
                            .nth(1)
                            .map(|s| s.trim_end_matches(['"', '}']))
                            .unwrap_or_else(|| panic!("{}: Query on {text}, not an index", f.id));
                        assert!(
                            index_names.contains(index),
                            "{}: Query on unknown index {index}",
                            f.id
                        );
                    } else {
                        assert!(
                            text.contains("UserTable") && !text.contains("/index/"),
                            "{}: {action} on {text}",
                            f.id
                        );
                    }
                }
            }
            if action == "lambda:InvokeFunction" {
                for r in resources {
                    let text = r.to_string();
                    // The sweep invokes only itself (its workers), by the
                    // name it is deployed under.
                    let own_workers = f.binary == "sleep-sweep"
                        && text.ends_with("-sleep-sweep\"}")
                        && r["Fn::Sub"] == json!(format!(
                            "arn:${{AWS::Partition}}:lambda:${{AWS::Region}}:${{AWS::AccountId}}:function:{}",
                            f.resource["Properties"]["FunctionName"]["Fn::Sub"]
                                .as_str()
                                .unwrap_or("(no FunctionName)")
                        ));
                    assert!(
                        own_workers
                            || (f.binary != "sleep-sweep"
                                && (text.contains("ProvisionFunction")
                                    || text.ends_with("-provision\"}"))),
                        "{}: may invoke the provision function (or the sweep itself) only, not {text}",
                        f.id
                    );
                }
            }
        }
        let want: BTreeSet<&str> = expected_dynamodb[f.binary.as_str()]
            .iter()
            .copied()
            .collect();
        assert_eq!(dynamodb, want, "{}: DynamoDB actions", f.id);
        let invokes = actions.iter().any(|(a, _)| a == "lambda:InvokeFunction");
        assert_eq!(
            invokes,
            f.env.contains_key("PROVISION_FUNCTION") || f.env.contains_key("SWEEP_FUNCTION"),
            "{}: may invoke the worker iff it is told its name",
            f.id
        );
    }
}

// -------------------------------------------------------------- routes --

/// docs/design.md §3: (method, path, function).
const ROUTES: &[(&str, &str, &str)] = &[
    ("POST", "/v1/users/{user_id}/turns", "chat-turn"),
    ("GET", "/v1/users/{user_id}/machine", "provision"),
    ("PUT", "/v1/users/{user_id}/machine", "provision"),
    ("POST", "/v1/users/{user_id}/machine/sleep", "provision"),
    ("DELETE", "/v1/users/{user_id}/machine", "provision"),
    ("GET", "/v1/users/{user_id}/machine/events", "provision"),
];

fn route_set(routes: &[(&str, &str, &str)]) -> BTreeSet<(String, String, String)> {
    routes
        .iter()
        .map(|(m, p, f)| (m.to_string(), p.to_string(), f.to_string()))
        .collect()
}

/// The routes of the §3 table of docs/design.md.
fn design_routes() -> BTreeSet<(String, String, String)> {
    let design = std::fs::read_to_string(root().join("docs/design.md")).expect("docs/design.md");
    let mut routes = BTreeSet::new();
    for line in design.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() < 4 || !cells[1].starts_with('`') {
            continue;
        }
        let route = cells[1].split('`').nth(1).unwrap_or_default();
        if let Some((method, path)) = route.split_once(' ') {
            if path.starts_with("/v1/") {
                routes.insert((method.to_owned(), path.to_owned(), cells[2].to_owned()));
            }
        }
    }
    routes
}

#[test]
fn given_the_design_when_its_routes_are_read_then_the_list_here_is_the_same() {
    assert_eq!(
        design_routes(),
        route_set(ROUTES),
        "docs/design.md §3 vs. ROUTES"
    );
}

#[test]
fn given_the_template_when_routes_are_listed_then_they_are_design_section_3() {
    let t = template();
    let apis = resources_of_type(&t, "AWS::Serverless::HttpApi");
    assert_eq!(apis.len(), 1, "one HTTP API");
    let (api_id, api) = apis[0];
    let auth = &api["Properties"]["Auth"];
    let default = auth["DefaultAuthorizer"]
        .as_str()
        .expect("a default authorizer");
    let jwt = &auth["Authorizers"][default]["JwtConfiguration"];
    assert!(
        jwt["issuer"].is_object() && jwt["audience"].is_object(),
        "JWT issuer and audience are parameters"
    );
    // Route-level scopes: a token needs the user scope or the admin scope
    // before any function runs.
    assert_eq!(
        auth["Authorizers"][default]["AuthorizationScopes"],
        json!([{"Ref": "UserScope"}, {"Ref": "AdminScope"}]),
        "route-level authorization scopes"
    );

    let mut routes = BTreeSet::new();
    for f in functions(&t) {
        let Some(events) = f.resource["Properties"]["Events"].as_object() else {
            continue;
        };
        for (name, e) in events {
            if e["Type"] != "HttpApi" {
                continue;
            }
            let p = &e["Properties"];
            assert_eq!(
                p["ApiId"],
                json!({"Ref": api_id}),
                "{}.{name}: on {api_id}",
                f.id
            );
            assert!(
                p.get("Auth").is_none(),
                "{}.{name}: routes use the default JWT authorizer",
                f.id
            );
            let payload = p
                .get("PayloadFormatVersion")
                .cloned()
                .unwrap_or(json!("2.0"));
            assert_eq!(payload, "2.0", "{}.{name}: payload format", f.id);
            routes.insert((
                p["Method"].as_str().expect("Method").to_ascii_uppercase(),
                p["Path"].as_str().expect("Path").to_owned(),
                f.binary.clone(),
            ));
        }
    }
    assert_eq!(routes, route_set(ROUTES));
}

// ------------------------------------------------------------ fair use --

#[test]
fn given_fair_use_when_deployed_then_the_sweep_has_reserved_concurrency_and_the_api_a_ceiling() {
    let t = template();
    let fns = functions(&t);
    let sweep = function(&fns, "sleep-sweep");
    assert_eq!(
        sweep.resource["Properties"]["ReservedConcurrentExecutions"],
        json!({"Ref": "SweepReservedConcurrency"}),
        "the sweep can always run"
    );
    // A fanned-out run is the coordinator plus its workers: the reserved
    // concurrency must fit them all by default.
    let default = |p: &str| t["Parameters"][p]["Default"].as_u64().unwrap_or(0);
    assert!(
        default("SweepReservedConcurrency") > default("SweepWorkers"),
        "reserved {} must exceed the workers {}",
        default("SweepReservedConcurrency"),
        default("SweepWorkers")
    );
    assert!(
        default("AwakeShards") >= default("SweepWorkers"),
        "a worker needs at least one shard"
    );
    // The sweep invokes its workers by the name it is deployed under.
    assert_eq!(
        sweep.env["SWEEP_FUNCTION"], sweep.resource["Properties"]["FunctionName"],
        "sleep-sweep: SWEEP_FUNCTION is its own FunctionName"
    );
    let (_, api) = resources_of_type(&t, "AWS::Serverless::HttpApi")[0];
    let route = &api["Properties"]["DefaultRouteSettings"];
    assert!(
        route["ThrottlingRateLimit"].is_object() && route["ThrottlingBurstLimit"].is_object(),
        "stage throttling: {route}"
    );
    for binary in ["chat-turn", "provision"] {
        let f = function(&fns, binary);
        for name in ["MAX_TURNS_PER_MINUTE", "MAX_STATUS_READS_PER_MINUTE"] {
            assert!(f.env.contains_key(name), "{binary}: {name}");
        }
    }
}

// ---------------------------------------------------- sweep and alarms --

#[test]
fn given_the_sweep_when_scheduled_then_the_rate_expression_is_well_formed() {
    let t = template();
    let fns = functions(&t);
    let sweep = function(&fns, "sleep-sweep");
    let events = sweep.resource["Properties"]["Events"]
        .as_object()
        .expect("sleep-sweep events");
    let schedules: Vec<&Json> = events
        .values()
        .filter(|e| e["Type"] == "Schedule")
        .map(|e| &e["Properties"]["Schedule"])
        .collect();
    assert_eq!(schedules.len(), 1, "one schedule");
    let expression = match schedules[0] {
        Json::String(s) => s.clone(),
        Json::Object(m) => {
            let p = m["Ref"].as_str().expect("!Ref to a parameter");
            t["Parameters"][p]["Default"]
                .as_str()
                .expect("default schedule")
                .to_owned()
        }
        other => panic!("schedule {other}"),
    };
    // rate(1 minute) but rate(5 minutes): EventBridge rejects the other forms.
    let inner = expression
        .strip_prefix("rate(")
        .and_then(|s| s.strip_suffix(')'))
        .unwrap_or_else(|| panic!("{expression}: a rate expression by default"));
    let (n, unit) = inner.split_once(' ').expect("rate(N unit)");
    let n: u32 = n.parse().expect("rate value");
    let singular = ["minute", "hour", "day"];
    if n == 1 {
        assert!(singular.contains(&unit), "{expression}");
    } else {
        assert!(
            singular.iter().any(|s| unit == format!("{s}s")),
            "{expression}"
        );
    }
    // The function's timeout is under the period, so runs do not overlap.
    let timeout = sweep.resource["Properties"]["Timeout"]
        .as_u64()
        .expect("Timeout");
    if unit.starts_with("minute") {
        assert!(
            timeout < u64::from(n) * 60,
            "sweep Timeout {timeout}s vs. {expression}"
        );
    }
}

// ------------------------------------------- metrics, dashboard, queries --

/// A metric of the functions' namespace, as an alarm or a dashboard names it.
struct Watched {
    name: String,
    /// Dimension name → value (`{"Ref": "AWS::StackName"}` or a string).
    dimensions: Vec<(String, Json)>,
}

/// `watched` is a metric the functions emit (`agenthome::metrics::LINES`):
/// the stack dimension is the stack's name, `Function` names a catalogued
/// line, the metric is in it, published under exactly this dimension set,
/// and every other dimension value is one the code may set.
fn assert_emitted(what: &str, watched: &Watched, stack: &Json) {
    use agenthome::metrics::{FUNCTION, LINES, OTHER, STACK};
    let value = |name: &str| {
        watched
            .dimensions
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("{what}: {} has no {name} dimension", watched.name))
    };
    assert_eq!(&value(STACK), stack, "{what}: {} Stack", watched.name);
    let function = value(FUNCTION);
    let spec = LINES
        .iter()
        .find(|s| function == s.function)
        .unwrap_or_else(|| panic!("{what}: no function {function} emits metrics"));
    assert!(
        spec.metric(&watched.name).is_some(),
        "{what}: {} never publishes {}",
        spec.function,
        watched.name
    );
    let mut names: Vec<&str> = watched.dimensions.iter().map(|(n, _)| n.as_str()).collect();
    names.sort_unstable();
    let published = spec
        .dimension_sets(&watched.name)
        .into_iter()
        .any(|mut set| {
            set.sort_unstable();
            set == names
        });
    assert!(
        published,
        "{what}: {} is not published under {names:?} (an alarm or graph matches only the exact set)",
        watched.name
    );
    for (name, v) in &watched.dimensions {
        if name == STACK || name == FUNCTION {
            continue;
        }
        let declared = spec.dimension(name).expect("checked by the set");
        let v = v.as_str().expect("dimension value");
        assert!(
            declared.values.contains(&v) || v == OTHER,
            "{what}: {name}={v} is never emitted"
        );
    }
}

fn dimension_pairs(dims: &Json) -> Vec<(String, Json)> {
    one_or_many(dims)
        .iter()
        .map(|d| {
            (
                d["Name"].as_str().expect("dimension Name").to_owned(),
                d["Value"].clone(),
            )
        })
        .collect()
}

/// Every metric an alarm watches: (namespace, metric), single or metric math.
fn alarm_metrics(alarm: &Json) -> Vec<(Json, Watched)> {
    let p = &alarm["Properties"];
    if p.get("MetricName").is_some() {
        return vec![(
            p["Namespace"].clone(),
            Watched {
                name: p["MetricName"].as_str().expect("MetricName").to_owned(),
                dimensions: dimension_pairs(&p["Dimensions"]),
            },
        )];
    }
    one_or_many(&p["Metrics"])
        .iter()
        .filter_map(|m| m.get("MetricStat").map(|s| s["Metric"].clone()))
        .map(|m| {
            (
                m["Namespace"].clone(),
                Watched {
                    name: m["MetricName"].as_str().expect("MetricName").to_owned(),
                    dimensions: dimension_pairs(&m["Dimensions"]),
                },
            )
        })
        .collect()
}

#[test]
fn given_the_alarms_when_they_watch_custom_metrics_then_the_functions_emit_them() {
    let t = template();
    let namespace = json!({"Ref": "MetricsNamespace"});
    let stack = json!({"Ref": "AWS::StackName"});
    let mut watched = BTreeSet::new();
    for (id, alarm) in resources_of_type(&t, "AWS::CloudWatch::Alarm") {
        for (ns, metric) in alarm_metrics(alarm) {
            if ns.as_str().is_some_and(|n| n.starts_with("AWS/")) {
                continue;
            }
            assert_eq!(
                ns, namespace,
                "{id}: custom metrics live in MetricsNamespace"
            );
            assert_emitted(id, &metric, &stack);
            watched.insert(metric.name);
        }
    }
    for needed in [
        "failed",
        "index_errors",
        "orphans",
        "turn_failures",
        "turns",
        "time_to_first_command_ms",
        "provisions",
    ] {
        assert!(watched.contains(needed), "an alarm on {needed}");
    }
    // Every function passes the namespace and the stack to the code.
    for f in functions(&t) {
        assert_eq!(f.env["METRICS_NAMESPACE"], namespace, "{}", f.id);
        assert_eq!(f.env["METRICS_STACK"], stack, "{}", f.id);
    }
}

/// `Fn::Sub` of the dashboard body with every variable replaced by a
/// stand-in; a variable that is not a parameter, a pseudo parameter or a
/// resource (attribute) fails.
fn substitute(t: &Json, text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find("${") {
        out.push_str(&rest[..at]);
        let end = rest[at..].find('}').expect("closing }") + at;
        let var = &rest[at + 2..end];
        let known = var.starts_with("AWS::")
            || t["Parameters"].get(var).is_some()
            || resources(t).contains_key(var.split('.').next().unwrap_or(var));
        assert!(known, "dashboard: unknown variable ${{{var}}}");
        let stand_in = match var {
            "MetricsNamespace" => "NAMESPACE".to_owned(),
            "AWS::StackName" => "STACK".to_owned(),
            other => format!("<{other}>"),
        };
        out.push_str(&stand_in);
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

fn dashboard(t: &Json) -> Json {
    let dashboards = resources_of_type(t, "AWS::CloudWatch::Dashboard");
    assert_eq!(dashboards.len(), 1, "one dashboard");
    let body = dashboards[0].1["Properties"]["DashboardBody"]["Fn::Sub"]
        .as_str()
        .expect("DashboardBody: !Sub string");
    serde_json::from_str(&substitute(t, body)).expect("the dashboard body is JSON")
}

#[test]
fn given_the_dashboard_when_its_widgets_are_read_then_each_graphs_a_metric_the_functions_emit() {
    let t = template();
    let stack = json!("STACK");
    let mut graphed = BTreeSet::new();
    let widgets = dashboard(&t)["widgets"]
        .as_array()
        .expect("widgets")
        .clone();
    for w in &widgets {
        let p = &w["properties"];
        let title = p["title"].as_str().expect("every widget has a title");
        let right = w["x"].as_u64().expect("x") + w["width"].as_u64().expect("width");
        assert!(right <= 24, "{title}: the grid is 24 wide");
        if w["type"] == "log" {
            check_query(title, p["query"].as_str().expect("query"));
            continue;
        }
        assert_eq!(w["type"], "metric", "{title}");
        for row in p["metrics"].as_array().expect("metrics") {
            let row = row.as_array().expect("a metric row");
            if row[0].get("expression").is_some() {
                continue;
            }
            let namespace = row[0].as_str().expect("namespace");
            let name = row[1].as_str().expect("metric name").to_owned();
            let mut dimensions = Vec::new();
            let mut i = 2;
            while i + 1 < row.len() && row[i].is_string() {
                dimensions.push((row[i].as_str().unwrap().to_owned(), row[i + 1].clone()));
                i += 2;
            }
            if let Some(stat) = row.last().and_then(|o| o.get("stat")) {
                let stat = stat.as_str().expect("stat");
                let percentile = stat
                    .strip_prefix('p')
                    .is_some_and(|n| n.parse::<f64>().is_ok());
                assert!(
                    percentile
                        || ["Sum", "Average", "Maximum", "Minimum", "SampleCount"].contains(&stat),
                    "{title}: stat {stat}"
                );
            }
            match namespace {
                "NAMESPACE" => assert_emitted(
                    title,
                    &Watched {
                        name: name.clone(),
                        dimensions,
                    },
                    &stack,
                ),
                "AWS/SQS" => assert_eq!(
                    dimensions,
                    [(
                        "QueueName".to_owned(),
                        json!("<ProvisionDeadLetterQueue.QueueName>")
                    )],
                    "{title}"
                ),
                other => panic!("{title}: unexpected namespace {other}"),
            }
            graphed.insert(name);
        }
    }
    for needed in [
        "turns",
        "turn_total_ms",
        "time_to_first_command_ms",
        "wake_ms",
        "turn_failures",
        "machines_running",
        "slept",
        "deferred",
        "rate_limited",
        "workers_failed",
        "provision_total_ms",
        "provisions",
        "prompt_tokens",
        "completion_tokens",
        "ApproximateNumberOfMessagesVisible",
    ] {
        assert!(graphed.contains(needed), "the dashboard graphs {needed}");
    }
}

/// Logs Insights: every field a query names is a member of a metric line
/// (a metric, dimension or property of `agenthome::metrics::LINES`), a
/// field of the functions' JSON log lines (`fields.…`) or a built-in
/// (`@…`). Keywords, functions, aliases and string literals aside.
fn check_query(what: &str, query: &str) {
    use agenthome::metrics::{FUNCTION, LINES, STACK};
    const WORDS: &[&str] = &[
        "SOURCE",
        "fields",
        "filter",
        "sort",
        "desc",
        "asc",
        "limit",
        "and",
        "or",
        "not",
        "as",
        "ispresent",
        "stats",
        "by",
        "count",
        "avg",
        "max",
        "min",
        "pct",
        "bin",
        "like",
        "in",
    ];
    let mut unquoted = String::new();
    let mut quote = None;
    for c in query.chars() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '"' || c == '\'' => quote = Some(c),
            None => unquoted.push(c),
        }
    }
    let tokens: Vec<&str> = unquoted
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '@'))
        .filter(|t| !t.is_empty())
        .collect();
    let known = |name: &str| {
        name == STACK
            || name == FUNCTION
            || LINES.iter().any(|s| {
                s.metric(name).is_some()
                    || s.dimension(name).is_some()
                    || s.properties.contains(&name)
            })
    };
    for (i, tok) in tokens.iter().enumerate() {
        let alias = i > 0 && tokens[i - 1] == "as";
        if alias
            || WORDS.contains(tok)
            || tok.starts_with('@')
            || tok.starts_with("fields.")
            || tok.parse::<f64>().is_ok()
        {
            continue;
        }
        assert!(
            known(tok),
            "{what}: `{tok}` is no member of any metric line"
        );
    }
}

#[test]
fn given_the_saved_queries_when_read_then_they_name_fields_the_functions_log() {
    let t = template();
    let queries = resources_of_type(&t, "AWS::Logs::QueryDefinition");
    assert!(queries.len() >= 3, "saved queries for the common questions");
    for (id, q) in queries {
        let p = &q["Properties"];
        check_query(id, p["QueryString"].as_str().expect("QueryString"));
        for group in one_or_many(&p["LogGroupNames"]) {
            let target = group["Ref"].as_str().expect("!Ref to a log group");
            assert_eq!(
                resources(&t)[target]["Type"],
                "AWS::Logs::LogGroup",
                "{id}: {target}"
            );
        }
    }
}

#[test]
fn given_the_provision_worker_when_invoked_asynchronously_then_failures_land_in_an_encrypted_queue()
{
    let t = template();
    let fns = functions(&t);
    let provision = function(&fns, "provision");
    let config = &provision.resource["Properties"]["EventInvokeConfig"];
    assert!(config["MaximumRetryAttempts"].as_u64().is_some());
    assert!(config["MaximumEventAgeInSeconds"].as_u64().is_some());
    let on_failure = &config["DestinationConfig"]["OnFailure"];
    assert_eq!(on_failure["Type"], "SQS");
    let queue = on_failure["Destination"]["Fn::GetAtt"][0]
        .as_str()
        .expect("!GetAtt Queue.Arn");
    let q = &resources(&t)[queue];
    assert_eq!(q["Type"], "AWS::SQS::Queue");
    assert_eq!(q["Properties"]["SqsManagedSseEnabled"], true);
    // Someone hears about it.
    let depth_alarm = resources_of_type(&t, "AWS::CloudWatch::Alarm")
        .into_iter()
        .any(|(_, a)| {
            a["Properties"]["MetricName"] == "ApproximateNumberOfMessagesVisible"
                && a["Properties"]["Dimensions"][0]["Value"]["Fn::GetAtt"][0] == queue
        });
    assert!(depth_alarm, "an alarm on the dead-letter queue's depth");
}

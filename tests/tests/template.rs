//! `template.yaml` and the code agree: the DynamoDB table is the one
//! `agenthome::store::table::describe()` defines; every environment variable
//! the template sets is one the code reads (and the secrets it names are the
//! ones the function may read); the functions' binaries are the workspace's
//! `[[bin]]` targets; the routes are DESIGN §3's; IAM never grants `*`
//! actions or `dynamodb:Scan`; the alarms watch metrics the sweep publishes.
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
    assert_eq!(tables.len(), 1, "exactly one DynamoDB table");
    let (id, table) = tables[0];
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

    // DESIGN §4: point-in-time recovery and encryption on; the data outlives
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
    "PROVISION_FUNCTION",
    "PROVISION_INVOKE",
    // functions/chat-turn/src/main.rs
    "RESPONSE_MODE",
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
        // streaming chat turn, whose Function URL is IAM-authenticated.
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
            assert_eq!(url["AuthType"], "AWS_IAM", "{}: Function URL auth", f.id);
            assert_eq!(url["InvokeMode"], "RESPONSE_STREAM", "{}", f.id);
            assert_eq!(f.env["AUTH_MODE"], "iam", "{}: AUTH_MODE", f.id);
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
    assert_eq!(g["Architectures"], json!(["arm64"]));
    assert_eq!(g["CodeUri"], ".", "built from the workspace root");
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
                "dynamodb:UpdateItem",
            ][..],
        ),
        (
            "provision",
            &[
                "dynamodb:DeleteItem",
                "dynamodb:GetItem",
                "dynamodb:PutItem",
                "dynamodb:UpdateItem",
            ][..],
        ),
        (
            "sleep-sweep",
            &["dynamodb:GetItem", "dynamodb:Query", "dynamodb:UpdateItem"][..],
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
                    if action == "dynamodb:Query" {
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
                    assert!(
                        text.contains("ProvisionFunction") || text.ends_with("-provision\"}"),
                        "{}: may invoke the provision function only, not {text}",
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
            f.env.contains_key("PROVISION_FUNCTION"),
            "{}: may invoke the worker iff it is told its name",
            f.id
        );
    }
}

// -------------------------------------------------------------- routes --

/// DESIGN §3: (method, path, function).
const ROUTES: &[(&str, &str, &str)] = &[
    ("POST", "/v1/users/{user_id}/turns", "chat-turn"),
    ("GET", "/v1/users/{user_id}/machine", "provision"),
    ("PUT", "/v1/users/{user_id}/machine", "provision"),
    ("POST", "/v1/users/{user_id}/machine/sleep", "provision"),
    ("DELETE", "/v1/users/{user_id}/machine", "provision"),
];

fn route_set(routes: &[(&str, &str, &str)]) -> BTreeSet<(String, String, String)> {
    routes
        .iter()
        .map(|(m, p, f)| (m.to_string(), p.to_string(), f.to_string()))
        .collect()
}

/// The §3 table of DESIGN.md, when the project's shared documents sit beside
/// the work tree (as they do for developers and CI).
fn design_routes() -> Option<BTreeSet<(String, String, String)>> {
    let design = std::fs::read_to_string(root().parent()?.join("shared/DESIGN.md")).ok()?;
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
    Some(routes)
}

#[test]
fn given_the_design_when_its_routes_are_read_then_the_list_here_is_the_same() {
    match design_routes() {
        Some(design) => assert_eq!(design, route_set(ROUTES), "DESIGN.md §3 vs. ROUTES"),
        None => eprintln!("DESIGN.md not beside the work tree: checked against ROUTES only"),
    }
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

#[test]
fn given_the_alarms_when_they_watch_agenthome_metrics_then_the_sweep_publishes_them() {
    let t = template();
    let emf = agenthome::sweep::SweepReport::default().to_emf(0);
    let directive = &emf["_aws"]["CloudWatchMetrics"][0];
    let namespace = directive["Namespace"].as_str().expect("namespace");
    let published: BTreeSet<&str> = directive["Metrics"]
        .as_array()
        .expect("metrics")
        .iter()
        .map(|m| m["Name"].as_str().expect("name"))
        .collect();
    // An alarm matches a metric only with the exact dimension set.
    let dimension_sets = directive["Dimensions"].as_array().expect("dimensions");
    let mut watched = BTreeSet::new();
    for (id, alarm) in resources_of_type(&t, "AWS::CloudWatch::Alarm") {
        let p = &alarm["Properties"];
        if p["Namespace"] != namespace {
            continue;
        }
        let metric = p["MetricName"].as_str().expect("MetricName");
        assert!(
            published.contains(metric),
            "{id}: the sweep publishes no {metric}"
        );
        let dims: Vec<Json> = one_or_many(&p["Dimensions"])
            .iter()
            .map(|d| d["Name"].clone())
            .collect();
        assert!(
            dimension_sets
                .iter()
                .any(|set| set.as_array().is_some_and(|s| *s == dims)),
            "{id}: dimensions {dims:?} are not a set the sweep publishes"
        );
        watched.insert(metric.to_owned());
    }
    assert!(
        watched.contains("failed"),
        "an alarm on the sweep's `failed`"
    );
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

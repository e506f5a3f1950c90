//! The metric lines the functions really emit — captured from real turns
//! (buffered and streamed, warm, waking, failing, provisioning), real
//! provisioning runs (one ready, one failed) and a real sweep with
//! reconciliation, against the emulator and moto — are valid CloudWatch
//! Embedded Metric Format, keep every dimension bounded (never a user,
//! turn or machine id), stay inside the catalogue the template is checked
//! against (`agenthome::metrics::LINES`), together publish every metric of
//! it, and agree with what the turn returned.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use agenthome::agent::{Agent, LlmClient, LlmConfig};
use agenthome::config::Secret;
use agenthome::metrics::{LineSpec, FUNCTION, LINES, OTHER, STACK};
use agenthome::sweep::{SweepSettings, Sweeper};
use agenthome_tests::llm::{answer, scripted_llm, tool_call};
use agenthome_tests::stack::{Stack, StackOptions};
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

/// The `_aws` metadata of the EMF specification ("Embedded metric format
/// document structure"), as a JSON Schema: the metadata object with its
/// epoch-ms `Timestamp` and metric directives; each directive's namespace,
/// dimension sets (at most 30 references each) and metric definitions (at
/// most 100, with a CloudWatch unit and an optional storage resolution).
fn emf_schema() -> Value {
    json!({
        "type": "object",
        "required": ["_aws"],
        "properties": {
            "_aws": {
                "type": "object",
                "required": ["Timestamp", "CloudWatchMetrics"],
                "properties": {
                    "Timestamp": {"type": "integer", "minimum": 0},
                    "CloudWatchMetrics": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["Namespace", "Dimensions", "Metrics"],
                            "properties": {
                                "Namespace": {
                                    "type": "string", "minLength": 1, "maxLength": 1024,
                                    "pattern": ".*[^\\s].*"
                                },
                                "Dimensions": {
                                    "type": "array",
                                    "minItems": 1,
                                    "items": {
                                        "type": "array",
                                        "minItems": 0,
                                        "maxItems": 30,
                                        "items": {"type": "string", "minLength": 1, "maxLength": 250}
                                    }
                                },
                                "Metrics": {
                                    "type": "array",
                                    "minItems": 1,
                                    "maxItems": 100,
                                    "items": {
                                        "type": "object",
                                        "required": ["Name"],
                                        "properties": {
                                            "Name": {"type": "string", "minLength": 1, "maxLength": 1024},
                                            "Unit": {"enum": [
                                                "Seconds", "Microseconds", "Milliseconds", "Bytes",
                                                "Kilobytes", "Megabytes", "Gigabytes", "Terabytes",
                                                "Bits", "Kilobits", "Megabits", "Gigabits", "Terabits",
                                                "Percent", "Count", "Bytes/Second", "Kilobytes/Second",
                                                "Megabytes/Second", "Gigabytes/Second", "Terabytes/Second",
                                                "Bits/Second", "Kilobits/Second", "Megabits/Second",
                                                "Gigabits/Second", "Terabits/Second", "Count/Second", "None"
                                            ]},
                                            "StorageResolution": {"enum": [1, 60]}
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    })
}

/// One line checked against the specification and the catalogue; returns
/// the names of the metrics it published. `ids` are values that must never
/// be a dimension (user, turn and machine ids).
fn check_line(line: &str, namespace: &str, stack: &str, ids: &[String]) -> BTreeSet<String> {
    assert!(!line.contains('\n'), "one line: {line}");
    assert!(line.len() < 256 * 1024, "under the log event size limit");
    let doc: Value = serde_json::from_str(line).expect("each line is one JSON object");
    let validator = jsonschema::validator_for(&emf_schema()).expect("schema compiles");
    let errors: Vec<String> = validator.iter_errors(&doc).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{line}: {errors:?}");

    let function = doc[FUNCTION].as_str().expect("Function member");
    let spec: &LineSpec = LINES
        .iter()
        .find(|s| s.function == function)
        .unwrap_or_else(|| panic!("no catalogued line for function {function}"));
    assert_eq!(doc[STACK], stack, "{line}");
    let now = agenthome::clock::now_ms();
    let ts = doc["_aws"]["Timestamp"].as_u64().expect("Timestamp");
    assert!(
        ts <= now && now - ts < 3_600_000,
        "timestamp {ts} is recent epoch ms"
    );

    // Every member is a declared metric, dimension or property.
    for name in doc.as_object().unwrap().keys() {
        let declared = name == "_aws"
            || name == STACK
            || name == FUNCTION
            || spec.metric(name).is_some()
            || spec.dimension(name).is_some()
            || spec.properties.contains(&name.as_str());
        assert!(declared, "{line}: undeclared member {name}");
    }
    let mut published = BTreeSet::new();
    for directive in doc["_aws"]["CloudWatchMetrics"].as_array().unwrap() {
        assert_eq!(directive["Namespace"], namespace, "{line}");
        for set in directive["Dimensions"].as_array().unwrap() {
            let names: Vec<&str> = set
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_str().unwrap())
                .collect();
            for name in &names {
                // Every dimension is a top-level string member with a
                // bounded value: the stack, the function, or a declared one.
                let value = doc[*name]
                    .as_str()
                    .unwrap_or_else(|| panic!("{line}: dimension {name} has no string member"));
                match *name {
                    STACK => assert_eq!(value, stack),
                    FUNCTION => assert_eq!(value, spec.function),
                    other => {
                        let d = spec
                            .dimension(other)
                            .unwrap_or_else(|| panic!("{line}: undeclared dimension {other}"));
                        assert!(
                            d.values.contains(&value) || value == OTHER,
                            "{line}: {other}={value} is not one of its declared values"
                        );
                    }
                }
                assert!(
                    !ids.iter().any(|id| id == value),
                    "{line}: an id ({value}) is a dimension"
                );
            }
            for m in directive["Metrics"].as_array().unwrap() {
                let name = m["Name"].as_str().unwrap();
                let declared = spec
                    .metric(name)
                    .unwrap_or_else(|| panic!("{line}: undeclared metric {name}"));
                assert_eq!(m["Unit"], declared.unit.as_str(), "{line}: unit of {name}");
                assert!(
                    doc[name].is_number(),
                    "{line}: {name} has no numeric member"
                );
                let mut sorted_set = names.clone();
                sorted_set.sort_unstable();
                assert!(
                    spec.dimension_sets(name).iter().any(|s| {
                        let mut s = s.clone();
                        s.sort_unstable();
                        s == sorted_set
                    }),
                    "{line}: {name} under {names:?} is not a catalogued dimension set"
                );
                published.insert(name.to_owned());
            }
        }
    }
    published
}

fn docs(stack: &Stack) -> Vec<Value> {
    stack
        .metrics
        .lines()
        .iter()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect()
}

/// The one turn line whose `turn_id` is `id`.
fn turn_line(stack: &Stack, id: &str) -> Value {
    let found: Vec<Value> = docs(stack)
        .into_iter()
        .filter(|d| d["turn_id"] == id)
        .collect();
    assert_eq!(found.len(), 1, "one line for turn {id}");
    found.into_iter().next().unwrap()
}

fn llm_agent(base: &str) -> Agent {
    let config = LlmConfig::new(
        agenthome::dedalus::Url::parse(base).unwrap(),
        Some(Secret::new("sk-test-key")),
        "test-model",
    );
    Agent::llm(LlmClient::new(config).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_emitted_line_is_valid_emf_with_bounded_dimensions_and_agrees_with_the_turn() {
    // GIVEN the whole stack with a scripted model
    let (base, script) = scripted_llm(vec![
        tool_call("c1", json!({"command": "echo hello"})),
        answer("said hello"),
    ])
    .await;
    let stack = Stack::start_with(StackOptions {
        agent: llm_agent(&base),
        ..StackOptions::default()
    })
    .await;

    // WHEN alice's first message provisions her machine (a 202 turn and a
    // worker run),
    let machine_id = stack.ready_user("alice").await;
    let first = docs(&stack);
    assert_eq!(first.len(), 2, "{first:?}");
    assert_eq!(
        (first[0]["Function"].as_str(), first[0]["Outcome"].as_str()),
        (Some("chat-turn"), Some("provisioning"))
    );
    assert_eq!(first[0]["status"], 202);
    let ready = &first[1];
    assert_eq!(
        (ready["Function"].as_str(), ready["Outcome"].as_str()),
        (Some("provision"), Some("ready"))
    );
    assert_eq!(
        (&ready["user_id"], &ready["machine_id"]),
        (&json!("alice"), &json!(machine_id))
    );
    assert_eq!(ready["attempts"], 1, "the first attempt: {ready}");
    for m in ["boot_ms", "bootstrap_ms", "provision_total_ms"] {
        assert!(ready[m].is_u64(), "{m}: {ready}");
    }
    assert!(ready["provision_total_ms"].as_u64() >= ready["boot_ms"].as_u64());
    assert!(
        ready["dedalus_requests"].as_u64().unwrap() >= 3,
        "create, status, bootstrap: {ready}"
    );

    // a warm turn runs a command the model asked for,
    let before = stack.emu.requests().await.len();
    let warm = stack.turn("alice", "say hello").await;
    let during = stack.emu.requests().await.len() - before;
    assert_eq!(warm.status, 200, "{}", warm.text);

    // a turn wakes the machine,
    stack.sleep_machine(&machine_id).await;
    script.push([tool_call("c2", json!({"command": "pwd"})), answer("here")]);
    let woke = stack.turn("alice", "where am I").await;
    assert_eq!(woke.status, 200, "{}", woke.text);
    assert!(woke.body["timings"]["wake_ms"].as_u64().unwrap() > 0);

    // a turn fails at the model,
    script.push([(400, json!({"error": {"message": "bad request"}}))]);
    let failed = stack.turn("alice", "again").await;
    assert_eq!(failed.status, 502, "{}", failed.text);

    // a turn is streamed,
    script.push([
        tool_call("c3", json!({"command": "echo streamed"})),
        answer("streamed"),
    ]);
    let resp = stack.stream_turn("alice", "stream it").await;
    let chunks: Vec<_> = resp.into_body().collect().await;
    let streamed: Vec<u8> = chunks.iter().flat_map(|c| c.to_vec()).collect();
    let streamed = String::from_utf8_lossy(&streamed).into_owned();
    assert!(streamed.contains("event: done"), "{streamed}");

    // bob's provisioning fails (the platform refuses the create),
    let r = stack.turn("bob", "hi").await;
    assert_eq!(r.status, 202, "{}", r.text);
    stack
        .emu
        .inject_fault(json!({"method": "POST", "path": "/v1/machines", "times": 0,
            "status": 400, "error_code": "INVALID_REQUEST", "retryable": false}))
        .await;
    assert_eq!(stack.drain_worker().await, 1);
    stack.emu.clear_faults().await;

    // and the sweep runs with a reconciliation, its line emitted as the
    // sleep-sweep function emits it.
    let sweeper = Sweeper::new(
        Arc::new(stack.store.clone()),
        &stack.emu.client(),
        SweepSettings {
            idle_after: Duration::ZERO,
            orphan_grace: Duration::ZERO,
            ..SweepSettings::default()
        },
    );
    let now = agenthome::clock::now_ms();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let report = sweeper.run_scheduled(now, now, deadline, true).await;
    assert!(report.reconciled, "{report:?}");
    let metrics = &stack.chat.metrics;
    metrics.emit(&report.emf_doc(metrics.config(), now));

    // THEN every line is valid EMF, bounded, and inside the catalogue,
    let lines = stack.metrics.lines();
    assert_eq!(lines.len(), 9, "{lines:#?}");
    let item_bob = stack.item("bob").await;
    let mut ids: Vec<String> = vec!["alice".into(), "bob".into(), machine_id.clone()];
    ids.extend(item_bob.machine_id.clone());
    for r in [&warm, &woke] {
        ids.push(r.body["turn_id"].as_str().unwrap().to_owned());
    }
    let config = metrics.config();
    let mut published = BTreeSet::new();
    for line in &lines {
        published.extend(check_line(line, &config.namespace, &config.stack, &ids));
    }
    // and together they publish every metric of the catalogue (so every
    // metric the dashboard and alarms may use is really emitted).
    for spec in LINES {
        for m in spec.metrics {
            assert!(
                published.contains(m.name),
                "{} never published {}",
                spec.function,
                m.name
            );
        }
    }

    // The warm turn's line agrees with its result and with the emulator.
    let line = turn_line(&stack, warm.body["turn_id"].as_str().unwrap());
    let body = &warm.body;
    assert_eq!(line["Outcome"], "completed");
    assert_eq!(line["Transport"], body["transport"]);
    assert_eq!(line["user_id"], "alice");
    assert_eq!(line["mode"], "json");
    assert_eq!(
        line["steps"],
        json!(body["steps"].as_array().unwrap().len())
    );
    assert_eq!(line["llm_calls"], body["usage"]["llm_calls"]);
    assert_eq!(line["prompt_tokens"], body["usage"]["prompt_tokens"]);
    assert_eq!(
        line["completion_tokens"],
        body["usage"]["completion_tokens"]
    );
    let output: u64 = body["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["output_bytes"].as_u64().unwrap())
        .sum();
    assert_eq!(line["output_bytes"], output);
    assert_eq!(
        line["dedalus_requests"],
        json!(during),
        "every Dedalus request the emulator saw during the turn is counted"
    );
    let table_calls = line["table_calls"].as_u64().unwrap();
    assert!((4..=10).contains(&table_calls), "{table_calls} table calls");
    let total = line["turn_total_ms"].as_u64().unwrap();
    assert!(total >= body["timings"]["total_ms"].as_u64().unwrap());
    assert!(line["time_to_first_command_ms"].as_u64().unwrap() <= total);
    assert!(
        line.get("wake_ms").is_none(),
        "a warm turn has no wake: {line}"
    );
    assert!(line.get("Code").is_none() && line.get("turn_failures").is_none());

    // The waking turn's wake time is at most the one its result reports.
    let line = turn_line(&stack, woke.body["turn_id"].as_str().unwrap());
    let wake = line["wake_ms"].as_u64().expect("wake_ms on a waking turn");
    assert!(wake > 0 && wake <= woke.body["timings"]["wake_ms"].as_u64().unwrap() + 5);

    // The failed turn carries its problem code, as a bounded dimension too.
    let all = docs(&stack);
    let failed_line = all
        .iter()
        .find(|d| d["Outcome"] == "failed")
        .expect("a failed turn line");
    assert_eq!(failed_line["Code"], failed.body["code"]);
    assert_eq!(failed_line["code"], "llm_error");
    assert_eq!(failed_line["turn_failures"], 1);
    assert_eq!(failed_line["status"], 502);

    // The streamed turn is measured from its own task.
    assert!(all
        .iter()
        .any(|d| d["mode"] == "stream" && d["Outcome"] == "completed" && d["steps"] == 1));

    // Bob's provisioning failed: recorded as such, with no boot time.
    let bob = all
        .iter()
        .find(|d| d["Function"] == "provision" && d["user_id"] == "bob")
        .expect("bob's provisioning line");
    assert_eq!(bob["Outcome"], "failed");
    assert_eq!(bob["provision_failures"], 1);
    assert_eq!(bob["error_kind"], "dedalus");
    assert!(bob.get("boot_ms").is_none());
    assert_eq!(bob["attempts"], 1, "{bob}");

    // The sweep's line has the stack dimension and the awake machine count.
    let sweep = all.last().unwrap();
    assert_eq!(sweep["Function"], "sleep-sweep");
    assert_eq!(sweep["slept"], report.slept);
    assert_eq!(sweep["machines_running"], report.machines_running);
}

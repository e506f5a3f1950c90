//! `openapi.yaml` describes the API the code serves, and the checker that
//! holds every integration test's exchanges to it (`agenthome_tests::openapi`)
//! catches what it must:
//!
//! - the documented routes are the template's HTTP API routes, the router
//!   accepts each, and each is served by the function the document names;
//! - every problem `code` the code can emit is documented, and no other;
//! - the document's own examples conform to their schemas;
//! - the checker rejects an undocumented field, status, header, event,
//!   content type, and a disagreement about a request's validity.
//!
//! `scripts/test` lints the document itself (`openapi-spec-validator`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use agenthome::entry::Route;
use agenthome_tests::events::{http, Auth};
use agenthome_tests::openapi::{self, document, Function, Headers};
use agenthome_tests::workspace_root;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::path::Path;

// ------------------------------------------------------------ helpers --

/// The documented operations: (METHOD, path template, function).
fn documented_routes() -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    for (template, item) in document().root()["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            if op.get("responses").is_none() {
                continue; // `parameters`, `servers`
            }
            let function = op["x-agenthome-function"]
                .as_str()
                .unwrap_or_else(|| panic!("{method} {template}: x-agenthome-function"));
            out.insert((
                method.to_ascii_uppercase(),
                template.clone(),
                function.to_string(),
            ));
        }
    }
    out
}

fn headers(pairs: &[(&str, &str)]) -> Headers {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn json_headers() -> Headers {
    headers(&[("content-type", "application/json")])
}

fn problem_headers() -> Headers {
    headers(&[("content-type", "application/problem+json")])
}

fn turn_request(body: &str) -> openapi::Checked {
    openapi::check_event(
        Function::ChatTurn,
        &http("POST", "/v1/users/alice/turns", Some(body), Auth::None),
    )
}

fn stream_request() -> openapi::Checked {
    let mut event = http(
        "POST",
        "/v1/users/alice/turns",
        Some(r#"{"message":"ls"}"#),
        Auth::None,
    );
    event["headers"]["accept"] = json!("text/event-stream");
    openapi::check_event(Function::ChatTurn, &event)
}

/// The document's own example of a turn result.
fn turn_result() -> Value {
    document().root()["components"]["schemas"]["TurnResult"]["example"].clone()
}

fn problem(status: u16, code: &str) -> Value {
    json!({"type": format!("https://agenthome.dev/problems/{}", code.replace('_', "-")),
           "title": "t", "status": status, "detail": "d", "code": code})
}

fn bytes(v: &Value) -> Vec<u8> {
    v.to_string().into_bytes()
}

fn sse(events: &[(&str, Value)]) -> Vec<u8> {
    events
        .iter()
        .map(|(name, data)| format!("event: {name}\ndata: {data}\n\n"))
        .collect::<String>()
        .into_bytes()
}

// ------------------------------------------------------------- routes --

#[test]
fn the_documented_routes_are_the_templates_and_the_router_serves_each_on_the_named_function() {
    let documented = documented_routes();
    assert_eq!(documented.len(), 6, "{documented:?}");

    // GIVEN template.yaml's HTTP API routes
    let text = std::fs::read_to_string(workspace_root().join("template.yaml")).unwrap();
    let template: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
    let mut routes = BTreeSet::new();
    for (_, resource) in template["Resources"].as_mapping().unwrap() {
        let Some(events) = resource["Properties"]["Events"].as_mapping() else {
            continue;
        };
        for (_, e) in events {
            if e["Type"].as_str() == Some("HttpApi") {
                let p = &e["Properties"];
                routes.insert((
                    p["Method"].as_str().unwrap().to_ascii_uppercase(),
                    p["Path"].as_str().unwrap().to_string(),
                ));
            }
        }
    }
    // THEN the document has exactly those
    let doc_routes: BTreeSet<(String, String)> = documented
        .iter()
        .map(|(m, p, _)| (m.clone(), p.clone()))
        .collect();
    assert_eq!(doc_routes, routes, "openapi.yaml vs template.yaml");

    // AND the router maps each to the route of the function the document names
    for (method, template, function) in &documented {
        let path = template.replace("{user_id}", "alice");
        let event = http(method, &path, None, Auth::None);
        let req = lambda_http::request::from_str(&event.to_string()).unwrap();
        let route = agenthome::entry::route(&req)
            .unwrap_or_else(|p| panic!("{method} {template}: the router refuses it: {p}"));
        let served_by = match route {
            Route::Turn(_) => "chat-turn",
            _ => "provision",
        };
        assert_eq!(function, served_by, "{method} {template}");
    }
}

// ------------------------------------------------------ problem codes --

/// The codes of the `ProblemCode::Variant` paths in `source` (before its
/// test module): the variant's name in snake case.
fn codes_in(source: &str, out: &mut BTreeSet<String>) {
    const PATH: &str = "ProblemCode::";
    let source = source.split("#[cfg(test)]").next().unwrap_or_default();
    for (at, _) in source.match_indices(PATH) {
        let name: String = source[at + PATH.len()..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric())
            .collect();
        if name.starts_with(|c: char| c.is_ascii_uppercase()) && name != "ALL" {
            out.insert(snake_case(&name));
        }
    }
}

fn snake_case(name: &str) -> String {
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if i > 0 && c.is_ascii_uppercase() {
            out.push('_');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every problem code the product's code can emit: the `ProblemCode`s its
/// production code names.
fn emitted_codes() -> BTreeSet<String> {
    let root = workspace_root();
    let mut files = Vec::new();
    rust_files(&root.join("shared/src"), &mut files);
    for f in std::fs::read_dir(root.join("functions")).unwrap() {
        rust_files(&f.unwrap().path().join("src"), &mut files);
    }
    let mut codes = BTreeSet::new();
    for file in &files {
        codes_in(&std::fs::read_to_string(file).unwrap(), &mut codes);
    }
    codes
}

fn documented_codes() -> BTreeSet<String> {
    document().root()["components"]["schemas"]["ProblemCode"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn the_code_scanner_reads_problem_code_paths_and_nothing_else() {
    let mut found = BTreeSet::new();
    codes_in(
        r#"Problem::of(ProblemCode::TurnInProgress, "x, ProblemCode")
           ProblemCode::ALL.iter()
           [`ProblemCode`] Problem::of(ProblemCode::NoMachine, format!("{}", f(1)))
           #[cfg(test)] Problem::of(ProblemCode::TestOnly, "x")"#,
        &mut found,
    );
    assert_eq!(
        found,
        BTreeSet::from(["turn_in_progress".to_string(), "no_machine".to_string()])
    );
}

#[test]
fn every_problem_code_is_documented_and_emitted_and_no_other() {
    let declared: BTreeSet<String> = agenthome::api::ProblemCode::ALL
        .iter()
        .map(|c| c.code().to_string())
        .collect();
    let documented = documented_codes();
    assert_eq!(
        declared, documented,
        "ProblemCode (shared/src/api/problem.rs) and openapi.yaml's ProblemCode differ"
    );
    let emitted = emitted_codes();
    for known in [
        "unauthorized",
        "internal_error",
        "turn_in_progress",
        "no_machine",
    ] {
        assert!(
            emitted.contains(known),
            "the scan missed {known}: {emitted:?}"
        );
    }
    let stale: Vec<_> = documented.difference(&emitted).collect();
    assert!(
        stale.is_empty(),
        "documented codes nothing emits: {stale:?}"
    );
    let unknown: Vec<_> = emitted.difference(&documented).collect();
    assert!(
        unknown.is_empty(),
        "emitted codes not documented: {unknown:?}"
    );
    let schema = &document().root()["components"]["schemas"]["ProblemCode"];
    assert_eq!(
        schema["x-enum-descriptions"].as_array().map(Vec::len),
        Some(documented.len()),
        "one description per code"
    );
}

/// Each documented description starts with the status `ProblemCode` gives.
#[test]
fn every_documented_status_is_the_one_the_code_answers_with() {
    let schema = &document().root()["components"]["schemas"]["ProblemCode"];
    let descriptions = schema["x-enum-descriptions"].as_array().unwrap();
    let codes = schema["enum"].as_array().unwrap();
    for (code, description) in codes.iter().zip(descriptions) {
        let code = code.as_str().unwrap();
        let declared = agenthome::api::ProblemCode::ALL
            .iter()
            .find(|c| c.code() == code)
            .unwrap_or_else(|| panic!("{code} is not a ProblemCode"));
        let status = declared.status().to_string();
        assert!(
            description.as_str().unwrap().starts_with(&status),
            "{code}: documented as {description}, answers {status}"
        );
    }
}

// ----------------------------------------------------------- examples --

#[test]
fn the_documents_examples_conform_to_their_schemas() {
    let mut checked = 0;
    for (name, schema) in document().root()["components"]["schemas"]
        .as_object()
        .unwrap()
    {
        let pointer = format!("/components/schemas/{name}");
        let mut examples: Vec<Value> = schema.get("example").into_iter().cloned().collect();
        if let Some(list) = schema["examples"].as_array() {
            examples.extend(list.iter().cloned());
        }
        for example in examples {
            document()
                .validate_at(&pointer, &example)
                .unwrap_or_else(|e| panic!("{name} example {example}: {e}"));
            checked += 1;
        }
    }
    assert!(checked >= 3, "{checked} examples");
}

// ------------------------------------------------- the checker itself --

#[test]
fn a_conforming_turn_result_passes_and_an_undocumented_field_fails() {
    let req = turn_request(r#"{"message":"ls"}"#);
    assert_eq!(req.request_error(), None);
    let result = turn_result();
    req.check_response(200, &json_headers(), &bytes(&result))
        .expect("the documented example");

    let mut extra = result.clone();
    extra["surprise"] = json!(1);
    let err = req
        .check_response(200, &json_headers(), &bytes(&extra))
        .unwrap_err();
    assert!(err.contains("surprise"), "{err}");

    let mut nested = result;
    nested["steps"][0]["pid"] = json!(42);
    assert!(req
        .check_response(200, &json_headers(), &bytes(&nested))
        .is_err());
}

#[test]
fn undocumented_statuses_content_types_codes_and_headers_fail() {
    let req = turn_request(r#"{"message":"ls"}"#);
    let body = bytes(&problem(418, "turn_in_progress"));
    assert!(req.check_response(418, &problem_headers(), &body).is_err());
    // a problem served as plain JSON
    let body = bytes(&problem(409, "turn_in_progress"));
    let retry = headers(&[("content-type", "application/json"), ("retry-after", "3")]);
    assert!(req.check_response(409, &retry, &body).is_err());
    // an undocumented code
    let body = bytes(&problem(409, "busy"));
    let retry = headers(&[
        ("content-type", "application/problem+json"),
        ("retry-after", "3"),
    ]);
    assert!(req.check_response(409, &retry, &body).is_err());
    // 503 without its required Retry-After, then with a malformed one
    let body = bytes(&problem(503, "no_time"));
    assert!(req.check_response(503, &problem_headers(), &body).is_err());
    let bad = headers(&[
        ("content-type", "application/problem+json"),
        ("retry-after", "soon"),
    ]);
    assert!(req.check_response(503, &bad, &body).is_err());
    let good = headers(&[
        ("content-type", "application/problem+json"),
        ("retry-after", "5"),
    ]);
    req.check_response(503, &good, &body).expect("documented");
    // Retry-After where the document has none
    let body = bytes(&problem(403, "forbidden"));
    let retry = headers(&[
        ("content-type", "application/problem+json"),
        ("retry-after", "5"),
    ]);
    assert!(req.check_response(403, &retry, &body).is_err());
}

#[test]
fn the_document_and_the_function_must_agree_on_a_requests_validity() {
    // A request the document rejects (unknown field) answered 200
    let req = turn_request(r#"{"message":"ls","extra":1}"#);
    assert!(req.request_error().is_some());
    assert!(req
        .check_response(200, &json_headers(), &bytes(&turn_result()))
        .is_err());
    req.check_response(
        422,
        &problem_headers(),
        &bytes(&problem(422, "invalid_body")),
    )
    .expect("rejected as documented");
    // A request the document accepts refused as invalid
    let req = turn_request(r#"{"message":"ls","history":null}"#);
    assert_eq!(req.request_error(), None);
    assert!(req
        .check_response(
            422,
            &problem_headers(),
            &bytes(&problem(422, "invalid_body"))
        )
        .is_err());
    // Outside the document: only a 400/404/405 problem
    let outside = openapi::check_event(
        Function::ChatTurn,
        &http("GET", "/v1/users/alice/machine", None, Auth::None),
    );
    assert!(outside.request_error().is_some());
    assert!(outside.check_response(200, &json_headers(), b"{}").is_err());
    outside
        .check_response(
            404,
            &problem_headers(),
            &bytes(&problem(404, "no_such_route")),
        )
        .expect("the chat-turn function does not serve machine routes");
}

#[test]
fn an_event_stream_is_checked_event_by_event() {
    let req = stream_request();
    let sse_headers = headers(&[("content-type", "text/event-stream")]);
    let machine = json!({"stage": "ready", "phase": "running", "elapsed_ms": 3});
    let good = sse(&[("machine", machine.clone()), ("done", turn_result())]);
    let mut with_comment = b": keep-alive\n\n".to_vec();
    with_comment.extend_from_slice(&good);
    req.check_response(200, &sse_headers, &with_comment)
        .expect("documented events");

    let failing: Vec<(&str, Vec<u8>)> = vec![
        (
            "undocumented event",
            sse(&[("progress", json!({})), ("done", turn_result())]),
        ),
        (
            "undocumented field",
            sse(&[
                (
                    "machine",
                    json!({"stage": "ready", "phase": "running", "elapsed_ms": 3, "x": 1}),
                ),
                ("done", turn_result()),
            ]),
        ),
        (
            "event after the final one",
            sse(&[("done", turn_result()), ("machine", machine.clone())]),
        ),
        ("no final event", sse(&[("machine", machine.clone())])),
        (
            "error data that is not a problem",
            sse(&[("error", json!({"message": "x"}))]),
        ),
    ];
    for (what, body) in failing {
        assert!(
            req.check_response(200, &sse_headers, &body).is_err(),
            "{what} passed"
        );
    }
    // A stream the request did not ask for
    let plain = turn_request(r#"{"message":"ls"}"#);
    assert!(plain.check_response(200, &sse_headers, &good).is_err());
}

#[tokio::test]
async fn an_event_stream_body_fails_the_reader_on_the_first_bad_event() {
    use futures_util::StreamExt as _;
    let req = stream_request();
    let sse_headers = headers(&[("content-type", "text/event-stream")]);
    let openapi::BodyCheck::EventStream(events) = req.check_head(200, &sse_headers).unwrap() else {
        panic!("an event stream");
    };
    let chunks = vec![
        sse(&[("reply", json!({"text": "hi"}))]),
        sse(&[("reply", json!({"text": "hi", "extra": true}))]),
    ];
    let stream =
        openapi::validated_stream(futures_util::stream::iter(chunks), events, "test".into());
    let read = tokio::spawn(stream.collect::<Vec<_>>()).await;
    assert!(
        read.is_err_and(|e| e.is_panic()),
        "the second event must fail the reader"
    );
}

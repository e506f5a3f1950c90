//! The smoke test of built Lambda binaries (`bin/lambda_smoke`,
//! `scripts/lambda-smoke`, and `tests/function_binaries.rs` on the debug
//! binaries): each binary is started as Lambda starts it, against the fake
//! Lambda of [`crate::runtime_api`], takes one event and must answer it
//! correctly. A runner runs a binary through an emulator (the arm64 binaries
//! on an x86_64 host: `qemu-aarch64 -L /usr/aarch64-linux-gnu`).
//!
//! The table must exist and be empty (moto on loopback); the cases run in
//! order, and only the last one writes an item. Dedalus is a closed loopback
//! port: none of the cases may need it.

use crate::runtime_api::{Answer, FakeLambda, FunctionEnv, Invoke};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::time::Instant;

/// One function, one event, the answer it must give.
pub struct Case {
    /// The binary (`chat-turn`, `provision`, `sleep-sweep`).
    pub function: &'static str,
    /// The event, in words.
    pub what: &'static str,
    event: Value,
    check: fn(&Answer, &[Invoke]) -> Result<String, String>,
}

/// The answer's JSON body, or why not.
fn response_json(answer: &Answer) -> Result<Value, String> {
    match answer {
        Answer::Response(_) => answer
            .json()
            .ok_or_else(|| format!("the response is not JSON: {answer:?}")),
        other => Err(format!("expected a response, got {other:?}")),
    }
}

/// An API Gateway v2 response: status, lower-cased headers, JSON body.
fn http_response(answer: &Answer) -> Result<(u64, Value, Value), String> {
    let v = response_json(answer)?;
    let status = v["statusCode"]
        .as_u64()
        .ok_or_else(|| format!("no statusCode in {v}"))?;
    let headers = v["headers"].clone();
    let body = v["body"]
        .as_str()
        .and_then(|b| serde_json::from_str(b).ok())
        .ok_or_else(|| format!("the body is not JSON: {v}"))?;
    Ok((status, headers, body))
}

fn sweep_answer(answer: &Answer, _: &[Invoke]) -> Result<String, String> {
    let r = response_json(answer)?;
    let zero = ["candidates", "slept", "failed", "lost"]
        .iter()
        .all(|k| r[*k].as_u64() == Some(0));
    // `remaining` is set when a page of the index could not be read.
    if zero && r["reconciled"] == false && r["remaining"] == false {
        Ok("an empty sweep report".into())
    } else {
        Err(format!("expected an empty sweep report, got {r}"))
    }
}

fn unknown_user_answer(answer: &Answer, _: &[Invoke]) -> Result<String, String> {
    let (status, headers, body) = http_response(answer)?;
    let ctype = headers["content-type"].as_str().unwrap_or_default();
    if status == 404 && ctype == "application/problem+json" && body["code"] == "no_machine" {
        Ok("404 problem+json no_machine".into())
    } else {
        Err(format!(
            "expected 404 no_machine, got {status} {ctype} {body}"
        ))
    }
}

fn worker_answer(answer: &Answer, _: &[Invoke]) -> Result<String, String> {
    let r = response_json(answer)?;
    let error = r["error"].as_str().unwrap_or_default();
    if r["user_id"] == "alice" && error.contains("no item for user alice") {
        Ok(format!("clean failure: {error}"))
    } else {
        Err(format!(
            "expected the worker's clean `no item` failure, got {r}"
        ))
    }
}

fn first_turn_answer(answer: &Answer, invokes: &[Invoke]) -> Result<String, String> {
    let (status, headers, body) = http_response(answer)?;
    if status != 202 || body["status"] != "provisioning" || headers["retry-after"].is_null() {
        return Err(format!(
            "expected 202 provisioning with Retry-After, got {status} {body}"
        ));
    }
    let started = invokes.iter().any(|i| {
        let payload: Value = serde_json::from_slice(&i.payload).unwrap_or_default();
        i.function == "provision"
            && i.invocation_type.as_deref() == Some("Event")
            && payload["user_id"] == "alice"
    });
    if started {
        Ok("202 provisioning; provision invoked (Event) for alice".into())
    } else {
        Err(format!(
            "no asynchronous provision invoke for alice: {invokes:?}"
        ))
    }
}

fn fixture(events: &Path, name: &str) -> Value {
    let path = events.join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The cases, in order, with the fixture events under `events/`.
pub fn cases(events: &Path) -> Vec<Case> {
    let mut schedule = fixture(events, "sleep-sweep/schedule.json");
    // 12:01 is not a reconciliation minute: the run needs only the table.
    schedule["time"] = json!("2026-05-04T12:01:00Z");
    vec![
        Case {
            function: "sleep-sweep",
            what: "scheduled sweep, empty table",
            event: schedule,
            check: sweep_answer,
        },
        Case {
            function: "provision",
            what: "GET machine of an unknown user",
            event: fixture(events, "provision/get-machine.json"),
            check: unknown_user_answer,
        },
        Case {
            function: "provision",
            what: "provision event, no item, no Dedalus",
            event: fixture(events, "provision/worker.json"),
            check: worker_answer,
        },
        Case {
            function: "chat-turn",
            what: "first turn of a new user",
            event: fixture(events, "chat-turn/turn.json"),
            check: first_turn_answer,
        },
    ]
}

/// Settings shared by every case.
pub struct Run {
    /// A program (and its arguments) that runs the binary, or nothing.
    pub runner: Vec<String>,
    /// DynamoDB endpoint (moto).
    pub ddb_url: String,
    /// An existing, empty table.
    pub table: String,
    /// Where each function's output goes (`<n>-<function>.log`).
    pub logs: PathBuf,
    /// How long a function may take to start, and to answer.
    pub timeout: Duration,
}

/// What one case gave.
pub struct Outcome {
    /// Spawn → first poll for an event.
    pub init: Option<Duration>,
    /// Event delivered → answer.
    pub answer: Option<Duration>,
    /// What the answer was, or what was wrong (with the function's log).
    pub verdict: Result<String, String>,
}

/// Start the binary, deliver the event, check the answer.
pub async fn run_case(run: &Run, n: usize, case: &Case, bin: &Path) -> Outcome {
    let lambda = FakeLambda::start().await.expect("bind loopback");
    lambda.queue(&format!("smoke-{n}"), &case.event);
    let env = FunctionEnv::new(case.function, lambda.addr())
        .set("AWS_ENDPOINT_URL_DYNAMODB", &run.ddb_url)
        .set("AWS_ENDPOINT_URL_LAMBDA", lambda.url())
        .set("TABLE_NAME", &run.table)
        .set("AUTH_MODE", "jwt")
        // The smoke's worker never runs: a first turn answers 202 at once.
        .set("FIRST_TURN_WAIT", "0s")
        .set("RUST_LOG", "info");
    let log = run.logs.join(format!("{n}-{}.log", case.function));
    let started = Instant::now();
    let mut child = match env.spawn(&run.runner, bin, Some(&log)) {
        Ok(c) => c,
        Err(e) => {
            return Outcome {
                init: None,
                answer: None,
                verdict: Err(format!("cannot start {}: {e}", bin.display())),
            }
        }
    };
    let init = lambda
        .first_poll(run.timeout)
        .await
        .map(|at| at.duration_since(started));
    let answer = match init {
        Some(_) => lambda.answer(run.timeout).await,
        None => None,
    };
    let _ = child.kill().await;
    let verdict = match &answer {
        Some((a, _)) => (case.check)(a, &lambda.invokes()),
        None if init.is_none() => Err("never asked for an event".into()),
        None => Err("never answered the event".into()),
    };
    let verdict = verdict.map_err(|e| {
        let tail = std::fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = tail.lines().rev().take(15).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        format!(
            "{e}\n    log {}:\n    {}",
            log.display(),
            tail.join("\n    ")
        )
    });
    Outcome {
        init,
        answer: answer.map(|(_, took)| took),
        verdict,
    }
}

/// Run every case with `bins` (binary name → file); one Markdown row per
/// case (after [`HEADER`]) and whether all passed.
pub async fn run_all(run: &Run, bins: &[(&str, PathBuf)], events: &Path) -> (Vec<String>, bool) {
    let mut rows = Vec::new();
    let mut ok = true;
    for (n, case) in cases(events).iter().enumerate() {
        let Some((_, bin)) = bins.iter().find(|(f, _)| *f == case.function) else {
            rows.push(format!(
                "| {} | {} | – | – | FAILED: no binary |",
                case.function, case.what
            ));
            ok = false;
            continue;
        };
        let out = run_case(run, n + 1, case, bin).await;
        // A binary that never starts: the others would wait as long.
        let stop = out.init.is_none();
        let result = match out.verdict {
            Ok(detail) => format!("ok: {detail}"),
            Err(e) => {
                ok = false;
                format!("FAILED: {e}")
            }
        };
        rows.push(format!(
            "| {} | {} | {} | {} | {result} |",
            case.function,
            case.what,
            fmt_ms(out.init),
            fmt_ms(out.answer)
        ));
        if stop {
            rows.push("| … | the remaining cases | – | – | not run |".into());
            break;
        }
    }
    (rows, ok)
}

/// The Markdown table header of [`run_all`]'s rows.
pub const HEADER: &str =
    "| function | event | init ms | answer ms | result |\n|---|---|---|---|---|";

fn fmt_ms(d: Option<Duration>) -> String {
    d.map_or_else(|| "–".into(), |d| format!("{:.0}", crate::stats::ms(d)))
}

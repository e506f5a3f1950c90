//! agenthome's own API document, `openapi.yaml`, as the oracle of the
//! integration tests. Every request the tests deliver to the functions'
//! HTTP routes and every response they get back goes through [`check_event`]
//! and [`Checked`]:
//!
//! - the request is matched to its operation (path template, method, and
//!   the function `x-agenthome-function` names) and validated: path
//!   parameters and the JSON body against their schemas;
//! - the response must be documented for that operation and status: its
//!   content type, its body (the product's objects forbid undocumented
//!   fields), its headers (`Retry-After` where required, and only where
//!   documented);
//! - a `text/event-stream` body is parsed event by event ([`EventStream`]):
//!   each event's name and `data` must match the media type's
//!   `x-itemSchema`, and nothing follows a final event;
//! - the document and the code agree on what a valid request is: one the
//!   document rejects must get a 4xx, and one it accepts must never get a
//!   request-validation problem ([`REQUEST_ERROR_CODES`]);
//! - a request outside the document (another path, method or function)
//!   must get a `404`/`405` (or `400` for a bad user id) problem.
//!
//! New fields, statuses, routes or events need only a change to the
//! document; nothing here names them.

use crate::schema::{escape_pointer, Document};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::OnceLock;

/// The document, relative to the workspace root.
pub const DOCUMENT_PATH: &str = "openapi.yaml";

/// Problem codes that say "the request breaks the contract": a request the
/// document accepts must never get one.
pub const REQUEST_ERROR_CODES: &[&str] = &[
    "invalid_user_id",
    "invalid_json",
    "invalid_body",
    "invalid_message",
    "invalid_history",
    "payload_too_large",
    "unsupported_media_type",
    "no_such_route",
    "method_not_allowed",
];

/// Statuses a request the document rejects may get (auth runs before the
/// body is read).
const REJECTED_STATUSES: &[u16] = &[400, 401, 403, 404, 405, 413, 415, 422];

/// Statuses of a request outside the document (the router checks the user
/// id before the method).
const UNROUTED_STATUSES: &[u16] = &[400, 404, 405];

const EVENT_STREAM: &str = "text/event-stream";
const PROBLEM_SCHEMA: &str = "/components/schemas/Problem";

/// The parsed document.
pub fn document() -> &'static Document {
    static DOC: OnceLock<Document> = OnceLock::new();
    DOC.get_or_init(|| {
        let path = crate::workspace_root().join(DOCUMENT_PATH);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        let root: Value = serde_yaml_ng::from_str(&text)
            .unwrap_or_else(|e| panic!("{} is not YAML for JSON: {e}", path.display()));
        Document::new(root)
    })
}

/// The Lambda function a request is delivered to (`x-agenthome-function`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Function {
    /// `chat-turn` (also its streaming deployment).
    ChatTurn,
    /// `provision` (the machine routes).
    Provision,
}

impl Function {
    /// The name the document uses.
    pub fn name(self) -> &'static str {
        match self {
            Function::ChatTurn => "chat-turn",
            Function::Provision => "provision",
        }
    }

    /// The function the document calls `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        [Function::ChatTurn, Function::Provision]
            .into_iter()
            .find(|f| f.name() == name)
    }
}

/// Header names (lowercase) and values.
pub type Headers = BTreeMap<String, String>;

/// Headers of an `http` response.
pub fn headers_from_map(map: &lambda_http::http::HeaderMap) -> Headers {
    map.iter()
        .map(|(k, v)| {
            let value = String::from_utf8_lossy(v.as_bytes()).into_owned();
            (k.as_str().to_ascii_lowercase(), value)
        })
        .collect()
}

/// Headers of an API Gateway event or response (a JSON object).
pub fn headers_from_json(value: &Value) -> Headers {
    value
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    let text = v.as_str().map_or_else(|| v.to_string(), str::to_string);
                    (k.to_ascii_lowercase(), text)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The media type of a `content-type` value (no parameters, lowercase).
fn media_type(headers: &Headers) -> Option<String> {
    headers.get("content-type").map(|ct| {
        ct.split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase()
    })
}

/// A request as a function receives it.
#[derive(Debug, Clone)]
pub struct ApiRequest {
    /// Where it is delivered.
    pub function: Function,
    /// `GET`, `POST`, ...
    pub method: String,
    /// The raw path, percent-encoded.
    pub path: String,
    /// Its headers.
    pub headers: Headers,
    /// Its body, if any.
    pub body: Option<Vec<u8>>,
}

impl ApiRequest {
    /// The request an API Gateway v2 / Function URL event carries.
    pub fn from_event(function: Function, event: &Value) -> Self {
        use base64::Engine as _;
        let body = event["body"].as_str().map(|b| {
            if event["isBase64Encoded"] == true {
                base64::engine::general_purpose::STANDARD
                    .decode(b)
                    .unwrap_or_else(|e| panic!("a base64 body that does not decode: {e}"))
            } else {
                b.as_bytes().to_vec()
            }
        });
        ApiRequest {
            function,
            method: event["requestContext"]["http"]["method"]
                .as_str()
                .unwrap_or("GET")
                .to_ascii_uppercase(),
            path: event["rawPath"].as_str().unwrap_or("/").to_string(),
            headers: headers_from_json(&event["headers"]),
            body,
        }
    }
}

/// Check the request in `event`, delivered to `function`.
pub fn check_event(function: Function, event: &Value) -> Checked {
    check_request(ApiRequest::from_event(function, event))
}

/// The operation a request is for.
#[derive(Debug, Clone)]
struct Operation {
    /// `/paths/<template>/<method>` (escaped).
    pointer: String,
    /// `/paths/<template>` (escaped).
    path_item: String,
    /// `METHOD template`, for messages.
    name: String,
    /// Raw (percent-encoded) values of the path parameters.
    params: BTreeMap<String, String>,
}

/// Where the document puts a request.
#[derive(Debug, Clone)]
enum Target {
    Operation(Operation),
    /// Not a documented operation of this function; why.
    Outside(String),
}

/// A request matched against the document; checks its response.
#[derive(Debug, Clone)]
pub struct Checked {
    request: ApiRequest,
    target: Target,
    /// Why the document rejects the request, if it does.
    request_error: Option<String>,
}

/// What a response body must be, once the status and headers are checked.
#[derive(Debug)]
pub enum BodyCheck {
    /// No body.
    Empty,
    /// JSON valid against the schema at this pointer.
    Json(String),
    /// Server-Sent Events.
    EventStream(EventStream),
}

/// Match `request` to its operation and validate it.
pub fn check_request(request: ApiRequest) -> Checked {
    let target = find_target(&request);
    let request_error = match &target {
        Target::Operation(op) => validate_request(op, &request).err(),
        Target::Outside(why) => Some(why.clone()),
    };
    Checked {
        request,
        target,
        request_error,
    }
}

/// Follow `$ref`s from `pointer`: the final pointer and value.
fn resolve(pointer: &str) -> Result<(String, &'static Value), String> {
    let mut pointer = pointer.to_string();
    for _ in 0..16 {
        let value = document()
            .at(&pointer)
            .ok_or_else(|| format!("nothing at {pointer} in {DOCUMENT_PATH}"))?;
        match value.get("$ref").and_then(Value::as_str) {
            Some(r) => pointer = r.trim_start_matches('#').to_string(),
            None => return Ok((pointer, value)),
        }
    }
    Err(format!("$ref loop at {pointer}"))
}

/// The path's segments from `v1/users` on (any prefix, e.g. an API Gateway
/// stage, is ignored as the router does).
fn api_segments(path: &str) -> Option<Vec<&str>> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let start = segments.windows(2).position(|w| w == ["v1", "users"])?;
    Some(segments[start..].to_vec())
}

/// The path parameters if `segments` fit `template`.
fn match_template(template: &str, segments: &[&str]) -> Option<BTreeMap<String, String>> {
    let parts: Vec<&str> = template.split('/').filter(|s| !s.is_empty()).collect();
    if parts.len() != segments.len() {
        return None;
    }
    let mut params = BTreeMap::new();
    for (part, seg) in parts.iter().zip(segments) {
        match part.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
            Some(name) => {
                params.insert(name.to_string(), seg.to_string());
            }
            None if part == seg => {}
            None => return None,
        }
    }
    Some(params)
}

fn find_target(request: &ApiRequest) -> Target {
    let Some(segments) = api_segments(&request.path) else {
        return Target::Outside(format!("{} is not under /v1/users/", request.path));
    };
    let paths = document().root()["paths"].as_object();
    let found = paths.into_iter().flatten().find_map(|(template, item)| {
        match_template(template, &segments).map(|params| (template, item, params))
    });
    let Some((template, item, params)) = found else {
        return Target::Outside(format!("no documented path matches {}", request.path));
    };
    let method = request.method.to_ascii_lowercase();
    let name = format!("{} {template}", request.method);
    let Some(op) = item.get(&method) else {
        return Target::Outside(format!("{name} is not documented"));
    };
    let served_by = op["x-agenthome-function"].as_str().unwrap_or_default();
    if served_by != request.function.name() {
        return Target::Outside(format!(
            "{name} is served by {served_by}, not {}",
            request.function.name()
        ));
    }
    let path_item = format!("/paths/{}", escape_pointer(template));
    Target::Operation(Operation {
        pointer: format!("{path_item}/{method}"),
        path_item,
        name,
        params,
    })
}

/// Decode `%XX` escapes; `None` if malformed or not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn validate_request(op: &Operation, request: &ApiRequest) -> Result<(), String> {
    validate_path_params(op)?;
    validate_request_body(op, request)
}

fn validate_path_params(op: &Operation) -> Result<(), String> {
    for base in [&op.path_item, &op.pointer] {
        let count = document()
            .at(&format!("{base}/parameters"))
            .and_then(Value::as_array)
            .map_or(0, Vec::len);
        for i in 0..count {
            let (pointer, param) = resolve(&format!("{base}/parameters/{i}"))?;
            if param["in"] != "path" {
                continue;
            }
            let name = param["name"].as_str().unwrap_or_default();
            let raw = op
                .params
                .get(name)
                .ok_or_else(|| format!("{}: no value for {{{name}}}", op.name))?;
            let value = percent_decode(raw)
                .ok_or_else(|| format!("{{{name}}} {raw:?} is not percent-encoded UTF-8"))?;
            document().validate_at(&format!("{pointer}/schema"), &json!(value))?;
        }
    }
    Ok(())
}

fn validate_request_body(op: &Operation, request: &ApiRequest) -> Result<(), String> {
    let Ok((pointer, body_doc)) = resolve(&format!("{}/requestBody", op.pointer)) else {
        return Ok(()); // no body documented: the function ignores one
    };
    let body = request.body.as_deref().unwrap_or_default();
    if body.iter().all(u8::is_ascii_whitespace) {
        return if body_doc["required"] == true {
            Err(format!("{}: the body is required", op.name))
        } else {
            Ok(())
        };
    }
    let media = media_type(&request.headers).unwrap_or_else(|| "application/json".into());
    if body_doc["content"].get(&media).is_none() {
        return Err(format!("{}: request content type {media:?}", op.name));
    }
    let json: Value = serde_json::from_slice(body)
        .map_err(|e| format!("{}: the body is not JSON: {e}", op.name))?;
    let schema = format!("{pointer}/content/{}/schema", escape_pointer(&media));
    document().validate_at(&schema, &json)
}

impl Checked {
    /// `METHOD path`, for messages.
    pub fn label(&self) -> String {
        format!("{} {}", self.request.method, self.request.path)
    }

    /// Why the document rejects the request, if it does.
    pub fn request_error(&self) -> Option<&str> {
        self.request_error.as_deref()
    }

    /// Check a whole response.
    pub fn check_response(
        &self,
        status: u16,
        headers: &Headers,
        body: &[u8],
    ) -> Result<(), String> {
        let check = self.check_head(status, headers)?;
        self.check_body(check, status, body)
    }

    /// [`Checked::check_response`], panicking with the exchange on a mismatch.
    pub fn assert_response(&self, status: u16, headers: &Headers, body: &[u8]) {
        if let Err(e) = self.check_response(status, headers, body) {
            panic!(
                "{} → {status} does not conform to {DOCUMENT_PATH}: {e}\nbody: {}",
                self.label(),
                String::from_utf8_lossy(body)
            );
        }
    }

    /// Check an API Gateway v2 response value (`statusCode`, `headers`,
    /// `body`), panicking on a mismatch.
    pub fn assert_apigw_response(&self, response: &Value) {
        use base64::Engine as _;
        let status = response["statusCode"].as_u64().unwrap_or(0) as u16;
        let headers = headers_from_json(&response["headers"]);
        let text = response["body"].as_str().unwrap_or_default();
        let body = if response["isBase64Encoded"] == true {
            base64::engine::general_purpose::STANDARD
                .decode(text)
                .unwrap_or_else(|e| panic!("a base64 response body that does not decode: {e}"))
        } else {
            text.as_bytes().to_vec()
        };
        self.assert_response(status, &headers, &body);
    }

    /// Check the status and headers; returns what the body must be.
    pub fn check_head(&self, status: u16, headers: &Headers) -> Result<BodyCheck, String> {
        let media = media_type(headers);
        let op = match &self.target {
            Target::Outside(why) => return outside_head(why, status, media.as_deref()),
            Target::Operation(op) => op,
        };
        if let Some(why) = &self.request_error {
            if !REJECTED_STATUSES.contains(&status) {
                return Err(format!(
                    "the document rejects the request ({why}) but the function answered {status}"
                ));
            }
        }
        let (resp_pointer, resp) = resolve(&format!("{}/responses/{status}", op.pointer))
            .map_err(|_| format!("{}: status {status} is not documented", op.name))?;
        check_headers(&resp_pointer, resp, headers)?;
        let Some(content) = resp.get("content").and_then(Value::as_object) else {
            return Ok(BodyCheck::Empty);
        };
        let media = media.unwrap_or_default();
        if !content.contains_key(&media) {
            return Err(format!(
                "{} {status}: content type {media:?} is not documented (documented: {:?})",
                op.name,
                content.keys().collect::<Vec<_>>()
            ));
        }
        let media_pointer = format!("{resp_pointer}/content/{}", escape_pointer(&media));
        if media == EVENT_STREAM {
            if !self.accepts(EVENT_STREAM) {
                return Err("an event stream the request did not ask for".into());
            }
            return EventStream::new(&media_pointer).map(BodyCheck::EventStream);
        }
        Ok(BodyCheck::Json(format!("{media_pointer}/schema")))
    }

    /// Check the body of a response whose head gave `check`.
    pub fn check_body(&self, check: BodyCheck, status: u16, body: &[u8]) -> Result<(), String> {
        match check {
            BodyCheck::Empty if body.is_empty() => Ok(()),
            BodyCheck::Empty => Err(format!("status {status} has no documented body")),
            BodyCheck::EventStream(mut events) => {
                events.feed(body)?;
                events.finish()
            }
            BodyCheck::Json(schema) => {
                let json: Value = serde_json::from_slice(body)
                    .map_err(|e| format!("the body is not JSON: {e}"))?;
                document().validate_at(&schema, &json)?;
                self.check_agreement(status, &json)
            }
        }
    }

    /// The request's `Accept` allows `media`.
    fn accepts(&self, media: &str) -> bool {
        self.request.headers.get("accept").is_some_and(|a| {
            a.split(',')
                .any(|t| t.trim().to_ascii_lowercase().starts_with(media))
        })
    }

    /// A request the document accepts is not refused as invalid (the other
    /// direction, a rejected request never succeeding, is checked on the
    /// status in [`Checked::check_head`]).
    fn check_agreement(&self, status: u16, body: &Value) -> Result<(), String> {
        let code = body["code"].as_str().unwrap_or_default();
        if self.request_error.is_none() && REQUEST_ERROR_CODES.contains(&code) {
            return Err(format!(
                "the document accepts the request but the function rejected it ({status} {code}: {})",
                body["detail"]
            ));
        }
        Ok(())
    }
}

/// The head of a response to a request outside the document.
fn outside_head(why: &str, status: u16, media: Option<&str>) -> Result<BodyCheck, String> {
    if !UNROUTED_STATUSES.contains(&status) {
        return Err(format!(
            "outside the document ({why}): expected 400/404/405, got {status}"
        ));
    }
    if media != Some("application/problem+json") {
        return Err(format!(
            "outside the document ({why}): not a problem ({media:?})"
        ));
    }
    Ok(BodyCheck::Json(PROBLEM_SCHEMA.into()))
}

/// `Retry-After` is the one header whose absence from the document is
/// checked too: a response must not ask for a retry the document does not
/// describe.
const CHECKED_HEADERS: &[&str] = &["retry-after"];

fn check_headers(resp_pointer: &str, resp: &Value, headers: &Headers) -> Result<(), String> {
    let declared: Vec<String> = resp
        .get("headers")
        .and_then(Value::as_object)
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    for name in CHECKED_HEADERS {
        if headers.contains_key(*name) && !declared.iter().any(|d| d.eq_ignore_ascii_case(name)) {
            return Err(format!(
                "header {name} is not documented for {resp_pointer}"
            ));
        }
    }
    for name in &declared {
        let (pointer, header) =
            resolve(&format!("{resp_pointer}/headers/{}", escape_pointer(name)))?;
        match headers.get(&name.to_ascii_lowercase()) {
            None if header["required"] == true => {
                return Err(format!("header {name} is required ({resp_pointer})"));
            }
            None => {}
            Some(value) => {
                let schema = format!("{pointer}/schema");
                let (_, resolved) = resolve(&schema)?;
                let instance = header_value(resolved, value);
                document()
                    .validate_at(&schema, &instance)
                    .map_err(|e| format!("header {name}: {value:?}: {e}"))?;
            }
        }
    }
    Ok(())
}

/// A header's text as the JSON its schema describes (simple style).
fn header_value(schema: &Value, text: &str) -> Value {
    match schema["type"].as_str() {
        Some("integer") | Some("number") => text
            .trim()
            .parse::<i64>()
            .map(Value::from)
            .unwrap_or_else(|_| Value::String(text.to_string())),
        _ => Value::String(text.to_string()),
    }
}

/// Checks a Server-Sent Events body against its media type's
/// `x-itemSchema` (a `oneOf` of `{event, data}` objects, one per event
/// name) and `x-final-events`.
#[derive(Debug)]
pub struct EventStream {
    /// Event name → pointer of its `{event, data}` schema.
    events: BTreeMap<String, String>,
    finals: Vec<String>,
    buf: Vec<u8>,
    ended: Option<String>,
    seen: usize,
}

impl EventStream {
    /// The checker for the media type at `media_pointer`.
    pub fn new(media_pointer: &str) -> Result<Self, String> {
        let (_, media) = resolve(media_pointer)?;
        let (item_pointer, item) = resolve(&format!("{media_pointer}/x-itemSchema"))?;
        let branches = item["oneOf"]
            .as_array()
            .ok_or_else(|| format!("{item_pointer}: a oneOf of events"))?;
        let mut events = BTreeMap::new();
        for i in 0..branches.len() {
            let pointer = format!("{item_pointer}/oneOf/{i}");
            let (_, resolved) = resolve(&pointer)?;
            let name = resolved["properties"]["event"]["const"]
                .as_str()
                .ok_or_else(|| format!("{pointer}: properties.event.const names the event"))?;
            events.insert(name.to_string(), pointer);
        }
        let finals = media["x-final-events"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default();
        Ok(EventStream {
            events,
            finals,
            buf: Vec::new(),
            ended: None,
            seen: 0,
        })
    }

    /// Events checked so far.
    pub fn seen(&self) -> usize {
        self.seen
    }

    /// Take the next chunk of the body; checks every complete event.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<(), String> {
        self.buf.extend_from_slice(chunk);
        while let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
            let block: Vec<u8> = self.buf.drain(..end + 2).collect();
            let text = std::str::from_utf8(&block[..end])
                .map_err(|e| format!("an event that is not UTF-8: {e}"))?;
            self.block(text)?;
        }
        Ok(())
    }

    fn block(&mut self, block: &str) -> Result<(), String> {
        let mut name = None;
        let mut data = None;
        for line in block.lines() {
            if line.starts_with(':') {
                continue; // a comment (keep-alive)
            } else if let Some(n) = line.strip_prefix("event: ") {
                name = Some(n.to_string());
            } else if let Some(d) = line.strip_prefix("data: ") {
                if data.is_some() {
                    return Err(format!("more than one data line: {block:?}"));
                }
                let json: Value = serde_json::from_str(d)
                    .map_err(|e| format!("data that is not JSON ({e}): {block:?}"))?;
                data = Some(json);
            } else {
                return Err(format!("an undocumented line {line:?} in {block:?}"));
            }
        }
        let (name, data) = match (name, data) {
            (None, None) => return Ok(()),
            (Some(n), Some(d)) => (n, d),
            _ => return Err(format!("an event needs `event:` and `data:`: {block:?}")),
        };
        if let Some(last) = &self.ended {
            return Err(format!("event {name:?} after the final {last:?}"));
        }
        let pointer = self
            .events
            .get(&name)
            .ok_or_else(|| format!("event {name:?} is not documented"))?;
        document()
            .validate_at(pointer, &json!({"event": name, "data": data}))
            .map_err(|e| format!("event {name:?}: {e}"))?;
        self.seen += 1;
        if self.finals.contains(&name) {
            self.ended = Some(name);
        }
        Ok(())
    }

    /// The body ended: no partial event, and the last event was final.
    pub fn finish(&self) -> Result<(), String> {
        if !self.buf.is_empty() {
            return Err(format!(
                "the stream ended inside an event: {:?}",
                String::from_utf8_lossy(&self.buf)
            ));
        }
        match &self.ended {
            Some(_) => Ok(()),
            None => Err(format!(
                "the stream ended without a final event ({:?})",
                self.finals
            )),
        }
    }
}

/// `stream`'s chunks, unchanged, each fed to `events` as it passes; panics
/// (failing the test reading it) on the first event that does not conform,
/// or at the end if the stream ended early.
pub fn validated_stream<S, B>(
    stream: S,
    events: EventStream,
    label: String,
) -> impl futures_util::Stream<Item = B>
where
    S: futures_util::Stream<Item = B> + Unpin,
    B: AsRef<[u8]>,
{
    use futures_util::StreamExt as _;
    futures_util::stream::unfold(
        (stream, events, label),
        |(mut stream, mut events, label)| async move {
            match stream.next().await {
                Some(chunk) => {
                    if let Err(e) = events.feed(chunk.as_ref()) {
                        panic!(
                            "{label}: the event stream does not conform to {DOCUMENT_PATH}: {e}"
                        );
                    }
                    Some((chunk, (stream, events, label)))
                }
                None => {
                    if let Err(e) = events.finish() {
                        panic!(
                            "{label}: the event stream does not conform to {DOCUMENT_PATH}: {e}"
                        );
                    }
                    None
                }
            }
        },
    )
}

//! Validation of response bodies against the vendored official Dedalus
//! Machines OpenAPI spec (`spec/machines-openapi.json`).
//!
//! The spec is JSON Schema 2020-12 inside OpenAPI 3.1: a response schema is
//! validated by compiling the whole document with a root `$ref` pointing at
//! the response's schema, so every internal `$ref` resolves as written.

use crate::schema::{escape_pointer, Document};
use serde_json::Value;
use std::sync::OnceLock;

/// Fields the newer SDKs added after the spec snapshot (docs/compatibility.md): allowed in
/// machine responses although the spec's schemas forbid extra properties.
pub const NEWER_MACHINE_FIELDS: &[&str] = &["autosleep_seconds", "phase"];

fn document() -> &'static Document {
    static DOC: OnceLock<Document> = OnceLock::new();
    DOC.get_or_init(|| {
        let path = crate::workspace_root().join("spec/machines-openapi.json");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        Document::new(serde_json::from_str(&text).expect("spec is JSON"))
    })
}

fn validate_at(pointer: &str, instance: &Value) -> Result<(), String> {
    document().validate_at(pointer, instance)
}

/// Remove the newer machine fields docs/compatibility.md lists, wherever a machine object
/// appears (top level, `items[]`).
pub fn strip_newer_fields(body: &Value) -> Value {
    let mut body = body.clone();
    fn strip(obj: &mut Value) {
        if let Some(map) = obj.as_object_mut() {
            if map.contains_key("machine_id") && map.contains_key("desired_state") {
                for f in NEWER_MACHINE_FIELDS {
                    map.remove(*f);
                }
            }
        }
    }
    strip(&mut body);
    if let Some(items) = body.get_mut("items").and_then(Value::as_array_mut) {
        items.iter_mut().for_each(strip);
    }
    body
}

/// Validate `body`, the response of `method path_template` with `status` and
/// `content_type`, against the spec (after [`strip_newer_fields`]).
pub fn validate_response(
    method: &str,
    path_template: &str,
    status: u16,
    content_type: &str,
    body: &Value,
) -> Result<(), String> {
    let method = method.to_ascii_lowercase();
    let op = &document().root()["paths"][path_template][&method];
    if op.is_null() {
        return Err(format!("no operation {method} {path_template} in the spec"));
    }
    let status_key = if op["responses"][status.to_string()].is_null() {
        "default".to_string()
    } else {
        status.to_string()
    };
    let content = &op["responses"][&status_key]["content"];
    let media = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_string();
    if content[&media].is_null() {
        return Err(format!(
            "{method} {path_template} {status}: content type {media:?} not in spec (has {:?})",
            content
                .as_object()
                .map(|m| m.keys().cloned().collect::<Vec<_>>())
        ));
    }
    let pointer = format!(
        "/paths/{}/{method}/responses/{status_key}/content/{}/schema",
        escape_pointer(path_template),
        escape_pointer(&media)
    );
    validate_at(&pointer, &strip_newer_fields(body))
}

/// Validate a component schema by name (e.g. a terminal WebSocket frame
/// against `TerminalServerEvent`).
pub fn validate_component(name: &str, instance: &Value) -> Result<(), String> {
    validate_at(&format!("/components/schemas/{name}"), instance)
}

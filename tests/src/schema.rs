//! Validation against a schema inside an OpenAPI 3.1 document (JSON Schema
//! 2020-12): the whole document is compiled with a root `$ref` pointing at
//! the schema, so every internal `$ref` resolves as written. Used for the
//! vendored Dedalus spec ([`crate::spec`]) and for agenthome's own API
//! document ([`crate::openapi`]).

use serde_json::Value;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

/// An OpenAPI document whose schemas instances are validated against.
pub struct Document {
    root: Value,
    compiled: Mutex<HashMap<String, Arc<jsonschema::Validator>>>,
}

/// One JSON-pointer segment, escaped (RFC 6901) and made URI-fragment safe.
pub fn escape_pointer(segment: &str) -> String {
    segment
        .replace('~', "~0")
        .replace('/', "~1")
        .replace('{', "%7B")
        .replace('}', "%7D")
}

impl Document {
    /// A document from its parsed JSON.
    pub fn new(root: Value) -> Self {
        Document {
            root,
            compiled: Mutex::new(HashMap::new()),
        }
    }

    /// The whole document.
    pub fn root(&self) -> &Value {
        &self.root
    }

    /// The value at `pointer` (`#`-less JSON pointer, escaped as
    /// [`escape_pointer`] does), if any.
    pub fn at(&self, pointer: &str) -> Option<&Value> {
        self.root
            .pointer(&pointer.replace("%7B", "{").replace("%7D", "}"))
    }

    fn validator(&self, pointer: &str) -> Result<Arc<jsonschema::Validator>, String> {
        let mut compiled = self.compiled.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(v) = compiled.get(pointer) {
            return Ok(Arc::clone(v));
        }
        let mut schema = self.root.clone();
        schema["$ref"] = Value::String(format!("#{pointer}"));
        let validator = Arc::new(
            jsonschema::validator_for(&schema).map_err(|e| format!("schema {pointer}: {e}"))?,
        );
        compiled.insert(pointer.to_string(), Arc::clone(&validator));
        Ok(validator)
    }

    /// Validate `instance` against the schema at `pointer`; the error lists
    /// every violation with its location in the instance.
    pub fn validate_at(&self, pointer: &str, instance: &Value) -> Result<(), String> {
        let validator = self.validator(pointer)?;
        let errors: Vec<String> = validator
            .iter_errors(instance)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(format!("{pointer}: {}", errors.join("; ")))
        }
    }
}

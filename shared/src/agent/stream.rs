//! Streamed chat completions (`"stream": true`): the OpenAI wire format is
//! Server-Sent Events whose `data:` lines are JSON chunks
//! `{"choices": [{"delta": {"content"?, "tool_calls"?}}], "usage"?}`, ended
//! by `data: [DONE]`. [`SseLines`] splits the byte stream into `data:`
//! payloads; [`StreamAccumulator`] assembles the chunks into one
//! [`Completion`]: the text deltas in order, and each tool call from its
//! fragments, keyed by its `index` (so parallel calls stay apart).

use std::collections::BTreeMap;

use serde_json::Value;

use super::llm::{Completion, FunctionCall, LlmError, TokenUsage, ToolCall};

/// Longest SSE line accepted (a chunk's JSON); longer is a malformed stream.
const MAX_LINE: usize = 1 << 20;
/// Most bytes read from one completion stream.
const MAX_STREAM: usize = 16 << 20;

/// Splits a Server-Sent Events byte stream into the payloads of its `data:`
/// lines (comments, `event:` and other fields are skipped).
#[derive(Debug, Default)]
pub(super) struct SseLines {
    buf: Vec<u8>,
    total: usize,
}

impl SseLines {
    /// Adds bytes; returns the complete `data:` payloads they finish.
    pub(super) fn push(&mut self, bytes: &[u8]) -> Result<Vec<String>, LlmError> {
        self.total += bytes.len();
        if self.total > MAX_STREAM {
            return Err(LlmError::MalformedResponse(format!(
                "the completion stream exceeds {MAX_STREAM} bytes"
            )));
        }
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        let mut start = 0;
        while let Some(nl) = self.buf[start..].iter().position(|&b| b == b'\n') {
            let line = String::from_utf8_lossy(&self.buf[start..start + nl]);
            let line = line.trim_end_matches('\r');
            if let Some(data) = line.strip_prefix("data:") {
                out.push(data.strip_prefix(' ').unwrap_or(data).to_owned());
            }
            start += nl + 1;
        }
        self.buf.drain(..start);
        if self.buf.len() > MAX_LINE {
            return Err(LlmError::MalformedResponse(
                "a line of the completion stream is too long".into(),
            ));
        }
        Ok(out)
    }
}

/// A tool call being assembled from its fragments.
#[derive(Debug, Default)]
struct PartialCall {
    id: String,
    name: String,
    arguments: String,
}

/// Assembles streamed chunks into one completion.
#[derive(Debug, Default)]
pub(super) struct StreamAccumulator {
    content: String,
    saw_content: bool,
    calls: BTreeMap<u64, PartialCall>,
    usage: TokenUsage,
    finished: bool,
}

impl StreamAccumulator {
    /// Takes one chunk (the JSON of a `data:` line); returns its text delta.
    pub(super) fn feed(&mut self, data: &str) -> Result<Option<String>, LlmError> {
        let chunk: Value = serde_json::from_str(data).map_err(|e| {
            LlmError::MalformedResponse(format!("a stream chunk is not JSON ({e})"))
        })?;
        if let Some(err) = chunk.get("error") {
            let message = err
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("no message");
            return Err(LlmError::MalformedResponse(format!(
                "the stream reported an error: {}",
                message.chars().take(300).collect::<String>()
            )));
        }
        if let Some(u) = chunk.get("usage").filter(|u| u.is_object()) {
            self.usage = TokenUsage {
                prompt_tokens: u["prompt_tokens"].as_u64().unwrap_or(0),
                completion_tokens: u["completion_tokens"].as_u64().unwrap_or(0),
            };
        }
        let Some(choice) = chunk["choices"].as_array().and_then(|c| c.first()) else {
            return Ok(None); // the usage chunk has no choices
        };
        if choice["finish_reason"].is_string() {
            self.finished = true;
        }
        let delta = &choice["delta"];
        if let Some(fragments) = delta["tool_calls"].as_array() {
            for (position, fragment) in fragments.iter().enumerate() {
                self.tool_fragment(position, fragment);
            }
        }
        match delta["content"].as_str() {
            Some(text) if !text.is_empty() => {
                self.saw_content = true;
                self.content.push_str(text);
                Ok(Some(text.to_owned()))
            }
            _ => Ok(None),
        }
    }

    /// Merges one tool-call fragment: the first carries `id` and the name,
    /// later ones pieces of `arguments`.
    fn tool_fragment(&mut self, position: usize, fragment: &Value) {
        let index = fragment["index"].as_u64().unwrap_or(position as u64);
        let call = self.calls.entry(index).or_default();
        if let Some(id) = fragment["id"].as_str().filter(|s| !s.is_empty()) {
            call.id = id.to_owned();
        }
        let function = &fragment["function"];
        if let Some(name) = function["name"].as_str() {
            // Some servers repeat the whole name in every fragment.
            if call.name != name {
                call.name.push_str(name);
            }
        }
        match &function["arguments"] {
            Value::String(piece) => call.arguments.push_str(piece),
            Value::Null => {}
            other => call.arguments.push_str(&other.to_string()),
        }
    }

    /// The completion, once the stream ended with `[DONE]` (`done`) or a
    /// `finish_reason`.
    pub(super) fn finish(self, done: bool) -> Result<Completion, LlmError> {
        if !done && !self.finished {
            return Err(LlmError::MalformedResponse(
                "the completion stream ended before it finished".into(),
            ));
        }
        let tool_calls = self
            .calls
            .into_values()
            .map(|c| ToolCall {
                id: c.id,
                kind: "function".to_owned(),
                function: FunctionCall {
                    name: c.name,
                    arguments: c.arguments,
                },
            })
            .collect();
        Ok(Completion {
            content: self.saw_content.then_some(self.content),
            tool_calls,
            usage: self.usage,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn chunk(delta: Value) -> String {
        json!({"choices": [{"index": 0, "delta": delta, "finish_reason": null}]}).to_string()
    }

    #[test]
    fn sse_lines_split_across_reads() {
        let mut sse = SseLines::default();
        assert!(sse.push(b": keep-alive\n\nda").unwrap().is_empty());
        assert_eq!(
            sse.push(b"ta: {\"a\":1}\r\n\ndata:[DONE]\n").unwrap(),
            [r#"{"a":1}"#, "[DONE]"]
        );
    }

    #[test]
    fn text_deltas_are_returned_in_order_and_joined() {
        let mut acc = StreamAccumulator::default();
        assert_eq!(
            acc.feed(&chunk(json!({"role": "assistant", "content": ""})))
                .unwrap(),
            None
        );
        assert_eq!(
            acc.feed(&chunk(json!({"content": "Hel"})))
                .unwrap()
                .as_deref(),
            Some("Hel")
        );
        assert_eq!(
            acc.feed(&chunk(json!({"content": "lo"})))
                .unwrap()
                .as_deref(),
            Some("lo")
        );
        acc.feed(
            &json!({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2}})
                .to_string(),
        )
        .unwrap();
        let c = acc.finish(true).unwrap();
        assert_eq!(c.content.as_deref(), Some("Hello"));
        assert!(c.tool_calls.is_empty());
        assert_eq!(
            c.usage,
            TokenUsage {
                prompt_tokens: 7,
                completion_tokens: 2
            }
        );
    }

    #[test]
    fn parallel_tool_calls_are_assembled_from_interleaved_fragments() {
        let mut acc = StreamAccumulator::default();
        for delta in [
            json!({"tool_calls": [{"index": 0, "id": "a", "type": "function", "function": {"name": "run_command", "arguments": ""}}]}),
            json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"comm"}}]}),
            json!({"tool_calls": [{"index": 1, "id": "b", "type": "function", "function": {"name": "run_command", "arguments": "{\"command\""}}]}),
            json!({"tool_calls": [{"index": 0, "function": {"arguments": "and\":\"ls\"}"}}]}),
            json!({"tool_calls": [{"index": 1, "function": {"arguments": ":\"pwd\"}"}}]}),
        ] {
            assert_eq!(acc.feed(&chunk(delta)).unwrap(), None);
        }
        let c = acc.finish(true).unwrap();
        assert_eq!(c.content, None);
        let calls: Vec<_> = c
            .tool_calls
            .iter()
            .map(|t| {
                (
                    t.id.as_str(),
                    t.function.name.as_str(),
                    t.function.arguments.as_str(),
                )
            })
            .collect();
        assert_eq!(
            calls,
            [
                ("a", "run_command", r#"{"command":"ls"}"#),
                ("b", "run_command", r#"{"command":"pwd"}"#)
            ]
        );
    }

    #[test]
    fn broken_streams_are_errors() {
        let mut acc = StreamAccumulator::default();
        acc.feed(&chunk(json!({"content": "half"}))).unwrap();
        assert!(matches!(
            acc.finish(false),
            Err(LlmError::MalformedResponse(_))
        ));
        let mut acc = StreamAccumulator::default();
        assert!(acc.feed("{not json").is_err());
        assert!(acc.feed(r#"{"error": {"message": "overloaded"}}"#).is_err());
        let mut sse = SseLines::default();
        assert!(sse.push(&vec![b'x'; MAX_LINE + 1]).is_err());
        let mut sse = SseLines::default();
        let line = vec![b'\n'; MAX_LINE];
        for _ in 0..MAX_STREAM / MAX_LINE {
            assert!(sse.push(&line).is_ok());
        }
        assert!(sse.push(b"\n").is_err(), "the stream's total is capped");
    }
}

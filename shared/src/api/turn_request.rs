//! The body of `POST /v1/users/{user_id}/turns`, parsed and validated once.

use super::{Problem, ProblemCode};
use serde::{Deserialize, Serialize};

/// Longest accepted message, in bytes.
pub const MAX_MESSAGE_BYTES: usize = 32 * 1024;
/// Most history entries accepted.
pub const MAX_HISTORY_ENTRIES: usize = 50;
/// Largest accepted history, in bytes of content.
pub const MAX_HISTORY_BYTES: usize = 256 * 1024;
/// Largest accepted request body (message + history + JSON overhead).
pub const MAX_BODY_BYTES: usize = MAX_MESSAGE_BYTES + MAX_HISTORY_BYTES + 64 * 1024;

/// Who said a history entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The user.
    User,
    /// The assistant (the agent's earlier replies).
    Assistant,
}

/// One entry of the chat product's recent conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryEntry {
    /// Who said it.
    pub role: Role,
    /// What was said.
    pub content: String,
}

/// The raw body, as sent.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTurnRequest {
    message: String,
    #[serde(default)]
    history: Option<Vec<HistoryEntry>>,
    /// Must be a boolean when present (`null`, strings, numbers → 422).
    #[serde(default)]
    end_conversation: bool,
}

/// A validated turn request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TurnRequest {
    /// The user's new message (1 byte to 32 KiB).
    pub message: String,
    /// Recent conversation, oldest first (≤ 50 entries, ≤ 256 KiB).
    pub history: Vec<HistoryEntry>,
    /// The chat product says the conversation ends with this turn: after
    /// the reply the machine is put to sleep at once (or as soon as the
    /// platform allows; a command left running still holds it awake).
    pub end_conversation: bool,
}

impl TurnRequest {
    /// Parse a JSON body: unknown fields, an empty or oversized message, or
    /// an oversized history are 4xx problems naming the limit.
    pub fn from_json(bytes: &[u8]) -> Result<Self, Problem> {
        let raw: RawTurnRequest = serde_json::from_slice(bytes)?;
        let mut request = Self::validate(raw.message, raw.history.unwrap_or_default())?;
        request.end_conversation = raw.end_conversation;
        Ok(request)
    }

    /// Validate the parts.
    pub fn validate(message: String, history: Vec<HistoryEntry>) -> Result<Self, Problem> {
        if message.trim().is_empty() {
            return Err(Problem::of(
                ProblemCode::InvalidMessage,
                "message must not be empty",
            ));
        }
        if message.len() > MAX_MESSAGE_BYTES {
            return Err(Problem::of(
                ProblemCode::PayloadTooLarge,
                format!(
                    "message is {} bytes; at most {MAX_MESSAGE_BYTES} are accepted",
                    message.len()
                ),
            ));
        }
        if history.len() > MAX_HISTORY_ENTRIES {
            return Err(Problem::of(
                ProblemCode::InvalidHistory,
                format!(
                    "history has {} entries; at most {MAX_HISTORY_ENTRIES} are accepted",
                    history.len()
                ),
            ));
        }
        let bytes: usize = history.iter().map(|h| h.content.len()).sum();
        if bytes > MAX_HISTORY_BYTES {
            return Err(Problem::of(
                ProblemCode::PayloadTooLarge,
                format!("history is {bytes} bytes; at most {MAX_HISTORY_BYTES} are accepted"),
            ));
        }
        Ok(TurnRequest {
            message,
            history,
            end_conversation: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_with_optional_history_parses() {
        let t = TurnRequest::from_json(
            br#"{"message":"ls","history":[{"role":"user","content":"hi"}]}"#,
        )
        .expect("valid");
        assert_eq!(t.message, "ls");
        assert_eq!(t.history[0].role, Role::User);
        let plain = TurnRequest::from_json(br#"{"message":"ls"}"#).expect("valid");
        assert!(plain.history.is_empty());
        assert!(!plain.end_conversation);
        let last =
            TurnRequest::from_json(br#"{"message":"bye","end_conversation":true}"#).expect("valid");
        assert!(last.end_conversation);
    }

    #[test]
    fn bad_bodies_are_4xx_with_a_reason() {
        let cases: [(&[u8], u16, &str); 11] = [
            (
                br#"{"message":"x","end_conversation":"yes"}"#,
                422,
                "invalid_body",
            ),
            (
                br#"{"message":"x","end_conversation":1}"#,
                422,
                "invalid_body",
            ),
            (
                br#"{"message":"x","end_conversation":null}"#,
                422,
                "invalid_body",
            ),
            (
                br#"{"message":"x","end_conversation":{}}"#,
                422,
                "invalid_body",
            ),
            (b"{", 400, "invalid_json"),
            (b"[]", 422, "invalid_body"),
            (br#"{"message":""}"#, 422, "invalid_message"),
            (br#"{"message":"x","extra":1}"#, 422, "invalid_body"),
            (br#"{"message":1}"#, 422, "invalid_body"),
            (br#"{"history":[]}"#, 422, "invalid_body"),
            (
                br#"{"message":"x","history":[{"role":"system","content":"x"}]}"#,
                422,
                "invalid_body",
            ),
        ];
        for (body, status, code) in cases {
            let p = TurnRequest::from_json(body).expect_err("must be refused");
            assert_eq!(
                (p.status, p.code.as_str()),
                (status, code),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn limits_are_enforced() {
        let big = "x".repeat(MAX_MESSAGE_BYTES + 1);
        assert_eq!(TurnRequest::validate(big, vec![]).unwrap_err().status, 413);
        let many = vec![
            HistoryEntry {
                role: Role::User,
                content: "x".into()
            };
            MAX_HISTORY_ENTRIES + 1
        ];
        assert_eq!(
            TurnRequest::validate("x".into(), many).unwrap_err().status,
            422
        );
        let heavy = vec![HistoryEntry {
            role: Role::Assistant,
            content: "x".repeat(MAX_HISTORY_BYTES + 1),
        }];
        assert_eq!(
            TurnRequest::validate("x".into(), heavy).unwrap_err().status,
            413
        );
        assert!(TurnRequest::validate("x".repeat(MAX_MESSAGE_BYTES), vec![]).is_ok());
    }
}

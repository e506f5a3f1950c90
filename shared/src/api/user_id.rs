//! The `{user_id}` path parameter, parsed once. The alphabet covers the
//! `sub` claims identity providers issue (`auth0|…`, `google-oauth2|…`,
//! `user@example.com`, `urn:…:…`, Cognito UUIDs) and nothing a path, a
//! shell or a log line could misread: no `/`, whitespace, quotes, `%`,
//! `#` or control characters. The id is only ever a DynamoDB key value and
//! a percent-encoded path segment; it never reaches a machine or a shell.

use std::fmt;

/// A validated user id: `^[A-Za-z0-9][A-Za-z0-9._@|:-]{0,127}$`.
///
/// Parsed once where it enters (the route's path parameter, the provision
/// event, an item decoded from the table) and carried as this type through
/// the domain; it becomes a plain string again only on the wire (a DynamoDB
/// attribute value, a JSON field, a log field). In JSON it is a string, and
/// deserializing validates it.
#[derive(
    Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct UserId(String);

/// Why a string is not a [`UserId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserIdError {
    /// Empty string.
    #[error("user_id is empty")]
    Empty,
    /// More than 128 bytes.
    #[error("user_id is {0} bytes long; at most 128 are allowed")]
    TooLong(usize),
    /// First character not a letter or digit.
    #[error("user_id must start with a letter or digit")]
    BadStart,
    /// A character outside `A-Za-z0-9._@|:-`.
    #[error("user_id contains {0:?}; allowed are letters, digits and . _ @ | : -")]
    BadChar(char),
}

impl UserId {
    /// Longest accepted id, in bytes.
    pub const MAX_LEN: usize = 128;

    /// Parse and validate.
    pub fn parse(raw: &str) -> Result<Self, UserIdError> {
        let first = raw.chars().next().ok_or(UserIdError::Empty)?;
        if raw.len() > Self::MAX_LEN {
            return Err(UserIdError::TooLong(raw.len()));
        }
        if !first.is_ascii_alphanumeric() {
            return Err(UserIdError::BadStart);
        }
        if let Some(bad) = raw.chars().find(|c| {
            !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '@' | '|' | ':' | '-'))
        }) {
            return Err(UserIdError::BadChar(bad));
        }
        Ok(UserId(raw.to_string()))
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The id as an owned string (for a wire value).
    pub fn into_string(self) -> String {
        self.0
    }
}

impl TryFrom<String> for UserId {
    type Error = UserIdError;

    fn try_from(raw: String) -> Result<Self, UserIdError> {
        Self::parse(&raw)
    }
}

impl From<UserId> for String {
    fn from(user: UserId) -> Self {
        user.0
    }
}

/// A user id for a unit test: an invalid one fails the test at once.
#[cfg(test)]
pub(crate) fn uid(raw: &str) -> UserId {
    UserId::parse(raw).expect("a valid test user id")
}

/// Unit tests name users by literal (`store.get(&"u1".into())`); a literal
/// that is not a valid id fails the test at once.
#[cfg(test)]
impl From<&'static str> for UserId {
    fn from(raw: &'static str) -> Self {
        Self::parse(raw).expect("a valid test user id")
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl PartialEq<str> for UserId {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<String> for UserId {
    fn eq(&self, other: &String) -> bool {
        &self.0 == other
    }
}

impl PartialEq<&str> for UserId {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl AsRef<str> for UserId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_documented_alphabet() {
        for ok in [
            "a",
            "A9",
            "user@example.com",
            "u_1.2-3",
            "auth0|5f7c8ec7c33c6c004bbafe82",
            "google-oauth2|104917340458512345678",
            "urn:example:user:42",
            "0b1c2d3e-aaaa-bbbb-cccc-1234567890ab",
            &"x".repeat(128),
        ] {
            assert_eq!(UserId::parse(ok).map(|u| u.0), Ok(ok.to_string()));
        }
    }

    #[test]
    fn given_json_when_deserialized_then_the_id_is_validated_and_written_back_as_a_string() {
        let user: UserId = serde_json::from_str(r#""auth0|42""#).expect("valid");
        assert_eq!(user, "auth0|42");
        assert_eq!(serde_json::to_string(&user).expect("json"), r#""auth0|42""#);
        let bad = serde_json::from_str::<UserId>(r#""a/b""#).expect_err("invalid");
        assert!(bad.to_string().contains("'/'"), "{bad}");
    }

    #[test]
    fn rejects_everything_else_with_a_reason() {
        assert_eq!(UserId::parse(""), Err(UserIdError::Empty));
        assert_eq!(
            UserId::parse(&"x".repeat(129)),
            Err(UserIdError::TooLong(129))
        );
        assert_eq!(UserId::parse("-a"), Err(UserIdError::BadStart));
        assert_eq!(UserId::parse(".a"), Err(UserIdError::BadStart));
        assert_eq!(UserId::parse("a/b"), Err(UserIdError::BadChar('/')));
        assert_eq!(UserId::parse("a b"), Err(UserIdError::BadChar(' ')));
        assert_eq!(UserId::parse("é"), Err(UserIdError::BadStart));
        assert_eq!(UserId::parse("a\u{0}"), Err(UserIdError::BadChar('\u{0}')));
        for (raw, bad) in [
            ("a;b", ';'),
            ("a$b", '$'),
            ("a`b", '`'),
            ("a'b", '\''),
            ("a%2Fb", '%'),
            ("a#b", '#'),
            ("a\\b", '\\'),
        ] {
            assert_eq!(UserId::parse(raw), Err(UserIdError::BadChar(bad)), "{raw}");
        }
        assert_eq!(UserId::parse("|a"), Err(UserIdError::BadStart));
    }
}

//! Client configuration: base URL, API key, timeouts and retry policy.

use std::fmt;
use std::time::Duration;

use url::Url;

use super::retry::RetryPolicy;

/// A Dedalus API key. Its `Debug` and `Display` print `***`, so it can sit in
/// structs that get logged without leaking.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    /// Wraps a raw key.
    pub fn new(key: impl Into<String>) -> Self {
        Self(key.into())
    }

    /// The raw key, for building the `Authorization` header. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for ApiKey {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl From<&str> for ApiKey {
    fn from(value: &str) -> Self {
        Self(value.to_owned())
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// The default per-attempt request timeout (the official SDKs use 60 s).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// The default TCP/TLS connect timeout.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How to reach and talk to the Dedalus Machines API.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// API root, e.g. `https://dcs.dedaluslabs.ai` (a path prefix is kept).
    pub base_url: Url,
    /// Sent as `Authorization: Bearer` (only).
    pub api_key: ApiKey,
    /// Timeout of one HTTP attempt (also bounded by the call's deadline).
    pub request_timeout: Duration,
    /// TCP/TLS connect timeout of one attempt.
    pub connect_timeout: Duration,
    /// Retry policy applied to every call.
    pub retry: RetryPolicy,
    /// Optional `X-Dedalus-Org-Id` header.
    pub org_id: Option<String>,
}

impl ClientConfig {
    /// A configuration with the defaults: 60 s request timeout, default retry
    /// policy, no organisation header.
    pub fn new(base_url: Url, api_key: ApiKey) -> Self {
        Self {
            base_url,
            api_key,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            retry: RetryPolicy::default(),
            org_id: None,
        }
    }

    /// Replaces the retry policy.
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Replaces the per-attempt request timeout.
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_key_never_prints() {
        let key = ApiKey::new("sk-secret-value");
        assert_eq!(format!("{key}"), "***");
        assert_eq!(format!("{key:?}"), "***");
        let cfg = ClientConfig::new(Url::parse("http://127.0.0.1:1").expect("url"), key.clone());
        assert!(!format!("{cfg:?}").contains("secret"));
        assert_eq!(key.expose(), "sk-secret-value");
    }
}

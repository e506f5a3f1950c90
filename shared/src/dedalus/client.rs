//! The `Client` handle and the one place where HTTP calls are made: URL
//! building, headers, idempotency keys, per-attempt timeouts, decoding and
//! the retry loop.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, ETAG, IF_MATCH};
use http::Method;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::time::Instant;
use tracing::Instrument;
use url::Url;

use super::config::ClientConfig;
use super::error::{ApiError, Error, Result};
use super::idempotency::IdempotencyKey;
use super::retry::{self, RetryPolicy};

const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
const X_ORG_ID: HeaderName = HeaderName::from_static("x-dedalus-org-id");

/// How long an idle pooled connection is kept. The client (and its pool)
/// is built once per Lambda instance, so warm invocations reuse the
/// connections of earlier ones (no TCP/TLS handshake before the status
/// read); a connection idle longer — e.g. across a frozen instance — is
/// dropped rather than tried, as load balancers in front of APIs commonly
/// close idle connections after about a minute.
///
/// The terminal's WebSocket is not kept across invocations: a frozen
/// instance answers no pings (the stream is dropped), the next turn may run
/// on another instance (the lease, not the instance, owns the machine), and
/// the warm path opens it in parallel with the status read, so it costs no
/// extra round trip.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(50);

/// Typed async client of the Dedalus Machines API. Cheap to clone: clones
/// share one connection pool.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    config: ClientConfig,
    /// Auth and org headers, marked sensitive.
    auth_headers: HeaderMap,
    /// Absolute cap on every call's deadline (see [`Client::with_deadline`]).
    deadline: Option<Instant>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base_url", &self.inner.config.base_url.as_str())
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Builds the client (one `reqwest::Client`, rustls).
    pub fn new(config: ClientConfig) -> Result<Self> {
        if config.base_url.cannot_be_a_base() {
            return Err(Error::Config(format!(
                "base URL {} cannot be a base",
                config.base_url
            )));
        }
        crate::net::require_secure(&config.base_url)
            .map_err(|e| Error::Config(format!("base URL {}: {e}", config.base_url)))?;
        let mut auth_headers = HeaderMap::new();
        let mut bearer = HeaderValue::from_str(&format!("Bearer {}", config.api_key.expose()))
            .map_err(|_| Error::Config("API key is not a valid header value".into()))?;
        bearer.set_sensitive(true);
        // One header only: `x-api-key` is not a header HTTP clients treat as
        // a credential (nothing strips or masks it), so it is never sent.
        auth_headers.insert(AUTHORIZATION, bearer);
        if let Some(org) = &config.org_id {
            let v = HeaderValue::from_str(org)
                .map_err(|_| Error::Config("org id is not a valid header value".into()))?;
            auth_headers.insert(X_ORG_ID, v);
        }
        let http = crate::net::client_builder(config.connect_timeout)
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .build()
            .map_err(|source| Error::Transport {
                operation: "client.build",
                source,
            })?;
        Ok(Self {
            inner: Arc::new(Inner {
                http,
                config,
                auth_headers,
                deadline: None,
            }),
        })
    }

    /// The configuration this client was built with.
    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// A client sharing this one's connection pool with another retry
    /// policy (e.g. a shorter call deadline inside a turn).
    pub fn with_retry(&self, retry: RetryPolicy) -> Client {
        let mut config = self.inner.config.clone();
        config.retry = retry;
        self.derive(config, self.inner.deadline)
    }

    /// A client sharing this one's connection pool whose every call (all
    /// attempts and waits) ends by `deadline` — e.g. a chat turn's deadline.
    pub fn with_deadline(&self, deadline: Instant) -> Client {
        let deadline = match self.inner.deadline {
            Some(d) if d < deadline => d,
            _ => deadline,
        };
        self.derive(self.inner.config.clone(), Some(deadline))
    }

    fn derive(&self, config: ClientConfig, deadline: Option<Instant>) -> Client {
        Client {
            inner: Arc::new(Inner {
                http: self.inner.http.clone(),
                config,
                auth_headers: self.inner.auth_headers.clone(),
                deadline,
            }),
        }
    }

    /// `base_url` + `/v1/…segments` (each segment percent-encoded).
    pub(crate) fn url(&self, segments: &[&str]) -> Result<Url> {
        endpoint(&self.inner.config.base_url, segments)
    }

    pub(crate) fn auth_headers(&self) -> &HeaderMap {
        &self.inner.auth_headers
    }

    pub(crate) fn http(&self) -> &reqwest::Client {
        &self.inner.http
    }

    pub(crate) fn policy(&self) -> &RetryPolicy {
        &self.inner.config.retry
    }

    /// The deadline of a logical call starting now.
    pub(crate) fn call_deadline(&self) -> Instant {
        let own = Instant::now() + self.inner.config.retry.call_deadline;
        match self.inner.deadline {
            Some(cap) if cap < own => cap,
            _ => own,
        }
    }

    /// Timeout of one attempt: the request timeout, bounded by what is left.
    pub(crate) fn attempt_timeout(&self, remaining: Duration) -> Duration {
        self.inner.config.request_timeout.min(remaining)
    }

    /// Makes one logical API call with retries and decodes a JSON answer.
    pub(crate) async fn call<T: DeserializeOwned>(&self, req: Call<'_>) -> Result<Response<T>> {
        let raw = self.call_raw(req).await?;
        let value = serde_json::from_slice::<T>(&raw.body).map_err(|source| Error::Decode {
            operation: raw.operation,
            source,
        })?;
        Ok(Response {
            value,
            etag: raw.etag,
        })
    }

    async fn call_raw(&self, mut req: Call<'_>) -> Result<RawResponse> {
        let url = self.url(&req.segments)?;
        let mutating = matches!(
            req.method,
            Method::POST | Method::PATCH | Method::PUT | Method::DELETE
        );
        // One key per logical operation, the same on every attempt.
        let key = match (mutating, req.key) {
            (true, Some(k)) => Some(k.clone()),
            (true, None) => Some(IdempotencyKey::new()),
            (false, _) => None,
        };
        let body = req.body.take().map(Bytes::from);
        let deadline = self.call_deadline();
        let operation = req.operation;
        let span = tracing::debug_span!(
            "dedalus.call",
            op = operation,
            method = %req.method,
            path = %url.path(),
        );
        let run = retry::run(self.policy(), operation, deadline, |attempt| {
            let builder = self.attempt_request(&req, &url, key.as_ref(), body.as_ref(), attempt);
            send_attempt(builder, operation, attempt.number)
        });
        run.instrument(span).await
    }

    /// One attempt's request: the call's method, URL, query, body, key and
    /// precondition, with a timeout that fits the time left.
    fn attempt_request(
        &self,
        req: &Call<'_>,
        url: &Url,
        key: Option<&IdempotencyKey>,
        body: Option<&Bytes>,
        attempt: retry::Attempt,
    ) -> reqwest::RequestBuilder {
        let mut builder = self
            .inner
            .http
            .request(req.method.clone(), url.clone())
            .headers(self.inner.auth_headers.clone())
            .header(http::header::ACCEPT, "application/json")
            .timeout(self.attempt_timeout(attempt.remaining));
        if !req.query.is_empty() {
            builder = builder.query(&req.query);
        }
        if let Some(k) = key {
            builder = builder.header(IDEMPOTENCY_KEY, k.as_str());
        }
        if let Some(rev) = req.if_match {
            builder = builder.header(IF_MATCH, rev);
        }
        if let Some(b) = body {
            builder = builder
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(b.clone());
        }
        builder
    }
}

/// Send one attempt: the body and ETag of a success, else the API's error.
async fn send_attempt(
    builder: reqwest::RequestBuilder,
    operation: &'static str,
    attempt: u32,
) -> Result<RawResponse> {
    let started = Instant::now();
    crate::metrics::dedalus_request();
    let resp = builder
        .send()
        .await
        .map_err(|source| Error::Transport { operation, source })?;
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp
        .bytes()
        .await
        .map_err(|source| Error::Transport { operation, source })?;
    tracing::debug!(
        attempt,
        status = status.as_u16(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "dedalus response"
    );
    if status.is_success() {
        Ok(RawResponse {
            operation,
            etag: headers
                .get(ETAG)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            body: bytes,
        })
    } else {
        Err(ApiError::from_response(operation, status, &headers, &bytes).into())
    }
}

/// One logical API call.
pub(crate) struct Call<'a> {
    pub operation: &'static str,
    pub method: Method,
    pub segments: Vec<&'a str>,
    pub query: Vec<(&'static str, String)>,
    pub body: Option<Vec<u8>>,
    pub key: Option<&'a IdempotencyKey>,
    pub if_match: Option<&'a str>,
}

impl<'a> Call<'a> {
    pub fn new(operation: &'static str, method: Method, segments: Vec<&'a str>) -> Self {
        Self {
            operation,
            method,
            segments,
            query: Vec::new(),
            body: None,
            key: None,
            if_match: None,
        }
    }

    pub fn json<B: Serialize>(mut self, body: &B) -> Result<Self> {
        let bytes = serde_json::to_vec(body).map_err(|source| Error::Decode {
            operation: self.operation,
            source,
        })?;
        self.body = Some(bytes);
        Ok(self)
    }

    pub fn key(mut self, key: Option<&'a IdempotencyKey>) -> Self {
        self.key = key;
        self
    }

    pub fn if_match(mut self, if_match: Option<&'a str>) -> Self {
        self.if_match = if_match;
        self
    }

    pub fn page(mut self, cursor: Option<&str>, limit: Option<u32>) -> Self {
        if let Some(c) = cursor {
            self.query.push(("cursor", c.to_owned()));
        }
        if let Some(l) = limit {
            self.query.push(("limit", l.to_string()));
        }
        self
    }
}

/// A decoded successful answer.
pub(crate) struct Response<T> {
    pub value: T,
    pub etag: Option<String>,
}

struct RawResponse {
    operation: &'static str,
    etag: Option<String>,
    body: Bytes,
}

/// `base` + `v1/…segments`, keeping any path prefix of `base`.
pub(crate) fn endpoint(base: &Url, segments: &[&str]) -> Result<Url> {
    let mut url = base.clone();
    {
        let mut path = url
            .path_segments_mut()
            .map_err(|()| Error::Config(format!("base URL {base} cannot be a base")))?;
        path.pop_if_empty();
        path.push("v1");
        path.extend(segments);
    }
    url.set_query(None);
    url.set_fragment(None);
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_keeps_prefix_and_encodes() {
        let base = Url::parse("https://dcs.example.com").expect("url");
        assert_eq!(
            endpoint(&base, &["machines", "dm-1"])
                .expect("url")
                .as_str(),
            "https://dcs.example.com/v1/machines/dm-1"
        );
        let base = Url::parse("http://127.0.0.1:4010/api/").expect("url");
        assert_eq!(
            endpoint(&base, &["machines", "a/b c"])
                .expect("url")
                .as_str(),
            "http://127.0.0.1:4010/api/v1/machines/a%2Fb%20c"
        );
    }

    #[test]
    fn client_debug_hides_key() {
        let cfg = ClientConfig::new(
            Url::parse("http://127.0.0.1:1").expect("url"),
            "super-secret".into(),
        );
        let c = Client::new(cfg).expect("client");
        assert!(!format!("{c:?}").contains("super-secret"));
        assert!(c.auth_headers()[AUTHORIZATION].is_sensitive());
    }
}

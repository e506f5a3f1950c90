//! Key hygiene of the two credential-carrying clients (Dedalus, LLM): the
//! Dedalus key travels in one header only, a redirect to another host is
//! never followed (so no key is replayed there), plain `http://` base URLs
//! are refused outside loopback, and an LLM response body is read with a
//! size cap. Real loopback servers record what reaches them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use agenthome::agent::{LlmClient, LlmConfig, LlmError, WireMessage};
use agenthome::config::Secret;
use agenthome::dedalus::{ApiKey, Client, ClientConfig, Url};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

type Seen = Arc<Mutex<Vec<HeaderMap>>>;

/// A server recording the headers of every request; answers 200 `{}`.
async fn recorder(host: &str) -> (String, Seen) {
    let seen: Seen = Arc::default();
    let rec = Arc::clone(&seen);
    let app = axum::Router::new().fallback(move |headers: HeaderMap| {
        rec.lock().unwrap().push(headers);
        async { (StatusCode::OK, axum::Json(serde_json::json!({}))).into_response() }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{host}:{port}"), seen)
}

/// A server redirecting every request to `target` (same path).
async fn redirector(target: String) -> String {
    let app = axum::Router::new().fallback(move |uri: axum::http::Uri| {
        let location = format!("{target}{}", uri.path());
        async move { (StatusCode::TEMPORARY_REDIRECT, [("location", location)]).into_response() }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}")
}

fn dedalus(base: &str) -> Client {
    let config = ClientConfig::new(Url::parse(base).unwrap(), ApiKey::new("dsk-secret-key"))
        .with_retry(agenthome_tests::fast_retry_policy());
    Client::new(config).unwrap()
}

fn llm(base: &str) -> LlmClient {
    let mut config = LlmConfig::new(
        Url::parse(base).unwrap(),
        Some(Secret::new("sk-secret-llm")),
        "m",
    );
    config.max_attempts = 1;
    LlmClient::new(config).unwrap()
}

fn hello() -> Vec<WireMessage> {
    vec![WireMessage::text("user", "hi")]
}

fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(10)
}

#[tokio::test]
async fn the_dedalus_key_travels_in_the_authorization_header_only() {
    let (base, seen) = recorder("127.0.0.1").await;
    let _ = dedalus(&base).get_machine("dm-1").await;
    let seen = seen.lock().unwrap();
    assert!(!seen.is_empty(), "the request arrived");
    for headers in seen.iter() {
        assert_eq!(headers["authorization"], "Bearer dsk-secret-key");
        assert!(headers.get("x-api-key").is_none(), "{headers:?}");
        let all = format!("{headers:?}");
        assert_eq!(all.matches("dsk-secret-key").count(), 1, "{all}");
    }
}

#[tokio::test]
async fn a_redirect_to_another_host_is_never_followed() {
    // `localhost` and `127.0.0.1` are different hosts to an HTTP client.
    let (other_host, seen) = recorder("localhost").await;
    let base = redirector(other_host).await;
    let err = dedalus(&base).get_machine("dm-1").await.unwrap_err();
    let err = format!("{err:?} {err}");
    assert!(!err.contains("dsk-secret-key"), "{err}");
    let err = llm(&format!("{base}/v1"))
        .complete(&hello(), deadline())
        .await
        .unwrap_err();
    assert!(!format!("{err:?} {err}").contains("sk-secret-llm"));
    assert_eq!(
        seen.lock().unwrap().len(),
        0,
        "no request (and no key) reached the other host"
    );
}

#[test]
fn plain_http_is_refused_outside_loopback() {
    let dedalus = Client::new(ClientConfig::new(
        Url::parse("http://dcs.example.com").unwrap(),
        ApiKey::new("k"),
    ));
    assert!(dedalus.is_err(), "http:// to a remote Dedalus host");
    let llm = LlmClient::new(LlmConfig::new(
        Url::parse("http://llm.example.com/v1").unwrap(),
        Some(Secret::new("k")),
        "m",
    ));
    assert!(
        matches!(llm, Err(LlmError::Config(_))),
        "http:// to a remote LLM"
    );
    for ok in ["https://dcs.example.com", "http://127.0.0.1:9"] {
        let c = Client::new(ClientConfig::new(Url::parse(ok).unwrap(), ApiKey::new("k")));
        assert!(c.is_ok(), "{ok}");
    }
}

#[tokio::test]
async fn an_oversized_llm_response_is_cut_off_at_the_cap() {
    // A 2xx body far over the cap, streamed without a content-length.
    let app = axum::Router::new().fallback(|| async {
        let chunk = axum::body::Bytes::from(vec![b' '; 64 * 1024]);
        let stream =
            futures_util::stream::iter(std::iter::repeat_n(chunk, 64).map(Ok::<_, std::io::Error>));
        axum::body::Body::from_stream(stream)
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let mut config = LlmConfig::new(Url::parse(&format!("http://{addr}/v1")).unwrap(), None, "m");
    config.max_attempts = 1;
    config.max_response_bytes = 1024 * 1024;
    let err = LlmClient::new(config)
        .unwrap()
        .complete(&hello(), deadline())
        .await
        .unwrap_err();
    assert!(
        matches!(err, LlmError::ResponseTooLarge { limit: 1_048_576 }),
        "{err:?}"
    );
}

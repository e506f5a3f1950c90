//! Bearer JWTs verified in the function (`AUTH_MODE=bearer`), for entry
//! points no API Gateway authorizer fronts (the streaming Function URL).
//! The checks are the API Gateway JWT authorizer's: signature against the
//! issuer's JWKS (asymmetric algorithms only), `iss` exactly the configured
//! issuer, `exp`/`nbf`, and `aud` among the configured audiences (or, for
//! tokens without `aud` such as Cognito access tokens, `client_id`).
//!
//! The JWKS is fetched over HTTPS (`JWKS_URL`, or the `jwks_uri` of the
//! issuer's OpenID configuration) with no redirects and a size cap, cached
//! per instance for an hour, and fetched again at most once a minute when a
//! token names a key id the cache does not have (key rotation).

use std::time::Duration;

use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;
use tokio::sync::Mutex;
use tokio::time::Instant;
use url::Url;

use super::Caller;

/// How long fetched keys are used.
const KEYS_TTL: Duration = Duration::from_secs(3600);
/// Least time between two fetches (an unknown `kid` does not cause a storm).
const MIN_REFETCH: Duration = Duration::from_secs(60);
/// Cap of a JWKS or discovery document.
const MAX_DOCUMENT_BYTES: usize = 256 * 1024;
/// Timeout of one fetch.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Clock skew tolerated on `exp` and `nbf`, in seconds.
const LEEWAY_S: u64 = 30;
/// Longest token looked at.
const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// The asymmetric algorithms accepted; `none` and HMAC never are.
const ALLOWED: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// Why a token was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    /// The token is not a well-formed JWT.
    #[error("the bearer token is not a well-formed JWT")]
    Malformed,
    /// A symmetric or unknown algorithm.
    #[error("the token's algorithm {0:?} is not accepted")]
    Algorithm(Algorithm),
    /// No key of the issuer's JWKS has the token's key id.
    #[error("the token was not signed by a key of the issuer")]
    UnknownKey,
    /// Signature, issuer, expiry or a required claim failed.
    #[error("the token is not valid: {0}")]
    Invalid(#[source] jsonwebtoken::errors::Error),
    /// Neither `aud` nor `client_id` is an accepted audience.
    #[error("the token is not for this API (audience)")]
    Audience,
    /// The issuer's keys could not be fetched (and none are cached).
    #[error("the issuer's signing keys are unavailable: {0}")]
    Keys(String),
    /// The verifier's settings are unusable.
    #[error("invalid JWT settings: {0}")]
    Config(String),
}

impl JwtError {
    /// Whether the fault is ours or the issuer's, not the caller's.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, JwtError::Keys(_))
    }
}

/// What a verifier accepts.
#[derive(Debug, Clone)]
pub struct JwtSettings {
    /// The exact `iss` value (as the issuer writes it, trailing slash and all).
    pub issuer: String,
    /// Accepted `aud` values (or `client_id` for tokens without `aud`).
    pub audiences: Vec<String>,
    /// The JWKS location; `None`: discovered from the issuer.
    pub jwks_url: Option<Url>,
}

#[derive(Default)]
struct KeyCache {
    keys: Vec<Jwk>,
    fetched_at: Option<Instant>,
}

/// Verifies bearer tokens; built once per instance, keys cached inside.
pub struct JwtVerifier {
    settings: JwtSettings,
    http: reqwest::Client,
    cache: Mutex<KeyCache>,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("issuer", &self.settings.issuer)
            .finish_non_exhaustive()
    }
}

impl JwtVerifier {
    /// A verifier for `settings`; the issuer and the JWKS URL must be
    /// https (http only on loopback).
    pub fn new(settings: JwtSettings) -> Result<Self, JwtError> {
        let issuer = Url::parse(&settings.issuer)
            .map_err(|e| JwtError::Config(format!("JWT_ISSUER is not a URL: {e}")))?;
        for url in std::iter::once(&issuer).chain(settings.jwks_url.as_ref()) {
            crate::net::require_secure(url).map_err(|e| JwtError::Config(format!("{url}: {e}")))?;
        }
        if settings.audiences.is_empty() {
            return Err(JwtError::Config("no audience is accepted".into()));
        }
        let http = crate::net::client_builder(FETCH_TIMEOUT)
            .timeout(FETCH_TIMEOUT)
            .build()
            .map_err(|e| JwtError::Config(format!("cannot build the HTTP client: {e}")))?;
        Ok(JwtVerifier {
            settings,
            http,
            cache: Mutex::new(KeyCache::default()),
        })
    }

    /// Verify `token` and return the caller it names.
    pub async fn verify(&self, token: &str) -> Result<Caller, JwtError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(JwtError::Malformed);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| JwtError::Malformed)?;
        if !ALLOWED.contains(&header.alg) {
            return Err(JwtError::Algorithm(header.alg));
        }
        let jwk = self.key(header.kid.as_deref()).await?;
        if let Some(alg) = jwk.common.key_algorithm {
            // A key published for one algorithm verifies only that one.
            if alg.to_string().parse::<Algorithm>().ok() != Some(header.alg) {
                return Err(JwtError::UnknownKey);
            }
        }
        let key = DecodingKey::from_jwk(&jwk).map_err(JwtError::Invalid)?;
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&self.settings.issuer]);
        validation.set_required_spec_claims(&["exp", "iss", "sub"]);
        validation.validate_aud = false;
        validation.validate_nbf = true;
        validation.leeway = LEEWAY_S;
        let data =
            jsonwebtoken::decode::<Value>(token, &key, &validation).map_err(JwtError::Invalid)?;
        self.check_audience(&data.claims)?;
        Ok(caller_from_claims(&data.claims))
    }

    /// `aud` (a string or a list) must name an accepted audience; a token
    /// without `aud` may name one in `client_id` instead.
    fn check_audience(&self, claims: &Value) -> Result<(), JwtError> {
        let accepted = |v: &str| self.settings.audiences.iter().any(|a| a == v);
        let ok = match claims.get("aud") {
            Some(Value::String(a)) => accepted(a),
            Some(Value::Array(list)) => list.iter().filter_map(Value::as_str).any(accepted),
            Some(_) => false,
            None => claims
                .get("client_id")
                .and_then(Value::as_str)
                .is_some_and(accepted),
        };
        if ok {
            Ok(())
        } else {
            Err(JwtError::Audience)
        }
    }

    /// The key for `kid` (without a kid: the only key), from the cache or a
    /// fresh fetch.
    async fn key(&self, kid: Option<&str>) -> Result<Jwk, JwtError> {
        let mut cache = self.cache.lock().await;
        let age = cache.fetched_at.map(|at| at.elapsed());
        let stale = age.is_none_or(|a| a >= KEYS_TTL);
        let missing = find(&cache.keys, kid).is_none();
        if stale || (missing && age.is_none_or(|a| a >= MIN_REFETCH)) {
            match self.fetch_keys().await {
                Ok(keys) => {
                    cache.keys = keys;
                    cache.fetched_at = Some(Instant::now());
                }
                // Keep serving cached keys through an outage of the issuer.
                Err(e) if cache.keys.is_empty() => return Err(e),
                Err(e) => tracing::warn!(error = %e, "JWKS refresh failed; using cached keys"),
            }
        }
        find(&cache.keys, kid).cloned().ok_or(JwtError::UnknownKey)
    }

    async fn fetch_keys(&self) -> Result<Vec<Jwk>, JwtError> {
        let url = match &self.settings.jwks_url {
            Some(u) => u.clone(),
            None => self.discover().await?,
        };
        let doc = self.fetch_json(&url).await?;
        let keys: Vec<Jwk> = doc
            .get("keys")
            .and_then(Value::as_array)
            .ok_or_else(|| JwtError::Keys(format!("{url}: no \"keys\" list")))?
            .iter()
            // Keys this library cannot use (other types) are skipped.
            .filter_map(|k| serde_json::from_value::<Jwk>(k.clone()).ok())
            .collect();
        tracing::info!(keys = keys.len(), "fetched the issuer's JWKS");
        Ok(keys)
    }

    /// `jwks_uri` of `{issuer}/.well-known/openid-configuration`.
    async fn discover(&self) -> Result<Url, JwtError> {
        let base = self.settings.issuer.trim_end_matches('/');
        let url = Url::parse(&format!("{base}/.well-known/openid-configuration"))
            .map_err(|e| JwtError::Keys(e.to_string()))?;
        let doc = self.fetch_json(&url).await?;
        let raw = doc
            .get("jwks_uri")
            .and_then(Value::as_str)
            .ok_or_else(|| JwtError::Keys(format!("{url}: no jwks_uri")))?;
        let jwks = Url::parse(raw).map_err(|e| JwtError::Keys(format!("jwks_uri: {e}")))?;
        crate::net::require_secure(&jwks).map_err(|e| JwtError::Keys(format!("jwks_uri: {e}")))?;
        Ok(jwks)
    }

    async fn fetch_json(&self, url: &Url) -> Result<Value, JwtError> {
        let fail = |what: String| JwtError::Keys(format!("{url}: {what}"));
        let resp = self
            .http
            .get(url.clone())
            .send()
            .await
            .map_err(|e| fail(e.without_url().to_string()))?;
        if !resp.status().is_success() {
            return Err(fail(format!("HTTP {}", resp.status().as_u16())));
        }
        let body = crate::net::read_capped(resp, MAX_DOCUMENT_BYTES)
            .await
            .map_err(|e| fail(e.to_string()))?;
        serde_json::from_slice(&body).map_err(|e| fail(format!("not JSON: {e}")))
    }
}

fn find<'a>(keys: &'a [Jwk], kid: Option<&str>) -> Option<&'a Jwk> {
    match kid {
        Some(kid) => keys
            .iter()
            .find(|k| k.common.key_id.as_deref() == Some(kid)),
        None if keys.len() == 1 => keys.first(),
        None => None,
    }
}

/// The caller named by verified (or authorizer-verified) claims.
pub fn caller_from_claims(claims: &Value) -> Caller {
    let text = |name: &str| claims.get(name).and_then(Value::as_str).map(str::to_string);
    let mut scopes = Vec::new();
    for name in ["scope", "scp"] {
        match claims.get(name) {
            Some(Value::String(s)) => scopes.extend(split_scopes(s)),
            Some(Value::Array(list)) => {
                scopes.extend(list.iter().filter_map(Value::as_str).map(str::to_string))
            }
            _ => {}
        }
    }
    Caller {
        subject: text("sub"),
        scopes,
        client_id: text("azp").or_else(|| text("client_id")),
        iam_principal: None,
    }
}

/// A space-separated scope string, or a JSON-ish `[a b]` list as API
/// Gateway flattens arrays into claims.
pub fn split_scopes(v: &str) -> impl Iterator<Item = String> + '_ {
    v.trim_matches(|c| c == '[' || c == ']')
        .split([' ', ','])
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn claims_name_the_subject_scopes_and_client() {
        let c = caller_from_claims(&json!({
            "sub": "auth0|123", "scope": "read agenthome/admin", "azp": "backend",
            "client_id": "ignored"
        }));
        assert_eq!(c.subject.as_deref(), Some("auth0|123"));
        assert_eq!(c.scopes, ["read", "agenthome/admin"]);
        assert_eq!(c.client_id.as_deref(), Some("backend"));
        let c = caller_from_claims(&json!({"sub": "u", "scp": ["a", "b"], "client_id": "app"}));
        assert_eq!(c.scopes, ["a", "b"]);
        assert_eq!(c.client_id.as_deref(), Some("app"));
        assert_eq!(caller_from_claims(&json!({})), Caller::default());
    }
}

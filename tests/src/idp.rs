//! A local identity provider for `AUTH_MODE=bearer` tests: an ES256 key
//! pair generated at start, its OpenID configuration and JWKS served on a
//! loopback port, and real signed tokens.

use agenthome::api::{JwtSettings, JwtVerifier};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// The audience the provider's tokens are for (the app client id).
pub const AUDIENCE: &str = "agenthome-web";

/// A key pair and its id.
pub struct SigningKey {
    key: EncodingKey,
    /// The `kid` its tokens carry.
    pub kid: String,
    /// Its public JWK (with `kid`, `alg`).
    pub jwk: Jwk,
}

impl SigningKey {
    /// A fresh ES256 key pair named `kid`.
    pub fn generate(kid: &str) -> SigningKey {
        let pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
                .expect("generate an EC key pair");
        let key = EncodingKey::from_ec_der(pkcs8.as_ref());
        let mut jwk = Jwk::from_encoding_key(&key, Algorithm::ES256).expect("public JWK");
        jwk.common.key_id = Some(kid.to_string());
        SigningKey {
            key,
            kid: kid.to_string(),
            jwk,
        }
    }

    /// `claims` signed with this key (header `alg: ES256`, this `kid`).
    pub fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.key).expect("sign")
    }
}

/// The running provider.
pub struct Idp {
    /// `iss` of its tokens (`http://127.0.0.1:PORT/tenant/`).
    pub issuer: String,
    /// The key its JWKS publishes.
    pub key: SigningKey,
    fetches: Arc<AtomicUsize>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Idp {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Seconds since the epoch.
pub fn now_s() -> u64 {
    agenthome::clock::now_ms() / 1000
}

impl Idp {
    /// Start serving on a free loopback port.
    pub async fn start() -> Idp {
        let key = SigningKey::generate("key-1");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let issuer = format!("http://{addr}/tenant/");
        let fetches = Arc::new(AtomicUsize::new(0));
        let discovery = json!({
            "issuer": issuer,
            "jwks_uri": format!("http://{addr}/tenant/.well-known/jwks.json"),
        });
        let jwks = json!({ "keys": [
            // A key type this library cannot use is skipped, not fatal.
            {"kty": "unknown", "kid": "odd"},
            key.jwk,
        ]});
        let counter = Arc::clone(&fetches);
        let app = axum::Router::new()
            .route(
                "/tenant/.well-known/openid-configuration",
                axum::routing::get(move || async move { axum::Json(discovery) }),
            )
            .route(
                "/tenant/.well-known/jwks.json",
                axum::routing::get(move || {
                    counter.fetch_add(1, Ordering::SeqCst);
                    async move { axum::Json(jwks) }
                }),
            );
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Idp {
            issuer,
            key,
            fetches,
            server,
        }
    }

    /// A verifier for this provider's tokens for [`AUDIENCE`] (keys found
    /// through OpenID discovery).
    pub fn verifier(&self) -> JwtVerifier {
        JwtVerifier::new(JwtSettings {
            issuer: self.issuer.clone(),
            audiences: vec![AUDIENCE.to_string()],
            jwks_url: None,
        })
        .expect("verifier")
    }

    /// The claims of a valid token for `sub` (valid for five minutes).
    pub fn claims(&self, sub: &str) -> Value {
        json!({
            "iss": self.issuer, "aud": AUDIENCE, "sub": sub,
            "iat": now_s(), "exp": now_s() + 300, "azp": "agenthome-web",
        })
    }

    /// A valid token for `sub`.
    pub fn token(&self, sub: &str) -> String {
        self.key.sign(&self.claims(sub))
    }

    /// How many times the JWKS was fetched.
    pub fn jwks_fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

//! Every entry point is bound to one user: the streaming Function URL
//! (`AUTH_MODE=bearer`) verifies the end user's JWT in the function —
//! signature against the issuer's JWKS (served here by a loopback
//! identity provider with a key generated at start), issuer, audience,
//! expiry — and a token acts only for its own `sub` unless it is an admin
//! token (the admin scope *and* the admin client). Driven through the
//! chat-turn function's streaming handler against a real emulator and a
//! real DynamoDB-compatible server.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use agenthome::api::AuthMode;
use agenthome::store::UserStore;
use agenthome_tests::events::{http, Auth};
use agenthome_tests::idp::{now_s, Idp, SigningKey, AUDIENCE};
use agenthome_tests::stack::{Stack, StackOptions, ADMIN_CLIENT, ADMIN_SCOPE};
use agenthome_tests::uid;
use serde_json::{json, Value};

async fn bearer_stack(idp: &Idp) -> Stack {
    Stack::start_with(StackOptions {
        auth_mode: AuthMode::Bearer,
        verifier: Some(idp.verifier()),
        ..StackOptions::default()
    })
    .await
}

/// A streaming-URL request (no authorizer data unless `auth` forges some)
/// for `user`'s turns; returns status and the JSON body.
async fn send(s: &Stack, user: &str, message: &str, auth: Auth<'_>) -> (u16, Value) {
    let body = json!({ "message": message }).to_string();
    let path = format!("/v1/users/{user}/turns");
    let event = http("POST", &path, Some(&body), auth);
    let req = lambda_http::request::from_str(&event.to_string()).unwrap();
    let resp = std::sync::Arc::clone(&s.chat).handle_streaming(req).await;
    let status = resp.status().as_u16();
    let mut chunks = Vec::new();
    let mut body = resp.into_body();
    while let Some(c) = futures_util::StreamExt::next(&mut body).await {
        chunks.extend_from_slice(&c);
    }
    (
        status,
        serde_json::from_slice(&chunks).unwrap_or(Value::Null),
    )
}

async fn assert_refused(s: &Stack, user: &str, auth: Auth<'_>, status: u16, why: &str) {
    let (got, body) = send(s, user, "echo must-not-run > ~/ran", auth).await;
    assert_eq!(got, status, "{why}: {body}");
    assert_eq!(body["status"], status, "{why}: a problem body");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verified_token_drives_only_its_own_users_machine() {
    let idp = Idp::start().await;
    let s = bearer_stack(&idp).await;
    let alice = idp.token("alice");
    // GIVEN alice's token WHEN she sends her first message THEN it is accepted
    let (status, body) = send(&s, "alice", "echo hi", Auth::Bearer(&alice)).await;
    assert_eq!(status, 202, "provisioning starts: {body}");
    assert_eq!(s.drain_worker().await, 1);
    let (status, body) = send(&s, "alice", "echo hi alice", Auth::Bearer(&alice)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["steps"][0]["output"].as_str().unwrap().trim(),
        "hi alice"
    );

    // WHEN alice's token is used for bob THEN 403 and bob gets nothing
    let (status, body) = send(&s, "bob", "echo pwned", Auth::Bearer(&alice)).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["code"], "forbidden");
    assert!(
        s.store.get(&uid("bob")).await.unwrap().is_none(),
        "no item, no machine"
    );
    // AND forged authorizer data (a JWT claim set, an IAM identity) is not
    // trusted by a function that verifies tokens itself
    assert_refused(
        &s,
        "bob",
        Auth::Jwt {
            sub: "bob",
            scopes: &[],
        },
        401,
        "claims in the event",
    )
    .await;
    assert_refused(
        &s,
        "bob",
        Auth::Iam("arn:aws:iam::123456789012:role/ci"),
        401,
        "an IAM-signed caller without a user token",
    )
    .await;
    assert_refused(&s, "bob", Auth::None, 401, "no token").await;
    assert!(s.store.get(&uid("bob")).await.unwrap().is_none());
    // The keys were fetched once for all of it (cached per instance).
    assert_eq!(idp.jwks_fetches(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_that_fail_any_check_are_401() {
    let idp = Idp::start().await;
    let s = bearer_stack(&idp).await;
    let with = |patch: Value| {
        let mut c = idp.claims("carol");
        for (k, v) in patch.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        idp.key.sign(&c)
    };
    let expired = with(json!({"exp": now_s() - 120, "iat": now_s() - 600}));
    let not_yet = with(json!({"nbf": now_s() + 600}));
    let wrong_aud = with(json!({"aud": "some-other-api"}));
    let wrong_iss = with(json!({"iss": "https://evil.example.com/"}));
    let no_sub = with(json!({"sub": null}));
    let no_exp = with(json!({"exp": null}));
    // Signed by another key that claims the provider's key id
    let impostor = SigningKey::generate(&idp.key.kid).sign(&idp.claims("carol"));
    // A key id the provider never published
    let unknown_kid = SigningKey::generate("key-x").sign(&idp.claims("carol"));
    // HS256 with the public key as the secret, and alg none
    let hs256 = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &idp.claims("carol"),
        &jsonwebtoken::EncodingKey::from_secret(b"secret"),
    )
    .unwrap();
    let b64 = |v: &Value| {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let alg_none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&idp.claims("carol"))
    );
    // A valid token whose payload was edited after signing
    let valid = idp.token("carol");
    let parts: Vec<&str> = valid.split('.').collect();
    let tampered = format!("{}.{}.{}", parts[0], b64(&idp.claims("dave")), parts[2]);
    for (token, why) in [
        (expired.as_str(), "expired"),
        (not_yet.as_str(), "not yet valid"),
        (wrong_aud.as_str(), "another audience"),
        (wrong_iss.as_str(), "another issuer"),
        (no_sub.as_str(), "no sub"),
        (no_exp.as_str(), "no exp"),
        (impostor.as_str(), "signed by another key"),
        (unknown_kid.as_str(), "unknown key id"),
        (hs256.as_str(), "HS256"),
        (alg_none.as_str(), "alg none"),
        (tampered.as_str(), "tampered payload"),
        ("not-a-jwt", "garbage"),
    ] {
        assert_refused(&s, "carol", Auth::Bearer(token), 401, why).await;
    }
    assert!(s.store.get(&uid("carol")).await.unwrap().is_none());
    assert!(s.store.get(&uid("dave")).await.unwrap().is_none());
    // The same checks pass for the untouched token.
    let (status, body) = send(&s, "carol", "echo ok", Auth::Bearer(&valid)).await;
    assert_eq!(status, 202, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_needs_the_scope_and_the_admin_client() {
    let idp = Idp::start().await;
    let s = bearer_stack(&idp).await;
    let mut claims = idp.claims("chat-backend");
    claims["scope"] = json!(format!("openid {ADMIN_SCOPE}"));
    // The admin scope in a token of another client: not admin
    let other_client = idp.key.sign(&claims);
    assert_refused(&s, "erin", Auth::Bearer(&other_client), 403, "other client").await;
    assert!(s.store.get(&uid("erin")).await.unwrap().is_none());
    // The admin client without the scope: not admin
    let mut unscoped = idp.claims("chat-backend");
    unscoped["azp"] = json!(ADMIN_CLIENT);
    let unscoped = idp.key.sign(&unscoped);
    assert_refused(&s, "erin", Auth::Bearer(&unscoped), 403, "no scope").await;
    // Both: may act for erin (a Cognito-style token: `client_id`, no `aud`)
    claims.as_object_mut().unwrap().remove("aud");
    claims.as_object_mut().unwrap().remove("azp");
    claims["client_id"] = json!(ADMIN_CLIENT);
    let (status, body) = send(&s, "erin", "echo hi", Auth::Bearer(&idp.key.sign(&claims))).await;
    assert_eq!(
        status, 401,
        "client_id must also be an accepted audience: {body}"
    );
    claims["aud"] = json!([AUDIENCE]);
    let admin = idp.key.sign(&claims);
    let (status, body) = send(&s, "erin", "echo hi", Auth::Bearer(&admin)).await;
    assert_eq!(status, 202, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_provider_subjects_are_user_ids() {
    let idp = Idp::start().await;
    let s = bearer_stack(&idp).await;
    let sub = "auth0|5f7c8ec7c33c6c004bbafe82";
    let token = idp.token(sub);
    let (status, body) = send(
        &s,
        "auth0%7C5f7c8ec7c33c6c004bbafe82",
        "echo hi",
        Auth::Bearer(&token),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    assert!(s.store.get(&uid(sub)).await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_keys_are_503_not_a_pass() {
    let idp = Idp::start().await;
    let token = idp.token("frank");
    let port = agenthome_tests::free_port();
    let verifier = agenthome::api::JwtVerifier::new(agenthome::api::JwtSettings {
        issuer: idp.issuer.clone(),
        audiences: vec![AUDIENCE.into()],
        jwks_url: Some(
            format!("http://127.0.0.1:{port}/jwks.json")
                .parse()
                .unwrap(),
        ),
    })
    .unwrap();
    let s = Stack::start_with(StackOptions {
        auth_mode: AuthMode::Bearer,
        verifier: Some(verifier),
        ..StackOptions::default()
    })
    .await;
    let (status, body) = send(&s, "frank", "echo hi", Auth::Bearer(&token)).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["code"], "auth_unavailable");
    assert!(s.store.get(&uid("frank")).await.unwrap().is_none());
}

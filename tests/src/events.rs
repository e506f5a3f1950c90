//! Lambda events in AWS's real shapes (API Gateway HTTP API payload 2.0, as
//! in `events/`), for driving function handlers in-process.

use serde_json::{json, Value};

/// Who signs a request.
#[derive(Debug, Clone)]
pub enum Auth<'a> {
    /// No authorizer data.
    None,
    /// A JWT authorizer with this `sub` and these scopes (as a `scope` claim).
    Jwt {
        /// The token's subject.
        sub: &'a str,
        /// The token's scopes.
        scopes: &'a [&'a str],
    },
    /// As [`Auth::Jwt`], for a token issued to the OAuth client `client_id`
    /// (its `azp` claim).
    Client {
        /// The token's subject.
        sub: &'a str,
        /// The token's scopes.
        scopes: &'a [&'a str],
        /// The client the token was issued to.
        client_id: &'a str,
    },
    /// No authorizer; an `Authorization: Bearer <token>` header (a Function
    /// URL, which the function itself must verify).
    Bearer(&'a str),
    /// A Function URL request signed with SigV4: IAM authorizer data, no JWT.
    Iam(&'a str),
}

/// An API Gateway HTTP API (payload 2.0) event.
pub fn http(method: &str, path: &str, body: Option<&str>, auth: Auth<'_>) -> Value {
    let authorizer = match &auth {
        Auth::None | Auth::Bearer(_) => Value::Null,
        Auth::Jwt { sub, scopes } => json!({
            "jwt": {"claims": {"sub": sub, "scope": scopes.join(" ")}, "scopes": null}
        }),
        Auth::Client {
            sub,
            scopes,
            client_id,
        } => json!({
            "jwt": {"claims": {"sub": sub, "scope": scopes.join(" "), "azp": client_id},
                    "scopes": null}
        }),
        Auth::Iam(arn) => json!({
            "iam": {"accessKey": "AKIAEXAMPLE", "accountId": "123456789012",
                    "callerId": "AROAEXAMPLE:session", "principalOrgId": null,
                    "userArn": arn, "userId": "AROAEXAMPLE:session"}
        }),
    };
    let mut event = json!({
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": path,
        "rawQueryString": "",
        "headers": {"content-type": "application/json"},
        "requestContext": {
            "accountId": "123456789012",
            "apiId": "api-id",
            "domainName": "api-id.example.test",
            "domainPrefix": "api-id",
            "http": {"method": method, "path": path, "protocol": "HTTP/1.1",
                     "sourceIp": "127.0.0.1", "userAgent": "agenthome-tests"},
            "requestId": uuid::Uuid::now_v7().to_string(),
            "routeKey": "$default",
            "stage": "$default",
            "time": "28/Nov/2026:10:00:00 +0000",
            "timeEpoch": 1795860000000u64
        },
        "isBase64Encoded": false
    });
    if !authorizer.is_null() {
        event["requestContext"]["authorizer"] = authorizer;
    }
    if let Auth::Bearer(token) = auth {
        event["headers"]["authorization"] = Value::String(format!("Bearer {token}"));
    }
    if let Some(b) = body {
        event["body"] = Value::String(b.to_string());
    }
    event
}

/// Status, headers and parsed JSON body (Null if empty) of an API Gateway v2
/// response value.
pub fn response_parts(resp: &Value) -> (u16, Value, Value) {
    let status = resp["statusCode"].as_u64().unwrap_or(0) as u16;
    let headers = resp["headers"].clone();
    let body = resp["body"]
        .as_str()
        .map(|b| serde_json::from_str(b).unwrap_or(Value::String(b.to_string())))
        .unwrap_or(Value::Null);
    (status, headers, body)
}

//! Which route of docs/design.md §3 a request is for.

use crate::api::{Problem, ProblemCode, UserId};
use lambda_http::Request;

/// A route of the product's HTTP API, with its validated user id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `POST /v1/users/{user_id}/turns`
    Turn(UserId),
    /// `GET /v1/users/{user_id}/machine`
    GetMachine(UserId),
    /// `PUT /v1/users/{user_id}/machine`
    PutMachine(UserId),
    /// `POST /v1/users/{user_id}/machine/sleep`
    SleepMachine(UserId),
    /// `DELETE /v1/users/{user_id}/machine`
    DeleteMachine(UserId),
    /// `GET /v1/users/{user_id}/machine/events`
    MachineEvents(UserId),
}

impl Route {
    /// The user the route is about.
    pub fn user(&self) -> &UserId {
        match self {
            Route::Turn(u)
            | Route::GetMachine(u)
            | Route::PutMachine(u)
            | Route::SleepMachine(u)
            | Route::DeleteMachine(u)
            | Route::MachineEvents(u) => u,
        }
    }
}

/// Match `method path` against the API. Any prefix before `/v1/users/`
/// (an API Gateway stage, a `cargo lambda watch` function prefix) is
/// ignored. Unknown paths are 404, known paths with another method 405, a
/// malformed user id 400 — all as problem responses.
pub fn route(req: &Request) -> Result<Route, Problem> {
    route_parts(req.method().as_str(), req.uri().path())
}

fn route_parts(method: &str, path: &str) -> Result<Route, Problem> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let start = segments
        .windows(2)
        .position(|w| w == ["v1", "users"])
        .ok_or_else(|| not_found(path))?;
    let rest = &segments[start + 2..];
    let (raw_user, tail) = match rest.split_first() {
        Some((user, tail)) => (*user, tail),
        None => return Err(not_found(path)),
    };
    let kind = match tail {
        ["turns"] => "turns",
        ["machine"] => "machine",
        ["machine", "sleep"] => "sleep",
        ["machine", "events"] => "events",
        _ => return Err(not_found(path)),
    };
    let decoded = percent_decode(raw_user).ok_or_else(|| {
        Problem::of(
            ProblemCode::InvalidUserId,
            "user_id is not valid percent-encoded UTF-8",
        )
    })?;
    let user = UserId::parse(&decoded)
        .map_err(|e| Problem::of(ProblemCode::InvalidUserId, e.to_string()))?;
    match (kind, method) {
        ("turns", "POST") => Ok(Route::Turn(user)),
        ("machine", "GET") => Ok(Route::GetMachine(user)),
        ("machine", "PUT") => Ok(Route::PutMachine(user)),
        ("machine", "DELETE") => Ok(Route::DeleteMachine(user)),
        ("sleep", "POST") => Ok(Route::SleepMachine(user)),
        ("events", "GET") => Ok(Route::MachineEvents(user)),
        ("events", _) => Err(Problem::of(
            ProblemCode::MethodNotAllowed,
            format!("{method} is not allowed here; use GET"),
        )),
        ("turns", _) | ("sleep", _) => Err(Problem::of(
            ProblemCode::MethodNotAllowed,
            format!("{method} is not allowed here; use POST"),
        )),
        _ => Err(Problem::of(
            ProblemCode::MethodNotAllowed,
            format!("{method} is not allowed here; use GET, PUT or DELETE"),
        )),
    }
}

fn not_found(path: &str) -> Problem {
    let shown: String = path.chars().take(200).collect();
    Problem::of(ProblemCode::NoSuchRoute, format!("no route for {shown:?}"))
}

/// Decode `%XX` escapes; None if malformed or not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(s: &str) -> UserId {
        UserId::parse(s).expect("valid")
    }

    #[test]
    fn routes_of_the_design() {
        assert_eq!(
            route_parts("POST", "/v1/users/alice/turns"),
            Ok(Route::Turn(user("alice")))
        );
        assert_eq!(
            route_parts("GET", "/v1/users/alice/machine"),
            Ok(Route::GetMachine(user("alice")))
        );
        assert_eq!(
            route_parts("PUT", "/v1/users/alice/machine"),
            Ok(Route::PutMachine(user("alice")))
        );
        assert_eq!(
            route_parts("DELETE", "/v1/users/alice/machine"),
            Ok(Route::DeleteMachine(user("alice")))
        );
        assert_eq!(
            route_parts("POST", "/v1/users/alice/machine/sleep"),
            Ok(Route::SleepMachine(user("alice")))
        );
        assert_eq!(
            route_parts("GET", "/v1/users/alice/machine/events"),
            Ok(Route::MachineEvents(user("alice")))
        );
        assert_eq!(
            route_parts("POST", "/v1/users/alice/machine/events")
                .unwrap_err()
                .status,
            405
        );
    }

    #[test]
    fn prefixes_and_escapes() {
        assert_eq!(
            route_parts("POST", "/prod/v1/users/a%40b.c/turns"),
            Ok(Route::Turn(user("a@b.c")))
        );
        assert_eq!(
            route_parts("GET", "/lambda-url/provision/v1/users/bob/machine/"),
            Ok(Route::GetMachine(user("bob")))
        );
        // Identity-provider subjects, raw or percent-encoded
        assert_eq!(
            route_parts("POST", "/v1/users/auth0%7C5f7c8e/turns"),
            Ok(Route::Turn(user("auth0|5f7c8e")))
        );
        assert_eq!(
            route_parts("GET", "/v1/users/auth0|5f7c8e/machine"),
            Ok(Route::GetMachine(user("auth0|5f7c8e")))
        );
        // An encoded slash is still not a user id
        assert_eq!(
            route_parts("GET", "/v1/users/a%2Fb/machine")
                .unwrap_err()
                .status,
            400
        );
    }

    #[test]
    fn errors_are_problems_with_the_right_status() {
        assert_eq!(
            route_parts("GET", "/v1/users/alice/turns")
                .unwrap_err()
                .status,
            405
        );
        assert_eq!(
            route_parts("POST", "/v1/users/alice/machine")
                .unwrap_err()
                .status,
            405
        );
        assert_eq!(
            route_parts("POST", "/v1/users/alice/other")
                .unwrap_err()
                .status,
            404
        );
        assert_eq!(
            route_parts("POST", "/v2/users/alice/turns")
                .unwrap_err()
                .status,
            404
        );
        assert_eq!(route_parts("POST", "/v1/users").unwrap_err().status, 404);
        let bad = route_parts("POST", "/v1/users/-x/turns").unwrap_err();
        assert_eq!((bad.status, bad.code.as_str()), (400, "invalid_user_id"));
        assert_eq!(
            route_parts("POST", "/v1/users/%zz/turns")
                .unwrap_err()
                .status,
            400
        );
        assert_eq!(
            route_parts("POST", "/v1/users/%C3/turns")
                .unwrap_err()
                .status,
            400
        );
    }
}

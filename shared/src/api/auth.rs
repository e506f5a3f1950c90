//! Who may call (DESIGN §3): `AUTH_MODE=jwt` reads the API Gateway JWT
//! authorizer's claims — `sub` must equal `{user_id}` unless the token has the
//! admin scope; `iam` trusts IAM-signed callers; `none` is for local runs.

use super::{Problem, UserId};
use std::str::FromStr;

/// How callers are authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// API Gateway JWT authorizer claims (the template's default).
    Jwt,
    /// IAM-signed callers (API Gateway verified the signature).
    Iam,
    /// Anyone: local runs only (the functions warn at start).
    None,
}

impl FromStr for AuthMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "jwt" => Ok(AuthMode::Jwt),
            "iam" => Ok(AuthMode::Iam),
            "none" => Ok(AuthMode::None),
            other => Err(format!("expected jwt, iam or none, got {other:?}")),
        }
    }
}

/// What the entrypoint learned about the caller from the event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Caller {
    /// JWT `sub` claim, if a JWT authorizer ran.
    pub subject: Option<String>,
    /// JWT scopes (`scope`/`scp` claim or the authorizer's scope list).
    pub scopes: Vec<String>,
    /// An IAM principal, if the request was IAM-signed.
    pub iam_principal: Option<String>,
}

/// Decide whether `caller` may act for `user`.
pub fn authorize(
    mode: AuthMode,
    admin_scope: &str,
    caller: &Caller,
    user: &UserId,
) -> Result<(), Problem> {
    match mode {
        AuthMode::None => Ok(()),
        AuthMode::Iam => match caller.iam_principal {
            Some(_) => Ok(()),
            None => Err(Problem::unauthorized(
                "this deployment requires IAM-signed requests",
            )),
        },
        AuthMode::Jwt => {
            if caller.scopes.iter().any(|s| s == admin_scope) {
                return Ok(());
            }
            match caller.subject.as_deref() {
                None => Err(Problem::unauthorized(
                    "a JWT with a sub claim is required",
                )),
                Some(sub) if sub == user.as_str() => Ok(()),
                Some(_) => Err(Problem::forbidden(
                    "the token's subject may only act for itself; acting for another user needs the admin scope",
                )),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(s: &str) -> UserId {
        UserId::parse(s).expect("valid id")
    }

    fn jwt(sub: &str, scopes: &[&str]) -> Caller {
        Caller {
            subject: Some(sub.into()),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            iam_principal: None,
        }
    }

    #[test]
    fn a_user_may_act_only_for_itself() {
        let a = jwt("alice", &[]);
        assert_eq!(
            authorize(AuthMode::Jwt, "agenthome/admin", &a, &user("alice")),
            Ok(())
        );
        let err = authorize(AuthMode::Jwt, "agenthome/admin", &a, &user("bob")).unwrap_err();
        assert_eq!(err.status, 403);
    }

    #[test]
    fn the_admin_scope_may_act_for_anyone() {
        let backend = jwt("backend-service", &["read", "agenthome/admin"]);
        assert_eq!(
            authorize(AuthMode::Jwt, "agenthome/admin", &backend, &user("bob")),
            Ok(())
        );
    }

    #[test]
    fn no_claims_means_401_in_jwt_and_iam_modes() {
        let nobody = Caller::default();
        assert_eq!(
            authorize(AuthMode::Jwt, "x", &nobody, &user("a"))
                .unwrap_err()
                .status,
            401
        );
        assert_eq!(
            authorize(AuthMode::Iam, "x", &nobody, &user("a"))
                .unwrap_err()
                .status,
            401
        );
        assert_eq!(authorize(AuthMode::None, "x", &nobody, &user("a")), Ok(()));
    }

    #[test]
    fn auth_mode_parses_case_insensitively() {
        assert_eq!("JWT".parse(), Ok(AuthMode::Jwt));
        assert_eq!("iam".parse(), Ok(AuthMode::Iam));
        assert_eq!("none".parse(), Ok(AuthMode::None));
        assert!("open".parse::<AuthMode>().is_err());
    }
}

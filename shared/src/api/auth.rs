//! Who may call (docs/design.md §3): `AUTH_MODE=jwt` reads the API Gateway JWT
//! authorizer's claims; `bearer` verifies the `Authorization: Bearer` JWT in
//! the function ([`super::jwt`]; the streaming Function URL has no
//! authorizer). Either way `sub` must equal `{user_id}` unless the token is
//! an admin token: the admin scope *and* the admin client (`azp` or
//! `client_id`). `iam` trusts IAM-signed callers; `none` is for local runs.

use super::{Problem, ProblemCode, UserId};
use std::str::FromStr;

/// How callers are authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// API Gateway JWT authorizer claims (the template's default).
    Jwt,
    /// The function verifies the bearer JWT itself (issuer, audience,
    /// expiry, signature against the issuer's JWKS).
    Bearer,
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
            "bearer" => Ok(AuthMode::Bearer),
            "iam" => Ok(AuthMode::Iam),
            "none" => Ok(AuthMode::None),
            other => Err(format!("expected jwt, bearer, iam or none, got {other:?}")),
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
    /// The OAuth client the token was issued to (`azp`, else `client_id`).
    pub client_id: Option<String>,
    /// An IAM principal, if the request was IAM-signed.
    pub iam_principal: Option<String>,
}

/// What a token needs. Admin (acting for any user): the admin scope in a
/// token issued to the admin client; without a configured client no token
/// is admin. Everyone else: the user scope, when one is configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessPolicy {
    /// `ADMIN_SCOPE`
    pub admin_scope: String,
    /// `ADMIN_CLIENT_ID`
    pub admin_client_id: Option<String>,
    /// `USER_SCOPE`
    pub user_scope: Option<String>,
}

impl AccessPolicy {
    /// The policy for the admin scope and client, without a user scope.
    pub fn new(admin_scope: impl Into<String>, admin_client_id: Option<String>) -> Self {
        AccessPolicy {
            admin_scope: admin_scope.into(),
            admin_client_id,
            user_scope: None,
        }
    }

    /// Require `scope` of every non-admin token.
    pub fn with_user_scope(mut self, scope: Option<String>) -> Self {
        self.user_scope = scope;
        self
    }

    /// Whether `caller` is an admin: the scope *and* the client.
    pub fn admits(&self, caller: &Caller) -> bool {
        let Some(client) = self.admin_client_id.as_deref() else {
            return false;
        };
        caller.client_id.as_deref() == Some(client) && caller.has_scope(&self.admin_scope)
    }

    /// Whether `caller` carries the user scope (or none is required).
    fn user_scoped(&self, caller: &Caller) -> bool {
        self.user_scope
            .as_deref()
            .is_none_or(|scope| caller.has_scope(scope))
    }
}

impl Caller {
    /// Whether the token carries `scope`.
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| s == scope)
    }
}

/// Decide whether `caller` may act for `user`.
pub fn authorize(
    mode: AuthMode,
    admin: &AccessPolicy,
    caller: &Caller,
    user: &UserId,
) -> Result<(), Problem> {
    match mode {
        AuthMode::None => Ok(()),
        AuthMode::Iam => match caller.iam_principal {
            Some(_) => Ok(()),
            None => Err(Problem::of(
                ProblemCode::Unauthorized,
                "this deployment requires IAM-signed requests",
            )),
        },
        AuthMode::Jwt | AuthMode::Bearer => {
            if admin.admits(caller) {
                return Ok(());
            }
            match caller.subject.as_deref() {
                None => Err(Problem::of(
                    ProblemCode::Unauthorized,
                    "a JWT with a sub claim is required",
                )),
                Some(_) if !admin.user_scoped(caller) => Err(Problem::of(
                    ProblemCode::Forbidden,
                    format!(
                        "the token lacks the scope {:?}",
                        admin.user_scope.as_deref().unwrap_or_default()
                    ),
                )),
                Some(sub) if sub == user.as_str() => Ok(()),
                Some(_) => Err(Problem::of(
                    ProblemCode::Forbidden,
                    "the token's subject may only act for itself; acting for another user needs an admin token (the admin scope, issued to the admin client)",
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
            client_id: Some("web-app".into()),
            iam_principal: None,
        }
    }

    fn admin() -> AccessPolicy {
        AccessPolicy::new("agenthome/admin", Some("backend".into()))
    }

    #[test]
    fn a_user_may_act_only_for_itself() {
        let a = jwt("alice", &[]);
        assert_eq!(
            authorize(AuthMode::Jwt, &admin(), &a, &user("alice")),
            Ok(())
        );
        for mode in [AuthMode::Jwt, AuthMode::Bearer] {
            let err = authorize(mode, &admin(), &a, &user("bob")).unwrap_err();
            assert_eq!(err.status, 403);
        }
    }

    #[test]
    fn the_admin_scope_from_the_admin_client_may_act_for_anyone() {
        let mut backend = jwt("backend-service", &["read", "agenthome/admin"]);
        backend.client_id = Some("backend".into());
        for mode in [AuthMode::Jwt, AuthMode::Bearer] {
            assert_eq!(authorize(mode, &admin(), &backend, &user("bob")), Ok(()));
        }
    }

    #[test]
    fn the_admin_scope_alone_is_not_admin() {
        // Any client of the issuer can ask for a scope; only the admin
        // client's tokens are admin tokens.
        let other_client = jwt("mallory", &["agenthome/admin"]);
        let err = authorize(AuthMode::Jwt, &admin(), &other_client, &user("bob")).unwrap_err();
        assert_eq!(err.status, 403);
        let mut no_client = other_client.clone();
        no_client.client_id = None;
        assert!(authorize(AuthMode::Bearer, &admin(), &no_client, &user("bob")).is_err());
        // The admin client without the scope acts only for its own subject.
        let mut unscoped = jwt("backend-service", &["read"]);
        unscoped.client_id = Some("backend".into());
        assert!(authorize(AuthMode::Jwt, &admin(), &unscoped, &user("bob")).is_err());
        // A required user scope: a token without it acts for nobody.
        let scoped = admin().with_user_scope(Some("agenthome/user".into()));
        let plain = jwt("alice", &["openid"]);
        assert_eq!(
            authorize(AuthMode::Bearer, &scoped, &plain, &user("alice"))
                .unwrap_err()
                .status,
            403
        );
        let with_scope = jwt("alice", &["agenthome/user"]);
        assert_eq!(
            authorize(AuthMode::Bearer, &scoped, &with_scope, &user("alice")),
            Ok(())
        );
        // No admin client configured: nobody is admin.
        let mut backend = jwt("backend-service", &["agenthome/admin"]);
        backend.client_id = Some("backend".into());
        let disabled = AccessPolicy::new("agenthome/admin", None);
        assert!(authorize(AuthMode::Jwt, &disabled, &backend, &user("bob")).is_err());
    }

    #[test]
    fn no_claims_means_401_in_jwt_and_iam_modes() {
        let nobody = Caller::default();
        assert_eq!(
            authorize(AuthMode::Jwt, &admin(), &nobody, &user("a"))
                .unwrap_err()
                .status,
            401
        );
        assert_eq!(
            authorize(AuthMode::Iam, &admin(), &nobody, &user("a"))
                .unwrap_err()
                .status,
            401
        );
        assert_eq!(
            authorize(AuthMode::None, &admin(), &nobody, &user("a")),
            Ok(())
        );
    }

    #[test]
    fn auth_mode_parses_case_insensitively() {
        assert_eq!("JWT".parse(), Ok(AuthMode::Jwt));
        assert_eq!("iam".parse(), Ok(AuthMode::Iam));
        assert_eq!("none".parse(), Ok(AuthMode::None));
        assert_eq!("Bearer".parse(), Ok(AuthMode::Bearer));
        assert!("open".parse::<AuthMode>().is_err());
    }
}

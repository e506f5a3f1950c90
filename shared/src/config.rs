//! Configuration from the environment (docs/design.md §7), read once at cold start.
//! A missing or malformed value fails the start with a message naming it.

use crate::api::AuthMode;
use crate::env::{malformed, Env};
use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

/// A secret string: never printed by `Debug`/`Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wrap a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    /// The value, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// A configuration error naming the variable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// Required and absent (or empty).
    #[error("{0} is required but not set")]
    Missing(&'static str),
    /// Present but unusable.
    #[error("{name} is malformed ({value:?}): {reason}")]
    Malformed {
        /// The variable.
        name: &'static str,
        /// The offending value (never a secret's).
        value: String,
        /// Why.
        reason: String,
    },
}

/// Where the Dedalus API key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// `DEDALUS_API_KEY` (local runs).
    Env(Secret),
    /// `DEDALUS_API_KEY_SECRET_ARN` (AWS): fetched once at cold start.
    SecretArn(String),
}

/// Everything the functions read from the environment.
#[derive(Debug, Clone)]
pub struct Config {
    /// `TABLE_NAME`
    pub table_name: String,
    /// `DEDALUS_BASE_URL` (default `https://dcs.dedaluslabs.ai`)
    pub dedalus_base_url: url::Url,
    /// `DEDALUS_API_KEY` or `DEDALUS_API_KEY_SECRET_ARN`
    pub dedalus_key: KeySource,
    /// `LLM_BASE_URL` (default the Dedalus Agents API)
    pub llm_base_url: url::Url,
    /// `LLM_API_KEY` (optional; without it the default model is `shell`)
    pub llm_api_key: Option<Secret>,
    /// `LLM_API_KEY_SECRET_ARN` (AWS): the LLM key, fetched once at cold start.
    pub llm_api_key_secret_arn: Option<String>,
    /// `AGENT_MODEL` (`shell` = offline mode)
    pub agent_model: String,
    /// `MACHINE_VCPU` (default 1)
    pub machine_vcpu: f64,
    /// `MACHINE_MEMORY_MIB` (default 2048)
    pub machine_memory_mib: u64,
    /// `MACHINE_STORAGE_GIB` (default 10)
    pub machine_storage_gib: u64,
    /// `MACHINE_AUTOSLEEP` (platform backstop, default `15m`; `never` allowed)
    pub machine_autosleep: String,
    /// `BOOTSTRAP_SCRIPT` (default installs the base toolchain with apt-get)
    pub bootstrap_script: String,
    /// `BOOTSTRAP_CHECK`: a command that succeeds when the bootstrap's tools
    /// are present (default: a check of the default script's tools).
    pub bootstrap_check: Option<String>,
    /// `TURN_DEADLINE` cap (default 10 min)
    pub turn_deadline: Duration,
    /// `MAX_STEPS` (default 20)
    pub max_steps: u32,
    /// `COMMAND_TIMEOUT`: default per-command timeout (default 2 min; the
    /// model may ask for another, bounded by the turn deadline).
    pub command_timeout: Duration,
    /// `MAX_HOLD`: how long a command the agent left running may keep the
    /// machine awake (default 1 h).
    pub max_hold: Duration,
    /// `AGENT_TRANSPORT`: `terminal` (default) or `executions`.
    pub agent_transport: crate::runner::Transport,
    /// `AUTH_MODE` (default `jwt`)
    pub auth_mode: AuthMode,
    /// `ADMIN_SCOPE` (default `agenthome/admin`)
    pub admin_scope: String,
    /// `ADMIN_CLIENT_ID`: the OAuth client (`azp` or `client_id` claim) whose
    /// tokens may use the admin scope. Unset: no token is admin.
    pub admin_client_id: Option<String>,
    /// `USER_SCOPE`: a scope every non-admin token must carry (unset: none).
    pub user_scope: Option<String>,
    /// `JWT_ISSUER`: the accepted `iss` (required by `AUTH_MODE=bearer`).
    pub jwt_issuer: Option<String>,
    /// `JWT_AUDIENCE`: accepted `aud` (or, without `aud`, `client_id`)
    /// values, comma-separated (required by `AUTH_MODE=bearer`).
    pub jwt_audience: Vec<String>,
    /// `JWKS_URL`: where the issuer's signing keys are (default: the
    /// `jwks_uri` of the issuer's OpenID configuration).
    pub jwks_url: Option<url::Url>,
    /// `MAX_TURNS_PER_MINUTE`: turns a user may start per minute (default
    /// 30; `0` = no limit).
    pub max_turns_per_minute: u32,
    /// `MAX_STATUS_READS_PER_MINUTE`: status reads per user and minute that
    /// reach Dedalus; more are served from the table (default 30; `0` = no
    /// limit).
    pub max_status_reads_per_minute: u32,
    /// `MAX_AWAKE_PER_DAY`: awake time per user and UTC day after which
    /// the machine sleeps and turns get 429 until midnight (default: off).
    pub max_awake_per_day: Option<Duration>,
    /// `MAX_HISTORY_CHARS`: characters of the request's history sent to the
    /// model per turn, newest first (default 32768).
    pub max_history_chars: usize,
    /// `PROVISION_FUNCTION` (name or ARN of the provision worker)
    pub provision_function: Option<String>,
    /// `PROVISION_INVOKE=detached`: send the worker invoke without awaiting
    /// it (local runs under `cargo lambda watch`, which runs "async" invokes
    /// to the end); default `async` (AWS answers 202 at once).
    pub provision_invoke_detached: bool,
    /// `JOURNAL_TABLE`: the lifecycle journal's table (unset: no journal).
    pub journal_table: Option<String>,
    /// `JOURNAL_TTL_DAYS`: how long journal entries are kept (default 30).
    pub journal_ttl_days: u32,
    /// `HOOK_TIMEOUT`: bound of the in-machine hooks `pre-sleep` and
    /// `post-wake` (default 30 s; `0` = hooks are not run).
    pub hook_timeout: Duration,
}

/// The default bootstrap (docs/design.md §5).
pub const DEFAULT_BOOTSTRAP: &str =
    "apt-get update && apt-get install -y curl git python3-pip nodejs";

impl Config {
    /// Read the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_map(&std::env::vars().collect())
    }

    /// Read from a map (tests): the variables that need more than one
    /// line are read by the helpers below (in this order, so the first
    /// problem reported stays the same), the rest one line each.
    pub fn from_map(vars: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let env = Env::new(vars);
        let get = |name: &'static str| env.get(name);
        let url = |name: &'static str, default: &str| -> Result<url::Url, ConfigError> {
            let raw = get(name).unwrap_or(default);
            secure_url(raw).map_err(|e| malformed(name, raw, e))
        };
        let dedalus_key = dedalus_key(&env)?;
        let (llm_api_key, llm_api_key_secret_arn, agent_model) = llm_settings(&env)?;
        let machine_vcpu = machine_vcpu(&env)?;
        let max_steps: u32 = env.num("MAX_STEPS", 20)?;
        let auth_mode = env.parse("AUTH_MODE", AuthMode::Jwt, str::parse::<AuthMode>)?;
        let (jwt_issuer, jwt_audience) = jwt_claims(&env, auth_mode)?;
        if max_steps == 0 {
            return Err(malformed("MAX_STEPS", "0", "must be at least 1"));
        }
        Ok(Config {
            table_name: env.required("TABLE_NAME")?,
            dedalus_base_url: url("DEDALUS_BASE_URL", "https://dcs.dedaluslabs.ai")?,
            dedalus_key,
            llm_base_url: url("LLM_BASE_URL", "https://api.dedaluslabs.ai/v1")?,
            llm_api_key,
            llm_api_key_secret_arn,
            agent_model,
            machine_vcpu,
            machine_memory_mib: env.num("MACHINE_MEMORY_MIB", 2048)?,
            machine_storage_gib: env.num("MACHINE_STORAGE_GIB", 10)?,
            machine_autosleep: env.string("MACHINE_AUTOSLEEP", "15m"),
            bootstrap_check: get("BOOTSTRAP_CHECK").map(str::to_string),
            bootstrap_script: env.string("BOOTSTRAP_SCRIPT", DEFAULT_BOOTSTRAP),
            turn_deadline: env.duration("TURN_DEADLINE", Duration::from_secs(600))?,
            max_steps,
            command_timeout: env.duration("COMMAND_TIMEOUT", Duration::from_secs(120))?,
            max_hold: env.duration("MAX_HOLD", Duration::from_secs(3600))?,
            agent_transport: env.parse(
                "AGENT_TRANSPORT",
                crate::runner::Transport::Terminal,
                |raw| crate::runner::Transport::parse(raw).ok_or("expected terminal or executions"),
            )?,
            auth_mode,
            admin_scope: env.string("ADMIN_SCOPE", "agenthome/admin"),
            admin_client_id: get("ADMIN_CLIENT_ID").map(str::to_string),
            user_scope: get("USER_SCOPE").map(str::to_string),
            jwt_issuer,
            jwt_audience,
            jwks_url: get("JWKS_URL")
                .map(|raw| url("JWKS_URL", raw))
                .transpose()?,
            max_turns_per_minute: env.num("MAX_TURNS_PER_MINUTE", 30)?,
            max_status_reads_per_minute: env.num("MAX_STATUS_READS_PER_MINUTE", 30)?,
            max_awake_per_day: env.parse("MAX_AWAKE_PER_DAY", None, |raw| match raw {
                "off" | "0" => Ok(None),
                _ => humantime::parse_duration(raw).map(Some),
            })?,
            max_history_chars: env
                .num("MAX_HISTORY_CHARS", crate::agent::DEFAULT_HISTORY_BUDGET)?,
            provision_function: get("PROVISION_FUNCTION").map(str::to_string),
            provision_invoke_detached: env.parse("PROVISION_INVOKE", false, |raw| match raw {
                "async" => Ok(false),
                "detached" => Ok(true),
                _ => Err("expected async or detached"),
            })?,
            journal_table: get("JOURNAL_TABLE").map(str::to_string),
            journal_ttl_days: env.num("JOURNAL_TTL_DAYS", crate::journal::DEFAULT_TTL_DAYS)?,
            hook_timeout: env.duration("HOOK_TIMEOUT", crate::hooks::DEFAULT_TIMEOUT)?,
        })
    }
}

/// `DEDALUS_API_KEY`, else `DEDALUS_API_KEY_SECRET_ARN`; one is required.
fn dedalus_key(env: &Env<'_>) -> Result<KeySource, ConfigError> {
    match (
        env.get("DEDALUS_API_KEY"),
        env.get("DEDALUS_API_KEY_SECRET_ARN"),
    ) {
        (Some(k), _) => Ok(KeySource::Env(Secret::new(k))),
        (None, Some(arn)) => Ok(KeySource::SecretArn(arn.to_string())),
        (None, None) => Err(ConfigError::Missing("DEDALUS_API_KEY")),
    }
}

/// The LLM's key (or its secret's ARN) and `AGENT_MODEL`: without a key
/// the model defaults to `shell`; with one, `AGENT_MODEL` is required.
fn llm_settings(env: &Env<'_>) -> Result<(Option<Secret>, Option<String>, String), ConfigError> {
    let key = env.get("LLM_API_KEY").map(Secret::new);
    let arn = env.get("LLM_API_KEY_SECRET_ARN").map(str::to_string);
    let model = match env.get("AGENT_MODEL") {
        Some(m) => m.to_string(),
        None if key.is_none() && arn.is_none() => "shell".to_string(),
        None => return Err(ConfigError::Missing("AGENT_MODEL")),
    };
    Ok((key, arn, model))
}

/// `MACHINE_VCPU`: a positive finite number (default 1).
fn machine_vcpu(env: &Env<'_>) -> Result<f64, ConfigError> {
    let vcpu: f64 = env.num("MACHINE_VCPU", 1.0)?;
    if !(vcpu > 0.0 && vcpu.is_finite()) {
        return Err(malformed(
            "MACHINE_VCPU",
            &vcpu.to_string(),
            "must be positive",
        ));
    }
    Ok(vcpu)
}

/// `JWT_ISSUER` (a secure URL, kept as written: `iss` must match it
/// exactly, and a URL parser would add a trailing slash to a bare host) and
/// `JWT_AUDIENCE` (comma-separated); both required in `bearer` mode.
fn jwt_claims(
    env: &Env<'_>,
    auth_mode: AuthMode,
) -> Result<(Option<String>, Vec<String>), ConfigError> {
    let issuer = match env.get("JWT_ISSUER") {
        Some(raw) => {
            secure_url(raw).map_err(|e| malformed("JWT_ISSUER", raw, e))?;
            Some(raw.to_string())
        }
        None => None,
    };
    let audience: Vec<String> = env
        .get("JWT_AUDIENCE")
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(str::to_string)
        .collect();
    if auth_mode == AuthMode::Bearer {
        if issuer.is_none() {
            return Err(ConfigError::Missing("JWT_ISSUER"));
        }
        if audience.is_empty() {
            return Err(ConfigError::Missing("JWT_AUDIENCE"));
        }
    }
    Ok((issuer, audience))
}

/// A URL the functions may call: parsed, and `https` unless it is loopback.
fn secure_url(raw: &str) -> Result<url::Url, String> {
    let parsed = url::Url::parse(raw).map_err(|e| e.to_string())?;
    crate::net::require_secure(&parsed).map_err(|e| e.to_string())?;
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::env::vars as env;

    #[test]
    fn local_defaults_need_only_a_table_and_a_key() {
        let c = Config::from_map(&env(&[("TABLE_NAME", "t"), ("DEDALUS_API_KEY", "k")]))
            .expect("config");
        assert_eq!(c.agent_model, "shell", "no LLM key → offline shell mode");
        assert_eq!(c.auth_mode, AuthMode::Jwt);
        assert_eq!(c.dedalus_base_url.as_str(), "https://dcs.dedaluslabs.ai/");
        assert_eq!(c.bootstrap_script, DEFAULT_BOOTSTRAP);
    }

    #[test]
    fn missing_and_malformed_values_are_named() {
        assert_eq!(
            Config::from_map(&env(&[("DEDALUS_API_KEY", "k")])).unwrap_err(),
            ConfigError::Missing("TABLE_NAME")
        );
        assert_eq!(
            Config::from_map(&env(&[("TABLE_NAME", "t")])).unwrap_err(),
            ConfigError::Missing("DEDALUS_API_KEY")
        );
        for (name, bad) in [
            ("TURN_DEADLINE", "five minutes"),
            ("MAX_STEPS", "-1"),
            ("MAX_TURNS_PER_MINUTE", "ten"),
            ("MAX_AWAKE_PER_DAY", "two hours"),
            ("MACHINE_MEMORY_MIB", "2G"),
            ("AUTH_MODE", "open"),
            ("DEDALUS_BASE_URL", "ftp://x"),
            ("DEDALUS_BASE_URL", "http://dcs.example.com"),
            ("LLM_BASE_URL", "http://llm.example.com/v1"),
            ("JWKS_URL", "http://idp.example.com/jwks.json"),
        ] {
            let err = Config::from_map(&env(&[
                ("TABLE_NAME", "t"),
                ("DEDALUS_API_KEY", "k"),
                (name, bad),
            ]))
            .unwrap_err();
            assert!(
                matches!(err, ConfigError::Malformed { name: n, .. } if n == name),
                "{name}: {err}"
            );
        }
    }

    #[test]
    fn bearer_mode_needs_an_issuer_and_an_audience() {
        let base = [
            ("TABLE_NAME", "t"),
            ("DEDALUS_API_KEY", "k"),
            ("AUTH_MODE", "bearer"),
        ];
        assert_eq!(
            Config::from_map(&env(&base)).unwrap_err(),
            ConfigError::Missing("JWT_ISSUER")
        );
        let mut with_issuer = base.to_vec();
        with_issuer.push(("JWT_ISSUER", "https://idp.example.com/"));
        assert_eq!(
            Config::from_map(&env(&with_issuer)).unwrap_err(),
            ConfigError::Missing("JWT_AUDIENCE")
        );
        with_issuer.push(("JWT_AUDIENCE", " app-1 , app-2,"));
        with_issuer.push(("ADMIN_CLIENT_ID", "backend"));
        let c = Config::from_map(&env(&with_issuer)).expect("config");
        assert_eq!(c.auth_mode, AuthMode::Bearer);
        assert_eq!(c.jwt_audience, ["app-1", "app-2"]);
        assert_eq!(c.admin_client_id.as_deref(), Some("backend"));
        assert_eq!(c.jwks_url, None);
    }

    #[test]
    fn secrets_never_print() {
        let c = Config::from_map(&env(&[
            ("TABLE_NAME", "t"),
            ("DEDALUS_API_KEY", "dsk-super-secret"),
            ("LLM_API_KEY", "sk-also-secret"),
            ("AGENT_MODEL", "openai/gpt-5"),
        ]))
        .expect("config");
        let printed = format!("{c:?}");
        assert!(
            !printed.contains("super-secret") && !printed.contains("also-secret"),
            "{printed}"
        );
    }
}

//! Command-line flags (each also `DCS_EMULATOR_<NAME>`), the run-time timing
//! knobs, and the duration parsers they use.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::{Parser, ValueEnum};
use serde::{Deserialize, Serialize};

/// How machine ids look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IdFormat {
    /// `dm-<32 hex>`
    Dm,
    /// bare lowercase UUID
    Uuid,
}

/// Body shape of machine mutation responses (create, update, wake, sleep,
/// delete).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResponseShape {
    /// The spec's LifecycleResponse: a `status` object.
    #[default]
    Spec,
    /// The newer SDKs' shape: top-level `phase` and `revision`, no `status`.
    Newer,
}

/// Whether terminal routes are refused as "not available in this API
/// version".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RefuseTerminals {
    /// Terminals are served.
    #[default]
    Off,
    /// 404 problem+json.
    NotFound,
    /// 501 problem+json.
    NotImplemented,
}

impl RefuseTerminals {
    /// The refusal status, `None` when terminals are served.
    pub fn status(self) -> Option<u16> {
        match self {
            Self::Off => None,
            Self::NotFound => Some(404),
            Self::NotImplemented => Some(501),
        }
    }

    fn from_status(status: u64) -> Result<Self, String> {
        match status {
            404 => Ok(Self::NotFound),
            501 => Ok(Self::NotImplemented),
            other => Err(format!("refuse_terminals must be 404 or 501, not {other}")),
        }
    }

    /// `404`, `501`, or `off` (also `false`, `no`, `none`, empty).
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "off" | "false" | "no" | "none" => Ok(Self::Off),
            other => other
                .parse::<u64>()
                .map_err(|_| format!("refuse_terminals must be 404, 501 or off, not {s:?}"))
                .and_then(Self::from_status),
        }
    }
}

/// `null` when off, else the status number.
impl Serialize for RefuseTerminals {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.status() {
            Some(status) => s.serialize_u16(status),
            None => s.serialize_none(),
        }
    }
}

/// How machine processes are isolated from the host and from each other.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum Isolation {
    /// One sandbox (user, mount, PID, IPC, UTS namespaces) per awake machine.
    #[default]
    Namespaces,
    /// None: machine commands run directly on the host.
    None,
}

/// A local, faithful Dedalus Machines API server for development and tests.
#[derive(Debug, Clone, Parser)]
#[command(name = "dcs-emulator", version, about, args_override_self = true)]
pub struct Args {
    /// Where to serve (`127.0.0.1:0` picks a free port).
    #[arg(long, env = "DCS_EMULATOR_LISTEN", default_value = "127.0.0.1:4010")]
    pub listen: SocketAddr,
    /// State (`records/`, one file per record) and machine homes
    /// (`machines/<id>/home`).
    #[arg(
        long,
        env = "DCS_EMULATOR_DATA_DIR",
        default_value = "./.local/dcs-emulator"
    )]
    pub data_dir: PathBuf,
    /// The one accepted API key.
    #[arg(long, env = "DCS_EMULATOR_API_KEY", default_value = "dev-key")]
    pub api_key: String,
    /// accepted → running on create.
    #[arg(long, env = "DCS_EMULATOR_BOOT_DELAY", default_value = "300ms", value_parser = parse_duration)]
    pub boot_delay: Duration,
    /// sleeping → running on wake.
    #[arg(long, env = "DCS_EMULATOR_WAKE_DELAY", default_value = "300ms", value_parser = parse_duration)]
    pub wake_delay: Duration,
    /// running → sleeping on sleep.
    #[arg(long, env = "DCS_EMULATOR_SLEEP_DELAY", default_value = "100ms", value_parser = parse_duration)]
    pub sleep_delay: Duration,
    /// → destroyed on delete.
    #[arg(long, env = "DCS_EMULATOR_DESTROY_DELAY", default_value = "100ms", value_parser = parse_duration)]
    pub destroy_delay: Duration,
    /// Sleep is refused for this long after a machine reaches running.
    #[arg(long, env = "DCS_EMULATOR_HOLD_WINDOW", default_value = "300s", value_parser = parse_duration)]
    pub hold_window: Duration,
    /// Plus a random 0..jitter.
    #[arg(long, env = "DCS_EMULATOR_HOLD_JITTER", default_value = "10s", value_parser = parse_duration)]
    pub hold_jitter: Duration,
    /// Autosleep when create gives none (`never` = off); seconds.
    #[arg(long, env = "DCS_EMULATOR_DEFAULT_AUTOSLEEP", default_value = "5m", value_parser = parse_default_autosleep)]
    pub default_autosleep: u64,
    /// Executions keep at most this many bytes of stdout and of stderr.
    #[arg(long, env = "DCS_EMULATOR_OUTPUT_LIMIT", default_value_t = 1_048_576)]
    pub output_limit: u64,
    /// Ended executions and terminals, and destroyed machines, are removed
    /// this long after they ended.
    #[arg(long, env = "DCS_EMULATOR_RETENTION", default_value = "1h", value_parser = parse_duration)]
    pub retention: Duration,
    /// Each machine keeps at most this many ended executions (the newest).
    #[arg(long, env = "DCS_EMULATOR_EXECUTIONS_PER_MACHINE", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub executions_per_machine: u64,
    /// Idempotency records are replayed for this long.
    #[arg(long, env = "DCS_EMULATOR_IDEMPOTENCY_TTL", default_value = "24h", value_parser = parse_duration)]
    pub idempotency_ttl: Duration,
    /// Machine ids as `dm-<32 hex>` or bare lowercase UUIDs.
    #[arg(long, env = "DCS_EMULATOR_ID_FORMAT", value_enum, default_value = "dm")]
    pub id_format: IdFormat,
    /// Drift: `POST …/wake` answers 401 AUTH_INVALID "missing internal
    /// route signature".
    #[arg(long, env = "DCS_EMULATOR_REFUSE_WAKE", value_parser = BoolishValueParser::new())]
    pub refuse_wake: bool,
    /// Drift: `POST …/sleep` answers 401 AUTH_INVALID "missing internal
    /// route signature".
    #[arg(long, env = "DCS_EMULATOR_REFUSE_SLEEP", value_parser = BoolishValueParser::new())]
    pub refuse_sleep: bool,
    /// Drift: terminal routes answer this status (`404` or `501`,
    /// problem+json); `off` serves them.
    #[arg(long, env = "DCS_EMULATOR_REFUSE_TERMINALS", default_value = "off", value_parser = RefuseTerminals::parse)]
    pub refuse_terminals: RefuseTerminals,
    /// Drift: mutation response bodies in the spec's shape or the newer one.
    #[arg(
        long,
        env = "DCS_EMULATOR_RESPONSE_SHAPE",
        value_enum,
        default_value = "spec"
    )]
    pub response_shape: ResponseShape,
    /// Drift (old behaviour): a missing `If-Match` on wake, sleep, update or
    /// delete answers 428.
    #[arg(long, env = "DCS_EMULATOR_REQUIRE_IF_MATCH", value_parser = BoolishValueParser::new())]
    pub require_if_match: bool,
    /// `namespaces`: each machine in its own sandbox (needs bubblewrap);
    /// `none`: machine commands run directly on the host.
    #[arg(
        long,
        env = "DCS_EMULATOR_ISOLATION",
        value_enum,
        default_value = "namespaces"
    )]
    pub isolation: Isolation,
}

/// Drift switches: reproduce real-world differences from the spec, one at a
/// time or together. Flags at start, `PATCH /_emulator/config` at run time.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Drift {
    pub refuse_wake: bool,
    pub refuse_sleep: bool,
    /// `null`, `404` or `501`.
    pub refuse_terminals: RefuseTerminals,
    pub id_format: IdFormat,
    pub response_shape: ResponseShape,
    pub require_if_match: bool,
}

impl Drift {
    pub fn from_args(args: &Args) -> Self {
        Self {
            refuse_wake: args.refuse_wake,
            refuse_sleep: args.refuse_sleep,
            refuse_terminals: args.refuse_terminals,
            id_format: args.id_format,
            response_shape: args.response_shape,
            require_if_match: args.require_if_match,
        }
    }

    pub fn apply(&mut self, patch: &DriftPatch) {
        if let Some(v) = patch.refuse_wake {
            self.refuse_wake = v;
        }
        if let Some(v) = patch.refuse_sleep {
            self.refuse_sleep = v;
        }
        if let Some(v) = patch.refuse_terminals {
            self.refuse_terminals = v;
        }
        if let Some(v) = patch.id_format {
            self.id_format = v;
        }
        if let Some(v) = patch.response_shape {
            self.response_shape = v;
        }
        if let Some(v) = patch.require_if_match {
            self.require_if_match = v;
        }
    }
}

/// A partial update of [`Drift`].
#[derive(Debug, Clone, Copy, Default)]
pub struct DriftPatch {
    pub refuse_wake: Option<bool>,
    pub refuse_sleep: Option<bool>,
    pub refuse_terminals: Option<RefuseTerminals>,
    pub id_format: Option<IdFormat>,
    pub response_shape: Option<ResponseShape>,
    pub require_if_match: Option<bool>,
}

/// The body of `PATCH /_emulator/config`: timing knobs and drift switches;
/// unknown fields are rejected.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigPatch {
    #[serde(default)]
    pub boot_delay_ms: Option<u64>,
    #[serde(default)]
    pub wake_delay_ms: Option<u64>,
    #[serde(default)]
    pub sleep_delay_ms: Option<u64>,
    #[serde(default)]
    pub destroy_delay_ms: Option<u64>,
    #[serde(default)]
    pub hold_window_ms: Option<u64>,
    #[serde(default)]
    pub hold_jitter_ms: Option<u64>,
    #[serde(default)]
    pub refuse_wake: Option<bool>,
    #[serde(default)]
    pub refuse_sleep: Option<bool>,
    /// `null`/`false`/`"off"` = off, `404`/`501` (number or string) = on.
    /// Kept raw here (absent vs `null` matters) and checked in
    /// [`ConfigPatch::split`].
    #[serde(default, deserialize_with = "present")]
    pub refuse_terminals: Option<serde_json::Value>,
    #[serde(default)]
    pub id_format: Option<IdFormat>,
    #[serde(default)]
    pub response_shape: Option<ResponseShape>,
    #[serde(default)]
    pub require_if_match: Option<bool>,
}

/// Deserializes a present field (even `null`) as `Some(value)`.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<serde_json::Value>, D::Error> {
    serde_json::Value::deserialize(d).map(Some)
}

impl ConfigPatch {
    /// Splits into the timing part and the (checked) drift part.
    pub fn split(&self) -> Result<(TimingPatch, DriftPatch), String> {
        let refuse_terminals = match &self.refuse_terminals {
            None => None,
            Some(serde_json::Value::Null | serde_json::Value::Bool(false)) => {
                Some(RefuseTerminals::Off)
            }
            Some(serde_json::Value::Number(n)) => {
                let status = n
                    .as_u64()
                    .ok_or_else(|| format!("refuse_terminals must be 404 or 501, not {n}"))?;
                Some(RefuseTerminals::from_status(status)?)
            }
            Some(serde_json::Value::String(s)) => Some(RefuseTerminals::parse(s)?),
            Some(other) => {
                return Err(format!(
                    "refuse_terminals must be 404, 501, null or false, not {other}"
                ))
            }
        };
        Ok((
            TimingPatch {
                boot_delay_ms: self.boot_delay_ms,
                wake_delay_ms: self.wake_delay_ms,
                sleep_delay_ms: self.sleep_delay_ms,
                destroy_delay_ms: self.destroy_delay_ms,
                hold_window_ms: self.hold_window_ms,
                hold_jitter_ms: self.hold_jitter_ms,
            },
            DriftPatch {
                refuse_wake: self.refuse_wake,
                refuse_sleep: self.refuse_sleep,
                refuse_terminals,
                id_format: self.id_format,
                response_shape: self.response_shape,
                require_if_match: self.require_if_match,
            },
        ))
    }
}

/// Timing knobs that `PATCH /_emulator/config` may change at run time.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Timing {
    pub boot_delay_ms: u64,
    pub wake_delay_ms: u64,
    pub sleep_delay_ms: u64,
    pub destroy_delay_ms: u64,
    pub hold_window_ms: u64,
    pub hold_jitter_ms: u64,
}

/// A partial update of [`Timing`] (the timing part of [`ConfigPatch`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct TimingPatch {
    pub boot_delay_ms: Option<u64>,
    pub wake_delay_ms: Option<u64>,
    pub sleep_delay_ms: Option<u64>,
    pub destroy_delay_ms: Option<u64>,
    pub hold_window_ms: Option<u64>,
    pub hold_jitter_ms: Option<u64>,
}

impl Timing {
    pub fn from_args(args: &Args) -> Self {
        Self {
            boot_delay_ms: millis(args.boot_delay),
            wake_delay_ms: millis(args.wake_delay),
            sleep_delay_ms: millis(args.sleep_delay),
            destroy_delay_ms: millis(args.destroy_delay),
            hold_window_ms: millis(args.hold_window),
            hold_jitter_ms: millis(args.hold_jitter),
        }
    }

    pub fn apply(&mut self, patch: TimingPatch) {
        let fields = [
            (&mut self.boot_delay_ms, patch.boot_delay_ms),
            (&mut self.wake_delay_ms, patch.wake_delay_ms),
            (&mut self.sleep_delay_ms, patch.sleep_delay_ms),
            (&mut self.destroy_delay_ms, patch.destroy_delay_ms),
            (&mut self.hold_window_ms, patch.hold_window_ms),
            (&mut self.hold_jitter_ms, patch.hold_jitter_ms),
        ];
        for (field, value) in fields {
            if let Some(v) = value {
                *field = v;
            }
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// humantime duration (`250ms`, `5m`, `0s`); a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(s).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

fn parse_default_autosleep(s: &str) -> Result<u64, String> {
    parse_autosleep(s).or_else(|first| {
        humantime::parse_duration(s.trim())
            .map(|d| d.as_secs())
            .map_err(|_| first)
    })
}

/// Parses the API's `autosleep` strings into seconds (0 = never):
/// `30s`, `30m`, `2h`, `7d3h4s`, `1w3d`, raw seconds `"1800"`, `never`.
pub fn parse_autosleep(input: &str) -> Result<u64, String> {
    let s = input.trim().to_ascii_lowercase();
    if s.is_empty() {
        return Err("autosleep must not be empty".to_owned());
    }
    if s == "never" || s == "off" {
        return Ok(0);
    }
    if s.bytes().all(|b| b.is_ascii_digit()) {
        return s
            .parse::<u64>()
            .map_err(|_| format!("autosleep {input:?} is out of range"));
    }
    let mut total: u64 = 0;
    let mut digits = String::new();
    let mut last_unit_rank = usize::MAX;
    for c in s.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let (unit_secs, rank) = match c {
            'w' => (604_800u64, 4usize),
            'd' => (86_400, 3),
            'h' => (3_600, 2),
            'm' => (60, 1),
            's' => (1, 0),
            _ => return Err(format!("autosleep {input:?}: unknown unit {c:?}")),
        };
        if digits.is_empty() {
            return Err(format!("autosleep {input:?}: unit {c:?} without a number"));
        }
        if rank >= last_unit_rank {
            return Err(format!(
                "autosleep {input:?}: units must go from largest to smallest"
            ));
        }
        last_unit_rank = rank;
        let n: u64 = digits
            .parse()
            .map_err(|_| format!("autosleep {input:?} is out of range"))?;
        digits.clear();
        total = n
            .checked_mul(unit_secs)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(|| format!("autosleep {input:?} is out of range"))?;
    }
    if !digits.is_empty() {
        return Err(format!(
            "autosleep {input:?}: trailing number without a unit"
        ));
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn autosleep_forms() {
        assert_eq!(parse_autosleep("30s"), Ok(30));
        assert_eq!(parse_autosleep("30m"), Ok(1800));
        assert_eq!(parse_autosleep("2h"), Ok(7200));
        assert_eq!(parse_autosleep("7d3h4s"), Ok(7 * 86_400 + 3 * 3600 + 4));
        assert_eq!(parse_autosleep("1w3d"), Ok(604_800 + 3 * 86_400));
        assert_eq!(parse_autosleep("1800"), Ok(1800));
        assert_eq!(parse_autosleep("never"), Ok(0));
        assert_eq!(parse_autosleep(" NEVER "), Ok(0));
        assert_eq!(parse_autosleep("0"), Ok(0));
    }

    #[test]
    fn autosleep_rejects_garbage() {
        for bad in [
            "",
            "s",
            "10x",
            "3s4h",
            "5",
            "-5s",
            "1.5h",
            "99999999999999999999s",
            "5m5m",
        ] {
            if bad == "5" {
                continue;
            }
            assert!(parse_autosleep(bad).is_err(), "{bad:?} should be rejected");
        }
        assert!(parse_autosleep("18446744073709551615w").is_err());
    }

    #[test]
    fn later_flags_win() {
        let args = Args::try_parse_from([
            "dcs-emulator",
            "--hold-window",
            "0s",
            "--hold-window",
            "1h",
            "--default-autosleep",
            "never",
        ])
        .expect("repeated flags parse");
        assert_eq!(args.hold_window, Duration::from_secs(3600));
        assert_eq!(args.default_autosleep, 0);
    }

    #[test]
    fn isolation_defaults_to_namespaces() {
        let args = Args::try_parse_from(["dcs-emulator"]).expect("no flags");
        assert_eq!(args.isolation, Isolation::Namespaces);
        let args =
            Args::try_parse_from(["dcs-emulator", "--isolation", "none"]).expect("isolation");
        assert_eq!(args.isolation, Isolation::None);
        assert!(Args::try_parse_from(["dcs-emulator", "--isolation", "chroot"]).is_err());
    }

    #[test]
    fn drift_flags() {
        let args = Args::try_parse_from(["dcs-emulator"]).expect("no flags");
        let d = Drift::from_args(&args);
        assert!(!d.refuse_wake && !d.refuse_sleep && !d.require_if_match);
        assert_eq!(d.refuse_terminals, RefuseTerminals::Off);
        assert_eq!(d.id_format, IdFormat::Dm);
        assert_eq!(d.response_shape, ResponseShape::Spec);

        let args = Args::try_parse_from([
            "dcs-emulator",
            "--refuse-wake",
            "--refuse-sleep",
            "--refuse-terminals",
            "501",
            "--response-shape",
            "newer",
            "--require-if-match",
            "--id-format",
            "uuid",
        ])
        .expect("drift flags parse");
        let d = Drift::from_args(&args);
        assert!(d.refuse_wake && d.refuse_sleep && d.require_if_match);
        assert_eq!(d.refuse_terminals, RefuseTerminals::NotImplemented);
        assert_eq!(d.response_shape, ResponseShape::Newer);
        assert_eq!(d.id_format, IdFormat::Uuid);
        assert!(Args::try_parse_from(["dcs-emulator", "--refuse-terminals", "403"]).is_err());
        assert_eq!(RefuseTerminals::parse("404"), Ok(RefuseTerminals::NotFound));
        assert_eq!(RefuseTerminals::parse(" OFF "), Ok(RefuseTerminals::Off));
    }

    #[test]
    fn config_patch_splits_and_checks() {
        let p: ConfigPatch =
            serde_json::from_str(r#"{"hold_window_ms": 5, "refuse_terminals": null}"#)
                .expect("patch");
        let (t, d) = p.split().expect("valid");
        assert_eq!(t.hold_window_ms, Some(5));
        assert_eq!(d.refuse_terminals, Some(RefuseTerminals::Off));
        let p: ConfigPatch = serde_json::from_str(r#"{"refuse_wake": true}"#).expect("patch");
        let (_, d) = p.split().expect("valid");
        assert_eq!(d.refuse_terminals, None, "absent leaves it alone");
        assert_eq!(d.refuse_wake, Some(true));
        for bad in [
            r#"{"refuse_terminals": 200}"#,
            r#"{"refuse_terminals": [404]}"#,
        ] {
            let p: ConfigPatch = serde_json::from_str(bad).expect("patch");
            assert!(p.split().is_err(), "{bad}");
        }
        assert!(serde_json::from_str::<ConfigPatch>(r#"{"nope": 1}"#).is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert!(parse_duration("soon").is_err());
        assert_eq!(parse_default_autosleep("never"), Ok(0));
        assert_eq!(parse_default_autosleep("5m"), Ok(300));
    }
}

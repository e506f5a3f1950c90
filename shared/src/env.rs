//! Reading settings from the environment, with one set of rules for every
//! settings struct ([`crate::config::Config`], the sweep's settings, the
//! metrics' namespace): a variable that is missing or empty takes its
//! default, a malformed one is a [`ConfigError`] naming it (never a secret's
//! value: secrets are only ever read with [`Env::get`]).

use std::collections::HashMap;
use std::fmt::Display;
use std::str::FromStr;
use std::time::Duration;

use crate::config::ConfigError;

/// The variables of a process (or of a test's map).
#[derive(Debug, Clone, Copy)]
pub struct Env<'a> {
    vars: &'a HashMap<String, String>,
}

impl<'a> Env<'a> {
    /// Read `vars`.
    pub fn new(vars: &'a HashMap<String, String>) -> Self {
        Env { vars }
    }

    /// The trimmed value of `name`, if it is set and not empty.
    pub fn get(&self, name: &str) -> Option<&'a str> {
        self.vars
            .get(name)
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
    }

    /// The value of `name`, which must be set.
    pub fn required(&self, name: &'static str) -> Result<String, ConfigError> {
        self.get(name)
            .map(str::to_string)
            .ok_or(ConfigError::Missing(name))
    }

    /// The value of `name`, or `default`.
    pub fn string(&self, name: &str, default: &str) -> String {
        self.get(name).unwrap_or(default).to_string()
    }

    /// The value of `name` parsed by `parse`, or `default`.
    pub fn parse<T, E: Display>(
        &self,
        name: &'static str,
        default: T,
        parse: impl FnOnce(&str) -> Result<T, E>,
    ) -> Result<T, ConfigError> {
        match self.get(name) {
            None => Ok(default),
            Some(raw) => parse(raw).map_err(|e| malformed(name, raw, e)),
        }
    }

    /// A number (`FromStr`), or `default`.
    pub fn num<T: FromStr>(&self, name: &'static str, default: T) -> Result<T, ConfigError>
    where
        T::Err: Display,
    {
        self.parse(name, default, str::parse)
    }

    /// A count from 1 to `max`, or `default`.
    pub fn count(&self, name: &'static str, default: u64, max: u64) -> Result<u64, ConfigError> {
        self.parse(name, default, |raw| match raw.parse::<u64>() {
            Ok(0) => Err("must be at least 1".to_string()),
            Ok(v) if v > max => Err(format!("at most {max}")),
            Ok(v) => Ok(v),
            Err(e) => Err(e.to_string()),
        })
    }

    /// A duration written `90s`, `5m`, `2h`, or `default`.
    pub fn duration(&self, name: &'static str, default: Duration) -> Result<Duration, ConfigError> {
        self.parse(name, default, humantime::parse_duration)
    }

    /// `true`/`1`/`yes` or `false`/`0`/`no` (any case), or `default`.
    pub fn flag(&self, name: &'static str, default: bool) -> Result<bool, ConfigError> {
        self.parse(name, default, |raw| {
            match raw.to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" => Ok(true),
                "false" | "0" | "no" => Ok(false),
                _ => Err("expected true or false"),
            }
        })
    }
}

/// A [`ConfigError::Malformed`] for `name`'s `value`.
pub fn malformed(name: &'static str, value: &str, reason: impl Display) -> ConfigError {
    ConfigError::Malformed {
        name,
        value: value.to_string(),
        reason: reason.to_string(),
    }
}

/// A map of variables from pairs (tests of the settings structs).
#[cfg(test)]
pub(crate) fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_empty_or_missing_values_when_read_then_defaults_apply_and_bad_ones_are_named() {
        let map = vars(&[
            ("BLANK", "  "),
            ("WAIT", " 90s "),
            ("N", "0"),
            ("BIG", "11"),
            ("ON", "Yes"),
            ("BAD", "sometimes"),
        ]);
        let env = Env::new(&map);
        assert_eq!(env.get("BLANK"), None);
        assert_eq!(env.string("BLANK", "d"), "d");
        assert_eq!(
            env.duration("WAIT", Duration::ZERO),
            Ok(Duration::from_secs(90))
        );
        assert_eq!(env.num("N", 5u32), Ok(0));
        assert_eq!(env.count("MISSING", 7, 10), Ok(7));
        assert_eq!(env.flag("ON", false), Ok(true));
        assert_eq!(env.required("BLANK"), Err(ConfigError::Missing("BLANK")));
        for (name, err) in [
            ("N", env.count("N", 1, 10)),
            ("BIG", env.count("BIG", 1, 10)),
            ("BAD", env.flag("BAD", false).map(u64::from)),
        ] {
            assert!(
                matches!(err, Err(ConfigError::Malformed { name: n, .. }) if n == name),
                "{name}: {err:?}"
            );
        }
    }
}

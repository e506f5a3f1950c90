//! Clock, timestamp formatting and identifier helpers.

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::options::IdFormat;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    let nanos = OffsetDateTime::now_utc().unix_timestamp_nanos();
    i64::try_from(nanos / 1_000_000).unwrap_or(i64::MAX)
}

/// RFC 3339 UTC timestamp (millisecond precision) for epoch milliseconds.
pub fn rfc3339(ms: i64) -> String {
    let dt = OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    dt.format(&Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_owned())
}

pub fn machine_id(format: IdFormat) -> String {
    let id = Uuid::now_v7();
    match format {
        IdFormat::Dm => format!("dm-{}", id.simple()),
        IdFormat::Uuid => id.hyphenated().to_string(),
    }
}

pub fn execution_id() -> String {
    format!("ex-{}", Uuid::now_v7().simple())
}

pub fn terminal_id() -> String {
    format!("tm-{}", Uuid::now_v7().simple())
}

pub fn fault_id() -> String {
    format!("ft-{}", Uuid::now_v7().simple())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_have_expected_shape() {
        let id = machine_id(IdFormat::Dm);
        assert!(id.starts_with("dm-") && id.len() == 35, "{id}");
        assert!(id[3..]
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        let id = machine_id(IdFormat::Uuid);
        assert!(Uuid::parse_str(&id).is_ok() && id == id.to_lowercase());
        assert!(execution_id().starts_with("ex-"));
        assert!(terminal_id().starts_with("tm-"));
    }

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_500), "1970-01-01T00:00:01.5Z");
        assert!(OffsetDateTime::parse(&rfc3339(now_ms()), &Rfc3339).is_ok());
    }
}

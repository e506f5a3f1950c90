//! `GET /v1/users/{user_id}/machine/events` (the lifecycle journal, newest
//! first, paged) and the per-day awake-time summary of `GET …/machine`.

use crate::api::{Problem, ProblemCode};
use crate::journal::{self, AwakeDayTotal, Journal, PageQuery};
use crate::user_machine::MachineStatus;
use lambda_http::Request;

/// Days in the awake-time summary of `GET …/machine` (today included).
pub const SUMMARY_DAYS: u32 = 7;
/// Most journal entries the summary reads.
const SUMMARY_MAX_ENTRIES: usize = 1000;

/// The page `since`, `limit` and `cursor` ask for; anything else about
/// them is a 422 `invalid_query` naming the parameter.
pub fn page_query(req: &Request) -> Result<PageQuery, Problem> {
    let raw = req.uri().query().unwrap_or("");
    let mut since = None;
    let mut limit = None;
    let mut cursor = None;
    for (name, value) in url::form_urlencoded::parse(raw.as_bytes()) {
        let slot = match name.as_ref() {
            "since" => &mut since,
            "limit" => &mut limit,
            "cursor" => &mut cursor,
            other => {
                let shown: String = other.chars().take(40).collect();
                return Err(invalid(format!(
                    "unknown parameter {shown:?}; use since, limit and cursor"
                )));
            }
        };
        if slot.replace(value.into_owned()).is_some() {
            return Err(invalid(format!("{name} is given more than once")));
        }
    }
    Ok(PageQuery {
        since_ms: since.as_deref().map(parse_since).transpose()?,
        limit: limit
            .as_deref()
            .map(parse_limit)
            .transpose()?
            .unwrap_or(journal::DEFAULT_LIMIT),
        cursor: match cursor {
            Some(c) if journal::is_entry_id(&c) => Some(c),
            Some(_) => {
                return Err(invalid(
                    "cursor is not a next_cursor this API returned".to_owned(),
                ))
            }
            None => None,
        },
    })
}

fn invalid(detail: String) -> Problem {
    Problem::of(ProblemCode::InvalidQuery, detail)
}

/// Epoch milliseconds, or an RFC 3339 time.
fn parse_since(raw: &str) -> Result<u64, Problem> {
    if let Ok(ms) = raw.parse::<u64>() {
        if ms <= 9_999_999_999_999 {
            return Ok(ms);
        }
    }
    humantime::parse_rfc3339_weak(raw)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .and_then(|d| u64::try_from(d.as_millis()).ok())
        .ok_or_else(|| {
            invalid(
                "since must be epoch milliseconds or an RFC 3339 time (2026-01-02T03:04:05Z)"
                    .to_owned(),
            )
        })
}

fn parse_limit(raw: &str) -> Result<u32, Problem> {
    match raw.parse::<u32>() {
        Ok(n) if (1..=journal::MAX_LIMIT).contains(&n) => Ok(n),
        _ => Err(invalid(format!(
            "limit must be an integer from 1 to {}",
            journal::MAX_LIMIT
        ))),
    }
}

/// The per-day awake time of the last [`SUMMARY_DAYS`] days for `status`
/// (empty when the journal is off or cannot be read: a status read does
/// not fail for it).
pub async fn awake_days(
    journal: &Journal,
    status: &MachineStatus,
    now_ms: u64,
) -> Vec<AwakeDayTotal> {
    if !journal.is_on() {
        return Vec::new();
    }
    let since = now_ms.saturating_sub(u64::from(SUMMARY_DAYS) * 86_400_000);
    match journal
        .since(&status.user_id, since, SUMMARY_MAX_ENTRIES)
        .await
    {
        Ok(entries) => journal::awake_by_day(&entries, status.awake_since, now_ms, SUMMARY_DAYS),
        Err(error) => {
            tracing::warn!(user_id = %status.user_id, error = %error, "journal not read; no awake-time summary");
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(query: &str) -> Result<PageQuery, Problem> {
        let req = http::Request::builder()
            .uri(format!("https://x/v1/users/a/machine/events{query}"))
            .body(lambda_http::Body::Empty)
            .expect("request");
        page_query(&req)
    }

    #[test]
    fn good_queries_parse_and_bad_ones_are_422() {
        let q = get("").expect("defaults");
        assert_eq!((q.since_ms, q.limit, q.cursor), (None, 20, None));
        let q = get("?since=1700000000000&limit=5").expect("ms");
        assert_eq!((q.since_ms, q.limit), (Some(1_700_000_000_000), 5));
        let q = get("?since=2024-10-04T00:00:00Z").expect("rfc3339");
        assert_eq!(q.since_ms, Some(1_728_000_000_000));
        let id = journal::entry_id(5);
        assert_eq!(
            get(&format!("?cursor={}", id.replace('#', "%23")))
                .expect("cursor")
                .cursor,
            Some(id)
        );
        for bad in [
            "?limit=0",
            "?limit=101",
            "?limit=x",
            "?since=yesterday",
            "?since=-1",
            "?cursor=abc",
            "?limit=1&limit=2",
            "?page=2",
        ] {
            let p = get(bad).expect_err(bad);
            assert_eq!((p.status, p.code.as_str()), (422, "invalid_query"), "{bad}");
        }
    }
}

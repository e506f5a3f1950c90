//! Cursor pagination: opaque cursors over creation order.

use std::collections::HashMap;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde_json::{json, Value};

use crate::errors::ApiError;

/// A requested page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRequest {
    pub limit: usize,
    /// Only items whose sequence is greater than this.
    pub after: u64,
}

pub fn encode_cursor(seq: u64) -> String {
    URL_SAFE_NO_PAD.encode(format!("c1:{seq}"))
}

pub fn decode_cursor(cursor: &str) -> Option<u64> {
    let raw = URL_SAFE_NO_PAD.decode(cursor.trim_end_matches('=')).ok()?;
    let text = String::from_utf8(raw).ok()?;
    text.strip_prefix("c1:")?.parse().ok()
}

/// Reads `limit` (default `default`, at most `max`) and `cursor`.
pub fn page_request(
    query: &HashMap<String, String>,
    default: usize,
    max: usize,
) -> Result<PageRequest, ApiError> {
    let limit = match query
        .get("limit")
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
    {
        None => default,
        Some(s) => {
            let n: i64 = s
                .parse()
                .map_err(|_| ApiError::bad_request(format!("invalid limit {s:?}")))?;
            if n < 1 {
                return Err(ApiError::bad_request("limit must be at least 1"));
            }
            usize::try_from(n).unwrap_or(max).min(max)
        }
    };
    let after = match query
        .get("cursor")
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
    {
        None => 0,
        Some(c) => decode_cursor(c).ok_or_else(|| ApiError::bad_request("invalid cursor"))?,
    };
    Ok(PageRequest { limit, after })
}

/// Takes one page from `items` (sorted by sequence); returns the page and
/// the cursor of the next one, if there is more.
pub fn paginate<T>(items: Vec<(u64, T)>, page: PageRequest) -> (Vec<T>, Option<String>) {
    let mut rest = items.into_iter().filter(|(seq, _)| *seq > page.after);
    let mut out = Vec::new();
    let mut last = None;
    for (seq, item) in rest.by_ref().take(page.limit) {
        last = Some(seq);
        out.push(item);
    }
    let more = rest.next().is_some();
    (out, if more { last.map(encode_cursor) } else { None })
}

/// The candidates for one page: the items after the cursor (in sequence
/// order), one more than the page so that [`paginate`] knows whether there
/// is more, each shown with `view`.
pub fn window<'a, T: 'a>(
    items: impl Iterator<Item = (u64, &'a T)>,
    page: PageRequest,
    view: impl Fn(&T) -> Value,
) -> Vec<(u64, Value)> {
    items
        .filter(|(seq, _)| *seq > page.after)
        .take(page.limit.saturating_add(1))
        .map(|(seq, item)| (seq, view(item)))
        .collect()
}

/// A list body: `items`, and `next_cursor` when there is more.
pub fn page_body(items: Vec<Value>, next: Option<String>) -> Value {
    let mut body = json!({ "items": items });
    if let Some(c) = next {
        body["next_cursor"] = c.into();
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trip() {
        for n in [0, 1, 42, u64::MAX] {
            assert_eq!(decode_cursor(&encode_cursor(n)), Some(n));
        }
        assert_eq!(decode_cursor("not a cursor"), None);
        assert_eq!(decode_cursor(""), None);
    }

    #[test]
    fn pages() {
        let items: Vec<(u64, u64)> = (1..=5).map(|i| (i, i)).collect();
        let (p1, c1) = paginate(items.clone(), PageRequest { limit: 2, after: 0 });
        assert_eq!(p1, vec![1, 2]);
        let after = decode_cursor(c1.as_deref().expect("more")).expect("cursor");
        let (p2, c2) = paginate(items.clone(), PageRequest { limit: 2, after });
        assert_eq!(p2, vec![3, 4]);
        let after = decode_cursor(c2.as_deref().expect("more")).expect("cursor");
        let (p3, c3) = paginate(items, PageRequest { limit: 2, after });
        assert_eq!(p3, vec![5]);
        assert!(c3.is_none());
    }

    #[test]
    fn limits() {
        let q = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        assert_eq!(
            page_request(&q(&[]), 50, 100).map(|p| p.limit).ok(),
            Some(50)
        );
        assert_eq!(
            page_request(&q(&[("limit", "500")]), 50, 100)
                .map(|p| p.limit)
                .ok(),
            Some(100)
        );
        assert!(page_request(&q(&[("limit", "0")]), 50, 100).is_err());
        assert!(page_request(&q(&[("limit", "x")]), 50, 100).is_err());
        assert!(page_request(&q(&[("cursor", "zzz")]), 50, 100).is_err());
    }
}

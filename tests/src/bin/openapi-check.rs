//! Checks HTTP exchanges recorded on disk against `openapi.yaml`, with the
//! same checker the integration tests use (`agenthome_tests::openapi`).
//! `scripts/demo` records every request it sends to the local stack
//! (`cargo lambda watch`) and runs this over them when
//! `AGENTHOME_CHECK_API=1` (as `scripts/test` does).
//!
//! Usage: `openapi-check DIR`. For each `DIR/<name>.request.json`
//! (`{"function", "method", "path", "headers", "body"}`), `<name>.head` is
//! the response's status line and headers as `curl -D` writes them and
//! `<name>.body` its body. Exits non-zero if any exchange does not conform.

use agenthome_tests::openapi::{self, ApiRequest, Function, Headers};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Status and headers of the last response block `curl -D` wrote (a `100
/// Continue` may come first).
fn parse_head(text: &str) -> Result<(u16, Headers), String> {
    let block = text
        .split("\r\n\r\n")
        .filter(|b| !b.trim().is_empty())
        .last()
        .ok_or("no response head")?;
    let mut lines = block.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status line in {block:?}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok((status, headers))
}

fn request(path: &Path) -> Result<ApiRequest, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let json: Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let function = json["function"]
        .as_str()
        .and_then(Function::from_name)
        .ok_or_else(|| format!("{}: unknown function {}", path.display(), json["function"]))?;
    Ok(ApiRequest {
        function,
        method: json["method"]
            .as_str()
            .unwrap_or("GET")
            .to_ascii_uppercase(),
        // The query string is not part of the path the document matches.
        path: json["path"]
            .as_str()
            .unwrap_or("/")
            .split('?')
            .next()
            .unwrap_or("/")
            .to_string(),
        headers: openapi::headers_from_json(&json["headers"]),
        body: json["body"].as_str().map(|b| b.as_bytes().to_vec()),
    })
}

/// Check one recorded exchange.
fn check(request_file: &Path) -> Result<(), String> {
    let base = request_file
        .to_str()
        .and_then(|p| p.strip_suffix(".request.json"))
        .ok_or("not a .request.json file")?;
    let req = request(request_file)?;
    let head =
        std::fs::read_to_string(format!("{base}.head")).map_err(|e| format!("{base}.head: {e}"))?;
    let body = std::fs::read(format!("{base}.body")).map_err(|e| format!("{base}.body: {e}"))?;
    let (status, headers) = parse_head(&head)?;
    let checked = openapi::check_request(req);
    let label = format!("{} → {status}", checked.label());
    checked
        .check_response(status, &headers, &body)
        .map_err(|e| format!("{label}: {e}"))
}

fn main() -> ExitCode {
    let Some(dir) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: openapi-check DIR");
        return ExitCode::from(2);
    };
    let mut files: Vec<PathBuf> = match std::fs::read_dir(&dir) {
        Ok(entries) => entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.to_string_lossy().ends_with(".request.json"))
            .collect(),
        Err(e) => {
            eprintln!("{}: {e}", dir.display());
            return ExitCode::from(2);
        }
    };
    files.sort();
    let failed = files
        .iter()
        .filter_map(|file| check(file).err())
        .inspect(|e| eprintln!("   ✗ does not conform to {}: {e}", openapi::DOCUMENT_PATH))
        .count();
    if failed == 0 && !files.is_empty() {
        println!(
            "   ✓ all {} HTTP exchanges conform to {}",
            files.len(),
            openapi::DOCUMENT_PATH
        );
        ExitCode::SUCCESS
    } else {
        println!(
            "   ✗ {failed} of {} HTTP exchanges do not conform to {}",
            files.len(),
            openapi::DOCUMENT_PATH
        );
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_response_head_curl_wrote_is_read() {
        let head = "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 202 Accepted\r\ncontent-type: application/json\r\nRetry-After: 5\r\n\r\n";
        let (status, headers) = parse_head(head).expect("a head");
        assert_eq!(status, 202);
        assert_eq!(headers.get("retry-after").map(String::as_str), Some("5"));
        assert_eq!(
            headers.get("content-type").map(String::as_str),
            Some("application/json")
        );
        assert!(parse_head("").is_err());
        assert!(parse_head("garbage\r\n\r\n").is_err());
    }
}

//! Outbound HTTP hygiene shared by every client that carries a credential
//! (the Dedalus client, the LLM client, the JWKS fetch): base URLs must be
//! `https://` unless they point at this host (local emulators and test
//! servers), and redirects are never followed, so a key sent to one host is
//! never replayed to another.

use std::net::IpAddr;
use std::time::Duration;

use url::Url;

/// Why a URL may not carry credentials.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InsecureUrl {
    /// Not http(s) at all.
    #[error("scheme {0} is not https")]
    Scheme(String),
    /// Plain http to a host other than this one.
    #[error(
        "http:// is only allowed for loopback hosts (127.0.0.1, ::1, localhost); use https://"
    )]
    PlainHttp,
    /// No host.
    #[error("the URL has no host")]
    NoHost,
}

/// Whether `url`'s host is this machine (`localhost`, `127.0.0.0/8`, `::1`).
pub fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
        None => false,
    }
}

/// `https://` anywhere, `http://` only to a loopback host.
pub fn require_secure(url: &Url) -> Result<(), InsecureUrl> {
    if url.host().is_none() {
        return Err(InsecureUrl::NoHost);
    }
    match url.scheme() {
        "https" => Ok(()),
        "http" if is_loopback(url) => Ok(()),
        "http" => Err(InsecureUrl::PlainHttp),
        other => Err(InsecureUrl::Scheme(other.to_string())),
    }
}

/// The builder every credential-carrying client starts from: rustls, our
/// user agent, a connect timeout, and no redirects (a 3xx is returned to
/// the caller as it is, never followed with the credentials attached).
pub fn client_builder(connect_timeout: Duration) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .user_agent(concat!("agenthome/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(connect_timeout)
        .redirect(reqwest::redirect::Policy::none())
}

/// Why [`read_capped`] returned no body.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The body passed the cap (or announced a length over it).
    #[error("the response body exceeds {limit} bytes")]
    TooLarge {
        /// The cap.
        limit: usize,
    },
    /// The body could not be read.
    #[error("the response body could not be read")]
    Transport(#[source] reqwest::Error),
}

/// Read a response body of at most `limit` bytes, chunk by chunk; a body
/// announcing or reaching more is refused without being read to its end.
pub async fn read_capped(mut resp: reqwest::Response, limit: usize) -> Result<Vec<u8>, ReadError> {
    if resp.content_length().is_some_and(|n| n > limit as u64) {
        return Err(ReadError::TooLarge { limit });
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(ReadError::Transport)? {
        if body.len() + chunk.len() > limit {
            return Err(ReadError::TooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> Url {
        Url::parse(s).expect("url")
    }

    #[test]
    fn https_anywhere_http_only_on_loopback() {
        for ok in [
            "https://dcs.example.com",
            "http://127.0.0.1:4010",
            "http://127.1.2.3/x",
            "http://[::1]:80",
            "http://localhost:8080/v1",
            "http://LOCALHOST",
        ] {
            assert_eq!(require_secure(&url(ok)), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("http://dcs.example.com", InsecureUrl::PlainHttp),
            ("http://10.0.0.1", InsecureUrl::PlainHttp),
            ("http://localhost.example.com", InsecureUrl::PlainHttp),
            ("ftp://127.0.0.1", InsecureUrl::Scheme("ftp".into())),
        ] {
            assert_eq!(require_secure(&url(bad)), Err(why), "{bad}");
        }
        assert_eq!(
            require_secure(&url("file:///etc/passwd")),
            Err(InsecureUrl::NoHost)
        );
    }
}

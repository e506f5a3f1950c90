//! Terminal endpoints and the terminal WebSocket session.

use std::io;
use std::time::Duration;

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::Method;
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tracing::Instrument;
use url::Url;

use super::client::{endpoint, Call, Client};
use super::error::{ApiError, Error, Result};
use super::idempotency::IdempotencyKey;
use super::retry;
use super::types::{CreateTerminalRequest, Page, Terminal};

const CONNECT: &str = "terminals.connect";
const SESSION: &str = "terminals.session";

/// Close codes after which the SDKs reconnect.
pub const RECOVERABLE_CLOSE_CODES: [u16; 7] = [1001, 1005, 1006, 1011, 1012, 1013, 1015];

/// True when a session that closed with `code` may be reconnected.
pub fn is_recoverable_close(code: u16) -> bool {
    RECOVERABLE_CLOSE_CODES.contains(&code)
}

/// Base64 that accepts padded and unpadded input.
const B64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

impl Client {
    /// `POST /v1/machines/{id}/terminals`. On a sleeping machine this wakes
    /// it (status `wake_in_progress`; [`Client::connect`] waits it out).
    pub async fn create_terminal(
        &self,
        machine_id: &str,
        request: &CreateTerminalRequest,
        key: Option<&IdempotencyKey>,
    ) -> Result<Terminal> {
        let call = Call::new(
            "terminals.create",
            Method::POST,
            vec!["machines", machine_id, "terminals"],
        )
        .json(request)?
        .key(key);
        self.call(call).await.map(|r| r.value)
    }

    /// `GET /v1/machines/{id}/terminals/{tid}`.
    pub async fn get_terminal(&self, machine_id: &str, terminal_id: &str) -> Result<Terminal> {
        let call = Call::new(
            "terminals.get",
            Method::GET,
            vec!["machines", machine_id, "terminals", terminal_id],
        );
        self.call(call).await.map(|r| r.value)
    }

    /// `GET /v1/machines/{id}/terminals` — one page.
    pub async fn list_terminals(
        &self,
        machine_id: &str,
        cursor: Option<&str>,
        limit: Option<u32>,
    ) -> Result<Page<Terminal>> {
        let call = Call::new(
            "terminals.list",
            Method::GET,
            vec!["machines", machine_id, "terminals"],
        )
        .page(cursor, limit);
        self.call(call).await.map(|r| r.value)
    }

    /// `DELETE /v1/machines/{id}/terminals/{tid}`.
    pub async fn delete_terminal(
        &self,
        machine_id: &str,
        terminal_id: &str,
        key: Option<&IdempotencyKey>,
    ) -> Result<Terminal> {
        let call = Call::new(
            "terminals.delete",
            Method::DELETE,
            vec!["machines", machine_id, "terminals", terminal_id],
        )
        .key(key);
        self.call(call).await.map(|r| r.value)
    }

    /// Opens the terminal's WebSocket (auth in the handshake headers). A 409
    /// `INVALID_STATE` marked retryable (terminal not ready yet) is retried
    /// by the policy; a non-retryable one is returned.
    pub async fn connect(&self, machine_id: &str, terminal_id: &str) -> Result<TerminalSession> {
        let url = terminal_stream_url(&self.config().base_url, machine_id, terminal_id)?;
        let deadline = self.call_deadline();
        let span =
            tracing::debug_span!("dedalus.call", op = CONNECT, method = "GET", path = %url.path());
        let ws = retry::run(self.policy(), CONNECT, deadline, |attempt| {
            let request = url.as_str().into_client_request().map(|mut req| {
                req.headers_mut().extend(self.auth_headers().clone());
                req
            });
            let timeout = self.attempt_timeout(attempt.remaining);
            async move {
                let request = request.map_err(|e| ws_error(CONNECT, e))?;
                crate::metrics::dedalus_request();
                // Nagle off: a typed line is a small frame that must not wait for
                // the ACK of the one before it (a 40 ms delayed-ACK stall per
                // command otherwise).
                let handshake = tokio_tungstenite::connect_async_with_config(request, None, true);
                match tokio::time::timeout(timeout, handshake).await {
                    Err(_) => Err(ws_error(
                        CONNECT,
                        tungstenite::Error::Io(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "WebSocket handshake timed out",
                        )),
                    )),
                    Ok(Ok((ws, resp))) => {
                        tracing::debug!(
                            attempt = attempt.number,
                            status = resp.status().as_u16(),
                            "terminal connected"
                        );
                        Ok(ws)
                    }
                    Ok(Err(tungstenite::Error::Http(resp))) => {
                        tracing::debug!(
                            attempt = attempt.number,
                            status = resp.status().as_u16(),
                            "terminal handshake refused"
                        );
                        let body = resp.body().as_deref().unwrap_or_default();
                        Err(
                            ApiError::from_response(CONNECT, resp.status(), resp.headers(), body)
                                .into(),
                        )
                    }
                    Ok(Err(e)) => Err(ws_error(CONNECT, e)),
                }
            }
        })
        .instrument(span)
        .await?;
        Ok(TerminalSession {
            machine_id: machine_id.to_owned(),
            terminal_id: terminal_id.to_owned(),
            ws,
            ended: None,
        })
    }
}

fn ws_error(operation: &'static str, e: tungstenite::Error) -> Error {
    Error::WebSocket {
        operation,
        source: Box::new(e),
    }
}

/// `{base, http→ws, https→wss}/v1/machines/{id}/terminals/{tid}/stream`.
pub fn terminal_stream_url(base: &Url, machine_id: &str, terminal_id: &str) -> Result<Url> {
    let mut url = endpoint(
        base,
        &["machines", machine_id, "terminals", terminal_id, "stream"],
    )?;
    let scheme = match url.scheme() {
        "http" | "ws" => "ws",
        "https" | "wss" => "wss",
        other => return Err(Error::Config(format!("unsupported URL scheme {other}"))),
    };
    url.set_scheme(scheme)
        .map_err(|()| Error::Config(format!("cannot use scheme {scheme} for {base}")))?;
    Ok(url)
}

/// What a terminal session yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TerminalEvent {
    /// Bytes the terminal wrote.
    Output(Bytes),
    /// The server reported an error.
    Error {
        /// `error_code` (empty when absent).
        code: String,
        /// `error_message` (empty when absent).
        message: String,
    },
    /// The terminal closed (its shell exited, or it was deleted).
    Closed,
    /// The WebSocket ended. `recoverable`: reconnecting may work (close
    /// codes 1001, 1005, 1006, 1011, 1012, 1013, 1015; an abrupt drop counts
    /// as 1006).
    Disconnected {
        /// The close code (1005 for a close frame without one).
        close_code: Option<u16>,
        /// Worth reconnecting.
        recoverable: bool,
    },
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ServerFrame {
    Output {
        #[serde(default)]
        data: String,
    },
    Error {
        #[serde(default)]
        error_code: Option<String>,
        #[serde(default)]
        error_message: Option<String>,
    },
    Closed {},
    #[serde(other)]
    Unknown,
}

/// A connected terminal WebSocket.
pub struct TerminalSession {
    machine_id: String,
    terminal_id: String,
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    ended: Option<TerminalEvent>,
}

impl std::fmt::Debug for TerminalSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TerminalSession")
            .field("machine_id", &self.machine_id)
            .field("terminal_id", &self.terminal_id)
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

impl TerminalSession {
    /// The machine this terminal belongs to.
    pub fn machine_id(&self) -> &str {
        &self.machine_id
    }

    /// The terminal id (to reconnect after a recoverable disconnect).
    pub fn terminal_id(&self) -> &str {
        &self.terminal_id
    }

    /// Sends keystrokes / bytes to the terminal.
    pub async fn send_input(&mut self, data: &[u8]) -> Result<()> {
        let frame = serde_json::json!({"type": "input", "data": B64.encode(data)});
        self.send(frame).await
    }

    /// Resizes the terminal.
    pub async fn resize(&mut self, width: u32, height: u32) -> Result<()> {
        let frame = serde_json::json!({"type": "resize", "width": width, "height": height});
        self.send(frame).await
    }

    async fn send(&mut self, frame: serde_json::Value) -> Result<()> {
        self.ws
            .send(Message::text(frame.to_string()))
            .await
            .map_err(|e| ws_error(SESSION, e))
    }

    /// The next event. After a [`TerminalEvent::Disconnected`], every call
    /// returns it again.
    pub async fn next_event(&mut self) -> Result<TerminalEvent> {
        if let Some(ended) = &self.ended {
            return Ok(ended.clone());
        }
        loop {
            let msg = match self.ws.next().await {
                None => return Ok(self.end(1006)),
                Some(Ok(msg)) => msg,
                Some(Err(e)) => match e {
                    tungstenite::Error::Io(_)
                    | tungstenite::Error::ConnectionClosed
                    | tungstenite::Error::AlreadyClosed
                    | tungstenite::Error::Protocol(
                        tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
                    ) => {
                        tracing::debug!(terminal_id = %self.terminal_id, error = %e, "terminal stream dropped");
                        return Ok(self.end(1006));
                    }
                    other => return Err(ws_error(SESSION, other)),
                },
            };
            match msg {
                Message::Text(text) => {
                    if let Some(event) = parse_frame(text.as_str())? {
                        return Ok(event);
                    }
                }
                Message::Binary(data) => return Ok(TerminalEvent::Output(data)),
                Message::Close(frame) => {
                    let code = frame.map(|f| u16::from(f.code)).unwrap_or(1005);
                    return Ok(self.end(code));
                }
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
            }
        }
    }

    fn end(&mut self, code: u16) -> TerminalEvent {
        let event = TerminalEvent::Disconnected {
            close_code: Some(code),
            recoverable: is_recoverable_close(code),
        };
        tracing::debug!(terminal_id = %self.terminal_id, close_code = code, "terminal disconnected");
        self.ended = Some(event.clone());
        event
    }

    /// Closes the WebSocket (close code 1000); the terminal itself stays
    /// (delete it with [`Client::delete_terminal`]).
    pub async fn close(mut self) -> Result<()> {
        if self.ended.is_some() {
            return Ok(());
        }
        let frame = CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        };
        match self.ws.close(Some(frame)).await {
            Ok(())
            | Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {}
            Err(e) => return Err(ws_error(SESSION, e)),
        }
        // Drain until the server acknowledges, briefly.
        let drain = async { while let Some(Ok(_)) = self.ws.next().await {} };
        let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
        Ok(())
    }
}

/// Decodes a server text frame; `None` for frame types this client ignores.
fn parse_frame(text: &str) -> Result<Option<TerminalEvent>> {
    let frame: ServerFrame = serde_json::from_str(text).map_err(|source| Error::Decode {
        operation: SESSION,
        source,
    })?;
    Ok(match frame {
        ServerFrame::Output { data } => {
            let bytes = B64.decode(data.as_bytes()).map_err(|e| Error::Protocol {
                operation: SESSION,
                message: "output frame data is not base64".into(),
                source: Some(e),
            })?;
            Some(TerminalEvent::Output(Bytes::from(bytes)))
        }
        ServerFrame::Error {
            error_code,
            error_message,
        } => Some(TerminalEvent::Error {
            code: error_code.unwrap_or_default(),
            message: error_message.unwrap_or_default(),
        }),
        ServerFrame::Closed {} => Some(TerminalEvent::Closed),
        ServerFrame::Unknown => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ws_url_building() {
        let u = |s: &str| Url::parse(s).expect("url");
        assert_eq!(
            terminal_stream_url(&u("http://127.0.0.1:4010"), "dm-1", "t-1")
                .expect("url")
                .as_str(),
            "ws://127.0.0.1:4010/v1/machines/dm-1/terminals/t-1/stream"
        );
        assert_eq!(
            terminal_stream_url(&u("https://dcs.dedaluslabs.ai/"), "0190f1b2-7c3a", "t")
                .expect("url")
                .as_str(),
            "wss://dcs.dedaluslabs.ai/v1/machines/0190f1b2-7c3a/terminals/t/stream"
        );
        assert_eq!(
            terminal_stream_url(&u("https://h.example/prefix"), "m", "t")
                .expect("url")
                .as_str(),
            "wss://h.example/prefix/v1/machines/m/terminals/t/stream"
        );
    }

    #[test]
    fn frames_parse() {
        assert_eq!(
            parse_frame(r#"{"type":"output","data":"aGk="}"#).expect("ok"),
            Some(TerminalEvent::Output(Bytes::from_static(b"hi")))
        );
        assert_eq!(
            parse_frame(r#"{"type":"output","data":"aGk"}"#).expect("ok"),
            Some(TerminalEvent::Output(Bytes::from_static(b"hi")))
        );
        assert_eq!(
            parse_frame(r#"{"type":"error","error_code":"X","error_message":"m","extra":1}"#)
                .expect("ok"),
            Some(TerminalEvent::Error {
                code: "X".into(),
                message: "m".into()
            })
        );
        assert_eq!(
            parse_frame(r#"{"type":"closed"}"#).expect("ok"),
            Some(TerminalEvent::Closed)
        );
        assert_eq!(parse_frame(r#"{"type":"heartbeat"}"#).expect("ok"), None);
        assert!(parse_frame(r#"{"type":"output","data":"!!"}"#).is_err());
        assert!(parse_frame("not json").is_err());
    }

    /// wss:// builds its rustls config from the process's crypto provider;
    /// this fails loudly (panics) if the dependency graph ever enables two.
    #[tokio::test]
    async fn wss_handshake_failure_is_an_error_not_a_panic() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                drop(sock);
            }
        });
        let cfg = crate::dedalus::ClientConfig::new(
            Url::parse(&format!("https://127.0.0.1:{port}")).expect("url"),
            "k".into(),
        )
        .with_retry(crate::dedalus::RetryPolicy::no_retries());
        let client = Client::new(cfg).expect("client");
        let err = client.connect("m", "t").await.expect_err("no TLS server");
        assert!(matches!(err, Error::WebSocket { .. }), "{err:?}");
    }

    #[test]
    fn recoverable_codes() {
        for c in [1001, 1005, 1006, 1011, 1012, 1013, 1015] {
            assert!(is_recoverable_close(c));
        }
        for c in [1000, 1002, 1003, 1008, 4000] {
            assert!(!is_recoverable_close(c));
        }
    }
}

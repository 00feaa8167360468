//! Interactive shells over the endpoint. A WebSocket to `https://<id>.<domain>/` that carries a
//! shell token (CreateMicrovmShellAuthToken) runs `/bin/sh` on a pseudo-terminal in the guest,
//! through the agent; no port of the guest is opened for it.
//!
//! Frames: binary from the client are typed bytes; text from the client is a control message,
//! `{"resize":{"cols":C,"rows":R}}`; binary to the client is terminal output; when the shell
//! ends the server closes with code 1000 and the reason `exit N`. The initial size comes from
//! the query (`?cols=C&rows=R`, default 80×24).

use std::sync::Arc;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use kiln_agent::{AgentClient, ExecEvent, ExecRequest, TtySize};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::activity::VmActivity;
use super::body::{full, ProxyBody};
use super::request::{self, RequestKind, Target};
use super::{InFlight, ProxyState, Reject};

/// A control message from the client.
#[derive(Debug, serde::Deserialize)]
struct Control {
    resize: Option<Size>,
}

#[derive(Debug, Clone, Copy, serde::Deserialize)]
struct Size {
    cols: u16,
    rows: u16,
}

impl From<Size> for TtySize {
    fn from(s: Size) -> TtySize {
        TtySize {
            cols: s.cols.clamp(1, 1000),
            rows: s.rows.clamp(1, 1000),
        }
    }
}

/// Answers the WebSocket handshake and runs the shell session in the background.
pub(crate) async fn open(
    mut req: Request<Incoming>,
    state: &ProxyState,
    target: &Target,
    vm: Arc<VmActivity>,
    flight: InFlight,
) -> Result<Response<ProxyBody>, Reject> {
    if target.kind != RequestKind::WebSocket {
        return Err(Reject::new(
            StatusCode::BAD_REQUEST,
            "a shell token opens a WebSocket shell session (HTTP/1.1 Upgrade: websocket); \
             use `kiln shell`"
                .into(),
        ));
    }
    let key = req
        .headers()
        .get(header::SEC_WEBSOCKET_KEY)
        .map(|k| tokio_tungstenite::tungstenite::handshake::derive_accept_key(k.as_bytes()))
        .ok_or_else(|| {
            Reject::new(
                StatusCode::BAD_REQUEST,
                "the WebSocket handshake has no Sec-WebSocket-Key".into(),
            )
        })?;
    let size = initial_size(req.uri().query());
    let agent = match tokio::time::timeout(
        state.limits.route_timeout,
        state.routes.agent(&target.microvm_id),
    )
    .await
    {
        Ok(Ok(agent)) => agent,
        Ok(Err(e)) => return Err(super::forward::route_refusal(&target.microvm_id, e)),
        Err(_) => {
            return Err(Reject::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("MicroVM {} did not become reachable", target.microvm_id),
            ))
        }
    };
    let mut shell = agent
        .exec(
            ExecRequest::new(["/bin/sh", "-l"])
                .env("HOME", "/root")
                .cwd("/")
                .tty(size),
        )
        .await
        .map_err(|e| unavailable(&e))?;
    match shell.next_event().await {
        Ok(Some(ExecEvent::Started { .. })) => {}
        Ok(other) => {
            return Err(Reject::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the guest did not start a shell ({other:?}); rebuild the image if it predates shells"),
            ))
        }
        Err(e) => return Err(unavailable(&e)),
    }
    let fallback_protocol = request::fallback_subprotocol(req.headers());
    let from_client = hyper::upgrade::on(&mut req);
    let idle = state.limits.idle_timeout;
    let microvm_id = target.microvm_id.clone();
    tokio::spawn(async move {
        let _open = vm.open_connection();
        let _flight = flight;
        let Ok(upgraded) = from_client.await else {
            return;
        };
        let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        tracing::info!(microvm = %microvm_id, "shell session opened");
        bridge(ws, agent, shell, &vm, idle).await;
        tracing::info!(microvm = %microvm_id, "shell session ended");
    });
    let mut response = Response::new(full(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(v) = HeaderValue::from_str(&key) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    if let Some(protocol) = fallback_protocol {
        h.insert(header::SEC_WEBSOCKET_PROTOCOL, protocol);
    }
    Ok(response)
}

fn unavailable(e: &kiln_agent::AgentError) -> Reject {
    Reject::new(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("cannot start a shell in the MicroVM: {e}"),
    )
}

/// The terminal size named in the query, else 80×24.
fn initial_size(query: Option<&str>) -> TtySize {
    let mut size = Size { cols: 80, rows: 24 };
    for (k, v) in query
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
    {
        match (k, v.parse::<u16>()) {
            ("cols", Ok(n)) => size.cols = n,
            ("rows", Ok(n)) => size.rows = n,
            _ => {}
        }
    }
    size.into()
}

/// Moves typed bytes to the terminal and its output to the client until the shell exits, the
/// client leaves, or nothing moves for `idle`. A client that leaves takes the shell with it.
async fn bridge<S>(
    ws: WebSocketStream<S>,
    agent: AgentClient,
    mut shell: kiln_agent::ExecStream,
    vm: &VmActivity,
    idle: std::time::Duration,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let id = shell.id();
    let (mut to_client, mut from_client) = ws.split();
    let mut ended = None;
    loop {
        tokio::select! {
            event = shell.next_event() => match event {
                Ok(Some(ExecEvent::Stdout(data) | ExecEvent::Stderr(data))) => {
                    vm.outbound(data.len());
                    if to_client.send(Message::Binary(data.into())).await.is_err() {
                        break;
                    }
                }
                Ok(Some(ExecEvent::Exited(status))) => {
                    ended = Some(match (status.code, status.signal) {
                        (Some(code), _) => format!("exit {code}"),
                        (None, Some(signal)) => format!("killed by signal {signal}"),
                        _ => "exit".to_string(),
                    });
                    break;
                }
                Ok(Some(ExecEvent::Started { .. })) => {}
                Ok(None) | Err(_) => {
                    ended = Some("the MicroVM's agent went away".to_string());
                    break;
                }
            },
            message = tokio::time::timeout(idle, from_client.next()) => match message {
                Ok(Some(Ok(Message::Binary(data)))) => {
                    vm.inbound(data.len());
                    if agent.exec_input(id, data.to_vec()).await.is_err() {
                        break;
                    }
                }
                Ok(Some(Ok(Message::Text(text)))) => {
                    vm.inbound(text.len());
                    if let Ok(Control { resize: Some(size) }) = serde_json::from_str(text.as_str()) {
                        let _ = agent.exec_resize(id, size.into()).await;
                    }
                }
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)))) => {}
                Ok(Some(Ok(Message::Close(_)) | Err(_)) | None) | Err(_) => break,
            },
        }
    }
    match ended {
        Some(reason) => {
            let close = CloseFrame {
                code: CloseCode::Normal,
                reason: reason.into(),
            };
            let _ = to_client.send(Message::Close(Some(close))).await;
        }
        None => {
            // The client left (or went quiet): the shell's process group goes with it.
            let _ = agent.signal(id, libc::SIGHUP).await;
            let _ = agent.signal(id, libc::SIGKILL).await;
        }
    }
    let _ = to_client.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initial_size_when_query_names_it_then_that_else_80x24() {
        assert_eq!(
            initial_size(Some("cols=120&rows=40")),
            TtySize {
                cols: 120,
                rows: 40
            }
        );
        assert_eq!(initial_size(None), TtySize { cols: 80, rows: 24 });
        assert_eq!(
            initial_size(Some("cols=0&rows=x")),
            TtySize { cols: 1, rows: 24 }
        );
    }
}

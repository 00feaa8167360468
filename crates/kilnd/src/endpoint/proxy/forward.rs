//! One request through the proxy: checks in a fixed order, then the app, then the answer.
//!
//! Order: header size, host, port, token, rate limit, body size; only then
//! `Routes::upstream` and a connection to the app.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{self, HeaderValue};
use hyper::http::uri::PathAndQuery;
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::activity::VmActivity;
use super::body::{full, Direction, Metered, ProxyBody};
use super::request::{self, RequestKind, Target};
use super::upstream::{Upstream, UpstreamBook, UpstreamConnector};
use super::{ClientConnection, InFlight, ProxyLimits, ProxyState, Reject, RouteError};
use crate::endpoint::tokens::{TokenError, TokenKind};

/// Pooled clients to apps: HTTP/1.1, and h2c for gRPC.
pub(crate) struct Upstreams {
    http1: Client<UpstreamConnector, ProxyBody>,
    h2c: Client<UpstreamConnector, ProxyBody>,
}

impl Upstreams {
    pub(crate) fn new(limits: &ProxyLimits, book: Arc<UpstreamBook>) -> Self {
        let connector = UpstreamConnector {
            book,
            timeout: limits.connect_timeout,
        };
        let http1 = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .http1_max_buf_size(limits.max_header_bytes.max(8 * 1024))
            .build(connector.clone());
        let h2c = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .http2_only(true)
            .http2_max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
            .build(connector);
        Self { http1, h2c }
    }
}

/// Answers one client request; never fails (refusals are responses).
pub(crate) async fn handle(
    req: Request<Incoming>,
    state: Arc<ProxyState>,
    client: Arc<ClientConnection>,
) -> Response<ProxyBody> {
    let flight = client.begin();
    match proxy(req, &state, &client, flight).await {
        Ok(response) => {
            state.counters.answered(response.status().as_u16());
            response
        }
        Err(reject) => {
            state.counters.refused(reject.status.as_u16());
            refusal(reject)
        }
    }
}

pub(crate) fn refusal(reject: Reject) -> Response<ProxyBody> {
    let mut response = Response::new(full(format!("{}\n", reject.reason)));
    *response.status_mut() = reject.status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if let Some(seconds) = reject.retry_after {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}

async fn proxy(
    req: Request<Incoming>,
    state: &ProxyState,
    client: &ClientConnection,
    flight: InFlight,
) -> Result<Response<ProxyBody>, Reject> {
    let limits = &state.limits;
    if request::header_bytes(req.headers()) > limits.max_header_bytes {
        return Err(Reject::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!(
                "request headers larger than {} KiB",
                limits.max_header_bytes / 1024
            ),
        ));
    }
    let sandbox = match &state.sandboxes {
        Some(access) => super::sandbox::target(&req, &state.domain, access.as_ref())?,
        None => None,
    };
    let (target, opens) = match sandbox {
        // An E2B sandbox's access token opens its ports, never a shell.
        Some(target) => (target, TokenKind::Proxy),
        None => {
            let target = request::target(&req, &state.domain)?;
            let opens = authorize(state, client, &req, &target)?;
            (target, opens)
        }
    };
    let vm = state.activity.entry(&target.microvm_id);
    vm.admit(limits.requests_per_second, limits.burst)
        .map_err(|wait| Reject {
            status: StatusCode::TOO_MANY_REQUESTS,
            reason: "too many requests to this MicroVM; retry later".to_string(),
            retry_after: Some(wait.as_secs_f64().ceil().max(1.0) as u64),
        })?;
    if opens == TokenKind::Shell {
        vm.request();
        return super::shell::open(req, state, &target, vm, flight).await;
    }
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limits.max_body_bytes) {
        return Err(too_large(limits));
    }
    client.carries(&target.microvm_id, &vm, limits.max_connections_per_vm)?;
    let upstream = route(state, &target).await?;
    vm.request();
    let hop = Hop {
        state,
        client,
        target: &target,
        upstream,
        vm,
        flight,
    };
    match target.kind {
        RequestKind::Http | RequestKind::Grpc => hop.http(req).await,
        RequestKind::WebSocket | RequestKind::WebSocketH2 => hop.websocket(req).await,
    }
}

fn too_large(limits: &ProxyLimits) -> Reject {
    Reject::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("request body larger than {} bytes", limits.max_body_bytes),
    )
}

/// Verifies the token and that it opens this MicroVM (a port of it, or a shell); returns what
/// it opens; 403 with the reason otherwise. A client repeats its token on every request: the
/// connection's last one, once verified, is only rechecked (key held, expiry, revocation).
fn authorize<B>(
    state: &ProxyState,
    client: &ClientConnection,
    req: &Request<B>,
    target: &Target,
) -> Result<TokenKind, Reject> {
    let token = request::token(req.headers(), target.kind)?;
    let now = crate::now() as i64;
    let verified = match client.last_token(token) {
        Some(known) => {
            state.keys.recheck(&known, now).map_err(forbidden)?;
            known
        }
        None => {
            let verified = state.keys.verify(token, now).map_err(forbidden)?;
            client.remember_token(token, &verified);
            verified
        }
    };
    let claims = &verified.claims;
    claims
        .permits(&target.microvm_id, target.port, claims.kind)
        .map_err(forbidden)?;
    Ok(claims.kind)
}

fn forbidden(e: TokenError) -> Reject {
    // Short words of our own: never echo the token, and never explain the crypto.
    let reason = match e {
        TokenError::Malformed(_) | TokenError::Unsupported => "malformed token".to_string(),
        TokenError::UnknownKey | TokenError::Forged => {
            "invalid token: not issued by this kiln, or altered".to_string()
        }
        TokenError::Expired { .. } => "expired token: request a new one".to_string(),
        TokenError::Revoked => {
            "the access key that requested this token was revoked: request a new one".to_string()
        }
        TokenError::OtherMicrovm { .. } => "the token is for another MicroVM".to_string(),
        TokenError::PortNotAllowed { port } => format!("the token does not allow port {port}"),
        TokenError::WrongKind { actual, .. } => {
            format!("a {actual} token cannot open the endpoint: use CreateMicrovmAuthToken")
        }
        _ => "invalid token".to_string(),
    };
    Reject::new(StatusCode::FORBIDDEN, reason)
}

/// The answer when a MicroVM cannot be reached.
pub(crate) fn route_refusal(microvm_id: &str, e: RouteError) -> Reject {
    match e {
        RouteError::UnknownMicrovm => {
            Reject::new(StatusCode::NOT_FOUND, format!("no MicroVM {microvm_id}"))
        }
        RouteError::NotRunning { state } => Reject::new(
            StatusCode::CONFLICT,
            format!("MicroVM {microvm_id} is {state}"),
        ),
        RouteError::Unavailable(why) => Reject::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("MicroVM {microvm_id} is unavailable: {why}"),
        ),
    }
}

async fn route(state: &ProxyState, target: &Target) -> Result<Upstream, Reject> {
    let mut lookup = state.routes.upstream(&target.microvm_id, target.port);
    // A running MicroVM's route is known at once: no timer for it (one per request showed in
    // the proxy's profile). Only a lookup that waits (a resume) gets the deadline.
    let found = match futures_util::FutureExt::now_or_never(&mut lookup) {
        Some(found) => Ok(found),
        None => tokio::time::timeout(state.limits.route_timeout, lookup).await,
    };
    match found {
        // The pooled clients' book is written when a pooled request goes (`Hop::http`).
        Ok(Ok(upstream)) => Ok(upstream),
        Ok(Err(e)) if matches!(e, super::RouteError::UnknownMicrovm) => {
            state.book.forget(&target.microvm_id);
            Err(route_refusal(&target.microvm_id, e))
        }
        Ok(Err(e)) => Err(route_refusal(&target.microvm_id, e)),
        Err(_) => Err(Reject::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "MicroVM {} did not become reachable within {} s",
                target.microvm_id,
                state.limits.route_timeout.as_secs()
            ),
        )),
    }
}

/// One authorised request on its way to the app.
struct Hop<'a> {
    state: &'a ProxyState,
    client: &'a ClientConnection,
    target: &'a Target,
    upstream: Upstream,
    vm: Arc<VmActivity>,
    flight: InFlight,
}

impl Hop<'_> {
    fn limits(&self) -> &ProxyLimits {
        &self.state.limits
    }

    /// A plain request (or gRPC over h2c): both bodies streamed, frame by frame.
    async fn http(self, req: Request<Incoming>) -> Result<Response<ProxyBody>, Reject> {
        let (parts, body) = req.into_parts();
        let exceeded = Arc::new(AtomicBool::new(false));
        let body = Metered::new(
            body,
            self.vm.clone(),
            Direction::Inbound,
            self.limits().max_body_bytes,
            exceeded.clone(),
            (),
        )
        .boxed_unsync();
        let grpc = self.target.kind == RequestKind::Grpc;
        let mut out = Request::new(body);
        *out.method_mut() = parts.method;
        *out.version_mut() = if grpc {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };
        *out.headers_mut() =
            request::upstream_headers(parts.headers, self.target, self.client.peer.ip());
        let pooled = grpc || self.client.http2;
        let path = parts.uri.path_and_query();
        let response = if pooled {
            *out.uri_mut() = self.upstream_uri(path)?;
            self.state
                .book
                .note(&self.target.microvm_id, &self.upstream);
            let client = if grpc {
                &self.state.upstreams.h2c
            } else {
                &self.state.upstreams.http1
            };
            client
                .request(out)
                .await
                .map_err(|e| upstream_failed(&e, self.target.port))
        } else {
            *out.uri_mut() = path.map_or_else(|| Uri::from_static("/"), |p| Uri::from(p.clone()));
            self.send_kept(out).await
        };
        let response = response.map_err(|reject| {
            if exceeded.load(std::sync::atomic::Ordering::Relaxed) {
                too_large(self.limits())
            } else {
                reject
            }
        })?;
        self.respond(response)
    }

    /// Sends `req` on the client connection's kept connection to this port, or a new one,
    /// and keeps that for the client's next request. A kept connection the app closed
    /// meanwhile gives the request back unsent: it goes on a new connection.
    async fn send_kept(&self, mut req: Request<ProxyBody>) -> Result<Response<Incoming>, Reject> {
        let (id, port) = (&self.target.microvm_id, self.target.port);
        let mut kept = self.client.kept.take(id, port, &self.upstream);
        loop {
            let reused = kept.is_some();
            let mut sender = match kept.take() {
                Some(sender) => sender,
                None => open_http1(&self.upstream, self.limits(), port).await?,
            };
            if sender.ready().await.is_err() {
                if reused {
                    continue;
                }
                return Err(app_hung_up(port));
            }
            match sender.try_send_request(req).await {
                Ok(response) => {
                    self.client.kept.keep(id, port, &self.upstream, sender);
                    return Ok(response);
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if reused => req = unsent,
                    _ => return Err(app_hung_up(port)),
                },
            }
        }
    }

    /// The app's answer, passed on with its body metered and its hop-by-hop headers gone.
    fn respond(self, response: Response<Incoming>) -> Result<Response<ProxyBody>, Reject> {
        let (mut parts, body) = response.into_parts();
        if request::header_bytes(&parts.headers) > self.limits().max_header_bytes {
            return Err(Reject::new(
                StatusCode::BAD_GATEWAY,
                format!(
                    "the app's response headers are larger than {} KiB",
                    self.limits().max_header_bytes / 1024
                ),
            ));
        }
        request::strip_hop_by_hop(&mut parts.headers);
        parts.version = Version::HTTP_11;
        let body = Metered::new(
            body,
            self.vm,
            Direction::Outbound,
            u64::MAX,
            Arc::new(AtomicBool::new(false)),
            self.flight,
        )
        .boxed_unsync();
        Ok(Response::from_parts(parts, body))
    }

    fn upstream_uri(&self, path: Option<&PathAndQuery>) -> Result<Uri, Reject> {
        Uri::builder()
            .scheme("http")
            .authority(self.upstream.authority(&self.target.microvm_id))
            .path_and_query(path.map_or("/", PathAndQuery::as_str))
            .build()
            .map_err(|_| Reject::new(StatusCode::BAD_REQUEST, "invalid request target".into()))
    }

    /// A WebSocket: the app gets an HTTP/1.1 upgrade; after its 101 bytes flow both ways.
    /// An HTTP/2 client (extended CONNECT) gets 200 instead of 101, per RFC 8441.
    async fn websocket(self, mut req: Request<Incoming>) -> Result<Response<ProxyBody>, Reject> {
        let from_client = hyper::upgrade::on(&mut req);
        let h2 = self.target.kind == RequestKind::WebSocketH2;
        let fallback_protocol = request::fallback_subprotocol(req.headers());
        let (parts, _) = req.into_parts();
        let mut headers =
            request::upstream_headers(parts.headers, self.target, self.client.peer.ip());
        if h2 {
            // RFC 8441 drops the key handshake; the app's HTTP/1.1 upgrade still needs one.
            let mut nonce = [0u8; 16];
            getrandom::fill(&mut nonce).map_err(|_| {
                Reject::new(StatusCode::INTERNAL_SERVER_ERROR, "no randomness".into())
            })?;
            let key = base64::engine::general_purpose::STANDARD.encode(nonce);
            if let Ok(key) = HeaderValue::from_str(&key) {
                headers.insert(header::SEC_WEBSOCKET_KEY, key);
            }
        }
        let port = self.target.port;
        let mut sender = open_http1(&self.upstream, self.limits(), port).await?;
        let mut out = Request::new(full(Bytes::new()));
        *out.method_mut() = Method::GET;
        *out.uri_mut() = parts
            .uri
            .path_and_query()
            .map_or_else(|| Uri::from_static("/"), |p| Uri::from(p.clone()));
        *out.headers_mut() = headers;
        let mut response = sender
            .send_request(out)
            .await
            .map_err(|_| app_hung_up(port))?;
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            return self.respond(response);
        }
        let from_app = hyper::upgrade::on(&mut response);
        let (mut parts, _) = response.into_parts();
        request::strip_hop_by_hop(&mut parts.headers);
        if !parts.headers.contains_key(header::SEC_WEBSOCKET_PROTOCOL) {
            if let Some(protocol) = fallback_protocol {
                parts
                    .headers
                    .insert(header::SEC_WEBSOCKET_PROTOCOL, protocol);
            }
        }
        if h2 {
            parts.status = StatusCode::OK;
            parts.headers.remove(header::SEC_WEBSOCKET_ACCEPT);
        } else {
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            parts
                .headers
                .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        }
        parts.version = Version::HTTP_11;
        let vm = self.vm;
        let flight = self.flight;
        let idle = self.state.limits.idle_timeout;
        tokio::spawn(async move {
            let _open = vm.open_connection();
            let _flight = flight;
            if let (Ok(client), Ok(app)) = tokio::join!(from_client, from_app) {
                tunnel(TokioIo::new(client), TokioIo::new(app), &vm, idle).await;
            }
        });
        Ok(Response::from_parts(parts, full(Bytes::new())))
    }
}

/// A new HTTP/1.1 connection to `upstream` (port `port` of the MicroVM, for the errors),
/// driven by a task of its own that ends when the connection closes; upgrades allowed.
async fn open_http1(
    upstream: &Upstream,
    limits: &ProxyLimits,
    port: u16,
) -> Result<SendRequest<ProxyBody>, Reject> {
    let stream = match upstream.connect(limits.connect_timeout).await {
        Ok(stream) => stream,
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return Err(connect_timed_out(port)),
        Err(e) => return Err(connect_failed(&e, port)),
    };
    let (sender, conn) = hyper::client::conn::http1::Builder::new()
        .max_buf_size(limits.max_header_bytes.max(8 * 1024))
        .handshake::<_, ProxyBody>(TokioIo::new(stream))
        .await
        .map_err(|_| app_hung_up(port))?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    Ok(sender)
}

/// Copies bytes both ways until both sides close, one fails, or nothing moves for `idle`.
async fn tunnel<C, A>(client: C, app: A, vm: &VmActivity, idle: Duration)
where
    C: AsyncRead + AsyncWrite + Unpin,
    A: AsyncRead + AsyncWrite + Unpin,
{
    let start = tokio::time::Instant::now();
    let last = std::sync::atomic::AtomicU64::new(0);
    let mark = || {
        let ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
        last.fetch_max(ms, std::sync::atomic::Ordering::Relaxed);
    };
    let (mut client_rx, mut client_tx) = tokio::io::split(client);
    let (mut app_rx, mut app_tx) = tokio::io::split(app);
    let inbound = pump(&mut client_rx, &mut app_tx, |n| {
        vm.inbound(n);
        mark();
    });
    let outbound = pump(&mut app_rx, &mut client_tx, |n| {
        vm.outbound(n);
        mark();
    });
    let watchdog = async {
        loop {
            let quiet = Duration::from_millis(last.load(std::sync::atomic::Ordering::Relaxed));
            let deadline = start + quiet + idle;
            if tokio::time::Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    };
    tokio::select! {
        _ = async { tokio::try_join!(inbound, outbound) } => {}
        _ = watchdog => {}
    }
}

async fn pump<R, W>(reader: &mut R, writer: &mut W, on_bytes: impl Fn(usize)) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            return writer.shutdown().await;
        }
        on_bytes(n);
        writer.write_all(&buf[..n]).await?;
        writer.flush().await?;
    }
}

fn io_error_in<'e>(e: &'e (dyn std::error::Error + 'static)) -> Option<&'e std::io::Error> {
    let mut source = Some(e);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return Some(io);
        }
        source = err.source();
    }
    None
}

fn upstream_failed(e: &hyper_util::client::legacy::Error, port: u16) -> Reject {
    if e.is_connect() {
        return match io_error_in(e) {
            Some(io) if io.kind() == std::io::ErrorKind::TimedOut => connect_timed_out(port),
            Some(io) => connect_failed(io, port),
            None => connect_timed_out(port),
        };
    }
    app_hung_up(port)
}

fn connect_failed(e: &std::io::Error, port: u16) -> Reject {
    if e.kind() == std::io::ErrorKind::ConnectionRefused {
        Reject::new(
            StatusCode::BAD_GATEWAY,
            format!("nothing is listening on port {port} in the MicroVM"),
        )
    } else {
        Reject::new(
            StatusCode::BAD_GATEWAY,
            format!("cannot connect to port {port} in the MicroVM: {e}"),
        )
    }
}

fn connect_timed_out(port: u16) -> Reject {
    Reject::new(
        StatusCode::GATEWAY_TIMEOUT,
        format!("port {port} in the MicroVM did not accept a connection in time"),
    )
}

fn app_hung_up(port: u16) -> Reject {
    Reject::new(
        StatusCode::BAD_GATEWAY,
        format!("the app on port {port} closed the connection without a complete response"),
    )
}

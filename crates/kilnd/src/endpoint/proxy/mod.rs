//! The endpoint proxy: one TLS listener that gives every MicroVM its own HTTPS endpoint.
//!
//! `https://<microvm-id>.<domain>/…` reaches a port inside that MicroVM when the request
//! carries a token for it (`X-aws-proxy-auth`, or for WebSockets the subprotocol entry
//! `lambda-microvms.authentication.<token>`). The port is `X-aws-proxy-port`, else the
//! WebSocket entry `lambda-microvms.port.N`, else 8080. Everything is checked before any
//! upstream work: host, port, token, rate limit, body size. Bodies stream both ways;
//! WebSockets are tunnelled after the 101; gRPC from HTTP/2 clients goes to the app over
//! h2c so trailers survive. See `serve` for the connection rules (timeouts, limits).

mod activity;
mod body;
mod forward;
mod request;
pub mod sandbox;
mod shell;
mod upstream;

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::service::service_fn;
use hyper::StatusCode;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

pub use activity::{Activity, ActivityTable};
pub use request::{AUTH_HEADER, DEFAULT_PORT, PORT_HEADER};
pub use upstream::Upstream;

use crate::endpoint::tokens::{TokenKeys, Verified};
use crate::observe::metrics::ProxyCounters;
use activity::ConnectionGuard;
use forward::Upstreams;

/// Where the proxy finds a MicroVM's ports; implemented by the MicroVM supervisor.
pub trait Routes: Send + Sync {
    /// Where `port` inside `microvm_id` is reached (the supervisor may add a forward
    /// on demand).
    ///
    /// This is the hook for held requests: for a suspended VM with auto-resume, resolve only
    /// once the VM answers again (the proxy waits up to `ProxyLimits::route_timeout`).
    fn upstream(
        &self,
        microvm_id: &str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = Result<Upstream, RouteError>> + Send + '_>>;

    /// The guest agent of `microvm_id`, for a shell session (a suspended VM with auto-resume
    /// resumes first, as for `upstream`).
    fn agent(
        &self,
        microvm_id: &str,
    ) -> Pin<Box<dyn Future<Output = Result<kiln_agent::AgentClient, RouteError>> + Send + '_>>;
}

/// Why a MicroVM's port cannot be reached.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// No MicroVM has this id (answered 404).
    #[error("no such MicroVM")]
    UnknownMicrovm,
    /// The MicroVM exists but does not run (answered 409 with the state).
    #[error("the MicroVM is {state}")]
    NotRunning {
        /// The MicroVM's state, as the API names it.
        state: String,
    },
    /// Anything else that keeps the port out of reach for now (answered 503).
    #[error("{0}")]
    Unavailable(String),
}

/// Limits and timeouts of the endpoint; the defaults suit a public listener.
#[derive(Debug, Clone)]
pub struct ProxyLimits {
    /// Steady requests per second admitted per MicroVM (0 = unlimited).
    pub requests_per_second: u32,
    /// Requests a MicroVM may receive at once above the steady rate.
    pub burst: u32,
    /// Largest request (and response) header section, in bytes.
    pub max_header_bytes: usize,
    /// Largest request body, in bytes.
    pub max_body_bytes: u64,
    /// Time a client has to finish the TLS handshake.
    pub tls_handshake_timeout: Duration,
    /// Time an HTTP/1.1 client has to send a request's headers.
    pub header_read_timeout: Duration,
    /// A connection with no request in flight for this long is closed (tunnels: no bytes).
    pub idle_timeout: Duration,
    /// Time to open a TCP connection to the app.
    pub connect_timeout: Duration,
    /// Time `Routes::upstream` may take (e.g. while a suspended VM resumes).
    pub route_timeout: Duration,
    /// Most client connections carrying one MicroVM's traffic at once (0 = no cap); the
    /// next one's requests to it get 503.
    pub max_connections_per_vm: usize,
    /// Most connections open from one client address at once (0 = no cap); the next one
    /// gets 429 and is closed.
    pub max_connections_per_client: usize,
}

impl Default for ProxyLimits {
    fn default() -> Self {
        Self {
            requests_per_second: 1000,
            burst: 2000,
            max_header_bytes: 64 * 1024,
            max_body_bytes: 100 * 1024 * 1024,
            tls_handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            connect_timeout: Duration::from_secs(10),
            route_timeout: Duration::from_secs(60),
            max_connections_per_vm: 1000,
            max_connections_per_client: 256,
        }
    }
}

/// Everything the proxy needs to route, authorise and account a request.
pub struct ProxyState {
    /// Endpoint domain: MicroVMs are `<id>.<domain>`.
    pub domain: String,
    /// Keys that verify endpoint tokens.
    pub keys: Arc<TokenKeys>,
    /// Where MicroVM ports are.
    pub routes: Arc<dyn Routes>,
    /// Per-MicroVM traffic counters, shared with the idle policy.
    pub activity: ActivityTable,
    /// Limits and timeouts.
    pub limits: ProxyLimits,
    /// E2B sandboxes and their access tokens (`sandbox.rs`), when kilnd serves E2B's API.
    pub sandboxes: Option<Arc<dyn sandbox::SandboxAccess>>,
    /// What every answer and refusal adds to (`kiln_proxy_*` metrics).
    counters: ProxyCounters,
    upstreams: Upstreams,
    book: Arc<upstream::UpstreamBook>,
    clients: Arc<ClientAddresses>,
    stop: watch::Sender<bool>,
}

impl ProxyState {
    /// State for `serve`; keep a clone of `activity` for the idle policy.
    pub fn new(
        domain: impl Into<String>,
        keys: Arc<TokenKeys>,
        routes: Arc<dyn Routes>,
        activity: ActivityTable,
        limits: ProxyLimits,
    ) -> Self {
        let book = Arc::new(upstream::UpstreamBook::default());
        let upstreams = Upstreams::new(&limits, book.clone());
        Self {
            domain: domain.into().to_ascii_lowercase(),
            keys,
            routes,
            activity,
            limits,
            sandboxes: None,
            counters: ProxyCounters::default(),
            upstreams,
            book,
            clients: Arc::default(),
            stop: watch::Sender::new(false),
        }
    }

    /// The same state, routing E2B sandboxes with `sandboxes`.
    pub fn with_sandboxes(mut self, sandboxes: Option<Arc<dyn sandbox::SandboxAccess>>) -> Self {
        self.sandboxes = sandboxes;
        self
    }

    /// The same state, counting its answers in `counters` (kilnd's registry).
    pub fn with_counters(mut self, counters: ProxyCounters) -> Self {
        self.counters = counters;
        self
    }

    /// Stops `serve`: no new connections; open ones finish their requests and close.
    pub fn shutdown(&self) {
        self.stop.send_replace(true);
    }
}

/// A refusal sent before (or instead of) reaching the app: status and a short reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    status: StatusCode,
    reason: String,
    retry_after: Option<u64>,
}

impl Reject {
    fn new(status: StatusCode, reason: String) -> Self {
        Self {
            status,
            reason,
            retry_after: None,
        }
    }
}

/// Serves the endpoint on `listener` until it fails or `ProxyState::shutdown` is called.
///
/// Per connection: the TLS handshake must finish within `tls_handshake_timeout`; ALPN picks
/// HTTP/2 or HTTP/1.1; HTTP/1.1 headers must arrive within `header_read_timeout`; header
/// sections above `max_header_bytes` get 431; a connection with nothing in flight for
/// `idle_timeout` is closed.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    state: Arc<ProxyState>,
) -> io::Result<()> {
    let acceptor = TlsAcceptor::from(tls);
    let mut stop = state.stop.subscribe();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|stop| *stop) => return Ok(()),
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) if transient(&e) => {
                tracing::warn!(error = %e, "endpoint: accept failed; retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        let _ = tcp.set_nodelay(true);
        tokio::spawn(connection(tcp, peer, acceptor.clone(), state.clone()));
    }
}

/// Answers the requests of a connection over the per-address cap with 429, briefly, and
/// closes it: the client learns why rather than seeing a reset.
async fn refuse(
    tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    http2: bool,
    state: Arc<ProxyState>,
) {
    let limits = &state.limits;
    let most = limits.max_connections_per_client;
    let service = {
        let state = state.clone();
        service_fn(move |_req| {
            let state = state.clone();
            async move {
                let reject = Reject {
                    status: StatusCode::TOO_MANY_REQUESTS,
                    reason: format!(
                        "too many connections from your address (at most {most} at once); \
                         close some or reuse them"
                    ),
                    retry_after: Some(1),
                };
                state.counters.refused(reject.status.as_u16());
                Ok::<_, std::convert::Infallible>(forward::refusal(reject))
            }
        })
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(false);
    builder.http2().timer(TokioTimer::new());
    let builder = if http2 {
        builder.http2_only()
    } else {
        builder.http1_only()
    };
    let conn = builder.serve_connection(TokioIo::new(tls), service);
    let _ = tokio::time::timeout(limits.header_read_timeout, conn).await;
}

/// Accept errors that concern one connection or a passing shortage, not the listener.
fn transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    ) || matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Open connections per client address; an address leaves the map with its last one, so
/// the map never holds more entries than there are open connections.
#[derive(Default)]
struct ClientAddresses {
    open: Mutex<HashMap<IpAddr, usize>>,
}

impl ClientAddresses {
    /// Counts one more connection from `ip` unless it already has `most` (0 = no cap).
    fn open(self: &Arc<Self>, ip: IpAddr, most: usize) -> Option<AddressSlot> {
        let ip = ip.to_canonical();
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(ip).or_insert(0);
        if most > 0 && *n >= most {
            if *n == 0 {
                open.remove(&ip);
            }
            return None;
        }
        *n += 1;
        Some(AddressSlot(self.clone(), ip))
    }
}

/// One connection from an address, counted until dropped.
struct AddressSlot(Arc<ClientAddresses>, IpAddr);

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut open = self.0.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.1) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.1);
            }
        }
    }
}

/// One client connection: what the proxy knows of it while it serves requests.
pub(crate) struct ClientConnection {
    peer: SocketAddr,
    opened: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds since `opened` when the last request finished.
    last_done: AtomicU64,
    /// Open-connection counts of the VMs this connection has carried.
    vms: Mutex<Vec<(String, ConnectionGuard)>>,
    /// An HTTP/2 client multiplexes its requests: they share the pooled upstream clients.
    http2: bool,
    /// An HTTP/1.1 client's connection to the app its last request went to.
    kept: upstream::KeptSlot,
    /// The last token this connection presented that verified, and what it verified to.
    token: Mutex<Option<(Box<str>, Arc<Verified>)>>,
}

impl ClientConnection {
    fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    fn idle_for(&self) -> Option<Duration> {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return None;
        }
        let done = Duration::from_millis(self.last_done.load(Ordering::Relaxed));
        Some(self.opened.elapsed().saturating_sub(done))
    }

    /// What `token` verified to, when it is the last token this connection presented.
    fn last_token(&self, token: &str) -> Option<Arc<Verified>> {
        let last = self.token.lock().unwrap_or_else(|p| p.into_inner());
        last.as_ref()
            .filter(|(known, _)| **known == *token)
            .map(|(_, verified)| verified.clone())
    }

    fn remember_token(&self, token: &str, verified: &Arc<Verified>) {
        *self.token.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((token.into(), verified.clone()));
    }

    /// Counts this connection as open for `microvm_id` (once per VM); 503 when the VM
    /// already has `most` connections (0 = no cap).
    fn carries(
        &self,
        microvm_id: &str,
        activity: &Arc<activity::VmActivity>,
        most: usize,
    ) -> Result<(), Reject> {
        let mut vms = self.vms.lock().unwrap_or_else(|p| p.into_inner());
        if vms.iter().any(|(id, _)| id == microvm_id) {
            return Ok(());
        }
        let guard = activity.try_open_connection(most).ok_or_else(|| Reject {
            status: StatusCode::SERVICE_UNAVAILABLE,
            reason: format!(
                "MicroVM {microvm_id} already has {most} open connections, the most it may \
                 have; reuse a connection or retry later"
            ),
            retry_after: Some(1),
        })?;
        vms.push((microvm_id.to_string(), guard));
        Ok(())
    }
}

/// A request in flight on a client connection; dropped when its response body ends.
pub(crate) struct InFlight(Arc<ClientConnection>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let ms = u64::try_from(self.0.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.0.last_done.fetch_max(ms, Ordering::Relaxed);
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn connection(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    state: Arc<ProxyState>,
) {
    let limits = &state.limits;
    let tls = match tokio::time::timeout(limits.tls_handshake_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "endpoint: TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "endpoint: TLS handshake timed out");
            return;
        }
    };
    let http2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let Some(_slot) = state
        .clients
        .open(peer.ip(), limits.max_connections_per_client)
    else {
        tracing::debug!(%peer, "endpoint: too many connections from this address");
        return refuse(tls, http2, state).await;
    };
    let client = Arc::new(ClientConnection {
        peer,
        opened: Instant::now(),
        in_flight: AtomicUsize::new(0),
        last_done: AtomicU64::new(0),
        vms: Mutex::new(Vec::new()),
        http2,
        kept: upstream::KeptSlot::default(),
        token: Mutex::new(None),
    });
    let service = {
        let state = state.clone();
        let client = client.clone();
        service_fn(move |req| {
            let state = state.clone();
            let client = client.clone();
            async move { Ok::<_, std::convert::Infallible>(forward::handle(req, state, client).await) }
        })
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    let header_bytes = limits.max_header_bytes.max(8 * 1024);
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(header_bytes)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(256)
        .enable_connect_protocol()
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20));
    let builder = if http2 {
        builder.http2_only()
    } else {
        builder.http1_only()
    };
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
    tokio::pin!(conn);
    let mut stop = state.stop.subscribe();
    let idle_timeout = limits.idle_timeout;
    let mut closing = false;
    loop {
        let check_in = match client.idle_for() {
            Some(idle) => idle_timeout.saturating_sub(idle),
            None => idle_timeout,
        };
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(%peer, error = %e, "endpoint: connection ended with an error");
                }
                return;
            }
            _ = tokio::time::sleep(check_in), if !closing => {
                if client.idle_for().is_some_and(|idle| idle >= idle_timeout) {
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
            _ = stop.wait_for(|stop| *stop), if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
        }
        if closing {
            // Requests still running get a while to finish; then the connection is dropped.
            let _ = tokio::time::timeout(Duration::from_secs(30), conn.as_mut()).await;
            return;
        }
    }
}

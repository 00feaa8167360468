//! The endpoint proxy end to end: a real TLS listener, local upstream apps standing in for
//! MicroVMs, and clients speaking HTTP/1.1, HTTP/2, WebSocket and gRPC-like h2c.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::header::HeaderMap;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use kiln_api::shapes::microvm::PortSpecification;
use kilnd::endpoint::proxy::{
    self, ActivityTable, ProxyLimits, ProxyState, RouteError, Routes, Upstream,
};
use kilnd::endpoint::tokens::{Minters, TokenClaims, TokenKeys, TokenKind};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const DOMAIN: &str = "kiln.localhost";
type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

/// The supervisor stand-in: a map from (VM, port) to a local app.
#[derive(Default)]
struct MapRoutes {
    apps: Mutex<HashMap<(String, u16), SocketAddr>>,
    states: Mutex<HashMap<String, String>>,
    /// A guest agent (served in-process on the host) for shell sessions.
    agent: Mutex<Option<std::path::PathBuf>>,
}

impl Routes for MapRoutes {
    fn upstream(
        &self,
        microvm_id: &str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = Result<Upstream, RouteError>> + Send + '_>> {
        let id = microvm_id.to_string();
        Box::pin(async move {
            if let Some(state) = self.states.lock().expect("lock").get(&id) {
                return Err(RouteError::NotRunning {
                    state: state.clone(),
                });
            }
            self.apps
                .lock()
                .expect("lock")
                .get(&(id, port))
                .copied()
                .map(Upstream::host)
                .ok_or(RouteError::UnknownMicrovm)
        })
    }

    fn agent(
        &self,
        _microvm_id: &str,
    ) -> Pin<Box<dyn Future<Output = Result<kiln_agent::AgentClient, RouteError>> + Send + '_>>
    {
        let socket = self.agent.lock().expect("lock").clone();
        Box::pin(async move {
            let socket = socket.ok_or(RouteError::UnknownMicrovm)?;
            kiln_agent::AgentClient::connect(&socket, Duration::from_secs(10))
                .await
                .map_err(|e| RouteError::Unavailable(e.to_string()))
        })
    }
}

/// A proxy on a loopback port, its keys, routes and a client that trusts its CA.
struct Endpoint {
    addr: SocketAddr,
    state: Arc<ProxyState>,
    keys: Arc<TokenKeys>,
    routes: Arc<MapRoutes>,
    connector: TlsConnector,
    h2_connector: TlsConnector,
    _home: tempfile::TempDir,
}

impl Endpoint {
    async fn start() -> Endpoint {
        Self::with_limits(ProxyLimits {
            header_read_timeout: Duration::from_secs(1),
            tls_handshake_timeout: Duration::from_secs(1),
            ..ProxyLimits::default()
        })
        .await
    }

    async fn with_limits(limits: ProxyLimits) -> Endpoint {
        Self::with_minters(limits, None).await
    }

    /// An endpoint whose tokens are refused once `minters` says their access key is gone.
    async fn with_minters(limits: ProxyLimits, minters: Option<Arc<dyn Minters>>) -> Endpoint {
        let home = tempfile::tempdir().expect("temp home");
        let mut keys = TokenKeys::load_or_create(home.path()).expect("token keys");
        if let Some(minters) = minters {
            keys = keys.with_minters(minters);
        }
        let keys = Arc::new(keys);
        let tls = kilnd::endpoint::tls::load_or_create(home.path(), DOMAIN).expect("endpoint TLS");
        let routes = Arc::new(MapRoutes::default());
        let state = Arc::new(ProxyState::new(
            DOMAIN,
            keys.clone(),
            routes.clone(),
            ActivityTable::new(),
            limits,
        ));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(proxy::serve(listener, tls.server_config, state.clone()));
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&tls.ca_pem_path).expect("CA file") {
            roots.add(cert.expect("CA cert")).expect("CA trusted");
        }
        let client = |alpn: &[&[u8]]| {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("TLS versions")
                .with_root_certificates(roots.clone())
                .with_no_client_auth();
            config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            TlsConnector::from(Arc::new(config))
        };
        Endpoint {
            addr,
            state,
            keys,
            routes,
            connector: client(&[b"http/1.1"]),
            h2_connector: client(&[b"h2"]),
            _home: home,
        }
    }

    fn add_app(&self, id: &str, port: u16, addr: SocketAddr) {
        self.routes
            .apps
            .lock()
            .expect("lock")
            .insert((id.to_string(), port), addr);
    }

    fn token(&self, kind: TokenKind, id: &str, port: i32) -> String {
        let claims =
            TokenClaims::new(kind, id, vec![PortSpecification::Port(port)], 5).expect("claims");
        self.keys.issue(&claims).expect("token")
    }

    fn proxy_token(&self, id: &str) -> String {
        self.token(TokenKind::Proxy, id, 8080)
    }

    /// A TLS connection whose SNI names no MicroVM: routing goes by Host alone.
    async fn tls(&self, connector: &TlsConnector) -> TlsStream<TcpStream> {
        let tcp = TcpStream::connect(self.addr).await.expect("connect");
        let name = ServerName::try_from(format!("probe.{DOMAIN}")).expect("name");
        connector.connect(name, tcp).await.expect("TLS handshake")
    }

    async fn http1(&self) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
        let tls = self.tls(&self.connector).await;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .expect("HTTP/1.1 handshake");
        tokio::spawn(conn);
        sender
    }

    async fn http2(&self) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
        let tls = self.tls(&self.h2_connector).await;
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .expect("HTTP/2 handshake");
        tokio::spawn(conn);
        sender
    }

    /// GET `path` on `id` over a new HTTP/1.1 connection, with `headers`.
    async fn get(&self, id: &str, headers: &[(&str, &str)]) -> Answer {
        let mut req = Request::get("/hello?x=1").header("host", format!("{id}.{DOMAIN}"));
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let req = req.body(Full::new(Bytes::new())).expect("request");
        let response = self
            .http1()
            .await
            .send_request(req)
            .await
            .expect("response");
        Answer::read(response).await
    }
}

/// Status, headers and text of a response.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    text: String,
}

impl Answer {
    async fn read(response: Response<Incoming>) -> Answer {
        let (parts, body) = response.into_parts();
        let bytes = body.collect().await.expect("body").to_bytes();
        Answer {
            status: parts.status,
            headers: parts.headers,
            text: String::from_utf8_lossy(&bytes).into_owned(),
        }
    }
}

fn full(text: impl Into<Bytes>) -> Body {
    Full::new(text.into()).boxed_unsync()
}

/// An HTTP/1.1 app answering every request with `name`, the version and the headers it got.
async fn echo_app(name: &'static str) -> SocketAddr {
    serve_app(move |req: Request<Incoming>| async move {
        let mut text = format!("{name} {:?} {}\n", req.version(), req.uri());
        for (k, v) in req.headers() {
            text.push_str(&format!("{k}: {}\n", v.to_str().unwrap_or("?")));
        }
        Response::new(full(text))
    })
    .await
}

/// Serves `handler` over HTTP/1.1 on a loopback port.
async fn serve_app<F, Fut>(handler: F) -> SocketAddr
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind app");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let handler = handler.clone();
            let service = service_fn(move |req| {
                let handler = handler.clone();
                async move { Ok::<_, Infallible>(handler(req).await) }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .with_upgrades(),
            );
        }
    });
    addr
}

/// A loopback port with nothing listening on it.
async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    listener.local_addr().expect("addr")
}

#[tokio::test]
async fn routing_when_two_vms_then_each_reaches_its_own_app() {
    let endpoint = Endpoint::start().await;
    endpoint.add_app("mvm-a", 8080, echo_app("app-a").await);
    endpoint.add_app("mvm-b", 8080, echo_app("app-b").await);

    let a = endpoint
        .get(
            "mvm-a",
            &[("x-aws-proxy-auth", &endpoint.proxy_token("mvm-a"))],
        )
        .await;
    let b = endpoint
        .get(
            "mvm-b",
            &[("x-aws-proxy-auth", &endpoint.proxy_token("mvm-b"))],
        )
        .await;

    assert_eq!((a.status, b.status), (StatusCode::OK, StatusCode::OK));
    assert!(
        a.text.starts_with("app-a HTTP/1.1 /hello?x=1"),
        "{}",
        a.text
    );
    assert!(
        b.text.starts_with("app-b HTTP/1.1 /hello?x=1"),
        "{}",
        b.text
    );
}

#[tokio::test]
async fn routing_when_port_header_then_that_port_in_the_vm() {
    let endpoint = Endpoint::start().await;
    endpoint.add_app("mvm-a", 8080, echo_app("port-8080").await);
    endpoint.add_app("mvm-a", 3000, echo_app("port-3000").await);
    let token = endpoint.token(TokenKind::Proxy, "mvm-a", 3000);

    let answer = endpoint
        .get(
            "mvm-a",
            &[("x-aws-proxy-auth", &token), ("x-aws-proxy-port", "3000")],
        )
        .await;

    assert_eq!(answer.status, StatusCode::OK);
    assert!(answer.text.starts_with("port-3000"), "{}", answer.text);
}

async fn forbidden(endpoint: &Endpoint, host_vm: &str, token: Option<&str>) -> Answer {
    endpoint.add_app("mvm-a", 8080, echo_app("app-a").await);
    endpoint.add_app("mvm-b", 8080, echo_app("app-b").await);
    let headers: Vec<(&str, &str)> = token.map(|t| ("x-aws-proxy-auth", t)).into_iter().collect();
    endpoint.get(host_vm, &headers).await
}

#[tokio::test]
async fn auth_when_token_missing_then_403_missing() {
    let endpoint = Endpoint::start().await;

    let answer = forbidden(&endpoint, "mvm-a", None).await;

    assert_eq!(answer.status, StatusCode::FORBIDDEN);
    assert!(answer.text.contains("missing token"), "{}", answer.text);
}

#[tokio::test]
async fn auth_when_token_malformed_then_403_malformed() {
    let endpoint = Endpoint::start().await;

    let answer = forbidden(&endpoint, "mvm-a", Some("not-a-token")).await;

    assert_eq!(answer.status, StatusCode::FORBIDDEN);
    assert!(answer.text.contains("malformed token"), "{}", answer.text);
}

#[tokio::test]
async fn auth_when_token_forged_then_403_invalid_without_echoing_it() {
    let endpoint = Endpoint::start().await;
    let other_kiln = tempfile::tempdir().expect("temp");
    let other_keys = TokenKeys::load_or_create(other_kiln.path()).expect("keys");
    let claims = TokenClaims::new(
        TokenKind::Proxy,
        "mvm-a",
        vec![PortSpecification::Port(8080)],
        5,
    )
    .expect("claims");
    let forged = other_keys.issue(&claims).expect("token");

    let answer = forbidden(&endpoint, "mvm-a", Some(&forged)).await;

    assert_eq!(answer.status, StatusCode::FORBIDDEN);
    assert!(answer.text.contains("invalid token"), "{}", answer.text);
    assert!(!answer.text.contains(&forged));
}

#[tokio::test]
async fn auth_when_token_tampered_then_403_invalid() {
    let endpoint = Endpoint::start().await;
    let token = endpoint.proxy_token("mvm-a");
    // Change the first ciphertext character: every bit of it counts, so the framing stays
    // valid and only the integrity check can catch it.
    let mut parts: Vec<String> = token.split('.').map(str::to_string).collect();
    let first = parts[3].remove(0);
    parts[3].insert(0, if first == 'A' { 'B' } else { 'A' });
    let tampered = parts.join(".");

    let answer = forbidden(&endpoint, "mvm-a", Some(&tampered)).await;

    assert_eq!(answer.status, StatusCode::FORBIDDEN);
    assert!(answer.text.contains("invalid token"), "{}", answer.text);
}

#[tokio::test]
async fn auth_when_token_expired_then_403_expired() {
    let endpoint = Endpoint::start().await;
    let mut claims = TokenClaims::new(
        TokenKind::Proxy,
        "mvm-a",
        vec![PortSpecification::Port(8080)],
        5,
    )
    .expect("claims");
    claims.iat -= 3600;
    claims.exp = claims.iat + 60;
    let expired = endpoint.keys.issue(&claims).expect("token");

    let answer = forbidden(&endpoint, "mvm-a", Some(&expired)).await;

    assert_eq!(answer.status, StatusCode::FORBIDDEN);
    assert!(answer.text.contains("expired token"), "{}", answer.text);
}

#[tokio::test]
async fn auth_when_token_for_other_vm_then_403_other_microvm() {
    let endpoint = Endpoint::start().await;
    let token_for_a = endpoint.proxy_token("mvm-a");

    let answer = forbidden(&endpoint, "mvm-b", Some(&token_for_a)).await;

    assert_eq!(answer.status, StatusCode::FORBIDDEN);
    assert!(answer.text.contains("another MicroVM"), "{}", answer.text);
}

#[tokio::test]
async fn auth_when_token_for_other_port_then_403_port() {
    let endpoint = Endpoint::start().await;
    let token = endpoint.token(TokenKind::Proxy, "mvm-a", 3000);

    let answer = forbidden(&endpoint, "mvm-a", Some(&token)).await;

    assert_eq!(answer.status, StatusCode::FORBIDDEN);
    assert!(
        answer.text.contains("does not allow port 8080"),
        "{}",
        answer.text
    );
}

#[tokio::test]
async fn auth_when_shell_token_on_a_plain_request_then_400_and_no_app_sees_it() {
    let endpoint = Endpoint::start().await;
    let shell = endpoint.token(TokenKind::Shell, "mvm-a", 8080);

    let answer = forbidden(&endpoint, "mvm-a", Some(&shell)).await;

    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert!(answer.text.contains("shell token"), "{}", answer.text);
}

#[tokio::test]
async fn routing_when_vm_unknown_then_404() {
    let endpoint = Endpoint::start().await;
    let token = endpoint.proxy_token("mvm-gone");

    let answer = endpoint
        .get("mvm-gone", &[("x-aws-proxy-auth", &token)])
        .await;

    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    assert!(
        answer.text.contains("no MicroVM mvm-gone"),
        "{}",
        answer.text
    );
}

#[tokio::test]
async fn routing_when_host_outside_domain_then_404() {
    let endpoint = Endpoint::start().await;
    let req = Request::get("/")
        .header("host", "example.com")
        .body(Full::new(Bytes::new()))
        .expect("request");

    let response = endpoint
        .http1()
        .await
        .send_request(req)
        .await
        .expect("response");
    let answer = Answer::read(response).await;

    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    assert!(
        answer.text.contains("<microvm-id>.kiln.localhost"),
        "{}",
        answer.text
    );
}

#[tokio::test]
async fn routing_when_vm_not_running_then_409_with_state() {
    let endpoint = Endpoint::start().await;
    endpoint
        .routes
        .states
        .lock()
        .expect("lock")
        .insert("mvm-a".into(), "SUSPENDED".into());
    let token = endpoint.proxy_token("mvm-a");

    let answer = endpoint.get("mvm-a", &[("x-aws-proxy-auth", &token)]).await;

    assert_eq!(answer.status, StatusCode::CONFLICT);
    assert!(answer.text.contains("SUSPENDED"), "{}", answer.text);
}

#[tokio::test]
async fn upstream_when_nothing_listening_then_502_names_port() {
    let endpoint = Endpoint::start().await;
    endpoint.add_app("mvm-a", 8080, closed_port().await);
    let token = endpoint.proxy_token("mvm-a");

    let answer = endpoint.get("mvm-a", &[("x-aws-proxy-auth", &token)]).await;

    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    assert_eq!(
        answer.text,
        "nothing is listening on port 8080 in the MicroVM\n"
    );
}

#[tokio::test]
async fn rate_limit_when_burst_spent_then_429_with_retry_after() {
    let endpoint = Endpoint::with_limits(ProxyLimits {
        requests_per_second: 1,
        burst: 2,
        ..ProxyLimits::default()
    })
    .await;
    endpoint.add_app("mvm-a", 8080, echo_app("app-a").await);
    let token = endpoint.proxy_token("mvm-a");
    let auth = [("x-aws-proxy-auth", token.as_str())];

    let first = endpoint.get("mvm-a", &auth).await;
    let second = endpoint.get("mvm-a", &auth).await;
    let third = endpoint.get("mvm-a", &auth).await;

    assert_eq!(
        (first.status, second.status),
        (StatusCode::OK, StatusCode::OK)
    );
    assert_eq!(third.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(third.headers["retry-after"], "1");
}

#[tokio::test]
async fn forwarding_when_proxy_headers_sent_then_app_never_sees_them() {
    let endpoint = Endpoint::start().await;
    endpoint.add_app("mvm-a", 8080, echo_app("app-a").await);
    let token = endpoint.proxy_token("mvm-a");

    let answer = endpoint
        .get(
            "mvm-a",
            &[
                ("x-aws-proxy-auth", &token),
                ("x-aws-proxy-port", "8080"),
                ("x-aws-proxy-debug", "1"),
                ("x-forwarded-for", "203.0.113.9"),
                ("proxy-authorization", "Basic Zm9vOmJhcg=="),
                ("connection", "keep-alive, x-drop-me"),
                ("x-drop-me", "1"),
                ("x-app-header", "kept"),
            ],
        )
        .await;

    assert_eq!(answer.status, StatusCode::OK);
    let seen = answer.text.to_ascii_lowercase();
    assert!(!seen.contains("x-aws-proxy-"), "{seen}");
    assert!(!seen.contains(&token.to_ascii_lowercase()), "{seen}");
    assert!(!seen.contains("proxy-authorization"), "{seen}");
    assert!(!seen.contains("x-drop-me"), "{seen}");
    assert!(seen.contains("x-forwarded-for: 127.0.0.1\n"), "{seen}");
    assert!(seen.contains("x-forwarded-proto: https\n"), "{seen}");
    assert!(seen.contains("host: mvm-a.kiln.localhost\n"), "{seen}");
    assert!(seen.contains("x-app-header: kept\n"), "{seen}");
}

#[tokio::test]
async fn http2_when_client_speaks_h2_then_app_gets_http1() {
    let endpoint = Endpoint::start().await;
    endpoint.add_app("mvm-a", 8080, echo_app("app-a").await);
    let req = Request::get(format!("https://mvm-a.{DOMAIN}/over/h2"))
        .header("x-aws-proxy-auth", endpoint.proxy_token("mvm-a"))
        .body(Full::new(Bytes::new()))
        .expect("request");

    let response = endpoint
        .http2()
        .await
        .send_request(req)
        .await
        .expect("response");
    let answer = Answer::read(response).await;

    assert_eq!(answer.status, StatusCode::OK);
    assert!(
        answer.text.starts_with("app-a HTTP/1.1 /over/h2"),
        "{}",
        answer.text
    );
}

/// An h2c (prior knowledge) app that answers like gRPC: a data frame, then trailers.
async fn grpc_app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let service = service_fn(|req: Request<Incoming>| async move {
                let version = format!("{:?}", req.version());
                let got = req.into_body().collect().await.map(|b| b.to_bytes());
                let (tx, body) = http_body_util::channel::Channel::<Bytes, Infallible>::new(4);
                let mut tx = tx;
                tokio::spawn(async move {
                    let echoed = got.unwrap_or_default();
                    let _ = tx.send_data(Bytes::from(format!("{version} "))).await;
                    let _ = tx.send_data(echoed).await;
                    let mut trailers = HeaderMap::new();
                    trailers.insert("grpc-status", "0".parse().expect("value"));
                    trailers.insert("grpc-message", "fine".parse().expect("value"));
                    let _ = tx.send_trailers(trailers).await;
                });
                let mut response = Response::new(body.boxed_unsync());
                response
                    .headers_mut()
                    .insert("content-type", "application/grpc".parse().expect("value"));
                Ok::<_, Infallible>(response)
            });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), service),
            );
        }
    });
    addr
}

#[tokio::test]
async fn grpc_when_client_speaks_h2_then_app_gets_h2c_and_trailers_come_back() {
    let endpoint = Endpoint::start().await;
    endpoint.add_app("mvm-a", 8080, grpc_app().await);
    let req = Request::post(format!("https://mvm-a.{DOMAIN}/pkg.Service/Call"))
        .header("x-aws-proxy-auth", endpoint.proxy_token("mvm-a"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\x02hi")))
        .expect("request");

    let response = endpoint
        .http2()
        .await
        .send_request(req)
        .await
        .expect("response");
    let collected = response.into_body().collect().await.expect("body");
    let trailers = collected.trailers().cloned().expect("trailers");
    let data = collected.to_bytes();

    assert_eq!(&data[..], b"HTTP/2.0 \0\0\0\0\x02hi");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["grpc-message"], "fine");
}

#[tokio::test]
async fn sse_when_app_sends_events_apart_then_client_gets_each_before_the_next_is_sent() {
    let endpoint = Endpoint::start().await;
    let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
    let release = Arc::new(Mutex::new(Some(release_rx)));
    let app = serve_app(move |_req| {
        let release = release.clone();
        async move {
            let (mut tx, body) = http_body_util::channel::Channel::<Bytes, Infallible>::new(1);
            tokio::spawn(async move {
                let _ = tx.send_data(Bytes::from_static(b"data: one\n\n")).await;
                let waiting = release.lock().expect("lock").take();
                if let Some(waiting) = waiting {
                    let _ = waiting.await;
                }
                let _ = tx.send_data(Bytes::from_static(b"data: two\n\n")).await;
            });
            let mut response = Response::new(body.boxed_unsync());
            response
                .headers_mut()
                .insert("content-type", "text/event-stream".parse().expect("value"));
            response
        }
    })
    .await;
    endpoint.add_app("mvm-a", 8080, app);
    let req = Request::get("/events")
        .header("host", format!("mvm-a.{DOMAIN}"))
        .header("x-aws-proxy-auth", endpoint.proxy_token("mvm-a"))
        .body(Full::new(Bytes::new()))
        .expect("request");

    let response = endpoint
        .http1()
        .await
        .send_request(req)
        .await
        .expect("response");
    let mut body = response.into_body();
    let first = next_data(&mut body).await;
    release_tx.send(()).expect("app waiting");
    let second = next_data(&mut body).await;

    assert_eq!(first, "data: one\n\n");
    assert_eq!(second, "data: two\n\n");
}

async fn next_data(body: &mut Incoming) -> String {
    loop {
        let frame: Frame<Bytes> = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .expect("a frame before the timeout")
            .expect("a frame")
            .expect("no error");
        if let Ok(data) = frame.into_data() {
            return String::from_utf8_lossy(&data).into_owned();
        }
    }
}

/// A WebSocket app that picks `echo.v1`, records the request's subprotocols and echoes.
// tungstenite fixes the callback's error type; it is not ours to shrink.
#[allow(clippy::result_large_err)]
async fn websocket_app(seen_protocols: Arc<Mutex<Option<String>>>) -> SocketAddr {
    use tokio_tungstenite::tungstenite::handshake::server::{
        ErrorResponse, Request as WsRequest, Response as WsResponse,
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let seen = seen_protocols.clone();
            tokio::spawn(async move {
                let callback = move |req: &WsRequest, mut resp: WsResponse| {
                    let protocols = req
                        .headers()
                        .get("sec-websocket-protocol")
                        .map(|v| v.to_str().unwrap_or("?").to_string());
                    *seen.lock().expect("lock") = protocols;
                    resp.headers_mut()
                        .insert("sec-websocket-protocol", "echo.v1".parse().expect("value"));
                    Ok::<_, ErrorResponse>(resp)
                };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tcp, callback).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_text() || msg.is_binary() {
                        let _ = ws.send(msg).await;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn websocket_when_token_and_port_in_subprotocols_then_echo_and_app_sees_only_its_own() {
    let endpoint = Endpoint::start().await;
    let seen = Arc::new(Mutex::new(None));
    endpoint.add_app("mvm-a", 9000, websocket_app(seen.clone()).await);
    let token = endpoint.token(TokenKind::Proxy, "mvm-a", 9000);
    let mut req = format!("wss://mvm-a.{DOMAIN}/ws")
        .into_client_request()
        .expect("request");
    let protocols =
        format!("echo.v1, lambda-microvms.port.9000, lambda-microvms.authentication.{token}");
    req.headers_mut()
        .insert("sec-websocket-protocol", protocols.parse().expect("value"));
    let tls = endpoint.tls(&endpoint.connector).await;

    let (mut ws, response) = tokio_tungstenite::client_async(req, tls)
        .await
        .expect("WebSocket handshake");
    ws.send(Message::text("ping 1")).await.expect("send");
    let echoed = ws.next().await.expect("a message").expect("no error");

    assert_eq!(response.headers()["sec-websocket-protocol"], "echo.v1");
    assert_eq!(echoed, Message::text("ping 1"));
    assert_eq!(seen.lock().expect("lock").as_deref(), Some("echo.v1"));
    let activity = endpoint.state.activity.snapshot("mvm-a").expect("activity");
    assert_eq!(activity.requests, 1);
    assert!(activity.bytes_in > 0 && activity.bytes_out > 0);
}

#[tokio::test]
async fn websocket_when_client_uses_http2_extended_connect_then_echo() {
    let endpoint = Endpoint::start().await;
    let seen = Arc::new(Mutex::new(None));
    endpoint.add_app("mvm-a", 8080, websocket_app(seen.clone()).await);
    let mut req = Request::connect(format!("https://mvm-a.{DOMAIN}/ws"))
        .header("x-aws-proxy-auth", endpoint.proxy_token("mvm-a"))
        .header("sec-websocket-version", "13")
        .header("sec-websocket-protocol", "echo.v1")
        .body(Full::new(Bytes::new()))
        .expect("request");
    req.extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));

    let mut response = endpoint
        .http2()
        .await
        .send_request(req)
        .await
        .expect("response");
    let status = response.status();
    let upgraded = hyper::upgrade::on(&mut response).await.expect("stream");
    let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
        TokioIo::new(upgraded),
        tokio_tungstenite::tungstenite::protocol::Role::Client,
        None,
    )
    .await;
    ws.send(Message::text("over h2")).await.expect("send");
    let echoed = ws.next().await.expect("a message").expect("no error");

    assert_eq!(status, StatusCode::OK);
    assert_eq!(response.headers()["sec-websocket-protocol"], "echo.v1");
    assert_eq!(echoed, Message::text("over h2"));
}

#[tokio::test]
async fn websocket_when_token_missing_then_403_before_app() {
    let endpoint = Endpoint::start().await;
    let seen = Arc::new(Mutex::new(None));
    endpoint.add_app("mvm-a", 8080, websocket_app(seen.clone()).await);
    let req = format!("wss://mvm-a.{DOMAIN}/ws")
        .into_client_request()
        .expect("request");
    let tls = endpoint.tls(&endpoint.connector).await;

    let result = tokio_tungstenite::client_async(req, tls).await;

    let status = match result {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => Some(response.status()),
        _ => None,
    };
    assert_eq!(status, Some(StatusCode::FORBIDDEN));
    assert_eq!(*seen.lock().expect("lock"), None);
}

#[tokio::test]
async fn host_when_vm_b_with_token_for_vm_a_then_403() {
    let endpoint = Endpoint::start().await;
    endpoint.add_app("mvm-a", 8080, echo_app("app-a").await);
    endpoint.add_app("mvm-b", 8080, echo_app("app-b").await);
    let token_for_a = endpoint.proxy_token("mvm-a");

    let answer = endpoint
        .get("mvm-b", &[("x-aws-proxy-auth", &token_for_a)])
        .await;

    assert_eq!(answer.status, StatusCode::FORBIDDEN);
    assert!(!answer.text.contains("app-b"));
}

#[tokio::test]
async fn headers_when_larger_than_limit_then_431() {
    let endpoint = Endpoint::start().await;
    endpoint.add_app("mvm-a", 8080, echo_app("app-a").await);
    let token = endpoint.proxy_token("mvm-a");
    let big = "x".repeat(8 * 1024);
    let many: Vec<(String, &str)> = (0..10)
        .map(|i| (format!("x-big-{i}"), big.as_str()))
        .collect();
    let mut headers: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    headers.push(("x-aws-proxy-auth", &token));

    let answer = endpoint.get("mvm-a", &headers).await;

    assert_eq!(answer.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
}

#[tokio::test]
async fn body_when_declared_larger_than_limit_then_413() {
    let endpoint = Endpoint::with_limits(ProxyLimits {
        max_body_bytes: 1024,
        ..ProxyLimits::default()
    })
    .await;
    endpoint.add_app("mvm-a", 8080, echo_app("app-a").await);
    let req = Request::post("/upload")
        .header("host", format!("mvm-a.{DOMAIN}"))
        .header("x-aws-proxy-auth", endpoint.proxy_token("mvm-a"))
        .body(Full::new(Bytes::from(vec![b'x'; 4096])))
        .expect("request");

    let response = endpoint
        .http1()
        .await
        .send_request(req)
        .await
        .expect("response");

    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn body_when_streamed_past_limit_then_413() {
    let endpoint = Endpoint::with_limits(ProxyLimits {
        max_body_bytes: 1024,
        ..ProxyLimits::default()
    })
    .await;
    let app = serve_app(|req: Request<Incoming>| async move {
        let got = req.into_body().collect().await.map(|b| b.to_bytes().len());
        Response::new(full(format!("{got:?}")))
    })
    .await;
    endpoint.add_app("mvm-a", 8080, app);
    let (mut tx, body) = http_body_util::channel::Channel::<Bytes, Infallible>::new(4);
    tokio::spawn(async move {
        for _ in 0..8 {
            if tx.send_data(Bytes::from(vec![b'x'; 512])).await.is_err() {
                return;
            }
        }
    });
    let req = Request::post("/upload")
        .header("host", format!("mvm-a.{DOMAIN}"))
        .header("x-aws-proxy-auth", endpoint.proxy_token("mvm-a"))
        .body(body)
        .expect("request");
    let tls = endpoint.tls(&endpoint.connector).await;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("handshake");
    tokio::spawn(conn);

    let response = sender.send_request(req).await.expect("response");

    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn slow_loris_when_headers_never_finish_then_disconnected() {
    let endpoint = Endpoint::start().await;
    let mut tls = endpoint.tls(&endpoint.connector).await;
    tls.write_all(format!("GET / HTTP/1.1\r\nHost: mvm-a.{DOMAIN}\r\nX-Slow: ").as_bytes())
        .await
        .expect("partial headers");

    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), tls.read_to_end(&mut rest)).await;

    let closed = matches!(read, Ok(Ok(_)) | Ok(Err(_)));
    assert!(closed, "the proxy kept a half-sent request open");
    assert!(!String::from_utf8_lossy(&rest).contains("200 OK"));
}

#[tokio::test]
async fn slow_loris_when_tls_handshake_never_starts_then_disconnected() {
    let endpoint = Endpoint::start().await;
    let mut tcp = TcpStream::connect(endpoint.addr).await.expect("connect");

    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), tcp.read_to_end(&mut rest)).await;

    assert!(read.is_ok(), "the proxy kept a silent connection open");
}

#[tokio::test]
async fn activity_when_requests_served_then_counted_and_idle_measured() {
    let endpoint = Endpoint::start().await;
    endpoint.add_app("mvm-a", 8080, echo_app("app-a").await);
    let token = endpoint.proxy_token("mvm-a");

    endpoint.get("mvm-a", &[("x-aws-proxy-auth", &token)]).await;
    endpoint.get("mvm-a", &[("x-aws-proxy-auth", &token)]).await;
    let activity = endpoint.state.activity.snapshot("mvm-a").expect("activity");
    let idle = endpoint.state.activity.idle_for("mvm-a");
    endpoint.state.activity.forget("mvm-a");

    assert_eq!(activity.requests, 2);
    assert!(activity.bytes_out > 0);
    assert!(idle.is_some());
    assert_eq!(endpoint.state.activity.snapshot("mvm-a"), None);
}

#[tokio::test]
async fn shutdown_when_signalled_then_listener_stops_accepting() {
    let endpoint = Endpoint::start().await;

    endpoint.state.shutdown();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let connected = TcpStream::connect(endpoint.addr).await;

    assert!(connected.is_err());
}

/// kiln's guest agent served on a unix socket in this process (it runs host commands).
fn host_agent(dir: &std::path::Path) -> std::path::PathBuf {
    use kiln_agent::guest::agent::{Agent, AgentConfig, EofPolicy};
    let socket = dir.join("agent.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).expect("bind agent socket");
    std::thread::spawn(move || {
        let agent = Agent::new(AgentConfig { guest_ops: false });
        for stream in listener.incoming().flatten() {
            let agent = agent.clone();
            std::thread::spawn(move || {
                let writer = stream.try_clone().expect("clone stream");
                let _ = agent.serve(stream, writer, EofPolicy::Return);
            });
        }
    });
    socket
}

#[tokio::test]
async fn shell_when_a_shell_token_opens_a_websocket_then_a_terminal_runs_typed_commands() {
    let endpoint = Endpoint::start().await;
    let dir = tempfile::tempdir().expect("dir");
    *endpoint.routes.agent.lock().expect("lock") = Some(host_agent(dir.path()));
    let shell_token = endpoint.token(TokenKind::Shell, "mvm-s", 0);
    let mut req = format!("wss://mvm-s.{DOMAIN}/?cols=100&rows=30")
        .into_client_request()
        .expect("request");
    req.headers_mut()
        .insert("x-aws-proxy-auth", shell_token.parse().expect("value"));
    let tls = endpoint.tls(&endpoint.connector).await;

    let (mut ws, _) = tokio_tungstenite::client_async(req, tls)
        .await
        .expect("WebSocket handshake");
    let mut output = Vec::new();
    let mut closed = None;
    ws.send(Message::binary(&b"stty size; echo $((6*7))\n"[..]))
        .await
        .expect("type");
    while !String::from_utf8_lossy(&output).contains("42\r\n") {
        match ws.next().await {
            Some(Ok(Message::Binary(data))) => output.extend_from_slice(&data),
            other => panic!("{other:?}: {}", String::from_utf8_lossy(&output)),
        }
    }
    ws.send(Message::text(r#"{"resize":{"cols":90,"rows":20}}"#))
        .await
        .expect("resize");
    ws.send(Message::binary(&b"stty size; exit 5\n"[..]))
        .await
        .expect("type");
    while let Some(Ok(message)) = ws.next().await {
        match message {
            Message::Binary(data) => output.extend_from_slice(&data),
            Message::Close(frame) => closed = frame.map(|f| f.reason.to_string()),
            _ => {}
        }
    }

    let text = String::from_utf8_lossy(&output);
    assert!(text.contains("30 100"), "{text}");
    assert!(text.contains("42"), "{text}");
    assert!(text.contains("20 90"), "{text}");
    assert_eq!(closed.as_deref(), Some("exit 5"));
}

/// A GET of `/hello` on `id` over an open HTTP/1.1 connection.
async fn get_on(
    sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    id: &str,
    token: &str,
) -> Answer {
    let req = Request::get("/hello")
        .header("host", format!("{id}.{DOMAIN}"))
        .header("x-aws-proxy-auth", token)
        .body(Full::new(Bytes::new()))
        .expect("request");
    Answer::read(sender.send_request(req).await.expect("response")).await
}

#[tokio::test]
async fn caps_when_a_vm_has_its_most_connections_then_the_next_gets_503_until_one_closes() {
    let endpoint = Endpoint::with_limits(ProxyLimits {
        max_connections_per_vm: 2,
        ..ProxyLimits::default()
    })
    .await;
    endpoint.add_app("mvm-a", 8080, echo_app("app-a").await);
    endpoint.add_app("mvm-b", 8080, echo_app("app-b").await);
    let token = endpoint.proxy_token("mvm-a");
    let mut first = endpoint.http1().await;
    let mut second = endpoint.http1().await;
    let mut third = endpoint.http1().await;

    let a1 = get_on(&mut first, "mvm-a", &token).await;
    let a2 = get_on(&mut second, "mvm-a", &token).await;
    let again = get_on(&mut first, "mvm-a", &token).await;
    let refused = get_on(&mut third, "mvm-a", &token).await;
    let other_vm = get_on(&mut third, "mvm-b", &endpoint.proxy_token("mvm-b")).await;
    drop(first);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after_close = endpoint.get("mvm-a", &[("x-aws-proxy-auth", &token)]).await;

    assert_eq!(
        (a1.status, a2.status, again.status),
        (StatusCode::OK, StatusCode::OK, StatusCode::OK)
    );
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        refused.text.contains("already has 2 open connections"),
        "{}",
        refused.text
    );
    assert_eq!(refused.headers["retry-after"], "1");
    assert_eq!(other_vm.status, StatusCode::OK);
    assert_eq!(after_close.status, StatusCode::OK);
}

#[tokio::test]
async fn caps_when_a_client_address_has_its_most_connections_then_the_next_gets_429() {
    let endpoint = Endpoint::with_limits(ProxyLimits {
        max_connections_per_client: 2,
        ..ProxyLimits::default()
    })
    .await;
    endpoint.add_app("mvm-a", 8080, echo_app("app-a").await);
    let token = endpoint.proxy_token("mvm-a");
    let mut first = endpoint.http1().await;
    let _second = endpoint.http1().await;

    let refused = endpoint.get("mvm-a", &[("x-aws-proxy-auth", &token)]).await;
    let kept = get_on(&mut first, "mvm-a", &token).await;
    drop(first);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after_close = endpoint.get("mvm-a", &[("x-aws-proxy-auth", &token)]).await;

    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(
        refused
            .text
            .contains("too many connections from your address"),
        "{}",
        refused.text
    );
    assert_eq!(refused.headers["retry-after"], "1");
    assert_eq!(kept.status, StatusCode::OK);
    assert_eq!(after_close.status, StatusCode::OK);
}

/// An app that answers `name` and counts the connections it accepted; with `keep_alive`
/// false it closes each connection after one response.
async fn counting_app(
    name: &'static str,
    keep_alive: bool,
) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind app");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let service =
                service_fn(
                    move |_req| async move { Ok::<_, Infallible>(Response::new(full(name))) },
                );
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .keep_alive(keep_alive)
                    .serve_connection(TokioIo::new(tcp), service),
            );
        }
    });
    (addr, accepted)
}

#[tokio::test]
async fn keep_alive_when_a_client_sends_requests_on_one_connection_then_one_app_connection_carries_them(
) {
    let endpoint = Endpoint::start().await;
    let (app, accepted) = counting_app("app-a", true).await;
    endpoint.add_app("mvm-a", 8080, app);
    let token = endpoint.proxy_token("mvm-a");
    let mut client = endpoint.http1().await;

    let mut texts = Vec::new();
    for _ in 0..5 {
        texts.push(get_on(&mut client, "mvm-a", &token).await.text);
    }

    assert_eq!(texts, vec!["app-a"; 5]);
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[tokio::test]
async fn keep_alive_when_the_app_closes_every_connection_then_each_request_still_gets_its_answer() {
    let endpoint = Endpoint::start().await;
    let (app, accepted) = counting_app("app-a", false).await;
    endpoint.add_app("mvm-a", 8080, app);
    let token = endpoint.proxy_token("mvm-a");
    let mut client = endpoint.http1().await;

    let mut statuses = Vec::new();
    for i in 0..6 {
        if i % 2 == 1 {
            // Give the app's close time to arrive, then send on another beat at once.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        statuses.push(get_on(&mut client, "mvm-a", &token).await.status);
    }

    assert_eq!(statuses, vec![StatusCode::OK; 6]);
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 6);
}

#[tokio::test]
async fn keep_alive_when_one_client_connection_alternates_vms_and_ports_then_each_request_reaches_its_own_app(
) {
    let endpoint = Endpoint::start().await;
    endpoint.add_app("mvm-a", 8080, echo_app("app-a").await);
    endpoint.add_app("mvm-a", 9000, echo_app("app-a-9000").await);
    endpoint.add_app("mvm-b", 8080, echo_app("app-b").await);
    let token_a = endpoint.token(TokenKind::Proxy, "mvm-a", 8080);
    let token_a_9000 = endpoint.token(TokenKind::Proxy, "mvm-a", 9000);
    let token_b = endpoint.proxy_token("mvm-b");
    let mut client = endpoint.http1().await;

    let mut seen = Vec::new();
    for (id, port, token) in [
        ("mvm-a", "8080", &token_a),
        ("mvm-b", "8080", &token_b),
        ("mvm-a", "8080", &token_a),
        ("mvm-a", "9000", &token_a_9000),
        ("mvm-b", "8080", &token_b),
    ] {
        let req = Request::get("/")
            .header("host", format!("{id}.{DOMAIN}"))
            .header("x-aws-proxy-auth", token.as_str())
            .header("x-aws-proxy-port", port)
            .body(Full::new(Bytes::new()))
            .expect("request");
        let answer = Answer::read(client.send_request(req).await.expect("response")).await;
        seen.push(
            answer
                .text
                .split(' ')
                .next()
                .unwrap_or_default()
                .to_string(),
        );
    }

    assert_eq!(seen, ["app-a", "app-b", "app-a", "app-a-9000", "app-b"]);
}

#[tokio::test]
async fn keep_alive_when_a_vm_comes_back_at_another_address_then_the_next_request_goes_there() {
    let endpoint = Endpoint::start().await;
    endpoint.add_app("mvm-a", 8080, echo_app("before").await);
    let token = endpoint.proxy_token("mvm-a");
    let mut client = endpoint.http1().await;

    let first = get_on(&mut client, "mvm-a", &token).await;
    // As after a suspend and resume: the same VM's port is now another listener.
    endpoint.add_app("mvm-a", 8080, echo_app("after").await);
    let second = get_on(&mut client, "mvm-a", &token).await;

    assert!(first.text.starts_with("before "), "{}", first.text);
    assert!(second.text.starts_with("after "), "{}", second.text);
}

/// Access keys that are active until revoked.
#[derive(Default)]
struct RevocableKeys(Mutex<Vec<String>>);

impl Minters for RevocableKeys {
    fn is_active(&self, access_key_id: &str) -> bool {
        !self
            .0
            .lock()
            .expect("lock")
            .iter()
            .any(|k| k == access_key_id)
    }
}

#[tokio::test]
async fn auth_when_the_access_key_is_revoked_then_the_next_request_on_the_same_connection_is_refused(
) {
    let revoked = Arc::new(RevocableKeys::default());
    let endpoint = Endpoint::with_minters(ProxyLimits::default(), Some(revoked.clone())).await;
    endpoint.add_app("mvm-a", 8080, echo_app("app-a").await);
    let mut claims = TokenClaims::new(
        TokenKind::Proxy,
        "mvm-a",
        vec![PortSpecification::Port(8080)],
        5,
    )
    .expect("claims");
    claims.akid = Some("AKIDBOB".to_string());
    let token = endpoint.keys.issue(&claims).expect("token");
    let mut client = endpoint.http1().await;

    let before = get_on(&mut client, "mvm-a", &token).await;
    revoked.0.lock().expect("lock").push("AKIDBOB".to_string());
    let after = get_on(&mut client, "mvm-a", &token).await;

    assert_eq!(before.status, StatusCode::OK);
    assert_eq!(after.status, StatusCode::FORBIDDEN);
    assert!(after.text.contains("revoked"), "{}", after.text);
}

#[tokio::test]
async fn auth_when_a_connection_changes_its_token_then_the_new_one_is_checked() {
    let endpoint = Endpoint::start().await;
    endpoint.add_app("mvm-a", 8080, echo_app("app-a").await);
    let good = endpoint.proxy_token("mvm-a");
    let other_vm = endpoint.proxy_token("mvm-b");
    let mut client = endpoint.http1().await;

    let first = get_on(&mut client, "mvm-a", &good).await;
    let swapped = get_on(&mut client, "mvm-a", &other_vm).await;
    let forged = get_on(&mut client, "mvm-a", &format!("{good}x")).await;
    let again = get_on(&mut client, "mvm-a", &good).await;

    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(swapped.status, StatusCode::FORBIDDEN);
    assert_eq!(forged.status, StatusCode::FORBIDDEN);
    assert_eq!(again.status, StatusCode::OK);
}

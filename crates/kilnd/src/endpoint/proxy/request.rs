//! What a client request asks for (MicroVM, port, token) and the headers it may pass on.
//!
//! Pure functions over `http` types so every rule is unit-tested without sockets.

use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, StatusCode, Version};

use super::Reject;

/// The port a request reaches when it names none.
pub const DEFAULT_PORT: u16 = 8080;
/// Header carrying the endpoint token.
pub const AUTH_HEADER: &str = "x-aws-proxy-auth";
/// Header naming the port inside the MicroVM.
pub const PORT_HEADER: &str = "x-aws-proxy-port";
/// Prefix of every kiln WebSocket subprotocol entry.
const SUBPROTOCOL_PREFIX: &str = "lambda-microvms.";
/// Subprotocol entry carrying the port (`lambda-microvms.port.8080`).
const PORT_SUBPROTOCOL: &str = "lambda-microvms.port.";
/// Subprotocol entry carrying the token (`lambda-microvms.authentication.<token>`).
const AUTH_SUBPROTOCOL: &str = "lambda-microvms.authentication.";

/// Headers that describe one connection, never forwarded as they are (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// What a request is for, read before any upstream work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The MicroVM id from the host name.
    pub microvm_id: String,
    /// The host the client asked for, as sent (kept for the app's `Host`).
    pub host: String,
    /// The port inside the MicroVM.
    pub port: u16,
    /// How the request moves bytes.
    pub kind: RequestKind,
}

/// How the request moves bytes to the app.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// A plain request and response, sent to the app over HTTP/1.1.
    Http,
    /// gRPC from an HTTP/2 client: sent to the app over HTTP/2 prior knowledge (h2c).
    Grpc,
    /// HTTP/1.1 `Upgrade: websocket`.
    WebSocket,
    /// HTTP/2 extended CONNECT with `:protocol websocket` (RFC 8441).
    WebSocketH2,
}

/// Reads the MicroVM, port and kind of `req`; the token is read separately.
pub fn target<B>(req: &Request<B>, domain: &str) -> Result<Target, Reject> {
    let host = request_host(req)?;
    let microvm_id = microvm_in_host(&host, domain).ok_or_else(|| {
        Reject::new(
            StatusCode::NOT_FOUND,
            format!("no MicroVM endpoint at this host: use <microvm-id>.{domain}"),
        )
    })?;
    let kind = request_kind(req)?;
    let port = port(req.headers(), kind)?;
    Ok(Target {
        microvm_id,
        host,
        port,
        kind,
    })
}

/// The target of a request whose MicroVM and port were found by other rules (E2B's sandbox
/// routing, `sandbox.rs`); the host is left for the caller to set.
pub fn target_for<B>(req: &Request<B>, microvm_id: String, port: u16) -> Result<Target, Reject> {
    Ok(Target {
        microvm_id,
        host: String::new(),
        port,
        kind: request_kind(req)?,
    })
}

/// The host of the request: HTTP/2 `:authority` (or an absolute-form URI), else `Host`.
fn request_host<B>(req: &Request<B>) -> Result<String, Reject> {
    let bad = |why: &str| Reject::new(StatusCode::BAD_REQUEST, why.to_string());
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let header = hosts.next();
    if hosts.next().is_some() {
        return Err(bad("more than one Host header"));
    }
    let header = header
        .map(|h| h.to_str().map_err(|_| bad("the Host header is not ASCII")))
        .transpose()?;
    match (req.uri().authority(), header) {
        (Some(authority), Some(host)) if !authority.as_str().eq_ignore_ascii_case(host) => {
            Err(bad("the Host header and the request's authority differ"))
        }
        (Some(authority), _) => Ok(authority.as_str().to_string()),
        (None, Some(host)) => Ok(host.to_string()),
        (None, None) => Err(Reject::new(
            StatusCode::NOT_FOUND,
            "no Host header: name the MicroVM as <microvm-id>.<domain>".to_string(),
        )),
    }
}

/// The MicroVM id when `host` is `<id>.<domain>` with an optional port; lowercased.
pub fn microvm_in_host(host: &str, domain: &str) -> Option<String> {
    let name = match host.rsplit_once(':') {
        Some((name, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => name,
        Some(_) => return None,
        None => host,
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    let (label, rest) = name.split_once('.')?;
    let domain = domain.strip_suffix('.').unwrap_or(domain);
    let valid_label = !label.is_empty()
        && label.len() <= 63
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-');
    (valid_label && rest.eq_ignore_ascii_case(domain)).then(|| label.to_ascii_lowercase())
}

fn request_kind<B>(req: &Request<B>) -> Result<RequestKind, Reject> {
    let headers = req.headers();
    if req.method() == Method::CONNECT {
        let websocket = req
            .extensions()
            .get::<hyper::ext::Protocol>()
            .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"));
        return if websocket && req.version() == Version::HTTP_2 {
            Ok(RequestKind::WebSocketH2)
        } else {
            Err(Reject::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "CONNECT is only for WebSockets over HTTP/2".to_string(),
            ))
        };
    }
    let upgrade_websocket = has_token(headers, header::UPGRADE, "websocket")
        && has_token(headers, header::CONNECTION, "upgrade");
    if upgrade_websocket && req.method() == Method::GET && req.version() == Version::HTTP_11 {
        return Ok(RequestKind::WebSocket);
    }
    let grpc = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.to_ascii_lowercase().starts_with("application/grpc"));
    if grpc && req.version() == Version::HTTP_2 {
        return Ok(RequestKind::Grpc);
    }
    Ok(RequestKind::Http)
}

fn websocket(kind: RequestKind) -> bool {
    matches!(kind, RequestKind::WebSocket | RequestKind::WebSocketH2)
}

fn port(headers: &HeaderMap, kind: RequestKind) -> Result<u16, Reject> {
    let invalid = || {
        Reject::new(
            StatusCode::BAD_REQUEST,
            "invalid port: X-aws-proxy-port must be one number from 1 to 65535".to_string(),
        )
    };
    let mut values = headers.get_all(PORT_HEADER).iter();
    if let Some(value) = values.next() {
        if values.next().is_some() {
            return Err(invalid());
        }
        return value.to_str().ok().and_then(parse_port).ok_or_else(invalid);
    }
    if websocket(kind) {
        if let Some(entry) = subprotocols(headers).find_map(|p| p.strip_prefix(PORT_SUBPROTOCOL)) {
            return parse_port(entry).ok_or_else(|| {
                Reject::new(
                    StatusCode::BAD_REQUEST,
                    "invalid port: lambda-microvms.port.N needs N from 1 to 65535".to_string(),
                )
            });
        }
    }
    Ok(DEFAULT_PORT)
}

fn parse_port(s: &str) -> Option<u16> {
    let s = s.trim();
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<u16>().ok().filter(|p| *p != 0)
}

/// The token: `X-aws-proxy-auth`, else for WebSockets the authentication subprotocol entry.
pub fn token(headers: &HeaderMap, kind: RequestKind) -> Result<&str, Reject> {
    let malformed = || {
        Reject::new(
            StatusCode::FORBIDDEN,
            "malformed token in X-aws-proxy-auth".to_string(),
        )
    };
    let mut values = headers.get_all(AUTH_HEADER).iter();
    if let Some(value) = values.next() {
        if values.next().is_some() {
            return Err(malformed());
        }
        let token = value.to_str().map_err(|_| malformed())?.trim();
        return if token.is_empty() {
            Err(malformed())
        } else {
            Ok(token)
        };
    }
    if websocket(kind) {
        if let Some(token) = subprotocols(headers).find_map(|p| p.strip_prefix(AUTH_SUBPROTOCOL)) {
            return Ok(token);
        }
    }
    Err(Reject::new(
        StatusCode::FORBIDDEN,
        "missing token: send X-aws-proxy-auth".to_string(),
    ))
}

/// Every entry of every `Sec-WebSocket-Protocol` header, trimmed.
fn subprotocols(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
}

fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Approximate size of a header section as HTTP/2 counts it (name + value + 32 per field).
pub fn header_bytes(headers: &HeaderMap) -> usize {
    headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 32)
        .sum()
}

/// Removes hop-by-hop headers, and any header a `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most requests carry none: one pass over the names finds that without hashing.
    let present = headers
        .keys()
        .any(|name| name == header::UPGRADE || HOP_BY_HOP.contains(name));
    if !present {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
}

/// Headers for the app: hop-by-hop and every `x-aws-proxy-*` removed, kiln's subprotocol
/// entries dropped, and the forwarding headers set from what the proxy knows.
pub fn upstream_headers(
    mut headers: HeaderMap,
    target: &Target,
    client_ip: std::net::IpAddr,
) -> HeaderMap {
    let keep_te_trailers =
        target.kind == RequestKind::Grpc && has_token(&headers, header::TE, "trailers");
    strip_hop_by_hop(&mut headers);
    while let Some(name) = headers
        .keys()
        .find(|name| name.as_str().starts_with("x-aws-proxy-"))
        .cloned()
    {
        headers.remove(name);
    }
    let kept: Vec<&str> = subprotocols(&headers)
        .filter(|p| !p.starts_with(SUBPROTOCOL_PREFIX))
        .collect();
    let kept = (!kept.is_empty()).then(|| HeaderValue::from_str(&kept.join(", ")));
    match kept {
        Some(Ok(value)) => {
            headers.insert(header::SEC_WEBSOCKET_PROTOCOL, value);
        }
        _ => {
            headers.remove(header::SEC_WEBSOCKET_PROTOCOL);
        }
    }
    // The proxy is the first hop anyone can trust: earlier values are the client's word.
    headers.insert("x-forwarded-for", client_ip_value(client_ip));
    headers.insert("x-forwarded-proto", HeaderValue::from_static("https"));
    headers.remove("forwarded");
    // The client's own Host value when it is the target's (HTTP/1.1), shared, not copied.
    let host = match headers.get(header::HOST) {
        Some(value) if value.as_bytes() == target.host.as_bytes() => Ok(value.clone()),
        _ => HeaderValue::from_str(&target.host),
    };
    if let Ok(host) = host {
        headers.insert("x-forwarded-host", host.clone());
        if target.kind != RequestKind::Grpc {
            headers.insert(header::HOST, host);
        }
    }
    if target.kind == RequestKind::Grpc {
        headers.remove(header::HOST);
        if keep_te_trailers {
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        }
    }
    if websocket(target.kind) {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    }
    headers
}

fn client_ip_value(ip: std::net::IpAddr) -> HeaderValue {
    // An IP address always formats as ASCII.
    HeaderValue::from_str(&ip.to_canonical().to_string())
        .unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// The subprotocol to answer with when the app chose none but the client offered kiln's:
/// browsers drop a WebSocket whose offered subprotocols all went unanswered.
pub fn fallback_subprotocol(client: &HeaderMap) -> Option<HeaderValue> {
    let offered: Vec<&str> = subprotocols(client).collect();
    if offered.is_empty() || offered.iter().any(|p| !p.starts_with(SUBPROTOCOL_PREFIX)) {
        return None;
    }
    offered
        .iter()
        .find(|p| p.starts_with(PORT_SUBPROTOCOL))
        .or_else(|| offered.first())
        .and_then(|p| HeaderValue::from_str(p).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(host: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().uri("/path?q=1").header("host", host);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).expect("valid request")
    }

    fn ws(headers: &[(&str, &str)]) -> Request<()> {
        let mut all = vec![("upgrade", "websocket"), ("connection", "Upgrade")];
        all.extend_from_slice(headers);
        req("mvm-1.kiln.localhost", &all)
    }

    #[test]
    fn microvm_in_host_when_id_dot_domain_then_id() {
        assert_eq!(
            microvm_in_host("MVM-1.Kiln.Localhost:8443", "kiln.localhost"),
            Some("mvm-1".into())
        );
        assert_eq!(
            microvm_in_host("mvm-1.kiln.localhost.", "kiln.localhost"),
            Some("mvm-1".into())
        );
    }

    #[test]
    fn microvm_in_host_when_other_name_then_none() {
        for host in [
            "kiln.localhost",
            "a.b.kiln.localhost",
            ".kiln.localhost",
            "mvm-1.kiln.localhost.evil",
            "mvm_1.kiln.localhost",
            "127.0.0.1:443",
            "[::1]:443",
            "mvm-1.kiln.localhost:x",
        ] {
            assert_eq!(microvm_in_host(host, "kiln.localhost"), None, "{host}");
        }
    }

    #[test]
    fn target_when_no_port_named_then_8080() {
        let t = target(&req("mvm-1.kiln.localhost", &[]), "kiln.localhost");

        assert_eq!(
            t.map(|t| (t.microvm_id, t.port)),
            Ok(("mvm-1".into(), 8080))
        );
    }

    #[test]
    fn target_when_port_header_then_that_port() {
        let t = target(
            &req("mvm-1.kiln.localhost", &[("x-aws-proxy-port", "3000")]),
            "kiln.localhost",
        );

        assert_eq!(t.map(|t| t.port), Ok(3000));
    }

    #[test]
    fn target_when_port_invalid_then_400() {
        for bad in ["0", "65536", "-1", "80a", "", "1 2"] {
            let t = target(
                &req("mvm-1.kiln.localhost", &[("x-aws-proxy-port", bad)]),
                "kiln.localhost",
            );
            assert_eq!(
                t.map_err(|r| r.status),
                Err(StatusCode::BAD_REQUEST),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn target_when_websocket_subprotocol_port_then_that_port() {
        let t = target(
            &ws(&[("sec-websocket-protocol", "chat, lambda-microvms.port.9000")]),
            "kiln.localhost",
        );

        assert_eq!(
            t.map(|t| (t.port, t.kind)),
            Ok((9000, RequestKind::WebSocket))
        );
    }

    #[test]
    fn target_when_plain_request_names_subprotocol_port_then_ignored() {
        let t = target(
            &req(
                "mvm-1.kiln.localhost",
                &[("sec-websocket-protocol", "lambda-microvms.port.9000")],
            ),
            "kiln.localhost",
        );

        assert_eq!(t.map(|t| t.port), Ok(8080));
    }

    #[test]
    fn target_when_host_unknown_then_404() {
        let t = target(&req("example.com", &[]), "kiln.localhost");

        assert_eq!(t.map_err(|r| r.status), Err(StatusCode::NOT_FOUND));
    }

    #[test]
    fn token_when_header_then_header_wins_over_subprotocol() {
        let r = ws(&[
            ("x-aws-proxy-auth", "abc"),
            (
                "sec-websocket-protocol",
                "lambda-microvms.authentication.def",
            ),
        ]);

        assert_eq!(token(r.headers(), RequestKind::WebSocket), Ok("abc"));
    }

    #[test]
    fn token_when_websocket_subprotocol_then_read() {
        let r = ws(&[(
            "sec-websocket-protocol",
            "lambda-microvms.port.80, lambda-microvms.authentication.e.y.J",
        )]);

        assert_eq!(token(r.headers(), RequestKind::WebSocket), Ok("e.y.J"));
    }

    #[test]
    fn token_when_absent_then_403_missing() {
        let r = req("mvm-1.kiln.localhost", &[]);

        let err = token(r.headers(), RequestKind::Http).map_err(|r| (r.status, r.reason));

        assert_eq!(
            err,
            Err((
                StatusCode::FORBIDDEN,
                "missing token: send X-aws-proxy-auth".into()
            ))
        );
    }

    #[test]
    fn upstream_headers_when_forwarded_then_proxy_headers_and_kiln_subprotocols_gone() {
        let r = ws(&[
            ("x-aws-proxy-auth", "secret"),
            ("x-aws-proxy-port", "80"),
            ("x-aws-proxy-whatever", "1"),
            ("x-forwarded-for", "6.6.6.6"),
            ("keep-alive", "timeout=5"),
            ("proxy-authorization", "Basic x"),
            (
                "sec-websocket-protocol",
                "chat, lambda-microvms.port.80, lambda-microvms.authentication.t",
            ),
            ("x-app", "kept"),
        ]);
        let t = target(&r, "kiln.localhost").expect("target");

        let h = upstream_headers(r.headers().clone(), &t, "10.0.0.7".parse().expect("ip"));

        assert!(h.keys().all(|k| !k.as_str().starts_with("x-aws-proxy-")));
        assert_eq!(h["sec-websocket-protocol"], "chat");
        assert_eq!(h["x-forwarded-for"], "10.0.0.7");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-app"], "kept");
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
        assert!(h.get("keep-alive").is_none() && h.get("proxy-authorization").is_none());
    }

    #[test]
    fn upstream_headers_when_only_kiln_subprotocols_then_header_dropped() {
        let r = ws(&[(
            "sec-websocket-protocol",
            "lambda-microvms.port.80, lambda-microvms.authentication.t",
        )]);
        let t = target(&r, "kiln.localhost").expect("target");

        let h = upstream_headers(r.headers().clone(), &t, "::1".parse().expect("ip"));

        assert!(h.get("sec-websocket-protocol").is_none());
    }

    #[test]
    fn strip_hop_by_hop_when_connection_names_header_then_removed() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("x-other", HeaderValue::from_static("2"));

        strip_hop_by_hop(&mut h);

        assert_eq!(h.len(), 1);
        assert_eq!(h["x-other"], "2");
    }

    #[test]
    fn fallback_subprotocol_when_only_kiln_entries_then_port_entry() {
        let r = ws(&[(
            "sec-websocket-protocol",
            "lambda-microvms.authentication.t, lambda-microvms.port.80",
        )]);

        assert_eq!(
            fallback_subprotocol(r.headers()),
            Some(HeaderValue::from_static("lambda-microvms.port.80"))
        );
    }
}

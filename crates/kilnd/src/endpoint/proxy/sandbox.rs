//! E2B-shaped routing on the endpoint: `https://<port>-<sandbox-id>.<domain>/…`, or any host of
//! the endpoint with the headers `E2b-Sandbox-Id` and `E2b-Sandbox-Port` (what E2B's SDKs send
//! when `E2B_SANDBOX_URL` points them at one URL). Such a request is admitted only with the
//! sandbox's access token in `X-Access-Token` (or `E2b-Traffic-Access-Token`): kiln never
//! serves a sandbox port, envd's included, without it.

use hyper::header::HeaderMap;
use hyper::{Request, StatusCode};

use super::request::{self, Target};
use super::Reject;

/// Header naming the sandbox (header routing).
pub const SANDBOX_ID_HEADER: &str = "e2b-sandbox-id";
/// Header naming the port inside the sandbox (header routing).
pub const SANDBOX_PORT_HEADER: &str = "e2b-sandbox-port";
/// Header carrying the sandbox's envd access token.
pub const ACCESS_TOKEN_HEADER: &str = "x-access-token";
/// Header carrying the sandbox's traffic access token (E2B's name for port access).
pub const TRAFFIC_TOKEN_HEADER: &str = "e2b-traffic-access-token";

/// Which sandboxes exist and what opens them; implemented by kilnd's E2B control plane.
pub trait SandboxAccess: Send + Sync {
    /// The MicroVM of `sandbox_id` when `token` is its access token; `None` when there is no
    /// such sandbox or the token is not its own (the two are not told apart).
    fn open(&self, sandbox_id: &str, token: &str) -> Option<String>;
}

/// A sandbox id as E2B's hosts carry it: lower-case letters and digits.
pub fn valid_sandbox_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 63
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// `(sandbox id, port)` when `host` is `<port>-<sandbox-id>.<domain>`.
pub fn sandbox_in_host(host: &str, domain: &str) -> Option<(String, u16)> {
    let label = request::microvm_in_host(host, domain)?;
    let (port, id) = label.split_once('-')?;
    let port = parse_port(port)?;
    valid_sandbox_id(id).then(|| (id.to_string(), port))
}

fn parse_port(s: &str) -> Option<u16> {
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<u16>().ok().filter(|p| *p != 0)
}

fn one_header<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, Reject> {
    let mut values = headers.get_all(name).iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(Reject::new(
            StatusCode::BAD_REQUEST,
            format!("more than one {name} header"),
        ));
    }
    first.to_str().map(|s| Some(s.trim())).map_err(|_| {
        Reject::new(
            StatusCode::BAD_REQUEST,
            format!("the {name} header is not ASCII"),
        )
    })
}

/// The target of an E2B-shaped request, authorised; `Ok(None)` when the request is not one
/// (kiln's own `<microvm-id>.<domain>` form).
pub fn target<B>(
    req: &Request<B>,
    domain: &str,
    access: &dyn SandboxAccess,
) -> Result<Option<Target>, Reject> {
    let headers = req.headers();
    let routed = match one_header(headers, SANDBOX_ID_HEADER)? {
        Some(id) => {
            let id = id.to_ascii_lowercase();
            if !valid_sandbox_id(&id) {
                return Err(Reject::new(
                    StatusCode::BAD_REQUEST,
                    "E2b-Sandbox-Id must be a sandbox id (lower-case letters and digits)".into(),
                ));
            }
            let port = match one_header(headers, SANDBOX_PORT_HEADER)? {
                Some(p) => parse_port(p).ok_or_else(|| {
                    Reject::new(
                        StatusCode::BAD_REQUEST,
                        "E2b-Sandbox-Port must be one number from 1 to 65535".into(),
                    )
                })?,
                None => {
                    return Err(Reject::new(
                        StatusCode::BAD_REQUEST,
                        "E2b-Sandbox-Id needs E2b-Sandbox-Port".into(),
                    ))
                }
            };
            (id, port)
        }
        None => {
            let Some(host) = headers
                .get(hyper::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
                .or_else(|| req.uri().authority().map(|a| a.as_str().to_string()))
            else {
                return Ok(None);
            };
            match sandbox_in_host(&host, domain) {
                Some(found) => found,
                None => return Ok(None),
            }
        }
    };
    let (sandbox_id, port) = routed;
    let token = match one_header(headers, ACCESS_TOKEN_HEADER)? {
        Some(t) => Some(t),
        None => one_header(headers, TRAFFIC_TOKEN_HEADER)?,
    };
    let denied = || {
        Reject::new(
            StatusCode::FORBIDDEN,
            format!("sandbox {sandbox_id}: no such sandbox, or the access token (X-Access-Token) is missing or not its own"),
        )
    };
    let token = token.filter(|t| !t.is_empty()).ok_or_else(denied)?;
    let microvm_id = access.open(&sandbox_id, token).ok_or_else(denied)?;
    let mut target = request::target_for(req, microvm_id, port)?;
    target.host = format!("{port}-{sandbox_id}.{domain}");
    Ok(Some(target))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct One;
    impl SandboxAccess for One {
        fn open(&self, sandbox_id: &str, token: &str) -> Option<String> {
            (sandbox_id == "abc123" && token == "secret").then(|| "mvm-abc123".to_string())
        }
    }

    fn req(host: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().uri("/health").header("host", host);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn host_form_with_token_reaches_the_sandbox_port() {
        let r = req(
            "49983-abc123.kiln.localhost:7443",
            &[("x-access-token", "secret")],
        );
        let t = target(&r, "kiln.localhost", &One).unwrap().unwrap();
        assert_eq!((t.microvm_id.as_str(), t.port), ("mvm-abc123", 49983));
    }

    #[test]
    fn header_routing_works_on_any_host() {
        let r = req(
            "127.0.0.1:7443",
            &[
                ("e2b-sandbox-id", "abc123"),
                ("e2b-sandbox-port", "49983"),
                ("x-access-token", "secret"),
            ],
        );
        let t = target(&r, "kiln.localhost", &One).unwrap().unwrap();
        assert_eq!(t.port, 49983);
    }

    #[test]
    fn attacker_without_or_with_a_wrong_token_is_refused() {
        for headers in [
            vec![("e2b-sandbox-id", "abc123"), ("e2b-sandbox-port", "49983")],
            vec![
                ("e2b-sandbox-id", "abc123"),
                ("e2b-sandbox-port", "49983"),
                ("x-access-token", "guess"),
            ],
            vec![
                ("e2b-sandbox-id", "abc123"),
                ("e2b-sandbox-port", "49983"),
                ("x-access-token", ""),
            ],
        ] {
            let r = req("127.0.0.1:7443", &headers);
            let e = target(&r, "kiln.localhost", &One).unwrap_err();
            assert_eq!(e.status, StatusCode::FORBIDDEN);
        }
        let r = req("49983-abc123.kiln.localhost", &[]);
        assert!(target(&r, "kiln.localhost", &One).is_err());
    }

    #[test]
    fn kiln_hosts_are_left_to_kiln_routing() {
        let r = req("mvm-0011.kiln.localhost", &[]);
        assert!(target(&r, "kiln.localhost", &One).unwrap().is_none());
        assert_eq!(
            sandbox_in_host("8080-ab-c.kiln.localhost", "kiln.localhost"),
            None
        );
        assert_eq!(
            sandbox_in_host("0-abc.kiln.localhost", "kiln.localhost"),
            None
        );
    }
}

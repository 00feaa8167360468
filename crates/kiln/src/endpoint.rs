//! HTTPS to a MicroVM's endpoint (`https://<id>.kiln.localhost:7443`), trusting only
//! kiln's local CA and reaching `*.localhost` names on kilnd's host without DNS.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use anyhow::Context;

/// A client for one MicroVM endpoint, and the endpoint's base URL.
pub struct EndpointClient {
    /// The HTTP client (kiln's CA, host override).
    pub http: reqwest::Client,
    /// `https://<id>.<domain>:<port>`.
    pub base: reqwest::Url,
}

/// Where a `*.localhost` endpoint name is reached: kilnd's IP when the API address is an
/// IP, else loopback (RFC 6761: `localhost` names are loopback).
fn endpoint_ip(api_endpoint: &str) -> IpAddr {
    reqwest::Url::parse(api_endpoint)
        .ok()
        .and_then(|u| {
            u.host_str()
                .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_string())
        })
        .and_then(|h| h.parse::<IpAddr>().ok())
        .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST))
}

impl EndpointClient {
    /// A client for `endpoint` (a MicroVM's `endpoint` member) trusting the CA at `ca`.
    pub fn new(endpoint: &str, api_endpoint: &str, ca: &Path) -> anyhow::Result<Self> {
        let base = reqwest::Url::parse(endpoint)
            .with_context(|| format!("kilnd gave the endpoint {endpoint:?}, which is not a URL"))?;
        let host = base
            .host_str()
            .with_context(|| format!("endpoint {endpoint} has no host"))?
            .to_string();
        let port = base.port_or_known_default().unwrap_or(443);
        let pem = std::fs::read(ca).with_context(|| {
            format!(
                "cannot read kiln's endpoint CA at {}: kilnd writes it on its first start; pass --home (kilnd's data directory) or --cacert",
                ca.display()
            )
        })?;
        crate::client::install_tls_provider();
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .with_context(|| format!("{} holds no PEM certificate", ca.display()))?;
        let mut builder = reqwest::Client::builder()
            .tls_certs_only(certs)
            .connect_timeout(Duration::from_secs(10))
            // Endpoints are reached directly; a proxy could not resolve *.localhost.
            .no_proxy();
        if host.ends_with(".localhost") || host == "localhost" {
            builder = builder.resolve(&host, SocketAddr::new(endpoint_ip(api_endpoint), port));
        }
        let http = builder
            .build()
            .context("creating the HTTPS client for the endpoint")?;
        Ok(EndpointClient { http, base })
    }

    /// The URL of `path` (with its query) on the endpoint.
    pub fn url(&self, path: &str) -> anyhow::Result<reqwest::Url> {
        let path = if path.starts_with('/') {
            path.to_string()
        } else {
            format!("/{path}")
        };
        self.base
            .join(&path)
            .with_context(|| format!("{path} is not a path on {}", self.base))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_ip_when_api_on_ip_then_that_ip_else_loopback() {
        assert_eq!(
            endpoint_ip("http://10.0.0.5:7171"),
            IpAddr::V4(Ipv4Addr::new(10, 0, 0, 5))
        );
        assert_eq!(
            endpoint_ip("http://kiln.example:7171"),
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        );
    }
}

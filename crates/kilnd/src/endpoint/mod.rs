//! Wires the endpoint proxy to the MicroVM supervisor: routes, TLS, the listener.

pub mod proxy;
pub mod tls;
pub mod tokens;

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use anyhow::Context;

use crate::config::Config;
use crate::endpoint::proxy::{ActivityTable, ProxyLimits, ProxyState, RouteError, Routes};
use crate::endpoint::tokens::TokenKeys;
use crate::observe::metrics::ProxyCounters;
use crate::supervisor::{Microvms, UpstreamError};

impl Routes for Microvms {
    fn upstream(
        &self,
        microvm_id: &str,
        port: u16,
    ) -> Pin<
        Box<dyn Future<Output = Result<crate::endpoint::proxy::Upstream, RouteError>> + Send + '_>,
    > {
        let id = microvm_id.to_string();
        Box::pin(async move {
            Microvms::upstream(self, &id, port)
                .await
                .map_err(|e| match e {
                    UpstreamError::Unknown => RouteError::UnknownMicrovm,
                    UpstreamError::NotRunning(state) => RouteError::NotRunning { state },
                    UpstreamError::Unavailable(m) => RouteError::Unavailable(m),
                })
        })
    }

    fn agent(
        &self,
        microvm_id: &str,
    ) -> Pin<Box<dyn Future<Output = Result<kiln_agent::AgentClient, RouteError>> + Send + '_>>
    {
        let id = microvm_id.to_string();
        Box::pin(async move {
            Microvms::agent(self, &id).await.map_err(|e| match e {
                UpstreamError::Unknown => RouteError::UnknownMicrovm,
                UpstreamError::NotRunning(state) => RouteError::NotRunning { state },
                UpstreamError::Unavailable(m) => RouteError::Unavailable(m),
            })
        })
    }
}

/// Starts the endpoint proxy on `config.endpoint_listen`; returns its state (for shutdown).
pub async fn start(
    home: &Path,
    config: &Config,
    microvms: Arc<Microvms>,
    keys: Arc<TokenKeys>,
    activity: ActivityTable,
    counters: ProxyCounters,
    sandboxes: Option<Arc<dyn proxy::sandbox::SandboxAccess>>,
) -> anyhow::Result<Arc<ProxyState>> {
    let tls = crate::endpoint::tls::load_or_create(home, &config.endpoint_domain)
        .context("preparing the endpoint's TLS certificate")?;
    let listener = tokio::net::TcpListener::bind(config.endpoint_listen)
        .await
        .with_context(|| {
            format!(
                "listening on {} for MicroVM endpoints (pick --endpoint-listen)",
                config.endpoint_listen
            )
        })?;
    let addr = listener.local_addr()?;
    let state = Arc::new(
        ProxyState::new(
            config.endpoint_domain.clone(),
            keys,
            microvms,
            activity,
            ProxyLimits {
                max_connections_per_vm: config.endpoint_max_connections_per_vm,
                max_connections_per_client: config.endpoint_max_connections_per_client,
                ..ProxyLimits::default()
            },
        )
        .with_counters(counters)
        .with_sandboxes(sandboxes),
    );
    println!(
        "kilnd: MicroVM endpoints on https://<microvm-id>.{}:{} ({addr}; clients trust {})",
        config.endpoint_domain,
        addr.port(),
        tls.ca_pem_path.display()
    );
    let serving = state.clone();
    tokio::spawn(async move {
        if let Err(e) = proxy::serve(listener, tls.server_config.clone(), serving).await {
            tracing::error!(error = %e, "the endpoint proxy stopped");
        }
    });
    Ok(state)
}

//! The kiln daemon. It owns the API server, the metadata store and the image builds; the
//! MicroVM supervisor and the endpoint proxy come next.

pub mod api;
pub mod artifacts;
pub mod auth;
pub mod config;
pub mod e2b;
pub mod endpoint;
pub mod images;
pub mod observe;
pub mod sandbox;
pub mod store;
pub mod supervisor;

use std::sync::Arc;

use anyhow::Context;
use kiln_api::ArnContext;

use crate::artifacts::{remote as s3_remote, s3};
use crate::auth::keys::AccessKeys;
use crate::auth::{keys, quotas, throttle};
use crate::config::Config;
use crate::endpoint::{proxy, tokens};
use crate::images::builds::Builds;
use crate::images::Images;
use crate::observe::audit::AuditLog;
use crate::observe::metrics::Metrics;
use crate::store::host::HostId;
use crate::store::{SqliteStore, Store};
use crate::supervisor::network;
use crate::supervisor::Microvms;

/// Seconds since the Unix epoch.
pub fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The egress gateway's settings from kilnd's flags.
fn gateway_config(config: &Config) -> anyhow::Result<kiln_net::GatewayConfig> {
    let mut gateway = kiln_net::GatewayConfig::default();
    if let Some(path) = &config.egress_hosts {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading --egress-hosts {}", path.display()))?;
        gateway.hosts = kiln_net::gateway::parse_hosts(&text)
            .map_err(|e| anyhow::anyhow!("--egress-hosts {}: {e}", path.display()))?;
    }
    Ok(gateway)
}

/// Runs the daemon until SIGINT or SIGTERM.
pub async fn run(config: Config) -> anyhow::Result<()> {
    if config.unconfined {
        kiln_vmm::jail::run_unconfined();
        tracing::warn!(
            "--unconfined: every QEMU runs as root in kilnd's own namespaces, with no cgroup; \
             a guest that escapes QEMU owns this host. Never use it where guests are untrusted"
        );
    } else if kiln_vmm::jail::unconfined_by_environment() {
        anyhow::bail!(
            "KILN_JAIL=off asks for unconfined VMs: kilnd runs them only with --unconfined \
             (never on a host running untrusted guests); unset KILN_JAIL to confine them"
        );
    }
    let home = config.home();
    // Every directory kilnd makes is 0700, every file 0600 unless it says otherwise.
    kiln_vmm::home::make_private(&home).with_context(|| {
        format!(
            "making the data directory {} private (0700 throughout)",
            home.display()
        )
    })?;
    let host_id = HostId::resolve(&home, config.host_id.as_deref())?;
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(&home.join("kiln.db"), host_id.as_str())
            .context("opening the metadata store")?,
    );
    tracing::info!(host = %host_id, "metadata store open");
    if config.account.len() != 12 || !config.account.bytes().all(|b| b.is_ascii_digit()) {
        anyhow::bail!(
            "--account {}: an account id is 12 digits, e.g. 000000000000",
            config.account
        );
    }
    store
        .set_account(keys::ADMIN, &config.account, now())
        .with_context(|| {
            format!(
                "giving principal {} the account {} (--account): pick another",
                keys::ADMIN,
                config.account
            )
        })?;
    if config.ksm {
        kiln_vmm::ksm::enable().context("--ksm")?;
        tracing::warn!(
            "KSM is on (--ksm): identical guest pages are merged across MicroVMs, a timing \
             side channel between the VMs that share them"
        );
    }
    let access_keys = Arc::new(AccessKeys::new(store.clone()));
    let metrics = Arc::new(Metrics::new(store.clone()));
    let audit = Arc::new(AuditLog::new(store.clone()));
    let first_key = access_keys
        .bootstrap(&home)
        .context("creating the first access key")?;
    let host = {
        let home = home.clone();
        tokio::task::spawn_blocking(move || {
            kiln_vmm::host::Host::prepare(&home).map(kiln_vmm::host::Host::into_dyn)
        })
        .await
        .context("preparing the host")?
        .context("this host cannot run microVMs (run `kiln doctor` for details)")?
    };
    tracing::info!(accel = %host.accel.accel, vmm = %host.vmm.describe(), kernel = %host.assets.kernel.version, "host ready");
    kiln_api::validate::MIN_IDLE_SECONDS.store(
        config.min_idle_seconds.max(1),
        std::sync::atomic::Ordering::Relaxed,
    );
    let config = Arc::new(config);
    let host = Arc::new(host);
    let ctx = ArnContext {
        region: config.region.clone(),
        account: config.account.clone(),
    };
    let s3 = Arc::new(
        s3::S3Store::open(&home.join("s3"), access_keys.clone())
            .context("opening the S3 artifact store")?,
    );
    let overrides = match &config.quota_overrides {
        Some(path) => quotas::read_overrides(path)?,
        None => Default::default(),
    };
    let quotas = Arc::new(quotas::Quotas::new(
        config.quota_limits(),
        overrides,
        store.clone(),
        home.clone(),
        s3.clone(),
    ));
    s3.set_budget(Arc::new(quotas::UploadBudget(Arc::downgrade(&quotas))));
    let throttle = Arc::new(throttle::Throttle::new(throttle::Rates::new(
        &config.throttle,
    )));
    let remote_s3 = match &config.artifact_s3_endpoint {
        Some(endpoint) => Some(Arc::new(s3_remote::RemoteS3::new(
            endpoint,
            config.artifact_s3_credentials.as_deref(),
            &config.artifact_s3_region,
        )?)),
        None => None,
    };
    let network = Arc::new(network::Network::load(
        &home,
        ctx.clone(),
        config.egress_allow.clone(),
        gateway_config(&config)?,
    )?);
    metrics.set_gateway(network.gateway.clone());
    let builds = Builds::new(
        host.clone(),
        store.clone(),
        config.clone(),
        s3.clone(),
        remote_s3,
        metrics.clone(),
        network.clone(),
        quotas.clone(),
    );
    // Build VMs do not outlive a build: whatever a previous kilnd left running is stopped
    // before its builds start again.
    host.vmm.kill_leftovers(&home.join("work"));
    resume_builds(store.as_ref(), &builds)?;
    let keys = Arc::new(
        tokens::TokenKeys::load_or_create(&home)
            .context("loading the endpoint token keys")?
            .with_minters(access_keys.clone()),
    );
    if config.token_key_rotation_secs > 0 {
        tokio::spawn(rotate_token_keys(
            keys.clone(),
            config.token_key_rotation_secs,
        ));
    }
    let activity = proxy::ActivityTable::new();
    let microvms = Microvms::new(supervisor::Parts {
        host: host.clone(),
        store: store.clone(),
        config: config.clone(),
        ctx: ctx.clone(),
        endpoint_port: config.endpoint_listen.port(),
        keys: keys.clone(),
        activity: activity.clone(),
        metrics: metrics.clone(),
        audit: audit.clone(),
        network: network.clone(),
        quotas: quotas.clone(),
    });
    microvms
        .reconcile()
        .await
        .context("reconciling MicroVMs with what runs")?;
    tokio::spawn(microvms.clone().reap());
    tokio::spawn(microvms.clone().keep_warm());
    let supervisor = microvms.clone();
    let sandboxes = Arc::new(
        e2b::registry::Registry::open(home.join("e2b").join("sandboxes"))
            .context("opening the E2B sandbox records")?,
    );
    let endpoint = endpoint::start(
        &home,
        &config,
        microvms.clone(),
        keys,
        activity,
        metrics.proxy_counters(),
        Some(sandboxes.clone()),
    )
    .await?;
    let images = Arc::new(Images {
        store: store.clone(),
        builds,
        ctx,
        home: home.clone(),
        quotas: quotas.clone(),
    });
    let e2b = e2b::E2b::new(
        sandboxes,
        store.clone(),
        microvms.clone(),
        images.clone(),
        s3.clone(),
        &config.endpoint_domain,
        config.endpoint_listen.port(),
    );
    tokio::spawn(e2b.clone().reap());
    let app = api::router(api::Api {
        images,
        microvms,
        keys: access_keys,
        s3,
        metrics,
        audit,
        network,
        quotas,
        throttle,
        sandbox: Arc::default(),
    })
    .nest("/e2b", e2b.router());
    let listener = tokio::net::TcpListener::bind(config.api_listen)
        .await
        .with_context(|| {
            format!(
                "listening on {} (is another kilnd running? pick --api-listen)",
                config.api_listen
            )
        })?;
    let addr = listener.local_addr()?;
    println!("kilnd: API on http://{addr} (data in {})", home.display());
    let credentials = keys::credentials_path(&home);
    if let Some(id) = first_key {
        println!(
            "kilnd: created access key {id} for principal {} in {} (mode 0600)",
            keys::ADMIN,
            credentials.display()
        );
    }
    println!(
        "kilnd: requests must be signed (SigV4); try `AWS_SHARED_CREDENTIALS_FILE={} aws lambda-microvms list-managed-microvm-images --endpoint-url http://{addr} --region {}`",
        credentials.display(),
        config.region
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown())
        .await
        .context("serving the API")?;
    endpoint.shutdown();
    // MicroVMs outlive kilnd; builds in flight and the warm pool do not (builds start again
    // on the next start, the pool fills again on demand).
    host.vmm.kill_leftovers(&home.join("work"));
    supervisor.empty_pool();
    Ok(())
}

/// Rotates the endpoint token keys whenever the newest is `period` seconds old, until
/// kilnd stops. The schedule follows the key file, so a restart neither resets nor
/// repeats it; a failed rotation is retried a minute later.
async fn rotate_token_keys(keys: Arc<tokens::TokenKeys>, period: u64) {
    loop {
        let due = keys.next_rotation(period);
        let wait = (due - now() as i64).clamp(0, 86_400 * 365);
        tokio::time::sleep(std::time::Duration::from_secs(wait as u64)).await;
        match keys.rotate_if_due(period) {
            Ok(Some(kid)) => tracing::info!(%kid, "rotated the endpoint token key"),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "rotating the endpoint token key failed; retrying in a minute");
                tokio::time::sleep(std::time::Duration::from_secs(60)).await;
            }
        }
    }
}

/// Builds that were pending or running when kilnd stopped start again from scratch.
fn resume_builds(store: &dyn Store, builds: &Builds) -> anyhow::Result<()> {
    for v in store.host_versions(&["PENDING", "IN_PROGRESS"])? {
        let spec = serde_json::from_value(v.spec.clone())
            .with_context(|| format!("reading the spec of {} version {}", v.image, v.version))?;
        tracing::info!(image = %v.image, version = v.version, "restarting an interrupted build");
        builds.spawn(v.image.clone(), v.version, spec, v.version == 1);
    }
    Ok(())
}

async fn shutdown() {
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
    tracing::info!("shutting down");
}

//! The MicroVM supervisor: admission control and the API's MicroVM operations. Every
//! transition of a MicroVM is made by its owner (`owner.rs`) following one table
//! (`transitions.rs`); re-attaching after a restart is `recovery.rs`.

mod hooks;
pub mod memory_sizer;
pub mod network;
mod owner;
mod pool;
mod recovery;
pub mod sizer;
#[cfg(test)]
mod tests;
pub mod transitions;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex, Weak};
use std::time::Duration;

use kiln_api::pagination::paginate;
use kiln_api::shapes::microvm::*;
use kiln_api::{ApiError, ArnContext, Request};
use kiln_image::build::ImageConfig;
use kiln_vmm::host::Host;
use kiln_vmm::{MicroVm, PortForward, RestoreTarget, Snapshot};
use serde_json::{json, Value};
use tokio::sync::{mpsc, Mutex};

use self::hooks::SessionHooks;
use self::owner::{Command, Held, Launch, LaunchFrom};
use self::pool::{Pool, Pooled, VersionKey};
use self::transitions::Event;

use crate::api::wire::{internal, request_hash, to_value, ts};
use crate::auth::keys::Caller;
use crate::config::Config;
use crate::endpoint::proxy::{ActivityTable, Upstream};
use crate::endpoint::tokens::{TokenClaims, TokenKeys, TokenKind};
use crate::images::builds::version_dir;
use crate::images::find_image;
use crate::now;
use crate::observe::audit::AuditLog;
use crate::observe::metrics::Metrics;
use crate::store::{MicrovmRow, Store};
use crate::supervisor::network::{Ingress, Network, Plan};

/// Default and largest `maximumDurationInSeconds`: 8 hours.
pub const MAX_DURATION_SECS: i64 = 8 * 3600;

/// A running VM and its forwards.
struct Live {
    vm: Box<dyn MicroVm>,
    /// Guest port → host port on 127.0.0.1.
    forwards: BTreeMap<u16, u16>,
    /// The image's lifecycle hooks: their port and which are enabled.
    hooks: SessionHooks,
    /// When it last started running (launch, resume, re-attach): idle time counts from here
    /// until the endpoint sees traffic.
    since: std::time::Instant,
}

/// What is admitted now: VM count, memory, and vCPUs (every resident MicroVM's baseline
/// plus what the sizer granted on top).
#[derive(Debug, Default)]
struct Capacity {
    vms: usize,
    memory_mib: u64,
    vcpus: u64,
}

/// The baseline vCPUs a reservation of `memory_mib` holds: a resident MicroVM's (AWS's
/// sizing, as its image was built), none for a reservation without memory (a suspended
/// MicroVM's slot).
fn baseline_vcpus(memory_mib: u64) -> u64 {
    match memory_mib {
        0 => 0,
        m => u64::from(kiln_image::build::vcpus_for(m)),
    }
}

/// What a supervisor is made of.
pub struct Parts {
    /// The VMM and the guest assets.
    pub host: Arc<Host>,
    /// The metadata store.
    pub store: Arc<dyn Store>,
    /// kilnd's flags.
    pub config: Arc<Config>,
    /// Region and account for ARNs.
    pub ctx: ArnContext,
    /// The endpoint proxy's port (for endpoint URLs).
    pub endpoint_port: u16,
    /// Keys of the endpoint tokens.
    pub keys: Arc<TokenKeys>,
    /// Inbound traffic per MicroVM, kept by the endpoint proxy.
    pub activity: ActivityTable,
    /// Launch, suspend and resume counts and times.
    pub metrics: Arc<Metrics>,
    /// The audit log.
    pub audit: Arc<AuditLog>,
    /// Connectors and the egress gateway.
    pub network: Arc<Network>,
    /// Per-principal quotas.
    pub quotas: Arc<crate::auth::quotas::Quotas>,
}

/// The MicroVM supervisor.
pub struct Microvms {
    host: Arc<Host>,
    store: Arc<dyn Store>,
    config: Arc<Config>,
    ctx: ArnContext,
    endpoint_port: u16,
    live: Mutex<HashMap<String, Arc<Mutex<Live>>>>,
    capacity: StdMutex<Capacity>,
    /// Keys of the endpoint tokens.
    pub keys: Arc<TokenKeys>,
    /// Inbound traffic per MicroVM, kept by the endpoint proxy.
    pub activity: ActivityTable,
    /// The owner of each open MicroVM (its command queue).
    owners: StdMutex<HashMap<String, mpsc::Sender<Command>>>,
    /// This supervisor, for the owners it starts.
    me: Weak<Microvms>,
    /// Held while a RunMicrovm checks its `clientToken` and records its MicroVM.
    run_claims: StdMutex<()>,
    /// Launch, suspend and resume counts and times.
    metrics: Arc<Metrics>,
    /// Where what kilnd does on its own (idle suspends, auto-resumes, the reaper) is recorded.
    audit: Arc<AuditLog>,
    /// Connectors and the egress gateway.
    network: Arc<Network>,
    /// Per-principal quotas (MicroVMs and their memory).
    quotas: Arc<crate::auth::quotas::Quotas>,
    /// MicroVMs restored ahead of demand.
    pool: Pool,
}

/// A RunMicrovm's idempotency token, scoped to its principal, with the hash of the request.
struct RunToken {
    token: String,
    /// `<principal>/RunMicrovm`: one principal's token never replays another's launch.
    scope: String,
    hash: String,
}

impl RunToken {
    /// The token `req` carries, if any.
    fn of(caller: &Caller, req: &RunMicrovmRequest) -> Result<Option<RunToken>, ApiError> {
        let Some(token) = &req.client_token else {
            return Ok(None);
        };
        // The run hook's payload is a secret: not even its hash is kept, so a repeat with the
        // same token is a retry whatever payload it carries.
        let hash = request_hash(&RunMicrovmRequest {
            run_hook_payload: None,
            ..req.clone()
        })?;
        Ok(Some(RunToken {
            token: token.clone(),
            scope: format!("{}/RunMicrovm", caller.principal),
            hash,
        }))
    }
}

fn new_microvm_id() -> String {
    format!("mvm-{}", random_hex::<9>())
}

/// How long a guest may take to answer its naming: the pool's filler serves every version
/// in turn, so one image's slow guest must not hold the others' pools up for long.
const NAME_TIMEOUT: Duration = Duration::from_secs(5);

/// Names a launched or pooled guest after its MicroVM: hostname = its id, and a new
/// `/etc/machine-id` when its image has one — every MicroVM restored from one snapshot
/// would otherwise share the build VM's. An older image's agent does not know the request:
/// its guest keeps the snapshot's names.
pub(super) async fn name_guest(vm: &dyn kiln_vmm::MicroVm, id: &str) {
    let machine_id = random_hex::<16>();
    let agent = vm.agent().with_timeout(NAME_TIMEOUT);
    if let Err(e) = agent.set_identity(id, &machine_id).await {
        tracing::info!(microvm = %id, error = %e, "the guest keeps its snapshot's hostname and machine id");
    }
}

/// `N` random bytes from the host's RNG, as lowercase hex.
fn random_hex<const N: usize>() -> String {
    let mut b = [0u8; N];
    let _ = getrandom::fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Microvms {
    /// A supervisor; call [`Microvms::reconcile`] before serving.
    pub fn new(parts: Parts) -> Arc<Microvms> {
        Arc::new_cyclic(|me| Microvms {
            quotas: parts.quotas,
            network: parts.network,
            host: parts.host,
            store: parts.store,
            config: parts.config,
            ctx: parts.ctx,
            endpoint_port: parts.endpoint_port,
            live: Mutex::new(HashMap::new()),
            capacity: StdMutex::new(Capacity::default()),
            keys: parts.keys,
            activity: parts.activity,
            owners: StdMutex::new(HashMap::new()),
            me: me.clone(),
            run_claims: StdMutex::new(()),
            metrics: parts.metrics,
            audit: parts.audit,
            pool: Pool::default(),
        })
    }

    /// How many MicroVMs and how much guest memory (MiB) are admitted now: what the owners
    /// hold, for `/metrics` and for tests that check nothing leaked.
    pub fn admitted(&self) -> (usize, u64) {
        let c = self.capacity.lock().unwrap_or_else(|p| p.into_inner());
        (c.vms, c.memory_mib)
    }

    /// The vCPUs admitted now (baselines and growth) and the budget, `--max-vcpus`.
    pub fn admitted_vcpus(&self) -> (u64, u64) {
        let c = self.capacity.lock().unwrap_or_else(|p| p.into_inner());
        (c.vcpus, self.config.vcpu_budget())
    }

    fn publish_admitted(&self, c: &Capacity) {
        self.metrics.set_admitted(c.vms, c.memory_mib, c.vcpus);
    }

    pub(crate) fn dir_of(&self, id: &str) -> PathBuf {
        self.host.home.join("microvms").join(id)
    }

    /// What `principal`'s MicroVMs (everyone's for `None`) used until now.
    pub fn usage(&self, principal: Option<&str>) -> Result<serde_json::Value, ApiError> {
        crate::observe::usage::report(&self.store, principal, crate::now())
    }

    /// The HTTPS endpoint of a MicroVM.
    pub fn endpoint(&self, id: &str) -> String {
        match self.endpoint_port {
            443 => format!("https://{id}.{}", self.config.endpoint_domain),
            p => format!("https://{id}.{}:{p}", self.config.endpoint_domain),
        }
    }

    /// Refuses when the host itself is short of memory, whatever the budget says (guests
    /// may touch more than measured, other processes share the host).
    fn host_has_room(&self) -> Result<(), ApiError> {
        let Some(available) = crate::config::meminfo_kib("MemAvailable:").map(|k| k / 1024) else {
            return Ok(());
        };
        if available < self.config.min_available_mib {
            return Err(ApiError::InsufficientCapacity {
                message: format!(
                    "this kiln host has {available} MiB of memory available, under its floor of {} MiB                      (--min-available-mib); terminate or suspend some MicroVMs, or try later",
                    self.config.min_available_mib
                ),
            });
        }
        Ok(())
    }

    fn reserve(&self, memory_mib: u64) -> Result<(), ApiError> {
        self.host_has_room()?;
        let mut c = self.capacity.lock().unwrap_or_else(|p| p.into_inner());
        let budget = self.config.memory_budget_mib();
        let (vcpus, vcpu_budget) = (baseline_vcpus(memory_mib), self.config.vcpu_budget());
        if c.vms + 1 > self.config.max_microvms
            || c.memory_mib + memory_mib > budget
            || c.vcpus + vcpus > vcpu_budget
        {
            return Err(ApiError::InsufficientCapacity {
                message: format!(
                    "this kiln host is full: {} MicroVMs using {} of {} MiB and {} of {} vCPUs; a {} MiB \
                     MicroVM ({} vCPUs) does not fit (at most {} MicroVMs); terminate some or try later",
                    c.vms, c.memory_mib, budget, c.vcpus, vcpu_budget, memory_mib, vcpus,
                    self.config.max_microvms
                ),
            });
        }
        c.vms += 1;
        c.memory_mib += memory_mib;
        c.vcpus += vcpus;
        self.publish_admitted(&c);
        Ok(())
    }

    fn reserve_memory(&self, memory_mib: u64) -> Result<(), ApiError> {
        self.host_has_room()?;
        let mut c = self.capacity.lock().unwrap_or_else(|p| p.into_inner());
        let budget = self.config.memory_budget_mib();
        let (vcpus, vcpu_budget) = (baseline_vcpus(memory_mib), self.config.vcpu_budget());
        if c.memory_mib + memory_mib > budget || c.vcpus + vcpus > vcpu_budget {
            return Err(ApiError::InsufficientCapacity {
                message: format!(
                    "this kiln host has {} of {budget} MiB and {} of {vcpu_budget} vCPUs in use; \
                     resuming needs {memory_mib} MiB and {vcpus} vCPUs more; try later",
                    c.memory_mib, c.vcpus
                ),
            });
        }
        c.memory_mib += memory_mib;
        c.vcpus += vcpus;
        self.publish_admitted(&c);
        Ok(())
    }

    /// Counts a MicroVM found open after a restart (no limit: it holds the host already).
    fn admit_recovered(&self, memory_mib: u64) {
        let mut c = self.capacity.lock().unwrap_or_else(|p| p.into_inner());
        c.vms += 1;
        c.memory_mib += memory_mib;
        c.vcpus += baseline_vcpus(memory_mib);
        self.publish_admitted(&c);
    }

    fn release_memory(&self, memory_mib: u64) {
        let mut c = self.capacity.lock().unwrap_or_else(|p| p.into_inner());
        c.memory_mib = c.memory_mib.saturating_sub(memory_mib);
        c.vcpus = c.vcpus.saturating_sub(baseline_vcpus(memory_mib));
        self.publish_admitted(&c);
    }

    fn release(&self, memory_mib: u64) {
        let mut c = self.capacity.lock().unwrap_or_else(|p| p.into_inner());
        c.vms = c.vms.saturating_sub(1);
        c.memory_mib = c.memory_mib.saturating_sub(memory_mib);
        c.vcpus = c.vcpus.saturating_sub(baseline_vcpus(memory_mib));
        self.publish_admitted(&c);
    }

    /// Reserves `n` vCPUs on top of a running MicroVM's baseline (the sizer grows it); Err
    /// with the budget when they do not fit, and the MicroVM stays as it is.
    fn reserve_growth(&self, n: u64) -> Result<(), String> {
        let mut c = self.capacity.lock().unwrap_or_else(|p| p.into_inner());
        let budget = self.config.vcpu_budget();
        if c.vcpus + n > budget {
            return Err(format!(
                "{} of {budget} vCPUs (--max-vcpus) are admitted",
                c.vcpus
            ));
        }
        c.vcpus += n;
        self.publish_admitted(&c);
        Ok(())
    }

    /// Reserves `mib` of memory on top of a MicroVM's baseline (the sizer grows it); Err with
    /// the budget when it does not fit, and the MicroVM stays as it is.
    fn reserve_memory_growth(&self, mib: u64) -> Result<(), String> {
        if let Err(e) = self.host_has_room() {
            return Err(e.to_string());
        }
        let mut c = self.capacity.lock().unwrap_or_else(|p| p.into_inner());
        let budget = self.config.memory_budget_mib();
        if c.memory_mib + mib > budget {
            return Err(format!(
                "{} of {budget} MiB (--max-memory-mib × --memory-overcommit) are admitted",
                c.memory_mib
            ));
        }
        c.memory_mib += mib;
        self.publish_admitted(&c);
        Ok(())
    }

    /// Counts `mib` of memory a MicroVM holds beyond its baseline already (a session resumed
    /// or re-attached with memory plugged): no limit, it is on the host.
    fn admit_memory_growth(&self, mib: u64) {
        let mut c = self.capacity.lock().unwrap_or_else(|p| p.into_inner());
        c.memory_mib += mib;
        self.publish_admitted(&c);
    }

    /// Gives back `mib` of memory growth.
    fn release_memory_growth(&self, mib: u64) {
        let mut c = self.capacity.lock().unwrap_or_else(|p| p.into_inner());
        c.memory_mib = c.memory_mib.saturating_sub(mib);
        self.publish_admitted(&c);
    }

    /// Gives back `n` vCPUs [`Microvms::reserve_growth`] reserved.
    fn release_growth(&self, n: u64) {
        let mut c = self.capacity.lock().unwrap_or_else(|p| p.into_inner());
        c.vcpus = c.vcpus.saturating_sub(n);
        self.publish_admitted(&c);
    }

    /// Executes a MicroVM request for `caller`, who sees only its own MicroVMs (admin
    /// sees all).
    pub async fn handle(&self, caller: &Caller, request: Request) -> Result<Value, ApiError> {
        match request {
            Request::RunMicrovm { body } => {
                let started = std::time::Instant::now();
                let launched = self.run(caller, *body).await;
                self.metrics.launch_finished(&launched, started.elapsed());
                launched
            }
            Request::GetMicrovm { params } => {
                let id = kiln_api::arn::microvm_identifier(&params.microvm_identifier)?;
                let row = self.owned_row(caller, &id)?;
                to_value(&self.describe(&row))
            }
            Request::ListMicrovms { query } => {
                let (image, version) = match &query.image_identifier {
                    Some(i) => {
                        // As AWS: an image the caller cannot see is not found, not empty.
                        let image = find_image(&self.store, &self.ctx, caller, i)?;
                        (
                            Some(image.key),
                            query
                                .image_version
                                .as_deref()
                                .and_then(|v| v.parse::<i64>().ok()),
                        )
                    }
                    None => (None, None),
                };
                let rows = self
                    .store
                    .microvms(image.as_deref(), version, None)
                    .map_err(internal)?;
                let items: Vec<MicrovmItem> = rows
                    .iter()
                    .filter(|r| caller.can_access(&r.owner))
                    .map(|r| MicrovmItem {
                        microvm_id: r.id.clone(),
                        state: r.state,
                        image_arn: self.image_arn_of(r),
                        image_version: r.version.to_string(),
                        started_at: ts(r.started_at),
                    })
                    .collect();
                let (items, next_token) = paginate(
                    &items,
                    |i| i.microvm_id.as_str(),
                    query.page.max_results,
                    query.page.next_token.as_deref(),
                )?;
                to_value(&ListMicrovmsResponse { next_token, items })
            }
            Request::TerminateMicrovm { params } => {
                let id = kiln_api::arn::microvm_identifier(&params.microvm_identifier)?;
                self.owned_row(caller, &id)?;
                self.terminate(&id, "terminated by request").await?;
                to_value(&TerminateMicrovmResponse {})
            }
            Request::SuspendMicrovm { params } => {
                let id = kiln_api::arn::microvm_identifier(&params.microvm_identifier)?;
                self.owned_row(caller, &id)?;
                self.suspend(&id).await?;
                to_value(&SuspendMicrovmResponse {})
            }
            Request::ResumeMicrovm { params } => {
                let id = kiln_api::arn::microvm_identifier(&params.microvm_identifier)?;
                self.owned_row(caller, &id)?;
                self.resume(&id).await?;
                to_value(&ResumeMicrovmResponse {})
            }
            Request::CreateMicrovmAuthToken { params, body } => {
                let id = kiln_api::arn::microvm_identifier(&params.microvm_identifier)?;
                let row = self.owned_row(caller, &id)?;
                self.token(
                    caller,
                    &row,
                    TokenKind::Proxy,
                    body.allowed_ports.clone(),
                    body.expiration_in_minutes,
                )
            }
            Request::CreateMicrovmShellAuthToken { params, body } => {
                let id = kiln_api::arn::microvm_identifier(&params.microvm_identifier)?;
                let row = self.owned_row(caller, &id)?;
                if !self.plan_of_row(&row).ingress.shell {
                    return Err(ApiError::validation(format!(
                        "MicroVM {id} was not run with the SHELL_INGRESS network connector; \
                         run one with --ingress-network-connectors SHELL_INGRESS to open shells"
                    )));
                }
                self.token(
                    caller,
                    &row,
                    TokenKind::Shell,
                    Vec::new(),
                    body.expiration_in_minutes,
                )
            }
            other => Err(ApiError::validation(format!(
                "{} is not available in this version of kiln yet",
                other.operation().name()
            ))),
        }
    }

    fn row(&self, id: &str) -> Result<MicrovmRow, ApiError> {
        self.store
            .microvm(id)
            .map_err(internal)?
            .ok_or_else(|| ApiError::not_found("Microvm", id))
    }

    /// The MicroVM `id` if `caller` may see it; another principal's is not found, exactly
    /// like a missing one.
    /// An endpoint token of `kind` for a MicroVM that is not ending, as the API answers it.
    /// It names the access key that asked for it: revoking that key ends the token.
    fn token(
        &self,
        caller: &Caller,
        row: &MicrovmRow,
        kind: TokenKind,
        ports: Vec<kiln_api::shapes::microvm::PortSpecification>,
        minutes: i32,
    ) -> Result<Value, ApiError> {
        if matches!(
            row.state,
            MicrovmState::Terminating | MicrovmState::Terminated
        ) {
            return Err(ApiError::conflict(
                "Microvm",
                &row.id,
                format!("MicroVM {} is {}", row.id, row.state),
            ));
        }
        let claims = TokenClaims::new(kind, &row.id, ports, minutes)
            .map_err(|e| ApiError::validation(e.to_string()))?
            .minted_by(&caller.access_key_id);
        let token = self
            .keys
            .issue(&claims)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        to_value(&CreateMicrovmAuthTokenResponse {
            auth_token: BTreeMap::from([("X-aws-proxy-auth".to_string(), token)]),
        })
    }

    pub(crate) fn owned_row(&self, caller: &Caller, id: &str) -> Result<MicrovmRow, ApiError> {
        let row = self.row(id)?;
        if caller.can_access(&row.owner) {
            Ok(row)
        } else {
            Err(ApiError::not_found("Microvm", id))
        }
    }

    /// The ARN of the image a MicroVM runs: its name in its owner's account.
    fn image_arn_of(&self, r: &MicrovmRow) -> String {
        match self.store.image_identity(&r.image, &r.owner) {
            Ok((name, account)) => self.ctx.image_arn_in(&account, &name),
            Err(e) => {
                tracing::warn!(microvm = %r.id, error = %e, "cannot read the image's account");
                self.ctx.image_arn(&r.image)
            }
        }
    }

    fn describe(&self, r: &MicrovmRow) -> MicrovmDescription {
        let req: Option<RunMicrovmRequest> = serde_json::from_value(r.request.clone()).ok();
        MicrovmDescription {
            microvm_id: r.id.clone(),
            state: r.state,
            endpoint: self.endpoint(&r.id),
            image_arn: self.image_arn_of(r),
            image_version: r.version.to_string(),
            execution_role_arn: req.as_ref().and_then(|q| q.execution_role_arn.clone()),
            idle_policy: req.as_ref().and_then(|q| q.idle_policy),
            maximum_duration_in_seconds: r.max_duration as i32,
            started_at: ts(r.started_at),
            terminated_at: r.terminated_at.map(ts),
            state_reason: r.state_reason.clone(),
            kms_key_identifier: req.as_ref().and_then(|q| q.kms_key_identifier.clone()),
            ingress_network_connectors: req
                .as_ref()
                .and_then(|q| q.ingress_network_connectors.clone()),
            egress_network_connectors: req
                .as_ref()
                .and_then(|q| q.egress_network_connectors.clone()),
        }
    }

    /// RunMicrovm: restores the image version into a new VM and returns once it runs. A
    /// repeat with the same `clientToken` answers with the MicroVM the first call launched.
    async fn run(&self, caller: &Caller, req: RunMicrovmRequest) -> Result<Value, ApiError> {
        let token = RunToken::of(caller, &req)?;
        if let Some(answer) = self.replay_run(caller, token.as_ref())? {
            return Ok(answer);
        }
        kiln_api::image_identifier(&req.image_identifier)?;
        self.network.runtime_plan(
            req.ingress_network_connectors.as_deref(),
            req.egress_network_connectors.as_deref(),
        )?;
        let image = find_image(&self.store, &self.ctx, caller, &req.image_identifier)?;
        // `name` is what the caller knows the image by, `key` what the store files it under.
        let (name, key) = (image.label.clone(), image.key.clone());
        let image_arn = self.ctx.image_arn_in(&image.account, &image.label);
        let version = match &req.image_version {
            Some(v) => v
                .parse::<i64>()
                .map_err(|_| ApiError::not_found("MicrovmImageVersion", &format!("{name}:{v}")))?,
            None => self
                .store
                .latest_version(&key, "SUCCESSFUL", Some("ACTIVE"))
                .map_err(internal)?
                .ok_or_else(|| {
                    ApiError::not_found_saying(
                        "MicrovmImage",
                        &name,
                        format!(
                            "No active version found for MicroVM image {} (none built \
                             successfully and is ACTIVE)",
                            image_arn
                        ),
                    )
                })?,
        };
        let v = self
            .store
            .version(&key, version)
            .map_err(internal)?
            .ok_or_else(|| {
                ApiError::not_found("MicrovmImageVersion", &format!("{name}:{version}"))
            })?;
        if v.state != "SUCCESSFUL" || v.status != "ACTIVE" {
            // AWS's words; what kiln knows more goes after them.
            return Err(ApiError::not_found_saying(
                "MicrovmImageVersion",
                &format!("{name}:{version}"),
                format!(
                    "No active version found for MicroVM image {} (version {version} is {} \
                     and {}: only SUCCESSFUL, ACTIVE versions run)",
                    image_arn, v.state, v.status
                ),
            ));
        }
        if req.run_hook_payload.is_some() && SessionHooks::of(&v.spec).enabled("run").is_none() {
            return Err(ApiError::validation(
                "The run hook must be enabled in the MicroVM image to pass the run hook payload",
            ));
        }
        let max_duration = req
            .maximum_duration_in_seconds
            .map(i64::from)
            .unwrap_or(MAX_DURATION_SECS);
        if !(1..=MAX_DURATION_SECS).contains(&max_duration) {
            return Err(ApiError::validation(format!(
                "maximumDurationInSeconds must be between 1 and {MAX_DURATION_SECS}"
            )));
        }
        // The run hook's payload carries the session's secrets: it is passed on, never stored.
        let stored_request = to_value(&RunMicrovmRequest {
            run_hook_payload: None,
            ..req.clone()
        })?;
        let version_key: VersionKey = (key.clone(), version);
        self.pool.noted(&version_key, std::time::Instant::now());
        // A pooled VM is the version's snapshot restored already; only launches whose
        // egress and console are what it was restored with take one.
        let mut pooled = match crate::sandbox::logging_disabled(&req) {
            true => None,
            false => self.pool.take(&version_key, &self.plan_of(&req).egress),
        };
        let from = match &pooled {
            Some(p) => {
                tracing::debug!(microvm = %p.id, image = %name, version, "launch from the warm pool");
                None
            }
            None => Some(self.open_version(&key, &name, version).await?),
        };
        let (id, memory) = match (&pooled, &from) {
            (Some(p), _) => (p.id.clone(), p.memory_mib),
            (None, Some((_, snap))) => (new_microvm_id(), snap.manifest.memory_mib),
            (None, None) => unreachable!("a launch has a pooled VM or a snapshot"),
        };
        let dir = self.dir_of(&id);
        let row = MicrovmRow {
            id: id.clone(),
            image: key,
            version,
            state: MicrovmState::Pending,
            state_reason: None,
            request: stored_request,
            started_at: now(),
            terminated_at: None,
            max_duration,
            memory_mib: memory as i64,
            kernel: self.host.assets.kernel.version.clone(),
            dir: dir.display().to_string(),
            forwards: json!({}),
            owner: caller.principal.clone(),
        };
        let recorded = self.record_launch(caller, token.as_ref(), &row, &mut pooled, &version_key);
        self.metrics.set_warm_pool(self.pool.total());
        if let Some(answer) = recorded? {
            return Ok(answer);
        }
        if pooled.is_some() {
            self.metrics.launched_from_pool();
        }
        // From here the MicroVM's owner launches it; this call only waits for the answer,
        // so a caller that goes away cancels nothing.
        let owner = self.spawn_owner(
            &row,
            Held {
                slot: true,
                memory: true,
                growth: 0,
                grown_mib: 0,
            },
        );
        let from = match (pooled, from) {
            (Some(p), _) => LaunchFrom::Pool(p.live),
            (None, Some((config, snap))) => LaunchFrom::Snapshot { snap, config },
            (None, None) => unreachable!("a launch has a pooled VM or a snapshot"),
        };
        let launch = Box::new(Launch {
            from,
            hooks: SessionHooks::of(&v.spec),
            req,
            token: token.map(|t| (t.token, t.scope)),
        });
        let (reply, answer) = tokio::sync::oneshot::channel();
        if owner.send(Command::Launch(launch, reply)).await.is_err() {
            return Err(ApiError::internal(format!(
                "MicroVM {id} has no owner to launch it (kilnd is stopping)"
            )));
        }
        answer.await.unwrap_or_else(|_| {
            Err(ApiError::internal(format!(
                "the owner of MicroVM {id} ended before it answered"
            )))
        })
    }

    /// Records a launch while no other RunMicrovm can: the token's replay check, the
    /// principal's quotas, the host's capacity (a pooled VM brings its own), the row and the
    /// token. `Ok(Some(answer))` is a replay: nothing recorded. A pooled VM goes back to the
    /// pool when nothing was recorded, and is discarded when its id was.
    fn record_launch(
        &self,
        caller: &Caller,
        token: Option<&RunToken>,
        row: &MicrovmRow,
        pooled: &mut Option<Pooled>,
        version: &VersionKey,
    ) -> Result<Option<Value>, ApiError> {
        let memory = row.memory_mib as u64;
        let give_back = |pooled: &mut Option<Pooled>| {
            if let Some(p) = pooled.take() {
                self.pool.put(version.clone(), p);
            }
        };
        // Checked again while no other RunMicrovm can record a row: of two calls with
        // one token, exactly one launches.
        let _claims = self.run_claims.lock().unwrap_or_else(|p| p.into_inner());
        let admitted = self.replay_run(caller, token).and_then(|replay| {
            if replay.is_none() {
                // Under the same lock as the insert: of two launches racing for the last
                // slot, exactly one is recorded.
                self.quotas.admit_microvm(&caller.principal, memory)?;
                if pooled.is_none() {
                    self.reserve_evicting(memory, version)?;
                }
            }
            Ok(replay)
        });
        match admitted {
            Ok(None) => {}
            Ok(Some(answer)) => {
                give_back(pooled);
                return Ok(Some(answer));
            }
            Err(e) => {
                give_back(pooled);
                return Err(e);
            }
        }
        let abandon = |pooled: &mut Option<Pooled>| match pooled.take() {
            Some(p) => self.discard_pooled(p),
            None => self.release(memory),
        };
        if let Err(e) = self.store.insert_microvm(row) {
            abandon(pooled);
            return Err(internal(e));
        }
        if let Some(t) = token {
            let launched = json!({ "microvmId": row.id }).to_string();
            if let Err(e) =
                self.store
                    .put_client_token(&t.token, &t.scope, &t.hash, &launched, now())
            {
                abandon(pooled);
                let _ = self.store.transition_microvm(
                    &row.id,
                    MicrovmState::Pending,
                    MicrovmState::Terminated,
                    crate::store::Reason::Set(
                        "launch abandoned: its clientToken could not be recorded",
                    ),
                    Some(now()),
                );
                return Err(internal(e));
            }
        }
        Ok(None)
    }

    /// Reserves capacity for a launch, giving pooled VMs up (others' first) while the host
    /// is full.
    fn reserve_evicting(&self, memory_mib: u64, keep: &VersionKey) -> Result<(), ApiError> {
        loop {
            match self.reserve(memory_mib) {
                Ok(()) => return Ok(()),
                Err(full) => match self.pool.evict_one(keep) {
                    Some(p) => self.discard_pooled(p),
                    None => return Err(full),
                },
            }
        }
    }

    /// Ends a pooled VM and gives its capacity back at once (its QEMU ends in the background).
    fn discard_pooled(&self, p: Pooled) {
        self.release(p.memory_mib);
        self.metrics.set_warm_pool(self.pool.total());
        let host = self.host.clone();
        let dir = self.dir_of(&p.id);
        tokio::spawn(async move {
            if let Err(e) = p.live.vm.terminate().await {
                tracing::debug!(microvm = %p.id, error = %e, "ending a pooled VM");
            }
            host.vmm.kill_leftovers(&dir);
            let _ = std::fs::remove_dir_all(&dir);
        });
    }

    /// The image.json and snapshot of a version (reading them and checking the snapshot's
    /// checksums is blocking work).
    async fn open_version(
        &self,
        key: &str,
        name: &str,
        version: i64,
    ) -> Result<(ImageConfig, Snapshot), ApiError> {
        let vdir = version_dir(&self.host.home, key, version);
        let vmm = self.host.vmm.clone();
        let (config, snap) = kiln_vmm::blocking(move || {
            let config = std::fs::read(vdir.join("image.json"))
                .ok()
                .and_then(|t| serde_json::from_slice::<ImageConfig>(&t).ok());
            (config, vmm.open_snapshot(&vdir.join("snapshot")))
        })
        .await;
        let config = config.ok_or_else(|| {
            ApiError::internal(format!(
                "image {name} version {version} has no readable image.json"
            ))
        })?;
        let snap =
            snap.map_err(|e| ApiError::internal(format!("image {name} version {version}: {e}")))?;
        Ok((config, snap))
    }

    /// Keeps the warm pool filled (every quarter second; after a round in which a VM could
    /// not be pooled — admission full, a restore failing — twice as long each time, up to
    /// four seconds): each version in use gets its target of restored, paused VMs while
    /// admission allows; versions no longer runnable or in use are emptied. See `pool.rs`.
    pub async fn keep_warm(self: Arc<Self>) {
        const EVERY: Duration = Duration::from_millis(250);
        const AT_MOST: Duration = Duration::from_secs(4);
        let mut pause = EVERY;
        loop {
            tokio::time::sleep(pause).await;
            let mut unfilled = false;
            let least = self.config.warm_pool;
            let targets = match least {
                0 => Vec::new(),
                _ => self
                    .pool
                    .targets(std::time::Instant::now(), least, self.config.warm_pool_max),
            };
            if let Ok(plan) = self.network.runtime_plan(None, None) {
                self.pool
                    .stale(&plan.egress)
                    .into_iter()
                    .for_each(|p| self.discard_pooled(p));
            }
            for version in self.pool.pooled_versions() {
                if !targets.iter().any(|(k, _)| *k == version) {
                    self.pool
                        .drain(&version)
                        .into_iter()
                        .for_each(|p| self.discard_pooled(p));
                }
            }
            for (version, target) in targets {
                let runnable = self
                    .store
                    .version(&version.0, version.1)
                    .ok()
                    .flatten()
                    .is_some_and(|v| v.state == "SUCCESSFUL" && v.status == "ACTIVE");
                if !runnable {
                    self.pool
                        .drain(&version)
                        .into_iter()
                        .for_each(|p| self.discard_pooled(p));
                    continue;
                }
                while self.pool.count(&version) < target {
                    match self.fill(&version).await {
                        Ok(p) => {
                            self.pool.put(version.clone(), p);
                            self.metrics.set_warm_pool(self.pool.total());
                        }
                        Err(e) => {
                            tracing::debug!(image = %version.0, version = version.1, error = %e, "warm pool not filled");
                            unfilled = true;
                            break;
                        }
                    }
                }
            }
            pause = match unfilled {
                true => (pause * 2).min(AT_MOST),
                false => EVERY,
            };
        }
    }

    /// Ends every pooled VM now (kilnd stops: they belong to no one, and a restart would
    /// only find them as orphans).
    pub fn empty_pool(&self) {
        for version in self.pool.pooled_versions() {
            for p in self.pool.drain(&version) {
                let dir = self.dir_of(&p.id);
                self.host.vmm.kill_leftovers(&dir);
                let _ = std::fs::remove_dir_all(&dir);
                self.release(p.memory_mib);
            }
        }
    }

    /// One pooled VM of `version`: admitted, restored as a launch without connectors would
    /// be, warmed, then paused.
    async fn fill(&self, version: &VersionKey) -> Result<Pooled, ApiError> {
        let (key, number) = (&version.0, version.1);
        let spec = self
            .store
            .version(key, number)
            .map_err(internal)?
            .map(|v| v.spec)
            .unwrap_or_default();
        let (config, snap) = self.open_version(key, key, number).await?;
        let memory = snap.manifest.memory_mib;
        self.reserve(memory)?;
        let id = new_microvm_id();
        let dir = self.dir_of(&id);
        let req: RunMicrovmRequest = serde_json::from_value(json!({ "imageIdentifier": key }))
            .map_err(|e| ApiError::internal(format!("a pooled VM's request: {e}")))?;
        let restored = match self
            .launch(&id, &dir, &snap, &config, &req, SessionHooks::of(&spec))
            .await
        {
            Ok(live) => {
                // The id is the one its launch will answer: named now, not at the launch,
                // and before its ready check runs.
                name_guest(live.vm.as_ref(), &id).await;
                self.metrics.warmed(warm(&id, &live, &config).await);
                live.vm.pause().await.map(|()| live)
            }
            Err(e) => Err(e),
        };
        match restored {
            Ok(live) => Ok(Pooled {
                id,
                live,
                memory_mib: memory,
                egress: self.plan_of(&req).egress,
            }),
            Err(e) => {
                self.release(memory);
                self.host.vmm.kill_leftovers(&dir);
                let _ = std::fs::remove_dir_all(&dir);
                Err(ApiError::internal(format!("restoring a pooled VM: {e}")))
            }
        }
    }

    /// Terminates a MicroVM (idempotent): its owner stops it and frees what it held.
    pub async fn terminate(&self, id: &str, reason: &str) -> Result<(), ApiError> {
        let reason = reason.to_string();
        self.ask(id, Event::Terminate, |r| Command::Terminate(reason, r))
            .await
    }

    /// SuspendMicrovm: the suspend hook, then memory, devices and disk to the session's
    /// directory; QEMU exits so its memory returns to the host. Idempotent.
    pub async fn suspend(&self, id: &str) -> Result<(), ApiError> {
        self.ask(id, Event::Suspend, Command::Suspend).await
    }

    /// ResumeMicrovm: a new QEMU from the session's directory (new forwards), clock and
    /// entropy refreshed, then the resume hook. Idempotent.
    pub async fn resume(&self, id: &str) -> Result<(), ApiError> {
        self.resume_session(id).await.map(drop)
    }

    /// [`Microvms::resume`]; whether this call resumed it (false: it was running already).
    async fn resume_session(&self, id: &str) -> Result<bool, ApiError> {
        self.ask(id, Event::Resume, Command::Resume).await
    }

    /// The answer to an earlier RunMicrovm with the same token: the MicroVM it launched,
    /// as it is now. The token reused with other parameters is a `ConflictException`.
    fn replay_run(
        &self,
        caller: &Caller,
        token: Option<&RunToken>,
    ) -> Result<Option<Value>, ApiError> {
        let Some(t) = token else { return Ok(None) };
        let Some((hash, launched)) = self
            .store
            .client_token(&t.token, &t.scope)
            .map_err(internal)?
        else {
            return Ok(None);
        };
        if hash != t.hash {
            return Err(ApiError::conflict(
                "ClientToken",
                &t.token,
                "this clientToken was already used with different parameters; use a new token",
            ));
        }
        let id = serde_json::from_str::<Value>(&launched)
            .ok()
            .and_then(|v| v["microvmId"].as_str().map(str::to_string))
            .ok_or_else(|| {
                ApiError::internal(format!(
                    "the MicroVM launched for clientToken {} is unreadable in the store",
                    t.token
                ))
            })?;
        if self.store.microvm(&id).map_err(internal)?.is_none() {
            // What the token launched has aged out (TERMINATED long ago): the token goes
            // with it, and this request launches anew.
            self.store
                .forget_client_token(&t.token, &t.scope)
                .map_err(internal)?;
            return Ok(None);
        }
        let row = self.owned_row(caller, &id)?;
        to_value(&self.describe(&row)).map(Some)
    }

    async fn launch(
        &self,
        id: &str,
        dir: &Path,
        snap: &Snapshot,
        config: &ImageConfig,
        req: &RunMicrovmRequest,
        hooks: SessionHooks,
    ) -> Result<Live, kiln_vmm::VmmError> {
        std::fs::create_dir_all(dir).map_err(|e| kiln_vmm::VmmError::io("creating", dir, e))?;
        let (target, forwards) = self.restore_target(
            id,
            [8080u16, config.app_port],
            &self.plan_of(req),
            crate::sandbox::logging_disabled(req),
        )?;
        let vm = self.host.vmm.restore(snap, target).await?;
        Ok(Live {
            since: std::time::Instant::now(),
            vm,
            forwards,
            hooks,
        })
    }

    fn suspended_dir(&self, id: &str) -> PathBuf {
        self.dir_of(id).join("suspended")
    }

    /// Forgets MicroVMs TERMINATED longer than `--terminated-retention-secs` ago and
    /// idempotency tokens older than `--client-token-ttl-secs`.
    fn forget_expired(&self) {
        let t = now();
        let retention = self.config.terminated_retention_secs as f64;
        match self.store.expire_terminated_microvms(t - retention) {
            Ok(ids) if !ids.is_empty() => {
                tracing::info!(microvms = ?ids, "terminated MicroVMs aged out")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot age out terminated MicroVMs"),
        }
        let ttl = self.config.client_token_ttl_secs as f64;
        if let Err(e) = self.store.expire_client_tokens(t - ttl) {
            tracing::warn!(error = %e, "cannot expire idempotency tokens");
        }
    }

    /// How long a running MicroVM has had no inbound traffic through the endpoint.
    async fn idle_for(&self, id: &str) -> Option<Duration> {
        let live = self.live.lock().await.get(id).cloned()?;
        let since = live.try_lock().ok()?.since.elapsed();
        Some(match self.activity.idle_for(id) {
            Some(traffic) => traffic.min(since),
            None => since,
        })
    }

    /// kiln's own view of a MicroVM (`/kiln/v1/microvms/{id}`): what it runs (image version,
    /// kernel — so image drift is visible), its QEMU, forwards and endpoint traffic.
    pub async fn details(&self, caller: &Caller, id: &str) -> Result<Value, ApiError> {
        let r = self.owned_row(caller, id)?;
        let pid = match self.live.lock().await.get(id) {
            Some(l) => l.lock().await.vm.process_id(),
            None => None,
        };
        let activity = self.activity.snapshot(id).map(|a| {
            json!({
                "requests": a.requests,
                "openConnections": a.open_connections,
                "bytesIn": a.bytes_in,
                "bytesOut": a.bytes_out,
                "idleSeconds": a.last_inbound.elapsed().as_secs_f64(),
            })
        });
        Ok(json!({
            "microvmId": r.id,
            "owner": r.owner,
            "state": r.state.as_str(),
            "stateReason": r.state_reason,
            "image": r.image,
            "imageVersion": r.version.to_string(),
            "kernel": r.kernel,
            "memoryMiB": r.memory_mib,
            "endpoint": self.endpoint(&r.id),
            "qemuPid": pid,
            "forwards": r.forwards,
            "network": self.plan_of_row(&r).describe(),
            "activity": activity,
        }))
    }

    /// A MicroVM's state as stored, `None` when it is unknown.
    pub(crate) fn store_row_state(&self, id: &str) -> Option<String> {
        self.store
            .microvm(id)
            .ok()
            .flatten()
            .map(|r| r.state.as_str().to_string())
    }

    /// The guest agent of a running MicroVM (resuming a suspended one with auto-resume).
    pub async fn agent(&self, id: &str) -> Result<kiln_agent::AgentClient, UpstreamError> {
        let live = self.running_or_resumed(id).await?;
        let l = live.lock().await;
        Ok(l.vm.agent().clone())
    }

    /// Where MicroVM `id` is restored (launch or resume): its runtime directory, a forward
    /// from a free host port to each of `guest_ports`, the egress its plan allows, and
    /// whether the app's output is kept.
    fn restore_target(
        &self,
        id: &str,
        guest_ports: impl IntoIterator<Item = u16>,
        plan: &Plan,
        logging_disabled: bool,
    ) -> Result<(RestoreTarget, BTreeMap<u16, u16>), kiln_vmm::VmmError> {
        let dir = self.dir_of(id);
        let mut forwards = BTreeMap::new();
        for port in guest_ports {
            if let std::collections::btree_map::Entry::Vacant(slot) = forwards.entry(port) {
                slot.insert(
                    kiln_vmm::free_port()
                        .map_err(|e| kiln_vmm::VmmError::io("finding a free port for", &dir, e))?,
                );
            }
        }
        let mut target = RestoreTarget::new(dir.join("vm"));
        target.forwards = forwards
            .iter()
            .map(|(g, h)| PortForward {
                host_port: *h,
                guest_port: *g,
            })
            .collect();
        target.egress = self.network.vm_egress(id, &plan.egress);
        target.restrict_egress = target.egress.is_none();
        // `logging: disabled` keeps none of the app's output, anywhere.
        target.discard_app_log = logging_disabled;
        Ok((target, forwards))
    }

    /// A MicroVM's network as its connectors decide it; a connector that no longer exists
    /// (or a row that cannot be read) gives no ingress and no egress: fail closed.
    fn plan_of(&self, req: &RunMicrovmRequest) -> Plan {
        self.network
            .runtime_plan(
                req.ingress_network_connectors.as_deref(),
                req.egress_network_connectors.as_deref(),
            )
            .unwrap_or(Plan {
                ingress: Ingress::default(),
                egress: kiln_net::Egress::None,
                egress_connectors: Vec::new(),
            })
    }

    pub(crate) fn plan_of_row(&self, row: &MicrovmRow) -> Plan {
        match serde_json::from_value::<RunMicrovmRequest>(row.request.clone()) {
            Ok(req) => self.plan_of(&req),
            Err(_) => Plan {
                ingress: Ingress::default(),
                egress: kiln_net::Egress::None,
                egress_connectors: Vec::new(),
            },
        }
    }

    /// The flows a MicroVM's guest made through the egress gateway (owner or admin only).
    pub fn flows(&self, caller: &Caller, id: &str) -> Result<Vec<kiln_net::Flow>, ApiError> {
        self.owned_row(caller, id)?;
        Ok(self.network.gateway.flows(id))
    }

    /// Where `port` in a running MicroVM is reached (inside its network namespace), adding a
    /// forward on first use.
    pub async fn upstream(&self, id: &str, port: u16) -> Result<Upstream, UpstreamError> {
        let live = self.running_or_resumed(id).await?;
        let mut l = live.lock().await;
        let netns = l.vm.netns();
        if let Some(h) = l.forwards.get(&port) {
            return Ok(Upstream {
                netns,
                addr: SocketAddr::from(([127, 0, 0, 1], *h)),
            });
        }
        let most = self.config.endpoint_max_ports_per_vm;
        if most > 0 && l.forwards.len() >= most {
            return Err(UpstreamError::Unavailable(format!(
                "it is already reached on {} ports, the most one MicroVM may be \
                 (--endpoint-max-ports-per-vm); use one of those: {}",
                l.forwards.len(),
                l.forwards
                    .keys()
                    .map(u16::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let host_port =
            kiln_vmm::free_port().map_err(|e| UpstreamError::Unavailable(e.to_string()))?;
        l.vm.add_forward(PortForward {
            host_port,
            guest_port: port,
        })
        .await
        .map_err(|e| UpstreamError::Unavailable(e.to_string()))?;
        l.forwards.insert(port, host_port);
        let _ = self.store.set_microvm_forwards(id, &json!(l.forwards));
        Ok(Upstream {
            netns,
            addr: SocketAddr::from(([127, 0, 0, 1], host_port)),
        })
    }

    /// A running MicroVM; a suspended one with auto-resume is resumed first, so the request
    /// that asked is held rather than refused.
    async fn running_or_resumed(&self, id: &str) -> Result<Arc<Mutex<Live>>, UpstreamError> {
        let live = self.live.lock().await.get(id).cloned();
        let live = match live {
            Some(l) => l,
            None => {
                let row = match self.store.microvm(id) {
                    Ok(Some(r)) => r,
                    Ok(None) => return Err(UpstreamError::Unknown),
                    Err(e) => return Err(UpstreamError::Unavailable(e.to_string())),
                };
                let auto_resume = serde_json::from_value::<RunMicrovmRequest>(row.request.clone())
                    .ok()
                    .and_then(|r| r.idle_policy)
                    .is_some_and(|p| p.auto_resume_enabled);
                if !(auto_resume
                    && matches!(
                        row.state,
                        MicrovmState::Suspended | MicrovmState::Suspending
                    ))
                {
                    return Err(UpstreamError::NotRunning(row.state.as_str().to_string()));
                }
                // Hold the request while the VM resumes: the client sees a slower answer, not an error.
                let resumed = self.resume_session(id).await;
                if !matches!(resumed, Ok(false)) {
                    let reason = "a request arrived at its endpoint (autoResumeEnabled)";
                    self.audit
                        .kilnd("ResumeMicrovm", &row.owner, id, &resumed, reason);
                }
                resumed.map_err(|e| UpstreamError::Unavailable(e.message().to_string()))?;
                match self.live.lock().await.get(id).cloned() {
                    Some(l) => l,
                    None => {
                        return Err(UpstreamError::Unavailable(
                            "the MicroVM did not come back".into(),
                        ))
                    }
                }
            }
        };
        Ok(live)
    }

    /// Ages out terminated MicroVMs and old idempotency tokens, every second. What each
    /// MicroVM's own policy says (idle, suspended and maximum durations) its owner does.
    pub async fn reap(self: Arc<Self>) {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            self.forget_expired();
        }
    }
}

/// Why the proxy cannot reach a MicroVM.
#[derive(Debug)]
pub enum UpstreamError {
    /// No such MicroVM.
    Unknown,
    /// It exists but does not run.
    NotRunning(String),
    /// It runs but cannot be reached.
    Unavailable(String),
}

/// Longest a pooled VM's warm-up may take.
const WARM_TIMEOUT: Duration = Duration::from_secs(10);

/// Warms a pooled VM before it is paused, so the first request after a pooled launch does
/// not pay for translating, under TCG, the code it runs: the guest walks its process and
/// TCP paths (the agent's warm-up: the app sees nothing of it), then the app is checked as
/// the build checked it — a TCP connection to its port through its forward (from the host
/// through slirp and the network device, the path a proxied request takes), and the image's
/// ready hook or HEALTHCHECK when it has one. A ready check is made to be run at any time
/// (the build polled it until it passed); no request of a user's reaches the app before
/// its run hook. Best effort: a guest that cannot warm (an older agent) or an app whose
/// check fails now is pooled as it is. Whether every step passed.
async fn warm(id: &str, live: &Live, config: &ImageConfig) -> bool {
    use kiln_image::build::ReadyCheck;
    let t = std::time::Instant::now();
    let guest = live.vm.agent().warm(WARM_TIMEOUT).await;
    let knocked = match live.forwards.get(&config.app_port) {
        Some(&port) => tokio::time::timeout(KNOCK_TIMEOUT, knock(live.vm.as_ref(), port))
            .await
            .unwrap_or_else(|_| Err(std::io::Error::other("no answer in time"))),
        None => Ok(()),
    };
    let checked = match config.ready_check {
        ReadyCheck::Tcp => true,
        _ => tokio::time::timeout(
            CHECK_TIMEOUT,
            kiln_image::build::check_ready(live.vm.agent(), config, CHECK_TIMEOUT),
        )
        .await
        .unwrap_or(false),
    };
    let ms = t.elapsed().as_millis() as u64;
    match (&guest, &knocked, checked) {
        (Ok(_), Ok(()), true) => {
            tracing::debug!(microvm = %id, ms, "pooled VM warmed");
            true
        }
        _ => {
            tracing::debug!(
                microvm = %id,
                ms,
                guest = ?guest.err(),
                app_port = ?knocked.err(),
                ready_check = checked,
                "pooled VM not fully warmed"
            );
            false
        }
    }
}

/// Longest a pooled VM's ready check may take (one slow image's pool fills late; the
/// filler serves every version in turn).
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest wait for the app to end the warm-up's TCP connection.
const KNOCK_TIMEOUT: Duration = Duration::from_secs(2);

/// Connects to a forward's host port, sends nothing, and waits until the app closes the
/// connection (a server reads end-of-file and lets go); whatever it sends is read into one
/// small buffer and dropped.
async fn knock(vm: &dyn MicroVm, host_port: u16) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = vm.connect_forward(host_port).await?;
    tcp.shutdown().await?;
    let mut sink = [0u8; 512];
    while tcp.read(&mut sink).await? > 0 {}
    Ok(())
}

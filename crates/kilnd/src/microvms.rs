//! The MicroVM supervisor: launches (restores) VMs from image versions, admission control,
//! the state machine, maximum duration, termination, and re-attaching after a restart.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use kiln_api::pagination::paginate;
use kiln_api::shapes::microvm::*;
use kiln_api::{ApiError, ArnContext, Request};
use kiln_image::build::ImageConfig;
use kiln_vmm::host::Host;
use kiln_vmm::qemu::QemuVm;
use kiln_vmm::{MicroVm, PortForward, RestoreTarget, Snapshot, Vmm};
use serde_json::{json, Value};
use tokio::sync::Mutex;

use crate::audit::AuditLog;
use crate::auth::Caller;
use crate::builds::version_dir;
use crate::config::Config;
use crate::images::find_image;
use crate::metrics::Metrics;
use crate::network::{Ingress, Network, Plan};
use crate::now;
use crate::proxy::{ActivityTable, Upstream};
use crate::store::{MicrovmRow, Store, StoreError};
use crate::tokens::{TokenClaims, TokenKeys, TokenKind};
use crate::wire::{internal, request_hash, to_value, ts};

/// Default and largest `maximumDurationInSeconds`: 8 hours.
pub const MAX_DURATION_SECS: i64 = 8 * 3600;

/// A running VM and its forwards.
struct Live {
    vm: QemuVm,
    /// Guest port → host port on 127.0.0.1.
    forwards: BTreeMap<u16, u16>,
    /// The image's lifecycle hooks: their port and which are enabled.
    hooks: SessionHooks,
    /// When it last started running (launch, resume, re-attach): idle time counts from here
    /// until the endpoint sees traffic.
    since: std::time::Instant,
}

/// The `microvmHooks` of an image version and the port its hooks listener uses.
#[derive(Debug, Clone, Default)]
struct SessionHooks {
    port: u16,
    hooks: kiln_api::shapes::common::MicrovmHooks,
}

impl SessionHooks {
    /// The hooks in a stored version spec (an `ImageVersionConfig` as JSON).
    fn of(spec: &Value) -> SessionHooks {
        let h: kiln_api::shapes::common::Hooks =
            serde_json::from_value(spec["hooks"].clone()).unwrap_or_default();
        SessionHooks {
            port: h.port.map(|p| p as u16).unwrap_or(8080),
            hooks: h.microvm_hooks.unwrap_or_default(),
        }
    }

    /// The timeout of `hook` when the image enables it.
    fn enabled(&self, hook: &str) -> Option<Duration> {
        use kiln_api::shapes::common::HookState::Enabled;
        let h = &self.hooks;
        let (state, secs) = match hook {
            "run" => (h.run, h.run_timeout_in_seconds),
            "resume" => (h.resume, h.resume_timeout_in_seconds),
            "suspend" => (h.suspend, h.suspend_timeout_in_seconds),
            "terminate" => (h.terminate, h.terminate_timeout_in_seconds),
            _ => (None, None),
        };
        (state == Some(Enabled))
            .then(|| Duration::from_secs(secs.unwrap_or(30).clamp(1, 60) as u64))
    }

    /// Calls `hook` with `body` through the guest agent (AWS contract: POST
    /// `/aws/lambda-microvms/runtime/v1/<hook>` on the hooks port); 2xx is success.
    async fn call(&self, vm: &QemuVm, hook: &str, body: &[u8]) -> Result<(), String> {
        let Some(timeout) = self.enabled(hook) else {
            return Ok(());
        };
        let mut req = kiln_image::build::hook_request(self.port, hook, timeout);
        req.body = body.to_vec();
        match vm.agent().http_request(req).await {
            Ok(r) if (200..300).contains(&r.status) => Ok(()),
            Ok(r) => Err(format!(
                "the {hook} hook answered {}: {}",
                r.status,
                String::from_utf8_lossy(&r.body)
                    .chars()
                    .take(200)
                    .collect::<String>()
            )),
            Err(e) => Err(format!("the {hook} hook failed: {e}")),
        }
    }
}

/// Where reconciliation found a MicroVM's session.
enum Recovered {
    /// In its suspended directory.
    Suspended,
    /// In a running QEMU, with the state reason to record if the row said otherwise.
    Running(Box<QemuVm>, Option<&'static str>),
    /// Nowhere; the reason.
    Lost(String),
}

/// What is admitted now: VM count and memory.
#[derive(Debug, Default)]
struct Capacity {
    vms: usize,
    memory_mib: u64,
}

/// The MicroVM supervisor.
pub struct Microvms {
    host: Arc<Host>,
    store: Arc<Store>,
    config: Arc<Config>,
    ctx: ArnContext,
    endpoint_port: u16,
    live: Mutex<HashMap<String, Arc<Mutex<Live>>>>,
    capacity: StdMutex<Capacity>,
    /// Keys of the endpoint tokens.
    pub keys: Arc<TokenKeys>,
    /// Inbound traffic per MicroVM, kept by the endpoint proxy.
    pub activity: ActivityTable,
    /// One lock per MicroVM for suspend and resume, so concurrent requests to a suspended
    /// VM trigger one resume.
    transitions: StdMutex<HashMap<String, Arc<Mutex<()>>>>,
    /// When each suspended session was suspended (for `suspendedDurationSeconds`).
    suspended_at: StdMutex<HashMap<String, std::time::Instant>>,
    /// Held while a RunMicrovm checks its `clientToken` and records its MicroVM.
    run_claims: StdMutex<()>,
    /// Launch, suspend and resume counts and times.
    metrics: Arc<Metrics>,
    /// Where what kilnd does on its own (idle suspends, auto-resumes, the reaper) is recorded.
    audit: Arc<AuditLog>,
    /// Connectors and the egress gateway.
    network: Arc<Network>,
    /// Per-principal quotas (MicroVMs and their memory).
    quotas: Arc<crate::quotas::Quotas>,
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
    let mut b = [0u8; 9];
    let _ = getrandom::fill(&mut b);
    format!(
        "mvm-{}",
        b.iter().map(|x| format!("{x:02x}")).collect::<String>()
    )
}

impl Microvms {
    /// A supervisor; call [`Microvms::reconcile`] before serving.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        host: Arc<Host>,
        store: Arc<Store>,
        config: Arc<Config>,
        ctx: ArnContext,
        endpoint_port: u16,
        keys: Arc<TokenKeys>,
        activity: ActivityTable,
        metrics: Arc<Metrics>,
        audit: Arc<AuditLog>,
        network: Arc<Network>,
        quotas: Arc<crate::quotas::Quotas>,
    ) -> Microvms {
        Microvms {
            quotas,
            network,
            host,
            store,
            config,
            ctx,
            endpoint_port,
            live: Mutex::new(HashMap::new()),
            capacity: StdMutex::new(Capacity::default()),
            keys,
            activity,
            transitions: StdMutex::new(HashMap::new()),
            suspended_at: StdMutex::new(HashMap::new()),
            run_claims: StdMutex::new(()),
            metrics,
            audit,
        }
    }

    pub(crate) fn dir_of(&self, id: &str) -> PathBuf {
        self.host.home.join("microvms").join(id)
    }

    /// The HTTPS endpoint of a MicroVM.
    pub fn endpoint(&self, id: &str) -> String {
        match self.endpoint_port {
            443 => format!("https://{id}.{}", self.config.endpoint_domain),
            p => format!("https://{id}.{}:{p}", self.config.endpoint_domain),
        }
    }

    fn reserve(&self, memory_mib: u64) -> Result<(), ApiError> {
        let mut c = self.capacity.lock().unwrap_or_else(|p| p.into_inner());
        let budget = self.config.memory_budget_mib();
        if c.vms + 1 > self.config.max_microvms || c.memory_mib + memory_mib > budget {
            return Err(ApiError::InsufficientCapacity {
                message: format!(
                    "this kiln host is full: {} MicroVMs using {} of {} MiB; a {} MiB MicroVM does not fit \
                     (at most {} MicroVMs); terminate some or try later",
                    c.vms, c.memory_mib, budget, memory_mib, self.config.max_microvms
                ),
            });
        }
        c.vms += 1;
        c.memory_mib += memory_mib;
        Ok(())
    }

    fn reserve_memory(&self, memory_mib: u64) -> Result<(), ApiError> {
        let mut c = self.capacity.lock().unwrap_or_else(|p| p.into_inner());
        let budget = self.config.memory_budget_mib();
        if c.memory_mib + memory_mib > budget {
            return Err(ApiError::InsufficientCapacity {
                message: format!("this kiln host has {} of {budget} MiB in use; resuming needs {memory_mib} MiB more; try later", c.memory_mib),
            });
        }
        c.memory_mib += memory_mib;
        Ok(())
    }

    fn release_memory(&self, memory_mib: u64) {
        let mut c = self.capacity.lock().unwrap_or_else(|p| p.into_inner());
        c.memory_mib = c.memory_mib.saturating_sub(memory_mib);
    }

    fn release(&self, memory_mib: u64) {
        let mut c = self.capacity.lock().unwrap_or_else(|p| p.into_inner());
        c.vms = c.vms.saturating_sub(1);
        c.memory_mib = c.memory_mib.saturating_sub(memory_mib);
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
                        state: r.state.parse().unwrap_or(MicrovmState::Pending),
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
        if matches!(row.state.as_str(), "TERMINATING" | "TERMINATED") {
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
            state: r.state.parse().unwrap_or(MicrovmState::Pending),
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
        let vdir = version_dir(&self.host.home, &key, version);
        let config: ImageConfig = std::fs::read(vdir.join("image.json"))
            .ok()
            .and_then(|t| serde_json::from_slice(&t).ok())
            .ok_or_else(|| {
                ApiError::internal(format!(
                    "image {name} version {version} has no readable image.json"
                ))
            })?;
        let snap = Snapshot::open(&vdir.join("snapshot"), &self.host.vmm.qemu().version)
            .map_err(|e| ApiError::internal(format!("image {name} version {version}: {e}")))?;
        let memory = snap.manifest.memory_mib;
        let id = new_microvm_id();
        let dir = self.dir_of(&id);
        let row = MicrovmRow {
            id: id.clone(),
            image: key,
            version,
            state: MicrovmState::Pending.as_str().into(),
            state_reason: None,
            // The run hook's payload carries the session's secrets: it is passed on, never stored.
            request: to_value(&RunMicrovmRequest {
                run_hook_payload: None,
                ..req.clone()
            })?,
            started_at: now(),
            terminated_at: None,
            max_duration,
            memory_mib: memory as i64,
            kernel: self.host.assets.kernel.version.clone(),
            dir: dir.display().to_string(),
            forwards: json!({}),
            owner: caller.principal.clone(),
        };
        {
            // Checked again while no other RunMicrovm can record a row: of two calls with
            // one token, exactly one launches.
            let _claims = self.run_claims.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(answer) = self.replay_run(caller, token.as_ref())? {
                return Ok(answer);
            }
            // Under the same lock as the insert: of two launches racing for the last slot,
            // exactly one is recorded.
            self.quotas.admit_microvm(&caller.principal, memory)?;
            self.reserve(memory)?;
            if let Err(e) = self.store.insert_microvm(&row) {
                self.release(memory);
                return Err(internal(e));
            }
            if let Some(t) = &token {
                let launched = json!({ "microvmId": id }).to_string();
                if let Err(e) =
                    self.store
                        .put_client_token(&t.token, &t.scope, &t.hash, &launched, now())
                {
                    self.release(memory);
                    let _ = self.store.set_microvm_state(
                        &id,
                        MicrovmState::Terminated.as_str(),
                        Some("launch abandoned: its clientToken could not be recorded"),
                        Some(now()),
                    );
                    return Err(internal(e));
                }
            }
        }
        let hooks = SessionHooks::of(&v.spec);
        let outcome = self.start(&row, &snap, &config, &req, hooks).await;
        if outcome.is_err() {
            if let Some(t) = &token {
                // Nothing runs for this token: a retry with it launches anew.
                let _ = self.store.forget_client_token(&t.token, &t.scope);
            }
        }
        outcome
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

    /// Launches a recorded PENDING MicroVM and calls its run hook; on failure the row is
    /// TERMINATED with the reason and everything it held is freed.
    /// Frees what a launch that failed held and records why it ended.
    fn abandon_launch(&self, id: &str, dir: &Path, memory_mib: u64, why: &dyn std::fmt::Display) {
        self.release(memory_mib);
        let _ = std::fs::remove_dir_all(dir);
        let reason = format!("launch failed: {why}");
        let _ = self.store.set_microvm_state(
            id,
            MicrovmState::Terminated.as_str(),
            Some(&reason),
            Some(now()),
        );
    }

    async fn start(
        &self,
        row: &MicrovmRow,
        snap: &Snapshot,
        config: &ImageConfig,
        req: &RunMicrovmRequest,
        hooks: SessionHooks,
    ) -> Result<Value, ApiError> {
        let (id, dir, memory) = (row.id.as_str(), self.dir_of(&row.id), row.memory_mib as u64);
        match self.launch(id, &dir, snap, config, req, hooks).await {
            Ok(live) => {
                // A TerminateMicrovm that arrived during the launch wins.
                if self.row(id)?.state != MicrovmState::Pending.as_str() {
                    let _ = live.vm.terminate().await;
                    self.release(memory);
                    let _ = std::fs::remove_dir_all(&dir);
                    return Err(ApiError::conflict(
                        "Microvm",
                        id,
                        format!("MicroVM {id} was terminated while it started"),
                    ));
                }
                // The run hook is where a session gets its secrets and ids: never at build time.
                let payload = req.run_hook_payload.clone().unwrap_or_default();
                if let Err(e) = live.hooks.call(&live.vm, "run", payload.as_bytes()).await {
                    let _ = live.vm.terminate().await;
                    self.abandon_launch(id, &dir, memory, &e);
                    return Err(ApiError::conflict(
                        "Microvm",
                        id,
                        format!("MicroVM {id} did not start: {e}"),
                    ));
                }
                let forwards = json!(live.forwards);
                self.store
                    .set_microvm_forwards(id, &forwards)
                    .map_err(internal)?;
                self.store
                    .set_microvm_state(id, MicrovmState::Running.as_str(), None, None)
                    .map_err(internal)?;
                self.live
                    .lock()
                    .await
                    .insert(id.to_string(), Arc::new(Mutex::new(live)));
                tracing::info!(microvm = %id, image = %row.image, version = row.version, "launched");
                to_value(&self.describe(&self.row(id)?))
            }
            Err(e) => {
                self.abandon_launch(id, &dir, memory, &e);
                tracing::warn!(microvm = %id, error = %e, "launch failed");
                Err(ApiError::internal(format!(
                    "MicroVM {id} could not start: {e}"
                )))
            }
        }
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
        let mut forwards = BTreeMap::new();
        for port in [8080u16, config.app_port] {
            if let std::collections::btree_map::Entry::Vacant(slot) = forwards.entry(port) {
                slot.insert(
                    kiln_vmm::free_port()
                        .map_err(|e| kiln_vmm::VmmError::io("finding a free port for", dir, e))?,
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
        let plan = self.plan_of(req);
        target.egress = self.network.vm_egress(id, &plan.egress);
        target.restrict_egress = target.egress.is_none();
        target.discard_app_log = crate::sandbox::logging_disabled(req);
        let vm = self.host.vmm.restore(snap, target).await?;
        tracing::debug!(microvm = %id, ready_ms = vm.timeline().get("refreshed").unwrap_or_default().as_millis() as u64, "restored");
        Ok(Live {
            since: std::time::Instant::now(),
            vm,
            forwards,
            hooks,
        })
    }

    /// Terminates a MicroVM (idempotent) and frees everything it held.
    pub async fn terminate(&self, id: &str, reason: &str) -> Result<(), ApiError> {
        let row = self.row(id)?;
        if row.state == MicrovmState::Terminated.as_str() {
            return Ok(());
        }
        self.store
            .set_microvm_state(id, MicrovmState::Terminating.as_str(), None, None)
            .map_err(internal)?;
        let live = self.live.lock().await.remove(id);
        if let Some(live) = live {
            let live = Arc::try_unwrap(live).map(Mutex::into_inner);
            match live {
                Ok(live) => {
                    if let Err(e) = live.hooks.call(&live.vm, "terminate", b"{}").await {
                        tracing::info!(microvm = %id, error = %e, "terminate hook");
                    }
                    if let Err(e) = live.vm.terminate().await {
                        tracing::warn!(microvm = %id, error = %e, "terminating");
                    }
                }
                Err(shared) => {
                    // Someone still holds it (a proxied request): stop QEMU through the lock.
                    let mut l = shared.lock().await;
                    let _ = l.vm.pause().await;
                    kill_dir(&self.dir_of(id));
                    l.forwards.clear();
                }
            }
            self.release(row.memory_mib as u64);
        } else if row.state == MicrovmState::Suspended.as_str() {
            // A suspended session holds a slot but no memory.
            self.release(0);
        }
        let _ = std::fs::remove_dir_all(self.dir_of(id));
        self.activity.forget(id);
        self.suspended_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        self.store
            .set_microvm_state(
                id,
                MicrovmState::Terminated.as_str(),
                Some(reason),
                Some(now()),
            )
            .map_err(internal)?;
        tracing::info!(microvm = %id, %reason, "terminated");
        Ok(())
    }

    fn transition_lock(&self, id: &str) -> Arc<Mutex<()>> {
        let mut t = self.transitions.lock().unwrap_or_else(|p| p.into_inner());
        t.entry(id.to_string()).or_default().clone()
    }

    fn suspended_dir(&self, id: &str) -> PathBuf {
        self.dir_of(id).join("suspended")
    }

    /// SuspendMicrovm: the suspend hook, then memory, devices and disk to the session's
    /// directory; QEMU exits so its memory returns to the host. Idempotent.
    pub async fn suspend(&self, id: &str) -> Result<(), ApiError> {
        let lock = self.transition_lock(id);
        let _guard = lock.lock().await;
        let row = self.row(id)?;
        match row.state.as_str() {
            "SUSPENDED" => return Ok(()),
            "RUNNING" => {}
            other => {
                return Err(ApiError::conflict(
                    "Microvm",
                    id,
                    format!("MicroVM {id} is {other}; only a RUNNING MicroVM can be suspended"),
                ))
            }
        }
        let Some(live) = self.live.lock().await.remove(id) else {
            return Err(ApiError::conflict(
                "Microvm",
                id,
                format!("MicroVM {id} is not running on this host"),
            ));
        };
        let live = match Arc::try_unwrap(live) {
            Ok(l) => l.into_inner(),
            Err(shared) => {
                self.live.lock().await.insert(id.to_string(), shared);
                return Err(ApiError::conflict(
                    "Microvm",
                    id,
                    "the MicroVM is busy; try again",
                ));
            }
        };
        let started = std::time::Instant::now();
        self.store
            .set_microvm_state(id, MicrovmState::Suspending.as_str(), None, None)
            .map_err(internal)?;
        if let Err(e) = live.hooks.call(&live.vm, "suspend", b"{}").await {
            tracing::info!(microvm = %id, error = %e, "suspend hook");
        }
        let Live {
            vm,
            forwards,
            hooks,
            ..
        } = live;
        let suspended = vm.suspend(&self.suspended_dir(id)).await;
        self.metrics
            .suspend_finished(suspended.is_ok(), started.elapsed());
        match suspended {
            Ok(_) => {
                self.release_memory(row.memory_mib as u64);
                self.store
                    .set_microvm_state(id, MicrovmState::Suspended.as_str(), None, None)
                    .map_err(internal)?;
                self.suspended_at
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(id.to_string(), std::time::Instant::now());
                tracing::info!(microvm = %id, "suspended");
                Ok(())
            }
            Err(failure) => {
                let message = failure.to_string();
                match failure.vm {
                    Some(vm) => {
                        self.live.lock().await.insert(
                            id.to_string(),
                            Arc::new(Mutex::new(Live {
                                since: std::time::Instant::now(),
                                vm,
                                forwards,
                                hooks,
                            })),
                        );
                        self.store
                            .set_microvm_state(
                                id,
                                MicrovmState::Running.as_str(),
                                Some(&message),
                                None,
                            )
                            .map_err(internal)?;
                    }
                    None => {
                        // QEMU is gone, and the guest's memory with it: no retry can
                        // suspend it, so the answer is the state it ended in, not a 500.
                        self.release(row.memory_mib as u64);
                        let reason = format!("the MicroVM ended while suspending: {message}");
                        self.store
                            .set_microvm_state(
                                id,
                                MicrovmState::Terminated.as_str(),
                                Some(&reason),
                                Some(now()),
                            )
                            .map_err(internal)?;
                        self.activity.forget(id);
                        let _ = std::fs::remove_dir_all(self.dir_of(id));
                        return Err(ApiError::conflict(
                            "Microvm",
                            id,
                            format!("MicroVM {id} is TERMINATED: {reason}"),
                        ));
                    }
                }
                Err(ApiError::internal(message))
            }
        }
    }

    /// ResumeMicrovm: a new QEMU from the session's directory (new forwards), clock and
    /// entropy refreshed, then the resume hook. Idempotent.
    pub async fn resume(&self, id: &str) -> Result<(), ApiError> {
        self.resume_session(id).await.map(drop)
    }

    /// [`Microvms::resume`]; whether this call resumed it (false: it was running already).
    async fn resume_session(&self, id: &str) -> Result<bool, ApiError> {
        let lock = self.transition_lock(id);
        let _guard = lock.lock().await;
        let row = self.row(id)?;
        match row.state.as_str() {
            "RUNNING" => return Ok(false),
            "SUSPENDED" => {}
            other => {
                return Err(ApiError::conflict(
                    "Microvm",
                    id,
                    format!("MicroVM {id} is {other}; only a SUSPENDED MicroVM can be resumed"),
                ))
            }
        }
        self.reserve_memory(row.memory_mib as u64)?;
        let started = std::time::Instant::now();
        let hooks = match self
            .store
            .version(&row.image, row.version)
            .map_err(internal)?
        {
            Some(v) => SessionHooks::of(&v.spec),
            None => SessionHooks::default(),
        };
        let old: BTreeMap<u16, u16> =
            serde_json::from_value(row.forwards.clone()).unwrap_or_default();
        let sus = match kiln_vmm::SuspendedVm::open(
            &self.suspended_dir(id),
            &self.host.vmm.qemu().version,
        ) {
            Ok(sus) => sus,
            Err(e) => {
                // The saved session itself is unusable (missing, damaged, or from another
                // QEMU): a retry would fail the same way, so the session ends here.
                self.release_memory(row.memory_mib as u64);
                let reason = format!("the suspended session cannot be restored: {e}");
                tracing::warn!(microvm = %id, %reason, "resume failed; terminating");
                self.terminate(id, &reason).await?;
                return Err(ApiError::conflict(
                    "Microvm",
                    id,
                    format!("MicroVM {id} is TERMINATED: {reason}"),
                ));
            }
        };
        let result = async {
            let mut forwards = BTreeMap::new();
            for guest in old.keys().copied().chain([8080]) {
                forwards.insert(
                    guest,
                    kiln_vmm::free_port().map_err(|e| {
                        kiln_vmm::VmmError::io("finding a free port for", &self.dir_of(id), e)
                    })?,
                );
            }
            let mut target = RestoreTarget::new(self.dir_of(id).join("vm"));
            target.forwards = forwards
                .iter()
                .map(|(g, h)| PortForward {
                    host_port: *h,
                    guest_port: *g,
                })
                .collect();
            let plan = self.plan_of_row(&row);
            target.egress = self.network.vm_egress(id, &plan.egress);
            target.restrict_egress = target.egress.is_none();
            target.discard_app_log =
                serde_json::from_value::<RunMicrovmRequest>(row.request.clone())
                    .is_ok_and(|req| crate::sandbox::logging_disabled(&req));
            let vm = self.host.vmm.resume(&sus, target).await?;
            Ok::<_, kiln_vmm::VmmError>(Live {
                since: std::time::Instant::now(),
                vm,
                forwards,
                hooks,
            })
        }
        .await;
        self.metrics
            .resume_finished(result.is_ok(), started.elapsed());
        match result {
            Ok(live) => {
                if let Err(e) = live.hooks.call(&live.vm, "resume", b"{}").await {
                    tracing::info!(microvm = %id, error = %e, "resume hook");
                }
                self.store
                    .set_microvm_forwards(id, &json!(live.forwards))
                    .map_err(internal)?;
                self.store
                    .set_microvm_state(id, MicrovmState::Running.as_str(), None, None)
                    .map_err(internal)?;
                self.live
                    .lock()
                    .await
                    .insert(id.to_string(), Arc::new(Mutex::new(live)));
                tracing::info!(microvm = %id, "resumed");
                Ok(true)
            }
            Err(e) => {
                self.release_memory(row.memory_mib as u64);
                tracing::warn!(microvm = %id, error = %e, "resume failed; the session stays suspended");
                Err(ApiError::internal(format!(
                    "MicroVM {id} could not resume (it stays SUSPENDED): {e}"
                )))
            }
        }
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
            Some(l) => Some(l.lock().await.vm.pid()),
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
            "state": r.state,
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
        self.store.microvm(id).ok().flatten().map(|r| r.state)
    }

    /// The guest agent of a running MicroVM (resuming a suspended one with auto-resume).
    pub async fn agent(&self, id: &str) -> Result<kiln_agent::AgentClient, UpstreamError> {
        let live = self.running_or_resumed(id).await?;
        let l = live.lock().await;
        Ok(l.vm.agent().clone())
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
                if !(auto_resume && matches!(row.state.as_str(), "SUSPENDED" | "SUSPENDING")) {
                    return Err(UpstreamError::NotRunning(row.state));
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

    /// Brings the store and reality together after a (re)start: running VMs are re-attached,
    /// half-done launches and dead VMs are cleaned up, orphan directories removed.
    pub async fn reconcile(&self) -> Result<(), StoreError> {
        let open = self.store.microvms(
            None,
            None,
            Some(&[
                "PENDING",
                "RUNNING",
                "TERMINATING",
                "SUSPENDING",
                "SUSPENDED",
            ]),
        )?;
        for r in &open {
            let dir = self.dir_of(&r.id);
            let outcome = self.recover(r).await;
            let _ =
                std::fs::remove_dir_all(kiln_vmm::suspend::staging_dir(&self.suspended_dir(&r.id)));
            match outcome {
                Recovered::Suspended => {
                    // A suspended session needs no process: it stays as it is on disk.
                    kill_dir(&dir);
                    let _ = std::fs::remove_dir_all(dir.join("vm"));
                    self.capacity.lock().unwrap_or_else(|p| p.into_inner()).vms += 1;
                    self.store
                        .set_microvm_state(&r.id, "SUSPENDED", None, None)?;
                    // The suspended duration restarts with kilnd: a session is never cut short.
                    self.suspended_at
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(r.id.clone(), std::time::Instant::now());
                    tracing::info!(microvm = %r.id, "suspended session kept");
                }
                Recovered::Running(mut vm, note) => {
                    // The gateway's listeners died with the previous kilnd: serve the VM's
                    // namespace again (its rules are rewritten to the new listeners).
                    if let Some(egress) = self.network.vm_egress(&r.id, &self.plan_of_row(r).egress)
                    {
                        if let Err(e) = vm.set_egress(&egress).await {
                            tracing::warn!(microvm = %r.id, error = %e, "egress not re-attached: the guest reaches nothing");
                        }
                    }
                    // Whatever the interrupted suspend or resume left on disk is not the session.
                    let _ = std::fs::remove_dir_all(self.suspended_dir(&r.id));
                    if r.state != "RUNNING" {
                        self.store.set_microvm_state(&r.id, "RUNNING", note, None)?;
                    }
                    let hooks = match self.store.version(&r.image, r.version)? {
                        Some(v) => SessionHooks::of(&v.spec),
                        None => SessionHooks::default(),
                    };
                    // The forwards QEMU has, not the stored ones: a resume interrupted before
                    // it stored its new ports left the old ones in the row.
                    let forwards: BTreeMap<u16, u16> = vm
                        .spec()
                        .network
                        .iter()
                        .flat_map(|n| n.forwards.iter())
                        .map(|f| (f.guest_port, f.host_port))
                        .collect();
                    self.store.set_microvm_forwards(&r.id, &json!(forwards))?;
                    {
                        let mut c = self.capacity.lock().unwrap_or_else(|p| p.into_inner());
                        c.vms += 1;
                        c.memory_mib += r.memory_mib as u64;
                    }
                    self.live.lock().await.insert(
                        r.id.clone(),
                        Arc::new(Mutex::new(Live {
                            since: std::time::Instant::now(),
                            vm: *vm,
                            forwards,
                            hooks,
                        })),
                    );
                    tracing::info!(microvm = %r.id, "re-attached after restart");
                }
                Recovered::Lost(reason) => {
                    kill_dir(&dir);
                    let _ = std::fs::remove_dir_all(&dir);
                    self.store.set_microvm_state(
                        &r.id,
                        "TERMINATED",
                        Some(&reason),
                        Some(now()),
                    )?;
                    self.audit
                        .kilnd("TerminateMicrovm", &r.owner, &r.id, &Ok(()), &reason);
                    tracing::warn!(microvm = %r.id, %reason, "terminated during reconciliation");
                }
            }
        }
        // Directories no open MicroVM owns: a crash between mkdir and the store's insert.
        let known: std::collections::HashSet<String> = open.iter().map(|r| r.id.clone()).collect();
        if let Ok(entries) = std::fs::read_dir(self.host.home.join("microvms")) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !known.contains(&name) {
                    kill_dir(&e.path());
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        Ok(())
    }

    /// Where the session of an open MicroVM is after a restart. A suspend is complete once its
    /// directory is published (the QEMU left paused behind it must never run again); a resume
    /// is complete once its guest runs (the suspended directory is then stale). One of the two
    /// always holds the whole session, so a crash at any point loses nothing.
    async fn recover(&self, r: &MicrovmRow) -> Recovered {
        let suspended = || {
            kiln_vmm::SuspendedVm::open(&self.suspended_dir(&r.id), &self.host.vmm.qemu().version)
        };
        let vm_dir = self.dir_of(&r.id).join("vm");
        let attach = || self.host.vmm.attach(&vm_dir);
        match r.state.as_str() {
            "SUSPENDING" if suspended().is_ok() => Recovered::Suspended,
            "SUSPENDING" => match attach().await {
                Ok(vm) => Recovered::Running(
                    Box::new(vm),
                    Some("kilnd restarted during a suspend; the VM kept running"),
                ),
                Err(e) => {
                    Recovered::Lost(format!("its VM stopped while kilnd was suspending it: {e}"))
                }
            },
            "SUSPENDED" => match attach().await {
                // kilnd stopped after the resumed guest started: it holds the session now.
                Ok(vm) => Recovered::Running(Box::new(vm), None),
                Err(_) => match suspended() {
                    Ok(_) => Recovered::Suspended,
                    Err(e) => Recovered::Lost(format!("its suspended state is unusable: {e}")),
                },
            },
            "RUNNING" => match attach().await {
                Ok(vm) => Recovered::Running(Box::new(vm), None),
                Err(_) => Recovered::Lost("its VM stopped while kilnd was not running".into()),
            },
            _ => Recovered::Lost("kilnd restarted while it was starting or stopping".into()),
        }
    }

    /// The reaper terminates a MicroVM; the audit log says kilnd did it, and why.
    async fn terminate_on_own(&self, r: &MicrovmRow, reason: &str) {
        let terminated = self.terminate(&r.id, reason).await;
        self.audit
            .kilnd("TerminateMicrovm", &r.owner, &r.id, &terminated, reason);
    }

    /// Terminates MicroVMs past their maximum duration; runs every second.
    pub async fn reap(self: Arc<Self>) {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            self.forget_expired();
            let Ok(rows) = self
                .store
                .microvms(None, None, Some(&["RUNNING", "SUSPENDED"]))
            else {
                continue;
            };
            let t = now();
            for r in rows {
                if r.started_at + r.max_duration as f64 <= t {
                    self.terminate_on_own(&r, "maximum duration reached").await;
                    continue;
                }
                let Some(policy) = serde_json::from_value::<RunMicrovmRequest>(r.request.clone())
                    .ok()
                    .and_then(|q| q.idle_policy)
                else {
                    continue;
                };
                match r.state.as_str() {
                    "RUNNING" => {
                        let Some(idle) = self.idle_for(&r.id).await else {
                            continue;
                        };
                        if idle.as_secs() >= policy.max_idle_duration_seconds as u64 {
                            tracing::info!(microvm = %r.id, idle_s = idle.as_secs(), "idle: suspending");
                            let suspended = self.suspend(&r.id).await;
                            let reason = format!("no endpoint traffic for {} s", idle.as_secs());
                            self.audit.kilnd(
                                "SuspendMicrovm",
                                &r.owner,
                                &r.id,
                                &suspended,
                                &reason,
                            );
                            if suspended.is_ok() && policy.suspended_duration_seconds == 0 {
                                self.terminate_on_own(
                                    &r,
                                    "idle, and suspendedDurationSeconds is 0",
                                )
                                .await;
                            }
                        }
                    }
                    "SUSPENDED" => {
                        let since = self
                            .suspended_at
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get(&r.id)
                            .copied();
                        if since.is_some_and(|s| {
                            s.elapsed().as_secs() >= policy.suspended_duration_seconds as u64
                        }) {
                            self.terminate_on_own(
                                &r,
                                "suspended longer than suspendedDurationSeconds",
                            )
                            .await;
                        }
                    }
                    _ => {}
                }
            }
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

/// Kills every QEMU whose command line names a path under `dir`. Scanning processes rather
/// than reading a pid file also catches a QEMU that a crashed kilnd had just started, before
/// QEMU wrote its pid file.
pub fn kill_dir(dir: &Path) {
    let needle = format!("{}/", dir.display());
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return;
    };
    for p in procs.flatten() {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(p.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline);
        let is_qemu = cmdline
            .split('\0')
            .next()
            .is_some_and(|argv0| argv0.contains("qemu-system"));
        if is_qemu && cmdline.contains(&needle) {
            tracing::info!(pid, dir = %dir.display(), "killing a QEMU left behind");
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

//! E2B's control plane on kilnd, under the API listener's `/e2b` prefix
//! (`E2B_API_URL=http://<api-listen>/e2b`), so E2B's SDKs create, list, pause, connect to and
//! kill sandboxes that are kiln MicroVMs.
//!
//! - Auth: `X-API-Key: e2b_<hex>` ([`keys`]), standing for a kiln access key and its principal.
//!   A principal sees only its own sandboxes (the admin all, as in kiln's API).
//! - Sandboxes are MicroVMs run through the supervisor as the caller (quotas, audit and the
//!   lifecycle apply as for RunMicrovm); the sandbox id is the MicroVM id without `mvm-`.
//! - `templateID` names a kiln image ([`template`]); `base` is built on first use.
//! - Timeout: each sandbox ends at `endAt` (default 300 s after creation); the reaper kills it
//!   then, or pauses it (suspends the MicroVM) with `autoPause`.
//! - envd: kilnd gives each new sandbox a random access token through envd's `/init`; the
//!   endpoint proxy admits requests for the sandbox only with it (`proxy/sandbox.rs`).

// The handlers' helpers fail with the ready-made E2B error response; it is built once, on
// the error path of a request, so its size costs nothing worth boxing for.
#![allow(clippy::result_large_err)]

pub mod keys;
pub mod registry;
pub mod template;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use kiln_api::params::MicrovmParams;
use kiln_api::shapes::microvm::RunMicrovmRequest;
use kiln_api::{ApiError, Request};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::artifacts::s3::S3Store;
use crate::auth::keys::Caller;
use crate::images::Images;
use crate::store::Store;
use crate::supervisor::Microvms;
use registry::{Registry, Sandbox};

/// envd's port in every sandbox.
pub const ENVD_PORT: u16 = 49983;
/// The envd version kiln-init serves (`kiln_agent::guest::envd::VERSION`).
pub const ENVD_VERSION: &str = kiln_agent::guest::envd::VERSION;
/// E2B's default sandbox timeout, seconds.
pub const DEFAULT_TIMEOUT: u64 = 300;
/// The longest timeout: a MicroVM's longest life.
pub const MAX_TIMEOUT: u64 = 8 * 3600;
/// Most sandboxes a list page returns.
const MAX_PAGE: usize = 100;
/// Largest request body.
const MAX_BODY: usize = 1024 * 1024;

/// The control plane's state.
pub struct E2b {
    store: Arc<dyn Store>,
    microvms: Arc<Microvms>,
    images: Arc<Images>,
    s3: Arc<S3Store>,
    /// The sandboxes (also the proxy's [`crate::endpoint::proxy::sandbox::SandboxAccess`]).
    pub registry: Arc<Registry>,
    /// `domain` in E2B's answers: the endpoint domain, with the port unless 443.
    domain: String,
}

impl E2b {
    /// The control plane over kilnd's parts and the sandboxes of `registry`.
    pub fn new(
        registry: Arc<Registry>,
        store: Arc<dyn Store>,
        microvms: Arc<Microvms>,
        images: Arc<Images>,
        s3: Arc<S3Store>,
        endpoint_domain: &str,
        endpoint_port: u16,
    ) -> Arc<E2b> {
        let domain = match endpoint_port {
            443 => endpoint_domain.to_string(),
            p => format!("{endpoint_domain}:{p}"),
        };
        Arc::new(E2b {
            store,
            microvms,
            images,
            s3,
            registry,
            domain,
        })
    }

    /// The routes, to be nested under `/e2b`.
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/sandboxes", post(create).get(list_v1))
            .route("/v2/sandboxes", post(create).get(list_v2))
            .route("/sandboxes/metrics", get(metrics_many))
            .route("/sandboxes/{id}", get(detail).delete(kill))
            .route("/sandboxes/{id}/timeout", post(set_timeout))
            .route("/sandboxes/{id}/refreshes", post(refresh))
            .route("/sandboxes/{id}/pause", post(pause))
            .route("/sandboxes/{id}/resume", post(resume))
            .route("/sandboxes/{id}/connect", post(connect))
            .route("/v2/sandboxes/{id}/connect", post(connect))
            .route("/sandboxes/{id}/metrics", get(metrics_one))
            .route("/kiln/config", get(kiln_config))
            .fallback(|| async { error(StatusCode::NOT_FOUND, "kiln's E2B API has no such route") })
            .with_state(self.clone())
    }

    /// Kills or pauses sandboxes whose timeout passed; forgets those whose MicroVM is gone.
    pub async fn reap(self: Arc<Self>) {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = crate::now();
            for sandbox in self.registry.all() {
                let state = match self.store.microvm(&sandbox.microvm_id) {
                    Ok(Some(row)) => row.state.as_str(),
                    Ok(None) => {
                        self.registry.remove(&sandbox.id);
                        continue;
                    }
                    Err(_) => continue,
                };
                if state == "TERMINATED" || state == "TERMINATING" {
                    self.registry.remove(&sandbox.id);
                    continue;
                }
                if sandbox.end_at > now || state != "RUNNING" {
                    continue;
                }
                let owner = Caller {
                    principal: sandbox.owner.clone(),
                    account: self
                        .store
                        .account_of(&sandbox.owner)
                        .ok()
                        .flatten()
                        .unwrap_or_default(),
                    access_key_id: String::new(),
                };
                let params = MicrovmParams {
                    microvm_identifier: sandbox.microvm_id.clone(),
                };
                if sandbox.auto_pause {
                    tracing::info!(sandbox = %sandbox.id, "e2b: timeout reached, pausing (autoPause)");
                    if let Err(e) = self
                        .microvms
                        .handle(&owner, Request::SuspendMicrovm { params })
                        .await
                    {
                        tracing::warn!(sandbox = %sandbox.id, error = %e.message(), "e2b: cannot pause at timeout");
                    }
                } else {
                    tracing::info!(sandbox = %sandbox.id, "e2b: timeout reached, killing");
                    match self
                        .microvms
                        .handle(&owner, Request::TerminateMicrovm { params })
                        .await
                    {
                        Ok(_) => self.registry.remove(&sandbox.id),
                        Err(e) => {
                            tracing::warn!(sandbox = %sandbox.id, error = %e.message(), "e2b: cannot kill at timeout")
                        }
                    }
                }
            }
        }
    }

    fn caller(&self, headers: &HeaderMap) -> Result<Caller, Response> {
        let key = headers
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                error(
                    StatusCode::UNAUTHORIZED,
                    "missing X-API-Key: set E2B_API_KEY (see `kiln e2b env`)",
                )
            })?;
        keys::authenticate(&self.store, key).map_err(|m| error(StatusCode::UNAUTHORIZED, &m))
    }

    /// The caller's sandbox `id` (404 for someone else's, as for a missing one).
    fn owned(&self, caller: &Caller, id: &str) -> Result<Sandbox, Response> {
        self.registry
            .get(id)
            .filter(|s| caller.can_access(&s.owner))
            .ok_or_else(|| error(StatusCode::NOT_FOUND, &format!("sandbox {id} not found")))
    }

    /// The caller the request's API key names, and its sandbox `id` (401 without a valid
    /// key; 404 for someone else's sandbox, as for a missing one).
    fn caller_and_sandbox(
        &self,
        headers: &HeaderMap,
        id: &str,
    ) -> Result<(Caller, Sandbox), Response> {
        let caller = self.caller(headers)?;
        let sandbox = self.owned(&caller, id)?;
        Ok((caller, sandbox))
    }

    /// The MicroVM state of a sandbox as E2B names it.
    fn state_of(&self, sandbox: &Sandbox) -> Option<&'static str> {
        match self
            .store
            .microvm(&sandbox.microvm_id)
            .ok()
            .flatten()?
            .state
            .as_str()
        {
            "RUNNING" | "PENDING" => Some("running"),
            "SUSPENDED" | "SUSPENDING" => Some("paused"),
            _ => None,
        }
    }

    fn created(&self, s: &Sandbox) -> Value {
        json!({
            "templateID": s.template_id,
            "sandboxID": s.id,
            "clientID": "kiln",
            "envdVersion": ENVD_VERSION,
            "envdAccessToken": s.access_token,
            "trafficAccessToken": s.access_token,
            "domain": self.domain,
        })
    }

    fn listed(&self, s: &Sandbox, state: &str) -> Value {
        json!({
            "templateID": s.template_id,
            "sandboxID": s.id,
            "clientID": "kiln",
            "startedAt": rfc3339(s.started_at),
            "endAt": rfc3339(s.end_at),
            "cpuCount": cpu_count(s.memory_mib),
            "memoryMB": s.memory_mib,
            "diskSizeMB": 4096,
            "metadata": s.metadata,
            "state": state,
            "envdVersion": ENVD_VERSION,
        })
    }
}

fn cpu_count(memory_mib: u64) -> u64 {
    (memory_mib / 2048).max(1)
}

/// RFC 3339 UTC with milliseconds.
fn rfc3339(t: f64) -> String {
    let secs = t.floor() as i64;
    let millis = ((t - t.floor()) * 1000.0) as i64;
    time::OffsetDateTime::from_unix_timestamp(secs)
        .map(|d| {
            format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{millis:03}Z",
                d.year(),
                d.month() as u8,
                d.day(),
                d.hour(),
                d.minute(),
                d.second()
            )
        })
        .unwrap_or_else(|_| "1970-01-01T00:00:00.000Z".into())
}

/// E2B's error body: `{"code": <status>, "message": …}`.
fn error(status: StatusCode, message: &str) -> Response {
    (
        status,
        axum::Json(json!({"code": status.as_u16(), "message": message})),
    )
        .into_response()
}

fn api_error(e: ApiError) -> Response {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    error(status, e.message())
}

fn reply(status: StatusCode, body: Value) -> Response {
    (status, axum::Json(body)).into_response()
}

fn parse_body(body: &Bytes) -> Result<Value, Response> {
    if body.len() > MAX_BODY {
        return Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request body larger than 1 MiB",
        ));
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            &format!("the body is not valid JSON: {e}"),
        )
    })?;
    if !v.is_object() {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "the body must be a JSON object",
        ));
    }
    Ok(v)
}

fn timeout_of(body: &Value, default: u64) -> Result<u64, Response> {
    match body.get("timeout") {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v.as_u64().filter(|t| *t <= MAX_TIMEOUT).ok_or_else(|| {
            error(
                StatusCode::BAD_REQUEST,
                &format!("timeout must be a number of seconds from 0 to {MAX_TIMEOUT}"),
            )
        }),
    }
}

fn string_map(body: &Value, field: &str) -> Result<BTreeMap<String, String>, Response> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(BTreeMap::new()),
        Some(Value::Object(m)) => {
            if m.len() > 1000 {
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    &format!("{field}: at most 1000 entries"),
                ));
            }
            m.iter()
                .map(|(k, v)| match v {
                    Value::String(s) if k.len() + s.len() <= 64 * 1024 => {
                        Ok((k.clone(), s.clone()))
                    }
                    _ => Err(error(
                        StatusCode::BAD_REQUEST,
                        &format!("{field}.{k} must be a string (at most 64 KiB)"),
                    )),
                })
                .collect()
        }
        Some(_) => Err(error(
            StatusCode::BAD_REQUEST,
            &format!("{field} must be an object of strings"),
        )),
    }
}

fn random_token() -> String {
    let mut b = [0u8; 24];
    let _ = getrandom::fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

async fn create(State(e2b): State<Arc<E2b>>, headers: HeaderMap, body: Bytes) -> Response {
    let caller = match e2b.caller(&headers) {
        Ok(c) => c,
        Err(r) => return r,
    };
    match create_sandbox(&e2b, &caller, &body).await {
        Ok(v) => reply(StatusCode::CREATED, v),
        Err(r) => r,
    }
}

async fn create_sandbox(e2b: &Arc<E2b>, caller: &Caller, body: &Bytes) -> Result<Value, Response> {
    let body = parse_body(body)?;
    let template = body
        .get("templateID")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            error(
                StatusCode::BAD_REQUEST,
                "templateID is required (e.g. \"base\")",
            )
        })?
        .to_string();
    let timeout = timeout_of(&body, DEFAULT_TIMEOUT)?;
    let metadata = string_map(&body, "metadata")?;
    let env_vars = string_map(&body, "envVars")?;
    let auto_pause = body
        .get("autoPause")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let (image, version) = template::resolve(&e2b.images, &e2b.s3, caller, &template)
        .await
        .map_err(api_error)?;
    let mut run = json!({
        "imageIdentifier": image,
        "maximumDurationInSeconds": MAX_TIMEOUT,
    });
    if let Some(v) = version {
        run["imageVersion"] = json!(v);
    }
    if body.get("allow_internet_access") == Some(&Value::Bool(false)) {
        run["egressNetworkConnectors"] = json!([]);
    }
    let run: RunMicrovmRequest = serde_json::from_value(run).map_err(|e| {
        error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("building RunMicrovm: {e}"),
        )
    })?;
    let launched = e2b
        .microvms
        .handle(
            caller,
            Request::RunMicrovm {
                body: Box::new(run),
            },
        )
        .await
        .map_err(api_error)?;
    let microvm_id = launched["microvmId"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let Some(id) = microvm_id.strip_prefix("mvm-").map(str::to_string) else {
        return Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the MicroVM has an unexpected id",
        ));
    };
    let memory_mib = e2b
        .store
        .microvm(&microvm_id)
        .ok()
        .flatten()
        .map(|r| r.memory_mib as u64)
        .unwrap_or(512);
    let sandbox = Sandbox {
        id: id.clone(),
        microvm_id: microvm_id.clone(),
        owner: caller.principal.clone(),
        template_id: template,
        metadata,
        started_at: crate::now(),
        end_at: crate::now() + timeout as f64,
        auto_pause,
        access_token: random_token(),
        memory_mib,
    };
    let init = json!({
        "envVars": env_vars,
        "accessToken": sandbox.access_token,
        "timestamp": rfc3339(crate::now()),
    });
    let started = start_envd(&e2b.microvms, &microvm_id, &sandbox.access_token).await;
    let initialised = match started {
        Ok(()) => init_envd(&e2b.microvms, &microvm_id, &sandbox.access_token, &init).await,
        Err(e) => Err(e),
    };
    if let Err(message) = initialised {
        let params = MicrovmParams {
            microvm_identifier: microvm_id.clone(),
        };
        let _ = e2b
            .microvms
            .handle(caller, Request::TerminateMicrovm { params })
            .await;
        return Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("the sandbox's envd did not answer ({message}); is the template built on a kiln with envd (kiln-init ≥ this kilnd)? the sandbox was killed"),
        ));
    }
    e2b.registry.put(sandbox.clone()).map_err(|e| {
        error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("recording the sandbox: {e}"),
        )
    })?;
    Ok(e2b.created(&sandbox))
}

/// Starts envd in a new sandbox, with its access token from the start, through the guest
/// agent (root-only, never reachable from inside the guest): kiln-init itself, run again as
/// `--serve-envd 0.0.0.0:49983 --detach`, the token in its environment (not its command
/// line, which any guest user can read). MicroVMs that are not sandboxes never run envd.
async fn start_envd(microvms: &Microvms, microvm_id: &str, token: &str) -> Result<(), String> {
    let agent = microvms
        .agent(microvm_id)
        .await
        .map_err(|e| format!("the guest agent is unreachable: {e:?}"))?;
    let listen = format!("0.0.0.0:{ENVD_PORT}");
    let request =
        kiln_agent::ExecRequest::new(["/proc/1/exe", "--serve-envd", &listen, "--detach"])
            .env(kiln_agent::guest::envd::TOKEN_ENV, token)
            .timeout(Duration::from_secs(20));
    let out = agent
        .run(request)
        .await
        .map_err(|e| format!("starting envd: {e}"))?;
    if out.code != Some(0) {
        return Err(format!(
            "envd did not start ({:?}): {}",
            out.code,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// Sends envd's `/init` (env vars) until envd answers, for up to 30 s.
async fn init_envd(
    microvms: &Microvms,
    microvm_id: &str,
    token: &str,
    body: &Value,
) -> Result<(), String> {
    let body = body.to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut last = String::from("no answer");
    while std::time::Instant::now() < deadline {
        match envd_call(
            microvms,
            microvm_id,
            "POST",
            "/init",
            Some(token),
            Some(&body),
        )
        .await
        {
            Ok((204 | 200, _)) => return Ok(()),
            Ok((status, text)) => {
                return Err(format!(
                    "envd answered /init with {status}: {}",
                    String::from_utf8_lossy(&text)
                ))
            }
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(last)
}

/// One request to envd in a MicroVM; the status and body (at most 1 MiB).
async fn envd_call(
    microvms: &Microvms,
    microvm_id: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> Result<(u16, Vec<u8>), String> {
    let upstream = microvms
        .upstream(microvm_id, ENVD_PORT)
        .await
        .map_err(|e| format!("{e:?}"))?;
    let mut stream = upstream
        .connect(Duration::from_secs(5))
        .await
        .map_err(|e| e.to_string())?;
    let body = body.unwrap_or("");
    let token = token
        .map(|t| format!("X-Access-Token: {t}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: envd\r\nContent-Type: application/json\r\n{token}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let exchange = async {
        stream.write_all(request.as_bytes()).await?;
        let mut answer = Vec::new();
        (&mut stream)
            .take(1024 * 1024 + 4096)
            .read_to_end(&mut answer)
            .await?;
        Ok::<_, std::io::Error>(answer)
    };
    let answer = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| "envd did not answer within 10 s".to_string())?
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&answer);
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| "envd's answer is not HTTP (is envd up yet?)".to_string())?;
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(answer.len(), |p| p + 4);
    Ok((status, answer[split..].to_vec()))
}

#[derive(serde::Deserialize)]
struct ListQuery {
    metadata: Option<String>,
    state: Option<String>,
    #[serde(rename = "nextToken")]
    next_token: Option<String>,
    limit: Option<usize>,
    /// `asc` (oldest first) or `desc` (newest first, the default).
    order: Option<String>,
}

fn metadata_filter(raw: Option<&str>) -> Result<Vec<(String, String)>, Response> {
    let Some(raw) = raw.filter(|r| !r.is_empty()) else {
        return Ok(Vec::new());
    };
    raw.split('&')
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let decode = |s: &str| {
                percent_decode(s).ok_or_else(|| {
                    error(
                        StatusCode::BAD_REQUEST,
                        "metadata filter: bad percent escape",
                    )
                })
            };
            Ok((decode(k)?, decode(v)?))
        })
        .collect()
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let h = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(h, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// The caller's sandboxes in `states` matching `metadata`, newest first.
fn visible(
    e2b: &E2b,
    caller: &Caller,
    states: &[&str],
    metadata: &[(String, String)],
) -> Vec<(Sandbox, &'static str)> {
    let mut out: Vec<(Sandbox, &'static str)> = e2b
        .registry
        .all()
        .into_iter()
        .filter(|s| caller.can_access(&s.owner))
        .filter(|s| metadata.iter().all(|(k, v)| s.metadata.get(k) == Some(v)))
        .filter_map(|s| {
            let state = e2b.state_of(&s)?;
            states.contains(&state).then_some((s, state))
        })
        .collect();
    out.sort_by(|a, b| {
        b.0.started_at
            .partial_cmp(&a.0.started_at)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then_with(|| a.0.id.cmp(&b.0.id))
    });
    out
}

async fn list_v1(
    State(e2b): State<Arc<E2b>>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Response {
    let caller = match e2b.caller(&headers) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let metadata = match metadata_filter(q.metadata.as_deref()) {
        Ok(m) => m,
        Err(r) => return r,
    };
    let items: Vec<Value> = visible(&e2b, &caller, &["running"], &metadata)
        .iter()
        .map(|(s, state)| e2b.listed(s, state))
        .collect();
    reply(StatusCode::OK, json!(items))
}

async fn list_v2(
    State(e2b): State<Arc<E2b>>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Response {
    let caller = match e2b.caller(&headers) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let metadata = match metadata_filter(q.metadata.as_deref()) {
        Ok(m) => m,
        Err(r) => return r,
    };
    let states: Vec<&str> = match q.state.as_deref().filter(|s| !s.is_empty()) {
        None => vec!["running", "paused"],
        Some(s) => {
            let mut v = Vec::new();
            for part in s.split(',') {
                match part.trim() {
                    "running" => v.push("running"),
                    "paused" => v.push("paused"),
                    other => {
                        return error(
                            StatusCode::BAD_REQUEST,
                            &format!("state {other:?}: use running or paused"),
                        )
                    }
                }
            }
            v
        }
    };
    let limit = q.limit.unwrap_or(MAX_PAGE).clamp(1, MAX_PAGE);
    let mut all = visible(&e2b, &caller, &states, &metadata);
    match q.order.as_deref().map(str::to_ascii_lowercase).as_deref() {
        None | Some("") | Some("desc") => {}
        Some("asc") => all.reverse(),
        Some(other) => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("order {other:?}: use asc or desc"),
            )
        }
    }
    let start = match q.next_token.as_deref().filter(|t| !t.is_empty()) {
        None => 0,
        Some(token) => match all.iter().position(|(s, _)| s.id == token) {
            Some(i) => i,
            None => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "nextToken is not from this listing (start again without it)",
                )
            }
        },
    };
    let page: Vec<Value> = all
        .iter()
        .skip(start)
        .take(limit)
        .map(|(s, state)| e2b.listed(s, state))
        .collect();
    let mut response = reply(StatusCode::OK, json!(page));
    if let Some((next, _)) = all.get(start + limit) {
        if let Ok(v) = HeaderValue::from_str(&next.id) {
            response.headers_mut().insert("x-next-token", v);
        }
    }
    response
}

async fn detail(
    State(e2b): State<Arc<E2b>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let (_, sandbox) = match e2b.caller_and_sandbox(&headers, &id) {
        Ok(found) => found,
        Err(r) => return r,
    };
    let Some(state) = e2b.state_of(&sandbox) else {
        return error(StatusCode::NOT_FOUND, &format!("sandbox {id} not found"));
    };
    let mut v = e2b.listed(&sandbox, state);
    v["envdAccessToken"] = json!(sandbox.access_token);
    v["domain"] = json!(e2b.domain);
    reply(StatusCode::OK, v)
}

async fn kill(State(e2b): State<Arc<E2b>>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let (caller, sandbox) = match e2b.caller_and_sandbox(&headers, &id) {
        Ok(found) => found,
        Err(r) => return r,
    };
    let params = MicrovmParams {
        microvm_identifier: sandbox.microvm_id.clone(),
    };
    match e2b
        .microvms
        .handle(&caller, Request::TerminateMicrovm { params })
        .await
    {
        Ok(_) => {
            e2b.registry.remove(&id);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) if e.status() == 404 => {
            e2b.registry.remove(&id);
            error(StatusCode::NOT_FOUND, &format!("sandbox {id} not found"))
        }
        Err(e) => api_error(e),
    }
}

async fn set_timeout(
    State(e2b): State<Arc<E2b>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    if let Err(r) = e2b.caller_and_sandbox(&headers, &id) {
        return r;
    }
    let timeout = match parse_body(&body).and_then(|b| {
        if b.get("timeout").is_none() {
            return Err(error(StatusCode::BAD_REQUEST, "timeout is required"));
        }
        timeout_of(&b, 0)
    }) {
        Ok(t) => t,
        Err(r) => return r,
    };
    e2b.registry
        .update(&id, |s| s.end_at = crate::now() + timeout as f64);
    StatusCode::NO_CONTENT.into_response()
}

async fn refresh(
    State(e2b): State<Arc<E2b>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    if let Err(r) = e2b.caller_and_sandbox(&headers, &id) {
        return r;
    }
    let duration = match parse_body(&body) {
        Ok(b) => b
            .get("duration")
            .and_then(Value::as_u64)
            .unwrap_or(DEFAULT_TIMEOUT)
            .min(MAX_TIMEOUT),
        Err(r) => return r,
    };
    let until = crate::now() + duration as f64;
    e2b.registry.update(&id, |s| s.end_at = s.end_at.max(until));
    StatusCode::NO_CONTENT.into_response()
}

async fn pause(
    State(e2b): State<Arc<E2b>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let (caller, sandbox) = match e2b.caller_and_sandbox(&headers, &id) {
        Ok(found) => found,
        Err(r) => return r,
    };
    match e2b.state_of(&sandbox) {
        None => return error(StatusCode::NOT_FOUND, &format!("sandbox {id} not found")),
        Some("paused") => {
            return error(
                StatusCode::CONFLICT,
                &format!("sandbox {id} is already paused"),
            )
        }
        Some(_) => {}
    }
    let params = MicrovmParams {
        microvm_identifier: sandbox.microvm_id.clone(),
    };
    match e2b
        .microvms
        .handle(&caller, Request::SuspendMicrovm { params })
        .await
    {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => api_error(e),
    }
}

/// Brings a sandbox to running: 200 when it ran, 201 when it was resumed; never shortens its
/// timeout.
async fn bring_up(
    e2b: &E2b,
    caller: &Caller,
    id: &str,
    body: &Bytes,
    resume_only: bool,
) -> Response {
    let sandbox = match e2b.owned(caller, id) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let timeout = match parse_body(body).and_then(|b| timeout_of(&b, DEFAULT_TIMEOUT)) {
        Ok(t) => t,
        Err(r) => return r,
    };
    let status = match e2b.state_of(&sandbox) {
        None => return error(StatusCode::NOT_FOUND, &format!("sandbox {id} not found")),
        Some("running") if resume_only => {
            return error(
                StatusCode::CONFLICT,
                &format!("sandbox {id} is already running"),
            )
        }
        Some("running") => StatusCode::OK,
        Some(_) => {
            let params = MicrovmParams {
                microvm_identifier: sandbox.microvm_id.clone(),
            };
            if let Err(e) = e2b
                .microvms
                .handle(caller, Request::ResumeMicrovm { params })
                .await
            {
                return api_error(e);
            }
            StatusCode::CREATED
        }
    };
    let until = crate::now() + timeout as f64;
    let sandbox = e2b
        .registry
        .update(id, |s| s.end_at = s.end_at.max(until))
        .unwrap_or(sandbox);
    reply(status, e2b.created(&sandbox))
}

async fn connect(
    State(e2b): State<Arc<E2b>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    match e2b.caller(&headers) {
        Ok(caller) => bring_up(&e2b, &caller, &id, &body, false).await,
        Err(r) => r,
    }
}

async fn resume(
    State(e2b): State<Arc<E2b>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    match e2b.caller(&headers) {
        Ok(caller) => bring_up(&e2b, &caller, &id, &body, true).await,
        Err(r) => r,
    }
}

/// What `kiln e2b env` needs to know (nothing secret): the endpoint's domain and port.
async fn kiln_config(State(e2b): State<Arc<E2b>>) -> Response {
    let (domain, port) = match e2b.domain.rsplit_once(':') {
        Some((d, p)) => (d.to_string(), p.parse::<u16>().unwrap_or(443)),
        None => (e2b.domain.clone(), 443),
    };
    reply(
        StatusCode::OK,
        json!({"domain": domain, "endpointPort": port}),
    )
}

/// One sample of a running sandbox's resources, read by envd in the guest.
async fn sample(e2b: &E2b, sandbox: &Sandbox) -> Option<Value> {
    if e2b.state_of(sandbox) != Some("running") {
        return None;
    }
    let (status, body) = envd_call(
        &e2b.microvms,
        &sandbox.microvm_id,
        "GET",
        "/metrics",
        Some(&sandbox.access_token),
        None,
    )
    .await
    .ok()?;
    if status != 200 {
        return None;
    }
    let m: Value = serde_json::from_slice(&body).ok()?;
    Some(json!({
        "timestamp": rfc3339(crate::now()),
        "timestampUnix": crate::now() as i64,
        "cpuCount": m["cpu_count"],
        "cpuUsedPct": m["cpu_used_pct"],
        "memUsed": m["mem_used"],
        "memTotal": m["mem_total"],
        "memCache": m["mem_cache"],
        "diskUsed": m["disk_used"],
        "diskTotal": m["disk_total"],
    }))
}

async fn metrics_one(
    State(e2b): State<Arc<E2b>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let (_, sandbox) = match e2b.caller_and_sandbox(&headers, &id) {
        Ok(found) => found,
        Err(r) => return r,
    };
    let samples: Vec<Value> = sample(&e2b, &sandbox).await.into_iter().collect();
    reply(StatusCode::OK, json!(samples))
}

#[derive(serde::Deserialize)]
struct ManyQuery {
    sandbox_ids: Option<String>,
}

async fn metrics_many(
    State(e2b): State<Arc<E2b>>,
    headers: HeaderMap,
    Query(q): Query<ManyQuery>,
) -> Response {
    let caller = match e2b.caller(&headers) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let mut out = serde_json::Map::new();
    for id in q
        .sandbox_ids
        .as_deref()
        .unwrap_or("")
        .split(',')
        .filter(|s| !s.is_empty())
        .take(MAX_PAGE)
    {
        if let Ok(sandbox) = e2b.owned(&caller, id) {
            if let Some(m) = sample(&e2b, &sandbox).await {
                out.insert(id.to_string(), m);
            }
        }
    }
    reply(StatusCode::OK, json!({ "sandboxes": out }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_with_millis() {
        assert_eq!(rfc3339(0.0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_700_000_000.25), "2023-11-14T22:13:20.250Z");
    }

    #[test]
    fn metadata_filters_decode() {
        let f = metadata_filter(Some("user%3Did=a+b&x=1")).ok().unwrap();
        assert_eq!(
            f,
            vec![("user=id".into(), "a b".into()), ("x".into(), "1".into())]
        );
    }
}

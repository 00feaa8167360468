//! kiln's sandbox API: commands, files and app logs of a running MicroVM, under
//! `/kiln/v1/microvms/{id}/…`, through the guest agent (no guest port is opened for it).
//!
//! - `POST exec` runs a command: `{"argv": […]}` or `{"command": "shell text"}`, with `env`,
//!   `cwd`, `user`, `stdin` (base64, at most 1 MiB), `timeoutSeconds`. The answer streams
//!   newline-delimited JSON events: `started`, `stdout`/`stderr` (base64 `data`), then `exit`
//!   (`exitCode`, `signal`, `timedOut`) or `error`. A client that hangs up kills the command.
//!   With `"background": true` the answer is `{"execId", "pid"}` at once; `GET execs`,
//!   `GET execs/{execId}?wait=S` (status and the last 1 MiB of each stream), `POST
//!   execs/{execId}/kill` follow it.
//! - `files?path=` GET downloads, PUT uploads (streamed both ways in 1 MiB pieces; an upload
//!   lands under a temporary name and is renamed into place only once its SHA-256 matches the
//!   signed one), DELETE removes (recursively); `files/stat`, `files/list`, `POST files/mkdir`,
//!   `POST files/move`.
//! - `logs[?follow=true]` streams the app's stdout and stderr as captured since launch.
//!
//! Every route answers ResourceNotFound for a MicroVM the caller does not own, before anything
//! else. Commands and files need the SHELL_INGRESS connector (the same rule as the shell: the
//! owner asked for a way into the guest); logs need only ownership. A suspended MicroVM with
//! `autoResumeEnabled` is resumed (as the endpoint does); one without answers Conflict.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use futures_util::StreamExt;
use kiln_agent::{
    AgentClient, AgentError, ExecEvent, ExecRequest, FileKind, FileStat, FsErrorKind,
};
use kiln_api::shapes::{Logging, RunMicrovmRequest};
use kiln_api::ApiError;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::api::{error_response, Api, Signed};
use crate::auth::keys::Caller;
use crate::supervisor::UpstreamError;

/// Largest stdin an exec request carries.
pub const MAX_STDIN: usize = 1 << 20;
/// How much of each stream a background command keeps (its last bytes).
pub const MAX_BACKGROUND_OUTPUT: usize = 1 << 20;
/// Background commands one MicroVM keeps (running and finished); the oldest finished go first.
pub const MAX_BACKGROUND_PER_VM: usize = 16;
/// Longest `wait` on a background command.
const MAX_WAIT: Duration = Duration::from_secs(300);
/// Size of one piece of a file moving through the agent.
const PIECE: usize = kiln_agent::client::MAX_RANGE_BYTES;
/// How often a followed log is checked for more.
const FOLLOW_EVERY: Duration = Duration::from_millis(250);

/// Whether a RunMicrovm request turned the app log off (`logging: {"disabled": {}}`).
pub fn logging_disabled(req: &RunMicrovmRequest) -> bool {
    matches!(req.logging, Some(Logging::Disabled(_)))
}

/// The background commands of every MicroVM.
#[derive(Default)]
pub struct Sandbox {
    background: StdMutex<HashMap<String, VecDeque<Arc<Background>>>>,
}

/// The routes, merged into the API router.
pub fn routes() -> Router<Api> {
    Router::new()
        .route("/kiln/v1/microvms/{id}/exec", post(exec))
        .route("/kiln/v1/microvms/{id}/execs", get(list_background))
        .route("/kiln/v1/microvms/{id}/execs/{exec}", get(get_background))
        .route(
            "/kiln/v1/microvms/{id}/execs/{exec}/kill",
            post(kill_background),
        )
        .route(
            "/kiln/v1/microvms/{id}/files",
            get(download).put(upload).delete(remove),
        )
        .route("/kiln/v1/microvms/{id}/files/stat", get(stat))
        .route("/kiln/v1/microvms/{id}/files/list", get(list))
        .route("/kiln/v1/microvms/{id}/files/mkdir", post(mkdir))
        .route("/kiln/v1/microvms/{id}/files/move", post(move_path))
        .route("/kiln/v1/microvms/{id}/logs", get(logs))
}

/// Access to one MicroVM for `caller`: ResourceNotFound unless they own it (checked first, so
/// nothing else is told to anyone else), then the connector rule, then a reachable agent.
async fn guest(api: &Api, caller: &Caller, id: &str) -> Result<(String, AgentClient), ApiError> {
    let id = kiln_api::arn::microvm_identifier(id)?;
    let row = api.microvms.owned_row(caller, &id)?;
    if !api.microvms.plan_of_row(&row).ingress.shell {
        return Err(ApiError::access_denied(format!(
            "MicroVM {id} was not run with the SHELL_INGRESS network connector, which commands \
             and files need (as shells do); run one with --ingress-network-connectors SHELL_INGRESS"
        )));
    }
    let agent = api.microvms.agent(&id).await.map_err(|e| match e {
        UpstreamError::Unknown => ApiError::not_found("Microvm", &id),
        UpstreamError::NotRunning(state) => ApiError::conflict(
            "Microvm",
            &id,
            format!(
                "MicroVM {id} is {state}: commands and files need it RUNNING (resume it with \
                 ResumeMicrovm; with autoResumeEnabled kiln resumes it itself)"
            ),
        ),
        UpstreamError::Unavailable(m) => {
            ApiError::internal(format!("MicroVM {id} cannot be reached: {m}"))
        }
    })?;
    api.microvms.activity.entry(&id).request();
    Ok((id, agent))
}

/// An agent failure as the API error a client can act on.
fn agent_error(what: &str, path: &str, e: AgentError) -> ApiError {
    match e {
        AgentError::Fs { kind, message } => match kind {
            FsErrorKind::NotFound => ApiError::not_found_saying("File", path, message),
            FsErrorKind::AlreadyExists => ApiError::conflict("File", path, message),
            FsErrorKind::WrongKind | FsErrorKind::Invalid => ApiError::validation(message),
            FsErrorKind::PermissionDenied => ApiError::access_denied(message),
            FsErrorKind::Other => ApiError::internal(message),
        },
        AgentError::Guest(message) => ApiError::validation(format!("{what}: {message}")),
        other => ApiError::internal(format!("{what}: {other}")),
    }
}

fn json_response(status: StatusCode, body: Value) -> Response {
    let mut resp = (status, body.to_string()).into_response();
    resp.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    resp
}

fn stat_json(stat: &FileStat, path: Option<&str>) -> Value {
    let kind = match stat.kind {
        FileKind::File => "file",
        FileKind::Dir => "dir",
        FileKind::Symlink => "symlink",
        FileKind::Other => "other",
    };
    let mut v = json!({
        "name": stat.name,
        "type": kind,
        "size": stat.size,
        "mode": format!("{:04o}", stat.mode),
        "uid": stat.uid,
        "gid": stat.gid,
        "mtime": stat.mtime,
    });
    if let Some(target) = &stat.link_target {
        v["linkTarget"] = json!(target);
    }
    if let Some(path) = path {
        v["path"] = json!(path);
    }
    v
}

fn absolute(path: Option<String>, name: &str) -> Result<String, ApiError> {
    match path {
        Some(p) if p.starts_with('/') && !p.contains('\0') && p.len() <= 4096 => Ok(p),
        Some(p) => Err(ApiError::validation(format!(
            "{name} {p:?} must be an absolute path in the guest (start it with /), at most 4096 bytes"
        ))),
        None => Err(ApiError::validation(format!(
            "the query needs {name}=/absolute/path/in/the/guest"
        ))),
    }
}

fn parse_mode(mode: Option<&str>, default: u32) -> Result<u32, ApiError> {
    match mode {
        None => Ok(default),
        Some(m) => u32::from_str_radix(m, 8)
            .ok()
            .filter(|m| *m <= 0o7777)
            .ok_or_else(|| {
                ApiError::validation(format!(
                    "mode {m:?} must be octal permission bits, e.g. 0644"
                ))
            }),
    }
}

// ---- exec ----

/// Body of `POST exec`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ExecBody {
    #[serde(default)]
    argv: Option<Vec<String>>,
    #[serde(default)]
    command: Option<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    cwd: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    stdin: Option<String>,
    #[serde(default)]
    timeout_seconds: Option<f64>,
    #[serde(default)]
    background: bool,
}

/// The agent request for `body`, after resolving its user in the guest.
async fn exec_request(
    agent: &AgentClient,
    body: ExecBody,
) -> Result<(ExecRequest, Vec<String>), ApiError> {
    let argv =
        match (body.argv, body.command) {
            (Some(argv), None) if !argv.is_empty() => argv,
            (None, Some(command)) if !command.is_empty() => {
                vec!["/bin/sh".to_string(), "-c".to_string(), command]
            }
            _ => return Err(ApiError::validation(
                "exec needs exactly one of \"argv\" (a non-empty list) or \"command\" (shell text)",
            )),
        };
    if argv.iter().any(|a| a.contains('\0')) {
        return Err(ApiError::validation("argv entries cannot hold NUL bytes"));
    }
    let (uid, gid, home) = match &body.user {
        Some(user) => {
            let u = agent
                .lookup_user(user)
                .await
                .map_err(|e| agent_error(&format!("user {user:?}"), user, e))?;
            (u.uid, u.gid, u.home)
        }
        None => (0, 0, "/root".to_string()),
    };
    let mut request = ExecRequest::new(argv.clone())
        .cwd(body.cwd.as_deref().unwrap_or("/"))
        .user(uid, gid);
    if !body.env.contains_key("HOME") {
        request = request.env("HOME", &home);
    }
    for (key, value) in &body.env {
        if key.is_empty() || key.contains('=') || key.contains('\0') || value.contains('\0') {
            return Err(ApiError::validation(format!(
                "environment variable {key:?}: names are non-empty without '='; no NUL bytes"
            )));
        }
        request = request.env(key, value);
    }
    if let Some(stdin) = &body.stdin {
        let data = B64
            .decode(stdin.as_bytes())
            .map_err(|_| ApiError::validation("stdin must be base64 (standard alphabet)"))?;
        if data.len() > MAX_STDIN {
            return Err(ApiError::validation(format!(
                "stdin of {} bytes is larger than {MAX_STDIN}; upload it as a file and redirect it",
                data.len()
            )));
        }
        request = request.stdin(data);
    }
    if let Some(seconds) = body.timeout_seconds {
        if !(seconds > 0.0 && seconds <= 86_400.0) {
            return Err(ApiError::validation(
                "timeoutSeconds must be more than 0 and at most 86400",
            ));
        }
        request = request.timeout(Duration::from_secs_f64(seconds));
    }
    Ok((request, argv))
}

/// One event line of a streamed exec.
fn event_line(event: &ExecEvent) -> Bytes {
    let v = match event {
        ExecEvent::Started { pid } => json!({"type": "started", "pid": pid}),
        ExecEvent::Stdout(data) => json!({"type": "stdout", "data": B64.encode(data)}),
        ExecEvent::Stderr(data) => json!({"type": "stderr", "data": B64.encode(data)}),
        ExecEvent::Exited(status) => json!({
            "type": "exit",
            "exitCode": status.code,
            "signal": status.signal,
            "timedOut": status.timed_out,
        }),
    };
    Bytes::from(format!("{v}\n"))
}

/// Kills a foreground command whose client went away before it ended.
struct KillOnDrop {
    agent: AgentClient,
    exec_id: u64,
    finished: bool,
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if !self.finished {
            let (agent, id) = (self.agent.clone(), self.exec_id);
            tokio::spawn(async move {
                let _ = agent.signal(id, libc_sigkill()).await;
            });
        }
    }
}

fn libc_sigkill() -> i32 {
    nix::sys::signal::Signal::SIGKILL as i32
}

/// `POST /kiln/v1/microvms/{id}/exec`.
async fn exec(State(api): State<Api>, UrlPath(id): UrlPath<String>, signed: Signed) -> Response {
    let started = async {
        let body: ExecBody = serde_json::from_slice(&signed.body).map_err(|e| {
            ApiError::validation(format!(
                "exec request: {e} (expected {{\"argv\": [\"ls\", \"-l\"]}} or {{\"command\": \"ls -l | wc\"}})"
            ))
        })?;
        let background = body.background;
        let (id, agent) = guest(&api, &signed.caller, &id).await?;
        let (request, argv) = exec_request(&agent, body).await?;
        let mut stream = agent
            .exec(request)
            .await
            .map_err(|e| agent_error("exec", &id, e))?;
        let pid = match stream.next_event().await {
            Ok(Some(ExecEvent::Started { pid })) => pid,
            Ok(other) => {
                return Err(ApiError::internal(format!(
                    "the guest did not start the command ({other:?})"
                )))
            }
            Err(e) => return Err(agent_error("exec", &argv[0], e)),
        };
        Ok((id, agent, stream, pid, argv, background))
    }
    .await;
    api.audit
        .call(&signed.caller, "ExecMicrovmCommand", Some(&id), &started);
    let (id, agent, stream, pid, argv, background) = match started {
        Ok(s) => s,
        Err(e) => return error_response(&e),
    };
    if background {
        return match api.sandbox.adopt(&id, agent, stream, pid, argv) {
            Ok(handle) => json_response(
                StatusCode::CREATED,
                json!({"microvmId": id, "execId": handle, "pid": pid}),
            ),
            Err(e) => error_response(&e),
        };
    }
    let activity = api.microvms.activity.entry(&id);
    let guard = KillOnDrop {
        agent,
        exec_id: stream.id(),
        finished: false,
    };
    let first = futures_util::stream::once(async move {
        Ok::<_, std::convert::Infallible>(event_line(&ExecEvent::Started { pid }))
    });
    let rest = futures_util::stream::unfold(Some((stream, guard, activity)), |state| async move {
        let (mut stream, mut guard, activity) = state?;
        match stream.next_event().await {
            Ok(Some(event)) => {
                activity.inbound(0);
                if matches!(event, ExecEvent::Exited(_)) {
                    guard.finished = true;
                    return Some((Ok(event_line(&event)), None));
                }
                Some((Ok(event_line(&event)), Some((stream, guard, activity))))
            }
            Ok(None) => None,
            Err(e) => {
                let line = json!({"type": "error", "message": e.to_string()});
                Some((Ok(Bytes::from(format!("{line}\n"))), None))
            }
        }
    });
    let mut resp = Response::new(Body::from_stream(first.chain(rest)));
    resp.headers_mut().insert(
        "content-type",
        HeaderValue::from_static("application/x-ndjson"),
    );
    resp
}

/// The last bytes of one stream of a background command.
#[derive(Default)]
struct Tail {
    data: VecDeque<u8>,
    dropped: u64,
}

impl Tail {
    fn push(&mut self, bytes: &[u8]) {
        self.data.extend(bytes);
        let over = self.data.len().saturating_sub(MAX_BACKGROUND_OUTPUT);
        if over > 0 {
            self.data.drain(..over);
            self.dropped += over as u64;
        }
    }
}

#[derive(Default)]
struct BackgroundState {
    stdout: Tail,
    stderr: Tail,
    exit: Option<Value>,
}

/// A command started with `"background": true`, followed by a task of its own.
struct Background {
    handle: String,
    exec_id: u64,
    pid: u32,
    argv: Vec<String>,
    started_at: f64,
    agent: AgentClient,
    state: StdMutex<BackgroundState>,
    done: tokio::sync::watch::Sender<bool>,
}

impl Background {
    fn lock(&self) -> std::sync::MutexGuard<'_, BackgroundState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn running(&self) -> bool {
        self.lock().exit.is_none()
    }

    fn describe(&self, with_output: bool) -> Value {
        let s = self.lock();
        let mut v = json!({
            "execId": self.handle,
            "pid": self.pid,
            "argv": self.argv,
            "startedAt": self.started_at,
            "running": s.exit.is_none(),
            "exit": s.exit,
        });
        if with_output {
            let (out, err) = (
                s.stdout.data.iter().copied().collect::<Vec<u8>>(),
                s.stderr.data.iter().copied().collect::<Vec<u8>>(),
            );
            v["stdout"] = json!(B64.encode(out));
            v["stderr"] = json!(B64.encode(err));
            v["stdoutDroppedBytes"] = json!(s.stdout.dropped);
            v["stderrDroppedBytes"] = json!(s.stderr.dropped);
        }
        v
    }
}

impl Sandbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, VecDeque<Arc<Background>>>> {
        self.background.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes over a started command: a task collects its output; returns its handle.
    fn adopt(
        &self,
        id: &str,
        agent: AgentClient,
        mut stream: kiln_agent::ExecStream,
        pid: u32,
        argv: Vec<String>,
    ) -> Result<String, ApiError> {
        let mut raw = [0u8; 8];
        getrandom::fill(&mut raw).map_err(|e| ApiError::internal(format!("no randomness: {e}")))?;
        let handle = format!("x{}", crate::auth::sigv4::hex(&raw));
        let (done, _) = tokio::sync::watch::channel(false);
        let bg = Arc::new(Background {
            handle: handle.clone(),
            exec_id: stream.id(),
            pid,
            argv,
            started_at: crate::now(),
            agent: agent.clone(),
            state: StdMutex::default(),
            done,
        });
        {
            let mut all = self.lock();
            let list = all.entry(id.to_string()).or_default();
            if list.len() >= MAX_BACKGROUND_PER_VM {
                match list.iter().position(|b| !b.running()) {
                    Some(i) => {
                        list.remove(i);
                    }
                    None => {
                        let exec_id = stream.id();
                        tokio::spawn(async move {
                            let _ = agent.signal(exec_id, libc_sigkill()).await;
                        });
                        return Err(ApiError::conflict(
                            "Microvm",
                            id,
                            format!(
                                "{MAX_BACKGROUND_PER_VM} background commands already run in \
                                 MicroVM {id}; kill one or wait for one to end"
                            ),
                        ));
                    }
                }
            }
            list.push_back(bg.clone());
        }
        tokio::spawn(async move {
            loop {
                match stream.next_event().await {
                    Ok(Some(ExecEvent::Stdout(d))) => bg.lock().stdout.push(&d),
                    Ok(Some(ExecEvent::Stderr(d))) => bg.lock().stderr.push(&d),
                    Ok(Some(ExecEvent::Started { .. })) => {}
                    Ok(Some(ExecEvent::Exited(status))) => {
                        bg.lock().exit = Some(json!({
                            "exitCode": status.code,
                            "signal": status.signal,
                            "timedOut": status.timed_out,
                        }));
                        break;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        bg.lock().exit = Some(json!({
                            "error": format!("the command can no longer be followed: {e} \
                                              (a suspend or a kilnd restart ends the link; the \
                                              process may still run in the guest)"),
                        }));
                        break;
                    }
                }
            }
            if bg.lock().exit.is_none() {
                bg.lock().exit =
                    Some(json!({"error": "the command's events ended without an exit"}));
            }
            bg.done.send_replace(true);
        });
        Ok(handle)
    }

    fn find(&self, id: &str, handle: &str) -> Option<Arc<Background>> {
        self.lock()
            .get(id)?
            .iter()
            .find(|b| b.handle == handle)
            .cloned()
    }

    /// Forgets the background commands of a MicroVM that no longer exists.
    fn prune(&self, gone: impl Fn(&str) -> bool) {
        self.lock().retain(|id, _| !gone(id));
    }
}

/// `GET /kiln/v1/microvms/{id}/execs`.
async fn list_background(
    State(api): State<Api>,
    UrlPath(id): UrlPath<String>,
    signed: Signed,
) -> Response {
    let result = (|| {
        let id = kiln_api::arn::microvm_identifier(&id)?;
        api.microvms.owned_row(&signed.caller, &id)?;
        api.sandbox.prune(|vm| {
            !matches!(api.microvms.store_row_state(vm).as_deref(), Some(s) if s != "TERMINATED")
        });
        let list: Vec<Value> = api
            .sandbox
            .lock()
            .get(&id)
            .map(|l| l.iter().map(|b| b.describe(false)).collect())
            .unwrap_or_default();
        Ok(json!({"microvmId": id, "execs": list}))
    })();
    match result {
        Ok(v) => json_response(StatusCode::OK, v),
        Err(e) => error_response(&e),
    }
}

#[derive(Deserialize)]
struct WaitQuery {
    wait: Option<f64>,
}

/// `GET /kiln/v1/microvms/{id}/execs/{exec}[?wait=SECONDS]`.
async fn get_background(
    State(api): State<Api>,
    UrlPath((id, handle)): UrlPath<(String, String)>,
    Query(q): Query<WaitQuery>,
    signed: Signed,
) -> Response {
    let found = (|| {
        let id = kiln_api::arn::microvm_identifier(&id)?;
        api.microvms.owned_row(&signed.caller, &id)?;
        api.sandbox
            .find(&id, &handle)
            .ok_or_else(|| ApiError::not_found("Exec", &handle))
    })();
    let bg = match found {
        Ok(bg) => bg,
        Err(e) => return error_response(&e),
    };
    if let Some(wait) = q.wait.filter(|w| *w > 0.0) {
        let limit = Duration::from_secs_f64(wait.min(MAX_WAIT.as_secs_f64()));
        let mut done = bg.done.subscribe();
        let _ = tokio::time::timeout(limit, done.wait_for(|d| *d)).await;
    }
    json_response(StatusCode::OK, bg.describe(true))
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct KillBody {
    #[serde(default)]
    signal: Option<i32>,
}

/// `POST /kiln/v1/microvms/{id}/execs/{exec}/kill` with `{"signal": N}` (SIGKILL when absent).
async fn kill_background(
    State(api): State<Api>,
    UrlPath((id, handle)): UrlPath<(String, String)>,
    signed: Signed,
) -> Response {
    let result = async {
        let id = kiln_api::arn::microvm_identifier(&id)?;
        api.microvms.owned_row(&signed.caller, &id)?;
        let bg = api
            .sandbox
            .find(&id, &handle)
            .ok_or_else(|| ApiError::not_found("Exec", &handle))?;
        let body: KillBody = if signed.body.is_empty() {
            KillBody::default()
        } else {
            serde_json::from_slice(&signed.body).map_err(|e| {
                ApiError::validation(format!("kill request: {e} (expected {{\"signal\": 15}})"))
            })?
        };
        if !bg.running() {
            return Ok(bg.describe(false));
        }
        bg.agent
            .signal(bg.exec_id, body.signal.unwrap_or_else(libc_sigkill))
            .await
            .map_err(|e| agent_error("kill", &handle, e))?;
        Ok(bg.describe(false))
    }
    .await;
    api.audit.call(
        &signed.caller,
        "KillMicrovmCommand",
        Some(&format!("{id} {handle}")),
        &result,
    );
    match result {
        Ok(v) => json_response(StatusCode::OK, v),
        Err(e) => error_response(&e),
    }
}

// ---- files ----

#[derive(Deserialize)]
struct PathQuery {
    path: Option<String>,
    mode: Option<String>,
    max: Option<u32>,
}

/// `GET /kiln/v1/microvms/{id}/files?path=`: the file's bytes, streamed piece by piece.
async fn download(
    State(api): State<Api>,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<PathQuery>,
    signed: Signed,
) -> Response {
    let opened = async {
        let path = absolute(q.path, "path")?;
        let (id, agent) = guest(&api, &signed.caller, &id).await?;
        let first = agent
            .read_range(&path, 0, PIECE as u32)
            .await
            .map_err(|e| agent_error("download", &path, e))?;
        Ok((id, agent, path, first))
    }
    .await;
    let target = opened
        .as_ref()
        .map(|(id, _, path, _)| format!("{id} {path}"))
        .unwrap_or_else(|_| id.clone());
    api.audit
        .call(&signed.caller, "GetMicrovmFile", Some(&target), &opened);
    let (_id, agent, path, (data, eof)) = match opened {
        Ok(o) => o,
        Err(e) => return error_response(&e),
    };
    let offset = data.len() as u64;
    let first =
        futures_util::stream::once(async move { Ok::<Bytes, std::io::Error>(Bytes::from(data)) });
    // One piece in flight at a time: the client's reading paces the guest's.
    let rest = futures_util::stream::unfold(
        (!eof).then_some((agent, path, offset)),
        |state| async move {
            let (agent, path, offset) = state?;
            match agent.read_range(&path, offset, PIECE as u32).await {
                Ok((data, eof)) => {
                    let next = offset + data.len() as u64;
                    let more = (!eof && !data.is_empty()).then_some((agent, path, next));
                    Some((Ok(Bytes::from(data)), more))
                }
                // Cut the response: the client sees a broken transfer, never a short file.
                Err(e) => Some((Err(std::io::Error::other(e.to_string())), None)),
            }
        },
    );
    let mut resp = Response::new(Body::from_stream(first.chain(rest)));
    resp.headers_mut().insert(
        "content-type",
        HeaderValue::from_static("application/octet-stream"),
    );
    resp
}

/// `PUT /kiln/v1/microvms/{id}/files?path=&mode=`: the body, streamed into the guest. It lands
/// under a temporary name next to `path` and is renamed into place once the body's SHA-256
/// matched the signed one; anything else removes it.
async fn upload(
    State(api): State<Api>,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<PathQuery>,
    req: axum::extract::Request,
) -> Response {
    let (parts, body) = req.into_parts();
    let signed = crate::auth::sigv4::SignedRequest {
        method: parts.method.as_str(),
        path: parts.uri.path(),
        query: parts.uri.query(),
        headers: &parts.headers,
        body: &[],
    };
    let (caller, claimed) = match api.keys.authenticate_streamed(&signed) {
        Ok(c) => c,
        Err(e) => return error_response(&e),
    };
    let mut body = Some(body);
    let result = async {
        let path = absolute(q.path, "path")?;
        let mode = parse_mode(q.mode.as_deref(), 0o644)?;
        let (id, agent) = guest(&api, &caller, &id).await?;
        let (dir, name) = path
            .rsplit_once('/')
            .filter(|(_, name)| !name.is_empty())
            .ok_or_else(|| ApiError::validation(format!("path {path:?} names no file")))?;
        let mut raw = [0u8; 6];
        getrandom::fill(&mut raw).map_err(|e| ApiError::internal(format!("no randomness: {e}")))?;
        let temp = format!(
            "{dir}/.{name}.kiln-upload-{}",
            crate::auth::sigv4::hex(&raw)
        );
        let body = body.take().unwrap_or_default();
        let written = stream_into(&agent, &temp, mode, body, &claimed).await;
        let moved = match written {
            Ok(_bytes) => agent
                .move_path(&temp, &path)
                .await
                .map_err(|e| agent_error("upload", &path, e)),
            Err(e) => Err(e),
        };
        if moved.is_err() {
            let _ = agent.remove_tree(&temp).await;
        }
        moved?;
        let stat = agent
            .stat(&path)
            .await
            .map_err(|e| agent_error("upload", &path, e))?;
        Ok((id, path, stat))
    }
    .await;
    if let Some(unread) = body {
        drain(unread).await;
    }
    let target = result
        .as_ref()
        .map(|(id, path, _)| format!("{id} {path}"))
        .unwrap_or_else(|_| id.clone());
    api.audit
        .call(&caller, "PutMicrovmFile", Some(&target), &result);
    match result {
        Ok((_, path, stat)) => json_response(StatusCode::CREATED, stat_json(&stat, Some(&path))),
        Err(e) => error_response(&e),
    }
}

/// Most of a refused upload's body read (and dropped) before the refusal is sent.
const DRAIN_LIMIT: usize = 16 << 20;

/// Reads and drops what is left of a refused upload (at most [`DRAIN_LIMIT`] bytes, for at
/// most five seconds), so its client reads the refusal instead of a broken pipe.
async fn drain(body: Body) {
    let mut data = body.into_data_stream();
    let mut seen = 0usize;
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(chunk)) = data.next().await {
            seen += chunk.len();
            if seen > DRAIN_LIMIT {
                break;
            }
        }
    })
    .await;
}

/// Writes `body` to `temp` in the guest in pieces, hashing as it goes; fails unless the hash is
/// `claimed`. Holds at most one piece (plus one network read) in memory.
async fn stream_into(
    agent: &AgentClient,
    temp: &str,
    mode: u32,
    body: Body,
    claimed: &str,
) -> Result<u64, ApiError> {
    let mut hasher = ring::digest::Context::new(&ring::digest::SHA256);
    let mut piece: Vec<u8> = Vec::with_capacity(PIECE);
    let mut offset = 0u64;
    let mut data = body.into_data_stream();
    // The file exists (empty) even when the body is.
    agent
        .write_range(temp, 0, Vec::new(), true, mode, None)
        .await
        .map_err(|e| agent_error("upload", temp, e))?;
    loop {
        let next = data.next().await;
        let chunk = match next {
            Some(Ok(chunk)) => Some(chunk),
            Some(Err(e)) => {
                return Err(ApiError::validation(format!(
                    "the upload's body broke off: {e}; nothing was kept"
                )))
            }
            None => None,
        };
        if let Some(chunk) = &chunk {
            hasher.update(chunk);
            let mut rest: &[u8] = chunk;
            while !rest.is_empty() {
                let take = (PIECE - piece.len()).min(rest.len());
                piece.extend_from_slice(&rest[..take]);
                rest = &rest[take..];
                if piece.len() == PIECE {
                    let full = std::mem::replace(&mut piece, Vec::with_capacity(PIECE));
                    let len = full.len() as u64;
                    agent
                        .write_range(temp, offset, full, false, mode, None)
                        .await
                        .map_err(|e| agent_error("upload", temp, e))?;
                    offset += len;
                }
            }
        } else {
            if !piece.is_empty() {
                let len = piece.len() as u64;
                agent
                    .write_range(temp, offset, std::mem::take(&mut piece), false, mode, None)
                    .await
                    .map_err(|e| agent_error("upload", temp, e))?;
                offset += len;
            }
            break;
        }
    }
    let got = crate::auth::sigv4::hex(hasher.finish().as_ref());
    if got != claimed {
        return Err(ApiError::validation(format!(
            "the body's SHA-256 ({got}) is not the signed x-amz-content-sha256 ({claimed}); \
             nothing was kept"
        )));
    }
    Ok(offset)
}

/// Runs one file operation for `caller` and answers it, audited as `operation`.
async fn file_op<F, Fut>(
    api: &Api,
    signed: &Signed,
    id: &str,
    operation: &str,
    audited: bool,
    work: F,
) -> Response
where
    F: FnOnce(String, AgentClient) -> Fut,
    Fut: std::future::Future<Output = Result<(String, Value), ApiError>>,
{
    let result = async {
        let (id, agent) = guest(api, &signed.caller, id).await?;
        work(id, agent).await
    }
    .await;
    if audited {
        let target = result
            .as_ref()
            .map(|(t, _)| t.clone())
            .unwrap_or_else(|_| id.to_string());
        api.audit
            .call(&signed.caller, operation, Some(&target), &result);
    }
    match result {
        Ok((_, v)) => json_response(StatusCode::OK, v),
        Err(e) => error_response(&e),
    }
}

/// `GET /kiln/v1/microvms/{id}/files/stat?path=`.
async fn stat(
    State(api): State<Api>,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<PathQuery>,
    signed: Signed,
) -> Response {
    file_op(
        &api,
        &signed,
        &id,
        "StatMicrovmFile",
        false,
        |id, agent| async move {
            let path = absolute(q.path, "path")?;
            let stat = agent
                .stat(&path)
                .await
                .map_err(|e| agent_error("stat", &path, e))?;
            Ok((format!("{id} {path}"), stat_json(&stat, Some(&path))))
        },
    )
    .await
}

/// `GET /kiln/v1/microvms/{id}/files/list?path=[&max=N]`.
async fn list(
    State(api): State<Api>,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<PathQuery>,
    signed: Signed,
) -> Response {
    file_op(
        &api,
        &signed,
        &id,
        "ListMicrovmFiles",
        false,
        |id, agent| async move {
            let path = absolute(q.path, "path")?;
            let max = q.max.unwrap_or(kiln_agent::client::MAX_DIR_ENTRIES);
            let (entries, truncated) = agent
                .list_dir(&path, max)
                .await
                .map_err(|e| agent_error("list", &path, e))?;
            let entries: Vec<Value> = entries.iter().map(|s| stat_json(s, None)).collect();
            Ok((
                format!("{id} {path}"),
                json!({"path": path, "entries": entries, "truncated": truncated}),
            ))
        },
    )
    .await
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct MkdirBody {
    path: String,
    #[serde(default)]
    parents: bool,
    #[serde(default)]
    mode: Option<String>,
}

/// `POST /kiln/v1/microvms/{id}/files/mkdir` with `{"path", "parents", "mode"}`.
async fn mkdir(State(api): State<Api>, UrlPath(id): UrlPath<String>, signed: Signed) -> Response {
    let body = serde_json::from_slice::<MkdirBody>(&signed.body).map_err(|e| {
        ApiError::validation(format!(
            "mkdir request: {e} (expected {{\"path\": \"/d\", \"parents\": true}})"
        ))
    });
    file_op(
        &api,
        &signed,
        &id,
        "MakeMicrovmDirectory",
        true,
        |id, agent| async move {
            let body = body?;
            let path = absolute(Some(body.path), "path")?;
            let mode = parse_mode(body.mode.as_deref(), 0o755)?;
            agent
                .make_dir(&path, body.parents, mode, None)
                .await
                .map_err(|e| agent_error("mkdir", &path, e))?;
            Ok((format!("{id} {path}"), json!({"path": path})))
        },
    )
    .await
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct MoveBody {
    from: String,
    to: String,
}

/// `POST /kiln/v1/microvms/{id}/files/move` with `{"from", "to"}`.
async fn move_path(
    State(api): State<Api>,
    UrlPath(id): UrlPath<String>,
    signed: Signed,
) -> Response {
    let body = serde_json::from_slice::<MoveBody>(&signed.body).map_err(|e| {
        ApiError::validation(format!(
            "move request: {e} (expected {{\"from\": \"/a\", \"to\": \"/b\"}})"
        ))
    });
    file_op(
        &api,
        &signed,
        &id,
        "MoveMicrovmFile",
        true,
        |id, agent| async move {
            let body = body?;
            let from = absolute(Some(body.from), "from")?;
            let to = absolute(Some(body.to), "to")?;
            agent
                .move_path(&from, &to)
                .await
                .map_err(|e| agent_error("move", &from, e))?;
            Ok((format!("{id} {from} {to}"), json!({"from": from, "to": to})))
        },
    )
    .await
}

/// `DELETE /kiln/v1/microvms/{id}/files?path=`: removes it, a directory with its contents.
async fn remove(
    State(api): State<Api>,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<PathQuery>,
    signed: Signed,
) -> Response {
    file_op(
        &api,
        &signed,
        &id,
        "RemoveMicrovmFile",
        true,
        |id, agent| async move {
            let path = absolute(q.path, "path")?;
            agent
                .remove_tree(&path)
                .await
                .map_err(|e| agent_error("remove", &path, e))?;
            Ok((format!("{id} {path}"), json!({"path": path})))
        },
    )
    .await
}

// ---- app logs ----

#[derive(Deserialize)]
struct LogsQuery {
    follow: Option<bool>,
}

/// The files holding a MicroVM's app log, oldest first: the running VM's (`app.log.1`,
/// `app.log`), else what a suspended session carried.
fn log_parts(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let vm = dir.join("vm");
    if vm.join("app.log").exists() {
        vec![vm.join("app.log.1"), vm.join("app.log")]
    } else {
        vec![dir.join("suspended").join("app.log")]
    }
}

/// Reads `file` from `offset`, at most 64 KiB; `None` at its end (or when it is missing).
async fn read_some(file: &std::path::Path, offset: u64) -> Option<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let mut f = tokio::fs::File::open(file).await.ok()?;
    f.seek(std::io::SeekFrom::Start(offset)).await.ok()?;
    let mut buf = vec![0u8; 64 * 1024];
    let n = f.read(&mut buf).await.ok()?;
    (n > 0).then(|| {
        buf.truncate(n);
        buf
    })
}

struct LogCursor {
    api: Api,
    id: String,
    dir: std::path::PathBuf,
    /// What is still to send of the log as it was at the start: file, offset.
    backlog: VecDeque<(std::path::PathBuf, u64)>,
    follow: bool,
    /// The live file followed and how far it was sent.
    live: u64,
}

impl LogCursor {
    async fn next(&mut self) -> Option<Bytes> {
        while let Some((file, offset)) = self.backlog.front_mut() {
            match read_some(file, *offset).await {
                Some(data) => {
                    *offset += data.len() as u64;
                    return Some(Bytes::from(data));
                }
                None => {
                    let (file, offset) = self.backlog.pop_front()?;
                    if file.ends_with("vm/app.log") {
                        self.live = offset;
                    }
                }
            }
        }
        if !self.follow {
            return None;
        }
        let live = self.dir.join("vm").join("app.log");
        loop {
            if let Ok(meta) = tokio::fs::metadata(&live).await {
                // Emptied by the cap (its tail went to app.log.1) or a new VM after a resume.
                if meta.len() < self.live {
                    self.live = 0;
                }
                if let Some(data) = read_some(&live, self.live).await {
                    self.live += data.len() as u64;
                    return Some(Bytes::from(data));
                }
            } else {
                // Suspended (or between suspend and resume): the next VM starts a new file.
                self.live = 0;
            }
            match self.api.microvms.store_row_state(&self.id).as_deref() {
                Some("TERMINATED") | None => return None,
                _ => {}
            }
            tokio::time::sleep(FOLLOW_EVERY).await;
        }
    }
}

/// `GET /kiln/v1/microvms/{id}/logs[?follow=true]`: the app's stdout and stderr as captured
/// since launch (within the log cap); with `follow`, then what it writes until the MicroVM ends.
async fn logs(
    State(api): State<Api>,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<LogsQuery>,
    signed: Signed,
) -> Response {
    let row = kiln_api::arn::microvm_identifier(&id)
        .and_then(|id| api.microvms.owned_row(&signed.caller, &id));
    let row = match row {
        Ok(r) => r,
        Err(e) => return error_response(&e),
    };
    let disabled = serde_json::from_value::<RunMicrovmRequest>(row.request.clone())
        .is_ok_and(|r| logging_disabled(&r));
    let mut headers = vec![("content-type", "text/plain; charset=utf-8")];
    if disabled {
        headers.push(("x-kiln-logging", "disabled"));
        let mut resp = Response::new(Body::empty());
        for (k, v) in headers {
            resp.headers_mut().insert(k, HeaderValue::from_static(v));
        }
        return resp;
    }
    let dir = api.microvms.dir_of(&row.id);
    let backlog = log_parts(&dir).into_iter().map(|p| (p, 0)).collect();
    let cursor = LogCursor {
        api: api.clone(),
        id: row.id.clone(),
        dir,
        backlog,
        follow: q.follow.unwrap_or(false),
        live: 0,
    };
    let stream = futures_util::stream::unfold(cursor, |mut c| async move {
        let data = c.next().await?;
        Some((Ok::<_, std::convert::Infallible>(data), c))
    });
    let mut resp = Response::new(Body::from_stream(stream));
    for (k, v) in headers {
        resp.headers_mut().insert(k, HeaderValue::from_static(v));
    }
    resp
}

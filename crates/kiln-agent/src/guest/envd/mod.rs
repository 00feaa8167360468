//! envd: the in-sandbox daemon E2B's SDKs talk to, served by kiln-init on port 49983.
//!
//! It speaks envd's published protocol: Connect RPC with the JSON codec for the
//! `process.Process` and `filesystem.Filesystem` services (unary and server-streaming calls,
//! and `StreamInput`'s client stream), and plain HTTP for `/health`, `/files`, `/envs` and
//! `/init`. Each connection gets a thread; at most [`MAX_CONNECTIONS`] at once.
//!
//! Access: envd runs only where kilnd started it (E2B sandboxes), with the sandbox's access
//! token from the start ([`serve_from_command_line`]); every request but `/health` must
//! carry it in `X-Access-Token`. kiln's endpoint proxy checks the same token before a
//! request reaches the guest, so envd is never open, not even to the guest's own users.

pub mod connect;
pub mod files;
pub mod filesystem;
pub mod http1;
pub mod process;

use std::collections::BTreeMap;
use std::io::{BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};

use connect::{Code, RpcError};
use files::HttpError;
use http1::{Body, Chunked, Head};

use crate::guest::users::{lookup_user, ResolvedUser};

/// The port envd listens on, as E2B's SDKs expect.
pub const PORT: u16 = 49983;
/// The envd version kiln serves: every SDK feature gated at or below it works (recursive
/// watch 0.1.4, stdin 0.3.0, default user 0.4.0, CloseStdin 0.5.2, octet-stream and gzip
/// uploads 0.5.7). File metadata (0.6.2) is not served, so the SDK does not ask for it.
pub const VERSION: &str = "0.5.7";
/// Most connections served at once.
pub const MAX_CONNECTIONS: usize = 128;
/// Largest unary request message.
const MAX_UNARY: usize = 4 * 1024 * 1024;
/// Keepalive interval on streams when the client does not ask for one.
const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(50);
/// An idle keep-alive connection is closed after this long.
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// What `/init` configured.
#[derive(Default)]
struct Config {
    env: BTreeMap<String, String>,
    token: Option<String>,
    default_user: Option<String>,
    default_workdir: Option<String>,
}

/// envd's shared state.
#[derive(Default)]
pub struct EnvdState {
    config: Mutex<Config>,
    processes: Arc<process::Processes>,
    filesystem: filesystem::Filesystem,
    connections: AtomicUsize,
}

impl EnvdState {
    fn config(&self) -> std::sync::MutexGuard<'_, Config> {
        self.config.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The user a request runs as: the one it names, else `/init`'s default, else `user`
    /// when the image has one (E2B's templates do), else root.
    pub fn resolve_user(&self, name: Option<&str>) -> Result<ResolvedUser, RpcError> {
        let name = match name.filter(|n| !n.is_empty()) {
            Some(n) => n.to_string(),
            None => self.config().default_user.clone().unwrap_or_else(|| {
                if lookup_user("user").is_ok() {
                    "user".into()
                } else {
                    "root".into()
                }
            }),
        };
        lookup_user(&name).map_err(|e| RpcError::invalid(format!("user {name:?}: {e}")))
    }

    /// The environment every process starts with.
    pub fn base_env(&self, user: &ResolvedUser) -> Vec<(String, String)> {
        let name = filesystem_user_name(user.uid);
        let mut env = vec![
            (
                "PATH".to_string(),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
            ),
            ("HOME".to_string(), user.home.clone()),
            ("USER".to_string(), name.clone()),
            ("LOGNAME".to_string(), name),
            ("LANG".to_string(), "C.UTF-8".to_string()),
        ];
        env.extend(
            self.config()
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        env
    }

    /// A process's working directory when the request names none.
    pub fn workdir(&self, user: &ResolvedUser) -> String {
        self.config()
            .default_workdir
            .clone()
            .filter(|d| std::path::Path::new(d).is_dir())
            .unwrap_or_else(|| {
                if std::path::Path::new(&user.home).is_dir() {
                    user.home.clone()
                } else {
                    "/".into()
                }
            })
    }

    /// `path` made absolute: `~` and relative paths start at the user's home.
    pub fn resolve_path(&self, path: &str, user: &ResolvedUser) -> String {
        if let Some(rest) = path.strip_prefix("~/") {
            format!("{}/{rest}", user.home.trim_end_matches('/'))
        } else if path == "~" {
            user.home.clone()
        } else if path.starts_with('/') {
            path.to_string()
        } else {
            format!("{}/{path}", self.workdir(user).trim_end_matches('/'))
        }
    }
}

fn filesystem_user_name(uid: u32) -> String {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    passwd
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() > 2 && f[2].parse::<u32>().ok() == Some(uid)).then(|| f[0].to_string())
        })
        .unwrap_or_else(|| uid.to_string())
}

/// The environment variable that hands envd its access token when kilnd starts it.
pub const TOKEN_ENV: &str = "KILN_ENVD_TOKEN";

/// `kiln-init --serve-envd ADDR`: envd on ADDR, guarded by the access token in
/// [`TOKEN_ENV`] from its first request on. kilnd starts it this way, over the root-only
/// agent channel, only in E2B sandboxes: no other MicroVM runs envd, and no process in the
/// guest can reach an envd that has no token yet. The token leaves the environment at once,
/// so the commands envd runs do not inherit it. With `detach`, the listener is bound, then
/// envd forks into a session of its own and the caller returns (the agent's exec ends).
pub fn serve_from_command_line(addr: &str, detach: bool) -> Result<(), String> {
    let token = std::env::var(TOKEN_ENV)
        .ok()
        .filter(|t| !t.is_empty())
        .ok_or_else(|| format!("envd needs its access token in {TOKEN_ENV}; it never runs open"))?;
    std::env::remove_var(TOKEN_ENV);
    let listener =
        TcpListener::bind(addr).map_err(|e| format!("envd cannot listen on {addr}: {e}"))?;
    if detach {
        // SAFETY: no thread has been started yet; the child only calls async-signal-safe
        // functions before it goes on as a plain single-threaded process.
        match unsafe { libc::fork() } {
            -1 => {
                return Err(format!(
                    "envd cannot fork: {}",
                    std::io::Error::last_os_error()
                ))
            }
            0 => {
                // SAFETY: plain syscalls on descriptors this process owns.
                unsafe {
                    libc::setsid();
                    let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
                    if null >= 0 {
                        libc::dup2(null, 0);
                        libc::dup2(null, 1);
                        libc::dup2(null, 2);
                    }
                }
            }
            _ => return Ok(()),
        }
    }
    let state = EnvdState::default();
    state.config().token = Some(token);
    serve(listener, Arc::new(state));
    Ok(())
}

/// Serves envd on `listener` forever.
pub fn serve(listener: TcpListener, state: Arc<EnvdState>) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        if state.connections.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            state.connections.fetch_sub(1, Ordering::SeqCst);
            let mut s = stream;
            let _ = http1::respond(
                &mut s,
                503,
                "application/json",
                &[("Connection", "close".into())],
                br#"{"code":503,"message":"envd is serving too many connections"}"#,
            );
            continue;
        }
        let state2 = state.clone();
        let spawned = std::thread::Builder::new()
            .name("envd-conn".into())
            .spawn(move || {
                serve_connection(&state2, stream);
                state2.connections.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            state.connections.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

fn serve_connection(state: &Arc<EnvdState>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(IDLE_TIMEOUT));
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::with_capacity(64 * 1024, stream);
    loop {
        let head = match http1::read_head(&mut reader) {
            Ok(Some(head)) => head,
            Ok(None) => return,
            Err(message) => {
                let _ = http1::respond(
                    &mut writer,
                    400,
                    "application/json",
                    &[("Connection", "close".into())],
                    json!({"code": 400, "message": message})
                        .to_string()
                        .as_bytes(),
                );
                return;
            }
        };
        let framing = match head.framing() {
            Ok(f) => f,
            Err(message) => {
                let _ = http1::respond(
                    &mut writer,
                    400,
                    "application/json",
                    &[("Connection", "close".into())],
                    json!({"code": 400, "message": message})
                        .to_string()
                        .as_bytes(),
                );
                return;
            }
        };
        let mut body = Body::new(&mut reader, framing);
        let keep = route(state, &head, &mut body, &mut writer);
        if !keep || head.wants_close() {
            return;
        }
        // What the handler left unread (a stream's terminating chunk, a refused body) is
        // read away so the connection can carry the next request: clients (kiln's proxy
        // among them) pool it. A large remainder closes it instead.
        if !body.finished() && (drain_bounded(&mut body, MAX_DRAIN).is_err() || !body.finished()) {
            return;
        }
    }
}

/// Most bytes of an unread request body read away to keep a connection.
const MAX_DRAIN: u64 = 1024 * 1024;

fn drain_bounded<R: std::io::BufRead>(body: &mut Body<'_, R>, limit: u64) -> std::io::Result<()> {
    std::io::copy(&mut std::io::Read::take(body, limit), &mut std::io::sink()).map(|_| ())
}

/// The user named by `Authorization: Basic base64(user:)`.
fn basic_user(head: &Head) -> Result<Option<String>, String> {
    let Some(value) = head.header("authorization") else {
        return Ok(None);
    };
    let Some(encoded) = value
        .strip_prefix("Basic ")
        .or_else(|| value.strip_prefix("basic "))
    else {
        return Ok(None);
    };
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|_| "the Authorization header is not valid base64".to_string())?;
    let text = String::from_utf8(decoded)
        .map_err(|_| "the Authorization user is not UTF-8".to_string())?;
    let user = text.split_once(':').map(|(u, _)| u).unwrap_or(&text);
    Ok(Some(user.to_string()).filter(|u| !u.is_empty()))
}

/// Handles one request; false when the connection must close.
fn route<R: std::io::BufRead>(
    state: &Arc<EnvdState>,
    head: &Head,
    body: &mut Body<'_, R>,
    out: &mut TcpStream,
) -> bool {
    if head.path == "/health" {
        return http1::respond(out, 204, "", &[], b"").is_ok();
    }
    if let Some(token) = state.config().token.clone() {
        let given = head.header("x-access-token").unwrap_or("");
        if !constant_time_eq(given.as_bytes(), token.as_bytes()) {
            let err = HttpError(401, "missing or wrong X-Access-Token".into());
            let _ = files::respond_error(out, &err);
            return false;
        }
    }
    let user = match basic_user(head) {
        Ok(u) => u,
        Err(message) => {
            let _ = files::respond_error(out, &HttpError(400, message));
            return false;
        }
    };
    let result = match (head.method.as_str(), head.path.as_str()) {
        ("GET", "/envs") => {
            let env = state.config().env.clone();
            http1::respond(
                out,
                200,
                "application/json",
                &[],
                json!(env).to_string().as_bytes(),
            )
        }
        ("POST", "/init") => init(state, body, out),
        ("GET", "/metrics") => http1::respond(
            out,
            200,
            "application/json",
            &[],
            metrics().to_string().as_bytes(),
        ),
        ("GET", "/files") => download(state, head, user.as_deref(), out),
        ("POST", "/files") => upload(state, head, body, user.as_deref(), out),
        ("POST", path)
            if path.starts_with("/process.Process/")
                || path.starts_with("/filesystem.Filesystem/") =>
        {
            rpc(state, head, body, user.as_deref(), out)
        }
        _ => files::respond_error(
            out,
            &HttpError(404, format!("no route {} {}", head.method, head.path)),
        ),
    };
    result.is_ok()
}

/// The guest's resources as envd's `/metrics` reports them (bytes; CPU over 100 ms).
fn metrics() -> Value {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kib = |key: &str| -> u64 {
        meminfo
            .lines()
            .find_map(|l| {
                l.strip_prefix(key)?
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .unwrap_or(0)
            * 1024
    };
    let cpu_times = || -> (u64, u64) {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let fields: Vec<u64> = stat
            .lines()
            .next()
            .unwrap_or("")
            .split_whitespace()
            .skip(1)
            .filter_map(|f| f.parse().ok())
            .collect();
        let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
        (fields.iter().sum(), idle)
    };
    let (total0, idle0) = cpu_times();
    std::thread::sleep(Duration::from_millis(100));
    let (total1, idle1) = cpu_times();
    let busy = (total1 - total0).saturating_sub(idle1 - idle0);
    let cpu_used_pct = if total1 > total0 {
        busy as f64 * 100.0 / (total1 - total0) as f64
    } else {
        0.0
    };
    let (disk_total, disk_used) = match nix::sys::statvfs::statvfs("/") {
        Ok(v) => {
            let frag = v.fragment_size();
            let total = v.blocks() * frag;
            (total, total.saturating_sub(v.blocks_free() * frag))
        }
        Err(_) => (0, 0),
    };
    let mem_total = kib("MemTotal:");
    json!({
        "ts": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        "cpu_count": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "cpu_used_pct": (cpu_used_pct * 100.0).round() / 100.0,
        "mem_total": mem_total,
        "mem_used": mem_total.saturating_sub(kib("MemAvailable:")),
        "mem_cache": kib("Cached:"),
        "disk_total": disk_total,
        "disk_used": disk_used,
    })
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn init<R: std::io::BufRead>(
    state: &EnvdState,
    body: &mut Body<'_, R>,
    out: &mut TcpStream,
) -> std::io::Result<()> {
    let parsed = body
        .read_all(1024 * 1024)
        .map_err(|e| HttpError(400, e))
        .and_then(|b| connect::parse_message(&b).map_err(|e| HttpError(400, e.message)));
    let message = match parsed {
        Ok(m) => m,
        Err(e) => return files::respond_error(out, &e),
    };
    let apply = || -> Result<(), RpcError> {
        let env = connect::string_map(&message, "envVars", "env_vars")?;
        let token = connect::opt_string(&message, "accessToken", "access_token")?;
        let user = connect::opt_string(&message, "defaultUser", "default_user")?;
        let workdir = connect::opt_string(&message, "defaultWorkdir", "default_workdir")?;
        if env.len() > 1000
            || env
                .iter()
                .any(|(k, v)| k.is_empty() || k.contains('=') || k.len() + v.len() > 128 * 1024)
        {
            return Err(RpcError::invalid(
                "envVars: at most 1000 variables, names without '=', 128 KiB each",
            ));
        }
        let mut config = state.config();
        config.env.extend(env);
        if let Some(t) = token.filter(|t| !t.is_empty()) {
            config.token = Some(t);
        }
        if let Some(u) = user.filter(|u| !u.is_empty()) {
            config.default_user = Some(u);
        }
        if let Some(w) = workdir.filter(|w| !w.is_empty()) {
            config.default_workdir = Some(w);
        }
        Ok(())
    };
    match apply() {
        Ok(()) => http1::respond(out, 204, "", &[], b""),
        Err(e) => files::respond_error(out, &HttpError(400, e.message)),
    }
}

fn download(
    state: &EnvdState,
    head: &Head,
    user: Option<&str>,
    out: &mut TcpStream,
) -> std::io::Result<()> {
    let user_name = head.param("username").or(user);
    let resolved = match state.resolve_user(user_name) {
        Ok(u) => u,
        Err(e) => return files::respond_error(out, &HttpError(400, e.message)),
    };
    let Some(path) = head.param("path").filter(|p| !p.is_empty()) else {
        return files::respond_error(
            out,
            &HttpError(400, "the path parameter is required".into()),
        );
    };
    let path = state.resolve_path(path, &resolved);
    let (mut file, size) = match files::open_for_read(std::path::Path::new(&path)) {
        Ok(f) => f,
        Err(e) => return files::respond_error(out, &e),
    };
    let name = std::path::Path::new(&path)
        .file_name()
        .map(|n| n.to_string_lossy().replace('"', ""))
        .unwrap_or_default();
    let headmsg = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {size}\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment; filename=\"{name}\"\r\n\r\n"
    );
    out.write_all(headmsg.as_bytes())?;
    let copied = std::io::copy(&mut std::io::Read::take(&mut file, size), out)?;
    if copied < size {
        // The file shrank while sending: the promised length cannot be met, end the connection.
        return Err(std::io::Error::other("file shrank during download"));
    }
    out.flush()
}

fn upload<R: std::io::BufRead>(
    state: &EnvdState,
    head: &Head,
    body: &mut Body<'_, R>,
    user: Option<&str>,
    out: &mut TcpStream,
) -> std::io::Result<()> {
    let user_name = head.param("username").or(user);
    let resolved = match state.resolve_user(user_name) {
        Ok(u) => u,
        Err(e) => return files::respond_error(out, &HttpError(400, e.message)),
    };
    let content_type = head.header("content-type").unwrap_or("");
    let path_param = head
        .param("path")
        .filter(|p| !p.is_empty())
        .map(str::to_string);
    let result = if let Some(boundary) = files::boundary(content_type) {
        let mut count = 0usize;
        let mut dest = |filename: Option<&str>| -> Result<std::path::PathBuf, HttpError> {
            count += 1;
            let name = match (&path_param, filename) {
                (Some(p), _) if count == 1 => p.clone(),
                (_, Some(f)) if !f.is_empty() => f.to_string(),
                _ => {
                    return Err(HttpError(
                        400,
                        "a file part has no filename and no path parameter names it".into(),
                    ))
                }
            };
            Ok(state.resolve_path(&name, &resolved).into())
        };
        files::receive_multipart(body, &boundary, &mut dest, &resolved)
    } else if content_type.is_empty() || content_type.starts_with("application/octet-stream") {
        match &path_param {
            None => Err(HttpError(
                400,
                "an octet-stream upload needs the path parameter".into(),
            )),
            Some(p) => {
                let path = std::path::PathBuf::from(state.resolve_path(p, &resolved));
                files::upload_reader(head, body)
                    .and_then(|mut r| files::write_file(&path, &mut r, &resolved))
                    .map(|v| vec![v])
            }
        }
    } else {
        Err(HttpError(415, format!("unsupported Content-Type {content_type:?}: use multipart/form-data or application/octet-stream")))
    };
    match result {
        Ok(written) => http1::respond(
            out,
            200,
            "application/json",
            &[],
            json!(written).to_string().as_bytes(),
        ),
        Err(e) => files::respond_error(out, &e),
    }
}

/// Serves one Connect call.
fn rpc<R: std::io::BufRead>(
    state: &Arc<EnvdState>,
    head: &Head,
    body: &mut Body<'_, R>,
    user: Option<&str>,
    out: &mut TcpStream,
) -> std::io::Result<()> {
    let content_type = head
        .header("content-type")
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let method = head.path.as_str();
    let streaming = matches!(
        method,
        "/process.Process/Start"
            | "/process.Process/Connect"
            | "/filesystem.Filesystem/WatchDir"
            | "/process.Process/StreamInput"
    );
    if streaming {
        if content_type != "application/connect+json" {
            return http1::respond(out, 415, "application/json", &[],
                br#"{"code":"invalid_argument","message":"streaming calls take Content-Type application/connect+json (the JSON codec)"}"#);
        }
        return rpc_stream(state, head, body, user, out);
    }
    if content_type != "application/json" {
        return http1::respond(out, 415, "application/json", &[],
            br#"{"code":"invalid_argument","message":"envd serves the JSON codec: send Content-Type application/json"}"#);
    }
    let result = body
        .read_all(MAX_UNARY)
        .map_err(|e| RpcError::new(Code::ResourceExhausted, e))
        .and_then(|b| connect::parse_message(&b))
        .and_then(|message| unary(state, method, &message, user));
    match result {
        Ok(response) => http1::respond(
            out,
            200,
            "application/json",
            &[],
            response.to_string().as_bytes(),
        ),
        Err(e) => http1::respond(
            out,
            e.code.http_status(),
            "application/json",
            &[],
            e.to_json().to_string().as_bytes(),
        ),
    }
}

fn unary(
    state: &Arc<EnvdState>,
    method: &str,
    m: &Value,
    user: Option<&str>,
) -> Result<Value, RpcError> {
    let p = &state.processes;
    let f = &state.filesystem;
    match method {
        "/process.Process/List" => Ok(p.list()),
        "/process.Process/SendInput" => p.send_input_request(m),
        "/process.Process/CloseStdin" => p.close_stdin(m),
        "/process.Process/SendSignal" => p.send_signal(m),
        "/process.Process/Update" => p.update(m),
        "/filesystem.Filesystem/Stat" => f.stat(state, m, user),
        "/filesystem.Filesystem/MakeDir" => f.make_dir(state, m, user),
        "/filesystem.Filesystem/Move" => f.rename(state, m, user),
        "/filesystem.Filesystem/ListDir" => f.list_dir(state, m, user),
        "/filesystem.Filesystem/Remove" => f.remove(state, m, user),
        "/filesystem.Filesystem/CreateWatcher" => f.create_watcher(state, m, user),
        "/filesystem.Filesystem/GetWatcherEvents" => f.get_watcher_events(m),
        "/filesystem.Filesystem/RemoveWatcher" => f.remove_watcher(m),
        _ => Err(RpcError::new(
            Code::Unimplemented,
            format!("envd has no method {method}"),
        )),
    }
}

fn keepalive_of(head: &Head) -> Duration {
    head.header("keepalive-ping-interval")
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|&s| s > 0)
        .map(|s| Duration::from_secs(s.min(3600)))
        .unwrap_or(DEFAULT_KEEPALIVE)
}

fn rpc_stream<R: std::io::BufRead>(
    state: &Arc<EnvdState>,
    head: &Head,
    body: &mut Body<'_, R>,
    user: Option<&str>,
    out: &mut TcpStream,
) -> std::io::Result<()> {
    let ct = "application/connect+json";
    if head.path == "/process.Process/StreamInput" {
        // Client stream: a start naming the process, then data and keepalives.
        let outcome = stream_input(state, body);
        let mut w = Chunked::start(&mut *out, 200, ct, &[])?;
        if outcome.is_ok() {
            w.send(&connect::envelope(0, b"{}"))?;
        }
        w.send(&connect::end_stream(outcome.as_ref().err()))?;
        return w.finish();
    }
    let request = connect::read_envelope(body, MAX_UNARY)
        .and_then(|m| m.ok_or_else(|| RpcError::invalid("the stream carries no request message")))
        .and_then(|(_, payload)| connect::parse_message(&payload));
    let keepalive = keepalive_of(head);
    let started = request.and_then(|request| match head.path.as_str() {
        "/process.Process/Start" => state
            .processes
            .start(state, &request, user)
            .map(|a| Stream::Process(a, true)),
        "/process.Process/Connect" => state
            .processes
            .connect(&request)
            .map(|a| Stream::Process(a, true)),
        _ => state
            .filesystem
            .watch(state, &request, user)
            .map(Stream::Watch),
    });
    let mut w = Chunked::start(&mut *out, 200, ct, &[])?;
    match started {
        Err(e) => {
            w.send(&connect::end_stream(Some(&e)))?;
            w.finish()
        }
        Ok(Stream::Process(attached, start)) => {
            process::stream_events(&mut |bytes| w.send(bytes), attached, start, keepalive)?;
            w.finish()
        }
        Ok(Stream::Watch(mut watch)) => {
            w.send(&connect::envelope(0, br#"{"start":{}}"#))?;
            let mut quiet = Duration::ZERO;
            loop {
                std::thread::sleep(filesystem::POLL);
                let events = watch.poll();
                if events.is_empty() {
                    quiet += filesystem::POLL;
                    if quiet >= keepalive {
                        quiet = Duration::ZERO;
                        w.send(&connect::envelope(0, br#"{"keepalive":{}}"#))?;
                    }
                    continue;
                }
                quiet = Duration::ZERO;
                for event in events {
                    w.send(&connect::envelope(
                        0,
                        json!({ "filesystem": event }).to_string().as_bytes(),
                    ))?;
                }
            }
        }
    }
}

enum Stream {
    Process(process::Attached, bool),
    Watch(filesystem::Watch),
}

fn stream_input<R: std::io::BufRead>(
    state: &EnvdState,
    body: &mut Body<'_, R>,
) -> Result<(), RpcError> {
    let mut selector: Option<Value> = None;
    while let Some((flags, payload)) = connect::read_envelope(body, MAX_UNARY)? {
        if flags & connect::FLAG_END_STREAM != 0 {
            break;
        }
        let message = connect::parse_message(&payload)?;
        if let Some(start) = connect::field(&message, "start", "start") {
            selector = connect::field(start, "process", "process").cloned();
        } else if let Some(data) = connect::field(&message, "data", "data") {
            let sel = selector
                .as_ref()
                .ok_or_else(|| RpcError::invalid("data before the start message"))?;
            state
                .processes
                .send_input(Some(sel), connect::field(data, "input", "input"))?;
        }
    }
    Ok(())
}

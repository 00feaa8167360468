//! The async host client of the guest agent.
//!
//! One connection carries many concurrent requests: each gets a fresh id, and a
//! background reader task routes every reply to its caller by that id. When the
//! connection drops, every pending caller gets [`AgentError::ConnectionClosed`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};

use crate::proto::{
    decode_payload, encode_frame, ExecSpec, FrameDecoder, GuestBody, GuestMessage, HostBody,
    HostMessage, OutputStream, MAX_FILE_BYTES, PROTOCOL_VERSION,
};
pub use crate::proto::{
    AppSpec, CopySpec, FetchSpec, FileKind, FileStat, FsErrorKind, HttpFailureKind,
    HttpRequestSpec, TtySize, MAX_DIR_ENTRIES, MAX_RANGE_BYTES,
};

/// Default limit for one request-reply exchange.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Default limit for copies and archive extractions, which move whole trees.
pub const DEFAULT_TRANSFER_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// Extra time a request with a guest-side limit (probe, HTTP, stop) waits for the reply.
const REPLY_GRACE: Duration = Duration::from_secs(10);
/// How often the handshake re-sends Hello while the guest has not opened its port.
const HELLO_INTERVAL: Duration = Duration::from_millis(500);
/// How often connecting retries while the socket does not accept yet.
const CONNECT_INTERVAL: Duration = Duration::from_millis(20);
/// Extra time a `run` with a guest-side timeout waits for the guest to report.
const RUN_GRACE: Duration = Duration::from_secs(30);
/// How far an exec's reader may fall behind the guest: events received and not yet read,
/// counted by their payload bytes (at least [`EVENT_COST`] each). Past it the stream is cut, so
/// a guest writing faster than its reader drains (a slow shell client, a stalled consumer)
/// cannot grow kilnd's memory; the other requests on the connection are never held up.
pub const MAX_QUEUED_OUTPUT: usize = 16 << 20;
/// What an event without output counts against [`MAX_QUEUED_OUTPUT`].
const EVENT_COST: usize = 256;
/// How much of each stream [`ExecStream::collect`] keeps; the rest is counted, not kept.
pub const MAX_COLLECTED_OUTPUT: usize = 64 << 20;

/// Failures talking to the guest agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The agent socket did not accept a connection in time.
    #[error("could not connect to the agent socket {path} within {timeout:?}: {last_error}")]
    ConnectTimeout {
        /// The socket path.
        path: PathBuf,
        /// How long connecting was tried.
        timeout: Duration,
        /// The last connect error.
        last_error: std::io::Error,
    },
    /// The guest did not answer Hello in time.
    #[error("no handshake from the guest agent on {path} within {timeout:?} (did kiln-init start? see the console log)")]
    HandshakeTimeout {
        /// The socket path.
        path: PathBuf,
        /// How long the handshake was tried.
        timeout: Duration,
    },
    /// The guest speaks another protocol version, or refused the handshake.
    #[error("agent handshake failed: {0}")]
    Handshake(String),
    /// The connection ended (for instance the VM exited) before the reply came.
    #[error("the connection to the guest agent closed (did the VM exit?)")]
    ConnectionClosed,
    /// The guest did not reply in time.
    #[error("{operation} timed out after {timeout:?} waiting for the guest agent")]
    Timeout {
        /// The operation that timed out.
        operation: &'static str,
        /// How long it waited.
        timeout: Duration,
    },
    /// The guest agent reported a failure.
    #[error("the guest agent reported: {0}")]
    Guest(String),
    /// An HTTP request inside the guest got no response (see `kind` to decide on a retry).
    #[error("{message}")]
    Http {
        /// Refused (nothing listens yet), timed out, closed, or malformed.
        kind: HttpFailureKind,
        /// What failed, on what, and why.
        message: String,
    },
    /// A file request failed in the guest (see `kind` to answer not found, conflict, …).
    #[error("{message}")]
    Fs {
        /// Why it failed.
        kind: FsErrorKind,
        /// What failed, on what, and why.
        message: String,
    },
    /// The guest sent something this client does not expect.
    #[error("agent protocol error: {0}")]
    Protocol(String),
    /// Writing to the socket failed.
    #[error("I/O error on the agent connection: {0}")]
    Io(#[from] std::io::Error),
}

impl AgentError {
    /// The kind of HTTP failure, when this error is one.
    pub fn http_failure(&self) -> Option<HttpFailureKind> {
        match self {
            AgentError::Http { kind, .. } => Some(*kind),
            _ => None,
        }
    }
}

/// What a copy or an archive extraction wrote in the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyStats {
    /// Files, directories and links written.
    pub entries: u64,
    /// Bytes of file content written.
    pub bytes: u64,
}

/// A user resolved in the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserInfo {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// Home directory.
    pub home: String,
}

/// How the supervised app is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppState {
    /// Whether it runs.
    pub running: bool,
    /// Its pid, `None` when no app was ever started.
    pub pid: Option<u32>,
    /// Exit code once it exited normally.
    pub exit_code: Option<i32>,
    /// Signal number once a signal killed it.
    pub signal: Option<i32>,
}

/// An HTTP response from an app in the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Headers in the order received.
    pub headers: Vec<(String, String)>,
    /// Body, at most 1 MiB.
    pub body: Vec<u8>,
    /// Whether the body was longer than 1 MiB and cut off.
    pub truncated: bool,
}

impl HttpResponse {
    /// The last value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .rev()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// What the guest said about itself in the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloInfo {
    /// Protocol version.
    pub version: u32,
    /// Version of kiln-init.
    pub agent_version: String,
    /// Guest kernel release.
    pub kernel: String,
    /// Guest uptime when it answered.
    pub uptime: Duration,
}

/// A process to run in the guest; build it with [`ExecRequest::new`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecRequest {
    spec: ExecSpec,
}

impl ExecRequest {
    /// Runs `argv` (program looked up in PATH) as the agent's user, in `/`, with no stdin.
    pub fn new<I, S>(argv: I) -> ExecRequest
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ExecRequest {
            spec: ExecSpec {
                argv: argv.into_iter().map(Into::into).collect(),
                ..ExecSpec::default()
            },
        }
    }

    /// Adds `KEY=VALUE` to the (otherwise empty) environment.
    pub fn env(mut self, key: &str, value: &str) -> ExecRequest {
        self.spec.env.push(format!("{key}={value}"));
        self
    }

    /// Sets the working directory.
    pub fn cwd(mut self, dir: &str) -> ExecRequest {
        self.spec.cwd = Some(dir.to_string());
        self
    }

    /// Writes `data` to the process's stdin, then closes it.
    pub fn stdin(mut self, data: impl Into<Vec<u8>>) -> ExecRequest {
        self.spec.stdin = Some(data.into());
        self
    }

    /// Kills the process group after `limit` (reported as `timed_out`).
    pub fn timeout(mut self, limit: Duration) -> ExecRequest {
        self.spec.timeout_ms = Some(limit.as_millis().try_into().unwrap_or(u64::MAX));
        self
    }

    /// Runs on a new pseudo-terminal of `size` (an interactive shell): type into it with
    /// [`AgentClient::exec_input`]; all output arrives as stdout.
    pub fn tty(mut self, size: TtySize) -> ExecRequest {
        self.spec.tty = Some(size);
        self
    }

    /// Runs in a network namespace of its own with only a loopback device.
    pub fn no_network(mut self) -> ExecRequest {
        self.spec.no_network = true;
        self
    }

    /// Runs as this user and group.
    pub fn user(mut self, uid: u32, gid: u32) -> ExecRequest {
        self.spec.uid = Some(uid);
        self.spec.gid = Some(gid);
        self
    }
}

/// What a download in the guest gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// Bytes written.
    pub bytes: u64,
    /// SHA-256, lower-case hex.
    pub sha256: String,
    /// The server's `Last-Modified`, as seconds since the epoch.
    pub mtime: Option<i64>,
}

/// One event of a running exec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    /// The process started with this pid.
    Started {
        /// Its pid in the guest.
        pid: u32,
    },
    /// A chunk of stdout.
    Stdout(Vec<u8>),
    /// A chunk of stderr.
    Stderr(Vec<u8>),
    /// The process ended and its output is complete; the last event.
    Exited(ExitStatus),
}

/// How an exec ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitStatus {
    /// Exit code when it exited.
    pub code: Option<i32>,
    /// Signal number when a signal killed it.
    pub signal: Option<i32>,
    /// Whether the guest killed it because its timeout expired.
    pub timed_out: bool,
}

/// Everything an exec produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// All of stdout.
    pub stdout: Vec<u8>,
    /// All of stderr.
    pub stderr: Vec<u8>,
    /// Exit code when it exited.
    pub code: Option<i32>,
    /// Signal number when a signal killed it.
    pub signal: Option<i32>,
    /// Whether the guest killed it because its timeout expired.
    pub timed_out: bool,
    /// Output bytes past [`MAX_COLLECTED_OUTPUT`] per stream, counted and dropped.
    pub dropped_bytes: u64,
}

/// The events of one exec, in order.
pub struct ExecStream {
    id: u64,
    events: mpsc::UnboundedReceiver<GuestBody>,
    queue: Arc<StreamQueue>,
    finished: bool,
    _route: RouteGuard,
}

/// What one exec's events hold of kilnd's memory while they wait to be read.
#[derive(Debug, Default)]
struct StreamQueue {
    queued: AtomicUsize,
    overflowed: AtomicBool,
}

/// What `body` counts against [`MAX_QUEUED_OUTPUT`].
fn event_cost(body: &GuestBody) -> usize {
    match body {
        GuestBody::Output { data, .. } => data.len().max(EVENT_COST),
        _ => EVENT_COST,
    }
}

impl ExecStream {
    /// The exec's id, for [`AgentClient::signal`].
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The next event; `None` after `Exited`. Waits as long as the process runs.
    pub async fn next_event(&mut self) -> Result<Option<ExecEvent>, AgentError> {
        if self.finished {
            return Ok(None);
        }
        let Some(body) = self.events.recv().await else {
            self.finished = true;
            if self.queue.overflowed.load(Ordering::Acquire) {
                return Err(AgentError::Protocol(format!(
                    "the guest wrote more than {} MiB of output that was not read in time; \
                     the stream was cut (the process may still run: signal it to stop it)",
                    MAX_QUEUED_OUTPUT >> 20
                )));
            }
            return Err(AgentError::ConnectionClosed);
        };
        self.queue
            .queued
            .fetch_sub(event_cost(&body), Ordering::AcqRel);
        let event = match body {
            GuestBody::ExecStarted { pid } => ExecEvent::Started { pid },
            GuestBody::Output {
                stream: OutputStream::Stdout,
                data,
            } => ExecEvent::Stdout(data),
            GuestBody::Output {
                stream: OutputStream::Stderr,
                data,
            } => ExecEvent::Stderr(data),
            GuestBody::Exited {
                code,
                signal,
                timed_out,
            } => {
                self.finished = true;
                ExecEvent::Exited(ExitStatus {
                    code,
                    signal,
                    timed_out,
                })
            }
            GuestBody::Error { message } => {
                self.finished = true;
                return Err(AgentError::Guest(message));
            }
            other => {
                self.finished = true;
                return Err(unexpected("exec", &other));
            }
        };
        Ok(Some(event))
    }

    /// Collects the remaining events into an [`ExecOutput`].
    /// Each stream keeps at most [`MAX_COLLECTED_OUTPUT`] bytes; the rest is counted in
    /// `dropped_bytes`.
    pub async fn collect(mut self) -> Result<ExecOutput, AgentError> {
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        let mut dropped_bytes = 0u64;
        let mut keep = |into: &mut Vec<u8>, data: &[u8]| {
            let room = MAX_COLLECTED_OUTPUT
                .saturating_sub(into.len())
                .min(data.len());
            into.extend_from_slice(&data[..room]);
            dropped_bytes += (data.len() - room) as u64;
        };
        while let Some(event) = self.next_event().await? {
            match event {
                ExecEvent::Started { .. } => {}
                ExecEvent::Stdout(data) => keep(&mut stdout, &data),
                ExecEvent::Stderr(data) => keep(&mut stderr, &data),
                ExecEvent::Exited(status) => {
                    return Ok(ExecOutput {
                        stdout,
                        stderr,
                        code: status.code,
                        signal: status.signal,
                        timed_out: status.timed_out,
                        dropped_bytes,
                    })
                }
            }
        }
        Err(AgentError::Protocol("exec ended without an exit".into()))
    }
}

enum Route {
    Reply(oneshot::Sender<GuestBody>),
    Stream(mpsc::UnboundedSender<GuestBody>, Arc<StreamQueue>),
}

#[derive(Default)]
struct Routes {
    closed: bool,
    waiting: HashMap<u64, Route>,
}

struct Shared {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    routes: Mutex<Routes>,
    next_id: AtomicU64,
    path: PathBuf,
    /// Dropped with the last client, which stops the reader task.
    _stop: oneshot::Sender<()>,
}

impl Shared {
    fn routes(&self) -> MutexGuard<'_, Routes> {
        self.routes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a route for a new id; fails when the connection already closed.
    fn register(self: &Arc<Self>, route: Route) -> Result<RouteGuard, AgentError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut routes = self.routes();
        if routes.closed {
            return Err(AgentError::ConnectionClosed);
        }
        routes.waiting.insert(id, route);
        Ok(RouteGuard {
            id,
            shared: self.clone(),
        })
    }

    async fn send(&self, id: u64, body: HostBody) -> Result<(), AgentError> {
        let frame = encode_frame(&HostMessage { id, body })
            .map_err(|e| AgentError::Protocol(e.to_string()))?;
        let mut writer = self.writer.lock().await;
        writer.write_all(&frame).await.map_err(|e| match e.kind() {
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset => {
                AgentError::ConnectionClosed
            }
            _ => AgentError::Io(e),
        })
    }

    fn deliver(&self, message: GuestMessage) {
        let mut routes = self.routes();
        let ends_stream = matches!(
            message.body,
            GuestBody::Exited { .. } | GuestBody::Error { .. }
        );
        match routes.waiting.get(&message.id) {
            Some(Route::Stream(tx, queue)) => {
                let cost = event_cost(&message.body);
                let queued = queue.queued.fetch_add(cost, Ordering::AcqRel) + cost;
                if queued > MAX_QUEUED_OUTPUT {
                    // Dropping the sender ends the stream once its reader drained what came.
                    queue.overflowed.store(true, Ordering::Release);
                    routes.waiting.remove(&message.id);
                    return;
                }
                let gone = tx.send(message.body).is_err();
                if gone || ends_stream {
                    routes.waiting.remove(&message.id);
                }
            }
            Some(Route::Reply(_)) => {
                if let Some(Route::Reply(tx)) = routes.waiting.remove(&message.id) {
                    let _ = tx.send(message.body);
                }
            }
            // A late reply for a caller that gave up, or a frame from before a restore.
            None => tracing::debug!(id = message.id, "agent frame for no waiting request"),
        }
    }

    fn close(&self) {
        let mut routes = self.routes();
        routes.closed = true;
        // Dropping the senders wakes every waiter with "closed".
        routes.waiting.clear();
    }
}

/// Removes a request's route when its caller stops waiting; keeps the connection open meanwhile.
struct RouteGuard {
    id: u64,
    shared: Arc<Shared>,
}

impl Drop for RouteGuard {
    fn drop(&mut self) {
        self.shared.routes().waiting.remove(&self.id);
    }
}

/// A connection to one guest agent; clones share it.
#[derive(Clone)]
pub struct AgentClient {
    shared: Arc<Shared>,
    hello: HelloInfo,
    /// Set by `with_timeout`; else each operation uses its default.
    timeout: Option<Duration>,
}

impl AgentClient {
    /// Connects to the agent's socket (retrying while it does not exist yet) and
    /// performs the handshake, all within `timeout`.
    pub async fn connect(socket_path: &Path, timeout: Duration) -> Result<AgentClient, AgentError> {
        let start = Instant::now();
        let deadline = start + timeout;
        let stream = connect_until(socket_path, timeout, deadline).await?;
        let (mut reader, writer) = stream.into_split();
        let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
        let shared = Arc::new(Shared {
            writer: tokio::sync::Mutex::new(writer),
            routes: Mutex::new(Routes::default()),
            next_id: AtomicU64::new(first_id()),
            path: socket_path.to_path_buf(),
            _stop: stop_tx,
        });

        let weak = Arc::downgrade(&shared);
        tokio::spawn(async move {
            let mut decoder = FrameDecoder::new();
            let mut buf = vec![0u8; 128 * 1024];
            // A guest repeating one bad frame must not flood kilnd's log.
            let mut warnings = crate::budget::WarnBudget::new(5, Duration::from_secs(60));
            loop {
                let read = tokio::select! {
                    read = reader.read(&mut buf) => read,
                    // Every client is gone: nobody waits for replies any more.
                    _ = &mut stop_rx => return,
                };
                let n = match read {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let Some(shared) = weak.upgrade() else { return };
                decoder.push(&buf[..n]);
                while let Some(frame) = decoder.next_frame() {
                    match frame.and_then(|p| decode_payload::<GuestMessage>(&p)) {
                        Ok(message) => shared.deliver(message),
                        Err(e) => crate::warn_within!(
                            warnings,
                            agent = %shared.path.display(),
                            "ignoring a bad frame from the agent: {e}"
                        ),
                    }
                }
            }
            if let Some(shared) = weak.upgrade() {
                shared.close();
            }
        });

        let hello = handshake(&shared, deadline, timeout).await?;
        Ok(AgentClient {
            shared,
            hello,
            timeout: None,
        })
    }

    /// A client on the same connection whose requests wait at most `timeout`
    /// (requests with a guest-side limit wait for that limit plus a grace period).
    pub fn with_timeout(&self, timeout: Duration) -> AgentClient {
        AgentClient {
            timeout: Some(timeout),
            ..self.clone()
        }
    }

    /// What the guest reported in the handshake.
    pub fn hello_info(&self) -> &HelloInfo {
        &self.hello
    }

    /// The socket this client is connected to.
    pub fn socket_path(&self) -> &Path {
        &self.shared.path
    }

    /// Measures a round trip to the agent.
    pub async fn ping(&self) -> Result<Duration, AgentError> {
        let start = Instant::now();
        match self.request("ping", HostBody::Ping).await? {
            GuestBody::Pong => Ok(start.elapsed()),
            other => Err(unexpected("ping", &other)),
        }
    }

    /// Starts a process; its events arrive on the returned stream.
    pub async fn exec(&self, request: ExecRequest) -> Result<ExecStream, AgentError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let queue = Arc::new(StreamQueue::default());
        let guard = self.shared.register(Route::Stream(tx, queue.clone()))?;
        let id = guard.id;
        self.shared.send(id, HostBody::Exec(request.spec)).await?;
        Ok(ExecStream {
            id,
            events: rx,
            queue,
            finished: false,
            _route: guard,
        })
    }

    /// Runs a process to completion and collects its output. With a timeout on the
    /// request, waits that long plus a grace period for the guest's report; without
    /// one, waits as long as the process runs.
    pub async fn run(&self, request: ExecRequest) -> Result<ExecOutput, AgentError> {
        let limit = request
            .spec
            .timeout_ms
            .map(|ms| Duration::from_millis(ms).saturating_add(RUN_GRACE));
        let stream = self.exec(request).await?;
        match limit {
            Some(limit) => tokio::time::timeout(limit, stream.collect())
                .await
                .map_err(|_| AgentError::Timeout {
                    operation: "run",
                    timeout: limit,
                })?,
            None => stream.collect().await,
        }
    }

    /// Types `data` into the terminal of the exec with id `exec_id` (started with a tty; wait
    /// for its `Started` event first).
    pub async fn exec_input(&self, exec_id: u64, data: Vec<u8>) -> Result<(), AgentError> {
        let body = HostBody::ExecInput { exec_id, data };
        self.expect_ok("exec_input", body).await
    }

    /// Resizes the terminal of the exec with id `exec_id` (started with a tty).
    pub async fn exec_resize(&self, exec_id: u64, size: TtySize) -> Result<(), AgentError> {
        let body = HostBody::ExecResize { exec_id, size };
        self.expect_ok("exec_resize", body).await
    }

    /// Sends `signal` to the process group of the exec with id `exec_id`.
    pub async fn signal(&self, exec_id: u64, signal: i32) -> Result<(), AgentError> {
        let body = HostBody::Signal { exec_id, signal };
        self.expect_ok("signal", body).await
    }

    /// Writes a file atomically in the guest, creating parent directories.
    pub async fn write_file(
        &self,
        path: &str,
        data: &[u8],
        mode: u32,
        owner: Option<(u32, u32)>,
    ) -> Result<(), AgentError> {
        if data.len() > MAX_FILE_BYTES {
            return Err(AgentError::Protocol(format!(
                "{path}: {} bytes do not fit in one frame (limit {MAX_FILE_BYTES})",
                data.len()
            )));
        }
        let body = HostBody::WriteFile {
            path: path.to_string(),
            data: data.to_vec(),
            mode,
            uid: owner.map(|o| o.0),
            gid: owner.map(|o| o.1),
        };
        self.expect_ok("write_file", body).await
    }

    /// Reads a whole file from the guest; fails when it is larger than `max_bytes`.
    pub async fn read_file(&self, path: &str, max_bytes: u64) -> Result<Vec<u8>, AgentError> {
        let body = HostBody::ReadFile {
            path: path.to_string(),
            max_bytes,
        };
        match self.request("read_file", body).await? {
            GuestBody::FileData { data } => Ok(data),
            other => Err(unexpected("read_file", &other)),
        }
    }

    /// Sets the guest's CLOCK_REALTIME.
    pub async fn set_clock(&self, now: SystemTime) -> Result<(), AgentError> {
        let nanos = now
            .duration_since(UNIX_EPOCH)
            .map_err(|_| AgentError::Protocol("clock before 1970".into()))?
            .as_nanos();
        let unix_nanos =
            u64::try_from(nanos).map_err(|_| AgentError::Protocol("clock beyond 2554".into()))?;
        self.expect_ok("set_clock", HostBody::SetClock { unix_nanos })
            .await
    }

    /// Credits host entropy to the guest's RNG and reseeds its CRNG.
    pub async fn add_entropy(&self, bytes: &[u8]) -> Result<(), AgentError> {
        let body = HostBody::AddEntropy {
            bytes: bytes.to_vec(),
        };
        self.expect_ok("add_entropy", body).await
    }

    /// Names the guest: its hostname, and `/etc/machine-id` when its image has one. An agent
    /// older than this request answers an error.
    pub async fn set_identity(&self, hostname: &str, machine_id: &str) -> Result<(), AgentError> {
        let body = HostBody::SetIdentity {
            hostname: hostname.to_string(),
            machine_id: machine_id.to_string(),
        };
        self.expect_ok("set_identity", body).await
    }

    /// Flushes the guest's file systems, and drops its page cache when asked.
    pub async fn sync(&self, drop_caches: bool) -> Result<(), AgentError> {
        self.expect_ok("sync", HostBody::Sync { drop_caches }).await
    }

    /// Onlines or offlines the guest's vCPUs until `count` are online; what is online after.
    /// An agent older than this request answers an error (its guest is of fixed size).
    pub async fn set_online_cpus(&self, count: u32) -> Result<GuestCpus, AgentError> {
        let body = HostBody::SetOnlineCpus { count };
        match self.request("set_online_cpus", body).await? {
            GuestBody::Cpus { online, present } => Ok(GuestCpus { online, present }),
            other => Err(unexpected("set_online_cpus", &other)),
        }
    }

    /// How many vCPUs the guest has online and present.
    pub async fn cpus(&self) -> Result<GuestCpus, AgentError> {
        match self.request("cpu_status", HostBody::CpuStatus).await? {
            GuestBody::Cpus { online, present } => Ok(GuestCpus { online, present }),
            other => Err(unexpected("cpu_status", &other)),
        }
    }

    /// The guest's memory as its kernel counts it. An agent older than this request answers
    /// an error. The figures are the guest's word: bound what they may cause.
    pub async fn memory(&self) -> Result<GuestMemory, AgentError> {
        match self
            .request("memory_status", HostBody::MemoryStatus)
            .await?
        {
            GuestBody::Memory {
                total_kib,
                available_kib,
            } => Ok(GuestMemory {
                total_kib,
                available_kib,
            }),
            other => Err(unexpected("memory_status", &other)),
        }
    }

    /// Asks the guest to sync and power off; returns once it acknowledged.
    pub async fn power_off(&self) -> Result<(), AgentError> {
        self.expect_ok("power_off", HostBody::PowerOff).await
    }

    /// Mounts `source` on `target` in the guest (creating the directory) with mount(8)
    /// options such as `ro`.
    pub async fn mount(
        &self,
        source: &str,
        target: &str,
        fstype: &str,
        options: &[&str],
    ) -> Result<(), AgentError> {
        let body = HostBody::Mount {
            source: source.to_string(),
            target: target.to_string(),
            fstype: fstype.to_string(),
            options: options.iter().map(|o| o.to_string()).collect(),
        };
        self.expect_ok("mount", body).await
    }

    /// Removes a file, a symbolic link or an empty directory in the guest (nothing there
    /// is success).
    pub async fn remove_path(&self, path: &str) -> Result<(), AgentError> {
        let body = HostBody::RemovePath {
            path: path.to_string(),
        };
        self.expect_ok("remove_path", body).await
    }

    /// Whether a path exists in the guest (a final symbolic link is not followed).
    pub async fn path_exists(&self, path: &str) -> Result<bool, AgentError> {
        let body = HostBody::PathExists {
            path: path.to_string(),
        };
        match self.request("path_exists", body).await? {
            GuestBody::Exists { exists } => Ok(exists),
            other => Err(unexpected("path_exists", &other)),
        }
    }

    /// Downloads a URL inside the guest into a file (Dockerfile `ADD <url>`); waits up to
    /// the spec's timeout (plus a little) for the answer.
    pub async fn fetch(&self, spec: FetchSpec) -> Result<Fetched, AgentError> {
        let limit = Duration::from_millis(spec.timeout_ms) + Duration::from_secs(10);
        match self
            .request_within("fetch", HostBody::Fetch(spec), limit)
            .await?
        {
            GuestBody::Fetched {
                bytes,
                sha256,
                mtime,
            } => Ok(Fetched {
                bytes,
                sha256,
                mtime,
            }),
            other => Err(unexpected("fetch", &other)),
        }
    }

    /// Unmounts `target` in the guest.
    pub async fn unmount(&self, target: &str) -> Result<(), AgentError> {
        let body = HostBody::Unmount {
            target: target.to_string(),
        };
        self.expect_ok("unmount", body).await
    }

    /// Copies inside the guest with Docker `COPY` semantics. Waits up to
    /// [`DEFAULT_TRANSFER_TIMEOUT`] unless the client has its own timeout.
    pub async fn copy(&self, spec: CopySpec) -> Result<CopyStats, AgentError> {
        let limit = self.timeout.unwrap_or(DEFAULT_TRANSFER_TIMEOUT);
        let reply = self.request_within("copy", HostBody::Copy(spec), limit);
        copy_stats("copy", reply.await?)
    }

    /// Unpacks a tar (plain, gzip, bzip2, xz) in the guest into `dest`, owned by `uid`
    /// and `gid` when given, else as recorded in the archive. Waits up to
    /// [`DEFAULT_TRANSFER_TIMEOUT`] unless the client has its own timeout.
    pub async fn extract_archive(
        &self,
        src: &str,
        dest: &str,
        uid: Option<u32>,
        gid: Option<u32>,
    ) -> Result<CopyStats, AgentError> {
        let body = HostBody::ExtractArchive {
            src: src.to_string(),
            dest: dest.to_string(),
            uid,
            gid,
        };
        let limit = self.timeout.unwrap_or(DEFAULT_TRANSFER_TIMEOUT);
        let reply = self.request_within("extract_archive", body, limit);
        copy_stats("extract_archive", reply.await?)
    }

    /// Resolves a Docker `USER` spec (`name[:group]` or `uid[:gid]`) in the guest.
    pub async fn lookup_user(&self, spec: &str) -> Result<UserInfo, AgentError> {
        let body = HostBody::LookupUser {
            spec: spec.to_string(),
        };
        match self.request("lookup_user", body).await? {
            GuestBody::User { uid, gid, home } => Ok(UserInfo { uid, gid, home }),
            other => Err(unexpected("lookup_user", &other)),
        }
    }

    /// Starts the app under the agent's supervision; returns its pid.
    pub async fn start_app(&self, spec: AppSpec) -> Result<u32, AgentError> {
        match self.request("start_app", HostBody::StartApp(spec)).await? {
            GuestBody::AppStarted { pid } => Ok(pid),
            other => Err(unexpected("start_app", &other)),
        }
    }

    /// How the app is doing.
    pub async fn app_status(&self) -> Result<AppState, AgentError> {
        let reply = self.request("app_status", HostBody::AppStatus).await?;
        app_state("app_status", reply)
    }

    /// Sends `signal` (SIGTERM when `None`) to the app's process group, SIGKILL after
    /// `grace`; returns the app's final state.
    pub async fn stop_app(
        &self,
        signal: Option<i32>,
        grace: Duration,
    ) -> Result<AppState, AgentError> {
        let body = HostBody::StopApp {
            signal,
            grace_ms: Some(millis(grace)),
        };
        // The guest waits out the grace, then up to 5 s after SIGKILL.
        let limit = grace.saturating_add(REPLY_GRACE);
        let reply = self.request_within("stop_app", body, limit).await?;
        app_state("stop_app", reply)
    }

    /// Whether something in the guest accepts TCP connections on 127.0.0.1:`port`.
    pub async fn probe_tcp(&self, port: u16, timeout: Duration) -> Result<bool, AgentError> {
        let body = HostBody::ProbeTcp {
            port,
            timeout_ms: millis(timeout),
        };
        let limit = timeout.saturating_add(REPLY_GRACE);
        match self.request_within("probe_tcp", body, limit).await? {
            GuestBody::TcpProbe { open } => Ok(open),
            other => Err(unexpected("probe_tcp", &other)),
        }
    }

    /// Walks the guest's process and TCP paths once (nothing of the app runs), so a restored
    /// VM's first request does not pay for translating them; how long it took.
    pub async fn warm(&self, timeout: Duration) -> Result<Duration, AgentError> {
        let start = Instant::now();
        let body = HostBody::Warm {
            timeout_ms: millis(timeout),
        };
        let limit = timeout.saturating_add(REPLY_GRACE);
        match self.request_within("warm", body, limit).await? {
            GuestBody::Ok => Ok(start.elapsed()),
            other => Err(unexpected("warm", &other)),
        }
    }

    /// Makes an HTTP/1.1 request to 127.0.0.1:`spec.port` inside the guest. A request
    /// that got no response fails with [`AgentError::Http`], whose kind tells "nothing
    /// listens yet" ([`HttpFailureKind::Refused`]) from a timeout or a broken exchange.
    pub async fn http_request(&self, spec: HttpRequestSpec) -> Result<HttpResponse, AgentError> {
        let limit = Duration::from_millis(spec.timeout_ms).saturating_add(REPLY_GRACE);
        match self
            .request_within("http_request", HostBody::HttpRequest(spec), limit)
            .await?
        {
            GuestBody::HttpResponse {
                status,
                headers,
                body,
                truncated,
            } => Ok(HttpResponse {
                status,
                headers,
                body,
                truncated,
            }),
            GuestBody::HttpFailed { kind, message } => Err(AgentError::Http { kind, message }),
            other => Err(unexpected("http_request", &other)),
        }
    }

    /// What a path in the guest is (a final symbolic link is not followed).
    pub async fn stat(&self, path: &str) -> Result<FileStat, AgentError> {
        let body = HostBody::StatPath {
            path: path.to_string(),
        };
        match fs_result(self.request("stat", body).await?)? {
            GuestBody::Stat(stat) => Ok(stat),
            other => Err(unexpected("stat", &other)),
        }
    }

    /// The entries of a directory in the guest, sorted by name (at most `max_entries`, and
    /// [`MAX_DIR_ENTRIES`]), and whether it holds more.
    pub async fn list_dir(
        &self,
        path: &str,
        max_entries: u32,
    ) -> Result<(Vec<FileStat>, bool), AgentError> {
        let body = HostBody::ListDir {
            path: path.to_string(),
            max_entries,
        };
        match fs_result(self.request("list_dir", body).await?)? {
            GuestBody::DirListing { entries, truncated } => Ok((entries, truncated)),
            other => Err(unexpected("list_dir", &other)),
        }
    }

    /// Creates a directory in the guest (with missing parents when `parents`).
    pub async fn make_dir(
        &self,
        path: &str,
        parents: bool,
        mode: u32,
        owner: Option<(u32, u32)>,
    ) -> Result<(), AgentError> {
        let body = HostBody::MakeDir {
            path: path.to_string(),
            parents,
            mode,
            uid: owner.map(|o| o.0),
            gid: owner.map(|o| o.1),
        };
        self.expect_fs_ok("make_dir", body).await
    }

    /// Renames a path in the guest (within one file system).
    pub async fn move_path(&self, from: &str, to: &str) -> Result<(), AgentError> {
        let body = HostBody::MovePath {
            from: from.to_string(),
            to: to.to_string(),
        };
        self.expect_fs_ok("move_path", body).await
    }

    /// Removes a path in the guest, a directory with everything under it.
    pub async fn remove_tree(&self, path: &str) -> Result<(), AgentError> {
        let body = HostBody::RemoveTree {
            path: path.to_string(),
        };
        let limit = self.timeout.unwrap_or(DEFAULT_TRANSFER_TIMEOUT);
        let reply = self.request_within("remove_tree", body, limit).await?;
        match fs_result(reply)? {
            GuestBody::Ok => Ok(()),
            other => Err(unexpected("remove_tree", &other)),
        }
    }

    /// Up to `len` bytes (at most [`MAX_RANGE_BYTES`]) of a regular file in the guest from
    /// `offset`, and whether the file ends after them.
    pub async fn read_range(
        &self,
        path: &str,
        offset: u64,
        len: u32,
    ) -> Result<(Vec<u8>, bool), AgentError> {
        let body = HostBody::ReadRange {
            path: path.to_string(),
            offset,
            len,
        };
        match fs_result(self.request("read_range", body).await?)? {
            // A guest answering more than asked is not believed (nor kept).
            GuestBody::FileChunk { data, .. } if data.len() > len as usize => {
                Err(AgentError::Protocol(format!(
                    "read_range of {path}: the guest sent {} bytes for {len} asked",
                    data.len()
                )))
            }
            GuestBody::FileChunk { data, eof } => Ok((data, eof)),
            other => Err(unexpected("read_range", &other)),
        }
    }

    /// Writes `data` (at most [`MAX_RANGE_BYTES`]) at `offset` of a regular file in the guest;
    /// `create` makes (or empties) the file and its missing parents, with `mode` and `owner`.
    pub async fn write_range(
        &self,
        path: &str,
        offset: u64,
        data: Vec<u8>,
        create: bool,
        mode: u32,
        owner: Option<(u32, u32)>,
    ) -> Result<(), AgentError> {
        if data.len() > MAX_RANGE_BYTES {
            return Err(AgentError::Protocol(format!(
                "{path}: a piece of {} bytes is larger than {MAX_RANGE_BYTES}",
                data.len()
            )));
        }
        let body = HostBody::WriteRange {
            path: path.to_string(),
            offset,
            data,
            create,
            mode,
            uid: owner.map(|o| o.0),
            gid: owner.map(|o| o.1),
        };
        self.expect_fs_ok("write_range", body).await
    }

    async fn expect_fs_ok(
        &self,
        operation: &'static str,
        body: HostBody,
    ) -> Result<(), AgentError> {
        match fs_result(self.request(operation, body).await?)? {
            GuestBody::Ok => Ok(()),
            other => Err(unexpected(operation, &other)),
        }
    }

    async fn expect_ok(&self, operation: &'static str, body: HostBody) -> Result<(), AgentError> {
        match self.request(operation, body).await? {
            GuestBody::Ok => Ok(()),
            other => Err(unexpected(operation, &other)),
        }
    }

    /// Sends one request and waits for its single reply within the client's timeout.
    async fn request(
        &self,
        operation: &'static str,
        body: HostBody,
    ) -> Result<GuestBody, AgentError> {
        let limit = self.timeout.unwrap_or(DEFAULT_REQUEST_TIMEOUT);
        self.request_within(operation, body, limit).await
    }

    /// Sends one request and waits up to `limit` for its single reply; `Error` replies
    /// become errors.
    async fn request_within(
        &self,
        operation: &'static str,
        body: HostBody,
        limit: Duration,
    ) -> Result<GuestBody, AgentError> {
        let (tx, rx) = oneshot::channel();
        let guard = self.shared.register(Route::Reply(tx))?;
        let exchange = async {
            self.shared.send(guard.id, body).await?;
            rx.await.map_err(|_| AgentError::ConnectionClosed)
        };
        let reply =
            tokio::time::timeout(limit, exchange)
                .await
                .map_err(|_| AgentError::Timeout {
                    operation,
                    timeout: limit,
                })??;
        match reply {
            GuestBody::Error { message } => Err(AgentError::Guest(message)),
            other => Ok(other),
        }
    }
}

async fn connect_until(
    path: &Path,
    timeout: Duration,
    deadline: Instant,
) -> Result<UnixStream, AgentError> {
    loop {
        match UnixStream::connect(path).await {
            Ok(stream) => return Ok(stream),
            Err(last_error) => {
                if Instant::now() + CONNECT_INTERVAL >= deadline {
                    return Err(AgentError::ConnectTimeout {
                        path: path.to_path_buf(),
                        timeout,
                        last_error,
                    });
                }
                tokio::time::sleep(CONNECT_INTERVAL).await;
            }
        }
    }
}

/// The guest's vCPUs, as its agent counts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestCpus {
    /// Online now.
    pub online: u32,
    /// Present (online or not).
    pub present: u32,
}

/// The guest's memory, as its agent reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestMemory {
    /// All the memory its kernel manages, KiB.
    pub total_kib: u64,
    /// What it could give to new work, KiB.
    pub available_kib: u64,
}

/// Sends Hello every [`HELLO_INTERVAL`] until the guest answers or `deadline` passes:
/// a booting guest opens its port late.
async fn handshake(
    shared: &Arc<Shared>,
    deadline: Instant,
    timeout: Duration,
) -> Result<HelloInfo, AgentError> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    // The first reply ends the handshake, so what the queue counts is never given back.
    let guard = shared.register(Route::Stream(tx, Arc::default()))?;
    let hello = HostBody::Hello {
        version: PROTOCOL_VERSION,
        client: format!("kiln-agent client {}", env!("CARGO_PKG_VERSION")),
    };
    loop {
        shared.send(guard.id, hello.clone()).await?;
        let wait_until = (Instant::now() + HELLO_INTERVAL).min(deadline);
        let reply = tokio::time::timeout_at(wait_until.into(), rx.recv()).await;
        match reply {
            Ok(Some(GuestBody::HelloOk {
                version,
                agent_version,
                kernel,
                uptime_ms,
            })) => {
                if version != PROTOCOL_VERSION {
                    return Err(AgentError::Handshake(format!(
                        "the guest speaks protocol version {version}, this host {PROTOCOL_VERSION}"
                    )));
                }
                return Ok(HelloInfo {
                    version,
                    agent_version,
                    kernel,
                    uptime: Duration::from_millis(uptime_ms),
                });
            }
            Ok(Some(GuestBody::Error { message })) => return Err(AgentError::Handshake(message)),
            Ok(Some(other)) => return Err(unexpected("hello", &other)),
            Ok(None) => return Err(AgentError::ConnectionClosed),
            Err(_) if Instant::now() >= deadline => {
                return Err(AgentError::HandshakeTimeout {
                    path: shared.path.clone(),
                    timeout,
                })
            }
            Err(_) => {}
        }
    }
}

/// A starting id unlikely to match one a previous host used: after a restore, frames
/// for that host's requests may still arrive and must not be taken for replies.
fn first_id() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    // Keep well below u64::MAX (and exactly representable in JSON doubles, for other hosts).
    ((nanos ^ u64::from(std::process::id()).rotate_left(32)) & ((1 << 52) - 1)) | 1
}

fn millis(duration: Duration) -> u64 {
    duration.as_millis().try_into().unwrap_or(u64::MAX)
}

fn copy_stats(operation: &str, reply: GuestBody) -> Result<CopyStats, AgentError> {
    match reply {
        GuestBody::Copied { entries, bytes } => Ok(CopyStats { entries, bytes }),
        other => Err(unexpected(operation, &other)),
    }
}

fn app_state(operation: &str, reply: GuestBody) -> Result<AppState, AgentError> {
    match reply {
        GuestBody::AppState {
            running,
            pid,
            exit_code,
            signal,
        } => Ok(AppState {
            running,
            pid,
            exit_code,
            signal,
        }),
        other => Err(unexpected(operation, &other)),
    }
}

/// A file request's reply, its `FsFailed` turned into [`AgentError::Fs`].
fn fs_result(reply: GuestBody) -> Result<GuestBody, AgentError> {
    match reply {
        GuestBody::FsFailed { kind, message } => Err(AgentError::Fs { kind, message }),
        other => Ok(other),
    }
}

fn unexpected(operation: &str, body: &GuestBody) -> AgentError {
    AgentError::Protocol(format!("unexpected reply to {operation}: {body:?}"))
}

//! The framed, versioned protocol spoken between the host and the guest agent.
//!
//! A frame is `b"KILN"`, a big-endian `u32` payload length, then the payload: the
//! JSON encoding of one [`HostMessage`] (host → guest) or [`GuestMessage`]
//! (guest → host). Binary fields travel as base64 strings.
//!
//! The decoder resynchronises on the magic: the host may vanish mid-frame and a new
//! host connect after a VM restore, so whatever precedes the next `KILN` is skipped.
//! A false magic inside a JSON payload cannot pass for a header: JSON text holds no
//! byte below 0x20, so its "length" would be at least 0x2020_2020, far above
//! [`MAX_PAYLOAD`], and the decoder moves on.

use serde::{Deserialize, Serialize};

/// The four bytes that open every frame.
pub const MAGIC: [u8; 4] = *b"KILN";
/// Size of a frame header: magic plus length.
pub const HEADER_LEN: usize = 8;
/// Largest payload a frame may carry.
pub const MAX_PAYLOAD: usize = 16 * 1024 * 1024;
/// Version of this protocol; bumped on any incompatible change.
pub const PROTOCOL_VERSION: u32 = 1;
/// Largest chunk of process output carried by one [`GuestBody::Output`] frame.
pub const MAX_OUTPUT_CHUNK: usize = 64 * 1024;
/// Largest file content one frame can carry once base64-encoded, with room for the JSON around it.
pub const MAX_FILE_BYTES: usize = MAX_PAYLOAD / 4 * 3 - 64 * 1024;
/// Largest HTTP response body [`HostBody::HttpRequest`] returns; the rest is cut off.
pub const MAX_HTTP_BODY: usize = 1024 * 1024;
/// Largest piece of a file one `ReadRange` or `WriteRange` carries.
pub const MAX_RANGE_BYTES: usize = 1024 * 1024;
/// Most entries one `ListDir` answer carries.
pub const MAX_DIR_ENTRIES: u32 = 10_000;
/// PATH given to an exec whose environment names none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A message from the host to the guest: a request and its id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostMessage {
    /// Chosen by the host; every reply and event for this request carries it.
    pub id: u64,
    /// What the host asks for.
    pub body: HostBody,
}

/// The requests the host can make.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum HostBody {
    /// Opens a session; answered by [`GuestBody::HelloOk`] or an error.
    Hello {
        /// The protocol version the host speaks.
        version: u32,
        /// Free-form name of the host software, for the guest's log.
        #[serde(default)]
        client: String,
    },
    /// Liveness check; answered by [`GuestBody::Pong`].
    Ping,
    /// Runs a process; answered by `ExecStarted`, `Output`… then `Exited`.
    Exec(ExecSpec),
    /// Writes to the terminal of a running exec started with a `tty`.
    ExecInput {
        /// The id of the `Exec` request.
        exec_id: u64,
        /// The bytes, as typed.
        #[serde(with = "b64")]
        data: Vec<u8>,
    },
    /// Resizes the terminal of a running exec started with a `tty`.
    ExecResize {
        /// The id of the `Exec` request.
        exec_id: u64,
        /// The new size.
        size: TtySize,
    },
    /// Sends a signal to the process group of a running exec.
    Signal {
        /// The id of the `Exec` request.
        exec_id: u64,
        /// The signal number.
        signal: i32,
    },
    /// Writes a file atomically (temp file + rename), creating parent directories.
    WriteFile {
        /// Absolute path in the guest.
        path: String,
        /// The content.
        #[serde(with = "b64")]
        data: Vec<u8>,
        /// Permission bits.
        mode: u32,
        /// Owner, unchanged when absent.
        #[serde(default)]
        uid: Option<u32>,
        /// Group, unchanged when absent.
        #[serde(default)]
        gid: Option<u32>,
    },
    /// Reads a file; answered by [`GuestBody::FileData`], or an error when it exceeds `max_bytes`.
    ReadFile {
        /// Absolute path in the guest.
        path: String,
        /// Largest content accepted.
        max_bytes: u64,
    },
    /// Sets CLOCK_REALTIME.
    SetClock {
        /// Nanoseconds since the Unix epoch.
        unix_nanos: u64,
    },
    /// Mixes host entropy into the kernel RNG, credits it, and reseeds the CRNG.
    AddEntropy {
        /// Random bytes from the host.
        #[serde(with = "b64")]
        bytes: Vec<u8>,
    },
    /// Gives a guest restored from a shared snapshot an identity of its own: its hostname,
    /// and `/etc/machine-id` rewritten when the image has that file. Answered by `Ok`.
    SetIdentity {
        /// The new hostname: 1–64 of `a-z`, `0-9`, `-` and `.`.
        hostname: String,
        /// 32 lowercase hex digits.
        machine_id: String,
    },
    /// Flushes file systems, optionally dropping the page cache.
    Sync {
        /// Also write 3 to /proc/sys/vm/drop_caches.
        drop_caches: bool,
    },
    /// Syncs then powers the VM off; answered by `Ok` before it happens.
    PowerOff,
    /// Mounts a file system, creating the target directory; answered by `Ok`.
    Mount {
        /// Device, directory (for `bind`) or a name for virtual file systems.
        source: String,
        /// Absolute mount point.
        target: String,
        /// File system type (`ext4`, `tmpfs`, …; ignored for `bind`).
        fstype: String,
        /// Options as for mount(8): flags (`ro`, `bind`, `noexec`, …) and `key=value` data.
        #[serde(default)]
        options: Vec<String>,
    },
    /// Unmounts a file system; answered by `Ok`.
    Unmount {
        /// The mount point.
        target: String,
    },
    /// Copies files inside the guest with Docker `COPY` semantics; answered by `Copied`.
    Copy(CopySpec),
    /// Unpacks a local tar (plain, gzip, bzip2 or xz) like Docker `ADD`; answered by `Copied`.
    ExtractArchive {
        /// Absolute path of the archive in the guest.
        src: String,
        /// Absolute directory to unpack into, created when missing.
        dest: String,
        /// Owner of every entry; the archive's owners when absent.
        #[serde(default)]
        uid: Option<u32>,
        /// Group of every entry; the archive's groups when absent.
        #[serde(default)]
        gid: Option<u32>,
    },
    /// Resolves `name[:group]` or `uid[:gid]` with the guest's /etc/passwd and /etc/group;
    /// answered by `User`.
    LookupUser {
        /// The user spec, as in Docker's `USER`.
        spec: String,
    },
    /// Starts the app, supervised by the agent; answered by `AppStarted`.
    StartApp(AppSpec),
    /// Asks how the app is doing; answered by `AppState`.
    AppStatus,
    /// Signals the app's process group, then kills it after a grace period; answered by
    /// `AppState` once it exited.
    StopApp {
        /// Signal sent first, SIGTERM when absent.
        #[serde(default)]
        signal: Option<i32>,
        /// Time allowed between that signal and SIGKILL, 10 s when absent.
        #[serde(default)]
        grace_ms: Option<u64>,
    },
    /// Tries a TCP connection to 127.0.0.1:`port` in the guest; answered by `TcpProbe`.
    ProbeTcp {
        /// The port.
        port: u16,
        /// Connect timeout.
        timeout_ms: u64,
    },
    /// Walks the guest's process and TCP paths once (a new process makes one HTTP exchange
    /// with a listener the agent opens on the guest's loopback; the app is not involved), so
    /// that a restored VM's first request does not pay for their first translation; answered
    /// by `Ok`, or an error.
    Warm {
        /// Limit for the whole walk.
        timeout_ms: u64,
    },
    /// Makes an HTTP/1.1 request to 127.0.0.1 in the guest; answered by `HttpResponse`,
    /// or by `HttpFailed` when no response could be had.
    HttpRequest(HttpRequestSpec),
    /// Removes a file, a symbolic link or an empty directory; answered by `Ok` (also when
    /// nothing is there) or an error (a directory that is not empty stays).
    RemovePath {
        /// Absolute path in the guest.
        path: String,
    },
    /// Asks whether a path exists (without following a final symbolic link); answered by
    /// `Exists`.
    PathExists {
        /// Absolute path in the guest.
        path: String,
    },
    /// Downloads a URL inside the guest (over the guest's own network) into a file, as
    /// Docker's `ADD <url>`; answered by `Fetched`.
    Fetch(FetchSpec),
    /// Describes one path (a final symbolic link is not followed); answered by `Stat`, or
    /// by `FsFailed`.
    StatPath {
        /// Absolute path in the guest.
        path: String,
    },
    /// Lists a directory, sorted by name; answered by `DirListing`, or by `FsFailed`.
    ListDir {
        /// Absolute path of the directory.
        path: String,
        /// Most entries returned (at most [`MAX_DIR_ENTRIES`]); the listing says when more exist.
        max_entries: u32,
    },
    /// Creates a directory; answered by `Ok`, or by `FsFailed`.
    MakeDir {
        /// Absolute path of the directory.
        path: String,
        /// Create missing parents too, and accept a directory that already exists.
        parents: bool,
        /// Permission bits.
        mode: u32,
        /// Owner of what is created, root when absent.
        #[serde(default)]
        uid: Option<u32>,
        /// Group of what is created, root when absent.
        #[serde(default)]
        gid: Option<u32>,
    },
    /// Renames a path (within one file system); answered by `Ok`, or by `FsFailed`.
    MovePath {
        /// Absolute source path.
        from: String,
        /// Absolute destination path; an existing file there is replaced.
        to: String,
    },
    /// Removes a path, a directory with everything under it; answered by `Ok`, or by
    /// `FsFailed` (`not_found` when nothing is there).
    RemoveTree {
        /// Absolute path in the guest.
        path: String,
    },
    /// Reads part of a regular file; answered by `FileChunk`, or by `FsFailed`.
    ReadRange {
        /// Absolute path of the file.
        path: String,
        /// Where to start.
        offset: u64,
        /// Most bytes returned (at most [`MAX_RANGE_BYTES`]).
        len: u32,
    },
    /// Writes part of a regular file; answered by `Ok`, or by `FsFailed`. Pieces are
    /// written in order, so a large file travels in many frames and is never whole in memory.
    WriteRange {
        /// Absolute path of the file.
        path: String,
        /// Where to write `data`.
        offset: u64,
        /// The bytes (at most [`MAX_RANGE_BYTES`]).
        #[serde(with = "b64")]
        data: Vec<u8>,
        /// Create the file (and missing parent directories), emptying one that exists.
        create: bool,
        /// Permission bits of a created file.
        mode: u32,
        /// Owner of what is created, root when absent.
        #[serde(default)]
        uid: Option<u32>,
        /// Group of what is created, root when absent.
        #[serde(default)]
        gid: Option<u32>,
    },
    /// Sets how many vCPUs the guest has online: cpu0 and then the lowest-numbered others,
    /// the rest taken offline; answered by `Cpus`, or by `Error` for a count outside
    /// 1..=present. Added within version 1: an older agent answers an `Error`, and the host
    /// then treats the guest as one of fixed size.
    SetOnlineCpus {
        /// vCPUs to have online.
        count: u32,
    },
    /// How many vCPUs are online and present; answered by `Cpus`.
    CpuStatus,
    /// The guest's memory as its kernel counts it (`/proc/meminfo`); answered by `Memory`.
    /// Added within version 1: an older agent answers an `Error`, and the host then leaves
    /// the guest's memory as it is.
    MemoryStatus,
}

/// What [`HostBody::Fetch`] downloads, and where.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchSpec {
    /// `http://` (fetched by the agent itself) or `https://` (fetched with the guest's own
    /// `curl` or `wget`, which check certificates).
    pub url: String,
    /// Absolute destination file; parent directories are created.
    pub dest: String,
    /// Permission bits of the file.
    pub mode: u32,
    /// Owner, root when absent.
    #[serde(default)]
    pub uid: Option<u32>,
    /// Group, root when absent.
    #[serde(default)]
    pub gid: Option<u32>,
    /// The expected SHA-256 (lower-case hex); a mismatch fails and leaves no file.
    #[serde(default)]
    pub sha256: Option<String>,
    /// Environment for `curl`/`wget` (CA bundle variables, proxies) as `KEY=VALUE`.
    #[serde(default)]
    pub env: Vec<String>,
    /// Limit for the whole download.
    pub timeout_ms: u64,
}

/// What [`HostBody::Copy`] copies, and how.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopySpec {
    /// Absolute source; a file, a directory (its contents are copied), or a pattern
    /// with `*`, `?` or `[…]` in its last component.
    pub src: String,
    /// Absolute destination; a directory when it ends in `/` or already is one.
    pub dest: String,
    /// Owner of everything copied, root when absent.
    #[serde(default)]
    pub uid: Option<u32>,
    /// Group of everything copied, root when absent.
    #[serde(default)]
    pub gid: Option<u32>,
    /// Permission bits for everything copied (`--chmod`); the source's when absent.
    #[serde(default)]
    pub mode: Option<u32>,
}

/// The app the agent supervises.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppSpec {
    /// Program and arguments; the program is looked up in the app's PATH.
    pub argv: Vec<String>,
    /// The whole environment as `KEY=VALUE`; [`DEFAULT_PATH`] is added when PATH is absent.
    #[serde(default)]
    pub env: Vec<String>,
    /// Working directory, `/` when absent.
    #[serde(default)]
    pub cwd: Option<String>,
    /// User to run as, the agent's when absent.
    #[serde(default)]
    pub uid: Option<u32>,
    /// Group to run as, the agent's when absent.
    #[serde(default)]
    pub gid: Option<u32>,
}

/// An HTTP request to an app listening on the guest's loopback.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpRequestSpec {
    /// Method, such as `GET` or `POST`.
    pub method: String,
    /// Port on 127.0.0.1.
    pub port: u16,
    /// Request target, starting with `/`.
    pub path: String,
    /// Extra headers; `Host`, `Content-Length` and `Connection` are set by the agent.
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    /// Request body.
    #[serde(default, with = "b64")]
    pub body: Vec<u8>,
    /// Limit for the whole exchange.
    pub timeout_ms: u64,
}

/// Why an HTTP request got no response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HttpFailureKind {
    /// Nothing listens on the port (yet): the connection was refused.
    Refused,
    /// The connection or the response did not complete in time.
    TimedOut,
    /// The connection was reset or closed before a complete response.
    Closed,
    /// The peer answered something that is not HTTP/1.x.
    Malformed,
}

/// How to run a process in the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecSpec {
    /// Program and arguments; the program is looked up in the exec's PATH.
    pub argv: Vec<String>,
    /// The whole environment as `KEY=VALUE`; [`DEFAULT_PATH`] is added when PATH is absent.
    #[serde(default)]
    pub env: Vec<String>,
    /// Working directory, `/` when absent.
    #[serde(default)]
    pub cwd: Option<String>,
    /// User to run as, the agent's when absent.
    #[serde(default)]
    pub uid: Option<u32>,
    /// Group to run as, the agent's when absent.
    #[serde(default)]
    pub gid: Option<u32>,
    /// Bytes written to stdin, which is then closed; stdin is /dev/null when absent.
    #[serde(default, with = "b64_opt")]
    pub stdin: Option<Vec<u8>>,
    /// Kill the process group with SIGKILL after this long.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Run on a new pseudo-terminal of this size (an interactive shell): stdin, stdout and
    /// stderr are the terminal, input arrives in `ExecInput`, output is all `Stdout`.
    #[serde(default)]
    pub tty: Option<TtySize>,
    /// Run in a network namespace of its own that holds only a loopback device
    /// (Dockerfile `RUN --network=none`).
    #[serde(default)]
    pub no_network: bool,
}

/// A terminal's size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TtySize {
    /// Columns.
    pub cols: u16,
    /// Rows.
    pub rows: u16,
}

/// A message from the guest to the host: a reply or event for request `id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestMessage {
    /// The id of the request this answers; 0 when the request could not be read.
    pub id: u64,
    /// The reply or event.
    pub body: GuestBody,
}

/// The replies and events the guest sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum GuestBody {
    /// Handshake accepted.
    HelloOk {
        /// The protocol version the guest speaks.
        version: u32,
        /// Version of kiln-init.
        agent_version: String,
        /// The guest kernel's release.
        kernel: String,
        /// Milliseconds since the guest kernel booted.
        uptime_ms: u64,
    },
    /// Answer to `Ping`.
    Pong,
    /// The request succeeded.
    Ok,
    /// The request failed.
    Error {
        /// What failed, on what, and why.
        message: String,
    },
    /// The exec's process was spawned.
    ExecStarted {
        /// Its pid (also its process group id).
        pid: u32,
    },
    /// A chunk of the exec's output, at most [`MAX_OUTPUT_CHUNK`] bytes.
    Output {
        /// Which stream it came from.
        stream: OutputStream,
        /// The bytes.
        #[serde(with = "b64")]
        data: Vec<u8>,
    },
    /// The exec finished and its output streams reached their end.
    Exited {
        /// Exit code when it exited normally.
        code: Option<i32>,
        /// Signal number when a signal killed it.
        signal: Option<i32>,
        /// Whether the agent killed it because its timeout expired.
        timed_out: bool,
    },
    /// Content of a file.
    FileData {
        /// The bytes.
        #[serde(with = "b64")]
        data: Vec<u8>,
    },
    /// A copy or an archive extraction finished.
    Copied {
        /// Files, directories and links written.
        entries: u64,
        /// Bytes of file content written.
        bytes: u64,
    },
    /// A resolved user.
    User {
        /// User id.
        uid: u32,
        /// Group id.
        gid: u32,
        /// Home directory (`/` when the user has no passwd entry).
        home: String,
    },
    /// The app was spawned.
    AppStarted {
        /// Its pid (also its process group id).
        pid: u32,
    },
    /// How the app is doing.
    AppState {
        /// Whether it is running.
        running: bool,
        /// Its pid, absent when no app was ever started.
        pid: Option<u32>,
        /// Exit code once it exited normally.
        exit_code: Option<i32>,
        /// Signal number once a signal killed it.
        signal: Option<i32>,
    },
    /// Result of a TCP probe.
    TcpProbe {
        /// Whether the connection was accepted.
        open: bool,
    },
    /// An HTTP response.
    HttpResponse {
        /// Status code.
        status: u16,
        /// Headers in the order received.
        headers: Vec<(String, String)>,
        /// Body, decoded from chunked encoding, at most [`MAX_HTTP_BODY`] bytes.
        #[serde(with = "b64")]
        body: Vec<u8>,
        /// Whether the body was longer than [`MAX_HTTP_BODY`] and cut off.
        truncated: bool,
    },
    /// Whether a path exists.
    Exists {
        /// It does.
        exists: bool,
    },
    /// A download finished.
    Fetched {
        /// Bytes written.
        bytes: u64,
        /// SHA-256 of the content (lower-case hex).
        sha256: String,
        /// The `Last-Modified` time as seconds since the epoch, when the server sent one
        /// (the file's mtime is set to it).
        #[serde(default)]
        mtime: Option<i64>,
    },
    /// An HTTP request got no response.
    HttpFailed {
        /// What went wrong, for the host to decide on a retry.
        kind: HttpFailureKind,
        /// What failed, on what, and why.
        message: String,
    },
    /// What a path is.
    Stat(FileStat),
    /// A directory's entries.
    DirListing {
        /// The entries, sorted by name.
        entries: Vec<FileStat>,
        /// Whether the directory holds more entries than were returned.
        truncated: bool,
    },
    /// Part of a file.
    FileChunk {
        /// The bytes.
        #[serde(with = "b64")]
        data: Vec<u8>,
        /// Whether the file ends after them.
        eof: bool,
    },
    /// A file system request failed.
    FsFailed {
        /// Why, for the host to pick an answer (not found, conflict, …).
        kind: FsErrorKind,
        /// What failed, on what, and why.
        message: String,
    },
    /// The guest's vCPUs now.
    Cpus {
        /// How many are online.
        online: u32,
        /// How many exist (online or not): the most it can have online.
        present: u32,
    },
    /// The guest's memory now, KiB.
    Memory {
        /// All the memory its kernel manages (`MemTotal`: baseline and what is plugged).
        total_kib: u64,
        /// What it could give to new work without swapping (`MemAvailable`).
        available_kib: u64,
    },
}

/// What a path in the guest is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStat {
    /// Its last component (`/` for the root).
    pub name: String,
    /// File, directory, symbolic link or something else.
    pub kind: FileKind,
    /// Size in bytes.
    pub size: u64,
    /// Permission bits (`0o7777` at most).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Last modification, seconds since the epoch.
    pub mtime: i64,
    /// Where a symbolic link points.
    #[serde(default)]
    pub link_target: Option<String>,
}

/// The kinds of path [`FileStat`] tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
    /// A device, socket or pipe.
    Other,
}

/// Why a file system request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FsErrorKind {
    /// The path (or a parent) does not exist.
    NotFound,
    /// Something is already there.
    AlreadyExists,
    /// The request needs a directory and the path is not one (or the reverse).
    WrongKind,
    /// The guest refused the access.
    PermissionDenied,
    /// The request itself is wrong (relative path, too large a range).
    Invalid,
    /// Anything else (I/O error, full disk).
    Other,
}

/// Which output stream of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// Failures to encode or decode a frame.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// frame payload of {0} bytes exceeds the limit of 16 MiB
    #[error("frame payload of {0} bytes exceeds the limit of {MAX_PAYLOAD} bytes")]
    Oversized(usize),
    /// frame payload is not a valid message
    #[error("frame payload is not a valid message: {0}")]
    Malformed(#[source] serde_json::Error),
    /// message could not be encoded
    #[error("message could not be encoded: {0}")]
    Encode(#[source] serde_json::Error),
}

/// Encodes one message as a complete frame (header and payload).
pub fn encode_frame<T: Serialize>(message: &T) -> Result<Vec<u8>, FrameError> {
    let mut frame = Vec::with_capacity(256);
    frame.extend_from_slice(&MAGIC);
    frame.extend_from_slice(&[0; 4]);
    serde_json::to_writer(&mut frame, message).map_err(FrameError::Encode)?;
    let len = frame.len() - HEADER_LEN;
    if len > MAX_PAYLOAD {
        return Err(FrameError::Oversized(len));
    }
    // The length fits in u32: it is at most MAX_PAYLOAD.
    frame[4..8].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(frame)
}

/// Parses a frame payload into a message.
pub fn decode_payload<T: for<'de> Deserialize<'de>>(payload: &[u8]) -> Result<T, FrameError> {
    serde_json::from_slice(payload).map_err(FrameError::Malformed)
}

/// The `id` of a payload that failed to parse as a message, when one can be found.
pub fn payload_id(payload: &[u8]) -> Option<u64> {
    let value: serde_json::Value = serde_json::from_slice(payload).ok()?;
    value.get("id")?.as_u64()
}

/// Splits a byte stream into frame payloads, skipping garbage between frames.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    start: usize,
    skipped: u64,
}

impl FrameDecoder {
    /// A decoder with an empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes read from the transport.
    pub fn push(&mut self, data: &[u8]) {
        if self.start > 0 && self.start >= self.buf.len() / 2 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// Forgets buffered bytes; call it when the transport reads EOF.
    pub fn reset(&mut self) {
        self.buf.clear();
        self.start = 0;
    }

    /// Total bytes skipped while looking for a frame.
    pub fn skipped_bytes(&self) -> u64 {
        self.skipped
    }

    /// The next complete payload, an error for a frame that cannot be accepted, or
    /// `None` when more bytes are needed.
    pub fn next_frame(&mut self) -> Option<Result<Vec<u8>, FrameError>> {
        loop {
            let pending = &self.buf[self.start..];
            match find_magic(pending) {
                Some(0) => {}
                Some(offset) => {
                    self.skip(offset);
                    continue;
                }
                None => {
                    // Keep a tail that may be the start of a magic split across reads.
                    let keep = magic_prefix_len(pending);
                    self.skip(pending.len() - keep);
                    return None;
                }
            }
            let pending = &self.buf[self.start..];
            if pending.len() < HEADER_LEN {
                return None;
            }
            let len = u32::from_be_bytes([pending[4], pending[5], pending[6], pending[7]]) as usize;
            if len > MAX_PAYLOAD {
                // Skip only the magic: the real next frame may start inside this "header".
                self.skip(MAGIC.len());
                return Some(Err(FrameError::Oversized(len)));
            }
            if pending.len() < HEADER_LEN + len {
                return None;
            }
            let payload = pending[HEADER_LEN..HEADER_LEN + len].to_vec();
            self.start += HEADER_LEN + len;
            return Some(Ok(payload));
        }
    }

    fn skip(&mut self, n: usize) {
        self.start += n;
        self.skipped += n as u64;
        if self.start == self.buf.len() {
            self.reset();
        }
    }
}

fn find_magic(data: &[u8]) -> Option<usize> {
    data.windows(MAGIC.len()).position(|w| w == MAGIC)
}

/// Length of the longest suffix of `data` that is a proper prefix of the magic.
fn magic_prefix_len(data: &[u8]) -> usize {
    (1..MAGIC.len())
        .rev()
        .find(|&n| data.len() >= n && data[data.len() - n..] == MAGIC[..n])
        .unwrap_or(0)
}

/// Serde adapter: `Vec<u8>` as a base64 string.
mod b64 {
    use base64::{engine::general_purpose::STANDARD, Engine};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(data: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(data))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        STANDARD
            .decode(text.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}

/// Serde adapter: `Option<Vec<u8>>` as an optional base64 string.
mod b64_opt {
    use base64::{engine::general_purpose::STANDARD, Engine};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(data: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match data {
            Some(bytes) => s.serialize_some(&STANDARD.encode(bytes)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        let text = <Option<std::borrow::Cow<'de, str>>>::deserialize(d)?;
        text.map(|t| STANDARD.decode(t.as_bytes()))
            .transpose()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exec_message() -> HostMessage {
        HostMessage {
            id: 7,
            body: HostBody::Exec(ExecSpec {
                argv: vec!["sh".into(), "-c".into(), "cat".into()],
                env: vec!["A=1".into()],
                cwd: Some("/tmp".into()),
                uid: Some(1000),
                gid: None,
                stdin: Some(vec![0, 1, 2, 255]),
                timeout_ms: Some(500),
                tty: None,
                no_network: true,
            }),
        }
    }

    #[test]
    fn decode_when_exec_from_an_older_host_then_network_stays_on() {
        let json = br#"{"id":1,"body":{"type":"exec","argv":["true"]}}"#;

        let message: HostMessage = decode_payload(json).expect("decodes");

        let HostBody::Exec(spec) = message.body else {
            panic!("not an exec: {message:?}");
        };
        assert!(!spec.no_network);
    }

    fn decode_all(decoder: &mut FrameDecoder) -> Vec<Result<Vec<u8>, FrameError>> {
        std::iter::from_fn(|| decoder.next_frame()).collect()
    }

    #[test]
    fn host_message_when_encoded_and_decoded_then_equal() {
        let message = exec_message();
        let frame = encode_frame(&message).expect("encode");
        let mut decoder = FrameDecoder::new();

        decoder.push(&frame);
        let payload = decoder.next_frame().expect("frame").expect("valid frame");

        assert_eq!(
            decode_payload::<HostMessage>(&payload).expect("decode"),
            message
        );
    }

    #[test]
    fn guest_output_when_encoded_then_data_is_base64_text() {
        let message = GuestMessage {
            id: 3,
            body: GuestBody::Output {
                stream: OutputStream::Stderr,
                data: b"hi".to_vec(),
            },
        };

        let frame = encode_frame(&message).expect("encode");

        let json = std::str::from_utf8(&frame[HEADER_LEN..]).expect("utf8");
        assert_eq!(
            json,
            r#"{"id":3,"body":{"type":"output","stream":"stderr","data":"aGk="}}"#
        );
    }

    #[test]
    fn frame_when_split_byte_by_byte_then_decoded_once_complete() {
        let message = exec_message();
        let frame = encode_frame(&message).expect("encode");
        let mut decoder = FrameDecoder::new();

        let mut results = Vec::new();
        for byte in &frame {
            decoder.push(std::slice::from_ref(byte));
            results.extend(decode_all(&mut decoder));
        }

        assert_eq!(results.len(), 1);
        assert_eq!(results[0].as_ref().expect("valid"), &frame[HEADER_LEN..]);
    }

    #[test]
    fn garbage_before_frame_when_decoded_then_skipped() {
        let frame = encode_frame(&HostMessage {
            id: 1,
            body: HostBody::Ping,
        })
        .expect("encode");
        let mut decoder = FrameDecoder::new();
        let garbage = b"\x00\xffKIL half a frame{\"id\":KI";

        decoder.push(garbage);
        decoder.push(&frame);
        let frames = decode_all(&mut decoder);

        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].as_ref().expect("valid"), &frame[HEADER_LEN..]);
        assert_eq!(decoder.skipped_bytes(), garbage.len() as u64);
    }

    #[test]
    fn truncated_frame_when_followed_by_new_frame_then_new_frame_decoded() {
        let first = encode_frame(&exec_message()).expect("encode");
        let second = encode_frame(&HostMessage {
            id: 2,
            body: HostBody::Ping,
        })
        .expect("encode");
        let mut decoder = FrameDecoder::new();

        // The payload of the cut frame holds the magic only inside JSON text.
        decoder.push(&first[..HEADER_LEN]);
        decoder.reset();
        decoder.push(&first[HEADER_LEN..HEADER_LEN + 20]);
        decoder.push(b"\"KILN\"xxxx");
        decoder.push(&second);
        let frames = decode_all(&mut decoder);

        let valid: Vec<_> = frames.into_iter().filter_map(Result::ok).collect();
        assert_eq!(valid, vec![second[HEADER_LEN..].to_vec()]);
    }

    #[test]
    fn oversized_length_when_decoded_then_error_and_next_frame_still_decoded() {
        let good = encode_frame(&HostMessage {
            id: 9,
            body: HostBody::Ping,
        })
        .expect("encode");
        let mut decoder = FrameDecoder::new();
        let mut bad = MAGIC.to_vec();
        bad.extend_from_slice(&(MAX_PAYLOAD as u32 + 1).to_be_bytes());

        decoder.push(&bad);
        decoder.push(&good);
        let frames = decode_all(&mut decoder);

        assert_eq!(frames.len(), 2);
        assert!(matches!(frames[0], Err(FrameError::Oversized(n)) if n == MAX_PAYLOAD + 1));
        assert_eq!(frames[1].as_ref().expect("valid"), &good[HEADER_LEN..]);
    }

    #[test]
    fn malformed_json_when_parsed_then_error_with_recoverable_id() {
        let payload = br#"{"id":42,"body":{"type":"no_such_request"}}"#;

        let result = decode_payload::<HostMessage>(payload);

        assert!(matches!(result, Err(FrameError::Malformed(_))));
        assert_eq!(payload_id(payload), Some(42));
    }

    #[test]
    fn invalid_json_when_parsed_then_error_without_id() {
        let payload = b"{not json";

        let result = decode_payload::<HostMessage>(payload);

        assert!(matches!(result, Err(FrameError::Malformed(_))));
        assert_eq!(payload_id(payload), None);
    }

    #[test]
    fn message_larger_than_limit_when_encoded_then_oversized_error() {
        let message = HostMessage {
            id: 1,
            body: HostBody::AddEntropy {
                bytes: vec![0; MAX_PAYLOAD],
            },
        };

        let result = encode_frame(&message);

        assert!(matches!(result, Err(FrameError::Oversized(_))));
    }

    #[test]
    fn file_chunk_when_data_is_not_base64_then_malformed() {
        let payload =
            br#"{"id":4,"body":{"type":"file_chunk","data":"!!not base64!!","eof":true}}"#;

        let result = decode_payload::<GuestMessage>(payload);

        assert!(matches!(result, Err(FrameError::Malformed(_))));
    }

    #[test]
    fn fs_failed_when_encoded_then_kind_is_snake_case() {
        let message = GuestMessage {
            id: 2,
            body: GuestBody::FsFailed {
                kind: FsErrorKind::NotFound,
                message: "cannot stat /x".into(),
            },
        };

        let frame = encode_frame(&message).expect("encode");

        let json = std::str::from_utf8(&frame[HEADER_LEN..]).expect("utf8");
        assert_eq!(
            json,
            r#"{"id":2,"body":{"type":"fs_failed","kind":"not_found","message":"cannot stat /x"}}"#
        );
    }

    #[test]
    fn largest_write_range_when_encoded_then_fits_in_a_frame() {
        let message = HostMessage {
            id: u64::MAX,
            body: HostBody::WriteRange {
                path: format!("/{}", "a".repeat(4096)),
                offset: u64::MAX,
                data: vec![0xff; MAX_RANGE_BYTES],
                create: true,
                mode: 0o7777,
                uid: Some(u32::MAX),
                gid: Some(u32::MAX),
            },
        };

        let frame = encode_frame(&message);

        assert!(frame.is_ok());
    }

    #[test]
    fn exec_without_optional_fields_when_parsed_then_defaults() {
        let payload = br#"{"id":5,"body":{"type":"exec","argv":["true"]}}"#;

        let message = decode_payload::<HostMessage>(payload).expect("decode");

        assert_eq!(
            message.body,
            HostBody::Exec(ExecSpec {
                argv: vec!["true".into()],
                ..ExecSpec::default()
            })
        );
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        /// Bytes that cannot hold the frame magic (no `K`).
        fn garbage() -> impl Strategy<Value = Vec<u8>> {
            proptest::collection::vec(any::<u8>().prop_filter("no K", |b| *b != b'K'), 0..64)
        }

        proptest! {
            #[test]
            fn decoder_when_fed_arbitrary_bytes_in_arbitrary_chunks_then_never_panics_and_stays_bounded(
                chunks in proptest::collection::vec(
                    proptest::collection::vec(
                        prop_oneof![Just(b'K'), Just(b'I'), Just(b'L'), Just(b'N'), any::<u8>()],
                        0..512,
                    ),
                    0..32,
                ),
            ) {
                let mut decoder = FrameDecoder::new();
                for chunk in &chunks {
                    decoder.push(chunk);
                    while let Some(frame) = decoder.next_frame() {
                        if let Ok(payload) = frame {
                            prop_assert!(payload.len() <= MAX_PAYLOAD);
                        }
                    }
                    // What waits for more bytes is at most one frame and its header.
                    prop_assert!(decoder.buf.len() - decoder.start <= HEADER_LEN + MAX_PAYLOAD);
                }
            }

            #[test]
            fn file_requests_when_encoded_and_decoded_then_equal(
                path in "/[a-z0-9/._ -]{0,40}",
                offset in any::<u64>(),
                data in proptest::collection::vec(any::<u8>(), 0..2048),
                create in any::<bool>(),
                mode in 0u32..0o10000,
                owner in proptest::option::of((any::<u32>(), any::<u32>())),
                len in any::<u32>(),
            ) {
                let bodies = vec![
                    HostBody::WriteRange {
                        path: path.clone(),
                        offset,
                        data: data.clone(),
                        create,
                        mode,
                        uid: owner.map(|o| o.0),
                        gid: owner.map(|o| o.1),
                    },
                    HostBody::ReadRange { path: path.clone(), offset, len },
                    HostBody::StatPath { path: path.clone() },
                    HostBody::ListDir { path: path.clone(), max_entries: len },
                    HostBody::MakeDir {
                        path: path.clone(),
                        parents: create,
                        mode,
                        uid: owner.map(|o| o.0),
                        gid: None,
                    },
                    HostBody::MovePath { from: path.clone(), to: format!("{path}.new") },
                    HostBody::RemoveTree { path: path.clone() },
                ];
                for body in bodies {
                    let message = HostMessage { id: offset, body };
                    let frame = encode_frame(&message).expect("encode");
                    let mut decoder = FrameDecoder::new();
                    decoder.push(&frame);
                    let payload = decoder.next_frame().expect("frame").expect("valid");
                    prop_assert_eq!(decode_payload::<HostMessage>(&payload).expect("decode"), message);
                }
            }

            #[test]
            fn file_replies_when_encoded_and_decoded_then_equal(
                name in "[^/]{0,40}",
                size in any::<u64>(),
                mtime in any::<i64>(),
                link in proptest::option::of("[ -~]{0,60}"),
                data in proptest::collection::vec(any::<u8>(), 0..2048),
                eof in any::<bool>(),
                count in 0usize..20,
            ) {
                let stat = FileStat {
                    name,
                    kind: if link.is_some() { FileKind::Symlink } else { FileKind::File },
                    size,
                    mode: 0o644,
                    uid: 0,
                    gid: 0,
                    mtime,
                    link_target: link,
                };
                let bodies = vec![
                    GuestBody::Stat(stat.clone()),
                    GuestBody::DirListing { entries: vec![stat; count], truncated: eof },
                    GuestBody::FileChunk { data, eof },
                    GuestBody::FsFailed { kind: FsErrorKind::NotFound, message: "gone".into() },
                ];
                for body in bodies {
                    let message = GuestMessage { id: size, body };
                    let frame = encode_frame(&message).expect("encode");
                    let payload = &frame[HEADER_LEN..];
                    prop_assert_eq!(decode_payload::<GuestMessage>(payload).expect("decode"), message);
                }
            }

            #[test]
            fn file_payloads_when_mangled_then_decoding_fails_cleanly(
                base in proptest::collection::vec(any::<u8>(), 0..64),
                cut in 0usize..200,
            ) {
                // A hostile peer's half-written or garbled file frames: never a panic.
                let good = encode_frame(&GuestMessage {
                    id: 1,
                    body: GuestBody::FileChunk { data: base, eof: false },
                })
                .expect("encode");
                let payload = &good[HEADER_LEN..];
                let cut = cut.min(payload.len());
                let _ = decode_payload::<GuestMessage>(&payload[..cut]);
                let mut flipped = payload.to_vec();
                if let Some(b) = flipped.get_mut(cut) {
                    *b ^= 0x55;
                }
                let _ = decode_payload::<GuestMessage>(&flipped);
            }

            #[test]
            fn decoder_when_frames_sit_between_garbage_then_every_frame_is_recovered_in_order(
                ids in proptest::collection::vec(any::<u64>(), 1..8),
                noise in proptest::collection::vec(garbage(), 8),
                split in 1usize..97,
            ) {
                let mut stream = Vec::new();
                let mut want = Vec::new();
                for (i, id) in ids.iter().enumerate() {
                    stream.extend_from_slice(&noise[i]);
                    let frame = encode_frame(&HostMessage { id: *id, body: HostBody::Ping })
                        .expect("encode");
                    want.push(frame[HEADER_LEN..].to_vec());
                    stream.extend_from_slice(&frame);
                }
                let mut decoder = FrameDecoder::new();
                let mut got = Vec::new();
                for chunk in stream.chunks(split) {
                    decoder.push(chunk);
                    got.extend(std::iter::from_fn(|| decoder.next_frame()).filter_map(Result::ok));
                }

                prop_assert_eq!(got, want);
            }
        }
    }
}

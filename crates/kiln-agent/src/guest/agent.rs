//! The agent server: reads host requests from a byte transport and answers on it.
//!
//! The calling thread is the reader: it decodes frames and dispatches. Anything that can
//! take a while (execs, files, sync) runs on its own thread; every reply goes through one
//! [`ReplySink`], a writer behind a mutex, whose blocking writes are the backpressure.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use super::app::{AppPhase, AppSupervisor};
use super::{archive, copy, exec, files, http, mounts, ops, users, warm};
use crate::proto::{
    decode_payload, encode_frame, payload_id, FrameDecoder, FrameError, GuestBody, GuestMessage,
    HostBody, HostMessage, PROTOCOL_VERSION,
};

/// What the agent may do beyond serving requests that are harmless on a development host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentConfig {
    /// Allow SetClock, AddEntropy, Sync with drop_caches and PowerOff (only in the guest).
    pub guest_ops: bool,
}

/// What the reader does when the transport reads end-of-file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EofPolicy {
    /// The connection is over: return from `serve`.
    Return,
    /// No host is connected yet (a virtio-serial port): wait this long and read again.
    Retry(Duration),
}

/// The agent: configuration and the execs it runs, shared by every connection.
#[derive(Clone)]
pub struct Agent {
    config: AgentConfig,
    execs: Arc<ExecRegistry>,
    app: Arc<AppSupervisor>,
    next_session: Arc<AtomicU64>,
}

impl Agent {
    /// An agent; starts the process-wide reaper if it is not running yet.
    pub fn new(config: AgentConfig) -> Agent {
        super::children::ChildTable::global();
        Agent {
            config,
            execs: Arc::new(ExecRegistry::default()),
            app: Arc::new(AppSupervisor::default()),
            next_session: Arc::new(AtomicU64::new(1)),
        }
    }

    /// Serves requests read from `reader`, replying on `writer`, until EOF (per `on_eof`)
    /// or a read error that `on_eof` does not retry.
    pub fn serve<R: Read, W: Write + Send + 'static>(
        &self,
        mut reader: R,
        writer: W,
        on_eof: EofPolicy,
    ) -> io::Result<()> {
        let session = Session {
            id: self.next_session.fetch_add(1, Ordering::Relaxed),
            sink: ReplySink::new(writer),
        };
        let mut decoder = FrameDecoder::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut read_errors = 0u64;
        loop {
            match reader.read(&mut buf) {
                Ok(0) => {
                    decoder.reset();
                    match on_eof {
                        EofPolicy::Return => return Ok(()),
                        EofPolicy::Retry(pause) => std::thread::sleep(pause),
                    }
                }
                Ok(n) => {
                    decoder.push(&buf[..n]);
                    while let Some(frame) = decoder.next_frame() {
                        self.handle_frame(&session, frame);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => match on_eof {
                    EofPolicy::Return => return Err(e),
                    EofPolicy::Retry(pause) => {
                        if read_errors.is_power_of_two() {
                            crate::console!("read from the agent port failed ({e}); retrying");
                        }
                        read_errors += 1;
                        decoder.reset();
                        std::thread::sleep(pause);
                    }
                },
            }
        }
    }

    /// Sends `signal` to the process group of every running exec and of the app.
    pub fn signal_all(&self, signal: Signal) {
        let app = self.app.running_pgid();
        for pgid in self.execs.all_pgids().into_iter().chain(app) {
            let _ = killpg(Pid::from_raw(pgid), signal);
        }
    }

    fn handle_frame(&self, session: &Session, frame: Result<Vec<u8>, FrameError>) {
        let payload = match frame {
            Ok(payload) => payload,
            Err(e) => return session.sink.error(0, format!("bad frame: {e}")),
        };
        match decode_payload::<HostMessage>(&payload) {
            Ok(message) => self.dispatch(session, message),
            Err(e) => session.sink.error(
                payload_id(&payload).unwrap_or(0),
                format!("malformed request: {e}"),
            ),
        }
    }

    fn dispatch(&self, session: &Session, message: HostMessage) {
        let id = message.id;
        let sink = &session.sink;
        match message.body {
            HostBody::Hello { version, client } => {
                if version != PROTOCOL_VERSION {
                    return sink.error(
                        id,
                        format!(
                            "unsupported protocol version {version}: this agent speaks version {PROTOCOL_VERSION}"
                        ),
                    );
                }
                crate::console!("host connected ({client})");
                sink.reply(
                    id,
                    GuestBody::HelloOk {
                        version: PROTOCOL_VERSION,
                        agent_version: env!("CARGO_PKG_VERSION").to_string(),
                        kernel: ops::kernel_release(),
                        uptime_ms: super::uptime_ms(),
                    },
                );
            }
            HostBody::Ping => sink.reply(id, GuestBody::Pong),
            HostBody::Exec(spec) => {
                let job = exec::ExecJob {
                    id,
                    session: session.id,
                    spec,
                    sink: sink.clone(),
                    registry: self.execs.clone(),
                };
                self.in_background(sink, id, "exec", move || exec::run(job));
            }
            HostBody::ExecInput { exec_id, data } => {
                let result = self
                    .execs
                    .terminal(session.id, exec_id)
                    .and_then(|t| t.type_in(data));
                sink.result(id, result.map(|()| GuestBody::Ok));
            }
            HostBody::ExecResize { exec_id, size } => {
                let result = self
                    .execs
                    .terminal(session.id, exec_id)
                    .and_then(|t| t.resize(size));
                sink.result(id, result.map(|()| GuestBody::Ok));
            }
            HostBody::Signal { exec_id, signal } => {
                let result = Signal::try_from(signal)
                    .map_err(|e| format!("invalid signal {signal}: {e}"))
                    .and_then(|sig| {
                        let pgid = self
                            .execs
                            .find(session.id, exec_id)
                            .ok_or_else(|| format!("no running exec with id {exec_id}"))?;
                        killpg(Pid::from_raw(pgid), sig)
                            .map_err(|e| format!("cannot signal process group {pgid}: {e}"))
                    });
                sink.result(id, result.map(|()| GuestBody::Ok));
            }
            HostBody::WriteFile {
                path,
                data,
                mode,
                uid,
                gid,
            } => {
                let reply = sink.clone();
                self.in_background(sink, id, "write_file", move || {
                    let result = ops::write_file(&path, &data, mode, uid, gid);
                    reply.result(id, result.map(|()| GuestBody::Ok));
                });
            }
            HostBody::ReadFile { path, max_bytes } => {
                let reply = sink.clone();
                self.in_background(sink, id, "read_file", move || {
                    let result = ops::read_file(&path, max_bytes);
                    reply.result(id, result.map(|data| GuestBody::FileData { data }));
                });
            }
            HostBody::Sync { drop_caches } => {
                if drop_caches && !self.config.guest_ops {
                    return sink.error(id, guest_only("sync with drop_caches"));
                }
                let reply = sink.clone();
                self.in_background(sink, id, "sync", move || {
                    reply.result(id, ops::sync(drop_caches).map(|()| GuestBody::Ok));
                });
            }
            HostBody::SetClock { unix_nanos } => {
                if !self.config.guest_ops {
                    return sink.error(id, guest_only("set_clock"));
                }
                sink.result(id, ops::set_clock(unix_nanos).map(|()| GuestBody::Ok));
            }
            HostBody::AddEntropy { bytes } => {
                if !self.config.guest_ops {
                    return sink.error(id, guest_only("add_entropy"));
                }
                sink.result(id, ops::add_entropy(&bytes).map(|()| GuestBody::Ok));
            }
            HostBody::SetIdentity {
                hostname,
                machine_id,
            } => {
                if !self.config.guest_ops {
                    return sink.error(id, guest_only("set_identity"));
                }
                sink.result(
                    id,
                    ops::set_identity(
                        &hostname,
                        &machine_id,
                        std::path::Path::new(ops::MACHINE_ID),
                    )
                    .map(|()| GuestBody::Ok),
                );
            }
            HostBody::PowerOff => {
                if !self.config.guest_ops {
                    return sink.error(id, guest_only("power_off"));
                }
                crate::console!("power off requested by the host");
                sink.reply(id, GuestBody::Ok);
                let failure = ops::power_off();
                crate::console!("{failure}");
            }
            HostBody::Mount {
                source,
                target,
                fstype,
                options,
            } => {
                let reply = sink.clone();
                self.in_background(sink, id, "mount", move || {
                    let result = mounts::mount_fs(&source, &target, &fstype, &options);
                    reply.result(id, result.map(|()| GuestBody::Ok));
                });
            }
            HostBody::Unmount { target } => {
                let reply = sink.clone();
                self.in_background(sink, id, "unmount", move || {
                    reply.result(id, mounts::unmount(&target).map(|()| GuestBody::Ok));
                });
            }
            HostBody::Copy(spec) => {
                let reply = sink.clone();
                self.in_background(sink, id, "copy", move || {
                    reply.result(id, copy::copy(&spec).map(copied));
                });
            }
            HostBody::ExtractArchive {
                src,
                dest,
                uid,
                gid,
            } => {
                let reply = sink.clone();
                self.in_background(sink, id, "extract", move || {
                    let result = archive::extract(&src, &dest, uid, gid);
                    reply.result(id, result.map(copied));
                });
            }
            HostBody::LookupUser { spec } => {
                let result = users::lookup_user(&spec).map(|user| GuestBody::User {
                    uid: user.uid,
                    gid: user.gid,
                    home: user.home,
                });
                sink.result(id, result);
            }
            HostBody::StartApp(spec) => {
                let result = self.app.start(spec);
                sink.result(id, result.map(|pid| GuestBody::AppStarted { pid }));
            }
            HostBody::AppStatus => sink.reply(id, app_state(self.app.phase())),
            HostBody::StopApp { signal, grace_ms } => {
                let signal = match signal.map(Signal::try_from).transpose() {
                    Ok(signal) => signal.unwrap_or(Signal::SIGTERM),
                    Err(e) => return sink.error(id, format!("invalid signal {signal:?}: {e}")),
                };
                let grace = Duration::from_millis(grace_ms.unwrap_or(DEFAULT_STOP_GRACE_MS));
                let app = self.app.clone();
                let reply = sink.clone();
                self.in_background(sink, id, "stop_app", move || {
                    reply.result(id, app.stop(signal, grace).map(app_state));
                });
            }
            HostBody::ProbeTcp { port, timeout_ms } => {
                let reply = sink.clone();
                self.in_background(sink, id, "probe_tcp", move || {
                    let open = http::probe_tcp(port, Duration::from_millis(timeout_ms));
                    reply.reply(id, GuestBody::TcpProbe { open });
                });
            }
            HostBody::Warm { timeout_ms } => {
                let reply = sink.clone();
                // Only kiln-init in a guest touches the network device (on a host, in
                // development, the gateway's address is nobody's to ping).
                let in_guest = self.config.guest_ops;
                self.in_background(sink, id, "warm", move || {
                    let timeout = Duration::from_millis(timeout_ms.min(MAX_WARM_MS));
                    let walked = warm::warm("/proc/self/exe", timeout, in_guest);
                    reply.result(id, walked.map(|()| GuestBody::Ok));
                });
            }
            HostBody::HttpRequest(spec) => {
                let reply = sink.clone();
                self.in_background(sink, id, "http", move || {
                    let body = match http::request(&spec) {
                        Ok(response) => GuestBody::HttpResponse {
                            status: response.status,
                            headers: response.headers,
                            body: response.body,
                            truncated: response.truncated,
                        },
                        Err(http::HttpError::Failed { kind, message }) => {
                            GuestBody::HttpFailed { kind, message }
                        }
                        Err(http::HttpError::Invalid(message)) => GuestBody::Error { message },
                    };
                    reply.reply(id, body);
                });
            }
            HostBody::RemovePath { path } => {
                sink.result(id, ops::remove_path(&path).map(|()| GuestBody::Ok));
            }
            HostBody::SetOnlineCpus { count } => {
                if !self.config.guest_ops {
                    return sink.error(id, guest_only("set_online_cpus"));
                }
                // Bringing a vCPU up takes the kernel a while: off the reader thread.
                let reply = sink.clone();
                self.in_background(sink, id, "cpus", move || {
                    reply.result(id, super::cpus::set_online(count).map(cpus_body));
                });
            }
            HostBody::CpuStatus => sink.result(id, super::cpus::status().map(cpus_body)),
            HostBody::MemoryStatus => sink.result(
                id,
                super::meminfo::read().map(|m| GuestBody::Memory {
                    total_kib: m.total_kib,
                    available_kib: m.available_kib,
                }),
            ),
            HostBody::PathExists { path } => {
                let exists = std::fs::symlink_metadata(&path).is_ok();
                sink.reply(id, GuestBody::Exists { exists });
            }
            HostBody::Fetch(spec) => {
                let reply = sink.clone();
                self.in_background(sink, id, "fetch", move || {
                    let result = super::fetch::fetch(&spec).map(|f| GuestBody::Fetched {
                        bytes: f.bytes,
                        sha256: f.sha256,
                        mtime: f.mtime,
                    });
                    reply.result(id, result);
                });
            }
            HostBody::StatPath { path } => {
                let reply = sink.clone();
                self.in_background(sink, id, "stat", move || {
                    reply.reply(id, fs_reply(files::stat(&path).map(GuestBody::Stat)));
                });
            }
            HostBody::ListDir { path, max_entries } => {
                let reply = sink.clone();
                self.in_background(sink, id, "list", move || {
                    let result = files::list(&path, max_entries)
                        .map(|(entries, truncated)| GuestBody::DirListing { entries, truncated });
                    reply.reply(id, fs_reply(result));
                });
            }
            HostBody::MakeDir {
                path,
                parents,
                mode,
                uid,
                gid,
            } => {
                let result = files::make_dir(&path, parents, mode, uid, gid);
                sink.reply(id, fs_reply(result.map(|()| GuestBody::Ok)));
            }
            HostBody::MovePath { from, to } => {
                let result = files::move_path(&from, &to);
                sink.reply(id, fs_reply(result.map(|()| GuestBody::Ok)));
            }
            HostBody::RemoveTree { path } => {
                let reply = sink.clone();
                self.in_background(sink, id, "remove", move || {
                    let result = files::remove_tree(&path);
                    reply.reply(id, fs_reply(result.map(|()| GuestBody::Ok)));
                });
            }
            HostBody::ReadRange { path, offset, len } => {
                let reply = sink.clone();
                self.in_background(sink, id, "read", move || {
                    let result = files::read_range(&path, offset, len)
                        .map(|(data, eof)| GuestBody::FileChunk { data, eof });
                    reply.reply(id, fs_reply(result));
                });
            }
            HostBody::WriteRange {
                path,
                offset,
                data,
                create,
                mode,
                uid,
                gid,
            } => {
                let reply = sink.clone();
                self.in_background(sink, id, "write", move || {
                    let how = files::WriteMode {
                        create,
                        mode,
                        uid,
                        gid,
                    };
                    let result = files::write_range(&path, offset, &data, how);
                    reply.reply(id, fs_reply(result.map(|()| GuestBody::Ok)));
                });
            }
        }
    }

    fn in_background(
        &self,
        sink: &ReplySink,
        id: u64,
        what: &str,
        work: impl FnOnce() + Send + 'static,
    ) {
        let spawned = std::thread::Builder::new()
            .name(format!("{what}-{id}"))
            .spawn(work);
        if let Err(e) = spawned {
            sink.error(id, format!("cannot start a thread for {what}: {e}"));
        }
    }
}

/// Longest warm-up the agent runs, whatever the host asks.
const MAX_WARM_MS: u64 = 60_000;

/// Grace period between StopApp's signal and SIGKILL when the host names none.
const DEFAULT_STOP_GRACE_MS: u64 = 10_000;

fn cpus_body(c: super::cpus::CpuCount) -> GuestBody {
    GuestBody::Cpus {
        online: c.online,
        present: c.present,
    }
}

fn copied(stats: copy::CopyStats) -> GuestBody {
    GuestBody::Copied {
        entries: stats.entries,
        bytes: stats.bytes,
    }
}

fn app_state(phase: AppPhase) -> GuestBody {
    let (running, pid, exit_code, signal) = match phase {
        AppPhase::NeverStarted => (false, None, None, None),
        AppPhase::Running { pid } => (true, Some(pid), None, None),
        AppPhase::Exited { pid, exit } => (false, Some(pid), exit.code, exit.signal),
    };
    GuestBody::AppState {
        running,
        pid,
        exit_code,
        signal,
    }
}

fn fs_reply(result: Result<GuestBody, files::FsError>) -> GuestBody {
    result.unwrap_or_else(files::FsError::into_reply)
}

fn guest_only(what: &str) -> String {
    format!("{what} is only allowed when kiln-init runs as the guest's PID 1")
}

struct Session {
    id: u64,
    sink: ReplySink,
}

/// The writing half of a connection, shared by every thread that replies on it.
#[derive(Clone)]
pub struct ReplySink {
    writer: Arc<Mutex<Box<dyn Write + Send>>>,
}

impl ReplySink {
    /// Wraps a transport's writing half.
    pub fn new(writer: impl Write + Send + 'static) -> ReplySink {
        ReplySink {
            writer: Arc::new(Mutex::new(Box::new(writer))),
        }
    }

    /// Sends one frame; blocks while the transport is full.
    pub fn send(&self, id: u64, body: GuestBody) -> io::Result<()> {
        let frame = encode_frame(&GuestMessage { id, body })
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let mut writer = self.lock();
        write_all_patiently(&mut **writer, &frame)?;
        writer.flush()
    }

    /// Sends a reply, ignoring a transport that went away (the host will resend or is gone).
    pub fn reply(&self, id: u64, body: GuestBody) {
        let _ = self.send(id, body);
    }

    /// Sends an `Error` reply.
    pub fn error(&self, id: u64, message: String) {
        self.reply(id, GuestBody::Error { message });
    }

    /// Sends `Ok(body)` as is and `Err(message)` as an `Error` reply.
    pub fn result(&self, id: u64, result: Result<GuestBody, String>) {
        match result {
            Ok(body) => self.reply(id, body),
            Err(message) => self.error(id, message),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Box<dyn Write + Send>> {
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Like `write_all`, but rides out EAGAIN for a few seconds: a virtio port whose host
/// is away may report it.
fn write_all_patiently(writer: &mut dyn Write, mut data: &[u8]) -> io::Result<()> {
    let mut would_block = 0;
    while !data.is_empty() {
        match writer.write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && would_block < 500 => {
                would_block += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The running execs, for `Signal` requests and for signals PID 1 forwards.
#[derive(Default)]
pub struct ExecRegistry {
    running: Mutex<HashMap<u64, RunningExec>>,
    next_serial: AtomicU64,
}

struct RunningExec {
    session: u64,
    id: u64,
    pgid: i32,
    /// Its terminal, when it runs on one.
    terminal: Option<exec::Terminal>,
}

impl ExecRegistry {
    /// Records a running exec; returns the key to remove it with.
    pub fn insert(
        &self,
        session: u64,
        id: u64,
        pgid: i32,
        terminal: Option<exec::Terminal>,
    ) -> u64 {
        let serial = self.next_serial.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(
            serial,
            RunningExec {
                session,
                id,
                pgid,
                terminal,
            },
        );
        serial
    }

    /// The terminal of the newest running exec with this id in this session.
    pub fn terminal(&self, session: u64, id: u64) -> Result<exec::Terminal, String> {
        self.lock()
            .iter()
            .filter(|(_, e)| e.session == session && e.id == id)
            .max_by_key(|(serial, _)| **serial)
            .map(|(_, e)| e.terminal.clone())
            .ok_or_else(|| format!("no running exec with id {id}"))?
            .ok_or_else(|| format!("exec {id} was not started with a terminal"))
    }

    /// Forgets a finished exec.
    pub fn remove(&self, serial: u64) {
        self.lock().remove(&serial);
    }

    /// The process group of the newest running exec with this id in this session.
    pub fn find(&self, session: u64, id: u64) -> Option<i32> {
        self.lock()
            .iter()
            .filter(|(_, e)| e.session == session && e.id == id)
            .max_by_key(|(serial, _)| **serial)
            .map(|(_, e)| e.pgid)
    }

    /// The process groups of all running execs.
    pub fn all_pgids(&self) -> Vec<i32> {
        self.lock().values().map(|e| e.pgid).collect()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, RunningExec>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }
}

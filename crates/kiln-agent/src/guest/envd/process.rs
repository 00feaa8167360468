//! envd's `process.Process` service: processes started by clients, their output fanned
//! out to every attached stream, their stdin, signals and terminal size.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use super::connect::{self, Code, RpcError};
use super::EnvdState;
use crate::guest::children::{ChildExit, ChildTable};

/// Events buffered per attached stream before the output pump waits for it.
const STREAM_QUEUE: usize = 64;
/// Bytes read from a process's output at once (one data event at most).
const READ_CHUNK: usize = 32 * 1024;
/// Most processes envd keeps at once.
const MAX_PROCESSES: usize = 1024;
/// Most streams attached to one process.
const MAX_SUBSCRIBERS: usize = 32;

/// One process started through envd.
struct Proc {
    pid: u32,
    config: Value,
    tag: Option<String>,
    stdin: Mutex<Option<Box<dyn Write + Send>>>,
    pty: Option<Arc<File>>,
    subscribers: Mutex<Vec<(u64, SyncSender<Value>)>>,
    next_subscriber: std::sync::atomic::AtomicU64,
}

impl Proc {
    fn publish(&self, event: &Value) {
        let subscribers: Vec<(u64, SyncSender<Value>)> = lock(&self.subscribers).clone();
        for (id, tx) in subscribers {
            // A full queue makes the pump wait: the process then blocks on its output, as it
            // would on a pipe nobody reads. A closed stream is dropped.
            if tx.send(event.clone()).is_err() {
                lock(&self.subscribers).retain(|(i, _)| *i != id);
            }
        }
    }

    fn subscribe(&self) -> Result<Receiver<Value>, RpcError> {
        let mut subs = lock(&self.subscribers);
        if subs.len() >= MAX_SUBSCRIBERS {
            return Err(RpcError::new(
                Code::ResourceExhausted,
                format!(
                    "process {} already has {MAX_SUBSCRIBERS} streams attached",
                    self.pid
                ),
            ));
        }
        let (tx, rx) = mpsc::sync_channel(STREAM_QUEUE);
        let id = self
            .next_subscriber
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        subs.push((id, tx));
        Ok(rx)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The processes envd runs, by pid.
#[derive(Default)]
pub struct Processes {
    table: Mutex<HashMap<u32, Arc<Proc>>>,
}

/// What a stream handler needs to send a process's events.
pub struct Attached {
    /// The process's pid.
    pub pid: u32,
    /// Its events, closed after the end event.
    pub events: Receiver<Value>,
}

impl Processes {
    fn find(&self, selector: Option<&Value>) -> Result<Arc<Proc>, RpcError> {
        let selector = selector.ok_or_else(|| RpcError::invalid("the request names no process"))?;
        let table = lock(&self.table);
        if let Some(pid) = connect::uint(selector, "pid", "pid", u32::MAX as u64)? {
            return table.get(&(pid as u32)).cloned().ok_or_else(|| {
                RpcError::new(Code::NotFound, format!("process with pid {pid} not found"))
            });
        }
        if let Some(tag) = connect::opt_string(selector, "tag", "tag")? {
            return table
                .values()
                .find(|p| p.tag.as_deref() == Some(tag.as_str()))
                .cloned()
                .ok_or_else(|| {
                    RpcError::new(
                        Code::NotFound,
                        format!("process with tag {tag:?} not found"),
                    )
                });
        }
        Err(RpcError::invalid(
            "the process selector has neither pid nor tag",
        ))
    }

    /// `List`.
    pub fn list(&self) -> Value {
        let table = lock(&self.table);
        let mut procs: Vec<&Arc<Proc>> = table.values().collect();
        procs.sort_by_key(|p| p.pid);
        let list: Vec<Value> = procs
            .iter()
            .map(|p| {
                let mut info = json!({"config": p.config, "pid": p.pid});
                if let Some(tag) = &p.tag {
                    info["tag"] = json!(tag);
                }
                info
            })
            .collect();
        json!({ "processes": list })
    }

    /// `Start`: spawns the process and attaches a stream to it before any output is read.
    pub fn start(
        self: &Arc<Self>,
        state: &EnvdState,
        request: &Value,
        user: Option<&str>,
    ) -> Result<Attached, RpcError> {
        if lock(&self.table).len() >= MAX_PROCESSES {
            return Err(RpcError::new(
                Code::ResourceExhausted,
                format!("envd already runs {MAX_PROCESSES} processes"),
            ));
        }
        let config = connect::field(request, "process", "process")
            .ok_or_else(|| RpcError::invalid("StartRequest.process is required"))?;
        let cmd = connect::string(config, "cmd", "cmd")?;
        if cmd.is_empty() {
            return Err(RpcError::invalid("ProcessConfig.cmd is empty"));
        }
        let args = connect::string_list(config, "args", "args")?;
        let envs = connect::string_map(config, "envs", "envs")?;
        let cwd = connect::opt_string(config, "cwd", "cwd")?;
        let tag = connect::opt_string(request, "tag", "tag")?;
        let want_stdin = connect::opt_bool(request, "stdin", "stdin")?.unwrap_or(true);
        let pty_size = match connect::field(request, "pty", "pty") {
            None => None,
            Some(pty) => Some(pty_size(pty)?),
        };

        let user = state.resolve_user(user)?;
        let mut command = Command::new(&cmd);
        command.args(&args).env_clear();
        for (k, v) in state.base_env(&user) {
            command.env(k, v);
        }
        for (k, v) in &envs {
            command.env(k, v);
        }
        let cwd = match cwd.filter(|c| !c.is_empty()) {
            Some(c) => state.resolve_path(&c, &user),
            None => state.workdir(&user),
        };
        if !std::path::Path::new(&cwd).is_dir() {
            return Err(RpcError::invalid(format!(
                "cwd {cwd:?} is not a directory in the sandbox"
            )));
        }
        command.current_dir(&cwd).env("PWD", &cwd);
        command.uid(user.uid).gid(user.gid);

        let mut pty_master = None;
        match pty_size {
            Some((cols, rows)) => {
                let master = crate::guest::exec::attach_terminal(
                    &mut command,
                    crate::proto::TtySize { cols, rows },
                )
                .map_err(|e| RpcError::new(Code::Internal, e))?;
                pty_master = Some(Arc::new(master));
            }
            None => {
                command
                    .stdin(if want_stdin {
                        Stdio::piped()
                    } else {
                        Stdio::null()
                    })
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped());
                // SAFETY: setsid(2) is async-signal-safe; it gives the process its own group
                // so a signal reaches what it started too.
                unsafe {
                    command.pre_exec(|| {
                        nix::unistd::setsid()?;
                        Ok(())
                    });
                }
            }
        }

        let (mut child, exit) = ChildTable::global().spawn(&mut command).map_err(|e| {
            RpcError::new(Code::InvalidArgument, format!("cannot start {cmd:?}: {e}"))
        })?;
        drop(command); // closes our copies of the terminal's slave end
        let pid = child.id();
        let stdin: Option<Box<dyn Write + Send>> = match &pty_master {
            Some(master) => Some(Box::new(PtyWriter(master.clone()))),
            None => child
                .stdin
                .take()
                .map(|s| Box::new(s) as Box<dyn Write + Send>),
        };
        let proc = Arc::new(Proc {
            pid,
            config: json!({"cmd": cmd, "args": args, "envs": envs.iter().cloned().collect::<HashMap<_, _>>(), "cwd": cwd}),
            tag,
            stdin: Mutex::new(stdin),
            pty: pty_master.clone(),
            subscribers: Mutex::new(Vec::new()),
            next_subscriber: std::sync::atomic::AtomicU64::new(0),
        });
        let events = proc.subscribe()?;
        lock(&self.table).insert(pid, proc.clone());

        let mut pumps = Vec::new();
        if let Some(master) = pty_master {
            let reader = master
                .try_clone()
                .map_err(|e| RpcError::io("duplicating the terminal", &e))?;
            pumps.push(pump(proc.clone(), reader, "pty"));
        } else {
            if let Some(out) = child.stdout.take() {
                pumps.push(pump(proc.clone(), out, "stdout"));
            }
            if let Some(err) = child.stderr.take() {
                pumps.push(pump(proc.clone(), err, "stderr"));
            }
        }
        let table = self.clone();
        let waiter = proc.clone();
        let spawned = std::thread::Builder::new()
            .name("envd-wait".into())
            .spawn(move || {
                let status = exit.recv().unwrap_or(ChildExit {
                    code: None,
                    signal: None,
                });
                for p in pumps.into_iter().flatten() {
                    let _ = p.join();
                }
                // The terminal's master end stays open in `waiter`; the process is gone.
                lock(&table.table).remove(&waiter.pid);
                waiter.publish(&json!({"end": end_event(status)}));
                lock(&waiter.subscribers).clear();
                drop(child);
            });
        if let Err(e) = spawned {
            crate::console!("envd: cannot start a waiter thread: {e}");
        }
        Ok(Attached { pid, events })
    }

    /// `Connect`: attaches a stream to a running process.
    pub fn connect(&self, request: &Value) -> Result<Attached, RpcError> {
        let proc = self.find(connect::field(request, "process", "process"))?;
        Ok(Attached {
            pid: proc.pid,
            events: proc.subscribe()?,
        })
    }

    /// `SendInput` (and each data message of `StreamInput`).
    pub fn send_input(
        &self,
        selector: Option<&Value>,
        input: Option<&Value>,
    ) -> Result<(), RpcError> {
        let proc = self.find(selector)?;
        let Some(input) = input else {
            return Ok(());
        };
        let (data, to_pty) = if let Some(d) = connect::field(input, "stdin", "stdin") {
            (connect::bytes(d, "stdin")?, false)
        } else if let Some(d) = connect::field(input, "pty", "pty") {
            (connect::bytes(d, "pty")?, true)
        } else {
            return Ok(());
        };
        if to_pty != proc.pty.is_some() {
            return Err(RpcError::invalid(if to_pty {
                "the process has no terminal: send stdin"
            } else {
                "the process has a terminal: send pty input"
            }));
        }
        let mut stdin = lock(&proc.stdin);
        let writer = stdin.as_mut().ok_or_else(|| {
            RpcError::new(
                Code::FailedPrecondition,
                "the process's stdin is closed (or it was started with stdin disabled)",
            )
        })?;
        writer
            .write_all(&data)
            .and_then(|()| writer.flush())
            .map_err(|e| RpcError::io("writing to the process's stdin", &e))
    }

    /// `SendInput`.
    pub fn send_input_request(&self, request: &Value) -> Result<Value, RpcError> {
        self.send_input(
            connect::field(request, "process", "process"),
            connect::field(request, "input", "input"),
        )?;
        Ok(json!({}))
    }

    /// `CloseStdin`.
    pub fn close_stdin(&self, request: &Value) -> Result<Value, RpcError> {
        let proc = self.find(connect::field(request, "process", "process"))?;
        if proc.pty.is_some() {
            return Err(RpcError::invalid(
                "the process has a terminal: send Ctrl+D (0x04) instead of closing stdin",
            ));
        }
        lock(&proc.stdin).take();
        Ok(json!({}))
    }

    /// `SendSignal`: SIGTERM or SIGKILL to the process's group.
    pub fn send_signal(&self, request: &Value) -> Result<Value, RpcError> {
        let proc = self.find(connect::field(request, "process", "process"))?;
        let signal = connect::enum_value(
            request,
            "signal",
            "signal",
            &[
                ("SIGNAL_UNSPECIFIED", 0),
                ("SIGNAL_SIGTERM", 15),
                ("SIGNAL_SIGKILL", 9),
            ],
        )?;
        let signal = match signal {
            Some(15) => libc::SIGTERM,
            Some(9) => libc::SIGKILL,
            _ => {
                return Err(RpcError::invalid(
                    "signal must be SIGNAL_SIGTERM or SIGNAL_SIGKILL",
                ))
            }
        };
        // SAFETY: kill(2) with a process group id and a signal number touches no memory.
        let rc = unsafe { libc::kill(-(proc.pid as i32), signal) };
        if rc != 0 {
            // SAFETY: as above, for the pid alone.
            let rc = unsafe { libc::kill(proc.pid as i32, signal) };
            if rc != 0 {
                return Err(RpcError::io(
                    "signalling the process",
                    &std::io::Error::last_os_error(),
                ));
            }
        }
        Ok(json!({}))
    }

    /// `Update`: resizes the process's terminal.
    pub fn update(&self, request: &Value) -> Result<Value, RpcError> {
        let proc = self.find(connect::field(request, "process", "process"))?;
        let Some(pty) = connect::field(request, "pty", "pty") else {
            return Ok(json!({}));
        };
        let (cols, rows) = pty_size(pty)?;
        let master = proc
            .pty
            .as_ref()
            .ok_or_else(|| RpcError::invalid("the process has no terminal to resize"))?;
        let winsize = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads a winsize struct that lives for the call.
        let rc = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &winsize) };
        if rc != 0 {
            return Err(RpcError::io(
                "resizing the terminal",
                &std::io::Error::last_os_error(),
            ));
        }
        Ok(json!({}))
    }
}

fn pty_size(pty: &Value) -> Result<(u16, u16), RpcError> {
    let size = connect::field(pty, "size", "size");
    let cols = size
        .map(|s| connect::uint(s, "cols", "cols", u16::MAX as u64))
        .transpose()?
        .flatten()
        .unwrap_or(80);
    let rows = size
        .map(|s| connect::uint(s, "rows", "rows", u16::MAX as u64))
        .transpose()?
        .flatten()
        .unwrap_or(24);
    Ok((cols as u16, rows as u16))
}

/// Writes to a terminal's master end.
struct PtyWriter(Arc<File>);

impl Write for PtyWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        (&*self.0).write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn pump(
    proc: Arc<Proc>,
    mut source: impl Read + Send + 'static,
    stream: &'static str,
) -> Option<std::thread::JoinHandle<()>> {
    let spawned = std::thread::Builder::new()
        .name("envd-output".into())
        .spawn(move || {
            let mut buf = vec![0u8; READ_CHUNK];
            loop {
                match source.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => {
                        let event = json!({"data": {stream: connect::b64(&buf[..n])}});
                        proc.publish(&event);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    // EIO: the terminal's last slave closed.
                    Err(_) => return,
                }
            }
        });
    match spawned {
        Ok(handle) => Some(handle),
        Err(e) => {
            crate::console!("envd: cannot start an output thread: {e}");
            None
        }
    }
}

/// The end event of a process that ended with `status`.
pub fn end_event(status: ChildExit) -> Value {
    match (status.code, status.signal) {
        (Some(code), _) => json!({
            "exitCode": code,
            "exited": true,
            "status": format!("exit status {code}"),
        }),
        (None, Some(sig)) => {
            let name = nix::sys::signal::Signal::try_from(sig)
                .map(|s| signal_word(s).to_string())
                .unwrap_or_else(|_| format!("signal {sig}"));
            json!({
                "exitCode": -1,
                "exited": false,
                "status": format!("signal: {name}"),
            })
        }
        (None, None) => json!({
            "exitCode": -1,
            "exited": false,
            "status": "unknown",
            "error": "the process's exit status was lost",
        }),
    }
}

fn signal_word(signal: nix::sys::signal::Signal) -> &'static str {
    use nix::sys::signal::Signal::*;
    match signal {
        SIGKILL => "killed",
        SIGTERM => "terminated",
        SIGINT => "interrupt",
        SIGHUP => "hangup",
        SIGPIPE => "broken pipe",
        SIGSEGV => "segmentation fault",
        SIGABRT => "aborted",
        _ => signal.as_str(),
    }
}

/// Sends the events of `events` as a Connect server stream: `{"event": …}` messages, a
/// keepalive after each quiet `keepalive`, then the end of the stream. The first message is
/// the start event of `pid` when `start` is set.
pub fn stream_events(
    out: &mut impl FnMut(&[u8]) -> std::io::Result<()>,
    attached: Attached,
    start: bool,
    keepalive: Duration,
) -> std::io::Result<()> {
    if start {
        out(&connect::envelope(
            0,
            json!({"event": {"start": {"pid": attached.pid}}})
                .to_string()
                .as_bytes(),
        ))?;
    }
    loop {
        match attached.events.recv_timeout(keepalive) {
            Ok(event) => {
                out(&connect::envelope(
                    0,
                    json!({ "event": event }).to_string().as_bytes(),
                ))?;
            }
            Err(RecvTimeoutError::Timeout) => {
                out(&connect::envelope(
                    0,
                    json!({"event": {"keepalive": {}}}).to_string().as_bytes(),
                ))?;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    out(&connect::end_stream(None))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn end_event_of_an_exit_carries_the_code() {
        let v = end_event(ChildExit {
            code: Some(3),
            signal: None,
        });
        assert_eq!(v["exitCode"], 3);
        assert_eq!(v["exited"], true);
        assert_eq!(v["status"], "exit status 3");
    }

    #[test]
    fn end_event_of_a_kill_is_not_exited() {
        let v = end_event(ChildExit {
            code: None,
            signal: Some(9),
        });
        assert_eq!(v["exited"], false);
        assert_eq!(v["status"], "signal: killed");
    }
}

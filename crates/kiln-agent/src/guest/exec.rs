//! One exec: spawn, feed stdin, pump output, enforce the timeout, report the exit.
//!
//! The exit is reported only after stdout and stderr reach EOF, so no output is lost.
//! A background process that keeps the pipes open after the exec's own process exited
//! would hold the report forever; so once the process is gone, a stream that stays idle
//! for [`DRAIN_IDLE`] is abandoned (what it writes later is not the exec's output).

use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use super::agent::{ExecRegistry, ReplySink};
use super::children::{ChildExit, ChildTable};
use crate::proto::{ExecSpec, GuestBody, OutputStream, DEFAULT_PATH, MAX_OUTPUT_CHUNK};

/// How long an output stream may stay silent after the process exited before it is abandoned.
pub const DRAIN_IDLE: Duration = Duration::from_millis(500);
const POLL_INTERVAL_MS: u16 = 100;

/// Everything one exec needs.
pub struct ExecJob {
    /// The request id, carried by every frame about this exec.
    pub id: u64,
    /// The connection it came from.
    pub session: u64,
    /// What to run.
    pub spec: ExecSpec,
    /// Where to report.
    pub sink: ReplySink,
    /// Where running execs are recorded.
    pub registry: Arc<ExecRegistry>,
}

/// Runs the exec to completion, reporting on the sink.
pub fn run(job: ExecJob) {
    let ExecJob {
        id,
        session,
        spec,
        sink,
        registry,
    } = job;
    let mut command = match build_command(&spec) {
        Ok(command) => command,
        Err(message) => return sink.error(id, message),
    };
    let program = spec.argv.first().cloned().unwrap_or_default();
    let (mut child, exits) = match ChildTable::global().spawn(&mut command) {
        Ok(spawned) => spawned,
        Err(e) => return sink.error(id, format!("cannot start {program:?}: {e}")),
    };
    let pid = child.id();
    let pgid = pid as i32;
    let serial = registry.insert(session, id, pgid);
    sink.reply(id, GuestBody::ExecStarted { pid });

    if let (Some(mut stdin), Some(data)) = (child.stdin.take(), spec.stdin) {
        // A child that never reads its stdin must not stall the exec: detach the writer.
        let _ = std::thread::Builder::new()
            .name(format!("stdin-{id}"))
            .spawn(move || {
                let _ = stdin.write_all(&data);
            });
    }

    let exited = Arc::new(AtomicBool::new(false));
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let streams: [(Option<Box<dyn ReadFd>>, OutputStream); 2] = [
        (
            child.stdout.take().map(|s| Box::new(s) as Box<dyn ReadFd>),
            OutputStream::Stdout,
        ),
        (
            child.stderr.take().map(|s| Box::new(s) as Box<dyn ReadFd>),
            OutputStream::Stderr,
        ),
    ];
    for (source, stream) in streams {
        let Some(source) = source else { continue };
        let pump = Pump {
            id,
            stream,
            sink: sink.clone(),
            exited: exited.clone(),
            _done: done_tx.clone(),
        };
        // If the thread cannot start, the pipe closes and the child sees EPIPE.
        let _ = std::thread::Builder::new()
            .name(format!("out-{id}"))
            .spawn(move || pump.run(source));
    }
    drop(done_tx);

    let deadline = spec
        .timeout_ms
        .map(|ms| Instant::now() + Duration::from_millis(ms));
    let mut timed_out = false;
    let kill_at_deadline = |timed_out: &mut bool| {
        if !*timed_out {
            *timed_out = true;
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        }
    };

    let status = loop {
        match recv_until(&exits, deadline.filter(|_| !timed_out)) {
            Ok(exit) => break exit,
            Err(RecvTimeoutError::Timeout) => kill_at_deadline(&mut timed_out),
            Err(RecvTimeoutError::Disconnected) => {
                break ChildExit {
                    code: None,
                    signal: None,
                }
            }
        }
    };
    exited.store(true, Ordering::SeqCst);

    // Each pump holds a sender; the channel disconnects once all of them finished.
    while let Err(RecvTimeoutError::Timeout) = recv_until(&done_rx, deadline.filter(|_| !timed_out))
    {
        kill_at_deadline(&mut timed_out);
    }

    registry.remove(serial);
    sink.reply(
        id,
        GuestBody::Exited {
            code: status.code,
            signal: status.signal,
            timed_out,
        },
    );
}

fn recv_until<T>(rx: &mpsc::Receiver<T>, deadline: Option<Instant>) -> Result<T, RecvTimeoutError> {
    match deadline {
        Some(at) => rx.recv_timeout(at.saturating_duration_since(Instant::now())),
        None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
    }
}

pub(crate) fn build_command(spec: &ExecSpec) -> Result<Command, String> {
    let (program, args) = spec
        .argv
        .split_first()
        .ok_or_else(|| "exec needs a non-empty argv".to_string())?;
    let mut command = Command::new(program);
    command.args(args).env_clear();
    let mut has_path = false;
    for entry in &spec.env {
        let (key, value) = entry
            .split_once('=')
            .filter(|(k, _)| !k.is_empty())
            .ok_or_else(|| format!("environment entry {entry:?} is not KEY=VALUE"))?;
        has_path |= key == "PATH";
        command.env(key, value);
    }
    if !has_path {
        command.env("PATH", DEFAULT_PATH);
    }
    command.current_dir(spec.cwd.as_deref().unwrap_or("/"));
    if let Some(uid) = spec.uid {
        command.uid(uid);
    }
    if let Some(gid) = spec.gid {
        command.gid(gid);
    }
    command
        .process_group(0)
        .stdin(if spec.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    Ok(command)
}

/// A readable pipe end that can be polled.
trait ReadFd: Read + AsFd + Send {}
impl<T: Read + AsFd + Send> ReadFd for T {}

struct Pump {
    id: u64,
    stream: OutputStream,
    sink: ReplySink,
    exited: Arc<AtomicBool>,
    /// Dropped when the pump ends, which tells the exec its stream is done.
    _done: mpsc::Sender<()>,
}

impl Pump {
    fn run(self, mut source: Box<dyn ReadFd>) {
        let mut buf = vec![0u8; MAX_OUTPUT_CHUNK];
        let idle_limit = (DRAIN_IDLE.as_millis() / u128::from(POLL_INTERVAL_MS)).max(1);
        let mut idle_after_exit = 0u128;
        loop {
            let ready = {
                let mut fds = [PollFd::new(source.as_fd(), PollFlags::POLLIN)];
                poll(&mut fds, PollTimeout::from(POLL_INTERVAL_MS))
            };
            match ready {
                Ok(0) => {
                    if self.exited.load(Ordering::SeqCst) {
                        idle_after_exit += 1;
                        if idle_after_exit >= idle_limit {
                            return;
                        }
                    }
                    continue;
                }
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return,
            }
            match source.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    idle_after_exit = 0;
                    // A vanished host must not stall the child: keep draining regardless.
                    let _ = self.sink.send(
                        self.id,
                        GuestBody::Output {
                            stream: self.stream,
                            data: buf[..n].to_vec(),
                        },
                    );
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }
}

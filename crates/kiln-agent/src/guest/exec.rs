//! One exec: spawn, feed stdin, pump output, enforce the timeout, report the exit.
//!
//! The exit is reported only after stdout and stderr reach EOF, so no output is lost.
//! A background process that keeps the pipes open after the exec's own process exited
//! would hold the report forever; so once the process is gone, a stream that stays idle
//! for [`DRAIN_IDLE`] is abandoned (what it writes later is not the exec's output).

use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
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
use crate::proto::{ExecSpec, GuestBody, OutputStream, TtySize, DEFAULT_PATH, MAX_OUTPUT_CHUNK};

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
    let terminal = match spec.tty.map(|size| attach_terminal(&mut command, size)) {
        None => None,
        Some(Ok(master)) => Some(master),
        Some(Err(message)) => return sink.error(id, message),
    };
    let program = spec.argv.first().cloned().unwrap_or_default();
    let spawned = ChildTable::global().spawn(&mut command);
    // The command holds the terminal's other end: close it here, so reading the terminal
    // ends when the last process using it exits.
    drop(command);
    let (mut child, exits) = match spawned {
        Ok(spawned) => spawned,
        Err(e) => return sink.error(id, format!("cannot start {program:?}: {e}")),
    };
    let pid = child.id();
    let pgid = pid as i32;
    let terminal = match terminal.map(Terminal::start) {
        None => None,
        Some(Ok(t)) => Some(t),
        Some(Err(message)) => {
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
            return sink.error(id, message);
        }
    };
    let serial = registry.insert(session, id, pgid, terminal.clone());
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
    let terminal_output = terminal
        .as_ref()
        .and_then(|t| t.master.try_clone().ok())
        .map(|t| Box::new(t) as Box<dyn ReadFd>);
    let streams: [(Option<Box<dyn ReadFd>>, OutputStream); 2] = [
        (
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn ReadFd>)
                .or(terminal_output),
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
    if spec.no_network {
        // std switches user before running pre_exec hooks, and a new network namespace
        // needs root: so the hook unshares first and switches user itself.
        let (uid, gid) = (spec.uid, spec.gid);
        // SAFETY: between fork and exec the hook makes only raw system calls (unshare,
        // socket, ioctl, close, setgroups, setgid, setuid) and allocates nothing.
        unsafe {
            command.pre_exec(move || without_network(uid, gid));
        }
    } else {
        if let Some(uid) = spec.uid {
            command.uid(uid);
        }
        if let Some(gid) = spec.gid {
            command.gid(gid);
        }
    }
    if spec.tty.is_some() {
        // `attach_terminal` makes it a session (and so group) leader instead.
        return Ok(command);
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

/// In the child before exec: a new network namespace with its loopback up (as Docker's
/// `--network=none`), then the user and group.
fn without_network(uid: Option<u32>, gid: Option<u32>) -> std::io::Result<()> {
    let check = |rc: libc::c_int| {
        if rc < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    };
    // SAFETY: unshare takes a flag word and touches no memory of ours.
    check(unsafe { libc::unshare(libc::CLONE_NEWNET) })?;
    // SAFETY: socket(2) with constant arguments; the descriptor is closed below.
    let fd =
        check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `ifreq` is plain old data, valid when zeroed.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *slot = *byte as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the `ifreq` we own for the whole call.
    let up = unsafe {
        let got = libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req);
        if got >= 0 {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            libc::ioctl(fd, libc::SIOCSIFFLAGS, &mut req)
        } else {
            got
        }
    };
    // SAFETY: closes the socket opened above.
    unsafe { libc::close(fd) };
    check(up)?;
    if let Some(gid) = gid {
        // SAFETY: plain system calls with integer arguments.
        check(unsafe { libc::setgroups(0, std::ptr::null()) })?;
        // SAFETY: as above.
        check(unsafe { libc::setgid(gid) })?;
    }
    if let Some(uid) = uid {
        // SAFETY: as above.
        check(unsafe { libc::setuid(uid) })?;
    }
    Ok(())
}

/// Gives `command` a new pseudo-terminal of `size` as its controlling terminal, in a session
/// of its own (so its pid is its process group, as for other execs); returns the master end.
pub(crate) fn attach_terminal(
    command: &mut Command,
    size: TtySize,
) -> Result<std::fs::File, String> {
    let winsize = nix::pty::Winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = nix::pty::openpty(Some(&winsize), None)
        .map_err(|e| format!("cannot open a pseudo-terminal: {e}"))?;
    let dup = |fd: &std::os::fd::OwnedFd| {
        fd.try_clone()
            .map_err(|e| format!("cannot duplicate the terminal: {e}"))
    };
    command
        .stdin(Stdio::from(dup(&pty.slave)?))
        .stdout(Stdio::from(dup(&pty.slave)?))
        .stderr(Stdio::from(pty.slave))
        .env("TERM", "xterm-256color");
    // SAFETY: between fork and exec only async-signal-safe calls: setsid(2) and ioctl(2).
    unsafe {
        command.pre_exec(|| {
            nix::unistd::setsid()?;
            // SAFETY: fd 0 is the terminal's slave end (set as stdin above); TIOCSCTTY takes
            // an int argument and touches no memory of ours.
            if libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(std::fs::File::from(pty.master))
}

/// The terminal of an interactive exec: its master end, and a writer thread that types what
/// the host sends in order (a program that stops reading must not stall the agent).
#[derive(Clone)]
pub struct Terminal {
    master: Arc<std::fs::File>,
    input: mpsc::Sender<Vec<u8>>,
}

impl Terminal {
    fn start(master: std::fs::File) -> Result<Terminal, String> {
        let master = Arc::new(master);
        let (input, typed) = mpsc::channel::<Vec<u8>>();
        let writer = master.clone();
        std::thread::Builder::new()
            .name("tty-input".into())
            .spawn(move || {
                for data in typed {
                    if (&*writer).write_all(&data).is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| format!("cannot start the terminal's input thread: {e}"))?;
        Ok(Terminal { master, input })
    }

    /// Queues `data` as typed input.
    pub fn type_in(&self, data: Vec<u8>) -> Result<(), String> {
        self.input
            .send(data)
            .map_err(|_| "the terminal no longer takes input".to_string())
    }

    /// Sets the terminal's size (the program gets SIGWINCH).
    pub fn resize(&self, size: TtySize) -> Result<(), String> {
        let winsize = libc::winsize {
            ws_row: size.rows,
            ws_col: size.cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer, which lives across the call.
        let rc = unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &winsize) };
        if rc < 0 {
            return Err(format!(
                "cannot resize the terminal: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(())
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_command_when_no_network_then_only_loopback_is_seen() {
        let spec = ExecSpec {
            argv: vec!["cat".into(), "/proc/self/net/dev".into()],
            no_network: true,
            ..ExecSpec::default()
        };

        let out = build_command(&spec)
            .expect("command")
            .output()
            .expect("run cat");

        let text = String::from_utf8_lossy(&out.stdout);
        let interfaces: Vec<&str> = text
            .lines()
            .skip(2)
            .filter_map(|l| l.split(':').next())
            .map(str::trim)
            .collect();
        assert_eq!(interfaces, ["lo"], "{text}");
    }
}

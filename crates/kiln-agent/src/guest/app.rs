//! The app: the one long-running process (the image's ENTRYPOINT/CMD) the agent
//! supervises. It runs in its own process group with stdin on /dev/null; stdout and
//! stderr go straight to the app log, so its output never passes through the agent.
//!
//! The app log is the virtio-serial port named [`APP_LOG_PORT`] (the host backs it with
//! a file); without that port, the file named by `KILN_INIT_APP_LOG`, else
//! [`DEFAULT_APP_LOG`]. kiln-init adds one line when the app starts and one when it ends.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use super::children::{ChildExit, ChildTable};
use super::{exec, port};
use crate::proto::{AppSpec, ExecSpec};

/// Name of the virtio-serial port that receives the app's output.
pub const APP_LOG_PORT: &str = "applog";
/// The app log when there is no such port.
pub const DEFAULT_APP_LOG: &str = "/dev/kiln/app.log";
/// Environment variable that overrides [`DEFAULT_APP_LOG`] (for tests and development).
pub const APP_LOG_ENV: &str = "KILN_INIT_APP_LOG";
/// How long StopApp waits for the app to die after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// Where the app is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppPhase {
    /// No app was started yet.
    NeverStarted,
    /// The app runs with this pid (its process group id too).
    Running {
        /// Its pid.
        pid: u32,
    },
    /// The app ended.
    Exited {
        /// Its pid.
        pid: u32,
        /// How it ended.
        exit: ChildExit,
    },
}

/// The supervisor of the app; shared by every connection of the agent.
pub struct AppSupervisor {
    phase: Mutex<AppPhase>,
    changed: Condvar,
    /// The app log, opened once: a virtio port can be open only once at a time.
    log: Mutex<Option<File>>,
}

impl Default for AppSupervisor {
    fn default() -> Self {
        AppSupervisor {
            phase: Mutex::new(AppPhase::NeverStarted),
            changed: Condvar::new(),
            log: Mutex::new(None),
        }
    }
}

impl AppSupervisor {
    /// Starts the app; fails while one is running.
    pub fn start(self: &Arc<Self>, spec: AppSpec) -> Result<u32, String> {
        let mut phase = self.lock_phase();
        if let AppPhase::Running { pid } = *phase {
            return Err(format!(
                "an app is already running (pid {pid}); stop it before starting another"
            ));
        }
        let log = self.log_file()?;
        let output = |log: &File| {
            log.try_clone()
                .map_err(|e| format!("cannot share the app log with the app: {e}"))
        };
        let mut command = exec::build_command(&ExecSpec {
            argv: spec.argv.clone(),
            env: spec.env,
            cwd: spec.cwd,
            uid: spec.uid,
            gid: spec.gid,
            stdin: None,
            timeout_ms: None,
            tty: None,
            no_network: false,
        })?;
        command
            .stdin(Stdio::null())
            .stdout(output(&log)?)
            .stderr(output(&log)?);
        let announce = StartLine::new(&spec.argv);
        // SAFETY: the closure runs in the forked child between fork and exec, where only
        // async-signal-safe calls are allowed: StartLine::write calls getpid and write(2)
        // on buffers allocated before the fork, and allocates nothing.
        unsafe {
            command.pre_exec(move || {
                announce.write();
                Ok(())
            });
        }
        let program = spec.argv.first().cloned().unwrap_or_default();
        let (child, exits) = match ChildTable::global().spawn(&mut command) {
            Ok(spawned) => spawned,
            Err(e) => {
                let message = format!("cannot start the app {program:?}: {e}");
                write_line(&log, &message);
                return Err(message);
            }
        };
        let pid = child.id();
        // The reaper, not `child`, collects the exit.
        drop(child);
        *phase = AppPhase::Running { pid };
        drop(phase);

        let supervisor = self.clone();
        let watched = std::thread::Builder::new()
            .name("app-watch".into())
            .spawn(move || {
                let exit = exits.recv().unwrap_or(ChildExit {
                    code: None,
                    signal: None,
                });
                supervisor.exited(pid, exit, &log);
            });
        if let Err(e) = watched {
            let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
            return Err(format!("cannot watch the app, so it was killed: {e}"));
        }
        Ok(pid)
    }

    /// Where the app is now.
    pub fn phase(&self) -> AppPhase {
        *self.lock_phase()
    }

    /// The process group of the running app, if one runs.
    pub fn running_pgid(&self) -> Option<i32> {
        match self.phase() {
            AppPhase::Running { pid } => Some(pid as i32),
            _ => None,
        }
    }

    /// Sends `signal` to the app's process group, SIGKILL after `grace`, and returns
    /// once the app exited. Stragglers left in its group are killed too. An app that is
    /// not running is left as it is.
    pub fn stop(&self, signal: Signal, grace: Duration) -> Result<AppPhase, String> {
        let AppPhase::Running { pid } = self.phase() else {
            return Ok(self.phase());
        };
        let group = Pid::from_raw(pid as i32);
        send(group, signal)?;
        if let Some(ended) = self.wait_exit(pid, grace) {
            let _ = killpg(group, Signal::SIGKILL);
            return Ok(ended);
        }
        send(group, Signal::SIGKILL)?;
        self.wait_exit(pid, KILL_WAIT).ok_or_else(|| {
            format!("the app (pid {pid}) did not exit within {KILL_WAIT:?} of SIGKILL")
        })
    }

    /// Waits up to `limit` for the app `pid` to stop running; the phase after it, if it did.
    fn wait_exit(&self, pid: u32, limit: Duration) -> Option<AppPhase> {
        let deadline = Instant::now() + limit;
        let mut phase = self.lock_phase();
        while *phase == (AppPhase::Running { pid }) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            phase = self
                .changed
                .wait_timeout(phase, left)
                .map(|(guard, _)| guard)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        Some(*phase)
    }

    fn exited(&self, pid: u32, exit: ChildExit, log: &File) {
        let how = match (exit.code, exit.signal) {
            (Some(code), _) => format!("code {code}"),
            (None, Some(signal)) => format!("signal {signal}"),
            (None, None) => "unknown status".to_string(),
        };
        write_line(log, &format!("app exited: {how}"));
        let mut phase = self.lock_phase();
        if *phase == (AppPhase::Running { pid }) {
            *phase = AppPhase::Exited { pid, exit };
        }
        drop(phase);
        self.changed.notify_all();
    }

    /// The app log, opened on first use.
    fn log_file(&self) -> Result<File, String> {
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        if log.is_none() {
            *log = Some(open_log()?);
        }
        match log.as_ref() {
            Some(file) => file
                .try_clone()
                .map_err(|e| format!("cannot duplicate the app log: {e}")),
            None => Err("the app log is not open".into()),
        }
    }

    fn lock_phase(&self) -> MutexGuard<'_, AppPhase> {
        self.phase.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn send(group: Pid, signal: Signal) -> Result<(), String> {
    match killpg(group, signal) {
        Ok(()) | Err(Errno::ESRCH) => Ok(()),
        Err(e) => Err(format!(
            "cannot send {signal} to the app's process group {group}: {e}"
        )),
    }
}

fn open_log() -> Result<File, String> {
    if let Some(device) = port::find_port(APP_LOG_PORT) {
        match OpenOptions::new().write(true).open(&device) {
            Ok(file) => return Ok(file),
            Err(e) => crate::console!(
                "cannot open the app log port {}: {e}; using a file instead",
                device.display()
            ),
        }
    }
    let path = std::env::var_os(APP_LOG_ENV)
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| DEFAULT_APP_LOG.into());
    let path = Path::new(&path);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    }
    OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .map_err(|e| format!("cannot open the app log {}: {e}", path.display()))
}

/// The `[kiln] app started: pid N argv…` line, written by the app's own process just
/// before exec, so that it precedes anything the app writes.
struct StartLine {
    prefix: Vec<u8>,
    suffix: Vec<u8>,
}

impl StartLine {
    fn new(argv: &[String]) -> StartLine {
        StartLine {
            prefix: b"[kiln] app started: pid ".to_vec(),
            suffix: format!(" {}\n", argv.join(" ")).into_bytes(),
        }
    }

    /// Writes the line to stdout (the app log). Async-signal-safe: no allocation.
    fn write(&self) {
        // SAFETY: getpid has no preconditions and cannot fail.
        let pid = unsafe { libc::getpid() };
        let mut digits = [0u8; 10];
        let pid = decimal(pid.unsigned_abs(), &mut digits);
        for part in [&self.prefix[..], pid, &self.suffix[..]] {
            write_raw(libc::STDOUT_FILENO, part);
        }
    }
}

/// `n` in decimal, in the tail of `out`.
fn decimal(mut n: u32, out: &mut [u8; 10]) -> &[u8] {
    let mut start = out.len();
    loop {
        start -= 1;
        out[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 || start == 0 {
            return &out[start..];
        }
    }
}

/// write(2) until done, retrying on EINTR, giving up on any other error.
fn write_raw(fd: libc::c_int, mut data: &[u8]) {
    while !data.is_empty() {
        // SAFETY: `data` is a valid, initialised buffer of `data.len()` bytes for the call.
        let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
        if n > 0 {
            data = &data[(n as usize).min(data.len())..];
        } else if n < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        } else {
            return;
        }
    }
}

/// Writes one `[kiln] …` line; a log that cannot take it must not stop the app.
fn write_line(mut log: &File, text: &str) {
    let _ = log.write_all(format!("[kiln] {text}\n").as_bytes());
}

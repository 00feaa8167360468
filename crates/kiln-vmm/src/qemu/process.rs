//! The QEMU process: finding the binary, starting it in its own session, watching it, ending it.

use std::ffi::OsString;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::VmmError;

/// The QEMU binary kiln runs and its version.
#[derive(Debug, Clone)]
pub struct QemuBinary {
    /// Absolute path.
    pub path: PathBuf,
    /// Version as QEMU prints it, e.g. `7.2.22`.
    pub version: String,
}

impl QemuBinary {
    /// Finds QEMU: `KILN_QEMU`, else `qemu-system-x86_64` on `PATH`. Cached per process.
    pub fn find() -> Result<QemuBinary, VmmError> {
        static FOUND: OnceLock<Result<QemuBinary, String>> = OnceLock::new();
        FOUND
            .get_or_init(|| Self::locate().map_err(|e| e.to_string()))
            .clone()
            .map_err(VmmError::QemuMissing)
    }

    fn locate() -> Result<QemuBinary, String> {
        let path = match std::env::var_os("KILN_QEMU") {
            Some(p) => PathBuf::from(p),
            None => which("qemu-system-x86_64").ok_or_else(|| {
                "qemu-system-x86_64 is not on PATH: install it with \
                 `apt-get install qemu-system-x86` (or set KILN_QEMU)"
                    .to_string()
            })?,
        };
        let out = std::process::Command::new(&path)
            .arg("--version")
            .output()
            .map_err(|e| {
                format!(
                    "cannot run QEMU at {}: {e}; install qemu-system-x86 or fix KILN_QEMU",
                    path.display()
                )
            })?;
        let text = String::from_utf8_lossy(&out.stdout);
        let version = text
            .split_whitespace()
            .skip_while(|w| *w != "version")
            .nth(1)
            .ok_or_else(|| format!("{} --version printed no version: {text}", path.display()))?
            .to_string();
        Ok(QemuBinary { path, version })
    }
}

/// Looks a program up on `PATH`.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// A running (or exited) QEMU process.
#[derive(Debug)]
pub struct QemuProcess {
    pid: Pid,
    /// Present when this process started QEMU; absent after re-attaching by pid.
    child: Option<tokio::process::Child>,
    log: PathBuf,
}

impl QemuProcess {
    /// Starts QEMU in a session of its own so it outlives the caller, logging to `log`.
    /// With `netns`, QEMU runs in that network namespace.
    pub fn spawn(
        qemu: &QemuBinary,
        args: Vec<OsString>,
        log: &Path,
        netns: Option<&kiln_net::Netns>,
        jail: Option<crate::jail::Jail>,
    ) -> Result<Self, VmmError> {
        let log_file = std::fs::File::create(log).map_err(|e| VmmError::io("creating", log, e))?;
        let err_file = log_file
            .try_clone()
            .map_err(|e| VmmError::io("opening", log, e))?;
        let mut cmd = tokio::process::Command::new(&qemu.path);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(err_file)
            .kill_on_drop(false);
        let netns_fd = netns.map(|n| n.raw_fd());
        // SAFETY: setns and setsid are async-signal-safe and touch no memory of the parent;
        // the namespace descriptor is owned by the caller's Netns, alive during the spawn;
        // `Jail::enter` makes system calls on data prepared before the fork and allocates
        // nothing.
        unsafe {
            cmd.pre_exec(move || {
                if let Some(fd) = netns_fd {
                    kiln_net::Netns::enter_in_child(fd)?;
                }
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(jail) = &jail {
                    jail.enter()?;
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| VmmError::Spawn {
            qemu: qemu.path.clone(),
            source: std::io::Error::new(
                e.kind(),
                format!("{e}; QEMU's log says: {}", tail(log, 5)),
            ),
        })?;
        let pid = child.id().ok_or_else(|| VmmError::Spawn {
            qemu: qemu.path.clone(),
            source: std::io::Error::other("QEMU exited at once"),
        })?;
        Ok(QemuProcess {
            pid: Pid::from_raw(pid as i32),
            child: Some(child),
            log: log.to_owned(),
        })
    }

    /// Re-attaches to a QEMU started earlier (by a previous daemon) from its pid file.
    pub fn attach(pid_file: &Path, log: &Path) -> Result<Self, VmmError> {
        let text =
            std::fs::read_to_string(pid_file).map_err(|e| VmmError::io("reading", pid_file, e))?;
        let pid: i32 = text.trim().parse().map_err(|_| VmmError::Io {
            doing: "parsing".into(),
            path: pid_file.to_owned(),
            source: std::io::Error::other(format!("not a pid: {text:?}")),
        })?;
        let p = QemuProcess {
            pid: Pid::from_raw(pid),
            child: None,
            log: log.to_owned(),
        };
        Ok(p)
    }

    /// Whether the process is a QEMU whose command line names `dir` (guards against a pid
    /// reused by another program after a reboot or a long downtime).
    pub fn runs_in(&self, dir: &Path) -> bool {
        let needle = dir.to_string_lossy().into_owned();
        std::fs::read(format!("/proc/{}/cmdline", self.pid))
            .map(|c| String::from_utf8_lossy(&c).contains(&needle))
            .unwrap_or(false)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid.as_raw() as u32
    }

    /// Whether the process still runs (reaping it if it is our child and has exited).
    pub fn is_alive(&mut self) -> bool {
        match &mut self.child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => kill(self.pid, None).is_ok() && !is_zombie(self.pid),
        }
    }

    /// The exit status once it has exited, as text.
    pub fn exit_status(&mut self) -> Option<String> {
        let child = self.child.as_mut()?;
        child.try_wait().ok().flatten().map(|s| s.to_string())
    }

    /// Waits for the process to exit, at most `timeout`. Returns whether it exited.
    pub async fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        if let Some(child) = &mut self.child {
            return tokio::time::timeout_at(deadline, child.wait())
                .await
                .is_ok();
        }
        while tokio::time::Instant::now() < deadline {
            if !self.is_alive() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        !self.is_alive()
    }

    /// Sends a signal to the process.
    pub fn signal(&self, sig: Signal) {
        let _ = kill(self.pid, sig);
    }

    /// Ends the process: SIGTERM, then SIGKILL after `grace`.
    pub async fn kill(&mut self, grace: Duration) {
        if !self.is_alive() {
            return;
        }
        self.signal(Signal::SIGTERM);
        if !self.wait_exit(grace).await {
            self.signal(Signal::SIGKILL);
            self.wait_exit(Duration::from_secs(5)).await;
        }
    }

    /// The last lines QEMU printed (for error messages).
    pub fn log_tail(&self) -> String {
        tail(&self.log, 12)
    }
}

fn is_zombie(pid: Pid) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
                .unwrap_or(false)
        })
        .unwrap_or(true)
}

/// The last `lines` lines of a text file, or an empty string.
///
/// The file is guest-written (a console, an app log), so only its last [`TAIL_BYTES`] are
/// read and each line is cut at [`TAIL_LINE_CHARS`] characters: what lands in an error
/// message stays small whatever the guest wrote.
pub fn tail(path: &Path, lines: usize) -> String {
    let Ok(mut file) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(TAIL_BYTES);
    let mut bytes = Vec::new();
    if file.seek(SeekFrom::Start(start)).is_err()
        || file.take(TAIL_BYTES).read_to_end(&mut bytes).is_err()
    {
        return String::new();
    }
    last_lines(&bytes, lines, start > 0)
}

/// How much of a log's end [`tail`] reads.
pub const TAIL_BYTES: u64 = 64 * 1024;
/// Where [`tail`] cuts a long line.
pub const TAIL_LINE_CHARS: usize = 400;

/// The last `lines` lines of `bytes`, each cut at [`TAIL_LINE_CHARS`]; `cut_before` says the
/// bytes start mid-file, so their first line may be a fragment and is dropped when others follow.
fn last_lines(bytes: &[u8], lines: usize, cut_before: bool) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut all: Vec<&str> = text.lines().collect();
    if cut_before && all.len() > 1 {
        all.remove(0);
    }
    all[all.len().saturating_sub(lines)..]
        .iter()
        .map(|line| match line.char_indices().nth(TAIL_LINE_CHARS) {
            Some((at, _)) => format!("{}…", &line[..at]),
            None => (*line).to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Kills every QEMU whose command line names a path under `dir`. Scanning processes rather
/// than reading a pid file also catches a QEMU that a crashed kilnd had just started, before
/// QEMU wrote its pid file.
pub fn kill_leftovers(dir: &Path) {
    let needle = format!("{}/", dir.display());
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return;
    };
    for p in procs.flatten() {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(p.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline);
        let is_qemu = cmdline
            .split('\0')
            .next()
            .is_some_and(|argv0| argv0.contains("qemu-system"));
        if is_qemu && cmdline.contains(&needle) {
            tracing::info!(pid, dir = %dir.display(), "killing a QEMU left behind");
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn tail_when_last_line_is_huge_then_cut_and_the_file_end_read_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("console.log");
        let mut text = "boot ok\n".repeat(100_000);
        text.push_str(&"x".repeat(1 << 20));
        std::fs::write(&log, text).expect("write");

        let got = tail(&log, 5);

        assert_eq!(got.chars().count(), TAIL_LINE_CHARS + 1, "{}", got.len());
        assert!(got.ends_with('…'));
    }

    #[test]
    fn tail_when_short_log_then_its_last_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("console.log");
        std::fs::write(&log, "one\ntwo\nthree\n").expect("write");

        assert_eq!(tail(&log, 2), "two\nthree");
    }

    proptest! {
        #[test]
        fn last_lines_when_any_bytes_then_at_most_lines_each_bounded(
            bytes in proptest::collection::vec(any::<u8>(), 0..4096),
            lines in 0usize..40,
            cut in any::<bool>(),
        ) {
            let got = last_lines(&bytes, lines, cut);

            prop_assert!(got.lines().count() <= lines.max(1));
            prop_assert!(got.lines().all(|l| l.chars().count() <= TAIL_LINE_CHARS + 1));
        }
    }
}

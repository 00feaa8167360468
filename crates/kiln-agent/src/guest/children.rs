//! The child table and its reaper: the only place in the process that waits for children.
//!
//! PID 1 must reap every orphan, so the reaper waits for any child. To never steal a
//! status from a caller that is still spawning (std's `spawn` itself waits for a child
//! whose `exec` failed), the reaper first peeks with `WNOWAIT`, then takes the table's
//! lock — which spawners hold across `spawn` and registration — and only then reaps.

use std::collections::HashMap;
use std::process::{Child, Command};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChildExit {
    /// Exit code when it exited.
    pub code: Option<i32>,
    /// Signal number when a signal killed it.
    pub signal: Option<i32>,
}

/// Pids of children someone waits for, with where to deliver their exit.
pub struct ChildTable {
    watchers: Mutex<HashMap<i32, Sender<ChildExit>>>,
}

impl ChildTable {
    /// The process-wide table; the first call starts the reaper thread.
    pub fn global() -> &'static ChildTable {
        static TABLE: OnceLock<ChildTable> = OnceLock::new();
        TABLE.get_or_init(|| {
            let spawned = std::thread::Builder::new()
                .name("reaper".into())
                .spawn(|| ChildTable::global().reap_forever());
            if let Err(e) = spawned {
                crate::console!("cannot start the reaper thread: {e}");
            }
            ChildTable {
                watchers: Mutex::new(HashMap::new()),
            }
        })
    }

    /// Spawns `command` and registers its pid before the reaper can look at it.
    pub fn spawn(&self, command: &mut Command) -> std::io::Result<(Child, Receiver<ChildExit>)> {
        let mut watchers = self.lock();
        let child = command.spawn()?;
        let (tx, rx) = mpsc::channel();
        // A pid fits in i32 on Linux.
        watchers.insert(child.id() as i32, tx);
        Ok((child, rx))
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<i32, Sender<ChildExit>>> {
        // A panic while holding the lock leaves the map consistent; keep going.
        self.watchers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn reap_forever(&self) {
        loop {
            let pid = match waitid(Id::All, WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
                Ok(status) => match status.pid() {
                    Some(pid) => pid,
                    None => continue,
                },
                Err(Errno::EINTR) => continue,
                Err(_) => {
                    // ECHILD: nobody to wait for yet.
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            let mut watchers = self.lock();
            let exit = match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(_, code)) => ChildExit {
                    code: Some(code),
                    signal: None,
                },
                Ok(WaitStatus::Signaled(_, signal, _)) => ChildExit {
                    code: None,
                    signal: Some(signal as i32),
                },
                // Already reaped by a failed spawn, or not a final status.
                _ => continue,
            };
            if let Some(tx) = watchers.remove(&pid.as_raw()) {
                let _ = tx.send(exit);
            }
            drop(watchers);
        }
    }
}

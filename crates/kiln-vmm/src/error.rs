//! The errors a VM operation can end in. Each says what failed, on what, and what to do.

use std::path::{Path, PathBuf};

use crate::qemu::qmp::QmpError;

/// Errors from booting, driving, snapshotting and restoring VMs.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The VM's network namespace, its rules or its egress gateway could not be set up.
    #[error("isolating the VM's network: {0} (kiln needs root, iproute2 and nftables: make deps)")]
    Network(String),
    /// QEMU cannot be found or run.
    #[error("QEMU is not usable: {0}")]
    QemuMissing(String),
    /// A file the VM needs is missing.
    #[error("{what} not found at {path}: {hint}")]
    Missing {
        what: &'static str,
        path: PathBuf,
        hint: &'static str,
    },
    /// A filesystem operation failed.
    #[error("{doing} {path} failed: {source}")]
    Io {
        doing: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// QEMU could not be started.
    #[error("cannot start QEMU ({qemu}): {source}")]
    Spawn {
        qemu: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The VM spec cannot work.
    #[error("invalid VM spec: {0}")]
    InvalidSpec(String),
    /// QEMU exited while kiln was waiting for it.
    #[error("QEMU exited while {doing} ({status}).\nQEMU said:\n{qemu_log}\nguest console (last lines):\n{console}")]
    QemuDied {
        doing: String,
        status: String,
        qemu_log: String,
        console: String,
    },
    /// The guest agent did not answer.
    #[error("the guest agent did not answer within {timeout:?} while {doing}: {source}\nguest console (last lines):\n{console}")]
    AgentUnresponsive {
        doing: String,
        timeout: std::time::Duration,
        #[source]
        source: kiln_agent::client::AgentError,
        console: String,
    },
    /// A request to the guest agent failed.
    #[error("guest agent: {doing}: {source}")]
    Agent {
        doing: String,
        #[source]
        source: kiln_agent::client::AgentError,
    },
    /// A QMP command failed.
    #[error("QEMU control (QMP) failed while {doing}: {source}")]
    Qmp {
        doing: String,
        #[source]
        source: QmpError,
    },
    /// A failure a test asked the fake backend for.
    #[cfg(feature = "fake")]
    #[error("{0} (a failure injected by the fake backend)")]
    Injected(String),
    /// A snapshot directory cannot be used.
    #[error("snapshot {dir} cannot be restored: {reason}")]
    BadSnapshot { dir: PathBuf, reason: String },
    /// Migration (snapshot or restore stream) failed.
    #[error("{doing} failed: migration status '{status}'{detail}")]
    Migration {
        doing: String,
        status: String,
        detail: String,
    },
    /// The guest kernel or initramfs cannot be prepared.
    #[error(transparent)]
    Assets(#[from] crate::assets::AssetError),
    /// The accelerator cannot be chosen.
    #[error(transparent)]
    Accel(#[from] crate::accel::AccelError),
    /// The host TSC frequency is unknown.
    #[error(transparent)]
    Tsc(#[from] crate::tsc::TscError),
    /// The VM has no memory it can grow into (no virtio-mem device), or was asked beyond it.
    #[error("the VM cannot have {requested_mib} MiB plugged: {reason}")]
    MemoryOutOfRange { requested_mib: u64, reason: String },
    /// The guest did not plug or unplug the memory asked of it in time (an unplug waits for
    /// the guest to move its pages out, and fails while they are pinned).
    #[error("the guest has {plugged_mib} MiB plugged {waited:?} after {requested_mib} MiB was asked (it may still be getting there, or cannot free that memory); ask again, or ask for what it has")]
    MemoryNotSettled {
        requested_mib: u64,
        plugged_mib: u64,
        waited: std::time::Duration,
    },
    /// A helper program (qemu-img, cp, ...) failed.
    #[error("{program} failed: {detail}")]
    Tool { program: String, detail: String },
}

impl VmmError {
    /// Shorthand for an [`VmmError::Io`].
    pub fn io(doing: &str, path: &Path, source: std::io::Error) -> VmmError {
        VmmError::Io {
            doing: doing.to_string(),
            path: path.to_owned(),
            source,
        }
    }

    /// Shorthand for a [`VmmError::Qmp`].
    pub fn qmp(doing: &str) -> impl FnOnce(QmpError) -> VmmError + '_ {
        move |source| VmmError::Qmp {
            doing: doing.to_string(),
            source,
        }
    }

    /// Shorthand for a [`VmmError::Agent`].
    pub fn agent(doing: &str) -> impl FnOnce(kiln_agent::client::AgentError) -> VmmError + '_ {
        move |source| VmmError::Agent {
            doing: doing.to_string(),
            source,
        }
    }
}

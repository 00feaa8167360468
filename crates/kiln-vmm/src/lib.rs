//! The `Vmm` seam and its QEMU backend.
//!
//! A [`VmSpec`] describes one microVM; a [`Vmm`] boots it or restores a [`Snapshot`] into a
//! new one; a [`MicroVm`] is driven through the backend and the guest agent, snapshotted, and
//! terminated. Both traits are object-safe: callers hold `Arc<dyn Vmm>` and
//! `Box<dyn MicroVm>` and never name a backend. The QEMU backend lives in [`qemu`]; an
//! in-memory one for tests in `fake` (feature `fake`); another VMM would implement the same
//! traits. What kiln tells a guest whatever runs it (clock, entropy) is in [`guest`].

pub mod accel;
pub mod assets;
pub mod cgroup;
pub mod crash;
mod error;
#[cfg(feature = "fake")]
pub mod fake;
pub mod guest;
pub mod home;
pub mod host;
pub mod host_tools;
pub mod jail;
pub mod ksm;
pub mod qemu;
pub mod snapshot;
pub mod spec;
pub mod suspend;
pub mod tsc;

use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::{Duration, Instant};

use kiln_agent::client::AgentClient;
pub use kiln_net::{Netns, VmEgress};
use tokio::net::TcpStream;

pub use crash::crash_point;
pub use error::VmmError;
pub use snapshot::Snapshot;
pub use spec::{DiskFormat, DiskSpec, MachineKind, MemoryFile, NetSpec, PortForward, VmSpec};
pub use suspend::{SuspendError, SuspendedVm};

/// A boxed future, so that the seam's traits stay object-safe (`Arc<dyn Vmm>`,
/// `Box<dyn MicroVm>`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a backend makes of a boot, restore, resume or attach: a running VM.
pub type VmResult = Result<Box<dyn MicroVm>, VmmError>;

/// A virtual machine monitor: boots VMs and restores snapshots into new ones. Its callers
/// (kilnd, kiln-image) hold an `Arc<dyn Vmm>`; everything specific to one VMM (processes,
/// disk layering, compatibility of saved state) stays behind it.
pub trait Vmm: Send + Sync + fmt::Debug {
    /// Which VMM this is and its version (saved state is tied to it).
    fn describe(&self) -> Backend;

    /// Boots `spec` and returns once the guest agent answers.
    fn boot(&self, spec: VmSpec, opts: BootOptions) -> BoxFuture<'_, VmResult>;

    /// Restores `snapshot` into a new VM with its own disk overlays and forwards, sets the
    /// guest's clock, feeds it entropy, and returns once the agent answers.
    fn restore<'a>(
        &'a self,
        snapshot: &'a Snapshot,
        target: RestoreTarget,
    ) -> BoxFuture<'a, VmResult>;

    /// Resumes a VM that [`MicroVm::suspend`] saved: a new process loads its memory and
    /// devices, takes over its disks and gets `target`'s forwards; the guest's clock is set and
    /// its RNG reseeded. Returns once the agent answers. On success the suspended directory is
    /// removed (the session lives on in the returned VM); on failure it is left whole, so the
    /// resume can be retried.
    fn resume<'a>(
        &'a self,
        suspended: &'a SuspendedVm,
        target: RestoreTarget,
    ) -> BoxFuture<'a, VmResult>;

    /// Finds the VM a previous process started in `dir` (the supervisor restarted) and
    /// takes it over, when it still runs.
    fn attach<'a>(&'a self, dir: &'a Path) -> BoxFuture<'a, VmResult>;

    /// Ends whatever VM process still runs for a VM directory under `dir` (left by a crash,
    /// or started just before one), however the backend finds its processes.
    fn kill_leftovers(&self, dir: &Path);

    /// Opens a snapshot directory and checks that this backend can restore it. Blocking
    /// (reads and hashes files): call it through [`blocking`].
    fn open_snapshot(&self, dir: &Path) -> Result<Snapshot, VmmError>;

    /// Opens a suspended directory and checks that this backend can resume it. Blocking:
    /// call it through [`blocking`].
    fn open_suspended(&self, dir: &Path) -> Result<SuspendedVm, VmmError>;

    /// Creates a writable disk at `top` layered on the read-only `base` (in `format`): its
    /// writes stay in `top`. Blocking.
    fn create_overlay(&self, base: &Path, format: DiskFormat, top: &Path) -> Result<(), VmmError>;
}

/// Which VMM a backend runs, for logs, `kiln doctor` and compatibility checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// The VMM's name, e.g. `QEMU`.
    pub name: &'static str,
    /// Its version, as saved state records it.
    pub version: String,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.name, self.version)
    }
}

/// A running microVM.
pub trait MicroVm: Send + Sync {
    /// The guest agent.
    fn agent(&self) -> &AgentClient;
    /// When each start-up step finished, measured from the start of boot or restore.
    fn timeline(&self) -> &Timeline;
    /// The host process running the VM, if it has one of its own.
    fn process_id(&self) -> Option<u32>;
    /// The last `lines` lines of what the guest's app wrote (its app log), cut to a size fit
    /// for an error message.
    fn app_log_tail(&self, lines: usize) -> String;
    /// The host→guest forwards the VM has now.
    fn forwards(&self) -> Vec<PortForward>;
    /// Its vCPUs: the baseline it is granted at start and the ceiling it can grow to.
    fn vcpu_range(&self) -> VcpuRange;
    /// The host CPU time the VM has used so far, all its threads (`None`: nothing on the host
    /// counts it, e.g. it runs without a cgroup).
    fn cpu_time(&self) -> Option<Duration>;
    /// Grants the VM `vcpus` vCPUs' worth of host CPU from now on. The host holds it to that
    /// whatever its guest onlines; fails where nothing on the host would (then the VM must
    /// not grow).
    fn set_cpu_grant(&self, vcpus: u32) -> Result<(), VmmError>;
    /// Its memory: the baseline it boots with and the ceiling the host may grow it to.
    fn memory_range(&self) -> MemoryRange;
    /// The memory in MiB plugged into the guest beyond its baseline now.
    fn plugged_memory(&self) -> BoxFuture<'_, Result<u64, VmmError>>;
    /// Plugs (or unplugs) memory so that the guest has `mib` MiB beyond its baseline, rounded
    /// up to the device's blocks, and waits (bounded) until the guest has taken (or given back)
    /// all of it; returns what is plugged then. The guest cannot plug anything itself.
    fn set_plugged_memory(&self, mib: u64) -> BoxFuture<'_, Result<u64, VmmError>>;
    /// Asks the guest to have `mib` MiB beyond its baseline, rounded up to the device's
    /// blocks, without waiting: the guest onlines plugged memory at once and gives memory back
    /// as it frees it, which [`MicroVm::plugged_memory`] shows. Returns the rounded request.
    fn request_memory(&self, mib: u64) -> BoxFuture<'_, Result<u64, VmmError>>;
    /// Holds the VM on the host to its baseline plus `mib` MiB of guest memory (and QEMU's
    /// own) from now on, whatever its guest touches; fails where nothing on the host would.
    /// Lowered below what the VM holds, the host reclaims or ends the VM: lower it only to
    /// memory the guest has given back.
    fn set_memory_grant(&self, mib: u64) -> Result<(), VmmError>;
    /// Pauses the vCPUs.
    fn pause(&self) -> BoxFuture<'_, Result<(), VmmError>>;
    /// Continues paused vCPUs.
    fn resume(&self) -> BoxFuture<'_, Result<(), VmmError>>;
    /// Whether the VM runs, is paused, or has exited.
    fn status(&mut self) -> BoxFuture<'_, VmStatus>;
    /// The network namespace the VM's forwards listen in (`None`: no network device).
    fn netns(&self) -> Option<std::sync::Arc<Netns>>;
    /// Connects to a forward's host port (inside the VM's namespace).
    fn connect_forward(&self, host_port: u16) -> BoxFuture<'_, std::io::Result<TcpStream>> {
        let netns = self.netns();
        Box::pin(async move {
            let netns =
                netns.ok_or_else(|| std::io::Error::other("this VM has no network device"))?;
            netns
                .connect(std::net::SocketAddr::from(([127, 0, 0, 1], host_port)))
                .await
        })
    }
    /// Attaches (or re-attaches, after kilnd restarted) the egress gateway to the VM's
    /// namespace, replacing any earlier attachment.
    fn set_egress<'a>(&'a mut self, egress: &'a VmEgress) -> BoxFuture<'a, Result<(), VmmError>>;
    /// Adds a host→guest TCP forward while the VM runs.
    fn add_forward(&mut self, forward: PortForward) -> BoxFuture<'_, Result<(), VmmError>>;
    /// Freezes disk `index` as it is now and continues writing to a new overlay at
    /// `new_top` (a live external snapshot). The frozen file becomes a read-only layer.
    /// Sync the guest first, or the layer misses data still in its page cache.
    fn freeze_disk_layer<'a>(
        &'a mut self,
        index: usize,
        new_top: &'a Path,
    ) -> BoxFuture<'a, Result<(), VmmError>>;
    /// Syncs the guest, pauses it and saves memory, devices and disks into `dest`; the VM is
    /// consumed (it must never run again, its memory file now belongs to the snapshot).
    fn snapshot<'a>(self: Box<Self>, dest: &'a Path) -> BoxFuture<'a, Result<Snapshot, VmmError>>;
    /// Syncs the guest (keeping its page cache), pauses it and saves all of it (RAM, devices,
    /// writable disks) into `dest`, then ends the VM's process so the host gets its memory back.
    /// On failure the VM is handed back running when its process survived.
    fn suspend<'a>(
        self: Box<Self>,
        dest: &'a Path,
    ) -> BoxFuture<'a, Result<SuspendedVm, SuspendError<Box<dyn MicroVm>>>>;
    /// Stops the VM (guest power-off, then signals) and removes its runtime directory.
    fn terminate(self: Box<Self>) -> BoxFuture<'static, Result<(), VmmError>>;
}

/// The vCPUs of a VM: present from the start are `ceiling` (`-smp`), of which `baseline`
/// are online and granted when it starts; the rest wait offline for the host to grant them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VcpuRange {
    /// Online and granted at start.
    pub baseline: u32,
    /// The most it can have online.
    pub ceiling: u32,
}

impl VcpuRange {
    /// The range of the VM `spec` describes.
    pub fn of(spec: &VmSpec) -> VcpuRange {
        VcpuRange {
            baseline: spec.baseline(),
            ceiling: spec.vcpus.max(1),
        }
    }

    /// Whether it can grow at all.
    pub fn can_grow(&self) -> bool {
        self.ceiling > self.baseline
    }
}

/// The memory of a VM in MiB: it boots with `baseline`, and the host may plug more into it up
/// to `ceiling` (equal: its memory is fixed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryRange {
    /// What it boots with.
    pub baseline: u64,
    /// The most it can have.
    pub ceiling: u64,
}

impl MemoryRange {
    /// The range of the VM `spec` describes.
    pub fn of(spec: &VmSpec) -> MemoryRange {
        MemoryRange {
            baseline: spec.memory_mib,
            ceiling: spec.memory_ceiling_mib(),
        }
    }

    /// Whether it can grow at all.
    pub fn can_grow(&self) -> bool {
        self.ceiling > self.baseline
    }
}

/// Options for a cold boot.
#[derive(Debug, Clone)]
pub struct BootOptions {
    /// How long to wait for the guest agent.
    pub agent_timeout: Duration,
    /// The guest's way out, if any: without one a networked guest reaches nothing but its
    /// own forwards.
    pub egress: Option<VmEgress>,
}

impl Default for BootOptions {
    fn default() -> Self {
        BootOptions {
            agent_timeout: Duration::from_secs(90),
            egress: None,
        }
    }
}

/// Where and how a snapshot is restored.
#[derive(Debug, Clone)]
pub struct RestoreTarget {
    /// The new VM's runtime directory (holds its disk overlays too).
    pub dir: PathBuf,
    /// Its host port forwards.
    pub forwards: Vec<PortForward>,
    /// Deny guest egress (implied when `egress` is `None`).
    pub restrict_egress: bool,
    /// How long to wait for the guest agent after `cont`.
    pub agent_timeout: Duration,
    /// The guest's way out, if any.
    pub egress: Option<VmEgress>,
    /// Keep nothing the guest writes to its app log (RunMicrovm `logging: disabled`).
    pub discard_app_log: bool,
}

impl RestoreTarget {
    /// A target in `dir` with no forwards.
    pub fn new(dir: impl Into<PathBuf>) -> RestoreTarget {
        RestoreTarget {
            dir: dir.into(),
            forwards: Vec::new(),
            restrict_egress: false,
            agent_timeout: Duration::from_secs(20),
            egress: None,
            discard_app_log: false,
        }
    }
}

/// What a VM is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmStatus {
    /// vCPUs run.
    Running,
    /// vCPUs are stopped.
    Paused,
    /// The VM has exited (with this status).
    Exited(String),
    /// Another run state the backend reports.
    Other(String),
}

/// Named instants since the start of a boot or restore.
#[derive(Debug, Clone, Default)]
pub struct Timeline(Vec<(&'static str, Duration)>);

impl Timeline {
    /// Records that `step` finished now.
    pub fn mark(&mut self, step: &'static str, since: Instant) {
        self.0.push((step, since.elapsed()));
    }
    /// When `step` finished, if it did.
    pub fn get(&self, step: &str) -> Option<Duration> {
        self.0.iter().find(|(s, _)| *s == step).map(|(_, d)| *d)
    }
    /// All steps in order.
    pub fn steps(&self) -> &[(&'static str, Duration)] {
        &self.0
    }
}

/// Runs blocking work (files, hashing, host tools such as qemu-img) on tokio's blocking
/// pool, so that the runtime's few workers go on serving requests meanwhile. A panic in `f`
/// goes on in the caller.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => panic!("blocking work was cancelled (the runtime is shutting down): {e}"),
    }
}

/// A TCP port for a forward. Forwards listen inside the VM's own network namespace, so
/// any port is free there; one free on the host's loopback is picked so that two VMs'
/// ports never look alike in logs.
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

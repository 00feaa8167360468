//! The QEMU backend of the [`Vmm`](crate::Vmm) seam: machine `microvm`, memory in a file,
//! device state through migration with `x-ignore-shared`.

pub mod cmdline;
pub mod logcap;
mod netpool;
pub mod process;
pub mod qmp;
mod seam;
mod session;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use kiln_agent::client::AgentClient;
use serde_json::json;

use crate::jail::{self, Jail, JailConfig};
use crate::snapshot::{self, Snapshot, SnapshotDisk, SnapshotManifest, SNAPSHOT_FORMAT};
use crate::spec::{DiskFormat, DiskSpec, MachineKind, MemoryFile, NetSpec, PortForward, VmSpec};
use crate::suspend::{SuspendError, SuspendedVm};
use crate::{BootOptions, Netns, RestoreTarget, Timeline, VmEgress, VmStatus, VmmError};
use process::{QemuBinary, QemuProcess};
use qmp::Qmp;

/// Longest path a unix socket address can hold (sun_path, with its NUL).
const SOCKET_PATH_MAX: usize = 107;
/// How long QEMU may take to open its QMP socket.
const QMP_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a snapshot's or restore's migration may take.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(120);
/// Migration bandwidth for suspends (bytes/s): no cap, the guest is paused anyway.
const SUSPEND_BANDWIDTH: u64 = 1 << 40;
/// How long the guest may take to plug or unplug the memory asked of it: it works through
/// the blocks itself (an unplug first moves the pages out of them).
const MEMORY_SETTLE_TIMEOUT: Duration = Duration::from_secs(30);
/// The name under which QEMU holds the descriptor of a migration stream (QMP `getfd`).
const MIGRATION_FD: &str = "kiln-migration";

/// Runs VMs with QEMU.
#[derive(Debug, Clone)]
pub struct QemuVmm {
    qemu: QemuBinary,
}

impl QemuVmm {
    /// Finds QEMU (see [`QemuBinary::find`]).
    pub fn new() -> Result<QemuVmm, VmmError> {
        Ok(QemuVmm {
            qemu: QemuBinary::find()?,
        })
    }

    /// The QEMU binary in use.
    pub fn qemu(&self) -> &QemuBinary {
        &self.qemu
    }

    /// Starts QEMU for `spec` and waits until its QMP socket answers; kills QEMU and removes
    /// the runtime directory if anything fails.
    async fn start(
        &self,
        spec: VmSpec,
        incoming: bool,
        t0: Instant,
        egress: Option<&VmEgress>,
    ) -> Result<QemuVm, VmmError> {
        let args = cmdline::args(&spec, incoming);
        self.start_with(spec, args, t0, egress).await
    }

    /// [`start`](Self::start) with a prepared argument vector.
    async fn start_with(
        &self,
        mut spec: VmSpec,
        args: Vec<OsString>,
        t0: Instant,
        egress: Option<&VmEgress>,
    ) -> Result<QemuVm, VmmError> {
        // Steps before QMP answers, for the launch's account: files ready (disks, memory),
        // jail planned, network namespace up, QEMU spawned.
        let mut timeline = Timeline::default();
        timeline.mark("files", t0);
        let jail = match confine(&mut spec, &self.qemu) {
            Ok(j) => j,
            Err(e) => {
                remove_dir(&spec.dir);
                return Err(e);
            }
        };
        timeline.mark("jailed", t0);
        let (netns, attachment) = match isolate(&spec, egress).await {
            Ok(n) => n,
            Err(e) => {
                remove_dir(&spec.dir);
                return Err(e);
            }
        };
        timeline.mark("netns", t0);
        // fork, the jail's set-up in the child and exec take ~15 ms: off the async workers,
        // which meanwhile go on serving (the endpoint's requests among them).
        let spawned = {
            let (qemu, log, netns) = (self.qemu.clone(), spec.qemu_log(), netns.clone());
            crate::blocking(move || QemuProcess::spawn(&qemu, args, &log, netns.as_deref(), jail))
                .await
        };
        let mut process = match spawned {
            Ok(p) => p,
            Err(e) => {
                remove_dir(&spec.dir);
                return Err(e);
            }
        };
        timeline.mark("spawned", t0);
        let qmp_socket = spec.qmp_socket();
        let qmp = tokio::select! {
            r = Qmp::connect(&qmp_socket, QMP_TIMEOUT) => r.map_err(VmmError::qmp("connecting")),
            e = watch_exit(&mut process, &spec, "starting") => Err(e),
        };
        let qmp = match qmp {
            Ok(q) => q,
            Err(e) => {
                let e = prefer_death(&mut process, &spec, "starting", e).await;
                process.kill(Duration::from_secs(1)).await;
                remove_dir(&spec.dir);
                return Err(e);
            }
        };
        timeline.mark("qmp", t0);
        let (spec_console, spec_app_log) = (spec.console_log(), spec.app_log());
        Ok(QemuVm {
            qemu: self.qemu.clone(),
            spec,
            process,
            qmp,
            agent: None,
            timeline,
            t0,
            netns,
            egress: attachment,
            _log_cap: logcap::LogCap::start(vec![spec_console, spec_app_log]),
        })
    }
}

/// Records the VM's spec and, unless the operator turned confinement off, claims the VM's
/// own uid, hands it its files and plans its jail (see [`crate::jail`]).
fn confine(spec: &mut VmSpec, qemu: &QemuBinary) -> Result<Option<Jail>, VmmError> {
    let Some(config) = JailConfig::current()? else {
        write_spec(spec)?;
        return Ok(None);
    };
    let id = jail::claim(config, &spec.dir)?;
    spec.jail = Some(id);
    write_spec(spec)?;
    jail::prepare_files(spec, id, config)?;
    // The ceiling, not the baseline: a suspended session may come back with memory plugged,
    // and QEMU would be killed loading it. The host bounds a growing VM by its ceiling.
    let limits = crate::cgroup::Limits::for_guest(spec.baseline(), spec.memory_ceiling_mib());
    let cgroup = match crate::cgroup::VmCgroup::create(&spec.dir, limits) {
        Ok(cg) => cg,
        Err(e) => {
            tracing::warn!(error = %e, "the VM runs WITHOUT a cgroup (no memory, pids or CPU limit)");
            None
        }
    };
    Jail::plan(spec, id, config, &qemu.path).map(|j| Some(j.with_cgroup(cgroup)))
}

/// A networked VM's own namespace, its rules, and (with `egress`) the gateway serving it.
/// The guest reaches nothing at all until the rules are in place: QEMU starts after this.
async fn isolate(
    spec: &VmSpec,
    egress: Option<&VmEgress>,
) -> Result<(Option<Arc<Netns>>, Option<kiln_net::Attachment>), VmmError> {
    if spec.network.is_none() {
        return Ok((None, None));
    }
    let netns = netpool::take()
        .await
        .map_err(|e| VmmError::Network(e.to_string()))?;
    let attachment = match egress {
        Some(egress) => Some(
            egress
                .attach(&netns)
                .await
                .map_err(|e| VmmError::Network(e.to_string()))?,
        ),
        None => None,
    };
    Ok((Some(Arc::new(netns)), attachment))
}

impl QemuVmm {
    /// Re-attaches to a VM that a previous process started in `dir` (kilnd restarted):
    /// checks that its QEMU still runs, reconnects QMP and the guest agent.
    async fn reattach(&self, dir: &Path) -> Result<QemuVm, VmmError> {
        let t0 = Instant::now();
        let spec_path = dir.join(SPEC_FILE);
        let text = std::fs::read(&spec_path).map_err(|e| VmmError::io("reading", &spec_path, e))?;
        let spec: VmSpec = serde_json::from_slice(&text).map_err(|e| {
            VmmError::InvalidSpec(format!("{} is unreadable: {e}", spec_path.display()))
        })?;
        let mut process = QemuProcess::attach(&spec.pid_file(), &spec.qemu_log())?;
        if !process.is_alive() || !process.runs_in(dir) {
            return Err(VmmError::QemuDied {
                doing: "re-attaching".into(),
                status: "not running".into(),
                qemu_log: process.log_tail(),
                console: process::tail(&spec.console_log(), 15),
            });
        }
        let qmp = Qmp::connect(&spec.qmp_socket(), Duration::from_secs(5))
            .await
            .map_err(VmmError::qmp("reconnecting"))?;
        continue_interrupted_suspend(&qmp).await?;
        let mut timeline = Timeline::default();
        timeline.mark("qmp", t0);
        let netns = match spec.network {
            Some(_) => Some(Arc::new(
                Netns::of_pid(process.pid()).map_err(|e| VmmError::Network(e.to_string()))?,
            )),
            None => None,
        };
        let logs = vec![spec.console_log(), spec.app_log()];
        let mut vm = QemuVm {
            qemu: self.qemu.clone(),
            spec,
            process,
            qmp,
            agent: None,
            timeline,
            t0,
            _log_cap: logcap::LogCap::start(logs),
            netns,
            egress: None,
        };
        let agent = vm
            .connect_agent(Duration::from_secs(10), "re-attaching")
            .await?;
        vm.agent = Some(agent);
        vm.timeline.mark("agent", t0);
        Ok(vm)
    }
}

/// A guest that a crashed supervisor left paused — mid-suspend, or with its state loaded by a
/// resume but not yet started — runs again: any migration is cancelled and the guest continues.
/// A VM still loading its state (`inmigrate`) has no session in it yet and is refused.
async fn continue_interrupted_suspend(qmp: &Qmp) -> Result<(), VmmError> {
    let status = qmp
        .status()
        .await
        .map_err(VmmError::qmp("reading the VM's run state"))?;
    match status.as_str() {
        "running" => return Ok(()),
        "paused" | "postmigrate" | "finish-migrate" => {}
        other => {
            return Err(VmmError::Migration {
                doing: "re-attaching".into(),
                status: other.to_string(),
                detail: "; the VM never finished loading its saved state".into(),
            })
        }
    }
    let _ = qmp.execute("migrate_cancel", None).await;
    settle_migration(qmp).await;
    tracing::warn!(%status, "re-attached to a paused VM (an interrupted suspend or resume); continuing it");
    qmp.execute("cont", None)
        .await
        .map(drop)
        .map_err(VmmError::qmp("continuing a VM left paused"))
}

/// Waits (up to 10 s) until no outgoing migration is in flight.
async fn settle_migration(qmp: &Qmp) {
    let settle = Instant::now() + Duration::from_secs(10);
    while Instant::now() < settle {
        match qmp.execute("query-migrate", None).await {
            Ok(st)
                if matches!(
                    st["status"].as_str(),
                    Some("active" | "cancelling" | "setup" | "device")
                ) =>
            {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            _ => break,
        }
    }
}

/// The [`Vmm`](crate::Vmm) operations; `seam.rs` implements the trait with these.
impl QemuVmm {
    /// See [`Vmm::attach`](crate::Vmm::attach).
    pub async fn attach(&self, dir: &Path) -> Result<QemuVm, VmmError> {
        self.reattach(dir).await
    }

    /// See [`Vmm::kill_leftovers`](crate::Vmm::kill_leftovers).
    pub fn kill_leftovers(&self, dir: &Path) {
        process::kill_leftovers(dir)
    }

    /// See [`Vmm::boot`](crate::Vmm::boot).
    pub async fn boot(&self, spec: VmSpec, opts: BootOptions) -> Result<QemuVm, VmmError> {
        let t0 = Instant::now();
        validate(&spec)?;
        create_runtime_dir(&spec.dir)?;
        let mut vm = self.start(spec, false, t0, opts.egress.as_ref()).await?;
        let agent = vm.connect_agent(opts.agent_timeout, "booting").await;
        match agent {
            Ok(a) => {
                vm.agent = Some(a);
                vm.timeline.mark("agent", t0);
                Ok(vm)
            }
            Err(e) => {
                vm.abort().await;
                Err(e)
            }
        }
    }

    /// See [`Vmm::restore`](crate::Vmm::restore).
    pub async fn restore(
        &self,
        snap: &Snapshot,
        target: RestoreTarget,
    ) -> Result<QemuVm, VmmError> {
        self.restore_snapshot(snap, target).await
    }

    /// See [`Vmm::resume`](crate::Vmm::resume).
    pub async fn resume(
        &self,
        sus: &SuspendedVm,
        target: RestoreTarget,
    ) -> Result<QemuVm, VmmError> {
        let vm = self.restore_snapshot(&sus.snapshot, target).await?;
        crate::crash_point("resume-running");
        // The session now lives in the running VM (its disks and memory file keep their new
        // names in the runtime directory).
        if let Err(e) = std::fs::remove_dir_all(sus.dir()) {
            tracing::warn!(dir = %sus.dir().display(), error = %e, "cannot remove a resumed session's directory");
        }
        Ok(vm)
    }

    /// The one restore path, for a launch (an image: an overlay on each disk, its memory file
    /// mapped privately) and for a resume (a session: its disks and memory file linked into
    /// the new runtime directory and taken over, the memory mapped privately all the same).
    async fn restore_snapshot(
        &self,
        snap: &Snapshot,
        target: RestoreTarget,
    ) -> Result<QemuVm, VmmError> {
        let t0 = Instant::now();
        let m = &snap.manifest;
        let session = snap.is_session();
        if m.qemu_version != self.qemu.version {
            return Err(VmmError::BadSnapshot {
                dir: snap.dir.clone(),
                reason: format!(
                    "it was saved by QEMU {}, this host runs QEMU {}; device state does not \
                     cross QEMU versions",
                    m.qemu_version, self.qemu.version
                ),
            });
        }
        create_runtime_dir(&target.dir)?;
        // qemu-img and links run off the async runtime: a launch must not stall other requests.
        let layers: Vec<(PathBuf, DiskFormat)> = m
            .disks
            .iter()
            .map(|d| (snap.disk_path(d), d.format))
            .collect();
        let memory = snap.memory_path();
        let dir = target.dir.clone();
        let made = crate::blocking(move || {
            let mut disks = Vec::with_capacity(layers.len());
            for (i, (base, format)) in layers.iter().enumerate() {
                let disk = if session {
                    // Links, not moves: the session stays whole until the resumed guest runs.
                    let to = dir.join(snapshot::disk_file_name(i, *format));
                    link_or_copy(base, &to)?;
                    DiskSpec {
                        path: to,
                        format: *format,
                        read_only: false,
                    }
                } else {
                    let overlay = dir.join(format!("disk{i}.qcow2"));
                    create_overlay(base, *format, &overlay)?;
                    DiskSpec {
                        path: overlay,
                        format: DiskFormat::Qcow2,
                        read_only: false,
                    }
                };
                disks.push(disk);
            }
            let memory = if session {
                let to = dir.join(snapshot::MEMORY);
                link_or_copy(&memory, &to)?;
                to
            } else {
                memory
            };
            Ok::<_, VmmError>((disks, memory))
        })
        .await;
        let (disks, memory) = match made {
            Ok(made) => made,
            Err(e) => {
                remove_dir(&target.dir);
                return Err(e);
            }
        };
        let spec = VmSpec {
            dir: target.dir.clone(),
            vcpus: m.vcpus,
            baseline_vcpus: m.baseline_vcpus,
            memory_mib: m.memory_mib,
            machine: m.machine_kind,
            max_memory_mib: m.max_memory_mib,
            kernel: snap.kernel_path(),
            initramfs: snap.initramfs_path(),
            cmdline_extra: m.cmdline_extra.clone(),
            disks,
            network: m.network.then(|| NetSpec {
                forwards: target.forwards.clone(),
                restrict_egress: target.restrict_egress || target.egress.is_none(),
            }),
            memory_file: Some(MemoryFile {
                path: memory,
                shared: false,
            }),
            accel: m.accel,
            tsc_khz: m.tsc_khz,
            jail: None,
            discard_app_log: target.discard_app_log,
        };
        let checked = validate(&spec).and_then(|()| compatible(snap, &spec));
        if let Err(e) = checked {
            remove_dir(&target.dir);
            return Err(e);
        }
        if session {
            // What the app wrote before the suspend reads as the log's older part.
            let carried = snap.dir.join(CARRIED_APP_LOG);
            if carried.exists() {
                let mut older = spec.app_log().into_os_string();
                older.push(".1");
                if let Err(e) = std::fs::copy(&carried, &older) {
                    tracing::warn!(error = %e, "cannot bring the app log back after the suspend");
                }
            }
        }
        let mut vm = self.start(spec, true, t0, target.egress.as_ref()).await?;
        if session {
            crate::crash_point("resume-loading");
        }
        match vm.finish_restore(snap, &target).await {
            Ok(()) => Ok(vm),
            Err(e) => {
                vm.abort().await;
                Err(e)
            }
        }
    }
}

/// Whether `spec` rebuilds the machine `snap` was saved from: same CPU model and machine
/// signature (machine options, memory, vCPUs, device layout). Device state loads only into
/// the same machine; a mismatch would fail deep inside QEMU with a less helpful message.
fn compatible(snap: &Snapshot, spec: &VmSpec) -> Result<(), VmmError> {
    let m = &snap.manifest;
    let (cpu, machine) = (
        cmdline::cpu_model(spec.accel),
        cmdline::machine_signature(spec),
    );
    if m.cpu != cpu || m.machine != machine {
        return Err(VmmError::BadSnapshot {
            dir: snap.dir.clone(),
            reason: format!(
                "it was saved from a different machine (CPU {}, {}) than this kiln builds for it \
                 (CPU {cpu}, {machine}); rebuild the image with this kiln",
                m.cpu, m.machine
            ),
        });
    }
    Ok(())
}

/// Hard-links `from` to `to`, or copies it (sparsely) when they are on different file systems.
fn link_or_copy(from: &Path, to: &Path) -> Result<(), VmmError> {
    match std::fs::hard_link(from, to) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            let out = std::process::Command::new("cp")
                .args(["--sparse=always", "--reflink=auto"])
                .arg(from)
                .arg(to)
                .output()
                .map_err(|e| VmmError::io("copying", from, e))?;
            if out.status.success() {
                Ok(())
            } else {
                let _ = std::fs::remove_file(to);
                Err(VmmError::Tool {
                    program: "cp".into(),
                    detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
                })
            }
        }
        Err(e) => Err(VmmError::io("linking", from, e)),
    }
}

/// What a log file gained after byte `mark` (at most its last 2 KiB), trimmed.
fn log_since(path: &Path, mark: u64) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let mut text = Vec::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let len = f.metadata().map_or(0, |m| m.len());
        let start = mark.max(len.saturating_sub(2048));
        if f.seek(SeekFrom::Start(start)).is_ok() {
            let _ = f.read_to_end(&mut text);
        }
    }
    String::from_utf8_lossy(&text).trim().to_string()
}

/// Flushes a file (or directory) to stable storage.
fn sync_path(path: &Path) -> Result<(), VmmError> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| VmmError::io("syncing", path, e))
}

/// One QEMU microVM.
pub struct QemuVm {
    /// The binary it runs (a suspend starts its receiver with the same one).
    qemu: QemuBinary,
    spec: VmSpec,
    process: QemuProcess,
    qmp: Qmp,
    agent: Option<AgentClient>,
    timeline: Timeline,
    t0: Instant,
    netns: Option<Arc<Netns>>,
    /// The egress gateway serving this VM; dropped (stopping it) with the VM.
    egress: Option<kiln_net::Attachment>,
    /// Keeps the console and app logs under their cap while this handle lives.
    _log_cap: logcap::LogCap,
}

impl QemuVm {
    /// Attaches (or re-attaches, after kilnd restarted) the egress gateway to this VM's
    /// namespace, replacing any earlier attachment and its rules.
    pub async fn set_egress(&mut self, egress: &VmEgress) -> Result<(), VmmError> {
        let netns = self.netns.clone().ok_or_else(|| {
            VmmError::Network("this VM has no network device, so it has no egress".into())
        })?;
        self.egress = None;
        let attachment = egress
            .attach(&netns)
            .await
            .map_err(|e| VmmError::Network(e.to_string()))?;
        self.egress = Some(attachment);
        Ok(())
    }

    /// The spec the VM runs with.
    pub fn spec(&self) -> &VmSpec {
        &self.spec
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// The QMP session (for operations the seam does not cover yet).
    pub fn qmp(&self) -> &Qmp {
        &self.qmp
    }

    /// The last lines of the guest's serial console.
    pub fn console_tail(&self, lines: usize) -> String {
        process::tail(&self.spec.console_log(), lines)
    }

    async fn connect_agent(
        &mut self,
        timeout: Duration,
        doing: &str,
    ) -> Result<AgentClient, VmmError> {
        let socket = self.spec.agent_socket();
        let spec = &self.spec;
        let process = &mut self.process;
        let result = tokio::select! {
            r = AgentClient::connect(&socket, timeout) => r.map_err(|source| VmmError::AgentUnresponsive {
                doing: doing.to_string(),
                timeout,
                source,
                console: process::tail(&spec.console_log(), 15),
            }),
            e = watch_exit(process, spec, doing) => Err(e),
        };
        match result {
            Ok(a) => Ok(a),
            Err(e) => Err(prefer_death(process, spec, doing, e).await),
        }
    }

    async fn finish_restore(
        &mut self,
        snap: &Snapshot,
        target: &RestoreTarget,
    ) -> Result<(), VmmError> {
        self.ignore_shared_memory().await?;
        self.load_and_run(
            &snap.state_path(),
            "loading the device state",
            &format!("restoring {}", snap.dir.display()),
            target.agent_timeout,
        )
        .await
    }

    /// Loads the migration stream in `stream` into this `-incoming defer` process, starts the
    /// guest, connects its agent and refreshes its clock and entropy.
    async fn load_and_run(
        &mut self,
        stream: &Path,
        loading: &str,
        doing: &str,
        agent_timeout: Duration,
    ) -> Result<(), VmmError> {
        let file = std::fs::File::open(stream).map_err(|e| VmmError::io("opening", stream, e))?;
        self.migrate_through("migrate-incoming", &file, loading)
            .await?;
        drop(file);
        let status = self.wait_while_status("inmigrate", loading).await?;
        if status != "paused" {
            return Err(VmmError::Migration {
                doing: doing.to_string(),
                status,
                detail: format!("; QEMU said: {}", self.process.log_tail()),
            });
        }
        self.timeline.mark("loaded", self.t0);
        // Connect before `cont` so the handshake is queued the moment the guest runs.
        let socket = self.spec.agent_socket();
        let timeout = agent_timeout;
        let agent = tokio::spawn(async move { AgentClient::connect(&socket, timeout).await });
        self.qmp
            .execute("cont", None)
            .await
            .map_err(VmmError::qmp("starting the restored VM"))?;
        self.timeline.mark("running", self.t0);
        let agent = match agent.await {
            Ok(Ok(a)) => a,
            Ok(Err(source)) => {
                return Err(VmmError::AgentUnresponsive {
                    doing: doing.to_string(),
                    timeout,
                    source,
                    console: self.console_tail(15),
                })
            }
            Err(join) => {
                return Err(VmmError::InvalidSpec(format!("agent task failed: {join}")));
            }
        };
        self.timeline.mark("agent", self.t0);
        crate::guest::refresh(&agent).await?;
        self.timeline.mark("refreshed", self.t0);
        self.agent = Some(agent);
        Ok(())
    }

    /// Migration leaves guest RAM out of the stream: it lives in the shared memory file.
    async fn ignore_shared_memory(&self) -> Result<(), VmmError> {
        self.qmp
            .execute(
                "migrate-set-capabilities",
                Some(json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]})),
            )
            .await
            .map(drop)
            .map_err(VmmError::qmp("enabling x-ignore-shared"))
    }

    async fn wait_while_status(
        &mut self,
        transient: &str,
        doing: &str,
    ) -> Result<String, VmmError> {
        let deadline = Instant::now() + MIGRATION_TIMEOUT;
        loop {
            if !self.process.is_alive() {
                return Err(self.died(doing));
            }
            let status = self.qmp.status().await.map_err(VmmError::qmp(doing))?;
            if status != transient {
                return Ok(status);
            }
            if Instant::now() > deadline {
                return Err(VmmError::Migration {
                    doing: doing.to_string(),
                    status,
                    detail: format!(" after {MIGRATION_TIMEOUT:?}"),
                });
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    fn died(&mut self, doing: &str) -> VmmError {
        VmmError::QemuDied {
            doing: doing.to_string(),
            status: self.process.exit_status().unwrap_or_else(|| "gone".into()),
            qemu_log: self.process.log_tail(),
            console: self.console_tail(15),
        }
    }

    /// Kills QEMU and removes the runtime directory (used when a start fails half-way).
    async fn abort(mut self) {
        self.process.kill(Duration::from_millis(500)).await;
        remove_dir(&self.spec.dir);
    }

    /// Ends QEMU: the agent powers the guest off, then QMP `quit`, then signals.
    async fn stop_process(&mut self) {
        if let Some(agent) = &self.agent {
            if tokio::time::timeout(Duration::from_secs(2), agent.power_off())
                .await
                .is_ok()
                && self.process.wait_exit(Duration::from_secs(3)).await
            {
                return;
            }
        }
        let _ = self
            .qmp
            .execute_timeout("quit", None, Duration::from_secs(2))
            .await;
        if !self.process.wait_exit(Duration::from_secs(2)).await {
            self.process.kill(Duration::from_secs(2)).await;
        }
    }
}

/// Memory growth through the virtio-mem device of a `q35` VM.
impl QemuVm {
    /// See [`MicroVm::plugged_memory`](crate::MicroVm::plugged_memory).
    pub async fn plugged_memory(&self) -> Result<u64, VmmError> {
        if self.spec.growable_memory_mib() == 0 {
            return Ok(0);
        }
        Ok(self
            .virtio_mem_property("size", "reading the plugged memory")
            .await?
            >> 20)
    }

    /// See [`MicroVm::request_memory`](crate::MicroVm::request_memory).
    pub async fn request_memory(&self, mib: u64) -> Result<u64, VmmError> {
        let growable = self.spec.growable_memory_mib();
        if mib > growable {
            let reason = if growable == 0 {
                "it has no memory to grow into (only a q35 VM with a memory ceiling has)".into()
            } else {
                format!(
                    "it may grow by at most {growable} MiB (from {} to {} MiB)",
                    self.spec.memory_mib,
                    self.spec.memory_ceiling_mib()
                )
            };
            return Err(VmmError::MemoryOutOfRange {
                requested_mib: mib,
                reason,
            });
        }
        if growable == 0 {
            return Ok(0);
        }
        let doing = "asking the guest for more or less memory";
        // The block size is ours, set on the command line: no need to ask the device.
        let block = cmdline::VIRTIO_MEM_BLOCK_MIB << 20;
        // Whole blocks, rounded up, within the device.
        let wanted = ((mib << 20).div_ceil(block) * block).min((growable << 20) / block * block);
        self.qmp
            .execute(
                "qom-set",
                Some(
                    json!({ "path": virtio_mem_path(), "property": "requested-size",
                             "value": wanted }),
                ),
            )
            .await
            .map_err(VmmError::qmp(doing))?;
        Ok(wanted >> 20)
    }

    /// See [`MicroVm::set_plugged_memory`](crate::MicroVm::set_plugged_memory).
    pub async fn set_plugged_memory(&self, mib: u64) -> Result<u64, VmmError> {
        let wanted = self.request_memory(mib).await? << 20;
        if self.spec.growable_memory_mib() == 0 {
            return Ok(0);
        }
        let doing = "resizing the guest's memory";
        let t = Instant::now();
        loop {
            let plugged = self.virtio_mem_property("size", doing).await?;
            if plugged == wanted {
                return Ok(plugged >> 20);
            }
            if t.elapsed() > MEMORY_SETTLE_TIMEOUT {
                return Err(VmmError::MemoryNotSettled {
                    requested_mib: wanted >> 20,
                    plugged_mib: plugged >> 20,
                    waited: MEMORY_SETTLE_TIMEOUT,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A number property of the virtio-mem device, in bytes.
    async fn virtio_mem_property(&self, property: &str, doing: &str) -> Result<u64, VmmError> {
        let value = self
            .qmp
            .execute(
                "qom-get",
                Some(json!({ "path": virtio_mem_path(), "property": property })),
            )
            .await
            .map_err(VmmError::qmp(doing))?;
        value.as_u64().ok_or_else(|| VmmError::Qmp {
            doing: doing.to_string(),
            source: qmp::QmpError::Protocol(format!(
                "virtio-mem property {property} is {value}, not a number"
            )),
        })
    }
}

/// The QOM path of a `q35` VM's virtio-mem device.
fn virtio_mem_path() -> String {
    format!("/machine/peripheral/{}", cmdline::VIRTIO_MEM_ID)
}

/// The [`MicroVm`](crate::MicroVm) operations; `seam.rs` implements the trait with these.
impl QemuVm {
    /// See [`MicroVm::netns`](crate::MicroVm::netns).
    pub fn netns(&self) -> Option<Arc<Netns>> {
        self.netns.clone()
    }

    /// See [`MicroVm::agent`](crate::MicroVm::agent).
    pub fn agent(&self) -> &AgentClient {
        // An agent is always connected once boot or restore returned.
        self.agent
            .as_ref()
            .expect("agent connected after boot/restore")
    }

    /// See [`MicroVm::timeline`](crate::MicroVm::timeline).
    pub fn timeline(&self) -> &Timeline {
        &self.timeline
    }

    /// See [`MicroVm::pause`](crate::MicroVm::pause).
    pub async fn pause(&self) -> Result<(), VmmError> {
        self.qmp
            .execute("stop", None)
            .await
            .map(drop)
            .map_err(VmmError::qmp("pausing"))
    }

    /// See [`MicroVm::resume`](crate::MicroVm::resume).
    pub async fn resume(&self) -> Result<(), VmmError> {
        self.qmp
            .execute("cont", None)
            .await
            .map(drop)
            .map_err(VmmError::qmp("continuing"))
    }

    /// See [`MicroVm::status`](crate::MicroVm::status).
    pub async fn status(&mut self) -> VmStatus {
        if !self.process.is_alive() {
            return VmStatus::Exited(self.process.exit_status().unwrap_or_else(|| "gone".into()));
        }
        match self.qmp.status().await {
            Ok(s) if s == "running" => VmStatus::Running,
            Ok(s) if s == "paused" => VmStatus::Paused,
            Ok(s) => VmStatus::Other(s),
            Err(e) => VmStatus::Other(format!("unreachable: {e}")),
        }
    }

    /// See [`MicroVm::freeze_disk_layer`](crate::MicroVm::freeze_disk_layer).
    pub async fn freeze_disk_layer(
        &mut self,
        index: usize,
        new_top: &Path,
    ) -> Result<(), VmmError> {
        if index >= self.spec.disks.len() {
            return Err(VmmError::InvalidSpec(format!(
                "the VM has {} disks, there is no disk {index}",
                self.spec.disks.len()
            )));
        }
        // kilnd creates the new layer (a confined QEMU can create nothing outside its runtime
        // directory) and links it there, where QEMU opens it ("existing" mode).
        let name = new_top.file_name().ok_or_else(|| {
            VmmError::InvalidSpec(format!("layer path {} names no file", new_top.display()))
        })?;
        let mut link_name = OsString::from("layer-");
        link_name.push(name);
        let link = self.spec.dir.join(link_name);
        let top = &self.spec.disks[index];
        create_overlay(&top.path, top.format, &link)?;
        let made = std::fs::hard_link(&link, new_top)
            .map_err(|e| VmmError::io("linking the new layer to", new_top, e))
            .and_then(|()| match self.spec.jail {
                Some(id) => std::os::unix::fs::chown(&link, Some(id.uid), Some(id.gid))
                    .map_err(|e| VmmError::io("giving the VM's uid", &link, e)),
                None => Ok(()),
            });
        if let Err(e) = made {
            let _ = std::fs::remove_file(&link);
            return Err(e);
        }
        let file = link.to_str().ok_or_else(|| {
            VmmError::InvalidSpec(format!("path {} is not UTF-8", link.display()))
        })?;
        let frozen = self
            .qmp
            .execute(
                "blockdev-snapshot-sync",
                Some(
                    json!({ "device": format!("d{index}"), "snapshot-file": file,
                             "format": "qcow2", "mode": "existing" }),
                ),
            )
            .await
            .map_err(VmmError::qmp("freezing a disk layer"));
        // On success the link stays: QEMU reopens the layer by this name when it becomes a
        // backing file. It goes with the runtime directory.
        if frozen.is_err() {
            let _ = std::fs::remove_file(&link);
            let _ = std::fs::remove_file(new_top);
        }
        frozen?;
        let disk = &mut self.spec.disks[index];
        disk.path = new_top.to_owned();
        disk.format = DiskFormat::Qcow2;
        Ok(())
    }

    /// See [`MicroVm::add_forward`](crate::MicroVm::add_forward).
    pub async fn add_forward(&mut self, f: PortForward) -> Result<(), VmmError> {
        if self.spec.network.is_none() {
            return Err(VmmError::InvalidSpec(
                "this VM has no network device, so it cannot forward ports".into(),
            ));
        }
        self.qmp
            .human(&format!(
                "hostfwd_add n0 tcp:127.0.0.1:{}-:{}",
                f.host_port, f.guest_port
            ))
            .await
            .map_err(VmmError::qmp("adding a port forward"))?;
        if let Some(net) = &mut self.spec.network {
            net.forwards.push(f);
        }
        write_spec(&self.spec)
    }

    /// See [`MicroVm::snapshot`](crate::MicroVm::snapshot).
    pub async fn snapshot(mut self, dest: &Path) -> Result<Snapshot, VmmError> {
        let mem = match &self.spec.memory_file {
            Some(m) if m.shared => m.path.clone(),
            _ => {
                return Err(VmmError::InvalidSpec(
                    "only a VM booted with a shared memory file can be snapshotted this way".into(),
                ))
            }
        };
        if dest.exists() {
            return Err(VmmError::InvalidSpec(format!(
                "snapshot destination {} already exists; snapshots are immutable, pick a new directory",
                dest.display()
            )));
        }
        let staging = crate::suspend::staging_dir(dest);
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir_all(&staging).map_err(|e| VmmError::io("creating", &staging, e))?;
        let result = self.snapshot_into(&staging, &mem).await;
        let manifest = match result {
            Ok(m) => m,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&staging);
                self.stop_process().await;
                remove_dir(&self.spec.dir);
                return Err(e);
            }
        };
        std::fs::rename(&staging, dest).map_err(|e| VmmError::io("publishing", dest, e))?;
        remove_dir(&self.spec.dir);
        Ok(Snapshot {
            dir: dest.to_owned(),
            manifest,
        })
    }

    /// See [`MicroVm::suspend`](crate::MicroVm::suspend).
    pub async fn suspend(self, dest: &Path) -> Result<SuspendedVm, SuspendError<QemuVm>> {
        self.suspend_session(dest).await
    }

    /// See [`MicroVm::terminate`](crate::MicroVm::terminate).
    pub async fn terminate(mut self) -> Result<(), VmmError> {
        self.stop_process().await;
        remove_dir(&self.spec.dir);
        Ok(())
    }
}

impl QemuVm {
    /// Waits for an outgoing migration to complete; cancels it on timeout. Errors say what
    /// QEMU said, and whether the file system is full.
    async fn wait_migration(&mut self, dest: &Path, log_mark: u64) -> Result<(), VmmError> {
        let doing = format!("suspending into {}", dest.display());
        let deadline = Instant::now() + MIGRATION_TIMEOUT;
        loop {
            if !self.process.is_alive() {
                return Err(self.died(&doing));
            }
            let st = match self.qmp.execute("query-migrate", None).await {
                Ok(st) => st,
                Err(e) => {
                    let err = VmmError::qmp(&doing)(e);
                    return Err(prefer_death(&mut self.process, &self.spec, &doing, err).await);
                }
            };
            let status = st["status"].as_str().unwrap_or("").to_string();
            match status.as_str() {
                "completed" => return Ok(()),
                "failed" | "cancelled" => {
                    let log = log_since(&self.spec.qemu_log(), log_mark);
                    let mut detail = st["error-desc"]
                        .as_str()
                        .map(|d| format!(": {d}"))
                        .unwrap_or_default();
                    if log.contains("No space left on device") {
                        detail.push_str(&format!(
                            "; the file system holding {} is full: free space there or suspend \
                             elsewhere",
                            dest.display()
                        ));
                    }
                    if !log.is_empty() {
                        detail.push_str(&format!("; QEMU said: {log}"));
                    }
                    return Err(VmmError::Migration {
                        doing,
                        status,
                        detail,
                    });
                }
                _ if Instant::now() > deadline => {
                    let _ = self.qmp.execute("migrate_cancel", None).await;
                    return Err(VmmError::Migration {
                        doing,
                        status,
                        detail: format!(" after {MIGRATION_TIMEOUT:?} (cancelled)"),
                    });
                }
                _ => tokio::time::sleep(Duration::from_millis(2)).await,
            }
        }
    }

    /// Pauses the VM, saves its device state into `staging`, ends QEMU, and moves memory and
    /// disks next to it. The source VM must never run again after this.
    async fn snapshot_into(
        &mut self,
        staging: &Path,
        mem: &Path,
    ) -> Result<SnapshotManifest, VmmError> {
        // Guest dirty data must reach the disk, or the disk saved beside the memory is corrupt.
        self.agent().sync(true).await.map_err(VmmError::agent(
            "syncing the guest's disks before the snapshot",
        ))?;
        let t = Instant::now();
        self.qmp
            .execute("stop", None)
            .await
            .map_err(VmmError::qmp("pausing"))?;
        self.ignore_shared_memory().await?;
        let state_path = staging.join(snapshot::STATE);
        let state = create_stream_file(&state_path)?;
        self.migrate_through("migrate", &state, "saving the device state")
            .await?;
        drop(state);
        loop {
            let st = self
                .qmp
                .execute("query-migrate", None)
                .await
                .map_err(VmmError::qmp("saving the device state"))?;
            let status = st["status"].as_str().unwrap_or("").to_string();
            match status.as_str() {
                "completed" => break,
                "failed" | "cancelled" => {
                    return Err(VmmError::Migration {
                        doing: "saving the device state".into(),
                        status,
                        detail: st["error-desc"]
                            .as_str()
                            .map(|d| format!(": {d}"))
                            .unwrap_or_default(),
                    })
                }
                _ if t.elapsed() > MIGRATION_TIMEOUT => {
                    return Err(VmmError::Migration {
                        doing: "saving the device state".into(),
                        status,
                        detail: format!(" after {MIGRATION_TIMEOUT:?}"),
                    })
                }
                _ => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
        self.timeline.mark("snapshot-saved", self.t0);
        self.quit().await;
        // Moving, hashing (BLAKE3 over the memory file) and hole-digging run off the async
        // runtime: a build's snapshot must not stall other requests.
        let (spec, staging, mem) = (self.spec.clone(), staging.to_owned(), mem.to_owned());
        let qemu_version = self.qemu.version.clone();
        crate::blocking(move || write_image_snapshot(&spec, &staging, &mem, qemu_version)).await
    }
}

/// Puts each disk of `spec` into `staging` under its snapshot name with `place`, and
/// describes it with `describe`.
fn stage_disks(
    spec: &VmSpec,
    staging: &Path,
    place: fn(&Path, &Path) -> Result<(), VmmError>,
    describe: fn(&Path, &str) -> Result<snapshot::FileInfo, VmmError>,
) -> Result<Vec<SnapshotDisk>, VmmError> {
    let mut disks = Vec::with_capacity(spec.disks.len());
    for (i, d) in spec.disks.iter().enumerate() {
        let name = snapshot::disk_file_name(i, d.format);
        place(&d.path, &staging.join(&name))?;
        disks.push(SnapshotDisk {
            info: describe(staging, &name)?,
            format: d.format,
        });
    }
    Ok(disks)
}

/// The manifest of a snapshot of the VM `spec` describes, written into `staging` (or a
/// sibling of it: file references are relative), whose device state is there already.
fn manifest_for(
    spec: &VmSpec,
    staging: &Path,
    kind: snapshot::SnapshotKind,
    qemu_version: String,
    memory: snapshot::FileInfo,
    disks: Vec<SnapshotDisk>,
) -> Result<SnapshotManifest, VmmError> {
    Ok(SnapshotManifest {
        format: SNAPSHOT_FORMAT,
        backend: snapshot::QEMU_BACKEND.to_string(),
        kind,
        created_unix: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        qemu_version,
        accel: spec.accel,
        cpu: cmdline::cpu_model(spec.accel).to_string(),
        machine: cmdline::machine_signature(spec),
        memory_mib: spec.memory_mib,
        machine_kind: spec.machine,
        max_memory_mib: (spec.growable_memory_mib() > 0).then(|| spec.memory_ceiling_mib()),
        vcpus: spec.vcpus,
        baseline_vcpus: spec.baseline_vcpus,
        tsc_khz: spec.tsc_khz,
        kernel: snapshot::FileRef::new(staging, &spec.kernel)?,
        initramfs: snapshot::FileRef::new(staging, &spec.initramfs)?,
        cmdline_extra: spec.cmdline_extra.clone(),
        network: spec.network.is_some(),
        state: snapshot::file_info(staging, snapshot::STATE)?,
        memory,
        disks,
    })
}

/// Moves the memory file and disks of a snapshotted (ended) VM into `staging` and writes the
/// image manifest beside them; every file is made read-only.
fn write_image_snapshot(
    spec: &VmSpec,
    staging: &Path,
    mem: &Path,
    qemu_version: String,
) -> Result<SnapshotManifest, VmmError> {
    let mem_file = staging.join(snapshot::MEMORY);
    snapshot::move_file(mem, &mem_file)?;
    snapshot::dig_holes(&mem_file);
    // An image's disks move in and are hashed: it is restored many times.
    let disks = stage_disks(spec, staging, snapshot::move_file, snapshot::file_info)?;
    let manifest = manifest_for(
        spec,
        staging,
        snapshot::SnapshotKind::Image,
        qemu_version,
        snapshot::file_info(staging, snapshot::MEMORY)?,
        disks,
    )?;
    let manifest_path = staging.join(snapshot::MANIFEST);
    let text =
        serde_json::to_vec_pretty(&manifest).map_err(|e| VmmError::InvalidSpec(e.to_string()))?;
    std::fs::write(&manifest_path, text).map_err(|e| VmmError::io("writing", &manifest_path, e))?;
    for f in [snapshot::STATE, snapshot::MEMORY, snapshot::MANIFEST]
        .into_iter()
        .map(str::to_string)
        .chain(manifest.disks.iter().map(|d| d.info.file.clone()))
    {
        snapshot::make_read_only(&staging.join(f))?;
    }
    Ok(manifest)
}

/// Resolves when the QEMU process exits, with an error describing what it said.
async fn watch_exit(process: &mut QemuProcess, spec: &VmSpec, doing: &str) -> VmmError {
    while process.is_alive() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    VmmError::QemuDied {
        doing: doing.to_string(),
        status: process.exit_status().unwrap_or_else(|| "gone".into()),
        qemu_log: process.log_tail(),
        console: process::tail(&spec.console_log(), 15),
    }
}

/// A lost connection is usually QEMU dying: when the process exits right after `err`, report
/// the death (with QEMU's own words) instead of the symptom.
async fn prefer_death(
    process: &mut QemuProcess,
    spec: &VmSpec,
    doing: &str,
    err: VmmError,
) -> VmmError {
    if matches!(err, VmmError::QemuDied { .. })
        || !process.wait_exit(Duration::from_millis(500)).await
    {
        return err;
    }
    watch_exit(process, spec, doing).await
}

/// The VM's spec, kept in its runtime directory so a restarted daemon can re-attach.
pub(crate) const SPEC_FILE: &str = "spec.json";

fn write_spec(spec: &VmSpec) -> Result<(), VmmError> {
    let path = spec.dir.join(SPEC_FILE);
    let tmp = spec.dir.join(format!("{SPEC_FILE}.tmp"));
    let text = serde_json::to_vec_pretty(spec).map_err(|e| VmmError::InvalidSpec(e.to_string()))?;
    std::fs::write(&tmp, text).map_err(|e| VmmError::io("writing", &tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| VmmError::io("writing", &path, e))
}

/// Checks what a spec refers to before QEMU is started, so errors name the missing thing.
fn validate(spec: &VmSpec) -> Result<(), VmmError> {
    let need = |what: &'static str, path: &Path, hint: &'static str| {
        if path.exists() {
            Ok(())
        } else {
            Err(VmmError::Missing {
                what,
                path: path.to_owned(),
                hint,
            })
        }
    };
    need(
        "guest kernel",
        &spec.kernel,
        "run `kiln doctor` to fetch the guest kernel",
    )?;
    need(
        "initramfs",
        &spec.initramfs,
        "run `kiln doctor` to build the initramfs",
    )?;
    for d in &spec.disks {
        need(
            "disk image",
            &d.path,
            "check the path, or build the base image first",
        )?;
    }
    if let Some(m) = &spec.memory_file {
        if !m.shared {
            need(
                "memory snapshot",
                &m.path,
                "the snapshot is incomplete; take it again",
            )?;
        }
    }
    if spec.machine == MachineKind::Microvm && spec.max_memory_mib > Some(spec.memory_mib) {
        return Err(VmmError::InvalidSpec(format!(
            "a microvm cannot grow its memory (asked for up to {} MiB from {} MiB): run it on \
             the q35 machine, or give it no memory ceiling",
            spec.max_memory_mib.unwrap_or(0),
            spec.memory_mib
        )));
    }
    if !spec
        .growable_memory_mib()
        .is_multiple_of(cmdline::VIRTIO_MEM_BLOCK_MIB)
    {
        return Err(VmmError::InvalidSpec(format!(
            "the memory a VM may grow by ({} MiB above its {} MiB) must be a multiple of {} MiB",
            spec.growable_memory_mib(),
            spec.memory_mib,
            cmdline::VIRTIO_MEM_BLOCK_MIB
        )));
    }
    if spec.vcpus == 0 || spec.memory_mib < 64 {
        return Err(VmmError::InvalidSpec(format!(
            "a VM needs at least 1 vCPU and 64 MiB (got {} vCPUs, {} MiB)",
            spec.vcpus, spec.memory_mib
        )));
    }
    for sock in [spec.qmp_socket(), spec.agent_socket()] {
        if sock.as_os_str().len() > SOCKET_PATH_MAX {
            return Err(VmmError::InvalidSpec(format!(
                "socket path {} is longer than {SOCKET_PATH_MAX} bytes; use a shorter data directory (KILN_HOME)",
                sock.display()
            )));
        }
    }
    Ok(())
}

/// The app log a suspended session keeps in its directory.
const CARRIED_APP_LOG: &str = "app.log";

fn create_runtime_dir(dir: &Path) -> Result<(), VmmError> {
    if dir.exists()
        && std::fs::read_dir(dir)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        return Err(VmmError::InvalidSpec(format!(
            "runtime directory {} is not empty: another VM may be using it",
            dir.display()
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| VmmError::io("creating", dir, e))
}

fn remove_dir(dir: &Path) {
    jail::release(dir);
    crate::cgroup::remove_for(dir);
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot remove a VM directory");
        }
    }
}

/// Creates a qcow2 overlay at `overlay` on the read-only `base`.
pub fn create_overlay(base: &Path, format: DiskFormat, overlay: &Path) -> Result<(), VmmError> {
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", format.as_str(), "-b"])
        .arg(base)
        .arg(overlay)
        .output()
        .map_err(|e| VmmError::Tool {
            program: "qemu-img".into(),
            detail: format!("{e}; install it with `apt-get install qemu-utils`"),
        })?;
    if !out.status.success() {
        return Err(VmmError::Tool {
            program: "qemu-img create".into(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Creates (or truncates) the file a migration stream is written into, readable by kilnd only.
fn create_stream_file(path: &Path) -> Result<std::fs::File, VmmError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| VmmError::io("creating", path, e))
}

//! The QEMU backend of the [`Vmm`](crate::Vmm) seam: machine `microvm`, memory in a file,
//! device state through migration with `x-ignore-shared`.

pub mod cmdline;
pub mod process;
pub mod qmp;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use kiln_agent::client::AgentClient;
use serde_json::json;

use crate::snapshot::{self, Snapshot, SnapshotDisk, SnapshotManifest, SNAPSHOT_FORMAT};
use crate::spec::{DiskFormat, DiskSpec, MemoryFile, NetSpec, PortForward, VmSpec};
use crate::{BootOptions, MicroVm, RestoreTarget, Timeline, VmStatus, Vmm, VmmError};
use process::{QemuBinary, QemuProcess};
use qmp::Qmp;

/// Longest path a unix socket address can hold (sun_path, with its NUL).
const SOCKET_PATH_MAX: usize = 107;
/// How long QEMU may take to open its QMP socket.
const QMP_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a snapshot's or restore's migration may take.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(120);
/// Bytes of host entropy fed to every restored guest.
const ENTROPY_BYTES: usize = 64;

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
    async fn start(&self, spec: VmSpec, incoming: bool, t0: Instant) -> Result<QemuVm, VmmError> {
        let args = cmdline::args(&spec, incoming);
        if let Err(e) = write_spec(&spec) {
            remove_dir(&spec.dir);
            return Err(e);
        }
        let mut process = QemuProcess::spawn(&self.qemu, args, &spec.qemu_log())?;
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
        let mut timeline = Timeline::default();
        timeline.mark("qmp", t0);
        Ok(QemuVm {
            spec,
            process,
            qmp,
            agent: None,
            timeline,
            t0,
        })
    }
}

impl QemuVmm {
    /// Re-attaches to a VM that a previous process started in `dir` (kilnd restarted):
    /// checks that its QEMU still runs, reconnects QMP and the guest agent.
    pub async fn attach(&self, dir: &Path) -> Result<QemuVm, VmmError> {
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
        let mut timeline = Timeline::default();
        timeline.mark("qmp", t0);
        let mut vm = QemuVm {
            spec,
            process,
            qmp,
            agent: None,
            timeline,
            t0,
        };
        let agent = vm
            .connect_agent(Duration::from_secs(10), "re-attaching")
            .await?;
        vm.agent = Some(agent);
        vm.timeline.mark("agent", t0);
        Ok(vm)
    }
}

impl Vmm for QemuVmm {
    type Vm = QemuVm;

    async fn boot(&self, spec: VmSpec, opts: BootOptions) -> Result<QemuVm, VmmError> {
        let t0 = Instant::now();
        validate(&spec)?;
        create_runtime_dir(&spec.dir)?;
        let mut vm = self.start(spec, false, t0).await?;
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

    async fn restore(&self, snap: &Snapshot, target: RestoreTarget) -> Result<QemuVm, VmmError> {
        let t0 = Instant::now();
        let m = &snap.manifest;
        if m.network && target.forwards.is_empty() && !target.restrict_egress {
            tracing::debug!("restoring a networked snapshot without forwards");
        }
        create_runtime_dir(&target.dir)?;
        let mut disks = Vec::with_capacity(m.disks.len());
        for (i, d) in m.disks.iter().enumerate() {
            let overlay = target.dir.join(format!("disk{i}.qcow2"));
            if let Err(e) = create_overlay(&snap.dir.join(&d.info.file), d.format, &overlay) {
                remove_dir(&target.dir);
                return Err(e);
            }
            disks.push(DiskSpec {
                path: overlay,
                format: DiskFormat::Qcow2,
                read_only: false,
            });
        }
        let spec = VmSpec {
            dir: target.dir.clone(),
            vcpus: m.vcpus,
            memory_mib: m.memory_mib,
            kernel: m.kernel.path.clone(),
            initramfs: m.initramfs.path.clone(),
            cmdline_extra: m.cmdline_extra.clone(),
            disks,
            network: m.network.then(|| NetSpec {
                forwards: target.forwards.clone(),
                restrict_egress: target.restrict_egress,
            }),
            memory_file: Some(MemoryFile {
                path: snap.memory_path(),
                shared: false,
            }),
            accel: m.accel,
            tsc_khz: m.tsc_khz,
        };
        if let Err(e) = validate(&spec) {
            remove_dir(&target.dir);
            return Err(e);
        }
        let mut vm = self.start(spec, true, t0).await?;
        match vm.finish_restore(snap, &target).await {
            Ok(()) => Ok(vm),
            Err(e) => {
                vm.abort().await;
                Err(e)
            }
        }
    }
}

/// One QEMU microVM.
pub struct QemuVm {
    spec: VmSpec,
    process: QemuProcess,
    qmp: Qmp,
    agent: Option<AgentClient>,
    timeline: Timeline,
    t0: Instant,
}

impl QemuVm {
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
        let uri = format!("exec:cat {}", shell_quote(&snap.state_path())?);
        self.qmp
            .execute("migrate-incoming", Some(json!({ "uri": uri })))
            .await
            .map_err(VmmError::qmp("loading the device state"))?;
        let status = self
            .wait_while_status("inmigrate", "loading the device state")
            .await?;
        if status != "paused" {
            return Err(VmmError::Migration {
                doing: format!("restoring {}", snap.dir.display()),
                status,
                detail: format!("; QEMU said: {}", self.process.log_tail()),
            });
        }
        self.timeline.mark("loaded", self.t0);
        // Connect before `cont` so the handshake is queued the moment the guest runs.
        let socket = self.spec.agent_socket();
        let timeout = target.agent_timeout;
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
                    doing: "restoring".into(),
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
        refresh_guest(&agent).await?;
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

impl MicroVm for QemuVm {
    fn agent(&self) -> &AgentClient {
        // An agent is always connected once boot or restore returned.
        self.agent
            .as_ref()
            .expect("agent connected after boot/restore")
    }

    fn timeline(&self) -> &Timeline {
        &self.timeline
    }

    async fn pause(&self) -> Result<(), VmmError> {
        self.qmp
            .execute("stop", None)
            .await
            .map(drop)
            .map_err(VmmError::qmp("pausing"))
    }

    async fn resume(&self) -> Result<(), VmmError> {
        self.qmp
            .execute("cont", None)
            .await
            .map(drop)
            .map_err(VmmError::qmp("continuing"))
    }

    async fn status(&mut self) -> VmStatus {
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

    async fn freeze_disk_layer(&mut self, index: usize, new_top: &Path) -> Result<(), VmmError> {
        if index >= self.spec.disks.len() {
            return Err(VmmError::InvalidSpec(format!(
                "the VM has {} disks, there is no disk {index}",
                self.spec.disks.len()
            )));
        }
        let file = new_top.to_str().ok_or_else(|| {
            VmmError::InvalidSpec(format!("path {} is not UTF-8", new_top.display()))
        })?;
        self.qmp
            .execute(
                "blockdev-snapshot-sync",
                Some(json!({ "device": format!("d{index}"), "snapshot-file": file, "format": "qcow2" })),
            )
            .await
            .map_err(VmmError::qmp("freezing a disk layer"))?;
        let disk = &mut self.spec.disks[index];
        disk.path = new_top.to_owned();
        disk.format = DiskFormat::Qcow2;
        Ok(())
    }

    async fn add_forward(&mut self, f: PortForward) -> Result<(), VmmError> {
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

    async fn snapshot(mut self, dest: &Path) -> Result<Snapshot, VmmError> {
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
        let staging = staging_dir(dest);
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

    async fn terminate(mut self) -> Result<(), VmmError> {
        self.stop_process().await;
        remove_dir(&self.spec.dir);
        Ok(())
    }
}

impl QemuVm {
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
        let uri = format!("exec:cat > {}", shell_quote(&state_path)?);
        self.qmp
            .execute("migrate", Some(json!({ "uri": uri })))
            .await
            .map_err(VmmError::qmp("saving the device state"))?;
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
        let _ = self
            .qmp
            .execute_timeout("quit", None, Duration::from_secs(2))
            .await;
        if !self.process.wait_exit(Duration::from_secs(5)).await {
            self.process.kill(Duration::from_secs(1)).await;
        }
        let mem_file = staging.join(snapshot::MEMORY);
        snapshot::move_file(mem, &mem_file)?;
        snapshot::dig_holes(&mem_file);
        let mut disks = Vec::new();
        for (i, d) in self.spec.disks.iter().enumerate() {
            let name = snapshot::disk_file_name(i, d.format);
            snapshot::move_file(&d.path, &staging.join(&name))?;
            disks.push(SnapshotDisk {
                info: snapshot::file_info(staging, &name)?,
                format: d.format,
            });
        }
        let spec = &self.spec;
        let manifest = SnapshotManifest {
            format: SNAPSHOT_FORMAT,
            created_unix: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            qemu_version: QemuBinary::find()?.version,
            accel: spec.accel,
            cpu: cmdline::cpu_model(spec.accel).to_string(),
            machine: cmdline::machine_signature(spec),
            memory_mib: spec.memory_mib,
            vcpus: spec.vcpus,
            tsc_khz: spec.tsc_khz,
            kernel: file_ref(&spec.kernel)?,
            initramfs: file_ref(&spec.initramfs)?,
            cmdline_extra: spec.cmdline_extra.clone(),
            network: spec.network.is_some(),
            state: snapshot::file_info(staging, snapshot::STATE)?,
            memory: snapshot::file_info(staging, snapshot::MEMORY)?,
            disks,
        };
        let manifest_path = staging.join(snapshot::MANIFEST);
        let text = serde_json::to_vec_pretty(&manifest)
            .map_err(|e| VmmError::InvalidSpec(e.to_string()))?;
        std::fs::write(&manifest_path, text)
            .map_err(|e| VmmError::io("writing", &manifest_path, e))?;
        for f in [snapshot::STATE, snapshot::MEMORY, snapshot::MANIFEST]
            .into_iter()
            .map(str::to_string)
            .chain(manifest.disks.iter().map(|d| d.info.file.clone()))
        {
            snapshot::make_read_only(&staging.join(f))?;
        }
        Ok(manifest)
    }
}

/// Sets the guest's clock from the host and feeds it fresh entropy: a snapshot restored twice
/// must not share its RNG state, and its clock stood still while it was saved.
async fn refresh_guest(agent: &AgentClient) -> Result<(), VmmError> {
    agent
        .set_clock(SystemTime::now())
        .await
        .map_err(VmmError::agent("setting the guest clock"))?;
    let mut seed = [0u8; ENTROPY_BYTES];
    getrandom::fill(&mut seed)
        .map_err(|e| VmmError::InvalidSpec(format!("host RNG failed: {e}")))?;
    agent
        .add_entropy(&seed)
        .await
        .map_err(VmmError::agent("reseeding the guest RNG"))
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
const SPEC_FILE: &str = "spec.json";

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
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot remove a VM directory");
        }
    }
}

fn staging_dir(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    dest.with_file_name(name)
}

fn file_ref(path: &Path) -> Result<snapshot::FileRef, VmmError> {
    Ok(snapshot::FileRef {
        path: path.to_owned(),
        blake3: snapshot::digest_file_cached(path).map_err(|e| VmmError::io("hashing", path, e))?,
    })
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

/// Quotes a path for the shell QEMU runs `exec:` migrations through.
fn shell_quote(path: &Path) -> Result<String, VmmError> {
    let s = path
        .to_str()
        .ok_or_else(|| VmmError::InvalidSpec(format!("path {} is not UTF-8", path.display())))?;
    if s.contains('\'') {
        return Err(VmmError::InvalidSpec(format!(
            "path {s} contains a single quote; pick a data directory without one"
        )));
    }
    Ok(format!("'{s}'"))
}

//! An in-memory backend of the [`Vmm`] seam, for testing what sits above it (kilnd's
//! supervisor) in milliseconds and without QEMU. Built with the `fake` feature only.
//!
//! A fake VM is a record in its [`FakeControl`]: its directory and memory. Each VM answers
//! through a real [`AgentClient`] connected to a tiny fake guest agent on a unix socket in its
//! directory, which accepts clock, entropy and sync requests and answers every HTTP request
//! (a hook call) with 200. Suspended sessions and snapshots are records too; their
//! directories exist on disk (empty) so that callers can create and remove them as usual.
//!
//! A test steers the backend through the shared [`FakeControl`]: it holds an operation at a
//! gate until it releases it (a suspend in flight as long as the test wants), makes the next
//! restore, resume or suspend fail, and counts calls, live VMs and their memory so it can
//! assert that nothing leaked.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use kiln_agent::client::AgentClient;
use kiln_agent::proto::{
    decode_payload, encode_frame, FrameDecoder, GuestBody, GuestMessage, HostBody, HostMessage,
    PROTOCOL_VERSION,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinHandle;

use crate::accel::{AccelChoice, AccelSource};
use crate::assets::{GuestAssets, Initramfs, KernelAssets};
use crate::host::Host;
use crate::snapshot::{FileInfo, FileRef, SnapshotKind, SnapshotManifest};
use crate::{
    Backend, BootOptions, BoxFuture, DiskFormat, MemoryRange, MicroVm, Netns, PortForward,
    RestoreTarget, Snapshot, SuspendError, SuspendedVm, Timeline, VcpuRange, VmEgress, VmResult,
    VmSpec, VmStatus, Vmm, VmmError,
};

/// The operations a test can hold at a gate or count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Op {
    /// [`Vmm::boot`].
    Boot,
    /// [`Vmm::restore`].
    Restore,
    /// [`Vmm::resume`].
    Resume,
    /// [`MicroVm::suspend`].
    Suspend,
    /// [`MicroVm::terminate`].
    Terminate,
}

/// A failure the next matching operation ends in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The next restore fails (nothing is left running).
    Restore,
    /// The next resume fails (the suspended session stays whole).
    Resume,
    /// The next suspend fails and hands the VM back running.
    SuspendAlive,
    /// The next suspend fails and the VM is lost with it.
    SuspendDead,
}

/// Where a held operation waits until the test releases it.
#[derive(Debug)]
struct Gate {
    permits: Semaphore,
    arrived: Arc<Notify>,
}

impl Default for Gate {
    fn default() -> Gate {
        Gate {
            permits: Semaphore::new(0),
            arrived: Arc::default(),
        }
    }
}

/// What the fake backend holds and has done.
#[derive(Debug, Default)]
struct State {
    /// Running VMs: directory → memory (MiB).
    live: BTreeMap<PathBuf, u64>,
    /// Published suspended sessions by directory.
    suspended: BTreeMap<PathBuf, SuspendedVm>,
    /// Snapshots a test registered, by directory.
    snapshots: BTreeMap<PathBuf, Snapshot>,
    /// How often each operation was called.
    calls: BTreeMap<Op, usize>,
    /// Operations held at a gate.
    gates: BTreeMap<Op, Arc<Gate>>,
    /// Operations waiting at a gate now.
    waiting: BTreeMap<Op, usize>,
    /// Failures still to happen, in order.
    faults: VecDeque<Fault>,
    /// Hook paths the fake guests were asked for (`/aws/lambda-microvms/runtime/v1/run`…).
    http_paths: Vec<String>,
    next_pid: u32,
}

/// The handle a test keeps to steer and observe a [`FakeVmm`] (cheap to clone).
#[derive(Debug, Clone, Default)]
pub struct FakeControl(Arc<Mutex<State>>);

impl FakeControl {
    fn state(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// From now on `op` waits at a gate until [`FakeControl::release`] lets it through.
    pub fn hold(&self, op: Op) {
        self.state().gates.entry(op).or_default();
    }

    /// Lets one held `op` (now waiting or the next to arrive) go on.
    pub fn release(&self, op: Op) {
        if let Some(gate) = self.state().gates.get(&op) {
            gate.permits.add_permits(1);
        }
    }

    /// Waits until an `op` is waiting at its gate (hold it first).
    pub async fn arrived(&self, op: Op) {
        loop {
            let arrived = {
                let state = self.state();
                if state.waiting.get(&op).copied().unwrap_or(0) > 0 {
                    return;
                }
                match state.gates.get(&op) {
                    Some(g) => g.arrived.clone(),
                    None => panic!("{op:?} is not held: call hold({op:?}) first"),
                }
            };
            // Checked again after a short wait too: a notification can fall between the
            // check and the wait.
            let _ = tokio::time::timeout(Duration::from_millis(20), arrived.notified()).await;
        }
    }

    /// Makes the next operation that `fault` names fail.
    pub fn fail_next(&self, fault: Fault) {
        self.state().faults.push_back(fault);
    }

    /// How often `op` was called.
    pub fn calls(&self, op: Op) -> usize {
        self.state().calls.get(&op).copied().unwrap_or(0)
    }

    /// How many VMs run now.
    pub fn live_vms(&self) -> usize {
        self.state().live.len()
    }

    /// The guest memory (MiB) of the VMs that run now.
    pub fn live_memory_mib(&self) -> u64 {
        self.state().live.values().sum()
    }

    /// How many suspended sessions exist now (a session whose directory was removed is gone).
    pub fn suspended(&self) -> usize {
        self.state().suspended.keys().filter(|d| d.exists()).count()
    }

    /// The HTTP paths the fake guests were asked for, in order (hook calls).
    pub fn http_paths(&self) -> Vec<String> {
        self.state().http_paths.clone()
    }

    /// Counts a call of `op`, then waits at its gate when it is held.
    async fn enter(&self, op: Op) {
        let gate = {
            let mut state = self.state();
            *state.calls.entry(op).or_default() += 1;
            let gate = state.gates.get(&op).cloned();
            if gate.is_some() {
                *state.waiting.entry(op).or_default() += 1;
            }
            gate
        };
        let Some(gate) = gate else { return };
        gate.arrived.notify_waiters();
        if let Ok(permit) = gate.permits.acquire().await {
            permit.forget();
        }
        *self.state().waiting.entry(op).or_default() -= 1;
    }

    /// Takes the first pending fault among `wanted`, if any.
    fn take_fault(&self, wanted: &[Fault]) -> Option<Fault> {
        let mut state = self.state();
        let at = state.faults.iter().position(|f| wanted.contains(f))?;
        state.faults.remove(at)
    }
}

/// The fake backend.
#[derive(Debug, Clone, Default)]
pub struct FakeVmm {
    control: FakeControl,
}

impl FakeVmm {
    /// A backend with nothing running; steer it through [`FakeVmm::control`].
    pub fn new() -> FakeVmm {
        FakeVmm::default()
    }

    /// The handle that steers and observes this backend.
    pub fn control(&self) -> FakeControl {
        self.control.clone()
    }

    /// A [`Host`] in `home` running VMs with this backend (no kernel, no accelerator probe).
    pub fn host(&self, home: &Path) -> Host {
        Host {
            home: home.to_owned(),
            vmm: Arc::new(self.clone()),
            accel: AccelChoice {
                accel: kiln_api::Accel::Tcg,
                reason: "the fake backend emulates nothing".into(),
                probe_ms: None,
                source: AccelSource::Env,
            },
            tsc_khz: 0,
            assets: GuestAssets {
                kernel: KernelAssets {
                    version: "fake".into(),
                    package: "fake".into(),
                    package_version: "fake".into(),
                    vmlinuz: PathBuf::new(),
                    modules: Vec::new(),
                },
                initramfs: Initramfs {
                    path: PathBuf::new(),
                    digest: String::new(),
                },
            },
        }
    }

    /// Registers a snapshot of a `memory_mib` guest in `dir` (created, empty), as an image
    /// build would have left it; [`Vmm::open_snapshot`] finds it there.
    pub fn add_snapshot(&self, dir: &Path, memory_mib: u64) -> Result<Snapshot, VmmError> {
        std::fs::create_dir_all(dir).map_err(|e| VmmError::io("creating", dir, e))?;
        let snapshot = Snapshot {
            dir: dir.to_owned(),
            manifest: snapshot_manifest(memory_mib, SnapshotKind::Image),
        };
        self.control
            .state()
            .snapshots
            .insert(dir.to_owned(), snapshot.clone());
        Ok(snapshot)
    }

    /// Starts a fake VM in `dir` holding `memory_mib`.
    async fn start(&self, dir: &Path, memory_mib: u64, forwards: Vec<PortForward>) -> VmResult {
        std::fs::create_dir_all(dir).map_err(|e| VmmError::io("creating", dir, e))?;
        let (agent, guest) = match fake_guest(dir, self.control.clone()).await {
            Ok(pair) => pair,
            Err(e) => {
                let _ = std::fs::remove_dir_all(dir);
                return Err(e);
            }
        };
        let pid = {
            let mut state = self.control.state();
            state.live.insert(dir.to_owned(), memory_mib);
            state.next_pid += 1;
            state.next_pid
        };
        Ok(Box::new(FakeVm {
            dir: dir.to_owned(),
            memory_mib,
            pid,
            forwards,
            agent,
            guest,
            timeline: Timeline::default(),
            control: self.control.clone(),
        }))
    }
}

impl Vmm for FakeVmm {
    fn describe(&self) -> Backend {
        Backend {
            name: "fake",
            version: "1".into(),
        }
    }

    fn boot(&self, spec: VmSpec, _opts: BootOptions) -> BoxFuture<'_, VmResult> {
        Box::pin(async move {
            self.control.enter(Op::Boot).await;
            let forwards = spec
                .network
                .iter()
                .flat_map(|n| n.forwards.iter().cloned())
                .collect();
            self.start(&spec.dir, spec.memory_mib, forwards).await
        })
    }

    fn restore<'a>(
        &'a self,
        snapshot: &'a Snapshot,
        target: RestoreTarget,
    ) -> BoxFuture<'a, VmResult> {
        Box::pin(async move {
            self.control.enter(Op::Restore).await;
            if self.control.take_fault(&[Fault::Restore]).is_some() {
                return Err(injected("restoring"));
            }
            let memory = snapshot.manifest.memory_mib;
            self.start(&target.dir, memory, target.forwards).await
        })
    }

    fn resume<'a>(
        &'a self,
        suspended: &'a SuspendedVm,
        target: RestoreTarget,
    ) -> BoxFuture<'a, VmResult> {
        Box::pin(async move {
            self.control.enter(Op::Resume).await;
            if !self.control.state().suspended.contains_key(suspended.dir()) {
                return Err(not_there(suspended.dir(), "no suspended session"));
            }
            if self.control.take_fault(&[Fault::Resume]).is_some() {
                return Err(injected("resuming"));
            }
            let memory = suspended.snapshot.manifest.memory_mib;
            let vm = self.start(&target.dir, memory, target.forwards).await?;
            self.control.state().suspended.remove(suspended.dir());
            let _ = std::fs::remove_dir_all(suspended.dir());
            Ok(vm)
        })
    }

    fn attach<'a>(&'a self, dir: &'a Path) -> BoxFuture<'a, VmResult> {
        // A fake VM lives only as long as the process that started it.
        Box::pin(async move { Err(not_there(dir, "no VM to take over")) })
    }

    fn kill_leftovers(&self, dir: &Path) {
        self.control.state().live.retain(|d, _| !d.starts_with(dir));
    }

    fn open_snapshot(&self, dir: &Path) -> Result<Snapshot, VmmError> {
        let state = self.control.state();
        let found = state.snapshots.get(dir).cloned();
        found.ok_or_else(|| not_there(dir, "no snapshot registered there"))
    }

    fn open_suspended(&self, dir: &Path) -> Result<SuspendedVm, VmmError> {
        let state = self.control.state();
        let found = state.suspended.get(dir).filter(|_| dir.exists()).cloned();
        found.ok_or_else(|| not_there(dir, "no suspended session"))
    }

    fn create_overlay(
        &self,
        _base: &Path,
        _format: DiskFormat,
        top: &Path,
    ) -> Result<(), VmmError> {
        std::fs::write(top, b"").map_err(|e| VmmError::io("creating", top, e))
    }
}

/// One fake VM.
struct FakeVm {
    dir: PathBuf,
    /// Its memory, fixed: fake VMs never grow.
    memory_mib: u64,
    pid: u32,
    forwards: Vec<PortForward>,
    agent: AgentClient,
    /// The fake guest agent's task; aborted when the VM ends.
    guest: JoinHandle<()>,
    timeline: Timeline,
    control: FakeControl,
}

impl FakeVm {
    /// Ends the VM: its record, its guest and its directory go.
    fn end(&self) {
        self.control.state().live.remove(&self.dir);
        self.guest.abort();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl MicroVm for FakeVm {
    fn agent(&self) -> &AgentClient {
        &self.agent
    }

    fn timeline(&self) -> &Timeline {
        &self.timeline
    }

    fn process_id(&self) -> Option<u32> {
        Some(self.pid)
    }

    fn app_log_tail(&self, _lines: usize) -> String {
        String::new()
    }

    fn forwards(&self) -> Vec<PortForward> {
        self.forwards.clone()
    }

    fn vcpu_range(&self) -> VcpuRange {
        VcpuRange {
            baseline: 1,
            ceiling: 1,
        }
    }

    fn cpu_time(&self) -> Option<Duration> {
        None
    }

    fn set_cpu_grant(&self, _vcpus: u32) -> Result<(), VmmError> {
        let missing = std::io::Error::from(std::io::ErrorKind::Unsupported);
        Err(VmmError::io("granting vCPUs to", &self.dir, missing))
    }

    fn memory_range(&self) -> MemoryRange {
        MemoryRange {
            baseline: self.memory_mib,
            ceiling: self.memory_mib,
        }
    }

    fn plugged_memory(&self) -> BoxFuture<'_, Result<u64, VmmError>> {
        Box::pin(async { Ok(0) })
    }

    fn set_plugged_memory(&self, mib: u64) -> BoxFuture<'_, Result<u64, VmmError>> {
        Box::pin(async move {
            if mib == 0 {
                return Ok(0);
            }
            Err(VmmError::MemoryOutOfRange {
                requested_mib: mib,
                reason: "a fake VM's memory is fixed".into(),
            })
        })
    }

    fn request_memory(&self, mib: u64) -> BoxFuture<'_, Result<u64, VmmError>> {
        self.set_plugged_memory(mib)
    }

    fn set_memory_grant(&self, _mib: u64) -> Result<(), VmmError> {
        let missing = std::io::Error::from(std::io::ErrorKind::Unsupported);
        Err(VmmError::io("granting memory to", &self.dir, missing))
    }

    fn pause(&self) -> BoxFuture<'_, Result<(), VmmError>> {
        Box::pin(async { Ok(()) })
    }

    fn resume(&self) -> BoxFuture<'_, Result<(), VmmError>> {
        Box::pin(async { Ok(()) })
    }

    fn status(&mut self) -> BoxFuture<'_, VmStatus> {
        let status = match self.control.state().live.contains_key(&self.dir) {
            true => VmStatus::Running,
            false => VmStatus::Exited("killed".into()),
        };
        Box::pin(async move { status })
    }

    fn netns(&self) -> Option<Arc<Netns>> {
        None
    }

    fn set_egress<'a>(&'a mut self, _egress: &'a VmEgress) -> BoxFuture<'a, Result<(), VmmError>> {
        Box::pin(async { Ok(()) })
    }

    fn add_forward(&mut self, forward: PortForward) -> BoxFuture<'_, Result<(), VmmError>> {
        self.forwards.push(forward);
        Box::pin(async { Ok(()) })
    }

    fn freeze_disk_layer<'a>(
        &'a mut self,
        _index: usize,
        new_top: &'a Path,
    ) -> BoxFuture<'a, Result<(), VmmError>> {
        Box::pin(async move {
            std::fs::write(new_top, b"").map_err(|e| VmmError::io("creating", new_top, e))
        })
    }

    fn snapshot<'a>(self: Box<Self>, dest: &'a Path) -> BoxFuture<'a, Result<Snapshot, VmmError>> {
        Box::pin(async move {
            let memory = self.control.state().live.get(&self.dir).copied();
            self.end();
            let memory = memory.ok_or_else(|| not_there(&self.dir, "the VM is gone"))?;
            FakeVmm {
                control: self.control.clone(),
            }
            .add_snapshot(dest, memory)
        })
    }

    fn suspend<'a>(
        self: Box<Self>,
        dest: &'a Path,
    ) -> BoxFuture<'a, Result<SuspendedVm, SuspendError<Box<dyn MicroVm>>>> {
        Box::pin(async move {
            self.control.enter(Op::Suspend).await;
            let fault = self
                .control
                .take_fault(&[Fault::SuspendAlive, Fault::SuspendDead]);
            let memory = self.control.state().live.get(&self.dir).copied();
            let memory = match (fault, memory) {
                (Some(Fault::SuspendAlive), Some(_)) => {
                    return Err(SuspendError {
                        error: injected("suspending"),
                        vm: Some(self as Box<dyn MicroVm>),
                    })
                }
                (Some(_), _) | (None, None) => {
                    self.end();
                    return Err(SuspendError {
                        error: injected("suspending (the VM died)"),
                        vm: None,
                    });
                }
                (None, Some(memory)) => memory,
            };
            self.end();
            if let Err(error) = std::fs::create_dir_all(dest) {
                return Err(SuspendError {
                    error: VmmError::io("creating", dest, error),
                    vm: None,
                });
            }
            let saved = SuspendedVm {
                snapshot: Snapshot {
                    dir: dest.to_owned(),
                    manifest: snapshot_manifest(memory, SnapshotKind::Session),
                },
                timeline: Timeline::default(),
            };
            self.control
                .state()
                .suspended
                .insert(dest.to_owned(), saved.clone());
            Ok(saved)
        })
    }

    fn terminate(self: Box<Self>) -> BoxFuture<'static, Result<(), VmmError>> {
        Box::pin(async move {
            self.control.enter(Op::Terminate).await;
            self.end();
            Ok(())
        })
    }
}

/// A failure the test asked for.
fn injected(doing: &str) -> VmmError {
    VmmError::Injected(format!("{doing} failed"))
}

fn not_there(dir: &Path, reason: &str) -> VmmError {
    VmmError::BadSnapshot {
        dir: dir.to_owned(),
        reason: format!("{reason} (fake backend)"),
    }
}

/// A file reference for manifests that name no real file.
fn nothing() -> FileRef {
    FileRef {
        path: PathBuf::new(),
        blake3: String::new(),
    }
}

fn snapshot_manifest(memory_mib: u64, kind: SnapshotKind) -> SnapshotManifest {
    let file = |name: &str| FileInfo {
        file: name.into(),
        size: 0,
        allocated: 0,
        blake3: None,
    };
    SnapshotManifest {
        format: crate::snapshot::SNAPSHOT_FORMAT,
        backend: "fake".into(),
        kind,
        created_unix: unix_now(),
        qemu_version: "fake".into(),
        accel: kiln_api::Accel::Tcg,
        cpu: "fake".into(),
        machine: "fake".into(),
        memory_mib,
        machine_kind: crate::spec::MachineKind::Microvm,
        max_memory_mib: None,
        vcpus: 1,
        baseline_vcpus: None,
        tsc_khz: 0,
        kernel: nothing(),
        initramfs: nothing(),
        cmdline_extra: Vec::new(),
        network: true,
        state: file(crate::snapshot::STATE),
        memory: file(crate::snapshot::MEMORY),
        disks: Vec::new(),
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Starts a fake guest agent on `dir/agent.sock` and connects a client to it.
async fn fake_guest(
    dir: &Path,
    control: FakeControl,
) -> Result<(AgentClient, JoinHandle<()>), VmmError> {
    let socket = dir.join("agent.sock");
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket).map_err(|e| VmmError::io("binding", &socket, e))?;
    let guest = tokio::spawn(async move {
        // One host connection at a time, as a real guest serves its virtio port.
        while let Ok((stream, _)) = listener.accept().await {
            serve_guest(stream, &control).await;
        }
    });
    match AgentClient::connect(&socket, Duration::from_secs(5)).await {
        Ok(agent) => Ok((agent, guest)),
        Err(source) => {
            guest.abort();
            Err(VmmError::Agent {
                doing: "connecting to the fake guest".into(),
                source,
            })
        }
    }
}

/// Answers one host connection until it closes.
async fn serve_guest(mut stream: tokio::net::UnixStream, control: &FakeControl) {
    let mut decoder = FrameDecoder::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        decoder.push(&buf[..n]);
        while let Some(Ok(frame)) = decoder.next_frame() {
            let Ok(message) = decode_payload::<HostMessage>(&frame) else {
                continue;
            };
            let body = answer(message.body, control);
            let Ok(reply) = encode_frame(&GuestMessage {
                id: message.id,
                body,
            }) else {
                return;
            };
            if stream.write_all(&reply).await.is_err() {
                return;
            }
        }
    }
}

/// What the fake guest answers to `request`.
fn answer(request: HostBody, control: &FakeControl) -> GuestBody {
    match request {
        HostBody::Hello { .. } => GuestBody::HelloOk {
            version: PROTOCOL_VERSION,
            agent_version: "fake".into(),
            kernel: "fake".into(),
            uptime_ms: 1,
        },
        HostBody::Ping => GuestBody::Pong,
        HostBody::SetClock { .. }
        | HostBody::AddEntropy { .. }
        | HostBody::Sync { .. }
        | HostBody::Warm { .. } => GuestBody::Ok,
        HostBody::HttpRequest(spec) => {
            control.state().http_paths.push(spec.path);
            GuestBody::HttpResponse {
                status: 200,
                headers: Vec::new(),
                body: Vec::new(),
                truncated: false,
            }
        }
        other => GuestBody::Error {
            message: format!("the fake guest does not do {other:?}"),
        },
    }
}

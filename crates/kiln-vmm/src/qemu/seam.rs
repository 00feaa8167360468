//! The QEMU backend behind the object-safe [`Vmm`] and [`MicroVm`] traits: each operation
//! delegates to the inherent one of the same name in `mod.rs`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use kiln_agent::client::AgentClient;

use super::{process, QemuVm, QemuVmm};
use crate::{
    Backend, BootOptions, BoxFuture, DiskFormat, MemoryRange, MicroVm, Netns, PortForward,
    RestoreTarget, Snapshot, SuspendError, SuspendedVm, Timeline, VcpuRange, VmEgress, VmResult,
    VmSpec, VmStatus, Vmm, VmmError,
};

/// A QEMU VM as the seam hands it out.
fn boxed(vm: Result<QemuVm, VmmError>) -> VmResult {
    vm.map(|vm| Box::new(vm) as Box<dyn MicroVm>)
}

impl Vmm for QemuVmm {
    fn describe(&self) -> Backend {
        Backend {
            name: "QEMU",
            version: self.qemu().version.clone(),
        }
    }

    fn boot(&self, spec: VmSpec, opts: BootOptions) -> BoxFuture<'_, VmResult> {
        Box::pin(async move { boxed(QemuVmm::boot(self, spec, opts).await) })
    }

    fn restore<'a>(
        &'a self,
        snapshot: &'a Snapshot,
        target: RestoreTarget,
    ) -> BoxFuture<'a, VmResult> {
        Box::pin(async move { boxed(QemuVmm::restore(self, snapshot, target).await) })
    }

    fn resume<'a>(
        &'a self,
        suspended: &'a SuspendedVm,
        target: RestoreTarget,
    ) -> BoxFuture<'a, VmResult> {
        Box::pin(async move { boxed(QemuVmm::resume(self, suspended, target).await) })
    }

    fn attach<'a>(&'a self, dir: &'a Path) -> BoxFuture<'a, VmResult> {
        Box::pin(async move { boxed(QemuVmm::attach(self, dir).await) })
    }

    fn kill_leftovers(&self, dir: &Path) {
        QemuVmm::kill_leftovers(self, dir)
    }

    fn open_snapshot(&self, dir: &Path) -> Result<Snapshot, VmmError> {
        Snapshot::open(dir, &self.qemu().version)
    }

    fn open_suspended(&self, dir: &Path) -> Result<SuspendedVm, VmmError> {
        SuspendedVm::open(dir, &self.qemu().version)
    }

    fn create_overlay(&self, base: &Path, format: DiskFormat, top: &Path) -> Result<(), VmmError> {
        super::create_overlay(base, format, top)
    }
}

impl MicroVm for QemuVm {
    fn agent(&self) -> &AgentClient {
        QemuVm::agent(self)
    }

    fn timeline(&self) -> &Timeline {
        QemuVm::timeline(self)
    }

    fn process_id(&self) -> Option<u32> {
        Some(self.pid())
    }

    fn app_log_tail(&self, lines: usize) -> String {
        process::tail(&self.spec().app_log(), lines)
    }

    fn forwards(&self) -> Vec<PortForward> {
        self.spec()
            .network
            .iter()
            .flat_map(|n| n.forwards.iter().cloned())
            .collect()
    }

    fn vcpu_range(&self) -> VcpuRange {
        VcpuRange::of(self.spec())
    }

    fn cpu_time(&self) -> Option<Duration> {
        crate::cgroup::cpu_usage(&self.spec().dir)
    }

    fn set_cpu_grant(&self, vcpus: u32) -> Result<(), VmmError> {
        crate::cgroup::set_cpu_grant(&self.spec().dir, vcpus)
    }

    fn memory_range(&self) -> MemoryRange {
        MemoryRange::of(self.spec())
    }

    fn plugged_memory(&self) -> BoxFuture<'_, Result<u64, VmmError>> {
        Box::pin(QemuVm::plugged_memory(self))
    }

    fn set_plugged_memory(&self, mib: u64) -> BoxFuture<'_, Result<u64, VmmError>> {
        Box::pin(QemuVm::set_plugged_memory(self, mib))
    }

    fn request_memory(&self, mib: u64) -> BoxFuture<'_, Result<u64, VmmError>> {
        Box::pin(QemuVm::request_memory(self, mib))
    }

    fn set_memory_grant(&self, mib: u64) -> Result<(), VmmError> {
        crate::cgroup::set_memory_limit(&self.spec().dir, self.spec().memory_mib + mib)
    }

    fn pause(&self) -> BoxFuture<'_, Result<(), VmmError>> {
        Box::pin(QemuVm::pause(self))
    }

    fn resume(&self) -> BoxFuture<'_, Result<(), VmmError>> {
        Box::pin(QemuVm::resume(self))
    }

    fn status(&mut self) -> BoxFuture<'_, VmStatus> {
        Box::pin(QemuVm::status(self))
    }

    fn netns(&self) -> Option<Arc<Netns>> {
        QemuVm::netns(self)
    }

    fn set_egress<'a>(&'a mut self, egress: &'a VmEgress) -> BoxFuture<'a, Result<(), VmmError>> {
        Box::pin(QemuVm::set_egress(self, egress))
    }

    fn add_forward(&mut self, forward: PortForward) -> BoxFuture<'_, Result<(), VmmError>> {
        Box::pin(QemuVm::add_forward(self, forward))
    }

    fn freeze_disk_layer<'a>(
        &'a mut self,
        index: usize,
        new_top: &'a Path,
    ) -> BoxFuture<'a, Result<(), VmmError>> {
        Box::pin(QemuVm::freeze_disk_layer(self, index, new_top))
    }

    fn snapshot<'a>(self: Box<Self>, dest: &'a Path) -> BoxFuture<'a, Result<Snapshot, VmmError>> {
        Box::pin(QemuVm::snapshot(*self, dest))
    }

    fn suspend<'a>(
        self: Box<Self>,
        dest: &'a Path,
    ) -> BoxFuture<'a, Result<SuspendedVm, SuspendError<Box<dyn MicroVm>>>> {
        Box::pin(async move {
            QemuVm::suspend(*self, dest)
                .await
                .map_err(|e| SuspendError {
                    error: e.error,
                    vm: e.vm.map(|vm| Box::new(vm) as Box<dyn MicroVm>),
                })
        })
    }

    fn terminate(self: Box<Self>) -> BoxFuture<'static, Result<(), VmmError>> {
        Box::pin(QemuVm::terminate(*self))
    }
}

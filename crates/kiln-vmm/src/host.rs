//! What this host runs VMs with: a VMM backend, accelerator, TSC frequency and guest assets,
//! found once.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::accel::AccelChoice;
use crate::assets::GuestAssets;
use crate::qemu::QemuVmm;
use crate::spec::VmSpec;
use crate::{Vmm, VmmError};

/// Default guest memory in MiB for kiln's small VMs.
pub const DEFAULT_MEMORY_MIB: u64 = 256;

/// A host ready to run VMs with backend `V`. kilnd and kiln-image hold the plain `Host`
/// (`V = dyn Vmm`, see [`Host::into_dyn`]); tests of one backend keep its own type.
#[derive(Debug)]
pub struct Host<V: ?Sized = dyn Vmm> {
    /// The data directory.
    pub home: PathBuf,
    /// The VMM backend.
    pub vmm: Arc<V>,
    /// The accelerator and why it was chosen.
    pub accel: AccelChoice,
    /// Host TSC frequency in kHz.
    pub tsc_khz: u64,
    /// Guest kernel and initramfs.
    pub assets: GuestAssets,
}

impl<V: ?Sized> Clone for Host<V> {
    fn clone(&self) -> Self {
        Host {
            home: self.home.clone(),
            vmm: self.vmm.clone(),
            accel: self.accel.clone(),
            tsc_khz: self.tsc_khz,
            assets: self.assets.clone(),
        }
    }
}

impl Host<QemuVmm> {
    /// Finds QEMU, chooses the accelerator, measures the TSC and makes sure the guest kernel
    /// and initramfs exist (fetching the kernel with `apt-get download` the first time).
    pub fn prepare(home: &Path) -> Result<Host<QemuVmm>, VmmError> {
        let vmm = QemuVmm::new()?;
        let accel = crate::accel::choose_accel(home)?;
        let tsc_khz = crate::tsc::host_tsc_khz(home)?;
        let assets = crate::assets::ensure_guest_assets(home)?;
        Ok(Host {
            home: home.to_owned(),
            vmm: Arc::new(vmm),
            accel,
            tsc_khz,
            assets,
        })
    }
}

impl<V: Vmm + 'static> Host<V> {
    /// The same host with its backend behind the [`Vmm`] trait.
    pub fn into_dyn(self) -> Host {
        Host {
            home: self.home,
            vmm: self.vmm,
            accel: self.accel,
            tsc_khz: self.tsc_khz,
            assets: self.assets,
        }
    }
}

impl<V: ?Sized> Host<V> {
    /// A spec for a 1-vCPU VM with kiln's guest kernel, no disks, no network, no memory file.
    pub fn vm_spec(&self, dir: PathBuf) -> VmSpec {
        VmSpec {
            dir,
            vcpus: 1,
            baseline_vcpus: None,
            memory_mib: DEFAULT_MEMORY_MIB,
            machine: crate::spec::MachineKind::Microvm,
            max_memory_mib: None,
            kernel: self.assets.kernel.vmlinuz.clone(),
            initramfs: self.assets.initramfs.path.clone(),
            cmdline_extra: Vec::new(),
            disks: Vec::new(),
            network: None,
            memory_file: None,
            accel: self.accel.accel,
            tsc_khz: self.tsc_khz,
            jail: None,
            discard_app_log: false,
        }
    }
}

//! What this host runs VMs with: QEMU, accelerator, TSC frequency and guest assets, found once.

use std::path::{Path, PathBuf};

use crate::accel::AccelChoice;
use crate::assets::GuestAssets;
use crate::qemu::QemuVmm;
use crate::spec::VmSpec;
use crate::VmmError;

/// Default guest memory in MiB for kiln's small VMs.
pub const DEFAULT_MEMORY_MIB: u64 = 256;

/// A host ready to run VMs.
#[derive(Debug, Clone)]
pub struct Host {
    /// The data directory.
    pub home: PathBuf,
    /// The VMM backend.
    pub vmm: QemuVmm,
    /// The accelerator and why it was chosen.
    pub accel: AccelChoice,
    /// Host TSC frequency in kHz.
    pub tsc_khz: u64,
    /// Guest kernel and initramfs.
    pub assets: GuestAssets,
}

impl Host {
    /// Finds QEMU, chooses the accelerator, measures the TSC and makes sure the guest kernel
    /// and initramfs exist (fetching the kernel with `apt-get download` the first time).
    pub fn prepare(home: &Path) -> Result<Host, VmmError> {
        let vmm = QemuVmm::new()?;
        let accel = crate::accel::choose_accel(home)?;
        let tsc_khz = crate::tsc::host_tsc_khz(home)?;
        let assets = crate::assets::ensure_guest_assets(home)?;
        Ok(Host {
            home: home.to_owned(),
            vmm,
            accel,
            tsc_khz,
            assets,
        })
    }

    /// A spec for a 1-vCPU VM with kiln's guest kernel, no disks, no network, no memory file.
    pub fn vm_spec(&self, dir: PathBuf) -> VmSpec {
        VmSpec {
            dir,
            vcpus: 1,
            memory_mib: DEFAULT_MEMORY_MIB,
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

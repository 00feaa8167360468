//! The typed description of one VM, from which a backend derives its command line.

use std::path::PathBuf;

use kiln_api::Accel;
use serde::{Deserialize, Serialize};

/// Everything needed to start (or restore into) one microVM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmSpec {
    /// Runtime directory of this VM: sockets, pid file, console and QEMU logs live here.
    pub dir: PathBuf,
    /// Number of virtual CPUs (`-smp`): the most the guest can ever have online.
    pub vcpus: u32,
    /// vCPUs online when the guest boots (kernel `maxcpus=`) and granted by the VM's cgroup
    /// when it starts; the rest of [`VmSpec::vcpus`] are present but offline, for the guest
    /// to grow into once the host grants them. `None`: all of them (a VM of fixed size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline_vcpus: Option<u32>,
    /// Guest memory in MiB: what the guest boots with (its baseline).
    pub memory_mib: u64,
    /// The machine type (`microvm` in specs written before there was a choice).
    #[serde(default)]
    pub machine: MachineKind,
    /// The most memory in MiB the guest may grow to (`q35` only): the part above
    /// [`VmSpec::memory_mib`] is a virtio-mem device, unplugged at boot, that the host plugs
    /// and unplugs. `None` (or not above `memory_mib`): no such device, the memory is fixed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_memory_mib: Option<u64>,
    /// Guest kernel (`vmlinuz`).
    pub kernel: PathBuf,
    /// Initramfs holding `kiln-init` and the kernel modules.
    pub initramfs: PathBuf,
    /// Extra kernel command-line words, appended after kiln's own.
    pub cmdline_extra: Vec<String>,
    /// Block devices, in guest order (`/dev/vda`, `/dev/vdb`, ...).
    pub disks: Vec<DiskSpec>,
    /// User-mode networking, or `None` for no network device at all.
    pub network: Option<NetSpec>,
    /// Guest RAM backed by this file instead of anonymous memory.
    pub memory_file: Option<MemoryFile>,
    /// Accelerator to run under.
    pub accel: Accel,
    /// Host TSC frequency in kHz, passed to the guest as `tsc_early_khz` (needed under TCG).
    pub tsc_khz: u64,
    /// The uid and gid QEMU runs as, once confined (set by the backend when it starts QEMU).
    #[serde(default)]
    pub jail: Option<crate::jail::JailId>,
    /// Discard what the guest writes to its app log port (RunMicrovm `logging: disabled`):
    /// the port stays, so the device set matches the snapshot's, but nothing is kept.
    #[serde(default)]
    pub discard_app_log: bool,
}

/// The QEMU machine a VM runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MachineKind {
    /// `microvm`: virtio-mmio devices and no PCI bus, so its memory is fixed at boot.
    #[default]
    Microvm,
    /// `q35` (pinned as `pc-q35-7.2`): virtio-pci devices, and a virtio-mem device when the
    /// spec sets a memory ceiling.
    Q35,
}

impl MachineKind {
    /// The name kiln uses for it (`microvm`, `q35`).
    pub fn as_str(self) -> &'static str {
        match self {
            MachineKind::Microvm => "microvm",
            MachineKind::Q35 => "q35",
        }
    }
}

/// One virtio block device.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskSpec {
    /// Image file.
    pub path: PathBuf,
    /// Image format.
    pub format: DiskFormat,
    /// Attach read-only.
    pub read_only: bool,
}

/// Disk image formats kiln uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// A plain image (ext4 straight on the device).
    Raw,
    /// A qcow2 image, typically an overlay on a read-only raw base.
    Qcow2,
}

impl DiskFormat {
    /// The name QEMU and `qemu-img` use.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

/// User-mode (slirp) networking: guest 10.0.2.15/24, gateway 10.0.2.2, DNS 10.0.2.3.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NetSpec {
    /// TCP forwards from the host's loopback into the guest.
    pub forwards: Vec<PortForward>,
    /// Deny all egress from the guest; forwards keep working.
    pub restrict_egress: bool,
}

/// A TCP forward `127.0.0.1:host_port` → guest `guest_port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortForward {
    /// Port on the host's loopback.
    pub host_port: u16,
    /// Port inside the guest.
    pub guest_port: u16,
}

/// A file that backs guest RAM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemoryFile {
    /// The file; created sparse by QEMU when missing.
    pub path: PathBuf,
    /// `true`: writes go to the file (a VM that will be snapshotted). `false`: a private
    /// copy-on-write mapping (a VM restored from a snapshot's memory, which stays untouched).
    pub shared: bool,
}

impl VmSpec {
    /// The vCPUs online at boot and granted at start: [`VmSpec::baseline_vcpus`], within
    /// 1 and [`VmSpec::vcpus`].
    pub fn baseline(&self) -> u32 {
        let ceiling = self.vcpus.max(1);
        self.baseline_vcpus.unwrap_or(ceiling).clamp(1, ceiling)
    }
    /// MiB of memory the host can plug into the guest beyond [`VmSpec::memory_mib`]: the
    /// size of its virtio-mem device (0: it has none; `microvm` never has one).
    pub fn growable_memory_mib(&self) -> u64 {
        match self.machine {
            MachineKind::Microvm => 0,
            MachineKind::Q35 => self
                .max_memory_mib
                .unwrap_or(0)
                .saturating_sub(self.memory_mib),
        }
    }
    /// The most memory in MiB the guest can ever have: its baseline plus its virtio-mem device.
    pub fn memory_ceiling_mib(&self) -> u64 {
        self.memory_mib + self.growable_memory_mib()
    }
    /// The QMP socket inside the runtime directory.
    pub fn qmp_socket(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }
    /// The agent's virtio-serial socket inside the runtime directory.
    pub fn agent_socket(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }
    /// The guest serial console log.
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    /// The app's stdout and stderr, written by the guest through the `applog` port.
    pub fn app_log(&self) -> PathBuf {
        self.dir.join("app.log")
    }
    /// QEMU's own stdout and stderr.
    pub fn qemu_log(&self) -> PathBuf {
        self.dir.join("qemu.log")
    }
    /// QEMU's pid file.
    pub fn pid_file(&self) -> PathBuf {
        self.dir.join("qemu.pid")
    }
}

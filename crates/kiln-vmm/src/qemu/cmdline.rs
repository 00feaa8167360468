//! Turns a [`VmSpec`] into QEMU's command line: machine `microvm` (virtio-mmio devices), or
//! `q35` (virtio-pci devices, and a virtio-mem device when the guest may grow its memory).

use std::ffi::OsString;
use std::path::Path;

use kiln_api::Accel;

use crate::spec::{DiskSpec, MachineKind, VmSpec};

/// The `-M` value kiln uses. ACPI stays on: microvm then describes the virtio-mmio devices
/// in its DSDT, and the Debian kernel lacks `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`.
pub const MACHINE: &str = "microvm,x-option-roms=off,isa-serial=on,pit=on,pic=on,rtc=on";

/// The `-M` value of a `q35` VM: the machine version pinned (saved device state loads only
/// into the same version), and every legacy device kiln has no use for off. ACPI stays on:
/// kiln-init powers the guest off through it.
pub const Q35_MACHINE: &str =
    "pc-q35-7.2,sata=off,smbus=off,usb=off,vmport=off,i8042=off,smm=off,graphics=off";

/// qboot, a firmware that only loads the kernel: a little faster than SeaBIOS and a smaller
/// device state. Used for `q35` when installed (Debian's `qemu-system-data` ships it).
pub const QBOOT: &str = "/usr/share/qemu/qboot.rom";

/// The QOM id of a `q35` VM's virtio-mem device (`/machine/peripheral/<id>`).
pub const VIRTIO_MEM_ID: &str = "vmem0";

/// The virtio-mem device's block size in MiB, the unit the host plugs and unplugs: set on the
/// command line (QEMU's default depends on the host's transparent huge pages), so saved
/// device state does not depend on the host.
pub const VIRTIO_MEM_BLOCK_MIB: u64 = 2;

/// QEMU's own seccomp filter, on every VM: no obsolete system calls, no setuid/setgid, no
/// fork/exec (so no `exec:` migration: streams travel as descriptors), no scheduler, CPU
/// affinity or memory-policy changes. `/proc/<pid>/status` then shows `Seccomp: 2`.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// The CPU model: `max` under TCG, the host's CPU under KVM.
pub fn cpu_model(accel: Accel) -> &'static str {
    match accel {
        Accel::Kvm => "host",
        Accel::Tcg => "max",
    }
}

/// TCG's translation cache in MiB. QEMU 7.2 reserves 1 GiB by default and a long-running guest
/// touches it all, which a VM's memory ceiling (`cgroup::MEMORY_OVERHEAD_MIB`) must cover.
pub const TCG_CACHE_MIB: u64 = 256;

/// The `-accel` value.
pub fn accel_option(accel: Accel) -> String {
    match accel {
        Accel::Tcg => format!("tcg,tb-size={TCG_CACHE_MIB}"),
        Accel::Kvm => "kvm".to_string(),
    }
}

/// Kernel command line for a kiln guest.
pub fn kernel_cmdline(spec: &VmSpec) -> String {
    let mut words = vec![
        "console=ttyS0".to_string(),
        "reboot=t".into(),
        "panic=-1".into(),
        "quiet".into(),
        format!("tsc_early_khz={}", spec.tsc_khz),
    ];
    if spec.network.is_none() {
        words.push("kiln.net=0".into());
    }
    if spec.baseline() < spec.vcpus {
        // Only the baseline comes up at boot; the others stay present and offline (sysfs
        // onlines them later), which also spares the boot their bring-up.
        words.push(format!("maxcpus={}", spec.baseline()));
    }
    if spec.growable_memory_mib() > 0 {
        // Plugged memory goes to ZONE_MOVABLE, so the guest can give it back on unplug.
        // `swiotlb=noforce`: with memory above 4 GiB possible the kernel would otherwise set
        // aside 64 MiB for bounce buffers that virtio never uses.
        words.push("memhp_default_state=online_movable".into());
        words.push("swiotlb=noforce".into());
    }
    words.extend(spec.cmdline_extra.iter().cloned());
    words.join(" ")
}

/// The firmware a `q35` VM boots with: qboot when installed, else QEMU's default (SeaBIOS).
/// The machine signature names it, since a restore must load the same firmware.
pub fn q35_firmware() -> Option<&'static str> {
    Path::new(QBOOT).exists().then_some(QBOOT)
}

/// A virtio device's QEMU name on this machine: `-device` on `microvm`'s virtio-mmio
/// transport, `-pci` with the legacy interface off on `q35`.
fn virtio(machine: MachineKind, device: &str) -> String {
    match machine {
        MachineKind::Microvm => format!("{device}-device"),
        MachineKind::Q35 => format!("{device}-pci,disable-legacy=on"),
    }
}

/// The whole argument vector (without the binary). `incoming` adds `-incoming defer`.
pub fn args(spec: &VmSpec, incoming: bool) -> Vec<OsString> {
    let mut a = Args::default();
    let mut machine = match spec.machine {
        MachineKind::Microvm => MACHINE.to_string(),
        MachineKind::Q35 => Q35_MACHINE.to_string(),
    };
    if spec.memory_file.is_some() {
        machine.push_str(",memory-backend=mem0");
    }
    a.pair("-M", machine);
    a.pair("-accel", accel_option(spec.accel));
    a.pair("-cpu", cpu_model(spec.accel));
    let growable = spec.growable_memory_mib();
    if growable > 0 {
        a.pair(
            "-m",
            format!(
                "{}M,maxmem={}M,slots=1",
                spec.memory_mib,
                spec.memory_ceiling_mib()
            ),
        );
    } else {
        a.pair("-m", format!("{}M", spec.memory_mib));
    }
    a.pair("-smp", spec.vcpus.to_string());
    for flag in ["-nodefaults", "-no-user-config", "-no-reboot"] {
        a.flag(flag);
    }
    a.pair("-display", "none");
    a.pair("-sandbox", SANDBOX);
    if let Some(mem) = &spec.memory_file {
        a.pair(
            "-object",
            format!(
                "memory-backend-file,id=mem0,size={}M,mem-path={},share={}",
                spec.memory_mib,
                opt_path(&mem.path),
                if mem.shared { "on" } else { "off" }
            ),
        );
    }
    if growable > 0 {
        // Anonymous memory, never a file: QEMU 7.2 restoring a VM empties a file behind a
        // virtio-mem device, and plugged blocks travel in the migration stream anyway.
        a.pair(
            "-object",
            format!("memory-backend-ram,id=vmemram,size={growable}M"),
        );
        a.pair(
            "-device",
            format!(
                "virtio-mem-pci,id={VIRTIO_MEM_ID},memdev=vmemram,block-size={VIRTIO_MEM_BLOCK_MIB}M,requested-size=0"
            ),
        );
    }
    if spec.machine == MachineKind::Q35 {
        if let Some(firmware) = q35_firmware() {
            a.pair("-bios", firmware);
        }
    }
    a.pair("-kernel", spec.kernel.as_os_str());
    a.pair("-initrd", spec.initramfs.as_os_str());
    a.pair("-append", kernel_cmdline(spec));
    for (i, disk) in spec.disks.iter().enumerate() {
        a.pair("-drive", drive(i, disk));
        a.pair(
            "-device",
            format!("{},drive=d{i}", virtio(spec.machine, "virtio-blk")),
        );
    }
    if let Some(net) = &spec.network {
        let mut netdev = format!(
            "user,id=n0,restrict={}",
            if net.restrict_egress { "on" } else { "off" }
        );
        for f in &net.forwards {
            netdev.push_str(&format!(
                ",hostfwd=tcp:127.0.0.1:{}-:{}",
                f.host_port, f.guest_port
            ));
        }
        a.pair("-netdev", netdev);
        let mut net = format!("{},netdev=n0", virtio(spec.machine, "virtio-net"));
        if spec.machine == MachineKind::Q35 {
            // No network-boot option ROM: the kernel is loaded directly, and the ROM would
            // be saved in every snapshot's device state.
            net.push_str(",romfile=");
        }
        a.pair("-device", net);
    }
    a.pair("-device", virtio(spec.machine, "virtio-serial"));
    a.pair(
        "-chardev",
        format!(
            "socket,id=agent0,path={},server=on,wait=off",
            opt_path(&spec.agent_socket())
        ),
    );
    a.pair("-device", "virtserialport,chardev=agent0,name=agent");
    // The app's stdout and stderr: a port the guest writes, a file on the host.
    if spec.discard_app_log {
        a.pair("-chardev", "null,id=applog0");
    } else {
        a.pair(
            "-chardev",
            format!(
                "file,id=applog0,path={},append=on",
                opt_path(&spec.app_log())
            ),
        );
    }
    a.pair("-device", "virtserialport,chardev=applog0,name=applog");
    a.pair("-device", virtio(spec.machine, "virtio-rng"));
    // Appended, so kilnd can empty the file when it passes its cap (`logcap`).
    a.pair(
        "-chardev",
        format!(
            "file,id=console0,path={},append=on",
            opt_path(&spec.console_log())
        ),
    );
    a.pair("-serial", "chardev:console0");
    a.pair(
        "-qmp",
        format!("unix:{},server=on,wait=off", opt_path(&spec.qmp_socket())),
    );
    a.pair("-pidfile", spec.pid_file().as_os_str());
    if incoming {
        a.pair("-incoming", "defer");
    }
    a.0
}

/// The machine-defining part of the command line, recorded in snapshot manifests: a restore
/// must recreate exactly these devices in this order.
pub fn machine_signature(spec: &VmSpec) -> String {
    let devices = format!(
        "cpu={} mem={}M smp={} disks={} net={} serial=agent,applog rng=1",
        cpu_model(spec.accel),
        spec.memory_mib,
        spec.vcpus,
        spec.disks.len(),
        spec.network.is_some()
    );
    match spec.machine {
        // Exactly what it was before q35 existed, so earlier images keep restoring.
        MachineKind::Microvm => format!("{MACHINE} {devices}"),
        MachineKind::Q35 => format!(
            "{Q35_MACHINE} firmware={} {devices} maxmem={}M",
            q35_firmware().unwrap_or("default"),
            spec.memory_ceiling_mib()
        ),
    }
}

fn drive(index: usize, disk: &DiskSpec) -> String {
    let mut s = format!(
        "id=d{index},file={},format={},if=none",
        opt_path(&disk.path),
        disk.format.as_str()
    );
    if disk.read_only {
        s.push_str(",readonly=on");
    }
    s
}

/// QEMU option values separate with commas; a literal comma is written twice.
fn opt_path(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

#[derive(Default)]
struct Args(Vec<OsString>);

impl Args {
    fn flag(&mut self, f: &str) {
        self.0.push(f.into());
    }
    fn pair(&mut self, k: &str, v: impl Into<OsString>) {
        self.0.push(k.into());
        self.0.push(v.into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{DiskFormat, MemoryFile, NetSpec, PortForward};

    fn spec() -> VmSpec {
        VmSpec {
            dir: "/run/kiln/vm1".into(),
            vcpus: 1,
            baseline_vcpus: None,
            memory_mib: 256,
            machine: MachineKind::Microvm,
            max_memory_mib: None,
            kernel: "/k/vmlinuz".into(),
            initramfs: "/k/initramfs.cpio".into(),
            cmdline_extra: vec![],
            disks: vec![DiskSpec {
                path: "/d/a,b.qcow2".into(),
                format: DiskFormat::Qcow2,
                read_only: false,
            }],
            network: Some(NetSpec {
                forwards: vec![PortForward {
                    host_port: 40001,
                    guest_port: 8080,
                }],
                restrict_egress: true,
            }),
            memory_file: Some(MemoryFile {
                path: "/s/mem.img".into(),
                shared: false,
            }),
            accel: Accel::Tcg,
            tsc_khz: 2_445_000,
            jail: None,
            discard_app_log: false,
        }
    }

    fn joined(spec: &VmSpec, incoming: bool) -> String {
        args(spec, incoming)
            .iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn args_when_restoring_then_private_memory_and_incoming_defer() {
        let line = joined(&spec(), true);
        assert!(line.contains("mem-path=/s/mem.img,share=off"));
        assert!(line.ends_with("-incoming defer"));
        assert!(line.contains("memory-backend=mem0"));
    }

    #[test]
    fn args_when_path_has_comma_then_it_is_doubled() {
        let line = joined(&spec(), false);
        assert!(line.contains("file=/d/a,,b.qcow2,format=qcow2"));
    }

    #[test]
    fn args_when_forwards_and_restriction_then_netdev_carries_both() {
        let line = joined(&spec(), false);
        assert!(line.contains("user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:40001-:8080"));
    }

    #[test]
    fn args_when_any_vm_then_qemu_sandbox_denies_spawn_and_privileges() {
        let line = joined(&spec(), false);
        assert!(line.contains(
            "-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
        ));
    }

    #[test]
    fn kernel_cmdline_when_tcg_then_has_tsc_early_khz() {
        assert!(kernel_cmdline(&spec()).contains("tsc_early_khz=2445000"));
    }

    #[test]
    fn args_when_baseline_below_ceiling_then_smp_is_the_ceiling_and_maxcpus_the_baseline() {
        let grown = VmSpec {
            vcpus: 4,
            baseline_vcpus: Some(1),
            ..spec()
        };

        let line = joined(&grown, false);

        assert!(line.contains("-smp 4 "), "{line}");
        assert!(kernel_cmdline(&grown).contains("maxcpus=1"));
        assert!(!kernel_cmdline(&spec()).contains("maxcpus"));
        assert!(machine_signature(&grown).contains("smp=4"));
    }

    fn q35(max_memory_mib: Option<u64>) -> VmSpec {
        VmSpec {
            machine: MachineKind::Q35,
            max_memory_mib,
            ..spec()
        }
    }

    #[test]
    fn args_when_q35_with_ceiling_then_pci_devices_and_virtio_mem_on_anonymous_ram() {
        let line = joined(&q35(Some(1024)), false);

        assert!(line.contains("-M pc-q35-7.2,"), "{line}");
        assert!(line.contains("-m 256M,maxmem=1024M,slots=1 "), "{line}");
        assert!(line.contains("-object memory-backend-ram,id=vmemram,size=768M"));
        assert!(line.contains(
            "-device virtio-mem-pci,id=vmem0,memdev=vmemram,block-size=2M,requested-size=0"
        ));
        assert!(line.contains("-device virtio-blk-pci,disable-legacy=on,drive=d0"));
        assert!(line.contains("-device virtio-net-pci,disable-legacy=on,netdev=n0,romfile= "));
        assert!(line.contains("-device virtio-serial-pci,disable-legacy=on"));
        assert!(line.contains("-device virtio-rng-pci,disable-legacy=on"));
        assert!(!line.contains("-device virtio-blk-device"));
    }

    #[test]
    fn kernel_cmdline_when_q35_with_ceiling_then_movable_hotplug_and_no_bounce_buffer() {
        let words = kernel_cmdline(&q35(Some(1024)));
        let fixed = kernel_cmdline(&q35(None));

        assert!(
            words.contains("memhp_default_state=online_movable"),
            "{words}"
        );
        assert!(words.contains("swiotlb=noforce"), "{words}");
        assert!(!fixed.contains("memhp_default_state"), "{fixed}");
    }

    #[test]
    fn args_when_q35_without_ceiling_then_fixed_memory_and_no_virtio_mem() {
        let line = joined(&q35(None), false);
        let at_baseline = joined(&q35(Some(256)), false);

        assert!(line.contains("-m 256M "), "{line}");
        assert!(!line.contains("virtio-mem"), "{line}");
        assert!(!line.contains("maxmem"), "{line}");
        assert!(!at_baseline.contains("virtio-mem"), "{at_baseline}");
    }

    #[test]
    fn args_when_microvm_with_a_ceiling_then_it_is_ignored() {
        let microvm = VmSpec {
            max_memory_mib: Some(1024),
            ..spec()
        };

        let line = joined(&microvm, false);

        assert!(line.contains("-M microvm,"), "{line}");
        assert!(
            !line.contains("maxmem") && !line.contains("virtio-mem"),
            "{line}"
        );
        assert!(line.contains("-device virtio-blk-device,drive=d0"));
    }

    #[test]
    fn machine_signature_when_microvm_then_as_before_q35_existed() {
        assert_eq!(
            machine_signature(&spec()),
            "microvm,x-option-roms=off,isa-serial=on,pit=on,pic=on,rtc=on cpu=max mem=256M \
             smp=1 disks=1 net=true serial=agent,applog rng=1"
        );
    }

    #[test]
    fn machine_signature_when_machine_or_ceiling_differs_then_it_differs() {
        let (microvm, fixed, grows, grows_more) = (
            machine_signature(&spec()),
            machine_signature(&q35(None)),
            machine_signature(&q35(Some(1024))),
            machine_signature(&q35(Some(2048))),
        );

        assert_ne!(microvm, fixed);
        assert_ne!(fixed, grows);
        assert_ne!(grows, grows_more);
        assert!(grows.contains("maxmem=1024M"), "{grows}");
    }
}

//! Turns a [`VmSpec`] into QEMU's command line (machine `microvm`).

use std::ffi::OsString;
use std::path::Path;

use kiln_api::Accel;

use crate::spec::{DiskSpec, VmSpec};

/// The `-M` value kiln uses. ACPI stays on: microvm then describes the virtio-mmio devices
/// in its DSDT, and the Debian kernel lacks `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`.
pub const MACHINE: &str = "microvm,x-option-roms=off,isa-serial=on,pit=on,pic=on,rtc=on";

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
    words.extend(spec.cmdline_extra.iter().cloned());
    words.join(" ")
}

/// The whole argument vector (without the binary). `incoming` adds `-incoming defer`.
pub fn args(spec: &VmSpec, incoming: bool) -> Vec<OsString> {
    let mut a = Args::default();
    let mut machine = MACHINE.to_string();
    if spec.memory_file.is_some() {
        machine.push_str(",memory-backend=mem0");
    }
    a.pair("-M", machine);
    a.pair("-accel", accel_option(spec.accel));
    a.pair("-cpu", cpu_model(spec.accel));
    a.pair("-m", format!("{}M", spec.memory_mib));
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
    a.pair("-kernel", spec.kernel.as_os_str());
    a.pair("-initrd", spec.initramfs.as_os_str());
    a.pair("-append", kernel_cmdline(spec));
    for (i, disk) in spec.disks.iter().enumerate() {
        a.pair("-drive", drive(i, disk));
        a.pair("-device", format!("virtio-blk-device,drive=d{i}"));
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
        a.pair("-device", "virtio-net-device,netdev=n0");
    }
    a.pair("-device", "virtio-serial-device");
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
    a.pair("-device", "virtio-rng-device");
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
    format!(
        "{MACHINE} cpu={} mem={}M smp={} disks={} net={} serial=agent,applog rng=1",
        cpu_model(spec.accel),
        spec.memory_mib,
        spec.vcpus,
        spec.disks.len(),
        spec.network.is_some()
    )
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
}

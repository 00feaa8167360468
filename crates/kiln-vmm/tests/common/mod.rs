//! Shared set-up for the VM tests: a host with kiln's guest assets and the busybox base.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use kiln_agent::client::{AgentClient, ExecRequest};
use kiln_vmm::host::Host;
use kiln_vmm::qemu::QemuVmm;
use kiln_vmm::{DiskFormat, DiskSpec, MemoryFile, NetSpec, VmSpec};

/// The data directory the tests share: `KILN_HOME` (the Makefile points it into `target/`),
/// else `target/kiln-test-home`, so kernels and base images are fetched once.
pub fn test_home() -> PathBuf {
    std::env::var_os("KILN_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/kiln-test-home")
        })
}

/// The prepared host and the busybox base disk, made once per test binary.
pub fn host() -> &'static (Host<QemuVmm>, PathBuf) {
    static HOST: OnceLock<(Host<QemuVmm>, PathBuf)> = OnceLock::new();
    HOST.get_or_init(|| {
        let home = test_home();
        let host = Host::prepare(&home).expect("host can run VMs (run `make test`)");
        let base = kiln_image::base::busybox::ensure(&home).expect("busybox base image");
        (host, base.disk)
    })
}

/// A scratch directory in /tmp (short paths: unix sockets live in it).
pub fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("kiln-t")
        .tempdir_in("/tmp")
        .expect("scratch dir")
}

/// A spec for a busybox VM in `dir/vm` with its own overlay disk; `snapshottable` backs its
/// memory with a shared file so it can be snapshotted.
pub fn busybox_spec(dir: &Path, snapshottable: bool) -> VmSpec {
    let (host, base) = host();
    std::fs::create_dir_all(dir).expect("VM scratch dir");
    let disk = dir.join("disk.qcow2");
    kiln_vmm::qemu::create_overlay(base, DiskFormat::Raw, &disk).expect("overlay");
    let mut spec = host.vm_spec(dir.join("vm"));
    spec.disks.push(DiskSpec {
        path: disk,
        format: DiskFormat::Qcow2,
        read_only: false,
    });
    spec.network = Some(NetSpec::default());
    if snapshottable {
        spec.memory_file = Some(MemoryFile {
            path: dir.join("mem.img"),
            shared: true,
        });
    }
    spec
}

/// Boots a snapshottable busybox VM in `dir` ([`busybox_spec`]) and snapshots it to
/// `dir/snap` (the VM ends with it).
pub async fn busybox_snapshot(dir: &Path) -> kiln_vmm::Snapshot {
    let vm = host()
        .0
        .vmm
        .boot(busybox_spec(dir, true), kiln_vmm::BootOptions::default())
        .await
        .expect("boot");
    vm.snapshot(&dir.join("snap")).await.expect("snapshot")
}

/// Runs `sh -c script` in the guest and returns (stdout, exit code).
pub async fn sh(agent: &AgentClient, script: &str) -> (String, Option<i32>) {
    let out = agent
        .run(ExecRequest::new(["sh", "-c", script]))
        .await
        .expect("exec through the agent");
    (String::from_utf8_lossy(&out.stdout).into_owned(), out.code)
}

/// Whether a process with this pid still exists (and is not a zombie).
pub fn process_exists(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// A guest counter: `/tmp/n` holds a number that grows ten times a second. Each value
/// replaces the file by a rename, so a reader never sees it half-written (a truncating
/// `echo` let a `cat` racing it read an empty file).
pub const COUNTER: &str =
    "(n=0; while :; do n=$((n+1)); echo $n > /tmp/n.new; mv /tmp/n.new /tmp/n; \
     sleep 0.1; done) >/dev/null 2>&1 &";

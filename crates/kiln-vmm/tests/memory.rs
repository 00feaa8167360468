//! A VM whose memory can grow: machine q35 with a virtio-mem device above its baseline. It
//! boots at its baseline, is snapshotted and restored with the same shape, the host plugs
//! memory into it, a suspend and resume keep what is plugged (and what the guest wrote
//! there), the host takes it back, and the guest — root in its VM — cannot plug any itself.

mod common;

use common::{busybox_spec, host, scratch, sh};
use kiln_agent::client::AgentClient;
use kiln_vmm::snapshot::SnapshotManifest;
use kiln_vmm::{BootOptions, MachineKind, MemoryRange, MicroVm, RestoreTarget, VmmError};

/// The guest's `MemTotal`, MiB.
async fn mem_total_mib(agent: &AgentClient) -> u64 {
    let (out, _) = sh(agent, "grep MemTotal /proc/meminfo").await;
    let kib: u64 = out
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no MemTotal in {out:?}"));
    kib / 1024
}

/// Everything a guest that is root can do to get memory blocks on its own: online every
/// offline block under /sys/devices/system/memory, in both of the kernel's spellings.
const ONLINE_EVERY_BLOCK: &str = "for b in /sys/devices/system/memory/memory*; do \
     echo online_movable > $b/state 2>/dev/null; echo online > $b/state 2>/dev/null; \
     echo 1 > $b/online 2>/dev/null; done; \
     echo 1 > /sys/devices/system/memory/auto_online_blocks 2>/dev/null; true";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_when_q35_with_a_ceiling_then_the_host_grows_and_shrinks_it_after_restore() {
    let dir = scratch();
    let vmm = &host().0.vmm;
    let mut spec = busybox_spec(dir.path(), true);
    spec.machine = MachineKind::Q35;
    spec.max_memory_mib = Some(4 * spec.memory_mib);
    let vm = vmm.boot(spec, BootOptions::default()).await.expect("boot");
    let booted = mem_total_mib(vm.agent()).await;
    let snap = vm
        .snapshot(&dir.path().join("snap"))
        .await
        .expect("snapshot");

    let restored = vmm
        .restore(&snap, RestoreTarget::new(dir.path().join("r")))
        .await
        .expect("restore");
    let range = MicroVm::memory_range(&restored);
    let at_restore = mem_total_mib(restored.agent()).await;
    let grown = restored.set_plugged_memory(256).await.expect("grow");
    let grown_total = mem_total_mib(restored.agent()).await;
    // 200 MiB in tmpfs, more than the baseline has free: most of it lands in plugged memory.
    let (written, _) = sh(
        restored.agent(),
        "mkdir -p /big && mount -t tmpfs -o size=240M big /big && \
         head -c 200000000 /dev/urandom > /big/f && md5sum < /big/f",
    )
    .await;
    let suspended = restored
        .suspend(&dir.path().join("suspended"))
        .await
        .expect("suspend");
    let resumed = vmm
        .resume(&suspended, RestoreTarget::new(dir.path().join("resumed")))
        .await
        .expect("resume");
    let resumed_total = mem_total_mib(resumed.agent()).await;
    let resumed_plugged = resumed.plugged_memory().await.expect("plugged");
    let (read_back, _) = sh(resumed.agent(), "md5sum < /big/f; rm /big/f; umount /big").await;
    let restored = resumed;
    let shrunk = restored.set_plugged_memory(0).await.expect("shrink");
    let shrunk_total = mem_total_mib(restored.agent()).await;
    sh(restored.agent(), ONLINE_EVERY_BLOCK).await;
    let after_trying = mem_total_mib(restored.agent()).await;
    let plugged_after_trying = restored.plugged_memory().await.expect("plugged");
    let beyond = restored.set_plugged_memory(1024).await;
    restored.terminate().await.expect("terminate");

    let m: &SnapshotManifest = &snap.manifest;
    assert_eq!(m.machine_kind, MachineKind::Q35);
    assert_eq!(m.max_memory_mib, Some(1024));
    assert_eq!(
        range,
        MemoryRange {
            baseline: 256,
            ceiling: 1024
        }
    );
    assert_eq!(at_restore, booted);
    assert_eq!(grown, 256);
    assert_eq!(grown_total, booted + 256, "booted with {booted} MiB");
    assert_eq!(resumed_total, grown_total);
    assert_eq!(resumed_plugged, 256);
    assert_eq!(read_back, written);
    assert!(!written.trim().is_empty());
    assert_eq!(shrunk, 0);
    assert_eq!(shrunk_total, booted);
    assert_eq!(after_trying, booted);
    assert_eq!(plugged_after_trying, 0);
    assert!(
        matches!(beyond, Err(VmmError::MemoryOutOfRange { .. })),
        "{beyond:?}"
    );
}

//! A VM that can grow: booted with four vCPUs present and one online (microvm has no vCPU
//! hotplug), its snapshot restores with the same shape, the agent onlines and offlines the
//! others, and the host's cgroup quota — not the guest — is what it is granted.

mod common;

use common::{busybox_spec, host, scratch, sh};
use kiln_agent::client::GuestCpus;
use kiln_vmm::cgroup::{cpu_quota_for, cpu_quota_us};
use kiln_vmm::{BootOptions, MicroVm, RestoreTarget, VcpuRange};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vcpus_when_booted_with_a_ceiling_then_baseline_online_and_the_rest_onlinable_after_restore(
) {
    let dir = scratch();
    let vmm = &host().0.vmm;
    let mut spec = busybox_spec(dir.path(), true);
    spec.vcpus = 4;
    spec.baseline_vcpus = Some(1);
    let vm = vmm.boot(spec, BootOptions::default()).await.expect("boot");
    let (booted_online, _) = sh(vm.agent(), "cat /sys/devices/system/cpu/online").await;
    let booted_quota = cpu_quota_us(&vm.spec().dir);
    let snap = vm
        .snapshot(&dir.path().join("snap"))
        .await
        .expect("snapshot");

    let restored = vmm
        .restore(&snap, RestoreTarget::new(dir.path().join("r")))
        .await
        .expect("restore");
    let range = MicroVm::vcpu_range(&restored);
    let at_restore = restored.agent().cpus().await.expect("cpu status");
    let grown = restored.agent().set_online_cpus(3).await.expect("grow");
    let (nproc, _) = sh(restored.agent(), "nproc").await;
    let quota_before_grant = cpu_quota_us(&restored.spec().dir);
    MicroVm::set_cpu_grant(&restored, 3).expect("grant");
    let quota_granted = cpu_quota_us(&restored.spec().dir);
    let shrunk = restored.agent().set_online_cpus(1).await.expect("shrink");
    let refused = restored.agent().set_online_cpus(5).await;
    let used = MicroVm::cpu_time(&restored);
    restored.terminate().await.expect("terminate");

    assert_eq!(booted_online.trim(), "0");
    assert_eq!(booted_quota, Some(cpu_quota_for(1)));
    assert_eq!(snap.manifest.vcpus, 4);
    assert_eq!(snap.manifest.baseline_vcpus, Some(1));
    assert_eq!(
        range,
        VcpuRange {
            baseline: 1,
            ceiling: 4
        }
    );
    assert_eq!(
        at_restore,
        GuestCpus {
            online: 1,
            present: 4
        }
    );
    assert_eq!(grown.online, 3);
    assert_eq!(nproc.trim(), "3");
    assert_eq!(quota_before_grant, Some(cpu_quota_for(1)));
    assert_eq!(quota_granted, Some(cpu_quota_for(3)));
    assert_eq!(shrunk.online, 1);
    assert!(refused.is_err(), "{refused:?}");
    assert!(used.is_some_and(|t| !t.is_zero()), "{used:?}");
}

//! Every QEMU is confined: its own uid, no capabilities, no_new_privs, QEMU's seccomp filter,
//! its own mount namespace whose root holds only its own files, its own cgroup — for a booted
//! VM, a VM restored from its snapshot and that VM resumed after a suspend, which all still
//! work. A guest writing to its console forever stops at the log cap.

mod common;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::Duration;

use common::{busybox_snapshot, busybox_spec, host, scratch, sh};
use kiln_vmm::qemu::QemuVm;
use kiln_vmm::{BootOptions, RestoreTarget};

/// The lines of `/proc/<pid>/status` that tell the confinement, as `name: value`.
fn confinement(pid: u32) -> Vec<(String, String)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("QEMU's status");
    status
        .lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(k, _)| {
            [
                "Uid",
                "Gid",
                "Groups",
                "Seccomp",
                "NoNewPrivs",
                "CapEff",
                "CapPrm",
            ]
            .contains(k)
        })
        .map(|(k, v)| {
            (
                k.to_string(),
                v.split_whitespace().collect::<Vec<_>>().join(" "),
            )
        })
        .collect()
}

fn value(lines: &[(String, String)], key: &str) -> String {
    lines
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
        .unwrap_or_default()
}

/// Asserts what a user auditing the host would check on one VM's QEMU.
fn assert_confined(vm: &QemuVm, other_vm_dir: &Path) {
    let pid = vm.pid();
    let lines = confinement(pid);
    let uid = value(&lines, "Uid");
    let root = format!("/proc/{pid}/root");
    let mnt = std::fs::read_link(format!("/proc/{pid}/ns/mnt")).expect("QEMU's mount ns");
    let own_mnt = std::fs::read_link("/proc/self/ns/mnt").expect("our mount ns");
    let top: Vec<String> = std::fs::read_dir(&root)
        .expect("QEMU's root")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    let dir_meta = std::fs::metadata(&vm.spec().dir).expect("runtime dir");

    let first_uid: u32 = uid.split(' ').next().unwrap_or("0").parse().unwrap_or(0);
    assert!(first_uid >= 200_000, "QEMU runs as uid {uid}");
    assert!(
        uid.split(' ').all(|u| u == first_uid.to_string()),
        "uids {uid}"
    );
    assert_eq!(value(&lines, "Seccomp"), "2");
    assert_eq!(value(&lines, "NoNewPrivs"), "1");
    assert_eq!(value(&lines, "CapEff"), "0000000000000000");
    assert_eq!(value(&lines, "CapPrm"), "0000000000000000");
    assert_ne!(mnt, own_mnt);
    let groups = kiln_vmm::cgroup::dirs_for(&vm.spec().dir);
    assert!(!groups.is_empty(), "this host has cgroups");
    for group in &groups {
        let procs = std::fs::read_to_string(group.join("cgroup.procs")).expect("cgroup.procs");
        assert!(
            procs.lines().any(|l| l.trim() == pid.to_string()),
            "QEMU {pid} is not in {}",
            group.display()
        );
    }
    let memory_limit = ["memory.max", "memory.limit_in_bytes"]
        .iter()
        .find_map(|f| std::fs::read_to_string(groups[0].join(f)).ok())
        .unwrap_or_default();
    assert_eq!(
        memory_limit.trim(),
        ((vm.spec().memory_mib + kiln_vmm::cgroup::MEMORY_OVERHEAD_MIB) << 20).to_string()
    );
    let cpu_quota = groups
        .iter()
        .find_map(|g| {
            std::fs::read_to_string(g.join("cpu.max"))
                .ok()
                .and_then(|v| v.split_whitespace().next().map(str::to_string))
                .or_else(|| std::fs::read_to_string(g.join("cpu.cfs_quota_us")).ok())
        })
        .unwrap_or_default();
    assert_eq!(
        cpu_quota.trim(),
        (u64::from(vm.spec().baseline()) * 100_000 + 50_000).to_string(),
        "the VM may use its granted vCPUs' worth of CPU and half a CPU more"
    );
    let spec = vm.spec();
    let used: Vec<&Path> = [spec.dir.as_path(), &spec.kernel, &spec.initramfs]
        .into_iter()
        .chain(spec.disks.iter().map(|d| d.path.as_path()))
        .collect();
    for name in &top {
        assert!(
            ["bin", "dev", "etc", "lib", "lib32", "lib64", "libx32", "sbin", "usr"]
                .contains(&name.as_str())
                || used.iter().any(|p| p.starts_with(format!("/{name}"))),
            "unexpected /{name} in QEMU's root: {top:?}"
        );
    }
    assert!(!Path::new(&format!("{root}/etc/passwd")).exists());
    assert!(!Path::new(&format!("{root}{}", other_vm_dir.display())).exists());
    assert!(Path::new(&format!("{root}{}", vm.spec().qmp_socket().display())).exists());
    assert_eq!(
        std::os::unix::fs::MetadataExt::uid(&dir_meta),
        first_uid,
        "runtime dir owner"
    );
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&dir_meta.permissions()) & 0o777,
        0o700
    );
}

/// `sh -c script arg0` with the identity of the QEMU process `pid` (uid, gid, groups): what a
/// guest that took its QEMU over could run.
fn as_qemu_of(pid: u32, script: &str, arg0: &str) -> std::process::Command {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let id_of = |field: &str| -> u32 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("id")
    };
    let (uid, gid) = (id_of("Uid:"), id_of("Gid:"));
    let groups: Vec<libc::gid_t> = status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|g| {
            g.split_whitespace()
                .filter_map(|g| g.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    let mut cmd = std::process::Command::new("sh");
    cmd.args(["-c", script, arg0]);
    // SAFETY: only async-signal-safe system calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || libc::setresgid(gid, gid, gid) != 0
                || libc::setresuid(uid, uid, uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_when_suspended_and_resumed_then_another_vm_cannot_read_its_memory() {
    as_kilnd();
    let dir = scratch();
    let vmm = &host().0.vmm;
    let snap = busybox_snapshot(dir.path()).await;
    let attacker = vmm
        .restore(&snap, RestoreTarget::new(dir.path().join("attacker")))
        .await
        .expect("the attacker's VM");
    let victim = vmm
        .restore(&snap, RestoreTarget::new(dir.path().join("victim")))
        .await
        .expect("the victim's VM");
    sh(victim.agent(), "echo secret-of-the-victim > /dev/shm/s").await;
    let dest = dir.path().join("suspended");
    let suspended = match victim.suspend(&dest).await {
        Ok(s) => s,
        Err(e) => panic!("suspend: {}", e.error),
    };
    let saved_memory = suspended.snapshot.memory_path();
    let saved = std::fs::metadata(&saved_memory).expect("the session's memory file");
    let receiver_memory = kiln_vmm::suspend::receiver_memory(&dest);
    // Read the saved session as the attacker's QEMU: through its own root, then by the host path.
    let through_root = format!("/proc/{}/root{}", attacker.pid(), saved_memory.display());
    let read_saved = as_qemu_of(attacker.pid(), "cat \"$0\" > /dev/null", &through_root)
        .status()
        .expect("sh");
    let read_saved_direct = as_qemu_of(
        attacker.pid(),
        "cat \"$0\" > /dev/null",
        &saved_memory.display().to_string(),
    )
    .status()
    .expect("sh");
    let resumed = vmm
        .resume(&suspended, RestoreTarget::new(dir.path().join("again")))
        .await
        .expect("resume");
    let (secret, _) = sh(resumed.agent(), "cat /dev/shm/s").await;
    let live_memory = resumed.spec().dir.join("mem.img");
    let live = std::fs::metadata(&live_memory).expect("the resumed VM's memory file");
    let read_live = as_qemu_of(
        attacker.pid(),
        "cat \"$0\" > /dev/null",
        &live_memory.display().to_string(),
    )
    .status()
    .expect("sh");
    let resumed_uid = value(&confinement(resumed.pid()), "Uid");
    resumed.terminate().await.expect("terminate");
    attacker.terminate().await.expect("terminate");

    use std::os::unix::fs::MetadataExt;
    assert_eq!(secret.trim(), "secret-of-the-victim");
    assert!(
        !read_saved.success(),
        "the saved session is not in another VM's root"
    );
    assert!(
        !read_saved_direct.success(),
        "nor readable by its host path"
    );
    assert!(
        !read_live.success(),
        "another VM reads a resumed session's memory"
    );
    assert_eq!(
        saved.mode() & 0o077,
        0,
        "a saved session's memory is its owner's alone"
    );
    assert_eq!(
        live.mode() & 0o077,
        0,
        "a resumed session's memory is its VM's alone"
    );
    assert_eq!(
        resumed_uid.split(' ').next().map(str::to_string),
        Some(live.uid().to_string()),
        "the resumed VM's own uid owns its memory file"
    );
    assert!(
        receiver_memory.is_none_or(|p| !p.exists()),
        "the receiver's RAM file is gone"
    );
}

/// A small cap, so a flood reaches it quickly (the same for every test of this binary).
const LOG_CAP: u64 = 64 * 1024;

/// As kilnd runs: a small log cap, and KILN_HOME private with umask 077.
fn as_kilnd() {
    std::env::set_var("KILN_VM_LOG_CAP", LOG_CAP.to_string());
    kiln_vmm::home::make_private(&common::test_home()).expect("private KILN_HOME");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_when_guest_writes_forever_then_log_stays_under_the_cap() {
    as_kilnd();
    let dir = scratch();
    let vm = host()
        .0
        .vmm
        .boot(busybox_spec(dir.path(), false), BootOptions::default())
        .await
        .expect("boot");
    let console = vm.spec().console_log();
    let rotated = dir.path().join("vm/console.log.1");

    sh(
        vm.agent(),
        "(while :; do echo 0123456789abcdef0123456789abcdef0123456789abcdef; done > /dev/ttyS0) \
         >/dev/null 2>&1 &",
    )
    .await;
    let mut largest = 0;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        largest = largest.max(std::fs::metadata(&console).map_or(0, |m| m.len()));
    }
    let (alive, _) = sh(vm.agent(), "echo alive").await;
    let rotated_len = std::fs::metadata(&rotated).map_or(0, |m| m.len());
    vm.terminate().await.expect("terminate");

    assert_eq!(alive.trim(), "alive");
    assert_eq!(
        rotated_len, LOG_CAP,
        "the flood passed the cap at least once"
    );
    assert!(
        largest < 4 * LOG_CAP,
        "console.log reached {largest} bytes with a cap of {LOG_CAP}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confine_when_booted_restored_and_resumed_then_own_uid_seccomp_no_caps_own_root() {
    as_kilnd();
    let dir = scratch();
    let vmm = &host().0.vmm;
    let booted = vmm
        .boot(busybox_spec(dir.path(), true), BootOptions::default())
        .await
        .expect("boot");
    let (echo, _) = sh(booted.agent(), "echo booted > /root/mark; cat /root/mark").await;
    assert_confined(&booted, &dir.path().join("elsewhere"));
    let booted_uid = value(&confinement(booted.pid()), "Uid");
    let snap = booted
        .snapshot(&dir.path().join("snap"))
        .await
        .expect("snapshot under the sandbox");

    let restored = vmm
        .restore(&snap, RestoreTarget::new(dir.path().join("run")))
        .await
        .expect("restore under the sandbox");
    let (seen, _) = sh(restored.agent(), "cat /root/mark; echo restored > /tmp/t").await;
    assert_confined(&restored, &dir.path().join("vm"));
    let restored_uid = value(&confinement(restored.pid()), "Uid");
    let suspended = match restored.suspend(&dir.path().join("suspended")).await {
        Ok(s) => s,
        Err(e) => panic!("suspend under the sandbox: {}", e.error),
    };
    let resumed = vmm
        .resume(&suspended, RestoreTarget::new(dir.path().join("again")))
        .await
        .expect("resume under the sandbox");
    let (after, _) = sh(resumed.agent(), "cat /root/mark /tmp/t").await;
    assert_confined(&resumed, &dir.path().join("run"));
    let groups = kiln_vmm::cgroup::dirs_for(&resumed.spec().dir);
    resumed.terminate().await.expect("terminate");
    let left: Vec<_> = groups.iter().filter(|g| g.exists()).collect();

    assert_eq!(echo.trim(), "booted");
    assert_eq!(seen.trim(), "booted");
    assert_eq!(
        after.split_whitespace().collect::<Vec<_>>(),
        ["booted", "restored"]
    );
    assert_ne!(booted_uid, restored_uid);
    assert!(left.is_empty(), "cgroups left behind: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freeze_disk_layer_when_confined_then_guest_continues_on_a_layer_kilnd_made() {
    as_kilnd();
    let dir = scratch();
    let vmm = &host().0.vmm;
    let mut vm = vmm
        .boot(busybox_spec(dir.path(), false), BootOptions::default())
        .await
        .expect("boot");
    let first = vm.spec().disks[0].path.clone();
    sh(vm.agent(), "echo one > /root/one; sync").await;
    let layer = dir.path().join("layer2.qcow2");

    vm.freeze_disk_layer(0, &layer)
        .await
        .expect("freeze under the jail");
    let (written, code) = sh(
        vm.agent(),
        "echo two > /root/two; sync; cat /root/one /root/two",
    )
    .await;
    vm.terminate().await.expect("terminate");
    let mut next = busybox_spec(&dir.path().join("next"), false);
    next.disks[0].path = layer.clone();
    let again = vmm
        .boot(next, BootOptions::default())
        .await
        .expect("boot on the new layer");
    let (seen, _) = sh(again.agent(), "cat /root/one /root/two").await;
    again.terminate().await.expect("terminate");

    assert_eq!(code, Some(0));
    assert_eq!(
        written.split_whitespace().collect::<Vec<_>>(),
        ["one", "two"]
    );
    assert_eq!(seen.split_whitespace().collect::<Vec<_>>(), ["one", "two"]);
    assert_eq!(
        kiln_vmm::suspend::qcow2_backing(&layer).expect("read layer"),
        Some(first)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_file_when_a_restored_qemu_writes_it_then_the_next_restore_refuses_the_image() {
    as_kilnd();
    let dir = scratch();
    let vmm = &host().0.vmm;
    let snap = busybox_snapshot(dir.path()).await;
    let first = vmm
        .restore(&snap, RestoreTarget::new(dir.path().join("one")))
        .await
        .expect("first restore");
    let second = vmm
        .restore(&snap, RestoreTarget::new(dir.path().join("two")))
        .await
        .expect("a second restore of an untouched image");
    second.terminate().await.expect("terminate");

    // The attacker owns the first VM's QEMU: its uid and groups, the files in its root.
    let pid = first.pid();
    let seen_by_qemu = format!("/proc/{pid}/root{}", snap.memory_path().display());
    // `1<>` opens the file read-write without truncating it, as QEMU does.
    let mut poison = as_qemu_of(pid, "printf poison 1<>\"$0\"", &seen_by_qemu);
    let written = poison.status().expect("sh");
    first.terminate().await.expect("terminate");
    let third = vmm
        .restore(&snap, RestoreTarget::new(dir.path().join("three")))
        .await;

    // The write goes through (QEMU 7.2 needs the file read-write), and it is caught.
    assert!(
        written.success(),
        "the attacker's write failed: the gap is closed?"
    );
    let error = match third {
        Ok(vm) => {
            let _ = vm.terminate().await;
            panic!("an image whose memory a VM wrote was restored")
        }
        Err(e) => e.to_string(),
    };
    assert!(error.contains("changed after it was sealed"), "{error}");
}

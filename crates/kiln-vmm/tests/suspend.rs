//! Suspend a VM restored from an image to disk and resume it, three times: its processes,
//! disk, tmpfs and clock come back, its QEMU is gone while suspended, and nothing is left
//! behind. A suspend onto a full file system fails and leaves the VM running.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{busybox_snapshot, host, process_exists, scratch, sh, COUNTER};
use kiln_vmm::qemu::QemuVm;
use kiln_vmm::{
    free_port, MicroVm, PortForward, RestoreTarget, SuspendError, SuspendedVm, VmStatus,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long each round stays suspended: one long pause shows the clock is set on resume.
const PAUSES: [Duration; 3] = [
    Duration::from_millis(200),
    Duration::from_secs(10),
    Duration::from_millis(200),
];

fn target(dir: PathBuf) -> (RestoreTarget, u16) {
    let port = free_port().expect("free port");
    let mut t = RestoreTarget::new(dir);
    t.forwards.push(PortForward {
        host_port: port,
        guest_port: 8080,
    });
    t.agent_timeout = Duration::from_secs(90);
    (t, port)
}

/// A VM restored from a fresh busybox snapshot in `dir`, with a forward to guest port 8080.
async fn restored_vm(dir: &Path) -> QemuVm {
    let vmm = &host().0.vmm;
    let snap = busybox_snapshot(dir).await;
    vmm.restore(&snap, target(dir.join("run0")).0)
        .await
        .expect("restore")
}

/// GET `path` through the VM's forward on `port`; retries until the guest answers.
async fn http_get(vm: &impl MicroVm, port: u16, path: &str) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let attempt = async {
            let mut s = vm.connect_forward(port).await?;
            let req = format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n");
            s.write_all(req.as_bytes()).await?;
            let mut body = String::new();
            s.read_to_string(&mut body).await?;
            Ok::<_, std::io::Error>(body)
        };
        match tokio::time::timeout(Duration::from_secs(10), attempt).await {
            Ok(Ok(text)) if text.starts_with("HTTP/1") => return text,
            _ if tokio::time::Instant::now() > deadline => return String::new(),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64()
}

/// What one suspend/resume round saw.
#[derive(Debug)]
struct Round {
    counter_before: u64,
    counter_after: u64,
    kept: String,
    served: String,
    qemu_gone_while_suspended: bool,
    suspended_dir_left: bool,
    clock_ok: bool,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspend_when_resumed_three_times_then_processes_disk_tmpfs_and_clock_survive() {
    let dir = scratch();
    let vmm = &host().0.vmm;
    let mut vm = restored_vm(dir.path()).await;
    sh(vm.agent(), COUNTER).await;
    sh(
        vm.agent(),
        "echo on-disk > /root/kept; echo in-tmpfs > /dev/shm/kept; httpd -p 8080 -h /dev/shm",
    )
    .await;
    let mut rounds = Vec::new();
    let mut runtime_dirs = vec![vm.spec().dir.clone()];

    for (round, pause) in PAUSES.into_iter().enumerate() {
        let (before, _) = sh(vm.agent(), "sleep 0.3; cat /tmp/n").await;
        let pid = vm.pid();
        let sus_dir = dir.path().join(format!("suspended{round}"));
        let suspended = vm.suspend(&sus_dir).await.expect("suspend");
        tokio::time::sleep(pause).await;
        let qemu_gone = !process_exists(pid);
        let reopened = SuspendedVm::open(suspended.dir(), &vmm.qemu().version).expect("reopen");
        let (t, port) = target(dir.path().join(format!("run{}", round + 1)));
        let host_before = now_secs();
        vm = vmm.resume(&reopened, t).await.expect("resume");
        let (guest_clock, _) = sh(vm.agent(), "date +%s").await;
        let host_after = now_secs();
        let guest_clock: f64 = guest_clock.trim().parse().expect("guest date");
        let (after, _) = sh(vm.agent(), "sleep 0.5; cat /tmp/n").await;
        let (kept, _) = sh(vm.agent(), "cat /root/kept /dev/shm/kept").await;
        let served = http_get(&vm, port, "/kept").await;
        runtime_dirs.push(vm.spec().dir.clone());
        rounds.push(Round {
            counter_before: before.trim().parse().expect("counter before"),
            counter_after: after.trim().parse().expect("counter after"),
            kept,
            served,
            qemu_gone_while_suspended: qemu_gone,
            suspended_dir_left: sus_dir.exists(),
            clock_ok: guest_clock >= host_before - 2.0 && guest_clock <= host_after + 2.0,
        });
    }
    let last_pid = vm.pid();
    vm.terminate().await.expect("terminate");

    for r in &rounds {
        assert!(r.counter_after > r.counter_before, "{r:?}");
        assert_eq!(r.kept, "on-disk\nin-tmpfs\n", "{r:?}");
        assert!(r.served.ends_with("in-tmpfs\n"), "{r:?}");
        assert!(r.qemu_gone_while_suspended, "{r:?}");
        assert!(!r.suspended_dir_left, "{r:?}");
        assert!(r.clock_ok, "{r:?}");
    }
    assert!(!process_exists(last_pid));
    assert!(runtime_dirs.iter().all(|d| !d.exists()), "{runtime_dirs:?}");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .expect("scratch")
        .filter_map(|e| e.ok().map(|e| e.file_name()))
        .filter(|n| n.to_string_lossy().starts_with("suspended"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// A small tmpfs mounted for one test, unmounted when dropped.
struct SmallTmpfs(PathBuf);

impl SmallTmpfs {
    fn mount(at: PathBuf) -> SmallTmpfs {
        std::fs::create_dir_all(&at).expect("mount point");
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
            .arg(&at)
            .status()
            .expect("run mount");
        assert!(status.success(), "mount a 1 MiB tmpfs (needs root)");
        SmallTmpfs(at)
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspend_when_filesystem_is_full_then_clear_error_and_vm_keeps_running() {
    let dir = scratch();
    let full = SmallTmpfs::mount(dir.path().join("full"));
    let vm = restored_vm(dir.path()).await;
    sh(vm.agent(), COUNTER).await;
    let (before, _) = sh(vm.agent(), "sleep 0.3; cat /tmp/n").await;

    let SuspendError { error, vm } = vm
        .suspend(&full.0.join("suspended"))
        .await
        .expect_err("a 1 MiB file system cannot hold the VM");
    let mut vm = vm.expect("the VM survives a failed suspend");
    let status = vm.status().await;
    let (after, _) = sh(vm.agent(), "sleep 0.5; cat /tmp/n").await;
    let left_in_full: Vec<_> = std::fs::read_dir(&full.0)
        .expect("read the full fs")
        .filter_map(|e| e.ok().map(|e| e.file_name()))
        .collect();
    vm.terminate().await.expect("terminate");

    let message = error.to_string();
    assert!(message.contains("is full"), "{message}");
    assert!(message.contains("suspending into"), "{message}");
    assert_eq!(status, VmStatus::Running);
    assert!(
        after.trim().parse::<u64>().expect("counter after") > before.trim().parse().expect("n"),
        "{before} → {after}"
    );
    assert!(left_in_full.is_empty(), "{left_in_full:?}");
}

//! Snapshot a running VM and restore it twice at once: both clones continue from the
//! snapshot's state, then diverge; the snapshot stays untouched.

mod common;

use std::time::{SystemTime, UNIX_EPOCH};

use common::{busybox_snapshot, busybox_spec, host, process_exists, scratch, sh, COUNTER};
use kiln_vmm::snapshot::{digest_file, Snapshot};
use kiln_vmm::{BootOptions, RestoreTarget, VmmError};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_when_restored_twice_then_clones_continue_diverge_and_snapshot_is_untouched() {
    let dir = scratch();
    let vmm = &host().0.vmm;
    let vm = vmm
        .boot(busybox_spec(dir.path(), true), BootOptions::default())
        .await
        .expect("boot");
    sh(vm.agent(), COUNTER).await;
    sh(vm.agent(), "sleep 1; echo persisted > /root/on-disk").await;
    let (at_snapshot, _) = sh(vm.agent(), "cat /tmp/n").await;
    let snap = vm
        .snapshot(&dir.path().join("snap"))
        .await
        .expect("snapshot");
    let mem_before = digest_file(&snap.memory_path()).expect("hash memory");

    let (a, b) = tokio::join!(
        vmm.restore(&snap, RestoreTarget::new(dir.path().join("a"))),
        vmm.restore(&snap, RestoreTarget::new(dir.path().join("b")))
    );
    let (a, b) = (a.expect("restore a"), b.expect("restore b"));
    sh(
        a.agent(),
        "echo alpha > /tmp/who; echo alpha-disk > /root/who",
    )
    .await;
    sh(
        b.agent(),
        "echo beta > /tmp/who; echo beta-disk > /root/who",
    )
    .await;
    let (n_a, _) = sh(a.agent(), "sleep 0.5; cat /tmp/n").await;
    let (n_b, _) = sh(b.agent(), "sleep 0.5; cat /tmp/n").await;
    let (who_a, _) = sh(a.agent(), "cat /tmp/who /root/who /root/on-disk").await;
    let (who_b, _) = sh(b.agent(), "cat /tmp/who /root/who /root/on-disk").await;
    let rng_a = sh(a.agent(), "head -c 16 /dev/urandom | od -An -tx1")
        .await
        .0;
    let rng_b = sh(b.agent(), "head -c 16 /dev/urandom | od -An -tx1")
        .await
        .0;
    let clock_a: f64 = sh(a.agent(), "date +%s")
        .await
        .0
        .trim()
        .parse()
        .expect("guest date");
    let host_now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    let pids = [a.pid(), b.pid()];
    a.terminate().await.expect("terminate a");
    b.terminate().await.expect("terminate b");
    let mem_after = digest_file(&snap.memory_path()).expect("hash memory again");

    let snapshot_n: u64 = at_snapshot.trim().parse().expect("counter at snapshot");
    assert!(
        n_a.trim().parse::<u64>().expect("counter a") > snapshot_n,
        "{n_a} vs {snapshot_n}"
    );
    assert!(
        n_b.trim().parse::<u64>().expect("counter b") > snapshot_n,
        "{n_b} vs {snapshot_n}"
    );
    assert_eq!(who_a, "alpha\nalpha-disk\npersisted\n");
    assert_eq!(who_b, "beta\nbeta-disk\npersisted\n");
    assert_ne!(rng_a, rng_b);
    assert!(
        (clock_a - host_now).abs() <= 1.5,
        "guest clock {clock_a} vs host {host_now}"
    );
    assert_eq!(mem_before, mem_after);
    assert!(pids.iter().all(|p| !process_exists(*p)));
    assert!(!dir.path().join("a").exists() && !dir.path().join("b").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_when_snapshot_is_incomplete_or_foreign_then_clear_error_and_nothing_left() {
    let dir = scratch();
    let vmm = &host().0.vmm;
    let qemu = &vmm.qemu().version;
    let snap = busybox_snapshot(dir.path()).await;
    let copy = |name: &str| {
        let to = dir.path().join(name);
        let status = std::process::Command::new("cp")
            .arg("-a")
            .arg(&snap.dir)
            .arg(&to)
            .status();
        assert!(status.expect("cp").success());
        to
    };
    let incomplete = copy("incomplete");
    std::fs::remove_file(incomplete.join("state.bin")).expect("remove state");
    let foreign = copy("foreign");
    let manifest = foreign.join("manifest.json");
    let text = std::fs::read_to_string(&manifest).expect("manifest");
    std::fs::set_permissions(
        &manifest,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .expect("chmod");
    std::fs::write(&manifest, text.replace(qemu.as_str(), "1.0.0")).expect("rewrite manifest");

    let other_kernel = copy("other-kernel");
    let manifest = other_kernel.join("manifest.json");
    let text = std::fs::read_to_string(&manifest).expect("manifest");
    std::fs::set_permissions(
        &manifest,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .expect("chmod");
    let mut value: serde_json::Value = serde_json::from_str(&text).expect("manifest json");
    value["kernel"]["blake3"] = "0".repeat(64).into();
    std::fs::write(&manifest, value.to_string()).expect("rewrite manifest");

    let kernel_changed = Snapshot::open(&other_kernel, qemu).expect_err("another kernel");
    let missing_state = Snapshot::open(&incomplete, qemu).expect_err("incomplete snapshot");
    let other_qemu = Snapshot::open(&foreign, qemu).expect_err("foreign snapshot");
    let whole = Snapshot::open(&snap.dir, qemu).expect("the original still opens");
    let clone = vmm
        .restore(&whole, RestoreTarget::new(dir.path().join("c")))
        .await
        .expect("restore");
    let (alive, _) = sh(clone.agent(), "echo alive").await;
    clone.terminate().await.expect("terminate");

    assert!(matches!(&missing_state, VmmError::BadSnapshot { .. }));
    assert!(
        missing_state.to_string().contains("state.bin"),
        "{missing_state}"
    );
    assert!(
        other_qemu.to_string().contains("QEMU 1.0.0"),
        "{other_qemu}"
    );
    assert!(
        kernel_changed.to_string().contains("kernel"),
        "{kernel_changed}"
    );
    assert_eq!(alive.trim(), "alive");
}

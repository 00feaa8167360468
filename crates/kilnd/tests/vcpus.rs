//! Sizing end to end. vCPU growth on one image (busybox, 512 MiB: a baseline of 1 vCPU, 4
//! present) and two MicroVMs, with a host budget of 2 vCPUs (`--max-vcpus 2`), so both
//! baselines fill it:
//!
//! - the attack: root in one guest onlines every vCPU itself and burns them all; the budget
//!   is full, so the sizer refuses to grow it, and the host's cgroup quota stays at the grant
//!   of one vCPU (the kernel throttles it): onlining in the guest buys no host CPU. It then
//!   takes nearly all its memory; the memory budget (`--max-memory-mib 1024`, both baselines)
//!   is full as well, so it gets nothing plugged and its cgroup limit stays at its baseline;
//! - growth: once that MicroVM is gone, the other one, busy, grows beyond its baseline (the
//!   guest has more online, its cgroup quota rises, usage and `/metrics` show the grant), and
//!   shrinks back to its baseline once idle, its vCPU-seconds counting what it was granted.
//!
//! And memory growth: `kilnd --machine q35` builds an image whose MicroVMs run on q35 with a
//! virtio-mem device up to four times their baseline. A guest filling a tmpfs beyond its whole
//! baseline gets memory plugged as it goes (its kernel sees it, its cgroup limit, admission and
//! usage follow the grant), keeps it and the data across suspend and resume, and gives it back
//! a step at a time once freed, down to its baseline.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{Daemon, Key};
use serde_json::{json, Value};

const APP: &str = "#!/bin/sh
mkdir -p /www
echo hi > /www/index.html
exec httpd -f -p 8080 -h /www
";

/// Busy loops, each its own process, in the exec's process group (killed with it).
/// Takes nearly all the guest's memory (tmpfs files until under 64 MiB is available), as
/// root in it; prints what is left available, KiB.
const SQUEEZE: &str = "mkdir -p /fill && mount -t tmpfs -o size=1g tmpfs /fill && i=0; \
     while [ $(awk '/MemAvailable/ {print $2}' /proc/meminfo) -ge 65536 ]; do \
       dd if=/dev/zero of=/fill/$i bs=1M count=16 2>/dev/null || break; i=$((i+1)); \
     done; awk '/MemAvailable/ {print $2}' /proc/meminfo";

fn burn(loops: u32) -> String {
    format!("for i in $(seq {loops}); do (while :; do :; done) & done; wait")
}

fn call(kilnd: &Daemon, key: &Key, method: &str, path: &str, body: &Value) -> Value {
    let bytes = if body.is_null() {
        Vec::new()
    } else {
        body.to_string().into_bytes()
    };
    let (status, _, text) = kilnd.request(key, method, path, &bytes);
    assert!(
        (200..300).contains(&status),
        "{method} {path}: {status} {text}"
    );
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

/// Runs `script` in the guest as root and returns its stdout.
fn sh(kilnd: &Daemon, key: &Key, vm: &str, script: &str) -> String {
    let (status, _, text) = kilnd.request(
        key,
        "POST",
        &format!("/kiln/v1/microvms/{vm}/exec"),
        json!({"argv": ["sh", "-c", script]}).to_string().as_bytes(),
    );
    assert_eq!(status, 200, "exec {script}: {text}");
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let event: Value = serde_json::from_str(line).expect("event JSON");
        if event["type"] == "stdout" {
            use base64::Engine as _;
            out.extend(
                base64::engine::general_purpose::STANDARD
                    .decode(event["data"].as_str().unwrap_or_default())
                    .expect("base64"),
            );
        }
    }
    String::from_utf8_lossy(&out).trim().to_string()
}

/// Starts `script` in the background; its exec id.
fn background(kilnd: &Daemon, key: &Key, vm: &str, script: &str) -> String {
    let started = call(
        kilnd,
        key,
        "POST",
        &format!("/kiln/v1/microvms/{vm}/exec"),
        &json!({"argv": ["sh", "-c", script], "background": true}),
    );
    started["execId"].as_str().expect("execId").to_string()
}

fn run_microvm(kilnd: &Daemon) -> String {
    let (code, out, err) = kilnd.aws(&[
        "run-microvm",
        "--image-identifier",
        "grow",
        "--ingress-network-connectors",
        "SHELL_INGRESS",
        "HTTP_INGRESS",
    ]);
    assert_eq!(code, 0, "run-microvm: {err}");
    assert_eq!(out["state"], "RUNNING", "{out}");
    out["microvmId"].as_str().expect("id").to_string()
}

/// `vm`'s line of `/kiln/v1/usage`.
fn usage(kilnd: &Daemon, key: &Key, vm: &str) -> Value {
    let all = call(kilnd, key, "GET", "/kiln/v1/usage", &Value::Null);
    all["microvms"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["microvmId"] == vm)
        .cloned()
        .unwrap_or(Value::Null)
}

/// A `/metrics` sample's value (0 when absent).
fn metric(kilnd: &Daemon, name: &str) -> f64 {
    kilnd
        .get("/metrics")
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Whether kilnd refused a guest memory within `limit` (the budget or a quota was full).
fn memory_refused_within(kilnd: &Daemon, limit: Duration) -> bool {
    eventually(limit, || {
        metric(
            kilnd,
            "kiln_microvm_memory_changes_total{change=\"refused\"}",
        ) >= 1.0
    })
}

/// Polls `check` every second until it holds; false if it never did within `limit`.
fn eventually(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    check()
}

/// The runtime directory of MicroVM `vm` (its cgroup is named after it).
fn vm_dir(kilnd: &Daemon, vm: &str) -> PathBuf {
    kilnd.home.path().join("microvms").join(vm).join("vm")
}

/// How many periods the kernel has throttled the VM's cgroup for its CPU quota.
fn throttled(dir: &std::path::Path) -> u64 {
    kiln_vmm::cgroup::dirs_for(dir)
        .iter()
        .filter_map(|g| std::fs::read_to_string(g.join("cpu.stat")).ok())
        .find_map(|stat| {
            stat.lines()
                .find_map(|l| l.strip_prefix("nr_throttled ")?.trim().parse().ok())
        })
        .unwrap_or(0)
}

#[test]
fn vcpus_when_busy_then_grow_within_the_budget_and_shrink_back_and_the_guest_cannot_take_more() {
    let kilnd = Daemon::start(&["--max-vcpus", "2", "--max-memory-mib", "1024"]);
    let scratch = tempfile::tempdir().expect("scratch");
    kilnd.build_sh_app("grow", scratch.path(), APP);
    let admin = kilnd.admin_key();
    let grower = run_microvm(&kilnd);
    let attacker = run_microvm(&kilnd);
    let (at_launch, present) = (
        sh(
            &kilnd,
            &admin,
            &grower,
            "cat /sys/devices/system/cpu/online",
        ),
        sh(
            &kilnd,
            &admin,
            &grower,
            "cat /sys/devices/system/cpu/present",
        ),
    );
    let admitted_at_launch = metric(&kilnd, "kiln_admitted_vcpus");

    // The attack, with the budget full: root onlines every vCPU and burns them all.
    let attacker_dir = vm_dir(&kilnd, &attacker);
    let onlined = sh(
        &kilnd,
        &admin,
        &attacker,
        "for c in 1 2 3; do echo 1 > /sys/devices/system/cpu/cpu$c/online; done; \
         cat /sys/devices/system/cpu/online",
    );
    background(&kilnd, &admin, &attacker, &burn(4));
    let refused = eventually(Duration::from_secs(120), || {
        metric(
            &kilnd,
            "kiln_microvm_vcpu_changes_total{change=\"refused\"}",
        ) >= 1.0
    });
    let throttled_before = throttled(&attacker_dir);
    std::thread::sleep(Duration::from_secs(3));
    let throttled_after = throttled(&attacker_dir);
    let attacker_quota = kiln_vmm::cgroup::cpu_quota_us(&attacker_dir);
    let attacker_granted = usage(&kilnd, &admin, &attacker)["vcpus"].clone();
    // And memory: the guest takes nearly all it has; the memory budget (both baselines) is
    // full too, so it gets none beyond its baseline, and its host limit stays there.
    let squeezed = sh(&kilnd, &admin, &attacker, SQUEEZE);
    let memory_refused = memory_refused_within(&kilnd, Duration::from_secs(60));
    let attacker_memory = usage(&kilnd, &admin, &attacker)["grantedMemoryMiB"].clone();
    let attacker_limit = kiln_vmm::cgroup::memory_limit(&attacker_dir);
    let admitted_memory = metric(&kilnd, "kiln_admitted_memory_mib");
    let (code, _, err) = kilnd.aws(&["terminate-microvm", "--microvm-identifier", &attacker]);
    assert_eq!(code, 0, "{err}");

    // Growth, once the budget has room: the busy MicroVM gets a second vCPU.
    let grower_dir = vm_dir(&kilnd, &grower);
    let burner = background(&kilnd, &admin, &grower, &burn(2));
    let grew = eventually(Duration::from_secs(120), || {
        usage(&kilnd, &admin, &grower)["vcpus"] == 2
    });
    let grown_online = sh(
        &kilnd,
        &admin,
        &grower,
        "cat /sys/devices/system/cpu/online",
    );
    let grown_nproc = sh(&kilnd, &admin, &grower, "nproc");
    let grown_quota = kiln_vmm::cgroup::cpu_quota_us(&grower_dir);
    let admitted_grown = metric(&kilnd, "kiln_admitted_vcpus");
    let grows = metric(&kilnd, "kiln_microvm_vcpu_changes_total{change=\"grow\"}");
    call(
        &kilnd,
        &admin,
        "POST",
        &format!("/kiln/v1/microvms/{grower}/execs/{burner}/kill"),
        &json!({}),
    );
    let shrank = eventually(Duration::from_secs(120), || {
        usage(&kilnd, &admin, &grower)["vcpus"] == 1
    });
    let shrunk_online = sh(
        &kilnd,
        &admin,
        &grower,
        "cat /sys/devices/system/cpu/online",
    );
    let shrunk_quota = kiln_vmm::cgroup::cpu_quota_us(&grower_dir);
    let account = usage(&kilnd, &admin, &grower);
    let (code, _, err) = kilnd.aws(&["terminate-microvm", "--microvm-identifier", &grower]);
    assert_eq!(code, 0, "{err}");
    let admitted_after = metric(&kilnd, "kiln_admitted_vcpus");
    let (_, usage_table, _) = kilnd.kiln(&["usage"]);

    let one = kiln_vmm::cgroup::cpu_quota_for(1);
    assert_eq!((at_launch.as_str(), present.as_str()), ("0", "0-3"));
    assert_eq!(admitted_at_launch, 2.0);
    assert_eq!(onlined, "0-3", "root in the guest onlines every vCPU");
    assert!(
        refused,
        "the busy guest asked for more and the full budget refused"
    );
    assert_eq!(
        attacker_quota,
        Some(one),
        "the host grant stays at one vCPU"
    );
    assert!(
        throttled_after > throttled_before,
        "the kernel holds the guest to its quota ({throttled_before} → {throttled_after})"
    );
    assert_eq!(attacker_granted, 1);
    assert!(
        memory_refused,
        "the guest short of memory asked for more and the full budget refused (MemAvailable {squeezed} KiB)"
    );
    assert_eq!(attacker_memory, 512);
    assert_eq!(
        attacker_limit,
        Some((512 + kiln_vmm::cgroup::MEMORY_OVERHEAD_MIB) << 20),
        "the host limit stays at the baseline"
    );
    assert_eq!(admitted_memory, 1024.0);
    assert!(
        grew,
        "the busy MicroVM grew: {}",
        usage(&kilnd, &admin, &grower)
    );
    assert_eq!((grown_online.as_str(), grown_nproc.as_str()), ("0-1", "2"));
    assert_eq!(grown_quota, Some(kiln_vmm::cgroup::cpu_quota_for(2)));
    assert_eq!(admitted_grown, 2.0);
    assert!(grows >= 1.0);
    assert!(shrank, "the idle MicroVM shrank: {account}");
    assert_eq!(shrunk_online, "0");
    assert_eq!(shrunk_quota, Some(one));
    let (vcpu_s, resident_s) = (
        account["vcpuSeconds"].as_f64().unwrap_or(0.0),
        account["residentSeconds"].as_f64().unwrap_or(0.0),
    );
    assert!(
        vcpu_s > resident_s,
        "vCPU-seconds count the grant, not the baseline: {account}"
    );
    assert_eq!(account["baselineVcpus"], 1);
    assert_eq!(admitted_after, 0.0, "nothing leaked");
    assert!(usage_table.contains(&grower), "{usage_table}");
}

/// `vm`'s state as `get-microvm` says it.
fn state(kilnd: &Daemon, vm: &str) -> String {
    let (_, got, _) = kilnd.aws(&["get-microvm", "--microvm-identifier", vm]);
    got["state"].as_str().unwrap_or_default().to_string()
}

/// Fills a tmpfs in 16 MiB pieces up to `mib`, each piece once the guest has at least 48 MiB
/// available (waiting up to 30 s for the host to plug more), saying how far it got after each
/// piece; the last line is what it holds.
fn fill(mib: u32) -> String {
    format!(
        "mkdir -p /fill && mount -t tmpfs -o size=3g tmpfs /fill && i=0; \
         while [ $i -lt {} ]; do \
           t=0; \
           while [ $(awk '/MemAvailable/ {{print $2}}' /proc/meminfo) -lt 49152 ] && [ $t -lt 30 ]; do sleep 1; t=$((t+1)); done; \
           dd if=/dev/zero of=/fill/$i bs=1M count=16 2>/dev/null || break; \
           i=$((i+1)); echo $i; \
         done; du -sm /fill | cut -f1",
        mib / 16
    )
}

/// The guest kernel's MemTotal, KiB.
fn mem_total_kib(kilnd: &Daemon, key: &Key, vm: &str) -> u64 {
    sh(kilnd, key, vm, "awk '/MemTotal/ {print $2}' /proc/meminfo")
        .parse()
        .unwrap_or(0)
}

/// The memory limit of `vm`'s cgroup for `guest_mib` of guest memory.
fn memory_limit_for(guest_mib: u64) -> Option<u64> {
    Some((guest_mib + kiln_vmm::cgroup::MEMORY_OVERHEAD_MIB) << 20)
}

#[test]
fn memory_when_a_q35_guest_fills_beyond_its_baseline_then_it_grows_keeps_it_across_suspend_and_shrinks_back(
) {
    let kilnd = Daemon::start(&["--machine", "q35"]);
    let scratch = tempfile::tempdir().expect("scratch");
    kilnd.build_sh_app("grow", scratch.path(), APP);
    let admin = kilnd.admin_key();
    let vm = run_microvm(&kilnd);
    let dir = vm_dir(&kilnd, &vm);
    // Read as RunMicrovm returns: QEMU starts at the ceiling's limit (a session may come back
    // with memory plugged), and the host holds the VM to its grant before anything reaches it.
    let limit_at_launch = kiln_vmm::cgroup::memory_limit(&dir);
    let spec: Value =
        serde_json::from_slice(&std::fs::read(dir.join("spec.json")).expect("spec.json"))
            .expect("spec JSON");
    let served = kilnd.app_get(&vm, "/");
    let buses = sh(
        &kilnd,
        &admin,
        &vm,
        "ls /sys/bus/pci/devices | wc -l; ls /sys/bus/virtio/drivers",
    );
    let total_at_launch = mem_total_kib(&kilnd, &admin, &vm);
    let admitted_at_launch = metric(&kilnd, "kiln_admitted_memory_mib");

    // The attack: root in the guest reads and writes the device's memory nobody plugged (the
    // top-level `virtioN` region of /proc/iomem), through /dev/mem, to make QEMU back it.
    let poked = sh(
        &kilnd,
        &admin,
        &vm,
        "r=$(grep -E '^[0-9a-f]+-[0-9a-f]+ : virtio[0-9]+$' /proc/iomem | head -1 | cut -d- -f1); \
         echo region=$r; off=$(( 0x$r / 1048576 )); \
         dd if=/dev/mem of=/dev/null bs=1M skip=$off count=64 2>&1 && echo READ-OK || echo read-refused; \
         dd if=/dev/zero of=/dev/mem bs=1M seek=$off count=64 2>&1 && echo WRITE-OK || echo write-refused",
    );
    let admitted_poked = metric(&kilnd, "kiln_admitted_memory_mib");

    // The guest needs more than its whole baseline: the host plugs memory in as it fills.
    let filled = sh(&kilnd, &admin, &vm, &fill(704));
    let total_grown = mem_total_kib(&kilnd, &admin, &vm);
    let granted = usage(&kilnd, &admin, &vm)["grantedMemoryMiB"]
        .as_u64()
        .unwrap_or(0);
    let limit_grown = kiln_vmm::cgroup::memory_limit(&dir);
    let admitted_grown = metric(&kilnd, "kiln_admitted_memory_mib");
    let grows = metric(&kilnd, "kiln_microvm_memory_changes_total{change=\"grow\"}");

    let (code, _, err) = kilnd.aws(&["suspend-microvm", "--microvm-identifier", &vm]);
    assert_eq!(code, 0, "{err}");
    let suspended = eventually(Duration::from_secs(120), || {
        state(&kilnd, &vm) == "SUSPENDED"
    });
    let admitted_suspended = metric(&kilnd, "kiln_admitted_memory_mib");
    let (code, _, err) = kilnd.aws(&["resume-microvm", "--microvm-identifier", &vm]);
    assert_eq!(code, 0, "{err}");
    let resumed = eventually(Duration::from_secs(120), || state(&kilnd, &vm) == "RUNNING");
    let served_again = kilnd.app_get(&vm, "/");
    let kept = sh(&kilnd, &admin, &vm, "du -sm /fill | cut -f1");
    let granted_resumed = usage(&kilnd, &admin, &vm)["grantedMemoryMiB"]
        .as_u64()
        .unwrap_or(0);
    let admitted_resumed = metric(&kilnd, "kiln_admitted_memory_mib");

    // Freed, the memory goes back a step at a time, down to the baseline.
    sh(&kilnd, &admin, &vm, "rm -f /fill/*; umount /fill");
    let shrank = eventually(Duration::from_secs(240), || {
        usage(&kilnd, &admin, &vm)["grantedMemoryMiB"] == 512
            && kiln_vmm::cgroup::memory_limit(&dir) == memory_limit_for(512)
    });
    let total_shrunk = mem_total_kib(&kilnd, &admin, &vm);
    let admitted_shrunk = metric(&kilnd, "kiln_admitted_memory_mib");
    let account = usage(&kilnd, &admin, &vm);
    let (_, usage_table, _) = kilnd.kiln(&["usage"]);
    let (code, _, err) = kilnd.aws(&["terminate-microvm", "--microvm-identifier", &vm]);
    assert_eq!(code, 0, "{err}");
    let admitted_after = metric(&kilnd, "kiln_admitted_memory_mib");

    assert_eq!(spec["machine"], "q35", "{spec}");
    // AWS's vertical room: four times the 512 MiB baseline.
    assert_eq!(spec["max_memory_mib"], 2048, "{spec}");
    assert_eq!(served.trim(), "hi");
    let pci_devices: u32 = buses
        .lines()
        .next()
        .unwrap_or("0")
        .trim()
        .parse()
        .unwrap_or(0);
    assert!(pci_devices > 0, "{buses}");
    assert!(buses.contains("virtio_mem"), "{buses}");
    assert_eq!(
        limit_at_launch,
        memory_limit_for(512),
        "held to its baseline"
    );
    assert_eq!(admitted_at_launch, 512.0);
    assert!(
        !poked.contains("region=\n"),
        "the attack found the device: {poked}"
    );
    assert!(
        poked.contains("read-refused") && poked.contains("write-refused"),
        "unplugged memory is out of the guest's reach: {poked}"
    );
    assert_eq!(admitted_poked, 512.0);
    let filled_mib: u64 = filled
        .lines()
        .last()
        .unwrap_or("0")
        .trim()
        .parse()
        .unwrap_or(0);
    assert!(
        filled_mib >= 704,
        "the guest holds more than its baseline: {filled}"
    );
    assert!(
        total_grown >= total_at_launch + (192 << 10),
        "plugged memory is online in the guest: {total_at_launch} → {total_grown} KiB"
    );
    assert!((640..=2048).contains(&granted), "granted {granted} MiB");
    assert_eq!(
        limit_grown,
        memory_limit_for(granted),
        "the host limit follows the grant"
    );
    assert_eq!(
        admitted_grown, granted as f64,
        "admission counts the growth"
    );
    assert!(grows >= 1.0);
    assert!(suspended && resumed);
    assert_eq!(
        admitted_suspended, 0.0,
        "a suspended session holds no memory"
    );
    assert_eq!(served_again.trim(), "hi");
    assert_eq!(
        kept.trim(),
        filled_mib.to_string(),
        "the filled memory survives"
    );
    assert!(
        granted_resumed >= granted,
        "resumed with its growth: {granted_resumed}"
    );
    assert_eq!(admitted_resumed, granted_resumed as f64);
    assert!(shrank, "the idle MicroVM gave its growth back: {account}");
    assert!(
        total_shrunk.abs_diff(total_at_launch) < 4096,
        "{total_at_launch} → {total_shrunk} KiB"
    );
    assert_eq!(admitted_shrunk, 512.0);
    let (gib_s, resident_s) = (
        account["memoryGiBSeconds"].as_f64().unwrap_or(0.0),
        account["residentSeconds"].as_f64().unwrap_or(0.0),
    );
    assert!(
        gib_s > resident_s * 0.5,
        "GiB-seconds count the growth, not only the baseline: {account}"
    );
    assert!(usage_table.contains(&vm), "{usage_table}");
    assert_eq!(admitted_after, 0.0, "nothing leaked");
}

#[test]
fn memory_when_its_owners_quota_is_used_then_a_guest_short_of_memory_gets_none_beyond_it() {
    // The host has room; the owner's memory quota is the MicroVM's baseline. Growth counts
    // against the quota as a launch would, so root in the guest taking all it has gets
    // nothing more.
    let kilnd = Daemon::start(&["--quota-memory-mib", "512"]);
    let scratch = tempfile::tempdir().expect("scratch");
    kilnd.build_sh_app("grow", scratch.path(), APP);
    let admin = kilnd.admin_key();
    let vm = run_microvm(&kilnd);
    let dir = vm_dir(&kilnd, &vm);

    let squeezed = sh(&kilnd, &admin, &vm, SQUEEZE);
    let refused = memory_refused_within(&kilnd, Duration::from_secs(60));
    let granted = usage(&kilnd, &admin, &vm)["grantedMemoryMiB"].clone();
    let limit = kiln_vmm::cgroup::memory_limit(&dir);
    let admitted = metric(&kilnd, "kiln_admitted_memory_mib");
    let grown = metric(&kilnd, "kiln_microvm_memory_changes_total{change=\"grow\"}");
    let (code, _, err) = kilnd.aws(&["terminate-microvm", "--microvm-identifier", &vm]);
    assert_eq!(code, 0, "{err}");

    assert!(
        refused,
        "the guest short of memory asked for more and its owner's quota refused (MemAvailable {squeezed} KiB)"
    );
    assert_eq!(grown, 0.0);
    assert_eq!(granted, 512);
    assert_eq!(
        limit,
        memory_limit_for(512),
        "the host limit stays at the baseline"
    );
    assert_eq!(admitted, 512.0);
}

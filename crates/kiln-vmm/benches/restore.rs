//! Cold boot versus snapshot restore, measured in the same run on the same host; and where a
//! restore's time goes under TCG: how much of it the busiest QEMU thread (the vCPU's) spends on
//! a CPU, and what the guest's first HTTP request to its own app costs against the next.
//!
//! Reproduce: `make bench` (or `cargo bench -p kiln-vmm --bench restore`);
//! `KILN_BENCH_RUNS=N` sets the number of runs (default 5); `KILN_BENCH_MACHINE=q35` runs
//! the VMs on q35 with a virtio-mem device up to 4× their memory (default microvm).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{busybox_spec, host, scratch, sh};
use kiln_vmm::{BootOptions, MachineKind, RestoreTarget, VmSpec};

/// A busybox VM in `dir` on the machine `KILN_BENCH_MACHINE` names.
fn bench_spec(dir: &std::path::Path, machine: MachineKind) -> VmSpec {
    let mut spec = busybox_spec(dir, true);
    if machine == MachineKind::Q35 {
        spec.machine = MachineKind::Q35;
        spec.max_memory_mib = Some(4 * spec.memory_mib);
    }
    spec
}

fn stats(name: &str, unit: &str, mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let median = v[v.len() / 2];
    let max = v[v.len() - 1];
    println!(
        "{name:<38} median {median:>9.1} {unit:<3} max {max:>9.1} {unit:<3} (n={})",
        v.len()
    );
    median
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// CPU time of the busiest thread of a process so far, ms (`/proc/<pid>/task/*/schedstat`):
/// under TCG, the vCPU's thread once the guest has run.
fn busiest_thread_cpu_ms(pid: u32) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .fold(0.0, f64::max)
        / 1e6
}

/// Wall time of one command in the guest, ms.
async fn timed_sh(agent: &kiln_agent::client::AgentClient, script: &str) -> f64 {
    let t = Instant::now();
    let (out, code) = sh(agent, script).await;
    assert_eq!(code, Some(0), "{script}: {out}");
    ms(t.elapsed())
}

/// Proportional set size of a process in MiB.
fn pss_mib(pid: u32) -> f64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with("Pss:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let runs: usize = std::env::var("KILN_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let machine = match std::env::var("KILN_BENCH_MACHINE").as_deref() {
        Ok("q35") => MachineKind::Q35,
        _ => MachineKind::Microvm,
    };
    let (h, _) = host();
    println!(
        "kiln boot/restore benchmark: machine {}, QEMU {}, accel {}, guest kernel {}, {} runs, busybox base, 256 MiB guests",
        machine.as_str(),
        h.vmm.qemu().version,
        h.accel.accel,
        h.assets.kernel.version,
        runs
    );
    let dir = scratch();
    let (mut cold, mut snap_pause, mut snap_total) = (vec![], vec![], vec![]);
    let mut snapshot = None;
    for i in 0..runs {
        let d = dir.path().join(format!("cold{i}"));
        std::fs::create_dir_all(&d).expect("dir");
        let vm = h
            .vmm
            .boot(bench_spec(&d, machine), BootOptions::default())
            .await
            .expect("boot");
        cold.push(ms(vm.timeline().get("agent").expect("agent step")));
        sh(
            vm.agent(),
            "echo ok > /tmp/index.html; httpd -p 8080 -h /tmp",
        )
        .await;
        let t = Instant::now();
        let snap = vm.snapshot(&d.join("snap")).await.expect("snapshot");
        snap_total.push(ms(t.elapsed()));
        snap_pause.push(snap.manifest.state.size as f64 / 1024.0);
        snapshot.get_or_insert(snap);
    }
    let snap = snapshot.expect("at least one run");
    let (mut qmp, mut running, mut agent, mut ready, mut pss) =
        (vec![], vec![], vec![], vec![], vec![]);
    let (mut guest_wall, mut vcpu_cpu, mut first_get, mut next_get) =
        (vec![], vec![], vec![], vec![]);
    for i in 0..runs {
        let vm = h
            .vmm
            .restore(&snap, RestoreTarget::new(dir.path().join(format!("r{i}"))))
            .await
            .expect("restore");
        let tl = vm.timeline();
        qmp.push(ms(tl.get("qmp").unwrap_or_default()));
        running.push(ms(tl.get("running").unwrap_or_default()));
        agent.push(ms(tl.get("agent").unwrap_or_default()));
        ready.push(ms(tl.get("refreshed").unwrap_or_default()));
        vcpu_cpu.push(busiest_thread_cpu_ms(vm.pid()));
        guest_wall.push(ms(tl
            .get("refreshed")
            .unwrap_or_default()
            .saturating_sub(tl.get("running").unwrap_or_default())));
        let get = "wget -q -O /dev/null http://127.0.0.1:8080/";
        first_get.push(timed_sh(vm.agent(), get).await);
        next_get.push(timed_sh(vm.agent(), get).await);
        tokio::time::sleep(Duration::from_millis(500)).await;
        pss.push(pss_mib(vm.pid()));
        vm.terminate().await.expect("terminate");
    }
    let t = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..5 {
        let snap = snap.clone();
        let target = RestoreTarget::new(dir.path().join(format!("c{i}")));
        set.spawn(async move { host().0.vmm.restore(&snap, target).await });
    }
    let mut vms = Vec::new();
    while let Some(r) = set.join_next().await {
        vms.push(r.expect("task").expect("concurrent restore"));
    }
    let five = ms(t.elapsed());
    let five_pss: f64 = vms.iter().map(|v| pss_mib(v.pid())).sum::<f64>() / 5.0;
    for vm in vms {
        vm.terminate().await.expect("terminate");
    }

    println!();
    let cold_median = stats("cold boot → agent ready", "ms", cold);
    stats("snapshot (sync, pause, save, hash)", "ms", snap_total);
    stats("  device state size", "KiB", snap_pause);
    println!(
        "  memory file {:.0} MiB apparent, {:.0} MiB allocated",
        snap.manifest.memory.size as f64 / 1048576.0,
        snap.manifest.memory.allocated as f64 / 1048576.0
    );
    stats("restore → QMP up", "ms", qmp);
    stats("restore → vCPUs running", "ms", running);
    stats("restore → agent answers", "ms", agent);
    let restore_median = stats("restore → ready (clock+entropy set)", "ms", ready);
    stats("  vCPUs running → ready, wall", "ms", guest_wall);
    stats("  busiest QEMU thread's CPU by ready", "ms", vcpu_cpu);
    stats("guest's first GET to its app (wget)", "ms", first_get);
    stats("  the next one", "ms", next_get);
    stats("Pss per restored VM", "MiB", pss);
    println!("5 concurrent restores → all ready        {five:>9.1} ms, Pss {five_pss:.1} MiB each");
    println!(
        "cold boot / restore                       {:>9.1}×",
        cold_median / restore_median
    );
    println!(
        "\nreproduce: KILN_BENCH_RUNS={runs} KILN_BENCH_MACHINE={} cargo bench -p kiln-vmm --bench restore",
        machine.as_str()
    );
}

//! Density: how many idle MicroVMs one host holds. Launches MicroVMs of a small idle app
//! (busybox httpd, 512 MiB baseline, AWS's smallest size) one after another through kilnd
//! until its admission refuses or `KILN_BENCH_DENSITY_MAX` run, lets them settle, and reports
//! what they cost: the Pss of their QEMU processes (each one's private memory plus its share
//! of the image's pages), their private memory, what the host's MemAvailable lost, and the
//! CPU they burn while idle. The baseline in the same run is the first MicroVM alone.
//!
//! Run: `cargo build --release -p kilnd && cargo bench -p kilnd --bench density`
//! (`KILN_BENCH_DENSITY_MAX=N`, default 100; `KILN_BENCH_OVERCOMMIT=R` starts kilnd with
//! `--memory-overcommit R`, default 4; `KILN_BENCH_KSM=1` starts it with `--ksm` and waits
//! for two full KSM scans before measuring; `KILN_BENCH_MACHINE=microvm` builds the image for
//! microvm, default q35). It shares the test home's guest kernel and
//! busybox base (`target/kiln-test-home`, or `KILN_HOME`).

mod support;

use std::time::{Duration, Instant};

use anyhow::Context;
use hyper::Method;
use serde_json::json;
use support::{build_httpd_image, env_or, qemu_processes, Api, Kilnd};

const IMAGE: &str = "density-bench";
/// How long the MicroVMs idle before their memory and CPU are read.
const SETTLE: Duration = Duration::from_secs(10);
/// The window idle CPU is measured over.
const CPU_WINDOW: Duration = Duration::from_secs(10);

fn main() -> anyhow::Result<()> {
    let max: usize = env_or("KILN_BENCH_DENSITY_MAX", 100);
    let overcommit: f64 = env_or("KILN_BENCH_OVERCOMMIT", 4.0);
    let ksm: u8 = env_or("KILN_BENCH_KSM", 0);
    anyhow::ensure!(max > 0, "KILN_BENCH_DENSITY_MAX must be at least 1");
    let most = (max + 1).to_string();
    let (ratio, quota_memory) = (overcommit.to_string(), (1u64 << 30).to_string());
    let machine = support::machine();
    let mut args = vec![
        "--max-microvms",
        &most,
        "--memory-overcommit",
        &ratio,
        // One principal launches them all: its quotas must not be what stops the count.
        "--quota-microvms",
        &most,
        "--quota-memory-mib",
        &quota_memory,
        "--warm-pool",
        "0",
        "--machine",
        &machine,
    ];
    // kilnd never turns KSM off (it is host-wide); the bench puts back what it found.
    let ksm_before = std::fs::read_to_string("/sys/kernel/mm/ksm/run").unwrap_or_default();
    if ksm == 1 {
        args.push("--ksm");
    }
    let kilnd = Kilnd::start(&args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = runtime.block_on(bench(&kilnd, max, overcommit, ksm == 1));
    drop(runtime);
    if ksm == 1 && ksm_before.trim() == "0" {
        // 2: unmerge every page, then stop.
        let _ = std::fs::write("/sys/kernel/mm/ksm/run", "2");
    }
    if result.is_err() {
        eprintln!("kilnd's log: {}", kilnd.log_tail());
    }
    result
}

/// What the QEMU processes of kilnd's MicroVMs hold, summed.
#[derive(Debug, Default, Clone, Copy)]
struct Memory {
    processes: usize,
    pss_kib: u64,
    private_kib: u64,
    cpu_ticks: u64,
}

/// Reads `/proc` for the QEMU processes whose command line names `home`.
fn qemu_memory(home: &str) -> Memory {
    let mut m = Memory::default();
    for dir in qemu_processes(home) {
        let rollup = std::fs::read_to_string(dir.join("smaps_rollup")).unwrap_or_default();
        let field = |name: &str| {
            rollup
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0)
        };
        m.processes += 1;
        m.pss_kib += field("Pss:");
        m.private_kib += field("Private_Clean:") + field("Private_Dirty:");
        // utime and stime: fields 14 and 15, after the parenthesised command name.
        let stat = std::fs::read_to_string(dir.join("stat")).unwrap_or_default();
        let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
        let fields: Vec<&str> = after.split_whitespace().collect();
        let tick = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0)
        };
        m.cpu_ticks += tick(11) + tick(12);
    }
    m
}

fn mem_available_kib() -> u64 {
    kilnd::config::meminfo_kib("MemAvailable:").unwrap_or(0)
}

/// Memory and idle CPU of what runs now, after letting it settle.
async fn settled(home: &str) -> (Memory, f64, u64) {
    tokio::time::sleep(SETTLE).await;
    let before = qemu_memory(home);
    let t = Instant::now();
    tokio::time::sleep(CPU_WINDOW).await;
    let after = qemu_memory(home);
    let ticks_per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let cpu = after.cpu_ticks.saturating_sub(before.cpu_ticks) as f64
        / ticks_per_second
        / t.elapsed().as_secs_f64();
    (after, cpu, mem_available_kib())
}

/// A KSM counter of `/sys/kernel/mm/ksm`.
fn ksm(name: &str) -> u64 {
    std::fs::read_to_string(format!("/sys/kernel/mm/ksm/{name}"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

async fn bench(kilnd: &Kilnd, max: usize, overcommit: f64, with_ksm: bool) -> anyhow::Result<()> {
    let api = Api::new(&kilnd.url, &kilnd.home.path().join("credentials"))?;
    let home = kilnd.home.path().display().to_string();
    let scratch = tempfile::Builder::new()
        .prefix("kiln-density")
        .tempdir_in("/tmp")?;
    build_httpd_image(&api, scratch.path(), IMAGE).await?;
    println!(
        "kiln density benchmark: idle busybox httpd MicroVMs of 512 MiB, launched one at a time \
         until admission refuses or {max} run (kilnd --memory-overcommit {overcommit})"
    );
    let idle_host = mem_available_kib();

    let mut ids = Vec::new();
    let mut launch_ms = Vec::new();
    let mut alone = None;
    let mut stopped_by = format!("KILN_BENCH_DENSITY_MAX={max}");
    while ids.len() < max {
        let t = Instant::now();
        match api
            .call(
                Method::POST,
                "/2025-09-09/microvms",
                Some(json!({"imageIdentifier": IMAGE})),
            )
            .await
        {
            Ok(out) => {
                launch_ms.push(t.elapsed().as_secs_f64() * 1e3);
                ids.push(
                    out["microvmId"]
                        .as_str()
                        .context("RunMicrovm answered without a microvmId")?
                        .to_string(),
                );
            }
            Err(e) if e.to_string().contains("InsufficientCapacity") => {
                stopped_by = format!("admission: {e:#}");
                break;
            }
            Err(e) => return Err(e.context(format!("launching MicroVM {}", ids.len() + 1))),
        }
        if ids.len() == 1 {
            alone = Some(settled(&home).await);
        }
        if ids.len() % 10 == 0 {
            println!("  {} running", ids.len());
        }
    }
    let (one, one_cpu, one_available) = alone.context("no MicroVM launched")?;
    if with_ksm {
        // Merging needs the scanner to pass over every VM's pages; two full scans see them all.
        let start = ksm("full_scans");
        let deadline = Instant::now() + Duration::from_secs(300);
        while ksm("full_scans") < start + 2 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }
    let (all, all_cpu, all_available) = settled(&home).await;
    for id in &ids {
        let _ = api
            .call(Method::DELETE, &format!("/2025-09-09/microvms/{id}"), None)
            .await;
    }

    let n = ids.len();
    let mib = |kib: u64| kib as f64 / 1024.0;
    let per = |kib: u64, count: usize| mib(kib) / count.max(1) as f64;
    launch_ms.sort_by(f64::total_cmp);
    let median = launch_ms.get(launch_ms.len() / 2).copied().unwrap_or(0.0);
    println!("stopped by: {stopped_by}");
    println!(
        "{:<44} {:>12} {:>12}",
        "",
        "1 MicroVM",
        format!("{n} MicroVMs")
    );
    println!(
        "{:<44} {:>9.1} MiB {:>9.1} MiB",
        "Pss per MicroVM (QEMU processes)",
        per(one.pss_kib, one.processes),
        per(all.pss_kib, all.processes)
    );
    println!(
        "{:<44} {:>9.1} MiB {:>9.1} MiB",
        "private memory per MicroVM",
        per(one.private_kib, one.processes),
        per(all.private_kib, all.processes)
    );
    println!(
        "{:<44} {:>9.1} MiB {:>9.1} MiB",
        "host MemAvailable lost per MicroVM",
        mib(idle_host.saturating_sub(one_available)),
        per(idle_host.saturating_sub(all_available), n)
    );
    println!(
        "{:<44} {:>11.3} {:>12.3}",
        "idle CPU per MicroVM (cores)",
        one_cpu / one.processes.max(1) as f64,
        all_cpu / all.processes.max(1) as f64
    );
    println!("RunMicrovm → returned, median over {n}: {median:.0} ms");
    if with_ksm {
        println!(
            "KSM (kilnd --ksm): {:.1} MiB deduplicated into {:.1} MiB of merged pages",
            ksm("pages_sharing") as f64 * 4.0 / 1024.0,
            ksm("pages_shared") as f64 * 4.0 / 1024.0
        );
    }
    let gib_per_vm = per(all.pss_kib, all.processes) / 1024.0;
    println!(
        "idle MicroVMs per GiB (by Pss)  {:.1}   → on a 24 GiB host, memory for ~{:.0} idle sessions",
        1.0 / gib_per_vm.max(1e-9),
        24.0 / gib_per_vm.max(1e-9)
    );
    println!(
        "\nreproduce: cargo build --release -p kilnd && KILN_BENCH_DENSITY_MAX={max} \
         KILN_BENCH_OVERCOMMIT={overcommit} KILN_BENCH_KSM={} KILN_BENCH_MACHINE={} cargo bench -p kilnd --bench density",
        u8::from(with_ksm),
        support::machine()
    );
    Ok(())
}

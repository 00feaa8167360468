//! Suspend to disk and resume (a suspended VM is a session snapshot: its RAM in a sparse
//! memory file that resume maps lazily), for an idle VM restored from an image and for one
//! that filled 256 MiB of tmpfs, with two idle clones of the same image running alongside.
//!
//! Reproduce: `cargo bench -p kiln-vmm --bench suspend`; `KILN_BENCH_RUNS=N` sets the number
//! of warm suspend/resume cycles per case (default 3); one more cycle resumes with the
//! session's files evicted from the host's page cache.

#[path = "../tests/common/mod.rs"]
mod common;

use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{busybox_spec, host, scratch, sh};
use kiln_agent::client::ExecRequest;
use kiln_vmm::qemu::QemuVm;
use kiln_vmm::{free_port, BootOptions, MicroVm, PortForward, RestoreTarget, Snapshot};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Guest memory for this benchmark: room for a 256 MiB fill plus the guest itself.
const MEMORY_MIB: u64 = 512;

fn stats(name: &str, unit: &str, v: &[f64]) {
    let mut v = v.to_vec();
    if v.is_empty() {
        return;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    println!(
        "  {name:<40} median {:>8.1} {unit:<3} min {:>8.1} max {:>8.1} (n={})",
        v[v.len() / 2],
        v[0],
        v[v.len() - 1],
        v.len()
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1048576.0
}

/// A field of /proc/<pid>/status or smaps_rollup, in MiB.
fn proc_mib(pid: u32, file: &str, key: &str) -> f64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}")).unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

/// Drops a file from the host's page cache (it was fsynced, so nothing is lost).
fn evict(path: &Path) {
    if let Ok(f) = std::fs::File::open(path) {
        let _ = nix::fcntl::posix_fadvise(
            f.as_raw_fd(),
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        );
    }
}

/// Time until the guest's httpd answers through `port`.
async fn first_response(vm: &impl MicroVm, port: u16, since: Instant) -> Duration {
    loop {
        let attempt = async {
            let mut s = vm.connect_forward(port).await?;
            s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n").await?;
            let mut head = [0u8; 12];
            s.read_exact(&mut head).await?;
            Ok::<_, std::io::Error>(head.starts_with(b"HTTP/1.") && head.ends_with(b" 200"))
        };
        if let Ok(Ok(true)) = tokio::time::timeout(Duration::from_secs(5), attempt).await {
            return since.elapsed();
        }
        if since.elapsed() > Duration::from_secs(120) {
            panic!("the resumed guest's httpd never answered");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn target(dir: &Path) -> (RestoreTarget, u16) {
    let port = free_port().expect("free port");
    let mut t = RestoreTarget::new(dir);
    t.forwards.push(PortForward {
        host_port: port,
        guest_port: 8080,
    });
    t.agent_timeout = Duration::from_secs(120);
    (t, port)
}

#[derive(Default)]
struct Figures {
    rss_before: Vec<f64>,
    suspend: Vec<f64>,
    saved: Vec<f64>,
    receiver: Vec<f64>,
    converted: Vec<f64>,
    copied: Vec<f64>,
    flushed: Vec<f64>,
    memory_apparent: Vec<f64>,
    memory_allocated: Vec<f64>,
    resume_agent: Vec<f64>,
    resume_ready: Vec<f64>,
    resume_http: Vec<f64>,
    rss_after: Vec<f64>,
    pss_after: Vec<f64>,
    cold_ready: Vec<f64>,
    cold_http: Vec<f64>,
}

/// Restores `snap`, runs `prepare` in the guest, then suspends and resumes `runs` times with a
/// warm page cache and once with the stream evicted.
async fn measure(snap: &Snapshot, dir: &Path, prepare: &str, runs: usize) -> Figures {
    let vmm = &host().0.vmm;
    let mut vm: QemuVm = vmm
        .restore(snap, target(&dir.join("run")).0)
        .await
        .expect("restore");
    let out = vm
        .agent()
        .run(ExecRequest::new(["sh", "-c", prepare]))
        .await
        .expect("exec through the agent");
    assert_eq!(
        out.code,
        Some(0),
        "preparing the guest failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut f = Figures::default();
    for cycle in 0..=runs {
        let cold = cycle == runs;
        sh(vm.agent(), "sleep 1").await;
        f.rss_before.push(proc_mib(vm.pid(), "status", "VmRSS:"));
        let t = Instant::now();
        let suspended = vm
            .suspend(&dir.join(format!("suspended{cycle}")))
            .await
            .expect("suspend");
        let suspend_time = ms(t.elapsed());
        if cold {
            let snap = &suspended.snapshot;
            evict(&snap.memory_path());
            evict(&snap.state_path());
            for d in &snap.manifest.disks {
                evict(&snap.disk_path(d));
            }
        } else {
            let step = |from: &str, to: &str| {
                let at = |name: &str| suspended.timeline.get(name).unwrap_or_default();
                ms(at(to).saturating_sub(at(from)))
            };
            f.suspend.push(suspend_time);
            f.receiver
                .push(ms(suspended.timeline.get("receiver").unwrap_or_default()));
            f.saved.push(step("synced", "saved"));
            f.converted.push(step("saved", "converted"));
            f.copied.push(step("converted", "copied"));
            f.flushed.push(step("copied", "flushed"));
            let memory = &suspended.snapshot.manifest.memory;
            f.memory_apparent.push(mib(memory.size));
            f.memory_allocated.push(mib(memory.allocated));
        }
        let (t_target, port) = target(&dir.join(format!("run{cycle}")));
        let t = Instant::now();
        vm = vmm.resume(&suspended, t_target).await.expect("resume");
        let ready = ms(t.elapsed());
        let http = ms(first_response(&vm, port, t).await);
        if cold {
            f.cold_ready.push(ready);
            f.cold_http.push(http);
        } else {
            f.resume_agent
                .push(ms(vm.timeline().get("agent").unwrap_or_default()));
            f.resume_ready.push(ready);
            f.resume_http.push(http);
            tokio::time::sleep(Duration::from_millis(500)).await;
            f.rss_after.push(proc_mib(vm.pid(), "status", "VmRSS:"));
            f.pss_after.push(proc_mib(vm.pid(), "smaps_rollup", "Pss:"));
        }
    }
    vm.terminate().await.expect("terminate");
    f
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn report(name: &str, f: &Figures) {
    println!("\n{name}");
    stats("QEMU RSS before suspend", "MiB", &f.rss_before);
    stats(
        "suspend (receiver, sync, save, fsync, quit)",
        "ms",
        &f.suspend,
    );
    stats(
        "  of which receiver started (guest running)",
        "ms",
        &f.receiver,
    );
    stats("  of which migration (stop → received)", "ms", &f.saved);
    stats(
        "  of which device state saved by receiver",
        "ms",
        &f.converted,
    );
    stats("  of which non-zero pages written to disk", "ms", &f.copied);
    stats("  of which fsync of memory, disks, state", "ms", &f.flushed);
    stats("memory file, apparent", "MiB", &f.memory_apparent);
    stats("memory file, on disk", "MiB", &f.memory_allocated);
    stats("resume → agent answers", "ms", &f.resume_agent);
    stats(
        "resume → ready (clock + entropy set)",
        "ms",
        &f.resume_ready,
    );
    stats("resume → first HTTP 200 from the app", "ms", &f.resume_http);
    stats("QEMU RSS after resume", "MiB", &f.rss_after);
    stats("QEMU Pss after resume", "MiB", &f.pss_after);
    stats("cold cache: resume → ready", "ms", &f.cold_ready);
    stats("cold cache: resume → first HTTP 200", "ms", &f.cold_http);
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let runs: usize = std::env::var("KILN_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let (h, _) = host();
    println!(
        "kiln suspend/resume benchmark (session snapshots, lazy resume): QEMU {}, accel {}, guest \
         kernel {}, busybox base, {MEMORY_MIB} MiB guests, {runs} warm cycles + 1 cold per case",
        h.vmm.qemu().version,
        h.accel.accel,
        h.assets.kernel.version,
    );
    let dir = scratch();
    let mut spec = busybox_spec(&dir.path().join("image"), true);
    spec.memory_mib = MEMORY_MIB;
    let vm = h
        .vmm
        .boot(spec, BootOptions::default())
        .await
        .expect("boot");
    sh(
        vm.agent(),
        "echo ok > /tmp/index.html; httpd -p 8080 -h /tmp",
    )
    .await;
    let snap = vm
        .snapshot(&dir.path().join("image/snap"))
        .await
        .expect("snapshot");

    // Two idle clones of the image beside the measured VM: what a resumed session's pages
    // cost next to theirs.
    let mut clones = Vec::new();
    for i in 0..2 {
        let (t, port) = target(&dir.path().join(format!("clone{i}")));
        let clone: QemuVm = h.vmm.restore(&snap, t).await.expect("restore a clone");
        first_response(&clone, port, Instant::now()).await;
        clones.push(clone);
    }
    let idle = measure(&snap, &dir.path().join("idle"), "true", runs).await;
    report("idle VM (restored from the image, httpd serving)", &idle);
    let t = Instant::now();
    let filled = measure(
        &snap,
        &dir.path().join("filled"),
        "mkdir -p /run/fill && mount -t tmpfs -o size=300m tmpfs /run/fill && \
         dd if=/dev/urandom of=/run/fill/x bs=1M count=256 2>/dev/null",
        runs,
    )
    .await;
    report("VM that filled 256 MiB of tmpfs with random data", &filled);
    println!(
        "  (whole case incl. the guest fill: {:.1} s)",
        t.elapsed().as_secs_f64()
    );
    let clone_pss: Vec<f64> = clones
        .iter()
        .map(|c| proc_mib(c.pid(), "smaps_rollup", "Pss:"))
        .collect();
    println!("\nnext to each other");
    stats("QEMU Pss of an idle clone of the image", "MiB", &clone_pss);
    stats("QEMU Pss of a resumed idle session", "MiB", &idle.pss_after);
    stats(
        "QEMU Pss of a resumed filled session",
        "MiB",
        &filled.pss_after,
    );
    println!(
        "  resume → first 200, filled / idle (medians)  {:.2}×",
        median(&filled.resume_http) / median(&idle.resume_http)
    );
    println!(
        "  cold cache: resume → first 200, filled / idle  {:.2}×",
        median(&filled.cold_http) / median(&idle.cold_http)
    );
    for c in clones {
        c.terminate().await.expect("terminate a clone");
    }
    println!("\nreproduce: KILN_BENCH_RUNS={runs} cargo bench -p kiln-vmm --bench suspend");
}

//! Suspend to disk and resume (design 1: guest RAM inside the migration stream), for an idle
//! VM restored from an image and for one that filled 256 MiB of tmpfs.
//!
//! Reproduce: `cargo bench -p kiln-vmm --bench suspend`; `KILN_BENCH_RUNS=N` sets the number
//! of warm suspend/resume cycles per case (default 3); one more cycle resumes with the stream
//! evicted from the host's page cache.

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

fn stats(name: &str, unit: &str, mut v: Vec<f64>) {
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
    stream_apparent: Vec<f64>,
    stream_allocated: Vec<f64>,
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
            evict(&suspended.state_path());
        } else {
            f.suspend.push(suspend_time);
            f.saved.push(ms(suspended
                .timeline
                .get("saved")
                .unwrap_or_default()
                .saturating_sub(
                    suspended.timeline.get("synced").unwrap_or_default(),
                )));
            f.stream_apparent.push(mib(suspended.manifest.state.size));
            f.stream_allocated
                .push(mib(suspended.manifest.state.allocated));
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

fn report(name: &str, f: Figures) {
    println!("\n{name}");
    stats("QEMU RSS before suspend", "MiB", f.rss_before);
    stats("suspend (sync, save, fsync, quit)", "ms", f.suspend);
    stats("  of which migration (stop → completed)", "ms", f.saved);
    stats("stream size, apparent", "MiB", f.stream_apparent);
    stats("stream size, on disk", "MiB", f.stream_allocated);
    stats("resume → agent answers", "ms", f.resume_agent);
    stats("resume → ready (clock + entropy set)", "ms", f.resume_ready);
    stats("resume → first HTTP 200 from the app", "ms", f.resume_http);
    stats("QEMU RSS after resume", "MiB", f.rss_after);
    stats("QEMU Pss after resume", "MiB", f.pss_after);
    stats("cold cache: resume → ready", "ms", f.cold_ready);
    stats("cold cache: resume → first HTTP 200", "ms", f.cold_http);
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let runs: usize = std::env::var("KILN_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let (h, _) = host();
    println!(
        "kiln suspend/resume benchmark (design 1, RAM in the stream): QEMU {}, accel {}, guest \
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

    let idle = measure(&snap, &dir.path().join("idle"), "true", runs).await;
    report("idle VM (restored from the image, httpd serving)", idle);
    let t = Instant::now();
    let filled = measure(
        &snap,
        &dir.path().join("filled"),
        "mkdir -p /run/fill && mount -t tmpfs -o size=300m tmpfs /run/fill && \
         dd if=/dev/urandom of=/run/fill/x bs=1M count=256 2>/dev/null",
        runs,
    )
    .await;
    report("VM that filled 256 MiB of tmpfs with random data", filled);
    println!(
        "  (whole case incl. the guest fill: {:.1} s)",
        t.elapsed().as_secs_f64()
    );
    println!("\nreproduce: KILN_BENCH_RUNS={runs} cargo bench -p kiln-vmm --bench suspend");
}

//! `kiln demo`: the foundation end to end — cold boot, exec, snapshot with a live process,
//! two concurrent restores that continue from the snapshot and diverge.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use kiln_agent::client::{AgentClient, ExecRequest};
use kiln_vmm::host::Host;
use kiln_vmm::{
    BootOptions, DiskFormat, DiskSpec, MemoryFile, NetSpec, PortForward, RestoreTarget,
};
use serde_json::json;

use crate::Output;

/// The guest port the demo's web server listens on.
const APP_PORT: u16 = 8080;

/// Starts a counter that lives only in guest memory (a shell variable, mirrored to tmpfs) and a
/// web server that reports it.
const APP: &str = r#"mkdir -p /www/cgi-bin
printf '#!/bin/sh\nprintf "Content-Type: text/plain\\r\\n\\r\\n"\ncat /tmp/counter\n' > /www/cgi-bin/n
chmod +x /www/cgi-bin/n
(n=0; while :; do n=$((n+1)); echo $n > /tmp/counter; sleep 0.2; done) >/dev/null 2>&1 &
httpd -p 8080 -h /www"#;

pub fn run(home: &Path, output: Output) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(demo(home, output))
}

fn say(output: Output, line: String) {
    if output == Output::Table {
        println!("{line}");
    }
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

async fn demo(home: &Path, output: Output) -> anyhow::Result<ExitCode> {
    let t = Instant::now();
    let host = Host::prepare(home).context("preparing this host (try `kiln doctor`)")?;
    let base =
        kiln_image::base::busybox::ensure(home).context("building the busybox base image")?;
    say(
        output,
        format!(
            "host ready in {}: QEMU {}, accel {} ({}), kernel {}, base {} {}",
            ms(t.elapsed()),
            host.vmm.qemu().version,
            host.accel.accel,
            host.accel.reason,
            host.assets.kernel.version,
            base.name,
            base.version
        ),
    );
    let work = home.join("demo");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;

    // 1. Cold boot a VM whose memory lives in a file, so it can be snapshotted.
    let disk = work.join("disk.qcow2");
    kiln_vmm::qemu::create_overlay(&base.disk, DiskFormat::Raw, &disk)?;
    let mut spec = host.vm_spec(work.join("vm-source"));
    spec.disks.push(DiskSpec {
        path: disk,
        format: DiskFormat::Qcow2,
        read_only: false,
    });
    spec.memory_file = Some(MemoryFile {
        path: work.join("mem.img"),
        shared: true,
    });
    spec.network = Some(NetSpec {
        forwards: vec![],
        restrict_egress: true,
    });
    let vm = host.vmm.boot(spec, BootOptions::default()).await?;
    let cold = vm.timeline().get("agent").unwrap_or_default();
    say(output, format!("1. cold boot to agent-ready: {}", ms(cold)));

    // 2. Run commands through the agent.
    let uname = guest(vm.agent(), &["uname", "-sr"]).await?;
    say(
        output,
        format!("2. exec `uname -sr` in the guest: {}", uname.trim()),
    );
    guest(vm.agent(), &["sh", "-c", APP]).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = guest(vm.agent(), &["cat", "/tmp/counter"]).await?;
    say(
        output,
        format!(
            "   started a counter in guest memory and a web server; counter = {}",
            before.trim()
        ),
    );

    // 3. Snapshot while the counter runs.
    let snap_dir = work.join("snapshot");
    let t = Instant::now();
    let snap = vm.snapshot(&snap_dir).await?;
    let snap_time = t.elapsed();
    let m = &snap.manifest;
    say(
        output,
        format!(
            "3. snapshot in {}: device state {} KiB, memory {} MiB ({} MiB allocated), disk {} KiB",
            ms(snap_time),
            m.state.size / 1024,
            m.memory.size >> 20,
            m.memory.allocated >> 20,
            m.disks.iter().map(|d| d.info.allocated).sum::<u64>() / 1024
        ),
    );

    // 4. Restore two VMs at once; both continue from the snapshot, then diverge.
    let mut targets = Vec::new();
    for name in ["clone-a", "clone-b"] {
        let port = kiln_vmm::free_port()?;
        let mut target = RestoreTarget::new(work.join(name));
        target.forwards.push(PortForward {
            host_port: port,
            guest_port: APP_PORT,
        });
        targets.push((name, port, target));
    }
    let (a, b) = tokio::join!(
        host.vmm.restore(&snap, targets[0].2.clone()),
        host.vmm.restore(&snap, targets[1].2.clone())
    );
    let clones = [
        (targets[0].0, targets[0].1, a?),
        (targets[1].0, targets[1].1, b?),
    ];
    let mut report = Vec::new();
    for (name, port, vm) in &clones {
        let ready = vm.timeline().get("refreshed").unwrap_or_default();
        let counter = guest(vm.agent(), &["cat", "/tmp/counter"]).await?;
        guest(
            vm.agent(),
            &["sh", "-c", &format!("echo {name} > /tmp/whoami")],
        )
        .await?;
        let guest_time: f64 = guest(vm.agent(), &["date", "+%s"])
            .await?
            .trim()
            .parse()
            .unwrap_or(0.0);
        let host_time = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)?
            .as_secs_f64();
        let random = guest(
            vm.agent(),
            &[
                "sh",
                "-c",
                "head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \\n'",
            ],
        )
        .await?;
        let http = http_get(*port, "/cgi-bin/n")
            .await
            .unwrap_or_else(|e| format!("({e})"));
        say(
            output,
            format!(
                "4. {name}: restore to agent-ready {} | counter {} (snapshot had {}) | clock off by {:.0} s (1 s resolution) | urandom {} | http://127.0.0.1:{port}/ says {}",
                ms(ready),
                counter.trim(),
                before.trim(),
                (guest_time - host_time).abs(),
                random.trim(),
                http.trim()
            ),
        );
        report.push(json!({
            "name": name, "restore_to_agent_ms": ready.as_millis(), "counter": counter.trim(),
            "random": random.trim(), "http": http.trim(),
        }));
    }
    let whoami_a = guest(clones[0].2.agent(), &["cat", "/tmp/whoami"]).await?;
    let whoami_b = guest(clones[1].2.agent(), &["cat", "/tmp/whoami"]).await?;
    say(
        output,
        format!(
            "5. each clone kept its own writes: a says '{}', b says '{}'",
            whoami_a.trim(),
            whoami_b.trim()
        ),
    );
    if whoami_a == whoami_b {
        bail!("the two clones share state: both say {whoami_a}");
    }
    for (_, _, vm) in clones {
        vm.terminate().await?;
    }
    say(
        output,
        format!(
            "6. both clones terminated; snapshot kept at {}",
            snap_dir.display()
        ),
    );
    say(
        output,
        format!(
            "   cold boot {} vs restore {} → {:.0}× faster",
            ms(cold),
            ms(Duration::from_millis(
                report[0]["restore_to_agent_ms"].as_u64().unwrap_or(1)
            )),
            cold.as_secs_f64() * 1000.0
                / report[0]["restore_to_agent_ms"]
                    .as_f64()
                    .unwrap_or(1.0)
                    .max(1.0)
        ),
    );
    if output == Output::Json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "cold_boot_ms": cold.as_millis(), "snapshot_ms": snap_time.as_millis(),
                "snapshot": snap_dir, "clones": report,
            }))?
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs a command in the guest and returns its stdout, failing on a non-zero exit.
async fn guest(agent: &AgentClient, argv: &[&str]) -> anyhow::Result<String> {
    let out = agent.run(ExecRequest::new(argv.iter().copied())).await?;
    if out.code != Some(0) {
        bail!(
            "`{}` failed in the guest ({:?}): {}",
            argv.join(" "),
            out.code,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A minimal HTTP/1.0 GET against the host's loopback; returns the body.
async fn http_get(port: u16, path: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
            .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        anyhow::Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    let text = tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .context("HTTP timed out")??;
    Ok(text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or(text))
}

//! Image build time, cold versus cached, and the size of what a build leaves.
//!
//! Reproduce: `cargo bench -p kiln-image --bench build` (the Makefile's `bench` runs it).

use std::path::Path;
use std::time::{Duration, Instant};

use kiln_image::build::{build, BuildLog, BuildSpec, HookSpec};
use kiln_image::context::BuildContext;

const DOCKERFILE: &str = "FROM kiln/busybox
ENV GREETING=hello
WORKDIR /app
COPY www/ ./www/
RUN for i in 1 2 3 4 5 6 7 8; do head -c 1048576 /dev/urandom > /app/blob$i; done
RUN echo built > /app/www/version.txt
COPY app.sh /app/
EXPOSE 8080
CMD [\"/bin/sh\", \"/app/app.sh\"]
";

fn context(dir: &Path, app: &str) -> BuildContext {
    std::fs::create_dir_all(dir.join("www")).expect("context dir");
    std::fs::write(dir.join("Dockerfile"), DOCKERFILE).expect("Dockerfile");
    std::fs::write(dir.join("www/index.html"), "<h1>bench</h1>\n").expect("index");
    std::fs::write(dir.join("app.sh"), app).expect("app");
    BuildContext {
        dir: dir.to_owned(),
        dockerfile: DOCKERFILE.into(),
        files: 3,
        bytes: 64,
    }
}

fn spec(root: &Path, ctx: BuildContext, out: &str) -> BuildSpec {
    BuildSpec {
        context: ctx,
        env: vec![],
        hooks: HookSpec {
            port: 8080,
            ready: None,
            validate: None,
        },
        memory_mib: 256,
        build_memory_mib: 256,
        vcpu_growth: true,
        machine: kiln_vmm::MachineKind::Microvm,
        cache_dir: root.join("cache"),
        work_dir: root.join(format!("work-{out}")),
        output_dir: root.join(out),
        extra_ca: None,
        ready_timeout: Duration::from_secs(120),
        step_timeout: Duration::from_secs(600),
        // The public internet, as kilnd gives builds without a connector.
        egress: Some(kiln_vmm::VmEgress {
            gateway: kiln_net::Gateway::new(kiln_net::GatewayConfig::default()),
            vm: format!("bench-{out}"),
            policy: kiln_net::Egress::Internet { extra: Vec::new() },
        }),
        owner: "bench".into(),
        image: out.into(),
        mount_cache_dir: root.join("mounts"),
        registry: Default::default(),
        secrets: Default::default(),
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let home = std::env::var_os("KILN_HOME")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/kiln-test-home")
        });
    let h = home.clone();
    let host = tokio::task::spawn_blocking(move || kiln_vmm::host::Host::prepare(&h))
        .await
        .expect("join")
        .expect("host (run `make test` once, or `kiln doctor`)")
        .into_dyn();
    let root = tempfile::Builder::new()
        .prefix("kiln-bench")
        .tempdir_in("/tmp")
        .expect("tmp");
    let app_v1 = "echo v1; exec httpd -f -p 8080 -h /app/www\n";
    let app_v2 = "echo v2; exec httpd -f -p 8080 -h /app/www\n";
    println!(
        "kiln build benchmark: {}, accel {}, busybox base, 256 MiB VMs",
        host.vmm.describe(),
        host.accel.accel
    );
    let mut rows = Vec::new();
    for (label, app, out) in [
        ("cold (empty layer cache)", app_v1, "v1"),
        ("cached (nothing changed)", app_v1, "v2"),
        ("last COPY changed", app_v2, "v3"),
    ] {
        let ctx = context(&root.path().join(format!("ctx-{out}")), app);
        let s = spec(root.path(), ctx, out);
        std::fs::create_dir_all(&s.output_dir).expect("out dir");
        let log = BuildLog::create(&s.output_dir.join("build.log")).expect("log");
        let t = Instant::now();
        let built = build(&host, &s, &log).await.expect("build");
        let secs = t.elapsed().as_secs_f64();
        let m = &built.snapshot.manifest;
        rows.push((
            label,
            secs,
            m.memory.allocated,
            m.disks.iter().map(|d| d.info.allocated).sum::<u64>(),
            m.state.size,
        ));
    }
    println!(
        "\n{:<28} {:>9} {:>14} {:>12} {:>12}",
        "build", "time", "memory (disk)", "disk", "device state"
    );
    for (label, secs, mem, disk, state) in &rows {
        println!(
            "{label:<28} {secs:>8.1}s {:>10.1} MiB {:>8.1} MiB {:>8.1} KiB",
            *mem as f64 / 1048576.0,
            *disk as f64 / 1048576.0,
            *state as f64 / 1024.0
        );
    }
    println!("\ncached / cold: {:.2}×", rows[0].1 / rows[1].1);
    println!("reproduce: cargo bench -p kiln-image --bench build");
}

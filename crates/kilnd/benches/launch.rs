//! MicroVM launch through kilnd against a cold boot of the same image, measured in one run:
//! RunMicrovm until it returns and until the app's first 200 through the HTTPS endpoint,
//! one launch at a time and five at once.
//!
//! Run: `cargo build --release -p kilnd && cargo bench -p kilnd --bench launch`
//! (`KILN_BENCH_LAUNCHES=N` sets the sequential launches, default 20;
//! `KILN_BENCH_MACHINE=microvm` builds the image for microvm, as `kilnd --machine microvm`;
//! default q35, kilnd's; `KILN_BENCH_KILND_ARGS` adds kilnd flags). It starts the release `kilnd` on a
//! fresh home that shares the guest kernel and base images of the test home
//! (`target/kiln-test-home`, or `KILN_HOME`), on free ports.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use kiln_agent::client::AppSpec;
use kiln_image::build::ImageConfig;
use kiln_vmm::host::Host;
use kiln_vmm::{BootOptions, DiskFormat, DiskSpec, MicroVm, NetSpec, PortForward, Snapshot};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::json;
use support::{build_httpd_image, env_or, Api, Kilnd};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

const DOMAIN: &str = "kiln.localhost";
const IMAGE: &str = "launch-bench";
/// The same app with a HEALTHCHECK that GETs `/` (as AWS's sample Dockerfiles have): the
/// warm pool runs it once more before pausing a VM.
const CHECKED_IMAGE: &str = "launch-bench-checked";
const COLD_RUNS: usize = 5;
const CONCURRENT: usize = 5;
/// [`support::HTTPD_DOCKERFILE`] with a HEALTHCHECK that GETs the app's `/`.
const CHECKED_DOCKERFILE: &str = "FROM kiln/busybox\nCOPY app.sh /\nEXPOSE 8080\n\
    HEALTHCHECK CMD wget -q -O /dev/null http://127.0.0.1:8080/\n\
    CMD [\"/bin/sh\", \"/app.sh\"]\n";
/// Pause between attempts while waiting for an app's first 200.
const POLL: Duration = Duration::from_millis(10);
/// Longest wait for an app's first 200.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

fn main() -> anyhow::Result<()> {
    let launches: usize = env_or("KILN_BENCH_LAUNCHES", 20);
    ensure!(launches > 0, "KILN_BENCH_LAUNCHES must be at least 1");
    let machine = support::machine();
    let mut kilnd = Kilnd::start(&[
        "--max-microvms",
        &(CONCURRENT + 3).to_string(),
        "--warm-pool",
        "0",
        "--machine",
        &machine,
    ])?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = runtime.block_on(bench(&mut kilnd, launches));
    drop(runtime);
    if result.is_err() {
        eprintln!("kilnd's log: {}", kilnd.log_tail());
    }
    result
}

async fn bench(kilnd: &mut Kilnd, launches: usize) -> anyhow::Result<()> {
    let api = Api::new(&kilnd.url, &kilnd.home.path().join("credentials"))?;
    let endpoint = Endpoint::new(kilnd)?;
    let home = kilnd.home.path().to_owned();
    let host = tokio::task::spawn_blocking({
        let home = home.clone();
        move || Host::prepare(&home)
    })
    .await?
    .context("preparing the host (QEMU, accelerator, guest kernel) on the bench's home")?;
    println!(
        "kiln launch benchmark: QEMU {}, accel {}, machine {}, guest kernel {}, busybox base, app `httpd -f -p 8080`, 512 MiB guests",
        host.vmm.qemu().version,
        host.accel.accel,
        support::machine(),
        host.assets.kernel.version,
    );
    let scratch = tempfile::Builder::new()
        .prefix("kiln-launch")
        .tempdir_in("/tmp")?;

    let t = Instant::now();
    build_httpd_image(&api, scratch.path(), IMAGE).await?;
    let build = t.elapsed();
    std::fs::create_dir_all(scratch.path().join("checked"))?;
    support::build_image(
        &api,
        &scratch.path().join("checked"),
        CHECKED_IMAGE,
        &[
            ("Dockerfile", CHECKED_DOCKERFILE, 0o644),
            ("app.sh", support::HTTPD_APP, 0o755),
        ],
        512,
    )
    .await?;
    let build_log = std::fs::read_to_string(home.join("images").join(IMAGE).join("1/build.log"))
        .unwrap_or_default();
    println!(
        "image built in {:.1} s; now {COLD_RUNS} cold boots, {launches} launches, {CONCURRENT} concurrent",
        build.as_secs_f64()
    );

    let (mut cold, mut cold_agent) = (vec![], vec![]);
    for i in 0..COLD_RUNS {
        let boot = cold_boot(&host, &home, &scratch.path().join(format!("cold{i}"))).await?;
        cold.push(boot.first_ok);
        cold_agent.push(boot.agent);
    }

    let mut seq = Vec::with_capacity(launches);
    for _ in 0..launches {
        let launch = launch(&api, &endpoint, Instant::now()).await?;
        // A second GET on a new connection: what the first one paid beyond it was first use.
        let t = Instant::now();
        let status = endpoint.get(&launch.id, &launch.auth).await;
        let second = t.elapsed();
        let t = Instant::now();
        terminate(&api, &launch.id).await?;
        let terminated = t.elapsed();
        let status = status?;
        ensure!(
            status == StatusCode::OK,
            "MicroVM {}: a second GET answered {status}",
            launch.id
        );
        seq.push(Measured {
            launch,
            second,
            terminated,
        });
    }

    // kilnd's own account of those launches: its "launched" log lines (see `breakdown`).
    let seq_log = std::fs::read_to_string(kilnd.home.path().join("kilnd.log")).unwrap_or_default();

    let start = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..CONCURRENT {
        let (api, endpoint) = (api.clone(), endpoint.clone());
        set.spawn(async move { launch(&api, &endpoint, start).await });
    }
    let mut together = Vec::with_capacity(CONCURRENT);
    let mut failure = None;
    while let Some(joined) = set.join_next().await {
        match joined
            .context("a concurrent launch panicked")
            .and_then(|r| r)
        {
            Ok(l) => together.push(l),
            Err(e) => failure = Some(e),
        }
    }
    for l in &together {
        terminate(&api, &l.id).await?;
    }
    if let Some(e) = failure {
        return Err(e.context("a concurrent launch failed"));
    }

    // The same launches with a warm pool of one: kilnd restarted with `--warm-pool 1
    // --warm-pool-max 1`; one launch tells it the version is in use, then each launch waits
    // until the pool holds a VM again, so every measured launch takes one. Then the same for
    // the image with a HEALTHCHECK (the first version's pool stays full: two VMs pooled).
    kilnd.restart(&[
        "--max-microvms",
        &(CONCURRENT + 3).to_string(),
        "--warm-pool",
        "1",
        "--warm-pool-max",
        "1",
    ])?;
    let api = Api::new(&kilnd.url, &kilnd.home.path().join("credentials"))?;
    let pooled_of = |image: &'static str, pools: f64| {
        let (api, endpoint) = (api.clone(), endpoint.clone());
        async move {
            let first = launch_of(image, &api, &endpoint, Instant::now()).await?;
            terminate(&api, &first.id).await?;
            let mut pooled = Vec::with_capacity(launches);
            for _ in 0..launches {
                wait_for_pool(&api, pools).await?;
                let l = launch_of(image, &api, &endpoint, Instant::now()).await?;
                terminate(&api, &l.id).await?;
                pooled.push(l);
            }
            anyhow::Ok(pooled)
        }
    };
    let pooled = pooled_of(IMAGE, 1.0).await?;
    let checked = pooled_of(CHECKED_IMAGE, 2.0).await?;

    println!();
    println!("cold boot: kiln-vmm boots a fresh VM from the built image's disk (the snapshot's flattened");
    println!(
        "disk under a new overlay), starts the app as the image records it, and polls GET / every"
    );
    println!(
        "{} ms on a host forward (plain HTTP, no proxy), timed from creating the overlay:",
        POLL.as_millis()
    );
    let cold_median = row("cold boot → app's first 200", &cold, Stat::Median);
    row("  of which boot → agent answers", &cold_agent, Stat::Median);
    if let Some(ready) = build_log_ready(&build_log) {
        println!(
            "  cross-check, build.log: app VM booting → ready (TCP probe every 250 ms, 1 run)  {:>7.0} ms",
            ms(ready)
        );
    }
    println!();
    println!(
        "launch: RunMicrovm restores the image's snapshot; then CreateMicrovmAuthToken; then GET /"
    );
    println!(
        "on a new TLS connection to the endpoint with the token (`Host: <id>.{DOMAIN}`), repeated"
    );
    println!(
        "every {} ms until 200. p99 is nearest-rank: with n < 100 it is the max.",
        POLL.as_millis()
    );
    let pick = |f: fn(&Launch) -> Duration| seq.iter().map(|m| f(&m.launch)).collect::<Vec<_>>();
    row("RunMicrovm → returned", &pick(|l| l.returned), Stat::Tail);
    breakdown(&seq_log);
    row("CreateMicrovmAuthToken", &pick(|l| l.token), Stat::Tail);
    row(
        "GET with the token in hand → 200",
        &pick(|l| l.request),
        Stat::Tail,
    );
    row(
        "  next GET, also on a new TLS connection",
        &seq.iter().map(|m| m.second).collect::<Vec<_>>(),
        Stat::Tail,
    );
    let launch_median = row(
        "launch → first 200 (token excluded)",
        &pick(|l| l.returned + l.request),
        Stat::Tail,
    );
    let with_token = row(
        "launch → first 200 (token included)",
        &pick(|l| l.answered),
        Stat::Tail,
    );
    row(
        "TerminateMicrovm (after each launch)",
        &seq.iter().map(|m| m.terminated).collect::<Vec<_>>(),
        Stat::Tail,
    );
    let misses: u32 = seq.iter().map(|m| m.launch.misses).sum();
    println!(
        "  GETs that failed or were not 200 before a first 200: {misses} in {launches} launches"
    );
    let all_returned = together
        .iter()
        .map(|l| l.returned)
        .max()
        .unwrap_or_default();
    let all_answered = together
        .iter()
        .map(|l| l.answered)
        .max()
        .unwrap_or_default();
    let together_misses: u32 = together.iter().map(|l| l.misses).sum();
    println!(
        "{CONCURRENT} launches at once → all RunMicrovm returned {:>7.0} ms, all answered 200 {:>7.0} ms (token included; {together_misses} GETs not 200)",
        ms(all_returned),
        ms(all_answered)
    );
    println!();
    println!(
        "cold boot / launch-to-first-200 (medians)   {:>6.1}× token excluded, {:.1}× included (aim: ≥ 20×)",
        cold_median.as_secs_f64() / launch_median.as_secs_f64(),
        cold_median.as_secs_f64() / with_token.as_secs_f64()
    );
    println!();
    println!("with a warm pool (kilnd --warm-pool 1): RunMicrovm continues a restored, paused VM");
    let pooled_median = pooled_rows(&pooled);
    println!(
        "cold boot / launch-to-first-200 with a warm pool (medians)   {:>6.1}× token excluded (aim: ≥ 50×)",
        cold_median.as_secs_f64() / pooled_median.as_secs_f64(),
    );
    println!();
    println!("with a warm pool, the image with `HEALTHCHECK CMD wget -q -O /dev/null http://127.0.0.1:8080/`");
    println!("(the pool runs it once before pausing a VM):");
    let checked_median = pooled_rows(&checked);
    println!(
        "cold boot / launch-to-first-200 with a warm pool, HEALTHCHECK image (medians)   {:>6.1}× token excluded",
        cold_median.as_secs_f64() / checked_median.as_secs_f64(),
    );
    println!(
        "\nreproduce: cargo build --release -p kilnd && {}KILN_BENCH_LAUNCHES={launches} KILN_BENCH_MACHINE={} cargo bench -p kilnd --bench launch",
        support::kilnd_args_env(),
        support::machine()
    );
    Ok(())
}

/// The rows of launches that took a pooled VM; returns the median launch → first 200.
fn pooled_rows(launches: &[Launch]) -> Duration {
    let pick = |f: fn(&Launch) -> Duration| launches.iter().map(f).collect::<Vec<_>>();
    row("RunMicrovm → returned", &pick(|l| l.returned), Stat::Tail);
    row(
        "GET with the token in hand → 200",
        &pick(|l| l.request),
        Stat::Tail,
    );
    row(
        "launch → first 200 (token excluded)",
        &pick(|l| l.returned + l.request),
        Stat::Tail,
    )
}

/// Where RunMicrovm's time went, by kilnd's "launched" log lines: the restore (and in it the
/// VM's steps, ms from QEMU's start), the run hook, the whole.
fn breakdown(log: &str) {
    let mut fields: Vec<(String, Vec<Duration>)> = Vec::new();
    let mut add = |name: &str, value: &str| {
        let Ok(n) = value.trim_end_matches('"').parse::<u64>() else {
            return;
        };
        let d = Duration::from_millis(n);
        match fields.iter_mut().find(|(k, _)| k == name) {
            Some((_, v)) => v.push(d),
            None => fields.push((name.to_string(), vec![d])),
        }
    };
    for line in log.lines().filter(|l| l.contains(" launched")) {
        for word in line.split_whitespace() {
            match word.split_once('=') {
                Some(("vm_steps", steps)) => {
                    for step in steps.split(',') {
                        if let Some((name, at)) = step.split_once(':') {
                            add(&format!("    VM step: {name}"), at);
                        }
                    }
                }
                Some((name @ ("started_ms" | "run_hook_ms" | "total_ms"), value)) => {
                    add(name, value)
                }
                _ => {}
            }
        }
    }
    let label = |name: &str| match name {
        "started_ms" => "  kilnd: VM restored and refreshed".to_string(),
        "run_hook_ms" => "  kilnd: run hook".to_string(),
        "total_ms" => "  kilnd: RunMicrovm's work in all".to_string(),
        other => other.to_string(),
    };
    for (name, values) in &fields {
        row(&label(name), values, Stat::Tail);
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Which figures a row shows.
#[derive(Clone, Copy)]
enum Stat {
    /// Median and max (a few runs).
    Median,
    /// p50 and p99.
    Tail,
}

/// The nearest-rank `q` quantile of sorted `v`.
fn quantile(v: &[Duration], q: f64) -> Duration {
    let rank = (q * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// Prints one row; returns the median.
fn row(name: &str, values: &[Duration], stat: Stat) -> Duration {
    let mut v = values.to_vec();
    v.sort_unstable();
    let (p50, hi) = (quantile(&v, 0.5), quantile(&v, 0.99));
    let (a, b) = match stat {
        Stat::Median => ("median", "max"),
        Stat::Tail => ("p50", "p99"),
    };
    println!(
        "{name:<40} {a:>6} {:>7.0} ms  {b} {:>7.0} ms  (n={})",
        ms(p50),
        ms(hi),
        v.len()
    );
    p50
}

/// From a build log, the time from "booting the app VM" to "ready after".
fn build_log_ready(log: &str) -> Option<Duration> {
    let stamp = |needle: &str| {
        let line = log.lines().find(|l| l.contains(needle))?;
        let secs = line.strip_prefix('[')?.split_once("s]")?.0.trim();
        secs.parse::<f64>().ok()
    };
    let (boot, ready) = (stamp("booting the app VM")?, stamp("ready after")?);
    (ready >= boot).then(|| Duration::from_secs_f64(ready - boot))
}

/// The HTTPS endpoint, trusting kilnd's CA.
#[derive(Clone)]
struct Endpoint {
    addr: SocketAddr,
    tls: TlsConnector,
}

impl Endpoint {
    fn new(kilnd: &Kilnd) -> anyhow::Result<Endpoint> {
        let ca = kilnd.home.path().join("tls/ca.pem");
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&ca)
            .with_context(|| format!("reading the endpoint CA {}", ca.display()))?
        {
            roots
                .add(cert.with_context(|| format!("reading the endpoint CA {}", ca.display()))?)?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Endpoint {
            addr: SocketAddr::from(([127, 0, 0, 1], kilnd.endpoint_port)),
            tls: TlsConnector::from(Arc::new(config)),
        })
    }

    /// GET / for `microvm_id` on a new TLS connection; the status.
    async fn get(&self, microvm_id: &str, token: &str) -> anyhow::Result<StatusCode> {
        let host = format!("{microvm_id}.{DOMAIN}");
        let tcp = TcpStream::connect(self.addr).await?;
        tcp.set_nodelay(true)?;
        let tls = self
            .tls
            .connect(ServerName::try_from(host.clone())?, tcp)
            .await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(conn);
        let req = Request::get("/")
            .header("host", &host)
            .header("x-aws-proxy-auth", token)
            .body(Full::new(Bytes::new()))?;
        let response = sender.send_request(req).await?;
        let status = response.status();
        response.into_body().collect().await?;
        Ok(status)
    }
}

/// GET / over plain HTTP through the VM's forward on `port`; the status.
async fn plain_get(vm: &impl MicroVm, port: u16) -> anyhow::Result<StatusCode> {
    let tcp = vm.connect_forward(port).await?;
    tcp.set_nodelay(true)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let req = Request::get("/")
        .header("host", format!("127.0.0.1:{port}"))
        .body(Full::new(Bytes::new()))?;
    let response = sender.send_request(req).await?;
    let status = response.status();
    response.into_body().collect().await?;
    Ok(status)
}

/// Repeats `get` every [`POLL`] until it answers 200; how many attempts did not.
async fn until_ok<F, Fut>(what: &str, mut get: F) -> anyhow::Result<u32>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<StatusCode>>,
{
    let deadline = Instant::now() + ANSWER_TIMEOUT;
    let mut misses = 0;
    loop {
        let last = match tokio::time::timeout(ANSWER_TIMEOUT, get()).await {
            Ok(Ok(StatusCode::OK)) => return Ok(misses),
            Ok(Ok(status)) => format!("status {status}"),
            Ok(Err(e)) => format!("{e:#}"),
            Err(_) => "no answer".to_string(),
        };
        misses += 1;
        ensure!(
            Instant::now() < deadline,
            "{what} did not answer 200 within {} s (last: {last})",
            ANSWER_TIMEOUT.as_secs()
        );
        tokio::time::sleep(POLL).await;
    }
}

/// One cold boot's figures.
struct ColdBoot {
    /// Until the guest agent answered.
    agent: Duration,
    /// Until the app's first 200.
    first_ok: Duration,
}

/// Boots the built image's disk in a fresh VM, starts its app and waits for a 200.
async fn cold_boot(
    host: &Host<kiln_vmm::qemu::QemuVmm>,
    home: &Path,
    dir: &Path,
) -> anyhow::Result<ColdBoot> {
    let version = home.join("images").join(IMAGE).join("1");
    let snap = Snapshot::open(&version.join("snapshot"), &host.vmm.qemu().version)?;
    let disk = snap
        .manifest
        .disks
        .first()
        .context("the image's snapshot has no disk")?;
    let config: ImageConfig = serde_json::from_slice(&std::fs::read(version.join("image.json"))?)
        .context("reading the image's image.json")?;
    std::fs::create_dir_all(dir)?;
    let port = kiln_vmm::free_port()?;
    let overlay = dir.join("disk.qcow2");

    let t = Instant::now();
    kiln_vmm::qemu::create_overlay(&snap.dir.join(&disk.info.file), disk.format, &overlay)?;
    let mut spec = host.vm_spec(dir.join("vm"));
    spec.memory_mib = snap.manifest.memory_mib;
    // The machine the image's MicroVMs run on (`KILN_BENCH_MACHINE`), ceiling included.
    spec.machine = snap.manifest.machine_kind;
    spec.max_memory_mib = snap.manifest.max_memory_mib;
    spec.disks = vec![DiskSpec {
        path: overlay,
        format: DiskFormat::Qcow2,
        read_only: false,
    }];
    spec.network = Some(NetSpec {
        forwards: vec![PortForward {
            host_port: port,
            guest_port: 8080,
        }],
        restrict_egress: false,
    });
    let vm = host
        .vmm
        .boot(spec, BootOptions::default())
        .await
        .context("cold-booting the image's disk")?;
    let agent = t.elapsed();
    let answered = async {
        vm.agent()
            .start_app(AppSpec {
                argv: config.app_argv.clone(),
                env: config.env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
                cwd: Some(config.workdir.clone()),
                uid: Some(config.uid),
                gid: Some(config.gid),
            })
            .await
            .context("starting the app in the cold-booted VM")?;
        until_ok("the cold-booted app", || plain_get(&vm, port)).await
    }
    .await;
    let first_ok = t.elapsed();
    let stopped = vm.terminate().await;
    answered?;
    stopped.context("terminating the cold-booted VM")?;
    Ok(ColdBoot { agent, first_ok })
}

/// One launch's figures; `returned` and `answered` count from the `start` given to
/// [`launch`], `token` and `request` are their own spans.
struct Launch {
    id: String,
    /// The `X-aws-proxy-auth` token.
    auth: String,
    /// RunMicrovm returned.
    returned: Duration,
    /// CreateMicrovmAuthToken took.
    token: Duration,
    /// From sending the first GET (token in hand) until a 200.
    request: Duration,
    /// The first 200 arrived.
    answered: Duration,
    /// GETs that failed or were not 200 before it.
    misses: u32,
}

/// RunMicrovm, a token, then GETs through the endpoint until 200. Terminates the VM itself
/// only when something after RunMicrovm fails.
async fn launch(api: &Api, endpoint: &Endpoint, start: Instant) -> anyhow::Result<Launch> {
    launch_of(IMAGE, api, endpoint, start).await
}

/// [`launch`] of `image`.
async fn launch_of(
    image: &str,
    api: &Api,
    endpoint: &Endpoint,
    start: Instant,
) -> anyhow::Result<Launch> {
    let out = api
        .call(
            Method::POST,
            "/2025-09-09/microvms",
            Some(json!({"imageIdentifier": image})),
        )
        .await?;
    let returned = start.elapsed();
    let id = out["microvmId"]
        .as_str()
        .with_context(|| format!("RunMicrovm answered without a microvmId: {out}"))?
        .to_string();
    let rest = async {
        let t = Instant::now();
        let token = api
            .call(
                Method::POST,
                &format!("/2025-09-09/microvms/{id}/auth-token"),
                Some(json!({"expirationInMinutes": 5, "allowedPorts": [{"port": 8080}]})),
            )
            .await?;
        let token_time = t.elapsed();
        let token = token["authToken"]["X-aws-proxy-auth"]
            .as_str()
            .with_context(|| format!("CreateMicrovmAuthToken answered without a token: {token}"))?
            .to_string();
        let t = Instant::now();
        let misses = until_ok(&format!("MicroVM {id} through the endpoint"), || {
            endpoint.get(&id, &token)
        })
        .await?;
        Ok::<_, anyhow::Error>((token, token_time, t.elapsed(), start.elapsed(), misses))
    };
    match rest.await {
        Ok((auth, token, request, answered, misses)) => Ok(Launch {
            id,
            auth,
            returned,
            token,
            request,
            answered,
            misses,
        }),
        Err(e) => {
            let _ = terminate(api, &id).await;
            Err(e)
        }
    }
}

/// A sequential launch with what was measured after it.
struct Measured {
    launch: Launch,
    /// A second GET, on another new TLS connection, took.
    second: Duration,
    /// TerminateMicrovm took.
    terminated: Duration,
}

/// Waits until kilnd's warm pools hold `want` VMs in all (`kiln_warm_pool_microvms` in
/// `/metrics`).
async fn wait_for_pool(api: &Api, want: f64) -> anyhow::Result<()> {
    let deadline = Instant::now() + ANSWER_TIMEOUT;
    loop {
        let metrics = api.text("/metrics").await?;
        let pooled = metrics
            .lines()
            .find_map(|l| l.strip_prefix("kiln_warm_pool_microvms "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0);
        if pooled >= want {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "the warm pools held {pooled} VMs, not {want}, after {} s",
            ANSWER_TIMEOUT.as_secs()
        );
        tokio::time::sleep(POLL).await;
    }
}

async fn terminate(api: &Api, id: &str) -> anyhow::Result<()> {
    api.call(Method::DELETE, &format!("/2025-09-09/microvms/{id}"), None)
        .await
        .map(drop)
}

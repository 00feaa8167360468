//! Endpoint proxy overhead: requests/s and latency through the proxy (TLS, token check,
//! routing, HTTP/1.1 to the app) against the same clients talking to the app directly, and
//! against nginx as a TLS reverse proxy to the same app (same certificate, keep-alive
//! upstream, one worker per core) — the baseline a proxy should match.
//!
//! kiln's proxy is measured twice: inside the bench process, and as a process of its own (this
//! bench re-executed, serving kilnd's `endpoint::proxy` with kilnd's runtime: a worker per
//! core), which is how kilnd runs it and how nginx runs — the fair comparison. That one and
//! nginx get the same requests (the token header too) in interleaved rounds, and the CPU
//! time each spent per request is read from /proc: this machine's speed drifts by tens of
//! percent between runs, so only figures from the same round compare.
//!
//! Run: `cargo bench -p kilnd --bench proxy` (`KILN_BENCH_CLIENTS`, `KILN_BENCH_SECONDS`,
//! `KILN_BENCH_ROUNDS` change the load; `make bench` installs nginx). Clients, proxies and
//! app share the machine's cores, so the figures are for comparing, not absolute capacity.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use kiln_api::shapes::microvm::PortSpecification;
use kilnd::endpoint::proxy::{
    self, ActivityTable, ProxyLimits, ProxyState, RouteError, Routes, Upstream,
};
use kilnd::endpoint::tokens::{TokenClaims, TokenKeys, TokenKind};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;

const DOMAIN: &str = "kiln.localhost";

/// Every MicroVM is the one local app.
struct OneApp(Upstream);

impl Routes for OneApp {
    fn upstream(
        &self,
        _microvm_id: &str,
        _port: u16,
    ) -> Pin<Box<dyn Future<Output = Result<Upstream, RouteError>> + Send + '_>> {
        Box::pin(async move { Ok(self.0.clone()) })
    }

    fn agent(
        &self,
        _microvm_id: &str,
    ) -> Pin<Box<dyn Future<Output = Result<kiln_agent::AgentClient, RouteError>> + Send + '_>>
    {
        Box::pin(async {
            Err(RouteError::Unavailable(
                "no guest agent in this bench".into(),
            ))
        })
    }
}

/// Throughput and latency of one run.
struct Figures {
    requests_per_second: f64,
    p50: Duration,
    p99: Duration,
    /// CPU time the proxy's processes spent per request (user + system), when measured.
    cpu_per_request: Option<Duration>,
}

/// Where a client connects and how it wraps the socket.
#[derive(Clone)]
enum Path {
    Direct(SocketAddr),
    Proxy(SocketAddr, TlsConnector, String),
}

/// Set in the environment of the re-executed bench that serves the proxy on its own.
const CHILD: &str = "KILN_BENCH_PROXY_CHILD";

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match std::env::var(CHILD) {
        Ok(spec) => runtime.block_on(serve_proxy_child(&spec)),
        Err(_) => runtime.block_on(bench()),
    }
}

/// The proxy as its own process: `spec` is `<home>|<app addr>|host` or `<home>||netns` (an
/// app of its own in a new namespace). Prints the address it listens on, then serves.
async fn serve_proxy_child(spec: &str) -> anyhow::Result<()> {
    let mut parts = spec.split('|');
    let (home, app, place) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let home = std::path::Path::new(home);
    let upstream = match place {
        "netns" => app_in_namespace()?,
        _ => Upstream::host(app.parse().context("the app's address")?),
    };
    let keys = Arc::new(TokenKeys::load_or_create(home)?);
    let tls = kilnd::endpoint::tls::load_or_create(home, DOMAIN)?;
    let state = Arc::new(ProxyState::new(
        DOMAIN,
        keys,
        Arc::new(OneApp(upstream)),
        ActivityTable::new(),
        ProxyLimits {
            requests_per_second: 0,
            ..ProxyLimits::default()
        },
    ));
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    println!("{}", listener.local_addr()?);
    proxy::serve(listener, tls.server_config.clone(), state)
        .await
        .context("serving the proxy")?;
    Ok(())
}

/// The proxy in a process of its own; killed when dropped.
struct ProxyProcess {
    child: std::process::Child,
    addr: SocketAddr,
}

impl ProxyProcess {
    /// The proxy serving `app`, or an app in a namespace of its own.
    fn start(home: &std::path::Path, app: Option<SocketAddr>) -> anyhow::Result<ProxyProcess> {
        use std::io::BufRead;
        let spec = match app {
            Some(app) => format!("{}|{app}|host", home.display()),
            None => format!("{}||netns", home.display()),
        };
        let mut child = std::process::Command::new(std::env::current_exe()?)
            .env(CHILD, spec)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("starting the proxy process")?;
        let mut line = String::new();
        let stdout = child.stdout.take().context("the proxy process's stdout")?;
        std::io::BufReader::new(stdout).read_line(&mut line)?;
        let addr = match line.trim().parse() {
            Ok(addr) => addr,
            Err(e) => {
                let _ = child.kill();
                anyhow::bail!("the proxy process said {line:?} instead of its address: {e}");
            }
        };
        Ok(ProxyProcess { child, addr })
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn bench() -> anyhow::Result<()> {
    let clients: usize = env_or("KILN_BENCH_CLIENTS", 16);
    let seconds: u64 = env_or("KILN_BENCH_SECONDS", 3);
    let rounds: usize = env_or::<usize>("KILN_BENCH_ROUNDS", 5).max(1);
    let run = Duration::from_secs(seconds);

    let app = app().await?;
    let home = tempfile::tempdir()?;
    let keys = Arc::new(TokenKeys::load_or_create(home.path())?);
    let tls = kilnd::endpoint::tls::load_or_create(home.path(), DOMAIN)?;
    let limits = ProxyLimits {
        requests_per_second: 0,
        ..ProxyLimits::default()
    };
    let state = Arc::new(ProxyState::new(
        DOMAIN,
        keys.clone(),
        Arc::new(OneApp(Upstream::host(app))),
        ActivityTable::new(),
        limits,
    ));
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let proxy_addr = listener.local_addr()?;
    tokio::spawn(proxy::serve(listener, tls.server_config.clone(), state));
    let claims = TokenClaims::new(
        TokenKind::Proxy,
        "mvm-bench",
        vec![PortSpecification::Port(8080)],
        60,
    )?;
    let token = keys.issue(&claims)?;
    let connector = client_tls(&tls.ca_pem_path)?;

    println!("endpoint proxy: {clients} keep-alive HTTP/1.1 clients, {seconds} s per path, GET with a 5-byte answer");
    let direct = measure(Path::Direct(app), clients, run).await?;
    print_figures("direct", &direct);
    let in_process = measure(
        Path::Proxy(proxy_addr, connector.clone(), token.clone()),
        clients,
        run,
    )
    .await?;
    print_figures("proxy, in the bench process (TLS)", &in_process);
    // The same path to an app in its own namespace (how a VM's forward is reached).
    let own_ns = ProxyProcess::start(home.path(), None)?;
    let namespaced = measure_process(
        own_ns.child.id(),
        Path::Proxy(own_ns.addr, connector.clone(), token.clone()),
        clients,
        run,
    )
    .await?;
    drop(own_ns);
    print_figures("proxy, own process → netns", &namespaced);

    // kiln's proxy against nginx, in interleaved rounds: this machine's speed drifts by tens of percent from one run to
    // the next, so each comparison is taken within a round and the medians are reported.
    let own = ProxyProcess::start(home.path(), Some(app))?;
    let nginx = match Nginx::start(home.path(), app) {
        Ok(nginx) => Some(nginx),
        Err(e) => {
            println!("nginx (TLS)                          not measured: {e:#}");
            None
        }
    };
    let (mut kiln, mut by_nginx) = (vec![], vec![]);
    for _ in 0..rounds {
        let path = Path::Proxy(own.addr, connector.clone(), token.clone());
        kiln.push(measure_process(own.child.id(), path, clients, run).await?);
        if let Some(nginx) = &nginx {
            // The same requests as kiln's proxy gets, token header included (nginx drops
            // it on the way to the app, as kiln does).
            let path = Path::Proxy(nginx.addr, connector.clone(), token.clone());
            by_nginx.push(measure_process(nginx.child.id(), path, clients, run).await?);
        }
    }
    drop((own, nginx));
    let proxied = median_figures(&kiln);
    print_figures("proxy, own process (TLS)", &proxied);
    let nginx = (!by_nginx.is_empty()).then(|| median_figures(&by_nginx));
    if let Some(n) = &nginx {
        print_figures("nginx, own processes (TLS)", n);
    }
    println!(
        "ratio {:.2}x the throughput, p50 {:.1}x, p99 {:.1}x the latency (proxy / direct)",
        proxied.requests_per_second / direct.requests_per_second,
        proxied.p50.as_secs_f64() / direct.p50.as_secs_f64(),
        proxied.p99.as_secs_f64() / direct.p99.as_secs_f64(),
    );
    if let Some(n) = &nginx {
        let per_round: Vec<String> = kiln
            .iter()
            .zip(&by_nginx)
            .map(|(k, n)| format!("{:.2}", k.requests_per_second / n.requests_per_second))
            .collect();
        println!(
            "kiln proxy / nginx throughput  {:.2}x   p99 {:.3} ms (kiln) vs {:.3} ms (nginx)   \
             (medians of {rounds} rounds; per round {})",
            proxied.requests_per_second / n.requests_per_second,
            proxied.p99.as_secs_f64() * 1e3,
            n.p99.as_secs_f64() * 1e3,
            per_round.join(" "),
        );
    }
    println!("reproduce: cargo bench -p kilnd --bench proxy  (KILN_BENCH_CLIENTS={clients} KILN_BENCH_SECONDS={seconds} KILN_BENCH_ROUNDS={rounds})");
    Ok(())
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn print_figures(name: &str, f: &Figures) {
    let cpu = f
        .cpu_per_request
        .map(|c| format!("   CPU {:>5.1} µs/req", c.as_secs_f64() * 1e6))
        .unwrap_or_default();
    println!(
        "{name:<36} {:>9.0} req/s   p50 {:>7.3} ms   p99 {:>7.3} ms{cpu}",
        f.requests_per_second,
        f.p50.as_secs_f64() * 1e3,
        f.p99.as_secs_f64() * 1e3,
    );
}

/// CPU time (user + system) `pid` and its children have used so far: the proxy's
/// process, or nginx's master and workers.
fn cpu_of_tree(pid: u32) -> Duration {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut pids = vec![pid.to_string()];
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            let kids = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            pids.extend(kids.split_whitespace().map(str::to_string));
        }
    }
    let total: f64 = pids
        .iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .filter_map(|stat| {
            // Fields after the command (which may hold spaces) start after its ')'.
            let rest = &stat[stat.rfind(')')? + 2..];
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let user: f64 = fields.get(11)?.parse().ok()?;
            let system: f64 = fields.get(12)?.parse().ok()?;
            Some(user + system)
        })
        .sum();
    Duration::from_secs_f64(total / ticks)
}

/// Each figure's median over rounds (taken separately: throughput, p50, p99, CPU).
fn median_figures(rounds: &[Figures]) -> Figures {
    fn median<T: Copy + PartialOrd>(mut v: Vec<T>) -> Option<T> {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
        v.get(v.len() / 2).copied()
    }
    Figures {
        requests_per_second: median(rounds.iter().map(|f| f.requests_per_second).collect())
            .unwrap_or_default(),
        p50: median(rounds.iter().map(|f| f.p50).collect()).unwrap_or_default(),
        p99: median(rounds.iter().map(|f| f.p99).collect()).unwrap_or_default(),
        cpu_per_request: median(rounds.iter().filter_map(|f| f.cpu_per_request).collect()),
    }
}

/// `measure`, with the CPU the processes under `pid` spent per request.
async fn measure_process(
    pid: u32,
    path: Path,
    clients: usize,
    run: Duration,
) -> anyhow::Result<Figures> {
    let before = cpu_of_tree(pid);
    let mut figures = measure(path, clients, run).await?;
    let used = cpu_of_tree(pid).saturating_sub(before);
    let requests = figures.requests_per_second * run.as_secs_f64();
    if requests >= 1.0 {
        figures.cpu_per_request = Some(used.div_f64(requests));
    }
    Ok(figures)
}

/// The app: answers every request with `hello`.
async fn app() -> anyhow::Result<SocketAddr> {
    serve_app(TcpListener::bind("127.0.0.1:0").await?)
}

/// The app listening inside a network namespace of its own, as a VM's forward does.
fn app_in_namespace() -> anyhow::Result<Upstream> {
    let netns = kiln_net::Netns::create()?;
    netns.run("ip", &["link", "set", "lo", "up"], "")?;
    let listener = netns.listen_tcp(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    let addr = serve_app(listener)?;
    Ok(Upstream {
        netns: Some(Arc::new(netns)),
        addr,
    })
}

fn serve_app(listener: TcpListener) -> anyhow::Result<SocketAddr> {
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let _ = tcp.set_nodelay(true);
            let service = service_fn(|_req| async {
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"hello"))))
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service),
            );
        }
    });
    Ok(addr)
}

/// nginx as a TLS reverse proxy in front of the app, on a free loopback port, with the
/// endpoint's own certificate; stopped when dropped.
struct Nginx {
    child: std::process::Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Nginx {
    fn start(home: &std::path::Path, app: SocketAddr) -> anyhow::Result<Nginx> {
        let dir = tempfile::tempdir()?;
        let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let tls = home.join("tls");
        let d = dir.path().display();
        let conf = format!(
            "worker_processes auto;\n\
             daemon off;\n\
             pid {d}/nginx.pid;\n\
             error_log {d}/error.log warn;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n\
               access_log off;\n\
               client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;\n\
               fastcgi_temp_path {d}/fastcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n\
               upstream app {{ server {app}; keepalive 64; }}\n\
               server {{\n\
                 listen {addr} ssl;\n\
                 ssl_certificate {cert};\n\
                 ssl_certificate_key {key};\n\
                 keepalive_requests 1000000;\n\
                 location / {{\n\
                   proxy_pass http://app;\n\
                   proxy_http_version 1.1;\n\
                   proxy_set_header Connection \"\";\n\
                   proxy_set_header Host $host;\n\
                   proxy_set_header X-Aws-Proxy-Auth \"\";\n\
                 }}\n\
               }}\n\
             }}\n",
            cert = tls.join("endpoint.pem").display(),
            key = tls.join("endpoint.key").display(),
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let child = match std::process::Command::new("nginx")
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&conf_path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
        {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => anyhow::bail!(
                "nginx is not installed (`make bench` installs it: apt-get install nginx)"
            ),
            Err(e) => return Err(e).context("starting nginx"),
        };
        let nginx = Nginx {
            child,
            addr,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(nginx._dir.path().join("error.log"))
                    .unwrap_or_default();
                anyhow::bail!("nginx did not listen on {addr} within 10 s: {log}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(nginx)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its workers too.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

fn client_tls(ca: &std::path::Path) -> anyhow::Result<TlsConnector> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).context("reading the endpoint CA")? {
        roots.add(cert.context("reading the endpoint CA")?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
}

async fn measure(path: Path, clients: usize, run: Duration) -> anyhow::Result<Figures> {
    let start = Instant::now();
    let deadline = start + run;
    let mut tasks = Vec::with_capacity(clients);
    for _ in 0..clients {
        tasks.push(tokio::spawn(client(path.clone(), deadline)));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await??);
    }
    let elapsed = start.elapsed();
    latencies.sort_unstable();
    let at = |q: f64| {
        let i = ((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1));
        latencies.get(i).copied().unwrap_or_default()
    };
    Ok(Figures {
        requests_per_second: latencies.len() as f64 / elapsed.as_secs_f64(),
        p50: at(0.50),
        p99: at(0.99),
        cpu_per_request: None,
    })
}

/// One keep-alive connection sending requests back to back until `deadline`.
async fn client(path: Path, deadline: Instant) -> anyhow::Result<Vec<Duration>> {
    let (mut sender, host, token) = match path {
        Path::Direct(addr) => {
            let tcp = TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
            tokio::spawn(conn);
            (sender, addr.to_string(), None)
        }
        Path::Proxy(addr, connector, token) => {
            let tcp = TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            let name = ServerName::try_from(format!("mvm-bench.{DOMAIN}"))?;
            let tls = connector.connect(name, tcp).await?;
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
            tokio::spawn(conn);
            (sender, format!("mvm-bench.{DOMAIN}"), Some(token))
        }
    };
    let mut latencies = Vec::new();
    while Instant::now() < deadline {
        let mut req = Request::get("/").header("host", &host);
        if let Some(token) = token.as_ref() {
            req = req.header("x-aws-proxy-auth", token);
        }
        let req = req.body(Full::new(Bytes::new()))?;
        let sent = Instant::now();
        let response = sender.send_request(req).await?;
        anyhow::ensure!(
            response.status().is_success(),
            "status {}",
            response.status()
        );
        response.into_body().collect().await?;
        latencies.push(sent.elapsed());
    }
    Ok(latencies)
}

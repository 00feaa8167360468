//! What the kilnd benchmarks share: the release kilnd on a temporary home, its API signed
//! with the admin key, and building an image through it.

// Each bench uses part of it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

/// The environment variable `name` parsed, or `default`.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The release kilnd, on a temporary home, stopped on drop.
pub struct Kilnd {
    child: Child,
    /// Its data directory.
    pub home: tempfile::TempDir,
    /// Its API address.
    pub url: String,
    /// Its endpoint port on loopback.
    pub endpoint_port: u16,
    binary: PathBuf,
}

impl Kilnd {
    /// Starts the release kilnd beside the bench executable with `extra` flags.
    pub fn start(extra: &[&str]) -> anyhow::Result<Kilnd> {
        let exe = std::env::current_exe().context("finding the bench executable")?;
        // The bench runs as target/release/deps/launch-…; kilnd sits in target/release.
        let binary = exe
            .parent()
            .and_then(Path::parent)
            .map(|dir| dir.join("kilnd"))
            .context("the bench executable has no grandparent directory")?;
        ensure!(
            binary.is_file(),
            "{} is missing: run `cargo build --release -p kilnd` first",
            binary.display()
        );
        let shared = std::env::var_os("KILN_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/kiln-test-home")
            });
        for needed in ["kernels", "bases/busybox"] {
            ensure!(
                shared.join(needed).exists(),
                "{} has no {needed}: prepare the test home first (`make test`, or set KILN_HOME to a home with a guest kernel and the busybox base)",
                shared.display()
            );
        }
        let home = tempfile::Builder::new()
            .prefix("kilnd-bench")
            .tempdir_in("/tmp")?;
        // Guest kernel, initramfs and base images are shared; everything else is fresh.
        for dir in ["kernels", "bases", "host"] {
            std::fs::create_dir_all(shared.join(dir))?;
            std::os::unix::fs::symlink(shared.join(dir), home.path().join(dir))
                .with_context(|| format!("linking {dir} into {}", home.path().display()))?;
        }
        let endpoint_port = kiln_vmm::free_port()?;
        let child = spawn(&binary, home.path(), endpoint_port, extra)?;
        let mut kilnd = Kilnd {
            child,
            home,
            url: String::new(),
            endpoint_port,
            binary,
        };
        kilnd.url = kilnd.listening()?;
        Ok(kilnd)
    }

    /// Stops kilnd and starts it again on the same home and endpoint port with `extra`
    /// flags (its API address changes). MicroVMs left running are reconciled by kilnd.
    pub fn restart(&mut self, extra: &[&str]) -> anyhow::Result<()> {
        self.stop();
        self.child = spawn(&self.binary, self.home.path(), self.endpoint_port, extra)?;
        self.url = self.listening()?;
        Ok(())
    }

    fn stop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }

    /// The API address kilnd prints once it listens.
    fn listening(&mut self) -> anyhow::Result<String> {
        let stdout = self.child.stdout.take().context("kilnd's stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let url = loop {
            let Some(line) = lines.next() else {
                bail!(
                    "kilnd exited before listening; its log: {}",
                    self.log_tail()
                );
            };
            if let Some(rest) = line?.strip_prefix("kilnd: API on ") {
                break rest
                    .split_whitespace()
                    .next()
                    .context("kilnd printed no API address")?
                    .to_string();
            }
        };
        std::thread::spawn(move || for _ in lines {});
        Ok(url)
    }

    /// The last lines of kilnd's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.home.path().join("kilnd.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Kilnd {
    fn drop(&mut self) {
        self.stop();
        // kilnd leaves its VMs running when it stops (a restart takes them over); a bench
        // that ends, however it ends, leaves none.
        for proc_dir in qemu_processes(&self.home.path().display().to_string()) {
            if let Some(pid) = proc_dir
                .file_name()
                .and_then(|n| n.to_str()?.parse::<i32>().ok())
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// The `/proc/<pid>` directories of the QEMU processes whose command line names `home`.
pub fn qemu_processes(home: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|e| e.path())
        .filter(|dir| {
            let cmdline = std::fs::read(dir.join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            cmdline.contains("qemu-system") && cmdline.contains(home)
        })
        .collect()
}

/// The release kilnd on `home`, its log appended to `<home>/kilnd.log`.
/// `KILN_BENCH_KILND_ARGS='…' ` when set, for a reproduce line.
#[allow(dead_code)]
pub fn kilnd_args_env() -> String {
    match std::env::var("KILN_BENCH_KILND_ARGS") {
        Ok(a) if !a.trim().is_empty() => format!("KILN_BENCH_KILND_ARGS='{}' ", a.trim()),
        _ => String::new(),
    }
}

/// Starts kilnd with the bench's `extra` flags, then any in `KILN_BENCH_KILND_ARGS` (words
/// split on white space; later flags win, e.g. `--memory-growth off` for an A/B run).
fn spawn(binary: &Path, home: &Path, endpoint_port: u16, extra: &[&str]) -> anyhow::Result<Child> {
    let operator = std::env::var("KILN_BENCH_KILND_ARGS").unwrap_or_default();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(home.join("kilnd.log"))?;
    Command::new(binary)
        .arg("--home")
        .arg(home)
        .args(["--api-listen", "127.0.0.1:0", "--build-memory-mib", "256"])
        .args(["--endpoint-listen", &format!("127.0.0.1:{endpoint_port}")])
        // The benches write their image zips under /tmp and name them as file:// URIs.
        .args(["--artifact-root", "/tmp"])
        .args(extra)
        .args(operator.split_whitespace())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))
}

/// kilnd's AWS-shaped API over plain HTTP (loopback), signed with the admin key kilnd
/// wrote to its credentials file.
#[derive(Clone)]
pub struct Api {
    client: Client<HttpConnector, Full<Bytes>>,
    url: String,
    key: aws_credential_types::Credentials,
}

impl Api {
    /// Signs with the access key in `credentials`.
    pub fn new(url: &str, credentials: &Path) -> anyhow::Result<Api> {
        let text = std::fs::read_to_string(credentials)
            .with_context(|| format!("reading {}", credentials.display()))?;
        let value = |name: &str| {
            text.lines()
                .filter_map(|l| l.split_once('='))
                .find(|(k, _)| k.trim() == name)
                .map(|(_, v)| v.trim().to_string())
                .with_context(|| format!("{} has no {name}", credentials.display()))
        };
        Ok(Api {
            client: Client::builder(TokioExecutor::new()).build_http(),
            url: url.to_string(),
            key: aws_credential_types::Credentials::new(
                value("aws_access_key_id")?,
                value("aws_secret_access_key")?,
                None,
                None,
                "kilnd credentials file",
            ),
        })
    }

    /// SigV4 headers for one call.
    fn sign(
        &self,
        method: &Method,
        uri: &str,
        body: &[u8],
    ) -> anyhow::Result<Vec<(String, String)>> {
        use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
        let identity = self.key.clone().into();
        let params = aws_sigv4::sign::v4::SigningParams::builder()
            .identity(&identity)
            .region("local")
            .name("lambda")
            .time(std::time::SystemTime::now())
            .settings(SigningSettings::default())
            .build()?
            .into();
        let headers = [("content-type", "application/json")];
        let request = SignableRequest::new(
            method.as_str(),
            uri,
            headers.into_iter(),
            SignableBody::Bytes(body),
        )?;
        let (instructions, _) = sign(request, &params)?.into_parts();
        Ok(instructions
            .headers()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect())
    }

    /// A signed GET; the answer as text. Fails on any status but 2xx.
    pub async fn text(&self, path: &str) -> anyhow::Result<String> {
        let bytes = self.send(Method::GET, path, String::new()).await?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// One call; the answer's JSON (null when empty). Fails on any status but 2xx.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let bytes = self.send(method.clone(), path, body).await?;
        if bytes.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&bytes)
            .with_context(|| format!("{method} {path}: answer is not JSON"))
    }

    /// Sends one signed request; the answer's body. Fails on any status but 2xx.
    async fn send(&self, method: Method, path: &str, body: String) -> anyhow::Result<Bytes> {
        let uri = format!("{}{path}", self.url);
        let mut req = Request::builder()
            .method(method.clone())
            .uri(&uri)
            .header("content-type", "application/json");
        for (name, value) in self.sign(&method, &uri, body.as_bytes())? {
            req = req.header(name, value);
        }
        let req = req.body(Full::new(Bytes::from(body)))?;
        let response = self
            .client
            .request(req)
            .await
            .with_context(|| format!("{method} {path}"))?;
        let status = response.status();
        let bytes = response.into_body().collect().await?.to_bytes();
        ensure!(
            status.is_success(),
            "{method} {path}: {status} {}",
            String::from_utf8_lossy(&bytes)
        );
        Ok(bytes)
    }
}

/// The benches' app: busybox httpd serving one small page from the image's disk.
const HTTPD_DOCKERFILE: &str =
    "FROM kiln/busybox\nCOPY app.sh /\nEXPOSE 8080\nCMD [\"/bin/sh\", \"/app.sh\"]\n";
pub const HTTPD_APP: &str =
    "#!/bin/sh\nmkdir -p /www\necho ok > /www/index.html\nexec httpd -f -p 8080 -h /www\n";

/// Builds version 1 of image `name`: the benches' httpd app, 512 MiB (AWS's smallest).
pub async fn build_httpd_image(api: &Api, dir: &Path, name: &str) -> anyhow::Result<()> {
    build_image(
        api,
        dir,
        name,
        &[
            ("Dockerfile", HTTPD_DOCKERFILE, 0o644),
            ("app.sh", HTTPD_APP, 0o755),
        ],
        512,
    )
    .await
}

/// Builds version 1 of image `name` from `files` (name, content, mode) with
/// `memory_mib` of guest memory, and waits until it succeeded.
pub async fn build_image(
    api: &Api,
    dir: &Path,
    name: &str,
    files: &[(&str, &str, u32)],
    memory_mib: u32,
) -> anyhow::Result<()> {
    let zip_path = dir.join("app.zip");
    let mut zip = zip::ZipWriter::new(std::fs::File::create(&zip_path)?);
    for &(name, data, mode) in files {
        zip.start_file(
            name,
            zip::write::SimpleFileOptions::default().unix_permissions(mode),
        )?;
        zip.write_all(data.as_bytes())?;
    }
    zip.finish()?;
    api.call(
        Method::POST,
        "/2025-09-09/microvm-images",
        Some(json!({
            "name": name,
            "baseImageArn": "arn:aws:lambda:local:aws:microvm-image:busybox",
            "buildRoleArn": "arn:aws:iam::000000000000:role/kiln-build",
            "codeArtifact": {"uri": format!("file://{}", zip_path.display())},
            "resources": [{"minimumMemoryInMiB": memory_mib}],
        })),
    )
    .await?;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let v = api
            .call(
                Method::GET,
                &format!("/2025-09-09/microvm-images/{name}/versions/1"),
                None,
            )
            .await?;
        match v["state"].as_str() {
            Some("PENDING" | "IN_PROGRESS") => {}
            Some("SUCCESSFUL") => return Ok(()),
            _ => bail!("the image build failed: {v}"),
        }
        ensure!(
            Instant::now() < deadline,
            "the image build did not end in 5 minutes: {v}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The machine new images' MicroVMs run on: `KILN_BENCH_MACHINE` (`q35`, kilnd's default, or
/// `microvm`), given to kilnd as `--machine`.
pub fn machine() -> String {
    std::env::var("KILN_BENCH_MACHINE").unwrap_or_else(|_| "q35".into())
}

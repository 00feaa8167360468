//! A real kilnd for the tests: its own data directory (sharing the test home's guest kernel
//! and base images), its own port, driven with the AWS CLI and boto3 from `target/pyenv`,
//! signed with the admin access key kilnd writes to `<home>/credentials`.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The shared test home with kernels and bases (see the Makefile's TEST_HOME).
pub fn shared_home() -> PathBuf {
    std::env::var_os("KILN_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/kiln-test-home"))
}

/// A running kilnd.
pub struct Daemon {
    child: Child,
    /// Its data directory (deleted on drop).
    pub home: tempfile::TempDir,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// The endpoint proxy's port.
    pub endpoint_port: u16,
    extra: Vec<String>,
}

fn spawn(
    home: &Path,
    api: &str,
    endpoint_port: u16,
    extra: &[String],
    crash_at: Option<&str>,
) -> (Child, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kilnd"));
    match crash_at {
        Some(point) => command.env(kiln_vmm::crash::CRASH_AT, point),
        None => command.env_remove(kiln_vmm::crash::CRASH_AT),
    };
    let mut child = command
        .arg("--home")
        .arg(home)
        .args(["--api-listen", api, "--build-memory-mib", "256"])
        .args(["--endpoint-listen", &format!("127.0.0.1:{endpoint_port}")])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::from(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(home.join("kilnd.log"))
                .expect("log file"),
        ))
        .spawn()
        .expect("start kilnd");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let url = loop {
        let line = lines
            .next()
            .expect("kilnd exited before listening (see its kilnd.log)")
            .expect("read kilnd stdout");
        if let Some(rest) = line.strip_prefix("kilnd: API on ") {
            break rest.split_whitespace().next().expect("url").to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    (child, url)
}

impl Daemon {
    /// Starts kilnd with `extra` flags and waits until it listens. The admin may name
    /// `file://` artifacts under the system's temporary directory (where the tests write
    /// their zips) unless `extra` sets its own `--artifact-root`. No warm pool unless
    /// `extra` asks for one (`--warm-pool N`): the tests count QEMU processes.
    pub fn start(extra: &[&str]) -> Daemon {
        let home = tempfile::Builder::new()
            .prefix("kilnd-t")
            .tempdir_in("/tmp")
            .expect("home");
        let shared = shared_home();
        // Guest kernel, initramfs and base images are shared; everything else is fresh.
        for dir in ["kernels", "bases", "host"] {
            std::fs::create_dir_all(shared.join(dir)).expect("shared dir");
            std::os::unix::fs::symlink(shared.join(dir), home.path().join(dir)).expect("symlink");
        }
        let mut extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        if !extra.iter().any(|a| a == "--artifact-root") {
            extra.push("--artifact-root".into());
            extra.push(std::env::temp_dir().to_string_lossy().into_owned());
        }
        if !extra.iter().any(|a| a == "--warm-pool") {
            extra.extend(["--warm-pool".into(), "0".into()]);
        }
        let endpoint_port = kiln_vmm::free_port().expect("port");
        let (child, url) = spawn(home.path(), "127.0.0.1:0", endpoint_port, &extra, None);
        Daemon {
            child,
            home,
            url,
            endpoint_port,
            extra,
        }
    }

    /// `kill -9` kilnd, then starts it again on the same data directory and ports.
    pub fn crash_and_restart(&mut self) {
        self.restart_crashing_at(None);
    }

    /// `kill -9` kilnd (if it still runs), then starts it again on the same data directory and
    /// ports; with `crash_at`, the new kilnd kills itself at that crash point (`KILN_CRASH_AT`).
    pub fn restart_crashing_at(&mut self, crash_at: Option<&str>) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let api = self.url.trim_start_matches("http://").to_string();
        let (child, url) = spawn(
            self.home.path(),
            &api,
            self.endpoint_port,
            &self.extra,
            crash_at,
        );
        self.child = child;
        self.url = url;
    }

    /// Whether kilnd exits within `limit` (a crash point was reached).
    pub fn exits_within(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    /// The admin credentials kilnd wrote on its first start (AWS shared-credentials file).
    pub fn credentials(&self) -> PathBuf {
        self.home.path().join("credentials")
    }

    /// The admin access key from [`Daemon::credentials`].
    pub fn admin_key(&self) -> Key {
        Key::from_file(&self.credentials())
    }

    /// Runs `aws lambda-microvms <args>` against this daemon as admin: (exit code, stdout
    /// JSON or Null, stderr).
    pub fn aws(&self, args: &[&str]) -> (i32, Value, String) {
        self.aws_with(&self.credentials(), args)
    }

    /// Runs `aws lambda-microvms <args>` signed with the `[default]` profile of
    /// `credentials`.
    pub fn aws_with(&self, credentials: &Path, args: &[&str]) -> (i32, Value, String) {
        let out = aws_cli(credentials)
            .arg("lambda-microvms")
            .args(args)
            .args([
                "--endpoint-url",
                &self.url,
                "--region",
                "us-east-1",
                "--output",
                "json",
            ])
            .env("AWS_CONFIG_FILE", self.aws_config())
            .output()
            .expect("run the AWS CLI (make pyenv)");
        let stdout = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        (
            out.status.code().unwrap_or(-1),
            stdout,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// An AWS CLI config that leaves validation to kilnd (so tests can send what the model's
    /// client-side checks would stop, e.g. idle times below 60 s that a test daemon allows).
    fn aws_config(&self) -> PathBuf {
        let path = self.home.path().join("aws-config");
        if !path.exists() {
            std::fs::write(&path, "[default]\nparameter_validation = false\n").expect("aws config");
        }
        path
    }

    /// `aws … create-microvm-image` as admin from a zip on the host, on the busybox base.
    pub fn create_image(&self, name: &str, zip: &Path) -> (i32, Value, String) {
        let uri = format!("file://{}", zip.display());
        self.create_image_as(&self.credentials(), name, &uri)
    }

    /// A 5-minute endpoint token for port 8080 of MicroVM `id`, asked for with `credentials`.
    pub fn token_as(&self, credentials: &Path, id: &str) -> String {
        let (code, out, err) = self.aws_with(
            credentials,
            &[
                "create-microvm-auth-token",
                "--microvm-identifier",
                id,
                "--expiration-in-minutes",
                "5",
                "--allowed-ports",
                r#"[{"port": 8080}]"#,
            ],
        );
        assert_eq!(code, 0, "create-microvm-auth-token: {err}");
        out["authToken"]["X-aws-proxy-auth"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// `aws … create-microvm-image` signed with `credentials`, from the artifact `uri`, on the
    /// busybox base with 512 MiB.
    pub fn create_image_as(
        &self,
        credentials: &Path,
        name: &str,
        uri: &str,
    ) -> (i32, Value, String) {
        self.create_image_with(credentials, name, uri, &[])
    }

    /// [`Daemon::create_image_as`] with `extra` arguments (hooks, environment, connectors…).
    pub fn create_image_with(
        &self,
        credentials: &Path,
        name: &str,
        uri: &str,
        extra: &[&str],
    ) -> (i32, Value, String) {
        let uri = format!("uri={uri}");
        let mut args = vec![
            "create-microvm-image",
            "--name",
            name,
            "--base-image-arn",
            "arn:aws:lambda:local:aws:microvm-image:busybox",
            "--build-role-arn",
            "arn:aws:iam::000000000000:role/kiln-build",
            "--code-artifact",
            &uri,
            "--resources",
            "minimumMemoryInMiB=512",
        ];
        args.extend_from_slice(extra);
        self.aws_with(credentials, &args)
    }

    /// Builds version 1 of image `name`: the busybox base running `app` (a shell script,
    /// `/app.sh`) as its app on port 8080, the zip made in `scratch`; asserts it succeeded.
    pub fn build_sh_app(&self, name: &str, scratch: &Path, app: &str) {
        let zip = scratch.join(format!("{name}.zip"));
        make_zip(
            &zip,
            &[
                (
                    "Dockerfile",
                    b"FROM kiln/busybox\nCOPY app.sh /\nEXPOSE 8080\nCMD [\"/bin/sh\", \"/app.sh\"]\n",
                    0o644,
                ),
                ("app.sh", app.as_bytes(), 0o755),
            ],
        );
        let (code, _, err) = self.create_image(name, &zip);
        assert_eq!(code, 0, "{err}");
        let built = self.wait_version(name, "1");
        assert_eq!(built["state"], "SUCCESSFUL", "{built}");
    }

    /// Waits (up to 5 minutes) until a version's build ends; returns its description.
    pub fn wait_version(&self, name: &str, version: &str) -> Value {
        self.wait_version_for(name, version, Duration::from_secs(300))
    }

    /// Waits up to `limit` until a version's build ends; returns its description.
    pub fn wait_version_for(&self, name: &str, version: &str, limit: Duration) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let (code, v, err) = self.aws(&[
                "get-microvm-image-version",
                "--image-identifier",
                name,
                "--image-version",
                version,
            ]);
            assert_eq!(code, 0, "get-microvm-image-version: {err}");
            if !matches!(v["state"].as_str(), Some("PENDING" | "IN_PROGRESS")) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "build of {name} {version} did not end: {v}"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// GET `path` from a MicroVM's app on guest port 8080, through the VM's forward (inside
    /// its network namespace, as kilnd's proxy reaches it).
    pub fn app_get(&self, microvm_id: &str, path: &str) -> String {
        let vm_dir = self
            .home
            .path()
            .join("microvms")
            .join(microvm_id)
            .join("vm");
        let spec = vm_dir.join("spec.json");
        let pid = std::fs::read_to_string(vm_dir.join("qemu.pid")).expect("qemu.pid");
        let spec: Value =
            serde_json::from_slice(&std::fs::read(&spec).expect("spec.json")).expect("spec json");
        let port = spec["network"]["forwards"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|f| f["guest_port"] == 8080)
            .and_then(|f| f["host_port"].as_u64())
            .expect("a forward to 8080");
        http_get(&format!("netns://{}/127.0.0.1:{port}", pid.trim()), path)
    }

    /// A SigV4-signed GET on kilnd's own API as admin; the body.
    pub fn get(&self, path: &str) -> String {
        self.request(&self.admin_key(), "GET", path, b"").2
    }

    /// A request to kilnd's API signed with `key` now: (status, headers, body).
    pub fn request(
        &self,
        key: &Key,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> (u16, Vec<(String, String)>, String) {
        self.request_at(key, SystemTime::now(), method, path, body)
    }

    /// A request to kilnd's API signed with `key` as if at `at`: (status, headers, body).
    pub fn request_at(
        &self,
        key: &Key,
        at: SystemTime,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> (u16, Vec<(String, String)>, String) {
        let headers = sign(&self.url, key, at, method, path, body);
        let headers: Vec<(&str, &str)> = headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        http_request(&self.url, method, path, &headers, body)
    }

    /// A new access key for `principal`, created as admin through `POST /kiln/v1/keys`,
    /// and a credentials file holding it.
    pub fn new_principal(&self, principal: &str) -> (Key, PathBuf) {
        let body = format!(r#"{{"principal": "{principal}"}}"#);
        let (status, _, text) =
            self.request(&self.admin_key(), "POST", "/kiln/v1/keys", body.as_bytes());
        assert_eq!(status, 201, "POST /kiln/v1/keys: {text}");
        let created: Value = serde_json::from_str(&text).expect("key JSON");
        let key = Key {
            id: created["accessKeyId"].as_str().expect("id").to_string(),
            secret: created["secretAccessKey"]
                .as_str()
                .expect("secret")
                .to_string(),
        };
        let path = self.home.path().join(format!("credentials-{principal}"));
        key.write(&path);
        (key, path)
    }

    /// Uploads `zip` as the principal of `credentials` to its bucket `bucket` (made if
    /// missing) in kilnd's S3 store with the AWS CLI; the `s3://` URI.
    pub fn upload(&self, credentials: &Path, bucket: &str, zip: &Path) -> String {
        let uri = format!(
            "s3://{bucket}/{}",
            zip.file_name().expect("zip name").to_string_lossy()
        );
        let s3 = |args: &[&str]| {
            aws_cli(credentials)
                .arg("s3")
                .args(args)
                .args(["--endpoint-url", &self.url, "--region", "us-east-1"])
                .output()
                .expect("run the AWS CLI (make pyenv)")
        };
        let _ = s3(&["mb", &format!("s3://{bucket}")]);
        let copied = s3(&["cp", &zip.to_string_lossy(), &uri]);
        assert!(
            copied.status.success(),
            "aws s3 cp {}: {}",
            zip.display(),
            String::from_utf8_lossy(&copied.stderr)
        );
        uri
    }

    /// Runs the `kiln` CLI beside this test's kilnd, signing with `credentials`, with
    /// `input` on its stdin.
    pub fn kiln_as(
        &self,
        credentials: &Path,
        args: &[&str],
        input: Option<&[u8]>,
    ) -> std::process::Output {
        let bin = Path::new(env!("CARGO_BIN_EXE_kilnd")).with_file_name("kiln");
        let mut cmd = Command::new(&bin);
        for var in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"] {
            cmd.env_remove(var);
        }
        cmd.args(args)
            .env("KILN_ENDPOINT", &self.url)
            .env("KILN_HOME", self.home.path())
            .env("AWS_SHARED_CREDENTIALS_FILE", credentials)
            .env("AWS_REGION", "us-east-1")
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| {
            panic!(
                "run {} (cargo build --release --workspace --bins): {e}",
                bin.display()
            )
        });
        if let Some(data) = input {
            let mut stdin = child.stdin.take().expect("stdin");
            stdin.write_all(data).expect("write stdin");
        }
        child.wait_with_output().expect("kiln output")
    }

    /// Runs the `kiln` CLI as admin: (success, stdout, stderr).
    pub fn kiln(&self, args: &[&str]) -> (bool, String, String) {
        let out = self.kiln_as(&self.credentials(), args, None);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// A Python from `target/pyenv` whose boto3 signs as admin.
    pub fn python(&self) -> Command {
        let mut cmd = Command::new(workspace().join("target/pyenv/bin/python"));
        aws_env(&mut cmd, &self.credentials());
        cmd
    }

    /// Whether a QEMU process still runs with this daemon's home in its command line.
    pub fn qemu_running(&self) -> bool {
        self.qemu_count() > 0
    }

    /// How many QEMU processes run with this daemon's home in their command line.
    pub fn qemu_count(&self) -> usize {
        self.qemu_pids().len()
    }

    /// The QEMU processes with this daemon's home in their command line.
    pub fn qemu_pids(&self) -> Vec<i32> {
        let needle = self.home.path().to_string_lossy().into_owned();
        std::fs::read_dir("/proc")
            .expect("proc")
            .flatten()
            .filter(|e| {
                std::fs::read(e.path().join("cmdline"))
                    .map(|c| {
                        let c = String::from_utf8_lossy(&c);
                        c.split('\0')
                            .next()
                            .is_some_and(|argv0| argv0.contains("qemu"))
                            && c.contains(&needle)
                    })
                    .unwrap_or(false)
            })
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
            .collect()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
        // VMs outlive kilnd by design: a test's VMs end with its daemon.
        for pid in self.qemu_pids() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// An access key: what a `[default]` profile of a credentials file holds.
#[derive(Debug, Clone)]
pub struct Key {
    /// `AKIA…`.
    pub id: String,
    /// The secret access key.
    pub secret: String,
}

impl Key {
    /// The `[default]` profile of an AWS shared-credentials file.
    pub fn from_file(path: &Path) -> Key {
        let text = std::fs::read_to_string(path).expect("credentials file");
        let value = |name: &str| {
            text.lines()
                .filter_map(|l| l.split_once('='))
                .find(|(k, _)| k.trim() == name)
                .map(|(_, v)| v.trim().to_string())
                .unwrap_or_else(|| panic!("{name} in {}", path.display()))
        };
        Key {
            id: value("aws_access_key_id"),
            secret: value("aws_secret_access_key"),
        }
    }

    /// Writes this key as the `[default]` profile of a credentials file at `path`.
    pub fn write(&self, path: &Path) {
        std::fs::write(
            path,
            format!(
                "[default]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
                self.id, self.secret
            ),
        )
        .expect("write credentials");
    }
}

/// Sets the environment so the AWS CLI and boto3 sign with the `[default]` profile of
/// `credentials` and nothing from the machine's own AWS setup.
pub fn aws_env(cmd: &mut Command, credentials: &Path) {
    for var in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("AWS_SHARED_CREDENTIALS_FILE", credentials)
        .env("AWS_MAX_ATTEMPTS", "1");
}

/// The AWS CLI from `target/pyenv`, signing with `credentials`.
pub fn aws_cli(credentials: &Path) -> Command {
    let mut cmd = Command::new(workspace().join("target/pyenv/bin/aws"));
    aws_env(&mut cmd, credentials);
    cmd
}

/// SigV4 headers (Host, X-Amz-Date, Authorization) for a request to `base` signed with
/// `key` at `at`, made by AWS's own signer.
pub fn sign(
    base: &str,
    key: &Key,
    at: SystemTime,
    method: &str,
    path: &str,
    body: &[u8],
) -> Vec<(String, String)> {
    use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
    let identity =
        aws_credential_types::Credentials::new(&key.id, &key.secret, None, None, "test").into();
    let params = aws_sigv4::sign::v4::SigningParams::builder()
        .identity(&identity)
        .region("us-east-1")
        .name("lambda")
        .time(at)
        .settings(SigningSettings::default())
        .build()
        .expect("signing params")
        .into();
    let host = base.trim_start_matches("http://");
    let signable = SignableRequest::new(
        method,
        format!("{base}{path}"),
        [("host", host)].into_iter(),
        SignableBody::Bytes(body),
    )
    .expect("signable request");
    let (instructions, _) = sign(signable, &params).expect("sign").into_parts();
    let mut headers = vec![("Host".to_string(), host.to_string())];
    headers.extend(
        instructions
            .headers()
            .map(|(n, v)| (n.to_string(), v.to_string())),
    );
    headers
}

/// Connects to `http://ADDR`, or to `netns://PID/ADDR`: a forward inside the network
/// namespace of process PID (a VM's QEMU), from the one source address kilnd uses there.
fn connect(base: &str) -> (std::net::TcpStream, String) {
    if let Some(rest) = base.strip_prefix("netns://") {
        let (pid, addr) = rest.split_once('/').expect("netns://PID/ADDR");
        let ns = kiln_net::Netns::of_pid(pid.parse().expect("pid")).expect("the VM's namespace");
        let socket = ns
            .socket(socket2::Domain::IPV4, socket2::Type::STREAM)
            .expect("socket in the namespace");
        let src: std::net::SocketAddr = (kiln_net::netns::KILND_SOURCE, 0).into();
        socket.bind(&src.into()).expect("bind");
        let dest: std::net::SocketAddr = addr.parse().expect("address");
        socket
            .connect(&dest.into())
            .expect("connect in the namespace");
        return (socket.into(), addr.to_string());
    }
    let addr = base.trim_start_matches("http://").to_string();
    (std::net::TcpStream::connect(&addr).expect("connect"), addr)
}

/// A plain HTTP/1.0 request with exactly `headers` (plus Content-Length for a body):
/// (status, headers, body).
pub fn http_request(
    base: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Vec<(String, String)>, String) {
    let (mut s, addr) = connect(base);
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let mut head = format!("{method} {path} HTTP/1.0\r\n");
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
        head.push_str(&format!("Host: {addr}\r\n"));
    }
    for (n, v) in headers {
        head.push_str(&format!("{n}: {v}\r\n"));
    }
    if !body.is_empty() {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).expect("request");
    s.write_all(body).expect("request body");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).expect("response");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, body.to_string())
}

/// A plain HTTP/1.0 GET; the body.
pub fn http_get(base: &str, path: &str) -> String {
    http_request(base, "GET", path, &[], b"").2
}

/// Writes a zip of `(name, contents, mode)` entries.
pub fn make_zip(path: &Path, entries: &[(&str, &[u8], u32)]) {
    let f = std::fs::File::create(path).expect("zip file");
    let mut z = zip::ZipWriter::new(f);
    for (name, data, mode) in entries {
        let opts = zip::write::SimpleFileOptions::default().unix_permissions(*mode);
        z.start_file(*name, opts).expect("zip entry");
        z.write_all(data).expect("zip data");
    }
    z.finish().expect("zip finish");
}

/// A VM restored from an image version's snapshot, its port 8080 forwarded to the host.
pub struct Restored {
    rt: tokio::runtime::Runtime,
    vm: Option<kiln_vmm::qemu::QemuVm>,
    base: String,
    _dir: tempfile::TempDir,
}

impl Restored {
    /// Restores `snapshot_dir` into a new VM.
    pub fn start(snapshot_dir: &Path) -> Restored {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let dir = tempfile::Builder::new()
            .prefix("kiln-r")
            .tempdir_in("/tmp")
            .expect("vm dir");
        let port = kiln_vmm::free_port().expect("port");
        let vm = rt.block_on(async {
            let home = shared_home();
            let host = tokio::task::spawn_blocking(move || kiln_vmm::host::Host::prepare(&home))
                .await
                .expect("join")
                .expect("host");
            let snap = kiln_vmm::Snapshot::open(snapshot_dir, &host.vmm.qemu().version)
                .expect("open snapshot");
            let mut target = kiln_vmm::RestoreTarget::new(dir.path().join("vm"));
            target.forwards.push(kiln_vmm::PortForward {
                host_port: port,
                guest_port: 8080,
            });
            host.vmm.restore(&snap, target).await.expect("restore")
        });
        Restored {
            rt,
            base: format!("netns://{}/127.0.0.1:{port}", vm.pid()),
            vm: Some(vm),
            _dir: dir,
        }
    }

    /// GET `path` from the app; the body.
    pub fn get(&self, path: &str) -> String {
        http_get(&self.base, path)
    }

    /// Runs `sh -c script` in the guest; its stdout.
    pub fn sh(&self, script: &str) -> String {
        let vm = self.vm.as_ref().expect("vm");
        let out = self
            .rt
            .block_on(
                vm.agent()
                    .run(kiln_agent::client::ExecRequest::new(["sh", "-c", script])),
            )
            .expect("exec");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Restored {
    fn drop(&mut self) {
        if let Some(vm) = self.vm.take() {
            let _ = self.rt.block_on(vm.terminate());
        }
    }
}

/// A counter that lives in guest memory (tmpfs), served over HTTP by busybox on 8080:
/// `/cgi-bin/count` answers 101, 102, … — state a restore, suspend or resume must keep. The
/// count is replaced by a rename, so requests at once (a grown guest runs them in parallel)
/// may repeat a number but never read a half-written one and fail.
pub const COUNTER_APP: &str = "#!/bin/sh
mkdir -p /www/cgi-bin
echo 100 > /tmp/count
cat > /www/cgi-bin/count <<'CGI'
#!/bin/sh
n=$(cat /tmp/count); n=$((n+1)); echo $n > /tmp/count.$$ && mv /tmp/count.$$ /tmp/count
printf 'Content-Type: text/plain\\r\\n\\r\\n%s\\n' \"$n\"
CGI
chmod +x /www/cgi-bin/count
exec httpd -f -p 8080 -h /www
";

/// A zip whose build fails before any VM starts (FROM disagrees with the busybox base).
pub fn unbuildable_zip(dir: &Path) -> PathBuf {
    let zip = dir.join("unbuildable.zip");
    make_zip(
        &zip,
        &[(
            "Dockerfile",
            b"FROM kiln/debian:12\nCMD [\"true\"]\n",
            0o644,
        )],
    );
    zip
}

/// Writes the counter app's zip (busybox base) to `path`.
pub fn counter_zip(path: &Path) {
    make_zip(
        path,
        &[
            (
                "Dockerfile",
                b"FROM kiln/busybox\nCOPY app.sh /\nEXPOSE 8080\nCMD [\"/bin/sh\", \"/app.sh\"]\n",
                0o644,
            ),
            ("app.sh", COUNTER_APP.as_bytes(), 0o755),
        ],
    );
}

/// A "private service" for network tests: a network namespace the test creates, joined to
/// the host by a veth pair on a private /29 (host side `.1`, the service's addresses `.2`
/// and `.3`), with TCP listeners inside it that record what reaches them. Traffic in the
/// tests goes only here and to loopback. Removed on drop.
pub struct PrivateService {
    name: String,
    host_if: String,
    /// The host's own address on the link (`.1`): a guest must never reach it.
    pub host_addr: std::net::Ipv4Addr,
    /// The service's addresses (`.2`, `.3`).
    pub addrs: [std::net::Ipv4Addr; 2],
    netns: kiln_net::Netns,
    seen: Seen,
}

/// What each connection to a `PrivateService` listener sent, by listening address.
type Seen = std::sync::Arc<std::sync::Mutex<Vec<(std::net::SocketAddr, Vec<u8>)>>>;

impl PrivateService {
    /// A new namespace and link; `ip` must be installed (it is in scripts/host-tools.tsv).
    pub fn new() -> PrivateService {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = (std::process::id() % 200) * 8
            + NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let subnet = [10, 213, (n / 32) as u8, ((n % 32) * 8) as u8];
        let name = format!("kiln-test-{}-{n}", std::process::id());
        let host_if = format!("kt{}h", n);
        let ns_if = format!("kt{}n", n);
        let at =
            |last: u8| std::net::Ipv4Addr::new(subnet[0], subnet[1], subnet[2], subnet[3] + last);
        let ip = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().expect("run ip");
            assert!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        ip(&["netns", "add", &name]);
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ]);
        ip(&["link", "set", &ns_if, "netns", &name]);
        ip(&["addr", "add", &format!("{}/29", at(1)), "dev", &host_if]);
        ip(&["link", "set", &host_if, "up"]);
        for cmd in [
            format!("addr add {}/29 dev {ns_if}", at(2)),
            format!("addr add {}/29 dev {ns_if}", at(3)),
            format!("link set {ns_if} up"),
            "link set lo up".to_string(),
        ] {
            let mut args = vec!["-n", name.as_str()];
            args.extend(cmd.split(' '));
            ip(&args);
        }
        let netns = kiln_net::Netns::of_path(std::path::Path::new(&format!("/run/netns/{name}")))
            .expect("open the test namespace");
        PrivateService {
            name,
            host_if,
            host_addr: at(1),
            addrs: [at(2), at(3)],
            netns,
            seen: Default::default(),
        }
    }

    /// Listens on `addr:port` inside the namespace; what each connection sends (until it
    /// closes or is quiet for 3 s, at most 64 KiB) is recorded and `reply` is sent back.
    pub fn listen(&self, addr: std::net::Ipv4Addr, port: u16, reply: &'static [u8]) {
        let socket = self
            .netns
            .socket(socket2::Domain::IPV4, socket2::Type::STREAM)
            .expect("socket");
        socket.set_reuse_address(true).expect("reuse");
        let at: std::net::SocketAddr = (addr, port).into();
        socket.bind(&at.into()).expect("bind in the test namespace");
        socket.listen(64).expect("listen");
        let listener: std::net::TcpListener = socket.into();
        let seen = self.seen.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { break };
                let _ = conn.set_read_timeout(Some(Duration::from_secs(3)));
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while buf.len() < 64 * 1024 {
                    match conn.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                seen.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((at, buf));
                let _ = conn.write_all(reply);
            }
        });
    }

    /// What reached `addr:port` so far (first bytes of each connection).
    pub fn seen(&self, addr: std::net::Ipv4Addr, port: u16) -> Vec<Vec<u8>> {
        let at: std::net::SocketAddr = (addr, port).into();
        self.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(a, _)| *a == at)
            .map(|(_, b)| b.clone())
            .collect()
    }
}

impl Drop for PrivateService {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// What confines one QEMU, read from /proc as an attacker who escaped into it would find it.
#[derive(Debug)]
pub struct QemuConfinement {
    /// `Uid:` of /proc/<pid>/status (real, effective, saved, fs).
    pub uids: Vec<u32>,
    /// `Seccomp:` (2 = filter).
    pub seccomp: String,
    /// `NoNewPrivs:`.
    pub no_new_privs: String,
    /// `CapEff:`.
    pub cap_eff: String,
    /// Whether its mount namespace is this process's (kilnd's) own.
    pub shares_our_mounts: bool,
    /// Whether a path under the daemon's home (kiln.db) has a name in its root.
    pub sees_kiln_db: bool,
}

impl QemuConfinement {
    /// Reads it for `pid`; `None` when the process is gone.
    pub fn of(pid: i32, home: &Path) -> Option<QemuConfinement> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name}:")))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        let mnt = std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok()?;
        let ours = std::fs::read_link("/proc/self/ns/mnt").ok()?;
        let db = format!("/proc/{pid}/root{}/kiln.db", home.display());
        Some(QemuConfinement {
            uids: field("Uid")
                .split_whitespace()
                .filter_map(|u| u.parse().ok())
                .collect(),
            seccomp: field("Seccomp"),
            no_new_privs: field("NoNewPrivs"),
            cap_eff: field("CapEff"),
            shares_our_mounts: mnt == ours,
            sees_kiln_db: Path::new(&db).exists(),
        })
    }

    /// Panics unless it runs as its own unprivileged uid, under seccomp, with no capability,
    /// in a mount namespace of its own where kiln.db has no name.
    pub fn assert_confined(&self, what: &str) {
        assert!(
            self.uids.len() == 4 && self.uids.iter().all(|&u| u >= 200_000 && u == self.uids[0]),
            "{what}: {self:?}"
        );
        assert_eq!(self.seccomp, "2", "{what}: {self:?}");
        assert_eq!(self.no_new_privs, "1", "{what}: {self:?}");
        assert_eq!(self.cap_eff, "0000000000000000", "{what}: {self:?}");
        assert!(!self.shares_our_mounts, "{what}: {self:?}");
        assert!(!self.sees_kiln_db, "{what}: {self:?}");
    }
}

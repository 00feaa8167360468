//! A real kilnd for the tests: its own data directory (sharing the test home's guest kernel
//! and base images), its own port, driven with the AWS CLI and boto3 from `target/pyenv`.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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
    /// Starts kilnd with `extra` flags and waits until it listens.
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
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
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

    /// Runs `aws lambda-microvms <args>` against this daemon: (exit code, stdout JSON or
    /// Null, stderr).
    pub fn aws(&self, args: &[&str]) -> (i32, Value, String) {
        let out = Command::new(workspace().join("target/pyenv/bin/aws"))
            .arg("lambda-microvms")
            .args(args)
            .args([
                "--endpoint-url",
                &self.url,
                "--no-sign-request",
                "--region",
                "us-east-1",
                "--output",
                "json",
            ])
            .env("AWS_MAX_ATTEMPTS", "1")
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

    /// `aws … create-microvm-image` from a zip on the busybox base.
    pub fn create_image(&self, name: &str, zip: &Path) -> (i32, Value, String) {
        self.aws(&[
            "create-microvm-image",
            "--name",
            name,
            "--base-image-arn",
            "arn:aws:lambda:local:aws:microvm-image:busybox",
            "--build-role-arn",
            "arn:aws:iam::000000000000:role/kiln-build",
            "--code-artifact",
            &format!("uri=file://{}", zip.display()),
            "--resources",
            "minimumMemoryInMiB=256",
        ])
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

    /// GET `path` from a MicroVM's app on guest port 8080, through the VM's host forward.
    pub fn app_get(&self, microvm_id: &str, path: &str) -> String {
        let spec = self
            .home
            .path()
            .join("microvms")
            .join(microvm_id)
            .join("vm/spec.json");
        let spec: Value =
            serde_json::from_slice(&std::fs::read(&spec).expect("spec.json")).expect("spec json");
        let port = spec["network"]["forwards"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|f| f["guest_port"] == 8080)
            .and_then(|f| f["host_port"].as_u64())
            .expect("a forward to 8080");
        http_get(&format!("http://127.0.0.1:{port}"), path)
    }

    /// GET on kilnd's own API; the body.
    pub fn get(&self, path: &str) -> String {
        http_get(&self.url, path)
    }

    /// Whether a QEMU process still runs with this daemon's home in its command line.
    pub fn qemu_running(&self) -> bool {
        self.qemu_count() > 0
    }

    /// How many QEMU processes run with this daemon's home in their command line.
    pub fn qemu_count(&self) -> usize {
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
            .count()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

/// A plain HTTP/1.0 GET; the body.
pub fn http_get(base: &str, path: &str) -> String {
    let addr = base.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("request");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).expect("response");
    let text = String::from_utf8_lossy(&buf).into_owned();
    text.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or(text)
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
        use kiln_vmm::Vmm;
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
            vm: Some(vm),
            base: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        }
    }

    /// GET `path` from the app; the body.
    pub fn get(&self, path: &str) -> String {
        http_get(&self.base, path)
    }

    /// Runs `sh -c script` in the guest; its stdout.
    pub fn sh(&self, script: &str) -> String {
        use kiln_vmm::MicroVm;
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
        use kiln_vmm::MicroVm;
        if let Some(vm) = self.vm.take() {
            let _ = self.rt.block_on(vm.terminate());
        }
    }
}

//! The `kiln` binary as a user runs it: `kiln doctor` on this host, and the CLI against a
//! real kilnd — build → run → curl → ls → suspend → resume → rm → rebuild in one
//! boot-heavy test, plus cheap ones (help, errors, JSON) without VMs.
//!
//! kilnd is the release binary beside this test's `kiln` (`cargo build --release -p
//! kilnd`; `make test` builds it), or `$KILND_BIN`. Guest kernel and base images come from
//! the shared test home (`$KILN_HOME`, else `target/kiln-test-home`), as kilnd's tests do.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use serde_json::Value;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn kiln_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_kiln"))
}

fn kilnd_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("KILND_BIN") {
        return PathBuf::from(p);
    }
    let beside = kiln_bin().with_file_name("kilnd");
    let release = workspace().join("target/release/kilnd");
    [beside, release.clone()]
        .into_iter()
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!(
                "no kilnd binary at {}: build it with `cargo build --release -p kilnd` (or set KILND_BIN)",
                release.display()
            )
        })
}

fn shared_home() -> PathBuf {
    std::env::var_os("KILN_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/kiln-test-home"))
}

/// A `kiln` command with none of the caller's AWS settings, `HOME` at `home`.
fn kiln_cmd(home: &Path) -> Command {
    let mut cmd = Command::new(kiln_bin());
    for var in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_SHARED_CREDENTIALS_FILE",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "KILN_ENDPOINT",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("KILN_HOME", home).env("HOME", home);
    cmd
}

/// `kiln` with the shared test home, as `make test` runs it.
fn kiln_in_shared_home(args: &[&str]) -> Command {
    let mut cmd = Command::new(kiln_bin());
    cmd.args(args).env("KILN_HOME", shared_home());
    cmd
}

#[test]
fn doctor_when_host_is_ready_then_json_says_so_and_exits_zero() {
    let out = kiln_in_shared_home(&["doctor", "--output", "json"])
        .output()
        .expect("run kiln");

    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(report["can_run_microvms"], true);
    assert!(report["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .any(|c| c["name"] == "accelerator"));
}

#[test]
fn doctor_when_qemu_is_missing_then_says_what_to_install_and_fails() {
    let out = kiln_in_shared_home(&["doctor"])
        .env("KILN_QEMU", "/nonexistent/qemu-system-x86_64")
        .output()
        .expect("run kiln");

    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(text.contains("FAIL  qemu"), "{text}");
    assert!(text.contains("apt-get install qemu-system-x86"), "{text}");
}

#[test]
fn doctor_when_a_runtime_tool_is_missing_then_lists_every_tool_and_what_to_install() {
    // A PATH holding every program of the table this host has, except debootstrap.
    let bin = tempfile::tempdir().expect("scratch");
    for tool in kiln_vmm::host_tools::HOST_TOOLS.iter() {
        let name = tool.command;
        if name == "debootstrap" || name.contains(':') {
            continue;
        }
        if let Some(path) = kiln_vmm::qemu::process::which(name) {
            std::os::unix::fs::symlink(path, bin.path().join(name)).expect("link a tool");
        }
    }

    let out = kiln_in_shared_home(&["doctor"])
        .env("PATH", bin.path())
        .output()
        .expect("run kiln");
    let json = kiln_in_shared_home(&["doctor", "--output", "json"])
        .env("PATH", bin.path())
        .output()
        .expect("run kiln");

    let text = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = serde_json::from_slice(&json.stdout).expect("JSON report");
    assert!(!out.status.success());
    assert!(text.contains("FAIL  host tools"), "{text}");
    assert!(
        text.contains("MISS  debootstrap")
            && text.contains("apt-get install debootstrap (or `make deps`)"),
        "{text}"
    );
    assert!(text.contains("qemu-img"), "{text}");
    let tools = report["host_tools"].as_array().expect("host_tools");
    assert_eq!(tools.len(), kiln_vmm::host_tools::HOST_TOOLS.len());
    assert!(tools.iter().any(|t| t["command"] == "debootstrap"
        && t["found"] == false
        && t["package"] == "debootstrap"));
}

#[test]
fn doctor_when_accel_override_is_bogus_then_names_the_variable() {
    let out = kiln_in_shared_home(&["doctor"])
        .env("KILN_ACCEL", "warp")
        .output()
        .expect("run kiln");

    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(text.contains("KILN_ACCEL"), "{text}");
}

/// What a `kiln` run printed.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn of(out: Output) -> Run {
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or(Value::Null)
    }
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// A running kilnd on its own data directory and ports.
struct Daemon {
    child: Child,
    home: tempfile::TempDir,
    url: String,
}

impl Daemon {
    fn start() -> Daemon {
        let home = tempfile::Builder::new()
            .prefix("kiln-cli-t")
            .tempdir_in("/tmp")
            .expect("home");
        let shared = shared_home();
        for dir in ["kernels", "bases", "host"] {
            std::fs::create_dir_all(shared.join(dir)).expect("shared dir");
            std::os::unix::fs::symlink(shared.join(dir), home.path().join(dir)).expect("symlink");
        }
        let endpoint_port = kiln_vmm::free_port().expect("port");
        let log = std::fs::File::create(home.path().join("kilnd.log")).expect("log");
        let mut child = Command::new(kilnd_bin())
            .arg("--home")
            .arg(home.path())
            .args(["--api-listen", "127.0.0.1:0", "--build-memory-mib", "256"])
            .args(["--endpoint-listen", &format!("127.0.0.1:{endpoint_port}")])
            // No warm pool: the tests count QEMU processes.
            .args(["--warm-pool", "0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start kilnd");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let url = loop {
            let line = lines
                .next()
                .unwrap_or_else(|| {
                    panic!(
                        "kilnd exited before listening (see {}/kilnd.log)",
                        home.path().display()
                    )
                })
                .expect("read kilnd stdout");
            if let Some(rest) = line.strip_prefix("kilnd: API on ") {
                break rest.split_whitespace().next().expect("url").to_string();
            }
        };
        std::thread::spawn(move || for _ in lines {});
        // A kilnd that writes its own credentials file (SigV4) is used as it is; before
        // that, kilnd ignores signatures and any key will do.
        let creds = home.path().join("credentials");
        if !creds.exists() {
            std::fs::write(
                &creds,
                "[default]\naws_access_key_id = AKIDKILNCLITEST\naws_secret_access_key = kiln-cli-test-secret\n",
            )
            .expect("credentials");
        }
        Daemon { child, home, url }
    }

    fn kiln(&self, args: &[&str]) -> Run {
        Run::of(
            kiln_cmd(self.home.path())
                .env("KILN_ENDPOINT", &self.url)
                .args(args)
                .stdin(Stdio::null())
                .output()
                .expect("run kiln"),
        )
    }

    /// `kiln args…` with `input` on its standard input.
    fn kiln_typing(&self, args: &[&str], input: &str) -> Run {
        let mut child = kiln_cmd(self.home.path())
            .env("KILN_ENDPOINT", &self.url)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run kiln");
        if let Some(mut stdin) = child.stdin.take() {
            std::io::Write::write_all(&mut stdin, input.as_bytes()).expect("type");
        }
        Run::of(child.wait_with_output().expect("kiln output"))
    }

    /// QEMU processes started for this daemon's data directory.
    fn qemu_pids(&self) -> Vec<i32> {
        let needle = self.home.path().to_string_lossy().into_owned();
        std::fs::read_dir("/proc")
            .map(|d| {
                d.flatten()
                    .filter_map(|e| {
                        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
                        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
                        let cmdline = String::from_utf8_lossy(&cmdline);
                        let argv0 = cmdline.split('\0').next()?;
                        (argv0.contains("qemu") && cmdline.contains(&needle)).then_some(pid)
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // MicroVMs outlive kilnd by design; a failed test must not leave its QEMUs behind.
        for pid in self.qemu_pids() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

/// Names of the subcommands `kiln --help` lists.
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| *n != "help")
        .map(str::to_string)
        .collect()
}

#[test]
fn help_when_any_subcommand_then_exits_0_with_an_example() {
    let scratch = tempfile::tempdir().expect("scratch");
    let top = Run::of(
        kiln_cmd(scratch.path())
            .arg("--help")
            .output()
            .expect("kiln --help"),
    );
    let mut names = subcommands(&top.stdout);
    names.extend(["keys list", "keys create", "keys revoke"].map(String::from));

    let helps: Vec<(String, Run)> = names
        .iter()
        .map(|n| {
            let mut cmd = kiln_cmd(scratch.path());
            cmd.args(n.split(' ')).arg("--help");
            (n.clone(), Run::of(cmd.output().expect("kiln help")))
        })
        .collect();

    assert_eq!(top.code, 0, "{top:?}");
    assert!(names.len() >= 24 + 10, "{names:?}");
    for name in [
        "build",
        "run",
        "ls",
        "images",
        "curl",
        "suspend",
        "resume",
        "rm",
        "keys",
        "logs",
        "run-microvm",
        "list-microvm-images",
        "untag-resource",
    ] {
        assert!(
            names.iter().any(|n| n == name),
            "{name} missing from {names:?}"
        );
    }
    for (name, run) in helps {
        assert_eq!(run.code, 0, "kiln {name} --help: {run:?}");
        assert!(
            run.stdout.contains("Example"),
            "kiln {name} --help has no example: {run:?}"
        );
    }
}

#[test]
fn any_call_when_no_credentials_then_says_where_they_are_looked_for() {
    let home = tempfile::tempdir().expect("home");

    let run = Run::of(
        kiln_cmd(home.path())
            .args(["ls", "--endpoint", "http://127.0.0.1:9"])
            .output()
            .expect("kiln ls"),
    );

    assert_ne!(run.code, 0, "{run:?}");
    assert!(run.stderr.contains("no credentials"), "{run:?}");
    assert!(run.stderr.contains("AWS_ACCESS_KEY_ID"), "{run:?}");
    assert!(
        run.stderr.contains(&format!(
            "kilnd creates {}/credentials on its first start",
            home.path().display()
        )),
        "{run:?}"
    );
}

#[test]
fn unknown_names_when_used_then_error_type_message_hint_and_nonzero() {
    let kilnd = Daemon::start();

    let image = kilnd.kiln(&["run", "no-such-image"]);
    let vm = kilnd.kiln(&["get-microvm", "--microvm-identifier", "mvm-nope"]);
    let bad = kilnd.kiln(&[
        "run-microvm",
        "--image-identifier",
        "x",
        "--maximum-duration-in-seconds",
        "0",
    ]);

    assert_ne!(image.code, 0, "{image:?}");
    assert!(
        image.stderr.contains("ResourceNotFoundException"),
        "{image:?}"
    );
    assert!(image.stderr.contains("no-such-image"), "{image:?}");
    assert!(
        image
            .stderr
            .contains("hint: list images with `kiln images`"),
        "{image:?}"
    );
    assert_ne!(vm.code, 0, "{vm:?}");
    assert!(
        vm.stderr.contains("hint: list MicroVMs with `kiln ls"),
        "{vm:?}"
    );
    assert_ne!(bad.code, 0, "{bad:?}");
    assert!(bad.stderr.contains("ValidationException"), "{bad:?}");
    assert!(bad.stderr.contains("kiln run-microvm --help"), "{bad:?}");
}

#[test]
fn json_output_when_listing_then_parses_with_the_expected_members() {
    let kilnd = Daemon::start();

    let managed = kilnd.kiln(&["list-managed-microvm-images", "--output", "json"]);
    let images = kilnd.kiln(&["images", "--output", "json"]);
    let vms = kilnd.kiln(&["ls", "--output", "json"]);
    let table = kilnd.kiln(&["list-managed-microvm-images"]);

    let managed_json = managed.json();
    let arns: Vec<&str> = managed_json["items"]
        .as_array()
        .map(|a| a.iter().filter_map(|i| i["imageArn"].as_str()).collect())
        .unwrap_or_default();
    assert!(
        arns.contains(&"arn:aws:lambda:local:aws:microvm-image:busybox"),
        "{managed:?}"
    );
    assert_eq!(images.json()["items"], Value::Array(vec![]), "{images:?}");
    assert_eq!(vms.json()["items"], Value::Array(vec![]), "{vms:?}");
    assert!(table.stdout.starts_with("IMAGEARN"), "{table:?}");
    assert!(
        table.stdout.contains("microvm-image:debian-12"),
        "{table:?}"
    );
}

#[test]
fn build_when_context_is_bad_then_refused_with_the_reason() {
    let kilnd = Daemon::start();
    let scratch = tempfile::tempdir().expect("scratch");
    let missing = scratch.path().join("missing-copy");
    std::fs::create_dir(&missing).expect("mkdir");
    std::fs::write(
        missing.join("Dockerfile"),
        "FROM kiln/busybox\nCOPY nothing-here.txt /\n",
    )
    .expect("write");
    let escaping = scratch.path().join("escaping");
    std::fs::create_dir(&escaping).expect("mkdir");
    std::fs::write(escaping.join("Dockerfile"), "FROM kiln/busybox\n").expect("write");
    std::os::unix::fs::symlink("/etc/passwd", escaping.join("passwd")).expect("link");

    let failed = kilnd.kiln(&["build", &missing.to_string_lossy(), "--name", "broken"]);
    let refused = kilnd.kiln(&["build", &escaping.to_string_lossy()]);

    assert_ne!(failed.code, 0, "{failed:?}");
    assert!(failed.stdout.contains("FAILED"), "{failed:?}");
    assert!(failed.stderr.contains("nothing-here.txt"), "{failed:?}");
    assert!(
        failed.stderr.contains("last lines of its log"),
        "{failed:?}"
    );
    assert_ne!(refused.code, 0, "{refused:?}");
    assert!(refused.stderr.contains("symbolic link"), "{refused:?}");
    assert!(refused.stderr.contains(".dockerignore"), "{refused:?}");
}

const PAGE: &str = "hello from a kiln build\n";

/// A busybox app serving its build context from /www; `.dockerignore` keeps `secret.txt` out.
fn site(dir: &Path) {
    std::fs::create_dir_all(dir).expect("mkdir");
    std::fs::write(
        dir.join("Dockerfile"),
        "FROM kiln/busybox\nCOPY . /www/\nEXPOSE 8080\nCMD [\"/bin/sh\", \"/www/app.sh\"]\n",
    )
    .expect("Dockerfile");
    std::fs::write(
        dir.join("app.sh"),
        "#!/bin/sh\nexec httpd -f -p 8080 -h /www\n",
    )
    .expect("app.sh");
    std::fs::write(dir.join("index.html"), PAGE).expect("index.html");
    std::fs::write(dir.join("secret.txt"), "must not be in the image\n").expect("secret");
    std::fs::write(dir.join(".dockerignore"), "secret.txt\n").expect(".dockerignore");
}

fn state_of(ls: &Run, id: &str) -> String {
    ls.json()["items"]
        .as_array()
        .and_then(|items| items.iter().find(|i| i["microvmId"] == id))
        .and_then(|i| i["state"].as_str())
        .unwrap_or("absent")
        .to_string()
}

#[test]
fn friendly_verbs_when_building_and_running_an_app_then_each_step_shows_its_result() {
    let kilnd = Daemon::start();
    let scratch = tempfile::tempdir().expect("scratch");
    let app = scratch.path().join("site");
    site(&app);
    let app_dir = app.to_string_lossy().into_owned();

    let built = kilnd.kiln(&["build", &app_dir]);
    let ran = kilnd.kiln(&["run", "site", "--shell", "--output", "json"]);
    let id = ran.json()["microvmId"]
        .as_str()
        .unwrap_or("mvm-missing")
        .to_string();
    let page = kilnd.kiln(&["curl", &id, "/index.html"]);
    let shell = kilnd.kiln_typing(
        &["shell", &id],
        "tty && echo \"$((6*7)) $(cat /www/index.html | wc -c)\"; exit 4\n",
    );
    let secret = kilnd.kiln(&["curl", &id, "/secret.txt"]);
    let listed = kilnd.kiln(&["ls", "--output", "json"]);
    let table = kilnd.kiln(&["ls"]);
    let suspended = kilnd.kiln(&["suspend", &id]);
    let listed_suspended = kilnd.kiln(&["ls", "--output", "json"]);
    let resumed = kilnd.kiln(&["resume", &id]);
    let page_after_resume = kilnd.kiln(&["curl", &id, "/index.html", "--output", "json"]);
    let described = kilnd.kiln(&[
        "get-microvm",
        "--microvm-identifier",
        &id,
        "--output",
        "json",
    ]);
    let removed = kilnd.kiln(&["rm", &id]);
    let rebuilt = kilnd.kiln(&["build", &app_dir, "--name", "site", "--output", "json"]);
    let images = kilnd.kiln(&["images", "--output", "json"]);

    assert_eq!(built.code, 0, "{built:?}");
    assert!(built.stdout.contains("SUCCESSFUL"), "{built:?}");
    assert!(
        built.stderr.contains("creating image site version 1"),
        "{built:?}"
    );
    assert!(built.stderr.contains("[2/4] COPY . /www/"), "{built:?}");
    assert_eq!(ran.code, 0, "{ran:?}");
    assert_eq!(ran.json()["state"], "RUNNING", "{ran:?}");
    assert!(
        ran.json()["token"].as_str().is_some_and(|t| !t.is_empty()),
        "{ran:?}"
    );
    assert_eq!((page.code, page.stdout.as_str()), (0, PAGE), "{page:?}");
    assert!(page.stderr.contains("HTTP 200"), "{page:?}");
    assert!(secret.stderr.contains("HTTP 404"), "{secret:?}");
    assert_eq!(shell.code, 4, "{shell:?}");
    assert!(shell.stdout.contains("/dev/pts/"), "{shell:?}");
    assert!(
        shell.stdout.contains(&format!("42 {}", PAGE.len())),
        "{shell:?}"
    );
    assert_eq!(state_of(&listed, &id), "RUNNING", "{listed:?}");
    assert!(table.stdout.starts_with("ID"), "{table:?}");
    assert!(table.stdout.contains("site:1"), "{table:?}");
    assert_eq!(suspended.code, 0, "{suspended:?}");
    assert!(suspended.stdout.contains("SUSPENDED"), "{suspended:?}");
    assert_eq!(
        state_of(&listed_suspended, &id),
        "SUSPENDED",
        "{listed_suspended:?}"
    );
    assert!(resumed.stdout.contains("RUNNING"), "{resumed:?}");
    assert_eq!(
        page_after_resume.json()["status"],
        200,
        "{page_after_resume:?}"
    );
    assert_eq!(
        page_after_resume.json()["body"],
        PAGE,
        "{page_after_resume:?}"
    );
    assert_eq!(described.json()["microvmId"], id.as_str(), "{described:?}");
    assert_eq!(described.json()["state"], "RUNNING", "{described:?}");
    assert!(removed.stdout.contains("TERMINATED"), "{removed:?}");
    assert_eq!(rebuilt.code, 0, "{rebuilt:?}");
    assert_eq!(rebuilt.json()["imageVersion"], "2", "{rebuilt:?}");
    assert_eq!(rebuilt.json()["state"], "SUCCESSFUL", "{rebuilt:?}");
    assert_eq!(
        images.json()["items"][0]["latestVersion"],
        "2",
        "{images:?}"
    );
    assert!(kilnd.qemu_pids().is_empty(), "QEMU left running");
}

#[test]
fn build_when_caller_is_not_admin_then_the_zip_goes_through_its_own_bucket_and_builds() {
    let kilnd = Daemon::start();
    let scratch = tempfile::tempdir().expect("scratch");
    let app = scratch.path().join("alices-site");
    site(&app);
    let created = kilnd.kiln(&["keys", "create", "--principal", "alice", "--output", "json"]);
    let field = |k: &str| created.json()[k].as_str().unwrap_or_default().to_string();
    let (akid, secret) = (field("accessKeyId"), field("secretAccessKey"));
    let as_alice = |args: &[&str]| {
        Run::of(
            kiln_cmd(kilnd.home.path())
                .env("KILN_ENDPOINT", &kilnd.url)
                .env("AWS_ACCESS_KEY_ID", &akid)
                .env("AWS_SECRET_ACCESS_KEY", &secret)
                .args(args)
                .stdin(Stdio::null())
                .output()
                .expect("run kiln"),
        )
    };

    let built = as_alice(&["build", &app.to_string_lossy(), "--output", "json"]);
    let version = as_alice(&[
        "get-microvm-image-version",
        "--image-identifier",
        "alices-site",
        "--image-version",
        "1",
        "--output",
        "json",
    ]);

    assert_eq!(built.code, 0, "{built:?}");
    assert_eq!(built.json()["state"], "SUCCESSFUL", "{built:?}");
    assert!(
        built
            .stderr
            .contains("uploaded to s3://kiln-artifacts-alice/alices-site/"),
        "{built:?}"
    );
    assert!(
        version.json()["codeArtifact"]["uri"]
            .as_str()
            .is_some_and(|u| u.starts_with("s3://kiln-artifacts-alice/")),
        "{version:?}"
    );
}

#[test]
fn keys_when_created_listed_and_revoked_then_each_shows() {
    let kilnd = Daemon::start();

    let created = kilnd.kiln(&["keys", "create", "--principal", "alice", "--output", "json"]);
    let akid = created.json()["accessKeyId"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let listed = kilnd.kiln(&["keys", "list", "--output", "json"]);
    let revoked = kilnd.kiln(&["keys", "revoke", &akid]);
    let after = kilnd.kiln(&["keys", "list", "--output", "json"]);
    let table = kilnd.kiln(&["keys", "list"]);

    assert_eq!(created.code, 0, "{created:?}");
    assert!(
        created.json()["secretAccessKey"]
            .as_str()
            .is_some_and(|s| !s.is_empty()),
        "{created:?}"
    );
    assert_eq!(created.json()["principal"], "alice");
    let find = |run: &Run| {
        run.json()
            .as_array()
            .and_then(|keys| {
                keys.iter()
                    .find(|k| k["accessKeyId"] == akid.as_str())
                    .cloned()
            })
            .unwrap_or(Value::Null)
    };
    assert_eq!(find(&listed)["principal"], "alice", "{listed:?}");
    assert_eq!(revoked.code, 0, "{revoked:?}");
    let revoked_field = &find(&after)["revoked"];
    assert!(
        !revoked_field.is_null() && *revoked_field != Value::Bool(false),
        "{after:?}"
    );
    // The table's row for the key shows when it was made and when it was revoked.
    let row = table
        .stdout
        .lines()
        .find(|l| l.contains(&akid))
        .unwrap_or_default()
        .to_string();
    let dates = row
        .split_whitespace()
        .filter(|w| w.len() == 10 && w.as_bytes()[4] == b'-' && w.as_bytes()[7] == b'-')
        .count();
    assert_eq!(dates, 2, "created and revoked dates: {row}");
}

#[test]
fn events_when_calls_changed_things_then_listed_with_principal_and_target_never_a_secret() {
    let kilnd = Daemon::start();
    let created = kilnd.kiln(&["keys", "create", "--principal", "alice", "--output", "json"]);
    let field = |k: &str| created.json()[k].as_str().unwrap_or_default().to_string();
    let (akid, secret) = (field("accessKeyId"), field("secretAccessKey"));
    let refused = kilnd.kiln(&["run-microvm", "--image-identifier", "nope"]);
    let mut follow = kiln_cmd(kilnd.home.path())
        .env("KILN_ENDPOINT", &kilnd.url)
        .args(["events", "--follow", "--output", "json"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("kiln events --follow");
    let lines = {
        let stdout = follow.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        rx
    };
    let next_line = || {
        lines
            .recv_timeout(std::time::Duration::from_secs(20))
            .unwrap_or_default()
    };
    let followed_before = [next_line(), next_line()];
    let bob = kilnd.kiln(&["keys", "create", "--principal", "bob", "--output", "json"]);
    let followed_after = next_line();
    let _ = follow.kill();
    let _ = follow.wait();

    let all = kilnd.kiln(&["events", "--output", "json"]);
    let recent = kilnd.kiln(&[
        "events", "--since", "10m", "--limit", "2", "--output", "json",
    ]);
    let table = kilnd.kiln(&["events"]);
    let as_alice = Run::of(
        kiln_cmd(kilnd.home.path())
            .env("KILN_ENDPOINT", &kilnd.url)
            .env("AWS_ACCESS_KEY_ID", &akid)
            .env("AWS_SECRET_ACCESS_KEY", &secret)
            .args(["events", "--output", "json"])
            .output()
            .expect("kiln events as alice"),
    );
    let bad_since = kilnd.kiln(&["events", "--since", "yesterday"]);

    assert_eq!(created.code, 0, "{created:?}");
    assert_ne!(refused.code, 0, "{refused:?}");
    assert_eq!(all.code, 0, "{all:?}");
    let events = all.json()["events"].as_array().cloned().unwrap_or_default();
    let seen: Vec<(String, String, String, String)> = events
        .iter()
        .map(|e| {
            let s = |k: &str| e[k].as_str().unwrap_or_default().to_string();
            (s("principal"), s("operation"), s("target"), s("result"))
        })
        .collect();
    let admin_did = |op: &str, target: &str, result: &str| {
        (
            "admin".to_string(),
            op.to_string(),
            target.to_string(),
            result.to_string(),
        )
    };
    assert_eq!(
        seen[..2],
        [
            admin_did("CreateAccessKey", &akid, "ok"),
            admin_did("RunMicrovm", "nope", "ResourceNotFoundException"),
        ],
        "{all:?}"
    );
    assert_eq!(seen[2].1, "CreateAccessKey", "{all:?}");
    assert!(events.iter().all(|e| e["timestamp"].is_string()), "{all:?}");
    assert!(!all.stdout.contains(&secret), "a secret in the events");
    // --follow printed what was there, then the call made while it ran.
    let followed: Vec<Value> = followed_before
        .iter()
        .chain([&followed_after])
        .map(|l| serde_json::from_str(l).unwrap_or(Value::Null))
        .collect();
    assert_eq!(followed[0]["operation"], "CreateAccessKey", "{followed:?}");
    assert_eq!(followed[1]["operation"], "RunMicrovm", "{followed:?}");
    assert_eq!(bob.code, 0, "{bob:?}");
    assert_eq!(followed[2]["operation"], "CreateAccessKey", "{followed:?}");
    assert_eq!(
        followed[2]["target"],
        bob.json()["accessKeyId"],
        "{followed:?}"
    );
    assert_eq!(recent.code, 0, "{recent:?}");
    assert_eq!(
        recent.json()["events"].as_array().map(Vec::len),
        Some(2),
        "{recent:?}"
    );
    assert_eq!(table.code, 0, "{table:?}");
    assert!(
        table.stdout.starts_with("TIME ") && table.stdout.contains("PRINCIPAL"),
        "{table:?}"
    );
    assert!(table.stdout.contains("RunMicrovm"), "{table:?}");
    assert_eq!(as_alice.code, 0, "{as_alice:?}");
    assert_eq!(
        as_alice.json()["events"],
        serde_json::json!([]),
        "{as_alice:?}"
    );
    assert_ne!(bad_since.code, 0, "{bad_since:?}");
    assert!(bad_since.stderr.contains("10m, 1h"), "{bad_since:?}");
}

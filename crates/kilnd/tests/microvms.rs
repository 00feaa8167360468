//! MicroVMs end to end: launch from an image, state per VM, terminate, admission control,
//! and a kilnd killed with SIGKILL that comes back to find its VMs.

mod common;

use std::time::{Duration, Instant};

use common::{make_zip, Daemon};

fn counter_image(kilnd: &Daemon, dir: &std::path::Path) {
    let zip = dir.join("counter.zip");
    common::counter_zip(&zip);
    let (code, _, err) = kilnd.create_image("counter", &zip);
    assert_eq!(code, 0, "{err}");
    let v = kilnd.wait_version("counter", "1");
    assert_eq!(v["state"], "SUCCESSFUL", "{v}");
}

/// `run-microvm` of the counter image with `--idle-policy policy`.
fn run_counter_with_idle(kilnd: &Daemon, policy: &str) -> (i32, serde_json::Value, String) {
    kilnd.aws(&[
        "run-microvm",
        "--image-identifier",
        "counter",
        "--idle-policy",
        policy,
    ])
}

fn run(kilnd: &Daemon) -> serde_json::Value {
    let (code, out, err) = kilnd.aws(&["run-microvm", "--image-identifier", "counter"]);
    assert_eq!(code, 0, "{err}");
    out
}

#[test]
fn run_when_two_vms_launch_then_each_runs_on_its_own_and_terminate_frees_everything() {
    let kilnd = Daemon::start(&[]);
    let scratch = tempfile::tempdir().expect("scratch");
    counter_image(&kilnd, scratch.path());

    let a = run(&kilnd);
    let b = run(&kilnd);
    let (id_a, id_b) = (
        a["microvmId"].as_str().unwrap_or_default(),
        b["microvmId"].as_str().unwrap_or_default(),
    );
    let (_, got, _) = kilnd.aws(&["get-microvm", "--microvm-identifier", id_a]);
    let (_, listed, _) = kilnd.aws(&["list-microvms", "--image-identifier", "counter"]);
    let (alice, alice_credentials) = kilnd.new_principal("alice");
    let (_, _, alice_get) = kilnd.aws_with(
        &alice_credentials,
        &["get-microvm", "--microvm-identifier", id_a],
    );
    let (_, alice_list, _) = kilnd.aws_with(&alice_credentials, &["list-microvms"]);
    let (_, _, alice_terminate) = kilnd.aws_with(
        &alice_credentials,
        &["terminate-microvm", "--microvm-identifier", id_a],
    );
    let (alice_details, _, _) =
        kilnd.request(&alice, "GET", &format!("/kiln/v1/microvms/{id_a}"), b"");
    let (token_a, token_b) = (token(&kilnd, id_a), token(&kilnd, id_b));
    let first_a = endpoint_get(&kilnd, id_a, &token_a, "/cgi-bin/count");
    let second_a = endpoint_get(&kilnd, id_a, &token_a, "/cgi-bin/count");
    let first_b = endpoint_get(&kilnd, id_b, &token_b, "/cgi-bin/count");
    let crossed = endpoint_get(&kilnd, id_b, &token_a, "/cgi-bin/count");
    let (t1, _, _) = kilnd.aws(&["terminate-microvm", "--microvm-identifier", id_a]);
    let (t2, _, _) = kilnd.aws(&["terminate-microvm", "--microvm-identifier", id_a]);
    let (_, gone, _) = kilnd.aws(&["get-microvm", "--microvm-identifier", id_a]);
    let (_, missing, missing_err) = kilnd.aws(&["get-microvm", "--microvm-identifier", "mvm-nope"]);
    kilnd.aws(&["terminate-microvm", "--microvm-identifier", id_b]);

    assert!(
        alice_get.contains("ResourceNotFoundException"),
        "{alice_get}"
    );
    assert_eq!(alice_list["items"], serde_json::json!([]), "{alice_list}");
    assert!(
        alice_terminate.contains("ResourceNotFoundException"),
        "{alice_terminate}"
    );
    assert_eq!(alice_details, 404);
    assert_eq!(a["state"], "RUNNING", "{a}");
    assert_eq!(a["imageVersion"], "1");
    assert!(
        a["endpoint"]
            .as_str()
            .unwrap_or_default()
            .starts_with(&format!("https://{id_a}.kiln.localhost:")),
        "{a}"
    );
    assert_eq!(a["maximumDurationInSeconds"], 28800);
    assert_ne!(id_a, id_b);
    assert_eq!(got["state"], "RUNNING");
    assert_eq!(listed["items"].as_array().map(Vec::len), Some(2));
    assert_eq!(
        (first_a.trim(), second_a.trim(), first_b.trim()),
        ("200 101", "200 102", "200 101")
    );
    assert!(crossed.starts_with("403"), "{crossed}");
    assert_eq!((t1, t2), (0, 0));
    assert_eq!(gone["state"], "TERMINATED");
    assert!(gone["terminatedAt"].is_number(), "{gone}");
    assert!(
        missing.is_null() && missing_err.contains("ResourceNotFoundException"),
        "{missing_err}"
    );
    assert!(!kilnd.qemu_running());
    assert_eq!(
        std::fs::read_dir(kilnd.home.path().join("microvms"))
            .map(|d| d.count())
            .unwrap_or(0),
        0
    );
}

/// Watches every QEMU of `kilnd` until `stop` is set, reading each one's confinement.
fn watch_qemus(
    kilnd: &Daemon,
    stop: &std::sync::atomic::AtomicBool,
) -> Vec<(i32, common::QemuConfinement)> {
    let home = kilnd.home.path().to_path_buf();
    let mut seen: Vec<(i32, common::QemuConfinement)> = Vec::new();
    while !stop.load(std::sync::atomic::Ordering::Acquire) {
        for pid in kilnd.qemu_pids() {
            if seen.iter().all(|(p, _)| *p != pid) {
                // QEMU installs its seccomp filter itself, early in its start: read until it
                // is there (or three seconds passed, and the assertion shows what was read).
                let mut last = None;
                for _ in 0..30 {
                    last = common::QemuConfinement::of(pid, &home);
                    if last.as_ref().is_none_or(|c| c.seccomp == "2") {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                if let Some(c) = last {
                    seen.push((pid, c));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    seen
}

#[test]
fn run_when_the_host_is_full_then_insufficient_capacity_and_a_kill_9_restart_keeps_vms() {
    let mut kilnd = Daemon::start(&["--max-microvms", "1"]);
    let scratch = tempfile::tempdir().expect("scratch");
    let stop = std::sync::atomic::AtomicBool::new(false);
    let build_qemus = std::thread::scope(|s| {
        let watcher = s.spawn(|| watch_qemus(&kilnd, &stop));
        counter_image(&kilnd, scratch.path());
        stop.store(true, std::sync::atomic::Ordering::Release);
        watcher.join().expect("watcher")
    });
    let vm = run(&kilnd);
    let id = vm["microvmId"].as_str().unwrap_or_default().to_string();
    let before = kilnd.app_get(&id, "/cgi-bin/count");
    let running = kilnd.qemu_pids();
    let confined_before = common::QemuConfinement::of(running[0], kilnd.home.path());

    let (full, _, full_err) = kilnd.aws(&["run-microvm", "--image-identifier", "counter"]);
    kilnd.crash_and_restart();
    let (_, after_restart, _) = kilnd.aws(&["get-microvm", "--microvm-identifier", &id]);
    let after = kilnd.app_get(&id, "/cgi-bin/count");
    let confined_after = common::QemuConfinement::of(running[0], kilnd.home.path());
    let (still_full, _, _) = kilnd.aws(&["run-microvm", "--image-identifier", "counter"]);
    kilnd.aws(&["terminate-microvm", "--microvm-identifier", &id]);

    // The build VM and the app VM it snapshots, then the launched MicroVM before and after
    // kilnd's restart: each QEMU confined.
    assert!(build_qemus.len() >= 2, "{build_qemus:?}");
    for (pid, confinement) in &build_qemus {
        confinement.assert_confined(&format!("build QEMU {pid}"));
    }
    assert_eq!(running.len(), 1);
    confined_before
        .expect("the MicroVM's QEMU")
        .assert_confined("MicroVM QEMU");
    confined_after
        .expect("the same QEMU after kilnd's restart")
        .assert_confined("MicroVM QEMU after the restart");

    assert_ne!(full, 0);
    assert!(
        full_err.contains("InsufficientCapacityException"),
        "{full_err}"
    );
    assert_eq!(after_restart["state"], "RUNNING");
    assert_eq!((before.trim(), after.trim()), ("101", "102"));
    assert_ne!(still_full, 0);
    assert!(!kilnd.qemu_running());
}

#[test]
fn restart_when_kilnd_is_killed_during_launches_then_each_vm_is_running_or_terminated_and_nothing_leaks(
) {
    let mut kilnd = Daemon::start(&[]);
    let scratch = tempfile::tempdir().expect("scratch");
    counter_image(&kilnd, scratch.path());
    let url = kilnd.url.clone();
    let credentials = kilnd.credentials();

    let launches: Vec<_> = (0..3)
        .map(|_| {
            let url = url.clone();
            let credentials = credentials.clone();
            std::thread::spawn(move || {
                common::aws_cli(&credentials)
                    .args([
                        "lambda-microvms",
                        "run-microvm",
                        "--image-identifier",
                        "counter",
                    ])
                    .args(["--endpoint-url", &url, "--region", "us-east-1"])
                    .output()
            })
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(900));
    kilnd.crash_and_restart();
    for l in launches {
        let _ = l.join();
    }
    let (_, listed, _) = kilnd.aws(&["list-microvms"]);
    let vms: Vec<(String, String)> = listed["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| {
            (
                v["microvmId"].as_str().unwrap_or_default().to_string(),
                v["state"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let running: Vec<&String> = vms
        .iter()
        .filter(|(_, s)| s == "RUNNING")
        .map(|(id, _)| id)
        .collect();
    let answers: Vec<String> = running
        .iter()
        .map(|id| kilnd.app_get(id, "/cgi-bin/count"))
        .collect();
    let qemus = kilnd.qemu_count();
    for id in &running {
        kilnd.aws(&["terminate-microvm", "--microvm-identifier", id]);
    }

    assert!(
        vms.iter().all(|(_, s)| s == "RUNNING" || s == "TERMINATED"),
        "{vms:?}"
    );
    assert_eq!(qemus, running.len(), "{vms:?}");
    assert!(answers.iter().all(|a| a.trim() == "101"), "{answers:?}");
    assert!(!kilnd.qemu_running());
    assert_eq!(
        std::fs::read_dir(kilnd.home.path().join("microvms"))
            .map(|d| d.count())
            .unwrap_or(0),
        0
    );
}

/// A 5-minute token for port 8080 of `id`.
fn token(kilnd: &Daemon, id: &str) -> String {
    kilnd.token_as(&kilnd.credentials(), id)
}

/// `"<status> <body>"` of a GET through the MicroVM's HTTPS endpoint.
fn endpoint_get(kilnd: &Daemon, id: &str, token: &str, path: &str) -> String {
    let ca = kilnd.home.path().join("tls/ca.pem").display().to_string();
    python(
        kilnd,
        &[
            "get",
            &kilnd.endpoint_port.to_string(),
            &ca,
            id,
            path,
            token,
        ],
    )
    .1
}

/// Runs `endpoint_client.py <args>` (its boto3 signs as admin): (success, output).
fn python(kilnd: &Daemon, args: &[&str]) -> (bool, String) {
    let out = kilnd
        .python()
        .arg(common::workspace().join("crates/kilnd/tests/endpoint_client.py"))
        .args(args)
        .output()
        .expect("run python");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn endpoint_when_aws_cli_and_boto3_issue_tokens_then_https_reaches_only_the_right_vm_and_port() {
    let kilnd = Daemon::start(&[]);
    let scratch = tempfile::tempdir().expect("scratch");
    counter_image(&kilnd, scratch.path());
    let ca = kilnd.home.path().join("tls/ca.pem").display().to_string();
    let port = kilnd.endpoint_port.to_string();

    let vm = run(&kilnd);
    let id = vm["microvmId"].as_str().unwrap_or_default().to_string();
    let (code, token, err) = kilnd.aws(&[
        "create-microvm-auth-token",
        "--microvm-identifier",
        &id,
        "--expiration-in-minutes",
        "5",
        "--allowed-ports",
        r#"[{"range": {"startPort": 8000, "endPort": 8999}}]"#,
    ]);
    let token = token["authToken"]["X-aws-proxy-auth"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let (_, ok) = python(&kilnd, &["get", &port, &ca, &id, "/cgi-bin/count", &token]);
    let details: serde_json::Value =
        serde_json::from_str(&kilnd.get(&format!("/kiln/v1/microvms/{id}"))).expect("details");
    let (_, other_port) = python(&kilnd, &["get", &port, &ca, &id, "/", &token, "9000"]);
    let (_, nothing_there) = python(&kilnd, &["get", &port, &ca, &id, "/", &token, "8081"]);
    kilnd.aws(&["terminate-microvm", "--microvm-identifier", &id]);
    let (flow_ok, flow) = python(&kilnd, &["flow", &kilnd.url, &port, &ca, "counter"]);

    assert_eq!(code, 0, "{err}");
    assert_eq!(ok.trim(), "200 101");
    assert_eq!(details["activity"]["requests"], 1, "{details}");
    assert!(
        details["kernel"]
            .as_str()
            .unwrap_or_default()
            .contains("cloud-amd64"),
        "{details}"
    );
    assert!(other_port.starts_with("403"), "{other_port}");
    assert!(nothing_there.starts_with("502"), "{nothing_there}");
    assert!(flow_ok, "{flow}");
    assert!(!kilnd.qemu_running());
}

#[test]
fn run_when_ten_launch_at_once_then_each_succeeds_or_fails_cleanly_and_max_duration_ends_them() {
    // Host capacity is under test here, not the API rate (RunMicrovm: 5 a second).
    let kilnd = Daemon::start(&["--max-microvms", "4", "--throttle", "RunMicrovm=0"]);
    let scratch = tempfile::tempdir().expect("scratch");
    counter_image(&kilnd, scratch.path());

    let results: Vec<(i32, serde_json::Value, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..10)
            .map(|_| {
                s.spawn(|| {
                    kilnd.aws(&[
                        "run-microvm",
                        "--image-identifier",
                        "counter",
                        "--maximum-duration-in-seconds",
                        "15",
                    ])
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    let launched: Vec<String> = results
        .iter()
        .filter(|(code, _, _)| *code == 0)
        .map(|(_, v, _)| v["microvmId"].as_str().unwrap_or_default().to_string())
        .collect();
    let refused = results
        .iter()
        .filter(|(code, _, err)| *code != 0 && err.contains("InsufficientCapacityException"))
        .count();
    let answers: Vec<String> = launched
        .iter()
        .map(|id| kilnd.app_get(id, "/cgi-bin/count"))
        .collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let ended: Vec<serde_json::Value> = loop {
        let states: Vec<serde_json::Value> = launched
            .iter()
            .map(|id| kilnd.aws(&["get-microvm", "--microvm-identifier", id]).1)
            .collect();
        if states.iter().all(|v| v["state"] == "TERMINATED") || std::time::Instant::now() > deadline
        {
            break states;
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
    };

    assert_eq!(launched.len(), 4, "{results:?}");
    assert_eq!(refused, 6, "{results:?}");
    assert!(answers.iter().all(|a| a.trim() == "101"), "{answers:?}");
    assert!(
        ended.iter().all(|v| v["state"] == "TERMINATED"),
        "{ended:?}"
    );
    assert!(
        ended
            .iter()
            .all(|v| v["stateReason"] == "maximum duration reached"),
        "{ended:?}"
    );
    assert!(!kilnd.qemu_running());
}

/// A figure of kilnd's `/metrics` (0 when absent).
fn metric(kilnd: &Daemon, name: &str) -> f64 {
    common::http_get(&kilnd.url, "/metrics")
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Polls until `metric` reads `want` (60 s at most); what it read last.
fn wait_metric(kilnd: &Daemon, name: &str, want: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = metric(kilnd, name);
        if v == want || Instant::now() > deadline {
            return v;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The `/etc/machine-id` the checked counter image is built with.
const BUILT_MACHINE_ID: &str = "5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a";

/// The counter app with a HEALTHCHECK that GETs `/cgi-bin/check`, which appends a line to
/// `/www/checks` (served as a file: reading it runs nothing), and `/cgi-bin/names`, which
/// answers the guest's hostname and machine id; built with [`BUILT_MACHINE_ID`].
fn checked_counter_image(kilnd: &Daemon, dir: &std::path::Path) {
    let zip = dir.join("checked.zip");
    let app = common::COUNTER_APP.replace(
        "exec httpd",
        "cat > /www/cgi-bin/check <<'CGI'\n\
         #!/bin/sh\n\
         echo checked >> /www/checks\n\
         printf 'Content-Type: text/plain\\r\\n\\r\\nok\\n'\n\
         CGI\n\
         chmod +x /www/cgi-bin/check\n\
         cat > /www/cgi-bin/names <<'CGI'\n\
         #!/bin/sh\n\
         printf 'Content-Type: text/plain\\r\\n\\r\\n%s %s\\n' \"$(hostname)\" \"$(cat /etc/machine-id)\"\n\
         CGI\n\
         chmod +x /www/cgi-bin/names\n\
         exec httpd",
    );
    let dockerfile = format!(
        "FROM kiln/busybox\nRUN echo {BUILT_MACHINE_ID} > /etc/machine-id\n\
         COPY app.sh /\nEXPOSE 8080\n\
         HEALTHCHECK CMD wget -q -O /dev/null http://127.0.0.1:8080/cgi-bin/check\n\
         CMD [\"/bin/sh\", \"/app.sh\"]\n"
    );
    make_zip(
        &zip,
        &[
            ("Dockerfile", dockerfile.as_bytes(), 0o644),
            ("app.sh", app.as_bytes(), 0o755),
        ],
    );
    let (code, _, err) = kilnd.create_image("counter", &zip);
    assert_eq!(code, 0, "{err}");
    let v = kilnd.wait_version("counter", "1");
    assert_eq!(v["state"], "SUCCESSFUL", "{v}");
}

#[test]
fn warm_pool_when_a_version_is_in_use_then_launches_take_paused_vms_it_refills_and_empties() {
    // One pooled VM whatever the launch rate, so the figures below are exact.
    let kilnd = Daemon::start(&["--warm-pool", "1", "--warm-pool-max", "1"]);
    let scratch = tempfile::tempdir().expect("scratch");
    checked_counter_image(&kilnd, scratch.path());
    let idle_before_use = kilnd.qemu_count();

    // The first launch restores the snapshot and puts the version in use; the pool fills.
    let a = run(&kilnd);
    let pooled_after_first = wait_metric(&kilnd, "kiln_warm_pool_microvms", 1.0);
    let qemus_with_pool = kilnd.qemu_count();
    // The second takes the pooled VM: a session of its own, fresh from the snapshot.
    let b = run(&kilnd);
    let from_pool = metric(&kilnd, "kiln_microvm_launches_from_pool_total");
    let warmed = metric(&kilnd, r#"kiln_warm_pool_warmups_total{result="ok"}"#);
    let (id_a, id_b) = (
        a["microvmId"].as_str().unwrap_or_default(),
        b["microvmId"].as_str().unwrap_or_default(),
    );
    let first_a = endpoint_get(&kilnd, id_a, &token(&kilnd, id_a), "/cgi-bin/count");
    let second_a = endpoint_get(&kilnd, id_a, &token(&kilnd, id_a), "/cgi-bin/count");
    let first_b = endpoint_get(&kilnd, id_b, &token(&kilnd, id_b), "/cgi-bin/count");
    let checks_a = endpoint_get(&kilnd, id_a, &token(&kilnd, id_a), "/checks");
    let checks_b = endpoint_get(&kilnd, id_b, &token(&kilnd, id_b), "/checks");
    let names_a = endpoint_get(&kilnd, id_a, &token(&kilnd, id_a), "/cgi-bin/names");
    let names_b = endpoint_get(&kilnd, id_b, &token(&kilnd, id_b), "/cgi-bin/names");
    let refilled = wait_metric(&kilnd, "kiln_warm_pool_microvms", 1.0);
    let (_, listed, _) = kilnd.aws(&["list-microvms"]);
    // Retiring the version empties its pool; nothing stays admitted.
    kilnd.aws(&["terminate-microvm", "--microvm-identifier", id_a]);
    kilnd.aws(&["terminate-microvm", "--microvm-identifier", id_b]);
    let (retired, _, retire_err) = kilnd.aws(&[
        "update-microvm-image-version",
        "--image-identifier",
        "counter",
        "--image-version",
        "1",
        "--status",
        "INACTIVE",
    ]);
    let emptied = wait_metric(&kilnd, "kiln_warm_pool_microvms", 0.0);
    let admitted = wait_metric(&kilnd, "kiln_admitted_microvms", 0.0);
    let deadline = Instant::now() + Duration::from_secs(20);
    while kilnd.qemu_running() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }

    assert_eq!(
        idle_before_use, 0,
        "nothing is pooled before a version is used"
    );
    assert_eq!(pooled_after_first, 1.0);
    assert_eq!(qemus_with_pool, 2, "the launched VM and the pooled one");
    assert_eq!(
        (a["state"].as_str(), b["state"].as_str()),
        (Some("RUNNING"), Some("RUNNING"))
    );
    assert_ne!(id_a, id_b);
    assert_eq!(from_pool, 1.0, "the second launch took the pooled VM");
    assert!(
        warmed >= 1.0,
        "the pooled VM's guest was warmed before it was paused"
    );
    assert_eq!(
        (first_a.trim(), second_a.trim(), first_b.trim()),
        ("200 101", "200 102", "200 101"),
        "each session has its own app state, and the warm-up sent the app's routes nothing"
    );
    let checks = |answer: &str| answer.matches("checked").count();
    assert!(
        checks(&checks_a) >= 1 && checks_a.starts_with("200"),
        "the build ran the HEALTHCHECK until it passed: {checks_a}"
    );
    assert_eq!(
        checks(&checks_b),
        checks(&checks_a) + 1,
        "the pool ran the image's HEALTHCHECK once more before pausing its VM (it warms the \
         app's request path), and nothing else: {checks_a} / {checks_b}"
    );
    // Two clones of one snapshot, one launched and one pooled, each named for itself.
    let names = |answer: &str| -> (String, String) {
        let mut words = answer.split_whitespace().skip(1);
        let mut next = || words.next().unwrap_or_default().to_string();
        (next(), next())
    };
    let ((host_a, machine_a), (host_b, machine_b)) = (names(&names_a), names(&names_b));
    assert_eq!(
        (host_a.as_str(), host_b.as_str()),
        (id_a, id_b),
        "a guest's hostname is its MicroVM's id: {names_a} / {names_b}"
    );
    assert!(
        machine_a.len() == 32 && machine_b.len() == 32 && machine_a != machine_b,
        "each MicroVM has a machine id of its own: {names_a} / {names_b}"
    );
    assert!(
        machine_a != BUILT_MACHINE_ID && machine_b != BUILT_MACHINE_ID,
        "not the one the build wrote: {names_a} / {names_b}"
    );
    assert_eq!(
        refilled, 1.0,
        "the pool refills after a launch takes from it"
    );
    // A pooled VM is no one's MicroVM: the list shows the two launched ones only.
    assert_eq!(
        listed["items"].as_array().map(Vec::len),
        Some(2),
        "{listed}"
    );
    assert_eq!(retired, 0, "{retire_err}");
    assert_eq!(emptied, 0.0, "an INACTIVE version's pool is emptied");
    assert_eq!(admitted, 0.0, "nothing stays admitted");
    assert!(!kilnd.qemu_running(), "no QEMU left");
}

#[test]
fn suspend_when_qemu_was_killed_then_a_conflict_not_a_retry_and_the_microvm_ends_with_a_reason() {
    let kilnd = Daemon::start(&[]);
    let scratch = tempfile::tempdir().expect("scratch");
    counter_image(&kilnd, scratch.path());
    let vm = run(&kilnd);
    let id = vm["microvmId"].as_str().unwrap_or_default().to_string();
    for pid in kilnd.qemu_pids() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while kilnd.qemu_running() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }

    let (code, _, err) = kilnd.aws(&["suspend-microvm", "--microvm-identifier", &id]);
    let (_, got, _) = kilnd.aws(&["get-microvm", "--microvm-identifier", &id]);

    assert_ne!(code, 0);
    assert!(
        err.contains("ConflictException") && err.contains("TERMINATED"),
        "{err}"
    );
    assert_eq!(got["state"], "TERMINATED", "{got}");
    assert!(
        got["stateReason"]
            .as_str()
            .is_some_and(|r| r.contains("ended while suspending")),
        "{got}"
    );
}

/// An app whose hooks listener (port 9000) logs every request where its web server shows it;
/// with `HOOKS=once` it answers only the first request (the build's `ready` call), so its
/// snapshot has no listener left for the run hook. A run payload saying `refuse-next` makes
/// it answer 500 to every later hook.
const HOOKS_APP: &str = "#!/bin/sh
mkdir -p /www
answer() {
  status='200 OK'; grep -q refuse-next /www/hooks.log 2>/dev/null && status='500 Refused'
  printf \"HTTP/1.0 $status\\r\\nContent-Length: 2\\r\\n\\r\\nok\" | nc -l -p 9000 >> /www/hooks.log
}
if [ \"$HOOKS\" = once ]; then (answer) & else (while true; do answer; done) & fi
exec httpd -f -p 8080 -h /www
";

#[test]
fn run_when_the_run_hook_is_enabled_then_it_gets_the_payload_and_a_dead_or_failing_hook_ends_the_microvm(
) {
    let kilnd = Daemon::start(&[]);
    let scratch = tempfile::tempdir().expect("scratch");
    let zip = scratch.path().join("hooks.zip");
    make_zip(
        &zip,
        &[
            (
                "Dockerfile",
                b"FROM kiln/busybox\nCOPY app.sh /\nCMD [\"/bin/sh\", \"/app.sh\"]\n",
                0o644,
            ),
            ("app.sh", HOOKS_APP.as_bytes(), 0o755),
        ],
    );
    let uri = format!("file://{}", zip.display());
    let create = |name: &str, env: &str| {
        kilnd.create_image_with(
            &kilnd.credentials(),
            name,
            &uri,
            &[
                "--environment-variables",
                env,
                "--hooks",
                "port=9000,microvmHooks={run=ENABLED,runTimeoutInSeconds=10,resume=ENABLED,\
                 resumeTimeoutInSeconds=10,terminate=ENABLED},microvmImageHooks={ready=ENABLED}",
            ],
        )
    };
    create("hooked", "HOOKS=always");
    create("deaf", "HOOKS=once");
    kilnd.wait_version("hooked", "1");
    kilnd.wait_version("deaf", "1");

    let (code, vm, err) = kilnd.aws(&[
        "run-microvm",
        "--image-identifier",
        "hooked",
        "--run-hook-payload",
        r#"{"session":"s-42","secret":"only-at-run"}"#,
    ]);
    let id = vm["microvmId"].as_str().unwrap_or_default().to_string();
    let log = endpoint_get(&kilnd, &id, &token(&kilnd, &id), "/hooks.log");
    let (deaf_code, _, deaf_err) = kilnd.aws(&["run-microvm", "--image-identifier", "deaf"]);
    let (_, listed, _) = kilnd.aws(&["list-microvms", "--image-identifier", "deaf"]);
    let deaf_id = listed["items"][0]["microvmId"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let (_, deaf_vm, _) = kilnd.aws(&["get-microvm", "--microvm-identifier", &deaf_id]);
    kilnd.aws(&["terminate-microvm", "--microvm-identifier", &id]);
    // A session whose app refuses to come back: its resume hook answers 500.
    let (_, refusing, _) = kilnd.aws(&[
        "run-microvm",
        "--image-identifier",
        "hooked",
        "--run-hook-payload",
        "refuse-next",
    ]);
    let refusing = refusing["microvmId"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let (s, _, s_err) = kilnd.aws(&["suspend-microvm", "--microvm-identifier", &refusing]);
    let (r, _, r_err) = kilnd.aws(&["resume-microvm", "--microvm-identifier", &refusing]);
    let (_, refused, _) = kilnd.aws(&["get-microvm", "--microvm-identifier", &refusing]);

    assert_eq!(code, 0, "{err}");
    assert!(
        log.contains("POST /aws/lambda-microvms/runtime/v1/run"),
        "{log}"
    );
    // AWS's contract: the MicroVM's id and the payload as the caller gave it, a string.
    let body = serde_json::json!({
        "microvmId": id,
        "runHookPayload": r#"{"session":"s-42","secret":"only-at-run"}"#,
    });
    assert!(log.contains(&body.to_string()), "{log}");
    assert_ne!(deaf_code, 0);
    assert!(deaf_err.contains("run hook"), "{deaf_err}");
    assert_eq!(deaf_vm["state"], "TERMINATED");
    assert!(
        deaf_vm["stateReason"]
            .as_str()
            .unwrap_or_default()
            .contains("run hook"),
        "{deaf_vm}"
    );
    assert_eq!(s, 0, "{s_err}");
    assert_ne!(r, 0);
    assert!(r_err.contains("resume hook answered 500"), "{r_err}");
    assert_eq!(refused["state"], "TERMINATED", "{refused}");
    assert!(
        refused["stateReason"]
            .as_str()
            .is_some_and(|r| r.contains("resume hook")),
        "{refused}"
    );
    assert!(!kilnd.qemu_running());
}

#[test]
fn suspend_when_requested_then_qemu_exits_and_a_request_or_resume_brings_the_same_session_back() {
    let kilnd = Daemon::start(&[]);
    let scratch = tempfile::tempdir().expect("scratch");
    counter_image(&kilnd, scratch.path());
    let (code, vm, err) = run_counter_with_idle(
        &kilnd,
        "maxIdleDurationSeconds=600,suspendedDurationSeconds=600,autoResumeEnabled=true",
    );
    let id = vm["microvmId"].as_str().unwrap_or_default().to_string();
    let tok = token(&kilnd, &id);
    let first = endpoint_get(&kilnd, &id, &tok, "/cgi-bin/count");

    let (s1, _, s1_err) = kilnd.aws(&["suspend-microvm", "--microvm-identifier", &id]);
    let (_, suspended, _) = kilnd.aws(&["get-microvm", "--microvm-identifier", &id]);
    let qemus_while_suspended = kilnd.qemu_count();
    let held = endpoint_get(&kilnd, &id, &tok, "/cgi-bin/count");
    let (_, after_held, _) = kilnd.aws(&["get-microvm", "--microvm-identifier", &id]);
    kilnd.aws(&["suspend-microvm", "--microvm-identifier", &id]);
    let (r, _, r_err) = kilnd.aws(&["resume-microvm", "--microvm-identifier", &id]);
    let (r_again, _, _) = kilnd.aws(&["resume-microvm", "--microvm-identifier", &id]);
    let third = endpoint_get(&kilnd, &id, &tok, "/cgi-bin/count");
    kilnd.aws(&["terminate-microvm", "--microvm-identifier", &id]);

    assert_eq!(code, 0, "{err}");
    assert_eq!(first.trim(), "200 101");
    assert_eq!(s1, 0, "{s1_err}");
    assert_eq!(suspended["state"], "SUSPENDED");
    assert_eq!(qemus_while_suspended, 0);
    assert_eq!(held.trim(), "200 102");
    assert_eq!(after_held["state"], "RUNNING");
    assert_eq!((r, r_again), (0, 0), "{r_err}");
    assert_eq!(third.trim(), "200 103");
    assert!(!kilnd.qemu_running());
    assert_eq!(
        std::fs::read_dir(kilnd.home.path().join("microvms"))
            .map(|d| d.count())
            .unwrap_or(0),
        0
    );
}

/// Polls a MicroVM until it reaches `state` (or 90 s pass); returns its description.
fn wait_state(kilnd: &Daemon, id: &str, state: &str) -> serde_json::Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    loop {
        let (_, vm, _) = kilnd.aws(&["get-microvm", "--microvm-identifier", id]);
        if vm["state"] == state || std::time::Instant::now() > deadline {
            return vm;
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

#[test]
fn idle_policy_when_no_traffic_then_suspends_then_terminates_after_the_suspended_duration() {
    let kilnd = Daemon::start(&["--min-idle-seconds", "2"]);
    let scratch = tempfile::tempdir().expect("scratch");
    counter_image(&kilnd, scratch.path());
    let (code, vm, err) = run_counter_with_idle(
        &kilnd,
        "maxIdleDurationSeconds=3,suspendedDurationSeconds=8,autoResumeEnabled=true",
    );
    let id = vm["microvmId"].as_str().unwrap_or_default().to_string();
    let tok = token(&kilnd, &id);

    let idle = wait_state(&kilnd, &id, "SUSPENDED");
    let woken = endpoint_get(&kilnd, &id, &tok, "/cgi-bin/count");
    let again = wait_state(&kilnd, &id, "SUSPENDED");
    let ended = wait_state(&kilnd, &id, "TERMINATED");
    let (too_short, _, too_short_err) = kilnd.aws(&[
        "run-microvm",
        "--image-identifier",
        "counter",
        "--idle-policy",
        "maxIdleDurationSeconds=1,suspendedDurationSeconds=0,autoResumeEnabled=false",
    ]);

    assert_eq!(code, 0, "{err}");
    assert_eq!(idle["state"], "SUSPENDED", "{idle}");
    assert_eq!(woken.trim(), "200 101");
    assert_eq!(again["state"], "SUSPENDED", "{again}");
    assert_eq!(ended["state"], "TERMINATED", "{ended}");
    assert!(
        ended["stateReason"]
            .as_str()
            .unwrap_or_default()
            .contains("suspendedDurationSeconds"),
        "{ended}"
    );
    assert_ne!(too_short, 0);
    assert!(
        too_short_err.contains("ValidationException"),
        "{too_short_err}"
    );
    assert!(!kilnd.qemu_running());
}

#[test]
fn crash_when_kilnd_dies_at_each_step_of_suspend_resume_and_terminate_then_the_session_is_whole_once(
) {
    let mut kilnd = Daemon::start(&[]);
    let scratch = tempfile::tempdir().expect("scratch");
    counter_image(&kilnd, scratch.path());
    let (code, vm, err) = run_counter_with_idle(
        &kilnd,
        "maxIdleDurationSeconds=600,suspendedDurationSeconds=600,autoResumeEnabled=false",
    );
    let id = vm["microvmId"].as_str().unwrap_or_default().to_string();
    let tok = token(&kilnd, &id);
    let first = endpoint_get(&kilnd, &id, &tok, "/cgi-bin/count");
    let suspended_dir = kilnd
        .home
        .path()
        .join("microvms")
        .join(&id)
        .join("suspended");
    let wait = std::time::Duration::from_secs(60);
    let mut seen = Vec::new();

    // Stream saved, not yet published: the guest must continue.
    kilnd.restart_crashing_at(Some("suspend-saved"));
    kilnd.aws(&["suspend-microvm", "--microvm-identifier", &id]);
    let died_saving = kilnd.exits_within(wait);
    kilnd.restart_crashing_at(Some("suspend-published"));
    seen.push(kilnd.aws(&["get-microvm", "--microvm-identifier", &id]).1);
    let after_saved = endpoint_get(&kilnd, &id, &tok, "/cgi-bin/count");
    // Published, QEMU not yet gone: the suspended directory is the session.
    kilnd.aws(&["suspend-microvm", "--microvm-identifier", &id]);
    let died_publishing = kilnd.exits_within(wait);
    kilnd.restart_crashing_at(Some("resume-loading"));
    seen.push(kilnd.aws(&["get-microvm", "--microvm-identifier", &id]).1);
    let qemus_after_published = kilnd.qemu_count();
    // A resume that never loaded the state: still suspended.
    kilnd.aws(&["resume-microvm", "--microvm-identifier", &id]);
    let died_loading = kilnd.exits_within(wait);
    kilnd.restart_crashing_at(Some("resume-running"));
    seen.push(kilnd.aws(&["get-microvm", "--microvm-identifier", &id]).1);
    let qemus_after_loading = kilnd.qemu_count();
    // The resumed guest runs: it is the session, the suspended copy goes.
    kilnd.aws(&["resume-microvm", "--microvm-identifier", &id]);
    let died_running = kilnd.exits_within(wait);
    kilnd.restart_crashing_at(None);
    seen.push(kilnd.aws(&["get-microvm", "--microvm-identifier", &id]).1);
    let qemus_at_end = kilnd.qemu_count();
    let last = endpoint_get(&kilnd, &id, &tok, "/cgi-bin/count");
    let stale_copy = suspended_dir.exists();
    // Through builds, launches, suspends, resumes and restarts, KILN_HOME stays kilnd's alone.
    let open_dirs = kiln_vmm::home::open_dirs(kilnd.home.path());
    // Killed while terminating (TERMINATING recorded, QEMU not yet stopped): the restart
    // finishes the job.
    kilnd.restart_crashing_at(Some("terminate-stopping"));
    kilnd.aws(&["terminate-microvm", "--microvm-identifier", &id]);
    let died_terminating = kilnd.exits_within(wait);
    kilnd.restart_crashing_at(None);
    let ended = kilnd.aws(&["get-microvm", "--microvm-identifier", &id]).1;
    let vm_dir_left = suspended_dir.parent().is_some_and(|d| d.exists());

    assert_eq!(code, 0, "{err}");
    assert!(died_terminating, "the crash point before QEMU stops");
    assert_eq!(ended["state"], "TERMINATED", "{ended}");
    assert!(
        ended["stateReason"]
            .as_str()
            .unwrap_or_default()
            .contains("stopping"),
        "{ended}"
    );
    assert!(!vm_dir_left);
    assert_eq!(first.trim(), "200 101");
    assert!(died_saving && died_publishing && died_loading && died_running);
    assert!(
        open_dirs.is_empty(),
        "directories others can enter: {open_dirs:?}"
    );
    let states: Vec<_> = seen.iter().map(|v| v["state"].clone()).collect();
    assert_eq!(
        states,
        ["RUNNING", "SUSPENDED", "SUSPENDED", "RUNNING"],
        "{seen:?}"
    );
    assert!(
        seen[0]["stateReason"]
            .as_str()
            .unwrap_or_default()
            .contains("during a suspend"),
        "{}",
        seen[0]
    );
    assert_eq!(after_saved.trim(), "200 102");
    assert_eq!((qemus_after_published, qemus_after_loading), (0, 0));
    assert_eq!(qemus_at_end, 1);
    assert_eq!(last.trim(), "200 103");
    assert!(!stale_copy);
    assert!(!kilnd.qemu_running());
}

/// Answers one hook request on stdin/stdout (busybox `nc -ll -e`), logging it where the web
/// server shows it; on `terminate` it also sends the log to the address named by `host` and
/// `notify` in the run payload (the test's private service, reached through an operator
/// egress connector), since the guest is gone right after.
const HOOK_HANDLER: &str = r#"#!/bin/sh
read -r method path rest
len=0
while read -r line; do
  line=$(printf '%s' "$line" | tr -d '\r')
  [ -z "$line" ] && break
  case "$line" in [Cc]ontent-[Ll]ength:*) len=${line#*:}; len=${len# } ;; esac
done
body=$(head -c "$len")
echo "$method $path $body" >> /www/hooks.log
case "$path" in
  */terminate)
    port=$(sed -n 's/.*notify[^0-9]*\([0-9][0-9]*\).*/\1/p' /www/hooks.log | head -n 1)
    host=$(sed -n 's/.*host[^0-9]*\([0-9][0-9.]*\).*/\1/p' /www/hooks.log | head -n 1)
    [ -n "$port" ] && nc -w 5 "$host" "$port" < /www/hooks.log ;;
esac
printf 'HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok'
"#;

#[test]
fn hooks_when_a_session_suspends_resumes_and_ends_then_each_hook_is_called_once_in_order() {
    let kilnd = Daemon::start(&[]);
    let scratch = tempfile::tempdir().expect("scratch");
    let zip = scratch.path().join("session.zip");
    let app = format!(
        "{}nc -ll -p 9000 -e /hook.sh &\nexec httpd -f -p 8080 -h /www\n",
        common::COUNTER_APP.trim_end_matches("exec httpd -f -p 8080 -h /www\n")
    );
    make_zip(
        &zip,
        &[
            (
                "Dockerfile",
                b"FROM kiln/busybox\nCOPY app.sh hook.sh /\nCMD [\"/bin/sh\", \"/app.sh\"]\n",
                0o644,
            ),
            ("app.sh", app.as_bytes(), 0o755),
            ("hook.sh", HOOK_HANDLER.as_bytes(), 0o755),
        ],
    );
    let (c, _, e) = kilnd.aws(&[
        "create-microvm-image",
        "--name",
        "session",
        "--base-image-arn",
        "arn:aws:lambda:local:aws:microvm-image:busybox",
        "--build-role-arn",
        "arn:aws:iam::000000000000:role/kiln-build",
        "--code-artifact",
        &format!("uri=file://{}", zip.display()),
        "--resources",
        "minimumMemoryInMiB=512",
        "--hooks",
        "port=9000,microvmHooks={run=ENABLED,runTimeoutInSeconds=10,suspend=ENABLED,\
         suspendTimeoutInSeconds=10,resume=ENABLED,resumeTimeoutInSeconds=10,\
         terminate=ENABLED,terminateTimeoutInSeconds=10},microvmImageHooks={ready=ENABLED}",
    ]);
    assert_eq!(c, 0, "{e}");
    assert_eq!(kilnd.wait_version("session", "1")["state"], "SUCCESSFUL");
    let service = common::PrivateService::new();
    let notify = 7070;
    let host = service.addrs[0];
    service.listen(host, notify, b"");
    let (status, _, body) = kilnd.request(
        &kilnd.admin_key(),
        "POST",
        "/kiln/v1/connectors",
        format!(r#"{{"name":"hook-sink","allow":["{host}/32:{notify}"]}}"#).as_bytes(),
    );
    assert_eq!(status, 201, "{body}");

    let (code, vm, err) = kilnd.aws(&[
        "run-microvm",
        "--image-identifier",
        "session",
        "--idle-policy",
        "maxIdleDurationSeconds=600,suspendedDurationSeconds=600,autoResumeEnabled=true",
        "--egress-network-connectors",
        "hook-sink",
        "--run-hook-payload",
        &format!(r#"{{"notify":{notify},"host":"{host}","secret":"s-7"}}"#),
    ]);
    let id = vm["microvmId"].as_str().unwrap_or_default().to_string();
    let tok = token(&kilnd, &id);
    let (s, _, s_err) = kilnd.aws(&["suspend-microvm", "--microvm-identifier", &id]);
    let answers: Vec<String> = std::thread::scope(|scope| {
        let calls: Vec<_> = (0..10)
            .map(|_| scope.spawn(|| endpoint_get(&kilnd, &id, &tok, "/cgi-bin/count")))
            .collect();
        calls
            .into_iter()
            .map(|c| c.join().unwrap_or_default())
            .collect()
    });
    let (t, _, t_err) = kilnd.aws(&["terminate-microvm", "--microvm-identifier", &id]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while service.seen(host, notify).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = service
        .seen(host, notify)
        .first()
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .unwrap_or_default();

    assert_eq!(code, 0, "{err}");
    assert_eq!((s, t), (0, 0), "{s_err}{t_err}");
    assert!(answers.iter().all(|a| a.starts_with("200 ")), "{answers:?}");
    // The build's ready call comes first (in the image's snapshot); then the session's.
    let (ready, calls): (Vec<&str>, Vec<&str>) =
        log.lines().partition(|l| l.contains("/runtime/v1/ready"));
    assert!(!ready.is_empty(), "{log}");
    assert_eq!(calls.len(), 4, "{log}");
    let run = serde_json::json!({
        "microvmId": id,
        "runHookPayload": format!(r#"{{"notify":{notify},"host":"{host}","secret":"s-7"}}"#),
    });
    assert_eq!(
        calls[0],
        format!("POST /aws/lambda-microvms/runtime/v1/run {run}")
    );
    assert_eq!(calls[1], "POST /aws/lambda-microvms/runtime/v1/suspend {}");
    assert_eq!(calls[2], "POST /aws/lambda-microvms/runtime/v1/resume {}");
    assert_eq!(
        calls[3],
        "POST /aws/lambda-microvms/runtime/v1/terminate {}"
    );
    assert!(!kilnd.qemu_running());
}

/// An app whose CGI counts in `/run/app/state` and shows `/tmp/seed`, both made by the
/// Dockerfile's RUN (the classic `mkdir -p /run/nginx`).
const STATE_APP: &str = "#!/bin/sh
mkdir -p /www/cgi-bin
cat > /www/cgi-bin/state <<'CGI'
#!/bin/sh
n=$(cat /run/app/state); n=$((n+1)); echo $n > /run/app/state
printf 'Content-Type: text/plain\\r\\n\\r\\n%s %s\\n' \"$n\" \"$(cat /tmp/seed)\"
CGI
chmod +x /www/cgi-bin/state
exec httpd -f -p 8080 -h /www
";

#[test]
fn image_files_when_run_made_them_under_run_and_tmp_then_the_app_keeps_using_them_across_suspend_and_resume(
) {
    let kilnd = Daemon::start(&[]);
    let scratch = tempfile::tempdir().expect("scratch");
    let zip = scratch.path().join("state.zip");
    make_zip(
        &zip,
        &[
            (
                "Dockerfile",
                b"FROM kiln/busybox\n\
                  RUN mkdir -p /run/app && echo 0 > /run/app/state && echo seed-7 > /tmp/seed\n\
                  COPY app.sh /\nEXPOSE 8080\nCMD [\"/bin/sh\", \"/app.sh\"]\n",
                0o644,
            ),
            ("app.sh", STATE_APP.as_bytes(), 0o755),
        ],
    );
    let (c, _, e) = kilnd.create_image("state", &zip);
    assert_eq!(c, 0, "{e}");
    assert_eq!(kilnd.wait_version("state", "1")["state"], "SUCCESSFUL");

    let (code, vm, err) = kilnd.aws(&[
        "run-microvm",
        "--image-identifier",
        "state",
        "--idle-policy",
        "maxIdleDurationSeconds=600,suspendedDurationSeconds=600,autoResumeEnabled=false",
    ]);
    let id = vm["microvmId"].as_str().unwrap_or_default().to_string();
    let tok = token(&kilnd, &id);
    let first = endpoint_get(&kilnd, &id, &tok, "/cgi-bin/state");
    let second = endpoint_get(&kilnd, &id, &tok, "/cgi-bin/state");
    let (s, _, s_err) = kilnd.aws(&["suspend-microvm", "--microvm-identifier", &id]);
    let (r, _, r_err) = kilnd.aws(&["resume-microvm", "--microvm-identifier", &id]);
    let third = endpoint_get(&kilnd, &id, &tok, "/cgi-bin/state");
    kilnd.aws(&["terminate-microvm", "--microvm-identifier", &id]);

    assert_eq!(code, 0, "{err}");
    assert_eq!(first.trim(), "200 1 seed-7");
    assert_eq!(second.trim(), "200 2 seed-7");
    assert_eq!(s, 0, "{s_err}");
    assert_eq!(r, 0, "{r_err}");
    assert_eq!(third.trim(), "200 3 seed-7");
}

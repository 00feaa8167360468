//! kiln's sandbox API end to end on one image and two MicroVMs (busybox, 512 MiB): commands
//! (output, exit code, stdin, env, cwd, user, timeout, background), files (upload and
//! download of several MiB compared by hash, list, stat, mkdir, move, remove, a tampered
//! upload), app logs (plain, followed, and none kept with `logging: disabled`), a second
//! principal trying every route as an attacker would, and the `kiln` binary's exec, cp and logs.
//!
//! The `kiln` binary is the one built beside kilnd (`cargo build --release --workspace --bins`).

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use common::{Daemon, Key};
use serde_json::{json, Value};

const APP: &str = "#!/bin/sh
mkdir -p /www
echo hi > /www/index.html
( i=0; while true; do i=$((i+1)); echo \"tick $i\"; echo \"tock $i\" >&2; sleep 1; done ) &
exec httpd -f -p 8080 -h /www
";

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

fn unb64(v: &Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(v.as_str().unwrap_or_default())
        .expect("base64")
}

fn sha256_hex(data: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The `kiln` binary beside kilnd.
fn call(kilnd: &Daemon, key: &Key, method: &str, path: &str, body: &Value) -> (u16, Value, String) {
    let bytes = if body.is_null() {
        Vec::new()
    } else {
        body.to_string().into_bytes()
    };
    let (status, _, text) = kilnd.request(key, method, path, &bytes);
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::Null),
        text,
    )
}

/// A foreground exec's events: (stdout, stderr, the exit event, every event type).
fn exec(kilnd: &Daemon, key: &Key, vm: &str, body: Value) -> (String, String, Value, Vec<String>) {
    let (status, _, text) = call(
        kilnd,
        key,
        "POST",
        &format!("/kiln/v1/microvms/{vm}/exec"),
        &body,
    );
    assert_eq!(status, 200, "exec {body}: {text}");
    let (mut out, mut err, mut exit, mut kinds) = (Vec::new(), Vec::new(), Value::Null, Vec::new());
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let event: Value = serde_json::from_str(line).expect("event JSON");
        kinds.push(event["type"].as_str().unwrap_or_default().to_string());
        match event["type"].as_str() {
            Some("stdout") => out.extend(unb64(&event["data"])),
            Some("stderr") => err.extend(unb64(&event["data"])),
            Some("exit") => exit = event,
            _ => {}
        }
    }
    (
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
        exit,
        kinds,
    )
}

/// A PUT upload signed over `signed_body`'s SHA-256 that sends `sent_body` (the same for an
/// honest client).
fn upload_raw(
    kilnd: &Daemon,
    key: &Key,
    path: &str,
    signed_body: &[u8],
    sent_body: &[u8],
) -> (u16, String) {
    use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
    let identity =
        aws_credential_types::Credentials::new(&key.id, &key.secret, None, None, "test").into();
    let params = aws_sigv4::sign::v4::SigningParams::builder()
        .identity(&identity)
        .region("us-east-1")
        .name("lambda")
        .time(SystemTime::now())
        .settings(SigningSettings::default())
        .build()
        .expect("signing params")
        .into();
    let host = kilnd.url.trim_start_matches("http://").to_string();
    let hash = sha256_hex(signed_body);
    let signable = SignableRequest::new(
        "PUT",
        format!("{}{path}", kilnd.url),
        [
            ("host", host.as_str()),
            ("x-amz-content-sha256", hash.as_str()),
        ]
        .into_iter(),
        SignableBody::Precomputed(hash.clone()),
    )
    .expect("signable");
    let (instructions, _) = sign(signable, &params).expect("sign").into_parts();
    let mut headers = vec![
        ("Host".to_string(), host.clone()),
        ("x-amz-content-sha256".to_string(), hash.clone()),
    ];
    headers.extend(
        instructions
            .headers()
            .map(|(n, v)| (n.to_string(), v.to_string())),
    );
    let headers: Vec<(&str, &str)> = headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    let (status, _, text) = common::http_request(&kilnd.url, "PUT", path, &headers, sent_body);
    (status, text)
}

fn run_microvm(kilnd: &Daemon, extra: &[&str]) -> String {
    let mut args = vec!["run-microvm", "--image-identifier", "sbx"];
    args.extend_from_slice(extra);
    let (code, out, err) = kilnd.aws(&args);
    assert_eq!(code, 0, "run-microvm {extra:?}: {err}");
    assert_eq!(out["state"], "RUNNING", "{out}");
    out["microvmId"].as_str().expect("id").to_string()
}

fn highest_tick(text: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.strip_prefix("tick "))
        .filter_map(|n| n.trim().parse().ok())
        .max()
        .unwrap_or(0)
}

#[test]
fn sandbox_when_owner_execs_copies_and_reads_logs_then_all_work_and_another_principal_gets_not_found(
) {
    let kilnd = Daemon::start(&[]);
    let scratch = tempfile::tempdir().expect("scratch");
    kilnd.build_sh_app("sbx", scratch.path(), APP);
    let vm = run_microvm(
        &kilnd,
        &[
            "--ingress-network-connectors",
            "SHELL_INGRESS",
            "HTTP_INGRESS",
        ],
    );
    let quiet = run_microvm(&kilnd, &["--logging", r#"{"disabled": {}}"#]);
    let admin = kilnd.admin_key();
    let admin_creds = kilnd.credentials();
    let (bob, bob_creds) = kilnd.new_principal("bob");

    // --- commands ---
    let (out, err, exit, kinds) = exec(
        &kilnd,
        &admin,
        &vm,
        json!({"argv": ["sh", "-c", "echo out; echo err >&2; exit 3"]}),
    );
    let (piped, _, _, _) = exec(
        &kilnd,
        &admin,
        &vm,
        json!({"argv": ["cat"], "stdin": b64(b"piped data\n")}),
    );
    let (env_cwd, _, _, _) = exec(
        &kilnd,
        &admin,
        &vm,
        json!({"command": "echo $FOO; pwd", "env": {"FOO": "bar baz"}, "cwd": "/tmp"}),
    );
    let (uid, _, _, _) = exec(
        &kilnd,
        &admin,
        &vm,
        json!({"command": "id -u; id -g", "user": "1234:4321"}),
    );
    // Not an E2B sandbox: nothing listens on envd's port, so no guest user reaches one.
    let (envd_probe, _, _, _) = exec(
        &kilnd,
        &admin,
        &vm,
        json!({"command": "wget -q -T 3 -O- http://127.0.0.1:49983/health >/dev/null 2>&1 && echo open || echo closed"}),
    );
    assert_eq!(envd_probe.trim(), "closed", "envd runs in a plain MicroVM");
    let started = Instant::now();
    let (_, _, timed, _) = exec(
        &kilnd,
        &admin,
        &vm,
        json!({"command": "sleep 60", "timeoutSeconds": 1}),
    );
    let timeout_took = started.elapsed();
    let (missing_status, missing, _) = call(
        &kilnd,
        &admin,
        "POST",
        &format!("/kiln/v1/microvms/{vm}/exec"),
        &json!({"argv": ["/no/such/program"]}),
    );

    assert_eq!((out.as_str(), err.as_str()), ("out\n", "err\n"));
    assert_eq!(exit["exitCode"], 3, "{exit}");
    assert_eq!(kinds.first().map(String::as_str), Some("started"));
    assert_eq!(piped, "piped data\n");
    assert_eq!(env_cwd, "bar baz\n/tmp\n");
    assert_eq!(uid, "1234\n4321\n");
    assert_eq!(timed["timedOut"], true, "{timed}");
    assert!(timeout_took < Duration::from_secs(30), "{timeout_took:?}");
    assert_eq!(missing_status, 400, "{missing}");

    // --- background commands ---
    let (status, started, text) = call(
        &kilnd,
        &admin,
        "POST",
        &format!("/kiln/v1/microvms/{vm}/exec"),
        &json!({"command": "for i in 1 2 3; do echo bg $i; sleep 0.2; done; exit 7", "background": true}),
    );
    assert_eq!(status, 201, "{text}");
    let counted = started["execId"].as_str().expect("execId").to_string();
    let (_, sleeper, _) = call(
        &kilnd,
        &admin,
        "POST",
        &format!("/kiln/v1/microvms/{vm}/exec"),
        &json!({"argv": ["sleep", "600"], "background": true}),
    );
    let sleeper = sleeper["execId"].as_str().expect("execId").to_string();
    let (_, finished, _) = call(
        &kilnd,
        &admin,
        "GET",
        &format!("/kiln/v1/microvms/{vm}/execs/{counted}?wait=60"),
        &Value::Null,
    );
    let (_, running, _) = call(
        &kilnd,
        &admin,
        "GET",
        &format!("/kiln/v1/microvms/{vm}/execs"),
        &Value::Null,
    );
    let (kill_status, _, _) = call(
        &kilnd,
        &admin,
        "POST",
        &format!("/kiln/v1/microvms/{vm}/execs/{sleeper}/kill"),
        &Value::Null,
    );
    let (_, killed, _) = call(
        &kilnd,
        &admin,
        "GET",
        &format!("/kiln/v1/microvms/{vm}/execs/{sleeper}?wait=30"),
        &Value::Null,
    );

    assert_eq!(finished["exit"]["exitCode"], 7, "{finished}");
    assert_eq!(
        String::from_utf8_lossy(&unb64(&finished["stdout"])),
        "bg 1\nbg 2\nbg 3\n"
    );
    let listed: Vec<&str> = running["execs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["execId"].as_str())
        .collect();
    assert!(
        listed.contains(&counted.as_str()) && listed.contains(&sleeper.as_str()),
        "{running}"
    );
    assert_eq!(kill_status, 200);
    assert_eq!(killed["exit"]["signal"], 9, "{killed}");

    // --- files ---
    let big: Vec<u8> = (0..(5 << 20) + 12_345u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let local = scratch.path().join("big.bin");
    std::fs::write(&local, &big).expect("write big");
    let (mk_status, _, mk_text) = call(
        &kilnd,
        &admin,
        "POST",
        &format!("/kiln/v1/microvms/{vm}/files/mkdir"),
        &json!({"path": "/srv/a/b", "parents": true}),
    );
    assert_eq!(mk_status, 200, "{mk_text}");
    let up = kilnd.kiln_as(
        &admin_creds,
        &[
            "cp",
            local.to_str().expect("utf-8"),
            &format!("{vm}:/srv/a/"),
        ],
        None,
    );
    assert!(
        up.status.success(),
        "kiln cp up: {}",
        String::from_utf8_lossy(&up.stderr)
    );
    let back = scratch.path().join("back.bin");
    let down = kilnd.kiln_as(
        &admin_creds,
        &[
            "cp",
            &format!("{vm}:/srv/a/big.bin"),
            back.to_str().expect("utf-8"),
        ],
        None,
    );
    assert!(
        down.status.success(),
        "kiln cp down: {}",
        String::from_utf8_lossy(&down.stderr)
    );
    let (guest_sum, _, _, _) = exec(
        &kilnd,
        &admin,
        &vm,
        json!({"argv": ["sha256sum", "/srv/a/big.bin"]}),
    );
    let (_, listing, _) = call(
        &kilnd,
        &admin,
        "GET",
        &format!("/kiln/v1/microvms/{vm}/files/list?path=/srv/a"),
        &Value::Null,
    );
    let (_, stat, _) = call(
        &kilnd,
        &admin,
        "GET",
        &format!("/kiln/v1/microvms/{vm}/files/stat?path=/srv/a/big.bin"),
        &Value::Null,
    );
    let (mv_status, _, mv_text) = call(
        &kilnd,
        &admin,
        "POST",
        &format!("/kiln/v1/microvms/{vm}/files/move"),
        &json!({"from": "/srv/a/big.bin", "to": "/srv/a/b/moved.bin"}),
    );
    let (old_status, _, _) = call(
        &kilnd,
        &admin,
        "GET",
        &format!("/kiln/v1/microvms/{vm}/files/stat?path=/srv/a/big.bin"),
        &Value::Null,
    );
    let (_, moved, _) = call(
        &kilnd,
        &admin,
        "GET",
        &format!("/kiln/v1/microvms/{vm}/files/stat?path=/srv/a/b/moved.bin"),
        &Value::Null,
    );
    let (dir_dl, _, _) = call(
        &kilnd,
        &admin,
        "GET",
        &format!("/kiln/v1/microvms/{vm}/files?path=/srv/a"),
        &Value::Null,
    );

    let back_bytes = std::fs::read(&back).expect("downloaded");
    assert_eq!(back_bytes.len(), big.len());
    assert_eq!(sha256_hex(&back_bytes), sha256_hex(&big));
    assert!(guest_sum.starts_with(&sha256_hex(&big)), "{guest_sum}");
    let names: Vec<(String, String)> = listing["entries"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            (
                e["name"].as_str().unwrap_or_default().into(),
                e["type"].as_str().unwrap_or_default().into(),
            )
        })
        .collect();
    assert_eq!(
        names,
        [
            ("b".to_string(), "dir".to_string()),
            ("big.bin".into(), "file".into())
        ],
        "{listing}"
    );
    assert_eq!(stat["size"], big.len() as u64, "{stat}");
    assert_eq!(stat["mode"], "0644", "{stat}");
    assert_eq!(mv_status, 200, "{mv_text}");
    assert_eq!(old_status, 404);
    assert_eq!(moved["size"], big.len() as u64, "{moved}");
    assert_eq!(dir_dl, 400);

    // A body that is not the one signed is refused and leaves nothing behind.
    let (tampered, tampered_text) = upload_raw(
        &kilnd,
        &admin,
        &format!("/kiln/v1/microvms/{vm}/files?path=/srv/a/evil"),
        b"what was signed",
        b"what was sent instead",
    );
    let (honest, honest_text) = upload_raw(
        &kilnd,
        &admin,
        &format!("/kiln/v1/microvms/{vm}/files?path=/srv/a/ok.txt&mode=0600"),
        b"small file\n",
        b"small file\n",
    );
    let (_, after, _) = call(
        &kilnd,
        &admin,
        "GET",
        &format!("/kiln/v1/microvms/{vm}/files/list?path=/srv/a"),
        &Value::Null,
    );
    let (small, _, _, _) = exec(
        &kilnd,
        &admin,
        &vm,
        json!({"argv": ["cat", "/srv/a/ok.txt"]}),
    );
    assert_eq!(tampered, 400, "{tampered_text}");
    assert_eq!(honest, 201, "{honest_text}");
    let after_names: Vec<&str> = after["entries"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["name"].as_str())
        .collect();
    assert_eq!(after_names, ["b", "ok.txt"], "{after}");
    assert_eq!(small, "small file\n");

    let (rm_status, _, rm_text) = call(
        &kilnd,
        &admin,
        "DELETE",
        &format!("/kiln/v1/microvms/{vm}/files?path=/srv/a"),
        &Value::Null,
    );
    let (gone_status, _, _) = call(
        &kilnd,
        &admin,
        "GET",
        &format!("/kiln/v1/microvms/{vm}/files/stat?path=/srv/a"),
        &Value::Null,
    );
    assert_eq!(rm_status, 200, "{rm_text}");
    assert_eq!(gone_status, 404);

    // --- a second principal, trying everything with the owner's ids ---
    let arn = format!("arn:aws:lambda:us-east-1:000000000000:microvm:{vm}");
    let mut attempts: Vec<(String, u16, String)> = Vec::new();
    for target in [vm.as_str(), arn.as_str()] {
        let tries: Vec<(&str, String, Value)> = vec![
            (
                "POST",
                format!("/kiln/v1/microvms/{target}/exec"),
                json!({"command": "touch /tmp/pwned"}),
            ),
            (
                "POST",
                format!("/kiln/v1/microvms/{target}/exec"),
                json!({"command": "sleep 1", "background": true}),
            ),
            (
                "GET",
                format!("/kiln/v1/microvms/{target}/execs"),
                Value::Null,
            ),
            (
                "GET",
                format!("/kiln/v1/microvms/{target}/execs/{sleeper}"),
                Value::Null,
            ),
            (
                "POST",
                format!("/kiln/v1/microvms/{target}/execs/{counted}/kill"),
                Value::Null,
            ),
            (
                "GET",
                format!("/kiln/v1/microvms/{target}/files?path=/etc/passwd"),
                Value::Null,
            ),
            (
                "GET",
                format!("/kiln/v1/microvms/{target}/files/stat?path=/"),
                Value::Null,
            ),
            (
                "GET",
                format!("/kiln/v1/microvms/{target}/files/list?path=/"),
                Value::Null,
            ),
            (
                "POST",
                format!("/kiln/v1/microvms/{target}/files/mkdir"),
                json!({"path": "/pwned"}),
            ),
            (
                "POST",
                format!("/kiln/v1/microvms/{target}/files/move"),
                json!({"from": "/app.sh", "to": "/pwned"}),
            ),
            (
                "DELETE",
                format!("/kiln/v1/microvms/{target}/files?path=/app.sh"),
                Value::Null,
            ),
            (
                "GET",
                format!("/kiln/v1/microvms/{target}/logs"),
                Value::Null,
            ),
        ];
        for (method, path, body) in tries {
            let (status, _, text) = call(&kilnd, &bob, method, &path, &body);
            attempts.push((format!("{method} {path}"), status, text));
        }
        let (status, text) = upload_raw(
            &kilnd,
            &bob,
            &format!("/kiln/v1/microvms/{target}/files?path=/pwned"),
            b"x",
            b"x",
        );
        attempts.push((format!("PUT {target} files"), status, text));
    }
    let cli_exec = kilnd.kiln_as(
        &bob_creds,
        &["exec", &vm, "--", "touch", "/tmp/pwned"],
        None,
    );
    let cli_cp = kilnd.kiln_as(
        &bob_creds,
        &[
            "cp",
            local.to_str().expect("utf-8"),
            &format!("{vm}:/pwned"),
        ],
        None,
    );
    let cli_logs = kilnd.kiln_as(&bob_creds, &["logs", &vm], None);
    let (untouched, _, _, _) = exec(
        &kilnd,
        &admin,
        &vm,
        json!({"command": "ls /tmp/pwned /pwned 2>&1; test -f /app.sh && echo app-still-there"}),
    );

    for (what, status, text) in &attempts {
        assert_eq!(*status, 404, "{what} by another principal: {text}");
        let v: Value = serde_json::from_str(text).unwrap_or(Value::Null);
        assert_eq!(v["resourceType"], "Microvm", "{what}: {text}");
        assert!(
            !text.contains("tick") && !text.contains("root:"),
            "{what} leaked data: {text}"
        );
    }
    for out in [&cli_exec, &cli_cp, &cli_logs] {
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("ResourceNotFound"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(untouched.contains("app-still-there"), "{untouched}");
    assert_eq!(untouched.matches("No such file").count(), 2, "{untouched}");

    // --- connector rule and logging: disabled ---
    let (no_shell, _, no_shell_text) = call(
        &kilnd,
        &admin,
        "POST",
        &format!("/kiln/v1/microvms/{quiet}/exec"),
        &json!({"argv": ["true"]}),
    );
    assert_eq!(no_shell, 403, "{no_shell_text}");
    std::thread::sleep(Duration::from_secs(3));
    let (quiet_status, quiet_headers, quiet_logs) = kilnd.request(
        &admin,
        "GET",
        &format!("/kiln/v1/microvms/{quiet}/logs"),
        b"",
    );
    let quiet_dir = kilnd.home.path().join("microvms").join(&quiet).join("vm");
    assert_eq!(quiet_status, 200);
    assert_eq!(quiet_logs, "");
    assert!(quiet_headers
        .iter()
        .any(|(n, v)| n == "x-kiln-logging" && v == "disabled"));
    assert!(!quiet_dir.join("app.log").exists() && !quiet_dir.join("app.log.1").exists());

    // --- app logs, plain and followed, and the CLI ---
    let (log_status, _, log_text) =
        kilnd.request(&admin, "GET", &format!("/kiln/v1/microvms/{vm}/logs"), b"");
    assert_eq!(log_status, 200);
    assert!(
        log_text.contains("tick ") && log_text.contains("tock "),
        "{log_text}"
    );
    let seen = highest_tick(&log_text);
    let mut follow = Command::new(Path::new(env!("CARGO_BIN_EXE_kilnd")).with_file_name("kiln"))
        .args(["logs", &vm, "--follow"])
        .env("KILN_ENDPOINT", &kilnd.url)
        .env("KILN_HOME", kilnd.home.path())
        .env("AWS_SHARED_CREDENTIALS_FILE", &admin_creds)
        .env("AWS_REGION", "us-east-1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("kiln logs --follow");
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = follow.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut newer = None;
    while Instant::now() < deadline && newer.is_none() {
        if let Ok(line) = rx.recv_timeout(Duration::from_secs(1)) {
            if highest_tick(&line) > seen + 1 {
                newer = Some(line);
            }
        }
    }
    let _ = follow.kill();
    let _ = follow.wait();
    assert!(
        newer.is_some(),
        "kiln logs --follow showed nothing past tick {seen}"
    );

    let cli_logs = kilnd.kiln_as(&admin_creds, &["logs", &vm], None);
    let build_log = kilnd.kiln_as(&admin_creds, &["logs", "sbx"], None);
    let failing = kilnd.kiln_as(
        &admin_creds,
        &[
            "exec",
            &vm,
            "--",
            "sh",
            "-c",
            "echo to-out; echo to-err >&2; exit 5",
        ],
        None,
    );
    let typed = kilnd.kiln_as(
        &admin_creds,
        &["exec", &vm, "--", "tr", "a-z", "A-Z"],
        Some(b"forwarded stdin\n"),
    );
    let as_json = kilnd.kiln_as(
        &admin_creds,
        &["exec", &vm, "--output", "json", "--sh", "echo j; exit 2"],
        None,
    );
    let timed_cli = kilnd.kiln_as(
        &admin_creds,
        &["exec", &vm, "--timeout", "1", "--", "sleep", "60"],
        None,
    );

    assert!(cli_logs.status.success());
    assert!(String::from_utf8_lossy(&cli_logs.stdout).contains("tick "));
    assert!(
        build_log.status.success(),
        "{}",
        String::from_utf8_lossy(&build_log.stderr)
    );
    assert!(
        String::from_utf8_lossy(&build_log.stdout).contains("booting the build VM"),
        "kiln logs IMAGE is the build log: {}",
        String::from_utf8_lossy(&build_log.stdout)
    );
    assert_eq!(failing.status.code(), Some(5));
    assert_eq!(String::from_utf8_lossy(&failing.stdout), "to-out\n");
    assert_eq!(String::from_utf8_lossy(&failing.stderr), "to-err\n");
    assert_eq!(typed.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&typed.stdout), "FORWARDED STDIN\n");
    let j: Value = serde_json::from_slice(&as_json.stdout).expect("exec --output json");
    assert_eq!(
        (j["stdout"].as_str(), j["exitCode"].as_i64()),
        (Some("j\n"), Some(2)),
        "{j}"
    );
    assert_eq!(as_json.status.code(), Some(2));
    assert_eq!(timed_cli.status.code(), Some(124));

    // Suspended without autoResume: commands get Conflict; the app log so far stays readable
    // and, after a resume, the newer output follows it.
    let (code, _, err) = kilnd.aws(&["suspend-microvm", "--microvm-identifier", &vm]);
    assert_eq!(code, 0, "suspend: {err}");
    let (suspended_exec, _, suspended_text) = call(
        &kilnd,
        &admin,
        "POST",
        &format!("/kiln/v1/microvms/{vm}/exec"),
        &json!({"argv": ["true"]}),
    );
    let (_, _, kept) = kilnd.request(&admin, "GET", &format!("/kiln/v1/microvms/{vm}/logs"), b"");
    let (code, _, err) = kilnd.aws(&["resume-microvm", "--microvm-identifier", &vm]);
    assert_eq!(code, 0, "resume: {err}");
    std::thread::sleep(Duration::from_secs(3));
    let (_, _, resumed) =
        kilnd.request(&admin, "GET", &format!("/kiln/v1/microvms/{vm}/logs"), b"");
    assert_eq!(suspended_exec, 409, "{suspended_text}");
    assert!(highest_tick(&kept) >= seen, "{kept}");
    assert!(
        resumed.starts_with(&kept[..kept.len().min(200)]),
        "{resumed}"
    );
    assert!(highest_tick(&resumed) > highest_tick(&kept), "{resumed}");

    // Every sandbox call was audited, the attacker's too (with bob as the principal).
    let events = kilnd.get("/kiln/v1/events");
    assert!(
        events.contains("ExecMicrovmCommand") && events.contains("PutMicrovmFile"),
        "{events}"
    );
    assert!(events.contains("\"bob\""), "{events}");
}

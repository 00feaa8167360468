//! Per-principal quotas and API throttling, as several principals meet them through the AWS
//! CLI, boto3 and `kiln quotas`: each refusal is the modeled exception naming its quota.
//! Limits are tiny (daemon flags and `--quota-overrides`) so the walk is short; one test
//! needs no VM, the other builds one image and boots as few VMs as it can.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::Daemon;
use serde_json::{json, Value};

/// A `--quota-overrides` file in `dir` with `overrides`.
fn overrides_file(dir: &Path, overrides: Value) -> PathBuf {
    let path = dir.join("quota-overrides.json");
    std::fs::write(&path, overrides.to_string()).expect("overrides file");
    path
}

/// `quota` from a `/kiln/v1/quotas` answer.
fn quota<'a>(report: &'a Value, code: &str) -> &'a Value {
    report["quotas"]
        .as_array()
        .and_then(|q| q.iter().find(|q| q["quotaCode"] == code))
        .unwrap_or_else(|| panic!("no {code} in {report}"))
}

#[test]
fn catalogue_quotas_and_throttling_when_exceeded_then_boto3_and_the_cli_raise_the_typed_errors() {
    let scratch = tempfile::tempdir().expect("scratch");
    let overrides = overrides_file(
        scratch.path(),
        json!({
            "carol": {"concurrentBuilds": 0},
            "dave": {"storedBytes": 100000},
            "erin": {"storedBytes": 0},
        }),
    );
    let kilnd = Daemon::start(&[
        "--quota-images",
        "2",
        "--quota-versions-per-image",
        "2",
        "--throttle",
        "GetMicrovm=0.1/1",
        "--quota-overrides",
        overrides.to_str().expect("utf-8 path"),
    ]);
    let (alice_key, _) = kilnd.new_principal("alice");
    for who in ["bob", "carol", "dave", "erin", "frank"] {
        kilnd.new_principal(who);
    }

    let out = kilnd
        .python()
        .arg(common::workspace().join("crates/kilnd/tests/quotas_boto3.py"))
        .arg(&kilnd.url)
        .arg(kilnd.home.path())
        .output()
        .expect("run python (make pyenv)");
    let frank = kilnd.home.path().join("credentials-frank");
    let frank_first = kilnd.aws_with(
        &frank,
        &[
            "get-microvm",
            "--microvm-identifier",
            "mvm-000000000000000000",
        ],
    );
    let frank_second = kilnd.aws_with(
        &frank,
        &[
            "get-microvm",
            "--microvm-identifier",
            "mvm-000000000000000000",
        ],
    );
    let alice_third = kilnd.aws_with(
        &kilnd.home.path().join("credentials-alice"),
        &[
            "create-microvm-image",
            "--name",
            "a4",
            "--base-image-arn",
            "arn:aws:lambda:local:aws:microvm-image:busybox",
            "--build-role-arn",
            "arn:aws:iam::000000000000:role/kiln-build",
            "--code-artifact",
            // Uploaded by the Python part (an empty object: no bytes stored).
            "uri=s3://bogus-alice/bad.zip",
        ],
    );
    let own = kilnd.request(&alice_key, "GET", "/kiln/v1/quotas", b"");
    let others = kilnd.request(&alice_key, "GET", "/kiln/v1/quotas?principal=bob", b"");
    let (cli_ok, cli_json, cli_err) =
        kilnd.kiln(&["quotas", "--principal", "alice", "--output", "json"]);
    let (table_ok, table, table_err) = kilnd.kiln(&["quotas", "--principal", "alice"]);

    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Value = serde_json::from_slice(&out.stdout).expect("script JSON");
    for ok in ["alice1", "alice2", "aliceUpdate"] {
        assert_eq!(seen[ok]["class"], "OK", "{ok}: {seen}");
    }
    let refusals = [
        ("aliceImages", "ImagesPerPrincipal"),
        ("aliceVersions", "VersionsPerImage"),
        ("carolBuilds", "ConcurrentBuildsPerPrincipal"),
        ("erinStored", "StoredBytesPerPrincipal"),
    ];
    for (call, code) in refusals {
        let r = &seen[call];
        assert_eq!(
            r["class"], "ServiceQuotaExceededException",
            "{call}: {seen}"
        );
        assert_eq!(r["quotaCode"], code, "{call}: {seen}");
        assert_eq!(r["serviceCode"], "lambda-microvms", "{call}: {seen}");
        assert_eq!(r["resourceType"], "MicrovmImage", "{call}: {seen}");
        assert!(
            r["message"].as_str().is_some_and(|m| m.contains(code)),
            "{call}: {seen}"
        );
    }
    assert_eq!(
        seen["bobGet1"]["class"], "ResourceNotFoundException",
        "{seen}"
    );
    let throttled = &seen["bobGet2"];
    assert_eq!(throttled["class"], "ThrottlingException", "{seen}");
    assert_eq!(
        throttled["quotaCode"], "GetMicrovmRequestsPerSecond",
        "{seen}"
    );
    assert_eq!(throttled["retryAfterHeader"], "10", "{seen}");
    assert_eq!(
        seen["aliceGet"]["class"], "ResourceNotFoundException",
        "bob's calls spent alice's rate: {seen}"
    );
    assert_eq!(seen["daveUpload"]["code"], "AccessDenied", "{seen}");
    assert!(
        seen["daveUpload"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("StoredBytesPerPrincipal")),
        "{seen}"
    );
    assert!(
        frank_first.2.contains("ResourceNotFoundException"),
        "{frank_first:?}"
    );
    assert_ne!(frank_second.0, 0);
    assert!(
        frank_second.2.contains("ThrottlingException"),
        "{frank_second:?}"
    );
    assert_ne!(alice_third.0, 0);
    assert!(
        alice_third.2.contains("ServiceQuotaExceededException")
            && alice_third.2.contains("ImagesPerPrincipal"),
        "{alice_third:?}"
    );
    assert_eq!(own.0, 200, "{}", own.2);
    let own: Value = serde_json::from_str(&own.2).expect("quotas JSON");
    assert_eq!(own["principal"], "alice");
    assert_eq!(quota(&own, "ImagesPerPrincipal")["limit"], 2, "{own}");
    assert_eq!(quota(&own, "ImagesPerPrincipal")["used"], 2, "{own}");
    assert_eq!(quota(&own, "VersionsPerImage")["used"], 2, "{own}");
    assert_eq!(
        quota(&own, "BuildDurationSeconds")["used"],
        Value::Null,
        "{own}"
    );
    assert!(
        own["throttles"].as_array().is_some_and(
            |t| t.contains(&json!({"operation": "RunMicrovm", "perSecond": 5.0, "burst": 5.0}))
        ),
        "{own}"
    );
    assert_eq!(others.0, 403, "{}", others.2);
    assert!(cli_ok, "{cli_err}");
    let cli: Value = serde_json::from_str(&cli_json).expect("kiln quotas JSON");
    assert_eq!(quota(&cli, "ImagesPerPrincipal")["used"], 2, "{cli}");
    assert!(table_ok, "{table_err}");
    assert!(
        table.contains("ImagesPerPrincipal") && table.contains("StoredBytesPerPrincipal"),
        "{table}"
    );
}

/// `create-microvm-image NAME` from `zip` signed with `credentials`.
fn create_image(
    kilnd: &Daemon,
    credentials: &Path,
    name: &str,
    zip: &Path,
) -> (i32, Value, String) {
    // Only admin may name host files: the zip goes to the principal's own bucket.
    let bucket = format!("{}-apps", name.to_ascii_lowercase());
    let uri = kilnd.upload(credentials, &bucket, zip);
    kilnd.create_image_as(credentials, name, &uri)
}

/// Waits until MicroVM `id` is in `state` (admin sees every MicroVM).
fn wait_state(kilnd: &Daemon, id: &str, state: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, v, _) = kilnd.aws(&["get-microvm", "--microvm-identifier", id]);
        if v["state"] == state {
            return v;
        }
        assert!(Instant::now() < deadline, "{id} never became {state}: {v}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// `"<status> <body>"` of a GET to `port` of MicroVM `id` through the endpoint.
fn endpoint_get(kilnd: &Daemon, id: &str, token: &str, port: u16) -> String {
    let ca = kilnd.home.path().join("tls/ca.pem");
    let out = kilnd
        .python()
        .arg(common::workspace().join("crates/kilnd/tests/endpoint_client.py"))
        .args([
            "get",
            &kilnd.endpoint_port.to_string(),
            ca.to_str().expect("utf-8 path"),
            id,
            "/",
            token,
            &port.to_string(),
        ])
        .output()
        .expect("run python");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn microvm_quotas_when_launching_past_them_then_exactly_one_wins_and_builds_are_timed() {
    let scratch = tempfile::tempdir().expect("scratch");
    let zip = scratch.path().join("counter.zip");
    common::counter_zip(&zip);
    let overrides = overrides_file(scratch.path(), json!({"carol": {"buildSeconds": 1}}));
    let kilnd = Daemon::start(&[
        "--quota-microvms",
        "2",
        "--quota-memory-mib",
        "700",
        "--endpoint-max-ports-per-vm",
        "2",
        "--quota-overrides",
        overrides.to_str().expect("utf-8 path"),
    ]);
    let (alice_key, alice) = kilnd.new_principal("alice");
    let (_, carol) = kilnd.new_principal("carol");
    let (code, app, err) = create_image(&kilnd, &alice, "app", &zip);
    assert_eq!(code, 0, "{err}");
    let (code, slow, err) = create_image(&kilnd, &carol, "slow", &zip);
    assert_eq!(code, 0, "{err}");
    // Admin reaches another account's image by its ARN.
    let arn_of = |created: &Value| created["imageArn"].as_str().expect("imageArn").to_string();
    let (app_arn, slow_arn) = (arn_of(&app), arn_of(&slow));
    let built = kilnd.wait_version(&app_arn, "1");
    assert_eq!(built["state"], "SUCCESSFUL", "{built}");
    let run = || kilnd.aws_with(&alice, &["run-microvm", "--image-identifier", "app"]);

    let (code, first, err) = run();
    assert_eq!(code, 0, "{err}");
    let id = first["microvmId"].as_str().expect("id").to_string();
    let over_memory = run();
    let (code, tokens, err) = kilnd.aws_with(
        &alice,
        &[
            "create-microvm-auth-token",
            "--microvm-identifier",
            &id,
            "--expiration-in-minutes",
            "5",
            "--allowed-ports",
            r#"[{"allPorts": {}}]"#,
        ],
    );
    assert_eq!(code, 0, "{err}");
    let token = tokens["authToken"]["X-aws-proxy-auth"]
        .as_str()
        .expect("token")
        .to_string();
    let second_port = endpoint_get(&kilnd, &id, &token, 9001);
    let third_port = endpoint_get(&kilnd, &id, &token, 9002);
    let (code, _, err) = kilnd.aws_with(&alice, &["suspend-microvm", "--microvm-identifier", &id]);
    assert_eq!(code, 0, "{err}");
    wait_state(&kilnd, &id, "SUSPENDED");
    let while_suspended = run();
    let usage = kilnd.request(&alice_key, "GET", "/kiln/v1/quotas", b"");
    let (code, _, err) =
        kilnd.aws_with(&alice, &["terminate-microvm", "--microvm-identifier", &id]);
    assert_eq!(code, 0, "{err}");
    wait_state(&kilnd, &id, "TERMINATED");
    let racing: Vec<(i32, Value, String)> = std::thread::scope(|s| {
        let a = s.spawn(run);
        let b = s.spawn(run);
        vec![a.join().expect("thread"), b.join().expect("thread")]
    });
    let slow = kilnd.wait_version(&slow_arn, "1");

    assert_ne!(over_memory.0, 0);
    assert!(
        over_memory.2.contains("ServiceQuotaExceededException")
            && over_memory.2.contains("MicrovmMemoryMiBPerPrincipal"),
        "{over_memory:?}"
    );
    assert!(second_port.starts_with("502"), "{second_port}");
    assert!(
        third_port.starts_with("503") && third_port.contains("--endpoint-max-ports-per-vm"),
        "{third_port}"
    );
    assert!(
        while_suspended.2.contains("ServiceQuotaExceededException"),
        "a suspended MicroVM must count: {while_suspended:?}"
    );
    assert_eq!(usage.0, 200, "{}", usage.2);
    let usage: Value = serde_json::from_str(&usage.2).expect("quotas JSON");
    assert_eq!(quota(&usage, "MicrovmsPerPrincipal")["used"], 1, "{usage}");
    assert_eq!(
        quota(&usage, "MicrovmMemoryMiBPerPrincipal")["used"],
        512,
        "{usage}"
    );
    assert!(
        quota(&usage, "StoredBytesPerPrincipal")["used"]
            .as_u64()
            .is_some_and(|b| b > 0),
        "{usage}"
    );
    let winners = racing.iter().filter(|(code, _, _)| *code == 0).count();
    assert_eq!(winners, 1, "{racing:?}");
    assert!(
        racing
            .iter()
            .any(|(_, _, err)| err.contains("ServiceQuotaExceededException")),
        "{racing:?}"
    );
    assert_eq!(slow["state"], "FAILED", "{slow}");
    assert!(slow.to_string().contains("BuildDurationSeconds"), "{slow}");
}

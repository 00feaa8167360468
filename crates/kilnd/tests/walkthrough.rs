//! AWS's walkthrough, unchanged, against kiln: `aws s3 mb`, `aws s3 cp app.zip s3://…`, then
//! boto3 creates the image from `s3://`, runs it with an idle policy, reaches it over HTTPS,
//! suspends, resumes and terminates it — all signed with the credentials kilnd generated.

mod common;

use common::{aws_cli, make_zip, Daemon};

/// `aws s3 <args>` against kilnd, signed with `credentials`: (exit code, stdout + stderr).
fn s3(kilnd: &Daemon, credentials: &std::path::Path, args: &[&str]) -> (i32, String) {
    let out = aws_cli(credentials)
        .arg("s3")
        .args(args)
        .args(["--endpoint-url", &kilnd.url, "--region", "us-east-1"])
        .output()
        .expect("run the AWS CLI (make pyenv)");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn walkthrough_when_zip_goes_through_s3_then_boto3_builds_runs_suspends_resumes_and_ends_it() {
    let kilnd = Daemon::start(&[]);
    let scratch = tempfile::tempdir().expect("scratch");
    let zip = scratch.path().join("app.zip");
    common::counter_zip(&zip);
    let admin = kilnd.credentials();
    let (_, alice) = kilnd.new_principal("alice");

    let made = s3(&kilnd, &admin, &["mb", "s3://apps"]);
    let copied = s3(
        &kilnd,
        &admin,
        &["cp", &zip.to_string_lossy(), "s3://apps/app.zip"],
    );
    let listed = s3(&kilnd, &admin, &["ls", "s3://apps"]);
    let alice_lists = s3(&kilnd, &alice, &["ls", "s3://apps"]);
    let (alice_code, _, alice_err) = kilnd.aws_with(
        &alice,
        &[
            "create-microvm-image",
            "--name",
            "stolen",
            "--base-image-arn",
            "arn:aws:lambda:local:aws:microvm-image:busybox",
            "--build-role-arn",
            "arn:aws:iam::000000000000:role/kiln-build",
            "--code-artifact",
            "uri=s3://apps/app.zip",
        ],
    );
    let walk = kilnd
        .python()
        .arg(common::workspace().join("crates/kilnd/tests/walkthrough.py"))
        .args([
            kilnd.url.as_str(),
            &kilnd.endpoint_port.to_string(),
            &kilnd.home.path().join("tls/ca.pem").to_string_lossy(),
            "s3://apps/app.zip",
        ])
        .output()
        .expect("run python");
    let seen: serde_json::Value = serde_json::from_slice(&walk.stdout).unwrap_or_default();

    assert_eq!(made.0, 0, "{}", made.1);
    assert_eq!(copied.0, 0, "{}", copied.1);
    assert!(listed.1.contains("app.zip"), "{}", listed.1);
    assert_ne!(alice_lists.0, 0, "{}", alice_lists.1);
    assert!(alice_lists.1.contains("AccessDenied"), "{}", alice_lists.1);
    assert_ne!(alice_code, 0);
    assert!(alice_err.contains("no bucket apps of yours"), "{alice_err}");
    assert!(
        walk.status.success(),
        "{}",
        String::from_utf8_lossy(&walk.stderr)
    );
    assert_eq!(seen["image"], "CREATED", "{seen}");
    assert_eq!(seen["run"], "RUNNING", "{seen}");
    assert_eq!(seen["first"], serde_json::json!([200, "101"]), "{seen}");
    assert_eq!(seen["suspended"], "SUSPENDED", "{seen}");
    assert_eq!(seen["resumed"], "RUNNING", "{seen}");
    assert_eq!(seen["second"], serde_json::json!([200, "102"]), "{seen}");
    assert_eq!(seen["terminated"], "TERMINATED", "{seen}");
    assert!(!kilnd.qemu_running());
}

#[test]
fn external_store_when_configured_then_s3_artifacts_are_fetched_from_it() {
    let store = Daemon::start(&[]);
    let scratch = tempfile::tempdir().expect("scratch");
    let zip = scratch.path().join("app.zip");
    make_zip(
        &zip,
        &[(
            "Dockerfile",
            b"FROM kiln/busybox\nRUN echo fetched > /fetched\nEXPOSE 8080\nCMD [\"httpd\", \"-f\", \"-p\", \"8080\"]\n",
            0o644,
        )],
    );
    let made = s3(&store, &store.credentials(), &["mb", "s3://ext"]);
    let copied = s3(
        &store,
        &store.credentials(),
        &["cp", &zip.to_string_lossy(), "s3://ext/app.zip"],
    );
    let store_credentials = store.credentials().to_string_lossy().into_owned();
    let kilnd = Daemon::start(&[
        "--artifact-s3-endpoint",
        &store.url,
        "--artifact-s3-credentials",
        &store_credentials,
        "--artifact-s3-bucket",
        "ext=alice",
    ]);
    let (_, alice) = kilnd.new_principal("alice");
    let (_, bob) = kilnd.new_principal("bob");
    let create_as = |credentials: &std::path::Path, name: &str, uri: &str| {
        kilnd.create_image_as(credentials, name, uri)
    };
    let create = |name: &str, uri: &str| create_as(&kilnd.credentials(), name, uri);

    let (ok_code, _, ok_err) = create("fetched", "s3://ext/app.zip");
    // kilnd fetches with its own key: a principal names only the buckets granted to it.
    let (missing_code, _, missing_err) = create_as(&alice, "missing", "s3://ext/nope.zip");
    let (bob_code, _, bob_err) = create_as(&bob, "bobs", "s3://ext/app.zip");
    let fetched = kilnd.wait_version_for("fetched", "1", std::time::Duration::from_secs(120));
    // Alice's image is in her own account (the first principal made after admin's).
    let missing = kilnd.wait_version(
        "arn:aws:lambda:local:000000000001:microvm-image:missing",
        "1",
    );

    assert_eq!(made.0, 0, "{}", made.1);
    assert_eq!(copied.0, 0, "{}", copied.1);
    assert_eq!((ok_code, missing_code), (0, 0), "{ok_err}{missing_err}");
    assert_ne!(bob_code, 0);
    assert!(
        bob_err.contains("AccessDeniedException")
            && bob_err.contains("not granted to principal bob"),
        "{bob_err}"
    );
    assert_eq!(fetched["state"], "SUCCESSFUL", "{fetched}");
    assert_eq!(missing["state"], "FAILED", "{missing}");
    assert!(
        missing["stateReason"]
            .as_str()
            .unwrap_or_default()
            .contains("404"),
        "{missing}"
    );
}

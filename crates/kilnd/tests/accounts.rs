//! Accounts and endpoint-token keys through a real kilnd: three principals each own an
//! image named `app` in their own account (AWS CLI and boto3), a revoked access key ends
//! the tokens it asked for, and scheduled key rotation leaves earlier tokens working.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::Daemon;
use serde_json::Value;

/// `create-microvm-image --name app` from `zip`, signed with `credentials`: the zip goes
/// to the principal's own bucket in kiln's S3 store first (only admin may name files).
fn create_app(kilnd: &Daemon, credentials: &Path, zip: &Path) -> (i32, Value, String) {
    let who = credentials
        .file_name()
        .map(|n| n.to_string_lossy().replace('_', "-"))
        .unwrap_or_default();
    let uri = kilnd.upload(credentials, &format!("apps-{who}"), zip);
    kilnd.create_image_as(credentials, "app", &uri)
}

/// Waits (up to 5 minutes) until version 1 of the caller's `app` ends its build.
fn wait_app(kilnd: &Daemon, credentials: &Path) -> Value {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let (code, v, err) = kilnd.aws_with(
            credentials,
            &[
                "get-microvm-image-version",
                "--image-identifier",
                "app",
                "--image-version",
                "1",
            ],
        );
        assert_eq!(code, 0, "get-microvm-image-version: {err}");
        if !matches!(v["state"].as_str(), Some("PENDING" | "IN_PROGRESS")) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "the build of app did not end: {v}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn arns(listed: &Value) -> Vec<String> {
    listed["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["imageArn"].as_str().map(str::to_string))
        .collect()
}

fn app_arn(account: &str) -> String {
    format!("arn:aws:lambda:local:{account}:microvm-image:app")
}

#[test]
fn names_when_three_principals_each_create_app_then_each_owns_its_own_in_its_account() {
    let kilnd = Daemon::start(&[]);
    let scratch = tempfile::tempdir().expect("scratch");
    let zip = common::unbuildable_zip(scratch.path());
    let (_, alice) = kilnd.new_principal("alice");
    let (_, bob) = kilnd.new_principal("bob");
    let admin = kilnd.credentials();

    let created: Vec<(i32, Value, String)> = [&admin, &alice, &bob]
        .iter()
        .map(|c| create_app(&kilnd, c, &zip))
        .collect();
    let (again, _, again_err) = create_app(&kilnd, &alice, &zip);
    for credentials in [&admin, &alice, &bob] {
        wait_app(&kilnd, credentials);
    }
    let (_, alice_list, _) = kilnd.aws_with(&alice, &["list-microvm-images"]);
    let (_, admin_list, _) = kilnd.aws(&["list-microvm-images"]);
    let (admin_reach, admin_got, admin_reach_err) = kilnd.aws(&[
        "get-microvm-image",
        "--image-identifier",
        &app_arn("000000000002"),
    ]);
    let out = {
        let mut python = kilnd.python();
        common::aws_env(&mut python, &bob);
        python
            .arg(common::workspace().join("crates/kilnd/tests/accounts.py"))
            .arg(&kilnd.url)
            .arg(app_arn("000000000001"))
            .output()
            .expect("run python (make pyenv)")
    };
    let bob_saw: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let (deleted, _, deleted_err) = kilnd.aws_with(
        &alice,
        &["delete-microvm-image", "--image-identifier", "app"],
    );
    let (_, bob_after, bob_after_err) =
        kilnd.aws_with(&bob, &["get-microvm-image", "--image-identifier", "app"]);

    let created_arns: Vec<&str> = created
        .iter()
        .map(|(code, v, err)| {
            assert_eq!(*code, 0, "{err}");
            v["imageArn"].as_str().unwrap_or_default()
        })
        .collect();
    assert_eq!(
        created_arns,
        vec![
            app_arn("000000000000"),
            app_arn("000000000001"),
            app_arn("000000000002")
        ]
    );
    assert_ne!(again, 0);
    assert!(again_err.contains("ConflictException"), "{again_err}");
    assert_eq!(arns(&alice_list), vec![app_arn("000000000001")]);
    assert_eq!(
        arns(&admin_list),
        vec![
            app_arn("000000000000"),
            app_arn("000000000001"),
            app_arn("000000000002")
        ]
    );
    assert_eq!(admin_reach, 0, "{admin_reach_err}");
    assert_eq!(admin_got["imageArn"], app_arn("000000000002"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (op, code) in bob_saw["ops"].as_object().expect("ops") {
        assert_eq!(
            code, "ResourceNotFoundException",
            "bob's {op} on alice's app: {bob_saw}"
        );
    }
    assert_eq!(bob_saw["ownArn"], app_arn("000000000002"), "{bob_saw}");
    assert_eq!(
        bob_saw["listed"],
        serde_json::json!([app_arn("000000000002")]),
        "{bob_saw}"
    );
    assert_eq!(deleted, 0, "{deleted_err}");
    assert_eq!(
        bob_after["imageArn"],
        app_arn("000000000002"),
        "{bob_after_err}"
    );
}

/// A 5-minute token for port 8080 of `id`, asked for with `credentials`.
fn token(kilnd: &Daemon, credentials: &Path, id: &str) -> String {
    kilnd.token_as(credentials, id)
}

/// The `kid` in a token's JWE header.
fn kid(token: &str) -> String {
    let header = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token.split('.').next().unwrap_or_default())
        .unwrap_or_default();
    let header: Value = serde_json::from_slice(&header).unwrap_or_default();
    header["kid"].as_str().unwrap_or_default().to_string()
}

/// `"<status> <body>"` of a GET of `/cgi-bin/count` through the MicroVM's HTTPS endpoint.
fn endpoint_get(kilnd: &Daemon, id: &str, token: &str) -> String {
    let ca = kilnd.home.path().join("tls/ca.pem");
    let out = kilnd
        .python()
        .arg(common::workspace().join("crates/kilnd/tests/endpoint_client.py"))
        .args(["get", &kilnd.endpoint_port.to_string()])
        .arg(&ca)
        .args([id, "/cgi-bin/count", token])
        .output()
        .expect("run python");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    )
}

/// The `kid` new tokens are issued under (the newest in kilnd's key file).
fn newest_kid(kilnd: &Daemon) -> String {
    std::fs::read(kilnd.home.path().join("keys/tokens.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .and_then(|v| v["keys"][0]["kid"].as_str().map(str::to_string))
        .unwrap_or_default()
}

#[test]
fn tokens_when_keys_rotate_then_old_ones_still_open_and_when_the_minting_key_is_revoked_then_refused(
) {
    let kilnd = Daemon::start(&["--token-key-rotation-secs", "2"]);
    let scratch = tempfile::tempdir().expect("scratch");
    let zip = scratch.path().join("counter.zip");
    common::counter_zip(&zip);
    let (first_key, bob) = kilnd.new_principal("bob");
    let bob_first = scratch.path().join("bob-first");
    first_key.write(&bob_first);
    let (_, bob_second) = kilnd.new_principal("bob");
    let (code, _, err) = create_app(&kilnd, &bob, &zip);
    assert_eq!(code, 0, "{err}");
    let built = wait_app(&kilnd, &bob);
    assert_eq!(built["state"], "SUCCESSFUL", "{built}");
    let (code, vm, err) = kilnd.aws_with(&bob, &["run-microvm", "--image-identifier", "app"]);
    assert_eq!(code, 0, "{err}");
    let id = vm["microvmId"].as_str().unwrap_or_default().to_string();

    let by_first = token(&kilnd, &bob_first, &id);
    let by_second = token(&kilnd, &bob_second, &id);
    let fresh = endpoint_get(&kilnd, &id, &by_first);
    let deadline = Instant::now() + Duration::from_secs(30);
    while newest_kid(&kilnd) == kid(&by_first) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let rotated = token(&kilnd, &bob_second, &id);
    let after_rotation = endpoint_get(&kilnd, &id, &by_first);
    let revoke = kilnd.request(
        &kilnd.admin_key(),
        "DELETE",
        &format!("/kiln/v1/keys/{}", first_key.id),
        b"",
    );
    let after_revoke = endpoint_get(&kilnd, &id, &by_first);
    let other_key = endpoint_get(&kilnd, &id, &by_second);
    kilnd.aws_with(
        &bob_second,
        &["terminate-microvm", "--microvm-identifier", &id],
    );

    assert_eq!(vm["imageArn"], app_arn("000000000001"), "{vm}");
    assert!(fresh.starts_with("200 "), "{fresh}");
    assert_ne!(kid(&by_first), "");
    assert_ne!(kid(&rotated), kid(&by_first), "no rotation within 30 s");
    assert!(after_rotation.starts_with("200 "), "{after_rotation}");
    assert_eq!(revoke.0, 200, "{}", revoke.2);
    assert!(
        after_revoke.starts_with("403 ") && after_revoke.contains("revoked"),
        "{after_revoke}"
    );
    assert!(other_key.starts_with("200 "), "{other_key}");
}

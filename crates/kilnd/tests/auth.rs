//! Authentication and principals through a real kilnd: the credentials file it writes, the
//! AWS CLI signing with it, each way a request can fail to authenticate, the keys API, and
//! what one principal sees of another's images. No VM boots: the images here fail their
//! build at the planning step (the Dockerfile names another base than the request).

mod common;

use std::time::{Duration, SystemTime};

use common::{http_request, Daemon, Key};

fn header<'a>(headers: &'a [(String, String)], name: &str) -> &'a str {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or_default()
}

fn image_names(listed: &serde_json::Value) -> Vec<String> {
    listed["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["name"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn credentials_when_first_start_then_0600_default_profile_the_aws_cli_signs_and_a_restart_keeps_it()
{
    use std::os::unix::fs::PermissionsExt;
    let mut kilnd = Daemon::start(&[]);
    let path = kilnd.credentials();

    let text = std::fs::read_to_string(&path).expect("credentials file");
    let mode = std::fs::metadata(&path)
        .expect("metadata")
        .permissions()
        .mode();
    let (listed, out, err) = kilnd.aws(&["list-microvm-images"]);
    let before = kilnd.admin_key();
    kilnd.crash_and_restart();
    let after = kilnd.admin_key();
    let (listed_again, _, err_again) = kilnd.aws(&["list-managed-microvm-images"]);

    assert_eq!(mode & 0o777, 0o600);
    assert!(text.contains("[default]\n"), "{text}");
    assert!(before.id.starts_with("AKIA") && before.id.len() == 20);
    assert_eq!(before.secret.len(), 40);
    assert_eq!(listed, 0, "{err}");
    assert_eq!(out["items"], serde_json::json!([]));
    assert_eq!(after.id, before.id);
    assert_eq!(listed_again, 0, "{err_again}");
}

#[test]
fn requests_when_unsigned_wrong_stale_or_revoked_then_each_gets_the_aws_error() {
    let kilnd = Daemon::start(&[]);
    let scratch = tempfile::tempdir().expect("scratch");
    let admin = kilnd.admin_key();
    let wrong = Key {
        id: admin.id.clone(),
        secret: "x".repeat(40),
    };
    let wrong_file = scratch.path().join("wrong");
    wrong.write(&wrong_file);

    let unsigned = http_request(&kilnd.url, "GET", "/2025-09-09/microvm-images", &[], b"");
    let unsigned_kiln = http_request(&kilnd.url, "GET", "/kiln/v1/keys", &[], b"");
    let health = http_request(&kilnd.url, "GET", "/kiln/v1/health", &[], b"");
    let (wrong_code, _, wrong_err) = kilnd.aws_with(&wrong_file, &["list-microvm-images"]);
    let stale = kilnd.request_at(
        &admin,
        SystemTime::now() - Duration::from_secs(20 * 60),
        "GET",
        "/2025-09-09/microvm-images",
        b"",
    );
    let (alice, alice_file) = kilnd.new_principal("alice");
    let (before_revoke, _, _) = kilnd.aws_with(&alice_file, &["list-microvm-images"]);
    let revoke = kilnd.request(
        &admin,
        "DELETE",
        &format!("/kiln/v1/keys/{}", alice.id),
        b"",
    );
    let (revoked_code, _, revoked_err) = kilnd.aws_with(&alice_file, &["list-microvm-images"]);

    assert_eq!(unsigned.0, 403);
    assert_eq!(
        header(&unsigned.1, "x-amzn-errortype"),
        "MissingAuthenticationTokenException"
    );
    assert_eq!(unsigned_kiln.0, 403);
    assert_eq!((health.0, health.2.as_str()), (200, "ok\n"));
    assert_ne!(wrong_code, 0);
    // A wrong secret and a revoked (or unknown) key answer alike: nobody learns which
    // access key ids exist.
    assert!(
        wrong_err.contains("UnrecognizedClientException"),
        "{wrong_err}"
    );
    assert_eq!(
        wrong_err.rsplit(':').next(),
        revoked_err.rsplit(':').next(),
        "{wrong_err} / {revoked_err}"
    );
    assert_eq!(stale.0, 403);
    assert_eq!(
        header(&stale.1, "x-amzn-errortype"),
        "InvalidSignatureException"
    );
    assert!(
        stale.2.contains("Signature expired") && stale.2.contains("is now earlier than"),
        "{}",
        stale.2
    );
    assert_eq!(before_revoke, 0);
    assert_eq!(revoke.0, 200, "{}", revoke.2);
    assert_ne!(revoked_code, 0);
    assert!(
        revoked_err.contains("UnrecognizedClientException"),
        "{revoked_err}"
    );
}

#[test]
fn principals_when_admin_and_alice_create_images_then_alice_sees_only_hers_and_admin_sees_both() {
    let kilnd = Daemon::start(&[]);
    let scratch = tempfile::tempdir().expect("scratch");
    let zip = common::unbuildable_zip(scratch.path());
    let (created, _, err) = kilnd.create_image("admins", &zip);
    assert_eq!(created, 0, "{err}");
    let (_, alice) = kilnd.new_principal("alice");
    let as_alice = |args: &[&str]| kilnd.aws_with(&alice, args);
    let alices_zip = kilnd.upload(&alice, "alice-apps", &zip);
    let create_args = |name: &str, uri: &str| {
        vec![
            "create-microvm-image".to_string(),
            "--name".into(),
            name.into(),
            "--base-image-arn".into(),
            "arn:aws:lambda:local:aws:microvm-image:busybox".into(),
            "--build-role-arn".into(),
            "arn:aws:iam::000000000000:role/kiln-build".into(),
            "--code-artifact".into(),
            format!("uri={uri}"),
        ]
    };
    let alice_create: Vec<String> = create_args("alices", &alices_zip);
    let alice_create: Vec<&str> = alice_create.iter().map(String::as_str).collect();
    let alice_file: Vec<String> = create_args("alices-file", &format!("file://{}", zip.display()));
    let alice_file: Vec<&str> = alice_file.iter().map(String::as_str).collect();

    let (alice_created, _, alice_created_err) = as_alice(&alice_create);
    let (alice_file_code, _, alice_file_err) = as_alice(&alice_file);
    let (_, _, get_err) = as_alice(&["get-microvm-image", "--image-identifier", "admins"]);
    let (_, _, arn_err) = as_alice(&[
        "get-microvm-image",
        "--image-identifier",
        "arn:aws:lambda:local:000000000000:microvm-image:admins",
    ]);
    let (_, _, versions_err) = as_alice(&[
        "list-microvm-image-versions",
        "--image-identifier",
        "admins",
    ]);
    let (_, _, tags_err) = as_alice(&[
        "list-tags",
        "--resource",
        "arn:aws:lambda:local:000000000000:microvm-image:admins",
    ]);
    let (_, _, delete_err) = as_alice(&["delete-microvm-image", "--image-identifier", "admins"]);
    let (_, alice_list, _) = as_alice(&["list-microvm-images"]);
    let (_, managed, _) = as_alice(&["list-managed-microvm-images"]);
    let (_, admin_list, _) = kilnd.aws(&["list-microvm-images"]);
    // Alice's images are in her own account: admin names them by ARN.
    let (admin_get, _, admin_get_err) = kilnd.aws(&[
        "get-microvm-image",
        "--image-identifier",
        "arn:aws:lambda:local:000000000001:microvm-image:alices",
    ]);
    let log_for_alice = kilnd.request(
        &common::Key::from_file(&alice),
        "GET",
        "/kiln/v1/images/admins/versions/1/build-log",
        b"",
    );

    assert_eq!(alice_created, 0, "{alice_created_err}");
    // Only the admin names files on kilnd's host; everyone else is told to upload.
    assert_ne!(alice_file_code, 0);
    assert!(
        alice_file_err.contains("AccessDeniedException")
            && alice_file_err.contains("only principal admin may name files")
            && alice_file_err.contains("aws s3 cp"),
        "{alice_file_err}"
    );
    for err in [&get_err, &arn_err, &versions_err, &tags_err, &delete_err] {
        assert!(err.contains("ResourceNotFoundException"), "{err}");
    }
    assert_eq!(image_names(&alice_list), vec!["alices".to_string()]);
    assert_eq!(managed["items"].as_array().map(Vec::len), Some(3));
    assert_eq!(
        image_names(&admin_list),
        vec!["admins".to_string(), "alices".to_string()]
    );
    assert_eq!(admin_get, 0, "{admin_get_err}");
    assert_eq!(log_for_alice.0, 404);
}

#[test]
fn keys_api_when_caller_is_not_admin_or_the_key_is_the_last_admin_key_then_refused() {
    let kilnd = Daemon::start(&[]);
    let admin = kilnd.admin_key();
    let (alice, _) = kilnd.new_principal("alice");

    let listed = kilnd.request(&admin, "GET", "/kiln/v1/keys", b"");
    let by_alice = kilnd.request(
        &alice,
        "POST",
        "/kiln/v1/keys",
        br#"{"principal": "admin"}"#,
    );
    let last = kilnd.request(
        &admin,
        "DELETE",
        &format!("/kiln/v1/keys/{}", admin.id),
        b"",
    );
    let bad_name = kilnd.request(&admin, "POST", "/kiln/v1/keys", br#"{"principal": "a/b"}"#);

    let keys: serde_json::Value = serde_json::from_str(&listed.2).expect("keys JSON");
    let principals: Vec<&str> = keys["keys"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|k| k["principal"].as_str())
        .collect();
    assert_eq!(listed.0, 200);
    assert_eq!(principals, vec!["admin", "alice"]);
    assert!(!listed.2.contains(&admin.secret) && !listed.2.contains(&alice.secret));
    assert_eq!(by_alice.0, 403);
    assert_eq!(
        header(&by_alice.1, "x-amzn-errortype"),
        "AccessDeniedException"
    );
    assert_eq!(last.0, 409, "{}", last.2);
    assert!(last.2.contains("last active key"), "{}", last.2);
    assert_eq!(bad_name.0, 400);
}

#[test]
fn file_artifacts_when_outside_the_roots_or_linked_out_then_refused_naming_the_roots() {
    let scratch = tempfile::tempdir().expect("scratch");
    let root = scratch.path().join("root");
    std::fs::create_dir_all(&root).expect("root");
    let inside = common::unbuildable_zip(&root);
    let outside = scratch.path().join("outside.zip");
    std::fs::copy(&inside, &outside).expect("copy");
    let link = root.join("link.zip");
    std::os::unix::fs::symlink(&outside, &link).expect("symlink");
    let kilnd = Daemon::start(&["--artifact-root", &root.to_string_lossy()]);

    let (inside_code, _, inside_err) = kilnd.create_image("inside", &inside);
    let (outside_code, _, outside_err) = kilnd.create_image("outside", &outside);
    let (link_code, _, link_err) = kilnd.create_image("linked", &link);
    let (dotdot_code, _, dotdot_err) = kilnd.create_image("dotdot", &root.join("../outside.zip"));

    assert_eq!(inside_code, 0, "{inside_err}");
    for (code, err) in [
        (outside_code, &outside_err),
        (link_code, &link_err),
        (dotdot_code, &dotdot_err),
    ] {
        assert_ne!(code, 0);
        assert!(
            err.contains("ValidationException")
                && err.contains("is outside the directories this kilnd reads artifacts from")
                && err.contains(&root.to_string_lossy().into_owned()),
            "{err}"
        );
    }
}

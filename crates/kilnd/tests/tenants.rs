//! Tenant boundaries in the control plane, tried as another principal would: bob against
//! alice's S3 bucket (every operation the store serves) and alice's artifacts.

mod common;

use common::Daemon;
use serde_json::Value;

#[test]
fn s3_when_another_principal_walks_every_operation_on_a_bucket_then_each_is_denied() {
    let kilnd = Daemon::start(&[]);
    let (_, alice) = kilnd.new_principal("alice");
    let (_, bob) = kilnd.new_principal("bob");

    let out = kilnd
        .python()
        .arg(common::workspace().join("crates/kilnd/tests/s3_tenants.py"))
        .arg(&kilnd.url)
        .arg(&alice)
        .arg(&bob)
        .output()
        .expect("run python (make pyenv)");
    let seen: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();

    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ops = seen["ops"].as_object().expect("ops");
    for (op, code) in ops {
        let expected = match op.as_str() {
            "CreateBucket" => "BucketAlreadyExists",
            // A HEAD answer has no body: botocore reports the status as the code.
            "HeadBucket" | "HeadObject" => "403",
            _ => "AccessDenied",
        };
        assert_eq!(code, expected, "bob's {op} on alice's bucket: {seen}");
    }
    assert_eq!(seen["bobBuckets"], serde_json::json!(["bob-b"]), "{seen}");
    assert_eq!(
        seen["aliceBuckets"],
        serde_json::json!(["alice-b"]),
        "{seen}"
    );
    assert_eq!(seen["aliceObject"], "alice's private zip", "{seen}");
}

#[test]
fn layer_cache_when_another_principal_builds_the_same_zip_then_nothing_is_cached_for_him() {
    let kilnd = Daemon::start(&[]);
    let scratch = tempfile::tempdir().expect("scratch");
    let zip = scratch.path().join("same.zip");
    common::counter_zip(&zip);
    let (_, bob) = kilnd.new_principal("bob");
    let bobs_zip = kilnd.upload(&bob, "bob-apps", &zip);
    let create = |credentials: &std::path::Path, name: &str, uri: &str| {
        kilnd.create_image_as(credentials, name, uri)
    };
    let admins_zip = format!("file://{}", zip.display());

    let (admin_code, _, admin_err) = create(&kilnd.credentials(), "admins", &admins_zip);
    let admins = kilnd.wait_version("admins", "1");
    let (again_code, _, again_err) = create(&kilnd.credentials(), "admins-again", &admins_zip);
    let again = kilnd.wait_version("admins-again", "1");
    let (bob_code, _, bob_err) = create(&bob, "bobs", &bobs_zip);
    // Bob's images are in his own account: admin names them by ARN.
    let bobs = kilnd.wait_version("arn:aws:lambda:local:000000000001:microvm-image:bobs", "1");
    let again_log = kilnd.get("/kiln/v1/images/admins-again/versions/1/build-log");
    let bob_log = kilnd.get(
        "/kiln/v1/images/arn%3Aaws%3Alambda%3Alocal%3A000000000001%3Amicrovm-image%3Abobs/versions/1/build-log",
    );

    assert_eq!(
        (admin_code, again_code, bob_code),
        (0, 0, 0),
        "{admin_err}{again_err}{bob_err}"
    );
    for v in [&admins, &again, &bobs] {
        assert_eq!(v["state"], "SUCCESSFUL", "{v}");
    }
    assert!(
        again_log.contains("    cached"),
        "the owner's own rebuild hit no cache:\n{again_log}"
    );
    assert!(
        !bob_log.contains("    cached"),
        "bob was served the admin's layers:\n{bob_log}"
    );
}

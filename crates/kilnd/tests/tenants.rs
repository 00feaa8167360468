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

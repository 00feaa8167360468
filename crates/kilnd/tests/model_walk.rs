//! The whole model, walked: every operation botocore's `lambda-microvms` model declares is
//! called through boto3 against a real kilnd, with inputs derived from the model and each
//! answer checked against the operation's output shape (`model_walk.py`); each operation
//! also meets one bad input and must raise a modeled, typed exception. One image (built
//! twice: create and update) and one MicroVM.

mod common;

use common::{make_zip, workspace, Daemon};
use serde_json::{json, Value};

/// A static page served by busybox on 8080.
const APP: &str = "#!/bin/sh
mkdir -p /www
echo walk > /www/index.html
exec httpd -f -p 8080 -h /www
";

fn names(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(str::to_string)
        .collect()
}

#[test]
fn walk_when_every_model_operation_is_called_then_each_answers_as_the_model_says() {
    // Short windows (model_walk.py's TOKEN_TTL and RETENTION), so the walk sees both end;
    // RunMicrovm unthrottled, since the walk sends six of them within a second or so (its bad
    // inputs, the run and its idempotent repeat) and throttling is another test's subject.
    let kilnd = Daemon::start(&[
        "--client-token-ttl-secs",
        "15",
        "--terminated-retention-secs",
        "30",
        "--throttle",
        "RunMicrovm=0",
    ]);
    let scratch = tempfile::tempdir().expect("scratch");
    let zip = scratch.path().join("walk.zip");
    make_zip(
        &zip,
        &[
            (
                "Dockerfile",
                b"FROM kiln/busybox\nCOPY app.sh /\nEXPOSE 8080\nCMD [\"/bin/sh\", \"/app.sh\"]\n",
                0o644,
            ),
            ("app.sh", APP.as_bytes(), 0o755),
        ],
    );

    let walk = kilnd
        .python()
        .arg(workspace().join("crates/kilnd/tests/model_walk.py"))
        .args([
            kilnd.url.as_str(),
            &kilnd.endpoint_port.to_string(),
            &kilnd.home.path().join("tls/ca.pem").to_string_lossy(),
            &zip.to_string_lossy(),
        ])
        .output()
        .expect("run python (make pyenv)");
    let report: Value = serde_json::from_slice(&walk.stdout).unwrap_or_else(|e| {
        panic!(
            "model_walk.py printed no report ({e}):\n{}",
            String::from_utf8_lossy(&walk.stderr)
        )
    });
    let failures = names(&report["failures"]);
    let operations = names(&report["model_operations"]);
    let not_called: Vec<&String> = operations
        .iter()
        .filter(|op| report["called"][op.as_str()].is_null())
        .collect();
    let no_typed_error: Vec<&String> = operations
        .iter()
        .filter(|op| report["typed_errors"][op.as_str()].is_null())
        .collect();
    let seen = &report["seen"];

    assert!(
        failures.is_empty(),
        "{} failure(s) in the model walk:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(
        not_called.is_empty(),
        "the model has operations the walk never called (a botocore update?): {not_called:?}; \
         add them to model_walk.py"
    );
    assert!(
        no_typed_error.is_empty(),
        "operations without a typed-error check: {no_typed_error:?}"
    );
    assert!(walk.status.success());
    assert_eq!(seen["created"], json!(["CREATING", "1"]), "{seen}");
    assert_eq!(seen["version_1"], "SUCCESSFUL", "{seen}");
    assert_eq!(seen["image"], "CREATED", "{seen}");
    assert_eq!(seen["listed_images"], json!(["walk"]), "{seen}");
    assert_eq!(seen["updated"], json!(["UPDATING", "2"]), "{seen}");
    assert_eq!(seen["version_2"], "SUCCESSFUL", "{seen}");
    assert_eq!(seen["retired"], "INACTIVE", "{seen}");
    assert_eq!(seen["run"], json!(["RUNNING", "1"]), "{seen}");
    assert_eq!(seen["listed_microvms"], json!([seen["microvm"]]), "{seen}");
    assert_eq!(seen["endpoint"], json!([200, "walk"]), "{seen}");
    assert_eq!(seen["shell_token"], json!(["X-aws-proxy-auth"]), "{seen}");
    assert_eq!(seen["suspended"], "SUSPENDED", "{seen}");
    assert_eq!(seen["resumed"], "RUNNING", "{seen}");
    assert_eq!(
        seen["endpoint_after_resume"],
        json!([200, "walk"]),
        "{seen}"
    );
    assert_eq!(seen["terminated"], "TERMINATED", "{seen}");
    assert_eq!(seen["terminated_later"], "TERMINATED", "{seen}");
    assert_eq!(seen["listed_after_retention"], json!([]), "{seen}");
    assert_eq!(seen["tagged"], json!({"stage": "walk"}), "{seen}");
    assert_eq!(seen["untagged"], json!({}), "{seen}");
    assert_eq!(seen["deleted_version"], "DELETED", "{seen}");
    assert_eq!(seen["deleted_image"], "DELETED", "{seen}");
    assert!(!kilnd.qemu_running());
}

//! Hostile and broken input: every bad build ends FAILED with a reason naming the step and
//! the cause, leaves no VM or work file behind, and the daemon keeps serving.

mod common;

use std::path::PathBuf;

use common::{make_zip, Daemon};

fn zip_of(dir: &std::path::Path, name: &str, entries: &[(&str, &[u8], u32)]) -> PathBuf {
    let path = dir.join(format!("{name}.zip"));
    make_zip(&path, entries);
    path
}

fn dockerfile(dir: &std::path::Path, name: &str, text: &str) -> PathBuf {
    zip_of(dir, name, &[("Dockerfile", text.as_bytes(), 0o644)])
}

#[test]
fn build_when_input_is_bad_then_version_fails_with_a_reason_and_nothing_leaks() {
    // Every case's build is queued before any is waited for: more than the 5 builds in
    // flight a principal may have by default.
    let kilnd = Daemon::start(&[
        "--ready-timeout-secs",
        "6",
        "--quota-concurrent-builds",
        "16",
    ]);
    let d = tempfile::tempdir().expect("scratch");
    let p = d.path();
    let cases: Vec<(&str, PathBuf, &str)> = vec![
        (
            "run-fails",
            dockerfile(
                p,
                "a",
                "FROM kiln/busybox\nRUN echo before && exit 3\nCMD [\"true\"]\n",
            ),
            "exited with code 3",
        ),
        (
            "unknown-instr",
            dockerfile(p, "b", "FROM kiln/busybox\nFROBNICATE now\n"),
            "line 2",
        ),
        (
            "no-dockerfile",
            zip_of(p, "c", &[("app.py", b"print(1)\n", 0o644)]),
            "Dockerfile",
        ),
        (
            "zip-slip",
            zip_of(
                p,
                "e",
                &[
                    ("Dockerfile", b"FROM kiln/busybox\n", 0o644),
                    ("../../etc/evil", b"x", 0o644),
                ],
            ),
            "evil",
        ),
        (
            "bad-base",
            dockerfile(p, "f", "FROM ubuntu:24.04\nCMD [\"true\"]\n"),
            "FROM ubuntu:24.04",
        ),
        (
            "never-ready",
            dockerfile(
                p,
                "g",
                "FROM kiln/busybox\nEXPOSE 9000\nCMD [\"sleep\", \"600\"]\n",
            ),
            "not ready",
        ),
        (
            "app-exits",
            dockerfile(p, "h", "FROM kiln/busybox\nCMD [\"false\"]\n"),
            "exited (code 1)",
        ),
        (
            "copy-missing",
            dockerfile(
                p,
                "i",
                "FROM kiln/busybox\nCOPY nothere /x\nCMD [\"true\"]\n",
            ),
            "nothere",
        ),
        (
            "disk-fills",
            dockerfile(
                p,
                "k",
                "FROM kiln/busybox\nRUN dd if=/dev/zero of=/fill bs=1M count=400\nCMD [\"true\"]\n",
            ),
            "exited with code 1",
        ),
        (
            "not-utf8",
            zip_of(
                p,
                "j",
                &[(
                    "Dockerfile",
                    b"FROM kiln/busybox\nRUN echo \xff\xfe\n",
                    0o644,
                )],
            ),
            "UTF-8",
        ),
    ];

    let mut outcomes = Vec::new();
    for (name, zip, _) in &cases {
        let (code, _, err) = kilnd.create_image(name, zip);
        assert_eq!(code, 0, "{name}: {err}");
    }
    for (name, _, _) in &cases {
        outcomes.push(kilnd.wait_version(name, "1"));
    }
    let (_, images, _) = kilnd.aws(&["list-microvm-images"]);
    let log = kilnd.get("/kiln/v1/images/run-fails/versions/1/build-log");
    let work_left: Vec<_> = std::fs::read_dir(kilnd.home.path().join("work"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();

    for ((name, _, reason), outcome) in cases.iter().zip(&outcomes) {
        assert_eq!(outcome["state"], "FAILED", "{name}: {outcome}");
        let got = outcome["stateReason"].as_str().unwrap_or_default();
        assert!(
            got.contains(reason),
            "{name}: expected '{reason}' in: {got}"
        );
    }
    assert!(outcomes[0]["stateReason"]
        .as_str()
        .unwrap_or_default()
        .contains("step 2/3"));
    assert!(log.contains("before"), "{log}");
    assert!(kilnd
        .get("/kiln/v1/images/disk-fills/versions/1/build-log")
        .contains("No space left on device"));
    assert_eq!(images["items"].as_array().map(Vec::len), Some(cases.len()));
    assert!(images["items"]
        .as_array()
        .into_iter()
        .flatten()
        .all(|i| i["state"] == "CREATE_FAILED"));
    assert!(work_left.is_empty(), "{work_left:?}");
    assert!(!kilnd.qemu_running());
    assert!(!std::path::Path::new("/etc/evil").exists());
}

#[test]
fn api_when_requests_are_wrong_then_aws_cli_reports_the_typed_error() {
    let kilnd = Daemon::start(&[]);
    let d = tempfile::tempdir().expect("scratch");
    let zip = dockerfile(
        d.path(),
        "ok",
        "FROM kiln/busybox\nCMD [\"httpd\", \"-f\", \"-p\", \"8080\"]\n",
    );

    let (bad_name, _, bad_name_err) = kilnd.create_image("no spaces allowed", &zip);
    let (missing, _, missing_err) = kilnd.aws(&["get-microvm-image", "--image-identifier", "nope"]);
    let (first, _, _) = kilnd.create_image("twice", &zip);
    let (second, _, second_err) = kilnd.create_image("twice", &zip);
    let (bad_base, _, bad_base_err) = kilnd.aws(&[
        "create-microvm-image",
        "--name",
        "x",
        "--base-image-arn",
        "arn:aws:lambda:local:aws:microvm-image:windows",
        "--build-role-arn",
        "arn:aws:iam::000000000000:role/kiln-build",
        "--code-artifact",
        "uri=file:///tmp/x.zip",
    ]);
    let (bad_page, _, bad_page_err) = kilnd.aws(&["list-microvm-images", "--max-results", "500"]);
    let boto = kilnd
        .python()
        .arg(common::workspace().join("crates/kilnd/tests/boto3_errors.py"))
        .arg(&kilnd.url)
        .arg(&zip)
        .output()
        .expect("run python");
    kilnd.wait_version("twice", "1");

    assert_ne!(bad_name, 0);
    assert!(
        bad_name_err.contains("ValidationException") && bad_name_err.contains("name"),
        "{bad_name_err}"
    );
    assert!(
        missing_err.contains("ResourceNotFoundException"),
        "{missing} {missing_err}"
    );
    assert_eq!(first, 0);
    assert!(
        second_err.contains("ConflictException"),
        "{second} {second_err}"
    );
    assert!(
        bad_base_err.contains("ValidationException") && bad_base_err.contains("managed image"),
        "{bad_base} {bad_base_err}"
    );
    assert!(
        bad_page_err.contains("ValidationException"),
        "{bad_page} {bad_page_err}"
    );
    assert!(
        boto.status.success(),
        "{}{}",
        String::from_utf8_lossy(&boto.stdout),
        String::from_utf8_lossy(&boto.stderr)
    );
}

#[test]
fn copy_when_sources_name_host_paths_then_they_resolve_inside_the_context_only() {
    let kilnd = Daemon::start(&[]);
    let d = tempfile::tempdir().expect("scratch");
    let p = d.path();
    let cases = [
        (
            "dev-zero",
            dockerfile(p, "z", "FROM kiln/busybox\nCOPY ../../../../dev/zero /z\n"),
        ),
        (
            "host-path",
            dockerfile(p, "h", "FROM kiln/busybox\nCOPY /etc/hostname /h\n"),
        ),
        (
            "parent",
            zip_of(
                p,
                "x",
                &[
                    (
                        "Dockerfile",
                        b"FROM kiln/busybox\nCOPY ../x /x\nRUN cat /x && exit 7\n",
                        0o644,
                    ),
                    ("x", b"the context's own x\n", 0o644),
                ],
            ),
        ),
    ];

    for (name, zip) in &cases {
        let (code, _, err) = kilnd.create_image(name, zip);
        assert_eq!(code, 0, "{name}: {err}");
    }
    let outcomes: Vec<_> = cases
        .iter()
        .map(|(name, _)| kilnd.wait_version(name, "1"))
        .collect();
    let parent_log = kilnd.get("/kiln/v1/images/parent/versions/1/build-log");

    let reason = |i: usize| {
        outcomes[i]["stateReason"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(outcomes[0]["state"], "FAILED", "{}", outcomes[0]);
    assert!(
        reason(0).contains("COPY source ../../../../dev/zero is not in the build context (looked for \"dev/zero\" in the context"),
        "{}",
        reason(0)
    );
    assert_eq!(outcomes[1]["state"], "FAILED", "{}", outcomes[1]);
    assert!(
        reason(1).contains(
            "COPY source /etc/hostname is not in the build context (looked for \"etc/hostname\""
        ),
        "{}",
        reason(1)
    );
    // `../x` is the context's x, as BuildKit cleans it: copied, then the RUN shows it.
    assert!(reason(2).contains("exited with code 7"), "{}", reason(2));
    assert!(parent_log.contains("the context's own x"), "{parent_log}");
}

#[test]
fn kilnd_when_asked_for_unconfined_vms_without_the_flag_then_refuses_to_start() {
    let home = tempfile::tempdir().expect("home");

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kilnd"))
        .arg("--home")
        .arg(home.path())
        .args([
            "--api-listen",
            "127.0.0.1:0",
            "--endpoint-listen",
            "127.0.0.1:0",
        ])
        .env("KILN_JAIL", "off")
        .output()
        .expect("run kilnd");
    let stderr = String::from_utf8_lossy(&out.stderr);

    assert!(!out.status.success(), "kilnd started: {stderr}");
    assert!(
        stderr.contains("kilnd runs them only with --unconfined"),
        "{stderr}"
    );
}

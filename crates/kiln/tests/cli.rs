//! The `kiln` binary as a user runs it.

use std::path::PathBuf;
use std::process::Command;

fn home() -> PathBuf {
    std::env::var_os("KILN_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/kiln-test-home")
        })
}

fn kiln(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.args(args).env("KILN_HOME", home());
    cmd
}

#[test]
fn doctor_when_host_is_ready_then_json_says_so_and_exits_zero() {
    let out = kiln(&["doctor", "--output", "json"])
        .output()
        .expect("run kiln");

    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(report["can_run_microvms"], true);
    assert!(report["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .any(|c| c["name"] == "accelerator"));
}

#[test]
fn doctor_when_qemu_is_missing_then_says_what_to_install_and_fails() {
    let out = kiln(&["doctor"])
        .env("KILN_QEMU", "/nonexistent/qemu-system-x86_64")
        .output()
        .expect("run kiln");

    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(text.contains("FAIL  qemu"), "{text}");
    assert!(text.contains("apt-get install qemu-system-x86"), "{text}");
}

#[test]
fn doctor_when_accel_override_is_bogus_then_names_the_variable() {
    let out = kiln(&["doctor"])
        .env("KILN_ACCEL", "warp")
        .output()
        .expect("run kiln");

    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(text.contains("KILN_ACCEL"), "{text}");
}

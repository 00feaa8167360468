//! E2B's SDKs against kilnd, unchanged: `kiln e2b env` prints the environment, the official
//! Python SDK (`e2b` in target/pyenv) creates a sandbox from `base`, runs commands, moves
//! files, pauses and reconnects, lists and kills; a second principal sees none of it; the
//! endpoint refuses envd without the sandbox's access token. Boots VMs (and builds `base` on
//! its first use, a few minutes under TCG).

mod common;

use std::process::Command;

use common::{workspace, Daemon};

/// The `export` lines of `kiln e2b env`, as (name, value).
fn e2b_env(daemon: &Daemon) -> Vec<(String, String)> {
    let out = Command::new(workspace().join("target/release/kiln"))
        .args(["--home"])
        .arg(daemon.home.path())
        .args(["--endpoint", &daemon.url, "e2b", "env"])
        .env_remove("AWS_PROFILE")
        .output()
        .expect("run kiln e2b env (build the workspace's binaries first)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "kiln e2b env: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .map(|l| {
            let (name, value) = l
                .strip_prefix("export ")
                .and_then(|l| l.split_once('='))
                .unwrap_or_else(|| panic!("not an export line: {l}"));
            (name.to_string(), value.trim_matches('\'').to_string())
        })
        .collect()
}

#[test]
fn python_sdk_drives_a_base_sandbox_and_a_second_principal_sees_none_of_it() {
    let daemon = Daemon::start(&[]);
    let env = e2b_env(&daemon);
    let names: Vec<&str> = env.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "E2B_API_URL",
            "E2B_API_KEY",
            "E2B_DOMAIN",
            "E2B_SANDBOX_URL",
            "SSL_CERT_FILE",
            "NODE_EXTRA_CA_CERTS"
        ]
    );
    let (bob, _) = daemon.new_principal("bob");
    let bob_key = format!(
        "e2b_{}",
        format!("{}:{}", bob.id, bob.secret)
            .bytes()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    let out = Command::new(workspace().join("target/pyenv/bin/python"))
        .arg(workspace().join("crates/kilnd/tests/e2b_sdk.py"))
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("OTHER_E2B_API_KEY", bob_key)
        .output()
        .expect("run the E2B SDK script");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("ALL OK"),
        "the SDK script failed:\n{stdout}\n{stderr}\n(kilnd log: {}/kilnd.log)",
        daemon.home.path().display()
    );

    // E2B's JS SDK, on the `base` the Python run built: create, run, kill.
    let js = workspace().join("target/e2b-js");
    assert!(
        js.join("node_modules/e2b").is_dir(),
        "E2B's JS SDK is missing: run `make jsenv`"
    );
    std::fs::copy(
        workspace().join("crates/kilnd/tests/e2b_sdk.mjs"),
        js.join("e2b_sdk.mjs"),
    )
    .expect("copy the JS script next to its node_modules");
    let out = Command::new("node")
        .arg("e2b_sdk.mjs")
        .current_dir(&js)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .expect("run node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("JS OK"),
        "the JS SDK script failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

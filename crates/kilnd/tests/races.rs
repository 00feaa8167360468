//! Lifecycle races through boto3 (`races.py`): terminate during launch, suspend and resume;
//! suspend during resume; a client that gives up during an auto-resume; ten requests at
//! once to a suspended MicroVM. Every race ends in one state, with no QEMU and no capacity
//! reservation left behind (checked on processes and on kilnd's admitted figures).

mod common;

use common::Daemon;
use serde_json::Value;

fn figure(v: &Value, name: &str) -> f64 {
    v[name].as_f64().unwrap_or(-1.0)
}

#[test]
fn races_when_requests_cross_at_several_delays_then_each_ends_in_one_state_and_nothing_leaks() {
    // The races send lifecycle calls faster than the default rates allow; throttling is not
    // what they test.
    let kilnd = Daemon::start(&[
        "--throttle",
        "RunMicrovm=0",
        "--throttle",
        "SuspendMicrovm=0",
        "--throttle",
        "ResumeMicrovm=0",
        "--throttle",
        "TerminateMicrovm=0",
    ]);
    let scratch = tempfile::tempdir().expect("scratch");
    let zip = scratch.path().join("counter.zip");
    common::counter_zip(&zip);
    let (code, _, err) = kilnd.create_image("counter", &zip);
    assert_eq!(code, 0, "{err}");
    let v = kilnd.wait_version("counter", "1");
    assert_eq!(v["state"], "SUCCESSFUL", "{v}");

    let out = kilnd
        .python()
        .current_dir(common::workspace().join("crates/kilnd/tests"))
        .arg("races.py")
        .args([
            kilnd.url.as_str(),
            &kilnd.endpoint_port.to_string(),
            &kilnd.home.path().join("tls/ca.pem").to_string_lossy(),
            "counter",
        ])
        .output()
        .expect("run python");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "races.py failed: {stderr}");
    let seen: Value = serde_json::from_slice(&out.stdout).expect("races.py's JSON");
    eprintln!("races: {seen}");
    let races = seen["races"].as_array().expect("races");
    assert_eq!(races.len(), 3 * 4 + 2, "{seen}");

    for r in races {
        let (race, calls, after) = (r["race"].as_str().unwrap_or(""), &r["calls"], &r["after"]);
        let final_state = r["final"].as_str().unwrap_or("");
        match race {
            "terminate-during-launch" => {
                assert_eq!(final_state, "TERMINATED", "{r}");
                assert_eq!(calls["terminate"], "ok", "{r}");
                assert!(
                    ["ok", "ConflictException"].contains(&calls["run"].as_str().unwrap_or("")),
                    "{r}"
                );
            }
            "terminate-during-suspend" => {
                assert_eq!(final_state, "TERMINATED", "{r}");
                assert_eq!(calls["terminate"], "ok", "{r}");
                assert!(
                    ["ok", "ConflictException"].contains(&calls["suspend"].as_str().unwrap_or("")),
                    "{r}"
                );
            }
            "terminate-during-resume" => {
                assert_eq!(final_state, "TERMINATED", "{r}");
                assert_eq!(calls["second"], "ok", "{r}");
                assert!(
                    ["ok", "ConflictException"].contains(&calls["resume"].as_str().unwrap_or("")),
                    "{r}"
                );
            }
            "suspend-during-resume" => {
                // Either order is fine; both calls succeed and the state says which won.
                assert_eq!(
                    (&calls["resume"], &calls["second"]),
                    (&"ok".into(), &"ok".into()),
                    "{r}"
                );
                assert!(["RUNNING", "SUSPENDED"].contains(&final_state), "{r}");
                let memory = if final_state == "RUNNING" { 512.0 } else { 0.0 };
                assert_eq!(figure(after, "kiln_admitted_microvms"), 1.0, "{r}");
                assert_eq!(figure(after, "kiln_admitted_memory_mib"), memory, "{r}");
                continue;
            }
            "disconnect-during-auto-resume" => {
                assert_eq!(calls["first"], "timed out", "{r}");
                assert_eq!(calls["second"], "200", "the waiting client: {r}");
                assert_eq!(calls["resumes"], 1.0, "one resume: {r}");
                assert_eq!(final_state, "RUNNING", "{r}");
                assert_eq!(figure(after, "kiln_admitted_microvms"), 1.0, "{r}");
                assert_eq!(figure(after, "kiln_admitted_memory_mib"), 512.0, "{r}");
                continue;
            }
            "ten-requests-to-a-suspended-vm" => {
                assert_eq!(calls["statuses"], serde_json::json!(vec![200; 10]), "{r}");
                assert_eq!(calls["resumes"], 1.0, "one resume for ten requests: {r}");
                assert_eq!(final_state, "RUNNING", "{r}");
                continue;
            }
            other => panic!("unknown race {other}: {r}"),
        }
        // Every race that ended TERMINATED holds nothing any more.
        assert_eq!(figure(after, "kiln_admitted_microvms"), 0.0, "{r}");
        assert_eq!(figure(after, "kiln_admitted_memory_mib"), 0.0, "{r}");
    }
    assert_eq!(
        figure(&seen["end"], "kiln_admitted_microvms"),
        0.0,
        "{seen}"
    );
    assert_eq!(
        figure(&seen["end"], "kiln_admitted_memory_mib"),
        0.0,
        "{seen}"
    );
    assert!(!kilnd.qemu_running(), "a QEMU outlived its MicroVM");
    let left: Vec<_> = std::fs::read_dir(kilnd.home.path().join("microvms"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "directories left: {left:?}");
}

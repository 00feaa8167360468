//! Observability end to end: `GET /metrics` after a real build, launch and endpoint
//! requests, and the audit log (`GET /kiln/v1/events`) of the same calls, as admin and as
//! another principal.

mod common;

use std::collections::HashMap;

use common::{http_request, make_zip, Daemon};
use serde_json::Value;

/// A page served by busybox httpd on 8080.
fn hello_image(kilnd: &Daemon, dir: &std::path::Path) {
    let zip = dir.join("hello.zip");
    make_zip(
        &zip,
        &[
            (
                "Dockerfile",
                b"FROM kiln/busybox\nCOPY index.html /www/\nEXPOSE 8080\nCMD [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n",
                0o644,
            ),
            ("index.html", b"hello\n", 0o644),
        ],
    );
    let (code, _, err) = kilnd.create_image("hello", &zip);
    assert_eq!(code, 0, "{err}");
    let v = kilnd.wait_version("hello", "1");
    assert_eq!(v["state"], "SUCCESSFUL", "{v}");
}

/// Parses the Prometheus text exposition format strictly enough to catch a malformed
/// line: `# HELP`/`# TYPE` comments, and `name{label="value",…} number` samples. Returns
/// each series (name with its labels, as written) and its value.
fn parse_prometheus(text: &str) -> Result<HashMap<String, f64>, String> {
    let valid_name = |n: &str| {
        !n.is_empty()
            && !n.starts_with(|c: char| c.is_ascii_digit())
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    };
    let mut series = HashMap::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(comment) = line.strip_prefix("# ") {
            let mut words = comment.splitn(3, ' ');
            let (kind, name, rest) = (words.next(), words.next(), words.next());
            let ok = match kind {
                Some("HELP") => name.is_some_and(valid_name),
                Some("TYPE") => {
                    name.is_some_and(valid_name)
                        && matches!(
                            rest,
                            Some("counter" | "gauge" | "histogram" | "summary" | "untyped")
                        )
                }
                _ => true,
            };
            if !ok {
                return Err(format!("bad comment line: {line}"));
            }
            continue;
        }
        let (key, value) = line
            .rsplit_once(' ')
            .ok_or_else(|| format!("no value: {line}"))?;
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().map_err(|_| format!("bad value: {line}"))?,
        };
        let name = key.split('{').next().unwrap_or_default();
        if !valid_name(name) {
            return Err(format!("bad metric name: {line}"));
        }
        if let Some(labels) = key.strip_prefix(name).filter(|l| !l.is_empty()) {
            let inner = labels
                .strip_prefix('{')
                .and_then(|l| l.strip_suffix('}'))
                .ok_or_else(|| format!("bad labels: {line}"))?;
            for pair in inner.split(',') {
                let (k, v) = pair
                    .split_once('=')
                    .ok_or_else(|| format!("bad label: {line}"))?;
                let quoted = v.len() >= 2 && v.starts_with('"') && v.ends_with('"');
                if !(valid_name(k) && quoted) {
                    return Err(format!("bad label: {line}"));
                }
            }
        }
        series.insert(key.to_string(), value);
    }
    Ok(series)
}

/// `GET /metrics`, unsigned, as Prometheus scrapes it: (content type, text, series).
fn scrape(kilnd: &Daemon) -> (String, String, HashMap<String, f64>) {
    let (status, headers, text) = http_request(&kilnd.url, "GET", "/metrics", &[], b"");
    assert_eq!(status, 200, "{text}");
    let content_type = headers
        .iter()
        .find(|(n, _)| n == "content-type")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let series = parse_prometheus(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    (content_type, text, series)
}

fn value(series: &HashMap<String, f64>, key: &str) -> f64 {
    series.get(key).copied().unwrap_or(f64::NAN)
}

/// `"<status> <body>"` of a GET through the MicroVM's HTTPS endpoint.
fn endpoint_get(kilnd: &Daemon, id: &str, token: &str) -> String {
    let ca = kilnd.home.path().join("tls/ca.pem").display().to_string();
    let out = kilnd
        .python()
        .arg(common::workspace().join("crates/kilnd/tests/endpoint_client.py"))
        .args(["get", &kilnd.endpoint_port.to_string(), &ca, id, "/", token])
        .output()
        .expect("run python");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn events(text: &str) -> Vec<Value> {
    let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
    v["events"].as_array().cloned().expect("an events list")
}

/// `(principal, operation, target, result)` of each event.
fn summary(events: &[Value]) -> Vec<(String, String, String, String)> {
    let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
    events
        .iter()
        .map(|e| {
            (
                s(&e["principal"]),
                s(&e["operation"]),
                s(&e["target"]),
                s(&e["result"]),
            )
        })
        .collect()
}

#[test]
fn observability_when_an_app_is_built_run_and_reached_then_metrics_and_events_show_it() {
    let kilnd = Daemon::start(&[]);
    let scratch = tempfile::tempdir().expect("scratch");
    let admin = kilnd.admin_key();
    hello_image(&kilnd, scratch.path());

    let (refused, _, refused_err) = kilnd.aws(&["run-microvm", "--image-identifier", "nope"]);
    let (code, vm, err) = kilnd.aws(&["run-microvm", "--image-identifier", "hello"]);
    assert_eq!(code, 0, "{err}");
    let id = vm["microvmId"].as_str().unwrap_or_default().to_string();
    let (_, token, _) = kilnd.aws(&[
        "create-microvm-auth-token",
        "--microvm-identifier",
        &id,
        "--expiration-in-minutes",
        "5",
        "--allowed-ports",
        r#"[{"port": 8080}]"#,
    ]);
    let token = token["authToken"]["X-aws-proxy-auth"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let served = endpoint_get(&kilnd, &id, &token);
    let forged = endpoint_get(&kilnd, &id, &format!("{token}x"));
    let (_, _, while_running) = scrape(&kilnd);
    // Usage: time running, then suspended with its saved session on disk.
    std::thread::sleep(std::time::Duration::from_secs(1));
    let (suspended, _, suspend_err) = kilnd.aws(&["suspend-microvm", "--microvm-identifier", &id]);
    std::thread::sleep(std::time::Duration::from_secs(1));
    let usage_of = |key: &common::Key, query: &str| {
        let (status, _, text) = kilnd.request(key, "GET", &format!("/kiln/v1/usage{query}"), b"");
        (
            status,
            serde_json::from_str::<Value>(&text).unwrap_or(Value::String(text)),
        )
    };
    let (usage_status, usage) = usage_of(&admin, "");
    let (usage_cli_ok, usage_table, usage_cli_err) = kilnd.kiln(&["usage"]);
    let (_, _, usage_metrics) = scrape(&kilnd);
    let (alice, _) = kilnd.new_principal("alice");
    let (alice_usage_status, alice_usage) = usage_of(&alice, "");
    let (alice_all_status, _) = usage_of(&alice, "?all=true");
    let (alice_admin_status, _) = usage_of(&alice, "?principal=admin");
    let (alice_terminate, _, _) =
        kilnd.request(&alice, "DELETE", &format!("/2025-09-09/microvms/{id}"), b"");
    let (terminated, _, terminate_err) =
        kilnd.aws(&["terminate-microvm", "--microvm-identifier", &id]);
    let (content_type, metrics_text, metrics) = scrape(&kilnd);
    let (admin_status, _, admin_text) = kilnd.request(&admin, "GET", "/kiln/v1/events", b"");
    let (alice_status, _, alice_text) = kilnd.request(&alice, "GET", "/kiln/v1/events", b"");
    let (since_status, _, since_text) =
        kilnd.request(&admin, "GET", "/kiln/v1/events?since=0&limit=2", b"");
    let (bad_status, _, bad_text) =
        kilnd.request(&admin, "GET", "/kiln/v1/events?since=yesterday", b"");
    let (unsigned, unsigned_headers, _) =
        http_request(&kilnd.url, "GET", "/kiln/v1/events", &[], b"");

    // The launch, the build, the endpoint's answers and the VMs by state.
    assert_ne!(refused, 0, "{refused_err}");
    assert_eq!(served, "200 hello");
    assert!(forged.starts_with("403"), "{forged}");
    assert_eq!(terminated, 0, "{terminate_err}");
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    assert_eq!(
        value(&metrics, "kiln_microvm_launches_total{result=\"ok\"}"),
        1.0
    );
    // The unknown image was refused, not a failed launch.
    assert_eq!(
        value(&metrics, "kiln_microvm_launches_total{result=\"error\"}"),
        0.0
    );
    assert_eq!(value(&metrics, "kiln_microvm_launch_seconds_count"), 1.0);
    assert!(value(&metrics, "kiln_microvm_launch_seconds_sum") > 0.0);
    assert_eq!(
        value(&metrics, "kiln_microvm_launch_seconds_bucket{le=\"+Inf\"}"),
        1.0
    );
    assert_eq!(
        value(&metrics, "kiln_image_builds_total{result=\"ok\"}"),
        1.0
    );
    assert_eq!(value(&metrics, "kiln_image_build_seconds_count"), 1.0);
    assert_eq!(
        value(&while_running, "kiln_microvms{state=\"RUNNING\"}"),
        1.0
    );
    assert_eq!(value(&metrics, "kiln_microvms{state=\"RUNNING\"}"), 0.0);
    assert_eq!(value(&metrics, "kiln_microvms{state=\"TERMINATED\"}"), 1.0);
    assert_eq!(
        value(&metrics, "kiln_proxy_requests_total{code_class=\"2xx\"}"),
        1.0
    );
    assert_eq!(
        value(&metrics, "kiln_proxy_requests_total{code_class=\"4xx\"}"),
        1.0
    );
    assert_eq!(
        value(&metrics, "kiln_proxy_errors_total{reason=\"token\"}"),
        1.0
    );
    assert!(metrics.contains_key("kiln_microvm_suspends_total{result=\"ok\"}"));
    assert!(metrics.contains_key("kiln_microvm_resumes_total{result=\"ok\"}"));
    // Usage of the suspended MicroVM: what it held while running, then its saved session.
    assert_eq!(suspended, 0, "{suspend_err}");
    assert_eq!(usage_status, 200, "{usage}");
    let mine = &usage["microvms"][0];
    assert_eq!(mine["microvmId"], id.as_str(), "{usage}");
    assert_eq!(mine["state"], "SUSPENDED", "{usage}");
    let number = |v: &Value| v.as_f64().unwrap_or(-1.0);
    assert!(number(&mine["vcpuSeconds"]) >= 1.0, "{usage}");
    assert!(
        (number(&mine["memoryGiBSeconds"])
            - number(&mine["vcpuSeconds"]) * number(&mine["memoryMiB"]) / 1024.0)
            .abs()
            < 1e-6,
        "one vCPU: GiB-seconds are vCPU-seconds times GiB: {usage}"
    );
    assert!(number(&mine["suspendedSeconds"]) >= 1.0, "{usage}");
    assert!(number(&mine["snapshotBytes"]) > 0.0, "{usage}");
    assert_eq!(usage["totals"]["microvms"], 1, "{usage}");
    assert!(usage_cli_ok, "{usage_cli_err}");
    assert!(
        usage_table.contains(&id)
            && usage_table.contains("SUSPENDED")
            && usage_table.contains("total (1)"),
        "{usage_table}"
    );
    assert!(value(&usage_metrics, "kiln_usage_vcpu_seconds_total") >= 1.0);
    assert!(value(&usage_metrics, "kiln_usage_suspended_seconds_total") >= 1.0);
    assert!(value(&usage_metrics, "kiln_usage_snapshot_bytes") > 0.0);
    // Another principal sees its own usage only.
    assert_eq!(alice_usage_status, 200, "{alice_usage}");
    assert_eq!(
        alice_usage["microvms"],
        serde_json::json!([]),
        "{alice_usage}"
    );
    assert_eq!((alice_all_status, alice_admin_status), (403, 403));
    // Low-cardinality labels only: no ids, principals or keys.
    for private in [id.as_str(), "admin", "alice", admin.id.as_str(), "hello"] {
        assert!(
            !metrics_text.contains(private),
            "/metrics shows {private}:\n{metrics_text}"
        );
    }

    // The audit log: every mutating call, whose it was, on what, with what result.
    assert_eq!(admin_status, 200, "{admin_text}");
    let all = events(&admin_text);
    let seen = summary(&all);
    let admin_did = |op: &str, target: &str, result: &str| {
        (
            "admin".to_string(),
            op.to_string(),
            target.to_string(),
            result.to_string(),
        )
    };
    for expected in [
        admin_did("CreateMicrovmImage", "hello:1", "ok"),
        admin_did("RunMicrovm", "nope", "ResourceNotFoundException"),
        admin_did("RunMicrovm", &id, "ok"),
        admin_did("CreateMicrovmAuthToken", &id, "ok"),
        admin_did("CreateAccessKey", &alice.id, "ok"),
        admin_did("TerminateMicrovm", &id, "ok"),
        (
            "alice".into(),
            "TerminateMicrovm".into(),
            id.clone(),
            "ResourceNotFoundException".into(),
        ),
    ] {
        assert!(seen.contains(&expected), "{expected:?} not in {seen:#?}");
    }
    assert!(
        !seen
            .iter()
            .any(|(_, op, _, _)| op.starts_with("Get") || op.starts_with("List")),
        "{seen:#?}"
    );
    let run = all
        .iter()
        .find(|e| e["operation"] == "RunMicrovm" && e["result"] == "ok")
        .expect("the run event");
    assert_eq!(run["accessKeyId"], admin.id.as_str());
    assert!(run["time"].as_f64().is_some_and(|t| t > 1.7e9), "{run}");
    assert!(
        run["timestamp"]
            .as_str()
            .is_some_and(|t| t.starts_with("20") && t.ends_with('Z')),
        "{run}"
    );
    for secret in [token.as_str(), &admin.secret, &alice.secret] {
        assert!(!admin_text.contains(secret), "a secret in the events");
    }
    // Another principal sees its own events only.
    assert_eq!(alice_status, 200, "{alice_text}");
    assert_eq!(
        summary(&events(&alice_text)),
        [(
            "alice".to_string(),
            "TerminateMicrovm".to_string(),
            id.clone(),
            "ResourceNotFoundException".to_string()
        )]
    );
    assert_eq!(alice_terminate, 404);
    assert_eq!(since_status, 200, "{since_text}");
    assert_eq!(
        summary(&events(&since_text))
            .iter()
            .map(|s| s.1.as_str())
            .collect::<Vec<_>>(),
        ["CreateMicrovmImage", "RunMicrovm"]
    );
    assert_eq!(bad_status, 400, "{bad_text}");
    assert!(bad_text.contains("epoch seconds"), "{bad_text}");
    assert_eq!(unsigned, 403);
    assert!(
        unsigned_headers
            .iter()
            .any(|(n, v)| n == "x-amzn-errortype" && v.starts_with("MissingAuthenticationToken")),
        "{unsigned_headers:?}"
    );
}

//! Network isolation, as an attacker inside a guest would try it: a build step and a running
//! MicroVM probe kilnd's API, the endpoint, another tenant's MicroVM, the guest's gateway,
//! the host's own address and a private service; and egress connectors let through exactly
//! what they name. Traffic goes only to loopback and to the namespace `PrivateService`
//! creates.

mod common;

use std::time::{Duration, Instant};

use common::{make_zip, Daemon, PrivateService};
use serde_json::Value;

/// A port of the test's private service.
const SERVICE_PORT: u16 = 8000;
/// A port on the host's own address of the test link.
const HOST_PORT: u16 = 8001;

/// Busybox shell that tries each `host:port` and prints `REACHED` when anything answers.
/// A connection the gateway refuses is accepted by QEMU's network stack and closed at once,
/// so "connected" means nothing: only an answer counts.
fn probe_script(targets: &[String]) -> String {
    let mut s = String::from("#!/bin/sh\n");
    for t in targets {
        let (h, p) = t.rsplit_once(':').unwrap_or((t, "80"));
        s.push_str(&format!(
            "out=$(printf 'GET /cgi-bin/count HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {h} {p} 2>/dev/null | head -c 64)\n\
             if [ -n \"$out\" ]; then echo \"REACHED {t}\"; else echo \"blocked {t}\"; fi\n"
        ));
    }
    s
}

fn launch(kilnd: &Daemon, image: &str, extra: &[&str]) -> String {
    let mut args = vec!["run-microvm", "--image-identifier", image];
    args.extend_from_slice(extra);
    let (code, vm, err) = kilnd.aws(&args);
    assert_eq!(code, 0, "{err}");
    vm["microvmId"].as_str().unwrap_or_default().to_string()
}

fn build(kilnd: &Daemon, name: &str, zip: &std::path::Path, egress: &str) -> String {
    let uri = format!("file://{}", zip.display());
    let (code, _, err) = kilnd.create_image_with(
        &kilnd.credentials(),
        name,
        &uri,
        &["--egress-network-connectors", egress],
    );
    assert_eq!(code, 0, "{err}");
    let deadline = Instant::now() + Duration::from_secs(300);
    let log_path = format!("/kiln/v1/images/{name}/versions/1/build-log");
    let v = loop {
        let (_, v, _) = kilnd.aws(&[
            "get-microvm-image-version",
            "--image-identifier",
            name,
            "--image-version",
            "1",
        ]);
        if !matches!(v["state"].as_str(), Some("PENDING" | "IN_PROGRESS")) {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "build of {name} did not end:\n{}",
            kilnd.get(&log_path)
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    let log = kilnd.get(&log_path);
    assert_eq!(v["state"], "SUCCESSFUL", "{v}\n{log}");
    log
}

/// `GET path` through the MicroVM's HTTPS endpoint with a fresh token: the body.
fn endpoint_get(kilnd: &Daemon, id: &str, path: &str) -> String {
    let token = kilnd.token_as(&kilnd.credentials(), id);
    let ca = kilnd.home.path().join("tls/ca.pem");
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "60", "--cacert"])
        .arg(&ca)
        .args([
            "--resolve",
            &format!("{id}.kiln.localhost:{}:127.0.0.1", kilnd.endpoint_port),
        ])
        .args(["-H", &format!("X-aws-proxy-auth: {token}")])
        .arg(format!(
            "https://{id}.kiln.localhost:{}{path}",
            kilnd.endpoint_port
        ))
        .output()
        .expect("curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The host port a MicroVM's QEMU forwards to guest port 8080 (inside its namespace).
fn forward_port(kilnd: &Daemon, id: &str) -> u64 {
    let spec = kilnd
        .home
        .path()
        .join("microvms")
        .join(id)
        .join("vm/spec.json");
    let spec: Value = serde_json::from_slice(&std::fs::read(spec).expect("spec")).expect("json");
    spec["network"]["forwards"][0]["host_port"]
        .as_u64()
        .expect("a forward")
}

#[test]
fn guest_when_it_probes_the_host_kilnd_and_another_vm_then_every_attempt_fails() {
    let kilnd = Daemon::start(&[]);
    let scratch = tempfile::tempdir().expect("scratch");
    let service = PrivateService::new();
    service.listen(service.addrs[0], SERVICE_PORT, b"private\n");
    let host_listener =
        std::net::TcpListener::bind((service.host_addr, HOST_PORT)).expect("host listener");
    host_listener.set_nonblocking(true).expect("nonblocking");

    let victim_zip = scratch.path().join("victim.zip");
    common::counter_zip(&victim_zip);
    build(&kilnd, "victim", &victim_zip, "INTERNET_EGRESS");
    let victim = launch(&kilnd, "victim", &[]);
    let first = endpoint_get(&kilnd, &victim, "/cgi-bin/count");
    let api_port = kilnd.url.rsplit(':').next().unwrap_or_default().to_string();
    let targets: Vec<String> = vec![
        format!("10.0.2.2:{api_port}"),
        format!("10.0.2.2:{}", kilnd.endpoint_port),
        format!("10.0.2.2:{}", forward_port(&kilnd, &victim)),
        format!("{}:{HOST_PORT}", service.host_addr),
        format!("{}:{SERVICE_PORT}", service.addrs[0]),
        format!("127.0.0.1:{api_port}"),
    ];
    let probe = probe_script(&targets);
    let zip = scratch.path().join("attacker.zip");
    let app = "#!/bin/sh\nmkdir -p /www/cgi-bin\nprintf '#!/bin/sh\\nprintf \"Content-Type: text/plain\\\\r\\\\n\\\\r\\\\n\"\\nexec /probe.sh\\n' > /www/cgi-bin/probe\nchmod +x /www/cgi-bin/probe\nexec httpd -f -p 8080 -h /www\n";
    make_zip(
        &zip,
        &[
            (
                "Dockerfile",
                b"FROM kiln/busybox\nCOPY probe.sh app.sh /\nRUN /probe.sh\nCMD [\"/bin/sh\", \"/app.sh\"]\n",
                0o644,
            ),
            ("probe.sh", probe.as_bytes(), 0o755),
            ("app.sh", app.as_bytes(), 0o755),
        ],
    );

    let build_log = build(&kilnd, "attacker", &zip, "INTERNET_EGRESS");
    let attacker = launch(&kilnd, "attacker", &[]);
    let runtime = endpoint_get(&kilnd, &attacker, "/cgi-bin/probe");
    let second = endpoint_get(&kilnd, &victim, "/cgi-bin/count");
    let details: Value = serde_json::from_str(&kilnd.get(&format!("/kiln/v1/microvms/{attacker}")))
        .expect("details");
    let flows: Value =
        serde_json::from_str(&kilnd.get(&format!("/kiln/v1/microvms/{attacker}/flows")))
            .expect("flows");
    let host_reached = host_listener.accept().is_ok();

    assert_eq!(
        build_log.matches("blocked ").count(),
        targets.len(),
        "{build_log}"
    );
    assert!(!build_log.contains("REACHED"), "{build_log}");
    assert_eq!(
        runtime.matches("blocked ").count(),
        targets.len(),
        "{runtime}"
    );
    assert!(!runtime.contains("REACHED"), "{runtime}");
    assert_eq!(
        (first.trim(), second.trim()),
        ("101", "102"),
        "the victim's state changed"
    );
    assert!(service.seen(service.addrs[0], SERVICE_PORT).is_empty());
    assert!(!host_reached, "a guest reached the host's own address");
    assert_eq!(
        details["network"]["egress"]["kind"], "internet",
        "{details}"
    );
    let blocked: Vec<&Value> = flows["flows"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|f| f["allowed"] == Value::Bool(false))
        .collect();
    // Every target but the guest's own loopback (which never leaves the guest) is a flow.
    assert!(blocked.len() >= targets.len() - 1, "{flows}");
    assert!(
        blocked.iter().any(|f| f["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("loopback")),
        "{flows}"
    );
}

/// A TLS ClientHello carrying `name` as its SNI (enough for the gateway to read it).
fn client_hello(name: &str) -> Vec<u8> {
    let mut sni = vec![0u8];
    sni.extend_from_slice(&(name.len() as u16).to_be_bytes());
    sni.extend_from_slice(name.as_bytes());
    let mut list = (sni.len() as u16).to_be_bytes().to_vec();
    list.extend_from_slice(&sni);
    let mut ext = vec![0, 0];
    ext.extend_from_slice(&(list.len() as u16).to_be_bytes());
    ext.extend_from_slice(&list);
    let mut body = vec![3, 3];
    body.extend_from_slice(&[7u8; 32]);
    body.push(0);
    body.extend_from_slice(&[0, 2, 0x13, 0x01, 1, 0]);
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend_from_slice(&ext);
    let mut hs = vec![1];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut rec = vec![0x16, 3, 1];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}

#[test]
fn connector_when_it_allows_named_services_then_only_their_names_addresses_and_ports_work() {
    let service = PrivateService::new();
    let [a, b] = service.addrs;
    for addr in [a, b] {
        service.listen(addr, 8443, b"");
    }
    service.listen(a, SERVICE_PORT, b"");
    let scratch = tempfile::tempdir().expect("scratch");
    let hosts = scratch.path().join("hosts");
    std::fs::write(
        &hosts,
        format!("{a} svc-a.test\n{b} svc-b.test\n{b} svc-c.test\n"),
    )
    .expect("hosts");
    let kilnd = Daemon::start(&["--egress-hosts", &hosts.display().to_string()]);
    let (status, _, body) = kilnd.request(
        &kilnd.admin_key(),
        "POST",
        "/kiln/v1/connectors",
        br#"{"name":"svc","allow":["svc-a.test:8443","svc-b.test:8443"]}"#,
    );
    assert_eq!(status, 201, "{body}");
    let steps = format!(
        "#!/bin/sh\n\
         nslookup svc-a.test >/dev/null 2>&1 && echo RESOLVED-A || echo NXDOMAIN-A\n\
         nslookup svc-b.test >/dev/null 2>&1 && echo RESOLVED-B || echo NXDOMAIN-B\n\
         nslookup svc-c.test >/dev/null 2>&1 && echo RESOLVED-C || echo NXDOMAIN-C\n\
         nslookup deb.debian.org >/dev/null 2>&1 && echo RESOLVED-PUBLIC || echo NXDOMAIN-PUBLIC\n\
         nc -w 3 svc-a.test 8443 < /hello-a.bin >/dev/null 2>&1\n\
         nc -w 3 {b} 8443 < /hello-a.bin >/dev/null 2>&1\n\
         printf 'GET / HTTP/1.0\\r\\nHost: svc-a.test\\r\\n\\r\\n' | nc -w 3 {b} 8443 >/dev/null 2>&1\n\
         printf 'knock-9000' | nc -w 3 {a} {SERVICE_PORT} >/dev/null 2>&1\n\
         echo steps-done\n"
    );
    let zip = scratch.path().join("egress.zip");
    make_zip(
        &zip,
        &[
            (
                "Dockerfile",
                b"FROM kiln/busybox\nCOPY steps.sh hello-a.bin /\nRUN /steps.sh\nCMD [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/\"]\n",
                0o644,
            ),
            ("steps.sh", steps.as_bytes(), 0o755),
            ("hello-a.bin", &client_hello("svc-a.test"), 0o644),
        ],
    );
    let log = build(&kilnd, "egress", &zip, "svc");

    let deadline = Instant::now() + Duration::from_secs(10);
    while service.seen(a, 8443).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        log.contains("RESOLVED-A") && log.contains("RESOLVED-B"),
        "{log}"
    );
    assert!(
        log.contains("NXDOMAIN-C"),
        "a name outside the allow-list resolved:\n{log}"
    );
    assert!(log.contains("NXDOMAIN-PUBLIC"), "{log}");
    assert!(log.contains("steps-done"), "{log}");
    let at_a = service.seen(a, 8443);
    assert_eq!(at_a.len(), 1, "the allowed name's address got {at_a:?}");
    assert_eq!(at_a[0], client_hello("svc-a.test"));
    assert!(
        service.seen(b, 8443).is_empty(),
        "SNI or Host of svc-a reached svc-b's address (domain fronting)"
    );
    assert!(
        service.seen(a, SERVICE_PORT).is_empty(),
        "a port outside the allow-list was reached"
    );
}

#[test]
fn connectors_when_invalid_then_validation_errors_name_them() {
    let kilnd = Daemon::start(&[]);
    let scratch = tempfile::tempdir().expect("scratch");
    let zip = scratch.path().join("any.zip");
    common::counter_zip(&zip);
    let cases: [(&[&str], &str); 4] = [
        (
            &["--egress-network-connectors", "internet"],
            "Unknown network connector",
        ),
        (
            &[
                "--ingress-network-connectors",
                "ALL_INGRESS",
                "HTTP_INGRESS",
            ],
            "ALL_INGRESS cannot be combined",
        ),
        (
            &["--egress-network-connectors", "HTTP_INGRESS"],
            "ingress connector",
        ),
        (
            &["--ingress-network-connectors", "INTERNET_EGRESS"],
            "egress connector",
        ),
    ];
    let (code, _, err) = kilnd.create_image("any", &zip);
    assert_eq!(code, 0, "{err}");
    for (args, message) in cases {
        let mut all = vec!["run-microvm", "--image-identifier", "any"];
        all.extend_from_slice(args);
        let (code, _, err) = kilnd.aws(&all);
        assert_ne!(code, 0, "{args:?} was accepted");
        assert!(
            err.contains("ValidationException") && err.contains(message),
            "{args:?}: {err}"
        );
    }
    let (code, _, err) = kilnd.aws(&[
        "create-microvm-image",
        "--name",
        "bad-egress",
        "--base-image-arn",
        "arn:aws:lambda:local:aws:microvm-image:busybox",
        "--build-role-arn",
        "arn:aws:iam::000000000000:role/kiln-build",
        "--code-artifact",
        &format!("uri=file://{}", zip.display()),
        "--egress-network-connectors",
        "arn:aws:lambda:local:aws:network-connector:aws-network-connector:VPC_EGRESS",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("Unknown network connector"), "{err}");
}

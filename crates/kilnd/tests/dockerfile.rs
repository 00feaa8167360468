//! Docker's build semantics in real build VMs (busybox base): here-documents, cache mounts
//! kept between builds but never in the image, secrets visible to one step only and absent
//! from the image's files and the log, `RUN --network=none`, and `ADD <url>` from a server
//! the build's connector allows. Traffic goes only to loopback and to the namespace
//! `PrivateService` creates.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{make_zip, Daemon, PrivateService};

const PORT: u16 = 8081;
const SECRET: &str = "kiln-secret-9f3a71c2e85b4d06";
const BODY: &str = "downloaded-content\n";
/// IMF-fixdate of 784111777.
const LAST_MODIFIED: &str = "Sun, 06 Nov 1994 08:49:37 GMT";

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn http_reply() -> &'static [u8] {
    let text = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nLast-Modified: {LAST_MODIFIED}\r\nConnection: close\r\n\r\n{BODY}",
        BODY.len()
    );
    Box::leak(text.into_bytes().into_boxed_slice())
}

/// A kilnd with an operator connector `dl` that allows only the test server, by address
/// and as `svc.test` (a name kilnd's resolver answers from an `--egress-hosts` file).
fn daemon_allowing(addr: std::net::Ipv4Addr, scratch: &Path) -> Daemon {
    let hosts = scratch.join("hosts");
    std::fs::write(&hosts, format!("{addr} svc.test\n")).expect("hosts");
    let kilnd = Daemon::start(&["--egress-hosts", &hosts.display().to_string()]);
    let connector = format!(r#"{{"name":"dl","allow":["{addr}:{PORT}","svc.test:{PORT}"]}}"#);
    let (status, _, text) = kilnd.request(
        &kilnd.admin_key(),
        "POST",
        "/kiln/v1/connectors",
        connector.as_bytes(),
    );
    assert_eq!(status, 201, "{text}");
    kilnd
}

/// Creates (version "1") or updates the image from `dockerfile` with egress connector `dl`;
/// waits; returns (state, build log).
fn build(
    kilnd: &Daemon,
    name: &str,
    version: &str,
    dockerfile: &str,
    dir: &Path,
) -> (String, String) {
    let zip = dir.join(format!("{name}-{version}.zip"));
    make_zip(&zip, &[("Dockerfile", dockerfile.as_bytes(), 0o644)]);
    let uri = format!("uri=file://{}", zip.display());
    let (verb, which) = match version {
        "1" => ("create-microvm-image", "--name"),
        _ => ("update-microvm-image", "--image-identifier"),
    };
    let (code, _, err) = kilnd.aws(&[
        verb,
        which,
        name,
        "--base-image-arn",
        "arn:aws:lambda:local:aws:microvm-image:busybox",
        "--build-role-arn",
        "arn:aws:iam::000000000000:role/kiln-build",
        "--code-artifact",
        &uri,
        "--resources",
        "minimumMemoryInMiB=512",
        "--egress-network-connectors",
        "dl",
    ]);
    assert_eq!(code, 0, "{err}");
    let v = kilnd.wait_version_for(name, version, Duration::from_secs(900));
    let log = kilnd.get(&format!(
        "/kiln/v1/images/{name}/versions/{version}/build-log"
    ));
    (v["state"].as_str().unwrap_or_default().to_string(), log)
}

/// Every file under `dir` (recursively) whose bytes hold `needle`.
fn files_holding(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if meta.is_dir() {
                stack.push(path);
            } else if meta.is_file() {
                let data = std::fs::read(&path).unwrap_or_default();
                if data.windows(needle.len()).any(|w| w == needle) {
                    found.push(path.display().to_string());
                }
            }
        }
    }
    found
}

#[test]
fn build_when_dockerfile_uses_buildkit_features_then_they_behave_as_docker() {
    let secret_sha = sha256_hex(SECRET.as_bytes());
    let body_sha = sha256_hex(BODY.as_bytes());
    let service = PrivateService::new();
    let [a, _] = service.addrs;
    service.listen(a, PORT, http_reply());
    let scratch = tempfile::tempdir().expect("scratch");
    let kilnd = daemon_allowing(a, scratch.path());
    let secrets = format!(
        r#"{{"secrets":{{"tok":"{}"}}}}"#,
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, SECRET)
    );
    let (status, _, text) = kilnd.request(
        &kilnd.admin_key(),
        "PUT",
        "/kiln/v1/images/fidelity/build-secrets",
        secrets.as_bytes(),
    );
    assert_eq!(status, 204, "{text}");
    // By name: kiln-init resolves it with the guest's resolver (the egress gateway's).
    let url = format!("http://svc.test:{PORT}/file.txt");
    let first = format!(
        r#"# syntax=docker/dockerfile:1
FROM kiln/busybox
ENV NAME=kiln
RUN <<EOF
echo heredoc-ran > /heredoc.txt
EOF
COPY <<EOF /etc/inline.conf
name=$NAME
EOF
RUN cat <<'DOC' > /quoted.txt \
    && cat /heredoc.txt /etc/inline.conf /quoted.txt
$HOME stays literal
DOC
RUN --mount=type=cache,target=/var/cache/app,id=app \
    sh -c 'echo "CACHE-SAW-$(cat /var/cache/app/stamp 2>/dev/null || echo nothing)"; echo filled > /var/cache/app/stamp'
RUN --network=none sh -c 'if echo from-none-step | nc -w 3 {a} {PORT}; then echo NONE-REACHED; else echo NONE-BLOCKED; fi'
RUN --mount=type=secret,id=tok,required \
    test "$(sha256sum < /run/secrets/tok | cut -d' ' -f1)" = {secret_sha} && echo SECRET-SEEN
ADD --checksum=sha256:{body_sha} {url} /opt/
RUN echo "MODE-$(stat -c %a /opt/file.txt) MTIME-$(stat -c %Y /opt/file.txt)"; \
    test -e /var/cache/app/stamp && echo CACHE-IN-IMAGE || echo CACHE-ABSENT; \
    test -e /run/secrets/tok && echo SECRET-IN-IMAGE || echo SECRET-ABSENT; \
    echo from-next-step | nc -w 5 {a} {PORT} | grep -q downloaded-content && echo NEXT-STEP-REACHED
CMD ["httpd", "-f", "-p", "8080", "-h", "/"]
"#
    );

    let (state, log) = build(&kilnd, "fidelity", "1", &first, scratch.path());

    assert_eq!(state, "SUCCESSFUL", "{log}");
    for expected in [
        "heredoc-ran",
        "name=kiln",
        "$HOME stays literal",
        "CACHE-SAW-nothing",
        "NONE-BLOCKED",
        "SECRET-SEEN",
        "MODE-600 MTIME-784111777",
        "CACHE-ABSENT",
        "SECRET-ABSENT",
        "NEXT-STEP-REACHED",
    ] {
        assert!(
            log.contains(expected),
            "no {expected:?} in the build log:\n{log}"
        );
    }
    let seen: Vec<String> = service
        .seen(a, PORT)
        .iter()
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .collect();
    assert!(
        seen.iter().any(|s| s.contains("from-next-step")),
        "{seen:?}"
    );
    assert!(
        !seen.iter().any(|s| s.contains("from-none-step")),
        "the --network=none step reached the server: {seen:?}"
    );
    // The image's disk, memory and state files, the layer cache, the logs: no secret.
    let holding = files_holding(kilnd.home.path(), SECRET.as_bytes());
    assert_eq!(holding, Vec::<String>::new(), "files holding the secret");
    let image_dir = kilnd.home.path().join("images/fidelity");
    assert_eq!(
        files_holding(&image_dir, b"filled\n"),
        Vec::<String>::new(),
        "the image holds the cache's content"
    );

    // A second build of the image sees what the first left in the cache.
    let second = "FROM kiln/busybox\n\
        RUN --mount=type=cache,target=/var/cache/app,id=app \\\n    \
        sh -c 'echo \"CACHE-SAW-$(cat /var/cache/app/stamp)\"'\n\
        CMD [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/\"]\n";
    let (state, log) = build(&kilnd, "fidelity", "2", second, scratch.path());

    assert_eq!(state, "SUCCESSFUL", "{log}");
    assert!(log.contains("CACHE-SAW-filled"), "{log}");
}

#[test]
fn build_when_add_checksum_mismatches_then_fails_naming_both_digests() {
    let service = PrivateService::new();
    let [a, _] = service.addrs;
    service.listen(a, PORT, http_reply());
    let scratch = tempfile::tempdir().expect("scratch");
    let kilnd = daemon_allowing(a, scratch.path());
    let wrong = "0".repeat(64);
    let dockerfile = format!(
        "FROM kiln/busybox\nADD --checksum=sha256:{wrong} http://{a}:{PORT}/f /f\nCMD [\"sh\"]\n"
    );

    let (state, log) = build(&kilnd, "mismatch", "1", &dockerfile, scratch.path());

    assert_eq!(state, "FAILED", "{log}");
    let got = sha256_hex(BODY.as_bytes());
    assert!(
        log.contains(&format!("expected sha256:{wrong}, got sha256:{got}")),
        "{log}"
    );
}

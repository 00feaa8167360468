//! Images end to end: the AWS CLI against a real kilnd, real builds on the busybox base
//! (one of them multi-stage, copying from a stage and from an image the test's own registry
//! on loopback serves).

mod common;
#[path = "../../kiln-image/tests/registry/mod.rs"]
mod registry;

use std::path::Path;

use common::{make_zip, Daemon};
use registry::{Entry, Registry};

/// A Dockerfile that uses most instructions.
const DOCKERFILE: &str = r#"# syntax=docker/dockerfile:1
FROM kiln/busybox
ARG VERSION=7
ENV GREETING=hello \
    WHO="the world"
LABEL org.example.name="tiny app" org.example.version=$VERSION
SHELL ["/bin/sh", "-c"]
WORKDIR /app
COPY www/ ./www/
COPY --chown=nobody:nogroup server.sh /app/
ADD assets.tar.gz /app/www/
RUN echo "built $VERSION for $WHO" > /app/www/version.txt \
 && chmod 755 /app/server.sh \
 && chown -R nobody /app/www
RUN ["/bin/sh", "-c", "test -f /app/www/asset.txt && echo layered"]
USER nobody
EXPOSE 8080
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=1s --timeout=2s CMD wget -q -O /dev/null http://127.0.0.1:8080/ || exit 1
ENTRYPOINT ["/app/server.sh"]
CMD ["8080"]
"#;

const SERVER: &str = "#!/bin/sh\necho \"app says $GREETING to $WHO as $(id -un)\"\nexec httpd -f -p \"$1\" -h /app/www\n";

fn app_zip(dir: &Path) -> std::path::PathBuf {
    let assets = dir.join("assets");
    std::fs::create_dir_all(&assets).expect("assets dir");
    std::fs::write(assets.join("asset.txt"), "from a tarball\n").expect("asset");
    let tar = dir.join("assets.tar.gz");
    let status = std::process::Command::new("tar")
        .arg("czf")
        .arg(&tar)
        .arg("-C")
        .arg(&assets)
        .arg("asset.txt")
        .status()
        .expect("tar");
    assert!(status.success());
    let tarball = std::fs::read(&tar).expect("read tar");
    let zip = dir.join("app.zip");
    make_zip(
        &zip,
        &[
            ("Dockerfile", DOCKERFILE.as_bytes(), 0o644),
            (".dockerignore", b"secret.txt\n", 0o644),
            ("secret.txt", b"do not ship me\n", 0o644),
            ("server.sh", SERVER.as_bytes(), 0o755),
            ("www/index.html", b"<h1>kiln</h1>\n", 0o644),
            ("assets.tar.gz", &tarball, 0o644),
        ],
    );
    zip
}

#[test]
fn create_when_dockerfile_uses_most_instructions_then_built_app_answers_after_restore() {
    let kilnd = Daemon::start(&[]);
    let scratch = tempfile::tempdir().expect("scratch");
    let zip = app_zip(scratch.path());

    let (code, created, err) = kilnd.create_image("tiny", &zip);
    let version = kilnd.wait_version("tiny", "1");
    let (_, image, _) = kilnd.aws(&["get-microvm-image", "--image-identifier", "tiny"]);
    let (_, builds, _) = kilnd.aws(&[
        "list-microvm-image-builds",
        "--image-identifier",
        "tiny",
        "--image-version",
        "1",
    ]);
    let build_id = builds["items"][0]["buildId"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let (_, build, _) = kilnd.aws(&[
        "get-microvm-image-build",
        "--image-identifier",
        "tiny",
        "--image-version",
        "1",
        "--build-id",
        &build_id,
    ]);
    let log = kilnd.get("/kiln/v1/images/tiny/versions/1/build-log");
    let vm = common::Restored::start(&kilnd.home.path().join("images/tiny/1/snapshot"));
    let (page_version, page_asset) = (vm.get("/version.txt"), vm.get("/asset.txt"));
    let secret = vm.sh("test -e /app/secret.txt && echo yes || echo no");
    drop(vm);

    assert_eq!(code, 0, "{err}");
    assert_eq!(created["state"], "CREATING");
    assert_eq!(version["state"], "SUCCESSFUL", "{version}\n{log}");
    assert_eq!(image["state"], "CREATED");
    assert_eq!(image["latestActiveImageVersion"], "1");
    assert!(
        build["snapshotBuild"]["memorySnapshotSizeInBytes"]
            .as_i64()
            .unwrap_or(0)
            > 0,
        "{build}"
    );
    assert!(
        build["snapshotBuild"]["diskSnapshotSizeInBytes"]
            .as_i64()
            .unwrap_or(0)
            > 0,
        "{build}"
    );
    assert!(
        log.contains("==> step 10/17 (Dockerfile line 12): RUN echo"),
        "{log}"
    );
    assert!(log.contains("layered"), "{log}");
    assert!(log.contains("HEALTHCHECK"), "{log}");
    assert_eq!(page_version, "built 7 for the world\n");
    assert_eq!(page_asset, "from a tarball\n");
    assert!(
        log.contains("app says hello to the world as nobody"),
        "{log}"
    );
    assert_eq!(secret, "no\n");

    // A new version from the same code reuses every cached layer; versions switch off.
    let (code, updated, err) = kilnd.aws(&[
        "update-microvm-image",
        "--image-identifier",
        "tiny",
        "--base-image-arn",
        "arn:aws:lambda:local:aws:microvm-image:busybox",
        "--build-role-arn",
        "arn:aws:iam::000000000000:role/kiln-build",
        "--code-artifact",
        &format!("uri=file://{}", zip.display()),
        "--resources",
        "minimumMemoryInMiB=512",
    ]);
    // What `kiln logs tiny --follow` asks for (the CLI's own tests drive the CLI): the
    // stream ends when the build does.
    let followed = kilnd.get("/kiln/v1/images/tiny/versions/2/build-log?follow=true");
    let v2 = kilnd.wait_version("tiny", "2");
    let log2 = kilnd.get("/kiln/v1/images/tiny/versions/2/build-log");
    let (_, _, _) = kilnd.aws(&[
        "update-microvm-image-version",
        "--image-identifier",
        "tiny",
        "--image-version",
        "2",
        "--status",
        "INACTIVE",
    ]);
    let (_, image2, _) = kilnd.aws(&["get-microvm-image", "--image-identifier", "tiny"]);
    let (_, versions, _) =
        kilnd.aws(&["list-microvm-image-versions", "--image-identifier", "tiny"]);
    let (deleted, _, _) = kilnd.aws(&[
        "delete-microvm-image-version",
        "--image-identifier",
        "tiny",
        "--image-version",
        "1",
    ]);
    let (gone, _, gone_err) = kilnd.aws(&[
        "get-microvm-image-version",
        "--image-identifier",
        "tiny",
        "--image-version",
        "1",
    ]);

    assert_eq!(code, 0, "{err}");
    assert_eq!(updated["imageVersion"], "2");
    assert_eq!(v2["state"], "SUCCESSFUL", "{v2}\n{log2}");
    assert!(followed.contains("image ready"), "{followed}");
    assert_eq!(log2.matches("    cached").count(), 6, "{log2}");
    assert!(!log2.contains("booting the build VM"), "{log2}");
    assert_eq!(image2["state"], "UPDATED");
    assert_eq!(image2["latestActiveImageVersion"], "1");
    assert_eq!(versions["items"].as_array().map(Vec::len), Some(2));
    assert_eq!(versions["items"][1]["status"], "INACTIVE");
    assert_eq!(deleted, 0);
    assert_ne!(gone, 0);
    assert!(gone_err.contains("ResourceNotFoundException"), "{gone_err}");
    assert!(!kilnd.qemu_running());
}

/// A hooks listener in busybox: answers every request on port 9000 with 200.
const HOOKED_APP: &str = "#!/bin/sh\n(while true; do printf 'HTTP/1.0 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\nok' | nc -l -p 9000 >/dev/null; done) &\nexec httpd -f -p 8080 -h /\n";

#[test]
fn create_when_ready_and_validate_hooks_are_enabled_then_both_are_called() {
    let kilnd = Daemon::start(&[]);
    let scratch = tempfile::tempdir().expect("scratch");
    let zip = scratch.path().join("hooked.zip");
    make_zip(
        &zip,
        &[
            (
                "Dockerfile",
                b"FROM kiln/busybox\nCOPY app.sh /\nCMD [\"/bin/sh\", \"/app.sh\"]\n",
                0o644,
            ),
            ("app.sh", HOOKED_APP.as_bytes(), 0o755),
        ],
    );

    let (code, _, err) = kilnd.aws(&[
        "create-microvm-image", "--name", "hooked",
        "--base-image-arn", "arn:aws:lambda:local:aws:microvm-image:busybox",
        "--build-role-arn", "arn:aws:iam::000000000000:role/kiln-build",
        "--code-artifact", &format!("uri=file://{}", zip.display()),
        "--resources", "minimumMemoryInMiB=512",
        "--hooks", "port=9000,microvmImageHooks={ready=ENABLED,readyTimeoutInSeconds=60,validate=ENABLED,validateTimeoutInSeconds=30}",
    ]);
    let version = kilnd.wait_version("hooked", "1");
    let log = kilnd.get("/kiln/v1/images/hooked/versions/1/build-log");

    assert_eq!(code, 0, "{err}");
    assert_eq!(version["state"], "SUCCESSFUL", "{version}\n{log}");
    assert_eq!(version["hooks"]["port"], 9000);
    assert!(
        log.contains("POST /aws/lambda-microvms/runtime/v1/ready on port 9000"),
        "{log}"
    );
    assert!(log.contains("validate hook answered 200"), "{log}");
}

/// Stages: `runtime` (no filesystem step: its ENV and CMD carry over to the image, which
/// starts FROM it), `builder` (FROM runtime; a RUN writes the page and a link to its own
/// /etc/kiln), `unused` (a RUN that would fail: skipped), and the image, which copies from
/// the builder by name and by index (through `..` and the link, resolved in the builder's
/// root) and from a registry image (through its `/escape -> /etc` link, resolved in that
/// image's root, so its passwd and not the build VM's).
fn stages_dockerfile(image: &str) -> String {
    format!(
        r#"# syntax=docker/dockerfile:1
ARG BASE=kiln/busybox
FROM --platform=$BUILDPLATFORM ${{BASE}} AS runtime
ENV GREETING=hello
CMD ["httpd", "-f", "-p", "8080", "-h", "/www"]

FROM runtime AS Builder
ARG BASE
RUN mkdir -p /out /etc/kiln && echo "$GREETING from the builder on $BASE" > /out/page.txt \
 && echo builder-etc > /etc/kiln/marker && ln -s /etc/kiln /out/etc-link

FROM kiln/busybox AS unused
RUN false

FROM runtime
COPY --from=builder --chown=nobody /out/page.txt /www/
COPY --from=1 --chmod=640 ../../out/etc-link/marker /www/marker.txt
COPY --from={image} /escape/passwd /www/passwd.txt
"#
    )
}

/// `update-microvm-image` from `zip` on the busybox base; waits; (state, build log).
fn update(kilnd: &Daemon, name: &str, version: &str, zip: &Path) -> (String, String) {
    let (code, _, err) = kilnd.aws(&[
        "update-microvm-image",
        "--image-identifier",
        name,
        "--base-image-arn",
        "arn:aws:lambda:local:aws:microvm-image:busybox",
        "--build-role-arn",
        "arn:aws:iam::000000000000:role/kiln-build",
        "--code-artifact",
        &format!("uri=file://{}", zip.display()),
        "--resources",
        "minimumMemoryInMiB=512",
    ]);
    assert_eq!(code, 0, "{err}");
    let v = kilnd.wait_version(name, version);
    let log = kilnd.get(&format!(
        "/kiln/v1/images/{name}/versions/{version}/build-log"
    ));
    (v["state"].as_str().unwrap_or_default().to_string(), log)
}

#[test]
fn create_when_dockerfile_has_stages_then_the_image_holds_what_it_copied_and_a_rebuild_is_cached() {
    let reg = Registry::start(None);
    let layer = registry::tar_of(&[
        Entry::Dir("etc", 0o755),
        Entry::File("etc/passwd", b"image-passwd\n", 0o644),
        Entry::Symlink("escape", "/etc"),
    ]);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(reg.push_image(
        "kiln-test/files",
        "1",
        &[layer],
        serde_json::json!({}),
        registry::Codec::Gzip,
        "amd64",
    ));
    let image = format!("{}/kiln-test/files:1", reg.host);
    let kilnd = Daemon::start(&[]);
    let scratch = tempfile::tempdir().expect("scratch");
    let zip = scratch.path().join("stages.zip");
    let dockerfile = stages_dockerfile(&image);
    make_zip(&zip, &[("Dockerfile", dockerfile.as_bytes(), 0o644)]);
    let missing = scratch.path().join("missing.zip");
    make_zip(
        &missing,
        &[(
            "Dockerfile",
            b"FROM kiln/busybox AS b\nFROM kiln/busybox\nCOPY --from=b /nope/x /x\nCMD [\"sh\"]\n",
            0o644,
        )],
    );

    let (code, _, err) = kilnd.create_image("stages", &zip);
    let version = kilnd.wait_version("stages", "1");
    let log = kilnd.get("/kiln/v1/images/stages/versions/1/build-log");
    let vm = common::Restored::start(&kilnd.home.path().join("images/stages/1/snapshot"));
    let (page, marker, passwd) = (
        vm.get("/page.txt"),
        vm.get("/marker.txt"),
        vm.get("/passwd.txt"),
    );
    let owners = vm.sh("stat -c '%U %a' /www/page.txt /www/marker.txt");
    drop(vm);
    let (state2, log2) = update(&kilnd, "stages", "2", &zip);
    let (state3, log3) = update(&kilnd, "stages", "3", &missing);

    assert_eq!(code, 0, "{err}");
    assert_eq!(version["state"], "SUCCESSFUL", "{version}\n{log}");
    assert!(
        log.contains("stage unused (Dockerfile line 12) skipped: the image does not need it"),
        "{log}"
    );
    assert!(!log.contains("RUN false"), "{log}");
    assert!(
        log.contains("stage builder: building from stage runtime"),
        "{log}"
    );
    assert_eq!(page, "hello from the builder on kiln/busybox\n");
    assert_eq!(marker, "builder-etc\n");
    assert_eq!(passwd, "image-passwd\n");
    assert_eq!(owners, "nobody 644\nroot 640\n");
    // The second build of the same zip: every filesystem step (the builder's RUN, the three
    // COPYs) is cached, and no build VM boots.
    assert_eq!(state2, "SUCCESSFUL", "{log2}");
    assert_eq!(log2.matches("    cached").count(), 4, "{log2}");
    assert!(!log2.contains("booting the build VM"), "{log2}");
    assert_eq!(state3, "FAILED", "{log3}");
    assert!(
        log3.contains(
            "(Dockerfile line 3: COPY --from=b /nope/x /x) failed: /nope/x is not in stage b \
             (looked for /nope/x in its filesystem)"
        ),
        "{log3}"
    );
    assert!(!kilnd.qemu_running());
}

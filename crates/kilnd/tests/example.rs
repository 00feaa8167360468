//! The shipped example (Flask + gunicorn on kiln/debian:12) builds through kilnd, with
//! apt-get and pip reaching their registries from the build VM, and the restored app serves.
//! Slow under TCG (a few minutes): it is the real thing a user runs first.

mod common;

use std::time::Duration;

use common::Daemon;

#[test]
fn example_python_web_when_built_then_the_restored_app_serves() {
    let ca = "/etc/ssl/certs/ca-certificates.crt";
    let extra: Vec<&str> = if std::path::Path::new(ca).exists() {
        vec!["--build-ca", ca]
    } else {
        vec![]
    };
    let kilnd = Daemon::start(&extra);
    let scratch = tempfile::tempdir().expect("scratch");
    let zip = scratch.path().join("python-web.zip");
    kiln_image::context::zip_dir(&common::workspace().join("examples/python-web"), &zip)
        .expect("zip the example");

    let (code, _, err) = kilnd.aws(&[
        "create-microvm-image",
        "--name",
        "python-web",
        "--base-image-arn",
        "arn:aws:lambda:local:aws:microvm-image:debian-12",
        "--build-role-arn",
        "arn:aws:iam::000000000000:role/kiln-build",
        "--code-artifact",
        &format!("uri=file://{}", zip.display()),
        "--resources",
        "minimumMemoryInMiB=512",
    ]);
    let version = kilnd.wait_version_for("python-web", "1", Duration::from_secs(1200));
    let log = kilnd.get("/kiln/v1/images/python-web/versions/1/build-log");
    let vm = common::Restored::start(&kilnd.home.path().join("images/python-web/1/snapshot"));
    let (home_page, health) = (vm.get("/"), vm.get("/healthz"));
    drop(vm);

    assert_eq!(code, 0, "{err}");
    assert_eq!(version["state"], "SUCCESSFUL", "{version}\n{log}");
    assert!(log.contains("Successfully installed"), "{log}");
    assert!(home_page.contains("kiln"), "{home_page}");
    assert!(health.contains("ok"), "{health}");
}

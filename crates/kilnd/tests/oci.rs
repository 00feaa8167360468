//! `FROM <registry image>` through kilnd: an image that ships python3 (made by the test from
//! the host's Debian python3 and pushed to a registry the test runs on loopback) seeds the
//! build (Cmd, WorkingDir, Env, ExposedPorts) and its ONBUILD trigger copies the app in; the
//! Dockerfile names it as a Docker Hub image (`ARG` before `FROM`), which kilnd pulls through
//! `--registry-mirror docker.io=http://…`; the app answers through the endpoint and serves the
//! AWS hooks on port 9000.

mod common;
#[path = "../../kiln-image/tests/registry/mod.rs"]
mod registry;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{make_zip, Daemon};
use registry::Registry;
use serde_json::json;

/// Appends `src` (a host file, resolved) to the layer as `dest`.
fn add_file(b: &mut tar::Builder<Vec<u8>>, src: &Path, dest: &str) {
    let real = std::fs::canonicalize(src).expect("canonicalize");
    let mut f = std::fs::File::open(&real).expect("open");
    b.append_file(dest, &mut f).expect("append");
}

fn add_dir(b: &mut tar::Builder<Vec<u8>>, dest: &str) {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o755);
    h.set_size(0);
    b.append_data(&mut h, dest, std::io::empty()).expect("dir");
}

fn add_link(b: &mut tar::Builder<Vec<u8>>, dest: &str, target: &str) {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_mode(0o777);
    h.set_size(0);
    b.append_link(&mut h, dest, target).expect("link");
}

/// The libraries `ldd` names for `program`.
fn libraries(program: &str) -> Vec<String> {
    let out = Command::new("ldd").arg(program).output().expect("ldd");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with('/')))
        .map(str::to_string)
        .collect()
}

/// Walks the host's stdlib into the layer, leaving out tests, caches and GUI modules.
fn add_tree(b: &mut tar::Builder<Vec<u8>>, dir: &Path, dest: &str) {
    const SKIP: [&str; 9] = [
        "test",
        "__pycache__",
        "idlelib",
        "tkinter",
        "ensurepip",
        "lib2to3",
        "pydoc_data",
        "dist-packages",
        "turtledemo",
    ];
    add_dir(b, dest);
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .expect("read_dir")
        .flatten()
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name().to_string_lossy().into_owned();
        if SKIP.contains(&name.as_str()) || name.starts_with("config-") {
            continue;
        }
        let ty = e.file_type().expect("type");
        let to = format!("{dest}/{name}");
        if ty.is_dir() {
            add_tree(b, &e.path(), &to);
        } else if ty.is_file() {
            add_file(b, &e.path(), &to);
        }
    }
}

/// Two layers: a merged-/usr system with the host's python3, dash as /bin/sh and their
/// libraries; then the standard library.
fn python_layers() -> Vec<Vec<u8>> {
    let mut sys = tar::Builder::new(Vec::new());
    for d in [
        "usr",
        "usr/bin",
        "usr/lib",
        "usr/lib/x86_64-linux-gnu",
        "usr/lib64",
        "etc",
        "tmp",
        "app",
    ] {
        add_dir(&mut sys, d);
    }
    add_link(&mut sys, "bin", "usr/bin");
    add_link(&mut sys, "lib", "usr/lib");
    add_link(&mut sys, "lib64", "usr/lib64");
    add_file(
        &mut sys,
        Path::new("/usr/bin/python3.11"),
        "usr/bin/python3.11",
    );
    add_link(&mut sys, "usr/bin/python3", "python3.11");
    add_file(&mut sys, Path::new("/bin/dash"), "usr/bin/sh");
    let mut libs = libraries("/usr/bin/python3.11");
    libs.extend(libraries("/bin/dash"));
    libs.sort();
    libs.dedup();
    for lib in libs {
        let dest = format!("usr{}", lib.trim_start_matches("/usr"));
        add_file(&mut sys, Path::new(&lib), &dest);
    }
    let passwd = b"root:x:0:0:root:/root:/bin/sh\n";
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_size(passwd.len() as u64);
    sys.append_data(&mut h, "etc/passwd", &passwd[..])
        .expect("passwd");
    let mut stdlib = tar::Builder::new(Vec::new());
    add_tree(
        &mut stdlib,
        Path::new("/usr/lib/python3.11"),
        "usr/lib/python3.11",
    );
    vec![
        sys.into_inner().expect("tar"),
        stdlib.into_inner().expect("tar"),
    ]
}

/// The app: GET on 8080 shows what the build and the image config gave it; port 9000 serves
/// the AWS hooks and logs each call, which GET /hooks shows.
const APP: &str = r#"
import http.server, json, os, threading

LOG = "/tmp/hooks.log"

class Hooks(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
        with open(LOG, "a") as f:
            f.write("%s %s\n" % (self.path.rsplit("/", 1)[-1], body))
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")
    def log_message(self, *a):
        pass

class App(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/hooks":
            out = open(LOG).read() if os.path.exists(LOG) else ""
        else:
            out = json.dumps({"cwd": os.getcwd(), "greeting": os.environ.get("GREETING"),
                              "built": open("/app/built").read()})
        data = out.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    def log_message(self, *a):
        pass

threading.Thread(target=http.server.HTTPServer(("0.0.0.0", 9000), Hooks).serve_forever, daemon=True).start()
http.server.HTTPServer(("0.0.0.0", 8080), App).serve_forever()
"#;

fn endpoint_get(kilnd: &Daemon, id: &str, path: &str) -> String {
    let token = kilnd.token_as(&kilnd.credentials(), id);
    let ca = kilnd.home.path().join("tls/ca.pem").display().to_string();
    let out = kilnd
        .python()
        .arg(common::workspace().join("crates/kilnd/tests/endpoint_client.py"))
        .args([
            "get",
            &kilnd.endpoint_port.to_string(),
            &ca,
            id,
            path,
            &token,
        ])
        .output()
        .expect("run python");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn python_app_when_from_a_registry_image_then_built_from_its_config_and_onbuild_and_answers_with_hooks(
) {
    let reg = Registry::start(None);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let config = json!({
        "Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "GREETING=from-the-image"],
        "WorkingDir": "/app",
        "Cmd": ["python3", "/app/app.py"],
        "ExposedPorts": {"8080/tcp": {}},
        "OnBuild": ["COPY app.py /app/"],
        "StopSignal": "SIGINT",
    });
    let digest = rt
        .block_on(reg.push_image(
            "kiln-test/python",
            "3.11",
            &python_layers(),
            config,
            registry::Codec::Gzip,
            "amd64",
        ))
        .0;
    // Docker Hub names come from the test's registry, as kilnd's mirror of docker.io.
    let mirror = format!("docker.io=http://{}", reg.host);
    let kilnd = Daemon::start(&["--registry-mirror", &mirror]);
    let scratch = tempfile::tempdir().expect("scratch");
    let zip = scratch.path().join("py.zip");
    let dockerfile = "ARG NS=kiln-test\nFROM ${NS}/python:3.11\nRUN [\"python3\", \"-c\", \"open('built','w').write('yes')\"]\n";
    make_zip(
        &zip,
        &[
            ("Dockerfile", dockerfile.as_bytes(), 0o644),
            ("app.py", APP.as_bytes(), 0o644),
        ],
    );

    let (c, _, e) = kilnd.aws(&[
        "create-microvm-image",
        "--name",
        "py",
        "--base-image-arn",
        "arn:aws:lambda:us-east-1:aws:microvm-image:al2023-1",
        "--build-role-arn",
        "arn:aws:iam::000000000000:role/kiln-build",
        "--code-artifact",
        &format!("uri=file://{}", zip.display()),
        "--resources",
        "minimumMemoryInMiB=512",
        "--hooks",
        "port=9000,microvmHooks={run=ENABLED,runTimeoutInSeconds=10,suspend=ENABLED,\
         suspendTimeoutInSeconds=10,resume=ENABLED,resumeTimeoutInSeconds=10,\
         terminate=ENABLED,terminateTimeoutInSeconds=10},microvmImageHooks={ready=ENABLED}",
    ]);
    assert_eq!(c, 0, "{e}");
    let version = kilnd.wait_version_for("py", "1", Duration::from_secs(600));
    let log = kilnd.get("/kiln/v1/images/py/versions/1/build-log");
    assert_eq!(version["state"], "SUCCESSFUL", "{version}\n{log}");
    let details = kilnd.get("/kiln/v1/images/py/versions/1/details");
    let (images_ok, images, images_err) = kilnd.kiln(&["images"]);
    let (code, vm, err) = kilnd.aws(&[
        "run-microvm",
        "--image-identifier",
        "py",
        "--idle-policy",
        "maxIdleDurationSeconds=600,suspendedDurationSeconds=600,autoResumeEnabled=true",
        "--run-hook-payload",
        r#"{"session":"s-1"}"#,
    ]);
    assert_eq!(code, 0, "{err}");
    let id = vm["microvmId"].as_str().unwrap_or_default().to_string();
    let first = endpoint_get(&kilnd, &id, "/");
    let (s, _, s_err) = kilnd.aws(&["suspend-microvm", "--microvm-identifier", &id]);
    let after_resume = endpoint_get(&kilnd, &id, "/hooks");
    let (t, _, t_err) = kilnd.aws(&["terminate-microvm", "--microvm-identifier", &id]);

    assert!(log.contains(&digest), "{log}");
    assert!(
        log.contains("docker.io/kiln-test/python:3.11") && log.contains("from mirror"),
        "{log}"
    );
    assert!(log.contains("ONBUILD COPY app.py /app/"), "{log}");
    assert!(
        details.contains(&format!(r#""baseDigest": "{digest}""#)),
        "{details}"
    );
    // `kiln images` shows what the newest version was built from.
    assert!(images_ok, "{images_err}");
    assert!(images.contains(&digest[..7 + 12]), "{images}");
    assert!(
        first.starts_with("200 ")
            && first.contains(r#""cwd": "/app""#)
            && first.contains("from-the-image")
            && first.contains(r#""built": "yes""#),
        "{first}"
    );
    assert_eq!((s, t), (0, 0), "{s_err}{t_err}");
    let calls: Vec<&str> = after_resume
        .trim_start_matches("200 ")
        .lines()
        .filter(|l| !l.starts_with("ready"))
        .collect();
    assert_eq!(calls.len(), 3, "{after_resume}");
    assert_eq!(
        calls,
        [
            format!(
                "run {}",
                serde_json::json!({"microvmId": id, "runHookPayload": r#"{"session":"s-1"}"#})
            )
            .as_str(),
            "suspend {}",
            "resume {}"
        ],
        "{after_resume}"
    );
    assert!(!kilnd.qemu_running());
}

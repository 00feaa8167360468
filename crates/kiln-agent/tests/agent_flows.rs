//! Whole flows: `kiln-init --serve-unix` on the host, driven by `AgentClient`.
//! Guest-only operations (clock, entropy, power) are not exercised here.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use kiln_agent::proto::{
    decode_payload, encode_frame, FrameDecoder, GuestBody, GuestMessage, HostBody, HostMessage,
    MAGIC, PROTOCOL_VERSION,
};
use kiln_agent::{
    AgentClient, AgentError, AppSpec, CopySpec, ExecEvent, ExecRequest, HttpFailureKind,
    HttpRequestSpec,
};

const CONNECT: Duration = Duration::from_secs(10);

/// A `kiln-init --serve-unix` process in a temp dir, killed on drop.
struct Server {
    child: Child,
    socket: PathBuf,
    dir: tempfile::TempDir,
}

impl Server {
    fn start() -> Server {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("agent.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_kiln-init"))
            .arg("--serve-unix")
            .arg(&socket)
            .env("KILN_INIT_APP_LOG", dir.path().join("app.log"))
            .spawn()
            .expect("spawn kiln-init");
        Server { child, socket, dir }
    }

    async fn client(&self) -> AgentClient {
        AgentClient::connect(&self.socket, CONNECT)
            .await
            .expect("connect")
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_string_lossy().into_owned()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn sh(script: &str) -> ExecRequest {
    ExecRequest::new(["sh", "-c", script])
}

/// A raw connection for sending frames the client would never send.
fn raw_connect(socket: &Path) -> UnixStream {
    for _ in 0..500 {
        if let Ok(stream) = UnixStream::connect(socket) {
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .expect("read timeout");
            return stream;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("cannot connect to {}", socket.display());
}

fn raw_read_message(stream: &mut UnixStream, decoder: &mut FrameDecoder) -> GuestMessage {
    let mut buf = [0u8; 4096];
    loop {
        if let Some(frame) = decoder.next_frame() {
            return decode_payload(&frame.expect("valid frame")).expect("guest message");
        }
        let n = stream.read(&mut buf).expect("read");
        assert_ne!(n, 0, "server closed the connection");
        decoder.push(&buf[..n]);
    }
}

fn raw_send(stream: &mut UnixStream, id: u64, body: HostBody) {
    let frame = encode_frame(&HostMessage { id, body }).expect("encode");
    stream.write_all(&frame).expect("write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_when_server_running_then_handshake_reports_version() {
    let server = Server::start();

    let client = server.client().await;

    assert_eq!(client.hello_info().version, PROTOCOL_VERSION);
    assert_eq!(client.hello_info().agent_version, env!("CARGO_PKG_VERSION"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_when_connected_then_pong_arrives() {
    let server = Server::start();
    let client = server.client().await;

    let result = client.ping().await;

    assert!(result.is_ok(), "{result:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_when_command_fails_then_code_and_both_streams_reported() {
    let server = Server::start();
    let client = server.client().await;

    let output = client
        .run(sh("echo out; echo err >&2; exit 3"))
        .await
        .expect("run");

    assert_eq!(output.stdout, b"out\n");
    assert_eq!(output.stderr, b"err\n");
    assert_eq!(output.code, Some(3));
    assert_eq!(output.signal, None);
    assert!(!output.timed_out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_when_env_and_cwd_given_then_process_sees_them() {
    let server = Server::start();
    let client = server.client().await;
    let dir = server.dir.path().to_string_lossy().into_owned();

    let output = client
        .run(
            sh("echo \"$GREETING $PATH\"; pwd")
                .env("GREETING", "hi")
                .cwd(&dir),
        )
        .await
        .expect("run");

    let expected = format!("hi {}\n{dir}\n", kiln_agent::proto::DEFAULT_PATH);
    assert_eq!(String::from_utf8_lossy(&output.stdout), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_when_program_missing_then_guest_error() {
    let server = Server::start();
    let client = server.client().await;

    let result = client.run(ExecRequest::new(["/no/such/program"])).await;

    assert!(matches!(result, Err(AgentError::Guest(_))), "{result:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_when_output_is_50mb_then_every_byte_arrives_in_order() {
    let server = Server::start();
    let client = server.client().await;
    let count = 6_500_000u32;
    let expected: String = (1..=count).map(|n| format!("{n}\n")).collect();

    let output = client
        .run(ExecRequest::new(["seq", "1", &count.to_string()]))
        .await
        .expect("run");

    assert!(expected.len() > 50_000_000);
    assert_eq!(output.stdout.len(), expected.len());
    assert!(output.stdout == expected.as_bytes());
    assert_eq!(output.code, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_execs_when_one_waits_for_the_other_then_both_finish() {
    let server = Server::start();
    let client = server.client().await;
    let flag = server.path("flag");
    // The waiter only finishes if the toucher runs while it is still running.
    let waiter = sh(&format!(
        "while [ ! -e {flag} ]; do sleep 0.05; done; echo seen"
    ))
    .timeout(Duration::from_secs(20));
    let toucher = sh(&format!("sleep 0.3; touch {flag}"));

    let (waited, touched) = tokio::join!(client.run(waiter), client.run(toucher));

    let waited = waited.expect("waiter");
    assert_eq!(waited.stdout, b"seen\n");
    assert!(!waited.timed_out);
    assert_eq!(touched.expect("toucher").code, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_with_stdin_when_cat_then_stdout_echoes_it() {
    let server = Server::start();
    let client = server.client().await;
    let input: Vec<u8> = (0..300_000u32).map(|n| (n % 251) as u8).collect();

    let output = client
        .run(ExecRequest::new(["cat"]).stdin(input.clone()))
        .await
        .expect("run");

    assert!(output.stdout == input);
    assert_eq!(output.code, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_when_timeout_expires_then_group_killed_and_timed_out() {
    let server = Server::start();
    let client = server.client().await;

    let output = client
        .run(sh("sleep 30 & sleep 30").timeout(Duration::from_millis(300)))
        .await
        .expect("run");

    assert!(output.timed_out);
    assert_eq!(output.signal, Some(libc::SIGKILL));
    assert_eq!(output.code, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signal_when_sent_to_running_exec_then_it_dies_of_it() {
    let server = Server::start();
    let client = server.client().await;
    let mut stream = client
        .exec(ExecRequest::new(["sleep", "30"]))
        .await
        .expect("exec");
    let started = stream.next_event().await.expect("event");

    client
        .signal(stream.id(), libc::SIGTERM)
        .await
        .expect("signal");
    let exited = stream.next_event().await.expect("event");

    assert!(matches!(started, Some(ExecEvent::Started { .. })));
    assert!(
        matches!(exited, Some(ExecEvent::Exited(s)) if s.signal == Some(libc::SIGTERM)),
        "{exited:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_file_when_read_back_then_same_bytes_and_mode() {
    let server = Server::start();
    let client = server.client().await;
    let path = server.path("a/b/c.bin");
    let data: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();

    client
        .write_file(&path, &data, 0o640, None)
        .await
        .expect("write");
    let read = client.read_file(&path, 1 << 20).await.expect("read");

    assert!(read == data);
    let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
    assert_eq!(mode & 0o7777, 0o640);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_when_no_network_then_only_loopback_and_others_unchanged() {
    let server = Server::start();
    let client = server.client().await;

    let isolated = client
        .run(sh("cut -d: -f1 /proc/self/net/dev | tail -n +3 | tr -d ' '").no_network())
        .await
        .expect("exec");
    let normal = client
        .run(sh(
            "cut -d: -f1 /proc/self/net/dev | tail -n +3 | tr -d ' '",
        ))
        .await
        .expect("exec");

    assert_eq!(String::from_utf8_lossy(&isolated.stdout), "lo\n");
    assert_eq!(
        String::from_utf8_lossy(&normal.stdout),
        std::fs::read_to_string("/proc/self/net/dev")
            .expect("net/dev")
            .lines()
            .skip(2)
            .map(|l| format!("{}\n", l.split(':').next().unwrap_or_default().trim()))
            .collect::<String>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_requests_when_files_and_dirs_then_exists_and_remove_as_documented() {
    let server = Server::start();
    let client = server.client().await;
    let dir = server.path("d");
    let file = server.path("d/f");
    client
        .write_file(&file, b"x", 0o600, None)
        .await
        .expect("write");

    let full_dir = client.remove_path(&dir).await;
    client.remove_path(&file).await.expect("remove file");
    client.remove_path(&dir).await.expect("remove empty dir");

    assert!(
        matches!(full_dir, Err(AgentError::Guest(_))),
        "{full_dir:?}"
    );
    assert!(!client.path_exists(&dir).await.expect("exists"));
    client
        .remove_path(&dir)
        .await
        .expect("nothing there is fine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_when_http_server_on_loopback_then_file_with_digest_mode_and_owner() {
    let server = Server::start();
    let client = server.client().await;
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        let Ok((mut conn, _)) = listener.accept() else {
            return;
        };
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).unwrap_or(0) == 1 {
            head.push(byte[0]);
        }
        let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi");
    });
    let dest = server.path("dl/file");

    let fetched = client
        .fetch(kiln_agent::FetchSpec {
            url: format!("http://localhost:{port}/x"),
            dest: dest.clone(),
            mode: 0o600,
            uid: Some(1),
            gid: Some(2),
            timeout_ms: 5_000,
            ..kiln_agent::FetchSpec::default()
        })
        .await
        .expect("fetch");

    assert_eq!(fetched.bytes, 2);
    assert_eq!(
        fetched.sha256,
        "8f434346648f6b96df89dda901c5176b10a6d83961dd3c1ac88b59b2dc327aa4"
    );
    let meta = std::fs::metadata(&dest).expect("stat");
    assert_eq!(
        (meta.mode() & 0o7777, meta.uid(), meta.gid()),
        (0o600, 1, 2)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_file_when_larger_than_limit_then_guest_error() {
    let server = Server::start();
    let client = server.client().await;
    let path = server.path("big");
    std::fs::write(&path, vec![1u8; 100]).expect("write");

    let result = client.read_file(&path, 99).await;

    assert!(matches!(result, Err(AgentError::Guest(_))), "{result:?}");
}

#[test]
fn malformed_frame_when_sent_then_error_frame_and_still_serving() {
    let server = Server::start();
    let mut stream = raw_connect(&server.socket);
    let mut decoder = FrameDecoder::new();
    let payload = br#"{"id":5,"body":{"type":"launch_missiles"}}"#;
    let mut frame = MAGIC.to_vec();
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(payload);

    stream.write_all(b"garbage").expect("write");
    stream.write_all(&frame).expect("write");
    let error = raw_read_message(&mut stream, &mut decoder);
    raw_send(&mut stream, 6, HostBody::Ping);
    let pong = raw_read_message(&mut stream, &mut decoder);

    assert_eq!(error.id, 5);
    assert!(matches!(error.body, GuestBody::Error { .. }));
    assert_eq!(
        pong,
        GuestMessage {
            id: 6,
            body: GuestBody::Pong
        }
    );
}

#[test]
fn oversized_frame_when_sent_then_error_frame_and_still_serving() {
    let server = Server::start();
    let mut stream = raw_connect(&server.socket);
    let mut decoder = FrameDecoder::new();
    let mut header = MAGIC.to_vec();
    header.extend_from_slice(&u32::MAX.to_be_bytes());

    stream.write_all(&header).expect("write");
    let error = raw_read_message(&mut stream, &mut decoder);
    raw_send(&mut stream, 8, HostBody::Ping);
    let pong = raw_read_message(&mut stream, &mut decoder);

    assert_eq!(error.id, 0);
    assert!(matches!(error.body, GuestBody::Error { .. }));
    assert_eq!(pong.body, GuestBody::Pong);
}

#[test]
fn hello_when_version_unsupported_then_error_frame() {
    let server = Server::start();
    let mut stream = raw_connect(&server.socket);
    let mut decoder = FrameDecoder::new();

    raw_send(
        &mut stream,
        1,
        HostBody::Hello {
            version: PROTOCOL_VERSION + 1,
            client: "test".into(),
        },
    );
    let reply = raw_read_message(&mut stream, &mut decoder);

    assert_eq!(reply.id, 1);
    assert!(matches!(reply.body, GuestBody::Error { .. }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_dropped_mid_exec_when_reconnecting_then_new_client_works() {
    let server = Server::start();
    let first = server.client().await;
    let mut stream = first
        .exec(sh("yes | head -c 20000000; sleep 1"))
        .await
        .expect("exec");
    let _ = stream.next_event().await.expect("event");
    drop(stream);
    drop(first);

    let second = server.client().await;
    let output = second.run(sh("echo again")).await.expect("run");

    assert_eq!(output.stdout, b"again\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_killed_when_exec_pending_then_caller_gets_connection_closed() {
    let mut server = Server::start();
    let client = server.client().await;
    let mut stream = client
        .exec(ExecRequest::new(["sleep", "3"]))
        .await
        .expect("exec");
    let _ = stream.next_event().await.expect("started");

    server.kill();
    let result = stream.next_event().await;

    assert!(
        matches!(result, Err(AgentError::ConnectionClosed)),
        "{result:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_when_socket_never_appears_then_timeout_names_path() {
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("missing.sock");

    let result = AgentClient::connect(&socket, Duration::from_millis(200)).await;

    let message = result.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(message.contains("missing.sock"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_when_peer_never_answers_then_handshake_timeout() {
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("silent.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&socket).expect("bind");

    let result = AgentClient::connect(&socket, Duration::from_millis(1200)).await;

    assert!(
        matches!(result, Err(AgentError::HandshakeTimeout { .. })),
        "{:?}",
        result.err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_dropped_when_exec_stream_kept_then_stream_still_completes() {
    let server = Server::start();
    let client = server.client().await;
    let stream = client.exec(sh("sleep 0.2; echo late")).await.expect("exec");

    drop(client);
    let output = stream.collect().await.expect("collect");

    assert_eq!(output.stdout, b"late\n");
}

// ---- Copy ----

fn copy_spec(src: &str, dest: &str) -> CopySpec {
    CopySpec {
        src: src.into(),
        dest: dest.into(),
        ..CopySpec::default()
    }
}

fn write_with_mode(path: &str, data: &[u8], mode: u32) {
    if let Some(parent) = Path::new(path).parent() {
        std::fs::create_dir_all(parent).expect("mkdir");
    }
    std::fs::write(path, data).expect("write");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_when_file_to_dir_with_slash_then_lands_by_name_with_mode_and_owner() {
    let server = Server::start();
    let client = server.client().await;
    let src = server.path("ctx/run.sh");
    write_with_mode(&src, b"#!/bin/sh\n", 0o750);
    let dest = format!("{}/", server.path("out/bin"));

    let stats = client
        .copy(CopySpec {
            uid: Some(1234),
            gid: Some(5678),
            ..copy_spec(&src, &dest)
        })
        .await
        .expect("copy");

    let copied = server.path("out/bin/run.sh");
    let meta = std::fs::metadata(&copied).expect("stat");
    assert_eq!(std::fs::read(&copied).expect("read"), b"#!/bin/sh\n");
    assert_eq!(meta.mode() & 0o7777, 0o750);
    assert_eq!((meta.uid(), meta.gid()), (1234, 5678));
    assert_eq!(stats.entries, 1);
    assert_eq!(stats.bytes, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_when_file_to_new_name_then_renamed() {
    let server = Server::start();
    let client = server.client().await;
    let src = server.path("ctx/a.txt");
    write_with_mode(&src, b"a", 0o644);

    client
        .copy(copy_spec(&src, &server.path("out/b.txt")))
        .await
        .expect("copy");

    assert_eq!(std::fs::read(server.path("out/b.txt")).expect("read"), b"a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_when_directory_then_contents_copied_and_symlinks_kept() {
    let server = Server::start();
    let client = server.client().await;
    write_with_mode(&server.path("ctx/app/main.py"), b"print(1)\n", 0o644);
    write_with_mode(&server.path("ctx/app/lib/util.py"), b"x = 1\n", 0o600);
    std::os::unix::fs::symlink("/etc/passwd", server.path("ctx/app/passwd")).expect("symlink");

    client
        .copy(CopySpec {
            uid: Some(1000),
            gid: Some(1000),
            ..copy_spec(&server.path("ctx/app"), &server.path("out/srv"))
        })
        .await
        .expect("copy");

    let link = server.path("out/srv/passwd");
    let link_meta = std::fs::symlink_metadata(&link).expect("lstat");
    assert!(link_meta.file_type().is_symlink());
    assert_eq!(
        std::fs::read_link(&link).expect("readlink"),
        Path::new("/etc/passwd")
    );
    assert_eq!(link_meta.uid(), 1000);
    assert!(!Path::new(&server.path("out/srv/app")).exists());
    assert_eq!(
        std::fs::read(server.path("out/srv/main.py")).expect("read"),
        b"print(1)\n"
    );
    let util = std::fs::metadata(server.path("out/srv/lib/util.py")).expect("stat");
    assert_eq!(util.mode() & 0o7777, 0o600);
    assert_eq!((util.uid(), util.gid()), (1000, 1000));
    let lib = std::fs::metadata(server.path("out/srv/lib")).expect("stat");
    assert_eq!(lib.uid(), 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_when_glob_then_only_matches_copied() {
    let server = Server::start();
    let client = server.client().await;
    for name in ["a.py", "b.py", "c.txt", "d1.py"] {
        write_with_mode(&server.path(&format!("ctx/{name}")), name.as_bytes(), 0o644);
    }
    let dest = format!("{}/", server.path("out"));

    client
        .copy(copy_spec(&server.path("ctx/?.py"), &dest))
        .await
        .expect("copy");

    let mut names: Vec<String> = std::fs::read_dir(server.path("out"))
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["a.py", "b.py"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_when_glob_matches_nothing_then_error_names_pattern() {
    let server = Server::start();
    let client = server.client().await;
    std::fs::create_dir_all(server.path("ctx")).expect("mkdir");

    let result = client
        .copy(copy_spec(&server.path("ctx/*.rb"), &server.path("out/")))
        .await;

    let message = result.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(message.contains("*.rb"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_when_mode_given_then_it_overrides_the_source_mode() {
    let server = Server::start();
    let client = server.client().await;
    write_with_mode(&server.path("ctx/tool"), b"x", 0o600);

    client
        .copy(CopySpec {
            mode: Some(0o755),
            ..copy_spec(&server.path("ctx/tool"), &server.path("out/tool"))
        })
        .await
        .expect("copy");

    let mode = std::fs::metadata(server.path("out/tool"))
        .expect("stat")
        .mode();
    assert_eq!(mode & 0o7777, 0o755);
}

// ---- ExtractArchive ----

/// A tar entry header whose name is written raw, so it may be anything.
fn raw_header(name: &str, kind: tar::EntryType, size: u64, link: &str) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    header.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
    header.set_entry_type(kind);
    header.set_size(size);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(1_700_000_000);
    header.set_cksum();
    header
}

fn tar_of(entries: &[(&str, tar::EntryType, &[u8], &str)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, kind, data, link) in entries {
        let header = raw_header(name, *kind, data.len() as u64, link);
        builder.append(&header, *data).expect("append");
    }
    builder.into_inner().expect("finish")
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(data).expect("gzip");
    encoder.finish().expect("gzip")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extract_when_tar_gz_then_tree_unpacked_with_links() {
    let server = Server::start();
    let client = server.client().await;
    let archive = gzip(&tar_of(&[
        ("./", tar::EntryType::Directory, b"", ""),
        ("./bin/", tar::EntryType::Directory, b"", ""),
        ("./bin/tool", tar::EntryType::Regular, b"#!/bin/sh\n", ""),
        ("./bin/alias", tar::EntryType::Symlink, b"", "tool"),
        ("./bin/hard", tar::EntryType::Link, b"", "bin/tool"),
    ]));
    std::fs::write(server.path("tool.tar.gz"), archive).expect("write");

    let stats = client
        .extract_archive(
            &server.path("tool.tar.gz"),
            &server.path("opt"),
            Some(7),
            Some(8),
        )
        .await
        .expect("extract");

    let tool = std::fs::metadata(server.path("opt/bin/tool")).expect("stat");
    assert_eq!((tool.uid(), tool.gid()), (7, 8));
    assert_eq!(tool.nlink(), 2);
    assert_eq!(
        std::fs::read(server.path("opt/bin/alias")).expect("read through link"),
        b"#!/bin/sh\n"
    );
    assert_eq!(stats.entries, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extract_when_entry_climbs_out_then_refused_and_nothing_written_outside() {
    let server = Server::start();
    let client = server.client().await;
    let archive = tar_of(&[("../escaped", tar::EntryType::Regular, b"x", "")]);
    std::fs::write(server.path("evil.tar"), archive).expect("write");

    let result = client
        .extract_archive(&server.path("evil.tar"), &server.path("dest"), None, None)
        .await;

    let message = result.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(message.contains("../escaped"), "{message}");
    assert!(!Path::new(&server.path("escaped")).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extract_when_entry_goes_through_symlink_pointing_outside_then_refused() {
    let server = Server::start();
    let client = server.client().await;
    let outside = server.path("outside");
    std::fs::create_dir_all(&outside).expect("mkdir");
    let archive = tar_of(&[
        ("sneaky", tar::EntryType::Symlink, b"", outside.as_str()),
        ("sneaky/pwned", tar::EntryType::Regular, b"x", ""),
    ]);
    std::fs::write(server.path("evil.tar"), archive).expect("write");

    let result = client
        .extract_archive(&server.path("evil.tar"), &server.path("dest"), None, None)
        .await;

    let message = result.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(message.contains("sneaky/pwned"), "{message}");
    assert!(!Path::new(&outside).join("pwned").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extract_when_device_node_then_refused() {
    let server = Server::start();
    let client = server.client().await;
    let archive = tar_of(&[("dev/sda", tar::EntryType::Block, b"", "")]);
    std::fs::write(server.path("dev.tar"), archive).expect("write");

    let result = client
        .extract_archive(&server.path("dev.tar"), &server.path("dest"), None, None)
        .await;

    let message = result.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(message.contains("device node"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extract_when_bzip2_or_xz_then_unpacked() {
    let server = Server::start();
    let client = server.client().await;
    let plain = tar_of(&[("hello.txt", tar::EntryType::Regular, b"hi\n", "")]);
    let mut bz = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
    bz.write_all(&plain).expect("bzip2");
    std::fs::write(server.path("a.tar.bz2"), bz.finish().expect("bzip2")).expect("write");
    let mut xz = Vec::new();
    lzma_rs::xz_compress(&mut plain.as_slice(), &mut xz).expect("xz");
    std::fs::write(server.path("a.tar.xz"), xz).expect("write");

    client
        .extract_archive(&server.path("a.tar.bz2"), &server.path("bz"), None, None)
        .await
        .expect("extract bzip2");
    client
        .extract_archive(&server.path("a.tar.xz"), &server.path("xz"), None, None)
        .await
        .expect("extract xz");

    assert_eq!(
        std::fs::read(server.path("bz/hello.txt")).expect("read"),
        b"hi\n"
    );
    assert_eq!(
        std::fs::read(server.path("xz/hello.txt")).expect("read"),
        b"hi\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extract_when_dest_has_symlinked_dir_inside_then_entries_follow_it() {
    let server = Server::start();
    let client = server.client().await;
    std::fs::create_dir_all(server.path("root/usr/bin")).expect("mkdir");
    std::os::unix::fs::symlink("usr/bin", server.path("root/bin")).expect("symlink");
    let archive = tar_of(&[
        ("bin/", tar::EntryType::Directory, b"", ""),
        ("bin/tool", tar::EntryType::Regular, b"x", ""),
    ]);
    std::fs::write(server.path("t.tar"), archive).expect("write");

    client
        .extract_archive(&server.path("t.tar"), &server.path("root"), None, None)
        .await
        .expect("extract");

    assert!(std::fs::symlink_metadata(server.path("root/bin"))
        .expect("lstat")
        .file_type()
        .is_symlink());
    assert_eq!(
        std::fs::read(server.path("root/usr/bin/tool")).expect("read"),
        b"x"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_when_dest_inside_source_then_refused() {
    let server = Server::start();
    let client = server.client().await;
    write_with_mode(&server.path("tree/a"), b"a", 0o644);

    let result = client
        .copy(copy_spec(&server.path("tree"), &server.path("tree/sub/")))
        .await;

    let message = result.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(message.contains("inside the source"), "{message}");
}

// ---- LookupUser, Mount ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookup_user_when_root_then_zero_ids() {
    let server = Server::start();
    let client = server.client().await;

    let user = client.lookup_user("root").await.expect("lookup");

    assert_eq!((user.uid, user.gid), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookup_user_when_unknown_name_then_error_names_it() {
    let server = Server::start();
    let client = server.client().await;

    let result = client.lookup_user("no-such-user-kiln").await;

    let message = result.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(message.contains("no-such-user-kiln"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mount_when_source_missing_then_error_says_so() {
    let server = Server::start();
    let client = server.client().await;

    let result = client
        .mount(
            "/dev/kiln-no-such-disk",
            &server.path("mnt"),
            "ext4",
            &["ro"],
        )
        .await;

    let message = result.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        message.contains("/dev/kiln-no-such-disk does not exist"),
        "{message}"
    );
}

// ---- App supervision ----

fn app(script: &str) -> AppSpec {
    AppSpec {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        ..AppSpec::default()
    }
}

/// Waits until the app log holds `needle`; returns the log.
async fn wait_for_log(server: &Server, needle: &str) -> String {
    let path = server.path("app.log");
    for _ in 0..200 {
        let log = std::fs::read_to_string(&path).unwrap_or_default();
        if log.contains(needle) {
            return log;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = std::fs::read_to_string(&path).unwrap_or_default();
    panic!("{needle:?} never appeared in the app log:\n{log}");
}

/// Polls AppStatus until the app no longer runs (10 s at most); returns the last status.
async fn wait_until_stopped(client: &AgentClient) -> kiln_agent::AppState {
    let mut status = client.app_status().await.expect("status");
    for _ in 0..200 {
        if !status.running {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        status = client.app_status().await.expect("status");
    }
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_when_started_then_output_in_log_and_second_start_refused() {
    let server = Server::start();
    let client = server.client().await;

    let pid = client
        .start_app(app("echo hel''lo; echo oo''ps >&2; exec sleep 30"))
        .await
        .expect("start");
    let log = wait_for_log(&server, "oops").await;
    let status = client.app_status().await.expect("status");
    let second = client.start_app(app("true")).await;

    assert!(
        log.starts_with(&format!("[kiln] app started: pid {pid} sh -c ")),
        "{log}"
    );
    assert!(log.contains("\nhello\n"), "{log}");
    assert!(status.running);
    assert_eq!(status.pid, Some(pid));
    assert!(matches!(second, Err(AgentError::Guest(_))), "{second:?}");
    let _ = client.stop_app(None, Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_app_when_running_then_sigterm_ends_it_and_log_says_so() {
    let server = Server::start();
    let client = server.client().await;
    client.start_app(app("exec sleep 30")).await.expect("start");

    let state = client
        .stop_app(None, Duration::from_secs(5))
        .await
        .expect("stop");

    assert!(!state.running);
    assert_eq!(state.signal, Some(libc::SIGTERM));
    wait_for_log(&server, "[kiln] app exited: signal 15\n").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_app_when_sigterm_ignored_then_killed_after_grace() {
    let server = Server::start();
    let client = server.client().await;
    client
        .start_app(app(
            "trap '' TERM; echo ar''med; while :; do sleep 0.1; done",
        ))
        .await
        .expect("start");
    wait_for_log(&server, "armed").await;

    let state = client
        .stop_app(Some(libc::SIGTERM), Duration::from_millis(300))
        .await
        .expect("stop");

    assert!(!state.running);
    assert_eq!(state.signal, Some(libc::SIGKILL));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_when_it_exits_then_status_reports_code_and_restart_allowed() {
    let server = Server::start();
    let client = server.client().await;
    client.start_app(app("exit 7")).await.expect("start");

    let status = wait_until_stopped(&client).await;
    let log = std::fs::read_to_string(server.path("app.log")).unwrap_or_default();
    let restarted = client.start_app(app("exec sleep 30")).await;

    assert!(!status.running);
    assert_eq!(status.exit_code, Some(7));
    assert!(log.ends_with("[kiln] app exited: code 7\n"), "{log}");
    assert!(restarted.is_ok(), "{restarted:?}");
    let _ = client.stop_app(None, Duration::from_secs(1)).await;
}

// ---- ProbeTcp, HttpRequest ----

/// A port nothing listens on (bound, then released).
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_tcp_when_listening_then_open_else_closed() {
    let server = Server::start();
    let client = server.client().await;
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();

    let open = client
        .probe_tcp(port, Duration::from_secs(2))
        .await
        .expect("probe");
    drop(listener);
    let closed = client
        .probe_tcp(port, Duration::from_secs(2))
        .await
        .expect("probe");

    assert!(open);
    assert!(!closed);
}

/// Serves one connection: reads the request head and its Content-Length body, answers
/// `response` raw, closes. The thread returns the request it read.
fn one_shot_http(
    response: impl AsRef<[u8]> + Send + 'static,
) -> (u16, std::thread::JoinHandle<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let thread = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accept");
        let request = read_request(&mut stream);
        // The client may hang up early (a truncated body): that is not this thread's failure.
        let _ = stream.write_all(response.as_ref());
        request
    });
    (port, thread)
}

fn read_request(stream: &mut TcpStream) -> String {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).expect("read request");
        data.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&data).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length: usize = text
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if data.len() >= end + 4 + length || n == 0 {
                return text;
            }
        }
        if n == 0 {
            return text;
        }
    }
}

fn hook(port: u16, body: &[u8]) -> HttpRequestSpec {
    HttpRequestSpec {
        method: "POST".into(),
        port,
        path: "/aws/lambda-microvms/runtime/v1/ready".into(),
        headers: vec![("Content-Type".into(), "application/json".into())],
        body: body.to_vec(),
        timeout_ms: 5000,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_when_content_length_response_then_status_headers_body_and_request_sent() {
    let server = Server::start();
    let client = server.client().await;
    let (port, peer) =
        one_shot_http(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Hook: ready\r\n\r\nhello");

    let response = client
        .http_request(hook(port, b"{}"))
        .await
        .expect("request");
    let request = peer.join().expect("server thread");

    assert_eq!(response.status, 200);
    assert_eq!(response.header("x-hook"), Some("ready"));
    assert_eq!(response.body, b"hello");
    assert!(request.starts_with("POST /aws/lambda-microvms/runtime/v1/ready HTTP/1.1\r\n"));
    assert!(request.contains("Content-Length: 2\r\n"), "{request}");
    assert!(request.contains("Connection: close\r\n"), "{request}");
    assert!(request.ends_with("\r\n\r\n{}"), "{request}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_when_chunked_response_then_body_decoded() {
    let server = Server::start();
    let client = server.client().await;
    let (port, _peer) = one_shot_http(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nnot r\r\n6\r\neady!\n\r\n0\r\nTrailer: x\r\n\r\n",
    );

    let response = client.http_request(hook(port, b"")).await.expect("request");

    assert_eq!(response.status, 503);
    assert_eq!(response.body, b"not ready!\n");
    assert!(!response.truncated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_when_body_ends_at_close_then_read_to_the_end() {
    let server = Server::start();
    let client = server.client().await;
    let (port, _peer) = one_shot_http(b"HTTP/1.0 200 OK\r\nServer: old\r\n\r\nuntil close");

    let response = client.http_request(hook(port, b"")).await.expect("request");

    assert_eq!(response.body, b"until close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_when_body_over_1_mib_then_cut_and_marked_truncated() {
    let server = Server::start();
    let client = server.client().await;
    let size = 3 << 20;
    let mut response = format!("HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n").into_bytes();
    response.resize(response.len() + size, b'z');
    let (port, _peer) = one_shot_http(response);

    let response = client.http_request(hook(port, b"")).await.expect("request");

    assert_eq!(response.body.len(), kiln_agent::proto::MAX_HTTP_BODY);
    assert!(response.truncated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_when_nothing_listens_then_refused_kind() {
    let server = Server::start();
    let client = server.client().await;

    let result = client.http_request(hook(free_port(), b"")).await;

    assert!(
        matches!(
            result,
            Err(AgentError::Http {
                kind: HttpFailureKind::Refused,
                ..
            })
        ),
        "{result:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_when_peer_never_answers_then_timed_out_kind() {
    let server = Server::start();
    let client = server.client().await;
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();

    let result = client
        .http_request(HttpRequestSpec {
            timeout_ms: 300,
            ..hook(port, b"")
        })
        .await;

    assert_eq!(
        result.err().and_then(|e| e.http_failure()),
        Some(HttpFailureKind::TimedOut)
    );
    drop(listener);
}

#[tokio::test]
async fn exec_when_run_on_a_terminal_then_typed_input_runs_and_resizes_reach_the_shell() {
    let server = Server::start();
    let client = server.client().await;
    let size = kiln_agent::TtySize { cols: 80, rows: 24 };
    let mut output = Vec::new();
    let mut status = None;

    let mut shell = client
        .exec(ExecRequest::new(["sh"]).tty(size))
        .await
        .expect("start a shell");
    let id = shell.id();
    let started = shell.next_event().await.expect("started");
    let typed = b"tty >/dev/null && echo on-a-tty; echo $((6*7)); stty size\n";
    client.exec_input(id, typed.to_vec()).await.expect("type");
    while !String::from_utf8_lossy(&output).contains("24 80\r\n") {
        match tokio::time::timeout(CONNECT, shell.next_event()).await {
            Ok(Ok(Some(ExecEvent::Stdout(d)))) => output.extend(d),
            other => panic!("{other:?}: {}", String::from_utf8_lossy(&output)),
        }
    }
    client
        .exec_resize(
            id,
            kiln_agent::TtySize {
                cols: 100,
                rows: 50,
            },
        )
        .await
        .expect("resize");
    client
        .exec_input(id, b"stty size; exit 3\n".to_vec())
        .await
        .expect("type");
    while let Some(event) = tokio::time::timeout(CONNECT, shell.next_event())
        .await
        .expect("the shell answers")
        .expect("event")
    {
        match event {
            ExecEvent::Stdout(d) => output.extend(d),
            ExecEvent::Exited(s) => status = Some(s),
            _ => {}
        }
    }
    let plain_input = client.exec_input(9999, b"x".to_vec()).await;

    let text = String::from_utf8_lossy(&output);
    assert!(
        matches!(started, Some(ExecEvent::Started { .. })),
        "{started:?}"
    );
    assert!(text.contains("on-a-tty"), "{text}");
    assert!(text.contains("42"), "{text}");
    assert!(text.contains("50 100"), "{text}");
    assert_eq!(status.and_then(|s| s.code), Some(3));
    assert!(plain_input.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_requests_when_a_3mib_file_goes_in_pieces_then_it_comes_back_whole_and_can_be_moved_and_removed(
) {
    let server = Server::start();
    let client = server.client().await;
    let data: Vec<u8> = (0..3 * 1024 * 1024 + 7u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    let file = server.path("deep/dir/data.bin");
    let piece = kiln_agent::client::MAX_RANGE_BYTES;

    for (i, chunk) in data.chunks(piece).enumerate() {
        client
            .write_range(
                &file,
                (i * piece) as u64,
                chunk.to_vec(),
                i == 0,
                0o600,
                None,
            )
            .await
            .expect("write piece");
    }
    let mut back = Vec::new();
    loop {
        let (chunk, eof) = client
            .read_range(&file, back.len() as u64, piece as u32)
            .await
            .expect("read piece");
        back.extend(chunk);
        if eof {
            break;
        }
    }
    let stat = client.stat(&file).await.expect("stat");
    client
        .make_dir(&server.path("other/sub"), true, 0o755, None)
        .await
        .expect("mkdir -p");
    let moved = server.path("other/sub/moved.bin");
    client.move_path(&file, &moved).await.expect("move");
    let (listed, truncated) = client
        .list_dir(&server.path("other/sub"), 100)
        .await
        .expect("list");
    let old = client.stat(&file).await.expect_err("moved away");
    client
        .remove_tree(&server.path("other"))
        .await
        .expect("rm -r");
    let removed = client
        .stat(&server.path("other"))
        .await
        .expect_err("removed");
    let huge = client
        .read_range(&moved, 0, piece as u32 + 1)
        .await
        .expect_err("a range over the limit");

    assert_eq!(back, data);
    assert_eq!((stat.size, stat.mode), (data.len() as u64, 0o600));
    assert_eq!(
        listed.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
        ["moved.bin"]
    );
    assert!(!truncated);
    assert!(
        matches!(
            old,
            AgentError::Fs {
                kind: kiln_agent::FsErrorKind::NotFound,
                ..
            }
        ),
        "{old}"
    );
    assert!(
        matches!(
            removed,
            AgentError::Fs {
                kind: kiln_agent::FsErrorKind::NotFound,
                ..
            }
        ),
        "{removed}"
    );
    assert!(
        matches!(
            huge,
            AgentError::Fs {
                kind: kiln_agent::FsErrorKind::Invalid,
                ..
            }
        ),
        "{huge}"
    );
}

/// Pids of the live children of `pid` (every thread's).
fn children_of(pid: u32) -> Vec<String> {
    let mut kids = vec![];
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks") {
        let path = task.expect("task").path().join("children");
        let listed = std::fs::read_to_string(path).unwrap_or_default();
        kids.extend(listed.split_whitespace().map(str::to_string));
    }
    kids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_when_asked_then_a_probe_process_is_answered_and_nothing_is_left_running() {
    let server = Server::start();
    let client = server.client().await;

    let took = client.warm(Duration::from_secs(20)).await;

    assert!(took.is_ok(), "{took:?}");
    assert!(
        children_of(server.child.id()).is_empty(),
        "the warm-up left a process behind"
    );
}

#[test]
fn warm_probe_when_the_listener_answers_an_error_then_the_probe_fails() {
    use std::net::TcpListener;
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf);
        let _ = s.write_all(b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n");
    });

    let out = Command::new(env!("CARGO_BIN_EXE_kiln-init"))
        .args(["--warm-probe", &port.to_string()])
        .output()
        .expect("run the probe");

    server.join().expect("server");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("500"),
        "{out:?}"
    );
}

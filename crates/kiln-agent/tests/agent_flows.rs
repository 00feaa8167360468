//! Whole flows: `kiln-init --serve-unix` on the host, driven by `AgentClient`.
//! Guest-only operations (clock, entropy, power) are not exercised here.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use kiln_agent::proto::{
    decode_payload, encode_frame, FrameDecoder, GuestBody, GuestMessage, HostBody, HostMessage,
    MAGIC, PROTOCOL_VERSION,
};
use kiln_agent::{AgentClient, AgentError, ExecEvent, ExecRequest};

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

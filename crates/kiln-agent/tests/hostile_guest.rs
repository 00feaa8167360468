//! A hostile guest agent against the host client: what it sends must not grow kilnd's memory
//! or log without bound, and must not stop the connection serving other requests.
//! The "guest" here is a thread speaking the protocol on a Unix socket, as kiln-init would.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_agent::proto::{
    decode_payload, encode_frame, FrameDecoder, GuestBody, GuestMessage, HostBody, HostMessage,
    OutputStream, MAGIC, PROTOCOL_VERSION,
};
use kiln_agent::{AgentClient, AgentError, ExecEvent, ExecRequest};

/// What the hostile guest does once an exec arrives (after the handshake).
#[derive(Clone, Copy)]
enum Attack {
    /// Sends this many 64 KiB output frames for the exec, as fast as the socket takes them.
    FloodOutput(usize),
    /// Sends this many 8-byte frames with an empty payload (a header and nothing else).
    RepeatBadFrame(usize),
}

/// A fake guest on a socket in a temp dir; answers Hello and Ping, attacks on Exec.
struct HostileGuest {
    socket: PathBuf,
    _dir: tempfile::TempDir,
    /// Receives once the attack's last byte was written.
    done: std::sync::mpsc::Receiver<()>,
}

impl HostileGuest {
    fn start(attack: Attack) -> HostileGuest {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&socket).expect("bind");
        let (done_tx, done) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let (stream, _) = listener.accept().expect("accept");
            serve(stream, attack, done_tx);
        });
        HostileGuest {
            socket,
            _dir: dir,
            done,
        }
    }

    async fn client(&self) -> AgentClient {
        AgentClient::connect(&self.socket, Duration::from_secs(10))
            .await
            .expect("connect")
    }

    /// Waits (off the runtime's thread) until the attack was sent.
    async fn wait_done(&self) {
        tokio::task::block_in_place(|| {
            self.done
                .recv_timeout(Duration::from_secs(120))
                .expect("the attack finished within two minutes")
        });
    }
}

fn send(writer: &Mutex<UnixStream>, id: u64, body: GuestBody) -> std::io::Result<()> {
    let frame = encode_frame(&GuestMessage { id, body }).expect("encode");
    writer
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .write_all(&frame)
}

fn serve(stream: UnixStream, attack: Attack, done: std::sync::mpsc::Sender<()>) {
    let writer = Arc::new(Mutex::new(stream.try_clone().expect("clone")));
    let mut reader = stream;
    let mut decoder = FrameDecoder::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        decoder.push(&buf[..n]);
        while let Some(Ok(frame)) = decoder.next_frame() {
            let message: HostMessage = decode_payload(&frame).expect("host message");
            let reply = match message.body {
                HostBody::Hello { .. } => GuestBody::HelloOk {
                    version: PROTOCOL_VERSION,
                    agent_version: "hostile".into(),
                    kernel: "none".into(),
                    uptime_ms: 1,
                },
                HostBody::Exec(_) => {
                    let (writer, done) = (writer.clone(), done.clone());
                    std::thread::spawn(move || {
                        let _ = attack_with(&writer, message.id, attack);
                        let _ = done.send(());
                    });
                    continue;
                }
                _ => GuestBody::Pong,
            };
            if send(&writer, message.id, reply).is_err() {
                return;
            }
        }
    }
}

fn attack_with(writer: &Mutex<UnixStream>, id: u64, attack: Attack) -> std::io::Result<()> {
    match attack {
        Attack::FloodOutput(frames) => {
            send(writer, id, GuestBody::ExecStarted { pid: 7 })?;
            for _ in 0..frames {
                let data = vec![b'y'; kiln_agent::proto::MAX_OUTPUT_CHUNK];
                let stream = OutputStream::Stdout;
                send(writer, id, GuestBody::Output { stream, data })?;
            }
        }
        Attack::RepeatBadFrame(times) => {
            let mut bad = MAGIC.to_vec();
            bad.extend_from_slice(&0u32.to_be_bytes());
            let flood = bad.repeat(times);
            let mut stream = writer.lock().unwrap_or_else(|e| e.into_inner());
            stream.write_all(&flood)?;
        }
    }
    Ok(())
}

/// This process's resident memory, in bytes.
fn resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kib * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_when_guest_floods_output_nobody_reads_then_stream_cut_memory_bounded_and_pings_answered(
) {
    // 4096 frames of 64 KiB: 256 MiB of output, sixteen times what a stream may queue.
    let guest = HostileGuest::start(Attack::FloodOutput(4096));
    let client = guest.client().await;
    let before = resident_bytes();

    let mut stream = client.exec(ExecRequest::new(["yes"])).await.expect("exec");
    guest.wait_done().await;
    let pong = client.ping().await;
    let grown = resident_bytes().saturating_sub(before);
    let mut received = 0usize;
    let end = loop {
        match stream.next_event().await {
            Ok(Some(ExecEvent::Stdout(data))) => received += data.len(),
            Ok(Some(_)) => {}
            other => break other,
        }
    };

    assert!(pong.is_ok(), "the connection still serves: {pong:?}");
    assert!(
        grown < 96 << 20,
        "kilnd's memory grew {} MiB for 256 MiB nobody read",
        grown >> 20
    );
    assert!(
        received <= kiln_agent::MAX_QUEUED_OUTPUT,
        "{received} bytes"
    );
    let message = match end {
        Err(AgentError::Protocol(message)) => message,
        other => panic!("expected the stream cut, got {other:?}"),
    };
    assert!(message.contains("was cut"), "{message}");
}

/// Collects what tracing writes, for counting log lines.
#[derive(Clone, Default)]
struct CapturedLog(Arc<Mutex<Vec<u8>>>);

impl Write for CapturedLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "current_thread")]
async fn frames_when_guest_repeats_a_bad_one_100k_times_then_a_few_log_lines_and_pings_answered() {
    let log = CapturedLog::default();
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    // A current-thread runtime: the client's reader task logs on this thread.
    let _guard = tracing::subscriber::set_default(subscriber);
    let guest = HostileGuest::start(Attack::RepeatBadFrame(100_000));
    let client = guest.client().await;

    let _stream = client.exec(ExecRequest::new(["true"])).await.expect("exec");
    tokio::time::sleep(Duration::from_millis(50)).await;
    tokio::task::spawn_blocking(move || guest.done.recv_timeout(Duration::from_secs(60)))
        .await
        .expect("join")
        .expect("the flood was sent");
    let pong = client.ping().await;
    let text = String::from_utf8_lossy(&log.0.lock().expect("log")).into_owned();

    assert!(pong.is_ok(), "the connection still serves: {pong:?}");
    let lines = text.lines().count();
    assert!(
        (1..=6).contains(&lines),
        "{lines} log lines for 100 000 bad frames:\n{text}"
    );
}

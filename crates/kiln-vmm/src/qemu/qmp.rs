//! A small async client for QEMU's machine protocol (QMP) over a unix socket.
//!
//! QMP is line-delimited JSON: a greeting, `qmp_capabilities`, then commands whose replies
//! carry the `id` we sent, interleaved with events. One reader task routes replies to their
//! callers, so commands may be issued from several tasks at once.

use std::collections::HashMap;
use std::io::IoSlice;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use serde_json::{json, Value};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader, Interest};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::{broadcast, oneshot};

/// Errors from a QMP session.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// QMP socket {path} did not accept a connection within {timeout:?}: {source}
    #[error("QMP socket {path} did not accept a connection within {timeout:?}: {source}")]
    Connect {
        path: PathBuf,
        timeout: Duration,
        #[source]
        source: std::io::Error,
    },
    /// The QMP connection failed while {doing}
    #[error("QMP connection failed while {doing}: {source}")]
    Io {
        doing: String,
        #[source]
        source: std::io::Error,
    },
    /// QEMU closed the QMP connection (the VM process has probably exited)
    #[error("QEMU closed the QMP connection (the VM process has probably exited)")]
    Closed,
    /// QEMU answered {command} with an error
    #[error("QEMU refused '{command}': {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    /// A command got no answer in time
    #[error("QEMU did not answer '{command}' within {timeout:?}")]
    Timeout { command: String, timeout: Duration },
    /// QEMU sent something that is not QMP
    #[error("QEMU sent an unexpected QMP message: {0}")]
    Protocol(String),
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Value, QmpError>>>>>;

/// A connected QMP session.
pub struct Qmp {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Pending,
    next_id: AtomicU64,
    events: broadcast::Sender<Value>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Qmp {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// How long one QMP command may take by default.
const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

impl Qmp {
    /// Connects to `path`, retrying while QEMU creates the socket, and negotiates capabilities.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(s) => break s,
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(QmpError::Connect {
                        path: path.to_owned(),
                        timeout,
                        source: e,
                    })
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(2)).await,
            }
        };
        let (read, write) = stream.into_split();
        let mut lines = BoundedLines::new(BufReader::new(read), MAX_QMP_LINE);
        let greeting = tokio::time::timeout_at(deadline, lines.next_text())
            .await
            .map_err(|_| QmpError::Timeout {
                command: "greeting".into(),
                timeout,
            })?
            .map_err(|source| QmpError::Io {
                doing: "reading the greeting".into(),
                source,
            })?
            .ok_or(QmpError::Closed)?;
        if !greeting.contains("\"QMP\"") {
            return Err(QmpError::Protocol(greeting));
        }
        let pending: Pending = Arc::default();
        let (events, _) = broadcast::channel(64);
        let reader = tokio::spawn(read_loop(lines, pending.clone(), events.clone()));
        let qmp = Qmp {
            writer: tokio::sync::Mutex::new(write),
            pending,
            next_id: AtomicU64::new(1),
            events,
            reader,
        };
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// Subscribes to QMP events (`{"event": ..., "data": ...}`) from now on.
    pub fn events(&self) -> broadcast::Receiver<Value> {
        self.events.subscribe()
    }

    /// Runs a command with the default timeout and returns its `return` value.
    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        self.execute_timeout(command, arguments, DEFAULT_COMMAND_TIMEOUT)
            .await
    }

    /// Runs a command and waits at most `timeout` for its answer.
    pub async fn execute_timeout(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        self.send(command, arguments, timeout, None).await
    }

    /// Hands QEMU a copy of `fd` under `name` (QMP `getfd`, the descriptor travelling with the
    /// command as SCM_RIGHTS), so a later command can name it (`fd:<name>` migration URIs).
    /// Nothing runs a shell or opens a path on QEMU's side. A name given twice replaces the
    /// earlier descriptor.
    pub async fn pass_fd(&self, name: &str, fd: BorrowedFd<'_>) -> Result<(), QmpError> {
        self.send(
            "getfd",
            Some(json!({ "fdname": name })),
            DEFAULT_COMMAND_TIMEOUT,
            Some(fd.as_raw_fd()),
        )
        .await
        .map(drop)
    }

    /// Sends one command (with `fd` attached to its bytes) and waits for its answer.
    async fn send(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
        fd: Option<RawFd>,
    ) -> Result<Value, QmpError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, tx);
        let mut line = msg.to_string();
        line.push('\n');
        let written = {
            let mut w = self.writer.lock().await;
            match fd {
                Some(fd) => write_with_fd(&mut w, line.as_bytes(), fd).await,
                None => w.write_all(line.as_bytes()).await,
            }
        };
        if let Err(source) = written {
            lock(&self.pending).remove(&id);
            return Err(QmpError::Io {
                doing: format!("sending '{command}'"),
                source,
            });
        }
        let reply = match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => Err(QmpError::Closed),
            Err(_) => {
                lock(&self.pending).remove(&id);
                Err(QmpError::Timeout {
                    command: command.into(),
                    timeout,
                })
            }
        };
        reply.map_err(|e| match e {
            QmpError::Command { class, desc, .. } => QmpError::Command {
                command: command.into(),
                class,
                desc,
            },
            other => other,
        })
    }

    /// Runs an HMP command line; HMP reports failures as text in a successful reply.
    pub async fn human(&self, command_line: &str) -> Result<String, QmpError> {
        let out = self
            .execute(
                "human-monitor-command",
                Some(json!({ "command-line": command_line })),
            )
            .await?;
        let text = out.as_str().unwrap_or_default().trim().to_string();
        if text.is_empty() {
            Ok(text)
        } else {
            Err(QmpError::Command {
                command: command_line.into(),
                class: "HmpError".into(),
                desc: text,
            })
        }
    }

    /// The VM's run state as QEMU names it (`running`, `paused`, `inmigrate`, ...).
    pub async fn status(&self) -> Result<String, QmpError> {
        let v = self.execute("query-status", None).await?;
        Ok(v["status"].as_str().unwrap_or("unknown").to_string())
    }
}

/// Writes `bytes` with `fd` attached to the first of them (QEMU's socket chardev keeps the
/// descriptors of the read that brought them; `getfd` takes them from there).
async fn write_with_fd(w: &mut OwnedWriteHalf, bytes: &[u8], fd: RawFd) -> std::io::Result<()> {
    let stream: &UnixStream = w.as_ref();
    let sent = loop {
        stream.writable().await?;
        let attempt = stream.try_io(Interest::WRITABLE, || {
            let iov = [IoSlice::new(bytes)];
            let fds = [fd];
            let cmsg = [ControlMessage::ScmRights(&fds)];
            sendmsg::<()>(
                stream.as_raw_fd(),
                &iov,
                &cmsg,
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(std::io::Error::from)
        });
        match attempt {
            Ok(n) => break n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    };
    w.write_all(&bytes[sent..]).await
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn read_loop(
    mut lines: BoundedLines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    pending: Pending,
    events: broadcast::Sender<Value>,
) {
    // QEMU runs on behalf of a guest: what it sends is bounded, and so is what kilnd logs.
    let mut warnings = kiln_agent::budget::WarnBudget::new(5, Duration::from_secs(60));
    while let Ok(Some(line)) = lines.next_line().await {
        let line = match line {
            Line::Text(text) => text,
            Line::TooLong(bytes) => {
                kiln_agent::warn_within!(
                    warnings,
                    bytes,
                    "ignoring a QMP line longer than {MAX_QMP_LINE} bytes"
                );
                continue;
            }
        };
        let Ok(msg) = serde_json::from_str::<Value>(&line) else {
            let start: String = line.chars().take(200).collect();
            kiln_agent::warn_within!(warnings, line = %start, "ignoring a QMP line that is not JSON");
            continue;
        };
        if msg.get("event").is_some() {
            let _ = events.send(msg);
            continue;
        }
        let Some(id) = msg.get("id").and_then(Value::as_u64) else {
            continue;
        };
        let Some(tx) = lock(&pending).remove(&id) else {
            continue;
        };
        let result = if let Some(err) = msg.get("error") {
            Err(QmpError::Command {
                command: String::new(),
                class: err["class"].as_str().unwrap_or("GenericError").into(),
                desc: err["desc"].as_str().unwrap_or("").into(),
            })
        } else {
            Ok(msg.get("return").cloned().unwrap_or(Value::Null))
        };
        let _ = tx.send(result);
    }
    // Dropping the senders wakes every waiter with `Closed`.
    lock(&pending).clear();
}

/// The longest QMP line kilnd reads (replies are a few KiB; HMP text more); a longer one is
/// skipped up to its newline, never held whole.
pub const MAX_QMP_LINE: usize = 4 << 20;

/// One line of at most the limit, or how long the one skipped was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// A line (lossy UTF-8, without its newline).
    Text(String),
    /// A line longer than the limit, skipped; its length.
    TooLong(usize),
}

/// Newline-separated lines of bounded length from a stream: memory stays under the limit
/// whatever the other side sends.
pub struct BoundedLines<R> {
    reader: R,
    max: usize,
}

impl<R: AsyncBufRead + Unpin> BoundedLines<R> {
    /// Lines of at most `max` bytes from `reader`.
    pub fn new(reader: R, max: usize) -> Self {
        BoundedLines { reader, max }
    }

    /// The next line; `None` at the end of the stream.
    pub async fn next_line(&mut self) -> std::io::Result<Option<Line>> {
        let mut buf = Vec::new();
        let mut total = 0usize;
        loop {
            let available = self.reader.fill_buf().await?;
            if available.is_empty() {
                return Ok((total > 0).then(|| self.finish(buf, total)));
            }
            let newline = available.iter().position(|&b| b == b'\n');
            let chunk = &available[..newline.unwrap_or(available.len())];
            total = total.saturating_add(chunk.len());
            if total <= self.max {
                buf.extend_from_slice(chunk);
            }
            let consumed = newline.map_or(available.len(), |i| i + 1);
            self.reader.consume(consumed);
            if newline.is_some() {
                return Ok(Some(self.finish(buf, total)));
            }
        }
    }

    /// The next line that is not too long, as text; `None` at the end of the stream.
    pub async fn next_text(&mut self) -> std::io::Result<Option<String>> {
        loop {
            match self.next_line().await? {
                Some(Line::Text(t)) => return Ok(Some(t)),
                Some(Line::TooLong(_)) => continue,
                None => return Ok(None),
            }
        }
    }

    fn finish(&self, buf: Vec<u8>, total: usize) -> Line {
        if total > self.max {
            Line::TooLong(total)
        } else {
            Line::Text(String::from_utf8_lossy(&buf).into_owned())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What a line reader must return for `input`: each newline-ended piece (and a last
    /// unended one), too long ones as their length.
    fn expected(input: &[u8], max: usize) -> Vec<Line> {
        let mut pieces: Vec<&[u8]> = input.split(|&b| b == b'\n').collect();
        if pieces.last().is_some_and(|p| p.is_empty()) {
            pieces.pop();
        }
        pieces
            .into_iter()
            .map(|p| match p.len() > max {
                true => Line::TooLong(p.len()),
                false => Line::Text(String::from_utf8_lossy(p).into_owned()),
            })
            .collect()
    }

    fn read_all(input: &[u8], capacity: usize, max: usize) -> Vec<Line> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let mut lines = BoundedLines::new(BufReader::with_capacity(capacity, input), max);
            let mut out = Vec::new();
            while let Some(line) = lines.next_line().await.expect("read") {
                out.push(line);
            }
            out
        })
    }

    #[test]
    fn next_line_when_a_line_never_ends_then_memory_stays_bounded_and_it_is_skipped() {
        let mut input = vec![b'x'; 1 << 20];
        input.extend_from_slice(b"\n{\"return\": {}}\n");

        let lines = read_all(&input, 4096, 1024);

        assert_eq!(
            lines,
            vec![
                Line::TooLong(1 << 20),
                Line::Text("{\"return\": {}}".into())
            ]
        );
    }

    proptest! {
        #[test]
        fn next_line_when_input_is_arbitrary_then_lines_match_a_plain_split(
            input in proptest::collection::vec(
                prop_oneof![Just(b'\n'), Just(b'{'), any::<u8>()],
                0..4096,
            ),
            capacity in 1usize..64,
            max in 0usize..128,
        ) {
            let lines = read_all(&input, capacity, max);

            prop_assert_eq!(lines, expected(&input, max));
        }
    }
}

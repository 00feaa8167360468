//! Talking to the app on the guest's loopback: a TCP readiness probe and a minimal
//! HTTP/1.1 client for the lifecycle hooks.
//!
//! Only the guest can tell whether something listens: slirp's host side accepts a
//! forwarded connection even when nothing listens inside. The client sends one request
//! with `Connection: close` and reads a response framed by chunked encoding,
//! Content-Length, or the end of the connection.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::proto::{HttpFailureKind, HttpRequestSpec, MAX_HTTP_BODY};

/// Largest status line plus headers accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Headers the client sets itself; the caller's are dropped.
const OWN_HEADERS: [&str; 3] = ["content-length", "connection", "transfer-encoding"];

/// Whether something accepts TCP connections on 127.0.0.1:`port` within `timeout`.
pub fn probe_tcp(port: u16, timeout: Duration) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    TcpStream::connect_timeout(&addr, timeout.max(Duration::from_millis(1))).is_ok()
}

/// A complete HTTP response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Headers in the order received.
    pub headers: Vec<(String, String)>,
    /// Body, at most [`MAX_HTTP_BODY`] bytes.
    pub body: Vec<u8>,
    /// Whether the body was cut off at [`MAX_HTTP_BODY`].
    pub truncated: bool,
}

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpError {
    /// The request itself is invalid; nothing was sent.
    Invalid(String),
    /// No complete response could be had.
    Failed {
        /// For the host's retry decision.
        kind: HttpFailureKind,
        /// What failed, on what, and why.
        message: String,
    },
}

/// Sends `spec` to 127.0.0.1 and reads the response, all within `spec.timeout_ms`.
pub fn request(spec: &HttpRequestSpec) -> Result<Response, HttpError> {
    let head = request_head(spec).map_err(HttpError::Invalid)?;
    let target = format!("127.0.0.1:{}{}", spec.port, spec.path);
    let deadline = Instant::now() + Duration::from_millis(spec.timeout_ms);
    let mut conn =
        Connection::open(spec.port, deadline).map_err(|e| failed(&target, "connect", e))?;
    conn.send(&head, &spec.body)
        .map_err(|e| failed(&target, "send the request", e))?;
    let head_only = spec.method.eq_ignore_ascii_case("HEAD");
    conn.read_response(head_only)
        .map_err(|e| failed(&target, "read the response", e))
}

fn failed(target: &str, step: &str, e: io::Error) -> HttpError {
    let kind = match e.kind() {
        io::ErrorKind::ConnectionRefused => HttpFailureKind::Refused,
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => HttpFailureKind::TimedOut,
        io::ErrorKind::InvalidData => HttpFailureKind::Malformed,
        _ => HttpFailureKind::Closed,
    };
    let why = match kind {
        HttpFailureKind::Refused => "connection refused (nothing listens on the port yet)".into(),
        HttpFailureKind::TimedOut => "timed out".into(),
        _ => e.to_string(),
    };
    HttpError::Failed {
        kind,
        message: format!("HTTP request to {target}: cannot {step}: {why}"),
    }
}

/// The request line and headers, validated so that nothing can smuggle a line break.
fn request_head(spec: &HttpRequestSpec) -> Result<Vec<u8>, String> {
    let is_token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
    };
    if !is_token(&spec.method) {
        return Err(format!("invalid HTTP method {:?}", spec.method));
    }
    if !spec.path.starts_with('/') || spec.path.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(format!(
            "invalid HTTP path {:?}: it must start with / and hold no spaces or control characters",
            spec.path
        ));
    }
    let mut head = format!("{} {} HTTP/1.1\r\n", spec.method, spec.path);
    let mut has_host = false;
    for (name, value) in &spec.headers {
        if !is_token(name) {
            return Err(format!("invalid HTTP header name {name:?}"));
        }
        if value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
            return Err(format!(
                "invalid value for HTTP header {name}: it holds a line break"
            ));
        }
        let lower = name.to_ascii_lowercase();
        if OWN_HEADERS.contains(&lower.as_str()) {
            continue;
        }
        has_host |= lower == "host";
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if !has_host {
        head.push_str(&format!("Host: 127.0.0.1:{}\r\n", spec.port));
    }
    head.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        spec.body.len()
    ));
    Ok(head.into_bytes())
}

/// A connection with a read buffer and one deadline for everything.
struct Connection {
    stream: TcpStream,
    deadline: Instant,
    buf: Vec<u8>,
    pos: usize,
    eof: bool,
}

impl Connection {
    fn open(port: u16, deadline: Instant) -> io::Result<Connection> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let stream = TcpStream::connect_timeout(&addr, remaining(deadline)?)?;
        let _ = stream.set_nodelay(true);
        Ok(Connection {
            stream,
            deadline,
            buf: Vec::with_capacity(16 * 1024),
            pos: 0,
            eof: false,
        })
    }

    fn send(&mut self, head: &[u8], body: &[u8]) -> io::Result<()> {
        self.stream
            .set_write_timeout(Some(remaining(self.deadline)?))?;
        self.stream.write_all(head)?;
        if !body.is_empty() {
            self.stream
                .set_write_timeout(Some(remaining(self.deadline)?))?;
            self.stream.write_all(body)?;
        }
        self.stream.flush()
    }

    fn read_response(&mut self, head_only: bool) -> io::Result<Response> {
        let mut head_bytes = 0;
        let (status, headers) = loop {
            let line = self.line(&mut head_bytes)?;
            let status = parse_status(&line)?;
            let headers = self.headers(&mut head_bytes)?;
            // Interim responses (100 Continue, 103 Early Hints) precede the real one.
            if (100..200).contains(&status) && status != 101 {
                continue;
            }
            break (status, headers);
        };
        let mut response = Response {
            status,
            headers,
            body: Vec::new(),
            truncated: false,
        };
        if head_only || status == 204 || status == 304 || (100..200).contains(&status) {
            return Ok(response);
        }
        let header = |name: &str| {
            response
                .headers
                .iter()
                .rev()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.trim().to_string())
        };
        let chunked = header("transfer-encoding")
            .is_some_and(|te| te.to_ascii_lowercase().trim_end().ends_with("chunked"));
        let length = header("content-length");
        let mut body = Body::default();
        if chunked {
            self.chunked(&mut body)?;
        } else if let Some(length) = length {
            let length: u64 = length
                .parse()
                .map_err(|_| malformed(format!("bad Content-Length {length:?}")))?;
            self.exact(length, &mut body)?;
        } else {
            self.until_close(&mut body)?;
        }
        response.body = body.data;
        response.truncated = body.truncated;
        Ok(response)
    }

    fn headers(&mut self, head_bytes: &mut usize) -> io::Result<Vec<(String, String)>> {
        let mut headers = Vec::new();
        loop {
            let line = self.line(head_bytes)?;
            if line.is_empty() {
                return Ok(headers);
            }
            let text = String::from_utf8_lossy(&line);
            let (name, value) = text
                .split_once(':')
                .ok_or_else(|| malformed(format!("bad header line {text:?}")))?;
            headers.push((name.trim().to_string(), value.trim().to_string()));
        }
    }

    fn chunked(&mut self, body: &mut Body) -> io::Result<()> {
        let mut head_bytes = 0;
        loop {
            let line = self.line(&mut head_bytes)?;
            let text = String::from_utf8_lossy(&line);
            let size_text = text.split(';').next().unwrap_or("").trim();
            let size = u64::from_str_radix(size_text, 16)
                .map_err(|_| malformed(format!("bad chunk size {size_text:?}")))?;
            if size == 0 {
                // Trailers, then the empty line.
                while !self.line(&mut head_bytes)?.is_empty() {}
                return Ok(());
            }
            self.exact(size, body)?;
            if body.truncated {
                return Ok(());
            }
            if !self.line(&mut head_bytes)?.is_empty() {
                return Err(malformed("chunk not followed by CRLF".into()));
            }
            head_bytes = 0;
        }
    }

    /// Reads exactly `n` body bytes, keeping what fits.
    fn exact(&mut self, mut n: u64, body: &mut Body) -> io::Result<()> {
        while n > 0 {
            if self.pos == self.buf.len() && !self.fill()? {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let available = &self.buf[self.pos..];
            let take = available
                .len()
                .min(usize::try_from(n).unwrap_or(usize::MAX));
            let whole = body.push(&available[..take]);
            self.pos += take;
            n -= take as u64;
            if !whole {
                return Ok(());
            }
        }
        Ok(())
    }

    fn until_close(&mut self, body: &mut Body) -> io::Result<()> {
        loop {
            let whole = body.push(&self.buf[self.pos..]);
            self.pos = self.buf.len();
            if !whole || !self.fill()? {
                return Ok(());
            }
        }
    }

    /// One line without its CRLF (or LF), counted against [`MAX_HEAD`].
    fn line(&mut self, head_bytes: &mut usize) -> io::Result<Vec<u8>> {
        loop {
            if let Some(at) = self.buf[self.pos..].iter().position(|&b| b == b'\n') {
                let mut line = self.buf[self.pos..self.pos + at].to_vec();
                self.pos += at + 1;
                *head_bytes += at + 1;
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(line);
            }
            if *head_bytes + (self.buf.len() - self.pos) > MAX_HEAD {
                return Err(malformed("response head larger than 64 KiB".into()));
            }
            if !self.fill()? {
                return Err(if self.pos == self.buf.len() && *head_bytes == 0 {
                    io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the connection closed before a complete response",
                    )
                } else {
                    malformed("the response ended inside its head".into())
                });
            }
        }
    }

    /// Reads more bytes; `false` at the end of the connection.
    fn fill(&mut self) -> io::Result<bool> {
        if self.eof {
            return Ok(false);
        }
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        let mut chunk = [0u8; 16 * 1024];
        loop {
            self.stream
                .set_read_timeout(Some(remaining(self.deadline)?))?;
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    self.eof = true;
                    return Ok(false);
                }
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// A body being collected, capped at [`MAX_HTTP_BODY`].
#[derive(Default)]
struct Body {
    data: Vec<u8>,
    truncated: bool,
}

impl Body {
    /// Appends what fits; `false` once the cap is reached and data was dropped.
    fn push(&mut self, bytes: &[u8]) -> bool {
        let room = MAX_HTTP_BODY - self.data.len();
        if bytes.len() > room {
            self.data.extend_from_slice(&bytes[..room]);
            self.truncated = true;
            return false;
        }
        self.data.extend_from_slice(bytes);
        true
    }
}

fn parse_status(line: &[u8]) -> io::Result<u16> {
    let text = String::from_utf8_lossy(line);
    let mut parts = text.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    let code = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") || code.len() != 3 {
        return Err(malformed(format!("not an HTTP/1.x status line: {text:?}")));
    }
    code.parse()
        .map_err(|_| malformed(format!("bad status code in {text:?}")))
}

fn malformed(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

fn remaining(deadline: Instant) -> io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(io::ErrorKind::TimedOut.into())
    } else {
        Ok(left)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_when_caller_sets_own_headers_then_agent_values_win() {
        let spec = HttpRequestSpec {
            method: "POST".into(),
            port: 9000,
            path: "/hook".into(),
            headers: vec![
                ("Content-Length".into(), "999".into()),
                ("X-Id".into(), "7".into()),
            ],
            body: b"abc".to_vec(),
            timeout_ms: 1000,
        };

        let head = request_head(&spec).expect("valid");

        assert_eq!(
            String::from_utf8(head).expect("utf8"),
            "POST /hook HTTP/1.1\r\nX-Id: 7\r\nHost: 127.0.0.1:9000\r\nContent-Length: 3\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn head_when_value_has_line_break_then_invalid() {
        let spec = HttpRequestSpec {
            method: "GET".into(),
            path: "/".into(),
            headers: vec![("X".into(), "a\r\nEvil: 1".into())],
            ..HttpRequestSpec::default()
        };

        assert!(request_head(&spec).is_err());
    }
}

//! A small HTTP/1.1 server side for envd: request heads, bodies framed by Content-Length
//! or chunked encoding, and responses with a length or chunked. Everything is bounded: the
//! head, the number of headers, chunk-size lines, and whatever a handler buffers.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;

/// Largest request line plus headers accepted.
pub const MAX_HEAD: usize = 64 * 1024;
/// Most header lines accepted.
pub const MAX_HEADERS: usize = 100;

/// A parsed request head; the body is read from the connection through [`Body`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// Method, as sent.
    pub method: String,
    /// Path without the query, percent-decoded.
    pub path: String,
    /// Query parameters, percent-decoded.
    pub query: Vec<(String, String)>,
    /// Header names lower-cased, values trimmed.
    pub headers: Vec<(String, String)>,
}

impl Head {
    /// The first value of header `name` (lower-case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The first value of query parameter `name`.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// How the request's body is framed.
    pub fn framing(&self) -> Result<Framing, String> {
        if let Some(te) = self.header("transfer-encoding") {
            if te.eq_ignore_ascii_case("chunked") {
                return Ok(Framing::Chunked);
            }
            return Err(format!("unsupported Transfer-Encoding {te:?}"));
        }
        match self.header("content-length") {
            Some(n) => n
                .parse::<u64>()
                .map(Framing::Length)
                .map_err(|_| format!("bad Content-Length {n:?}")),
            None => Ok(Framing::Length(0)),
        }
    }

    /// Whether the client asked to close the connection after this exchange.
    pub fn wants_close(&self) -> bool {
        self.header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
    }
}

/// How a body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked transfer encoding.
    Chunked,
}

/// Reads a request head; `Ok(None)` when the client closed the connection before a request.
pub fn read_head<R: BufRead>(reader: &mut R) -> Result<Option<Head>, String> {
    let mut lines = Vec::new();
    let mut total = 0usize;
    loop {
        let mut line = Vec::new();
        let n = reader
            .take((MAX_HEAD - total) as u64 + 1)
            .read_until(b'\n', &mut line)
            .map_err(|e| format!("reading the request: {e}"))?;
        if n == 0 {
            if lines.is_empty() && total == 0 {
                return Ok(None);
            }
            return Err("the connection closed inside a request head".into());
        }
        total += n;
        if total > MAX_HEAD {
            return Err(format!("request head larger than {MAX_HEAD} bytes"));
        }
        if !line.ends_with(b"\n") {
            return Err("the connection closed inside a request head".into());
        }
        let text = String::from_utf8(line).map_err(|_| "request head is not UTF-8".to_string())?;
        let text = text.trim_end_matches(['\r', '\n']).to_string();
        if text.is_empty() {
            if lines.is_empty() {
                continue; // tolerate stray CRLF between requests
            }
            break;
        }
        if lines.len() > MAX_HEADERS {
            return Err(format!("more than {MAX_HEADERS} header lines"));
        }
        lines.push(text);
    }
    parse_head(&lines).map(Some)
}

/// Parses the request line and header lines of a head.
pub fn parse_head(lines: &[String]) -> Result<Head, String> {
    let first = lines.first().ok_or("empty request head")?;
    let mut parts = first.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(format!("malformed request line {first:?}"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(format!("unsupported protocol {version:?}"));
    }
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(format!("malformed method {method:?}"));
    }
    let (raw_path, raw_query) = target.split_once('?').unwrap_or((target, ""));
    let path = percent_decode(raw_path)?;
    let query = parse_query(raw_query)?;
    let mut headers = Vec::with_capacity(lines.len());
    for line in &lines[1..] {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("malformed header line {line:?}"))?;
        if name.is_empty() || name.contains([' ', '\t']) {
            return Err(format!("malformed header name {name:?}"));
        }
        headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
    }
    Ok(Head {
        method: method.to_string(),
        path,
        query,
        headers,
    })
}

/// Splits and decodes `a=b&c=d` (with `+` as a space).
pub fn parse_query(raw: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for pair in raw.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        out.push((
            percent_decode(&k.replace('+', " "))?,
            percent_decode(&v.replace('+', " "))?,
        ));
    }
    Ok(out)
}

/// Decodes `%XX` escapes; the result must be UTF-8.
pub fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent escape in {s:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} does not decode to UTF-8"))
}

/// A request body being read from the connection.
pub struct Body<'a, R: BufRead> {
    reader: &'a mut R,
    framing: Framing,
    /// Bytes left in the current chunk (or the whole body for Length).
    left: u64,
    done: bool,
}

impl<'a, R: BufRead> Body<'a, R> {
    /// The body framed by `framing` on `reader`.
    pub fn new(reader: &'a mut R, framing: Framing) -> Self {
        let (left, done) = match framing {
            Framing::Length(n) => (n, n == 0),
            Framing::Chunked => (0, false),
        };
        Body {
            reader,
            framing,
            left,
            done,
        }
    }

    /// Whether the whole body has been read.
    pub fn finished(&self) -> bool {
        self.done
    }

    /// Reads the rest of the body into memory, failing beyond `max` bytes.
    pub fn read_all(&mut self, max: usize) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        loop {
            let n = self
                .read(&mut buf)
                .map_err(|e| format!("reading the request body: {e}"))?;
            if n == 0 {
                return Ok(out);
            }
            if out.len() + n > max {
                return Err(format!("request body larger than {max} bytes"));
            }
            out.extend_from_slice(&buf[..n]);
        }
    }

    /// Reads and discards the rest of the body (so the connection can carry another request).
    pub fn drain(&mut self) -> io::Result<()> {
        let mut buf = [0u8; 16 * 1024];
        while self.read(&mut buf)? > 0 {}
        Ok(())
    }

    fn next_chunk(&mut self) -> io::Result<()> {
        let mut line = Vec::new();
        self.reader
            .by_ref()
            .take(1026)
            .read_until(b'\n', &mut line)?;
        if !line.ends_with(b"\n") {
            return Err(invalid("malformed chunk size line"));
        }
        let text = std::str::from_utf8(&line).map_err(|_| invalid("chunk size is not ASCII"))?;
        let size = text.trim_end().split(';').next().unwrap_or("").trim();
        let size = u64::from_str_radix(size, 16).map_err(|_| invalid("bad chunk size"))?;
        if size == 0 {
            // Trailers, up to the empty line.
            for _ in 0..MAX_HEADERS {
                let mut trailer = Vec::new();
                self.reader
                    .by_ref()
                    .take(8 * 1024)
                    .read_until(b'\n', &mut trailer)?;
                if trailer.is_empty() || trailer == b"\r\n" || trailer == b"\n" {
                    self.done = true;
                    return Ok(());
                }
            }
            return Err(invalid("too many trailer lines"));
        }
        self.left = size;
        Ok(())
    }
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

impl<R: BufRead> Read for Body<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            // Only chunked bodies get here with bytes still to come.
            self.next_chunk()?;
            if self.done {
                return Ok(0);
            }
        }
        let want = buf.len().min(self.left.min(usize::MAX as u64) as usize);
        let n = self.reader.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the client closed the connection inside the body",
            ));
        }
        self.left -= n as u64;
        if self.left == 0 {
            match self.framing {
                Framing::Length(_) => self.done = true,
                Framing::Chunked => {
                    let mut crlf = [0u8; 2];
                    self.reader.read_exact(&mut crlf)?;
                    if &crlf != b"\r\n" {
                        return Err(invalid("chunk not followed by CRLF"));
                    }
                }
            }
        }
        Ok(n)
    }
}

/// The reason phrase of the statuses envd answers with.
pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Payload Too Large",
        415 => "Unsupported Media Type",
        429 => "Too Many Requests",
        499 => "Client Closed Request",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        507 => "Insufficient Storage",
        _ => "Status",
    }
}

/// Writes a complete response with a body of known length.
pub fn respond(
    out: &mut impl Write,
    status: u16,
    content_type: &str,
    extra: &[(&str, String)],
    body: &[u8],
) -> io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Length: {}\r\n",
        reason(status),
        body.len()
    );
    if !content_type.is_empty() {
        head.push_str(&format!("Content-Type: {content_type}\r\n"));
    }
    for (name, value) in extra {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    out.write_all(head.as_bytes())?;
    out.write_all(body)?;
    out.flush()
}

/// A response whose body is sent in chunks as it is produced.
pub struct Chunked<W: Write> {
    out: W,
}

impl<W: Write> Chunked<W> {
    /// Sends the head of a chunked response.
    pub fn start(
        mut out: W,
        status: u16,
        content_type: &str,
        extra: &[(&str, String)],
    ) -> io::Result<Self> {
        let mut head = format!(
            "HTTP/1.1 {status} {}\r\nTransfer-Encoding: chunked\r\nContent-Type: {content_type}\r\n",
            reason(status)
        );
        for (name, value) in extra {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        out.write_all(head.as_bytes())?;
        out.flush()?;
        Ok(Chunked { out })
    }

    /// Sends one chunk (empty data sends nothing: an empty chunk would end the body).
    pub fn send(&mut self, data: &[u8]) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        write!(self.out, "{:x}\r\n", data.len())?;
        self.out.write_all(data)?;
        self.out.write_all(b"\r\n")?;
        self.out.flush()
    }

    /// Ends the body.
    pub fn finish(mut self) -> io::Result<()> {
        self.out.write_all(b"0\r\n\r\n")?;
        self.out.flush()
    }
}

/// A connection's reader, buffered.
pub type ConnReader = BufReader<TcpStream>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn head_with_query_and_headers_parses() {
        let raw = b"POST /files?path=%2Ftmp%2Fa+b&username=user HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc";
        let mut reader = Cursor::new(&raw[..]);
        let head = read_head(&mut reader).unwrap().unwrap();
        assert_eq!(head.path, "/files");
        assert_eq!(head.param("path"), Some("/tmp/a b"));
        assert_eq!(head.header("content-length"), Some("3"));
        let framing = head.framing().unwrap();
        let mut body = Body::new(&mut reader, framing);
        assert_eq!(body.read_all(10).unwrap(), b"abc");
    }

    #[test]
    fn chunked_body_reassembles() {
        let raw = b"4\r\nWiki\r\n5;x=y\r\npedia\r\n0\r\nT: v\r\n\r\nNEXT";
        let mut reader = Cursor::new(&raw[..]);
        let mut body = Body::new(&mut reader, Framing::Chunked);
        assert_eq!(body.read_all(100).unwrap(), b"Wikipedia");
        assert!(body.finished());
        let mut rest = String::new();
        reader.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "NEXT");
    }

    #[test]
    fn oversized_body_is_refused() {
        let raw = b"abcdef";
        let mut reader = Cursor::new(&raw[..]);
        let mut body = Body::new(&mut reader, Framing::Length(6));
        assert!(body.read_all(5).is_err());
    }

    #[test]
    fn huge_head_is_refused() {
        let mut raw = b"GET / HTTP/1.1\r\nX: ".to_vec();
        raw.extend(std::iter::repeat_n(b'a', MAX_HEAD + 10));
        raw.extend_from_slice(b"\r\n\r\n");
        assert!(read_head(&mut Cursor::new(raw)).is_err());
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_heads_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = read_head(&mut Cursor::new(bytes));
        }

        #[test]
        fn arbitrary_chunked_bodies_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let mut reader = Cursor::new(bytes);
            let mut body = Body::new(&mut reader, Framing::Chunked);
            let _ = body.read_all(1024);
        }
    }
}

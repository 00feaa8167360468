//! envd's HTTP file transfer: `GET /files` streams a file out, `POST /files` takes
//! `multipart/form-data` (one or more `file` parts, the destination in `path` or the part's
//! filename) or `application/octet-stream` (optionally gzip-encoded) to `?path=`.

use std::fs::{self, File};
use std::io::{self, BufRead, Read, Write};
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::filesystem::{chown_to, make_dirs};
use super::http1::{self, Body, Head};
use crate::guest::users::ResolvedUser;

/// Largest header section of one multipart part.
const MAX_PART_HEAD: usize = 16 * 1024;
/// Most parts in one upload.
const MAX_PARTS: usize = 1000;

/// An HTTP failure: status and message.
#[derive(Debug)]
pub struct HttpError(pub u16, pub String);

impl HttpError {
    fn io(what: &Path, e: &io::Error) -> Self {
        let status = match e.kind() {
            io::ErrorKind::NotFound => 404,
            io::ErrorKind::PermissionDenied => 403,
            _ if e.raw_os_error() == Some(libc::ENOSPC) => 507,
            _ if e.raw_os_error() == Some(libc::EISDIR)
                || e.raw_os_error() == Some(libc::ENOTDIR) =>
            {
                400
            }
            _ => 500,
        };
        HttpError(status, format!("{}: {e}", what.display()))
    }
}

/// Opens a file for download: its handle and size.
pub fn open_for_read(path: &Path) -> Result<(File, u64), HttpError> {
    let meta = fs::metadata(path).map_err(|e| HttpError::io(path, &e))?;
    if meta.is_dir() {
        return Err(HttpError(
            400,
            format!("{} is a directory, not a file", path.display()),
        ));
    }
    let file = File::open(path).map_err(|e| HttpError::io(path, &e))?;
    Ok((file, meta.len()))
}

/// Writes `source` to `path` (parents created, owned by `user`); the written entry's JSON.
pub fn write_file(
    path: &Path,
    source: &mut impl Read,
    user: &ResolvedUser,
) -> Result<Value, HttpError> {
    if path.is_dir() {
        return Err(HttpError(
            400,
            format!("{} is a directory: name a file to write", path.display()),
        ));
    }
    if let Some(parent) = path.parent() {
        make_dirs(parent, user).map_err(|e| HttpError::io(parent, &e))?;
    }
    let existed = path.exists();
    let mut file = File::create(path).map_err(|e| HttpError::io(path, &e))?;
    io::copy(source, &mut file).map_err(|e| match e.kind() {
        io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof => HttpError(
            400,
            format!("reading the upload for {}: {e}", path.display()),
        ),
        _ => HttpError::io(path, &e),
    })?;
    file.flush().map_err(|e| HttpError::io(path, &e))?;
    if !existed {
        chown_to(path, user);
    }
    Ok(json!({
        "name": path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        "type": "file",
        "path": path.display().to_string(),
    }))
}

/// The boundary of a `multipart/form-data` content type.
pub fn boundary(content_type: &str) -> Option<String> {
    let (kind, params) = content_type.split_once(';')?;
    if !kind.trim().eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    params.split(';').find_map(|p| {
        let (k, v) = p.trim().split_once('=')?;
        if !k.trim().eq_ignore_ascii_case("boundary") {
            return None;
        }
        let v = v.trim().trim_matches('"');
        (!v.is_empty() && v.len() <= 200).then(|| v.to_string())
    })
}

/// Reads a multipart body part by part, streaming each `file` part to where `dest` says.
pub fn receive_multipart<R: BufRead>(
    body: &mut Body<'_, R>,
    boundary: &str,
    dest: &mut dyn FnMut(Option<&str>) -> Result<PathBuf, HttpError>,
    user: &ResolvedUser,
) -> Result<Vec<Value>, HttpError> {
    let delimiter = format!("\r\n--{boundary}").into_bytes();
    // The first delimiter has no leading CRLF: skip the preamble up to `--boundary`.
    let mut scanner = Scanner::new(body, delimiter[2..].to_vec());
    if scanner.copy_until_delimiter(&mut io::sink(), usize::MAX)? != Progress::Found {
        return Err(HttpError(
            400,
            "the multipart body holds no boundary".into(),
        ));
    }
    scanner.delimiter = delimiter;
    let mut written = Vec::new();
    for _ in 0..MAX_PARTS {
        // After a delimiter: `--` ends the body, CRLF starts a part.
        let two = scanner.take_exact(2)?;
        if two == b"--" {
            return Ok(written);
        }
        if two != b"\r\n" {
            return Err(HttpError(400, "malformed multipart delimiter line".into()));
        }
        let headers = scanner.read_part_head()?;
        let disposition = headers
            .iter()
            .find(|(n, _)| n == "content-disposition")
            .map(|(_, v)| v.as_str())
            .unwrap_or("");
        let name = disposition_param(disposition, "name");
        let filename = disposition_param(disposition, "filename");
        let mut part = PartReader {
            scanner: &mut scanner,
            done: false,
        };
        if name.as_deref() == Some("file") {
            let path = dest(filename.as_deref())?;
            written.push(write_file(&path, &mut part, user)?);
        }
        part.drain()?;
    }
    Err(HttpError(
        413,
        format!("more than {MAX_PARTS} parts in one upload"),
    ))
}

fn disposition_param(disposition: &str, key: &str) -> Option<String> {
    disposition.split(';').skip(1).find_map(|p| {
        let (k, v) = p.trim().split_once('=')?;
        (k.trim().eq_ignore_ascii_case(key)).then(|| v.trim().trim_matches('"').to_string())
    })
}

/// How far a scan got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Progress {
    /// The delimiter was found and consumed.
    Found,
    /// The input ended first.
    End,
    /// `limit` bytes were copied without meeting the delimiter.
    Limit,
}

/// Finds delimiters in a stream, holding at most [`SCAN_BUFFER`] bytes of it.
struct Scanner<'a, R: Read> {
    reader: &'a mut R,
    buf: Vec<u8>,
    eof: bool,
    delimiter: Vec<u8>,
}

/// Bytes a scanner reads ahead.
const SCAN_BUFFER: usize = 64 * 1024;

impl<'a, R: Read> Scanner<'a, R> {
    fn new(reader: &'a mut R, delimiter: Vec<u8>) -> Self {
        Scanner {
            reader,
            buf: Vec::new(),
            eof: false,
            delimiter,
        }
    }

    /// Reads more input; false at its end.
    fn fill(&mut self) -> Result<bool, HttpError> {
        if self.eof {
            return Ok(false);
        }
        let mut tmp = vec![0u8; SCAN_BUFFER];
        let n = loop {
            match self.reader.read(&mut tmp) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(HttpError(400, format!("reading the multipart body: {e}"))),
            }
        };
        if n == 0 {
            self.eof = true;
            return Ok(false);
        }
        self.buf.extend_from_slice(&tmp[..n]);
        Ok(true)
    }

    fn take_exact(&mut self, n: usize) -> Result<Vec<u8>, HttpError> {
        while self.buf.len() < n {
            if !self.fill()? {
                return Err(HttpError(400, "the multipart body ended early".into()));
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    /// Copies input up to the next delimiter into `out`, at most `limit` bytes per call.
    fn copy_until_delimiter(
        &mut self,
        out: &mut impl Write,
        limit: usize,
    ) -> Result<Progress, HttpError> {
        let mut copied = 0usize;
        loop {
            let room = limit - copied;
            if let Some(at) = find(&self.buf, &self.delimiter) {
                if at > room {
                    emit(out, &self.buf[..room])?;
                    self.buf.drain(..room);
                    return Ok(Progress::Limit);
                }
                emit(out, &self.buf[..at])?;
                self.buf.drain(..at + self.delimiter.len());
                return Ok(Progress::Found);
            }
            let keep = if self.eof {
                0
            } else {
                partial_suffix(&self.buf, &self.delimiter)
            };
            let safe = (self.buf.len() - keep).min(room);
            emit(out, &self.buf[..safe])?;
            self.buf.drain(..safe);
            copied += safe;
            if copied == limit {
                return Ok(Progress::Limit);
            }
            if self.eof {
                return Ok(Progress::End);
            }
            self.fill()?;
        }
    }

    fn read_part_head(&mut self) -> Result<Vec<(String, String)>, HttpError> {
        let mut headers = Vec::new();
        let mut total = 0;
        loop {
            let line = loop {
                if let Some(at) = self.buf.iter().position(|&b| b == b'\n') {
                    break self.buf.drain(..=at).collect::<Vec<u8>>();
                }
                if self.buf.len() > MAX_PART_HEAD || !self.fill()? {
                    return Err(HttpError(
                        400,
                        "malformed or oversized multipart part headers".into(),
                    ));
                }
            };
            total += line.len();
            if total > MAX_PART_HEAD {
                return Err(HttpError(400, "oversized multipart part headers".into()));
            }
            let text = String::from_utf8_lossy(&line);
            let text = text.trim_end_matches(['\r', '\n']);
            if text.is_empty() {
                return Ok(headers);
            }
            if let Some((n, v)) = text.split_once(':') {
                headers.push((n.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
    }
}

fn emit(out: &mut impl Write, data: &[u8]) -> Result<(), HttpError> {
    out.write_all(data)
        .map_err(|e| HttpError(500, format!("writing an uploaded part: {e}")))
}

/// A part's content up to the next delimiter.
struct PartReader<'s, 'a, R: Read> {
    scanner: &'s mut Scanner<'a, R>,
    done: bool,
}

impl<R: Read> PartReader<'_, '_, R> {
    fn drain(&mut self) -> Result<(), HttpError> {
        if self.done {
            return Ok(());
        }
        match self
            .scanner
            .copy_until_delimiter(&mut io::sink(), usize::MAX)?
        {
            Progress::Found => {
                self.done = true;
                Ok(())
            }
            _ => Err(HttpError(
                400,
                "the multipart body ended inside a part".into(),
            )),
        }
    }
}

impl<R: Read> Read for PartReader<'_, '_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        let limit = buf.len();
        let mut chunk = io::Cursor::new(&mut buf[..]);
        let progress = self
            .scanner
            .copy_until_delimiter(&mut chunk, limit)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.1))?;
        let n = chunk.position() as usize;
        match progress {
            Progress::Found => self.done = true,
            Progress::End if n == 0 => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the multipart body ended inside a part",
                ))
            }
            _ => {}
        }
        Ok(n)
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Length of the longest suffix of `buf` that is a proper prefix of `d`.
fn partial_suffix(buf: &[u8], d: &[u8]) -> usize {
    let max = (d.len() - 1).min(buf.len());
    (1..=max)
        .rev()
        .find(|&k| buf[buf.len() - k..] == d[..k])
        .unwrap_or(0)
}

/// A request's reader for octet-stream uploads, gzip-decoded when the client said so.
pub fn upload_reader<'b, R: BufRead>(
    head: &Head,
    body: &'b mut Body<'_, R>,
) -> Result<Box<dyn Read + 'b>, HttpError> {
    match head
        .header("content-encoding")
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        None | Some("identity") | Some("") => Ok(Box::new(body)),
        Some("gzip") => Ok(Box::new(flate2::read::GzDecoder::new(body))),
        Some(other) => Err(HttpError(
            415,
            format!("unsupported Content-Encoding {other:?} (use gzip or none)"),
        )),
    }
}

/// Errors as envd's JSON error body.
pub fn error_body(err: &HttpError) -> Vec<u8> {
    json!({"code": err.0, "message": err.1})
        .to_string()
        .into_bytes()
}

/// Responds with a JSON error.
pub fn respond_error(out: &mut impl Write, err: &HttpError) -> io::Result<()> {
    http1::respond(out, err.0, "application/json", &[], &error_body(err))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::envd::http1::Framing;
    use std::io::Cursor;

    fn root_user() -> ResolvedUser {
        ResolvedUser {
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
            home: "/".into(),
        }
    }

    fn upload(body: &[u8], boundary: &str, dir: &Path) -> Result<Vec<Value>, HttpError> {
        let mut reader = Cursor::new(body.to_vec());
        let mut body = Body::new(&mut reader, Framing::Length(body.len() as u64));
        let dir = dir.to_path_buf();
        receive_multipart(
            &mut body,
            boundary,
            &mut |name| Ok(dir.join(name.unwrap_or("x"))),
            &root_user(),
        )
    }

    #[test]
    fn multipart_upload_writes_each_file_part() {
        let dir = tempfile::tempdir().unwrap();
        let body = b"preamble\r\n--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.txt\"\r\nContent-Type: application/octet-stream\r\n\r\nhello\r\n--X\r\nworld\r\n--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"b\"\r\n\r\n\r\n--XyZ--\r\n";
        let written = upload(body, "XyZ", dir.path()).unwrap();
        assert_eq!(written.len(), 2);
        assert_eq!(
            fs::read(dir.path().join("a.txt")).unwrap(),
            b"hello\r\n--X\r\nworld"
        );
        assert_eq!(fs::read(dir.path().join("b")).unwrap(), b"");
    }

    #[test]
    fn multipart_large_part_streams_through() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let mut body =
            b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big\"\r\n\r\n"
                .to_vec();
        body.extend_from_slice(&data);
        body.extend_from_slice(b"\r\n--b--\r\n");
        upload(&body, "b", dir.path()).unwrap();
        assert_eq!(fs::read(dir.path().join("big")).unwrap(), data);
    }

    #[test]
    fn boundary_is_read_from_the_content_type() {
        assert_eq!(
            boundary("multipart/form-data; boundary=\"ab c\"").as_deref(),
            Some("ab c")
        );
        assert_eq!(boundary("application/json"), None);
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_multipart_bodies_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..400)) {
            let dir = tempfile::tempdir().unwrap();
            let _ = upload(&bytes, "b", dir.path());
        }

        #[test]
        fn part_content_survives_any_bytes(content in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let dir = tempfile::tempdir().unwrap();
            let mut body = b"--bnd\r\nContent-Disposition: form-data; name=\"file\"; filename=\"f\"\r\n\r\n".to_vec();
            body.extend_from_slice(&content);
            body.extend_from_slice(b"\r\n--bnd--\r\n");
            if find(&content, b"\r\n--bnd").is_none() {
                upload(&body, "bnd", dir.path()).unwrap();
                proptest::prop_assert_eq!(fs::read(dir.path().join("f")).unwrap(), content);
            }
        }
    }
}

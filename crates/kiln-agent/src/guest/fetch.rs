//! `ADD <url>`: a download inside the guest, over the guest's own network (so the build's
//! egress policy applies), into a file with Docker's mode and mtime.
//!
//! `http://` is fetched by the agent itself (HTTP/1.1 GET, redirects followed), so it works
//! on any userland. kiln-init carries no TLS stack and no CA store of its own: `https://`
//! uses the image's `curl` (or else `wget`), which verify certificates against the image's CA
//! bundle (plus the build's extra CAs, given in the environment). Without either tool the
//! download fails with a message saying so.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::os::unix::fs::{chown, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, UNIX_EPOCH};

use sha2::{Digest, Sha256};

use crate::proto::{FetchSpec, DEFAULT_PATH};

/// Most redirects followed for one download.
const MAX_REDIRECTS: usize = 10;
/// Largest response head accepted.
const MAX_HEAD: usize = 64 * 1024;

/// What a finished download gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// Bytes written.
    pub bytes: u64,
    /// SHA-256, lower-case hex.
    pub sha256: String,
    /// `Last-Modified`, as seconds since the epoch.
    pub mtime: Option<i64>,
}

/// Downloads `spec.url` into `spec.dest`; on any failure no file is left at `dest`.
pub fn fetch(spec: &FetchSpec) -> Result<Fetched, String> {
    let named;
    let mut dest = Path::new(&spec.dest);
    if dest.is_dir() {
        // As Docker: an existing directory gets the file under the URL's last segment.
        named = dest.join(url_file_name(&spec.url).ok_or_else(|| {
            format!(
                "ADD {}: the URL names no file; give a file destination instead of the directory {}",
                spec.url, spec.dest
            )
        })?);
        dest = &named;
    }
    if !dest.is_absolute() {
        return Err(format!(
            "ADD {}: the destination {} is not absolute",
            spec.url, spec.dest
        ));
    }
    let parent = dest
        .parent()
        .ok_or_else(|| format!("ADD {}: {} names no file", spec.url, spec.dest))?;
    fs::create_dir_all(parent)
        .map_err(|e| format!("cannot create directory {}: {e}", parent.display()))?;
    let temp = parent.join(format!(".kiln-fetch-{}", std::process::id()));
    let deadline = Instant::now() + Duration::from_millis(spec.timeout_ms.max(1));
    let result = download(spec, &temp, deadline).and_then(|mtime| finish(spec, &temp, dest, mtime));
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result
}

/// Writes the content to `temp`; returns the Last-Modified time when known.
fn download(spec: &FetchSpec, temp: &Path, deadline: Instant) -> Result<Option<i64>, String> {
    let mut url = spec.url.clone();
    for _ in 0..=MAX_REDIRECTS {
        if is_https(&url) {
            return with_tool(spec, &url, temp, deadline).map(|()| None);
        }
        match http_get(&url, temp, deadline)? {
            Outcome::Done { mtime } => return Ok(mtime),
            Outcome::Redirect(next) => url = next,
        }
    }
    Err(format!(
        "GET {}: more than {MAX_REDIRECTS} redirects",
        spec.url
    ))
}

/// The last segment of a URL's path, if it names something.
fn url_file_name(url: &str) -> Option<String> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let path = rest.split(['?', '#']).next()?;
    let name = path.split_once('/')?.1.rsplit('/').next()?;
    (!name.is_empty() && name != "." && name != "..").then(|| name.to_string())
}

fn is_https(url: &str) -> bool {
    url.get(..8)
        .is_some_and(|s| s.eq_ignore_ascii_case("https://"))
}

/// Checks the digest, sets mode, owner and mtime, and moves the file into place.
fn finish(
    spec: &FetchSpec,
    temp: &Path,
    dest: &Path,
    mtime: Option<i64>,
) -> Result<Fetched, String> {
    let (bytes, sha256) = digest(temp).map_err(|e| format!("reading the download: {e}"))?;
    if let Some(expected) = &spec.sha256 {
        if !expected.eq_ignore_ascii_case(&sha256) {
            return Err(format!(
                "checksum mismatch for {}: expected sha256:{expected}, got sha256:{sha256}",
                spec.url
            ));
        }
    }
    fs::set_permissions(temp, fs::Permissions::from_mode(spec.mode))
        .map_err(|e| format!("cannot set the mode of {}: {e}", spec.dest))?;
    chown(
        temp,
        Some(spec.uid.unwrap_or(0)),
        Some(spec.gid.unwrap_or(0)),
    )
    .map_err(|e| format!("cannot set the owner of {}: {e}", spec.dest))?;
    if let Some(seconds) = mtime {
        let at = UNIX_EPOCH + Duration::from_secs(seconds.max(0) as u64);
        let file = File::options()
            .write(true)
            .open(temp)
            .map_err(|e| format!("cannot open the download: {e}"))?;
        file.set_modified(at)
            .map_err(|e| format!("cannot set the mtime of {}: {e}", spec.dest))?;
    }
    fs::rename(temp, dest).map_err(|e| format!("cannot write {}: {e}", spec.dest))?;
    Ok(Fetched {
        bytes,
        sha256,
        mtime,
    })
}

fn digest(path: &Path) -> io::Result<(u64, String)> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
        hasher.update(&buf[..n]);
    }
    let hex = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>();
    Ok((total, hex))
}

enum Outcome {
    Done { mtime: Option<i64> },
    Redirect(String),
}

/// `http://host[:port]/path` split into host, port and request target.
fn split_url(url: &str) -> Result<(String, u16, String), String> {
    let rest = url
        .get(..7)
        .filter(|s| s.eq_ignore_ascii_case("http://"))
        .map(|_| &url[7..])
        .ok_or_else(|| format!("{url}: not an http:// URL"))?;
    let (authority, path) = match rest.find(['/', '?']) {
        Some(at) => (&rest[..at], &rest[at..]),
        None => (rest, "/"),
    };
    let path = if path.starts_with('?') {
        format!("/{path}")
    } else {
        path.to_string()
    };
    let authority = authority.rsplit('@').next().unwrap_or(authority);
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => {
            let port = p
                .parse::<u16>()
                .map_err(|_| format!("{url}: bad port {p:?}"))?;
            (h.trim_matches(['[', ']']).to_string(), port)
        }
        _ => (authority.trim_matches(['[', ']']).to_string(), 80),
    };
    if host.is_empty() || path.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(format!("{url}: not a valid URL"));
    }
    Ok((host, port, path))
}

fn left(deadline: Instant) -> io::Result<Duration> {
    let d = deadline.saturating_duration_since(Instant::now());
    if d.is_zero() {
        return Err(io::Error::new(io::ErrorKind::TimedOut, "timed out"));
    }
    Ok(d)
}

/// One GET; the body goes to `temp`.
fn http_get(url: &str, temp: &Path, deadline: Instant) -> Result<Outcome, String> {
    let (host, port, path) = split_url(url)?;
    let fail = |what: &str, e: io::Error| format!("GET {url}: cannot {what}: {e}");
    let addrs = resolve(&host, port, deadline).map_err(|e| fail("resolve the host", e))?;
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
    let mut stream = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, left(deadline).map_err(|e| fail("connect", e))?) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = e,
        }
    }
    let mut stream = stream.ok_or_else(|| fail("connect", last))?;
    let host_header = if port == 80 {
        host.clone()
    } else {
        format!("{host}:{port}")
    };
    let head = format!(
        "GET {path} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: kiln-init\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    stream
        .set_write_timeout(Some(left(deadline).map_err(|e| fail("send", e))?))
        .and_then(|()| stream.write_all(head.as_bytes()))
        .map_err(|e| fail("send the request", e))?;
    let mut reader = BufReader::new(Deadline { stream, deadline });
    let (status, headers) = read_head(&mut reader).map_err(|e| fail("read the response", e))?;
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    };
    if matches!(status, 301 | 302 | 303 | 307 | 308) {
        let location =
            header("location").ok_or_else(|| format!("GET {url}: {status} without a Location"))?;
        let next = if location.contains("://") {
            location.to_string()
        } else if location.starts_with('/') {
            format!("http://{host_header}{location}")
        } else {
            return Err(format!(
                "GET {url}: {status} to a relative Location {location:?}"
            ));
        };
        return Ok(Outcome::Redirect(next));
    }
    if status != 200 {
        return Err(format!(
            "GET {url}: the server answered {status} (expected 200)"
        ));
    }
    let mtime = header("last-modified").and_then(parse_http_date);
    let chunked =
        header("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let length = header("content-length").and_then(|v| v.trim().parse::<u64>().ok());
    let mut out = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(temp)
        .map_err(|e| format!("cannot create {}: {e}", temp.display()))?;
    let copied = if chunked {
        copy_chunked(&mut reader, &mut out)
    } else if let Some(n) = length {
        let got = io::copy(&mut (&mut reader).take(n), &mut out);
        match got {
            Ok(got) if got < n => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the body ended after {got} of {n} bytes"),
            )),
            other => other.map(|_| ()),
        }
    } else {
        io::copy(&mut reader, &mut out).map(|_| ())
    };
    copied
        .and_then(|()| out.flush())
        .map_err(|e| fail("read the body", e))?;
    Ok(Outcome::Done { mtime })
}

/// `host`'s addresses: an IP literal, a name in `/etc/hosts`, or an A record from the first
/// `nameserver` of `/etc/resolv.conf` (slirp's 10.0.2.3 when none). kiln-init is a static
/// binary whose libc cannot load the guest's resolver modules (and the busybox base has no
/// libc at all), so it asks DNS itself.
fn resolve(host: &str, port: u16, deadline: Instant) -> io::Result<Vec<SocketAddr>> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let hosts = fs::read_to_string("/etc/hosts").unwrap_or_default();
    let listed: Vec<SocketAddr> = hosts
        .lines()
        .map(|l| l.split('#').next().unwrap_or_default())
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let ip = words.next()?.parse::<IpAddr>().ok()?;
            words
                .any(|name| name.eq_ignore_ascii_case(host))
                .then_some(SocketAddr::new(ip, port))
        })
        .collect();
    if !listed.is_empty() {
        return Ok(listed);
    }
    let server = fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            let rest = l.trim().strip_prefix("nameserver")?;
            rest.trim().parse::<IpAddr>().ok()
        })
        .unwrap_or(IpAddr::V4(Ipv4Addr::new(10, 0, 2, 3)));
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    socket.connect((server, 53))?;
    let nanos = std::time::SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let id = (std::process::id() as u16) ^ (nanos as u16);
    let query = dns_query(id, host)?;
    for _ in 0..3 {
        socket.send(&query)?;
        let wait = left(deadline)?.min(Duration::from_secs(2));
        socket.set_read_timeout(Some(wait))?;
        let mut buf = [0u8; 1500];
        match socket.recv(&mut buf) {
            Ok(n) => {
                let ips = dns_answers(id, &buf[..n])?;
                if ips.is_empty() {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("{host} has no IPv4 address (asked {server})"),
                    ));
                }
                return Ok(ips
                    .into_iter()
                    .map(|ip| SocketAddr::new(ip.into(), port))
                    .collect());
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::TimedOut,
        format!("no answer from the name server {server} for {host}"),
    ))
}

/// A recursive DNS query for `host`'s A records.
fn dns_query(id: u16, host: &str) -> io::Result<Vec<u8>> {
    let mut packet = Vec::with_capacity(32 + host.len());
    packet.extend_from_slice(&id.to_be_bytes());
    packet.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in host.trim_end_matches('.').split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{host:?} is not a valid host name"),
            ));
        }
        packet.push(label.len() as u8);
        packet.extend_from_slice(label.as_bytes());
    }
    packet.extend_from_slice(&[0, 0, 1, 0, 1]);
    Ok(packet)
}

/// The A records of a DNS answer to query `id`.
fn dns_answers(id: u16, packet: &[u8]) -> io::Result<Vec<Ipv4Addr>> {
    let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidData, format!("DNS answer: {why}"));
    let u16_at = |at: usize| -> io::Result<u16> {
        packet
            .get(at..at + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .ok_or_else(|| bad("cut off"))
    };
    if u16_at(0)? != id {
        return Err(bad("it answers another query"));
    }
    let rcode = u16_at(2)? & 0x000f;
    if rcode == 3 {
        return Err(io::Error::new(io::ErrorKind::NotFound, "no such host name"));
    }
    if rcode != 0 {
        return Err(bad(&format!("the name server failed (rcode {rcode})")));
    }
    let (questions, answers) = (u16_at(4)?, u16_at(6)?);
    let skip_name = |mut at: usize| -> io::Result<usize> {
        loop {
            let len = *packet.get(at).ok_or_else(|| bad("cut off"))? as usize;
            if len == 0 {
                return Ok(at + 1);
            }
            if len & 0xc0 == 0xc0 {
                return Ok(at + 2);
            }
            at += 1 + len;
        }
    };
    let mut at = 12;
    for _ in 0..questions {
        at = skip_name(at)? + 4;
    }
    let mut found = Vec::new();
    for _ in 0..answers {
        at = skip_name(at)?;
        let (kind, class, len) = (u16_at(at)?, u16_at(at + 2)?, u16_at(at + 8)? as usize);
        let data = packet
            .get(at + 10..at + 10 + len)
            .ok_or_else(|| bad("cut off"))?;
        if kind == 1 && class == 1 && len == 4 {
            found.push(Ipv4Addr::new(data[0], data[1], data[2], data[3]));
        }
        at += 10 + len;
    }
    Ok(found)
}

/// A stream whose every read must finish before one deadline.
struct Deadline {
    stream: TcpStream,
    deadline: Instant,
}

impl Read for Deadline {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.set_read_timeout(Some(left(self.deadline)?))?;
        self.stream.read(buf)
    }
}

fn read_line(reader: &mut impl BufRead, limit: &mut usize) -> io::Result<String> {
    let mut line = Vec::new();
    let n = reader.take(*limit as u64).read_until(b'\n', &mut line)?;
    if n == 0 || !line.ends_with(b"\n") {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the response head is cut off or too long",
        ));
    }
    *limit -= n;
    Ok(String::from_utf8_lossy(&line).trim_end().to_string())
}

fn read_head(reader: &mut impl BufRead) -> io::Result<(u16, Vec<(String, String)>)> {
    let mut limit = MAX_HEAD;
    let status_line = read_line(reader, &mut limit)?;
    let status = status_line
        .strip_prefix("HTTP/1.")
        .and_then(|s| s.get(2..5))
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("not HTTP/1.x: {status_line:?}"),
            )
        })?;
    let mut headers = Vec::new();
    loop {
        let line = read_line(reader, &mut limit)?;
        if line.is_empty() {
            return Ok((status, headers));
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
}

fn copy_chunked(reader: &mut impl BufRead, out: &mut File) -> io::Result<()> {
    loop {
        let mut limit = 4096;
        let size_line = read_line(reader, &mut limit)?;
        let hex = size_line.split(';').next().unwrap_or_default().trim();
        let size = u64::from_str_radix(hex, 16).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad chunk size {hex:?}"),
            )
        })?;
        if size == 0 {
            return Ok(());
        }
        let got = io::copy(&mut reader.take(size), out)?;
        if got < size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "a chunk is cut off",
            ));
        }
        let mut limit = 4096;
        read_line(reader, &mut limit)?;
    }
}

/// An IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`) as seconds since the epoch.
pub fn parse_http_date(text: &str) -> Option<i64> {
    let parts: Vec<&str> = text.split_whitespace().collect();
    let [_, day, month, year, time, "GMT"] = parts.as_slice() else {
        return None;
    };
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = MONTHS.iter().position(|m| m.eq_ignore_ascii_case(month))? as i64 + 1;
    let day: i64 = day.parse().ok()?;
    let year: i64 = year.parse().ok()?;
    let hms: Vec<i64> = time
        .split(':')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    let [h, m, s] = hms.as_slice() else {
        return None;
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + m * 60 + s)
}

/// `https://` with the image's own `curl` or `wget`.
fn with_tool(spec: &FetchSpec, url: &str, temp: &Path, deadline: Instant) -> Result<(), String> {
    let path = spec
        .env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH)
        .to_string();
    let find = |name: &str| -> Option<PathBuf> {
        path.split(':')
            .map(|dir| Path::new(dir).join(name))
            .find(|p| p.is_file())
    };
    let seconds = left(deadline)
        .map_err(|_| format!("GET {url}: timed out"))?
        .as_secs()
        .max(1)
        .to_string();
    let mut command = if let Some(curl) = find("curl") {
        let mut c = Command::new(curl);
        // -R: the file's mtime from Last-Modified, as Docker does.
        c.args(["-fsSLR", "--max-time", &seconds, "-o"])
            .arg(temp)
            .arg(url);
        c
    } else if let Some(wget) = find("wget") {
        let mut c = Command::new(wget);
        c.args(["-q", "-T", &seconds, "-O"]).arg(temp).arg(url);
        c
    } else {
        return Err(format!(
            "ADD {url}: https downloads need curl or wget in the image (kiln-init fetches only \
             http:// itself); install one in an earlier RUN step, or use http:// with --checksum"
        ));
    };
    command.env_clear().env("PATH", &path);
    for entry in &spec.env {
        if let Some((k, v)) = entry.split_once('=') {
            command.env(k, v);
        }
    }
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("GET {url}: cannot run the download tool: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "GET {url} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_http_date_when_imf_fixdate_then_epoch_seconds() {
        assert_eq!(
            parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(784_111_777)
        );
        assert_eq!(parse_http_date("Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
        assert_eq!(parse_http_date("yesterday"), None);
    }

    #[test]
    fn dns_answers_when_cname_then_a_then_the_address() {
        let mut packet = dns_query(0x1234, "svc.test").expect("query");
        packet[2] = 0x81;
        packet[3] = 0x80;
        packet[7] = 2;
        // CNAME to a compressed name, then an A record.
        packet.extend_from_slice(&[0xc0, 12, 0, 5, 0, 1, 0, 0, 0, 60, 0, 2, 0xc0, 12]);
        packet.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 10, 0, 0, 7]);

        let found = dns_answers(0x1234, &packet).expect("answers");

        assert_eq!(found, [Ipv4Addr::new(10, 0, 0, 7)]);
    }

    #[test]
    fn dns_answers_when_nxdomain_or_other_id_then_error() {
        let mut packet = dns_query(7, "nope.test").expect("query");
        packet[3] = 0x83;

        assert_eq!(
            dns_answers(7, &packet).expect_err("nxdomain").kind(),
            io::ErrorKind::NotFound
        );
        assert!(dns_answers(8, &packet).is_err());
    }

    #[test]
    fn split_url_when_port_and_query_then_parts() {
        assert_eq!(
            split_url("http://10.0.0.2:8080/a/b?c=1"),
            Ok(("10.0.0.2".into(), 8080, "/a/b?c=1".into()))
        );
        assert_eq!(
            split_url("http://host"),
            Ok(("host".into(), 80, "/".into()))
        );
        assert!(split_url("ftp://host/x").is_err());
    }

    /// Serves one connection on 127.0.0.1: reads the request head, sends `reply`.
    fn serve_once(reply: &'static [u8]) -> u16 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        std::thread::spawn(move || {
            if let Ok((mut conn, _)) = listener.accept() {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).unwrap_or(0) == 1 {
                    head.push(byte[0]);
                }
                let _ = conn.write_all(reply);
            }
        });
        port
    }

    fn spec(port: u16, dest: &Path, sha256: Option<String>) -> FetchSpec {
        FetchSpec {
            url: format!("http://127.0.0.1:{port}/dir/file"),
            dest: dest.display().to_string(),
            mode: 0o600,
            sha256,
            timeout_ms: 5_000,
            ..FetchSpec::default()
        }
    }

    #[test]
    fn fetch_when_chunked_with_last_modified_then_content_mode_and_mtime() {
        use std::os::unix::fs::MetadataExt;
        let port = serve_once(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nLast-Modified: Sun, 06 Nov 1994 08:49:37 GMT\r\n\r\n5\r\nhello\r\n1\r\n\n\r\n0\r\n\r\n",
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let dest = dir.path().join("out/file");

        let fetched = fetch(&spec(port, &dest, None)).expect("fetch");

        assert_eq!(std::fs::read(&dest).expect("read"), b"hello\n");
        assert_eq!(fetched.bytes, 6);
        let meta = std::fs::metadata(&dest).expect("meta");
        assert_eq!((meta.mode() & 0o7777, meta.mtime()), (0o600, 784_111_777));
    }

    #[test]
    fn fetch_when_checksum_mismatches_then_both_digests_named_and_no_file() {
        let port = serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi");
        let dir = tempfile::tempdir().expect("tempdir");
        let dest = dir.path().join("file");
        let wrong = "0".repeat(64);

        let err = fetch(&spec(port, &dest, Some(wrong.clone()))).expect_err("mismatch");

        assert!(
            err.contains(&format!("expected sha256:{wrong}, got sha256:8f434346648f6b96df89dda901c5176b10a6d83961dd3c1ac88b59b2dc327aa4")),
            "{err}"
        );
        assert!(!dest.exists());
        assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 0);
    }

    #[test]
    fn fetch_when_dest_is_an_existing_directory_then_the_file_goes_inside() {
        let port = serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi");
        let dir = tempfile::tempdir().expect("tempdir");

        fetch(&spec(port, dir.path(), None)).expect("fetch");

        assert_eq!(std::fs::read(dir.path().join("file")).expect("read"), b"hi");
    }

    #[test]
    fn fetch_when_not_found_then_status_named() {
        let port = serve_once(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
        let dir = tempfile::tempdir().expect("tempdir");

        let err = fetch(&spec(port, &dir.path().join("f"), None)).expect_err("404");

        assert!(err.contains("answered 404"), "{err}");
    }
}

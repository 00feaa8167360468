//! Reads the name a client asks for from the first bytes it sends: the SNI of a TLS
//! ClientHello, or the Host of an HTTP/1 request. Bounded and panic-free on any input.

/// What the first bytes of a connection say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sniffed {
    /// More bytes are needed to decide.
    Incomplete,
    /// A TLS ClientHello, with its server name if it carries one.
    Tls(Option<String>),
    /// An HTTP/1 request, with its Host (port removed) if it carries one.
    Http(Option<String>),
    /// Some other protocol.
    Other,
}

/// The most the gateway reads before deciding (a ClientHello with post-quantum key shares
/// is a few KiB).
pub const MAX_SNIFF: usize = 16 * 1024;

/// Looks at `buf`, the bytes received so far.
pub fn sniff(buf: &[u8]) -> Sniffed {
    if buf.is_empty() {
        return Sniffed::Incomplete;
    }
    if buf[0] == 0x16 {
        return tls(buf);
    }
    if looks_like_http(buf) {
        return http(buf);
    }
    Sniffed::Other
}

fn looks_like_http(buf: &[u8]) -> bool {
    const METHODS: [&[u8]; 9] = [
        b"GET ",
        b"POST ",
        b"PUT ",
        b"HEAD ",
        b"DELETE ",
        b"OPTIONS ",
        b"PATCH ",
        b"CONNECT ",
        b"TRACE ",
    ];
    METHODS.iter().any(|m| {
        let n = m.len().min(buf.len());
        buf[..n] == m[..n]
    })
}

fn http(buf: &[u8]) -> Sniffed {
    let Some(end) = find(buf, b"\r\n\r\n") else {
        return if buf.len() >= MAX_SNIFF {
            Sniffed::Http(None)
        } else {
            Sniffed::Incomplete
        };
    };
    let head = String::from_utf8_lossy(&buf[..end]);
    for line in head.split("\r\n").skip(1) {
        if let Some((name, value)) = line.split_once(':') {
            if name.trim().eq_ignore_ascii_case("host") {
                return Sniffed::Http(Some(strip_port(value.trim())));
            }
        }
    }
    Sniffed::Http(None)
}

fn strip_port(host: &str) -> String {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or_default().to_string();
    }
    host.split(':').next().unwrap_or_default().to_string()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A cursor that fails instead of panicking.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let out = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(out)
    }
    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| b[0] as usize)
    }
    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]) as usize)
    }
    fn u24(&mut self) -> Option<usize> {
        self.take(3)
            .map(|b| ((b[0] as usize) << 16) | ((b[1] as usize) << 8) | b[2] as usize)
    }
}

fn tls(buf: &[u8]) -> Sniffed {
    // The handshake may span several records: gather their payloads.
    let mut handshake = Vec::new();
    let mut r = Reader { buf, pos: 0 };
    while let Some(header) = r.take(5) {
        if header[0] != 0x16 {
            return Sniffed::Tls(None);
        }
        let len = u16::from_be_bytes([header[3], header[4]]) as usize;
        match r.take(len) {
            Some(body) => handshake.extend_from_slice(body),
            None => {
                handshake.extend_from_slice(&buf[r.pos..]);
                break;
            }
        }
        if handshake.len() >= 4 {
            let need = 4
                + (((handshake[1] as usize) << 16)
                    | ((handshake[2] as usize) << 8)
                    | handshake[3] as usize);
            if handshake.len() >= need {
                break;
            }
        }
    }
    match client_hello(&handshake) {
        Some(sni) => Sniffed::Tls(sni),
        None if buf.len() >= MAX_SNIFF => Sniffed::Tls(None),
        None => Sniffed::Incomplete,
    }
}

/// `None`: incomplete or malformed; `Some(None)`: a hello without a server name.
fn client_hello(hs: &[u8]) -> Option<Option<String>> {
    let mut r = Reader { buf: hs, pos: 0 };
    if r.u8()? != 1 {
        return Some(None);
    }
    let len = r.u24()?;
    let body = r.take(len)?;
    let mut r = Reader { buf: body, pos: 0 };
    r.take(2 + 32)?; // version, random
    let sid = r.u8()?;
    r.take(sid)?;
    let suites = r.u16()?;
    r.take(suites)?;
    let comp = r.u8()?;
    r.take(comp)?;
    if r.pos == body.len() {
        return Some(None);
    }
    let ext_len = r.u16()?;
    let exts = r.take(ext_len)?;
    let mut r = Reader { buf: exts, pos: 0 };
    while r.pos < exts.len() {
        let ty = r.u16()?;
        let len = r.u16()?;
        let data = r.take(len)?;
        if ty == 0 {
            let mut s = Reader { buf: data, pos: 0 };
            let list = s.u16()?;
            let list = s.take(list)?;
            let mut s = Reader { buf: list, pos: 0 };
            while s.pos < list.len() {
                let kind = s.u8()?;
                let n = s.u16()?;
                let name = s.take(n)?;
                if kind == 0 {
                    return Some(std::str::from_utf8(name).ok().map(crate::policy::normalize));
                }
            }
        }
    }
    Some(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A minimal ClientHello carrying `name` as its SNI.
    fn hello(name: &str) -> Vec<u8> {
        let mut sni = vec![0u8];
        sni.extend_from_slice(&(name.len() as u16).to_be_bytes());
        sni.extend_from_slice(name.as_bytes());
        let mut list = (sni.len() as u16).to_be_bytes().to_vec();
        list.extend_from_slice(&sni);
        let mut ext = vec![0, 0];
        ext.extend_from_slice(&(list.len() as u16).to_be_bytes());
        ext.extend_from_slice(&list);
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7u8; 32]);
        body.push(0);
        body.extend_from_slice(&[0, 2, 0x13, 0x01]);
        body.extend_from_slice(&[1, 0]);
        body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
        body.extend_from_slice(&ext);
        let mut hs = vec![1];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        let mut rec = vec![0x16, 3, 1];
        rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        rec.extend_from_slice(&hs);
        rec
    }

    #[test]
    fn sniff_when_client_hello_then_sni_is_read() {
        assert_eq!(
            sniff(&hello("Svc-A.Test")),
            Sniffed::Tls(Some("svc-a.test".into()))
        );
    }

    #[test]
    fn sniff_when_hello_is_cut_short_then_incomplete() {
        let h = hello("svc-a.test");
        assert_eq!(sniff(&h[..20]), Sniffed::Incomplete);
    }

    #[test]
    fn sniff_when_http_then_host_without_port() {
        let req = b"GET / HTTP/1.1\r\nHost: svc-a.test:8080\r\n\r\n";
        assert_eq!(sniff(req), Sniffed::Http(Some("svc-a.test".into())));
        assert_eq!(sniff(b"GET / HT"), Sniffed::Incomplete);
        assert_eq!(sniff(b"SSH-2.0-x\r\n"), Sniffed::Other);
    }

    proptest! {
        #[test]
        fn sniff_when_any_bytes_then_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = sniff(&bytes);
            let mut tls = vec![0x16];
            tls.extend_from_slice(&bytes);
            let _ = sniff(&tls);
        }
    }
}

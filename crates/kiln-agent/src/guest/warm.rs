//! Warming a restored guest before anyone uses it.
//!
//! Under TCG a freshly restored QEMU has translated none of the guest's code, so the first
//! request to the app pays for translating the kernel's process, socket and TCP paths on top
//! of the app's own (measured: 76 ms for the first GET after a restore, 13 ms for the next).
//! A pooled MicroVM waits for a launch anyway, so kilnd asks the agent to walk those paths
//! once before it pauses the VM: the agent starts a process (kiln-init again, as
//! `--warm-probe PORT`) that makes one HTTP exchange with a listener the agent opened on the
//! guest's loopback, then waits for it to exit. Nothing of the app runs and nothing reaches
//! it — AWS's contract is that the app sees no traffic before its run hook — so what stays
//! cold is the app's own code.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::process::{Command, Stdio};
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::children::ChildTable;
use super::http;
use crate::proto::HttpRequestSpec;

/// The flag kiln-init takes to be the probe.
pub const PROBE_FLAG: &str = "--warm-probe";
/// What the agent's listener answers.
const ANSWER: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n";
/// Largest request head the listener reads.
const MAX_HEAD: usize = 4096;

/// Walks the guest's process and TCP paths once: a listener on 127.0.0.1, a new process
/// (`program PROBE_FLAG PORT`) making one HTTP request to it, its exit awaited; `in_guest`,
/// also the network device's, with one ICMP echo to the gateway (slirp answers it itself:
/// nothing leaves the VM). Everything it started is gone when it returns, also on failure
/// or at `timeout`.
pub fn warm(program: &str, timeout: Duration, in_guest: bool) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    if in_guest {
        // Best effort: a guest without a network device has no such path to warm.
        let _ = echo_gateway(Instant::now() + ECHO_TIMEOUT);
    }
    let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .map_err(|e| format!("cannot listen on the guest's loopback: {e}"))?;
    let port = listener
        .local_addr()
        .map_err(|e| format!("the warm-up listener has no address: {e}"))?
        .port();
    let mut command = Command::new(program);
    command
        .arg(PROBE_FLAG)
        .arg(port.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let (mut child, exited) = ChildTable::global()
        .spawn(&mut command)
        .map_err(|e| format!("cannot start {program} {PROBE_FLAG}: {e}"))?;
    // The probe may die before it connects (its exec failed): stop waiting then.
    let mut early = None;
    let served = serve_one(&listener, deadline, || {
        early = exited.try_recv().ok();
        early.is_some()
    });
    drop(listener);
    let exit = match early {
        Some(exit) => exit,
        None => {
            let left = deadline.saturating_duration_since(Instant::now());
            match exited.recv_timeout(left) {
                Ok(exit) => exit,
                Err(RecvTimeoutError::Timeout) => {
                    let _ = child.kill();
                    let _ = exited.recv_timeout(Duration::from_secs(5));
                    return Err(format!(
                        "the warm-up probe did not finish within {timeout:?}"
                    ));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err("the warm-up probe's exit was lost".to_string())
                }
            }
        }
    };
    match (exit.code, exit.signal) {
        (Some(0), _) => served,
        (code, signal) => Err(format!(
            "the warm-up probe failed (exit code {code:?}, signal {signal:?})"
        )),
    }
}

/// Longest wait for the gateway's echo reply.
const ECHO_TIMEOUT: Duration = Duration::from_millis(500);

/// One ICMP echo request to the guest's gateway (slirp reflects echoes to its own address
/// without sending anything out), and its reply awaited until `deadline`.
fn echo_gateway(deadline: Instant) -> nix::Result<()> {
    use nix::sys::socket::{
        recv, sendto, setsockopt, socket, sockopt, AddressFamily, MsgFlags, SockFlag, SockProtocol,
        SockType, SockaddrIn,
    };
    use nix::sys::time::{TimeVal, TimeValLike};
    use std::os::fd::AsRawFd;

    let fd = socket(
        AddressFamily::Inet,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::Icmp,
    )?;
    let id = (std::process::id() & 0xffff) as u16;
    let to = SockaddrIn::from(std::net::SocketAddrV4::new(super::net::GATEWAY, 0));
    sendto(fd.as_raw_fd(), &echo_request(id), &to, MsgFlags::empty())?;
    let mut buf = [0u8; 256];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(nix::errno::Errno::ETIMEDOUT);
        }
        let micros = i64::try_from(left.as_micros()).unwrap_or(i64::MAX);
        setsockopt(&fd, sockopt::ReceiveTimeout, &TimeVal::microseconds(micros))?;
        let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
        if is_echo_reply(&buf[..n], id) {
            return Ok(());
        }
    }
}

/// An ICMP echo request (type 8) with identifier `id`, sequence 1 and a short payload.
fn echo_request(id: u16) -> [u8; 16] {
    let mut packet = [0u8; 16];
    packet[0] = 8;
    packet[4..6].copy_from_slice(&id.to_be_bytes());
    packet[6..8].copy_from_slice(&1u16.to_be_bytes());
    packet[8..].copy_from_slice(b"kiln-wrm");
    let sum = internet_checksum(&packet);
    packet[2..4].copy_from_slice(&sum.to_be_bytes());
    packet
}

/// Whether `ip` (an IPv4 packet as a raw socket reads it) is an echo reply to `id`.
fn is_echo_reply(ip: &[u8], id: u16) -> bool {
    let Some(&first) = ip.first() else {
        return false;
    };
    let header = usize::from(first & 0x0f) * 4;
    match ip.get(header..header + 8) {
        Some(icmp) => icmp[0] == 0 && icmp[4..6] == id.to_be_bytes(),
        None => false,
    }
}

/// RFC 1071's checksum.
fn internet_checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// How often [`serve_one`] looks whether to give up while nobody connects.
const SLICE_MS: u16 = 20;

/// Accepts one connection by `deadline` (or until `give_up` says so), reads a request
/// head, answers [`ANSWER`].
fn serve_one(
    listener: &TcpListener,
    deadline: Instant,
    mut give_up: impl FnMut() -> bool,
) -> Result<(), String> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || give_up() {
            return Err("the warm-up probe never connected".to_string());
        }
        let millis = u16::try_from(left.as_millis()).map_or(SLICE_MS, |m| m.min(SLICE_MS));
        let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(millis)) {
            Ok(0) => continue,
            Ok(_) => break,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(format!("waiting for the warm-up probe: {e}")),
        }
    }
    let (mut stream, _) = listener
        .accept()
        .map_err(|e| format!("accepting the warm-up probe: {e}"))?;
    answer(&mut stream, deadline).map_err(|e| format!("answering the warm-up probe: {e}"))
}

fn answer(stream: &mut TcpStream, deadline: Instant) -> io::Result<()> {
    let left = deadline.saturating_duration_since(Instant::now());
    stream.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 512];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf)?;
        if n == 0 || head.len() + n > MAX_HEAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "no complete request head",
            ));
        }
        head.extend_from_slice(&buf[..n]);
    }
    stream.write_all(ANSWER)
}

/// The probe's side (`kiln-init --warm-probe PORT`): one GET to 127.0.0.1:`port`; whether
/// it was answered 200.
pub fn probe(port: &str) -> Result<(), String> {
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{PROBE_FLAG} takes a TCP port, not {port:?}"))?;
    let spec = HttpRequestSpec {
        port,
        method: "GET".to_string(),
        path: "/".to_string(),
        timeout_ms: 10_000,
        ..HttpRequestSpec::default()
    };
    match http::request(&spec) {
        Ok(response) if response.status == 200 => Ok(()),
        Ok(response) => Err(format!("answered {}", response.status)),
        Err(http::HttpError::Invalid(m) | http::HttpError::Failed { message: m, .. }) => Err(m),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_when_the_port_is_not_a_number_then_says_what_it_takes() {
        let e = probe("eighty").unwrap_err();
        assert!(e.contains("takes a TCP port"), "{e}");
    }

    #[test]
    fn serve_one_when_nobody_connects_then_gives_up_at_the_deadline() {
        let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).unwrap();
        let e = serve_one(
            &listener,
            Instant::now() + Duration::from_millis(20),
            || false,
        )
        .unwrap_err();
        assert!(e.contains("never connected"), "{e}");
    }

    #[test]
    fn echo_request_when_checksummed_then_sums_to_zero() {
        let packet = echo_request(0xbeef);
        assert_eq!(internet_checksum(&packet), 0);
        assert_eq!(packet[0], 8);
    }

    #[test]
    fn is_echo_reply_when_short_or_foreign_then_no() {
        let mut reply = vec![0x45u8; 20];
        reply.extend_from_slice(&[0, 0, 0, 0, 0xbe, 0xef, 0, 1]);
        assert!(is_echo_reply(&reply, 0xbeef));
        assert!(!is_echo_reply(&reply, 0xbeee));
        assert!(!is_echo_reply(&reply[..24], 0xbeef));
        assert!(!is_echo_reply(&[], 0xbeef));
        assert!(!is_echo_reply(&[0x4f], 0xbeef));
    }

    #[test]
    fn warm_when_the_probe_cannot_start_properly_then_fails_at_once() {
        let start = Instant::now();
        let e = warm("/bin/false", Duration::from_secs(30), false).unwrap_err();
        assert!(e.contains("probe failed"), "{e}");
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "waited out the timeout"
        );
    }

    #[test]
    fn serve_one_when_the_head_never_ends_then_refuses_past_the_limit() {
        let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).unwrap();
        let addr = listener.local_addr().unwrap();
        let flood = std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            let _ = s.write_all(&[b'x'; MAX_HEAD * 2]);
        });
        let e =
            serve_one(&listener, Instant::now() + Duration::from_secs(5), || false).unwrap_err();
        assert!(e.contains("no complete request head"), "{e}");
        flood.join().unwrap();
    }
}

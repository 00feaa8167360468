//! A network namespace of one VM: created empty, entered only by short-lived threads and by
//! the VM's own process, so nothing else in kilnd ever runs inside it.

use std::ffi::OsStr;
use std::io::Write;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::process::{Command, Stdio};

use nix::sched::{setns, unshare, CloneFlags};
use socket2::{Domain, Protocol, Socket, Type};

use crate::NetError;

/// Source address of kilnd's own connections inside a VM's namespace (to QEMU's forwards);
/// the namespace's rules let only this address reach its loopback listeners.
pub const KILND_SOURCE: [u8; 4] = [127, 0, 0, 2];
/// Where the egress gateway listens inside a VM's namespace: an address of its own, so its
/// ephemeral ports can never collide with a forward QEMU binds on 127.0.0.1 (forwards' ports
/// are picked on the host's loopback, which knows nothing of the namespace's).
pub const GATEWAY_ADDR: [u8; 4] = [127, 0, 0, 3];

/// One network namespace, kept alive by this descriptor (and by any process inside it).
#[derive(Debug)]
pub struct Netns {
    fd: OwnedFd,
    inode: u64,
}

impl Netns {
    /// A new, empty namespace (only a loopback device, down).
    pub fn create() -> Result<Netns, NetError> {
        in_thread(|| {
            unshare(CloneFlags::CLONE_NEWNET).map_err(|e| NetError::Namespace {
                doing:
                    "creating a network namespace (unshare CLONE_NEWNET; kilnd must run as root)",
                source: e.into(),
            })?;
            Netns::open(Path::new("/proc/thread-self/ns/net"))
        })
    }

    /// The namespace process `pid` runs in (a VM's QEMU, after kilnd restarted).
    pub fn of_pid(pid: u32) -> Result<Netns, NetError> {
        Netns::open(Path::new(&format!("/proc/{pid}/ns/net")))
    }

    /// The namespace bound at `path` (e.g. `/run/netns/NAME`, as `ip netns add` makes).
    pub fn of_path(path: &Path) -> Result<Netns, NetError> {
        Netns::open(path)
    }

    fn open(path: &Path) -> Result<Netns, NetError> {
        let file = std::fs::File::open(path).map_err(|e| NetError::Namespace {
            doing: "opening a network namespace",
            source: e,
        })?;
        let meta = file.metadata().map_err(|e| NetError::Namespace {
            doing: "reading a network namespace's identity",
            source: e,
        })?;
        use std::os::unix::fs::MetadataExt;
        Ok(Netns {
            inode: meta.ino(),
            fd: OwnedFd::from(file),
        })
    }

    /// Another descriptor for the same namespace.
    pub fn try_clone(&self) -> Result<Netns, NetError> {
        let fd = self.fd.try_clone().map_err(|e| NetError::Namespace {
            doing: "duplicating a namespace descriptor",
            source: e,
        })?;
        Ok(Netns {
            fd,
            inode: self.inode,
        })
    }

    /// The namespace's identity (its inode number, as `ip netns identify` and /proc show it).
    pub fn inode(&self) -> u64 {
        self.inode
    }

    /// Whether this is the namespace kilnd itself runs in (a VM must never share it).
    pub fn is_host(&self) -> bool {
        std::fs::metadata("/proc/self/ns/net")
            .map(|m| {
                use std::os::unix::fs::MetadataExt;
                m.ino() == self.inode
            })
            .unwrap_or(false)
    }

    /// The raw descriptor, for a child's `pre_exec` (see [`Netns::enter_in_child`]).
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Moves the calling process into namespace `fd`. For `pre_exec` only: it performs one
    /// system call and allocates nothing.
    ///
    /// # Safety
    /// `fd` must be a network-namespace descriptor that stays open until the call returns.
    pub unsafe fn enter_in_child(fd: RawFd) -> std::io::Result<()> {
        // SAFETY: setns is async-signal-safe; the caller guarantees fd is valid.
        if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Runs `program args…` inside the namespace, feeding it `stdin`; fails with its output.
    pub fn run(&self, program: &str, args: &[&str], stdin: &str) -> Result<(), NetError> {
        let mut cmd = Command::new(program);
        cmd.args(args.iter().map(OsStr::new))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let fd = self.raw_fd();
        // SAFETY: enter_in_child performs one async-signal-safe system call; the descriptor
        // is owned by `self`, which outlives the spawn.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(move || Netns::enter_in_child(fd));
        }
        let mut child = cmd.spawn().map_err(|e| NetError::Tool {
            program: program.to_string(),
            message: format!(
                "could not start it: {e} (apt-get install nftables iproute2, or make deps)"
            ),
        })?;
        if let Some(mut input) = child.stdin.take() {
            input
                .write_all(stdin.as_bytes())
                .map_err(|e| NetError::Tool {
                    program: program.to_string(),
                    message: format!("writing its input: {e}"),
                })?;
        }
        let out = child.wait_with_output().map_err(|e| NetError::Tool {
            program: program.to_string(),
            message: format!("waiting for it: {e}"),
        })?;
        if !out.status.success() {
            return Err(NetError::Tool {
                program: program.to_string(),
                message: format!(
                    "{} {}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim(),
                    String::from_utf8_lossy(&out.stdout).trim()
                ),
            });
        }
        Ok(())
    }

    /// A socket made inside the namespace (it stays there whichever thread uses it).
    pub fn socket(&self, domain: Domain, ty: Type) -> Result<Socket, NetError> {
        let fd = self
            .fd
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| NetError::Namespace {
                doing: "duplicating a namespace descriptor",
                source: e,
            })?;
        in_thread(move || {
            setns(&fd, CloneFlags::CLONE_NEWNET).map_err(|e| NetError::Namespace {
                doing: "entering a VM's network namespace",
                source: e.into(),
            })?;
            let protocol = if ty == Type::DGRAM {
                Protocol::UDP
            } else {
                Protocol::TCP
            };
            Socket::new(domain, ty.cloexec(), Some(protocol)).map_err(|e| NetError::Namespace {
                doing: "creating a socket in a VM's network namespace",
                source: e,
            })
        })
    }

    /// A TCP listener on `addr` inside the namespace.
    pub fn listen_tcp(&self, addr: SocketAddr) -> Result<tokio::net::TcpListener, NetError> {
        let socket = self.socket(Domain::for_address(addr), Type::STREAM)?;
        let io = |e| NetError::Namespace {
            doing: "listening in a VM's network namespace",
            source: e,
        };
        socket.set_reuse_address(true).map_err(io)?;
        socket.bind(&addr.into()).map_err(io)?;
        socket.listen(1024).map_err(io)?;
        socket.set_nonblocking(true).map_err(io)?;
        tokio::net::TcpListener::from_std(socket.into()).map_err(io)
    }

    /// A UDP socket bound to `addr` inside the namespace.
    pub fn bind_udp(&self, addr: SocketAddr) -> Result<tokio::net::UdpSocket, NetError> {
        let socket = self.socket(Domain::for_address(addr), Type::DGRAM)?;
        let io = |e| NetError::Namespace {
            doing: "binding a UDP socket in a VM's network namespace",
            source: e,
        };
        socket.bind(&addr.into()).map_err(io)?;
        socket.set_nonblocking(true).map_err(io)?;
        tokio::net::UdpSocket::from_std(socket.into()).map_err(io)
    }

    /// Connects to `addr` (a forward QEMU listens on, inside the namespace) from
    /// [`KILND_SOURCE`], the one source the namespace's rules admit to its listeners.
    pub async fn connect(&self, addr: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
        let socket = self
            .socket(Domain::IPV4, Type::STREAM)
            .map_err(std::io::Error::other)?;
        socket.set_nonblocking(true)?;
        socket.bind(&SocketAddr::from((KILND_SOURCE, 0)).into())?;
        let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
        socket.connect(addr).await
    }
}

/// Runs `f` on a thread of its own, which ends afterwards: a thread that entered another
/// namespace never runs anything else.
fn in_thread<T: Send>(f: impl FnOnce() -> Result<T, NetError> + Send) -> Result<T, NetError> {
    std::thread::scope(|s| {
        s.spawn(f).join().unwrap_or_else(|_| {
            Err(NetError::Namespace {
                doing: "running in a namespace thread",
                source: std::io::Error::other("the thread panicked"),
            })
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_when_called_then_namespace_differs_from_the_hosts() {
        let ns = Netns::create().expect("create (needs root)");
        assert!(!ns.is_host());
        assert!(Netns::of_pid(std::process::id()).expect("own").is_host());
    }

    #[test]
    fn socket_when_made_in_a_namespace_then_host_listener_is_unreachable() {
        let host = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = host.local_addr().expect("addr").port();
        let ns = Netns::create().expect("create");
        ns.run("ip", &["link", "set", "lo", "up"], "")
            .expect("lo up");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt");
        let result = rt.block_on(ns.connect(SocketAddr::from(([127, 0, 0, 1], port))));
        assert!(
            result.is_err(),
            "a namespace socket reached the host's loopback"
        );
    }
}

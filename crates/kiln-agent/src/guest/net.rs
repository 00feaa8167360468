//! Static network configuration for QEMU user networking (slirp), through ioctls.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// The guest's address on the slirp network.
pub const GUEST_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// The slirp network's mask.
pub const NETMASK: Ipv4Addr = Ipv4Addr::new(255, 255, 255, 0);
/// The slirp gateway.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// The slirp DNS server.
pub const DNS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);

/// `struct rtentry` from linux/route.h (x86_64 layout); the libc crate lacks it for glibc.
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

/// Brings up `lo`, and `eth0` as 10.0.2.15/24 with a default route via 10.0.2.2.
pub fn configure_slirp() -> Result<(), String> {
    let socket = inet_socket()?;
    set_up(&socket, "lo")?;
    set_addr(&socket, "eth0", libc::SIOCSIFADDR, GUEST_ADDR)?;
    set_addr(&socket, "eth0", libc::SIOCSIFNETMASK, NETMASK)?;
    set_up(&socket, "eth0")?;
    add_default_route(&socket, GATEWAY)
}

fn inet_socket() -> Result<OwnedFd, String> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(format!(
            "socket(AF_INET): {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn sockaddr(addr: Ipv4Addr) -> libc::sockaddr {
    let inet = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16-byte plain-data C structs; the kernel
    // reads a sockaddr whose family says it is a sockaddr_in.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(inet) }
}

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain data for which all-zero bytes are valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req
        .ifr_name
        .iter_mut()
        .zip(name.bytes().take(libc::IFNAMSIZ - 1))
    {
        *dst = src as libc::c_char;
    }
    req
}

fn ioctl<T>(
    socket: &OwnedFd,
    request: libc::c_ulong,
    arg: &mut T,
    what: &str,
) -> Result<(), String> {
    // SAFETY: `arg` is the structure `request` expects, valid for the whole call.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), request, arg as *mut T) };
    if rc < 0 {
        return Err(format!("{what}: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

fn set_addr(
    socket: &OwnedFd,
    name: &str,
    request: libc::c_ulong,
    addr: Ipv4Addr,
) -> Result<(), String> {
    let mut req = ifreq(name);
    req.ifr_ifru.ifru_addr = sockaddr(addr);
    ioctl(socket, request, &mut req, &format!("set {addr} on {name}"))
}

fn set_up(socket: &OwnedFd, name: &str) -> Result<(), String> {
    let mut req = ifreq(name);
    ioctl(
        socket,
        libc::SIOCGIFFLAGS,
        &mut req,
        &format!("read flags of {name}"),
    )?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = flags | (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    ioctl(
        socket,
        libc::SIOCSIFFLAGS,
        &mut req,
        &format!("bring {name} up"),
    )
}

fn add_default_route(socket: &OwnedFd, gateway: Ipv4Addr) -> Result<(), String> {
    let mut route = RtEntry {
        rt_pad1: 0,
        rt_dst: sockaddr(Ipv4Addr::UNSPECIFIED),
        rt_gateway: sockaddr(gateway),
        rt_genmask: sockaddr(Ipv4Addr::UNSPECIFIED),
        rt_flags: libc::RTF_UP | libc::RTF_GATEWAY,
        rt_pad2: 0,
        rt_pad3: 0,
        rt_pad4: std::ptr::null_mut(),
        rt_metric: 0,
        rt_dev: std::ptr::null_mut(),
        rt_mtu: 0,
        rt_window: 0,
        rt_irtt: 0,
    };
    ioctl(
        socket,
        libc::SIOCADDRT,
        &mut route,
        &format!("add default route via {gateway}"),
    )
}

//! The guest side: the agent server and the pieces of kiln-init, the guest's PID 1.

pub mod agent;
pub mod app;
pub mod archive;
pub mod boot;
pub mod children;
pub mod copy;
pub mod cpus;
pub mod envd;
pub mod exec;
pub mod fetch;
pub mod files;
pub mod http;
pub mod meminfo;
pub mod meta;
pub mod mounts;
pub mod net;
pub mod ops;
pub mod port;
pub mod users;
pub mod warm;

/// kiln's own runtime files in the guest (the app log, the build context mount, the build's
/// CA bundle): a tmpfs kiln-init mounts under `/dev`, which the guest's devtmpfs already
/// covers, so it hides nothing the image holds (`/run` and `/tmp` stay the image's own, as in
/// Docker) and writes nothing into the image's filesystem.
pub const RUNTIME_DIR: &str = "/dev/kiln";

/// Writes one `kiln-init:`-prefixed line to the console (stderr is the console in the guest).
#[macro_export]
macro_rules! console {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let line = format!("kiln-init: {}\n", format_args!($($arg)*));
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }};
}

/// Milliseconds since the kernel booted (CLOCK_BOOTTIME), 0 if unreadable.
pub fn uptime_ms() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|ts| ts.tv_sec() as u64 * 1000 + ts.tv_nsec() as u64 / 1_000_000)
        .unwrap_or(0)
}

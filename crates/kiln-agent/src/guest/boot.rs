//! The boot sequence of kiln-init as PID 1: initramfs → root switch → runtime mounts →
//! network → agent on the virtio-serial port.
//!
//! The initramfs contract: `/init` is kiln-init, `/kiln/modules/NN-name.ko` are loaded
//! in lexical order. The kernel command line may carry `kiln.root=` (default
//! `/dev/vda`), `kiln.rootfstype=` (`ext4`), `kiln.net=0` (no network) and
//! `kiln.port=` (`agent`).

use std::ffi::CString;
use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::signal::Signal;

use super::agent::{Agent, AgentConfig, EofPolicy};
use super::{net, port, uptime_ms};
use crate::console;

const MODULES_DIR: &str = "/kiln/modules";
const NEW_ROOT: &str = "/newroot";
const ROOT_WAIT: Duration = Duration::from_secs(5);
const PORT_RETRY: Duration = Duration::from_millis(20);
/// Signals PID 1 forwards to the process groups of running execs.
const FORWARDED: [i32; 5] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

/// Settings read from the kernel command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootConfig {
    /// Root block device.
    pub root: String,
    /// Root file system type.
    pub rootfstype: String,
    /// Whether to configure the network.
    pub net: bool,
    /// Name of the virtio-serial port to serve on.
    pub port: String,
}

impl Default for BootConfig {
    fn default() -> Self {
        BootConfig {
            root: "/dev/vda".into(),
            rootfstype: "ext4".into(),
            net: true,
            port: "agent".into(),
        }
    }
}

impl BootConfig {
    /// Reads the `kiln.*` parameters of a kernel command line; the rest is ignored.
    pub fn from_cmdline(cmdline: &str) -> BootConfig {
        let mut config = BootConfig::default();
        for word in cmdline.split_whitespace() {
            let Some((key, value)) = word.split_once('=') else {
                continue;
            };
            match key {
                "kiln.root" if !value.is_empty() => config.root = value.into(),
                "kiln.rootfstype" if !value.is_empty() => config.rootfstype = value.into(),
                "kiln.net" => config.net = value != "0",
                "kiln.port" if !value.is_empty() => config.port = value.into(),
                _ => {}
            }
        }
        config
    }
}

/// A boot step that leaves the guest unusable.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// A mount failed.
    #[error("cannot mount {fstype} {source_name} on {target}: {errno}")]
    Mount {
        /// What was mounted.
        source_name: String,
        /// Where.
        target: String,
        /// File system type.
        fstype: String,
        /// Why it failed.
        errno: nix::errno::Errno,
    },
    /// The root block device did not show up.
    #[error("root device {device} did not appear within {waited:?} (is the disk attached? kiln.root= on the command line?)")]
    NoRootDevice {
        /// The expected device.
        device: String,
        /// How long it was awaited.
        waited: Duration,
    },
    /// Moving into the new root failed.
    #[error("switch_root to {NEW_ROOT} failed at {step}: {cause}")]
    SwitchRoot {
        /// The step that failed.
        step: &'static str,
        /// Why.
        cause: String,
    },
}

/// Boots the guest and serves the agent forever. On a fatal error it logs a
/// `kiln-init: FATAL:` line and powers the VM off, so QEMU exits instead of hanging.
pub fn run_as_pid1() -> ! {
    std::panic::set_hook(Box::new(|info| console!("panic: {info}")));
    let outcome = std::panic::catch_unwind(boot_and_serve);
    let message = match outcome {
        Ok(Err(e)) => e.to_string(),
        Ok(Ok(never)) => match never {},
        Err(_) => "kiln-init panicked (see the line above)".to_string(),
    };
    console!("FATAL: {message}");
    console!("powering off");
    nix::unistd::sync();
    let failure = super::ops::power_off();
    console!("{failure}");
    // PID 1 must never exit: that would panic the kernel.
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn boot_and_serve() -> Result<std::convert::Infallible, BootError> {
    mount_fs("proc", "/proc", "proc", MsFlags::empty(), None)?;
    mount_fs("sysfs", "/sys", "sysfs", MsFlags::empty(), None)?;
    mount_fs("devtmpfs", "/dev", "devtmpfs", MsFlags::empty(), None)?;
    ensure_console();
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let config = BootConfig::from_cmdline(&cmdline);
    console!(
        "starting (root={} type={} net={} port={})",
        config.root,
        config.rootfstype,
        config.net,
        config.port
    );
    load_modules(Path::new(MODULES_DIR));
    wait_for_block_device(&config.root)?;
    mkdir(NEW_ROOT);
    mount_fs(
        &config.root,
        NEW_ROOT,
        &config.rootfstype,
        MsFlags::MS_NOATIME,
        None,
    )?;
    switch_root()?;
    mount_runtime();
    configure_system(&config);

    let agent = Agent::new(AgentConfig { guest_ops: true });
    forward_signals(&agent);
    let (device, file) = port::open_port(&config.port);
    let writer = match file.try_clone() {
        Ok(writer) => writer,
        Err(e) => {
            return Err(BootError::SwitchRoot {
                step: "duplicating the port descriptor",
                cause: e.to_string(),
            })
        }
    };
    console!(
        "agent ready on {} (boot {} ms)",
        device.display(),
        uptime_ms()
    );
    loop {
        let reader = &file;
        let writer = match writer.try_clone() {
            Ok(w) => w,
            Err(_) => {
                std::thread::sleep(PORT_RETRY);
                continue;
            }
        };
        // With Retry the server only returns on errors it cannot ride out; start over.
        if let Err(e) = agent.serve(reader, writer, EofPolicy::Retry(PORT_RETRY)) {
            console!("agent on {} stopped ({e}); restarting", device.display());
            std::thread::sleep(PORT_RETRY);
        }
    }
}

fn mount_fs(
    source: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), BootError> {
    mkdir(target);
    match mount(Some(source), target, Some(fstype), flags, data) {
        Ok(()) => Ok(()),
        // Already mounted (the kernel may automount devtmpfs).
        Err(nix::errno::Errno::EBUSY) => Ok(()),
        Err(errno) => Err(BootError::Mount {
            source_name: source.into(),
            target: target.into(),
            fstype: fstype.into(),
            errno,
        }),
    }
}

fn mkdir(path: &str) {
    if let Err(e) = fs::create_dir_all(path) {
        console!("cannot create {path}: {e}");
    }
}

/// Makes sure fds 0-2 are the console, in case the initramfs had no /dev/console.
fn ensure_console() {
    // SAFETY: F_GETFD only queries the descriptor.
    let open = unsafe { libc::fcntl(1, libc::F_GETFD) } >= 0;
    if open {
        return;
    }
    if let Ok(console) = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    {
        for fd in 0..3 {
            // SAFETY: dup2 onto the standard descriptors, which are closed.
            unsafe { libc::dup2(console.as_raw_fd(), fd) };
        }
    }
}

/// Loads every module in `dir` in lexical order of file name; failures are logged.
fn load_modules(dir: &Path) {
    let mut paths: Vec<PathBuf> = match fs::read_dir(dir) {
        Ok(entries) => entries.flatten().map(|e| e.path()).collect(),
        Err(e) => return console!("no modules loaded: cannot read {}: {e}", dir.display()),
    };
    paths.sort();
    let mut loaded = 0;
    for path in &paths {
        match load_module(path) {
            Ok(()) => loaded += 1,
            Err(e) => console!("module {}: {e}", path.display()),
        }
    }
    console!("loaded {loaded} of {} modules", paths.len());
}

fn load_module(path: &Path) -> Result<(), String> {
    let name = path.to_string_lossy();
    let compressed = name.ends_with(".xz") || name.ends_with(".zst") || name.ends_with(".gz");
    // MODULE_INIT_COMPRESSED_FILE: the kernel decompresses it.
    let flags: libc::c_int = if compressed { 4 } else { 0 };
    let file = File::open(path).map_err(|e| e.to_string())?;
    let params = CString::default();
    // SAFETY: finit_module reads the open module file and a NUL-terminated (empty)
    // parameter string, both valid for the duration of the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            file.as_raw_fd(),
            params.as_ptr(),
            flags,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EEXIST) => Ok(()),
        _ => Err(format!("finit_module: {err}")),
    }
}

fn wait_for_block_device(device: &str) -> Result<(), BootError> {
    let start = Instant::now();
    loop {
        let ready = fs::metadata(device)
            .map(|m| m.file_type().is_block_device())
            .unwrap_or(false);
        if ready {
            return Ok(());
        }
        if start.elapsed() >= ROOT_WAIT {
            return Err(BootError::NoRootDevice {
                device: device.into(),
                waited: ROOT_WAIT,
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Switches to the root mounted on /newroot in-process (PID 1 stays this process):
/// move /dev over, empty the initramfs, make /newroot the root.
fn switch_root() -> Result<(), BootError> {
    let step = |step: &'static str| {
        move |e: nix::errno::Errno| BootError::SwitchRoot {
            step,
            cause: e.to_string(),
        }
    };
    let new_dev = format!("{NEW_ROOT}/dev");
    mkdir(&new_dev);
    mount(
        Some("/dev"),
        new_dev.as_str(),
        None::<&str>,
        MsFlags::MS_MOVE,
        None::<&str>,
    )
    .map_err(step("moving /dev"))?;
    let _ = umount2("/proc", MntFlags::MNT_DETACH);
    let _ = umount2("/sys", MntFlags::MNT_DETACH);
    delete_initramfs();
    nix::unistd::chdir(NEW_ROOT).map_err(step("chdir /newroot"))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(step("mount --move . /"))?;
    nix::unistd::chroot(".").map_err(step("chroot ."))?;
    nix::unistd::chdir("/").map_err(step("chdir /"))?;
    Ok(())
}

/// Frees the initramfs's memory by deleting its files, staying on its device (like
/// busybox switch_root); refuses unless / is a ramfs or tmpfs.
fn delete_initramfs() {
    use nix::sys::statfs::{statfs, FsType, TMPFS_MAGIC};
    // linux/magic.h; nix names no constant for it.
    const RAMFS_MAGIC: FsType = FsType(0x8584_58f6);
    let is_ram = statfs("/")
        .map(|s| s.filesystem_type() == RAMFS_MAGIC || s.filesystem_type() == TMPFS_MAGIC)
        .unwrap_or(false);
    let root_dev = fs::symlink_metadata("/").map(|m| m.dev());
    match (is_ram, root_dev) {
        (true, Ok(dev)) => remove_tree(Path::new("/"), dev),
        _ => console!("/ is not an initramfs; not deleting its files"),
    }
}

fn remove_tree(dir: &Path, dev: u64) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.dev() != dev {
            continue;
        }
        if meta.is_dir() {
            remove_tree(&path, dev);
            if path != Path::new(NEW_ROOT) {
                let _ = fs::remove_dir(&path);
            }
        } else {
            let _ = fs::remove_file(&path);
        }
    }
}

/// The mounts a userland expects; failures are logged, not fatal.
fn mount_runtime() {
    let nosuid_nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    let mounts: [(&str, &str, &str, MsFlags, Option<&str>); 5] = [
        (
            "proc",
            "/proc",
            "proc",
            nosuid_nodev | MsFlags::MS_NOEXEC,
            None,
        ),
        (
            "sysfs",
            "/sys",
            "sysfs",
            nosuid_nodev | MsFlags::MS_NOEXEC,
            None,
        ),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("gid=5,mode=620,ptmxmode=666"),
        ),
        (
            "tmpfs",
            "/dev/shm",
            "tmpfs",
            nosuid_nodev,
            Some("mode=1777"),
        ),
        // kiln's own files, beside the image's tree rather than over any of it: the
        // image's /run and /tmp are what the app finds, as under Docker.
        (
            "tmpfs",
            super::RUNTIME_DIR,
            "tmpfs",
            nosuid_nodev | MsFlags::MS_NOEXEC,
            Some("mode=755"),
        ),
    ];
    for (source, target, fstype, flags, data) in mounts {
        if let Err(e) = mount_fs(source, target, fstype, flags, data) {
            console!("{e}");
        }
    }
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        let _ = std::os::unix::fs::symlink(target, link);
    }
}

/// Hostname, resolv.conf and network; failures are logged, not fatal.
fn configure_system(config: &BootConfig) {
    if let Err(e) = nix::unistd::sethostname("kiln") {
        console!("cannot set the hostname: {e}");
    }
    let resolv = Path::new("/etc/resolv.conf");
    if fs::symlink_metadata(resolv).is_err() {
        let content = format!("nameserver {}\n", net::DNS);
        if let Err(e) = fs::write(resolv, content) {
            console!("cannot write {}: {e}", resolv.display());
        }
    }
    if config.net {
        match net::configure_slirp() {
            Ok(()) => console!("network: eth0 {}/24 via {}", net::GUEST_ADDR, net::GATEWAY),
            Err(e) => console!("network setup failed: {e}"),
        }
    }
}

/// Forwards the signals PID 1 receives to the process groups of running execs.
fn forward_signals(agent: &Agent) {
    let mut signals = match signal_hook::iterator::Signals::new(FORWARDED) {
        Ok(signals) => signals,
        Err(e) => return console!("cannot install signal handlers: {e}"),
    };
    let agent = agent.clone();
    let spawned = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for raw in signals.forever() {
                if let Ok(signal) = Signal::try_from(raw) {
                    agent.signal_all(signal);
                }
            }
        });
    if let Err(e) = spawned {
        console!("cannot start the signal thread: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_without_kiln_keys_when_parsed_then_defaults() {
        let cmdline = "console=ttyS0 reboot=t panic=-1 quiet";

        let config = BootConfig::from_cmdline(cmdline);

        assert_eq!(config, BootConfig::default());
    }

    #[test]
    fn cmdline_with_kiln_keys_when_parsed_then_overrides() {
        let cmdline =
            "console=ttyS0 kiln.root=/dev/vdb kiln.rootfstype=xfs kiln.net=0 kiln.port=ctl\n";

        let config = BootConfig::from_cmdline(cmdline);

        assert_eq!(
            config,
            BootConfig {
                root: "/dev/vdb".into(),
                rootfstype: "xfs".into(),
                net: false,
                port: "ctl".into(),
            }
        );
    }
}

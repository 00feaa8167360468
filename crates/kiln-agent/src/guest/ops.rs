//! One-shot guest operations behind the simple requests: files, clock, entropy, sync, power.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::proto::MAX_FILE_BYTES;

/// `_IOW('R', 0x03, int[2])` from linux/random.h.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `_IO('R', 0x07)` from linux/random.h.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Writes `data` to `path` atomically: a temp file beside it, then a rename.
pub fn write_file(
    path: &str,
    data: &[u8],
    mode: u32,
    uid: Option<u32>,
    gid: Option<u32>,
) -> Result<(), String> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let target = absolute(path)?;
    let parent = target
        .parent()
        .ok_or_else(|| format!("cannot write {path}: it has no parent directory"))?;
    let name = target
        .file_name()
        .ok_or_else(|| format!("cannot write {path}: it names no file"))?;
    fs::create_dir_all(parent)
        .map_err(|e| format!("cannot create directory {}: {e}", parent.display()))?;
    let temp = parent.join(format!(
        ".{}.kiln-{}-{}",
        name.to_string_lossy(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = write_new(&temp, data, mode, uid, gid)
        .and_then(|()| fs::rename(&temp, target))
        .map_err(|e| format!("cannot write {path}: {e}"));
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result
}

fn write_new(
    temp: &Path,
    data: &[u8],
    mode: u32,
    uid: Option<u32>,
    gid: Option<u32>,
) -> std::io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode & 0o7777)
        .open(temp)?;
    file.write_all(data)?;
    // The umask narrowed the mode given to open; set it exactly.
    file.set_permissions(fs::Permissions::from_mode(mode & 0o7777))?;
    if uid.is_some() || gid.is_some() {
        std::os::unix::fs::fchown(&file, uid, gid)?;
        // chown clears set-id bits; restore the requested mode.
        file.set_permissions(fs::Permissions::from_mode(mode & 0o7777))?;
    }
    Ok(())
}

/// Reads `path` whole, failing when it holds more than `max_bytes`.
pub fn read_file(path: &str, max_bytes: u64) -> Result<Vec<u8>, String> {
    let target = absolute(path)?;
    let limit = max_bytes.min(MAX_FILE_BYTES as u64);
    let file = File::open(target).map_err(|e| format!("cannot read {path}: {e}"))?;
    let mut data = Vec::new();
    // Read one byte past the limit: /proc files report size 0, so stat cannot tell.
    file.take(limit + 1)
        .read_to_end(&mut data)
        .map_err(|e| format!("cannot read {path}: {e}"))?;
    if data.len() as u64 > limit {
        return Err(format!(
            "cannot read {path}: it is larger than the {limit} bytes allowed"
        ));
    }
    Ok(data)
}

fn absolute(path: &str) -> Result<&Path, String> {
    let p = Path::new(path);
    if p.is_absolute() {
        Ok(p)
    } else {
        Err(format!("path {path:?} is not absolute"))
    }
}

/// Sets CLOCK_REALTIME to `unix_nanos` since the epoch.
pub fn set_clock(unix_nanos: u64) -> Result<(), String> {
    let ts = nix::sys::time::TimeSpec::new(
        (unix_nanos / 1_000_000_000) as libc::time_t,
        (unix_nanos % 1_000_000_000) as libc::c_long,
    );
    nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts)
        .map_err(|e| format!("cannot set CLOCK_REALTIME: {e}"))
}

/// Credits `bytes` to the kernel's entropy pool, then makes the CRNG reseed from it.
pub fn add_entropy(bytes: &[u8]) -> Result<(), String> {
    let len = i32::try_from(bytes.len()).map_err(|_| "too many entropy bytes".to_string())?;
    let bits = len
        .checked_mul(8)
        .ok_or_else(|| "too many entropy bytes".to_string())?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + bytes.len());
    info.extend_from_slice(&bits.to_ne_bytes());
    info.extend_from_slice(&len.to_ne_bytes());
    info.extend_from_slice(bytes);
    let urandom = OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(|e| format!("cannot open /dev/urandom: {e}"))?;
    // SAFETY: `info` is a valid rand_pool_info of `8 + len` bytes that outlives the call;
    // the kernel only reads from it.
    let rc = unsafe { libc::ioctl(urandom.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) };
    if rc < 0 {
        return Err(format!(
            "ioctl RNDADDENTROPY on /dev/urandom: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    let rc = unsafe { libc::ioctl(urandom.as_raw_fd(), RNDRESEEDCRNG) };
    if rc < 0 {
        return Err(format!(
            "ioctl RNDRESEEDCRNG on /dev/urandom: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Flushes all file systems, then drops the page cache when asked.
pub fn sync(drop_caches: bool) -> Result<(), String> {
    nix::unistd::sync();
    if drop_caches {
        fs::write("/proc/sys/vm/drop_caches", b"3")
            .map_err(|e| format!("cannot write /proc/sys/vm/drop_caches: {e}"))?;
    }
    Ok(())
}

/// Syncs and powers the machine off; returns only on failure.
pub fn power_off() -> String {
    nix::unistd::sync();
    match nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF) {
        Err(e) => format!("reboot(RB_POWER_OFF) failed: {e}"),
        Ok(never) => match never {},
    }
}

/// The running kernel's release, or "unknown".
pub fn kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".to_string())
}

/// Removes a file, a symbolic link or an empty directory; nothing there is success.
pub fn remove_path(path: &str) -> Result<(), String> {
    let target = absolute(path)?;
    let result = match fs::symlink_metadata(target) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => Err(e),
        Ok(meta) if meta.is_dir() => fs::remove_dir(target),
        Ok(_) => fs::remove_file(target),
    };
    result.map_err(|e| format!("cannot remove {path}: {e}"))
}

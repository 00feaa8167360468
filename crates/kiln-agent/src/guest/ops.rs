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

/// Where the OS keeps the machine's identity (systemd, D-Bus and journald read it).
pub const MACHINE_ID: &str = "/etc/machine-id";

/// Sets the hostname and, when `machine_id_file` exists, writes `machine_id` to it: every
/// MicroVM restored from one snapshot would otherwise share the build VM's.
pub fn set_identity(
    hostname: &str,
    machine_id: &str,
    machine_id_file: &Path,
) -> Result<(), String> {
    check_identity(hostname, machine_id)?;
    nix::unistd::sethostname(hostname).map_err(|e| format!("cannot set the hostname: {e}"))?;
    rewrite_machine_id(machine_id, machine_id_file)
}

fn check_identity(hostname: &str, machine_id: &str) -> Result<(), String> {
    let name_ok = (1..=64).contains(&hostname.len())
        && hostname
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    if !name_ok {
        return Err(format!(
            "hostname {hostname:?} is not 1 to 64 of a-z, 0-9, '-' and '.'"
        ));
    }
    let id_ok = machine_id.len() == 32
        && machine_id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !id_ok {
        return Err(format!(
            "machine id {machine_id:?} is not 32 lowercase hex digits"
        ));
    }
    Ok(())
}

/// Writes `machine_id` to `file` when it is a plain file; a file the image lacks stays
/// absent, a link the image chose stays as it is.
fn rewrite_machine_id(machine_id: &str, file: &Path) -> Result<(), String> {
    match fs::symlink_metadata(file) {
        Ok(meta) if meta.is_file() => fs::write(file, format!("{machine_id}\n"))
            .map_err(|e| format!("cannot write {}: {e}", file.display())),
        _ => Ok(()),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn check_identity_when_name_or_id_is_malformed_then_says_what_it_takes() {
        assert!(check_identity("mvm-0abc", ID).is_ok());
        for name in ["", "Mvm", "a b", "x;reboot", &"a".repeat(65)] {
            let e = check_identity(name, ID).unwrap_err();
            assert!(e.contains("1 to 64 of a-z"), "{name:?}: {e}");
        }
        for id in ["", "0123", &ID.to_uppercase(), &format!("{}g", &ID[..31])] {
            let e = check_identity("mvm-0abc", id).unwrap_err();
            assert!(e.contains("32 lowercase hex"), "{id:?}: {e}");
        }
    }

    #[test]
    fn rewrite_machine_id_when_the_image_has_the_file_then_replaced_else_left_absent() {
        let dir = tempfile::tempdir().unwrap();
        let present = dir.path().join("machine-id");
        fs::write(&present, "ffffffffffffffffffffffffffffffff\n").unwrap();
        let absent = dir.path().join("none");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&present, &link).unwrap();

        rewrite_machine_id(ID, &present).unwrap();
        rewrite_machine_id(ID, &absent).unwrap();
        rewrite_machine_id("00000000000000000000000000000000", &link).unwrap();

        assert_eq!(fs::read_to_string(&present).unwrap(), format!("{ID}\n"));
        assert!(!absent.exists(), "a file the image lacks is not created");
        assert_eq!(
            fs::read_to_string(&present).unwrap(),
            format!("{ID}\n"),
            "a link is not followed"
        );
    }
}

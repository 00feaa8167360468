//! The tiny busybox base: Debian's `busybox-static`, a link for every applet, a minimal
//! `/etc`, in a 256 MiB sparse ext4 disk at `<home>/bases/busybox/<version>/disk.ext4`.

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_vmm::assets::deb;
use kiln_vmm::assets::store::io_err;
use kiln_vmm::assets::tool::{stderr_of, ToolError};
use serde::Serialize;

use super::{ensure_base, version_dir_name, BaseBuild, BaseKind};
use super::{BaseError, BaseImage};

/// The base's name.
pub const NAME: &str = "busybox";

/// The Debian package it is built from.
pub const PACKAGE: &str = "busybox-static";

/// Size of the base disk.
pub const DISK_SIZE: u64 = 256 << 20;

const KIND: BaseKind = BaseKind {
    name: NAME,
    disk_size: DISK_SIZE,
    label: "kiln-busybox",
};

/// Directories every rootfs gets, with their modes.
const DIRS: [(&str, u32); 12] = [
    ("bin", 0o755),
    ("sbin", 0o755),
    ("usr/bin", 0o755),
    ("usr/sbin", 0o755),
    ("dev", 0o755),
    ("proc", 0o555),
    ("sys", 0o555),
    ("run", 0o755),
    ("tmp", 0o1777),
    ("root", 0o700),
    ("var/log", 0o755),
    ("home", 0o755),
];

/// What `manifest.json` records besides what every base's does.
#[derive(Debug, Serialize)]
struct Details {
    package: &'static str,
    applets: usize,
}

/// Ensures the busybox base exists under `home`; offline once built.
pub fn ensure(home: &Path) -> Result<BaseImage, BaseError> {
    ensure_base(home, &KIND, false, build)
}

/// Asks apt for the current `busybox-static` and builds a base from it if it is new.
pub fn refresh(home: &Path) -> Result<BaseImage, BaseError> {
    ensure_base(home, &KIND, true, build)
}

/// Downloads busybox-static, stages the rootfs and publishes the base.
fn build(base: BaseBuild) -> Result<BaseImage, BaseError> {
    let work = base.work();
    let package = deb::download(PACKAGE, work)?;
    let version = package.version;
    if let Some(existing) = base.existing(&version)? {
        return Ok(existing);
    }
    let unpacked = work.join("pkg");
    deb::extract(&package.path, &unpacked)?;
    let rootfs = work.join("rootfs");
    let applets = stage_rootfs(&unpacked.join("bin/busybox"), &rootfs, &version)?;
    tracing::info!(%version, applets, "busybox rootfs staged");
    let details = Details {
        package: PACKAGE,
        applets,
    };
    base.publish(&version, &rootfs, details)
}

/// Builds the rootfs tree in `rootfs` from a static busybox; returns the applet count.
pub(crate) fn stage_rootfs(
    busybox: &Path,
    rootfs: &Path,
    version: &str,
) -> Result<usize, BaseError> {
    for (dir, mode) in DIRS.iter().copied().chain([("etc", 0o755)]) {
        let path = rootfs.join(dir);
        fs::create_dir_all(&path).map_err(io_err("create directory", &path))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))
            .map_err(io_err("chmod", &path))?;
    }
    let installed = rootfs.join("bin/busybox");
    fs::copy(busybox, &installed).map_err(io_err("copy busybox to", &installed))?;
    fs::set_permissions(&installed, fs::Permissions::from_mode(0o755))
        .map_err(io_err("chmod", &installed))?;
    // The busybox kiln fetched, not a host tool: it runs from the staged tree.
    let list = Command::new(&installed)
        .arg("--list-full")
        .output()
        .map_err(|source| ToolError::Spawn {
            tool: "busybox",
            source,
        })?;
    if !list.status.success() {
        return Err(ToolError::Failed {
            command: format!("{} --list-full", installed.display()),
            detail: stderr_of(&list),
        }
        .into());
    }
    let mut applets = 0;
    for applet in String::from_utf8_lossy(&list.stdout).lines().map(str::trim) {
        if applet.is_empty() || applet == "bin/busybox" || applet.contains("..") {
            continue;
        }
        let link = rootfs.join(applet.trim_start_matches('/'));
        if link.symlink_metadata().is_ok() {
            continue;
        }
        if let Some(parent) = link.parent() {
            fs::create_dir_all(parent).map_err(io_err("create directory", parent))?;
        }
        symlink("/bin/busybox", &link).map_err(io_err("link", &link))?;
        applets += 1;
    }
    for (name, content) in etc_files(version) {
        let path = rootfs.join("etc").join(name);
        fs::write(&path, content).map_err(io_err("write", &path))?;
        // Readable by every user whatever the builder's umask (kilnd's is 077): an app that
        // runs as nobody looks itself up in /etc/passwd.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644))
            .map_err(io_err("chmod", &path))?;
    }
    Ok(applets)
}

/// The files of `/etc`.
fn etc_files(version: &str) -> [(&'static str, String); 6] {
    [
        (
            "passwd",
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
                .into(),
        ),
        ("group", "root:x:0:\nnogroup:x:65534:\n".into()),
        ("hostname", "kiln\n".into()),
        (
            "hosts",
            "127.0.0.1\tlocalhost kiln\n::1\tlocalhost ip6-localhost ip6-loopback\n".into(),
        ),
        // QEMU user networking's DNS.
        ("resolv.conf", "nameserver 10.0.2.3\n".into()),
        (
            "os-release",
            format!(
                "NAME=\"kiln busybox\"\nID=kiln-busybox\nVERSION_ID=\"{version}\"\n\
                 PRETTY_NAME=\"kiln busybox base (busybox {version})\"\n"
            ),
        ),
    ]
}

/// Where this base's files would go for `version` (for callers listing bases).
pub fn dir_for(home: &Path, version: &str) -> PathBuf {
    home.join("bases")
        .join(NAME)
        .join(version_dir_name(version))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;
    use crate::disk::debugfs;

    #[test]
    fn ensure_when_built_then_disk_has_applet_links_and_etc() {
        let home = tempfile::tempdir().expect("home");

        let base = ensure(home.path()).expect("busybox base");

        assert_eq!(base.name, "busybox");
        assert_eq!(
            base.disk,
            dir_for(home.path(), &base.version).join("disk.ext4")
        );
        let bin = debugfs(&base.disk, "ls -l /bin");
        assert!(bin.contains("busybox") && bin.contains(" sh"), "{bin}");
        assert!(debugfs(&base.disk, "stat /sbin/ip").contains("Fast link dest: \"/bin/busybox\""));
        assert!(
            debugfs(&base.disk, "stat /usr/bin/wget").contains("Fast link dest: \"/bin/busybox\"")
        );
        assert!(debugfs(&base.disk, "cat /etc/os-release").contains("ID=kiln-busybox"));
        assert_eq!(
            debugfs(&base.disk, "cat /etc/resolv.conf"),
            "nameserver 10.0.2.3\n"
        );
        assert!(debugfs(&base.disk, "cat /etc/passwd").starts_with("root:x:0:0:"));
        assert!(debugfs(&base.disk, "stat /etc/passwd").contains("Mode:  0644"));
        let meta = fs::metadata(&base.disk).expect("stat disk");
        assert_eq!((meta.len(), meta.mode() & 0o777), (256 << 20, 0o444));
        assert!(meta.blocks() * 512 < 64 << 20, "disk is not sparse");
    }

    #[test]
    fn ensure_when_called_again_then_reuses_the_base() {
        let home = tempfile::tempdir().expect("home");
        let first = ensure(home.path()).expect("first");
        let built = fs::metadata(&first.disk)
            .expect("stat")
            .modified()
            .expect("mtime");

        let second = ensure(home.path()).expect("second");

        assert_eq!(first, second);
        assert_eq!(
            fs::metadata(&second.disk)
                .expect("stat")
                .modified()
                .expect("mtime"),
            built
        );
    }

    #[test]
    fn ensure_when_two_callers_race_then_both_get_one_base() {
        let home = tempfile::tempdir().expect("home");
        let path = home.path().to_path_buf();

        let other = std::thread::spawn(move || ensure(&path).expect("racing caller"));
        let mine = ensure(home.path()).expect("this caller");
        let theirs = other.join().expect("thread");

        assert_eq!(mine, theirs);
        let versions: Vec<_> = fs::read_dir(home.path().join("bases/busybox"))
            .expect("list")
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert_eq!(versions.len(), 1);
    }
}

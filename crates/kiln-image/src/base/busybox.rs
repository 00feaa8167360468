//! The tiny busybox base: Debian's `busybox-static`, a link for every applet, a minimal
//! `/etc`, in a 256 MiB sparse ext4 disk at `<home>/bases/busybox/<version>/disk.ext4`.

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::{apt_download, deb_extract, io_err, lock_dir, run_ok, staging_in, version_dir_name};
use super::{BaseError, BaseImage};
use crate::disk::mkfs_ext4_from_dir;

/// The base's name.
pub const NAME: &str = "busybox";

/// The Debian package it is built from.
pub const PACKAGE: &str = "busybox-static";

/// Size of the base disk.
pub const DISK_SIZE: u64 = 256 << 20;

/// The ext4 label of the base disk.
const LABEL: &str = "kiln-busybox";

const MANIFEST: &str = "manifest.json";
const DISK: &str = "disk.ext4";

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

/// What `manifest.json` records.
#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    name: String,
    version: String,
    package: String,
    disk: String,
    size_bytes: u64,
    applets: usize,
    built_unix: u64,
}

/// Ensures the busybox base exists under `home`; offline once built.
pub fn ensure(home: &Path) -> Result<BaseImage, BaseError> {
    ensure_with(home, false)
}

/// Asks apt for the current `busybox-static` and builds a base from it if it is new.
pub fn refresh(home: &Path) -> Result<BaseImage, BaseError> {
    ensure_with(home, true)
}

fn ensure_with(home: &Path, refresh: bool) -> Result<BaseImage, BaseError> {
    let dir = home.join("bases").join(NAME);
    if !refresh {
        if let Some(found) = newest(&dir)? {
            return Ok(found);
        }
    }
    let _lock = lock_dir(&dir)?;
    if !refresh {
        if let Some(found) = newest(&dir)? {
            return Ok(found);
        }
    }
    build(&dir)
}

/// The most recently built base in `dir`.
fn newest(dir: &Path) -> Result<Option<BaseImage>, BaseError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("list", dir)(e)),
    };
    let mut best: Option<(u64, BaseImage)> = None;
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let Some(manifest) = read_manifest(&entry.path())? else {
            continue;
        };
        if best
            .as_ref()
            .is_none_or(|(when, _)| manifest.built_unix >= *when)
        {
            best = Some((manifest.built_unix, image_of(&entry.path(), manifest)));
        }
    }
    Ok(best.map(|(_, image)| image))
}

fn read_manifest(dir: &Path) -> Result<Option<Manifest>, BaseError> {
    let path = dir.join(MANIFEST);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("read", &path)(e)),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|source| BaseError::Manifest { path, source })
}

fn image_of(dir: &Path, m: Manifest) -> BaseImage {
    BaseImage {
        name: m.name,
        version: m.version,
        disk: dir.join(m.disk),
        size_bytes: m.size_bytes,
    }
}

/// Downloads busybox-static, stages the rootfs, makes the disk and publishes the base.
fn build(dir: &Path) -> Result<BaseImage, BaseError> {
    let staging = staging_in(dir)?;
    let work = staging.path();
    let (deb, version) = apt_download(PACKAGE, work)?;
    let dest = dir.join(version_dir_name(&version));
    if let Some(existing) = read_manifest(&dest)? {
        return Ok(image_of(&dest, existing));
    }
    let unpacked = work.join("pkg");
    deb_extract(&deb, &unpacked)?;
    let rootfs = work.join("rootfs");
    let applets = stage_rootfs(&unpacked.join("bin/busybox"), &rootfs, &version)?;
    let out = work.join("out");
    fs::create_dir(&out).map_err(io_err("create directory", &out))?;
    let disk = out.join(DISK);
    mkfs_ext4_from_dir(&rootfs, &disk, DISK_SIZE, LABEL)?;
    fs::set_permissions(&disk, fs::Permissions::from_mode(0o444))
        .map_err(io_err("chmod", &disk))?;
    let manifest = Manifest {
        name: NAME.into(),
        version: version.clone(),
        package: PACKAGE.into(),
        disk: DISK.into(),
        size_bytes: DISK_SIZE,
        applets,
        built_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    let manifest_path = out.join(MANIFEST);
    let json = serde_json::to_vec_pretty(&manifest).map_err(|source| BaseError::Manifest {
        path: manifest_path.clone(),
        source,
    })?;
    fs::write(&manifest_path, json).map_err(io_err("write", &manifest_path))?;
    sync(&disk)?;
    fs::rename(&out, &dest).map_err(io_err("rename into place", &dest))?;
    sync(dir)?;
    tracing::info!(version = %version, applets, "busybox base built");
    Ok(image_of(&dest, manifest))
}

fn sync(path: &Path) -> Result<(), BaseError> {
    fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io_err("sync", path))
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
    let list = run_ok(
        "busybox",
        "busybox-static",
        Command::new(&installed).arg("--list-full"),
    )?;
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

    fn debugfs(image: &Path, request: &str) -> String {
        let out = Command::new("debugfs")
            .arg("-R")
            .arg(request)
            .arg(image)
            .output()
            .expect("debugfs (e2fsprogs) runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

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

//! Managed base images, built locally from Debian packages under `<home>/bases/<name>/<version>/`.
//!
//! A base is a read-only ext4 disk plus a `manifest.json`. Builders take an exclusive lock
//! in the base's directory, build in a staging directory beside the result and rename it
//! into place, so parallel callers never see half a base and the second one reuses the first's.

pub mod busybox;
pub mod debian;

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use nix::fcntl::{Flock, FlockArg};

use crate::disk::DiskError;

/// Prefix of staging directories; anything carrying it is unfinished work.
const STAGING_PREFIX: &str = ".tmp-";

/// A built base image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseImage {
    /// The base's name, e.g. `busybox`.
    pub name: String,
    /// The version of what it was built from (the Debian package version).
    pub version: String,
    /// The read-only ext4 disk; VMs get their own copies or overlays.
    pub disk: PathBuf,
    /// The disk's size in bytes.
    pub size_bytes: u64,
}

/// Failures while building a base image.
#[derive(Debug, thiserror::Error)]
pub enum BaseError {
    /// A Dockerfile names a base kiln does not have.
    #[error("FROM {0}: kiln has no such base image; use FROM kiln/busybox or FROM kiln/debian:12 (images from registries are not supported yet)")]
    UnknownBase(String),
    /// A required host tool is not installed.
    #[error("`{tool}` is not installed: install {install}")]
    ToolMissing {
        /// The tool.
        tool: &'static str,
        /// What to install.
        install: &'static str,
    },
    /// A host tool could not be started.
    #[error("cannot run `{tool}`")]
    ToolSpawn {
        /// The tool.
        tool: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// apt does not know the package.
    #[error("apt knows no package `{package}`: run `apt-get update` (as root)")]
    PackageUnknown {
        /// The package.
        package: String,
    },
    /// `apt-get download` failed.
    #[error(
        "downloading package `{package}` failed: {detail} (check the network and apt sources)"
    )]
    DownloadFailed {
        /// The package.
        package: String,
        /// What apt-get said.
        detail: String,
    },
    /// The host's apt sources name no mirror for the suite.
    #[error(
        "no apt source for Debian {suite} main in {apt_dir}/sources.list or sources.list.d/: \
         add one (e.g. `deb http://YOUR-MIRROR/debian {suite} main`)"
    )]
    NoMirror {
        /// The suite looked for.
        suite: &'static str,
        /// The apt configuration directory read.
        apt_dir: PathBuf,
    },
    /// A tool ran but failed.
    #[error("`{command}` failed: {detail}")]
    ToolFailed {
        /// The command line, shortened.
        command: String,
        /// What it said.
        detail: String,
    },
    /// Making the disk failed.
    #[error("cannot make the base disk")]
    Disk(#[from] DiskError),
    /// A manifest could not be encoded or parsed.
    #[error("manifest {path} is unreadable (delete its directory to rebuild)")]
    Manifest {
        /// The manifest.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: serde_json::Error,
    },
    /// Locking the base directory failed.
    #[error("cannot lock {path}")]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: nix::Error,
    },
    /// A filesystem operation failed.
    #[error("cannot {action} {path} (check that the kiln data directory is writable)")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

pub(crate) fn io_err(
    action: &'static str,
    path: &Path,
) -> impl FnOnce(std::io::Error) -> BaseError {
    let path = path.to_path_buf();
    move |source| BaseError::Io {
        action,
        path,
        source,
    }
}

/// Blocks until the exclusive lock `<dir>/.lock` is held; clears staging leftovers of
/// crashed builders (every builder holds this lock while staging).
pub(crate) fn lock_dir(dir: &Path) -> Result<Flock<File>, BaseError> {
    fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
    let path = dir.join(".lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err("open lock file", &path))?;
    let lock =
        Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, source)| BaseError::Lock {
            path: path.clone(),
            source,
        })?;
    for entry in fs::read_dir(dir).map_err(io_err("list", dir))?.flatten() {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(STAGING_PREFIX)
        {
            if let Err(e) = fs::remove_dir_all(entry.path()) {
                tracing::warn!(path = %entry.path().display(), error = %e, "cannot remove stale staging");
            }
        }
    }
    Ok(lock)
}

/// A staging directory in `dir`, removed on drop unless renamed away.
pub(crate) fn staging_in(dir: &Path) -> Result<tempfile::TempDir, BaseError> {
    tempfile::Builder::new()
        .prefix(STAGING_PREFIX)
        .tempdir_in(dir)
        .map_err(io_err("create staging directory in", dir))
}

/// Runs a tool; "not installed" becomes [`BaseError::ToolMissing`].
pub(crate) fn run(
    tool: &'static str,
    install: &'static str,
    cmd: &mut Command,
) -> Result<Output, BaseError> {
    cmd.output().map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => BaseError::ToolMissing { tool, install },
        _ => BaseError::ToolSpawn {
            tool: tool.into(),
            source,
        },
    })
}

/// Like [`run`], and a non-zero exit becomes [`BaseError::ToolFailed`].
pub(crate) fn run_ok(
    tool: &'static str,
    install: &'static str,
    cmd: &mut Command,
) -> Result<Output, BaseError> {
    let out = run(tool, install, cmd)?;
    if !out.status.success() {
        return Err(BaseError::ToolFailed {
            command: format!("{cmd:?}"),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out)
}

/// Downloads `package` into `dir` with `apt-get download`; returns the `.deb` and its version.
pub(crate) fn apt_download(package: &str, dir: &Path) -> Result<(PathBuf, String), BaseError> {
    tracing::info!(package, "downloading with apt-get");
    let out = run(
        "apt-get",
        "apt (kiln fetches Debian packages by name)",
        Command::new("apt-get")
            .args(["download", "-q", package])
            .current_dir(dir),
    )?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if stderr.contains("Unable to locate package") || stderr.contains("has no candidate") {
            return Err(BaseError::PackageUnknown {
                package: package.into(),
            });
        }
        return Err(BaseError::DownloadFailed {
            package: package.into(),
            detail: stderr,
        });
    }
    let prefix = format!("{package}_");
    let deb = fs::read_dir(dir)
        .map_err(io_err("list", dir))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
        })
        .ok_or_else(|| BaseError::DownloadFailed {
            package: package.into(),
            detail: format!("apt-get left no {prefix}*.deb in {}", dir.display()),
        })?;
    let version = run_ok(
        "dpkg-deb",
        "dpkg",
        Command::new("dpkg-deb").arg("-f").arg(&deb).arg("Version"),
    )?;
    let version = String::from_utf8_lossy(&version.stdout).trim().to_string();
    Ok((deb, version))
}

/// Unpacks a `.deb`'s files into `dest`.
pub(crate) fn deb_extract(deb: &Path, dest: &Path) -> Result<(), BaseError> {
    run_ok(
        "dpkg-deb",
        "dpkg",
        Command::new("dpkg-deb").arg("-x").arg(deb).arg(dest),
    )?;
    Ok(())
}

/// A Debian version as a directory name: the epoch colon (and anything odd) becomes `_`.
pub(crate) fn version_dir_name(version: &str) -> String {
    version
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || ".+-~".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The managed base a Dockerfile's FROM names, built on first use.
pub fn resolve(
    home: &Path,
    from: &str,
    extra_ca_bundle: Option<&Path>,
) -> Result<BaseImage, BaseError> {
    match from {
        "kiln/busybox" | "kiln/busybox:latest" => busybox::ensure(home),
        "kiln/debian" | "kiln/debian:12" | "kiln/debian:bookworm" => {
            debian::ensure(home, extra_ca_bundle)
        }
        other => Err(BaseError::UnknownBase(other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_dir_name_when_epoch_then_colon_replaced() {
        let name = version_dir_name("1:1.35.0-4+deb12u1+b1");

        assert_eq!(name, "1_1.35.0-4+deb12u1+b1");
    }
}

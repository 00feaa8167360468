//! Debian packages fetched by name with `apt-get download` and unpacked with `dpkg-deb`.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::io::{io_err, IoError};
use super::tool::{run, stderr_of, ToolError};

/// Failures while downloading or reading a Debian package.
#[derive(Debug, thiserror::Error)]
pub enum DebError {
    /// apt does not know the package.
    #[error("apt knows no package `{package}`: run `apt-get update` (as root) and check the name")]
    PackageUnknown {
        /// The package name.
        package: String,
    },
    /// `apt-get download` failed.
    #[error(
        "downloading package `{package}` failed: {detail} (check the network and apt sources)"
    )]
    DownloadFailed {
        /// The package name.
        package: String,
        /// What apt-get said.
        detail: String,
    },
    /// `dpkg-deb` could not read a package.
    #[error("cannot read package {deb}: {detail} (the download may be corrupt; retry)")]
    BadPackage {
        /// The `.deb` file.
        deb: PathBuf,
        /// What dpkg-deb said.
        detail: String,
    },
    /// `apt-get` or `dpkg-deb` is missing or cannot start.
    #[error(transparent)]
    Tool(#[from] ToolError),
    /// The download directory cannot be listed.
    #[error(transparent)]
    Io(#[from] IoError),
}

/// A downloaded `.deb` file.
pub struct DebFile {
    /// Where it lies.
    pub path: PathBuf,
    /// Its `Package` field.
    pub package: String,
    /// Its `Version` field.
    pub version: String,
}

/// Downloads `package` into `dir` with `apt-get download`.
pub fn download(package: &str, dir: &Path) -> Result<DebFile, DebError> {
    tracing::info!(package, "downloading with apt-get");
    let out = run(
        "apt-get",
        Command::new("apt-get")
            .args(["download", "-q", package])
            .current_dir(dir),
    )?;
    if !out.status.success() {
        let stderr = stderr_of(&out);
        if stderr.contains("Unable to locate package") || stderr.contains("has no candidate") {
            return Err(DebError::PackageUnknown {
                package: package.to_string(),
            });
        }
        return Err(DebError::DownloadFailed {
            package: package.to_string(),
            detail: stderr,
        });
    }
    let prefix = format!("{package}_");
    let path = std::fs::read_dir(dir)
        .map_err(io_err("list", dir))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
        })
        .ok_or_else(|| DebError::DownloadFailed {
            package: package.to_string(),
            detail: format!(
                "apt-get reported success but left no {prefix}*.deb in {}",
                dir.display()
            ),
        })?;
    let package = field(&path, "Package")?;
    let version = field(&path, "Version")?;
    Ok(DebFile {
        path,
        package,
        version,
    })
}

/// Reads one control field of a `.deb` (empty when absent).
pub fn field(deb: &Path, name: &str) -> Result<String, DebError> {
    let out = dpkg_deb(deb, Command::new("dpkg-deb").arg("-f").arg(deb).arg(name))?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Unpacks the files of a `.deb` into `dest`.
pub fn extract(deb: &Path, dest: &Path) -> Result<(), DebError> {
    dpkg_deb(deb, Command::new("dpkg-deb").arg("-x").arg(deb).arg(dest))?;
    Ok(())
}

/// Runs `dpkg-deb` on `deb`; a failure means the package is unreadable.
fn dpkg_deb(deb: &Path, cmd: &mut Command) -> Result<std::process::Output, DebError> {
    let out = run("dpkg-deb", cmd)?;
    if !out.status.success() {
        return Err(DebError::BadPackage {
            deb: deb.to_path_buf(),
            detail: stderr_of(&out),
        });
    }
    Ok(out)
}

/// Package names in a `Depends` field: the first alternative of each, without versions.
pub fn depends_names(depends: &str) -> Vec<String> {
    depends
        .split(',')
        .filter_map(|dep| dep.split('|').next())
        .filter_map(|alt| alt.split_whitespace().next())
        .map(|name| name.split(':').next().unwrap_or(name).to_string())
        .filter(|name| !name.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depends_names_when_versioned_alternatives_then_first_names() {
        let depends = "linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2), kmod | busybox, x:amd64";

        let names = depends_names(depends);

        assert_eq!(names, ["linux-image-6.1.0-56-cloud-amd64", "kmod", "x"]);
    }
}

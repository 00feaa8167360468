//! Debian packages fetched by name with `apt-get download` and unpacked with `dpkg-deb`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::AssetError;

/// A downloaded `.deb` file.
pub(crate) struct DebFile {
    /// Where it lies.
    pub path: PathBuf,
    /// Its `Package` field.
    pub package: String,
    /// Its `Version` field.
    pub version: String,
}

/// Runs a tool, mapping "not installed" and non-zero exits to clear errors.
pub(crate) fn run(
    tool: &'static str,
    install: &'static str,
    cmd: &mut Command,
) -> Result<Output, AssetError> {
    let out = cmd.output().map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => AssetError::ToolMissing { tool, install },
        _ => AssetError::ToolSpawn { tool, source },
    })?;
    Ok(out)
}

/// Downloads `package` into `dir` with `apt-get download`.
pub(crate) fn download(package: &str, dir: &Path) -> Result<DebFile, AssetError> {
    tracing::info!(package, "downloading with apt-get");
    let out = run(
        "apt-get",
        "apt (kiln fetches Debian packages by name)",
        Command::new("apt-get")
            .arg("download")
            .arg("-q")
            .arg(package)
            .current_dir(dir),
    )?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        if stderr.contains("Unable to locate package") || stderr.contains("has no candidate") {
            return Err(AssetError::PackageUnknown {
                package: package.to_string(),
            });
        }
        return Err(AssetError::DownloadFailed {
            package: package.to_string(),
            detail: stderr.trim().to_string(),
        });
    }
    let prefix = format!("{package}_");
    let path = std::fs::read_dir(dir)
        .map_err(|source| AssetError::io("list", dir, source))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            name.starts_with(&prefix) && name.ends_with(".deb")
        })
        .ok_or_else(|| AssetError::DownloadFailed {
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
pub(crate) fn field(deb: &Path, name: &str) -> Result<String, AssetError> {
    let out = run(
        "dpkg-deb",
        "dpkg",
        Command::new("dpkg-deb").arg("-f").arg(deb).arg(name),
    )?;
    if !out.status.success() {
        return Err(AssetError::BadPackage {
            deb: deb.to_path_buf(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Unpacks the files of a `.deb` into `dest`.
pub(crate) fn extract(deb: &Path, dest: &Path) -> Result<(), AssetError> {
    let out = run(
        "dpkg-deb",
        "dpkg",
        Command::new("dpkg-deb").arg("-x").arg(deb).arg(dest),
    )?;
    if !out.status.success() {
        return Err(AssetError::BadPackage {
            deb: deb.to_path_buf(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Package names in a `Depends` field: the first alternative of each, without versions.
pub(crate) fn depends_names(depends: &str) -> Vec<String> {
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

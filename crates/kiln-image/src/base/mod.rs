//! Managed base images, built locally from Debian packages under `<home>/bases/<name>/<version>/`.
//!
//! A base is a read-only ext4 disk plus a `manifest.json`. Builders take an exclusive lock
//! in the base's directory, build in a staging directory beside the result and rename it
//! into place, so parallel callers never see half a base and the second one reuses the first's.

pub mod busybox;
pub mod debian;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use kiln_vmm::assets::store::{find_or_build, io_err, sync_path, Staging, StoreError};
use kiln_vmm::assets::{DebError, ToolError};
use serde::{Deserialize, Serialize};

use crate::disk::{mkfs_ext4_from_dir, DiskError};

const MANIFEST: &str = "manifest.json";
const DISK: &str = "disk.ext4";

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
    #[error("FROM {0}: kiln has no such base image; use FROM kiln/busybox, FROM kiln/debian:12, or a registry image (e.g. FROM python:3.12-slim)")]
    UnknownBase(String),
    /// A host tool is missing, cannot start or failed.
    #[error(transparent)]
    Tool(#[from] ToolError),
    /// Downloading or unpacking a Debian package failed.
    #[error(transparent)]
    Deb(#[from] DebError),
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
    /// A filesystem operation, or locking or publishing in the data directory, failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What sets one base apart from another on disk.
pub(crate) struct BaseKind {
    /// The base's name and directory under `<home>/bases/`.
    pub name: &'static str,
    /// Size of the sparse disk.
    pub disk_size: u64,
    /// The disk's ext4 label.
    pub label: &'static str,
}

/// What `manifest.json` records: the fields every base has, then the base's own.
#[derive(Debug, Serialize, Deserialize)]
struct Manifest<D> {
    name: String,
    version: String,
    disk: String,
    size_bytes: u64,
    /// Absent in bases built before it was recorded.
    #[serde(default)]
    build_seconds: f64,
    built_unix: u64,
    #[serde(flatten)]
    details: D,
}

/// A manifest read back, with the base's own fields left as they are.
type AnyManifest = Manifest<serde_json::Map<String, serde_json::Value>>;

/// Returns the newest base of `kind` under `home`; else, holding the base's lock, builds
/// one with `build` (which ends in [`BaseBuild::publish`]). `refresh` always builds.
pub(crate) fn ensure_base(
    home: &Path,
    kind: &'static BaseKind,
    refresh: bool,
    build: impl FnOnce(BaseBuild) -> Result<BaseImage, BaseError>,
) -> Result<BaseImage, BaseError> {
    let dir = home.join("bases").join(kind.name);
    find_or_build(
        &dir,
        refresh,
        || newest(&dir),
        || build(BaseBuild::start(&dir, kind)?),
    )
}

/// The most recently built base in `dir`.
fn newest(dir: &Path) -> Result<Option<BaseImage>, BaseError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("list", dir)(e).into()),
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

fn read_manifest(dir: &Path) -> Result<Option<AnyManifest>, BaseError> {
    let path = dir.join(MANIFEST);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("read", &path)(e).into()),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|source| BaseError::Manifest { path, source })
}

fn image_of<D>(dir: &Path, m: Manifest<D>) -> BaseImage {
    BaseImage {
        name: m.name,
        version: m.version,
        disk: dir.join(m.disk),
        size_bytes: m.size_bytes,
    }
}

/// A base being built under its directory's lock: a scratch directory for its inputs
/// and the rootfs, and a staging directory that becomes `<dir>/<version>` when published.
pub(crate) struct BaseBuild {
    dir: PathBuf,
    kind: &'static BaseKind,
    work: Staging,
    out: Staging,
    started: Instant,
}

impl BaseBuild {
    fn start(dir: &Path, kind: &'static BaseKind) -> Result<BaseBuild, BaseError> {
        Ok(BaseBuild {
            dir: dir.to_path_buf(),
            kind,
            work: Staging::dir_in(dir)?,
            out: Staging::dir_in(dir)?,
            started: Instant::now(),
        })
    }

    /// The scratch directory, removed when the build ends.
    pub(crate) fn work(&self) -> &Path {
        self.work.path()
    }

    /// The base already published as `version`, if any (apt had nothing newer, or an
    /// earlier refresh built it).
    pub(crate) fn existing(&self, version: &str) -> Result<Option<BaseImage>, BaseError> {
        let dest = self.dir.join(version_dir_name(version));
        Ok(read_manifest(&dest)?.map(|m| image_of(&dest, m)))
    }

    /// Makes the read-only disk from `rootfs`, writes the manifest with the base's own
    /// `details`, and renames the result to `<dir>/<version>`.
    pub(crate) fn publish(
        self,
        version: &str,
        rootfs: &Path,
        details: impl Serialize,
    ) -> Result<BaseImage, BaseError> {
        let out = self.out.path();
        let disk = out.join(DISK);
        mkfs_ext4_from_dir(rootfs, &disk, self.kind.disk_size, self.kind.label)?;
        fs::set_permissions(&disk, fs::Permissions::from_mode(0o444))
            .map_err(io_err("chmod", &disk))?;
        let manifest = Manifest {
            name: self.kind.name.into(),
            version: version.into(),
            disk: DISK.into(),
            size_bytes: self.kind.disk_size,
            build_seconds: self.started.elapsed().as_secs_f64(),
            built_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            details,
        };
        let manifest_path = out.join(MANIFEST);
        let json = serde_json::to_vec_pretty(&manifest).map_err(|source| BaseError::Manifest {
            path: manifest_path.clone(),
            source,
        })?;
        fs::write(&manifest_path, json).map_err(io_err("write", &manifest_path))?;
        sync_path(&disk)?;
        let dest = self.dir.join(version_dir_name(version));
        self.out.publish(&dest)?;
        tracing::info!(
            base = self.kind.name,
            version,
            seconds = manifest.build_seconds,
            "base built"
        );
        Ok(image_of(&dest, manifest))
    }
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

/// Whether FROM's word names one of kiln's own bases (`kiln/…`) rather than a registry image.
pub fn is_managed(from: &str) -> bool {
    from.starts_with("kiln/")
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

//! Snapshot directories: device state, guest memory and disks of a paused VM, with a
//! versioned manifest that says what can restore them. One format for both uses:
//!
//! - an **image** ([`SnapshotKind::Image`]): taken once from a build VM, immutable, restored
//!   many times; each restore maps `mem.img` privately (copy-on-write, loaded lazily, clean
//!   pages shared by every clone through the page cache) and puts a qcow2 overlay on each disk;
//! - a **session** ([`SnapshotKind::Session`]): a suspended MicroVM, restored once by its
//!   resume, which takes its disks and memory file over (hard links into the new runtime
//!   directory) and maps the memory the same lazy way, so resume time does not grow with the
//!   memory the guest touched.
//!
//! Layout: `state.bin` (QEMU device state, migrated with `x-ignore-shared`), `mem.img`
//! (the guest RAM file, sparse), `disk<N>.<fmt>` (the VM's disks), `manifest.json`.
//! The manifest names files inside the directory by name; only the guest kernel and
//! initramfs are outside it, named with their digests.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use kiln_api::Accel;
use serde::{Deserialize, Serialize};

use crate::spec::{DiskFormat, MachineKind};
use crate::VmmError;

/// Version of the snapshot layout and manifest; bump on incompatible change. (Sessions used a
/// separate, eager format before; [`SnapshotManifest::kind`] and [`SnapshotManifest::backend`]
/// were added with defaults that describe every version-1 image.)
pub const SNAPSHOT_FORMAT: u32 = 1;
/// The backend name this crate's QEMU backend writes into manifests.
pub const QEMU_BACKEND: &str = "qemu";
/// Name of the manifest file.
pub const MANIFEST: &str = "manifest.json";
/// Name of the device-state file.
pub const STATE: &str = "state.bin";
/// Name of the memory file.
pub const MEMORY: &str = "mem.img";

/// What a snapshot holds and what restoring it requires.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotManifest {
    /// Layout version ([`SNAPSHOT_FORMAT`]).
    pub format: u32,
    /// The VMM backend that wrote it ([`QEMU_BACKEND`]); restores need the same one.
    #[serde(default = "qemu_backend")]
    pub backend: String,
    /// An image or a suspended session.
    #[serde(default)]
    pub kind: SnapshotKind,
    /// Seconds since the Unix epoch when the snapshot was taken.
    pub created_unix: u64,
    /// QEMU version that wrote the device state; restores need the same one.
    pub qemu_version: String,
    /// Accelerator the VM ran under.
    pub accel: Accel,
    /// CPU model.
    pub cpu: String,
    /// Machine signature (machine options and device layout).
    pub machine: String,
    /// Guest memory in MiB (the baseline, for a VM that may grow).
    pub memory_mib: u64,
    /// The machine type; absent in manifests written before there was a choice (`microvm`).
    #[serde(default)]
    pub machine_kind: MachineKind,
    /// The memory ceiling in MiB of a `q35` VM with a virtio-mem device (see
    /// [`VmSpec::max_memory_mib`](crate::VmSpec::max_memory_mib)); absent: fixed memory.
    /// Memory plugged when the snapshot was taken is in its device state and comes back
    /// plugged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_memory_mib: Option<u64>,
    /// Virtual CPUs (`-smp`): the ceiling the guest may grow to.
    pub vcpus: u32,
    /// vCPUs online at boot, the baseline every restore is granted at start; absent in
    /// manifests written before guests could grow (then all of `vcpus`: a fixed size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline_vcpus: Option<u32>,
    /// TSC frequency the guest was booted with.
    pub tsc_khz: u64,
    /// Guest kernel the memory image was booted from.
    pub kernel: FileRef,
    /// Initramfs the guest was booted from.
    pub initramfs: FileRef,
    /// Extra kernel command-line words the guest was booted with.
    pub cmdline_extra: Vec<String>,
    /// Whether the VM had a network device.
    pub network: bool,
    /// The device state.
    pub state: FileInfo,
    /// The memory file.
    pub memory: FileInfo,
    /// The disks in guest order.
    pub disks: Vec<SnapshotDisk>,
}

fn qemu_backend() -> String {
    QEMU_BACKEND.to_string()
}

/// What a snapshot is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotKind {
    /// Immutable, restored by every launch of an image version.
    #[default]
    Image,
    /// A suspended session, restored once by its resume (which takes its files over).
    Session,
}

/// A file outside the snapshot that it depends on, with its digest.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileRef {
    /// Where it is, relative to the snapshot directory (within the same kiln home, so a home
    /// moved or copied whole keeps its snapshots); manifests written before were absolute.
    pub path: PathBuf,
    /// BLAKE3 of the contents.
    pub blake3: String,
}

impl FileRef {
    /// A reference from a manifest in `dir` (or a sibling of it) to the file at `path`.
    pub fn new(dir: &Path, path: &Path) -> Result<FileRef, VmmError> {
        Ok(FileRef {
            path: relative_path(dir, path),
            blake3: digest_file_cached(path).map_err(|e| VmmError::io("hashing", path, e))?,
        })
    }

    /// Where the file is, for the manifest of the snapshot in `dir`.
    pub fn locate(&self, dir: &Path) -> PathBuf {
        normalize(&dir.join(&self.path))
    }
}

/// `to` as a path relative to directory `from` (both absolute), by their components alone;
/// `to` itself when either is relative.
fn relative_path(from: &Path, to: &Path) -> PathBuf {
    if !from.is_absolute() || !to.is_absolute() {
        return to.to_owned();
    }
    let (from, to) = (normalize(from), normalize(to));
    let (a, b): (Vec<_>, Vec<_>) = (from.components().collect(), to.components().collect());
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut rel = PathBuf::new();
    for _ in common..a.len() {
        rel.push("..");
    }
    for c in &b[common..] {
        rel.push(c.as_os_str());
    }
    rel
}

/// `path` with `.` and `..` resolved by their components (no file system access).
fn normalize(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// A file inside the snapshot directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileInfo {
    /// File name inside the snapshot directory.
    pub file: String,
    /// Apparent size in bytes.
    pub size: u64,
    /// Bytes actually allocated on disk (sparse files are smaller).
    pub allocated: u64,
    /// BLAKE3 of the contents; `None` for a session's memory and disks, which are private,
    /// short-lived and checked by size (hashing them would sit on the suspend path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blake3: Option<String>,
}

/// One disk of a snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotDisk {
    /// The image file.
    #[serde(flatten)]
    pub info: FileInfo,
    /// Its format.
    pub format: DiskFormat,
}

/// A snapshot directory whose manifest has been read and checked.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The directory.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: SnapshotManifest,
}

impl Snapshot {
    /// Opens a snapshot and checks that it is whole and that this host can restore it.
    ///
    /// The check reads only small files (manifest, device state); the memory file is
    /// checked by size, so opening costs the same whatever the guest's memory size.
    pub fn open(dir: &Path, qemu_version: &str) -> Result<Snapshot, VmmError> {
        let bad = |reason: String| VmmError::BadSnapshot {
            dir: dir.to_owned(),
            reason,
        };
        let manifest_path = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&manifest_path).map_err(|e| {
            bad(format!(
                "cannot read {MANIFEST} ({e}); the snapshot is incomplete, take it again"
            ))
        })?;
        let manifest: SnapshotManifest = serde_json::from_str(&text)
            .map_err(|e| bad(format!("{MANIFEST} is not a kiln manifest: {e}")))?;
        if manifest.format != SNAPSHOT_FORMAT {
            return Err(bad(format!(
                "it has layout version {}, this kiln reads version {SNAPSHOT_FORMAT}; rebuild it",
                manifest.format
            )));
        }
        if manifest.backend != QEMU_BACKEND {
            return Err(bad(format!(
                "it was written by the {} backend; this host restores {QEMU_BACKEND} snapshots",
                manifest.backend
            )));
        }
        if manifest.qemu_version != qemu_version {
            return Err(bad(format!(
                "it was taken with QEMU {}, this host runs QEMU {qemu_version}; device state does \
                 not cross QEMU versions, so rebuild the image on this host",
                manifest.qemu_version
            )));
        }
        let state = &manifest.state;
        let state_path = dir.join(&state.file);
        let bytes = std::fs::read(&state_path).map_err(|e| {
            bad(format!(
                "device state {} is missing ({e}); take the snapshot again",
                state.file
            ))
        })?;
        if state.blake3.as_deref() != Some(blake3::hash(&bytes).to_hex().as_str()) {
            return Err(bad(format!(
                "device state {} does not match its checksum (corrupt or modified); take the snapshot again",
                state.file
            )));
        }
        for info in std::iter::once(&manifest.memory).chain(manifest.disks.iter().map(|d| &d.info))
        {
            let meta = std::fs::metadata(dir.join(&info.file)).map_err(|e| {
                bad(format!(
                    "{} is missing ({e}); take the snapshot again",
                    info.file
                ))
            })?;
            if meta.len() != info.size {
                return Err(bad(format!(
                    "{} is {} bytes, the manifest says {}; take the snapshot again",
                    info.file,
                    meta.len(),
                    info.size
                )));
            }
        }
        for (what, r) in [
            ("kernel", &manifest.kernel),
            ("initramfs", &manifest.initramfs),
        ] {
            let path = r.locate(dir);
            let digest = digest_file_cached(&path).map_err(|e| {
                bad(format!(
                    "the {what} it was booted from, {}, is gone ({e}); restore needs the exact \
                     same {what}: rebuild the snapshot",
                    path.display()
                ))
            })?;
            if digest != r.blake3 {
                return Err(bad(format!(
                    "the {what} at {} changed since the snapshot was taken (another kernel \
                     version?); rebuild the snapshot",
                    path.display()
                )));
            }
        }
        Ok(Snapshot {
            dir: dir.to_owned(),
            manifest,
        })
    }

    /// Path of the memory file.
    pub fn memory_path(&self) -> PathBuf {
        self.dir.join(&self.manifest.memory.file)
    }

    /// Path of the device state.
    pub fn state_path(&self) -> PathBuf {
        self.dir.join(&self.manifest.state.file)
    }

    /// Path of the guest kernel it was booted from.
    pub fn kernel_path(&self) -> PathBuf {
        self.manifest.kernel.locate(&self.dir)
    }

    /// Path of the initramfs it was booted from.
    pub fn initramfs_path(&self) -> PathBuf {
        self.manifest.initramfs.locate(&self.dir)
    }

    /// Path of disk `disk`.
    pub fn disk_path(&self, disk: &SnapshotDisk) -> PathBuf {
        self.dir.join(&disk.info.file)
    }

    /// Whether this is a suspended session (restored once, its files taken over).
    pub fn is_session(&self) -> bool {
        self.manifest.kind == SnapshotKind::Session
    }

    /// Bytes the snapshot occupies on disk (every file in its directory).
    pub fn allocated_bytes(&self) -> u64 {
        std::fs::read_dir(&self.dir)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok()?.metadata().ok())
                    .map(|m| m.blocks() * 512)
                    .sum()
            })
            .unwrap_or(0)
    }

    /// Rewrites every qcow2 disk that has a backing chain as a standalone image, so the
    /// snapshot no longer depends on the layers it was built from (same contents), and
    /// updates the manifest.
    pub fn flatten_disks(&mut self) -> Result<(), VmmError> {
        for i in 0..self.manifest.disks.len() {
            let disk = &self.manifest.disks[i];
            if disk.format != DiskFormat::Qcow2 {
                continue;
            }
            let path = self.dir.join(&disk.info.file);
            let flat = self.dir.join(format!("{}.flat", disk.info.file));
            let out = std::process::Command::new("qemu-img")
                .args(["convert", "-O", "qcow2"])
                .arg(&path)
                .arg(&flat)
                .output()
                .map_err(|e| VmmError::io("running qemu-img convert on", &path, e))?;
            if !out.status.success() {
                let _ = std::fs::remove_file(&flat);
                return Err(VmmError::Tool {
                    program: "qemu-img convert".into(),
                    detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
                });
            }
            std::fs::rename(&flat, &path).map_err(|e| VmmError::io("replacing", &path, e))?;
            make_read_only(&path)?;
            let file = disk.info.file.clone();
            self.manifest.disks[i].info = file_info(&self.dir, &file)?;
        }
        let manifest_path = self.dir.join(MANIFEST);
        let text = serde_json::to_vec_pretty(&self.manifest)
            .map_err(|e| VmmError::InvalidSpec(e.to_string()))?;
        let tmp = self.dir.join(format!("{MANIFEST}.tmp"));
        std::fs::write(&tmp, text).map_err(|e| VmmError::io("writing", &tmp, e))?;
        make_read_only(&tmp)?;
        std::fs::rename(&tmp, &manifest_path)
            .map_err(|e| VmmError::io("replacing", &manifest_path, e))
    }

    /// Re-hashes every file (slow for big memory files); for `verify`-style checks.
    pub fn verify_contents(&self) -> Result<(), VmmError> {
        for info in std::iter::once(&self.manifest.memory)
            .chain(self.manifest.disks.iter().map(|d| &d.info))
        {
            let Some(expected) = &info.blake3 else {
                continue;
            };
            let path = self.dir.join(&info.file);
            let digest = digest_file(&path).map_err(|e| VmmError::io("hashing", &path, e))?;
            if &digest != expected {
                return Err(VmmError::BadSnapshot {
                    dir: self.dir.clone(),
                    reason: format!("{} does not match its checksum", info.file),
                });
            }
        }
        Ok(())
    }
}

/// Size, allocation and digest of a file.
pub fn file_info(dir: &Path, file: &str) -> Result<FileInfo, VmmError> {
    let path = dir.join(file);
    let blake3 = digest_file(&path).map_err(|e| VmmError::io("hashing", &path, e))?;
    Ok(FileInfo {
        blake3: Some(blake3),
        ..sized_file_info(dir, file)?
    })
}

/// Size and allocation of a file, without a digest (a session's private files).
pub fn sized_file_info(dir: &Path, file: &str) -> Result<FileInfo, VmmError> {
    let path = dir.join(file);
    let meta = std::fs::metadata(&path).map_err(|e| VmmError::io("reading", &path, e))?;
    Ok(FileInfo {
        file: file.to_string(),
        size: meta.len(),
        allocated: meta.blocks() * 512,
        blake3: None,
    })
}

/// BLAKE3 of a file's contents, read in large blocks.
pub fn digest_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().to_hex().to_string())
}

/// [`digest_file`], remembered per (path, size, mtime) for the life of the process: kernels and
/// initramfs images are checked on every restore and rarely change.
pub fn digest_file_cached(path: &Path) -> std::io::Result<String> {
    use std::collections::HashMap;
    use std::sync::Mutex;
    type Key = (PathBuf, u64, i64, i64);
    static CACHE: Mutex<Option<HashMap<Key, String>>> = Mutex::new(None);
    let meta = std::fs::metadata(path)?;
    let key = (path.to_owned(), meta.len(), meta.mtime(), meta.mtime_nsec());
    if let Some(d) = CACHE
        .lock()
        .ok()
        .and_then(|c| c.as_ref().and_then(|m| m.get(&key).cloned()))
    {
        return Ok(d);
    }
    let d = digest_file(path)?;
    if let Ok(mut c) = CACHE.lock() {
        c.get_or_insert_with(HashMap::new).insert(key, d.clone());
    }
    Ok(d)
}

/// Moves a file, copying (sparsely) when source and target are on different filesystems.
pub fn move_file(from: &Path, to: &Path) -> Result<(), VmmError> {
    match std::fs::rename(from, to) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            let out = std::process::Command::new("cp")
                .arg("--sparse=always")
                .arg(from)
                .arg(to)
                .output()
                .map_err(|e| VmmError::io("copying", from, e))?;
            if !out.status.success() {
                return Err(VmmError::Tool {
                    program: "cp".into(),
                    detail: String::from_utf8_lossy(&out.stderr).into_owned(),
                });
            }
            std::fs::remove_file(from).map_err(|e| VmmError::io("removing", from, e))
        }
        Err(e) => Err(VmmError::io("moving", from, e)),
    }
}

/// Turns runs of zero bytes in a file into holes (`fallocate --dig-holes`): guest pages that
/// were touched but hold zeros then cost no disk and no page cache. Best effort: a file
/// system without hole punching keeps the file as it is.
pub fn dig_holes(path: &Path) {
    match std::process::Command::new("fallocate")
        .arg("--dig-holes")
        .arg(path)
        .output()
    {
        Ok(out) if out.status.success() => {}
        Ok(out) => {
            tracing::debug!(path = %path.display(), stderr = %String::from_utf8_lossy(&out.stderr), "fallocate --dig-holes failed")
        }
        Err(e) => tracing::debug!(path = %path.display(), error = %e, "fallocate not available"),
    }
}

/// Where a disk of index `i` is stored inside a snapshot.
pub fn disk_file_name(i: usize, format: DiskFormat) -> String {
    format!("disk{i}.{}", format.as_str())
}

/// Marks a snapshot file read-only, so nothing writes to it by mistake.
pub fn make_read_only(path: &Path) -> Result<(), VmmError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o444))
        .map_err(|e| VmmError::io("making read-only", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_ref_when_under_one_home_then_relative_and_located_back() {
        let dir = Path::new("/home/k/images/app/v1/snapshot.partial");
        let kernel = Path::new("/home/k/kernels/6.1/vmlinuz");
        let published = Path::new("/home/k/images/app/v1/snapshot");

        let rel = relative_path(dir, kernel);
        let located = FileRef {
            path: rel.clone(),
            blake3: String::new(),
        }
        .locate(published);

        assert_eq!(rel, Path::new("../../../../kernels/6.1/vmlinuz"));
        assert_eq!(located, kernel);
        assert_eq!(relative_path(dir, Path::new("rel/x")), Path::new("rel/x"));
    }

    #[test]
    fn manifest_when_written_before_machines_then_a_fixed_microvm() {
        let older = r#"{
            "format": 1, "created_unix": 1, "qemu_version": "7.2.19", "accel": "tcg",
            "cpu": "max", "machine": "microvm,x-option-roms=off", "memory_mib": 256,
            "vcpus": 1, "tsc_khz": 1, "cmdline_extra": [], "network": true,
            "kernel": {"path": "k", "blake3": "0"}, "initramfs": {"path": "i", "blake3": "0"},
            "state": {"file": "state.bin", "size": 1, "allocated": 1},
            "memory": {"file": "mem.img", "size": 1, "allocated": 1}, "disks": []
        }"#;

        let m: SnapshotManifest = serde_json::from_str(older).expect("parse");

        assert_eq!(m.machine_kind, MachineKind::Microvm);
        assert_eq!(m.max_memory_mib, None);
        assert!(!serde_json::to_string(&m)
            .expect("json")
            .contains("max_memory_mib"));
    }

    #[test]
    fn file_ref_when_absolute_as_older_manifests_then_located_as_is() {
        let old = FileRef {
            path: PathBuf::from("/home/k/kernels/6.1/vmlinuz"),
            blake3: String::new(),
        };

        assert_eq!(
            old.locate(Path::new("/elsewhere/snap")),
            Path::new("/home/k/kernels/6.1/vmlinuz")
        );
    }
}

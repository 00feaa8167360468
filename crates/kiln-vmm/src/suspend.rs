//! Suspended VMs: a running VM saved whole to disk so that its QEMU can end and give the host
//! its memory back, then resumed later with memory, disk and processes intact.
//!
//! This is design 1 of `DESIGN.md` ("Suspend and resume, two measured designs"): the guest RAM
//! travels *inside* the migration stream (`x-ignore-shared` off), because a VM restored from
//! an image maps the image's memory file privately (`share=off`) and its own changes live only
//! in QEMU's anonymous copy-on-write pages.
//!
//! Layout of a suspended directory:
//! - `state.bin`: QEMU's migration stream: every RAM page that is not zero, then devices.
//! - `disk<N>.qcow2` (or `.raw`): the VM's writable disks (its session's writes), moved here.
//!   A qcow2 overlay keeps its backing chain: the image's read-only disk, by absolute path.
//! - `manifest.json`: [`SuspendManifest`].
//!
//! Read-only disks are not moved; the manifest names them where they are.
//!
//! Crash safety. Suspend writes everything into `<dest>.partial` while QEMU is paused, fsyncs
//! it, renames it to `<dest>` and only then ends QEMU. Resume hard-links the disks into the new
//! runtime directory (or copies them across file systems), so the suspended directory stays
//! whole until the resumed guest runs; it is removed once resume succeeds. A supervisor that
//! restarts after a crash therefore applies one rule: a published suspended directory is the
//! session, unless a VM in the runtime directory has already been resumed from it and runs
//! (then the suspended directory is stale); a `.partial` directory is always garbage.
//!
//! The stream is checked by size only: it is private, short-lived and written by kiln, and
//! hashing hundreds of MiB would sit on the resume path.
//!
//! Not yet (DESIGN's hybrid): resume here is eager (the whole stream is read before the guest
//! runs, so it grows with touched memory) and the resumed VM shares no pages with its image.
//! The hybrid would, off the client's path, load this stream once into a per-VM sparse memory
//! file (`share=on`) and re-save it with `x-ignore-shared`, turning this directory into a small
//! private image that resumes like a launch (`share=off`, lazy). kilnd opens the stream's
//! file and QEMU gets only its descriptor (`getfd` with SCM_RIGHTS, then `fd:` migration).

use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use kiln_api::Accel;
use serde::{Deserialize, Serialize};

use crate::snapshot::{digest_file_cached, FileRef};
use crate::spec::DiskFormat;
use crate::{Timeline, VmmError};

/// Version of the suspended layout and manifest; bump on incompatible change.
pub const SUSPEND_FORMAT: u32 = 1;
/// Name of the manifest file.
pub const MANIFEST: &str = "manifest.json";
/// Name of the migration stream (RAM and devices).
pub const STATE: &str = "state.bin";

/// What a suspended directory holds and what resuming it requires.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SuspendManifest {
    /// Layout version ([`SUSPEND_FORMAT`]).
    pub format: u32,
    /// Seconds since the Unix epoch when the VM was suspended.
    pub suspended_unix: u64,
    /// QEMU version that wrote the stream; resume needs the same one.
    pub qemu_version: String,
    /// Accelerator the VM ran under.
    pub accel: Accel,
    /// CPU model.
    pub cpu: String,
    /// Machine signature (machine options and device layout).
    pub machine: String,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Id of the guest RAM backend the stream names; resume recreates it, anonymous, with
    /// this id and `memory_mib`.
    pub ram_backend: String,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// TSC frequency the guest was booted with.
    pub tsc_khz: u64,
    /// Guest kernel the VM was booted from.
    pub kernel: FileRef,
    /// Initramfs the VM was booted from.
    pub initramfs: FileRef,
    /// Extra kernel command-line words the guest was booted with.
    pub cmdline_extra: Vec<String>,
    /// Whether the VM had a network device.
    pub network: bool,
    /// The migration stream, guest RAM included.
    pub state: StoredFile,
    /// The disks in guest order.
    pub disks: Vec<SuspendedDisk>,
}

/// A file inside the suspended directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredFile {
    /// File name inside the directory.
    pub file: String,
    /// Apparent size in bytes.
    pub size: u64,
    /// Bytes allocated on disk.
    pub allocated: u64,
}

/// One disk of a suspended VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SuspendedDisk {
    /// Where the disk is: a file name inside the suspended directory (a writable disk moved
    /// there), or an absolute path (a read-only disk left in place).
    pub path: PathBuf,
    /// Its format.
    pub format: DiskFormat,
    /// Attached read-only.
    pub read_only: bool,
    /// Size in bytes when suspended.
    pub size: u64,
    /// The qcow2 backing file it depends on, if any.
    pub backing: Option<PathBuf>,
}

/// A suspended VM whose manifest has been read and checked.
#[derive(Debug, Clone)]
pub struct SuspendedVm {
    /// The directory.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: SuspendManifest,
    /// When each suspend step finished (empty for a directory opened later).
    pub timeline: Timeline,
}

/// Where a suspend into `dest` writes before it publishes `dest` with a rename; what is left
/// there after a crash is never a session and can be removed.
pub fn staging_dir(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    dest.with_file_name(name)
}

impl SuspendedVm {
    /// Opens a suspended directory and checks that it is whole and that this host can resume
    /// it (same QEMU, same kernel and initramfs, every disk and backing file present).
    pub fn open(dir: &Path, qemu_version: &str) -> Result<SuspendedVm, VmmError> {
        let bad = |reason: String| VmmError::BadSnapshot {
            dir: dir.to_owned(),
            reason,
        };
        let manifest_path = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&manifest_path).map_err(|e| {
            bad(format!(
                "cannot read {MANIFEST} ({e}); the suspend did not finish, so the session is lost"
            ))
        })?;
        let manifest: SuspendManifest = serde_json::from_str(&text)
            .map_err(|e| bad(format!("{MANIFEST} is not a kiln suspend manifest: {e}")))?;
        if manifest.format != SUSPEND_FORMAT {
            return Err(bad(format!(
                "it has layout version {}, this kiln reads version {SUSPEND_FORMAT}",
                manifest.format
            )));
        }
        if manifest.qemu_version != qemu_version {
            return Err(bad(format!(
                "it was suspended by QEMU {}, this host runs QEMU {qemu_version}; the migration \
                 stream does not cross QEMU versions: resume it with that QEMU",
                manifest.qemu_version
            )));
        }
        let vm = SuspendedVm {
            dir: dir.to_owned(),
            manifest,
            timeline: Timeline::default(),
        };
        let m = &vm.manifest;
        let sized = std::iter::once((vm.state_path(), m.state.size, "migration stream"))
            .chain(m.disks.iter().map(|d| (vm.disk_path(d), d.size, "disk")));
        for (path, size, what) in sized {
            let meta = std::fs::metadata(&path)
                .map_err(|e| bad(format!("its {what} {} is missing ({e})", path.display())))?;
            if meta.len() != size {
                return Err(bad(format!(
                    "its {what} {} is {} bytes, the manifest says {size}; it was modified or \
                     truncated",
                    path.display(),
                    meta.len()
                )));
            }
        }
        for backing in m.disks.iter().filter_map(|d| d.backing.as_ref()) {
            if !backing.exists() {
                return Err(bad(format!(
                    "its disk is an overlay on {}, which is gone (was the image deleted while \
                     the VM was suspended?)",
                    backing.display()
                )));
            }
        }
        for (what, r) in [("kernel", &m.kernel), ("initramfs", &m.initramfs)] {
            let same = digest_file_cached(&r.path).is_ok_and(|d| d == r.blake3);
            if !same {
                return Err(bad(format!(
                    "the {what} it runs, {}, is gone or changed; a suspended guest resumes only \
                     on the exact same {what}",
                    r.path.display()
                )));
            }
        }
        Ok(vm)
    }

    /// Path of the migration stream.
    pub fn state_path(&self) -> PathBuf {
        self.dir.join(&self.manifest.state.file)
    }

    /// Where a disk of this VM is now.
    pub fn disk_path(&self, disk: &SuspendedDisk) -> PathBuf {
        // `join` keeps an absolute path as it is (read-only disks left in place).
        self.dir.join(&disk.path)
    }

    /// Bytes the suspended VM occupies on disk (stream and moved disks).
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

    /// Deletes the suspended VM (the session ends without resuming).
    pub fn discard(self) -> Result<(), VmmError> {
        std::fs::remove_dir_all(&self.dir).map_err(|e| VmmError::io("removing", &self.dir, e))
    }
}

/// A suspend that did not happen. `vm` is the VM, running again, when QEMU survived the
/// attempt; `None` when QEMU died (the session is lost and its runtime directory removed).
pub struct SuspendError<V> {
    /// What failed.
    pub error: VmmError,
    /// The VM, still running, if it survived.
    pub vm: Option<V>,
}

impl<V> fmt::Debug for SuspendError<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SuspendError")
            .field("error", &self.error)
            .field("vm_running", &self.vm.is_some())
            .finish()
    }
}

impl<V> fmt::Display for SuspendError<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.vm.is_some() {
            write!(f, "suspend failed, the VM keeps running: {}", self.error)
        } else {
            write!(f, "suspend failed and the VM is lost: {}", self.error)
        }
    }
}

impl<V> std::error::Error for SuspendError<V> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

impl<V> From<SuspendError<V>> for VmmError {
    fn from(e: SuspendError<V>) -> VmmError {
        e.error
    }
}

/// The backing file named in a qcow2 header, as written there (a relative name is relative
/// to the overlay's directory), if the file is qcow2 and has one.
pub fn qcow2_backing(path: &Path) -> std::io::Result<Option<PathBuf>> {
    use std::io::{Read, Seek, SeekFrom};
    use std::os::unix::ffi::OsStringExt;
    let mut f = std::fs::File::open(path)?;
    let mut header = [0u8; 20];
    if f.read_exact(&mut header).is_err() || &header[..4] != b"QFI\xfb" {
        return Ok(None);
    }
    let offset = u64::from_be_bytes(header[8..16].try_into().unwrap_or_default());
    let len = u32::from_be_bytes(header[16..20].try_into().unwrap_or_default());
    if offset == 0 || len == 0 || len > 4096 {
        return Ok(None);
    }
    let mut name = vec![0u8; len as usize];
    f.seek(SeekFrom::Start(offset))?;
    f.read_exact(&mut name)?;
    Ok(Some(PathBuf::from(std::ffi::OsString::from_vec(name))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qcow2_backing_when_overlay_then_names_its_base() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![0u8; 1 << 20]).expect("base");
        let overlay = dir.path().join("top.qcow2");
        crate::qemu::create_overlay(&base, DiskFormat::Raw, &overlay).expect("overlay");

        let found = qcow2_backing(&overlay).expect("read header");
        let raw = qcow2_backing(&base).expect("read raw");

        assert_eq!(found, Some(base));
        assert_eq!(raw, None);
    }
}

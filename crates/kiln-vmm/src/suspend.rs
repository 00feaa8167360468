//! Suspended VMs: a running VM saved whole to disk so that its QEMU can end and give the host
//! its memory back, then resumed later with memory, disk and processes intact.
//!
//! A suspended VM is a [`Snapshot`] of kind [`Session`](crate::snapshot::SnapshotKind): the
//! same layout and manifest as an image, so launch and resume share one restore path. A VM
//! restored from an image maps the image's memory file privately (`share=off`); its own
//! changes live only in QEMU's anonymous copy-on-write pages. Suspend therefore migrates the
//! whole RAM — not into a stream on disk, but straight into a second QEMU (the *receiver*)
//! that waits with `-incoming` and holds guest RAM in a new, sparse, shared memory file in
//! the session directory; the receiver then saves only the device state with
//! `x-ignore-shared`, as a build VM does for an image. Resume maps that file privately and
//! loads pages as the guest touches them, so its time does not grow with the memory the
//! guest used, and the VM runs with no writeback of its memory file (DESIGN's hybrid).
//!
//! Layout of a suspended directory: `state.bin` (device state), `mem.img` (guest RAM),
//! `disk<N>.qcow2` (the VM's writable disks, moved here by hard links; a qcow2 overlay keeps
//! its backing chain, the image's read-only disk), `app.log` (the app's output so far),
//! `manifest.json`.
//!
//! Crash safety. Suspend writes everything into `<dest>.partial` while the source QEMU is
//! paused (the receiver runs in `<dest>.rx`), fsyncs it, renames it to `<dest>` and only then
//! ends the source QEMU. Resume hard-links the disks and memory file into the new runtime
//! directory, so the suspended directory stays whole until the resumed guest runs; it is
//! removed once resume succeeds. A supervisor that restarts after a crash therefore applies
//! one rule: a published suspended directory is the session, unless a VM in the runtime
//! directory has already been resumed from it and runs (then the suspended directory is
//! stale); `.partial` and `.rx` are always garbage (kill what runs in `.rx` first).

use std::fmt;
use std::path::{Path, PathBuf};

use crate::snapshot::{Snapshot, SnapshotKind};
use crate::spec::DiskFormat;
use crate::{Timeline, VmmError};

/// A suspended VM whose manifest has been read and checked.
#[derive(Debug, Clone)]
pub struct SuspendedVm {
    /// The session's snapshot.
    pub snapshot: Snapshot,
    /// When each suspend step finished (empty for a directory opened later).
    pub timeline: Timeline,
}

/// Where a suspend into `dest` writes before it publishes `dest` with a rename; what is left
/// there after a crash is never a session and can be removed.
pub fn staging_dir(dest: &Path) -> PathBuf {
    sibling(dest, ".partial")
}

/// The runtime directory of the receiver QEMU of a suspend into `dest`: a QEMU found running
/// there after a crash is garbage and must be killed.
pub fn receiver_dir(dest: &Path) -> PathBuf {
    sibling(dest, ".rx")
}

/// Where the receiver of a suspend into `dest` keeps guest RAM when the host has a RAM file
/// system (`/dev/shm`): a name of its own, made from `dest`.
pub fn receiver_memory(dest: &Path) -> Option<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    let shm = Path::new("/dev/shm");
    if !shm.is_dir() {
        return None;
    }
    let digest = blake3::hash(dest.as_os_str().as_bytes()).to_hex();
    Some(shm.join(format!("kiln-suspend-{}.mem", &digest[..24])))
}

/// Removes what an unpublished suspend into `dest` left (its staging and receiver
/// directories, the receiver's memory, jail id and cgroup). Kill the receiver first
/// ([`Vmm::kill_leftovers`](crate::Vmm::kill_leftovers) on [`receiver_dir`]).
pub fn remove_unpublished(dest: &Path) {
    if let Some(memory) = receiver_memory(dest) {
        let _ = std::fs::remove_file(memory);
    }
    let rx = receiver_dir(dest);
    crate::jail::release(&rx);
    crate::cgroup::remove_for(&rx);
    for dir in [staging_dir(dest), rx] {
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot remove an unpublished suspend");
            }
        }
    }
}

fn sibling(dest: &Path, suffix: &str) -> PathBuf {
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    dest.with_file_name(name)
}

impl SuspendedVm {
    /// Opens a suspended directory and checks that it is whole and that this host can resume
    /// it (same backend and QEMU, same kernel and initramfs, every file present at its size).
    pub fn open(dir: &Path, qemu_version: &str) -> Result<SuspendedVm, VmmError> {
        let snapshot = Snapshot::open(dir, qemu_version).map_err(|e| {
            // Read again only when it failed: an older kiln's eager stream says why better.
            let legacy = std::fs::read_to_string(dir.join(crate::snapshot::MANIFEST))
                .is_ok_and(|text| text.contains("\"ram_backend\""));
            if !legacy {
                return e;
            }
            VmmError::BadSnapshot {
                dir: dir.to_owned(),
                reason: "it was suspended by an older kiln into a migration stream, which this \
                         kiln no longer resumes; resume it with that kiln, or terminate it"
                    .into(),
            }
        })?;
        if snapshot.manifest.kind != SnapshotKind::Session {
            return Err(VmmError::BadSnapshot {
                dir: dir.to_owned(),
                reason: "it is an image snapshot, not a suspended session".into(),
            });
        }
        Ok(SuspendedVm {
            snapshot,
            timeline: Timeline::default(),
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.snapshot.dir
    }

    /// Bytes the suspended VM occupies on disk (memory, device state and disks).
    pub fn allocated_bytes(&self) -> u64 {
        self.snapshot.allocated_bytes()
    }

    /// Deletes the suspended VM (the session ends without resuming).
    pub fn discard(self) -> Result<(), VmmError> {
        let dir = &self.snapshot.dir;
        std::fs::remove_dir_all(dir).map_err(|e| VmmError::io("removing", dir, e))
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

/// The size the guest sees of a disk: a qcow2 image's virtual size, a raw file's length.
pub fn virtual_size(path: &Path, format: DiskFormat) -> std::io::Result<u64> {
    use std::io::Read;
    let len = std::fs::metadata(path)?.len();
    if format == DiskFormat::Raw {
        return Ok(len);
    }
    let mut header = [0u8; 32];
    std::fs::File::open(path)?.read_exact(&mut header)?;
    if &header[..4] != b"QFI\xfb" {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not a qcow2 image",
        ));
    }
    Ok(u64::from_be_bytes(
        header[24..32].try_into().unwrap_or_default(),
    ))
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
        let size = virtual_size(&overlay, DiskFormat::Qcow2).expect("virtual size");

        assert_eq!(found, Some(base));
        assert_eq!(raw, None);
        assert_eq!(size, 1 << 20);
    }
}

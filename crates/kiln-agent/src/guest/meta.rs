//! File metadata shared by Copy and ExtractArchive: owner, permission bits, mtime,
//! and creating missing parent directories.

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use nix::sys::stat::{utimensat, UtimensatFlags};
use nix::sys::time::TimeSpec;

/// Owner and group given to what is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

/// Sets owner, then mode (chown clears set-id bits, so the mode comes second), without
/// following a symlink at `path`; a symlink gets no mode (Linux ignores it).
pub fn apply(path: &Path, owner: Owner, mode: Option<u32>) -> io::Result<()> {
    let meta = fs::symlink_metadata(path)?;
    // Skipping a no-op chown lets an unprivileged agent copy into its own files.
    if meta.uid() != owner.uid || meta.gid() != owner.gid {
        std::os::unix::fs::lchown(path, Some(owner.uid), Some(owner.gid))?;
    }
    if let Some(mode) = mode {
        if !meta.file_type().is_symlink() {
            fs::set_permissions(path, fs::Permissions::from_mode(mode & 0o7777))?;
        }
    }
    Ok(())
}

/// Sets access and modification time of `path` (not of a symlink's target).
pub fn set_mtime(path: &Path, secs: i64, nanos: i64) -> io::Result<()> {
    let time = TimeSpec::new(secs as libc::time_t, nanos as libc::c_long);
    utimensat(None, path, &time, &time, UtimensatFlags::NoFollowSymlink).map_err(io::Error::from)
}

/// Creates `dir` and its missing ancestors (mode 0755), giving each one created to `owner`.
pub fn create_dirs(dir: &Path, owner: Owner) -> Result<(), String> {
    let mut missing = Vec::new();
    let mut cursor = Some(dir);
    while let Some(path) = cursor {
        match fs::metadata(path) {
            Ok(meta) if meta.is_dir() => break,
            Ok(_) => return Err(format!("{} exists and is not a directory", path.display())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => missing.push(path),
            Err(e) => return Err(format!("cannot look at {}: {e}", path.display())),
        }
        cursor = path.parent();
    }
    for path in missing.into_iter().rev() {
        match fs::create_dir(path) {
            Ok(()) => {}
            // Created meanwhile by someone else: fine.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => continue,
            Err(e) => return Err(format!("cannot create directory {}: {e}", path.display())),
        }
        apply(path, owner, Some(0o755))
            .map_err(|e| format!("cannot set owner of {}: {e}", path.display()))?;
    }
    Ok(())
}

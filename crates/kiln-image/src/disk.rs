//! Disk images: a directory tree into a sparse ext4 file with `mke2fs -d`, no mounting.

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_vmm::assets::tool::{run, ToolError};
use kiln_vmm::assets::{io_err, IoError};

/// ext4 block size kiln uses for every image.
const BLOCK_SIZE: u64 = 4096;

/// Longest label ext4 stores.
const MAX_LABEL: usize = 16;

/// Failures while making a disk image.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// `mke2fs` is not installed or cannot start.
    #[error(transparent)]
    Tool(#[from] ToolError),
    /// The source is not a directory.
    #[error("cannot make a disk from {path}: it is not a directory")]
    NotADirectory {
        /// The source given.
        path: PathBuf,
    },
    /// The label does not fit ext4's 16 bytes.
    #[error("disk label {label:?} is longer than {MAX_LABEL} bytes: choose a shorter label")]
    BadLabel {
        /// The label given.
        label: String,
    },
    /// The size is not a positive multiple of the block size.
    #[error(
        "disk size {size_bytes} bytes is not a positive multiple of {BLOCK_SIZE}: round it up"
    )]
    BadSize {
        /// The size given.
        size_bytes: u64,
    },
    /// The directory does not fit into the requested size.
    #[error(
        "{src} needs about {needed_bytes} bytes but the disk {out} is {size_bytes} bytes: \
         make the disk larger or the directory smaller"
    )]
    TooLarge {
        /// The source directory.
        src: PathBuf,
        /// The disk file.
        out: PathBuf,
        /// Estimated (or reported) space needed.
        needed_bytes: u64,
        /// The size asked for.
        size_bytes: u64,
    },
    /// `mke2fs` ran out of blocks or inodes while copying the directory in.
    #[error(
        "{src} does not fit into the {size_bytes}-byte disk {out} ({detail}): make the disk \
         larger or the directory smaller"
    )]
    NoSpace {
        /// The source directory.
        src: PathBuf,
        /// The disk file.
        out: PathBuf,
        /// The size asked for.
        size_bytes: u64,
        /// What mke2fs said.
        detail: String,
    },
    /// `mke2fs` failed for another reason.
    #[error("mke2fs failed making {out} from {src}: {detail}")]
    Mkfs {
        /// The source directory.
        src: PathBuf,
        /// The disk file.
        out: PathBuf,
        /// What mke2fs said.
        detail: String,
    },
    /// A filesystem operation failed.
    #[error(transparent)]
    Io(#[from] IoError),
}

/// Makes `out_file` a sparse ext4 image of `size_bytes` holding the tree under `src_dir`,
/// owned as on the host with the root directory owned by root.
///
/// On failure no partial image is left behind.
pub fn mkfs_ext4_from_dir(
    src_dir: &Path,
    out_file: &Path,
    size_bytes: u64,
    label: &str,
) -> Result<(), DiskError> {
    mkfs_ext4_owned(src_dir, out_file, size_bytes, label, 0, 0)
}

/// As [`mkfs_ext4_from_dir`], with the file system's root directory owned by `uid:gid`.
pub fn mkfs_ext4_owned(
    src_dir: &Path,
    out_file: &Path,
    size_bytes: u64,
    label: &str,
    uid: u32,
    gid: u32,
) -> Result<(), DiskError> {
    if !src_dir.is_dir() {
        return Err(DiskError::NotADirectory {
            path: src_dir.into(),
        });
    }
    if label.len() > MAX_LABEL {
        return Err(DiskError::BadLabel {
            label: label.into(),
        });
    }
    if size_bytes == 0 || !size_bytes.is_multiple_of(BLOCK_SIZE) {
        return Err(DiskError::BadSize { size_bytes });
    }
    let too_large = |needed_bytes| DiskError::TooLarge {
        src: src_dir.into(),
        out: out_file.into(),
        needed_bytes,
        size_bytes,
    };
    let needed = estimate_usage(src_dir)?;
    if needed > size_bytes {
        return Err(too_large(needed));
    }
    let file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(out_file)
        .map_err(io_err("create", out_file))?;
    file.set_len(size_bytes).map_err(io_err("size", out_file))?;
    drop(file);
    let result = run_mke2fs(src_dir, out_file, size_bytes, label, (uid, gid));
    if result.is_err() {
        let _ = fs::remove_file(out_file);
    }
    match result {
        Err(DiskError::Mkfs { detail, .. }) if is_out_of_space(&detail) => {
            Err(DiskError::NoSpace {
                src: src_dir.into(),
                out: out_file.into(),
                size_bytes,
                detail: detail.lines().last().unwrap_or_default().to_string(),
            })
        }
        other => other,
    }
}

fn run_mke2fs(
    src: &Path,
    out: &Path,
    size_bytes: u64,
    label: &str,
    root_owner: (u32, u32),
) -> Result<(), DiskError> {
    let output = run(
        "mke2fs",
        Command::new("mke2fs")
            .args(["-q", "-t", "ext4", "-b", "4096", "-d"])
            .arg(src)
            .arg("-L")
            .arg(label)
            .arg("-E")
            .arg(format!("root_owner={}:{}", root_owner.0, root_owner.1))
            .arg("-F")
            .arg(out)
            .arg(format!("{}k", size_bytes / 1024)),
    )?;
    if output.status.success() {
        return Ok(());
    }
    let mut detail = String::from_utf8_lossy(&output.stderr).trim().to_string();
    if detail.is_empty() {
        detail = String::from_utf8_lossy(&output.stdout).trim().to_string();
    }
    Err(DiskError::Mkfs {
        src: src.into(),
        out: out.into(),
        detail,
    })
}

fn is_out_of_space(detail: &str) -> bool {
    ["No space left", "Could not allocate", "too many", "exceeds"]
        .iter()
        .any(|needle| detail.contains(needle))
}

/// Space the tree needs on ext4: data rounded to blocks, an inode each, plus metadata
/// (inode tables, journal) of a small filesystem.
fn estimate_usage(dir: &Path) -> Result<u64, DiskError> {
    const INODE_BYTES: u64 = 256;
    let mut total = BLOCK_SIZE;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).map_err(io_err("list", &dir))? {
            let entry = entry.map_err(io_err("list", &dir))?;
            let meta = fs::symlink_metadata(entry.path()).map_err(io_err("stat", &entry.path()))?;
            total += INODE_BYTES;
            if meta.is_dir() {
                total += BLOCK_SIZE;
                stack.push(entry.path());
            } else if meta.is_file() {
                total += meta.len().div_ceil(BLOCK_SIZE) * BLOCK_SIZE;
            }
        }
    }
    Ok(total)
}

/// Runs a debugfs request against an image and returns its output (for tests).
#[cfg(test)]
pub(crate) fn debugfs(image: &Path, request: &str) -> String {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(request)
        .arg(image)
        .output()
        .expect("debugfs (e2fsprogs) runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_when_made_from_dir_then_holds_files_and_links() {
        let work = tempfile::tempdir().expect("work");
        let src = work.path().join("root");
        fs::create_dir_all(src.join("etc")).expect("mkdir");
        fs::write(src.join("etc/hello"), "hello from kiln\n").expect("write");
        std::os::unix::fs::symlink("/etc/hello", src.join("link")).expect("symlink");
        let out = work.path().join("disk.ext4");

        mkfs_ext4_from_dir(&src, &out, 16 << 20, "kiln-test").expect("mkfs");

        assert_eq!(debugfs(&out, "cat /etc/hello"), "hello from kiln\n");
        assert!(debugfs(&out, "stat /link").contains("Fast link dest: \"/etc/hello\""));
        assert_eq!(fs::metadata(&out).expect("stat").len(), 16 << 20);
    }

    #[test]
    fn image_when_made_then_file_is_sparse() {
        use std::os::unix::fs::MetadataExt;
        let work = tempfile::tempdir().expect("work");
        let out = work.path().join("disk.ext4");

        mkfs_ext4_from_dir(work.path(), &out, 64 << 20, "sparse").expect("mkfs");

        let allocated = fs::metadata(&out).expect("stat").blocks() * 512;
        assert!(allocated < 32 << 20, "allocated {allocated} of 64 MiB");
    }

    #[test]
    fn image_when_dir_too_large_then_too_large_and_no_file() {
        let work = tempfile::tempdir().expect("work");
        let src = work.path().join("root");
        fs::create_dir(&src).expect("mkdir");
        fs::write(src.join("big"), vec![7u8; 3 << 20]).expect("write");
        let out = work.path().join("disk.ext4");

        let err = mkfs_ext4_from_dir(&src, &out, 2 << 20, "small").expect_err("too large");

        assert!(matches!(err, DiskError::TooLarge { .. }), "{err}");
        assert!(!out.exists());
    }

    #[test]
    fn image_when_inodes_run_out_then_no_space_and_no_file() {
        let work = tempfile::tempdir().expect("work");
        let src = work.path().join("root");
        fs::create_dir(&src).expect("mkdir");
        for i in 0..1200 {
            fs::write(src.join(format!("f{i}")), "").expect("write");
        }
        let out = work.path().join("disk.ext4");

        let err = mkfs_ext4_from_dir(&src, &out, 2 << 20, "small").expect_err("no inodes");

        assert!(matches!(err, DiskError::NoSpace { .. }), "{err}");
        assert!(!out.exists());
    }

    #[test]
    fn image_when_source_missing_then_not_a_directory() {
        let work = tempfile::tempdir().expect("work");

        let err = mkfs_ext4_from_dir(
            &work.path().join("nope"),
            &work.path().join("disk.ext4"),
            1 << 20,
            "x",
        )
        .expect_err("missing");

        assert!(matches!(err, DiskError::NotADirectory { .. }), "{err}");
    }
}

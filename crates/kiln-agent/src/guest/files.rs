//! The file requests of kiln's sandbox API: stat, list, mkdir, move, remove, and ranged
//! reads and writes, so that a file of any size crosses the agent connection in pieces of at
//! most [`MAX_RANGE_BYTES`] and neither side ever holds it whole.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use crate::proto::{FileKind, FileStat, FsErrorKind, GuestBody, MAX_DIR_ENTRIES, MAX_RANGE_BYTES};

/// Bytes of entries one listing carries at most, well inside a frame.
const MAX_LISTING_BYTES: usize = 8 << 20;

/// A failed file request: its kind and message, ready to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsError {
    /// Why it failed.
    pub kind: FsErrorKind,
    /// What failed, on what, and why.
    pub message: String,
}

impl FsError {
    fn io(what: &str, path: &str, e: &std::io::Error) -> FsError {
        let kind = match e.kind() {
            ErrorKind::NotFound => FsErrorKind::NotFound,
            ErrorKind::AlreadyExists => FsErrorKind::AlreadyExists,
            ErrorKind::PermissionDenied => FsErrorKind::PermissionDenied,
            _ => match e.raw_os_error() {
                Some(libc::ENOTDIR | libc::EISDIR | libc::ENOTEMPTY) => FsErrorKind::WrongKind,
                Some(libc::EXDEV) => FsErrorKind::Invalid,
                _ => FsErrorKind::Other,
            },
        };
        FsError {
            kind,
            message: format!("cannot {what} {path}: {e}"),
        }
    }

    fn invalid(message: String) -> FsError {
        FsError {
            kind: FsErrorKind::Invalid,
            message,
        }
    }

    /// The reply that carries this failure.
    pub fn into_reply(self) -> GuestBody {
        GuestBody::FsFailed {
            kind: self.kind,
            message: self.message,
        }
    }
}

fn absolute(path: &str) -> Result<&Path, FsError> {
    let p = Path::new(path);
    if p.is_absolute() {
        Ok(p)
    } else {
        Err(FsError::invalid(format!(
            "path {path:?} is not absolute (start it with /)"
        )))
    }
}

fn describe(name: String, meta: &fs::Metadata, link_target: Option<String>) -> FileStat {
    let ft = meta.file_type();
    let kind = if ft.is_symlink() {
        FileKind::Symlink
    } else if ft.is_dir() {
        FileKind::Dir
    } else if ft.is_file() {
        FileKind::File
    } else {
        FileKind::Other
    };
    FileStat {
        name,
        kind,
        size: meta.len(),
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        mtime: meta.mtime(),
        link_target,
    }
}

fn name_of(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "/".to_string())
}

fn link_target(path: &Path, meta: &fs::Metadata) -> Option<String> {
    meta.file_type()
        .is_symlink()
        .then(|| fs::read_link(path).ok())
        .flatten()
        .map(|t| t.to_string_lossy().into_owned())
}

/// What `path` is, without following a final symbolic link.
pub fn stat(path: &str) -> Result<FileStat, FsError> {
    let target = absolute(path)?;
    let meta = fs::symlink_metadata(target).map_err(|e| FsError::io("stat", path, &e))?;
    Ok(describe(name_of(target), &meta, link_target(target, &meta)))
}

/// The entries of directory `path`, sorted by name: at most `max_entries` (and
/// [`MAX_DIR_ENTRIES`]), and whether more exist.
pub fn list(path: &str, max_entries: u32) -> Result<(Vec<FileStat>, bool), FsError> {
    let target = absolute(path)?;
    let most = max_entries.clamp(1, MAX_DIR_ENTRIES) as usize;
    let dir = fs::read_dir(target).map_err(|e| FsError::io("list", path, &e))?;
    let mut names = Vec::new();
    let mut truncated = false;
    for entry in dir {
        let entry = entry.map_err(|e| FsError::io("list", path, &e))?;
        // Names are gathered before sorting; stop far past the limit so a huge directory
        // cannot exhaust the guest agent's memory.
        if names.len() >= MAX_DIR_ENTRIES as usize * 4 {
            truncated = true;
            break;
        }
        names.push(entry.file_name());
    }
    names.sort();
    let mut entries = Vec::new();
    let mut bytes = 0usize;
    for name in names {
        if entries.len() >= most || bytes >= MAX_LISTING_BYTES {
            truncated = true;
            break;
        }
        let full = target.join(&name);
        // An entry removed meanwhile is skipped, not an error.
        let Ok(meta) = fs::symlink_metadata(&full) else {
            continue;
        };
        let stat = describe(
            name.to_string_lossy().into_owned(),
            &meta,
            link_target(&full, &meta),
        );
        bytes += 128 + stat.name.len() + stat.link_target.as_ref().map_or(0, String::len);
        entries.push(stat);
    }
    Ok((entries, truncated))
}

fn chown(path: &Path, uid: Option<u32>, gid: Option<u32>, shown: &str) -> Result<(), FsError> {
    if uid.is_none() && gid.is_none() {
        return Ok(());
    }
    std::os::unix::fs::lchown(path, uid, gid)
        .map_err(|e| FsError::io("change the owner of", shown, &e))
}

/// Creates directory `path` (with its parents when `parents`, then accepting one that exists).
pub fn make_dir(
    path: &str,
    parents: bool,
    mode: u32,
    uid: Option<u32>,
    gid: Option<u32>,
) -> Result<(), FsError> {
    let target = absolute(path)?;
    if parents {
        // Create each missing level so every new one gets the mode and owner asked for.
        let mut missing = Vec::new();
        let mut at = Some(target);
        while let Some(p) = at {
            match fs::symlink_metadata(p) {
                Ok(meta) if meta.is_dir() => break,
                Ok(_) => {
                    return Err(FsError {
                        kind: FsErrorKind::WrongKind,
                        message: format!(
                            "cannot create directory {path}: {} exists and is not a directory",
                            p.display()
                        ),
                    })
                }
                Err(_) => missing.push(p),
            }
            at = p.parent();
        }
        for p in missing.into_iter().rev() {
            match fs::DirBuilder::new().mode(mode).create(p) {
                Ok(()) => chown(p, uid, gid, path)?,
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                Err(e) => return Err(FsError::io("create directory", path, &e)),
            }
        }
        return Ok(());
    }
    fs::DirBuilder::new()
        .mode(mode)
        .create(target)
        .map_err(|e| FsError::io("create directory", path, &e))?;
    chown(target, uid, gid, path)
}

/// Renames `from` to `to`.
pub fn move_path(from: &str, to: &str) -> Result<(), FsError> {
    let (source, dest) = (absolute(from)?, absolute(to)?);
    fs::rename(source, dest).map_err(|e| FsError::io("move", &format!("{from} to {to}"), &e))
}

/// Removes `path` and, for a directory, everything under it; symbolic links are removed,
/// never followed.
pub fn remove_tree(path: &str) -> Result<(), FsError> {
    let target = absolute(path)?;
    if target.parent().is_none() {
        return Err(FsError::invalid("refusing to remove / itself".into()));
    }
    let meta = fs::symlink_metadata(target).map_err(|e| FsError::io("remove", path, &e))?;
    let result = if meta.is_dir() {
        fs::remove_dir_all(target)
    } else {
        fs::remove_file(target)
    };
    result.map_err(|e| FsError::io("remove", path, &e))
}

/// Up to `len` bytes of regular file `path` from `offset`, and whether the file ends there.
pub fn read_range(path: &str, offset: u64, len: u32) -> Result<(Vec<u8>, bool), FsError> {
    let target = absolute(path)?;
    let len = len as usize;
    if len > MAX_RANGE_BYTES {
        return Err(FsError::invalid(format!(
            "cannot read {len} bytes of {path} at once: at most {MAX_RANGE_BYTES}"
        )));
    }
    // O_NOFOLLOW-free on purpose: reading through a link is what a user asks for; but never
    // block on a FIFO or a device.
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(target)
        .map_err(|e| FsError::io("read", path, &e))?;
    let meta = file.metadata().map_err(|e| FsError::io("read", path, &e))?;
    if meta.is_dir() {
        return Err(FsError {
            kind: FsErrorKind::WrongKind,
            message: format!("cannot read {path}: it is a directory (list it instead)"),
        });
    }
    if !meta.is_file() {
        return Err(FsError {
            kind: FsErrorKind::WrongKind,
            message: format!("cannot read {path}: it is not a regular file"),
        });
    }
    file.seek(SeekFrom::Start(offset))
        .map_err(|e| FsError::io("read", path, &e))?;
    let mut data = Vec::with_capacity(len.min(meta.len().saturating_sub(offset) as usize));
    // One byte more than asked tells whether the file goes on.
    let got = Read::by_ref(&mut file)
        .take(len as u64 + 1)
        .read_to_end(&mut data)
        .map_err(|e| FsError::io("read", path, &e))?;
    let eof = got <= len;
    data.truncate(len);
    Ok((data, eof))
}

/// How [`write_range`] opens its file.
#[derive(Debug, Clone, Copy)]
pub struct WriteMode {
    /// Create (or empty) the file, making missing parents.
    pub create: bool,
    /// Permission bits of a created file.
    pub mode: u32,
    /// Owner of what is created.
    pub uid: Option<u32>,
    /// Group of what is created.
    pub gid: Option<u32>,
}

/// Writes `data` at `offset` of regular file `path`.
pub fn write_range(path: &str, offset: u64, data: &[u8], how: WriteMode) -> Result<(), FsError> {
    let target = absolute(path)?;
    if data.len() > MAX_RANGE_BYTES {
        return Err(FsError::invalid(format!(
            "cannot write {} bytes of {path} at once: at most {MAX_RANGE_BYTES}",
            data.len()
        )));
    }
    let mut options = OpenOptions::new();
    options.write(true).custom_flags(libc::O_NONBLOCK);
    if how.create {
        if let Some(parent) = target.parent() {
            let parent_text = parent.to_string_lossy();
            make_dir(&parent_text, true, 0o755, how.uid, how.gid)?;
        }
        options.create(true).truncate(true).mode(how.mode);
    }
    let mut file: File = options
        .open(target)
        .map_err(|e| FsError::io("write", path, &e))?;
    let meta = file
        .metadata()
        .map_err(|e| FsError::io("write", path, &e))?;
    if !meta.is_file() {
        return Err(FsError {
            kind: FsErrorKind::WrongKind,
            message: format!("cannot write {path}: it is not a regular file"),
        });
    }
    if how.create {
        // The mode given to open(2) is masked by the umask; set it exactly.
        let _ = file.set_permissions(fs::Permissions::from_mode(how.mode & 0o7777));
        chown(target, how.uid, how.gid, path)?;
    }
    file.seek(SeekFrom::Start(offset))
        .map_err(|e| FsError::io("write", path, &e))?;
    file.write_all(data)
        .map_err(|e| FsError::io("write", path, &e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(p: &Path) -> String {
        p.to_str().expect("utf-8 path").to_string()
    }

    #[test]
    fn write_range_when_pieces_written_in_order_then_read_range_gives_them_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = text(&dir.path().join("a/b/data.bin"));
        let how = WriteMode {
            create: true,
            mode: 0o640,
            uid: None,
            gid: None,
        };

        write_range(&file, 0, b"hello ", how).expect("first piece");
        write_range(
            &file,
            6,
            b"world",
            WriteMode {
                create: false,
                ..how
            },
        )
        .expect("second");
        let (first, first_eof) = read_range(&file, 0, 6).expect("read");
        let (rest, rest_eof) = read_range(&file, 6, 100).expect("read");

        assert_eq!((first.as_slice(), first_eof), (&b"hello "[..], false));
        assert_eq!((rest.as_slice(), rest_eof), (&b"world"[..], true));
        assert_eq!(stat(&file).expect("stat").mode, 0o640);
    }

    #[test]
    fn list_when_directory_has_entries_then_sorted_with_kinds() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join("b.txt"), b"12345").expect("write");
        fs::create_dir(dir.path().join("a")).expect("mkdir");
        std::os::unix::fs::symlink("b.txt", dir.path().join("c")).expect("symlink");

        let (entries, truncated) = list(&text(dir.path()), 100).expect("list");

        let seen: Vec<_> = entries
            .iter()
            .map(|e| (e.name.as_str(), e.kind, e.link_target.as_deref()))
            .collect();
        assert_eq!(
            seen,
            [
                ("a", FileKind::Dir, None),
                ("b.txt", FileKind::File, None),
                ("c", FileKind::Symlink, Some("b.txt")),
            ]
        );
        assert!(!truncated);
    }

    #[test]
    fn list_when_more_entries_than_asked_then_truncated() {
        let dir = tempfile::tempdir().expect("tempdir");
        for i in 0..5 {
            fs::write(dir.path().join(format!("f{i}")), b"").expect("write");
        }

        let (entries, truncated) = list(&text(dir.path()), 2).expect("list");

        assert_eq!(entries.len(), 2);
        assert!(truncated);
    }

    #[test]
    fn stat_when_missing_then_not_found_kind() {
        let dir = tempfile::tempdir().expect("tempdir");

        let err = stat(&text(&dir.path().join("nope"))).expect_err("missing");

        assert_eq!(err.kind, FsErrorKind::NotFound);
    }

    #[test]
    fn make_dir_move_and_remove_tree_when_chained_then_tree_gone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let deep = text(&dir.path().join("x/y/z"));
        let moved = text(&dir.path().join("w"));

        make_dir(&deep, true, 0o750, None, None).expect("mkdir -p");
        make_dir(&deep, true, 0o750, None, None).expect("mkdir -p again");
        let again = make_dir(&deep, false, 0o750, None, None).expect_err("exists");
        move_path(&text(&dir.path().join("x")), &moved).expect("move");
        remove_tree(&moved).expect("rm -r");

        assert_eq!(again.kind, FsErrorKind::AlreadyExists);
        assert_eq!(
            stat(&moved).expect_err("removed").kind,
            FsErrorKind::NotFound
        );
    }

    #[test]
    fn relative_path_when_given_then_invalid() {
        let err = read_range("etc/passwd", 0, 10).expect_err("relative");

        assert_eq!(err.kind, FsErrorKind::Invalid);
    }

    #[test]
    fn read_range_when_directory_then_wrong_kind() {
        let dir = tempfile::tempdir().expect("tempdir");

        let err = read_range(&text(dir.path()), 0, 10).expect_err("dir");

        assert_eq!(err.kind, FsErrorKind::WrongKind);
    }
}

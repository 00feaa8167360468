//! Docker `ADD` of a local tar: plain, gzip, bzip2 or xz, detected from the content.
//!
//! Every entry is written inside `dest`. Paths are resolved component by component,
//! following symlinks already on disk (`bin -> usr/bin` is common) but only while they
//! stay inside `dest`: an entry that is absolute, climbs with `..`, or passes through a
//! symlink pointing outside `dest` is refused, as are device nodes.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};
use std::thread::JoinHandle;

use tar::EntryType;

use super::copy::CopyStats;
use super::meta::{self, Owner};

/// Symlinks followed while resolving one path before giving up (as the kernel's ELOOP).
const MAX_LINKS: usize = 40;

/// Unpacks the tar at `src` into `dest`, owned by `uid`/`gid` when given, else by the
/// owners recorded in the archive.
pub fn extract(
    src: &str,
    dest: &str,
    uid: Option<u32>,
    gid: Option<u32>,
) -> Result<CopyStats, String> {
    let src_path = absolute(src)?;
    let dest_path = absolute(dest)?;
    let file = File::open(src_path).map_err(|e| format!("cannot open archive {src}: {e}"))?;
    meta::create_dirs(dest_path, Owner { uid: 0, gid: 0 })
        .map_err(|e| format!("cannot extract {src}: {e}"))?;
    let root = fs::canonicalize(dest_path).map_err(|e| format!("cannot resolve {dest}: {e}"))?;
    let (reader, decoder) = decompressed(file).map_err(|e| format!("cannot extract {src}: {e}"))?;
    let mut unpacker = Unpacker {
        root,
        dest,
        uid,
        gid,
        stats: CopyStats::default(),
        dir_times: Vec::new(),
    };
    let mut archive = tar::Archive::new(reader);
    let result = unpacker.unpack_all(&mut archive);
    let mut reader = archive.into_inner();
    // Reading to the end lets the xz thread finish and verify its checksum.
    let drained = match result {
        Ok(()) => io::copy(&mut reader, &mut io::sink()).map(drop),
        Err(_) => Ok(()),
    };
    drop(reader);
    let decoded = decoder.map_or(Ok(()), |thread| {
        thread
            .join()
            .unwrap_or_else(|_| Err("the xz decoder panicked".into()))
    });
    result.map_err(|e| format!("cannot extract {src}: {e}"))?;
    drained.map_err(|e| format!("cannot extract {src}: {e}"))?;
    decoded.map_err(|e| format!("cannot extract {src}: {e}"))?;
    for (path, secs) in unpacker.dir_times.iter().rev() {
        let _ = meta::set_mtime(path, *secs, 0);
    }
    Ok(unpacker.stats)
}

type Decoder = Option<JoinHandle<Result<(), String>>>;

/// A reader of the archive's tar stream, whatever its compression.
fn decompressed(file: File) -> Result<(Box<dyn Read + Send>, Decoder), String> {
    let mut input = BufReader::with_capacity(256 * 1024, file);
    let head = input.fill_buf().map_err(|e| e.to_string())?.to_vec();
    if head.starts_with(&[0x1f, 0x8b]) {
        return Ok((Box::new(flate2::read::MultiGzDecoder::new(input)), None));
    }
    if head.starts_with(b"BZh") {
        return Ok((Box::new(bzip2::read::MultiBzDecoder::new(input)), None));
    }
    if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        // lzma-rs decodes into a writer: run it on a thread feeding a pipe.
        let (reader, writer) =
            nix::unistd::pipe().map_err(|e| format!("cannot create a pipe: {e}"))?;
        let (reader, mut writer) = (File::from(reader), File::from(writer));
        let thread = std::thread::Builder::new()
            .name("xz".into())
            .spawn(move || {
                lzma_rs::xz_decompress(&mut input, &mut writer)
                    .map_err(|e| format!("xz data is corrupt: {e}"))
            })
            .map_err(|e| format!("cannot start the xz decoder: {e}"))?;
        return Ok((Box::new(reader), Some(thread)));
    }
    if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        return Err("zstd-compressed archives are not supported (use gzip, bzip2 or xz)".into());
    }
    Ok((Box::new(input), None))
}

struct Unpacker<'a> {
    /// `dest`, canonicalized.
    root: PathBuf,
    /// `dest` as given, for messages.
    dest: &'a str,
    uid: Option<u32>,
    gid: Option<u32>,
    stats: CopyStats,
    /// Directories' mtimes, set last: writing into a directory changes its mtime.
    dir_times: Vec<(PathBuf, i64)>,
}

impl Unpacker<'_> {
    fn unpack_all<R: Read>(&mut self, archive: &mut tar::Archive<R>) -> Result<(), String> {
        let entries = archive
            .entries()
            .map_err(|e| format!("not a tar archive: {e}"))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| format!("not a valid tar archive: {e}"))?;
            self.unpack(&mut entry)?;
        }
        Ok(())
    }

    fn unpack<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), String> {
        let kind = entry.header().entry_type();
        let metadata_only = [
            EntryType::XGlobalHeader,
            EntryType::XHeader,
            EntryType::GNULongName,
            EntryType::GNULongLink,
        ];
        if metadata_only.contains(&kind) {
            return Ok(());
        }
        let name = entry
            .path()
            .map_err(|e| format!("entry with an unreadable path: {e}"))?
            .into_owned();
        let shown = name.display().to_string();
        let rel = self.inside(&name, &shown)?;
        if matches!(kind, EntryType::Char | EntryType::Block) {
            return Err(format!("refusing device node {shown:?}"));
        }
        if rel.as_os_str().is_empty() {
            // The archive's own root (`./`): dest itself, which already exists.
            return Ok(());
        }
        let header = entry.header();
        let mode = header.mode().map_err(|e| format!("entry {shown:?}: {e}"))?;
        let owner = Owner {
            uid: match self.uid {
                Some(uid) => uid,
                None => header_id(header.uid(), &shown)?,
            },
            gid: match self.gid {
                Some(gid) => gid,
                None => header_id(header.gid(), &shown)?,
            },
        };
        let mtime = header.mtime().unwrap_or(0).min(i64::MAX as u64) as i64;

        if kind.is_dir() {
            let target = self.resolve(&rel, true, &shown)?;
            match fs::symlink_metadata(&target) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    remove_file(&target)?;
                    make_dir(&target)?;
                }
                Err(_) => {
                    meta::create_dirs(&target, Owner { uid: 0, gid: 0 })?;
                }
            }
            meta::apply(&target, owner, Some(mode))
                .map_err(|e| format!("cannot set owner and mode of {}: {e}", target.display()))?;
            self.dir_times.push((target, mtime));
            self.stats.entries += 1;
            return Ok(());
        }

        let target = self.resolve(&rel, false, &shown)?;
        if let Some(parent) = target.parent() {
            meta::create_dirs(parent, Owner { uid: 0, gid: 0 })?;
        }
        match fs::symlink_metadata(&target) {
            Ok(m) if m.is_dir() => {
                return Err(format!(
                    "entry {shown:?} would replace the directory {}",
                    target.display()
                ))
            }
            Ok(_) => remove_file(&target)?,
            Err(_) => {}
        }
        match kind {
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                let mut file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&target)
                    .map_err(|e| format!("cannot create {}: {e}", target.display()))?;
                self.stats.bytes += io::copy(entry, &mut file)
                    .map_err(|e| format!("cannot write {}: {e}", target.display()))?;
            }
            EntryType::Symlink => {
                let link = link_name(entry, &shown)?;
                std::os::unix::fs::symlink(&link, &target)
                    .map_err(|e| format!("cannot create symlink {}: {e}", target.display()))?;
            }
            EntryType::Link => {
                let link = link_name(entry, &shown)?;
                let link_rel = self.inside(&link, &shown)?;
                let existing = self.resolve(&link_rel, false, &shown)?;
                fs::hard_link(&existing, &target).map_err(|e| {
                    format!(
                        "cannot link {} to {}: {e}",
                        target.display(),
                        existing.display()
                    )
                })?;
            }
            EntryType::Fifo => {
                let perm = nix::sys::stat::Mode::from_bits_truncate(0o600);
                nix::unistd::mkfifo(&target, perm)
                    .map_err(|e| format!("cannot create fifo {}: {e}", target.display()))?;
            }
            other => return Err(format!("entry {shown:?} has unsupported type {other:?}")),
        }
        let is_symlink = matches!(kind, EntryType::Symlink);
        meta::apply(&target, owner, (!is_symlink).then_some(mode))
            .map_err(|e| format!("cannot set owner and mode of {}: {e}", target.display()))?;
        let _ = meta::set_mtime(&target, mtime, 0);
        self.stats.entries += 1;
        Ok(())
    }

    /// `name` as a relative path without `.`; refuses absolute names and `..`.
    fn inside(&self, name: &Path, shown: &str) -> Result<PathBuf, String> {
        let mut rel = PathBuf::new();
        for part in name.components() {
            match part {
                Component::Normal(n) => rel.push(n),
                Component::CurDir => {}
                Component::RootDir | Component::Prefix(_) => {
                    return Err(format!(
                        "refusing entry {shown:?}: absolute paths would land outside {}",
                        self.dest
                    ))
                }
                Component::ParentDir => {
                    return Err(format!(
                        "refusing entry {shown:?}: `..` would climb out of {}",
                        self.dest
                    ))
                }
            }
        }
        Ok(rel)
    }

    /// Where `rel` lands under the root, following symlinks on disk while they stay
    /// inside; the last component is followed only when `follow_last`.
    fn resolve(&self, rel: &Path, follow_last: bool, shown: &str) -> Result<PathBuf, String> {
        let mut resolved = PathBuf::new();
        let mut pending: VecDeque<Part> = rel
            .components()
            .filter_map(|c| match c {
                Component::Normal(n) => Some(Part::Name(n.to_os_string())),
                _ => None,
            })
            .collect();
        let mut links = 0;
        while let Some(part) = pending.pop_front() {
            let name = match part {
                Part::Up => {
                    if !resolved.pop() {
                        return Err(self.escape(shown));
                    }
                    continue;
                }
                Part::Name(name) => name,
            };
            let candidate = self.root.join(&resolved).join(&name);
            let is_last = pending.is_empty();
            let is_link = fs::symlink_metadata(&candidate)
                .map(|m| m.file_type().is_symlink())
                .unwrap_or(false);
            if !is_link || (is_last && !follow_last) {
                resolved.push(name);
                continue;
            }
            links += 1;
            if links > MAX_LINKS {
                return Err(format!(
                    "entry {shown:?}: too many levels of symbolic links"
                ));
            }
            let target = fs::read_link(&candidate)
                .map_err(|e| format!("cannot read symlink {}: {e}", candidate.display()))?;
            let target = if target.is_absolute() {
                // An absolute link means the same place seen from the root only if it lies under it.
                resolved.clear();
                target
                    .strip_prefix(&self.root)
                    .map_err(|_| self.escape(shown))?
                    .to_path_buf()
            } else {
                target
            };
            for part in target.components().rev() {
                match part {
                    Component::Normal(n) => pending.push_front(Part::Name(n.to_os_string())),
                    Component::ParentDir => pending.push_front(Part::Up),
                    _ => {}
                }
            }
        }
        Ok(self.root.join(resolved))
    }

    fn escape(&self, shown: &str) -> String {
        format!(
            "refusing entry {shown:?}: it passes through a symlink that points outside {}",
            self.dest
        )
    }
}

enum Part {
    Up,
    Name(OsString),
}

fn header_id(id: io::Result<u64>, shown: &str) -> Result<u32, String> {
    id.ok()
        .and_then(|id| u32::try_from(id).ok())
        .ok_or_else(|| format!("entry {shown:?} has an invalid owner id"))
}

fn link_name<R: Read>(entry: &tar::Entry<'_, R>, shown: &str) -> Result<PathBuf, String> {
    entry
        .link_name()
        .map_err(|e| format!("entry {shown:?}: unreadable link target: {e}"))?
        .map(|l| l.into_owned())
        .ok_or_else(|| format!("entry {shown:?} is a link without a target"))
}

fn make_dir(path: &Path) -> Result<(), String> {
    fs::create_dir(path).map_err(|e| format!("cannot create directory {}: {e}", path.display()))
}

fn remove_file(path: &Path) -> Result<(), String> {
    fs::remove_file(path).map_err(|e| format!("cannot replace {}: {e}", path.display()))
}

fn absolute(path: &str) -> Result<&Path, String> {
    let p = Path::new(path);
    if p.is_absolute() {
        Ok(p)
    } else {
        Err(format!("path {path:?} is not absolute"))
    }
}

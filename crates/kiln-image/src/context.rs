//! Build contexts: an uploaded zip unpacked into a directory, and a directory packed into one.
//!
//! The zip is hostile input. Every entry name must be a plain relative path; symbolic links
//! must resolve inside the context; sizes are counted as bytes are written, never taken from
//! the headers; nothing is written through a symbolic link (files are created with
//! `O_NOFOLLOW | O_EXCL`, parents are checked, and links are created only after every file).
//! Extraction happens in a staging directory beside the destination, renamed into place at
//! the end, so a failure leaves nothing at the destination.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use zip::result::ZipError;
use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, ZipArchive, ZipWriter};

use crate::dockerignore::{DockerIgnore, IgnoreError};

/// The name the Dockerfile must have at the context root.
pub const DOCKERFILE: &str = "Dockerfile";

/// The name of the ignore file at the context root.
pub const DOCKERIGNORE: &str = ".dockerignore";

/// Most root entries listed when the Dockerfile is missing.
const ROOT_LISTING_MAX: usize = 20;

/// Longest symbolic link target accepted.
const MAX_LINK_TARGET: u64 = 4096;

/// Most symbolic links followed while resolving one link (as Linux's `MAXSYMLINKS`).
const MAX_LINK_HOPS: u32 = 40;

/// Most path bytes looked up while checking all links of one zip: bounds the work a
/// zip of many long, chained links can cause.
const LINK_CHECK_BUDGET: u64 = 64 << 20;

/// Unix file-type bits of a zip entry's mode.
const S_IFMT: u32 = 0o170_000;
const S_IFREG: u32 = 0o100_000;
const S_IFDIR: u32 = 0o040_000;
const S_IFLNK: u32 = 0o120_000;

/// Bounds on what an uploaded zip may expand to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContextLimits {
    /// Most entries (files, directories, links) in the zip.
    pub max_entries: u64,
    /// Most bytes all extracted files may hold together.
    pub max_total_bytes: u64,
    /// Highest uncompressed:compressed ratio of an entry once it exceeds `ratio_after_bytes`.
    pub max_ratio: u64,
    /// Size past which an entry's compression ratio is checked.
    pub ratio_after_bytes: u64,
    /// Largest `Dockerfile` (and `.dockerignore`) accepted.
    pub max_dockerfile_bytes: u64,
}

impl Default for ContextLimits {
    fn default() -> Self {
        Self {
            max_entries: 50_000,
            max_total_bytes: 1 << 30,
            max_ratio: 200,
            ratio_after_bytes: 1 << 20,
            max_dockerfile_bytes: 1 << 20,
        }
    }
}

/// An unpacked build context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildContext {
    /// The directory holding the context's files.
    pub dir: PathBuf,
    /// The Dockerfile's text (available even when `.dockerignore` leaves the file out).
    pub dockerfile: String,
    /// Regular files extracted.
    pub files: u64,
    /// Bytes extracted.
    pub bytes: u64,
}

/// What [`zip_dir`] put into a zip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZipStats {
    /// Regular files stored.
    pub files: u64,
    /// Directories and symbolic links stored.
    pub other_entries: u64,
    /// Uncompressed bytes of the files.
    pub bytes: u64,
    /// Size of the zip written.
    pub zip_bytes: u64,
}

/// Failures while unpacking or packing a build context.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    /// The zip cannot be read as a zip archive.
    #[error("{path} is not a readable zip archive ({source}): upload a zip of the build context")]
    NotAZip {
        /// The zip.
        path: PathBuf,
        /// What the zip reader said.
        #[source]
        source: ZipError,
    },
    /// An entry could not be read (corrupt data, bad checksum, unsupported compression).
    #[error(
        "cannot read zip entry {name:?} ({source}): re-create the zip (deflate or store only)"
    )]
    Entry {
        /// The entry's name.
        name: String,
        /// What the zip reader said.
        #[source]
        source: ZipError,
    },
    /// An entry's name is not a plain relative path inside the context.
    #[error(
        "zip entry {name:?} is rejected: {reason}; zip the context with paths relative to its root"
    )]
    UnsafeName {
        /// The entry's name as stored.
        name: String,
        /// Why it is rejected.
        reason: &'static str,
    },
    /// A symbolic link points outside the context (or cannot be resolved).
    #[error("zip entry {name:?} is a symbolic link to {target:?}, which {reason}: only relative links that stay inside the context are allowed")]
    LinkEscapes {
        /// The link's path.
        name: String,
        /// Its target.
        target: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The entry is a device, fifo or socket.
    #[error("zip entry {name:?} has file type {mode:#o}: only files, directories and symbolic links are allowed")]
    SpecialFile {
        /// The entry's name.
        name: String,
        /// Its unix mode.
        mode: u32,
    },
    /// The entry is encrypted.
    #[error("zip entry {name:?} is encrypted: upload an unencrypted zip")]
    Encrypted {
        /// The entry's name.
        name: String,
    },
    /// More entries than the limit.
    #[error("the zip holds {count} entries, more than the limit of {max}: add a .dockerignore or shrink the context")]
    TooManyEntries {
        /// Entries the zip declares.
        count: u64,
        /// The limit.
        max: u64,
    },
    /// The files expand to more than the limit.
    #[error("the zip expands to more than {max} bytes (stopped in entry {name:?}): shrink the context or add a .dockerignore")]
    TooLarge {
        /// The entry being written when the limit was reached.
        name: String,
        /// The limit.
        max: u64,
    },
    /// An entry is compressed suspiciously well (a zip bomb).
    #[error("zip entry {name:?} expands more than {max_ratio}:1 from {compressed} compressed bytes: refusing a likely zip bomb; store such files uncompressed")]
    Ratio {
        /// The entry.
        name: String,
        /// Its compressed size.
        compressed: u64,
        /// The ratio limit.
        max_ratio: u64,
    },
    /// The same path appears twice.
    #[error("zip entry {name:?} appears more than once: re-create the zip")]
    Duplicate {
        /// The path.
        name: String,
    },
    /// The central directory holds entries with the same name (which readers silently merge).
    #[error("the zip declares {declared} entries but only {distinct} distinct names: some entry appears more than once; re-create the zip")]
    DuplicateNames {
        /// Entries the zip declares.
        declared: u64,
        /// Distinct names.
        distinct: u64,
    },
    /// A path is used both as a file (or link) and as a directory.
    #[error("zip entry {name:?} needs {parent:?} to be a directory, but the zip has it as a file or link: re-create the zip")]
    Conflict {
        /// The entry below.
        name: String,
        /// The path that is not a directory.
        parent: String,
    },
    /// No `Dockerfile` at the root.
    #[error("the build context has no `Dockerfile` at its root (the name is case-sensitive; zip the directory's contents, not the directory); at the root: {}", list_root(.root, *.more))]
    NoDockerfile {
        /// Names at the root (up to 20).
        root: Vec<String>,
        /// How many more there are.
        more: usize,
    },
    /// `Dockerfile` is there but is not a regular file.
    #[error("`{name}` at the context root must be a regular file, not a directory or link")]
    NotARegularFile {
        /// The file.
        name: &'static str,
    },
    /// The Dockerfile (or `.dockerignore`) is larger than the limit.
    #[error("`{name}` is larger than {max} bytes: shorten it")]
    ControlFileTooLarge {
        /// The file.
        name: &'static str,
        /// The limit.
        max: u64,
    },
    /// The Dockerfile (or `.dockerignore`) is not UTF-8.
    #[error("`{name}` is not valid UTF-8 at byte offset {offset}: save it as UTF-8")]
    NotUtf8 {
        /// The file.
        name: &'static str,
        /// Offset of the first invalid byte.
        offset: usize,
    },
    /// `.dockerignore` has a bad pattern.
    #[error(transparent)]
    DockerIgnore(#[from] IgnoreError),
    /// The destination exists already.
    #[error(
        "cannot unpack the build context into {path}: it exists already; choose a new directory"
    )]
    DestExists {
        /// The destination.
        path: PathBuf,
    },
    /// A directory to zip holds a device, fifo or socket.
    #[error("cannot put {path} into the zip: only files, directories and symbolic links can be; add it to .dockerignore")]
    Unzippable {
        /// The file.
        path: PathBuf,
    },
    /// A directory to zip holds a symbolic link that leads outside it.
    #[error("{path} is a symbolic link to {target:?}, which {reason}: a build context may only hold relative links that stay inside it; copy the file in instead, or add the link to .dockerignore")]
    DirLinkEscapes {
        /// The link.
        path: PathBuf,
        /// Its target.
        target: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Writing the zip failed.
    #[error("cannot write zip {path}: {source}")]
    ZipWrite {
        /// The zip being written.
        path: PathBuf,
        /// What the zip writer said.
        #[source]
        source: ZipError,
    },
    /// A filesystem operation failed.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

fn list_root(root: &[String], more: usize) -> String {
    if root.is_empty() {
        return "nothing".into();
    }
    let mut text = root.join(", ");
    if more > 0 {
        text.push_str(&format!(" and {more} more"));
    }
    text
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ContextError {
    let path = path.to_path_buf();
    move |source| ContextError::Io {
        action,
        path,
        source,
    }
}

/// What an entry is, after its name and mode have been checked.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    File { executable: bool },
    Dir,
    Link { target: String },
}

/// One checked entry of the zip.
#[derive(Debug)]
struct Entry {
    index: usize,
    /// The name as stored, for messages.
    name: String,
    /// The cleaned relative path (`/`-separated, no `.` or empty components).
    path: String,
    kind: Kind,
}

/// Unpacks the build context in `zip` into `dest` (which must not exist), within `limits`.
pub fn extract_zip(
    zip: &Path,
    dest: &Path,
    limits: &ContextLimits,
) -> Result<BuildContext, ContextError> {
    if dest.symlink_metadata().is_ok() {
        return Err(ContextError::DestExists { path: dest.into() });
    }
    let mut file = File::open(zip).map_err(io_err("open", zip))?;
    let declared = declared_entries(&mut file).map_err(io_err("read", zip))?;
    if let Some(count) = declared.filter(|count| *count > limits.max_entries) {
        return Err(ContextError::TooManyEntries {
            count,
            max: limits.max_entries,
        });
    }
    let mut archive =
        ZipArchive::new(BufReader::new(file)).map_err(|source| ContextError::NotAZip {
            path: zip.into(),
            source,
        })?;
    let distinct = archive.len() as u64;
    if distinct > limits.max_entries {
        return Err(ContextError::TooManyEntries {
            count: distinct,
            max: limits.max_entries,
        });
    }
    if let Some(declared) = declared.filter(|d| *d != distinct) {
        return Err(ContextError::DuplicateNames { declared, distinct });
    }
    let entries = check_entries(&mut archive)?;
    let dockerfile_text = read_control_file(&mut archive, &entries, DOCKERFILE, limits)?
        .ok_or_else(|| no_dockerfile(&entries))?;
    let ignore = match read_control_file(&mut archive, &entries, DOCKERIGNORE, limits)? {
        Some(text) => DockerIgnore::parse(&text)?,
        None => DockerIgnore::default(),
    };
    let kept: Vec<&Entry> = entries
        .iter()
        .filter(|e| !ignore.is_ignored(&e.path, e.kind == Kind::Dir))
        .collect();
    check_links(&kept)?;

    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent).map_err(io_err("create directory", &parent))?;
    let staging = tempfile::Builder::new()
        .prefix(".kiln-context-")
        .tempdir_in(&parent)
        .map_err(io_err("create a staging directory in", &parent))?;
    let root = staging.path();
    fs::set_permissions(root, fs::Permissions::from_mode(0o755)).map_err(io_err("chmod", root))?;
    let mut written = Written::default();
    // Links last: while files are written no link exists that a path could pass through.
    for entry in kept.iter().filter(|e| !matches!(e.kind, Kind::Link { .. })) {
        write_entry(&mut archive, entry, root, limits, &mut written)?;
    }
    for entry in kept.iter().filter(|e| matches!(e.kind, Kind::Link { .. })) {
        write_entry(&mut archive, entry, root, limits, &mut written)?;
    }
    fs::rename(root, dest).map_err(io_err("move the unpacked context to", dest))?;
    let _ = staging.keep();
    Ok(BuildContext {
        dir: dest.into(),
        dockerfile: dockerfile_text,
        files: written.files,
        bytes: written.bytes,
    })
}

/// The entry count the end-of-central-directory record declares (zip64 included), or `None`
/// when there is no such record (the zip reader then reports the damage).
fn declared_entries(file: &mut File) -> io::Result<Option<u64>> {
    const EOCD: [u8; 4] = [0x50, 0x4b, 0x05, 0x06];
    const ZIP64_LOCATOR: [u8; 4] = [0x50, 0x4b, 0x06, 0x07];
    const ZIP64_EOCD: [u8; 4] = [0x50, 0x4b, 0x06, 0x06];
    let len = file.metadata()?.len();
    let tail_len = len.min(22 + 0xffff + 20);
    file.seek(SeekFrom::Start(len - tail_len))?;
    let mut tail = vec![0u8; tail_len as usize];
    file.read_exact(&mut tail)?;
    let Some(at) = (0..tail.len().saturating_sub(21))
        .rev()
        .find(|&i| tail[i..i + 4] == EOCD)
    else {
        return Ok(None);
    };
    let total = u64::from(u16::from_le_bytes([tail[at + 10], tail[at + 11]]));
    if total != 0xffff || at < 20 || tail[at - 20..at - 16] != ZIP64_LOCATOR {
        return Ok(Some(total));
    }
    let mut offset = [0u8; 8];
    offset.copy_from_slice(&tail[at - 12..at - 4]);
    let mut record = [0u8; 56];
    file.seek(SeekFrom::Start(u64::from_le_bytes(offset)))?;
    if file.read_exact(&mut record).is_err() || record[..4] != ZIP64_EOCD {
        return Ok(None);
    }
    let mut total = [0u8; 8];
    total.copy_from_slice(&record[32..40]);
    Ok(Some(u64::from_le_bytes(total)))
}

/// Checks every entry's name, type, uniqueness and parent directories.
fn check_entries<R: Read + Seek>(archive: &mut ZipArchive<R>) -> Result<Vec<Entry>, ContextError> {
    let mut entries = Vec::with_capacity(archive.len());
    let mut kinds: HashMap<String, bool> = HashMap::new();
    for index in 0..archive.len() {
        let stored_name = archive.name_for_index(index).unwrap_or("?").to_string();
        let file = archive
            .by_index_raw(index)
            .map_err(|source| ContextError::Entry {
                name: stored_name,
                source,
            })?;
        let name = file.name().to_string();
        if file.encrypted() {
            return Err(ContextError::Encrypted { name });
        }
        let path = clean_name(&name)?;
        let mode = file.unix_mode().unwrap_or(0);
        let kind = match mode & S_IFMT {
            S_IFLNK => Kind::Link {
                target: String::new(),
            },
            S_IFDIR => Kind::Dir,
            0 | S_IFREG if name.ends_with('/') => Kind::Dir,
            0 | S_IFREG => Kind::File {
                executable: mode & 0o111 != 0,
            },
            _ => return Err(ContextError::SpecialFile { name, mode }),
        };
        if kinds.insert(path.clone(), kind == Kind::Dir).is_some() {
            return Err(ContextError::Duplicate { name });
        }
        entries.push(Entry {
            index,
            name,
            path,
            kind,
        });
    }
    for entry in entries.iter_mut() {
        if let Kind::Link { target } = &mut entry.kind {
            *target = read_link_target(archive, entry.index, &entry.name)?;
        }
    }
    for entry in &entries {
        let mut parent = entry.path.as_str();
        while let Some((up, _)) = parent.rsplit_once('/') {
            parent = up;
            if kinds.get(parent) == Some(&false) {
                return Err(ContextError::Conflict {
                    name: entry.name.clone(),
                    parent: parent.into(),
                });
            }
        }
    }
    Ok(entries)
}

/// A link's target: the entry's content, decompressed, at most [`MAX_LINK_TARGET`] bytes.
fn read_link_target<R: Read + Seek>(
    archive: &mut ZipArchive<R>,
    index: usize,
    name: &str,
) -> Result<String, ContextError> {
    let read_err = |source| ContextError::Entry {
        name: name.into(),
        source,
    };
    let file = archive.by_index(index).map_err(read_err)?;
    let mut raw = Vec::new();
    file.take(MAX_LINK_TARGET + 1)
        .read_to_end(&mut raw)
        .map_err(|e| read_err(ZipError::Io(e)))?;
    let bad = |reason| ContextError::LinkEscapes {
        name: name.into(),
        target: String::from_utf8_lossy(&raw).into_owned(),
        reason,
    };
    if raw.len() as u64 > MAX_LINK_TARGET {
        return Err(bad("is too long"));
    }
    if raw.is_empty() || raw.contains(&0) {
        return Err(bad("is empty or holds a NUL byte"));
    }
    String::from_utf8(raw.clone()).map_err(|_| bad("is not UTF-8"))
}

/// The entry name as a clean relative path, or why it is rejected.
fn clean_name(name: &str) -> Result<String, ContextError> {
    let reject = |reason| ContextError::UnsafeName {
        name: name.into(),
        reason,
    };
    if name.contains('\0') {
        return Err(reject("it holds a NUL byte"));
    }
    if name.contains('\\') {
        return Err(reject(
            "it holds a backslash (Windows separators are not accepted)",
        ));
    }
    if name.starts_with('/') {
        return Err(reject("it is an absolute path"));
    }
    let bytes = name.as_bytes();
    if bytes.len() >= 2 && bytes[0].is_ascii_alphabetic() && bytes[1] == b':' {
        return Err(reject("it starts with a drive letter"));
    }
    let mut parts = Vec::new();
    for part in name.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err(reject("it has a `..` component")),
            other => parts.push(other),
        }
    }
    if parts.is_empty() {
        return Err(reject("it names the context root itself"));
    }
    Ok(parts.join("/"))
}

/// Reads a root file (`Dockerfile`, `.dockerignore`) as UTF-8 text, if the zip has it.
fn read_control_file<R: Read + Seek>(
    archive: &mut ZipArchive<R>,
    entries: &[Entry],
    name: &'static str,
    limits: &ContextLimits,
) -> Result<Option<String>, ContextError> {
    let Some(entry) = entries.iter().find(|e| e.path == name) else {
        return Ok(None);
    };
    if !matches!(entry.kind, Kind::File { .. }) {
        return Err(ContextError::NotARegularFile { name });
    }
    let file = archive
        .by_index(entry.index)
        .map_err(|source| ContextError::Entry {
            name: entry.name.clone(),
            source,
        })?;
    let mut bytes = Vec::new();
    file.take(limits.max_dockerfile_bytes + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| ContextError::Entry {
            name: entry.name.clone(),
            source: ZipError::Io(e),
        })?;
    if bytes.len() as u64 > limits.max_dockerfile_bytes {
        return Err(ContextError::ControlFileTooLarge {
            name,
            max: limits.max_dockerfile_bytes,
        });
    }
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|e| ContextError::NotUtf8 {
            name,
            offset: e.utf8_error().valid_up_to(),
        })
}

fn no_dockerfile(entries: &[Entry]) -> ContextError {
    let mut root: Vec<String> = entries
        .iter()
        .map(|e| e.path.split('/').next().unwrap_or_default().to_string())
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    root.sort();
    let more = root.len().saturating_sub(ROOT_LISTING_MAX);
    root.truncate(ROOT_LISTING_MAX);
    ContextError::NoDockerfile { root, more }
}

/// Checks that every kept link resolves, through the other kept links, inside the context.
fn check_links(kept: &[&Entry]) -> Result<(), ContextError> {
    let links: HashMap<&str, &str> = kept
        .iter()
        .filter_map(|e| match &e.kind {
            Kind::Link { target } => Some((e.path.as_str(), target.as_str())),
            _ => None,
        })
        .collect();
    let mut budget = LINK_CHECK_BUDGET;
    for entry in kept {
        let Kind::Link { target } = &entry.kind else {
            continue;
        };
        let escapes = |reason| ContextError::LinkEscapes {
            name: entry.name.clone(),
            target: target.clone(),
            reason,
        };
        if target.starts_with('/') {
            return Err(escapes("is absolute"));
        }
        let mut at: Vec<&str> = entry.path.split('/').collect();
        at.pop();
        let mut walk = Walk { hops: 0, budget };
        let resolved = resolve(at, target, &links, &mut walk);
        budget = walk.budget;
        match resolved {
            Ok(_) => {}
            Err(LinkProblem::Escapes) => return Err(escapes("leads outside the build context")),
            Err(LinkProblem::Loops) => return Err(escapes("loops or nests too deeply")),
            Err(LinkProblem::TooComplex) => {
                return Err(escapes("makes the links of this zip too costly to check"))
            }
        }
    }
    Ok(())
}

enum LinkProblem {
    Escapes,
    Loops,
    TooComplex,
}

/// Links followed for the current link, and lookup bytes left for the whole zip.
struct Walk {
    hops: u32,
    budget: u64,
}

/// Where `target`, followed from directory `at`, ends up (as the kernel resolves it,
/// through `links`), unless it leaves the root or loops.
fn resolve<'a>(
    mut at: Vec<&'a str>,
    target: &'a str,
    links: &HashMap<&'a str, &'a str>,
    walk: &mut Walk,
) -> Result<Vec<&'a str>, LinkProblem> {
    if target.starts_with('/') {
        return Err(LinkProblem::Escapes);
    }
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                at.pop().ok_or(LinkProblem::Escapes)?;
            }
            name => {
                at.push(name);
                let key = at.join("/");
                walk.budget = walk
                    .budget
                    .checked_sub(key.len() as u64)
                    .ok_or(LinkProblem::TooComplex)?;
                if let Some(next) = links.get(key.as_str()) {
                    walk.hops += 1;
                    if walk.hops > MAX_LINK_HOPS {
                        return Err(LinkProblem::Loops);
                    }
                    at.pop();
                    at = resolve(at, next, links, walk)?;
                }
            }
        }
    }
    Ok(at)
}

#[derive(Default)]
struct Written {
    files: u64,
    bytes: u64,
}

/// Creates one entry under `root`.
fn write_entry<R: Read + Seek>(
    archive: &mut ZipArchive<R>,
    entry: &Entry,
    root: &Path,
    limits: &ContextLimits,
    written: &mut Written,
) -> Result<(), ContextError> {
    let path = root.join(&entry.path);
    let (parents, _) = entry.path.rsplit_once('/').unwrap_or(("", ""));
    make_dirs(root, parents, entry)?;
    match &entry.kind {
        Kind::Dir => make_dirs(root, &entry.path, entry),
        Kind::Link { target } => {
            std::os::unix::fs::symlink(target, &path).map_err(io_err("create link", &path))
        }
        Kind::File { executable } => {
            let mut out = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
                .open(&path)
                .map_err(io_err("create", &path))?;
            let mut file = archive
                .by_index(entry.index)
                .map_err(|source| ContextError::Entry {
                    name: entry.name.clone(),
                    source,
                })?;
            let compressed = file.compressed_size();
            let mut size = 0u64;
            let mut buf = vec![0u8; 64 << 10];
            loop {
                let n = file.read(&mut buf).map_err(|e| ContextError::Entry {
                    name: entry.name.clone(),
                    source: ZipError::Io(e),
                })?;
                if n == 0 {
                    break;
                }
                size += n as u64;
                if written.bytes + size > limits.max_total_bytes {
                    return Err(ContextError::TooLarge {
                        name: entry.name.clone(),
                        max: limits.max_total_bytes,
                    });
                }
                if size > limits.ratio_after_bytes
                    && size > compressed.saturating_mul(limits.max_ratio)
                {
                    return Err(ContextError::Ratio {
                        name: entry.name.clone(),
                        compressed,
                        max_ratio: limits.max_ratio,
                    });
                }
                out.write_all(&buf[..n]).map_err(io_err("write", &path))?;
            }
            let mode = if *executable { 0o755 } else { 0o644 };
            out.set_permissions(fs::Permissions::from_mode(mode))
                .map_err(io_err("chmod", &path))?;
            written.files += 1;
            written.bytes += size;
            Ok(())
        }
    }
}

/// Creates the directories of `rel` under `root`, refusing to pass through anything but a
/// real directory.
fn make_dirs(root: &Path, rel: &str, entry: &Entry) -> Result<(), ContextError> {
    let mut dir = root.to_path_buf();
    for part in rel.split('/').filter(|p| !p.is_empty()) {
        dir.push(part);
        match dir.symlink_metadata() {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(ContextError::Conflict {
                    name: entry.name.clone(),
                    parent: part.into(),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir(&dir).map_err(io_err("create directory", &dir))?;
                fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))
                    .map_err(io_err("chmod", &dir))?;
            }
            Err(e) => return Err(io_err("inspect", &dir)(e)),
        }
    }
    Ok(())
}

/// Zips the build context in `dir` into `out`, leaving out what `.dockerignore` excludes;
/// written beside `out` and renamed into place, so `out` is whole or absent.
pub fn zip_dir(dir: &Path, out: &Path) -> Result<ZipStats, ContextError> {
    let ignore_path = dir.join(DOCKERIGNORE);
    let ignore = match fs::read(&ignore_path) {
        Ok(bytes) => {
            let text = String::from_utf8(bytes).map_err(|e| ContextError::NotUtf8 {
                name: DOCKERIGNORE,
                offset: e.utf8_error().valid_up_to(),
            })?;
            DockerIgnore::parse(&text)?
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => DockerIgnore::default(),
        Err(e) => return Err(io_err("read", &ignore_path)(e)),
    };
    let out_parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let temp = tempfile::Builder::new()
        .prefix(".kiln-zip-")
        .tempfile_in(&out_parent)
        .map_err(io_err("create a temporary file in", &out_parent))?;
    // The zip may be written inside the directory it packs: never pack it into itself.
    let skip: HashSet<PathBuf> = [temp.path().to_path_buf(), out.to_path_buf()]
        .iter()
        .filter_map(|p| fs::canonicalize(p).ok())
        .collect();
    let file = temp.reopen().map_err(io_err("open", temp.path()))?;
    let mut writer = ZipWriter::new(io::BufWriter::new(file));
    let mut stats = ZipStats {
        files: 0,
        other_entries: 0,
        bytes: 0,
        zip_bytes: 0,
    };
    let zip_err = |source| ContextError::ZipWrite {
        path: out.into(),
        source,
    };
    let mut links: Vec<(String, String)> = Vec::new();
    let mut stack = vec![String::new()];
    while let Some(rel_dir) = stack.pop() {
        let abs_dir = dir.join(&rel_dir);
        let mut names: Vec<_> = fs::read_dir(&abs_dir)
            .map_err(io_err("list", &abs_dir))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(io_err("list", &abs_dir))?;
        names.sort();
        let mut subdirs = Vec::new();
        for name in names {
            let name = name.to_str().ok_or_else(|| ContextError::UnsafeName {
                name: name.to_string_lossy().into_owned(),
                reason: "its name is not UTF-8",
            })?;
            let rel = if rel_dir.is_empty() {
                name.to_string()
            } else {
                format!("{rel_dir}/{name}")
            };
            let abs = dir.join(&rel);
            let meta = abs.symlink_metadata().map_err(io_err("inspect", &abs))?;
            if fs::canonicalize(&abs).is_ok_and(|c| skip.contains(&c)) && meta.is_file() {
                continue;
            }
            let ignored = ignore.is_ignored(&rel, meta.is_dir());
            if meta.is_dir() {
                if !ignored || ignore.has_exceptions() {
                    subdirs.push(rel.clone());
                }
                if !ignored {
                    writer
                        .add_directory(format!("{rel}/"), options(0o755))
                        .map_err(zip_err)?;
                    stats.other_entries += 1;
                }
            } else if ignored {
                continue;
            } else if meta.file_type().is_symlink() {
                let target = fs::read_link(&abs).map_err(io_err("read link", &abs))?;
                let target = target.to_string_lossy().into_owned();
                writer
                    .add_symlink(rel.as_str(), target.as_str(), options(0o777))
                    .map_err(zip_err)?;
                links.push((rel, target));
                stats.other_entries += 1;
            } else if meta.is_file() {
                let executable = meta.permissions().mode() & 0o111 != 0;
                let opts = options(if executable { 0o755 } else { 0o644 })
                    .large_file(meta.len() >= u64::from(u32::MAX));
                writer.start_file(rel, opts).map_err(zip_err)?;
                let mut src = File::open(&abs).map_err(io_err("open", &abs))?;
                stats.bytes += io::copy(&mut src, &mut writer).map_err(io_err("read", &abs))?;
                stats.files += 1;
            } else {
                return Err(ContextError::Unzippable { path: abs });
            }
        }
        stack.extend(subdirs.into_iter().rev());
    }
    check_dir_links(dir, &links)?;
    let mut buffered = writer.finish().map_err(zip_err)?;
    buffered.flush().map_err(io_err("write", temp.path()))?;
    stats.zip_bytes = temp
        .as_file()
        .metadata()
        .map_err(io_err("inspect", temp.path()))?
        .len();
    temp.as_file()
        .sync_all()
        .map_err(io_err("sync", temp.path()))?;
    temp.persist(out)
        .map_err(|e| io_err("rename into place", out)(e.error))?;
    Ok(stats)
}

/// Checks that every link `zip_dir` packed resolves, through the other packed links,
/// inside the context, as [`extract_zip`] will demand: kiln refuses what kilnd would.
fn check_dir_links(dir: &Path, links: &[(String, String)]) -> Result<(), ContextError> {
    let by_path: HashMap<&str, &str> = links
        .iter()
        .map(|(p, t)| (p.as_str(), t.as_str()))
        .collect();
    let mut budget = LINK_CHECK_BUDGET;
    for (path, target) in links {
        let escapes = |reason| ContextError::DirLinkEscapes {
            path: dir.join(path),
            target: target.clone(),
            reason,
        };
        if target.starts_with('/') {
            return Err(escapes("is absolute"));
        }
        let mut at: Vec<&str> = path.split('/').collect();
        at.pop();
        let mut walk = Walk { hops: 0, budget };
        let resolved = resolve(at, target, &by_path, &mut walk);
        budget = walk.budget;
        match resolved {
            Ok(_) => {}
            Err(LinkProblem::Escapes) => return Err(escapes("leads outside the directory")),
            Err(LinkProblem::Loops) => return Err(escapes("loops or nests too deeply")),
            Err(LinkProblem::TooComplex) => {
                return Err(escapes(
                    "makes the links of this directory too costly to check",
                ))
            }
        }
    }
    Ok(())
}

fn options(mode: u32) -> SimpleFileOptions {
    SimpleFileOptions::default()
        .compression_method(CompressionMethod::Deflated)
        .unix_permissions(mode)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    /// One entry of a zip a test crafts.
    enum Item<'a> {
        File(&'a str, &'a [u8], u32),
        Dir(&'a str),
        Link(&'a str, &'a str),
    }

    const DOCKERFILE_ITEM: Item<'static> = Item::File("Dockerfile", b"FROM debian-12\n", 0o644);

    /// Writes `items` as a zip (deflated files) into `dir/in.zip`.
    fn craft(dir: &Path, items: &[Item<'_>]) -> PathBuf {
        let path = dir.join("in.zip");
        let mut zip = ZipWriter::new(File::create(&path).expect("create zip"));
        for item in items {
            match item {
                Item::File(name, data, mode) => {
                    zip.start_file(*name, options(*mode)).expect("start file");
                    zip.write_all(data).expect("write file");
                }
                Item::Dir(name) => zip.add_directory(*name, options(0o755)).expect("dir"),
                Item::Link(name, target) => zip
                    .add_symlink(*name, *target, options(0o777))
                    .expect("link"),
            }
        }
        zip.finish().expect("finish zip");
        path
    }

    /// A scratch directory, and where contexts are unpacked in it.
    fn scratch() -> (tempfile::TempDir, PathBuf) {
        let work = tempfile::tempdir().expect("scratch");
        let dest = work.path().join("contexts/ctx");
        (work, dest)
    }

    fn extract(zip: &Path, dest: &Path) -> Result<BuildContext, ContextError> {
        extract_zip(zip, dest, &ContextLimits::default())
    }

    /// Whether nothing at all was left beside where the context would have gone.
    fn left_nothing(dest: &Path) -> bool {
        let parent = dest.parent().expect("parent");
        !dest.exists() && fs::read_dir(parent).map_or(true, |mut entries| entries.next().is_none())
    }

    /// `bytes` with every `from` replaced by the same-length `to` (names in both headers).
    fn rename_bytes(mut bytes: Vec<u8>, from: &[u8], to: &[u8]) -> Vec<u8> {
        let hits: Vec<usize> = (0..bytes.len().saturating_sub(from.len()))
            .filter(|&i| bytes[i..].starts_with(from))
            .collect();
        for i in hits {
            bytes[i..i + to.len()].copy_from_slice(to);
        }
        bytes
    }

    #[test]
    fn extract_when_good_zip_then_files_modes_links_and_dockerfile() {
        let (work, dest) = scratch();
        let zip = craft(
            work.path(),
            &[
                DOCKERFILE_ITEM,
                Item::File(".dockerignore", b"*.log\nsecret\n", 0o644),
                Item::Dir("app/"),
                Item::File("app/main.py", b"print('hi')\n", 0o644),
                Item::File("run.sh", b"#!/bin/sh\n", 0o4755),
                Item::File("debug.log", b"noise", 0o644),
                Item::File("secret/key", b"k", 0o600),
                Item::Link("main", "app/main.py"),
                Item::Link("app/self", "../app"),
            ],
        );

        let ctx = extract(&zip, &dest).expect("good context");

        assert_eq!(ctx.dockerfile, "FROM debian-12\n");
        assert_eq!((ctx.files, ctx.dir.clone()), (4, dest.clone()));
        assert_eq!(
            fs::read_to_string(dest.join("main")).expect("through link"),
            "print('hi')\n"
        );
        let mode = |p: &str| fs::metadata(dest.join(p)).expect("stat").mode() & 0o7777;
        assert_eq!((mode("run.sh"), mode("app/main.py")), (0o755, 0o644));
        assert!(!dest.join("debug.log").exists() && !dest.join("secret").exists());
        assert!(fs::read_link(dest.join("app/self")).is_ok());
    }

    #[test]
    fn extract_when_dockerfile_ignored_then_text_kept_but_file_left_out() {
        let (work, dest) = scratch();
        let zip = craft(
            work.path(),
            &[
                DOCKERFILE_ITEM,
                Item::File(".dockerignore", b"Dockerfile\n.dockerignore\n", 0o644),
                Item::File("app.py", b"", 0o644),
            ],
        );

        let ctx = extract(&zip, &dest).expect("context");

        assert_eq!(ctx.dockerfile, "FROM debian-12\n");
        assert!(!dest.join("Dockerfile").exists() && !dest.join(".dockerignore").exists());
        assert!(dest.join("app.py").exists());
    }

    #[test]
    fn extract_when_dot_dot_entry_then_rejected_and_nothing_left() {
        let (work, dest) = scratch();
        let zip = craft(
            work.path(),
            &[DOCKERFILE_ITEM, Item::File("a/../../evil", b"x", 0o644)],
        );

        let err = extract(&zip, &dest).expect_err("zip slip");

        assert!(
            matches!(&err, ContextError::UnsafeName { name, .. } if name == "a/../../evil"),
            "{err}"
        );
        assert!(left_nothing(&dest));
        assert!(!work.path().join("evil").exists());
    }

    #[test]
    fn extract_when_absolute_entry_then_rejected() {
        let (work, dest) = scratch();
        let zip = craft(
            work.path(),
            &[DOCKERFILE_ITEM, Item::File("/etc/evil", b"x", 0o644)],
        );

        let err = extract(&zip, &dest).expect_err("absolute");

        assert!(err.to_string().contains("absolute"), "{err}");
        assert!(left_nothing(&dest));
    }

    #[test]
    fn extract_when_backslash_or_drive_letter_then_rejected() {
        let (work, dest) = scratch();
        let slash = craft(
            work.path(),
            &[DOCKERFILE_ITEM, Item::File("..\\evil", b"x", 0o644)],
        );
        let slash_err = extract(&slash, &dest).expect_err("backslash");
        let drive = craft(
            work.path(),
            &[DOCKERFILE_ITEM, Item::File("C:/evil", b"x", 0o644)],
        );

        let drive_err = extract(&drive, &dest).expect_err("drive letter");

        assert!(slash_err.to_string().contains("backslash"), "{slash_err}");
        assert!(
            drive_err.to_string().contains("drive letter"),
            "{drive_err}"
        );
        assert!(left_nothing(&dest));
    }

    #[test]
    fn extract_when_link_escapes_then_rejected_and_nothing_left() {
        let (work, dest) = scratch();
        let zip = craft(
            work.path(),
            &[DOCKERFILE_ITEM, Item::Link("sub/up", "../../etc/passwd")],
        );

        let err = extract(&zip, &dest).expect_err("escape");

        assert!(
            matches!(&err, ContextError::LinkEscapes { name, .. } if name == "sub/up"),
            "{err}"
        );
        assert!(left_nothing(&dest));
    }

    #[test]
    fn extract_when_link_is_absolute_then_rejected() {
        let (work, dest) = scratch();
        let zip = craft(work.path(), &[DOCKERFILE_ITEM, Item::Link("etc", "/etc")]);

        let err = extract(&zip, &dest).expect_err("absolute link");

        assert!(err.to_string().contains("is absolute"), "{err}");
    }

    #[test]
    fn extract_when_link_escapes_through_another_link_then_rejected() {
        let (work, dest) = scratch();
        let zip = craft(
            work.path(),
            &[
                DOCKERFILE_ITEM,
                Item::Link("a/b/c/top", "../../.."),
                Item::Link("esc", "a/b/c/top/.."),
            ],
        );

        let err = extract(&zip, &dest).expect_err("chained escape");

        assert!(
            matches!(&err, ContextError::LinkEscapes { name, .. } if name == "esc"),
            "{err}"
        );
    }

    #[test]
    fn extract_when_links_loop_then_rejected() {
        let (work, dest) = scratch();
        let zip = craft(
            work.path(),
            &[
                DOCKERFILE_ITEM,
                Item::Link("a", "b"),
                Item::Link("b", "a/x"),
            ],
        );

        let err = extract(&zip, &dest).expect_err("loop");

        assert!(err.to_string().contains("loops"), "{err}");
        assert!(left_nothing(&dest));
    }

    #[test]
    fn extract_when_file_below_a_link_then_conflict() {
        let (work, dest) = scratch();
        let zip = craft(
            work.path(),
            &[
                DOCKERFILE_ITEM,
                Item::Link("l", "sub"),
                Item::File("l/x", b"x", 0o644),
            ],
        );

        let err = extract(&zip, &dest).expect_err("write through link");

        assert!(matches!(err, ContextError::Conflict { .. }), "{err}");
        assert!(left_nothing(&dest));
    }

    #[test]
    fn extract_when_file_and_directory_share_a_path_then_conflict() {
        let (work, dest) = scratch();
        let zip = craft(
            work.path(),
            &[
                DOCKERFILE_ITEM,
                Item::File("a", b"x", 0o644),
                Item::File("a/b", b"y", 0o644),
            ],
        );

        let err = extract(&zip, &dest).expect_err("conflict");

        assert!(
            matches!(&err, ContextError::Conflict { parent, .. } if parent == "a"),
            "{err}"
        );
    }

    #[test]
    fn extract_when_same_path_twice_after_cleaning_then_duplicate() {
        let (work, dest) = scratch();
        let zip = craft(
            work.path(),
            &[
                DOCKERFILE_ITEM,
                Item::File("a.txt", b"x", 0o644),
                Item::File("./a.txt", b"y", 0o644),
            ],
        );

        let err = extract(&zip, &dest).expect_err("duplicate");

        assert!(matches!(err, ContextError::Duplicate { .. }), "{err}");
    }

    #[test]
    fn extract_when_same_name_stored_twice_then_duplicate_names() {
        let (work, dest) = scratch();
        let zip = craft(
            work.path(),
            &[
                DOCKERFILE_ITEM,
                Item::File("a.txt", b"x", 0o644),
                Item::File("b.txt", b"y", 0o644),
            ],
        );
        let renamed = rename_bytes(fs::read(&zip).expect("read zip"), b"b.txt", b"a.txt");
        fs::write(&zip, renamed).expect("write zip");

        let err = extract(&zip, &dest).expect_err("duplicate names");

        assert!(matches!(err, ContextError::DuplicateNames { .. }), "{err}");
    }

    #[test]
    fn extract_when_compression_ratio_too_high_then_bomb_rejected() {
        let (work, dest) = scratch();
        let zeros = vec![0u8; 4 << 20];
        let zip = craft(
            work.path(),
            &[DOCKERFILE_ITEM, Item::File("zeros", &zeros, 0o644)],
        );

        let err = extract(&zip, &dest).expect_err("bomb");

        assert!(
            matches!(&err, ContextError::Ratio { name, .. } if name == "zeros"),
            "{err}"
        );
        assert!(left_nothing(&dest));
    }

    #[test]
    fn extract_when_total_bytes_exceed_limit_then_too_large() {
        let (work, dest) = scratch();
        let zip = craft(
            work.path(),
            &[DOCKERFILE_ITEM, Item::File("big", &[7u8; 5000], 0o644)],
        );
        let limits = ContextLimits {
            max_total_bytes: 4096,
            ..ContextLimits::default()
        };

        let err = extract_zip(&zip, &dest, &limits).expect_err("too large");

        assert!(
            matches!(err, ContextError::TooLarge { max: 4096, .. }),
            "{err}"
        );
        assert!(left_nothing(&dest));
    }

    #[test]
    fn extract_when_too_many_entries_then_rejected() {
        let (work, dest) = scratch();
        let names: Vec<String> = (0..11).map(|i| format!("f{i}")).collect();
        let mut items = vec![DOCKERFILE_ITEM];
        items.extend(names.iter().map(|n| Item::File(n, b"", 0o644)));
        let zip = craft(work.path(), &items);
        let limits = ContextLimits {
            max_entries: 10,
            ..ContextLimits::default()
        };

        let err = extract_zip(&zip, &dest, &limits).expect_err("too many");

        assert!(
            matches!(err, ContextError::TooManyEntries { count: 12, max: 10 }),
            "{err}"
        );
        assert!(left_nothing(&dest));
    }

    #[test]
    fn extract_when_no_dockerfile_then_error_lists_the_root() {
        let (work, dest) = scratch();
        let zip = craft(
            work.path(),
            &[
                Item::File("dockerfile", b"FROM x\n", 0o644),
                Item::File("src/app.py", b"", 0o644),
            ],
        );

        let err = extract(&zip, &dest).expect_err("no Dockerfile");

        assert!(matches!(err, ContextError::NoDockerfile { .. }), "{err}");
        assert!(err.to_string().contains("dockerfile, src"), "{err}");
        assert!(left_nothing(&dest));
    }

    #[test]
    fn extract_when_dockerfile_not_utf8_then_error_names_offset() {
        let (work, dest) = scratch();
        let zip = craft(
            work.path(),
            &[Item::File("Dockerfile", b"FROM x\n\xff\n", 0o644)],
        );

        let err = extract(&zip, &dest).expect_err("not UTF-8");

        assert!(
            matches!(
                err,
                ContextError::NotUtf8 {
                    name: "Dockerfile",
                    offset: 7
                }
            ),
            "{err}"
        );
        assert!(left_nothing(&dest));
    }

    #[test]
    fn extract_when_dest_exists_then_refused() {
        let (work, dest) = scratch();
        let zip = craft(work.path(), &[DOCKERFILE_ITEM]);
        fs::create_dir_all(&dest).expect("mkdir");

        let err = extract(&zip, &dest).expect_err("exists");

        assert!(matches!(err, ContextError::DestExists { .. }), "{err}");
    }

    #[test]
    fn zip_dir_when_dockerignore_then_round_trips_without_ignored_files() {
        let work = tempfile::tempdir().expect("scratch");
        let src = work.path().join("src");
        fs::create_dir_all(src.join("app")).expect("mkdir");
        fs::write(src.join("Dockerfile"), "FROM debian-12\n").expect("write");
        fs::write(src.join(".dockerignore"), "*.tmp\n").expect("write");
        fs::write(src.join("scratch.tmp"), "x").expect("write");
        fs::write(src.join("app/run.sh"), "#!/bin/sh\n").expect("write");
        fs::set_permissions(src.join("app/run.sh"), fs::Permissions::from_mode(0o700))
            .expect("chmod");
        std::os::unix::fs::symlink("app/run.sh", src.join("run")).expect("link");
        let zip = src.join("context.zip");
        let dest = work.path().join("out");

        let stats = zip_dir(&src, &zip).expect("zip");
        let ctx = extract(&zip, &dest).expect("extract");

        assert_eq!((stats.files, ctx.files), (3, 3));
        assert!(!dest.join("scratch.tmp").exists() && !dest.join("context.zip").exists());
        assert_eq!(
            fs::metadata(dest.join("run")).expect("via link").mode() & 0o777,
            0o755
        );
    }

    #[test]
    fn zip_dir_when_link_escapes_then_refused_and_no_zip_left() {
        let work = tempfile::tempdir().expect("scratch");
        let src = work.path().join("src");
        fs::create_dir_all(src.join("sub")).expect("mkdir");
        fs::write(src.join("Dockerfile"), "FROM debian-12\n").expect("write");
        fs::write(work.path().join("outside"), "secret").expect("write");
        std::os::unix::fs::symlink("../../outside", src.join("sub/up")).expect("link");
        let zip = work.path().join("context.zip");

        let err = zip_dir(&src, &zip).expect_err("escaping link");

        assert!(
            matches!(&err, ContextError::DirLinkEscapes { path, .. } if path.ends_with("sub/up")),
            "{err}"
        );
        assert!(!zip.exists());
    }

    #[test]
    fn zip_dir_when_escaping_link_is_ignored_then_zipped_without_it() {
        let work = tempfile::tempdir().expect("scratch");
        let src = work.path().join("src");
        fs::create_dir_all(&src).expect("mkdir");
        fs::write(src.join("Dockerfile"), "FROM debian-12\n").expect("write");
        fs::write(src.join(".dockerignore"), "etc-link\n").expect("write");
        std::os::unix::fs::symlink("/etc", src.join("etc-link")).expect("link");
        let zip = work.path().join("context.zip");

        let stats = zip_dir(&src, &zip).expect("zip");

        assert_eq!(stats.other_entries, 0);
    }
}

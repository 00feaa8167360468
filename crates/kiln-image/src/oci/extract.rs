//! Applies an image layer (a tar stream) to a root directory as the OCI image spec says:
//! whiteouts (`.wh.NAME`) and opaque directories (`.wh..wh..opq`), hard links, symbolic
//! links, devices, modes, owners, times and `SCHILY.xattr.*` extended attributes.
//!
//! Layers come from registries: hostile input. Every path is resolved with `openat2` and
//! `RESOLVE_IN_ROOT`, so `..` and symbolic links (absolute or relative, planted by this
//! layer or an earlier one) resolve *inside* the root as they would in the guest — a link
//! to `/` followed by a file through it writes under the root, never on the host. The last
//! component is always created or removed relative to its already-resolved parent with
//! `O_NOFOLLOW`/`AT_SYMLINK_NOFOLLOW`, and a hard link's source is resolved the same way, so
//! nothing outside the root is ever written, linked or read. The tar crate only parses.

use std::collections::HashSet;
use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// What one layer may put on the host at most.
#[derive(Debug, Clone, Copy)]
pub struct ExtractLimits {
    /// Bytes of file content, all layers of one image together.
    pub max_bytes: u64,
    /// Entries, all layers together.
    pub max_entries: u64,
}

impl Default for ExtractLimits {
    fn default() -> Self {
        ExtractLimits {
            max_bytes: 16 << 30,
            max_entries: 2_000_000,
        }
    }
}

/// Why a layer could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    /// The tar stream is malformed or could not be read.
    #[error("reading the layer: {0}")]
    Read(#[source] io::Error),
    /// A filesystem operation inside the root failed.
    #[error("{doing} {path}: {source}")]
    Fs {
        /// What was being done.
        doing: &'static str,
        /// The path inside the image.
        path: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The image is larger than allowed.
    #[error("the image unpacks to more than {0}; it is too large for kiln's limits")]
    TooLarge(String),
}

/// Running totals over all layers of an image, checked against [`ExtractLimits`].
#[derive(Debug, Default)]
pub struct ExtractTotals {
    /// Bytes of file content written.
    pub bytes: u64,
    /// Entries applied.
    pub entries: u64,
}

const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

/// The root directory, opened once; every path resolves beneath it.
pub struct Root {
    fd: OwnedFd,
}

fn cstr(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

impl Root {
    /// Opens `dir` (which must exist) as the root.
    pub fn open(dir: &Path) -> io::Result<Root> {
        let c = cstr(dir.as_os_str())?;
        // SAFETY: a valid NUL-terminated path; the returned descriptor is owned below.
        let fd = check(unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        })?;
        // SAFETY: `fd` was just returned by open and is owned by nobody else.
        Ok(Root {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// `openat2(root, rel, flags, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV)`.
    fn resolve(&self, rel: &Path, flags: libc::c_int) -> io::Result<OwnedFd> {
        let rel = if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rel
        };
        let c = cstr(rel.as_os_str())?;
        // SAFETY: open_how is plain integers; all-zero is its documented empty value.
        let mut how: libc::open_how = unsafe { std::mem::zeroed() };
        how.flags = (flags | libc::O_CLOEXEC) as u64;
        how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS | libc::RESOLVE_NO_XDEV;
        // SAFETY: valid pointers to a NUL-terminated path and an open_how of the size given.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                self.fd.as_raw_fd(),
                c.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel returned a new descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
    }

    /// The directory `rel` inside the root, created (0755, root) with its parents when
    /// missing. A non-directory in the way is replaced, as a later layer's directory would.
    fn dir(&self, rel: &Path) -> io::Result<OwnedFd> {
        match self.resolve(rel, libc::O_PATH | libc::O_DIRECTORY) {
            Ok(fd) => return Ok(fd),
            Err(e)
                if e.raw_os_error() == Some(libc::ENOENT)
                    || e.raw_os_error() == Some(libc::ENOTDIR) => {}
            Err(e) => return Err(e),
        }
        let (parent, name) =
            split(rel).ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?;
        let pfd = self.dir(&parent)?;
        let cname = cstr(name.as_os_str())?;
        remove_at(pfd.as_raw_fd(), &cname, true)?;
        // SAFETY: valid descriptor and NUL-terminated name.
        check(unsafe { libc::mkdirat(pfd.as_raw_fd(), cname.as_ptr(), 0o755) })?;
        self.resolve(rel, libc::O_PATH | libc::O_DIRECTORY)
    }
}

/// A path from a layer, made relative and lexically clean (`..` cannot climb above the root).
pub fn clean(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

/// Splits a clean relative path into its parent and last component (`None` for the root).
fn split(rel: &Path) -> Option<(PathBuf, PathBuf)> {
    let name = rel.file_name()?;
    Some((
        rel.parent().map(Path::to_path_buf).unwrap_or_default(),
        PathBuf::from(name),
    ))
}

/// Removes `name` in `dirfd` whatever it is (a directory with all it holds); `keep_dirs`
/// leaves a directory in place. Missing is fine.
fn remove_at(dirfd: RawFd, name: &CString, keep_dirs: bool) -> io::Result<()> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: valid descriptor, name and stat buffer.
    let r = unsafe {
        libc::fstatat(
            dirfd,
            name.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENOENT) {
            Ok(())
        } else {
            Err(e)
        };
    }
    // SAFETY: fstatat succeeded, so the buffer is initialised.
    let st = unsafe { st.assume_init() };
    if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
        if keep_dirs {
            return Ok(());
        }
        // SAFETY: valid descriptor and name; O_NOFOLLOW: a directory, not a link to one.
        let fd = check(unsafe {
            libc::openat(
                dirfd,
                name.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        })?;
        // SAFETY: a new descriptor owned here.
        let dir = unsafe { OwnedFd::from_raw_fd(fd) };
        empty_dir(dir.as_raw_fd(), |_| false)?;
        // SAFETY: valid descriptor and name.
        check(unsafe { libc::unlinkat(dirfd, name.as_ptr(), libc::AT_REMOVEDIR) })?;
    } else {
        // SAFETY: valid descriptor and name.
        check(unsafe { libc::unlinkat(dirfd, name.as_ptr(), 0) })?;
    }
    Ok(())
}

/// Removes every entry of the open directory `dirfd` for which `keep` is false.
fn empty_dir(dirfd: RawFd, keep: impl Fn(&OsStr) -> bool) -> io::Result<()> {
    let names = list_dir(dirfd)?;
    for name in names {
        if keep(&name) {
            continue;
        }
        remove_at(dirfd, &cstr(&name)?, false)?;
    }
    Ok(())
}

/// The names in the open directory `dirfd` (without `.` and `..`).
fn list_dir(dirfd: RawFd) -> io::Result<Vec<std::ffi::OsString>> {
    // SAFETY: `dup` of a valid descriptor; fdopendir owns the copy and closedir frees it.
    let dup = check(unsafe { libc::fcntl(dirfd, libc::F_DUPFD_CLOEXEC, 0) })?;
    // SAFETY: `dup` is a directory descriptor owned by the DIR from here on.
    let dir = unsafe { libc::fdopendir(dup) };
    if dir.is_null() {
        let e = io::Error::last_os_error();
        // SAFETY: fdopendir failed, so `dup` is still ours to close.
        unsafe { libc::close(dup) };
        return Err(e);
    }
    // SAFETY: rewind so a reused descriptor lists from the start.
    unsafe { libc::rewinddir(dir) };
    let mut names = Vec::new();
    loop {
        // SAFETY: `dir` is a valid DIR stream until closedir below.
        let ent = unsafe { libc::readdir(dir) };
        if ent.is_null() {
            break;
        }
        // SAFETY: readdir returned a valid dirent whose d_name is NUL-terminated.
        let name = unsafe { std::ffi::CStr::from_ptr((*ent).d_name.as_ptr()) };
        let bytes = name.to_bytes();
        if bytes != b"." && bytes != b".." {
            names.push(OsStr::from_bytes(bytes).to_os_string());
        }
    }
    // SAFETY: closes the stream (and `dup`) exactly once.
    unsafe { libc::closedir(dir) };
    Ok(names)
}

/// Applies one layer's tar stream to `root`.
pub fn apply_layer(
    root: &Root,
    tar: impl Read,
    limits: &ExtractLimits,
    totals: &mut ExtractTotals,
) -> Result<(), ExtractError> {
    let mut archive = tar::Archive::new(tar);
    // Paths this layer made: an opaque marker hides only what lower layers had.
    let mut made: HashSet<PathBuf> = HashSet::new();
    let mut opaque: Vec<PathBuf> = Vec::new();
    for entry in archive.entries().map_err(ExtractError::Read)? {
        let mut entry = entry.map_err(ExtractError::Read)?;
        let meta = Meta::of(&mut entry);
        totals.entries += 1;
        if totals.entries > limits.max_entries {
            return Err(ExtractError::TooLarge(format!(
                "{} entries",
                limits.max_entries
            )));
        }
        let raw = entry.path().map_err(ExtractError::Read)?.into_owned();
        let rel = clean(&raw);
        let shown = format!("/{}", rel.display());
        let fs = |doing: &'static str| {
            let path = shown.clone();
            move |source: io::Error| ExtractError::Fs {
                doing,
                path,
                source,
            }
        };
        let Some((parent, name)) = split(&rel) else {
            // The root itself: only its metadata.
            let fd = root
                .resolve(Path::new(""), libc::O_RDONLY | libc::O_DIRECTORY)
                .map_err(fs("opening"))?;
            meta.apply(&fd).map_err(fs("setting metadata of"))?;
            continue;
        };
        let name_str = name.as_os_str().to_string_lossy().into_owned();
        if name_str == OPAQUE {
            opaque.push(parent);
            continue;
        }
        if let Some(hidden) = name_str.strip_prefix(WHITEOUT) {
            let pfd = match root.resolve(&parent, libc::O_PATH | libc::O_DIRECTORY) {
                Ok(fd) => fd,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
                Err(e) => return Err(fs("whiting out in")(e)),
            };
            let cname = cstr(OsStr::new(hidden)).map_err(fs("whiting out"))?;
            remove_at(pfd.as_raw_fd(), &cname, false).map_err(fs("whiting out"))?;
            continue;
        }
        let pfd = root.dir(&parent).map_err(fs("making the parent of"))?;
        let cname = cstr(name.as_os_str()).map_err(fs("naming"))?;
        let kind = entry.header().entry_type();
        let dfd = pfd.as_raw_fd();
        made.insert(rel.clone());
        match kind {
            tar::EntryType::Directory => {
                remove_at(dfd, &cname, true).map_err(fs("replacing"))?;
                // SAFETY: valid descriptor and name.
                let r = unsafe { libc::mkdirat(dfd, cname.as_ptr(), 0o700) };
                if r < 0 {
                    let e = io::Error::last_os_error();
                    if e.raw_os_error() != Some(libc::EEXIST) {
                        return Err(fs("creating directory")(e));
                    }
                }
                // SAFETY: valid descriptor and name; never through a link.
                let fd = check(unsafe {
                    libc::openat(
                        dfd,
                        cname.as_ptr(),
                        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                    )
                })
                .map_err(fs("opening directory"))?;
                // SAFETY: a new descriptor owned here.
                let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                meta.apply(&fd).map_err(fs("setting metadata of"))?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                remove_at(dfd, &cname, false).map_err(fs("replacing"))?;
                // SAFETY: valid descriptor and name; O_EXCL|O_NOFOLLOW: a new file, here.
                let fd = check(unsafe {
                    libc::openat(
                        dfd,
                        cname.as_ptr(),
                        libc::O_WRONLY
                            | libc::O_CREAT
                            | libc::O_EXCL
                            | libc::O_NOFOLLOW
                            | libc::O_CLOEXEC,
                        0o600,
                    )
                })
                .map_err(fs("creating"))?;
                // SAFETY: a new descriptor owned by the File.
                let mut file = unsafe { File::from_raw_fd(fd) };
                let size = entry.header().size().map_err(ExtractError::Read)?;
                totals.bytes += size;
                if totals.bytes > limits.max_bytes {
                    return Err(ExtractError::TooLarge(format!(
                        "{} GiB",
                        limits.max_bytes >> 30
                    )));
                }
                io::copy(&mut entry, &mut file).map_err(fs("writing"))?;
                let fd = OwnedFd::from(file);
                meta.apply(&fd).map_err(fs("setting metadata of"))?;
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(ExtractError::Read)?
                    .ok_or_else(|| ExtractError::Read(io::Error::other("symlink without target")))?
                    .into_owned();
                remove_at(dfd, &cname, false).map_err(fs("replacing"))?;
                let ctarget = cstr(target.as_os_str()).map_err(fs("linking"))?;
                // SAFETY: valid descriptor and NUL-terminated strings. The target is stored,
                // never followed here.
                check(unsafe { libc::symlinkat(ctarget.as_ptr(), dfd, cname.as_ptr()) })
                    .map_err(fs("linking"))?;
                meta.apply_at(dfd, &cname).map_err(fs("chown"))?;
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(ExtractError::Read)?
                    .ok_or_else(|| {
                        ExtractError::Read(io::Error::other("hard link without target"))
                    })?;
                let target = clean(&target);
                let (tparent, tname) = split(&target).ok_or_else(|| ExtractError::Fs {
                    doing: "linking",
                    path: shown.clone(),
                    source: io::Error::other("a hard link to the root directory"),
                })?;
                // The source resolves inside the root like every other path.
                let tfd = root
                    .resolve(&tparent, libc::O_PATH | libc::O_DIRECTORY)
                    .map_err(fs("resolving the hard link's target of"))?;
                let ctname = cstr(tname.as_os_str()).map_err(fs("linking"))?;
                remove_at(dfd, &cname, false).map_err(fs("replacing"))?;
                // SAFETY: valid descriptors and names; flags 0: a symlink source is linked
                // itself, never followed.
                check(unsafe {
                    libc::linkat(tfd.as_raw_fd(), ctname.as_ptr(), dfd, cname.as_ptr(), 0)
                })
                .map_err(fs("hard-linking"))?;
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                remove_at(dfd, &cname, false).map_err(fs("replacing"))?;
                let h = entry.header();
                let major = h.device_major().ok().flatten().unwrap_or(0);
                let minor = h.device_minor().ok().flatten().unwrap_or(0);
                let ty = match kind {
                    tar::EntryType::Char => libc::S_IFCHR,
                    tar::EntryType::Block => libc::S_IFBLK,
                    _ => libc::S_IFIFO,
                };
                let mode = meta.mode;
                // SAFETY: valid descriptor and name.
                check(unsafe {
                    libc::mknodat(dfd, cname.as_ptr(), ty | mode, libc::makedev(major, minor))
                })
                .map_err(fs("creating device"))?;
                meta.apply_at(dfd, &cname).map_err(fs("chown"))?;
                // SAFETY: as above; chmod after chown (chown may clear set-id bits).
                check(unsafe { libc::fchmodat(dfd, cname.as_ptr(), mode, 0) })
                    .map_err(fs("chmod"))?;
            }
            // Headers the tar crate did not fold into the next entry, and types with no
            // meaning in a root filesystem.
            _ => {
                made.remove(&rel);
            }
        }
    }
    for dir in opaque {
        let fd = match root.resolve(&dir, libc::O_RDONLY | libc::O_DIRECTORY) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(e) => {
                return Err(ExtractError::Fs {
                    doing: "emptying opaque directory",
                    path: format!("/{}", dir.display()),
                    source: e,
                })
            }
        };
        empty_dir(fd.as_raw_fd(), |name| made.contains(&dir.join(name))).map_err(|source| {
            ExtractError::Fs {
                doing: "emptying opaque directory",
                path: format!("/{}", dir.display()),
                source,
            }
        })?;
    }
    Ok(())
}

/// An entry's metadata, read before its content.
struct Meta {
    uid: libc::uid_t,
    gid: libc::gid_t,
    mode: libc::mode_t,
    mtime: libc::time_t,
    xattrs: Vec<(CString, Vec<u8>)>,
}

impl Meta {
    fn of<R: Read>(entry: &mut tar::Entry<'_, R>) -> Meta {
        let mut xattrs = Vec::new();
        if let Ok(Some(exts)) = entry.pax_extensions() {
            for ext in exts.flatten() {
                let Ok(key) = ext.key() else { continue };
                if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                    if let Ok(name) = CString::new(name) {
                        xattrs.push((name, ext.value_bytes().to_vec()));
                    }
                }
            }
        }
        let h = entry.header();
        Meta {
            uid: h.uid().unwrap_or(0).try_into().unwrap_or(0),
            gid: h.gid().unwrap_or(0).try_into().unwrap_or(0),
            mode: h.mode().unwrap_or(0o644) & 0o7777,
            mtime: h.mtime().unwrap_or(0).try_into().unwrap_or(0),
            xattrs,
        }
    }

    fn times(&self) -> [libc::timespec; 2] {
        let t = libc::timespec {
            tv_sec: self.mtime,
            tv_nsec: 0,
        };
        [t, t]
    }

    /// Owner, mode, xattrs and times of an open file or directory.
    fn apply(&self, fd: &OwnedFd) -> io::Result<()> {
        let raw = fd.as_raw_fd();
        // SAFETY: valid descriptor.
        check(unsafe { libc::fchown(raw, self.uid, self.gid) })?;
        // SAFETY: valid descriptor; after chown, which may clear set-id bits.
        check(unsafe { libc::fchmod(raw, self.mode) })?;
        for (name, value) in &self.xattrs {
            // SAFETY: valid descriptor, NUL-terminated name, a value buffer of its length.
            let r = unsafe {
                libc::fsetxattr(raw, name.as_ptr(), value.as_ptr().cast(), value.len(), 0)
            };
            if r < 0 {
                tracing::debug!(name = ?name, error = %io::Error::last_os_error(), "xattr not kept");
            }
        }
        let times = self.times();
        // SAFETY: valid descriptor and a two-element timespec array.
        unsafe { libc::futimens(raw, times.as_ptr()) };
        Ok(())
    }

    /// Owner and times of the entry `name` in `dfd` itself (a link or a device node).
    fn apply_at(&self, dfd: RawFd, name: &CString) -> io::Result<()> {
        // SAFETY: valid descriptor and name; the entry itself, never a link's target.
        check(unsafe {
            libc::fchownat(
                dfd,
                name.as_ptr(),
                self.uid,
                self.gid,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        })?;
        let times = self.times();
        // SAFETY: as above, with a two-element timespec array.
        unsafe {
            libc::utimensat(
                dfd,
                name.as_ptr(),
                times.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    /// A tar of `entries`: (path, kind, content or link target, mode, uid).
    fn layer(entries: &[(&str, tar::EntryType, &str, u32, u64)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, data, mode, uid) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_mode(*mode);
            h.set_uid(*uid);
            h.set_gid(*uid);
            h.set_mtime(1_700_000_000);
            match kind {
                tar::EntryType::Symlink | tar::EntryType::Link => {
                    h.set_size(0);
                    b.append_link(&mut h, path, data).expect("link");
                }
                _ => {
                    h.set_size(data.len() as u64);
                    // The raw name, as a hostile layer writes it (append_data would refuse `..`).
                    let name = h.as_old_mut().name.as_mut_ptr();
                    let bytes = path.as_bytes();
                    // SAFETY: the name field is 100 bytes; test paths are shorter.
                    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), name, bytes.len()) };
                    h.set_cksum();
                    b.append(&h, data.as_bytes()).expect("append");
                }
            }
        }
        b.into_inner().expect("tar")
    }

    fn apply(root_dir: &Path, tar: &[u8]) -> Result<(), ExtractError> {
        let root = Root::open(root_dir).expect("root");
        apply_layer(
            &root,
            tar,
            &ExtractLimits::default(),
            &mut ExtractTotals::default(),
        )
    }

    use tar::EntryType::{Directory as D, Link as H, Regular as F, Symlink as L};

    #[test]
    fn apply_when_later_layer_whites_out_then_files_are_gone_and_opaque_keeps_own() {
        let root = tempfile::tempdir().expect("root");
        apply(
            root.path(),
            &layer(&[
                ("etc/", D, "", 0o755, 0),
                ("etc/gone", F, "x", 0o644, 0),
                ("etc/kept", F, "k", 0o644, 0),
                ("opt/", D, "", 0o755, 0),
                ("opt/old", F, "o", 0o644, 0),
            ]),
        )
        .expect("layer 1");

        apply(
            root.path(),
            &layer(&[
                ("etc/.wh.gone", F, "", 0o644, 0),
                ("opt/", D, "", 0o755, 0),
                ("opt/.wh..wh..opq", F, "", 0o644, 0),
                ("opt/new", F, "n", 0o644, 0),
            ]),
        )
        .expect("layer 2");

        assert!(!root.path().join("etc/gone").exists());
        assert!(root.path().join("etc/kept").exists());
        assert!(!root.path().join("opt/old").exists());
        assert_eq!(
            std::fs::read_to_string(root.path().join("opt/new")).ok(),
            Some("n".into())
        );
        assert!(!root.path().join("etc/.wh.gone").exists());
    }

    #[test]
    fn apply_when_modes_owners_and_hard_links_then_kept() {
        let root = tempfile::tempdir().expect("root");

        apply(
            root.path(),
            &layer(&[
                ("bin/", D, "", 0o755, 0),
                ("bin/tool", F, "#!", 0o4755, 0),
                ("home/app/", D, "", 0o750, 1000),
                ("home/app/f", F, "data", 0o600, 1000),
                ("bin/again", H, "bin/tool", 0o755, 0),
                ("bin/sh", L, "/bin/tool", 0o777, 0),
            ]),
        )
        .expect("layer");

        let tool = std::fs::metadata(root.path().join("bin/tool")).expect("tool");
        let app = std::fs::metadata(root.path().join("home/app/f")).expect("f");
        assert_eq!(tool.permissions().mode() & 0o7777, 0o4755);
        assert_eq!(
            (app.uid(), app.gid(), app.mode() & 0o777),
            (1000, 1000, 0o600)
        );
        assert_eq!(tool.nlink(), 2);
        assert_eq!(
            std::fs::read_link(root.path().join("bin/sh")).ok(),
            Some(PathBuf::from("/bin/tool"))
        );
    }

    #[test]
    fn apply_when_hostile_links_and_dotdot_then_nothing_outside_the_root_is_touched() {
        let outside = tempfile::tempdir().expect("outside");
        let secret = outside.path().join("secret");
        std::fs::write(&secret, "host data").expect("secret");
        let root = tempfile::tempdir().expect("root");
        let target = outside.path().display().to_string();

        let result = apply(
            root.path(),
            &layer(&[
                // A link to the host's directory, then a file written "through" it.
                ("escape", L, &target, 0o777, 0),
                (&format!("escape/{}", "planted"), F, "pwned", 0o644, 0),
                // A link to `/`, then a file through it.
                ("rootlink", L, "/", 0o777, 0),
                ("rootlink/tmp-planted", F, "pwned", 0o644, 0),
                // `..` climbing.
                ("../../climbed", F, "pwned", 0o644, 0),
                // A hard link to a host file by absolute path and by climbing.
                ("stolen", H, &secret.display().to_string(), 0o644, 0),
            ]),
        );

        assert!(!outside.path().join("planted").exists());
        assert!(!Path::new("/tmp-planted").exists());
        assert!(!outside
            .path()
            .parent()
            .expect("parent")
            .join("climbed")
            .exists());
        assert_eq!(
            std::fs::read_to_string(&secret).ok(),
            Some("host data".into())
        );
        // The link resolved inside the root, where no such file exists: refused.
        assert!(result.is_err(), "{result:?}");
        assert_eq!(std::fs::metadata(&secret).expect("secret").nlink(), 1);
        // What was written through the links stayed inside the root (the dangling link's
        // target does not exist in the root, so a directory took the link's place).
        assert!(root.path().join("escape/planted").exists());
        assert!(root.path().join("tmp-planted").exists());
        assert!(root.path().join("climbed").exists());
    }

    #[test]
    fn clean_when_dotdot_and_absolute_then_relative_inside() {
        assert_eq!(clean(Path::new("/../a/./b/../c")), PathBuf::from("a/c"));
        assert_eq!(clean(Path::new("../../..")), PathBuf::new());
    }
}

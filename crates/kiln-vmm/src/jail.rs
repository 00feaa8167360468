//! Confinement of every QEMU, in one place to audit (issue 12).
//!
//! QEMU runs TCG, slirp and the virtio devices on behalf of an untrusted guest. Before it is
//! executed, the child kilnd forked (already in the VM's network namespace and its own
//! session) takes these steps, each a plain system call on data prepared by the parent:
//!
//! 1. it joins its cgroup ([`crate::cgroup`]: memory ceiling, pids limit, CPU weight);
//! 2. new mount, IPC and UTS namespaces;
//! 3. a root of its own: a tmpfs holding, at their usual paths, only what this QEMU needs —
//!    `/usr` (its program, libraries and firmware) and the `/bin`-style links into it,
//!    `/etc/ld.so.cache`, `/etc/resolv.conf` (slirp forwards the guest's DNS to the resolver it
//!    names), `/dev/{null,zero,random,urandom}` (and `/dev/kvm` under KVM), the
//!    VM's runtime directory (read-write), its kernel and initramfs (read-only), its disks
//!    (read-write where the VM writes them) with every backing file (read-only), and its memory
//!    file. The tmpfs is made read-only and becomes `/` (`pivot_root`), so nothing else of the
//!    host — `kiln.db`, keys, other VMs, other images — has a name in QEMU's world;
//! 4. `no_new_privs`; then its own unprivileged uid and gid, with no supplementary group but
//!    the one restored memory files carry (and /dev/kvm's under KVM). Leaving uid 0 clears
//!    every capability. Limits:
//!    `RLIMIT_NOFILE` 4096, `RLIMIT_FSIZE` the largest file it must write plus 1 GiB.
//!
//! QEMU's own seccomp filter (`-sandbox`, see `cmdline::SANDBOX`) follows once it has started.
//! The parent prepares the files first ([`prepare_files`]): the runtime directory and the VM's
//! writable disks and memory file become the VM's uid's; shared read-only files (kernel,
//! initramfs, image disks) stay root's and world-readable.

use std::collections::BTreeSet;
use std::ffi::{CString, OsStr, OsString};
use std::io::Write;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::spec::{DiskFormat, VmSpec};
use crate::VmmError;

/// The uid and gid one VM's QEMU runs as (recorded in its `spec.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct JailId {
    /// User id.
    pub uid: u32,
    /// Group id (the same number as the uid).
    pub gid: u32,
}

/// The operator's confinement settings.
#[derive(Debug, Clone)]
pub struct JailConfig {
    /// First id of the range kiln owns. It is the group of restored memory files; VMs get
    /// `first + 1 ..= first + count - 1`.
    pub first: u32,
    /// How many ids the range holds.
    pub count: u32,
    /// Where claims on ids live (one file per id in use, naming the VM directory).
    pub claims: PathBuf,
}

/// Default first id of kiln's range (`KILN_JAIL_IDS=200000-265535`).
pub const DEFAULT_FIRST_ID: u32 = 200_000;
/// Default size of kiln's range.
pub const DEFAULT_ID_COUNT: u32 = 65_536;
/// Where id claims live by default (tmpfs: claims end with the boot, as the VMs do).
pub const DEFAULT_CLAIMS_DIR: &str = "/run/kiln/jail-ids";
/// The directory inside a VM's runtime directory on which its root is built.
const ROOT_DIR: &str = ".root";
/// A claim younger than this is never taken for stale (its VM may not have written its spec).
const CLAIM_GRACE: Duration = Duration::from_secs(120);
/// Open files a QEMU may hold.
const NOFILE: u64 = 4096;

/// Set by [`run_unconfined`]: the operator asked for QEMU without confinement.
static UNCONFINED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Runs every QEMU of this process unconfined (kilnd's `--unconfined`). Call it before the
/// first VM starts; [`JailConfig::current`] is decided once per process.
pub fn run_unconfined() {
    UNCONFINED.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Whether the environment asks for unconfined VMs (`KILN_JAIL=off`).
pub fn unconfined_by_environment() -> bool {
    std::env::var("KILN_JAIL").is_ok_and(|v| v == "off")
}

impl JailConfig {
    /// The host's settings: `KILN_JAIL=off` runs QEMU unconfined (logged loudly);
    /// `KILN_JAIL_IDS=FIRST-LAST` picks the id range; `KILN_JAIL_CLAIMS` the claims directory.
    /// Cached per process.
    pub fn current() -> Result<Option<&'static JailConfig>, VmmError> {
        static CONFIG: OnceLock<Result<Option<JailConfig>, String>> = OnceLock::new();
        let config = CONFIG.get_or_init(|| {
            if UNCONFINED.load(std::sync::atomic::Ordering::SeqCst) || unconfined_by_environment() {
                tracing::warn!(
                    "KILN_JAIL=off: QEMU runs UNCONFINED as root (no own uid, mount namespace or \
                     capability drop); never do this on a host running untrusted guests"
                );
                return Ok(None);
            }
            let (first, count) = match std::env::var("KILN_JAIL_IDS") {
                Ok(range) => parse_range(&range)?,
                Err(_) => (DEFAULT_FIRST_ID, DEFAULT_ID_COUNT),
            };
            let claims = std::env::var_os("KILN_JAIL_CLAIMS")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_CLAIMS_DIR));
            Ok(Some(JailConfig {
                first,
                count,
                claims,
            }))
        });
        config.as_ref().map(Option::as_ref).map_err(|e| {
            VmmError::InvalidSpec(format!(
                "KILN_JAIL_IDS is invalid: {e}; write it as FIRST-LAST, e.g. 200000-265535"
            ))
        })
    }

    /// The group that restored VMs share: an image's memory file is opened read-write by
    /// QEMU 7.2 even for a private mapping, so it is `root:<this group>` mode 0660.
    pub fn shared_gid(&self) -> u32 {
        self.first
    }
}

/// What confines every QEMU on this host, in one line (for `kiln doctor`); an error when QEMU
/// would run unconfined or kiln cannot confine it.
pub fn summary() -> Result<String, String> {
    let config = JailConfig::current()
        .map_err(|e| e.to_string())?
        .ok_or("KILN_JAIL=off: QEMU runs UNCONFINED as root")?;
    // SAFETY: geteuid only reads the process's credentials.
    if unsafe { libc::geteuid() } != 0 {
        return Err("kiln must run as root to give each QEMU its own uid and root".into());
    }
    let cgroup = match crate::cgroup::version() {
        Some(crate::cgroup::CgroupVersion::V2) => "cgroup v2",
        Some(crate::cgroup::CgroupVersion::V1) => "cgroup v1",
        None => "no cgroup file system (no memory/pids/CPU limits)",
    };
    Ok(format!(
        "uids {}-{} (claims in {}), own mount/IPC/UTS namespaces and root, no_new_privs, no \
         capabilities, seccomp (-sandbox), {cgroup}",
        config.first + 1,
        config.first + config.count - 1,
        config.claims.display()
    ))
}

fn parse_range(text: &str) -> Result<(u32, u32), String> {
    let (a, b) = text
        .split_once('-')
        .ok_or_else(|| format!("{text:?} has no '-'"))?;
    let first: u32 = a
        .trim()
        .parse()
        .map_err(|_| format!("{a:?} is not a number"))?;
    let last: u32 = b
        .trim()
        .parse()
        .map_err(|_| format!("{b:?} is not a number"))?;
    if first == 0 || last <= first {
        return Err(format!(
            "{text:?} must be a range of at least two ids above 0"
        ));
    }
    Ok((first, last - first + 1))
}

/// Claims a free id for the VM in `dir`: a hash of the directory picks where to start, a claim
/// file (created exclusively) makes it this VM's until [`release`].
pub fn claim(config: &JailConfig, dir: &Path) -> Result<JailId, VmmError> {
    std::fs::create_dir_all(&config.claims)
        .map_err(|e| VmmError::io("creating the jail id claims directory", &config.claims, e))?;
    let slots = config.count - 1;
    let digest = blake3::hash(dir.as_os_str().as_bytes());
    let mut start = [0u8; 4];
    start.copy_from_slice(&digest.as_bytes()[..4]);
    let start = u32::from_le_bytes(start) % slots;
    for i in 0..slots {
        let id = config.first + 1 + (start + i) % slots;
        let path = config.claims.join(id.to_string());
        for _ in 0..2 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
            {
                Ok(mut f) => {
                    f.write_all(dir.as_os_str().as_bytes())
                        .map_err(|e| VmmError::io("writing the jail id claim", &path, e))?;
                    return Ok(JailId { uid: id, gid: id });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    if !is_stale(&path, id) {
                        break;
                    }
                    let _ = std::fs::remove_file(&path);
                }
                Err(e) => return Err(VmmError::io("claiming a jail id", &path, e)),
            }
        }
    }
    Err(VmmError::InvalidSpec(format!(
        "every id of the jail range {}-{} is in use; widen KILN_JAIL_IDS",
        config.first,
        config.first + slots
    )))
}

/// A claim is stale when the VM directory it names no longer records this id.
fn is_stale(claim: &Path, id: u32) -> bool {
    let young = std::fs::metadata(claim)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .is_none_or(|age| age < CLAIM_GRACE);
    if young {
        return false;
    }
    let Ok(dir) = std::fs::read(claim) else {
        return false;
    };
    recorded_id(Path::new(OsStr::from_bytes(&dir))) != Some(id)
}

/// The id recorded in a VM directory's `spec.json`, if any.
fn recorded_id(dir: &Path) -> Option<u32> {
    let text = std::fs::read(dir.join(crate::qemu::SPEC_FILE)).ok()?;
    let spec: VmSpec = serde_json::from_slice(&text).ok()?;
    spec.jail.map(|j| j.uid)
}

/// Gives up the id the VM in `dir` holds (when its directory goes away).
pub fn release(dir: &Path) {
    let Ok(Some(config)) = JailConfig::current() else {
        return;
    };
    let Some(id) = recorded_id(dir) else { return };
    let path = config.claims.join(id.to_string());
    if std::fs::read(&path).is_ok_and(|owner| owner == dir.as_os_str().as_bytes()) {
        let _ = std::fs::remove_file(&path);
    }
}

/// Makes what QEMU writes this VM's: its runtime directory (0700, so no other VM's uid reaches
/// its sockets) and everything in it, its writable disks, its memory file. A restored VM's
/// memory file (an image's, mapped privately) becomes `root:<shared group>` 0660; a resumed
/// session's (linked into its runtime directory) is its own.
pub fn prepare_files(spec: &VmSpec, id: JailId, config: &JailConfig) -> Result<(), VmmError> {
    let own = |path: &Path| {
        std::os::unix::fs::chown(path, Some(id.uid), Some(id.gid))
            .map_err(|e| VmmError::io("giving the VM's uid", path, e))
    };
    let root = spec.dir.join(ROOT_DIR);
    std::fs::create_dir_all(&root).map_err(|e| VmmError::io("creating", &root, e))?;
    let entries =
        std::fs::read_dir(&spec.dir).map_err(|e| VmmError::io("listing", &spec.dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| VmmError::io("listing", &spec.dir, e))?;
        if entry.file_name() != ROOT_DIR {
            own(&entry.path())?;
        }
    }
    own(&spec.dir)?;
    std::fs::set_permissions(&spec.dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| VmmError::io("restricting", &spec.dir, e))?;
    for d in spec.disks.iter().filter(|d| !d.read_only) {
        own(&d.path)?;
    }
    if let Some(m) = &spec.memory_file {
        if m.shared {
            if !m.path.exists() {
                std::fs::File::create(&m.path).map_err(|e| VmmError::io("creating", &m.path, e))?;
            }
            own(&m.path)?;
        } else if m.path.starts_with(&spec.dir) {
            // A resumed session's own memory file, linked into its runtime directory: owned
            // above with everything else there, and no other VM ever maps it.
        } else {
            share_sealed(&m.path, config.shared_gid())?;
        }
    }
    Ok(())
}

/// Makes a snapshot's memory file readable and writable by the shared group, and checks that
/// no VM wrote it since.
///
/// QEMU 7.2 opens a `share=off` memory file read-write (though it maps it privately), so a
/// QEMU taken over by its guest could write the memory of the image it was restored from, and
/// every later clone would start from that. The file's ctime cannot be set back by anyone but
/// the clock, so the first restore records it in `<file>.seal` (kilnd's alone, outside every
/// QEMU's root) and every restore compares: a memory file changed after sealing is refused.
/// Ownership and mode are set only when they differ, since that too changes the ctime.
fn share_sealed(path: &Path, shared_gid: u32) -> Result<(), VmmError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).map_err(|e| VmmError::io("reading", path, e))?;
    if meta.uid() != 0 || meta.gid() != shared_gid || meta.mode() & 0o777 != 0o660 {
        std::os::unix::fs::chown(path, Some(0), Some(shared_gid))
            .map_err(|e| VmmError::io("sharing with restored VMs", path, e))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
            .map_err(|e| VmmError::io("sharing with restored VMs", path, e))?;
    }
    let meta = std::fs::metadata(path).map_err(|e| VmmError::io("reading", path, e))?;
    let now = format!("{} {} {}\n", meta.ctime(), meta.ctime_nsec(), meta.len());
    let seal = seal_path(path);
    match std::fs::read_to_string(&seal) {
        Ok(sealed) if sealed == now => Ok(()),
        Ok(sealed) => Err(VmmError::BadSnapshot {
            dir: path.parent().map(Path::to_path_buf).unwrap_or_default(),
            reason: format!(
                "its memory file {} changed after it was sealed (ctime and size then: {}, now: \
                 {}): a VM restored from it may have written it. Rebuild the image (a new \
                 version) rather than restoring from it",
                path.display(),
                sealed.trim(),
                now.trim()
            ),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let tmp = seal.with_extension("seal.tmp");
            std::fs::write(&tmp, &now)
                .and_then(|()| std::fs::rename(&tmp, &seal))
                .map_err(|e| VmmError::io("sealing the memory file in", &seal, e))
        }
        Err(e) => Err(VmmError::io("reading", &seal, e)),
    }
}

/// Where the seal of memory file `path` is kept.
pub fn seal_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".seal");
    path.with_file_name(name)
}

/// One step of building the root, with every path already a C string.
#[derive(Debug)]
enum Step {
    Mkdir(CString),
    Bind {
        src: CString,
        dst: CString,
        dir: bool,
        read_only: bool,
    },
    Symlink {
        target: CString,
        dst: CString,
    },
}

/// Everything the child needs to confine itself, computed before the fork.
#[derive(Debug)]
pub struct Jail {
    id: JailId,
    groups: Vec<libc::gid_t>,
    root: CString,
    steps: Vec<Step>,
    fsize: u64,
    cgroup: Option<crate::cgroup::VmCgroup>,
}

/// One path QEMU may see.
struct Entry {
    path: PathBuf,
    dir: bool,
    read_only: bool,
}

impl Jail {
    /// Plans the confinement of the QEMU at `qemu` running `spec` as `id`.
    pub fn plan(
        spec: &VmSpec,
        id: JailId,
        config: &JailConfig,
        qemu: &Path,
    ) -> Result<Jail, VmmError> {
        let mut entries = vec![Entry {
            path: PathBuf::from("/usr"),
            dir: true,
            read_only: true,
        }];
        let mut links = Vec::new();
        for top in ["/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"] {
            let path = Path::new(top);
            match std::fs::symlink_metadata(path) {
                Ok(m) if m.file_type().is_symlink() => {
                    let target =
                        std::fs::read_link(path).map_err(|e| VmmError::io("reading", path, e))?;
                    links.push((path.to_owned(), target));
                }
                Ok(m) if m.is_dir() => entries.push(Entry {
                    path: path.to_owned(),
                    dir: true,
                    read_only: true,
                }),
                _ => {}
            }
        }
        let file = |path: &Path, read_only: bool| Entry {
            path: path.to_owned(),
            dir: false,
            read_only,
        };
        entries.push(file(qemu, true));
        // The loader's cache; the resolver slirp forwards the guest's DNS (10.0.2.3) to.
        for etc in ["/etc/ld.so.cache", "/etc/resolv.conf"] {
            if Path::new(etc).exists() {
                entries.push(file(Path::new(etc), true));
            }
        }
        for dev in ["/dev/null", "/dev/zero", "/dev/random", "/dev/urandom"] {
            entries.push(file(Path::new(dev), false));
        }
        let mut groups = vec![config.shared_gid()];
        if spec.accel == kiln_api::Accel::Kvm {
            entries.push(file(Path::new("/dev/kvm"), false));
            // /dev/kvm is root:kvm 0660.
            let kvm = std::fs::metadata("/dev/kvm")
                .map_err(|e| VmmError::io("reading", Path::new("/dev/kvm"), e))?;
            groups.push(std::os::unix::fs::MetadataExt::gid(&kvm));
        }
        entries.push(Entry {
            path: spec.dir.clone(),
            dir: true,
            read_only: false,
        });
        entries.push(file(&spec.kernel, true));
        entries.push(file(&spec.initramfs, true));
        let mut fsize = spec.memory_mib << 20;
        for d in &spec.disks {
            entries.push(file(&d.path, d.read_only));
            fsize = fsize.max(virtual_size(&d.path, d.format));
            let mut layer = d.path.clone();
            for _ in 0..64 {
                let Some(backing) = crate::suspend::qcow2_backing(&layer)
                    .map_err(|e| VmmError::io("reading the backing file of", &layer, e))?
                else {
                    break;
                };
                let backing = match layer.parent() {
                    Some(parent) if backing.is_relative() => parent.join(backing),
                    _ => backing,
                };
                entries.push(file(&backing, true));
                layer = backing;
            }
        }
        if let Some(m) = &spec.memory_file {
            entries.push(file(&m.path, false));
        }
        for e in &entries {
            if e.read_only && !e.dir && !e.path.starts_with("/usr") && !e.path.starts_with("/etc") {
                readable_by_all(&e.path)?;
            }
            if !e.path.is_absolute()
                || e.path
                    .components()
                    .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
            {
                return Err(VmmError::InvalidSpec(format!(
                    "a confined VM needs absolute, normal paths; {} is not (use an absolute KILN_HOME)",
                    e.path.display()
                )));
            }
        }

        let root_path = spec.dir.join(ROOT_DIR);
        let root = cstring(root_path.as_os_str())?;
        let inside = |p: &Path| -> Result<CString, VmmError> {
            let mut bytes = root_path.as_os_str().as_bytes().to_vec();
            bytes.extend_from_slice(p.as_os_str().as_bytes());
            cstring(&OsString::from_vec(bytes))
        };
        // Directories first (shortest paths first), so a path inside one already bound is
        // left to that bind; files inside a bound directory need nothing more.
        entries.sort_by(|a, b| (!a.dir, &a.path).cmp(&(!b.dir, &b.path)));
        let mut bound_dirs: Vec<PathBuf> = Vec::new();
        let mut made: BTreeSet<PathBuf> = BTreeSet::new();
        let mut steps = Vec::new();
        let mut seen: BTreeSet<PathBuf> = BTreeSet::new();
        for (link, target) in &links {
            steps.push(Step::Symlink {
                target: cstring(target.as_os_str())?,
                dst: inside(link)?,
            });
        }
        for e in entries {
            if bound_dirs.iter().any(|d| e.path.starts_with(d)) || !seen.insert(e.path.clone()) {
                continue;
            }
            let mut ancestors: Vec<&Path> = e.path.ancestors().skip(1).collect();
            ancestors.reverse();
            for a in ancestors.into_iter().filter(|a| *a != Path::new("/")) {
                if made.insert(a.to_owned()) {
                    steps.push(Step::Mkdir(inside(a)?));
                }
            }
            steps.push(Step::Bind {
                src: cstring(e.path.as_os_str())?,
                dst: inside(&e.path)?,
                dir: e.dir,
                read_only: e.read_only,
            });
            if e.dir {
                bound_dirs.push(e.path);
            }
        }
        Ok(Jail {
            id,
            groups,
            root,
            steps,
            // Room for the largest file QEMU writes (memory file, overlay growth, a suspend
            // stream through its descriptor) plus slack; beyond it QEMU gets SIGXFSZ.
            fsize: fsize.saturating_add(1 << 30),
            cgroup: None,
        })
    }

    /// Makes the child join `cgroup` first thing (while it may still write there).
    pub fn with_cgroup(mut self, cgroup: Option<crate::cgroup::VmCgroup>) -> Jail {
        self.cgroup = cgroup;
        self
    }

    /// Confines the calling process. For `pre_exec` only, after `setns` and `setsid`: it
    /// performs system calls on prepared data and allocates nothing.
    ///
    /// # Safety
    /// Must run in a freshly forked, single-threaded child that is about to exec.
    pub unsafe fn enter(&self) -> std::io::Result<()> {
        // SAFETY (for every call below): plain system calls with pointers to NUL-terminated
        // strings and arrays owned by `self`, which outlives them; none allocates.
        unsafe {
            if let Some(cg) = &self.cgroup {
                if let Err(e) = cg.join_in_child() {
                    say(b"joining the VM's cgroup", None);
                    return Err(e);
                }
            }
            check(
                libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS),
                b"unshare",
            )?;
            // kilnd's umask (077) would make the root's directories untraversable for QEMU.
            libc::umask(0o022);
            // Nothing done here may reach the host's mount table.
            check(
                libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ),
                b"making / private",
            )?;
            check(
                libc::mount(
                    c"tmpfs".as_ptr(),
                    self.root.as_ptr(),
                    c"tmpfs".as_ptr(),
                    libc::MS_NOSUID,
                    c"mode=0755,size=1m".as_ptr().cast(),
                ),
                b"mounting the root tmpfs",
            )?;
            for step in &self.steps {
                match step {
                    Step::Mkdir(dst) => {
                        if libc::mkdir(dst.as_ptr(), 0o755) < 0
                            && *libc::__errno_location() != libc::EEXIST
                        {
                            return fail(b"mkdir", dst);
                        }
                    }
                    Step::Symlink { target, dst } => {
                        if libc::symlink(target.as_ptr(), dst.as_ptr()) < 0 {
                            return fail(b"symlink", dst);
                        }
                    }
                    Step::Bind {
                        src,
                        dst,
                        dir,
                        read_only,
                    } => {
                        if *dir {
                            if libc::mkdir(dst.as_ptr(), 0o755) < 0
                                && *libc::__errno_location() != libc::EEXIST
                            {
                                return fail(b"mkdir", dst);
                            }
                        } else {
                            let fd = libc::open(
                                dst.as_ptr(),
                                libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                                0o644,
                            );
                            if fd < 0 {
                                return fail(b"creating a mount point", dst);
                            }
                            libc::close(fd);
                        }
                        if libc::mount(
                            src.as_ptr(),
                            dst.as_ptr(),
                            std::ptr::null(),
                            libc::MS_BIND | libc::MS_REC,
                            std::ptr::null(),
                        ) < 0
                        {
                            return fail(b"bind-mounting", src);
                        }
                        if *read_only
                            && libc::mount(
                                std::ptr::null(),
                                dst.as_ptr(),
                                std::ptr::null(),
                                libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                                std::ptr::null(),
                            ) < 0
                        {
                            return fail(b"making read-only", dst);
                        }
                    }
                }
            }
            check(
                libc::mount(
                    std::ptr::null(),
                    self.root.as_ptr(),
                    std::ptr::null(),
                    libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID,
                    std::ptr::null(),
                ),
                b"making the root read-only",
            )?;
            check(libc::chdir(self.root.as_ptr()), b"chdir to the root")?;
            // pivot_root(".", "."): the old root is stacked under the new one, then detached.
            check(
                libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as libc::c_int,
                b"pivot_root",
            )?;
            check(
                libc::umount2(c".".as_ptr(), libc::MNT_DETACH),
                b"detaching the host's root",
            )?;
            check(libc::chdir(c"/".as_ptr()), b"chdir /")?;
            // What QEMU creates (sockets, logs, pid file) is for kilnd and itself alone.
            libc::umask(0o077);
            check(
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
                b"no_new_privs",
            )?;
            check(
                libc::setgroups(self.groups.len(), self.groups.as_ptr()),
                b"setgroups",
            )?;
            check(
                libc::setresgid(self.id.gid, self.id.gid, self.id.gid),
                b"setresgid",
            )?;
            // Leaving uid 0 for good clears the permitted, effective and ambient capabilities.
            check(
                libc::setresuid(self.id.uid, self.id.uid, self.id.uid),
                b"setresuid",
            )?;
            let nofile = libc::rlimit {
                rlim_cur: NOFILE,
                rlim_max: NOFILE,
            };
            check(
                libc::setrlimit(libc::RLIMIT_NOFILE, &nofile),
                b"RLIMIT_NOFILE",
            )?;
            let fsize = libc::rlimit {
                rlim_cur: self.fsize,
                rlim_max: self.fsize,
            };
            check(libc::setrlimit(libc::RLIMIT_FSIZE, &fsize), b"RLIMIT_FSIZE")?;
        }
        Ok(())
    }

    /// The id the VM runs as.
    pub fn id(&self) -> JailId {
        self.id
    }
}

/// Lets every uid read a shared read-only file (kernel, initramfs, image and base disks): a
/// confined QEMU reaches it only through the bind in its own root, since the directories
/// holding it are kilnd's alone (0700).
fn readable_by_all(path: &Path) -> Result<(), VmmError> {
    let meta = std::fs::metadata(path).map_err(|e| VmmError::io("reading", path, e))?;
    let mode = meta.permissions().mode();
    if mode & 0o444 != 0o444 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode | 0o444))
            .map_err(|e| VmmError::io("making readable to confined VMs", path, e))?;
    }
    Ok(())
}

/// The size a disk can grow to: a qcow2's virtual size, a raw file's length.
fn virtual_size(path: &Path, format: DiskFormat) -> u64 {
    let len = std::fs::metadata(path).map_or(0, |m| m.len());
    match crate::suspend::virtual_size(path, format) {
        // Metadata on top of the data: a few percent at most.
        Ok(size) if format == DiskFormat::Qcow2 => size.saturating_mul(11) / 10,
        Ok(size) => size,
        Err(_) => len,
    }
}

fn cstring(s: &OsStr) -> Result<CString, VmmError> {
    CString::new(s.as_bytes()).map_err(|_| {
        VmmError::InvalidSpec(format!("path {} contains a NUL byte", s.to_string_lossy()))
    })
}

/// Turns a failed call into an error, naming the step on QEMU's stderr (its log).
fn check(rc: libc::c_int, what: &[u8]) -> std::io::Result<()> {
    if rc < 0 {
        let err = std::io::Error::last_os_error();
        say(what, None);
        return Err(err);
    }
    Ok(())
}

fn fail(what: &[u8], path: &CString) -> std::io::Result<()> {
    let err = std::io::Error::last_os_error();
    say(what, Some(path));
    Err(err)
}

/// Writes `kiln jail: <what> <path> failed` to stderr without allocating.
fn say(what: &[u8], path: Option<&CString>) {
    let parts: [&[u8]; 5] = [
        b"kiln jail: ",
        what,
        if path.is_some() { b" " } else { b"" },
        path.map_or(&b""[..], |p| p.as_bytes()),
        b" failed\n",
    ];
    for part in parts {
        // SAFETY: writes a borrowed byte slice to fd 2; failure is ignored (nothing to do).
        unsafe {
            libc::write(2, part.as_ptr().cast(), part.len());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_range_when_valid_then_first_and_count() {
        assert_eq!(parse_range("200000-265535"), Ok((200_000, 65_536)));
    }

    #[test]
    fn parse_range_when_reversed_or_zero_then_error() {
        assert!(parse_range("5-4").is_err());
        assert!(parse_range("0-10").is_err());
        assert!(parse_range("12").is_err());
    }

    #[test]
    fn claim_when_range_fills_then_distinct_ids_then_error() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let config = JailConfig {
            first: 1000,
            count: 3,
            claims: tmp.path().join("claims"),
        };
        let a = claim(&config, Path::new("/vm/a")).expect("first claim");
        let b = claim(&config, Path::new("/vm/b")).expect("second claim");
        let c = claim(&config, Path::new("/vm/c"));

        assert_ne!(a.uid, b.uid);
        assert!((1001..=1002).contains(&a.uid) && (1001..=1002).contains(&b.uid));
        assert!(c.is_err());
    }
}

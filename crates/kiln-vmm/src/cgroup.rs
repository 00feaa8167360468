//! A cgroup per VM: a memory ceiling, a pids limit and a CPU weight for its QEMU.
//!
//! Both hierarchies are supported: cgroup v2 (one tree, `memory.max`, `pids.max`,
//! `cpu.weight`, `cpu.max`) and v1 (a tree per controller, `memory.limit_in_bytes`,
//! `pids.max`, `cpu.shares`, `cpu.cfs_quota_us`, and `cpuacct` for the CPU time used when
//! the host mounts it). The CPU quota is the VM's vCPU grant: kilnd changes it while the VM
//! runs ([`set_cpu_grant`]) and reads what the VM used ([`cpu_usage`]). A VM's group sits under the group kilnd itself is in, in `kiln/<name>`, so
//! limits set on kilnd (by systemd, a container runtime) still hold its VMs. QEMU joins its
//! group from the forked child before it executes (descriptors to `cgroup.procs` are opened
//! here, before the fork), so it never runs a single instruction outside it.

use std::ffi::OsStr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::VmmError;

/// Where cgroup file systems are mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// QEMU's own memory on top of the guest's RAM: the TCG translation cache
/// (`cmdline::TCG_CACHE_MIB`) plus 128 MiB for device emulation, slirp and buffers.
pub const MEMORY_OVERHEAD_MIB: u64 = crate::qemu::cmdline::TCG_CACHE_MIB + 128;
/// Processes and threads one QEMU may hold (it uses a handful).
pub const PIDS_MAX: u32 = 256;
/// The CPU weight of a VM (cgroup v2 scale, 100 = the default share).
pub const CPU_WEIGHT: u32 = 100;
/// Under cgroup v2, the leaf of kilnd's own group kilnd moves itself into, so that group may
/// hand controllers to `kiln/` (v2 lets a non-root group with processes enable none).
const KILND_LEAF: &str = "kilnd";
/// An empty group older than this, left by a VM that ended while kilnd was down, is removed.
const SWEEP_AGE: Duration = Duration::from_secs(120);

/// Which cgroup hierarchy the host runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    /// One unified tree.
    V2,
    /// One tree per controller.
    V1,
}

/// The host's cgroup hierarchy, if any is mounted.
pub fn version() -> Option<CgroupVersion> {
    let root = Path::new(CGROUP_ROOT);
    if root.join("cgroup.controllers").exists() {
        Some(CgroupVersion::V2)
    } else if root.join("memory/cgroup.procs").exists() {
        Some(CgroupVersion::V1)
    } else {
        None
    }
}

/// The limits of one VM.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Memory ceiling in bytes (guest RAM plus overhead).
    pub memory_bytes: u64,
    /// Most processes and threads.
    pub pids: u32,
    /// CPU weight, 1–10000 (v2 scale).
    pub cpu_weight: u32,
    /// CPU time per [`CPU_PERIOD_US`], in microseconds: the most CPUs' worth it may use.
    pub cpu_quota_us: u64,
}

/// The period CPU quotas are counted over (the kernel's default, 100 ms).
pub const CPU_PERIOD_US: u64 = 100_000;
/// QEMU's own threads (I/O, slirp, migration) on top of its vCPUs: half a CPU.
pub const CPU_OVERHEAD_US: u64 = CPU_PERIOD_US / 2;

impl Limits {
    /// The limits for a VM granted `vcpus` vCPUs with `memory_mib` of guest RAM: it may use
    /// its vCPUs' worth of host CPU plus half a CPU, whatever its guest runs.
    pub fn for_guest(vcpus: u32, memory_mib: u64) -> Limits {
        Limits {
            memory_bytes: (memory_mib + MEMORY_OVERHEAD_MIB) << 20,
            pids: PIDS_MAX,
            cpu_weight: CPU_WEIGHT,
            cpu_quota_us: cpu_quota_for(vcpus),
        }
    }
}

/// The CPU quota per [`CPU_PERIOD_US`] of a VM granted `vcpus` vCPUs (at least one).
pub fn cpu_quota_for(vcpus: u32) -> u64 {
    u64::from(vcpus.max(1)) * CPU_PERIOD_US + CPU_OVERHEAD_US
}

/// The v1 controllers a VM's group is made in, in this order; `cpuacct` only where the host
/// mounts it (it counts the CPU time the sizer reads; where it is mounted with `cpu`, both
/// names lead to the same directory).
fn v1_controllers() -> Vec<&'static str> {
    let mut controllers = vec!["memory", "pids", "cpu"];
    if Path::new(CGROUP_ROOT).join("cpuacct").exists() {
        controllers.push("cpuacct");
    }
    controllers
}

/// A VM's cgroup: its directories (one per controller under v1) and open `cgroup.procs`
/// descriptors for the child to join through.
#[derive(Debug)]
pub struct VmCgroup {
    dirs: Vec<PathBuf>,
    procs: Vec<OwnedFd>,
}

/// The group name of the VM whose runtime directory is `dir`.
pub fn name_for(dir: &Path) -> String {
    let digest = blake3::hash(dir.as_os_str().as_bytes()).to_hex();
    format!("vm-{}", &digest.as_str()[..20])
}

/// The `kiln` parent group of each controller (v1) or of the tree (v2), under kilnd's own.
fn parents(version: CgroupVersion) -> Result<Vec<PathBuf>, VmmError> {
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| VmmError::io("reading", Path::new("/proc/self/cgroup"), e))?;
    // Lines are `id:controllers:path`.
    let path_of = |controller: &str| {
        own.lines().find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
            ctrls
                .split(',')
                .any(|c| c == controller)
                .then(|| path.trim_start_matches('/').to_string())
        })
    };
    let root = Path::new(CGROUP_ROOT);
    match version {
        CgroupVersion::V2 => {
            let own = path_of("").unwrap_or_default();
            Ok(vec![root.join(v2_group(&own)).join("kiln")])
        }
        CgroupVersion::V1 => Ok(v1_controllers()
            .into_iter()
            .map(|c| {
                root.join(c)
                    .join(path_of(c).unwrap_or_default())
                    .join("kiln")
            })
            .collect()),
    }
}

impl VmCgroup {
    /// Creates (or reuses) the group for the VM in `dir` with `limits` and opens its
    /// `cgroup.procs`. `None` when the host has no cgroup file system.
    pub fn create(dir: &Path, limits: Limits) -> Result<Option<VmCgroup>, VmmError> {
        let Some(version) = version() else {
            return Ok(None);
        };
        let name = name_for(dir);
        let mut dirs = Vec::new();
        for parent in parents(version)? {
            std::fs::create_dir_all(&parent)
                .map_err(|e| VmmError::io("creating the cgroup", &parent, e))?;
            sweep(&parent);
            if version == CgroupVersion::V2 {
                // Controllers must be enabled for the children of every level down to ours.
                if let Some(up) = parent.parent() {
                    move_into_leaf(up)?;
                    enable_controllers(up)?;
                }
                enable_controllers(&parent)?;
            }
            let group = parent.join(&name);
            match std::fs::create_dir(&group) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(VmmError::io("creating the cgroup", &group, e)),
            }
            dirs.push(group);
        }
        let cg = VmCgroup {
            dirs,
            procs: Vec::new(),
        };
        let cg = cg.limit(version, limits)?;
        Ok(Some(cg))
    }

    fn limit(mut self, version: CgroupVersion, limits: Limits) -> Result<VmCgroup, VmmError> {
        let settings: Vec<(usize, &str, String)> = match version {
            CgroupVersion::V2 => vec![
                (0, "memory.max", limits.memory_bytes.to_string()),
                (0, "memory.swap.max", "0".into()),
                (0, "pids.max", limits.pids.to_string()),
                (0, "cpu.weight", limits.cpu_weight.to_string()),
                (
                    0,
                    "cpu.max",
                    format!("{} {CPU_PERIOD_US}", limits.cpu_quota_us),
                ),
            ],
            CgroupVersion::V1 => vec![
                (0, "memory.limit_in_bytes", limits.memory_bytes.to_string()),
                (1, "pids.max", limits.pids.to_string()),
                // v1 shares: 1024 is the default, as weight 100 is under v2.
                (
                    2,
                    "cpu.shares",
                    (u64::from(limits.cpu_weight) * 1024 / 100).to_string(),
                ),
                (2, "cpu.cfs_period_us", CPU_PERIOD_US.to_string()),
                (2, "cpu.cfs_quota_us", limits.cpu_quota_us.to_string()),
            ],
        };
        for (i, file, value) in settings {
            let path = self.dirs[i].join(file);
            // memory.swap.max exists only with swap accounting; its absence is no error.
            if file == "memory.swap.max" && !path.exists() {
                continue;
            }
            std::fs::write(&path, &value)
                .map_err(|e| VmmError::io(&format!("setting {value} in"), &path, e))?;
        }
        for dir in &self.dirs {
            let path = dir.join("cgroup.procs");
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(|e| VmmError::io("opening", &path, e))?;
            self.procs.push(OwnedFd::from(file));
        }
        Ok(self)
    }

    /// Moves the calling process into the group. For `pre_exec` only: writes to descriptors
    /// opened before the fork, allocates nothing.
    pub fn join_in_child(&self) -> std::io::Result<()> {
        for fd in &self.procs {
            // "0" names the writing process itself.
            // SAFETY: writes a static byte string to a descriptor this struct owns.
            let n = unsafe { libc::write(fd.as_raw_fd(), b"0".as_ptr().cast(), 1) };
            if n < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// The group's directories.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }
}

/// kilnd's group under v2 from the path `/proc/self/cgroup` names: once kilnd moved into its
/// leaf ([`move_into_leaf`]), the leaf's parent.
fn v2_group(own: &str) -> &str {
    match own.rsplit_once('/') {
        Some((up, KILND_LEAF)) => up,
        None if own == KILND_LEAF => "",
        _ => own,
    }
}

/// Moves the processes of `group` (kilnd, and whatever shares its group) into
/// `group/kilnd`: under v2 a group other than the root may enable controllers for its
/// children only while no process sits in it ("no internal processes"). This is what
/// systemd's `Delegate=yes` expects of a service that manages its own subtree.
fn move_into_leaf(group: &Path) -> Result<(), VmmError> {
    if group == Path::new(CGROUP_ROOT) {
        return Ok(());
    }
    let procs = std::fs::read_to_string(group.join("cgroup.procs")).unwrap_or_default();
    if procs.trim().is_empty() {
        return Ok(());
    }
    let leaf = group.join(KILND_LEAF);
    match std::fs::create_dir(&leaf) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(VmmError::io("creating kilnd's own leaf cgroup", &leaf, e)),
    }
    let target = leaf.join("cgroup.procs");
    for pid in procs.split_whitespace() {
        // A process that exited meanwhile cannot be moved and need not be.
        if let Err(e) = std::fs::write(&target, pid) {
            if e.raw_os_error() != Some(libc::ESRCH) {
                return Err(VmmError::io(
                    &format!("moving process {pid} into kilnd's leaf cgroup"),
                    &target,
                    e,
                ));
            }
        }
    }
    Ok(())
}

fn enable_controllers(dir: &Path) -> Result<(), VmmError> {
    let path = dir.join("cgroup.subtree_control");
    let enabled = std::fs::read_to_string(&path).unwrap_or_default();
    for c in ["memory", "pids", "cpu"] {
        if enabled.split_whitespace().any(|e| e == c) {
            continue;
        }
        std::fs::write(&path, format!("+{c}")).map_err(|e| {
            VmmError::io(
                &format!(
                    "enabling the {c} controller (kilnd's cgroup must be delegated to it, e.g. \
                     systemd Delegate=yes, with kilnd in a leaf of its own) in"
                ),
                &path,
                e,
            )
        })?;
    }
    Ok(())
}

/// Removes the group of the VM whose runtime directory is `dir` (once its QEMU has exited).
pub fn remove_for(dir: &Path) {
    let Some(version) = version() else { return };
    let Ok(parents) = parents(version) else {
        return;
    };
    let name = name_for(dir);
    for parent in parents {
        let group = parent.join(&name);
        if !group.exists() {
            continue;
        }
        // An exiting QEMU leaves its group a moment after it is reaped.
        for _ in 0..50 {
            match std::fs::remove_dir(&group) {
                Ok(()) => break,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => {
                    tracing::warn!(group = %group.display(), error = %e, "cannot remove a VM's cgroup");
                    break;
                }
            }
        }
    }
}

/// Removes empty VM groups older than [`SWEEP_AGE`] (their VMs ended while kilnd was down);
/// a group with a process in it cannot be removed, so a running VM's is safe.
fn sweep(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !OsStr::as_bytes(&name).starts_with(b"vm-") {
            continue;
        }
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_some_and(|age| age > SWEEP_AGE);
        if old {
            let _ = std::fs::remove_dir(entry.path());
        }
    }
}

/// The directories the group of the VM in `dir` has or would have (v1: memory, pids, cpu).
pub fn dirs_for(dir: &Path) -> Vec<PathBuf> {
    let Some(version) = version() else {
        return Vec::new();
    };
    let name = name_for(dir);
    parents(version)
        .map(|ps| ps.into_iter().map(|p| p.join(&name)).collect())
        .unwrap_or_default()
}

/// Whether this host can hold MicroVMs to a changing vCPU grant and count what they use
/// (what vCPU growth needs), said for `kiln doctor`.
pub fn growth_support() -> Result<String, String> {
    match version() {
        Some(CgroupVersion::V2) => {
            Ok("cgroup v2: cpu.max holds each VM to its grant, cpu.stat counts its use".into())
        }
        Some(CgroupVersion::V1) if v1_controllers().contains(&"cpuacct") => Ok(
            "cgroup v1: cpu.cfs_quota_us holds each VM to its grant, cpuacct counts its use".into(),
        ),
        Some(CgroupVersion::V1) => {
            Err("cgroup v1 without cpuacct: MicroVMs keep their baseline vCPUs".into())
        }
        None => Err("no cgroup file system: MicroVMs keep their baseline vCPUs".into()),
    }
}

/// Whether this host can hold a VM to its memory grant, which memory growth needs (said by
/// `kiln doctor`): the error says what a MicroVM gets without it.
pub fn memory_growth_support() -> Result<String, String> {
    let root = Path::new(CGROUP_ROOT);
    match version() {
        Some(CgroupVersion::V2)
            if std::fs::read_to_string(root.join("cgroup.controllers"))
                .is_ok_and(|c| c.split_whitespace().any(|c| c == "memory")) =>
        {
            Ok("cgroup v2: memory.max follows each VM's grant".into())
        }
        Some(CgroupVersion::V1) if root.join("memory").is_dir() => {
            Ok("cgroup v1: memory.limit_in_bytes follows each VM's grant".into())
        }
        Some(_) => Err("no memory cgroup controller: MicroVMs keep their baseline memory".into()),
        None => Err("no cgroup file system: MicroVMs keep their baseline memory".into()),
    }
}

/// The directory of `controller` (`cpu`, `cpuacct`) in the group of the VM in `dir`, when
/// the group exists.
fn controller_dir(dir: &Path, controller: &str) -> Option<(CgroupVersion, PathBuf)> {
    let version = version()?;
    let dirs = dirs_for(dir);
    let group = match version {
        CgroupVersion::V2 => dirs.into_iter().next(),
        CgroupVersion::V1 => {
            let i = v1_controllers().iter().position(|c| *c == controller)?;
            dirs.into_iter().nth(i)
        }
    }?;
    group.is_dir().then_some((version, group))
}

/// Grants the VM in `dir` `vcpus` vCPUs' worth of host CPU from now on ([`cpu_quota_for`]):
/// its cgroup's `cpu.max` (v2) or `cpu.cfs_quota_us` (v1). This, not the guest, is what
/// holds the VM to its grant: the guest may online every vCPU it has. Fails when the VM has
/// no group.
pub fn set_cpu_grant(dir: &Path, vcpus: u32) -> Result<(), VmmError> {
    let (version, group) = controller_dir(dir, "cpu").ok_or_else(|| {
        let missing = std::io::Error::from(std::io::ErrorKind::NotFound);
        VmmError::io("finding the CPU cgroup of the VM in", dir, missing)
    })?;
    let quota = cpu_quota_for(vcpus);
    let (path, value) = match version {
        CgroupVersion::V2 => (group.join("cpu.max"), format!("{quota} {CPU_PERIOD_US}")),
        CgroupVersion::V1 => (group.join("cpu.cfs_quota_us"), quota.to_string()),
    };
    std::fs::write(&path, &value)
        .map_err(|e| VmmError::io(&format!("setting {value} in"), &path, e))
}

/// Holds the VM in `dir` to `guest_mib` of guest memory plus [`MEMORY_OVERHEAD_MIB`] from
/// now on: its group's `memory.max` (v2) or `memory.limit_in_bytes` (v1). Lowered below what
/// the VM holds, the kernel reclaims what it can and then ends the VM (v2) or refuses (v1).
/// Fails when the VM has no group.
pub fn set_memory_limit(dir: &Path, guest_mib: u64) -> Result<(), VmmError> {
    let (version, group) = controller_dir(dir, "memory").ok_or_else(|| {
        let missing = std::io::Error::from(std::io::ErrorKind::NotFound);
        VmmError::io("finding the memory cgroup of the VM in", dir, missing)
    })?;
    let bytes = ((guest_mib + MEMORY_OVERHEAD_MIB) << 20).to_string();
    let path = match version {
        CgroupVersion::V2 => group.join("memory.max"),
        CgroupVersion::V1 => group.join("memory.limit_in_bytes"),
    };
    std::fs::write(&path, &bytes)
        .map_err(|e| VmmError::io(&format!("setting {bytes} in"), &path, e))
}

/// The memory limit of the group of the VM in `dir` now, bytes (`None`: no group, or no
/// limit).
pub fn memory_limit(dir: &Path) -> Option<u64> {
    let (version, group) = controller_dir(dir, "memory")?;
    let file = match version {
        CgroupVersion::V2 => "memory.max",
        CgroupVersion::V1 => "memory.limit_in_bytes",
    };
    std::fs::read_to_string(group.join(file))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The CPU quota per [`CPU_PERIOD_US`] the group of the VM in `dir` has now, µs (`None`: no
/// group, or no quota).
pub fn cpu_quota_us(dir: &Path) -> Option<u64> {
    let (version, group) = controller_dir(dir, "cpu")?;
    match version {
        CgroupVersion::V2 => std::fs::read_to_string(group.join("cpu.max"))
            .ok()?
            .split_whitespace()
            .next()?
            .parse()
            .ok(),
        CgroupVersion::V1 => std::fs::read_to_string(group.join("cpu.cfs_quota_us"))
            .ok()?
            .trim()
            .parse()
            .ok(),
    }
}

/// The host CPU time the VM in `dir` has used so far (all its QEMU's threads): `usage_usec`
/// of `cpu.stat` (v2) or `cpuacct.usage` (v1). `None` without a group to count it.
pub fn cpu_usage(dir: &Path) -> Option<Duration> {
    match controller_dir(dir, "cpuacct").or_else(|| controller_dir(dir, "cpu"))? {
        (CgroupVersion::V2, group) => {
            let stat = std::fs::read_to_string(group.join("cpu.stat")).ok()?;
            let usec = stat.lines().find_map(|l| l.strip_prefix("usage_usec "))?;
            usec.trim().parse().ok().map(Duration::from_micros)
        }
        (CgroupVersion::V1, group) => std::fs::read_to_string(group.join("cpuacct.usage"))
            .ok()?
            .trim()
            .parse()
            .ok()
            .map(Duration::from_nanos),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v2_group_when_kilnd_sits_in_its_leaf_then_the_leafs_parent() {
        assert_eq!(
            v2_group("system.slice/kilnd.service/kilnd"),
            "system.slice/kilnd.service"
        );
        assert_eq!(v2_group("kilnd"), "");
    }

    #[test]
    fn v2_group_when_not_in_a_leaf_then_as_named() {
        assert_eq!(
            v2_group("system.slice/kilnd.service"),
            "system.slice/kilnd.service"
        );
        assert_eq!(v2_group(""), "");
    }

    /// The host's cgroup v2 tree mounted in a temp dir (on a v1 host it has no memory or pids
    /// controller, but the rule under test is the same). The tree is the host's one unified
    /// hierarchy: what the test made there is removed before unmounting.
    struct V2Mount(tempfile::TempDir, Vec<PathBuf>, Option<String>);

    impl Drop for V2Mount {
        fn drop(&mut self) {
            for group in self.1.iter().rev() {
                let _ = std::fs::remove_dir(group);
            }
            if let Some(controller) = &self.2 {
                let control = self.0.path().join("cgroup.subtree_control");
                let _ = std::fs::write(control, format!("-{controller}"));
            }
            let path = std::ffi::CString::new(self.0.path().as_os_str().as_bytes()).expect("path");
            // SAFETY: a plain system call on a valid C string.
            unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
        }
    }

    #[test]
    fn move_into_leaf_when_kilnds_group_holds_processes_then_they_move_and_controllers_enable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let status = std::process::Command::new("mount")
            .args(["-t", "cgroup2", "none"])
            .arg(dir.path())
            .status()
            .expect("mount");
        assert!(status.success(), "mounting cgroup2 (tests run as root)");
        let mut mount = V2Mount(dir, Vec::new(), None);
        let controllers = std::fs::read_to_string(mount.0.path().join("cgroup.controllers"))
            .expect("controllers");
        let controller = controllers
            .split_whitespace()
            .next()
            .expect("one controller");
        let group = mount
            .0
            .path()
            .join(format!("kiln-test-{}", std::process::id()));
        std::fs::create_dir(&group).expect("group");
        mount.1 = vec![group.clone(), group.join(KILND_LEAF)];
        let mut sleeper = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .expect("sleep");
        std::fs::write(group.join("cgroup.procs"), sleeper.id().to_string()).expect("join");
        let root_control = mount.0.path().join("cgroup.subtree_control");
        let handed_down = std::fs::read_to_string(&root_control).expect("root control");
        if !handed_down.split_whitespace().any(|c| c == controller) {
            std::fs::write(&root_control, format!("+{controller}")).expect("enable at the root");
            mount.2 = Some(controller.to_string());
        }
        let refused = std::fs::write(
            group.join("cgroup.subtree_control"),
            format!("+{controller}"),
        );

        let moved = move_into_leaf(&group);
        let enabled = std::fs::write(
            group.join("cgroup.subtree_control"),
            format!("+{controller}"),
        );
        let leaf_procs =
            std::fs::read_to_string(group.join(KILND_LEAF).join("cgroup.procs")).expect("leaf");
        let _ = sleeper.kill();
        let _ = sleeper.wait();

        assert!(
            refused.is_err(),
            "v2 refuses controllers to a group with processes"
        );
        assert!(moved.is_ok(), "{moved:?}");
        assert!(enabled.is_ok(), "{enabled:?}");
        assert_eq!(leaf_procs.trim(), sleeper.id().to_string());
    }
}

//! The guest kernel: Debian's cloud kernel fetched by package name (or a local one), reduced
//! to `vmlinuz`, `config` and the modules kiln loads, stored under `<home>/kernels/<version>/`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::store::{find_or_build, Staging};
use super::{deb, io_err, AssetError, ToolError};

/// The Debian metapackage that tracks the current cloud kernel.
pub const DEFAULT_KERNEL_PACKAGE: &str = "linux-image-cloud-amd64";

/// The modules kiln loads, in load order, as paths under `lib/modules/<version>/kernel/`.
/// One initramfs serves both machines: `microvm` finds its devices through virtio_mmio,
/// `q35` through virtio_pci (which needs its two helper modules first); the transport whose
/// bus is absent loads and finds nothing. virtio_mem drives `q35`'s growable memory.
pub const KERNEL_MODULES: [&str; 15] = [
    "drivers/virtio/virtio_ring.ko",
    "drivers/virtio/virtio.ko",
    "drivers/virtio/virtio_mmio.ko",
    "drivers/virtio/virtio_pci_legacy_dev.ko",
    "drivers/virtio/virtio_pci_modern_dev.ko",
    "drivers/virtio/virtio_pci.ko",
    "drivers/block/virtio_blk.ko",
    "net/core/failover.ko",
    "drivers/net/net_failover.ko",
    "drivers/net/virtio_net.ko",
    "drivers/char/virtio_console.ko",
    "drivers/char/hw_random/virtio-rng.ko",
    "fs/overlayfs/overlay.ko",
    "drivers/virtio/virtio_balloon.ko",
    "drivers/virtio/virtio_mem.ko",
];

/// How many metapackage hops are followed before giving up.
const MAX_PACKAGE_HOPS: usize = 4;

const MANIFEST: &str = "kernel.json";

/// An installed guest kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelAssets {
    /// The kernel release, e.g. `6.1.0-56-cloud-amd64`.
    pub version: String,
    /// The Debian package it came from (`local` for a local kernel).
    pub package: String,
    /// That package's version (the vmlinuz digest for a local kernel).
    pub package_version: String,
    /// The compressed kernel image.
    pub vmlinuz: PathBuf,
    /// The modules to load, in load order (`NN-name.ko`).
    pub modules: Vec<PathBuf>,
}

/// Where a kernel comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelSource {
    /// A Debian package by name; a metapackage is followed to the real image package.
    Package(String),
    /// A local kernel image and its module tree (`.../lib/modules/<version>`).
    Local {
        /// The kernel image.
        vmlinuz: PathBuf,
        /// The module tree; its directory name is the kernel version.
        modules: PathBuf,
    },
}

impl KernelSource {
    /// The source the environment asks for: `KILN_KERNEL` + `KILN_KERNEL_MODULES`, else
    /// `KILN_KERNEL_PACKAGE`, else [`DEFAULT_KERNEL_PACKAGE`].
    pub fn from_env() -> Result<KernelSource, AssetError> {
        let vmlinuz = std::env::var_os("KILN_KERNEL").filter(|v| !v.is_empty());
        let modules = std::env::var_os("KILN_KERNEL_MODULES").filter(|v| !v.is_empty());
        match (vmlinuz, modules) {
            (Some(vmlinuz), Some(modules)) => Ok(KernelSource::Local {
                vmlinuz: PathBuf::from(vmlinuz),
                modules: PathBuf::from(modules),
            }),
            (Some(_), None) => Err(AssetError::BadEnv {
                var: "KILN_KERNEL_MODULES",
                detail: "KILN_KERNEL is set, so KILN_KERNEL_MODULES must name the kernel's \
                         lib/modules/<version> directory"
                    .into(),
            }),
            (None, Some(_)) => Err(AssetError::BadEnv {
                var: "KILN_KERNEL",
                detail: "KILN_KERNEL_MODULES is set, so KILN_KERNEL must name the vmlinuz".into(),
            }),
            (None, None) => match std::env::var("KILN_KERNEL_PACKAGE") {
                Ok(name) if !name.trim().is_empty() => {
                    Ok(KernelSource::Package(name.trim().into()))
                }
                Ok(_) | Err(std::env::VarError::NotPresent) => {
                    Ok(KernelSource::Package(DEFAULT_KERNEL_PACKAGE.into()))
                }
                Err(std::env::VarError::NotUnicode(_)) => Err(AssetError::BadEnv {
                    var: "KILN_KERNEL_PACKAGE",
                    detail: "not valid UTF-8".into(),
                }),
            },
        }
    }

    /// The key recorded in `kernel.json` so a later call finds what this source installed.
    fn key(&self) -> String {
        match self {
            KernelSource::Package(name) => format!("package:{name}"),
            KernelSource::Local { vmlinuz, .. } => format!("local:{}", vmlinuz.display()),
        }
    }
}

/// What `kernel.json` records.
#[derive(Debug, Serialize, Deserialize)]
struct KernelManifest {
    version: String,
    package: String,
    package_version: String,
    /// The [`KernelSource::key`] that installed it.
    requested: String,
    /// Module file names under `modules/`, in load order.
    modules: Vec<String>,
    vmlinuz_blake3: String,
    installed_unix: u64,
}

/// Ensures the kernel the environment asks for is installed; offline once it is.
pub fn ensure_kernel(home: &Path) -> Result<KernelAssets, AssetError> {
    ensure_kernel_from(home, &KernelSource::from_env()?, false)
}

/// Asks apt for the newest kernel of the configured package and installs it if new.
pub fn refresh_kernel(home: &Path) -> Result<KernelAssets, AssetError> {
    ensure_kernel_from(home, &KernelSource::from_env()?, true)
}

/// Ensures a kernel from `source` is installed under `home`; `refresh` re-asks apt.
pub fn ensure_kernel_from(
    home: &Path,
    source: &KernelSource,
    refresh: bool,
) -> Result<KernelAssets, AssetError> {
    let kernels = home.join("kernels");
    match source {
        KernelSource::Package(name) => {
            let installed = find_or_build(
                &kernels,
                refresh,
                || find_installed(&kernels, &source.key(), true),
                || install_package(&kernels, name, &source.key()),
            );
            match installed {
                Ok(kernel) => Ok(kernel),
                // A kernel installed by an older kiln lacks modules added since, and bringing
                // them needs the package again; offline, the older set still boots `microvm`.
                Err(e) => match find_installed(&kernels, &source.key(), false)? {
                    Some(stale) if !refresh => {
                        tracing::warn!(error = %e, version = %stale.version, "cannot fetch the guest kernel's newer modules; using the installed ones (q35 VMs will not boot until `kiln doctor` can fetch them)");
                        Ok(stale)
                    }
                    _ => Err(e),
                },
            }
        }
        KernelSource::Local { vmlinuz, modules } => {
            let version = local_version(modules)?;
            let digest = file_blake3(vmlinuz)?;
            find_or_build(
                &kernels,
                false,
                || installed_version(&kernels, &version, &digest),
                || {
                    let parts = KernelParts {
                        vmlinuz: vmlinuz.clone(),
                        config: vmlinuz.with_file_name(format!("config-{version}")),
                        modules: modules.clone(),
                        version: version.clone(),
                        package: "local".into(),
                        package_version: digest[..16].to_string(),
                        source_name: modules.display().to_string(),
                    };
                    install(&kernels, &parts, &source.key())
                },
            )
        }
    }
}

/// The newest kernel in `kernels` installed by the source `key`; with `current`, only one
/// that has every module of [`KERNEL_MODULES`].
fn find_installed(
    kernels: &Path,
    key: &str,
    current: bool,
) -> Result<Option<KernelAssets>, AssetError> {
    let entries = match fs::read_dir(kernels) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(AssetError::io("list", kernels, e)),
    };
    let mut best: Option<(u64, KernelAssets)> = None;
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let Some(manifest) = read_manifest(&entry.path())? else {
            continue;
        };
        if manifest.requested != key || (current && !has_current_modules(&manifest)) {
            continue;
        }
        let when = manifest.installed_unix;
        if best.as_ref().is_none_or(|(b, _)| when >= *b) {
            best = Some((when, assets_of(&entry.path(), manifest)));
        }
    }
    Ok(best.map(|(_, assets)| assets))
}

/// The kernel installed as `version`, if its vmlinuz has `digest`; a conflict otherwise.
fn installed_version(
    kernels: &Path,
    version: &str,
    digest: &str,
) -> Result<Option<KernelAssets>, AssetError> {
    let dir = kernels.join(version);
    match read_manifest(&dir)? {
        None => Ok(None),
        Some(m) if m.vmlinuz_blake3 == digest && has_current_modules(&m) => {
            Ok(Some(assets_of(&dir, m)))
        }
        // Installed by an older kiln with fewer modules: `install` brings the rest.
        Some(m) if m.vmlinuz_blake3 == digest => Ok(None),
        Some(_) => Err(AssetError::KernelConflict {
            dir,
            version: version.into(),
        }),
    }
}

/// The module file names an installation holds now, in load order.
fn module_file_names() -> Vec<String> {
    KERNEL_MODULES
        .iter()
        .enumerate()
        .map(|(index, module)| module_file_name(index, module))
        .collect()
}

/// Whether an installed kernel has every module kiln loads now, under its current name.
fn has_current_modules(m: &KernelManifest) -> bool {
    m.modules == module_file_names()
}

fn read_manifest(dir: &Path) -> Result<Option<KernelManifest>, AssetError> {
    let path = dir.join(MANIFEST);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(AssetError::io("read", &path, e)),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|source| AssetError::Manifest { path, source })
}

fn assets_of(dir: &Path, m: KernelManifest) -> KernelAssets {
    KernelAssets {
        vmlinuz: dir.join("vmlinuz"),
        modules: m
            .modules
            .iter()
            .map(|name| dir.join("modules").join(name))
            .collect(),
        version: m.version,
        package: m.package,
        package_version: m.package_version,
    }
}

/// The files an installation copies from.
struct KernelParts {
    vmlinuz: PathBuf,
    /// The kernel config; copied when it exists.
    config: PathBuf,
    /// `lib/modules/<version>`.
    modules: PathBuf,
    version: String,
    package: String,
    package_version: String,
    /// Names the origin in errors.
    source_name: String,
}

/// Downloads `name` (following metapackages), unpacks it and installs the kernel.
fn install_package(kernels: &Path, name: &str, key: &str) -> Result<KernelAssets, AssetError> {
    let work = Staging::dir_in(kernels)?;
    let debs = work.path().join("debs");
    let root = work.path().join("root");
    fs::create_dir(&debs).map_err(io_err("create directory", &debs))?;
    let mut package = deb::download(name, &debs)?;
    for _ in 0..MAX_PACKAGE_HOPS {
        let depends = deb::field(&package.path, "Depends")?;
        let image = deb::depends_names(&depends)
            .into_iter()
            .find(|d| d.starts_with("linux-image-"));
        match image {
            Some(next) => package = deb::download(&next, &debs)?,
            None => break,
        }
    }
    deb::extract(&package.path, &root)?;
    let parts = unpacked_parts(&root, &package)?;
    if let Some(found) = installed_version(kernels, &parts.version, &file_blake3(&parts.vmlinuz)?)?
    {
        return Ok(found);
    }
    install(kernels, &parts, key)
}

/// Finds vmlinuz, config and the module tree in an unpacked image package.
fn unpacked_parts(root: &Path, package: &deb::DebFile) -> Result<KernelParts, AssetError> {
    let not_kernel = |detail: String| AssetError::NotAKernel {
        package: package.package.clone(),
        detail,
    };
    let modules_root = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|p| root.join(p))
        .find(|p| p.is_dir())
        .ok_or_else(|| not_kernel("no lib/modules directory".into()))?;
    let versions: Vec<String> = fs::read_dir(&modules_root)
        .map_err(io_err("list", &modules_root))?
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let [version] = versions.as_slice() else {
        return Err(not_kernel(format!(
            "expected one kernel version, found {versions:?}"
        )));
    };
    let vmlinuz = root.join("boot").join(format!("vmlinuz-{version}"));
    if !vmlinuz.is_file() {
        return Err(not_kernel(format!("no boot/vmlinuz-{version}")));
    }
    Ok(KernelParts {
        config: root.join("boot").join(format!("config-{version}")),
        modules: modules_root.join(version),
        vmlinuz,
        version: version.clone(),
        package: package.package.clone(),
        package_version: package.version.clone(),
        source_name: format!("package {}", package.package),
    })
}

/// Copies the kernel parts into a staging dir and renames it to `kernels/<version>`.
fn install(kernels: &Path, parts: &KernelParts, key: &str) -> Result<KernelAssets, AssetError> {
    check_version_name(&parts.version)?;
    let dest = kernels.join(&parts.version);
    if let Some(older) = read_manifest(&dest)? {
        if older.vmlinuz_blake3 == file_blake3(&parts.vmlinuz)? {
            return refresh_modules(&dest, parts, older);
        }
    }
    let staging = Staging::dir_in(kernels)?;
    let out = staging.path();
    let vmlinuz = out.join("vmlinuz");
    fs::copy(&parts.vmlinuz, &vmlinuz).map_err(io_err("copy kernel image", &parts.vmlinuz))?;
    if parts.config.is_file() {
        fs::copy(&parts.config, out.join("config")).map_err(io_err("copy", &parts.config))?;
    }
    let modules_dir = out.join("modules");
    fs::create_dir(&modules_dir).map_err(io_err("create directory", &modules_dir))?;
    let mut modules = Vec::with_capacity(KERNEL_MODULES.len());
    for (index, module) in KERNEL_MODULES.iter().enumerate() {
        let name = module_file_name(index, module);
        copy_module(parts, module, &modules_dir.join(&name))?;
        modules.push(name);
    }
    let manifest = KernelManifest {
        version: parts.version.clone(),
        package: parts.package.clone(),
        package_version: parts.package_version.clone(),
        requested: key.to_string(),
        modules,
        vmlinuz_blake3: file_blake3(&vmlinuz)?,
        installed_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    let manifest_path = out.join(MANIFEST);
    let json = serde_json::to_vec_pretty(&manifest).map_err(|source| AssetError::Manifest {
        path: manifest_path.clone(),
        source,
    })?;
    fs::write(&manifest_path, json).map_err(io_err("write", &manifest_path))?;
    staging.publish(&dest)?;
    tracing::info!(version = %parts.version, package = %parts.package, "guest kernel installed");
    Ok(assets_of(&dest, manifest))
}

/// Brings the modules of the kernel installed in `dir` (by an older kiln, from the same
/// vmlinuz) up to [`KERNEL_MODULES`] in place. Its vmlinuz and the initramfs images built
/// before stay where they are (snapshots name them by digest); the modules are staged and
/// moved in under their current names, `kernel.json` is rewritten last, and module files it
/// no longer names are removed.
fn refresh_modules(
    dir: &Path,
    parts: &KernelParts,
    mut manifest: KernelManifest,
) -> Result<KernelAssets, AssetError> {
    let staging = Staging::dir_in(dir)?;
    let names = module_file_names();
    for (module, name) in KERNEL_MODULES.iter().zip(&names) {
        copy_module(parts, module, &staging.path().join(name))?;
    }
    let modules_dir = dir.join("modules");
    for name in &names {
        let (from, to) = (staging.path().join(name), modules_dir.join(name));
        fs::rename(&from, &to).map_err(io_err("move module into", &to))?;
    }
    manifest.modules = names;
    let manifest_path = dir.join(MANIFEST);
    let json = serde_json::to_vec_pretty(&manifest).map_err(|source| AssetError::Manifest {
        path: manifest_path.clone(),
        source,
    })?;
    super::store::write_atomic(&manifest_path, &json)?;
    if let Ok(entries) = fs::read_dir(&modules_dir) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !manifest.modules.contains(&name) {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
    tracing::info!(version = %manifest.version, "guest kernel modules brought up to date");
    Ok(assets_of(dir, manifest))
}

/// `NN-name.ko`, so that lexical order is load order.
fn module_file_name(index: usize, module: &str) -> String {
    let stem = Path::new(module)
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| module.to_string());
    format!("{index:02}-{stem}.ko")
}

/// Copies one module, decompressing `.ko.xz`/`.ko.zst` with the installed tool.
fn copy_module(parts: &KernelParts, module: &str, dest: &Path) -> Result<(), AssetError> {
    let plain = parts.modules.join("kernel").join(module);
    if plain.is_file() {
        fs::copy(&plain, dest).map_err(io_err("copy module", &plain))?;
        return Ok(());
    }
    for (ext, tool) in [("xz", "xz"), ("zst", "zstd")] {
        let packed = parts.modules.join("kernel").join(format!("{module}.{ext}"));
        if packed.is_file() {
            return decompress(&packed, tool, dest);
        }
    }
    Err(AssetError::ModuleMissing {
        module: module.to_string(),
        source_name: parts.source_name.clone(),
    })
}

fn decompress(packed: &Path, tool: &'static str, dest: &Path) -> Result<(), AssetError> {
    let out = Command::new(tool)
        .arg("-dcq")
        .arg(packed)
        .output()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => AssetError::ModuleCompressed {
                path: packed.into(),
                tool,
            },
            _ => ToolError::Spawn { tool, source: e }.into(),
        })?;
    if !out.status.success() {
        return Err(AssetError::NotAKernel {
            package: packed.display().to_string(),
            detail: format!(
                "`{tool} -d` failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    fs::write(dest, out.stdout).map_err(io_err("write", dest))?;
    Ok(())
}

/// The version of a local module tree: its directory name.
fn local_version(modules: &Path) -> Result<String, AssetError> {
    if !modules.join("kernel").is_dir() {
        return Err(AssetError::BadEnv {
            var: "KILN_KERNEL_MODULES",
            detail: format!(
                "{} has no kernel/ subdirectory; point it at lib/modules/<version>",
                modules.display()
            ),
        });
    }
    let version = modules
        .canonicalize()
        .map_err(io_err("resolve", modules))?
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    check_version_name(&version)?;
    Ok(version)
}

/// Refuses versions that would not make a plain directory name.
fn check_version_name(version: &str) -> Result<(), AssetError> {
    let plain = !version.is_empty()
        && !version.starts_with('.')
        && version
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._+-~".contains(c));
    if plain {
        Ok(())
    } else {
        Err(AssetError::NotAKernel {
            package: version.to_string(),
            detail: "the kernel version is not a plain directory name".into(),
        })
    }
}

/// The blake3 digest of a file, in hex.
pub(crate) fn file_blake3(path: &Path) -> Result<String, AssetError> {
    let file = fs::File::open(path).map_err(io_err("open", path))?;
    let mut hasher = blake3::Hasher::new();
    hasher.update_reader(file).map_err(io_err("read", path))?;
    Ok(hasher.finalize().to_hex().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake local kernel: a vmlinuz and a module tree holding every module kiln loads.
    fn fake_kernel(root: &Path, version: &str, skip: Option<&str>) -> KernelSource {
        let modules = root.join("lib/modules").join(version);
        for module in KERNEL_MODULES {
            if Some(module) == skip {
                continue;
            }
            let path = modules.join("kernel").join(module);
            fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            fs::write(&path, module.as_bytes()).expect("write module");
        }
        let vmlinuz = root.join("vmlinuz");
        fs::write(&vmlinuz, format!("kernel {version}")).expect("write vmlinuz");
        KernelSource::Local { vmlinuz, modules }
    }

    #[test]
    fn local_kernel_when_installed_then_modules_are_numbered_in_load_order() {
        let home = tempfile::tempdir().expect("home");
        let src = tempfile::tempdir().expect("src");
        let source = fake_kernel(src.path(), "6.1.0-test", None);

        let kernel = ensure_kernel_from(home.path(), &source, false).expect("install");

        let names: Vec<String> = kernel
            .modules
            .iter()
            .map(|p| p.file_name().expect("name").to_string_lossy().into_owned())
            .collect();
        assert_eq!(names[0], "00-virtio_ring.ko");
        assert_eq!(
            names[2..6],
            [
                "02-virtio_mmio.ko",
                "03-virtio_pci_legacy_dev.ko",
                "04-virtio_pci_modern_dev.ko",
                "05-virtio_pci.ko"
            ]
        );
        assert_eq!(names[11], "11-virtio-rng.ko");
        assert_eq!(names[14], "14-virtio_mem.ko");
        assert_eq!(kernel.version, "6.1.0-test");
        assert_eq!(
            kernel.vmlinuz,
            home.path().join("kernels/6.1.0-test/vmlinuz")
        );
        assert_eq!(
            fs::read(&kernel.modules[6]).expect("read"),
            b"drivers/block/virtio_blk.ko"
        );
    }

    #[test]
    fn local_kernel_when_installed_twice_then_second_call_reuses_it() {
        let home = tempfile::tempdir().expect("home");
        let src = tempfile::tempdir().expect("src");
        let source = fake_kernel(src.path(), "6.1.0-test", None);
        let first = ensure_kernel_from(home.path(), &source, false).expect("first");

        let second = ensure_kernel_from(home.path(), &source, false).expect("second");

        assert_eq!(first, second);
    }

    #[test]
    fn local_kernel_when_installed_by_an_older_kiln_then_modules_added_in_place() {
        let home = tempfile::tempdir().expect("home");
        let src = tempfile::tempdir().expect("src");
        let source = fake_kernel(src.path(), "6.1.0-test", None);
        let first = ensure_kernel_from(home.path(), &source, false).expect("install");
        let dir = home.path().join("kernels/6.1.0-test");
        // What an older kiln left: two modules, an initramfs a snapshot names.
        let mut older: KernelManifest =
            serde_json::from_slice(&fs::read(dir.join(MANIFEST)).expect("read")).expect("parse");
        older.modules = vec!["00-virtio_ring.ko".into(), "01-virtio_mmio.ko".into()];
        fs::write(
            dir.join(MANIFEST),
            serde_json::to_vec(&older).expect("json"),
        )
        .expect("write");
        fs::write(dir.join("modules/01-virtio_mmio.ko"), "old").expect("old module");
        fs::write(dir.join("initramfs-0123.cpio"), "old initramfs").expect("initramfs");

        let again = ensure_kernel_from(home.path(), &source, false).expect("refresh");

        assert_eq!(again, first);
        assert!(again.modules.iter().all(|m| m.is_file()));
        assert!(!dir.join("modules/01-virtio_mmio.ko").exists());
        assert!(dir.join("initramfs-0123.cpio").exists());
    }

    #[test]
    fn local_kernel_when_module_missing_then_error_names_it() {
        let home = tempfile::tempdir().expect("home");
        let src = tempfile::tempdir().expect("src");
        let source = fake_kernel(src.path(), "6.1.0-test", Some("fs/overlayfs/overlay.ko"));

        let err = ensure_kernel_from(home.path(), &source, false).expect_err("must fail");

        assert!(err.to_string().contains("fs/overlayfs/overlay.ko"), "{err}");
        assert!(!home.path().join("kernels/6.1.0-test").exists());
    }

    #[test]
    fn local_kernel_when_same_version_differs_then_conflict() {
        let home = tempfile::tempdir().expect("home");
        let src = tempfile::tempdir().expect("src");
        let source = fake_kernel(src.path(), "6.1.0-test", None);
        ensure_kernel_from(home.path(), &source, false).expect("first");
        fs::write(src.path().join("vmlinuz"), "another build").expect("rewrite");

        let err = ensure_kernel_from(home.path(), &source, false).expect_err("must fail");

        assert!(matches!(err, AssetError::KernelConflict { .. }), "{err}");
    }

    #[test]
    fn package_when_unknown_then_error_says_apt_get_update() {
        let home = tempfile::tempdir().expect("home");
        let source = KernelSource::Package("kiln-no-such-kernel-package".into());

        let err = ensure_kernel_from(home.path(), &source, false).expect_err("must fail");

        assert!(err.to_string().contains("apt-get update"), "{err}");
    }
}

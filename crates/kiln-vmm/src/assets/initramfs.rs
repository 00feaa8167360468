//! The initramfs: `kiln-init` as `/init` plus the kernel modules it loads, as an
//! uncompressed newc cpio (TCG unpacks it faster than a compressed one).

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::cpio::CpioWriter;
use super::store::{write_atomic, DirLock};
use super::{io_err, AssetError, KernelAssets};

/// Bumped whenever the archive layout changes, so old digests never name new layouts.
const LAYOUT: &[u8] = b"kiln-initramfs-v1";

/// Where the target-specific static build of kiln-init lands, relative to `target/`.
const STATIC_BUILDS: [&str; 2] = [
    "x86_64-unknown-linux-gnu/release/kiln-init",
    "x86_64-unknown-linux-gnu/debug/kiln-init",
];

/// A built initramfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Initramfs {
    /// The cpio archive.
    pub path: PathBuf,
    /// Hex blake3 over kiln-init and the modules (the file name carries its first 16 digits).
    pub digest: String,
}

/// Ensures the initramfs for `kernel` and `kiln_init` exists and returns it.
///
/// The name carries a digest of its inputs: a rebuilt kiln-init gives a new file, and
/// images snapshotted with an older one keep theirs.
pub fn ensure_initramfs(
    home: &Path,
    kernel: &KernelAssets,
    kiln_init: &Path,
) -> Result<Initramfs, AssetError> {
    let init = fs::read(kiln_init).map_err(io_err("read", kiln_init))?;
    let mut modules = Vec::with_capacity(kernel.modules.len());
    for path in &kernel.modules {
        let name = module_name(path)?;
        modules.push((name, fs::read(path).map_err(io_err("read module", path))?));
    }
    let digest = digest(&init, &modules);
    let dir = kernel_dir(home, kernel);
    let path = dir.join(format!("initramfs-{}.cpio", &digest[..16]));
    let found = Initramfs {
        path: path.clone(),
        digest,
    };
    if path.is_file() {
        return Ok(found);
    }
    let _lock = DirLock::acquire(&dir)?;
    if path.is_file() {
        return Ok(found);
    }
    let archive = archive(&init, &modules).map_err(io_err("build initramfs", &path))?;
    write_atomic(&path, &archive)?;
    tracing::info!(path = %path.display(), bytes = archive.len(), "initramfs built");
    Ok(found)
}

/// The directory holding `kernel`: where its vmlinuz lies, else `<home>/kernels/<version>`.
fn kernel_dir(home: &Path, kernel: &KernelAssets) -> PathBuf {
    kernel
        .vmlinuz
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| home.join("kernels").join(&kernel.version))
}

fn module_name(path: &Path) -> Result<String, AssetError> {
    path.file_name()
        .and_then(|n| n.to_str())
        .map(str::to_string)
        .ok_or_else(|| AssetError::NotAKernel {
            package: path.display().to_string(),
            detail: "module path has no UTF-8 file name".into(),
        })
}

fn digest(init: &[u8], modules: &[(String, Vec<u8>)]) -> String {
    let mut hasher = blake3::Hasher::new();
    hasher.update(LAYOUT);
    hasher.update(&(init.len() as u64).to_le_bytes());
    hasher.update(init);
    for (name, data) in modules {
        hasher.update(&(name.len() as u64).to_le_bytes());
        hasher.update(name.as_bytes());
        hasher.update(&(data.len() as u64).to_le_bytes());
        hasher.update(data);
    }
    hasher.finalize().to_hex().to_string()
}

/// The archive bytes: directories, `/dev/console`, `/init`, `/kiln/modules/*`.
fn archive(init: &[u8], modules: &[(String, Vec<u8>)]) -> std::io::Result<Vec<u8>> {
    let total = init.len() + modules.iter().map(|(_, d)| d.len() + 256).sum::<usize>() + 4096;
    let mut cpio = CpioWriter::new(Vec::with_capacity(total));
    for dir in ["dev", "proc", "sys", "newroot", "kiln", "kiln/modules"] {
        cpio.dir(dir, 0o755)?;
    }
    // The kernel opens /dev/console for PID 1 before devtmpfs can be mounted.
    cpio.char_dev("dev/console", 0o600, 5, 1)?;
    cpio.file("init", 0o755, init)?;
    for (name, data) in modules {
        cpio.file(&format!("kiln/modules/{name}"), 0o644, data)?;
    }
    cpio.finish()
}

/// Finds the static `kiln-init` binary.
///
/// `KILN_INIT_BIN` if set; else `kiln-init` beside the running executable; else the
/// static builds under the nearest `target/` above it.
pub fn find_kiln_init() -> Result<PathBuf, AssetError> {
    if let Some(path) = std::env::var_os("KILN_INIT_BIN").filter(|v| !v.is_empty()) {
        let path = PathBuf::from(path);
        if !path.is_file() {
            return Err(AssetError::KilnInitNotFound {
                tried: format!("{} (from KILN_INIT_BIN)", path.display()),
            });
        }
        check_static_elf(&path)?;
        return Ok(path);
    }
    let exe = std::env::current_exe()
        .map_err(|e| AssetError::io("locate", Path::new("current executable"), e))?;
    let candidates = kiln_init_candidates(&exe);
    let mut first_rejection = None;
    for candidate in candidates.iter().filter(|c| c.is_file()) {
        match check_static_elf(candidate) {
            Ok(()) => return Ok(candidate.clone()),
            Err(e) => {
                tracing::debug!(path = %candidate.display(), error = %e, "skipping kiln-init candidate");
                first_rejection.get_or_insert(e);
            }
        }
    }
    Err(
        first_rejection.unwrap_or_else(|| AssetError::KilnInitNotFound {
            tried: candidates
                .iter()
                .map(|c| c.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        }),
    )
}

/// Where kiln-init may lie for a program at `exe`, in order of preference.
fn kiln_init_candidates(exe: &Path) -> Vec<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(dir) = exe.parent() {
        candidates.push(dir.join("kiln-init"));
    }
    if let Some(target) = exe
        .ancestors()
        .find(|a| a.file_name().is_some_and(|n| n == "target"))
    {
        candidates.extend(STATIC_BUILDS.iter().map(|rel| target.join(rel)));
    }
    candidates
}

/// Checks that `path` is an x86-64 ELF executable without a `PT_INTERP` program header.
pub(crate) fn check_static_elf(path: &Path) -> Result<(), AssetError> {
    const PT_INTERP: u32 = 3;
    let reject = |detail: &str| AssetError::KilnInitNotStatic {
        path: path.into(),
        detail: detail.into(),
    };
    let file = File::open(path).map_err(io_err("open", path))?;
    let mut magic = [0u8; 4];
    if file.read_exact_at(&mut magic, 0).is_err() || &magic != b"\x7fELF" {
        return Err(reject("not an ELF file"));
    }
    let mut ehdr = [0u8; 64];
    file.read_exact_at(&mut ehdr, 0)
        .map_err(|_| reject("truncated ELF header"))?;
    if ehdr[4] != 2 || ehdr[5] != 1 || u16::from_le_bytes([ehdr[18], ehdr[19]]) != 62 {
        return Err(reject("not a little-endian 64-bit x86-64 ELF"));
    }
    let phoff = u64::from_le_bytes(ehdr[32..40].try_into().map_err(|_| reject("header"))?);
    let phentsize = u16::from_le_bytes([ehdr[54], ehdr[55]]) as u64;
    let phnum = u16::from_le_bytes([ehdr[56], ehdr[57]]) as u64;
    if phnum == 0 || phentsize < 4 {
        return Err(reject("no program headers"));
    }
    for i in 0..phnum {
        let mut p_type = [0u8; 4];
        file.read_exact_at(&mut p_type, phoff + i * phentsize)
            .map_err(|_| reject("truncated program headers"))?;
        if u32::from_le_bytes(p_type) == PT_INTERP {
            return Err(reject(
                "dynamically linked: it has a PT_INTERP program header",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::cpio;
    use super::*;

    #[test]
    fn archive_when_built_then_holds_init_console_and_ordered_modules() {
        let modules = vec![
            ("00-virtio_ring.ko".to_string(), b"ring".to_vec()),
            ("01-virtio.ko".to_string(), b"virtio".to_vec()),
        ];

        let bytes = archive(b"\x7fELF-init", &modules).expect("archive");

        let entries = cpio::parse(&bytes).expect("parse");
        let find = |name: &str| entries.iter().find(|e| e.name == name).cloned();
        let init = find("init").expect("init");
        assert_eq!(
            (init.mode, init.data.as_slice()),
            (0o100755, &b"\x7fELF-init"[..])
        );
        assert_eq!(find("dev/console").expect("console").rdev, (5, 1));
        assert_eq!(find("dev/console").expect("console").mode, 0o020600);
        assert_eq!(find("newroot").expect("newroot").mode, 0o040755);
        let ring = find("kiln/modules/00-virtio_ring.ko").expect("module");
        assert_eq!((ring.mode, ring.data.as_slice()), (0o100644, &b"ring"[..]));
        let order: Vec<&str> = entries
            .iter()
            .filter(|e| e.name.starts_with("kiln/modules/"))
            .map(|e| e.name.as_str())
            .collect();
        assert_eq!(
            order,
            [
                "kiln/modules/00-virtio_ring.ko",
                "kiln/modules/01-virtio.ko"
            ]
        );
    }

    #[test]
    fn digest_when_init_changes_then_differs() {
        let modules = vec![("00-a.ko".to_string(), b"a".to_vec())];

        let (one, two) = (digest(b"init-1", &modules), digest(b"init-2", &modules));

        assert_ne!(one, two);
    }

    #[test]
    fn ensure_when_called_twice_then_same_file_and_archive_is_valid() {
        let home = tempfile::tempdir().expect("home");
        let dir = home.path().join("kernels/6.1.0-test");
        fs::create_dir_all(dir.join("modules")).expect("mkdir");
        let module = dir.join("modules/00-virtio_ring.ko");
        fs::write(&module, b"ring").expect("module");
        let kernel = KernelAssets {
            version: "6.1.0-test".into(),
            package: "local".into(),
            package_version: "0".into(),
            vmlinuz: dir.join("vmlinuz"),
            modules: vec![module],
        };
        let init = home.path().join("kiln-init");
        fs::write(&init, b"init").expect("init");

        let first = ensure_initramfs(home.path(), &kernel, &init).expect("first");
        let second = ensure_initramfs(home.path(), &kernel, &init).expect("second");

        assert_eq!(first, second);
        assert!(first.path.starts_with(&dir));
        let bytes = fs::read(&first.path).expect("read");
        assert_eq!(cpio::parse(&bytes).expect("parse").len(), 9);
    }

    #[test]
    fn candidates_when_run_from_test_deps_then_include_static_builds() {
        let exe = Path::new("/w/target/debug/deps/kiln_vmm-0123");

        let candidates = kiln_init_candidates(exe);

        assert_eq!(
            candidates,
            [
                PathBuf::from("/w/target/debug/deps/kiln-init"),
                PathBuf::from("/w/target/x86_64-unknown-linux-gnu/release/kiln-init"),
                PathBuf::from("/w/target/x86_64-unknown-linux-gnu/debug/kiln-init"),
            ]
        );
    }

    /// A minimal x86-64 ELF header with one program header of type `p_type`.
    fn elf_with_segment(p_type: u32) -> Vec<u8> {
        let mut elf = vec![0u8; 64 + 56];
        elf[..4].copy_from_slice(b"\x7fELF");
        (elf[4], elf[5]) = (2, 1);
        elf[18..20].copy_from_slice(&62u16.to_le_bytes());
        elf[32..40].copy_from_slice(&64u64.to_le_bytes());
        elf[54..56].copy_from_slice(&56u16.to_le_bytes());
        elf[56..58].copy_from_slice(&1u16.to_le_bytes());
        elf[64..68].copy_from_slice(&p_type.to_le_bytes());
        elf
    }

    #[test]
    fn static_check_when_only_load_segments_then_accepted() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("static");
        fs::write(&path, elf_with_segment(1)).expect("write");

        let checked = check_static_elf(&path);

        assert!(checked.is_ok(), "{checked:?}");
    }

    #[test]
    fn static_check_when_interp_segment_then_rejected() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("dynamic");
        fs::write(&path, elf_with_segment(3)).expect("write");

        let err = check_static_elf(&path).expect_err("dynamic");

        assert!(err.to_string().contains("PT_INTERP"), "{err}");
    }

    #[test]
    fn static_check_when_dynamic_binary_then_rejected() {
        let err = check_static_elf(Path::new("/bin/sh")).expect_err("dynamic");

        assert!(err.to_string().contains("PT_INTERP"), "{err}");
    }

    #[test]
    fn static_check_when_not_elf_then_rejected() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("script");
        fs::write(&path, b"#!/bin/sh\necho hi\n").expect("write");

        let err = check_static_elf(&path).expect_err("script");

        assert!(err.to_string().contains("not an ELF"), "{err}");
    }
}

//! Guest assets: the guest kernel with the modules kiln needs, and the initramfs that
//! carries `kiln-init` and those modules.
//!
//! Layout under the kiln data directory:
//! `kernels/<version>/{vmlinuz, config, modules/NN-name.ko, kernel.json,
//! initramfs-<digest16>.cpio}`. Everything is fetched once and then used offline.

mod cpio;
pub mod deb;
mod initramfs;
mod io;
mod kernel;
pub mod store;
pub mod tool;

use std::path::{Path, PathBuf};

pub use deb::DebError;
pub use initramfs::{ensure_initramfs, find_kiln_init, Initramfs};
pub use io::{io_err, IoError};
pub use kernel::{
    ensure_kernel, ensure_kernel_from, refresh_kernel, KernelAssets, KernelSource,
    DEFAULT_KERNEL_PACKAGE, KERNEL_MODULES,
};
pub use store::StoreError;
pub use tool::ToolError;

/// Everything a VM needs besides its disk: kernel, modules and initramfs.
#[derive(Debug, Clone)]
pub struct GuestAssets {
    /// The guest kernel and its modules.
    pub kernel: KernelAssets,
    /// The initramfs built from `kiln-init` and the kernel's modules.
    pub initramfs: Initramfs,
}

/// Ensures kernel and initramfs exist under `home`, fetching and building what is missing.
pub fn ensure_guest_assets(home: &Path) -> Result<GuestAssets, AssetError> {
    let kernel = ensure_kernel(home)?;
    let kiln_init = find_kiln_init()?;
    let initramfs = ensure_initramfs(home, &kernel, &kiln_init)?;
    Ok(GuestAssets { kernel, initramfs })
}

/// Failures while fetching or building guest assets.
#[derive(Debug, thiserror::Error)]
pub enum AssetError {
    /// A host tool is missing or cannot start.
    #[error(transparent)]
    Tool(#[from] ToolError),
    /// apt does not know the kernel package.
    #[error(
        "apt knows no package `{package}`: run `apt-get update` (as root) and check the name \
         (KILN_KERNEL_PACKAGE picks the kernel package)"
    )]
    PackageUnknown {
        /// The package name.
        package: String,
    },
    /// Downloading or unpacking a package failed.
    #[error(transparent)]
    Deb(DebError),
    /// The package (or what it depends on) holds no usable kernel.
    #[error("package `{package}` holds no usable kernel: {detail}")]
    NotAKernel {
        /// The package name, or the local path.
        package: String,
        /// What is wrong.
        detail: String,
    },
    /// A module kiln needs is not in the kernel's module tree.
    #[error(
        "kernel module `{module}` is missing from {source_name}: kiln needs it to boot its guests; \
         use a kernel that builds it as a module"
    )]
    ModuleMissing {
        /// The module's path under `kernel/`.
        module: String,
        /// The package or directory searched.
        source_name: String,
    },
    /// A module is compressed and the tool to decompress it is missing.
    #[error(
        "kernel module {path} is compressed and `{tool}` is not installed: {}",
        crate::host_tools::install_hint(tool)
    )]
    ModuleCompressed {
        /// The compressed module.
        path: PathBuf,
        /// The decompressor.
        tool: &'static str,
    },
    /// A kiln environment variable holds an unusable value.
    #[error("environment variable {var} is unusable: {detail}")]
    BadEnv {
        /// The variable.
        var: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// A kernel of the same version but different content is already installed.
    #[error(
        "{dir} already holds a different kernel of version {version}: remove that directory \
         (and the images built on it) or use a kernel with another version"
    )]
    KernelConflict {
        /// The installed kernel's directory.
        dir: PathBuf,
        /// The version both claim.
        version: String,
    },
    /// The `kiln-init` binary cannot be found.
    #[error(
        "cannot find the kiln-init binary (looked at: {tried}): run `make`, which builds it with \
         `RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build --release --target \
         x86_64-unknown-linux-gnu -p kiln-agent --bin kiln-init`, or set KILN_INIT_BIN"
    )]
    KilnInitNotFound {
        /// The places looked at.
        tried: String,
    },
    /// The `kiln-init` binary is not a static x86-64 ELF.
    #[error(
        "{path} is not a static x86-64 executable ({detail}): build it with `make` \
         (RUSTFLAGS=\"-C target-feature=+crt-static\", --target x86_64-unknown-linux-gnu)"
    )]
    KilnInitNotStatic {
        /// The binary.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A manifest could not be written or parsed.
    #[error("manifest {path} is unreadable (delete it to rebuild)")]
    Manifest {
        /// The manifest.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: serde_json::Error,
    },
    /// A filesystem operation failed.
    #[error(transparent)]
    Io(#[from] IoError),
    /// Locking or publishing into the data directory failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl AssetError {
    /// An [`AssetError::Io`] for `action` on `path`.
    pub(crate) fn io(action: &'static str, path: &Path, source: std::io::Error) -> AssetError {
        AssetError::Io(io_err(action, path)(source))
    }
}

impl From<DebError> for AssetError {
    fn from(e: DebError) -> AssetError {
        match e {
            // The only package guest assets fetch is the kernel: say which variable names it.
            DebError::PackageUnknown { package } => AssetError::PackageUnknown { package },
            other => AssetError::Deb(other),
        }
    }
}

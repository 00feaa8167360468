//! Kernel same-page merging (KSM) for guest memory: an operator's option (`kilnd --ksm`).
//!
//! QEMU marks guest RAM mergeable (`madvise(MADV_MERGEABLE)`, its default `mem-merge=on`), so
//! with KSM running the kernel folds identical pages of different MicroVMs into one
//! copy-on-write page: the pages a restored guest wrote (its private copies of the image's
//! memory) are often the same in every clone of that image. Clean pages of an image are
//! already shared through the page cache; KSM reaches the rest. It costs host CPU for
//! scanning and is host-wide, so kiln only turns it on when asked. Merged pages are a known
//! side channel between the VMs that share them (a write that takes longer reveals that
//! another VM holds the same page): operators who host tenants that distrust each other
//! should leave it off.

use std::path::Path;

use crate::VmmError;

const KSM: &str = "/sys/kernel/mm/ksm";

/// KSM's state and what it merged, host-wide.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KsmStats {
    /// Whether the scanner runs.
    pub running: bool,
    /// Distinct merged pages in use.
    pub pages_shared: u64,
    /// Pages deduplicated into them (what merging saves, in pages).
    pub pages_sharing: u64,
}

fn read(name: &str) -> Option<u64> {
    std::fs::read_to_string(Path::new(KSM).join(name))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// KSM's figures, or `None` when the kernel has no KSM.
pub fn stats() -> Option<KsmStats> {
    Some(KsmStats {
        running: read("run")? == 1,
        pages_shared: read("pages_shared").unwrap_or(0),
        pages_sharing: read("pages_sharing").unwrap_or(0),
    })
}

/// Starts the KSM scanner (`/sys/kernel/mm/ksm/run` = 1), keeping the kernel's scan rate.
pub fn enable() -> Result<(), VmmError> {
    let run = Path::new(KSM).join("run");
    if !run.exists() {
        return Err(VmmError::InvalidSpec(
            "this kernel has no KSM (/sys/kernel/mm/ksm is missing): run kilnd without --ksm, \
             or use a kernel built with CONFIG_KSM"
                .into(),
        ));
    }
    std::fs::write(&run, "1").map_err(|e| VmmError::io("turning KSM on through", &run, e))
}

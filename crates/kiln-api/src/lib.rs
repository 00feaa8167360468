//! Wire shapes of the AWS `lambda-microvms` API (model 2025-09-09) as kiln speaks them.
//!
//! The image and MicroVM operations land here with the image issue; until then this crate
//! holds only the vocabulary every other crate shares.

use serde::{Deserialize, Serialize};

/// The hardware accelerator a VM runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualization through `/dev/kvm`.
    Kvm,
    /// QEMU's Tiny Code Generator: pure emulation, always available.
    Tcg,
}

impl Accel {
    /// The name QEMU's `-accel` option takes.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Accel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            other => Err(format!("unknown accelerator '{other}': use 'kvm' or 'tcg'")),
        }
    }
}

//! Wire vocabulary of the AWS `lambda-microvms` API (model 2025-09-09, rest-json) as
//! kiln speaks it, plus the [`Accel`] vocabulary every kiln crate shares.
//!
//! - [`shapes`]: serde structs of every input body, output and nested shape.
//! - [`params`]: URI labels (`…Params`) and query strings (`…Query`).
//! - [`validate`]: the model's constraints, AWS-worded; [`validate::parse_body`].
//! - [`error`]: [`ApiError`], one variant per modeled exception.
//! - [`operation`]: [`Operation`], its method, path, status, and routing.
//! - [`request`]: [`Request`], a routed, parsed and validated call.
//! - [`arn`]: kiln's ARNs and name-or-ARN identifiers.
//! - [`pagination`]: opaque `nextToken`s.

pub mod arn;
pub mod error;
pub mod operation;
pub mod pagination;
pub mod params;
pub mod request;
pub mod shapes;
pub mod timestamp;
pub mod uri;
pub mod validate;

pub use arn::{image_identifier, ArnContext, ImageArn, ImageRef};
pub use error::ApiError;
pub use operation::Operation;
pub use request::Request;
pub use timestamp::Timestamp;
pub use validate::Validate;

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

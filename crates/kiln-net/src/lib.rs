//! Guest network isolation.
//!
//! Every VM's QEMU runs in a network namespace of its own ([`Netns`]) that holds nothing
//! but a loopback device: the guest's "gateway" (slirp's 10.0.2.2, which QEMU maps to
//! loopback) leads nowhere, and the VM's port forwards listen where only kilnd reaches them.
//! The namespace's rules ([`rules`]) send every connection and DNS query the guest makes
//! to the egress [`Gateway`], which decides each by the VM's [`Egress`] policy.

pub mod gateway;
pub mod netns;
pub mod policy;
pub mod rules;
pub mod sniff;

pub use gateway::{Attachment, Flow, Gateway, GatewayConfig, VmEgress};
pub use netns::Netns;
pub use policy::{Allow, Egress};

/// What went wrong setting up a VM's network.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A namespace operation failed.
    #[error("{doing}: {source}")]
    Namespace {
        /// What kiln was doing.
        doing: &'static str,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// `ip` or `nft` failed.
    #[error("{program} failed in a VM's network namespace: {message}")]
    Tool {
        /// The program.
        program: String,
        /// Its words.
        message: String,
    },
    /// The gateway was asked to serve kilnd's own namespace.
    #[error("refusing to attach the egress gateway to kilnd's own network namespace")]
    HostNamespace,
}

//! The client side of AWS authentication, shared by the `kiln` CLI (requests to kilnd) and
//! kilnd (code artifacts from an external S3-compatible store): which access key to use, and
//! SigV4 signatures made by `aws-sigv4` as AWS's SDKs make them.

pub mod credentials;
pub mod signing;

pub use credentials::{CredentialSources, Credentials};
pub use signing::RequestSigner;

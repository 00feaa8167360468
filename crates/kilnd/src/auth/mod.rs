//! Who may do what, and how much: access keys and principals, SigV4 verification, quotas and
//! request throttling.

pub mod keys;
pub mod quotas;
pub mod sigv4;
pub mod throttle;

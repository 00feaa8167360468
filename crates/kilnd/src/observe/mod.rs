//! What operators see: Prometheus metrics, the audit log and usage.

pub mod audit;
pub mod metrics;
pub mod usage;

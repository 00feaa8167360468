//! What operators see: Prometheus metrics and the audit log.

pub mod audit;
pub mod metrics;

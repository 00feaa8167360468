//! What MicroVMs use, as a bill would count it: vCPU-seconds and GiB-seconds while they hold
//! the host's CPUs and memory, seconds suspended, and the size of saved sessions. The store
//! closes each MicroVM's account at every state change (`MicrovmStore::transition_microvm`); this
//! module sums it up for `GET /kiln/v1/usage` (per MicroVM, signed) and `/metrics` (totals
//! only, no ids or principals).

use kiln_api::ApiError;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use serde_json::{json, Value};
use std::sync::Arc;

use crate::store::{Store, UsageReport};

/// Sums of a usage report.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Totals {
    /// MicroVMs counted (those aged out of the store included).
    pub microvms: u64,
    /// vCPU-seconds.
    pub vcpu_seconds: f64,
    /// GiB-seconds of memory.
    pub memory_gib_seconds: f64,
    /// Seconds suspended.
    pub suspended_seconds: f64,
    /// Bytes of saved sessions now on disk.
    pub snapshot_bytes: u64,
}

impl Totals {
    /// The sums over every MicroVM in `report`, those that aged out included.
    pub fn of(report: &UsageReport) -> Totals {
        let mut t = Totals::default();
        for m in &report.microvms {
            t.microvms += 1;
            t.vcpu_seconds += m.vcpu_seconds;
            t.memory_gib_seconds += m.memory_gib_seconds;
            t.suspended_seconds += m.suspended_seconds;
            t.snapshot_bytes += m.snapshot_bytes;
        }
        for r in &report.retired {
            t.microvms += r.microvms;
            t.vcpu_seconds += r.vcpu_seconds;
            t.memory_gib_seconds += r.memory_gib_seconds;
            t.suspended_seconds += r.suspended_seconds;
        }
        t
    }
}

/// The answer of `GET /kiln/v1/usage`: `principal`'s MicroVMs (everyone's for `None`) up to
/// `now`, those that aged out of the store by principal, and the totals.
pub fn report(
    store: &Arc<dyn Store>,
    principal: Option<&str>,
    now: f64,
) -> Result<Value, ApiError> {
    let report = store
        .usage(principal, now)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let t = Totals::of(&report);
    Ok(json!({
        "principal": principal,
        "at": now,
        "microvms": report.microvms,
        "retired": report.retired,
        "totals": {
            "microvms": t.microvms,
            "vcpuSeconds": t.vcpu_seconds,
            "memoryGiBSeconds": t.memory_gib_seconds,
            "suspendedSeconds": t.suspended_seconds,
            "snapshotBytes": t.snapshot_bytes,
        },
    }))
}

/// `kiln_usage_*`: everyone's totals, read from the store at each scrape.
pub(crate) struct UsageTotals {
    pub(crate) store: Arc<dyn Store>,
}

impl std::fmt::Debug for UsageTotals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UsageTotals")
    }
}

impl Collector for UsageTotals {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let t = match self.store.usage(None, crate::now()) {
            Ok(report) => Totals::of(&report),
            Err(e) => {
                tracing::warn!(error = %e, "metrics: cannot read usage");
                return Ok(());
            }
        };
        let counters = [
            (
                "usage_vcpu_seconds",
                "vCPU-seconds MicroVMs held (launching, running, suspending, terminating)",
                t.vcpu_seconds,
            ),
            (
                "usage_memory_gib_seconds",
                "GiB-seconds of guest memory MicroVMs held",
                t.memory_gib_seconds,
            ),
            (
                "usage_suspended_seconds",
                "Seconds MicroVMs spent suspended",
                t.suspended_seconds,
            ),
        ];
        for (name, help, value) in counters {
            let metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(value).encode(metric)?;
        }
        let metric = encoder.encode_descriptor(
            "usage_snapshot_bytes",
            "Bytes of suspended MicroVMs' saved sessions on disk",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(i64::try_from(t.snapshot_bytes).unwrap_or(i64::MAX)).encode(metric)?;
        Ok(())
    }
}

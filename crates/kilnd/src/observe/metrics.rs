//! kilnd's Prometheus metrics: one registry, served in the text exposition format on the API
//! listener's `GET /metrics`.
//!
//! Every label takes a few fixed values (a result, a state, a status class, a refusal
//! reason): no ids, no principals, nothing a scrape could leak or that grows with use.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use kiln_api::shapes::microvm::MicrovmState;
use kiln_api::ApiError;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::store::Store;

/// The `Content-Type` of `GET /metrics` (Prometheus text format 0.0.4).
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// One label with a fixed value.
type Label = [(&'static str, &'static str); 1];

/// Launches, suspends and resumes take from a fraction of a second (KVM) to tens of seconds
/// (TCG, large guests).
const SESSION_BUCKETS: [f64; 13] = [
    0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0,
];

/// Builds take from seconds (every layer cached) to an hour (the step timeout).
const BUILD_BUCKETS: [f64; 11] = [
    5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0,
];

/// Status classes of the proxy's answers, by the status's first digit.
const CODE_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Why the proxy refused a request, by the status of its refusal; the last is the rest.
const REFUSALS: [(u16, &str); 12] = [
    (400, "bad_request"),
    (403, "token"),
    (404, "not_found"),
    (405, "method_not_allowed"),
    (409, "not_running"),
    (413, "body_too_large"),
    (429, "rate_limited"),
    (431, "headers_too_large"),
    (502, "bad_gateway"),
    (503, "unavailable"),
    (504, "gateway_timeout"),
    (0, "other"),
];

/// kilnd's metrics; shared as `Arc<Metrics>` by the API, the supervisor, the builds and
/// (through [`ProxyCounters`]) the endpoint proxy.
pub struct Metrics {
    registry: Registry,
    /// The egress gateway whose totals `encode` adds (set once kilnd has one).
    gateway: std::sync::OnceLock<kiln_net::Gateway>,
    launches: Family<Label, Counter>,
    launch_seconds: Histogram,
    suspends: Family<Label, Counter>,
    suspend_seconds: Histogram,
    resumes: Family<Label, Counter>,
    resume_seconds: Histogram,
    builds: Family<Label, Counter>,
    build_seconds: Histogram,
    proxy: ProxyCounters,
    admitted_microvms: Gauge,
    admitted_memory_mib: Gauge,
    admitted_vcpus: Gauge,
    vcpu_changes: Family<Label, Counter>,
    memory_changes: Family<Label, Counter>,
    warm_pool: Gauge,
    pooled_launches: Counter,
    warmups: Family<Label, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// The endpoint proxy's counters, resolved once so that answering a request only adds to
/// two atomics (no lock, no label lookup). `Default` gives counters no registry shows, for
/// a proxy running without kilnd (tests, benchmarks).
#[derive(Clone, Debug, Default)]
pub struct ProxyCounters {
    classes: [Counter; CODE_CLASSES.len()],
    refusals: [Counter; REFUSALS.len()],
}

impl ProxyCounters {
    /// The proxy answered a request with `status` (the app's answer, or a refusal).
    pub fn answered(&self, status: u16) {
        let class = usize::from(status / 100).clamp(1, CODE_CLASSES.len()) - 1;
        self.classes[class].inc();
    }

    /// The proxy refused a request itself with `status` (counted as answered too).
    pub fn refused(&self, status: u16) {
        self.answered(status);
        let reason = REFUSALS
            .iter()
            .position(|(s, _)| *s == status)
            .unwrap_or(REFUSALS.len() - 1);
        self.refusals[reason].inc();
    }
}

/// `kiln_microvms{state}`: read from the store at each scrape, so it is never out of date.
struct MicrovmStates {
    store: Arc<dyn Store>,
}

impl std::fmt::Debug for MicrovmStates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MicrovmStates")
    }
}

impl Collector for MicrovmStates {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counts: HashMap<String, i64> = match self.store.microvm_state_counts() {
            Ok(counts) => counts,
            Err(e) => {
                // The rest of the scrape is still worth having.
                tracing::warn!(error = %e, "metrics: cannot count MicroVMs by state");
                return Ok(());
            }
        };
        let mut metric = encoder.encode_descriptor(
            "microvms",
            "MicroVMs by state (terminated ones as long as the store remembers them)",
            None,
            MetricType::Gauge,
        )?;
        for state in MicrovmState::ALL {
            let labels: Label = [("state", state.as_str())];
            let n = counts.get(state.as_str()).copied().unwrap_or(0);
            ConstGauge::new(n).encode(metric.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// `kiln_ksm_pages_shared` / `kiln_ksm_pages_sharing`: what the kernel's same-page merging
/// (`kilnd --ksm`) holds, host-wide, read at each scrape; absent on a kernel without KSM.
#[derive(Debug)]
struct Ksm;

impl Collector for Ksm {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(ksm) = kiln_vmm::ksm::stats() else {
            return Ok(());
        };
        let gauges = [
            (
                "ksm_pages_shared",
                "Merged pages KSM keeps (host-wide; KSM runs only with kilnd --ksm)",
                ksm.pages_shared,
            ),
            (
                "ksm_pages_sharing",
                "Pages KSM deduplicated into merged ones: what merging saves, in 4 KiB pages",
                ksm.pages_sharing,
            ),
        ];
        for (name, help, value) in gauges {
            let metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(value as i64).encode(metric)?;
        }
        Ok(())
    }
}

/// Counters by `result` (`ok`, `error`), both series present from the start.
fn results() -> Family<Label, Counter> {
    let family = Family::<Label, Counter>::default();
    for result in ["ok", "error"] {
        family.get_or_create_owned(&[("result", result)]);
    }
    family
}

fn result(ok: bool) -> Label {
    [("result", if ok { "ok" } else { "error" })]
}

impl Metrics {
    /// The metrics, registered under the `kiln_` prefix; MicroVM states are read from `store`.
    pub fn new(store: Arc<dyn Store>) -> Metrics {
        let mut registry = Registry::with_prefix("kiln");
        let launches = results();
        let launch_seconds = Histogram::new(SESSION_BUCKETS);
        let suspends = results();
        let suspend_seconds = Histogram::new(SESSION_BUCKETS);
        let resumes = results();
        let resume_seconds = Histogram::new(SESSION_BUCKETS);
        let builds = results();
        let build_seconds = Histogram::new(BUILD_BUCKETS);
        let requests = Family::<Label, Counter>::default();
        let refusals = Family::<Label, Counter>::default();
        let proxy = ProxyCounters {
            classes: CODE_CLASSES.map(|c| requests.get_or_create_owned(&[("code_class", c)])),
            refusals: REFUSALS.map(|(_, r)| refusals.get_or_create_owned(&[("reason", r)])),
        };
        registry.register(
            "microvm_launches",
            "RunMicrovm calls that tried to launch a MicroVM, by result (requests refused for bad input or unknown images are not launches)",
            launches.clone(),
        );
        registry.register(
            "microvm_launch_seconds",
            "Time from a RunMicrovm request to its MicroVM RUNNING",
            launch_seconds.clone(),
        );
        registry.register(
            "microvm_suspends",
            "Suspends of running MicroVMs (requested or idle), by result",
            suspends.clone(),
        );
        registry.register(
            "microvm_suspend_seconds",
            "Time to suspend a MicroVM (suspend hook, state saved, QEMU gone)",
            suspend_seconds.clone(),
        );
        registry.register(
            "microvm_resumes",
            "Resumes of suspended MicroVMs (requested or automatic), by result",
            resumes.clone(),
        );
        registry.register(
            "microvm_resume_seconds",
            "Time to resume a MicroVM until it runs again",
            resume_seconds.clone(),
        );
        registry.register(
            "proxy_requests",
            "Requests the endpoint proxy answered, by status class (refusals included)",
            requests,
        );
        registry.register(
            "proxy_errors",
            "Requests the endpoint proxy refused itself, by reason (token, not_found, not_running, unavailable…)",
            refusals,
        );
        registry.register(
            "image_builds",
            "Image version builds that ended, by result",
            builds.clone(),
        );
        registry.register(
            "image_build_seconds",
            "Time an image version's build ran (its wait for a build slot excluded)",
            build_seconds.clone(),
        );
        let admitted_microvms = Gauge::default();
        let admitted_memory_mib = Gauge::default();
        registry.register(
            "admitted_microvms",
            "MicroVMs holding a slot of this host's capacity (pending, running and suspended ones)",
            admitted_microvms.clone(),
        );
        registry.register(
            "admitted_memory_mib",
            "Guest memory reserved on this host (pending and running MicroVMs and resumes in progress, and what the sizer plugged into them under load), MiB",
            admitted_memory_mib.clone(),
        );
        let admitted_vcpus = Gauge::default();
        registry.register(
            "admitted_vcpus",
            "vCPUs granted on this host: resident MicroVMs' baselines and what the sizer added under load",
            admitted_vcpus.clone(),
        );
        let vcpu_changes = Family::<Label, Counter>::default();
        registry.register(
            "microvm_vcpu_changes",
            "The sizer's changes to MicroVMs' vCPUs (change=grow|shrink) and growth the vCPU budget refused (change=refused)",
            vcpu_changes.clone(),
        );
        let memory_changes = Family::<Label, Counter>::default();
        registry.register(
            "microvm_memory_changes",
            "The sizer's changes to MicroVMs' memory (change=grow|shrink) and growth the memory budget refused (change=refused)",
            memory_changes.clone(),
        );
        let warm_pool = Gauge::default();
        registry.register(
            "warm_pool_microvms",
            "MicroVMs restored and paused ahead of demand (held in the admitted figures too)",
            warm_pool.clone(),
        );
        let pooled_launches = Counter::default();
        registry.register(
            "microvm_launches_from_pool",
            "Launches that took a MicroVM from the warm pool instead of restoring one",
            pooled_launches.clone(),
        );
        let warmups = results();
        registry.register(
            "warm_pool_warmups",
            "Pooled MicroVMs whose guest walked its process and network paths before being paused, by result",
            warmups.clone(),
        );
        registry.register_collector(Box::new(MicrovmStates {
            store: store.clone(),
        }));
        registry.register_collector(Box::new(crate::observe::usage::UsageTotals { store }));
        registry.register_collector(Box::new(Ksm));
        Metrics {
            gateway: std::sync::OnceLock::new(),
            registry,
            launches,
            launch_seconds,
            suspends,
            suspend_seconds,
            resumes,
            resume_seconds,
            builds,
            build_seconds,
            proxy,
            admitted_microvms,
            admitted_memory_mib,
            admitted_vcpus,
            vcpu_changes,
            memory_changes,
            warm_pool,
            pooled_launches,
            warmups,
        }
    }

    /// How many MicroVMs the warm pool holds now.
    pub fn set_warm_pool(&self, microvms: usize) {
        self.warm_pool.set(microvms as i64);
    }

    /// A launch took a pooled MicroVM.
    pub fn launched_from_pool(&self) {
        self.pooled_launches.inc();
    }

    /// A pooled VM's warm-up ended (`ok`: its guest walked the paths).
    pub fn warmed(&self, ok: bool) {
        self.warmups.get_or_create(&result(ok)).inc();
    }

    /// What the supervisor has admitted now: MicroVMs, guest memory and vCPUs.
    pub fn set_admitted(&self, microvms: usize, memory_mib: u64, vcpus: u64) {
        self.admitted_microvms.set(microvms as i64);
        self.admitted_memory_mib.set(memory_mib as i64);
        self.admitted_vcpus
            .set(i64::try_from(vcpus).unwrap_or(i64::MAX));
    }

    /// The sizer changed a MicroVM's vCPUs, or the budget refused growth: `grow`, `shrink`,
    /// `refused`.
    pub fn vcpu_change(&self, change: &'static str) {
        self.vcpu_changes.get_or_create(&[("change", change)]).inc();
    }

    /// The sizer changed a MicroVM's memory, or the budget refused growth: `grow`, `shrink`,
    /// `refused`.
    pub fn memory_change(&self, change: &'static str) {
        self.memory_changes
            .get_or_create(&[("change", change)])
            .inc();
    }

    /// Every metric in the Prometheus text exposition format.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry)?;
        if let Some(gateway) = self.gateway.get() {
            let egress = egress_text(gateway.counters());
            match text.rfind("# EOF") {
                Some(at) => text.insert_str(at, &egress),
                None => text.push_str(&egress),
            }
        }
        Ok(text)
    }

    /// Counts the egress gateway's flows in `encode` from now on.
    pub fn set_gateway(&self, gateway: kiln_net::Gateway) {
        let _ = self.gateway.set(gateway);
    }

    /// The counters the endpoint proxy adds to.
    pub fn proxy_counters(&self) -> ProxyCounters {
        self.proxy.clone()
    }

    /// A RunMicrovm call ended after `elapsed`. A request refused before any launch (bad
    /// input, an image the caller cannot see) is not counted.
    pub fn launch_finished<T>(&self, outcome: &Result<T, ApiError>, elapsed: Duration) {
        match outcome {
            Ok(_) => {
                self.launches.get_or_create(&result(true)).inc();
                self.launch_seconds.observe(elapsed.as_secs_f64());
            }
            Err(e) if matches!(e.status(), 400 | 403 | 404) => {}
            Err(_) => {
                self.launches.get_or_create(&result(false)).inc();
            }
        }
    }

    /// A suspend ended after `elapsed`.
    pub fn suspend_finished(&self, ok: bool, elapsed: Duration) {
        self.suspends.get_or_create(&result(ok)).inc();
        if ok {
            self.suspend_seconds.observe(elapsed.as_secs_f64());
        }
    }

    /// A resume ended after `elapsed`.
    pub fn resume_finished(&self, ok: bool, elapsed: Duration) {
        self.resumes.get_or_create(&result(ok)).inc();
        if ok {
            self.resume_seconds.observe(elapsed.as_secs_f64());
        }
    }

    /// An image build ended after `elapsed`.
    pub fn build_finished(&self, ok: bool, elapsed: Duration) {
        self.builds.get_or_create(&result(ok)).inc();
        self.build_seconds.observe(elapsed.as_secs_f64());
    }
}

/// The gateway's totals as Prometheus counters (no VM ids or destinations: those are in
/// each MicroVM's flows).
fn egress_text(c: &kiln_net::gateway::Counters) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    format!(
        "# HELP kiln_egress_connections Guest connections through the egress gateway, by verdict.\n\
         # TYPE kiln_egress_connections counter\n\
         kiln_egress_connections_total{{verdict=\"allowed\"}} {}\n\
         kiln_egress_connections_total{{verdict=\"blocked\"}} {}\n\
         # HELP kiln_egress_dns_queries Guest DNS queries the egress resolver answered or refused.\n\
         # TYPE kiln_egress_dns_queries counter\n\
         kiln_egress_dns_queries_total{{answer=\"answered\"}} {}\n\
         kiln_egress_dns_queries_total{{answer=\"refused\"}} {}\n\
         # HELP kiln_egress_bytes Bytes relayed by the egress gateway, by direction.\n\
         # TYPE kiln_egress_bytes counter\n\
         kiln_egress_bytes_total{{direction=\"out\"}} {}\n\
         kiln_egress_bytes_total{{direction=\"in\"}} {}\n",
        c.allowed.load(Relaxed),
        c.blocked.load(Relaxed),
        c.dns_answered.load(Relaxed),
        c.dns_refused.load(Relaxed),
        c.bytes_out.load(Relaxed),
        c.bytes_in.load(Relaxed),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> (tempfile::TempDir, Metrics) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store =
            crate::store::SqliteStore::open(&dir.path().join("kiln.db"), "host-a").expect("store");
        (dir, Metrics::new(Arc::new(store)))
    }

    #[test]
    fn encode_when_the_kernel_has_ksm_then_what_it_merged_is_there() {
        let (_dir, metrics) = metrics();
        if kiln_vmm::ksm::stats().is_none() {
            // A kernel without KSM: the gauges are left out, nothing else to check.
            return;
        }

        let text = metrics.encode().expect("encode");

        assert!(
            text.lines()
                .any(|l| l.starts_with("kiln_ksm_pages_sharing ")),
            "kiln_ksm_pages_sharing missing from:\n{text}"
        );
        assert!(
            text.contains("# TYPE kiln_ksm_pages_shared gauge"),
            "{text}"
        );
    }

    #[test]
    fn encode_when_fresh_then_every_metric_is_there_at_zero() {
        let (_dir, metrics) = metrics();

        let text = metrics.encode().expect("encode");

        for line in [
            "kiln_microvm_launches_total{result=\"ok\"} 0",
            "kiln_microvm_launches_total{result=\"error\"} 0",
            "kiln_microvm_launch_seconds_count 0",
            "kiln_microvm_suspends_total{result=\"ok\"} 0",
            "kiln_microvm_resumes_total{result=\"ok\"} 0",
            "kiln_image_builds_total{result=\"ok\"} 0",
            "kiln_image_build_seconds_count 0",
            "kiln_proxy_requests_total{code_class=\"2xx\"} 0",
            "kiln_proxy_errors_total{reason=\"token\"} 0",
            "kiln_microvms{state=\"RUNNING\"} 0",
            "# TYPE kiln_microvms gauge",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from:\n{text}"
            );
        }
    }

    #[test]
    fn proxy_counters_when_answers_and_refusals_then_classes_and_reasons_count() {
        let (_dir, metrics) = metrics();
        let counters = metrics.proxy_counters();

        counters.answered(200);
        counters.answered(101);
        counters.refused(403);
        counters.refused(418);
        let text = metrics.encode().expect("encode");

        for line in [
            "kiln_proxy_requests_total{code_class=\"1xx\"} 1",
            "kiln_proxy_requests_total{code_class=\"2xx\"} 1",
            "kiln_proxy_requests_total{code_class=\"4xx\"} 2",
            "kiln_proxy_errors_total{reason=\"token\"} 1",
            "kiln_proxy_errors_total{reason=\"other\"} 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from:\n{text}"
            );
        }
    }

    #[test]
    fn launch_finished_when_refused_for_bad_input_then_not_a_launch() {
        let (_dir, metrics) = metrics();

        metrics.launch_finished::<()>(&Ok(()), Duration::from_millis(1500));
        metrics.launch_finished::<()>(&Err(ApiError::validation("bad")), Duration::from_millis(1));
        metrics.launch_finished::<()>(&Err(ApiError::internal("qemu died")), Duration::ZERO);
        let text = metrics.encode().expect("encode");

        for line in [
            "kiln_microvm_launches_total{result=\"ok\"} 1",
            "kiln_microvm_launches_total{result=\"error\"} 1",
            "kiln_microvm_launch_seconds_count 1",
            "kiln_microvm_launch_seconds_bucket{le=\"2\"} 1",
            "kiln_microvm_launch_seconds_bucket{le=\"1\"} 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from:\n{text}"
            );
        }
    }
}

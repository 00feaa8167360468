//! kilnd's configuration: flags, with defaults that keep everything on loopback.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::auth::quotas::Limits;
use crate::auth::throttle::ThrottleRule;

/// kilnd: the kiln daemon (API server, image builder, MicroVM supervisor).
#[derive(Debug, Clone, Parser)]
#[command(name = "kilnd", version, about)]
pub struct Config {
    /// Data directory (images, VMs, the metadata database).
    #[arg(long, env = "KILN_HOME", value_name = "DIR")]
    pub home: Option<PathBuf>,
    /// Address of the AWS-compatible API (and kiln's own /kiln/v1 endpoints).
    #[arg(long, default_value = "127.0.0.1:7171", value_name = "ADDR")]
    pub api_listen: SocketAddr,
    /// Address of the MicroVM endpoint proxy (HTTPS).
    #[arg(long, default_value = "127.0.0.1:7443", value_name = "ADDR")]
    pub endpoint_listen: SocketAddr,
    /// Extra CA certificates (PEM) that build steps trust, e.g. a TLS-intercepting proxy's.
    /// They live in the build VM's tmpfs only and are never written into an image.
    #[arg(long, value_name = "PEM")]
    pub build_ca: Option<PathBuf>,
    /// Let the admin name `file://` code artifacts under this directory (repeatable; links
    /// are resolved before the check). Without one, kilnd reads no artifacts from its host:
    /// zips come through S3 (`aws s3 cp`, `kiln build`). Other principals never use file://.
    #[arg(long = "artifact-root", value_name = "DIR")]
    pub artifact_roots: Vec<PathBuf>,
    /// Fetch `s3://` code artifacts from this S3-compatible endpoint (path-style, e.g.
    /// https://s3.example.com:9000) instead of kilnd's embedded store.
    #[arg(long, value_name = "URL")]
    pub artifact_s3_endpoint: Option<String>,
    /// Credentials for --artifact-s3-endpoint: an AWS shared-credentials file, profile
    /// `default` [default: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY].
    #[arg(long, value_name = "FILE", requires = "artifact_s3_endpoint")]
    pub artifact_s3_credentials: Option<PathBuf>,
    /// Let PRINCIPAL name `s3://BUCKET/…` artifacts in the --artifact-s3-endpoint store
    /// (repeatable). kilnd fetches with its own credentials, so an ungranted bucket is the
    /// admin's only.
    #[arg(long = "artifact-s3-bucket", value_name = "BUCKET=PRINCIPAL")]
    pub artifact_s3_buckets: Vec<crate::artifacts::BucketGrant>,
    /// Region the requests to --artifact-s3-endpoint are signed for.
    #[arg(long, default_value = "us-east-1", value_name = "REGION")]
    pub artifact_s3_region: String,
    /// Memory of build VMs, MiB.
    #[arg(long, default_value_t = 1024)]
    pub build_memory_mib: u64,
    /// Default memory of app VMs when an image does not ask for more, MiB.
    #[arg(long, default_value_t = 512)]
    pub default_memory_mib: u64,
    /// How long an app may take to become ready during a build, seconds.
    #[arg(long, default_value_t = 300)]
    pub ready_timeout_secs: u64,
    /// How long one RUN step may take, seconds.
    #[arg(long, default_value_t = 3600)]
    pub step_timeout_secs: u64,
    /// DNS domain of MicroVM endpoints: `<microvm-id>.<domain>`.
    #[arg(long, default_value = "kiln.localhost")]
    pub endpoint_domain: String,
    /// Most MicroVMs running (or being launched) at once.
    #[arg(long, default_value_t = 32)]
    pub max_microvms: usize,
    /// Most guest memory, MiB, all MicroVMs together (default: 75% of the host's memory),
    /// before `--memory-overcommit`.
    #[arg(long)]
    pub max_memory_mib: Option<u64>,
    /// How many times `--max-memory-mib` the MicroVMs' memory may add up to. Idle guests
    /// touch little of what they are given (measure with `cargo bench -p kilnd --bench
    /// density`), so e.g. 4 admits four times as many; `--min-available-mib` still guards
    /// the host's real memory.
    #[arg(long, default_value_t = 1.0, value_parser = overcommit_ratio, value_name = "RATIO")]
    pub memory_overcommit: f64,
    /// Refuse launches and resumes while the host has less memory available than this
    /// (MemAvailable), MiB.
    #[arg(long, default_value_t = 1024, value_name = "MIB")]
    pub min_available_mib: u64,
    /// Most vCPUs all MicroVMs together may be granted: each holds its baseline (a vCPU per
    /// 2 GiB of memory, at least one) while resident, and what the sizer grants on top under
    /// load (default: 16 per host CPU; CPU time is shared by weight and every VM's cgroup
    /// quota caps it at its grant, so the budget bounds what is promised, not what idles).
    #[arg(long, value_name = "N")]
    pub max_vcpus: Option<u64>,
    /// Whether a busy MicroVM grows: `on` grants a vCPU at a time, up to four times its
    /// baseline, while it uses nearly all it has (and takes them back when it idles), and
    /// builds images to allow it; `off` keeps every MicroVM at its baseline and builds
    /// images fixed at it (under TCG those restore and first answer ~20 % sooner).
    #[arg(long, default_value = "on", value_name = "on|off", value_parser = on_off, action = clap::ArgAction::Set)]
    pub vcpu_growth: bool,
    /// Whether a MicroVM short of memory grows: `on` plugs memory into a guest whose kernel
    /// has under 15 % available, up to four times its baseline, and takes it back a step at a
    /// time when it has plenty to spare; `off` leaves every MicroVM with what it has. Only
    /// MicroVMs on `q35` (see `--machine`) can grow; growth counts in admission and usage.
    #[arg(long, default_value = "on", value_name = "on|off", value_parser = on_off, action = clap::ArgAction::Set)]
    pub memory_growth: bool,
    /// The machine new images' app VMs — and so every MicroVM launched from them — run on:
    /// `q35` (a virtio-mem device lets the VM's memory grow to four times the image's, see
    /// `--memory-growth`) or `microvm` (memory fixed at the image's; boots ~0.3 s sooner
    /// under TCG, launches as fast). An image keeps the machine it was built with.
    #[arg(long, default_value = "q35", value_name = "q35|microvm", value_parser = machine_kind)]
    pub machine: kiln_vmm::MachineKind,
    /// MicroVMs kept restored and paused for each image version launched in the last ten
    /// minutes, so RunMicrovm only continues one (0: no warm pool). Before one is paused its
    /// app is checked as the build checked it (a TCP connection to its port, and its ready
    /// hook or HEALTHCHECK), which warms the path a first request takes. They hold VM slots
    /// and memory like running MicroVMs and give them up first when a launch needs room.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub warm_pool: usize,
    /// The most pooled MicroVMs one version gets when its launch rate is high (its launches
    /// in the last minute, at least `--warm-pool`).
    #[arg(long, default_value_t = 4, value_name = "N")]
    pub warm_pool_max: usize,
    /// Turn the kernel's same-page merging (KSM) on at start: identical guest pages of
    /// different MicroVMs become one copy-on-write page (more idle sessions per GiB, some host
    /// CPU for scanning). Host-wide, and merged pages are a timing side channel between the
    /// VMs sharing them: leave it off where tenants distrust each other.
    #[arg(long)]
    pub ksm: bool,
    /// Smallest `idlePolicy.maxIdleDurationSeconds` accepted (AWS: 60). Lower only for tests.
    #[arg(long, default_value_t = 60)]
    pub min_idle_seconds: i32,
    /// How long a TERMINATED MicroVM stays visible to GetMicrovm and ListMicrovms, seconds;
    /// then it is forgotten.
    #[arg(long, default_value_t = 600, value_name = "SECS")]
    pub terminated_retention_secs: u64,
    /// How long an idempotency token (`clientToken`) is remembered, seconds; a token reused
    /// later runs the request anew. The model names no window: 8 h is a MicroVM's longest life.
    #[arg(long, default_value_t = 8 * 3600, value_name = "SECS")]
    pub client_token_ttl_secs: u64,
    /// AWS region name used in ARNs.
    #[arg(long, default_value = "local")]
    pub region: String,
    /// Run QEMU without confinement (no own uid, mount namespace, capability drop or
    /// cgroup): only for hosts that run no untrusted guests. Logged loudly; without it kilnd
    /// refuses KILN_JAIL=off.
    #[arg(long)]
    pub unconfined: bool,
    /// Account id of principal admin (and of operator network connectors) in ARNs; every
    /// other principal gets its own, allocated with its first key.
    #[arg(long, default_value = "000000000000")]
    pub account: String,
    /// This host's id in the metadata store (its MicroVMs and image versions are filed
    /// under it, and a restart picks up only those): 1-64 letters, digits, '.', '_', '-'.
    /// Default: the one kept in <home>/host-id, generated on the first start.
    #[arg(long, value_name = "ID")]
    pub host_id: Option<String>,
    /// Endpoint token keys rotate when the newest is this many seconds old (0: never).
    /// Retired keys keep verifying the tokens they issued until those have all expired
    /// (the longest token lifetime, 60 minutes, plus 5), then are dropped.
    #[arg(long, default_value_t = 86_400, value_name = "SECONDS")]
    pub token_key_rotation_secs: u64,
    /// Let every VM with egress also reach this (repeatable): `NAME[:PORTS]`, `*.NAME[:PORTS]`
    /// or `CIDR[:PORTS]`, e.g. an internal package mirror `10.20.0.5/32:3142`. Loopback,
    /// link-local and the host's own addresses stay unreachable whatever is allowed.
    #[arg(long = "egress-allow", value_name = "ENTRY")]
    pub egress_allow: Vec<kiln_net::Allow>,
    /// Names the egress resolver answers from this file (/etc/hosts format) before asking
    /// the host's resolver.
    #[arg(long, value_name = "FILE")]
    pub egress_hosts: Option<PathBuf>,
    /// Per-principal quota: MicroVMs pending, running or suspended at once.
    #[arg(long, default_value_t = Limits::default().microvms, value_name = "N")]
    pub quota_microvms: u64,
    /// Per-principal quota: guest memory of those MicroVMs together, MiB (baselines and what
    /// they grew to under load).
    #[arg(long, default_value_t = Limits::default().memory_mib, value_name = "MIB")]
    pub quota_memory_mib: u64,
    /// Per-principal quota: images (AWS: 100).
    #[arg(long, default_value_t = Limits::default().images, value_name = "N")]
    pub quota_images: u64,
    /// Per-principal quota: versions of one image (AWS: 50).
    #[arg(long, default_value_t = Limits::default().versions_per_image, value_name = "N")]
    pub quota_versions_per_image: u64,
    /// Per-principal quota: MiB stored (image snapshots, suspended MicroVMs, S3 objects).
    #[arg(long, default_value_t = Limits::default().stored_bytes >> 20, value_name = "MIB")]
    pub quota_stored_mib: u64,
    /// Per-principal quota: image builds pending or in progress (AWS: 5).
    #[arg(long, default_value_t = Limits::default().concurrent_builds, value_name = "N")]
    pub quota_concurrent_builds: u64,
    /// Per-principal quota: seconds one build may run before it fails.
    #[arg(long, default_value_t = Limits::default().build_seconds, value_name = "SECONDS")]
    pub quota_build_seconds: u64,
    /// Principals' own limits (JSON): `{"alice": {"microvms": 50, "storedBytes": 1073741824}}`;
    /// fields as `GET /kiln/v1/quotas` names them (microvms, memoryMib, images,
    /// versionsPerImage, storedBytes, concurrentBuilds, buildSeconds).
    #[arg(long, value_name = "FILE")]
    pub quota_overrides: Option<PathBuf>,
    /// API rate per principal and operation, over AWS's defaults (RunMicrovm 5/s,
    /// ResumeMicrovm 5, SuspendMicrovm 2, TerminateMicrovm 10, GetMicrovm 100,
    /// CreateMicrovmAuthToken 50, CreateMicrovmShellAuthToken 5; others unthrottled):
    /// `OPERATION=RATE[/BURST]`, `*=RATE` for every other operation, RATE 0 = unthrottled
    /// (repeatable).
    #[arg(long = "throttle", value_name = "OP=RATE[/BURST]")]
    pub throttle: Vec<ThrottleRule>,
    /// Endpoint: most client connections carrying one MicroVM's traffic at once (0 = no cap).
    #[arg(long, default_value_t = 1000, value_name = "N")]
    pub endpoint_max_connections_per_vm: usize,
    /// Endpoint: most connections open from one client address at once (0 = no cap).
    #[arg(long, default_value_t = 256, value_name = "N")]
    pub endpoint_max_connections_per_client: usize,
    /// Endpoint: most distinct guest ports one MicroVM may be reached on (0 = no cap).
    #[arg(long, default_value_t = 16, value_name = "N")]
    pub endpoint_max_ports_per_vm: usize,
    /// Pull REGISTRY's images (`FROM …`) through a mirror first (repeatable), e.g.
    /// `docker.io=http://127.0.0.1:5000`; an `http://` URL means plain HTTP.
    #[arg(
        long = "registry-mirror",
        value_name = "REGISTRY=URL",
        env = "KILN_REGISTRY_MIRRORS",
        value_delimiter = ','
    )]
    pub registry_mirrors: Vec<kiln_image::oci::Mirror>,
    /// Registries (`host[:port]`) spoken to over plain HTTP (loopback ones always are).
    #[arg(long = "registry-insecure", value_name = "HOST[:PORT]")]
    pub registry_insecure: Vec<String>,
    /// Registry credentials: a Docker config.json (`auths`) [default:
    /// $DOCKER_CONFIG/config.json or ~/.docker/config.json of kilnd's user, when present].
    #[arg(long, value_name = "FILE", env = "KILN_REGISTRY_CREDENTIALS")]
    pub registry_credentials: Option<PathBuf>,
    /// Registry blob cache per principal, MiB; the least recently used blobs go first.
    #[arg(long, default_value_t = 20 * 1024, value_name = "MIB")]
    pub registry_cache_mib: u64,
}

impl Config {
    /// The data directory.
    pub fn home(&self) -> PathBuf {
        self.home.clone().unwrap_or_else(kiln_vmm::home::kiln_home)
    }
    /// [`Config::ready_timeout_secs`] as a duration.
    pub fn ready_timeout(&self) -> Duration {
        Duration::from_secs(self.ready_timeout_secs)
    }
    /// The memory budget for MicroVMs, MiB: `--max-memory-mib` (or 75 % of the host's
    /// memory) times `--memory-overcommit`.
    pub fn memory_budget_mib(&self) -> u64 {
        let base = self
            .max_memory_mib
            .unwrap_or_else(|| meminfo_kib("MemTotal:").unwrap_or(4 << 20) / 1024 * 3 / 4);
        (base as f64 * self.memory_overcommit) as u64
    }
    /// The vCPU budget for MicroVMs: `--max-vcpus`, or 16 per host CPU.
    pub fn vcpu_budget(&self) -> u64 {
        self.max_vcpus.unwrap_or_else(|| {
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
            16 * cpus as u64
        })
    }
    /// The default per-principal quotas from the `--quota-*` flags.
    pub fn quota_limits(&self) -> Limits {
        Limits {
            microvms: self.quota_microvms,
            memory_mib: self.quota_memory_mib,
            images: self.quota_images,
            versions_per_image: self.quota_versions_per_image,
            stored_bytes: self.quota_stored_mib.saturating_mul(1 << 20),
            concurrent_builds: self.quota_concurrent_builds,
            build_seconds: self.quota_build_seconds,
        }
    }
    /// [`Config::step_timeout_secs`] as a duration.
    pub fn step_timeout(&self) -> Duration {
        Duration::from_secs(self.step_timeout_secs)
    }
}

/// A `/proc/meminfo` figure (`MemTotal:`, `MemAvailable:` …), KiB.
pub fn meminfo_kib(field: &str) -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo")
        .ok()?
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// `on` or `off`.
fn on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("{s:?} is neither on nor off")),
    }
}

/// `--machine`: `microvm` or `q35`.
fn machine_kind(s: &str) -> Result<kiln_vmm::MachineKind, String> {
    match s {
        "microvm" => Ok(kiln_vmm::MachineKind::Microvm),
        "q35" => Ok(kiln_vmm::MachineKind::Q35),
        _ => Err(format!("{s:?} is neither microvm nor q35")),
    }
}

/// `--memory-overcommit`: a finite ratio from 1 to 16.
fn overcommit_ratio(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (1.0..=16.0).contains(&r) => Ok(r),
        _ => Err(format!(
            "{s:?} is not a ratio from 1 to 16 (e.g. --memory-overcommit 4)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_budget_when_overcommitted_then_scaled_and_bad_ratios_refused() {
        let budget = |args: &[&str]| {
            let argv = ["kilnd", "--max-memory-mib", "1000"].iter().chain(args);
            Config::try_parse_from(argv).map(|c| c.memory_budget_mib())
        };

        assert_eq!(budget(&[]).ok(), Some(1000));
        assert_eq!(budget(&["--memory-overcommit", "4"]).ok(), Some(4000));
        assert_eq!(budget(&["--memory-overcommit", "1.5"]).ok(), Some(1500));
        for bad in ["0.5", "17", "NaN", "inf", "four"] {
            let e = budget(&["--memory-overcommit", bad]).expect_err(bad);
            assert!(e.to_string().contains("ratio from 1 to 16"), "{e}");
        }
    }

    #[test]
    fn machine_when_absent_then_q35_and_microvm_taken_and_anything_else_refused() {
        let machine = |args: &[&str]| {
            let argv = std::iter::once("kilnd").chain(args.iter().copied());
            Config::try_parse_from(argv).map(|c| c.machine)
        };

        assert_eq!(machine(&[]).ok(), Some(kiln_vmm::MachineKind::Q35));
        assert_eq!(
            machine(&["--machine", "microvm"]).ok(),
            Some(kiln_vmm::MachineKind::Microvm)
        );
        let e = machine(&["--machine", "pc"]).expect_err("pc");
        assert!(e.to_string().contains("neither microvm nor q35"), "{e}");
    }

    #[test]
    fn vcpu_growth_when_given_on_or_off_then_taken_and_anything_else_refused() {
        let growth = |args: &[&str]| {
            let argv = ["kilnd"].iter().chain(args);
            Config::try_parse_from(argv).map(|c| c.vcpu_growth)
        };

        assert_eq!(growth(&[]).ok(), Some(true));
        assert_eq!(growth(&["--vcpu-growth", "off"]).ok(), Some(false));
        assert_eq!(growth(&["--vcpu-growth", "on"]).ok(), Some(true));
        let e = growth(&["--vcpu-growth", "yes"]).expect_err("yes");
        assert!(e.to_string().contains("neither on nor off"), "{e}");
    }
}

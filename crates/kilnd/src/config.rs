//! kilnd's configuration: flags, with defaults that keep everything on loopback.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

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
    /// Most guest memory, MiB, all MicroVMs together (default: 75% of the host's memory).
    #[arg(long)]
    pub max_memory_mib: Option<u64>,
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
    /// AWS account id used in ARNs.
    #[arg(long, default_value = "000000000000")]
    pub account: String,
    /// Let every VM with egress also reach this (repeatable): `NAME[:PORTS]`, `*.NAME[:PORTS]`
    /// or `CIDR[:PORTS]`, e.g. an internal package mirror `10.20.0.5/32:3142`. Loopback,
    /// link-local and the host's own addresses stay unreachable whatever is allowed.
    #[arg(long = "egress-allow", value_name = "ENTRY")]
    pub egress_allow: Vec<kiln_net::Allow>,
    /// Names the egress resolver answers from this file (/etc/hosts format) before asking
    /// the host's resolver.
    #[arg(long, value_name = "FILE")]
    pub egress_hosts: Option<PathBuf>,
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
    /// The memory budget for MicroVMs, MiB.
    pub fn memory_budget_mib(&self) -> u64 {
        self.max_memory_mib.unwrap_or_else(|| {
            let total_kib = std::fs::read_to_string("/proc/meminfo")
                .ok()
                .and_then(|m| {
                    m.lines()
                        .find(|l| l.starts_with("MemTotal:"))
                        .and_then(|l| l.split_whitespace().nth(1))
                        .and_then(|n| n.parse::<u64>().ok())
                })
                .unwrap_or(4 << 20);
            total_kib / 1024 * 3 / 4
        })
    }
    /// [`Config::step_timeout_secs`] as a duration.
    pub fn step_timeout(&self) -> Duration {
        Duration::from_secs(self.step_timeout_secs)
    }
}

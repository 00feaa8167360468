//! Image builds: one task per image version, run one at a time (TCG builds saturate the
//! host's cores), with every state change recorded in the store.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_api::shapes::common::CodeArtifact;
use kiln_api::shapes::image::{ImageVersionConfig, MicrovmImageState};
use kiln_image::build::{BuildLog, BuildSecrets, BuildSpec, HookSpec};

use crate::supervisor::network::Network;
use kiln_vmm::host::Host;
use tokio::sync::Semaphore;

use crate::artifacts::remote::RemoteS3;
use crate::artifacts::s3::S3Store;
use crate::artifacts::{bucket_of, ArtifactPolicy};
use crate::config::Config;
use crate::images::managed;
use crate::now;
use crate::observe::metrics::Metrics;
use crate::store::Store;

/// Starts and tracks image builds.
#[derive(Clone)]
pub struct Builds {
    host: Arc<Host>,
    store: Arc<dyn Store>,
    config: Arc<Config>,
    s3: Arc<S3Store>,
    remote_s3: Option<Arc<RemoteS3>>,
    artifacts: Arc<ArtifactPolicy>,
    metrics: Arc<Metrics>,
    slots: Arc<Semaphore>,
    /// Connectors and the egress gateway (a build's egress is its image's connector).
    pub network: Arc<Network>,
    /// Build secrets waiting for their build.
    pub secrets: Arc<SecretsBook>,
    /// Per-principal quotas (how long a build may run).
    quotas: Arc<crate::auth::quotas::Quotas>,
}

/// How long staged build secrets wait for the build that uses them.
const SECRETS_HELD_FOR: Duration = Duration::from_secs(15 * 60);

/// Build secrets staged through `PUT /kiln/v1/images/{name}/build-secrets`, held in memory
/// only (never in the store or on disk) per (principal, image) until the next build of that
/// image by its owner takes them, or for [`SECRETS_HELD_FOR`]. A build started again after
/// a kilnd restart has none: a step that requires one fails, saying how to pass it.
#[derive(Default)]
pub struct SecretsBook {
    held: Mutex<HashMap<(String, String), (Instant, BuildSecrets)>>,
}

impl SecretsBook {
    /// Stages `secrets` for the next build of `image` owned by `principal` (replacing any).
    pub fn put(&self, principal: &str, image: &str, secrets: BuildSecrets) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.retain(|_, (at, _)| at.elapsed() < SECRETS_HELD_FOR);
        held.insert((principal.into(), image.into()), (Instant::now(), secrets));
    }

    /// Takes the secrets staged for `image` by `owner` (none when nothing fresh is held).
    pub fn take(&self, owner: &str, image: &str) -> BuildSecrets {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        match held.remove(&(owner.to_string(), image.to_string())) {
            Some((at, secrets)) if at.elapsed() < SECRETS_HELD_FOR => secrets,
            _ => BuildSecrets::default(),
        }
    }
}

/// Where an image version's files live.
pub fn version_dir(home: &Path, image: &str, version: i64) -> PathBuf {
    home.join("images").join(image).join(version.to_string())
}

impl Builds {
    /// A build runner.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        host: Arc<Host>,
        store: Arc<dyn Store>,
        config: Arc<Config>,
        s3: Arc<S3Store>,
        remote_s3: Option<Arc<RemoteS3>>,
        metrics: Arc<Metrics>,
        network: Arc<Network>,
        quotas: Arc<crate::auth::quotas::Quotas>,
    ) -> Builds {
        let artifacts = Arc::new(ArtifactPolicy::new(
            config.artifact_roots.clone(),
            config.artifact_s3_buckets.clone(),
        ));
        Builds {
            quotas,
            network,
            host,
            store,
            config,
            artifacts,
            s3,
            remote_s3,
            metrics,
            slots: Arc::new(Semaphore::new(1)),
            secrets: Arc::new(SecretsBook::default()),
        }
    }

    /// The embedded S3 store code artifacts come from, unless an external one is set.
    pub fn s3(&self) -> &S3Store {
        &self.s3
    }

    /// The external S3-compatible store `s3://uri` comes from: configured, and the bucket is
    /// not one of the embedded store's (those stay reachable, so `kiln build`'s uploads work
    /// whichever store holds the operator's artifacts).
    pub fn remote_s3_for(&self, uri: &str) -> Option<&RemoteS3> {
        self.remote_s3
            .as_deref()
            .filter(|_| !self.s3.has_bucket(bucket_of(uri)))
    }

    /// Which artifacts a principal may name.
    pub fn artifacts(&self) -> &ArtifactPolicy {
        &self.artifacts
    }

    /// Builds `image` (the image's store key) version `version` in the background. `first`
    /// says whether this is the image's first version (CREATING) or an update (UPDATING).
    pub fn spawn(&self, image: String, version: i64, spec: ImageVersionConfig, first: bool) {
        let this = self.clone();
        tokio::spawn(async move {
            let Ok(_permit) = this.slots.clone().acquire_owned().await else {
                return;
            };
            this.run(&image, version, &spec, first).await;
        });
    }

    async fn run(&self, image: &str, version: i64, spec: &ImageVersionConfig, first: bool) {
        let started = std::time::Instant::now();
        let home = self.host.home.clone();
        let dir = version_dir(&home, image, version);
        let _ = std::fs::remove_dir_all(&dir);
        let log = match std::fs::create_dir_all(&dir)
            .and_then(|()| BuildLog::create(&dir.join("build.log")))
        {
            Ok(log) => log,
            Err(e) => {
                self.finish(
                    image,
                    version,
                    first,
                    Err(format!("cannot create {}: {e}", dir.display())),
                    started,
                );
                return;
            }
        };
        let _ =
            self.store
                .set_version_state(image, version, "IN_PROGRESS", "IN_PROGRESS", None, now());
        log.line(format!("build of {image} version {version} started"));
        let limit = self.duration_limit(image);
        let result =
            match tokio::time::timeout(limit, self.build(image, version, spec, &dir, &log)).await {
                Ok(result) => result,
                Err(_) => {
                    // The build's future is gone; its VM and work files are not.
                    let work = home.join("work").join(format!("{image}-{version}"));
                    self.host.vmm.kill_leftovers(&work);
                    let _ = std::fs::remove_dir_all(&work);
                    let why = format!(
                        "the build ran longer than {} s, the most one build of this image's owner \
                         may run (quota {}); make the build faster or ask the operator to raise \
                         --quota-build-seconds",
                        limit.as_secs(),
                        crate::auth::quotas::Quota::BuildSeconds.code()
                    );
                    log.line(&why);
                    Err(why)
                }
            };
        self.finish(image, version, first, result, started);
    }

    /// How long a build of `image` may run: its owner's build-duration quota.
    fn duration_limit(&self, image: &str) -> Duration {
        let owner = match self.store.image(image) {
            Ok(Some(row)) => row.owner,
            _ => crate::auth::keys::ADMIN.to_string(),
        };
        Duration::from_secs(self.quotas.limits(&owner).build_seconds.max(1))
    }

    async fn build(
        &self,
        image: &str,
        version: i64,
        spec: &ImageVersionConfig,
        dir: &Path,
        log: &BuildLog,
    ) -> Result<(), String> {
        let work = self
            .host
            .home
            .join("work")
            .join(format!("{image}-{version}"));
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work)
            .map_err(|e| format!("cannot create {}: {e}", work.display()))?;
        let result = self.build_in(image, version, spec, dir, &work, log).await;
        let _ = std::fs::remove_dir_all(&work);
        result
    }

    #[allow(clippy::too_many_arguments)]
    async fn build_in(
        &self,
        image: &str,
        version: i64,
        spec: &ImageVersionConfig,
        dir: &Path,
        work: &Path,
        log: &BuildLog,
    ) -> Result<(), String> {
        let CodeArtifact::Uri(uri) = &spec.code_artifact;
        let remote = self.remote_s3_for(uri).filter(|_| uri.starts_with("s3://"));
        let zip = match remote {
            Some(remote) => {
                log.line(format!("fetching {uri} from {}", remote.endpoint()));
                let limit = kiln_image::context::ContextLimits::default().max_total_bytes;
                remote.fetch(uri, &work.join("artifact.zip"), limit).await?
            }
            _ => self.artifact_path(&spec.code_artifact)?,
        };
        let context = {
            let zip_path = zip.clone();
            let dest = work.join("context");
            tokio::task::spawn_blocking(move || {
                kiln_image::context::extract_zip(
                    &zip_path,
                    &dest,
                    &kiln_image::context::ContextLimits::default(),
                )
            })
            .await
            .map_err(|e| format!("extracting the code artifact: {e}"))?
            .map_err(|e| format!("code artifact {}: {e}", zip.display()))?
        };
        log.line(format!(
            "code artifact {}: {} files, {} KiB",
            zip.display(),
            context.files,
            context.bytes / 1024
        ));
        managed::check_base(&spec.base_image_arn, &context.dockerfile)?;
        let row = self
            .store
            .image(image)
            .map_err(|e| format!("reading the image's owner: {e}"))?
            .ok_or_else(|| format!("image {image} is gone"))?;
        // Staged by the owner under the image's name (`image` is the store's key).
        let secrets = self.secrets.take(&row.owner, &row.label);
        let owner = row.owner;
        let hooks = spec.hooks.clone().unwrap_or_default();
        let image_hooks = hooks.microvm_image_hooks.clone().unwrap_or_default();
        let enabled = |s: &Option<kiln_api::shapes::common::HookState>| {
            matches!(s, Some(kiln_api::shapes::common::HookState::Enabled))
        };
        let secs = |t: Option<i32>, d: u64| {
            std::time::Duration::from_secs(t.map(|t| t as u64).unwrap_or(d))
        };
        let memory = spec
            .resources
            .as_ref()
            .and_then(|r| r.first())
            .map(|r| r.minimum_memory_in_mib as u64)
            .unwrap_or(self.config.default_memory_mib)
            .max(128);
        let registry = crate::images::registry::options(&self.config, &self.host.home, &owner);
        let build_spec = BuildSpec {
            context,
            env: spec
                .environment_variables
                .clone()
                .map(|m| m.into_iter().collect())
                .unwrap_or_default(),
            hooks: HookSpec {
                port: hooks.port.map(|p| p as u16).unwrap_or(8080),
                ready: enabled(&image_hooks.ready)
                    .then(|| secs(image_hooks.ready_timeout_in_seconds, 300)),
                validate: enabled(&image_hooks.validate)
                    .then(|| secs(image_hooks.validate_timeout_in_seconds, 60)),
            },
            memory_mib: memory,
            owner,
            image: image.to_string(),
            mount_cache_dir: self.host.home.join("cache").join("mounts"),
            registry,
            secrets,
            build_memory_mib: self.config.build_memory_mib,
            vcpu_growth: self.config.vcpu_growth,
            machine: self.config.machine,
            cache_dir: self.host.home.join("cache").join("layers"),
            work_dir: work.join("build"),
            output_dir: dir.to_owned(),
            extra_ca: self.config.build_ca.clone(),
            ready_timeout: self.config.ready_timeout(),
            step_timeout: self.config.step_timeout(),
            egress: {
                // Fails closed: a connector deleted since the image was created gives none.
                let egress = self
                    .network
                    .build_egress(spec.egress_network_connectors.as_deref())
                    .unwrap_or(kiln_net::Egress::None);
                self.network
                    .vm_egress(&format!("build-{image}-{version}"), &egress)
            },
        };
        let built = kiln_image::build::build(&self.host, &build_spec, log)
            .await
            .map_err(|e| e.to_string())?;
        let m = &built.snapshot.manifest;
        self.store
            .set_version_snapshot(
                image,
                version,
                &built.snapshot.dir.display().to_string(),
                m.memory.allocated as i64,
                m.disks.iter().map(|d| d.info.allocated).sum::<u64>() as i64,
                built.code_bytes as i64,
            )
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Resolves a code artifact to a local zip file.
    fn artifact_path(&self, artifact: &CodeArtifact) -> Result<PathBuf, String> {
        let uri = match artifact {
            CodeArtifact::Uri(uri) => uri,
            #[allow(unreachable_patterns)]
            _ => return Err("codeArtifact must set uri".into()),
        };
        if uri.starts_with("s3://") {
            // Who may read the object was checked when the version was requested.
            return self
                .s3
                .object_path(uri, crate::artifacts::s3::ADMIN)
                .map_err(|e| e.to_string());
        }
        // Only the admin's file:// reaches a build; the roots are checked again, since the
        // file's links may have changed since the request.
        self.artifacts
            .file(crate::auth::keys::ADMIN, uri)
            .map_err(|e| e.to_string())
    }

    fn finish(
        &self,
        image: &str,
        version: i64,
        first: bool,
        result: Result<(), String>,
        started: std::time::Instant,
    ) {
        self.metrics
            .build_finished(result.is_ok(), started.elapsed());
        let t = now();
        let (version_state, image_state, reason) = match &result {
            Ok(()) => (
                "SUCCESSFUL",
                if first {
                    MicrovmImageState::Created
                } else {
                    MicrovmImageState::Updated
                },
                None,
            ),
            Err(e) => (
                "FAILED",
                if first {
                    MicrovmImageState::CreateFailed
                } else {
                    MicrovmImageState::UpdateFailed
                },
                Some(e.as_str()),
            ),
        };
        if let Err(e) = self
            .store
            .set_version_state(image, version, version_state, version_state, reason, t)
            .and_then(|()| self.store.set_image_state(image, image_state.as_str(), t))
        {
            tracing::error!(%image, version, error = %e, "cannot record the end of a build");
        }
        match result {
            Ok(()) => tracing::info!(%image, version, "build succeeded"),
            Err(e) => tracing::warn!(%image, version, reason = %e, "build failed"),
        }
    }
}

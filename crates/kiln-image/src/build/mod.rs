//! Builds an image: runs a Dockerfile inside a build VM, then boots the result, starts the
//! app, waits until it is ready, and snapshots the running VM.
//!
//! Two VMs, on purpose. The *build VM* has the build context attached as a second disk,
//! reaches the network, and may carry extra CA certificates (in tmpfs only). Each step that
//! changes the filesystem ends in a cached qcow2 layer. The *app VM* then boots fresh from
//! the final layer with one disk and a shared memory file: nothing of the build (context
//! disk, certificates, build tools' page cache) ends up in the image's memory, and the
//! memory file is small because the VM only ever ran the app.

pub mod cache;
pub mod config;
mod copy_from;
pub mod log;
pub mod mounts;
mod plan;
mod source;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiln_agent::client::{
    AgentClient, AppSpec, CopySpec, ExecEvent, ExecRequest, FetchSpec, HttpRequestSpec,
};
use kiln_vmm::host::Host;
use kiln_vmm::{
    BootOptions, DiskFormat, DiskSpec, MachineKind, MemoryFile, MicroVm, NetSpec, RestoreTarget,
    Snapshot,
};

use crate::context::BuildContext;
use cache::LayerCache;
pub use config::{ImageConfig, ReadyCheck};
use copy_from::SourceDisks;
pub use log::BuildLog;
pub use mounts::BuildSecrets;
use mounts::CacheDisks;
use plan::{AppCommand, Plan, PlannedStep, ResolvedBase, Stage, StageBase, StageGraph, StepAction};

/// Where, in the build VM, the context disk is mounted.
const CONTEXT_MOUNT: &str = "/dev/kiln/context";
/// Where, in the build VM, the CA bundle for build steps is written (tmpfs, never in a layer).
const CA_BUNDLE: &str = "/dev/kiln/ca-bundle.crt";
/// The path prefix of the AWS lifecycle hooks.
pub const HOOKS_PATH: &str = "/aws/lambda-microvms/runtime/v1";

/// The vCPUs of an app VM with `memory_mib` of baseline memory: one per 2 GiB, at least one
/// (AWS's sizing: 512–2048 MiB get 1, 4096 MiB 2, 8192 MiB 4).
pub fn vcpus_for(memory_mib: u64) -> u32 {
    u32::try_from(memory_mib / 2048).unwrap_or(u32::MAX).max(1)
}

/// How many times its baseline vCPUs an app VM may grow to under load (AWS's 4×).
pub const VCPU_GROWTH: u32 = 4;

/// How many times its baseline memory an app VM on q35 may grow to (AWS's 4×).
pub const MEMORY_GROWTH: u64 = 4;

/// The memory ceiling in MiB of a q35 app VM with `memory_mib` of baseline memory:
/// [`MEMORY_GROWTH`] times it, the growable part in whole 2 MiB virtio-mem blocks.
pub fn memory_ceiling_for(memory_mib: u64) -> u64 {
    let growable = memory_mib.saturating_mul(MEMORY_GROWTH - 1);
    memory_mib + growable / 2 * 2
}

/// The vCPUs an app VM with `memory_mib` of baseline memory is built with (`-smp`): its
/// baseline ([`vcpus_for`]) online, [`VCPU_GROWTH`] times that present.
pub fn vcpu_ceiling_for(memory_mib: u64) -> u32 {
    vcpus_for(memory_mib).saturating_mul(VCPU_GROWTH)
}

/// The app VM's vCPUs (present, online at boot) for `memory_mib` of baseline memory: the
/// baseline online, and [`VCPU_GROWTH`] times it present when the image may `grow`.
pub fn app_vcpus(memory_mib: u64, grow: bool) -> (u32, u32) {
    let baseline = vcpus_for(memory_mib);
    match grow {
        true => (vcpu_ceiling_for(memory_mib), baseline),
        false => (baseline, baseline),
    }
}

/// Everything one build needs.
#[derive(Debug, Clone)]
pub struct BuildSpec {
    /// The build context (extracted zip).
    pub context: BuildContext,
    /// Environment variables from the API, applied to RUN steps and the app.
    pub env: Vec<(String, String)>,
    /// Lifecycle hooks of the image.
    pub hooks: HookSpec,
    /// Guest memory of the app VM (and so of every VM launched from the image), MiB.
    pub memory_mib: u64,
    /// Guest memory of the build VM, MiB.
    pub build_memory_mib: u64,
    /// Build the app VM to grow under load: [`VCPU_GROWTH`] times its baseline vCPUs present,
    /// the baseline online (kilnd's `--vcpu-growth`). Without it the image is fixed at its
    /// baseline; under TCG such an image restores and first answers ~20 % sooner (measured;
    /// likely TCG's parallel-vCPU mode, which a guest with more than one vCPU turns on).
    pub vcpu_growth: bool,
    /// The machine of the app VM, and so of every VM launched from the image (kilnd's
    /// `--machine`); on q35 it has a virtio-mem device up to [`memory_ceiling_for`]. Build
    /// steps run on microvm whatever this says: their VMs are never snapshotted for launch.
    pub machine: MachineKind,
    /// The layer caches' directory: each owner's cache is a directory of its own in it, so
    /// a cache hit never tells one principal what another built, nor serves another's layer.
    pub cache_dir: PathBuf,
    /// Scratch space, removed when the build ends.
    pub work_dir: PathBuf,
    /// Where the image version's files go (`snapshot/`, `image.json`).
    pub output_dir: PathBuf,
    /// Extra CA certificates (PEM) trusted by build steps only.
    pub extra_ca: Option<PathBuf>,
    /// How long the app may take to become ready.
    pub ready_timeout: Duration,
    /// How long one RUN step may take.
    pub step_timeout: Duration,
    /// Where the build's VMs may connect (the image's build-time egress connector); `None`:
    /// nowhere.
    pub egress: Option<kiln_vmm::VmEgress>,
    /// The principal that owns the image: `RUN --mount=type=cache` caches are kept per
    /// owner and image, and never cross principals.
    pub owner: String,
    /// The image's name.
    pub image: String,
    /// Where cache mounts live (`<home>/cache/mounts`); `<owner>/<image>/<id>.ext4` below.
    pub mount_cache_dir: PathBuf,
    /// Secrets for `RUN --mount=type=secret`, by id; never logged, never in a layer.
    pub secrets: BuildSecrets,
    /// How `FROM <registry image>` pulls (mirrors, credentials, the owner's blob cache).
    pub registry: crate::oci::RegistryOptions,
}

/// The image's lifecycle hooks as far as the build is concerned.
#[derive(Debug, Clone, Default)]
pub struct HookSpec {
    /// Port of the hooks listener in the guest.
    pub port: u16,
    /// `ready` hook enabled, with its timeout.
    pub ready: Option<Duration>,
    /// `validate` hook enabled, with its timeout.
    pub validate: Option<Duration>,
}

/// A finished image version.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    /// The snapshot of the running app.
    pub snapshot: Snapshot,
    /// How the app runs.
    pub config: ImageConfig,
    /// Bytes of the build context (the "code install" size).
    pub code_bytes: u64,
}

/// Why a build failed. The message names the step and the cause.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The Dockerfile cannot be used.
    #[error("Dockerfile line {line}: {message}")]
    Dockerfile { line: usize, message: String },
    /// The base image cannot be prepared.
    #[error("base image: {0}")]
    Base(String),
    /// A step failed.
    #[error("step {step}/{total} (Dockerfile line {line}: {text}) failed: {cause}")]
    Step {
        step: usize,
        total: usize,
        line: usize,
        text: String,
        cause: String,
    },
    /// The app never became ready.
    #[error("the app did not become ready: {0}")]
    NotReady(String),
    /// The validate hook failed.
    #[error("the validate hook failed: {0}")]
    Validate(String),
    /// A VM operation failed.
    #[error("{doing}: {source}")]
    Vm {
        doing: String,
        #[source]
        source: Box<kiln_vmm::VmmError>,
    },
    /// A host-side file operation failed.
    #[error("{doing} {path}: {source}")]
    Io {
        doing: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A qcow2 overlay at `top` over `below`, made by qemu-img on the blocking pool.
async fn overlay(host: &Host, below: &Layer, top: &Path) -> Result<(), kiln_vmm::VmmError> {
    let (vmm, below, top) = (host.vmm.clone(), below.clone(), top.to_path_buf());
    kiln_vmm::blocking(move || vmm.create_overlay(&below.path, below.format, &top)).await
}

fn vm_err(doing: &str) -> impl FnOnce(kiln_vmm::VmmError) -> BuildError + '_ {
    move |source| BuildError::Vm {
        doing: doing.to_string(),
        source: Box::new(source),
    }
}

fn io_err<'a>(doing: &'a str, path: &'a Path) -> impl FnOnce(std::io::Error) -> BuildError + 'a {
    move |source| BuildError::Io {
        doing: doing.to_string(),
        path: path.to_owned(),
        source,
    }
}

/// Runs the whole build. The work directory is removed afterwards, whatever happens.
pub async fn build(
    host: &Host,
    spec: &BuildSpec,
    log: &BuildLog,
) -> Result<BuiltImage, BuildError> {
    std::fs::create_dir_all(&spec.work_dir).map_err(io_err("creating", &spec.work_dir))?;
    let result = build_in(host, spec, log).await;
    let _ = std::fs::remove_dir_all(&spec.work_dir);
    match &result {
        Ok(b) => log.line(format!(
            "image ready: memory snapshot {} MiB on disk, disk {} MiB, device state {} KiB",
            b.snapshot.manifest.memory.allocated >> 20,
            b.snapshot
                .manifest
                .disks
                .iter()
                .map(|d| d.info.allocated)
                .sum::<u64>()
                >> 20,
            b.snapshot.manifest.state.size >> 10
        )),
        Err(e) => log.line(format!("BUILD FAILED: {e}")),
    }
    result
}

async fn build_in(host: &Host, spec: &BuildSpec, log: &BuildLog) -> Result<BuiltImage, BuildError> {
    let started = Instant::now();
    let graph = StageGraph::parse(&spec.context.dockerfile)?;
    for skipped in graph.skipped() {
        log.line(format!("{skipped} skipped: the image does not need it"));
    }
    let mut images = Vec::new();
    for (line, reference) in graph.images() {
        let resolved = resolve_image(host, spec, line, &reference, log)
            .await
            .map_err(|e| match (e, graph.not_a_stage(&reference)) {
                (BuildError::Dockerfile { line, message }, Some(hint)) => BuildError::Dockerfile {
                    line,
                    message: format!("{hint}: {message}"),
                },
                (e, _) => e,
            })?;
        images.push((reference, resolved));
    }
    let plan = Plan::make(&spec.context, &spec.env, &graph, images)?;
    let cache_dir = spec.cache_dir.join(mounts::safe_name(&spec.owner));
    let cache =
        LayerCache::open(&cache_dir).map_err(io_err("opening the layer cache", &cache_dir))?;
    // Each stage's final layer, by stage position, as later stages start from or copy it.
    let mut built: Vec<(usize, Layer)> = Vec::new();
    for stage in plan.all() {
        log_stage(&plan, stage, log);
        let below = match &stage.from {
            StageBase::Image(_) => Layer {
                path: stage.base.disk.clone(),
                format: DiskFormat::Raw,
            },
            StageBase::Stage(p) => built
                .iter()
                .find(|(s, _)| s == p)
                .map(|(_, l)| l.clone())
                .ok_or_else(|| {
                    BuildError::Base(format!("stage {p} is not built before its use"))
                })?,
        };
        let job = StageJob {
            plan: &plan,
            stage,
            below,
            built: &built,
        };
        let layer = run_build_vm(host, spec, &job, &cache, log).await?;
        built.push((stage.index, layer));
    }
    let final_layer = built
        .pop()
        .map(|(_, l)| l)
        .ok_or_else(|| BuildError::Base("the build has no stage".into()))?;
    log.line(format!(
        "filesystem built in {:.1} s",
        started.elapsed().as_secs_f64()
    ));

    let image = &plan.image;
    let mut config = image.image_config(spec)?;
    let snapshot = capture_app(host, spec, image, &mut config, &final_layer, log).await?;
    if let Some(timeout) = spec.hooks.validate {
        validate(host, spec, &snapshot, timeout, log).await?;
    }
    let config_path = spec.output_dir.join("image.json");
    let text = serde_json::to_vec_pretty(&config).unwrap_or_default();
    std::fs::write(&config_path, text).map_err(io_err("writing", &config_path))?;
    Ok(BuiltImage {
        snapshot,
        config,
        code_bytes: spec.context.bytes,
    })
}

/// The reference the image's filesystem descends from: the last stage's FROM, followed
/// through earlier stages, ARGs expanded (kilnd checks it against `baseImageArn`).
pub fn image_base(dockerfile: &str) -> Result<String, BuildError> {
    StageGraph::parse(dockerfile)?.image_base()
}

/// Says what a stage builds on before its steps: one line for a one-stage build (as ever),
/// the stage's name and base otherwise.
fn log_stage(plan: &Plan, stage: &Stage, log: &BuildLog) {
    let steps = stage.steps.len();
    let fs = stage.steps.iter().filter(|s| s.key.is_some()).count();
    let base = match &stage.from {
        StageBase::Image(_) => format!("{} {}", stage.base.name, stage.base.version),
        StageBase::Stage(p) => plan.describe(&plan::CopyFrom::Stage(*p)),
    };
    if plan.stages.is_empty() {
        log.line(format!(
            "building from {base} ({steps} steps, {fs} change the filesystem)"
        ));
    } else {
        log.line(format!(
            "stage {}: building from {base} ({steps} steps, {fs} change the filesystem)",
            stage.label()
        ));
    }
}

/// An image a FROM or `COPY --from` names (at Dockerfile `line`): a managed kiln base, or
/// a registry image pulled into the owner's cache and made into a base disk.
async fn resolve_image(
    host: &Host,
    spec: &BuildSpec,
    line: usize,
    word: &str,
    log: &BuildLog,
) -> Result<ResolvedBase, BuildError> {
    if crate::base::is_managed(word) {
        // A first use builds the base (debootstrap, mkfs): minutes of blocking work.
        let (home, from, extra_ca) = (host.home.clone(), word.to_string(), spec.extra_ca.clone());
        let image =
            kiln_vmm::blocking(move || crate::base::resolve(&home, &from, extra_ca.as_deref()))
                .await
                .map_err(|e| BuildError::Base(e.to_string()))?;
        return Ok(ResolvedBase {
            image,
            pulled: None,
        });
    }
    let mut opts = spec.registry.clone();
    if opts.cache_dir.as_os_str().is_empty() {
        opts.cache_dir = host
            .home
            .join("cache")
            .join("registry")
            .join(mounts::safe_name(&spec.owner));
    }
    log.line(format!(
        "{word} (Dockerfile line {line}): resolving in its registry"
    ));
    let say = |l: String| log.line(l);
    let pulled = crate::oci::pull(word, &opts, &say)
        .await
        .map_err(|e| BuildError::Dockerfile { line, message: e })?;
    let full = match pulled.reference == word {
        true => String::new(),
        false => format!(" {}", pulled.reference),
    };
    log.line(format!(
        "{word}:{full} at {}{} (from {})",
        pulled.digest,
        pulled
            .index_digest
            .as_ref()
            .map(|d| format!(", index {d}"))
            .unwrap_or_default(),
        pulled.source
    ));
    if let Some(prev) = &pulled.previous_digest {
        log.line(format!(
            "{word}: the tag now points elsewhere: {} (the previous build used {prev})",
            pulled.digest
        ));
    }
    let image = {
        let pulled = pulled.clone();
        let opts = opts.clone();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let task = tokio::task::spawn_blocking(move || {
            crate::oci::ensure_base_disk(&pulled, &opts, &move |l| {
                let _ = tx.send(l);
            })
        });
        let made = task
            .await
            .map_err(|e| BuildError::Base(format!("making the base disk: {e}")))?;
        for l in rx.try_iter() {
            log.line(l);
        }
        made.map_err(|e| BuildError::Base(format!("{word}: {e}")))?
    };
    Ok(ResolvedBase {
        image,
        pulled: Some(pulled),
    })
}

/// The disk the final filesystem lives in: a cached layer or the base itself.
#[derive(Debug, Clone)]
struct Layer {
    path: PathBuf,
    format: DiskFormat,
}

/// One stage to build: what it starts on, and the stages built before it.
struct StageJob<'a> {
    plan: &'a Plan,
    stage: &'a Stage,
    /// Its FROM's filesystem: a base disk, or an earlier stage's final layer.
    below: Layer,
    /// Earlier stages' final layers, by stage position.
    built: &'a [(usize, Layer)],
}

/// Runs a stage's uncached steps in a build VM; returns its final layer.
async fn run_build_vm(
    host: &Host,
    spec: &BuildSpec,
    job: &StageJob<'_>,
    cache: &LayerCache,
    log: &BuildLog,
) -> Result<Layer, BuildError> {
    let stage = job.stage;
    let total = job.plan.total_steps();
    let fs_steps: Vec<&PlannedStep> = stage.steps.iter().filter(|s| s.key.is_some()).collect();
    let cached = fs_steps
        .iter()
        .take_while(|s| s.key.as_deref().is_some_and(|k| cache.is_done(k)))
        .count();
    let base_layer = job.below.clone();
    let layer_of = |s: &PlannedStep| Layer {
        path: cache.layer(s.key.as_deref().unwrap_or_default()),
        format: DiskFormat::Qcow2,
    };
    let below = if cached == 0 {
        base_layer.clone()
    } else {
        layer_of(fs_steps[cached - 1])
    };
    // Steps up to the first uncached filesystem step are logged as cached.
    let first_run = fs_steps.get(cached).map(|s| s.index).unwrap_or(usize::MAX);
    for s in stage.steps.iter().take_while(|s| s.index < first_run) {
        log.step(s.index + 1, total, s.line, &s.text);
        if s.key.is_some() {
            log.line("    cached");
        }
    }
    if cached == fs_steps.len() {
        return Ok(below);
    }

    // The build VM: root = a new layer on the last cached one, context disk read-only (made
    // once per build, shared by its stages).
    let context_disk = spec.work_dir.join("context.ext4");
    if !context_disk.exists() {
        let size = (spec.context.bytes * 2).max(16 << 20) + (16 << 20);
        let (dir, disk) = (spec.context.dir.clone(), context_disk.clone());
        kiln_vmm::blocking(move || crate::disk::mkfs_ext4_from_dir(&dir, &disk, size, "kiln-ctx"))
            .await
            .map_err(|e| BuildError::Base(format!("cannot make the context disk: {e}")))?;
    }
    let to_run: Vec<&PlannedStep> = stage
        .steps
        .iter()
        .filter(|s| s.index >= first_run)
        .collect();
    let sources = SourceDisks::prepare(
        &host.vmm,
        job.plan,
        &to_run,
        job.built,
        &spec.work_dir,
        stage.index,
    )
    .await?;
    let first_key = fs_steps[cached].key.clone().unwrap_or_default();
    let top = cache.layer(&first_key);
    cache.discard(&first_key);
    overlay(host, &below, &top)
        .await
        .map_err(vm_err("creating a layer"))?;
    let mut vm_spec = host.vm_spec(spec.work_dir.join(format!("build-vm-{}", stage.index)));
    vm_spec.memory_mib = spec.build_memory_mib;
    vm_spec.disks = vec![
        DiskSpec {
            path: top.clone(),
            format: DiskFormat::Qcow2,
            read_only: false,
        },
        DiskSpec {
            path: context_disk,
            format: DiskFormat::Raw,
            read_only: true,
        },
    ];
    let caches = {
        // A missing cache disk is made here (mkfs).
        let (root, owner, image) = (
            spec.mount_cache_dir.clone(),
            spec.owner.clone(),
            spec.image.clone(),
        );
        let stage = stage.clone();
        kiln_vmm::blocking(move || CacheDisks::open(&root, &owner, &image, &stage))
            .await
            .map_err(|e| {
                cache.discard(&first_key);
                BuildError::Base(e)
            })?
    };
    for (_, disk) in &caches.disks {
        vm_spec.disks.push(DiskSpec {
            path: disk.clone(),
            format: DiskFormat::Raw,
            read_only: false,
        });
    }
    vm_spec
        .disks
        .extend(sources.disks.iter().map(|d| d.disk.clone()));
    let disks = VmDisks { caches, sources };
    vm_spec.network = Some(NetSpec::default());
    log.line("booting the build VM");
    let opts = BootOptions {
        egress: spec.egress.clone(),
        ..BootOptions::default()
    };
    let vm = match host.vmm.boot(vm_spec, opts).await {
        Ok(vm) => vm,
        Err(e) => {
            cache.discard(&first_key);
            return Err(vm_err("booting the build VM")(e));
        }
    };
    let mut vm = vm;
    let run = StepRun {
        stage,
        total,
        cached,
        disks: &disks,
    };
    let result = run_steps(vm.as_mut(), spec, &run, cache, log).await;
    let active = result.as_ref().err().map(|(key, _)| key.clone());
    if let Err(e) = vm.terminate().await {
        tracing::warn!(error = %e, "terminating the build VM");
    }
    match result {
        Ok(()) => {
            let last = fs_steps
                .last()
                .and_then(|s| s.key.clone())
                .unwrap_or_default();
            cache
                .mark_done(&last)
                .map_err(io_err("marking a layer done", &cache.layer(&last)))?;
            Ok(layer_of(fs_steps[fs_steps.len() - 1]))
        }
        Err((_, e)) => {
            if let Some(key) = active {
                cache.discard(&key);
            }
            Err(e)
        }
    }
}

/// The extra disks of a build VM: cache mounts, then the filesystems `COPY --from` reads.
struct VmDisks {
    caches: CacheDisks,
    sources: SourceDisks,
}

/// The steps one build VM runs: a stage's, from its first uncached filesystem step on.
struct StepRun<'a> {
    stage: &'a Stage,
    /// Steps in the whole build.
    total: usize,
    /// The stage's filesystem steps already cached.
    cached: usize,
    disks: &'a VmDisks,
}

/// Runs every step from the first uncached filesystem step on. On error, returns the key of
/// the layer that was being written (to be discarded) with the error.
async fn run_steps(
    vm: &mut dyn MicroVm,
    spec: &BuildSpec,
    run: &StepRun<'_>,
    cache: &LayerCache,
    log: &BuildLog,
) -> Result<(), (String, BuildError)> {
    let (total, cached) = (run.total, run.cached);
    let fs_keys: Vec<String> = run
        .stage
        .steps
        .iter()
        .filter_map(|s| s.key.clone())
        .collect();
    let mut active = fs_keys[cached].clone();
    let agent = vm.agent().clone();
    let fail = |key: &str, e: BuildError| (key.to_string(), e);
    agent
        .mount("/dev/vdb", CONTEXT_MOUNT, "ext4", &["ro"])
        .await
        .map_err(|e| {
            fail(
                &active,
                BuildError::Base(format!("cannot mount the build context: {e}")),
            )
        })?;
    run.disks
        .sources
        .mount(&agent, run.disks.caches.disks.len())
        .await
        .map_err(|e| fail(&active, e))?;
    let ca_env = install_ca(&agent, spec)
        .await
        .map_err(|e| fail(&active, e))?;
    let mut fs_index = 0usize;
    for step in &run.stage.steps {
        if step.key.is_some() {
            fs_index += 1;
        }
        if fs_index <= cached {
            continue;
        }
        log.step(step.index + 1, total, step.line, &step.text);
        let t = Instant::now();
        let step_err = |cause: String| BuildError::Step {
            step: step.index + 1,
            total,
            line: step.line,
            text: step.text.clone(),
            cause,
        };
        execute(&agent, spec, step, &ca_env, run.disks, log)
            .await
            .map_err(|cause| fail(&active, step_err(cause)))?;
        if step.key.is_some() {
            log.line(format!("    done in {:.1} s", t.elapsed().as_secs_f64()));
            if fs_index < fs_keys.len() {
                // Freeze this step's layer and continue on the next one.
                agent
                    .sync(false)
                    .await
                    .map_err(|e| fail(&active, step_err(format!("sync: {e}"))))?;
                let next = fs_keys[fs_index].clone();
                cache.discard(&next);
                vm.freeze_disk_layer(0, &cache.layer(&next))
                    .await
                    .map_err(|e| fail(&active, step_err(format!("freezing the layer: {e}"))))?;
                cache
                    .mark_done(&active)
                    .map_err(|e| fail(&next, step_err(format!("marking the layer done: {e}"))))?;
                active = next;
            }
        }
    }
    agent
        .sync(false)
        .await
        .map_err(|e| fail(&active, BuildError::Base(format!("final sync failed: {e}"))))?;
    Ok(())
}

/// Writes the build's CA bundle into tmpfs and returns the environment that points tools at it.
async fn install_ca(
    agent: &AgentClient,
    spec: &BuildSpec,
) -> Result<Vec<(String, String)>, BuildError> {
    let Some(extra) = &spec.extra_ca else {
        return Ok(Vec::new());
    };
    let extra_pem = std::fs::read(extra).map_err(io_err("reading extra CA certificates", extra))?;
    let mut bundle = agent
        .read_file("/etc/ssl/certs/ca-certificates.crt", 8 << 20)
        .await
        .unwrap_or_default();
    if !bundle.is_empty() && !bundle.ends_with(b"\n") {
        bundle.push(b'\n');
    }
    bundle.extend_from_slice(&extra_pem);
    agent
        .write_file(CA_BUNDLE, &bundle, 0o644, None)
        .await
        .map_err(|e| {
            BuildError::Base(format!("cannot install the build's CA certificates: {e}"))
        })?;
    Ok([
        "SSL_CERT_FILE",
        "REQUESTS_CA_BUNDLE",
        "PIP_CERT",
        "CURL_CA_BUNDLE",
        "NODE_EXTRA_CA_CERTS",
        "GIT_SSL_CAINFO",
    ]
    .iter()
    .map(|k| (k.to_string(), CA_BUNDLE.to_string()))
    .collect())
}

/// Executes one step in the build VM.
async fn execute(
    agent: &AgentClient,
    spec: &BuildSpec,
    step: &PlannedStep,
    ca_env: &[(String, String)],
    disks: &VmDisks,
    log: &BuildLog,
) -> Result<(), String> {
    match &step.action {
        StepAction::Metadata => Ok(()),
        StepAction::Mkdir(dir) => {
            let out = agent
                .run(ExecRequest::new(["mkdir", "-p", dir.as_str()]))
                .await
                .map_err(|e| e.to_string())?;
            match out.code {
                Some(0) => Ok(()),
                _ => Err(format!(
                    "mkdir -p {dir}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )),
            }
        }
        StepAction::Run {
            argv,
            script,
            mounts: step_mounts,
            no_network,
        } => {
            let (uid, gid, home) = lookup(agent, &step.state.user).await?;
            let mut req = ExecRequest::new(argv.iter().map(String::as_str))
                .cwd(&step.state.workdir)
                .user(uid, gid)
                .timeout(spec.step_timeout);
            if *no_network {
                req = req.no_network();
            }
            let mut env = step.state.run_env();
            if !env.iter().any(|(k, _)| k == "HOME") {
                env.push(("HOME".into(), home));
            }
            env.extend(ca_env.iter().cloned());
            if let Some(script) = script {
                agent
                    .write_file(
                        plan::SCRIPT_PATH,
                        script.as_bytes(),
                        0o644,
                        Some((uid, gid)),
                    )
                    .await
                    .map_err(|e| format!("cannot write the here-document script: {e}"))?;
            }
            let mounted = mounts::mount(agent, step_mounts, &disks.caches, &spec.secrets).await?;
            for (k, v) in env.iter().chain(mounted.env.iter()) {
                req = req.env(k, v);
            }
            let result = run_command(agent, spec, req, log).await;
            let unmounted = mounts::unmount(agent, mounted).await;
            if script.is_some() {
                let _ = agent.remove_path(plan::SCRIPT_PATH).await;
            }
            result.and(unmounted)
        }
        StepAction::Copy {
            from,
            sources,
            dest,
            chown,
            chmod,
            unpack,
            inline,
            urls,
            sha256,
        } => {
            let (uid, gid) = match chown {
                Some(c) => {
                    let (u, g, _) = lookup(agent, c).await?;
                    (Some(u), Some(g))
                }
                None => (None, None),
            };
            if let Some(from) = from {
                let disk = disks
                    .sources
                    .get(from)
                    .ok_or_else(|| format!("no disk is attached for COPY --from ({from:?})"))?;
                for src in sources {
                    let guest_src = copy_from::resolve(agent, disk, src).await?;
                    agent
                        .copy(CopySpec {
                            src: guest_src,
                            dest: dest.clone(),
                            uid,
                            gid,
                            mode: *chmod,
                        })
                        .await
                        .map_err(|e| format!("copying {src} from {} to {dest}: {e}", disk.label))?;
                }
                return Ok(());
            }
            for src in sources {
                let guest_src = format!("{CONTEXT_MOUNT}/{}", src.trim_start_matches('/'));
                if *unpack && plan::is_archive(src) {
                    agent
                        .extract_archive(&guest_src, dest, uid, gid)
                        .await
                        .map_err(|e| format!("unpacking {src} into {dest}: {e}"))?;
                } else {
                    agent
                        .copy(CopySpec {
                            src: guest_src.clone(),
                            dest: dest.clone(),
                            uid,
                            gid,
                            mode: *chmod,
                        })
                        .await
                        .map_err(|e| format!("copying {src} to {dest}: {e}"))?;
                }
            }
            for (name, content) in inline {
                // Staged in the guest's tmpfs, then copied with COPY's rules (a directory
                // destination gets the file under the here-document's name).
                let staged = format!("{INLINE_DIR}/{name}");
                agent
                    .write_file(&staged, content, 0o644, None)
                    .await
                    .map_err(|e| format!("writing here-document {name}: {e}"))?;
                let copied = agent
                    .copy(CopySpec {
                        src: staged.clone(),
                        dest: dest.clone(),
                        uid,
                        gid,
                        mode: *chmod,
                    })
                    .await
                    .map_err(|e| format!("copying here-document {name} to {dest}: {e}"));
                let _ = agent.remove_path(&staged).await;
                copied?;
            }
            for url in urls {
                let file = url_dest(url, dest, urls.len() + sources.len() + inline.len())?;
                let mut fetch_env: Vec<String> = step
                    .state
                    .run_env()
                    .iter()
                    .chain(ca_env.iter())
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                fetch_env.sort();
                let fetched = agent
                    .fetch(FetchSpec {
                        url: url.clone(),
                        dest: file.clone(),
                        mode: chmod.unwrap_or(0o600),
                        uid,
                        gid,
                        sha256: sha256.clone(),
                        env: fetch_env,
                        timeout_ms: spec.step_timeout.as_millis().try_into().unwrap_or(u64::MAX),
                    })
                    .await
                    .map_err(|e| format!("ADD {url}: {e}"))?;
                log.line(format!(
                    "    downloaded {url} to {file}: {} bytes, sha256:{}",
                    fetched.bytes, fetched.sha256
                ));
            }
            Ok(())
        }
    }
}

/// Where, in the build VM, COPY here-documents are staged (tmpfs, never in a layer).
const INLINE_DIR: &str = "/dev/kiln/inline";

/// The file an `ADD <url>` writes: `dest` itself, or, when `dest` is a directory (ends in
/// `/`, or several sources), the URL's last path segment inside it.
fn url_dest(url: &str, dest: &str, sources: usize) -> Result<String, String> {
    if !dest.ends_with('/') && sources == 1 {
        return Ok(dest.to_string());
    }
    let path = url
        .split_once("://")
        .map(|(_, rest)| rest)
        .unwrap_or(url)
        .split(['?', '#'])
        .next()
        .unwrap_or_default();
    let name = path
        .split_once('/')
        .map(|(_, p)| p)
        .unwrap_or_default()
        .rsplit('/')
        .next()
        .unwrap_or_default();
    if name.is_empty() || name == "." || name == ".." {
        return Err(format!(
            "ADD {url}: the URL names no file; give a file destination instead of {dest}"
        ));
    }
    Ok(format!("{}/{name}", dest.trim_end_matches('/')))
}

/// Runs one RUN command, streaming its output into the build log.
async fn run_command(
    agent: &AgentClient,
    spec: &BuildSpec,
    req: ExecRequest,
    log: &BuildLog,
) -> Result<(), String> {
    let mut stream = agent.exec(req).await.map_err(|e| e.to_string())?;
    loop {
        match stream.next_event().await.map_err(|e| e.to_string())? {
            Some(ExecEvent::Stdout(b)) | Some(ExecEvent::Stderr(b)) => log.output(&b),
            Some(ExecEvent::Started { .. }) => {}
            Some(ExecEvent::Exited(status)) => {
                return match (status.code, status.signal, status.timed_out) {
                    (_, _, true) => Err(format!("timed out after {:?}", spec.step_timeout)),
                    (Some(0), _, _) => Ok(()),
                    (Some(code), _, _) => Err(format!("the command exited with code {code}")),
                    (None, Some(sig), _) => Err(format!("the command was killed by signal {sig}")),
                    (None, None, _) => Err("the command ended without a status".into()),
                };
            }
            None => return Err("the agent closed the command's stream".into()),
        }
    }
}

/// Resolves a USER spec in the guest; `root` and empty need no lookup.
async fn lookup(agent: &AgentClient, user: &str) -> Result<(u32, u32, String), String> {
    if user.is_empty() || user == "root" || user == "0" {
        return Ok((0, 0, "/root".into()));
    }
    let u = agent
        .lookup_user(user)
        .await
        .map_err(|e| format!("user {user}: {e}"))?;
    Ok((u.uid, u.gid, u.home))
}

/// Boots the final filesystem in a fresh VM with a shared memory file, starts the app, waits
/// until it is ready and snapshots it.
async fn capture_app(
    host: &Host,
    spec: &BuildSpec,
    stage: &Stage,
    config: &mut ImageConfig,
    layer: &Layer,
    log: &BuildLog,
) -> Result<Snapshot, BuildError> {
    let top = spec.work_dir.join("app-disk.qcow2");
    let _ = std::fs::remove_file(&top);
    overlay(host, layer, &top)
        .await
        .map_err(vm_err("creating the app disk"))?;
    let mut vm_spec = host.vm_spec(spec.work_dir.join("app-vm"));
    vm_spec.memory_mib = spec.memory_mib;
    // AWS's sizing: a vCPU per 2 GiB of baseline memory, at least one, online; four times
    // that present (when the image may grow), offline until kilnd grants them under load (microvm has no vCPU
    // hotplug, so the snapshot fixes both counts for every MicroVM restored from it).
    let (present, online) = app_vcpus(spec.memory_mib, spec.vcpu_growth);
    vm_spec.vcpus = present;
    vm_spec.baseline_vcpus = Some(online);
    vm_spec.machine = spec.machine;
    if spec.machine == MachineKind::Q35 {
        vm_spec.max_memory_mib = Some(memory_ceiling_for(spec.memory_mib));
    }
    vm_spec.disks = vec![DiskSpec {
        path: top,
        format: DiskFormat::Qcow2,
        read_only: false,
    }];
    vm_spec.network = Some(NetSpec::default());
    vm_spec.memory_file = Some(MemoryFile {
        path: spec.work_dir.join("mem.img"),
        shared: true,
    });
    log.line("booting the app VM from the built filesystem");
    let opts = BootOptions {
        egress: spec.egress.clone(),
        ..BootOptions::default()
    };
    let vm = host
        .vmm
        .boot(vm_spec, opts)
        .await
        .map_err(vm_err("booting the app VM"))?;
    config.ready_check = if spec.hooks.ready.is_some() {
        ReadyCheck::Hook {
            port: spec.hooks.port,
        }
    } else if let Some(argv) = &stage.healthcheck {
        ReadyCheck::Healthcheck { argv: argv.clone() }
    } else {
        ReadyCheck::Tcp
    };
    config.readiness = readiness_method(config);
    let ready = match lookup(vm.agent(), &stage.last.user).await {
        Ok((uid, gid, _)) => {
            config.uid = uid;
            config.gid = gid;
            start_and_wait(vm.agent(), spec, config, log).await
        }
        Err(e) => Err(BuildError::NotReady(format!(
            "cannot run the app as USER {}: {e}",
            stage.last.user
        ))),
    };
    if let Err(e) = ready {
        log.line("app log (last lines):");
        log.output(vm.app_log_tail(30).as_bytes());
        let _ = vm.terminate().await;
        return Err(e);
    }
    log.line("app output so far:");
    log.output(vm.app_log_tail(30).as_bytes());
    let dest = spec.output_dir.join("snapshot");
    let t = Instant::now();
    let mut snapshot = vm
        .snapshot(&dest)
        .await
        .map_err(vm_err("snapshotting the app VM"))?;
    snapshot
        .flatten_disks()
        .map_err(vm_err("flattening the image disk"))?;
    log.line(format!(
        "snapshot taken in {:.0} ms",
        t.elapsed().as_secs_f64() * 1000.0
    ));
    Ok(snapshot)
}

async fn start_and_wait(
    agent: &AgentClient,
    spec: &BuildSpec,
    config: &ImageConfig,
    log: &BuildLog,
) -> Result<(), BuildError> {
    log.line(format!(
        "starting the app: {}",
        shell_words(&config.app_argv)
    ));
    agent
        .start_app(AppSpec {
            argv: config.app_argv.clone(),
            env: config.env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
            cwd: Some(config.workdir.clone()),
            uid: Some(config.uid),
            gid: Some(config.gid),
        })
        .await
        .map_err(|e| {
            BuildError::NotReady(format!(
                "cannot start {}: {e}",
                shell_words(&config.app_argv)
            ))
        })?;
    let deadline = Instant::now() + spec.hooks.ready.unwrap_or(spec.ready_timeout);
    let how = &config.readiness;
    log.line(format!("waiting until ready ({how})"));
    let t = Instant::now();
    loop {
        let status = agent
            .app_status()
            .await
            .map_err(|e| BuildError::NotReady(e.to_string()))?;
        if !status.running {
            return Err(BuildError::NotReady(format!(
                "the app exited ({}) before it was ready; see its log",
                match (status.exit_code, status.signal) {
                    (Some(c), _) => format!("code {c}"),
                    (None, Some(s)) => format!("signal {s}"),
                    _ => "no status".into(),
                }
            )));
        }
        if check_ready(agent, config, Duration::from_secs(5)).await {
            log.line(format!("ready after {:.1} s", t.elapsed().as_secs_f64()));
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(BuildError::NotReady(format!(
                "not ready after {:.0} s ({how})",
                t.elapsed().as_secs_f64()
            )));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn readiness_method(config: &ImageConfig) -> String {
    match &config.ready_check {
        ReadyCheck::Hook { port } => format!("POST {HOOKS_PATH}/ready on port {port} until 200"),
        ReadyCheck::Healthcheck { argv } => format!("HEALTHCHECK {}", shell_words(argv)),
        ReadyCheck::Tcp => format!("TCP port {} accepting connections", config.app_port),
    }
}

/// Runs the image's ready check once, from inside the guest (`hook_timeout` bounds a ready
/// hook's answer); whether it passed. The build polls it until the app is ready; kilnd runs
/// it again on a pooled VM.
pub async fn check_ready(
    agent: &AgentClient,
    config: &ImageConfig,
    hook_timeout: Duration,
) -> bool {
    match &config.ready_check {
        ReadyCheck::Hook { port } => matches!(
            agent.http_request(hook_request(*port, "ready", hook_timeout)).await,
            Ok(r) if r.status == 200
        ),
        ReadyCheck::Healthcheck { argv } => {
            let mut req = ExecRequest::new(argv.iter().map(String::as_str))
                .cwd(&config.workdir)
                .user(config.uid, config.gid)
                .timeout(Duration::from_secs(10));
            for (k, v) in &config.env {
                req = req.env(k, v);
            }
            matches!(agent.run(req).await, Ok(out) if out.code == Some(0))
        }
        ReadyCheck::Tcp => matches!(
            agent
                .probe_tcp(config.app_port, Duration::from_secs(1))
                .await,
            Ok(true)
        ),
    }
}

/// Restores a test VM from the new snapshot and calls its `validate` hook.
async fn validate(
    host: &Host,
    spec: &BuildSpec,
    snapshot: &Snapshot,
    timeout: Duration,
    log: &BuildLog,
) -> Result<(), BuildError> {
    log.line("restoring a test VM to call the validate hook");
    let mut target = RestoreTarget::new(spec.work_dir.join("validate-vm"));
    target.egress = spec.egress.clone();
    let vm = host
        .vmm
        .restore(snapshot, target)
        .await
        .map_err(vm_err("restoring the validation VM"))?;
    let result = vm
        .agent()
        .http_request(hook_request(spec.hooks.port, "validate", timeout))
        .await;
    let _ = vm.terminate().await;
    match result {
        Ok(r) if r.status == 200 => {
            log.line("validate hook answered 200");
            Ok(())
        }
        Ok(r) => Err(BuildError::Validate(format!(
            "it answered {}: {}",
            r.status,
            String::from_utf8_lossy(&r.body).trim()
        ))),
        Err(e) => Err(BuildError::Validate(e.to_string())),
    }
}

/// A POST to one of the AWS lifecycle hooks on the guest's hooks port.
pub fn hook_request(port: u16, hook: &str, timeout: Duration) -> HttpRequestSpec {
    HttpRequestSpec {
        method: "POST".into(),
        port,
        path: format!("{HOOKS_PATH}/{hook}"),
        headers: vec![("Content-Type".into(), "application/json".into())],
        body: b"{}".to_vec(),
        timeout_ms: timeout.as_millis() as u64,
    }
}

fn shell_words(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            if a.contains(' ') {
                format!("'{a}'")
            } else {
                a.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

impl AppCommand {
    /// The argv for a shell-form command under `shell`.
    pub fn argv(&self, shell: &[String]) -> Vec<String> {
        match self {
            AppCommand::Exec(v) => v.clone(),
            AppCommand::Shell(s) => shell.iter().cloned().chain([s.clone()]).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_ceiling_when_q35_then_four_times_in_whole_blocks() {
        assert_eq!(memory_ceiling_for(256), 1024);
        assert_eq!(memory_ceiling_for(129), 129 + 386);
        assert_eq!(memory_ceiling_for(128), 512);
    }

    #[test]
    fn url_dest_when_directory_then_the_urls_file_name_inside() {
        assert_eq!(
            url_dest("http://h:81/a/b.tgz?x=1", "/opt/", 1),
            Ok("/opt/b.tgz".to_string())
        );
        assert_eq!(
            url_dest("http://h/a", "/opt/f", 1),
            Ok("/opt/f".to_string())
        );
        assert_eq!(url_dest("http://h/a", "/opt", 2), Ok("/opt/a".to_string()));
        assert!(url_dest("http://h/", "/opt/", 1).is_err());
    }

    #[test]
    fn vcpus_for_when_aws_memory_sizes_then_one_per_two_gib_at_least_one() {
        let sizes = [128, 512, 1024, 2048, 4096, 8192].map(vcpus_for);
        let ceilings = [512, 4096, 8192].map(vcpu_ceiling_for);
        assert_eq!(ceilings, [4, 8, 16]);
        assert_eq!(app_vcpus(4096, true), (8, 2));
        assert_eq!(
            app_vcpus(4096, false),
            (2, 2),
            "an image that may not grow is fixed"
        );
        assert_eq!(sizes, [1, 1, 1, 1, 2, 4]);
    }
}

//! `COPY --from`: the filesystems of earlier stages and of images, attached to a stage's
//! build VM and read there, with paths resolved inside them.
//!
//! Nothing of another stage is unpacked or read on the host. An image's base disk (a kiln
//! base, or a registry image pulled like a FROM base) is a clean ext4 image and is attached
//! read-only as it is. A stage's final layer is a qcow2 file of the layer cache that was
//! frozen while its filesystem was mounted, so its ext4 journal may still need replaying,
//! which even a read-only mount does — and a read-only device refuses. The build VM gets a
//! throwaway overlay on it instead: QEMU opens the layer itself read-only as the overlay's
//! backing file, the replay lands in the overlay, and the overlay goes with the build's work
//! directory. In the guest each filesystem is mounted read-only (nosuid, nodev, noexec)
//! under [`MOUNT_DIR`]; a source path is looked up one component at a time through the agent,
//! with symbolic links followed as if that filesystem's root were `/`
//! ([`source::InRootWalk`]), so neither `..` nor a link reaches the build VM's own files.

use std::path::Path;
use std::sync::Arc;

use kiln_agent::client::{AgentClient, AgentError, FileKind, FsErrorKind};
use kiln_vmm::{DiskFormat, DiskSpec, Vmm};

use super::mounts::extra_device;
use super::plan::{CopyFrom, Plan, PlannedStep, StepAction};
use super::source::{self, Found, InRootWalk, SourceError};
use super::{vm_err, BuildError, Layer};

/// Where, in the build VM, the filesystems `COPY --from` reads are mounted (tmpfs).
pub const MOUNT_DIR: &str = "/dev/kiln/from";

/// One filesystem a stage's steps copy from.
#[derive(Debug, Clone)]
pub struct SourceDisk {
    /// What the Dockerfile named.
    pub from: CopyFrom,
    /// How logs and errors call it (`stage builder`, `image alpine:3.20`).
    pub label: String,
    /// The disk attached to the build VM.
    pub disk: DiskSpec,
    /// Where it is mounted in the guest.
    pub mount: String,
}

/// The filesystems one build VM reads `COPY --from` sources from, in attachment order.
#[derive(Debug, Clone, Default)]
pub struct SourceDisks {
    /// The disks.
    pub disks: Vec<SourceDisk>,
}

impl SourceDisks {
    /// The filesystems `steps` copy from: a built stage's final layer (from `built`, by stage
    /// position) behind a throwaway overlay `vmm` makes in `work_dir` (on the blocking pool),
    /// or an image's base disk.
    pub async fn prepare(
        vmm: &Arc<dyn Vmm>,
        plan: &Plan,
        steps: &[&PlannedStep],
        built: &[(usize, Layer)],
        work_dir: &Path,
        stage: usize,
    ) -> Result<SourceDisks, BuildError> {
        let mut disks: Vec<SourceDisk> = Vec::new();
        for step in steps {
            let StepAction::Copy {
                from: Some(from), ..
            } = &step.action
            else {
                continue;
            };
            if disks.iter().any(|d| d.from == *from) {
                continue;
            }
            let label = plan.describe(from);
            let missing = || BuildError::Base(format!("{label} is not built before its use"));
            let disk = match from {
                CopyFrom::Stage(i) => {
                    let layer = built
                        .iter()
                        .find(|(s, _)| s == i)
                        .map(|(_, l)| l)
                        .ok_or_else(missing)?;
                    match layer.format {
                        DiskFormat::Raw => DiskSpec {
                            path: layer.path.clone(),
                            format: DiskFormat::Raw,
                            read_only: true,
                        },
                        DiskFormat::Qcow2 => {
                            let overlay =
                                work_dir.join(format!("from-{stage}-{}.qcow2", disks.len()));
                            let (vmm, base, format, top) = (
                                vmm.clone(),
                                layer.path.clone(),
                                layer.format,
                                overlay.clone(),
                            );
                            kiln_vmm::blocking(move || {
                                let _ = std::fs::remove_file(&top);
                                vmm.create_overlay(&base, format, &top)
                            })
                            .await
                            .map_err(vm_err("creating an overlay to read a stage"))?;
                            DiskSpec {
                                path: overlay,
                                format: DiskFormat::Qcow2,
                                read_only: false,
                            }
                        }
                    }
                }
                CopyFrom::Image(reference) => DiskSpec {
                    path: plan.image_base(reference).ok_or_else(missing)?.disk.clone(),
                    format: DiskFormat::Raw,
                    read_only: true,
                },
            };
            disks.push(SourceDisk {
                from: from.clone(),
                label,
                disk,
                mount: format!("{MOUNT_DIR}/{}", disks.len()),
            });
        }
        Ok(SourceDisks { disks })
    }

    /// Mounts every filesystem read-only; they are attached after `first` other extra disks.
    pub async fn mount(&self, agent: &AgentClient, first: usize) -> Result<(), BuildError> {
        for (n, d) in self.disks.iter().enumerate() {
            let device = extra_device(first + n).ok_or_else(|| {
                BuildError::Base(format!(
                    "too many disks to attach {}: copy from fewer stages and images in one stage",
                    d.label
                ))
            })?;
            agent
                .mount(
                    &device,
                    &d.mount,
                    "ext4",
                    &["ro", "nosuid", "nodev", "noexec"],
                )
                .await
                .map_err(|e| BuildError::Base(format!("cannot mount {}: {e}", d.label)))?;
        }
        Ok(())
    }

    /// The filesystem of `from`.
    pub fn get(&self, from: &CopyFrom) -> Option<&SourceDisk> {
        self.disks.iter().find(|d| d.from == *from)
    }
}

/// The guest path `src` names inside `disk`'s filesystem: looked up through the agent as if
/// that filesystem's root were `/`; a wildcard pattern after the last literal directory is
/// kept for the agent's copy to expand.
pub async fn resolve(agent: &AgentClient, disk: &SourceDisk, src: &str) -> Result<String, String> {
    let (literal, pattern) = source::split_glob(src);
    let mut walk = InRootWalk::new(&literal);
    while let Some(rel) = walk.next_lookup() {
        let found = match agent.stat(&format!("{}/{rel}", disk.mount)).await {
            Ok(stat) => match stat.kind {
                FileKind::Dir => Found::Dir,
                FileKind::File => Found::File,
                FileKind::Symlink => Found::Link(stat.link_target.unwrap_or_default()),
                FileKind::Other => Found::Special("device, fifo or socket"),
            },
            Err(AgentError::Fs {
                kind: FsErrorKind::NotFound | FsErrorKind::WrongKind,
                ..
            }) => Found::Missing,
            Err(e) => return Err(format!("looking up {src} in {}: {e}", disk.label)),
        };
        walk.found(found)
            .map_err(|e| not_there(e, src, &disk.label))?;
    }
    let rel = source::join_pattern(&walk.finish(), &pattern);
    Ok(match rel.is_empty() {
        true => disk.mount.clone(),
        false => format!("{}/{rel}", disk.mount),
    })
}

/// A lookup failure in another stage's or image's words.
fn not_there(e: SourceError, src: &str, label: &str) -> String {
    match e {
        SourceError::NotFound { rel, .. } => {
            format!("{src} is not in {label} (looked for /{rel} in its filesystem)")
        }
        SourceError::Loops { .. } => format!(
            "{src} in {label}: the symbolic links in its path loop or nest too deep"
        ),
        SourceError::Special { kind, .. } => format!(
            "{src} in {label} is a {kind}: only regular files, directories and symbolic links can be copied"
        ),
        SourceError::Io { cause, .. } => format!("looking up {src} in {label}: {cause}"),
    }
}

//! Suspend: a running VM becomes a session snapshot (see [`crate::suspend`]).
//!
//! The source QEMU migrates its whole RAM over a socket pair into a receiver QEMU started
//! with `-incoming`, whose guest RAM is a new sparse `share=on` file in the session
//! directory; the receiver, which never runs the guest, then saves the device state with
//! `x-ignore-shared` and quits. The stream never touches the disk: only the memory file (the
//! pages that are not zero), the small device state and the manifest are written.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use serde_json::json;

use super::{
    cmdline, create_runtime_dir, create_stream_file, file_ref, link_or_copy, log_since, remove_dir,
    settle_migration, sync_path, QemuVm, QemuVmm, CARRIED_APP_LOG, MIGRATION_FD, SUSPEND_BANDWIDTH,
};
use crate::snapshot::{
    self, SnapshotDisk, SnapshotKind, SnapshotManifest, QEMU_BACKEND, SNAPSHOT_FORMAT,
};
use crate::spec::{DiskFormat, DiskSpec, MemoryFile, NetSpec, VmSpec};
use crate::suspend::{self, SuspendError, SuspendedVm};
use crate::{MicroVm, Timeline, VmmError};

use super::logcap;

impl QemuVm {
    /// [`MicroVm::suspend`] for QEMU.
    pub(super) async fn suspend_session(
        mut self,
        dest: &Path,
    ) -> Result<SuspendedVm, SuspendError<QemuVm>> {
        let staging = suspend::staging_dir(dest);
        let rx_dir = suspend::receiver_dir(dest);
        let t0 = Instant::now();
        let mut timeline = Timeline::default();
        let saved = self
            .save_session(dest, &staging, &rx_dir, &mut timeline, t0)
            .await;
        let manifest = match saved {
            Ok(m) => m,
            Err(error) => {
                remove_dir(&rx_dir);
                return Err(self.survive_failed_suspend(&staging, error).await);
            }
        };
        // Published: the suspended directory is the session now. This QEMU, paused with its
        // disks handed over, must never run again.
        let _ = self
            .qmp
            .execute_timeout("quit", None, Duration::from_secs(2))
            .await;
        if !self.process.wait_exit(Duration::from_secs(5)).await {
            self.process.kill(Duration::from_secs(1)).await;
        }
        timeline.mark("ended", t0);
        for d in self.spec.disks.iter().filter(|d| !d.read_only) {
            // Disks outside the runtime directory keep a second name; the suspended one rules.
            if let Err(e) = std::fs::remove_file(&d.path) {
                tracing::warn!(disk = %d.path.display(), error = %e, "cannot remove a suspended VM's old disk name");
            }
        }
        // The app's output so far stays with the session (within the log cap).
        if let Err(e) = logcap::carry(
            &self.spec.app_log(),
            &dest.join(CARRIED_APP_LOG),
            logcap::log_cap(),
        ) {
            tracing::warn!(error = %e, "cannot keep the app log across the suspend");
        }
        remove_dir(&self.spec.dir);
        Ok(SuspendedVm {
            snapshot: snapshot::Snapshot {
                dir: dest.to_owned(),
                manifest,
            },
            timeline,
        })
    }

    /// Starts the receiver, syncs and pauses the guest, migrates all of it into the receiver,
    /// has the receiver save the device state, links the writable disks into `staging`, writes
    /// the manifest, flushes everything and publishes `staging` as `dest`. The source QEMU
    /// stays alive (paused) so a failure at any step can still continue the guest.
    async fn save_session(
        &mut self,
        dest: &Path,
        staging: &Path,
        rx_dir: &Path,
        timeline: &mut Timeline,
        t0: Instant,
    ) -> Result<SnapshotManifest, VmmError> {
        if dest.exists() {
            return Err(VmmError::InvalidSpec(format!(
                "suspend destination {} already exists; remove it or pick another directory",
                dest.display()
            )));
        }
        if self.spec.disks.iter().any(|d| d.read_only) {
            return Err(VmmError::InvalidSpec(
                "a VM with a read-only disk cannot be suspended (a session owns its disks)".into(),
            ));
        }
        let _ = std::fs::remove_dir_all(staging);
        remove_dir(rx_dir);
        std::fs::create_dir_all(staging).map_err(|e| VmmError::io("creating", staging, e))?;
        room_for_memory(staging, dest, self.spec.memory_mib)?;
        let mut receiver = self.start_receiver(staging, rx_dir, t0).await?;
        timeline.mark("receiver", t0);

        // Sync so the disks hold what the guest wrote; keep the page cache, the session resumes
        // with it.
        self.agent().sync(false).await.map_err(VmmError::agent(
            "syncing the guest's disks before suspending",
        ))?;
        timeline.mark("synced", t0);
        self.qmp
            .execute("stop", None)
            .await
            .map_err(VmmError::qmp("pausing"))?;
        self.qmp
            .execute(
                "migrate-set-capabilities",
                Some(json!({"capabilities": [{"capability": "x-ignore-shared", "state": false}]})),
            )
            .await
            .map_err(VmmError::qmp("including guest RAM in the migration"))?;
        // QEMU 7.2 caps migration at 128 MiB/s by default, which triples suspend time.
        self.qmp
            .execute(
                "migrate-set-parameters",
                Some(json!({ "max-bandwidth": SUSPEND_BANDWIDTH })),
            )
            .await
            .map_err(VmmError::qmp("raising the migration bandwidth"))?;
        // Only what QEMU prints from here on explains a failure.
        let log_mark = std::fs::metadata(self.spec.qemu_log()).map_or(0, |m| m.len());
        let rx_log_mark = std::fs::metadata(receiver.spec.qemu_log()).map_or(0, |m| m.len());
        let (out, inc) = std::os::unix::net::UnixStream::pair()
            .map_err(|e| VmmError::io("creating a socket pair for", dest, e))?;
        receiver
            .pass_migration_fd(&inc, "handing the receiver its stream")
            .await?;
        receiver
            .qmp
            .execute(
                "migrate-incoming",
                Some(json!({ "uri": format!("fd:{MIGRATION_FD}") })),
            )
            .await
            .map_err(VmmError::qmp("starting the receiver's migration"))?;
        self.pass_migration_fd(&out, "saving the VM").await?;
        drop((out, inc));
        self.qmp
            .execute(
                "migrate",
                Some(json!({ "uri": format!("fd:{MIGRATION_FD}") })),
            )
            .await
            .map_err(VmmError::qmp("saving the VM"))?;
        let sent = self.wait_migration(dest, log_mark).await;
        let received = receiver
            .wait_while_status("inmigrate", "receiving the suspended VM")
            .await;
        match (sent, received) {
            (Ok(()), Ok(status)) if status == "paused" => {}
            (Err(e), _) | (Ok(()), Err(e)) => {
                let e = full_disk_hint(e, rx_log_mark, &receiver_log(rx_dir), dest);
                receiver.abort().await;
                return Err(e);
            }
            (Ok(()), Ok(status)) => {
                let detail = log_since(&receiver_log(rx_dir), rx_log_mark);
                receiver.abort().await;
                return Err(VmmError::Migration {
                    doing: format!("suspending into {}", dest.display()),
                    status,
                    detail: format!("; the receiver said: {detail}"),
                });
            }
        }
        timeline.mark("saved", t0);
        crate::crash_point("suspend-saved");

        let state_path = staging.join(snapshot::STATE);
        let saved = receiver.save_device_state(&state_path, dest).await;
        receiver.quit().await;
        remove_dir(rx_dir);
        saved?;
        timeline.mark("converted", t0);

        let mut disks = Vec::with_capacity(self.spec.disks.len());
        for (i, d) in self.spec.disks.iter().enumerate() {
            let name = snapshot::disk_file_name(i, d.format);
            link_or_copy(&d.path, &staging.join(&name))?;
            disks.push(SnapshotDisk {
                info: snapshot::sized_file_info(staging, &name)?,
                format: d.format,
            });
        }
        let spec = &self.spec;
        let manifest = SnapshotManifest {
            format: SNAPSHOT_FORMAT,
            backend: QEMU_BACKEND.to_string(),
            kind: SnapshotKind::Session,
            created_unix: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            qemu_version: self.qemu.version.clone(),
            accel: spec.accel,
            cpu: cmdline::cpu_model(spec.accel).to_string(),
            machine: cmdline::machine_signature(spec),
            memory_mib: spec.memory_mib,
            vcpus: spec.vcpus,
            tsc_khz: spec.tsc_khz,
            kernel: file_ref(&spec.kernel)?,
            initramfs: file_ref(&spec.initramfs)?,
            cmdline_extra: spec.cmdline_extra.clone(),
            network: spec.network.is_some(),
            state: snapshot::file_info(staging, snapshot::STATE)?,
            memory: snapshot::sized_file_info(staging, snapshot::MEMORY)?,
            disks,
        };
        let manifest_path = staging.join(snapshot::MANIFEST);
        let text = serde_json::to_vec_pretty(&manifest)
            .map_err(|e| VmmError::InvalidSpec(e.to_string()))?;
        std::fs::write(&manifest_path, text)
            .map_err(|e| VmmError::io("writing", &manifest_path, e))?;
        // The source QEMU is about to end and take the only other copy of the guest's memory
        // with it: the session must survive a host crash from here on. Flushing the memory
        // file writes the pages the receiver filled (never the zero ones: they stay holes).
        let staged = [snapshot::MEMORY, snapshot::STATE, snapshot::MANIFEST]
            .into_iter()
            .map(str::to_string)
            .chain(manifest.disks.iter().map(|d| d.info.file.clone()));
        for file in staged {
            sync_path(&staging.join(file))?;
        }
        sync_path(staging)?;
        timeline.mark("flushed", t0);
        std::fs::rename(staging, dest).map_err(|e| VmmError::io("publishing", dest, e))?;
        if let Some(parent) = dest.parent() {
            if let Err(e) = sync_path(parent) {
                tracing::warn!(error = %e, "cannot sync the suspended VM's parent directory");
            }
        }
        timeline.mark("published", t0);
        crate::crash_point("suspend-published");
        Ok(manifest)
    }

    /// Starts the receiver in `rx_dir`: this VM's machine and devices, guest RAM in a new
    /// shared memory file in `staging`, throwaway sparse disks of the same sizes (device state
    /// does not depend on a disk's contents, and the receiver never runs the guest), no
    /// forwards and no egress, waiting for a migration.
    async fn start_receiver(
        &self,
        staging: &Path,
        rx_dir: &Path,
        t0: Instant,
    ) -> Result<QemuVm, VmmError> {
        create_runtime_dir(rx_dir)?;
        let mut disks = Vec::with_capacity(self.spec.disks.len());
        for (i, d) in self.spec.disks.iter().enumerate() {
            let size = suspend::virtual_size(&d.path, d.format)
                .map_err(|e| VmmError::io("reading the size of", &d.path, e))?;
            let path = rx_dir.join(format!("stand-in{i}.raw"));
            std::fs::File::create(&path)
                .and_then(|f| f.set_len(size))
                .map_err(|e| VmmError::io("creating", &path, e))?;
            disks.push(DiskSpec {
                path,
                format: DiskFormat::Raw,
                read_only: false,
            });
        }
        let spec = VmSpec {
            dir: rx_dir.to_owned(),
            disks,
            network: self.spec.network.as_ref().map(|_| NetSpec {
                forwards: Vec::new(),
                restrict_egress: true,
            }),
            memory_file: Some(MemoryFile {
                path: staging.join(snapshot::MEMORY),
                shared: true,
            }),
            jail: None,
            discard_app_log: true,
            ..self.spec.clone()
        };
        let vmm = QemuVmm {
            qemu: self.qemu.clone(),
        };
        vmm.start(spec, true, t0, None).await
    }

    /// Saves the device state of this (receiver) VM into `path`, leaving guest RAM in its
    /// shared memory file.
    async fn save_device_state(&mut self, path: &Path, dest: &Path) -> Result<(), VmmError> {
        self.ignore_shared_memory().await?;
        let file = create_stream_file(path)?;
        self.pass_migration_fd(&file, "saving the device state")
            .await?;
        drop(file);
        let log_mark = std::fs::metadata(self.spec.qemu_log()).map_or(0, |m| m.len());
        self.qmp
            .execute(
                "migrate",
                Some(json!({ "uri": format!("fd:{MIGRATION_FD}") })),
            )
            .await
            .map_err(VmmError::qmp("saving the device state"))?;
        self.wait_migration(dest, log_mark).await
    }

    /// Ends a QEMU that must never run its guest (QMP `quit`, then a kill).
    async fn quit(&mut self) {
        let _ = self
            .qmp
            .execute_timeout("quit", None, Duration::from_secs(2))
            .await;
        if !self.process.wait_exit(Duration::from_secs(5)).await {
            self.process.kill(Duration::from_secs(1)).await;
        }
    }

    /// After a failed suspend: removes the partial directory and continues the guest if QEMU
    /// lives; otherwise cleans up after the dead VM.
    pub(super) async fn survive_failed_suspend(
        mut self,
        staging: &Path,
        error: VmmError,
    ) -> SuspendError<QemuVm> {
        let _ = std::fs::remove_dir_all(staging);
        if self.process.is_alive() {
            // A cancelled migration must settle before the guest may continue.
            settle_migration(&self.qmp).await;
            match self.qmp.execute("cont", None).await {
                Ok(_) => {
                    return SuspendError {
                        error,
                        vm: Some(self),
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot continue the VM after a failed suspend")
                }
            }
        }
        let error = if self.process.is_alive() {
            error
        } else {
            super::prefer_death(&mut self.process, &self.spec, "suspending", error).await
        };
        self.abort().await;
        SuspendError { error, vm: None }
    }

    /// Gives QEMU the migration stream's descriptor: kilnd opens the file (or socket), QEMU
    /// only reads or writes the descriptor (no shell, no path, whatever its uid and sandbox
    /// allow).
    pub(super) async fn pass_migration_fd(
        &self,
        fd: &impl AsFd,
        doing: &str,
    ) -> Result<(), VmmError> {
        self.qmp
            .pass_fd(MIGRATION_FD, fd.as_fd())
            .await
            .map_err(VmmError::qmp(doing))
    }
}

fn receiver_log(rx_dir: &Path) -> PathBuf {
    rx_dir.join("qemu.log")
}

/// Refuses a suspend that the file system holding `staging` cannot take: the memory file may
/// grow to the guest's whole RAM, and a receiver whose mapped file cannot grow dies of SIGBUS
/// with no useful message.
fn room_for_memory(staging: &Path, dest: &Path, memory_mib: u64) -> Result<(), VmmError> {
    let Ok(st) = nix::sys::statvfs::statvfs(staging) else {
        return Ok(());
    };
    let free = st.blocks_available() as u64 * st.fragment_size() as u64;
    let need = memory_mib << 20;
    if free >= need {
        return Ok(());
    }
    Err(VmmError::Migration {
        doing: format!("suspending into {}", dest.display()),
        status: "not started".into(),
        detail: format!(
            "; the file system holding {} is full for it ({} MiB free, the guest's memory may \
             need {memory_mib} MiB): free space there or suspend elsewhere",
            dest.display(),
            free >> 20
        ),
    })
}

/// Adds the full-disk advice to a failed migration when the receiver's log or the file system
/// says so.
fn full_disk_hint(error: VmmError, rx_log_mark: u64, rx_log: &Path, dest: &Path) -> VmmError {
    let said = log_since(rx_log, rx_log_mark);
    match error {
        VmmError::Migration {
            doing,
            status,
            mut detail,
        } => {
            if !said.is_empty() {
                detail.push_str(&format!("; the receiver said: {said}"));
            }
            if said.contains("No space left") && !detail.contains("is full") {
                detail.push_str(&format!(
                    "; the file system holding {} is full: free space there or suspend elsewhere",
                    dest.display()
                ));
            }
            VmmError::Migration {
                doing,
                status,
                detail,
            }
        }
        other => other,
    }
}

//! Suspend: a running VM becomes a session snapshot (see [`crate::suspend`]).
//!
//! The source QEMU migrates its whole RAM over a socket pair into a receiver QEMU started
//! with `-incoming`, whose guest RAM is a new sparse `share=on` file in the session
//! directory; the receiver, which never runs the guest, then saves the device state with
//! `x-ignore-shared` and quits. The stream never touches the disk: only the memory file (the
//! pages that are not zero), the small device state and the manifest are written.

use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;

use super::{
    create_runtime_dir, create_stream_file, link_or_copy, log_since, manifest_for, remove_dir,
    settle_migration, stage_disks, sync_path, QemuVm, QemuVmm, CARRIED_APP_LOG, MIGRATION_FD,
    SUSPEND_BANDWIDTH,
};
use crate::snapshot::{self, SnapshotKind, SnapshotManifest};
use crate::spec::{DiskFormat, DiskSpec, MemoryFile, NetSpec, VmSpec};
use crate::suspend::{self, SuspendError, SuspendedVm};
use crate::{Timeline, VmmError};

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
                // The receiver, its directory and memory, and the staging directory.
                suspend::remove_unpublished(dest);
                return Err(self.survive_failed_suspend(&staging, error).await);
            }
        };
        // Published: the suspended directory is the session now. This QEMU, paused with its
        // disks handed over, must never run again.
        self.quit().await;
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
        let memory = staging.join(snapshot::MEMORY);
        // The receiver fills its memory fastest in RAM (page faults on a shared mapping of an
        // ext4 file cost ~15 µs each here: 2.2 s for 512 MiB); kilnd then writes the pages
        // that are not zero into the session. Without room in RAM, straight into the file.
        let in_ram = suspend::receiver_memory(dest)
            .filter(|p| room(p.parent().unwrap_or(p), self.spec.memory_mib));
        if in_ram.is_none() {
            room_for_memory(staging, dest, self.spec.memory_mib)?;
        }
        if let Some(path) = &in_ram {
            // kilnd's own new file (a planted name in the shared directory is never opened).
            let _ = std::fs::remove_file(path);
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| VmmError::io("creating", path, e))?;
        }
        let rx_memory = in_ram.clone().unwrap_or_else(|| memory.clone());
        let mut receiver = self.start_receiver(&rx_memory, rx_dir, t0).await?;
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
            .migrate_through(
                "migrate-incoming",
                &inc,
                "starting the receiver's migration",
            )
            .await?;
        self.migrate_through("migrate", &out, "saving the VM")
            .await?;
        drop((out, inc));
        let sent = self.wait_migration(dest, log_mark).await;
        let received = receiver
            .wait_while_status("inmigrate", "receiving the suspended VM")
            .await;
        match (sent, received) {
            (Ok(()), Ok(status)) if status == "paused" => {}
            (Err(e), _) | (Ok(()), Err(e)) => {
                let e = full_disk_hint(e, rx_log_mark, &receiver.spec.qemu_log(), dest);
                receiver.abort().await;
                return Err(e);
            }
            (Ok(()), Ok(status)) => {
                let detail = log_since(&receiver.spec.qemu_log(), rx_log_mark);
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
        if let Some(in_ram) = in_ram {
            let to = memory.clone();
            let copied = crate::blocking(move || {
                let copied = copy_nonzero_pages(&in_ram, &to)
                    .map_err(|e| VmmError::io("writing the session's memory into", &to, e));
                let _ = std::fs::remove_file(&in_ram);
                copied
            })
            .await;
            if let Err(e) = copied {
                return Err(match room_for_memory(staging, dest, self.spec.memory_mib) {
                    Err(full) => full,
                    Ok(()) => e,
                });
            }
            timeline.mark("copied", t0);
        }

        // Links, the manifest and the fsyncs run off the async runtime (flushing the memory
        // file writes every page the guest used).
        let (spec, staged, published) = (self.spec.clone(), staging.to_owned(), dest.to_owned());
        let qemu_version = self.qemu.version.clone();
        let manifest = crate::blocking(move || {
            let manifest = write_session(&spec, &staged, qemu_version)?;
            std::fs::rename(&staged, &published)
                .map_err(|e| VmmError::io("publishing", &published, e))?;
            if let Some(parent) = published.parent() {
                if let Err(e) = sync_path(parent) {
                    tracing::warn!(error = %e, "cannot sync the suspended VM's parent directory");
                }
            }
            Ok::<_, VmmError>(manifest)
        })
        .await?;
        timeline.mark("flushed", t0);
        timeline.mark("published", t0);
        crate::crash_point("suspend-published");
        Ok(manifest)
    }

    /// Starts the receiver in `rx_dir`: this VM's machine and devices, guest RAM in a new
    /// shared memory file at `memory`, throwaway sparse disks of the same sizes (device state
    /// does not depend on a disk's contents, and the receiver never runs the guest), no
    /// forwards and no egress, waiting for a migration.
    async fn start_receiver(
        &self,
        memory: &Path,
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
                path: memory.to_owned(),
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
        let log_mark = std::fs::metadata(self.spec.qemu_log()).map_or(0, |m| m.len());
        self.migrate_through("migrate", &file, "saving the device state")
            .await?;
        drop(file);
        self.wait_migration(dest, log_mark).await
    }

    /// Ends a QEMU that must never run its guest again (QMP `quit`, then a kill).
    pub(super) async fn quit(&mut self) {
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

    /// Starts a migration (`command`: `migrate` or `migrate-incoming`) through `fd`, which
    /// QEMU gets first (see [`QemuVm::pass_migration_fd`]).
    pub(super) async fn migrate_through(
        &self,
        command: &str,
        fd: &impl AsFd,
        doing: &str,
    ) -> Result<(), VmmError> {
        self.pass_migration_fd(fd, doing).await?;
        self.qmp
            .execute(
                command,
                Some(json!({ "uri": format!("fd:{MIGRATION_FD}") })),
            )
            .await
            .map(drop)
            .map_err(VmmError::qmp(doing))
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

/// Bytes free for kilnd on the file system holding `dir`.
fn free_bytes(dir: &Path) -> Option<u64> {
    let st = nix::sys::statvfs::statvfs(dir).ok()?;
    Some(st.blocks_available().saturating_mul(st.fragment_size()))
}

/// Whether the file system holding `dir` has room for `memory_mib` MiB.
fn room(dir: &Path, memory_mib: u64) -> bool {
    free_bytes(dir).is_some_and(|free| free >= memory_mib << 20)
}

/// Copies `from` into a new file `to` of the same size, writing only the 4 KiB pages that are
/// not all zero (the others stay holes); the bytes written.
pub(crate) fn copy_nonzero_pages(from: &Path, to: &Path) -> std::io::Result<u64> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    const PAGE: usize = 4096;
    let src = std::fs::File::open(from)?;
    let len = src.metadata()?.len();
    let dst = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)?;
    dst.set_len(len)?;
    // OR-ing 64 bytes at a time lets the compiler vectorise the check (a byte-at-a-time
    // `all` took 150 ms per 512 MiB here, this 14 ms).
    let zero = |page: &[u8]| {
        page.chunks(64)
            .all(|c| c.iter().fold(0, |a, &b| a | b) == 0)
    };
    let mut buf = vec![0u8; 1 << 20];
    let (mut at, mut written) = (0u64, 0u64);
    while at < len {
        let n = src.read_at(&mut buf, at)?;
        if n == 0 {
            break;
        }
        let data = &buf[..n];
        let mut i = 0;
        while i < n {
            let page_end = (i + PAGE).min(n);
            if zero(&data[i..page_end]) {
                i = page_end;
                continue;
            }
            let mut run_end = page_end;
            while run_end < n {
                let next = (run_end + PAGE).min(n);
                if zero(&data[run_end..next]) {
                    break;
                }
                run_end = next;
            }
            dst.write_all_at(&data[i..run_end], at + i as u64)?;
            written += (run_end - i) as u64;
            i = run_end;
        }
        at += n as u64;
    }
    Ok(written)
}

/// Links the (ended) source VM's disks into `staging`, writes the session manifest and
/// flushes everything to stable storage: the source QEMU is about to end and take the only
/// other copy of the guest's memory with it, so the session must survive a host crash from
/// here on. Flushing the memory file writes the pages it holds (never the zero ones: they
/// stay holes).
fn write_session(
    spec: &VmSpec,
    staging: &Path,
    qemu_version: String,
) -> Result<SnapshotManifest, VmmError> {
    // A session's disks are linked in (the VM's own files) and checked by size only.
    let disks = stage_disks(spec, staging, link_or_copy, snapshot::sized_file_info)?;
    let manifest = manifest_for(
        spec,
        staging,
        SnapshotKind::Session,
        qemu_version,
        snapshot::sized_file_info(staging, snapshot::MEMORY)?,
        disks,
    )?;
    let manifest_path = staging.join(snapshot::MANIFEST);
    let text =
        serde_json::to_vec_pretty(&manifest).map_err(|e| VmmError::InvalidSpec(e.to_string()))?;
    std::fs::write(&manifest_path, text).map_err(|e| VmmError::io("writing", &manifest_path, e))?;
    let staged = [snapshot::MEMORY, snapshot::STATE, snapshot::MANIFEST]
        .into_iter()
        .map(str::to_string)
        .chain(manifest.disks.iter().map(|d| d.info.file.clone()));
    for file in staged {
        sync_path(&staging.join(file))?;
    }
    sync_path(staging)?;
    Ok(manifest)
}

/// Refuses a suspend that the file system holding `staging` cannot take: the memory file may
/// grow to the guest's whole RAM, and a receiver whose mapped file cannot grow dies of SIGBUS
/// with no useful message.
fn room_for_memory(staging: &Path, dest: &Path, memory_mib: u64) -> Result<(), VmmError> {
    let Some(free) = free_bytes(staging) else {
        return Ok(());
    };
    if free >= memory_mib << 20 {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_nonzero_pages_when_mixed_then_same_bytes_and_zero_pages_are_holes() {
        use std::os::unix::fs::{FileExt, MetadataExt};
        let dir = tempfile::tempdir().expect("tempdir");
        let from = dir.path().join("from");
        let f = std::fs::File::create(&from).expect("create");
        f.set_len(64 << 20).expect("size");
        // Pages with data at the start, across a 1 MiB read boundary and at the very end;
        // a page written with zeros in between.
        f.write_all_at(&[7u8; 8192], 0).expect("write");
        f.write_all_at(&[9u8; 4096], (1 << 20) - 2048)
            .expect("write");
        f.write_all_at(&[0u8; 4096], 8 << 20).expect("write");
        f.write_all_at(&[1u8; 10], (64 << 20) - 10).expect("write");
        let to = dir.path().join("to");

        let written = copy_nonzero_pages(&from, &to).expect("copy");

        assert_eq!(
            std::fs::read(&to).expect("read"),
            std::fs::read(&from).expect("read")
        );
        assert_eq!(written, 8192 + 2 * 4096 + 4096);
        let allocated = std::fs::metadata(&to).expect("meta").blocks() * 512;
        assert!(allocated <= 64 << 10, "{allocated} bytes allocated");
    }
}

//! Bringing the store and reality together after kilnd (re)starts: each open MicroVM's
//! session is found where it is — a running QEMU or a published suspended directory — its
//! state recorded (compare-and-swap on what the row said), and its owner started.

use std::collections::BTreeMap;
use std::sync::Arc;

use kiln_api::shapes::microvm::MicrovmState as S;
use kiln_vmm::MicroVm;
use serde_json::json;
use tokio::sync::Mutex;

use super::hooks::SessionHooks;
use super::owner::Held;
use super::{Live, Microvms};
use crate::now;
use crate::store::{MicrovmRow, Reason, StoreError};

/// Where reconciliation found a MicroVM's session.
enum Recovered {
    /// In its suspended directory.
    Suspended,
    /// In a running QEMU, with the state reason to record if the row said otherwise.
    Running(Box<dyn MicroVm>, Option<&'static str>),
    /// Nowhere; the reason.
    Lost(String),
}

impl Microvms {
    /// Brings the store and reality together after a (re)start: running VMs are re-attached,
    /// half-done launches and dead VMs are cleaned up, orphan directories removed.
    pub async fn reconcile(&self) -> Result<(), StoreError> {
        let open = self.store.host_microvms(&[
            S::Pending,
            S::Running,
            S::Terminating,
            S::Suspending,
            S::Suspended,
        ])?;
        for r in &open {
            let dir = self.dir_of(&r.id);
            // A suspend's receiver left running holds nothing of the session.
            let suspended = self.suspended_dir(&r.id);
            self.host
                .vmm
                .kill_leftovers(&kiln_vmm::suspend::receiver_dir(&suspended));
            let outcome = self.recover(r).await;
            kiln_vmm::suspend::remove_unpublished(&suspended);
            match outcome {
                Recovered::Suspended => {
                    // A suspended session needs no process: it stays as it is on disk.
                    self.host.vmm.kill_leftovers(&dir);
                    let _ = std::fs::remove_dir_all(dir.join("vm"));
                    self.admit_recovered(0);
                    self.store.transition_microvm(
                        &r.id,
                        r.state,
                        S::Suspended,
                        Reason::Keep,
                        None,
                    )?;
                    // Its owner counts the suspended duration from now: a session is never
                    // cut short by a restart.
                    let row = MicrovmRow {
                        state: S::Suspended,
                        ..r.clone()
                    };
                    self.spawn_owner(
                        &row,
                        Held {
                            slot: true,
                            memory: false,
                            growth: 0,
                            grown_mib: 0,
                        },
                    );
                    tracing::info!(microvm = %r.id, "suspended session kept");
                }
                Recovered::Running(mut vm, note) => {
                    // The gateway's listeners died with the previous kilnd: serve the VM's
                    // namespace again (its rules are rewritten to the new listeners).
                    if let Some(egress) = self.network.vm_egress(&r.id, &self.plan_of_row(r).egress)
                    {
                        if let Err(e) = vm.set_egress(&egress).await {
                            tracing::warn!(microvm = %r.id, error = %e, "egress not re-attached: the guest reaches nothing");
                        }
                    }
                    // Whatever the interrupted suspend or resume left on disk is not the session.
                    let _ = std::fs::remove_dir_all(self.suspended_dir(&r.id));
                    if r.state != S::Running {
                        let reason = note.map(Reason::Set).unwrap_or(Reason::Keep);
                        self.store
                            .transition_microvm(&r.id, r.state, S::Running, reason, None)?;
                    }
                    let hooks = match self.store.version(&r.image, r.version)? {
                        Some(v) => SessionHooks::of(&v.spec),
                        None => SessionHooks::default(),
                    };
                    // The forwards QEMU has, not the stored ones: a resume interrupted before
                    // it stored its new ports left the old ones in the row.
                    let forwards: BTreeMap<u16, u16> = vm
                        .forwards()
                        .iter()
                        .map(|f| (f.guest_port, f.host_port))
                        .collect();
                    self.store.set_microvm_forwards(&r.id, &json!(forwards))?;
                    self.admit_recovered(r.memory_mib as u64);
                    self.live.lock().await.insert(
                        r.id.clone(),
                        Arc::new(Mutex::new(Live {
                            since: std::time::Instant::now(),
                            vm,
                            forwards,
                            hooks,
                        })),
                    );
                    let row = MicrovmRow {
                        state: S::Running,
                        ..r.clone()
                    };
                    self.spawn_owner(
                        &row,
                        Held {
                            slot: true,
                            memory: true,
                            growth: 0,
                            grown_mib: 0,
                        },
                    );
                    tracing::info!(microvm = %r.id, "re-attached after restart");
                }
                Recovered::Lost(reason) => {
                    self.host.vmm.kill_leftovers(&dir);
                    let _ = std::fs::remove_dir_all(&dir);
                    self.store.transition_microvm(
                        &r.id,
                        r.state,
                        S::Terminated,
                        Reason::Set(&reason),
                        Some(now()),
                    )?;
                    self.audit
                        .kilnd("TerminateMicrovm", &r.owner, &r.id, &Ok(()), &reason);
                    tracing::warn!(microvm = %r.id, %reason, "terminated during reconciliation");
                }
            }
        }
        // Directories no open MicroVM owns: a crash between mkdir and the store's insert.
        let known: std::collections::HashSet<String> = open.iter().map(|r| r.id.clone()).collect();
        if let Ok(entries) = std::fs::read_dir(self.host.home.join("microvms")) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !known.contains(&name) {
                    self.host.vmm.kill_leftovers(&e.path());
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        Ok(())
    }

    /// Where the session of an open MicroVM is after a restart. A suspend is complete once its
    /// directory is published (the QEMU left paused behind it must never run again); a resume
    /// is complete once its guest runs (the suspended directory is then stale). One of the two
    /// always holds the whole session, so a crash at any point loses nothing.
    async fn recover(&self, r: &MicrovmRow) -> Recovered {
        let suspended = || self.host.vmm.open_suspended(&self.suspended_dir(&r.id));
        let vm_dir = self.dir_of(&r.id).join("vm");
        let attach = || self.host.vmm.attach(&vm_dir);
        match r.state {
            S::Suspending if suspended().is_ok() => Recovered::Suspended,
            S::Suspending => match attach().await {
                Ok(vm) => Recovered::Running(
                    vm,
                    Some("kilnd restarted during a suspend; the VM kept running"),
                ),
                Err(e) => {
                    Recovered::Lost(format!("its VM stopped while kilnd was suspending it: {e}"))
                }
            },
            S::Suspended => match attach().await {
                // kilnd stopped after the resumed guest started: it holds the session now.
                Ok(vm) => Recovered::Running(vm, None),
                Err(_) => match suspended() {
                    Ok(_) => Recovered::Suspended,
                    Err(e) => Recovered::Lost(format!("its suspended state is unusable: {e}")),
                },
            },
            S::Running => match attach().await {
                Ok(vm) => Recovered::Running(vm, None),
                Err(_) => Recovered::Lost("its VM stopped while kilnd was not running".into()),
            },
            _ => Recovered::Lost("kilnd restarted while it was starting or stopping".into()),
        }
    }
}

//! One owner per MicroVM: a task that performs every transition of its MicroVM — launch,
//! run hook, suspend, resume, terminate, idle and maximum-duration expiry — one at a time,
//! in the order requests arrive. API handlers, the endpoint proxy and kilnd's own policies
//! send it a [`Command`] and await the answer; a caller that goes away never cancels a
//! transition, it only stops waiting for the answer.
//!
//! The owner asks [`transitions::next`] before each step and records every state with a
//! compare-and-swap on the state it came from. It tracks what its MicroVM holds of the
//! host's capacity (a VM slot, a memory reservation) and gives back exactly that when the
//! table says so, so no path can leak a reservation or give one back twice.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_agent::AgentClient;
use kiln_api::shapes::microvm::{IdlePolicy, MicrovmState as S, RunMicrovmRequest};
use kiln_api::ApiError;
use kiln_image::build::ImageConfig;
use kiln_vmm::Snapshot;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot, Mutex};

use super::hooks::SessionHooks;
use super::memory_sizer::{self, MemorySizing};
use super::sizer::{Decision, Sizing};
use super::transitions::{self, due, Effect, Event, Expiry, Refusal};
use super::{Live, Microvms};
use crate::api::wire::internal;
use crate::now;
use crate::store::{MicrovmRow, Reason};

/// Where an owner sends its answer.
pub(super) type Reply<T> = oneshot::Sender<Result<T, ApiError>>;

/// What an owner is asked to do.
pub(super) enum Command {
    /// Start the recorded PENDING MicroVM and call its run hook; answers its description.
    Launch(Box<Launch>, Reply<Value>),
    /// Save the session and stop QEMU.
    Suspend(Reply<()>),
    /// Bring a saved session back; answers whether this call resumed it.
    Resume(Reply<bool>),
    /// End the MicroVM for the given reason.
    Terminate(String, Reply<()>),
}

/// Where a launch's VM comes from.
// The snapshot's manifest dwarfs a boxed VM; a `Launch` travels boxed in its `Command`.
#[allow(clippy::large_enum_variant)]
pub(super) enum LaunchFrom {
    /// Restored now from the version's snapshot.
    Snapshot { snap: Snapshot, config: ImageConfig },
    /// A paused VM from the warm pool, restored from that snapshot before.
    Pool(Live),
}

/// What a launch needs beyond the row.
pub(super) struct Launch {
    pub from: LaunchFrom,
    pub req: RunMicrovmRequest,
    pub hooks: SessionHooks,
    /// The launch's idempotency token (token, scope): forgotten when the launch fails, so a
    /// retry launches anew, also when the caller has gone.
    pub token: Option<(String, String)>,
}

/// A pooled VM made a launch's own: its vCPUs continued, its clock set and its entropy
/// fed anew (it stood paused since its restore).
async fn claim(mut live: Live) -> Result<Live, kiln_vmm::VmmError> {
    live.vm.resume().await?;
    kiln_vmm::guest::refresh(live.vm.agent()).await?;
    live.since = Instant::now();
    Ok(live)
}

/// How many requests may wait for one owner; more callers wait to send.
const QUEUE: usize = 64;

/// What a MicroVM holds of the host's capacity.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Held {
    pub slot: bool,
    /// Its memory and baseline vCPUs (while resident).
    pub memory: bool,
    /// vCPUs the sizer granted on top of its baseline (while RUNNING).
    pub growth: u32,
    /// Memory, MiB, held beyond its baseline (plugged, or being plugged, while resident; held
    /// with its memory).
    pub grown_mib: u64,
}

/// How long the sizer waits for the guest to online or offline a vCPU.
const CPU_SWITCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Asks the guest to bring `want` vCPUs online, waiting at most [`CPU_SWITCH_TIMEOUT`].
async fn guest_onlines(agent: &AgentClient, want: u32) -> Result<(), String> {
    match tokio::time::timeout(CPU_SWITCH_TIMEOUT, agent.set_online_cpus(want)).await {
        Ok(Ok(cpus)) if cpus.online >= want => Ok(()),
        Ok(Ok(cpus)) => Err(format!("the guest has {} online", cpus.online)),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("the guest did not answer".into()),
    }
}
/// How long the memory sizer waits for the guest to report its memory.
const MEMORY_STATUS_TIMEOUT: Duration = Duration::from_secs(2);
/// The guest's answer to the memory sizer's question, or that it did not answer in time.
type MemoryReport = Result<
    Result<kiln_agent::client::GuestMemory, kiln_agent::AgentError>,
    tokio::time::error::Elapsed,
>;

/// How long a VM that has just started running is left to its first requests before the
/// sizers sample it: their agent calls hold the VM, and a proxied connection looking it up
/// meanwhile waits. Its host limits are set before it is published, not after this.
const SIZERS_SETTLE: Duration = Duration::from_secs(2);

/// What never changes about a MicroVM, read once from its row.
struct Facts {
    principal: String,
    started_at: f64,
    max_duration: Duration,
    memory_mib: u64,
    policy: Option<IdlePolicy>,
}

/// The task that owns one MicroVM.
struct Owner {
    sup: Arc<Microvms>,
    id: String,
    state: S,
    facts: Facts,
    held: Held,
    /// Since when it is suspended (since kilnd started, after a restart: a session is
    /// never cut short).
    suspended_since: Option<Instant>,
    /// Its vCPUs while RUNNING (`None`: not sized since it last started running).
    sizing: Option<Sizing>,
    /// Its memory while RUNNING (`None`: not sized since it last started running).
    memory: Option<MemorySizing>,
    /// When it last started running through this owner (`None` after a re-attach).
    running_since: Option<Instant>,
    /// Whether its guest is still to be put at its baseline's vCPUs (a resumed or re-attached
    /// session may have more online; the host already holds it to its baseline).
    switch_guest_vcpus: bool,
}

impl Microvms {
    /// Starts the owner of `row` (which holds `held` of the host's capacity) unless it has
    /// one; its command queue.
    pub(super) fn spawn_owner(&self, row: &MicrovmRow, held: Held) -> mpsc::Sender<Command> {
        let mut owners = self.owners.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = owners.get(&row.id) {
            return tx.clone();
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        owners.insert(row.id.clone(), tx.clone());
        let Some(sup) = self.me.upgrade() else {
            // kilnd is shutting down: nothing will serve the queue.
            return tx;
        };
        let owner = Owner {
            sup,
            id: row.id.clone(),
            state: row.state,
            facts: Facts {
                principal: row.owner.clone(),
                started_at: row.started_at,
                max_duration: Duration::from_secs(row.max_duration.max(0) as u64),
                memory_mib: row.memory_mib.max(0) as u64,
                policy: serde_json::from_value::<RunMicrovmRequest>(row.request.clone())
                    .ok()
                    .and_then(|q| q.idle_policy),
            },
            held,
            suspended_since: (row.state == S::Suspended).then(Instant::now),
            sizing: None,
            memory: None,
            running_since: None,
            switch_guest_vcpus: false,
        };
        tokio::spawn(owner.run(rx, tx.clone()));
        tx
    }

    /// The owner of MicroVM `id`, started if its row is open and it has none (`None`: no
    /// such MicroVM, or it has ended).
    fn owner_of(&self, id: &str) -> Result<Option<mpsc::Sender<Command>>, ApiError> {
        if let Some(tx) = self
            .owners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
        {
            return Ok(Some(tx.clone()));
        }
        let row = self.row(id)?;
        Ok((row.state != S::Terminated).then(|| {
            let held = Held {
                slot: true,
                memory: matches!(row.state, S::Pending | S::Running | S::Suspending),
                growth: 0,
                grown_mib: 0,
            };
            self.spawn_owner(&row, held)
        }))
    }

    /// Sends `event`'s command to the MicroVM's owner and waits for the answer. With no
    /// owner (the MicroVM has ended) the transition table answers from the stored state.
    pub(super) async fn ask<T: Default>(
        &self,
        id: &str,
        event: Event,
        make: impl FnOnce(Reply<T>) -> Command,
    ) -> Result<T, ApiError> {
        if let Some(tx) = self.owner_of(id)? {
            let (reply, answer) = oneshot::channel();
            if tx.send(make(reply)).await.is_ok() {
                if let Ok(answer) = answer.await {
                    return answer;
                }
            }
        }
        let row = self.row(id)?;
        match transitions::next(row.state, event) {
            Err(Refusal::Already) => Ok(T::default()),
            Err(Refusal::Conflict(m)) => Err(ApiError::conflict(
                "Microvm",
                id,
                format!("MicroVM {id}: {m}"),
            )),
            _ => Err(ApiError::internal(format!(
                "MicroVM {id} is {} and has no owner on this host; try again",
                row.state
            ))),
        }
    }
}

impl Owner {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>, me: mpsc::Sender<Command>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while self.state != S::Terminated {
            tokio::select! {
                biased;
                command = rx.recv() => match command {
                    Some(c) => self.serve(c).await,
                    None => return,
                },
                _ = tick.tick() => {
                    self.expire().await;
                    self.size().await;
                }
            }
        }
        {
            let mut owners = self.sup.owners.lock().unwrap_or_else(|p| p.into_inner());
            if owners.get(&self.id).is_some_and(|tx| tx.same_channel(&me)) {
                owners.remove(&self.id);
            }
        }
        drop(me);
        // Whoever asked before the owner left gets the ended MicroVM's answer.
        rx.close();
        while let Some(c) = rx.recv().await {
            self.serve(c).await;
        }
    }

    async fn serve(&mut self, command: Command) {
        match command {
            Command::Launch(launch, reply) => {
                let _ = reply.send(self.launch(*launch).await);
            }
            Command::Suspend(reply) => {
                let _ = reply.send(self.suspend().await);
            }
            Command::Resume(reply) => {
                let _ = reply.send(self.resume().await);
            }
            Command::Terminate(reason, reply) => {
                let _ = reply.send(self.terminate(&reason).await);
            }
        }
    }

    fn conflict(&self, message: impl std::fmt::Display) -> ApiError {
        ApiError::conflict(
            "Microvm",
            &self.id,
            format!("MicroVM {}: {message}", self.id),
        )
    }

    /// Where a request leads from the current state; `Ok(None)`: already there.
    fn ask_table(&self, event: Event) -> Result<Option<transitions::Step>, ApiError> {
        match transitions::next(self.state, event) {
            Ok(step) => Ok(Some(step)),
            Err(Refusal::Already) => Ok(None),
            Err(Refusal::Conflict(m)) => Err(self.conflict(m)),
            Err(Refusal::Impossible) => Err(ApiError::internal(format!(
                "MicroVM {}: {event:?} cannot happen while it is {}",
                self.id, self.state
            ))),
        }
    }

    /// Records `event`'s step: the state (compare-and-swap on the current one), the reason,
    /// and what it gives back. The step's effect is returned for the caller to perform.
    fn record(&mut self, event: Event, reason: Reason<'_>) -> Result<Effect, ApiError> {
        let step = transitions::next(self.state, event).map_err(|r| {
            ApiError::internal(format!(
                "MicroVM {}: {event:?} while {}: {r:?}",
                self.id, self.state
            ))
        })?;
        let ended = (step.to == S::Terminated).then(now);
        let moved = self
            .sup
            .store
            .transition_microvm(&self.id, self.state, step.to, reason, ended)
            .map_err(internal)?;
        if !moved {
            // Only the owner writes a live MicroVM's state: this is a bug, said loudly.
            let stored = self.sup.row(&self.id).map(|r| r.state);
            tracing::error!(microvm = %self.id, expected = %self.state, ?stored, to = %step.to, "state changed under its owner");
            if let Ok(s) = stored {
                self.state = s;
            }
            return Err(ApiError::internal(format!(
                "MicroVM {} changed state under its owner; try again",
                self.id
            )));
        }
        self.state = step.to;
        if step.to != S::Running {
            // vCPU growth is a running VM's only: the store reset its vCPUs with this swap.
            // Memory stays plugged (a suspended session keeps it); it is sized anew when the
            // VM runs again.
            self.shed_growth();
            self.memory = None;
            self.running_since = None;
        }
        match step.effect {
            Effect::ReleaseMemory => self.give_back(false),
            Effect::ReleaseAll => self.give_back(true),
            _ => {}
        }
        if step.to == S::Terminated {
            self.sup.activity.forget(&self.id);
            let _ = std::fs::remove_dir_all(self.sup.dir_of(&self.id));
        }
        Ok(step.effect)
    }

    /// Gives back the memory reservation with its growth (and the slot when `all`), if held.
    fn give_back(&mut self, all: bool) {
        let grown = std::mem::take(&mut self.held.grown_mib);
        if grown > 0 {
            self.sup.release_memory_growth(grown);
        }
        let memory = std::mem::take(&mut self.held.memory);
        let slot = all && std::mem::take(&mut self.held.slot);
        let mib = if memory { self.facts.memory_mib } else { 0 };
        if slot {
            self.sup.release(mib);
        } else if memory {
            self.sup.release_memory(mib);
        }
    }

    /// Gives back the vCPUs the sizer granted on top of the baseline; the next time the VM
    /// runs it is sized from its baseline again.
    fn shed_growth(&mut self) {
        let growth = std::mem::take(&mut self.held.growth);
        if growth > 0 {
            self.sup.release_growth(u64::from(growth));
        }
        self.sizing = None;
        self.switch_guest_vcpus = false;
    }

    /// Puts a VM that is about to be published at its baseline on the host — its cgroup's
    /// CPU quota and memory limit, admission and the store — before any request reaches it
    /// (the guest's side waits for the sizers' first second). `session`: it comes back from
    /// a suspend, and may have memory plugged or a request to its device under way.
    async fn start_sizers(&mut self, vm: &dyn kiln_vmm::MicroVm, session: bool) {
        if self.sup.config.vcpu_growth {
            self.sizing = Some(self.start_sizing(vm));
            // An image's snapshot has its baseline online; a session may have had more.
            self.switch_guest_vcpus &= session;
        }
        self.memory = Some(self.start_memory(vm, session).await);
    }

    /// The sizers' second, while the VM runs: its vCPUs ([`Owner::size_vcpus`]), then its
    /// memory ([`Owner::size_memory`]). Skipped while a request holds the VM, and in the
    /// first seconds it runs ([`SIZERS_SETTLE`]). What goes to the guest is awaited without
    /// holding the VM: a guest slow to answer would otherwise hold up its own proxied
    /// connections while they look it up.
    async fn size(&mut self) {
        if self.state != S::Running
            || self
                .running_since
                .is_some_and(|t| t.elapsed() < SIZERS_SETTLE)
        {
            return;
        }
        let Some(shared) = self.sup.live.lock().await.get(&self.id).cloned() else {
            return;
        };
        let Ok(agent) = shared.try_lock().map(|l| l.vm.agent().clone()) else {
            return;
        };
        if self.sup.config.vcpu_growth {
            self.size_vcpus(&shared, &agent).await;
        }
        let report = match self.memory.as_ref() {
            Some(m) if !m.fixed => {
                Some(tokio::time::timeout(MEMORY_STATUS_TIMEOUT, agent.memory()).await)
            }
            _ => None,
        };
        let Ok(live) = shared.try_lock() else {
            return;
        };
        self.size_memory(live.vm.as_ref(), report).await;
    }

    /// Samples the running VM's CPU time and grows or shrinks it by one vCPU when
    /// [`Sizing::observe`] says so.
    async fn size_vcpus(&mut self, shared: &Arc<Mutex<Live>>, agent: &AgentClient) {
        let used = {
            let Ok(live) = shared.try_lock() else {
                return;
            };
            if self.sizing.is_none() {
                // Re-attached after a restart (a session): not started through `start_sizers`.
                self.sizing = Some(self.start_sizing(live.vm.as_ref()));
            }
            live.vm.cpu_time()
        };
        if std::mem::take(&mut self.switch_guest_vcpus) {
            self.switch_guest_to_baseline(agent).await;
        }
        let (Some(sizing), Some(used)) = (self.sizing.as_mut(), used) else {
            return;
        };
        match sizing.observe(Instant::now(), used) {
            Decision::Hold => {}
            Decision::Grow => self.grow(shared, agent).await,
            Decision::Shrink => self.shrink(shared, agent).await,
        }
    }

    /// Puts a VM that has just started running (launched, resumed, claimed from the pool,
    /// re-attached) at its baseline on the host — its CPU quota and the store, whatever its
    /// session had before — and says whether it may grow: only with a cgroup to hold it to
    /// its grant. Its guest is switched to the baseline in the sizer's first second
    /// ([`Owner::switch_guest_to_baseline`]).
    fn start_sizing(&mut self, vm: &dyn kiln_vmm::MicroVm) -> Sizing {
        let range = vm.vcpu_range();
        if let Err(e) = self
            .sup
            .store
            .set_microvm_vcpus(&self.id, range.baseline, now())
        {
            tracing::warn!(microvm = %self.id, error = %e, "recording the vCPU grant");
        }
        if !range.can_grow() {
            return Sizing::fixed(range);
        }
        if let Err(e) = vm.set_cpu_grant(range.baseline) {
            tracing::info!(microvm = %self.id, error = %e, "no vCPU growth: nothing on the host would hold it to a grant");
            return Sizing::fixed(range);
        }
        if vm.cpu_time().is_none() {
            return Sizing::fixed(range);
        }
        self.switch_guest_vcpus = true;
        Sizing::at_baseline(range)
    }

    /// Asks the guest to have its baseline's vCPUs online; one that cannot switch vCPUs (an
    /// older agent answers an error) or does not answer keeps its baseline.
    async fn switch_guest_to_baseline(&mut self, agent: &AgentClient) {
        let Some(baseline) = self.sizing.as_ref().map(|s| s.range.baseline) else {
            return;
        };
        let switched =
            tokio::time::timeout(CPU_SWITCH_TIMEOUT, agent.set_online_cpus(baseline)).await;
        let fixed = match switched {
            Ok(Ok(_)) => false,
            Ok(Err(e)) => {
                tracing::info!(microvm = %self.id, error = %e, "no vCPU growth: the guest cannot switch vCPUs");
                true
            }
            Err(_) => true,
        };
        if let Some(s) = self.sizing.as_mut() {
            s.fixed |= fixed;
        }
    }

    /// One vCPU more: reserved in admission, granted by the cgroup, then onlined in the
    /// guest; any step that fails undoes the ones before (the VM keeps what it had). The
    /// host steps hold the VM a moment each; the guest's is awaited without it.
    async fn grow(&mut self, shared: &Arc<Mutex<Live>>, agent: &AgentClient) {
        let Some(granted) = self.sizing.as_ref().map(|s| s.granted) else {
            return;
        };
        let next = granted + 1;
        if let Err(full) = self.sup.reserve_growth(1) {
            self.sup.metrics.vcpu_change("refused");
            tracing::debug!(microvm = %self.id, %full, "busy, but the vCPU budget is full");
            return;
        }
        self.held.growth += 1;
        let granted_now = match shared.try_lock() {
            Ok(live) => live.vm.set_cpu_grant(next).map_err(|e| e.to_string()),
            Err(_) => {
                // A request holds the VM this moment: the sizer asks again next second.
                self.held.growth -= 1;
                self.sup.release_growth(1);
                return;
            }
        };
        let onlined = match granted_now {
            Ok(()) => guest_onlines(agent, next).await,
            Err(why) => Err(why),
        };
        if let Err(why) = onlined {
            // Back to what admission holds for it: waits for a request holding the VM.
            let _ = shared.lock().await.vm.set_cpu_grant(granted);
            self.held.growth -= 1;
            self.sup.release_growth(1);
            if let Some(s) = self.sizing.as_mut() {
                s.fixed = true;
            }
            tracing::warn!(microvm = %self.id, %why, "cannot grow; it keeps {granted} vCPUs");
            return;
        }
        self.set_granted(next);
        self.sup.metrics.vcpu_change("grow");
        tracing::info!(microvm = %self.id, vcpus = next, "busy: grown");
    }

    /// One vCPU fewer: offlined in the guest (best effort: the cgroup is what holds it),
    /// taken back by the cgroup, then released in admission.
    async fn shrink(&mut self, shared: &Arc<Mutex<Live>>, agent: &AgentClient) {
        let Some(granted) = self.sizing.as_ref().map(|s| s.granted) else {
            return;
        };
        let next = granted - 1;
        match tokio::time::timeout(CPU_SWITCH_TIMEOUT, agent.set_online_cpus(next)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::info!(microvm = %self.id, error = %e, "the guest kept a vCPU online; the host takes its grant back anyway")
            }
            Err(_) => {
                tracing::info!(microvm = %self.id, "the guest did not answer; the host takes the vCPU's grant back anyway")
            }
        }
        if let Err(e) = shared.lock().await.vm.set_cpu_grant(next) {
            tracing::warn!(microvm = %self.id, error = %e, "cannot lower the VM's CPU quota; it keeps {granted} vCPUs");
            return;
        }
        self.held.growth = self.held.growth.saturating_sub(1);
        self.sup.release_growth(1);
        self.set_granted(next);
        self.sup.metrics.vcpu_change("shrink");
        tracing::info!(microvm = %self.id, vcpus = next, "idle: shrunk");
    }

    /// Asks the running guest what memory it has available and plugs more, or asks for a
    /// step back, when [`MemorySizing::observe`] says so; and once the guest has given memory
    /// back, lowers its host limit and admission to match.
    async fn size_memory(&mut self, vm: &dyn kiln_vmm::MicroVm, report: Option<MemoryReport>) {
        if self.memory.is_none() {
            // Re-attached after a restart: a session, as far as its device goes.
            self.memory = Some(self.start_memory(vm, true).await);
        }
        if self.memory.as_ref().is_none_or(|m| m.fixed) {
            return;
        }
        // None: the sizer had not started when the guest would have been asked.
        let Some(report) = report else {
            return;
        };
        let m = match report {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => {
                tracing::info!(microvm = %self.id, error = %e, "no memory growth: the guest does not report its memory");
                if let Some(m) = self.memory.as_mut() {
                    m.fixed = true;
                }
                return;
            }
            // A guest that does not answer this second is sampled the next.
            Err(_) => return,
        };
        let Ok(plugged) = vm.plugged_memory().await else {
            return;
        };
        self.settle_memory(vm, plugged);
        let sample = memory_sizer::Sample {
            total_kib: m.total_kib,
            available_kib: m.available_kib,
        };
        let Some(decision) = self.memory.as_mut().map(|s| s.observe(plugged, sample)) else {
            return;
        };
        match decision {
            memory_sizer::Decision::Hold => {}
            memory_sizer::Decision::Grow(target) => self.grow_memory(vm, target).await,
            memory_sizer::Decision::Shrink(target) => self.shrink_memory(vm, target).await,
        }
    }

    /// Takes a VM that has just started running as it is — a resumed session keeps the memory
    /// it had plugged — counting that in admission, the store and its host limit, and says
    /// whether it may change: only with `--memory-growth on`, a device to grow into and a
    /// cgroup to hold it to its grant (a guest agent that cannot report its memory makes it
    /// fixed at the first sample). `session`: a saved session's device may have a request
    /// under way, which is ended here; a launch's comes from an image, with none.
    async fn start_memory(&mut self, vm: &dyn kiln_vmm::MicroVm, session: bool) -> MemorySizing {
        let range = vm.memory_range();
        if !range.can_grow() {
            return MemorySizing::fixed(range);
        }
        let plugged = match vm.plugged_memory().await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(microvm = %self.id, error = %e, "no memory growth: cannot read its device");
                return MemorySizing::fixed(range);
            }
        };
        self.hold_grown(plugged);
        // A request still under way when the session was saved ends here: it has what it has.
        if session {
            if let Err(e) = vm.request_memory(plugged).await {
                tracing::warn!(microvm = %self.id, error = %e, "no memory growth: cannot ask its device");
                return MemorySizing::fixed(range);
            }
        }
        if let Err(e) = vm.set_memory_grant(plugged) {
            tracing::info!(microvm = %self.id, error = %e, "no memory growth: nothing on the host would hold it to a grant");
            return MemorySizing::fixed(range);
        }
        // Held to what it has even when it may not grow (`--memory-growth off`).
        if !self.sup.config.memory_growth {
            return MemorySizing::fixed(range);
        }
        MemorySizing::at(range, plugged)
    }

    /// Holds `mib` beyond the baseline in admission and the store, whatever was held before
    /// (memory the VM has is on the host: counted without a limit).
    fn hold_grown(&mut self, mib: u64) {
        let held = self.held.grown_mib;
        if mib > held {
            self.sup.admit_memory_growth(mib - held);
        } else if mib < held {
            self.sup.release_memory_growth(held - mib);
        }
        self.held.grown_mib = mib;
        self.record_memory_grant();
    }

    /// Records in the store the memory this owner holds beyond the VM's baseline.
    fn record_memory_grant(&self) {
        if let Err(e) = self
            .sup
            .store
            .set_microvm_memory(&self.id, self.held.grown_mib, now())
        {
            tracing::warn!(microvm = %self.id, error = %e, "recording the memory grant");
        }
    }

    /// Once the guest has given memory back (its device holds less than this owner holds for
    /// it), the host limit, admission and usage come down to what it still has.
    fn settle_memory(&mut self, vm: &dyn kiln_vmm::MicroVm, plugged: u64) {
        let Some(target) = self.memory.as_ref().map(|m| m.target) else {
            return;
        };
        let keep = target.max(plugged);
        if keep == self.held.grown_mib {
            return;
        }
        if let Err(e) = vm.set_memory_grant(keep) {
            tracing::warn!(microvm = %self.id, error = %e, "cannot change the VM's memory limit; it keeps its grant");
            return;
        }
        self.hold_grown(keep);
    }

    /// More memory, to `target` beyond the baseline: reserved in admission, allowed by the
    /// cgroup, then plugged; any step that fails undoes the ones before (the VM keeps what
    /// it had and stops growing).
    async fn grow_memory(&mut self, vm: &dyn kiln_vmm::MicroVm, target: u64) {
        let held = self.held.grown_mib;
        let extra = target.saturating_sub(held);
        {
            // The principal's quota counts growth too: the grant is recorded before the lock
            // RunMicrovm admits under is let go, so no launch of theirs slips in between.
            let _claims = self
                .sup
                .run_claims
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if let Err(e) = self
                .sup
                .quotas
                .admit_memory_growth(&self.facts.principal, extra)
            {
                self.sup.metrics.memory_change("refused");
                tracing::debug!(microvm = %self.id, error = %e.message(), "short of memory, but its owner's memory quota is used up");
                return;
            }
            if let Err(full) = self.sup.reserve_memory_growth(extra) {
                self.sup.metrics.memory_change("refused");
                tracing::debug!(microvm = %self.id, %full, "short of memory, but the memory budget is full");
                return;
            }
            self.held.grown_mib += extra;
            self.record_memory_grant();
        }
        let undo = |this: &mut Owner, why: String| {
            let _ = vm.set_memory_grant(held);
            this.held.grown_mib = held;
            this.sup.release_memory_growth(extra);
            this.record_memory_grant();
            if let Some(m) = this.memory.as_mut() {
                m.fixed = true;
            }
            tracing::warn!(microvm = %this.id, %why, "cannot grow its memory; it keeps {held} MiB beyond its baseline");
        };
        if let Err(e) = vm.set_memory_grant(target) {
            return undo(self, e.to_string());
        }
        let asked = match vm.request_memory(target).await {
            Ok(asked) => asked,
            Err(e) => return undo(self, e.to_string()),
        };
        if let Some(m) = self.memory.as_mut() {
            m.target = asked;
        }
        self.sup.metrics.memory_change("grow");
        tracing::info!(microvm = %self.id, grown_mib = asked, "short of memory: grown");
    }

    /// A step of memory back, to `target` beyond the baseline: the device is asked for less;
    /// the guest gives it back as it can, and the host limit and admission follow
    /// ([`Owner::settle_memory`]).
    async fn shrink_memory(&mut self, vm: &dyn kiln_vmm::MicroVm, target: u64) {
        match vm.request_memory(target).await {
            Ok(asked) => {
                if let Some(m) = self.memory.as_mut() {
                    m.target = asked;
                }
                self.sup.metrics.memory_change("shrink");
                tracing::info!(microvm = %self.id, grown_mib = asked, "memory to spare: shrinking");
            }
            Err(e) => {
                tracing::warn!(microvm = %self.id, error = %e, "cannot ask the guest for memory back");
            }
        }
    }

    /// Records a new grant: the sizer's view and the store's (usage counts from now on).
    fn set_granted(&mut self, vcpus: u32) {
        if let Some(s) = self.sizing.as_mut() {
            s.granted = vcpus;
        }
        if let Err(e) = self.sup.store.set_microvm_vcpus(&self.id, vcpus, now()) {
            tracing::warn!(microvm = %self.id, error = %e, "recording the vCPU grant");
        }
    }

    /// Takes the running VM out of the shared table, waiting briefly for a proxied request
    /// that is looking it up.
    async fn take_live(&self) -> Result<Option<Live>, Arc<Mutex<Live>>> {
        let Some(mut shared) = self.sup.live.lock().await.remove(&self.id) else {
            return Ok(None);
        };
        for _ in 0..200 {
            match Arc::try_unwrap(shared) {
                Ok(l) => return Ok(Some(l.into_inner())),
                Err(s) => shared = s,
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Err(shared)
    }

    /// Makes a running VM reachable: held to its baseline on the host
    /// ([`Owner::start_sizers`]), its forwards stored, the VM in the shared table.
    async fn publish(&mut self, live: Live, session: bool) -> Result<(), ApiError> {
        self.start_sizers(live.vm.as_ref(), session).await;
        self.sup
            .store
            .set_microvm_forwards(&self.id, &json!(live.forwards))
            .map_err(internal)?;
        self.sup
            .live
            .lock()
            .await
            .insert(self.id.clone(), Arc::new(Mutex::new(live)));
        self.running_since = Some(Instant::now());
        Ok(())
    }

    async fn launch(&mut self, l: Launch) -> Result<Value, ApiError> {
        let id = self.id.clone();
        let dir = self.sup.dir_of(&id);
        let failed = |this: &mut Owner, why: String| {
            let reason = format!("launch failed: {why}");
            let _ = this.record(Event::LaunchFailed, Reason::Set(&reason));
            if let Some((token, scope)) = &l.token {
                // Nothing runs for this token: a retry with it launches anew.
                let _ = this.sup.store.forget_client_token(token, scope);
            }
        };
        let t0 = Instant::now();
        let started = match l.from {
            LaunchFrom::Snapshot { snap, config } => {
                let started = self
                    .sup
                    .launch(&id, &dir, &snap, &config, &l.req, l.hooks.clone())
                    .await;
                if let Ok(live) = &started {
                    super::name_guest(live.vm.as_ref(), &id).await;
                }
                started
            }
            // Named when it was pooled: its id was already its own.
            LaunchFrom::Pool(live) => claim(live).await,
        };
        let live = match started {
            Ok(live) => live,
            Err(e) => {
                self.sup.host.vmm.kill_leftovers(&dir);
                failed(self, e.to_string());
                tracing::warn!(microvm = %id, error = %e, "launch failed");
                return Err(ApiError::internal(format!(
                    "MicroVM {id} could not start: {e}"
                )));
            }
        };
        let restored = t0.elapsed();
        // The run hook is where a session gets its secrets and ids: never at build time.
        // AWS's contract: the MicroVM's id and the caller's payload, as given (a string).
        let mut body = serde_json::json!({ "microvmId": id });
        if let Some(payload) = &l.req.run_hook_payload {
            body["runHookPayload"] = payload.clone().into();
        }
        let body = body.to_string();
        if let Err(e) = live
            .hooks
            .call(live.vm.as_ref(), "run", body.as_bytes())
            .await
        {
            let _ = live.vm.terminate().await;
            failed(self, e.clone());
            return Err(self.conflict(format!("did not start: {e}")));
        }
        let hooked = t0.elapsed();
        // The VM's own steps (QEMU up, state loaded, running, agent, refreshed), ms from its
        // start: where a launch's time went, in the log line that ends it.
        let steps: Vec<String> = live
            .vm
            .timeline()
            .steps()
            .iter()
            .map(|(step, at)| format!("{step}:{}", at.as_millis()))
            .collect();
        self.publish(live, false).await?;
        self.record(Event::Launched, Reason::Clear)?;
        tracing::info!(
            microvm = %id,
            started_ms = restored.as_millis() as u64,
            run_hook_ms = (hooked - restored).as_millis() as u64,
            total_ms = t0.elapsed().as_millis() as u64,
            vm_steps = %steps.join(","),
            "launched"
        );
        crate::api::wire::to_value(&self.sup.describe(&self.sup.row(&id)?))
    }

    async fn suspend(&mut self) -> Result<(), ApiError> {
        let Some(_) = self.ask_table(Event::Suspend)? else {
            return Ok(());
        };
        let id = self.id.clone();
        let live = match self.take_live().await {
            Ok(Some(l)) => l,
            Ok(None) => return Err(self.conflict("it is not running on this host")),
            Err(shared) => {
                self.sup.live.lock().await.insert(id.clone(), shared);
                return Err(self.conflict("it is busy; try again"));
            }
        };
        let started = Instant::now();
        self.record(Event::Suspend, Reason::Clear)?;
        if let Err(e) = live.hooks.call(live.vm.as_ref(), "suspend", b"{}").await {
            tracing::info!(microvm = %id, error = %e, "suspend hook");
        }
        let Live {
            vm,
            forwards,
            hooks,
            ..
        } = live;
        let suspended = vm.suspend(&self.sup.suspended_dir(&id)).await;
        self.sup
            .metrics
            .suspend_finished(suspended.is_ok(), started.elapsed());
        match suspended {
            Ok(saved) => {
                self.record(Event::Saved, Reason::Clear)?;
                // Usage: what the saved session occupies (a few files, read at once).
                if let Err(e) = self
                    .sup
                    .store
                    .set_microvm_snapshot_bytes(&id, saved.allocated_bytes())
                {
                    tracing::warn!(microvm = %id, error = %e, "recording the session's size");
                }
                self.suspended_since = Some(Instant::now());
                tracing::info!(microvm = %id, "suspended");
                Ok(())
            }
            Err(failure) => {
                let message = failure.to_string();
                match failure.vm {
                    Some(vm) => {
                        self.sup.live.lock().await.insert(
                            id.clone(),
                            Arc::new(Mutex::new(Live {
                                since: Instant::now(),
                                vm,
                                forwards,
                                hooks,
                            })),
                        );
                        self.record(Event::SuspendFailed, Reason::Set(&message))?;
                        Err(ApiError::internal(message))
                    }
                    None => {
                        // QEMU is gone, and the guest's memory with it: no retry can
                        // suspend it, so the answer is the state it ended in, not a 500.
                        self.sup.host.vmm.kill_leftovers(&self.sup.dir_of(&id));
                        let reason = format!("the MicroVM ended while suspending: {message}");
                        self.record(Event::SuspendLost, Reason::Set(&reason))?;
                        Err(self.conflict(format!("it is TERMINATED: {reason}")))
                    }
                }
            }
        }
    }

    async fn resume(&mut self) -> Result<bool, ApiError> {
        let Some(_) = self.ask_table(Event::Resume)? else {
            return Ok(false);
        };
        let id = self.id.clone();
        self.sup.reserve_memory(self.facts.memory_mib)?;
        self.held.memory = true;
        // The session comes back with the memory it had grown to.
        let grown = match self.sup.store.microvm_grown_mib(&id) {
            Ok(g) => g,
            Err(e) => {
                self.give_back(false);
                tracing::error!(microvm = %id, error = %e, "reading a suspended session's memory");
                return Err(ApiError::internal(format!(
                    "MicroVM {id} could not resume (it stays SUSPENDED): kilnd's metadata \
                     store failed reading the memory it had grown to: {e}; try again"
                )));
            }
        };
        if grown > 0 {
            if let Err(full) = self.sup.reserve_memory_growth(grown) {
                self.give_back(false);
                return Err(ApiError::InsufficientCapacity {
                    message: format!(
                        "MicroVM {id} grew to {} MiB before it was suspended and resuming it \
                         does not fit: {full}; try later",
                        self.facts.memory_mib + grown
                    ),
                });
            }
            self.held.grown_mib = grown;
        }
        let started = Instant::now();
        let row = self.sup.row(&id)?;
        let hooks = match self
            .sup
            .store
            .version(&row.image, row.version)
            .map_err(internal)?
        {
            Some(v) => SessionHooks::of(&v.spec),
            None => SessionHooks::default(),
        };
        let (dir, vmm) = (self.sup.suspended_dir(&id), self.sup.host.vmm.clone());
        let opened = kiln_vmm::blocking(move || vmm.open_suspended(&dir));
        let sus = match opened.await {
            Ok(sus) => sus,
            Err(e) => {
                // The saved session itself is unusable (missing, damaged, or from another
                // QEMU): a retry would fail the same way, so the session ends here.
                let reason = format!("the suspended session cannot be restored: {e}");
                tracing::warn!(microvm = %id, %reason, "resume failed; terminating");
                self.record(Event::ResumeLost, Reason::Set(&reason))?;
                self.stop(&reason).await?;
                return Err(self.conflict(format!("it is TERMINATED: {reason}")));
            }
        };
        let old: BTreeMap<u16, u16> =
            serde_json::from_value(row.forwards.clone()).unwrap_or_default();
        let result = async {
            let guest_ports = old.keys().copied().chain([8080]);
            let logging_disabled = serde_json::from_value::<RunMicrovmRequest>(row.request.clone())
                .is_ok_and(|req| crate::sandbox::logging_disabled(&req));
            let (target, forwards) = self.sup.restore_target(
                &id,
                guest_ports,
                &self.sup.plan_of_row(&row),
                logging_disabled,
            )?;
            let vm = self.sup.host.vmm.resume(&sus, target).await?;
            Ok::<_, kiln_vmm::VmmError>(Live {
                since: Instant::now(),
                vm,
                forwards,
                hooks,
            })
        }
        .await;
        self.sup
            .metrics
            .resume_finished(result.is_ok(), started.elapsed());
        match result {
            Ok(live) => {
                if let Err(e) = live.hooks.call(live.vm.as_ref(), "resume", b"{}").await {
                    // The app refused the session back: AWS ends the MicroVM. It was never
                    // published, so no request reaches an app that said it cannot serve.
                    let reason = format!("resume failed: {e}");
                    tracing::warn!(microvm = %id, %reason, "terminating");
                    if let Err(e) = live.vm.terminate().await {
                        tracing::warn!(microvm = %id, error = %e, "terminating");
                    }
                    self.record(Event::ResumeLost, Reason::Set(&reason))?;
                    self.stop(&reason).await?;
                    return Err(self.conflict(format!("it is TERMINATED: {reason}")));
                }
                self.publish(live, true).await?;
                self.record(Event::Resumed, Reason::Clear)?;
                // The store takes no memory grant for a SUSPENDED row, which this one still
                // was when `publish` held it at what its device has plugged.
                self.record_memory_grant();
                self.suspended_since = None;
                tracing::info!(microvm = %id, "resumed");
                Ok(true)
            }
            Err(e) => {
                // Whatever the failed QEMU left must not hold the runtime directory.
                self.sup
                    .host
                    .vmm
                    .kill_leftovers(&self.sup.dir_of(&id).join("vm"));
                let _ = std::fs::remove_dir_all(self.sup.dir_of(&id).join("vm"));
                self.record(Event::ResumeFailed, Reason::Keep)?;
                tracing::warn!(microvm = %id, error = %e, "resume failed; the session stays suspended");
                Err(ApiError::internal(format!(
                    "MicroVM {id} could not resume (it stays SUSPENDED): {e}"
                )))
            }
        }
    }

    async fn terminate(&mut self, reason: &str) -> Result<(), ApiError> {
        let Some(_) = self.ask_table(Event::Terminate)? else {
            return Ok(());
        };
        self.record(Event::Terminate, Reason::Keep)?;
        kiln_vmm::crash_point("terminate-stopping");
        self.stop(reason).await
    }

    /// The Stop effect: the terminate hook, QEMU ended, everything on disk removed, then
    /// TERMINATED with `reason`.
    async fn stop(&mut self, reason: &str) -> Result<(), ApiError> {
        let id = self.id.clone();
        match self.take_live().await {
            Ok(Some(live)) => {
                if let Err(e) = live.hooks.call(live.vm.as_ref(), "terminate", b"{}").await {
                    tracing::info!(microvm = %id, error = %e, "terminate hook");
                }
                if let Err(e) = live.vm.terminate().await {
                    tracing::warn!(microvm = %id, error = %e, "terminating");
                }
            }
            Ok(None) => {}
            Err(shared) => {
                // A proxied request still holds it: stop QEMU through the lock.
                let mut l = shared.lock().await;
                let _ = l.vm.pause().await;
                l.forwards.clear();
            }
        }
        self.sup.host.vmm.kill_leftovers(&self.sup.dir_of(&id));
        self.record(Event::Stopped, Reason::Set(reason))?;
        tracing::info!(microvm = %id, %reason, "terminated");
        Ok(())
    }

    /// What the session's policy says is due, done (every second).
    async fn expire(&mut self) {
        if !matches!(self.state, S::Running | S::Suspended) {
            return;
        }
        let age = Duration::from_secs_f64((now() - self.facts.started_at).max(0.0));
        let idle = match self.state {
            S::Running => self.sup.idle_for(&self.id).await,
            _ => None,
        };
        let suspended_for = self.suspended_since.map(|s| s.elapsed());
        let Some(expiry) = due(
            self.state,
            age,
            self.facts.max_duration,
            self.facts.policy.as_ref(),
            idle,
            suspended_for,
        ) else {
            return;
        };
        let principal = self.facts.principal.clone();
        let id = self.id.clone();
        match expiry {
            Expiry::MaximumDuration => {
                let reason = "maximum duration reached";
                let done = self.terminate(reason).await;
                self.sup
                    .audit
                    .kilnd("TerminateMicrovm", &principal, &id, &done, reason);
            }
            Expiry::SuspendedTooLong => {
                let reason = if self
                    .facts
                    .policy
                    .is_some_and(|p| p.suspended_duration_seconds == 0)
                {
                    "idle, and suspendedDurationSeconds is 0"
                } else {
                    "suspended longer than suspendedDurationSeconds"
                };
                let done = self.terminate(reason).await;
                self.sup
                    .audit
                    .kilnd("TerminateMicrovm", &principal, &id, &done, reason);
            }
            Expiry::Idle(idle) => {
                tracing::info!(microvm = %id, idle_s = idle.as_secs(), "idle: suspending");
                let done = self.suspend().await;
                let reason = format!("no endpoint traffic for {} s", idle.as_secs());
                self.sup
                    .audit
                    .kilnd("SuspendMicrovm", &principal, &id, &done, &reason);
            }
        }
    }
}

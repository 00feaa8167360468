//! The warm pool: for each image version in use, MicroVMs restored ahead of demand and then
//! paused, so a RunMicrovm that takes one only continues it, refreshes its clock and entropy
//! and runs its run hook. A pooled VM belongs to no principal and is reachable by no one
//! (it is in no table the proxy reads) until a launch of its image version claims it; it
//! holds a VM slot and its memory in the host's admission like any MicroVM, and gives them
//! back first when a launch of another image needs room.
//!
//! Which versions are "in use": launched within the last [`DEMAND_WINDOW`]. How many each
//! gets: its launches in the last minute, at least `--warm-pool` and at most
//! `--warm-pool-max`. Pooled VMs are restored as a launch without connectors would be
//! (HTTP ingress, internet egress and the operator's allowances) with default logging; only
//! launches whose egress and logging match take one, since those are set up at restore.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex as StdMutex;
use std::time::{Duration, Instant};

use super::Live;

/// How long a version stays in use without launches.
pub(super) const DEMAND_WINDOW: Duration = Duration::from_secs(600);

/// The rate window that sizes a version's pool.
const RATE_WINDOW: Duration = Duration::from_secs(60);

/// An image version: its store key and number.
pub(super) type VersionKey = (String, i64);

/// A restored, paused VM waiting for a launch.
pub(super) struct Pooled {
    /// The MicroVM id it will have (its runtime directory is already named after it).
    pub id: String,
    /// The VM, its forwards and hooks.
    pub live: Live,
    /// Its guest memory, held in the host's admission.
    pub memory_mib: u64,
    /// The egress it was restored with (a launch's own connectors must match it).
    pub egress: kiln_net::Egress,
}

/// The pooled VMs and the recent launches of each version.
#[derive(Default)]
pub(super) struct Pool {
    ready: StdMutex<HashMap<VersionKey, Vec<Pooled>>>,
    launches: StdMutex<HashMap<VersionKey, VecDeque<Instant>>>,
}

fn lock<T>(m: &StdMutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Pool {
    /// A launch of `version` was asked for (pooled or not).
    pub fn noted(&self, version: &VersionKey, now: Instant) {
        let mut launches = lock(&self.launches);
        let times = launches.entry(version.clone()).or_default();
        times.push_back(now);
        while times
            .front()
            .is_some_and(|t| now.duration_since(*t) > DEMAND_WINDOW)
        {
            times.pop_front();
        }
        // A burst cannot grow the record past what the rate window can use.
        while times.len() > 4096 {
            times.pop_front();
        }
    }

    /// A pooled VM of `version` restored with `egress`, if one is ready.
    pub fn take(&self, version: &VersionKey, egress: &kiln_net::Egress) -> Option<Pooled> {
        let mut ready = lock(&self.ready);
        let vms = ready.get_mut(version)?;
        let at = vms.iter().position(|p| p.egress == *egress)?;
        let pooled = Some(vms.swap_remove(at));
        if ready.get(version).is_some_and(Vec::is_empty) {
            ready.remove(version);
        }
        pooled
    }

    /// Puts a VM (back) in the pool.
    pub fn put(&self, version: VersionKey, pooled: Pooled) {
        lock(&self.ready).entry(version).or_default().push(pooled);
    }

    /// How many VMs of `version` are ready.
    pub fn count(&self, version: &VersionKey) -> usize {
        lock(&self.ready).get(version).map_or(0, Vec::len)
    }

    /// How many VMs are pooled, all versions together.
    pub fn total(&self) -> usize {
        lock(&self.ready).values().map(Vec::len).sum()
    }

    /// Takes every VM of `version` out (its version is no longer runnable).
    pub fn drain(&self, version: &VersionKey) -> Vec<Pooled> {
        lock(&self.ready).remove(version).unwrap_or_default()
    }

    /// Takes out every VM restored with another egress than `current` (the operator changed
    /// what a launch without connectors may reach).
    pub fn stale(&self, current: &kiln_net::Egress) -> Vec<Pooled> {
        let mut ready = lock(&self.ready);
        let mut out = Vec::new();
        for vms in ready.values_mut() {
            let (keep, gone): (Vec<Pooled>, Vec<Pooled>) =
                vms.drain(..).partition(|p| p.egress == *current);
            *vms = keep;
            out.extend(gone);
        }
        ready.retain(|_, vms| !vms.is_empty());
        out
    }

    /// Takes one VM out to give its capacity to a launch: from the version with the most
    /// ready, `keep`'s last.
    pub fn evict_one(&self, keep: &VersionKey) -> Option<Pooled> {
        let mut ready = lock(&self.ready);
        let victim = ready
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .max_by_key(|(k, v)| (*k != keep, v.len()))
            .map(|(k, _)| k.clone())?;
        let pooled = ready.get_mut(&victim)?.pop();
        if ready.get(&victim).is_some_and(Vec::is_empty) {
            ready.remove(&victim);
        }
        pooled
    }

    /// Each version in use with the number of VMs it should have ready: its launches in
    /// the last minute, clamped to `least..=most`. Versions out of use are forgotten (their
    /// VMs are returned by [`Pool::drain`] when the caller drains what is not listed).
    pub fn targets(&self, now: Instant, least: usize, most: usize) -> Vec<(VersionKey, usize)> {
        let mut launches = lock(&self.launches);
        launches.retain(|_, times| {
            times
                .back()
                .is_some_and(|t| now.duration_since(*t) <= DEMAND_WINDOW)
        });
        launches
            .iter()
            .map(|(k, times)| {
                let recent = times
                    .iter()
                    .filter(|t| now.duration_since(**t) <= RATE_WINDOW)
                    .count();
                (k.clone(), recent.clamp(least, most.max(least)))
            })
            .collect()
    }

    /// The versions that have VMs ready.
    pub fn pooled_versions(&self) -> Vec<VersionKey> {
        lock(&self.ready).keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(v: i64) -> VersionKey {
        ("web".to_string(), v)
    }

    #[test]
    fn targets_when_launches_come_and_go_then_sized_by_the_last_minute_within_bounds() {
        let pool = Pool::default();
        let t0 = Instant::now();
        for i in 0..5 {
            pool.noted(&key(1), t0 + Duration::from_secs(i));
        }
        pool.noted(&key(2), t0);

        let busy = pool.targets(t0 + Duration::from_secs(10), 1, 3);
        let later = pool.targets(t0 + Duration::from_secs(120), 1, 3);
        let gone = pool.targets(t0 + DEMAND_WINDOW + Duration::from_secs(10), 1, 3);

        let sorted = |mut v: Vec<(VersionKey, usize)>| {
            v.sort();
            v
        };
        assert_eq!(sorted(busy), vec![(key(1), 3), (key(2), 1)]);
        assert_eq!(sorted(later), vec![(key(1), 1), (key(2), 1)]);
        assert!(gone.is_empty());
    }
}

//! Per-MicroVM traffic counters the idle policy reads, and the per-MicroVM rate limit.
//!
//! The table is read on every request, so each VM's entry is a set of atomics behind an
//! `Arc`; the map's write lock is taken only when a VM is first seen or forgotten.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// What the endpoint has seen of one MicroVM since it was first routed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Activity {
    /// Requests forwarded (a WebSocket counts once).
    pub requests: u64,
    /// Client connections currently carrying this VM's traffic, WebSocket tunnels included.
    pub open_connections: u64,
    /// Body and tunnel bytes from clients to the VM.
    pub bytes_in: u64,
    /// Body and tunnel bytes from the VM to clients.
    pub bytes_out: u64,
    /// When a request or a tunnel's inbound bytes last arrived.
    pub last_inbound: Instant,
}

/// Traffic counters of every MicroVM the endpoint has routed to; cheap to clone and share.
#[derive(Clone)]
pub struct ActivityTable {
    epoch: Instant,
    vms: Arc<RwLock<HashMap<String, Arc<VmActivity>>>>,
}

impl Default for ActivityTable {
    fn default() -> Self {
        Self::new()
    }
}

impl ActivityTable {
    /// An empty table.
    pub fn new() -> Self {
        Self {
            epoch: Instant::now(),
            vms: Arc::default(),
        }
    }

    /// The counters of `id`, if the endpoint has routed to it since it was last forgotten.
    pub fn snapshot(&self, id: &str) -> Option<Activity> {
        let vm = self.get(id)?;
        Some(Activity {
            requests: vm.requests.load(Ordering::Relaxed),
            open_connections: vm.open_connections.load(Ordering::Relaxed),
            bytes_in: vm.bytes_in.load(Ordering::Relaxed),
            bytes_out: vm.bytes_out.load(Ordering::Relaxed),
            last_inbound: self.instant(vm.last_inbound.load(Ordering::Relaxed)),
        })
    }

    /// How long since inbound traffic last reached `id` through the endpoint.
    pub fn idle_for(&self, id: &str) -> Option<Duration> {
        let vm = self.get(id)?;
        Some(
            self.instant(vm.last_inbound.load(Ordering::Relaxed))
                .elapsed(),
        )
    }

    /// Drops the counters of `id` (the VM was terminated).
    pub fn forget(&self, id: &str) {
        if let Ok(mut vms) = self.vms.write() {
            vms.remove(id);
        }
    }

    /// The entry of `id`, created on first sight with `last_inbound` = now.
    pub(crate) fn entry(&self, id: &str) -> Arc<VmActivity> {
        if let Some(vm) = self.get(id) {
            return vm;
        }
        let now = self.ticks();
        let mut vms = self
            .vms
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        vms.entry(id.to_string())
            .or_insert_with(|| {
                Arc::new(VmActivity {
                    epoch: self.epoch,
                    requests: AtomicU64::new(0),
                    open_connections: AtomicU64::new(0),
                    bytes_in: AtomicU64::new(0),
                    bytes_out: AtomicU64::new(0),
                    last_inbound: AtomicU64::new(now),
                    bucket: Mutex::new(None),
                })
            })
            .clone()
    }

    fn get(&self, id: &str) -> Option<Arc<VmActivity>> {
        let vms = self
            .vms
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        vms.get(id).cloned()
    }

    fn ticks(&self) -> u64 {
        ticks_since(self.epoch)
    }

    fn instant(&self, ticks: u64) -> Instant {
        self.epoch + Duration::from_nanos(ticks)
    }
}

fn ticks_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// One VM's counters; shared by every request and tunnel that carries its traffic.
pub(crate) struct VmActivity {
    epoch: Instant,
    requests: AtomicU64,
    open_connections: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    /// Nanoseconds since `epoch`.
    last_inbound: AtomicU64,
    bucket: Mutex<Option<TokenBucket>>,
}

impl VmActivity {
    /// A request arrived for this VM.
    pub(crate) fn request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.touch();
    }

    /// Inbound bytes (request body or tunnel) reached this VM.
    pub(crate) fn inbound(&self, bytes: usize) {
        self.bytes_in.fetch_add(bytes as u64, Ordering::Relaxed);
        self.touch();
    }

    /// Outbound bytes (response body or tunnel) left this VM.
    pub(crate) fn outbound(&self, bytes: usize) {
        self.bytes_out.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Counts an open connection until the guard drops.
    pub(crate) fn open_connection(self: &Arc<Self>) -> ConnectionGuard {
        self.open_connections.fetch_add(1, Ordering::Relaxed);
        ConnectionGuard(self.clone())
    }

    /// Counts an open connection unless `most` are open already (0 = no cap).
    pub(crate) fn try_open_connection(self: &Arc<Self>, most: usize) -> Option<ConnectionGuard> {
        let most = most as u64;
        self.open_connections
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (most == 0 || n < most).then_some(n + 1)
            })
            .ok()?;
        Some(ConnectionGuard(self.clone()))
    }

    /// Takes one request from the VM's token bucket, or says how long until one is free.
    pub(crate) fn admit(&self, per_second: u32, burst: u32) -> Result<(), Duration> {
        if per_second == 0 {
            return Ok(());
        }
        let mut bucket = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        let bucket = bucket.get_or_insert_with(|| TokenBucket::full(burst));
        bucket.take(
            Instant::now(),
            f64::from(per_second),
            f64::from(burst.max(1)),
        )
    }

    fn touch(&self) {
        self.last_inbound
            .fetch_max(ticks_since(self.epoch), Ordering::Relaxed);
    }
}

/// Keeps a VM's open-connection count up while held.
pub(crate) struct ConnectionGuard(Arc<VmActivity>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.open_connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Classic token bucket: `burst` tokens, refilled at `per_second`.
struct TokenBucket {
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    fn full(burst: u32) -> Self {
        Self {
            tokens: f64::from(burst.max(1)),
            at: Instant::now(),
        }
    }

    fn take(&mut self, now: Instant, per_second: f64, burst: f64) -> Result<(), Duration> {
        let refill = now.saturating_duration_since(self.at).as_secs_f64() * per_second;
        self.tokens = (self.tokens + refill).min(burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / per_second))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_when_burst_spent_then_refuses_until_refilled() {
        let start = Instant::now();
        let mut bucket = TokenBucket {
            tokens: 2.0,
            at: start,
        };

        let first = bucket.take(start, 10.0, 2.0);
        let second = bucket.take(start, 10.0, 2.0);
        let third = bucket.take(start, 10.0, 2.0);
        let later = bucket.take(start + Duration::from_millis(100), 10.0, 2.0);

        assert_eq!((first, second), (Ok(()), Ok(())));
        assert_eq!(third, Err(Duration::from_millis(100)));
        assert_eq!(later, Ok(()));
    }

    #[test]
    fn table_when_traffic_recorded_then_snapshot_counts_it() {
        let table = ActivityTable::new();
        let vm = table.entry("mvm-1");

        vm.request();
        vm.inbound(10);
        vm.outbound(7);
        let guard = vm.open_connection();
        let open = table.snapshot("mvm-1").map(|a| a.open_connections);
        drop(guard);
        let after = table.snapshot("mvm-1");

        assert_eq!(open, Some(1));
        let after = after.expect("entry exists");
        assert_eq!(
            (
                after.requests,
                after.open_connections,
                after.bytes_in,
                after.bytes_out
            ),
            (1, 0, 10, 7)
        );
        assert!(table.idle_for("mvm-1").is_some());
    }

    #[test]
    fn table_when_forgotten_then_unknown() {
        let table = ActivityTable::new();
        table.entry("mvm-1").request();

        table.forget("mvm-1");

        assert_eq!(table.snapshot("mvm-1"), None);
        assert_eq!(table.idle_for("mvm-1"), None);
    }
}

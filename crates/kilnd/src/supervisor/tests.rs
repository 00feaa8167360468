//! The owner's transitions and their races on the fake backend (`kiln_vmm::fake`): what
//! `tests/races.rs` checks through boto3 with QEMU, here in milliseconds. Each test asserts
//! what a user would see (the state, the answer) and that nothing leaked (the backend's live
//! VMs, the supervisor's admitted capacity).

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use kiln_api::shapes::microvm::{MicrovmState as S, RunMicrovmRequest};
use kiln_api::{ApiError, ArnContext};
use kiln_image::build::ImageConfig;
use kiln_vmm::fake::{FakeControl, FakeVmm, Fault, Op};
use kiln_vmm::Snapshot;
use serde_json::json;
use tokio::sync::oneshot;

use super::hooks::SessionHooks;
use super::owner::{Command, Held, Launch, LaunchFrom};
use super::{new_microvm_id, Microvms, Parts, MAX_DURATION_SECS};
use crate::config::Config;
use crate::store::{MicrovmRow, SqliteStore, Store};

/// Guest memory of the test image, MiB.
const MEMORY_MIB: u64 = 256;

/// A supervisor on the fake backend, with an image snapshot to launch from.
struct Bed {
    sup: Arc<Microvms>,
    fake: FakeControl,
    snap: Snapshot,
    _home: tempfile::TempDir,
}

impl Bed {
    fn new() -> Bed {
        // Short paths: each fake guest listens on a unix socket in its VM's directory.
        let home = tempfile::Builder::new()
            .prefix("kiln-own")
            .tempdir_in("/tmp")
            .expect("home");
        let path = home.path();
        let vmm = FakeVmm::new();
        let snap = vmm
            .add_snapshot(&path.join("image-snapshot"), MEMORY_MIB)
            .expect("snapshot");
        let store: Arc<dyn Store> =
            Arc::new(SqliteStore::open(&path.join("kiln.db"), "test-host").expect("store"));
        let config = Config::try_parse_from([
            "kilnd",
            "--max-memory-mib",
            "4096",
            "--min-available-mib",
            "0",
        ])
        .expect("config");
        let ctx = ArnContext {
            region: config.region.clone(),
            account: config.account.clone(),
        };
        let keys = Arc::new(crate::auth::keys::AccessKeys::new(store.clone()));
        let s3 = Arc::new(
            crate::artifacts::s3::S3Store::open(&path.join("s3"), keys).expect("s3 store"),
        );
        let network = crate::supervisor::network::Network::load(
            path,
            ctx.clone(),
            Vec::new(),
            kiln_net::GatewayConfig::default(),
        )
        .expect("network");
        let sup = Microvms::new(Parts {
            host: Arc::new(vmm.host(path)),
            store: store.clone(),
            quotas: Arc::new(crate::auth::quotas::Quotas::new(
                config.quota_limits(),
                Default::default(),
                store.clone(),
                path.to_owned(),
                s3,
            )),
            config: Arc::new(config),
            ctx,
            endpoint_port: 443,
            keys: Arc::new(
                crate::endpoint::tokens::TokenKeys::load_or_create(path).expect("token keys"),
            ),
            activity: crate::endpoint::proxy::ActivityTable::new(),
            metrics: Arc::new(crate::observe::metrics::Metrics::new(store.clone())),
            audit: Arc::new(crate::observe::audit::AuditLog::new(store)),
            network: Arc::new(network),
        });
        Bed {
            sup,
            fake: vmm.control(),
            snap,
            _home: home,
        }
    }

    /// A MicroVM launched as RunMicrovm would (admitted, recorded, started by its owner).
    async fn launch(&self) -> Result<String, ApiError> {
        let id = new_microvm_id();
        self.sup.reserve(MEMORY_MIB)?;
        let row = MicrovmRow {
            id: id.clone(),
            image: "img".into(),
            version: 1,
            state: S::Pending,
            state_reason: None,
            request: json!({ "imageIdentifier": "img" }),
            started_at: crate::now(),
            terminated_at: None,
            max_duration: MAX_DURATION_SECS,
            memory_mib: MEMORY_MIB as i64,
            kernel: "fake".into(),
            dir: self.sup.dir_of(&id).display().to_string(),
            forwards: json!({}),
            owner: "alice".into(),
        };
        self.sup.store.insert_microvm(&row).expect("row");
        let owner = self.sup.spawn_owner(
            &row,
            Held {
                slot: true,
                memory: true,
                growth: 0,
                grown_mib: 0,
            },
        );
        let req: RunMicrovmRequest = serde_json::from_value(row.request.clone()).expect("request");
        let launch = Box::new(Launch {
            from: LaunchFrom::Snapshot {
                snap: self.snap.clone(),
                config: ImageConfig::default(),
            },
            req,
            hooks: SessionHooks::default(),
            token: None,
        });
        let (reply, answer) = oneshot::channel();
        assert!(owner.send(Command::Launch(launch, reply)).await.is_ok());
        answer.await.expect("the owner answers")?;
        Ok(id)
    }

    async fn running(&self) -> String {
        self.launch().await.expect("launch")
    }

    fn row(&self, id: &str) -> MicrovmRow {
        self.sup.row(id).expect("row")
    }

    /// Commands waiting in the owner's queue (not the one it is serving).
    fn queued(&self, id: &str) -> usize {
        let owners = self.sup.owners.lock().unwrap_or_else(|p| p.into_inner());
        owners
            .get(id)
            .map_or(0, |tx| tx.max_capacity() - tx.capacity())
    }

    /// Waits until `id` is in `state` (its owner works on after its caller has gone).
    async fn reaches(&self, id: &str, state: S) {
        for _ in 0..1000 {
            if self.row(id).state == state {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!(
            "MicroVM {id} never reached {state}: {:?}",
            self.row(id).state
        );
    }
}

fn is_conflict(r: &Result<(), ApiError>) -> bool {
    matches!(r, Err(ApiError::Conflict { .. }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn launch_when_backend_restores_then_running_and_one_vm_admitted() {
    let bed = Bed::new();

    let id = bed.running().await;

    assert_eq!(bed.row(&id).state, S::Running);
    assert_eq!(bed.fake.live_vms(), 1);
    assert_eq!(bed.sup.admitted(), (1, MEMORY_MIB));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn launch_when_restore_fails_then_terminated_and_capacity_back() {
    let bed = Bed::new();
    bed.fake.fail_next(Fault::Restore);

    let launched = bed.launch().await;

    assert!(launched.is_err());
    assert_eq!(bed.fake.live_vms(), 0);
    assert_eq!(bed.sup.admitted(), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_when_suspend_in_flight_then_terminated_nothing_left_capacity_zero() {
    let bed = Bed::new();
    let id = bed.running().await;
    bed.fake.hold(Op::Suspend);
    let suspend = tokio::spawn({
        let (sup, id) = (bed.sup.clone(), id.clone());
        async move { sup.suspend(&id).await }
    });
    bed.fake.arrived(Op::Suspend).await;
    let terminate = tokio::spawn({
        let (sup, id) = (bed.sup.clone(), id.clone());
        async move { sup.terminate(&id, "terminated by request").await }
    });
    while bed.queued(&id) == 0 {
        tokio::task::yield_now().await;
    }

    bed.fake.release(Op::Suspend);
    let suspended = suspend.await.expect("suspend task");
    let terminated = terminate.await.expect("terminate task");

    assert!(suspended.is_ok(), "{suspended:?}");
    assert!(terminated.is_ok(), "{terminated:?}");
    assert_eq!(bed.row(&id).state, S::Terminated);
    assert_eq!(bed.fake.live_vms(), 0);
    assert_eq!(bed.fake.suspended(), 0);
    assert_eq!(bed.sup.admitted(), (0, 0));
    assert!(!bed.sup.dir_of(&id).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_when_terminated_then_conflict() {
    let bed = Bed::new();
    let id = bed.running().await;
    bed.sup.terminate(&id, "done").await.expect("terminate");

    let resumed = bed.sup.resume(&id).await;
    let suspended = bed.sup.suspend(&id).await;

    assert!(is_conflict(&resumed), "{resumed:?}");
    assert!(is_conflict(&suspended), "{suspended:?}");
    assert_eq!(bed.fake.calls(Op::Resume), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_when_ten_concurrent_requests_then_one_resume() {
    let bed = Bed::new();
    let id = bed.running().await;
    bed.sup.suspend(&id).await.expect("suspend");
    assert_eq!(bed.sup.admitted(), (1, 0));

    let requests: Vec<_> = (0..10)
        .map(|_| {
            let (sup, id) = (bed.sup.clone(), id.clone());
            tokio::spawn(async move { sup.resume_session(&id).await })
        })
        .collect();
    let mut resumed_here = 0;
    for r in requests {
        resumed_here += usize::from(r.await.expect("task").expect("resume answered 200"));
    }

    assert_eq!(resumed_here, 1);
    assert_eq!(bed.fake.calls(Op::Resume), 1);
    assert_eq!(bed.row(&id).state, S::Running);
    assert_eq!(bed.fake.live_vms(), 1);
    assert_eq!(bed.sup.admitted(), (1, MEMORY_MIB));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_when_caller_drops_its_future_then_resume_completes() {
    let bed = Bed::new();
    let id = bed.running().await;
    bed.sup.suspend(&id).await.expect("suspend");
    bed.fake.hold(Op::Resume);
    let caller = tokio::spawn({
        let (sup, id) = (bed.sup.clone(), id.clone());
        async move { sup.resume(&id).await }
    });
    bed.fake.arrived(Op::Resume).await;

    caller.abort();
    assert!(caller.await.is_err_and(|e| e.is_cancelled()));
    bed.fake.release(Op::Resume);
    bed.reaches(&id, S::Running).await;

    assert_eq!(bed.fake.calls(Op::Resume), 1);
    assert_eq!(bed.fake.live_vms(), 1);
    assert_eq!(bed.fake.suspended(), 0);
    assert_eq!(bed.sup.admitted(), (1, MEMORY_MIB));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_when_backend_fails_then_stays_suspended_and_a_retry_resumes() {
    let bed = Bed::new();
    let id = bed.running().await;
    bed.sup.suspend(&id).await.expect("suspend");
    bed.fake.fail_next(Fault::Resume);

    let failed = bed.sup.resume(&id).await;
    let state_after_failure = bed.row(&id).state;
    let admitted_after_failure = bed.sup.admitted();
    let retried = bed.sup.resume(&id).await;

    assert!(failed.is_err());
    assert_eq!(state_after_failure, S::Suspended);
    assert_eq!(admitted_after_failure, (1, 0));
    assert!(retried.is_ok(), "{retried:?}");
    assert_eq!(bed.row(&id).state, S::Running);
    assert_eq!(bed.sup.admitted(), (1, MEMORY_MIB));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspend_when_vm_survives_the_failure_then_running_with_a_reason() {
    let bed = Bed::new();
    let id = bed.running().await;
    bed.fake.fail_next(Fault::SuspendAlive);

    let suspended = bed.sup.suspend(&id).await;

    let row = bed.row(&id);
    assert!(suspended.is_err());
    assert_eq!(row.state, S::Running);
    assert!(
        row.state_reason
            .as_deref()
            .is_some_and(|r| r.contains("injected")),
        "{:?}",
        row.state_reason
    );
    assert_eq!(bed.fake.live_vms(), 1);
    assert_eq!(bed.sup.admitted(), (1, MEMORY_MIB));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspend_when_vm_dies_then_terminated_and_capacity_back() {
    let bed = Bed::new();
    let id = bed.running().await;
    bed.fake.fail_next(Fault::SuspendDead);

    let suspended = bed.sup.suspend(&id).await;

    assert!(is_conflict(&suspended), "{suspended:?}");
    assert_eq!(bed.row(&id).state, S::Terminated);
    assert_eq!(bed.fake.live_vms(), 0);
    assert_eq!(bed.sup.admitted(), (0, 0));
}

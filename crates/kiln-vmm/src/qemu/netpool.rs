//! Network namespaces made ahead of the VMs that need them.
//!
//! A VM's namespace is created, its loopback brought up and its drop-everything ruleset
//! loaded before QEMU starts in it: two host tools (`ip`, `nft`), ~20 ms a launch or resume
//! would otherwise wait for. A few such namespaces are kept ready, made in the background
//! after one is taken. Each is fresh — nothing has run in it — and is handed out once; an
//! unused one is freed with its descriptor when kilnd exits.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use kiln_net::{NetError, Netns};

/// How many namespaces are kept ready.
const READY: usize = 2;

/// How long a refill waits after a take: the VM that took one is starting meanwhile, and
/// the host tools would compete with it for the CPU.
const REFILL_AFTER: Duration = Duration::from_millis(300);

static PREPARED: Mutex<Vec<Netns>> = Mutex::new(Vec::new());
static FILLING: AtomicBool = AtomicBool::new(false);

/// A fresh namespace locked down (loopback up, every packet dropped): a ready one, else one
/// made now. Either way the ready ones are made up again in the background.
pub(crate) async fn take() -> Result<Netns, NetError> {
    let ready = PREPARED.lock().unwrap_or_else(|p| p.into_inner()).pop();
    refill();
    match ready {
        Some(netns) => Ok(netns),
        None => tokio::task::spawn_blocking(prepare)
            .await
            .map_err(|e| NetError::Tool {
                program: "ip".into(),
                message: format!("the namespace task failed: {e}"),
            })?,
    }
}

fn prepare() -> Result<Netns, NetError> {
    let netns = Netns::create()?;
    kiln_net::rules::apply(&netns, None)?;
    Ok(netns)
}

/// Makes the ready namespaces up to [`READY`], once at a time, off the caller's path.
fn refill() {
    if FILLING.swap(true, Ordering::AcqRel) {
        return;
    }
    tokio::spawn(async {
        tokio::time::sleep(REFILL_AFTER).await;
        let filled = tokio::task::spawn_blocking(|| loop {
            if PREPARED.lock().unwrap_or_else(|p| p.into_inner()).len() >= READY {
                return;
            }
            match prepare() {
                Ok(netns) => PREPARED
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(netns),
                Err(e) => {
                    // The next launch makes its own and reports the error to its caller.
                    tracing::debug!(error = %e, "cannot make a network namespace ahead");
                    return;
                }
            }
        })
        .await;
        if let Err(e) = filled {
            tracing::debug!(error = %e, "the namespace refill task failed");
        }
        FILLING.store(false, Ordering::Release);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A process in the namespace that is not kilnd's proxy connecting to a listener there:
    /// `Ok` when it connected, else what the connection attempt said.
    fn guest_side_connect(netns: &Netns, port: u16) -> Result<(), String> {
        let script = format!("exec 3<>/dev/tcp/127.0.0.1/{port}");
        netns
            .run("bash", &["-c", &script], "")
            .map_err(|e| e.to_string())
    }

    #[tokio::test]
    async fn take_when_a_ready_one_was_made_then_it_is_new_locked_down_and_handed_out_once() {
        let first = take().await.expect("a namespace (root)");
        // The refill runs after its delay; wait for a ready one.
        let mut waited = Duration::ZERO;
        while PREPARED.lock().expect("lock").is_empty() && waited < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(50)).await;
            waited += Duration::from_millis(50);
        }
        let second = take().await.expect("a ready namespace");
        let listener = second
            .listen_tcp("127.0.0.1:0".parse().expect("addr"))
            .expect("listen inside");
        let port = listener.local_addr().expect("port").port();

        assert_ne!(first.inode(), second.inode());
        assert!(!first.is_host() && !second.is_host());
        assert!(second
            .connect(listener.local_addr().expect("addr"))
            .await
            .is_ok());
        let refused = guest_side_connect(&second, port).expect_err("the ruleset must refuse it");
        assert!(refused.contains("refused"), "{refused}");
    }
}

//! Where a MicroVM's port is, and the connector that reaches it.
//!
//! A VM's forwards listen inside its own network namespace, where no host process but
//! kilnd can connect. The pooled HTTP clients name such an upstream by a synthetic host
//! (`<microvm-id>.netns.invalid:<port>`); the connector looks the namespace up in the
//! [`UpstreamBook`] and opens the connection inside it.
//!
//! An HTTP/1.1 client connection does not go through the pool: it keeps the connection its
//! request opened ([`KeptSlot`]) for its next request to the same port, as a client that
//! talked to the app directly would — no pool lookup, no synthetic host to build per
//! request. The pool serves HTTP/2 clients (whose streams run at once) and gRPC.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::client::conn::http1::SendRequest;
use hyper::Uri;
use hyper_util::rt::TokioIo;
use kiln_vmm::Netns;
use tokio::net::TcpStream;

use super::body::ProxyBody;

const NETNS_SUFFIX: &str = ".netns.invalid";

/// One MicroVM port: an address, inside a namespace (a VM) or in kilnd's own (tests).
#[derive(Debug, Clone)]
pub struct Upstream {
    /// The namespace the address is in (`None`: kilnd's own).
    pub netns: Option<Arc<Netns>>,
    /// The listener's address there.
    pub addr: SocketAddr,
}

impl Upstream {
    /// An address in kilnd's own namespace.
    pub fn host(addr: SocketAddr) -> Upstream {
        Upstream { netns: None, addr }
    }

    /// The URI authority the pooled clients use for it.
    pub(crate) fn authority(&self, microvm_id: &str) -> String {
        match self.netns {
            Some(_) => format!("{microvm_id}{NETNS_SUFFIX}:{}", self.addr.port()),
            None => self.addr.to_string(),
        }
    }

    /// Whether `other` is the same listener: same address in the same namespace (a resumed
    /// VM's port is in a new one).
    pub(crate) fn same_as(&self, other: &Upstream) -> bool {
        self.addr == other.addr
            && match (&self.netns, &other.netns) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            }
    }

    /// Opens a connection to it.
    pub async fn connect(&self, timeout: Duration) -> std::io::Result<TcpStream> {
        let connect = async {
            match &self.netns {
                Some(ns) => ns.connect(self.addr).await,
                None => TcpStream::connect(self.addr).await,
            }
        };
        let stream = tokio::time::timeout(timeout, connect).await.map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
        })??;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }
}

/// An HTTP/1.1 connection to a MicroVM's port, kept by the client connection whose request
/// opened it for that client's next request to the same port.
pub(crate) struct KeptUpstream {
    microvm_id: String,
    port: u16,
    upstream: Upstream,
    sender: SendRequest<ProxyBody>,
}

/// A client connection's kept upstream (at most one: an HTTP/1.1 client sends one request
/// at a time, and mostly to one MicroVM port).
#[derive(Default)]
pub(crate) struct KeptSlot(Mutex<Option<KeptUpstream>>);

impl KeptSlot {
    /// The kept connection when it goes to `port` of `microvm_id` at `upstream` and is still
    /// open; any other is closed.
    pub(crate) fn take(
        &self,
        microvm_id: &str,
        port: u16,
        upstream: &Upstream,
    ) -> Option<SendRequest<ProxyBody>> {
        let kept = self.0.lock().unwrap_or_else(|p| p.into_inner()).take()?;
        let same = kept.port == port
            && kept.microvm_id == microvm_id
            && kept.upstream.same_as(upstream)
            && !kept.sender.is_closed();
        same.then_some(kept.sender)
    }

    /// Keeps `sender` for the next request to `port` of `microvm_id`.
    pub(crate) fn keep(
        &self,
        microvm_id: &str,
        port: u16,
        upstream: &Upstream,
        sender: SendRequest<ProxyBody>,
    ) {
        let kept = KeptUpstream {
            microvm_id: microvm_id.to_string(),
            port,
            upstream: upstream.clone(),
            sender,
        };
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(kept);
    }
}

/// The namespaces of MicroVMs the proxy has routed to (the latest one of each: a resumed
/// VM has a new one).
#[derive(Debug, Default)]
pub(crate) struct UpstreamBook(Mutex<HashMap<String, Upstream>>);

impl UpstreamBook {
    pub(crate) fn note(&self, microvm_id: &str, upstream: &Upstream) {
        if upstream.netns.is_some() {
            let mut book = self.0.lock().unwrap_or_else(|e| e.into_inner());
            // Every request notes its route: keep the entry when it is the same one.
            let same = book
                .get(microvm_id)
                .is_some_and(|known| known.same_as(upstream));
            if !same {
                book.insert(microvm_id.to_string(), upstream.clone());
            }
        }
    }

    fn find(&self, microvm_id: &str) -> Option<Upstream> {
        let book = self.0.lock().unwrap_or_else(|e| e.into_inner());
        book.get(microvm_id).cloned()
    }

    pub(crate) fn forget(&self, microvm_id: &str) {
        let mut book = self.0.lock().unwrap_or_else(|e| e.into_inner());
        book.remove(microvm_id);
    }
}

/// The pooled clients' connector: synthetic hosts through the book, others directly.
#[derive(Debug, Clone)]
pub(crate) struct UpstreamConnector {
    pub(crate) book: Arc<UpstreamBook>,
    pub(crate) timeout: Duration,
}

impl tower_service::Service<Uri> for UpstreamConnector {
    type Response = TokioIo<TcpStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let book = self.book.clone();
        let timeout = self.timeout;
        Box::pin(async move {
            let host = uri.host().unwrap_or_default();
            let port = uri.port_u16().unwrap_or(80);
            let upstream = match host.strip_suffix(NETNS_SUFFIX) {
                Some(id) => {
                    let mut u = book.find(id).ok_or_else(|| {
                        std::io::Error::new(std::io::ErrorKind::NotFound, "the MicroVM is gone")
                    })?;
                    u.addr.set_port(port);
                    u
                }
                None => {
                    let ip = host
                        .trim_start_matches('[')
                        .trim_end_matches(']')
                        .parse()
                        .map_err(|_| std::io::Error::other("upstream host is not an address"))?;
                    Upstream::host(SocketAddr::new(ip, port))
                }
            };
            Ok(TokioIo::new(upstream.connect(timeout).await?))
        })
    }
}

//! Where a MicroVM's port is, and the connector that reaches it.
//!
//! A VM's forwards listen inside its own network namespace, where no host process but
//! kilnd can connect. The pooled HTTP clients name such an upstream by a synthetic host
//! (`<microvm-id>.netns.invalid:<port>`); the connector looks the namespace up in the
//! [`UpstreamBook`] and opens the connection inside it.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::Uri;
use hyper_util::rt::TokioIo;
use kiln_vmm::Netns;
use tokio::net::TcpStream;

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

/// The namespaces of MicroVMs the proxy has routed to (the latest one of each: a resumed
/// VM has a new one).
#[derive(Debug, Default)]
pub(crate) struct UpstreamBook(Mutex<HashMap<String, Upstream>>);

impl UpstreamBook {
    pub(crate) fn note(&self, microvm_id: &str, upstream: &Upstream) {
        if upstream.netns.is_some() {
            let mut book = self.0.lock().unwrap_or_else(|e| e.into_inner());
            // Every request notes its route: keep the entry when it is the same one.
            let same = book.get(microvm_id).is_some_and(|known| {
                known.addr == upstream.addr
                    && match (&known.netns, &upstream.netns) {
                        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                        _ => false,
                    }
            });
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

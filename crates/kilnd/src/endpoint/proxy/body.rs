//! Bodies streamed through the proxy frame by frame, counted and, inbound, size-limited.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, SizeHint};

use super::activity::VmActivity;

/// Error type of proxied bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Body type of every request and response the proxy sends.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// A complete small body (plain-text rejections, empty 101s).
pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// The request body passed the configured limit.
#[derive(Debug, thiserror::Error)]
#[error("request body larger than {limit} bytes")]
pub struct BodyTooLarge {
    limit: u64,
}

/// Which way a body flows, for the counters.
#[derive(Clone, Copy)]
pub enum Direction {
    /// Client to app; refreshes `last_inbound`.
    Inbound,
    /// App to client.
    Outbound,
}

/// Passes frames through unchanged, counting data bytes; inbound, it stops at `limit`.
pub struct Metered<B, G = ()> {
    inner: B,
    vm: Arc<VmActivity>,
    direction: Direction,
    limit: u64,
    seen: u64,
    exceeded: Arc<AtomicBool>,
    /// Released when the body is done or dropped (keeps the connection's request in flight).
    _guard: G,
}

impl<B, G> Metered<B, G> {
    /// Wraps `inner`; `exceeded` is raised if more than `limit` bytes flow.
    pub fn new(
        inner: B,
        vm: Arc<VmActivity>,
        direction: Direction,
        limit: u64,
        exceeded: Arc<AtomicBool>,
        guard: G,
    ) -> Self {
        Self {
            inner,
            vm,
            direction,
            limit,
            seen: 0,
            exceeded,
            _guard: guard,
        }
    }
}

impl<B, G> Body for Metered<B, G>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
    G: Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => return Poll::Pending,
        };
        if let Some(data) = frame.data_ref() {
            this.seen = this.seen.saturating_add(data.len() as u64);
            match this.direction {
                Direction::Inbound => {
                    if this.seen > this.limit {
                        this.exceeded.store(true, Ordering::Relaxed);
                        let limit = this.limit;
                        return Poll::Ready(Some(Err(Box::new(BodyTooLarge { limit }))));
                    }
                    this.vm.inbound(data.len());
                }
                Direction::Outbound => this.vm.outbound(data.len()),
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

//! A cap on the large requests the control service reads at once.
//!
//! A Submit carries the whole pipeline and may be up to `max_submit_bytes` (64 MiB);
//! tonic buffers and decodes a unary request's body whole before the handler runs. The
//! operator token is checked first, on the headers (see `server.rs`), so only
//! authenticated callers get this far; but 16 of them sending 60 MiB at once used to cost
//! the coordinator 850 MB. [`LargeRequestLimit`] wraps the control service and lets at
//! most [`LARGE_REQUESTS_AT_ONCE`] Submits be read and handled at a time; the others wait
//! with their bodies unread (HTTP/2 flow control holds them at the client), so the
//! memory they can cost is bounded whatever the number of callers.

use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::Semaphore;
use tonic::codegen::{BoxFuture, Service, http};
use tonic::server::NamedService;

/// How many large requests are read and handled at once.
pub const LARGE_REQUESTS_AT_ONCE: usize = 2;

/// The methods whose one message may be large (streams are written as they arrive).
const LARGE: &[&str] = &["/nexa.v1.ControlService/Submit"];

/// Wraps a service so that at most [`LARGE_REQUESTS_AT_ONCE`] large requests are in it
/// at once.
#[derive(Clone)]
pub struct LargeRequestLimit<S> {
    inner: S,
    permits: Arc<Semaphore>,
}

impl<S> LargeRequestLimit<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            permits: Arc::new(Semaphore::new(LARGE_REQUESTS_AT_ONCE)),
        }
    }
}

impl<S: NamedService> NamedService for LargeRequestLimit<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<B>> for LargeRequestLimit<S>
where
    S: Service<http::Request<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<S::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        // The service that was made ready takes this call; a fresh clone waits for the
        // next (tower's rule for services cloned into a future).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let permits = LARGE
            .contains(&req.uri().path())
            .then(|| self.permits.clone());
        Box::pin(async move {
            // The permit is held until the response is ready: through the body's reading,
            // its decoding and the handler.
            let _permit = match permits {
                Some(p) => p.acquire_owned().await.ok(),
                None => None,
            };
            inner.call(req).await
        })
    }
}

//! A gRPC service that exists before its implementation: the peer listener starts before the
//! node's API is built, and answers `UNAVAILABLE` until [`Late::set`] provides it.

use std::convert::Infallible;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::codegen::http::{Request, Response};
use tonic::codegen::{BoxFuture, Service};
use tonic::server::NamedService;

/// A service whose implementation is provided once, after the server serving it has started.
#[derive(Debug)]
pub struct Late<S>(Arc<OnceLock<S>>);

impl<S> Clone for Late<S> {
    fn clone(&self) -> Self {
        Late(Arc::clone(&self.0))
    }
}

impl<S> Default for Late<S> {
    fn default() -> Self {
        Late(Arc::new(OnceLock::new()))
    }
}

impl<S> Late<S> {
    /// Provides the implementation; later calls are ignored.
    pub fn set(&self, svc: S) {
        let _ = self.0.set(svc);
    }
}

impl<S: NamedService> NamedService for Late<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<Request<Body>> for Late<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        match self.0.get() {
            Some(svc) => {
                let mut svc = svc.clone();
                Box::pin(async move { svc.call(req).await })
            }
            None => {
                Box::pin(async { Ok(tonic::Status::unavailable("node is starting").into_http()) })
            }
        }
    }
}

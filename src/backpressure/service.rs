use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower::BoxError;
use tower_service::Service;

use super::future::{PermitBody, ResponseFuture};
use super::layer::{Config, ReleaseOnBodyEnd, ReleaseOnResponse};
use super::state::{BackpressureHandle, Hot, Permit, Shared};
use crate::classify::{Classify, ErrorsOnly};

/// The service made by [`BackpressureLayer`](super::BackpressureLayer).
///
/// The decision is taken in `call`: admit with a permit, wait for one (in the response
/// future, bounded by `max_wait` and `max_queue`), or shed.
///
/// # Readiness
///
/// A shed never waits on the inner service's readiness (tower's `LoadShed` pattern):
/// `poll_ready` polls the inner service, remembers whether it is ready, and is ready itself
/// at once (only an inner error is passed on). No permit is reserved by it, so a service made
/// ready and never called (an idle keep-alive connection, a clone Axum made for a request that
/// never came) holds no part of the budget. In `call`, a request that finds the budget spent
/// is shed at once (or waits for a permit, with `max_wait`), whatever the inner readiness; an
/// admitted request whose inner service was not ready waits for that readiness in the
/// response future, holding its permit, with the inner service moved there (a clone stays in
/// place). Dropped while it waits, it gives the permit back.
///
/// # Clone
///
/// Clones draw on the same budget. A clone starts with nothing reserved.
pub struct Backpressure<S, R = ReleaseOnResponse, C = ErrorsOnly> {
    inner: S,
    // Whether the inner service's last `poll_ready` was ready (a reservation to consume).
    is_ready: bool,
    // The budget's hot state, read without going through `shared` on the admit path.
    hot: &'static Hot,
    adaptive: bool,
    shared: Arc<Shared>,
    cfg: Config,
    classify: C,
    _release: PhantomData<fn() -> R>,
}

impl<S, R, C> Backpressure<S, R, C> {
    pub(crate) fn from_parts(inner: S, shared: Arc<Shared>, cfg: Config, classify: C) -> Self {
        Backpressure {
            inner,
            is_ready: false,
            hot: shared.hot,
            adaptive: shared.adaptive.is_some(),
            shared,
            cfg,
            classify,
            _release: PhantomData,
        }
    }

    /// A handle on the budget this service draws on.
    pub fn handle(&self) -> BackpressureHandle {
        BackpressureHandle {
            shared: self.shared.clone(),
        }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes this service, returning the inner one.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// Polls the inner service and remembers its readiness; never waits on it, so that a shed
    /// does not wait on the inner readiness.
    #[inline]
    fn poll_inner<Req>(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>>
    where
        S: Service<Req>,
        S::Error: Into<BoxError>,
    {
        self.is_ready = match self.inner.poll_ready(cx) {
            Poll::Ready(Ok(())) => true,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
            Poll::Pending => false,
        };
        Poll::Ready(Ok(()))
    }

    #[inline]
    fn start<Req>(&mut self, req: Req) -> ResponseFuture<S, Req, R, C>
    where
        S: Service<Req> + Clone,
        C: Clone,
    {
        if let Some(in_flight) = self.hot.try_acquire() {
            // The permit exists before the inner call, so a panic in `call` gives it back.
            let permit = if self.adaptive {
                Permit::new(&self.shared, in_flight)
            } else {
                Permit::fixed(self.hot)
            };
            if !self.is_ready {
                return self.readying(req, permit);
            }
            self.is_ready = false;
            return ResponseFuture::running(self.inner.call(req), permit, self.classify.clone());
        }
        // Waiting needs tokio's timer; outside a runtime the request is shed, not panicked on.
        if self.cfg.max_wait.is_zero()
            || tokio::runtime::Handle::try_current().is_err()
            || !self.shared.enter_queue(self.cfg.max_queue)
        {
            let retry_after = self.shared.on_shed(false, self.cfg.retry_after);
            // Dropped as refused (`util::stamp`).
            crate::util::stamp::refuse(req);
            return ResponseFuture::shed(retry_after, self.classify.clone());
        }
        // Wait for a permit in the response future, with the service `poll_ready` polled
        // (ready or not); a fresh clone stays here and is made ready again for the next call.
        let fresh = self.inner.clone();
        let svc = std::mem::replace(&mut self.inner, fresh);
        let ready = std::mem::take(&mut self.is_ready);
        ResponseFuture::waiting(
            svc,
            ready,
            req,
            self.shared.clone(),
            self.cfg,
            self.classify.clone(),
        )
    }

    /// Admitted, but the inner service was not ready: wait for its readiness in the response
    /// future, holding the permit, leaving a clone.
    #[cold]
    #[inline(never)]
    fn readying<Req>(&mut self, req: Req, permit: Permit) -> ResponseFuture<S, Req, R, C>
    where
        S: Service<Req> + Clone,
        C: Clone,
    {
        let fresh = self.inner.clone();
        let svc = std::mem::replace(&mut self.inner, fresh);
        ResponseFuture::readying(svc, req, permit, self.classify.clone())
    }
}

impl<S: Clone, R, C: Clone> Clone for Backpressure<S, R, C> {
    fn clone(&self) -> Self {
        Backpressure {
            inner: self.inner.clone(),
            is_ready: false,
            hot: self.hot,
            adaptive: self.adaptive,
            shared: self.shared.clone(),
            cfg: self.cfg,
            classify: self.classify.clone(),
            _release: PhantomData,
        }
    }
}

impl<S: fmt::Debug, R, C> fmt::Debug for Backpressure<S, R, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Backpressure")
            .field("inner", &self.inner)
            .field("budget", &self.handle())
            .field("max_wait", &self.cfg.max_wait)
            .field("max_queue", &self.cfg.max_queue)
            .finish()
    }
}

impl<S, Req, C> Service<Req> for Backpressure<S, ReleaseOnResponse, C>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    C: Classify<S::Response>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S, Req, ReleaseOnResponse, C>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.poll_inner(cx)
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        self.start(req)
    }
}

impl<S, ReqB, ResB, C> Service<http::Request<ReqB>> for Backpressure<S, ReleaseOnBodyEnd, C>
where
    S: Service<http::Request<ReqB>, Response = http::Response<ResB>> + Clone,
    S::Error: Into<BoxError>,
    ResB: http_body::Body,
    C: Classify<http::Response<ResB>>,
{
    type Response = http::Response<PermitBody<ResB, C>>;
    type Error = BoxError;
    type Future = ResponseFuture<S, http::Request<ReqB>, ReleaseOnBodyEnd, C>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.poll_inner(cx)
    }

    #[inline]
    fn call(&mut self, req: http::Request<ReqB>) -> Self::Future {
        self.start(req)
    }
}

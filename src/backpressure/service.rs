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
/// `poll_ready` is the inner service's readiness and nothing more: no permit is reserved by
/// it, so a service made ready and never called (an idle keep-alive connection, a clone
/// Axum made for a request that never came) holds no part of the budget. The decision is
/// taken in `call`: admit with a permit, wait for one (in the response future, bounded by
/// `max_wait` and `max_queue`), or shed.
///
/// # Clone
///
/// Clones draw on the same budget. A clone starts with nothing reserved.
pub struct Backpressure<S, R = ReleaseOnResponse, C = ErrorsOnly> {
    inner: S,
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

    #[inline]
    fn start<Req>(&mut self, req: Req) -> ResponseFuture<S, Req, R, C>
    where
        S: Service<Req> + Clone,
        C: Clone,
    {
        if let Some(in_flight) = self.hot.try_acquire() {
            // The permit exists before the inner call, so a panic in `call` gives it back.
            let (permit, start) = if self.adaptive {
                Permit::new(&self.shared, in_flight)
            } else {
                (Permit::fixed(self.hot), 0)
            };
            return ResponseFuture::running(
                self.inner.call(req),
                permit,
                start,
                self.classify.clone(),
            );
        }
        // Waiting needs tokio's timer; outside a runtime the request is shed, not panicked on.
        if self.cfg.max_wait.is_zero()
            || tokio::runtime::Handle::try_current().is_err()
            || !self.shared.enter_queue(self.cfg.max_queue)
        {
            self.shared.on_shed(false);
            return ResponseFuture::shed(self.cfg.retry_after, self.classify.clone());
        }
        // Wait for a permit in the response future, with the service made ready by
        // `poll_ready`; a fresh clone stays here and is made ready again for the next call.
        let fresh = self.inner.clone();
        let ready = std::mem::replace(&mut self.inner, fresh);
        ResponseFuture::waiting(
            ready,
            req,
            self.shared.clone(),
            self.cfg,
            self.classify.clone(),
        )
    }
}

impl<S: Clone, R, C: Clone> Clone for Backpressure<S, R, C> {
    fn clone(&self) -> Self {
        Backpressure {
            inner: self.inner.clone(),
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
        self.inner.poll_ready(cx).map_err(Into::into)
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
    type Response = http::Response<PermitBody<ResB>>;
    type Error = BoxError;
    type Future = ResponseFuture<S, http::Request<ReqB>, ReleaseOnBodyEnd, C>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, req: http::Request<ReqB>) -> Self::Future {
        self.start(req)
    }
}

//! The response future and the response body of the backpressure layer.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::sync::futures::Notified;
use tokio::time::Sleep;
use tower::BoxError;

use crate::classify::{Classify, ErrorsOnly, GrpcStatus, HttpStatus};
use crate::util::stamp::HeldReq;
use tower_service::Service;

use super::layer::{Config, ReleaseOnBodyEnd, ReleaseOnResponse};
use super::state::{Outcome, Permit, Shared};
use crate::rejection::Rejection;

pin_project! {
    /// Response future of [`Backpressure`](super::Backpressure).
    ///
    /// It holds the request's permit, or waits for one, or carries the shed rejection.
    ///
    /// # Cancel safety
    ///
    /// Dropped at any point, it gives back what it holds: the permit of a running request (or
    /// of one admitted and waiting for the inner service's readiness), the place of a waiting
    /// one (and a wake-up it was handed passes on to the next waiter).
    #[must_use = "futures do nothing unless you `.await` or poll them"]
    pub struct ResponseFuture<S, Req, R, C = ErrorsOnly>
    where
        S: Service<Req>,
    {
        #[pin]
        state: State<S, Req>,
        // What counts as a failure in an adaptive limit's samples.
        classify: C,
        _release: PhantomData<fn() -> R>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, Req>
    where
        S: Service<Req>,
    {
        Running {
            #[pin]
            fut: S::Future,
            // An adaptive budget's permit holds the admission time.
            permit: Option<Permit>,
        },
        Waiting {
            // Boxed so the admit path's future stays small; only waiters pay for it.
            waiter: Pin<Box<Waiter<S, Req>>>,
        },
        // Admitted, waiting for the inner service's readiness before the call.
        Readying {
            // Boxed for the same reason.
            // The request is dropped as held unless passed on (`util::stamp`).
            call: Box<(S, HeldReq<Req>)>,
            permit: Option<Permit>,
        },
        Shed {
            retry_after: Duration,
        },
        Done,
    }
}

pin_project! {
    struct Waiter<S, Req> {
        #[pin]
        notified: Notified<'static>,
        #[pin]
        sleep: Sleep,
        svc: Option<S>,
        // Whether `svc` was ready when the request was queued.
        ready: bool,
        // Dropped as held unless passed on or refused (`util::stamp`).
        req: HeldReq<Req>,
        retry_after: Duration,
        queued: Queued,
    }
}

/// A place in the queue of waiters, given back on drop.
struct Queued(Arc<Shared>);

impl Drop for Queued {
    fn drop(&mut self) {
        self.0.leave_queue();
    }
}

impl<S, Req> Waiter<S, Req> {
    /// `Some(in_flight)` once a permit is taken, `None` at the deadline.
    fn poll_admit(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<u32>> {
        let mut this = self.project();
        let shared = &this.queued.0;
        // Register for a wake-up before looking at the budget, so a permit given back in
        // between is not missed.
        while this.notified.as_mut().poll(cx).is_ready() {
            this.notified.set(shared.hot.notify.notified());
        }
        if let Some(in_flight) = shared.hot.try_acquire() {
            return Poll::Ready(Some(in_flight));
        }
        if this.sleep.poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        Poll::Pending
    }
}

impl<S, Req, R, C> ResponseFuture<S, Req, R, C>
where
    S: Service<Req>,
{
    #[inline]
    pub(crate) fn running(fut: S::Future, permit: Permit, classify: C) -> Self {
        ResponseFuture {
            state: State::Running {
                fut,
                permit: Some(permit),
            },
            classify,
            _release: PhantomData,
        }
    }

    #[inline]
    pub(crate) fn shed(retry_after: Duration, classify: C) -> Self {
        ResponseFuture {
            state: State::Shed { retry_after },
            classify,
            _release: PhantomData,
        }
    }

    /// Admitted while the inner service is not ready: waits for its readiness, then calls it.
    pub(crate) fn readying(svc: S, req: Req, permit: Permit, classify: C) -> Self {
        ResponseFuture {
            state: State::Readying {
                call: Box::new((svc, HeldReq::new(req))),
                permit: Some(permit),
            },
            classify,
            _release: PhantomData,
        }
    }

    /// A waiter: already counted in the budget's queue. `ready`: whether `svc` is ready.
    pub(crate) fn waiting(
        svc: S,
        ready: bool,
        req: Req,
        shared: Arc<Shared>,
        cfg: Config,
        classify: C,
    ) -> Self {
        let now = tokio::time::Instant::now();
        let deadline = now
            .checked_add(cfg.max_wait)
            .unwrap_or_else(|| now + Duration::from_secs(60 * 60 * 24 * 365 * 30));
        let notified = shared.hot.notify.notified();
        ResponseFuture {
            state: State::Waiting {
                waiter: Box::pin(Waiter {
                    notified,
                    sleep: tokio::time::sleep_until(deadline),
                    svc: Some(svc),
                    ready,
                    req: HeldReq::new(req),
                    retry_after: cfg.retry_after,
                    queued: Queued(shared),
                }),
            },
            classify,
            _release: PhantomData,
        }
    }

    /// Drives the request to its response, and hands the response and its permit to `done`.
    #[inline]
    fn poll_with<T>(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        done: impl FnOnce(S::Response, Permit, &C) -> T,
    ) -> Poll<Result<T, BoxError>>
    where
        S::Error: Into<BoxError>,
    {
        let this = self.project();
        let classify = &*this.classify;
        let mut state = this.state;
        loop {
            match state.as_mut().project() {
                StateProj::Running { fut, permit } => {
                    let out = ready!(fut.poll(cx));
                    // The inner future is left in place, done: polling again is a caller's
                    // bug that the permit being gone reports.
                    let permit = permit.take().expect("polled after completion");
                    return Poll::Ready(match out {
                        Ok(res) => Ok(done(res, permit, classify)),
                        Err(e) => {
                            permit.finish(Outcome::Failure);
                            Err(e.into())
                        }
                    });
                }
                StateProj::Waiting { waiter } => match ready!(waiter.as_mut().poll_admit(cx)) {
                    Some(in_flight) => {
                        let w = waiter.as_mut().project();
                        let permit = Permit::new(&w.queued.0, in_flight);
                        let mut svc = w.svc.take().expect("admitted once");
                        let req = w.req.take().expect("admitted once");
                        if *w.ready {
                            // `svc` was made ready by `poll_ready` before the call that
                            // queued it.
                            let fut = svc.call(req);
                            state.set(State::Running {
                                fut,
                                permit: Some(permit),
                            });
                        } else {
                            state.set(State::Readying {
                                call: Box::new((svc, HeldReq::new(req))),
                                permit: Some(permit),
                            });
                        }
                    }
                    None => {
                        let base = *waiter.as_mut().project().retry_after;
                        let retry_after = waiter.as_ref().get_ref().queued.0.on_shed(true, base);
                        waiter.as_mut().project().req.refuse();
                        state.set(State::Done);
                        return Poll::Ready(Err(Rejection::overloaded(Some(retry_after))
                            .with_detail("waited too long for a permit")
                            .into()));
                    }
                },
                StateProj::Readying { call, permit } => {
                    let (svc, req) = &mut **call;
                    if let Err(e) = ready!(svc.poll_ready(cx)) {
                        // A failure of the service below, for an adaptive limit's samples.
                        if let Some(permit) = permit.take() {
                            permit.finish(Outcome::Failure);
                        }
                        state.set(State::Done);
                        return Poll::Ready(Err(e.into()));
                    }
                    let req = req.take().expect("polled after completion");
                    let fut = svc.call(req);
                    let permit = permit.take();
                    state.set(State::Running { fut, permit });
                }
                StateProj::Shed { retry_after } => {
                    let retry_after = *retry_after;
                    state.set(State::Done);
                    return Poll::Ready(Err(Rejection::overloaded(Some(retry_after))
                        .with_detail("too many requests in flight")
                        .into()));
                }
                StateProj::Done => panic!("polled after completion"),
            }
        }
    }
}

impl<S, Req, C> Future for ResponseFuture<S, Req, ReleaseOnResponse, C>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    C: Classify<S::Response>,
{
    type Output = Result<S::Response, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // The permit is dropped, given back, here.
        self.poll_with(cx, |res, permit, classify| {
            // Only an adaptive limit takes a sample, so only it asks the classifier.
            let outcome = if permit.is_adaptive() && classify.classify_response(&res).is_failure() {
                Outcome::Failure
            } else {
                Outcome::Success
            };
            permit.finish(outcome);
            res
        })
    }
}

impl<S, ReqB, ResB, C> Future for ResponseFuture<S, http::Request<ReqB>, ReleaseOnBodyEnd, C>
where
    S: Service<http::Request<ReqB>, Response = http::Response<ResB>>,
    S::Error: Into<BoxError>,
    ResB: Body,
    C: Classify<http::Response<ResB>>,
{
    type Output = Result<http::Response<PermitBody<ResB, C>>, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.poll_with(cx, |res, mut permit, classify| {
            // Only an adaptive limit takes a sample, so only it classifies: a failure of the
            // dependency as `classify` sees it is a 5xx, or a failing gRPC status in the
            // headers (trailers-only responses), or what the layer's classifier calls one.
            let adaptive = permit.is_adaptive();
            let failed = adaptive
                && (HttpStatus::default()
                    .classify_status(res.status())
                    .is_failure()
                    || GrpcStatus::default()
                        .classify_trailers(res.headers())
                        .is_failure()
                    || classify.classify_response(&res).is_failure());
            let outcome = if failed {
                Outcome::Failure
            } else {
                Outcome::Success
            };
            // A body that is already at its end may never be polled (hyper drops it unread):
            // finish the sample and give the permit back now.
            let (permit, classify) = if res.body().is_end_stream() {
                permit.finish(outcome);
                (None, None)
            } else {
                // The sample's latency is the dependency's, to this head; the permit is held
                // until the body ends. An adaptive sample also reads the trailers, as
                // `classify` sees them.
                permit.head_ready(outcome);
                let classify = adaptive.then(|| classify.clone());
                (Some(permit), classify)
            };
            res.map(|body| PermitBody {
                inner: body,
                permit,
                classify,
            })
        })
    }
}

impl<S, Req, R, C> fmt::Debug for ResponseFuture<S, Req, R, C>
where
    S: Service<Req>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Running { .. } => "running",
            State::Waiting { .. } => "waiting",
            State::Readying { .. } => "readying",
            State::Shed { .. } => "shed",
            State::Done => "done",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}

pin_project! {
    /// A response body that holds its request's permit until the body has been streamed to
    /// its end, has failed, or is dropped.
    ///
    /// Made by [`BackpressureLayer::hold_until_body_end`](super::BackpressureLayer::hold_until_body_end).
    /// For an adaptive limit, the request's sample is its response head's (the latency to the
    /// head, the head's outcome), taken when the body ends or is dropped; trailers whose
    /// `grpc-status` is a failure, or that the layer's classifier `C` calls one
    /// ([`Classify::classify_body_trailers`]), and a body error make it a failure. A body
    /// dropped before its end (the client stopped reading: it closed a stream, or went away)
    /// keeps the head's outcome.
    pub struct PermitBody<B, C = ErrorsOnly> {
        #[pin]
        inner: B,
        permit: Option<Permit>,
        // The layer's classifier, for the trailers (an adaptive limit's permit only).
        classify: Option<C>,
    }
}

impl<B, C> PermitBody<B, C> {
    /// Whether the body still holds its permit.
    pub fn holds_permit(&self) -> bool {
        self.permit.is_some()
    }

    /// The body inside.
    pub fn get_ref(&self) -> &B {
        &self.inner
    }
}

impl<B: Body, C: Classify<http::Response<B>>> Body for PermitBody<B, C> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        let frame = ready!(this.inner.as_mut().poll_frame(cx));
        if let (Some(classify), Some(Ok(frame)), Some(permit)) =
            (this.classify.as_ref(), &frame, this.permit.as_mut())
        {
            if let Some(trailers) = frame.trailers_ref() {
                // A gRPC call that sent a message ends with its status in the trailers.
                if GrpcStatus::default()
                    .classify_trailers(trailers)
                    .is_failure()
                    || classify.classify_body_trailers(trailers).is_failure()
                {
                    permit.fail();
                }
            }
        }
        let failed = match &frame {
            None => false,
            Some(Err(_)) => true,
            // A body that knows it has ended may never be polled again: release now.
            Some(Ok(_)) if this.inner.is_end_stream() => false,
            Some(Ok(_)) => return Poll::Ready(frame),
        };
        if let Some(permit) = this.permit.take() {
            let outcome = if failed {
                Outcome::Failure
            } else {
                permit.outcome()
            };
            permit.finish(outcome);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B, C> fmt::Debug for PermitBody<B, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PermitBody")
            .field("holds_permit", &self.permit.is_some())
            .finish_non_exhaustive()
    }
}

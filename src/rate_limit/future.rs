//! The response future of the rate limiter.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower::BoxError;
use tower_service::Service;

use super::layer::{Reserved, Shared};
use super::ResponseHeaders;
use crate::rejection::Rejection;
use crate::util::stamp::HeldReq;

pin_project! {
    /// Response future of [`RateLimit`](super::RateLimit).
    ///
    /// # Cancel safety
    ///
    /// Dropping it while it waits for a reserved turn gives the turn back, whatever the order
    /// in which waiters go away (see [`RateLimitLayer::wait_up_to`](super::RateLimitLayer::wait_up_to)
    /// for what that may cost). Dropping it while it waits for the inner service's readiness
    /// gives the turn back unless a later turn was reserved meanwhile (its turn has come: giving
    /// it back then would let one request too many through). Nothing else is held.
    #[must_use = "futures do nothing unless polled"]
    pub struct ResponseFuture<S, Req, H>
    where
        S: Service<Req>,
        H: ResponseHeaders<S::Response>,
    {
        #[pin]
        state: State<S, Req>,
        slot: H::Slot,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, Req>
    where
        S: Service<Req>,
    {
        Called { #[pin] fut: S::Future },
        // Boxed so that the admit path's future stays small; only waiters pay for it.
        Waiting { waiter: Pin<Box<Waiter<S, Req>>> },
        Rejected { err: Option<BoxError> },
    }
}

pin_project! {
    struct Waiter<S, Req> {
        // The wait for a reserved turn; none when the turn is now and only the inner
        // readiness is awaited.
        #[pin]
        sleep: Option<Sleep>,
        svc: Option<S>,
        // Dropped as held unless passed on (`util::stamp`).
        req: HeldReq<Req>,
        refund: Refund,
    }
}

/// A reserved turn that was not used: given back when the waiter is dropped before its turn
/// (see `gcra::refunded` for when, and what it may cost).
pub(crate) struct Refund {
    pub(crate) shared: Option<Arc<Shared>>,
    pub(crate) hash: Option<u64>,
    pub(crate) new_tat: u64,
    pub(crate) interval: u64,
    /// When the reserved turn comes.
    pub(crate) wake: u64,
    /// When and under what the turn was reserved (see `Shared::refund_turn`).
    pub(crate) reserved: Reserved,
}

impl Drop for Refund {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.take() {
            shared.refund_turn(
                self.hash,
                self.new_tat,
                self.interval,
                self.wake,
                Some(&self.reserved),
            );
        }
    }
}

impl<S: Service<Req>, Req, H: ResponseHeaders<S::Response>> ResponseFuture<S, Req, H> {
    #[inline]
    pub(crate) fn called(fut: S::Future, slot: H::Slot) -> Self {
        ResponseFuture {
            state: State::Called { fut },
            slot,
        }
    }

    pub(crate) fn waiting(
        wait: Option<Duration>,
        svc: S,
        req: Req,
        slot: H::Slot,
        refund: Refund,
    ) -> Self {
        ResponseFuture {
            state: State::Waiting {
                waiter: Box::pin(Waiter {
                    sleep: wait.map(tokio::time::sleep),
                    svc: Some(svc),
                    req: HeldReq::new(req),
                    refund,
                }),
            },
            slot,
        }
    }

    pub(crate) fn rejected(rejection: Rejection) -> Self {
        ResponseFuture {
            state: State::Rejected {
                err: Some(Box::new(rejection)),
            },
            slot: H::Slot::default(),
        }
    }
}

impl<S: Service<Req>, Req, H: ResponseHeaders<S::Response>> fmt::Debug
    for ResponseFuture<S, Req, H>
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Called { .. } => "called",
            State::Waiting { .. } => "waiting",
            State::Rejected { .. } => "rejected",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}

impl<S, Req, H> Future for ResponseFuture<S, Req, H>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    H: ResponseHeaders<S::Response>,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let this = self.as_mut().project();
            match this.state.project() {
                StateProj::Called { fut } => {
                    let mut res = ready!(fut.poll(cx)).map_err(Into::into)?;
                    H::apply(&mut res, this.slot);
                    return Poll::Ready(Ok(res));
                }
                StateProj::Waiting { waiter } => {
                    let mut w = waiter.as_mut().project();
                    if let Some(sleep) = w.sleep.as_mut().as_pin_mut() {
                        ready!(sleep.poll(cx));
                        w.sleep.set(None);
                    }
                    let s = w.svc.as_mut().expect("polled after completion");
                    ready!(s.poll_ready(cx)).map_err(Into::into)?;
                    // The turn is used now, whatever happens next.
                    w.refund.shared = None;
                    let req = w.req.take().expect("polled after completion");
                    let fut = s.call(req);
                    self.as_mut().project().state.set(State::Called { fut });
                }
                StateProj::Rejected { err } => {
                    return Poll::Ready(Err(err.take().expect("polled after completion")));
                }
            }
        }
    }
}

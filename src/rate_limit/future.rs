//! The response future of the rate limiter.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower::BoxError;
use tower_service::Service;

use super::ResponseHeaders;
use crate::rejection::{RateLimitInfo, Rejection};

pin_project! {
    /// Response future of [`RateLimit`](super::RateLimit).
    ///
    /// # Cancel safety
    ///
    /// Dropping it while it waits for a reserved turn gives nothing back: the turn stays
    /// spent, as a request that was sent would. Nothing else is held.
    #[must_use = "futures do nothing unless polled"]
    pub struct ResponseFuture<S, Req, H>
    where
        S: Service<Req>,
    {
        #[pin]
        state: State<S, Req>,
        headers: H,
        info: Option<RateLimitInfo>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, Req>
    where
        S: Service<Req>,
    {
        Called { #[pin] fut: S::Future },
        Waiting { sleep: Pin<Box<Sleep>>, svc: Option<S>, req: Option<Req> },
        Rejected { rejection: Option<Rejection> },
    }
}

impl<S: Service<Req>, Req, H> ResponseFuture<S, Req, H> {
    pub(crate) fn called(fut: S::Future, headers: H, info: Option<RateLimitInfo>) -> Self {
        ResponseFuture {
            state: State::Called { fut },
            headers,
            info,
        }
    }

    pub(crate) fn waiting(
        wait: Duration,
        svc: S,
        req: Req,
        headers: H,
        info: Option<RateLimitInfo>,
    ) -> Self {
        ResponseFuture {
            state: State::Waiting {
                sleep: Box::pin(tokio::time::sleep(wait)),
                svc: Some(svc),
                req: Some(req),
            },
            headers,
            info,
        }
    }

    pub(crate) fn rejected(rejection: Rejection) -> Self
    where
        H: Default,
    {
        ResponseFuture {
            state: State::Rejected {
                rejection: Some(rejection),
            },
            headers: H::default(),
            info: None,
        }
    }
}

impl<S: Service<Req>, Req, H> fmt::Debug for ResponseFuture<S, Req, H> {
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
                    if let Some(info) = this.info {
                        H::apply(&mut res, info);
                    }
                    return Poll::Ready(Ok(res));
                }
                StateProj::Waiting { sleep, svc, req } => {
                    ready!(sleep.as_mut().poll(cx));
                    let s = svc.as_mut().expect("polled after completion");
                    ready!(s.poll_ready(cx)).map_err(Into::into)?;
                    let req = req.take().expect("polled after completion");
                    let fut = s.call(req);
                    self.as_mut().project().state.set(State::Called { fut });
                }
                StateProj::Rejected { rejection } => {
                    let r = rejection.take().expect("polled after completion");
                    return Poll::Ready(Err(r.into()));
                }
            }
        }
    }
}

//! The response future of the Redis-backed rate limiter.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower::BoxError;
use tower_service::Service;

use super::redis::{Admitted, RedisShared, Turn};
use crate::rate_limit::ResponseHeaders;
use crate::rejection::RateLimitInfo;
use crate::util::stamp::HeldReq;

/// What a check returns: the script's reply, a Redis error, or no answer ([`NoAnswer`]).
pub(crate) type CheckOutput = Result<Result<(i64, i64, i64, Vec<u8>), redis::RedisError>, NoAnswer>;

/// Why a check has no answer from Redis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum NoAnswer {
    /// Sent, and not answered within the timeout.
    TimedOut,
    /// Not sent: a recent check failed, and the cool-down is on (or another check is the
    /// probe).
    Skipped,
}

impl fmt::Display for NoAnswer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NoAnswer::TimedOut => "redis did not answer within the timeout",
            NoAnswer::Skipped => "not sent: redis failed a recent check (cool-down)",
        })
    }
}

/// One check in flight. The Redis client boxes each command's future itself; this box holds
/// it with its connection handle and timeout, so the check is one allocation of ours.
pub(crate) type CheckFuture = Pin<Box<dyn Future<Output = CheckOutput> + Send>>;

pin_project! {
    /// Response future of [`RedisRateLimit`](super::RedisRateLimit).
    ///
    /// # Cancel safety
    ///
    /// Dropping it while the check is in flight drops the check (the multiplexed connection
    /// discards the reply) and the inner service it held ready, which gives back whatever
    /// that service reserved in `poll_ready` (a concurrency permit, say). If Redis had
    /// already run the script, the token stays spent, as it would for a request that was
    /// sent. Dropping it while it waits for a reserved turn (`wait_up_to`) also gives the
    /// turn back, unless a later turn was reserved meanwhile (then it stays spent: giving it
    /// back would hand that later turn's slot out twice); in Redis this is one more script,
    /// sent from a spawned task.
    #[must_use = "futures do nothing unless polled"]
    pub struct RedisResponseFuture<S, Req, H>
    where
        S: Service<Req>,
    {
        #[pin]
        state: State<S, Req>,
        shared: Arc<RedisShared>,
        local_hash: u64,
        // The Redis key and the check's interval, kept by layers whose clients wait for
        // reserved turns.
        kept: Option<Kept>,
        info: Option<RateLimitInfo>,
        // Whether the inner service was ready at `call`.
        ready: bool,
        _headers: PhantomData<fn() -> H>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, Req>
    where
        S: Service<Req>,
    {
        // `check` is `None` for a check skipped during the cool-down: nothing to wait for.
        // The request is dropped as held unless passed on or refused (`util::stamp`).
        Checking { check: Option<CheckFuture>, svc: Option<S>, req: HeldReq<Req> },
        Waiting { sleep: Pin<Box<Sleep>>, svc: Option<S>, req: HeldReq<Req>, refund: Refund },
        // Admitted, waiting for the inner service's readiness before the call.
        Readying { svc: Option<S>, req: HeldReq<Req> },
        Called { #[pin] fut: S::Future },
        Refused { err: Option<BoxError> },
        Done,
    }
}

/// What a waiting layer keeps of a check: the Redis key and the interval sent.
pub(crate) type Kept = (Vec<u8>, u64);

/// A turn reserved ahead and not yet used: given back when dropped armed.
pub(crate) struct Refund {
    armed: Option<(Arc<RedisShared>, Kept, Turn)>,
}

impl Drop for Refund {
    fn drop(&mut self) {
        if let Some((shared, (key, interval), turn)) = self.armed.take() {
            shared.refund(key, interval, turn);
        }
    }
}

impl<S: Service<Req>, Req, H> RedisResponseFuture<S, Req, H> {
    pub(crate) fn new(
        check: Option<CheckFuture>,
        svc: S,
        ready: bool,
        req: Req,
        shared: Arc<RedisShared>,
        local_hash: u64,
        kept: Option<Kept>,
    ) -> Self {
        RedisResponseFuture {
            state: State::Checking {
                check,
                svc: Some(svc),
                req: HeldReq::new(req),
            },
            shared,
            local_hash,
            kept,
            info: None,
            ready,
            _headers: PhantomData,
        }
    }
}

impl<S: Service<Req>, Req, H> RedisResponseFuture<S, Req, H> {
    /// Refused before any check.
    pub(crate) fn refused(rejection: crate::Rejection, shared: Arc<RedisShared>) -> Self {
        RedisResponseFuture {
            state: State::Refused {
                err: Some(Box::new(rejection)),
            },
            shared,
            local_hash: 0,
            kept: None,
            info: None,
            ready: false,
            _headers: PhantomData,
        }
    }
}

impl<S: Service<Req>, Req, H> fmt::Debug for RedisResponseFuture<S, Req, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Checking { .. } => "checking",
            State::Waiting { .. } => "waiting",
            State::Readying { .. } => "readying",
            State::Called { .. } => "called",
            State::Refused { .. } => "refused",
            State::Done => "done",
        };
        f.debug_struct("RedisResponseFuture")
            .field("state", &state)
            .finish()
    }
}

impl<S, Req, H> Future for RedisResponseFuture<S, Req, H>
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
                StateProj::Checking { check, svc, req } => {
                    let out = match check {
                        Some(check) => ready!(check.as_mut().poll(cx)),
                        None => Err(NoAnswer::Skipped),
                    };
                    match this.shared.decide(out, *this.local_hash, H::ENABLED) {
                        Ok(Admitted {
                            info,
                            wait_ns,
                            turn,
                        }) => {
                            *this.info = info;
                            let s = svc.take().expect("polled after completion");
                            let r = req.take().expect("polled after completion");
                            if wait_ns > 0 {
                                // A reserved turn (`wait_up_to`): wait for it, holding the
                                // ready service.
                                tracing::trace!(
                                    wait_ns,
                                    "redis rate limit: waiting for a reserved turn"
                                );
                                let sleep =
                                    Box::pin(tokio::time::sleep(Duration::from_nanos(wait_ns)));
                                let refund = Refund {
                                    armed: turn.map(|turn| {
                                        (
                                            this.shared.clone(),
                                            this.kept.take().unwrap_or_default(),
                                            turn,
                                        )
                                    }),
                                };
                                self.as_mut().project().state.set(State::Waiting {
                                    sleep,
                                    svc: Some(s),
                                    req: HeldReq::new(r),
                                    refund,
                                });
                            } else if *this.ready {
                                // The service was made ready by `poll_ready` before `call`.
                                let mut s = s;
                                let fut = s.call(r);
                                self.as_mut().project().state.set(State::Called { fut });
                            } else {
                                self.as_mut().project().state.set(State::Readying {
                                    svc: Some(s),
                                    req: HeldReq::new(r),
                                });
                            }
                        }
                        Err(rejection) => {
                            req.refuse();
                            self.as_mut().project().state.set(State::Done);
                            return Poll::Ready(Err(rejection.into()));
                        }
                    }
                }
                StateProj::Waiting {
                    sleep,
                    svc,
                    req,
                    refund,
                } => {
                    ready!(sleep.as_mut().poll(cx));
                    // The turn has come: it is used, whatever happens next.
                    refund.armed = None;
                    let mut s = svc.take().expect("polled after completion");
                    let r = req.take().expect("polled after completion");
                    if *this.ready {
                        let fut = s.call(r);
                        self.as_mut().project().state.set(State::Called { fut });
                    } else {
                        self.as_mut().project().state.set(State::Readying {
                            svc: Some(s),
                            req: HeldReq::new(r),
                        });
                    }
                }
                StateProj::Readying { svc, req } => {
                    let s = svc.as_mut().expect("polled after completion");
                    if let Err(e) = ready!(s.poll_ready(cx)) {
                        self.as_mut().project().state.set(State::Done);
                        return Poll::Ready(Err(e.into()));
                    }
                    let r = req.take().expect("polled after completion");
                    let fut = s.call(r);
                    self.as_mut().project().state.set(State::Called { fut });
                }
                StateProj::Called { fut } => {
                    let mut res = ready!(fut.poll(cx)).map_err(Into::into)?;
                    if let Some(info) = this.info {
                        H::apply(&mut res, &H::keep(*info));
                    }
                    return Poll::Ready(Ok(res));
                }
                StateProj::Refused { err } => {
                    return Poll::Ready(Err(err.take().expect("polled after completion")));
                }
                StateProj::Done => panic!("polled after completion"),
            }
        }
    }
}

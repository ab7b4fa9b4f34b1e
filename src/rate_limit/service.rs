use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tower::BoxError;
use tower_service::Service;

use super::future::{Refund, ResponseFuture};
use super::gcra::Step;
use super::layer::{Reserved, Shared};
use super::{Global, KeyFn, MissingKey, NoHeaders, ResponseHeaders};
use crate::rejection::{Rejection, RejectionKind};

/// Applies a rate limit to requests; made by [`RateLimitLayer`](super::RateLimitLayer).
///
/// The limit is checked in `call`, which reads the clock once and does one compare-and-swap.
/// A request over the limit gets a [`Rejection`](crate::Rejection) of kind `RateLimited` (or
/// waits its turn, with [`wait_up_to`](super::RateLimitLayer::wait_up_to)).
///
/// # Readiness
///
/// A refusal never waits on the inner service's readiness (tower's `LoadShed` pattern):
/// `poll_ready` polls the inner service, remembers whether it is ready, and is ready itself
/// at once (only an inner error is passed on). In `call`, a request over the limit is refused
/// at once, whatever the inner readiness; an admitted request is called at once when the inner
/// service was ready, and otherwise waits for its readiness in the response future, with the
/// inner service moved there (a clone stays in place). Such a request that is dropped before
/// the inner service is ready gives its turn back, as a waiter does.
///
/// # Clone
///
/// Clones share the limit. A clone starts unreserved, as the tower contract asks.
pub struct RateLimit<S, K = Global, H = NoHeaders> {
    pub(crate) inner: S,
    // Whether the inner service's last `poll_ready` was ready (a reservation to consume).
    pub(crate) is_ready: bool,
    pub(crate) shared: Arc<Shared>,
    pub(crate) key: K,
    pub(crate) max_wait_ns: u64,
    pub(crate) headers: H,
}

impl<S: Clone, K: Clone, H: Clone> Clone for RateLimit<S, K, H> {
    fn clone(&self) -> Self {
        RateLimit {
            inner: self.inner.clone(),
            is_ready: false,
            shared: self.shared.clone(),
            key: self.key.clone(),
            max_wait_ns: self.max_wait_ns,
            headers: self.headers.clone(),
        }
    }
}

impl<S: fmt::Debug, K, H> fmt::Debug for RateLimit<S, K, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimit")
            .field("inner", &self.inner)
            .field("keyed", &self.shared.table.is_some())
            .field("max_wait", &Duration::from_nanos(self.max_wait_ns))
            .finish_non_exhaustive()
    }
}

impl<S, Req, K, H> Service<Req> for RateLimit<S, K, H>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    K: KeyFn<Req>,
    H: ResponseHeaders<S::Response>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S, Req, H>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Never wait here: a refusal must not wait on the inner readiness.
        self.is_ready = match self.inner.poll_ready(cx) {
            Poll::Ready(Ok(())) => true,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
            Poll::Pending => false,
        };
        Poll::Ready(Ok(()))
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        let shared = &*self.shared;
        let now = shared.clock.now_nanos();
        let (step, tat, now, hash, gen) = match &shared.table {
            None => {
                let (step, tat, now) = shared.check_global(now, self.max_wait_ns);
                (step, tat, now, None, None)
            }
            Some(table) => {
                let Some(key) = self.key.key(&req) else {
                    let malformed = self.key.key_is_malformed(&req);
                    let server_fault = self.key.missing_key_is_server_fault();
                    return self.key_missing(req, server_fault, malformed);
                };
                let (interval, tolerance) = shared.params();
                let hash = table.hash(&key);
                let c = table.check(
                    hash,
                    now,
                    &shared.clock,
                    interval,
                    tolerance,
                    self.max_wait_ns,
                    shared.span(),
                );
                (c.step, c.tat, c.now, Some(hash), Some(c.gen))
            }
        };
        match step {
            Step::Admit { wait_ns: 0, .. } if self.is_ready => {
                self.is_ready = false;
                let slot = if H::ENABLED {
                    H::keep(shared.info(tat, now))
                } else {
                    H::Slot::default()
                };
                ResponseFuture::called(self.inner.call(req), slot)
            }
            Step::Admit { wait_ns, .. } => self.wait_for_turn(req, wait_ns, tat, now, hash, gen),
            Step::Reject { retry_after_ns } => {
                // Dropped as refused: the marks of a layer above say the request never ran.
                crate::util::stamp::refuse(req);
                self.reject(retry_after_ns, tat, now)
            }
        }
    }
}

impl<S, K, H> RateLimit<S, K, H> {
    /// A turn reserved ahead, or an admitted request whose inner service is not ready yet:
    /// wait for the turn and the readiness in the response future, with the service that
    /// `poll_ready` polled, leaving a clone.
    #[cold]
    #[inline(never)]
    fn wait_for_turn<Req>(
        &mut self,
        req: Req,
        wait_ns: u64,
        tat: u64,
        now: u64,
        hash: Option<u64>,
        gen: Option<u64>,
    ) -> ResponseFuture<S, Req, H>
    where
        S: Service<Req> + Clone,
        H: ResponseHeaders<S::Response>,
    {
        let shared = &*self.shared;
        let clone = self.inner.clone();
        let ready = std::mem::replace(&mut self.inner, clone);
        self.is_ready = false;
        let slot = if H::ENABLED {
            H::keep(shared.info(tat, now))
        } else {
            H::Slot::default()
        };
        tracing::trace!(
            wait_ns,
            "rate limit: waiting for a reserved turn or readiness"
        );
        let refund = Refund {
            shared: Some(self.shared.clone()),
            hash,
            new_tat: tat,
            interval: shared.params().0,
            wake: now.saturating_add(wait_ns),
            reserved: Reserved {
                at: now,
                epoch: shared
                    .quota_epoch
                    .load(std::sync::atomic::Ordering::Acquire),
                gen,
            },
        };
        let wait = (wait_ns > 0).then(|| Duration::from_nanos(wait_ns));
        ResponseFuture::waiting(wait, ready, req, slot, refund)
    }

    /// No key: never one shared limit; refused or admitted as the layer's policy says.
    #[cold]
    #[inline(never)]
    fn key_missing<Req>(
        &mut self,
        req: Req,
        server_fault: bool,
        malformed: bool,
    ) -> ResponseFuture<S, Req, H>
    where
        S: Service<Req> + Clone,
        H: ResponseHeaders<S::Response>,
    {
        self.shared.count_missing_key();
        if malformed {
            crate::util::stamp::refuse(req);
            return ResponseFuture::rejected(
                Rejection::new(RejectionKind::RateLimitKeyMissing).with_detail(
                    "the rate limit key is malformed (sent more than once, or not visible ASCII)",
                ),
            );
        }
        match self.shared.missing {
            MissingKey::Admit if self.is_ready => {
                self.is_ready = false;
                ResponseFuture::called(self.inner.call(req), H::Slot::default())
            }
            MissingKey::Admit => {
                let clone = self.inner.clone();
                let svc = std::mem::replace(&mut self.inner, clone);
                let refund = Refund {
                    shared: None,
                    hash: None,
                    new_tat: 0,
                    interval: 0,
                    wake: 0,
                    reserved: Reserved {
                        at: 0,
                        epoch: 0,
                        gen: None,
                    },
                };
                ResponseFuture::waiting(None, svc, req, H::Slot::default(), refund)
            }
            _ => {
                crate::util::stamp::refuse(req);
                ResponseFuture::rejected(if server_fault {
                    Rejection::new(RejectionKind::ClientAddressUnknown)
                        .with_detail("the client's address could not be found")
                } else {
                    Rejection::new(RejectionKind::RateLimitKeyMissing)
                        .with_detail("the rate limit key could not be read from the request")
                })
            }
        }
    }

    /// Over the limit: a rejection with the time to the next token, jittered (see
    /// `layer::refusal`). The `RateLimit` figures' reset is never shorter than the hints, so
    /// that its `t=` never tells a client to come back before `Retry-After` does.
    #[cold]
    #[inline(never)]
    fn reject<Req>(&self, retry_after_ns: u64, tat: u64, now: u64) -> ResponseFuture<S, Req, H>
    where
        S: Service<Req>,
        H: ResponseHeaders<S::Response>,
    {
        let shared = &*self.shared;
        shared.count_rejection();
        let rejection = shared.refusal(retry_after_ns, shared.info(tat, now));
        tracing::trace!(
            retry_after_ns,
            hint = ?rejection.retry_after(),
            "rate limit: request rejected"
        );
        ResponseFuture::rejected(rejection)
    }
}

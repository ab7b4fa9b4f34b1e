//! The service made by [`RetryLayer`](super::RetryLayer).

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower::BoxError;
use tower_service::Service;

use crate::classify::{Classify, ErrorsOnly};

use super::budget::shard;
use super::future::{ResponseFuture, Retrying};
use super::layer::Anchors;
use super::policy::{CloneRequest, Hints, Replay};

/// Retries requests to `S`; made by [`RetryLayer`](super::RetryLayer).
///
/// The first attempt goes to the service made ready by `poll_ready`. Retries go to clones of
/// one clone of it, kept from the first request that may be retried: a request that succeeds
/// at once costs no clone of the inner service (for a hyper or tonic client, several
/// reference counts). Changes made through [`get_mut`](Self::get_mut) after that are not seen
/// by retries.
///
/// # Clone
///
/// Clones share the layer's state (budget, figures, settings) and the kept clone, and start
/// unreserved: a clone must be polled ready before it is called, as tower requires.
pub struct Retry<S, C = ErrorsOnly, R = CloneRequest> {
    inner: S,
    anchors: Arc<Anchors<S, C, R>>,
}

impl<S, C, R> Retry<S, C, R> {
    pub(crate) fn new(inner: S, anchors: Arc<Anchors<S, C, R>>) -> Self {
        Retry { inner, anchors }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone, C, R> Clone for Retry<S, C, R> {
    fn clone(&self) -> Self {
        Retry {
            inner: self.inner.clone(),
            anchors: self.anchors.clone(),
        }
    }
}

impl<S: fmt::Debug, C, R> fmt::Debug for Retry<S, C, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Retry")
            .field("inner", &self.inner)
            .field("control", &self.anchors.shared().control)
            .finish()
    }
}

impl<S, Req, C, R> Service<Req> for Retry<S, C, R>
where
    R: Replay<Req> + Hints<S::Response>,
    S: Service<R::Request> + Clone,
    S::Error: Into<BoxError>,
    C: Classify<S::Response>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S, Req, C, R>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        let shared = self.anchors.shared();
        let ctl = &shared.control;
        // One look-up of this thread's shard serves the budget and the future's anchor.
        let shard = shard();
        if let Some(budget) = &ctl.budget {
            budget.deposit_on(shard);
        }
        let max = ctl.max_attempts.load(Ordering::Relaxed);
        let rng = &ctl.rng;
        // The sequence's draws are distinct, so are they after the salt (a bijection); the
        // salt, from the process's entropy, keeps replicas with one seed apart.
        let key =
            || ((u128::from(rng.next_u64()) << 64) | u128::from(rng.next_u64())) ^ ctl.key_salt;
        let mut saved = None;
        let req = shared.replay.prepare(req, max > 1, &key, &mut saved);
        // A deadline's start is the request's one time reading, made only for a request that
        // may be retried under one (the policy's, or the call's own `grpc-timeout`); the
        // budget needs none.
        let start = match &saved {
            Some(s) if ctl.deadline.is_some() || shared.replay.deadline(s).is_some() => {
                ctl.clock.now_nanos()
            }
            _ => 0,
        };
        // The ready service takes the first attempt; an unreserved clone takes the retries.
        let fut = self.inner.call(req);
        let retry = match saved {
            None => None,
            Some(saved) => {
                let anchor = self.anchors.anchor(shard);
                // Retries are made on clones of one kept clone of the service, made here the
                // first time: no clone of the service per request.
                anchor.keep_template(&self.inner);
                Some(Retrying {
                    svc: None,
                    saved: Some(saved),
                    shared: anchor,
                    start,
                    attempt: 1,
                    max,
                    prev_delay: 0,
                    withdrawn: super::future::NOT_WITHDRAWN,
                })
            }
        };
        ResponseFuture::new(fut, retry)
    }
}

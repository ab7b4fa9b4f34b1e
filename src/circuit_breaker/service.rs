use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower::BoxError;
use tower_service::Service;

use super::future::{Guard, ResponseFuture};
use super::layer::{BreakerKey, Single};
use super::state::{Owner, Permit};
use crate::classify::{Classify, ErrorsOnly};
use crate::rejection::Rejection;

/// A service guarded by a circuit breaker; made by
/// [`CircuitBreakerLayer`](super::CircuitBreakerLayer).
///
/// A refused request completes at once with a [`Rejection`](crate::Rejection) of kind
/// [`CircuitOpen`](crate::RejectionKind::CircuitOpen) without reaching the inner service.
///
/// # Readiness
///
/// A breaker that refuses does not wait on the readiness of the service it protects (tower's
/// `LoadShed` pattern): when it is open, forced open, or half-open with every probe slot
/// taken, `poll_ready` returns `Ready(Ok(()))` at once without polling the inner service,
/// and the `call` that follows returns the refusal decided then. A sick dependency that is
/// never ready therefore cannot make callers hang. Otherwise (closed, forced closed, or a
/// probe that may go) `poll_ready` is the inner service's, and an error it returns (a
/// dependency that cannot be reached, as tower's `Reconnect` or a failed `Buffer` report it)
/// is passed on and counted as the outcome of a call, as the classifier's
/// `classify_error` says: while closed as a failed call, while half-open as a failed probe
/// (in a free probe slot), and once the open time is over as the failed probe that reopens
/// the breaker for longer. A `poll_ready` that succeeds claims nothing: the probe slot, if
/// any, is taken in `call`, so a service made ready and never called holds nothing.
///
/// A [keyed](super::CircuitBreakerLayer::keyed) breaker learns the request's key only in
/// `call`, so its `poll_ready` is the inner service's and an error it returns is passed on
/// without counting for any key; an open key's requests are refused in `call` without
/// reaching the inner service.
///
/// # Clone
///
/// Clones share the breaker state of the layer that made them. A clone starts with no
/// refusal decided.
pub struct CircuitBreaker<S, C = ErrorsOnly, K = Single> {
    inner: S,
    shared: Arc<Owner>,
    classify: C,
    key: K,
    /// The refusal `poll_ready` decided without making the inner service ready.
    refused: Option<Rejection>,
}

impl<S, C, K> CircuitBreaker<S, C, K> {
    pub(crate) fn new(inner: S, shared: Arc<Owner>, classify: C, key: K) -> Self {
        CircuitBreaker {
            inner,
            shared,
            classify,
            key,
            refused: None,
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

    /// The inner service, consuming the breaker service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone, C: Clone, K: Clone> Clone for CircuitBreaker<S, C, K> {
    fn clone(&self) -> Self {
        CircuitBreaker {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
            classify: self.classify.clone(),
            key: self.key.clone(),
            refused: None,
        }
    }
}

impl<S: fmt::Debug, C: fmt::Debug, K: fmt::Debug> fmt::Debug for CircuitBreaker<S, C, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("inner", &self.inner)
            .field("classify", &self.classify)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl<S, C, K> CircuitBreaker<S, C, K> {
    /// Counts an error of the inner `poll_ready` as the outcome of a call (a dependency that
    /// cannot be reached, as tower's `Reconnect` or a failed `Buffer` report it): while closed
    /// as a call's outcome, while half-open as a probe's (taking a free probe slot for it),
    /// and once the open time is over as the probe that half-opens the breaker.
    #[cold]
    fn ready_failed<Res>(&self, err: &BoxError)
    where
        C: Classify<Res>,
    {
        let outcome = self.classify.classify_error(err);
        if let Ok((permit, start)) = self.shared.admit(0) {
            Guard::new(self.shared.share(), 0, permit, start).complete(outcome);
        }
    }
}

impl<S, Req, C, K> Service<Req> for CircuitBreaker<S, C, K>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    C: Classify<S::Response>,
    K: BreakerKey<Req>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, C>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if self.key.is_single() {
            // One load while closed; the clock is read only when open.
            if let Some(rejection) = self.shared.refusal(0) {
                self.refused = Some(rejection);
                return Poll::Ready(Ok(()));
            }
        }
        self.refused = None;
        match self.inner.poll_ready(cx) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => {
                let e = e.into();
                if self.key.is_single() {
                    self.ready_failed::<S::Response>(&e);
                }
                Poll::Ready(Err(e))
            }
        }
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        if let Some(rejection) = self.refused.take() {
            // The inner service was not made ready: the refusal stands.
            return ResponseFuture::rejected(rejection, self.classify.clone());
        }
        let idx = match self.key.key_hash(&req, &self.shared.hasher) {
            None => 0,
            Some(hash) => match self.shared.slot_for(hash) {
                Some(idx) => idx,
                None => {
                    tracing::debug!("circuit breaker table full: request goes through unguarded");
                    let guard = Guard::new(self.shared.share(), 0, Permit::Free, 0);
                    return ResponseFuture::called(
                        self.inner.call(req),
                        guard,
                        self.classify.clone(),
                    );
                }
            },
        };
        match self.shared.admit(idx) {
            Ok((permit, start)) => {
                // The guard exists before the inner call, so a panic in `call` frees a probe
                // slot as it unwinds.
                let guard = Guard::new(self.shared.share(), idx, permit, start);
                ResponseFuture::called(self.inner.call(req), guard, self.classify.clone())
            }
            Err(rejection) => ResponseFuture::rejected(rejection, self.classify.clone()),
        }
    }
}

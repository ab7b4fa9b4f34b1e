use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Sleep;

use tower::BoxError;
use tower_service::Service;

use super::future::{Guard, Reserved, ResponseFuture};
use super::layer::{BreakerKey, Single};
use super::state::{Owner, Permit};
use crate::classify::{Classify, ErrorsOnly};

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
/// and the `call` that follows returns the refusal decided then. Once the open time is over,
/// or half-open with a slot free, `poll_ready` first claims a probe slot and only then waits
/// on the inner service: only the callers that will be probes wait on the dependency's
/// readiness, and the others are refused at once. A sick dependency that is never ready
/// therefore cannot make callers hang, and cannot hold the breaker half-open either: a slot
/// that waits on readiness is a probe underway, timed from when it was claimed. Once it has
/// waited past the probe time limit (see
/// [`half_open_probes`](super::BreakerConfig::half_open_probes)), its round fails (the breaker
/// opens again, for longer) and `poll_ready` returns `Ready(Ok(()))` with the refusal for
/// `call`: the breaker arms a timer for this when it claims the slot, so the waiting caller is
/// woken at the limit even when nobody else calls (tower's `Buffer` has one worker polling the
/// breaker, and every caller behind it would wait with it). A slot whose service is dropped
/// while it waits is freed (a failed probe once it has waited past the slow-call threshold).
/// The timer is made only on this path (and for [`for_balancer`] waits), never while closed.
///
/// Once the inner service is ready, the slot is a *reservation* for the `call` that follows,
/// which is the probe. tower's `Balance` and `ReadyCache` keep services ready and call them
/// late or never (the balancer picks another endpoint), and a service made ready and not
/// called says nothing about the dependency, so a reservation never fails its round: once
/// the round is overdue, a reservation is given to the next caller that finds every slot
/// taken (reclaimed), and a service dropped with its reservation frees it, whatever its age.
/// A service whose reservation was reclaimed decides again when it is called at last (or
/// made ready again): it takes a free slot for its call, or the call is refused without
/// reaching the inner service. A probe's duration (for slow-call detection) does not count
/// the time its service sat ready and uncalled.
///
/// Closed or forced closed, `poll_ready` is the inner service's. An error it returns (a
/// dependency that cannot be reached, as tower's `Reconnect` or a failed `Buffer` report it)
/// is passed on and counted as the outcome of a call, as the classifier's
/// `classify_error` says: while closed as a failed call, and as the failed probe of the slot
/// claimed for the wait once the open time is over or while half-open (the breaker opens
/// again, for longer).
///
/// A call refused after the inner service was made ready (the breaker opened in between, was
/// forced open, or a reservation was reclaimed) does not keep the readiness the inner service
/// reserved (a concurrency permit, a `Buffer` slot): the breaker drops the readied inner
/// service for a clone of it, which is why the service must be `Clone`. tower's `LoadShed`
/// needs no clone because its refusal *is* the inner service not being ready; a breaker's
/// refusal comes from elsewhere, and can come after the inner service was made ready (a
/// `ReadyCache` calls a service long after making it ready, and polls it ready again before
/// the call), when the only way tower's `Service` offers to give readiness up is to drop the
/// service. A service that is not `Clone` can be put behind tower's `Buffer`.
///
/// Under a balancer (tower's `Balance`, `ReadyCache`), being ready with a refusal makes an
/// open endpoint look ready and least loaded, so it draws traffic that it refuses. A layer
/// made with [`for_balancer`] is instead pending while it refuses, woken by a timer at the end
/// of the open time; only a balancer should be its caller.
///
/// A [keyed](super::CircuitBreakerLayer::keyed) breaker learns the request's key only in
/// `call`, so its `poll_ready` is the inner service's and an error it returns is passed on
/// without counting for any key; an open key's requests are refused in `call` without
/// reaching the inner service, which gives up its readiness as above (a clone of the inner
/// service for each refusal).
///
/// # Clone
///
/// Clones share the breaker state of the layer that made them. A clone starts with no
/// refusal decided.
///
/// [`for_balancer`]: super::CircuitBreakerLayer::for_balancer
pub struct CircuitBreaker<S, C = ErrorsOnly, K = Single> {
    inner: S,
    shared: Arc<Owner>,
    classify: C,
    key: K,
    /// The refusal `poll_ready` decided without making the inner service ready, as the error
    /// it becomes (two words: `poll_ready` and `call` write and read it on every call).
    refused: Option<BoxError>,
    /// The half-open probe slot `poll_ready` claimed before waiting on the inner service.
    reserved: Option<Reserved>,
    /// The inner service has been made ready and not called since: a refusal must give up
    /// that readiness (a concurrency permit, a `Buffer` slot) by dropping it.
    inner_ready: bool,
    /// `poll_ready` is pending while the breaker refuses (for balancers), instead of ready
    /// with the refusal.
    pending_while_open: bool,
    /// The timer of the cold paths: the probe time limit of a probe slot that waits on the
    /// inner service's readiness, or the end of a refusal's wait when `pending_while_open`.
    /// Made the first time one is needed, never on the closed path.
    timer: Option<Pin<Box<Sleep>>>,
}

impl<S, C, K> CircuitBreaker<S, C, K> {
    pub(crate) fn new(
        inner: S,
        shared: Arc<Owner>,
        classify: C,
        key: K,
        pending_while_open: bool,
    ) -> Self {
        CircuitBreaker {
            inner,
            shared,
            classify,
            key,
            refused: None,
            reserved: None,
            inner_ready: false,
            pending_while_open,
            timer: None,
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
            reserved: None,
            inner_ready: false,
            pending_while_open: self.pending_while_open,
            timer: None,
        }
    }
}

impl<S: fmt::Debug, C: fmt::Debug, K: fmt::Debug> fmt::Debug for CircuitBreaker<S, C, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("inner", &self.inner)
            .field("classify", &self.classify)
            .field("key", &self.key)
            .field("pending_while_open", &self.pending_while_open)
            .finish_non_exhaustive()
    }
}

impl<S, C, K> CircuitBreaker<S, C, K> {
    /// Counts an error of the inner `poll_ready` as the outcome of a call (a dependency that
    /// cannot be reached, as tower's `Reconnect` or a failed `Buffer` report it): while closed
    /// as a call's outcome, while half-open as a probe's (taking a free probe slot for it),
    /// and once the open time is over as the probe that half-opens the breaker.
    #[cold]
    fn ready_failed<Res>(&mut self, err: &BoxError)
    where
        C: Classify<Res>,
    {
        let outcome = self.classify.classify_error(err);
        if let Some(guard) = self.take_probe() {
            // The probe slot claimed for this wait: the error is the probe's outcome.
            guard.complete(outcome);
            return;
        }
        if let Ok((permit, start)) = self.shared.admit(0) {
            Guard::new(self.shared.share(), 0, permit, start).complete(outcome);
        }
    }

    /// The guard of the probe slot claimed in `poll_ready`: the call is that probe, unless its
    /// round ended meanwhile or, a reservation, it was reclaimed (`None`: the call is decided
    /// afresh, and the slot is no longer this service's).
    #[cold]
    fn take_probe(&mut self) -> Option<Guard> {
        self.reserved.take()?.start()
    }

    /// Gives up the inner service's readiness, if it holds one, by dropping it for a clone
    /// (tower's services hand a clone none of the reservation `poll_ready` made): a call
    /// refused after the inner service was made ready must not keep its permit or slot.
    #[cold]
    fn release_inner(&mut self)
    where
        S: Clone,
    {
        if std::mem::take(&mut self.inner_ready) {
            let fresh = self.inner.clone();
            drop(std::mem::replace(&mut self.inner, fresh));
        }
    }

    /// Arms the timer to fire `wait` from now (at least a millisecond, tokio's resolution)
    /// and polls it: `Some(true)` when it has fired already, `None` outside a tokio runtime
    /// (no timer can be armed).
    #[cold]
    fn arm(&mut self, wait: Duration, cx: &mut Context<'_>) -> Option<bool> {
        tokio::runtime::Handle::try_current().ok()?;
        let at = tokio::time::Instant::now() + wait.max(Duration::from_millis(1));
        let timer = match &mut self.timer {
            Some(timer) => {
                timer.as_mut().reset(at);
                timer
            }
            None => self.timer.insert(Box::pin(tokio::time::sleep_until(at))),
        };
        Some(timer.as_mut().poll(cx).is_ready())
    }

    /// A refusal decided in `poll_ready`: ready at once with the refusal for `call` (tower's
    /// `LoadShed` pattern), or, when pending while open, pending until the refusal's wait
    /// is over (`None`: over already, decide again).
    #[cold]
    fn refuse(
        &mut self,
        rejection: crate::Rejection,
        cx: &mut Context<'_>,
    ) -> Option<Poll<Result<(), BoxError>>>
    where
        S: Clone,
    {
        self.release_inner();
        if self.pending_while_open {
            let wait = rejection.retry_after().unwrap_or(Duration::from_millis(1));
            match self.arm(wait, cx) {
                Some(false) => {
                    self.refused = None;
                    return Some(Poll::Pending);
                }
                Some(true) => return None,
                // No timer outside a tokio runtime: refused as by default rather than
                // pending with nothing to wake the caller.
                None => {}
            }
        }
        self.refused = Some(rejection.into());
        Some(Poll::Ready(Ok(())))
    }

    /// `poll_ready` of a single breaker that is not closed: refuse at once, or claim a probe
    /// slot and only then wait on the inner service. A probe slot that waits on the inner
    /// service is timed: once past the probe time limit its round fails (the breaker opens
    /// again) and the caller is refused, so a dependency that is never ready cannot hold a
    /// caller (or tower's `Buffer` worker, and every caller behind it) for ever.
    #[cold]
    fn poll_ready_slow<Req>(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>>
    where
        S: Service<Req> + Clone,
        S::Error: Into<BoxError>,
        C: Classify<S::Response>,
        K: BreakerKey<Req>,
    {
        // Each turn ends in a decision unless a timer it armed had fired already or a waiting
        // probe's round failed; a few turns always suffice.
        for _ in 0..4 {
            let current = self.reserved.as_ref().is_some_and(Reserved::is_current);
            if !current {
                // A slot of an earlier round (its probe round over), or a reservation given
                // to another caller, is let go.
                self.reserved = None;
                match self.shared.reserve(0) {
                    Err(rejection) => match self.refuse(rejection, cx) {
                        Some(poll) => return poll,
                        None => continue,
                    },
                    Ok(Some((permit, start))) => {
                        self.reserved = Some(Reserved::new(self.shared.share(), 0, permit, start));
                    }
                    Ok(None) => {}
                }
            }
            self.refused = None;
            let ready = self.poll_inner::<Req>(cx);
            match (&ready, self.reserved.as_mut()) {
                (Poll::Ready(Ok(())), Some(r)) => {
                    // Ready and not called yet: a reservation, which says nothing about the
                    // dependency until its call comes.
                    r.mark_ready();
                }
                (Poll::Pending, Some(r)) => {
                    let Some(deadline) = r.waiting_deadline() else {
                        return ready;
                    };
                    // A probe underway: the dependency's readiness is what is probed, and it
                    // has until the probe time limit.
                    let now = self.shared.now();
                    if now >= deadline {
                        if let Some(r) = self.reserved.take() {
                            r.fail_overdue(now);
                        }
                        continue;
                    }
                    match self.arm(Duration::from_nanos(deadline - now), cx) {
                        Some(true) => continue,
                        _ => return ready,
                    }
                }
                _ => {}
            }
            return ready;
        }
        // Clocks that disagree (a timer fired before the breaker's clock reached its time):
        // look again soon.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    #[inline]
    fn poll_inner<Req>(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>>
    where
        S: Service<Req>,
        S::Error: Into<BoxError>,
        C: Classify<S::Response>,
        K: BreakerKey<Req>,
    {
        match self.inner.poll_ready(cx) {
            Poll::Ready(Ok(())) => {
                self.inner_ready = true;
                Poll::Ready(Ok(()))
            }
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
}

impl<S, Req, C, K> Service<Req> for CircuitBreaker<S, C, K>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    C: Classify<S::Response>,
    K: BreakerKey<Req>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, C>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // One load while closed; the clock is read only when not.
        if self.key.is_single() && !self.shared.is_closed(0) {
            return self.poll_ready_slow::<Req>(cx);
        }
        self.refused = None;
        self.poll_inner::<Req>(cx)
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        if let Some(err) = self.refused.take() {
            // The inner service was not made ready (or gave its readiness up): the refusal
            // stands. The request is dropped as refused (`util::stamp`).
            crate::util::stamp::refuse(req);
            return ResponseFuture::refused(err, self.classify.clone());
        }
        if self.reserved.is_some() {
            if let Some(guard) = self.take_probe() {
                self.inner_ready = false;
                return ResponseFuture::called(self.inner.call(req), guard, self.classify.clone());
            }
        }
        let idx = match self.key.key_hash(&req, &self.shared.hasher) {
            None => 0,
            Some(hash) => match self.shared.slot_for(hash) {
                Some(idx) => idx,
                None => {
                    tracing::debug!("circuit breaker table full: request goes through unguarded");
                    self.inner_ready = false;
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
                self.inner_ready = false;
                ResponseFuture::called(self.inner.call(req), guard, self.classify.clone())
            }
            Err(rejection) => {
                // Refused after the inner service was made ready: give its readiness up.
                self.release_inner();
                crate::util::stamp::refuse(req);
                ResponseFuture::rejected(rejection, self.classify.clone())
            }
        }
    }
}

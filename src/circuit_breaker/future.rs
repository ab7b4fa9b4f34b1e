//! [`ResponseFuture`]: the future of a [`CircuitBreaker`](super::CircuitBreaker) call.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use pin_project_lite::pin_project;
use tower::BoxError;

use super::state::{Permit, SharedRef};
use crate::classify::{Classify, Outcome};
use crate::rejection::Rejection;

/// What an admitted call holds until its outcome is known: the breaker it counts for and,
/// for a half-open probe, its probe slot. Dropped without an outcome, it frees the slot.
pub(crate) struct Guard {
    shared: SharedRef,
    idx: u32,
    permit: Permit,
    start: u64,
}

impl Guard {
    pub(crate) fn new(shared: SharedRef, idx: usize, permit: Permit, start: u64) -> Guard {
        Guard {
            shared,
            idx: idx as u32,
            permit,
            start,
        }
    }

    pub(crate) fn complete(mut self, outcome: Outcome) {
        let permit = std::mem::replace(&mut self.permit, Permit::Free);
        let idx = self.idx as usize;
        let verdict = match outcome {
            Outcome::Success => Some(false),
            o if o.is_failure() => Some(true),
            // Throttled: neither healthy nor sick.
            _ => None,
        };
        match (permit, verdict) {
            (Permit::Closed { gen }, Some(failed)) => {
                self.shared.record_closed(idx, gen, failed, self.start)
            }
            (Permit::Probe { gen }, Some(failed)) => {
                let failed = failed || self.shared.is_slow(self.start);
                self.shared.record_probe(idx, gen, failed)
            }
            (Permit::Probe { gen }, None) => self.shared.release_probe(idx, gen),
            _ => {}
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        // Reached with a permit only when the call was abandoned (its future dropped before
        // the outcome, or `call` panicked): `complete` takes the permit.
        let idx = self.idx as usize;
        match self.permit {
            Permit::Closed { gen } if self.shared.limits.abandoned_failure => {
                self.shared.record_closed(idx, gen, true, self.start)
            }
            // Neither success nor failure, but a slow call if it ran past the threshold.
            Permit::Closed { gen } if self.shared.limits.slow_nanos.is_some() => {
                self.shared.record_abandoned(idx, gen, self.start)
            }
            // A probe abandoned after it was already slow is a failed probe, whatever the
            // policy: a slow probe is a failed probe.
            Permit::Probe { gen }
                if self.shared.limits.abandoned_failure || self.shared.is_slow(self.start) =>
            {
                self.shared.record_probe(idx, gen, true)
            }
            Permit::Probe { gen } => self.shared.release_probe(idx, gen),
            _ => {}
        }
    }
}

/// A half-open probe slot that `poll_ready` claimed before waiting on the inner service's
/// readiness (so that only the callers that will be probes wait on it).
///
/// While the inner service is not ready, the slot is a probe underway: the dependency's
/// readiness is what is probed. Dropped then (the service dropped while it waits), it frees
/// the slot, or, once it has waited past the slow-call threshold, counts as a failed probe.
///
/// Once the inner service is ready, the slot is a *reservation*: the caller has made the
/// service ready and not called it yet (tower's `Balance` and `ReadyCache` keep services
/// ready, and call them late or never). A reservation says nothing about the dependency: it
/// never fails its round, is given to another caller once its round is overdue (reclaimed),
/// and, dropped unused, frees its slot whatever its age. `call` turns it into the call's
/// [`Guard`], unless it was reclaimed or its round is over.
pub(crate) struct Reserved {
    guard: Option<Guard>,
    /// The reservation's epoch once the inner service is ready (`None` while it waits).
    epoch: Option<u64>,
    /// When the inner service became ready (read only with slow-call detection on): the
    /// time spent ready and uncalled is not part of the probe's duration.
    ready_at: u64,
}

impl Reserved {
    pub(crate) fn new(shared: SharedRef, idx: usize, permit: Permit, start: u64) -> Reserved {
        Reserved {
            guard: Some(Guard::new(shared, idx, permit, start)),
            epoch: None,
            ready_at: 0,
        }
    }

    /// The generation of the probe round the slot belongs to.
    pub(crate) fn gen(&self) -> Option<u64> {
        match self.guard.as_ref()?.permit {
            Permit::Probe { gen } => Some(gen),
            _ => None,
        }
    }

    /// Whether the slot still belongs to the current round (and, a reservation, was not
    /// reclaimed).
    pub(crate) fn is_current(&self) -> bool {
        let (Some(g), Some(guard)) = (self.gen(), self.guard.as_ref()) else {
            return false;
        };
        let idx = guard.idx as usize;
        match self.epoch {
            None => guard.shared.probe_current(idx, g),
            Some(e) => guard.shared.reservation_live(idx, g, e),
        }
    }

    /// The inner service is ready: the slot becomes a reservation (once).
    pub(crate) fn mark_ready(&mut self) {
        if self.epoch.is_some() {
            return;
        }
        let (Some(g), Some(guard)) = (self.gen(), self.guard.as_ref()) else {
            return;
        };
        let shared = &guard.shared;
        if let Some(e) = shared.mark_reserved(guard.idx as usize, g) {
            self.epoch = Some(e);
            if shared.limits.slow_nanos.is_some() {
                self.ready_at = shared.now();
            }
        }
    }

    /// While the slot waits on the inner service's readiness (not a reservation), when it
    /// is past the probe time limit, in the breaker's clock.
    pub(crate) fn waiting_deadline(&self) -> Option<u64> {
        if self.epoch.is_some() {
            return None;
        }
        let guard = self.guard.as_ref()?;
        match guard.permit {
            Permit::Probe { .. } => {
                Some(guard.shared.probe_deadline(guard.idx as usize, guard.start))
            }
            _ => None,
        }
    }

    /// The slot has waited on readiness past the probe time limit: its round fails.
    pub(crate) fn fail_overdue(mut self, now: u64) {
        if let Some(mut g) = self.guard.take() {
            if let Permit::Probe { gen } = std::mem::replace(&mut g.permit, Permit::Free) {
                g.shared.fail_waiting(g.idx as usize, gen, now);
            }
        }
    }

    /// The guard of the call that uses the slot: `None` when the slot was reclaimed or its
    /// round is over (the call is then decided afresh; nothing is freed, the slot is no
    /// longer this one's).
    pub(crate) fn start(mut self) -> Option<Guard> {
        let mut guard = self.guard.take()?;
        let Permit::Probe { gen } = guard.permit else {
            return Some(guard);
        };
        let idx = guard.idx as usize;
        let Some(e) = self.epoch else {
            // Called while still counted as a probe underway: it is that probe.
            if guard.shared.probe_current(idx, gen) {
                return Some(guard);
            }
            guard.permit = Permit::Free;
            return None;
        };
        let now = guard.shared.now();
        if !guard.shared.start_reserved(idx, gen, e, now) {
            guard.permit = Permit::Free;
            return None;
        }
        if guard.shared.limits.slow_nanos.is_some() {
            // The probe's duration: its wait for readiness and its call, not the time it sat
            // ready and uncalled.
            guard.start = guard
                .start
                .saturating_add(now.saturating_sub(self.ready_at));
        }
        Some(guard)
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        if let Some(mut g) = self.guard.take() {
            let permit = std::mem::replace(&mut g.permit, Permit::Free);
            if let Permit::Probe { gen } = permit {
                let idx = g.idx as usize;
                match self.epoch {
                    // A reservation never called: no verdict, whatever its age.
                    Some(e) => g.shared.release_reserved(idx, gen, e),
                    // A probe that waited on readiness past the slow-call threshold failed.
                    None if g.shared.is_slow(g.start) => g.shared.record_probe(idx, gen, true),
                    None => g.shared.release_probe(idx, gen),
                }
            }
        }
    }
}

impl fmt::Debug for Reserved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reserved")
            .field("guard", &self.guard)
            .field("epoch", &self.epoch)
            .finish()
    }
}

impl fmt::Debug for Guard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Guard")
            .field("breaker", &self.idx)
            .field("permit", &self.permit)
            .finish()
    }
}

pin_project! {
    /// Response future of [`CircuitBreaker`](super::CircuitBreaker).
    ///
    /// # Cancel safety
    ///
    /// Dropped before it completes, the call counts as its
    /// [`Abandoned`](super::Abandoned) policy says (by default neither success nor failure),
    /// and a half-open probe slot it held is freed at once. With slow-call detection on, a
    /// call dropped after it has run at least the slow-call threshold counts as a slow call
    /// (a half-open probe: as a failed probe), whatever the policy.
    #[must_use = "futures do nothing unless you `.await` or poll them"]
    pub struct ResponseFuture<F, C> {
        #[pin]
        state: State<F>,
        guard: Option<Guard>,
        classify: C,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Called { #[pin] fut: F },
        // The refusal as the error it becomes (two words, where a `Rejection` is eleven: the
        // future of every call carries this variant's size).
        Rejected { err: Option<BoxError> },
    }
}

impl<F, C> ResponseFuture<F, C> {
    pub(crate) fn called(fut: F, guard: Guard, classify: C) -> Self {
        ResponseFuture {
            state: State::Called { fut },
            guard: Some(guard),
            classify,
        }
    }

    pub(crate) fn rejected(rejection: Rejection, classify: C) -> Self {
        Self::refused(rejection.into(), classify)
    }

    /// A refusal already made into its error.
    pub(crate) fn refused(err: BoxError, classify: C) -> Self {
        ResponseFuture {
            state: State::Rejected { err: Some(err) },
            guard: None,
            classify,
        }
    }
}

impl<F, C> fmt::Debug for ResponseFuture<F, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Called { .. } => "called",
            State::Rejected { .. } => "rejected",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .field("guard", &self.guard)
            .finish_non_exhaustive()
    }
}

impl<F, T, E, C> Future for ResponseFuture<F, C>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
    C: Classify<T>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match this.state.project() {
            StateProj::Called { fut } => {
                let result = ready!(fut.poll(cx)).map_err(Into::into);
                if let Some(guard) = this.guard.take() {
                    let outcome = match &result {
                        Ok(res) => this.classify.classify_response(res),
                        Err(err) => this.classify.classify_error(err),
                    };
                    guard.complete(outcome);
                }
                Poll::Ready(result)
            }
            StateProj::Rejected { err } => {
                Poll::Ready(Err(err.take().expect("polled after completion")))
            }
        }
    }
}

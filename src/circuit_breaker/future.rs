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
/// readiness (so that only the callers that will be probes wait on it). `call` turns it
/// into the call's [`Guard`]; dropped unused (the service dropped or made ready again under
/// a later state), it frees the slot, or, when it has waited past the slow-call threshold,
/// counts as a failed probe.
pub(crate) struct Reserved(Option<Guard>);

impl Reserved {
    pub(crate) fn new(shared: SharedRef, idx: usize, permit: Permit, start: u64) -> Reserved {
        Reserved(Some(Guard::new(shared, idx, permit, start)))
    }

    /// The generation of the probe round the slot belongs to.
    pub(crate) fn gen(&self) -> Option<u64> {
        match self.0.as_ref()?.permit {
            Permit::Probe { gen } => Some(gen),
            _ => None,
        }
    }

    /// The guard of the call that uses the slot.
    pub(crate) fn into_guard(mut self) -> Guard {
        self.0.take().expect("a reserved slot is used once")
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        if let Some(mut g) = self.0.take() {
            let permit = std::mem::replace(&mut g.permit, Permit::Free);
            if let Permit::Probe { gen } = permit {
                let idx = g.idx as usize;
                if g.shared.is_slow(g.start) {
                    g.shared.record_probe(idx, gen, true);
                } else {
                    g.shared.release_probe(idx, gen);
                }
            }
        }
    }
}

impl fmt::Debug for Reserved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Reserved").field(&self.0).finish()
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

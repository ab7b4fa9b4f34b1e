//! The response future of [`Retry`](super::Retry).

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower::BoxError;
use tower_service::Service;

use crate::classify::{Classify, Outcome};
use crate::rejection::Rejection;

use super::layer::Anchor;
use super::policy::{Hint, Hints, Replay};

pin_project! {
    /// The response future of [`Retry`](super::Retry): the first attempt, then, while the
    /// outcome is retryable and the attempts, deadline and budget allow, a backoff and another
    /// attempt.
    ///
    /// # Cancel safety
    ///
    /// Dropping it at any point stops everything: the attempt in flight is dropped, a backoff
    /// sleep is dropped, no task is left behind and no later attempt is made.
    #[must_use = "futures do nothing unless polled"]
    pub struct ResponseFuture<S, Req, C, R>
    where
        S: Service<<R as Replay<Req>>::Request>,
        R: Replay<Req>,
    {
        #[pin]
        state: State<S::Future, Result<S::Response, BoxError>>,
        retry: Option<RetryingFor<S, Req, C, R>>,
        _req: PhantomData<fn(Req)>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, T> {
        Called { #[pin] fut: F },
        // Boxed: only a retry pays for the timer, and the future stays small for the common
        // case where the first attempt succeeds. `last`: the last outcome, kept (boxed: only
        // a retry pays for it) while a retry waits, so that a retry not made (a deadline
        // passing before it starts, a failed readiness) returns it.
        Backoff { sleep: Pin<Box<Sleep>>, last: Option<Box<T>> },
        // Waiting for the inner service's readiness; under a deadline, `wait` ends at it
        // (made only if the service is not ready at once).
        Ready { wait: Option<Pin<Box<Sleep>>>, last: Option<Box<T>> },
    }
}

/// What a request that may be retried carries: the kept request, the state, and (from the
/// first retry on) a clone of the service to retry on.
pub(crate) struct Retrying<S, Saved, C, R, T> {
    // Boxed: made only for a retry, and inline it would make every future carry the size of
    // the service below (every layer above moves this future).
    pub(crate) svc: Option<Box<OnRetry<S, T>>>,
    pub(crate) saved: Option<Saved>,
    pub(crate) shared: Arc<Anchor<S, C, R>>,
    pub(crate) start: u64,
    /// Attempts made so far.
    pub(crate) attempt: u32,
    pub(crate) max: u32,
    pub(crate) prev_delay: u64,
    /// The budget's epoch of a retry withdrawn and not made yet (`NOT_WITHDRAWN` if none):
    /// given back if it never is. (No `Option`: the future stays a word smaller.)
    pub(crate) withdrawn: u64,
}

/// The [`Retrying`] of a [`ResponseFuture`].
pub(crate) type RetryingFor<S, Req, C, R> = Retrying<
    S,
    <R as Replay<Req>>::Saved,
    C,
    R,
    Result<<S as Service<<R as Replay<Req>>::Request>>::Response, BoxError>,
>;

/// What only a retry needs, boxed so that a first attempt pays nothing for it.
pub(crate) struct OnRetry<S, T> {
    /// The clone of the service that retries are made on.
    svc: S,
    /// Under the call's own deadline (gRPC's `grpc-timeout`), the end of the retry in flight,
    /// and the outcome before it, which the call then returns: the caller waits no longer
    /// than its deadline, as a gRPC client does.
    cut: Option<Pin<Box<Sleep>>>,
    last: Option<T>,
}

/// `Retrying::withdrawn` when no retry is withdrawn (an epoch the budget never reaches).
pub(crate) const NOT_WITHDRAWN: u64 = u64::MAX;

impl<S, Saved, C, R, T> Drop for Retrying<S, Saved, C, R, T> {
    fn drop(&mut self) {
        let epoch = std::mem::replace(&mut self.withdrawn, NOT_WITHDRAWN);
        if epoch != NOT_WITHDRAWN {
            if let Some(budget) = &self.shared.control.budget {
                budget.refund(epoch);
            }
        }
    }
}

impl<S, Req, C, R> ResponseFuture<S, Req, C, R>
where
    S: Service<<R as Replay<Req>>::Request>,
    R: Replay<Req>,
{
    #[inline]
    pub(crate) fn new(fut: S::Future, retry: Option<RetryingFor<S, Req, C, R>>) -> Self {
        ResponseFuture {
            state: State::Called { fut },
            retry,
            _req: PhantomData,
        }
    }
}

impl<S, Req, C, R> fmt::Debug for ResponseFuture<S, Req, C, R>
where
    S: Service<<R as Replay<Req>>::Request>,
    R: Replay<Req>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Called { .. } => "called",
            State::Backoff { .. } => "backoff",
            State::Ready { .. } => "ready",
        };
        let mut d = f.debug_struct("ResponseFuture");
        d.field("state", &state);
        if let Some(r) = &self.retry {
            d.field("attempt", &r.attempt).field("max_attempts", &r.max);
        }
        d.finish()
    }
}

fn lost() -> BoxError {
    "retry: the request could not be replayed".into()
}

fn past_deadline() -> BoxError {
    "retry: the deadline passed while waiting for the service to be ready".into()
}

/// Why a retry is made, for the `tracing` event.
fn reason<Res, H: Hints<Res>>(
    hints: &H,
    outcome: Outcome,
    result: &Result<Res, BoxError>,
) -> String {
    match result {
        Ok(res) => match hints.describe(res) {
            Some(d) => format!("{outcome:?} response: {d}"),
            None => format!("{outcome:?} response"),
        },
        Err(e) => format!("{outcome:?} error: {e}"),
    }
}

fn past_call_deadline() -> BoxError {
    "retry: the call's deadline passed".into()
}

impl<S, Saved, C, R, T> Retrying<S, Saved, C, R, T> {
    /// The call's own deadline (gRPC's `grpc-timeout`), in nanoseconds from `start`.
    fn own_deadline<Req>(&self) -> Option<u64>
    where
        R: Replay<Req, Saved = Saved>,
    {
        let saved = self.saved.as_ref()?;
        self.shared
            .replay
            .deadline(saved)
            .map(crate::clock::duration_nanos)
    }

    /// The deadline no attempt starts past: the policy's or the call's own, the stricter.
    fn deadline<Req>(&self) -> Option<u64>
    where
        R: Replay<Req, Saved = Saved>,
    {
        match (self.shared.control.deadline, self.own_deadline::<Req>()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Nanoseconds left before `deadline` (from `start`).
    fn left(&self, deadline: u64) -> u64 {
        let now = self.shared.control.clock.now_nanos();
        deadline.saturating_sub(now.saturating_sub(self.start))
    }

    /// How the classifier judges `result`: only a retryable outcome goes on to
    /// [`decide`](Self::decide).
    #[inline]
    fn judge<Res>(&self, result: &Result<Res, BoxError>) -> Outcome
    where
        C: Classify<Res>,
    {
        let classify = &self.shared.classify;
        match result {
            Ok(res) => classify.classify_response(res),
            Err(e) => classify.classify_error(e),
        }
    }

    /// Whether to retry the retryable `outcome` of `result`, and after how many nanoseconds.
    /// `sent`: whether the attempt sent the request (not so for a failed readiness).
    fn decide<Req, Res>(
        &mut self,
        outcome: Outcome,
        result: &Result<Res, BoxError>,
        sent: bool,
    ) -> Option<u64>
    where
        R: Replay<Req, Saved = Saved> + Hints<Res>,
    {
        let shared = &**self.shared;
        let ctl = &shared.control;
        if self.attempt >= self.max {
            tracing::debug!(
                target: "tower_bulwark::retry",
                attempts = self.attempt,
                reason = %reason(&shared.replay, outcome, result),
                "giving up: attempts exhausted"
            );
            return None;
        }
        if let (Err(e), Some(saved)) = (result, self.saved.as_ref()) {
            // An error says nothing of whether the server ran the call (a timeout, a reset
            // after sending), unless a layer below refused it: only a request marked safe is
            // sent again after one.
            if sent && Rejection::find(&**e).is_none() && !shared.replay.may_retry_error(saved) {
                tracing::debug!(
                    target: "tower_bulwark::retry",
                    attempts = self.attempt,
                    error = %e,
                    "not retrying: the call may have been processed and is not marked idempotent"
                );
                return None;
            }
        }
        if let (Ok(res), Some(saved)) = (result, self.saved.as_ref()) {
            // A 5xx from the handler or a gateway's timeout may follow a run of the request:
            // sent again only if it is safe to repeat whatever happened (an `IdempotencyLayer`
            // releases the key of a 5xx answer, so a key alone does not make it so).
            if shared.replay.may_have_run(res) && !shared.replay.may_retry_response(saved) {
                tracing::debug!(
                    target: "tower_bulwark::retry",
                    attempts = self.attempt,
                    reason = %reason(&shared.replay, outcome, result),
                    "not retrying: the answer may follow a run of the request, which is not \
                     safe to repeat"
                );
                return None;
            }
        }
        if !self
            .saved
            .as_ref()
            .is_some_and(|s| shared.replay.can_replay(s))
        {
            tracing::debug!(
                target: "tower_bulwark::retry",
                attempts = self.attempt,
                "not retrying: the request cannot be replayed"
            );
            return None;
        }
        let max_delay = crate::clock::duration_nanos(ctl.backoff.max());
        let deadline = self.deadline::<Req>();
        let hint = match result {
            Ok(res) => shared.replay.hint(res),
            // A rejection from a layer below (an open breaker, a rate limit, a shed) says when
            // to come back, as a server's `Retry-After` does.
            Err(e) => match Rejection::find(&**e).and_then(Rejection::retry_after) {
                Some(d) => Hint::After(d),
                None => Hint::None,
            },
        };
        // `earliest`: no attempt before it; `delay`: the wait drawn, at least `earliest`.
        let (earliest, delay) = match hint {
            Hint::Stop => {
                tracing::debug!(
                    target: "tower_bulwark::retry",
                    attempts = self.attempt,
                    "not retrying: the server's pushback says not to"
                );
                return None;
            }
            Hint::After(d) => {
                let d = crate::clock::duration_nanos(d);
                if d > ctl.max_hint {
                    // Retrying earlier than told is never right, and waiting longer than the
                    // policy allows is not what the caller asked for: the answer is returned.
                    tracing::debug!(
                        target: "tower_bulwark::retry",
                        attempts = self.attempt,
                        retry_after_ms = d / 1_000_000,
                        reason = %reason(&shared.replay, outcome, result),
                        "not retrying: told to wait longer than the policy's max hint"
                    );
                    return None;
                }
                // Waited out as the hint plus a uniform share of twice the hint (at least this
                // retry's backoff ceiling; at most the maximum delay for a hint within it):
                // callers refused over a span before one instant (an open breaker's end, a
                // rate limit's reset) come back spread over a span after it, never before they
                // were told.
                let spread = if d <= max_delay {
                    d.saturating_mul(2)
                        .clamp(ctl.backoff.ceiling_nanos(self.attempt - 1), max_delay)
                } else {
                    d.saturating_mul(2)
                };
                let jitter = (spread as f64 * ctl.rng.next_f64()) as u64;
                (d, d.saturating_add(jitter))
            }
            Hint::None => {
                let d = ctl
                    .backoff
                    .delay(self.attempt - 1, self.prev_delay, &ctl.rng);
                (d, d)
            }
        };
        let mut delay = delay;
        let now = if ctl.needs_clock || deadline.is_some() {
            ctl.clock.now_nanos()
        } else {
            0
        };
        if let Some(deadline) = deadline {
            let left = deadline.saturating_sub(now.saturating_sub(self.start));
            if earliest > left {
                tracing::debug!(
                    target: "tower_bulwark::retry",
                    attempts = self.attempt,
                    delay_ms = earliest / 1_000_000,
                    "not retrying: the next attempt would start past the deadline"
                );
                return None;
            }
            delay = delay.min(left);
        }
        if let Some(budget) = &ctl.budget {
            let Some(epoch) = budget.withdraw_at(now) else {
                ctl.budget_exhausted.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    target: "tower_bulwark::retry",
                    attempts = self.attempt,
                    "not retrying: retry budget exhausted"
                );
                return None;
            };
            self.withdrawn = epoch;
        }
        self.prev_delay = delay;
        tracing::debug!(
            target: "tower_bulwark::retry",
            attempt = self.attempt + 1,
            delay_ms = delay as f64 / 1e6,
            reason = %reason(&shared.replay, outcome, result),
            "retrying"
        );
        Some(delay)
    }
}

impl<S, Req, C, R> Future for ResponseFuture<S, Req, C, R>
where
    R: Replay<Req> + Hints<S::Response>,
    S: Service<R::Request> + Clone,
    S::Error: Into<BoxError>,
    C: Classify<S::Response>,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Called { fut } => {
                    let result = match fut.poll(cx) {
                        Poll::Ready(result) => result.map_err(Into::into),
                        Poll::Pending => {
                            // A retry under the call's own deadline ends at it (a first
                            // attempt has no `OnRetry`: it pays nothing here).
                            let Some(on) = this.retry.as_mut().and_then(|r| r.svc.as_mut()) else {
                                return Poll::Pending;
                            };
                            let Some(cut) = on.cut.as_mut() else {
                                return Poll::Pending;
                            };
                            ready!(cut.as_mut().poll(cx));
                            let last = on.last.take();
                            tracing::debug!(
                                target: "tower_bulwark::retry",
                                "giving up: the call's deadline passed during a retry"
                            );
                            *this.retry = None;
                            this.state.set(State::Ready {
                                wait: None,
                                last: None,
                            });
                            return Poll::Ready(last.unwrap_or_else(|| Err(past_call_deadline())));
                        }
                    };
                    let Some(retry) = this.retry.as_mut() else {
                        return Poll::Ready(result);
                    };
                    let outcome = retry.judge(&result);
                    if !outcome.is_retryable() {
                        *this.retry = None;
                        return Poll::Ready(result);
                    }
                    // The finished attempt is dropped before the decision: it may still hold
                    // the request's body (a timed-out attempt), which the replay needs back.
                    this.state.set(State::Ready {
                        wait: None,
                        last: None,
                    });
                    if let Some(on) = retry.svc.as_mut() {
                        on.cut = None;
                        on.last = None;
                    }
                    match retry.decide::<Req, S::Response>(outcome, &result, true) {
                        None => {
                            *this.retry = None;
                            return Poll::Ready(result);
                        }
                        Some(nanos) => {
                            if wait(this.state.as_mut(), cx, nanos, Box::new(result)) {
                                return Poll::Pending;
                            }
                        }
                    }
                }
                StateProj::Backoff { sleep, last } => {
                    ready!(sleep.as_mut().poll(cx));
                    let last = last.take();
                    this.state.set(State::Ready { wait: None, last });
                }
                StateProj::Ready {
                    wait: ready_wait,
                    last,
                } => {
                    let Some(retry) = this.retry.as_mut() else {
                        return Poll::Ready(Err(lost()));
                    };
                    if retry.svc.is_none() {
                        retry.svc = retry.shared.service().map(|svc| {
                            Box::new(OnRetry {
                                svc,
                                cut: None,
                                last: None,
                            })
                        });
                    }
                    let Some(on) = retry.svc.as_mut() else {
                        *this.retry = None;
                        return Poll::Ready(Err(lost()));
                    };
                    match on.svc.poll_ready(cx) {
                        Poll::Ready(Ok(())) => {}
                        Poll::Ready(Err(e)) => {
                            // Nothing was sent (a failed reconnect, say): this attempt's
                            // outcome is the error, retried as the policy says; giving up
                            // returns the last response, if there was one.
                            let result: Result<S::Response, BoxError> = Err(e.into());
                            retry.attempt += 1;
                            // The retry was made (and failed): its withdrawal is spent.
                            retry.withdrawn = NOT_WITHDRAWN;
                            retry.shared.control.retries.fetch_add(1, Ordering::Relaxed);
                            let outcome = retry.judge(&result);
                            let decision = if outcome.is_retryable() {
                                retry.decide::<Req, S::Response>(outcome, &result, false)
                            } else {
                                tracing::debug!(
                                    target: "tower_bulwark::retry",
                                    attempts = retry.attempt,
                                    "giving up: the service failed to be ready for a retry"
                                );
                                None
                            };
                            let keep = match last.take() {
                                Some(prev) if prev.is_ok() => prev,
                                _ => Box::new(result),
                            };
                            match decision {
                                None => {
                                    *this.retry = None;
                                    return Poll::Ready(*keep);
                                }
                                Some(nanos) => {
                                    if wait(this.state.as_mut(), cx, nanos, keep) {
                                        return Poll::Pending;
                                    }
                                    continue;
                                }
                            }
                        }
                        Poll::Pending => {
                            // No attempt starts past the deadline: the wait for readiness
                            // ends at it, with the last outcome.
                            if ready_wait.is_none() {
                                let Some(deadline) = retry.deadline::<Req>() else {
                                    return Poll::Pending;
                                };
                                let left = retry.left(deadline);
                                *ready_wait =
                                    Some(Box::pin(tokio::time::sleep(Duration::from_nanos(left))));
                            }
                            if let Some(w) = ready_wait.as_mut() {
                                ready!(w.as_mut().poll(cx));
                            }
                            tracing::debug!(
                                target: "tower_bulwark::retry",
                                attempts = retry.attempt,
                                "not retrying: the deadline passed while waiting for readiness"
                            );
                            *this.retry = None;
                            return Poll::Ready(match last.take() {
                                Some(last) => *last,
                                None => Err(past_deadline()),
                            });
                        }
                    }
                    // The call's own deadline: the time it leaves is the retry's.
                    let left = retry.own_deadline::<Req>().map(|d| retry.left(d));
                    if left == Some(0) {
                        tracing::debug!(
                            target: "tower_bulwark::retry",
                            attempts = retry.attempt,
                            "not retrying: the call's deadline passed"
                        );
                        *this.retry = None;
                        return Poll::Ready(match last.take() {
                            Some(last) => *last,
                            None => Err(past_call_deadline()),
                        });
                    }
                    retry.attempt += 1;
                    let is_last = retry.attempt >= retry.max;
                    let Some(mut req) = retry.shared.replay.replay(&mut retry.saved, is_last)
                    else {
                        *this.retry = None;
                        return Poll::Ready(Err(lost()));
                    };
                    if let Some(left) = left {
                        retry
                            .shared
                            .replay
                            .set_time_left(&mut req, Duration::from_nanos(left));
                    }
                    let Some(on) = retry.svc.as_mut() else {
                        *this.retry = None;
                        return Poll::Ready(Err(lost()));
                    };
                    let fut = on.svc.call(req);
                    if let Some(left) = left {
                        on.cut = Some(Box::pin(tokio::time::sleep(Duration::from_nanos(left))));
                        on.last = last.take().map(|last| *last);
                    }
                    // The retry is made: its withdrawal is spent, and it counts.
                    retry.withdrawn = NOT_WITHDRAWN;
                    retry.shared.control.retries.fetch_add(1, Ordering::Relaxed);
                    this.state.set(State::Called { fut });
                }
            }
        }
    }
}

/// Waits `nanos` before the next retry, keeping `last` to return if it is not made. A retry
/// with no wait yields to the runtime first (returns `true`: the caller returns `Pending`,
/// its task woken), so that retries that never wait do not run in one poll for ever.
fn wait<F, T>(
    mut state: Pin<&mut State<F, T>>,
    cx: &mut Context<'_>,
    nanos: u64,
    last: Box<T>,
) -> bool {
    if nanos > 0 {
        state.set(State::Backoff {
            sleep: Box::pin(tokio::time::sleep(Duration::from_nanos(nanos))),
            last: Some(last),
        });
        false
    } else {
        state.set(State::Ready {
            wait: None,
            last: Some(last),
        });
        cx.waker().wake_by_ref();
        true
    }
}

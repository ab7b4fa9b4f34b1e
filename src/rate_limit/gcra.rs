//! The quota and the pure GCRA arithmetic, in nanoseconds.
//!
//! GCRA (the generic cell rate algorithm) keeps one number per limit: the *theoretical arrival
//! time* (TAT), the instant at which the limit would be whole again if no request came. A
//! request at `now` is admitted when `max(tat, now) + interval - tolerance <= now`, where
//! `interval` is the time one token takes to come back and `tolerance = burst * interval`;
//! admitting it moves the TAT to `max(tat, now) + interval`. A TAT in the past is the same as
//! a fresh limit, which is what lets the keyed table reuse such slots at once.
//!
//! # Clock slack
//!
//! The conforming check allows a request up to [`CLOCK_SLACK_NS`] early (10 µs, and always
//! less than one interval): `allowed_at <= now + slack`. Waits and the `retry_after` computed
//! here still run to the exact edge (a rejection's hint is that, jittered upwards), so a client
//! that comes back after its `retry_after` is admitted. A time-stamp counter read on one core
//! can be a microsecond or two behind one read on another, so a client sending at exactly
//! the quota's rate would otherwise be refused now and then with a `retry_after` of a few
//! microseconds (which HTTP rounds up to `Retry-After: 1`). The slack bounds what it costs:
//! over any span the limit admits fewer than one request more than `burst + span / interval`,
//! and at one instant exactly the burst.

use std::fmt;
use std::time::Duration;

use crate::clock::duration_nanos;

/// The largest `burst * interval` accepted, in nanoseconds: about 9 years. The keyed table
/// keeps times in 60 bits, so this also bounds how far ahead a TAT can be.
pub(crate) const MAX_TOLERANCE_NS: u64 = 1 << 58;

/// How early a request may be and still conform: 10 µs, capped below one interval (see the
/// module docs). Larger than any backwards step of the crate's clocks across threads.
pub(crate) const CLOCK_SLACK_NS: u64 = 10_000;

/// A rate: how many requests per period, and how many may come at once (the burst).
///
/// `Quota::per_second(n)` means **n requests per second** (one token every `1/n` s), with a
/// burst of `n` unless [`Quota::burst`] says otherwise:
///
/// ```
/// use std::time::Duration;
/// use tower_bulwark::Quota;
///
/// let q = Quota::per_second(100)?;
/// assert_eq!(q.interval(), Duration::from_millis(10)); // n per second, not one per n seconds
/// assert_eq!(q.burst_size(), 100);
///
/// let q = Quota::per_minute(60)?.burst(5)?;
/// assert_eq!(q.interval(), Duration::from_secs(1));
/// assert_eq!(q.burst_size(), 5);
///
/// // One token every 250 ms, no burst beyond one.
/// let q = Quota::with_period(Duration::from_millis(250))?;
/// assert_eq!(q.burst_size(), 1);
///
/// // Zero and absurd values are refused here, never at request time.
/// assert!(Quota::per_second(0).is_err());
/// assert!(Quota::per_second(100)?.burst(0).is_err());
/// # Ok::<(), tower_bulwark::rate_limit::QuotaError>(())
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Quota {
    interval_ns: u64,
    burst: u32,
}

/// Why a [`Quota`] was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum QuotaError {
    /// A count, burst or period of zero.
    Zero,
    /// More than one token per nanosecond.
    TooFast,
    /// `burst * interval` longer than about 9 years.
    TooLong,
}

impl fmt::Display for QuotaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            QuotaError::Zero => "quota count, burst and period must be greater than zero",
            QuotaError::TooFast => "quota allows more than one request per nanosecond",
            QuotaError::TooLong => "quota burst times interval exceeds about 9 years",
        })
    }
}

impl std::error::Error for QuotaError {}

impl Quota {
    /// `n` requests per second, burst `n`.
    pub fn per_second(n: u32) -> Result<Quota, QuotaError> {
        Quota::per_period(n, Duration::from_secs(1))
    }

    /// `n` requests per minute, burst `n`.
    pub fn per_minute(n: u32) -> Result<Quota, QuotaError> {
        Quota::per_period(n, Duration::from_secs(60))
    }

    /// `n` requests per hour, burst `n`.
    pub fn per_hour(n: u32) -> Result<Quota, QuotaError> {
        Quota::per_period(n, Duration::from_secs(3600))
    }

    /// `n` requests per `period`, burst `n`. The interval is `period / n`, rounded down to
    /// the nanosecond.
    pub fn per_period(n: u32, period: Duration) -> Result<Quota, QuotaError> {
        if n == 0 || period.is_zero() {
            return Err(QuotaError::Zero);
        }
        let period_ns = duration_nanos(period);
        let interval_ns = period_ns / u64::from(n);
        if interval_ns == 0 {
            return Err(QuotaError::TooFast);
        }
        Quota::checked(interval_ns, n)
    }

    /// One request every `interval`, burst 1.
    pub fn with_period(interval: Duration) -> Result<Quota, QuotaError> {
        if interval.is_zero() {
            return Err(QuotaError::Zero);
        }
        if interval < Duration::from_nanos(1) {
            return Err(QuotaError::TooFast);
        }
        Quota::checked(duration_nanos(interval), 1)
    }

    /// The same rate with another burst: how many requests may come at once after a quiet
    /// time.
    pub fn burst(self, burst: u32) -> Result<Quota, QuotaError> {
        if burst == 0 {
            return Err(QuotaError::Zero);
        }
        Quota::checked(self.interval_ns, burst)
    }

    fn checked(interval_ns: u64, burst: u32) -> Result<Quota, QuotaError> {
        match interval_ns.checked_mul(u64::from(burst)) {
            Some(t) if t <= MAX_TOLERANCE_NS => Ok(Quota { interval_ns, burst }),
            _ => Err(QuotaError::TooLong),
        }
    }

    /// The time one token takes to come back.
    pub fn interval(&self) -> Duration {
        Duration::from_nanos(self.interval_ns)
    }

    /// How many requests may come at once.
    pub fn burst_size(&self) -> u32 {
        self.burst
    }

    /// The time the whole burst takes to come back: the quota's window.
    pub fn window(&self) -> Duration {
        Duration::from_nanos(self.tolerance_ns())
    }

    /// Rebuilds a quota from parts that came from a valid quota.
    pub(crate) fn from_parts(interval_ns: u64, burst: u32) -> Quota {
        Quota { interval_ns, burst }
    }

    pub(crate) fn interval_ns(&self) -> u64 {
        self.interval_ns
    }

    pub(crate) fn tolerance_ns(&self) -> u64 {
        self.interval_ns * u64::from(self.burst)
    }
}

impl fmt::Debug for Quota {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Quota")
            .field("interval", &self.interval())
            .field("burst", &self.burst)
            .finish()
    }
}

/// The outcome of one GCRA step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Admitted: store `new_tat`; the request may go after `wait_ns` (0: at once).
    Admit { new_tat: u64, wait_ns: u64 },
    /// Refused: the next admit is possible in `retry_after_ns`.
    Reject { retry_after_ns: u64 },
}

/// One GCRA step: a request at `now` against a limit whose TAT is `tat`.
///
/// `max_wait_ns` is how long the caller accepts to wait for its turn (0: admit only at once).
/// A request up to the clock slack early conforms (see the module docs). A `now` earlier than
/// a previous one (a clock that jumped back) is handled: within one window (the TAT no
/// further ahead than an admission can set) the TAT is never moved back, so such a step
/// admits at most what the slack allows; a jump back beyond that finds the limit whole on the
/// new time line (at most one burst more per jump), instead of refusing every request for
/// the length of the jump.
#[inline]
pub(crate) fn step(tat: u64, now: u64, interval: u64, tolerance: u64, max_wait_ns: u64) -> Step {
    step_within(tat, now, interval, tolerance, max_wait_ns, max_wait_ns)
}

/// [`step`] for a limit shared by callers that wait up to different bounds: `reach_ns` is the
/// longest of them (at least `max_wait_ns`), how far ahead of now any of them may have
/// reserved a turn.
#[inline]
pub(crate) fn step_within(
    tat: u64,
    now: u64,
    interval: u64,
    tolerance: u64,
    max_wait_ns: u64,
    reach_ns: u64,
) -> Step {
    // No admission sets a TAT further ahead than the horizon: one that is means the clock
    // went back, at an instant no one saw. The limit starts whole on the new time line (as it
    // would be a window after the jump), not spent until the old time comes again: a jump
    // back gives at most one burst more. (The Redis script applies the same rule, on Redis's
    // clock, which the script reads inside its atomic step: there a TAT beyond the horizon is
    // always a jump.) Here a `now` read before another thread set the TAT looks the same:
    // callers read the clock again, after the TAT, before they trust it (`step_checked`).
    step_checked(tat, now, interval, tolerance, max_wait_ns, reach_ns)
        .unwrap_or_else(|| step_fresh(now, interval, tolerance, max_wait_ns))
}

/// [`step_in_span`] for a caller that may hold a stale `now`: a TAT beyond the horizon has
/// the clock read again (`fresh_now`, after the TAT was read) before it counts as a clock
/// that went back, and only a TAT still beyond the fresh time's horizon does (the limit then
/// starts whole). Returns the step and the time it was made at.
#[inline]
pub(crate) fn step_rechecked(
    tat: u64,
    now: u64,
    interval: u64,
    tolerance: u64,
    max_wait_ns: u64,
    horizon: u64,
    fresh_now: impl FnOnce() -> u64,
) -> (Step, u64) {
    match step_in_span(tat, now, interval, tolerance, max_wait_ns, horizon) {
        Some(step) => (step, now),
        None => step_after_fresh_now(
            tat,
            now,
            interval,
            tolerance,
            max_wait_ns,
            horizon,
            fresh_now,
        ),
    }
}

/// The rare half of [`step_rechecked`], out of the admit path.
#[cold]
#[inline(never)]
fn step_after_fresh_now(
    tat: u64,
    now: u64,
    interval: u64,
    tolerance: u64,
    max_wait_ns: u64,
    horizon: u64,
    fresh_now: impl FnOnce() -> u64,
) -> (Step, u64) {
    let now = fresh_now().max(now);
    let step = step_in_span(tat, now, interval, tolerance, max_wait_ns, horizon)
        .unwrap_or_else(|| step_fresh(now, interval, tolerance, max_wait_ns));
    (step, now)
}

/// The step of a limit that is whole at `now` (a TAT beyond the horizon after a clock that
/// went back: the limit starts whole on the new time line).
#[inline]
pub(crate) fn step_fresh(now: u64, interval: u64, tolerance: u64, max_wait_ns: u64) -> Step {
    step_ahead(0, now, interval, tolerance, max_wait_ns)
}

/// How far ahead of now an admission can set a TAT, given the longest wait bound of the
/// callers sharing the limit: `tolerance + interval + reach`, plus the clock slack for reads
/// on two cores that come out of order (the horizon of [`step_checked`]).
#[inline]
pub(crate) fn span(interval: u64, tolerance: u64, reach_ns: u64) -> u64 {
    // A quota's tolerance and interval are each at most `MAX_TOLERANCE_NS` (2^58): their sum
    // with the slack cannot overflow; a wait bound can be anything.
    (tolerance + interval + CLOCK_SLACK_NS).saturating_add(reach_ns)
}

/// [`step_within`], or `None` for a TAT beyond the horizon of `now`: further ahead than any
/// admission can set it (`tolerance + reach + interval`, plus the clock slack for reads on two
/// cores that come out of order).
///
/// Either the clock went back, or `now` is stale: read by a thread that was descheduled
/// between reading the clock and reading the TAT, while other threads moved time on and
/// spent the limit. The two must not be confused, or a thread that was preempted for more
/// than one interval finds a spent limit whole and lets a burst more through. So a caller
/// that gets `None` reads the clock again, after the TAT (an acquire fence or load orders the
/// two: the thread that set the TAT read its clock before it), and only a TAT still beyond
/// the fresh time's horizon is a jump back ([`step_within`] then).
#[inline]
pub(crate) fn step_checked(
    tat: u64,
    now: u64,
    interval: u64,
    tolerance: u64,
    max_wait_ns: u64,
    reach_ns: u64,
) -> Option<Step> {
    let horizon = span(interval, tolerance, reach_ns.max(max_wait_ns));
    step_in_span(tat, now, interval, tolerance, max_wait_ns, horizon)
}

/// [`step_checked`] with the horizon given (at least the [`span`] of the limit's quota and
/// wait bounds): the admit path of a limit that keeps its span.
#[inline]
pub(crate) fn step_in_span(
    tat: u64,
    now: u64,
    interval: u64,
    tolerance: u64,
    max_wait_ns: u64,
    horizon: u64,
) -> Option<Step> {
    // Everything below is in "how far ahead of now": the TAT's lead (0 for a TAT in the
    // past, which is a whole limit).
    let ahead = tat.saturating_sub(now);
    if ahead > horizon {
        return None;
    }
    Some(step_ahead(ahead, now, interval, tolerance, max_wait_ns))
}

/// One GCRA step for a TAT `ahead` of `now`: the new TAT is `now + ahead + interval`, and the
/// request fits when that is no more than `tolerance` (plus the slack) ahead.
#[inline]
fn step_ahead(ahead: u64, now: u64, interval: u64, tolerance: u64, max_wait_ns: u64) -> Step {
    let new_ahead = ahead.saturating_add(interval);
    let new_tat = now.saturating_add(new_ahead);
    let slack = CLOCK_SLACK_NS.min(interval.saturating_sub(1));
    if new_ahead <= tolerance.saturating_add(slack) {
        Step::Admit {
            new_tat,
            wait_ns: 0,
        }
    } else {
        // The earliest instant at which this request fits in the burst is `new_tat -
        // tolerance`, this far from now.
        let wait = new_ahead - tolerance;
        if wait <= max_wait_ns {
            Step::Admit {
                new_tat,
                wait_ns: wait,
            }
        } else {
            Step::Reject {
                retry_after_ns: wait,
            }
        }
    }
}

/// A reserved turn given back (a waiter that went away): the TAT after it, or `None` to leave
/// it. `new_tat` is the TAT the reservation set, `wake` the instant its turn came.
///
/// The last turn reserved (the TAT is still the one it set) is always given back. An earlier
/// turn is given back too while it is still ahead (`wake > now`) and the limit is not whole,
/// so that waiters that go away in the order they came give back every turn, not only the
/// last. Such a turn was one interval of the TAT, so the limit never gets back more than was
/// reserved; but the waiters behind it keep their times, so each such give-back while a later
/// turn stays reserved lets at most one request more through, before that later turn.
#[inline]
pub(crate) fn refunded(tat: u64, new_tat: u64, interval: u64, wake: u64, now: u64) -> Option<u64> {
    (tat == new_tat || (wake > now && tat > now)).then(|| tat.saturating_sub(interval))
}

/// Requests that could be admitted at `now` against `tat`.
#[inline]
pub(crate) fn remaining(tat: u64, now: u64, interval: u64, tolerance: u64) -> u64 {
    let ahead = tat.saturating_sub(now);
    tolerance.saturating_sub(ahead) / interval
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn quota_constructors() {
        let q = Quota::per_second(3).unwrap();
        assert_eq!(q.interval_ns(), 333_333_333);
        assert_eq!(q.burst_size(), 3);
        assert_eq!(Quota::per_second(0), Err(QuotaError::Zero));
        assert_eq!(Quota::per_period(1, Duration::ZERO), Err(QuotaError::Zero));
        assert_eq!(
            Quota::per_period(2_000_000_000, Duration::from_secs(1)),
            Err(QuotaError::TooFast)
        );
        assert_eq!(
            Quota::with_period(Duration::from_secs(86_400 * 365 * 10)),
            Err(QuotaError::TooLong)
        );
        assert_eq!(Quota::with_period(Duration::ZERO), Err(QuotaError::Zero));
        assert_eq!(
            Quota::per_hour(1).unwrap().burst(u32::MAX),
            Err(QuotaError::TooLong)
        );
        assert_eq!(
            Quota::per_second(1).unwrap().burst(0),
            Err(QuotaError::Zero)
        );
        assert_eq!(
            Quota::per_minute(60).unwrap().window(),
            Duration::from_secs(60)
        );
        assert!(QuotaError::TooFast.to_string().contains("nanosecond"));
    }

    #[test]
    fn burst_then_one_per_interval() {
        // An interval of 11 ns: the slack is 10 ns.
        let (i, tol) = (11, 33);
        let mut tat = 0;
        let now = 1_000;
        for _ in 0..3 {
            match step(tat, now, i, tol, 0) {
                Step::Admit {
                    new_tat,
                    wait_ns: 0,
                } => tat = new_tat,
                s => panic!("{s:?}"),
            }
        }
        // The next token is due in 11 ns; the request conforms 10 ns early.
        assert_eq!(
            step(tat, now, i, tol, 0),
            Step::Reject { retry_after_ns: 11 }
        );
        assert_eq!(remaining(tat, now, i, tol), 0);
        assert!(matches!(
            step(tat, now + 1, i, tol, 0),
            Step::Admit { wait_ns: 0, .. }
        ));
        // A waiter within its bound is admitted with the wait to the exact edge.
        assert_eq!(
            step(tat, now, i, tol, 11),
            Step::Admit {
                new_tat: tat + 11,
                wait_ns: 11
            }
        );
        assert!(matches!(step(tat, now, i, tol, 10), Step::Reject { .. }));
    }

    #[test]
    fn clock_going_back_is_stricter() {
        let (i, tol) = (10, 30);
        let Step::Admit { new_tat, .. } = step(0, 1_000, i, tol, 0) else {
            panic!()
        };
        // The clock jumps back by 30 ns (within one window, `tol + i`): nothing panics, and
        // the limit is not refilled.
        let mut tat = new_tat;
        let mut admitted = 0;
        for _ in 0..10 {
            if let Step::Admit { new_tat, .. } = step(tat, 970, i, tol, 0) {
                tat = new_tat;
                admitted += 1;
            }
        }
        assert_eq!(admitted, 0);
        // A jump back beyond the horizon: the limit is whole on the new time line (one
        // burst), not spent until the old time comes again.
        assert_eq!(
            step(u64::MAX, 0, i, tol, 0),
            Step::Admit {
                new_tat: i,
                wait_ns: 0
            }
        );
        let mut tat = 1_000_000;
        let mut admitted = 0;
        for _ in 0..10 {
            if let Step::Admit { new_tat, .. } = step(tat, 1_000, i, tol, 0) {
                tat = new_tat;
                admitted += 1;
            }
        }
        assert_eq!(admitted, 3, "one burst on the new time line");
    }

    #[test]
    fn a_request_a_few_microseconds_early_at_the_rate_edge_conforms() {
        // 100 per second, burst 1: after a request at 1 s, the next is due at 1.01 s. Read
        // 3 µs early (a clock behind by that much), it is admitted, and the TAT moves from the
        // edge, not from the early reading.
        let (i, tol) = (10_000_000, 10_000_000);
        let Step::Admit { new_tat, .. } = step(0, 1_000_000_000, i, tol, 0) else {
            panic!()
        };
        assert_eq!(
            step(new_tat, 1_010_000_000 - 3_000, i, tol, 0),
            Step::Admit {
                new_tat: 1_020_000_000,
                wait_ns: 0
            }
        );
        // Beyond the slack, it is refused, with the time to the exact edge.
        assert_eq!(
            step(new_tat, 1_010_000_000 - 10_001, i, tol, 0),
            Step::Reject {
                retry_after_ns: 10_001
            }
        );
        // At one instant, exactly the burst: the slack is less than one interval.
        for i in [1, 2, 1_000, 10_000, 10_001, 1 << 20] {
            let tol = 3 * i;
            let mut tat = 0;
            let mut admitted = 0;
            for _ in 0..10 {
                if let Step::Admit { new_tat, .. } = step(tat, 1 << 40, i, tol, 0) {
                    tat = new_tat;
                    admitted += 1;
                }
            }
            assert_eq!(admitted, 3, "interval {i}");
        }
    }

    proptest! {
        /// Waiters reserved at one instant and all dropped, in any order, give back every
        /// turn: the TAT is back where it was, never below.
        #[test]
        fn dropped_waiters_give_back_every_turn_in_any_order(
            interval in 1u64..1_000_000,
            burst in 1u64..10,
            order in Just((0..40usize).collect::<Vec<_>>()).prop_shuffle(),
            n in 1usize..40,
        ) {
            let tol = interval * burst;
            let now = 1u64 << 40;
            let mut tat = 0;
            // The burst, at once.
            for _ in 0..burst {
                let Step::Admit { new_tat, .. } = step(tat, now, interval, tol, 0) else {
                    return Err(TestCaseError::fail("the burst"));
                };
                tat = new_tat;
            }
            let spent = tat;
            let mut turns = Vec::new();
            for _ in 0..n {
                let Step::Admit { new_tat, wait_ns } = step(tat, now, interval, tol, u64::MAX)
                else {
                    return Err(TestCaseError::fail("a waiter"));
                };
                prop_assert!(wait_ns > 0);
                turns.push((new_tat, now + wait_ns));
                tat = new_tat;
            }
            for &i in order.iter().filter(|&&i| i < n) {
                let (new_tat, wake) = turns[i];
                if let Some(t) = refunded(tat, new_tat, interval, wake, now) {
                    tat = t;
                }
            }
            prop_assert_eq!(tat, spent);
        }

        /// Over any sequence of request times (monotonic or not), the number admitted never
        /// exceeds `burst + (span + slack) / interval`, where span is the range of times seen
        /// (and the slack is less than one interval), while the clock never goes back by more
        /// than the horizon (`tolerance + interval`) behind the latest TAT. Each jump back
        /// beyond that starts a new time line with the limit whole: over the whole sequence,
        /// no more than `(1 + jumps) * burst + (forward + slack * (1 + jumps)) / interval`,
        /// where `forward` is the sum of the steps forward.
        #[test]
        fn never_over_admits(
            interval in 1u64..1_000_000,
            burst in 1u64..50,
            deltas in proptest::collection::vec(-5_000_000i64..5_000_000, 1..400),
        ) {
            let tol = interval * burst;
            let start: u64 = 1 << 40;
            let mut now = start;
            let mut max_now = start;
            let mut min_now = start;
            let mut forward = 0u64;
            let mut jumps = 0u64;
            let mut tat = 0;
            let mut admitted = 0u64;
            let slack = CLOCK_SLACK_NS.min(interval - 1);
            for d in deltas {
                now = now.saturating_add_signed(d);
                max_now = max_now.max(now);
                min_now = min_now.min(now);
                forward += d.max(0) as u64;
                if tat > now + tol + interval {
                    jumps += 1;
                }
                if let Step::Admit { new_tat, wait_ns } = step(tat, now, interval, tol, 0) {
                    prop_assert_eq!(wait_ns, 0);
                    tat = new_tat;
                    admitted += 1;
                }
                if jumps == 0 {
                    let allowed = burst + (max_now - min_now + slack) / interval;
                    prop_assert!(admitted <= allowed, "admitted {} > allowed {}", admitted, allowed);
                }
                let allowed = (1 + jumps) * burst + (forward + slack * (1 + jumps)) / interval;
                prop_assert!(admitted <= allowed, "admitted {} > allowed {} ({} jumps)", admitted, allowed, jumps);
            }
        }

        /// A rejection's retry_after is exact: at it the request is admitted, and one
        /// nanosecond before the slack's edge it is still refused.
        #[test]
        fn retry_after_is_exact(
            interval in 1u64..1_000_000,
            burst in 1u64..20,
            extra in 1u64..50,
            now in 0u64..1_000_000_000,
        ) {
            let tol = interval * burst;
            let mut tat = 0;
            for _ in 0..(burst + extra) {
                if let Step::Admit { new_tat, .. } = step(tat, now, interval, tol, 0) {
                    tat = new_tat;
                }
            }
            let Step::Reject { retry_after_ns } = step(tat, now, interval, tol, 0) else {
                return Err(TestCaseError::fail("expected a rejection"));
            };
            // Refused up to the slack before it, admitted from there on.
            let slack = CLOCK_SLACK_NS.min(interval - 1);
            prop_assert!(retry_after_ns > slack);
            let just_before = step(tat, now + retry_after_ns - slack - 1, interval, tol, 0);
            prop_assert_eq!(just_before, Step::Reject { retry_after_ns: slack + 1 });
            let admitted_at_retry = matches!(
                step(tat, now + retry_after_ns, interval, tol, 0),
                Step::Admit { wait_ns: 0, .. }
            );
            prop_assert!(admitted_at_retry);
        }
    }
}

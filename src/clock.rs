//! The crate's time source: a cheap monotonic nanosecond counter.
//!
//! Reading the clock is the largest cost of a cheap admit decision (`Instant::now` costs about
//! 24 ns where a TSC read costs about 9: `overhead/clock/*` in BENCHMARKS.md), so every time-based layer reads a [`Clock`] at most
//! once per request, and the default one is fast:
//!
//! - [`Clock::fast`] (the default with the `fast-clock` feature): the CPU's time-stamp counter
//!   through `quanta`, calibrated against the OS clock.
//! - [`Clock::std`] reads `std::time::Instant`.
//! - [`Clock::tokio`] reads `tokio::time::Instant`, which **follows tokio's paused time**: use it in
//!   tests that call `tokio::time::pause()` and `advance()`.
//! - [`Clock::manual`] is a clock that moves only when told to, for tests without a runtime.
//!
//! All of them count nanoseconds from the moment the clock was made. Waiting, where a layer
//! waits, always uses `tokio::time`.
//!
//! # Across threads
//!
//! Each clock is monotonic on one thread. The fast clock's reads are not fenced, so two reads
//! on two cores can come out of order by a microsecond or two (measured: up to 1.6 µs), where
//! `Clock::std` never steps back. A fenced read would cost more than the time it saves, so the
//! layers tolerate such steps instead: the rate limiter admits a request that conforms up to
//! 10 µs early (less than one interval), so a clock a little behind never refuses a client
//! that sends at exactly the quota's rate; see [`rate_limit`](crate::rate_limit).
//!
//! ```
//! use std::time::Duration;
//! use tower_bulwark::clock::Clock;
//!
//! let (clock, hand) = Clock::manual();
//! assert_eq!(clock.now_nanos(), 0);
//! hand.advance(Duration::from_millis(5));
//! assert_eq!(clock.now_nanos(), 5_000_000);
//! ```

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A monotonic nanosecond time source. Cheap to clone; clones read the same time line.
#[derive(Clone)]
pub struct Clock {
    inner: Inner,
}

#[derive(Clone)]
enum Inner {
    #[cfg(feature = "fast-clock")]
    Fast {
        clock: quanta::Clock,
        base: u64,
    },
    Std(std::time::Instant),
    Tokio(tokio::time::Instant),
    Manual(Arc<AtomicU64>),
}

impl Clock {
    /// The default clock: [`Clock::fast`] with the `fast-clock` feature (on by default),
    /// [`Clock::std`] without it.
    pub fn new() -> Clock {
        #[cfg(feature = "fast-clock")]
        {
            Clock::fast()
        }
        #[cfg(not(feature = "fast-clock"))]
        {
            Clock::std()
        }
    }

    /// A clock that reads the CPU's time-stamp counter (through `quanta`) where it is reliable,
    /// and the OS monotonic clock elsewhere.
    #[cfg(feature = "fast-clock")]
    #[cfg_attr(docsrs, doc(cfg(feature = "fast-clock")))]
    pub fn fast() -> Clock {
        let clock = quanta::Clock::new();
        let base = clock.raw();
        Clock {
            inner: Inner::Fast { clock, base },
        }
    }

    /// A clock that reads `std::time::Instant`.
    pub fn std() -> Clock {
        Clock {
            inner: Inner::Std(std::time::Instant::now()),
        }
    }

    /// A clock that reads `tokio::time::Instant`, so it stands still under
    /// `tokio::time::pause()` and moves with `advance()`.
    ///
    /// Its zero is tokio's time when the clock is made: under a paused runtime, make it inside
    /// the test, after `pause()`.
    pub fn tokio() -> Clock {
        Clock {
            inner: Inner::Tokio(tokio::time::Instant::now()),
        }
    }

    /// A clock that moves only through its [`ManualClock`] hand. Starts at zero.
    pub fn manual() -> (Clock, ManualClock) {
        let t = Arc::new(AtomicU64::new(0));
        (
            Clock {
                inner: Inner::Manual(t.clone()),
            },
            ManualClock(t),
        )
    }

    /// Nanoseconds since this clock was made.
    #[inline]
    pub fn now_nanos(&self) -> u64 {
        match &self.inner {
            #[cfg(feature = "fast-clock")]
            Inner::Fast { clock, base } => clock.delta_as_nanos(*base, clock.raw()),
            Inner::Std(base) => duration_nanos(base.elapsed()),
            Inner::Tokio(base) => duration_nanos(base.elapsed()),
            Inner::Manual(t) => t.load(Ordering::Acquire),
        }
    }

    /// Whether `other` reads the same time line: a clone of this clock, or one of the same
    /// kind made at the same instant.
    pub(crate) fn same_line(&self, other: &Clock) -> bool {
        match (&self.inner, &other.inner) {
            #[cfg(feature = "fast-clock")]
            (Inner::Fast { base: a, .. }, Inner::Fast { base: b, .. }) => a == b,
            (Inner::Std(a), Inner::Std(b)) => a == b,
            (Inner::Tokio(a), Inner::Tokio(b)) => a == b,
            (Inner::Manual(a), Inner::Manual(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }

    /// The kind of a clock that reads the system's time (`"fast"` or `"std"`), `None` for the
    /// tokio and manual clocks, whose time is a test's.
    pub(crate) fn system_kind(&self) -> Option<&'static str> {
        match &self.inner {
            #[cfg(feature = "fast-clock")]
            Inner::Fast { .. } => Some("fast"),
            Inner::Std(_) => Some("std"),
            Inner::Tokio(_) | Inner::Manual(_) => None,
        }
    }

    /// The `tokio::time::Instant` that corresponds to `nanos` on this clock, for sleeping until
    /// a deadline computed in this clock's time.
    pub fn deadline_after(&self, nanos_from_now: u64) -> tokio::time::Instant {
        tokio::time::Instant::now() + Duration::from_nanos(nanos_from_now)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.inner {
            #[cfg(feature = "fast-clock")]
            Inner::Fast { .. } => "fast",
            Inner::Std(_) => "std",
            Inner::Tokio(_) => "tokio",
            Inner::Manual(_) => "manual",
        };
        f.debug_struct("Clock")
            .field("kind", &kind)
            .field("now_nanos", &self.now_nanos())
            .finish()
    }
}

/// The hand of a [`Clock::manual`] clock.
#[derive(Clone, Debug)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        self.0.fetch_add(duration_nanos(by), Ordering::AcqRel);
    }

    /// Sets the clock to `nanos`. Setting it backwards is allowed: it models a clock that
    /// jumps, which every layer must survive.
    pub fn set_nanos(&self, nanos: u64) {
        self.0.store(nanos, Ordering::Release);
    }

    /// The clock's current reading.
    pub fn now_nanos(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }
}

/// A duration as whole nanoseconds, saturating at `u64::MAX` (about 584 years).
#[inline]
pub(crate) fn duration_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_clocks_agree_with_std_instant() {
        // Spin (no sleep) until std's clock has moved 2 ms; a system clock must have moved
        // about as much, not stood still and not raced ahead. Std's readings bracket the
        // clock's (outer) and are bracketed by them (inner), so preemption cannot fail this.
        for c in [Clock::new(), Clock::std()] {
            let outer = std::time::Instant::now();
            let a = c.now_nanos();
            let inner = std::time::Instant::now();
            while inner.elapsed() < std::time::Duration::from_millis(2) {
                std::hint::spin_loop();
            }
            let inner_ns = inner.elapsed().as_nanos() as u64;
            let b = c.now_nanos();
            let outer_ns = outer.elapsed().as_nanos() as u64;
            let moved = b - a;
            assert!(
                moved >= inner_ns * 3 / 4,
                "{moved} ns while std moved {inner_ns}"
            );
            assert!(
                moved <= outer_ns * 5 / 4 + 100_000,
                "{moved} ns while std moved {outer_ns}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn tokio_clock_follows_paused_time() {
        let c = Clock::tokio();
        assert_eq!(c.now_nanos(), 0);
        tokio::time::advance(Duration::from_millis(3)).await;
        assert_eq!(c.now_nanos(), 3_000_000);
    }

    #[test]
    fn manual_clock_jumps() {
        let (c, hand) = Clock::manual();
        hand.set_nanos(100);
        assert_eq!(c.now_nanos(), 100);
        hand.set_nanos(50);
        assert_eq!(c.now_nanos(), 50);
        assert_eq!(duration_nanos(Duration::MAX), u64::MAX);
    }
}

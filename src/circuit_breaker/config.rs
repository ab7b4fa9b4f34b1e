//! [`BreakerConfig`]: when a breaker trips, how long it stays open, how it probes.

use std::fmt;
use std::time::Duration;

use crate::clock::{duration_nanos, Clock};

/// The largest count window, in calls.
pub(crate) const MAX_WINDOW_CALLS: u32 = 1 << 24;
/// The largest number of buckets of a time window.
pub(crate) const MAX_BUCKETS: u32 = 1 << 12;
/// The largest number of half-open probes (the state word keeps them in 16 bits).
pub(crate) const MAX_PROBES: u32 = u16::MAX as u32;
/// The largest number of per-key breakers.
pub(crate) const MAX_KEYS: usize = 1 << 20;
/// The most memory the windows of a keyed breaker's table may take together (allocated when
/// the layer is built): 256 MiB.
pub(crate) const MAX_WINDOWS_BYTES: u64 = 256 << 20;
/// The longest open time and maximum open time: 365 days. The breaker's state word holds
/// the end of an open time in 48 bits of microseconds (about 8.9 years of its clock); with
/// jitter an open time is at most twice this, so its end fits for the first 6.9 years of
/// the layer's clock.
pub const MAX_OPEN_TIME: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// The sliding window over which failure and slow-call rates are computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Window {
    /// The last `n` completed calls.
    Count(u32),
    /// The calls completed in the last `span`, kept in `buckets` buckets of `span / buckets`
    /// each: a bucket leaves the window as a whole when its time is past.
    Time {
        /// How far back the window reaches.
        span: Duration,
        /// How many buckets the span is cut into (the window's resolution).
        buckets: u32,
    },
}

/// What a call abandoned after it started (its response future dropped before the outcome:
/// a timeout above the breaker fired, the client went away, a hedge lost) counts as. Set with
/// [`BreakerConfig::abandoned`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Abandoned {
    /// Neither success nor failure; a half-open probe frees its slot (the default). An
    /// abandoned call says nothing certain about the dependency (the caller may have gone
    /// away for its own reasons). Put a timeout *below* the breaker so that a hung call is an
    /// error the breaker counts, or use a slow-call rate: with slow-call detection on, a call
    /// dropped after it has run at least the slow-call threshold counts as a slow call (a
    /// half-open probe: as a failed probe) under either policy, so a timeout *above* the
    /// breaker that cuts hung calls short trips the slow-call rate.
    #[default]
    Ignore,
    /// A failure: counted in the window and the consecutive failures while closed, and a
    /// failed probe (the breaker opens again) while half-open. For stacks whose timeout is
    /// *above* the breaker, where an abandoned call is a call that took too long.
    Failure,
}

/// How a [`CircuitBreakerLayer`](super::CircuitBreakerLayer) decides to trip, how long it
/// stays open and how it probes.
///
/// A breaker trips when **any** of its conditions holds, checked each time a call's outcome
/// is recorded:
///
/// - [`consecutive_failures`](Self::consecutive_failures): `n` failures in a row;
/// - [`failure_rate`](Self::failure_rate): failures / calls ≥ `r` over the [`Window`], once
///   the window holds at least [`minimum_calls`](Self::minimum_calls) calls;
/// - [`slow_call_rate`](Self::slow_call_rate): calls that took at least a threshold (success
///   or not) / calls ≥ `s` over the same window, with the same minimum.
///
/// Start from one condition and add others with the `or_` methods. The defaults
/// (`BreakerConfig::default()`, the same as `failure_rate(0.5)`): a window of the last 100
/// calls, at least 20 calls, open for 5 s, then ×2 on each failed probe round (or trip soon
/// after closing) up to 60 s, ±10% jitter, 3 half-open probes.
///
/// Nothing is checked until the layer is built:
/// [`CircuitBreakerLayer::new`](super::CircuitBreakerLayer::new) refuses a bad configuration
/// with a [`BreakerConfigError`].
///
/// ```
/// use std::time::Duration;
/// use tower_bulwark::circuit_breaker::{BreakerConfig, CircuitBreakerLayer};
///
/// let config = BreakerConfig::failure_rate(0.5)
///     .window(50)
///     .minimum_calls(10)
///     .or_consecutive_failures(5)
///     .or_slow_call_rate(0.8, Duration::from_secs(2))
///     .open_time(Duration::from_secs(10));
/// assert!(CircuitBreakerLayer::new(config).is_ok());
/// assert!(CircuitBreakerLayer::new(BreakerConfig::failure_rate(1.5)).is_err());
/// ```
#[derive(Clone)]
pub struct BreakerConfig {
    pub(crate) failure_rate: Option<f64>,
    pub(crate) consecutive_failures: Option<u32>,
    pub(crate) slow_call: Option<(f64, Duration)>,
    pub(crate) window: Window,
    pub(crate) minimum_calls: u32,
    pub(crate) open_time: Duration,
    pub(crate) max_open_time: Duration,
    pub(crate) multiplier: f64,
    pub(crate) jitter: f64,
    pub(crate) probes: u32,
    pub(crate) max_keys: usize,
    pub(crate) clock: Clock,
    pub(crate) seed: Option<u64>,
    pub(crate) abandoned: Abandoned,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failure_rate: Some(0.5),
            consecutive_failures: None,
            slow_call: None,
            window: Window::Count(100),
            minimum_calls: 20,
            open_time: Duration::from_secs(5),
            max_open_time: Duration::from_secs(60),
            multiplier: 2.0,
            jitter: 0.1,
            probes: 3,
            max_keys: 1024,
            clock: Clock::new(),
            seed: None,
            abandoned: Abandoned::Ignore,
        }
    }
}

impl fmt::Debug for BreakerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BreakerConfig")
            .field("failure_rate", &self.failure_rate)
            .field("consecutive_failures", &self.consecutive_failures)
            .field("slow_call", &self.slow_call)
            .field("window", &self.window)
            .field("minimum_calls", &self.minimum_calls)
            .field("open_time", &self.open_time)
            .field("max_open_time", &self.max_open_time)
            .field("multiplier", &self.multiplier)
            .field("jitter", &self.jitter)
            .field("probes", &self.probes)
            .field("max_keys", &self.max_keys)
            .field("clock", &self.clock)
            .field("abandoned", &self.abandoned)
            .finish_non_exhaustive()
    }
}

impl BreakerConfig {
    /// Trips when the failure rate over the window reaches `rate` (in `0.0..=1.0`), with the
    /// other settings at their defaults.
    pub fn failure_rate(rate: f64) -> Self {
        BreakerConfig {
            failure_rate: Some(rate),
            ..Self::default()
        }
    }

    /// Trips after `n` failures in a row (and on nothing else, unless added with `or_`).
    pub fn consecutive_failures(n: u32) -> Self {
        BreakerConfig {
            failure_rate: None,
            consecutive_failures: Some(n),
            ..Self::default()
        }
    }

    /// Trips when the share of calls that took `threshold` or longer (success or not) reaches
    /// `rate` over the window (and on nothing else, unless added with `or_`).
    pub fn slow_call_rate(rate: f64, threshold: Duration) -> Self {
        BreakerConfig {
            failure_rate: None,
            slow_call: Some((rate, threshold)),
            ..Self::default()
        }
    }

    /// Also trips when the failure rate over the window reaches `rate`.
    pub fn or_failure_rate(mut self, rate: f64) -> Self {
        self.failure_rate = Some(rate);
        self
    }

    /// Also trips after `n` failures in a row.
    pub fn or_consecutive_failures(mut self, n: u32) -> Self {
        self.consecutive_failures = Some(n);
        self
    }

    /// Also trips when the slow-call rate reaches `rate`; a call is slow when it takes
    /// `threshold` or longer, whatever its outcome (or is dropped after running that long).
    /// The threshold is also how long half-open probes may be out (see
    /// [`half_open_probes`](Self::half_open_probes)).
    pub fn or_slow_call_rate(mut self, rate: f64, threshold: Duration) -> Self {
        self.slow_call = Some((rate, threshold));
        self
    }

    /// A count window of the last `calls` calls (default 100).
    pub fn window(mut self, calls: u32) -> Self {
        self.window = Window::Count(calls);
        self
    }

    /// A time window: the calls of the last `span`, in `buckets` buckets.
    pub fn time_window(mut self, span: Duration, buckets: u32) -> Self {
        self.window = Window::Time { span, buckets };
        self
    }

    /// Rates are not evaluated before the window holds this many calls (default 20).
    pub fn minimum_calls(mut self, calls: u32) -> Self {
        self.minimum_calls = calls;
        self
    }

    /// How long the breaker stays open after it trips from closed (default 5 s; at most
    /// [`MAX_OPEN_TIME`], 365 days), unless it trips again soon after closing (see
    /// [`backoff_multiplier`](Self::backoff_multiplier)).
    pub fn open_time(mut self, d: Duration) -> Self {
        self.open_time = d;
        self
    }

    /// The longest open time, however many times it grew (default 60 s; at most
    /// [`MAX_OPEN_TIME`], 365 days). The grown open time is capped at this before jitter, so
    /// no number of failed rounds or repeated trips can overflow it.
    pub fn max_open_time(mut self, d: Duration) -> Self {
        self.max_open_time = d;
        self
    }

    /// Each failed probe round multiplies the open time by this (≥ 1.0, default 2.0), and so
    /// does a trip from closed that comes before the breaker has stayed closed for the open
    /// time it last served (before jitter); a trip after that opens for the base
    /// [`open_time`](Self::open_time) again.
    pub fn backoff_multiplier(mut self, m: f64) -> Self {
        self.multiplier = m;
        self
    }

    /// The open time is drawn uniformly from `[d·(1−j), d·(1+j)]` for `j` in `0.0..=1.0`
    /// (default 0.1), so breakers in many replicas do not probe in lockstep.
    pub fn jitter(mut self, j: f64) -> Self {
        self.jitter = j;
        self
    }

    /// Half-open admits at most `k` probes at once, and closes after `k` successes (default 3).
    ///
    /// Probes may be out for a bounded time, so that half-open never sticks on probes that
    /// never answer: the slow-call threshold when slow-call detection is on, otherwise the
    /// open time the breaker has just served (before jitter; it grows with each failed round,
    /// so a dependency that is slow but healthy is given longer each time). When every slot
    /// is taken and even the latest probe has been out longer than that, the round has failed:
    /// the next caller finds the breaker open again, for longer, as after a failed probe. A
    /// probe that waits on the dependency's readiness longer than that fails its round
    /// whatever the other slots hold (a dependency that is never ready), and its caller is
    /// woken then and refused. A slot claimed by a service made ready and then neither called nor dropped is not a
    /// probe: past the limit it is given to the next caller, and the round goes on (see the
    /// service's `# Readiness`).
    pub fn half_open_probes(mut self, k: u32) -> Self {
        self.probes = k;
        self
    }

    /// For [`CircuitBreakerLayer::keyed`](super::CircuitBreakerLayer::keyed): how many keys get
    /// a breaker of their own (default 1024, rounded up to a power of two). Each has its own
    /// window, allocated when the layer is built; together they may take at most 256 MiB
    /// (a count window costs about a quarter of a byte per call, plus 128 bytes), or the
    /// layer is refused with [`BreakerConfigError::WindowsTooLarge`].
    pub fn max_keys(mut self, n: usize) -> Self {
        self.max_keys = n;
        self
    }

    /// The time source (default [`Clock::new`], fast). Tests under tokio's paused time use
    /// `.clock(Clock::tokio())`.
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// What a call abandoned after it started counts as (default [`Abandoned::Ignore`]).
    pub fn abandoned(mut self, abandoned: Abandoned) -> Self {
        self.abandoned = abandoned;
        self
    }

    /// Seeds the jitter's random numbers, for reproducible tests (default: a random seed per
    /// layer).
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Checks the configuration; [`CircuitBreakerLayer::new`](super::CircuitBreakerLayer::new)
    /// calls this.
    pub fn validate(&self) -> Result<(), BreakerConfigError> {
        use BreakerConfigError as E;
        let rate_ok = |r: f64| (0.0..=1.0).contains(&r);
        if let Some(r) = self.failure_rate {
            if !rate_ok(r) {
                return Err(E::FailureRate(r));
            }
        }
        if let Some((r, t)) = self.slow_call {
            if !rate_ok(r) {
                return Err(E::SlowCallRate(r));
            }
            if t.is_zero() {
                return Err(E::SlowCallThreshold);
            }
        }
        if self.consecutive_failures == Some(0) {
            return Err(E::ConsecutiveFailures);
        }
        if self.failure_rate.is_none()
            && self.slow_call.is_none()
            && self.consecutive_failures.is_none()
        {
            return Err(E::NoCondition);
        }
        let window_calls = match self.window {
            Window::Count(n) => {
                if n == 0 || n > MAX_WINDOW_CALLS {
                    return Err(E::Window);
                }
                Some(n)
            }
            Window::Time { span, buckets } => {
                if buckets == 0
                    || buckets > MAX_BUCKETS
                    || duration_nanos(span) < u64::from(buckets)
                {
                    return Err(E::Window);
                }
                None
            }
        };
        if self.minimum_calls == 0 || window_calls.is_some_and(|n| self.minimum_calls > n) {
            return Err(E::MinimumCalls);
        }
        if self.open_time > MAX_OPEN_TIME {
            return Err(E::OpenTimeTooLong {
                field: "open_time",
                value: self.open_time,
            });
        }
        if self.max_open_time > MAX_OPEN_TIME {
            return Err(E::OpenTimeTooLong {
                field: "max_open_time",
                value: self.max_open_time,
            });
        }
        if self.open_time.is_zero() || self.max_open_time < self.open_time {
            return Err(E::OpenTime);
        }
        if !(self.multiplier >= 1.0 && self.multiplier.is_finite()) {
            return Err(E::Multiplier(self.multiplier));
        }
        if !rate_ok(self.jitter) {
            return Err(E::Jitter(self.jitter));
        }
        if self.probes == 0 || self.probes > MAX_PROBES {
            return Err(E::Probes);
        }
        if self.max_keys == 0 || self.max_keys > MAX_KEYS {
            return Err(E::MaxKeys);
        }
        Ok(())
    }

    /// [`validate`](Self::validate), and for a keyed layer the bound on its windows: every
    /// key's breaker has its own window, allocated when the layer is built.
    pub(crate) fn validate_keyed(&self) -> Result<(), BreakerConfigError> {
        use BreakerConfigError as E;
        self.validate()?;
        let per_key: u64 = match self.window {
            // The failure and slow-call rings, of twice the window (a power of two, at
            // least 64 bits), and the head on its own cache line.
            Window::Count(n) => (2 * u64::from(n)).next_power_of_two().max(64) / 8 * 2 + 128,
            Window::Time { buckets, .. } => u64::from(buckets) * 24 + 64,
        };
        let keys = self.max_keys.next_power_of_two() as u64;
        if keys.saturating_mul(per_key) > MAX_WINDOWS_BYTES {
            return Err(E::WindowsTooLarge {
                bytes: keys.saturating_mul(per_key),
            });
        }
        Ok(())
    }
}

/// Why a [`BreakerConfig`] was refused.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub enum BreakerConfigError {
    /// The failure rate is outside `0.0..=1.0` (or NaN).
    FailureRate(f64),
    /// The slow-call rate is outside `0.0..=1.0` (or NaN).
    SlowCallRate(f64),
    /// The slow-call threshold is zero.
    SlowCallThreshold,
    /// `consecutive_failures` is zero.
    ConsecutiveFailures,
    /// No trip condition is set.
    NoCondition,
    /// A count window of zero calls or more than 2^24, or a time window with zero buckets,
    /// more than 4096, or a span shorter than one nanosecond per bucket.
    Window,
    /// `minimum_calls` is zero, or larger than the count window.
    MinimumCalls,
    /// The open time is zero, or the maximum open time is shorter than it.
    OpenTime,
    /// `open_time` or `max_open_time` (named by `field`) is longer than
    /// [`MAX_OPEN_TIME`] (365 days).
    OpenTimeTooLong {
        /// The setting: `"open_time"` or `"max_open_time"`.
        field: &'static str,
        /// The value given.
        value: Duration,
    },
    /// The backoff multiplier is below 1.0, infinite or NaN.
    Multiplier(f64),
    /// The jitter is outside `0.0..=1.0` (or NaN).
    Jitter(f64),
    /// Zero half-open probes, or more than 65535.
    Probes,
    /// `max_keys` is zero or more than 2^20.
    MaxKeys,
    /// The windows of `max_keys` breakers (rounded up to a power of two), all allocated when
    /// the layer is built, would take more than 256 MiB together: a smaller window or fewer
    /// keys.
    WindowsTooLarge {
        /// About what they would take, in bytes.
        bytes: u64,
    },
}

impl fmt::Display for BreakerConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::FailureRate(r) => write!(f, "failure rate {r} is outside 0..=1"),
            Self::SlowCallRate(r) => write!(f, "slow-call rate {r} is outside 0..=1"),
            Self::SlowCallThreshold => f.write_str("slow-call threshold is zero"),
            Self::ConsecutiveFailures => f.write_str("consecutive failures is zero"),
            Self::NoCondition => f.write_str("no trip condition is set"),
            Self::Window => f.write_str("window is empty or too large"),
            Self::WindowsTooLarge { bytes } => write!(
                f,
                "the windows of max_keys breakers would take about {} MiB (at most 256 MiB): \
                 use a smaller window or fewer keys",
                bytes >> 20
            ),
            Self::MinimumCalls => {
                f.write_str("minimum calls is zero or larger than the count window")
            }
            Self::OpenTime => f.write_str("open time is zero or longer than the maximum open time"),
            Self::OpenTimeTooLong { field, value } => write!(
                f,
                "{field} {value:?} is longer than the longest open time, {MAX_OPEN_TIME:?} (365 days)"
            ),
            Self::Multiplier(m) => write!(f, "backoff multiplier {m} is below 1 or not finite"),
            Self::Jitter(j) => write!(f, "jitter {j} is outside 0..=1"),
            Self::Probes => f.write_str("half-open probes must be in 1..=65535"),
            Self::MaxKeys => f.write_str("max keys must be in 1..=2^20"),
        }
    }
}

impl std::error::Error for BreakerConfigError {}

//! Adaptive limits: AIMD and gradient, as pure arithmetic over windows of latency samples.
//!
//! Each completed request gives a sample (its latency from admission to completion, and
//! whether it failed). Samples are summed in a window (a minimum duration and a minimum
//! count); the completion that closes a window folds it into the algorithm, which returns the
//! next limit. A sample is a failure when the service below returned an error; with
//! [`hold_until_body_end`](super::BackpressureLayer::hold_until_body_end), also when the
//! response is a 5xx, its body fails or its trailers carry a failing `grpc-status`; its
//! latency is still the dependency's, to the response head (the permit is held to the end of
//! the body, the latency is not). A request dropped before its response counts as its
//! [`Dropped`] policy says (by default a failure once it has run 100 ms); a body dropped
//! after its head counts as its head. A window's failures cut the limit only when more than
//! its [`failure rate`](Adaptive::failure_rate) of its samples failed (default a tenth):
//! fewer are background errors, not overload. Until the first
//! sign of congestion the limit starts slowly, as TCP does: it doubles every round trip, and
//! it does so again to come back from a cut made by failures. The arithmetic ([`Aimd::update`],
//! [`Gradient::update`]) takes nanoseconds and counts in and gives a limit out, with no clock
//! and no runtime.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use super::error::ConfigError;
use super::state::{Shared, MAX_LIMIT};
use crate::clock::{duration_nanos, Clock};

/// An adaptive limit: an algorithm, the bounds it moves the limit between, and its window.
///
/// Build one with [`Adaptive::aimd`] or [`Adaptive::gradient`] and pass it to
/// [`BackpressureLayer::adaptive`](super::BackpressureLayer::adaptive), which checks it.
///
/// Defaults: floor 1, ceiling 1024, initial limit 64 with slow start on, windows of at least
/// 100 ms and 10 samples, failures a sign of overload above a tenth of a window
/// ([`failure_rate`](Self::failure_rate)), dropped requests [`Dropped::FailureAfter`] 100 ms,
/// the crate's default [`Clock`].
///
/// # Samples
///
/// Each completed request gives a sample: its latency from admission to completion, and
/// whether it failed. A sample is a failure when the service below returned an error; with
/// [`hold_until_body_end`](super::BackpressureLayer::hold_until_body_end), also when the
/// response is a 5xx, its body fails, or its trailers carry a failing `grpc-status` (or what
/// the layer's classifier calls a failure,
/// [`classify_body_trailers`](crate::classify::Classify::classify_body_trailers)). Its
/// latency is the dependency's, from admission to the response head, also with
/// `hold_until_body_end`: the permit is held until the end of the body, but how fast a client
/// reads its body says nothing about the dependency, so slow readers do not pull the limit
/// down for everyone (the sample is taken when the body ends, with the latency and outcome
/// read at the head, one clock read as without the body hold). A request dropped before its
/// response (the caller timed out or went away while the dependency had not answered) gives
/// the sample its [`Dropped`] policy says: by default a failure when it had run at least 100
/// ms, none when it was dropped sooner. So a dependency that hangs while its callers time out
/// lowers the limit, while a client that hangs up early says nothing about the dependency. A
/// body dropped after its head (a client closing a server-sent-event stream, or a streaming
/// response it no longer wants) is not a failure of the dependency: its sample is its head's
/// (a success unless the head was a failure). Samples are summed in a window; the completion that closes a window folds
/// it into the algorithm, which gives the next limit. The algorithms are pure arithmetic
/// ([`Aimd::update`], [`Gradient::update`]): nanoseconds and counts in, a limit out.
///
/// # Failures
///
/// A failure is a sign of overload only in numbers: every service answers some requests
/// with errors that have nothing to do with load (bad input, a missing row, one broken code
/// path), and if each window holding one cut the limit, a steady trickle of them (1% of a
/// busy service's answers is a failure in every window) would drive it to its floor while
/// the dependency is healthy. So a window's failures count, cutting the limit (by the
/// algorithm's `backoff`) and ending slow start, only when more than
/// [`failure_rate`](Self::failure_rate) of its samples failed (default: a tenth). A window
/// with fewer is read as a healthy window: its latency counts, and the limit grows as it
/// would without them. An outage, a dependency that hangs while its callers time out, or
/// one that sheds load fails far more than a tenth of a window, and is cut at its first
/// window, as before.
///
/// # Slow start
///
/// A limit learned window by window grows by about one per window: from the initial 64 to a
/// dependency that serves 500 at once would take 45 s of refused load. So, as TCP does,
/// the limit starts in *slow start* (on by default; [`slow_start`](Self::slow_start)): a
/// window also closes as soon as it holds as many samples as the limit (one round trip of
/// the dependency), and each window that used at least half of the limit doubles it. Slow
/// start ends at the first sign of congestion: failures (above the
/// [failure rate](Self#failures); the algorithm backs off), a window
/// whose latency (the mean of its faster half of requests, see
/// [A window's latency](Gradient#a-windows-latency)) rose half again above the no-load
/// latency (that of windows without queueing, see [`Gradient`]; the limit is cut by the
/// ratio of the two, to about what the dependency served without queueing), or a window in
/// which AIMD's latency threshold backs off. A mean is compared with a mean, so latency that
/// merely varies from request to request does not end it, nor do the few slow requests a
/// window of a healthy dependency holds. An idle window changes nothing, so a limit that
/// waited idle at its initial value still doubles every round trip when a sudden load comes:
/// with a dependency of 10 ms, from 64 to 1024 in 40 ms. With the initial 64, a sudden load
/// of twice the capacity of a dependency that serves 100 at once in 10 ms, or 400 at once in
/// 20 ms, is served at 95% or more of what a fixed limit at that capacity serves, from the
/// first second on.
///
/// Slow start also brings the limit back after failures. Windows with failures (above the
/// failure rate) cut it (by
/// the algorithm's `backoff` each, so a 2 s outage at 100 ms windows takes it from 50 to
/// about 6); the level the first cut of such a run left is remembered, and once a window
/// without failures comes, slow start resumes, doubling every round trip up to that level,
/// where it ends and the algorithm's own steps go on (a latency rise ends it sooner, as
/// above). A dependency that failed fast for a while, with no load problem, is thus served at
/// its capacity again within a few round trips of healing (about 250 ms with 100 ms windows
/// and a 10 ms dependency), not one step per window for seconds; a dependency whose failures
/// come from load is brought back to just under where they began, and cut again if they do.
/// With slow start off ([`slow_start(false)`](Self::slow_start)), neither happens.
///
/// Under tokio's paused time, measure on tokio's clock: `.clock(Clock::tokio())`.
///
/// ```
/// use std::time::Duration;
/// use tower_bulwark::backpressure::{Adaptive, BackpressureLayer, Gradient};
///
/// let layer = BackpressureLayer::adaptive(
///     Adaptive::gradient(Gradient::default())
///         .floor(4)
///         .ceiling(256)
///         .initial(32)
///         .window(Duration::from_millis(250)),
/// )
/// .expect("a valid configuration");
/// assert_eq!(layer.handle().limit(), 32);
/// ```
#[derive(Clone)]
pub struct Adaptive {
    pub(crate) algorithm: Algorithm,
    pub(crate) floor: usize,
    pub(crate) ceiling: usize,
    pub(crate) initial: usize,
    pub(crate) window: Duration,
    pub(crate) min_samples: u32,
    pub(crate) clock: Option<Clock>,
    pub(crate) dropped: Dropped,
    pub(crate) slow_start: bool,
    pub(crate) failure_rate: f64,
}

/// What a request dropped before its response (its response future dropped: the caller
/// timed out or went away while the dependency had not answered) counts as in an adaptive
/// limit's samples. Set with [`Adaptive::dropped`].
///
/// A response body dropped before its end, with
/// [`hold_until_body_end`](super::BackpressureLayer::hold_until_body_end), is not covered:
/// the dependency did answer, and the sample is that of its head (a client closing a stream
/// says nothing about the dependency).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Dropped {
    /// No sample. A dependency that hangs while its callers time out then gives no sample at
    /// all, and the limit never comes down.
    Ignore,
    /// A failed sample (with the time it ran as its latency) when the request had held its
    /// permit at least this long; no sample when it was dropped sooner. The default is 100
    /// ms: longer than a healthy dependency of most services takes, shorter than most
    /// callers' timeouts. Set it just under your callers' timeout.
    FailureAfter(Duration),
}

impl Default for Dropped {
    fn default() -> Self {
        Dropped::FailureAfter(Duration::from_millis(100))
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Algorithm {
    Aimd(Aimd),
    Gradient(Gradient),
}

impl Adaptive {
    fn with(algorithm: Algorithm) -> Adaptive {
        Adaptive {
            algorithm,
            floor: 1,
            ceiling: 1024,
            initial: 64,
            window: Duration::from_millis(100),
            min_samples: 10,
            clock: None,
            dropped: Dropped::default(),
            slow_start: true,
            failure_rate: DEFAULT_FAILURE_RATE,
        }
    }

    /// Additive increase, multiplicative decrease: see [`Aimd`].
    pub fn aimd(aimd: Aimd) -> Adaptive {
        Adaptive::with(Algorithm::Aimd(aimd))
    }

    /// A latency gradient: see [`Gradient`].
    pub fn gradient(gradient: Gradient) -> Adaptive {
        Adaptive::with(Algorithm::Gradient(gradient))
    }

    /// The lowest limit (at least 1).
    pub fn floor(mut self, floor: usize) -> Adaptive {
        self.floor = floor;
        self
    }

    /// The highest limit.
    pub fn ceiling(mut self, ceiling: usize) -> Adaptive {
        self.ceiling = ceiling;
        self
    }

    /// The limit to start from (between floor and ceiling).
    pub fn initial(mut self, initial: usize) -> Adaptive {
        self.initial = initial;
        self
    }

    /// The shortest window of samples between two updates of the limit (not zero).
    pub fn window(mut self, window: Duration) -> Adaptive {
        self.window = window;
        self
    }

    /// The fewest samples in a window before the limit is updated (at least 1).
    pub fn min_samples(mut self, min_samples: u32) -> Adaptive {
        self.min_samples = min_samples;
        self
    }

    /// What a request dropped before its outcome counts as (default
    /// [`Dropped::FailureAfter`] 100 ms); see [`Dropped`].
    pub fn dropped(mut self, dropped: Dropped) -> Adaptive {
        self.dropped = dropped;
        self
    }

    /// Whether the limit starts in slow start, doubling every round trip until the first
    /// sign of congestion (default on); see [Slow start](Self#slow-start).
    pub fn slow_start(mut self, on: bool) -> Adaptive {
        self.slow_start = on;
        self
    }

    /// The share of a window's samples that must fail, at least, for its failures to count
    /// as a sign of overload (in `[0, 1)`; default 0.1: more than one in ten). A window whose
    /// failures are this share or less is read as healthy: its failures are the background
    /// errors any service has (bad input, a missing row, a 5xx of one code path) and say
    /// nothing about load, so they neither cut the limit nor keep it from growing. 0 makes
    /// any failure count, as a single failure did before this setting existed. See
    /// [Failures](Self#failures).
    pub fn failure_rate(mut self, rate: f64) -> Adaptive {
        self.failure_rate = rate;
        self
    }

    /// The clock latency is measured with. Use [`Clock::tokio`] in tests under paused time.
    pub fn clock(mut self, clock: Clock) -> Adaptive {
        self.clock = Some(clock);
        self
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.floor == 0 {
            return Err(ConfigError::ZeroFloor);
        }
        if self.floor > self.ceiling || self.ceiling > MAX_LIMIT as usize {
            return Err(ConfigError::BadBounds {
                floor: self.floor,
                ceiling: self.ceiling,
            });
        }
        if self.initial < self.floor || self.initial > self.ceiling {
            return Err(ConfigError::InitialOutOfBounds {
                initial: self.initial,
                floor: self.floor,
                ceiling: self.ceiling,
            });
        }
        if self.window.is_zero() {
            return Err(ConfigError::ZeroWindow);
        }
        if self.min_samples == 0 {
            return Err(ConfigError::ZeroMinSamples);
        }
        if !(self.failure_rate.is_finite() && (0.0..1.0).contains(&self.failure_rate)) {
            return Err(ConfigError::BadFactor {
                name: "failure_rate",
                value: self.failure_rate,
            });
        }
        match self.algorithm {
            Algorithm::Aimd(a) => a.validate(),
            Algorithm::Gradient(g) => g.validate(),
        }
    }
}

impl fmt::Debug for Adaptive {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Adaptive")
            .field("algorithm", &self.algorithm)
            .field("floor", &self.floor)
            .field("ceiling", &self.ceiling)
            .field("initial", &self.initial)
            .field("window", &self.window)
            .field("min_samples", &self.min_samples)
            .field("clock", &self.clock)
            .field("dropped", &self.dropped)
            .field("slow_start", &self.slow_start)
            .field("failure_rate", &self.failure_rate)
            .finish()
    }
}

/// The default [`Adaptive::failure_rate`]: a window's failures are a sign of overload when
/// more than a tenth of its samples failed. A background error rate of a few percent stays
/// under it (with 1% of requests failing, a window of 10 samples, the fewest by default,
/// passes it about once in 250 windows, one of 64 about once in 200,000), while an outage, a hanging dependency
/// (its callers' timeouts) or a dependency shedding load fails far more than that.
const DEFAULT_FAILURE_RATE: f64 = 0.1;

fn check_factor(name: &'static str, value: f64, lo: f64, hi: f64) -> Result<(), ConfigError> {
    if value.is_finite() && value > lo && value <= hi {
        Ok(())
    } else {
        Err(ConfigError::BadFactor { name, value })
    }
}

/// One window of samples, the input of an algorithm's update.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Sample {
    /// Requests completed in the window.
    pub count: u32,
    /// Of which failed, as a sign of overload: the algorithms back off on any. The layer
    /// passes a window's failures only when they are more than its
    /// [`failure_rate`](Adaptive::failure_rate) of the window's samples, and 0 otherwise
    /// (background errors, not overload).
    pub failures: u32,
    /// Mean latency of the window, in nanoseconds.
    pub avg_rtt_nanos: u64,
    /// Mean latency of the faster half of the window's requests, in nanoseconds: the latency
    /// [`Gradient`] and slow start compare. A few slow requests (a cache miss, a cold row),
    /// which any dependency has and which do not depend on load, move a window's mean a lot
    /// but not this; queueing delays every request and moves both. [`Sample::new`] sets it to
    /// the mean; see [`Sample::fast_half`].
    pub fast_half_rtt_nanos: u64,
    /// Lowest latency of the window, in nanoseconds.
    pub min_rtt_nanos: u64,
    /// Most requests in flight at once during the window.
    pub peak_in_flight: u32,
}

/// What an algorithm remembers between windows.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
#[non_exhaustive]
pub struct Estimate {
    /// The limit, with its fraction (the limit in force is this, rounded and bounded).
    pub limit: f64,
    /// The latency with no queueing, in nanoseconds (0: not measured yet): the baseline
    /// [`Gradient`] and slow start compare each window's latency (the mean of its faster
    /// half, [`Sample::fast_half_rtt_nanos`]) with. It follows the
    /// means of windows read as free of queueing, down and up, never above
    /// `reference_rtt_nanos`; see [`Gradient`].
    pub no_load_rtt_nanos: u64,
    /// The no-load latency last measured, in nanoseconds (0: not yet): by the first window,
    /// by a probe, or by a latency rise that did not follow the limit down. The baseline
    /// moves below it with the windows' means and comes back up to it, not higher.
    pub reference_rtt_nanos: u64,
    /// How much the mean latency varies from window to window beyond what the change of
    /// concurrency explains, as a relative amount: the mean of
    /// `max(0, |ln(mean / last mean)| − |ln(in flight / last in flight)|)`. Queueing moves
    /// latency with concurrency, so it adds nothing here; a dependency whose latency varies
    /// on its own does. The gradient's tolerance widens by twice this, so such a dependency
    /// is not read as queueing, while a steady one gets no allowance.
    pub jitter: f64,
    /// The latency (the mean of the faster half) of the last window without failures, in
    /// nanoseconds (0: none yet).
    pub last_rtt_nanos: u64,
    /// The most requests in flight in that window (0: none yet).
    pub last_in_flight: u32,
    /// While the gradient cuts the limit for a latency rise: the lowest mean latency of that
    /// run of windows, in nanoseconds (0 otherwise). See `rise_in_flight`.
    pub rise_rtt_nanos: u64,
    /// While the gradient cuts the limit for a latency rise: the most requests in flight in
    /// the window of `rise_rtt_nanos` (0 otherwise). Once the requests in flight have fallen
    /// to three quarters of this or less, and the mean latency has not fallen with them
    /// (queueing would have), the latency is not of the limit's making: it becomes the
    /// no-load latency, and the limit goes back to this. See [`Gradient`].
    pub rise_in_flight: u32,
    /// Windows seen.
    pub windows: u64,
    /// While [`Gradient`] measures the no-load latency (one window at the floor): the limit
    /// to go back to. 0 otherwise.
    pub probe_saved: f64,
}

impl Sample {
    /// A window of `count` requests, `failures` of which failed, with their mean and lowest
    /// latency in nanoseconds and the most requests in flight at once.
    pub fn new(
        count: u32,
        failures: u32,
        avg_rtt_nanos: u64,
        min_rtt_nanos: u64,
        peak_in_flight: u32,
    ) -> Sample {
        Sample {
            count,
            failures,
            avg_rtt_nanos,
            fast_half_rtt_nanos: avg_rtt_nanos,
            min_rtt_nanos,
            peak_in_flight,
        }
    }

    /// The same window, with the mean latency of its faster half of requests (see
    /// [`fast_half_rtt_nanos`](Self::fast_half_rtt_nanos)).
    pub fn fast_half(self, fast_half_rtt_nanos: u64) -> Sample {
        Sample {
            fast_half_rtt_nanos,
            ..self
        }
    }

    /// The window as the latency comparisons see it: its latency is that of its faster half.
    fn typical(&self) -> Sample {
        Sample {
            avg_rtt_nanos: self.fast_half_rtt_nanos,
            ..*self
        }
    }
}

impl Estimate {
    /// An estimate that starts at `limit`.
    pub fn new(limit: f64) -> Estimate {
        Estimate {
            limit,
            no_load_rtt_nanos: 0,
            reference_rtt_nanos: 0,
            jitter: 0.0,
            last_rtt_nanos: 0,
            last_in_flight: 0,
            rise_rtt_nanos: 0,
            rise_in_flight: 0,
            windows: 0,
            probe_saved: 0.0,
        }
    }

    /// The limit in force: rounded, between `floor` and `ceiling`.
    pub fn bounded(&self, floor: u32, ceiling: u32) -> u32 {
        let l = self.limit.round();
        if l.is_nan() || l <= f64::from(floor) {
            floor
        } else if l >= f64::from(ceiling) {
            ceiling
        } else {
            l as u32
        }
    }
}

/// Additive increase, multiplicative decrease (TCP's congestion control; Netflix
/// concurrency-limits' `AIMDLimit`).
///
/// After each window: if a request failed (of those the layer counts: failures above its
/// [failure rate](Adaptive#failures)), or the mean latency passed the latency threshold,
/// the limit is multiplied by `backoff` (default 0.9); otherwise, if the window used at least
/// half of the limit, it grows by `increase` (default 1). A window that used less than half
/// leaves the limit alone, so an idle service does not drift to the ceiling.
///
/// AIMD needs a signal to back off on: failures, or a latency threshold. Without one, it
/// grows to the ceiling while the dependency is healthy and backs off only when it fails.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Aimd {
    backoff: f64,
    increase: f64,
    latency_threshold: Option<Duration>,
}

impl Default for Aimd {
    fn default() -> Self {
        Aimd {
            backoff: 0.9,
            increase: 1.0,
            latency_threshold: None,
        }
    }
}

impl Aimd {
    /// The factor the limit is multiplied by on a bad window (in (0, 1); default 0.9).
    pub fn backoff(mut self, backoff: f64) -> Aimd {
        self.backoff = backoff;
        self
    }

    /// How much the limit grows after a good window (positive; default 1).
    pub fn increase(mut self, increase: f64) -> Aimd {
        self.increase = increase;
        self
    }

    /// A window whose mean latency passes this counts as bad (default: none, only failures
    /// count).
    pub fn latency_threshold(mut self, threshold: Duration) -> Aimd {
        self.latency_threshold = Some(threshold);
        self
    }

    fn validate(&self) -> Result<(), ConfigError> {
        check_factor("backoff", self.backoff, 0.0, 1.0 - f64::EPSILON)?;
        check_factor("increase", self.increase, 0.0, f64::from(MAX_LIMIT))
    }

    /// The next estimate after a window: pure arithmetic, bounded by `floor` and `ceiling`.
    ///
    /// ```
    /// use tower_bulwark::backpressure::{Aimd, Estimate, Sample};
    ///
    /// let aimd = Aimd::default();
    /// // A window that used the whole limit, with no failure: one more.
    /// let next = aimd.update(Estimate::new(10.0), &Sample::new(50, 0, 1_000, 900, 10), 1, 100);
    /// assert_eq!(next.bounded(1, 100), 11);
    /// // A window with a failure: back off by 10%.
    /// let next = aimd.update(Estimate::new(10.0), &Sample::new(50, 1, 1_000, 900, 10), 1, 100);
    /// assert_eq!(next.bounded(1, 100), 9);
    /// ```
    pub fn update(&self, est: Estimate, s: &Sample, floor: u32, ceiling: u32) -> Estimate {
        let slow = self
            .latency_threshold
            .is_some_and(|t| s.avg_rtt_nanos > duration_nanos(t));
        let limit = if s.failures > 0 || slow {
            est.limit * self.backoff
        } else if f64::from(s.peak_in_flight) * 2.0 >= est.limit {
            est.limit + self.increase
        } else {
            est.limit
        };
        Estimate {
            limit: limit.clamp(f64::from(floor), f64::from(ceiling)),
            windows: est.windows + 1,
            ..est
        }
    }
}

/// A latency gradient (Netflix concurrency-limits' `GradientLimit` and `Gradient2Limit`,
/// Envoy's adaptive concurrency filter).
///
/// It keeps the latency with no queueing (the *no-load latency*) and how much it varies from
/// window to window (the *jitter*), and compares each window's latency with them:
///
/// ```text
/// allowed  = tolerance × (1 + 2 × jitter) × no_load_rtt
/// gradient = clamp(allowed / window_rtt, 0.5, 1.0)
/// target   = limit × gradient + queue
/// limit    = limit × (1 − smoothing) + target × smoothing
/// ```
///
/// Like is compared with like: the no-load latency is a window's latency too, that of
/// windows without queueing, not the lowest single latency ever seen (a dependency whose
/// latency varies from request to request has a mean well above its minimum, queue or no
/// queue).
///
/// # A window's latency
///
/// A window's latency, wherever these docs speak of a window's mean, is the mean latency of
/// its faster half of requests ([`Sample::fast_half_rtt_nanos`]), not the mean of all. Most
/// dependencies answer a few requests much more slowly than the rest, whatever the load (a
/// cache miss, a cold row, a garbage collection): one request in 20 taking 500 ms where the
/// others take 10 ms makes the mean 34.5 ms. Such requests also complete late, so the
/// first windows of a load hold none of them and later ones a share that swings as the
/// limit moves; read through the mean, that is a latency rise that looks like queueing, and
/// a dependency that serves any number at once was cut from 512 to 34 in 3 s. Queueing, on
/// the other hand, delays every request, the fast ones too, so it moves the faster half as
/// it moves the mean. The layer counts each window's latencies in buckets of a quarter
/// octave, with their sums, so the faster half's mean is exact but for the bucket the half
/// ends in (two more atomic adds per sample, on the adaptive path only). The arithmetic takes
/// it from the [`Sample`] (`Sample::new` sets it to the mean; [`Sample::fast_half`]).
///
/// # The no-load latency and the jitter
///
/// The first window measures the no-load latency, and so does the probe below. In between,
/// each window whose mean is within `allowed` (read as free of queueing) moves it a quarter
/// of the way toward that mean, down or up; it rises only up to the latency last measured
/// ([`Estimate::reference_rtt_nanos`]), so a standing queue never becomes the new normal,
/// and it does not sink to the lowest of the windows' means either (which would make every
/// ordinary window read as queueing). A window above `allowed` leaves it: that latency is
/// what the gradient answers.
///
/// The jitter ([`Estimate::jitter`]) is how much the mean latency changes from one window
/// to the next beyond what the change of concurrency explains. Queueing moves latency with
/// concurrency, so it adds none; a dependency whose window means vary on their own (±20%
/// around 1 ms, say) gets a jitter of about 0.4, an `allowed` of about 1.8 times its no-load
/// latency, and is not cut, while a steady dependency gets no allowance and is cut at its
/// first rise, as before.
///
/// While latency stays within `allowed`, the gradient is 1 and the limit grows by `queue`
/// (by default the square root of the limit). Once requests queue in the dependency,
/// latency grows with concurrency and the gradient pulls the limit back, so it settles just
/// above the concurrency the dependency serves without queueing (by about `queue`). A
/// dependency whose latency also varies on its own is let queue up to the jitter's
/// allowance, since one window cannot tell that much queueing from its variance: with window
/// means that vary by ±20%, the limit settles at about twice the capacity. A dependency that serves
/// any number at once, however much its latency varies, is never cut. `tolerance` (default
/// 1.0) is how much latency growth counts as normal on top of the jitter's allowance; Envoy
/// uses about 1.1. A window with failures multiplies the limit by `backoff` (default 0.9).
///
/// # A dependency that became slower
///
/// Queueing is of the limit's making: cut the limit, and the latency comes down with it. A
/// dependency that became slower for good (a slower replica, a colder cache) does not: while
/// the gradient cuts, it remembers the lowest mean of the run and the requests in flight
/// then, and once those have fallen to three quarters or less with the mean not fallen with
/// them (above what queueing would give by more than the jitter allows), that mean becomes
/// the no-load latency (and the latency last measured) and the limit goes back to the
/// requests in flight at that lowest mean. A further rise of the latency, beyond what the
/// jitter allows, starts the comparison again from there, so queueing that grows (a
/// dependency that lost capacity) is never taken for a slower dependency. So a step of the
/// latency from 1 ms to 3 ms costs a few windows of a limit cut by about a quarter, not a
/// limit at its floor until the next probe.
///
/// # The probe
///
/// The no-load latency is measured again every `probe_every` windows (default 500: about a
/// minute with 100 ms windows), as Envoy does: the limit drops to the floor for one window's
/// time, so requests do not queue, and the mean latency of the requests admitted during it
/// becomes the new no-load latency. The probe ends at the first completion of such a request
/// once the window's time is up (it does not wait for `min_samples` completions at the
/// floor), so it costs about one window of reduced concurrency, or one latency of the
/// dependency if that is longer. This lets the no-load latency come back to its true level
/// whatever the windows in between made of it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gradient {
    tolerance: f64,
    smoothing: f64,
    backoff: f64,
    queue: Option<u32>,
    probe_every: u64,
}

impl Default for Gradient {
    fn default() -> Self {
        Gradient {
            tolerance: 1.0,
            smoothing: 0.2,
            backoff: 0.9,
            queue: None,
            probe_every: 500,
        }
    }
}

impl Gradient {
    /// How much latency growth over the no-load latency counts as normal (at least 1;
    /// default 1.0).
    pub fn tolerance(mut self, tolerance: f64) -> Gradient {
        self.tolerance = tolerance;
        self
    }

    /// How far each window moves the limit toward its target (in (0, 1]; default 0.2).
    pub fn smoothing(mut self, smoothing: f64) -> Gradient {
        self.smoothing = smoothing;
        self
    }

    /// The factor the limit is multiplied by on a window with failures (in (0, 1); default
    /// 0.9).
    pub fn backoff(mut self, backoff: f64) -> Gradient {
        self.backoff = backoff;
        self
    }

    /// A fixed allowance for queueing, instead of the square root of the limit.
    pub fn queue(mut self, queue: u32) -> Gradient {
        self.queue = Some(queue);
        self
    }

    /// Measure the no-load latency again every this many windows (at least 1; default 500).
    pub fn probe_every(mut self, windows: u64) -> Gradient {
        self.probe_every = windows;
        self
    }

    fn validate(&self) -> Result<(), ConfigError> {
        check_factor("tolerance", self.tolerance, 1.0 - f64::EPSILON, 1e6)?;
        check_factor("smoothing", self.smoothing, 0.0, 1.0)?;
        check_factor("backoff", self.backoff, 0.0, 1.0 - f64::EPSILON)?;
        if self.probe_every == 0 {
            return Err(ConfigError::BadFactor {
                name: "probe_every",
                value: 0.0,
            });
        }
        Ok(())
    }

    /// The next estimate after a window: pure arithmetic, bounded by `floor` and `ceiling`.
    ///
    /// ```
    /// use tower_bulwark::backpressure::{Estimate, Gradient, Sample};
    ///
    /// let g = Gradient::default();
    /// // The first window sets the no-load latency: 1 ms. Latency at its floor: grow.
    /// let est = g.update(Estimate::new(100.0), &Sample::new(500, 0, 1_000_000, 1_000_000, 100), 1, 1000);
    /// assert!(est.limit > 100.0);
    /// // Latency doubled: requests queue in the dependency, so the limit comes down.
    /// let before = est.limit;
    /// let est = g.update(est, &Sample::new(500, 0, 2_000_000, 1_900_000, 101), 1, 1000);
    /// assert!(est.limit < before);
    /// ```
    pub fn update(&self, est: Estimate, s: &Sample, floor: u32, ceiling: u32) -> Estimate {
        // The window's latency, here and below, is that of its faster half of requests.
        let s = &s.typical();
        let windows = est.windows + 1;
        let (lo, hi) = (f64::from(floor), f64::from(ceiling));
        if est.probe_saved > 0.0 {
            // This window ran at the floor: its mean latency is the no-load latency.
            let measured = s.failures == 0 && s.avg_rtt_nanos > 0;
            return Estimate {
                limit: est.probe_saved.clamp(lo, hi),
                no_load_rtt_nanos: if measured {
                    s.avg_rtt_nanos
                } else {
                    est.no_load_rtt_nanos
                },
                reference_rtt_nanos: if measured {
                    s.avg_rtt_nanos
                } else {
                    est.reference_rtt_nanos
                },
                rise_rtt_nanos: 0,
                rise_in_flight: 0,
                windows,
                probe_saved: 0.0,
                ..est
            };
        }
        if est.no_load_rtt_nanos != 0 && windows.is_multiple_of(self.probe_every) {
            // Measure the no-load latency again: one window at the floor.
            return Estimate {
                limit: lo,
                rise_rtt_nanos: 0,
                rise_in_flight: 0,
                windows,
                probe_saved: est.limit.clamp(lo, hi),
                ..est
            };
        }
        let (tracked, allowed) = track_no_load(&est, s, self.tolerance);
        let next = |limit: f64, rise: (u64, u32)| Estimate {
            limit: limit.clamp(lo, hi),
            rise_rtt_nanos: rise.0,
            rise_in_flight: rise.1,
            windows,
            probe_saved: 0.0,
            ..tracked
        };
        if s.failures > 0 {
            return next(est.limit * self.backoff, (0, 0));
        }
        let rise = (est.rise_rtt_nanos, est.rise_in_flight);
        if s.avg_rtt_nanos == 0 || f64::from(s.peak_in_flight) * 2.0 < est.limit {
            // No latency to compare, or the window did not use the limit: nothing learned.
            return next(est.limit, rise);
        }
        let rtt = s.avg_rtt_nanos as f64;
        let noise = 1.0 + JITTER_ALLOWANCE * est.jitter;
        let rise = if rtt <= allowed {
            (0, 0)
        } else if rise.1 == 0 || s.avg_rtt_nanos < rise.0 || rtt > rise.0 as f64 * noise {
            // A rise, a further rise, or latency that came down with the limit: remember
            // where it stands.
            (s.avg_rtt_nanos, s.peak_in_flight)
        } else if not_queueing(s, rise, noise) {
            // A quarter fewer requests in flight, and latency that did not fall with them:
            // it is not queueing, but the dependency's latency now. It becomes the no-load
            // latency, and the limit goes back to the requests in flight it held at.
            return Estimate {
                no_load_rtt_nanos: s.avg_rtt_nanos,
                reference_rtt_nanos: s.avg_rtt_nanos,
                ..next(est.limit.max(f64::from(rise.1)), (0, 0))
            };
        } else {
            rise
        };
        let gradient = (allowed / rtt).clamp(0.5, 1.0);
        let queue = match self.queue {
            Some(q) => f64::from(q),
            None => est.limit.max(1.0).sqrt(),
        };
        let target = est.limit * gradient + queue;
        next(
            est.limit * (1.0 - self.smoothing) + target * self.smoothing,
            rise,
        )
    }
}

/// How much of the jitter is allowed above the no-load latency: `allowed` is
/// `tolerance × (1 + JITTER_ALLOWANCE × jitter) × no_load`. The jitter is a mean change from
/// one window to the next (about 1.1 standard deviations for normal noise, the whole range
/// for means that alternate): twice it covers such variance wherever in its range the
/// no-load latency sits.
const JITTER_ALLOWANCE: f64 = 2.0;

/// How far a window read as free of queueing moves the no-load latency toward its mean.
const NO_LOAD_STEP: f64 = 0.25;

/// How far each window moves the jitter toward its own change.
const JITTER_STEP: f64 = 0.125;

/// The share of the requests in flight at a latency rise that, reached with the latency not
/// fallen with them, shows the rise is not queueing.
const RISE_NOT_FOLLOWED: f64 = 0.75;

/// Whether a window cut for a latency rise shows that the rise is not queueing. `rise` is
/// (mean, in flight) of the window where the latency last stood lowest, or rose by more than
/// `noise` (`1 + 2 × jitter`), in this run of cuts; this window's mean is at least that
/// mean and within `noise` of it: the latency held. The rise is not queueing when, in
/// addition, the requests in flight fell to three quarters or less, and the mean is above by
/// more than `noise` what queueing would give (a mean in proportion to the requests in
/// flight, `rise.0 × in_flight / rise.1`).
fn not_queueing(s: &Sample, rise: (u64, u32), noise: f64) -> bool {
    let (n, n0) = (f64::from(s.peak_in_flight), f64::from(rise.1));
    n <= RISE_NOT_FOLLOWED * n0 && s.avg_rtt_nanos as f64 >= rise.0 as f64 * n / n0 * noise
}

/// The no-load latency, the latency last measured and the jitter after a window outside the
/// probe (in the estimate returned; its other fields are `est`'s), and the mean latency the
/// window is allowed before it reads as queueing (`tolerance × (1 + 2 × jitter) × no_load`,
/// from the values before the window).
///
/// A window without failures updates the jitter with its change since the last one. The
/// first window's mean measures the no-load latency. Later, a window without failures whose
/// mean is within the allowed latency moves the no-load latency a quarter of the way toward
/// its mean (up to the latency last measured at most); a window above it, or with failures,
/// leaves it. A mean is compared with a mean: the lowest single latency of a dependency whose
/// latency varies lies far below its mean even with no queue at all.
fn track_no_load(est: &Estimate, s: &Sample, tolerance: f64) -> (Estimate, f64) {
    let allowance = tolerance * (1.0 + JITTER_ALLOWANCE * est.jitter);
    if s.avg_rtt_nanos == 0 || s.failures > 0 {
        return (*est, allowance * est.no_load_rtt_nanos.max(1) as f64);
    }
    let rtt = s.avg_rtt_nanos as f64;
    let mut next = Estimate {
        last_rtt_nanos: s.avg_rtt_nanos,
        last_in_flight: s.peak_in_flight,
        ..*est
    };
    if est.last_rtt_nanos > 0 && est.last_in_flight > 0 && s.peak_in_flight > 0 {
        let change = (rtt / est.last_rtt_nanos as f64).ln().abs()
            - (f64::from(s.peak_in_flight) / f64::from(est.last_in_flight))
                .ln()
                .abs();
        let jitter = est.jitter + (change.max(0.0) - est.jitter) * JITTER_STEP;
        if jitter.is_finite() {
            next.jitter = jitter;
        }
    }
    if est.no_load_rtt_nanos == 0 {
        next.no_load_rtt_nanos = s.avg_rtt_nanos;
        next.reference_rtt_nanos = s.avg_rtt_nanos;
        return (next, allowance * rtt);
    }
    let no_load = est.no_load_rtt_nanos as f64;
    let allowed = allowance * no_load;
    if rtt <= allowed {
        let moved = no_load + (rtt - no_load) * NO_LOAD_STEP;
        // Up to the latency last measured, not higher (an estimate made by hand may lack it).
        let cap = (est.reference_rtt_nanos as f64).max(no_load);
        let moved = if rtt > no_load { moved.min(cap) } else { moved };
        next.no_load_rtt_nanos = (moved.round() as u64).max(1);
    }
    (next, allowed)
}

/// How far above the no-load latency a slow-start window's mean must rise to end slow start
/// as congestion: half again. Ordinary variance of a window's mean stays well under it; a
/// doubling of the limit past the dependency's capacity passes it within one more round trip.
const SLOW_START_RISE: f64 = 1.5;

/// One window of slow start: the next estimate, and whether slow start goes on.
///
/// A failure ends it with the algorithm's update (a back-off); a latency rise (the window's
/// mean [`SLOW_START_RISE`] times the no-load latency, or more if the jitter allows more)
/// ends it with the limit cut by the ratio of the two, to about the concurrency served
/// without queueing; a window in which AIMD itself backs off (its latency threshold) ends it
/// with the lower of its step and that cut; a window that used at least half of the limit
/// doubles it, up to `cap`, where slow start ends; an idle window changes nothing.
fn slow_start_update(
    algorithm: &Algorithm,
    est: Estimate,
    s: &Sample,
    floor: u32,
    ceiling: u32,
    cap: f64,
) -> (Estimate, bool) {
    let (lo, hi) = (f64::from(floor), f64::from(ceiling));
    let steady = algorithm.update(est, s, floor, ceiling);
    if s.failures > 0 {
        return (steady, false);
    }
    // The latency compared below is that of the window's faster half of requests (AIMD's own
    // step, above, reads the mean).
    let s = &s.typical();
    let (tracked, _) = track_no_load(&est, s, 1.0);
    let no_load = tracked.no_load_rtt_nanos;
    let next = |limit: f64| Estimate {
        limit: limit.clamp(lo, hi),
        rise_rtt_nanos: 0,
        rise_in_flight: 0,
        windows: est.windows + 1,
        probe_saved: 0.0,
        ..tracked
    };
    // The limit cut by how far latency rose: about the concurrency served without queueing.
    let cut = est.limit * (no_load as f64 / s.avg_rtt_nanos.max(1) as f64).min(1.0);
    // Half again above the no-load latency, or above what its jitter allows if that is more.
    let rise = SLOW_START_RISE.max(1.0 + JITTER_ALLOWANCE * est.jitter);
    if no_load > 0 && s.avg_rtt_nanos as f64 > rise * no_load as f64 {
        return (next(cut), false);
    }
    // AIMD sees congestion (its latency threshold): the lower of its step and the cut. (The
    // gradient's own steps answer to smaller rises, which a window of one round trip cannot
    // tell from variance; the rise above is its signal here.)
    if matches!(algorithm, Algorithm::Aimd(_)) && steady.limit < est.limit {
        return (next(steady.limit.min(cut)), false);
    }
    if f64::from(s.peak_in_flight) * 2.0 >= est.limit {
        let doubled = est.limit * 2.0;
        if doubled >= cap {
            return (next(cap.max(est.limit)), false);
        }
        return (next(doubled), true);
    }
    (next(est.limit), true)
}

impl Algorithm {
    fn update(&self, est: Estimate, s: &Sample, floor: u32, ceiling: u32) -> Estimate {
        match self {
            Algorithm::Aimd(a) => a.update(est, s, floor, ceiling),
            Algorithm::Gradient(g) => g.update(est, s, floor, ceiling),
        }
    }
}

/// A window's latencies are counted in buckets of a quarter octave (19% wide at most), with
/// the sum of the latencies in each, from which the mean of its faster half is read exactly
/// but for the one bucket the half ends in (prorated at that bucket's own mean).
const HIST_SUB_BITS: u32 = 2;
/// Latencies under 2^10 ns (1 µs) share the first bucket...
const HIST_MIN_EXP: u32 = 10;
/// ... and those of 2^40 ns (18 min) or more the last.
const HIST_MAX_EXP: u32 = 40;
const HIST_BUCKETS: usize = (((HIST_MAX_EXP - HIST_MIN_EXP) << HIST_SUB_BITS) + 2) as usize;

/// The bucket of a latency in nanoseconds.
fn hist_bucket(rtt: u64) -> usize {
    let v = rtt.max(1);
    let exp = 63 - v.leading_zeros();
    if exp < HIST_MIN_EXP {
        return 0;
    }
    if exp >= HIST_MAX_EXP {
        return HIST_BUCKETS - 1;
    }
    let sub = ((v >> (exp - HIST_SUB_BITS)) & ((1 << HIST_SUB_BITS) - 1)) as u32;
    1 + (((exp - HIST_MIN_EXP) << HIST_SUB_BITS) + sub) as usize
}

/// The mean of the faster half of the latencies counted in `counts` (ascending buckets) with
/// their sums in `sums`: whole buckets up to the half, and the share of the bucket it ends in
/// at that bucket's mean. `None` if nothing was counted.
fn fast_half_mean(counts: &[u32], sums: &[u64]) -> Option<u64> {
    let total: u64 = counts.iter().map(|&c| u64::from(c)).sum();
    if total == 0 {
        return None;
    }
    let half = total.div_ceil(2);
    let (mut taken, mut sum) = (0u64, 0f64);
    for (&c, &s) in counts.iter().zip(sums) {
        if c == 0 {
            continue;
        }
        let take = u64::from(c).min(half - taken);
        sum += s as f64 * take as f64 / f64::from(c);
        taken += take;
        if taken >= half {
            break;
        }
    }
    Some((sum / half as f64).round() as u64)
}

/// The run-time half of an adaptive budget: the current window's sums and the estimate.
pub(crate) struct AdaptiveState {
    algorithm: Algorithm,
    floor: u32,
    ceiling: u32,
    window_nanos: u64,
    min_samples: u32,
    /// End of the current window; 0 before the first sample.
    window_end: AtomicU64,
    count: AtomicU32,
    failures: AtomicU32,
    rtt_sum: AtomicU64,
    min_rtt: AtomicU64,
    /// The window's latencies by bucket (`hist_bucket`): counts and sums.
    hist_count: [AtomicU32; HIST_BUCKETS],
    hist_sum: [AtomicU64; HIST_BUCKETS],
    // The estimate, written only by the completion that closed a window.
    limit_bits: AtomicU64,
    no_load_rtt: AtomicU64,
    reference_rtt: AtomicU64,
    jitter_bits: AtomicU64,
    last_rtt: AtomicU64,
    last_in_flight: AtomicU32,
    rise_rtt: AtomicU64,
    rise_in_flight: AtomicU32,
    windows: AtomicU64,
    probe_saved_bits: AtomicU64,
    /// Whether the limit is in slow start.
    slow_start: AtomicBool,
    /// After failures cut the limit: the limit (f64 bits) slow start brings it back up to
    /// once successes return; 0 otherwise.
    recover_to_bits: AtomicU64,
    /// Whether slow start is configured (it then also comes back after failures).
    slow_start_on: bool,
    /// A dropped request that ran this long is a failed sample (`u64::MAX`: never).
    dropped_after: u64,
    /// A window's failures count when more than this share of its samples failed.
    failure_rate: f64,
}

impl AdaptiveState {
    pub(crate) fn new(cfg: &Adaptive) -> AdaptiveState {
        AdaptiveState {
            algorithm: cfg.algorithm,
            floor: cfg.floor as u32,
            ceiling: cfg.ceiling as u32,
            window_nanos: duration_nanos(cfg.window),
            min_samples: cfg.min_samples,
            window_end: AtomicU64::new(0),
            count: AtomicU32::new(0),
            failures: AtomicU32::new(0),
            rtt_sum: AtomicU64::new(0),
            min_rtt: AtomicU64::new(u64::MAX),
            hist_count: std::array::from_fn(|_| AtomicU32::new(0)),
            hist_sum: std::array::from_fn(|_| AtomicU64::new(0)),
            limit_bits: AtomicU64::new((cfg.initial as f64).to_bits()),
            no_load_rtt: AtomicU64::new(0),
            reference_rtt: AtomicU64::new(0),
            jitter_bits: AtomicU64::new(0f64.to_bits()),
            last_rtt: AtomicU64::new(0),
            last_in_flight: AtomicU32::new(0),
            rise_rtt: AtomicU64::new(0),
            rise_in_flight: AtomicU32::new(0),
            windows: AtomicU64::new(0),
            probe_saved_bits: AtomicU64::new(0f64.to_bits()),
            slow_start: AtomicBool::new(cfg.slow_start),
            recover_to_bits: AtomicU64::new(0f64.to_bits()),
            slow_start_on: cfg.slow_start,
            dropped_after: match cfg.dropped {
                Dropped::Ignore => u64::MAX,
                Dropped::FailureAfter(d) => duration_nanos(d),
            },
            failure_rate: cfg.failure_rate,
        }
    }

    /// A request dropped after `rtt`: a failed sample if its policy says so.
    pub(crate) fn record_dropped(&self, now: u64, rtt: u64, shared: &Shared) -> Option<u32> {
        if self.dropped_after == u64::MAX || rtt < self.dropped_after {
            return None;
        }
        self.record(now, rtt, true, true, shared)
    }

    /// Bounds a limit set by hand and makes it the estimate; slow start, if still on, ends.
    pub(crate) fn reset_to(&self, limit: u32) -> u32 {
        let limit = limit.clamp(self.floor, self.ceiling);
        self.slow_start.store(false, Ordering::Relaxed);
        self.recover_to_bits
            .store(0f64.to_bits(), Ordering::Relaxed);
        self.limit_bits
            .store(f64::from(limit).to_bits(), Ordering::Relaxed);
        self.probe_saved_bits
            .store(0f64.to_bits(), Ordering::Relaxed);
        self.rise_in_flight.store(0, Ordering::Relaxed);
        self.rise_rtt.store(0, Ordering::Relaxed);
        limit
    }

    /// Adds a sample; if it closes a window, folds the window into the estimate and returns
    /// the new limit. `dropped`: the request was dropped after `rtt` (its latency is at
    /// least that, so it does not count toward the lowest latency).
    pub(crate) fn record(
        &self,
        now: u64,
        rtt: u64,
        failed: bool,
        dropped: bool,
        shared: &Shared,
    ) -> Option<u32> {
        let end = self.window_end.load(Ordering::Acquire);
        // While the gradient measures the no-load latency (the limit at the floor since the
        // last window closed), only requests admitted since then are no-load samples, and
        // the first of them to complete once the window's time is up closes the probe.
        let probing = self.probe_saved_bits.load(Ordering::Relaxed) != 0f64.to_bits();
        if probing && now.saturating_sub(rtt) < end.saturating_sub(self.window_nanos) {
            return None;
        }
        let min_samples = if probing { 1 } else { self.min_samples };
        let count = self.count.fetch_add(1, Ordering::AcqRel) + 1;
        self.rtt_sum.fetch_add(rtt, Ordering::AcqRel);
        let bucket = hist_bucket(rtt);
        self.hist_count[bucket].fetch_add(1, Ordering::Relaxed);
        self.hist_sum[bucket].fetch_add(rtt, Ordering::Relaxed);
        if !dropped {
            self.min_rtt.fetch_min(rtt, Ordering::AcqRel);
        }
        if failed {
            self.failures.fetch_add(1, Ordering::AcqRel);
        }
        if end == 0 {
            // First sample: the first window starts now.
            let _ = self.window_end.compare_exchange(
                0,
                now.saturating_add(self.window_nanos).max(1),
                Ordering::AcqRel,
                Ordering::Acquire,
            );
            return None;
        }
        let slow_start = self.slow_start.load(Ordering::Relaxed);
        // In slow start a window is also one round trip: as many samples as the limit.
        let round_trip = slow_start
            && f64::from(count) >= f64::from_bits(self.limit_bits.load(Ordering::Relaxed)).max(1.0);
        if (now < end && !round_trip) || count < min_samples {
            return None;
        }
        // One completion wins the window; the others go on.
        self.window_end
            .compare_exchange(
                end,
                now.saturating_add(self.window_nanos).max(1),
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .ok()?;
        // Samples that land while the sums are taken go to one window or the next.
        let count = self.count.swap(0, Ordering::AcqRel);
        let sum = self.rtt_sum.swap(0, Ordering::AcqRel);
        let min = self.min_rtt.swap(u64::MAX, Ordering::AcqRel);
        let failed_all = self.failures.swap(0, Ordering::AcqRel);
        let mut counts = [0u32; HIST_BUCKETS];
        let mut sums = [0u64; HIST_BUCKETS];
        for (i, (c, s)) in counts.iter_mut().zip(sums.iter_mut()).enumerate() {
            *c = self.hist_count[i].swap(0, Ordering::Relaxed);
            *s = self.hist_sum[i].swap(0, Ordering::Relaxed);
        }
        let peak = shared.take_peak().max(shared.in_flight());
        if count == 0 {
            return None;
        }
        let avg = sum / u64::from(count);
        // Failures are a sign of overload only above the failure rate; fewer are the
        // background errors of a healthy dependency (see `Adaptive::failure_rate`).
        let failures = if f64::from(failed_all) > self.failure_rate * f64::from(count) {
            failed_all
        } else {
            0
        };
        let sample = Sample {
            count,
            failures,
            avg_rtt_nanos: avg,
            fast_half_rtt_nanos: fast_half_mean(&counts, &sums).unwrap_or(avg),
            min_rtt_nanos: if min == u64::MAX { 0 } else { min },
            peak_in_flight: peak,
        };
        let est = Estimate {
            limit: f64::from_bits(self.limit_bits.load(Ordering::Relaxed)),
            no_load_rtt_nanos: self.no_load_rtt.load(Ordering::Relaxed),
            reference_rtt_nanos: self.reference_rtt.load(Ordering::Relaxed),
            jitter: f64::from_bits(self.jitter_bits.load(Ordering::Relaxed)),
            last_rtt_nanos: self.last_rtt.load(Ordering::Relaxed),
            last_in_flight: self.last_in_flight.load(Ordering::Relaxed),
            rise_rtt_nanos: self.rise_rtt.load(Ordering::Relaxed),
            rise_in_flight: self.rise_in_flight.load(Ordering::Relaxed),
            windows: self.windows.load(Ordering::Relaxed),
            probe_saved: f64::from_bits(self.probe_saved_bits.load(Ordering::Relaxed)),
        };
        let recover_to = f64::from_bits(self.recover_to_bits.load(Ordering::Relaxed));
        // Successes are back after failures cut the limit: slow start again, up to the limit
        // the first cut left (see "Slow start" in `Adaptive`'s docs).
        let recovering = self.slow_start_on
            && recover_to > 0.0
            && failures == 0
            && est.probe_saved == 0.0
            && est.limit < recover_to;
        let next = if slow_start || recovering {
            let cap = if recover_to > 0.0 {
                recover_to
            } else {
                f64::INFINITY
            };
            let (next, still) =
                slow_start_update(&self.algorithm, est, &sample, self.floor, self.ceiling, cap);
            self.slow_start.store(still, Ordering::Relaxed);
            next
        } else {
            self.algorithm
                .update(est, &sample, self.floor, self.ceiling)
        };
        if failures > 0 {
            // Failures cut the limit: come back to the first cut's level once they stop.
            if self.slow_start_on && next.limit < est.limit && next.limit > recover_to {
                self.recover_to_bits
                    .store(next.limit.to_bits(), Ordering::Relaxed);
            }
        } else if recover_to > 0.0
            && est.probe_saved == 0.0
            && !self.slow_start.load(Ordering::Relaxed)
        {
            // Back up to it, or slow start ended on congestion: recovered.
            self.recover_to_bits
                .store(0f64.to_bits(), Ordering::Relaxed);
        }
        self.limit_bits
            .store(next.limit.to_bits(), Ordering::Relaxed);
        self.no_load_rtt
            .store(next.no_load_rtt_nanos, Ordering::Relaxed);
        self.reference_rtt
            .store(next.reference_rtt_nanos, Ordering::Relaxed);
        self.jitter_bits
            .store(next.jitter.to_bits(), Ordering::Relaxed);
        self.last_rtt.store(next.last_rtt_nanos, Ordering::Relaxed);
        self.last_in_flight
            .store(next.last_in_flight, Ordering::Relaxed);
        self.rise_rtt.store(next.rise_rtt_nanos, Ordering::Relaxed);
        self.rise_in_flight
            .store(next.rise_in_flight, Ordering::Relaxed);
        self.windows.store(next.windows, Ordering::Relaxed);
        self.probe_saved_bits
            .store(next.probe_saved.to_bits(), Ordering::Relaxed);
        let limit = next.bounded(self.floor, self.ceiling);
        tracing::debug!(
            target: "tower_bulwark::backpressure",
            limit,
            avg_rtt_us = sample.avg_rtt_nanos / 1_000,
            fast_half_rtt_us = sample.fast_half_rtt_nanos / 1_000,
            min_rtt_us = sample.min_rtt_nanos / 1_000,
            samples = sample.count,
            failures = failed_all,
            overload_failures = sample.failures,
            peak_in_flight = sample.peak_in_flight,
            no_load_rtt_us = next.no_load_rtt_nanos / 1_000,
            jitter = next.jitter,
            rise_rtt_us = next.rise_rtt_nanos / 1_000,
            rise_in_flight = next.rise_in_flight,
            "backpressure: adaptive limit updated"
        );
        Some(limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample(avg: u64, min: u64, peak: u32, failures: u32) -> Sample {
        Sample {
            count: 100,
            failures,
            avg_rtt_nanos: avg,
            fast_half_rtt_nanos: avg,
            min_rtt_nanos: min,
            peak_in_flight: peak,
        }
    }

    #[test]
    fn aimd_backs_off_on_failure_and_grows_when_used() {
        let a = Aimd::default();
        let est = Estimate::new(100.0);
        let down = a.update(est, &sample(10, 10, 100, 1), 1, 1000);
        assert!((down.limit - 90.0).abs() < 1e-9);
        let up = a.update(est, &sample(10, 10, 100, 0), 1, 1000);
        assert!((up.limit - 101.0).abs() < 1e-9);
        let idle = a.update(est, &sample(10, 10, 10, 0), 1, 1000);
        assert_eq!(idle.limit, 100.0);
        let slow = Aimd::default().latency_threshold(Duration::from_nanos(50));
        let down = slow.update(est, &sample(60, 10, 100, 0), 1, 1000);
        assert!(down.limit < 100.0);
    }

    #[test]
    fn gradient_grows_at_no_load_and_shrinks_under_queueing() {
        let g = Gradient::default();
        let est = Estimate {
            limit: 100.0,
            no_load_rtt_nanos: 1_000,
            windows: 1,
            ..Estimate::default()
        };
        let up = g.update(est, &sample(1_000, 1_000, 100, 0), 1, 1000);
        assert!(up.limit > 100.0, "{up:?}");
        let down = g.update(est, &sample(4_000, 1_000, 100, 0), 1, 1000);
        assert!(down.limit < 100.0, "{down:?}");
        assert_eq!(down.no_load_rtt_nanos, 1_000);
    }

    #[test]
    fn slow_start_doubles_until_congestion() {
        let alg = Algorithm::Gradient(Gradient::default());
        // A window that used the limit at the lowest latency: doubled.
        let (e, on) = slow_start_update(
            &alg,
            Estimate::new(16.0),
            &sample(1_000, 1_000, 16, 0),
            1,
            1024,
            f64::INFINITY,
        );
        assert!(on);
        assert_eq!((e.limit, e.no_load_rtt_nanos), (32.0, 1_000));
        // Idle: unchanged, still in slow start.
        let (idle, on) =
            slow_start_update(&alg, e, &sample(1_000, 1_000, 4, 0), 1, 1024, f64::INFINITY);
        assert!(on);
        assert_eq!(idle.limit, 32.0);
        // Bounded by the ceiling.
        let high = Estimate { limit: 800.0, ..e };
        let (top, _) = slow_start_update(
            &alg,
            high,
            &sample(1_000, 1_000, 800, 0),
            1,
            1024,
            f64::INFINITY,
        );
        assert_eq!(top.limit, 1024.0);
        // Latency rose (the mean half again above the no-load mean): ends, cut by the ratio.
        let busy = Estimate { limit: 200.0, ..e };
        let (cut, on) = slow_start_update(
            &alg,
            busy,
            &sample(2_000, 1_300, 200, 0),
            1,
            1024,
            f64::INFINITY,
        );
        assert!(!on);
        assert!((cut.limit - 100.0).abs() < 1e-9, "{cut:?}");
        assert_eq!(cut.no_load_rtt_nanos, 1_000);
        // A failure: ends with the algorithm's back-off.
        let aimd = Algorithm::Aimd(Aimd::default());
        let (back, on) = slow_start_update(
            &aimd,
            e,
            &sample(1_000, 1_000, 32, 1),
            1,
            1024,
            f64::INFINITY,
        );
        assert!(!on);
        assert!((back.limit - 28.8).abs() < 1e-9, "{back:?}");
        // AIMD past its latency threshold: ends with its back-off.
        let slow = Algorithm::Aimd(Aimd::default().latency_threshold(Duration::from_nanos(1_100)));
        let (back, on) = slow_start_update(
            &slow,
            e,
            &sample(1_200, 1_000, 32, 0),
            1,
            1024,
            f64::INFINITY,
        );
        assert!(!on);
        assert!(back.limit < 32.0, "{back:?}");
    }

    #[test]
    fn gradient_compares_a_mean_with_a_mean() {
        let g = Gradient::default();
        // Latency varying from 5 to 14 ms with no queue: mean 9.5 ms, lowest 5 ms. The first
        // window sets the no-load latency to the mean, and the next ones, alike, grow it.
        let varying = Sample::new(500, 0, 9_500_000, 5_000_000, 100);
        let mut est = g.update(Estimate::new(100.0), &varying, 1, 1000);
        assert_eq!(est.no_load_rtt_nanos, 9_500_000);
        for _ in 0..10 {
            let next = g.update(est, &varying, 1, 1000);
            assert!(next.limit > est.limit, "{next:?}");
            est = next;
        }
        // A lower mean at the same concurrency pulls the no-load latency a quarter of the
        // way down, and is jitter (latency that moved on its own); a mean far above it
        // (queueing, with twice the requests in flight) leaves the no-load latency, and
        // adds no jitter: the concurrency explains it.
        let lower = g.update(
            est,
            &Sample::new(500, 0, 7_500_000, 5_000_000, 100),
            1,
            1000,
        );
        assert_eq!(lower.no_load_rtt_nanos, 9_000_000);
        assert!(lower.jitter > 0.02, "{lower:?}");
        let queued = g.update(
            lower,
            &Sample::new(500, 0, 15_000_000, 9_000_000, 200),
            1,
            1000,
        );
        assert_eq!(queued.no_load_rtt_nanos, 9_000_000);
        assert!(queued.jitter < lower.jitter, "{queued:?}");
        assert!(queued.limit < lower.limit, "{queued:?}");
        // A mean within the jitter's allowance brings it back up a quarter of the way, and
        // means that keep varying a little keep it near them, but never above the latency
        // last measured (the first window's 9.5 ms).
        let back = g.update(
            lower,
            &Sample::new(500, 0, 9_400_000, 5_000_000, 100),
            1,
            1000,
        );
        assert_eq!(back.no_load_rtt_nanos, 9_100_000);
        assert!(back.limit > lower.limit, "{back:?}");
        let mut near = back;
        for i in 0..40 {
            let avg = if i % 2 == 0 { 9_600_000 } else { 9_400_000 };
            near = g.update(near, &Sample::new(500, 0, avg, 5_000_000, 100), 1, 1000);
            assert!(near.no_load_rtt_nanos <= 9_500_000, "{i}: {near:?}");
        }
        assert!(near.no_load_rtt_nanos >= 9_400_000, "{near:?}");
        // Nor does a window with failures (failing fast is not being fast).
        let failing = g.update(est, &Sample::new(500, 5, 1_000, 1_000, 200), 1, 1000);
        assert_eq!(failing.no_load_rtt_nanos, est.no_load_rtt_nanos);
        // The probe's window sets it to its mean.
        let probe = Estimate {
            probe_saved: 150.0,
            ..est
        };
        let back = g.update(
            probe,
            &Sample::new(3, 0, 12_000_000, 11_000_000, 1),
            1,
            1000,
        );
        assert_eq!((back.limit, back.no_load_rtt_nanos), (150.0, 12_000_000));
    }

    #[test]
    fn slow_start_ignores_variance_and_stops_at_its_cap() {
        let alg = Algorithm::Gradient(Gradient::default());
        let est = Estimate {
            no_load_rtt_nanos: 9_500_000,
            ..Estimate::new(64.0)
        };
        // A window whose mean is a little above the no-load mean: still doubling.
        let (next, on) = slow_start_update(
            &alg,
            est,
            &sample(11_000_000, 5_000_000, 64, 0),
            1,
            1024,
            f64::INFINITY,
        );
        assert!(on);
        assert_eq!(next.limit, 128.0);
        // Recovering up to 100: doubles to it, then ends.
        let (next, on) = slow_start_update(
            &alg,
            est,
            &sample(9_500_000, 5_000_000, 64, 0),
            1,
            1024,
            100.0,
        );
        assert!(!on);
        assert_eq!(next.limit, 100.0);
        let low = Estimate { limit: 20.0, ..est };
        let (next, on) = slow_start_update(
            &alg,
            low,
            &sample(9_500_000, 5_000_000, 20, 0),
            1,
            1024,
            100.0,
        );
        assert!(on);
        assert_eq!(next.limit, 40.0);
    }

    #[test]
    fn after_failures_the_limit_doubles_back_to_the_first_cut() {
        let shared = Shared::new(64, None, None);
        let state = AdaptiveState::new(
            &Adaptive::aimd(Aimd::default())
                .initial(64)
                .min_samples(1)
                .window(Duration::from_millis(10)),
        );
        let ms = 1_000_000;
        let mut now = 0;
        let mut limit = 64;
        let mut step = |failed: bool, limit: u32| {
            shared.note_peak(limit);
            now += 11 * ms;
            state.record(now, ms, failed, false, &shared)
        };
        step(false, limit);
        // Twenty windows of failures: 64 × 0.9 = 57.6 first, then down to 7.8.
        for _ in 0..20 {
            limit = step(true, limit).unwrap();
        }
        assert_eq!(limit, 8);
        // Successes: doubling back up to the first cut's 57.6, one round trip each.
        let mut seen = Vec::new();
        for _ in 0..6 {
            limit = step(false, limit).unwrap();
            seen.push(limit);
        }
        assert_eq!(seen[..3], [16, 31, 58], "{seen:?}");
        // Then the algorithm's own steps: one per window.
        assert_eq!(seen[3..], [59, 60, 61], "{seen:?}");
    }

    #[test]
    fn the_fast_half_is_read_from_the_buckets() {
        // Buckets grow with the latency, a quarter octave each.
        let mut last = 0;
        for rtt in (0..40_000_000u64).step_by(997) {
            let b = hist_bucket(rtt);
            assert!(b >= last && b < HIST_BUCKETS, "{rtt}: {b}");
            last = b;
        }
        assert_eq!(hist_bucket(u64::MAX), HIST_BUCKETS - 1);
        let fill = |rtts: &[u64]| {
            let mut counts = [0u32; HIST_BUCKETS];
            let mut sums = [0u64; HIST_BUCKETS];
            for &r in rtts {
                counts[hist_bucket(r)] += 1;
                sums[hist_bucket(r)] += r;
            }
            fast_half_mean(&counts, &sums)
        };
        assert_eq!(fill(&[]), None);
        // One latency: exactly it.
        assert_eq!(fill(&[10_000_000; 7]), Some(10_000_000));
        // One request in 20 at 500 ms, the others at 10 ms: the mean is 34.5 ms, the faster
        // half's 10 ms.
        let mut rtts = vec![10_000_000u64; 19];
        rtts.push(500_000_000);
        assert_eq!(fill(&rtts.repeat(5)), Some(10_000_000));
        // A queue that delays every request by 5 ms moves it by as much.
        let queued: Vec<u64> = rtts.iter().map(|r| r + 5_000_000).collect();
        assert_eq!(fill(&queued.repeat(5)), Some(15_000_000));
        // 1 to 10 ms evenly: the faster half's mean is about 3 ms (within a bucket's share).
        let spread: Vec<u64> = (1..=10).map(|ms| ms * 1_000_000).collect();
        let half = fill(&spread).unwrap();
        assert!((2_800_000..=3_200_000).contains(&half), "{half}");
    }

    #[test]
    fn gradient_reads_the_fast_half_not_the_mean() {
        let g = Gradient::default();
        let est = Estimate {
            limit: 200.0,
            no_load_rtt_nanos: 10_000_000,
            reference_rtt_nanos: 10_000_000,
            windows: 1,
            ..Estimate::default()
        };
        // A mean of 34.5 ms from a few slow requests, the faster half at the no-load 10 ms:
        // no queueing, the limit grows.
        let varied = Sample::new(500, 0, 34_500_000, 10_000_000, 173).fast_half(10_000_000);
        let next = g.update(est, &varied, 1, 1000);
        assert!(next.limit > est.limit, "{next:?}");
        assert_eq!(next.no_load_rtt_nanos, 10_000_000);
        // The faster half doubled: queueing, cut.
        let queued = Sample::new(500, 0, 40_000_000, 20_000_000, 200).fast_half(20_000_000);
        let next = g.update(est, &queued, 1, 1000);
        assert!(next.limit < est.limit, "{next:?}");
        // Slow start reads it too.
        let alg = Algorithm::Gradient(g);
        let (next, on) = slow_start_update(&alg, est, &varied, 1, 1000, f64::INFINITY);
        assert!(on);
        assert_eq!(next.limit, 400.0);
        let (next, on) = slow_start_update(&alg, est, &queued, 1, 1000, f64::INFINITY);
        assert!(!on);
        assert!(next.limit < est.limit, "{next:?}");
    }

    #[test]
    fn failures_count_only_above_the_failure_rate() {
        let ms = 1_000_000;
        // Windows of about 100 samples (10 ms windows, a sample every 0.1 ms), of which
        // `failed` in a hundred fail, spread evenly; returns the limit after 20 windows,
        // from 64, slow start off.
        let run = |adaptive: Adaptive, failed: u32| {
            let shared = Shared::new(64, None, None);
            let state = AdaptiveState::new(
                &adaptive
                    .initial(64)
                    .slow_start(false)
                    .window(Duration::from_millis(10)),
            );
            let mut limit = 64;
            let mut now = 0;
            for _ in 0..21 {
                for i in 0..100 {
                    shared.note_peak(limit);
                    now += ms / 10;
                    let fails = failed > 0 && i % (100 / failed) == 0;
                    if let Some(l) = state.record(now, ms, fails, false, &shared) {
                        limit = l;
                    }
                }
            }
            limit
        };
        for alg in [
            Adaptive::aimd(Aimd::default()),
            Adaptive::gradient(Gradient::default()),
        ] {
            // A tenth or less: background errors, the limit grows as with none.
            let clean = run(alg.clone(), 0);
            assert!(clean > 64, "{alg:?}: {clean}");
            assert_eq!(run(alg.clone(), 1), clean, "{alg:?}");
            assert_eq!(run(alg.clone(), 5), clean, "{alg:?}");
            // More: overload, cut every window.
            assert!(run(alg.clone(), 12) < 16, "{alg:?}");
            // A rate of 0 makes any failure count.
            assert!(run(alg.clone().failure_rate(0.0), 1) < 16, "{alg:?}");
            // A higher rate lets more through.
            assert_eq!(run(alg.clone().failure_rate(0.3), 20), clean, "{alg:?}");
        }
        for bad in [1.0, -0.1, f64::NAN] {
            assert!(matches!(
                Adaptive::aimd(Aimd::default()).failure_rate(bad).validate(),
                Err(ConfigError::BadFactor {
                    name: "failure_rate",
                    ..
                })
            ));
        }
    }

    #[test]
    fn dropped_requests_follow_their_policy() {
        let shared = Shared::new(8, None, None);
        let state = |d: Dropped| {
            AdaptiveState::new(
                &Adaptive::aimd(Aimd::default())
                    .initial(8)
                    .min_samples(1)
                    .dropped(d),
            )
        };
        let ms = 1_000_000;
        let ignore = state(Dropped::Ignore);
        let after = state(Dropped::FailureAfter(Duration::from_millis(50)));
        // The first sample opens the first window; later ones past its end close it.
        for (i, t) in [0u64, 200, 400].into_iter().enumerate() {
            let now = t * ms;
            assert_eq!(ignore.record_dropped(now, 60 * ms, &shared), None);
            let next = after.record_dropped(now, 60 * ms, &shared);
            if i > 0 {
                assert!(next.is_some_and(|l| l < 8), "{i}: {next:?}");
            }
            // Dropped sooner than the policy's time: no sample.
            assert_eq!(after.record_dropped(now, 40 * ms, &shared), None);
        }
        assert_eq!(
            Adaptive::aimd(Aimd::default()).dropped,
            Dropped::FailureAfter(Duration::from_millis(100))
        );
    }

    #[test]
    fn bad_configs_are_refused() {
        assert_eq!(
            Adaptive::aimd(Aimd::default()).floor(0).validate(),
            Err(ConfigError::ZeroFloor)
        );
        assert!(matches!(
            Adaptive::aimd(Aimd::default())
                .floor(10)
                .ceiling(5)
                .validate(),
            Err(ConfigError::BadBounds { .. })
        ));
        assert!(matches!(
            Adaptive::aimd(Aimd::default()).initial(5000).validate(),
            Err(ConfigError::InitialOutOfBounds { .. })
        ));
        assert!(matches!(
            Adaptive::aimd(Aimd::default().backoff(f64::NAN)).validate(),
            Err(ConfigError::BadFactor {
                name: "backoff",
                ..
            })
        ));
        assert!(matches!(
            Adaptive::aimd(Aimd::default().backoff(1.0)).validate(),
            Err(ConfigError::BadFactor { .. })
        ));
        assert!(matches!(
            Adaptive::gradient(Gradient::default().tolerance(0.5)).validate(),
            Err(ConfigError::BadFactor {
                name: "tolerance",
                ..
            })
        ));
        assert_eq!(
            Adaptive::gradient(Gradient::default())
                .window(Duration::ZERO)
                .validate(),
            Err(ConfigError::ZeroWindow)
        );
        assert!(Adaptive::gradient(Gradient::default()).validate().is_ok());
    }

    /// A dependency that serves `c` requests at once in `base` and queues the rest: latency
    /// at concurrency `n` is `base × max(1, n / c)`. The limit is the concurrency.
    /// Returns the limit after each window, leaving out the windows that measure the no-load
    /// latency at the floor.
    fn simulate(alg: Algorithm, c: u32, windows: usize) -> Vec<u32> {
        let base = 10_000_000u64;
        let (floor, ceiling) = (1, 10 * c);
        let mut est = Estimate::new(8.0);
        let mut out = Vec::with_capacity(windows);
        for _ in 0..windows {
            let n = est.bounded(floor, ceiling);
            let rtt = base * u64::from(n.max(c)) / u64::from(c);
            let s = Sample {
                count: 50,
                failures: 0,
                avg_rtt_nanos: rtt,
                fast_half_rtt_nanos: rtt,
                min_rtt_nanos: rtt,
                peak_in_flight: n,
            };
            est = alg.update(est, &s, floor, ceiling);
            if est.probe_saved == 0.0 {
                out.push(est.bounded(floor, ceiling));
            }
        }
        out
    }

    #[test]
    fn pure_convergence_within_20_percent() {
        for c in [50u32, 100, 400, 2000] {
            let aimd = Aimd::default().latency_threshold(Duration::from_millis(11));
            for alg in [
                Algorithm::Aimd(aimd),
                Algorithm::Gradient(Gradient::default()),
            ] {
                let limits = simulate(alg, c, 4000);
                assert!(limits.len() > 3900);
                for &l in &limits[3000..] {
                    let err = (f64::from(l) - f64::from(c)).abs() / f64::from(c);
                    assert!(err <= 0.2, "{alg:?} c={c}: limit {l}");
                }
            }
        }
    }

    fn any_sample() -> impl Strategy<Value = Sample> {
        (
            1u32..10_000,
            0u32..100,
            0u64..10_000_000_000,
            0u64..10_000_000_000,
            0u32..100_000,
        )
            .prop_map(|(count, failures, avg, min, peak)| Sample {
                count,
                failures: failures.min(count),
                avg_rtt_nanos: avg.max(min),
                fast_half_rtt_nanos: avg.max(min),
                min_rtt_nanos: min.min(avg),
                peak_in_flight: peak,
            })
    }

    fn any_algorithm() -> impl Strategy<Value = Algorithm> {
        prop_oneof![
            (0.01f64..0.99, 0.1f64..50.0).prop_map(|(b, i)| Algorithm::Aimd(
                Aimd::default()
                    .backoff(b)
                    .increase(i)
                    .latency_threshold(Duration::from_millis(5))
            )),
            (1.0f64..3.0, 0.01f64..1.0, 0.01f64..0.99, 3u64..1000).prop_map(|(t, s, b, p)| {
                Algorithm::Gradient(
                    Gradient::default()
                        .tolerance(t)
                        .smoothing(s)
                        .backoff(b)
                        .probe_every(p),
                )
            }),
        ]
    }

    proptest! {
        /// Whatever the samples, the limit stays finite and within its bounds.
        #[test]
        fn limit_stays_within_bounds(
            alg in any_algorithm(),
            floor in 1u32..100,
            span in 0u32..10_000,
            start in 0f64..20_000.0,
            samples in proptest::collection::vec(any_sample(), 1..50),
        ) {
            let ceiling = floor + span;
            let mut est = Estimate::new(start);
            for s in &samples {
                est = alg.update(est, s, floor, ceiling);
                prop_assert!(est.limit.is_finite());
                prop_assert!(est.limit >= f64::from(floor) && est.limit <= f64::from(ceiling));
                let l = est.bounded(floor, ceiling);
                prop_assert!(l >= floor && l <= ceiling);
            }
        }

        /// Slow start keeps the limit finite and within its bounds, and a failure ends it.
        #[test]
        fn slow_start_stays_within_bounds(
            alg in any_algorithm(),
            floor in 1u32..100,
            span in 0u32..10_000,
            start in 0f64..20_000.0,
            samples in proptest::collection::vec(any_sample(), 1..50),
        ) {
            let ceiling = floor + span;
            let mut est = Estimate::new(start);
            for s in &samples {
                let (next, on) = slow_start_update(&alg, est, s, floor, ceiling, f64::INFINITY);
                prop_assert!(next.limit.is_finite());
                prop_assert!(next.limit >= f64::from(floor) && next.limit <= f64::from(ceiling));
                if s.failures > 0 {
                    prop_assert!(!on);
                }
                est = next;
                if !on {
                    break;
                }
            }
        }

        /// A window with failures never raises the limit.
        #[test]
        fn failures_never_raise(alg in any_algorithm(), s in any_sample(), start in 1f64..5000.0) {
            let s = Sample { failures: s.failures.max(1), ..s };
            let est = Estimate { limit: start, no_load_rtt_nanos: 1_000, windows: 1, ..Estimate::default() };
            let next = alg.update(est, &s, 1, 10_000);
            prop_assert!(next.limit <= start.max(1.0));
        }

        /// An idle window (less than half of the limit used, no failures) never changes it.
        #[test]
        fn idle_windows_change_nothing(alg in any_algorithm(), s in any_sample(), start in 4f64..5000.0) {
            let s = Sample {
                failures: 0,
                peak_in_flight: (start / 2.0) as u32 - 1,
                avg_rtt_nanos: 1,
                fast_half_rtt_nanos: 1,
                min_rtt_nanos: 1,
                ..s
            };
            let est = Estimate { limit: start, no_load_rtt_nanos: 1, windows: 1, ..Estimate::default() };
            let next = alg.update(est, &s, 1, 10_000);
            prop_assert_eq!(next.limit, start);
        }

        /// The gradient never moves the limit down by more than half in one window, nor up
        /// by more than its queue allowance.
        #[test]
        fn gradient_steps_are_bounded(s in any_sample(), start in 1f64..5000.0, no_load in 1u64..1_000_000) {
            let s = Sample { failures: 0, peak_in_flight: 100_000, ..s };
            let g = Gradient::default().smoothing(1.0);
            let est = Estimate { limit: start, no_load_rtt_nanos: no_load, windows: 1, ..Estimate::default() };
            let next = g.update(est, &s, 1, 100_000);
            prop_assert!(next.limit >= (start * 0.5).max(1.0) - 1e-9);
            prop_assert!(next.limit <= start + start.sqrt() + 1e-9);
        }
    }
}

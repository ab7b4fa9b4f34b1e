//! Exponential backoff with jitter, drawn from the crate's random generator (`util::rng`).

use std::time::Duration;

use crate::clock::duration_nanos;

use super::ConfigError;

/// How a backoff delay is spread at random, so that clients that failed together do not retry
/// together.
///
/// With `d = min(max, base × multiplier^n)` the ceiling of the `n`-th retry (`n` from 0):
///
/// | jitter | delay |
/// |---|---|
/// | [`Full`](Jitter::Full) (the default) | uniform in `[0, d]` |
/// | [`Equal`](Jitter::Equal) | `d / 2` plus uniform in `[0, d / 2]` |
/// | [`Decorrelated`](Jitter::Decorrelated) | uniform in `[base, 3 × previous delay]`, at most `max` (the first previous delay is `base`) |
/// | [`Proportional(f)`](Jitter::Proportional) | `d × (1 - f × u)`, `u` uniform in `[0, 1]`, `f` in `[0, 1]` |
/// | [`None`](Jitter::None) | `d` |
///
/// Full jitter spreads retries the most and finishes the work soonest overall (as the AWS
/// architecture blog's study of backoff found); equal jitter guarantees half of the ceiling;
/// decorrelated jitter grows from the previous delay rather than from the attempt number.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[non_exhaustive]
pub enum Jitter {
    /// Uniform in `[0, d]`.
    #[default]
    Full,
    /// `d / 2` plus uniform in `[0, d / 2]`.
    Equal,
    /// Uniform in `[base, 3 × previous delay]`, capped at the maximum delay.
    Decorrelated,
    /// `d × (1 - f × u)` with `u` uniform in `[0, 1]`; `f` must lie in `[0, 1]`.
    Proportional(f64),
    /// No jitter: exactly `d`.
    None,
}

/// An exponential backoff: `min(max, base × multiplier^n)` for the `n`-th retry, spread by a
/// [`Jitter`].
///
/// Built with [`Backoff::exponential`]; checked when the [`RetryLayer`](super::RetryLayer) is
/// built (a multiplier below 1, a NaN, a negative or too large jitter, a maximum below the
/// base, and a zero base with a maximum that is not zero, which would never wait, are refused
/// with a [`ConfigError`]; [`Backoff::none`] is the one backoff with no wait).
///
/// ```
/// use std::time::Duration;
/// use tower_bulwark::retry::{Backoff, Jitter};
///
/// let backoff = Backoff::exponential(Duration::from_millis(50), Duration::from_secs(2))
///     .multiplier(2.0)
///     .jitter(Jitter::Equal);
/// assert_eq!(backoff.ceiling(3), Duration::from_millis(400));
/// assert_eq!(backoff.ceiling(10), Duration::from_secs(2));
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    multiplier: f64,
    jitter: Jitter,
}

impl Default for Backoff {
    /// 25 ms doubling up to 1 s, full jitter.
    fn default() -> Self {
        Backoff::exponential(Duration::from_millis(25), Duration::from_secs(1))
    }
}

impl Backoff {
    /// `base` doubling on each retry up to `max`, with full jitter.
    pub fn exponential(base: Duration, max: Duration) -> Self {
        Backoff {
            base,
            max,
            multiplier: 2.0,
            jitter: Jitter::Full,
        }
    }

    /// No wait at all between attempts.
    pub fn none() -> Self {
        Backoff::exponential(Duration::ZERO, Duration::ZERO).jitter(Jitter::None)
    }

    /// The growth factor per retry (at least 1; 2 by default).
    pub fn multiplier(mut self, multiplier: f64) -> Self {
        self.multiplier = multiplier;
        self
    }

    /// The jitter ([`Jitter::Full`] by default).
    pub fn jitter(mut self, jitter: Jitter) -> Self {
        self.jitter = jitter;
        self
    }

    /// The first delay's ceiling.
    pub fn base(&self) -> Duration {
        self.base
    }

    /// The largest delay. Server hints (`Retry-After`, `grpc-retry-pushback-ms`, a
    /// rejection's `retry_after`) have a bound of their own,
    /// [`RetryPolicy::max_hint`](super::RetryPolicy::max_hint).
    pub fn max(&self) -> Duration {
        self.max
    }

    /// The ceiling of the `n`-th retry's delay (from 0), before jitter:
    /// `min(max, base × multiplier^n)`.
    pub fn ceiling(&self, n: u32) -> Duration {
        Duration::from_nanos(self.ceiling_nanos(n))
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if !self.multiplier.is_finite() || self.multiplier < 1.0 {
            return Err(ConfigError::Multiplier(self.multiplier));
        }
        if let Jitter::Proportional(f) = self.jitter {
            if !(0.0..=1.0).contains(&f) {
                return Err(ConfigError::Jitter(f));
            }
        }
        if self.max < self.base {
            return Err(ConfigError::MaxBelowBase);
        }
        if self.base.is_zero() && !self.max.is_zero() {
            return Err(ConfigError::ZeroBase);
        }
        Ok(())
    }

    pub(crate) fn ceiling_nanos(&self, n: u32) -> u64 {
        let base = duration_nanos(self.base) as f64;
        let max = duration_nanos(self.max);
        let exp = i32::try_from(n).unwrap_or(i32::MAX);
        let d = base * self.multiplier.powi(exp);
        // `as` saturates for floats (infinity becomes u64::MAX), and the cap applies after.
        (d as u64).min(max)
    }

    /// The delay before the `n`-th retry (from 0). `prev` is the previous delay in nanoseconds
    /// (used by decorrelated jitter; 0 before the first retry); `u` is uniform in `[0, 1)`.
    pub(crate) fn delay_nanos(&self, n: u32, prev: u64, u: f64) -> u64 {
        let ceil = self.ceiling_nanos(n);
        let max = duration_nanos(self.max);
        let d = match self.jitter {
            Jitter::Full => ceil as f64 * u,
            Jitter::Equal => ceil as f64 / 2.0 + ceil as f64 / 2.0 * u,
            Jitter::Decorrelated => {
                let base = duration_nanos(self.base) as f64;
                let prev = if prev == 0 { base } else { prev as f64 };
                let hi = (prev * 3.0).max(base);
                base + (hi - base) * u
            }
            Jitter::Proportional(f) => ceil as f64 * (1.0 - f * u),
            Jitter::None => ceil as f64,
        };
        (d as u64).min(max)
    }

    /// The delay before the `n`-th retry, drawn from `rng`.
    pub(crate) fn delay(&self, n: u32, prev: u64, rng: &Rng) -> u64 {
        let u = if matches!(self.jitter, Jitter::None) {
            0.0
        } else {
            rng.next_f64()
        };
        self.delay_nanos(n, prev, u)
    }
}

pub(crate) use crate::util::rng::Rng;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::{prop_assert, prop_assert_eq, prop_oneof, proptest, Just, Strategy};

    const MS: u64 = 1_000_000;

    fn mean(b: &Backoff, n: u32, seed: u64) -> f64 {
        let rng = Rng::seeded(seed);
        let samples = 10_000;
        let sum: f64 = (0..samples).map(|_| b.delay(n, 0, &rng) as f64).sum();
        sum / f64::from(samples)
    }

    #[test]
    fn full_jitter_mean_is_half_the_ceiling() {
        let b = Backoff::exponential(Duration::from_millis(100), Duration::from_secs(10));
        for n in 0..5 {
            let ceil = b.ceiling_nanos(n) as f64;
            let m = mean(&b, n, 42 + u64::from(n));
            assert!((m - ceil / 2.0).abs() < ceil / 2.0 * 0.05, "n={n} mean {m}");
        }
    }

    #[test]
    fn equal_jitter_mean_is_three_quarters() {
        let b = Backoff::exponential(Duration::from_millis(100), Duration::from_secs(10))
            .jitter(Jitter::Equal);
        let ceil = b.ceiling_nanos(2) as f64;
        let m = mean(&b, 2, 7);
        assert!((m - ceil * 0.75).abs() < ceil * 0.75 * 0.05, "mean {m}");
    }

    #[test]
    fn decorrelated_jitter_first_mean_is_twice_base() {
        let b = Backoff::exponential(Duration::from_millis(100), Duration::from_secs(10))
            .jitter(Jitter::Decorrelated);
        let m = mean(&b, 0, 9);
        let want = 200.0 * MS as f64;
        assert!((m - want).abs() < want * 0.05, "mean {m}");
        // From a previous delay of 1 s, the next lies in [base, 3 s] with mean 1.55 s.
        let rng = Rng::seeded(3);
        let sum: f64 = (0..10_000)
            .map(|_| b.delay(1, 1_000 * MS, &rng) as f64)
            .sum();
        let m = sum / 10_000.0;
        let want = (100.0 + 3_000.0) / 2.0 * MS as f64;
        assert!((m - want).abs() < want * 0.05, "mean {m}");
    }

    #[test]
    fn proportional_jitter_mean() {
        let b = Backoff::exponential(Duration::from_millis(100), Duration::from_secs(10))
            .jitter(Jitter::Proportional(0.5));
        let ceil = b.ceiling_nanos(1) as f64;
        let m = mean(&b, 1, 11);
        assert!((m - ceil * 0.75).abs() < ceil * 0.75 * 0.05, "mean {m}");
    }

    #[test]
    fn rng_is_roughly_uniform() {
        let rng = Rng::seeded(1);
        let mut buckets = [0u32; 10];
        for _ in 0..100_000 {
            buckets[(rng.next_f64() * 10.0) as usize] += 1;
        }
        for b in buckets {
            assert!((9_000..11_000).contains(&b), "{buckets:?}");
        }
        let a = Rng::seeded(5);
        let b = Rng::seeded(5);
        assert_eq!(a.next_u64(), b.next_u64());
        assert_ne!(a.next_u64(), Rng::from_entropy().next_u64());
    }

    #[test]
    fn validation() {
        let b = Backoff::default();
        assert!(b.validate().is_ok());
        assert_eq!(
            b.multiplier(0.5).validate(),
            Err(ConfigError::Multiplier(0.5))
        );
        assert!(matches!(
            b.multiplier(f64::NAN).validate(),
            Err(ConfigError::Multiplier(_))
        ));
        assert!(matches!(
            b.jitter(Jitter::Proportional(f64::NAN)).validate(),
            Err(ConfigError::Jitter(_))
        ));
        assert_eq!(
            b.jitter(Jitter::Proportional(-0.1)).validate(),
            Err(ConfigError::Jitter(-0.1))
        );
        assert_eq!(
            Backoff::exponential(Duration::from_secs(2), Duration::from_secs(1)).validate(),
            Err(ConfigError::MaxBelowBase)
        );
        assert!(Backoff::none().validate().is_ok());
        // A zero base never waits, whatever the maximum: refused, with the field named.
        let zero = Backoff::exponential(Duration::ZERO, Duration::from_secs(1));
        assert_eq!(zero.validate(), Err(ConfigError::ZeroBase));
        assert!(ConfigError::ZeroBase.to_string().contains("base"));
        assert_eq!(
            zero.jitter(Jitter::Decorrelated).validate(),
            Err(ConfigError::ZeroBase)
        );
    }

    fn jitter() -> impl Strategy<Value = Jitter> {
        prop_oneof![
            Just(Jitter::Full),
            Just(Jitter::Equal),
            Just(Jitter::Decorrelated),
            Just(Jitter::None),
            (0.0f64..=1.0).prop_map(Jitter::Proportional),
        ]
    }

    proptest! {
        #[test]
        fn delays_within_bounds(
            base_ms in 0u64..10_000,
            extra_ms in 0u64..100_000,
            mult in 1.0f64..10.0,
            jitter in jitter(),
            n in 0u32..200,
            prev in 0u64..1_000_000_000_000,
            u in 0.0f64..1.0,
        ) {
            let base = Duration::from_millis(base_ms);
            let max = Duration::from_millis(base_ms + extra_ms);
            let b = Backoff::exponential(base, max).multiplier(mult).jitter(jitter);
            if base.is_zero() && !max.is_zero() {
                // Every delay would be zero: refused.
                prop_assert_eq!(b.validate(), Err(ConfigError::ZeroBase));
                return Ok(());
            }
            prop_assert!(b.validate().is_ok());
            let ceil = b.ceiling_nanos(n);
            prop_assert!(ceil <= duration_nanos(max));
            let d = b.delay_nanos(n, prev, u);
            prop_assert!(d <= duration_nanos(max));
            match jitter {
                Jitter::Full => prop_assert!(d <= ceil),
                Jitter::Equal => prop_assert!(d >= ceil / 2 && d <= ceil),
                Jitter::Decorrelated => {
                    prop_assert!(d >= duration_nanos(base).min(duration_nanos(max)));
                    let p = if prev == 0 { duration_nanos(base) } else { prev };
                    prop_assert!(d as f64 <= (p as f64 * 3.0).max(duration_nanos(base) as f64) + 1.0);
                }
                Jitter::Proportional(f) => {
                    prop_assert!(d <= ceil);
                    prop_assert!(d as f64 >= ceil as f64 * (1.0 - f) - 1.0);
                }
                Jitter::None => prop_assert_eq!(d, ceil),
            }
        }

        #[test]
        fn ceiling_grows_monotonically(base_ms in 1u64..1_000, mult in 1.0f64..5.0, n in 0u32..100) {
            let b = Backoff::exponential(Duration::from_millis(base_ms), Duration::from_secs(3600))
                .multiplier(mult);
            prop_assert!(b.ceiling_nanos(n) <= b.ceiling_nanos(n + 1));
        }
    }
}

//! The retry budget: retries stay below a share of requests over a sliding window.

use std::cell::Cell;
use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::clock::{duration_nanos, Clock};

use super::ConfigError;

const SLOTS: usize = 16;
const COUNT_MASK: u64 = 0xffff_ffff;
/// A mark packs an epoch (high 32 bits: 85 years of 625 ms slots before it wraps) and the
/// request total when it was set (low 32 bits: differences are taken modulo 2^32, exact while
/// a window holds fewer than 4 billion requests).
const MARK_BITS: u32 = 32;
const MARK_MASK: u64 = (1 << MARK_BITS) - 1;
const EPOCH_MASK: u64 = (1 << 32) - 1;

/// Shards of the request total: each thread counts on its own cache line, so threads that
/// share a budget do not contend for one.
pub(crate) const SHARDS: usize = 4;

/// A shard of the request total, alone on its cache line: the only state a request touches.
#[repr(align(128))]
#[derive(Default)]
struct Total(AtomicU64);

/// This thread's shard, given out in turn on its first request.
#[inline]
pub(crate) fn shard() -> usize {
    thread_local! {
        static SHARD: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    SHARD.with(|s| {
        let v = s.get();
        if v != usize::MAX {
            v
        } else {
            let v = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
            s.set(v);
            v
        }
    })
}

/// A retry budget shared by every clone of a layer, and by several layers if the same
/// `Budget` is given to each.
///
/// Over a sliding window (10 s by default), retries stay at or below `ratio × requests`
/// (`ratio` 0.2 by default) plus a floor of `min_per_second` retries per second (10 by default)
/// of the budget's age, up to the window (the first second counts whole, so a new client can
/// retry at once; a budget never lends more than that). These are the defaults of Finagle's retry budget; Envoy and gRPC budget retries
/// the same way.
///
/// # Why a budget and not only a maximum of attempts?
///
/// Three attempts per request triple the load on a dependency exactly when it is struggling,
/// and every layer of retries above multiplies it again: a retry storm. A budget bounds the
/// *extra* load retries may add, say 20%, whatever the failure rate, while still letting the
/// occasional failure be retried at once. When the budget is spent the last response or error
/// is returned as it is, and a `tracing` event says so.
///
/// # How it works
///
/// A request costs one `fetch_add` on a running total (sharded by thread, so that threads do
/// not contend) and no clock reading: a budget needs no nanoseconds. Retry decisions, which are rare, read the clock: the window is sixteen slots,
/// each a sixteenth of it; the first decision in a slot marks the running total there, and
/// the requests of the window are the total minus the oldest mark still in the window.
/// Retries are counted per slot. No lock anywhere. Two consequences, both on the side of
/// fewer retries: requests between a slot's start and its first retry decision are not
/// counted, and after a quiet spell longer than the window the ratio starts again from zero
/// (the floor still applies) and grows over the next window. Concurrent retry decisions may
/// overshoot the budget by at most their number.
///
/// # Clone
///
/// Clones share one budget.
///
/// ```
/// use std::time::Duration;
/// use tower_bulwark::clock::Clock;
/// use tower_bulwark::retry::Budget;
///
/// let (clock, hand) = Clock::manual();
/// let budget = Budget::builder()
///     .ratio(0.5)
///     .min_per_second(0)
///     .clock(clock)
///     .build()
///     .unwrap();
/// for _ in 0..4 {
///     budget.deposit();
/// }
/// hand.advance(Duration::from_millis(10));
/// assert!(budget.try_withdraw());
/// assert!(budget.try_withdraw());
/// assert!(!budget.try_withdraw()); // 2 retries for 4 requests: spent
/// ```
#[derive(Clone)]
pub struct Budget {
    inner: Arc<State>,
}

struct State {
    total: [Total; SHARDS],
    marks: [AtomicU64; SLOTS],
    retries: [AtomicU64; SLOTS],
    /// `f64` bits of the ratio.
    ratio: AtomicU64,
    min_per_second: AtomicU32,
    /// `floor(2^64 / slot width)`: epoch = (now × inv) >> 64.
    inv_width: u64,
    window_nanos: u64,
    created: u64,
    clock: Clock,
}

/// Builds a [`Budget`]; see [`Budget::builder`].
#[derive(Clone, Debug)]
pub struct BudgetBuilder {
    ratio: f64,
    min_per_second: u32,
    window: Duration,
    clock: Option<Clock>,
}

/// A snapshot of a [`Budget`]'s window.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub struct BudgetFigures {
    /// Requests deposited in the window.
    pub requests: u64,
    /// Retries withdrawn in the window.
    pub retries: u64,
    /// Retries the window allows in all: `ratio × requests + floor`.
    pub allowed: f64,
}

impl Default for Budget {
    /// Ratio 0.2, floor 10 retries per second, window 10 s, the default clock.
    fn default() -> Self {
        Budget::builder()
            .build()
            .expect("the default budget is valid")
    }
}

impl Budget {
    /// A budget of `ratio` retries per request with the default floor and window.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Ratio`] if `ratio` is NaN, negative or above 1000.
    pub fn ratio(ratio: f64) -> Result<Budget, ConfigError> {
        Budget::builder().ratio(ratio).build()
    }

    /// A builder with the defaults: ratio 0.2, floor 10 per second, window 10 s.
    pub fn builder() -> BudgetBuilder {
        BudgetBuilder {
            ratio: 0.2,
            min_per_second: 10,
            window: Duration::from_secs(10),
            clock: None,
        }
    }

    /// Counts one request (done by the retry layer for every request it sees): one atomic
    /// add, no clock reading.
    #[inline]
    pub fn deposit(&self) {
        self.deposit_on(shard());
    }

    /// [`deposit`](Self::deposit) on a shard the caller has already looked up.
    #[inline]
    pub(crate) fn deposit_on(&self, shard: usize) {
        self.inner.total[shard].0.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes one retry from the budget if it allows one; `false` when spent.
    pub fn try_withdraw(&self) -> bool {
        self.try_withdraw_at(self.inner.clock.now_nanos())
    }

    /// The window's figures now.
    pub fn figures(&self) -> BudgetFigures {
        self.figures_at(self.inner.clock.now_nanos())
    }

    /// Changes the ratio at run time.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Ratio`] if `ratio` is NaN, negative or above 1000.
    pub fn set_ratio(&self, ratio: f64) -> Result<(), ConfigError> {
        check_ratio(ratio)?;
        self.inner.ratio.store(ratio.to_bits(), Ordering::Relaxed);
        Ok(())
    }

    /// Changes the floor of retries per second at run time.
    pub fn set_min_per_second(&self, min_per_second: u32) {
        self.inner
            .min_per_second
            .store(min_per_second, Ordering::Relaxed);
    }

    /// The budget's clock, which the retry layer reads for its one time reading per request.
    pub(crate) fn clock(&self) -> &Clock {
        &self.inner.clock
    }

    #[inline]
    fn epoch(&self, now: u64) -> u64 {
        ((u128::from(now) * u128::from(self.inner.inv_width)) >> 64) as u64
    }

    /// Requests in the window: the total minus the oldest mark in the window (marking the
    /// current slot first if it has no mark).
    fn requests_in_window(&self, epoch: u64) -> u64 {
        let s = &*self.inner;
        let total = s
            .total
            .iter()
            .fold(0u64, |sum, t| sum.wrapping_add(t.0.load(Ordering::Relaxed)));
        let e = epoch & EPOCH_MASK;
        let slot = &s.marks[epoch as usize % SLOTS];
        let cur = slot.load(Ordering::Relaxed);
        if cur >> MARK_BITS != e {
            let _ = slot.compare_exchange(
                cur,
                (e << MARK_BITS) | (total & MARK_MASK),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
        for back in (0..SLOTS as u64).rev() {
            let want = epoch.wrapping_sub(back);
            let mark = s.marks[want as usize % SLOTS].load(Ordering::Relaxed);
            if mark >> MARK_BITS == want & EPOCH_MASK {
                return total.wrapping_sub(mark) & MARK_MASK;
            }
        }
        0
    }

    pub(crate) fn try_withdraw_at(&self, now: u64) -> bool {
        self.withdraw_at(now).is_some()
    }

    /// Takes one retry if the budget allows it, and returns the epoch it was counted in (for
    /// [`refund`](Self::refund)).
    pub(crate) fn withdraw_at(&self, now: u64) -> Option<u64> {
        let epoch = self.epoch(now);
        let f = self.figures_epoch(now, epoch);
        if (f.retries + 1) as f64 > f.allowed {
            return None;
        }
        let slot = &self.inner.retries[epoch as usize % SLOTS];
        bump(slot, epoch);
        // Check again with this withdrawal counted: of several threads that all saw room for
        // one more, those beyond the allowance take theirs back. (All of them may, which errs
        // towards fewer retries, never more.)
        let f = self.figures_epoch(now, epoch);
        if f.retries as f64 <= f.allowed {
            Some(epoch)
        } else {
            unbump(slot, epoch);
            None
        }
    }

    /// Gives back a retry withdrawn in `epoch` that was never made (its request went away
    /// during the backoff, or could not be sent again); nothing if the window moved past it.
    pub(crate) fn refund(&self, epoch: u64) {
        unbump(&self.inner.retries[epoch as usize % SLOTS], epoch);
    }

    pub(crate) fn figures_at(&self, now: u64) -> BudgetFigures {
        self.figures_epoch(now, self.epoch(now))
    }

    fn figures_epoch(&self, now: u64, epoch: u64) -> BudgetFigures {
        let s = &*self.inner;
        let requests = self.requests_in_window(epoch);
        let retries = sum(&s.retries, epoch);
        let ratio = f64::from_bits(s.ratio.load(Ordering::Relaxed));
        // The floor is a rate: `min_per_second` for each second of the budget's age (the
        // first second counts whole, so a new client can retry), up to the window.
        let age = now
            .saturating_sub(s.created)
            .max(1_000_000_000)
            .min(s.window_nanos);
        let floor = f64::from(s.min_per_second.load(Ordering::Relaxed)) * age as f64 / 1e9;
        BudgetFigures {
            requests,
            retries,
            allowed: ratio * requests as f64 + floor,
        }
    }
}

#[inline]
fn bump(slot: &AtomicU64, epoch: u64) {
    let tag = (epoch & COUNT_MASK) << 32;
    let mut cur = slot.load(Ordering::Relaxed);
    loop {
        let cur_tag = cur & !COUNT_MASK;
        // Same epoch, or a newer one (our reading of the clock is a little stale): count here.
        if cur_tag == tag || ((cur_tag >> 32) as u32).wrapping_sub(epoch as u32) as i32 > 0 {
            slot.fetch_add(1, Ordering::Relaxed);
            return;
        }
        // An old epoch: this slot starts again with our request.
        match slot.compare_exchange_weak(cur, tag | 1, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return,
            Err(actual) => cur = actual,
        }
    }
}

/// Takes back one count from `slot` if it still counts `epoch` (a slot that moved on to a
/// newer epoch has nothing of ours left to take back).
fn unbump(slot: &AtomicU64, epoch: u64) {
    let tag = (epoch & COUNT_MASK) << 32;
    let mut cur = slot.load(Ordering::Relaxed);
    while cur & !COUNT_MASK == tag && cur & COUNT_MASK > 0 {
        match slot.compare_exchange_weak(cur, cur - 1, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return,
            Err(actual) => cur = actual,
        }
    }
}

fn sum(slots: &[AtomicU64; SLOTS], epoch: u64) -> u64 {
    let e = epoch as u32;
    slots
        .iter()
        .map(|s| s.load(Ordering::Relaxed))
        .filter(|v| (e.wrapping_sub((v >> 32) as u32) as usize) < SLOTS)
        .map(|v| v & COUNT_MASK)
        .sum()
}

fn check_ratio(ratio: f64) -> Result<(), ConfigError> {
    if ratio.is_nan() || !(0.0..=1000.0).contains(&ratio) {
        Err(ConfigError::Ratio(ratio))
    } else {
        Ok(())
    }
}

impl BudgetBuilder {
    /// Retries allowed per request over the window (0.2 by default: 20% extra load at most).
    pub fn ratio(mut self, ratio: f64) -> Self {
        self.ratio = ratio;
        self
    }

    /// Retries allowed per second whatever the traffic (10 by default), so that a client with
    /// few requests can still retry.
    pub fn min_per_second(mut self, min_per_second: u32) -> Self {
        self.min_per_second = min_per_second;
        self
    }

    /// The sliding window (10 s by default; at least 16 ms), kept with a sixteenth's precision.
    pub fn window(mut self, window: Duration) -> Self {
        self.window = window;
        self
    }

    /// The budget's time source ([`Clock::new`] by default). Tests under tokio's paused time
    /// use `Clock::tokio()`.
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Checks the configuration and builds the budget.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Ratio`] for a NaN, negative or huge ratio, [`ConfigError::Window`] for
    /// a window under 16 ms.
    pub fn build(self) -> Result<Budget, ConfigError> {
        check_ratio(self.ratio)?;
        if self.window < Duration::from_millis(16) {
            return Err(ConfigError::Window(self.window));
        }
        let window_nanos = duration_nanos(self.window);
        let width = window_nanos / SLOTS as u64;
        let clock = self.clock.unwrap_or_default();
        let created = clock.now_nanos();
        let inv_width = u64::MAX / width;
        let first = ((u128::from(created) * u128::from(inv_width)) >> 64) as u64;
        let marks: [AtomicU64; SLOTS] = Default::default();
        marks[first as usize % SLOTS].store((first & EPOCH_MASK) << MARK_BITS, Ordering::Relaxed);
        Ok(Budget {
            inner: Arc::new(State {
                total: Default::default(),
                marks,
                retries: Default::default(),
                ratio: AtomicU64::new(self.ratio.to_bits()),
                min_per_second: AtomicU32::new(self.min_per_second),
                inv_width,
                window_nanos,
                created,
                clock,
            }),
        })
    }
}

impl fmt::Debug for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &*self.inner;
        f.debug_struct("Budget")
            .field("ratio", &f64::from_bits(s.ratio.load(Ordering::Relaxed)))
            .field("min_per_second", &s.min_per_second.load(Ordering::Relaxed))
            .field("window", &Duration::from_nanos(s.window_nanos))
            .field("figures", &self.figures())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: u64 = 1_000_000;

    fn budget(ratio: f64, floor: u32) -> (Budget, crate::clock::ManualClock) {
        let (clock, hand) = Clock::manual();
        let b = Budget::builder()
            .ratio(ratio)
            .min_per_second(floor)
            .clock(clock)
            .build()
            .unwrap();
        (b, hand)
    }

    #[test]
    fn ratio_bounds_retries() {
        let (b, _hand) = budget(0.1, 0);
        for _ in 0..100 {
            b.deposit();
        }
        let granted = (0..100).filter(|_| b.try_withdraw()).count();
        assert_eq!(granted, 10);
    }

    #[test]
    fn floor_accrues_with_age_up_to_the_window() {
        let (b, hand) = budget(0.0, 10);
        let granted = (0..100).filter(|_| b.try_withdraw()).count();
        assert_eq!(granted, 10, "the first second's floor at once");
        hand.advance(Duration::from_millis(2500));
        let granted = (0..100).filter(|_| b.try_withdraw()).count();
        assert_eq!(granted, 15, "25 for 2.5 s of age, 10 taken");
        hand.advance(Duration::from_secs(60));
        // Age is capped at the window (10 s): 100 in all; the 25 above slid out of the window.
        let granted = (0..1000).filter(|_| b.try_withdraw()).count();
        assert_eq!(granted, 100);
    }

    #[test]
    fn old_requests_slide_out() {
        let (b, hand) = budget(1.0, 0);
        for _ in 0..10 {
            b.deposit();
        }
        assert_eq!(b.figures().requests, 10);
        hand.advance(Duration::from_secs(11));
        assert_eq!(b.figures().requests, 0);
        assert!(!b.try_withdraw());
        b.deposit();
        assert!(b.try_withdraw());
        assert!(!b.try_withdraw());
    }

    #[test]
    fn run_time_changes() {
        let (b, _hand) = budget(0.0, 0);
        b.deposit();
        b.deposit();
        assert!(!b.try_withdraw());
        b.set_ratio(1.0).unwrap();
        assert!(b.try_withdraw());
        assert!(matches!(b.set_ratio(f64::NAN), Err(ConfigError::Ratio(_))));
        assert!(b.set_ratio(-1.0).is_err());
        let f = b.figures();
        assert_eq!((f.requests, f.retries), (2, 1));
        assert!(format!("{b:?}").contains("ratio"));
    }

    #[test]
    fn bad_configuration_refused() {
        assert!(matches!(
            Budget::ratio(f64::NAN),
            Err(ConfigError::Ratio(_))
        ));
        assert!(matches!(Budget::ratio(-0.5), Err(ConfigError::Ratio(_))));
        assert!(matches!(
            Budget::builder().window(Duration::from_millis(1)).build(),
            Err(ConfigError::Window(_))
        ));
        assert!(Budget::ratio(0.0).is_ok());
    }

    #[test]
    fn two_threads_count_every_request() {
        let (b, _hand) = budget(1.0, 0);
        std::thread::scope(|s| {
            for _ in 0..2 {
                let b = b.clone();
                s.spawn(move || {
                    for _ in 0..50_000 {
                        b.deposit();
                    }
                });
            }
        });
        assert_eq!(b.figures().requests, 100_000);
    }

    #[test]
    fn two_threads_withdrawing_overshoot_at_most_by_two() {
        let (b, _hand) = budget(0.5, 0);
        for _ in 0..10_000 {
            b.deposit();
        }
        let granted = std::sync::atomic::AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| {
                    for _ in 0..10_000 {
                        if b.try_withdraw() {
                            granted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        let granted = granted.into_inner();
        assert!((5_000..=5_002).contains(&granted), "{granted}");
        assert_eq!(b.figures().retries, granted);
    }

    #[test]
    fn after_a_quiet_spell_the_ratio_starts_again() {
        let (b, hand) = budget(1.0, 0);
        hand.advance(Duration::from_secs(60));
        // Requests made before any retry decision in this window are not counted...
        for _ in 0..5 {
            b.deposit();
        }
        assert!(!b.try_withdraw());
        // ...those after it are.
        for _ in 0..3 {
            b.deposit();
        }
        assert_eq!((0..10).filter(|_| b.try_withdraw()).count(), 3);
    }

    proptest! {
        /// Whatever the pattern of requests and retries over time, the retries granted within
        /// any one window never exceed `ratio × requests in the window + floor`.
        #[test]
        fn never_exceeds_allowance(
            ratio in 0.0f64..2.0,
            floor in 0u32..20,
            steps in proptest::collection::vec((0u64..300, 0u32..5, 0u32..5), 1..200),
        ) {
            let (b, hand) = budget(ratio, floor);
            // Every grant with its time: a grant lives in the window for at most 10 s.
            let mut requests: Vec<u64> = Vec::new();
            let mut grants: Vec<u64> = Vec::new();
            for (dt_ms, reqs, tries) in steps {
                hand.advance(Duration::from_millis(dt_ms));
                let now = hand.now_nanos();
                for _ in 0..reqs {
                    b.deposit();
                    requests.push(now);
                }
                for _ in 0..tries {
                    if !b.try_withdraw() {
                        continue;
                    }
                    grants.push(now);
                    // At the moment of a grant, the grants of the last 15/16 window (the least
                    // the slots cover) are bounded by the requests of the last full window.
                    let lo = now.saturating_sub(10_000 * MS * 15 / 16);
                    let reqs = requests.iter().filter(|&&t| t + 10_000 * MS >= now).count();
                    let recent = grants.iter().filter(|&&t| t > lo || lo == 0).count();
                    let floor_total =
                        f64::from(floor) * (now.clamp(1_000 * MS, 10_000 * MS) as f64 / 1e9);
                    prop_assert!(
                        recent as f64 <= ratio * reqs as f64 + floor_total + 1e-9,
                        "recent {} reqs {} floor {}", recent, reqs, floor_total
                    );
                }
            }
        }
    }
}

//! The retry budget: retries stay below a share of requests over a sliding window.

use std::cell::Cell;
use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::clock::{duration_nanos, Clock};

use super::ConfigError;

/// Slots per window: the window is sixteen of them.
const WINDOW_SLOTS: u64 = 16;
/// Slots kept: one more than the window, so that the retries of a whole window (the oldest
/// slot is partly out of it) are still counted when a retry is decided.
const SLOTS: usize = WINDOW_SLOTS as usize + 1;
/// A shard reads the clock on one deposit in `SAMPLE` at least (to mark the window's slot),
/// and on one in `SAMPLE_MAX` at least under heavy traffic: the stride doubles each time a
/// reading finds its slot already marked, and falls back to `SAMPLE` when one finds a new slot.
const SAMPLE: u64 = 8;
const SAMPLE_MAX: u64 = 64;
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
struct Total {
    count: AtomicU64,
    /// The count at which this shard next reads the clock.
    next: AtomicU64,
    /// The stride of those readings, from `SAMPLE` to `SAMPLE_MAX`.
    stride: AtomicU64,
}

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
/// retry at once; a budget never lends more than that). These are the defaults of Finagle's
/// retry budget; Envoy and gRPC budget retries the same way.
///
/// # Why a budget and not only a maximum of attempts?
///
/// Three attempts per request triple the load on a dependency exactly when it is struggling,
/// and every layer of retries above multiplies it again: a retry storm. A budget bounds the
/// *extra* load retries may add, whatever the failure rate: `ratio ×` the window's requests
/// (20% by default) plus the floor (10 per second by default, which dominates below about
/// 50 requests per second), while still letting the occasional failure be retried at once. When the budget is spent the last response or error
/// is returned as it is, and a `tracing` event says so.
///
/// # How it works
///
/// A request costs one `fetch_add` on a running total (sharded by thread, so that threads do
/// not contend). The window is sixteen slots, each a sixteenth of it; the first reading of the
/// clock in a slot marks the running total there, and the requests of the window are the
/// total minus the oldest mark in the window. Every request of the window counts, whether or
/// not a retry was decided in it: a shard also reads the clock on one deposit in 8, or, while
/// its readings keep finding their slot marked already (heavy traffic), one in up to 64 (an
/// amortised nanosecond or less), so that steady traffic marks every slot within a few
/// requests of its start, and retry decisions mark theirs. Retries are counted per slot. No lock anywhere.
///
/// The window's edge is kept to a slot's precision, always on the side of fewer retries: the
/// requests counted are those since the oldest mark that is wholly in the window (they lose at
/// most a slot's worth, and a few requests between marks), while the retries counted reach a
/// slot further back. So at any retry decision, the retries of the last window stay within
/// `ratio ×` the requests of that window `+ min_per_second ×` its length, as the property tests
/// check against a model of the definition. Concurrent retry decisions may overshoot the budget
/// by at most their number.
///
/// # Clock
///
/// A budget built with [`BudgetBuilder::clock`] runs on that clock. Built without one, it runs
/// on the clock of the first [`RetryPolicy`](super::RetryPolicy) it is given to (the policy's
/// [`clock`](super::RetryPolicy::clock), or the default clock), or on the default clock if it
/// is used on its own first. A policy whose clock is not the one its budget runs on is refused
/// when the layer is built ([`ConfigError::BudgetClock`]): the budget never follows one time
/// and the deadline another.
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
    /// The clock, set once: by the builder, by the first layer given the budget, or by the
    /// first use.
    time: OnceLock<Time>,
}

/// The budget's clock and its reading when the budget took it (the start of its age).
struct Time {
    clock: Clock,
    created: u64,
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
    /// add, and on one deposit in 8 to 64 of each shard a clock reading (one in 8 after a new
    /// window slot begins, thinning out to one in 64 while the slots are found marked
    /// already), which places the requests in the window. The first deposit of a budget that
    /// has no clock yet takes the default clock.
    #[inline]
    pub fn deposit(&self) {
        self.deposit_on(shard());
    }

    /// [`deposit`](Self::deposit) on a shard the caller has already looked up.
    #[inline]
    pub(crate) fn deposit_on(&self, shard: usize) {
        let t = &self.inner.total[shard];
        let n = t.count.fetch_add(1, Ordering::Relaxed);
        if n >= t.next.load(Ordering::Relaxed) {
            self.observe(t, n);
        }
    }

    /// Reads the clock and marks its slot, the request just counted included: how requests
    /// are placed in the window. Sets when the shard reads it next: sooner after a new slot,
    /// later while the slots are found marked already (heavy traffic), so that a slot's mark
    /// comes at most `SAMPLE_MAX` of this shard's requests, and at most about a slot's worth
    /// of them, after the slot began. (Races between threads on one shard only move a
    /// reading; a stale stride is harmless.)
    #[cold]
    #[inline(never)]
    fn observe(&self, t: &Total, n: u64) {
        let now = self.time().clock.now_nanos();
        let stride = if self.mark(self.epoch(now), 1) {
            SAMPLE
        } else {
            (t.stride.load(Ordering::Relaxed) * 2).clamp(SAMPLE, SAMPLE_MAX)
        };
        t.stride.store(stride, Ordering::Relaxed);
        t.next.store(n.wrapping_add(stride), Ordering::Relaxed);
    }

    /// Takes one retry from the budget if it allows one; `false` when spent.
    pub fn try_withdraw(&self) -> bool {
        self.try_withdraw_at(self.time().clock.now_nanos())
    }

    /// The window's figures now.
    pub fn figures(&self) -> BudgetFigures {
        self.figures_at(self.time().clock.now_nanos())
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

    /// The budget's clock and its age's start, taking the default clock if it has none yet.
    fn time(&self) -> &Time {
        match self.inner.time.get() {
            Some(t) => t,
            None => self.take_clock(Clock::new()),
        }
    }

    /// Sets the budget's clock if it has none, and marks the window there (requests from now
    /// on count); returns the clock the budget runs on.
    fn take_clock(&self, clock: Clock) -> &Time {
        let mut taken = false;
        let t = self.inner.time.get_or_init(|| {
            taken = true;
            let created = clock.now_nanos();
            Time { clock, created }
        });
        if taken {
            let _ = self.mark(self.epoch(t.created), 0);
        }
        t
    }

    /// The clock the budget runs on, for a layer whose policy gives `clock` (or none): the
    /// budget takes it if it has no clock yet.
    ///
    /// # Errors
    ///
    /// [`ConfigError::BudgetClock`] if the budget already runs on another clock.
    pub(crate) fn clock_for(&self, clock: Option<&Clock>) -> Result<Clock, ConfigError> {
        let t = match clock {
            None => self.time(),
            Some(c) => self.take_clock(c.clone()),
        };
        match clock {
            Some(c) if !t.clock.same_line(c) => Err(ConfigError::BudgetClock),
            _ => Ok(t.clock.clone()),
        }
    }

    #[inline]
    fn epoch(&self, now: u64) -> u64 {
        ((u128::from(now) * u128::from(self.inner.inv_width)) >> 64) as u64
    }

    /// The running total of requests.
    fn total(&self) -> u64 {
        self.inner.total.iter().fold(0u64, |sum, t| {
            sum.wrapping_add(t.count.load(Ordering::Relaxed))
        })
    }

    /// Marks `epoch`'s slot with the running total less the `own` requests of the caller
    /// made just before it read the clock, if the slot has no mark yet. The clock is read
    /// before the total, so a mark never counts a request made before its slot began.
    /// Returns whether the slot had no mark of `epoch` yet.
    fn mark(&self, epoch: u64, own: u64) -> bool {
        let slot = &self.inner.marks[epoch as usize % SLOTS];
        let e = epoch & EPOCH_MASK;
        let cur = slot.load(Ordering::Relaxed);
        if cur >> MARK_BITS == e {
            return false;
        }
        let total = self.total().wrapping_sub(own);
        let _ = slot.compare_exchange(
            cur,
            (e << MARK_BITS) | (total & MARK_MASK),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        true
    }

    /// Requests in the window: the total minus the oldest mark of a slot wholly in the window
    /// (marking the current slot first if it has no mark).
    fn requests_in_window(&self, epoch: u64) -> u64 {
        let _ = self.mark(epoch, 0);
        let total = self.total();
        // Slots before epoch 0 never were: a wrapped epoch would read the "never marked"
        // sentinel as a mark (a request counted that was never made).
        for back in (0..WINDOW_SLOTS.min(epoch + 1)).rev() {
            let want = epoch - back;
            let mark = self.inner.marks[want as usize % SLOTS].load(Ordering::Relaxed);
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
            .saturating_sub(self.time().created)
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
    /// Retries allowed per request over the window (0.2 by default), on top of the
    /// [`min_per_second`](Self::min_per_second) floor: with the floor at 0, retries add at
    /// most 20% extra load.
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

    /// The budget's time source. Without one, the budget takes the clock of the first retry
    /// policy it is given to, or [`Clock::new`] if it is used on its own first (see
    /// [`Budget`]'s *Clock*). Tests under tokio's paused time use `Clock::tokio()`.
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
        let width = window_nanos / WINDOW_SLOTS;
        let inv_width = u64::MAX / width;
        // No slot starts out marked: the marks of epoch 0 would otherwise look current.
        let never = (EPOCH_MASK << MARK_BITS) | MARK_MASK;
        let budget = Budget {
            inner: Arc::new(State {
                total: Default::default(),
                marks: std::array::from_fn(|_| AtomicU64::new(never)),
                retries: Default::default(),
                ratio: AtomicU64::new(self.ratio.to_bits()),
                min_per_second: AtomicU32::new(self.min_per_second),
                inv_width,
                window_nanos,
                time: OnceLock::new(),
            }),
        };
        if let Some(clock) = self.clock {
            budget.take_clock(clock);
        }
        Ok(budget)
    }
}

impl fmt::Debug for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &*self.inner;
        f.debug_struct("Budget")
            .field("ratio", &f64::from_bits(s.ratio.load(Ordering::Relaxed)))
            .field("min_per_second", &s.min_per_second.load(Ordering::Relaxed))
            .field("window", &Duration::from_nanos(s.window_nanos))
            .field(
                "figures",
                // Formatting does not give a budget its clock.
                &s.time.get().map(|t| self.figures_at(t.clock.now_nanos())),
            )
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
    fn after_a_quiet_spell_every_request_counts() {
        let (b, hand) = budget(1.0, 0);
        hand.advance(Duration::from_secs(60));
        for _ in 0..5 {
            b.deposit();
        }
        assert_eq!(b.figures().requests, 5);
        assert_eq!((0..10).filter(|_| b.try_withdraw()).count(), 5);
    }

    /// Deposits `per_second` requests a second, evenly, for `secs` seconds.
    fn steady(b: &Budget, hand: &crate::clock::ManualClock, per_second: u64, secs: u64) {
        let gap = 1_000_000_000 / per_second;
        for _ in 0..per_second * secs {
            hand.advance(Duration::from_nanos(gap));
            b.deposit();
        }
    }

    #[test]
    fn an_isolated_failure_under_steady_traffic_is_retried() {
        // 11 requests a second, 20% of them: about 22 retries allowed over the 10 s window.
        let (b, hand) = budget(0.2, 0);
        steady(&b, &hand, 11, 60);
        let f = b.figures();
        assert!(
            (100..=110).contains(&f.requests),
            "the requests of the window count: {f:?}"
        );
        assert!(b.try_withdraw(), "an isolated failure is retried: {f:?}");
    }

    #[test]
    fn a_budget_counts_the_same_requests_however_long_ago_it_was_built() {
        let (clock, hand) = Clock::manual();
        let build = || {
            Budget::builder()
                .ratio(0.2)
                .min_per_second(0)
                .clock(clock.clone())
                .build()
                .unwrap()
        };
        let old = build();
        steady(&old, &hand, 100, 50);
        let fresh = build();
        let gap = Duration::from_millis(10);
        for _ in 0..1_000 {
            hand.advance(gap);
            old.deposit();
            fresh.deposit();
        }
        // A fault: every request fails and asks for a retry, until the budget says no.
        let granted = |b: &Budget| (0..10_000).take_while(|_| b.try_withdraw()).count();
        let (old_granted, fresh_granted) = (granted(&old), granted(&fresh));
        // 20% of the 1,000 requests of the window, less at most a slot's worth.
        for n in [old_granted, fresh_granted] {
            assert!(
                (185..=200).contains(&n),
                "old {old_granted}, fresh {fresh_granted}"
            );
        }
    }

    /// One step of a trace: time passes, requests arrive, retries are asked for.
    #[derive(Clone, Debug)]
    enum Step {
        Wait(u64),
        Requests(u32),
        Retries(u32),
    }

    fn step(window: u64) -> impl Strategy<Value = Step> {
        prop_oneof![
            // From a few nanoseconds to a few windows: slot edges, quiet spells.
            (0..window / 8).prop_map(Step::Wait),
            (0..window * 3).prop_map(Step::Wait),
            (0u32..40).prop_map(Step::Requests),
            (0u32..10).prop_map(Step::Retries),
        ]
    }

    fn trace() -> impl Strategy<Value = (u64, Vec<Step>)> {
        (16 * MS..20_000 * MS).prop_flat_map(|window| {
            (
                Just(window),
                proptest::collection::vec(step(window), 1..300),
            )
        })
    }

    /// Early in a clock's life (fewer slots since its zero than the window has), the slots
    /// before epoch 0 were once read as marked by their "never marked" sentinel: a request
    /// nobody made was counted, and with a ratio near 2 and no floor a retry was granted for
    /// no traffic at all (found by the property test below; its seed is kept).
    #[test]
    fn a_budget_near_its_clocks_zero_counts_no_request_that_was_not_made() {
        let (clock, hand) = Clock::manual();
        hand.set_nanos(173_925_946);
        let b = Budget::builder()
            .ratio(1.98)
            .min_per_second(0)
            .window(Duration::from_nanos(188_925_945))
            .clock(clock)
            .build()
            .unwrap();
        assert_eq!(b.figures().requests, 0);
        assert!(!b.try_withdraw(), "a retry was granted for no traffic");
    }

    proptest! {
        /// Against a model of the definition (every request and retry with its time, in
        /// nanoseconds): at each retry granted, the retries of the last window, that one
        /// included, never exceed `ratio ×` the requests of the window `+ floor ×` its length.
        #[test]
        fn never_exceeds_the_allowance_of_the_window(
            ratio in 0.0f64..2.0,
            floor in 0u32..20,
            start in 0u64..1_000_000 * MS,
            (window, steps) in trace(),
        ) {
            let (clock, hand) = Clock::manual();
            hand.set_nanos(start);
            let b = Budget::builder()
                .ratio(ratio)
                .min_per_second(floor)
                .window(Duration::from_nanos(window))
                .clock(clock)
                .build()
                .unwrap();
            let mut requests: Vec<u64> = Vec::new();
            let mut grants: Vec<u64> = Vec::new();
            for step in steps {
                match step {
                    Step::Wait(ns) => hand.advance(Duration::from_nanos(ns)),
                    Step::Requests(n) => {
                        for _ in 0..n {
                            b.deposit();
                            requests.push(hand.now_nanos());
                        }
                    }
                    Step::Retries(n) => {
                        for _ in 0..n {
                            if !b.try_withdraw() {
                                continue;
                            }
                            let now = hand.now_nanos();
                            grants.push(now);
                            let in_window = |t: &&u64| **t + window > now;
                            let reqs = requests.iter().filter(in_window).count();
                            let retries = grants.iter().filter(in_window).count();
                            let allowance =
                                ratio * reqs as f64 + f64::from(floor) * window as f64 / 1e9;
                            prop_assert!(
                                retries as f64 <= allowance + 1e-9,
                                "{} retries for {} requests in the window, allowance {}",
                                retries, reqs, allowance
                            );
                        }
                    }
                }
            }
        }

        /// Under steady traffic, a failure is retried whenever the ratio of the window's
        /// requests (less the slot and the sampling the window's edge may lose) allows one.
        #[test]
        fn an_isolated_failure_is_retried_under_any_steady_traffic(
            ratio in 0.01f64..1.0,
            window in 16 * MS..20_000 * MS,
            per_window in 1u64..2_000,
            windows in 1u64..5,
            start in 0u64..1_000_000 * MS,
        ) {
            // The slot precision loses two slots' worth at most; the sampling loses what comes
            // before a slot's first reading: at most `SAMPLE_MAX` requests, and at most a
            // slot's worth plus `SAMPLE` (the stride grows only within a slot's traffic).
            let late = (SAMPLE_MAX as f64).min(per_window as f64 / 16.0 + SAMPLE as f64);
            let counted = per_window as f64 * 14.0 / 16.0 - late - 1.0;
            prop_assume!(ratio * counted >= 1.0);
            let (clock, hand) = Clock::manual();
            hand.set_nanos(start);
            let b = Budget::builder()
                .ratio(ratio)
                .min_per_second(0)
                .window(Duration::from_nanos(window))
                .clock(clock)
                .build()
                .unwrap();
            // Run for long enough that the budget's first mark has left the window.
            let gap = window / per_window;
            for _ in 0..per_window * (windows + 1) {
                hand.advance(Duration::from_nanos(gap));
                b.deposit();
            }
            let f = b.figures();
            prop_assert!(b.try_withdraw(), "{:?}", f);
        }
    }
}

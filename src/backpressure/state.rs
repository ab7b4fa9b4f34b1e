//! The budget every service of one layer (or of several layers) draws on, and its handle.

use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use super::adaptive::AdaptiveState;
use crate::clock::Clock;

/// Largest limit: the limit, the count in flight and a flag share one 64-bit word.
pub(crate) const MAX_LIMIT: u32 = (1 << 31) - 1;

/// Set in the word once no layer, service or handle refers to the budget any more: the last
/// permit given back then returns the hot state to the pool.
const ORPHAN: u64 = 1 << 63;

/// Shed events are logged at most once per this many nanoseconds.
const SHED_LOG_EVERY_NANOS: u64 = 1_000_000_000;

#[inline]
fn unpack(word: u64) -> (u32, u32) {
    (((word >> 32) as u32) & MAX_LIMIT, word as u32)
}

#[inline]
fn pack(limit: u32, in_flight: u32) -> u64 {
    (u64::from(limit) << 32) | u64::from(in_flight)
}

/// The hot half of a budget: one word (limit and count in flight), the count of waiters and
/// the waiters' wake-ups, on a cache line of their own.
///
/// Permits refer to it by a `&'static` reference, so taking and giving back a permit touches
/// no reference count: two atomic operations in all. The memory is never freed but reused:
/// when a budget's last owner is gone and its last permit is back, it returns to a pool that
/// the next budget draws from, so the memory held is bounded by the most budgets alive at
/// once.
#[repr(align(64))]
pub(crate) struct Hot {
    /// Bit 63: orphaned. Bits 32..63: the limit. Bits 0..32: permits held.
    word: AtomicU64,
    /// Requests waiting for a permit.
    waiting: AtomicUsize,
    pub(crate) notify: Notify,
}

static POOL: Mutex<Vec<&'static Hot>> = Mutex::new(Vec::new());

impl Hot {
    /// A hot state from the pool, or a new one.
    fn take(limit: u32) -> &'static Hot {
        let reused = POOL.lock().unwrap_or_else(|e| e.into_inner()).pop();
        match reused {
            Some(hot) => {
                hot.waiting.store(0, Ordering::SeqCst);
                hot.word.store(pack(limit, 0), Ordering::SeqCst);
                hot
            }
            None => Box::leak(Box::new(Hot {
                word: AtomicU64::new(pack(limit, 0)),
                waiting: AtomicUsize::new(0),
                notify: Notify::new(),
            })),
        }
    }

    fn recycle(&'static self) {
        POOL.lock().unwrap_or_else(|e| e.into_inner()).push(self);
    }

    /// Takes a permit if one is free: one atomic add (and, when full, one subtract).
    ///
    /// Returns the count in flight after the admit.
    #[inline]
    pub(crate) fn try_acquire(&'static self) -> Option<u32> {
        // One unconditional increment: the common case (room) costs a single atomic
        // operation. SeqCst pairs with `release`: a waiter that registered (bumped
        // `waiting`) before this either sees the released permit here or is seen, and
        // woken, by the releaser.
        let prev = self.word.fetch_add(1, Ordering::SeqCst);
        let (limit, in_flight) = unpack(prev);
        if in_flight < limit {
            return Some(in_flight + 1);
        }
        // Full: undo, as a release would (a permit given back meanwhile may need its
        // wake-up passed on).
        self.undo();
        None
    }

    #[cold]
    fn undo(&'static self) {
        self.release();
    }

    /// Gives a permit back and wakes one waiter if there is room for it.
    #[inline]
    pub(crate) fn release(&'static self) {
        let prev = self.word.fetch_sub(1, Ordering::SeqCst);
        let (limit, held) = unpack(prev);
        if prev & ORPHAN != 0 {
            if held == 1 {
                self.recycle();
            }
            return;
        }
        if self.waiting.load(Ordering::SeqCst) != 0 && held - 1 < limit {
            self.notify.notify_one();
        }
    }
}

#[repr(align(64))]
struct Cold {
    shed: AtomicU64,
    shed_logged: AtomicU64,
    last_log_nanos: AtomicU64,
    peak_in_flight: AtomicU32,
    /// Mixed with the shed count to spread the hints of shed requests.
    seed: u64,
}

pub(crate) struct Shared {
    pub(crate) hot: &'static Hot,
    cold: Cold,
    // An adaptive budget's samples are read on this clock (its configuration's).
    clock: Clock,
    // The shedding event is rate-limited on tokio's time, so it follows paused time.
    log_clock: Clock,
    pub(crate) adaptive: Option<AdaptiveState>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // No layer, service, handle or waiter is left. Permits may be: the last one back
        // returns the hot state to the pool, or it returns now if none is out.
        let prev = self.hot.word.fetch_or(ORPHAN, Ordering::SeqCst);
        if unpack(prev).1 == 0 {
            self.hot.recycle();
        }
    }
}

/// The `retry_after` of the `n`-th shed request: drawn uniformly from `[base, 3·base)` by a
/// hash of `n` (the crate's generator, `util::rng`) (mixed with the budget's seed), so that requests shed together are
/// told to come back at different times. Over HTTP, where `Retry-After` is whole seconds
/// rounded up, the default base of 1 s gives 1, 2 or 3.
pub(crate) fn spread(base: Duration, n: u64) -> Duration {
    let z = crate::util::rng::mix(n.wrapping_mul(0xa076_1d64_78bd_642f));
    // 2·base·u for u = z / 2⁶⁴ in [0, 1), in integer nanoseconds (no float, no overflow).
    let extra = (base
        .as_nanos()
        .saturating_mul(2)
        .saturating_mul(u128::from(z)))
        >> 64;
    base.saturating_add(Duration::from_nanos(
        u64::try_from(extra).unwrap_or(u64::MAX),
    ))
}

impl Shared {
    pub(crate) fn new(limit: u32, adaptive: Option<AdaptiveState>, clock: Option<Clock>) -> Self {
        Shared {
            hot: Hot::take(limit.min(MAX_LIMIT)),
            cold: Cold {
                shed: AtomicU64::new(0),
                shed_logged: AtomicU64::new(0),
                last_log_nanos: AtomicU64::new(0),
                peak_in_flight: AtomicU32::new(0),
                seed: std::hash::BuildHasher::hash_one(
                    &std::collections::hash_map::RandomState::new(),
                    0x5eed_u64,
                ),
            },
            clock: clock.unwrap_or_default(),
            log_clock: Clock::tokio(),
            adaptive,
        }
    }

    #[inline]
    pub(crate) fn clock(&self) -> &Clock {
        &self.clock
    }

    /// Registers a waiter unless `max_queue` are already waiting.
    pub(crate) fn enter_queue(&self, max_queue: usize) -> bool {
        let prev = self.hot.waiting.fetch_add(1, Ordering::SeqCst);
        if prev >= max_queue {
            self.hot.waiting.fetch_sub(1, Ordering::SeqCst);
            false
        } else {
            true
        }
    }

    pub(crate) fn leave_queue(&self) {
        self.hot.waiting.fetch_sub(1, Ordering::SeqCst);
    }

    pub(crate) fn in_flight(&self) -> u32 {
        unpack(self.hot.word.load(Ordering::Acquire)).1
    }

    pub(crate) fn limit(&self) -> u32 {
        unpack(self.hot.word.load(Ordering::Acquire)).0
    }

    pub(crate) fn waiting(&self) -> usize {
        self.hot.waiting.load(Ordering::Acquire)
    }

    pub(crate) fn shed_count(&self) -> u64 {
        self.cold.shed.load(Ordering::Relaxed)
    }

    pub(crate) fn note_peak(&self, in_flight: u32) {
        self.cold
            .peak_in_flight
            .fetch_max(in_flight, Ordering::Relaxed);
    }

    pub(crate) fn take_peak(&self) -> u32 {
        self.cold.peak_in_flight.swap(0, Ordering::Relaxed)
    }

    /// Replaces the limit, keeping the count in flight. Wakes as many waiters as the limit
    /// grew by. Returns the previous limit.
    pub(crate) fn set_limit(&self, limit: u32) -> u32 {
        let limit = limit.min(MAX_LIMIT);
        let word = &self.hot.word;
        let mut cur = word.load(Ordering::SeqCst);
        loop {
            let (old, in_flight) = unpack(cur);
            if old == limit {
                return old;
            }
            let next = (cur & ORPHAN) | pack(limit, in_flight);
            match word.compare_exchange_weak(cur, next, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => {
                    if limit > old && limit > in_flight {
                        let room = (limit - old.max(in_flight)) as usize;
                        let wake = room.min(self.hot.waiting.load(Ordering::SeqCst));
                        for _ in 0..wake {
                            self.hot.notify.notify_one();
                        }
                    }
                    return old;
                }
                Err(actual) => cur = actual,
            }
        }
    }

    /// Counts a shed request, returns the `retry_after` it is told (`base` spread over
    /// `[base, 3·base)`; see [`spread`]) and, at most once a second, emits a `tracing` event
    /// that says how many were shed since the last one.
    pub(crate) fn on_shed(&self, waited: bool, base: Duration) -> Duration {
        let total = self.cold.shed.fetch_add(1, Ordering::Relaxed) + 1;
        let hint = spread(base, total ^ self.cold.seed);
        // Times are kept one nanosecond late so that 0 means "never logged".
        let now = self.log_clock.now_nanos().saturating_add(1);
        let last = self.cold.last_log_nanos.load(Ordering::Relaxed);
        if (last == 0 || now.saturating_sub(last) >= SHED_LOG_EVERY_NANOS)
            && self
                .cold
                .last_log_nanos
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let before = self.cold.shed_logged.swap(total, Ordering::Relaxed);
            let (limit, in_flight) = unpack(self.hot.word.load(Ordering::Relaxed));
            tracing::warn!(
                target: "tower_bulwark::backpressure",
                shed = total - before,
                shed_total = total,
                limit,
                in_flight,
                waiting = self.waiting(),
                after_waiting = waited,
                "backpressure: shedding requests (overloaded)"
            );
        }
        hint
    }
}

/// A permit, held by a response future (or a response body) and given back on drop.
///
/// Two words. For an adaptive budget it also holds the budget, the admission time and, once
/// the response head is ready, the head's time and outcome (boxed), and whoever holds the
/// permit calls [`Permit::finish`] with the outcome. A permit dropped without it gives the
/// sample its head's outcome if the head was ready (a body the client stopped reading says
/// nothing about the dependency), or, before the head (a request cancelled while the
/// dependency had not answered), the sample its budget's [`Dropped`](super::Dropped) policy
/// says.
pub(crate) struct Permit {
    hot: &'static Hot,
    // Boxed so that a permit stays two words: a three-word permit made the fixed-limit
    // admit path 3.5x slower in the overhead bench, from the copies of the response future
    // it made the compiler emit. Only an adaptive budget's requests pay for the box.
    adaptive: Option<Box<Sample>>,
}

/// What an adaptive budget's permit carries: the budget, the admission time, and the time
/// and outcome of the response head once it is ready (the sample's latency is the
/// dependency's: to the head, not to the end of a body the client reads at its own pace).
struct Sample {
    shared: Arc<Shared>,
    start: u64,
    /// When the response head was ready (0: not yet).
    head: u64,
    /// The outcome so far once the head is ready: the head's, or a failure read later in the
    /// body (its trailers, an error).
    outcome: Outcome,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Success,
    Failure,
}

impl Permit {
    /// Wraps a permit already taken with [`Hot::try_acquire`], with the admission time (0
    /// for a fixed limit).
    #[inline(always)]
    pub(crate) fn new(shared: &Arc<Shared>, in_flight: u32) -> Permit {
        match &shared.adaptive {
            None => Permit::fixed(shared.hot),
            Some(_) => Permit::start_sample(shared, in_flight),
        }
    }

    /// A permit of a budget with a fixed limit: nothing to measure.
    #[inline(always)]
    pub(crate) fn fixed(hot: &'static Hot) -> Permit {
        Permit {
            hot,
            adaptive: None,
        }
    }

    #[cold]
    #[inline(never)]
    fn start_sample(shared: &Arc<Shared>, in_flight: u32) -> Permit {
        shared.note_peak(in_flight);
        Permit {
            hot: shared.hot,
            adaptive: Some(Box::new(Sample {
                shared: shared.clone(),
                start: shared.clock().now_nanos(),
                head: 0,
                outcome: Outcome::Success,
            })),
        }
    }

    /// Whether the budget is adaptive (the permit takes a sample when it finishes).
    #[inline(always)]
    pub(crate) fn is_adaptive(&self) -> bool {
        self.adaptive.is_some()
    }

    /// Gives the permit back after a request completed, with its latency sample for an
    /// adaptive budget.
    #[inline(always)]
    pub(crate) fn finish(mut self, outcome: Outcome) {
        if let Some(sample) = self.adaptive.take() {
            Permit::record(&sample, outcome);
            // The permit goes back before the budget's `Arc` (see `Drop`).
            drop(self);
            drop(sample);
        }
    }

    /// The response head is ready with `outcome`, and the permit is kept (until the end of
    /// the body): for an adaptive budget, the sample's latency ends now (one clock read).
    #[inline(always)]
    pub(crate) fn head_ready(&mut self, outcome: Outcome) {
        if let Some(sample) = &mut self.adaptive {
            Permit::mark_head(sample, outcome);
        }
    }

    /// The body showed a failure after the head (its trailers): the sample is a failure.
    #[inline(always)]
    pub(crate) fn fail(&mut self) {
        if let Some(sample) = &mut self.adaptive {
            sample.outcome = Outcome::Failure;
        }
    }

    /// The outcome so far (the head's, or a failure read in the body since).
    #[inline(always)]
    pub(crate) fn outcome(&self) -> Outcome {
        self.adaptive
            .as_ref()
            .map_or(Outcome::Success, |s| s.outcome)
    }

    #[cold]
    #[inline(never)]
    fn mark_head(sample: &mut Sample, outcome: Outcome) {
        sample.head = sample.shared.clock().now_nanos().max(1);
        sample.outcome = outcome;
    }

    /// The sample of a request that completed with `outcome`: its latency runs to its head
    /// if the head was marked (read then), to now otherwise.
    #[cold]
    #[inline(never)]
    fn record(sample: &Sample, outcome: Outcome) {
        let shared = &sample.shared;
        let Some(adaptive) = &shared.adaptive else {
            return;
        };
        let now = if sample.head != 0 {
            sample.head
        } else {
            shared.clock().now_nanos()
        };
        let rtt = now.saturating_sub(sample.start);
        let failed = outcome == Outcome::Failure;
        if let Some(limit) = adaptive.record(now, rtt, failed, false, shared) {
            shared.set_limit(limit);
        }
    }

    /// A permit dropped before its outcome: after the head (a body the client stopped
    /// reading), the head's outcome; before it (cancelled), the sample its policy says.
    #[cold]
    #[inline(never)]
    fn dropped(sample: &Sample) {
        if sample.head != 0 {
            return Permit::record(sample, sample.outcome);
        }
        let shared = &sample.shared;
        let Some(adaptive) = &shared.adaptive else {
            return;
        };
        let now = shared.clock().now_nanos();
        if let Some(limit) = adaptive.record_dropped(now, now.saturating_sub(sample.start), shared)
        {
            shared.set_limit(limit);
        }
    }
}

impl Drop for Permit {
    #[inline(always)]
    fn drop(&mut self) {
        // Still holding the budget here means no outcome was recorded: the request, or its
        // body, was dropped. (`finish` takes the budget out.)
        if let Some(sample) = &self.adaptive {
            Permit::dropped(sample);
        }
        // For an adaptive budget, its `Arc` is dropped after the release: if it was the last
        // owner, the hot state goes back to the pool, no permit being out.
        self.hot.release();
    }
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (limit, in_flight) = unpack(self.hot.word.load(Ordering::Relaxed));
        f.debug_struct("Permit")
            .field("in_flight", &in_flight)
            .field("limit", &limit)
            .finish()
    }
}

/// A handle on a backpressure budget: figures, and the limit changed at run time.
///
/// Get one from [`BackpressureLayer::handle`](super::BackpressureLayer::handle). Pass it to
/// [`BackpressureLayer::shared`](super::BackpressureLayer::shared) to make another layer that
/// draws on the same budget (two routes, one limit).
///
/// # Clone
///
/// Clones are handles on the same budget.
///
/// ```
/// use tower_bulwark::backpressure::BackpressureLayer;
///
/// let layer = BackpressureLayer::new(8);
/// let handle = layer.handle();
/// assert_eq!(handle.limit(), 8);
/// assert_eq!(handle.available(), 8);
/// handle.set_limit(2);
/// assert_eq!(handle.limit(), 2);
/// ```
#[derive(Clone)]
pub struct BackpressureHandle {
    pub(crate) shared: Arc<Shared>,
}

impl BackpressureHandle {
    /// Requests holding a permit now.
    ///
    /// A request being refused counts for an instant (its attempt is an add, undone), so under
    /// contention at the limit this can read one or two above it; the service below never
    /// sees more than the limit.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight() as usize
    }

    /// Requests waiting for a permit now.
    pub fn waiting(&self) -> usize {
        self.shared.waiting()
    }

    /// Requests shed since the budget was made (at once, or after waiting too long).
    pub fn shed(&self) -> u64 {
        self.shared.shed_count()
    }

    /// The current limit on requests in flight.
    pub fn limit(&self) -> usize {
        self.shared.limit() as usize
    }

    /// Permits free now: the limit minus the requests in flight (0 when the limit was lowered
    /// below the count in flight).
    pub fn available(&self) -> usize {
        self.limit().saturating_sub(self.in_flight())
    }

    /// Sets the limit on requests in flight, and returns the limit now in force.
    ///
    /// Raising it admits waiters at once. Lowering it below the count in flight sheds nothing:
    /// no request is admitted until enough have finished. A limit of 0 admits nothing (a
    /// drain switch). Limits above 2³¹ − 1 are clamped to it. For an adaptive budget the
    /// value is clamped between its floor and ceiling, and the algorithm moves on from it
    /// (out of slow start).
    pub fn set_limit(&self, limit: usize) -> usize {
        let mut limit = u32::try_from(limit).unwrap_or(MAX_LIMIT);
        if let Some(adaptive) = &self.shared.adaptive {
            limit = adaptive.reset_to(limit);
        }
        self.shared.set_limit(limit);
        limit as usize
    }

    /// Whether two handles are on the same budget.
    pub fn same_budget(&self, other: &BackpressureHandle) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }
}

impl fmt::Debug for BackpressureHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackpressureHandle")
            .field("limit", &self.limit())
            .field("in_flight", &self.in_flight())
            .field("waiting", &self.waiting())
            .field("shed", &self.shed())
            .field("adaptive", &self.shared.adaptive.is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool_contains(hot: &'static Hot) -> bool {
        POOL.lock().unwrap().iter().any(|h| std::ptr::eq(*h, hot))
    }

    fn pool_len() -> usize {
        POOL.lock().unwrap().len()
    }

    #[test]
    fn hot_state_is_reused_only_once_its_last_permit_is_back() {
        let shared = Arc::new(Shared::new(2, None, None));
        let hot = shared.hot;
        let permit = Permit::new(&shared, hot.try_acquire().unwrap());
        drop(shared);
        // Orphaned with a permit out: not reusable yet.
        assert_ne!(hot.word.load(Ordering::SeqCst) & ORPHAN, 0);
        assert!(!pool_contains(hot));
        drop(permit);
        // Back in the pool, or already taken (and reset) by a budget made meanwhile.
        assert!(pool_contains(hot) || hot.word.load(Ordering::SeqCst) & ORPHAN == 0);
    }

    #[test]
    fn a_reused_hot_state_starts_clean() {
        let shared = Arc::new(Shared::new(3, None, None));
        let _ = Permit::new(&shared, shared.hot.try_acquire().unwrap());
        shared.set_limit(1);
        drop(shared);
        for _ in 0..100 {
            let s = Shared::new(5, None, None);
            assert_eq!(s.limit(), 5);
            assert_eq!(s.in_flight(), 0);
            assert_eq!(s.waiting(), 0);
        }
    }

    #[test]
    fn memory_is_bounded_by_the_budgets_alive_at_once() {
        let before = pool_len();
        for _ in 0..10_000 {
            let shared = Arc::new(Shared::new(1, None, None));
            let permit = Permit::new(&shared, shared.hot.try_acquire().unwrap());
            drop(shared);
            drop(permit);
        }
        // Other tests running at the same time may return a few of theirs.
        assert!(pool_len() <= before + 64, "{} -> {}", before, pool_len());
    }

    #[test]
    fn a_full_budget_admits_nothing_and_undoes_its_count() {
        let shared = Shared::new(1, None, None);
        let a = shared.hot.try_acquire();
        assert_eq!(a, Some(1));
        assert_eq!(shared.hot.try_acquire(), None);
        assert_eq!(shared.in_flight(), 1);
        shared.hot.release();
        assert_eq!(shared.in_flight(), 0);
        shared.set_limit(0);
        assert_eq!(shared.hot.try_acquire(), None);
        assert_eq!(shared.in_flight(), 0);
    }

    #[test]
    fn last_owner_and_last_permit_racing_recycle_exactly_once() {
        use std::sync::Barrier;
        let barrier = Arc::new(Barrier::new(2));
        let (tx, rx) = std::sync::mpsc::channel::<Permit>();
        let releaser = {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                for permit in rx {
                    barrier.wait();
                    drop(permit);
                }
            })
        };
        for _ in 0..2_000 {
            let shared = Arc::new(Shared::new(1, None, None));
            let permit = Permit::new(&shared, shared.hot.try_acquire().unwrap());
            tx.send(permit).unwrap();
            barrier.wait();
            drop(shared);
        }
        drop(tx);
        releaser.join().unwrap();
        let pool = POOL.lock().unwrap();
        for (i, a) in pool.iter().enumerate() {
            for b in &pool[i + 1..] {
                assert!(!std::ptr::eq(*a, *b), "a hot state pooled twice");
            }
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Acquire,
        Release(usize),
        SetLimit(u32),
        Enter(usize),
        Leave,
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            4 => Just(Op::Acquire),
            3 => any::<usize>().prop_map(Op::Release),
            1 => (0u32..12).prop_map(Op::SetLimit),
            1 => (0usize..6).prop_map(Op::Enter),
            1 => Just(Op::Leave),
        ]
    }

    proptest::proptest! {
        /// The budget against a model: a permit is granted exactly when fewer than the limit
        /// are held, counts never drift, and the queue never passes its bound.
        #[test]
        fn budget_follows_its_model(
            limit in 0u32..10,
            ops in proptest::collection::vec(op(), 1..200),
        ) {
            let shared = Arc::new(Shared::new(limit, None, None));
            let mut model_limit = limit;
            let mut held: Vec<Permit> = Vec::new();
            let mut queued = 0usize;
            for op in ops {
                match op {
                    Op::Acquire => {
                        let got = shared.hot.try_acquire();
                        let room = (held.len() as u32) < model_limit;
                        proptest::prop_assert_eq!(got.is_some(), room);
                        if let Some(n) = got {
                            proptest::prop_assert_eq!(n as usize, held.len() + 1);
                            held.push(Permit::new(&shared, n));
                        }
                    }
                    Op::Release(i) => {
                        if !held.is_empty() {
                            held.swap_remove(i % held.len());
                        }
                    }
                    Op::SetLimit(l) => {
                        shared.set_limit(l);
                        model_limit = l;
                    }
                    Op::Enter(max) => {
                        let entered = shared.enter_queue(max);
                        proptest::prop_assert_eq!(entered, queued < max);
                        if entered {
                            queued += 1;
                        }
                    }
                    Op::Leave => {
                        if queued > 0 {
                            shared.leave_queue();
                            queued -= 1;
                        }
                    }
                }
                proptest::prop_assert_eq!(shared.in_flight() as usize, held.len());
                proptest::prop_assert_eq!(shared.limit(), model_limit);
                proptest::prop_assert_eq!(shared.waiting(), queued);
            }
            drop(held);
            proptest::prop_assert_eq!(shared.in_flight(), 0);
        }
    }
}

#[cfg(test)]
mod layout {
    #[test]
    fn a_permit_is_two_words() {
        assert_eq!(std::mem::size_of::<super::Permit>(), 16);
        assert_eq!(std::mem::size_of::<Option<super::Permit>>(), 16);
    }
}

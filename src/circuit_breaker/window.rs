//! Sliding windows of outcomes, kept in atomics and driven by nanoseconds.
//!
//! The count window is two bitsets (failures, slow calls) over a ring of positions and one
//! position counter: recording a healthy call where a healthy call was is one `fetch_add`
//! and two loads. Rates are computed (by popcount) only when an outcome could trip the
//! breaker. The time window is a ring of buckets, each stamped with its bucket number.
//!
//! On one thread both windows are exact. Under concurrency every call of the count window
//! takes a position of its own (see [`CountWindow`]'s memory ordering); a call of the time
//! window may be lost when its bucket is being recycled. The counts never drift, since the
//! bits and buckets are the only record.

use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};

use super::config::Window;
use crate::clock::duration_nanos;

/// Keeps a value on a cache line of its own.
#[repr(align(64))]
#[derive(Default)]
pub(crate) struct Padded<T>(pub(crate) T);

/// What a window holds at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Tally {
    pub(crate) calls: u32,
    pub(crate) failures: u32,
    pub(crate) slow: u32,
}

pub(crate) enum Ring {
    Count(CountWindow),
    Time(TimeWindow),
}

impl Ring {
    /// `track_slow`: whether slow calls are counted (a slow-call rate is configured); a
    /// count window then keeps no bits for them and records a call with half the work.
    pub(crate) fn new(window: Window, track_slow: bool) -> Ring {
        match window {
            Window::Count(n) => Ring::Count(CountWindow::new(n, track_slow)),
            Window::Time { span, buckets } => Ring::Time(TimeWindow::new(
                duration_nanos(span) / u64::from(buckets),
                buckets,
            )),
        }
    }

    /// Whether recording needs the time.
    #[inline]
    pub(crate) fn needs_time(&self) -> bool {
        matches!(self, Ring::Time(_))
    }

    /// Records an outcome; returns the tally when the outcome could have made a rate reach
    /// its threshold (a failure, a slow call, or the window reaching `minimum_calls`).
    #[inline]
    pub(crate) fn record(&self, now: u64, failed: bool, slow: bool, min: u32) -> Option<Tally> {
        match self {
            Ring::Count(w) => w.record(failed, slow, min),
            Ring::Time(w) => Some(w.record(now, failed, slow)),
        }
    }

    pub(crate) fn tally(&self, now: u64) -> Tally {
        match self {
            Ring::Count(w) => w.tally(),
            Ring::Time(w) => w.tally(now),
        }
    }

    pub(crate) fn clear(&self) {
        match self {
            Ring::Count(w) => w.clear(),
            Ring::Time(w) => w.clear(),
        }
    }
}

impl fmt::Debug for Ring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ring::Count(w) => f.debug_tuple("Count").field(&w.size).finish(),
            Ring::Time(w) => f
                .debug_struct("Time")
                .field("bucket_nanos", &w.bucket_nanos)
                .field("buckets", &w.buckets.len())
                .finish(),
        }
    }
}

/// The last `size` calls, in a ring of `mask + 1` bits (a power of two ≥ `2 × size`).
///
/// Each recorder takes a position of its own with one `fetch_add` on the head, so the head
/// only moves forward and no two calls share a position. Recording position `p` clears the
/// bit of `p - size` (the call that has just left the window) and writes its own bit at
/// `p`. A tally counts only the bits of the `size` positions below the head it reads: a bit
/// outside the window is never counted, whatever a late recorder left there.
///
/// # Memory ordering
///
/// All operations are `Relaxed`: the window is a set of counters, and nothing else is
/// published through it. What holds, under any interleaving:
///
/// - positions are unique and the head never moves backwards (one read-modify-write on it);
/// - a tally counts at most `size` calls, and only bits of positions inside its window;
/// - a call is counted at most once at a time. The ring holds twice the window, so the
///   bit a recorder writes is the one its position last had a lap ago, cleared `size`
///   positions ago by the recorder of the call that left the window then. A recorder
///   delayed between taking its position and writing its bit (preempted) leaves its call
///   uncounted meanwhile (its bit still zero), or, delayed past a whole lap, writes over
///   the bit of a later call: one outcome replaces another, never adds to it. Only a
///   recorder stalled for `size` further calls before it clears the bit of the call leaving
///   the window can let that call be seen twice, and then only while a second recorder is
///   between taking its position and writing it.
///
/// On one thread the window is exact; the property tests and the stress test below check it.
pub(crate) struct CountWindow {
    size: u64,
    mask: u64,
    head: Padded<AtomicU64>,
    fail: Box<[AtomicU64]>,
    slow: Box<[AtomicU64]>,
}

impl CountWindow {
    pub(crate) fn new(size: u32, track_slow: bool) -> Self {
        let ring = (2 * u64::from(size)).next_power_of_two().max(64);
        let words = (ring as usize).div_ceil(64);
        let bits = || (0..words).map(|_| AtomicU64::new(0)).collect();
        CountWindow {
            size: u64::from(size),
            mask: ring - 1,
            head: Padded(AtomicU64::new(0)),
            fail: bits(),
            // Empty when slow calls are not counted.
            slow: if track_slow { bits() } else { Box::new([]) },
        }
    }

    #[inline]
    fn set(words: &[AtomicU64], idx: usize, on: bool) {
        let word = &words[idx / 64];
        let bit = 1u64 << (idx % 64);
        if on {
            if word.load(Relaxed) & bit == 0 {
                word.fetch_or(bit, Relaxed);
            }
        } else if word.load(Relaxed) & bit != 0 {
            word.fetch_and(!bit, Relaxed);
        }
    }

    /// Takes a position and writes the call's outcome there; returns the position.
    #[inline]
    fn place(&self, failed: bool, slow: bool) -> u64 {
        let pos = self.head.0.fetch_add(1, Relaxed);
        let track_slow = !self.slow.is_empty();
        if pos >= self.size {
            let gone = ((pos - self.size) & self.mask) as usize;
            Self::set(&self.fail, gone, false);
            if track_slow {
                Self::set(&self.slow, gone, false);
            }
        }
        let idx = (pos & self.mask) as usize;
        Self::set(&self.fail, idx, failed);
        if track_slow {
            Self::set(&self.slow, idx, slow);
        }
        pos
    }

    #[inline]
    pub(crate) fn record(&self, failed: bool, slow: bool, min: u32) -> Option<Tally> {
        let pos = self.place(failed, slow);
        if failed || slow || pos + 1 == u64::from(min) {
            Some(self.tally_at(pos + 1))
        } else {
            None
        }
    }

    /// The bits set among ring positions `[from, from + len)`, `len` at most the ring.
    fn count_range(&self, words: &[AtomicU64], from: u64, len: u64) -> u32 {
        let ring = self.mask + 1;
        let start = from & self.mask;
        let first = len.min(ring - start);
        Self::count_span(words, start, start + first) + Self::count_span(words, 0, len - first)
    }

    /// The bits set among ring indices `[lo, hi)`, within the ring.
    fn count_span(words: &[AtomicU64], lo: u64, hi: u64) -> u32 {
        if lo >= hi {
            return 0;
        }
        let (first, last) = ((lo / 64) as usize, ((hi - 1) / 64) as usize);
        let mut n = 0;
        for (i, w) in words[first..=last].iter().enumerate() {
            let i = first + i;
            let mut bits = w.load(Relaxed);
            if i == first {
                bits &= u64::MAX << (lo % 64);
            }
            if i == last && !hi.is_multiple_of(64) {
                bits &= u64::MAX >> (64 - hi % 64);
            }
            n += bits.count_ones();
        }
        n
    }

    /// The window below `recorded` positions.
    fn tally_at(&self, recorded: u64) -> Tally {
        let calls = recorded.min(self.size);
        let from = recorded - calls;
        Tally {
            calls: calls as u32,
            failures: self.count_range(&self.fail, from, calls),
            slow: if self.slow.is_empty() {
                0
            } else {
                self.count_range(&self.slow, from, calls)
            },
        }
    }

    pub(crate) fn tally(&self) -> Tally {
        self.tally_at(self.head.0.load(Relaxed))
    }

    pub(crate) fn clear(&self) {
        for w in self.fail.iter().chain(self.slow.iter()) {
            w.store(0, Relaxed);
        }
        self.head.0.store(0, Relaxed);
    }
}

const EMPTY: u64 = u64::MAX;

struct Bucket {
    stamp: AtomicU64,
    calls: AtomicU32,
    failures: AtomicU32,
    slow: AtomicU32,
}

/// The calls of the last `bucket_nanos × buckets.len()`.
pub(crate) struct TimeWindow {
    bucket_nanos: u64,
    buckets: Box<[Bucket]>,
}

impl TimeWindow {
    pub(crate) fn new(bucket_nanos: u64, buckets: u32) -> Self {
        TimeWindow {
            bucket_nanos: bucket_nanos.max(1),
            buckets: (0..buckets)
                .map(|_| Bucket {
                    stamp: AtomicU64::new(EMPTY),
                    calls: AtomicU32::new(0),
                    failures: AtomicU32::new(0),
                    slow: AtomicU32::new(0),
                })
                .collect(),
        }
    }

    pub(crate) fn record(&self, now: u64, failed: bool, slow: bool) -> Tally {
        let n = now / self.bucket_nanos;
        let b = &self.buckets[(n % self.buckets.len() as u64) as usize];
        let stamp = b.stamp.load(Relaxed);
        if (stamp == EMPTY || stamp < n)
            && b.stamp.compare_exchange(stamp, n, Relaxed, Relaxed).is_ok()
        {
            b.calls.store(0, Relaxed);
            b.failures.store(0, Relaxed);
            b.slow.store(0, Relaxed);
        }
        // A bucket stamped later than `n` (the clock stepped back, or a racing newer call):
        // the outcome joins that bucket.
        b.calls.fetch_add(1, Relaxed);
        if failed {
            b.failures.fetch_add(1, Relaxed);
        }
        if slow {
            b.slow.fetch_add(1, Relaxed);
        }
        self.tally(now)
    }

    pub(crate) fn tally(&self, now: u64) -> Tally {
        let n = now / self.bucket_nanos;
        let len = self.buckets.len() as u64;
        let mut t = Tally::default();
        for b in self.buckets.iter() {
            let stamp = b.stamp.load(Relaxed);
            // In the window: stamps n-len+1..=n (and later ones, after a clock step back).
            if stamp != EMPTY && stamp.saturating_add(len) > n {
                t.calls = t.calls.saturating_add(b.calls.load(Relaxed));
                t.failures = t.failures.saturating_add(b.failures.load(Relaxed));
                t.slow = t.slow.saturating_add(b.slow.load(Relaxed));
            }
        }
        t
    }

    pub(crate) fn clear(&self) {
        for b in self.buckets.iter() {
            b.stamp.store(EMPTY, Relaxed);
            b.calls.store(0, Relaxed);
            b.failures.store(0, Relaxed);
            b.slow.store(0, Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const MS: u64 = 1_000_000;

    #[test]
    fn count_window_slides() {
        let w = CountWindow::new(4, true);
        assert_eq!(
            w.record(true, false, 10),
            Some(Tally {
                calls: 1,
                failures: 1,
                slow: 0
            })
        );
        assert_eq!(w.record(false, false, 10), None);
        assert_eq!(
            w.record(false, true, 10),
            Some(Tally {
                calls: 3,
                failures: 1,
                slow: 1
            })
        );
        assert_eq!(w.record(false, false, 10), None);
        assert_eq!(
            w.tally(),
            Tally {
                calls: 4,
                failures: 1,
                slow: 1
            }
        );
        // The fifth call replaces the first (a failure).
        assert_eq!(w.record(false, false, 10), None);
        assert_eq!(
            w.tally(),
            Tally {
                calls: 4,
                failures: 0,
                slow: 1
            }
        );
        // Two more push the slow call out.
        w.record(false, false, 10);
        w.record(false, false, 10);
        assert_eq!(
            w.tally(),
            Tally {
                calls: 4,
                failures: 0,
                slow: 0
            }
        );
        w.clear();
        assert_eq!(w.tally(), Tally::default());
    }

    #[test]
    fn count_window_without_slow_calls_counts_failures_alike() {
        let with = CountWindow::new(4, true);
        let without = CountWindow::new(4, false);
        for i in 0..11 {
            let failed = i % 3 == 0;
            let a = with.record(failed, false, 2);
            let b = without.record(failed, false, 2);
            assert_eq!(a, b, "call {i}");
            assert_eq!(with.tally(), without.tally(), "call {i}");
        }
        assert_eq!(without.tally().slow, 0);
        without.clear();
        assert_eq!(without.tally(), Tally::default());
    }

    #[test]
    fn count_window_reports_reaching_minimum_calls() {
        let w = CountWindow::new(10, true);
        assert_eq!(w.record(false, false, 3), None);
        assert_eq!(w.record(false, false, 3), None);
        assert_eq!(
            w.record(false, false, 3),
            Some(Tally {
                calls: 3,
                failures: 0,
                slow: 0
            })
        );
        assert_eq!(w.record(false, false, 3), None);
    }

    #[test]
    fn count_window_larger_than_a_word() {
        let w = CountWindow::new(130, true);
        for i in 0..300 {
            w.record(i % 3 == 0, i % 5 == 0, 1);
        }
        // The last 130 calls are i = 170..300.
        let fails = (170..300).filter(|i| i % 3 == 0).count() as u32;
        let slow = (170..300).filter(|i| i % 5 == 0).count() as u32;
        assert_eq!(
            w.tally(),
            Tally {
                calls: 130,
                failures: fails,
                slow
            }
        );
    }

    /// A count window against a plain list, over windows that straddle words and the ring.
    #[test]
    fn count_window_matches_a_list() {
        for size in [1u32, 2, 63, 64, 65, 100, 128, 130, 200] {
            let w = CountWindow::new(size, true);
            let mut list = Vec::new();
            for i in 0u64..1000 {
                let (failed, slow) = (i % 3 == 0 || i % 7 == 0, i % 5 == 0);
                w.record(failed, slow, 1);
                list.push((failed, slow));
                let kept = &list[list.len().saturating_sub(size as usize)..];
                let expect = Tally {
                    calls: kept.len() as u32,
                    failures: kept.iter().filter(|c| c.0).count() as u32,
                    slow: kept.iter().filter(|c| c.1).count() as u32,
                };
                assert_eq!(w.tally(), expect, "size {size}, call {i}");
            }
        }
    }

    /// Real threads recording at once: every call takes a position of its own (the head
    /// never loses or repeats one), no tally ever counts more failures than calls, and once
    /// quiet the window holds exactly the last `size` calls.
    #[test]
    fn count_window_under_contention_never_double_counts() {
        use std::sync::Barrier;
        const THREADS: u64 = 2;
        const CALLS: u64 = 200_000;
        for size in [100u32, 64] {
            let w = CountWindow::new(size, false);
            let barrier = Barrier::new(THREADS as usize);
            let over = AtomicU64::new(0);
            std::thread::scope(|scope| {
                for _ in 0..THREADS {
                    scope.spawn(|| {
                        // Every call fails: a failure counted twice shows as more failures
                        // than calls.
                        for _ in 0..CALLS {
                            let t = w.record(true, false, 1).expect("a failure gives a tally");
                            if t.failures > t.calls {
                                over.fetch_add(1, Relaxed);
                            }
                        }
                        barrier.wait();
                        // Then every call succeeds: no failure may be left in the window.
                        for _ in 0..CALLS {
                            w.record(false, false, 1);
                        }
                    });
                }
            });
            assert_eq!(
                w.head.0.load(Relaxed),
                2 * THREADS * CALLS,
                "size {size}: every call takes one position"
            );
            assert_eq!(
                over.load(Relaxed),
                0,
                "size {size}: tallies with more failures than calls"
            );
            assert_eq!(
                w.tally(),
                Tally {
                    calls: size,
                    failures: 0,
                    slow: 0
                },
                "size {size}: the last calls all succeeded"
            );
        }
    }

    #[test]
    fn time_window_buckets_roll_over() {
        // 1 s in 10 buckets of 100 ms.
        let w = TimeWindow::new(100 * MS, 10);
        w.record(0, true, false);
        w.record(50 * MS, false, true);
        w.record(150 * MS, false, false);
        assert_eq!(
            w.tally(150 * MS),
            Tally {
                calls: 3,
                failures: 1,
                slow: 1
            }
        );
        // At 999 ms the first bucket (0..100 ms) is still in.
        assert_eq!(w.tally(999 * MS).calls, 3);
        // At 1000 ms it is out.
        assert_eq!(
            w.tally(1000 * MS),
            Tally {
                calls: 1,
                failures: 0,
                slow: 0
            }
        );
        // Recording at 1050 ms recycles bucket 0 for bucket 10.
        let t = w.record(1050 * MS, true, false);
        assert_eq!(
            t,
            Tally {
                calls: 2,
                failures: 1,
                slow: 0
            }
        );
        // Long after, everything is gone.
        assert_eq!(w.tally(10_000 * MS), Tally::default());
        w.clear();
        assert_eq!(w.tally(1050 * MS), Tally::default());
    }

    #[test]
    fn ring_from_config() {
        let r = Ring::new(
            Window::Time {
                span: Duration::from_secs(10),
                buckets: 10,
            },
            true,
        );
        assert!(r.needs_time());
        r.record(0, true, false, 1);
        assert_eq!(r.tally(9_999 * MS).failures, 1);
        assert_eq!(r.tally(10_000 * MS).failures, 0);
        let r = Ring::new(Window::Count(5), false);
        assert!(!r.needs_time());
    }
}

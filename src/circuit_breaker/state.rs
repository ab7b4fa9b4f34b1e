//! The breaker's state machine: one `AtomicU64` word moved by compare-and-swap.
//!
//! The word holds a 2-bit tag, a 14-bit generation and a 48-bit payload:
//!
//! | tag | payload |
//! |---|---|
//! | closed | 0 |
//! | open | the end of the open time, in microseconds of the layer's clock |
//! | half-open | slots taken (bits 0..16), probe successes (bits 16..32), reservations (bits 32..44), reclaim epoch (bits 44..48) |
//! | forced | 1 forced open, 0 forced closed |
//!
//! Every transition bumps the generation, so an outcome from a call admitted under another
//! state (a closed-state call that finishes after the breaker tripped, a probe of an earlier
//! half-open round) is not counted.
//!
//! A half-open slot is taken by a probe that has started (its call made), by one that waits on
//! the inner service's readiness, or by a *reservation*: a slot claimed in `poll_ready` whose
//! inner service is ready and whose call has not come (tower's `Balance` and `ReadyCache`
//! keep services ready and call them late or never). The reservations are counted apart, so
//! that an overdue round whose slots are partly reservations gives those back (a reclaim,
//! which bumps the reclaim epoch) instead of failing: a caller that made the service ready
//! and did not call it has said nothing about the dependency. A reservation is identified by
//! its generation and epoch; it is started or released by taking one off the count, only while
//! both match, so a reclaimed reservation never takes or frees a slot of its own again.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::ops::Deref;
use std::sync::atomic::{
    AtomicU32, AtomicU64, AtomicUsize,
    Ordering::{AcqRel, Acquire, Relaxed, Release},
};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::config::{Abandoned, BreakerConfig, Window};
use super::window::{Padded, Ring, Tally};
use crate::clock::{duration_nanos, Clock};
use crate::rejection::Rejection;
use crate::util::rng::{self, Rng};

const TAG_SHIFT: u32 = 62;
const GEN_SHIFT: u32 = 48;
const GEN_MASK: u64 = (1 << 14) - 1;
const PAYLOAD_MASK: u64 = (1 << GEN_SHIFT) - 1;

const CLOSED: u64 = 0;
const OPEN: u64 = 1;
const HALF_OPEN: u64 = 2;
const FORCED: u64 = 3;

#[inline]
const fn pack(tag: u64, gen: u64, payload: u64) -> u64 {
    (tag << TAG_SHIFT) | ((gen & GEN_MASK) << GEN_SHIFT) | (payload & PAYLOAD_MASK)
}

#[inline]
const fn tag(s: u64) -> u64 {
    s >> TAG_SHIFT
}

#[inline]
const fn gen(s: u64) -> u64 {
    (s >> GEN_SHIFT) & GEN_MASK
}

#[inline]
const fn payload(s: u64) -> u64 {
    s & PAYLOAD_MASK
}

/// The payload of an open state: the end of the open time, `open` nanoseconds after `now`, in
/// microseconds. A validated open time is at most twice [`MAX_OPEN_TIME`] (jitter included), so
/// this fits the payload for the first 6.9 years of the clock; past that it saturates (it never
/// wraps round to an earlier time).
///
/// [`MAX_OPEN_TIME`]: super::config::MAX_OPEN_TIME
#[inline]
fn open_until(now: u64, open: u64) -> u64 {
    now.saturating_add(open).div_ceil(1000).min(PAYLOAD_MASK)
}

#[inline]
const fn half(inflight: u64, successes: u64) -> u64 {
    inflight | (successes << 16)
}

/// Half-open payload fields: slots taken, probe successes, reservations, reclaim epoch.
const SLOTS_MASK: u64 = 0xFFFF;
const SUCCESS_SHIFT: u32 = 16;
const RESERVED_SHIFT: u32 = 32;
/// The most reservations counted at once; a slot made ready past that stays a started probe
/// (as if its call had been made), as every slot was before reservations were counted.
const RESERVED_MAX: u64 = (1 << 12) - 1;
const EPOCH_SHIFT: u32 = 44;
const EPOCH_MASK: u64 = 0xF;

#[inline]
const fn slots(p: u64) -> u64 {
    p & SLOTS_MASK
}

#[inline]
const fn successes(p: u64) -> u64 {
    (p >> SUCCESS_SHIFT) & 0xFFFF
}

#[inline]
const fn reserved(p: u64) -> u64 {
    (p >> RESERVED_SHIFT) & RESERVED_MAX
}

#[inline]
const fn epoch(p: u64) -> u64 {
    (p >> EPOCH_SHIFT) & EPOCH_MASK
}

/// A half-open payload from its four fields.
#[inline]
const fn half_with(slots: u64, successes: u64, reserved: u64, epoch: u64) -> u64 {
    slots
        | (successes << SUCCESS_SHIFT)
        | ((reserved & RESERVED_MAX) << RESERVED_SHIFT)
        | ((epoch & EPOCH_MASK) << EPOCH_SHIFT)
}

/// The state of a breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BreakerState {
    /// Calls go through and their outcomes are counted.
    Closed,
    /// Calls are refused until the open time is over; the first call after it makes the
    /// breaker half-open.
    Open,
    /// A few probe calls go through; their outcomes close or reopen the breaker.
    HalfOpen,
    /// Refused by [`BreakerHandle::force_open`](super::BreakerHandle::force_open) until
    /// [`reset`](super::BreakerHandle::reset).
    ForcedOpen,
    /// Let through by [`BreakerHandle::force_closed`](super::BreakerHandle::force_closed),
    /// counting nothing, until [`reset`](super::BreakerHandle::reset).
    ForcedClosed,
}

impl BreakerState {
    fn of(s: u64) -> BreakerState {
        match tag(s) {
            CLOSED => BreakerState::Closed,
            OPEN => BreakerState::Open,
            HALF_OPEN => BreakerState::HalfOpen,
            _ if payload(s) == 1 => BreakerState::ForcedOpen,
            _ => BreakerState::ForcedClosed,
        }
    }
}

/// What was granted to an admitted call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Permit {
    /// Admitted while closed under generation `gen`.
    Closed { gen: u64 },
    /// A half-open probe of generation `gen`: holds a probe slot.
    Probe { gen: u64 },
    /// Admitted with nothing to count (forced closed, or no breaker for the key).
    Free,
}

/// Why a breaker tripped, for the `tracing` event.
#[derive(Clone, Copy, Debug)]
enum Reason {
    ConsecutiveFailures,
    FailureRate,
    SlowCallRate,
}

/// Small copy of the validated configuration.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Limits {
    failure_rate: Option<f64>,
    consecutive: Option<u32>,
    slow_rate: Option<f64>,
    pub(crate) slow_nanos: Option<u64>,
    min_calls: u32,
    open_nanos: u64,
    max_open_nanos: u64,
    multiplier: f64,
    jitter: f64,
    probes: u64,
    /// An abandoned call counts as a failure.
    pub(crate) abandoned_failure: bool,
}

impl Limits {
    fn new(c: &BreakerConfig) -> Limits {
        Limits {
            failure_rate: c.failure_rate,
            consecutive: c.consecutive_failures,
            slow_rate: c.slow_call.map(|(r, _)| r),
            slow_nanos: c.slow_call.map(|(_, t)| duration_nanos(t)),
            min_calls: c.minimum_calls,
            open_nanos: duration_nanos(c.open_time),
            max_open_nanos: duration_nanos(c.max_open_time),
            multiplier: c.multiplier,
            jitter: c.jitter,
            probes: u64::from(c.probes),
            abandoned_failure: c.abandoned == Abandoned::Failure,
        }
    }

    #[inline]
    fn uses_window(&self) -> bool {
        self.failure_rate.is_some() || self.slow_rate.is_some()
    }

    /// Whether the rates of a tally trip the breaker.
    fn rate_trips(&self, t: Tally) -> Option<Reason> {
        if t.calls < self.min_calls || t.calls == 0 {
            return None;
        }
        let calls = f64::from(t.calls);
        if let Some(r) = self.failure_rate {
            if t.failures > 0 && f64::from(t.failures) / calls >= r {
                return Some(Reason::FailureRate);
            }
        }
        if let Some(r) = self.slow_rate {
            if t.slow > 0 && f64::from(t.slow) / calls >= r {
                return Some(Reason::SlowCallRate);
            }
        }
        None
    }
}

/// One breaker.
pub(crate) struct Breaker {
    state: Padded<AtomicU64>,
    consecutive: AtomicU32,
    /// How many times in a row the open time grew: failed probe rounds, and trips that came
    /// before the breaker had stayed closed for a stable period.
    reopens: AtomicU32,
    /// When the breaker last closed from half-open, one nanosecond late (0: not since it was
    /// made or reset). A trip before it has stayed closed for the open time it last served
    /// grows the open time; a trip after that starts again from the base open time.
    closed_at: AtomicU64,
    /// When the latest probe of the current half-open round was admitted, or started from a
    /// reservation. With every slot taken and this older than the probe time limit, every
    /// slot is overdue: its reservations are given back, or, with none, the round fails.
    probe_at: AtomicU64,
    /// When a call last failed while closed (0: not since it was made or cleared): a keyed
    /// slot whose failures are all older than [`STALE_NANOS`] may go to a new key.
    failed_at: AtomicU64,
    window: Ring,
}

/// How long a keyed breaker's failures (or the end of its open time, with no request since)
/// stay worth keeping its slot for, against a new key that needs one: 10 minutes, or twice the
/// longest open time if that is longer.
const STALE_NANOS: u64 = 10 * 60 * 1_000_000_000;

impl Breaker {
    fn new(config: &BreakerConfig) -> Breaker {
        Breaker {
            state: Padded(AtomicU64::new(pack(CLOSED, 0, 0))),
            consecutive: AtomicU32::new(0),
            reopens: AtomicU32::new(0),
            closed_at: AtomicU64::new(0),
            probe_at: AtomicU64::new(0),
            failed_at: AtomicU64::new(0),
            window: Ring::new(config.window, config.slow_call.is_some()),
        }
    }
}

/// Everything the services, futures and handles of one layer share.
///
/// Aligned to a cache line so that the `Arc`'s reference counts, written by every call, do not
/// share a line with the configuration that every call reads.
#[repr(align(64))]
pub(crate) struct Shared {
    pub(crate) limits: Limits,
    pub(crate) clock: Clock,
    rng: Rng,
    breakers: Box<[Breaker]>,
    /// Per-key table: the key hash held by each breaker (0: free). Empty for one breaker.
    keys: Box<[AtomicU64]>,
    pub(crate) hasher: RandomState,
    /// The window the breakers were made with, to match a pooled state to a configuration.
    window: Window,
}

/// How far a key's probe sequence looks for its slot.
const KEY_PROBES: usize = 8;

/// The figures of one breaker, as read by a handle.
pub(crate) struct Snapshot {
    pub(crate) state: BreakerState,
    pub(crate) tally: Tally,
    pub(crate) consecutive: u32,
    pub(crate) reopens: u32,
    pub(crate) probes_in_flight: u32,
    pub(crate) probe_successes: u32,
    pub(crate) open_remaining: Option<Duration>,
}

impl Snapshot {
    /// What a key with no breaker reads as: what its next request would meet, a fresh
    /// closed breaker.
    pub(crate) fn vacant() -> Snapshot {
        Snapshot {
            state: BreakerState::Closed,
            tally: Tally::default(),
            consecutive: 0,
            reopens: 0,
            probes_in_flight: 0,
            probe_successes: 0,
            open_remaining: None,
        }
    }
}

impl Shared {
    /// A layer's state: one breaker, or `max_keys` (rounded up to a power of two) when keyed.
    /// The configuration must be valid.
    pub(crate) fn new(config: &BreakerConfig, keyed: bool) -> Shared {
        let n = if keyed {
            config.max_keys.next_power_of_two()
        } else {
            1
        };
        let hasher = RandomState::new();
        let seed = config.seed.unwrap_or_else(|| hasher.hash_one(0x5eed_u64));
        Shared {
            limits: Limits::new(config),
            clock: config.clock.clone(),
            rng: Rng::seeded(seed),
            breakers: (0..n).map(|_| Breaker::new(config)).collect(),
            keys: if keyed {
                (0..n).map(|_| AtomicU64::new(0)).collect()
            } else {
                Box::new([])
            },
            hasher,
            window: config.window,
        }
    }

    #[inline]
    pub(crate) fn now(&self) -> u64 {
        self.clock.now_nanos()
    }

    /// The open time after `reopens` failed probe rounds: multiplied, capped, jittered.
    pub(crate) fn open_nanos(&self, reopens: u32) -> u64 {
        let l = &self.limits;
        let capped = self.grown_nanos(reopens) as f64;
        let u = self.rng.next_f64();
        let jittered = capped * (1.0 + l.jitter * (2.0 * u - 1.0));
        (jittered as u64).max(1)
    }

    /// The open time after `reopens` growths, multiplied and capped, before jitter.
    fn grown_nanos(&self, reopens: u32) -> u64 {
        let l = &self.limits;
        let grown = l.open_nanos as f64 * l.multiplier.powi(reopens.min(4096) as i32);
        grown.min(l.max_open_nanos as f64) as u64
    }

    /// The wait hint of a call refused while the probes are out: their verdict closes the
    /// breaker, or a failed probe opens it again for the next open time. The hint is a uniform
    /// share of that open time, drawn for each caller, so that callers refused together do
    /// not come back together.
    #[cold]
    fn half_open_hint(&self, b: &Breaker) -> Duration {
        let next = self.open_nanos(b.reopens.load(Relaxed).saturating_add(1));
        let u = self.rng.next_f64();
        Duration::from_nanos(((next as f64 * u) as u64).max(1))
    }

    /// The wait hint of a call refused while forced open. The breaker cannot know when it
    /// will be reset, so the hint is the configured open time as a period to come back and
    /// look, drawn for each caller uniformly between half and one and a half times it, so
    /// that callers refused together do not come back together.
    #[cold]
    fn forced_hint(&self) -> Duration {
        let base = self.limits.open_nanos;
        Duration::from_nanos(
            (base / 2)
                .saturating_add(rng::below(self.rng.next_u64(), base))
                .max(1),
        )
    }

    /// How long the probes of a half-open round may be out before the round counts as
    /// failed: the slow-call threshold when slow-call detection is on (a slow probe is a
    /// failed probe), otherwise the open time the breaker has just served (before jitter), so
    /// that the bound grows with the open time on each failed round.
    #[inline]
    fn probe_limit(&self, b: &Breaker) -> u64 {
        self.limits
            .slow_nanos
            .unwrap_or_else(|| self.grown_nanos(b.reopens.load(Relaxed)))
            .max(1)
    }

    /// The slot of a key hash, claiming a free one (or a healthy one when all of the key's
    /// probe sequence is taken). `None` when the table has no room for it.
    pub(crate) fn slot_for(&self, hash: u64) -> Option<usize> {
        let h = hash.max(1);
        let mask = self.keys.len() - 1;
        let probes = KEY_PROBES.min(self.keys.len());
        for i in 0..probes {
            let s = (h as usize).wrapping_add(i) & mask;
            match self.keys[s].load(Acquire) {
                k if k == h => return Some(s),
                0 => match self.keys[s].compare_exchange(0, h, AcqRel, Acquire) {
                    Ok(_) => return Some(s),
                    Err(k) if k == h => return Some(s),
                    Err(_) => {}
                },
                _ => {}
            }
        }
        // All taken: reuse a healthy breaker (closed, no failure in its window), or a stale
        // one: closed with every failure older than the stale time, or open with its open
        // time over for that long and no request since (a request would have made it
        // half-open). A breaker that has tripped and is still asked for is never evicted, so
        // a flood of new keys cannot reset it.
        let now = self.now();
        let stale = STALE_NANOS.max(self.limits.max_open_nanos.saturating_mul(2));
        for i in 0..probes {
            let s = (h as usize).wrapping_add(i) & mask;
            let k = self.keys[s].load(Acquire);
            let b = &self.breakers[s];
            let st = b.state.0.load(Acquire);
            let reusable = match tag(st) {
                CLOSED => {
                    (b.consecutive.load(Relaxed) == 0 && b.window.tally(now).failures == 0)
                        || b.failed_at
                            .load(Relaxed)
                            .checked_sub(1)
                            .is_some_and(|f| now.saturating_sub(f) >= stale)
                }
                OPEN => now.saturating_sub(payload(st).saturating_mul(1000)) >= stale,
                _ => false,
            };
            if reusable && self.keys[s].compare_exchange(k, h, AcqRel, Acquire).is_ok() {
                self.clear(s);
                tracing::debug!(breaker = s, "circuit breaker slot reused for a new key");
                return Some(s);
            }
        }
        None
    }

    /// The slot of a key hash, if it has one.
    pub(crate) fn find_slot(&self, hash: u64) -> Option<usize> {
        let h = hash.max(1);
        let mask = self.keys.len().checked_sub(1)?;
        (0..KEY_PROBES.min(self.keys.len()))
            .map(|i| (h as usize).wrapping_add(i) & mask)
            .find(|&s| self.keys[s].load(Acquire) == h)
    }

    /// The slot of a handle's breaker now: `idx` for the layer's single breaker (`key`
    /// `None`); for a key's handle (`key` its hash), the slot that holds the key now, if any
    /// (a slot given to another key is never the handle's).
    pub(crate) fn handle_slot(&self, idx: usize, key: Option<u64>) -> Option<usize> {
        let Some(h) = key else {
            return Some(idx);
        };
        if self.keys.get(idx).is_some_and(|k| k.load(Acquire) == h) {
            return Some(idx);
        }
        self.find_slot(h)
    }

    /// How many key slots are taken.
    pub(crate) fn keys_in_use(&self) -> usize {
        self.keys.iter().filter(|k| k.load(Relaxed) != 0).count()
    }

    /// Admits or refuses a call. `start` is the time read for slow-call detection, if any.
    #[inline]
    pub(crate) fn admit(&self, idx: usize) -> Result<(Permit, u64), Rejection> {
        let b = &self.breakers[idx];
        let s = b.state.0.load(Acquire);
        if tag(s) == CLOSED {
            let start = if self.limits.slow_nanos.is_some() {
                self.now()
            } else {
                0
            };
            return Ok((Permit::Closed { gen: gen(s) }, start));
        }
        self.admit_slow(idx, s)
    }

    /// Whether the breaker is closed now (one load): `poll_ready` then waits on the inner
    /// service with nothing to decide.
    #[inline]
    pub(crate) fn is_closed(&self, idx: usize) -> bool {
        tag(self.breakers[idx].state.0.load(Acquire)) == CLOSED
    }

    /// What `poll_ready` decides when the breaker is not closed, before it waits on the inner
    /// service: a refusal, or a probe slot claimed now (`Some`, so that only the callers that
    /// will be probes wait on the dependency's readiness), or nothing to claim (`None`: closed
    /// again, or forced closed).
    #[cold]
    pub(crate) fn reserve(&self, idx: usize) -> Result<Option<(Permit, u64)>, Rejection> {
        let s = self.breakers[idx].state.0.load(Acquire);
        match self.admit_slow(idx, s)? {
            (p @ Permit::Probe { .. }, start) => Ok(Some((p, start))),
            _ => Ok(None),
        }
    }

    /// Whether a probe permit of generation `g` still belongs to the current half-open round.
    #[inline]
    pub(crate) fn probe_current(&self, idx: usize, g: u64) -> bool {
        let s = self.breakers[idx].state.0.load(Acquire);
        tag(s) == HALF_OPEN && gen(s) == g
    }

    /// Turns a probe slot of round `g` that waited on the inner service's readiness into a
    /// reservation (the service is ready, its call has not come). The reservation's epoch, or
    /// `None` when the slot stays a started probe (its round is over, or
    /// [`RESERVED_MAX`] reservations are counted already).
    #[cold]
    pub(crate) fn mark_reserved(&self, idx: usize, g: u64) -> Option<u64> {
        let b = &self.breakers[idx];
        let mut s = b.state.0.load(Acquire);
        loop {
            let p = payload(s);
            if tag(s) != HALF_OPEN
                || gen(s) != g
                || reserved(p) >= RESERVED_MAX
                || slots(p) <= reserved(p)
            {
                return None;
            }
            let next = pack(
                HALF_OPEN,
                g,
                half_with(slots(p), successes(p), reserved(p) + 1, epoch(p)),
            );
            match b.state.0.compare_exchange(s, next, AcqRel, Acquire) {
                Ok(_) => return Some(epoch(p)),
                Err(actual) => s = actual,
            }
        }
    }

    /// Whether a reservation of round `g` and epoch `e` may still be held: not reclaimed.
    #[inline]
    pub(crate) fn reservation_live(&self, idx: usize, g: u64, e: u64) -> bool {
        let s = self.breakers[idx].state.0.load(Acquire);
        let p = payload(s);
        tag(s) == HALF_OPEN && gen(s) == g && epoch(p) == e && reserved(p) > 0
    }

    /// Starts the probe of a reservation of round `g` and epoch `e` at `now`: its call has
    /// come. `false` when the reservation was reclaimed or its round is over (the call must be
    /// decided afresh).
    #[cold]
    pub(crate) fn start_reserved(&self, idx: usize, g: u64, e: u64, now: u64) -> bool {
        let b = &self.breakers[idx];
        let mut s = b.state.0.load(Acquire);
        if !(tag(s) == HALF_OPEN && gen(s) == g && epoch(payload(s)) == e) {
            return false;
        }
        // The latest probe's time moves before the slot becomes a started probe, so that a
        // caller who sees every slot taken by started probes also sees this one's start (and
        // does not fail the round for a probe that has just started). Should the reservation
        // turn out reclaimed, the round is only judged overdue later, never sooner.
        b.probe_at.fetch_max(now, AcqRel);
        loop {
            let p = payload(s);
            if tag(s) != HALF_OPEN || gen(s) != g || epoch(p) != e || reserved(p) == 0 {
                return false;
            }
            let next = pack(
                HALF_OPEN,
                g,
                half_with(slots(p), successes(p), reserved(p) - 1, e),
            );
            match b.state.0.compare_exchange(s, next, AcqRel, Acquire) {
                Ok(_) => return true,
                Err(actual) => s = actual,
            }
        }
    }

    /// Frees the slot of a reservation of round `g` and epoch `e` whose call never came (its
    /// service dropped, or made ready again under a later round): neither success nor
    /// failure. Nothing when it was reclaimed or its round is over.
    #[cold]
    pub(crate) fn release_reserved(&self, idx: usize, g: u64, e: u64) {
        let b = &self.breakers[idx];
        let mut s = b.state.0.load(Acquire);
        loop {
            let p = payload(s);
            if tag(s) != HALF_OPEN || gen(s) != g || epoch(p) != e || reserved(p) == 0 {
                return;
            }
            let next = pack(
                HALF_OPEN,
                g,
                half_with(slots(p) - 1, successes(p), reserved(p) - 1, e),
            );
            match b.state.0.compare_exchange(s, next, AcqRel, Acquire) {
                Ok(_) => return,
                Err(actual) => s = actual,
            }
        }
    }

    #[cold]
    fn admit_slow(&self, idx: usize, mut cur: u64) -> Result<(Permit, u64), Rejection> {
        let b = &self.breakers[idx];
        let mut read: Option<u64> = None;
        let mut now = || *read.get_or_insert_with(|| self.now());
        loop {
            match tag(cur) {
                CLOSED => {
                    let start = if self.limits.slow_nanos.is_some() {
                        now()
                    } else {
                        0
                    };
                    return Ok((Permit::Closed { gen: gen(cur) }, start));
                }
                FORCED => {
                    return if payload(cur) == 1 {
                        Err(Rejection::circuit_open(self.forced_hint()).with_detail("forced open"))
                    } else {
                        Ok((Permit::Free, 0))
                    };
                }
                OPEN => {
                    let t = now();
                    let until = payload(cur).saturating_mul(1000);
                    if t < until {
                        return Err(Rejection::circuit_open(Duration::from_nanos(until - t)));
                    }
                    let g = gen(cur) + 1;
                    let next = pack(HALF_OPEN, g, half(1, 0));
                    match b.state.0.compare_exchange(cur, next, AcqRel, Acquire) {
                        Ok(_) => {
                            // Only an admitted probe moves the latest probe's time: a lost
                            // race must not put an overdue round off.
                            b.probe_at.store(t, Release);
                            tracing::info!(
                                breaker = idx,
                                from = "open",
                                to = "half-open",
                                probes = self.limits.probes,
                                reopens = b.reopens.load(Relaxed),
                                "circuit breaker half-open"
                            );
                            return Ok((Permit::Probe { gen: g & GEN_MASK }, t));
                        }
                        Err(actual) => cur = actual,
                    }
                }
                _ => {
                    // Half-open.
                    let p = payload(cur);
                    let inflight = slots(p);
                    let t = now();
                    if inflight >= self.limits.probes {
                        // Every slot is taken. If even the latest probe has been out longer
                        // than the probe time limit, they all have. Slots that are only
                        // reservations (made ready, never called) are given back, and this
                        // caller takes one; if every slot is a probe that started (or waits
                        // on the dependency's readiness), the round has failed: probes that
                        // hang, or a dependency that is never ready. The breaker then opens
                        // again, for longer.
                        let limit = self.probe_limit(b);
                        if t.saturating_sub(b.probe_at.load(Relaxed)) >= limit {
                            if reserved(p) > 0 {
                                let next = pack(
                                    HALF_OPEN,
                                    gen(cur),
                                    half_with(
                                        inflight - reserved(p),
                                        successes(p),
                                        0,
                                        epoch(p) + 1,
                                    ),
                                );
                                match b.state.0.compare_exchange(cur, next, AcqRel, Acquire) {
                                    Ok(_) => {
                                        tracing::debug!(
                                            breaker = idx,
                                            reclaimed = reserved(p),
                                            "circuit breaker: overdue probe slots of services \
                                             made ready and never called given back"
                                        );
                                        cur = next;
                                    }
                                    Err(actual) => cur = actual,
                                }
                                continue;
                            }
                            match self.reopen_overdue(idx, cur, t, limit) {
                                Ok(until) => {
                                    // The time left open, as for every refusal while open:
                                    // callers coming back at its end are spread by the
                                    // half-open refusals' jittered hints.
                                    return Err(Rejection::circuit_open(Duration::from_nanos(
                                        until.saturating_sub(t).max(1),
                                    )));
                                }
                                Err(actual) => {
                                    cur = actual;
                                    continue;
                                }
                            }
                        }
                        return Err(Rejection::circuit_open(self.half_open_hint(b))
                            .with_detail("half-open: probes in flight"));
                    }
                    let next = pack(HALF_OPEN, gen(cur), p + 1);
                    match b.state.0.compare_exchange(cur, next, AcqRel, Acquire) {
                        Ok(_) => {
                            b.probe_at.store(t, Release);
                            return Ok((Permit::Probe { gen: gen(cur) }, t));
                        }
                        Err(actual) => cur = actual,
                    }
                }
            }
        }
    }

    /// When a probe of breaker `idx` claimed at `start` is past the probe time limit: a
    /// probe that still waits on the dependency's readiness then fails its round.
    #[cold]
    pub(crate) fn probe_deadline(&self, idx: usize, start: u64) -> u64 {
        start.saturating_add(self.probe_limit(&self.breakers[idx]))
    }

    /// Fails half-open round `g` because one of its probes has waited on the dependency's
    /// readiness past the probe time limit (a dependency that is never ready): opens the
    /// breaker again, for longer, as a failed probe would. Nothing when the round is over.
    #[cold]
    pub(crate) fn fail_waiting(&self, idx: usize, g: u64, now: u64) {
        let b = &self.breakers[idx];
        let limit = self.probe_limit(b);
        let mut s = b.state.0.load(Acquire);
        while tag(s) == HALF_OPEN && gen(s) == g {
            match self.reopen_overdue(idx, s, now, limit) {
                Ok(_) => return,
                Err(actual) => s = actual,
            }
        }
    }

    /// Fails a half-open round whose probes are all overdue: opens the breaker again, for
    /// longer, as a failed probe would. The end of the new open time, or the state word found
    /// instead.
    #[cold]
    fn reopen_overdue(&self, idx: usize, cur: u64, now: u64, limit: u64) -> Result<u64, u64> {
        let b = &self.breakers[idx];
        let reopens = b.reopens.load(Relaxed).saturating_add(1);
        let open = self.open_nanos(reopens);
        let until = open_until(now, open);
        let next = pack(OPEN, gen(cur) + 1, until);
        b.state.0.compare_exchange(cur, next, AcqRel, Acquire)?;
        b.reopens.store(reopens, Relaxed);
        tracing::warn!(
            breaker = idx,
            from = "half-open",
            to = "open",
            probes_in_flight = slots(payload(cur)),
            probe_limit_ms = limit / 1_000_000,
            reopens,
            open_ms = open / 1_000_000,
            "circuit breaker reopened: its probes are overdue"
        );
        Ok(until.saturating_mul(1000))
    }

    /// Records a call admitted while closed and abandoned (its future dropped) under the
    /// [`Abandoned::Ignore`] policy: neither success nor failure, but a slow call when it has
    /// run at least the slow-call threshold (a hang that a timeout above cut short is the
    /// slowest of calls). Counted in the window only; the consecutive failures are left as
    /// they are. Nothing without slow-call detection.
    #[cold]
    pub(crate) fn record_abandoned(&self, idx: usize, g: u64, start: u64) {
        let l = &self.limits;
        let Some(threshold) = l.slow_nanos else {
            return;
        };
        let b = &self.breakers[idx];
        let s = b.state.0.load(Acquire);
        if s != pack(CLOSED, g, 0) {
            return;
        }
        let now = self.now();
        if now.saturating_sub(start) < threshold {
            return;
        }
        let tally = b.window.record(now, false, true, l.min_calls);
        if let Some(reason) = tally.and_then(|t| l.rate_trips(t)) {
            self.trip(idx, s, now, reason, tally, b.consecutive.load(Relaxed));
        }
    }

    /// Records the outcome of a call admitted while closed.
    #[inline]
    pub(crate) fn record_closed(&self, idx: usize, g: u64, failed: bool, start: u64) {
        let b = &self.breakers[idx];
        let s = b.state.0.load(Acquire);
        if s != pack(CLOSED, g, 0) {
            return;
        }
        let l = &self.limits;
        // The common case, inline: a success with no slow-call rule and no time window reads
        // no clock; it clears the failure streak and takes its place in a count window, whose
        // tally is read only when the window reaches its minimum of calls.
        if !failed && l.slow_nanos.is_none() && !b.window.needs_time() {
            if b.consecutive.load(Relaxed) != 0 {
                b.consecutive.store(0, Relaxed);
            }
            if l.uses_window() {
                if let Some(tally) = b.window.record(0, false, false, l.min_calls) {
                    if let Some(reason) = l.rate_trips(tally) {
                        self.trip(idx, s, self.now(), reason, Some(tally), 0);
                    }
                }
            }
            return;
        }
        self.record_closed_slow(idx, s, failed, start);
    }

    /// [`Shared::record_closed`] for a failure, or with a slow-call rule or a time window.
    #[inline(never)]
    fn record_closed_slow(&self, idx: usize, s: u64, failed: bool, start: u64) {
        let b = &self.breakers[idx];
        let l = &self.limits;
        let needs_now = l.slow_nanos.is_some() || (l.uses_window() && b.window.needs_time());
        let now = if needs_now { self.now() } else { 0 };
        let slow = l.slow_nanos.is_some_and(|t| now.saturating_sub(start) >= t);
        let mut reason = None;
        let mut consecutive = 0;
        if failed {
            // Only a failure reads the clock for this (a success costs nothing more).
            let t = if needs_now { now } else { self.now() };
            b.failed_at.store(t.max(1), Relaxed);
            consecutive = b.consecutive.fetch_add(1, Relaxed).saturating_add(1);
            if l.consecutive.is_some_and(|n| consecutive >= n) {
                reason = Some(Reason::ConsecutiveFailures);
            }
        } else if b.consecutive.load(Relaxed) != 0 {
            b.consecutive.store(0, Relaxed);
        }
        let mut tally = None;
        if l.uses_window() {
            tally = b.window.record(now, failed, slow, l.min_calls);
            if reason.is_none() {
                reason = tally.and_then(|t| l.rate_trips(t));
            }
        }
        if let Some(reason) = reason {
            let now = if needs_now { now } else { self.now() };
            self.trip(idx, s, now, reason, tally, consecutive);
        }
    }

    #[cold]
    fn trip(
        &self,
        idx: usize,
        from: u64,
        now: u64,
        reason: Reason,
        tally: Option<Tally>,
        consecutive: u32,
    ) {
        let b = &self.breakers[idx];
        // A breaker that trips again before it has stayed closed for the open time it last
        // served (a dependency that passes its probes and falls over again) opens for longer,
        // as if its probes had failed; one that stayed closed that long starts again from the
        // base open time.
        let last = b.reopens.load(Relaxed);
        let closed_at = b.closed_at.load(Relaxed);
        let reopens = if closed_at != 0
            && now.saturating_add(1).saturating_sub(closed_at) < self.grown_nanos(last)
        {
            last.saturating_add(1)
        } else {
            0
        };
        let open = self.open_nanos(reopens);
        let next = pack(OPEN, gen(from) + 1, open_until(now, open));
        if b.state
            .0
            .compare_exchange(from, next, AcqRel, Acquire)
            .is_ok()
        {
            b.reopens.store(reopens, Relaxed);
            let t = tally.unwrap_or_default();
            let rate = |n: u32| {
                if t.calls == 0 {
                    0.0
                } else {
                    f64::from(n) / f64::from(t.calls)
                }
            };
            tracing::warn!(
                breaker = idx,
                from = "closed",
                to = "open",
                reason = ?reason,
                calls = t.calls,
                failures = t.failures,
                slow_calls = t.slow,
                failure_rate = rate(t.failures),
                slow_call_rate = rate(t.slow),
                consecutive_failures = consecutive,
                reopens,
                open_ms = open / 1_000_000,
                "circuit breaker opened"
            );
        }
    }

    /// Records the outcome of a probe: a success may close the breaker, a failure reopens it.
    pub(crate) fn record_probe(&self, idx: usize, g: u64, failed: bool) {
        let b = &self.breakers[idx];
        let mut s = b.state.0.load(Acquire);
        let mut now = None;
        loop {
            if tag(s) != HALF_OPEN || gen(s) != g {
                return;
            }
            let p = payload(s);
            let (inflight, successes) = (slots(p), successes(p));
            let next;
            let mut open = 0;
            let reopens = b.reopens.load(Relaxed).saturating_add(1);
            if failed {
                let t = *now.get_or_insert_with(|| self.now());
                open = self.open_nanos(reopens);
                next = pack(OPEN, g + 1, open_until(t, open));
            } else if successes + 1 >= self.limits.probes {
                next = pack(CLOSED, g + 1, 0);
            } else {
                // A started probe's slot is one of those not reserved.
                if inflight <= reserved(p) {
                    return;
                }
                next = pack(
                    HALF_OPEN,
                    g,
                    half_with(inflight - 1, successes + 1, reserved(p), epoch(p)),
                );
            }
            match b.state.0.compare_exchange(s, next, AcqRel, Acquire) {
                Ok(_) => {
                    match tag(next) {
                        OPEN => {
                            b.reopens.store(reopens, Relaxed);
                            tracing::warn!(
                                breaker = idx,
                                from = "half-open",
                                to = "open",
                                probe_successes = successes,
                                reopens,
                                open_ms = open / 1_000_000,
                                "circuit breaker reopened: a probe failed"
                            );
                        }
                        CLOSED => {
                            b.window.clear();
                            b.consecutive.store(0, Relaxed);
                            // `reopens` is kept: a trip soon after grows the open time.
                            let t = now.unwrap_or_else(|| self.now());
                            b.closed_at.store(t.saturating_add(1), Relaxed);
                            tracing::info!(
                                breaker = idx,
                                from = "half-open",
                                to = "closed",
                                probe_successes = successes + 1,
                                "circuit breaker closed"
                            );
                        }
                        _ => {}
                    }
                    return;
                }
                Err(actual) => s = actual,
            }
        }
    }

    /// Whether a call that started at `start` is slow now (never, without slow-call
    /// detection). Reads the clock only with it.
    pub(crate) fn is_slow(&self, start: u64) -> bool {
        self.limits
            .slow_nanos
            .is_some_and(|t| self.now().saturating_sub(start) >= t)
    }

    /// Frees a probe slot whose call ended with no verdict (dropped, or throttled).
    pub(crate) fn release_probe(&self, idx: usize, g: u64) {
        let b = &self.breakers[idx];
        let mut s = b.state.0.load(Acquire);
        loop {
            if tag(s) != HALF_OPEN || gen(s) != g {
                return;
            }
            let p = payload(s);
            // A started probe's slot is one of those not reserved.
            if slots(p) <= reserved(p) {
                return;
            }
            match b
                .state
                .0
                .compare_exchange(s, pack(HALF_OPEN, g, p - 1), AcqRel, Acquire)
            {
                Ok(_) => return,
                Err(actual) => s = actual,
            }
        }
    }

    fn store(&self, idx: usize, key: Option<u64>, tag_: u64, payload_: u64, what: &'static str) {
        if self.set(idx, key, tag_, payload_) {
            tracing::info!(
                breaker = idx,
                to = what,
                "circuit breaker set by its handle"
            );
        }
    }

    /// Closes a breaker under a new generation and clears its window and counters, quietly.
    fn clear(&self, idx: usize) {
        self.set(idx, None, CLOSED, 0);
    }

    /// Moves breaker `idx` to a new state, and clears its window and counters. With `key`
    /// (a key's hash), only while the slot holds that key. A slot given to another key gets
    /// its new key first and is then cleared under a new generation (`slot_for`), so a
    /// compare-and-swap from a state word read before the reuse either fails (the clear came
    /// first; the key is read again and is not ours) or lands before the clear, which then
    /// undoes it: the new key's breaker keeps no state set through another key's handle.
    /// `false` when it did nothing.
    fn set(&self, idx: usize, key: Option<u64>, tag_: u64, payload_: u64) -> bool {
        let b = &self.breakers[idx];
        let mut s = b.state.0.load(Acquire);
        loop {
            if key.is_some_and(|h| self.keys[idx].load(Acquire) != h) {
                return false;
            }
            let next = pack(tag_, gen(s) + 1, payload_);
            match b.state.0.compare_exchange(s, next, AcqRel, Acquire) {
                Ok(_) => break,
                Err(actual) => s = actual,
            }
        }
        b.window.clear();
        b.consecutive.store(0, Relaxed);
        b.reopens.store(0, Relaxed);
        b.closed_at.store(0, Relaxed);
        b.failed_at.store(0, Relaxed);
        true
    }

    pub(crate) fn force_open(&self, idx: usize, key: Option<u64>) {
        self.store(idx, key, FORCED, 1, "forced-open");
    }

    pub(crate) fn force_closed(&self, idx: usize, key: Option<u64>) {
        self.store(idx, key, FORCED, 0, "forced-closed");
    }

    pub(crate) fn reset(&self, idx: usize, key: Option<u64>) {
        self.store(idx, key, CLOSED, 0, "closed");
    }

    pub(crate) fn snapshot(&self, idx: usize) -> Snapshot {
        let b = &self.breakers[idx];
        let s = b.state.0.load(Acquire);
        let now = self.now();
        let p = payload(s);
        let (probes_in_flight, probe_successes) = if tag(s) == HALF_OPEN {
            (slots(p) as u32, successes(p) as u32)
        } else {
            (0, 0)
        };
        Snapshot {
            state: BreakerState::of(s),
            tally: b.window.tally(now),
            consecutive: b.consecutive.load(Relaxed),
            reopens: b.reopens.load(Relaxed),
            probes_in_flight,
            probe_successes,
            open_remaining: (tag(s) == OPEN)
                .then(|| Duration::from_nanos(p.saturating_mul(1000).saturating_sub(now))),
        }
    }
}

/// How a future, service or handle reaches its layer's state.
///
/// A `Leased` state lives in a `'static` place, so that a call's future refers to it without
/// touching a reference count (two locked instructions per call saved). Leased states are
/// leaked and reused rather than freed (see [`Owner`]); their number is bounded by
/// [`MAX_LEASED`], past which layers fall back to a `Counted` state behind an `Arc`.
#[derive(Clone)]
pub(crate) enum SharedRef {
    Leased(&'static Shared),
    Counted(Arc<Shared>),
}

impl Deref for SharedRef {
    type Target = Shared;

    #[inline]
    fn deref(&self) -> &Shared {
        match self {
            SharedRef::Leased(s) => s,
            SharedRef::Counted(s) => s,
        }
    }
}

/// The most leased states ever made (the memory kept by the pool of unused ones is bounded by
/// this times the size of one state).
pub(crate) const MAX_LEASED: usize = 256;

/// The largest count window (or number of time buckets) of a leased state: each leased state
/// stays small (a few hundred bytes plus 2 × 512 bytes of bits at most).
const MAX_LEASED_WINDOW: u32 = 1 << 12;
const MAX_LEASED_BUCKETS: u32 = 64;

/// Leased states whose layers are gone, ready for a new layer of the same configuration.
static POOL: Mutex<Vec<&'static Shared>> = Mutex::new(Vec::new());
/// Leased states made so far.
static LEASED: AtomicUsize = AtomicUsize::new(0);

/// The owner of a layer's state, shared by its layer, services and handles (not by futures).
///
/// When the last owner goes, a leased state is reset and returned to the pool: every breaker moves
/// to closed under a new generation, so an outcome of a call still in flight from the old layer is
/// ignored and a probe slot it frees is not counted (the same guarantee as for an outcome of an
/// earlier state), and its window and counters are cleared. As with a reset by a handle, an outcome
/// whose generation check ran just before the reset may still land in the cleared window: one
/// outcome at most per call in flight, never a transition of its own (a trip compares the whole
/// state word). The generation has 14 bits: an outcome is misread only if its call outlives 16384
/// transitions. A new layer takes a pooled state only when its limits, window and kind of clock are
/// the same; its clock must be a system clock ([`Clock::fast`](crate::clock::Clock::fast) or
/// [`Clock::std`](crate::clock::Clock::std)), whose readings do not depend on when it was made as
/// far as the breaker is concerned. Keyed layers, other clocks and large windows are always
/// counted.
pub(crate) struct Owner {
    shared: SharedRef,
}

impl Owner {
    pub(crate) fn new(config: &BreakerConfig, keyed: bool) -> Owner {
        let shared = match Self::lease(config, keyed) {
            Some(s) => SharedRef::Leased(s),
            None => SharedRef::Counted(Arc::new(Shared::new(config, keyed))),
        };
        Owner { shared }
    }

    fn lease(config: &BreakerConfig, keyed: bool) -> Option<&'static Shared> {
        let small = match config.window {
            Window::Count(n) => n <= MAX_LEASED_WINDOW,
            Window::Time { buckets, .. } => buckets <= MAX_LEASED_BUCKETS,
        };
        if keyed || !small {
            return None;
        }
        let kind = clock_kind(&config.clock)?;
        let limits = Limits::new(config);
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        let found = pool.iter().position(|s| {
            s.limits == limits && s.window == config.window && clock_kind(&s.clock) == Some(kind)
        });
        if let Some(i) = found {
            let s = pool.swap_remove(i);
            drop(pool);
            let seed = config.seed.unwrap_or_else(|| s.hasher.hash_one(0x5eed_u64));
            s.rng.reseed(seed);
            return Some(s);
        }
        drop(pool);
        LEASED
            .fetch_update(Relaxed, Relaxed, |n| (n < MAX_LEASED).then_some(n + 1))
            .ok()?;
        Some(Box::leak(Box::new(Shared::new(config, false))))
    }

    /// The state, for a call's future: a copy of a reference when leased.
    #[inline]
    pub(crate) fn share(&self) -> SharedRef {
        self.shared.clone()
    }
}

impl Deref for Owner {
    type Target = Shared;

    #[inline]
    fn deref(&self) -> &Shared {
        &self.shared
    }
}

impl Drop for Owner {
    fn drop(&mut self) {
        if let SharedRef::Leased(s) = self.shared {
            for idx in 0..s.breakers.len() {
                s.clear(idx);
            }
            POOL.lock().unwrap_or_else(|e| e.into_inner()).push(s);
        }
    }
}

/// The kind of a system clock (`None` for the others).
fn clock_kind(clock: &Clock) -> Option<&'static str> {
    clock.system_kind()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::rejection::RejectionKind;

    const MS: u64 = 1_000_000;

    fn shared(config: BreakerConfig) -> (Shared, ManualClock) {
        let (clock, hand) = Clock::manual();
        let config = config.clock(clock).seed(7);
        config.validate().unwrap();
        (Shared::new(&config, false), hand)
    }

    fn call(s: &Shared, failed: bool) -> Result<(), Rejection> {
        match s.admit(0)? {
            (Permit::Closed { gen }, start) => s.record_closed(0, gen, failed, start),
            (Permit::Probe { gen }, _) => s.record_probe(0, gen, failed),
            (Permit::Free, _) => {}
        }
        Ok(())
    }

    #[test]
    fn state_word_round_trips() {
        let s = pack(HALF_OPEN, GEN_MASK + 3, half(2, 5));
        assert_eq!(tag(s), HALF_OPEN);
        assert_eq!(gen(s), 2);
        assert_eq!(payload(s) & 0xFFFF, 2);
        assert_eq!(payload(s) >> 16, 5);
        assert_eq!(
            BreakerState::of(pack(FORCED, 0, 1)),
            BreakerState::ForcedOpen
        );
    }

    #[test]
    fn consecutive_failures_trip_and_open_time_runs_out() {
        let (s, hand) = shared(
            BreakerConfig::consecutive_failures(3)
                .open_time(Duration::from_secs(1))
                .jitter(0.0)
                .half_open_probes(1),
        );
        call(&s, true).unwrap();
        call(&s, false).unwrap();
        call(&s, true).unwrap();
        call(&s, true).unwrap();
        assert_eq!(s.snapshot(0).state, BreakerState::Closed);
        call(&s, true).unwrap();
        assert_eq!(s.snapshot(0).state, BreakerState::Open);
        hand.advance(Duration::from_millis(400));
        let r = call(&s, false).unwrap_err();
        assert_eq!(r.kind(), RejectionKind::CircuitOpen);
        assert_eq!(r.retry_after(), Some(Duration::from_millis(600)));
        hand.advance(Duration::from_millis(600));
        call(&s, false).unwrap();
        assert_eq!(s.snapshot(0).state, BreakerState::Closed);
    }

    #[test]
    fn open_time_grows_capped_and_jittered() {
        let (s, _hand) = shared(
            BreakerConfig::default()
                .open_time(Duration::from_millis(100))
                .max_open_time(Duration::from_millis(1000))
                .backoff_multiplier(3.0)
                .jitter(0.2),
        );
        for (reopens, base) in [(0, 100), (1, 300), (2, 900), (3, 1000), (50, 1000)] {
            for _ in 0..200 {
                let d = s.open_nanos(reopens);
                let lo = (base as f64 * 0.8 * MS as f64) as u64;
                let hi = (base as f64 * 1.2 * MS as f64) as u64;
                assert!((lo..=hi).contains(&d), "{reopens}: {d} not in {lo}..={hi}");
            }
        }
    }

    #[test]
    fn jitter_spreads_open_times() {
        let (s, _hand) = shared(BreakerConfig::default().jitter(0.5));
        let draws: std::collections::HashSet<u64> = (0..100).map(|_| s.open_nanos(0)).collect();
        assert!(draws.len() > 90, "{} distinct", draws.len());
        let lo = draws.iter().filter(|&&d| d < 5_000 * MS).count();
        assert!((20..=80).contains(&lo), "{lo} of 100 below the middle");
    }

    /// A reference model: the outcomes kept in a plain list, the conditions computed from
    /// scratch at each step.
    struct Model {
        calls: Vec<(u64, bool, bool)>, // (completion time, failed, slow)
    }

    impl Model {
        fn window(&self, now: u64, window: Window) -> Tally {
            let kept: Vec<_> = match window {
                Window::Count(n) => {
                    let skip = self.calls.len().saturating_sub(n as usize);
                    self.calls[skip..].to_vec()
                }
                Window::Time { span, buckets } => {
                    let width = duration_nanos(span) / u64::from(buckets);
                    let cur = now / width;
                    self.calls
                        .iter()
                        .copied()
                        .filter(|(t, _, _)| t / width + u64::from(buckets) > cur)
                        .collect()
                }
            };
            Tally {
                calls: kept.len() as u32,
                failures: kept.iter().filter(|c| c.1).count() as u32,
                slow: kept.iter().filter(|c| c.2).count() as u32,
            }
        }
    }

    use proptest::prelude::*;

    fn check(
        window: Window,
        min: u32,
        rate: f64,
        slow_rate: f64,
        consecutive: u32,
        steps: Vec<(bool, u64, u64)>,
    ) -> Result<(), TestCaseError> {
        let slow_t = Duration::from_millis(100);
        let config = BreakerConfig::failure_rate(rate)
            .or_slow_call_rate(slow_rate, slow_t)
            .or_consecutive_failures(consecutive)
            .minimum_calls(min)
            .open_time(Duration::from_secs(1_000_000))
            .max_open_time(Duration::from_secs(1_000_000));
        let config = match window {
            Window::Count(n) => config.window(n),
            Window::Time { span, buckets } => config.time_window(span, buckets),
        };
        let (s, hand) = shared(config);
        let mut model = Model { calls: vec![] };
        let mut run = 0u32;
        for (i, (failed, took_ms, gap_ms)) in steps.into_iter().enumerate() {
            hand.advance(Duration::from_millis(gap_ms));
            let (permit, start) = s.admit(0).expect("closed until the condition held");
            let Permit::Closed { gen } = permit else {
                return Err(TestCaseError::fail("not closed"));
            };
            hand.advance(Duration::from_millis(took_ms));
            s.record_closed(0, gen, failed, start);
            let now = hand.now_nanos();
            let slow = took_ms >= 100;
            model.calls.push((now, failed, slow));
            run = if failed { run + 1 } else { 0 };
            let t = model.window(now, window);
            let holds = run >= consecutive
                || (t.calls >= min
                    && ((t.failures > 0 && f64::from(t.failures) / f64::from(t.calls) >= rate)
                        || (t.slow > 0 && f64::from(t.slow) / f64::from(t.calls) >= slow_rate)));
            let open = s.snapshot(0).state == BreakerState::Open;
            prop_assert_eq!(open, holds, "step {}: window {:?}, run {}", i, t, run);
            if open {
                prop_assert!(s.admit(0).is_err());
                break;
            }
        }
        Ok(())
    }

    fn a_rate() -> impl Strategy<Value = f64> {
        prop_oneof![
            Just(0.0),
            Just(0.2),
            Just(0.25),
            Just(0.3),
            Just(0.5),
            Just(0.75),
            Just(1.0),
            0.0f64..=1.0
        ]
    }

    proptest! {
        #[test]
        fn count_window_opens_exactly_when_the_condition_holds(
            n in 1u32..150,
            min_frac in 0.0f64..=1.0,
            rate in a_rate(),
            slow_rate in a_rate(),
            consecutive in prop_oneof![1u32..10, 10u32..200],
            steps in proptest::collection::vec(
                (
                    proptest::bool::weighted(0.3),
                    prop_oneof![Just(0u64), Just(99), Just(100), 0u64..300],
                    0u64..50,
                ),
                0..400,
            ),
        ) {
            let min = ((f64::from(n) * min_frac) as u32).clamp(1, n);
            check(Window::Count(n), min, rate, slow_rate, consecutive, steps)?;
        }

        #[test]
        fn time_window_opens_exactly_when_the_condition_holds(
            buckets in 1u32..20,
            bucket_ms in 1u64..500,
            min in 1u32..50,
            rate in a_rate(),
            slow_rate in a_rate(),
            consecutive in prop_oneof![1u32..10, 10u32..200],
            steps in proptest::collection::vec(
                (
                    proptest::bool::weighted(0.3),
                    prop_oneof![Just(0u64), Just(100), 0u64..300],
                    0u64..400,
                ),
                0..300,
            ),
        ) {
            let span = Duration::from_millis(bucket_ms * u64::from(buckets));
            check(Window::Time { span, buckets }, min, rate, slow_rate, consecutive, steps)?;
        }
    }

    #[test]
    fn half_open_admits_k_probes_and_never_sticks() {
        let (s, hand) = shared(
            BreakerConfig::consecutive_failures(1)
                .open_time(Duration::from_secs(1))
                .jitter(0.0)
                .half_open_probes(2),
        );
        call(&s, true).unwrap();
        hand.advance(Duration::from_secs(1));
        let (a, _) = s.admit(0).unwrap();
        let (b, _) = s.admit(0).unwrap();
        assert!(matches!(a, Permit::Probe { .. }) && a == b);
        assert!(s.admit(0).is_err());
        let Permit::Probe { gen } = a else {
            unreachable!()
        };
        // Both probes vanish without a verdict: the slots come back.
        s.release_probe(0, gen);
        s.release_probe(0, gen);
        assert_eq!(s.snapshot(0).probes_in_flight, 0);
        let (c, _) = s.admit(0).unwrap();
        assert_eq!(c, a);
        s.record_probe(0, gen, false);
        assert_eq!(s.snapshot(0).state, BreakerState::HalfOpen);
        assert_eq!(s.snapshot(0).probe_successes, 1);
        call(&s, false).unwrap();
        assert_eq!(s.snapshot(0).state, BreakerState::Closed);
        // A stale probe of the closed round changes nothing.
        s.release_probe(0, gen);
        s.record_probe(0, gen, true);
        assert_eq!(s.snapshot(0).state, BreakerState::Closed);
    }

    #[test]
    fn probes_all_overdue_fail_their_round_and_the_open_time_grows() {
        let (s, hand) = shared(
            BreakerConfig::consecutive_failures(1)
                .open_time(Duration::from_secs(1))
                .jitter(0.0)
                .half_open_probes(2),
        );
        call(&s, true).unwrap();
        hand.advance(Duration::from_secs(1));
        let (a, _) = s.admit(0).unwrap();
        hand.advance(Duration::from_millis(600));
        let (b, _) = s.admit(0).unwrap();
        assert!(matches!(a, Permit::Probe { .. }) && a == b);
        // The first probe is 1 s old, the latest 400 ms: not every probe is overdue yet.
        hand.advance(Duration::from_millis(400));
        let r = s.admit(0).unwrap_err();
        assert_eq!(r.detail(), Some("half-open: probes in flight"));
        assert_eq!(s.snapshot(0).state, BreakerState::HalfOpen);
        // Both past the open time just served (1 s): the round has failed.
        hand.advance(Duration::from_millis(600));
        let r = s.admit(0).unwrap_err();
        assert_eq!(r.retry_after(), Some(Duration::from_secs(2)));
        let snap = s.snapshot(0);
        assert_eq!((snap.state, snap.reopens), (BreakerState::Open, 1));
        // The probes that hung answer at last: they belong to an earlier round.
        let Permit::Probe { gen } = a else {
            unreachable!()
        };
        s.record_probe(0, gen, false);
        s.record_probe(0, gen, false);
        assert_eq!(s.snapshot(0).state, BreakerState::Open);
        // The next round's limit is the grown open time, 2 s.
        hand.advance(Duration::from_secs(2));
        s.admit(0).unwrap();
        s.admit(0).unwrap();
        hand.advance(Duration::from_millis(1999));
        assert!(s.admit(0).is_err());
        assert_eq!(s.snapshot(0).state, BreakerState::HalfOpen);
        hand.advance(Duration::from_millis(1));
        assert!(s.admit(0).is_err());
        assert_eq!(s.snapshot(0).reopens, 2);
    }

    #[test]
    fn overdue_reservations_are_given_back_and_never_fail_the_round() {
        let (s, hand) = shared(
            BreakerConfig::consecutive_failures(1)
                .open_time(Duration::from_secs(1))
                .jitter(0.0)
                .half_open_probes(2),
        );
        call(&s, true).unwrap();
        hand.advance(Duration::from_secs(1));
        // One slot a reservation (ready, not called), the other a probe that started.
        let (a, _) = s.admit(0).unwrap();
        let Permit::Probe { gen } = a else {
            unreachable!()
        };
        let e = s.mark_reserved(0, gen).expect("a reservation");
        assert!(s.reservation_live(0, gen, e));
        let (b, _) = s.admit(0).unwrap();
        assert_eq!(a, b);
        assert!(s.admit(0).is_err());
        // Both overdue: the reservation is given back, and this caller takes its slot.
        hand.advance(Duration::from_secs(1));
        let (c, _) = s.admit(0).unwrap();
        assert_eq!(c, a);
        let snap = s.snapshot(0);
        assert_eq!(
            (snap.state, snap.reopens, snap.probes_in_flight),
            (BreakerState::HalfOpen, 0, 2)
        );
        // The reclaimed reservation neither starts a probe nor frees a slot.
        assert!(!s.reservation_live(0, gen, e));
        assert!(!s.start_reserved(0, gen, e, hand.now_nanos()));
        s.release_reserved(0, gen, e);
        assert_eq!(s.snapshot(0).probes_in_flight, 2);
        // A reservation of the new epoch starts its probe: still two slots taken.
        s.release_probe(0, gen);
        s.admit(0).unwrap();
        let e2 = s.mark_reserved(0, gen).expect("a reservation");
        assert_ne!(e2, e);
        assert!(s.start_reserved(0, gen, e2, hand.now_nanos()));
        assert!(!s.reservation_live(0, gen, e2));
        assert_eq!(s.snapshot(0).probes_in_flight, 2);
        // Every slot a probe that started, all overdue: the round fails.
        hand.advance(Duration::from_secs(1));
        assert!(s.admit(0).is_err());
        let snap = s.snapshot(0);
        assert_eq!((snap.state, snap.reopens), (BreakerState::Open, 1));
    }

    #[test]
    fn an_abandoned_slow_call_counts_as_slow_but_not_as_a_success() {
        let (s, hand) = shared(
            BreakerConfig::slow_call_rate(1.0, Duration::from_millis(100))
                .window(10)
                .minimum_calls(3)
                .or_consecutive_failures(3),
        );
        call(&s, true).unwrap();
        call(&s, true).unwrap();
        // Abandoned before the threshold: nothing. After it: a slow call, and the run of
        // failures is not broken.
        let (Permit::Closed { gen }, start) = s.admit(0).unwrap() else {
            unreachable!()
        };
        hand.advance(Duration::from_millis(99));
        s.record_abandoned(0, gen, start);
        let (Permit::Closed { gen }, start) = s.admit(0).unwrap() else {
            unreachable!()
        };
        hand.advance(Duration::from_millis(100));
        s.record_abandoned(0, gen, start);
        let snap = s.snapshot(0);
        assert_eq!((snap.tally.calls, snap.tally.slow), (3, 1));
        assert_eq!(snap.consecutive, 2);
        call(&s, true).unwrap();
        assert_eq!(s.snapshot(0).state, BreakerState::Open);
    }

    #[test]
    fn two_threads_never_exceed_k_probes_per_round() {
        use std::sync::atomic::AtomicI64;
        const K: u32 = 3;
        let (s, hand) = shared(
            BreakerConfig::consecutive_failures(1)
                .open_time(Duration::from_micros(1))
                .max_open_time(Duration::from_micros(4))
                .half_open_probes(K),
        );
        // Probe permits held, per generation of the state word.
        let held: Vec<AtomicI64> = (0..=GEN_MASK).map(|_| AtomicI64::new(0)).collect();
        let max_seen = AtomicI64::new(0);
        let rounds = AtomicU32::new(0);
        std::thread::scope(|scope| {
            for t in 0..2u64 {
                let (s, hand, held, max_seen, rounds) = (&s, &hand, &held, &max_seen, &rounds);
                scope.spawn(move || {
                    let mut rng = 0x1234_5678_u64 ^ t;
                    let mut next = move || {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        rng
                    };
                    let mut mine: Vec<(Permit, u64)> = Vec::new();
                    for _ in 0..200_000 {
                        if t == 0 {
                            hand.advance(Duration::from_nanos(250));
                        }
                        if mine.len() < 6 && next() % 2 == 0 {
                            if let Ok((p, start)) = s.admit(0) {
                                if let Permit::Probe { gen } = p {
                                    let n = held[gen as usize].fetch_add(1, AcqRel) + 1;
                                    max_seen.fetch_max(n, AcqRel);
                                    rounds.fetch_add(1, Relaxed);
                                }
                                mine.push((p, start));
                            }
                        } else if !mine.is_empty() {
                            let i = (next() % mine.len() as u64) as usize;
                            let (p, start) = mine.swap_remove(i);
                            let r = next() % 10;
                            match p {
                                Permit::Probe { gen } => {
                                    held[gen as usize].fetch_sub(1, AcqRel);
                                    match r {
                                        0..=2 => s.release_probe(0, gen),
                                        3..=4 => s.record_probe(0, gen, true),
                                        _ => s.record_probe(0, gen, false),
                                    }
                                }
                                Permit::Closed { gen } => s.record_closed(0, gen, r < 2, start),
                                Permit::Free => {}
                            }
                        }
                    }
                    for (p, _) in mine {
                        if let Permit::Probe { gen } = p {
                            held[gen as usize].fetch_sub(1, AcqRel);
                            s.release_probe(0, gen);
                        }
                    }
                });
            }
        });
        let max = max_seen.load(Acquire);
        assert!(max <= i64::from(K), "{max} probes of one round at once");
        assert!(max >= 2, "the test never had concurrent probes ({max})");
        assert!(
            rounds.load(Relaxed) > 1000,
            "too few probes to mean anything"
        );
        // Never stuck half-open with slots lost: once quiet, a probe is admitted.
        hand.advance(Duration::from_secs(1));
        let snap = s.snapshot(0);
        assert_eq!(snap.probes_in_flight, 0, "{:?}", snap.state);
        assert!(s.admit(0).is_ok());
    }

    #[test]
    fn a_leased_state_is_reused_and_ignores_calls_of_its_old_layer() {
        // A configuration no other test uses, so that the pooled state is this test's.
        let config = || {
            BreakerConfig::consecutive_failures(2)
                .window(37)
                .minimum_calls(3)
                .open_time(Duration::from_millis(1237))
                .clock(Clock::std())
        };
        let old = Owner::new(&config(), false);
        let SharedRef::Leased(first) = old.share() else {
            panic!("a std clock and a small window are leased");
        };
        let (permit, start) = old.admit(0).unwrap();
        let Permit::Closed { gen } = permit else {
            unreachable!()
        };
        drop(old);
        let new = Owner::new(&config(), false);
        let SharedRef::Leased(second) = new.share() else {
            panic!("leased");
        };
        assert!(std::ptr::eq(first, second), "the pooled state is reused");
        // The old layer's call completes now: not counted.
        new.record_closed(0, gen, true, start);
        new.record_closed(0, gen, true, start);
        let snap = new.snapshot(0);
        assert_eq!(snap.state, BreakerState::Closed);
        assert_eq!((snap.consecutive, snap.tally.calls), (0, 0));
        // Its own calls count.
        call(&new, true).unwrap();
        call(&new, true).unwrap();
        assert_eq!(new.snapshot(0).state, BreakerState::Open);
    }

    #[test]
    fn manual_clocks_and_keyed_layers_are_counted() {
        let (clock, _hand) = Clock::manual();
        let manual = Owner::new(&BreakerConfig::default().clock(clock), false);
        assert!(matches!(manual.share(), SharedRef::Counted(_)));
        let keyed = Owner::new(&BreakerConfig::default(), true);
        assert!(matches!(keyed.share(), SharedRef::Counted(_)));
        let tokio = Owner::new(&BreakerConfig::default().clock(Clock::tokio()), false);
        assert!(matches!(tokio.share(), SharedRef::Counted(_)));
    }
}

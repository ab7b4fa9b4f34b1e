use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use super::state::{BreakerState, Owner, Snapshot};

/// A handle on one breaker: its state and window figures, and manual control.
///
/// Made by [`CircuitBreakerLayer::handle`](super::CircuitBreakerLayer::handle) (or
/// [`handle_for`](super::CircuitBreakerLayer::handle_for) for a key). Cheap to clone; clones
/// act on the same breaker.
///
/// # Keyed breakers
///
/// A handle for a key acts only on that key's breaker. The table of a
/// [keyed](super::CircuitBreakerLayer::keyed) layer may give a healthy key's slot to a new key;
/// from then on the evicted key has no breaker, and its handle acts on nothing (its
/// `force_open`, `force_closed` and `reset` do nothing, and it reads as closed with empty
/// figures, which is what a request with that key would meet: a fresh breaker) until the key
/// gets a breaker again with a request of its own, which the handle then follows. It never
/// acts on the breaker of the key that took its slot.
#[derive(Clone)]
pub struct BreakerHandle {
    shared: Arc<Owner>,
    idx: usize,
    /// The key's hash, for a keyed layer's handle.
    key: Option<u64>,
}

impl BreakerHandle {
    pub(crate) fn new(shared: Arc<Owner>, idx: usize, key: Option<u64>) -> Self {
        BreakerHandle { shared, idx, key }
    }

    /// The slot of the handle's breaker now, if it has one.
    fn slot(&self) -> Option<usize> {
        self.shared.handle_slot(self.idx, self.key)
    }

    fn snapshot(&self) -> Snapshot {
        match self.slot() {
            Some(idx) => self.shared.snapshot(idx),
            None => Snapshot::vacant(),
        }
    }

    /// The breaker's state now. An open breaker whose open time is over still reads
    /// [`BreakerState::Open`] until a request makes it half-open.
    pub fn state(&self) -> BreakerState {
        self.snapshot().state
    }

    /// The breaker's state and the figures of its window.
    pub fn figures(&self) -> BreakerFigures {
        let s = self.snapshot();
        let rate = |n: u32| {
            if s.tally.calls == 0 {
                0.0
            } else {
                f64::from(n) / f64::from(s.tally.calls)
            }
        };
        BreakerFigures {
            state: s.state,
            calls: s.tally.calls,
            failures: s.tally.failures,
            slow_calls: s.tally.slow,
            failure_rate: rate(s.tally.failures),
            slow_call_rate: rate(s.tally.slow),
            consecutive_failures: s.consecutive,
            reopens: s.reopens,
            probes_in_flight: s.probes_in_flight,
            probe_successes: s.probe_successes,
            open_remaining: s.open_remaining,
        }
    }

    /// Opens the breaker until [`reset`](Self::reset): every request is refused. The
    /// breaker cannot know when it will be reset, so each refusal's wait hint is drawn
    /// uniformly between half and one and a half times the configured
    /// [`open_time`](super::BreakerConfig::open_time), so that refused clients do not come
    /// back in step.
    pub fn force_open(&self) {
        if let Some(idx) = self.slot() {
            self.shared.force_open(idx, self.key);
        }
    }

    /// Closes the breaker until [`reset`](Self::reset): every request goes through and
    /// nothing is counted, so it cannot trip.
    pub fn force_closed(&self) {
        if let Some(idx) = self.slot() {
            self.shared.force_closed(idx, self.key);
        }
    }

    /// Closes the breaker with an empty window, whatever its state.
    pub fn reset(&self) {
        if let Some(idx) = self.slot() {
            self.shared.reset(idx, self.key);
        }
    }
}

impl fmt::Debug for BreakerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BreakerHandle")
            .field("breaker", &self.idx)
            .field("figures", &self.figures())
            .finish()
    }
}

/// A breaker's state and window figures, read by [`BreakerHandle::figures`].
///
/// The window figures count only calls recorded since the breaker last closed; the window is
/// kept only when a rate condition is configured (otherwise they are zero).
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub struct BreakerFigures {
    /// The state.
    pub state: BreakerState,
    /// Calls in the window.
    pub calls: u32,
    /// Failures in the window.
    pub failures: u32,
    /// Slow calls in the window.
    pub slow_calls: u32,
    /// `failures / calls` (0 with no call).
    pub failure_rate: f64,
    /// `slow_calls / calls` (0 with no call).
    pub slow_call_rate: f64,
    /// Failures in a row, up to the last success.
    pub consecutive_failures: u32,
    /// How many times in a row the open time grew (what it was multiplied by): failed probe
    /// rounds, and trips that came before the breaker had stayed closed for the open time it
    /// last served. Kept while closed; the next trip after a stable period sets it to 0.
    pub reopens: u32,
    /// Half-open probes in flight.
    pub probes_in_flight: u32,
    /// Successful probes of the current half-open round.
    pub probe_successes: u32,
    /// Time left open, when open.
    pub open_remaining: Option<Duration>,
}

use std::fmt;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use super::gcra::{self, Quota};
use super::keyed::Table;
use super::service::RateLimit;
use super::{Global, MissingKey, NoHeaders, WithHeaders};
use crate::clock::{duration_nanos, Clock};
use crate::rejection::{RateLimitInfo, Rejection};
use crate::util::rng::{self, Rng};

/// The default bound on the number of keys a keyed limiter tracks.
pub const DEFAULT_MAX_KEYS: usize = 65_536;

/// The TAT of the global limiter, alone on its cache line.
#[repr(align(128))]
struct Hot {
    tat: AtomicU64,
}

/// When and under what a waiter's turn was reserved (see `Shared::refund_turn`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Reserved {
    /// The time of the reservation.
    pub(crate) at: u64,
    /// The quota's epoch then.
    pub(crate) epoch: u64,
    /// The generation of the key's slot (keyed limits), see `Checked::gen`.
    pub(crate) gen: Option<u64>,
}

/// The state a layer shares with every service it makes.
pub(crate) struct Shared {
    hot: Hot,
    // Read on every check; written only through the handle.
    interval: AtomicU64,
    tolerance: AtomicU64,
    /// The longest wait bound of the layers sharing this limit (`wait_up_to`): how far ahead
    /// of now a turn may be reserved, so that no layer takes another's reservation for a
    /// clock that went back.
    reach: AtomicU64,
    /// The largest `tolerance + interval` this limit ever had: a state set under a quota
    /// since made smaller may be that far ahead until `set_quota` caps it, and is no clock
    /// that went back.
    widest: AtomicU64,
    /// The horizon of a check (`gcra::span` of `widest` and `reach`, each the largest it has
    /// been): how far ahead of now a state may be and be no clock that went back. Only grows.
    span: AtomicU64,
    /// Counts the quota changes: a turn reserved before one is not given back (its interval
    /// was the old quota's, and the change capped the state it was part of).
    pub(crate) quota_epoch: AtomicU64,
    pub(crate) clock: Clock,
    pub(crate) table: Option<Table>,
    rejected: AtomicU64,
    pub(crate) missing: MissingKey,
    missing_keys: AtomicU64,
    missing_warned: AtomicBool,
    // The jitter of the hints in rejections (a Weyl sequence, mixed; only rejections draw).
    rng: Rng,
}

/// The least span of a hint's jitter: two units of the resolution it is written in, so that
/// clients refused together are told at least two different values once rounded up
/// (`grpc-retry-pushback-ms` and in-process callers: milliseconds; HTTP's `Retry-After`:
/// whole seconds).
const MIN_SPAN_FINE_NS: u64 = 2_000_000;
const MIN_SPAN_WHOLE_SECS_NS: u64 = 2_000_000_000;

/// A refusal of a rate limit (in process, Redis, or Redis's local fallback: one function, so
/// that every refusal is spread alike), given the exact time until the next token.
///
/// One uniform draw `u` in `[0, 1)` makes both hints: `retry_after` is
/// `exact + u × max(exact, 2 ms)` and the whole-seconds hint (HTTP `Retry-After`) is
/// `exact + u × max(exact, 2 s)`. Neither is ever less than the exact time (a client that
/// waits one out is admitted, if no one took the token first), and each spreads the clients
/// refused together over at least two units of its resolution, so that the spread survives
/// rounding up. The figures' `reset` is never less than either hint.
pub(crate) fn refusal(rng: &Rng, exact_ns: u64, mut info: RateLimitInfo) -> Rejection {
    let draw = rng.next_u64();
    let spread = |min_span: u64| exact_ns.saturating_add(rng::below(draw, exact_ns.max(min_span)));
    let fine = Duration::from_nanos(spread(MIN_SPAN_FINE_NS));
    let whole = Duration::from_nanos(spread(MIN_SPAN_WHOLE_SECS_NS));
    info.reset = info.reset.max(whole);
    Rejection::rate_limited(fine, info).with_whole_seconds_hint(whole)
}

impl Shared {
    fn new(quota: Quota, clock: Clock, table: Option<Table>, missing: MissingKey) -> Shared {
        Shared {
            hot: Hot {
                tat: AtomicU64::new(0),
            },
            interval: AtomicU64::new(quota.interval_ns()),
            tolerance: AtomicU64::new(quota.tolerance_ns()),
            reach: AtomicU64::new(0),
            widest: AtomicU64::new(quota.tolerance_ns() + quota.interval_ns()),
            span: AtomicU64::new(gcra::span(quota.interval_ns(), quota.tolerance_ns(), 0)),
            quota_epoch: AtomicU64::new(0),
            clock,
            table,
            rejected: AtomicU64::new(0),
            missing,
            missing_keys: AtomicU64::new(0),
            missing_warned: AtomicBool::new(false),
            rng: Rng::from_entropy(),
        }
    }

    /// A refusal, with hints jittered by [`refusal`].
    #[inline]
    pub(crate) fn refusal(&self, exact_ns: u64, info: RateLimitInfo) -> Rejection {
        refusal(&self.rng, exact_ns, info)
    }

    /// The generator of the jitter of refusals' hints.
    #[cfg(feature = "redis")]
    pub(crate) fn hint_rng(&self) -> &Rng {
        &self.rng
    }

    /// Counts a request whose key could not be read, and warns about the first one.
    #[cold]
    pub(crate) fn count_missing_key(&self) {
        self.missing_keys.fetch_add(1, Ordering::Relaxed);
        if !self.missing_warned.load(Ordering::Relaxed)
            && !self.missing_warned.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(
                target: "tower_bulwark::rate_limit",
                policy = ?self.missing,
                "rate limit: a request has no key (key::Header: the header absent, empty, not \
                 visible ASCII or sent twice; key::ClientIp: no peer address (under Axum, enable \
                 the `axum` feature and serve with \
                 into_make_service_with_connect_info::<SocketAddr>(), or set \
                 ClientIp::peer_addr), or a trusted proxy's request with no client address in \
                 the header read (X-Forwarded-For by default; ClientIp::use_forwarded() reads \
                 Forwarded)); such requests are counted and never share one limit"
            );
        }
    }

    /// `(interval, tolerance)`, read without a lock. A check that races with a quota change
    /// may pair the old interval with the new burst (or the reverse) once.
    #[inline]
    pub(crate) fn params(&self) -> (u64, u64) {
        (
            self.interval.load(Ordering::Relaxed),
            self.tolerance.load(Ordering::Relaxed),
        )
    }

    /// The horizon of a check: how far ahead of now a state may be and be no clock that went
    /// back (see `span`). At least the `gcra::span` of the current quota and of any layer's
    /// wait bound (`wait_up_to` registers it in `reach` first).
    #[inline]
    pub(crate) fn span(&self) -> u64 {
        self.span.load(Ordering::Relaxed)
    }

    /// Grows the span to cover `widest` and `reach` as they are now (after either grew).
    /// Sequentially consistent with those increases, so that of a quota change and a new
    /// wait bound racing, one sees the other's.
    fn grow_span(&self) {
        let widest = self.widest.load(Ordering::SeqCst);
        let reach = self.reach.load(Ordering::SeqCst);
        let span = (widest + gcra::CLOCK_SLACK_NS).saturating_add(reach);
        self.span.fetch_max(span, Ordering::SeqCst);
    }

    /// One check of the global limiter. Returns the step, the TAT after it and the time it
    /// was made at.
    ///
    /// `now` is the time read before the call; a TAT beyond its horizon (a stale `now`, or a
    /// clock that went back) has the clock read again, once, and the time returned is that
    /// fresh one (see `gcra::step_checked`).
    #[inline]
    pub(crate) fn check_global(&self, now: u64, max_wait_ns: u64) -> (gcra::Step, u64, u64) {
        let (interval, tolerance) = self.params();
        let horizon = self.span();
        let mut now = now;
        let mut tat = self.hot.tat.load(Ordering::Relaxed);
        loop {
            // Beyond the horizon: a stale `now`, or a clock that went back (see
            // `gcra::step_rechecked`).
            let (step, at) =
                gcra::step_rechecked(tat, now, interval, tolerance, max_wait_ns, horizon, || {
                    self.fresh_now()
                });
            now = at;
            match step {
                gcra::Step::Admit { new_tat, wait_ns } => {
                    // Release on success, so that a thread that reads this TAT and then the
                    // clock reads a time no earlier than the one read here. Nothing else is
                    // published through this word: every change of it is a read-modify-write.
                    match self.hot.tat.compare_exchange_weak(
                        tat,
                        new_tat,
                        Ordering::Release,
                        Ordering::Relaxed,
                    ) {
                        Ok(_) => return (gcra::Step::Admit { new_tat, wait_ns }, new_tat, now),
                        Err(actual) => tat = actual,
                    }
                }
                reject => return (reject, tat, now),
            }
        }
    }

    /// The clock read again after the TAT (see `gcra::step_checked`): the fence orders the
    /// read after the TAT's load, and the thread that set that TAT (with a release) read its
    /// clock before.
    #[cold]
    #[inline(never)]
    fn fresh_now(&self) -> u64 {
        std::sync::atomic::fence(Ordering::Acquire);
        self.clock.now_nanos()
    }

    /// Gives back a turn that was not used, if it is still the last one reserved (the Redis
    /// store's local fallback).
    #[cfg(feature = "redis")]
    pub(crate) fn refund(&self, hash: Option<u64>, new_tat: u64, interval: u64) {
        self.refund_turn(hash, new_tat, interval, 0, None);
    }

    /// Gives back a reserved turn that was not used (see `future::Refund` and
    /// `gcra::refunded`): moves the TAT back by one interval. Off the admit path: it reads
    /// the clock (not for `wake == 0`: only the last turn reserved is given back then).
    ///
    /// `reserved` says when and under what the turn was reserved: a turn reserved before a
    /// quota change is not given back (its interval is the old quota's), nor one reserved on a
    /// time line the clock has since gone back past, nor one of a key evicted since (its state
    /// is a fresh one); and never more than the current quota's interval.
    pub(crate) fn refund_turn(
        &self,
        hash: Option<u64>,
        new_tat: u64,
        interval: u64,
        wake: u64,
        reserved: Option<&Reserved>,
    ) {
        if reserved.is_some_and(|r| r.epoch != self.quota_epoch.load(Ordering::Acquire)) {
            return;
        }
        let (reserved_at, gen) = reserved.map_or((0, None), |r| (r.at, r.gen));
        let interval = interval.min(self.params().0);
        let now = if wake == 0 { 0 } else { self.clock.now_nanos() };
        if wake != 0 && now < reserved_at {
            // The clock went back past the reservation: the turn was on the old time line,
            // which the jump left behind (the limit started whole on the new one).
            return;
        }
        match (hash, &self.table) {
            (Some(hash), Some(table)) => table.refund(hash, gen, new_tat, interval, wake, now),
            _ => {
                let _ = self
                    .hot
                    .tat
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |tat| {
                        gcra::refunded(tat, new_tat, interval, wake, now)
                    });
            }
        }
    }

    #[inline]
    pub(crate) fn count_rejection(&self) {
        self.rejected.fetch_add(1, Ordering::Relaxed);
    }

    /// The figures for headers, given a TAT.
    pub(crate) fn info(&self, tat: u64, now: u64) -> RateLimitInfo {
        let (interval, tolerance) = self.params();
        RateLimitInfo {
            limit: tolerance / interval.max(1),
            remaining: gcra::remaining(tat, now, interval, tolerance),
            reset: Duration::from_nanos(tat.saturating_sub(now)),
            window: Duration::from_nanos(tolerance),
        }
    }
}

/// How a limiter is made: its quota and its clock. The state is built from it, whole, when
/// the layer is made, so every setting takes effect, and a handle taken from the layer sees
/// the state its services use.
///
/// A [`Quota`] converts into it, with the default clock ([`Clock::new`]).
///
/// ```
/// use tower_bulwark::clock::Clock;
/// use tower_bulwark::rate_limit::RateLimitConfig;
/// use tower_bulwark::{Quota, RateLimitLayer};
///
/// // A global limit on tokio's clock, for a test under paused time.
/// let layer = RateLimitLayer::new(RateLimitConfig::new(Quota::per_second(10)?).clock(Clock::tokio()));
/// // A keyed limit that tracks 4096 keys: `max_keys` makes a `KeyedConfig`, which only
/// // `RateLimitLayer::keyed` takes (a global limiter has no keys to bound).
/// let keyed = RateLimitLayer::keyed(
///     RateLimitConfig::new(Quota::per_second(10)?).max_keys(4096),
///     |req: &String| req.clone(),
/// );
/// assert_eq!(keyed.handle().max_keys(), 4096);
/// # let _ = layer;
/// # Ok::<(), tower_bulwark::rate_limit::QuotaError>(())
/// ```
#[derive(Clone, Debug)]
pub struct RateLimitConfig {
    quota: Quota,
    clock: Clock,
}

impl RateLimitConfig {
    /// The quota, on the default clock.
    pub fn new(quota: Quota) -> Self {
        RateLimitConfig {
            quota,
            clock: Clock::new(),
        }
    }

    /// The clock the limiter reads (default [`Clock::new`], fast). `Clock::tokio()` makes the
    /// limiter follow tokio's paused time, for tests.
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// For a keyed limiter: how many keys are tracked (rounded up to a power of two; between
    /// 8 and 2^26; default [`DEFAULT_MAX_KEYS`]). Up to this many live keys are tracked
    /// without eviction (see the [module docs](super)); beyond it, the key closest to whole is
    /// evicted and counted ([`RateLimitHandle::evictions`]). Memory is 32 bytes a key (twice
    /// as many slots), fixed when the layer is made.
    pub fn max_keys(self, max_keys: usize) -> KeyedConfig {
        KeyedConfig::from(self).max_keys(max_keys)
    }
}

impl From<Quota> for RateLimitConfig {
    fn from(quota: Quota) -> Self {
        RateLimitConfig::new(quota)
    }
}

/// How a keyed limiter is made: a [`RateLimitConfig`] and the number of keys it tracks. Made
/// by [`RateLimitConfig::max_keys`]; a [`Quota`] or a [`RateLimitConfig`] converts into it
/// with [`DEFAULT_MAX_KEYS`].
///
/// A global limiter has no keys to bound, so it does not take one:
///
/// ```compile_fail
/// use tower_bulwark::rate_limit::RateLimitConfig;
/// use tower_bulwark::{Quota, RateLimitLayer};
///
/// let layer = RateLimitLayer::new(RateLimitConfig::new(Quota::per_second(1)?).max_keys(16));
/// # Ok::<(), tower_bulwark::rate_limit::QuotaError>(())
/// ```
#[derive(Clone, Debug)]
pub struct KeyedConfig {
    base: RateLimitConfig,
    max_keys: usize,
    missing: MissingKey,
}

impl KeyedConfig {
    /// The quota, on the default clock, with [`DEFAULT_MAX_KEYS`] and [`MissingKey::Reject`].
    pub fn new(quota: Quota) -> Self {
        KeyedConfig::from(quota)
    }

    /// What to do with a request whose key cannot be read (default [`MissingKey::Reject`]).
    /// Such requests are counted ([`RateLimitHandle::missing_keys`]) and the first one is
    /// logged as a warning, whatever the policy.
    pub fn when_key_missing(mut self, policy: MissingKey) -> Self {
        self.missing = policy;
        self
    }

    /// The clock the limiter reads; see [`RateLimitConfig::clock`].
    pub fn clock(mut self, clock: Clock) -> Self {
        self.base.clock = clock;
        self
    }

    /// How many keys are tracked; see [`RateLimitConfig::max_keys`].
    pub fn max_keys(mut self, max_keys: usize) -> Self {
        self.max_keys = max_keys.max(1);
        self
    }
}

impl From<RateLimitConfig> for KeyedConfig {
    fn from(base: RateLimitConfig) -> Self {
        KeyedConfig {
            base,
            max_keys: DEFAULT_MAX_KEYS,
            missing: MissingKey::Reject,
        }
    }
}

impl From<Quota> for KeyedConfig {
    fn from(quota: Quota) -> Self {
        KeyedConfig::from(RateLimitConfig::new(quota))
    }
}

/// Applies a token-bucket (GCRA) rate limit; see the [module docs](super).
///
/// # Clone
///
/// Clones of a layer share its limit, and so do all the services a layer makes, whether by
/// cloning or by repeated [`Layer::layer`] calls (Axum applies a layer to each route: they
/// all draw on one limit). Two limits need two layers.
pub struct RateLimitLayer<K = Global, H = NoHeaders> {
    pub(crate) shared: Arc<Shared>,
    pub(crate) key: K,
    pub(crate) max_wait_ns: u64,
    pub(crate) headers: H,
}

impl RateLimitLayer {
    /// One limit shared by every request through this layer: a [`Quota`] (on the default
    /// clock) or a [`RateLimitConfig`].
    pub fn new(config: impl Into<RateLimitConfig>) -> Self {
        let config = config.into();
        RateLimitLayer {
            shared: Arc::new(Shared::new(
                config.quota,
                config.clock,
                None,
                MissingKey::Reject,
            )),
            key: Global,
            max_wait_ns: 0,
            headers: NoHeaders,
        }
    }
}

impl<K> RateLimitLayer<K> {
    /// A limit per key: `key` reads the key from the request (any `Fn(&Req) -> K` where
    /// `K: Hash`, or one of the extractors in [`key`](super::key)). `config` is a [`Quota`]
    /// (default clock, [`DEFAULT_MAX_KEYS`] keys), a [`RateLimitConfig`] or a
    /// [`KeyedConfig`] (from [`RateLimitConfig::max_keys`]).
    pub fn keyed(config: impl Into<KeyedConfig>, key: K) -> Self {
        let KeyedConfig {
            base,
            max_keys,
            missing,
        } = config.into();
        RateLimitLayer {
            shared: Arc::new(Shared::new(
                base.quota,
                base.clock,
                Some(Table::new(max_keys)),
                missing,
            )),
            key,
            max_wait_ns: 0,
            headers: NoHeaders,
        }
    }
}

impl<K, H> RateLimitLayer<K, H> {
    /// For clients: a request over the limit waits (with `tokio::time`) for its turn when
    /// that turn comes within `max_wait`, and is rejected otherwise. The turn is reserved at
    /// once, so waiters are served in order. Default: zero (reject at once), which is what
    /// servers want.
    ///
    /// A waiter that goes away before its turn (its response future dropped) gives the turn
    /// back, in whatever order waiters go away, so abandoned waiters never hold turns nobody
    /// uses. The waiters behind it keep their times, so a turn given back while a later one
    /// is still reserved can let one request more through before that later turn: at most one
    /// more than the quota per waiter that went away ahead of one still waiting. With no
    /// waiter going away, the quota is never exceeded.
    pub fn wait_up_to(mut self, max_wait: Duration) -> Self {
        self.max_wait_ns = duration_nanos(max_wait);
        // Every layer sharing this limit learns how far ahead a turn may now be reserved.
        self.shared
            .reach
            .fetch_max(self.max_wait_ns, Ordering::SeqCst);
        self.shared.grow_span();
        self
    }

    /// Successful HTTP responses carry the `RateLimit` and `RateLimit-Policy` headers (IETF
    /// draft syntax), as rejections always do.
    pub fn response_headers(self) -> RateLimitLayer<K, WithHeaders> {
        RateLimitLayer {
            shared: self.shared,
            key: self.key,
            max_wait_ns: self.max_wait_ns,
            headers: WithHeaders,
        }
    }

    /// A handle to read and change this layer's limit at run time.
    pub fn handle(&self) -> RateLimitHandle {
        RateLimitHandle {
            shared: self.shared.clone(),
        }
    }
}

impl<K: Clone, H: Clone> Clone for RateLimitLayer<K, H> {
    fn clone(&self) -> Self {
        RateLimitLayer {
            shared: self.shared.clone(),
            key: self.key.clone(),
            max_wait_ns: self.max_wait_ns,
            headers: self.headers.clone(),
        }
    }
}

impl<K, H> fmt::Debug for RateLimitLayer<K, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitLayer")
            .field("quota", &self.handle().quota())
            .field("keyed", &self.shared.table.is_some())
            .field("max_wait", &Duration::from_nanos(self.max_wait_ns))
            .finish_non_exhaustive()
    }
}

impl<S, K: Clone, H: Clone> Layer<S> for RateLimitLayer<K, H> {
    type Service = RateLimit<S, K, H>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit {
            inner,
            is_ready: false,
            shared: self.shared.clone(),
            key: self.key.clone(),
            max_wait_ns: self.max_wait_ns,
            headers: self.headers.clone(),
        }
    }
}

/// Reads and changes a [`RateLimitLayer`]'s limit at run time.
///
/// ```
/// use tower_bulwark::{Quota, RateLimitLayer};
///
/// let layer = RateLimitLayer::new(Quota::per_second(10)?);
/// let handle = layer.handle();
/// assert_eq!(handle.remaining(), 10);
/// handle.set_quota(Quota::per_second(100)?); // no rebuild
/// assert_eq!(handle.quota().burst_size(), 100);
/// # Ok::<(), tower_bulwark::rate_limit::QuotaError>(())
/// ```
#[derive(Clone)]
pub struct RateLimitHandle {
    shared: Arc<Shared>,
}

impl RateLimitHandle {
    /// Changes the quota of every service of the layer. Keys keep their state, capped to what
    /// the new quota allows: a key that spent its burst under the old quota is whole again as
    /// soon as the new quota says so (one new window after the change at the latest), and one
    /// that spent part of it keeps what it spent, up to the new burst. The cap is applied here,
    /// once (for a keyed limiter, by one walk of the table), so checks pay nothing for it.
    /// Turns that waiters (see [`RateLimitLayer::wait_up_to`]) reserved before the change keep
    /// their times, and are not given back if their waiter goes away; a check that races with
    /// the change may be made under the old quota. A clock that goes back by less than the
    /// largest window the limit has had plus the longest wait bound of the layers sharing it
    /// is taken for a stale reading, not for a jump (the limit stays spent until the old time
    /// comes again, at most that long). A shrinking change caps what was spent to the new
    /// burst, so a shrink followed by a growth back gives the difference again: change a
    /// quota for what it is, not back and forth.
    pub fn set_quota(&self, quota: Quota) {
        // Before the new quota is seen: states set under the old one are not taken for a
        // clock that went back, and turns reserved under it are not given back.
        self.shared
            .widest
            .fetch_max(quota.tolerance_ns() + quota.interval_ns(), Ordering::SeqCst);
        self.shared.grow_span();
        self.shared.quota_epoch.fetch_add(1, Ordering::AcqRel);
        // Tolerance first when growing and last when shrinking, so that a racing check sees
        // at worst the smaller of the two limits for a moment.
        let old_tol = self.shared.tolerance.load(Ordering::Relaxed);
        if quota.tolerance_ns() > old_tol {
            self.shared
                .interval
                .store(quota.interval_ns(), Ordering::Relaxed);
            self.shared
                .tolerance
                .store(quota.tolerance_ns(), Ordering::Relaxed);
        } else {
            self.shared
                .tolerance
                .store(quota.tolerance_ns(), Ordering::Relaxed);
            self.shared
                .interval
                .store(quota.interval_ns(), Ordering::Relaxed);
        }
        // No state may be further ahead than the new quota's whole window and the turns
        // waiters reserved (the longest wait bound): a limit spent under the old quota is
        // spent under the new one at most, and reserved turns stay in the state, as their
        // waiters will still take them.
        let cap = self
            .shared
            .clock
            .now_nanos()
            .saturating_add(quota.tolerance_ns())
            .saturating_add(self.shared.reach.load(Ordering::SeqCst));
        match &self.shared.table {
            Some(table) => table.cap_tats(cap),
            None => {
                let _ =
                    self.shared
                        .hot
                        .tat
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |tat| {
                            (tat > cap).then_some(cap)
                        });
            }
        }
        tracing::info!(
            interval_ns = quota.interval_ns(),
            burst = quota.burst_size(),
            "rate limit quota changed"
        );
    }

    /// The quota in force.
    pub fn quota(&self) -> Quota {
        let (interval, tolerance) = self.shared.params();
        Quota::from_parts(
            interval,
            u32::try_from(tolerance / interval.max(1)).unwrap_or(u32::MAX),
        )
    }

    /// Requests the global limit would admit now (for a keyed limiter: what an unseen key
    /// has).
    pub fn remaining(&self) -> u64 {
        let now = self.shared.clock.now_nanos();
        let (interval, tolerance) = self.shared.params();
        let tat = if self.shared.table.is_some() {
            0
        } else {
            self.shared.hot.tat.load(Ordering::Relaxed)
        };
        gcra::remaining(tat, now, interval, tolerance)
    }

    /// Requests a keyed limiter would admit now for `key` (the value the key function returns,
    /// of the same type, so that it hashes the same).
    pub fn remaining_for<Q: Hash + ?Sized>(&self, key: &Q) -> u64 {
        let now = self.shared.clock.now_nanos();
        let (interval, tolerance) = self.shared.params();
        let tat = match &self.shared.table {
            Some(t) => t.peek(t.hash(key)).unwrap_or(0),
            None => self.shared.hot.tat.load(Ordering::Relaxed),
        };
        gcra::remaining(tat, now, interval, tolerance)
    }

    /// Requests rejected so far (over the limit; not those without a key).
    pub fn rejected(&self) -> u64 {
        self.shared.rejected.load(Ordering::Relaxed)
    }

    /// Requests whose key could not be read (for [`key::ClientIp`](super::key::ClientIp): no
    /// client address; for [`key::Header`](super::key::Header): no usable header), refused or
    /// admitted as [`MissingKey`] says.
    pub fn missing_keys(&self) -> u64 {
        self.shared.missing_keys.load(Ordering::Relaxed)
    }

    /// Keys that currently hold state (keyed limiter; 0 for a global one). Walks the table.
    pub fn tracked_keys(&self) -> usize {
        let now = self.shared.clock.now_nanos();
        self.shared
            .table
            .as_ref()
            .map_or(0, |t| t.live_entries(now))
    }

    /// The keys the table tracks without eviction: `max_keys`, rounded up to a power of two
    /// (0 for a global limiter).
    pub fn max_keys(&self) -> usize {
        self.shared.table.as_ref().map_or(0, Table::max_keys)
    }

    /// Keys evicted while their state was still ahead, because every slot a new key could
    /// take held a live key (in practice: more than `max_keys` live keys). An evicted key
    /// starts afresh on its next request.
    pub fn evictions(&self) -> u64 {
        self.shared.table.as_ref().map_or(0, Table::evictions)
    }
}

impl fmt::Debug for RateLimitHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitHandle")
            .field("quota", &self.quota())
            .field("rejected", &self.rejected())
            .field("missing_keys", &self.missing_keys())
            .field("max_keys", &self.max_keys())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Clock;
    use crate::Quota;

    /// A thread that read the clock, was descheduled while others moved time on and spent
    /// the limit, and then reads the TAT: its stale time puts the TAT beyond the horizon, yet
    /// the clock did not go back. It must be refused, not find the limit whole.
    #[test]
    fn a_stale_now_does_not_refill_a_spent_limit() {
        let quota = Quota::per_second(1000).unwrap().burst(50).unwrap();
        let (clock, hand) = Clock::manual();
        let layer = RateLimitLayer::new(RateLimitConfig::new(quota).clock(clock));
        let shared = &layer.shared;
        hand.set_nanos(10_000_000);
        let mut admitted = 0;
        for _ in 0..60 {
            if let (gcra::Step::Admit { .. }, _, _) = shared.check_global(10_000_000, 0) {
                admitted += 1;
            }
        }
        assert_eq!(admitted, 50);
        // Time moves on by 5 ms (5 tokens), and those are taken.
        hand.set_nanos(15_000_000);
        for _ in 0..5 {
            assert!(matches!(
                shared.check_global(15_000_000, 0).0,
                gcra::Step::Admit { .. }
            ));
        }
        // A thread whose time is 5 ms old: refused, and told the fresh time.
        for _ in 0..10 {
            let (step, _, now) = shared.check_global(10_000_000, 0);
            assert!(matches!(step, gcra::Step::Reject { .. }), "{step:?}");
            assert_eq!(now, 15_000_000);
        }
        // A clock that really went back (every read is earlier): the limit is whole on the
        // new time line, one burst.
        hand.set_nanos(1_000_000);
        let mut after_jump = 0;
        for _ in 0..60 {
            if let (gcra::Step::Admit { .. }, _, _) = shared.check_global(1_000_000, 0) {
                after_jump += 1;
            }
        }
        assert_eq!(after_jump, 50);
    }
}

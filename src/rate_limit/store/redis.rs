//! The Redis-backed limiter: layer, service, handle and shared state.

use std::fmt;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::Duration;

use redis::aio::ConnectionManager;
use tower::BoxError;
use tower_layer::Layer;
use tower_service::Service;

use super::future::{CheckFuture, CheckOutput, NoAnswer, RedisResponseFuture};
use super::key::{KeyWriter, RedisKey};
use crate::clock::{duration_nanos, Clock};
use crate::rate_limit::gcra::{self, Quota};
use crate::rate_limit::layer::{refusal, Shared as LocalShared};
use crate::rate_limit::{
    Global, KeyFn, NoHeaders, RateLimitConfig, RateLimitHandle, RateLimitLayer, ResponseHeaders,
    WithHeaders, DEFAULT_MAX_KEYS,
};
use crate::rejection::{RateLimitInfo, Rejection, RejectionKind};
use crate::util::rng::Rng;

/// The GCRA step, run by `EVALSHA` (loaded again after a `NOSCRIPT`).
static SCRIPT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("gcra.lua")));

/// Gives back a reserved turn whose client went away before it came.
static REFUND: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("refund.lua")));

/// The key prefix used unless [`RedisRateLimitConfig::prefix`] says otherwise.
pub const DEFAULT_PREFIX: &str = "bulwark:rl:";

/// The time a Redis check may take before the failure policy decides, unless
/// [`RedisRateLimitConfig::timeout`] says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(50);

/// How long, after a check Redis could not answer, the following checks are decided by the
/// failure policy at once, unless [`RedisRateLimitConfig::cool_down`] says otherwise.
pub const DEFAULT_COOL_DOWN: Duration = Duration::from_secs(1);

/// The longest prefix accepted, in bytes.
pub const MAX_PREFIX_LEN: usize = 256;

/// The largest `tolerance + interval` the script computes exactly (Lua numbers are doubles):
/// about 52 days.
pub(crate) const MAX_REDIS_SPAN_NS: u64 = 1 << 52;

/// At most one failure event per this many nanoseconds.
const LOG_EVERY_NS: u64 = 1_000_000_000;
const NEVER: u64 = u64::MAX;

/// What a Redis-backed layer does with a request when Redis cannot answer in time.
///
/// Every such decision is counted (see [`RedisRateLimitHandle`]) and logged with `tracing` at
/// `WARN`, at most once a second with the number of events left out; the first successful
/// check afterwards logs an `INFO` event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FailurePolicy {
    /// Admit the request: the limit is off while Redis is down.
    FailOpen,
    /// Refuse the request with a [`Rejection`] of kind
    /// [`StoreUnavailable`](RejectionKind::StoreUnavailable) (HTTP 503, gRPC `UNAVAILABLE`).
    FailClosed,
    /// Decide with an in-process limiter of the same quota and key function (the default):
    /// each replica then admits up to the whole quota on its own while Redis is down.
    Local,
}

/// Why a Redis-backed limiter's configuration was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RedisConfigError {
    /// The quota's window plus one interval exceeds 2^52 ns (about 52 days), beyond what the
    /// script computes exactly.
    QuotaTooLong,
    /// The prefix contains `{` or `}`, which would change the key's Redis Cluster hash tag.
    PrefixBraces,
    /// The prefix is longer than [`MAX_PREFIX_LEN`] bytes.
    PrefixTooLong,
    /// A timeout of zero.
    ZeroTimeout,
    /// A key bound ([`LocalFallback::max_keys`]) for a global limit, which has no keys.
    MaxKeysWithoutKeys,
}

impl fmt::Display for RedisConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RedisConfigError::QuotaTooLong => {
                "quota window plus interval exceeds 2^52 ns (about 52 days) for a Redis limit"
            }
            RedisConfigError::PrefixBraces => "redis key prefix must not contain '{' or '}'",
            RedisConfigError::PrefixTooLong => "redis key prefix is longer than 256 bytes",
            RedisConfigError::ZeroTimeout => "redis timeout must be greater than zero",
            RedisConfigError::MaxKeysWithoutKeys => {
                "max_keys applies to a keyed limit; a global limit has no keys"
            }
        })
    }
}

impl std::error::Error for RedisConfigError {}

fn check_quota(quota: Quota) -> Result<Quota, RedisConfigError> {
    match quota.tolerance_ns().checked_add(quota.interval_ns()) {
        Some(span) if span <= MAX_REDIS_SPAN_NS => Ok(quota),
        _ => Err(RedisConfigError::QuotaTooLong),
    }
}

/// The Redis key of a user key: `prefix{<32 hex digits>}`, the hex being the first 128 bits
/// of the SHA-1 of the key's [`RedisKey`] encoding (fixed by this crate, unlike `Hash`'s
/// bytes, which may change between Rust releases). Whatever the user key holds (any length,
/// any bytes, braces), the key name has this fixed shape, so it can neither leave the prefix
/// nor change the hash tag, and one user key maps to one Redis Cluster slot.
pub(crate) fn redis_key<Q: RedisKey + ?Sized>(prefix: &[u8], key: &Q) -> Vec<u8> {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut w = KeyWriter::new();
    key.write_redis_key(&mut w);
    let digest = w.finish();
    let mut out = Vec::with_capacity(prefix.len() + 34);
    out.extend_from_slice(prefix);
    out.push(b'{');
    for b in &digest[..16] {
        out.push(HEX[usize::from(b >> 4)]);
        out.push(HEX[usize::from(b & 0xf)]);
    }
    out.push(b'}');
    out
}

/// An admitted request: the figures for headers (when asked), how long to wait for its turn
/// (0: at once) and, for a turn reserved ahead, what gives it back.
#[derive(Debug)]
pub(crate) struct Admitted {
    pub(crate) info: Option<RateLimitInfo>,
    pub(crate) wait_ns: u64,
    pub(crate) turn: Option<Turn>,
}

/// A turn reserved ahead (`wait_up_to`), to give back if its client goes away first.
#[derive(Debug)]
pub(crate) enum Turn {
    /// Reserved in Redis: the TAT the check stored.
    Redis { tat: Vec<u8> },
    /// Reserved in the local fallback's limiter.
    Local {
        hash: Option<u64>,
        new_tat: u64,
        interval: u64,
    },
}

/// Logs store failures at most once a second, and the recovery once.
pub(crate) struct FailureLog {
    last_ns: AtomicU64,
    suppressed: AtomicU64,
    degraded: AtomicBool,
}

impl FailureLog {
    fn new() -> FailureLog {
        FailureLog {
            last_ns: AtomicU64::new(NEVER),
            suppressed: AtomicU64::new(0),
            degraded: AtomicBool::new(false),
        }
    }

    /// A failure at `now`: `Some(events left out since the last line)` when this one should
    /// be logged.
    fn failure(&self, now: u64) -> Option<u64> {
        self.degraded.store(true, Ordering::Relaxed);
        let last = self.last_ns.load(Ordering::Relaxed);
        let due = last == NEVER || now.saturating_sub(last) >= LOG_EVERY_NS;
        if due
            && self
                .last_ns
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }

    /// A success: true once after failures.
    #[inline]
    fn success(&self) -> bool {
        if self.degraded.load(Ordering::Relaxed) && self.degraded.swap(false, Ordering::Relaxed) {
            self.last_ns.store(NEVER, Ordering::Relaxed);
            self.suppressed.store(0, Ordering::Relaxed);
            return true;
        }
        false
    }

    fn degraded(&self) -> bool {
        self.degraded.load(Ordering::Relaxed)
    }
}

/// After a failed check, the following checks skip Redis for the cool-down; then one check at
/// a time (the probe) goes to Redis, the others still skip it, until a check succeeds.
pub(crate) struct CoolDown {
    /// `HEALTHY`, or the clock reading from which a probe may go.
    probe_at: AtomicU64,
    /// When the probe out was sent (`NO_PROBE`: none). A probe out longer than `stale_ns`
    /// (its future held and never polled, so its timeout never started) no longer holds the
    /// others back.
    probing_since: AtomicU64,
    cool_ns: u64,
    stale_ns: u64,
}

const NO_PROBE: u64 = u64::MAX;

const HEALTHY: u64 = 0;

impl CoolDown {
    fn new(cool_ns: u64, stale_ns: u64) -> CoolDown {
        CoolDown {
            probe_at: AtomicU64::new(HEALTHY),
            probing_since: AtomicU64::new(NO_PROBE),
            cool_ns,
            stale_ns,
        }
    }

    /// Whether checks may go to Redis without asking [`admit`](Self::admit) (one load).
    #[inline]
    fn healthy(&self) -> bool {
        self.probe_at.load(Ordering::Relaxed) == HEALTHY
    }

    /// While cooling down: whether the check at `now` is the probe (`true`: send it, then
    /// call [`probe_done`](Self::probe_done)), or skips Redis (`false`).
    fn admit(&self, now: u64) -> bool {
        let at = self.probe_at.load(Ordering::Relaxed);
        if at == HEALTHY {
            return true;
        }
        if now < at {
            return false;
        }
        let since = self.probing_since.load(Ordering::Relaxed);
        (since == NO_PROBE || now.saturating_sub(since) >= self.stale_ns)
            && self
                .probing_since
                .compare_exchange(since, now, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
    }

    /// A check failed at `now`: the cool-down starts (again).
    fn failed(&self, now: u64) {
        self.probe_at
            .store(now.saturating_add(self.cool_ns).max(1), Ordering::Relaxed);
    }

    /// A check succeeded: every check goes to Redis again.
    #[inline]
    fn succeeded(&self) {
        if !self.healthy() {
            self.probe_at.store(HEALTHY, Ordering::Relaxed);
        }
    }

    /// The probe ended (answered, failed, or dropped): another may go.
    fn probe_done(&self) {
        self.probing_since.store(NO_PROBE, Ordering::Release);
    }
}

/// The probe in flight; ends it when dropped (with its check, answered or not).
struct Probe(Arc<RedisShared>);

impl Drop for Probe {
    fn drop(&mut self) {
        self.0.cool.probe_done();
    }
}

#[derive(Default)]
struct Counters {
    rejected: AtomicU64,
    store_failures: AtomicU64,
    timeouts: AtomicU64,
    skipped: AtomicU64,
    failed_open: AtomicU64,
    failed_closed: AtomicU64,
    local_fallbacks: AtomicU64,
    turns_given_back: AtomicU64,
    missing_keys: AtomicU64,
    missing_warned: std::sync::atomic::AtomicBool,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// What the layer keeps for the `Local` policy: an in-process limiter of the same quota.
struct Local {
    shared: Arc<LocalShared>,
    handle: RateLimitHandle,
}

/// The state a layer shares with every service it makes.
pub(crate) struct RedisShared {
    conn: ConnectionManager,
    prefix: Arc<[u8]>,
    interval: AtomicU64,
    tolerance: AtomicU64,
    timeout: Duration,
    max_wait_ns: u64,
    policy: FailurePolicy,
    local: Option<Local>,
    clock: Clock,
    counters: Counters,
    log: FailureLog,
    cool: CoolDown,
    /// The jitter of refusals' hints, drawn as the in-process limiter's are: the local
    /// fallback's generator when there is one (see [`hint_rng`](Self::hint_rng)), else this
    /// one, made at the first refusal.
    own_rng: std::sync::OnceLock<Rng>,
}

impl RedisShared {
    fn new(conn: ConnectionManager, c: RedisRateLimitConfig, keyed: bool) -> RedisShared {
        let (policy, local, clock) = match c.policy {
            Policy::FailOpen => (FailurePolicy::FailOpen, None, Clock::new()),
            Policy::FailClosed => (FailurePolicy::FailClosed, None, Clock::new()),
            Policy::Local(fallback) => {
                let base = RateLimitConfig::new(c.quota).clock(fallback.clock.clone());
                let layer = if keyed {
                    RateLimitLayer::keyed(
                        base.max_keys(fallback.max_keys.unwrap_or(DEFAULT_MAX_KEYS)),
                        Global,
                    )
                } else {
                    RateLimitLayer::new(base)
                };
                let local = Local {
                    handle: layer.handle(),
                    shared: layer.shared,
                };
                (FailurePolicy::Local, Some(local), fallback.clock)
            }
        };
        RedisShared {
            conn,
            prefix: c.prefix,
            interval: AtomicU64::new(c.quota.interval_ns()),
            tolerance: AtomicU64::new(c.quota.tolerance_ns()),
            timeout: c.timeout,
            max_wait_ns: c.max_wait_ns,
            policy,
            local,
            clock,
            counters: Counters::default(),
            log: FailureLog::new(),
            cool: CoolDown::new(c.cool_down_ns, duration_nanos(c.timeout)),
            own_rng: std::sync::OnceLock::new(),
        }
    }

    /// The generator of the jitter of refusals' hints: one per layer, whether Redis or the
    /// local fallback refused.
    fn hint_rng(&self) -> &Rng {
        match &self.local {
            Some(local) => local.shared.hint_rng(),
            None => self.own_rng.get_or_init(Rng::from_entropy),
        }
    }

    #[inline]
    fn params(&self) -> (u64, u64) {
        (
            self.interval.load(Ordering::Relaxed),
            self.tolerance.load(Ordering::Relaxed),
        )
    }

    /// The hash of `key` in the local fallback's table (0 without one).
    #[inline]
    pub(crate) fn local_hash<Q: Hash + ?Sized>(&self, key: &Q) -> u64 {
        match self.local.as_ref().and_then(|l| l.shared.table.as_ref()) {
            Some(table) => table.hash(key),
            None => 0,
        }
    }

    /// The check of one key: one `EVALSHA` (plus a `SCRIPT LOAD` and a second `EVALSHA` after
    /// a `NOSCRIPT`), bounded by the timeout as a whole; and the interval it sends (a turn it
    /// reserves is given back by that interval, whatever `set_quota` does meanwhile). During
    /// the cool-down after a failed check, the check is not sent (`None`, decided as
    /// [`NoAnswer::Skipped`] with nothing allocated), unless it is the one probe.
    pub(crate) fn check(this: &Arc<RedisShared>, key: Vec<u8>) -> (Option<CheckFuture>, u64) {
        let (interval, tolerance) = this.params();
        let probe = if this.cool.healthy() {
            None
        } else if this.cool.admit(this.clock.now_nanos()) {
            Some(Probe(this.clone()))
        } else {
            return (None, interval);
        };
        let mut conn = this.conn.clone();
        let timeout = this.timeout;
        let max_wait = this.max_wait_ns;
        let check: CheckFuture = Box::pin(async move {
            let mut invocation = SCRIPT.key(key);
            invocation.arg(interval).arg(tolerance).arg(max_wait);
            let out = tokio::time::timeout(timeout, invocation.invoke_async(&mut conn))
                .await
                .map_err(|_| NoAnswer::TimedOut);
            if let Some(probe) = probe {
                // A failed probe starts the next cool-down before another probe may go.
                if !matches!(out, Ok(Ok(_))) {
                    probe.0.cool.failed(probe.0.clock.now_nanos());
                }
            }
            out
        });
        (Some(check), interval)
    }

    /// Turns the outcome of a check into a decision; an admit carries the limit's figures
    /// when `want_info` (for response headers).
    pub(crate) fn decide(
        &self,
        out: CheckOutput,
        local_hash: u64,
        want_info: bool,
    ) -> Result<Admitted, Rejection> {
        match out {
            Ok(Ok((admitted, wait, ahead, tat))) => {
                self.cool.succeeded();
                if self.log.success() {
                    tracing::info!(
                        prefix = %String::from_utf8_lossy(&self.prefix),
                        "redis rate limit: store reachable again"
                    );
                }
                let ahead = u64::try_from(ahead).unwrap_or(0);
                if admitted == 1 {
                    let wait_ns = u64::try_from(wait).unwrap_or(0);
                    Ok(Admitted {
                        info: want_info.then(|| self.info(ahead)),
                        wait_ns,
                        turn: (wait_ns > 0).then_some(Turn::Redis { tat }),
                    })
                } else {
                    bump(&self.counters.rejected);
                    let wait = u64::try_from(wait).unwrap_or(0);
                    tracing::trace!(retry_after_ns = wait, "redis rate limit: request rejected");
                    Err(refusal(self.hint_rng(), wait, self.info(ahead)))
                }
            }
            Ok(Err(e)) => self.on_failure(&e, Some(false), local_hash, want_info),
            Err(NoAnswer::TimedOut) => {
                self.on_failure(&NoAnswer::TimedOut, Some(true), local_hash, want_info)
            }
            Err(NoAnswer::Skipped) => {
                self.on_failure(&NoAnswer::Skipped, None, local_hash, want_info)
            }
        }
    }

    /// Gives back a reserved turn whose client went away before it came: in the local
    /// fallback at once, in Redis by a compare-and-set script sent from a spawned task (a
    /// `Drop` cannot wait for a round trip; without a tokio runtime the turn stays spent).
    /// `key` and `interval` are the Redis key and the interval of the check that reserved a
    /// Redis turn.
    pub(crate) fn refund(self: Arc<Self>, key: Vec<u8>, interval: u64, turn: Turn) {
        match turn {
            Turn::Local {
                hash,
                new_tat,
                interval,
            } => {
                if let Some(local) = &self.local {
                    local.shared.refund(hash, new_tat, interval);
                    bump(&self.counters.turns_given_back);
                }
            }
            Turn::Redis { tat } => {
                let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                    return;
                };
                let mut conn = self.conn.clone();
                let timeout = self.timeout;
                runtime.spawn(async move {
                    let mut invocation = REFUND.key(key);
                    invocation.arg(tat).arg(interval);
                    let given: Result<Result<i64, _>, _> =
                        tokio::time::timeout(timeout, invocation.invoke_async(&mut conn)).await;
                    let given_back = matches!(given, Ok(Ok(1)));
                    if given_back {
                        bump(&self.counters.turns_given_back);
                    }
                    tracing::trace!(given_back, "redis rate limit: a reserved turn was not used");
                });
            }
        }
    }

    /// The figures of the limit, given how far its state is ahead of now.
    fn info(&self, ahead: u64) -> RateLimitInfo {
        let (interval, tolerance) = self.params();
        RateLimitInfo {
            limit: tolerance / interval.max(1),
            remaining: gcra::remaining(ahead, 0, interval.max(1), tolerance),
            reset: Duration::from_nanos(ahead),
            window: Duration::from_nanos(tolerance),
        }
    }

    /// A check without an answer, decided by the policy: `sent` is `Some(timed_out)` for a
    /// check sent to Redis, `None` for one skipped during the cool-down.
    #[cold]
    fn on_failure(
        &self,
        error: &dyn fmt::Display,
        sent: Option<bool>,
        local_hash: u64,
        want_info: bool,
    ) -> Result<Admitted, Rejection> {
        let now = self.clock.now_nanos();
        let timed_out = sent == Some(true);
        match sent {
            Some(timed_out) => {
                bump(&self.counters.store_failures);
                if timed_out {
                    bump(&self.counters.timeouts);
                }
                self.cool.failed(now);
            }
            None => bump(&self.counters.skipped),
        }
        if let Some(suppressed) = self.log.failure(now) {
            tracing::warn!(
                policy = ?self.policy,
                error = %error,
                timed_out,
                suppressed,
                skipped = self.counters.skipped.load(Ordering::Relaxed),
                cool_down_ms = self.cool.cool_ns / 1_000_000,
                prefix = %String::from_utf8_lossy(&self.prefix),
                "redis rate limit: store unavailable, deciding by the failure policy \
                 (checks skip redis for the cool-down after a failure, then one probe at a time)"
            );
        }
        match (self.policy, &self.local) {
            (FailurePolicy::FailOpen, _) => {
                bump(&self.counters.failed_open);
                Ok(Admitted {
                    info: None,
                    wait_ns: 0,
                    turn: None,
                })
            }
            (FailurePolicy::Local, Some(local)) => {
                bump(&self.counters.local_fallbacks);
                let l = &*local.shared;
                let (step, tat, now) = match &l.table {
                    None => l.check_global(now, self.max_wait_ns),
                    Some(table) => {
                        let (interval, tolerance) = l.params();
                        let c = table.check(
                            local_hash,
                            now,
                            &l.clock,
                            interval,
                            tolerance,
                            self.max_wait_ns,
                            // The local limit does not know this layer's wait bound.
                            l.span()
                                .max(gcra::span(interval, tolerance, self.max_wait_ns)),
                        );
                        (c.step, c.tat, c.now)
                    }
                };
                match step {
                    gcra::Step::Admit { wait_ns, .. } => Ok(Admitted {
                        info: want_info.then(|| l.info(tat, now)),
                        wait_ns,
                        turn: (wait_ns > 0).then(|| Turn::Local {
                            hash: l.table.as_ref().map(|_| local_hash),
                            new_tat: tat,
                            interval: l.params().0,
                        }),
                    }),
                    gcra::Step::Reject { retry_after_ns } => {
                        l.count_rejection();
                        bump(&self.counters.rejected);
                        Err(l.refusal(retry_after_ns, l.info(tat, now)))
                    }
                }
            }
            _ => {
                bump(&self.counters.failed_closed);
                Err(Rejection::new(RejectionKind::StoreUnavailable)
                    .with_detail("the rate limit store is unreachable"))
            }
        }
    }
}

/// How a Redis-backed limiter is made: its quota, key prefix, timeout, wait bound and
/// failure policy. The layer's state is built from it, whole, when the layer is made, so
/// every setting takes effect, and a handle taken from the layer sees the state its
/// services use. A [`Quota`] converts into it, with the defaults.
///
/// ```no_run
/// use std::time::Duration;
/// use tower_bulwark::clock::Clock;
/// use tower_bulwark::rate_limit::store::{
///     FailurePolicy, LocalFallback, RedisRateLimitConfig, RedisRateLimitLayer,
/// };
/// use tower_bulwark::Quota;
///
/// # async fn f(conn: redis::aio::ConnectionManager) -> Result<(), Box<dyn std::error::Error>> {
/// // Refuse when Redis is down.
/// let strict = RedisRateLimitConfig::new(Quota::per_second(100)?)
///     .prefix("orders:rl:")?
///     .timeout(Duration::from_millis(20))?
///     .failure_policy(FailurePolicy::FailClosed);
/// let layer = RedisRateLimitLayer::keyed(conn.clone(), strict, |req: &String| req.clone())?;
/// // Fall back to an in-process limiter that follows tokio's clock and tracks 4096 keys.
/// let fallback = RedisRateLimitConfig::new(Quota::per_second(100)?)
///     .local_fallback(LocalFallback::new().clock(Clock::tokio()).max_keys(4096));
/// let local = RedisRateLimitLayer::keyed(conn, fallback, |req: &String| req.clone())?;
/// # let _ = (layer, local); Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct RedisRateLimitConfig {
    quota: Quota,
    prefix: Arc<[u8]>,
    timeout: Duration,
    cool_down_ns: u64,
    max_wait_ns: u64,
    policy: Policy,
}

/// The failure policy with its own configuration.
#[derive(Clone, Debug)]
enum Policy {
    FailOpen,
    FailClosed,
    Local(LocalFallback),
}

impl RedisRateLimitConfig {
    /// The quota, with the default prefix ([`DEFAULT_PREFIX`]), timeout ([`DEFAULT_TIMEOUT`]),
    /// no wait, and [`FailurePolicy::Local`] with a default [`LocalFallback`].
    pub fn new(quota: Quota) -> Self {
        RedisRateLimitConfig {
            quota,
            prefix: Arc::from(DEFAULT_PREFIX.as_bytes()),
            timeout: DEFAULT_TIMEOUT,
            cool_down_ns: duration_nanos(DEFAULT_COOL_DOWN),
            max_wait_ns: 0,
            policy: Policy::Local(LocalFallback::new()),
        }
    }

    /// The prefix of this limit's Redis keys (default [`DEFAULT_PREFIX`]). The prefix names
    /// the limit: two layers with the same prefix share one limit, in any process.
    ///
    /// # Errors
    ///
    /// When the prefix contains `{` or `}` (they would change the Redis Cluster hash tag) or
    /// is longer than [`MAX_PREFIX_LEN`] bytes.
    pub fn prefix(mut self, prefix: &str) -> Result<Self, RedisConfigError> {
        if prefix.len() > MAX_PREFIX_LEN {
            return Err(RedisConfigError::PrefixTooLong);
        }
        if prefix.contains(['{', '}']) {
            return Err(RedisConfigError::PrefixBraces);
        }
        self.prefix = Arc::from(prefix.as_bytes());
        Ok(self)
    }

    /// How long a check may take, reconnection included, before the failure policy decides
    /// (default [`DEFAULT_TIMEOUT`], 50 ms).
    ///
    /// # Errors
    ///
    /// [`RedisConfigError::ZeroTimeout`] for a zero duration.
    pub fn timeout(mut self, timeout: Duration) -> Result<Self, RedisConfigError> {
        if timeout.is_zero() {
            return Err(RedisConfigError::ZeroTimeout);
        }
        self.timeout = timeout;
        Ok(self)
    }

    /// How long, after a check Redis could not answer (an error or the timeout), the
    /// following checks are decided by the failure policy at once, without asking Redis
    /// (default [`DEFAULT_COOL_DOWN`], 1 s). So an outage costs one request the timeout, not
    /// every request. Once the cool-down has passed, one check at a time (the probe) goes to
    /// Redis while the others still skip it: the first check Redis answers ends the outage,
    /// and every check goes to Redis again; a probe that fails starts another cool-down.
    /// Zero: no pause, but still one probe at a time while Redis fails. Checks skipped are
    /// counted ([`RedisRateLimitHandle::skipped`]) and decided by the policy as failures are.
    /// The cool-down follows the clock of the [`LocalFallback`] (the default clock for the
    /// other policies).
    pub fn cool_down(mut self, cool_down: Duration) -> Self {
        self.cool_down_ns = duration_nanos(cool_down);
        self
    }

    /// For clients: a request over the limit waits (with `tokio::time`) for its turn when that
    /// turn comes within `max_wait`, and is rejected otherwise. The turn is reserved in Redis
    /// at once, so waiters of every replica are served in order and never exceed the quota.
    /// A client that goes away before its turn gives the turn back (one more script, sent
    /// from a spawned task), unless a later turn was reserved meanwhile; see
    /// [`RedisRateLimitHandle::turns_given_back`].
    /// Default: zero (reject at once), which is what servers want. Values beyond the script's
    /// range (about 52 days) are capped. Layers sharing a prefix should share the wait bound
    /// too: a layer with a shorter bound finds the limit spent while turns reserved beyond
    /// its own reach are pending (its refusals' hints then count from the furthest it can
    /// reach, not from the last reserved turn).
    pub fn wait_up_to(mut self, max_wait: Duration) -> Self {
        self.max_wait_ns = duration_nanos(max_wait).min(MAX_REDIS_SPAN_NS);
        self
    }

    /// What to do when Redis cannot answer in time (default [`FailurePolicy::Local`]).
    /// `Local` keeps the [`LocalFallback`] given by [`local_fallback`](Self::local_fallback),
    /// if any; `FailOpen` and `FailClosed` have no local limiter, hence no fallback to
    /// configure.
    pub fn failure_policy(mut self, policy: FailurePolicy) -> Self {
        self.policy = match (policy, self.policy) {
            (FailurePolicy::FailOpen, _) => Policy::FailOpen,
            (FailurePolicy::FailClosed, _) => Policy::FailClosed,
            (_, Policy::Local(fallback)) => Policy::Local(fallback),
            (_, _) => Policy::Local(LocalFallback::new()),
        };
        self
    }

    /// [`FailurePolicy::Local`], with this in-process limiter's configuration (its clock and,
    /// for a keyed limit, how many keys it tracks).
    pub fn local_fallback(mut self, fallback: LocalFallback) -> Self {
        self.policy = Policy::Local(fallback);
        self
    }
}

impl From<Quota> for RedisRateLimitConfig {
    fn from(quota: Quota) -> Self {
        RedisRateLimitConfig::new(quota)
    }
}

/// The in-process limiter that decides while Redis is down, under [`FailurePolicy::Local`]
/// (given with [`RedisRateLimitConfig::local_fallback`]): it has the layer's quota and key
/// function, and this clock and key bound.
#[derive(Clone, Debug)]
pub struct LocalFallback {
    clock: Clock,
    max_keys: Option<usize>,
}

impl LocalFallback {
    /// The default clock ([`Clock::new`]) and [`DEFAULT_MAX_KEYS`] keys.
    pub fn new() -> Self {
        LocalFallback {
            clock: Clock::new(),
            max_keys: None,
        }
    }

    /// The clock of the local limiter and of the failure log. `Clock::tokio()` makes the
    /// fallback follow tokio's paused time, for tests. The Redis limit itself reads Redis's
    /// clock (`TIME`), never the process's.
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// For a keyed limit ([`RedisRateLimitLayer::keyed`]): how many keys the local limiter
    /// tracks (see [`RateLimitConfig::max_keys`]). Redis memory is bounded by expiry instead:
    /// each key expires when its state is in the past. A global limit has one state: giving
    /// it a key bound is refused ([`RedisConfigError::MaxKeysWithoutKeys`]).
    pub fn max_keys(mut self, max_keys: usize) -> Self {
        self.max_keys = Some(max_keys.max(1));
        self
    }
}

impl Default for LocalFallback {
    fn default() -> Self {
        LocalFallback::new()
    }
}

/// Applies a rate limit kept in Redis, shared by every replica; see the
/// [module docs](super).
///
/// # Clone
///
/// Clones of a layer share its state (connection, counters, local fallback), and so do all
/// the services a layer makes, whether by cloning or by repeated [`Layer::layer`] calls. The
/// limit itself lives in Redis: every layer, in any process, with the same prefix and key
/// draws on it.
pub struct RedisRateLimitLayer<K = Global, H = NoHeaders> {
    shared: Arc<RedisShared>,
    key: K,
    headers: H,
    quota: Quota,
    keyed: bool,
}

impl RedisRateLimitLayer {
    /// One limit shared by every request through every replica's layer with this prefix:
    /// `config` is a [`Quota`] (with the defaults) or a [`RedisRateLimitConfig`].
    ///
    /// # Errors
    ///
    /// [`RedisConfigError::QuotaTooLong`] when the quota's window plus one interval exceeds
    /// about 52 days; [`RedisConfigError::MaxKeysWithoutKeys`] when the local fallback was
    /// given a key bound.
    pub fn new(
        conn: ConnectionManager,
        config: impl Into<RedisRateLimitConfig>,
    ) -> Result<Self, RedisConfigError> {
        let config = config.into();
        if let Policy::Local(fallback) = &config.policy {
            if fallback.max_keys.is_some() {
                return Err(RedisConfigError::MaxKeysWithoutKeys);
            }
        }
        Self::build(conn, config, Global, false)
    }
}

impl<K> RedisRateLimitLayer<K> {
    /// A limit per key: `key` reads the key from the request, as for
    /// [`RateLimitLayer::keyed`]; `config` is a [`Quota`] or a [`RedisRateLimitConfig`]. The
    /// Redis key is the prefix and a digest of the key's [`RedisKey`] encoding, which this
    /// crate fixes (it does not change with the compiler or the platform, as `Hash`'s bytes
    /// may): use the same key function on every replica. The key's type must implement
    /// [`RedisKey`] (strings, bytes, integers, addresses, header values, tuples of them).
    ///
    /// # Errors
    ///
    /// [`RedisConfigError::QuotaTooLong`] when the quota's window plus one interval exceeds
    /// about 52 days.
    pub fn keyed(
        conn: ConnectionManager,
        config: impl Into<RedisRateLimitConfig>,
        key: K,
    ) -> Result<Self, RedisConfigError> {
        Self::build(conn, config.into(), key, true)
    }

    fn build(
        conn: ConnectionManager,
        config: RedisRateLimitConfig,
        key: K,
        keyed: bool,
    ) -> Result<Self, RedisConfigError> {
        let quota = check_quota(config.quota)?;
        Ok(RedisRateLimitLayer {
            shared: Arc::new(RedisShared::new(conn, config, keyed)),
            key,
            headers: NoHeaders,
            quota,
            keyed,
        })
    }
}

impl<K, H> RedisRateLimitLayer<K, H> {
    /// Successful HTTP responses carry the `RateLimit` and `RateLimit-Policy` headers, from
    /// the figures the check returned, as rejections always do.
    pub fn response_headers(self) -> RedisRateLimitLayer<K, WithHeaders> {
        RedisRateLimitLayer {
            shared: self.shared,
            key: self.key,
            headers: WithHeaders,
            quota: self.quota,
            keyed: self.keyed,
        }
    }

    /// A handle to read the counters and change the quota at run time.
    pub fn handle(&self) -> RedisRateLimitHandle {
        RedisRateLimitHandle {
            shared: self.shared.clone(),
        }
    }
}

impl<K: Clone, H: Clone> Clone for RedisRateLimitLayer<K, H> {
    fn clone(&self) -> Self {
        RedisRateLimitLayer {
            shared: self.shared.clone(),
            key: self.key.clone(),
            headers: self.headers.clone(),
            quota: self.quota,
            keyed: self.keyed,
        }
    }
}

impl<K, H> fmt::Debug for RedisRateLimitLayer<K, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisRateLimitLayer")
            .field("quota", &self.quota)
            .field("keyed", &self.keyed)
            .field(
                "prefix",
                &String::from_utf8_lossy(&self.shared.prefix).as_ref(),
            )
            .field("timeout", &self.shared.timeout)
            .field("cool_down", &Duration::from_nanos(self.shared.cool.cool_ns))
            .field("max_wait", &Duration::from_nanos(self.shared.max_wait_ns))
            .field("policy", &self.shared.policy)
            .finish_non_exhaustive()
    }
}

impl<S, K: Clone, H: Clone> Layer<S> for RedisRateLimitLayer<K, H> {
    type Service = RedisRateLimit<S, K, H>;

    fn layer(&self, inner: S) -> Self::Service {
        RedisRateLimit {
            inner,
            is_ready: false,
            shared: self.shared.clone(),
            key: self.key.clone(),
            headers: self.headers.clone(),
        }
    }
}

/// Applies a Redis-backed rate limit; made by [`RedisRateLimitLayer`].
///
/// `call` derives the Redis key and starts the check; the response future runs it (one round
/// trip) and then calls the inner service, or refuses the request.
///
/// # Readiness
///
/// A refusal never waits on the inner service's readiness (tower's `LoadShed` pattern):
/// `poll_ready` polls the inner service, remembers whether it is ready, and is ready itself
/// at once (only an inner error is passed on). The response future refuses a request over the
/// limit as soon as Redis answers, whatever the inner readiness; an admitted request whose
/// inner service was not ready waits for that readiness, then is called.
///
/// # Clone
///
/// Clones share the layer's state. A clone starts unreserved, as the tower contract asks:
/// `call` moves the inner service (ready or not) into the response future and leaves a clone.
pub struct RedisRateLimit<S, K = Global, H = NoHeaders> {
    inner: S,
    // Whether the inner service's last `poll_ready` was ready (a reservation to consume).
    is_ready: bool,
    shared: Arc<RedisShared>,
    key: K,
    headers: H,
}

impl<S: Clone, K: Clone, H: Clone> Clone for RedisRateLimit<S, K, H> {
    fn clone(&self) -> Self {
        RedisRateLimit {
            inner: self.inner.clone(),
            is_ready: false,
            shared: self.shared.clone(),
            key: self.key.clone(),
            headers: self.headers.clone(),
        }
    }
}

impl<S: fmt::Debug, K, H> fmt::Debug for RedisRateLimit<S, K, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisRateLimit")
            .field("inner", &self.inner)
            .field("policy", &self.shared.policy)
            .finish_non_exhaustive()
    }
}

impl<S, Req, K, H> Service<Req> for RedisRateLimit<S, K, H>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    K: KeyFn<Req>,
    K::Key: RedisKey,
    H: ResponseHeaders<S::Response>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = RedisResponseFuture<S, Req, H>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Never wait here: a refusal must not wait on the inner readiness.
        self.is_ready = match self.inner.poll_ready(cx) {
            Poll::Ready(Ok(())) => true,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
            Poll::Pending => false,
        };
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let shared = &*self.shared;
        let Some(key) = self.key.key(&req) else {
            // Never one shared limit for requests without a key: refused, counted, warned.
            bump(&shared.counters.missing_keys);
            if !shared.counters.missing_warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    target: "tower_bulwark::rate_limit",
                    "redis rate limit: a request has no key (for key::ClientIp: no client \
                     address); such requests are refused and counted"
                );
            }
            let rejection = if self.key.missing_key_is_server_fault() {
                Rejection::new(RejectionKind::ClientAddressUnknown)
                    .with_detail("the client's address could not be found")
            } else {
                Rejection::new(RejectionKind::RateLimitKeyMissing)
                    .with_detail("the rate limit key could not be read from the request")
            };
            crate::util::stamp::refuse(req);
            return RedisResponseFuture::refused(rejection, self.shared.clone());
        };
        let ready = std::mem::take(&mut self.is_ready);
        let local_hash = shared.local_hash(&key);
        let rkey = redis_key(&shared.prefix, &key);
        let waits = shared.max_wait_ns > 0;
        // A layer whose clients wait for reserved turns keeps the key and the check's
        // interval, to give a turn back.
        let kept_key = waits.then(|| rkey.clone());
        let (check, interval) = RedisShared::check(&self.shared, rkey);
        let kept = kept_key.map(|key| (key, interval));
        let clone = self.inner.clone();
        let svc = std::mem::replace(&mut self.inner, clone);
        RedisResponseFuture::new(
            check,
            svc,
            ready,
            req,
            self.shared.clone(),
            local_hash,
            kept,
        )
    }
}

/// Reads a [`RedisRateLimitLayer`]'s counters and changes its quota at run time.
///
/// The counters are this process's: each replica has its own.
#[derive(Clone)]
pub struct RedisRateLimitHandle {
    shared: Arc<RedisShared>,
}

impl RedisRateLimitHandle {
    /// The quota in force.
    pub fn quota(&self) -> Quota {
        let (interval, tolerance) = self.shared.params();
        Quota::from_parts(
            interval,
            u32::try_from(tolerance / interval.max(1)).unwrap_or(u32::MAX),
        )
    }

    /// Changes the quota this process sends with each check (and its local fallback's).
    /// Every replica should be told: the quota travels with each check; Redis keeps only each
    /// key's theoretical arrival time, how far ahead the admit that stored it set it, and
    /// the window of the quota it was stored under.
    ///
    /// Keys keep their state, capped as the in-process
    /// [`RateLimitHandle::set_quota`](crate::rate_limit::RateLimitHandle::set_quota) caps it,
    /// but at each check rather than at the change, and as of the key's last admit (the
    /// instant its state was stored): a state stored under a longer window, and set further
    /// ahead than the new quota (and wait bound) can set, is capped to that instant plus the
    /// new window. So a key limited under a longer window is whole again within the new
    /// window of the change, whether or not it is asked about meanwhile (its refusals till
    /// then tell the time to the next token of the new quota), and a key that spent more than
    /// a smaller new burst gets nothing more until the new quota, counted from its last
    /// admit, gives it back (at most one new burst sooner than the in-process cap would).
    ///
    /// # Errors
    ///
    /// [`RedisConfigError::QuotaTooLong`], as for [`RedisRateLimitLayer::new`].
    pub fn set_quota(&self, quota: Quota) -> Result<(), RedisConfigError> {
        let quota = check_quota(quota)?;
        let s = &self.shared;
        // Tolerance first when growing and last when shrinking: a racing check sees at worst
        // the smaller limit for a moment.
        if quota.tolerance_ns() > s.tolerance.load(Ordering::Relaxed) {
            s.interval.store(quota.interval_ns(), Ordering::Relaxed);
            s.tolerance.store(quota.tolerance_ns(), Ordering::Relaxed);
        } else {
            s.tolerance.store(quota.tolerance_ns(), Ordering::Relaxed);
            s.interval.store(quota.interval_ns(), Ordering::Relaxed);
        }
        if let Some(local) = &s.local {
            local.handle.set_quota(quota);
        }
        Ok(())
    }

    /// The failure policy.
    pub fn policy(&self) -> FailurePolicy {
        self.shared.policy
    }

    /// Requests refused because the limit was spent (by Redis, or by the local fallback).
    pub fn rejected(&self) -> u64 {
        self.shared.counters.rejected.load(Ordering::Relaxed)
    }

    /// Checks Redis could not answer (errors and timeouts), each decided by the policy.
    pub fn store_failures(&self) -> u64 {
        self.shared.counters.store_failures.load(Ordering::Relaxed)
    }

    /// Requests whose key could not be read (for
    /// [`ClientIp`](crate::rate_limit::key::ClientIp): no client address). They are refused
    /// with [`RateLimitKeyMissing`](RejectionKind::RateLimitKeyMissing) (or [`ClientAddressUnknown`](RejectionKind::ClientAddressUnknown)), never put under one
    /// shared limit; the first one is logged as a warning.
    pub fn missing_keys(&self) -> u64 {
        self.shared.counters.missing_keys.load(Ordering::Relaxed)
    }

    /// Of [`store_failures`](Self::store_failures), those that ran out of time.
    pub fn timeouts(&self) -> u64 {
        self.shared.counters.timeouts.load(Ordering::Relaxed)
    }

    /// Checks not sent to Redis because a recent check failed (the
    /// [cool-down](RedisRateLimitConfig::cool_down), or another check was the probe), each
    /// decided by the policy at once. Not counted in [`store_failures`](Self::store_failures).
    pub fn skipped(&self) -> u64 {
        self.shared.counters.skipped.load(Ordering::Relaxed)
    }

    /// Requests admitted by [`FailurePolicy::FailOpen`].
    pub fn failed_open(&self) -> u64 {
        self.shared.counters.failed_open.load(Ordering::Relaxed)
    }

    /// Requests refused by [`FailurePolicy::FailClosed`].
    pub fn failed_closed(&self) -> u64 {
        self.shared.counters.failed_closed.load(Ordering::Relaxed)
    }

    /// Requests decided by the local limiter of [`FailurePolicy::Local`].
    pub fn local_fallbacks(&self) -> u64 {
        self.shared.counters.local_fallbacks.load(Ordering::Relaxed)
    }

    /// Turns reserved ahead ([`wait_up_to`](RedisRateLimitConfig::wait_up_to)) and given back
    /// because their client went away before they came (a turn is not given back when a
    /// later one was reserved meanwhile).
    pub fn turns_given_back(&self) -> u64 {
        self.shared
            .counters
            .turns_given_back
            .load(Ordering::Relaxed)
    }

    /// Whether Redis is taken as down: from a check that could not reach it until one it
    /// answers (checks skipped during the cool-down keep it so).
    pub fn degraded(&self) -> bool {
        self.shared.log.degraded()
    }

    /// The timeout of each check.
    pub fn timeout(&self) -> Duration {
        self.shared.timeout
    }
}

impl fmt::Debug for RedisRateLimitHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisRateLimitHandle")
            .field("quota", &self.quota())
            .field("policy", &self.policy())
            .field("rejected", &self.rejected())
            .field("store_failures", &self.store_failures())
            .field("skipped", &self.skipped())
            .field("degraded", &self.degraded())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_have_a_fixed_shape() {
        let hostile: Vec<Vec<u8>> = vec![
            Vec::new(),
            b"}{".to_vec(),
            b"{evil}".to_vec(),
            b"a}b{c}d".to_vec(),
            vec![0xff; 100_000],
            (0u8..=255).collect(),
            b"bulwark:rl:{0000}".to_vec(),
        ];
        let mut seen = std::collections::HashSet::new();
        for k in &hostile {
            let key = redis_key(b"app:", k);
            assert!(key.starts_with(b"app:{"), "{key:?}");
            assert_eq!(key.len(), b"app:".len() + 34);
            assert_eq!(key.last(), Some(&b'}'));
            let tag = &key[5..key.len() - 1];
            assert!(tag.iter().all(|b| b.is_ascii_hexdigit()), "{tag:?}");
            assert_eq!(key.iter().filter(|&&b| b == b'{').count(), 1);
            assert_eq!(key.iter().filter(|&&b| b == b'}').count(), 1);
            assert!(seen.insert(key), "two hostile keys collided");
        }
    }

    #[test]
    fn keys_are_stable_and_distinct() {
        // The same value gives the same key in every process (no random seed).
        assert_eq!(redis_key(b"p:", "alice"), redis_key(b"p:", "alice"));
        assert_eq!(
            redis_key(b"p:", "alice"),
            redis_key(b"p:", &String::from("alice"))
        );
        assert_ne!(redis_key(b"p:", "alice"), redis_key(b"p:", "bob"));
        assert_ne!(redis_key(b"p:", &1u64), redis_key(b"p:", &2u64));
        // A known vector: pins the derivation, so that replicas of two builds agree.
        assert_eq!(
            String::from_utf8(redis_key(b"p:", &7u32)).unwrap(),
            format!("p:{{{}}}", &sha1_hex(&7u32.to_be_bytes())[..32])
        );
        // Text and bytes of the same content name one key; the parts of a tuple stay apart.
        assert_eq!(redis_key(b"p:", "ab"), redis_key(b"p:", &b"ab".to_vec()));
        assert_ne!(
            redis_key(b"p:", &("ab", "c")),
            redis_key(b"p:", &("a", "bc"))
        );
    }

    /// The Redis key is part of the format every replica shares: replicas built by different
    /// compilers (a rolling deploy) must derive the same key from the same user key, or each
    /// gets a limit of its own. These values are computed from the documented encoding (see
    /// `RedisKey`) and must never change.
    #[test]
    fn redis_keys_are_pinned() {
        use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
        let key = |k: Vec<u8>| String::from_utf8(k).unwrap();
        assert_eq!(
            key(redis_key(b"p:", "alice")),
            "p:{175b4ff8e7a5d33954546f5914962753}"
        );
        assert_eq!(
            key(redis_key(b"p:", &String::from("alice"))),
            "p:{175b4ff8e7a5d33954546f5914962753}"
        );
        assert_eq!(
            key(redis_key(b"p:", &7u32)),
            "p:{41a53770303a0776a1378239e2ee0fd8}"
        );
        assert_eq!(
            key(redis_key(b"p:", &IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)))),
            "p:{fbd2574bcee0d42cdb22b131f6dff940}"
        );
        assert_eq!(
            key(redis_key(b"p:", &IpAddr::V6(Ipv6Addr::LOCALHOST))),
            "p:{87f419e28a0861953acabb17da7f6106}"
        );
        assert_eq!(
            key(redis_key(b"p:", &())),
            "p:{da39a3ee5e6b4b0d3255bfef95601890}"
        );
        assert_eq!(
            key(redis_key(b"p:", &("tenant", 42u64))),
            "p:{5b19d98a6958060a5c9af3c90d788063}"
        );
    }

    /// Refusals decided by Redis and by the local fallback draw their hints' jitter from one
    /// generator, not two.
    #[tokio::test]
    async fn refusal_hints_draw_from_one_generator() {
        let Some(server) =
            super::super::redis_server::RedisServer::start("refusal_hints_draw_from_one_generator")
        else {
            return;
        };
        let conn = super::super::redis_server::conn(&server.url()).await;
        let quota = Quota::per_second(10).unwrap();
        let local = RedisShared::new(conn.clone(), RedisRateLimitConfig::new(quota), true);
        let fallback = &local.local.as_ref().expect("a local fallback").shared;
        assert!(std::ptr::eq(local.hint_rng(), fallback.hint_rng()));
        // Without a local limiter, the store has a generator of its own.
        let closed = RedisShared::new(
            conn,
            RedisRateLimitConfig::new(quota).failure_policy(FailurePolicy::FailClosed),
            true,
        );
        assert!(closed.local.is_none());
        let a = closed.hint_rng().next_u64();
        assert_ne!(a, closed.hint_rng().next_u64());
    }

    /// During the cool-down, a check that is not the probe is decided at once: no command,
    /// and no future (nothing boxed) to poll.
    #[tokio::test]
    async fn a_check_skipped_in_the_cool_down_is_no_future() {
        let Some(server) = super::super::redis_server::RedisServer::start(
            "a_check_skipped_in_the_cool_down_is_no_future",
        ) else {
            return;
        };
        let conn = super::super::redis_server::conn(&server.url()).await;
        let config = RedisRateLimitConfig::new(Quota::per_second(10).unwrap())
            .failure_policy(FailurePolicy::FailClosed);
        let shared = Arc::new(RedisShared::new(conn, config, true));
        assert!(RedisShared::check(&shared, b"k".to_vec()).0.is_some());
        shared.cool.failed(shared.clock.now_nanos());
        assert!(RedisShared::check(&shared, b"k".to_vec()).0.is_none());
        let decided = shared.decide(Err(NoAnswer::Skipped), 0, false);
        assert_eq!(decided.unwrap_err().kind(), RejectionKind::StoreUnavailable);
        assert_eq!(shared.counters.skipped.load(Ordering::Relaxed), 1);
    }

    fn sha1_hex(bytes: &[u8]) -> String {
        sha1_smol::Sha1::from(bytes).digest().to_string()
    }

    #[test]
    fn quotas_beyond_the_script_range_are_refused() {
        assert!(check_quota(Quota::per_hour(1000).unwrap()).is_ok());
        assert_eq!(
            check_quota(Quota::per_hour(1).unwrap().burst(24 * 60).unwrap()),
            Err(RedisConfigError::QuotaTooLong)
        );
    }

    #[test]
    fn failures_are_logged_at_most_once_a_second() {
        let log = FailureLog::new();
        assert_eq!(log.failure(0), Some(0));
        assert_eq!(log.failure(10), None);
        assert_eq!(log.failure(999_999_999), None);
        assert!(log.degraded());
        assert_eq!(log.failure(1_000_000_000), Some(2));
        assert_eq!(log.failure(1_000_000_001), None);
        assert!(log.success());
        assert!(!log.success());
        assert!(!log.degraded());
        // After a recovery, the next outage is logged at once.
        assert_eq!(log.failure(1_000_000_002), Some(0));
    }

    #[test]
    fn after_a_failure_checks_skip_redis_then_one_probe_at_a_time() {
        let cool = CoolDown::new(1_000, 100_000);
        assert!(cool.healthy());
        cool.failed(5_000);
        assert!(!cool.healthy());
        // Within the cool-down: every check skips Redis.
        assert!(!cool.admit(5_000));
        assert!(!cool.admit(5_999));
        // Past it: one probe, the others still skip while it is out.
        assert!(cool.admit(6_000));
        assert!(!cool.admit(6_001));
        assert!(!cool.admit(9_000));
        // The probe failed: another cool-down from then.
        cool.failed(6_050);
        cool.probe_done();
        assert!(!cool.admit(7_000));
        assert!(cool.admit(7_050));
        // A probe dropped unanswered lets the next check probe.
        cool.probe_done();
        assert!(cool.admit(7_060));
        // Answered: every check goes to Redis again, at once.
        cool.succeeded();
        cool.probe_done();
        assert!(cool.healthy());
        assert!(cool.admit(7_061));
        assert!(cool.admit(7_061));
        // A zero cool-down still sends one probe at a time.
        let zero = CoolDown::new(0, 100_000);
        zero.failed(10);
        assert!(zero.admit(10));
        assert!(!zero.admit(10));
        // A probe out longer than the check's timeout (held, never polled, so its own timeout
        // never started) no longer holds every other check off Redis.
        assert!(!zero.admit(100_009));
        assert!(zero.admit(100_010));
        assert!(!zero.admit(100_011));
    }

    /// Splits a stored value, "seconds:nanoseconds:reach:window", into the TAT, the reach
    /// and the window (ns).
    fn parse_stored(stored: &str) -> (u64, u64, u64) {
        let parts: Vec<u64> = stored.split(':').map(|p| p.parse().unwrap()).collect();
        let [secs, nanos, reach, window] = parts[..] else {
            panic!("{stored}");
        };
        (secs * 1_000_000_000 + nanos, reach, window)
    }

    /// One run of the script at a given time (microseconds), as a check sends it.
    fn run_script(
        con: &mut redis::Connection,
        key: &str,
        (interval, tolerance, max_wait): (u64, u64, u64),
        now_us: u64,
    ) -> (i64, i64, i64, String) {
        SCRIPT
            .key(key)
            .arg(interval)
            .arg(tolerance)
            .arg(max_wait)
            .arg(now_us / 1_000_000)
            .arg(now_us % 1_000_000)
            .invoke(con)
            .unwrap()
    }

    /// A layer with a shorter wait bound on the prefix of one with a longer one (which the
    /// docs advise against) finds the limit spent while the other's turns are reserved, and
    /// leaves them: the state is not taken as stored under a longer window.
    #[test]
    fn a_shorter_wait_bound_on_the_same_prefix_leaves_the_turns_reserved() {
        let Some(server) = super::super::redis_server::RedisServer::start(
            "a_shorter_wait_bound_on_the_same_prefix_leaves_the_turns_reserved",
        ) else {
            return;
        };
        let client = redis::Client::open(server.url()).unwrap();
        let mut con = client.get_connection().unwrap();
        // 10 a second, burst 1; the waiting layer waits up to a second.
        let (i, tol) = (100_000_000, 100_000_000);
        let waiting = (i, tol, 1_000_000_000);
        let at_once = (i, tol, 0);
        let t = 1_764_000_000_000_000u64;
        // The burst, then two turns reserved (going at 100 and 200 ms): the TAT is 300 ms
        // ahead, the next free slot.
        for wait in [0, 100_000_000, 200_000_000] {
            let (admitted, w, _, _) = run_script(&mut con, "mixed:{1}", waiting, t);
            assert_eq!((admitted, w), (1, wait));
        }
        let before: String = redis::cmd("GET").arg("mixed:{1}").query(&mut con).unwrap();
        // The other layer is refused until that slot, and writes nothing.
        for after_ms in [0, 100, 150, 250] {
            let (admitted, ..) = run_script(&mut con, "mixed:{1}", at_once, t + after_ms * 1_000);
            assert_eq!(admitted, 0, "{after_ms} ms after");
        }
        let after: String = redis::cmd("GET").arg("mixed:{1}").query(&mut con).unwrap();
        assert_eq!(after, before);
        let (admitted, ..) = run_script(&mut con, "mixed:{1}", at_once, t + 300_000);
        assert_eq!(admitted, 1, "at the first slot after the reserved turns");
    }

    /// The Lua script is the same GCRA as `gcra::step`: driven with the same times (given to
    /// the script in place of `TIME`), a real Redis and the pure function agree on every
    /// decision, wait and state, including when time jumps back (beyond a window: the limit
    /// whole on the new time line) and across a quota change (the state stored under the old
    /// quota capped as the in-process `set_quota` caps it, taking the change at the instant
    /// the state was stored).
    #[test]
    fn script_agrees_with_the_in_process_step() {
        use proptest::prelude::*;
        use proptest::test_runner::{Config as PtConfig, TestRunner};

        let Some(server) = super::super::redis_server::RedisServer::start(
            "script_agrees_with_the_in_process_step",
        ) else {
            return;
        };
        let client = redis::Client::open(server.url()).unwrap();
        let con = std::cell::RefCell::new(client.get_connection().unwrap());
        let case = std::cell::Cell::new(0u64);
        let strategy = (
            (100_000_000u64..2_000_000_000, 1u64..10),
            // At least 100 ms a token: the keys' real expiry (set from the state, on Redis's
            // own clock) does not come between two steps of a case.
            (100_000_000u64..2_000_000_000, 1u64..10),
            proptest::collection::vec((-1_000_000i64..3_000_000, 0u8..8, 0u8..4), 1..40),
            0u64..3_000_000,
        );
        let mut runner = TestRunner::new(PtConfig::with_cases(64));
        runner
            .run(&strategy, |(first, second, steps, wait_millionths)| {
                case.set(case.get() + 1);
                let key = format!("diff:{{{}}}", case.get());
                let unit = first.0 / 1_000_000;
                // Half the cases admit at once only; the others accept to wait.
                let case_wait = if case.get().is_multiple_of(2) {
                    0
                } else {
                    wait_millionths * unit
                };
                let mut quota = first;
                let mut now_us: i64 = 1_764_000_000_000_000;
                // The model: the TAT, the instant of the admit that stored it, and the
                // tolerance it was stored under.
                let mut tat = 0u64;
                let mut stored_at = 0u64;
                let mut stored_tol = 0u64;
                for (d, change, other) in steps {
                    // Now and then the quota changes (either way).
                    if change == 0 {
                        quota = if quota == first { second } else { first };
                    }
                    // Now and then a layer that does not wait checks the same key.
                    let max_wait = if other == 0 { 0 } else { case_wait };
                    let (interval, burst) = quota;
                    let tolerance = interval * burst;
                    // Steps of whole microseconds, as Redis's TIME has.
                    now_us += d * unit as i64 / 1_000;
                    let now_ns = now_us as u64 * 1_000;
                    let (admitted, wait, ahead, stored) = run_script(
                        &mut con.borrow_mut(),
                        &key,
                        (interval, tolerance, max_wait),
                        now_us as u64,
                    );
                    // A state set further ahead than this quota's horizon when it was stored
                    // came from a longer window (capped to its store instant plus this
                    // window, as `set_quota` caps it in process) or from a longer wait bound
                    // (spent for this check).
                    let horizon = tolerance + max_wait + interval;
                    let capped = if tat == 0 || tat - stored_at <= horizon {
                        tat
                    } else if stored_tol > tolerance {
                        stored_at + tolerance
                    } else {
                        tat.min(now_ns + tolerance + max_wait)
                    };
                    match gcra::step(capped, now_ns, interval, tolerance, max_wait) {
                        gcra::Step::Admit { new_tat, wait_ns } => {
                            prop_assert_eq!(admitted, 1);
                            prop_assert_eq!(wait as u64, wait_ns);
                            prop_assert_eq!(ahead as u64, new_tat - now_ns);
                            // The value handed back for a refund is the one stored: the TAT,
                            // how far ahead of now it was set, and the window.
                            let (stored_tat, reach, window) = parse_stored(&stored);
                            prop_assert_eq!(stored_tat, new_tat);
                            prop_assert_eq!(reach, new_tat - now_ns);
                            prop_assert_eq!(window, tolerance);
                            tat = new_tat;
                            stored_at = now_ns;
                            stored_tol = tolerance;
                        }
                        gcra::Step::Reject { retry_after_ns } => {
                            prop_assert_eq!(admitted, 0);
                            prop_assert_eq!(stored, "");
                            prop_assert_eq!(wait as u64, retry_after_ns);
                            // The state the step saw: beyond the horizon, the clock went back
                            // and the limit is whole.
                            let seen = if capped > now_ns + horizon {
                                now_ns
                            } else {
                                capped
                            };
                            prop_assert_eq!(ahead as u64, seen.saturating_sub(now_ns));
                        }
                    }
                }
                Ok(())
            })
            .unwrap();
    }
}

//! [`RedisStore`]: idempotency leases and records in Redis, shared by every replica.
//!
//! One Redis key per idempotency key holds either a lease or a record, each with a time to
//! live:
//!
//! - [`claim`](Store::claim) is one Lua script, one round trip: `GET`, and when the key is
//!   free, `SET key <lease> NX PX <lease ttl>` with a fresh owner token; otherwise it answers
//!   in flight, mismatch, or the stored record itself (a replay costs one round trip).
//! - [`complete`](Store::complete), [`renew`](Store::renew) and [`release`](Store::release)
//!   are compare-and-set scripts: they act only while the key still holds this owner's token,
//!   so only the owner completes, extends (`PEXPIRE`) or releases its lease.
//! - [`get`](Store::get) is one `GET`.
//!
//! A claim whose answer never came back (the connection cut, or the call's timeout) may still
//! have taken its lease in Redis, late. The store keeps that claim's owner token and releases
//! the lease with it (retrying while Redis is unreachable, until the lease would have
//! expired anyway), so that a late claim leaves no lease that nobody holds: a repeat can run
//! once Redis has seen the release. The release is sent after the claim on the same
//! connection, so Redis runs them in that order; only a claim that reaches Redis after the
//! release went through another connection could still linger, until its time to live. The
//! release of a request that failed (its key given back so that the client may retry) is
//! retried the same way: a release lost on the way does not leave the key refused for the
//! rest of the lease.
//!
//! These background releases are bounded, whatever the outage: they wait in one queue, sent
//! by one task per store, each key's tokens in one script per round. The two kinds (the
//! releases of claims never answered, and those of requests that failed) have a room each,
//! of at most [`MAX_PENDING_RELEASES`] owner tokens (at most [`MAX_PENDING_RELEASES_PER_KEY`]
//! per key), so that a burst of one kind cannot crowd out the other. A release that finds
//! its room full is dropped and counted ([`RedisStoreStats::releases_dropped`]): its lease,
//! if it was taken, expires by itself. So is a release that Redis refuses in a way no retry
//! mends (a script error, a reply of the wrong type, refused credentials or permissions),
//! with a `WARN` event; only failures that may pass (Redis unreachable, slow, loading,
//! failing over, out of memory) are retried. The same holds for a record written in the
//! background.
//!
//! Values are compact binary: a lease is `L`, the request's fingerprint (16 bytes) and the
//! owner token (16 bytes); a record is `R`, the fingerprint and [`Record::encode`]'s bytes (no
//! serde). Keys are `<prefix>{<hex of 128 bits of SHA-1 of the scope and key>}`: a hostile
//! idempotency key (long, binary, braces) can leave neither the prefix nor the Redis Cluster
//! hash tag.
//!
//! # What the owner token protects against, and lease loss on failover
//!
//! The token protects against a *late owner*: a request that ran longer than its lease, whose
//! key was meanwhile claimed by a retry. Its `complete` finds another token and fails with
//! [`StoreErrorKind::LeaseLost`] instead of overwriting the new owner's lease or record, and
//! its `release` leaves the new owner's lease alone.
//!
//! It cannot protect against Redis losing the lease itself. Redis replication is
//! asynchronous: if the primary fails after acknowledging a claim and before a replica
//! received it, the promoted replica has no lease, and a retry of the same key claims it and
//! runs **a second time**. The same happens if Redis restarts without persistence, or evicts
//! the key under memory pressure. Exactly-once holds while Redis keeps what it acknowledged;
//! handlers that must never run twice should also be idempotent in their own database (a
//! unique constraint on the key).
//!
//! # Eviction
//!
//! Run the store on a Redis whose `maxmemory-policy` is `noeviction` (the Redis default). Every
//! lease and record has a time to live, so the `volatile-*` policies evict exactly them, and
//! the `allkeys-*` policies evict them too: a completed key evicted under memory pressure runs
//! its handler again on retry. Under `noeviction` a full Redis refuses writes instead, and the
//! layer's failure policy applies (503 by default): nothing runs twice.
//!
//! The store checks: before its first claim it reads the policy (`CONFIG GET maxmemory*`).
//! With an evicting policy and a `maxmemory` limit it **refuses every claim** (a
//! [`StoreErrorKind::Unavailable`] error, so the layer's failure policy applies: 503 by
//! default), logs an `ERROR` and counts the refusals
//! ([`RedisStoreStats::eviction_refusals`]). An evicting policy with no `maxmemory` (nothing
//! evicted yet) and a server that refuses `CONFIG` (renamed or not allowed, as on some
//! managed services) are warned about, and trusted.
//!
//! The policy is read again, whatever was found: every [`POLICY_REREAD`] (60 s) while claims
//! are accepted, so that a policy changed at run time to an evicting one (or a `CONFIG`
//! allowed again) is noticed, and every [`POLICY_REREAD_REFUSING`] (10 s) while they are
//! refused, so that a fixed configuration is taken up with no restart. These reads are off
//! the claims' path: the first claim past the interval sends one read on a task of its own
//! (at most one in flight; a second later again if Redis did not answer it) and is itself
//! decided by what the store knew. Until the read's answer, claims are decided the same
//! way; the store's [clock](RedisStore::clock) times the interval.
//!
//! # Failures
//!
//! Every call has a [timeout](RedisStore::timeout) (default 50 ms); a timeout is a
//! [`StoreErrorKind::Timeout`], any other Redis failure a [`StoreErrorKind::Unavailable`].
//! Unlike the Redis rate limit, which may fall back to a local limiter, the idempotency
//! layer has no local record of other replicas' keys to fall back on: it applies its
//! failure policy (`FailClosed` by default: 503, nothing runs; or `FailOpen`: runs without
//! deduplication, counted). What a request meets when Redis is down (stopped, stalled, or
//! cut off):
//!
//! | Redis down at | the request | the key |
//! |---|---|---|
//! | claim | `FailClosed`: refused, [`StoreUnavailable`](crate::RejectionKind::StoreUnavailable) (503), the handler does not run | a claim that may have reached Redis is released with its owner token in the background |
//! | complete (the handler ran) | the client has the handler's response | never released: the record is sent again in the background until Redis takes it (even after the lease expired, while no one else holds the key), refuses it for good, or the record's time to live has passed, and the lease is renewed meanwhile whenever Redis answers; repeats on the same layer get 409, on other replicas 503 (Redis down) or 409 (lease held), then the replay |
//! | release (the request failed) | the client has the failure | released in the background once Redis answers (repeats meanwhile get 503 or 409), then the key runs again, once |
//!
//! So no store write that fails lets a request run twice: a key whose record could not be
//! written stays leased, the lease renewed while the record waits. A full Redis
//! (`noeviction`, `maxmemory` reached) refuses the record (`OOM`, retried) but not the
//! renewal, whose script is flagged `allow-oom` (it only sets a time to live; Redis 7 and
//! later, an unflagged script on older servers): the lease never lapses while Redis is full.
//! Only a Redis unreachable for longer than the lease lets the lease expire there, and a
//! repeat sent to another replica once Redis is back may then run again before the record
//! lands (keep the lease's time to live above the outages it must ride out). Retries stop
//! for a failure that no retry mends (see above). The store counts failures
//! ([`RedisStore::stats`]) and logs them at `WARN` at most once a second, and the recovery at
//! `INFO`. The connection is a `redis::aio::ConnectionManager`, which reconnects on its own.
//! Tested with a server stopped, frozen (`SIGSTOP`) and cut off by a proxy
//! (`tests/redis_idempotency.rs`, `tests/redis_idempotency_faults.rs`).

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::hash::BuildHasher;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use redis::aio::ConnectionManager;

use super::{Claim, Lease, Store, StoreError, StoreErrorKind, StoreKey};
use crate::clock::{duration_nanos, Clock};
use crate::idempotency::{Fingerprint, Record};

/// The key prefix used unless [`RedisStore::prefix`] says otherwise.
pub const DEFAULT_PREFIX: &str = "bulwark:idem:";

/// The time a store call may take, unless [`RedisStore::timeout`] says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(50);

/// The longest prefix accepted, in bytes.
pub const MAX_PREFIX_LEN: usize = 256;

const LOG_EVERY_NS: u64 = 1_000_000_000;
const NEVER: u64 = u64::MAX;

/// How often the eviction policy is read again while claims are accepted: a policy changed
/// to an evicting one (or `CONFIG` allowed again) is noticed within this time.
pub const POLICY_REREAD: Duration = Duration::from_secs(60);
const POLICY_REREAD_NS: u64 = 60_000_000_000;

/// How often the eviction policy is read again while claims are refused for it, so that a
/// fixed configuration is taken up with no restart.
pub const POLICY_REREAD_REFUSING: Duration = Duration::from_secs(10);
const POLICY_REREAD_REFUSING_NS: u64 = 10_000_000_000;

/// After a read of the policy that Redis did not answer, the next one is due this much later.
const POLICY_RETRY_NS: u64 = 1_000_000_000;

/// What the store knows of Redis's eviction policy: not read yet (the first claim reads it).
const POLICY_UNKNOWN: u8 = 0;
/// `noeviction`: nothing is evicted.
const POLICY_OK: u8 = 1;
/// A policy that evicts with a memory limit: claims are refused.
const POLICY_EVICTS: u8 = 2;
/// `CONFIG` refused (renamed or not allowed): trusted, warned.
const POLICY_UNREADABLE: u8 = 3;
/// An evicting policy with no `maxmemory`: nothing is evicted yet; trusted, warned.
const POLICY_NO_LIMIT: u8 = 4;

/// What a claim does about the eviction policy.
enum PolicyGate {
    /// Known not to evict: claim.
    Pass,
    /// Known to evict: refuse.
    Refuse,
    /// Not read yet: read it first.
    ReadFirst,
}

/// Why claims are refused: Redis may evict leases and records.
#[derive(Debug)]
struct EvictionPolicy(String);

impl fmt::Display for EvictionPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "redis maxmemory-policy is {} with a maxmemory limit: it may evict idempotency \
             leases and records (a completed request would run again); set noeviction",
            self.0
        )
    }
}

impl std::error::Error for EvictionPolicy {}

/// `GET`; if free, `SET NX PX` a lease; else answer from what the key holds.
/// Returns {1, ''} claimed, {2, ''} in flight, {3, record} completed, {4, ''} mismatch.
static CLAIM: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local v = redis.call('GET', KEYS[1])
if not v then
  redis.call('SET', KEYS[1], 'L' .. ARGV[1] .. ARGV[2], 'NX', 'PX', ARGV[3])
  return {1, ''}
end
if string.sub(v, 2, 17) ~= ARGV[1] then return {4, ''} end
local kind = string.sub(v, 1, 1)
if kind == 'L' then return {2, ''} end
if kind == 'R' then return {3, string.sub(v, 18)} end
return {4, ''}
",
    )
});

/// Replaces the lease by the record, only while the key holds this owner's token (its lease
/// may have expired: then the key holds nothing, and no one else holds it either). Never
/// over another owner's lease or a record.
static COMPLETE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local v = redis.call('GET', KEYS[1])
if (not v) or (string.sub(v, 1, 1) == 'L' and string.sub(v, 18, 33) == ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
",
    )
});

/// The body of [`RENEW`] and [`RENEW_LEGACY`].
macro_rules! renew_body {
    () => {
        r"
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, 1) == 'L' and string.sub(v, 18, 33) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"
    };
}

/// Extends the lease, only while the key holds this owner's token. Flagged `allow-oom`: a
/// full Redis (`noeviction`, `maxmemory` reached) refuses unflagged scripts, yet a renewal
/// (`PEXPIRE`) takes no memory, and it is what keeps other replicas off a key whose record
/// Redis refuses for now. Redis 7 and later; [`RENEW_LEGACY`] for older servers.
static RENEW: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(concat!("#!lua flags=allow-oom", renew_body!())));

/// [`RENEW`] for Redis before 7, which knows no script flags (refused when Redis is full).
static RENEW_LEGACY: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(renew_body!()));

/// Deletes the lease, only while the key holds one of these owner tokens (one, or those of
/// several releases of one key waiting in the queue).
static RELEASE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, 1) == 'L' then
  local t = string.sub(v, 18, 33)
  for i = 1, #ARGV do
    if ARGV[i] == t then return redis.call('DEL', KEYS[1]) end
  end
end
return 0
",
    )
});

/// The most releases of each kind (of claims never answered; of requests that failed)
/// [`RedisStore`] keeps waiting for its background worker at once (each an owner token with
/// the time its lease would expire); beyond, a release is not queued and its lease, if it
/// was taken, expires by itself (counted in [`RedisStoreStats::releases_dropped`]).
pub const MAX_PENDING_RELEASES: usize = 1024;

/// The most releases of each kind of one key kept waiting at once (the first ones: of claims sent
/// while Redis did not answer, the first to reach it is the one that may have taken the
/// lease); the others are dropped and counted.
pub const MAX_PENDING_RELEASES_PER_KEY: usize = 16;

/// Why a [`RedisStore`]'s configuration was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RedisStoreConfigError {
    /// The prefix contains `{` or `}`, which would change the key's Redis Cluster hash tag.
    PrefixBraces,
    /// The prefix is longer than [`MAX_PREFIX_LEN`] bytes.
    PrefixTooLong,
    /// A timeout of zero.
    ZeroTimeout,
}

impl fmt::Display for RedisStoreConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RedisStoreConfigError::PrefixBraces => "redis key prefix must not contain '{' or '}'",
            RedisStoreConfigError::PrefixTooLong => "redis key prefix is longer than 256 bytes",
            RedisStoreConfigError::ZeroTimeout => "redis timeout must be greater than zero",
        })
    }
}

impl std::error::Error for RedisStoreConfigError {}

/// The future of every [`RedisStore`] operation. The Redis client boxes each command's future
/// itself; this box holds it with its connection handle and timeout.
pub type RedisStoreFuture<T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send>>;

/// Figures of a [`RedisStore`], for this process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisStoreStats {
    /// Calls Redis could not answer (errors and timeouts).
    pub failures: u64,
    /// Of `failures`, those that ran out of time.
    pub timeouts: u64,
    /// `complete` and `renew` calls that found another owner's lease (or none).
    pub leases_lost: u64,
    /// Records that could not be decoded.
    pub corrupt: u64,
    /// Releases waiting for the background worker (after a failure, or of a claim Redis did
    /// not answer), at most [`MAX_PENDING_RELEASES`] of each kind.
    pub releases_pending: u64,
    /// Releases not queued because their kind's room was full (or held
    /// [`MAX_PENDING_RELEASES_PER_KEY`] for their key), refused by Redis in a way no retry
    /// mends, or given up when their lease would have expired anyway: their lease, if taken,
    /// expires by itself.
    pub releases_dropped: u64,
    /// Claims refused because Redis's eviction policy may evict leases and records (see
    /// [`RedisStore`]'s module docs, "Eviction").
    pub eviction_refusals: u64,
}

struct Inner {
    conn: ConnectionManager,
    prefix: Arc<[u8]>,
    timeout: Duration,
    /// Two SipHash keys drawn from the OS at start: owner tokens are a keyed hash of a
    /// counter, unique in this process and unpredictable across processes.
    token_keys: (
        std::collections::hash_map::RandomState,
        std::collections::hash_map::RandomState,
    ),
    next_token: AtomicU64,
    clock: Clock,
    failures: AtomicU64,
    timeouts: AtomicU64,
    leases_lost: AtomicU64,
    corrupt: AtomicU64,
    last_log: AtomicU64,
    suppressed: AtomicU64,
    degraded: AtomicBool,
    releases: Mutex<Pending>,
    releases_dropped: AtomicU64,
    /// [`POLICY_UNKNOWN`], [`POLICY_OK`], [`POLICY_EVICTS`], [`POLICY_UNREADABLE`] or
    /// [`POLICY_NO_LIMIT`], and when it was last read (the store's clock).
    policy: AtomicU8,
    policy_checked: AtomicU64,
    /// Whether a read of the policy is in flight in the background (at most one).
    policy_reading: AtomicBool,
    policy_refusals: AtomicU64,
    /// The server refused the flagged renewal script (Redis before 7): renewals use
    /// [`RENEW_LEGACY`].
    renew_legacy: AtomicBool,
}

/// Why a release waits for the worker. Each kind has its own room in the queue, so that a
/// burst of one kind cannot crowd out the other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReleaseKind {
    /// The lease a claim may have taken, whose answer never came: nobody holds it.
    Unanswered = 0,
    /// The lease of a request that failed, given back so that its client may retry.
    GivenBack = 1,
}

/// A release waiting for the worker: the owner token, when its lease would expire by
/// itself, and why it waits.
#[derive(Clone, Copy, Debug)]
struct Queued {
    token: u128,
    until: tokio::time::Instant,
    kind: ReleaseKind,
}

/// Releases waiting for the worker, by Redis key.
#[derive(Default)]
struct Pending {
    keys: HashMap<Vec<u8>, Vec<Queued>>,
    /// Releases waiting, by [`ReleaseKind`].
    count: [usize; 2],
    /// Whether a worker task is running (it ends when the queue is empty).
    worker: bool,
}

impl Pending {
    /// Queues `q` for `rkey`, unless its kind already has [`MAX_PENDING_RELEASES`] waiting, or
    /// [`MAX_PENDING_RELEASES_PER_KEY`] for this key; whether it was queued.
    fn push(&mut self, rkey: Vec<u8>, q: Queued) -> bool {
        let kind = q.kind as usize;
        if self.count[kind] >= MAX_PENDING_RELEASES {
            return false;
        }
        let queued = self.keys.entry(rkey).or_default();
        if queued.iter().filter(|o| o.kind == q.kind).count() >= MAX_PENDING_RELEASES_PER_KEY {
            return false;
        }
        queued.push(q);
        self.count[kind] += 1;
        true
    }

    fn total(&self) -> usize {
        self.count.iter().sum()
    }

    /// Removes the releases of `rkey` for which `gone` holds; how many.
    fn remove(&mut self, rkey: &[u8], mut gone: impl FnMut(&Queued) -> bool) -> usize {
        let Some(queued) = self.keys.get_mut(rkey) else {
            return 0;
        };
        let mut removed = 0;
        let count = &mut self.count;
        queued.retain(|q| {
            let go = gone(q);
            if go {
                count[q.kind as usize] -= 1;
                removed += 1;
            }
            !go
        });
        if queued.is_empty() {
            self.keys.remove(rkey);
        }
        removed
    }

    /// Removes every release whose lease has expired by `now`; how many.
    fn expire(&mut self, now: tokio::time::Instant) -> usize {
        let mut removed = 0;
        let count = &mut self.count;
        self.keys.retain(|_, queued| {
            queued.retain(|q| {
                let live = q.until > now;
                if !live {
                    count[q.kind as usize] -= 1;
                    removed += 1;
                }
                live
            });
            !queued.is_empty()
        });
        removed
    }
}

/// Idempotency leases and records in Redis; see the [module docs](self).
///
/// ```no_run
/// use tower_bulwark::idempotency::{IdempotencyLayer, RedisStore};
///
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1/".into());
/// let conn = redis::Client::open(url)?.get_connection_manager().await?;
/// let layer = IdempotencyLayer::new(RedisStore::new(conn).prefix("orders:idem:")?);
/// # let _ = layer; Ok(()) }
/// ```
///
/// # Clone
///
/// Clones share the connection and the counters. The records live in Redis: every store, in
/// any process, with the same prefix sees them.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

impl RedisStore {
    /// A store on this connection, with the default prefix and timeout.
    pub fn new(conn: ConnectionManager) -> RedisStore {
        RedisStore::build(
            conn,
            Arc::from(DEFAULT_PREFIX.as_bytes()),
            DEFAULT_TIMEOUT,
            Clock::new(),
        )
    }

    fn build(
        conn: ConnectionManager,
        prefix: Arc<[u8]>,
        timeout: Duration,
        clock: Clock,
    ) -> RedisStore {
        RedisStore {
            inner: Arc::new(Inner {
                conn,
                prefix,
                timeout,
                token_keys: Default::default(),
                next_token: AtomicU64::new(1),
                clock,
                failures: AtomicU64::new(0),
                timeouts: AtomicU64::new(0),
                leases_lost: AtomicU64::new(0),
                corrupt: AtomicU64::new(0),
                last_log: AtomicU64::new(NEVER),
                suppressed: AtomicU64::new(0),
                degraded: AtomicBool::new(false),
                releases: Mutex::new(Pending::default()),
                releases_dropped: AtomicU64::new(0),
                policy: AtomicU8::new(POLICY_UNKNOWN),
                policy_checked: AtomicU64::new(0),
                policy_reading: AtomicBool::new(false),
                policy_refusals: AtomicU64::new(0),
                renew_legacy: AtomicBool::new(false),
            }),
        }
    }

    /// The prefix of this store's Redis keys (default [`DEFAULT_PREFIX`]). Stores with the
    /// same prefix share their records.
    ///
    /// # Errors
    ///
    /// When the prefix contains `{` or `}` or is longer than [`MAX_PREFIX_LEN`] bytes.
    pub fn prefix(self, prefix: &str) -> Result<RedisStore, RedisStoreConfigError> {
        if prefix.len() > MAX_PREFIX_LEN {
            return Err(RedisStoreConfigError::PrefixTooLong);
        }
        if prefix.contains(['{', '}']) {
            return Err(RedisStoreConfigError::PrefixBraces);
        }
        Ok(RedisStore::build(
            self.inner.conn.clone(),
            Arc::from(prefix.as_bytes()),
            self.inner.timeout,
            self.inner.clock.clone(),
        ))
    }

    /// How long each call may take, reconnection included (default [`DEFAULT_TIMEOUT`]).
    ///
    /// # Errors
    ///
    /// [`RedisStoreConfigError::ZeroTimeout`] for a zero duration.
    pub fn timeout(self, timeout: Duration) -> Result<RedisStore, RedisStoreConfigError> {
        if timeout.is_zero() {
            return Err(RedisStoreConfigError::ZeroTimeout);
        }
        Ok(RedisStore::build(
            self.inner.conn.clone(),
            self.inner.prefix.clone(),
            timeout,
            self.inner.clock.clone(),
        ))
    }

    /// The clock of the store's own timing: the failure log's pace and when Redis's eviction
    /// policy is read again (default [`Clock::new`]). Redis keeps the leases' and records'
    /// time itself. [`Clock::manual`] moves that timing by hand in tests that talk to a real
    /// Redis (whose runtime must not be paused: a paused runtime advances its clock while it
    /// waits for the socket, which fires the calls' timeouts).
    pub fn clock(self, clock: Clock) -> RedisStore {
        RedisStore::build(
            self.inner.conn.clone(),
            self.inner.prefix.clone(),
            self.inner.timeout,
            clock,
        )
    }

    /// This process's figures.
    pub fn stats(&self) -> RedisStoreStats {
        let i = &self.inner;
        RedisStoreStats {
            failures: i.failures.load(Ordering::Relaxed),
            timeouts: i.timeouts.load(Ordering::Relaxed),
            leases_lost: i.leases_lost.load(Ordering::Relaxed),
            corrupt: i.corrupt.load(Ordering::Relaxed),
            releases_pending: i.pending().total() as u64,
            releases_dropped: i.releases_dropped.load(Ordering::Relaxed),
            eviction_refusals: i.policy_refusals.load(Ordering::Relaxed),
        }
    }

    /// Queues the release of `lease` for the background worker, which sends it (with the
    /// other releases of its key) until Redis answers or `until` passes.
    fn queue_release(&self, lease: &Lease, until: tokio::time::Instant, kind: ReleaseKind) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            tracing::debug!("no tokio runtime to release on; the lease will expire");
            return;
        };
        let rkey = self.redis_key(lease.key());
        let start = {
            let mut p = self.inner.pending();
            let queued = p.push(
                rkey,
                Queued {
                    token: lease.token(),
                    until,
                    kind,
                },
            );
            if !queued {
                self.inner.releases_dropped.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(key = ?lease.key(), ?kind, "idempotency release queue full; the lease will expire");
            }
            let start = queued && !p.worker;
            p.worker |= start;
            start
        };
        if start {
            rt.spawn(release_worker(self.clone()));
        }
    }

    /// The Redis key of a store key: `<prefix>{<32 hex digits>}`.
    pub fn redis_key(&self, key: &StoreKey) -> Vec<u8> {
        redis_key(&self.inner.prefix, key)
    }

    fn token(&self) -> u128 {
        let n = self.inner.next_token.fetch_add(1, Ordering::Relaxed);
        let (a, b) = &self.inner.token_keys;
        (u128::from(a.hash_one(n)) << 64) | u128::from(b.hash_one(n))
    }

    /// What a claim does about Redis's eviction policy, from what the store knows. When the
    /// last read is older than [`POLICY_REREAD`] ([`POLICY_REREAD_REFUSING`] while claims
    /// are refused), one read goes out in the background (at most one at a time); the claim
    /// does not wait for it.
    #[inline]
    fn policy_gate(&self) -> PolicyGate {
        let i = &*self.inner;
        let state = i.policy.load(Ordering::Relaxed);
        if state == POLICY_UNKNOWN {
            return PolicyGate::ReadFirst;
        }
        let every = if state == POLICY_EVICTS {
            POLICY_REREAD_REFUSING_NS
        } else {
            POLICY_REREAD_NS
        };
        let now = i.clock.now_nanos();
        let due = |i: &Inner| now.saturating_sub(i.policy_checked.load(Ordering::Relaxed)) >= every;
        if due(i) && !i.policy_reading.swap(true, Ordering::Acquire) {
            // Read again under the flag: a read that ended meanwhile has moved the time.
            if due(i) {
                self.read_policy_in_background(every);
            } else {
                i.policy_reading.store(false, Ordering::Release);
            }
        }
        if state == POLICY_EVICTS {
            PolicyGate::Refuse
        } else {
            PolicyGate::Pass
        }
    }

    /// Reads the eviction policy on a task of its own, with the store's timeout; clears the
    /// in-flight flag when done. If Redis does not answer, the next read is due a second later.
    #[cold]
    fn read_policy_in_background(&self, every: u64) {
        /// Clears the flag however the task ends (the runtime shutting down included).
        struct Reading(Arc<Inner>);
        impl Drop for Reading {
            fn drop(&mut self) {
                self.0.policy_reading.store(false, Ordering::Release);
            }
        }
        let reading = Reading(self.inner.clone());
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rt.spawn(async move {
            let inner = &reading.0;
            let mut conn = inner.conn.clone();
            let read = tokio::time::timeout(inner.timeout, inner.read_policy(&mut conn)).await;
            if !matches!(read, Ok(Ok(_))) {
                let retry_at = inner.clock.now_nanos().saturating_add(POLICY_RETRY_NS);
                inner
                    .policy_checked
                    .store(retry_at.saturating_sub(every), Ordering::Relaxed);
                tracing::debug!("redis idempotency store: maxmemory-policy not read; again soon");
            }
            drop(reading);
        });
    }

    /// Runs `op` with the timeout, mapping and counting failures.
    fn run<T, F>(&self, op: F) -> RedisStoreFuture<T>
    where
        T: Send + 'static,
        F: Future<Output = Result<Result<T, StoreError>, redis::RedisError>> + Send + 'static,
    {
        let inner = self.inner.clone();
        Box::pin(async move {
            let out = tokio::time::timeout(inner.timeout, op).await;
            match out {
                Ok(Ok(result)) => {
                    if inner.degraded.load(Ordering::Relaxed)
                        && inner.degraded.swap(false, Ordering::Relaxed)
                    {
                        inner.last_log.store(NEVER, Ordering::Relaxed);
                        inner.suppressed.store(0, Ordering::Relaxed);
                        tracing::info!("redis idempotency store: reachable again");
                    }
                    if let Err(e) = &result {
                        match e.kind() {
                            StoreErrorKind::LeaseLost => {
                                inner.leases_lost.fetch_add(1, Ordering::Relaxed);
                            }
                            StoreErrorKind::Corrupt => {
                                inner.corrupt.fetch_add(1, Ordering::Relaxed);
                            }
                            _ => {}
                        }
                    }
                    result
                }
                Ok(Err(e)) => {
                    inner.failure(&e, false);
                    let permanent = !worth_retrying(&e);
                    let error = StoreError::with_source(StoreErrorKind::Unavailable, e);
                    Err(if permanent { error.permanent() } else { error })
                }
                Err(elapsed) => {
                    inner.failure(&elapsed, true);
                    Err(StoreError::with_source(StoreErrorKind::Timeout, elapsed))
                }
            }
        })
    }
}

impl Inner {
    /// Reads Redis's eviction policy (`CONFIG GET maxmemory*`) and records what it found;
    /// the state and, when it evicts, the policy's name. A server that refuses `CONFIG` is
    /// trusted (warned about once); an error that may pass (Redis unreachable, slow) leaves
    /// the state as it was.
    async fn read_policy(
        &self,
        conn: &mut ConnectionManager,
    ) -> Result<(u8, Option<String>), redis::RedisError> {
        let reply: Result<HashMap<String, String>, redis::RedisError> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("maxmemory*")
            .query_async(conn)
            .await;
        let now = self.clock.now_nanos();
        let config = match reply {
            Ok(config) => config,
            Err(e) if worth_retrying(&e) => return Err(e),
            Err(e) => {
                // CONFIG renamed or not allowed (managed services): trust, loudly; read again
                // later all the same, in case it is allowed then.
                self.policy_checked.store(now, Ordering::Relaxed);
                if self.policy.swap(POLICY_UNREADABLE, Ordering::Relaxed) != POLICY_UNREADABLE {
                    tracing::warn!(
                        error = %e,
                        "redis idempotency store: cannot read maxmemory-policy (CONFIG refused); \
                         it must be noeviction, or Redis may evict leases and records and a \
                         completed request run again"
                    );
                }
                return Ok((POLICY_UNREADABLE, None));
            }
        };
        let policy = config
            .get("maxmemory-policy")
            .map_or("noeviction", String::as_str);
        let limited = config.get("maxmemory").is_some_and(|m| m.trim() != "0");
        let state = if policy == "noeviction" {
            POLICY_OK
        } else if !limited {
            POLICY_NO_LIMIT
        } else {
            POLICY_EVICTS
        };
        self.policy_checked.store(now, Ordering::Relaxed);
        let before = self.policy.swap(state, Ordering::Relaxed);
        if before != state {
            match state {
                POLICY_EVICTS => tracing::error!(
                    policy,
                    "redis idempotency store: refusing claims: maxmemory-policy evicts keys with \
                     a time to live, as every lease and record has (a completed request would \
                     run again); set maxmemory-policy noeviction"
                ),
                // Nothing is evicted without a memory limit, but setting one would start it.
                POLICY_NO_LIMIT => tracing::warn!(
                    policy,
                    "redis idempotency store: maxmemory-policy is not noeviction; with no \
                     maxmemory nothing is evicted yet, but a memory limit would evict leases and \
                     records (a completed request would run again): set noeviction"
                ),
                _ if before == POLICY_EVICTS => tracing::info!(
                    policy,
                    "redis idempotency store: maxmemory-policy no longer evicts; accepting claims"
                ),
                _ => {}
            }
        }
        Ok((state, (state == POLICY_EVICTS).then(|| policy.to_owned())))
    }

    #[cold]
    fn refuse_claim(&self, policy: Option<String>) -> StoreError {
        self.policy_refusals.fetch_add(1, Ordering::Relaxed);
        StoreError::with_source(
            StoreErrorKind::Unavailable,
            EvictionPolicy(policy.unwrap_or_else(|| "an evicting policy".to_owned())),
        )
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.releases
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    #[cold]
    fn failure(&self, error: &dyn fmt::Display, timed_out: bool) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        if timed_out {
            self.timeouts.fetch_add(1, Ordering::Relaxed);
        }
        self.degraded.store(true, Ordering::Relaxed);
        let now = self.clock.now_nanos();
        let last = self.last_log.load(Ordering::Relaxed);
        let due = last == NEVER || now.saturating_sub(last) >= LOG_EVERY_NS;
        if due
            && self
                .last_log
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let suppressed = self.suppressed.swap(0, Ordering::Relaxed);
            tracing::warn!(
                error = %error,
                timed_out,
                suppressed,
                prefix = %String::from_utf8_lossy(&self.prefix),
                "redis idempotency store: unavailable"
            );
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// `<prefix>{<hex of the first 128 bits of the SHA-1 of the key's encoding>}`.
fn redis_key(prefix: &[u8], key: &StoreKey) -> Vec<u8> {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = sha1_smol::Sha1::from(key.encoded()).digest().bytes();
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

/// Whether a call that failed with `e` may succeed if sent again: Redis unreachable, slow,
/// loading, failing over, out of memory (keys expire), or busy. A script error, a reply of
/// the wrong type, refused credentials or permissions fail the same way every time.
fn worth_retrying(e: &redis::RedisError) -> bool {
    use redis::{ErrorKind, RetryMethod};
    if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal() {
        return true;
    }
    if matches!(
        e.kind(),
        ErrorKind::AuthenticationFailed | ErrorKind::InvalidClientConfig
    ) {
        return false;
    }
    if matches!(e.code(), Some("OOM" | "BUSY" | "NOREPLICAS")) {
        return true;
    }
    !matches!(e.retry_method(), RetryMethod::NoRetry)
}

fn ttl_ms(d: Duration) -> u64 {
    duration_nanos(d).div_ceil(1_000_000).max(1)
}

fn decode_record(bytes: &[u8]) -> Result<Arc<Record>, StoreError> {
    Record::decode(bytes)
        .map(Arc::new)
        .map_err(|e| StoreError::with_source(StoreErrorKind::Corrupt, e))
}

/// The one task of a store that sends the queued releases: each key's tokens in one script,
/// again after a pause (10 ms, doubling up to 1 s) while Redis fails, each until its lease
/// would have expired anyway. It ends when the queue is empty.
async fn release_worker(store: RedisStore) {
    /// Marks the worker gone if its task is dropped (the runtime shutting down), so that a
    /// later release starts another.
    struct Running(Option<RedisStore>);
    impl Drop for Running {
        fn drop(&mut self) {
            if let Some(store) = self.0.take() {
                store.inner.pending().worker = false;
            }
        }
    }
    const KEYS_PER_ROUND: usize = 64;
    let mut running = Running(Some(store.clone()));
    let mut pause = Duration::from_millis(10);
    loop {
        let now = tokio::time::Instant::now();
        let batch: Vec<(Vec<u8>, Vec<u128>)> = {
            let mut p = store.inner.pending();
            let expired = p.expire(now);
            if expired > 0 {
                store
                    .inner
                    .releases_dropped
                    .fetch_add(expired as u64, Ordering::Relaxed);
                tracing::warn!(
                    expired,
                    "idempotency store: releases given up, their leases have expired"
                );
            }
            if p.keys.is_empty() {
                p.worker = false;
                running.0 = None;
                return;
            }
            p.keys
                .iter()
                .take(KEYS_PER_ROUND)
                .map(|(k, queued)| (k.clone(), queued.iter().map(|q| q.token).collect()))
                .collect()
        };
        let mut failed = false;
        for (rkey, tokens) in batch {
            let mut conn = store.inner.conn.clone();
            let key = rkey.clone();
            let sent = tokens.clone();
            let out = store
                .run(async move {
                    let mut inv = RELEASE.key(key);
                    for t in &sent {
                        inv.arg(&t.to_be_bytes()[..]);
                    }
                    let _: i64 = inv.invoke_async(&mut conn).await?;
                    Ok(Ok(()))
                })
                .await;
            if let Err(e) = &out {
                if super::worth_retrying(e) {
                    failed = true;
                    break;
                }
            }
            // Sent (others of the key may have come meanwhile), or refused in a way that no
            // retry mends (a script error, a reply of the wrong type, refused credentials):
            // these tokens are done.
            let done = store
                .inner
                .pending()
                .remove(&rkey, |q| tokens.contains(&q.token));
            if let Err(error) = out {
                store
                    .inner
                    .releases_dropped
                    .fetch_add(done as u64, Ordering::Relaxed);
                tracing::warn!(
                    %error,
                    dropped = done,
                    "idempotency store: releases dropped, redis refuses them (retrying \
                     cannot help); their leases expire by themselves"
                );
            }
        }
        if failed {
            tracing::debug!(?pause, "idempotency store: releases wait for redis");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        } else {
            pause = Duration::from_millis(10);
        }
    }
}

/// The lease of a claim sent to Redis and not yet answered. If the claim's future ends
/// without an answer (its timeout, a lost connection, the caller gone), the claim may still
/// have taken, or still take, the lease: it is released with the same owner token.
struct Unanswered {
    store: RedisStore,
    lease: Option<Lease>,
    /// When the lease would expire by itself: no point releasing after that.
    until: tokio::time::Instant,
}

impl Unanswered {
    fn answered(mut self) {
        self.lease = None;
    }
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take() {
            tracing::debug!(key = ?lease.key(), "idempotency claim unanswered; releasing the lease it may have taken");
            self.store
                .queue_release(&lease, self.until, ReleaseKind::Unanswered);
        }
    }
}

impl Store for RedisStore {
    type ClaimFuture = RedisStoreFuture<Claim>;
    type CompleteFuture = RedisStoreFuture<()>;
    type RenewFuture = RedisStoreFuture<()>;
    type ReleaseFuture = RedisStoreFuture<()>;
    type GetFuture = RedisStoreFuture<Option<Arc<Record>>>;

    fn claim(
        &self,
        key: &StoreKey,
        fingerprint: Fingerprint,
        lease_ttl: Duration,
    ) -> Self::ClaimFuture {
        let rkey = self.redis_key(key);
        let token = self.token();
        let lease = Lease::new(key.clone(), token, fingerprint);
        let mut conn = self.inner.conn.clone();
        let unanswered = Unanswered {
            store: self.clone(),
            lease: Some(lease.clone()),
            until: tokio::time::Instant::now() + lease_ttl,
        };
        let inner = self.inner.clone();
        let gate = self.policy_gate();
        self.run(async move {
            // A refused claim is not sent: no lease can have been taken.
            match gate {
                PolicyGate::Pass => {}
                PolicyGate::Refuse => {
                    unanswered.answered();
                    return Ok(Err(inner.refuse_claim(None)));
                }
                PolicyGate::ReadFirst => match inner.read_policy(&mut conn).await {
                    Ok((POLICY_EVICTS, policy)) => {
                        unanswered.answered();
                        return Ok(Err(inner.refuse_claim(policy)));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        unanswered.answered();
                        return Err(e);
                    }
                },
            }
            let mut inv = CLAIM.key(rkey);
            inv.arg(&fingerprint.as_u128().to_be_bytes()[..])
                .arg(&token.to_be_bytes()[..])
                .arg(ttl_ms(lease_ttl));
            // On an error the claim's fate is unknown: `unanswered` is dropped and releases.
            let (code, bytes): (i64, Vec<u8>) = inv.invoke_async(&mut conn).await?;
            // Answered: a lease taken (code 1) is the caller's from here on.
            unanswered.answered();
            Ok(match code {
                1 => Ok(Claim::Claimed(lease)),
                2 => Ok(Claim::InFlight),
                3 => decode_record(&bytes).map(Claim::Completed),
                _ => Ok(Claim::Mismatch),
            })
        })
    }

    fn complete(&self, lease: &Lease, record: Record, ttl: Duration) -> Self::CompleteFuture {
        let rkey = self.redis_key(lease.key());
        let token = lease.token();
        let mut value = Vec::with_capacity(17 + record.encoded_len());
        value.push(b'R');
        value.extend_from_slice(&lease.fingerprint().as_u128().to_be_bytes());
        record.encode_into(&mut value);
        let mut conn = self.inner.conn.clone();
        self.run(async move {
            let mut inv = COMPLETE.key(rkey);
            inv.arg(&token.to_be_bytes()[..])
                .arg(value)
                .arg(ttl_ms(ttl));
            let done: i64 = inv.invoke_async(&mut conn).await?;
            Ok(if done == 1 {
                Ok(())
            } else {
                Err(StoreError::new(StoreErrorKind::LeaseLost))
            })
        })
    }

    fn renew(&self, lease: &Lease, lease_ttl: Duration) -> Self::RenewFuture {
        let rkey = self.redis_key(lease.key());
        let token = lease.token();
        let mut conn = self.inner.conn.clone();
        let inner = self.inner.clone();
        self.run(async move {
            let ms = ttl_ms(lease_ttl);
            let legacy = inner.renew_legacy.load(Ordering::Relaxed);
            let script = if legacy { &*RENEW_LEGACY } else { &*RENEW };
            let mut inv = script.key(rkey.clone());
            inv.arg(&token.to_be_bytes()[..]).arg(ms);
            let done: i64 = match inv.invoke_async(&mut conn).await {
                // A server before Redis 7 cannot compile the flag line.
                Err(e) if !legacy && e.to_string().contains("compiling") => {
                    inner.renew_legacy.store(true, Ordering::Relaxed);
                    tracing::debug!(error = %e, "redis refuses script flags (before Redis 7); renewals use an unflagged script");
                    let mut inv = RENEW_LEGACY.key(rkey);
                    inv.arg(&token.to_be_bytes()[..]).arg(ms);
                    inv.invoke_async(&mut conn).await?
                }
                other => other?,
            };
            Ok(if done == 1 {
                Ok(())
            } else {
                Err(StoreError::new(StoreErrorKind::LeaseLost))
            })
        })
    }

    fn release(&self, lease: &Lease) -> Self::ReleaseFuture {
        let rkey = self.redis_key(lease.key());
        let token = lease.token();
        let mut conn = self.inner.conn.clone();
        self.run(async move {
            let mut inv = RELEASE.key(rkey);
            inv.arg(&token.to_be_bytes()[..]);
            let _: i64 = inv.invoke_async(&mut conn).await?;
            Ok(Ok(()))
        })
    }

    /// Queued for the store's one background worker, which sends it until Redis answers or
    /// the lease would have expired (see [`MAX_PENDING_RELEASES`]).
    fn release_detached(&self, lease: Lease, until: tokio::time::Instant) {
        self.queue_release(&lease, until, ReleaseKind::GivenBack);
    }

    fn get(&self, key: &StoreKey) -> Self::GetFuture {
        let rkey = self.redis_key(key);
        let mut conn = self.inner.conn.clone();
        self.run(async move {
            let v: Option<Vec<u8>> = redis::cmd("GET").arg(rkey).query_async(&mut conn).await?;
            Ok(match v {
                Some(v) if v.first() == Some(&b'R') && v.len() >= 17 => {
                    decode_record(&v[17..]).map(Some)
                }
                _ => Ok(None),
            })
        })
    }
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field(
                "prefix",
                &String::from_utf8_lossy(&self.inner.prefix).as_ref(),
            )
            .field("timeout", &self.inner.timeout)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The two kinds of background release have a room each, overall and per key: a burst of
    /// one kind (either) leaves room for the other.
    #[test]
    fn each_kind_of_release_has_its_own_room() {
        let until = tokio::time::Instant::now() + Duration::from_secs(30);
        let q = |token, kind| Queued { token, until, kind };
        for (burst, other) in [
            (ReleaseKind::GivenBack, ReleaseKind::Unanswered),
            (ReleaseKind::Unanswered, ReleaseKind::GivenBack),
        ] {
            let mut p = Pending::default();
            for i in 0..MAX_PENDING_RELEASES_PER_KEY {
                assert!(p.push(b"hot".to_vec(), q(i as u128, burst)));
            }
            assert!(
                !p.push(b"hot".to_vec(), q(99, burst)),
                "the key's share is full"
            );
            assert!(p.push(b"hot".to_vec(), q(100, other)));
            for i in MAX_PENDING_RELEASES_PER_KEY..MAX_PENDING_RELEASES {
                assert!(p.push((i as u64).to_be_bytes().to_vec(), q(i as u128, burst)));
            }
            assert!(
                !p.push(b"new".to_vec(), q(1, burst)),
                "the kind's room is full"
            );
            assert!(p.push(b"new".to_vec(), q(1, other)));
            assert_eq!(p.total(), MAX_PENDING_RELEASES + 2);
            // Sent or dropped, releases give their room back to their own kind.
            assert_eq!(p.remove(b"hot", |q| q.token == 0), 1);
            assert!(p.push(b"new".to_vec(), q(2, burst)));
            assert_eq!(p.expire(until), MAX_PENDING_RELEASES + 2);
            assert_eq!((p.total(), p.keys.len()), (0, 0));
        }
    }

    /// The Redis key is part of the store's format: replicas of different builds (a rolling
    /// deploy, another compiler) must derive the same key for the same scope and key, or a
    /// request runs once on each. These values must never change.
    #[test]
    fn redis_keys_are_pinned() {
        let key =
            |k: &StoreKey| String::from_utf8(redis_key(DEFAULT_PREFIX.as_bytes(), k)).unwrap();
        assert_eq!(
            key(&StoreKey::new("tenant-1", "order-42")),
            "bulwark:idem:{9c42fc84aa56f6854c720c6c7690bf6c}"
        );
        assert_eq!(
            key(&StoreKey::unscoped("order-42")),
            "bulwark:idem:{932a6d1ce88d00f8261b34237cc593e3}"
        );
        assert_eq!(
            String::from_utf8(redis_key(b"orders:", &StoreKey::new("t", "k"))).unwrap(),
            "orders:{f0d6fb6679edac6f392ff347eff39082}"
        );
    }
}

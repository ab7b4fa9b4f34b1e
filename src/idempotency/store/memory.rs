//! [`MemoryStore`]: an in-process, sharded store, bounded as a whole.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap};
use std::fmt;
use std::future::{ready, Ready};
use std::hash::{BuildHasher, Hasher as _};
use std::mem::size_of;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};

use super::{Claim, Lease, Store, StoreError, StoreErrorKind, StoreKey};
use crate::clock::{duration_nanos, Clock};
use crate::idempotency::fingerprint::{Fingerprint, Hasher};
use crate::idempotency::layer::ConfigError;
use crate::idempotency::record::Record;

/// Counters of each of the two rows of the per-scope usage table.
const SCOPE_SLOTS: usize = 1024;
/// Claims leave this fraction (1/16) of `max_bytes` free for the records they complete into.
const RESERVE_DIVISOR: usize = 16;
/// What the largest record the store promises room for leaves for its own bookkeeping.
const RECORD_SLACK: usize = 4 << 10;
/// How often, at most, a refused claim sweeps every shard for expired entries (100 ms).
const RECLAIM_EVERY: u64 = 100_000_000;
/// The default share of the store one scope may hold.
const DEFAULT_SHARE: f64 = 0.25;

/// An in-process idempotency store: sharded for concurrency, bounded as a whole by entries
/// and by bytes.
///
/// The key space is split over shards (64 by default), each a map behind a
/// `std::sync::Mutex` held only for a map operation, never across an `.await`. The bounds,
/// `max_entries` (default 500,000) and `max_bytes` (default 256 MiB), are the whole store's,
/// kept in atomic counters, not split over the shards.
///
/// # Capacity
///
/// A record costs its response's body and headers, as allocated, plus about 800 bytes of its
/// own (key, record, map slot, places in the expiry queue). The layer keeps each for its time
/// to live (24 h by default), so a store holds a day's keyed requests: the rate it keeps up
/// with is `max_bytes / (record size × TTL)`. With the default 256 MiB and 24 h (measured by a
/// test, for responses with one header):
///
/// | response body | per record | records held | keyed requests a second, sustained | one scope (a quarter) |
/// |---|---|---|---|---|
/// | 100 B | ~0.9 KiB | ~300,000 | 3.5 | 0.87 |
/// | 1 KiB | ~1.8 KiB | ~147,000 | 1.7 | 0.43 |
/// | 4 KiB | ~4.8 KiB | ~55,000 | 0.64 | 0.16 |
/// | 64 KiB | ~65 KiB | ~4,000 | 0.047 | 0.012 |
///
/// The bound on entries (500,000) is met first only by records under about 540 bytes. Size
/// the store for your own traffic (`max_bytes ≥ rate × TTL × record size`), or lower the
/// layer's [`ttl`](crate::idempotency::IdempotencyBuilder::ttl): the bytes are only counted
/// as records come, never allocated up front. [`MemoryStoreStats::bytes`] reads what it holds.
///
/// # What the byte bound counts
///
/// `max_bytes` bounds what the store really holds: every allocation it keeps alive (the key,
/// the record, its header maps and values, its body and trailers, the slots of its maps and
/// queues, and its fixed tables), each as the system allocator rounds it. A record's body and
/// header values are copied into allocations of their exact size when it is stored, so a
/// record never pins a larger buffer it was cut from. A test measures the figure against the
/// process's resident memory. [`MemoryStoreStats::bytes`] reads it.
///
/// # When full
///
/// A completed record is never dropped before its time to live to make room, nor is a live
/// lease. When a new key does not fit, the store drops expired entries (from every shard, at
/// most every 100 ms) and, if that is not enough, refuses the claim with
/// [`StoreErrorKind::Full`], with [`StoreError::retry_after`] the time until its earliest
/// entry expires. The [`IdempotencyLayer`](crate::idempotency::IdempotencyLayer) answers 503
/// [`RejectionKind::IdempotencyStoreFull`](crate::RejectionKind::IdempotencyStoreFull) with a
/// `Retry-After`, and nothing runs.
///
/// Claims leave a sixteenth of `max_bytes` free for the records of the leases in flight: a
/// lease completes into that room ([`MemoryStoreStats::max_record`] is the largest record it
/// promises room for, and the layer refuses at build time a `max_response_body` larger than
/// that). A record that still does not fit, because many large responses complete at once
/// into a nearly full store, is kept as "completed, too large to replay"
/// ([`Record::is_kept`] is `false`; counted in [`MemoryStoreStats::not_kept`]), so that its
/// key never runs twice.
///
/// Every lease and record has its place, by expiry, in its shard's expiry queue (the place
/// for a lease's record is kept when the lease is claimed, so a completion into a full store
/// is queued too), whatever the order in which they were written: records of a lowered TTL,
/// or of two layers with different TTLs on one store, make room as soon as they expire, even
/// behind longer-lived ones. Expired entries are removed when their key is next seen, a few
/// at a time on every claim (a bounded amount of work), from every shard when room is
/// needed, and all at once by [`MemoryStore::purge_expired`].
///
/// # One scope's share
///
/// One scope (a tenant, a principal: [`StoreKey::scope`]) may hold at most
/// [`scope_share`](MemoryStoreBuilder::scope_share) of the entries and of the bytes (a quarter
/// by default): past it, that scope's new keys are refused while every other scope goes on.
/// The keys of an [`unscoped`](crate::idempotency::IdempotencyBuilder::unscoped) layer
/// ([`StoreKey::is_unscoped`]) are those of the one scope there is: they are held to no
/// share and may use the whole store.
/// The figures are counted in a fixed table of two rows of 1,024 counters (a count-min
/// sketch: a scope's usage is read as the smaller of its two counters, never below the true
/// figure), so a scope is always held to its share, and another scope is refused early only
/// if both of its counters are shared with scopes over their share (about one chance in a
/// million per flooding scope). The share is checked when a key is claimed; the records its
/// leases complete into may take a scope past it. A layer whose keys all have one scope of
/// its own making (a [`scope`](crate::idempotency::IdempotencyBuilder::scope) function that
/// returns a constant) can use only that share: give such a store `scope_share(1.0)`, or
/// build the layer `unscoped()`.
///
/// # Clone
///
/// Clones share the same maps.
///
/// # Time
///
/// The store reads its [`Clock`] once per operation. For tests under paused tokio time,
/// build it with `MemoryStore::builder().clock(Clock::tokio())`.
///
/// ```
/// use tower_bulwark::idempotency::MemoryStore;
///
/// let store = MemoryStore::builder()
///     .max_entries(10_000)
///     .max_bytes(32 << 20)
///     .scope_share(0.1)
///     .build()
///     .expect("valid bounds");
/// assert_eq!(store.stats().entries, 0);
/// assert_eq!(store.stats().max_entries, 10_000);
/// // Room for the layer's default 1 MiB responses.
/// assert!(store.stats().max_record >= 1 << 20);
/// ```
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

struct Inner {
    shards: Box<[Mutex<Shard>]>,
    mask: usize,
    seed: u64,
    scope_seed: u64,
    clock: Clock,
    max_entries: usize,
    max_bytes: usize,
    /// Claims are admitted while the bytes stay within this; the rest is for completions.
    claim_bytes: usize,
    share: f64,
    share_entries: usize,
    share_bytes: usize,
    entries: AtomicUsize,
    bytes: AtomicUsize,
    /// Per-scope usage: two rows of `SCOPE_SLOTS` counters.
    scopes: Box<[ScopeUse]>,
    token_salt: u64,
    next_token: AtomicU64,
    expired: AtomicU64,
    refused: AtomicU64,
    not_kept: AtomicU64,
    /// When the next sweep of every shard may run (clock nanoseconds).
    next_reclaim: AtomicU64,
    /// The earliest expiry the last sweep of every shard saw.
    earliest: AtomicU64,
}

#[derive(Default)]
struct ScopeUse {
    entries: AtomicUsize,
    bytes: AtomicUsize,
}

/// The maps' hasher: this crate's multiply-fold hash with a random seed per store (keys come
/// from clients, so the seed keeps them from choosing collisions).
#[derive(Clone, Copy)]
struct KeyHash(u64);

impl BuildHasher for KeyHash {
    type Hasher = SeededHasher;

    fn build_hasher(&self) -> SeededHasher {
        SeededHasher(Hasher::new(self.0))
    }
}

struct SeededHasher(Hasher);

impl std::hash::Hasher for SeededHasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0.segment(bytes);
    }

    fn write_usize(&mut self, n: usize) {
        self.0.word(n as u64);
    }

    fn finish(&self) -> u64 {
        self.0.finish64()
    }
}

struct Shard {
    map: HashMap<Arc<[u8]>, Entry, KeyHash>,
    /// Every lease and record by its expiry, earliest first, whatever order they came in (a
    /// lowered TTL, two layers with different TTLs on one store): a pair whose `seq` is no
    /// longer its key's entry's is stale and dropped when met; a renewed lease's pair is put
    /// back at its new expiry when met.
    expiry: BinaryHeap<Reverse<Due>>,
    /// Leases in the map: each has a place kept in `expiry`'s buffer for the record it may
    /// complete into (`expiry.capacity() >= expiry.len() + pending`), so that a completion
    /// never needs the buffer to grow and every record is queued, hence swept once expired.
    pending: usize,
    /// The map's full capacity: the most entries its table holds before it grows.
    full_cap: usize,
    /// Bytes charged for the map's table and the queues' buffers.
    tables: usize,
    seq: u64,
}

/// A place in a shard's expiry queue: an entry's key, its `seq` when queued, and its expiry.
struct Due {
    at: u64,
    seq: u64,
    key: Arc<[u8]>,
}

impl PartialEq for Due {
    fn eq(&self, other: &Due) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl Eq for Due {}

impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Due) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Due {
    fn cmp(&self, other: &Due) -> Ordering {
        // `seq` is unique in a shard: the key need not be compared.
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

struct Entry {
    seq: u64,
    expires_at: u64,
    fingerprint: Fingerprint,
    /// Bytes charged for the key and the lease or record (the map's slot is in `tables`).
    size: usize,
    /// The entry's counters in the per-scope table.
    scope: [u16; 2],
    state: State,
}

enum State {
    Lease(u128),
    Done(Arc<Record>),
}

/// Figures of a [`MemoryStore`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct MemoryStoreStats {
    /// Leases and records held now (expired ones not yet removed included).
    pub entries: usize,
    /// Bytes the store holds now: its entries and tables, as allocated (see the
    /// [type docs](MemoryStore#what-the-byte-bound-counts)).
    pub bytes: usize,
    /// The bound on entries.
    pub max_entries: usize,
    /// The bound on bytes.
    pub max_bytes: usize,
    /// The largest record, by [`Record::encoded_len`], the store promises room for.
    pub max_record: usize,
    /// Claims refused because the store, or the claim's scope, was full.
    pub refused: u64,
    /// Records kept as "completed, too large to replay" because they did not fit.
    pub not_kept: u64,
    /// Expired entries removed.
    pub expired: u64,
}

/// Builds a [`MemoryStore`]; see [`MemoryStore::builder`].
#[derive(Debug, Clone)]
pub struct MemoryStoreBuilder {
    max_entries: usize,
    max_bytes: usize,
    shards: usize,
    share: f64,
    clock: Option<Clock>,
}

impl MemoryStoreBuilder {
    /// The most leases and records held at once (default 500,000; the byte bound is usually
    /// met first, see [Capacity](MemoryStore#capacity)).
    pub fn max_entries(mut self, n: usize) -> Self {
        self.max_entries = n;
        self
    }

    /// The most bytes held at once, all the store's allocations counted (default 256 MiB,
    /// reserved as records come, not allocated up front; see [Capacity](MemoryStore#capacity)).
    pub fn max_bytes(mut self, n: usize) -> Self {
        self.max_bytes = n;
        self
    }

    /// The number of shards, a power of two from 1 to 4096 (default 64).
    pub fn shards(mut self, n: usize) -> Self {
        self.shards = n;
        self
    }

    /// The fraction of the entries and of the bytes one scope may hold, in `(0, 1]`
    /// (default 0.25): a tenant that floods the store with keys is refused once it holds
    /// its share, and the others go on. `1.0` lets one scope fill the store. The keys of an
    /// `unscoped()` layer are held to no share whatever this says.
    pub fn scope_share(mut self, share: f64) -> Self {
        self.share = share;
        self
    }

    /// The time source for expiry (default [`Clock::new`]); [`Clock::tokio`] in tests under
    /// paused time.
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Builds the store.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] when a bound is zero, the shard count is not a power of two from 1 to
    /// 4096, the scope share is not in `(0, 1]`, or `max_bytes` does not hold the store's
    /// fixed tables and 64 KiB besides.
    pub fn build(self) -> Result<MemoryStore, ConfigError> {
        if self.max_entries == 0 {
            return Err(ConfigError::Zero("max_entries"));
        }
        if self.max_bytes == 0 {
            return Err(ConfigError::Zero("max_bytes"));
        }
        if self.shards == 0 || self.shards > 4096 || !self.shards.is_power_of_two() {
            return Err(ConfigError::Shards);
        }
        if !(self.share > 0.0 && self.share <= 1.0) {
            return Err(ConfigError::ScopeShare);
        }
        let fixed = alloc_size(self.shards * size_of::<Mutex<Shard>>())
            + alloc_size(2 * SCOPE_SLOTS * size_of::<ScopeUse>())
            + alloc_size(2 * size_of::<usize>() + size_of::<Inner>());
        if self.max_bytes < fixed + (64 << 10) {
            return Err(ConfigError::TooSmall("max_bytes"));
        }
        let seeds = std::collections::hash_map::RandomState::new();
        let seed_of = |n: u8| {
            let mut h = seeds.build_hasher();
            h.write_u8(n);
            h.finish()
        };
        let share_of = |n: usize| ((n as f64 * self.share) as usize).max(1);
        Ok(MemoryStore {
            inner: Arc::new(Inner {
                shards: (0..self.shards)
                    .map(|_| {
                        Mutex::new(Shard {
                            map: HashMap::with_hasher(KeyHash(seed_of(1))),
                            expiry: BinaryHeap::new(),
                            pending: 0,
                            full_cap: 0,
                            tables: 0,
                            seq: 0,
                        })
                    })
                    .collect(),
                mask: self.shards - 1,
                seed: seed_of(1),
                scope_seed: seed_of(3),
                clock: self.clock.unwrap_or_default(),
                max_entries: self.max_entries,
                max_bytes: self.max_bytes,
                claim_bytes: self.max_bytes - self.max_bytes / RESERVE_DIVISOR,
                share: self.share,
                share_entries: share_of(self.max_entries),
                share_bytes: share_of(self.max_bytes),
                entries: AtomicUsize::new(0),
                bytes: AtomicUsize::new(fixed),
                scopes: (0..2 * SCOPE_SLOTS).map(|_| ScopeUse::default()).collect(),
                token_salt: seed_of(2),
                next_token: AtomicU64::new(1),
                expired: AtomicU64::new(0),
                refused: AtomicU64::new(0),
                not_kept: AtomicU64::new(0),
                next_reclaim: AtomicU64::new(0),
                earliest: AtomicU64::new(0),
            }),
        })
    }
}

impl Default for MemoryStoreBuilder {
    fn default() -> Self {
        MemoryStoreBuilder {
            max_entries: 500_000,
            max_bytes: 256 << 20,
            shards: 64,
            share: DEFAULT_SHARE,
            clock: None,
        }
    }
}

impl Default for MemoryStore {
    /// A store of 500,000 entries and 256 MiB over 64 shards, a quarter of it at most for one
    /// scope, on the default clock.
    fn default() -> Self {
        MemoryStoreBuilder::default()
            .build()
            .expect("the default bounds are valid")
    }
}

impl MemoryStore {
    /// A store with the default bounds (500,000 entries, 256 MiB, a quarter for one scope).
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    /// A builder to set bounds, shards, the scope share and the clock.
    pub fn builder() -> MemoryStoreBuilder {
        MemoryStoreBuilder::default()
    }

    /// Current figures.
    pub fn stats(&self) -> MemoryStoreStats {
        let i = &*self.inner;
        MemoryStoreStats {
            entries: i.entries.load(Relaxed),
            bytes: i.bytes.load(Relaxed),
            max_entries: i.max_entries,
            max_bytes: i.max_bytes,
            max_record: i.max_record(),
            refused: i.refused.load(Relaxed),
            not_kept: i.not_kept.load(Relaxed),
            expired: i.expired.load(Relaxed),
        }
    }

    /// Removes every expired lease and record now.
    pub fn purge_expired(&self) {
        let inner = &*self.inner;
        let now = inner.clock.now_nanos();
        for s in inner.shards.iter() {
            let mut s = lock(s);
            let (mut gone, mut freed, mut leases) = (0, 0, 0);
            s.map.retain(|_, e| {
                let keep = e.expires_at > now;
                if !keep {
                    gone += 1;
                    freed += e.size;
                    leases += usize::from(matches!(e.state, State::Lease(_)));
                    inner.scope_uncharge(e.scope, 1, e.size);
                }
                keep
            });
            s.pending -= leases;
            inner.uncharge(gone, freed);
            s.compact();
            inner.expired.fetch_add(gone as u64, Relaxed);
        }
    }

    fn shard(&self, enc: &[u8]) -> MutexGuard<'_, Shard> {
        let mut h = Hasher::new(self.inner.seed);
        h.segment(enc);
        // High bits: the maps index their buckets by the low bits of their own hash.
        let i = ((h.finish64() >> 40) as usize) & self.inner.mask;
        lock(&self.inner.shards[i])
    }

    fn token(&self) -> u128 {
        let n = self.inner.next_token.fetch_add(1, Relaxed);
        (u128::from(self.inner.token_salt) << 64) | u128::from(n)
    }

    fn claim_now(
        &self,
        key: &StoreKey,
        fingerprint: Fingerprint,
        lease_ttl: Duration,
    ) -> Result<Claim, StoreError> {
        let now = self.inner.clock.now_nanos();
        if let Some(c) = self.try_claim(key, fingerprint, lease_ttl, now, None) {
            return Ok(c);
        }
        // No room: drop what has expired everywhere, then try once more.
        self.reclaim(now);
        if let Some(c) = self.try_claim(key, fingerprint, lease_ttl, now, None) {
            return Ok(c);
        }
        self.inner.refused.fetch_add(1, Relaxed);
        let earliest = self.inner.earliest.load(Relaxed);
        let err = StoreError::new(StoreErrorKind::Full);
        // Every lease and record is in an expiry queue, so the earliest expiry is a real one
        // (`u64::MAX` only when the queues were empty: no hint then).
        Err(if earliest > now && earliest != u64::MAX {
            err.with_retry_after(Duration::from_nanos(earliest - now))
        } else {
            err
        })
    }

    /// The claim, or `None` when there is no room for a new key; a key taken gets `token`
    /// (a new one if `None`).
    fn try_claim(
        &self,
        key: &StoreKey,
        fingerprint: Fingerprint,
        lease_ttl: Duration,
        now: u64,
        token: Option<u128>,
    ) -> Option<Claim> {
        let inner = &*self.inner;
        let enc = key.encoded();
        let mut s = self.shard(enc);
        s.sweep(now, inner, 4);
        if let Some(e) = s.map.get(enc) {
            if e.expires_at > now {
                if e.fingerprint != fingerprint {
                    return Some(Claim::Mismatch);
                }
                return Some(match &e.state {
                    State::Lease(_) => Claim::InFlight,
                    State::Done(r) => Claim::Completed(r.clone()),
                });
            }
            s.remove(enc, inner);
            inner.expired.fetch_add(1, Relaxed);
        }
        // The lease is charged as the marker it may become, so completing always fits.
        let size = key_cost(enc.len()) + marker_cost();
        let grow = s.growth();
        if !inner.charge(1, size + grow, inner.claim_bytes) {
            return None;
        }
        let scope = inner.scope_slots(key.scope());
        if !inner.scope_charge(scope, size, !key.is_unscoped()) {
            inner.uncharge(1, size + grow);
            return None;
        }
        s.tables += grow;
        // Room in the expiry queue for this lease's place and for its record's.
        let want = s.expiry.len() + s.pending + 2;
        if s.expiry.capacity() < want {
            let cap = heap_grown_capacity(s.expiry.capacity(), want);
            let more = cap - s.expiry.len();
            s.expiry.reserve_exact(more);
        }
        let token = token.unwrap_or_else(|| self.token());
        let k = key.encoded_arc().clone();
        s.seq += 1;
        let seq = s.seq;
        s.map.insert(
            k.clone(),
            Entry {
                seq,
                expires_at: now.saturating_add(duration_nanos(lease_ttl)),
                fingerprint,
                size,
                scope,
                state: State::Lease(token),
            },
        );
        s.full_cap = s.full_cap.max(s.map.capacity());
        let at = now.saturating_add(duration_nanos(lease_ttl));
        s.expiry.push(Reverse(Due { at, seq, key: k }));
        s.pending += 1;
        s.resync(inner);
        drop(s);
        Some(Claim::Claimed(Lease::new(key.clone(), token, fingerprint)))
    }

    /// Sweeps every shard for expired entries (at most every 100 ms) and notes the earliest
    /// expiry left.
    fn reclaim(&self, now: u64) {
        let inner = &*self.inner;
        let next = inner.next_reclaim.load(Relaxed);
        if now < next
            || inner
                .next_reclaim
                .compare_exchange(next, now + RECLAIM_EVERY, Relaxed, Relaxed)
                .is_err()
        {
            return;
        }
        let mut earliest = u64::MAX;
        for s in inner.shards.iter() {
            let mut s = lock(s);
            s.sweep(now, inner, usize::MAX);
            earliest = earliest.min(s.earliest());
        }
        inner.earliest.store(earliest, Relaxed);
    }

    fn complete_now(&self, lease: &Lease, record: Record, ttl: Duration) -> Result<(), StoreError> {
        let now = self.inner.clock.now_nanos();
        let inner = &*self.inner;
        let enc = lease.key().encoded();
        let mut s = self.shard(enc);
        // Our lease, even past its expiry (no one else holds the key: the handler has run, so
        // the record must land), or no entry at all (the expired lease was swept): see the
        // `Store::complete` contract. Another owner's lease or a record: lost.
        let scope = loop {
            match s.map.get(enc) {
                Some(Entry {
                    state: State::Lease(t),
                    scope,
                    ..
                }) if *t == lease.token() => break *scope,
                Some(_) => return Err(StoreError::new(StoreErrorKind::LeaseLost)),
                None => {}
            }
            drop(s);
            // Take the key again under our own token (as a claim would, within the store's
            // bounds), then complete that lease.
            let taken = match self.try_claim(
                lease.key(),
                lease.fingerprint(),
                ttl,
                now,
                Some(lease.token()),
            ) {
                Some(c) => Some(c),
                None => {
                    self.reclaim(now);
                    self.try_claim(
                        lease.key(),
                        lease.fingerprint(),
                        ttl,
                        now,
                        Some(lease.token()),
                    )
                }
            };
            match taken {
                Some(Claim::Claimed(_)) => {}
                Some(_) => return Err(StoreError::new(StoreErrorKind::LeaseLost)),
                None => {
                    self.inner.refused.fetch_add(1, Relaxed);
                    return Err(StoreError::new(StoreErrorKind::Full));
                }
            }
            s = self.shard(enc);
        };
        let mut record = compact(record);
        // The lease was charged as a marker: the record needs what it costs beyond that.
        let mut extra = record_cost(&record).saturating_sub(marker_cost());
        if extra > 0 && !inner.charge(0, extra, inner.max_bytes) {
            record = Record::not_kept(record.fingerprint(), record.status());
            extra = 0;
            inner.not_kept.fetch_add(1, Relaxed);
        }
        inner.scope_add(scope, extra);
        let at = now.saturating_add(duration_nanos(ttl));
        s.pending -= 1;
        let e = s.map.get_mut(enc).expect("the lease checked above");
        e.state = State::Done(Arc::new(record));
        e.size += extra;
        if at >= e.expires_at {
            // The usual case (a record outlives its lease): the lease's place, never later
            // than the lease's expiry, serves the record, which is put back at its own expiry
            // when the place comes (as a renewed lease is). No second place, none left stale.
            e.expires_at = at;
            return Ok(());
        }
        // A record that expires before its lease would have: a place of its own, earlier.
        s.seq += 1;
        let seq = s.seq;
        let e = s.map.get_mut(enc).expect("the lease checked above");
        e.seq = seq;
        e.expires_at = at;
        // Its place in the expiry queue was kept when the lease was claimed: the push never
        // grows the buffer, so every record is swept once expired.
        debug_assert!(s.expiry.len() < s.expiry.capacity());
        s.expiry.push(Reverse(Due {
            at,
            seq,
            key: lease.key().encoded_arc().clone(),
        }));
        Ok(())
    }

    fn release_now(&self, lease: &Lease) {
        let enc = lease.key().encoded();
        let mut s = self.shard(enc);
        if matches!(
            s.map.get(enc),
            Some(Entry { state: State::Lease(t), .. }) if *t == lease.token()
        ) {
            s.remove(enc, &self.inner);
        }
    }

    fn get_now(&self, key: &StoreKey) -> Option<Arc<Record>> {
        let now = self.inner.clock.now_nanos();
        let enc = key.encoded();
        let s = self.shard(enc);
        match s.map.get(enc) {
            Some(Entry {
                state: State::Done(r),
                expires_at,
                ..
            }) if *expires_at > now => Some(r.clone()),
            _ => None,
        }
    }
}

impl Inner {
    /// Adds `entries` and `bytes` to the store's figures if they stay within the bounds.
    fn charge(&self, entries: usize, bytes: usize, max_bytes: usize) -> bool {
        if entries > 0
            && self
                .entries
                .fetch_update(Relaxed, Relaxed, |n| {
                    n.checked_add(entries).filter(|&m| m <= self.max_entries)
                })
                .is_err()
        {
            return false;
        }
        if self
            .bytes
            .fetch_update(Relaxed, Relaxed, |n| {
                n.checked_add(bytes).filter(|&m| m <= max_bytes)
            })
            .is_err()
        {
            self.entries.fetch_sub(entries, Relaxed);
            return false;
        }
        true
    }

    fn uncharge(&self, entries: usize, bytes: usize) {
        self.entries.fetch_sub(entries, Relaxed);
        self.bytes.fetch_sub(bytes, Relaxed);
    }

    fn max_record(&self) -> usize {
        (self.max_bytes - self.claim_bytes)
            .min(self.share_bytes)
            .saturating_sub(RECORD_SLACK)
    }

    fn scope_slots(&self, scope: &[u8]) -> [u16; 2] {
        let mut h = Hasher::new(self.scope_seed);
        h.segment(scope);
        let x = h.finish64();
        let slot = |v: u64| (v as usize & (SCOPE_SLOTS - 1)) as u16;
        [slot(x), slot(x >> 32)]
    }

    fn scope_use(&self, slots: [u16; 2]) -> [&ScopeUse; 2] {
        [
            &self.scopes[usize::from(slots[0])],
            &self.scopes[SCOPE_SLOTS + usize::from(slots[1])],
        ]
    }

    /// Counts a new entry of `bytes` for its scope, unless `enforce` and that takes the scope
    /// past its share.
    fn scope_charge(&self, slots: [u16; 2], bytes: usize, enforce: bool) -> bool {
        let [a, b] = self.scope_use(slots);
        let entries = a
            .entries
            .fetch_add(1, Relaxed)
            .min(b.entries.fetch_add(1, Relaxed));
        let held = a
            .bytes
            .fetch_add(bytes, Relaxed)
            .min(b.bytes.fetch_add(bytes, Relaxed));
        if enforce
            && self.share < 1.0
            && (entries >= self.share_entries || held + bytes > self.share_bytes)
        {
            self.scope_uncharge(slots, 1, bytes);
            return false;
        }
        true
    }

    fn scope_add(&self, slots: [u16; 2], bytes: usize) {
        for u in self.scope_use(slots) {
            u.bytes.fetch_add(bytes, Relaxed);
        }
    }

    fn scope_uncharge(&self, slots: [u16; 2], entries: usize, bytes: usize) {
        for u in self.scope_use(slots) {
            u.entries.fetch_sub(entries, Relaxed);
            u.bytes.fetch_sub(bytes, Relaxed);
        }
    }
}

impl Shard {
    fn remove(&mut self, k: &[u8], inner: &Inner) -> Option<Entry> {
        let e = self.map.remove(k)?;
        if matches!(e.state, State::Lease(_)) {
            self.pending -= 1;
        }
        inner.uncharge(1, e.size);
        inner.scope_uncharge(e.scope, 1, e.size);
        Some(e)
    }

    /// Removes up to `max` expired entries from the front of the expiry queue, with the
    /// stale pairs met on the way (dropped) and renewed leases (put back at their new
    /// expiry): at most `4 × max` (and 16 at least) pairs looked at, so a claim's share of the
    /// work is bounded. Stops at the first live entry that has not expired: when it stops
    /// there, the front of the queue is the shard's earliest expiry.
    fn sweep(&mut self, now: u64, inner: &Inner, max: usize) {
        let mut removed = 0;
        let mut steps = max.saturating_mul(4).max(16);
        while removed < max && steps > 0 {
            steps -= 1;
            let Some(Reverse(front)) = self.expiry.peek() else {
                break;
            };
            // An entry's place is never later than its expiry (a renewal only moves the
            // expiry later), so nothing has expired while the front's place is still ahead:
            // the common case costs no look-up (of a key cold in the cache).
            if front.at > now {
                break;
            }
            let expires_at = match self.map.get(&*front.key) {
                Some(e) if e.seq == front.seq => e.expires_at,
                _ => {
                    self.expiry.pop();
                    continue;
                }
            };
            if expires_at > now {
                if expires_at == front.at {
                    break;
                }
                // A renewed lease: its place moves to its new expiry (a pop then a push: the
                // buffer does not grow).
                let Reverse(due) = self.expiry.pop().expect("the front pair");
                self.expiry.push(Reverse(Due {
                    at: expires_at,
                    ..due
                }));
                continue;
            }
            let Reverse(due) = self.expiry.pop().expect("the front pair");
            self.remove(&due.key, inner);
            inner.expired.fetch_add(1, Relaxed);
            removed += 1;
        }
        if self.expiry.len() > 2 * self.map.len() + 64 {
            self.compact();
        }
    }

    /// The expiry at the front of the queue (exact after a [`sweep`](Self::sweep) that
    /// stopped at a live entry; never later than the earliest entry's otherwise).
    ///
    /// A place may be earlier than its entry's expiry (a renewed lease, a record in its
    /// lease's place): up to 64 such places at the front are put back at their expiry first
    /// (and stale ones dropped), so the figure is the real earliest expiry, or under it.
    fn earliest(&mut self) -> u64 {
        for _ in 0..64 {
            let Some(Reverse(front)) = self.expiry.peek() else {
                return u64::MAX;
            };
            match self.map.get(&*front.key) {
                Some(e) if e.seq == front.seq && e.expires_at > front.at => {
                    let at = e.expires_at;
                    let Reverse(due) = self.expiry.pop().expect("the front pair");
                    self.expiry.push(Reverse(Due { at, ..due }));
                }
                Some(e) if e.seq == front.seq => return front.at,
                _ => {
                    self.expiry.pop();
                }
            }
        }
        self.expiry.peek().map_or(u64::MAX, |Reverse(d)| d.at)
    }

    /// Drops stale pairs from the expiry queue (its buffer keeps its size).
    fn compact(&mut self) {
        let map = &self.map;
        self.expiry
            .retain(|Reverse(d)| map.get(&*d.key).is_some_and(|e| e.seq == d.seq));
    }

    /// What the map's table and the queue's buffer take, as allocated.
    fn table_bytes(&self) -> usize {
        map_table_bytes(self.full_cap) + queue_bytes(self.expiry.capacity())
    }

    /// What one more lease in the map, its place in the expiry queue and the place kept for
    /// its record would add to [`Shard::table_bytes`].
    fn growth(&self) -> usize {
        let map = if self.map.len() < self.map.capacity() {
            0
        } else {
            // hashbrown: rehash in place when half the table is tombstones, else grow.
            let items = self.map.len() + 1;
            if items <= self.full_cap / 2 {
                0
            } else {
                let cap = items.max(self.full_cap + 1);
                map_table_bytes(buckets_capacity(capacity_buckets(cap)))
                    .saturating_sub(map_table_bytes(self.full_cap))
            }
        };
        let cap = self.expiry.capacity();
        let want = self.expiry.len() + self.pending + 2;
        let queue = if cap >= want {
            0
        } else {
            queue_bytes(heap_grown_capacity(cap, want)) - queue_bytes(cap)
        };
        map + queue
    }

    /// Brings the charge for the tables to what they take now.
    fn resync(&mut self, inner: &Inner) {
        let now = self.table_bytes();
        if now > self.tables {
            inner.bytes.fetch_add(now - self.tables, Relaxed);
        } else {
            inner.bytes.fetch_sub(self.tables - now, Relaxed);
        }
        self.tables = now;
    }
}

fn lock(m: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    // A panic while holding a shard leaves its map consistent (every update is a single
    // insert or remove), so a poisoned lock is used as it is.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

// What allocations cost. The figures follow the system allocator (glibc's malloc: 8 bytes
// of header, 16-byte granules, 32 bytes at least; pages for large blocks), hashbrown's
// tables (a control byte per bucket and a group of 16 more) and `http`'s header maps.

/// The bytes an allocation of `n` takes.
fn alloc_size(n: usize) -> usize {
    match n {
        0 => 0,
        n if n >= 128 << 10 => (n + 16 + 4095) & !4095,
        n => ((n + 8 + 15) & !15).max(32),
    }
}

/// A key: an `Arc<[u8]>` of its encoding.
fn key_cost(len: usize) -> usize {
    alloc_size(2 * size_of::<usize>() + len)
}

/// A record with no headers and no body: its `Arc` alone.
fn marker_cost() -> usize {
    alloc_size(2 * size_of::<usize>() + size_of::<Record>())
}

fn record_cost(r: &Record) -> usize {
    marker_cost()
        + alloc_size(r.body().len())
        + header_map_cost(r.headers())
        + r.trailers().map_or(0, header_map_cost)
}

/// A header map built by [`compact_headers`]: its index and entry tables sized for its
/// names, its extra values, and each name and value in an allocation of its own.
fn header_map_cost(m: &HeaderMap) -> usize {
    let names = m.keys_len();
    if names == 0 {
        return 0;
    }
    // `HeaderMap::with_capacity`: a power of two of 4-byte indices, 3/4 of it in entries
    // (hash, links, name, value).
    let raw = (names + names / 3).next_power_of_two();
    let bucket = 4 * size_of::<usize>() + size_of::<HeaderName>() + size_of::<HeaderValue>();
    let extra_value = 4 * size_of::<usize>() + size_of::<HeaderValue>();
    let extras = m.len() - names;
    let extra_cap = if extras == 0 {
        0
    } else {
        extras.next_power_of_two().max(4)
    };
    let strings: usize = m
        .keys()
        .map(|n| alloc_size(n.as_str().len()))
        .sum::<usize>()
        + m.values().map(|v| alloc_size(v.len())).sum::<usize>();
    alloc_size(4 * raw)
        + alloc_size(bucket * (raw - raw / 4))
        + alloc_size(extra_value * extra_cap)
        + strings
}

/// A record in allocations of its own, of their exact size: the body and header values are
/// copied, so a stored record pins no larger buffer it was cut from.
fn compact(r: Record) -> Record {
    if !r.is_kept() {
        return Record::not_kept(r.fingerprint(), r.status());
    }
    Record::response(
        r.fingerprint(),
        r.status(),
        compact_headers(r.headers()),
        Bytes::copy_from_slice(r.body()),
        r.trailers().map(compact_headers),
    )
}

fn compact_headers(m: &HeaderMap) -> HeaderMap {
    if m.is_empty() {
        return HeaderMap::new();
    }
    let mut out = HeaderMap::with_capacity(m.keys_len());
    for (name, value) in m {
        // A name always owns its bytes (http copies every name it parses), so a clone pins
        // nothing larger; a value may be a slice of a read buffer, so it is copied.
        let name = name.clone();
        let mut v = HeaderValue::from_bytes(value.as_bytes()).unwrap_or_else(|_| value.clone());
        v.set_sensitive(value.is_sensitive());
        out.append(name, v);
    }
    out
}

/// The slot of a shard's map: key and entry.
const SLOT: usize = size_of::<(Arc<[u8]>, Entry)>();

/// hashbrown's table for a full capacity `cap`: its buckets and their control bytes.
fn map_table_bytes(cap: usize) -> usize {
    if cap == 0 {
        return 0;
    }
    let buckets = if cap < 8 { cap + 1 } else { cap / 7 * 8 };
    alloc_size(buckets * (SLOT + 1) + 16)
}

/// hashbrown's bucket count for a capacity.
fn capacity_buckets(cap: usize) -> usize {
    match cap {
        0..4 => 4,
        4..8 => 8,
        _ => (cap * 8 / 7).next_power_of_two(),
    }
}

/// hashbrown's full capacity of a table of `buckets`.
fn buckets_capacity(buckets: usize) -> usize {
    if buckets < 8 {
        buckets - 1
    } else {
        buckets / 8 * 7
    }
}

fn queue_bytes(cap: usize) -> usize {
    alloc_size(cap * size_of::<Reverse<Due>>())
}

/// The capacity the expiry queue's buffer grows to when it must hold `want` pairs: doubled
/// (4 at least), or `want` if that is more, as a `Vec` grows.
fn heap_grown_capacity(cap: usize, want: usize) -> usize {
    (2 * cap).max(want).max(4)
}

impl Store for MemoryStore {
    type ClaimFuture = Ready<Result<Claim, StoreError>>;
    type CompleteFuture = Ready<Result<(), StoreError>>;
    type RenewFuture = Ready<Result<(), StoreError>>;
    type ReleaseFuture = Ready<Result<(), StoreError>>;
    type GetFuture = Ready<Result<Option<Arc<Record>>, StoreError>>;

    fn claim(
        &self,
        key: &StoreKey,
        fingerprint: Fingerprint,
        lease_ttl: Duration,
    ) -> Self::ClaimFuture {
        ready(self.claim_now(key, fingerprint, lease_ttl))
    }

    fn complete(&self, lease: &Lease, record: Record, ttl: Duration) -> Self::CompleteFuture {
        ready(self.complete_now(lease, record, ttl))
    }

    fn renew(&self, lease: &Lease, lease_ttl: Duration) -> Self::RenewFuture {
        let now = self.inner.clock.now_nanos();
        let mut s = self.shard(lease.key().encoded());
        ready(match s.map.get_mut(lease.key().encoded()) {
            Some(e)
                if matches!(e.state, State::Lease(t) if t == lease.token())
                    && e.expires_at > now =>
            {
                // Never earlier than it was: the lease's place in the expiry queue is never
                // later than its expiry.
                e.expires_at = e
                    .expires_at
                    .max(now.saturating_add(duration_nanos(lease_ttl)));
                Ok(())
            }
            _ => Err(StoreError::new(StoreErrorKind::LeaseLost)),
        })
    }

    fn release(&self, lease: &Lease) -> Self::ReleaseFuture {
        self.release_now(lease);
        ready(Ok(()))
    }

    fn get(&self, key: &StoreKey) -> Self::GetFuture {
        ready(Ok(self.get_now(key)))
    }

    fn release_detached(&self, lease: Lease, _until: tokio::time::Instant) {
        self.release_now(&lease);
    }

    fn complete_detached(
        &self,
        lease: Lease,
        record: Record,
        ttl: Duration,
        _lease_ttl: Duration,
        _done: super::DetachedWrite,
    ) {
        if let Err(e) = self.complete_now(&lease, record, ttl) {
            tracing::warn!(error = %e, "idempotency record not written");
        }
    }

    fn completes_at_once(&self) -> bool {
        // `complete` is `complete_now`, whose errors are final: a lost lease, or no room
        // to take again a key whose lease expired and was swept (a background write would
        // not fare better in one process).
        true
    }

    fn max_record_len(&self) -> Option<usize> {
        Some(self.inner.max_record())
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("shards", &self.inner.shards.len())
            .field("max_entries", &self.inner.max_entries)
            .field("max_bytes", &self.inner.max_bytes)
            .field("scope_share", &self.inner.share)
            .field("clock", &self.inner.clock)
            .finish_non_exhaustive()
    }
}

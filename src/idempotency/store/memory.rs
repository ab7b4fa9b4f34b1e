//! [`MemoryStore`]: an in-process, sharded, bounded store.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::{ready, Ready};
use std::hash::{BuildHasher, Hasher as _};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use super::{Claim, Lease, Store, StoreError, StoreErrorKind, StoreKey};
use crate::clock::{duration_nanos, Clock};
use crate::idempotency::fingerprint::{Fingerprint, Hasher};
use crate::idempotency::layer::ConfigError;
use crate::idempotency::record::Record;

/// What each entry costs beyond its key and record, in bytes, for the byte bound.
const ENTRY_OVERHEAD: usize = 96;
/// The smallest byte budget of one shard.
const MIN_SHARD_BYTES: usize = 1024;

/// An in-process idempotency store: sharded, bounded by entries and by bytes.
///
/// The key space is split over shards (64 by default); each has its own map behind a
/// `std::sync::Mutex` held only for a map operation, never across an `.await`, and one
/// shard's share of the bounds: `max_entries / shards` entries and `max_bytes / shards`
/// bytes (key, encoded [`Record`] and 96 bytes of bookkeeping per entry).
///
/// # When full
///
/// To make room for a new lease or record, the store first drops expired entries, then
/// **evicts the oldest completed record** of the shard (oldest by completion). A live lease
/// is never evicted: when a shard is full of live leases, `claim` fails with
/// [`StoreErrorKind::Full`] (the layer answers 503 by default). A record larger than a
/// shard's whole byte budget is kept as "completed, too large to replay"
/// ([`Record::is_kept`] is `false`), so that its key never runs twice.
///
/// Expired records and leases are removed when their key is next seen, a few at a time on
/// every claim, when room is needed, and all at once by [`MemoryStore::purge_expired`].
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
///     .max_bytes(16 << 20)
///     .build()
///     .expect("valid bounds");
/// assert_eq!(store.stats().entries, 0);
/// assert_eq!(store.stats().max_entries, 10_000);
/// ```
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

struct Inner {
    shards: Box<[Mutex<Shard>]>,
    mask: usize,
    seed: u64,
    clock: Clock,
    shard_entries: usize,
    shard_bytes: usize,
    max_entries: usize,
    max_bytes: usize,
    token_salt: u64,
    next_token: AtomicU64,
    evicted: AtomicU64,
    expired: AtomicU64,
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
    /// Completed records in completion order: `(key, seq)`; stale pairs are skipped.
    completed: VecDeque<(Arc<[u8]>, u64)>,
    /// Leases in claim order: `(key, seq)`; stale pairs are skipped.
    leases: VecDeque<(Arc<[u8]>, u64)>,
    bytes: usize,
    seq: u64,
}

struct Entry {
    seq: u64,
    expires_at: u64,
    fingerprint: Fingerprint,
    size: usize,
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
    /// Bytes charged now.
    pub bytes: usize,
    /// The bound on entries.
    pub max_entries: usize,
    /// The bound on bytes.
    pub max_bytes: usize,
    /// Completed records evicted before their time to make room.
    pub evicted: u64,
    /// Expired entries removed.
    pub expired: u64,
}

/// Builds a [`MemoryStore`]; see [`MemoryStore::builder`].
#[derive(Debug, Clone)]
pub struct MemoryStoreBuilder {
    max_entries: usize,
    max_bytes: usize,
    shards: usize,
    clock: Option<Clock>,
}

impl MemoryStoreBuilder {
    /// The most leases and records held at once (default 100,000).
    pub fn max_entries(mut self, n: usize) -> Self {
        self.max_entries = n;
        self
    }

    /// The most bytes held at once (default 64 MiB).
    pub fn max_bytes(mut self, n: usize) -> Self {
        self.max_bytes = n;
        self
    }

    /// The number of shards, a power of two from 1 to 4096 (default 64).
    pub fn shards(mut self, n: usize) -> Self {
        self.shards = n;
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
    /// 4096, or a shard's share is less than one entry or 1 KiB.
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
        let shard_entries = self.max_entries / self.shards;
        let shard_bytes = self.max_bytes / self.shards;
        if shard_entries == 0 {
            return Err(ConfigError::TooSmall("max_entries"));
        }
        if shard_bytes < MIN_SHARD_BYTES {
            return Err(ConfigError::TooSmall("max_bytes"));
        }
        let seeds = std::collections::hash_map::RandomState::new();
        let mut h = seeds.build_hasher();
        h.write_u8(1);
        let seed = h.finish();
        let mut h = seeds.build_hasher();
        h.write_u8(2);
        let token_salt = h.finish();
        Ok(MemoryStore {
            inner: Arc::new(Inner {
                shards: (0..self.shards)
                    .map(|_| {
                        Mutex::new(Shard {
                            map: HashMap::with_hasher(KeyHash(seed)),
                            completed: VecDeque::new(),
                            leases: VecDeque::new(),
                            bytes: 0,
                            seq: 0,
                        })
                    })
                    .collect(),
                mask: self.shards - 1,
                seed,
                clock: self.clock.unwrap_or_default(),
                shard_entries,
                shard_bytes,
                max_entries: self.max_entries,
                max_bytes: self.max_bytes,
                token_salt,
                next_token: AtomicU64::new(1),
                evicted: AtomicU64::new(0),
                expired: AtomicU64::new(0),
            }),
        })
    }
}

impl Default for MemoryStoreBuilder {
    fn default() -> Self {
        MemoryStoreBuilder {
            max_entries: 100_000,
            max_bytes: 64 << 20,
            shards: 64,
            clock: None,
        }
    }
}

impl Default for MemoryStore {
    /// A store of 100,000 entries and 64 MiB over 64 shards, on the default clock.
    fn default() -> Self {
        MemoryStoreBuilder::default()
            .build()
            .expect("the default bounds are valid")
    }
}

impl MemoryStore {
    /// A store with the default bounds (100,000 entries, 64 MiB).
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    /// A builder to set bounds, shards and clock.
    pub fn builder() -> MemoryStoreBuilder {
        MemoryStoreBuilder::default()
    }

    /// Current figures.
    pub fn stats(&self) -> MemoryStoreStats {
        let (mut entries, mut bytes) = (0, 0);
        for s in self.inner.shards.iter() {
            let s = lock(s);
            entries += s.map.len();
            bytes += s.bytes;
        }
        MemoryStoreStats {
            entries,
            bytes,
            max_entries: self.inner.max_entries,
            max_bytes: self.inner.max_bytes,
            evicted: self.inner.evicted.load(Ordering::Relaxed),
            expired: self.inner.expired.load(Ordering::Relaxed),
        }
    }

    /// Removes every expired lease and record now.
    pub fn purge_expired(&self) {
        let now = self.inner.clock.now_nanos();
        for s in self.inner.shards.iter() {
            let mut s = lock(s);
            let before = s.map.len();
            let mut freed = 0;
            s.map.retain(|_, e| {
                let keep = e.expires_at > now;
                if !keep {
                    freed += e.size;
                }
                keep
            });
            s.bytes -= freed;
            let gone = before - s.map.len();
            s.compact();
            self.inner.expired.fetch_add(gone as u64, Ordering::Relaxed);
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
        let n = self.inner.next_token.fetch_add(1, Ordering::Relaxed);
        (u128::from(self.inner.token_salt) << 64) | u128::from(n)
    }

    fn claim_now(
        &self,
        key: &StoreKey,
        fingerprint: Fingerprint,
        lease_ttl: Duration,
    ) -> Result<Claim, StoreError> {
        let now = self.inner.clock.now_nanos();
        let inner = &*self.inner;
        let enc = key.encoded();
        let mut s = self.shard(enc);
        s.sweep(now, inner);
        if let Some(e) = s.map.get(enc) {
            if e.expires_at > now {
                if e.fingerprint != fingerprint {
                    return Ok(Claim::Mismatch);
                }
                return Ok(match &e.state {
                    State::Lease(_) => Claim::InFlight,
                    State::Done(r) => Claim::Completed(r.clone()),
                });
            }
            s.remove(enc);
            inner.expired.fetch_add(1, Ordering::Relaxed);
        }
        let size = ENTRY_OVERHEAD + enc.len();
        if !s.make_room(1, size, now, inner) {
            return Err(StoreError::new(StoreErrorKind::Full));
        }
        let token = self.token();
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
                state: State::Lease(token),
            },
        );
        s.bytes += size;
        s.leases.push_back((k, seq));
        drop(s);
        Ok(Claim::Claimed(Lease::new(key.clone(), token, fingerprint)))
    }

    fn complete_now(&self, lease: &Lease, record: Record, ttl: Duration) -> Result<(), StoreError> {
        let now = self.inner.clock.now_nanos();
        let inner = &*self.inner;
        let enc = lease.key().encoded();
        let mut s = self.shard(enc);
        // A lease past its expiry is lost, as it would be in a remote store: it may already be
        // swept (or claimed again), so it must not be completed.
        let held = matches!(
            s.map.get(enc),
            Some(Entry { state: State::Lease(t), expires_at, .. })
                if *t == lease.token() && *expires_at > now
        );
        if !held {
            return Err(StoreError::new(StoreErrorKind::LeaseLost));
        }
        let mut record = record;
        if ENTRY_OVERHEAD + enc.len() + record.encoded_len() > inner.shard_bytes {
            record = Record::not_kept(record.fingerprint(), record.status());
        }
        let mut extra = record.encoded_len();
        if !s.make_room(0, extra, now, inner) {
            // Could not fit even after evicting every completed record: keep the marker.
            record = Record::not_kept(record.fingerprint(), record.status());
            extra = record.encoded_len();
            if !s.make_room(0, extra, now, inner) {
                return Err(StoreError::new(StoreErrorKind::Full));
            }
        }
        s.seq += 1;
        let seq = s.seq;
        let Some(e) = s.map.get_mut(enc) else {
            return Err(StoreError::new(StoreErrorKind::LeaseLost));
        };
        e.state = State::Done(Arc::new(record));
        e.size += extra;
        e.seq = seq;
        e.expires_at = now.saturating_add(duration_nanos(ttl));
        s.bytes += extra;
        s.completed
            .push_back((lease.key().encoded_arc().clone(), seq));
        Ok(())
    }

    fn release_now(&self, lease: &Lease) {
        let enc = lease.key().encoded();
        let mut s = self.shard(enc);
        if matches!(
            s.map.get(enc),
            Some(Entry { state: State::Lease(t), .. }) if *t == lease.token()
        ) {
            s.remove(enc);
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

impl Shard {
    fn remove(&mut self, k: &[u8]) -> Option<Entry> {
        let e = self.map.remove(k)?;
        self.bytes -= e.size;
        Some(e)
    }

    fn is_live_at(&self, k: &[u8], seq: u64) -> Option<&Entry> {
        self.map.get(k).filter(|e| e.seq == seq)
    }

    /// Removes a few expired entries and stale queue pairs from the fronts of the queues.
    fn sweep(&mut self, now: u64, inner: &Inner) {
        for q in [Queue::Completed, Queue::Leases] {
            for _ in 0..4 {
                let queue = match q {
                    Queue::Completed => &self.completed,
                    Queue::Leases => &self.leases,
                };
                let Some((k, seq)) = queue.front() else {
                    break;
                };
                let expired = match self.map.get(&**k) {
                    Some(e) if e.seq == *seq => {
                        if e.expires_at > now {
                            break;
                        }
                        true
                    }
                    _ => false,
                };
                let (k, _) = self.queue(q).pop_front().expect("a front pair");
                if expired {
                    self.remove(&k);
                    inner.expired.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        if self.completed.len() + self.leases.len() > 2 * self.map.len() + 64 {
            self.compact();
        }
    }

    fn queue(&mut self, q: Queue) -> &mut VecDeque<(Arc<[u8]>, u64)> {
        match q {
            Queue::Completed => &mut self.completed,
            Queue::Leases => &mut self.leases,
        }
    }

    /// Drops stale pairs from both queues.
    fn compact(&mut self) {
        let map = &self.map;
        let live = |(k, seq): &(Arc<[u8]>, u64)| map.get(&**k).is_some_and(|e| e.seq == *seq);
        self.completed.retain(live);
        self.leases.retain(live);
    }

    /// Makes room for `entries` more entries and `bytes` more bytes: expired and then oldest
    /// completed records go first, then expired leases. Never a live lease.
    fn make_room(&mut self, entries: usize, bytes: usize, now: u64, inner: &Inner) -> bool {
        loop {
            if self.map.len() + entries <= inner.shard_entries
                && self.bytes + bytes <= inner.shard_bytes
            {
                return true;
            }
            if let Some((k, seq)) = self.completed.pop_front() {
                if let Some(e) = self.is_live_at(&k, seq) {
                    let expired = e.expires_at <= now;
                    self.remove(&k);
                    let counter = if expired {
                        &inner.expired
                    } else {
                        &inner.evicted
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                continue;
            }
            let Some((k, seq)) = self.leases.pop_front() else {
                return false;
            };
            match self.is_live_at(&k, seq) {
                None => continue,
                Some(e) if e.expires_at <= now => {
                    self.remove(&k);
                    inner.expired.fetch_add(1, Ordering::Relaxed);
                }
                Some(_) => {
                    // Leases expire roughly in claim order: look for an expired one further
                    // on before giving up.
                    let found = self.leases.iter().position(|(k2, s2)| {
                        self.map
                            .get(&**k2)
                            .is_some_and(|e| e.seq == *s2 && e.expires_at <= now)
                    });
                    self.leases.push_front((k, seq));
                    match found {
                        Some(i) => {
                            let (k2, _) = self.leases.remove(i + 1).expect("index in range");
                            self.remove(&k2);
                            inner.expired.fetch_add(1, Ordering::Relaxed);
                        }
                        None => return false,
                    }
                }
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Queue {
    Completed,
    Leases,
}

fn lock(m: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    // A panic while holding a shard leaves its map consistent (every update is a single
    // insert or remove), so a poisoned lock is used as it is.
    m.lock().unwrap_or_else(PoisonError::into_inner)
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
                e.expires_at = now.saturating_add(duration_nanos(lease_ttl));
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

    fn release_detached(&self, lease: Lease) {
        self.release_now(&lease);
    }

    fn complete_detached(
        &self,
        lease: Lease,
        record: Record,
        ttl: Duration,
        _until: tokio::time::Instant,
    ) {
        if let Err(e) = self.complete_now(&lease, record, ttl) {
            tracing::warn!(error = %e, "idempotency record not written; the lease will expire");
        }
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("shards", &self.inner.shards.len())
            .field("max_entries", &self.inner.max_entries)
            .field("max_bytes", &self.inner.max_bytes)
            .field("clock", &self.inner.clock)
            .finish_non_exhaustive()
    }
}

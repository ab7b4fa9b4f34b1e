//! The [`Store`] trait: where leases and records live, in process or shared by replicas.
//!
//! A store does four atomic things, each as a future so that a remote store (Redis) fits as
//! well as [`MemoryStore`]:
//!
//! - [`Store::claim`]: look the key up and, if it is free, take a [`Lease`] on it (an owner
//!   token with a time to live) in the same atomic step. The answer is a [`Claim`]: the lease,
//!   or that the key is in flight, completed (with its [`Record`]), or used with another
//!   fingerprint.
//! - [`Store::complete`]: replace the lease by the record, with a time to live, **only if no
//!   one else holds the key**: it holds our lease (compare-and-set on the owner token), even
//!   expired, or nothing.
//! - [`Store::renew`]: extend the lease's time to live, only if it is still ours, while the
//!   request runs.
//! - [`Store::release`]: drop the lease, only if it is still ours, so the key can be retried.
//! - [`Store::get`]: read a completed record.
//!
//! The layer renews its lease every third of the lease's time to live while the handler runs,
//! so a handler may run longer than `lease_ttl`; a lease whose owner crashed stops being
//! renewed and expires by itself after its time to live. Store failures are
//! [`StoreError`]s with a [`StoreErrorKind`], so the layer can apply its
//! [`FailurePolicy`](super::FailurePolicy).

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tower::BoxError;

use super::fingerprint::Fingerprint;
use super::record::Record;

pub mod memory;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis;

#[cfg(feature = "redis")]
pub use self::redis::{
    RedisStore, RedisStoreConfigError, RedisStoreStats, MAX_PENDING_RELEASES,
    MAX_PENDING_RELEASES_PER_KEY,
};
pub use memory::{MemoryStore, MemoryStoreBuilder, MemoryStoreStats};

/// The key a record is stored under: the request's scope and its idempotency key.
///
/// Two requests share a record only if both their scope and their key are equal, so a client
/// in one scope can never receive a response stored for another. Its `Debug` output (and so
/// the layer's `tracing` events) shows the key but only the length of the scope, which may be
/// drawn from credentials.
///
/// # Encoding
///
/// [`StoreKey::encoded`] is the scope's length (4 bytes, big-endian), the scope, then the key:
/// unambiguous (`("ab", "c")` and `("a", "bc")` differ), and binary-safe for a remote store to
/// use as (part of) its key. The key is held in that form, in one shared allocation, so
/// clones are cheap.
///
/// ```
/// use tower_bulwark::idempotency::StoreKey;
///
/// let k = StoreKey::new("tenant-7", "order-1");
/// assert_eq!(k.scope(), b"tenant-7");
/// assert_eq!(k.key(), b"order-1");
/// assert_eq!(&k.encoded()[..4], &[0, 0, 0, 8]);
/// assert_ne!(StoreKey::new("ab", "c"), StoreKey::new("a", "bc"));
/// ```
///
/// # Unscoped keys
///
/// [`StoreKey::unscoped`] makes the key of a layer built with
/// [`unscoped`](crate::idempotency::IdempotencyBuilder::unscoped): it has the empty scope,
/// and says that its layer has one key space for everyone, so a store that holds each scope
/// to a share ([`MemoryStore`]'s `scope_share`) lets it use the whole store. It is equal to
/// `StoreKey::new("", key)`.
#[derive(Clone)]
pub struct StoreKey {
    encoded: Arc<[u8]>,
    unscoped: bool,
}

impl PartialEq for StoreKey {
    fn eq(&self, other: &StoreKey) -> bool {
        self.encoded == other.encoded
    }
}

impl Eq for StoreKey {}

impl std::hash::Hash for StoreKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.encoded.hash(state);
    }
}

impl StoreKey {
    /// The key of a layer with one key space for every caller (see
    /// [Unscoped keys](StoreKey#unscoped-keys)).
    pub fn unscoped(key: impl AsRef<[u8]>) -> StoreKey {
        StoreKey {
            unscoped: true,
            ..StoreKey::new(b"", key)
        }
    }

    /// Whether the key is [unscoped](StoreKey#unscoped-keys): its layer has one scope, so no
    /// share of a store applies to it.
    pub fn is_unscoped(&self) -> bool {
        self.unscoped
    }

    /// A key in a scope (an empty scope for none).
    pub fn new(scope: impl AsRef<[u8]>, key: impl AsRef<[u8]>) -> StoreKey {
        let (scope, key) = (scope.as_ref(), key.as_ref());
        let n = u32::try_from(scope.len()).expect("a scope shorter than 4 GiB");
        let len = 4 + scope.len() + key.len();
        let mut stack = [0u8; 320];
        let mut heap;
        let buf: &mut [u8] = if len <= stack.len() {
            &mut stack[..len]
        } else {
            heap = vec![0u8; len];
            &mut heap[..]
        };
        buf[..4].copy_from_slice(&n.to_be_bytes());
        buf[4..4 + scope.len()].copy_from_slice(scope);
        buf[4 + scope.len()..].copy_from_slice(key);
        StoreKey {
            encoded: Arc::from(&*buf),
            unscoped: false,
        }
    }

    fn scope_len(&self) -> usize {
        let mut n = [0u8; 4];
        n.copy_from_slice(&self.encoded[..4]);
        u32::from_be_bytes(n) as usize
    }

    /// The scope (a digest of the caller's credentials, a tenant, a principal); empty for a
    /// request without credentials, or when the layer is unscoped.
    pub fn scope(&self) -> &[u8] {
        &self.encoded[4..4 + self.scope_len()]
    }

    /// The idempotency key as the client sent it (unquoted).
    pub fn key(&self) -> &[u8] {
        &self.encoded[4 + self.scope_len()..]
    }

    /// The encoding (see the type docs).
    pub fn encoded(&self) -> &[u8] {
        &self.encoded
    }

    pub(crate) fn encoded_arc(&self) -> &Arc<[u8]> {
        &self.encoded
    }
}

impl fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The scope may be drawn from credentials: its bytes are not printed.
        f.debug_struct("StoreKey")
            .field("scope_len", &self.scope().len())
            .field("key", &String::from_utf8_lossy(self.key()))
            .finish()
    }
}

/// A claim on a key: proof that this request owns it until it completes, is released, or the
/// lease's time to live runs out.
///
/// The owner token tells this owner's lease from a later one on the same key, so a late
/// `complete` or `release` never overwrites another owner's work.
#[derive(Clone, PartialEq, Eq)]
pub struct Lease {
    key: StoreKey,
    token: u128,
    fingerprint: Fingerprint,
}

impl Lease {
    /// A lease on `key` held by the owner `token`, for a request of `fingerprint`. Made by
    /// stores in [`Store::claim`].
    pub fn new(key: StoreKey, token: u128, fingerprint: Fingerprint) -> Lease {
        Lease {
            key,
            token,
            fingerprint,
        }
    }

    /// The key held.
    pub fn key(&self) -> &StoreKey {
        &self.key
    }

    /// The owner token, unique to this claim.
    pub fn token(&self) -> u128 {
        self.token
    }

    /// The fingerprint of the request holding the lease.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("key", &self.key)
            .field("token", &format_args!("{:032x}", self.token))
            .field("fingerprint", &self.fingerprint)
            .finish()
    }
}

/// The answer to [`Store::claim`].
#[derive(Debug)]
#[non_exhaustive]
pub enum Claim {
    /// The key was free: this request owns it now and runs.
    Claimed(Lease),
    /// Another request with the same key and fingerprint holds a live lease.
    InFlight,
    /// The key completed with the same fingerprint: here is its record.
    Completed(Arc<Record>),
    /// The key is in flight or completed with another fingerprint.
    Mismatch,
}

/// What went wrong in a store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StoreErrorKind {
    /// The store cannot be reached or refused the operation.
    Unavailable,
    /// The operation took longer than its time limit.
    Timeout,
    /// The store has no room for another key: it is full of live leases and records, or
    /// the key's scope holds its share. [`StoreError::retry_after`] may say when room is
    /// expected.
    Full,
    /// The lease is no longer ours: it expired and another request claimed the key.
    LeaseLost,
    /// Stored bytes could not be decoded.
    Corrupt,
}

/// An error from a [`Store`].
pub struct StoreError {
    kind: StoreErrorKind,
    source: Option<BoxError>,
    retry_after: Option<Duration>,
    /// The store knows that the same operation would fail the same way again (a script
    /// error, a reply of the wrong type, refused credentials): not worth retrying.
    permanent: bool,
}

impl StoreError {
    /// An error of `kind`.
    pub fn new(kind: StoreErrorKind) -> StoreError {
        StoreError {
            kind,
            source: None,
            retry_after: None,
            permanent: false,
        }
    }

    /// An error of `kind` caused by `source`.
    pub fn with_source(kind: StoreErrorKind, source: impl Into<BoxError>) -> StoreError {
        StoreError {
            kind,
            source: Some(source.into()),
            retry_after: None,
            permanent: false,
        }
    }

    /// The same error with a hint of when to try again: for [`StoreErrorKind::Full`], the
    /// time until the store expects room (its earliest entry's expiry).
    pub fn with_retry_after(mut self, after: Duration) -> StoreError {
        self.retry_after = Some(after);
        self
    }

    /// The same error, marked as one that trying again cannot mend.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn permanent(mut self) -> StoreError {
        self.permanent = true;
        self
    }

    /// When the store expects the operation to succeed again, if it knows.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// What went wrong.
    pub fn kind(&self) -> StoreErrorKind {
        self.kind
    }
}

impl fmt::Debug for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreError")
            .field("kind", &self.kind)
            .field("source", &self.source.as_ref().map(|e| e.to_string()))
            .field("retry_after", &self.retry_after)
            .field("permanent", &self.permanent)
            .finish()
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.kind {
            StoreErrorKind::Unavailable => "idempotency store unavailable",
            StoreErrorKind::Timeout => "idempotency store timed out",
            StoreErrorKind::Full => "idempotency store full",
            StoreErrorKind::LeaseLost => "idempotency lease lost to another owner",
            StoreErrorKind::Corrupt => "idempotency record corrupt",
        };
        f.write_str(what)?;
        if let Some(s) = &self.source {
            write!(f, ": {s}")?;
        }
        Ok(())
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// Where the idempotency layer keeps leases and records.
///
/// Every operation is atomic for its key and returns a `'static` future, so that a remote
/// store can own what it sends. Implementations: [`MemoryStore`] (one process) and, with the
/// `redis` feature, `RedisStore` (`SET NX PX` with an owner token for `claim`,
/// compare-and-set scripts for `complete`, `renew` and `release`, a time to live on every
/// key).
///
/// # Contract
///
/// - `claim` is one atomic step: a free or expired key becomes a lease with a new owner token
///   and `lease_ttl`; a live lease or live record with the same fingerprint answers
///   [`Claim::InFlight`] or [`Claim::Completed`]; with another fingerprint,
///   [`Claim::Mismatch`].
/// - A claim future dropped before it answers (cancelled, or timed out by the store itself)
///   leaves no lease that nobody holds: a store whose claim may still take effect after its
///   caller stopped waiting (a remote store) releases that lease with the token it made.
/// - `complete` stores the record for `ttl` while the key holds this lease's token, **even
///   past the lease's expiry**, or while the key holds nothing (the expired lease is gone):
///   the handler has run, and no one else holds the key, so the record must land. It never
///   writes over another owner's lease or over a record: it fails with
///   [`StoreErrorKind::LeaseLost`] then (as does a `complete` sent again after the first took
///   effect and its answer was lost). Custom stores must do the same, or a record written
///   late (after an outage longer than the lease) is lost and its key runs again.
/// - `renew` sets the lease's time to live to `lease_ttl` from now only while the key holds
///   this lease's token, unexpired; otherwise it changes nothing and fails with
///   [`StoreErrorKind::LeaseLost`].
/// - `release` removes the key only while it holds this lease's token; otherwise it does
///   nothing and succeeds.
pub trait Store: Clone + Send + Sync + 'static {
    /// The future of [`Store::claim`].
    type ClaimFuture: Future<Output = Result<Claim, StoreError>> + Send + 'static;
    /// The future of [`Store::complete`].
    type CompleteFuture: Future<Output = Result<(), StoreError>> + Send + 'static;
    /// The future of [`Store::renew`].
    type RenewFuture: Future<Output = Result<(), StoreError>> + Send + 'static;
    /// The future of [`Store::release`].
    type ReleaseFuture: Future<Output = Result<(), StoreError>> + Send + 'static;
    /// The future of [`Store::get`].
    type GetFuture: Future<Output = Result<Option<Arc<Record>>, StoreError>> + Send + 'static;

    /// Looks `key` up and claims it if free, atomically.
    fn claim(
        &self,
        key: &StoreKey,
        fingerprint: Fingerprint,
        lease_ttl: Duration,
    ) -> Self::ClaimFuture;

    /// Replaces `lease` by `record`, kept for `ttl`, if the lease is still held.
    fn complete(&self, lease: &Lease, record: Record, ttl: Duration) -> Self::CompleteFuture;

    /// Extends `lease` to `lease_ttl` from now, if it is still held.
    fn renew(&self, lease: &Lease, lease_ttl: Duration) -> Self::RenewFuture;

    /// Gives `lease` up, if it is still held, so the key can run again.
    fn release(&self, lease: &Lease) -> Self::ReleaseFuture;

    /// The completed record of `key`, if there is a live one.
    fn get(&self, key: &StoreKey) -> Self::GetFuture;

    /// Writes `record` under `lease` from a place that cannot wait (a `Drop`, or once the
    /// response has gone to the client), trying again while the store fails in a way that may
    /// pass. The handler has run: the key must never run again, so the write does not stop
    /// when the lease would expire (a [`complete`](Store::complete) may land after that, see
    /// the [contract](Store#contract)). It goes on until it succeeds, fails for good (the
    /// lease lost to another owner, or an error no retry mends), or `ttl` (the record's time
    /// to live) has passed since it began; while the store fails, the lease is renewed to
    /// `lease_ttl` every third of it, so that other replicas keep off the key whenever the
    /// store answers renewals. `done` is held until the write ends, then dropped: the layer
    /// answers its own repeats of the key 409 until then, without asking the store.
    ///
    /// The default runs [`Store::complete`] on a task of the current tokio runtime (one task
    /// per call: one per request whose record failed), or leaves the lease to expire when
    /// there is none. Stores that can write at once (such as [`MemoryStore`]) do so.
    fn complete_detached(
        &self,
        lease: Lease,
        record: Record,
        ttl: Duration,
        lease_ttl: Duration,
        done: DetachedWrite,
    ) {
        write_detached(self.clone(), lease, record, ttl, lease_ttl, done);
    }

    /// Whether [`complete`](Store::complete)'s future is ready when first polled and fails
    /// only in ways no retry in the background mends ([`StoreErrorKind::LeaseLost`]): the
    /// layer then keeps no copy of a record to write it again in the background should the
    /// request be dropped while its write is in flight (which cannot happen), and tracks no
    /// background write. Default `false`; [`MemoryStore`] says `true`.
    fn completes_at_once(&self) -> bool {
        false
    }

    /// The largest record, by [`Record::encoded_len`], the store promises room for, if it
    /// bounds records (default `None`: no bound). The layer refuses at build time a
    /// `max_response_body` that would not fit.
    fn max_record_len(&self) -> Option<usize> {
        None
    }

    /// Gives `lease` up from a place that cannot wait (a `Drop`, or once a failure has gone
    /// to the client), trying again while the store fails in a way that may pass, until
    /// `until`, when the lease would expire by itself: a release lost on the way must not
    /// leave the key refused (409) for the rest of the lease. The default runs
    /// [`Store::release`] on a task of the current tokio runtime, one task per call, or leaves
    /// the lease to expire when there is none. Stores that can release at once (such as
    /// [`MemoryStore`]) do so; `RedisStore` queues the release for its one background worker,
    /// which bounds the work an outage leaves behind.
    fn release_detached(&self, lease: Lease, until: tokio::time::Instant) {
        let store = self.clone();
        retry_detached("release of an idempotency lease", until, move || {
            store.release(&lease)
        });
    }
}

/// Whether an operation that failed this way may succeed if tried again: the store was
/// unreachable, slow or full, and did not say that the same call would fail again.
pub(crate) fn worth_retrying(error: &StoreError) -> bool {
    !error.permanent
        && matches!(
            error.kind,
            StoreErrorKind::Unavailable | StoreErrorKind::Timeout | StoreErrorKind::Full
        )
}

/// Runs `op` on a task of the current tokio runtime until it succeeds, fails in a way that
/// trying again cannot mend, or `until` passes (each attempt is cut off there too); attempts
/// are spaced 10 ms, doubling, up to 1 s. Without a runtime, nothing is tried. `what` names
/// the operation in `tracing` events.
pub(crate) fn retry_detached<F, Fut>(what: &'static str, until: tokio::time::Instant, mut op: F)
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), StoreError>> + Send + 'static,
{
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        tracing::debug!(what, "no tokio runtime to retry on; the lease will expire");
        return;
    };
    rt.spawn(async move {
        let mut pause = Duration::from_millis(10);
        loop {
            let error = match tokio::time::timeout_at(until, op()).await {
                Ok(Ok(())) => return,
                Ok(Err(e)) => e,
                Err(_) => StoreError::new(StoreErrorKind::Timeout),
            };
            if error.kind() == StoreErrorKind::LeaseLost {
                // Another owner's now, or expired; or an earlier attempt took effect and its
                // answer was lost.
                tracing::debug!(what, "idempotency lease no longer held; nothing more to do");
                return;
            }
            let now = tokio::time::Instant::now();
            if !worth_retrying(&error) || now + pause >= until {
                tracing::warn!(what, error = %error, "idempotency store: giving up");
                return;
            }
            tracing::debug!(what, error = %error, "idempotency store: trying again");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    });
}

/// The most keys a layer keeps as having a record written in the background (the requests
/// whose record the store refused, during an outage); beyond, a key is not kept, with a
/// `WARN` event, and a repeat of it on this layer asks the store as any other does.
pub const MAX_WRITES_TRACKED: usize = 4096;

/// The keys of one layer whose record is being written in the background, so that the layer
/// never claims a key whose record it is still writing. Costs one relaxed load while empty.
#[derive(Default)]
pub(crate) struct WritesInFlight {
    /// How many keys are in `keys` (read without the lock).
    count: AtomicUsize,
    /// The keys, each with the number of writes in flight for it.
    keys: Mutex<HashMap<StoreKey, usize>>,
}

impl WritesInFlight {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<StoreKey, usize>> {
        self.keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether a record of `key` is being written in the background.
    #[inline]
    pub(crate) fn contains(&self, key: &StoreKey) -> bool {
        self.count.load(Ordering::Relaxed) != 0 && self.lock().contains_key(key)
    }

    /// Keeps `key` until the returned token is dropped (untracked when the set is full).
    pub(crate) fn track(self: &Arc<Self>, key: &StoreKey) -> DetachedWrite {
        let mut keys = self.lock();
        if let Some(n) = keys.get_mut(key) {
            *n += 1;
        } else if keys.len() >= MAX_WRITES_TRACKED {
            tracing::warn!(
                key = ?key,
                max = MAX_WRITES_TRACKED,
                "idempotency: too many records written in the background; a repeat of this key \
                 is decided by the store alone"
            );
            return DetachedWrite::new();
        } else {
            keys.insert(key.clone(), 1);
            self.count.store(keys.len(), Ordering::Relaxed);
        }
        DetachedWrite {
            tracked: Some((self.clone(), key.clone())),
        }
    }
}

/// Held by a record's write in the background ([`Store::complete_detached`]) until the write
/// ends (written, refused for good, or given up), then dropped: until then, the layer that
/// made it answers its own repeats of the key 409 without asking the store.
#[must_use = "dropping it says that the write has ended"]
pub struct DetachedWrite {
    tracked: Option<(Arc<WritesInFlight>, StoreKey)>,
}

impl DetachedWrite {
    /// A token that tells no one (to call [`Store::complete_detached`] outside a layer).
    pub fn new() -> DetachedWrite {
        DetachedWrite { tracked: None }
    }
}

impl Default for DetachedWrite {
    fn default() -> DetachedWrite {
        DetachedWrite::new()
    }
}

impl fmt::Debug for DetachedWrite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DetachedWrite")
            .field("key", &self.tracked.as_ref().map(|(_, k)| k))
            .finish()
    }
}

impl Drop for DetachedWrite {
    fn drop(&mut self) {
        if let Some((writes, key)) = self.tracked.take() {
            let mut keys = writes.lock();
            if let Some(n) = keys.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    keys.remove(&key);
                    writes.count.store(keys.len(), Ordering::Relaxed);
                }
            }
        }
    }
}

/// [`Store::complete_detached`]'s default: [`Store::complete`] on a task of the current
/// tokio runtime until it succeeds, fails for good, or `ttl` has passed since it began (each
/// attempt is cut off there too); attempts are spaced 10 ms, doubling, up to 1 s. While it
/// fails, the lease is renewed (best effort) every third of `lease_ttl`. `done` is dropped
/// when the write ends. Without a runtime, nothing is tried.
pub(crate) fn write_detached<St: Store>(
    store: St,
    lease: Lease,
    record: Record,
    ttl: Duration,
    lease_ttl: Duration,
    done: DetachedWrite,
) {
    let what = "write of an idempotent response";
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        tracing::warn!(key = ?lease.key(), "no tokio runtime to write an idempotency record on; the lease will expire");
        return;
    };
    rt.spawn(async move {
        let _done = done;
        let start = tokio::time::Instant::now();
        let until = start + ttl;
        let mut renew_at = start;
        let mut pause = Duration::from_millis(10);
        loop {
            let error = match tokio::time::timeout_at(until, store.complete(&lease, record.clone(), ttl)).await {
                Ok(Ok(())) => {
                    if pause > Duration::from_millis(10) {
                        tracing::info!(key = ?lease.key(), "idempotency record written after the store failed");
                    }
                    return;
                }
                Ok(Err(e)) => e,
                Err(_) => StoreError::new(StoreErrorKind::Timeout),
            };
            if error.kind() == StoreErrorKind::LeaseLost {
                // Another owner's now; or an earlier attempt took effect and its answer was
                // lost.
                tracing::debug!(what, key = ?lease.key(), "idempotency key held by another; nothing more to do");
                return;
            }
            let now = tokio::time::Instant::now();
            if !worth_retrying(&error) || now + pause >= until {
                tracing::warn!(what, key = ?lease.key(), error = %error, "idempotency store: giving up");
                return;
            }
            tracing::debug!(what, error = %error, "idempotency store: trying again");
            let next_try = now + pause;
            let mut now = now;
            loop {
                if now >= renew_at && !lease_ttl.is_zero() {
                    // Keeps other replicas off the key while the record cannot be written,
                    // if the store answers renewals; a failed renewal changes nothing.
                    renew_at = now + lease_ttl / 3;
                    let renewal = store.renew(&lease, lease_ttl);
                    let _ = tokio::time::timeout_at(renew_at.min(until), renewal).await;
                }
                if lease_ttl.is_zero() || next_try <= renew_at {
                    tokio::time::sleep_until(next_try).await;
                    break;
                }
                tokio::time::sleep_until(renew_at).await;
                now = tokio::time::Instant::now();
            }
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The keys with a record written in the background: kept while a write's token lives
    /// (counted per write), gone when the last ends, and at most `MAX_WRITES_TRACKED`.
    #[test]
    fn writes_in_flight_are_kept_until_they_end_and_bounded() {
        let writes = Arc::new(WritesInFlight::default());
        let (a, b) = (StoreKey::new("s", "a"), StoreKey::new("s", "b"));
        assert!(!writes.contains(&a));
        let first = writes.track(&a);
        let second = writes.track(&a);
        assert!(writes.contains(&a) && !writes.contains(&b));
        drop(first);
        assert!(writes.contains(&a), "one write of the key still runs");
        drop(second);
        assert!(!writes.contains(&a));
        assert_eq!(writes.count.load(Ordering::Relaxed), 0);

        let held: Vec<_> = (0..MAX_WRITES_TRACKED)
            .map(|i| writes.track(&StoreKey::new("s", i.to_string())))
            .collect();
        let beyond = writes.track(&b);
        assert!(!writes.contains(&b), "beyond the bound, not kept");
        drop(beyond);
        assert_eq!(writes.count.load(Ordering::Relaxed), MAX_WRITES_TRACKED);
        drop(held);
        assert_eq!(writes.count.load(Ordering::Relaxed), 0);
        assert!(writes.lock().is_empty());
    }
}

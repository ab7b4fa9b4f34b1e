use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{request::Parts, HeaderName, Method};
use tower_layer::Layer;

use super::budget::BufferBudget;
use super::scope::Scope;
use super::service::Idempotency;
use super::store::{Store, WritesInFlight};
use crate::clock::duration_nanos;
use crate::util::rng::Rng;

/// A configuration value was refused when a layer or store was built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// A setting that must be positive (named) is zero.
    Zero(&'static str),
    /// The set of methods is empty.
    NoMethods,
    /// The shard count is not a power of two from 1 to 4096.
    Shards,
    /// A bound (named) is too small for what it must hold: `max_bytes` for a store's fixed
    /// tables and 64 KiB besides.
    TooSmall(&'static str),
    /// A store's scope share is not in `(0, 1]`.
    ScopeShare,
    /// The layer's largest kept response (`max_response_body`, and 16 KiB for its head) does
    /// not fit the largest record the store promises room for.
    ResponseExceedsStore {
        /// The layer's `max_response_body`.
        max_response_body: usize,
        /// The store's [`Store::max_record_len`].
        store_max_record: usize,
    },
    /// `max_buffered_bytes` is less than one request and one response
    /// (`max_request_body + max_response_body`): no keyed request could run.
    BufferTooSmall,
    /// A header name given to a setting (named) is not a valid header name.
    InvalidHeaderName(&'static str),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Zero(what) => write!(f, "`{what}` must be greater than zero"),
            ConfigError::NoMethods => {
                f.write_str("the idempotency layer needs at least one method")
            }
            ConfigError::Shards => {
                f.write_str("the shard count must be a power of two from 1 to 4096")
            }
            ConfigError::TooSmall(what) => write!(f, "`{what}` is too small"),
            ConfigError::ScopeShare => f.write_str("the scope share must be in (0, 1]"),
            ConfigError::ResponseExceedsStore {
                max_response_body,
                store_max_record,
            } => write!(
                f,
                "`max_response_body` ({max_response_body} bytes, and 16 KiB for the head) does \
                 not fit the store's largest record ({store_max_record} bytes): lower it or \
                 give the store more room"
            ),
            ConfigError::InvalidHeaderName(what) => {
                write!(f, "`{what}` was given an invalid header name")
            }
            ConfigError::BufferTooSmall => f.write_str(
                "`max_buffered_bytes` must hold one request and one response \
                 (`max_request_body + max_response_body`)",
            ),
        }
    }
}

impl std::error::Error for ConfigError {}

/// What the layer does when its store fails (unreachable, timed out).
///
/// A store that is full is not a failure: a new key it has no room for is always refused
/// with 503 [`RejectionKind::IdempotencyStoreFull`](crate::RejectionKind::IdempotencyStoreFull),
/// whatever the policy, since running it would leave no record to stop a second run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum FailurePolicy {
    /// Refuse the request with 503
    /// [`RejectionKind::StoreUnavailable`](crate::RejectionKind::StoreUnavailable) (the
    /// default): a request is never run without its key held. A handler whose lease can no
    /// longer be renewed is stopped before the lease runs out, with the same 503.
    #[default]
    FailClosed,
    /// Run the request without idempotency, and store nothing: availability over
    /// exactly-once. A handler whose lease can no longer be renewed goes on.
    FailOpen,
}

/// Turns the buffered request body back into the inner service's body type.
///
/// The layer reads the request body to fingerprint it and hands the same bytes on. The
/// default, [`FromBytes`], fits every body that is `From<Bytes>` (axum's `Body`, `Full`);
/// any `Fn(Bytes) -> B` fits too, for example for tonic:
/// `|b| tonic::body::Body::new(http_body_util::Full::new(b))`. Request trailers, which HTTP
/// clients and gRPC unary calls do not send, are not carried over.
pub trait RebuildBody<B>: Clone + Send + Sync + 'static {
    /// A body that yields `bytes`.
    fn rebuild(&self, bytes: Bytes) -> B;
}

/// Rebuilds bodies that are `From<Bytes>`; the default [`RebuildBody`].
#[derive(Clone, Copy, Debug, Default)]
pub struct FromBytes;

impl<B: From<Bytes>> RebuildBody<B> for FromBytes {
    fn rebuild(&self, bytes: Bytes) -> B {
        B::from(bytes)
    }
}

impl<B, F> RebuildBody<B> for F
where
    F: Fn(Bytes) -> B + Clone + Send + Sync + 'static,
{
    fn rebuild(&self, bytes: Bytes) -> B {
        self(bytes)
    }
}

/// Configuration fixed at construction.
pub(crate) struct Config {
    pub(crate) header: HeaderName,
    pub(crate) methods: Vec<Method>,
    pub(crate) required: bool,
    pub(crate) scope: Scope,
    pub(crate) max_request_body: usize,
    pub(crate) max_response_body: usize,
    pub(crate) poll_interval: Duration,
    pub(crate) release_on_drop: bool,
    pub(crate) release_on_error: bool,
    pub(crate) store_failures: bool,
    pub(crate) store_refusals: bool,
    pub(crate) exclude: Vec<HeaderName>,
    pub(crate) policy: FailurePolicy,
}

/// Room kept in a record for the response's head (status, headers, trailers) besides its body,
/// when the layer checks that its largest response fits the store.
pub(crate) const HEAD_ALLOWANCE: usize = 16 << 10;

/// State shared by the layer, its services, their clones and the handle.
pub(crate) struct Shared {
    pub(crate) config: Config,
    ttl: AtomicU64,
    lease_ttl: AtomicU64,
    /// Nanoseconds to wait for a request in flight; 0 = answer 409 at once.
    wait: AtomicU64,
    pub(crate) stats: Counters,
    /// The bytes buffered in flight by every service this layer makes.
    pub(crate) buffers: Arc<BufferBudget>,
    /// The state of the generator that jitters `Retry-After` hints.
    rng: Rng,
    /// Whether the layer warned that keyed requests came without credentials.
    warned_anonymous: AtomicBool,
    /// The keys whose record this layer is writing in the background (the store failed as
    /// the handler answered): claims of them answer 409 without asking the store.
    pub(crate) writes: Arc<WritesInFlight>,
}

impl Shared {
    pub(crate) fn ttl(&self) -> Duration {
        Duration::from_nanos(self.ttl.load(Ordering::Relaxed))
    }

    pub(crate) fn lease_ttl(&self) -> Duration {
        Duration::from_nanos(self.lease_ttl.load(Ordering::Relaxed))
    }

    /// A `Retry-After` hint of at least `base` (floored at 1 s, capped at 60 s), jittered up
    /// to half as much again, so that refused clients do not come back in step.
    pub(crate) fn retry_hint(&self, base: Option<Duration>) -> Duration {
        let base = base
            .unwrap_or(Duration::from_secs(1))
            .clamp(Duration::from_secs(1), Duration::from_secs(60));
        let unit = self.rng.next_f64();
        base + base.mul_f64(0.5 * unit)
    }

    /// The wait told to a repeat that meets its key in flight (409 `IdempotencyInFlight`):
    /// uniform between half and all of one second (or of the lease's time to live, if
    /// shorter), so that the repeats of many clients do not come back in step. HTTP's
    /// `Retry-After` counts whole seconds, so it reads 1 there; gRPC's
    /// `grpc-retry-pushback-ms` and the rejection's `retry_after` keep the jitter.
    pub(crate) fn in_flight_hint(&self) -> Duration {
        let bound = self.lease_ttl().min(Duration::from_secs(1));
        bound.mul_f64(0.5 + 0.5 * self.rng.next_f64())
    }

    /// Counts a keyed request that carries none of the credentials its scope reads, and warns
    /// once per layer: all such requests share one key space.
    #[cold]
    pub(crate) fn anonymous(&self) {
        Counters::bump(&self.stats.anonymous);
        // A load first: once warned, no read-modify-write on every anonymous request.
        if !self.warned_anonymous.load(Ordering::Relaxed)
            && !self.warned_anonymous.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(
                scope = ?self.config.scope,
                "a keyed request carries no credentials, so it shares one anonymous idempotency \
                 key space with every other such request (one caller may be replayed another's \
                 response): if callers authenticate otherwise than by `Authorization`, scope keys \
                 by what tells them apart with `.scope(...)` or `.scope_by_header(...)`, or, if \
                 one principal alone reaches this service, say so with `.unscoped()`; \
                 warned once per layer, counted in `IdempotencyStats::anonymous`"
            );
        }
    }

    pub(crate) fn wait(&self) -> Option<Duration> {
        match self.wait.load(Ordering::Relaxed) {
            0 => None,
            n => Some(Duration::from_nanos(n)),
        }
    }
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) executed: AtomicU64,
    pub(crate) replayed: AtomicU64,
    pub(crate) unreplayable: AtomicU64,
    pub(crate) in_flight: AtomicU64,
    pub(crate) mismatched: AtomicU64,
    pub(crate) invalid: AtomicU64,
    pub(crate) too_large: AtomicU64,
    pub(crate) not_stored: AtomicU64,
    pub(crate) store_errors: AtomicU64,
    pub(crate) store_full: AtomicU64,
    pub(crate) buffer_rejected: AtomicU64,
    pub(crate) anonymous: AtomicU64,
}

impl Counters {
    #[inline]
    pub(crate) fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// Applies idempotency keys to requests: see the [module docs](super).
///
/// Made with [`IdempotencyLayer::new`] (defaults) or [`IdempotencyLayer::builder`].
///
/// # Clone
///
/// Clones, and every service the layer makes, share one store, one configuration and one
/// set of figures: a key claimed through one route's service is in flight for all of them.
pub struct IdempotencyLayer<St, M = FromBytes> {
    store: St,
    shared: Arc<Shared>,
    rebuild: M,
}

impl<St: Clone, M: Clone> Clone for IdempotencyLayer<St, M> {
    fn clone(&self) -> Self {
        IdempotencyLayer {
            store: self.store.clone(),
            shared: self.shared.clone(),
            rebuild: self.rebuild.clone(),
        }
    }
}

impl<St: fmt::Debug, M> fmt::Debug for IdempotencyLayer<St, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.shared.config;
        f.debug_struct("IdempotencyLayer")
            .field("store", &self.store)
            .field("header", &c.header)
            .field("methods", &c.methods)
            .field("required", &c.required)
            .field("scope", &c.scope)
            .field("ttl", &self.shared.ttl())
            .field("lease_ttl", &self.shared.lease_ttl())
            .field("wait_for_in_flight", &self.shared.wait())
            .finish_non_exhaustive()
    }
}

impl<St: Store> IdempotencyLayer<St> {
    /// A layer with the default configuration (see [`IdempotencyBuilder`]).
    ///
    /// The largest response kept is 1 MiB, or less if the store promises room only for
    /// smaller records ([`Store::max_record_len`]); [`IdempotencyLayer::builder`] instead
    /// refuses such a store with [`ConfigError::ResponseExceedsStore`].
    pub fn new(store: St) -> Self {
        let mut b = IdempotencyLayer::builder(store);
        if let Some(room) = b.store.max_record_len() {
            b.max_response_body = b
                .max_response_body
                .min(room.saturating_sub(HEAD_ALLOWANCE))
                .max(1);
        }
        b.build().expect("the default configuration is valid")
    }

    /// A builder, to configure the layer.
    pub fn builder(store: St) -> IdempotencyBuilder<St> {
        IdempotencyBuilder {
            store,
            rebuild: FromBytes,
            header: HeaderName::from_static("idempotency-key"),
            methods: vec![Method::POST, Method::PATCH],
            required: false,
            scope: Scope::credentials(),
            max_request_body: 1 << 20,
            max_response_body: 1 << 20,
            max_buffered: 256 << 20,
            ttl: Duration::from_secs(24 * 60 * 60),
            lease_ttl: Duration::from_secs(60),
            wait: None,
            poll_interval: Duration::from_millis(20),
            release_on_drop: false,
            release_on_error: false,
            store_failures: false,
            store_refusals: false,
            exclude: Vec::new(),
            policy: FailurePolicy::FailClosed,
            bad_header: None,
        }
    }
}

impl<St, M> IdempotencyLayer<St, M> {
    /// A handle to read figures and change settings at run time.
    pub fn handle(&self) -> IdempotencyHandle {
        IdempotencyHandle {
            shared: self.shared.clone(),
        }
    }

    /// The store.
    pub fn store(&self) -> &St {
        &self.store
    }

    #[cfg(test)]
    pub(crate) fn shared(&self) -> &Shared {
        &self.shared
    }
}

impl<S, St: Clone, M: Clone> Layer<S> for IdempotencyLayer<St, M> {
    type Service = Idempotency<S, St, M>;

    fn layer(&self, inner: S) -> Self::Service {
        Idempotency::new(
            inner,
            self.store.clone(),
            self.shared.clone(),
            self.rebuild.clone(),
        )
    }
}

/// Configures an [`IdempotencyLayer`]; made by [`IdempotencyLayer::builder`].
///
/// Defaults: header `Idempotency-Key`; methods POST and PATCH; a missing key passes through;
/// keys scoped by the caller's credentials (a digest of the `Authorization` header, see
/// [`scope`](IdempotencyBuilder::scope)); request and response bodies up to 1 MiB, and
/// 256 MiB buffered in flight by the whole layer (replays included); records kept 24 hours;
/// leases of 60 seconds; a repeat in flight gets 409 at once, with a `Retry-After`; a request
/// dropped mid-handler keeps its lease until it expires (see
/// [`release_on_drop`](IdempotencyBuilder::release_on_drop)); an error from below that is not
/// a refusal before the handler ran records the key as run, never to run again (see
/// [`release_on_error`](IdempotencyBuilder::release_on_error)); 2xx, 3xx and 4xx responses are
/// stored, except failures (5xx, 429, gRPC failure statuses; see
/// [`store_failures`](IdempotencyBuilder::store_failures)) and refusals of the caller (401,
/// 403, 407, 421, 425, 429, gRPC `UNAUTHENTICATED`, `PERMISSION_DENIED`, `RESOURCE_EXHAUSTED`,
/// `ABORTED`; see [`store_refusals`](IdempotencyBuilder::store_refusals)); `Set-Cookie` and
/// hop-by-hop headers and trailers are not stored; a failing store gives 503.
pub struct IdempotencyBuilder<St, M = FromBytes> {
    store: St,
    rebuild: M,
    header: HeaderName,
    methods: Vec<Method>,
    required: bool,
    scope: Scope,
    max_request_body: usize,
    max_response_body: usize,
    max_buffered: usize,
    ttl: Duration,
    lease_ttl: Duration,
    wait: Option<Duration>,
    poll_interval: Duration,
    release_on_drop: bool,
    release_on_error: bool,
    store_failures: bool,
    store_refusals: bool,
    exclude: Vec<HeaderName>,
    policy: FailurePolicy,
    /// A setting was given an invalid header name: `build` refuses it.
    bad_header: Option<&'static str>,
}

impl<St: fmt::Debug, M> fmt::Debug for IdempotencyBuilder<St, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyBuilder")
            .field("store", &self.store)
            .field("header", &self.header)
            .field("methods", &self.methods)
            .field("required", &self.required)
            .field("scope", &self.scope)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl<St: Store, M> IdempotencyBuilder<St, M> {
    /// The header that carries the key (default `Idempotency-Key`; gRPC metadata
    /// `idempotency-key` is the same header).
    pub fn header(mut self, name: HeaderName) -> Self {
        self.header = name;
        self
    }

    /// The methods the layer applies to (default POST and PATCH); others pass through.
    pub fn methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.methods = methods.into_iter().collect();
        self
    }

    /// Refuse requests of those methods that carry no key, with 400
    /// [`RejectionKind::IdempotencyKeyMissing`](crate::RejectionKind::IdempotencyKeyMissing).
    pub fn required(mut self) -> Self {
        self.required = true;
        self
    }

    /// Scopes keys by a value drawn from the request head (tenant, API key, principal): the
    /// store key is (scope, key), so a request only ever meets records of its own scope.
    ///
    /// **The function replaces the default scope**, it does not add to it. The default scopes
    /// by the caller's credentials: a digest (SHA-1, stable across processes) of every
    /// `Authorization` header value, which is also where gRPC carries `authorization`
    /// metadata. Two requests with different `Authorization` values, or one with and one
    /// without, never see each other's records: no replay, no 409, no 422. Requests without
    /// `Authorization` share one anonymous scope (counted in
    /// [`IdempotencyStats::anonymous`], and warned about once). Cookies are not part of the
    /// default (a browser's unrelated cookies change between its retries); see
    /// [`scope_by_cookie`](Self::scope_by_cookie), and, for an API key header,
    /// [`scope_by_header`](Self::scope_by_header).
    ///
    /// Set a scope function when the principal is elsewhere (a client certificate, an
    /// extension your authentication layer adds), or when a client's token
    /// can change between its retries (a refreshed OAuth token is other credentials to the
    /// default, so the retry would run again): it must tell apart every caller who must not
    /// see another's responses. The value is kept in the store key as it
    /// is: return a digest (or an opaque id) rather than a secret.
    ///
    /// ```
    /// use tower_bulwark::idempotency::{IdempotencyLayer, MemoryStore};
    ///
    /// let layer = IdempotencyLayer::builder(MemoryStore::default())
    ///     // The tenant id that the authentication layer above put in the request.
    ///     .scope(|head: &http::request::Parts| {
    ///         head.headers.get("x-tenant-id").map(|v| v.as_bytes().to_vec()).unwrap_or_default()
    ///     })
    ///     .build()
    ///     .expect("valid configuration");
    /// # let _ = layer;
    /// ```
    pub fn scope<F, T>(mut self, f: F) -> Self
    where
        F: Fn(&Parts) -> T + Send + Sync + 'static,
        T: Into<Bytes>,
    {
        self.scope = Scope::Custom(Arc::new(move |p: &Parts| f(p).into()));
        self
    }

    /// Scopes keys by the caller's credentials, as the default does, and by the cookie `name`
    /// too (a session cookie): two requests share records only when their `Authorization`
    /// headers and their `name` cookies are equal. Other cookies are ignored. Like the
    /// default, the scope is a digest: the cookie's value is never stored. Replaces a
    /// [`scope`](Self::scope) function set before.
    ///
    /// Combines with [`scope_by_header`](Self::scope_by_header).
    pub fn scope_by_cookie(mut self, name: impl Into<String>) -> Self {
        self.scope = self.scope.with_cookie(name.into());
        self
    }

    /// Scopes keys by the caller's credentials, as the default does, and by the request
    /// header `name` too: for callers that authenticate with an API key header (`x-api-key`)
    /// rather than `Authorization`. Two requests share records only when their
    /// `Authorization` headers and their `name` headers are equal (absent counting as a value
    /// of its own). Like the default, the scope is a digest: the header's value is never
    /// stored. Call it again to add more headers; combines with
    /// [`scope_by_cookie`](Self::scope_by_cookie), and replaces a [`scope`](Self::scope)
    /// function set before.
    ///
    /// ```
    /// use tower_bulwark::idempotency::{IdempotencyLayer, MemoryStore};
    ///
    /// let layer = IdempotencyLayer::builder(MemoryStore::default())
    ///     .scope_by_header("x-api-key")
    ///     .build()
    ///     .expect("valid configuration");
    /// # let _ = layer;
    /// ```
    ///
    /// A name that is not a valid header name makes [`build`](Self::build) fail with
    /// [`ConfigError::InvalidHeaderName`].
    pub fn scope_by_header<N: TryInto<HeaderName>>(mut self, name: N) -> Self {
        match name.try_into() {
            Ok(name) => self.scope = self.scope.with_header(name),
            Err(_) => self.bad_header = Some("scope_by_header"),
        }
        self
    }

    /// Gives every caller **one key space**: a caller that sends another's key with the same
    /// payload receives that caller's stored response, without the handler (and its
    /// authorization check) running, and a 409 or 422 tells it that the key is in use.
    ///
    /// Only for a service that a single principal can reach (an internal queue consumer, a
    /// service behind one trusted client), or whose responses are the same for every caller.
    /// Replaces the default credential scope and any [`scope`](Self::scope) function.
    pub fn unscoped(mut self) -> Self {
        self.scope = Scope::Unscoped;
        self
    }

    /// The largest request body buffered for the fingerprint (default 1 MiB); larger gets
    /// 413 [`RejectionKind::PayloadTooLarge`](crate::RejectionKind::PayloadTooLarge) and the
    /// handler does not run.
    pub fn max_request_body(mut self, bytes: usize) -> Self {
        self.max_request_body = bytes;
        self
    }

    /// The largest response body kept for replay (default 1 MiB). A response whose body is not
    /// ready at once is handed on as it streams with a copy kept, and recorded at its end if
    /// it fits; if its copy grows past this, it goes on as below. A larger response is
    /// passed on whole, as it streams, and how its body ends decides: one that ends well, is
    /// dropped before its end, or fails (a body error: the handler had answered, so it ran)
    /// records the key as completed with a response too large to keep (the record is written
    /// as the body ends, in the background for a remote store), and repeats get 409
    /// [`RejectionKind::IdempotencyResponseNotStored`](crate::RejectionKind::IdempotencyResponseNotStored),
    /// never a second run; one that ends with a gRPC failure status in its trailers (or, for
    /// a gRPC response, with no status at all) releases the key, as under the cap. Until its
    /// end the key is held (for as long as a record would be, however slowly the client
    /// reads), and repeats get 409
    /// [`IdempotencyInFlight`](crate::RejectionKind::IdempotencyInFlight).
    pub fn max_response_body(mut self, bytes: usize) -> Self {
        self.max_response_body = bytes;
        self
    }

    /// The most bytes the whole layer buffers in flight (default 256 MiB), shared by every
    /// service it makes, their clones and every route it is applied to. A keyed request
    /// reserves its request body as it reads it, and room for a whole response
    /// (`max_response_body`) before its handler runs; the room is given back as the response
    /// is handed on (a response handed on as it streams keeps it until its body ends or
    /// grows past the cap), or when anything is dropped. A request that finds no room is refused
    /// with 503 [`RejectionKind::Overloaded`](crate::RejectionKind::Overloaded) and a jittered
    /// `Retry-After`, before it runs. So at most `max_buffered_bytes / max_response_body`
    /// keyed handlers run at once (256 with the defaults). A replay reserves its body's
    /// length while it holds it (until the body is handed on or dropped), and is refused the
    /// same way when there is no room: slow clients holding unread replays (each a copy of its
    /// own from a remote store) cannot hold more than the bound either.
    pub fn max_buffered_bytes(mut self, bytes: usize) -> Self {
        self.max_buffered = bytes;
        self
    }

    /// How long a completed response is replayed (default 24 hours).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// How long a lease lives if its owner stops renewing it, for example because the process
    /// crashed (default 60 seconds). While the handler runs the layer renews the lease every
    /// third of this, so a handler may run longer; a shorter lease frees a crashed owner's key
    /// sooner, at the cost of more renewals (see the [module docs](super#leases)).
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl;
        self
    }

    /// A repeat that arrives while the first request is in flight waits up to `max` for it
    /// and gets its response replayed, instead of 409 at once. If the first fails and
    /// releases the key, the waiter runs the request itself. While it waits it keeps the
    /// readiness it reserved from the inner service (a concurrency permit below, say), so
    /// keep `max` short, or place the limiter above this layer.
    pub fn wait_for_in_flight(mut self, max: Duration) -> Self {
        self.wait = Some(max);
        self
    }

    /// How often a waiting repeat asks the store again (default 20 ms).
    pub fn wait_poll_interval(mut self, every: Duration) -> Self {
        self.poll_interval = every;
        self
    }

    /// Whether a first request whose future is dropped (client gone, a timeout above) before
    /// its handler has answered gives its key up at once (`true`), so that a repeat runs the
    /// handler again, or keeps its lease until it expires (`false`, the default).
    ///
    /// By default the layer refuses rather than risks a second run: the handler may already
    /// have had its effect (the row written, the payment sent) when the request was dropped,
    /// so a repeat gets 409 [`IdempotencyInFlight`](crate::RejectionKind::IdempotencyInFlight),
    /// (each with a jittered `Retry-After` of about a second), until the lease
    /// expires ([`lease_ttl`](Self::lease_ttl), 60 s; renewals stop with the dropped future),
    /// and runs afterwards. Choose `true` only for handlers that have no effect until they
    /// answer, or whose effects are themselves idempotent. (Dropped after the handler
    /// answered, the key is never released either way.) An error from the inner service is
    /// not a drop: see [`release_on_error`](Self::release_on_error).
    pub fn release_on_drop(mut self, yes: bool) -> Self {
        self.release_on_drop = yes;
        self
    }

    /// Whether an error from the inner service that is not provably a refusal before the
    /// handler ran gives the key up at once (`true`), so that a repeat runs the handler
    /// again, or records the key as run with its response not kept (`false`, the default).
    ///
    /// An error releases the key whatever this says when a layer of this crate below refused
    /// the request before it ran: the error is a [`Rejection`](crate::Rejection) of a kind
    /// that refuses before running (rate limited, overloaded, circuit open, the idempotency
    /// and body refusals, a store down before anything ran) for a request that layer marked
    /// refused, or any error for a request a layer of this crate dropped while it still held
    /// it (see the module's "Whose refusal"). Any other error (tower's `Elapsed` from a `timeout` below
    /// this layer, tower's `load_shed` `Overloaded`, a rejection the handler returns, the
    /// handler's own error, a `Buffer`'s worker gone) may come from a handler that has had
    /// its effect, so by default its key is recorded as run:
    /// repeats get 409
    /// [`IdempotencyResponseNotStored`](crate::RejectionKind::IdempotencyResponseNotStored)
    /// for the record's time to live, and never run again. Choose `true` only for handlers
    /// whose errors always mean "nothing was done", or whose effects are themselves
    /// idempotent.
    pub fn release_on_error(mut self, yes: bool) -> Self {
        self.release_on_error = yes;
        self
    }

    /// Store failing responses too (5xx, 429, gRPC `UNAVAILABLE`, `INTERNAL`,
    /// `DEADLINE_EXCEEDED`, `UNKNOWN`, `DATA_LOSS`, `RESOURCE_EXHAUSTED`). By default they
    /// are not stored and the lease is released, so the client can retry.
    pub fn store_failures(mut self, yes: bool) -> Self {
        self.store_failures = yes;
        self
    }

    /// Store responses that refuse the caller too: 401, 403, 407 (credentials missing or
    /// refused), 421 (misdirected), 425 (too early: not run from TLS early data), 429
    /// (throttled), and gRPC `UNAUTHENTICATED`,
    /// `PERMISSION_DENIED`, `RESOURCE_EXHAUSTED` and `ABORTED` (which this crate itself
    /// answers for "try again"). By default they are not stored and the lease is released:
    /// such a request did not run for its caller, and storing it would let a client with
    /// forged credentials (each a scope of its own) fill the store for every caller. 429 and
    /// `RESOURCE_EXHAUSTED` are failures as well: they are stored only with both this and
    /// [`store_failures`](Self::store_failures). Every other 2xx, 3xx and 4xx response is
    /// stored (a 404, a 409, a 422 the handler answered are its outcome).
    pub fn store_refusals(mut self, yes: bool) -> Self {
        self.store_refusals = yes;
        self
    }

    /// A response header (or trailer) to leave out of stored records, besides `Set-Cookie`
    /// and the hop-by-hop headers.
    pub fn exclude_header(mut self, name: HeaderName) -> Self {
        self.exclude.push(name);
        self
    }

    /// What to do when the store fails (default [`FailurePolicy::FailClosed`]).
    pub fn on_store_error(mut self, policy: FailurePolicy) -> Self {
        self.policy = policy;
        self
    }

    /// How the buffered request body is turned back into the inner service's body type
    /// (default [`FromBytes`]).
    pub fn rebuild_body<M2>(self, rebuild: M2) -> IdempotencyBuilder<St, M2> {
        IdempotencyBuilder {
            store: self.store,
            rebuild,
            header: self.header,
            methods: self.methods,
            required: self.required,
            scope: self.scope,
            max_request_body: self.max_request_body,
            max_response_body: self.max_response_body,
            max_buffered: self.max_buffered,
            ttl: self.ttl,
            lease_ttl: self.lease_ttl,
            wait: self.wait,
            poll_interval: self.poll_interval,
            release_on_drop: self.release_on_drop,
            release_on_error: self.release_on_error,
            store_failures: self.store_failures,
            store_refusals: self.store_refusals,
            exclude: self.exclude,
            policy: self.policy,
            bad_header: self.bad_header,
        }
    }

    /// Builds the layer.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] when a duration or body limit is zero, no method is given, a header
    /// name is invalid,
    /// `max_buffered_bytes` cannot hold one request and one response, or the largest kept
    /// response does not fit the store ([`ConfigError::ResponseExceedsStore`]).
    pub fn build(self) -> Result<IdempotencyLayer<St, M>, ConfigError> {
        if let Some(what) = self.bad_header {
            return Err(ConfigError::InvalidHeaderName(what));
        }
        if self.methods.is_empty() {
            return Err(ConfigError::NoMethods);
        }
        for (d, name) in [
            (self.ttl, "ttl"),
            (self.lease_ttl, "lease_ttl"),
            (self.poll_interval, "wait_poll_interval"),
        ] {
            if d.is_zero() {
                return Err(ConfigError::Zero(name));
            }
        }
        if self.wait.is_some_and(|w| w.is_zero()) {
            return Err(ConfigError::Zero("wait_for_in_flight"));
        }
        if self.max_request_body == 0 {
            return Err(ConfigError::Zero("max_request_body"));
        }
        if self.max_response_body == 0 {
            return Err(ConfigError::Zero("max_response_body"));
        }
        if self.max_buffered == 0 {
            return Err(ConfigError::Zero("max_buffered_bytes"));
        }
        if self.max_buffered < self.max_request_body.saturating_add(self.max_response_body) {
            return Err(ConfigError::BufferTooSmall);
        }
        if let Some(room) = self.store.max_record_len() {
            if self.max_response_body.saturating_add(HEAD_ALLOWANCE) > room {
                return Err(ConfigError::ResponseExceedsStore {
                    max_response_body: self.max_response_body,
                    store_max_record: room,
                });
            }
        }
        let shared = Shared {
            config: Config {
                header: self.header,
                methods: self.methods,
                required: self.required,
                scope: self.scope,
                max_request_body: self.max_request_body,
                max_response_body: self.max_response_body,
                poll_interval: self.poll_interval,
                release_on_drop: self.release_on_drop,
                release_on_error: self.release_on_error,
                store_failures: self.store_failures,
                store_refusals: self.store_refusals,
                exclude: self.exclude,
                policy: self.policy,
            },
            ttl: AtomicU64::new(duration_nanos(self.ttl)),
            lease_ttl: AtomicU64::new(duration_nanos(self.lease_ttl)),
            wait: AtomicU64::new(self.wait.map_or(0, duration_nanos)),
            stats: Counters::default(),
            buffers: BufferBudget::new(self.max_buffered),
            rng: Rng::from_entropy(),
            warned_anonymous: AtomicBool::new(false),
            writes: Arc::default(),
        };
        Ok(IdempotencyLayer {
            store: self.store,
            shared: Arc::new(shared),
            rebuild: self.rebuild,
        })
    }
}

/// Reads figures and changes settings of an [`IdempotencyLayer`] at run time; cheap to clone.
#[derive(Clone)]
pub struct IdempotencyHandle {
    shared: Arc<Shared>,
}

impl fmt::Debug for IdempotencyHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyHandle")
            .field("stats", &self.stats())
            .finish()
    }
}

/// Figures of an [`IdempotencyLayer`], counted since it was built.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct IdempotencyStats {
    /// Keyed requests that claimed their key and ran.
    pub executed: u64,
    /// Repeats answered with a stored response.
    pub replayed: u64,
    /// Repeats refused (409) because the first response was too large to keep: it ran once
    /// and is not run again.
    pub unreplayable: u64,
    /// Repeats refused (409) because the first was still in flight.
    pub in_flight_rejected: u64,
    /// Keys reused with another payload (422).
    pub mismatched: u64,
    /// Keys malformed, repeated or missing where required (400).
    pub invalid_keys: u64,
    /// Request bodies over the limit (413).
    pub too_large: u64,
    /// Responses not stored (failures), their lease released.
    pub not_stored: u64,
    /// Store operations that failed.
    pub store_errors: u64,
    /// New keys refused (503) because the store had no room for them, or their scope held its
    /// share.
    pub store_full: u64,
    /// Keyed requests refused (503) because the layer's buffers in flight were full.
    pub buffer_rejected: u64,
    /// Keyed requests without any of the credentials their scope reads (no `Authorization`,
    /// nor the header or cookie added with
    /// [`scope_by_header`](IdempotencyBuilder::scope_by_header) and
    /// [`scope_by_cookie`](IdempotencyBuilder::scope_by_cookie)): they all share one anonymous
    /// key space. Not counted under a [`scope`](IdempotencyBuilder::scope) function or
    /// [`unscoped`](IdempotencyBuilder::unscoped).
    pub anonymous: u64,
    /// Bytes the layer's requests hold reserved for buffering now.
    pub buffered_bytes: usize,
}

impl IdempotencyHandle {
    /// The figures so far.
    pub fn stats(&self) -> IdempotencyStats {
        let s = &self.shared.stats;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        IdempotencyStats {
            executed: get(&s.executed),
            replayed: get(&s.replayed),
            unreplayable: get(&s.unreplayable),
            in_flight_rejected: get(&s.in_flight),
            mismatched: get(&s.mismatched),
            invalid_keys: get(&s.invalid),
            too_large: get(&s.too_large),
            not_stored: get(&s.not_stored),
            store_errors: get(&s.store_errors),
            store_full: get(&s.store_full),
            buffer_rejected: get(&s.buffer_rejected),
            anonymous: get(&s.anonymous),
            buffered_bytes: self.shared.buffers.used(),
        }
    }

    /// How long completed responses are kept, from the next completion on.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Zero`] for a zero duration.
    pub fn set_ttl(&self, ttl: Duration) -> Result<(), ConfigError> {
        if ttl.is_zero() {
            return Err(ConfigError::Zero("ttl"));
        }
        self.shared
            .ttl
            .store(duration_nanos(ttl), Ordering::Relaxed);
        Ok(())
    }

    /// The time to live of new leases.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Zero`] for a zero duration.
    pub fn set_lease_ttl(&self, ttl: Duration) -> Result<(), ConfigError> {
        if ttl.is_zero() {
            return Err(ConfigError::Zero("lease_ttl"));
        }
        self.shared
            .lease_ttl
            .store(duration_nanos(ttl), Ordering::Relaxed);
        Ok(())
    }

    /// Whether, and how long, repeats wait for a request in flight (`None`: 409 at once).
    pub fn set_wait_for_in_flight(&self, max: Option<Duration>) {
        let n = max.map_or(0, |d| duration_nanos(d).max(1));
        self.shared.wait.store(n, Ordering::Relaxed);
    }

    /// The current time to live of completed responses.
    pub fn ttl(&self) -> Duration {
        self.shared.ttl()
    }
}

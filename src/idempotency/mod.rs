//! Runs a request that carries an `Idempotency-Key` once, and replays its stored response to
//! every repeat.
//!
//! # Why
//!
//! A client that sends a POST and loses the connection cannot tell whether the order was
//! placed. Retrying may place it twice; not retrying may lose it. With an idempotency key the
//! client can retry safely: the server runs the first request, stores its response under the
//! key, and answers repeats with the stored response. The semantics follow the IETF
//! `Idempotency-Key` header draft (draft-ietf-httpapi-idempotency-key-header) and Stripe's
//! documented behaviour:
//!
//! | request | answer |
//! |---|---|
//! | POST or PATCH (configurable) with a new key | runs; a successful response is stored (24 h) and returned as it ran. A response whose body is ready at once is read whole first; one whose body is not (a stream, server-sent events) is handed on at its head and passes each frame on as it comes, with a copy kept: its end writes the record, and until then its key is held (repeats get 409) |
//! | repeat, same payload, after completion | the stored response, identical in status, headers, body and trailers, plus `Idempotent-Replayed: true`; the handler does not run (503 [`Overloaded`](crate::RejectionKind::Overloaded) if its body does not fit in [`max_buffered_bytes`](IdempotencyBuilder::max_buffered_bytes)) |
//! | repeat while the first is in flight | 409 with a jittered `Retry-After` of about a second (at most the lease's time to live) and the mark [`IDEMPOTENCY_KEY_IN_FLIGHT`](crate::rejection::IDEMPOTENCY_KEY_IN_FLIGHT), which this crate's `RetryPolicy::http()` and `grpc()` retry after the wait; or with [`wait_for_in_flight`](IdempotencyBuilder::wait_for_in_flight) waits and replays. A key whose first request was dropped mid-handler stays in flight until its lease expires |
//! | same key, another payload | 422 |
//! | key malformed (not 1 to 255 visible ASCII characters), or sent twice | 400 |
//! | key missing | passes through, or 400 with [`required`](IdempotencyBuilder::required) |
//! | body over the buffer limit (1 MiB) | 413; the handler does not run |
//! | body that cannot be read (the client reset the stream, a broken encoding) | 400 [`BadRequestBody`](crate::RejectionKind::BadRequestBody); the key is not claimed and the handler does not run |
//! | a new key, and the store has no room for it (or its scope holds its share) | 503 [`IdempotencyStoreFull`](crate::RejectionKind::IdempotencyStoreFull) with a jittered `Retry-After`; the handler does not run, and no completed key is forgotten to make room |
//! | the layer already buffers [`max_buffered_bytes`](IdempotencyBuilder::max_buffered_bytes) (256 MiB) in flight | 503 [`Overloaded`](crate::RejectionKind::Overloaded) with a jittered `Retry-After`; the handler does not run |
//! | the handler fails: 5xx, 429, gRPC failure status (in the trailers, in the head of a trailers-only response, in the trailer frame that ends a gRPC-Web body), or a gRPC response that ends with no status at all | nothing stored; the key is released so the client can retry ([`store_failures`](IdempotencyBuilder::store_failures) stores them) |
//! | a layer of this crate below refuses the request before it runs: the error is a [`Rejection`](crate::Rejection) of a refusing kind (rate limited, overloaded, circuit open, ...), and the request is marked refused (see [Whose refusal](#whose-refusal)) | nothing stored; the key is released so the client can retry |
//! | the handler returns a `Rejection` as its error (one its own client got, forwarded with `?` or wrapped), or tower's `load_shed` `Overloaded` (which cannot say whose it is) | the handler may have had its effect: as for any other error below |
//! | a `timeout` between this layer and a layer of this crate that holds the request (a [`BackpressureLayer`](crate::BackpressureLayer) queue, a rate limit's wait for a turn or its Redis round trip) fires while the request is still held | the request never ran: the key is released (see [Whose refusal](#whose-refusal)) |
//! | any other error from below: tower's `Elapsed` from a `timeout` under this layer once the request may have run, the handler's own error | the handler may have had its effect: the key is recorded as run with its response not kept (repeats get 409 [`IdempotencyResponseNotStored`](crate::RejectionKind::IdempotencyResponseNotStored), never a second run); [`release_on_error(true)`](IdempotencyBuilder::release_on_error) releases it instead |
//! | the handler answered a head to store, then its body fails | the handler ran: the key is recorded as run with its response not kept (repeats get 409, never a second run) |
//! | the response refuses the caller or says it was not processed: 401, 403, 407, 421, 425, 429, gRPC `UNAUTHENTICATED`, `PERMISSION_DENIED`, `RESOURCE_EXHAUSTED`, `ABORTED` | nothing stored; the key is released: the request did not run for this caller, and forged credentials cannot fill the store ([`store_refusals`](IdempotencyBuilder::store_refusals) stores them) |
//! | any other response: 2xx, 3xx, another 4xx (404, 409, 422 from the handler), another gRPC status | stored and replayed |
//! | the response has more than 8,192 header (or trailer) values | passed on; the key is recorded as run with its response not kept (repeats get 409, never a second run) |
//! | the response is larger than [`max_response_body`](IdempotencyBuilder::max_response_body) | passed on as it streams; its body's end decides: a gRPC failure (a failure status in the trailers, or no status at all) releases the key, as under the cap; an end that went well, a body error, or a body dropped midway, records the key as completed with its response not kept (repeats get 409, never a second run) |
//! | the handler runs longer than the lease's time to live | the lease is renewed every third of it while the handler runs: repeats keep getting 409 |
//! | the first request's future is dropped (client gone, a timeout above) while the request is still held by a layer of this crate below (queued, waiting for its turn or for Redis) | the handler never saw it: the lease is given up at once |
//! | the first request's future is dropped (client gone, a timeout above) while its handler runs | the lease is kept until it expires (the handler may have had its effect): repeats get 409 (each with a jittered `Retry-After` of about a second) until it does, then run; [`release_on_drop(true)`](IdempotencyBuilder::release_on_drop) releases it at once instead |
//! | dropped after the handler answered (reading or storing its response) | never released: the record (or, for a body cut short, a record that the response was not kept) is written in the background |
//! | the store fails while the response is stored | the client gets the response; the key is never released and the write is tried again in the background while the lease lasts |
//! | the lease cannot be renewed (store unreachable) | failing closed, the handler is stopped before the lease can run out, and the client gets 503; failing open, it goes on |
//! | the process crashes mid-request | renewals stop and the lease expires after its time to live (60 s) |
//!
//! # Whose refusal
//!
//! A refusal releases the key only when it is provably this request's, made before the
//! handler ran. This layer (and `RejectionLayer`) puts a stamp in the request's extensions;
//! a layer of this crate that refuses the request drops it as refused, and one that holds it
//! (a [`BackpressureLayer`](crate::BackpressureLayer) queue, a rate limit's wait for a turn
//! or its Redis round trip) drops it as *held* if it is dropped before being passed on (a
//! `timeout` between fired). The stamp sees how the request it rides in was dropped, and
//! marks it. So:
//!
//! - a [`Rejection`](crate::Rejection) returned for a request marked refused is a refusal
//!   (key released); one the handler returns (made by its own client's layers for another
//!   request, after it may have had its effect) finds the request unmarked, and is the
//!   handler's error (key kept as run);
//! - an error (a timeout's `Elapsed`) for a request marked held is one the handler never saw
//!   (key released); and a request dropped from above while still held below gives its lease
//!   up at once, instead of keeping it for the lease's time to live.
//!
//! A layer between that sends copies of the request (a retry, a hedge) must copy its
//! extensions, as `http::request::Parts`' `Clone` does: a copy gets a stamp of its own, and
//! the original's marks then prove nothing (a copy may have run), so such a request is
//! treated as one that may have run. A copy made without the extensions cannot be seen. Nor
//! can a handler that forwards the very request it got to a client stack of this crate's
//! layers, or moves its extensions (`std::mem::take`) into a request of its own: the stamp
//! follows the extensions, and that request's refusal is taken for this one's, as for a
//! proxy. (Copy the extensions you propagate one by one, not the whole map.) tower's `load_shed` does
//! not mark what it sheds: put it above this layer, or use `BackpressureLayer`.
//!
//! The status of a response is taken at its word: a handler that answers a failure (5xx,
//! 429, a gRPC failure status) or a refusal is taken to have done nothing that must not run
//! twice, and its key is released so the client can retry. A handler that forwards an
//! upstream's failure or refusal after an effect of its own should answer with a status of
//! its own, or have those answers stored ([`store_failures`](IdempotencyBuilder::store_failures),
//! [`store_refusals`](IdempotencyBuilder::store_refusals)).
//!
//! Keys are accepted both as the draft's structured-field string (`"abc"`, quoted) and as the
//! bare token Stripe's clients send (`abc`); both name the same key. The fingerprint of a
//! request is its method, path and query, its body's `Content-Type` and `Content-Encoding`,
//! and body ([`Fingerprint`]). The body is buffered to
//! compute it and handed to the handler unchanged.
//!
//! **Keys are scoped by caller.** A key names a record only within its scope, and by default
//! the scope is the caller's credentials: a digest of the `Authorization` header (gRPC's
//! `authorization` metadata is the same header). A request with other credentials, or none,
//! never meets another caller's record: it is not replayed that caller's response, nor told by
//! a 409 or a 422 that the key is in use; it runs as a request of its own. The credentials are
//! never stored or logged: the store key holds their SHA-1 digest (stable, so replicas that
//! share a Redis store agree). Cookies are left out (a browser's unrelated cookies change
//! between its retries).
//!
//! **Callers without credentials share one scope.** Requests that carry none of the
//! credentials the scope reads (by default, no `Authorization`, or an empty one) are all one
//! anonymous caller to the layer: one of them can be replayed another's response. The layer
//! counts them
//! ([`IdempotencyStats::anonymous`]) and warns once (`tracing`) when it meets the first. If
//! your callers authenticate otherwise (an API-key header, a session cookie, mTLS), say how:
//!
//! - [`scope_by_header`](IdempotencyBuilder::scope_by_header) adds a named header (an API key,
//!   `x-api-key`) to the credentials, hashed like `Authorization`;
//! - [`scope_by_cookie`](IdempotencyBuilder::scope_by_cookie) adds one named session cookie
//!   to the credentials;
//! - [`scope`](IdempotencyBuilder::scope) replaces the default with a function of the request
//!   head (the tenant or principal your authentication layer put in the request), for
//!   credentials that are not in headers or tokens that are refreshed between a client's
//!   retries (to the default, a new token is a new caller);
//! - [`unscoped`](IdempotencyBuilder::unscoped) is the explicit opt-out, one key space for
//!   every caller, for a service that only one principal can reach.
//!
//! # How it differs from its neighbours
//!
//! The retry layer makes a client send a request again; this layer makes a server safe to
//! receive it again. Neither tower, governor, tower-resilience nor failsafe has an
//! idempotency layer. Unlike an HTTP cache, it stores only the outcome of unsafe methods,
//! keyed by the client's key and scope, never serves a response to a different payload, and
//! also works on a tonic server (gRPC metadata `idempotency-key`, stored trailers replayed).
//!
//! # Where to place this layer
//!
//! Below [`RejectionLayer`](crate::RejectionLayer) (which turns its rejections into 400, 409,
//! 413, 422 and 503 responses), and **above** the caller's rate limit and backpressure: a
//! replay costs no handler work, so a client's retry of a completed request (what the key is
//! for) gets its stored response, not a 429 or a 503, and does not spend the client's rate or
//! a concurrency permit; a new request still passes through them, and one they refuse is a
//! failure that releases its key (the client can retry it). Below authentication, so that a
//! scope function can read the principal. A limit per client address goes above this layer:
//! it costs nothing to check, and it bounds everything a client can make this layer do. This
//! is the order the crate's README, its lib docs and examples use:
//!
//! ```text
//! RejectionLayer -> per-address RateLimitLayer -> auth -> IdempotencyLayer
//!     -> per-caller RateLimitLayer -> BackpressureLayer -> handler
//! ```
//!
//! What this order costs: the work this layer does before the limits below see a request
//! is not limited by them. A replay is cheap (a store lookup, and for a remote store a copy of
//! the record), but a client that asks for the same replay in a loop is bounded only by the
//! per-address limit above, and the bytes of all replays held at once by
//! [`max_buffered_bytes`](IdempotencyBuilder::max_buffered_bytes) (503 over it). A new key's
//! request body is read (up to [`max_request_body`](IdempotencyBuilder::max_request_body),
//! within the same bound) and its key claimed before the caller's limit may refuse it; the
//! refusal releases the key at once. A full store refuses new keys before any of them run.
//!
//! A keyed request keeps the inner service that `poll_ready` made ready while its body is read
//! and its key is claimed, and calls it afterwards, as the tower contract asks. Below it,
//! prefer layers that reserve nothing in `poll_ready` (this crate's rate limit and
//! backpressure decide in `call`): under a `Buffer` or tower's `ConcurrencyLimit`, which take
//! a slot in `poll_ready`, a client that uploads its body slowly holds that slot meanwhile.
//!
//! # Example
//!
//! ```
//! use std::convert::Infallible;
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use std::sync::Arc;
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::{BodyExt, Full};
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_bulwark::idempotency::{IdempotencyLayer, MemoryStore};
//! use tower_bulwark::RejectionLayer;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let runs = Arc::new(AtomicUsize::new(0));
//! let counter = runs.clone();
//! let layer = IdempotencyLayer::builder(MemoryStore::default())
//!     .scope(|head: &http::request::Parts| {
//!         // The tenant, from whatever authenticated the request. This replaces the default
//!         // scope (the `Authorization` header): the function alone tells callers apart.
//!         head.headers.get("x-tenant").map(|v| v.as_bytes().to_vec()).unwrap_or_default()
//!     })
//!     .build()
//!     .expect("valid configuration");
//! let svc = ServiceBuilder::new()
//!     .layer(RejectionLayer::http())
//!     .layer(layer)
//!     .service_fn(move |_req: Request<Full<Bytes>>| {
//!         let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
//!         async move {
//!             let mut res = Response::new(Full::new(Bytes::from(format!("order {n}"))));
//!             *res.status_mut() = StatusCode::CREATED;
//!             Ok::<_, Infallible>(res)
//!         }
//!     });
//!
//! let order = || {
//!     Request::post("/orders")
//!         .header("idempotency-key", "\"8e03978e-40d5\"")
//!         .header("x-tenant", "acme")
//!         .body(Full::new(Bytes::from_static(b"{\"sku\":42}")))
//!         .unwrap()
//! };
//! let first = svc.clone().oneshot(order()).await.unwrap();
//! assert_eq!(first.status(), StatusCode::CREATED);
//! assert_eq!(first.into_body().collect().await.unwrap().to_bytes(), "order 1");
//!
//! let again = svc.clone().oneshot(order()).await.unwrap();
//! assert_eq!(again.status(), StatusCode::CREATED);
//! assert_eq!(again.headers()["idempotent-replayed"], "true");
//! assert_eq!(again.into_body().collect().await.unwrap().to_bytes(), "order 1");
//! assert_eq!(runs.load(Ordering::SeqCst), 1);
//! # }
//! ```
//!
//! # gRPC
//!
//! On a tonic server the key is the `idempotency-key` metadata (the same header), the stored
//! response includes its trailers (`grpc-status`; like headers, without `Set-Cookie`,
//! hop-by-hop names and [`exclude_header`](IdempotencyBuilder::exclude_header)'s), and with
//! [`RejectionLayer::grpc`](crate::RejectionLayer) the rejections become gRPC statuses
//! (`ABORTED`, `FAILED_PRECONDITION`, `INVALID_ARGUMENT`, `UNAVAILABLE`). tonic's body is not
//! `From<Bytes>`: give the builder
//! `.rebuild_body(|b| tonic::body::Body::new(http_body_util::Full::new(b)))`. A response is a
//! gRPC one by its `content-type` (`application/grpc...`); one that ends with no
//! `grpc-status` (in its trailers, or in the head of a trailers-only response) failed, as its
//! client reads it, and is not stored. gRPC-Web (`application/grpc-web`,
//! `application/grpc-web+proto`, tonic-web) carries its status in a trailer frame at the end
//! of the body: under the cap, that frame is read and judged as trailers are;
//! `application/grpc-web-text` (base64) is not decoded, so only a status in its head or HTTP
//! trailers is judged. Only unary calls make sense here: a streamed response passes on as it
//! streams, and is kept for replay only if it ends within
//! [`max_response_body`](IdempotencyBuilder::max_response_body).
//!
//! # Body types
//!
//! The request body is rebuilt from the buffered bytes by a [`RebuildBody`] (`From<Bytes>`
//! by default: axum's `Body`, `Full`). The response body must be `Unpin`, as axum's, tonic's,
//! hyper's and `Full` are; box any other (`http_body_util::combinators::UnsyncBoxBody`).
//! Responses come back as [`ReplayBody`].
//!
//! # Stores
//!
//! [`MemoryStore`] keeps leases and records in process, sharded, and bounded as a whole by
//! entries and by bytes, the bytes being what it really allocates (see
//! [its docs](MemoryStore#what-the-byte-bound-counts)). It never drops a completed record
//! before its time to live to make room: when it is full, a new key is refused with 503
//! [`IdempotencyStoreFull`](crate::RejectionKind::IdempotencyStoreFull) and a `Retry-After`
//! (the time until its earliest entry expires, at least 1 s and at most 60 s, jittered up to
//! half as much again so that refused clients do not return in step), and nothing runs. One
//! scope may hold at most a share of it (a quarter by default), so one tenant cannot fill it
//! for all; the keys of an [`unscoped`](IdempotencyBuilder::unscoped) layer, one key space
//! for everyone, may use the whole store. By default it holds 256 MiB: at the layer's 24 h
//! time to live, about 55,000 records of 4 KiB responses a day (0.64 keyed requests a second,
//! sustained, for every caller together; one scope a quarter of that); see
//! [its capacity](MemoryStore#capacity) to size it. The layer checks at build time that its largest kept response fits the store
//! ([`Store::max_record_len`]; [`ConfigError::ResponseExceedsStore`]).
//!
//! A store shared by replicas implements [`Store`]: atomic claim with an owner token,
//! compare-and-set complete, renew and release, time to live on every key, and records in the
//! [`Record`] encoding. When the store fails, the layer answers 503 (see [`FailurePolicy`]).
//!
//! # Leases
//!
//! A request that claims its key holds a lease of
//! [`lease_ttl`](IdempotencyBuilder::lease_ttl) (60 s) and renews it every third of that while
//! its handler runs, from the response future itself (with `tokio::time`, so paused time
//! drives it too; nothing is spawned), so a handler may run longer than the lease and no
//! repeat runs beside it. Renewing stops when the future completes or is dropped, so the
//! lease of a crashed process expires. A renewal that fails is tried again sooner (every
//! sixth); if none succeeds before the lease would run out, or the store says the lease is
//! lost, the layer can no longer promise that no other request holds the key. Failing closed
//! (the default), it refuses to go on, as the crate does whenever the choice is between
//! running twice and refusing: it stops the handler (drops its future) before the lease's
//! end and answers 503. Failing open, the handler goes on.
//!
//! Once the handler has answered with a response to store, the request has run, and its key
//! is never released: if the record cannot be written (the store down, the connection cut as
//! the command went out), the client still gets its response, the lease stays, and the write
//! is tried again in the background, under the owner token, past the lease's expiry: until
//! it lands, the store refuses it for good (another owner holds the key, or an error no
//! retry mends), or the record's time to live ([`ttl`](IdempotencyBuilder::ttl)) has passed.
//! A `complete` may land after its lease expired, as long as no one else holds the key (see
//! the [`Store`] contract). Meanwhile the lease is renewed every third of its time to live
//! whenever the store answers renewals (a full Redis does), and the layer answers its own
//! repeats of the key 409 without asking the store, then the replay once written (at most
//! [`MAX_WRITES_TRACKED`] keys are kept so; beyond, a `WARN` event). A background write
//! costs one task per request whose record the store refused.
//!
//! Across replicas, a store **unreachable** for longer than the lease cannot be made safe
//! without the store: no renewal reaches it, the lease expires there, and a repeat sent to
//! another replica once the store is back may claim the key and run again before the first
//! replica's write lands. Give [`lease_ttl`](IdempotencyBuilder::lease_ttl) room for the
//! store outages the service must ride out.
//!
//! A response handed on as it streams (its body not ready at once, or past
//! [`max_response_body`](IdempotencyBuilder::max_response_body)) leaves the response future
//! before its body ends: a task renews its lease (every third of
//! [`lease_ttl`](IdempotencyBuilder::lease_ttl)) for as long as the body lives, however
//! slowly the client reads, and stops with it; the body's end writes the record (or, for a
//! failure, releases the key). A process that crashes mid-stream leaves that key in flight
//! (409) for one lease, as any request it was running. (Outside a tokio runtime, where no
//! task can run, the lease is instead extended to the record's time to live
//! ([`ttl`](IdempotencyBuilder::ttl)) when the head is handed on.)
//!
//! # Buffers in flight
//!
//! Each keyed request buffers its request body (up to
//! [`max_request_body`](IdempotencyBuilder::max_request_body)) and its response (up to
//! [`max_response_body`](IdempotencyBuilder::max_response_body)). The bytes all of them
//! buffer at once are bounded for the whole layer by
//! [`max_buffered_bytes`](IdempotencyBuilder::max_buffered_bytes) (256 MiB by default), shared
//! by every service the layer makes, wherever it sits in the stack. A replay counts too: its
//! body is reserved while the response holds it (from a remote store it is a copy of its own),
//! and a replay that finds no room is refused with 503 like a new request. Reservations are
//! atomic (no lock), and given back when the request completes, fails, or is dropped at any
//! point, and when its response body is handed on or dropped. A response handed on as it
//! streams keeps its room (`max_response_body`) for the copy until its body ends (or grows
//! past the cap, or is dropped).
//!
//! # Time in tests
//!
//! The layer waits (for a request in flight) with `tokio::time`; the [`MemoryStore`] reads
//! its expiry clock from a [`Clock`](crate::clock::Clock). Under paused tokio time, build the
//! store with `MemoryStore::builder().clock(Clock::tokio())` and both follow `advance()`.
//!
//! # Cancel safety
//!
//! Dropping a response future while its handler runs (the client gone, a timeout above)
//! leaves its lease to expire: the handler may already have had its effect, and when the
//! choice is between running twice and refusing, the crate refuses. Renewals stop with the
//! future, so a repeat gets 409 (each with a jittered `Retry-After` of about a second) until
//! the lease expires, [`lease_ttl`](IdempotencyBuilder::lease_ttl) after it was
//! last claimed or renewed, and runs afterwards;
//! [`release_on_drop(true)`](IdempotencyBuilder::release_on_drop) gives the lease up at once
//! (in `Drop`) instead, for handlers that have no effect until they answer. Dropped earlier
//! (reading the request body, claiming), a request holds no lease. A claim still
//! on its way to a remote store is released by the store with its owner token if it lands
//! late. Dropping it after the handler answered (reading its response body, storing it) never
//! releases: the handler has run, so its record, or a record that its response was not kept,
//! is written under the lease in the background, and the key is never run twice.

mod body;
mod budget;
mod fingerprint;
pub mod future;
mod key;
mod layer;
mod record;
mod scope;
mod service;
pub mod store;

pub use self::body::ReplayBody;
pub use self::fingerprint::{Fingerprint, FINGERPRINT_VERSION};
pub use self::future::IDEMPOTENT_REPLAYED;
pub use self::layer::{
    ConfigError, FailurePolicy, FromBytes, IdempotencyBuilder, IdempotencyHandle, IdempotencyLayer,
    IdempotencyStats, RebuildBody,
};
pub use self::record::{DecodeError, Record};
pub use self::service::Idempotency;
pub use self::store::{
    Claim, DetachedWrite, Lease, MemoryStore, MemoryStoreBuilder, MemoryStoreStats, Store,
    StoreError, StoreErrorKind, StoreKey, MAX_WRITES_TRACKED,
};
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use self::store::{RedisStore, RedisStoreConfigError, RedisStoreStats};

//! Token-bucket rate limiting (GCRA), global or per key, lock-free.
//!
//! [`RateLimitLayer::new`] puts one limit on every request through it;
//! [`RateLimitLayer::keyed`] puts one limit on each key that a function reads from the request
//! (an API key header, the client address, a path segment). A request over the limit is
//! refused at once with a [`Rejection`](crate::Rejection) of kind `RateLimited` whose
//! `retry_after` is the time until the next token, jittered (see below); put
//! [`RejectionLayer`](crate::RejectionLayer) above to answer it with a 429, `Retry-After` and
//! the `RateLimit` headers. Clients can [`wait_up_to`](RateLimitLayer::wait_up_to) a bound
//! instead.
//!
//! # Jittered hints
//!
//! Clients refused at one instant must not all come back at the next token, in lock step. So
//! a rejection's hints are the exact time until the next token plus a uniform random extra,
//! never less than the exact time (a client that waits one out is admitted, if no one took
//! the token first), spread over at least two units of the resolution they are written in,
//! so that the spread survives rounding up: [`retry_after`](crate::Rejection::retry_after)
//! (what `grpc-retry-pushback-ms` carries, in milliseconds, and what in-process callers wait)
//! adds `[0, max(exact, 2 ms))`, and the whole seconds of HTTP's `Retry-After`
//! ([`retry_after_secs`](crate::Rejection::retry_after_secs)) add `[0, max(exact, 2 s))`, one
//! draw for both. The `RateLimit` header's `t=` (the rejection's
//! [`reset`](crate::rejection::RateLimitInfo::reset)) is never less than either. Only the
//! hints are jittered: the limiter's state and the waits of
//! [`wait_up_to`](RateLimitLayer::wait_up_to) run to the exact edge. The Redis store's
//! refusals, and its local fallback's, are jittered by the same function.
//!
//! # Why GCRA, and how it differs from its neighbours
//!
//! The generic cell rate algorithm is a token bucket kept as one number (the time at which the
//! bucket would be full again), so one admit is one clock read and one compare-and-swap on one
//! `AtomicU64`: no lock, no allocation, no refill task. The per-key limiter keeps these numbers
//! in a fixed-capacity lock-free table ([`max_keys`](RateLimitConfig::max_keys), 32 bytes a
//! key): a key whose time is in the past is the same as an absent key, so its slot is reused
//! at once and memory stays bounded under millions of distinct keys, with no sweeper.
//!
//! `max_keys` is how many keys are tracked: the table has twice as many slots, and a key
//! whose time is still ahead (a *live* key) is evicted only when every slot a new key could
//! take holds a live key: in practice only beyond `max_keys` live keys (none are evicted in
//! the tests at 25, 50, 75 and 100% of it). Then the live key closest to whole is evicted (it
//! starts afresh, so it may get at most one burst more than its limit), and
//! [`RateLimitHandle::evictions`] counts it.
//!
//! A request up to 10 µs early (and less than one interval) conforms: a clock read on another
//! core can be a microsecond or two behind, and a client sending at exactly the quota's rate
//! must not be refused for it (with a `Retry-After` of a second). This admits, over any span,
//! less than one request more than the quota, and exactly the burst at one instant.
//!
//! - tower's `RateLimit` counts requests in fixed windows, waits in `poll_ready`, and keeps its
//!   state per service *clone*: under Axum, which clones the service per request and layers
//!   each route separately, it limits nothing. Here the state lives in the layer.
//! - governor has the same algorithm but no Tower layer, and its quota is fixed at build time;
//!   here [`RateLimitHandle::set_quota`] changes it at run time.
//! - tower_governor's `per_second(n)` means one token every `n` seconds. Here
//!   [`Quota::per_second(n)`](Quota::per_second) means `n` per second (its doc test proves it).
//!
//! # Where to place this layer
//!
//! On a server: below [`RejectionLayer`](crate::RejectionLayer), above the work it protects,
//! and above backpressure (a request refused by the limit should not take a permit). With the
//! idempotency layer *below* it, every repeat of a key spends a token like any request; with
//! it *above*, replays are served from the store without spending one (and a repeat that is
//! refused does not look like a completed request either way). On a client: inside the retry
//! layer, with `wait_up_to`, so that each attempt waits for its turn.
//!
//! # Testing with paused time
//!
//! The limiter reads the crate's fast clock by default, which does not stop under
//! `tokio::time::pause()`. In tests, one line makes it follow tokio's time:
//! `RateLimitLayer::new(RateLimitConfig::new(quota).clock(Clock::tokio()))`. The clock and
//! `max_keys` are part of the configuration the layer is made from, so its state, its
//! handles and its services are made once, on them.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use axum::{body::Body, routing::get, Router};
//! use http::{Request, StatusCode};
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_bulwark::rate_limit::RateLimitConfig;
//! use tower_bulwark::{clock::Clock, Quota, RateLimitLayer, RejectionLayer};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
//! let app = Router::new().route("/", get(|| async { "hello" })).layer(
//!     ServiceBuilder::new()
//!         .layer(RejectionLayer::http())
//!         .layer(
//!             RateLimitLayer::new(
//!                 RateLimitConfig::new(Quota::per_second(2).unwrap()).clock(Clock::tokio()),
//!             ),
//!         ),
//! );
//! let get = || Request::get("/").body(Body::empty()).unwrap();
//! assert_eq!(app.clone().oneshot(get()).await.unwrap().status(), StatusCode::OK);
//! assert_eq!(app.clone().oneshot(get()).await.unwrap().status(), StatusCode::OK);
//! let res = app.clone().oneshot(get()).await.unwrap();
//! assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
//! // The next token is 500 ms away; the hint is jittered over [0.5 s, 2.5 s).
//! let after: u64 = res.headers()["retry-after"].to_str().unwrap().parse().unwrap();
//! assert!((1..=3).contains(&after));
//! tokio::time::advance(Duration::from_millis(500)).await; // one token back
//! assert_eq!(app.clone().oneshot(get()).await.unwrap().status(), StatusCode::OK);
//! # }
//! ```
//!
//! # Keys
//!
//! A key function is any `Fn(&Req) -> K + Clone + Send + Sync + 'static` with `K: Hash`, or an
//! extractor of [`key`]: [`key::Header`] (a header's value) and [`key::ClientIp`] (the peer
//! address, or the client address forwarded by trusted proxies only). Keys are hashed with a
//! per-layer random seed, so a client cannot aim keys at one table slot. An empty key or a very
//! long key works like any other (a long key costs its hashing time only; nothing is stored
//! but a 60-bit hash); requests whose key function returns the same value share one limit, so
//! a closure that returns `None` for requests without a key puts all of them under one limit.
//! An extractor that cannot find its key does not: [`key::ClientIp`] with no client address
//! (no peer address, or a trusted proxy's request with no address in the forwarding header
//! read), [`key::Header`] with the header absent, empty, not visible ASCII or sent more than
//! once. Such a request is refused by default ([`MissingKey`]; or admitted, with
//! [`KeyedConfig::when_key_missing`]), warned about once and counted
//! ([`RateLimitHandle::missing_keys`]). [`key::ClientIp`] keys IPv6 clients by their /64 by
//! default.
//!
//! Under Axum, [`key::ClientIp`] reads the address Axum records (`ConnectInfo<SocketAddr>`,
//! with `into_make_service_with_connect_info::<SocketAddr>()`) when the crate's `axum` feature
//! is on, with no code of yours; without the feature, say where it is with
//! [`ClientIp::peer_addr`](key::ClientIp::peer_addr).

pub mod future;
mod gcra;
pub mod key;
mod keyed;
mod layer;
mod service;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod store;

use std::hash::Hash;

pub use self::gcra::{Quota, QuotaError};
pub use self::layer::{
    KeyedConfig, RateLimitConfig, RateLimitHandle, RateLimitLayer, DEFAULT_MAX_KEYS,
};
pub use self::service::RateLimit;
use crate::rejection::RateLimitInfo;

/// Reads the rate-limit key from a request.
///
/// Implemented for closures `Fn(&Req) -> K` with `K: Hash` (whose key is always found), and
/// for the extractors of [`key`].
pub trait KeyFn<Req>: Clone + Send + Sync + 'static {
    /// The key: requests with equal keys share one limit.
    type Key: Hash;

    /// The key of a request, or `None` when it cannot be read (for [`key::ClientIp`]: no
    /// client address; for [`key::Header`]: no usable header). A request without a key is never put under a limit shared with
    /// other such requests: the layer applies its [`MissingKey`] policy (refuse, by default),
    /// warns once and counts it ([`RateLimitHandle::missing_keys`]).
    fn key(&self, req: &Req) -> Option<Self::Key>;

    /// Whether a request without a key is the server's fault rather than the client's: the
    /// [`MissingKey::Reject`] refusal is then
    /// [`ClientAddressUnknown`](crate::RejectionKind::ClientAddressUnknown) (HTTP 500)
    /// instead of [`RateLimitKeyMissing`](crate::RejectionKind::RateLimitKeyMissing) (HTTP
    /// 400). `false` by default; [`key::ClientIp`] says `true` (a request always has an
    /// address: not finding it is a setup error).
    fn missing_key_is_server_fault(&self) -> bool {
        false
    }

    /// Whether a request without a key sent one that is malformed (for [`key::Header`]: the
    /// header sent more than once, or not visible ASCII), rather than none: such a request is
    /// refused ([`RateLimitKeyMissing`](crate::RejectionKind::RateLimitKeyMissing)) even under
    /// [`MissingKey::Admit`], which admits requests that carry no key, since a client could
    /// otherwise repeat its header to step out of its own limit while the service behind
    /// reads the first value. Asked only of requests without a key; `false` by default.
    fn key_is_malformed(&self, req: &Req) -> bool {
        let _ = req;
        false
    }
}

impl<Req, K, F> KeyFn<Req> for F
where
    F: Fn(&Req) -> K + Clone + Send + Sync + 'static,
    K: Hash,
{
    type Key = K;

    #[inline]
    fn key(&self, req: &Req) -> Option<K> {
        Some(self(req))
    }
}

/// The key of a global limiter: every request shares one limit.
#[derive(Clone, Copy, Debug, Default)]
pub struct Global;

impl<Req> KeyFn<Req> for Global {
    type Key = ();

    #[inline]
    fn key(&self, _req: &Req) -> Option<()> {
        Some(())
    }
}

/// What a keyed limiter does with a request whose key cannot be read ([`KeyFn::key`] returns
/// `None`; for [`key::ClientIp`], a request with no client address). Either way the request
/// is counted ([`RateLimitHandle::missing_keys`]) and the first one is logged as a `tracing`
/// warning; such requests never share one limit. Set with [`KeyedConfig::when_key_missing`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum MissingKey {
    /// Refuse it with a [`Rejection`](crate::Rejection) of kind
    /// [`RateLimitKeyMissing`](crate::RejectionKind::RateLimitKeyMissing) (HTTP 400, gRPC
    /// `INVALID_ARGUMENT`: the client did not send what its key is read from), or
    /// [`ClientAddressUnknown`](crate::RejectionKind::ClientAddressUnknown) (HTTP 500, gRPC
    /// `INTERNAL`) when the key function says the miss is the server's
    /// ([`KeyFn::missing_key_is_server_fault`]: no client address): the default, since the
    /// limit cannot be applied.
    #[default]
    Reject,
    /// Let it through without a limit (fail open).
    Admit,
}

/// Adds rate-limit figures to successful responses, or not. See
/// [`RateLimitLayer::response_headers`].
pub trait ResponseHeaders<Res>: Clone + Default {
    /// Whether the figures are computed at all.
    const ENABLED: bool;

    /// What the response future keeps until the response comes: nothing, or the figures.
    type Slot: Default;

    /// Keeps the figures for [`apply`](Self::apply).
    fn keep(info: RateLimitInfo) -> Self::Slot;

    /// Writes the kept figures on a response.
    fn apply(res: &mut Res, slot: &Self::Slot);
}

/// Successful responses are left as they are (the default).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoHeaders;

impl<Res> ResponseHeaders<Res> for NoHeaders {
    const ENABLED: bool = false;
    type Slot = ();

    #[inline]
    fn keep(_info: RateLimitInfo) {}

    #[inline]
    fn apply(_res: &mut Res, _slot: &()) {}
}

/// Successful HTTP responses carry `RateLimit` and `RateLimit-Policy` headers.
#[derive(Clone, Copy, Debug, Default)]
pub struct WithHeaders;

impl<B> ResponseHeaders<http::Response<B>> for WithHeaders {
    const ENABLED: bool = true;
    type Slot = Option<RateLimitInfo>;

    fn keep(info: RateLimitInfo) -> Option<RateLimitInfo> {
        Some(info)
    }

    fn apply(res: &mut http::Response<B>, slot: &Option<RateLimitInfo>) {
        if let Some(info) = slot {
            info.write_headers(res.headers_mut());
        }
    }
}

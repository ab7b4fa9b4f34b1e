//! Rate limiting shared by many replicas: the same GCRA, kept in Redis.
//!
//! [`RedisRateLimitLayer`] applies a limit that every replica of a service draws on: each
//! check runs the GCRA step of the in-process [`RateLimitLayer`](super::RateLimitLayer) in
//! one Lua script on Redis (`EVALSHA`, loaded again after a `NOSCRIPT`), one round trip, with
//! Redis's `TIME` as the clock, so the replicas' clocks may disagree without changing the
//! limit. `TIME` is Redis's wall clock: a step back within a window admits nothing more, and
//! one beyond a window (an NTP step, a failover to a replica whose clock is behind) finds
//! the limit whole on the new time line (at most one burst more), as the in-process
//! limiter does, instead of spent for the length of the step. A request over the limit gets the same [`Rejection`](crate::Rejection) of kind
//! `RateLimited`, with `retry_after` and the limit's figures, its hints jittered exactly as
//! the in-process limiter's are (also when the local fallback decides; see [Jittered
//! hints](super#jittered-hints)), answered with a 429 by
//! [`RejectionLayer`](crate::RejectionLayer);
//! [`response_headers`](RedisRateLimitLayer::response_headers) puts the figures on successful
//! responses too.
//!
//! Clients that share an upstream's quota across replicas (a third-party API's limit, say)
//! can [`wait_up_to`](RedisRateLimitConfig::wait_up_to) a bound for their turn instead: the
//! turn is reserved in Redis by the check, so the waiters of every replica are served in
//! order and never exceed the quota.
//!
//! # Why, and how it differs from its neighbours
//!
//! One process needs no Redis: the in-process limiter is lock-free and costs nanoseconds. Run
//! ten replicas behind a load balancer, though, and each in-process limit of 100/s becomes
//! 1000/s for the service (or less, unevenly, as the balancer shifts load). A shared limit
//! needs shared state; Redis is an engine most deployments already run, so the state lives
//! there, never in a home-made cluster. The cost is one round trip per request (tens of
//! microseconds on a local network) and a dependency that can fail, hence an explicit
//! [`FailurePolicy`]. governor and tower have no shared store.
//!
//! Unlike the in-process admit path, a check allocates: the Redis client packs each command
//! into a buffer and boxes its future, and the layer boxes the check with its timeout (one
//! allocation of its own; a check skipped during the cool-down after a failure boxes
//! nothing). Beside a network round trip this does not show: on loopback, a
//! check costs about what a `PING` does (see `benches/redis.rs`).
//!
//! # Redis keys
//!
//! A key is `<prefix>{<digest>}`: the [prefix](RedisRateLimitConfig::prefix) (default
//! `bulwark:rl:`, which must not contain braces) names the limit, and the digest is the first
//! 128 bits of the SHA-1 of the user key's [`RedisKey`] encoding, in hex. That encoding is
//! this crate's own and documented, not `std::hash::Hash`'s bytes (which the standard
//! library may change between Rust releases): replicas built by different compilers name
//! one user key alike, so a rolling deploy keeps one limit per key. Whatever the key holds (any
//! length, binary, `{` and `}`), the Redis key has this fixed shape: it cannot leave the
//! prefix or change the hash tag, and one user key maps to one Redis Cluster slot. Each key
//! expires when its state is in the past, so Redis memory is bounded by the keys active
//! within one window.
//!
//! # When Redis fails
//!
//! Each check has a [timeout](RedisRateLimitConfig::timeout) (default 50 ms), covering the
//! round trip and any wait for a reconnection. The connection is a
//! `redis::aio::ConnectionManager`, which reconnects on its own: once Redis is back, checks
//! succeed again with no restart. Until then, the [`FailurePolicy`] decides:
//!
//! | policy | request | counter |
//! |---|---|---|
//! | [`Local`](FailurePolicy::Local) (default) | an in-process limiter of the same quota and key decides | [`local_fallbacks`](RedisRateLimitHandle::local_fallbacks) |
//! | [`FailOpen`](FailurePolicy::FailOpen) | admitted | [`failed_open`](RedisRateLimitHandle::failed_open) |
//! | [`FailClosed`](FailurePolicy::FailClosed) | refused, kind `StoreUnavailable` (503) | [`failed_closed`](RedisRateLimitHandle::failed_closed) |
//!
//! An outage costs one request the timeout, not each: after a check Redis could not answer,
//! the following checks are decided by the policy at once, without asking Redis, for a
//! [cool-down](RedisRateLimitConfig::cool_down) (default 1 s, counted in
//! [`skipped`](RedisRateLimitHandle::skipped)); then one check at a time, the probe, goes to
//! Redis while the others still skip it, until a check is answered. Recovery needs no
//! restart: the first answered check ends the outage, for every check after it.
//!
//! Each failure is also logged at `WARN` by `tracing`, at most once a second with the count
//! of events left out (skipped checks included), and the recovery at `INFO`. Under `Local`, each replica admits up to
//! the whole quota while Redis is down: N replicas admit up to N times the limit.
//!
//! # Running many replicas
//!
//! Give every replica the same Redis URL (the examples read `REDIS_URL`), the same quota,
//! key function and prefix (the key's [`RedisKey`] encoding and its digest are part of the
//! format, fixed across Rust releases and platforms). Different limits need different prefixes. Quotas whose window exceeds about 52
//! days are refused ([`RedisConfigError::QuotaTooLong`]). The script needs Redis 5 or later
//! (it reads `TIME` before writing). The layer talks to one endpoint through a
//! `ConnectionManager`; each check touches one key, hash-tagged, so the keys are ready for
//! Redis Cluster behind a cluster-aware proxy.
//!
//! # Where to place this layer
//!
//! Where the in-process limiter goes: below [`RejectionLayer`](crate::RejectionLayer), above
//! backpressure and the idempotency layer. Putting a cheap in-process limit above it (a per
//! replica ceiling) keeps a flood from reaching Redis at all.
//!
//! # Testing
//!
//! The limit follows Redis's clock; the local fallback and the failure log read the layer's
//! [`Clock`](crate::clock::Clock), set on the [`LocalFallback`]:
//! `.local_fallback(LocalFallback::new().clock(Clock::tokio()))` makes them follow tokio's
//! paused time. Tests that talk to a real Redis should not pause time: a paused runtime advances its
//! clock while it waits for the socket, which fires the check's timeout.
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//! use axum::{routing::get, Router};
//! use tower::ServiceBuilder;
//! use tower_bulwark::rate_limit::key;
//! use tower_bulwark::rate_limit::store::{FailurePolicy, RedisRateLimitConfig, RedisRateLimitLayer};
//! use tower_bulwark::{Quota, RejectionLayer};
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1/".into());
//! let conn = redis::Client::open(url)?.get_connection_manager().await?;
//! // Keyed by the client's address: a key the client picks (a header read before any
//! // authentication) would let it take a fresh burst with each new value.
//! let limit = RedisRateLimitLayer::keyed(
//!     conn,
//!     RedisRateLimitConfig::new(Quota::per_second(100)?.burst(200)?)
//!         .prefix("orders:rl:")?
//!         .timeout(Duration::from_millis(20))?
//!         .failure_policy(FailurePolicy::Local),
//!     key::ClientIp::new(),
//! )?;
//! let handle = limit.handle();
//! let app: Router = Router::new().route("/", get(|| async { "hello" })).layer(
//!     ServiceBuilder::new().layer(RejectionLayer::http()).layer(limit),
//! );
//! assert_eq!(handle.store_failures(), 0);
//! # let _ = app; Ok(()) }
//! ```

mod future;
mod key;
mod redis;

pub use self::future::RedisResponseFuture;
pub use self::key::{KeyWriter, RedisKey};
pub use self::redis::{
    FailurePolicy, LocalFallback, RedisConfigError, RedisRateLimit, RedisRateLimitConfig,
    RedisRateLimitHandle, RedisRateLimitLayer, DEFAULT_COOL_DOWN, DEFAULT_PREFIX, DEFAULT_TIMEOUT,
    MAX_PREFIX_LEN,
};

#[cfg(test)]
#[allow(unreachable_pub, missing_debug_implementations)]
#[path = "../../../tests/support/redis_server.rs"]
mod redis_server;

//! Tower middleware that keeps services alive under load and failure.
//!
//! Five independent layers, each usable alone, all composable in one
//! [`tower::ServiceBuilder`], in Axum and Tonic servers and in Tower clients:
//!
//! | module | layer | what it does |
//! |---|---|---|
//! | [`retry`] | [`RetryLayer`] | re-sends failed requests with exponential backoff and jitter, inside a retry budget |
//! | [`circuit_breaker`] | [`CircuitBreakerLayer`] | stops calling a dependency that keeps failing, probes it, closes again |
//! | [`idempotency`] | [`IdempotencyLayer`] | runs a request with an `Idempotency-Key` once; replays its response to repeats |
//! | [`backpressure`] | [`BackpressureLayer`] | bounds requests in flight; waits a bounded time, then sheds |
//! | [`rate_limit`] | [`RateLimitLayer`] | token-bucket (GCRA) limit, global or per key, lock-free |
//!
//! Every layer that refuses a request returns a typed [`Rejection`]; [`RejectionLayer`] turns
//! it into the HTTP response (or gRPC status) it stands for, so an Axum stack stays
//! `Infallible`. What counts as success, failure or retryable is decided in one place,
//! [`classify`]. Time comes from a pluggable [`clock::Clock`]: fast by default, and one line
//! away from following tokio's paused time in tests (`Clock::tokio()`).
//!
//! # A server stack
//!
//! Outermost first: rejections become responses; the per-address rate limit refuses excess at
//! once, before any other work; idempotency runs each `Idempotency-Key` once per caller and
//! replays its stored response to the caller's retries (keys are scoped by the request's
//! `Authorization` header, here with its `x-api-key` header too, so one caller never receives
//! another's stored response; callers without any credentials would share one scope); then
//! the per-key rate limit (the `x-api-key` header is the client's to choose, read before any
//! authentication: a client rotating its values would get a fresh burst each time, so it is
//! only a second limit, behind the per-address one) and backpressure protect the handler.
//! Idempotency sits above them so that a retry of a completed request gets its replay, not a
//! 429 or a 503; a request they refuse releases its key. Replays are cheap but not free: the
//! per-address limit above bounds how fast one client can ask for them, and the layer's
//! `max_buffered_bytes` how many bytes of them are held at once (see the
//! [idempotency module](idempotency#where-to-place-this-layer)).
//!
//! ```
//! use std::time::Duration;
//! use axum::{routing::post, Router};
//! use tower::ServiceBuilder;
//! use tower_bulwark::rate_limit::{key, KeyedConfig, MissingKey};
//! use tower_bulwark::{
//!     BackpressureLayer, IdempotencyLayer, MemoryStore, Quota, RateLimitLayer, RejectionLayer,
//! };
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! async fn create_order() -> &'static str { "created" }
//!
//! let app: Router = Router::new().route("/orders", post(create_order)).layer(
//!     ServiceBuilder::new()
//!         .layer(RejectionLayer::http()) // Rejection -> 429/503/409/422/400 response
//!         // Per client address first (feature `axum`: the address Axum records when served
//!         // with `into_make_service_with_connect_info::<SocketAddr>()`).
//!         .layer(RateLimitLayer::keyed(
//!             Quota::per_second(100)?.burst(200)?,
//!             key::ClientIp::new(),
//!         ))
//!         // Then idempotency: a retry of a completed request is replayed without spending
//!         // the caller's rate. Keys scoped by caller: a digest of `Authorization` and of
//!         // the `x-api-key` header.
//!         .layer(
//!             IdempotencyLayer::builder(MemoryStore::default())
//!                 .scope_by_header("x-api-key")
//!                 .build()?,
//!         )
//!         // Then the caller's limit and the bound on work in flight, before the handler.
//!         // Requests without an API key are anonymous clients, which the address limit
//!         // bounds (the default would refuse them; either way they are counted).
//!         .layer(RateLimitLayer::keyed(
//!             KeyedConfig::new(Quota::per_second(100)?.burst(200)?)
//!                 .when_key_missing(MissingKey::Admit),
//!             key::Header::new("x-api-key"),
//!         ))
//!         .layer(BackpressureLayer::new(256).max_wait(Duration::from_millis(50))),
//! );
//! # Ok(()) }
//! ```
//!
//! # A client stack
//!
//! Retries inside a budget (over its 10 s window, at most 20% of the window's requests plus
//! 10 retries per second: the floor lets a client with little traffic retry, so below about
//! 50 requests per second retries may add more than 20%), honouring `Retry-After`; a
//! breaker below it so that each attempt counts and an open breaker stops the retries:
//!
//! ```
//! use std::convert::Infallible;
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::Full;
//! use tower::ServiceBuilder;
//! use tower_bulwark::classify::HttpStatus;
//! use tower_bulwark::{BreakerConfig, Budget, CircuitBreakerLayer, RetryLayer, RetryPolicy};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Stands for hyper-util's client, itself a tower service.
//! let http_client = tower::service_fn(|_req: Request<Full<Bytes>>| async {
//!     Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
//! });
//! let client = ServiceBuilder::new()
//!     .layer(RetryLayer::new(
//!         RetryPolicy::http()
//!             .max_attempts(3)
//!             .budget(Budget::ratio(0.2)?)
//!             .add_idempotency_key(),
//!     )?)
//!     .layer(
//!         CircuitBreakerLayer::new(BreakerConfig::failure_rate(0.5).window(100))?
//!             .classify(HttpStatus::default()),
//!     )
//!     .service(http_client);
//! # let _ = client;
//! # Ok(()) }
//! ```
//!
//! Give such a stack a per-attempt timeout too (tower's `timeout`), or a call that hangs holds
//! its caller for ever and the breaker learns nothing from it: below the breaker, a hung call
//! is an error that counts as a failure; above it, a call it cuts short counts as a slow call
//! (with a slow-call rate) or as a failure (with [`Abandoned::Failure`]).
//!
//! [`Abandoned::Failure`]: circuit_breaker::Abandoned::Failure
//!
//! # Feature flags
//!
//! - `fast-clock` (default): a TSC-based clock through `quanta`.
//! - `axum`: [`rate_limit::key::ClientIp`] reads the client address Axum records
//!   (`ConnectInfo<SocketAddr>`), with no code of yours.
//! - `grpc`: [`RejectionLayer::grpc`], gRPC statuses for rejections.
//! - `redis`: Redis-backed state for many replicas: [`rate_limit::store`] (a GCRA limit shared
//!   by every replica) and `idempotency::RedisStore`.
#![forbid(unsafe_code)]
#![warn(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    rust_2018_idioms
)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod backpressure;
pub mod circuit_breaker;
pub mod classify;
pub mod clock;
pub mod idempotency;
pub mod rate_limit;
pub mod rejection;
pub mod respond;
pub mod retry;
mod util;

pub use crate::backpressure::BackpressureLayer;
pub use crate::circuit_breaker::{BreakerConfig, CircuitBreakerLayer};
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use crate::idempotency::RedisStore;
pub use crate::idempotency::{IdempotencyLayer, MemoryStore};
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use crate::rate_limit::store::RedisRateLimitLayer;
pub use crate::rate_limit::{Quota, RateLimitLayer};
pub use crate::rejection::{Rejection, RejectionKind};
pub use crate::respond::RejectionLayer;
pub use crate::retry::{Budget, RetryLayer, RetryPolicy};

/// Alias for a type-erased error type, as in tower.
pub use tower::BoxError;

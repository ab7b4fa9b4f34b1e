//! Tower middleware that keeps services alive under load and failure.
//!
//! Five independent layers, each usable alone, all composable in one
//! [`tower::ServiceBuilder`], in Axum and Tonic servers and in Tower clients:
//!
//! | module | layer | what it does |
//! |---|---|---|
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
//! ```
//! use axum::{routing::get, Router};
//! use tower::ServiceBuilder;
//! use tower_bulwark::{Quota, RateLimitLayer, RejectionLayer};
//!
//! let app: Router = Router::new().route("/", get(|| async { "hello" })).layer(
//!     ServiceBuilder::new()
//!         .layer(RejectionLayer::http())
//!         .layer(RateLimitLayer::new(Quota::per_second(100).unwrap().burst(200).unwrap())),
//! );
//! ```
//!
//! # Feature flags
//!
//! - `fast-clock` (default): a TSC-based clock through `quanta`.
//! - `grpc`: [`RejectionLayer::grpc`], gRPC statuses for rejections.
//! - `redis`: Redis-backed state for many replicas.
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

pub use crate::rate_limit::{Quota, RateLimitLayer};
pub use crate::rejection::{Rejection, RejectionKind};
pub use crate::respond::RejectionLayer;

/// Alias for a type-erased error type, as in tower.
pub use tower::BoxError;

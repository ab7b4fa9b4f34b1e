//! Retries failed requests with jittered exponential backoff, inside a retry budget, safely
//! for HTTP and gRPC.
//!
//! A request whose outcome [`classify`](crate::classify) calls retryable (an error, a 502, 503
//! or 504, a 429, an `IdempotencyLayer`'s 409 for a key in flight, gRPC `UNAVAILABLE` or
//! `RESOURCE_EXHAUSTED`, a proxy's 502, 503 or 504 on a gRPC call) is sent again after a backoff,
//! if it is safe to repeat after that outcome (see [Safety](#safety)), up to a number of
//! attempts, within an optional overall deadline (and a gRPC call's own `grpc-timeout`, see
//! [gRPC deadlines](#grpc-deadlines)), and only while the
//! [`Budget`] allows: over its window (10 s by default), retries stay at or below a share of
//! the window's requests (20% by default) plus a floor per second (10 by default, so that a
//! client with little traffic can still retry: below about 50 requests per second, retries may
//! add more than 20%), shared by every clone of the layer.
//!
//! # Why
//!
//! A transient failure (a connection reset, a restarting pod, a brief overload) should not
//! become the caller's failure. But blind retries multiply the load on a dependency exactly
//! when it is sick: three attempts triple it, and every layer of retries multiplies it again.
//! So this layer spreads retries with jitter, honours the server's `Retry-After` and
//! `grpc-retry-pushback-ms`, never hammers an open circuit breaker, and stops when its budget
//! is spent, returning the last response or error as it was.
//!
//! # How it differs from its neighbours
//!
//! - tower's `Retry` leaves the policy, the backoff and request cloning to you, cannot retry
//!   requests whose body is not `Clone` (hyper's, Axum's, tonic's: tower#682), and its
//!   `TpsBudget` takes a lock and reads the clock on every request. Here the HTTP policy keeps
//!   the body in a bounded replay buffer ([`ReplayBody`], 64 KiB by default) as it streams, so
//!   retries work for hyper, Axum and tonic clients; the budget is lock-free and a request
//!   costs it one atomic add (and one in 8 to 64 a clock reading, so that every request of the
//!   window counts, as in `TpsBudget`).
//! - tower-resilience's retry knows nothing of HTTP safety or server hints: this layer retries
//!   an HTTP request only if its method is idempotent or it carries an `Idempotency-Key`, and
//!   [`RetryPolicy::add_idempotency_key`] gives POST and PATCH a fresh key, the same on every
//!   attempt, so that a server with `IdempotencyLayer` replays the stored response to every
//!   attempt after the one that ran; an attempt that
//!   meets an earlier one still running there is answered 409 (gRPC `ABORTED`) marked
//!   [`IDEMPOTENCY_KEY_IN_FLIGHT`](crate::rejection::IDEMPOTENCY_KEY_IN_FLIGHT) with a short,
//!   jittered `Retry-After`, which [`classify`](crate::classify) calls throttled: it is
//!   retried after the wait and replayed the stored response. A gRPC call
//!   (always a POST) is retried on the status codes that say it was not processed; after an
//!   error (a timeout, a transport error after sending) or a proxy's 502 or 504 only if it
//!   carries an `Idempotency-Key` or is marked [`Idempotent`].
//! - The circuit breaker stops calls to a dependency that keeps failing; this layer repeats a
//!   call that failed once. They pair: a `CircuitOpen` [`Rejection`](crate::Rejection) from a
//!   breaker below is waited out (with jitter) if its `retry_after` fits the policy's
//!   [`max_hint`](RetryPolicy::max_hint), the deadline and the budget, and otherwise returned
//!   at once (see [Server hints](#server-hints)).
//!
//! # Safety
//!
//! Each retryable outcome says something of whether the request ran, and a request is sent
//! again only if that is safe:
//!
//! | outcome | may have run | retried for |
//! |---|---|---|
//! | a [`Rejection`](crate::Rejection) from a layer below, a failed `poll_ready` | no | any request that may be retried |
//! | 429, the in-flight 409, a 503 marked [`Request-Refused`](crate::rejection::REQUEST_REFUSED) (a server's `RejectionLayer`) | no | any request that may be retried |
//! | gRPC `UNAVAILABLE` from the server, a proxy's 503 without `grpc-status` | no | any call |
//! | an error (a timeout, a reset after sending) | yes | HTTP: an idempotent method, a key or [`Idempotent`]; gRPC: a key or [`Idempotent`] |
//! | a proxy's 502 or 504 without `grpc-status` | yes | gRPC: a key or [`Idempotent`] |
//! | an HTTP 5xx without the mark | yes | an idempotent method or [`Idempotent`]: **not** a POST or PATCH with a key alone |
//!
//! Why a key is not enough after an HTTP 5xx: the answer may be the handler's, after its
//! effect (a payment charged, then a receipt service down), and a server's `IdempotencyLayer`
//! releases the key of a 5xx so that the client can retry: a retry would run the handler
//! again. A refusal of the server's own layers says it did not run, and this crate's
//! `RejectionLayer` marks it so. What stays: a retry after an error (a timeout, a connection
//! lost after sending) reaches a handler still running (409, then the replay) or done; if that
//! handler answered a 5xx after its effect, the retry runs it again. Mark a request
//! [`Idempotent`] only if running it twice is harmless.
//!
//! # Server hints
//!
//! A response's `Retry-After` (delta-seconds or an HTTP-date) or `grpc-retry-pushback-ms`,
//! and the `retry_after` of a [`Rejection`](crate::Rejection) from a layer below (an open
//! breaker, a rate limit, a shed), say when to try again. The layer never tries earlier:
//!
//! - A hint longer than the policy's [`max_hint`](RetryPolicy::max_hint) (4 s by default,
//!   apart from the backoff's maximum delay: this crate's servers shed with `Retry-After` of
//!   1 to 3 s, which a default client waits out), or one that would start the next attempt
//!   past the [`deadline`](RetryPolicy::deadline), stops the retries: the response or error
//!   is returned at once, hint included, for the caller to act on. So does a retry the
//!   [`Budget`] refuses, and a negative or malformed `grpc-retry-pushback-ms` (gRPC's "do not
//!   retry").
//! - A hint that fits is waited out as the hint plus a jitter, whatever the backoff's
//!   [`Jitter`]: uniform in `[0, s]` with `s` twice the hint, at least the retry's backoff
//!   ceiling and, for a hint within the backoff's maximum delay, at most that delay (a 300 ms
//!   hint under the default backoff waits 300 to 900 ms, a 3 s hint 3 to 9 s; a wait is never
//!   over the hint plus the larger of the maximum delay and twice the hint), cut only by the
//!   deadline. Callers refused with hints that point at one instant (an open breaker's time
//!   left, a rate limit's reset) come back spread over a span longer than the one over which
//!   they were refused, not in one herd; and never before the server said.
//! - A response carrying several hints (a `Retry-After` and a `grpc-retry-pushback-ms`, as
//!   gateways that translate one to the other send) is read by the latest of them: never
//!   retried before any hint the server gave.
//! - No hint, or a malformed `Retry-After`: the backoff decides.
//!
//! # Where to place this layer
//!
//! On the client side, outside the circuit breaker: each attempt then passes through the
//! breaker, which counts it and refuses at once while open (and the retry layer waits out
//! or gives up, as above). Put a per-attempt timeout *below* this layer and an overall timeout
//! (or [`RetryPolicy::deadline`]) above or in it. Do not put a retry layer on a server in front
//! of your own handlers: retries belong to the caller that can wait. A rate limiter or
//! concurrency limit below the retry layer sees every attempt; above it, every request.
//!
//! ```text
//! caller ─▶ Retry ─▶ CircuitBreaker ─▶ Timeout (per attempt) ─▶ client
//! ```
//!
//! A [`deadline`](RetryPolicy::deadline) also bounds the wait for the inner service's
//! readiness before a retry: a retry not started when it passes is not made, and the last
//! response or error is returned. It does not bound the first attempt's wait for readiness,
//! which happens in `poll_ready`, before the call and so before the deadline starts: put a
//! timeout above this layer to bound that.
//!
//! A retry's `poll_ready` that fails (tower's `Reconnect` reports a failed connect so, once)
//! is that attempt's outcome: nothing was sent, so it is retried as the policy says, after a
//! backoff, while the attempts, the budget and the deadline allow; a call that gives up then
//! returns the last response it had (the error if it had none). A retry with no wait
//! ([`Backoff::none`], a hint of 0) yields to the runtime before it is made, so that a call
//! that retries at once many times does not hold its thread.
//!
//! # gRPC deadlines
//!
//! [`RetryPolicy::grpc`] reads a call's `grpc-timeout` (what tonic's `set_timeout` sends) as
//! a deadline for the whole call, across its attempts, as gRPC's retry design has it: with
//! the policy's [`deadline`](RetryPolicy::deadline), the stricter of the two holds; no retry
//! starts past it; each retry is sent a `grpc-timeout` of the time left (rounded down); and a
//! retry still running when it passes is dropped, the call returning the last answer before
//! it. The first attempt carries the caller's `grpc-timeout` as it was, and is ended by the
//! transport (tonic's `Channel` enforces `grpc-timeout`) or the server. A malformed
//! `grpc-timeout` is left as it is and not read. Reading it costs a call that may be retried
//! one clock reading.
//!
//! # Example
//!
//! ```
//! use std::sync::atomic::{AtomicU32, Ordering};
//! use std::sync::Arc;
//! use std::time::Duration;
//! use tower::{service_fn, BoxError, ServiceBuilder, ServiceExt};
//! use tower_bulwark::clock::Clock;
//! use tower_bulwark::retry::{Backoff, RetryLayer, RetryPolicy};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), BoxError> {
//! let calls = Arc::new(AtomicU32::new(0));
//! let flaky = {
//!     let calls = calls.clone();
//!     // Fails twice, then answers.
//!     service_fn(move |n: u32| {
//!         let call = calls.fetch_add(1, Ordering::SeqCst);
//!         async move {
//!             if call < 2 { Err::<u32, BoxError>("connection reset".into()) } else { Ok(n * 2) }
//!         }
//!     })
//! };
//! let policy = RetryPolicy::errors()
//!     .max_attempts(3)
//!     .backoff(Backoff::exponential(Duration::from_millis(10), Duration::from_secs(1)))
//!     .clock(Clock::tokio()); // follows tokio's paused time, as tests want
//! let svc = ServiceBuilder::new()
//!     .layer(RetryLayer::new(policy)?)
//!     .service(flaky);
//! assert_eq!(svc.oneshot(21).await?, 42);
//! assert_eq!(calls.load(Ordering::SeqCst), 3);
//! # Ok(())
//! # }
//! ```
//!
//! For HTTP, [`RetryPolicy::http`] (or [`RetryPolicy::grpc`]): the inner service receives
//! `http::Request<ReplayBody<B>>`, which hyper-util's client and Axum's `Router` accept as they
//! are; a tonic `Channel` needs `.map_request(|r| r.map(tonic::body::Body::new))` below the
//! layer.
//!
//! # Time in tests
//!
//! Backoff sleeps use `tokio::time`, so `#[tokio::test(start_paused = true)]` and
//! `tokio::time::advance` drive them. The deadline and the budget read one
//! [`Clock`](crate::clock::Clock): give the policy `.clock(Clock::tokio())` so that both follow
//! the paused time too. The layer's own budget, and a given [`Budget`] built without a clock,
//! take the policy's (whichever of `.clock` and `.budget` comes first); a budget built with
//! `Budget::builder().clock(..)` gives its clock to the layer, and a policy clock that differs
//! from it is refused with [`ConfigError::BudgetClock`].
//!
//! # Tracing
//!
//! Each retry is a `debug` event of target `tower_bulwark::retry` with the attempt, the delay
//! and the reason; a retry refused by the budget is an `info` event; other reasons to stop
//! (attempts, deadline, pushback, an unreplayable body, a hint longer than the policy's
//! `max_hint`, an answer that may follow a run of a request not safe to repeat) are `debug`
//! events.

mod backoff;
mod budget;
pub mod future;
mod layer;
mod policy;
mod replay;
mod service;

pub use self::backoff::{Backoff, Jitter};
pub use self::budget::{Budget, BudgetBuilder, BudgetFigures};
pub use self::layer::{RetryHandle, RetryLayer};
pub use self::policy::{
    is_idempotent, CloneRequest, ConfigError, ErrorPredicate, Hint, Hints, HttpReplay, Idempotent,
    Replay, RetryPolicy, DEFAULT_MAX_HINT, IDEMPOTENCY_KEY,
};
pub use self::replay::{HttpSaved, ReplayBody, SavedBody};
pub use self::service::Retry;

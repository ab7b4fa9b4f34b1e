//! Stops calling a dependency that keeps failing, probes it after a while, and closes again
//! when it has healed.
//!
//! # Why
//!
//! A dependency that is down answers slowly or not at all; callers that keep calling it spend
//! their threads, sockets and time budget on requests that will fail, and add load to a
//! service that is trying to recover. A circuit breaker counts outcomes and, once they are bad
//! enough, *opens*: requests are refused at once with a [`Rejection`](crate::Rejection) of kind
//! [`CircuitOpen`](crate::RejectionKind::CircuitOpen) whose `retry_after` is the time left
//! open ([`RejectionLayer`](crate::RejectionLayer) answers 503 with `Retry-After`, or gRPC
//! `UNAVAILABLE`). After the open time it is *half-open*: at most `k` probe calls go through
//! at once; `k` successes close it, one failure opens it again for longer (multiplied by
//! [`backoff_multiplier`](BreakerConfig::backoff_multiplier), capped, with jitter so that
//! breakers in many replicas do not probe in lockstep). A trip from closed also opens it for
//! longer when it comes before the breaker has stayed closed for the open time it last served
//! (a flapping dependency that passes its probes and falls over again under real load); once
//! it has stayed closed that long, the next trip starts again from the base
//! [`open_time`](BreakerConfig::open_time). A call refused while the probes are
//! out is told to come back after a random share of the open time a failed probe would start
//! (drawn for each caller, so that callers refused together do not come back together); one
//! refused while [forced open](BreakerHandle::force_open), which has no end the breaker
//! knows, after a time drawn between half and one and a half times the open time.
//!
//! It trips on any of ([`BreakerConfig`]):
//!
//! - `n` consecutive failures;
//! - a failure rate over a count window (the last `N` calls) or a time window (the last `T`,
//!   in buckets), once the window holds a minimum of calls;
//! - a slow-call rate over the same window: a call is slow when it takes at least a threshold,
//!   success or not.
//!
//! An error from the inner service's `poll_ready` (how tower's `Reconnect` or a failed
//! `Buffer` report a dependency that cannot be reached) counts as the outcome of a call too
//! (see the service's [Readiness](CircuitBreaker#readiness) section).
//!
//! What a failure is comes from [`classify`](crate::classify), the same decision the retry
//! layer makes: [`ErrorsOnly`](crate::classify::ErrorsOnly) by default (every error);
//! [`HttpStatus`](crate::classify::HttpStatus) counts 5xx responses and errors, never 4xx (a
//! 404 or 422 says the *request* was wrong, not that the dependency is sick, and one bad
//! client must not open the breaker for everybody); 429, and a 503 marked
//! [`Request-Refused`](crate::rejection::REQUEST_REFUSED) (a server's shed or open breaker,
//! as its `RejectionLayer` answers it), are "throttled" and count as neither;
//! [`GrpcStatus`](crate::classify::GrpcStatus) counts `UNAVAILABLE`, `INTERNAL`,
//! `DEADLINE_EXCEEDED`, `UNKNOWN` and `DATA_LOSS`, not client-side codes such as
//! `NOT_FOUND` or `INVALID_ARGUMENT`, and treats `RESOURCE_EXHAUSTED` as throttled. A call
//! whose future is dropped after it started counts as its [`Abandoned`] policy says: by
//! default as neither, freeing any probe slot it held; with [`Abandoned::Failure`] (for a
//! timeout placed above the breaker) as a failure. With slow-call detection on, a call
//! dropped after running at least the slow-call threshold is a slow call whatever the
//! policy, and a half-open probe that is slow counts as a failed probe: a dependency that
//! answers, but too slowly, is not healed.
//!
//! # How it differs from its neighbours
//!
//! [`retry`](crate::retry) re-sends one request that failed; the breaker stops sending *all*
//! requests to a dependency that keeps failing. [`backpressure`](crate::backpressure) and
//! [`rate_limit`](crate::rate_limit) bound how much load goes down whatever its outcome; the
//! breaker looks only at outcomes. Unlike tower-resilience's breaker (a `tokio` `Mutex` on every
//! call) and failsafe's (a `parking_lot` `Mutex`), the closed path here is a few atomics: no
//! lock and no allocation, and every transition is one compare-and-swap on a single state word.
//!
//! # Where to place this layer
//!
//! In a **client** stack, below the retry layer: each attempt is counted by the breaker, and
//! an open breaker's refusal (classified as throttled) tells the retry layer to wait, not to
//! hammer. Above it, the retry layer sees one `CircuitOpen` error instead of `n` timeouts.
//! Put a timeout *below* the breaker so that a hung call counts as a failure, or above it with
//! a slow-call rate (a call it cuts short after the threshold is a slow call) or
//! [`Abandoned::Failure`]: without any timeout, a call that hangs holds its caller for ever
//! and tells the breaker nothing. In a **server** stack, a breaker protects a handler's dependency (put it
//! on the client the handler uses), or the whole route; [`RejectionLayer`](crate::RejectionLayer)
//! goes outermost. For a client that calls many hosts, use [`CircuitBreakerLayer::keyed`]
//! with the request's authority as key, so one sick host does not cut off the others.
//!
//! ```text
//!   RejectionLayer  (servers: Rejection -> 503 + Retry-After)
//!     RetryLayer
//!       CircuitBreakerLayer
//!         timeout
//!           the dependency
//! ```
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use tower::{BoxError, ServiceBuilder, ServiceExt};
//! use tower_bulwark::circuit_breaker::{BreakerConfig, BreakerState, CircuitBreakerLayer};
//! use tower_bulwark::{Rejection, RejectionKind};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), BoxError> {
//! let breaker = CircuitBreakerLayer::new(
//!     BreakerConfig::consecutive_failures(2).open_time(Duration::from_secs(30)),
//! )?;
//! let handle = breaker.handle();
//! let svc = ServiceBuilder::new()
//!     .layer(breaker)
//!     .service_fn(|fail: bool| async move {
//!         if fail { Err::<&str, BoxError>("dependency down".into()) } else { Ok("ok") }
//!     });
//!
//! assert_eq!(svc.clone().oneshot(false).await?, "ok");
//! assert!(svc.clone().oneshot(true).await.is_err());
//! assert!(svc.clone().oneshot(true).await.is_err());
//! assert_eq!(handle.state(), BreakerState::Open);
//!
//! // Open: refused at once, without calling the service.
//! let err = svc.clone().oneshot(false).await.unwrap_err();
//! let rejection = err.downcast_ref::<Rejection>().expect("a rejection");
//! assert_eq!(rejection.kind(), RejectionKind::CircuitOpen);
//! assert!(rejection.retry_after().unwrap() <= Duration::from_secs(33));
//! # Ok(()) }
//! ```
//!
//! # State and clones
//!
//! The state lives in the layer: every service the layer makes, every clone of them, and the
//! [`BreakerHandle`] share it (Axum applies a layer to each route; they all share one breaker).
//! Two dependencies that must trip separately need two layers, or one keyed layer.
//!
//! # Cancel safety
//!
//! A probe slot is held by the response future and freed in its `Drop`: a future dropped at
//! any point (the client went away, a timeout above fired) frees its slot at once and counts
//! as neither success nor failure (or, with [`Abandoned::Failure`], or once it has run past
//! the slow-call threshold, as a failed probe). A slot that `poll_ready` claimed for a probe
//! that waits on the dependency's readiness is held by the service and freed when the
//! service is dropped; a clone starts with nothing claimed. Probes that neither answer nor
//! go away fail their round once past the probe time limit (the slow-call threshold, or the
//! open time just served; see [`BreakerConfig::half_open_probes`]), so half-open never
//! sticks. A slot whose service is ready and not called yet (tower's `Balance` and
//! `ReadyCache` keep services ready, and call them late or never) is only a reservation: it
//! never fails its round, and once the round is overdue it goes to the next caller.
//!
//! # Readiness
//!
//! A breaker that refuses does not wait on the dependency's readiness (tower's `LoadShed`
//! pattern): open, or half-open with every probe slot taken, its `poll_ready` is ready at
//! once without polling the service below, and `call` returns the refusal. Once the open
//! time is over, only the callers that claim a probe slot wait on the dependency's
//! readiness; the others are refused. A dependency that is never ready cannot make callers
//! hang: a probe that waits on its readiness past the probe time limit fails its round, and
//! its caller is woken then and refused (under tower's `Buffer` too); see
//! [`CircuitBreaker`]'s `# Readiness`.
//!
//! Under a balancer (tower's p2c `Balance`, `ReadyCache`), an endpoint's breaker should make
//! the endpoint *not ready* while it refuses, so the balancer sends its requests elsewhere:
//! [`CircuitBreakerLayer::for_balancer`] turns that on (pending until the open time ends,
//! then probing). It is for balancers only: any other caller would wait as long as the
//! breaker refuses.
//!
//! # Time in tests
//!
//! The breaker reads the crate's [`Clock`](crate::clock::Clock) (fast by default): at most
//! once per call, none at all on the closed path of a count window, two (start and end) when
//! slow-call detection is on. A test under tokio's paused time makes the breaker follow it
//! with one line: `BreakerConfig::default().clock(Clock::tokio())`, then `tokio::time::advance`
//! moves the open time. [`BreakerConfig::seed`] makes the jitter reproducible.
//!
//! # Concurrency
//!
//! The state is one `AtomicU64` moved by compare-and-swap, so half-open never admits more than
//! `k` probes at once, whatever the number of threads. The count window is a pair of bitsets
//! and one position counter advanced by `fetch_add`: every completed call takes a position of
//! its own, the counter never moves backwards, and a tally counts only the bits of its own
//! window, so a call is never counted twice and none is lost to a race on the counter.

mod config;
pub mod future;
mod handle;
mod layer;
mod service;
mod state;
mod window;

pub use self::config::{Abandoned, BreakerConfig, BreakerConfigError, Window, MAX_OPEN_TIME};
pub use self::handle::{BreakerFigures, BreakerHandle};
pub use self::layer::{BreakerKey, ByKey, CircuitBreakerLayer, Single};
pub use self::service::CircuitBreaker;
pub use self::state::BreakerState;

//! Bounds the requests in flight with a shared budget of permits: a request waits a bounded
//! time for one, or is shed with a [`Rejection`](crate::Rejection) of kind
//! [`Overloaded`](crate::RejectionKind::Overloaded).
//!
//! # Why
//!
//! A service under more load than it can serve does not get slower gracefully: queues grow,
//! every request waits behind the ones before it, latency passes every client's timeout, and
//! the service does work whose answer nobody reads. Bounding concurrency keeps the requests it
//! admits fast, and answering the others at once with a 503 and a `Retry-After` lets clients
//! back off or go elsewhere.
//!
//! # How
//!
//! [`BackpressureLayer::new(n)`](BackpressureLayer::new) admits `n` requests at once. Every
//! service it makes, and every clone of them, draws on that one budget (Axum applies a layer
//! to each route and clones the service for each request: the limit holds across all of
//! them). [`BackpressureLayer::shared`] makes another layer on the same budget.
//!
//! - A request that finds a free permit takes it (one atomic add) and keeps it in its
//!   response future until the response is ready, fails, or is dropped; with
//!   [`hold_until_body_end`](BackpressureLayer::hold_until_body_end), until its HTTP body has
//!   been streamed to the end, so a streaming response counts as in flight.
//! - One that finds none is shed at once, unless [`max_wait`](BackpressureLayer::max_wait) is
//!   set: then it waits, at most that long and with at most
//!   [`max_queue`](BackpressureLayer::max_queue) others, and is admitted the moment a permit
//!   comes back. A `max_queue` given without `max_wait` implies waiting, at most 100 ms.
//! - [`BackpressureLayer::adaptive`] moves the limit between a floor and a ceiling from the
//!   latency and failures it measures ([`Aimd`], [`Gradient`]). Errors are failures; which
//!   responses are comes from a classifier ([`BackpressureLayer::classify`], such as
//!   [`HttpStatus`](crate::classify::HttpStatus) for 5xx).
//! - A shed request's [`Rejection`](crate::Rejection) carries a `retry_after` drawn for each
//!   request from `[base, 3·base)`, the base being
//!   [`retry_after`](BackpressureLayer::retry_after) (1 s by default), so that clients shed
//!   together do not come back together. Over HTTP, `Retry-After` is whole seconds rounded
//!   up: with the default base, 1, 2 or 3 (a base below a second is 1 whatever the draw;
//!   give a base of a second or more when HTTP clients must be spread). The draw is a hash of
//!   the budget's shed count: no lock, no allocation.
//! - The [`BackpressureHandle`] reports the requests in flight, waiting and shed, and changes
//!   the limit at run time. Shedding emits a `tracing` `WARN` event at most once a second,
//!   with the count shed since the last one.
//!
//! # How it differs from its neighbours
//!
//! - tower's `ConcurrencyLimit` takes the permit in `poll_ready` and waits for it there with
//!   no bound: a service made ready and left idle (a keep-alive connection between requests)
//!   holds a permit, and under Axum's always-ready router requests queue without limit. This
//!   layer reserves nothing in `poll_ready`, waits only as long as you allow, and sheds.
//! - tower's `LoadShed` sheds only when the service below is not ready; it bounds nothing
//!   by itself.
//! - [`rate_limit`](crate::rate_limit) bounds how many requests *start* per second; this layer
//!   bounds how many *run* at once, which is what a slow dependency or a full thread pool
//!   feels. They go well together.
//! - tower-resilience's bulkhead does the same job with a semaphore, behind a boxed future and
//!   a clock read per call; its permit ends with the response head, and its limit is fixed
//!   (tower-resilience adapts limits in a separate layer).
//!
//! # Where to place this layer
//!
//! ```text
//!  RejectionLayer::http()          turns the Overloaded rejection into a 503 + Retry-After
//!   └ RateLimitLayer               refuse excess rate first: cheap, and sheds before queueing
//!      └ BackpressureLayer         bound the work in flight
//!         └ IdempotencyLayer, handlers ...
//! ```
//!
//! - **Below [`RejectionLayer`](crate::RejectionLayer)**, so a shed request becomes a 503 with
//!   `Retry-After` (HTTP) or `UNAVAILABLE` (gRPC) and the stack stays `Infallible`.
//! - **Outside the expensive parts** (handlers, database calls), so that the work it
//!   bounds is the work that costs.
//! - **Under Axum**, shedding at once (the default) or waiting briefly (`max_wait` of a few
//!   milliseconds) is right: Axum's router is always ready and would otherwise let requests
//!   pile up. The budget is shared by every route the layer is applied to.
//! - **In hyper's connection tasks**, nothing is held between requests, because `poll_ready`
//!   reserves no permit.
//! - **With a `tower::buffer::Buffer` above it**, the Buffer's worker calls this layer and
//!   hands the response future back at once (waiting happens in the response future, not in
//!   `poll_ready`), so the worker never stalls. The Buffer's channel adds up to its `bound`
//!   requests queued *before* this layer: they are not counted in
//!   [`waiting`](BackpressureHandle::waiting) and their time in the channel is not bounded by
//!   `max_wait`. The total in flight stays at most the limit; the total admitted into the
//!   stack is at most the limit plus `max_queue` waiters plus the Buffer's bound. Keep the
//!   bound small.
//! - **With a Buffer (or any service that can be not ready) below it**, the inner readiness
//!   never holds back a shed (tower's `LoadShed` pattern): this layer's `poll_ready` is ready
//!   at once, a request that finds the budget spent is shed at once, and an admitted request
//!   waits for the inner readiness in its response future, holding its permit (so at most the
//!   limit wait there). A request waiting for a permit keeps the inner slot its `poll_ready`
//!   reserved, if it got one, until it is admitted (or dropped). Put a timeout above if the
//!   wait for the inner readiness must be bounded too.
//! - **On a client** (in front of one dependency), wait a little (`max_wait`) rather than shed,
//!   and put a retry layer above it that honours the rejection's `retry_after`.
//!
//! Waiting needs the service below to be `Clone` (Axum, tonic, hyper and `Buffer` services
//! are): the waiting request keeps the service `poll_ready` made ready, and a clone stays in
//! place for the next call.
//!
//! # Example
//!
//! ```
//! use std::convert::Infallible;
//! use std::time::Duration;
//! use tower::{Service, ServiceBuilder, ServiceExt};
//! use tower_bulwark::backpressure::BackpressureLayer;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let layer = BackpressureLayer::new(2)
//!     .max_wait(Duration::from_millis(50))
//!     .max_queue(16);
//! let handle = layer.handle();
//! let mut svc = ServiceBuilder::new()
//!     .layer(layer)
//!     .service_fn(|n: u32| async move { Ok::<_, Infallible>(n * 2) });
//!
//! let a = svc.ready().await.unwrap().call(1);
//! let b = svc.ready().await.unwrap().call(2);
//! assert_eq!(handle.in_flight(), 2); // each response future holds a permit
//! drop(a); // dropped unpolled: its permit comes back at once
//! assert_eq!(handle.in_flight(), 1);
//! assert_eq!(b.await.unwrap(), 4);
//! assert_eq!(handle.in_flight(), 0);
//! # }
//! ```
//!
//! Shedding, seen through the rejection:
//!
//! ```
//! use std::convert::Infallible;
//! use tower::{Service, ServiceExt};
//! use tower_bulwark::backpressure::BackpressureLayer;
//! use tower_bulwark::{Rejection, RejectionKind};
//! use tower::Layer;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let layer = BackpressureLayer::new(1);
//! let mut svc = layer.layer(tower::service_fn(|n: u32| async move {
//!     Ok::<_, Infallible>(n)
//! }));
//! let running = svc.ready().await.unwrap().call(1); // holds the permit until dropped
//! let err = svc.ready().await.unwrap().call(2).await.unwrap_err();
//! let rejection = err.downcast_ref::<Rejection>().unwrap();
//! assert_eq!(rejection.kind(), RejectionKind::Overloaded);
//! assert!(rejection.retry_after().is_some());
//! assert_eq!(layer.handle().shed(), 1);
//! drop(running);
//! assert_eq!(svc.ready().await.unwrap().call(3).await.unwrap(), 3);
//! # }
//! ```
//!
//! In an HTTP stack, through [`RejectionLayer`](crate::RejectionLayer):
//!
//! ```
//! use std::convert::Infallible;
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::Full;
//! use tower::{Service, ServiceBuilder, ServiceExt};
//! use tower_bulwark::backpressure::BackpressureLayer;
//! use tower_bulwark::RejectionLayer;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let mut svc = ServiceBuilder::new()
//!     .layer(RejectionLayer::http())
//!     .layer(BackpressureLayer::new(1))
//!     .service_fn(|_: Request<()>| async {
//!         Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("ok"))))
//!     });
//! let busy = svc.ready().await.unwrap().call(Request::new(())); // holds the only permit
//! let res = svc.ready().await.unwrap().call(Request::new(())).await.unwrap();
//! assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
//! // The 1 s hint, spread over [1 s, 3 s): 1, 2 or 3 in whole seconds.
//! let after = res.headers()["retry-after"].to_str().unwrap();
//! assert!(["1", "2", "3"].contains(&after));
//! assert_eq!(res.headers()["content-type"], "application/problem+json");
//! assert_eq!(busy.await.unwrap().status(), StatusCode::OK);
//! # }
//! ```
//!
//! # Tests under paused time
//!
//! Waiting uses `tokio::time`, so `#[tokio::test(start_paused = true)]` and
//! `tokio::time::advance` drive `max_wait`, and the shedding event's once-a-second limit
//! follows tokio's time too. For adaptive limits, measure latency on tokio's clock as well:
//! `Adaptive::gradient(..).clock(Clock::tokio())`, made inside the test. The clock is part of
//! the adaptive configuration the budget is made from (there is no clock to set on the layer,
//! which may share a budget with others).
//!
//! # Order of admission
//!
//! Waiters are woken in the order they started waiting, one per permit given back. There is
//! no hand-off: a request that arrives while a permit is free takes it at once, even if others
//! are waiting, and a woken waiter that finds the permit gone waits again, at the end of the
//! line, up to its deadline. Under overload this favours fresh requests, whose callers are
//! still there, over ones that have waited longest.
//!
//! # Cost and memory
//!
//! With a fixed limit, admitting and releasing a request are one atomic operation each, on
//! one cache line, with no lock, no allocation and no reference count: a permit is three words
//! and refers to its budget's hot state (the limit, the count in flight, the waiters) by a
//! `'static` reference. That state is allocated once and reused: when a budget is gone and its
//! last permit is back, it returns to a process-wide pool the next budget draws from, so the
//! memory held is bounded by the most budgets alive at once (about a hundred bytes each). An
//! adaptive budget's permits also hold a reference to the budget and read the clock when the
//! request is admitted and when its response (its head, with `hold_until_body_end`) is
//! ready; an adaptive budget also counts each window's latencies in about 120 buckets
//! (1.5 KB, once per budget), two atomic adds per completed request. Waiting requests allocate one small box each.
//!
//! # Cancel safety
//!
//! Dropping a response future at any point (waiting, running) or a [`PermitBody`] at any point
//! of the body gives its permit or its place in the queue back at once: the release is in
//! `Drop`, never in a completion branch.

mod adaptive;
mod error;
pub mod future;
mod layer;
mod service;
mod state;

pub use self::adaptive::{Adaptive, Aimd, Dropped, Estimate, Gradient, Sample};
pub use self::error::ConfigError;
pub use self::future::{PermitBody, ResponseFuture};
pub use self::layer::{BackpressureLayer, ReleaseOnBodyEnd, ReleaseOnResponse};
pub use self::service::Backpressure;
pub use self::state::BackpressureHandle;

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn public_types_are_send_and_sync() {
        assert_send_sync::<BackpressureLayer>();
        assert_send_sync::<BackpressureLayer<ReleaseOnBodyEnd>>();
        assert_send_sync::<BackpressureHandle>();
        assert_send_sync::<Backpressure<tower::util::BoxCloneSyncService<(), (), ()>>>();
        assert_send_sync::<PermitBody<http_body_util::Empty<bytes::Bytes>>>();
        assert_send_sync::<Adaptive>();
        assert_send_sync::<ConfigError>();
    }
}

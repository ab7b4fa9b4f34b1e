//! Upper bounds on the size of the response futures: every layer above moves the future of the
//! layer below, so a few bytes more on a rarely used state are paid on every request (a
//! three-word backpressure permit once made the fixed-limit admit path 3.5x slower). The bounds
//! are today's sizes on the crate's toolchain; a change that grows a future past one must say
//! why, in the bench figures and here.

use std::convert::Infallible;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{Empty, Full};
use tower::{Layer, Service, ServiceBuilder};
use tower_bulwark::{
    BackpressureLayer, BreakerConfig, CircuitBreakerLayer, IdempotencyLayer, MemoryStore, Quota,
    RateLimitLayer, RetryLayer, RetryPolicy,
};

/// A ready HTTP service answering an empty 200.
#[derive(Clone, Copy, Debug, Default)]
struct NoopHttp;

impl<B> Service<Request<B>> for NoopHttp {
    type Response = Response<Empty<Bytes>>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: Request<B>) -> Self::Future {
        std::future::ready(Ok(Response::new(Empty::new())))
    }
}

/// A ready service answering `()`.
#[derive(Clone, Copy, Debug, Default)]
struct Noop;

impl Service<u64> for Noop {
    type Response = ();
    type Error = Infallible;
    type Future = std::future::Ready<Result<(), Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: u64) -> Self::Future {
        std::future::ready(Ok(()))
    }
}

fn future_size<S: Service<R>, R>(_: &S) -> usize {
    std::mem::size_of::<S::Future>()
}

fn quota() -> Quota {
    Quota::per_second(1_000).expect("valid quota")
}

fn breaker() -> CircuitBreakerLayer {
    CircuitBreakerLayer::new(BreakerConfig::default()).expect("valid config")
}

#[test]
fn the_layers_futures_stay_small_around_a_tiny_future() {
    let sizes = [
        (
            "backpressure",
            future_size(&BackpressureLayer::new(8).layer(Noop)),
            32,
        ),
        ("circuit breaker", future_size(&breaker().layer(Noop)), 72),
        (
            "rate limit",
            future_size(&RateLimitLayer::new(quota()).layer(Noop)),
            24,
        ),
    ];
    for (layer, size, bound) in sizes {
        eprintln!("{layer}: {size} bytes (bound {bound})");
    }
    for (layer, size, bound) in sizes {
        assert!(size <= bound, "{layer}: {size} bytes, bound {bound}");
    }
}

#[test]
fn the_recommended_stack_future_stays_within_its_bound() {
    let stack = ServiceBuilder::new()
        .layer(IdempotencyLayer::new(MemoryStore::default()))
        .layer(RateLimitLayer::new(quota()))
        .layer(BackpressureLayer::new(1 << 20))
        .layer(RetryLayer::new(RetryPolicy::http()).expect("valid policy"))
        .layer(breaker())
        .service(NoopHttp);
    let size = future_size::<_, Request<Full<Bytes>>>(&stack);
    assert!(size <= 496, "the five-layer stack's future: {size} bytes");
    let retry = RetryLayer::new(RetryPolicy::http())
        .expect("valid policy")
        .layer(breaker().layer(NoopHttp));
    let size = future_size::<_, Request<Full<Bytes>>>(&retry);
    assert!(size <= 448, "retry over a breaker: {size} bytes");
}

//! Benches for the `circuit_breaker` layer and its peers.
#![allow(dead_code, unused_imports)]

use std::future::Future;
use std::hint::black_box;

use criterion::{measurement::WallTime, BenchmarkGroup, Criterion, Throughput};
use tower::{Layer, Service};

use super::common::{call_ready, poll_once, two_threads, Noop};

fn bulwark() -> impl Service<u64, Response = (), Error = tower::BoxError> + Clone + Send {
    use tower_bulwark::circuit_breaker::{BreakerConfig, CircuitBreakerLayer};
    CircuitBreakerLayer::new(BreakerConfig::default())
        .expect("valid configuration")
        .layer(Noop::<()>::default())
}

fn tower_resilience() -> impl Service<u64, Response = ()> + Clone + Send {
    tower_resilience::circuitbreaker::CircuitBreakerLayer::builder()
        .failure_rate_threshold(0.5)
        .sliding_window_size(100)
        .build()
        .expect("valid configuration")
        .layer(Noop::<()>::default())
}

/// `poll_ready`, `call`, then polls the response until it is ready: under 2 threads a peer
/// that takes an async lock may be pending for a moment (`common::call_ready` would panic).
#[inline]
fn call_spin<S: Service<u64>>(svc: &mut S, req: u64) -> bool {
    use std::task::{Context, Poll, Waker};
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        match svc.poll_ready(&mut cx) {
            Poll::Ready(Ok(())) => break,
            Poll::Ready(Err(_)) => return false,
            Poll::Pending => std::hint::spin_loop(),
        }
    }
    let mut fut = std::pin::pin!(svc.call(req));
    loop {
        match fut.as_mut().poll(&mut cx) {
            Poll::Ready(out) => return out.is_ok(),
            Poll::Pending => std::hint::spin_loop(),
        }
    }
}

/// failsafe is not a tower layer: its breaker wraps the service's response future.
#[derive(Clone)]
struct Failsafe<B> {
    breaker: B,
    svc: Noop<()>,
}

fn failsafe() -> Failsafe<impl failsafe::futures::CircuitBreaker + Clone + Send> {
    Failsafe {
        breaker: failsafe::Config::new().build(),
        svc: Noop::default(),
    }
}

impl<B: failsafe::futures::CircuitBreaker> Failsafe<B> {
    #[inline]
    fn call(&mut self, req: u64) -> bool {
        let fut = self.svc.call(req);
        poll_once(self.breaker.call(fut)).is_ok()
    }

    #[inline]
    fn call_spin(&mut self, req: u64) -> bool {
        use std::future::Future;
        use std::task::{Context, Poll, Waker};
        let mut cx = Context::from_waker(Waker::noop());
        let mut fut = std::pin::pin!(self.breaker.call(self.svc.call(req)));
        loop {
            match fut.as_mut().poll(&mut cx) {
                Poll::Ready(out) => return out.is_ok(),
                Poll::Pending => std::hint::spin_loop(),
            }
        }
    }
}

/// Entries of the `overhead` group (single thread).
pub fn overhead(g: &mut BenchmarkGroup<'_, WallTime>) {
    g.bench_function("bulwark/circuit_breaker_closed", |b| {
        let mut svc = bulwark();
        b.iter(|| assert!(call_ready(&mut svc, black_box(7u64))))
    });
    g.bench_function("tower_resilience/circuit_breaker", |b| {
        let mut svc = tower_resilience();
        b.iter(|| assert!(call_ready(&mut svc, black_box(7u64))))
    });
    g.bench_function("failsafe/circuit_breaker", |b| {
        let mut svc = failsafe();
        b.iter(|| assert!(svc.call(black_box(7u64))))
    });
}

/// Entries of the `contention` bench (2 threads on one shared instance).
pub fn contention(c: &mut Criterion) {
    let mut g = c.benchmark_group("contention");
    g.throughput(Throughput::Elements(1));
    g.bench_function("bulwark/circuit_breaker_closed", |b| {
        let svc = bulwark();
        b.iter_custom(|iters| {
            two_threads(iters, || {
                let mut svc = svc.clone();
                move || assert!(call_spin(&mut svc, black_box(7u64)))
            })
        })
    });
    g.bench_function("tower_resilience/circuit_breaker", |b| {
        let svc = tower_resilience();
        b.iter_custom(|iters| {
            two_threads(iters, || {
                let mut svc = svc.clone();
                move || assert!(call_spin(&mut svc, black_box(7u64)))
            })
        })
    });
    g.bench_function("failsafe/circuit_breaker", |b| {
        let svc = failsafe();
        b.iter_custom(|iters| {
            two_threads(iters, || {
                let mut svc = svc.clone();
                move || assert!(svc.call_spin(black_box(7u64)))
            })
        })
    });
    g.finish();
}

//! Benches for the `retry` layer and its peers.
#![allow(dead_code, unused_imports)]

use std::convert::Infallible;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use criterion::{measurement::WallTime, BenchmarkGroup, Criterion, Throughput};
use tower::retry::budget::{Budget as _, TpsBudget};
use tower::{BoxError, Layer, Service};
use tower_bulwark::retry::{Backoff, Budget, RetryLayer, RetryPolicy};

use super::common::{call_ready, call_until_ready, two_threads, Noop};

/// tower's Retry with a policy that never retries (but keeps a clone of the request, as a
/// policy that may retry must).
#[derive(Clone)]
struct NeverRetry;

impl<Req: Clone, Res, E> tower::retry::Policy<Req, Res, E> for NeverRetry {
    type Future = std::future::Ready<()>;

    fn retry(&mut self, _req: &mut Req, _result: &mut Result<Res, E>) -> Option<Self::Future> {
        None
    }

    fn clone_request(&mut self, req: &Req) -> Option<Req> {
        Some(req.clone())
    }
}

/// tower's Retry with its `TpsBudget`, as tower's docs advise: deposit on success, withdraw
/// to retry.
#[derive(Clone)]
struct BudgetRetry(Arc<TpsBudget>);

impl<Req: Clone, Res, E> tower::retry::Policy<Req, Res, E> for BudgetRetry {
    type Future = std::future::Ready<()>;

    fn retry(&mut self, _req: &mut Req, result: &mut Result<Res, E>) -> Option<Self::Future> {
        match result {
            Ok(_) => {
                self.0.deposit();
                None
            }
            Err(_) => self.0.withdraw().then(|| std::future::ready(())),
        }
    }

    fn clone_request(&mut self, req: &Req) -> Option<Req> {
        Some(req.clone())
    }
}

fn tps_budget() -> BudgetRetry {
    BudgetRetry(Arc::new(TpsBudget::new(Duration::from_secs(10), 10, 0.2)))
}

/// Fails every other call (counted across clones), answering at once.
#[derive(Clone, Default)]
struct EveryOther(Arc<AtomicU64>);

impl Service<u64> for EveryOther {
    type Response = ();
    type Error = BoxError;
    type Future = std::future::Ready<Result<(), BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: u64) -> Self::Future {
        if self.0.fetch_add(1, Ordering::Relaxed).is_multiple_of(2) {
            std::future::ready(Err(BoxError::from("reset")))
        } else {
            std::future::ready(Ok(()))
        }
    }
}

/// A ready HTTP service that answers an empty 200 at once.
#[derive(Clone, Copy)]
struct NoopHttp;

impl<B> Service<http::Request<B>> for NoopHttp {
    type Response = http::Response<http_body_util::Empty<bytes::Bytes>>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: http::Request<B>) -> Self::Future {
        std::future::ready(Ok(http::Response::new(http_body_util::Empty::new())))
    }
}

/// An empty GET.
fn http_get() -> http::Request<http_body_util::Full<bytes::Bytes>> {
    http::Request::new(http_body_util::Full::new(bytes::Bytes::new()))
}

fn bulwark_default() -> RetryLayer {
    RetryLayer::new(RetryPolicy::errors()).expect("the default policy is valid")
}

/// Entries of the `overhead` group (single thread).
pub fn overhead(g: &mut BenchmarkGroup<'_, WallTime>) {
    g.bench_function("bulwark/retry_success", |b| {
        let mut svc = bulwark_default().layer(Noop::<()>::default());
        b.iter(|| call_ready(&mut svc, black_box(7u64)))
    });
    g.bench_function("bulwark/retry_one_retry_zero_backoff", |b| {
        // Every request fails once and is retried at once; a budget that allows it.
        let budget = Budget::ratio(1.0).expect("valid");
        let layer = RetryLayer::new(
            RetryPolicy::errors()
                .backoff(Backoff::none())
                .budget(budget),
        )
        .expect("valid");
        let mut svc = layer.layer(EveryOther::default());
        // The retry yields to the runtime once before it is made (polled again at once here).
        b.iter(|| assert!(call_until_ready(&mut svc, black_box(7u64))))
    });
    g.bench_function("bulwark/retry_http_success", |b| {
        let layer = RetryLayer::new(RetryPolicy::http()).expect("valid policy");
        let mut svc = layer.layer(NoopHttp);
        b.iter(|| assert!(call_ready(&mut svc, black_box(http_get()))))
    });
    g.bench_function("bare/http", |b| {
        let mut svc = NoopHttp;
        b.iter(|| assert!(call_ready(&mut svc, black_box(http_get()))))
    });
    g.bench_function("tower/retry_success", |b| {
        let mut svc = tower::retry::Retry::new(NeverRetry, Noop::<()>::default());
        b.iter(|| call_ready(&mut svc, black_box(7u64)))
    });
    g.bench_function("tower/retry_budget", |b| {
        let mut svc = tower::retry::Retry::new(tps_budget(), Noop::<()>::default());
        b.iter(|| call_ready(&mut svc, black_box(7u64)))
    });
    g.bench_function("tower_resilience/retry_success", |b| {
        let layer = tower_resilience::retry::RetryLayer::<u64, (), Infallible>::builder()
            .max_attempts(3)
            .build();
        let mut svc = layer.layer(Noop::<()>::default());
        b.iter(|| call_ready(&mut svc, black_box(7u64)))
    });
}

/// Entries of the `contention` bench (2 threads on one shared instance).
pub fn contention(c: &mut Criterion) {
    let mut g = c.benchmark_group("contention");
    g.throughput(Throughput::Elements(1));
    g.bench_function("bulwark/retry_success", |b| {
        let svc = bulwark_default().layer(Noop::<()>::default());
        b.iter_custom(|iters| {
            two_threads(iters, || {
                let mut svc = svc.clone();
                move || {
                    call_ready(&mut svc, black_box(7u64));
                }
            })
        })
    });
    g.bench_function("tower/retry_budget", |b| {
        let svc = tower::retry::Retry::new(tps_budget(), Noop::<()>::default());
        b.iter_custom(|iters| {
            two_threads(iters, || {
                let mut svc = svc.clone();
                move || {
                    call_ready(&mut svc, black_box(7u64));
                }
            })
        })
    });
    g.finish();
}

//! All five layers stacked around a ready no-op HTTP service, beside tower's own stack and a
//! stack of peers, with the same request and response types.
#![allow(dead_code, unused_imports)]

use std::convert::Infallible;
use std::hint::black_box;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use criterion::{measurement::WallTime, BenchmarkGroup, Criterion, Throughput};
use http::{Request, Response};
use http_body_util::{Empty, Full};
use tower::retry::budget::{Budget as _, TpsBudget};
use tower::{BoxError, Layer, Service, ServiceBuilder};
use tower_bulwark::{
    BackpressureLayer, BreakerConfig, CircuitBreakerLayer, IdempotencyLayer, MemoryStore, Quota,
    RateLimitLayer, RetryLayer, RetryPolicy,
};

use super::common::{call_ready, timer_runtime, two_threads};

/// A ready HTTP service that answers at once with an empty 200.
#[derive(Clone, Copy, Debug, Default)]
struct NoopHttp;

impl<B> Service<Request<B>> for NoopHttp {
    type Response = Response<Empty<Bytes>>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    #[inline]
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    #[inline]
    fn call(&mut self, _req: Request<B>) -> Self::Future {
        std::future::ready(Ok(Response::new(Empty::new())))
    }
}

fn req() -> Request<Full<Bytes>> {
    Request::new(Full::new(Bytes::new()))
}

fn generous() -> Quota {
    Quota::per_period(1_000_000_000, Duration::from_secs(1))
        .and_then(|q| q.burst(u32::MAX))
        .expect("valid quota")
}

/// Idempotency > RateLimit > Backpressure > Retry (HTTP policy, budget on) > CircuitBreaker,
/// default configurations (limits that the bench never reaches). The request is a GET, which
/// the idempotency layer passes through.
fn bulwark_stack(
) -> impl Service<Request<Full<Bytes>>, Response = Response<impl Sized>> + Clone + Send {
    ServiceBuilder::new()
        .layer(IdempotencyLayer::new(MemoryStore::default()))
        .layer(RateLimitLayer::new(generous()))
        .layer(BackpressureLayer::new(1 << 20))
        .layer(RetryLayer::new(RetryPolicy::http()).expect("valid policy"))
        .layer(CircuitBreakerLayer::new(BreakerConfig::default()).expect("valid config"))
        .service(NoopHttp)
}

#[derive(Clone)]
struct NeverRetry;

impl<Req, Res, E> tower::retry::Policy<Req, Res, E> for NeverRetry {
    type Future = std::future::Ready<()>;
    fn retry(&mut self, _req: &mut Req, _res: &mut Result<Res, E>) -> Option<Self::Future> {
        None
    }
    fn clone_request(&mut self, _req: &Req) -> Option<Req> {
        None
    }
}

/// tower's stack: LoadShed > ConcurrencyLimit > RateLimit > Retry (never retries).
fn tower_stack() -> impl Service<Request<Full<Bytes>>> {
    ServiceBuilder::new()
        .load_shed()
        .concurrency_limit(1 << 20)
        .rate_limit(u64::MAX, Duration::from_secs(1))
        .retry(NeverRetry)
        .service(NoopHttp)
}

#[derive(Clone)]
struct BudgetRetry(Arc<TpsBudget>);

impl<B, Res, E> tower::retry::Policy<Request<B>, Res, E> for BudgetRetry
where
    Request<B>: Clone,
{
    type Future = std::future::Ready<()>;
    fn retry(&mut self, _req: &mut Request<B>, res: &mut Result<Res, E>) -> Option<Self::Future> {
        match res {
            Ok(_) => {
                self.0.deposit();
                None
            }
            Err(_) => self.0.withdraw().then(|| std::future::ready(())),
        }
    }
    fn clone_request(&mut self, req: &Request<B>) -> Option<Request<B>> {
        Some(req.clone())
    }
}

/// tower's stack with a Retry that can retry: its policy clones the request for another
/// attempt and draws on a `TpsBudget`, as a retry layer must to be able to resend a request.
fn tower_stack_retrying() -> impl Service<Request<Full<Bytes>>> {
    ServiceBuilder::new()
        .load_shed()
        .concurrency_limit(1 << 20)
        .rate_limit(u64::MAX, Duration::from_secs(1))
        .layer(tower::retry::RetryLayer::new(BudgetRetry(Arc::new(
            TpsBudget::new(Duration::from_secs(10), 10, 0.2),
        ))))
        .service(NoopHttp)
}

/// The stack without its retry layer: what the other four layers cost together.
fn bulwark_stack_without_retry(
) -> impl Service<Request<Full<Bytes>>, Response = Response<impl Sized>> + Clone + Send {
    ServiceBuilder::new()
        .layer(IdempotencyLayer::new(MemoryStore::default()))
        .layer(RateLimitLayer::new(generous()))
        .layer(BackpressureLayer::new(1 << 20))
        .layer(CircuitBreakerLayer::new(BreakerConfig::default()).expect("valid config"))
        .service(NoopHttp)
}

/// The least any layer that may resend a request pays: a copy of the method and URI, made and
/// dropped around the no-op service.
fn head_copy() -> impl Service<Request<Full<Bytes>>> {
    ServiceBuilder::new()
        .map_request(|req: Request<Full<Bytes>>| {
            black_box((req.method().clone(), req.uri().clone()));
            req
        })
        .service(NoopHttp)
}

/// governor has no tower layer: the check a user writes by hand, in front of the service.
#[derive(Clone)]
struct Governed<S> {
    limiter: Arc<governor::DefaultDirectRateLimiter>,
    inner: S,
}

impl<S, Req> Service<Req> for Governed<S>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = futures_util::future::Either<
        futures_util::future::MapErr<S::Future, fn(S::Error) -> BoxError>,
        std::future::Ready<Result<S::Response, BoxError>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        use futures_util::TryFutureExt;
        match self.limiter.check() {
            Ok(()) => futures_util::future::Either::Left(
                self.inner
                    .call(req)
                    .map_err(Into::into as fn(S::Error) -> BoxError),
            ),
            Err(_) => {
                futures_util::future::Either::Right(std::future::ready(Err("rate limited".into())))
            }
        }
    }
}

/// Peers: tower ConcurrencyLimit > tower-resilience breaker > governor > tower Retry with a
/// TpsBudget.
fn peers_stack() -> impl Service<Request<Full<Bytes>>> {
    let limiter = Arc::new(governor::RateLimiter::direct(
        governor::Quota::per_second(NonZeroU32::MAX).allow_burst(NonZeroU32::MAX),
    ));
    let breaker = tower_resilience::circuitbreaker::CircuitBreakerLayer::builder()
        .failure_rate_threshold(0.5)
        .sliding_window_size(100)
        .build()
        .expect("valid configuration");
    let retried = tower::retry::Retry::new(
        BudgetRetry(Arc::new(TpsBudget::new(Duration::from_secs(10), 10, 0.2))),
        NoopHttp,
    );
    let governed = Governed {
        limiter,
        inner: retried,
    };
    tower::limit::ConcurrencyLimit::new(breaker.layer(governed), 1 << 20)
}

/// One entry: `make`'s service called with an empty GET. A runtime is entered for every
/// entry alike (tower's rate limit and the peers' breaker need one to be built and called).
fn entry<S>(g: &mut BenchmarkGroup<'_, WallTime>, name: &str, make: impl Fn() -> S)
where
    S: Service<Request<Full<Bytes>>>,
{
    g.bench_function(name, |b| {
        let rt = timer_runtime();
        let _guard = rt.enter();
        let mut svc = make();
        b.iter(|| assert!(call_ready(&mut svc, black_box(req()))))
    });
}

/// Entries of the `overhead` group (single thread).
pub fn overhead(g: &mut BenchmarkGroup<'_, WallTime>) {
    entry(g, "bulwark/stack_all", bulwark_stack);
    entry(g, "tower/stack", tower_stack);
    entry(
        g,
        "bulwark/stack_all_but_retry",
        bulwark_stack_without_retry,
    );
    entry(g, "tower/stack_retrying", tower_stack_retrying);
    entry(g, "bare/http_head_copy", head_copy);
    entry(g, "peers/stack", peers_stack);
}

/// Entries of the `contention` bench (2 threads on one shared instance).
pub fn contention(c: &mut Criterion) {
    let mut g = c.benchmark_group("contention");
    g.throughput(Throughput::Elements(1));
    g.bench_function("bulwark/stack_all", |b| {
        let svc = bulwark_stack();
        b.iter_custom(|iters| {
            two_threads(iters, || {
                let mut svc = svc.clone();
                move || assert!(call_ready(&mut svc, black_box(req())))
            })
        })
    });
    g.finish();
}

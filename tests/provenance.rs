//! Whose refusal a rejection is: a refusal made for the request by a layer of this crate
//! below the idempotency layer releases its key (the handler never ran), also when the layer
//! refused after another layer made the request wait; a rejection the handler returns as its
//! own error keeps the key as run.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
use tower_bulwark::clock::Clock;
use tower_bulwark::rate_limit::RateLimitConfig;
use tower_bulwark::retry::IDEMPOTENCY_KEY;
use tower_bulwark::{
    BackpressureLayer, BreakerConfig, CircuitBreakerLayer, IdempotencyLayer, MemoryStore, Quota,
    RateLimitLayer, Rejection, RejectionKind,
};

fn keyed() -> Request<Full<Bytes>> {
    Request::builder()
        .method(Method::POST)
        .uri("http://svc/orders")
        .header(IDEMPOTENCY_KEY, "\"order-1\"")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap()
}

fn store() -> MemoryStore {
    MemoryStore::builder()
        .clock(Clock::tokio())
        .build()
        .unwrap()
}

fn kind(e: &BoxError) -> Option<RejectionKind> {
    e.downcast_ref::<Rejection>().map(Rejection::kind)
}

/// The breaker below a rate limit that made the request wait for its turn: its refusal comes
/// after the wait, from a call the rate limit made later, yet it is this request's.
#[tokio::test(start_paused = true)]
async fn a_refusal_after_a_rate_limit_wait_releases_the_key() {
    let runs = Arc::new(AtomicU32::new(0));
    let r = runs.clone();
    let breaker =
        CircuitBreakerLayer::new(BreakerConfig::consecutive_failures(1).clock(Clock::tokio()))
            .unwrap();
    let handle = breaker.handle();
    let limit = RateLimitLayer::new(
        RateLimitConfig::new(Quota::per_second(10).unwrap().burst(1).unwrap())
            .clock(Clock::tokio()),
    )
    .wait_up_to(Duration::from_secs(1));
    let mut svc = ServiceBuilder::new()
        .layer(IdempotencyLayer::new(store()))
        .layer(limit)
        .layer(breaker)
        .service(tower::service_fn(move |_req: Request<Full<Bytes>>| {
            let r = r.clone();
            async move {
                r.fetch_add(1, Ordering::SeqCst);
                Ok::<_, BoxError>(Response::new(Full::new(Bytes::from_static(b"made"))))
            }
        }));
    // The limit's one token is spent, so the keyed request waits 100 ms for its turn.
    let mut other = keyed();
    other.headers_mut().remove(IDEMPOTENCY_KEY);
    svc.ready().await.unwrap().call(other).await.unwrap();
    handle.force_open();
    let err = svc.ready().await.unwrap().call(keyed()).await.unwrap_err();
    assert_eq!(kind(&err), Some(RejectionKind::CircuitOpen));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    // The key was released: once the breaker closes, the same request runs.
    handle.force_closed();
    tokio::time::advance(Duration::from_secs(1)).await;
    let res = svc.ready().await.unwrap().call(keyed()).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

/// The same below a backpressure queue: the breaker's refusal comes from the call the queue
/// made once a permit was free.
#[tokio::test(start_paused = true)]
async fn a_refusal_after_a_queue_wait_releases_the_key() {
    let runs = Arc::new(AtomicU32::new(0));
    let r = runs.clone();
    let breaker =
        CircuitBreakerLayer::new(BreakerConfig::consecutive_failures(1).clock(Clock::tokio()))
            .unwrap();
    let handle = breaker.handle();
    let bp = BackpressureLayer::new(1).max_wait(Duration::from_secs(5));
    let svc = ServiceBuilder::new()
        .layer(IdempotencyLayer::new(store()))
        .layer(bp)
        .layer(breaker)
        .service(tower::service_fn(move |req: Request<Full<Bytes>>| {
            let r = r.clone();
            async move {
                if req.headers().get(IDEMPOTENCY_KEY).is_none() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                } else {
                    r.fetch_add(1, Ordering::SeqCst);
                }
                Ok::<_, BoxError>(Response::new(Full::new(Bytes::from_static(b"made"))))
            }
        }));
    let mut holder = keyed();
    holder.headers_mut().remove(IDEMPOTENCY_KEY);
    let held = tokio::spawn(svc.clone().oneshot(holder));
    tokio::task::yield_now().await;
    let queued = tokio::spawn(svc.clone().oneshot(keyed()));
    tokio::task::yield_now().await;
    // While the keyed request queues, the breaker opens.
    handle.force_open();
    held.await.unwrap().unwrap();
    let err = queued.await.unwrap().unwrap_err();
    assert_eq!(kind(&err), Some(RejectionKind::CircuitOpen));
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    handle.force_closed();
    let res = svc.oneshot(keyed()).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// A handler that ran, then returns as is a refusal its own client got: the key is kept as
/// run, and the repeat is not run again.
#[tokio::test(start_paused = true)]
async fn a_forwarded_refusal_keeps_the_key_as_run() {
    let runs = Arc::new(AtomicU32::new(0));
    let r = runs.clone();
    let svc = ServiceBuilder::new()
        .layer(IdempotencyLayer::new(store()))
        .service(tower::service_fn(move |_req: Request<Full<Bytes>>| {
            let r = r.clone();
            async move {
                r.fetch_add(1, Ordering::SeqCst);
                Err::<Response<Full<Bytes>>, BoxError>(
                    Rejection::circuit_open(Duration::from_secs(1)).into(),
                )
            }
        }));
    let first = svc.clone().oneshot(keyed()).await.unwrap_err();
    assert_eq!(kind(&first), Some(RejectionKind::CircuitOpen));
    let again = svc.oneshot(keyed()).await.unwrap_err();
    assert_eq!(
        kind(&again),
        Some(RejectionKind::IdempotencyResponseNotStored)
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

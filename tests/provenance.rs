//! Whose refusal a rejection is: a refusal made for the request by a layer of this crate
//! below the idempotency layer releases its key (the handler never ran), also when the layer
//! refused after another layer made the request wait; a rejection the handler returns as its
//! own error keeps the key as run. A timeout between the two that fires while a layer of this
//! crate still holds the request (queued, waiting for its turn) releases it too; one that fires
//! after the request may have run does not.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use tower::{BoxError, Layer, Service, ServiceBuilder, ServiceExt};
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

/// A timeout between the idempotency layer and a rate limit fires while the request waits
/// for its turn: the request never ran, so its key is released and the repeat runs.
#[tokio::test(start_paused = true)]
async fn a_timeout_during_a_rate_limit_wait_releases_the_key() {
    let runs = Arc::new(AtomicU32::new(0));
    let r = runs.clone();
    let limit = RateLimitLayer::new(
        RateLimitConfig::new(Quota::per_minute(1).unwrap()).clock(Clock::tokio()),
    )
    .wait_up_to(Duration::from_secs(120));
    let mut svc = ServiceBuilder::new()
        .layer(IdempotencyLayer::new(store()))
        .timeout(Duration::from_secs(1))
        .layer(limit)
        .service(tower::service_fn(move |_req: Request<Full<Bytes>>| {
            let r = r.clone();
            async move {
                r.fetch_add(1, Ordering::SeqCst);
                Ok::<_, BoxError>(Response::new(Full::new(Bytes::from_static(b"made"))))
            }
        }));
    let mut other = keyed();
    other.headers_mut().remove(IDEMPOTENCY_KEY);
    svc.ready().await.unwrap().call(other).await.unwrap();
    // The next turn is a minute away: the keyed request waits, and the timeout fires first.
    let err = svc.ready().await.unwrap().call(keyed()).await.unwrap_err();
    assert!(err.is::<tower::timeout::error::Elapsed>(), "{err}");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    tokio::time::advance(Duration::from_secs(60)).await;
    let res = svc.ready().await.unwrap().call(keyed()).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

/// A retry of its own between the idempotency layer and a queue: the first attempt ran the
/// handler and failed, the second timed out in the queue. The request did run, so the key is
/// kept as run, though the last attempt was dropped while held.
#[tokio::test(start_paused = true)]
async fn a_retry_whose_first_attempt_ran_keeps_the_key_though_the_last_timed_out_queued() {
    #[derive(Clone)]
    struct TwoTries<S>(S);
    impl<S> Service<Request<Full<Bytes>>> for TwoTries<S>
    where
        S: Service<Request<Full<Bytes>>, Response = Response<Full<Bytes>>, Error = BoxError>
            + Clone
            + Send
            + 'static,
        S::Future: Send,
    {
        type Response = Response<Full<Bytes>>;
        type Error = BoxError;
        type Future = std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<Self::Response, BoxError>> + Send>,
        >;
        fn poll_ready(
            &mut self,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), BoxError>> {
            self.0.poll_ready(cx)
        }
        fn call(&mut self, req: Request<Full<Bytes>>) -> Self::Future {
            let (parts, body) = req.into_parts();
            let again = Request::from_parts(parts.clone(), body.clone());
            // The first attempt is called here, the second from the future.
            let first = self.0.call(Request::from_parts(parts, body));
            let mut svc = self.0.clone();
            Box::pin(async move {
                match first.await {
                    Ok(res) => Ok(res),
                    Err(_) => {
                        // A backoff: the request queued behind takes the permit meanwhile.
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        svc.ready().await?.call(again).await
                    }
                }
            })
        }
    }
    let runs = Arc::new(AtomicU32::new(0));
    let r = runs.clone();
    let bp = BackpressureLayer::new(1).max_wait(Duration::from_secs(60));
    let handler = tower::service_fn(move |req: Request<Full<Bytes>>| {
        let r = r.clone();
        async move {
            if req.headers().get(IDEMPOTENCY_KEY).is_none() {
                // Another request, holding the one permit for 5 s.
                tokio::time::sleep(Duration::from_secs(5)).await;
                return Ok(Response::new(Full::new(Bytes::new())));
            }
            r.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(10)).await;
            Err::<Response<Full<Bytes>>, BoxError>("the handler failed after its effect".into())
        }
    });
    // The other request shares the permit, without a timeout.
    let other_route = BackpressureLayer::shared(&bp.handle())
        .max_wait(Duration::from_secs(60))
        .layer(handler.clone());
    let inner = ServiceBuilder::new()
        .timeout(Duration::from_secs(1))
        .layer(bp)
        .service(handler);
    let svc = ServiceBuilder::new()
        .layer(IdempotencyLayer::new(store()))
        .service(TwoTries(inner));
    let first = tokio::spawn(svc.clone().oneshot(keyed()));
    tokio::task::yield_now().await;
    // The other request queues behind the first attempt, and takes the permit after it.
    let mut other = keyed();
    other.headers_mut().remove(IDEMPOTENCY_KEY);
    let holder = tokio::spawn(other_route.oneshot(other));
    let err = first.await.unwrap().unwrap_err();
    assert!(err.is::<tower::timeout::error::Elapsed>(), "{err}");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let again = svc.oneshot(keyed()).await.unwrap_err();
    assert_eq!(
        kind(&again),
        Some(RejectionKind::IdempotencyResponseNotStored)
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    holder.await.unwrap().unwrap();
}

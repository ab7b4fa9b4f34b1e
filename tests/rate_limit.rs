//! Integration tests of the rate limiter: paused time, threads, keys, Axum, gRPC, bad input.

#[path = "support/tracing_on.rs"]
mod tracing_on;

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use axum::{body::Body, routing::get, Router};
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use tower::{BoxError, Layer, Service, ServiceBuilder, ServiceExt};
use tower_bulwark::clock::Clock;
use tower_bulwark::rate_limit::{key, QuotaError, RateLimitConfig};
use tower_bulwark::{Quota, RateLimitLayer, Rejection, RejectionKind, RejectionLayer};

/// A ready service that counts its calls.
#[derive(Clone, Default)]
struct Counting(Arc<AtomicU64>);

impl<Req> Service<Req> for Counting {
    type Response = ();
    type Error = Infallible;
    type Future = std::future::Ready<Result<(), Infallible>>;
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, _req: Req) -> Self::Future {
        self.0.fetch_add(1, Ordering::SeqCst);
        std::future::ready(Ok(()))
    }
}

/// Polls ready, calls, and polls the response once (the limiter answers at once when it does
/// not wait). `Some(Ok)` admitted, `Some(Err)` rejected.
fn check<S: Service<Req, Response = (), Error = BoxError>, Req>(
    svc: &mut S,
    req: Req,
) -> Result<(), BoxError> {
    let mut cx = Context::from_waker(Waker::noop());
    assert!(svc.poll_ready(&mut cx).is_ready());
    let mut fut = std::pin::pin!(svc.call(req));
    match fut.as_mut().poll(&mut cx) {
        Poll::Ready(r) => r,
        Poll::Pending => panic!("pending"),
    }
}

use std::future::Future;

fn retry_after(err: &BoxError) -> Duration {
    let r = err.downcast_ref::<Rejection>().expect("a rejection");
    assert_eq!(r.kind(), RejectionKind::RateLimited);
    r.retry_after().unwrap()
}

/// A rejection's hint is the exact time to the next token, jittered upwards by less than
/// `max(exact, 1 s)`.
fn assert_jittered(hint: Duration, exact: Duration, what: &str) {
    let span = exact.max(Duration::from_secs(1));
    assert!(
        hint >= exact && hint < exact + span,
        "{what}: hint {hint:?} outside [{exact:?}, {:?})",
        exact + span
    );
}

#[tokio::test(start_paused = true)]
async fn burst_at_once_then_one_per_period() {
    let quota = Quota::per_second(10).unwrap().burst(5).unwrap();
    let calls = Counting::default();
    let mut svc = ServiceBuilder::new()
        .layer(RateLimitLayer::new(
            RateLimitConfig::new(quota).clock(Clock::tokio()),
        ))
        .service(calls.clone());
    let admitted = (0..20).filter(|_| check(&mut svc, ()).is_ok()).count();
    assert_eq!(admitted, 5, "exactly the burst at once");
    assert_eq!(
        calls.0.load(Ordering::SeqCst),
        5,
        "rejected requests never reach the service"
    );

    // Then exactly one per 100 ms.
    let t0 = tokio::time::Instant::now();
    for period in 1..=10 {
        let edge = t0 + Duration::from_millis(100 * period);
        let err = check(&mut svc, ()).unwrap_err();
        let wait = edge - tokio::time::Instant::now();
        // The retry_after is the exact wait, jittered upwards; a request conforms up to
        // 10 µs early (a clock read a little behind on another core): one nanosecond before
        // that, still refused...
        assert_jittered(retry_after(&err), wait, &format!("period {period}"));
        let slack = Duration::from_micros(10);
        tokio::time::advance(wait - slack - Duration::from_nanos(1)).await;
        let err = check(&mut svc, ()).unwrap_err();
        assert_jittered(
            retry_after(&err),
            slack + Duration::from_nanos(1),
            &format!("period {period}"),
        );
        // ...and from there, admitted, once.
        tokio::time::advance(Duration::from_nanos(1)).await;
        assert!(check(&mut svc, ()).is_ok(), "period {period}");
        assert!(check(&mut svc, ()).is_err(), "period {period}");
    }
    assert_eq!(calls.0.load(Ordering::SeqCst), 15);
}

#[test]
fn two_threads_frozen_clock_admit_exactly_the_burst() {
    let (clock, _hand) = Clock::manual();
    let layer = RateLimitLayer::new(
        RateLimitConfig::new(Quota::per_second(1000).unwrap().burst(777).unwrap()).clock(clock),
    );
    let admitted = Arc::new(AtomicU64::new(0));
    std::thread::scope(|s| {
        for _ in 0..2 {
            let mut svc = layer.layer(Counting::default());
            let admitted = admitted.clone();
            s.spawn(move || {
                for _ in 0..100_000 {
                    if check(&mut svc, ()).is_ok() {
                        admitted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    assert_eq!(admitted.load(Ordering::Relaxed), 777);
    assert_eq!(layer.handle().rejected(), 200_000 - 777);
}

#[test]
fn two_threads_stepping_clock_admit_what_the_quota_allows() {
    let quota = Quota::per_second(1000).unwrap().burst(50).unwrap(); // one token per ms
    let (clock, hand) = Clock::manual();
    let layer = RateLimitLayer::new(RateLimitConfig::new(quota).clock(clock));
    let admitted = Arc::new(AtomicU64::new(0));
    let ticks = 99;
    std::thread::scope(|s| {
        for t in 0..2 {
            let mut svc = layer.layer(Counting::default());
            let admitted = admitted.clone();
            let hand = hand.clone();
            s.spawn(move || {
                for i in 1..=100_000u64 {
                    if check(&mut svc, ()).is_ok() {
                        admitted.fetch_add(1, Ordering::Relaxed);
                    }
                    // Thread 0 moves time by one token every 1,000 of its checks, and keeps
                    // checking afterwards, so every token it creates is taken.
                    if t == 0 && i % 1_000 == 0 && i / 1_000 <= ticks {
                        hand.advance(Duration::from_millis(1));
                    }
                }
            });
        }
    });
    assert_eq!(admitted.load(Ordering::Relaxed), 50 + ticks);
}

#[test]
fn two_threads_one_key_frozen_clock() {
    let (clock, _hand) = Clock::manual();
    let layer = RateLimitLayer::keyed(
        RateLimitConfig::new(Quota::per_minute(100).unwrap()).clock(clock),
        |k: &u64| *k,
    );
    let admitted = Arc::new(AtomicU64::new(0));
    std::thread::scope(|s| {
        for _ in 0..2 {
            let mut svc = layer.layer(Counting::default());
            let admitted = admitted.clone();
            s.spawn(move || {
                for i in 0..100_000u64 {
                    // Ten keys, all contended by both threads.
                    if check(&mut svc, i % 10).is_ok() {
                        admitted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    assert_eq!(admitted.load(Ordering::Relaxed), 10 * 100);
}

#[test]
fn a_million_keys_stay_within_the_bound() {
    let (clock, hand) = Clock::manual();
    let layer = RateLimitLayer::keyed(
        RateLimitConfig::new(Quota::per_second(1).unwrap())
            .clock(clock)
            .max_keys(4096),
        |k: &u64| *k,
    );
    let handle = layer.handle();
    let mut svc = layer.layer(Counting::default());
    for k in 0..1_000_000u64 {
        // Every new key has its full burst: distinct keys never limit each other...
        assert!(check(&mut svc, k).is_ok(), "key {k}");
        if k % 1000 == 0 {
            hand.advance(Duration::from_millis(1));
        }
    }
    assert_eq!(handle.max_keys(), 4096);
    // ...and the table never holds more than its slots: twice the keys it promises to keep.
    assert!(handle.tracked_keys() <= 2 * 4096);
    assert!(
        handle.evictions() > 0,
        "a million live keys cannot all be kept"
    );
    // A recent key is still limited.
    assert!(check(&mut svc, 999_999).is_err());
    assert_eq!(handle.remaining_for(&999_999u64), 0);
}

#[test]
fn keyed_limits_are_independent_and_odd_keys_work() {
    let (clock, _hand) = Clock::manual();
    let layer = RateLimitLayer::keyed(
        RateLimitConfig::new(Quota::per_second(2).unwrap()).clock(clock),
        |k: &String| k.clone(),
    );
    let handle = layer.handle();
    let mut svc = layer.layer(Counting::default());
    let long = "k".repeat(1 << 20);
    for key in [String::new(), long.clone(), "a".to_owned()] {
        assert!(check(&mut svc, key.clone()).is_ok());
        assert!(check(&mut svc, key.clone()).is_ok());
        assert!(check(&mut svc, key.clone()).is_err(), "{}", key.len());
        assert_eq!(handle.remaining_for(&key), 0);
    }
    assert_eq!(handle.remaining_for("never seen"), 2);
}

#[test]
fn clock_jumping_back_neither_panics_nor_over_admits() {
    let (clock, hand) = Clock::manual();
    hand.set_nanos(10_000_000_000);
    let layer =
        RateLimitLayer::new(RateLimitConfig::new(Quota::per_second(10).unwrap()).clock(clock));
    let mut svc = layer.layer(Counting::default());
    let first = (0..20).filter(|_| check(&mut svc, ()).is_ok()).count();
    assert_eq!(first, 10);
    // 50 ms back, less than one interval (100 ms) past what an admission can set: strict,
    // nothing more is admitted.
    hand.set_nanos(9_950_000_000);
    assert_eq!((0..20).filter(|_| check(&mut svc, ()).is_ok()).count(), 0);
    // Forward again: one token per 100 ms from where the limit was.
    hand.set_nanos(10_100_000_000);
    assert_eq!((0..20).filter(|_| check(&mut svc, ()).is_ok()).count(), 1);
    // Ten seconds back: the limit is whole on the new time line (one burst), not refused for
    // ten seconds, and strict again from there.
    hand.set_nanos(0);
    assert_eq!((0..20).filter(|_| check(&mut svc, ()).is_ok()).count(), 10);
    hand.set_nanos(100_000_000);
    assert_eq!((0..20).filter(|_| check(&mut svc, ()).is_ok()).count(), 1);
}

/// Two layers share one limit, one of them waiting for turns up to 10 s: the turns it
/// reserves far ahead are not taken by the other (which waits for none) for a clock that
/// went back.
#[tokio::test(start_paused = true)]
async fn a_layer_that_does_not_wait_keeps_the_turns_another_reserved() {
    let (clock, _hand) = Clock::manual();
    let quota = Quota::per_second(10).unwrap().burst(1).unwrap();
    let now_only = RateLimitLayer::new(RateLimitConfig::new(quota).clock(clock));
    let waiting = now_only.clone().wait_up_to(Duration::from_secs(10));
    let mut a = now_only.layer(Counting::default());
    let mut b = waiting.layer(Counting::default());
    let mut cx = Context::from_waker(Waker::noop());
    // `b` reserves 50 turns, up to 5 s ahead (its futures wait; kept alive).
    let mut held = Vec::new();
    for _ in 0..50 {
        assert!(Service::<()>::poll_ready(&mut b, &mut cx).is_ready());
        let mut fut = Box::pin(b.call(()));
        // Polled once: the first turn is at once, the others wait.
        let _ = fut.as_mut().poll(&mut cx);
        held.push(fut);
    }
    // `a`, which waits for none, is refused: the limit is spent 5 s ahead.
    for _ in 0..10 {
        assert!(check(&mut a, ()).is_err());
    }
    drop(held);
}

#[test]
fn invalid_quotas_are_refused_at_construction() {
    assert_eq!(Quota::per_second(0), Err(QuotaError::Zero));
    assert_eq!(Quota::per_minute(0), Err(QuotaError::Zero));
    assert_eq!(Quota::with_period(Duration::ZERO), Err(QuotaError::Zero));
    assert_eq!(
        Quota::per_second(5).unwrap().burst(0),
        Err(QuotaError::Zero)
    );
    assert_eq!(
        Quota::per_period(u32::MAX, Duration::from_nanos(10)),
        Err(QuotaError::TooFast)
    );
    assert_eq!(Quota::with_period(Duration::MAX), Err(QuotaError::TooLong));
}

#[tokio::test(start_paused = true)]
async fn handle_changes_the_quota_at_run_time() {
    let layer = RateLimitLayer::new(
        RateLimitConfig::new(Quota::per_second(1).unwrap()).clock(Clock::tokio()),
    );
    let handle = layer.handle();
    let mut svc = layer.layer(Counting::default());
    assert!(check(&mut svc, ()).is_ok());
    assert!(check(&mut svc, ()).is_err());
    handle.set_quota(Quota::per_second(100).unwrap());
    tokio::time::advance(Duration::from_millis(10)).await;
    assert!(check(&mut svc, ()).is_ok());
    assert_eq!(handle.quota(), Quota::per_second(100).unwrap());
}

#[tokio::test(start_paused = true)]
async fn clients_wait_up_to_a_bound_in_order() {
    let quota = Quota::per_second(10).unwrap().burst(1).unwrap();
    let calls = Counting::default();
    let svc = ServiceBuilder::new()
        .layer(
            RateLimitLayer::new(RateLimitConfig::new(quota).clock(Clock::tokio()))
                .wait_up_to(Duration::from_millis(250)),
        )
        .service(calls.clone());
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            svc.oneshot(()).await.map(|_| tokio::time::Instant::now())
        }));
    }
    tokio::task::yield_now().await;
    // The fourth would wait 300 ms: more than the bound, so it is refused at once.
    let err = svc.clone().oneshot(()).await.unwrap_err();
    assert_jittered(retry_after(&err), Duration::from_millis(300), "fourth");
    let mut times = Vec::new();
    for t in tasks {
        times.push(t.await.unwrap().unwrap() - start);
    }
    times.sort();
    assert_eq!(
        times,
        [
            Duration::ZERO,
            Duration::from_millis(100),
            Duration::from_millis(200)
        ]
    );
    assert_eq!(calls.0.load(Ordering::SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn a_waiter_dropped_never_reaches_the_service() {
    let quota = Quota::per_second(1).unwrap();
    let calls = Counting::default();
    let mut svc = ServiceBuilder::new()
        .layer(
            RateLimitLayer::new(RateLimitConfig::new(quota).clock(Clock::tokio()))
                .wait_up_to(Duration::from_secs(5)),
        )
        .service(calls.clone());
    assert!(check(&mut svc, ()).is_ok());
    let fut = ServiceExt::<()>::ready(&mut svc).await.unwrap().call(());
    let fut = tokio::time::timeout(Duration::from_millis(10), fut);
    assert!(fut.await.is_err(), "still waiting when dropped");
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(calls.0.load(Ordering::SeqCst), 1);
}

fn app(
    layer: RateLimitLayer<impl tower_bulwark::rate_limit::KeyFn<Request<Body>>>,
    hits: Arc<AtomicU64>,
) -> Router {
    let h2 = hits.clone();
    Router::new()
        .route(
            "/a",
            get(move || {
                hits.fetch_add(1, Ordering::SeqCst);
                async { "a" }
            }),
        )
        .route(
            "/b",
            get(move || {
                h2.fetch_add(1, Ordering::SeqCst);
                async { "b" }
            }),
        )
        .layer(
            ServiceBuilder::new()
                .layer(RejectionLayer::http())
                .layer(layer),
        )
}

#[tokio::test(start_paused = true)]
async fn axum_answers_429_with_headers_and_shares_one_limit_across_routes() {
    let hits = Arc::new(AtomicU64::new(0));
    let layer = RateLimitLayer::new(
        RateLimitConfig::new(Quota::per_minute(3).unwrap()).clock(Clock::tokio()),
    );
    let app = app(layer, hits.clone());
    let req = |p: &str| Request::get(p).body(Body::empty()).unwrap();
    // Three requests over two routes spend one limit.
    for p in ["/a", "/b", "/a"] {
        let res = app.clone().oneshot(req(p)).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }
    let res = app.clone().oneshot(req("/b")).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    let h = res.headers().clone();
    let retry: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
    // The next token is 20 s away; the hint is jittered over [20 s, 40 s).
    assert!((20..=40).contains(&retry), "Retry-After {retry}");
    assert_eq!(h["content-type"], "application/problem+json");
    assert_eq!(h["ratelimit-policy"], "\"default\";q=3;w=60");
    assert_eq!(h["ratelimit"], "\"default\";r=0;t=60");
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["status"], 429);
    assert_eq!(v["retry_after"], retry);
    assert_eq!(
        hits.load(Ordering::SeqCst),
        3,
        "the handler did not run when rejected"
    );
}

#[tokio::test(start_paused = true)]
async fn axum_keyed_by_header_with_success_headers() {
    let hits = Arc::new(AtomicU64::new(0));
    let layer = RateLimitLayer::keyed(
        RateLimitConfig::new(Quota::per_second(2).unwrap()).clock(Clock::tokio()),
        key::Header::new("x-api-key"),
    )
    .response_headers();
    let h2 = hits.clone();
    let app = Router::new()
        .route(
            "/",
            get(move || {
                h2.fetch_add(1, Ordering::SeqCst);
                async { "ok" }
            }),
        )
        .layer(
            ServiceBuilder::new()
                .layer(RejectionLayer::http())
                .layer(layer),
        );
    let req = |k: &str| {
        Request::get("/")
            .header("x-api-key", k)
            .body(Body::empty())
            .unwrap()
    };
    let res = app.clone().oneshot(req("alice")).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["ratelimit"], "\"default\";r=1;t=1");
    assert_eq!(res.headers()["ratelimit-policy"], "\"default\";q=2;w=1");
    assert_eq!(
        app.clone().oneshot(req("alice")).await.unwrap().status(),
        StatusCode::OK
    );
    assert_eq!(
        app.clone().oneshot(req("alice")).await.unwrap().status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    // Bob has his own limit.
    assert_eq!(
        app.clone().oneshot(req("bob")).await.unwrap().status(),
        StatusCode::OK
    );
    assert_eq!(hits.load(Ordering::SeqCst), 3);
}

#[cfg(feature = "grpc")]
#[tokio::test(start_paused = true)]
async fn grpc_rejection_is_resource_exhausted_with_pushback() {
    use bytes::Bytes;
    use http_body_util::Full;
    let svc = ServiceBuilder::new()
        .layer(RejectionLayer::grpc())
        .layer(RateLimitLayer::new(
            RateLimitConfig::new(Quota::per_second(4).unwrap()).clock(Clock::tokio()),
        ))
        .service_fn(|_req: Request<()>| async {
            Ok::<_, Infallible>(
                http::Response::builder()
                    .header("content-type", "application/grpc")
                    .header("grpc-status", "0")
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
        });
    for _ in 0..4 {
        let res = svc.clone().oneshot(Request::new(())).await.unwrap();
        assert_eq!(res.headers()["grpc-status"], "0");
    }
    let res = svc.clone().oneshot(Request::new(())).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["grpc-status"], "8");
    // The next token is 250 ms away; the hint is jittered over [250 ms, 1250 ms).
    let pushback: u64 = res.headers()["grpc-retry-pushback-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((250..=1250).contains(&pushback), "pushback {pushback}");
}

/// A waiter dropped before its turn gives the turn back: the next request gets it. Keyed
/// and global.
#[tokio::test(start_paused = true)]
async fn a_dropped_waiter_gives_its_turn_back() {
    let quota = Quota::per_second(10).unwrap().burst(1).unwrap(); // a token per 100 ms
    for max_keys in [8usize, 65_536] {
        let calls = Counting::default();
        let layer = RateLimitLayer::keyed(
            RateLimitConfig::new(quota)
                .clock(Clock::tokio())
                .max_keys(max_keys),
            |_: &()| 7u64,
        )
        .wait_up_to(Duration::from_secs(1));
        let mut svc = layer.layer(calls.clone());
        assert!(check(&mut svc, ()).is_ok(), "the burst");
        // The next turn is at +100 ms; this waiter reserves it, then its caller goes away.
        let waiter = ServiceExt::<()>::ready(&mut svc).await.unwrap().call(());
        drop(waiter);
        // So the next request gets the +100 ms turn, not +200 ms.
        let start = tokio::time::Instant::now();
        svc.clone().oneshot(()).await.unwrap();
        assert_eq!(
            start.elapsed(),
            Duration::from_millis(100),
            "max_keys {max_keys}"
        );
        assert_eq!(calls.0.load(Ordering::SeqCst), 2);
    }
    // Global: same.
    let calls = Counting::default();
    let mut svc = RateLimitLayer::new(RateLimitConfig::new(quota).clock(Clock::tokio()))
        .wait_up_to(Duration::from_secs(1))
        .layer(calls.clone());
    assert!(check(&mut svc, ()).is_ok());
    let waiter = ServiceExt::<()>::ready(&mut svc).await.unwrap().call(());
    let later = ServiceExt::<()>::ready(&mut svc).await.unwrap().call(());
    // Two turns reserved (+100, +200 ms); the first waiter goes away: its turn is given back
    // although a later turn was reserved after it (waiters that go away in order must not
    // hold turns), and the later one keeps +200 ms.
    drop(waiter);
    let start = tokio::time::Instant::now();
    later.await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_millis(200));
    // The documented cost: the turn given back lets one request more through at the later
    // turn (it kept its time)...
    assert!(check(&mut svc, ()).is_ok(), "the turn given back");
    // ...one, not more: the next one waits a whole interval. And the last reserved turn,
    // dropped, comes back.
    let start = tokio::time::Instant::now();
    let w = ServiceExt::<()>::ready(&mut svc).await.unwrap().call(());
    drop(w);
    svc.clone().oneshot(()).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_millis(100));
    assert_eq!(calls.0.load(Ordering::SeqCst), 4);
}

/// A refusal does not wait on the inner service's readiness (tower's `LoadShed` pattern):
/// with the service below not ready, `poll_ready` is ready at once, a request over the limit
/// is refused at once, and an admitted one waits for the inner readiness in its future.
#[tokio::test(start_paused = true)]
async fn a_refusal_does_not_wait_on_the_inner_readiness() {
    use tokio_test::{assert_pending, assert_ready_err, assert_ready_ok, task};
    use tower_test::{assert_request_eq, mock};

    let layer = RateLimitLayer::new(
        RateLimitConfig::new(Quota::per_second(1).unwrap()).clock(Clock::tokio()),
    );
    let handle = layer.handle();
    let (mut svc, mut mock) = mock::spawn_layer::<u32, u32, _>(layer);
    mock.allow(0);

    assert_ready_ok!(svc.poll_ready(), "not held back by the inner readiness");
    let mut admitted = task::spawn(svc.call(1));
    assert_pending!(admitted.poll());
    assert_ready_ok!(svc.poll_ready());
    let err = assert_ready_err!(task::spawn(svc.call(2)).poll());
    assert!(retry_after(&err) > Duration::ZERO);
    assert_eq!(handle.rejected(), 1);

    // The admitted request goes on once the inner service is ready.
    mock.allow(1);
    assert_pending!(admitted.poll());
    assert_request_eq!(mock, 1).send_response(10);
    assert_eq!(assert_ready_ok!(admitted.poll()), 10);

    // One dropped while it waits for the inner readiness gives its turn back.
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(handle.remaining(), 1);
    assert_ready_ok!(svc.poll_ready());
    let mut waiting = task::spawn(svc.call(3));
    assert_pending!(waiting.poll());
    assert_eq!(handle.remaining(), 0);
    drop(waiting);
    assert_eq!(handle.remaining(), 1);
}

/// A client that sends at exactly the quota's rate is always admitted, even when the clock
/// reads a few microseconds behind at the rate edge (a time-stamp counter read on another
/// core): a glitch of microseconds must not cost a client a `Retry-After` of a second.
#[test]
fn a_clock_a_few_microseconds_behind_at_the_rate_edge_admits() {
    let (clock, hand) = Clock::manual();
    let layer = RateLimitLayer::new(
        RateLimitConfig::new(Quota::per_second(100).unwrap().burst(1).unwrap()).clock(clock),
    );
    let handle = layer.handle();
    let mut svc = layer.layer(Counting::default());
    const MS: u64 = 1_000_000;
    hand.set_nanos(1_000 * MS);
    assert!(check(&mut svc, ()).is_ok());
    for k in 1..=100u64 {
        // Request k is due at 1 s + 10k ms: read 1.5 µs late, then 3 µs early (4.5 µs behind
        // the edge the previous request set).
        let due = (1_000 + 10 * k) * MS;
        let read = if k % 2 == 0 { due + 1_500 } else { due - 3_000 };
        hand.set_nanos(read);
        if let Err(e) = check(&mut svc, ()) {
            panic!(
                "request {k} read at {read} ns refused: retry_after {:?}",
                retry_after(&e)
            );
        }
    }
    // Still a limit: one more at the last instant is refused.
    assert!(check(&mut svc, ()).is_err());
    assert_eq!(handle.rejected(), 1);
}

/// The clock and `max_keys` are part of the configuration the layer is made from, so no
/// setting can rebuild the state under a handle: a handle taken from the layer, before its
/// remaining settings, sees the state its services use and reads the configured clock.
#[test]
fn a_handle_taken_before_a_setting_sees_the_state_after_it() {
    let (clock, hand) = Clock::manual();
    let layer = RateLimitLayer::keyed(
        RateLimitConfig::new(Quota::per_second(1).unwrap())
            .clock(clock)
            .max_keys(16),
        |k: &u64| *k,
    );
    let handle = layer.handle();
    let layer = layer.wait_up_to(Duration::ZERO);
    let mut svc = layer.layer(Counting::default());
    assert!(check(&mut svc, 1).is_ok());
    assert!(check(&mut svc, 1).is_err());
    assert_eq!(handle.rejected(), 1, "the handle sees the services' state");
    assert_eq!(handle.max_keys(), 16);
    assert_eq!(handle.remaining_for(&1u64), 0);
    hand.advance(Duration::from_secs(1));
    assert_eq!(handle.remaining_for(&1u64), 1);
    // The same for a global limiter, and for the layer's clones.
    let (clock, hand) = Clock::manual();
    let layer =
        RateLimitLayer::new(RateLimitConfig::new(Quota::per_second(1).unwrap()).clock(clock));
    let handle = layer.handle();
    let mut svc = layer
        .clone()
        .wait_up_to(Duration::ZERO)
        .layer(Counting::default());
    assert!(check(&mut svc, ()).is_ok());
    assert_eq!(handle.remaining(), 0);
    hand.advance(Duration::from_secs(1));
    assert_eq!(handle.remaining(), 1);
}

/// `key::ClientIp` under a real Axum server served with
/// `into_make_service_with_connect_info::<SocketAddr>()`: the client's address is found with
/// no code of the user's (the `axum` feature), so a client has a limit of its own, not one
/// shared by every request.
#[cfg(feature = "axum")]
#[tokio::test]
async fn client_ip_finds_the_address_axum_records() {
    use std::net::{IpAddr, SocketAddr};

    use http_body_util::Full;
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    let layer = RateLimitLayer::keyed(Quota::per_minute(2).unwrap(), key::ClientIp::new());
    let handle = layer.handle();
    let app = Router::new().route("/", get(|| async { "hello" })).layer(
        ServiceBuilder::new()
            .layer(RejectionLayer::http())
            .layer(layer),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
    });
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<bytes::Bytes>>();
    let get = || {
        Request::get(format!("http://{addr}/"))
            .body(Full::default())
            .unwrap()
    };
    assert_eq!(
        client.request(get()).await.unwrap().status(),
        StatusCode::OK
    );
    let me: IpAddr = "127.0.0.1".parse().unwrap();
    // The request was counted under this client's address...
    assert_eq!(handle.remaining_for(&me), 1, "the client's own limit");
    assert_eq!(handle.missing_keys(), 0);
    // ...and the same client's next requests draw on the same limit.
    assert_eq!(
        client.request(get()).await.unwrap().status(),
        StatusCode::OK
    );
    let res = client.request(get()).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(handle.remaining_for(&me), 0);
    assert_eq!(handle.tracked_keys(), 1);
}

/// Two clients, told apart by the `ConnectInfo` Axum records, have two limits.
#[cfg(feature = "axum")]
#[test]
fn client_ip_keys_axum_clients_apart() {
    use std::net::SocketAddr;

    use axum::extract::ConnectInfo;

    let (clock, _hand) = Clock::manual();
    let layer = RateLimitLayer::keyed(
        RateLimitConfig::new(Quota::per_minute(1).unwrap()).clock(clock),
        key::ClientIp::new(),
    );
    let handle = layer.handle();
    let mut svc = layer.layer(Counting::default());
    let from = |peer: &str| {
        let mut req = Request::new(());
        req.extensions_mut()
            .insert(ConnectInfo(peer.parse::<SocketAddr>().unwrap()));
        req
    };
    assert!(check(&mut svc, from("198.51.100.1:4000")).is_ok());
    assert!(
        check(&mut svc, from("198.51.100.2:4000")).is_ok(),
        "another client has its own limit"
    );
    assert!(check(&mut svc, from("198.51.100.1:5000")).is_err());
    assert_eq!(handle.missing_keys(), 0);
}

/// A request with no client address is never put under one limit shared by all such requests:
/// by default it is refused with a clear rejection, counted, and warned about once; a layer
/// can choose to let such requests through instead, still counted.
#[test]
fn a_request_without_a_client_address_is_refused_and_counted() {
    use tower_bulwark::rate_limit::{KeyedConfig, MissingKey};

    let (out, _guard) = tracing_on::capture(tracing::Level::WARN);
    let layer = RateLimitLayer::keyed(Quota::per_minute(100).unwrap(), key::ClientIp::new());
    let handle = layer.handle();
    let calls = Counting::default();
    let mut svc = layer.layer(calls.clone());
    for _ in 0..3 {
        let err = check(&mut svc, Request::new(())).unwrap_err();
        let r = err.downcast_ref::<Rejection>().expect("a rejection");
        assert_eq!(r.kind(), RejectionKind::ClientAddressUnknown);
        assert_eq!(r.kind().http_status(), StatusCode::INTERNAL_SERVER_ERROR);
    }
    assert_eq!(calls.0.load(Ordering::SeqCst), 0);
    assert_eq!((handle.missing_keys(), handle.rejected()), (3, 0));
    assert_eq!(handle.tracked_keys(), 0, "no shared bucket");
    let warnings = out
        .text()
        .lines()
        .filter(|l| l.contains("has no key"))
        .count();
    assert_eq!(warnings, 1, "warned once: {}", out.text());

    // Fail open, by choice: admitted without a limit, still counted.
    let layer = RateLimitLayer::keyed(
        KeyedConfig::new(Quota::per_minute(1).unwrap()).when_key_missing(MissingKey::Admit),
        key::ClientIp::new(),
    );
    let handle = layer.handle();
    let mut svc = layer.layer(calls.clone());
    for _ in 0..3 {
        assert!(check(&mut svc, Request::new(())).is_ok());
    }
    assert_eq!((handle.missing_keys(), handle.tracked_keys()), (3, 0));
}

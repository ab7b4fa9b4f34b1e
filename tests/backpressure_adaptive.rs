//! Adaptive limits converge on a simulated dependency, in paused time.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};
use tower_bulwark::backpressure::{
    Adaptive, Aimd, BackpressureHandle, BackpressureLayer, Gradient,
};
use tower_bulwark::classify::HttpStatus;
use tower_bulwark::clock::Clock;

/// A dependency that serves `capacity` requests at once in `base` and queues the rest, so its
/// latency at concurrency `n` is `base × max(1, n / capacity)`.
#[derive(Clone)]
struct Dependency {
    in_flight: Arc<AtomicUsize>,
    capacity: usize,
    base: Duration,
}

struct Leave(Arc<AtomicUsize>);

impl Drop for Leave {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Service<()> for Dependency {
    type Response = ();
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<(), Infallible>> + Send>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: ()) -> Self::Future {
        let n = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        let leave = Leave(self.in_flight.clone());
        let latency = self.base * n.max(self.capacity) as u32 / self.capacity as u32;
        Box::pin(async move {
            tokio::time::sleep(latency).await;
            drop(leave);
            Ok(())
        })
    }
}

/// Drives `3 × capacity` closed-loop clients through the layer for `run`, and returns the
/// limit seen every 100 ms.
async fn drive(
    layer: BackpressureLayer,
    capacity: usize,
    run: Duration,
) -> (Vec<usize>, BackpressureHandle) {
    let handle = layer.handle();
    let dep = Dependency {
        in_flight: Arc::new(AtomicUsize::new(0)),
        capacity,
        base: Duration::from_millis(10),
    };
    let svc = layer.layer(dep.clone());
    let end = Instant::now() + run;
    let served = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..3 * capacity)
        .map(|_| {
            let svc = svc.clone();
            let served = served.clone();
            tokio::spawn(async move {
                while Instant::now() < end {
                    match svc.clone().oneshot(()).await {
                        Ok(()) => {
                            served.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                    }
                }
            })
        })
        .collect();
    let mut limits = Vec::new();
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(100)).await;
        limits.push(handle.limit());
        // The dependency never sees more than the limit in force allows, give or take a
        // limit lowered under running requests.
        assert!(dep.in_flight.load(Ordering::SeqCst) <= 10 * capacity);
    }
    for c in clients {
        c.await.unwrap();
    }
    assert!(served.load(Ordering::Relaxed) > 1000);
    assert_eq!(handle.in_flight(), 0);
    (limits, handle)
}

fn assert_settled_within(limits: &[usize], capacity: usize, tolerance: f64, what: &str) {
    let tail = &limits[limits.len() / 2..];
    for &l in tail {
        let err = (l as f64 - capacity as f64).abs() / capacity as f64;
        assert!(
            err <= tolerance,
            "{what}: limit {l} is {:.0}% from {capacity}; last limits: {tail:?}",
            err * 100.0
        );
    }
}

/// An adaptive layer started low (10) with a 50 ms window, as the convergence tests use.
/// Slow start is off: these tests follow the algorithms' own steps up from a low start
/// (slow start's ramp has tests of its own, in `backpressure_adaptive_ramp`).
fn settling(adaptive: Adaptive, capacity: usize) -> BackpressureLayer {
    BackpressureLayer::adaptive(
        adaptive
            .slow_start(false)
            .floor(2)
            .ceiling(10 * capacity)
            .initial(10)
            .window(Duration::from_millis(50))
            .clock(Clock::tokio()),
    )
    .unwrap()
    .max_wait(Duration::from_secs(1))
}

/// An AIMD layer at 32 between `floor` and 64 that moves on every 10 ms window with a sample.
fn quick_aimd(floor: usize) -> BackpressureLayer {
    BackpressureLayer::adaptive(
        Adaptive::aimd(Aimd::default())
            .floor(floor)
            .ceiling(64)
            .initial(32)
            .window(Duration::from_millis(10))
            .min_samples(1)
            .clock(Clock::tokio()),
    )
    .unwrap()
}

#[tokio::test(start_paused = true)]
async fn gradient_settles_within_20_percent_of_the_dependency_capacity() {
    const C: usize = 50;
    let layer = settling(Adaptive::gradient(Gradient::default()), C);
    let (limits, _) = drive(layer, C, Duration::from_secs(12)).await;
    assert!(limits[0] < C, "started low: {limits:?}");
    assert_settled_within(&limits, C, 0.2, "gradient");
}

#[tokio::test(start_paused = true)]
async fn aimd_settles_within_20_percent_of_the_dependency_capacity() {
    const C: usize = 50;
    let layer = settling(
        Adaptive::aimd(Aimd::default().latency_threshold(Duration::from_millis(11))),
        C,
    );
    let (limits, _) = drive(layer, C, Duration::from_secs(12)).await;
    assert!(limits[0] < C, "started low: {limits:?}");
    assert_settled_within(&limits, C, 0.2, "aimd");
}

#[tokio::test(start_paused = true)]
async fn failures_pull_the_limit_down_and_set_limit_overrides_within_bounds() {
    let layer = quick_aimd(4);
    let handle = layer.handle();
    let mut svc = layer.layer(tower::service_fn(|fail: bool| async move {
        tokio::time::sleep(Duration::from_millis(1)).await;
        if fail {
            Err("dependency failed")
        } else {
            Ok(())
        }
    }));
    for _ in 0..200 {
        let _ = svc.ready().await.unwrap().call(true).await;
        tokio::time::advance(Duration::from_millis(5)).await;
    }
    assert_eq!(handle.limit(), 4, "failures drive the limit to its floor");
    assert_eq!(handle.set_limit(1000), 64, "clamped to the ceiling");
    assert_eq!(handle.limit(), 64);
    assert_eq!(handle.set_limit(0), 4, "clamped to the floor");
}

#[tokio::test(start_paused = true)]
async fn server_errors_count_as_failures_when_holding_until_body_end() {
    let layer = quick_aimd(2).hold_until_body_end();
    let handle = layer.handle();
    let mut svc = layer.layer(tower::service_fn(|req: http::Request<u16>| async move {
        tokio::time::sleep(Duration::from_millis(1)).await;
        let res = http::Response::builder()
            .status(*req.body())
            .body(http_body_util::Full::new(bytes::Bytes::from_static(b"x")))
            .unwrap();
        Ok::<_, Infallible>(res)
    }));
    for _ in 0..100 {
        let res = svc
            .ready()
            .await
            .unwrap()
            .call(http::Request::new(503))
            .await
            .unwrap();
        // The sample is taken when the body ends.
        let _ = http_body_util::BodyExt::collect(res.into_body()).await;
        tokio::time::advance(Duration::from_millis(5)).await;
    }
    assert_eq!(
        handle.limit(),
        2,
        "5xx responses drive the limit to its floor"
    );
    for _ in 0..30 {
        let res = svc
            .ready()
            .await
            .unwrap()
            .call(http::Request::new(200))
            .await
            .unwrap();
        let _ = http_body_util::BodyExt::collect(res.into_body()).await;
        tokio::time::advance(Duration::from_millis(5)).await;
    }
    let after = handle.limit();
    assert!(after > 2, "successes let it grow again: {after}");
    // Bodies dropped before their end give no sample: the limit stays where it is.
    for _ in 0..30 {
        let res = svc
            .ready()
            .await
            .unwrap()
            .call(http::Request::new(503))
            .await
            .unwrap();
        drop(res);
        tokio::time::advance(Duration::from_millis(5)).await;
    }
    assert_eq!(handle.limit(), after);
}

/// With the default release (the permit goes back with the response), a classifier says which
/// responses are failures: with `HttpStatus`, 5xx responses pull the limit to its floor;
/// without one, responses are successes and the limit stays up.
#[tokio::test(start_paused = true)]
async fn a_classifier_makes_server_errors_failures() {
    let layer = || quick_aimd(2);
    let answer = |status: u16| async move {
        tokio::time::sleep(Duration::from_millis(1)).await;
        let res = http::Response::builder().status(status).body(()).unwrap();
        Ok::<_, Infallible>(res)
    };
    let classified = layer().classify(HttpStatus::default());
    let unclassified = layer();
    let (with, without) = (classified.handle(), unclassified.handle());
    let mut a = classified.layer(tower::service_fn(answer));
    let mut b = unclassified.layer(tower::service_fn(answer));
    for _ in 0..100 {
        let res = a.ready().await.unwrap().call(503).await.unwrap();
        assert_eq!(res.status(), 503);
        let res = b.ready().await.unwrap().call(503).await.unwrap();
        assert_eq!(res.status(), 503);
        tokio::time::advance(Duration::from_millis(5)).await;
    }
    assert_eq!(
        with.limit(),
        2,
        "5xx responses drive the limit to its floor"
    );
    assert!(
        without.limit() >= 32,
        "without a classifier a response is a success: {}",
        without.limit()
    );
    for _ in 0..30 {
        a.ready().await.unwrap().call(200).await.unwrap();
        tokio::time::advance(Duration::from_millis(5)).await;
    }
    assert!(
        with.limit() > 2,
        "successes let it grow again: {}",
        with.limit()
    );
}

/// `slots` requests at once, each busy 5, 6, ... 14 ms in turn (latency that varies from
/// request to request); the others queue for a slot.
#[derive(Clone)]
struct VaryingSlots {
    slots: Arc<tokio::sync::Semaphore>,
    next: Arc<AtomicUsize>,
}

impl Service<()> for VaryingSlots {
    type Response = ();
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<(), Infallible>> + Send>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: ()) -> Self::Future {
        let slots = self.slots.clone();
        let latency =
            Duration::from_millis(5 + (self.next.fetch_add(1, Ordering::Relaxed) % 10) as u64);
        Box::pin(async move {
            let _slot = slots.acquire_owned().await.unwrap();
            tokio::time::sleep(latency).await;
            Ok(())
        })
    }
}

/// Latency that varies from request to request does not hide real queueing: with 50 slots
/// and 150 closed-loop callers, from the defaults (slow start from 64), the gradient's limit
/// comes down to near the 50 the dependency serves without queueing and stays there, neither
/// collapsing under the variance nor running away with the queue.
#[tokio::test(start_paused = true)]
async fn gradient_cuts_real_queueing_under_varying_latency() {
    const C: usize = 50;
    let layer =
        BackpressureLayer::adaptive(Adaptive::gradient(Gradient::default()).clock(Clock::tokio()))
            .unwrap();
    let handle = layer.handle();
    let svc = layer.layer(VaryingSlots {
        slots: Arc::new(tokio::sync::Semaphore::new(C)),
        next: Arc::new(AtomicUsize::new(0)),
    });
    let end = Instant::now() + Duration::from_secs(10);
    let served = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..3 * C)
        .map(|_| {
            let (svc, served) = (svc.clone(), served.clone());
            tokio::spawn(async move {
                while Instant::now() < end {
                    match svc.clone().oneshot(()).await {
                        Ok(()) => {
                            served.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
                    }
                }
            })
        })
        .collect();
    let mut limits = Vec::new();
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(250)).await;
        limits.push(handle.limit());
    }
    for c in clients {
        c.await.unwrap();
    }
    let served = served.load(Ordering::Relaxed);
    // 50 slots of 9.5 ms on average: about 5,260 a second.
    let capacity = 10 * 1000 * C * 10 / 95;
    eprintln!(
        "50 slots, 5-14 ms: served {served} of about {capacity}; limit every 250 ms: {limits:?}"
    );
    for &l in &limits[limits.len() / 2..] {
        assert!(
            (C * 9 / 10..=C * 3 / 2).contains(&l),
            "limit {l} strays from the 50 served without queueing: {limits:?}"
        );
    }
    assert!(
        served * 100 >= capacity * 90,
        "served {served} of {capacity}"
    );
}

/// A classifier of its own that reads the trailers: `x-failed` there is a failure.
#[derive(Clone)]
struct FailedTrailer;

impl<B> tower_bulwark::classify::Classify<http::Response<B>> for FailedTrailer {
    fn classify_response(&self, _: &http::Response<B>) -> tower_bulwark::classify::Outcome {
        tower_bulwark::classify::Outcome::Success
    }

    fn classify_body_trailers(
        &self,
        trailers: &http::HeaderMap,
    ) -> tower_bulwark::classify::Outcome {
        if trailers.contains_key("x-failed") {
            tower_bulwark::classify::Outcome::Failure
        } else {
            tower_bulwark::classify::Outcome::Success
        }
    }
}

/// With `hold_until_body_end`, trailers are part of the outcome: `grpc-status: 0` in them is
/// a success (the limit is not pulled down), and a classifier's own reading of them counts.
#[tokio::test(start_paused = true)]
async fn trailers_count_as_the_classifier_reads_them() {
    type Frames = futures_util::stream::Iter<
        std::vec::IntoIter<Result<http_body::Frame<bytes::Bytes>, Infallible>>,
    >;
    let answer = |(name, value): (&'static str, &'static str)| {
        let mut trailers = http::HeaderMap::new();
        trailers.insert(name, value.parse().unwrap());
        let frames = vec![
            Ok(http_body::Frame::data(bytes::Bytes::from_static(b"x"))),
            Ok(http_body::Frame::trailers(trailers)),
        ];
        let body: http_body_util::StreamBody<Frames> =
            http_body_util::StreamBody::new(futures_util::stream::iter(frames));
        std::future::ready(Ok::<_, Infallible>(http::Response::new(body)))
    };
    for (trailer, classified, expect_down) in [
        (("grpc-status", "0"), false, false),
        (("x-failed", "1"), false, false),
        (("x-failed", "1"), true, true),
    ] {
        let base = quick_aimd(2).hold_until_body_end();
        let handle = base.handle();
        let mut svc: tower::util::BoxService<http::Request<()>, _, _> = if classified {
            let layer = base.classify(FailedTrailer);
            tower::util::BoxService::new(
                layer
                    .layer(tower::service_fn(move |_: http::Request<()>| {
                        answer(trailer)
                    }))
                    .map_response(|r| r.map(http_body_util::BodyExt::boxed_unsync)),
            )
        } else {
            tower::util::BoxService::new(
                base.layer(tower::service_fn(move |_: http::Request<()>| {
                    answer(trailer)
                }))
                .map_response(|r| r.map(http_body_util::BodyExt::boxed_unsync)),
            )
        };
        for _ in 0..50 {
            let res = svc
                .ready()
                .await
                .unwrap()
                .call(http::Request::new(()))
                .await
                .unwrap();
            let _ = http_body_util::BodyExt::collect(res.into_body()).await;
            tokio::time::advance(Duration::from_millis(11)).await;
        }
        let limit = handle.limit();
        if expect_down {
            assert_eq!(
                limit, 2,
                "{trailer:?}: failures in the trailers, limit {limit}"
            );
        } else {
            assert!(
                limit >= 32,
                "{trailer:?}: successes, yet the limit fell to {limit}"
            );
        }
    }
}

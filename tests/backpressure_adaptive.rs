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
    Adaptive, Aimd, BackpressureHandle, BackpressureLayer, Estimate, Gradient, Sample,
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
    // A body dropped before its end (the client stopped reading), however long after its
    // head, counts as its head: those of 200s are successes, and the limit does not fall...
    for _ in 0..30 {
        let res = svc
            .ready()
            .await
            .unwrap()
            .call(http::Request::new(200))
            .await
            .unwrap();
        tokio::time::advance(Duration::from_millis(200)).await;
        drop(res);
        tokio::time::advance(Duration::from_millis(5)).await;
    }
    let kept = handle.limit();
    assert!(kept >= after, "dropped bodies of 200s: {after} -> {kept}");
    // ... and those of 503s are failures, which bring it down to its floor.
    for _ in 0..100 {
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
    assert_eq!(handle.limit(), 2, "dropped bodies of 503s");
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

/// Windows of a load above the limit (each window uses the whole limit), through the
/// gradient's arithmetic: `latency(i, n)` is the mean latency of window `i` with `n` requests
/// in flight. The estimates after each window.
fn gradient_windows(
    start: f64,
    ceiling: u32,
    count: u64,
    latency: impl Fn(u64, u32) -> u64,
) -> Vec<Estimate> {
    let g = Gradient::default();
    let mut est = Estimate::new(start);
    (0..count)
        .map(|i| {
            let n = est.bounded(1, ceiling);
            let avg = latency(i, n);
            est = g.update(est, &Sample::new(500, 0, avg, avg / 2, n), 1, ceiling);
            est
        })
        .collect()
}

/// A dependency with no queueing whose latency steps from 1 ms to 3 ms for good (a slower
/// replica), steady or with window means varying by ±20%: the gradient cuts at first (a
/// latency rise is all it sees), but the latency does not come down with the limit, so
/// within a few windows it becomes the no-load latency and the limit goes back up. It is
/// never cut anywhere near the floor, as it was when only a probe (every 500 windows) could
/// raise the no-load latency.
#[test]
fn gradient_follows_a_dependency_that_became_slower() {
    const STEP: u64 = 30;
    for noisy in [false, true] {
        let noise = |i: u64| {
            if noisy && i.is_multiple_of(2) {
                12
            } else if noisy {
                8
            } else {
                10
            }
        };
        let base = |i: u64| if i < STEP { 1_000_000 } else { 3_000_000 };
        let est = gradient_windows(1_000.0, 10_000, 200, |i, _| base(i) * noise(i) / 10);
        let limits: Vec<u32> = est.iter().map(|e| e.bounded(1, 10_000)).collect();
        let before = limits[STEP as usize - 1];
        let after = &limits[STEP as usize..];
        let lowest = *after.iter().min().unwrap();
        assert!(
            lowest * 2 >= before,
            "noisy {noisy}: cut from {before} to {lowest}: {after:?}"
        );
        // The no-load latency follows within ten windows of the step.
        let followed = est[STEP as usize..]
            .iter()
            .position(|e| e.no_load_rtt_nanos >= 2_400_000)
            .expect("the no-load latency never followed the dependency up");
        assert!(
            followed <= 10,
            "noisy {noisy}: followed after {followed} windows"
        );
        assert!(
            *limits.last().unwrap() >= before,
            "noisy {noisy}: the limit did not come back: {after:?}"
        );
    }
}

/// A dependency that really queues: it serves `c` at once in 1 ms, and latency at `n` in
/// flight is 1 ms × n / c beyond that; `c` falls from 400 to 200 at window 300 (half its
/// servers gone). Latency then rises with concurrency and comes down with the limit, so the
/// gradient cuts promptly to the new capacity and settles within 20% of it, across two
/// probes: the queue is never taken for a slower dependency, nor does the no-load latency
/// drift up with it. With window means that also vary by ±20% on their own, one window cannot
/// tell queueing up to about that variance from it, so the limit settles higher, but still
/// at a bounded multiple of the capacity, and not below it.
#[test]
fn gradient_settles_near_the_capacity_of_a_dependency_that_queues() {
    const DROP: usize = 300;
    let capacity = |i: usize| if i < DROP { 400u32 } else { 200 };
    for noisy in [false, true] {
        let est = gradient_windows(50.0, 4_000, 1_200, |i, n| {
            let noise = if noisy && i.is_multiple_of(2) {
                1.2
            } else if noisy {
                0.8
            } else {
                1.0
            };
            let c = capacity(i as usize);
            (1_000_000.0 * f64::from(n.max(c)) / f64::from(c) * noise) as u64
        });
        // Within 20% of the capacity; with the noise, between it and 2.5 times it. A cut is
        // prompt when the limit is within 1.3 times the new capacity (2.5 with the noise)
        // in 25 windows.
        let (lo, hi, prompt) = if noisy { (10, 25, 25) } else { (8, 12, 13) };
        let mut cut = None;
        for (i, e) in est.iter().enumerate() {
            let c = capacity(i);
            let l = e.bounded(1, 4_000);
            if i >= DROP && cut.is_none() && l <= c * prompt / 10 {
                cut = Some(i - DROP);
            }
            if e.probe_saved != 0.0 || !(150..DROP).contains(&i) && i < DROP + 100 {
                continue;
            }
            assert!(
                (c * lo / 10..=c * hi / 10).contains(&l),
                "noisy {noisy}: window {i}: limit {l} for a capacity of {c} ({e:?})"
            );
        }
        let cut = cut.expect("never cut to the new capacity");
        assert!(
            cut <= 25,
            "noisy {noisy}: cut to the new capacity after {cut} windows"
        );
    }
}

/// A dependency with no queue (any number at once) whose latency steps from 1 ms to 3 ms for
/// good 3 s in, under 200 closed-loop callers: through the layer, the limit follows it and
/// stays near what the callers use; they are served as by a fixed limit of 200.
#[tokio::test(start_paused = true)]
async fn gradient_limit_follows_a_slower_replica() {
    #[derive(Clone)]
    struct Replica(Instant);
    impl Service<()> for Replica {
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
            let slower = self.0.elapsed() >= Duration::from_secs(3);
            let latency = Duration::from_millis(if slower { 3 } else { 1 });
            Box::pin(async move {
                tokio::time::sleep(latency).await;
                Ok(())
            })
        }
    }
    async fn run(layer: BackpressureLayer) -> (usize, Vec<usize>) {
        let handle = layer.handle();
        let svc = layer.layer(Replica(Instant::now()));
        let end = Instant::now() + Duration::from_secs(8);
        let served = Arc::new(AtomicUsize::new(0));
        let clients: Vec<_> = (0..200)
            .map(|_| {
                let (svc, served) = (svc.clone(), served.clone());
                tokio::spawn(async move {
                    while Instant::now() < end {
                        match svc.clone().oneshot(()).await {
                            Ok(()) if Instant::now() + Duration::from_secs(3) >= end => {
                                served.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(()) => {}
                            Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
                        }
                    }
                })
            })
            .collect();
        let mut limits = Vec::new();
        while Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(100)).await;
            limits.push(handle.limit());
        }
        for c in clients {
            c.await.unwrap();
        }
        (served.load(Ordering::Relaxed), limits)
    }
    let (fixed, _) = run(BackpressureLayer::new(200)).await;
    let layer =
        BackpressureLayer::adaptive(Adaptive::gradient(Gradient::default()).clock(Clock::tokio()))
            .unwrap();
    let (got, limits) = run(layer).await;
    eprintln!(
        "slower replica at 3 s: served {got} in the last 3 s, fixed {fixed}; limits {limits:?}"
    );
    let after = &limits[30..];
    assert!(
        after.iter().all(|&l| l >= 100),
        "the limit was cut for a latency the limit does not cause: {after:?}"
    );
    assert!(
        got * 100 >= fixed * 95,
        "served {got} where a fixed limit served {fixed}"
    );
}

//! The breaker under tower's `Balance` and `ReadyCache`, which poll services ready and keep
//! them in a ready set, often without calling them (the balancer picks another endpoint) or
//! calling them much later. A half-open probe slot claimed by a service made ready and never
//! called must not fail the probe round: once overdue, it is given to the next caller, and the
//! service that held it decides again when it is called at last.

use std::future::{poll_fn, Future};
use std::task::Poll;
use std::time::Duration;

use tokio::time::advance;
use tower::balance::p2c::Balance;
use tower::discover::ServiceList;
use tower::load::Constant;
use tower::ready_cache::ReadyCache;
use tower::{BoxError, Layer, Service, ServiceExt};
use tower_bulwark::circuit_breaker::{
    BreakerConfig, BreakerState, CircuitBreaker, CircuitBreakerLayer,
};
use tower_bulwark::clock::Clock;
use tower_bulwark::{Rejection, RejectionKind};
use tower_test::mock;

type Endpoint = Constant<CircuitBreaker<mock::Mock<u32, &'static str>>, u32>;

fn layer(config: BreakerConfig) -> CircuitBreakerLayer {
    CircuitBreakerLayer::new(config.jitter(0.0).clock(Clock::tokio())).unwrap()
}

/// One failure trips it; open for 1 s; one probe, so the probe time limit is the 1 s just served.
fn one_probe() -> BreakerConfig {
    BreakerConfig::consecutive_failures(1)
        .open_time(Duration::from_secs(1))
        .half_open_probes(1)
}

fn circuit_open<T: std::fmt::Debug>(res: Result<T, BoxError>) -> Rejection {
    let err = res.expect_err("refused");
    let r = err
        .downcast_ref::<Rejection>()
        .unwrap_or_else(|| panic!("not a rejection: {err}"))
        .clone();
    assert_eq!(r.kind(), RejectionKind::CircuitOpen);
    r
}

/// Trips the layer's breaker with one failed call.
async fn trip(
    layer: &CircuitBreakerLayer,
    mock: &mock::Mock<u32, &'static str>,
    handle: &mut mock::Handle<u32, &'static str>,
) {
    let svc = layer.layer(mock.clone());
    let fut = svc.oneshot(0);
    let respond = async {
        let (_, send) = handle.next_request().await.unwrap();
        send.send_error("boom");
    };
    let (res, ()) = tokio::join!(fut, respond);
    assert!(res.is_err());
}

/// Answers the next request of `handle` with `body`, and returns the request.
async fn answer(handle: &mut mock::Handle<u32, &'static str>, body: &'static str) -> u32 {
    let (req, send) = handle.next_request().await.expect("a request");
    send.send_response(body);
    req
}

/// Awaits a call's future while answering the request it sends with `body`: the request and
/// the response, or the error of a call that sent no request.
async fn serve<F>(
    fut: F,
    handle: &mut mock::Handle<u32, &'static str>,
    body: &'static str,
) -> Result<(u32, &'static str), BoxError>
where
    F: Future<Output = Result<&'static str, BoxError>>,
{
    let mut fut = std::pin::pin!(fut);
    let req = tokio::select! {
        res = &mut fut => {
            let err = res.expect_err("a call that sent no request cannot have a response");
            return Err(err);
        }
        req = answer(handle, body) => req,
    };
    fut.await.map(|res| (req, res))
}

#[tokio::test(start_paused = true)]
async fn a_healthy_endpoint_readied_and_left_uncalled_by_a_balancer_recovers_from_half_open() {
    // Endpoint A's breaker is shared by two balancers (two workers of one client); endpoint B
    // has a breaker of its own and is less loaded, so both balancers prefer it.
    let a_layer = layer(one_probe());
    let a = a_layer.handle();
    let b_layer = layer(one_probe());
    let (a_mock, mut a_handle) = mock::pair::<u32, &'static str>();
    let (b1_mock, mut b1_handle) = mock::pair::<u32, &'static str>();
    let (b2_mock, mut b2_handle) = mock::pair::<u32, &'static str>();
    trip(&a_layer, &a_mock, &mut a_handle).await;
    assert_eq!(a.state(), BreakerState::Open);
    advance(Duration::from_secs(1)).await;

    let endpoints = |b: mock::Mock<u32, &'static str>| -> Vec<Endpoint> {
        vec![
            Constant::new(a_layer.layer(a_mock.clone()), 10),
            Constant::new(b_layer.layer(b), 1),
        ]
    };
    let mut w1 = Balance::new(ServiceList::new(endpoints(b1_mock)));
    let mut w2 = Balance::new(ServiceList::new(endpoints(b2_mock)));

    // Worker 1 makes both endpoints ready: its A claims A's probe slot and is kept in the
    // ready set, but the request goes to B, which is less loaded.
    w1.ready().await.unwrap();
    let f = a.figures();
    assert_eq!((f.state, f.probes_in_flight), (BreakerState::HalfOpen, 1));
    let fut = w1.call(1);
    assert_eq!(answer(&mut b1_handle, "b").await, 1);
    assert_eq!(fut.await.unwrap(), "b");

    // Worker 2: its A is refused (the one slot is worker 1's), and B takes the request.
    w2.ready().await.unwrap();
    let fut = w2.call(2);
    assert_eq!(answer(&mut b2_handle, "b").await, 2);
    assert_eq!(fut.await.unwrap(), "b");

    // Well past the probe time limit, B goes away for worker 2, whose only endpoint is A.
    // Worker 1's A still holds the slot it was readied with and has never been called: that
    // is no failed probe. The slot goes to worker 2's A, whose call is the probe, and the
    // healthy endpoint closes its breaker.
    advance(Duration::from_millis(1500)).await;
    b2_handle.allow(0);
    w2.ready().await.unwrap();
    let res = serve(w2.call(3), &mut a_handle, "a").await;
    assert_eq!(
        res.expect("the healthy endpoint's probe goes through"),
        (3, "a")
    );
    let f = a.figures();
    assert_eq!((f.state, f.reopens), (BreakerState::Closed, 0));

    // Worker 1's A is called at last: its slot belonged to the round that closed, so the call
    // is decided afresh (closed: it goes through) and leaves no slot behind.
    b1_handle.allow(0);
    w1.ready().await.unwrap();
    let res = serve(w1.call(4), &mut a_handle, "a").await;
    assert_eq!(res.unwrap(), (4, "a"));
    assert_eq!(a.state(), BreakerState::Closed);
}

/// Polls `cache`'s pending services once.
async fn poll_pending<K, S, Req>(cache: &mut ReadyCache<K, S, Req>)
where
    K: Clone + Eq + std::hash::Hash,
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    poll_fn(|cx| {
        let _ = cache.poll_pending(cx);
        Poll::Ready(())
    })
    .await
}

#[tokio::test(start_paused = true)]
async fn a_ready_cache_entry_whose_overdue_slot_was_reclaimed_is_refused_at_call_without_a_leak() {
    let layer = layer(one_probe());
    let state = layer.handle();
    let (mock, mut handle) = mock::pair::<u32, &'static str>();
    trip(&layer, &mock, &mut handle).await;
    advance(Duration::from_secs(1)).await;

    // Entry "idle" is made ready in half-open: it holds the probe slot, and is not called.
    let mut cache = ReadyCache::<&'static str, _, u32>::default();
    cache.push("idle", layer.layer(mock.clone()));
    poll_pending(&mut cache).await;
    assert_eq!(cache.ready_len(), 1);
    assert_eq!(state.figures().probes_in_flight, 1);

    // Past the probe time limit, another caller of the same breaker finds the slot overdue:
    // it was never used for a call, so the round has not failed, and the slot is that
    // caller's now.
    advance(Duration::from_millis(1500)).await;
    let mut other = layer.layer(mock.clone());
    poll_fn(|cx| other.poll_ready(cx)).await.unwrap();
    let f = state.figures();
    assert_eq!(
        (f.state, f.reopens, f.probes_in_flight),
        (BreakerState::HalfOpen, 0, 1)
    );

    // The cache calls "idle" at last: its slot is gone and the one slot is taken, so the call
    // is refused without reaching the inner service, and holds nothing.
    let res = cache.call_ready(&"idle", 5).await;
    circuit_open(res);
    assert!(handle.poll_request().is_pending());
    assert_eq!(state.figures().probes_in_flight, 1);

    // The other caller's call is the probe; it succeeds and closes the breaker.
    let res = serve(other.call(6), &mut handle, "ok").await;
    assert_eq!(res.unwrap(), (6, "ok"));
    let f = state.figures();
    assert_eq!((f.state, f.reopens), (BreakerState::Closed, 0));
}

#[tokio::test(start_paused = true)]
async fn a_service_readied_and_dropped_uncalled_past_the_slow_threshold_frees_its_slot() {
    // With slow-call detection, the probe time limit is the slow-call threshold (100 ms).
    let layer = layer(
        BreakerConfig::consecutive_failures(1)
            .or_slow_call_rate(1.0, Duration::from_millis(100))
            .open_time(Duration::from_secs(1))
            .half_open_probes(1),
    );
    let state = layer.handle();
    let (mock, mut handle) = mock::pair::<u32, &'static str>();
    trip(&layer, &mock, &mut handle).await;
    advance(Duration::from_secs(1)).await;

    // Made ready (inner ready at once), kept uncalled past the threshold, then evicted.
    let mut cache = ReadyCache::<&'static str, _, u32>::default();
    cache.push("idle", layer.layer(mock.clone()));
    poll_pending(&mut cache).await;
    assert_eq!(state.figures().probes_in_flight, 1);
    advance(Duration::from_millis(500)).await;
    assert!(cache.evict(&"idle"));
    poll_pending(&mut cache).await;
    drop(cache);

    // Its slot is free, and it was no failed probe: the next caller is the probe.
    let f = state.figures();
    assert_eq!(
        (f.state, f.reopens, f.probes_in_flight),
        (BreakerState::HalfOpen, 0, 0)
    );
    let svc = layer.layer(mock.clone());
    let res = serve(svc.oneshot(7), &mut handle, "ok").await;
    assert_eq!(res.unwrap(), (7, "ok"));
    assert_eq!(state.state(), BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn a_probe_readied_long_before_its_call_is_timed_from_its_call() {
    let layer = layer(
        BreakerConfig::consecutive_failures(1)
            .or_slow_call_rate(1.0, Duration::from_millis(100))
            .open_time(Duration::from_secs(1))
            .half_open_probes(1),
    );
    let state = layer.handle();
    let (mock, mut handle) = mock::pair::<u32, &'static str>();
    trip(&layer, &mock, &mut handle).await;
    advance(Duration::from_secs(1)).await;

    // Ready at once, then kept in the ready set for 500 ms (five slow-call thresholds) before
    // the cache calls it: the call itself answers at once, so the probe succeeds.
    let mut cache = ReadyCache::<&'static str, _, u32>::default();
    cache.push("a", layer.layer(mock.clone()));
    poll_pending(&mut cache).await;
    advance(Duration::from_millis(500)).await;
    let res = serve(cache.call_ready(&"a", 8), &mut handle, "ok").await;
    assert_eq!(res.unwrap(), (8, "ok"));
    let f = state.figures();
    assert_eq!((f.state, f.reopens), (BreakerState::Closed, 0));
}

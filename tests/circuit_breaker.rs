//! Integration tests of the circuit breaker: paused time, cancellation, flapping, keys,
//! handles, configuration.

use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::advance;
use tower::{BoxError, Layer, Service, ServiceBuilder, ServiceExt};
use tower_bulwark::circuit_breaker::{
    BreakerConfig, BreakerConfigError, BreakerState, CircuitBreaker, CircuitBreakerLayer,
};
use tower_bulwark::clock::Clock;
use tower_bulwark::{Rejection, RejectionKind};

type Reply = Result<&'static str, &'static str>;

type DepFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<&'static str, BoxError>> + Send>>;
type DepFn = fn(oneshot::Receiver<Reply>) -> DepFuture;
type Svc = CircuitBreaker<tower::util::ServiceFn<DepFn>>;

/// A dependency that answers what each request carries, when the test says so.
fn dependency(rx: oneshot::Receiver<Reply>) -> DepFuture {
    Box::pin(async move {
        match rx.await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err("dependency went away".into()),
        }
    })
}

fn now_reply(r: Reply) -> oneshot::Receiver<Reply> {
    let (tx, rx) = oneshot::channel();
    tx.send(r).unwrap();
    rx
}

fn rejection(err: &BoxError) -> &Rejection {
    err.downcast_ref::<Rejection>()
        .unwrap_or_else(|| panic!("not a rejection: {err}"))
}

fn stack(layer: &CircuitBreakerLayer) -> Svc {
    ServiceBuilder::new()
        .layer(layer.clone())
        .service_fn(dependency as DepFn)
}

/// Opens on one failure for 1 s, then admits one probe at a time.
fn one_probe_breaker() -> CircuitBreakerLayer {
    CircuitBreakerLayer::new(
        BreakerConfig::consecutive_failures(1)
            .open_time(Duration::from_secs(1))
            .half_open_probes(1)
            .clock(Clock::tokio()),
    )
    .unwrap()
}

async fn once(svc: &mut Svc, r: Reply) -> Result<&'static str, BoxError> {
    svc.ready().await?.call(now_reply(r)).await
}

#[tokio::test(start_paused = true)]
async fn open_time_probes_close_and_reopen_longer() {
    let layer = CircuitBreakerLayer::new(
        BreakerConfig::consecutive_failures(2)
            .open_time(Duration::from_secs(10))
            .max_open_time(Duration::from_secs(100))
            .backoff_multiplier(2.0)
            .jitter(0.1)
            .half_open_probes(2)
            .clock(Clock::tokio())
            .seed(42),
    )
    .unwrap();
    let handle = layer.handle();
    let mut svc = stack(&layer);

    assert!(once(&mut svc, Err("boom")).await.is_err());
    assert_eq!(handle.state(), BreakerState::Closed);
    assert!(once(&mut svc, Err("boom")).await.is_err());
    assert_eq!(handle.state(), BreakerState::Open);

    // Open: refused without reaching the dependency (a pending reply would hang).
    let (_tx, rx) = oneshot::channel();
    let err = svc.ready().await.unwrap().call(rx).await.unwrap_err();
    let first = rejection(&err).retry_after().unwrap();
    assert_eq!(rejection(&err).kind(), RejectionKind::CircuitOpen);
    assert!(
        first >= Duration::from_secs(9) && first <= Duration::from_secs(11),
        "{first:?}"
    );
    advance(Duration::from_secs(5)).await;
    let err = once(&mut svc, Ok("x")).await.unwrap_err();
    assert_eq!(
        rejection(&err).retry_after().unwrap(),
        first - Duration::from_secs(5)
    );
    assert_eq!(
        handle.figures().open_remaining,
        Some(first - Duration::from_secs(5))
    );

    // Half-open: exactly k = 2 probes at once.
    advance(first - Duration::from_secs(5)).await;
    let (tx1, rx1) = oneshot::channel();
    let (tx2, rx2) = oneshot::channel();
    let p1 = svc.ready().await.unwrap().call(rx1);
    let p2 = svc.ready().await.unwrap().call(rx2);
    assert_eq!(handle.state(), BreakerState::HalfOpen);
    assert_eq!(handle.figures().probes_in_flight, 2);
    let err = once(&mut svc, Ok("x")).await.unwrap_err();
    assert_eq!(rejection(&err).kind(), RejectionKind::CircuitOpen);

    // One success frees a slot, and a third probe may go.
    tx1.send(Ok("a")).unwrap();
    assert_eq!(p1.await.unwrap(), "a");
    assert_eq!(handle.figures().probe_successes, 1);
    assert_eq!(handle.figures().probes_in_flight, 1);
    let (_tx3, rx3) = oneshot::channel();
    let p3 = svc.ready().await.unwrap().call(rx3);
    assert_eq!(handle.figures().probes_in_flight, 2);
    // k = 2 successes close it.
    tx2.send(Ok("b")).unwrap();
    assert_eq!(p2.await.unwrap(), "b");
    assert_eq!(handle.state(), BreakerState::Closed);
    drop(p3);
    assert_eq!(once(&mut svc, Ok("fine")).await.unwrap(), "fine");

    // Closed for the open time it served (10 s): the next trip starts from the base again.
    advance(Duration::from_secs(10)).await;
    // Trip again; each failed probe round doubles the open time (±10%), capped at 100 s.
    once(&mut svc, Err("boom")).await.unwrap_err();
    once(&mut svc, Err("boom")).await.unwrap_err();
    assert_eq!(handle.state(), BreakerState::Open);
    let mut expected = 10.0;
    for round in 1..=5 {
        let left = handle.figures().open_remaining.unwrap();
        advance(left).await;
        let err = once(&mut svc, Err("still down")).await.unwrap_err();
        assert!(
            err.downcast_ref::<Rejection>().is_none(),
            "the probe reached the dependency"
        );
        assert_eq!(handle.state(), BreakerState::Open);
        assert_eq!(handle.figures().reopens, round);
        expected = f64::min(expected * 2.0, 100.0);
        let open = handle.figures().open_remaining.unwrap().as_secs_f64();
        assert!(
            open >= expected * 0.9 - 1e-6 && open <= expected * 1.1 + 1e-6,
            "round {round}: {open} s, expected {expected} ±10%"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn dropped_probes_free_their_slots() {
    let layer = one_probe_breaker();
    let handle = layer.handle();
    let mut svc = stack(&layer);
    once(&mut svc, Err("boom")).await.unwrap_err();
    advance(Duration::from_secs(2)).await;

    // A probe dropped before it is polled.
    let (_tx, rx) = oneshot::channel();
    let probe = svc.ready().await.unwrap().call(rx);
    assert_eq!(handle.figures().probes_in_flight, 1);
    assert!(once(&mut svc, Ok("x")).await.is_err());
    drop(probe);
    assert_eq!(handle.figures().probes_in_flight, 0);
    assert_eq!(handle.state(), BreakerState::HalfOpen);

    // A probe dropped while the dependency is working on it (polled, pending: a timeout
    // above it fires).
    let (_tx, rx) = oneshot::channel();
    let probe = svc.ready().await.unwrap().call(rx);
    let timed_out = tokio::time::timeout(Duration::from_millis(10), probe).await;
    assert!(timed_out.is_err());
    assert_eq!(handle.figures().probes_in_flight, 0);

    // Not stuck: the next call is a probe, and its success closes the breaker.
    assert_eq!(once(&mut svc, Ok("healed")).await.unwrap(), "healed");
    assert_eq!(handle.state(), BreakerState::Closed);
}

/// A service whose `call` panics on `Err("panic")` and otherwise answers at once.
#[derive(Clone)]
struct Panicky;

impl Service<Reply> for Panicky {
    type Response = &'static str;
    type Error = BoxError;
    type Future = std::future::Ready<Result<&'static str, BoxError>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, r: Reply) -> Self::Future {
        if r == Err("panic") {
            panic!("the inner service panicked in call");
        }
        std::future::ready(r.map_err(Into::into))
    }
}

#[tokio::test(start_paused = true)]
async fn a_probe_whose_call_panics_frees_its_slot() {
    let layer = one_probe_breaker();
    let handle = layer.handle();
    let mut svc = layer.layer(Panicky);
    svc.ready()
        .await
        .unwrap()
        .call(Err("boom"))
        .await
        .unwrap_err();
    advance(Duration::from_secs(2)).await;
    svc.ready().await.unwrap();
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        drop(svc.call(Err("panic")));
    }));
    assert!(panicked.is_err());
    assert_eq!(
        handle.figures().probes_in_flight,
        0,
        "the slot unwound free"
    );
    assert_eq!(handle.state(), BreakerState::HalfOpen);
    // The next call is a probe, and its success closes the breaker.
    assert_eq!(
        svc.ready().await.unwrap().call(Ok("healed")).await.unwrap(),
        "healed"
    );
    assert_eq!(handle.state(), BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn dropped_closed_calls_count_as_neither() {
    let layer = CircuitBreakerLayer::new(
        BreakerConfig::failure_rate(0.5)
            .window(4)
            .minimum_calls(4)
            .clock(Clock::tokio()),
    )
    .unwrap();
    let handle = layer.handle();
    let mut svc = stack(&layer);
    for _ in 0..10 {
        let (_tx, rx) = oneshot::channel();
        drop(svc.ready().await.unwrap().call(rx));
    }
    assert_eq!(handle.figures().calls, 0);
    once(&mut svc, Err("boom")).await.unwrap_err();
    once(&mut svc, Ok("x")).await.unwrap();
    assert_eq!(handle.figures().calls, 2);
    assert_eq!(handle.figures().failures, 1);
}

#[tokio::test(start_paused = true)]
async fn slow_calls_trip_the_breaker() {
    let layer = CircuitBreakerLayer::new(
        BreakerConfig::slow_call_rate(0.5, Duration::from_millis(100))
            .window(4)
            .minimum_calls(4)
            .clock(Clock::tokio()),
    )
    .unwrap();
    let handle = layer.handle();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service_fn(|ms: u64| async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok::<_, BoxError>(ms)
        });
    for ms in [10, 150, 20] {
        svc.clone().oneshot(ms).await.unwrap();
    }
    assert_eq!(handle.figures().slow_calls, 1);
    assert_eq!(handle.state(), BreakerState::Closed);
    // 99 ms is not slow; 100 ms is (successes, all of them).
    svc.clone().oneshot(99).await.unwrap();
    assert_eq!(handle.state(), BreakerState::Closed, "1 slow of 4");
    svc.clone().oneshot(100).await.unwrap();
    let f = handle.figures();
    assert_eq!((f.calls, f.slow_calls, f.failures), (4, 2, 0));
    assert_eq!(f.state, BreakerState::Open);
}

#[tokio::test(start_paused = true)]
async fn a_slow_probe_reopens() {
    let layer = CircuitBreakerLayer::new(
        BreakerConfig::slow_call_rate(1.0, Duration::from_millis(100))
            .window(2)
            .minimum_calls(2)
            .open_time(Duration::from_secs(1))
            .jitter(0.0)
            .half_open_probes(1)
            .clock(Clock::tokio()),
    )
    .unwrap();
    let handle = layer.handle();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service_fn(|ms: u64| async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok::<_, BoxError>(ms)
        });
    svc.clone().oneshot(150).await.unwrap();
    svc.clone().oneshot(150).await.unwrap();
    assert_eq!(handle.state(), BreakerState::Open);
    advance(Duration::from_secs(1)).await;
    // The probe succeeds, but slowly: the breaker reopens, for twice as long.
    svc.clone().oneshot(150).await.unwrap();
    let f = handle.figures();
    assert_eq!((f.state, f.reopens), (BreakerState::Open, 1));
    assert_eq!(f.open_remaining, Some(Duration::from_secs(2)));
    advance(Duration::from_secs(2)).await;
    // A quick probe closes it.
    svc.clone().oneshot(10).await.unwrap();
    assert_eq!(handle.state(), BreakerState::Closed);
}

#[test]
fn bad_configuration_is_refused_at_construction() {
    use BreakerConfigError as E;
    let cases: Vec<(BreakerConfig, E)> = vec![
        (BreakerConfig::failure_rate(1.01), E::FailureRate(1.01)),
        (BreakerConfig::failure_rate(-0.1), E::FailureRate(-0.1)),
        (
            BreakerConfig::default().or_slow_call_rate(2.0, Duration::from_secs(1)),
            E::SlowCallRate(2.0),
        ),
        (
            BreakerConfig::slow_call_rate(0.5, Duration::ZERO),
            E::SlowCallThreshold,
        ),
        (
            BreakerConfig::consecutive_failures(0),
            E::ConsecutiveFailures,
        ),
        (BreakerConfig::default().window(0), E::Window),
        (
            BreakerConfig::default().time_window(Duration::from_secs(1), 0),
            E::Window,
        ),
        (
            BreakerConfig::default().time_window(Duration::ZERO, 10),
            E::Window,
        ),
        (BreakerConfig::default().half_open_probes(0), E::Probes),
        (BreakerConfig::default().half_open_probes(70_000), E::Probes),
        (BreakerConfig::default().minimum_calls(0), E::MinimumCalls),
        (
            BreakerConfig::default().window(10).minimum_calls(11),
            E::MinimumCalls,
        ),
        (
            BreakerConfig::default().open_time(Duration::ZERO),
            E::OpenTime,
        ),
        (
            BreakerConfig::default().max_open_time(Duration::from_secs(1)),
            E::OpenTime,
        ),
        (
            BreakerConfig::default().backoff_multiplier(0.5),
            E::Multiplier(0.5),
        ),
        (BreakerConfig::default().jitter(1.5), E::Jitter(1.5)),
        (BreakerConfig::default().max_keys(0), E::MaxKeys),
    ];
    for (config, want) in cases {
        let got = CircuitBreakerLayer::new(config.clone()).unwrap_err();
        assert_eq!(got, want, "{config:?}");
        assert!(!got.to_string().is_empty());
        assert!(CircuitBreakerLayer::keyed(config, |r: &u32| *r).is_err());
    }
    let nan = CircuitBreakerLayer::new(BreakerConfig::failure_rate(f64::NAN)).unwrap_err();
    assert!(matches!(nan, E::FailureRate(r) if r.is_nan()));
    // The edges are accepted.
    for config in [
        BreakerConfig::failure_rate(0.0),
        BreakerConfig::failure_rate(1.0),
        BreakerConfig::default().window(1).minimum_calls(1),
        BreakerConfig::default().jitter(0.0).jitter(1.0),
        BreakerConfig::default().time_window(Duration::from_secs(10), 10),
    ] {
        assert!(CircuitBreakerLayer::new(config).is_ok());
    }
}

#[tokio::test(start_paused = true)]
async fn clones_and_layered_services_share_one_breaker() {
    let layer =
        CircuitBreakerLayer::new(BreakerConfig::consecutive_failures(2).clock(Clock::tokio()))
            .unwrap();
    let mut a = stack(&layer);
    let mut b = stack(&layer); // a second `Layer::layer` call, as Axum makes per route
    let mut c = a.clone();
    once(&mut a, Err("boom")).await.unwrap_err();
    once(&mut b, Err("boom")).await.unwrap_err();
    let err = once(&mut c, Ok("x")).await.unwrap_err();
    assert_eq!(rejection(&err).kind(), RejectionKind::CircuitOpen);
    assert_eq!(layer.clone().handle().state(), BreakerState::Open);
}

#[tokio::test(start_paused = true)]
async fn poll_ready_is_the_inner_services() {
    let layer = CircuitBreakerLayer::new(BreakerConfig::default()).unwrap();
    let (mut svc, mut handle) = tower_test::mock::spawn_layer::<u32, u32, _>(layer);
    handle.allow(0);
    tokio_test::assert_pending!(svc.poll_ready());
    handle.allow(1);
    tokio_test::assert_ready_ok!(svc.poll_ready());
    let fut = svc.call(7);
    let (req, send) = handle.next_request().await.unwrap();
    assert_eq!(req, 7);
    send.send_response(8);
    assert_eq!(fut.await.unwrap(), 8);
}

#[tokio::test(start_paused = true)]
async fn handle_forces_and_resets() {
    let layer = CircuitBreakerLayer::new(
        BreakerConfig::consecutive_failures(1)
            .open_time(Duration::from_secs(7))
            .clock(Clock::tokio()),
    )
    .unwrap();
    let handle = layer.handle();
    let mut svc = stack(&layer);

    handle.force_open();
    assert_eq!(handle.state(), BreakerState::ForcedOpen);
    advance(Duration::from_secs(3600)).await;
    let err = once(&mut svc, Ok("x")).await.unwrap_err();
    // Forced open has no end: the hint is the open time as a period to look again, drawn
    // for each caller between half and one and a half times it.
    let hint = rejection(&err).retry_after().expect("a hint");
    assert!(
        (Duration::from_millis(3500)..Duration::from_millis(10_500)).contains(&hint),
        "{hint:?}"
    );

    handle.force_closed();
    for _ in 0..5 {
        once(&mut svc, Err("boom")).await.unwrap_err();
    }
    assert_eq!(handle.state(), BreakerState::ForcedClosed);
    assert_eq!(handle.figures().consecutive_failures, 0);

    handle.reset();
    assert_eq!(handle.state(), BreakerState::Closed);
    once(&mut svc, Err("boom")).await.unwrap_err();
    assert_eq!(handle.state(), BreakerState::Open);
    handle.reset();
    assert_eq!(once(&mut svc, Ok("x")).await.unwrap(), "x");
    let f = handle.figures();
    assert_eq!(
        (f.state, f.consecutive_failures, f.reopens),
        (BreakerState::Closed, 0, 0)
    );
    assert!(format!("{handle:?}").contains("Closed"));
}

#[tokio::test(start_paused = true)]
async fn keyed_breakers_trip_apart_and_stay_bounded() {
    let layer = CircuitBreakerLayer::keyed(
        BreakerConfig::consecutive_failures(1)
            .max_keys(2)
            .open_time(Duration::from_secs(10))
            .clock(Clock::tokio()),
        |req: &(&'static str, bool)| req.0,
    )
    .unwrap();
    let svc = ServiceBuilder::new().layer(layer.clone()).service_fn(
        |(_, ok): (&'static str, bool)| async move {
            if ok {
                Ok::<_, BoxError>("ok")
            } else {
                Err::<&str, BoxError>("down".into())
            }
        },
    );
    let kind = |r: Result<&str, BoxError>| match r {
        Ok(_) => "ok",
        Err(e) if e.downcast_ref::<Rejection>().is_some() => "open",
        Err(_) => "failed",
    };

    assert_eq!(kind(svc.clone().oneshot(("a", false)).await), "failed");
    assert_eq!(kind(svc.clone().oneshot(("a", true)).await), "open");
    assert_eq!(kind(svc.clone().oneshot(("b", true)).await), "ok");
    assert_eq!(layer.handle_for("a").unwrap().state(), BreakerState::Open);
    assert_eq!(layer.handle_for("b").unwrap().state(), BreakerState::Closed);
    assert!(layer.handle_for("c").is_none());
    assert_eq!(layer.keys_in_use(), 2);

    // The table is full: a new key takes the healthy breaker of "b", never the open one.
    assert_eq!(kind(svc.clone().oneshot(("c", true)).await), "ok");
    assert_eq!(layer.keys_in_use(), 2);
    assert!(layer.handle_for("b").is_none());
    assert_eq!(layer.handle_for("a").unwrap().state(), BreakerState::Open);
    assert_eq!(kind(svc.clone().oneshot(("a", true)).await), "open");

    // Both breakers open: a new key goes through unguarded rather than share a breaker.
    assert_eq!(kind(svc.clone().oneshot(("c", false)).await), "failed");
    assert_eq!(kind(svc.clone().oneshot(("d", false)).await), "failed");
    assert_eq!(kind(svc.clone().oneshot(("d", true)).await), "ok");
    assert!(layer.handle_for("d").is_none());

    // Open time over: "a" probes and heals on its own.
    advance(Duration::from_secs(12)).await;
    assert_eq!(kind(svc.clone().oneshot(("a", true)).await), "ok");
    let a = layer.handle_for("a").unwrap();
    assert_eq!(a.state(), BreakerState::HalfOpen);
    for _ in 0..2 {
        svc.clone().oneshot(("a", true)).await.unwrap();
    }
    assert_eq!(a.state(), BreakerState::Closed);
}

#[test]
fn public_types_are_send_and_sync() {
    fn is<T: Send + Sync>() {}
    is::<CircuitBreakerLayer>();
    is::<Svc>();
    is::<tower_bulwark::circuit_breaker::BreakerHandle>();
    is::<tower_bulwark::circuit_breaker::BreakerFigures>();
    is::<BreakerConfig>();
    is::<BreakerConfigError>();
    is::<
        tower_bulwark::circuit_breaker::future::ResponseFuture<
            std::future::Ready<Result<(), BoxError>>,
            tower_bulwark::classify::HttpStatus,
        >,
    >();
}

#[tokio::test(start_paused = true)]
async fn a_trip_soon_after_closing_grows_the_open_time_until_it_stays_closed() {
    let layer = CircuitBreakerLayer::new(
        BreakerConfig::consecutive_failures(1)
            .open_time(Duration::from_secs(1))
            .max_open_time(Duration::from_secs(5))
            .backoff_multiplier(2.0)
            .jitter(0.0)
            .half_open_probes(1)
            .clock(Clock::tokio()),
    )
    .unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(tower::service_fn(|fail: bool| async move {
        if fail {
            Err::<&str, BoxError>("down".into())
        } else {
            Ok("ok")
        }
    }));
    // Trips each right after a probe closed the breaker: 1 s, 2 s, 4 s, then capped at 5 s.
    let mut open = vec![];
    for _ in 0..5 {
        svc.ready().await.unwrap().call(true).await.unwrap_err();
        let f = handle.figures();
        open.push((f.open_remaining.unwrap(), f.reopens));
        advance(f.open_remaining.unwrap()).await;
        assert_eq!(svc.ready().await.unwrap().call(false).await.unwrap(), "ok");
        assert_eq!(handle.state(), BreakerState::Closed);
    }
    let s = Duration::from_secs;
    assert_eq!(
        open,
        [(s(1), 0), (s(2), 1), (s(4), 2), (s(5), 3), (s(5), 4)],
        "open times and growths of a flapping dependency"
    );
    // Closed just short of the open time it last served (5 s): the trip still grows it.
    advance(Duration::from_millis(4999)).await;
    svc.ready().await.unwrap().call(true).await.unwrap_err();
    assert_eq!(handle.figures().reopens, 5);
    advance(handle.figures().open_remaining.unwrap()).await;
    assert_eq!(svc.ready().await.unwrap().call(false).await.unwrap(), "ok");
    // Closed for that long: healed; the next trip starts from the base open time again.
    advance(Duration::from_secs(5)).await;
    svc.ready().await.unwrap().call(true).await.unwrap_err();
    let f = handle.figures();
    assert_eq!((f.open_remaining, f.reopens), (Some(s(1)), 0));
    // A reset forgets the growth too.
    advance(s(1)).await;
    assert_eq!(svc.ready().await.unwrap().call(false).await.unwrap(), "ok");
    handle.reset();
    svc.ready().await.unwrap().call(true).await.unwrap_err();
    assert_eq!(handle.figures().open_remaining, Some(s(1)));
}

#[tokio::test(start_paused = true)]
async fn a_keyed_handle_acts_only_on_its_own_key() {
    let breakers = CircuitBreakerLayer::keyed(
        BreakerConfig::consecutive_failures(2)
            .max_keys(8)
            .clock(Clock::tokio()),
        |req: &(String, bool)| req.0.clone(),
    )
    .unwrap();
    let svc = ServiceBuilder::new().layer(breakers.clone()).service_fn(
        |(_, fail): (String, bool)| async move {
            if fail {
                Err::<(), BoxError>("down".into())
            } else {
                Ok(())
            }
        },
    );
    // k0 healthy, k1..k7 with one failure each: k0's is the only reusable slot.
    svc.clone().oneshot(("k0".into(), false)).await.unwrap();
    for i in 1..8 {
        assert!(svc.clone().oneshot((format!("k{i}"), true)).await.is_err());
    }
    let k0 = breakers.handle_for("k0").expect("k0 has a breaker");
    // k8 takes k0's slot, then trips.
    svc.clone().oneshot(("k8".into(), true)).await.unwrap_err();
    svc.clone().oneshot(("k8".into(), true)).await.unwrap_err();
    let k8 = breakers.handle_for("k8").expect("k8 has a breaker");
    assert_eq!(k8.state(), BreakerState::Open);

    // k0's handle acts on nothing: a reset does not close k8, and it reads as a fresh breaker.
    k0.reset();
    k0.force_closed();
    assert_eq!(k8.state(), BreakerState::Open);
    let f = k0.figures();
    assert_eq!(
        (f.state, f.calls, f.consecutive_failures),
        (BreakerState::Closed, 0, 0)
    );
}

/// A keyed breaker that has tripped and is still asked for keeps its slot against a flood of
/// new keys, hours on: only slots no request has touched since their failures (or their open
/// time) went stale are given to new keys.
#[tokio::test(start_paused = true)]
async fn a_tripped_key_still_asked_for_survives_a_flood_of_new_keys() {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;
    let sick_calls = Arc::new(AtomicU32::new(0));
    let counted = sick_calls.clone();
    let inner = tower::service_fn(move |key: u32| {
        if key == 0 {
            counted.fetch_add(1, Ordering::SeqCst);
        }
        // Key 0's host is down for good; every other host answers.
        async move {
            if key == 0 {
                Err::<(), BoxError>("connection refused".into())
            } else {
                Ok(())
            }
        }
    });
    let layer = CircuitBreakerLayer::keyed(
        BreakerConfig::consecutive_failures(1)
            .open_time(Duration::from_secs(60))
            .max_keys(4)
            .clock(Clock::tokio()),
        |key: &u32| *key,
    )
    .unwrap();
    let svc = layer.layer(inner);
    // Key 0 trips.
    let _ = svc.clone().oneshot(0).await;
    assert_eq!(sick_calls.load(Ordering::SeqCst), 1);
    let mut next = 1;
    for _ in 0..24 {
        // Half an hour on, key 0 is asked for again (its one probe fails: open again), then
        // a flood of new keys comes.
        advance(Duration::from_secs(30 * 60)).await;
        let _ = svc.clone().oneshot(0).await;
        for _ in 0..64 {
            let _ = svc.clone().oneshot(next).await;
            next += 1;
        }
        // Refused while open: the flood did not take its slot.
        let err = svc.clone().oneshot(0).await.unwrap_err();
        assert_eq!(
            Rejection::find(&*err).map(Rejection::kind),
            Some(RejectionKind::CircuitOpen)
        );
    }
    // One probe per half hour, nothing more.
    assert_eq!(sick_calls.load(Ordering::SeqCst), 25);
}

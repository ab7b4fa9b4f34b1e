//! A breaker that refuses does not wait on the readiness of the service below it (tower's
//! `LoadShed` pattern): an open breaker, or a half-open one with every probe slot taken,
//! answers `poll_ready` at once and refuses in `call`.

use std::time::Duration;

use tokio::time::advance;
use tokio_test::{assert_pending, assert_ready, assert_ready_ok};
use tower::BoxError;
use tower_bulwark::circuit_breaker::{BreakerConfig, BreakerState, CircuitBreakerLayer};
use tower_bulwark::clock::Clock;
use tower_bulwark::{Rejection, RejectionKind};
use tower_test::mock;

fn layer() -> CircuitBreakerLayer {
    CircuitBreakerLayer::new(
        BreakerConfig::consecutive_failures(1)
            .open_time(Duration::from_secs(1))
            .jitter(0.0)
            .half_open_probes(1)
            .clock(Clock::tokio()),
    )
    .unwrap()
}

fn circuit_open(res: Result<&'static str, BoxError>) -> Rejection {
    let err = res.expect_err("refused");
    let r = err
        .downcast_ref::<Rejection>()
        .unwrap_or_else(|| panic!("not a rejection: {err}"))
        .clone();
    assert_eq!(r.kind(), RejectionKind::CircuitOpen);
    r
}

/// Trips the breaker with one failure through the mock.
async fn trip(
    svc: &mut mock::Spawn<
        tower_bulwark::circuit_breaker::CircuitBreaker<mock::Mock<u32, &'static str>>,
    >,
    handle: &mut mock::Handle<u32, &'static str>,
) {
    handle.allow(1);
    assert_ready_ok!(svc.poll_ready());
    let fut = svc.call(1);
    let (_, send) = handle.next_request().await.unwrap();
    send.send_error("boom");
    assert!(fut.await.is_err());
}

#[tokio::test(start_paused = true)]
async fn an_open_breaker_refuses_without_waiting_on_the_inner_readiness() {
    let layer = layer();
    let state = layer.handle();
    let (mut svc, mut handle) = mock::spawn_layer::<u32, &'static str, _>(layer);

    // Closed: the inner service's readiness is the breaker's.
    handle.allow(0);
    assert_pending!(svc.poll_ready());

    trip(&mut svc, &mut handle).await;
    assert_eq!(state.state(), BreakerState::Open);

    // Open, and the sick dependency is not ready: refused at once, not left waiting.
    handle.allow(0);
    assert_ready_ok!(
        svc.poll_ready(),
        "an open breaker must not wait on the inner service"
    );
    let mut fut = tokio_test::task::spawn(svc.call(2));
    let r = circuit_open(assert_ready!(fut.poll()));
    assert_eq!(r.retry_after(), Some(Duration::from_secs(1)));
    // Nothing reached the inner service.
    assert_pending!(handle.poll_request());

    // Forced open: the same.
    state.force_open();
    assert_ready_ok!(svc.poll_ready(), "a forced-open breaker must not wait");
    let mut fut = tokio_test::task::spawn(svc.call(3));
    circuit_open(assert_ready!(fut.poll()));
    assert_pending!(handle.poll_request());
}

#[tokio::test(start_paused = true)]
async fn half_open_with_every_slot_taken_refuses_without_waiting() {
    let layer = layer();
    let state = layer.handle();
    let (mut svc, mut handle) = mock::spawn_layer::<u32, &'static str, _>(layer);
    trip(&mut svc, &mut handle).await;
    advance(Duration::from_secs(1)).await;

    // Open time over, the dependency not ready: the probe waits for it, as any call would.
    handle.allow(0);
    assert_pending!(svc.poll_ready());
    handle.allow(1);
    assert_ready_ok!(svc.poll_ready());
    let probe = svc.call(3);
    assert_eq!(state.state(), BreakerState::HalfOpen);
    let (_, send) = handle.next_request().await.unwrap();

    // The one probe slot is taken: the next caller is refused at once.
    handle.allow(0);
    assert_ready_ok!(svc.poll_ready(), "a full half-open breaker must not wait");
    let mut fut = tokio_test::task::spawn(svc.call(4));
    circuit_open(assert_ready!(fut.poll()));
    assert_pending!(handle.poll_request());

    // The probe succeeds: closed, and readiness is the inner service's again.
    send.send_response("healed");
    assert_eq!(probe.await.unwrap(), "healed");
    assert_eq!(state.state(), BreakerState::Closed);
    assert_pending!(svc.poll_ready());
    handle.allow(1);
    assert_ready_ok!(svc.poll_ready());
    let fut = svc.call(5);
    let (req, send) = handle.next_request().await.unwrap();
    assert_eq!(req, 5);
    send.send_response("ok");
    assert_eq!(fut.await.unwrap(), "ok");
}

#[tokio::test(start_paused = true)]
async fn a_refusal_decided_in_poll_ready_is_what_call_returns() {
    let layer = layer();
    let state = layer.handle();
    let (mut svc, mut handle) = mock::spawn_layer::<u32, &'static str, _>(layer);
    trip(&mut svc, &mut handle).await;
    handle.allow(0);
    assert_ready_ok!(svc.poll_ready());
    // The breaker closes between `poll_ready` and `call`: the inner service was never made
    // ready, so the call is still refused rather than sent to a service that is not ready.
    state.reset();
    let mut fut = tokio_test::task::spawn(svc.call(6));
    circuit_open(assert_ready!(fut.poll()));
    assert_pending!(handle.poll_request());
    // The next round is decided afresh.
    assert_pending!(svc.poll_ready());
}

#[tokio::test(start_paused = true)]
async fn a_readiness_error_counts_as_a_failed_call_and_a_failed_probe() {
    let layer = layer();
    let state = layer.handle();
    let (mut svc, mut handle) = mock::spawn_layer::<u32, &'static str, _>(layer);

    // Closed: the dependency cannot be reached; the error is passed on and trips the breaker.
    handle.send_error("connection refused");
    let err = assert_ready!(svc.poll_ready()).expect_err("the readiness error is passed on");
    assert_eq!(err.to_string(), "connection refused");
    assert_eq!(state.state(), BreakerState::Open);
    assert_eq!(state.figures().reopens, 0);

    // After the open time, the readiness error is the probe, and it failed: open for longer.
    advance(Duration::from_millis(1001)).await;
    handle.send_error("connection refused");
    assert!(assert_ready!(svc.poll_ready()).is_err());
    let f = state.figures();
    assert_eq!(
        (f.state, f.reopens, f.probes_in_flight),
        (BreakerState::Open, 1, 0)
    );
    assert_eq!(f.open_remaining, Some(Duration::from_secs(2)));

    // A ready dependency after that: the probe goes through and closes the breaker.
    advance(Duration::from_millis(2001)).await;
    handle.allow(1);
    assert_ready_ok!(svc.poll_ready());
    let fut = svc.call(1);
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response("ok");
    assert_eq!(fut.await.unwrap(), "ok");
    assert_eq!(state.state(), BreakerState::Closed);
}

/// Polls `svc.poll_ready` once.
async fn poll_once<S: tower::Service<u32>>(svc: &mut S) -> std::task::Poll<Result<(), S::Error>> {
    std::future::poll_fn(|cx| std::task::Poll::Ready(svc.poll_ready(cx))).await
}

#[tokio::test(start_paused = true)]
async fn a_probe_waiting_on_readiness_frees_its_slot_when_its_service_is_dropped() {
    use tower::{Layer, Service};
    let layer = layer();
    let state = layer.handle();
    let (mock, mut handle) = mock::pair::<u32, &'static str>();
    let mut first = layer.layer(mock.clone());
    handle.allow(1);
    assert!(poll_once(&mut first).await.is_ready());
    let fut = first.call(1);
    let (_, send) = handle.next_request().await.unwrap();
    send.send_error("boom");
    assert!(fut.await.is_err());
    advance(Duration::from_secs(1)).await;

    // The dependency is not ready. The first caller after the open time claims the probe slot
    // and waits; the next is refused at once.
    handle.allow(0);
    let mut a = layer.layer(mock.clone());
    assert!(poll_once(&mut a).await.is_pending(), "the probe waits");
    assert_eq!(state.figures().probes_in_flight, 1);
    let mut b = layer.layer(mock.clone());
    assert!(poll_once(&mut b).await.is_ready(), "the others do not wait");
    circuit_open(b.call(2).await);

    // The waiting caller goes away: its slot is free, and the next caller is the probe.
    drop(a);
    assert_eq!(state.figures().probes_in_flight, 0);
    assert!(poll_once(&mut b).await.is_pending(), "b is the probe now");
    assert_eq!(state.state(), BreakerState::HalfOpen);
    handle.allow(1);
    assert!(poll_once(&mut b).await.is_ready());
    let fut = b.call(3);
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response("healed");
    assert_eq!(fut.await.unwrap(), "healed");
    assert_eq!(state.state(), BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn a_service_made_ready_and_never_called_does_not_hold_the_probe_slot_for_ever() {
    use tower::{Layer, Service};
    let layer = layer();
    let state = layer.handle();
    let (mock, mut handle) = mock::pair::<u32, &'static str>();
    let mut first = layer.layer(mock.clone());
    handle.allow(1);
    assert!(poll_once(&mut first).await.is_ready());
    let fut = first.call(1);
    let (_, send) = handle.next_request().await.unwrap();
    send.send_error("boom");
    assert!(fut.await.is_err());
    advance(Duration::from_secs(1)).await;

    // `idle` is made ready (its probe slot claimed) and then kept, never called.
    handle.allow(1);
    let mut idle = layer.layer(mock.clone());
    assert!(poll_once(&mut idle).await.is_ready());
    let mut other = layer.layer(mock.clone());
    assert!(poll_once(&mut other).await.is_ready());
    circuit_open(other.call(2).await);

    // Past the probe time limit (the 1 s open time just served), the slot is overdue. It was
    // never used for a call, so the round has not failed: the slot goes to the next caller,
    // whose call is the probe.
    advance(Duration::from_millis(1000)).await;
    assert!(poll_once(&mut other).await.is_ready());
    let f = state.figures();
    assert_eq!(
        (f.state, f.reopens, f.probes_in_flight),
        (BreakerState::HalfOpen, 0, 1)
    );
    let fut = other.call(4);
    let (req, send) = handle.next_request().await.unwrap();
    assert_eq!(req, 4);
    send.send_response("healed");
    assert_eq!(fut.await.unwrap(), "healed");
    let f = state.figures();
    assert_eq!((f.state, f.reopens), (BreakerState::Closed, 0));

    // The idle service's slot belonged to a round now over: its call is decided afresh
    // (closed now, so it goes through), and it never counted as a probe.
    handle.allow(1);
    let fut = idle.call(5);
    let (req, send) = handle.next_request().await.unwrap();
    assert_eq!(req, 5);
    send.send_response("ok");
    assert_eq!(fut.await.unwrap(), "ok");
}

#[tokio::test(start_paused = true)]
async fn a_probe_waiting_on_a_never_ready_dependency_is_refused_at_the_probe_time_limit() {
    use tower::{Service, ServiceExt};
    let layer = layer();
    let state = layer.handle();
    let (mut svc, mut handle) = mock::spawn_layer::<u32, &'static str, _>(layer);
    trip(&mut svc, &mut handle).await;
    advance(Duration::from_secs(1)).await;

    // The open time is over and the dependency is never ready: the one caller claims the
    // probe slot and waits on it, with nobody else coming to find the round overdue.
    handle.allow(0);
    let mut svc = svc.into_inner();
    let start = tokio::time::Instant::now();
    let ready = tokio::time::timeout(Duration::from_secs(10), svc.ready()).await;
    let svc = ready
        .expect("the waiting probe is not left waiting past its limit")
        .expect("ready with the refusal");
    // The probe time limit is the 1 s open time just served.
    assert_eq!(start.elapsed(), Duration::from_secs(1));
    let r = circuit_open(svc.call(7).await);
    assert_eq!(r.retry_after(), Some(Duration::from_secs(2)));
    let f = state.figures();
    assert_eq!(
        (f.state, f.reopens, f.probes_in_flight),
        (BreakerState::Open, 1, 0)
    );
    assert_pending!(handle.poll_request());

    // After the longer open time, a ready dependency is probed and closes the breaker.
    advance(Duration::from_secs(2)).await;
    handle.allow(1);
    svc.ready().await.unwrap();
    let fut = svc.call(8);
    let (req, send) = handle.next_request().await.unwrap();
    assert_eq!(req, 8);
    send.send_response("healed");
    assert_eq!(fut.await.unwrap(), "healed");
    assert_eq!(state.state(), BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn for_balancer_an_open_breaker_is_pending_until_its_open_time_ends() {
    use tower::{Service, ServiceExt};
    let layer = layer().for_balancer();
    let state = layer.handle();
    let (mut svc, mut handle) = mock::spawn_layer::<u32, &'static str, _>(layer);
    trip(&mut svc, &mut handle).await;
    assert_eq!(state.state(), BreakerState::Open);

    // Open: pending (a balancer skips the endpoint), and the inner service is not polled.
    handle.allow(1);
    assert_pending!(svc.poll_ready(), "open, for a balancer: pending");
    assert_pending!(handle.poll_request());
    advance(Duration::from_millis(999)).await;
    assert!(!svc.is_woken(), "woken before the open time ends");
    assert_pending!(svc.poll_ready());

    // The open time ends: the caller is woken, and the probe goes through.
    advance(Duration::from_millis(1)).await;
    assert!(svc.is_woken(), "woken at the end of the open time");
    assert_ready_ok!(svc.poll_ready());
    assert_eq!(state.state(), BreakerState::HalfOpen);
    let fut = svc.call(9);
    let (req, send) = handle.next_request().await.unwrap();
    assert_eq!(req, 9);
    send.send_response("healed");
    assert_eq!(fut.await.unwrap(), "healed");
    assert_eq!(state.state(), BreakerState::Closed);

    // Forced open: pending too, looking again from time to time.
    state.force_open();
    assert_pending!(svc.poll_ready());
    state.reset();
    let mut svc = svc.into_inner();
    handle.allow(1);
    tokio::time::timeout(Duration::from_secs(2), svc.ready())
        .await
        .expect("looks again within 1.5 times the open time")
        .unwrap();
    let fut = svc.call(10);
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response("ok");
    assert_eq!(fut.await.unwrap(), "ok");
}

#[tokio::test(start_paused = true)]
async fn for_balancer_a_probe_waiting_past_its_limit_reopens_and_waits_for_the_next_round() {
    let layer = layer().for_balancer();
    let state = layer.handle();
    let (mut svc, mut handle) = mock::spawn_layer::<u32, &'static str, _>(layer);
    trip(&mut svc, &mut handle).await;
    advance(Duration::from_secs(1)).await;

    handle.allow(0);
    assert_pending!(svc.poll_ready(), "the probe waits on the dependency");
    assert_eq!(state.figures().probes_in_flight, 1);
    advance(Duration::from_secs(1)).await;
    assert!(svc.is_woken(), "woken at the probe time limit");
    // The round failed; open again for 2 s, and pending (not refused) for a balancer.
    assert_pending!(svc.poll_ready());
    let f = state.figures();
    assert_eq!((f.state, f.reopens), (BreakerState::Open, 1));
    advance(Duration::from_secs(2)).await;
    assert!(svc.is_woken(), "woken at the end of the open time");
    handle.allow(1);
    assert_ready_ok!(svc.poll_ready());
    assert_eq!(state.state(), BreakerState::HalfOpen);
}

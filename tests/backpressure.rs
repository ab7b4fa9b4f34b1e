//! Behaviour of the backpressure layer, step by step, under paused tokio time.

#[path = "support/tracing_on.rs"]
mod tracing_on;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_test::{assert_pending, assert_ready, assert_ready_ok, task};
use tower::{Layer, Service, ServiceExt};
use tower_bulwark::backpressure::BackpressureLayer;
use tower_bulwark::{Rejection, RejectionKind};
use tower_test::{assert_request_eq, mock};

fn overloaded(err: &tower::BoxError) -> Rejection {
    let r = err.downcast_ref::<Rejection>().expect("a rejection");
    assert_eq!(r.kind(), RejectionKind::Overloaded);
    r.clone()
}

/// Whether the mock has a request waiting for it.
fn mock_has_request<T, U>(mock: &mut mock::Handle<T, U>) -> bool {
    task::spawn(()).enter(|_, _| mock.poll_request().is_ready())
}

#[tokio::test(start_paused = true)]
async fn request_beyond_limit_waits_and_is_admitted_the_moment_a_permit_is_released() {
    let layer = BackpressureLayer::new(1).max_wait(Duration::from_secs(1));
    let handle = layer.handle();
    let (mut svc, mut mock) = mock::spawn_layer::<&str, &str, _>(layer);

    assert_ready_ok!(svc.poll_ready());
    let mut first = task::spawn(svc.call("first"));
    assert_pending!(first.poll());
    assert_request_eq!(mock, "first").send_response("one");

    assert_ready_ok!(svc.poll_ready());
    let mut second = task::spawn(svc.call("second"));
    assert_pending!(second.poll());
    assert_eq!(handle.waiting(), 1);
    assert_eq!(handle.in_flight(), 1);
    assert!(
        !mock_has_request(&mut mock),
        "a waiting request must not reach the inner service"
    );

    assert_eq!(assert_ready_ok!(first.poll()), "one");
    // Released: the waiter is woken and admitted on its next poll, before its deadline.
    assert!(second.is_woken());
    assert_pending!(second.poll());
    assert_eq!(handle.waiting(), 0);
    assert_eq!(handle.in_flight(), 1);
    assert_request_eq!(mock, "second").send_response("two");
    assert_eq!(assert_ready_ok!(second.poll()), "two");
    assert_eq!(handle.in_flight(), 0);
    assert_eq!(handle.shed(), 0);
}

#[tokio::test(start_paused = true)]
async fn waiter_is_shed_at_exactly_max_wait() {
    let max_wait = Duration::from_millis(100);
    let layer = BackpressureLayer::new(1)
        .max_wait(max_wait)
        .retry_after(Duration::from_secs(3));
    let handle = layer.handle();
    let (mut svc, mut mock) = mock::spawn_layer::<&str, &str, _>(layer);

    assert_ready_ok!(svc.poll_ready());
    let mut first = task::spawn(svc.call("first"));
    assert_pending!(first.poll());
    assert_ready_ok!(svc.poll_ready());
    let mut second = task::spawn(svc.call("second"));
    assert_pending!(second.poll());

    tokio::time::advance(max_wait - Duration::from_nanos(1)).await;
    assert_pending!(second.poll());
    assert_eq!(handle.waiting(), 1);
    tokio::time::advance(Duration::from_nanos(1)).await;
    assert!(second.is_woken());
    let err = assert_ready!(second.poll()).unwrap_err();
    // The configured 3 s, spread over [3 s, 9 s).
    let after = overloaded(&err).retry_after().unwrap();
    assert!(
        after >= Duration::from_secs(3) && after < Duration::from_secs(9),
        "{after:?}"
    );
    assert_eq!(handle.waiting(), 0);
    assert_eq!(handle.shed(), 1);
    // The first request was never disturbed.
    assert_request_eq!(mock, "first").send_response("one");
    assert_eq!(assert_ready_ok!(first.poll()), "one");
    assert!(!mock_has_request(&mut mock));
}

#[tokio::test(start_paused = true)]
async fn waiter_beyond_max_queue_is_shed_at_once() {
    let layer = BackpressureLayer::new(1)
        .max_wait(Duration::from_secs(10))
        .max_queue(2);
    let handle = layer.handle();
    let (mut svc, _mock) = mock::spawn_layer::<u32, u32, _>(layer);

    let mut futs = Vec::new();
    for i in 0..3 {
        assert_ready_ok!(svc.poll_ready());
        let mut f = task::spawn(svc.call(i));
        assert_pending!(f.poll());
        futs.push(f);
    }
    assert_eq!(handle.in_flight(), 1);
    assert_eq!(handle.waiting(), 2);
    // The max_queue + 1-th waiter: shed on its first poll, no time passing.
    assert_ready_ok!(svc.poll_ready());
    let mut fourth = task::spawn(svc.call(3));
    let err = assert_ready!(fourth.poll()).unwrap_err();
    overloaded(&err);
    assert_eq!(handle.shed(), 1);
    assert_eq!(handle.waiting(), 2);
    drop(futs);
    assert_eq!(handle.waiting(), 0);
    assert_eq!(handle.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn default_is_shed_at_once_with_a_retry_hint() {
    let layer = BackpressureLayer::new(1);
    let handle = layer.handle();
    let (mut svc, _mock) = mock::spawn_layer::<u32, u32, _>(layer);
    assert_ready_ok!(svc.poll_ready());
    let mut held = task::spawn(svc.call(1));
    assert_pending!(held.poll());
    assert_ready_ok!(svc.poll_ready());
    let err = svc.call(2).await.unwrap_err();
    // The default 1 s, spread over [1 s, 3 s).
    let after = overloaded(&err).retry_after().unwrap();
    assert!(
        after >= Duration::from_secs(1) && after < Duration::from_secs(3),
        "{after:?}"
    );
    assert_eq!(handle.shed(), 1);
    assert_eq!(handle.waiting(), 0);
}

#[tokio::test(start_paused = true)]
async fn dropping_futures_releases_permits_and_places() {
    let layer = BackpressureLayer::new(1).max_wait(Duration::from_secs(1));
    let handle = layer.handle();
    let (mut svc, mut mock) = mock::spawn_layer::<u32, u32, _>(layer);

    // Dropped unpolled, holding a permit.
    assert_ready_ok!(svc.poll_ready());
    let f = svc.call(1);
    assert_eq!(handle.in_flight(), 1);
    drop(f);
    assert_eq!(handle.in_flight(), 0);

    // Dropped while running inside the inner service.
    assert_ready_ok!(svc.poll_ready());
    let mut running = task::spawn(svc.call(2));
    assert_pending!(running.poll());
    assert_ready_ok!(svc.poll_ready());
    let mut waiting = task::spawn(svc.call(3));
    assert_pending!(waiting.poll());
    drop(running);
    assert_eq!(handle.in_flight(), 0);
    // The waiter was woken by the drop and takes the permit.
    assert!(waiting.is_woken());
    assert_pending!(waiting.poll());
    assert_eq!(handle.in_flight(), 1);
    let _ = mock.next_request().await;
    let _ = mock.next_request().await;
    drop(waiting);
    assert_eq!(handle.in_flight(), 0);
    assert_eq!(handle.waiting(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_woken_waiter_dropped_passes_the_wake_up_on() {
    let layer = BackpressureLayer::new(1).max_wait(Duration::from_secs(1));
    let handle = layer.handle();
    let (mut svc, _mock) = mock::spawn_layer::<u32, u32, _>(layer);
    assert_ready_ok!(svc.poll_ready());
    let mut running = task::spawn(svc.call(0));
    assert_pending!(running.poll());
    let mut a = task::spawn({
        assert_ready_ok!(svc.poll_ready());
        svc.call(1)
    });
    let mut b = task::spawn({
        assert_ready_ok!(svc.poll_ready());
        svc.call(2)
    });
    assert_pending!(a.poll());
    assert_pending!(b.poll());
    drop(running);
    assert!(a.is_woken());
    // `a` goes away without taking the permit: `b` must not be left waiting.
    drop(a);
    assert!(b.is_woken());
    assert_pending!(b.poll());
    assert_eq!(handle.in_flight(), 1);
    assert_eq!(handle.waiting(), 0);
}

#[tokio::test(start_paused = true)]
async fn errors_release_and_pass_through() {
    let layer = BackpressureLayer::new(1);
    let handle = layer.handle();
    let (mut svc, mut mock) = mock::spawn_layer::<u32, u32, _>(layer);
    assert_ready_ok!(svc.poll_ready());
    let mut f = task::spawn(svc.call(1));
    assert_pending!(f.poll());
    let (_, send) = mock.next_request().await.unwrap();
    send.send_error("boom");
    let err = assert_ready!(f.poll()).unwrap_err();
    assert!(err.downcast_ref::<Rejection>().is_none());
    assert_eq!(err.to_string(), "boom");
    assert_eq!(handle.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn poll_ready_reserves_nothing_and_clones_start_unreserved() {
    let layer = BackpressureLayer::new(1);
    let handle = layer.handle();
    let (mut svc, _mock) = mock::spawn_layer::<u32, u32, _>(layer);
    // Many services made ready and never called hold nothing.
    let mut readied: Vec<_> = (0..10).map(|_| svc.get_ref().clone()).collect();
    for s in &mut readied {
        task::spawn(()).enter(|cx, _| assert!(s.poll_ready(cx).is_ready()));
    }
    assert_eq!(handle.in_flight(), 0);
    assert_eq!(handle.available(), 1);
    assert_ready_ok!(svc.poll_ready());
    let f = svc.call(1);
    assert_eq!(handle.in_flight(), 1);
    drop(readied);
    drop(svc);
    // The future outlives its service and still holds the permit.
    assert_eq!(handle.in_flight(), 1);
    drop(f);
    assert_eq!(handle.available(), 1);
}

#[tokio::test(start_paused = true)]
async fn raising_the_limit_wakes_every_waiter_it_makes_room_for() {
    let layer = BackpressureLayer::new(0).max_wait(Duration::from_secs(1));
    let handle = layer.handle();
    let (mut svc, _mock) = mock::spawn_layer::<u32, u32, _>(layer);
    let mut waiters: Vec<_> = (0..5)
        .map(|i| {
            assert_ready_ok!(svc.poll_ready());
            task::spawn(svc.call(i))
        })
        .collect();
    for w in &mut waiters {
        assert_pending!(w.poll());
    }
    assert_eq!(handle.waiting(), 5);
    assert_eq!(handle.set_limit(3), 3);
    let woken = waiters.iter().filter(|w| w.is_woken()).count();
    assert_eq!(woken, 3);
    for w in &mut waiters {
        assert_pending!(w.poll());
    }
    assert_eq!(handle.in_flight(), 3);
    assert_eq!(handle.waiting(), 2);
    // Lowering below the count in flight sheds nothing already running.
    handle.set_limit(1);
    assert_eq!(handle.in_flight(), 3);
    assert_eq!(handle.available(), 0);
    drop(waiters);
    assert_eq!(handle.in_flight(), 0);
    assert_eq!(handle.available(), 1);
}

#[derive(Clone)]
struct Counting {
    in_flight: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
}

impl Service<u32> for Counting {
    type Response = u32;
    type Error = Infallible;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<u32, Infallible>> + Send>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, n: u32) -> Self::Future {
        let (in_flight, peak) = (self.in_flight.clone(), self.peak.clone());
        Box::pin(async move {
            let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(now, Ordering::SeqCst);
            tokio::task::yield_now().await;
            in_flight.fetch_sub(1, Ordering::SeqCst);
            Ok(n)
        })
    }
}

#[test]
fn two_os_threads_never_exceed_the_limit() {
    const LIMIT: usize = 3;
    let inner = Counting {
        in_flight: Arc::new(AtomicUsize::new(0)),
        peak: Arc::new(AtomicUsize::new(0)),
    };
    let layer = BackpressureLayer::new(LIMIT)
        .max_wait(Duration::from_millis(5))
        .max_queue(4);
    let handle = layer.handle();
    let svc = layer.layer(inner.clone());
    let ok = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let svc = svc.clone();
            let ok = ok.clone();
            std::thread::spawn(move || {
                // Paused time: a wait ends when its deadline comes up in this runtime's
                // clock, which jumps forward whenever the runtime is idle. Nothing sleeps.
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .start_paused(true)
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    for _ in 0..2_000 {
                        let batch = (0..8).map(|i| svc.clone().oneshot(i));
                        for r in futures_util::future::join_all(batch).await {
                            match r {
                                Ok(_) => {
                                    ok.fetch_add(1, Ordering::Relaxed);
                                }
                                Err(e) => {
                                    overloaded(&e);
                                }
                            }
                        }
                    }
                })
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let peak = inner.peak.load(Ordering::SeqCst);
    assert!(peak <= LIMIT, "peak {peak} above the limit");
    assert!(peak >= 2, "the test did not load the layer: peak {peak}");
    let total = 2 * 2_000 * 8;
    assert_eq!(
        ok.load(Ordering::Relaxed) as u64 + handle.shed(),
        total as u64
    );
    assert!(handle.shed() > 0, "the test did not overload the layer");
    assert_eq!(handle.in_flight(), 0);
    assert_eq!(handle.waiting(), 0);
}

#[tokio::test(start_paused = true)]
async fn two_layers_on_one_budget_and_every_service_shares_it() {
    let a = BackpressureLayer::new(2);
    let b = BackpressureLayer::shared(&a.handle()).max_wait(Duration::from_millis(10));
    assert!(a.handle().same_budget(&b.handle()));
    let pending = || tower::service_fn(|_: u32| std::future::pending::<Result<u32, Infallible>>());
    let mut route1 = a.layer(pending());
    let route2 = a.clone().layer(pending());
    let mut route3 = b.layer(pending());
    let f1 = route1.ready().await.unwrap().call(1);
    let f2 = route2.clone().ready().await.unwrap().call(2);
    assert_eq!(a.handle().in_flight(), 2);
    let err = route1.ready().await.unwrap().call(3).await.unwrap_err();
    overloaded(&err);
    // The other layer waits its own max_wait on the same budget, then sheds.
    let mut w = task::spawn(route3.ready().await.unwrap().call(4));
    assert_pending!(w.poll());
    assert_eq!(b.handle().waiting(), 1);
    tokio::time::advance(Duration::from_millis(10)).await;
    overloaded(&assert_ready!(w.poll()).unwrap_err());
    assert_eq!(a.handle().shed(), 2);
    drop((f1, f2));
    assert_eq!(b.handle().available(), 2);
}

#[cfg(feature = "grpc")]
#[tokio::test(start_paused = true)]
async fn grpc_status_through_rejection_layer() {
    use tower_bulwark::RejectionLayer;
    let svc = tower::ServiceBuilder::new()
        .layer(RejectionLayer::grpc())
        .layer(BackpressureLayer::new(0))
        .service_fn(|_: http::Request<()>| async {
            Ok::<_, Infallible>(http::Response::new(
                http_body_util::Empty::<bytes::Bytes>::new(),
            ))
        });
    let res = svc.oneshot(http::Request::new(())).await.unwrap();
    assert_eq!(res.headers()["grpc-status"], "14");
    // The default 1 s hint, spread over [1 s, 3 s).
    let pushback: u64 = res.headers()["grpc-retry-pushback-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1000..=3000).contains(&pushback), "{pushback} ms");
}

#[tokio::test(start_paused = true)]
async fn shedding_is_logged_at_most_once_a_second() {
    let (out, _guard) = tracing_on::capture(tracing::Level::INFO);
    let events = || {
        out.text()
            .lines()
            .filter(|l| l.contains("shedding requests"))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };

    // No clock to set: the event's once-a-second limit follows tokio's (paused) time.
    let layer = BackpressureLayer::new(0);
    let mut svc = layer.layer(tower::service_fn(|_: u32| async { Ok::<_, Infallible>(0) }));
    for i in 0..1_000 {
        assert!(svc.ready().await.unwrap().call(i).await.is_err());
    }
    let logged = events();
    assert_eq!(logged.len(), 1, "{logged:?}");
    assert!(
        logged[0].contains("WARN") && logged[0].contains("shed=1"),
        "{}",
        logged[0]
    );

    tokio::time::advance(Duration::from_millis(999)).await;
    assert!(svc.ready().await.unwrap().call(0).await.is_err());
    assert_eq!(events().len(), 1);
    tokio::time::advance(Duration::from_millis(1)).await;
    assert!(svc.ready().await.unwrap().call(0).await.is_err());
    let logged = events();
    assert_eq!(logged.len(), 2, "{logged:?}");
    // The second event counts every request shed since the first.
    assert!(logged[1].contains("shed=1001"), "{}", logged[1]);
    assert!(logged[1].contains("shed_total=1002"), "{}", logged[1]);
    assert_eq!(layer.handle().shed(), 1002);
}

#[test]
fn outside_a_runtime_a_would_be_waiter_is_shed_not_panicked_on() {
    let layer = BackpressureLayer::new(1).max_wait(Duration::from_secs(1));
    let handle = layer.handle();
    let mut svc = layer.layer(tower::service_fn(
        |n: u32| async move { Ok::<_, Infallible>(n) },
    ));
    let mut held = task::spawn(svc.call(1));
    assert_eq!(assert_ready_ok!(held.poll()), 1);
    let running = svc.call(2);
    let mut refused = task::spawn(svc.call(3));
    overloaded(&assert_ready!(refused.poll()).unwrap_err());
    assert_eq!(handle.shed(), 1);
    drop(running);
    assert_eq!(handle.in_flight(), 0);
}

/// A shed does not wait on the inner service's readiness (tower's `LoadShed` pattern): with
/// the service below not ready, `poll_ready` is ready at once, a request that finds the budget
/// spent is shed at once, and an admitted one holds its permit while it waits for the inner
/// readiness in its future.
#[tokio::test(start_paused = true)]
async fn a_shed_does_not_wait_on_the_inner_readiness() {
    let layer = BackpressureLayer::new(1);
    let handle = layer.handle();
    let (mut svc, mut mock) = mock::spawn_layer::<u32, u32, _>(layer);
    mock.allow(0);

    assert_ready_ok!(svc.poll_ready(), "not held back by the inner readiness");
    let mut admitted = task::spawn(svc.call(1));
    assert_pending!(admitted.poll());
    assert_eq!(handle.in_flight(), 1);
    assert_ready_ok!(svc.poll_ready());
    let err = assert_ready!(task::spawn(svc.call(2)).poll()).unwrap_err();
    overloaded(&err);
    assert_eq!(handle.shed(), 1);

    // The admitted request goes on once the inner service is ready.
    mock.allow(1);
    assert_pending!(admitted.poll());
    assert_request_eq!(mock, 1).send_response(10);
    assert_eq!(assert_ready_ok!(admitted.poll()), 10);
    assert_eq!(handle.in_flight(), 0);

    // One dropped while it waits for the inner readiness gives its permit back.
    assert_ready_ok!(svc.poll_ready());
    let mut readying = task::spawn(svc.call(3));
    assert_pending!(readying.poll());
    assert_eq!(handle.in_flight(), 1);
    drop(readying);
    assert_eq!(handle.in_flight(), 0);
}

/// A waiter admitted while the service below is not ready waits for its readiness with the
/// permit, and is called once it is ready.
#[tokio::test(start_paused = true)]
async fn a_waiter_admitted_waits_for_the_inner_readiness() {
    let layer = BackpressureLayer::new(1).max_wait(Duration::from_secs(1));
    let handle = layer.handle();
    let (mut svc, mut mock) = mock::spawn_layer::<u32, u32, _>(layer);
    mock.allow(1);

    assert_ready_ok!(svc.poll_ready());
    let mut first = task::spawn(svc.call(1));
    assert_pending!(first.poll());
    // The inner is not ready any more (its one allowance went to the first request).
    assert_ready_ok!(svc.poll_ready(), "not held back by the inner readiness");
    let mut second = task::spawn(svc.call(2));
    assert_pending!(second.poll());
    assert_eq!(handle.waiting(), 1);
    assert_request_eq!(mock, 1).send_response(10);
    assert_eq!(assert_ready_ok!(first.poll()), 10);
    assert!(second.is_woken());
    assert_pending!(second.poll());
    assert_eq!((handle.in_flight(), handle.waiting()), (1, 0));
    mock.allow(1);
    assert_pending!(second.poll());
    assert_request_eq!(mock, 2).send_response(20);
    assert_eq!(assert_ready_ok!(second.poll()), 20);
    assert_eq!(handle.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn shed_hints_are_spread_over_one_to_three_times_the_base() {
    for (base, waits) in [
        (Duration::from_secs(1), false),
        (Duration::from_millis(250), true),
    ] {
        let mut layer = BackpressureLayer::new(0).retry_after(base);
        if waits {
            layer = layer.max_wait(Duration::from_millis(1));
        }
        let (mut svc, _mock) = mock::spawn_layer::<u32, u32, _>(layer);
        let mut hints = std::collections::BTreeSet::new();
        for i in 0..200 {
            assert_ready_ok!(svc.poll_ready());
            let err = svc.call(i).await.unwrap_err();
            let after = overloaded(&err).retry_after().unwrap();
            assert!(after >= base && after < base * 3, "{after:?} for {base:?}");
            hints.insert(after);
        }
        // Spread: (almost) no two alike, and over most of the range.
        assert!(hints.len() >= 190, "{} distinct of 200", hints.len());
        let (lo, hi) = (*hints.first().unwrap(), *hints.last().unwrap());
        assert!(lo < base * 5 / 4 && hi > base * 11 / 4, "{lo:?}..{hi:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_queue_without_max_wait_waits_at_most_100_ms() {
    let layer = BackpressureLayer::new(1).max_queue(1);
    let handle = layer.handle();
    let (mut svc, mut mock) = mock::spawn_layer::<u32, u32, _>(layer);
    mock.allow(1);
    assert_ready_ok!(svc.poll_ready());
    let mut held = task::spawn(svc.call(1));
    assert_pending!(held.poll());
    // The second waits, the third finds the queue of one full and is shed at once.
    assert_ready_ok!(svc.poll_ready());
    let mut second = task::spawn(svc.call(2));
    assert_pending!(second.poll());
    assert_eq!(handle.waiting(), 1);
    assert_ready_ok!(svc.poll_ready());
    svc.call(3).await.unwrap_err();
    assert_eq!(handle.shed(), 1);
    // Shed after 100 ms of waiting.
    tokio::time::advance(Duration::from_millis(100) - Duration::from_nanos(1)).await;
    assert_pending!(second.poll());
    tokio::time::advance(Duration::from_nanos(1)).await;
    overloaded(&assert_ready!(second.poll()).unwrap_err());
    assert_eq!((handle.waiting(), handle.shed()), (0, 2));
    // A zero max_wait given as well is the default: the queue still waits.
    let layer = BackpressureLayer::new(0)
        .max_wait(Duration::ZERO)
        .max_queue(4);
    let handle = layer.handle();
    let (mut svc, _mock) = mock::spawn_layer::<u32, u32, _>(layer);
    assert_ready_ok!(svc.poll_ready());
    let mut waiting = task::spawn(svc.call(1));
    assert_pending!(waiting.poll());
    assert_eq!(handle.waiting(), 1);
    // max_queue(0) sheds at once.
    let layer = BackpressureLayer::new(0).max_queue(0);
    let handle = layer.handle();
    let (mut svc, _mock) = mock::spawn_layer::<u32, u32, _>(layer);
    assert_ready_ok!(svc.poll_ready());
    svc.call(1).await.unwrap_err();
    assert_eq!((handle.waiting(), handle.shed()), (0, 1));
    drop(held);
}

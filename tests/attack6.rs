//! Sixth hostile review: "Whose refusal" (the stamp of a request's window), cancellation,
//! the rate limiter under threads and a moving clock. Tests marked
//! `#[ignore = "defect: ..."]` fail on the current code because of the defect they name; the
//! others guard a promise that held.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tower::{BoxError, Layer, Service, ServiceBuilder, ServiceExt};
#[path = "support/wire.rs"]
mod wire;
use wire::{fixed, hop, kind, ok, post, readme_client, store, BoxFut, Res};

use tower_bulwark::clock::Clock;
use tower_bulwark::rejection::REQUEST_REFUSED;
use tower_bulwark::retry::{RetryLayer, RetryPolicy, IDEMPOTENCY_KEY};
use tower_bulwark::{
    BackpressureLayer, BreakerConfig, CircuitBreakerLayer, IdempotencyLayer, RejectionLayer,
};

fn keyed() -> Request<Full<Bytes>> {
    let mut r = post();
    r.headers_mut()
        .insert(IDEMPOTENCY_KEY, "\"order-1\"".parse().unwrap());
    r
}

// ---------------------------------------------------------------------------------------
// 1. Whose refusal
// ---------------------------------------------------------------------------------------

/// An order handler written as a tower service, the ordinary way: `call(&mut self)` has the
/// handler's own client (`self.receipts`) at hand, so it makes the receipt call there (no
/// clone of the client into the future) and awaits it after it has charged the card.
/// The receipt client's circuit breaker (a layer of this crate) is open.
#[derive(Clone)]
struct ChargeThenReceipt<C> {
    charged: Arc<AtomicU32>,
    receipts: C,
}

impl<C> Service<Request<Full<Bytes>>> for ChargeThenReceipt<C>
where
    C: Service<(), Response = (), Error = BoxError>,
    C::Future: Send + 'static,
{
    type Response = Res;
    type Error = BoxError;
    type Future = BoxFut<Res>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.receipts.poll_ready(cx)
    }

    fn call(&mut self, _req: Request<Full<Bytes>>) -> Self::Future {
        // The receipt call is made now (its future awaited later): the receipt client's
        // breaker decides in its `call`, synchronously, here.
        let receipt = self.receipts.call(());
        let charged = self.charged.clone();
        Box::pin(async move {
            // The effect: the card is charged.
            charged.fetch_add(1, Ordering::SeqCst);
            // Then the receipt, refused by the handler's own client: forwarded with `?`.
            receipt.await?;
            Ok(ok())
        })
    }
}

/// Promise (idempotency "Whose refusal", respond.rs): "A rejection the handler returns (made
/// by its own client's layers ...) carries no stamp of this request, and is treated as the
/// handler's error"; a request with an `Idempotency-Key` never runs its handler twice; the
/// `Request-Refused` mark only when a layer of this crate made the rejection for *this*
/// request.
///
/// What happens: the stamp is a thread-local set for the whole of the inner `call`, so any
/// rejection a handler's own client makes *synchronously in the handler's `call`* (a client
/// breaker, rate limit or backpressure all decide in `call`) is stamped as a refusal of the
/// server's request. The handler charges, forwards its receipt client's `CircuitOpen`, the
/// server's idempotency layer releases the key, `RejectionLayer` marks the 503
/// `Request-Refused: circuit-open`, and the README's client retries the POST: the card is
/// charged three times.
#[tokio::test(start_paused = true)]
async fn handler_client_call_made_in_call_is_taken_for_a_refusal_of_the_request() {
    let charged = Arc::new(AtomicU32::new(0));
    let breaker = CircuitBreakerLayer::new(
        BreakerConfig::consecutive_failures(1)
            .open_time(Duration::from_secs(2))
            .clock(Clock::tokio()),
    )
    .unwrap();
    breaker.handle().force_open();
    let receipts = breaker.layer(tower::service_fn(|_: ()| async { Ok::<_, BoxError>(()) }));
    let server = ServiceBuilder::new()
        .layer(RejectionLayer::http())
        .layer(IdempotencyLayer::new(store()))
        .service(ChargeThenReceipt {
            charged: charged.clone(),
            receipts,
        });
    let res = server.clone().oneshot(keyed()).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    let marked = res.headers().get(REQUEST_REFUSED).cloned();
    let _ = readme_client(server).oneshot(post()).await;
    assert_eq!(
        (charged.load(Ordering::SeqCst), marked),
        (2, None),
        "the handler's own client's refusal was taken for the server's: (charges, mark)"
    );
}

/// A handler that charges, then notifies a ledger through its own client, which bounds its
/// calls in flight with a `BackpressureLayer` of this crate (one permit, held by another
/// request; queue wait 60 s). Like any `call(&mut self)` service it makes the ledger call in
/// its `call` and awaits it after the charge. A `timeout` (1 s) sits between the server's
/// idempotency layer and the handler, as the docs' table allows.
///
/// Promise (idempotency table): "any other error from below: tower's `Elapsed` from a
/// `timeout` under this layer once the request may have run ...: the key is recorded as run
/// ... never a second run"; only "a timeout ... that fires while a layer of this crate still
/// holds *the request*" releases the key.
///
/// What happens: the handler's own ledger call, queued in its client's backpressure, carries
/// the server request's stamp (made in the window of the inner `call`); when the timeout drops
/// it, the queue reports "the request was dropped while held", the key is released, and the
/// client's repeat charges the card again.
#[tokio::test(start_paused = true)]
async fn timeout_while_the_handlers_own_client_queues_releases_a_key_that_ran() {
    let charged = Arc::new(AtomicU32::new(0));
    let ledger_bp = BackpressureLayer::new(1).max_wait(Duration::from_secs(60));
    let ledger = ledger_bp.layer(tower::service_fn(|slow: bool| async move {
        if slow {
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
        Ok::<_, BoxError>(())
    }));
    // Another request holds the ledger's one permit for 30 s.
    let busy = tokio::spawn(ledger.clone().oneshot(true));
    tokio::task::yield_now().await;

    #[derive(Clone)]
    struct ChargeThenLedger<L> {
        charged: Arc<AtomicU32>,
        ledger: L,
    }
    impl<L> Service<Request<Full<Bytes>>> for ChargeThenLedger<L>
    where
        L: Service<bool, Response = (), Error = BoxError>,
        L::Future: Send + 'static,
    {
        type Response = Res;
        type Error = BoxError;
        type Future = BoxFut<Res>;
        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            self.ledger.poll_ready(cx)
        }
        fn call(&mut self, _req: Request<Full<Bytes>>) -> Self::Future {
            let entry = self.ledger.call(false);
            let charged = self.charged.clone();
            Box::pin(async move {
                charged.fetch_add(1, Ordering::SeqCst);
                entry.await?;
                Ok(ok())
            })
        }
    }
    let svc = ServiceBuilder::new()
        .layer(IdempotencyLayer::new(store()))
        .timeout(Duration::from_secs(1))
        .service(ChargeThenLedger {
            charged: charged.clone(),
            ledger,
        });
    let err = svc.clone().oneshot(keyed()).await.unwrap_err();
    assert!(err.is::<tower::timeout::error::Elapsed>(), "{err}");
    assert_eq!(charged.load(Ordering::SeqCst), 1);
    let again = svc.clone().oneshot(keyed()).await;
    assert_eq!(
        charged.load(Ordering::SeqCst),
        1,
        "the card was charged again: the repeat got {:?}",
        again.map(|r| r.status()).map_err(|e| kind(&e))
    );
    busy.abort();
}

/// A hedge between the idempotency layer and a queue (as tower's `hedge` does: a second
/// attempt to another replica when the first is slow). The first attempt queues in this
/// crate's `BackpressureLayer`; the hedge, 100 ms later, reaches the handler on another
/// replica, which charges and is still working when the per-request `timeout` (1 s, between
/// the idempotency layer and the hedge) fires.
///
/// Promise (Whose refusal): an error releases the key only in "a poll in which [a holder
/// dropped the request while it held it], and in which no holder passed any request on. (The
/// second condition guards against a retry between the two ...)".
///
/// What happens: the guard only looks at the poll in which the timeout fires. The hedge
/// passed its attempt on (and ran the handler) in an earlier poll; in the timeout's poll only
/// the queued first attempt is dropped, so the key of a request that charged is released, and
/// the repeat charges again.
#[tokio::test(start_paused = true)]
async fn a_hedge_that_ran_the_handler_earlier_does_not_stop_the_release() {
    #[derive(Clone)]
    struct Hedge<P, S> {
        primary: P,
        secondary: S,
    }
    impl<P, S> Service<Request<Full<Bytes>>> for Hedge<P, S>
    where
        P: Service<Request<Full<Bytes>>, Response = Res, Error = BoxError>,
        P::Future: Send + 'static,
        S: Service<Request<Full<Bytes>>, Response = Res, Error = BoxError> + Clone + Send + 'static,
        S::Future: Send,
    {
        type Response = Res;
        type Error = BoxError;
        type Future = BoxFut<Res>;
        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            self.primary.poll_ready(cx)
        }
        fn call(&mut self, req: Request<Full<Bytes>>) -> Self::Future {
            let (parts, body) = req.into_parts();
            let copy = Request::from_parts(parts.clone(), body.clone());
            let first = self.primary.call(Request::from_parts(parts, body));
            let secondary = self.secondary.clone();
            Box::pin(async move {
                let hedge = async move {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    secondary.oneshot(copy).await
                };
                tokio::select! {
                    r = first => r,
                    r = hedge => r,
                }
            })
        }
    }
    let charged = Arc::new(AtomicU32::new(0));
    let c = charged.clone();
    let handler = tower::service_fn(move |req: Request<Full<Bytes>>| {
        let c = c.clone();
        async move {
            if req.headers().get(IDEMPOTENCY_KEY).is_some() {
                c.fetch_add(1, Ordering::SeqCst);
            }
            tokio::time::sleep(Duration::from_secs(30)).await;
            Ok::<_, BoxError>(ok())
        }
    });
    let bp = BackpressureLayer::new(1).max_wait(Duration::from_secs(60));
    let primary = bp.layer(handler.clone());
    // Another request holds the primary's one permit.
    let mut other = post();
    other.headers_mut().remove(IDEMPOTENCY_KEY);
    let busy = tokio::spawn(primary.clone().oneshot(other));
    tokio::task::yield_now().await;
    let svc = ServiceBuilder::new()
        .layer(IdempotencyLayer::new(store()))
        .timeout(Duration::from_secs(1))
        .service(Hedge {
            primary,
            secondary: handler,
        });
    let err = svc.clone().oneshot(keyed()).await.unwrap_err();
    assert!(err.is::<tower::timeout::error::Elapsed>(), "{err}");
    assert_eq!(charged.load(Ordering::SeqCst), 1);
    let again = tokio::time::timeout(Duration::from_secs(5), svc.clone().oneshot(keyed())).await;
    assert_eq!(
        charged.load(Ordering::SeqCst),
        1,
        "the card was charged again: the repeat got {:?}",
        again.map(|r| r.map(|r| r.status()).map_err(|e| kind(&e)))
    );
    busy.abort();
}

/// A request dropped (the client gone, a `timeout` above the idempotency layer) while it is
/// still queued for a permit in the `BackpressureLayer` below: the handler never saw it.
///
/// Promise (the brief's, and the table's spirit): a key that never ran is not locked; the
/// table keeps the lease only for "the first request's future is dropped ... while its handler
/// runs", and its release on a `timeout` below releases a request still held.
///
/// What happens: only a timeout *below* the layer is told apart; a drop from above of a
/// request still queued keeps the lease until it expires (60 s): the client's retries get 409
/// for a minute, for a request that never ran.
#[tokio::test(start_paused = true)]
async fn dropped_from_above_while_queued_below_keeps_the_key_in_flight() {
    let runs = Arc::new(AtomicU32::new(0));
    let r = runs.clone();
    let handler = tower::service_fn(move |req: Request<Full<Bytes>>| {
        let r = r.clone();
        async move {
            if req.headers().get(IDEMPOTENCY_KEY).is_none() {
                tokio::time::sleep(Duration::from_secs(2)).await;
            } else {
                r.fetch_add(1, Ordering::SeqCst);
            }
            Ok::<_, BoxError>(ok())
        }
    });
    let svc = ServiceBuilder::new()
        .layer(IdempotencyLayer::new(store()))
        .layer(BackpressureLayer::new(1).max_wait(Duration::from_secs(10)))
        .service(handler);
    let mut other = post();
    other.headers_mut().remove(IDEMPOTENCY_KEY);
    let busy = tokio::spawn(svc.clone().oneshot(other));
    tokio::task::yield_now().await;
    // A timeout above the layer (a client's deadline) cuts the queued request off.
    let cut = tokio::time::timeout(Duration::from_millis(500), svc.clone().oneshot(keyed())).await;
    assert!(cut.is_err());
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    busy.await.unwrap().unwrap();
    // The retry, 1.5 s later, with the permit free.
    let again = svc.clone().oneshot(keyed()).await;
    assert_eq!(
        again.map(|r| r.status()).map_err(|e| kind(&e)),
        Ok(StatusCode::OK),
        "the retry of a request that never ran was refused"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

// ---------------------------------------------------------------------------------------
// 2. Cancellation
// ---------------------------------------------------------------------------------------

/// A backpressure waiter handed the permit (the holder finished) and dropped before it was
/// polled again: the permit goes to the next waiter, and nothing stays in flight.
#[tokio::test(start_paused = true)]
async fn a_waiter_dropped_after_it_was_handed_the_permit_passes_it_on() {
    let layer = BackpressureLayer::new(1).max_wait(Duration::from_secs(10));
    let handle = layer.handle();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let rx = Arc::new(tokio::sync::Mutex::new(Some(rx)));
    let svc = layer.layer(tower::service_fn(move |hold: bool| {
        let rx = rx.clone();
        async move {
            if hold {
                let rx = rx.lock().await.take().unwrap();
                let _ = rx.await;
            }
            Ok::<_, BoxError>(())
        }
    }));
    let mut a = tokio_test::task::spawn(svc.clone().oneshot(true));
    assert!(a.poll().is_pending());
    let mut b = tokio_test::task::spawn(svc.clone().oneshot(false));
    assert!(b.poll().is_pending());
    let mut c = tokio_test::task::spawn(svc.clone().oneshot(false));
    assert!(c.poll().is_pending());
    assert_eq!(handle.waiting(), 2);
    tx.send(()).unwrap();
    assert!(a.poll().is_ready());
    // The permit is B's now; B goes away without another poll.
    drop(b);
    let out = tokio::time::timeout(Duration::from_secs(1), c).await;
    assert!(matches!(out, Ok(Ok(()))), "C never got the permit");
    assert_eq!(
        (handle.in_flight(), handle.waiting(), handle.available()),
        (0, 0, 1)
    );
}

/// Many backpressure waiters dropped at every point (queued, woken, mid-handler): every permit
/// comes back.
#[tokio::test(start_paused = true)]
async fn backpressure_waiters_dropped_anywhere_give_every_permit_back() {
    let layer = BackpressureLayer::new(3).max_wait(Duration::from_secs(5));
    let handle = layer.handle();
    let svc = layer.layer(tower::service_fn(|ms: u64| async move {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok::<_, BoxError>(())
    }));
    let mut tasks = Vec::new();
    for i in 0..40u64 {
        tasks.push(tokio::spawn(svc.clone().oneshot(10 + (i * 7) % 50)));
    }
    for (i, t) in tasks.iter().enumerate() {
        if i % 3 == 0 {
            t.abort();
        }
        if i % 5 == 0 {
            tokio::time::advance(Duration::from_millis(3)).await;
        }
    }
    for t in tasks {
        let _ = t.await;
    }
    assert_eq!(
        (handle.in_flight(), handle.waiting(), handle.available()),
        (0, 0, 3)
    );
}

fn limited(
    max_wait: Duration,
) -> (
    impl Service<(), Response = (), Error = BoxError, Future: Send> + Clone + Send + 'static,
    tower_bulwark::rate_limit::RateLimitHandle,
) {
    let layer = tower_bulwark::RateLimitLayer::new(
        tower_bulwark::rate_limit::RateLimitConfig::new(
            tower_bulwark::Quota::per_second(1).unwrap(),
        )
        .clock(Clock::tokio()),
    )
    .wait_up_to(max_wait);
    let handle = layer.handle();
    (
        layer.layer(tower::service_fn(|()| async { Ok::<_, BoxError>(()) })),
        handle,
    )
}

/// The last waiter for a turn dropped before its turn: the turn is given back, so a request
/// at that time is admitted at once.
#[tokio::test(start_paused = true)]
async fn a_dropped_waiter_gives_its_turn_back() {
    let (svc, _h) = limited(Duration::from_secs(10));
    svc.clone().oneshot(()).await.unwrap();
    let b = tokio::spawn(svc.clone().oneshot(()));
    tokio::time::advance(Duration::from_millis(500)).await;
    b.abort();
    let _ = b.await;
    tokio::time::advance(Duration::from_millis(500)).await;
    let c = tokio::time::timeout(Duration::from_millis(1), svc.clone().oneshot(())).await;
    assert!(
        matches!(c, Ok(Ok(()))),
        "the dropped waiter's turn was not given back"
    );
}

/// A breaker's half-open probe whose response future is dropped, unpolled or mid-call: the
/// probe slot is freed at once, and the next caller probes.
#[tokio::test(start_paused = true)]
async fn a_dropped_probe_frees_its_slot() {
    let layer = CircuitBreakerLayer::new(
        BreakerConfig::consecutive_failures(1)
            .open_time(Duration::from_secs(1))
            .half_open_probes(1)
            .clock(Clock::tokio()),
    )
    .unwrap();
    let handle = layer.handle();
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let mut svc = layer.layer(tower::service_fn(move |fail: bool| {
        let c = c.clone();
        async move {
            c.fetch_add(1, Ordering::SeqCst);
            if fail {
                return Err::<(), BoxError>("down".into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            Ok(())
        }
    }));
    let _ = svc.ready().await.unwrap().call(true).await;
    tokio::time::advance(Duration::from_secs(2)).await;
    // Unpolled.
    let fut = svc.ready().await.unwrap().call(false);
    drop(fut);
    assert_eq!(
        handle.figures().probes_in_flight,
        0,
        "unpolled probe kept its slot"
    );
    // Mid-call.
    let mut fut = tokio_test::task::spawn(svc.ready().await.unwrap().call(false));
    assert!(fut.poll().is_pending());
    drop(fut);
    assert_eq!(
        handle.figures().probes_in_flight,
        0,
        "dropped probe kept its slot"
    );
    let r = tokio::time::timeout(Duration::from_secs(1), async {
        svc.ready().await?.call(false).await
    })
    .await;
    assert!(matches!(r, Ok(Ok(()))), "the next probe was refused: {r:?}");
}

// ---------------------------------------------------------------------------------------
// 3. The rate limiter under real threads and a moving clock
// ---------------------------------------------------------------------------------------

/// Runs `threads` threads against one limit (`check(key)` admits or not) while this thread
/// moves a manual clock forward by `step_ns` `steps` times, stepping back by up to
/// `wobble_ns` (the cross-core slack the docs allow for) now and then. Returns the admits of
/// the hot key and the span of time it ran over.
fn hammer<F>(
    threads: usize,
    steps: u64,
    step_ns: u64,
    wobble_ns: u64,
    hand: tower_bulwark::clock::ManualClock,
    check: F,
) -> (u64, u64)
where
    F: Fn(u64) -> bool + Send + Sync + 'static,
{
    use std::sync::atomic::{AtomicBool, AtomicU64};
    let check = Arc::new(check);
    let stop = Arc::new(AtomicBool::new(false));
    let admitted = Arc::new(AtomicU64::new(0));
    let start = hand.now_nanos();
    let mut joins = Vec::new();
    for t in 0..threads {
        let (check, stop, admitted) = (check.clone(), stop.clone(), admitted.clone());
        joins.push(std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                // Every fourth check is another key (churn in a keyed table), among 10,000: the
                // table (65,536 keys) never fills, however fast the threads run against the
                // clock, so no live key may be evicted.
                let key = if n.is_multiple_of(4) {
                    1 + (n * threads as u64 + t as u64) % 10_000
                } else {
                    0
                };
                // `check` says whether the call counts against the limit under test and was
                // admitted.
                if check(key) {
                    admitted.fetch_add(1, Ordering::Relaxed);
                }
                if n.is_multiple_of(64) {
                    std::thread::yield_now();
                }
            }
        }));
    }
    let mut top = start;
    for i in 0..steps {
        top += step_ns;
        if wobble_ns > 0 && i % 7 == 3 {
            hand.set_nanos(top - wobble_ns.min(step_ns));
            std::thread::yield_now();
        }
        hand.set_nanos(top);
        for _ in 0..20 {
            std::thread::yield_now();
        }
    }
    stop.store(true, Ordering::Relaxed);
    for j in joins {
        j.join().unwrap();
    }
    (admitted.load(Ordering::Relaxed), top - start)
}

/// Promise (rate_limit docs): "This admits, over any span, less than one request more than
/// the quota, and exactly the burst at one instant"; the Unreleased "Fixed" entry: a thread
/// with a stale clock read no longer finds the limit whole. Three threads on two cores, a
/// clock that moves (and wobbles back by 2 µs, within the slack the docs allow for).
#[test]
fn global_limit_under_threads_and_a_moving_clock_stays_within_the_quota() {
    use futures_util::FutureExt;
    for round in 0..3 {
        let (clock, hand) = Clock::manual();
        hand.set_nanos(1_000_000_000);
        let layer = tower_bulwark::RateLimitLayer::new(
            tower_bulwark::rate_limit::RateLimitConfig::new(
                tower_bulwark::Quota::per_second(1000)
                    .unwrap()
                    .burst(20)
                    .unwrap(),
            )
            .clock(clock),
        );
        let svc = layer.layer(tower::service_fn(|()| async { Ok::<_, BoxError>(()) }));
        let svc = std::sync::Mutex::new(svc);
        // One limit for every call, whatever its key: each admission counts.
        let check = move |_key: u64| {
            let mut s = svc.lock().unwrap().clone();
            let fut = s.call(());
            matches!(fut.now_or_never(), Some(Ok(())))
        };
        // 1 ms an interval; 400 steps of 50 µs: 20 ms.
        let (admitted, span) = hammer(3, 400, 50_000, 2_000, hand, check);
        let quota = 20 + span / 1_000_000;
        assert!(
            admitted >= 20,
            "round {round}: the test admitted only {admitted}"
        );
        assert!(
            admitted <= quota + 1,
            "round {round}: {admitted} admitted over {span} ns where the quota allows {quota}"
        );
    }
}

/// The same for a keyed limit, one hot key among churning others.
#[test]
fn keyed_limit_under_threads_and_a_moving_clock_stays_within_the_quota() {
    use futures_util::FutureExt;
    for round in 0..3 {
        let (clock, hand) = Clock::manual();
        hand.set_nanos(1_000_000_000);
        let layer = tower_bulwark::RateLimitLayer::keyed(
            tower_bulwark::rate_limit::RateLimitConfig::new(
                tower_bulwark::Quota::per_second(1000)
                    .unwrap()
                    .burst(20)
                    .unwrap(),
            )
            .clock(clock)
            .max_keys(1 << 16),
            |k: &u64| *k,
        );
        let handle = layer.handle();
        let svc = layer.layer(tower::service_fn(|_: u64| async { Ok::<_, BoxError>(()) }));
        // Only key 0's admissions count: the other keys have limits of their own.
        let check = move |key: u64| {
            let mut s = svc.clone();
            matches!(s.call(key).now_or_never(), Some(Ok(()))) && key == 0
        };
        let (admitted, span) = hammer(3, 400, 50_000, 2_000, hand, check);
        let quota = 20 + span / 1_000_000;
        assert_eq!(handle.evictions(), 0);
        assert!(
            admitted >= 20,
            "round {round}: the test admitted only {admitted}"
        );
        assert!(
            admitted <= quota + 1,
            "round {round}: {admitted} admitted over {span} ns where the quota allows {quota}"
        );
    }
}

/// The gRPC twin of attack5's fixed HTTP defect. A tonic handler charges, then calls a
/// downstream that is unavailable and forwards its status with `?` (the ordinary tonic code:
/// `let r = ledger.record(req).await?;`): its answer is a trailers-only `UNAVAILABLE`. The
/// server is the README's (`RejectionLayer::grpc()` + `IdempotencyLayer`); the client
/// `RetryPolicy::grpc().add_idempotency_key()`.
///
/// Promise (idempotency docs): a request with an `Idempotency-Key` never runs its handler
/// twice; the retry docs: a key alone is not enough after an answer "that may be the
/// handler's, after its effect". What happens: the idempotency layer releases the key of a
/// gRPC failure status, and the retry layer re-sends every `UNAVAILABLE`, which it takes for
/// "not processed" though it cannot tell the server's refusal (which `RejectionLayer::grpc`
/// does not mark) from the handler's own forwarded status: the card is charged three times.
///
/// Design, not a defect: a failure status is taken at its word ("5xx and errors are not
/// stored by default, so the client can retry"; the idempotency docs' table). A handler that
/// forwards a failure after its own effect stores it with `store_failures(true)`, and then
/// runs once: that is what this test holds.
#[tokio::test(start_paused = true)]
async fn grpc_handler_forwarding_unavailable_runs_once_with_store_failures() {
    let charged = Arc::new(AtomicU32::new(0));
    let c = charged.clone();
    let handler = tower::service_fn(move |_req: Request<Full<Bytes>>| {
        let c = c.clone();
        async move {
            c.fetch_add(1, Ordering::SeqCst);
            // `Err(Status::unavailable(..))` from the ledger client, answered by tonic as a
            // trailers-only response.
            let res = Response::builder()
                .status(200)
                .header("content-type", "application/grpc")
                .header("grpc-status", "14")
                .header("grpc-message", "ledger unavailable")
                .body(Full::new(Bytes::new()))
                .unwrap();
            Ok::<_, BoxError>(res)
        }
    });
    let server = ServiceBuilder::new()
        .layer(RejectionLayer::grpc())
        .layer(
            IdempotencyLayer::builder(store())
                .store_failures(true)
                .build()
                .unwrap(),
        )
        .service(handler);
    let client = RetryLayer::new(
        RetryPolicy::grpc()
            .add_idempotency_key()
            .max_attempts(3)
            .clock(Clock::tokio())
            .backoff(fixed(10)),
    )
    .unwrap()
    .layer(hop(server));
    let mut req = post();
    *req.uri_mut() = "http://svc/shop.Payments/Charge".parse().unwrap();
    req.headers_mut()
        .insert("content-type", "application/grpc".parse().unwrap());
    let res = client.oneshot(req).await.unwrap();
    assert_eq!(res.headers()["grpc-status"], "14");
    assert_eq!(
        charged.load(Ordering::SeqCst),
        1,
        "the card was charged more than once"
    );
}

/// A gateway handler records an order, then forwards its payment provider's answer, a 429
/// with `Retry-After: 1` (the provider's rate limit; an Axum handler returning the upstream's
/// status), as proxying handlers do.
///
/// Promise: a request with an `Idempotency-Key` never runs its handler twice; the retry docs
/// guard against "an answer [that] may be the handler's, after its effect" (which the 503 fix
/// of attack5 and the unmarked-503 rule implement). What happens: a 429 from the handler is a
/// "refusal of the caller" to the idempotency layer (key released) and "did not run" to the
/// retry layer (always re-sent), whoever made it: the README's client re-sends the POST and
/// the order is recorded three times. The 503 case was closed by stripping the mark; the 429
/// (and 421, 425) case has no mark to strip.
///
/// Design, not a defect: a 429 says "not processed", and the layer takes it at its word (the
/// idempotency docs' table); a handler that forwards one after its own effect stores it with
/// `store_refusals(true)` and `store_failures(true)` (a 429 is both), and then runs once: that
/// is what this test holds.
#[tokio::test(start_paused = true)]
async fn handler_forwarding_an_upstream_429_runs_once_when_stored() {
    let orders = Arc::new(AtomicU32::new(0));
    let o = orders.clone();
    let handler = tower::service_fn(move |_req: Request<Full<Bytes>>| {
        let o = o.clone();
        async move {
            o.fetch_add(1, Ordering::SeqCst);
            let res = Response::builder()
                .status(429)
                .header("retry-after", "1")
                .body(Full::new(Bytes::from_static(
                    b"payment provider: slow down",
                )))
                .unwrap();
            Ok::<_, BoxError>(res)
        }
    });
    let server = ServiceBuilder::new()
        .layer(RejectionLayer::http())
        .layer(
            IdempotencyLayer::builder(store())
                .store_refusals(true)
                .store_failures(true)
                .build()
                .unwrap(),
        )
        .service(handler);
    let res = readme_client(server).oneshot(post()).await.unwrap();
    assert_eq!(res.status(), 429);
    assert_eq!(
        orders.load(Ordering::SeqCst),
        1,
        "the order was recorded more than once"
    );
}

#[cfg(feature = "redis")]
#[path = "support/redis_server.rs"]
mod redis_server;

/// Promise (Unreleased "Fixed", Whose refusal): a `timeout` between the idempotency layer and
/// a Redis rate limit that fires during its Redis round trip (the request is still held, the
/// handler never saw it) releases the key. Redis is frozen (`SIGSTOP`) for the first request;
/// the repeat, once it answers again, runs. (Real time: under paused time tokio jumps to the
/// next timer while a Redis reply is on its way, so no Redis round trip could end; nothing
/// here sleeps, the one wait is the 200 ms timeout while Redis is frozen.)
#[cfg(feature = "redis")]
#[tokio::test]
async fn a_timeout_during_a_redis_rate_limit_round_trip_releases_the_key() {
    use tower_bulwark::rate_limit::store::RedisRateLimitConfig;
    let Some(server) = redis_server::RedisServer::start(
        "a_timeout_during_a_redis_rate_limit_round_trip_releases_the_key",
    ) else {
        return;
    };
    let conn = redis_server::conn(&server.url()).await;
    let runs = Arc::new(AtomicU32::new(0));
    let r = runs.clone();
    let limit = tower_bulwark::RedisRateLimitLayer::new(
        conn,
        RedisRateLimitConfig::new(tower_bulwark::Quota::per_second(100).unwrap())
            .timeout(Duration::from_secs(5))
            .unwrap(),
    )
    .unwrap();
    let svc = ServiceBuilder::new()
        .layer(IdempotencyLayer::new(store()))
        .timeout(Duration::from_millis(200))
        .layer(limit)
        .service(tower::service_fn(move |_req: Request<Full<Bytes>>| {
            r.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, BoxError>(ok()) }
        }));
    // Warm the connection and the script.
    let mut warm = post();
    warm.headers_mut().remove(IDEMPOTENCY_KEY);
    svc.clone().oneshot(warm).await.unwrap();
    server.pause();
    let err = svc.clone().oneshot(keyed()).await.unwrap_err();
    assert!(err.is::<tower::timeout::error::Elapsed>(), "{err}");
    server.resume();
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let again = svc.clone().oneshot(keyed()).await;
    assert_eq!(
        again.map(|r| r.status()).map_err(|e| kind(&e)),
        Ok(StatusCode::OK),
        "the repeat of a request that never ran was refused"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

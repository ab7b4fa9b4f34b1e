//! The idempotency lease over a request's life, on a `MemoryStore` under paused time: renewed
//! while the handler runs, never given up once the handler has answered, and what a store
//! failure or a cancellation at each step does to it.

use std::future::{ready, Future, Ready};
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use tower::{BoxError, Layer, Service, ServiceExt};
use tower_bulwark::clock::Clock;
use tower_bulwark::idempotency::{
    Claim, FailurePolicy, Fingerprint, IdempotencyLayer, Lease, MemoryStore, Record, Store,
    StoreError, StoreErrorKind, StoreKey,
};
use tower_bulwark::{Rejection, RejectionKind};

const LEASE: Duration = Duration::from_secs(3);

fn store() -> MemoryStore {
    MemoryStore::builder()
        .clock(Clock::tokio())
        .build()
        .unwrap()
}

fn req(key: &str) -> Request<Body> {
    Request::post("/orders")
        .header("idempotency-key", key)
        .body(Body::from("{}"))
        .unwrap()
}

fn kind(err: &BoxError) -> RejectionKind {
    Rejection::find(&**err).expect("a rejection").kind()
}

/// Polls `fut` once with a no-op waker.
fn poll_once<F: Future>(fut: std::pin::Pin<&mut F>) -> Poll<F::Output> {
    fut.poll(&mut Context::from_waker(Waker::noop()))
}

/// A handler that counts its runs, takes `work` (tokio time) and notes when its future is
/// dropped before it finished.
#[derive(Clone)]
struct Slow {
    runs: Arc<AtomicUsize>,
    cancelled: Arc<AtomicBool>,
    work: Duration,
}

impl Slow {
    fn new(work: Duration) -> Slow {
        Slow {
            runs: Arc::new(AtomicUsize::new(0)),
            cancelled: Arc::new(AtomicBool::new(false)),
            work,
        }
    }

    fn runs(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }

    fn service(
        &self,
    ) -> impl Service<
        Request<Body>,
        Response = Response<Body>,
        Error = BoxError,
        Future = impl Future<Output = Result<Response<Body>, BoxError>> + Send,
    > + Clone
           + Send {
        let this = self.clone();
        tower::service_fn(move |_req: Request<Body>| {
            let this = this.clone();
            async move {
                struct Finish(Arc<AtomicBool>, bool);
                impl Drop for Finish {
                    fn drop(&mut self) {
                        if !self.1 {
                            self.0.store(true, Ordering::SeqCst);
                        }
                    }
                }
                let n = this.runs.fetch_add(1, Ordering::SeqCst) + 1;
                let mut finish = Finish(this.cancelled.clone(), false);
                tokio::time::sleep(this.work).await;
                finish.1 = true;
                let mut res = Response::new(Body::from(format!("run {n}")));
                *res.status_mut() = StatusCode::CREATED;
                Ok::<_, BoxError>(res)
            }
        })
    }
}

/// A handler that runs three times its lease keeps the key: every repeat meanwhile gets
/// 409 and the handler runs once.
#[tokio::test(start_paused = true)]
async fn a_handler_three_times_longer_than_its_lease_keeps_the_key() {
    let app = Slow::new(3 * LEASE);
    let layer = IdempotencyLayer::builder(store())
        .lease_ttl(LEASE)
        .build()
        .unwrap();
    let handle = layer.handle();
    let svc = layer.layer(app.service());
    let first = tokio::spawn(svc.clone().oneshot(req("long")));
    tokio::task::yield_now().await;
    assert_eq!(app.runs(), 1);
    let start = tokio::time::Instant::now();
    let mut repeats = 0;
    while start.elapsed() < 3 * LEASE - Duration::from_millis(250) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let err = svc.clone().oneshot(req("long")).await.unwrap_err();
        assert_eq!(
            kind(&err),
            RejectionKind::IdempotencyInFlight,
            "a repeat at {:?} into a {LEASE:?} lease",
            start.elapsed()
        );
        assert_eq!(app.runs(), 1, "ran again at {:?}", start.elapsed());
        repeats += 1;
    }
    assert!(repeats >= 30, "{repeats} repeats");
    let res = first.await.unwrap().unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "run 1");
    let again = svc.clone().oneshot(req("long")).await.unwrap();
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(
        again.into_body().collect().await.unwrap().to_bytes(),
        "run 1"
    );
    assert_eq!(app.runs(), 1);
    assert_eq!(handle.stats().executed, 1);
}

fn claimed(c: Claim) -> Lease {
    match c {
        Claim::Claimed(l) => l,
        other => panic!("expected a lease, got {other:?}"),
    }
}

/// `renew` extends the owner's lease, and does nothing for anyone else.
#[tokio::test(start_paused = true)]
async fn renewal_extends_the_owners_lease_only() {
    let store = store();
    let k = StoreKey::new("tenant", "order");
    let fp = Fingerprint::from_u128(7);
    let lease = claimed(store.claim(&k, fp, LEASE).await.unwrap());

    // Another owner's token (a lease from an earlier claim, say) renews nothing.
    let forged = Lease::new(k.clone(), lease.token() ^ 1, fp);
    let err = store.renew(&forged, 10 * LEASE).await.unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::LeaseLost);
    tokio::time::advance(LEASE).await;
    let lease = claimed(store.claim(&k, fp, LEASE).await.unwrap());

    // The owner's renewal holds the key past its first expiry.
    tokio::time::advance(LEASE / 2).await;
    store.renew(&lease, LEASE).await.unwrap();
    tokio::time::advance(LEASE / 2 + LEASE / 4).await;
    assert!(matches!(
        store.claim(&k, fp, LEASE).await.unwrap(),
        Claim::InFlight
    ));
    // Once expired, the lease cannot be renewed back to life.
    tokio::time::advance(LEASE).await;
    let err = store.renew(&lease, LEASE).await.unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::LeaseLost);
    // Nor once completed: the record is left as it is.
    let lease = claimed(store.claim(&k, fp, LEASE).await.unwrap());
    let record = Record::not_kept(fp, StatusCode::CREATED);
    store.complete(&lease, record, LEASE).await.unwrap();
    let err = store.renew(&lease, 10 * LEASE).await.unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::LeaseLost);
    tokio::time::advance(LEASE).await;
    assert!(
        store.get(&k).await.unwrap().is_none(),
        "record kept its ttl"
    );
}

type BoxFut<T> = std::pin::Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send>>;

/// A `MemoryStore` with faults: `complete` fails (as a lost connection) its first
/// `fail_completes` times, or takes `slow_complete` first; `renew` fails while `renew_down`.
#[derive(Clone, Debug)]
struct Faulty {
    mem: MemoryStore,
    fail_completes: Arc<AtomicUsize>,
    completes: Arc<AtomicUsize>,
    slow_complete: Duration,
    renew_down: Arc<AtomicBool>,
    renewals: Arc<AtomicUsize>,
}

impl Faulty {
    fn new(mem: MemoryStore) -> Faulty {
        Faulty {
            mem,
            fail_completes: Arc::new(AtomicUsize::new(0)),
            completes: Arc::new(AtomicUsize::new(0)),
            slow_complete: Duration::ZERO,
            renew_down: Arc::new(AtomicBool::new(false)),
            renewals: Arc::new(AtomicUsize::new(0)),
        }
    }
}

fn unavailable() -> StoreError {
    StoreError::with_source(StoreErrorKind::Unavailable, "connection reset")
}

impl Store for Faulty {
    type ClaimFuture = <MemoryStore as Store>::ClaimFuture;
    type CompleteFuture = BoxFut<()>;
    type RenewFuture = Ready<Result<(), StoreError>>;
    type ReleaseFuture = <MemoryStore as Store>::ReleaseFuture;
    type GetFuture = <MemoryStore as Store>::GetFuture;

    fn claim(&self, k: &StoreKey, f: Fingerprint, ttl: Duration) -> Self::ClaimFuture {
        self.mem.claim(k, f, ttl)
    }
    fn complete(&self, lease: &Lease, record: Record, ttl: Duration) -> Self::CompleteFuture {
        self.completes.fetch_add(1, Ordering::SeqCst);
        let fail = self
            .fail_completes
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        let (mem, lease, slow) = (self.mem.clone(), lease.clone(), self.slow_complete);
        Box::pin(async move {
            tokio::time::sleep(slow).await;
            if fail {
                return Err(unavailable());
            }
            mem.complete(&lease, record, ttl).await
        })
    }
    fn renew(&self, lease: &Lease, ttl: Duration) -> Self::RenewFuture {
        self.renewals.fetch_add(1, Ordering::SeqCst);
        if self.renew_down.load(Ordering::SeqCst) {
            return ready(Err(unavailable()));
        }
        self.mem.renew(lease, ttl)
    }
    fn release(&self, lease: &Lease) -> Self::ReleaseFuture {
        self.mem.release(lease)
    }
    fn get(&self, k: &StoreKey) -> Self::GetFuture {
        self.mem.get(k)
    }
}

/// A completed request whose record could not be written (the store's answer lost) never
/// gives its key up: the write is tried again in the background, and no repeat runs.
#[tokio::test(start_paused = true)]
async fn a_record_that_could_not_be_written_is_written_later_and_never_runs_twice() {
    let app = Slow::new(Duration::from_millis(10));
    let store = Faulty::new(store());
    store.fail_completes.store(3, Ordering::SeqCst);
    let layer = IdempotencyLayer::builder(store.clone())
        .lease_ttl(LEASE)
        .build()
        .unwrap();
    let svc = layer.layer(app.service());
    let res = svc.clone().oneshot(req("lost")).await.unwrap();
    assert_eq!(
        res.status(),
        StatusCode::CREATED,
        "the client gets its answer"
    );
    // At once, and until the record is written: 409, never a second run.
    match svc.clone().oneshot(req("lost")).await {
        Err(e) => assert_eq!(kind(&e), RejectionKind::IdempotencyInFlight),
        Ok(res) => panic!(
            "the handler ran again: {} {:?}",
            res.status(),
            res.into_body().collect().await.unwrap().to_bytes()
        ),
    }
    assert_eq!(app.runs(), 1);
    tokio::time::sleep(LEASE / 2).await;
    let again = svc.clone().oneshot(req("lost")).await.unwrap();
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(
        again.into_body().collect().await.unwrap().to_bytes(),
        "run 1"
    );
    assert_eq!(app.runs(), 1);
    assert_eq!(
        store.completes.load(Ordering::SeqCst),
        4,
        "3 failures, then written"
    );
}

/// Dropped while its response is being stored (the handler has run): the write goes on in
/// the background; the key is never released to run again.
#[tokio::test(start_paused = true)]
async fn dropped_while_storing_finishes_the_write_and_never_runs_twice() {
    let app = Slow::new(Duration::ZERO);
    let mut store = Faulty::new(store());
    store.slow_complete = Duration::from_millis(500);
    let layer = IdempotencyLayer::builder(store.clone())
        .lease_ttl(LEASE)
        .build()
        .unwrap();
    let mut svc = layer.layer(app.service());
    {
        let mut fut = pin!(svc.call(req("s")));
        // The handler (no wait) answers; the layer is storing its response.
        for _ in 0..4 {
            assert!(poll_once(fut.as_mut()).is_pending());
            tokio::task::yield_now().await;
        }
        assert_eq!(app.runs(), 1);
        assert_eq!(store.completes.load(Ordering::SeqCst), 1);
    }
    tokio::task::yield_now().await;
    let err = svc.clone().oneshot(req("s")).await.unwrap_err();
    assert_eq!(kind(&err), RejectionKind::IdempotencyInFlight);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let again = svc.clone().oneshot(req("s")).await.unwrap();
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(
        again.into_body().collect().await.unwrap().to_bytes(),
        "run 1"
    );
    assert_eq!(app.runs(), 1);
}

/// A handler whose response head said success and whose body was still streaming when the
/// client dropped it has run: the key is recorded as completed (response not kept), never
/// released to run again.
#[tokio::test(start_paused = true)]
async fn dropped_while_reading_a_successful_response_never_runs_twice() {
    let runs = Arc::new(AtomicUsize::new(0));
    let counter = runs.clone();
    let svc = IdempotencyLayer::builder(store())
        .lease_ttl(LEASE)
        .build()
        .unwrap()
        .layer(tower::service_fn(move |_req: Request<Body>| {
            counter.fetch_add(1, Ordering::SeqCst);
            let first = futures_util::stream::iter([Ok::<_, BoxError>(Bytes::from("partial"))]);
            let body = Body::from_stream(futures_util::StreamExt::chain(
                first,
                futures_util::stream::pending(),
            ));
            async move { Ok::<_, BoxError>(Response::new(body)) }
        }));
    {
        let mut s = svc.clone();
        let mut fut = pin!(s.call(req("b")));
        // The body streams: its head is handed on at once, and the client drops it midway.
        let polled = poll_once(fut.as_mut());
        assert!(matches!(polled, Poll::Ready(Ok(_))), "{polled:?}");
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        drop(polled);
    }
    tokio::task::yield_now().await;
    for _ in 0..2 {
        // A second run would stall on its own body: bounded, so that it shows as a failure.
        let out = tokio::time::timeout(LEASE, svc.clone().oneshot(req("b"))).await;
        let err = out.expect("the handler ran again").unwrap_err();
        assert_eq!(kind(&err), RejectionKind::IdempotencyResponseNotStored);
        tokio::time::sleep(2 * LEASE).await;
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// Renewal failing (store unreachable) under `FailClosed`: the handler is stopped before its
/// lease can run out, so that no repeat can ever run beside it, and the client gets 503.
#[tokio::test(start_paused = true)]
async fn a_lease_that_cannot_be_renewed_stops_the_handler_when_failing_closed() {
    let app = Slow::new(3 * LEASE);
    let store = Faulty::new(store());
    store.renew_down.store(true, Ordering::SeqCst);
    let layer = IdempotencyLayer::builder(store.clone())
        .lease_ttl(LEASE)
        .build()
        .unwrap();
    let handle = layer.handle();
    let svc = layer.layer(app.service());
    let start = tokio::time::Instant::now();
    let err = svc.clone().oneshot(req("r")).await.unwrap_err();
    assert_eq!(kind(&err), RejectionKind::StoreUnavailable);
    let took = start.elapsed();
    assert!(
        took <= LEASE,
        "stopped after {took:?}, past its {LEASE:?} lease"
    );
    assert!(took >= LEASE * 2 / 3, "stopped early, after {took:?}");
    assert!(
        app.cancelled.load(Ordering::SeqCst),
        "the handler was stopped"
    );
    assert!(
        store.renewals.load(Ordering::SeqCst) >= 2,
        "renewal was retried"
    );
    assert!(handle.stats().store_errors >= 1);
    assert_eq!(app.runs(), 1);
    // The stopped request never completed: the key is free to run again (in turn, never
    // beside it).
    store.renew_down.store(false, Ordering::SeqCst);
    let res = svc.clone().oneshot(req("r")).await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(app.runs(), 2);
}

/// Renewal failing under `FailOpen` (availability over exactly-once): the handler goes on and
/// its answer reaches the client.
#[tokio::test(start_paused = true)]
async fn a_lease_that_cannot_be_renewed_lets_the_handler_finish_when_failing_open() {
    let app = Slow::new(3 * LEASE);
    let store = Faulty::new(store());
    store.renew_down.store(true, Ordering::SeqCst);
    let svc = IdempotencyLayer::builder(store.clone())
        .lease_ttl(LEASE)
        .on_store_error(FailurePolicy::FailOpen)
        .build()
        .unwrap()
        .layer(app.service());
    let res = svc.clone().oneshot(req("o")).await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert!(!app.cancelled.load(Ordering::SeqCst));
    assert_eq!(app.runs(), 1);
}

/// Dropped in its handler after renewals, releasing on drop (`release_on_drop(true)`): the
/// renewed lease is released like any other, and the key runs again at once.
#[tokio::test(start_paused = true)]
async fn dropped_in_a_handler_that_outlived_its_lease_releases_the_key() {
    let app = Slow::new(3 * LEASE);
    let mem = store();
    let layer = IdempotencyLayer::builder(mem.clone())
        .lease_ttl(LEASE)
        .release_on_drop(true)
        .build()
        .unwrap();
    let svc = layer.layer(app.service());
    let first = tokio::spawn(svc.clone().oneshot(req("d")));
    tokio::time::sleep(2 * LEASE).await;
    assert_eq!(mem.stats().entries, 1, "renewed past its first expiry");
    first.abort();
    assert!(first.await.unwrap_err().is_cancelled());
    assert!(app.cancelled.load(Ordering::SeqCst));
    assert_eq!(mem.stats().entries, 0, "released");
    let app2 = Slow::new(Duration::ZERO);
    let res = IdempotencyLayer::builder(mem.clone())
        .build()
        .unwrap()
        .layer(app2.service())
        .oneshot(req("d"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(app2.runs(), 1);
}

/// Renewing stops with the future: a lease kept on drop (the default, `release_on_drop(false)`) expires one
/// lease after its last renewal, as a crashed owner's would.
#[tokio::test(start_paused = true)]
async fn renewal_stops_when_the_future_is_dropped() {
    let app = Slow::new(10 * LEASE);
    let layer = IdempotencyLayer::builder(store())
        .lease_ttl(LEASE)
        .release_on_drop(false)
        .build()
        .unwrap();
    let svc = layer.layer(app.service());
    let first = tokio::spawn(svc.clone().oneshot(req("k")));
    tokio::time::sleep(2 * LEASE).await;
    first.abort();
    let _ = first.await;
    let err = svc.clone().oneshot(req("k")).await.unwrap_err();
    assert_eq!(kind(&err), RejectionKind::IdempotencyInFlight, "kept");
    tokio::time::sleep(LEASE).await;
    // Expired: the key runs again (its handler takes long; seeing it start is enough).
    let second = tokio::spawn(svc.clone().oneshot(req("k")));
    tokio::task::yield_now().await;
    assert_eq!(app.runs(), 2, "the lease expired after its last renewal");
    second.abort();
}

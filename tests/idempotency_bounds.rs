//! The idempotency layer's bounds: a full store refuses new keys and forgets none, and the
//! bytes it buffers in flight are bounded for the whole layer.

use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use tokio::sync::Semaphore;
use tower::{BoxError, Layer, Service, ServiceExt};
use tower_bulwark::clock::Clock;
use tower_bulwark::idempotency::{ConfigError, IdempotencyLayer, MemoryStore};
use tower_bulwark::{Rejection, RejectionKind, RejectionLayer};

/// A handler that counts its runs; `x-gate` holds it until the gate gives a permit;
/// `x-fail` fails it; `x-size: N` answers with an N-byte body.
#[derive(Clone)]
struct App {
    runs: Arc<AtomicUsize>,
    gate: Arc<Semaphore>,
}

impl App {
    fn new() -> App {
        App {
            runs: Arc::new(AtomicUsize::new(0)),
            gate: Arc::new(Semaphore::new(0)),
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
        let app = self.clone();
        tower::service_fn(move |req: Request<Body>| {
            let app = app.clone();
            async move {
                app.runs.fetch_add(1, Ordering::SeqCst);
                if req.headers().contains_key("x-gate") {
                    app.gate.acquire().await.unwrap().forget();
                }
                if req.headers().contains_key("x-fail") {
                    return Err::<Response<Body>, BoxError>("handler failed".into());
                }
                let n: usize = req
                    .headers()
                    .get("x-size")
                    .map_or(16, |v| v.to_str().unwrap().parse().unwrap());
                let _ = req.into_body().collect().await?;
                let res = Response::builder()
                    .status(StatusCode::CREATED)
                    .body(Body::from(vec![b'x'; n]))
                    .unwrap();
                Ok::<_, BoxError>(res)
            }
        })
    }
}

fn req(key: &str) -> http::request::Builder {
    Request::post("/orders").header("idempotency-key", key)
}

fn poll_once<F: Future>(fut: std::pin::Pin<&mut F>) -> Poll<F::Output> {
    fut.poll(&mut Context::from_waker(Waker::noop()))
}

#[tokio::test(start_paused = true)]
async fn a_full_store_refuses_new_keys_with_503_and_forgets_no_completed_key() {
    let app = App::new();
    let store = MemoryStore::builder()
        .max_entries(8)
        .shards(1)
        .scope_share(1.0)
        .clock(Clock::tokio())
        .build()
        .unwrap();
    let layer = IdempotencyLayer::builder(store).build().unwrap();
    let svc = RejectionLayer::http().layer(layer.layer(app.service()));
    for i in 0..8 {
        let res = svc
            .clone()
            .oneshot(req(&format!("k{i}")).body(Body::from("{}")).unwrap())
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::CREATED);
    }
    assert_eq!(app.runs(), 8);
    // The store is full of completed, unexpired records: a new key is refused, nothing runs.
    let res = svc
        .clone()
        .oneshot(req("new").body(Body::from("{}")).unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        res.headers().contains_key(http::header::RETRY_AFTER),
        "{:?}",
        res.headers()
    );
    assert_eq!(app.runs(), 8, "a refused key does not run");
    // Every completed key still replays: none was evicted to make room.
    for i in 0..8 {
        let res = svc
            .clone()
            .oneshot(req(&format!("k{i}")).body(Body::from("{}")).unwrap())
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::CREATED, "k{i}");
        assert_eq!(res.headers()["idempotent-replayed"], "true", "k{i}");
    }
    assert_eq!(app.runs(), 8, "no repeat ran twice");
}

#[tokio::test(start_paused = true)]
async fn a_response_just_under_the_cap_is_kept_by_the_default_store() {
    let app = App::new();
    let store = MemoryStore::builder()
        .clock(Clock::tokio())
        .build()
        .unwrap();
    let svc = RejectionLayer::http().layer(
        IdempotencyLayer::builder(store)
            .build()
            .unwrap()
            .layer(app.service()),
    );
    let size = ((1 << 20) - 16).to_string();
    let big = || {
        req("big")
            .header("x-size", &size)
            .body(Body::from("{}"))
            .unwrap()
    };
    let first = svc.clone().oneshot(big()).await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    let again = svc.clone().oneshot(big()).await.unwrap();
    assert_eq!(again.status(), StatusCode::CREATED, "replayed, not 409");
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(
        again.into_body().collect().await.unwrap().to_bytes().len(),
        (1 << 20) - 16
    );
    assert_eq!(app.runs(), 1);
}

/// A store large enough for the big responses below, so that only the layer's buffer bound
/// is in play.
fn big_store() -> MemoryStore {
    MemoryStore::builder()
        .max_bytes(4 << 30)
        .clock(Clock::tokio())
        .build()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn the_bytes_buffered_in_flight_are_bounded_for_the_whole_layer() {
    // Responses of up to 120 MiB are kept: two handlers in flight hold room for most of the
    // layer's default bound (256 MiB), so a third keyed request is refused before it runs,
    // even through another service made by the same layer.
    let app = App::new();
    let layer = IdempotencyLayer::builder(big_store())
        .max_response_body(120 << 20)
        .build()
        .unwrap();
    let a = RejectionLayer::http().layer(layer.layer(app.service()));
    let b = RejectionLayer::http().layer(layer.clone().layer(app.service()));
    let gated = |k: &str| req(k).header("x-gate", "1").body(Body::from("{}")).unwrap();
    let mut s1 = a.clone();
    let mut s2 = b.clone();
    let mut f1 = pin!(s1.call(gated("g1")));
    let mut f2 = pin!(s2.call(gated("g2")));
    assert!(poll_once(f1.as_mut()).is_pending());
    assert!(poll_once(f2.as_mut()).is_pending());
    assert_eq!(app.runs(), 2);
    let third = tokio::time::timeout(Duration::from_secs(5), b.clone().oneshot(gated("g3")))
        .await
        .expect("the third request is answered, not run: it would wait on the gate")
        .unwrap();
    assert_eq!(third.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(third.headers().contains_key(http::header::RETRY_AFTER));
    assert_eq!(app.runs(), 2, "the refused request did not run");
    // Both finish; their reservations are given back and a new key runs.
    app.gate.add_permits(2);
    assert_eq!(f1.await.unwrap().status(), StatusCode::CREATED);
    assert_eq!(f2.await.unwrap().status(), StatusCode::CREATED);
    let res = a
        .clone()
        .oneshot(req("after").body(Body::from("{}")).unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(app.runs(), 3);
}

#[tokio::test(start_paused = true)]
async fn buffer_reservations_are_given_back_when_dropped_at_any_point() {
    let app = App::new();
    let layer = IdempotencyLayer::builder(big_store())
        .max_response_body(64 << 20)
        .max_buffered_bytes(128 << 20)
        .build()
        .unwrap();
    let handle = layer.handle();
    let svc = layer.layer(app.service());

    // 1. Dropped while reading the request body (one chunk read, then stalled).
    {
        let mut s = svc.clone();
        let chunks = futures_util::StreamExt::chain(
            futures_util::stream::iter([Ok::<_, BoxError>(Bytes::from(vec![b'a'; 1000]))]),
            futures_util::stream::pending(),
        );
        let mut fut = pin!(s.call(req("d1").body(Body::from_stream(chunks)).unwrap()));
        assert!(poll_once(fut.as_mut()).is_pending());
        assert_eq!(handle.stats().buffered_bytes, 1000);
    }
    assert_eq!(handle.stats().buffered_bytes, 0, "dropped reading the body");

    // 2. Dropped while the handler runs: the response's room was reserved.
    {
        let mut s = svc.clone();
        let gated = req("d2")
            .header("x-gate", "1")
            .body(Body::from("{}"))
            .unwrap();
        let mut fut = pin!(s.call(gated));
        assert!(poll_once(fut.as_mut()).is_pending());
        assert!(handle.stats().buffered_bytes >= 64 << 20);
    }
    assert_eq!(handle.stats().buffered_bytes, 0, "dropped in the handler");

    // 3. The response body dropped unread: its buffered bytes are given back with it.
    let res = svc
        .clone()
        .oneshot(
            req("d3")
                .header("x-size", "5000")
                .body(Body::from("{}"))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(
        handle.stats().buffered_bytes,
        5000,
        "held by the unread body"
    );
    drop(res);
    assert_eq!(handle.stats().buffered_bytes, 0, "dropped with the body");

    // 4. Read to the end: given back as the data is handed on.
    let res = svc
        .clone()
        .oneshot(
            req("d4")
                .header("x-size", "7000")
                .body(Body::from("{}"))
                .unwrap(),
        )
        .await
        .unwrap();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body.len(), 7000);
    assert_eq!(handle.stats().buffered_bytes, 0, "read to the end");

    // 5. A replay holds its body's bytes until it hands them on or is dropped.
    let res = svc
        .clone()
        .oneshot(
            req("d4")
                .header("x-size", "7000")
                .body(Body::from("{}"))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.headers()["idempotent-replayed"], "true");
    assert_eq!(
        handle.stats().buffered_bytes,
        7000,
        "held by the unread replay"
    );
    drop(res);
    assert_eq!(handle.stats().buffered_bytes, 0, "dropped with the replay");

    // 5b. The handler fails: everything is given back with the error.
    let err = svc
        .clone()
        .oneshot(
            req("d5")
                .header("x-fail", "1")
                .body(Body::from("{}"))
                .unwrap(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "handler failed");
    assert_eq!(handle.stats().buffered_bytes, 0, "the handler failed");

    // 6. Dropped in a spawned task by a timeout above.
    let mut s = svc.clone();
    let gated = req("d6")
        .header("x-gate", "1")
        .body(Body::from("{}"))
        .unwrap();
    let fut = s.call(gated);
    let task = tokio::spawn(tokio::time::timeout(std::time::Duration::from_secs(1), fut));
    tokio::task::yield_now().await;
    assert!(handle.stats().buffered_bytes > 0);
    assert!(task.await.unwrap().is_err(), "timed out");
    assert_eq!(handle.stats().buffered_bytes, 0, "dropped by the timeout");
    assert_eq!(handle.stats().buffer_rejected, 0);
}

#[tokio::test(start_paused = true)]
async fn a_request_body_over_the_layers_bound_is_refused_before_it_runs() {
    let app = App::new();
    let layer = IdempotencyLayer::builder(big_store())
        .max_request_body(8 << 10)
        .max_response_body(1 << 10)
        .max_buffered_bytes(12 << 10)
        .build()
        .unwrap();
    let handle = layer.handle();
    let svc = RejectionLayer::http().layer(layer.layer(app.service()));
    // One request reads 6 KiB of its body and stalls there.
    let mut s = svc.clone();
    let chunks = futures_util::StreamExt::chain(
        futures_util::stream::iter([Ok::<_, BoxError>(Bytes::from(vec![b'a'; 6 << 10]))]),
        futures_util::stream::pending(),
    );
    let mut held = pin!(s.call(req("slow").body(Body::from_stream(chunks)).unwrap()));
    assert!(poll_once(held.as_mut()).is_pending());
    // Another sends 7 KiB: within its own limit, over the layer's.
    let res = svc
        .clone()
        .oneshot(req("other").body(Body::from(vec![b'b'; 7 << 10])).unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(res.headers().contains_key(http::header::RETRY_AFTER));
    assert_eq!(app.runs(), 0);
    assert_eq!(handle.stats().buffer_rejected, 1);
}

#[tokio::test(start_paused = true)]
async fn a_store_full_refusal_is_its_own_kind_counted_with_a_jittered_hint() {
    let app = App::new();
    let store = MemoryStore::builder()
        .max_entries(2)
        .shards(1)
        .scope_share(1.0)
        .clock(Clock::tokio())
        .build()
        .unwrap();
    let layer = IdempotencyLayer::builder(store.clone()).build().unwrap();
    let handle = layer.handle();
    let svc = layer.layer(app.service());
    for k in ["a", "b"] {
        let res = svc
            .clone()
            .oneshot(req(k).body(Body::from("{}")).unwrap())
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::CREATED);
    }
    let mut hints = Vec::new();
    for i in 0..20 {
        let err = svc
            .clone()
            .oneshot(req(&format!("new{i}")).body(Body::from("{}")).unwrap())
            .await
            .unwrap_err();
        let r = Rejection::find(&*err).expect("a rejection");
        assert_eq!(r.kind(), RejectionKind::IdempotencyStoreFull);
        hints.push(r.retry_after().expect("a hint"));
    }
    // The earliest record expires in 24 h: the hint is capped at a minute, and jittered up to
    // half as much again, never less.
    assert!(
        hints
            .iter()
            .all(|h| (Duration::from_secs(60)..=Duration::from_secs(90)).contains(h)),
        "{hints:?}"
    );
    hints.sort();
    hints.dedup();
    assert!(hints.len() > 10, "jittered: {hints:?}");
    assert_eq!(handle.stats().store_full, 20);
    assert_eq!(
        handle.stats().store_errors,
        0,
        "a full store is not a failing one"
    );
    assert_eq!(store.stats().refused, 20);
    assert_eq!(app.runs(), 2);
}

#[cfg(feature = "grpc")]
#[tokio::test(start_paused = true)]
async fn a_full_store_is_unavailable_with_pushback_over_grpc() {
    let app = App::new();
    let store = MemoryStore::builder()
        .max_entries(1)
        .shards(1)
        .scope_share(1.0)
        .clock(Clock::tokio())
        .build()
        .unwrap();
    let svc = RejectionLayer::grpc().layer(
        IdempotencyLayer::builder(store)
            .build()
            .unwrap()
            .layer(app.service()),
    );
    let first = svc
        .clone()
        .oneshot(req("a").body(Body::from("{}")).unwrap())
        .await
        .unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    let res = svc
        .clone()
        .oneshot(req("b").body(Body::from("{}")).unwrap())
        .await
        .unwrap();
    assert_eq!(res.headers()["grpc-status"], "14");
    let ms: u64 = res.headers()["grpc-retry-pushback-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((60_000..=90_000).contains(&ms), "{ms}");
}

#[test]
fn the_largest_kept_response_must_fit_the_store() {
    // 8 MiB: claims leave 512 KiB for completions, less than a 1 MiB response.
    let small = || MemoryStore::builder().max_bytes(8 << 20).build().unwrap();
    let err = IdempotencyLayer::builder(small())
        .build()
        .expect_err("refused");
    assert!(
        matches!(
            err,
            ConfigError::ResponseExceedsStore {
                max_response_body: 1_048_576,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("max_response_body"), "{err}");
    // A cap that fits is accepted.
    assert!(IdempotencyLayer::builder(small())
        .max_response_body(256 << 10)
        .build()
        .is_ok());
    // One scope's share bounds it as well (1% of 64 MiB is under 1 MiB).
    let shared = MemoryStore::builder()
        .max_bytes(64 << 20)
        .scope_share(0.01)
        .build()
        .unwrap();
    assert!(IdempotencyLayer::builder(shared).build().is_err());
    // The default store takes the default layer.
    assert!(IdempotencyLayer::builder(MemoryStore::default())
        .build()
        .is_ok());
}

#[tokio::test(start_paused = true)]
async fn new_fits_its_response_cap_to_a_small_store() {
    let app = App::new();
    let store = MemoryStore::builder()
        .max_bytes(8 << 20)
        .clock(Clock::tokio())
        .build()
        .unwrap();
    let room = store.stats().max_record;
    assert!(room < 1 << 20);
    let svc = RejectionLayer::http().layer(IdempotencyLayer::new(store).layer(app.service()));
    // A response as large as the store takes is kept and replayed.
    let size = (room - (16 << 10)).to_string();
    let r = || {
        req("k")
            .header("x-size", &size)
            .body(Body::from("{}"))
            .unwrap()
    };
    assert_eq!(
        svc.clone().oneshot(r()).await.unwrap().status(),
        StatusCode::CREATED
    );
    let again = svc.clone().oneshot(r()).await.unwrap();
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(app.runs(), 1);
}

#[test]
fn the_buffer_bound_must_hold_one_request_and_one_response() {
    let b = || IdempotencyLayer::builder(MemoryStore::default());
    assert_eq!(
        b().max_buffered_bytes(0).build().err(),
        Some(ConfigError::Zero("max_buffered_bytes"))
    );
    assert_eq!(
        b().max_buffered_bytes(2 << 20).build().err(),
        None,
        "1 MiB of request and 1 MiB of response"
    );
    assert_eq!(
        b().max_buffered_bytes((2 << 20) - 1).build().err(),
        Some(ConfigError::BufferTooSmall)
    );
}

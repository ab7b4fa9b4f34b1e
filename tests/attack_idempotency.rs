//! Hostile review of the idempotency layer: attacks by a user or an attacker.
//!
//! Tests under "Defects" each assert the promised behaviour, and their comment states the
//! defect they found (each failed before its fix). The others are attacks that held.

use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use futures_util::FutureExt;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use tokio::sync::Semaphore;
use tower::{BoxError, Layer, Service, ServiceBuilder, ServiceExt};
use tower_bulwark::clock::Clock;
use tower_bulwark::idempotency::{IdempotencyBuilder, IdempotencyLayer, MemoryStore};
use tower_bulwark::{Rejection, RejectionKind, RejectionLayer};

#[cfg(feature = "redis")]
#[path = "support/redis_server.rs"]
#[macro_use]
mod redis_server;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A handler that counts its runs (in total and per `x-who` header), and is steered by request
/// headers: `x-gate` waits for a permit; `x-stall` answers 201 with a body whose first chunk
/// comes at once and the rest never; `x-big: N` answers an N-byte body; `x-grpc-fail` answers
/// a gRPC-style body of `x-big` bytes (default 5) then trailers `grpc-status: 14`;
/// `x-body-error` answers a body of `x-big` bytes then an error; `x-conn-obs` sets a
/// `Connection` header naming `x-secret`, with a non-ASCII token in it; `x-panic` panics.
#[derive(Clone)]
struct App {
    runs: Arc<AtomicUsize>,
    in_flight: Arc<AtomicUsize>,
    max_in_flight: Arc<AtomicUsize>,
    gate: Arc<Semaphore>,
}

impl App {
    fn new() -> App {
        App {
            runs: Arc::new(AtomicUsize::new(0)),
            in_flight: Arc::new(AtomicUsize::new(0)),
            max_in_flight: Arc::new(AtomicUsize::new(0)),
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
                let n = app.runs.fetch_add(1, Ordering::SeqCst) + 1;
                let now = app.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                app.max_in_flight.fetch_max(now, Ordering::SeqCst);
                struct Out(Arc<AtomicUsize>);
                impl Drop for Out {
                    fn drop(&mut self) {
                        self.0.fetch_sub(1, Ordering::SeqCst);
                    }
                }
                let _out = Out(app.in_flight.clone());
                let h = req.headers().clone();
                if h.contains_key("x-panic") {
                    panic!("handler panicked");
                }
                if h.contains_key("x-gate") {
                    app.gate.acquire().await.unwrap().forget();
                }
                let body = req.into_body().collect().await?.to_bytes();
                let big: Option<usize> =
                    h.get("x-big").map(|v| v.to_str().unwrap().parse().unwrap());
                let mut res = Response::builder()
                    .status(201)
                    .header("content-type", "application/json")
                    .header("x-run", n.to_string());
                let out = if h.contains_key("x-stall") {
                    let first =
                        futures_util::stream::iter([Ok::<_, BoxError>(Bytes::from("{\"id\":"))]);
                    Body::from_stream(futures_util::StreamExt::chain(
                        first,
                        futures_util::stream::pending(),
                    ))
                } else if h.contains_key("x-grpc-fail") {
                    res = res.status(200).header("content-type", "application/grpc");
                    let frames =
                        futures_util::stream::iter([
                            Ok::<_, BoxError>(http_body::Frame::data(Bytes::from(vec![
                            0u8;
                            big.unwrap_or(5)
                        ]))),
                            Ok(http_body::Frame::trailers({
                                let mut t = HeaderMap::new();
                                t.insert("grpc-status", HeaderValue::from_static("14"));
                                t
                            })),
                        ]);
                    Body::new(http_body_util::StreamBody::new(frames))
                } else if h.contains_key("x-body-error") {
                    let frames = futures_util::stream::iter([
                        Ok::<_, BoxError>(Bytes::from(vec![b'x'; big.unwrap_or(5)])),
                        Err::<Bytes, BoxError>("connection to the database lost".into()),
                    ]);
                    Body::from_stream(frames)
                } else if let Some(n) = big {
                    Body::from(vec![b'x'; n])
                } else {
                    Body::from(format!(
                        "{{\"run\":{n},\"echo\":{:?}}}",
                        String::from_utf8_lossy(&body)
                    ))
                };
                if h.contains_key("x-conn-obs") {
                    res = res
                        .header(
                            "connection",
                            HeaderValue::from_bytes(b"x-secret, caf\xe9").unwrap(),
                        )
                        .header("x-secret", "per-connection-value");
                }
                Ok(res.body(out).unwrap())
            }
        })
    }
}

fn post(key: &str) -> http::request::Builder {
    Request::post("/orders").header("idempotency-key", key)
}

fn req(key: &str, body: &'static str) -> Request<Body> {
    post(key).body(Body::from(body)).unwrap()
}

fn store() -> MemoryStore {
    MemoryStore::builder()
        .clock(Clock::tokio())
        .build()
        .unwrap()
}

fn builder() -> IdempotencyBuilder<MemoryStore> {
    IdempotencyLayer::builder(store())
}

fn kind(err: &BoxError) -> RejectionKind {
    Rejection::find(&**err).expect("a rejection").kind()
}

fn poll_once<F: Future>(fut: std::pin::Pin<&mut F>) -> Poll<F::Output> {
    fut.poll(&mut Context::from_waker(Waker::noop()))
}

// ---------------------------------------------------------------------------------------------
// Defects
// ---------------------------------------------------------------------------------------------

/// DEFECT (security/correctness): any caller, in any scope, can make another caller's
/// completed request run a second time. The default `MemoryStore` makes room for new entries by
/// evicting the oldest completed records of a shard (1,562 entries or 1 MiB per shard by
/// default), whoever they belong to. An attacker with its own credentials sends cheap requests
/// with fresh keys; the victim's stored response is evicted, and the victim's retry runs the
/// handler again (a second order, a second payment). Scoping gives no isolation here: the
/// eviction pool is shared. When the store must choose between forgetting a completed key
/// (running twice) and refusing new keys, the default forgets.
#[tokio::test(flavor = "current_thread")]
async fn other_callers_traffic_cannot_make_a_completed_key_run_twice() {
    let app = App::new();
    // The README's stack: the layer with a default store.
    let svc = IdempotencyLayer::new(MemoryStore::default()).layer(app.service());

    let victim = || {
        post("order-7f3a")
            .header("authorization", "Bearer victim")
            .body(Body::from("{\"amount\":100}"))
            .unwrap()
    };
    let first = svc.clone().oneshot(victim()).await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    assert_eq!(app.runs(), 1);

    // An attacker, with its own credentials, floods the store with fresh keys. The store may
    // refuse them (it never forgets a completed key to make room); count the refusals.
    let mut refused = 0u32;
    for i in 0..120_000u32 {
        let r = post(&format!("junk-{i}"))
            .header("authorization", "Bearer attacker")
            .body(Body::from("{}"))
            .unwrap();
        match svc.clone().oneshot(r).await {
            Ok(res) => assert_eq!(res.status(), StatusCode::CREATED),
            Err(e) => {
                assert_eq!(kind(&e), RejectionKind::IdempotencyStoreFull);
                refused += 1;
            }
        }
    }
    assert!(
        refused > 0,
        "the flood was never refused: the store grew without bound"
    );
    let before = app.runs();

    // The victim's client retries (its connection had dropped): it must get the replay.
    let again = svc.clone().oneshot(victim()).await.unwrap();
    assert_eq!(
        app.runs(),
        before,
        "the victim's order ran a second time after another caller's traffic"
    );
    assert_eq!(again.headers()["idempotent-replayed"], "true");
}

/// DEFECT (security/correctness), the cheap form of the one above: each shard of the default
/// store has a 1 MiB byte budget, so a few hundred requests whose responses are a few hundred
/// KiB (a search, an export, an echo of the request) evict every completed record of every
/// shard.
#[tokio::test(flavor = "current_thread")]
async fn other_callers_large_responses_cannot_make_a_completed_key_run_twice() {
    let app = App::new();
    let svc = IdempotencyLayer::new(MemoryStore::default()).layer(app.service());
    let victim = || {
        post("order-7f3a")
            .header("authorization", "Bearer victim")
            .body(Body::from("{\"amount\":100}"))
            .unwrap()
    };
    assert_eq!(svc.clone().oneshot(victim()).await.unwrap().status(), 201);
    let mut refused = 0u32;
    for i in 0..400u32 {
        let r = post(&format!("export-{i}"))
            .header("authorization", "Bearer attacker")
            .header("x-big", (600 << 10).to_string())
            .body(Body::from("{}"))
            .unwrap();
        match svc.clone().oneshot(r).await {
            Ok(res) => drop(res),
            Err(e) => {
                assert_eq!(kind(&e), RejectionKind::IdempotencyStoreFull);
                refused += 1;
            }
        }
    }
    assert!(
        refused > 0,
        "400 large responses were never refused: the store grew without bound"
    );
    let before = app.runs();
    let again = svc.clone().oneshot(victim()).await.unwrap();
    assert_eq!(
        app.runs(),
        before,
        "the victim's order ran a second time after 400 requests of another caller"
    );
    assert_eq!(again.headers()["idempotent-replayed"], "true");
}

/// DEFECT (correctness): a response is only stored once its whole body is buffered, and
/// dropping the future in that phase releases the key, although the handler has already run
/// to completion and returned a success. A client that goes away while a streamed body is
/// being produced (or whose proxy times out) frees the key; its retry runs the handler again.
/// Here, unlike a drop while the handler runs, there is no doubt the work was done: the
/// refusing choice is to keep the key (record it, at worst as "not kept"). (The response
/// streams now, its head handed on at once: the client drops its body midway.)
#[tokio::test(start_paused = true)]
async fn drop_after_the_handler_returned_does_not_run_it_again() {
    let app = App::new();
    let svc = builder().build().unwrap().layer(app.service());
    {
        let mut s = svc.clone();
        let r = post("stream-1")
            .header("x-stall", "1")
            .body(Body::from("{}"))
            .unwrap();
        let mut fut = pin!(s.call(r));
        // The response streams: its head is handed on at once, and its body (one chunk,
        // then nothing) is read by the client as it comes.
        let Poll::Ready(Ok(res)) = poll_once(fut.as_mut()) else {
            panic!("the head of a streamed response is handed on at once");
        };
        assert_eq!(res.status(), StatusCode::CREATED);
        assert_eq!(app.runs(), 1, "the handler ran and returned 201");
        let mut body = res.into_body();
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "{\"id\":");
        // The client goes away midway.
    }
    let res = svc.clone().oneshot(req("stream-1", "{}")).await;
    assert_eq!(
        app.runs(),
        1,
        "the handler, which had completed, ran a second time: {:?}",
        res.map(|r| r.status())
    );
}

/// DEFECT (correctness): the docs say a gRPC failure status is not stored and the key is
/// released "so the client can retry". When the body of that failed response is over
/// `max_response_body`, the layer records the key as completed ("too large to keep") before
/// it reads the trailers; the `grpc-status: 14` (UNAVAILABLE) at the end is ignored, and
/// every retry for 24 hours gets 409 `IdempotencyResponseNotStored`: the client can never
/// retry an operation that failed.
#[tokio::test(start_paused = true)]
async fn grpc_failure_with_a_large_body_is_not_stored() {
    let app = App::new();
    let svc = builder()
        .max_response_body(64)
        .build()
        .unwrap()
        .layer(app.service());
    let call = || {
        post("g-1")
            .header("content-type", "application/grpc")
            .header("x-grpc-fail", "1")
            .header("x-big", "100")
            .body(Body::from("\0\0\0\0\x01x"))
            .unwrap()
    };
    let first = svc.clone().oneshot(call()).await.unwrap();
    let first = first.into_body().collect().await.unwrap();
    assert_eq!(first.trailers().unwrap()["grpc-status"], "14");

    let again = svc.clone().oneshot(call()).await;
    if let Err(e) = &again {
        panic!(
            "the retry of a failed (UNAVAILABLE) call was refused: {:?}",
            kind(e)
        );
    }
    assert_eq!(app.runs(), 2, "UNAVAILABLE must not be stored");
}

/// A response over `max_response_body` is settled when its body ends, and until then its key
/// stays held, however slowly the client reads: a repeat meanwhile gets 409 (even after a
/// lease's time to live), and a body dropped midway records the key as completed, not kept.
#[tokio::test(start_paused = true)]
async fn large_response_read_slowly_or_cut_short_never_runs_twice() {
    let app = App::new();
    let svc = builder()
        .max_response_body(4)
        .build()
        .unwrap()
        .layer(app.service());
    let call = || {
        post("s-1")
            .header("x-stall", "1")
            .body(Body::from("{}"))
            .unwrap()
    };
    let res = svc.clone().oneshot(call()).await.unwrap();
    let mut body = res.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert_eq!(first.into_data().unwrap(), "{\"id\":");
    // The client reads no more for longer than a lease lives (time passing as it does, in
    // steps, so that the task renewing the lease while the body lives can run).
    for _ in 0..15 {
        tokio::time::advance(Duration::from_secs(10)).await;
        tokio::task::yield_now().await;
    }
    let err = svc.clone().oneshot(call()).await.unwrap_err();
    assert_eq!(kind(&err), RejectionKind::IdempotencyInFlight);
    drop(body);
    let err = svc.clone().oneshot(call()).await.unwrap_err();
    assert_eq!(kind(&err), RejectionKind::IdempotencyResponseNotStored);
    assert_eq!(app.runs(), 1);
}

/// An HTTP response over the cap whose body fails midway: the handler answered its head (it
/// ran, and the client saw it), so its key is recorded as completed, not kept, as under the
/// cap: the retry is refused with 409, never run a second time. (This once expected the
/// key released; a body error no longer releases a key, under the cap or over it: a handler
/// that answered has had its effect.)
#[tokio::test(start_paused = true)]
async fn body_error_after_the_cap_keeps_the_key() {
    let app = App::new();
    let svc = builder()
        .max_response_body(64)
        .build()
        .unwrap()
        .layer(app.service());
    let call = || {
        post("e-1")
            .header("x-body-error", "1")
            .header("x-big", "100")
            .body(Body::from("{}"))
            .unwrap()
    };
    let first = svc.clone().oneshot(call()).await.unwrap();
    assert!(first.into_body().collect().await.is_err(), "the body fails");

    let err = svc.clone().oneshot(call()).await.unwrap_err();
    assert_eq!(kind(&err), RejectionKind::IdempotencyResponseNotStored);
    assert_eq!(app.runs(), 1);
}

/// DEFECT (security/docs): the README's "server stack" identifies callers by `x-api-key` (its
/// rate limit is keyed by it) and adds `IdempotencyLayer::new(MemoryStore::default())` with
/// the comment "Keys scoped by caller". But the default scope reads only `Authorization`:
/// every caller without it (API-key, session-cookie, mTLS clients) shares one anonymous key
/// space. Caller B, who sends caller A's idempotency key and payload, receives A's stored
/// response (A's order id, A's data), without the handler (and its authorization check)
/// running; while A's request runs, B learns from a 409 that the key is in use. The default,
/// unable to tell callers apart, shares rather than refuses.
#[tokio::test(start_paused = true)]
async fn readme_stack_never_replays_one_api_key_callers_response_to_another() {
    let app = App::new();
    let svc = ServiceBuilder::new()
        .layer(RejectionLayer::http())
        .layer(tower_bulwark::RateLimitLayer::keyed(
            tower_bulwark::Quota::per_second(100)
                .unwrap()
                .burst(200)
                .unwrap(),
            tower_bulwark::rate_limit::key::Header::new("x-api-key"),
        ))
        // The README's stack: keys scoped by `Authorization` and `x-api-key`.
        .layer(builder().scope_by_header("x-api-key").build().unwrap())
        .service(app.service());
    let call = |api_key: &'static str| {
        post("order-1")
            .header("x-api-key", api_key)
            .body(Body::from("{\"sku\":42}"))
            .unwrap()
    };
    let a = svc.clone().oneshot(call("key-of-alice")).await.unwrap();
    assert_eq!(a.status(), StatusCode::CREATED);
    let b = svc.clone().oneshot(call("key-of-mallory")).await.unwrap();
    assert!(
        !b.headers().contains_key("idempotent-replayed"),
        "Mallory was replayed Alice's response"
    );
    assert_eq!(app.runs(), 2);
}

/// DEFECT (correctness/docs): `max_response_body` says responses "up to 1 MiB" are kept for
/// replay, but the default `MemoryStore` gives each of its 64 shards a 1 MiB byte budget, and
/// a record that does not fit a shard (body + headers + 96 bytes of bookkeeping) is kept only
/// as "too large to replay". A 1 MiB response under the default layer and store is never
/// replayed: repeats get 409. (And any record of a few hundred KiB evicts every other record
/// of its shard.)
#[tokio::test(start_paused = true)]
async fn response_of_the_documented_limit_is_replayed_with_the_default_store() {
    let app = App::new();
    let svc = IdempotencyLayer::new(store()).layer(app.service());
    let call = || {
        post("big-1")
            .header("x-big", (1usize << 20).to_string())
            .body(Body::from("{}"))
            .unwrap()
    };
    let first = svc.clone().oneshot(call()).await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    assert_eq!(
        first.into_body().collect().await.unwrap().to_bytes().len(),
        1 << 20
    );
    let again = svc.clone().oneshot(call()).await;
    match again {
        Ok(res) => assert_eq!(res.headers()["idempotent-replayed"], "true"),
        Err(e) => panic!("a 1 MiB response was not replayed: {:?}", kind(&e)),
    }
    assert_eq!(app.runs(), 1);
}

/// DEFECT (correctness): a handler slower than `lease_ttl` (60 s by default) loses its lease
/// while it still runs; nothing renews it. A repeat that arrives then claims the key and runs
/// the handler concurrently with the first (and the first's response is then thrown away:
/// `complete` fails with LeaseLost). The docs ask for a lease "longer than the slowest
/// handler", but the lease is sold as protection against a *crashed* owner, and a live owner
/// is not told; the default picks running twice concurrently over refusing.
#[tokio::test(start_paused = true)]
async fn slow_handler_never_runs_twice_concurrently() {
    let app = App::new();
    let svc = builder().build().unwrap().layer(app.service());
    let slow = svc.clone().oneshot(
        post("slow-1")
            .header("x-gate", "1")
            .body(Body::from("{}"))
            .unwrap(),
    );
    let first = tokio::spawn(slow);
    tokio::task::yield_now().await;
    assert_eq!(app.runs(), 1);
    // 61 s pass while the process lives: its timers fire as time goes (one `advance` of 61 s
    // would model a process frozen longer than its lease, which no lease protects).
    for _ in 0..61 {
        tokio::time::advance(Duration::from_secs(1)).await;
        tokio::task::yield_now().await;
    }

    // The client retries: the first is still running.
    let again = svc
        .clone()
        .oneshot(
            post("slow-1")
                .header("x-gate", "1")
                .body(Body::from("{}"))
                .unwrap(),
        )
        .now_or_never();
    let max = app.max_in_flight.load(Ordering::SeqCst);
    app.gate.add_permits(2);
    let _ = first.await;
    drop(again);
    assert_eq!(max, 1, "the handler ran twice at the same time for one key");
}

/// DEFECT (correctness, minor): a request body that fails while the layer reads it (client
/// aborted the upload, malformed chunked encoding) comes out of the layer as a plain error,
/// which `RejectionLayer` answers with **500** (a server failure, which trips breakers and
/// alerts). Without the layer, axum answers a body that cannot be read with 400. Bad input
/// should get a clear client error.
#[tokio::test(start_paused = true)]
async fn broken_request_body_is_a_client_error() {
    let app = App::new();
    let svc = ServiceBuilder::new()
        .layer(RejectionLayer::http())
        .layer(builder().build().unwrap())
        .service(app.service());
    let broken = post("b-1")
        .body(Body::from_stream(futures_util::stream::iter([
            Ok::<_, BoxError>(Bytes::from_static(b"{\"sku\"")),
            Err("client reset the stream".into()),
        ])))
        .unwrap();
    let res = svc.clone().oneshot(broken).await.unwrap();
    assert!(
        res.status().is_client_error(),
        "a broken request body was answered {}",
        res.status()
    );
    assert_eq!(app.runs(), 0);
}

/// DEFECT (correctness, minor): headers named by `Connection` are hop-by-hop and must not be
/// stored; the layer only honours a `Connection` value that is visible ASCII as a whole. One
/// obs-text byte in it (legal in a `HeaderValue`) and every name it lists is stored and
/// replayed.
#[tokio::test(start_paused = true)]
async fn headers_named_by_connection_are_never_replayed() {
    let app = App::new();
    let svc = builder().build().unwrap().layer(app.service());
    let call = || {
        post("c-1")
            .header("x-conn-obs", "1")
            .body(Body::from("{}"))
            .unwrap()
    };
    let first = svc.clone().oneshot(call()).await.unwrap();
    assert_eq!(first.headers()["x-secret"], "per-connection-value");
    let again = svc.clone().oneshot(call()).await.unwrap();
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert!(
        again.headers().get("x-secret").is_none(),
        "a header named by Connection was replayed"
    );
    assert!(again.headers().get("connection").is_none());
}

/// DEFECT (correctness, RedisStore): the docs promise that dropping the response future at
/// any point releases the lease. Dropped while its claim is in flight to Redis (the client
/// went away, a timeout above fired), the future holds no guard yet, but the `SET NX` lease
/// is made in Redis all the same: nobody releases it, and every retry gets 409 until the
/// lease expires (60 s by default).
#[cfg(feature = "redis")]
mod redis_claim_drop {
    use super::*;
    use crate::redis_server::{conn, RedisServer};
    use tower_bulwark::idempotency::RedisStore;

    /// On Redis too, a response over the cap is settled by its body's end: a gRPC failure
    /// releases the key; an end that went well, or a body error (the handler answered: it
    /// ran), records it as not kept.
    #[tokio::test]
    async fn large_response_is_settled_by_its_end_in_redis() {
        let server = server_or_skip!("large_response_is_settled_by_its_end_in_redis");
        let c = conn(&server.url()).await;
        let store = RedisStore::new(c.clone()).prefix("att-big:").unwrap();
        let app = App::new();
        let svc = IdempotencyLayer::builder(store)
            .max_response_body(64)
            .build()
            .unwrap()
            .layer(app.service());
        let call = |key: &str, failing: &str| {
            post(key)
                .header(failing, "1")
                .header("x-big", "100")
                .body(Body::from("{}"))
                .unwrap()
        };
        let failing = "x-grpc-fail";
        let first = svc.clone().oneshot(call(failing, failing)).await.unwrap();
        let _ = first.into_body().collect().await;
        // The release is sent in the background: a client retrying soon may meet the
        // lease still there (409) for a moment, never the record of a completed request.
        let again = past_in_flight(&svc, || call(failing, failing)).await;
        assert!(
            again.is_ok(),
            "{failing}: {:?}",
            again.map(|_| ()).unwrap_err()
        );
        assert_eq!(app.runs(), 2, "the gRPC failure was released and ran again");
        let broken = "x-body-error";
        let first = svc.clone().oneshot(call(broken, broken)).await.unwrap();
        assert!(first.into_body().collect().await.is_err());
        // The record is written in the background as the body fails.
        let err = past_in_flight(&svc, || call(broken, broken))
            .await
            .unwrap_err();
        assert_eq!(kind(&err), RejectionKind::IdempotencyResponseNotStored);
        assert_eq!(app.runs(), 3, "the broken body's key never ran again");
        let ok = svc.clone().oneshot(call("fine", "x-ok")).await.unwrap();
        assert_eq!(
            ok.into_body().collect().await.unwrap().to_bytes().len(),
            100
        );
        // The record is written in the background as the body ends.
        let err = past_in_flight(&svc, || call("fine", "x-ok"))
            .await
            .unwrap_err();
        assert_eq!(kind(&err), RejectionKind::IdempotencyResponseNotStored);
        assert_eq!(app.runs(), 4);
    }

    /// Sends `req()`, again while it gets 409 in flight (for up to half a second).
    async fn past_in_flight<S, B>(svc: &S, req: impl Fn() -> Request<Body>) -> Result<B, BoxError>
    where
        S: Service<Request<Body>, Response = B, Error = BoxError> + Clone,
    {
        let mut res = svc.clone().oneshot(req()).await;
        for _ in 0..50 {
            match &res {
                Err(e) if kind(e) == RejectionKind::IdempotencyInFlight => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    res = svc.clone().oneshot(req()).await;
                }
                _ => break,
            }
        }
        res
    }

    #[tokio::test]
    async fn dropped_while_claiming_leaves_no_lease_in_redis() {
        let server = server_or_skip!("dropped_while_claiming_leaves_no_lease_in_redis");
        let c = conn(&server.url()).await;
        let store = RedisStore::new(c.clone())
            .timeout(Duration::from_secs(2))
            .unwrap()
            .prefix("att:")
            .unwrap();
        let app = App::new();
        let svc = IdempotencyLayer::new(store).layer(app.service());
        // Load the claim script first, so that the first command of a claim is the claim.
        let warm = svc.clone().oneshot(req("warm-up", "{}")).await.unwrap();
        assert_eq!(warm.status(), StatusCode::CREATED);

        {
            let mut s = svc.clone();
            let mut fut = pin!(s.call(req("r-1", "{}")));
            // Read the body and send the claim; the client goes away while the reply is on
            // its way (redis-rs skips a command whose caller left before it was written, so
            // give the connection time to write it).
            assert!(poll_once(fut.as_mut()).is_pending());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Let Redis run the claim that was sent.
        tokio::time::sleep(Duration::from_millis(200)).await;

        let again = svc.clone().oneshot(req("r-1", "{}")).await;
        if let Err(e) = &again {
            panic!(
                "the retry after a dropped request was refused: {:?}",
                kind(e)
            );
        }
        assert_eq!(app.runs(), 2);
    }
}

// ---------------------------------------------------------------------------------------------
// Attacks that held
// ---------------------------------------------------------------------------------------------

fn scope_probe(
    headers_a: &[(&str, &[u8])],
    headers_b: &[(&str, &[u8])],
) -> impl Future<Output = (StatusCode, bool, usize)> {
    let mk = |hs: &[(&str, &[u8])]| {
        let mut b = post("shared-key");
        for (k, v) in hs {
            b = b.header(*k, HeaderValue::from_bytes(v).unwrap());
        }
        b.body(Body::from("{}")).unwrap()
    };
    let (a, b) = (mk(headers_a), mk(headers_b));
    async move {
        let app = App::new();
        let svc = builder().build().unwrap().layer(app.service());
        let first = svc.clone().oneshot(a).await.unwrap();
        assert_eq!(first.status(), StatusCode::CREATED);
        let res = svc.clone().oneshot(b).await.unwrap();
        let replayed = res.headers().contains_key("idempotent-replayed");
        (res.status(), replayed, app.runs())
    }
}

/// Two callers whose `Authorization` header values might collide in the scope digest: split
/// across values, reordered, case, whitespace, empty, none, `Proxy-Authorization`. None is
/// replayed the other's response.
#[tokio::test(start_paused = true)]
async fn held_authorization_variants_never_share_a_scope() {
    type Headers<'a> = Vec<(&'a str, &'a [u8])>;
    let cases: Vec<(Headers<'_>, Headers<'_>)> = vec![
        (
            vec![("authorization", b"a"), ("authorization", b"b")],
            vec![("authorization", b"a, b")],
        ),
        (
            vec![("authorization", b"a"), ("authorization", b"b")],
            vec![("authorization", b"ab")],
        ),
        (
            vec![("authorization", b"a"), ("authorization", b"b")],
            vec![("authorization", b"b"), ("authorization", b"a")],
        ),
        (
            vec![("authorization", b"Bearer x")],
            vec![("authorization", b"bearer x")],
        ),
        (
            vec![("authorization", b"Bearer x")],
            vec![("authorization", b"Bearer  x")],
        ),
        // (An empty `Authorization` is no credentials: anonymous, as without the header;
        // `an_empty_authorization_is_counted_as_anonymous` checks it.)
        (
            vec![("authorization", b"x")],
            vec![("proxy-authorization", b"x")],
        ),
        (
            vec![("authorization", b"x")],
            vec![("x-authorization", b"x")],
        ),
        (
            vec![("authorization", b"caf\xe9")],
            vec![("authorization", b"caf\xc3\xa9")],
        ),
    ];
    for (a, b) in cases {
        let (status, replayed, runs) = scope_probe(&a, &b).await;
        assert_eq!(status, StatusCode::CREATED, "{a:?} / {b:?}");
        assert!(!replayed, "{a:?} / {b:?}");
        assert_eq!(runs, 2, "{a:?} / {b:?}");
        let (_, replayed, runs) = scope_probe(&b, &a).await;
        assert!(!replayed && runs == 2, "{b:?} / {a:?}");
    }
}

/// A stranger with another key space learns nothing from status, headers or body: it gets
/// what a fresh key gets, while the owner's request is in flight or completed, and with another
/// payload.
#[tokio::test(start_paused = true)]
async fn held_stranger_sees_a_fresh_key() {
    let app = App::new();
    let svc = ServiceBuilder::new()
        .layer(RejectionLayer::http())
        .layer(builder().build().unwrap())
        .service(app.service());
    let owner = post("k")
        .header("authorization", "Bearer owner")
        .header("x-gate", "1")
        .body(Body::from("{}"))
        .unwrap();
    let owner = tokio::spawn(svc.clone().oneshot(owner));
    tokio::task::yield_now().await;
    for (who, body) in [
        ("Bearer stranger", "{}"),
        ("Bearer stranger-b", "{\"other\":1}"),
    ] {
        let r = post("k")
            .header("authorization", who)
            .body(Body::from(body))
            .unwrap();
        let res = svc.clone().oneshot(r).await.unwrap();
        assert_eq!(res.status(), StatusCode::CREATED);
        assert!(!res.headers().contains_key("idempotent-replayed"));
    }
    app.gate.add_permits(1);
    owner.await.unwrap().unwrap();
    let r = post("k")
        .header("authorization", "Bearer stranger2")
        .body(Body::from("{\"x\":2}"))
        .unwrap();
    let res = svc.clone().oneshot(r).await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
}

/// Key validation bypasses: control characters, non-ASCII, 256 characters, two headers with
/// different values, a comma-joined pair, an empty quoted string: each 400, never a run.
#[tokio::test(start_paused = true)]
async fn held_key_validation() {
    let app = App::new();
    let svc = ServiceBuilder::new()
        .layer(RejectionLayer::http())
        .layer(builder().build().unwrap())
        .service(app.service());
    let long = "k".repeat(256);
    let bad: Vec<Vec<&[u8]>> = vec![
        vec![b"a\tb"],
        vec![b"caf\xc3\xa9"],
        vec![long.as_bytes()],
        vec![b"a", b"b"],
        vec![b"a", b"a"],
        vec![b"a, b"],
        vec![b"\"\""],
        vec![b"\"a"],
        vec![b"\"a\\nb\""],
        vec![b"\"a\";p=1"],
    ];
    for values in bad {
        let mut b = Request::post("/orders");
        for v in &values {
            b = b.header("idempotency-key", HeaderValue::from_bytes(v).unwrap());
        }
        let res = svc
            .clone()
            .oneshot(b.body(Body::from("{}")).unwrap())
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::BAD_REQUEST, "{values:?}");
    }
    assert_eq!(app.runs(), 0);
}

/// Fingerprint: another query string, a trailing slash, an encoded path, another method, a
/// longer body are all other payloads (422); the same body in other chunks is the same.
#[tokio::test(start_paused = true)]
async fn held_fingerprint() {
    let app = App::new();
    let svc = ServiceBuilder::new()
        .layer(RejectionLayer::http())
        .layer(builder().build().unwrap())
        .service(app.service());
    let first = Request::post("/orders?a=1")
        .header("idempotency-key", "fp")
        .body(Body::from("{\"q\":1}"))
        .unwrap();
    assert_eq!(
        svc.clone().oneshot(first).await.unwrap().status(),
        StatusCode::CREATED
    );
    for (m, uri, body) in [
        ("POST", "/orders?a=2", "{\"q\":1}"),
        ("POST", "/orders/?a=1", "{\"q\":1}"),
        ("POST", "/%6Frders?a=1", "{\"q\":1}"),
        ("POST", "/orders?a=1", "{\"q\":1}\0"),
        ("PATCH", "/orders?a=1", "{\"q\":1}"),
    ] {
        let r = Request::builder()
            .method(m)
            .uri(uri)
            .header("idempotency-key", "fp")
            .body(Body::from(body))
            .unwrap();
        let res = svc.clone().oneshot(r).await.unwrap();
        assert_eq!(
            res.status(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "{m} {uri} {body:?}"
        );
    }
    let chunks = futures_util::stream::iter(
        ["{\"", "q\"", ":1", "}"].map(|s| Ok::<_, BoxError>(Bytes::from_static(s.as_bytes()))),
    );
    let r = Request::post("http://other-host/orders?a=1")
        .header("idempotency-key", "fp")
        .body(Body::from_stream(chunks))
        .unwrap();
    let res = svc.clone().oneshot(r).await.unwrap();
    assert_eq!(res.headers()["idempotent-replayed"], "true");
    assert_eq!(app.runs(), 1);

    // Over the request body limit, by declaration or by stream: 413, never run.
    let svc = ServiceBuilder::new()
        .layer(RejectionLayer::http())
        .layer(builder().max_request_body(8).build().unwrap())
        .service(app.service());
    let r = post("big")
        .body(Body::from_stream(futures_util::stream::iter(
            [b"12345", b"67890"].map(|b| Ok::<_, BoxError>(Bytes::from_static(b))),
        )))
        .unwrap();
    let res = svc.clone().oneshot(r).await.unwrap();
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(app.runs(), 1);
}

/// A handler that panics: once the panic is caught above, the key is not stuck. By default
/// (the handler may have had its effect before it panicked) it is refused until the lease
/// expires, then runs; with `release_on_drop(true)` it is free at once.
#[tokio::test(start_paused = true)]
async fn held_handler_panic_releases_the_key() {
    let app = App::new();
    let lease = Duration::from_secs(5);
    let svc = builder()
        .lease_ttl(lease)
        .build()
        .unwrap()
        .layer(app.service());
    let panics = || {
        post("p-1")
            .header("x-panic", "1")
            .body(Body::from("{}"))
            .unwrap()
    };
    let caught = std::panic::AssertUnwindSafe(svc.clone().oneshot(panics()))
        .catch_unwind()
        .await;
    assert!(caught.is_err());
    let err = svc.clone().oneshot(req("p-1", "{}")).await.unwrap_err();
    assert_eq!(kind(&err), RejectionKind::IdempotencyInFlight);
    tokio::time::advance(lease).await;
    let res = svc.clone().oneshot(req("p-1", "{}")).await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(app.runs(), 2);

    let svc = builder()
        .release_on_drop(true)
        .build()
        .unwrap()
        .layer(app.service());
    let caught = std::panic::AssertUnwindSafe(svc.clone().oneshot(panics()))
        .catch_unwind()
        .await;
    assert!(caught.is_err());
    let res = svc.clone().oneshot(req("p-1", "{}")).await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(app.runs(), 4);
}

/// A response body that fails midway under the cap: the partial body is never replayed, and
/// since the handler answered (it ran) the key is recorded as completed, not kept: the retry
/// is refused with 409, never run again.
#[tokio::test(start_paused = true)]
async fn held_partial_body_is_never_replayed() {
    let app = App::new();
    let svc = builder().build().unwrap().layer(app.service());
    let call = || {
        post("pb-1")
            .header("x-body-error", "1")
            .body(Body::from("{}"))
            .unwrap()
    };
    let first = svc.clone().oneshot(call()).await;
    // The head may reach the client before the body fails, or the error itself.
    if let Ok(res) = first {
        assert!(res.into_body().collect().await.is_err());
    }
    let err = svc.clone().oneshot(req("pb-1", "{}")).await.unwrap_err();
    assert_eq!(kind(&err), RejectionKind::IdempotencyResponseNotStored);
    assert_eq!(app.runs(), 1);
}

/// A request dropped during the handler: with `release_on_drop(true)` the key is free at once
/// (by default it is kept until the lease expires: `a_retry_after_the_client_gave_up_mid_handler_
/// does_not_run_it_again`), and a repeat never runs concurrently with a live first request
/// (409).
#[tokio::test(start_paused = true)]
async fn held_in_flight_repeat_is_409_and_drop_frees() {
    let app = App::new();
    let svc = ServiceBuilder::new()
        .layer(RejectionLayer::http())
        .layer(builder().release_on_drop(true).build().unwrap())
        .service(app.service());
    let gated = || {
        post("if-1")
            .header("x-gate", "1")
            .body(Body::from("{}"))
            .unwrap()
    };
    let first = tokio::spawn(svc.clone().oneshot(gated()));
    tokio::task::yield_now().await;
    let res = svc.clone().oneshot(req("if-1", "{}")).await.unwrap();
    assert_eq!(res.status(), StatusCode::CONFLICT);
    first.abort();
    let _ = first.await;
    let res = svc.clone().oneshot(req("if-1", "{}")).await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(app.max_in_flight.load(Ordering::SeqCst), 1);
}

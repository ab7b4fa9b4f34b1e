//! Behaviour of the idempotency layer over a counting handler.

use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use tokio::sync::Semaphore;
use tower::{BoxError, Layer, Service, ServiceBuilder, ServiceExt};
use tower_bulwark::clock::Clock;
use tower_bulwark::idempotency::{
    ConfigError, FailurePolicy, IdempotencyBuilder, IdempotencyHandle, IdempotencyLayer,
    MemoryStore, ReplayBody,
};
use tower_bulwark::respond::RejectionBody;
use tower_bulwark::{Rejection, RejectionKind, RejectionLayer};

/// A handler that counts its runs; request headers steer it:
/// `x-status` (status to answer), `x-gate` (wait for a permit of the gate first),
/// `x-fail` (answer with an error), `x-big: N` (an N-byte body), `x-cookie` (set a cookie),
/// `x-stall-body` (a body that never ends after its first chunk).
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
                let n = app.runs.fetch_add(1, Ordering::SeqCst) + 1;
                let h = req.headers().clone();
                if h.contains_key("x-gate") {
                    app.gate.acquire().await.unwrap().forget();
                }
                if h.contains_key("x-fail") {
                    return Err::<Response<Body>, BoxError>("handler failed".into());
                }
                let body = req.into_body().collect().await?.to_bytes();
                let status = h
                    .get("x-status")
                    .map(|v| v.to_str().unwrap().parse::<u16>().unwrap())
                    .unwrap_or(201);
                let out: Body = if let Some(n) = h.get("x-big") {
                    let n: usize = n.to_str().unwrap().parse().unwrap();
                    Body::from(vec![b'x'; n])
                } else if h.contains_key("x-stall-body") {
                    let first =
                        futures_util::stream::iter([Ok::<_, BoxError>(Bytes::from("partial"))]);
                    Body::from_stream(futures_util::StreamExt::chain(
                        first,
                        futures_util::stream::pending(),
                    ))
                } else {
                    Body::from(format!(
                        "{{\"run\":{n},\"echo\":{:?}}}",
                        String::from_utf8_lossy(&body)
                    ))
                };
                let mut res = Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .header("x-run", n.to_string())
                    .header("x-multi", "a")
                    .header("x-multi", "b");
                if h.contains_key("x-cookie") {
                    res = res.header("set-cookie", "session=secret");
                }
                Ok(res.body(out).unwrap())
            }
        })
    }
}

fn post(key: &str, body: &'static str) -> http::request::Builder {
    let _ = body;
    Request::post("/orders?x=1").header("idempotency-key", key)
}

fn req(key: &str, body: &'static str) -> Request<Body> {
    post(key, body).body(Body::from(body)).unwrap()
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

/// `layer` around the app, its rejections answered as HTTP responses; and the layer's handle.
fn answered(
    layer: IdempotencyLayer<MemoryStore>,
    app: &App,
) -> (
    impl Service<
            Request<Body>,
            Response = Response<RejectionBody<ReplayBody<Body>>>,
            Error = std::convert::Infallible,
            Future: Send,
        > + Clone
        + Send
        + 'static,
    IdempotencyHandle,
) {
    let handle = layer.handle();
    let svc = ServiceBuilder::new()
        .layer(RejectionLayer::http())
        .layer(layer)
        .service(app.service());
    (svc, handle)
}

async fn body_of(res: Response<ReplayBody<Body>>) -> Bytes {
    res.into_body().collect().await.unwrap().to_bytes()
}

fn kind(err: &BoxError) -> RejectionKind {
    Rejection::find(&**err).expect("a rejection").kind()
}

#[tokio::test(start_paused = true)]
async fn first_runs_repeat_replays_identically() {
    let app = App::new();
    let svc = ServiceBuilder::new()
        .layer(builder().build().unwrap())
        .service(app.service());
    let first = svc.clone().oneshot(req("k1", "{\"sku\":1}")).await.unwrap();
    let again = svc.clone().oneshot(req("k1", "{\"sku\":1}")).await.unwrap();
    assert_eq!(app.runs(), 1);
    assert_eq!(first.status(), StatusCode::CREATED);
    assert_eq!(again.status(), first.status());
    assert!(first.headers().get("idempotent-replayed").is_none());
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let mut replayed_headers = again.headers().clone();
    replayed_headers.remove("idempotent-replayed");
    assert_eq!(&replayed_headers, first.headers());
    let multi: Vec<_> = again.headers().get_all("x-multi").iter().collect();
    assert_eq!(multi, ["a", "b"]);
    let (b1, b2) = (body_of(first).await, body_of(again).await);
    assert_eq!(b1, b2);
    assert!(std::str::from_utf8(&b1).unwrap().contains("\"run\":1"));
}

#[tokio::test(start_paused = true)]
async fn quoted_and_bare_keys_are_one_key() {
    let app = App::new();
    let svc = builder().build().unwrap().layer(app.service());
    let a = svc.clone().oneshot(req("\"abc\"", "x")).await.unwrap();
    let b = svc.clone().oneshot(req("abc", "x")).await.unwrap();
    assert_eq!(app.runs(), 1);
    assert!(a.headers().get("idempotent-replayed").is_none());
    assert_eq!(b.headers()["idempotent-replayed"], "true");
}

#[tokio::test(start_paused = true)]
async fn set_cookie_is_not_replayed() {
    let app = App::new();
    let svc = builder().build().unwrap().layer(app.service());
    let r = || {
        post("c", "x")
            .header("x-cookie", "1")
            .body(Body::from("x"))
            .unwrap()
    };
    let first = svc.clone().oneshot(r()).await.unwrap();
    let again = svc.clone().oneshot(r()).await.unwrap();
    assert_eq!(first.headers()["set-cookie"], "session=secret");
    assert!(again.headers().get("set-cookie").is_none());
    assert_eq!(again.headers()["idempotent-replayed"], "true");
}

#[tokio::test(start_paused = true)]
async fn another_payload_with_the_same_key_is_422() {
    let app = App::new();
    let svc = ServiceBuilder::new()
        .layer(RejectionLayer::http())
        .layer(builder().build().unwrap())
        .service(app.service());
    let first = svc.clone().oneshot(req("k", "{\"qty\":1}")).await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    let other = svc.clone().oneshot(req("k", "{\"qty\":2}")).await.unwrap();
    assert_eq!(other.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(other.headers()["content-type"], "application/problem+json");
    let other_path = Request::post("/refunds?x=1")
        .header("idempotency-key", "k")
        .body(Body::from("{\"qty\":1}"))
        .unwrap();
    let res = svc.clone().oneshot(other_path).await.unwrap();
    assert_eq!(res.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(app.runs(), 1);
}

#[tokio::test(start_paused = true)]
async fn malformed_keys_are_400_and_never_run() {
    let app = App::new();
    let (svc, handle) = answered(builder().build().unwrap(), &app);
    let long = "k".repeat(256);
    let bad: Vec<HeaderValue> = vec![
        HeaderValue::from_static(""),
        HeaderValue::from_static("\"\""),
        HeaderValue::from_str(&long).unwrap(),
        HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap(),
        HeaderValue::from_bytes(b"a\tb").unwrap(),
        HeaderValue::from_static("two words"),
    ];
    for v in bad {
        let r = Request::post("/orders")
            .header("idempotency-key", v.clone())
            .body(Body::from("x"))
            .unwrap();
        let res = svc.clone().oneshot(r).await.unwrap();
        assert_eq!(res.status(), StatusCode::BAD_REQUEST, "{v:?}");
        let body = res.into_body().collect().await.unwrap().to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            json["type"],
            "tag:tower-bulwark,2026:idempotency-key-invalid"
        );
    }
    let two = Request::post("/orders")
        .header("idempotency-key", "a")
        .header("idempotency-key", "a")
        .body(Body::from("x"))
        .unwrap();
    assert_eq!(
        svc.clone().oneshot(two).await.unwrap().status(),
        StatusCode::BAD_REQUEST
    );
    // 255 characters is still a key.
    let ok = Request::post("/orders")
        .header("idempotency-key", "k".repeat(255))
        .body(Body::from("x"))
        .unwrap();
    assert_eq!(
        svc.clone().oneshot(ok).await.unwrap().status(),
        StatusCode::CREATED
    );
    assert_eq!(app.runs(), 1);
    assert_eq!(handle.stats().invalid_keys, 7);
}

#[tokio::test(start_paused = true)]
async fn missing_key_passes_through_unless_required() {
    let app = App::new();
    let loose = builder().build().unwrap().layer(app.service());
    let plain = || Request::post("/orders").body(Body::from("x")).unwrap();
    loose.clone().oneshot(plain()).await.unwrap();
    loose.clone().oneshot(plain()).await.unwrap();
    assert_eq!(app.runs(), 2);

    let strict = builder().required().build().unwrap().layer(app.service());
    let err = strict.clone().oneshot(plain()).await.unwrap_err();
    assert_eq!(kind(&err), RejectionKind::IdempotencyKeyMissing);
    // Methods the layer does not apply to pass through even when required.
    let get = Request::get("/orders").body(Body::empty()).unwrap();
    strict.clone().oneshot(get).await.unwrap();
    assert_eq!(app.runs(), 3);
}

#[tokio::test(start_paused = true)]
async fn other_methods_are_not_replayed() {
    let app = App::new();
    let svc = builder().build().unwrap().layer(app.service());
    for _ in 0..2 {
        let r = Request::put("/orders/1")
            .header("idempotency-key", "k")
            .body(Body::from("x"))
            .unwrap();
        let res = svc.clone().oneshot(r).await.unwrap();
        assert!(res.headers().get("idempotent-replayed").is_none());
    }
    assert_eq!(app.runs(), 2);
    let svc = builder()
        .methods([http::Method::PUT])
        .build()
        .unwrap()
        .layer(app.service());
    for _ in 0..2 {
        let r = Request::put("/orders/1")
            .header("idempotency-key", "k")
            .body(Body::from("x"))
            .unwrap();
        svc.clone().oneshot(r).await.unwrap();
    }
    assert_eq!(app.runs(), 3);
}

#[tokio::test(start_paused = true)]
async fn oversized_body_is_413_and_never_runs() {
    let app = App::new();
    let (svc, handle) = answered(builder().max_request_body(16).build().unwrap(), &app);
    // Known length.
    let r = req("big", "0123456789abcdefX");
    assert_eq!(
        svc.clone().oneshot(r).await.unwrap().status(),
        StatusCode::PAYLOAD_TOO_LARGE
    );
    // Streamed, no length: found while buffering.
    let chunks = futures_util::stream::iter(
        ["0123456789", "abcdefX"].map(|s| Ok::<_, BoxError>(Bytes::from(s))),
    );
    let r = post("big2", "").body(Body::from_stream(chunks)).unwrap();
    assert_eq!(
        svc.clone().oneshot(r).await.unwrap().status(),
        StatusCode::PAYLOAD_TOO_LARGE
    );
    // At the limit is fine, and the handler sees the body unchanged.
    let r = req("fits", "0123456789abcdef");
    let res = svc.clone().oneshot(r).await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert!(std::str::from_utf8(&body)
        .unwrap()
        .contains("\"echo\":\"0123456789abcdef\""));
    assert_eq!(app.runs(), 1);
    assert_eq!(handle.stats().too_large, 2);
}

#[tokio::test(start_paused = true)]
async fn streamed_body_reaches_the_handler_whole() {
    let app = App::new();
    let svc = builder().build().unwrap().layer(app.service());
    let chunks = futures_util::stream::iter(["{\"a\":", "1,", "\"b\":2}"].map(Ok::<_, BoxError>));
    let r = post("s", "").body(Body::from_stream(chunks)).unwrap();
    let body = body_of(svc.clone().oneshot(r).await.unwrap()).await;
    assert!(std::str::from_utf8(&body)
        .unwrap()
        .contains(r#""echo":"{\"a\":1,\"b\":2}""#));
    // The same payload in one chunk is the same request.
    let again = svc
        .clone()
        .oneshot(req("s", "{\"a\":1,\"b\":2}"))
        .await
        .unwrap();
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(app.runs(), 1);
}

#[tokio::test(start_paused = true)]
async fn tenants_never_see_each_others_responses() {
    let app = App::new();
    let svc = builder()
        .scope(|head: &http::request::Parts| {
            head.headers
                .get("x-tenant")
                .map(|v| v.as_bytes().to_vec())
                .unwrap_or_default()
        })
        .build()
        .unwrap()
        .layer(app.service());
    let as_tenant = |t: &'static str| {
        post("shared-key", "{}")
            .header("x-tenant", t)
            .body(Body::from("{}"))
            .unwrap()
    };
    let a = svc.clone().oneshot(as_tenant("a")).await.unwrap();
    let b = svc.clone().oneshot(as_tenant("b")).await.unwrap();
    assert_eq!(app.runs(), 2);
    assert!(b.headers().get("idempotent-replayed").is_none());
    assert_eq!(a.headers()["x-run"], "1");
    assert_eq!(b.headers()["x-run"], "2");
    let a2 = svc.clone().oneshot(as_tenant("a")).await.unwrap();
    assert_eq!(a2.headers()["x-run"], "1");
    assert_eq!(a2.headers()["idempotent-replayed"], "true");
    assert_eq!(app.runs(), 2);
}

async fn sixty_four(wait: bool) {
    let app = App::new();
    let mut b = builder();
    if wait {
        b = b.wait_for_in_flight(Duration::from_secs(5));
    }
    let (svc, handle) = answered(b.build().unwrap(), &app);
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let svc = svc.clone();
            tokio::spawn(async move {
                let r = post("same", "{}")
                    .header("x-gate", "1")
                    .body(Body::from("{}"))
                    .unwrap();
                let res = svc.oneshot(r).await.unwrap();
                let status = res.status();
                let replayed = res.headers().contains_key("idempotent-replayed");
                let body = res.into_body().collect().await.unwrap().to_bytes();
                (status, replayed, body)
            })
        })
        .collect();
    // Let every task reach the layer while the first holds the key.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(app.runs(), 1);
    app.gate.add_permits(1);
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    assert_eq!(app.runs(), 1, "the handler ran exactly once");
    let created: Vec<_> = out
        .iter()
        .filter(|(s, _, _)| *s == StatusCode::CREATED)
        .collect();
    if wait {
        assert_eq!(created.len(), 64);
        assert_eq!(created.iter().filter(|(_, r, _)| *r).count(), 63);
        assert!(created.iter().all(|(_, _, b)| *b == created[0].2));
        assert_eq!(handle.stats().replayed, 63);
    } else {
        assert_eq!(created.len(), 1);
        let conflicts = out
            .iter()
            .filter(|(s, _, _)| *s == StatusCode::CONFLICT)
            .count();
        assert_eq!(conflicts, 63);
        assert_eq!(handle.stats().in_flight_rejected, 63);
    }
}

#[tokio::test(start_paused = true)]
async fn sixty_four_concurrent_one_key_runs_once_others_409() {
    sixty_four(false).await;
}

#[tokio::test(start_paused = true)]
async fn sixty_four_concurrent_one_key_runs_once_others_wait_and_replay() {
    sixty_four(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_on_two_threads_runs_once() {
    let app = App::new();
    let layer = IdempotencyLayer::new(MemoryStore::default());
    let handle = layer.handle();
    let svc = layer.layer(app.service());
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let svc = svc.clone();
            tokio::spawn(async move {
                let r = post("same", "{}")
                    .header("x-gate", "1")
                    .body(Body::from("{}"))
                    .unwrap();
                svc.oneshot(r).await
            })
        })
        .collect();
    // Open the gate once the 63 repeats have been refused (no sleeping: yield until then).
    let mut spins = 0u64;
    while handle.stats().in_flight_rejected < 63 {
        tokio::task::yield_now().await;
        spins += 1;
        assert!(spins < 50_000_000, "repeats were not refused");
    }
    app.gate.add_permits(1);
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(res) => {
                assert_eq!(res.status(), StatusCode::CREATED);
                ok += 1;
            }
            Err(e) => assert_eq!(kind(&e), RejectionKind::IdempotencyInFlight),
        }
    }
    assert_eq!(ok, 1);
    assert_eq!(app.runs(), 1);
}

#[tokio::test(start_paused = true)]
async fn waiting_repeat_gives_up_with_409_after_max() {
    let app = App::new();
    let svc = builder()
        .wait_for_in_flight(Duration::from_millis(300))
        .build()
        .unwrap()
        .layer(app.service());
    let gated = || {
        post("w", "{}")
            .header("x-gate", "1")
            .body(Body::from("{}"))
            .unwrap()
    };
    let first = tokio::spawn(svc.clone().oneshot(gated()));
    tokio::time::sleep(Duration::from_millis(1)).await;
    let start = tokio::time::Instant::now();
    let err = svc.clone().oneshot(gated()).await.unwrap_err();
    assert_eq!(kind(&err), RejectionKind::IdempotencyInFlight);
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_millis(350),
        "{waited:?}"
    );
    app.gate.add_permits(1);
    assert_eq!(first.await.unwrap().unwrap().status(), StatusCode::CREATED);
    assert_eq!(app.runs(), 1);
}

#[tokio::test(start_paused = true)]
async fn waiting_repeat_runs_itself_when_the_first_fails() {
    let app = App::new();
    let svc = builder()
        .wait_for_in_flight(Duration::from_secs(1))
        .build()
        .unwrap()
        .layer(app.service());
    let first = post("f", "{}")
        .header("x-gate", "1")
        .header("x-status", "503")
        .body(Body::from("{}"))
        .unwrap();
    let first = tokio::spawn(svc.clone().oneshot(first));
    tokio::time::sleep(Duration::from_millis(1)).await;
    let second = tokio::spawn(svc.clone().oneshot(req("f", "{}")));
    tokio::time::sleep(Duration::from_millis(50)).await;
    app.gate.add_permits(1);
    let a = first.await.unwrap().unwrap();
    let b = second.await.unwrap().unwrap();
    assert_eq!(a.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(b.status(), StatusCode::CREATED);
    assert!(b.headers().get("idempotent-replayed").is_none());
    assert_eq!(app.runs(), 2);
}

#[tokio::test(start_paused = true)]
async fn failures_are_not_stored_and_the_key_can_retry() {
    let app = App::new();
    let layer = builder().build().unwrap();
    let handle = layer.handle();
    let svc = layer.layer(app.service());
    for status in ["500", "503", "429"] {
        let r = post("retry-me", "{}")
            .header("x-status", status)
            .body(Body::from("{}"))
            .unwrap();
        let res = svc.clone().oneshot(r).await.unwrap();
        assert_eq!(res.status().as_str(), status);
    }
    let ok = svc.clone().oneshot(req("retry-me", "{}")).await.unwrap();
    assert_eq!(ok.status(), StatusCode::CREATED);
    assert!(ok.headers().get("idempotent-replayed").is_none());
    assert_eq!(app.runs(), 4);
    assert_eq!(handle.stats().not_stored, 3);
    // An error of the handler (not a refusal of a layer below: it may have had its effect)
    // records the key as run, its response not kept: never run again.
    let failing = || {
        post("err-1", "{}")
            .header("x-fail", "1")
            .body(Body::from("{}"))
            .unwrap()
    };
    assert!(svc.clone().oneshot(failing()).await.is_err());
    let err = svc.clone().oneshot(failing()).await.unwrap_err();
    assert_eq!(kind(&err), RejectionKind::IdempotencyResponseNotStored);
    assert_eq!(app.runs(), 5);
    // Unless asked to release on errors.
    let releasing = builder()
        .release_on_error(true)
        .build()
        .unwrap()
        .layer(app.service());
    assert!(releasing.clone().oneshot(failing()).await.is_err());
    let ok = releasing.clone().oneshot(req("err-1", "{}")).await.unwrap();
    assert_eq!(ok.status(), StatusCode::CREATED);
    assert_eq!(app.runs(), 7);
    // A 4xx other than 429 is the request's fault: stored like a success.
    let r = || {
        post("bad-input", "{}")
            .header("x-status", "400")
            .body(Body::from("{}"))
            .unwrap()
    };
    svc.clone().oneshot(r()).await.unwrap();
    let again = svc.clone().oneshot(r()).await.unwrap();
    assert_eq!(again.status(), StatusCode::BAD_REQUEST);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
}

#[tokio::test(start_paused = true)]
async fn failures_stored_when_asked() {
    let app = App::new();
    let svc = builder()
        .store_failures(true)
        .build()
        .unwrap()
        .layer(app.service());
    let r = || {
        post("k", "{}")
            .header("x-status", "500")
            .body(Body::from("{}"))
            .unwrap()
    };
    svc.clone().oneshot(r()).await.unwrap();
    let again = svc.clone().oneshot(r()).await.unwrap();
    assert_eq!(again.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(app.runs(), 1);
}

#[tokio::test(start_paused = true)]
async fn too_large_response_passes_whole_and_is_never_run_again() {
    let app = App::new();
    let (svc, handle) = answered(builder().max_response_body(64).build().unwrap(), &app);
    let r = || {
        post("big", "{}")
            .header("x-big", "1000")
            .body(Body::from("{}"))
            .unwrap()
    };
    let first = svc.clone().oneshot(r()).await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    let body = first.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body.len(), 1000);
    assert!(body.iter().all(|b| *b == b'x'));
    let again = svc.clone().oneshot(r()).await.unwrap();
    assert_eq!(again.status(), StatusCode::CONFLICT);
    let body = again.into_body().collect().await.unwrap().to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        json["type"],
        "tag:tower-bulwark,2026:idempotency-response-not-stored"
    );
    assert_eq!(app.runs(), 1);
    let stats = handle.stats();
    assert_eq!(stats.executed, 1);
    assert_eq!(stats.replayed, 0, "nothing was replayed");
    assert_eq!(stats.unreplayable, 1);
}

#[tokio::test(start_paused = true)]
async fn record_expires_after_ttl() {
    let app = App::new();
    let svc = builder()
        .ttl(Duration::from_secs(10))
        .build()
        .unwrap()
        .layer(app.service());
    svc.clone().oneshot(req("t", "{}")).await.unwrap();
    tokio::time::advance(Duration::from_secs(9)).await;
    let replay = svc.clone().oneshot(req("t", "{}")).await.unwrap();
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    tokio::time::advance(Duration::from_secs(2)).await;
    let fresh = svc.clone().oneshot(req("t", "{}")).await.unwrap();
    assert!(fresh.headers().get("idempotent-replayed").is_none());
    assert_eq!(app.runs(), 2);
}

#[tokio::test(start_paused = true)]
async fn ttl_changed_at_run_time() {
    let app = App::new();
    let layer = builder().build().unwrap();
    let handle = layer.handle();
    assert_eq!(handle.ttl(), Duration::from_secs(86_400));
    assert_eq!(
        handle.set_ttl(Duration::ZERO),
        Err(ConfigError::Zero("ttl"))
    );
    handle.set_ttl(Duration::from_secs(1)).unwrap();
    let svc = layer.layer(app.service());
    svc.clone().oneshot(req("t", "{}")).await.unwrap();
    tokio::time::advance(Duration::from_secs(2)).await;
    svc.clone().oneshot(req("t", "{}")).await.unwrap();
    assert_eq!(app.runs(), 2);
    assert_eq!(handle.stats().executed, 2);
}

/// Polls `fut` once with a no-op waker.
fn poll_once<F: Future>(fut: std::pin::Pin<&mut F>) -> Poll<F::Output> {
    fut.poll(&mut Context::from_waker(Waker::noop()))
}

#[tokio::test(start_paused = true)]
async fn dropped_first_request_frees_the_key_at_every_await_point() {
    let app = App::new();
    // Releasing on drop is an opt-in (by default a request dropped in its handler keeps its
    // lease until it expires: `a_retry_after_the_client_gave_up_mid_handler_does_not_run_it_
    // again`); this is what it frees, and what it never frees.
    let layer = builder().release_on_drop(true).build().unwrap();
    let store = layer.store().clone();
    let svc = layer.layer(app.service());

    // 1. Dropped in the handler.
    {
        let mut s = svc.clone();
        let gated = post("d1", "{}")
            .header("x-gate", "1")
            .body(Body::from("{}"))
            .unwrap();
        let mut fut = pin!(s.call(gated));
        assert!(poll_once(fut.as_mut()).is_pending());
        assert_eq!(store.stats().entries, 1, "the lease is held");
    }
    assert_eq!(store.stats().entries, 0, "dropped in the handler: released");

    // 2. Dropped while reading the request body.
    {
        let mut s = svc.clone();
        let stalled = post("d2", "")
            .body(Body::from_stream(futures_util::stream::pending::<
                Result<Bytes, BoxError>,
            >()))
            .unwrap();
        let mut fut = pin!(s.call(stalled));
        assert!(poll_once(fut.as_mut()).is_pending());
    }
    assert_eq!(store.stats().entries, 0);

    // 3. Dropped while its response body streams: the handler has answered, so the key is
    // kept (as completed, its response not kept), never released to run twice. (A body that
    // is not ready at once is handed on as it streams: the future is ready with the head.)
    {
        let mut s = svc.clone();
        let r = post("d3", "{}")
            .header("x-stall-body", "1")
            .body(Body::from("{}"))
            .unwrap();
        let mut fut = pin!(s.call(r));
        let Poll::Ready(Ok(res)) = poll_once(fut.as_mut()) else {
            panic!("a streamed response's head is handed on at once");
        };
        assert_eq!(store.stats().entries, 1);
        drop(res);
    }
    assert_eq!(store.stats().entries, 1);

    // The key dropped in its handler runs again at once; the one that had answered does not.
    let res = svc.clone().oneshot(req("d1", "{}")).await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert!(res.headers().get("idempotent-replayed").is_none());
    let err = svc.clone().oneshot(req("d3", "{}")).await.unwrap_err();
    assert_eq!(kind(&err), RejectionKind::IdempotencyResponseNotStored);
    assert_eq!(app.runs(), 3);
}

#[tokio::test(start_paused = true)]
async fn dropped_in_a_spawned_task_by_a_timeout_frees_the_key() {
    let app = App::new();
    let gated = || {
        post("to", "{}")
            .header("x-gate", "1")
            .body(Body::from("{}"))
            .unwrap()
    };
    // By default the key of a request timed out in its handler is kept until its lease expires.
    let svc = ServiceBuilder::new()
        .timeout(Duration::from_millis(100))
        .layer(builder().build().unwrap())
        .service(app.service());
    let err = svc.clone().oneshot(gated()).await.unwrap_err();
    assert!(err.is::<tower::timeout::error::Elapsed>());
    let err = svc.clone().oneshot(req("to", "{}")).await.unwrap_err();
    let rejection = Rejection::find(&*err).expect("a rejection");
    assert_eq!(rejection.kind(), RejectionKind::IdempotencyInFlight);
    // Come back in about a second (for a replay, were the first to complete).
    let after = rejection.retry_after().expect("a Retry-After");
    assert!(after >= Duration::from_millis(500) && after <= Duration::from_secs(1));
    // Still in flight (never run again) until the lease expires.
    tokio::time::advance(Duration::from_secs(50)).await;
    let err = svc.clone().oneshot(req("to", "{}")).await.unwrap_err();
    assert_eq!(kind(&err), RejectionKind::IdempotencyInFlight);
    assert_eq!(app.runs(), 1);
    // Releasing on drop, it is free at once.
    let svc = ServiceBuilder::new()
        .timeout(Duration::from_millis(100))
        .layer(builder().release_on_drop(true).build().unwrap())
        .service(app.service());
    let err = svc.clone().oneshot(gated()).await.unwrap_err();
    assert!(err.is::<tower::timeout::error::Elapsed>());
    let res = svc.clone().oneshot(req("to", "{}")).await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(app.runs(), 3);
}

#[tokio::test(start_paused = true)]
async fn kept_lease_blocks_until_it_expires() {
    let app = App::new();
    let layer = builder()
        .release_on_drop(false)
        .lease_ttl(Duration::from_secs(5))
        .build()
        .unwrap();
    let svc = ServiceBuilder::new()
        .timeout(Duration::from_millis(100))
        .layer(layer)
        .service(app.service());
    let gated = post("kl", "{}")
        .header("x-gate", "1")
        .body(Body::from("{}"))
        .unwrap();
    svc.clone().oneshot(gated).await.unwrap_err();
    let err = svc.clone().oneshot(req("kl", "{}")).await.unwrap_err();
    assert_eq!(kind(&err), RejectionKind::IdempotencyInFlight);
    tokio::time::advance(Duration::from_secs(5)).await;
    let res = svc.clone().oneshot(req("kl", "{}")).await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(app.runs(), 2);
}

#[tokio::test(start_paused = true)]
async fn poll_ready_reservation_is_what_call_uses() {
    let (mut svc, mut handle) = tower_test::mock::spawn_layer::<Request<Body>, Response<Body>, _>(
        builder().build().unwrap(),
    );
    handle.allow(0);
    assert!(svc.poll_ready().is_pending());
    handle.allow(1);
    assert!(svc.poll_ready().is_ready());
    // The layer calls the inner service later, after reading the body and claiming the key:
    // it must call the instance `poll_ready` made ready (the mock panics if a fresh,
    // unreserved clone is called).
    let fut = svc.call(req("m", "{}"));
    let (fut, served) = tokio::join!(fut, async {
        let (r, send) = handle.next_request().await.unwrap();
        assert_eq!(r.uri(), "/orders?x=1");
        let body = r.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "{}");
        send.send_response(Response::new(Body::from("done")));
    });
    let () = served;
    let res = fut.unwrap();
    assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "done");
    // A replay needs no inner call, yet readiness is still the inner service's.
    handle.allow(1);
    assert!(svc.poll_ready().is_ready());
    let res = svc.call(req("m", "{}")).await.unwrap();
    assert_eq!(res.headers()["idempotent-replayed"], "true");
}

#[test]
fn configuration_is_validated() {
    let s = MemoryStore::default();
    let err = |b: IdempotencyBuilder<MemoryStore>| b.build().err();
    let b = || IdempotencyLayer::builder(s.clone());
    assert_eq!(err(b().ttl(Duration::ZERO)), Some(ConfigError::Zero("ttl")));
    assert_eq!(
        err(b().lease_ttl(Duration::ZERO)),
        Some(ConfigError::Zero("lease_ttl"))
    );
    assert_eq!(
        err(b().wait_for_in_flight(Duration::ZERO)),
        Some(ConfigError::Zero("wait_for_in_flight"))
    );
    assert_eq!(
        err(b().max_request_body(0)),
        Some(ConfigError::Zero("max_request_body"))
    );
    assert_eq!(err(b().methods([])), Some(ConfigError::NoMethods));
    assert!(err(b()).is_none());
    let msg = ConfigError::Zero("ttl").to_string();
    assert_eq!(msg, "`ttl` must be greater than zero");
}

#[test]
fn public_types_are_send_and_sync() {
    fn both<T: Send + Sync>() {}
    both::<IdempotencyLayer<MemoryStore>>();
    both::<MemoryStore>();
    both::<tower_bulwark::idempotency::IdempotencyHandle>();
    both::<tower_bulwark::idempotency::Record>();
    both::<tower_bulwark::idempotency::StoreError>();
    fn send<T: Send>(_: &T) {}
    let app = App::new();
    let mut svc = IdempotencyLayer::new(MemoryStore::default()).layer(app.service());
    let fut = svc.call(req("x", "{}"));
    send(&fut);
    both::<tower_bulwark::idempotency::Idempotency<(), MemoryStore>>();
}

#[path = "support/down_store.rs"]
mod down_store;

mod failing_store {
    use super::down_store::Down;
    use super::*;
    use tower_bulwark::idempotency::{StoreError, StoreErrorKind};

    #[tokio::test]
    async fn store_down_is_503_by_default_and_runs_when_failing_open() {
        let app = App::new();
        let closed = ServiceBuilder::new()
            .layer(RejectionLayer::http())
            .layer(IdempotencyLayer::new(Down))
            .service(app.service());
        let res = closed.oneshot(req("k", "{}")).await.unwrap();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(app.runs(), 0);

        let layer = IdempotencyLayer::builder(Down)
            .on_store_error(FailurePolicy::FailOpen)
            .build()
            .unwrap();
        let handle = layer.handle();
        let open = layer.layer(app.service());
        let res = open.clone().oneshot(req("k", "{}")).await.unwrap();
        assert_eq!(res.status(), StatusCode::CREATED);
        let res = open.clone().oneshot(req("k", "{}")).await.unwrap();
        assert!(res.headers().get("idempotent-replayed").is_none());
        assert_eq!(app.runs(), 2);
        assert_eq!(handle.stats().store_errors, 2);
        let e = StoreError::with_source(StoreErrorKind::Unavailable, "connection refused");
        assert_eq!(
            e.to_string(),
            "idempotency store unavailable: connection refused"
        );
    }
}

/// A gRPC-style unary response: one data frame, then `grpc-status` in trailers.
fn grpc_like(status: &'static str) -> Response<Body> {
    let frames = futures_util::stream::iter([
        Ok::<_, BoxError>(http_body::Frame::data(Bytes::from_static(
            b"\0\0\0\0\x02hi",
        ))),
        Ok(http_body::Frame::trailers({
            let mut t = http::HeaderMap::new();
            t.insert("grpc-status", HeaderValue::from_static(status));
            t
        })),
    ]);
    Response::builder()
        .header("content-type", "application/grpc")
        .body(Body::new(http_body_util::StreamBody::new(frames)))
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn trailers_are_stored_and_replayed_and_grpc_failures_are_not_stored() {
    let runs = Arc::new(AtomicUsize::new(0));
    let counter = runs.clone();
    let svc = builder()
        .build()
        .unwrap()
        .layer(tower::service_fn(move |req: Request<Body>| {
            counter.fetch_add(1, Ordering::SeqCst);
            let status = if req.uri().path() == "/svc/Fail" {
                "14"
            } else {
                "0"
            };
            async move { Ok::<_, BoxError>(grpc_like(status)) }
        }));
    let call = |path: &'static str| {
        Request::post(path)
            .header("idempotency-key", "g")
            .header("content-type", "application/grpc")
            .body(Body::from("\0\0\0\0\x01x"))
            .unwrap()
    };
    for _ in 0..2 {
        let res = svc.clone().oneshot(call("/svc/Fail")).await.unwrap();
        let collected = res.into_body().collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["grpc-status"], "14");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 2, "UNAVAILABLE is not stored");

    let key_ok = |path| {
        let mut r = call(path);
        r.headers_mut()
            .insert("idempotency-key", HeaderValue::from_static("g2"));
        r
    };
    let first = svc.clone().oneshot(key_ok("/svc/Ok")).await.unwrap();
    let first = first.into_body().collect().await.unwrap();
    let again = svc.clone().oneshot(key_ok("/svc/Ok")).await.unwrap();
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.headers()["content-type"], "application/grpc");
    let again = again.into_body().collect().await.unwrap();
    assert_eq!(again.trailers(), first.trailers());
    assert_eq!(again.trailers().unwrap()["grpc-status"], "0");
    assert_eq!(again.to_bytes(), first.to_bytes());
    assert_eq!(runs.load(Ordering::SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn set_cookie_and_hop_by_hop_trailers_are_not_replayed() {
    let runs = Arc::new(AtomicUsize::new(0));
    let counter = runs.clone();
    let svc = builder()
        .exclude_header(http::HeaderName::from_static("x-request-cost"))
        .build()
        .unwrap()
        .layer(tower::service_fn(move |_req: Request<Body>| {
            counter.fetch_add(1, Ordering::SeqCst);
            let frames = futures_util::stream::iter([
                Ok::<_, BoxError>(http_body::Frame::data(Bytes::from_static(b"hi"))),
                Ok(http_body::Frame::trailers({
                    let mut t = http::HeaderMap::new();
                    t.insert("grpc-status", HeaderValue::from_static("0"));
                    t.insert("grpc-message", HeaderValue::from_static("ok"));
                    t.append("set-cookie", HeaderValue::from_static("session=secret"));
                    t.insert("connection", HeaderValue::from_static("x-private"));
                    t.insert("x-private", HeaderValue::from_static("1"));
                    t.insert("transfer-encoding", HeaderValue::from_static("chunked"));
                    t.insert("x-request-cost", HeaderValue::from_static("3"));
                    t
                })),
            ]);
            let res = Response::builder()
                .body(Body::new(http_body_util::StreamBody::new(frames)))
                .unwrap();
            async move { Ok::<_, BoxError>(res) }
        }));
    let first = svc.clone().oneshot(req("t", "{}")).await.unwrap();
    let first = first.into_body().collect().await.unwrap();
    // The first response goes out as the handler made it.
    assert_eq!(first.trailers().unwrap()["set-cookie"], "session=secret");
    let again = svc.clone().oneshot(req("t", "{}")).await.unwrap();
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let again = again.into_body().collect().await.unwrap();
    let trailers = again.trailers().unwrap();
    let mut names: Vec<&str> = trailers.keys().map(|k| k.as_str()).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        ["grpc-message", "grpc-status"],
        "replayed trailers: {trailers:?}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

mod slow_store {
    use super::*;
    use std::future::{pending, Pending};
    use tower_bulwark::idempotency::{Fingerprint, Lease, Record, Store, StoreError, StoreKey};

    /// A `MemoryStore` whose `complete` never finishes, and that releases through the trait's
    /// default `release_detached` (a task spawned on the runtime), as a remote store would.
    #[derive(Clone, Debug)]
    pub(super) struct Stuck(pub(super) MemoryStore);

    impl Store for Stuck {
        type ClaimFuture = <MemoryStore as Store>::ClaimFuture;
        type CompleteFuture = Pending<Result<(), StoreError>>;
        type RenewFuture = <MemoryStore as Store>::RenewFuture;
        type ReleaseFuture = <MemoryStore as Store>::ReleaseFuture;
        type GetFuture = <MemoryStore as Store>::GetFuture;

        fn claim(&self, k: &StoreKey, f: Fingerprint, ttl: Duration) -> Self::ClaimFuture {
            self.0.claim(k, f, ttl)
        }
        fn complete(&self, _: &Lease, _: Record, _: Duration) -> Self::CompleteFuture {
            pending()
        }
        fn renew(&self, lease: &Lease, ttl: Duration) -> Self::RenewFuture {
            self.0.renew(lease, ttl)
        }
        fn release(&self, lease: &Lease) -> Self::ReleaseFuture {
            self.0.release(lease)
        }
        fn get(&self, k: &StoreKey) -> Self::GetFuture {
            self.0.get(k)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn dropped_while_storing_never_releases_the_key() {
        let app = App::new();
        let mem = store();
        let layer = IdempotencyLayer::new(Stuck(mem.clone()));
        let mut svc = layer.layer(app.service());
        {
            let mut fut = pin!(svc.call(req("s", "{}")));
            assert!(poll_once(fut.as_mut()).is_pending(), "stuck in complete");
            assert_eq!(app.runs(), 1);
            assert_eq!(mem.stats().entries, 1);
        }
        // The handler has run: the write goes on in a spawned task and the lease stays.
        tokio::task::yield_now().await;
        assert_eq!(mem.stats().entries, 1);
        let err = svc.clone().oneshot(req("s", "{}")).await.unwrap_err();
        assert_eq!(kind(&err), RejectionKind::IdempotencyInFlight);
        assert_eq!(app.runs(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn dropped_while_waiting_holds_nothing() {
        let app = App::new();
        let layer = builder()
            .wait_for_in_flight(Duration::from_secs(10))
            .build()
            .unwrap();
        let handle = layer.handle();
        let mem = layer.store().clone();
        let svc = layer.layer(app.service());
        let gated = post("w", "{}")
            .header("x-gate", "1")
            .body(Body::from("{}"))
            .unwrap();
        let first = tokio::spawn(svc.clone().oneshot(gated));
        tokio::time::sleep(Duration::from_millis(1)).await;
        {
            let mut s = svc.clone();
            let mut waiter = pin!(s.call(req("w", "{}")));
            assert!(poll_once(waiter.as_mut()).is_pending());
        }
        assert_eq!(mem.stats().entries, 1, "only the first request's lease");
        // Waiting can be switched off at run time: a repeat now gets 409 at once.
        handle.set_wait_for_in_flight(None);
        let err = svc.clone().oneshot(req("w", "{}")).await.unwrap_err();
        assert_eq!(kind(&err), RejectionKind::IdempotencyInFlight);
        app.gate.add_permits(1);
        assert_eq!(first.await.unwrap().unwrap().status(), StatusCode::CREATED);
        assert_eq!(app.runs(), 1);
    }
}

mod model {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    #[derive(Clone, Debug)]
    enum Op {
        Send {
            key: u8,
            payload: u8,
            fail: bool,
            drop_early: bool,
        },
        Advance(u16),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u8..3, 0u8..2, any::<bool>(), prop::bool::weighted(0.2)).prop_map(
                |(key, payload, fail, drop_early)| Op::Send { key, payload, fail, drop_early }
            ),
            1 => (0u16..800).prop_map(Op::Advance),
        ]
    }

    struct Stored {
        payload: u8,
        run: String,
        until: Duration,
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Random requests, failures, cancellations and time against a model of the layer:
        /// a completed key replays its first response until its TTL, another payload gets
        /// 422, failures and cancellations store nothing, and the handler runs exactly when
        /// the model says so.
        #[test]
        fn layer_matches_a_model(ops in proptest::collection::vec(op(), 1..40)) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap();
            rt.block_on(async move {
                let ttl = Duration::from_secs(1);
                let app = App::new();
                // The model frees a cancelled key at once: the opt-in `release_on_drop(true)`.
                let svc = builder()
                    .ttl(ttl)
                    .release_on_drop(true)
                    .build()
                    .unwrap()
                    .layer(app.service());
                let start = tokio::time::Instant::now();
                let mut model: HashMap<u8, Stored> = HashMap::new();
                let mut runs = 0;
                for op in ops {
                    match op {
                        Op::Advance(ms) => {
                            tokio::time::advance(Duration::from_millis(u64::from(ms))).await
                        }
                        Op::Send { key, payload, fail, drop_early } => {
                            let now = start.elapsed();
                            let mut r = post(&format!("k{key}"), "")
                                .header("x-payload", payload.to_string());
                            if fail {
                                r = r.header("x-status", "500");
                            }
                            if drop_early {
                                r = r.header("x-gate", "1");
                            }
                            let body = Body::from(vec![b'p'; usize::from(payload) + 1]);
                            let live = model.get(&key).filter(|s| s.until > now);
                            let expect_run = live.is_none();
                            if drop_early {
                                let mut s = svc.clone();
                                let mut fut = pin!(s.call(r.body(body).unwrap()));
                                let polled = poll_once(fut.as_mut());
                                match live {
                                    None => prop_assert!(polled.is_pending()),
                                    Some(_) => prop_assert!(polled.is_ready()),
                                }
                            } else {
                                let out = svc.clone().oneshot(r.body(body).unwrap()).await;
                                match live {
                                    Some(stored) if stored.payload == payload => {
                                        let res = out.unwrap();
                                        prop_assert_eq!(&res.headers()["idempotent-replayed"], "true");
                                        prop_assert_eq!(res.headers()["x-run"].to_str().unwrap(), stored.run.as_str());
                                    }
                                    Some(_) => {
                                        prop_assert_eq!(kind(&out.unwrap_err()), RejectionKind::IdempotencyKeyReused);
                                    }
                                    None => {
                                        let res = out.unwrap();
                                        prop_assert!(res.headers().get("idempotent-replayed").is_none());
                                        if !fail {
                                            let run = res.headers()["x-run"].to_str().unwrap().to_string();
                                            model.insert(key, Stored { payload, run, until: now + ttl });
                                        }
                                    }
                                }
                            }
                            if expect_run {
                                runs += 1;
                            }
                            prop_assert_eq!(app.runs(), runs);
                        }
                    }
                }
                Ok(())
            })?;
        }
    }
}

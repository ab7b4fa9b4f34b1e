//! The retry layer with HTTP and gRPC: method safety, idempotency keys, server hints, body
//! replay (Axum and tonic bodies) and the rejection response end to end. Paused tokio time.

#[path = "support/tracing_on.rs"]
mod tracing_on;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::State;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Full, StreamBody};
use tokio::time::Instant;
use tower::{service_fn, BoxError, Layer, Service, ServiceBuilder, ServiceExt};
use tower_bulwark::clock::Clock;
use tower_bulwark::retry::{Backoff, Jitter, ReplayBody, RetryLayer, RetryPolicy, IDEMPOTENCY_KEY};
use tower_bulwark::{Rejection, RejectionLayer};

#[derive(Clone, Debug)]
struct Seen {
    method: Method,
    key: Option<String>,
    body: Bytes,
    at: Instant,
}

type Reply = (u16, &'static [(&'static str, &'static str)]);

/// Answers from a script (the last line repeats) and records what each attempt carried.
#[derive(Clone)]
struct Scripted {
    script: Arc<Vec<Reply>>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Scripted {
    fn new(script: Vec<Reply>) -> Self {
        Scripted {
            script: Arc::new(script),
            seen: Arc::default(),
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl<B> Service<Request<B>> for Scripted
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<Full<Bytes>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let body = body.collect().await.map_err(Into::into)?.to_bytes();
            let n = {
                let mut seen = this.seen.lock().unwrap();
                seen.push(Seen {
                    method: parts.method,
                    key: parts
                        .headers
                        .get(IDEMPOTENCY_KEY)
                        .map(|v| v.to_str().unwrap().to_owned()),
                    body,
                    at: Instant::now(),
                });
                seen.len() - 1
            };
            let (status, headers) = this.script[n.min(this.script.len() - 1)];
            let mut res = Response::builder().status(status);
            for (k, v) in headers {
                res = res.header(*k, *v);
            }
            Ok(res.body(Full::new(Bytes::from("done"))).unwrap())
        })
    }
}

fn req(method: Method) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri("http://svc/orders")
        .body(Full::new(Bytes::from_static(b"{\"qty\":1}")))
        .unwrap()
}

fn fixed(ms: u64) -> Backoff {
    Backoff::exponential(Duration::from_millis(ms), Duration::from_millis(ms)).jitter(Jitter::None)
}

const UNAVAILABLE: Reply = (503, &[]);
/// A 503 of this crate's `RejectionLayer` on the server (a shed): the request did not run.
const SHED: Reply = (503, &[("request-refused", "overloaded")]);

#[tokio::test(start_paused = true)]
async fn post_without_a_key_is_never_retried() {
    let layer =
        RetryLayer::new(RetryPolicy::http().clock(Clock::tokio()).backoff(fixed(10))).unwrap();
    for (method, want) in [
        (Method::POST, 1),
        (Method::PATCH, 1),
        (Method::GET, 3),
        (Method::PUT, 3),
        (Method::DELETE, 3),
    ] {
        let inner = Scripted::new(vec![UNAVAILABLE]);
        let res = layer
            .layer(inner.clone())
            .oneshot(req(method.clone()))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE, "{method}");
        assert_eq!(inner.seen().len(), want, "{method}");
        assert!(inner.seen().iter().all(|s| s.body == "{\"qty\":1}"));
        assert!(inner.seen().iter().all(|s| s.method == method));
    }
    // A POST that carries its own key may be retried when it did not run (a shed, a 429);
    // the key is left as it was.
    let keyed = || {
        let mut r = req(Method::POST);
        r.headers_mut()
            .insert(IDEMPOTENCY_KEY, "order-17".parse().unwrap());
        r
    };
    let inner = Scripted::new(vec![SHED, (429, &[]), (201, &[])]);
    let res = layer.layer(inner.clone()).oneshot(keyed()).await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    let keys: Vec<_> = inner.seen().into_iter().map(|s| s.key).collect();
    assert_eq!(keys, vec![Some("order-17".to_owned()); 3]);
    // A 5xx without the mark may come from the handler after its effect, and a server's
    // idempotency layer releases the key of a 5xx: the keyed POST is not sent again.
    for reply in [UNAVAILABLE, (502, &[]), (504, &[])] {
        let inner = Scripted::new(vec![reply, (201, &[])]);
        let res = layer.layer(inner.clone()).oneshot(keyed()).await.unwrap();
        assert_eq!(res.status().as_u16(), reply.0);
        assert_eq!(inner.seen().len(), 1, "{}", reply.0);
    }
    // Marked idempotent, it is.
    let inner = Scripted::new(vec![UNAVAILABLE, (201, &[])]);
    let mut r = keyed();
    r.extensions_mut().insert(tower_bulwark::retry::Idempotent);
    let res = layer.layer(inner.clone()).oneshot(r).await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(inner.seen().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn add_idempotency_key_gives_every_attempt_the_same_fresh_key() {
    let layer = RetryLayer::new(
        RetryPolicy::http()
            .add_idempotency_key()
            .clock(Clock::tokio())
            .backoff(fixed(10)),
    )
    .unwrap();
    let mut first_keys = Vec::new();
    for method in [Method::POST, Method::PATCH, Method::POST] {
        let inner = Scripted::new(vec![SHED, (429, &[]), (200, &[])]);
        let res = layer
            .layer(inner.clone())
            .oneshot(req(method))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let seen = inner.seen();
        assert_eq!(seen.len(), 3);
        let key = seen[0].key.clone().expect("a key on the first attempt");
        assert_eq!(key.len(), 38, "a quoted UUID: {key}");
        assert!(seen.iter().all(|s| s.key.as_deref() == Some(&key)));
        first_keys.push(key);
    }
    first_keys.dedup();
    assert_eq!(first_keys.len(), 3, "a fresh key per logical request");
    // Idempotent methods need no key and get none.
    let inner = Scripted::new(vec![UNAVAILABLE, (200, &[])]);
    let _ = layer
        .layer(inner.clone())
        .oneshot(req(Method::GET))
        .await
        .unwrap();
    assert!(inner.seen().iter().all(|s| s.key.is_none()));
}

/// Replicas built from one configuration share its seed: their generated keys must still
/// differ, or a server would replay one replica's response to another replica's request.
#[tokio::test(start_paused = true)]
async fn layers_with_one_seed_generate_different_keys() {
    let key_of = || async {
        let layer = RetryLayer::new(
            RetryPolicy::http()
                .add_idempotency_key()
                .seed(42)
                .clock(Clock::tokio())
                .backoff(fixed(10)),
        )
        .unwrap();
        let inner = Scripted::new(vec![(200, &[])]);
        let _ = layer
            .layer(inner.clone())
            .oneshot(req(Method::POST))
            .await
            .unwrap();
        inner.seen()[0].key.clone().expect("a generated key")
    };
    let (a, b) = (key_of().await, key_of().await);
    assert_ne!(a, b, "two replicas with seed 42 sent the same key");
}

/// How many attempts `inner` saw, and the time between the first two (zero for one).
fn attempts_and_gap(inner: &Scripted) -> (usize, Duration) {
    let seen = inner.seen();
    let gap = if seen.len() > 1 {
        seen[1].at - seen[0].at
    } else {
        Duration::ZERO
    };
    (seen.len(), gap)
}

async fn wait_before_retry(
    policy: RetryPolicy<tower_bulwark::classify::HttpStatus, tower_bulwark::retry::HttpReplay>,
    first: Reply,
) -> (usize, Duration) {
    let layer = RetryLayer::new(policy.clock(Clock::tokio())).unwrap();
    let inner = Scripted::new(vec![first, (200, &[])]);
    let _ = layer
        .layer(inner.clone())
        .oneshot(req(Method::GET))
        .await
        .unwrap();
    attempts_and_gap(&inner)
}

/// The first attempt's response and how many attempts reached `inner`, for a policy that
/// may stop on the first answer.
async fn first_answer(
    policy: RetryPolicy<tower_bulwark::classify::HttpStatus, tower_bulwark::retry::HttpReplay>,
    first: Reply,
) -> (Response<Full<Bytes>>, usize, Duration) {
    let layer = RetryLayer::new(policy.clock(Clock::tokio())).unwrap();
    let inner = Scripted::new(vec![first, (200, &[])]);
    let start = Instant::now();
    let res = layer
        .layer(inner.clone())
        .oneshot(req(Method::GET))
        .await
        .unwrap();
    (res, inner.seen().len(), start.elapsed())
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_honoured_never_early() {
    let backoff = Backoff::exponential(Duration::from_millis(100), Duration::from_secs(5))
        .jitter(Jitter::None);
    let p = || RetryPolicy::http().backoff(backoff);
    for seed in 0..20 {
        let (n, gap) = wait_before_retry(p().seed(seed), (503, &[("retry-after", "2")])).await;
        assert_eq!(n, 2);
        // Never before the server said; spread by at most twice the hint.
        assert!(
            gap >= Duration::from_secs(2) && gap <= Duration::from_secs(6),
            "{gap:?}"
        );
    }
    let (n, gap) = wait_before_retry(
        p(),
        (503, &[("retry-after", "Thu, 01 Jan 1970 00:00:00 GMT")]),
    )
    .await;
    assert_eq!(n, 2);
    assert!(
        gap <= Duration::from_millis(100),
        "a date in the past: at once, or within the first backoff: {gap:?}"
    );
    for bad in ["soon", "-3", "1.5", "Sunday, 06-Nov-94"] {
        let header: &'static [(&'static str, &'static str)] =
            Box::leak(Box::new([("retry-after", bad)]));
        assert_eq!(
            wait_before_retry(p(), (503, header)).await,
            (2, Duration::from_millis(100)),
            "malformed {bad:?}: the backoff decides"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_retry_after_longer_than_the_policy_allows_returns_the_response() {
    let backoff = Backoff::exponential(Duration::from_millis(100), Duration::from_secs(5));
    let p = || RetryPolicy::http().backoff(backoff);
    for (policy, header, why) in [
        (p(), "3600", "longer than the maximum delay"),
        (
            p(),
            "Fri, 31 Dec 9999 23:59:59 GMT",
            "an HTTP-date past the maximum delay",
        ),
        (
            p().deadline(Duration::from_secs(3)),
            "4",
            "past the deadline",
        ),
    ] {
        let header: &'static [(&'static str, &'static str)] =
            Box::leak(Box::new([("retry-after", header)]));
        let (res, attempts, elapsed) = first_answer(policy, (503, header)).await;
        assert_eq!(attempts, 1, "{why}: not retried");
        assert_eq!(elapsed, Duration::ZERO, "{why}: returned at once");
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE, "{why}");
        assert_eq!(res.headers()["retry-after"], header[0].1, "{why}");
    }
}

#[tokio::test(start_paused = true)]
async fn grpc_pushback_is_honoured_and_malformed_stops() {
    let run = |first: Reply| async move {
        let layer = RetryLayer::new(
            RetryPolicy::grpc().clock(Clock::tokio()).backoff(
                Backoff::exponential(Duration::from_millis(50), Duration::from_secs(1))
                    .jitter(Jitter::None),
            ),
        )
        .unwrap();
        let inner = Scripted::new(vec![first, (200, &[("grpc-status", "0")])]);
        // gRPC calls are POST; the method does not stop them.
        let _ = layer
            .layer(inner.clone())
            .oneshot(req(Method::POST))
            .await
            .unwrap();
        attempts_and_gap(&inner)
    };
    let (n, gap) = run((
        200,
        &[("grpc-status", "14"), ("grpc-retry-pushback-ms", "300")],
    ))
    .await;
    assert_eq!(n, 2);
    assert!(
        gap >= Duration::from_millis(300) && gap <= Duration::from_millis(900),
        "never before the pushback: {gap:?}"
    );
    assert_eq!(
        run((
            200,
            &[("grpc-status", "8"), ("grpc-retry-pushback-ms", "60000")]
        ))
        .await,
        (1, Duration::ZERO),
        "longer than the maximum delay: the response is returned"
    );
    assert_eq!(
        run((
            200,
            &[("grpc-status", "14"), ("grpc-retry-pushback-ms", "-1")]
        ))
        .await,
        (1, Duration::ZERO),
        "negative: do not retry"
    );
    assert_eq!(
        run((
            200,
            &[("grpc-status", "14"), ("grpc-retry-pushback-ms", "later")]
        ))
        .await,
        (1, Duration::ZERO),
        "malformed: do not retry"
    );
    assert_eq!(
        run((200, &[("grpc-status", "14")])).await,
        (2, Duration::from_millis(50)),
        "no hint: the backoff"
    );
    assert_eq!(
        run((200, &[("grpc-status", "3")])).await,
        (1, Duration::ZERO),
        "INVALID_ARGUMENT is not retried"
    );
}

fn streamed(chunks: &[&'static str]) -> axum::body::Body {
    let frames: Vec<Result<Bytes, Infallible>> = chunks
        .iter()
        .map(|c| Ok(Bytes::from_static(c.as_bytes())))
        .collect();
    axum::body::Body::from_stream(futures_util::stream::iter(frames))
}

#[tokio::test(start_paused = true)]
async fn a_streamed_axum_body_is_replayed_to_an_axum_router() {
    #[derive(Clone, Default)]
    struct Calls(Arc<Mutex<Vec<Bytes>>>);
    async fn flaky(State(calls): State<Calls>, body: Bytes) -> axum::response::Response {
        use axum::response::IntoResponse;
        let mut seen = calls.0.lock().unwrap();
        seen.push(body.clone());
        if seen.len() < 3 {
            // As this crate's `RejectionLayer` marks a shed: the request did not run.
            (
                StatusCode::SERVICE_UNAVAILABLE,
                [("request-refused", "overloaded")],
                Bytes::new(),
            )
                .into_response()
        } else {
            (StatusCode::OK, body).into_response()
        }
    }
    let calls = Calls::default();
    let router = Router::new()
        .route("/orders", post(flaky))
        .with_state(calls.clone());
    let client = ServiceBuilder::new()
        .layer(
            RetryLayer::new(
                RetryPolicy::http()
                    .add_idempotency_key()
                    .clock(Clock::tokio())
                    .backoff(fixed(5)),
            )
            .unwrap(),
        )
        .service(router);
    let req = Request::post("/orders")
        .body(streamed(&["{\"sku\":", "\"tea\",", "\"qty\":2}"]))
        .unwrap();
    let res = client.oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "{\"sku\":\"tea\",\"qty\":2}");
    let seen = calls.0.lock().unwrap().clone();
    assert_eq!(seen.len(), 3);
    assert!(
        seen.iter().all(|b| b == "{\"sku\":\"tea\",\"qty\":2}"),
        "{seen:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_body_over_the_limit_is_sent_once() {
    let layer = RetryLayer::new(
        RetryPolicy::http()
            .body_limit(8)
            .clock(Clock::tokio())
            .backoff(fixed(5)),
    )
    .unwrap();
    // Size known in advance.
    let inner = Scripted::new(vec![UNAVAILABLE]);
    let r = Request::put("http://svc/x")
        .body(Full::new(Bytes::from_static(b"0123456789")))
        .unwrap();
    let res = layer.layer(inner.clone()).oneshot(r).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(inner.seen().len(), 1);
    // Size found out while streaming: the attempt gets every byte, and is the only one.
    let inner = Scripted::new(vec![UNAVAILABLE]);
    let r = Request::put("http://svc/x")
        .body(streamed(&["01234", "56789"]))
        .unwrap();
    let res = layer.layer(inner.clone()).oneshot(r).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    let seen = inner.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].body, "0123456789");
    // Under the limit, streamed: retried with the whole body.
    let inner = Scripted::new(vec![UNAVAILABLE, (200, &[])]);
    let r = Request::put("http://svc/x")
        .body(streamed(&["012", "345"]))
        .unwrap();
    let res = layer.layer(inner.clone()).oneshot(r).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(inner.seen().iter().all(|s| s.body == "012345"));
}

#[tokio::test(start_paused = true)]
async fn an_open_breaker_below_becomes_a_503_above_without_being_hammered() {
    let calls = Arc::new(AtomicU32::new(0));
    let breaker = {
        let calls = calls.clone();
        service_fn(move |_req: Request<ReplayBody<Full<Bytes>>>| {
            calls.fetch_add(1, Ordering::SeqCst);
            async {
                Err::<Response<Full<Bytes>>, BoxError>(
                    Rejection::circuit_open(Duration::from_secs(30)).into(),
                )
            }
        })
    };
    let svc = ServiceBuilder::new()
        .layer(RejectionLayer::http())
        .layer(RetryLayer::new(RetryPolicy::http().clock(Clock::tokio())).unwrap())
        .service(breaker);
    let res = svc.oneshot(req(Method::GET)).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.headers()["retry-after"], "30");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn a_breaker_open_briefly_is_waited_out() {
    let calls = Arc::new(AtomicU32::new(0));
    let breaker = {
        let calls = calls.clone();
        service_fn(move |_req: Request<ReplayBody<Full<Bytes>>>| {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                if n == 0 {
                    Err::<_, BoxError>(Rejection::circuit_open(Duration::from_millis(400)).into())
                } else {
                    Ok(Response::new(Full::new(Bytes::from_static(b"ok"))))
                }
            }
        })
    };
    let svc = ServiceBuilder::new()
        .layer(RejectionLayer::http())
        .layer(RetryLayer::new(RetryPolicy::http().clock(Clock::tokio())).unwrap())
        .service(breaker);
    let start = Instant::now();
    let res = svc.oneshot(req(Method::GET)).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(400) && waited <= Duration::from_millis(1200),
        "never before the breaker said, spread past it: {waited:?}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn a_tonic_body_is_replayed_through_a_map_request() {
    // A tonic client's request type, as a `Channel` takes it.
    let inner = Scripted::new(vec![
        (200, &[("grpc-status", "14")]),
        (200, &[("grpc-status", "0")]),
    ]);
    let svc = ServiceBuilder::new()
        .layer(
            RetryLayer::new(RetryPolicy::grpc().clock(Clock::tokio()).backoff(fixed(5))).unwrap(),
        )
        .map_request(|r: Request<ReplayBody<tonic::body::Body>>| r.map(tonic::body::Body::new))
        .service(inner.clone());
    let frames: Vec<Result<Bytes, tonic::Status>> = vec![
        Ok(Bytes::from_static(b"\0\0\0\0\x02")),
        Ok(Bytes::from_static(b"hi")),
    ];
    let body = tonic::body::Body::new(StreamBody::new(futures_util::stream::iter(
        frames.into_iter().map(|f| f.map(http_body::Frame::data)),
    )));
    let r = Request::post("http://svc/pkg.Svc/Call")
        .header("content-type", "application/grpc")
        .body(body)
        .unwrap();
    let res = svc.oneshot(r).await.unwrap();
    assert_eq!(res.headers()["grpc-status"], "0");
    let seen = inner.seen();
    assert_eq!(seen.len(), 2);
    assert!(seen.iter().all(|s| s.body == b"\0\0\0\0\x02hi"[..]));
}

#[tokio::test(start_paused = true)]
async fn the_retry_event_names_the_status() {
    let (out, _guard) = tracing_on::capture(tracing::Level::DEBUG);
    let layer =
        RetryLayer::new(RetryPolicy::http().clock(Clock::tokio()).backoff(fixed(10))).unwrap();
    let inner = Scripted::new(vec![(502, &[]), (200, &[])]);
    let _ = layer.layer(inner).oneshot(req(Method::GET)).await.unwrap();
    let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
    assert!(text.contains("Retryable response: status 502"), "{text}");
}

/// A gRPC call through a proxy: the proxy's 503 (no upstream reached) is retried for any call,
/// its 502 and 504 (the call may have reached an upstream) only for a call with a key or
/// marked idempotent; a server's `UNAVAILABLE` for any call.
#[tokio::test(start_paused = true)]
async fn grpc_proxy_answers_are_retried_by_what_they_say() {
    let layer =
        RetryLayer::new(RetryPolicy::grpc().clock(Clock::tokio()).backoff(fixed(5))).unwrap();
    let call = |keyed: bool, marked: bool| {
        let mut r = Request::post("http://svc/pkg.Payments/Charge")
            .header("content-type", "application/grpc")
            .body(Full::new(Bytes::from_static(b"\0\0\0\0\x02hi")))
            .unwrap();
        if keyed {
            r.headers_mut()
                .insert(IDEMPOTENCY_KEY, "charge-9".parse().unwrap());
        }
        if marked {
            r.extensions_mut().insert(tower_bulwark::retry::Idempotent);
        }
        r
    };
    const OK: Reply = (200, &[("grpc-status", "0")]);
    for (reply, keyed, marked, attempts) in [
        ((503, &[][..]), false, false, 2),
        ((502, &[][..]), false, false, 1),
        ((504, &[][..]), false, false, 1),
        ((504, &[][..]), true, false, 2),
        ((502, &[][..]), false, true, 2),
        ((200, &[("grpc-status", "14")][..]), false, false, 2),
        ((503, &[("grpc-status", "14")][..]), false, false, 2),
    ] {
        let inner = Scripted::new(vec![reply, OK]);
        let _ = layer
            .layer(inner.clone())
            .oneshot(call(keyed, marked))
            .await
            .unwrap();
        assert_eq!(
            inner.seen().len(),
            attempts,
            "{reply:?}, keyed {keyed}, marked {marked}"
        );
    }
}

/// When each attempt came, and the `grpc-timeout` it carried.
type Timeouts = Arc<Mutex<Vec<(Duration, Option<String>)>>>;

/// Records each attempt's `grpc-timeout` and answers `UNAVAILABLE` at once.
#[derive(Clone)]
struct TimeoutsSeen {
    seen: Timeouts,
    start: Instant,
}

impl<B> Service<Request<B>> for TimeoutsSeen {
    type Response = Response<Full<Bytes>>;
    type Error = BoxError;
    type Future = std::future::Ready<Result<Response<Full<Bytes>>, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        self.seen.lock().unwrap().push((
            self.start.elapsed(),
            req.headers()
                .get("grpc-timeout")
                .map(|v| v.to_str().unwrap().to_owned()),
        ));
        std::future::ready(Ok(Response::builder()
            .header("grpc-status", "14")
            .body(Full::new(Bytes::new()))
            .unwrap()))
    }
}

fn timeouts_seen() -> (Timeouts, TimeoutsSeen) {
    let seen = Timeouts::default();
    let svc = TimeoutsSeen {
        seen: seen.clone(),
        start: Instant::now(),
    };
    (seen, svc)
}

fn grpc_call_with_timeout(timeout: &'static str) -> Request<Full<Bytes>> {
    Request::post("http://svc/pkg.Svc/Call")
        .header("content-type", "application/grpc")
        .header("grpc-timeout", timeout)
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\x02hi")))
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn each_retry_is_sent_the_time_its_call_has_left() {
    let (seen, svc) = timeouts_seen();
    let svc = RetryLayer::new(
        RetryPolicy::grpc()
            .clock(Clock::tokio())
            .backoff(fixed(100)),
    )
    .unwrap()
    .layer(svc);
    let _ = svc.oneshot(grpc_call_with_timeout("2S")).await.unwrap();
    let seen = seen.lock().unwrap().clone();
    let ms = Duration::from_millis;
    assert_eq!(
        seen,
        vec![
            (ms(0), Some("2S".to_owned())),
            (ms(100), Some("1900000u".to_owned())),
            (ms(200), Some("1800000u".to_owned())),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn no_retry_starts_past_the_calls_grpc_timeout() {
    let (seen, svc) = timeouts_seen();
    let svc = RetryLayer::new(
        RetryPolicy::grpc()
            .max_attempts(5)
            .clock(Clock::tokio())
            .backoff(fixed(100)),
    )
    .unwrap()
    .layer(svc);
    let start = Instant::now();
    let res = svc.oneshot(grpc_call_with_timeout("150m")).await.unwrap();
    assert_eq!(res.headers()["grpc-status"], "14");
    // The third attempt would start at 200 ms: past the call's 150 ms, so it is not made.
    assert_eq!(start.elapsed(), Duration::from_millis(100));
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![
            (Duration::ZERO, Some("150m".to_owned())),
            (Duration::from_millis(100), Some("50000000n".to_owned())),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_malformed_grpc_timeout_is_left_as_it_is_and_ignored() {
    for bad in ["soon", "123456789m", "10x", "m", "-5S", "1.5S"] {
        let (seen, svc) = timeouts_seen();
        let svc = RetryLayer::new(
            RetryPolicy::grpc()
                .clock(Clock::tokio())
                .backoff(fixed(100)),
        )
        .unwrap()
        .layer(svc);
        let _ = svc.oneshot(grpc_call_with_timeout(bad)).await.unwrap();
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 3, "{bad:?}");
        assert!(
            seen.iter().all(|(_, t)| t.as_deref() == Some(bad)),
            "{bad:?}: {seen:?}"
        );
    }
}

/// Fails `poll_ready` on every retry; answers the first call 503.
#[derive(Clone, Default)]
struct NeverReadyAgain {
    calls: Arc<AtomicU32>,
    readiness_failures: Arc<AtomicU32>,
}

impl<B> Service<Request<B>> for NeverReadyAgain {
    type Response = Response<()>;
    type Error = BoxError;
    type Future = std::future::Ready<Result<Response<()>, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if self.calls.load(Ordering::SeqCst) > 0 {
            self.readiness_failures.fetch_add(1, Ordering::SeqCst);
            return Poll::Ready(Err("connect failed".into()));
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: Request<B>) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        std::future::ready(Ok(Response::builder().status(503).body(()).unwrap()))
    }
}

#[tokio::test(start_paused = true)]
async fn readiness_failures_that_use_up_the_attempts_return_the_last_response() {
    let inner = NeverReadyAgain::default();
    let layer =
        RetryLayer::new(RetryPolicy::http().clock(Clock::tokio()).backoff(fixed(10))).unwrap();
    let handle = layer.handle();
    let res = layer
        .layer(inner.clone())
        .oneshot(req(Method::GET))
        .await
        .expect("the last response, not the readiness error");
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(inner.calls.load(Ordering::SeqCst), 1);
    // Two attempts (of three) failed at readiness, each after a backoff.
    assert_eq!(inner.readiness_failures.load(Ordering::SeqCst), 2);
    assert_eq!(handle.retries(), 2);
}

/// Server hints are waited out up to the policy's `max_hint` (4 s by default), whatever the
/// backoff's maximum delay (1 s by default); a longer one returns the answer at once.
#[tokio::test(start_paused = true)]
async fn hints_are_waited_out_up_to_max_hint_not_the_maximum_delay() {
    for (policy, retry_after, retried) in [
        (RetryPolicy::http(), "3", true),
        (RetryPolicy::http(), "4", true),
        (RetryPolicy::http(), "5", false),
        (
            RetryPolicy::http().max_hint(Duration::from_secs(10)),
            "5",
            true,
        ),
        (
            RetryPolicy::http().max_hint(Duration::from_secs(1)),
            "2",
            false,
        ),
    ] {
        let header: &'static [(&'static str, &'static str)] =
            Box::leak(Box::new([("retry-after", retry_after)]));
        let (n, gap) = wait_before_retry(policy.clock(Clock::tokio()), (503, header)).await;
        let secs: u64 = retry_after.parse().unwrap();
        if retried {
            assert_eq!(n, 2, "Retry-After: {retry_after}");
            // Never early; spread by at most twice a hint longer than the maximum delay.
            assert!(
                gap >= Duration::from_secs(secs) && gap <= Duration::from_secs(3 * secs),
                "Retry-After: {retry_after}: {gap:?}"
            );
        } else {
            assert_eq!(n, 1, "Retry-After: {retry_after}");
        }
    }
}

/// A keyed POST shed by a server's own layers (answered by its `RejectionLayer`) did not run:
/// it is sent again, and served. The shed is a real one: a `BackpressureLayer` whose one
/// permit another request holds, with no wait.
#[tokio::test(start_paused = true)]
async fn a_keyed_post_shed_by_a_servers_rejection_layer_is_retried() {
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let bp = tower_bulwark::BackpressureLayer::new(1)
        .max_wait(Duration::ZERO)
        .retry_after(Duration::from_millis(300));
    let server = ServiceBuilder::new()
        .layer(RejectionLayer::http())
        .layer(bp.clone())
        .service(service_fn(move |req: Request<ReplayBody<Full<Bytes>>>| {
            let c = c.clone();
            async move {
                if req.uri().path() == "/slow" {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                } else {
                    c.fetch_add(1, Ordering::SeqCst);
                }
                Ok::<_, BoxError>(
                    Response::builder()
                        .status(201)
                        .body(Full::new(Bytes::from_static(b"made")))
                        .unwrap(),
                )
            }
        }));
    // Another request holds the one permit for 200 ms.
    let mut slow = req(Method::POST);
    *slow.uri_mut() = "http://svc/slow".parse().unwrap();
    let holder = RetryLayer::new(RetryPolicy::http().clock(Clock::tokio()))
        .unwrap()
        .layer(server.clone());
    let holder = tokio::spawn(holder.oneshot(slow));
    tokio::task::yield_now().await;
    let client = RetryLayer::new(
        RetryPolicy::http()
            .add_idempotency_key()
            .clock(Clock::tokio()),
    )
    .unwrap()
    .layer(server);
    let res = client.oneshot(req(Method::POST)).await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(bp.handle().shed(), 1);
    holder.await.unwrap().unwrap();
}

/// A handler that forwards, as its own error, a refusal its own client got (made in its
/// future, not by a layer of the server for this request): the answer is not marked refused,
/// so the client does not send the POST again (it may have had its effect).
#[tokio::test(start_paused = true)]
async fn a_keyed_post_whose_handler_forwards_a_refusal_is_not_retried() {
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let server = ServiceBuilder::new()
        .layer(RejectionLayer::http())
        .service(service_fn(move |_req: Request<ReplayBody<Full<Bytes>>>| {
            let c = c.clone();
            async move {
                c.fetch_add(1, Ordering::SeqCst);
                Err::<Response<Full<Bytes>>, BoxError>(
                    Rejection::overloaded(Some(Duration::from_millis(300))).into(),
                )
            }
        }));
    let client = RetryLayer::new(
        RetryPolicy::http()
            .add_idempotency_key()
            .clock(Clock::tokio()),
    )
    .unwrap()
    .layer(server);
    let res = client.oneshot(req(Method::POST)).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(res.headers().get("request-refused").is_none());
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

//! Attacks on the changes of the day (changes-today.md). Tests marked
//! `#[ignore = "defect: ..."]` fail on the current code because of the defect they name.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full, StreamBody};
use redis_server::RedisServer;
use tower::{BoxError, Layer, Service, ServiceBuilder, ServiceExt};
use tower_bulwark::clock::Clock;
use tower_bulwark::retry::{Backoff, Jitter, RetryLayer, RetryPolicy, IDEMPOTENCY_KEY};
use tower_bulwark::{
    BreakerConfig, CircuitBreakerLayer, IdempotencyLayer, MemoryStore, RejectionLayer,
};

fn fixed(ms: u64) -> Backoff {
    Backoff::exponential(Duration::from_millis(ms), Duration::from_millis(ms)).jitter(Jitter::None)
}

fn post() -> Request<Full<Bytes>> {
    Request::builder()
        .method(Method::POST)
        .uri("http://svc/orders")
        .body(Full::new(Bytes::from_static(b"{\"qty\":1}")))
        .unwrap()
}

/// A handler error of its own that wraps the error of a downstream call.
#[derive(Debug)]
struct HandlerError(BoxError);
impl std::fmt::Display for HandlerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "receipt service call failed")
    }
}
impl std::error::Error for HandlerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

/// An order handler: it charges (counted), then calls a receipt service through its own
/// client stack (a circuit breaker of this crate), and fails with that call's error.
#[derive(Clone)]
struct ChargeThenCallReceipts {
    charged: Arc<AtomicU32>,
    wrap: bool,
}

impl Service<Request<Full<Bytes>>> for ChargeThenCallReceipts {
    type Response = Response<Full<Bytes>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: Request<Full<Bytes>>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            // The effect: the card is charged.
            this.charged.fetch_add(1, Ordering::SeqCst);
            // The receipt service is down and its breaker (in the handler's own client) open,
            // with a 2 s open time (any open time within the client's 4 s `max_hint`).
            let breaker = CircuitBreakerLayer::new(
                BreakerConfig::consecutive_failures(1)
                    .open_time(Duration::from_secs(2))
                    .clock(Clock::tokio()),
            )
            .unwrap();
            breaker.handle().force_open();
            let receipts = breaker.layer(tower::service_fn(send_receipt));
            let sent: Result<(), BoxError> = receipts.oneshot(()).await;
            match sent {
                Ok(()) => Ok(Response::new(Full::new(Bytes::from_static(b"charged")))),
                Err(e) if this.wrap => Err(Box::new(HandlerError(e)) as BoxError),
                Err(e) => Err(e),
            }
        })
    }
}

async fn send_receipt(_: ()) -> Result<(), BoxError> {
    Ok(())
}

async fn run_charge_then_receipts(wrap: bool) -> u32 {
    let charged = Arc::new(AtomicU32::new(0));
    let server = ServiceBuilder::new()
        .layer(RejectionLayer::http())
        .layer(IdempotencyLayer::new(MemoryStore::default()))
        .service(ChargeThenCallReceipts {
            charged: charged.clone(),
            wrap,
        });
    let client = RetryLayer::new(
        RetryPolicy::http()
            .add_idempotency_key()
            .max_attempts(3)
            .clock(Clock::tokio())
            .backoff(fixed(10)),
    )
    .unwrap()
    .layer(hop(server));
    let res = client.oneshot(post()).await;
    let _ = res.map(|r| r.status());
    charged.load(Ordering::SeqCst)
}

/// A handler (a tower service under `IdempotencyLayer`, the README's server stack with
/// `RejectionLayer::http()` above) charges a card, then calls a receipt service through its own
/// client stack, whose circuit breaker is open; it returns its own error wrapping that
/// `Rejection` (a `source()` chain, as `thiserror`'s `#[source]` gives). The client is the
/// README's client: `RetryPolicy::http().add_idempotency_key()`.
///
/// Expected: the idempotency docs say "any other error from below: ... the handler's own
/// error: the handler may have had its effect: the key is recorded as run ... never a second
/// run", and the retry docs say a POST safe through its key alone is not sent again after a 5xx
/// "that may be its handler's answer". What happens: the layer looks for a refusing
/// `Rejection` anywhere in the chain, so it calls the handler's failure a refusal "before it
/// ran" and releases the key; `RejectionLayer` answers 503 marked `Request-Refused:
/// circuit-open` (the mark claims "the request did not reach the service"); the client retries
/// it and the handler charges the card again: three charges for one POST.
#[tokio::test(start_paused = true)]
async fn handler_error_wrapping_a_downstream_refusal_runs_the_post_again() {
    assert_eq!(
        run_charge_then_receipts(true).await,
        1,
        "the card was charged more than once"
    );
}

/// As above, the handler propagating the downstream refusal as is (`?` into `BoxError`), the
/// ordinary way to forward an error in a tower service.
#[tokio::test(start_paused = true)]
async fn handler_forwarding_a_downstream_refusal_runs_the_post_again() {
    assert_eq!(
        run_charge_then_receipts(false).await,
        1,
        "the card was charged more than once"
    );
}

/// A gateway handler records an order (counted), then forwards the request to an upstream
/// (itself using this crate) and hands back the upstream's answer with its headers, as
/// proxying handlers do: the upstream shed it with 503 `Request-Refused: overloaded`.
///
/// Expected: `REQUEST_REFUSED` "the answer is a refusal by one of this crate's layers, so the
/// request did not reach the service behind it"; the retry layer trusts it to re-send a POST
/// safe only through its key. The gateway's own layers (its `IdempotencyLayer`, its
/// `RejectionLayer`) do not strip or tell apart a mark coming out of the handler, so the
/// client re-sends the POST and the gateway's handler (whose key was released for the 5xx)
/// records the order again.
#[tokio::test(start_paused = true)]
async fn forwarded_request_refused_mark_runs_the_post_again() {
    let orders = Arc::new(AtomicU32::new(0));
    let o = orders.clone();
    let handler = tower::service_fn(move |_req: Request<Full<Bytes>>| {
        let o = o.clone();
        async move {
            o.fetch_add(1, Ordering::SeqCst);
            // The upstream's shed, forwarded as is.
            let res = Response::builder()
                .status(503)
                .header("request-refused", "overloaded")
                .header("retry-after", "1")
                .body(Full::new(Bytes::from_static(b"upstream busy")))
                .unwrap();
            Ok::<_, BoxError>(res)
        }
    });
    let server = ServiceBuilder::new()
        .layer(RejectionLayer::http())
        .layer(IdempotencyLayer::new(MemoryStore::default()))
        .service(handler);
    let client = RetryLayer::new(
        RetryPolicy::http()
            .add_idempotency_key()
            .max_attempts(3)
            .clock(Clock::tokio()),
    )
    .unwrap()
    .layer(hop(server));
    let res = client.oneshot(post()).await.unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(
        orders.load(Ordering::SeqCst),
        1,
        "the order was recorded more than once"
    );
}

/// The future of one hop of the network.
type HopFuture = Pin<Box<dyn Future<Output = Result<Response<Full<Bytes>>, BoxError>> + Send>>;

/// The network between client and server: the request body is read whole and sent as
/// `Full`, the response read whole (trailers dropped: HTTP/1.1).
fn hop<S, B>(
    server: S,
) -> impl Service<
    Request<tower_bulwark::retry::ReplayBody<Full<Bytes>>>,
    Response = Response<Full<Bytes>>,
    Error = BoxError,
    Future = HopFuture,
> + Clone
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>, Error = std::convert::Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: std::fmt::Debug,
{
    tower::service_fn(
        move |req: Request<tower_bulwark::retry::ReplayBody<Full<Bytes>>>| {
            let server = server.clone();
            Box::pin(async move {
                let (parts, body) = req.into_parts();
                let bytes = body
                    .collect()
                    .await
                    .map_err(|e| -> BoxError { e })?
                    .to_bytes();
                let res = server
                    .oneshot(Request::from_parts(parts, Full::new(bytes)))
                    .await
                    .unwrap();
                let (parts, body) = res.into_parts();
                let bytes = body.collect().await.unwrap().to_bytes();
                Ok::<_, BoxError>(Response::from_parts(parts, Full::new(bytes)))
            })
                as Pin<Box<dyn Future<Output = Result<Response<Full<Bytes>>, BoxError>> + Send>>
        },
    )
}

type Frames = futures_util::stream::BoxStream<'static, Result<Frame<Bytes>, BoxError>>;

/// A gRPC server-streaming handler whose body is not ready at once: a message after a while,
/// then trailers with `grpc-status: 14` (UNAVAILABLE).
#[derive(Clone)]
struct StreamingGrpc {
    runs: Arc<AtomicU32>,
}

impl<B: Send + 'static> Service<Request<B>> for StreamingGrpc {
    type Response = Response<StreamBody<Frames>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, _req: Request<B>) -> Self::Future {
        self.runs.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            let s = futures_util::stream::unfold(0u8, |n| async move {
                match n {
                    0 => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Some((Ok(Frame::data(Bytes::from_static(b"\0\0\0\0\x02hi"))), 1))
                    }
                    1 => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        let mut t = HeaderMap::new();
                        t.insert("grpc-status", HeaderValue::from_static("14"));
                        t.insert("grpc-message", HeaderValue::from_static("backend%20down"));
                        Some((Ok(Frame::trailers(t)), 2))
                    }
                    _ => None,
                }
            });
            let body = StreamBody::new(Box::pin(s) as Frames);
            Ok(Response::builder()
                .status(200)
                .header("content-type", "application/grpc")
                .body(body)
                .unwrap())
        })
    }
}

fn grpc_call(key: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .method(Method::POST)
        .uri("http://svc/pkg.Svc/Watch")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header(IDEMPOTENCY_KEY, key)
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\x01x")))
        .unwrap()
}

/// Regression check (passes): a streamed gRPC response (head first, body later, as the new
/// tee hands on) ends with trailers `grpc-status: 14`. Expected (CHANGELOG: gRPC failures are not stored; their key is
/// released like other gRPC failures): a repeat with the same key runs the handler again, and
/// is not replayed a stored failure nor refused 409.
#[tokio::test(start_paused = true)]
async fn streamed_grpc_failure_in_trailers_is_not_stored() {
    let runs = Arc::new(AtomicU32::new(0));
    let svc =
        IdempotencyLayer::new(MemoryStore::default()).layer(StreamingGrpc { runs: runs.clone() });
    for _ in 0..2 {
        let res = svc.clone().oneshot(grpc_call("\"k-1\"")).await.unwrap();
        let replayed = res.headers().get("idempotent-replayed").cloned();
        let collected = res.into_body().collect().await;
        let trailers = collected.ok().and_then(|c| c.trailers().cloned());
        let status = trailers
            .as_ref()
            .and_then(|t| t.get("grpc-status"))
            .map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(replayed, None, "a gRPC failure was replayed");
        assert_eq!(status.as_deref(), Some("14"));
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        2,
        "the repeat did not run the handler"
    );
}

/// Answers 503 with the given header fields the first time, then 200; counts attempts.
async fn attempts_after(fields: &'static [(&'static str, &'static str)], grpc: bool) -> u32 {
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let inner = tower::service_fn(
        move |_req: Request<tower_bulwark::retry::ReplayBody<Full<Bytes>>>| {
            let n = c.fetch_add(1, Ordering::SeqCst);
            async move {
                let mut res = Response::builder();
                if n == 0 {
                    if grpc {
                        res = res
                            .status(200)
                            .header("content-type", "application/grpc")
                            .header("grpc-status", "14");
                    } else {
                        res = res.status(503);
                    }
                    for (k, v) in fields {
                        res = res.header(*k, *v);
                    }
                } else {
                    res = res.status(200);
                    if grpc {
                        res = res
                            .header("content-type", "application/grpc")
                            .header("grpc-status", "0");
                    }
                }
                Ok::<_, BoxError>(res.body(Full::new(Bytes::new())).unwrap())
            }
        },
    );
    let req = Request::builder()
        .method(Method::GET)
        .uri("http://svc/pkg.Svc/Get")
        .header(
            "content-type",
            if grpc {
                "application/grpc"
            } else {
                "text/plain"
            },
        )
        .body(Full::new(Bytes::new()))
        .unwrap();
    let res = if grpc {
        RetryLayer::new(RetryPolicy::grpc().clock(Clock::tokio()))
            .unwrap()
            .layer(inner)
            .oneshot(req)
            .await
    } else {
        RetryLayer::new(RetryPolicy::http().clock(Clock::tokio()))
            .unwrap()
            .layer(inner)
            .oneshot(req)
            .await
    };
    res.unwrap();
    calls.load(Ordering::SeqCst)
}

/// Regression check (passes): a GET answered 503 with two `Retry-After` fields, `3600` then
/// `1` (a server's hour, then a proxy appending its own). The CHANGELOG says "the latest
/// wins", which read literally would retry this after a second; the layer does not (one
/// attempt), while a lone `Retry-After: 1` is retried (so the check is not vacuous).
#[tokio::test(start_paused = true)]
async fn retry_after_hour_then_second_is_not_retried_after_a_second() {
    assert_eq!(attempts_after(&[("retry-after", "1")], false).await, 2);
    let n = attempts_after(&[("retry-after", "3600"), ("retry-after", "1")], false).await;
    assert_eq!(n, 1, "retried after 1 s despite a Retry-After of an hour");
}

/// Regression check (passes): the gRPC form, `grpc-retry-pushback-ms: -1` (gRPC's "do not
/// retry") followed by a second field `100`: not retried, where a lone `100` is.
#[tokio::test(start_paused = true)]
async fn grpc_do_not_retry_pushback_is_not_overridden_by_a_later_field() {
    assert_eq!(
        attempts_after(&[("grpc-retry-pushback-ms", "100")], true).await,
        2
    );
    let n = attempts_after(
        &[
            ("grpc-retry-pushback-ms", "-1"),
            ("grpc-retry-pushback-ms", "100"),
        ],
        true,
    )
    .await;
    assert_eq!(n, 1, "retried despite the server's 'do not retry'");
}

#[path = "support/redis_server.rs"]
mod redis_server;

/// A streaming handler (server-sent events): its body is not ready at once and does not end.
#[derive(Clone)]
struct Sse {
    runs: Arc<AtomicU32>,
    tx: Arc<std::sync::Mutex<Vec<tokio::sync::mpsc::Sender<Bytes>>>>,
}

impl<B: Send + 'static> Service<Request<B>> for Sse {
    type Response = Response<StreamBody<Frames>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, _req: Request<B>) -> Self::Future {
        self.runs.fetch_add(1, Ordering::SeqCst);
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
        self.tx.lock().unwrap().push(tx);
        Box::pin(async move {
            let s = futures_util::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|b| (Ok(Frame::data(b)), rx))
            });
            Ok(Response::builder()
                .status(200)
                .header("content-type", "text/event-stream")
                .body(StreamBody::new(Box::pin(s) as Frames))
                .unwrap())
        })
    }
}

/// A keyed POST answered with a stream (SSE, an LLM completion, a proxied body: any body not
/// ready at once now takes the new tee path). The process is killed mid-stream (a rolling
/// deploy, an OOM kill): simulated by forgetting the body, so nothing runs after that point,
/// the Redis state is what a crash leaves.
///
/// Expected: the idempotency table, "the process crashes mid-request: renewals stop and the
/// lease expires after its time to live (60 s)", and before today's change that held (the
/// body was read inside the response future, which renewed a 60 s lease). What happens: the
/// tee first extends the lease to the record's time to live, 24 h ("A process that crashes
/// mid-stream leaves that key in flight (409) until then"), so the caller's retries with its
/// key get 409 in-flight for a day: the request is neither answered nor run again.
#[tokio::test]
async fn crash_mid_stream_locks_the_key_for_a_day() {
    let Some(server) = RedisServer::start("crash_mid_stream_locks_the_key_for_a_day") else {
        return;
    };
    let c = redis_server::conn(&server.url()).await;
    let sse = Sse {
        runs: Arc::default(),
        tx: Arc::default(),
    };
    let svc = IdempotencyLayer::new(tower_bulwark::idempotency::RedisStore::new(c.clone()))
        .layer(sse.clone());
    let res = svc
        .clone()
        .oneshot(
            Request::builder()
                .method(Method::POST)
                .uri("http://svc/v1/completions")
                .header(IDEMPOTENCY_KEY, "\"job-1\"")
                .body(Full::new(Bytes::from_static(b"{}")))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let tx = sse.tx.lock().unwrap()[0].clone();
    tx.send(Bytes::from_static(b"data: 1\n\n")).await.unwrap();
    let mut body = res.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.is_data());
    // The crash: nothing of this process runs any more.
    std::mem::forget(body);
    std::mem::forget(tx);
    // Let any write the layer already sent land.
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
    let mut conn = c.clone();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!keys.is_empty(), "no claim in Redis");
    for k in keys {
        let pttl: i64 = redis::cmd("PTTL")
            .arg(&k)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(
            pttl <= 60_000,
            "{k}: held for {} s after the crash, not the 60 s lease",
            pttl / 1000
        );
    }
}

/// A server stack with a per-request timeout near the handler, over a backpressure queue:
/// `IdempotencyLayer` → tower `timeout(1 s)` → `BackpressureLayer::new(1).max_wait(5 s)` →
/// handler. The one permit is busy (a slow export on another route sharing the limit), so a keyed POST waits in the queue and
/// the timeout fires there, before the handler ever saw it.
///
/// Expected: the request did not run, so the client's retry with its key runs it once the
/// server is free (the crate's own refusals release the key, and this wait is the same
/// refusal, only cut short by the timeout). What happens (today's change: "an error from below
/// ... tower's `Elapsed` ... is recorded as run, response not kept"): the key is locked as
/// run for the record's 24 h, and every repeat gets 409 `IdempotencyResponseNotStored`: the
/// request is lost though it never ran.
#[tokio::test(start_paused = true)]
async fn timeout_in_the_queue_locks_a_key_that_never_ran() {
    let runs = Arc::new(AtomicU32::new(0));
    let r = runs.clone();
    let handler = tower::service_fn(move |req: Request<Full<Bytes>>| {
        let r = r.clone();
        async move {
            if req.headers().get(IDEMPOTENCY_KEY).is_none() {
                tokio::time::sleep(Duration::from_secs(3)).await;
            } else {
                r.fetch_add(1, Ordering::SeqCst);
            }
            Ok::<_, BoxError>(Response::new(Full::new(Bytes::from_static(b"ok"))))
        }
    });
    let bp = tower_bulwark::BackpressureLayer::new(1).max_wait(Duration::from_secs(5));
    // A long-running export on another route holds the shared permit (no timeout there).
    let export = ServiceBuilder::new()
        .layer(tower_bulwark::BackpressureLayer::shared(&bp.handle()))
        .service(handler.clone());
    let svc = ServiceBuilder::new()
        .layer(IdempotencyLayer::new(
            MemoryStore::builder()
                .clock(Clock::tokio())
                .build()
                .unwrap(),
        ))
        .timeout(Duration::from_secs(1))
        .layer(bp)
        .service(handler);
    let keyed = || {
        Request::builder()
            .method(Method::POST)
            .uri("http://svc/orders")
            .header(IDEMPOTENCY_KEY, "\"order-7\"")
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap()
    };
    let slow = tokio::spawn(export.oneshot(post()));
    tokio::task::yield_now().await;
    let first = svc.clone().oneshot(keyed()).await;
    assert!(first.is_err(), "the queued request should time out");
    assert_eq!(
        runs.load(Ordering::SeqCst),
        0,
        "the keyed request never ran"
    );
    slow.await.unwrap().unwrap();
    let again = svc.clone().oneshot(keyed()).await;
    assert!(
        again.is_ok(),
        "the retry of a request that never ran was refused: {again:?}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// The client waits out a server's `Retry-After: 3` as the hint plus a jitter (3 to 9 s, the
/// retry docs), under an overall `deadline(5 s)`. Expected (`RetryPolicy::deadline`: "no
/// backoff and no new attempt starts past it"; Server hints: a hint "that would start the next
/// attempt past the deadline stops the retries: the response ... is returned at once"): the
/// call returns within the deadline, at once or with the retry's answer. Checks many seeds.
/// Regression check (passes).
#[tokio::test(start_paused = true)]
async fn jittered_hint_wait_never_runs_past_the_deadline() {
    for seed in 0..64u64 {
        let calls = Arc::new(AtomicU32::new(0));
        let c = calls.clone();
        let inner = tower::service_fn(
            move |_req: Request<tower_bulwark::retry::ReplayBody<Full<Bytes>>>| {
                let n = c.fetch_add(1, Ordering::SeqCst);
                async move {
                    let res = if n == 0 {
                        Response::builder().status(503).header("retry-after", "3")
                    } else {
                        Response::builder().status(200)
                    };
                    Ok::<_, BoxError>(res.body(Full::new(Bytes::new())).unwrap())
                }
            },
        );
        let start = tokio::time::Instant::now();
        let req = Request::get("http://svc/a")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let res = RetryLayer::new(
            RetryPolicy::http()
                .clock(Clock::tokio())
                .seed(seed)
                .deadline(Duration::from_secs(5)),
        )
        .unwrap()
        .layer(inner)
        .oneshot(req)
        .await
        .unwrap();
        let took = start.elapsed();
        assert!(
            took <= Duration::from_secs(5),
            "seed {seed}: returned {} after {took:?}, past the 5 s deadline ({} attempts)",
            res.status(),
            calls.load(Ordering::SeqCst)
        );
    }
}

/// One client (one credential, 255 requests: within the README's 100/s, burst 200 rate limit
/// in under 2 s) POSTs with fresh keys to a streaming endpoint (SSE) and never reads the
/// bodies, holding the connections open. Since today's tee, each response handed on as it
/// streams keeps its room for the copy (`max_response_body`, 1 MiB) "until its body ends",
/// "however slowly the client reads", out of the layer-wide `max_buffered_bytes` (256 MiB).
///
/// Expected: a client that does not read its own streams slows only itself (before the tee,
/// the layer read a stream as the handler produced it, so a client's reading did not decide
/// how long the room was held). What happens: 255 idle streams hold all the room, and
/// every other caller's keyed request on every route of the layer (here a plain JSON
/// `POST /orders`) is refused 503 `Overloaded` for as long as the attacker keeps them open.
#[tokio::test(start_paused = true)]
async fn unread_keyed_streams_deny_every_keyed_request() {
    let layer = IdempotencyLayer::new(
        MemoryStore::builder()
            .clock(Clock::tokio())
            .build()
            .unwrap(),
    );
    let sse = Sse {
        runs: Arc::default(),
        tx: Arc::default(),
    };
    let stream_route = layer.layer(sse.clone());
    let orders = layer.layer(tower::service_fn(|_req: Request<Full<Bytes>>| async {
        Ok::<_, BoxError>(Response::new(Full::new(Bytes::from_static(b"{\"id\":1}"))))
    }));
    let keyed = |uri: &str, key: String| {
        Request::builder()
            .method(Method::POST)
            .uri(uri)
            .header(IDEMPOTENCY_KEY, format!("\"{key}\""))
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap()
    };
    let mut held = Vec::new();
    for i in 0..256 {
        let Ok(res) = stream_route
            .clone()
            .oneshot(keyed("http://svc/v1/events", format!("attacker-{i}")))
            .await
        else {
            break; // the attacker's own streams already fill the room
        };
        assert_eq!(res.status(), 200);
        held.push(res.into_body()); // never read
    }
    eprintln!("{} unread streams held", held.len());
    tokio::time::advance(Duration::from_secs(1)).await;
    let victim = orders
        .clone()
        .oneshot(keyed("http://svc/orders", "victim-1".to_owned()))
        .await;
    assert!(
        victim.as_ref().is_ok_and(|r| r.status() == 200),
        "another caller's keyed POST /orders was refused: {:?}",
        victim.map(|r| r.status())
    );
    drop(held);
}

/// Regression check (passes): a keyed breaker (8 slots) whose "sick" host tripped and is
/// still asked for (refused) keeps its slot through a flood of 500 new hosts over 8 minutes,
/// as the docs promise ("a breaker that has tripped and is still asked for is never reused").
#[tokio::test(start_paused = true)]
async fn key_flood_does_not_reset_a_tripped_breaker_still_asked_for() {
    let breakers = CircuitBreakerLayer::keyed(
        BreakerConfig::consecutive_failures(1)
            .open_time(Duration::from_secs(3600))
            .max_open_time(Duration::from_secs(3600))
            .max_keys(8)
            .clock(Clock::tokio()),
        |host: &String| Some(host.clone()),
    )
    .unwrap();
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let svc = breakers.layer(tower::service_fn(move |host: String| {
        let c = c.clone();
        async move {
            if host == "sick" {
                c.fetch_add(1, Ordering::SeqCst);
                Err::<(), BoxError>("down".into())
            } else {
                Ok(())
            }
        }
    }));
    assert!(svc.clone().oneshot("sick".to_owned()).await.is_err());
    for i in 0..500 {
        let _ = svc.clone().oneshot(format!("host-{i}")).await;
        if i % 10 == 0 {
            assert!(svc.clone().oneshot("sick".to_owned()).await.is_err());
        }
        tokio::time::advance(Duration::from_secs(1)).await;
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the tripped breaker was reset by the flood"
    );
}

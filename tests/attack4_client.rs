//! Attack 4: the client side (retry, circuit breaker, their cooperation with each other and
//! with tower's layers). Public API and docs only. Paused tokio time throughout.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use http_body_util::{BodyExt, Full};
use tokio::time::Instant;
use tower::{BoxError, Service, ServiceExt};
use tower_bulwark::circuit_breaker::{BreakerConfig, BreakerState, CircuitBreakerLayer};
use tower_bulwark::classify::HttpStatus;
use tower_bulwark::clock::Clock;
use tower_bulwark::retry::{Backoff, Budget, RetryLayer, RetryPolicy};
use tower_bulwark::{Rejection, RejectionKind};

/// One scripted reply: status and headers. The last line of a script repeats.
type Reply = (u16, Vec<(&'static str, &'static str)>);

/// When each attempt came and what key it carried.
type Attempts = Arc<Mutex<Vec<(Instant, Option<String>)>>>;

/// Answers from a script and records when each attempt came and what key it carried.
#[derive(Clone)]
struct Scripted {
    script: Arc<Vec<Reply>>,
    seen: Attempts,
}

impl Scripted {
    fn new(script: Vec<Reply>) -> Self {
        Scripted {
            script: Arc::new(script),
            seen: Arc::default(),
        }
    }
    fn calls(&self) -> usize {
        self.seen.lock().unwrap().len()
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
            let _ = body.collect().await.map_err(Into::into)?;
            let n = {
                let mut seen = this.seen.lock().unwrap();
                seen.push((
                    Instant::now(),
                    parts
                        .headers
                        .get("idempotency-key")
                        .map(|v| v.to_str().unwrap().to_owned()),
                ));
                seen.len() - 1
            };
            let (status, headers) = &this.script[n.min(this.script.len() - 1)];
            let mut res = Response::builder().status(*status);
            for (k, v) in headers {
                res = res.header(*k, *v);
            }
            Ok(res.body(Full::new(Bytes::from_static(b"answer"))).unwrap())
        })
    }
}

fn grpc_call() -> Request<Full<Bytes>> {
    Request::post("http://svc.example/pkg.Payments/Charge")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\x05hello")))
        .unwrap()
}

fn get(uri: &str) -> Request<Full<Bytes>> {
    Request::get(uri).body(Full::new(Bytes::new())).unwrap()
}

// ---------------------------------------------------------------------------------------------
// gRPC: a proxy's 504 (or 502) is a timeout, not "not processed"
// ---------------------------------------------------------------------------------------------

/// Scenario: a tonic-style client with `RetryPolicy::grpc()` calls a non-idempotent method
/// (`Charge`, no `Idempotency-Key`, not marked `Idempotent`) through an HTTP proxy / load
/// balancer. The proxy forwards the call, the upstream runs it but answers too late, and the
/// proxy answers `504 Gateway Timeout` without `grpc-status`.
///
/// Expected (docs of `RetryPolicy::grpc`, `HttpReplay`): "an error (a per-attempt timeout, a
/// transport error after sending) says nothing of [whether the call was processed], so after
/// one a gRPC call is retried only if it carries an `Idempotency-Key` or is marked
/// `Idempotent`". A gateway timeout is exactly such a timeout, only reported by the proxy: the
/// upstream may well have charged the card.
///
/// What happens: the 504 is mapped to `UNAVAILABLE` (gRPC's HTTP mapping) and retried as "not
/// processed", whatever the method: the upstream runs the charge a second time.
#[tokio::test(start_paused = true)]
async fn grpc_proxy_gateway_timeout_is_not_retried_for_a_non_idempotent_call() {
    let inner = Scripted::new(vec![(504, vec![]), (200, vec![("grpc-status", "0")])]);
    let svc = tower::ServiceBuilder::new()
        .layer(RetryLayer::new(RetryPolicy::grpc().clock(Clock::tokio())).unwrap())
        .service(inner.clone());
    let res = svc.oneshot(grpc_call()).await.unwrap();
    assert_eq!(
        inner.calls(),
        1,
        "a non-idempotent gRPC call was sent again after a 504 Gateway Timeout (answer {:?})",
        res.status()
    );
    assert_eq!(res.status(), 504);
}

/// Control for the test above: the same call answered `grpc-status: 14` (UNAVAILABLE) by a
/// gRPC server is retried, as documented. Kept as a regression check.
#[tokio::test(start_paused = true)]
async fn grpc_unavailable_status_is_retried() {
    let inner = Scripted::new(vec![
        (200, vec![("grpc-status", "14")]),
        (200, vec![("grpc-status", "0")]),
    ]);
    let svc = tower::ServiceBuilder::new()
        .layer(RetryLayer::new(RetryPolicy::grpc().clock(Clock::tokio())).unwrap())
        .service(inner.clone());
    let res = svc.oneshot(grpc_call()).await.unwrap();
    assert_eq!(inner.calls(), 2);
    assert_eq!(res.headers()["grpc-status"], "0");
}

// ---------------------------------------------------------------------------------------------
// Hints
// ---------------------------------------------------------------------------------------------

/// Scenario: a server (or two proxies in a row) sends two `Retry-After` fields on a 503 to a
/// GET: `Retry-After: 1` and `Retry-After: 3600`.
///
/// Expected (retry module docs, Server hints): "A response carrying several hints [...] is read
/// by the latest of them: never retried before any hint the server gave"; a hint longer than
/// the maximum delay returns the response at once.
///
/// What happens: only the first field (1 s) is read; the request is retried after about a
/// second, 3599 s before the second field allowed. (`grpc-retry-pushback-ms` is read the same
/// way: two fields `1` and `3600000` on an `UNAVAILABLE` were retried at once, checked by hand.)
#[tokio::test(start_paused = true)]
async fn several_retry_after_fields_are_read_by_the_latest() {
    let inner = Scripted::new(vec![
        (503, vec![("retry-after", "1"), ("retry-after", "3600")]),
        (200, vec![]),
    ]);
    let svc = tower::ServiceBuilder::new()
        .layer(
            RetryLayer::new(
                RetryPolicy::http()
                    .backoff(Backoff::exponential(
                        Duration::from_millis(100),
                        Duration::from_secs(10),
                    ))
                    .clock(Clock::tokio()),
            )
            .unwrap(),
        )
        .service(inner.clone());
    let res = svc.oneshot(get("http://a.example/x")).await.unwrap();
    assert_eq!(
        inner.calls(),
        1,
        "retried although one Retry-After said 3600 s (max delay 10 s)"
    );
    assert_eq!(res.status(), 503);
}

/// Scenario: a 503 to a GET carries `Retry-After: 99999999999999999999` (a server that means
/// "a very long time", or a value past `u64`).
///
/// Expected: RFC 9110 delta-seconds is "a non-negative decimal integer"; a value too large to
/// represent is still a very long wait (RFC 9111 §1.2.2: treat an overflowing delta-seconds as
/// the greatest representable value). The docs: "The layer never tries earlier" and a hint
/// longer than the maximum delay stops the retries.
///
/// Regression check (it holds: the response is returned at once).
#[tokio::test(start_paused = true)]
async fn an_overflowing_retry_after_is_a_long_wait_not_no_hint() {
    let inner = Scripted::new(vec![
        (503, vec![("retry-after", "99999999999999999999")]),
        (200, vec![]),
    ]);
    let svc = tower::ServiceBuilder::new()
        .layer(RetryLayer::new(RetryPolicy::http().clock(Clock::tokio())).unwrap())
        .service(inner.clone());
    let res = svc.oneshot(get("http://a.example/x")).await.unwrap();
    assert_eq!(inner.calls(), 1, "retried early, against the server's hint");
    assert_eq!(res.status(), 503);
}

/// Scenario: a 503 with a long `grpc-retry-pushback-ms` that overflows `u64`.
/// Expected: "negative or malformed: no retry"; at least never early. Regression check.
#[tokio::test(start_paused = true)]
async fn an_overflowing_pushback_stops() {
    let inner = Scripted::new(vec![
        (
            200,
            vec![
                ("grpc-status", "14"),
                ("grpc-retry-pushback-ms", "99999999999999999999999"),
            ],
        ),
        (200, vec![("grpc-status", "0")]),
    ]);
    let svc = tower::ServiceBuilder::new()
        .layer(RetryLayer::new(RetryPolicy::grpc().clock(Clock::tokio())).unwrap())
        .service(inner.clone());
    let _ = svc.oneshot(grpc_call()).await.unwrap();
    assert_eq!(inner.calls(), 1);
}

/// Scenario: `Retry-After: 2` on a 503 to a GET, max delay 10 s. Expected: the retry comes at
/// 2 s or later, never before. Regression check for issue 14 item 1.
#[tokio::test(start_paused = true)]
async fn retry_after_is_never_cut_short() {
    for _ in 0..20 {
        let inner = Scripted::new(vec![(503, vec![("retry-after", "2")]), (200, vec![])]);
        let svc = tower::ServiceBuilder::new()
            .layer(
                RetryLayer::new(
                    RetryPolicy::http()
                        .backoff(Backoff::exponential(
                            Duration::from_millis(100),
                            Duration::from_secs(10),
                        ))
                        .clock(Clock::tokio()),
                )
                .unwrap(),
            )
            .service(inner.clone());
        let res = svc.oneshot(get("http://a.example/x")).await.unwrap();
        assert_eq!(res.status(), 200);
        let seen = inner.seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 2);
        assert!(seen[1].0 - seen[0].0 >= Duration::from_secs(2));
    }
}

// ---------------------------------------------------------------------------------------------
// Budget
// ---------------------------------------------------------------------------------------------

/// Scenario: a budget that has been idle for an hour (a client started at night), then a fault:
/// 2,000 requests in one second, every one failing. Expected (issue 14 item 3, `Budget` docs):
/// retries stay at or below `ratio ×` the window's requests plus the floor: 0.2 × 2000 + 10 ×
/// 10 s ≤ 500 at most. Regression check.
#[test]
fn an_idle_budget_does_not_lend_a_storm() {
    let (clock, hand) = Clock::manual();
    let budget = Budget::builder().clock(clock).build().unwrap();
    budget.deposit();
    hand.advance(Duration::from_secs(3600));
    let mut granted = 0;
    for _ in 0..2000 {
        hand.advance(Duration::from_micros(500));
        budget.deposit();
        if budget.try_withdraw() {
            granted += 1;
        }
    }
    assert!(
        granted <= 0.2f64.mul_add(2000.0, 100.0) as u32,
        "{granted} retries"
    );
}

/// Scenario: steady traffic of 11 requests a second from four threads (a multi-threaded
/// runtime), `ratio(0.2)`, no floor; after 20 s an isolated failure. Expected (issue 14 item
/// 3): a retry is allowed (tower's TpsBudget allows ~22 over the window). Regression check (it holds).
#[test]
fn steady_traffic_from_several_threads_is_counted() {
    let (clock, hand) = Clock::manual();
    let budget = Budget::builder()
        .ratio(0.2)
        .min_per_second(0)
        .clock(clock)
        .build()
        .unwrap();
    // Four threads, each one of the budget's shards, take turns: 11 requests a second overall.
    let (txs, handles): (Vec<_>, Vec<_>) = (0..4)
        .map(|_| {
            let (tx, rx) = std::sync::mpsc::channel::<std::sync::mpsc::Sender<()>>();
            let b = budget.clone();
            let h = std::thread::spawn(move || {
                while let Ok(done) = rx.recv() {
                    b.deposit();
                    done.send(()).unwrap();
                }
            });
            (tx, h)
        })
        .unzip();
    let step = Duration::from_nanos(1_000_000_000 / 11);
    for i in 0..(20 * 11) {
        hand.advance(step);
        let (dtx, drx) = std::sync::mpsc::channel();
        txs[i % 4].send(dtx).unwrap();
        drx.recv().unwrap();
    }
    drop(txs);
    for h in handles {
        h.join().unwrap();
    }
    let figures = budget.figures();
    assert!(
        budget.try_withdraw(),
        "an isolated failure after 20 s of 11 req/s was not retried: {figures:?}"
    );
}

/// Scenario: a request fails, its retry is granted by the budget (floor 1 a second, no ratio),
/// and the caller drops the call during the backoff. Expected (budget docs: a retry withdrawn
/// and never made is given back): the next failing request can still retry. Regression check.
#[tokio::test(start_paused = true)]
async fn a_retry_dropped_in_its_backoff_is_refunded() {
    let budget = Budget::builder()
        .ratio(0.0)
        .min_per_second(1)
        .window(Duration::from_secs(1))
        .clock(Clock::tokio())
        .build()
        .unwrap();
    let inner = Scripted::new(vec![(503, vec![]), (503, vec![]), (200, vec![])]);
    let layer = RetryLayer::new(
        RetryPolicy::http()
            .backoff(
                Backoff::exponential(Duration::from_secs(5), Duration::from_secs(5))
                    .jitter(tower_bulwark::retry::Jitter::None),
            )
            .max_attempts(2)
            .budget(budget),
    )
    .unwrap();
    let svc = tower::ServiceBuilder::new()
        .layer(layer)
        .service(inner.clone());
    let fut = svc.clone().oneshot(get("http://a.example/x"));
    let r = tokio::time::timeout(Duration::from_millis(10), fut).await;
    assert!(r.is_err(), "the first call should still be in its backoff");
    assert_eq!(inner.calls(), 1);
    let res = svc.oneshot(get("http://a.example/x")).await.unwrap();
    assert_eq!(inner.calls(), 3, "the refunded retry was not available");
    assert_eq!(res.status(), 200);
}

// ---------------------------------------------------------------------------------------------
// Readiness, deadlines
// ---------------------------------------------------------------------------------------------

/// A service that answers its first call 503 and then is never ready again (a dependency whose
/// connection pool is gone).
#[derive(Clone)]
struct ThenNeverReady {
    calls: Arc<AtomicU32>,
}

impl Service<Request<tower_bulwark::retry::ReplayBody<Full<Bytes>>>> for ThenNeverReady {
    type Response = Response<Full<Bytes>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if self.calls.load(Ordering::SeqCst) == 0 {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }

    fn call(
        &mut self,
        _req: Request<tower_bulwark::retry::ReplayBody<Full<Bytes>>>,
    ) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Box::pin(async {
            Ok(Response::builder()
                .status(503)
                .body(Full::new(Bytes::from_static(b"first")))
                .unwrap())
        })
    }
}

/// Scenario: a GET answered 503, then the dependency is never ready again; the policy has a
/// 2 s deadline. Expected (retry docs: "A deadline also bounds the wait for the inner
/// service's readiness before a retry: [...] the last response or error is returned"): the
/// 503 comes back by the deadline, not a hang, and it is the original response (its body).
/// Regression check.
#[tokio::test(start_paused = true)]
async fn a_retry_waiting_on_readiness_returns_the_last_answer_at_the_deadline() {
    let inner = ThenNeverReady {
        calls: Arc::default(),
    };
    let svc = tower::ServiceBuilder::new()
        .layer(
            RetryLayer::new(
                RetryPolicy::http()
                    .deadline(Duration::from_secs(2))
                    .clock(Clock::tokio()),
            )
            .unwrap(),
        )
        .service(inner);
    let start = Instant::now();
    let res = tokio::time::timeout(Duration::from_secs(60), svc.oneshot(get("http://a/x")))
        .await
        .expect("hung past the deadline")
        .unwrap();
    assert_eq!(res.status(), 503);
    assert!(Instant::now() - start <= Duration::from_secs(3));
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"first");
}

// ---------------------------------------------------------------------------------------------
// Keyed breakers
// ---------------------------------------------------------------------------------------------

/// Scenario: a keyed breaker (per host), `consecutive_failures(1)`, a small table. A call to
/// host A is in flight (slow); meanwhile traffic to other, healthy hosts takes A's slot (A's
/// breaker was healthy: "A new key whose slots are all taken reuses one whose breaker is
/// healthy"). Then A's slow call fails.
///
/// Expected (`BreakerHandle` docs: a handle "never acts on the breaker of the key that took
/// its slot"; state docs: "an outcome from a call admitted under another state [...] is not
/// counted"): A's late failure must not trip the breaker of the healthy host that took the
/// slot.
///
/// Regression check (it holds).
#[tokio::test(start_paused = true)]
async fn a_late_outcome_of_an_evicted_key_does_not_trip_the_key_that_took_its_slot() {
    let gate = Arc::new(tokio::sync::Notify::new());
    let g = gate.clone();
    let inner = tower::service_fn(move |req: Request<()>| {
        let g = g.clone();
        async move {
            if req.uri().host() == Some("slow.example") {
                g.notified().await;
                Ok::<_, BoxError>(Response::builder().status(503).body(()).unwrap())
            } else {
                Ok(Response::builder().status(200).body(()).unwrap())
            }
        }
    });
    let layer = CircuitBreakerLayer::keyed(
        BreakerConfig::consecutive_failures(1)
            .max_keys(1)
            .clock(Clock::tokio()),
        |req: &Request<()>| req.uri().host().map(str::to_owned),
    )
    .unwrap()
    .classify(HttpStatus::new());
    let svc = tower::ServiceBuilder::new()
        .layer(layer.clone())
        .service(inner);

    let slow = tokio::spawn(
        svc.clone()
            .oneshot(Request::get("http://slow.example/").body(()).unwrap()),
    );
    tokio::task::yield_now().await;
    assert!(layer
        .handle_for(&Some("slow.example".to_string()))
        .is_some());
    // Many other hosts, all healthy: some take the slow host's slot.
    let mut hosts = Vec::new();
    for i in 0..64 {
        let host = format!("h{i}.example");
        let res = svc
            .clone()
            .oneshot(Request::get(format!("http://{host}/")).body(()).unwrap())
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        hosts.push(host);
    }
    let evicted = layer
        .handle_for(&Some("slow.example".to_string()))
        .map(|h| h.state());
    assert!(
        evicted.is_none(),
        "the slow host's slot was not taken: {evicted:?}"
    );
    gate.notify_one();
    let _ = slow.await.unwrap();
    let tripped: Vec<_> = hosts
        .iter()
        .filter(|h| {
            layer
                .handle_for(&Some(h.to_string()))
                .map(|x| x.state() != BreakerState::Closed)
                .unwrap_or(false)
        })
        .collect();
    assert!(
        tripped.is_empty(),
        "healthy hosts {tripped:?} tripped by another host's late failure (slow host's handle: {evicted:?})"
    );
}

// ---------------------------------------------------------------------------------------------
// Retry over breaker
// ---------------------------------------------------------------------------------------------

/// Scenario: the README's client stack (retry over breaker), the breaker open for 5 s while the
/// retry's max delay is 1 s. Expected: the `CircuitOpen` rejection is returned at once with its
/// hint, not waited out (retry docs). Regression check.
#[tokio::test(start_paused = true)]
async fn an_open_breaker_longer_than_max_delay_is_returned_at_once() {
    let inner = Scripted::new(vec![(503, vec![])]);
    let breaker = CircuitBreakerLayer::new(
        BreakerConfig::consecutive_failures(1)
            .open_time(Duration::from_secs(5))
            .clock(Clock::tokio()),
    )
    .unwrap()
    .classify(HttpStatus::new());
    let svc = tower::ServiceBuilder::new()
        .layer(RetryLayer::new(RetryPolicy::http().clock(Clock::tokio())).unwrap())
        .layer(breaker)
        .service(inner.clone());
    let _ = svc.clone().oneshot(get("http://a/x")).await;
    let start = Instant::now();
    let err = svc.oneshot(get("http://a/x")).await.unwrap_err();
    let rej = Rejection::find(&*err).expect("a rejection");
    assert_eq!(rej.kind(), RejectionKind::CircuitOpen);
    assert!(Instant::now() - start < Duration::from_millis(1));
}

/// Scenario: a crawler-like client with a keyed breaker per host (`max_keys(4)`), which calls
/// many hosts. Four hosts are down once and never called again: their breakers trip. An hour
/// later a fifth host goes down and is called in a loop.
///
/// Expected (`CircuitBreakerLayer::keyed`: "the memory is fixed", the table "reuses one whose
/// breaker is healthy"): a breaker whose open time ended an hour ago and that no request has
/// touched since holds no information worth more than protecting a host that is failing now;
/// the sick fifth host gets a breaker and its calls are refused after it trips.
///
/// What happens: the sick host is called every time: tripped breakers are never reused and an open breaker only
/// half-opens on a request of its own key, so a key that is never called again holds its slot
/// for ever. Once `max_keys` hosts have ever tripped, every new host runs without any breaker.
#[tokio::test(start_paused = true)]
async fn stale_tripped_keys_do_not_disable_breakers_for_new_hosts() {
    let calls = Arc::new(Mutex::new(std::collections::HashMap::<String, u32>::new()));
    let c = calls.clone();
    let inner = tower::service_fn(move |req: Request<()>| {
        *c.lock()
            .unwrap()
            .entry(req.uri().host().unwrap().to_owned())
            .or_default() += 1;
        async move { Ok::<_, BoxError>(Response::builder().status(503).body(()).unwrap()) }
    });
    let layer = CircuitBreakerLayer::keyed(
        BreakerConfig::consecutive_failures(1)
            .open_time(Duration::from_secs(1))
            .max_keys(4)
            .clock(Clock::tokio()),
        |req: &Request<()>| req.uri().host().map(str::to_owned),
    )
    .unwrap()
    .classify(HttpStatus::new());
    let svc = tower::ServiceBuilder::new()
        .layer(layer.clone())
        .service(inner);
    let call = |host: &str| {
        svc.clone()
            .oneshot(Request::get(format!("http://{host}/")).body(()).unwrap())
    };
    for i in 0..16 {
        let _ = call(&format!("gone{i}.example")).await;
    }
    tokio::time::advance(Duration::from_secs(3600)).await;
    for _ in 0..20 {
        let _ = call("sick.example").await;
    }
    let n = calls.lock().unwrap()["sick.example"];
    assert_eq!(
        n,
        1,
        "the sick host was called {n} times: no breaker for it (keys in use {})",
        layer.keys_in_use()
    );
}

// ---------------------------------------------------------------------------------------------
// Breakers inside tower's balancer
// ---------------------------------------------------------------------------------------------

/// An endpoint of a balanced cluster: answers 503 when sick, 200 after 10 ms when well.
#[derive(Clone)]
struct Endpoint {
    sick: bool,
    calls: Arc<AtomicU32>,
}

impl Service<Request<()>> for Endpoint {
    type Response = Response<()>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<()>, BoxError>> + Send>>;
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, _req: Request<()>) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let sick = self.sick;
        Box::pin(async move {
            if sick {
                Ok(Response::builder().status(503).body(()).unwrap())
            } else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                Ok(Response::builder().status(200).body(()).unwrap())
            }
        })
    }
}

/// Scenario: a client balances over two endpoints with tower's p2c `Balance` (load: pending
/// requests) and gives each endpoint a circuit breaker of its own, so that a sick endpoint is
/// taken out of rotation (outlier ejection; each endpoint is a separate dependency, "Two
/// dependencies that must trip separately need two layers"). One endpoint is sick and its
/// breaker opens. 200 requests arrive, 20 at a time.
///
/// Expected: with a healthy endpoint right there, an open breaker takes its endpoint out of
/// the balancer's choice, and nearly every request is served by the healthy one (tower's
/// balancer routes around endpoints that are not ready; that is what readiness is for).
///
/// What happens: an open breaker's `poll_ready` is `Ready` at once ("tower's `LoadShed`
/// pattern"), so the balancer sees the open endpoint as ready, and as the least loaded one
/// (its refusals complete at once, it rarely has pending requests): p2c keeps sending it its
/// share of the traffic or more, which it refuses with `CircuitOpen` (in this test 90 of 200
/// requests refused, 10 more 503s), while the healthy endpoint has room to spare.
///
/// Fixed by an opt-in readiness for balancers (`CircuitBreakerLayer::for_balancer`): an open
/// breaker's `poll_ready` is pending until its open time ends, so the balancer skips the
/// endpoint. The default stays ready-with-the-refusal (`LoadShed`), which a caller that is not
/// a balancer needs in order to be refused rather than left waiting; this test turns it on.
#[tokio::test(start_paused = true)]
async fn an_open_endpoint_breaker_under_balance_does_not_draw_the_traffic() {
    use tower::balance::p2c::Balance;
    use tower::discover::ServiceList;
    use tower::load::{CompleteOnResponse, PendingRequests};

    let sick_calls = Arc::new(AtomicU32::new(0));
    let well_calls = Arc::new(AtomicU32::new(0));
    let endpoint = |sick: bool, calls: &Arc<AtomicU32>| {
        let breaker = CircuitBreakerLayer::new(
            BreakerConfig::consecutive_failures(3)
                .open_time(Duration::from_secs(30))
                .clock(Clock::tokio()),
        )
        .unwrap()
        .classify(HttpStatus::new())
        .for_balancer();
        PendingRequests::new(
            tower::Layer::layer(
                &breaker,
                Endpoint {
                    sick,
                    calls: calls.clone(),
                },
            ),
            CompleteOnResponse::default(),
        )
    };
    let list = ServiceList::new(vec![
        endpoint(true, &sick_calls),
        endpoint(false, &well_calls),
    ]);
    let mut balance = Balance::new(list);

    let mut ok = 0u32;
    let mut refused = 0u32;
    let mut failed = 0u32;
    for _round in 0..10 {
        // 20 requests in flight at once, as 20 concurrent callers would put them.
        let mut inflight = Vec::new();
        for _ in 0..20 {
            let svc = balance.ready().await.unwrap();
            inflight.push(svc.call(Request::get("http://c/").body(()).unwrap()));
        }
        for r in futures_util::future::join_all(inflight).await {
            match r {
                Ok(res) if res.status() == 200 => ok += 1,
                Ok(_) => failed += 1,
                Err(e) => {
                    assert!(Rejection::find(&*e).is_some(), "{e}");
                    refused += 1
                }
            }
        }
    }
    assert!(
        refused <= 20,
        "{refused} of 200 requests refused by the open endpoint's breaker ({ok} served, {failed} 503) \
         while a healthy endpoint was available ({} calls to it)",
        well_calls.load(Ordering::SeqCst)
    );
}

// ---------------------------------------------------------------------------------------------
// Herds after an outage
// ---------------------------------------------------------------------------------------------

/// Scenario: the README's client stack (retry over breaker), 200 requests a second, a
/// dependency that fails for 3 s and then heals. Attempts reaching the breaker are counted per
/// 10 ms from the first trip on.
///
/// Expected (issue 14 item 2, retry docs: hints are waited out with jitter, "callers refused
/// with hints that point at one instant [...] come back spread", "refusals in half-open do not
/// synchronise retries"): no 10 ms bucket sees more than a few times the steady rate of 2
/// attempts (plus retries).
#[tokio::test(start_paused = true)]
async fn retries_over_a_breaker_do_not_come_back_in_a_herd() {
    let start = Instant::now();
    let heal_at = start + Duration::from_secs(3);
    let inner = tower::service_fn(
        move |_req: Request<tower_bulwark::retry::ReplayBody<Full<Bytes>>>| async move {
            tokio::time::sleep(Duration::from_millis(2)).await;
            let status = if Instant::now() < heal_at { 503 } else { 200 };
            Ok::<_, BoxError>(Response::builder().status(status).body(()).unwrap())
        },
    );
    let attempts = Arc::new(Mutex::new(Vec::<Duration>::new()));
    let a = attempts.clone();
    let svc = tower::ServiceBuilder::new()
        .layer(
            RetryLayer::new(
                RetryPolicy::http()
                    .max_attempts(4)
                    .budget(Budget::ratio(0.2).unwrap())
                    .clock(Clock::tokio()),
            )
            .unwrap(),
        )
        .map_request(move |r: Request<_>| {
            a.lock().unwrap().push(Instant::now() - start);
            r
        })
        .layer(
            CircuitBreakerLayer::new(
                BreakerConfig::failure_rate(0.5)
                    .window(100)
                    .open_time(Duration::from_millis(800))
                    .max_open_time(Duration::from_millis(800))
                    .clock(Clock::tokio()),
            )
            .unwrap()
            .classify(HttpStatus::new()),
        )
        .service(inner);
    let svc = tower::util::BoxCloneSyncService::new(svc);
    let refused = Arc::new(AtomicU32::new(0));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..(200 * 6) {
        let s = svc.clone();
        let r = refused.clone();
        set.spawn(async move {
            if let Err(e) = s.oneshot(get("http://dep/x")).await {
                if Rejection::find(&*e).is_some() {
                    r.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    while set.join_next().await.is_some() {}
    let attempts = attempts.lock().unwrap().clone();
    let mut buckets = std::collections::BTreeMap::<u128, u32>::new();
    for t in &attempts {
        *buckets.entry(t.as_millis() / 10).or_default() += 1;
    }
    let (worst_at, worst) = buckets
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(k, n)| (*k, *n))
        .unwrap();
    assert!(
        refused.load(Ordering::SeqCst) > 0,
        "the breaker never opened"
    );
    assert!(
        worst <= 12,
        "{worst} attempts in the 10 ms from {} ms (steady rate: 2)",
        worst_at * 10
    );
}

// ---------------------------------------------------------------------------------------------
// A never-ready dependency behind a Buffer
// ---------------------------------------------------------------------------------------------

/// Answers 503 and is ready while `ready` is set; once cleared, `poll_ready` is pending for
/// ever (a connection pool that never gets a connection back).
#[derive(Clone)]
struct Wedged {
    ready: Arc<std::sync::atomic::AtomicBool>,
}

impl Service<Request<()>> for Wedged {
    type Response = Response<()>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<()>, BoxError>> + Send>>;
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if self.ready.load(Ordering::SeqCst) {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }
    fn call(&mut self, _req: Request<()>) -> Self::Future {
        Box::pin(async { Ok(Response::builder().status(503).body(()).unwrap()) })
    }
}

/// Scenario: a client shares one breaker-wrapped service through tower's `Buffer` (how a
/// non-`Clone` client, or a stack that must be `Clone`, is shared among tasks). The
/// dependency fails, the breaker opens for 1 s; meanwhile the dependency wedges: its
/// `poll_ready` never completes. After the open time, callers keep coming, each with a 10 s
/// timeout.
///
/// Expected (`CircuitBreaker` `# Readiness`: "A sick dependency that is never ready therefore
/// cannot make callers hang, and cannot hold the breaker half-open either: a slot held longer
/// than the probe time limit [...] fails its round"): once the probe's slot is past its limit
/// (the 1 s open time just served), the callers are refused with `CircuitOpen`.
///
/// What happens: the Buffer's worker is the one service that polls the breaker; its
/// `poll_ready` claimed the probe slot and waits on the wedged dependency, and nothing wakes
/// it when the round fails. Every caller queued behind it hangs until its own timeout.
#[tokio::test(start_paused = true)]
async fn a_wedged_dependency_behind_a_buffer_does_not_hang_every_caller() {
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let breaker = CircuitBreakerLayer::new(
        BreakerConfig::consecutive_failures(1)
            .open_time(Duration::from_secs(1))
            .jitter(0.0)
            .clock(Clock::tokio()),
    )
    .unwrap()
    .classify(HttpStatus::new());
    let handle = breaker.handle();
    let svc = tower::buffer::Buffer::new(
        tower::Layer::layer(
            &breaker,
            Wedged {
                ready: ready.clone(),
            },
        ),
        64,
    );
    let res = svc
        .clone()
        .oneshot(Request::get("http://d/").body(()).unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(handle.state(), BreakerState::Open);
    ready.store(false, Ordering::SeqCst);
    tokio::time::advance(Duration::from_secs(2)).await;

    let mut refused = 0;
    let mut timed_out = 0;
    for _ in 0..10 {
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            svc.clone()
                .oneshot(Request::get("http://d/").body(()).unwrap()),
        )
        .await;
        match r {
            Err(_) => timed_out += 1,
            Ok(Err(e)) if Rejection::find(&*e).is_some() => refused += 1,
            Ok(other) => panic!("unexpected {:?}", other.map(|r| r.status())),
        }
    }
    assert!(
        timed_out <= 1,
        "{timed_out} of 10 callers hung 10 s each ({refused} refused); breaker {:?}",
        handle.figures()
    );
}

// ---------------------------------------------------------------------------------------------
// tonic end to end: replay of a request body over HTTP/2
// ---------------------------------------------------------------------------------------------

/// A server layer that refuses the first `refuse` calls trailers-only with `UNAVAILABLE`,
/// before reading their bodies (as a server-side limiter or a draining server does).
#[derive(Clone)]
struct RefuseFirst<S> {
    inner: S,
    refuse: Arc<AtomicU32>,
    seen: Arc<AtomicU32>,
}

impl<S, B> Service<Request<B>> for RefuseFirst<S>
where
    S: Service<Request<B>, Response = Response<tonic::body::Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Send + 'static,
{
    type Response = Response<tonic::body::Body>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }
    fn call(&mut self, req: Request<B>) -> Self::Future {
        self.seen.fetch_add(1, Ordering::SeqCst);
        let refuse = self
            .refuse
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if refuse {
            return Box::pin(async {
                Ok(Response::builder()
                    .header("content-type", "application/grpc")
                    .header("grpc-status", "14")
                    .body(tonic::body::Body::empty())
                    .unwrap())
            });
        }
        let fut = self.inner.call(req);
        Box::pin(async move { fut.await.map_err(Into::into) })
    }
}

/// Scenario: a tonic client with `RetryPolicy::grpc()` (the `tonic_client` example's stack)
/// over a real HTTP/2 connection; the server refuses the first two calls of a health check
/// with a trailers-only `UNAVAILABLE` before reading their bodies, then serves. Ten calls,
/// one after the other.
///
/// Expected (retry docs: "non-`Clone` bodies replayed through a bounded buffer (so tonic
/// clients work)"; `UNAVAILABLE` is retried): every call succeeds, retried as needed.
/// Regression check (the replay body must not still be held by hyper when the retry is
/// decided).
#[tokio::test(start_paused = true)]
async fn tonic_calls_refused_before_their_body_is_read_are_retried() {
    use tonic::transport::{server::TcpIncoming, Channel, Server};
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_reporter, health) = tonic_health::server::health_reporter();
    let refuse = Arc::new(AtomicU32::new(0));
    let seen = Arc::new(AtomicU32::new(0));
    let (r, s2) = (refuse.clone(), seen.clone());
    tokio::spawn(async move {
        Server::builder()
            .layer(tower::layer::layer_fn(move |inner| RefuseFirst {
                inner,
                refuse: r.clone(),
                seen: s2.clone(),
            }))
            .add_service(health)
            .serve_with_incoming(TcpIncoming::from(listener))
            .await
    });
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let retry = RetryLayer::new(
        RetryPolicy::grpc()
            .max_attempts(4)
            .budget(Budget::builder().min_per_second(100).build().unwrap())
            .clock(Clock::tokio()),
    )
    .unwrap();
    let handle = retry.handle();
    let svc = tower::ServiceBuilder::new()
        .layer(retry)
        .map_request(|r: Request<_>| r.map(tonic::body::Body::new))
        .service(channel);
    let mut client = HealthClient::new(svc);
    let mut failed = Vec::new();
    for i in 0..10 {
        refuse.store(2, Ordering::SeqCst);
        let r = client
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await;
        if let Err(status) = r {
            failed.push((i, status.code()));
        }
    }
    assert!(
        failed.is_empty(),
        "calls failed although retries were left: {failed:?}; server saw {} attempts, {} retries",
        seen.load(Ordering::SeqCst),
        handle.retries()
    );
}

/// Scenario: the README's client stack around hyper-util's client (HTTP/1, keep-alive), a POST
/// with `add_idempotency_key()` and a 60 KiB body (under the 64 KiB replay cap); the server
/// answers the first attempt 503 without reading the body (a load shedder in front of the
/// handler: this crate's, whose answer says so with `Request-Refused`), then serves. Ten such
/// calls.
///
/// Expected (README: "non-`Clone` bodies replayed through a bounded buffer", a POST with a key
/// is retried): each call ends 201 after one retry.
#[tokio::test(start_paused = true)]
async fn hyper_post_refused_before_its_body_is_read_is_retried() {
    use axum::routing::post;
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    let refuse = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = Arc::new(AtomicU32::new(0));
    let (r, s2) = (refuse.clone(), seen.clone());
    let app = axum::Router::new().route(
        "/orders",
        post(move |req: axum::extract::Request| {
            let (r, s2) = (r.clone(), s2.clone());
            async move {
                s2.fetch_add(1, Ordering::SeqCst);
                if r.swap(false, Ordering::SeqCst) {
                    return (
                        http::StatusCode::SERVICE_UNAVAILABLE,
                        [("request-refused", "overloaded")],
                        "busy",
                    )
                        .into_response();
                }
                let n = req.into_body().collect().await.unwrap().to_bytes().len();
                (http::StatusCode::CREATED, format!("{n}")).into_response()
            }
        }),
    );
    use axum::response::IntoResponse;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });

    let retry = RetryLayer::new(
        RetryPolicy::http()
            .add_idempotency_key()
            .budget(Budget::builder().min_per_second(100).build().unwrap())
            .clock(Clock::tokio()),
    )
    .unwrap();
    let handle = retry.handle();
    let client = tower::ServiceBuilder::new()
        .layer(retry)
        .service(Client::builder(TokioExecutor::new()).build_http());
    let mut bad = Vec::new();
    for i in 0..10 {
        refuse.store(true, Ordering::SeqCst);
        let req = Request::post(format!("http://{addr}/orders"))
            .body(Full::new(Bytes::from(vec![b'x'; 60 * 1024])))
            .unwrap();
        match client.clone().oneshot(req).await {
            Ok(res) if res.status() == 201 => {}
            Ok(res) => bad.push((i, format!("{}", res.status()))),
            Err(e) => bad.push((i, format!("error {e}"))),
        }
    }
    assert!(
        bad.is_empty(),
        "{bad:?}; server saw {} attempts, {} retries",
        seen.load(Ordering::SeqCst),
        handle.retries()
    );
}

// ---------------------------------------------------------------------------------------------
// Errors keep their identity; POST after an error
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
struct ConnReset;
impl std::fmt::Display for ConnReset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection reset")
    }
}
impl std::error::Error for ConnReset {}

/// Scenario: retry over breaker over a client that keeps failing with its own error type.
/// Expected: once the attempts are spent, the caller gets the client's error, downcastable to
/// its type ("the last response or error is returned as it is"); a POST without a key is sent
/// once after an error. Regression check.
#[tokio::test(start_paused = true)]
async fn errors_come_back_as_they_were_and_a_post_is_sent_once() {
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let inner = tower::service_fn(
        move |_r: Request<tower_bulwark::retry::ReplayBody<Full<Bytes>>>| {
            c.fetch_add(1, Ordering::SeqCst);
            async { Err::<Response<()>, BoxError>(Box::new(ConnReset)) }
        },
    );
    let svc = tower::ServiceBuilder::new()
        .layer(RetryLayer::new(RetryPolicy::http().clock(Clock::tokio())).unwrap())
        .layer(
            CircuitBreakerLayer::new(BreakerConfig::consecutive_failures(10).clock(Clock::tokio()))
                .unwrap()
                .classify(HttpStatus::new()),
        )
        .service(inner);
    let err = svc.clone().oneshot(get("http://a/x")).await.unwrap_err();
    assert!(err.downcast_ref::<ConnReset>().is_some(), "{err:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    let post = Request::post("http://a/x")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let err = svc.oneshot(post).await.unwrap_err();
    assert!(err.downcast_ref::<ConnReset>().is_some(), "{err:?}");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        4,
        "a POST without a key was sent again after an error"
    );
}

/// Like [`Wedged`] over `ReplayBody` requests: answers its first call 503, then is never ready.
#[derive(Clone)]
struct FailThenWedge {
    calls: Arc<AtomicU32>,
}

impl<B> Service<Request<B>> for FailThenWedge {
    type Response = Response<()>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<()>, BoxError>> + Send>>;
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if self.calls.load(Ordering::SeqCst) == 0 {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }
    fn call(&mut self, _req: Request<B>) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Box::pin(async { Ok(Response::builder().status(503).body(()).unwrap()) })
    }
}

/// Scenario: retry (deadline 2 s) over a breaker (opens for 100 ms after one failure) over a
/// dependency that fails once and then is never ready. The retry's later attempt finds the
/// open time over, claims the half-open probe slot and waits on readiness until the deadline.
///
/// Expected (retry docs: a retry still waiting for readiness at the deadline is not made and
/// the last answer is returned; breaker docs: a slot claimed for a wait is freed when its
/// service is dropped): the call returns by the deadline and no probe slot stays taken.
/// Regression check.
#[tokio::test(start_paused = true)]
async fn a_retry_cut_by_its_deadline_while_probing_frees_the_probe_slot() {
    let breaker = CircuitBreakerLayer::new(
        BreakerConfig::consecutive_failures(1)
            .open_time(Duration::from_millis(100))
            .jitter(0.0)
            .half_open_probes(1)
            .clock(Clock::tokio()),
    )
    .unwrap()
    .classify(HttpStatus::new());
    let handle = breaker.handle();
    let svc = tower::ServiceBuilder::new()
        .layer(
            RetryLayer::new(
                RetryPolicy::http()
                    .max_attempts(5)
                    .deadline(Duration::from_secs(2))
                    .clock(Clock::tokio()),
            )
            .unwrap(),
        )
        .layer(breaker)
        .service(FailThenWedge {
            calls: Arc::default(),
        });
    let start = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(30), svc.oneshot(get("http://a/x")))
        .await
        .expect("hung past the deadline");
    assert!(Instant::now() - start <= Duration::from_millis(2100));
    let figures = handle.figures();
    assert_eq!(
        figures.probes_in_flight,
        0,
        "{figures:?} (answer {:?})",
        r.map(|r| r.status())
    );
}

/// Scenario: as in `stale_tripped_keys_do_not_disable_breakers_for_new_hosts`, but the hosts
/// called once never trip: each had one failed and one good call (a single timeout, common in
/// any crawl), under the default `failure_rate(0.5)` over 100 calls. An hour later a new host
/// goes down.
///
/// Expected: a slot whose key was last used an hour ago, with one old failure in a window of
/// two calls, is not worth more than protecting a host that fails now.
///
/// What happens: "reuses one whose breaker is healthy (closed, no failure in its window)":
/// the old failure pins each slot for ever (its count window only moves with the key's own
/// calls), so the new sick host runs without a breaker.
#[tokio::test(start_paused = true)]
async fn one_old_failure_per_key_does_not_disable_breakers_for_new_hosts() {
    let calls = Arc::new(Mutex::new(std::collections::HashMap::<String, u32>::new()));
    let c = calls.clone();
    let inner = tower::service_fn(move |req: Request<()>| {
        let host = req.uri().host().unwrap().to_owned();
        let n = {
            let mut m = c.lock().unwrap();
            let e = m.entry(host.clone()).or_default();
            *e += 1;
            *e
        };
        let status = if host == "sick.example" || n == 1 {
            503
        } else {
            200
        };
        async move { Ok::<_, BoxError>(Response::builder().status(status).body(()).unwrap()) }
    });
    let layer = CircuitBreakerLayer::keyed(
        BreakerConfig::failure_rate(0.5)
            .minimum_calls(5)
            .max_keys(4)
            .clock(Clock::tokio()),
        |req: &Request<()>| req.uri().host().map(str::to_owned),
    )
    .unwrap()
    .classify(HttpStatus::new());
    let svc = tower::ServiceBuilder::new()
        .layer(layer.clone())
        .service(inner);
    let call = |host: &str| {
        svc.clone()
            .oneshot(Request::get(format!("http://{host}/")).body(()).unwrap())
    };
    for i in 0..16 {
        let host = format!("once{i}.example");
        let _ = call(&host).await;
        let _ = call(&host).await;
    }
    tokio::time::advance(Duration::from_secs(3600)).await;
    for _ in 0..40 {
        let _ = call("sick.example").await;
    }
    let n = calls.lock().unwrap()["sick.example"];
    assert!(
        n <= 5,
        "the sick host was called {n} times: no breaker for it (keys in use {})",
        layer.keys_in_use()
    );
}

/// Scenario: a handle for host A of a keyed breaker; A's slot is then given to host B. The
/// application force-opens A (an operator's kill switch for a host).
/// Expected (`BreakerHandle` # Keyed breakers: it "never acts on the breaker of the key that
/// took its slot"): B stays closed. Regression check.
#[tokio::test(start_paused = true)]
async fn a_stale_keyed_handle_never_acts_on_another_key() {
    let inner = tower::service_fn(|_req: Request<()>| async {
        Ok::<_, BoxError>(Response::builder().status(200).body(()).unwrap())
    });
    let layer = CircuitBreakerLayer::keyed(
        BreakerConfig::consecutive_failures(1)
            .max_keys(1)
            .clock(Clock::tokio()),
        |req: &Request<()>| req.uri().host().map(str::to_owned),
    )
    .unwrap();
    let svc = tower::ServiceBuilder::new()
        .layer(layer.clone())
        .service(inner);
    let _ = svc
        .clone()
        .oneshot(Request::get("http://a.example/").body(()).unwrap())
        .await;
    let a = layer.handle_for(&Some("a.example".to_string())).unwrap();
    let _ = svc
        .clone()
        .oneshot(Request::get("http://b.example/").body(()).unwrap())
        .await;
    assert!(layer.handle_for(&Some("a.example".to_string())).is_none());
    a.force_open();
    let r = svc
        .clone()
        .oneshot(Request::get("http://b.example/").body(()).unwrap())
        .await;
    assert!(
        r.is_ok(),
        "host B refused after A's stale handle was forced open"
    );
}

/// Scenario: `Retry-After` HTTP-dates in the past, some before 1970 (a server with its clock
/// unset, or a proxy's default), on a 503 to a GET. Expected (docs: "a date in the past means
/// 'now'"): retried after the backoff, whatever the year; never a panic. Regression check.
#[tokio::test(start_paused = true)]
async fn retry_after_dates_in_the_past_mean_now() {
    for date in [
        "Mon, 01 Jan 1900 00:00:00 GMT",
        "Wed, 31 Dec 1969 23:59:59 GMT",
        "Thu, 01 Jan 1970 00:00:00 GMT",
        "Monday, 01-Jan-01 00:00:00 GMT",
        "Mon Jan  1 00:00:00 0001",
        "Sun, 06 Nov 1994 08:49:37 GMT",
    ] {
        let inner = Scripted::new(vec![(503, vec![("retry-after", date)]), (200, vec![])]);
        let svc = tower::ServiceBuilder::new()
            .layer(RetryLayer::new(RetryPolicy::http().clock(Clock::tokio())).unwrap())
            .service(inner.clone());
        let res = svc.oneshot(get("http://a.example/x")).await.unwrap();
        assert_eq!((date, inner.calls()), (date, 2));
        assert_eq!(res.status(), 200);
        let seen = inner.seen.lock().unwrap().clone();
        assert!(seen[1].0 - seen[0].0 <= Duration::from_secs(1), "{date}");
    }
}

/// Scenario: a far-future HTTP-date `Retry-After` (year 9999) on a 503 to a GET.
/// Expected: longer than the max delay: returned at once, not retried. Regression check.
#[tokio::test(start_paused = true)]
async fn a_far_future_retry_after_date_stops() {
    for date in [
        "Fri, 31 Dec 9999 23:59:59 GMT",
        "Friday, 31-Dec-69 23:59:59 GMT",
    ] {
        let inner = Scripted::new(vec![(503, vec![("retry-after", date)]), (200, vec![])]);
        let svc = tower::ServiceBuilder::new()
            .layer(RetryLayer::new(RetryPolicy::http().clock(Clock::tokio())).unwrap())
            .service(inner.clone());
        let res = svc.oneshot(get("http://a.example/x")).await.unwrap();
        assert_eq!((date, inner.calls()), (date, 1));
        assert_eq!(res.status(), 503);
    }
}

// ---------------------------------------------------------------------------------------------
// Clock jumps
// ---------------------------------------------------------------------------------------------

/// Scenario: a manual clock set backwards ("Setting it backwards is allowed: it models a clock
/// that jumps, which every layer must survive", `ManualClock::set_nanos`) under a budget and
/// under a time-window breaker, then forwards past where it was.
/// Expected: no panic; the budget still grants and refuses; the breaker still trips and
/// recovers. Regression check (it holds).
#[tokio::test(start_paused = true)]
async fn budget_and_breaker_survive_a_clock_that_jumps_back() {
    let (clock, hand) = Clock::manual();
    hand.set_nanos(3_600_000_000_000);
    let budget = Budget::builder().clock(clock.clone()).build().unwrap();
    for _ in 0..100 {
        budget.deposit();
    }
    assert!(budget.try_withdraw());
    hand.set_nanos(1_000);
    for _ in 0..100 {
        budget.deposit();
        let _ = budget.try_withdraw();
    }
    let _ = budget.figures();
    hand.set_nanos(7_200_000_000_000);
    budget.deposit();
    assert!(
        budget.try_withdraw(),
        "the budget is stuck after the clock came back"
    );

    let breaker = CircuitBreakerLayer::new(
        BreakerConfig::failure_rate(0.5)
            .time_window(Duration::from_secs(10), 10)
            .minimum_calls(5)
            .or_slow_call_rate(0.9, Duration::from_secs(1))
            .open_time(Duration::from_secs(5))
            .clock(clock.clone()),
    )
    .unwrap();
    let handle = breaker.handle();
    let svc = tower::ServiceBuilder::new()
        .layer(breaker)
        .service(tower::service_fn(|fail: bool| async move {
            if fail {
                Err::<(), BoxError>("down".into())
            } else {
                Ok(())
            }
        }));
    for _ in 0..5 {
        let _ = svc.clone().oneshot(false).await;
    }
    hand.set_nanos(1_000);
    for _ in 0..10 {
        let _ = svc.clone().oneshot(true).await;
    }
    assert_eq!(handle.state(), BreakerState::Open);
    hand.set_nanos(1_000 + 6_000_000_000);
    assert!(
        svc.clone().oneshot(false).await.is_ok(),
        "{:?}",
        handle.figures()
    );
}

// ---------------------------------------------------------------------------------------------
// gRPC deadlines across attempts
// ---------------------------------------------------------------------------------------------

/// Scenario: a tonic client sets a 1 s deadline on a call (`request.set_timeout(1s)`, sent as
/// `grpc-timeout: 1000000u`); the server answers `UNAVAILABLE` after 400 ms each time;
/// `RetryPolicy::grpc()` with its defaults (3 attempts).
///
/// Expected: a gRPC deadline is the call's, across all its attempts (gRPC's retry design, A6:
/// "the deadline applies to the whole call"; the caller waits at most that long and the
/// server works on it at most until then). A gRPC-aware retry either stops at the call's
/// deadline or sends each retry with the time that is left; the docs promise "a deadline
/// across attempts".
///
/// What happens: each retry carries the original `grpc-timeout` unchanged and the layer does
/// not stop at it: the caller waits past its deadline, and the server is told a later one.
#[tokio::test(start_paused = true)]
async fn grpc_retries_keep_to_the_calls_grpc_timeout() {
    let seen = Arc::new(Mutex::new(Vec::<(Instant, Option<String>)>::new()));
    let s2 = seen.clone();
    let inner = tower::service_fn(
        move |req: Request<tower_bulwark::retry::ReplayBody<Full<Bytes>>>| {
            s2.lock().unwrap().push((
                Instant::now(),
                req.headers()
                    .get("grpc-timeout")
                    .map(|v| v.to_str().unwrap().to_owned()),
            ));
            async move {
                tokio::time::sleep(Duration::from_millis(400)).await;
                Ok::<_, BoxError>(
                    Response::builder()
                        .header("content-type", "application/grpc")
                        .header("grpc-status", "14")
                        .body(())
                        .unwrap(),
                )
            }
        },
    );
    let svc = tower::ServiceBuilder::new()
        .layer(RetryLayer::new(RetryPolicy::grpc().clock(Clock::tokio())).unwrap())
        .service(inner);
    let mut req = grpc_call();
    req.headers_mut()
        .insert("grpc-timeout", http::HeaderValue::from_static("1000000u"));
    let start = Instant::now();
    let _ = svc.oneshot(req).await.unwrap();
    let took = Instant::now() - start;
    let seen = seen.lock().unwrap().clone();
    let told: Vec<_> = seen
        .iter()
        .map(|(at, t)| (*at - start, t.clone()))
        .collect();
    // Every attempt's deadline (its start plus the grpc-timeout it carries) is within the
    // call's, and the caller has its answer by the call's deadline (plus the last attempt's
    // answer time, if the server answers at once).
    let past_deadline = seen.iter().any(|(at, t)| {
        let t = t.as_deref().unwrap_or("0u");
        let micros: u64 = t.trim_end_matches('u').parse().unwrap_or(0);
        *at + Duration::from_micros(micros) > start + Duration::from_millis(1001)
    });
    assert!(
        !past_deadline && took <= Duration::from_millis(1001),
        "the call took {took:?} for a 1 s grpc-timeout; attempts (start, grpc-timeout): {told:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// The pool of static breaker states
// ---------------------------------------------------------------------------------------------

/// Scenario: a client (its breaker layer, services and handle) is dropped and rebuilt, as on a
/// configuration reload, with the same breaker configuration and the default system clock.
/// A call made through the old client is still in flight (a spawned task) and fails after the
/// rebuild.
///
/// Expected (`CircuitBreakerLayer` # Memory: a state "is not freed when its layer, services
/// and handles are gone but reset and kept for the next layer made with the same
/// configuration"; `# State and clones`: two layers are two breakers): the old call's failure
/// counts for the old breaker, never for the new layer's.
///
/// Regression check (it holds).
#[tokio::test]
async fn a_late_call_of_a_dropped_layer_does_not_count_for_a_new_layer() {
    let config = || {
        BreakerConfig::consecutive_failures(1)
            .open_time(Duration::from_secs(321))
            .max_open_time(Duration::from_secs(321))
    };
    let gate = Arc::new(tokio::sync::Notify::new());
    let g = gate.clone();
    let old = CircuitBreakerLayer::new(config()).unwrap();
    let svc = tower::ServiceBuilder::new()
        .layer(old)
        .service(tower::service_fn(move |_: ()| {
            let g = g.clone();
            async move {
                g.notified().await;
                Err::<(), BoxError>("old dependency failed".into())
            }
        }));
    let fut = svc.clone().oneshot(());
    drop(svc);
    let task = tokio::spawn(fut);
    tokio::task::yield_now().await;

    let new = CircuitBreakerLayer::new(config()).unwrap();
    let handle = new.handle();
    let svc2 = tower::ServiceBuilder::new()
        .layer(new)
        .service(tower::service_fn(|_: ()| async { Ok::<(), BoxError>(()) }));
    assert!(svc2.clone().oneshot(()).await.is_ok());

    gate.notify_one();
    let _ = task.await.unwrap();
    assert_eq!(
        handle.state(),
        BreakerState::Closed,
        "{:?}",
        handle.figures()
    );
    assert!(
        svc2.oneshot(()).await.is_ok(),
        "the new layer refuses because of the old layer's call"
    );
}

// ---------------------------------------------------------------------------------------------
// Body replay
// ---------------------------------------------------------------------------------------------

/// A body of `frames` frames of `size` bytes each, with an exact size hint (as `Full` or a
/// file body with a known length gives one).
struct Frames {
    left: usize,
    size: usize,
    n: u8,
}

impl Body for Frames {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        self.left -= 1;
        self.n += 1;
        let chunk = Bytes::from(vec![b'a' + self.n; self.size]);
        Poll::Ready(Some(Ok(http_body::Frame::data(chunk))))
    }
    fn is_end_stream(&self) -> bool {
        self.left == 0
    }
    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact((self.left * self.size) as u64)
    }
}

/// Scenario: a PUT with a 3-frame body of a known length (hyper writes `Content-Length` from
/// an exact size hint); the server reads one frame, answers 503 and drops the rest. The
/// retry's body must be the whole body, and its size hint must say the length it really has.
///
/// Expected (`ReplayBody`: "the kept bytes (then whatever of the original was not read yet) on
/// a retry"): the retry sends all 3 frames, and its size hint matches them (a wrong exact hint
/// is a wrong `Content-Length`: a truncated or hung request). Regression check.
#[tokio::test(start_paused = true)]
async fn a_partly_read_body_is_replayed_whole_with_a_true_size_hint() {
    let seen = Arc::new(Mutex::new(Vec::<(u64, Option<u64>, usize, Bytes)>::new()));
    let s2 = seen.clone();
    let inner = tower::service_fn(
        move |req: Request<tower_bulwark::retry::ReplayBody<Frames>>| {
            let s2 = s2.clone();
            async move {
                let attempt = s2.lock().unwrap().len();
                let mut body = req.into_body();
                let hint = body.size_hint();
                if attempt == 0 {
                    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
                    s2.lock()
                        .unwrap()
                        .push((hint.lower(), hint.upper(), 1, first));
                    drop(body);
                    return Ok::<_, BoxError>(Response::builder().status(503).body(()).unwrap());
                }
                let all = body.collect().await.unwrap().to_bytes();
                s2.lock()
                    .unwrap()
                    .push((hint.lower(), hint.upper(), 0, all));
                Ok(Response::builder().status(200).body(()).unwrap())
            }
        },
    );
    let svc = tower::ServiceBuilder::new()
        .layer(RetryLayer::new(RetryPolicy::http().clock(Clock::tokio())).unwrap())
        .service(inner);
    let req = Request::put("http://a/x")
        .body(Frames {
            left: 3,
            size: 1000,
            n: 0,
        })
        .unwrap();
    let res = svc.oneshot(req).await.unwrap();
    assert_eq!(res.status(), 200);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    let (lo, hi, _, all) = &seen[1];
    assert_eq!(all.len(), 3000, "the retry's body");
    assert!(
        *lo <= 3000 && hi.is_none_or(|h| h >= 3000),
        "the retry's size hint [{lo}, {hi:?}] does not hold its 3000 bytes"
    );
}

// ---------------------------------------------------------------------------------------------
// An inner poll_ready that fails once (tower's Reconnect)
// ---------------------------------------------------------------------------------------------

/// Answers its first call 503; the next `poll_ready` fails once (a reconnect that failed, as
/// tower's `Reconnect` reports it), after which it is ready and answers 200.
#[derive(Clone)]
struct ReconnectOnce {
    state: Arc<AtomicU32>,
    calls: Arc<AtomicU32>,
}

impl<B> Service<Request<B>> for ReconnectOnce {
    type Response = Response<()>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<()>, BoxError>> + Send>>;
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // 0: before the first call; 1: after it (fail the next readiness once); 2: healed.
        if self
            .state
            .compare_exchange(1, 2, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            return Poll::Ready(Err(Box::new(ConnReset)));
        }
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, _req: Request<B>) -> Self::Future {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        let _ = self
            .state
            .compare_exchange(0, 1, Ordering::SeqCst, Ordering::SeqCst);
        let status = if n == 0 { 503 } else { 200 };
        Box::pin(async move { Ok(Response::builder().status(status).body(()).unwrap()) })
    }
}

/// Scenario: a GET answered 503; when its retry asks the client for readiness, the
/// reconnect fails once (tower's `Reconnect` reports a failed connect from `poll_ready`, then
/// connects on the next poll). Attempts are left (3 by default).
///
/// Expected: a connect that failed before anything was sent is the most retryable of errors;
/// the call goes on and ends 200, or at worst returns the last answer (the 503) rather than
/// an error that replaces it.
///
/// What happens: the retry's readiness error ends the call at once: the caller gets the
/// reconnect's error, the 503 it had is lost, and the attempts left are not used.
#[tokio::test(start_paused = true)]
async fn a_failed_reconnect_before_a_retry_does_not_end_the_call() {
    let inner = ReconnectOnce {
        state: Arc::default(),
        calls: Arc::default(),
    };
    let svc = tower::ServiceBuilder::new()
        .layer(RetryLayer::new(RetryPolicy::http().clock(Clock::tokio())).unwrap())
        .service(inner.clone());
    let r = svc.oneshot(get("http://a/x")).await;
    match r {
        Ok(res) => assert!(
            res.status() == 200 || res.status() == 503,
            "{}",
            res.status()
        ),
        Err(e) => panic!(
            "the call ended with the reconnect's error ({e}) after {} calls, attempts left",
            inner.calls.load(Ordering::SeqCst)
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// No wait at all
// ---------------------------------------------------------------------------------------------

/// Scenario: `Backoff::none()` ("No wait at all between attempts"), many attempts, no budget,
/// on a current-thread runtime, against a client that fails at once (a refused connection).
/// Expected: a future that retries still yields to the runtime between attempts (tokio's
/// cooperative scheduling), so other tasks (the runtime's timers, the server in the same
/// process) are not starved while it spins. Checked below by counting the polls the call takes.
///
/// What happens: all 100,000 attempts run inside one `poll`, never returning to the runtime
/// (no `yield` between attempts when the delay is zero). Low severity: it takes
/// `Backoff::none()` and many attempts.
#[tokio::test(start_paused = true)]
async fn retries_with_no_wait_yield_to_the_runtime() {
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let inner = tower::service_fn(move |_: ()| {
        c.fetch_add(1, Ordering::SeqCst);
        async { Err::<(), BoxError>(Box::new(ConnReset)) }
    });
    let svc = tower::ServiceBuilder::new()
        .layer(
            RetryLayer::new(
                RetryPolicy::errors()
                    .max_attempts(100_000)
                    .backoff(Backoff::none())
                    .no_budget()
                    .clock(Clock::tokio()),
            )
            .unwrap(),
        )
        .service(inner);
    let mut fut = std::pin::pin!(svc.oneshot(()));
    let mut polls = 0u32;
    let r = std::future::poll_fn(|cx| {
        polls += 1;
        fut.as_mut().poll(cx)
    })
    .await;
    assert!(r.is_err());
    assert_eq!(calls.load(Ordering::SeqCst), 100_000);
    assert!(
        polls > 1,
        "100,000 attempts ran in {polls} poll: the task never yielded to the runtime"
    );
}

// ---------------------------------------------------------------------------------------------
// add_idempotency_key against this crate's own IdempotencyLayer
// ---------------------------------------------------------------------------------------------

/// Scenario: a client with `RetryPolicy::http().add_idempotency_key()` POSTs a payment to a
/// server with `IdempotencyLayer` (the README's two stacks, end to end in process). The
/// handler charges the card (its effect), then a downstream call it makes fails and it answers
/// 503.
///
/// Expected (`RetryPolicy::add_idempotency_key`: "a server with `IdempotencyLayer` then runs
/// the request once however many attempts reach it"): the handler runs once.
///
/// What happens: the server's layer releases the key of a 5xx answer ("failures [...] release
/// the key so the client can retry") and the client's policy retries the 503 because it now
/// carries a key: the handler, and its charge, run again.
#[tokio::test(start_paused = true)]
async fn a_keyed_post_answered_503_by_its_handler_runs_once() {
    use axum::routing::post;
    use tower_bulwark::{IdempotencyLayer, MemoryStore, RejectionLayer};

    let charges = Arc::new(AtomicU32::new(0));
    let c = charges.clone();
    let app = axum::Router::new()
        .route(
            "/payments",
            post(move || {
                let c = c.clone();
                async move {
                    // The card is charged; then the receipt service is down.
                    let n = c.fetch_add(1, Ordering::SeqCst);
                    if n == 0 {
                        (http::StatusCode::SERVICE_UNAVAILABLE, "receipts down")
                    } else {
                        (http::StatusCode::CREATED, "charged")
                    }
                }
            }),
        )
        .layer(
            tower::ServiceBuilder::new()
                .layer(RejectionLayer::http())
                .layer(
                    IdempotencyLayer::builder(MemoryStore::default())
                        .unscoped()
                        .build()
                        .unwrap(),
                ),
        );
    let client = tower::ServiceBuilder::new()
        .layer(
            RetryLayer::new(
                RetryPolicy::http()
                    .add_idempotency_key()
                    .clock(Clock::tokio()),
            )
            .unwrap(),
        )
        .map_err(BoxError::from)
        .service(app);
    let req = Request::post("http://shop/payments")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(b"{\"amount\":100}")))
        .unwrap();
    let res = client.oneshot(req).await.unwrap();
    assert_eq!(
        charges.load(Ordering::SeqCst),
        1,
        "the card was charged twice for one payment (answer {})",
        res.status()
    );
}

// ---------------------------------------------------------------------------------------------
// Retry over a client-side concurrency bound held until the body ends
// ---------------------------------------------------------------------------------------------

/// Scenario: a client bounds its requests in flight to a dependency with this crate's
/// `BackpressureLayer::new(1).max_wait(500 ms).hold_until_body_end()` (a response counts until
/// its body is read), below a `RetryLayer`. A GET is answered 503, then 200.
///
/// Expected: the retry is made (the 503 it drops frees its permit) and the call ends 200.
/// Regression check (it holds, with and without a deadline).
#[tokio::test(start_paused = true)]
async fn a_retry_over_a_permit_held_until_body_end_is_made() {
    use tower_bulwark::BackpressureLayer;
    for deadline in [None, Some(Duration::from_secs(2))] {
        let inner = Scripted::new(vec![(503, vec![]), (200, vec![])]);
        let mut policy = RetryPolicy::http().clock(Clock::tokio());
        if let Some(d) = deadline {
            policy = policy.deadline(d);
        }
        let svc = tower::ServiceBuilder::new()
            .layer(RetryLayer::new(policy).unwrap())
            .layer(
                BackpressureLayer::new(1)
                    .max_wait(Duration::from_millis(500))
                    .hold_until_body_end(),
            )
            .service(inner.clone());
        let r = tokio::time::timeout(Duration::from_secs(30), svc.oneshot(get("http://a/x")))
            .await
            .expect("hung");
        match r {
            Ok(res) => assert_eq!(
                res.status(),
                200,
                "deadline {deadline:?}: {} calls",
                inner.calls()
            ),
            Err(e) => panic!("deadline {deadline:?}: {e} after {} calls", inner.calls()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Readiness checked again before the call (tower's ReadyCache)
// ---------------------------------------------------------------------------------------------

/// Scenario: as tower's `ReadyCache` (under `Balance`) does, a breaker-wrapped endpoint is
/// polled ready while its breaker is open, sits in the ready set, and is polled ready again
/// just before it is called, after the open time has ended.
///
/// Expected: the second `poll_ready` sees the breaker as it is now: the call is the half-open
/// probe and reaches the dependency (which has healed); not a refusal decided seconds ago,
/// with a wait hint that has already passed.
#[tokio::test(start_paused = true)]
async fn a_refusal_decided_while_open_is_decided_again_when_polled_again() {
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let inner = tower::service_fn(move |_: ()| {
        let n = c.fetch_add(1, Ordering::SeqCst);
        async move {
            if n == 0 {
                Err::<(), BoxError>("down".into())
            } else {
                Ok(())
            }
        }
    });
    let breaker = CircuitBreakerLayer::new(
        BreakerConfig::consecutive_failures(1)
            .open_time(Duration::from_secs(1))
            .jitter(0.0)
            .clock(Clock::tokio()),
    )
    .unwrap();
    let mut svc = tower::Layer::layer(&breaker, inner);
    assert!(svc.ready().await.unwrap().call(()).await.is_err());
    // Polled ready while open (decides a refusal), then left in the ready set.
    let _ = svc.ready().await.unwrap();
    tokio::time::advance(Duration::from_secs(3)).await;
    // Polled again just before the call.
    let r = svc.ready().await.unwrap().call(()).await;
    assert!(
        r.is_ok(),
        "refused after the open time ended: {:?} ({} calls reached the dependency)",
        r.unwrap_err().to_string(),
        calls.load(Ordering::SeqCst)
    );
}

// ---------------------------------------------------------------------------------------------
// A timeout above the breaker with a slow-call rate
// ---------------------------------------------------------------------------------------------

/// Scenario: the README's advice for a timeout placed above the breaker: "above it, a call it
/// cuts short counts as a slow call (with a slow-call rate)". The timeout is 1 s, the
/// slow-call threshold 1 s (the natural choice: a call the timeout cuts is slow), the
/// dependency hangs. Expected: after `minimum_calls` cut calls the breaker opens.
/// Regression check.
#[tokio::test(start_paused = true)]
async fn calls_cut_by_a_timeout_above_trip_the_slow_call_rate() {
    let breaker = CircuitBreakerLayer::new(
        BreakerConfig::slow_call_rate(0.5, Duration::from_secs(1))
            .minimum_calls(5)
            .clock(Clock::tokio()),
    )
    .unwrap();
    let handle = breaker.handle();
    let svc = tower::ServiceBuilder::new()
        .timeout(Duration::from_secs(1))
        .layer(breaker)
        .service(tower::service_fn(|_: ()| async {
            std::future::pending::<()>().await;
            Ok::<(), BoxError>(())
        }));
    for _ in 0..10 {
        let _ = svc.clone().oneshot(()).await;
    }
    assert_eq!(handle.state(), BreakerState::Open, "{:?}", handle.figures());
}

/// A server layer that holds the first `hang` calls for ever (a server that stalls).
#[derive(Clone)]
struct HangFirst<S> {
    inner: S,
    hang: Arc<AtomicU32>,
    seen: Arc<AtomicU32>,
}

impl<S, B> Service<Request<B>> for HangFirst<S>
where
    S: Service<Request<B>, Response = Response<tonic::body::Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Send + 'static,
{
    type Response = Response<tonic::body::Body>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }
    fn call(&mut self, req: Request<B>) -> Self::Future {
        self.seen.fetch_add(1, Ordering::SeqCst);
        let hang = self
            .hang
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        let fut = self.inner.call(req);
        Box::pin(async move {
            if hang {
                std::future::pending::<()>().await;
            }
            fut.await.map_err(Into::into)
        })
    }
}

/// Scenario: a tonic client marks a call `Idempotent` (as the docs say:
/// `request.extensions_mut().insert(Idempotent)`), with a per-attempt timeout below the retry
/// layer; the server stalls on the first attempt. Expected (`Idempotent` docs): the timed-out
/// call is retried and succeeds; an unmarked call is not retried. Regression check, over a
/// real HTTP/2 connection.
#[tokio::test(start_paused = true)]
async fn tonic_calls_marked_idempotent_are_retried_after_a_timeout() {
    use tonic::transport::{server::TcpIncoming, Channel, Server};
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    use tower_bulwark::retry::Idempotent;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_reporter, health) = tonic_health::server::health_reporter();
    let hang = Arc::new(AtomicU32::new(0));
    let seen = Arc::new(AtomicU32::new(0));
    let (h, s2) = (hang.clone(), seen.clone());
    tokio::spawn(async move {
        Server::builder()
            .layer(tower::layer::layer_fn(move |inner| HangFirst {
                inner,
                hang: h.clone(),
                seen: s2.clone(),
            }))
            .add_service(health)
            .serve_with_incoming(TcpIncoming::from(listener))
            .await
    });
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let svc = tower::ServiceBuilder::new()
        .layer(RetryLayer::new(RetryPolicy::grpc().clock(Clock::tokio())).unwrap())
        .timeout(Duration::from_millis(200))
        .map_request(|r: Request<_>| r.map(tonic::body::Body::new))
        .service(channel);
    let mut client = HealthClient::new(svc);

    hang.store(1, Ordering::SeqCst);
    let mut req = tonic::Request::new(HealthCheckRequest {
        service: String::new(),
    });
    req.extensions_mut().insert(Idempotent);
    let r = client.check(req).await;
    assert!(
        r.is_ok(),
        "{r:?}; server saw {}",
        seen.load(Ordering::SeqCst)
    );
    assert_eq!(seen.load(Ordering::SeqCst), 2);

    hang.store(1, Ordering::SeqCst);
    let r = client
        .check(tonic::Request::new(HealthCheckRequest {
            service: String::new(),
        }))
        .await;
    assert!(r.is_err());
    assert_eq!(
        seen.load(Ordering::SeqCst),
        3,
        "an unmarked call was retried after a timeout"
    );
}

/// Scenario: a policy with no practical cap on the delay (`Backoff::exponential(25 ms,
/// Duration::MAX)`, accepted when the layer is built) meets huge hints: `Retry-After:
/// 18446744073709551615`, a rejection's `retry_after` of `Duration::MAX`, and many attempts
/// (the exponential ceiling grows past any `Duration`).
/// Expected: no panic and no wrap-around to a short wait: the call waits (or stops), and a
/// caller's timeout ends it. Regression check (it holds).
#[tokio::test(start_paused = true)]
async fn huge_hints_under_an_uncapped_backoff_neither_panic_nor_wrap() {
    let backoff = Backoff::exponential(Duration::from_millis(25), Duration::MAX);
    // A huge Retry-After.
    let inner = Scripted::new(vec![
        (503, vec![("retry-after", "18446744073709551615")]),
        (200, vec![]),
    ]);
    let layer = RetryLayer::new(RetryPolicy::http().backoff(backoff).clock(Clock::tokio()));
    let Ok(layer) = layer else { return };
    let svc = tower::ServiceBuilder::new()
        .layer(layer)
        .service(inner.clone());
    let r = tokio::time::timeout(Duration::from_secs(3600), svc.oneshot(get("http://a/x"))).await;
    assert!(r.map(|r| r.unwrap().status() == 503).unwrap_or(true));
    assert_eq!(
        inner.calls(),
        1,
        "retried early after a Retry-After of u64::MAX seconds"
    );

    // A rejection with Duration::MAX.
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let inner = tower::service_fn(move |_: ()| {
        c.fetch_add(1, Ordering::SeqCst);
        async { Err::<(), BoxError>(Rejection::circuit_open(Duration::MAX).into()) }
    });
    let svc = tower::ServiceBuilder::new()
        .layer(
            RetryLayer::new(RetryPolicy::errors().backoff(backoff).clock(Clock::tokio())).unwrap(),
        )
        .service(inner);
    let _ = tokio::time::timeout(Duration::from_secs(3600), svc.oneshot(())).await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "retried early after a retry_after of Duration::MAX"
    );

    // Many attempts: ceilings past any Duration.
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let inner = tower::service_fn(move |_: ()| {
        c.fetch_add(1, Ordering::SeqCst);
        async { Err::<(), BoxError>(Box::new(ConnReset)) }
    });
    let svc = tower::ServiceBuilder::new()
        .layer(
            RetryLayer::new(
                RetryPolicy::errors()
                    .max_attempts(2000)
                    .no_budget()
                    .backoff(backoff.jitter(tower_bulwark::retry::Jitter::Equal))
                    .clock(Clock::tokio()),
            )
            .unwrap(),
        )
        .service(inner);
    let _ = tokio::time::timeout(Duration::from_secs(86400 * 365), svc.oneshot(())).await;
    let n = calls.load(Ordering::SeqCst);
    assert!(
        n < 100,
        "{n} attempts in a year: the delay wrapped round to short waits"
    );
}

// ---------------------------------------------------------------------------------------------
// tower's load_shed below the breaker
// ---------------------------------------------------------------------------------------------

/// Scenario: a client bounds its in-flight calls with tower's own layers below the breaker,
/// `load_shed` over `concurrency_limit(2)` (tower's documented way to shed instead of queue),
/// and a healthy dependency that answers in 100 ms. A burst of 20 concurrent calls comes.
///
/// Expected (breaker docs: a failure is a sign the *dependency* is sick; the crate's own shed,
/// `Rejection` `Overloaded`, is classified `Throttled`, "not a sign of ill health"): calls shed
/// locally, which never reached the dependency, do not open the breaker.
///
/// What happens: tower's `Overloaded` error is an error like any other (`ErrorsOnly`, and
/// `HttpStatus` too, count every error as a failure): 18 local sheds open the breaker, and
/// every call is refused for the open time although the dependency never failed.
#[tokio::test(start_paused = true)]
async fn local_shedding_by_tower_load_shed_does_not_open_the_breaker() {
    let breaker = CircuitBreakerLayer::new(
        BreakerConfig::failure_rate(0.5)
            .window(20)
            .minimum_calls(10)
            .clock(Clock::tokio()),
    )
    .unwrap()
    .classify(HttpStatus::new());
    let handle = breaker.handle();
    let dependency_calls = Arc::new(AtomicU32::new(0));
    let c = dependency_calls.clone();
    let svc = tower::ServiceBuilder::new()
        .layer(breaker)
        .load_shed()
        .concurrency_limit(2)
        .service(tower::service_fn(move |_req: Request<()>| {
            c.fetch_add(1, Ordering::SeqCst);
            async {
                tokio::time::sleep(Duration::from_millis(100)).await;
                Ok::<_, BoxError>(Response::builder().status(200).body(()).unwrap())
            }
        }));
    let calls: Vec<_> = (0..20)
        .map(|_| {
            svc.clone()
                .oneshot(Request::get("http://d/").body(()).unwrap())
        })
        .collect();
    let results = futures_util::future::join_all(calls).await;
    let shed = results.iter().filter(|r| r.is_err()).count();
    assert_eq!(
        handle.state(),
        BreakerState::Closed,
        "{shed} calls shed locally opened the breaker; the dependency answered all {} it saw: {:?}",
        dependency_calls.load(Ordering::SeqCst),
        handle.figures()
    );
}

/// Scenario: a client that had heavy traffic (a batch: 100,000 requests in a second), then
/// nothing for an hour, then 50 requests over 5 s (10 a second), one of which fails.
/// `ratio(0.2)`, no floor.
///
/// Expected (issue 14 item 3, `Budget` docs: "Every request of the window counts"): the window
/// holds 50 requests, so 10 retries are allowed (at least a few, given the slot precision).
///
/// Regression check (it holds).
#[test]
fn requests_after_a_quiet_spell_that_followed_a_batch_are_counted() {
    let (clock, hand) = Clock::manual();
    let budget = Budget::builder()
        .ratio(0.2)
        .min_per_second(0)
        .clock(clock)
        .build()
        .unwrap();
    for _ in 0..100_000 {
        hand.advance(Duration::from_micros(10));
        budget.deposit();
    }
    hand.advance(Duration::from_secs(3600));
    for _ in 0..50 {
        hand.advance(Duration::from_millis(100));
        budget.deposit();
    }
    let figures = budget.figures();
    let mut granted = 0;
    while budget.try_withdraw() {
        granted += 1;
        if granted > 100 {
            break;
        }
    }
    assert!(
        granted >= 5,
        "{granted} retries for a window of 50 requests at ratio 0.2: {figures:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// The README's client stack against the README's server layers
// ---------------------------------------------------------------------------------------------

/// Scenario: the README's client stack (`RetryPolicy::http().max_attempts(3)` with the default
/// backoff, over a breaker) calls, in process, an Axum route behind this crate's
/// `RejectionLayer::http()` and `BackpressureLayer::new(1)` (its defaults: shed at once with a
/// 503 and a spread `Retry-After`). Ten GETs arrive together; the handler takes 200 ms.
///
/// Expected (README: "`Retry-After` [...] honoured (never retried early; waited out with
/// jitter"); a shed GET is the very case retries are for): the shed GETs are retried after
/// the server's hint and served.
///
/// What happens: the server's shed hint is drawn from `[1 s, 3 s)` and written in whole
/// seconds ("by default `Retry-After` 1 to 3 s"), while the client's default maximum delay is
/// 1 s, and "a hint longer than the maximum delay returns the answer at once": most shed GETs
/// come back to the caller as 503 without a retry. The two default stacks do not compose.
#[tokio::test(start_paused = true)]
async fn the_readme_client_retries_what_the_readme_server_sheds() {
    use axum::routing::get as axum_get;
    use tower_bulwark::{BackpressureLayer, RejectionLayer};

    let app = axum::Router::new()
        .route(
            "/items",
            axum_get(|| async {
                tokio::time::sleep(Duration::from_millis(200)).await;
                "ok"
            }),
        )
        .layer(
            tower::ServiceBuilder::new()
                .layer(RejectionLayer::http())
                .layer(BackpressureLayer::new(1)),
        );
    let retry = RetryLayer::new(
        RetryPolicy::http()
            .max_attempts(3)
            .budget(Budget::ratio(0.2).unwrap())
            .clock(Clock::tokio()),
    )
    .unwrap();
    let retries = retry.handle();
    let client = tower::ServiceBuilder::new()
        .layer(retry)
        .layer(
            CircuitBreakerLayer::new(
                BreakerConfig::failure_rate(0.5)
                    .window(100)
                    .clock(Clock::tokio()),
            )
            .unwrap()
            .classify(HttpStatus::default()),
        )
        .map_err(BoxError::from)
        .service(app);
    let calls: Vec<_> = (0..10)
        .map(|_| client.clone().oneshot(get("http://shop/items")))
        .collect();
    let results = futures_util::future::join_all(calls).await;
    let statuses: Vec<_> = results
        .iter()
        .map(|r| r.as_ref().map(|r| r.status().as_u16()).unwrap_or(0))
        .collect();
    let served = statuses.iter().filter(|s| **s == 200).count();
    assert!(
        served >= 8,
        "only {served} of 10 GETs served: {statuses:?}; {} retries made",
        retries.retries()
    );
}

// ---------------------------------------------------------------------------------------------
// Client errors counted against a server route's health
// ---------------------------------------------------------------------------------------------

/// Scenario: a server protects a whole route with a breaker ("In a server stack, a breaker
/// protects [...] the whole route"), above this crate's `IdempotencyLayer`:
/// `RejectionLayer → CircuitBreakerLayer(HttpStatus) → IdempotencyLayer → handler`. One buggy
/// client sends requests with a malformed `Idempotency-Key` (300 characters: 400
/// `IdempotencyKeyInvalid`).
///
/// Expected (breaker docs: a 4xx "says the *request* was wrong, not that the dependency is
/// sick, and one bad client must not open the breaker for everybody"): the 400s do not count;
/// the other clients are served.
///
/// What happens: the idempotency layer's refusal reaches the breaker as a `Rejection` error,
/// which `classify` calls a `Failure` ("the other idempotency rejections are
/// `Outcome::Failure`"), and every error counts against health: five bad requests open the
/// breaker, and every client gets 503 for the open time.
#[tokio::test(start_paused = true)]
async fn a_clients_malformed_keys_do_not_open_a_route_breaker() {
    use axum::routing::post;
    use tower_bulwark::{IdempotencyLayer, MemoryStore, RejectionLayer};

    let breaker =
        CircuitBreakerLayer::new(BreakerConfig::consecutive_failures(5).clock(Clock::tokio()))
            .unwrap()
            .classify(HttpStatus::default());
    let handle = breaker.handle();
    let app = axum::Router::new()
        .route(
            "/orders",
            post(|| async { (http::StatusCode::CREATED, "created") }),
        )
        .layer(
            tower::ServiceBuilder::new()
                .layer(RejectionLayer::http())
                .layer(breaker)
                .layer(
                    IdempotencyLayer::builder(MemoryStore::default())
                        .unscoped()
                        .build()
                        .unwrap(),
                ),
        );
    let bad_key = "k".repeat(300);
    for _ in 0..5 {
        let req = Request::post("http://shop/orders")
            .header("idempotency-key", bad_key.as_str())
            .body(axum::body::Body::from("{}"))
            .unwrap();
        let res = app.clone().oneshot(req).await.unwrap();
        assert_eq!(res.status(), 400);
    }
    let good = Request::post("http://shop/orders")
        .header("idempotency-key", "good-key-1")
        .body(axum::body::Body::from("{}"))
        .unwrap();
    let res = app.oneshot(good).await.unwrap();
    assert_eq!(
        res.status(),
        201,
        "a well-behaved client refused after another's malformed keys (breaker {:?})",
        handle.state()
    );
}

// ---------------------------------------------------------------------------------------------
// Generated keys under a seed
// ---------------------------------------------------------------------------------------------

/// Scenario: one process builds two clients from one configured policy with a seed
/// (`RetryPolicy::http().seed(42).add_idempotency_key()`, say one per upstream, or a client
/// rebuilt on a configuration reload), and each sends POSTs.
///
/// Expected (`RetryPolicy::seed`: generated keys are "always mixed with random bits of the
/// process's own [...] a server never replays one replica's response to another's request"):
/// no two POSTs get the same `Idempotency-Key`. Regression check.
#[tokio::test(start_paused = true)]
async fn two_seeded_clients_in_one_process_never_share_a_key() {
    let policy = RetryPolicy::http()
        .seed(42)
        .add_idempotency_key()
        .clock(Clock::tokio());
    let mut keys = Vec::new();
    for _ in 0..2 {
        let inner = Scripted::new(vec![(201, vec![])]);
        let svc = tower::ServiceBuilder::new()
            .layer(RetryLayer::new(policy.clone()).unwrap())
            .service(inner.clone());
        for _ in 0..3 {
            let req = Request::post("http://a/orders")
                .body(Full::new(Bytes::from_static(b"{}")))
                .unwrap();
            svc.clone().oneshot(req).await.unwrap();
        }
        keys.extend(
            inner
                .seen
                .lock()
                .unwrap()
                .iter()
                .map(|(_, k)| k.clone().unwrap()),
        );
    }
    let mut unique = keys.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), keys.len(), "{keys:?}");
}

/// Scenario: half-open with its one probe out (slow); 1,000 other callers are refused.
/// Expected (module docs: refused callers are "told to come back after a random share of the
/// open time a failed probe would start"): hints spread over that span, none zero (a zero hint
/// sends the caller's retry straight back, into the refusal again). Regression check.
#[tokio::test(start_paused = true)]
async fn half_open_refusal_hints_are_spread_and_never_zero() {
    let breaker = CircuitBreakerLayer::new(
        BreakerConfig::consecutive_failures(1)
            .open_time(Duration::from_secs(1))
            .jitter(0.0)
            .half_open_probes(1)
            .clock(Clock::tokio()),
    )
    .unwrap();
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let svc = tower::ServiceBuilder::new()
        .layer(breaker)
        .service(tower::service_fn(move |_: ()| {
            let n = c.fetch_add(1, Ordering::SeqCst);
            async move {
                if n == 0 {
                    return Err::<(), BoxError>("down".into());
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                Ok(())
            }
        }));
    let _ = svc.clone().oneshot(()).await;
    tokio::time::advance(Duration::from_secs(2)).await;
    let probe = tokio::spawn(svc.clone().oneshot(()));
    tokio::task::yield_now().await;
    let mut hints = Vec::new();
    for _ in 0..1000 {
        let e = svc.clone().oneshot(()).await.unwrap_err();
        hints.push(Rejection::find(&*e).unwrap().retry_after().unwrap());
    }
    let _ = probe.await;
    hints.sort();
    assert!(hints[0] > Duration::ZERO, "a zero hint");
    assert!(
        hints[999] > hints[0] * 2,
        "not spread: {:?}..{:?}",
        hints[0],
        hints[999]
    );
}

/// Scenario: a dependency behind a gateway that rate-limits: answers alternate 503 (the
/// backend is down) and 429 (the gateway throttles). `consecutive_failures(3)`.
/// Expected (docs: 429 "is throttled and counts as neither"): the 429s neither count nor
/// reset the run of failures, so three 503s open the breaker. Regression check (it holds).
#[tokio::test(start_paused = true)]
async fn throttled_answers_do_not_reset_consecutive_failures() {
    let inner = Scripted::new(vec![
        (503, vec![]),
        (429, vec![]),
        (503, vec![]),
        (429, vec![]),
        (503, vec![]),
        (429, vec![]),
        (200, vec![]),
    ]);
    let breaker =
        CircuitBreakerLayer::new(BreakerConfig::consecutive_failures(3).clock(Clock::tokio()))
            .unwrap()
            .classify(HttpStatus::new());
    let handle = breaker.handle();
    let svc = tower::ServiceBuilder::new()
        .layer(breaker)
        .service(inner.clone());
    for _ in 0..6 {
        let _ = svc.clone().oneshot(get("http://a/x")).await;
    }
    assert_eq!(handle.state(), BreakerState::Open, "{:?}", handle.figures());
}

/// Scenario: two live layers built from the same configuration with the default (system)
/// clock and a small window, which the crate keeps in its pool of static states, for two
/// dependencies. One dependency fails. Expected (`# State and clones`: "Two dependencies that
/// must trip separately need two layers"): only its breaker opens. Regression check.
#[tokio::test]
async fn two_live_layers_with_one_configuration_trip_separately() {
    let config = || BreakerConfig::consecutive_failures(2).open_time(Duration::from_secs(7));
    let a = CircuitBreakerLayer::new(config()).unwrap();
    let b = CircuitBreakerLayer::new(config()).unwrap();
    let (ha, hb) = (a.handle(), b.handle());
    let sa = tower::ServiceBuilder::new()
        .layer(a)
        .service(tower::service_fn(|_: ()| async {
            Err::<(), BoxError>("down".into())
        }));
    let sb = tower::ServiceBuilder::new()
        .layer(b)
        .service(tower::service_fn(|_: ()| async { Ok::<(), BoxError>(()) }));
    for _ in 0..3 {
        let _ = sa.clone().oneshot(()).await;
    }
    assert_eq!(ha.state(), BreakerState::Open);
    assert_eq!(hb.state(), BreakerState::Closed);
    assert!(sb.oneshot(()).await.is_ok());
}

/// Scenario: a dependency down; 200 GETs in 2 s through `RetryPolicy::http().max_attempts(10)`
/// with `Budget::builder().ratio(0.2).min_per_second(0)`. Expected (`Budget`: "retries stay
/// at or below `ratio × requests`"): at most 40 retries (retries are not requests that earn
/// retries of their own). Regression check.
#[tokio::test(start_paused = true)]
async fn retries_do_not_earn_retries() {
    let inner = Scripted::new(vec![(503, vec![])]);
    let budget = Budget::builder()
        .ratio(0.2)
        .min_per_second(0)
        .clock(Clock::tokio())
        .build()
        .unwrap();
    let svc = tower::ServiceBuilder::new()
        .layer(RetryLayer::new(RetryPolicy::http().max_attempts(10).budget(budget)).unwrap())
        .service(inner.clone());
    for _ in 0..200 {
        let _ = svc.clone().oneshot(get("http://a/x")).await;
        tokio::time::advance(Duration::from_millis(10)).await;
    }
    let retries = inner.calls() - 200;
    assert!(
        retries >= 20,
        "only {retries} retries: the budget was not exercised"
    );
    assert!(
        retries <= 40,
        "{retries} retries for 200 requests at ratio 0.2"
    );
}

//! End to end over real loopback sockets: an Axum server with tower-bulwark's server layers,
//! real hyper clients. Every row of the rejection table (status, headers, problem+json); an
//! idempotent POST retried by the client after a dropped connection runs once on the server; a
//! breaker in the client opens against a failing server and closes after it heals.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tower::{ServiceBuilder, ServiceExt};
use tower_bulwark::circuit_breaker::BreakerState;
use tower_bulwark::classify::HttpStatus;
use tower_bulwark::clock::Clock;
use tower_bulwark::retry::Backoff;
use tower_bulwark::{
    BackpressureLayer, BreakerConfig, CircuitBreakerLayer, IdempotencyLayer, MemoryStore, Quota,
    RateLimitLayer, Rejection, RejectionKind, RejectionLayer, RetryLayer, RetryPolicy,
};

#[path = "support/gate.rs"]
mod gate;
use gate::Gate;
#[path = "support/down_store.rs"]
mod down_store;
use down_store::Down;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

#[derive(Clone, Default)]
struct Counters {
    orders: Arc<AtomicU64>,
    healthy: Arc<AtomicBool>,
    flaky: Arc<AtomicU64>,
    gate: Arc<Gate>,
}

async fn serve(app: Router) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

fn server_app(c: Counters) -> Router {
    let (orders, gate) = (c.orders.clone(), c.gate.clone());
    let create = move |body: Bytes| {
        let (orders, gate) = (orders.clone(), gate.clone());
        async move {
            gate.pass().await;
            let n = orders.fetch_add(1, Ordering::SeqCst) + 1;
            (StatusCode::CREATED, format!("order {n}: {}", body.len()))
        }
    };
    let flaky = {
        let c = c.clone();
        move || {
            let c = c.clone();
            async move {
                c.flaky.fetch_add(1, Ordering::SeqCst);
                if c.healthy.load(Ordering::SeqCst) {
                    (StatusCode::OK, "fine")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "down")
                }
            }
        }
    };
    let breaker = CircuitBreakerLayer::new(BreakerConfig::consecutive_failures(1)).unwrap();
    breaker.handle().force_open();
    Router::new()
        .route(
            "/limited",
            get(|| async { "ok" }).layer(
                ServiceBuilder::new()
                    .layer(RejectionLayer::http())
                    .layer(RateLimitLayer::new(Quota::per_minute(1).unwrap())),
            ),
        )
        .route(
            "/slow",
            get({
                let gate = c.gate.clone();
                move || async move {
                    gate.pass().await;
                    "slow"
                }
            })
            .layer(
                ServiceBuilder::new()
                    .layer(RejectionLayer::http())
                    .layer(BackpressureLayer::new(1)),
            ),
        )
        .route(
            "/open",
            get(|| async { "never" }).layer(
                ServiceBuilder::new()
                    .layer(RejectionLayer::http())
                    .layer(breaker),
            ),
        )
        .route(
            "/orders",
            post(create.clone()).layer(
                ServiceBuilder::new().layer(RejectionLayer::http()).layer(
                    IdempotencyLayer::builder(MemoryStore::default())
                        .required()
                        .max_request_body(1024)
                        .build()
                        .unwrap(),
                ),
            ),
        )
        .route(
            "/store-down",
            post(create).layer(
                ServiceBuilder::new()
                    .layer(RejectionLayer::http())
                    .layer(IdempotencyLayer::new(Down)),
            ),
        )
        .route("/flaky", get(flaky))
}

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn send(
    client: &HttpClient,
    req: Request<Full<Bytes>>,
) -> (StatusCode, HeaderMap, serde_json::Value) {
    let res = client.request(req).await.unwrap();
    let (parts, body) = res.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    (parts.status, parts.headers, json)
}

fn get_req(addr: SocketAddr, path: &str) -> Request<Full<Bytes>> {
    Request::get(format!("http://{addr}{path}"))
        .body(Full::new(Bytes::new()))
        .unwrap()
}

fn post_req(addr: SocketAddr, path: &str, key: Option<&str>, body: &str) -> Request<Full<Bytes>> {
    let mut b = Request::post(format!("http://{addr}{path}"));
    if let Some(k) = key {
        b = b.header("idempotency-key", k);
    }
    b.body(Full::new(Bytes::from(body.to_owned()))).unwrap()
}

fn assert_problem(status: StatusCode, h: &HeaderMap, v: &serde_json::Value, want: StatusCode) {
    assert_eq!(status, want, "{v}");
    assert_eq!(h["content-type"], "application/problem+json");
    assert_eq!(v["status"], want.as_u16());
    assert!(v["title"].is_string() && v["detail"].is_string() && v["type"].is_string());
}

fn retry_after(h: &HeaderMap) -> u64 {
    h["retry-after"].to_str().unwrap().parse().unwrap()
}

#[tokio::test]
async fn every_row_of_the_rejection_table_over_a_socket() {
    let counters = Counters::default();
    let addr = serve(server_app(counters.clone())).await;
    let c = client();

    // Rate limited: 429, Retry-After, RateLimit headers.
    assert_eq!(send(&c, get_req(addr, "/limited")).await.0, StatusCode::OK);
    let (s, h, v) = send(&c, get_req(addr, "/limited")).await;
    assert_problem(s, &h, &v, StatusCode::TOO_MANY_REQUESTS);
    // The next token is 59 to 60 s away, jittered upwards by less than as much again.
    assert!((59..=120).contains(&retry_after(&h)));
    assert_eq!(h["ratelimit-policy"], "\"default\";q=1;w=60");
    assert!(h["ratelimit"]
        .to_str()
        .unwrap()
        .starts_with("\"default\";r=0;t="));

    // Overloaded: 503, Retry-After.
    counters.gate.arm();
    let first = tokio::spawn({
        let c = c.clone();
        async move { send(&c, get_req(addr, "/slow")).await.0 }
    });
    counters.gate.entered().await;
    let (s, h, v) = send(&c, get_req(addr, "/slow")).await;
    counters.gate.release();
    assert_problem(s, &h, &v, StatusCode::SERVICE_UNAVAILABLE);
    assert!(retry_after(&h) >= 1);
    assert_eq!(v["type"], "tag:tower-bulwark,2026:overloaded");
    assert_eq!(first.await.unwrap(), StatusCode::OK);

    // Circuit open: 503, Retry-After.
    let (s, h, v) = send(&c, get_req(addr, "/open")).await;
    assert_problem(s, &h, &v, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(v["type"], "tag:tower-bulwark,2026:circuit-open");
    assert!(retry_after(&h) >= 1);

    // Idempotency key in flight: 409; reused with another payload: 422.
    counters.gate.arm();
    let first = tokio::spawn({
        let c = c.clone();
        async move {
            send(&c, post_req(addr, "/orders", Some("k1"), "{\"a\":1}"))
                .await
                .0
        }
    });
    counters.gate.entered().await;
    let (s, h, v) = send(&c, post_req(addr, "/orders", Some("k1"), "{\"a\":1}")).await;
    counters.gate.release();
    assert_problem(s, &h, &v, StatusCode::CONFLICT);
    assert_eq!(first.await.unwrap(), StatusCode::CREATED);
    let (s, h, v) = send(&c, post_req(addr, "/orders", Some("k1"), "{\"a\":2}")).await;
    assert_problem(s, &h, &v, StatusCode::UNPROCESSABLE_ENTITY);

    // Missing (required here) and malformed keys: 400. Oversized body: 413.
    let (s, h, v) = send(&c, post_req(addr, "/orders", None, "{}")).await;
    assert_problem(s, &h, &v, StatusCode::BAD_REQUEST);
    let long = "x".repeat(256);
    let (s, h, v) = send(&c, post_req(addr, "/orders", Some(&long), "{}")).await;
    assert_problem(s, &h, &v, StatusCode::BAD_REQUEST);
    let big = "y".repeat(4096);
    let (s, h, v) = send(&c, post_req(addr, "/orders", Some("k2"), &big)).await;
    assert_problem(s, &h, &v, StatusCode::PAYLOAD_TOO_LARGE);

    // Shared store down, fail-closed policy: 503, and nothing ran.
    let (s, h, v) = send(&c, post_req(addr, "/store-down", Some("k3"), "{}")).await;
    assert_problem(s, &h, &v, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(v["type"], "tag:tower-bulwark,2026:store-unavailable");
}

/// A TCP proxy that drops the first connection as soon as the server starts answering (the
/// request was delivered and handled; the response is lost), and relays later ones.
async fn dropping_proxy(upstream: SocketAddr) -> (SocketAddr, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let dropped = Arc::new(AtomicU64::new(0));
    let d = dropped.clone();
    tokio::spawn(async move {
        let mut first = true;
        loop {
            let Ok((mut client, _)) = listener.accept().await else {
                return;
            };
            let mut server = TcpStream::connect(upstream).await.unwrap();
            if std::mem::take(&mut first) {
                let d = d.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    let (mut cr, mut cw) = client.split();
                    let (mut sr, mut sw) = server.split();
                    let up = async {
                        loop {
                            let n = cr.read(&mut buf).await.unwrap_or(0);
                            if n == 0 || sw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    };
                    let mut first_byte = [0u8; 1];
                    tokio::select! {
                        _ = up => {}
                        _ = sr.read(&mut first_byte) => {}
                    }
                    // The server answered: drop both sides without relaying a byte.
                    let _ = cw.shutdown().await;
                    d.fetch_add(1, Ordering::SeqCst);
                });
            } else {
                tokio::spawn(async move {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
            }
        }
    });
    (addr, dropped)
}

#[tokio::test]
async fn idempotent_post_retried_after_a_dropped_connection_runs_once() {
    let counters = Counters::default();
    let addr = serve(server_app(counters.clone())).await;
    let (proxy, dropped) = dropping_proxy(addr).await;

    let client = ServiceBuilder::new()
        .layer(
            RetryLayer::new(
                RetryPolicy::http()
                    .max_attempts(3)
                    .backoff(Backoff::exponential(
                        Duration::from_millis(10),
                        Duration::from_millis(50),
                    ))
                    .add_idempotency_key(),
            )
            .unwrap(),
        )
        .service(Client::builder(TokioExecutor::new()).build_http::<_>());
    // No key of its own: the retry layer adds one, the same on both attempts.
    let req = Request::post(format!("http://{proxy}/orders"))
        .body(Full::new(Bytes::from_static(b"{\"sku\":1}")))
        .unwrap();
    let res = client.oneshot(req).await.unwrap();
    assert_eq!(
        dropped.load(Ordering::SeqCst),
        1,
        "the first connection was dropped"
    );
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(res.headers()["idempotent-replayed"], "true");
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"order 1: 9");
    assert_eq!(
        counters.orders.load(Ordering::SeqCst),
        1,
        "the order ran once"
    );
}

#[tokio::test]
async fn client_breaker_opens_against_a_failing_server_and_closes_after_it_heals() {
    let counters = Counters::default();
    let addr = serve(server_app(counters.clone())).await;
    let (clock, hand) = Clock::manual();
    let breaker = CircuitBreakerLayer::new(
        BreakerConfig::consecutive_failures(3)
            .open_time(Duration::from_secs(10))
            .jitter(0.0)
            .half_open_probes(2)
            .clock(clock),
    )
    .unwrap()
    .classify(HttpStatus::default());
    let handle = breaker.handle();
    let client = ServiceBuilder::new().layer(breaker).service(client());

    for _ in 0..3 {
        let res = client
            .clone()
            .oneshot(get_req(addr, "/flaky"))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
    assert_eq!(handle.state(), BreakerState::Open);
    // Open: refused in the client, the server is not called.
    let err = client
        .clone()
        .oneshot(get_req(addr, "/flaky"))
        .await
        .unwrap_err();
    let r = err.downcast_ref::<Rejection>().unwrap();
    assert_eq!(r.kind(), RejectionKind::CircuitOpen);
    assert_eq!(counters.flaky.load(Ordering::SeqCst), 3);

    // The server heals; after the open time, two probes close the breaker.
    counters.healthy.store(true, Ordering::SeqCst);
    hand.advance(Duration::from_secs(11));
    for _ in 0..2 {
        let res = client
            .clone()
            .oneshot(get_req(addr, "/flaky"))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }
    assert_eq!(handle.state(), BreakerState::Closed);
    assert_eq!(counters.flaky.load(Ordering::SeqCst), 5);
}

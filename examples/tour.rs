//! A tour of tower-bulwark: starts a real Axum server on 127.0.0.1 (a free port) with the
//! server layers (RejectionLayer, rate limit, idempotency, backpressure), drives it with a
//! client stack (retry + circuit breaker around hyper-util's client, itself a Tower service)
//! against routes that are limited, slow, flaky and idempotent, and prints what each layer did.
//!
//! Run: `cargo run --example tour`. It finishes by itself in a few seconds and exits 0.
//!
//! Memory stores by default. With `REDIS_URL` set (e.g. `redis://127.0.0.1:6379`) and the
//! `redis` feature (`cargo run --example tour --features redis`), the rate limit of `/limited`
//! and the idempotency records of `/orders` live in Redis, as they would for many replicas.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
use tower_bulwark::backpressure::BackpressureHandle;
use tower_bulwark::circuit_breaker::{BreakerHandle, BreakerState};
use tower_bulwark::classify::HttpStatus;
use tower_bulwark::idempotency::IdempotencyHandle;
use tower_bulwark::rate_limit::key::{self, ClientIp};
use tower_bulwark::rate_limit::RateLimitHandle;
use tower_bulwark::retry::{Backoff, ReplayBody, RetryHandle};
use tower_bulwark::{
    BackpressureLayer, BreakerConfig, Budget, CircuitBreakerLayer, IdempotencyLayer, MemoryStore,
    Quota, RateLimitLayer, Rejection, RejectionKind, RejectionLayer, RetryLayer, RetryPolicy,
};

type Error = Box<dyn std::error::Error + Send + Sync>;
type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// What the server shares with its handlers, and the layers' handles for the report.
#[derive(Clone)]
struct Shared {
    healthy: Arc<AtomicBool>,
    flaky_calls: Arc<AtomicU64>,
    orders_run: Arc<AtomicU64>,
}

/// The `/limited` limiter's handle: in process, or in Redis.
enum Limited {
    Local(RateLimitHandle),
    #[cfg(feature = "redis")]
    Redis(tower_bulwark::rate_limit::store::RedisRateLimitHandle),
}

impl Limited {
    fn rejected(&self) -> u64 {
        match self {
            Limited::Local(h) => h.rejected(),
            #[cfg(feature = "redis")]
            Limited::Redis(h) => h.rejected(),
        }
    }

    fn describe(&self) -> String {
        match self {
            Limited::Local(h) => format!(
                "in process, alice has {} left",
                h.remaining_for(&http::HeaderValue::from_static("alice"))
            ),
            #[cfg(feature = "redis")]
            Limited::Redis(_) => "in Redis, shared by every replica".to_owned(),
        }
    }
}

/// A Redis connection when `REDIS_URL` is set (and the `redis` feature is on).
#[cfg(feature = "redis")]
async fn redis_conn() -> Result<Option<redis::aio::ConnectionManager>, Error> {
    match std::env::var("REDIS_URL") {
        Ok(url) => {
            let client = redis::Client::open(url)?;
            Ok(Some(client.get_connection_manager().await?))
        }
        Err(_) => Ok(None),
    }
}

struct Server {
    addr: SocketAddr,
    shared: Shared,
    limited: Limited,
    slow: BackpressureHandle,
    orders: IdempotencyHandle,
}

async fn create_order(State(s): State<Shared>, body: Bytes) -> impl IntoResponse {
    tokio::time::sleep(Duration::from_millis(100)).await;
    let id = s.orders_run.fetch_add(1, Ordering::SeqCst) + 1;
    let echo = String::from_utf8_lossy(&body).into_owned();
    (
        StatusCode::CREATED,
        Json(serde_json::json!({ "order_id": id, "request": echo })),
    )
}

async fn flaky(State(s): State<Shared>) -> Response {
    s.flaky_calls.fetch_add(1, Ordering::SeqCst);
    if s.healthy.load(Ordering::SeqCst) {
        (StatusCode::OK, "flaky ok\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "flaky down\n").into_response()
    }
}

async fn start_server() -> Result<Server, Error> {
    let shared = Shared {
        healthy: Arc::new(AtomicBool::new(false)),
        flaky_calls: Arc::default(),
        orders_run: Arc::default(),
    };

    // GET /limited: 5 per second, burst 5, per API key; and 50 per second per client address.
    let by_ip = RateLimitLayer::keyed(
        Quota::per_second(50)?,
        ClientIp::new().peer_addr(|ext| ext.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip())),
    );
    let per_key = Quota::per_second(5)?;
    #[cfg(feature = "redis")]
    let redis = redis_conn().await?;
    #[cfg(not(feature = "redis"))]
    if std::env::var("REDIS_URL").is_ok() {
        println!(
            "REDIS_URL is set, but the tour was built without the `redis` feature: memory stores."
        );
    }
    let limited_route = get(|| async { "limited ok\n" });
    let (limited_route, limited) = {
        #[cfg(feature = "redis")]
        let redis_limit = match &redis {
            Some(conn) => {
                let layer = tower_bulwark::rate_limit::store::RedisRateLimitLayer::keyed(
                    conn.clone(),
                    tower_bulwark::rate_limit::store::RedisRateLimitConfig::new(per_key)
                        .prefix(&format!("tour:{}:", std::process::id()))?,
                    key::Header::new("x-api-key"),
                )?
                .response_headers();
                let handle = Limited::Redis(layer.handle());
                Some((
                    limited_route.clone().layer(
                        ServiceBuilder::new()
                            .layer(RejectionLayer::http())
                            .layer(by_ip.clone())
                            .layer(layer),
                    ),
                    handle,
                ))
            }
            None => None,
        };
        #[cfg(not(feature = "redis"))]
        let redis_limit = None;
        match redis_limit {
            Some(r) => r,
            None => {
                let by_key = RateLimitLayer::keyed(per_key, key::Header::new("x-api-key"))
                    .response_headers();
                let handle = Limited::Local(by_key.handle());
                (
                    limited_route.layer(
                        ServiceBuilder::new()
                            .layer(RejectionLayer::http())
                            .layer(by_ip)
                            .layer(by_key),
                    ),
                    handle,
                )
            }
        }
    };

    // GET /slow: 4 in flight, a waiter waits at most 50 ms, then is shed.
    let backpressure = BackpressureLayer::new(4).max_wait(Duration::from_millis(50));
    let slow = backpressure.handle();

    // POST /orders: each Idempotency-Key runs once; repeats get the stored response. Keys are
    // scoped by caller, by a digest of the `Authorization` header (the layer's default) and of
    // the `x-api-key` header: one caller never receives another's stored response. The stack
    // is the README's order: a limit per client address above idempotency, and below it the
    // limit that protects the handler (here one for the route, 20 per second) and
    // backpressure, so that a retry of a completed order gets its replay without spending
    // either.
    let orders_route = post(create_order);
    let orders_by_ip = RateLimitLayer::keyed(
        Quota::per_second(50)?,
        ClientIp::new().peer_addr(|ext| ext.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip())),
    );
    let orders_limit = RateLimitLayer::new(Quota::per_second(20)?);
    let orders_backpressure = BackpressureLayer::new(16).max_wait(Duration::from_millis(50));
    #[cfg(feature = "redis")]
    let redis_orders = match redis.as_ref() {
        Some(conn) => {
            let layer = IdempotencyLayer::builder(tower_bulwark::idempotency::RedisStore::new(
                conn.clone(),
            ))
            .scope_by_header("x-api-key")
            .build()?;
            Some((layer.handle(), layer))
        }
        None => None,
    };
    #[cfg(not(feature = "redis"))]
    let redis_orders: Option<(IdempotencyHandle, IdempotencyLayer<MemoryStore>)> = None;
    let (orders, orders_route) = match redis_orders {
        #[cfg(feature = "redis")]
        Some((handle, layer)) => (
            handle,
            orders_route.layer(
                ServiceBuilder::new()
                    .layer(RejectionLayer::http())
                    .layer(orders_by_ip)
                    .layer(layer)
                    .layer(orders_limit)
                    .layer(orders_backpressure),
            ),
        ),
        _ => {
            let layer = IdempotencyLayer::builder(MemoryStore::default())
                .scope_by_header("x-api-key")
                .build()?;
            (
                layer.handle(),
                orders_route.layer(
                    ServiceBuilder::new()
                        .layer(RejectionLayer::http())
                        .layer(orders_by_ip)
                        .layer(layer)
                        .layer(orders_limit)
                        .layer(orders_backpressure),
                ),
            )
        }
    };
    #[cfg(feature = "redis")]
    println!(
        "stores: {}",
        if redis.is_some() {
            "Redis (REDIS_URL)"
        } else {
            "in memory"
        }
    );

    let app = Router::new()
        .route("/limited", limited_route)
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(200)).await;
                "slow ok\n"
            })
            .layer(
                ServiceBuilder::new()
                    .layer(RejectionLayer::http())
                    .layer(backpressure),
            ),
        )
        .route("/flaky", get(flaky))
        .route("/orders", orders_route)
        .route("/health", get(|| async { "ok\n" }))
        .with_state(shared.clone());

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
    });
    Ok(Server {
        addr,
        shared,
        limited,
        slow,
        orders,
    })
}

async fn fetch(
    client: &HttpClient,
    req: Request<Full<Bytes>>,
) -> Result<(StatusCode, http::HeaderMap, Bytes), Error> {
    let res = client.request(req).await?;
    let (parts, body) = res.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok((parts.status, parts.headers, body))
}

fn get_req(url: &str, headers: &[(&str, &str)]) -> Result<Request<Full<Bytes>>, Error> {
    let mut req = Request::get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    Ok(req.body(Full::new(Bytes::new()))?)
}

fn header<'a>(h: &'a http::HeaderMap, name: &str) -> &'a str {
    h.get(name).and_then(|v| v.to_str().ok()).unwrap_or("-")
}

/// Rate limiting: two API keys send 12 requests each; each key gets its burst of 5.
async fn tour_rate_limit(server: &Server, client: &HttpClient) -> Result<(), Error> {
    println!("== rate limit: GET /limited, 5/s burst 5 per x-api-key");
    let url = format!("http://{}/limited", server.addr);
    for api_key in ["alice", "bob"] {
        let mut counts: BTreeMap<u16, u32> = BTreeMap::new();
        let mut first_reject = None;
        for _ in 0..12 {
            let (status, headers, body) =
                fetch(client, get_req(&url, &[("x-api-key", api_key)])?).await?;
            *counts.entry(status.as_u16()).or_default() += 1;
            if status == StatusCode::TOO_MANY_REQUESTS && first_reject.is_none() {
                first_reject = Some((headers, body));
            }
        }
        println!("   {api_key:>5}: {counts:?} (status: count)");
        if let Some((h, body)) = first_reject {
            println!(
                "          first 429: Retry-After {}, RateLimit {}, body {}",
                header(&h, "retry-after"),
                header(&h, "ratelimit"),
                String::from_utf8_lossy(&body)
            );
        }
    }
    println!(
        "   handle: {} rejected; limit {}",
        server.limited.rejected(),
        server.limited.describe()
    );
    let start = Instant::now();
    tokio::time::sleep(Duration::from_millis(450)).await;
    let mut admitted = 0;
    for _ in 0..5 {
        let (status, _, _) = fetch(client, get_req(&url, &[("x-api-key", "alice")])?).await?;
        admitted += u32::from(status == StatusCode::OK);
    }
    println!(
        "   {} ms later: alice admitted {admitted} of 5 (a token comes back every 200 ms)",
        start.elapsed().as_millis()
    );
    Ok(())
}

/// Backpressure: 12 concurrent requests to a route that allows 4 in flight and waits 50 ms.
async fn tour_backpressure(server: &Server, client: &HttpClient) -> Result<(), Error> {
    println!("\n== backpressure: GET /slow, 4 in flight, wait at most 50 ms (handler: 200 ms)");
    let url = format!("http://{}/slow", server.addr);
    let mut tasks = Vec::new();
    for _ in 0..12 {
        let client = client.clone();
        let req = get_req(&url, &[])?;
        tasks.push(tokio::spawn(async move { fetch(&client, req).await }));
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    println!(
        "   while running: {} in flight, {} waiting",
        server.slow.in_flight(),
        server.slow.waiting()
    );
    let mut counts: BTreeMap<u16, u32> = BTreeMap::new();
    let mut retry_after = None;
    for t in tasks {
        let (status, h, _) = t.await??;
        *counts.entry(status.as_u16()).or_default() += 1;
        if status == StatusCode::SERVICE_UNAVAILABLE {
            retry_after = Some(header(&h, "retry-after").to_owned());
        }
    }
    println!(
        "   12 concurrent: {counts:?}; shed with Retry-After {}; handle: {} shed, {} in flight now",
        retry_after.as_deref().unwrap_or("-"),
        server.slow.shed(),
        server.slow.in_flight()
    );
    Ok(())
}

/// The client stack: retry (3 attempts, 20% budget, idempotency keys for POST) around a
/// circuit breaker (5 failures in a row open it for 1 s) around hyper-util's client.
#[allow(clippy::type_complexity)]
fn client_stack<C>(
    inner: C,
) -> Result<
    (
        impl Service<
                Request<Full<Bytes>>,
                Response = http::Response<hyper::body::Incoming>,
                Error = BoxError,
                Future: Send,
            > + Clone
            + Send,
        RetryHandle,
        BreakerHandle,
    ),
    Error,
>
where
    C: Service<Request<ReplayBody<Full<Bytes>>>, Response = http::Response<hyper::body::Incoming>>
        + Clone
        + Send
        + 'static,
    C::Error: Into<BoxError>,
    C::Future: Send + 'static,
{
    let retry = RetryLayer::new(
        RetryPolicy::http()
            .max_attempts(3)
            .backoff(Backoff::exponential(
                Duration::from_millis(20),
                Duration::from_millis(200),
            ))
            .budget(Budget::ratio(0.2)?)
            .add_idempotency_key(),
    )?;
    let breaker = CircuitBreakerLayer::new(
        BreakerConfig::consecutive_failures(5)
            .open_time(Duration::from_secs(1))
            .half_open_probes(2),
    )?
    .classify(HttpStatus::default());
    let (retries, breaker_handle) = (retry.handle(), breaker.handle());
    let svc = ServiceBuilder::new()
        .layer(retry)
        .layer(breaker)
        .service(inner);
    Ok((svc, retries, breaker_handle))
}

fn outcome(r: &Result<http::Response<hyper::body::Incoming>, BoxError>) -> String {
    match r {
        Ok(res) => res.status().as_u16().to_string(),
        Err(e) => match Rejection::find(&**e).map(Rejection::kind) {
            Some(RejectionKind::CircuitOpen) => "circuit open".into(),
            Some(k) => format!("{k}"),
            None => format!("error: {e}"),
        },
    }
}

/// Retry and circuit breaker: a dependency that fails, then heals.
async fn tour_breaker(server: &Server) -> Result<(), Error> {
    println!("\n== client: retry (3 attempts, 20% budget) + circuit breaker (5 failures in a row) -> GET /flaky");
    let hyper_client = Client::builder(TokioExecutor::new()).build_http();
    let (client, retries, breaker) = client_stack(hyper_client)?;
    let url = format!("http://{}/flaky", server.addr);
    let mut transitions = vec![breaker.state()];
    let mut note = |s: BreakerState| {
        if transitions.last() != Some(&s) {
            transitions.push(s);
        }
    };

    server.shared.healthy.store(false, Ordering::SeqCst);
    let mut counts: BTreeMap<String, u32> = BTreeMap::new();
    for _ in 0..10 {
        let r = client.clone().oneshot(get_req(&url, &[])?).await;
        *counts.entry(outcome(&r)).or_default() += 1;
        note(breaker.state());
    }
    println!(
        "   server down, 10 calls: {counts:?}; server saw {} calls; {} retries",
        server.shared.flaky_calls.load(Ordering::SeqCst),
        retries.retries()
    );
    if let Some(b) = retries.budget() {
        let f = b.figures();
        println!(
            "   retry budget: {} retries of {:.1} allowed over {} requests in the window",
            f.retries, f.allowed, f.requests
        );
    }
    let fig = breaker.figures();
    println!(
        "   breaker: {:?}, {} failures in a row, open for {:?} more",
        fig.state, fig.consecutive_failures, fig.open_remaining
    );

    server.shared.healthy.store(true, Ordering::SeqCst);
    println!("   server heals; waiting out the open time (1 s + jitter)...");
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut counts: BTreeMap<String, u32> = BTreeMap::new();
    while Instant::now() < deadline {
        let r = client.clone().oneshot(get_req(&url, &[])?).await;
        *counts.entry(outcome(&r)).or_default() += 1;
        note(breaker.state());
        if breaker.state() == BreakerState::Closed {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for _ in 0..5 {
        let r = client.clone().oneshot(get_req(&url, &[])?).await;
        *counts.entry(outcome(&r)).or_default() += 1;
    }
    println!("   after healing: {counts:?}");
    println!("   breaker transitions: {transitions:?}");
    Ok(())
}

/// Idempotency: a POST whose response is lost on the way back is retried by the client with
/// the same Idempotency-Key; the server replays the stored response instead of running the
/// order twice.
async fn tour_idempotency(server: &Server, client: &HttpClient) -> Result<(), Error> {
    println!("\n== idempotency: POST /orders (the handler takes 100 ms)");
    let url = format!("http://{}/orders", server.addr);
    let hyper_client: Client<HttpConnector, ReplayBody<Full<Bytes>>> =
        Client::builder(TokioExecutor::new()).build_http();
    // The network loses the first response on its way back: the order ran, and the client
    // sees its connection reset.
    let lose = Arc::new(AtomicBool::new(true));
    let lossy = tower::service_fn(move |req: Request<ReplayBody<Full<Bytes>>>| {
        let (client, lose) = (hyper_client.clone(), lose.clone());
        async move {
            let res = client.request(req).await?;
            if lose.swap(false, Ordering::SeqCst) {
                drop(res);
                return Err::<_, BoxError>(
                    "connection reset: the response was lost on the way".into(),
                );
            }
            Ok(res)
        }
    });
    let (retrying, retries, _) = client_stack(lossy)?;
    let retries_before = retries.retries();

    let req = Request::post(&url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(b"{\"sku\":42}")))?;
    let res = retrying.oneshot(req).await?;
    let (status, replayed) = (
        res.status(),
        header(res.headers(), "idempotent-replayed").to_owned(),
    );
    let body = res.into_body().collect().await?.to_bytes();
    println!(
        "   retried POST (first response lost on the way back): {status}, Idempotent-Replayed {replayed}, {} retry, body {}",
        retries.retries() - retries_before,
        String::from_utf8_lossy(&body)
    );
    println!(
        "   the order handler ran {} time(s)",
        server.shared.orders_run.load(Ordering::SeqCst)
    );

    // Plain client, explicit keys: a repeat, another payload, another caller, a concurrent
    // duplicate.
    let post_as =
        |caller: &str, key: &str, body: &'static str| -> Result<Request<Full<Bytes>>, Error> {
            Ok(Request::post(&url)
                .header("authorization", format!("Bearer {caller}"))
                .header("idempotency-key", key)
                .body(Full::new(Bytes::from_static(body.as_bytes())))?)
        };
    let post = |key: &str, body: &'static str| post_as("alice", key, body);
    let (s1, _, _) = fetch(client, post("order-7", "{\"sku\":7}")?).await?;
    let (s2, h2, _) = fetch(client, post("order-7", "{\"sku\":7}")?).await?;
    let (s3, _, _) = fetch(client, post("order-7", "{\"sku\":8}")?).await?;
    let (s4, h4, _) = fetch(client, post_as("bob", "order-7", "{\"sku\":7}")?).await?;
    println!(
        "   key order-7: first {s1}, repeat {s2} (replayed: {}), other payload {s3}, \
         another caller's same request {s4} (replayed: {})",
        header(&h2, "idempotent-replayed"),
        header(&h4, "idempotent-replayed"),
    );
    let a = fetch(client, post("order-8", "{\"sku\":8}")?);
    let b = async {
        tokio::time::sleep(Duration::from_millis(20)).await;
        fetch(client, post("order-8", "{\"sku\":8}")?).await
    };
    let (a, b) = tokio::join!(a, b);
    println!(
        "   key order-8 sent twice at once: {} and {} (in flight)",
        a?.0, b?.0
    );
    let long_key = "k".repeat(300);
    let (s, _, body) = fetch(client, post(&long_key, "{}")?).await?;
    println!(
        "   300-character key: {s} {}",
        String::from_utf8_lossy(&body)
    );
    let st = server.orders.stats();
    println!(
        "   handle: {} executed, {} replayed, {} in flight (409), {} mismatched (422), {} invalid (400)",
        st.executed, st.replayed, st.in_flight_rejected, st.mismatched, st.invalid_keys
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let started = Instant::now();
    let server = start_server().await?;
    println!(
        "tower-bulwark tour: Axum server on http://{}\n",
        server.addr
    );
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();

    tour_rate_limit(&server, &client).await?;
    tour_backpressure(&server, &client).await?;
    tour_breaker(&server).await?;
    tour_idempotency(&server, &client).await?;

    println!(
        "\ntour finished in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

//! HTTP throughput and latency: a bare Axum route beside the same route behind the full
//! tower-bulwark server stack, measured in the same run by a load generator over loopback
//! keep-alive connections.
//!
//! Run: `cargo run --release --example http_load` (options through the environment:
//! `CONNECTIONS`, default 32; `SECONDS` per round, default 2; `ROUNDS`, default 3).
//!
//! Server and load generator share the machine, so the absolute figures are those of this
//! machine under this load; the ratio between the two servers is what the report is for.
//! Rounds alternate bare and stacked so that drift hits both alike.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::{routing::get, Router};
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tower::ServiceBuilder;
use tower_bulwark::rate_limit::key;
use tower_bulwark::{
    BackpressureLayer, IdempotencyLayer, MemoryStore, Quota, RateLimitLayer, RejectionLayer,
};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

fn bare() -> Router {
    Router::new().route("/", get(|| async { "hello" }))
}

/// The server stack (rejections, a keyed rate limit, backpressure, idempotency), with limits
/// far above what the load can reach: what is measured is the cost of the layers on the admit
/// path, not their refusals. The requests are GETs, which idempotency passes through.
fn stacked() -> Router {
    let generous = Quota::per_second(1_000_000_000)
        .unwrap()
        .burst(u32::MAX)
        .unwrap();
    Router::new().route("/", get(|| async { "hello" })).layer(
        ServiceBuilder::new()
            .layer(RejectionLayer::http())
            // The README's order: idempotency above the caller's limit and backpressure, so
            // that replays spend neither. Keys scoped by caller (a digest of `Authorization`
            // and of `x-api-key`).
            .layer(
                IdempotencyLayer::builder(MemoryStore::default())
                    .scope_by_header("x-api-key")
                    .build()
                    .unwrap(),
            )
            .layer(RateLimitLayer::keyed(
                generous,
                key::Header::new("x-api-key"),
            ))
            .layer(BackpressureLayer::new(1 << 16)),
    )
}

struct Round {
    requests: u64,
    elapsed: Duration,
    latencies: Vec<Duration>,
    errors: u64,
}

async fn drive(addr: SocketAddr, connections: u64, secs: u64) -> Round {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..connections {
        tasks.push(tokio::spawn(async move {
            let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            stream.set_nodelay(true).unwrap();
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            let mut lat = Vec::with_capacity(1 << 16);
            let mut errors = 0u64;
            while Instant::now() < deadline {
                let req = Request::get("/")
                    .header("host", "bench")
                    .header("x-api-key", "bench")
                    .body(Empty::new())
                    .unwrap();
                let t = Instant::now();
                match sender.send_request(req).await {
                    Ok(res) => {
                        let ok = res.status().is_success();
                        let _ = res.into_body().collect().await;
                        lat.push(t.elapsed());
                        errors += u64::from(!ok);
                    }
                    Err(_) => {
                        errors += 1;
                        break;
                    }
                }
            }
            (lat, errors)
        }));
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.unwrap();
        latencies.extend(l);
        errors += e;
    }
    Round {
        requests: latencies.len() as u64,
        elapsed: start.elapsed(),
        latencies,
        errors,
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

#[derive(Default)]
struct Totals {
    requests: u64,
    secs: f64,
    latencies: Vec<Duration>,
    errors: u64,
}

impl Totals {
    fn add(&mut self, r: Round) {
        self.requests += r.requests;
        self.secs += r.elapsed.as_secs_f64();
        self.latencies.extend(r.latencies);
        self.errors += r.errors;
    }
    fn rps(&self) -> f64 {
        self.requests as f64 / self.secs
    }
}

#[tokio::main]
async fn main() {
    let connections = env_or("CONNECTIONS", 32);
    let secs = env_or("SECONDS", 2);
    let rounds = env_or("ROUNDS", 3);
    let bare_addr = serve(bare()).await;
    let stack_addr = serve(stacked()).await;
    println!(
        "http_load: {connections} keep-alive connections, {rounds} rounds of {secs} s per server"
    );
    // Warm-up.
    drive(bare_addr, connections, 1).await;
    drive(stack_addr, connections, 1).await;
    let mut bare_t = Totals::default();
    let mut stack_t = Totals::default();
    for round in 0..rounds {
        let b = drive(bare_addr, connections, secs).await;
        let s = drive(stack_addr, connections, secs).await;
        println!(
            "  round {}: bare {:>9.0} req/s, stack {:>9.0} req/s",
            round + 1,
            b.requests as f64 / b.elapsed.as_secs_f64(),
            s.requests as f64 / s.elapsed.as_secs_f64()
        );
        bare_t.add(b);
        stack_t.add(s);
    }
    bare_t.latencies.sort();
    stack_t.latencies.sort();
    let row = |name: &str, t: &Totals| {
        println!(
            "  {name:<6} {:>9.0} req/s  p50 {:>7.1} us  p99 {:>7.1} us  errors {}",
            t.rps(),
            percentile(&t.latencies, 0.50).as_secs_f64() * 1e6,
            percentile(&t.latencies, 0.99).as_secs_f64() * 1e6,
            t.errors
        );
    };
    println!("totals:");
    row("bare", &bare_t);
    row("stack", &stack_t);
    let ratio = stack_t.rps() / bare_t.rps();
    let p99_ratio = percentile(&stack_t.latencies, 0.99).as_secs_f64()
        / percentile(&bare_t.latencies, 0.99).as_secs_f64();
    println!("stack/bare: throughput {ratio:.3}x, p99 latency {p99_ratio:.3}x");
}

//! A Tower HTTP client: retry (with `add_idempotency_key()`) and a circuit breaker around
//! hyper-util's client.
//!
//! Run: `cargo run --example http_client`. It starts its own small server on 127.0.0.1 (a
//! free port) whose `POST /payments` fails with 503 twice before it succeeds, and whose
//! `GET /down` always fails, then shows:
//!
//! - a POST retried safely: the retry layer gave it an `Idempotency-Key`, the same on every
//!   attempt (the server prints what it saw), so a server with `IdempotencyLayer` runs it once;
//! - the breaker opening after repeated failures, after which calls fail fast without
//!   reaching the server.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::{ServiceBuilder, ServiceExt};
use tower_bulwark::classify::HttpStatus;
use tower_bulwark::retry::Backoff;
use tower_bulwark::{
    BreakerConfig, Budget, CircuitBreakerLayer, Rejection, RetryLayer, RetryPolicy,
};

#[derive(Clone, Default)]
struct Seen {
    attempts: Arc<AtomicU32>,
    keys: Arc<Mutex<Vec<String>>>,
    down_calls: Arc<AtomicU32>,
}

async fn start_server(seen: Seen) -> Result<SocketAddr, tower::BoxError> {
    let s1 = seen.clone();
    let s2 = seen.clone();
    let app = Router::new()
        .route(
            "/payments",
            post(move |headers: HeaderMap| {
                let seen = s1.clone();
                async move {
                    let key = headers
                        .get("idempotency-key")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("(none)")
                        .to_owned();
                    seen.keys.lock().unwrap().push(key);
                    if seen.attempts.fetch_add(1, Ordering::SeqCst) < 2 {
                        (StatusCode::SERVICE_UNAVAILABLE, "try again\n")
                    } else {
                        (StatusCode::CREATED, "payment accepted\n")
                    }
                }
            }),
        )
        .route(
            "/down",
            get(move || {
                let seen = s2.clone();
                async move {
                    seen.down_calls.fetch_add(1, Ordering::SeqCst);
                    (StatusCode::SERVICE_UNAVAILABLE, "down\n")
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}

#[tokio::main]
async fn main() -> Result<(), tower::BoxError> {
    let seen = Seen::default();
    let addr = start_server(seen.clone()).await?;

    let retry = RetryLayer::new(
        RetryPolicy::http()
            .max_attempts(4)
            .backoff(Backoff::exponential(
                Duration::from_millis(20),
                Duration::from_millis(500),
            ))
            .budget(Budget::ratio(0.5)?)
            .add_idempotency_key(),
    )?;
    let retries = retry.handle();
    let breaker = CircuitBreakerLayer::new(
        BreakerConfig::consecutive_failures(3).open_time(Duration::from_secs(5)),
    )?
    .classify(HttpStatus::default());
    let breaker_handle = breaker.handle();
    let client = ServiceBuilder::new()
        .layer(retry)
        .layer(breaker)
        .service(Client::builder(TokioExecutor::new()).build_http());

    // A POST with no key of its own: the retry layer adds one, the same on every attempt.
    let req = Request::post(format!("http://{addr}/payments"))
        .body(Full::new(Bytes::from_static(b"{\"amount\":100}")))?;
    let res = client.clone().oneshot(req).await?;
    let status = res.status();
    let body = res.into_body().collect().await?.to_bytes();
    println!(
        "POST /payments -> {status} {:?} after {} attempts",
        String::from_utf8_lossy(&body).trim(),
        seen.attempts.load(Ordering::SeqCst)
    );
    for (i, key) in seen.keys.lock().unwrap().iter().enumerate() {
        println!("  attempt {}: Idempotency-Key {key}", i + 1);
    }

    // A dependency that is down: the breaker opens, then calls fail fast.
    breaker_handle.reset();
    for i in 1..=4 {
        let req = Request::get(format!("http://{addr}/down")).body(Full::new(Bytes::new()))?;
        match client.clone().oneshot(req).await {
            Ok(res) => println!("GET /down #{i} -> {}", res.status()),
            Err(e) => match Rejection::find(&*e) {
                Some(r) => println!(
                    "GET /down #{i} -> refused by the client: {r}; server calls so far: {}",
                    seen.down_calls.load(Ordering::SeqCst)
                ),
                None => println!("GET /down #{i} -> error: {e}"),
            },
        }
    }
    println!(
        "server saw {} calls to /down; breaker {:?}; {} retries in all",
        seen.down_calls.load(Ordering::SeqCst),
        breaker_handle.state(),
        retries.retries()
    );
    Ok(())
}

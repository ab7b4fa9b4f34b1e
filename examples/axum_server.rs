//! A long-running Axum server with tower-bulwark's server layers, to try with curl.
//!
//! Run: `cargo run --example axum_server` (address from `BIND`, default `127.0.0.1:3000`).
//!
//! Routes (rejections are `application/problem+json`):
//!
//! - `POST /orders`: idempotent. The handler takes 100 ms and answers 201 with a JSON order
//!   and a fresh id; a repeat with the same `Idempotency-Key` gets the stored response with
//!   `Idempotent-Replayed: true`; the same key with another body gets 422; a repeat while the
//!   first runs gets 409. Keys are scoped by caller (the `Authorization` header, the
//!   layer's default, and the `x-api-key` header): the same key sent with other credentials
//!   is another caller's key; requests with neither share one key space.
//! - `GET /limited`: 5 per second, burst 5, per `x-api-key` header, else per client address.
//! - `GET /slow`: at most 4 in flight; a request waits at most 50 ms for a slot, then gets
//!   503 with `Retry-After`. The handler sleeps 200 ms.
//! - `GET /flaky?fail=0.5`: fails with 503 on that fraction of calls.
//! - `GET /health`: no middleware.
//!
//! Try:
//!
//! ```text
//! curl -i -X POST localhost:3000/orders -H 'Idempotency-Key: abc' -d '{"sku":1}'
//! curl -i -X POST localhost:3000/orders -H 'Idempotency-Key: abc' -d '{"sku":1}'   # replayed
//! curl -i -X POST localhost:3000/orders -H 'Idempotency-Key: abc' -d '{"sku":2}'   # 422
//! curl -i -X POST localhost:3000/orders -H 'Idempotency-Key: abc' -d '{"sku":2}' \
//!      -H 'Authorization: Bearer other'                                             # runs: 201
//! for i in $(seq 8); do curl -s -o /dev/null -w '%{http_code} ' localhost:3000/limited; done
//! for i in $(seq 8); do curl -s -o /dev/null -w '%{http_code}\n' localhost:3000/slow & done; wait
//! ```

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{Request, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tower::ServiceBuilder;
use tower_bulwark::{
    BackpressureLayer, IdempotencyLayer, MemoryStore, Quota, RateLimitLayer, RejectionLayer,
};

#[derive(Clone, Default)]
struct AppState {
    next_order: Arc<AtomicU64>,
    flaky_calls: Arc<AtomicU64>,
    coin: RandomState,
}

async fn create_order(State(s): State<AppState>, body: axum::body::Bytes) -> impl IntoResponse {
    tokio::time::sleep(Duration::from_millis(100)).await;
    let id = s.next_order.fetch_add(1, Ordering::SeqCst) + 1;
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    (
        StatusCode::CREATED,
        Json(json!({ "id": format!("ord_{id:06}"), "request": request })),
    )
}

async fn flaky(
    State(s): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> impl IntoResponse {
    let fail = q
        .get("fail")
        .and_then(|f| f.parse::<f64>().ok())
        .unwrap_or(0.5);
    let n = s.flaky_calls.fetch_add(1, Ordering::SeqCst);
    // A uniform draw in [0, 1) from a seeded hash of the call number.
    let draw = (s.coin.hash_one(n) >> 11) as f64 / (1u64 << 53) as f64;
    if draw < fail.clamp(0.0, 1.0) {
        (StatusCode::SERVICE_UNAVAILABLE, "flaky: failed\n")
    } else {
        (StatusCode::OK, "flaky: ok\n")
    }
}

/// The `/limited` key: the API key when there is one, else the client address.
fn api_key_or_peer(req: &Request<Body>) -> String {
    match req.headers().get("x-api-key") {
        Some(k) => format!("key:{}", String::from_utf8_lossy(k.as_bytes())),
        None => match req.extensions().get::<ConnectInfo<SocketAddr>>() {
            Some(ConnectInfo(addr)) => format!("ip:{}", addr.ip()),
            None => "unknown".to_owned(),
        },
    }
}

fn app() -> Result<Router, Box<dyn std::error::Error>> {
    let orders = ServiceBuilder::new()
        .layer(RejectionLayer::http())
        // Keys scoped by caller: a digest of the `Authorization` header (the default) and of
        // the `x-api-key` header, so one caller never receives another's stored response.
        .layer(
            IdempotencyLayer::builder(MemoryStore::default())
                .scope_by_header("x-api-key")
                .build()?,
        );
    let limited = ServiceBuilder::new()
        .layer(RejectionLayer::http())
        .layer(RateLimitLayer::keyed(Quota::per_second(5)?, api_key_or_peer).response_headers());
    let slow = ServiceBuilder::new()
        .layer(RejectionLayer::http())
        .layer(BackpressureLayer::new(4).max_wait(Duration::from_millis(50)));
    Ok(Router::new()
        .route("/orders", post(create_order).layer(orders))
        .route("/limited", get(|| async { "limited: ok\n" }).layer(limited))
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(200)).await;
                "slow: ok\n"
            })
            .layer(slow),
        )
        .route("/flaky", get(flaky))
        .route("/health", get(|| async { "ok\n" }))
        .with_state(AppState::default()))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let bind = std::env::var("BIND").unwrap_or_else(|_| "127.0.0.1:3000".to_owned());
    let listener = tokio::net::TcpListener::bind(&bind).await?;
    println!("axum_server listening on http://{}", listener.local_addr()?);
    axum::serve(
        listener,
        app()?.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .await?;
    Ok(())
}

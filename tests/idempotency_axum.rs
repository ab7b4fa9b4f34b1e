//! An Axum router with a JSON handler behind the idempotency layer and `RejectionLayer::http()`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{Request, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::{ServiceBuilder, ServiceExt};
use tower_bulwark::idempotency::{IdempotencyLayer, MemoryStore};
use tower_bulwark::RejectionLayer;

#[derive(Clone, Default)]
struct Orders {
    next_id: Arc<AtomicU64>,
}

async fn create_order(
    State(orders): State<Orders>,
    Json(order): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let id = orders.next_id.fetch_add(1, Ordering::SeqCst) + 1;
    (
        StatusCode::CREATED,
        Json(json!({ "id": id, "sku": order["sku"], "qty": order["qty"] })),
    )
}

fn app(orders: Orders) -> Router {
    let idempotency = IdempotencyLayer::builder(MemoryStore::default())
        .scope(|head: &http::request::Parts| {
            head.headers
                .get("authorization")
                .map(|v| v.as_bytes().to_vec())
                .unwrap_or_default()
        })
        .build()
        .unwrap();
    Router::new()
        .route("/orders", post(create_order))
        .route("/ping", axum::routing::get(|| async { "pong" }))
        .with_state(orders)
        .layer(
            ServiceBuilder::new()
                .layer(RejectionLayer::http())
                .layer(idempotency),
        )
}

fn order(key: &str, user: &str, body: Value) -> Request<Body> {
    Request::post("/orders")
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {user}"))
        .header("idempotency-key", key)
        .body(Body::from(body.to_string()))
        .unwrap()
}

async fn json_of(res: axum::response::Response) -> Value {
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&bytes).unwrap()
}

#[tokio::test]
async fn router_runs_once_replays_and_refuses() {
    let orders = Orders::default();
    let app = app(orders.clone());
    let body = json!({ "sku": "A-1", "qty": 2 });

    let first = app
        .clone()
        .oneshot(order("k-1", "alice", body.clone()))
        .await
        .unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    assert_eq!(first.headers()["content-type"], "application/json");
    let first_json = json_of(first).await;
    assert_eq!(first_json, json!({ "id": 1, "sku": "A-1", "qty": 2 }));

    let again = app
        .clone()
        .oneshot(order("k-1", "alice", body.clone()))
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::CREATED);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(json_of(again).await, first_json);
    assert_eq!(orders.next_id.load(Ordering::SeqCst), 1);

    // Another payload with the same key: 422 problem+json.
    let other = app
        .clone()
        .oneshot(order("k-1", "alice", json!({ "sku": "A-1", "qty": 3 })))
        .await
        .unwrap();
    assert_eq!(other.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(other.headers()["content-type"], "application/problem+json");
    let problem = json_of(other).await;
    assert_eq!(problem["status"], 422);
    assert_eq!(
        problem["type"],
        "tag:tower-bulwark,2026:idempotency-key-reused"
    );

    // Another user with the same key: a fresh run, never alice's response.
    let bob = app
        .clone()
        .oneshot(order("k-1", "bob", body.clone()))
        .await
        .unwrap();
    assert!(bob.headers().get("idempotent-replayed").is_none());
    assert_eq!(json_of(bob).await["id"], 2);

    // A malformed key: 400 and no order.
    let bad = app.clone().oneshot(order("", "alice", body)).await.unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    assert_eq!(orders.next_id.load(Ordering::SeqCst), 2);

    // Routes the layer does not apply to are untouched.
    let ping = app
        .clone()
        .oneshot(Request::get("/ping").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(ping.status(), StatusCode::OK);
}

#[tokio::test]
async fn invalid_json_rejection_is_stored_like_any_4xx() {
    let orders = Orders::default();
    let app = app(orders.clone());
    let bad = || {
        Request::post("/orders")
            .header("content-type", "application/json")
            .header("idempotency-key", "k-2")
            .body(Body::from("{not json"))
            .unwrap()
    };
    let first = app.clone().oneshot(bad()).await.unwrap();
    assert_eq!(first.status(), StatusCode::BAD_REQUEST);
    let again = app.clone().oneshot(bad()).await.unwrap();
    assert_eq!(again.status(), StatusCode::BAD_REQUEST);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(orders.next_id.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn over_a_real_connection() {
    let orders = Orders::default();
    let app = app(orders.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Body>();
    let send = |key: &'static str| {
        let client = client.clone();
        async move {
            let req = Request::post(format!("http://{addr}/orders"))
                .header("content-type", "application/json")
                .header("idempotency-key", format!("\"{key}\""))
                .body(Body::from(json!({ "sku": "B", "qty": 1 }).to_string()))
                .unwrap();
            let res = client.request(req).await.unwrap();
            let replayed = res.headers().contains_key("idempotent-replayed");
            let status = res.status();
            let body = res.into_body().collect().await.unwrap().to_bytes();
            (status, replayed, body)
        }
    };
    let (s1, r1, b1) = send("net-1").await;
    let (s2, r2, b2) = send("net-1").await;
    assert_eq!((s1, r1), (StatusCode::CREATED, false));
    assert_eq!((s2, r2), (StatusCode::CREATED, true));
    assert_eq!(b1, b2);
    assert_eq!(orders.next_id.load(Ordering::SeqCst), 1);
    server.abort();
}
